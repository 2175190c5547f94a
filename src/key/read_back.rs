//! Reading a rendered key back: which parameter values a template renders
//! it from. `evictd invalidate --key` uses it to say which cache a key
//! belongs to, and to follow `embeds` from it as a row change would.
//!
//! **Invariant:** a match is only reported when rendering the values read
//! back gives the key again, byte for byte, so a match never names a key
//! the template would not render. A value that went through normalisers
//! (`lower`, `sha256`, …) cannot be read back to what the application
//! passed: it is [`ReadBack::Normalised`], never a guess.

use super::{KeyTemplate, Placeholder, Segment, is_reserved};
use crate::change::Value;

/// One parameter of a key, as read back from it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ReadBack {
    /// The value, exactly (an integer when it reads as one).
    Value(Value),
    /// A value that went through normalisers: the original is unknown.
    Normalised,
    /// A query-section parameter the key leaves out (NULL or absent).
    Absent,
}

/// One step of the matcher: the template's segments, flattened.
enum Item<'t> {
    Literal(&'t str),
    Value(&'t Placeholder),
    /// A query-section entry; `first`: the section's first entry (the
    /// `&` separator restarts there).
    Entry {
        ph: &'t Placeholder,
        name: &'t str,
        first: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Bound {
    Text(String),
    Normalised,
}

impl KeyTemplate {
    /// The parameters `key` was rendered from, in [`params`](Self::params)
    /// order, or `None` when this template does not render `key`.
    pub(crate) fn read_back(&self, key: &str) -> Option<Vec<ReadBack>> {
        let mut items = Vec::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => items.push(Item::Literal(text)),
                Segment::Placeholder(ph) => items.push(Item::Value(ph)),
                Segment::Query(entries) => {
                    for (i, ph) in entries.iter().enumerate() {
                        items.push(Item::Entry { ph, name: &self.params[ph.param], first: i == 0 });
                    }
                }
            }
        }
        let mut bound = vec![None; self.params.len()];
        let mut budget = STEP_BUDGET;
        if !step(&items, 0, key, 0, false, &mut bound, &mut budget) {
            return None;
        }
        let out: Vec<ReadBack> = bound
            .into_iter()
            .map(|b| match b {
                None => ReadBack::Absent,
                Some(Bound::Normalised) => ReadBack::Normalised,
                Some(Bound::Text(text)) => ReadBack::Value(typed(text)),
            })
            .collect();
        // Rendering what was read must give the key again (when every value is known).
        if out.iter().all(|r| !matches!(r, ReadBack::Normalised)) {
            let values: Vec<Option<&Value>> = out
                .iter()
                .map(|r| match r {
                    ReadBack::Value(v) => Some(v),
                    _ => None,
                })
                .collect();
            if self.render(&values).ok().as_deref() != Some(key) {
                return None;
            }
        }
        Some(out)
    }
}

/// Most matching steps one key may take: adjacent placeholders with no
/// separator between them (`{a}{b}`) backtrack over every split, so a
/// long key against such a template gives up rather than hang.
const STEP_BUDGET: u32 = 100_000;

/// An integer in canonical decimal reads back as one (it renders the same,
/// and binds to a look-up's `$1` as the daemon binds it); text otherwise.
fn typed(text: String) -> Value {
    match text.parse::<i64>() {
        Ok(i) if i.to_string() == text => Value::Int(i),
        _ => Value::Text(text),
    }
}

/// Matches `items[i..]` against `key[pos..]`, binding parameters; `started`:
/// an entry of the current query section was written (the next needs `&`).
fn step(
    items: &[Item<'_>],
    i: usize,
    key: &str,
    pos: usize,
    started: bool,
    bound: &mut Vec<Option<Bound>>,
    budget: &mut u32,
) -> bool {
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    let Some(item) = items.get(i) else {
        return pos == key.len();
    };
    let rest = &key[pos..];
    match item {
        Item::Literal(text) => {
            rest.starts_with(text) && step(items, i + 1, key, pos + text.len(), false, bound, budget)
        }
        Item::Value(ph) => value(items, i, key, pos, ph, false, bound, budget),
        Item::Entry { ph, name, first } => {
            let started = started && !first;
            // Left out: NULL or absent.
            if step(items, i + 1, key, pos, started, bound, budget) {
                return true;
            }
            let prefix = format!("{}{name}=", if started { "&" } else { "" });
            rest.starts_with(&prefix) && value(items, i, key, pos + prefix.len(), ph, true, bound, budget)
        }
    }
}

/// Tries every end of a value starting at `pos`, longest first.
#[allow(clippy::too_many_arguments)]
fn value(
    items: &[Item<'_>],
    i: usize,
    key: &str,
    pos: usize,
    ph: &Placeholder,
    in_query: bool,
    bound: &mut Vec<Option<Bound>>,
    budget: &mut u32,
) -> bool {
    for end in value_ends(&key[pos..]).into_iter().rev() {
        let Some(text) = unescape(&key[pos..pos + end]) else { continue };
        let new = if ph.normalisers.is_empty() { Bound::Text(text) } else { Bound::Normalised };
        let before = bound[ph.param].clone();
        match (&before, &new) {
            (None, _) => bound[ph.param] = Some(new),
            (Some(a), b) if a == b => {}
            (Some(Bound::Normalised), _) | (Some(_), Bound::Normalised) => {}
            _ => continue,
        }
        if step(items, i + 1, key, pos + end, in_query, bound, budget) {
            return true;
        }
        bound[ph.param] = before;
    }
    false
}

/// Byte lengths at which a rendered value may end in `rest`: every char
/// boundary over its unreserved characters and whole `%XX` escapes.
fn value_ends(rest: &str) -> Vec<usize> {
    let mut ends = vec![0];
    let bytes = rest.as_bytes();
    let mut at = 0;
    while at < rest.len() {
        if bytes[at] == b'%' {
            let escape = rest.get(at + 1..at + 3).is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !escape {
                break;
            }
            at += 3;
        } else {
            let Some(c) = rest[at..].chars().next() else { break };
            if is_reserved(c) {
                break;
            }
            at += c.len_utf8();
        }
        ends.push(at);
    }
    ends
}

/// Decodes `%XX` escapes; `None` when the bytes are not UTF-8.
fn unescape(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let raw = text.as_bytes();
    let mut at = 0;
    while at < raw.len() {
        if raw[at] == b'%' {
            let hex = text.get(at + 1..at + 3)?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            bytes.push(raw[at]);
            at += 1;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(template: &str, key: &str) -> Option<Vec<ReadBack>> {
        KeyTemplate::parse(template).unwrap().read_back(key)
    }

    fn text(s: &str) -> ReadBack {
        ReadBack::Value(Value::Text(s.to_owned()))
    }

    #[test]
    fn reads_back_path_parameters_with_integers_typed() {
        assert_eq!(read("product:{id}:detail", "product:42:detail"), Some(vec![ReadBack::Value(Value::Int(42))]));
        assert_eq!(read("user:{{{id}}}:{lang}", "user:{7}:en"), Some(vec![ReadBack::Value(Value::Int(7)), text("en")]));
        assert_eq!(read("product:{id}:detail", "product:42:summary"), None);
        assert_eq!(read("product:{id}", "order:42"), None);
    }

    #[test]
    fn decodes_escapes_and_keeps_leading_zeros_as_text() {
        assert_eq!(read("page:{slug}", "page:a%3Ab"), Some(vec![text("a:b")]));
        assert_eq!(read("page:{slug}", "page:007"), Some(vec![text("007")]));
        // A raw reserved character is never part of a value.
        assert_eq!(read("page:{slug}", "page:a:b"), None);
    }

    #[test]
    fn a_normalised_value_is_not_guessed() {
        assert_eq!(read("user:{email|lower}", "user:ann@x.io"), Some(vec![ReadBack::Normalised]));
    }

    #[test]
    fn query_sections_read_present_and_absent_entries() {
        assert_eq!(
            read("search:{q}?{?page,lang}", "search:boots?lang=en"),
            Some(vec![text("boots"), ReadBack::Absent, text("en")])
        );
        assert_eq!(
            read("search:{q}?{?page,lang}", "search:boots?lang=en&page=2"),
            Some(vec![text("boots"), ReadBack::Value(Value::Int(2)), text("en")])
        );
    }

    #[test]
    fn adjacent_placeholders_on_a_long_key_give_up_in_bounded_time() {
        let key = "x".repeat(5_000);
        let started = std::time::Instant::now();
        // Any split matches the first time; a key no split can match gives up.
        assert!(read("{a}{b}{c}{d}", &key).is_some());
        assert_eq!(read("{a}{b}{c}{d}:", &key), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn every_rendered_key_reads_back_to_its_values() {
        let template = KeyTemplate::parse("a:{x}:{{{y}}}:{z}").unwrap();
        for (x, y, z) in [("1", "b c", "é:%"), ("", "q", "w"), ("-3", "{}", "&=?")] {
            let values = [Value::Text(x.into()), Value::Text(y.into()), Value::Text(z.into())];
            let key = template.render(&values.iter().map(Some).collect::<Vec<_>>()).unwrap();
            let back = template.read_back(&key).unwrap_or_else(|| panic!("{key} reads back"));
            let again: Vec<Option<&Value>> =
                back.iter().map(|r| if let ReadBack::Value(v) = r { Some(v) } else { None }).collect();
            assert_eq!(template.render(&again).unwrap(), key);
        }
    }
}
