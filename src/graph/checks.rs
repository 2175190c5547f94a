//! The loader's small rules, and how its messages are worded: names that
//! must be `schema.table`, the `$N` parameters of a look-up query, cycles
//! spelled out, serde's messages in an operator's words.

use std::sync::Arc;

use crate::diagnostic::plain_serde_message;

/// TOML and serde messages in a platform engineer's words.
pub(super) fn plain_toml_message(message: &str, field: Option<&str>) -> String {
    let mut text = plain_serde_message(message);
    if text.ends_with("expected an array") {
        text.push_str(", as `[\"id\"]`");
    }
    if text.starts_with("unknown field")
        && field.is_some_and(|f| f.starts_with("tables.") && !f.starts_with("tables.\""))
    {
        text.push_str(" (a table name holds a dot: quote it, as [tables.\"schema.table\"])");
    }
    text
}

pub(super) fn list(names: &[Arc<str>]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names.iter().map(|n| &**n).collect::<Vec<_>>().join(", ")
}

/// `a embeds b, which embeds a`, from the cycle's caches in embedding
/// order (each embedded by the next).
pub(super) fn cycle_message(names: &[&str]) -> String {
    if names.len() <= 2 {
        let name = names.first().copied().unwrap_or("?");
        return format!("embeds cycle: cache `{name}` embeds itself");
    }
    // names[i + 1] embeds names[i]; read it from the last embedder down.
    let mut text = format!("embeds cycle: `{}` embeds `{}`", names[names.len() - 1], names[names.len() - 2]);
    for name in names.iter().rev().skip(2) {
        text.push_str(&format!(", which embeds `{name}`"));
    }
    text.push_str(" (a cache cannot contain itself)");
    text
}

/// The `$N` parameters of a query with their byte offsets (outside quoted
/// literals and identifiers).
pub(super) fn query_parameters(query: &str) -> Vec<(usize, String)> {
    let bytes = query.as_bytes();
    let mut out = Vec::new();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'$' => {
                let digits = bytes[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
                if digits > 0 {
                    out.push((i, query[i..i + 1 + digits].to_owned()));
                    i += digits;
                }
            }
            None => {}
        }
        i += 1;
    }
    out
}

pub(super) fn is_qualified(name: &str) -> bool {
    match name.split_once('.') {
        Some((schema, table)) => !schema.is_empty() && !table.is_empty() && !table.contains('.'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_skip_quoted_text_and_see_every_number() {
        let found = query_parameters("SELECT '$2', \"$3\" FROM t WHERE a = ANY($1) AND b = $10");
        let names: Vec<&str> = found.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(names, ["$1", "$10"]);
        assert!(query_parameters("SELECT 1").is_empty());
    }

    #[test]
    fn cycles_read_from_the_embedder_down() {
        assert_eq!(cycle_message(&["a", "a"]), "embeds cycle: cache `a` embeds itself");
        assert_eq!(
            cycle_message(&["a", "b", "a"]),
            "embeds cycle: `a` embeds `b`, which embeds `a` (a cache cannot contain itself)"
        );
    }

    #[test]
    fn table_names_need_exactly_one_dot() {
        assert!(is_qualified("shop.products"));
        assert!(!is_qualified("products") && !is_qualified("a.b.c") && !is_qualified(".t") && !is_qualified("s."));
    }
}
