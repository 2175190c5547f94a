//! Source locations for error messages about input files.
//!
//! Every error about a graph or config file names the file, the line and the
//! field. TOML parsing gives byte spans; [`SourceFile`] turns a span into a
//! line and column, and into the dotted field path (`caches.x.depends[1].bind`)
//! of the key at that place, by walking the span-carrying parse tree.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::de::{DeTable, DeValue};

/// A file name, line and column (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Location {
    pub(crate) file: Arc<Path>,
    pub(crate) line: usize,
    pub(crate) column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// The text of one input file, for locating spans in it.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub(crate) path: Arc<Path>,
    pub(crate) text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: String) -> SourceFile {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        SourceFile { path: Arc::from(path.into()), text, line_starts }
    }

    /// The line and column of byte `offset`.
    pub(crate) fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset).max(1);
        let start = self.line_starts[line - 1];
        let column = self.text.get(start..offset).map_or(1, |s| s.chars().count() + 1);
        Location { file: self.path.clone(), line, column }
    }

    /// The dotted path of the innermost key at or before `offset`, as
    /// `caches.product.depends[0].bind.id`. `None` when the text does not
    /// parse or no key precedes the offset.
    pub(crate) fn field_at(&self, offset: usize) -> Option<String> {
        // Recovering parse: a duplicate key still leaves a tree to walk.
        let (root, _) = DeTable::parse_recoverable(&self.text);
        let mut best: Option<(usize, String)> = None;
        walk_table(root.get_ref(), "", offset, &mut best);
        best.map(|(_, path)| path)
    }

    /// The span of the value at a dotted `path` (array elements as `[i]`).
    pub(crate) fn span_of(&self, path: &str) -> Option<Range<usize>> {
        let root = DeTable::parse(&self.text).ok()?;
        let mut segments = path_segments(path);
        let first = segments.next()?;
        let (mut span, mut value) = lookup_key(root.get_ref(), &first)?;
        for segment in segments {
            let next = match segment.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                Some(index) => {
                    let i: usize = index.parse().ok()?;
                    let item = value.as_array()?.get(i)?;
                    (item.span(), item.get_ref())
                }
                None => lookup_key(value.as_table()?, &segment)?,
            };
            (span, value) = next;
        }
        Some(span)
    }
}

fn lookup_key<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<(Range<usize>, &'a DeValue<'i>)> {
    table.iter().find(|(k, _)| k.get_ref().as_ref() == key).map(|(_, v)| (v.span(), v.get_ref()))
}

/// Splits `a.b[2].c` into `a`, `b`, `[2]`, `c`; a key may be quoted
/// (`tables."shop.products".key`).
fn path_segments(path: &str) -> impl Iterator<Item = String> + '_ {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in path.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            '[' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                current.push('[');
            }
            ']' if !quoted => {
                current.push(']');
                out.push(std::mem::take(&mut current));
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out.into_iter()
}

/// The byte offset in the file of byte `decoded` of the string value whose
/// literal starts at `literal_start` (its opening quote): escapes and a
/// multi-line string's leading newline are accounted for.
pub(crate) fn string_offset(text: &str, literal_start: usize, decoded: usize) -> usize {
    let raw = text.get(literal_start..).unwrap_or("");
    let (open, escapes) = match raw.as_bytes().first() {
        Some(b'"') if raw.starts_with("\"\"\"") => (3, true),
        Some(b'\'') if raw.starts_with("'''") => (3, false),
        Some(b'"') => (1, true),
        Some(b'\'') => (1, false),
        _ => return literal_start,
    };
    let mut at = open;
    if open == 3 {
        if raw[at..].starts_with("\r\n") {
            at += 2;
        } else if raw[at..].starts_with('\n') {
            at += 1;
        }
    }
    let bytes = raw.as_bytes();
    let mut produced = 0;
    while produced < decoded && at < bytes.len() {
        if escapes && bytes[at] == b'\\' {
            let (consumed, emitted) = match bytes.get(at + 1) {
                Some(b'u') => (6, decoded_len(raw.get(at + 2..at + 6))),
                Some(b'U') => (10, decoded_len(raw.get(at + 2..at + 10))),
                Some(_) => (2, 1),
                None => (1, 1),
            };
            at += consumed;
            produced += emitted;
        } else {
            let len = raw[at..].chars().next().map_or(1, char::len_utf8);
            at += len;
            produced += len;
        }
    }
    literal_start + at
}

fn decoded_len(hex_digits: Option<&str>) -> usize {
    hex_digits.and_then(|h| u32::from_str_radix(h, 16).ok()).and_then(char::from_u32).map_or(1, char::len_utf8)
}

/// A TOML or serde message in a platform engineer's words: no Rust type
/// names (`u64`, `struct RawRedis`), and `duplicate key` said plainly.
pub(crate) fn plain_serde_message(message: &str) -> String {
    let mut text = message.trim_end().to_owned();
    for (jargon, words) in [
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected a sequence", "expected an array"),
        ("expected a boolean", "expected true or false"),
    ] {
        text = text.replace(jargon, words);
    }
    while let Some(start) = text.find("struct Raw") {
        let end = text[start + 10..].find(|c: char| !c.is_ascii_alphanumeric()).map_or(text.len(), |i| start + 10 + i);
        text.replace_range(start..end, "a table");
    }
    if text == "duplicate key" {
        text = "declared twice in this file".to_owned();
    }
    text
}

/// Writes one item per line: how every list of input problems is shown.
pub(crate) fn write_lines<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str("\n")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// Quotes a TOML key for a field path when it is not a bare key.
pub(crate) fn path_key(key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare { key.to_owned() } else { format!("\"{key}\"") }
}

fn walk_table(table: &DeTable<'_>, prefix: &str, offset: usize, best: &mut Option<(usize, String)>) {
    for (key, value) in table.iter() {
        let path =
            if prefix.is_empty() { path_key(key.get_ref()) } else { format!("{prefix}.{}", path_key(key.get_ref())) };
        let start = key.span().start;
        if start <= offset && best.as_ref().is_none_or(|(b, _)| start >= *b) {
            *best = Some((start, path.clone()));
        }
        // A `[header]` table's span starts at its `[`, before its key: an
        // error about the table as a whole (a missing field) points there.
        let table_start = value.span().start;
        if value.get_ref().as_table().is_some()
            && table_start <= offset
            && best.as_ref().is_none_or(|(b, _)| table_start > *b)
        {
            *best = Some((table_start, path.clone()));
        }
        walk_value(value.get_ref(), &path, offset, best);
    }
}

fn walk_value(value: &DeValue<'_>, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
    if let Some(table) = value.as_table() {
        walk_table(table, path, offset, best);
    } else if let Some(array) = value.as_array() {
        for (i, item) in array.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let start = item.span().start;
            if item.get_ref().as_table().is_none() && start <= offset && best.as_ref().is_none_or(|(b, _)| start > *b) {
                *best = Some((start, item_path.clone()));
            }
            walk_value(item.get_ref(), &item_path, offset, best);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[a]\nx = 1\n\n[[a.list]]\ny = \"two\"\n\n[[a.list]]\ny = 3\n[\"b.c\"]\nz = [1, 2]\n";

    fn file() -> SourceFile {
        SourceFile::new("g.toml", TEXT.to_owned())
    }

    #[test]
    fn locates_lines_and_columns() {
        let f = file();
        assert_eq!((f.location(0).line, f.location(0).column), (1, 1));
        let y = TEXT.find("y = 3").unwrap();
        assert_eq!((f.location(y + 4).line, f.location(y + 4).column), (8, 5));
    }

    #[test]
    fn names_the_field_at_an_offset() {
        let f = file();
        assert_eq!(f.field_at(TEXT.find("1\n").unwrap()).as_deref(), Some("a.x"));
        assert_eq!(f.field_at(TEXT.find("\"two\"").unwrap()).as_deref(), Some("a.list[0].y"));
        assert_eq!(f.field_at(TEXT.find("3\n").unwrap()).as_deref(), Some("a.list[1].y"));
        assert_eq!(f.field_at(TEXT.find("2]").unwrap()).as_deref(), Some("\"b.c\".z[1]"));
    }

    #[test]
    fn maps_string_offsets_through_escapes_and_multiline_openers() {
        let text = r#"k = "caf\u00e9:{x}""#;
        let start = text.find('"').unwrap();
        // Decoded "café:{x}": the `{` is byte 6 (é is two bytes).
        assert_eq!(&text[string_offset(text, start, 6)..][..1], "{");
        let text = "k = \"\"\"\nab{x}\"\"\"";
        let start = text.find('"').unwrap();
        assert_eq!(&text[string_offset(text, start, 2)..][..1], "{");
        let text = "k = 'a\\b{x}'";
        assert_eq!(&text[string_offset(text, 4, 3)..][..1], "{");
    }

    #[test]
    fn a_table_header_names_its_table() {
        let text = "[a]\nx = 1\n[b.c]\ny = 2\n";
        let f = SourceFile::new("t.toml", text.to_owned());
        assert_eq!(f.field_at(text.find("[b").unwrap()).as_deref(), Some("b.c"));
    }

    #[test]
    fn finds_the_span_of_a_path() {
        let f = file();
        let span = f.span_of("a.list[1].y").unwrap();
        assert_eq!(&TEXT[span], "3");
        let span = f.span_of("\"b.c\".z[0]").unwrap();
        assert_eq!(&TEXT[span], "1");
        assert!(f.span_of("a.nope").is_none());
    }
}
