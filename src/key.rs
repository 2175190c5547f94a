//! Key rendering: the one canonical way a key template and parameter values
//! become a cache key, byte for byte the same in evictd and in every
//! application that fills the cache.
//!
//! Template syntax (documented for users in `dependency-graphs/README.md`,
//! pinned by `tests/vectors/key-rendering.json`):
//!
//! - literal text; `{name}` a placeholder; `{name|lower|trim}` normalisers,
//!   applied left to right: `lower`, `upper`, `trim` (each idempotent) and
//!   `sha256` (lowercase hex digest; only last in a chain);
//! - `{{` and `}}` literal braces, for Redis Cluster hash tags:
//!   `user:{{{id}}}:profile` renders `user:{42}:profile`;
//! - `{?a,b|lower}` a query section: `a=1&b=x`, sorted by name whatever the
//!   order written, NULL parameters left out.
//!
//! Values: integers in decimal, booleans `true`/`false`, floats in their
//! shortest round-trip form (`-0` as `0`), bytes as lowercase hex, strings
//! as given except that the reserved characters `%` `:` `{` `}` `&` `=` `?`
//! and control characters are percent-encoded (UTF-8 bytes, uppercase hex).
//!
//! **Invariant:** for parameters of one type, rendering is injective as long
//! as the literal text between placeholders holds a reserved character (as
//! `:` does): a value can never forge a separator or a hash tag. Only a
//! declared normaliser (`lower`, `trim`, `sha256`…) maps distinct values to
//! one key, on purpose.

#[cfg(feature = "daemon")]
pub(crate) mod read_back;

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::change::Value;

/// A normaliser applied to a parameter's text before it enters the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Normaliser {
    Lower,
    Upper,
    Trim,
    Sha256,
}

impl Normaliser {
    #[cfg(test)]
    pub(crate) fn name(self) -> &'static str {
        match self {
            Normaliser::Lower => "lower",
            Normaliser::Upper => "upper",
            Normaliser::Trim => "trim",
            Normaliser::Sha256 => "sha256",
        }
    }

    fn parse(name: &str) -> Option<Normaliser> {
        match name {
            "lower" => Some(Normaliser::Lower),
            "upper" => Some(Normaliser::Upper),
            "trim" => Some(Normaliser::Trim),
            "sha256" => Some(Normaliser::Sha256),
            _ => None,
        }
    }

    fn apply(self, text: &str) -> String {
        match self {
            Normaliser::Lower => text.to_lowercase(),
            Normaliser::Upper => text.to_uppercase(),
            Normaliser::Trim => text.trim().to_owned(),
            Normaliser::Sha256 => hex::encode(Sha256::digest(text.as_bytes())),
        }
    }
}

/// One `{name|normaliser…}` occurrence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placeholder {
    /// Index into [`KeyTemplate::params`].
    pub(crate) param: usize,
    pub(crate) normalisers: Vec<Normaliser>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Placeholder(Placeholder),
    /// A `{?…}` section, its entries sorted by parameter name.
    Query(Vec<Placeholder>),
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    source: String,
    segments: Vec<Segment>,
    /// Distinct parameter names in order of first appearance.
    params: Vec<Arc<str>>,
    /// Whether each parameter appears in a query section only (may be NULL).
    optional: Vec<bool>,
}

/// Why a template did not parse; `offset` is a byte offset into the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub(crate) offset: usize,
    pub(crate) message: String,
}

/// Why a parsed template could not render a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("no value for placeholder `{0}`")]
    Missing(Arc<str>),
    /// A NULL value for a path placeholder: nothing is cached under it.
    #[error("placeholder `{0}` is NULL")]
    Null(Arc<str>),
}

impl KeyTemplate {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<KeyTemplate, TemplateError> {
        Parser { src: source, pos: 0, params: Vec::new() }.run()
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Distinct parameter names in order of first appearance.
    pub(crate) fn params(&self) -> &[Arc<str>] {
        &self.params
    }

    /// Whether parameter `i` appears only in query sections (and so may be
    /// NULL or absent without preventing the key).
    #[cfg(test)]
    pub(crate) fn is_optional(&self, i: usize) -> bool {
        self.optional.get(i).copied().unwrap_or(false)
    }

    pub(crate) fn param_index(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| &**p == name)
    }

    /// Renders with `values[i]` for `params()[i]`; `None` is an absent value.
    pub fn render(&self, values: &[Option<&Value>]) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Placeholder(ph) => {
                    let value = self.value_of(values, ph.param)?;
                    if value.is_null() {
                        return Err(RenderError::Null(self.params[ph.param].clone()));
                    }
                    push_value(&mut out, value, &ph.normalisers);
                }
                Segment::Query(entries) => {
                    let mut first = true;
                    for ph in entries {
                        let value = match values.get(ph.param).copied().flatten() {
                            Some(v) if !v.is_null() => v,
                            _ => continue,
                        };
                        if !first {
                            out.push('&');
                        }
                        first = false;
                        out.push_str(&self.params[ph.param]);
                        out.push('=');
                        push_value(&mut out, value, &ph.normalisers);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Renders from named parameters (the form applications use).
    pub fn render_map(&self, params: &HashMap<String, Value>) -> Result<String, RenderError> {
        let values: Vec<Option<&Value>> = self.params.iter().map(|name| params.get(&**name)).collect();
        self.render(&values)
    }

    fn value_of<'v>(&self, values: &[Option<&'v Value>], i: usize) -> Result<&'v Value, RenderError> {
        values.get(i).copied().flatten().ok_or_else(|| RenderError::Missing(self.params[i].clone()))
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Appends the canonical text of `value` after `normalisers`.
fn push_value(out: &mut String, value: &Value, normalisers: &[Normaliser]) {
    if normalisers.is_empty() {
        match value {
            // itoa, not `write!`: the formatter was 4 % of a catch-up drain.
            Value::Int(i) => out.push_str(itoa::Buffer::new().format(*i)),
            Value::Text(s) => push_escaped(out, s),
            other => push_escaped(out, &raw_text(other)),
        }
        return;
    }
    let mut text = raw_text(value);
    for n in normalisers {
        text = n.apply(&text);
    }
    push_escaped(out, &text);
}

/// A value's text before normalisers and escaping.
fn raw_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(x) if *x == 0.0 => "0".to_owned(),
        Value::Float(x) => x.to_string(),
        Value::Text(s) => s.clone(),
        Value::Bytes(b) => hex::encode(b),
    }
}

/// Whether `c` is percent-encoded inside a rendered value.
pub(crate) fn is_reserved(c: char) -> bool {
    matches!(c, '%' | ':' | '{' | '}' | '&' | '=' | '?') || c.is_control()
}

fn push_escaped(out: &mut String, text: &str) {
    if !text.chars().any(is_reserved) {
        out.push_str(text);
        return;
    }
    let mut buf = [0u8; 4];
    for c in text.chars() {
        if is_reserved(c) {
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    params: Vec<(Arc<str>, bool)>,
}

impl Parser<'_> {
    fn err<T>(&self, offset: usize, message: impl Into<String>) -> Result<T, TemplateError> {
        Err(TemplateError { offset, message: message.into() })
    }

    fn run(mut self) -> Result<KeyTemplate, TemplateError> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let bytes = self.src.as_bytes();
        while self.pos < bytes.len() {
            match bytes[self.pos] {
                b'{' if bytes.get(self.pos + 1) == Some(&b'{') => {
                    literal.push('{');
                    self.pos += 2;
                }
                b'}' if bytes.get(self.pos + 1) == Some(&b'}') => {
                    literal.push('}');
                    self.pos += 2;
                }
                b'}' => {
                    return self.err(self.pos, "unmatched `}` (write `}}` for a literal brace)");
                }
                b'{' => {
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    let open = self.pos;
                    let close = match self.src[open..].find('}') {
                        Some(i) => open + i,
                        None => {
                            return self.err(open, "unclosed `{` (write `{{` for a literal brace)");
                        }
                    };
                    let body = &self.src[open + 1..close];
                    if let Some(query) = body.strip_prefix('?') {
                        segments.push(self.query(query, open + 2)?);
                    } else {
                        let ph = self.placeholder(body, open + 1, true)?;
                        segments.push(Segment::Placeholder(ph));
                    }
                    self.pos = close + 1;
                }
                _ => {
                    let c = self.src[self.pos..].chars().next().unwrap_or('\u{fffd}');
                    literal.push(c);
                    self.pos += c.len_utf8();
                }
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        let (params, optional) = self.params.into_iter().unzip();
        Ok(KeyTemplate { source: self.src.to_owned(), segments, params, optional })
    }

    fn query(&mut self, body: &str, offset: usize) -> Result<Segment, TemplateError> {
        if body.trim().is_empty() {
            return self.err(offset, "empty query section `{?}`");
        }
        let mut entries = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        let mut at = offset;
        for part in body.split(',') {
            let name = part.split('|').next().unwrap_or("").trim();
            if name.is_empty() {
                return self.err(at, "empty parameter name in a query section `{?…}` (a stray comma?)");
            }
            if names.contains(&name) {
                return self.err(at, format!("parameter `{name}` appears twice in one query section"));
            }
            names.push(name);
            entries.push(self.placeholder(part, at, false)?);
            at += part.len() + 1;
        }
        let params = &self.params;
        entries.sort_by(|a: &Placeholder, b: &Placeholder| params[a.param].0.cmp(&params[b.param].0));
        Ok(Segment::Query(entries))
    }

    fn placeholder(&mut self, body: &str, offset: usize, in_path: bool) -> Result<Placeholder, TemplateError> {
        let mut parts = body.split('|');
        let name = parts.next().unwrap_or("").trim();
        if name.is_empty() {
            return self.err(offset, "empty placeholder `{}` (write `{{}}` for literal braces)");
        }
        let valid =
            name.chars().enumerate().all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
        if !valid {
            return self.err(
                offset,
                format!("`{name}` is not a placeholder name (letters, digits and `_`, not starting with a digit)"),
            );
        }
        let mut normalisers = Vec::new();
        for n in parts {
            let n = n.trim();
            match Normaliser::parse(n) {
                Some(norm) => {
                    if normalisers.last() == Some(&Normaliser::Sha256) {
                        return self.err(
                            offset,
                            format!("`{n}` after `sha256` in `{name}`: sha256 must be the last normaliser"),
                        );
                    }
                    normalisers.push(norm);
                }
                None => {
                    return self
                        .err(offset, format!("unknown normaliser `{n}` (expected lower, upper, trim or sha256)"));
                }
            }
        }
        let param = match self.params.iter().position(|(p, _)| &**p == name) {
            Some(i) => {
                if in_path {
                    self.params[i].1 = false;
                }
                i
            }
            None => {
                self.params.push((Arc::from(name), !in_path));
                self.params.len() - 1
            }
        };
        Ok(Placeholder { param, normalisers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, params: &[(&str, Value)]) -> Result<String, RenderError> {
        let t = KeyTemplate::parse(template).unwrap();
        let map = params.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        t.render_map(&map)
    }

    #[test]
    fn renders_integers_booleans_and_strings() {
        let key = render(
            "user:{id}:{active}:{name}",
            &[("id", Value::Int(42)), ("active", Value::Bool(true)), ("name", Value::Text("ann".into()))],
        );
        assert_eq!(key.unwrap(), "user:42:true:ann");
    }

    #[test]
    fn double_braces_make_a_hash_tag() {
        assert_eq!(render("user:{{{id}}}:profile", &[("id", Value::Int(7))]).unwrap(), "user:{7}:profile");
    }

    #[test]
    fn query_section_is_sorted_by_name_and_skips_null() {
        let params = [("size", Value::Text("XL".into())), ("color", Value::Text("red".into())), ("page", Value::Null)];
        assert_eq!(
            render(
                "spu:{id}:{?size,color,page}",
                &[("id", Value::Int(1)), params[0].clone(), params[1].clone(), params[2].clone()]
            )
            .unwrap(),
            "spu:1:color=red&size=XL"
        );
        assert_eq!(
            render("spu:{id}:{?color,size}", &[("id", Value::Int(1)), params[0].clone(), params[1].clone()]).unwrap(),
            "spu:1:color=red&size=XL"
        );
    }

    #[test]
    fn reserved_characters_in_values_are_percent_encoded() {
        let key = render("k:{a}:{b}", &[("a", Value::Text("1:2".into())), ("b", Value::Text("{x}%".into()))]);
        assert_eq!(key.unwrap(), "k:1%3A2:%7Bx%7D%25");
    }

    #[test]
    fn normalisers_apply_left_to_right() {
        let key = render("u:{email|trim|lower}", &[("email", Value::Text("  Ann@X.io ".into()))]);
        assert_eq!(key.unwrap(), "u:ann@x.io");
        let key = render("u:{email|sha256}", &[("email", Value::Text("a".into()))]).unwrap();
        assert_eq!(key, "u:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb");
    }

    #[test]
    fn null_path_placeholder_renders_no_key() {
        assert_eq!(render("c:{id}", &[("id", Value::Null)]), Err(RenderError::Null("id".into())));
        assert_eq!(render("c:{id}", &[]), Err(RenderError::Missing("id".into())));
    }

    #[test]
    fn parse_errors_point_at_the_offending_offset() {
        let e = KeyTemplate::parse("user:{id").unwrap_err();
        assert_eq!((e.offset, e.message.as_str()), (5, "unclosed `{` (write `{{` for a literal brace)"));
        let e = KeyTemplate::parse("user:{id|upcase}").unwrap_err();
        assert_eq!(e.message, "unknown normaliser `upcase` (expected lower, upper, trim or sha256)");
        let e = KeyTemplate::parse("a}b").unwrap_err();
        assert_eq!(e.offset, 1);
        assert!(KeyTemplate::parse("x:{id|sha256|lower}").is_err());
        assert!(KeyTemplate::parse("x:{}").is_err());
        assert!(KeyTemplate::parse("x:{1a}").is_err());
        assert!(KeyTemplate::parse("x:{?a,a}").is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            // Plenty of reserved characters, whitespace and case to collide on.
            "[a-cA-C :%{}&=?\\n]{0,6}"
        }

        fn render_two(template: &KeyTemplate, a: &Value, b: &Value) -> String {
            let (ia, ib) = (template.param_index("a").unwrap(), template.param_index("b").unwrap());
            let mut values = vec![None; 2];
            values[ia] = Some(a);
            values[ib] = Some(b);
            template.render(&values).unwrap()
        }

        proptest! {
            #[test]
            fn rendering_is_deterministic(a in text(), b in text()) {
                let t = KeyTemplate::parse("k:{a}:{?b}").unwrap();
                let (a, b) = (Value::Text(a), Value::Text(b));
                prop_assert_eq!(render_two(&t, &a, &b), render_two(&t, &a, &b));
            }

            #[test]
            fn query_parameter_order_never_matters(a in text(), b in text(), c in 0i64..1000) {
                let forward = KeyTemplate::parse("s:{?a,b,c}").unwrap();
                let backward = KeyTemplate::parse("s:{?c,b,a}").unwrap();
                let params: HashMap<String, Value> = [
                    ("a".to_owned(), Value::Text(a)),
                    ("b".to_owned(), Value::Text(b)),
                    ("c".to_owned(), Value::Int(c)),
                ].into_iter().collect();
                prop_assert_eq!(forward.render_map(&params).unwrap(), backward.render_map(&params).unwrap());
            }

            #[test]
            fn normalisers_are_idempotent(x in text()) {
                for n in [Normaliser::Lower, Normaliser::Upper, Normaliser::Trim] {
                    let once = n.apply(&x);
                    prop_assert_eq!(n.apply(&once), once.clone());
                    // Normalising the value first changes nothing in the key.
                    let t = KeyTemplate::parse(&format!("k:{{v|{}}}", n.name())).unwrap();
                    let raw = t.render(&[Some(&Value::Text(x.clone()))]).unwrap();
                    let pre = t.render(&[Some(&Value::Text(once))]).unwrap();
                    prop_assert_eq!(raw, pre);
                }
            }

            #[test]
            fn distinct_values_never_collide_without_a_normaliser(a1 in text(), b1 in text(), a2 in text(), b2 in text()) {
                prop_assume!((&a1, &b1) != (&a2, &b2));
                for source in ["k:{a}:{b}", "k:{a}={b}", "{{{a}}}:{?b}", "k:{?a,b}"] {
                    let t = KeyTemplate::parse(source).unwrap();
                    let one = render_two(&t, &Value::Text(a1.clone()), &Value::Text(b1.clone()));
                    let two = render_two(&t, &Value::Text(a2.clone()), &Value::Text(b2.clone()));
                    prop_assert_ne!(one, two, "template {}", source);
                }
            }

            #[test]
            fn integers_never_collide(a in any::<i64>(), b in any::<i64>()) {
                prop_assume!(a != b);
                let t = KeyTemplate::parse("n:{a}").unwrap();
                prop_assert_ne!(t.render(&[Some(&Value::Int(a))]).unwrap(), t.render(&[Some(&Value::Int(b))]).unwrap());
            }

            #[test]
            fn a_value_cannot_forge_a_hash_tag_or_separator(x in text()) {
                let t = KeyTemplate::parse("k:{v}").unwrap();
                let key = t.render(&[Some(&Value::Text(x))]).unwrap();
                let value = &key[2..];
                prop_assert!(!value.contains(['{', '}', ':', '&', '=', '?']), "{}", key);
            }
        }
    }

    #[test]
    fn query_only_params_are_optional() {
        let t = KeyTemplate::parse("s:{cat}:{?q,cat}").unwrap();
        assert_eq!(t.params().len(), 2);
        assert!(!t.is_optional(0));
        assert!(t.is_optional(1));
    }
}
