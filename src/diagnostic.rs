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
pub struct Location {
    pub file: Arc<Path>,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// The text of one input file, for locating spans in it.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: Arc<Path>,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: String) -> SourceFile {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceFile {
            path: Arc::from(path.into()),
            text,
            line_starts,
        }
    }

    /// The line and column of byte `offset`.
    pub fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self
            .line_starts
            .partition_point(|&start| start <= offset)
            .max(1);
        let start = self.line_starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(1, |s| s.chars().count() + 1);
        Location {
            file: self.path.clone(),
            line,
            column,
        }
    }

    /// The dotted path of the innermost key at or before `offset`, as
    /// `caches.product.depends[0].bind.id`. `None` when the text does not
    /// parse or no key precedes the offset.
    pub fn field_at(&self, offset: usize) -> Option<String> {
        let root = DeTable::parse(&self.text).ok()?;
        let mut best: Option<(usize, String)> = None;
        walk_table(root.get_ref(), "", offset, &mut best);
        best.map(|(_, path)| path)
    }

    /// The span of the value at a dotted `path` (array elements as `[i]`).
    pub fn span_of(&self, path: &str) -> Option<Range<usize>> {
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

fn lookup_key<'a, 'i>(
    table: &'a DeTable<'i>,
    key: &str,
) -> Option<(Range<usize>, &'a DeValue<'i>)> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| (v.span(), v.get_ref()))
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

/// Quotes a TOML key for a field path when it is not a bare key.
pub fn path_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("\"{key}\"")
    }
}

fn walk_table(
    table: &DeTable<'_>,
    prefix: &str,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() {
            path_key(key.get_ref())
        } else {
            format!("{prefix}.{}", path_key(key.get_ref()))
        };
        let start = key.span().start;
        if start <= offset && best.as_ref().is_none_or(|(b, _)| start >= *b) {
            *best = Some((start, path.clone()));
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
            if item.get_ref().as_table().is_none()
                && start <= offset
                && best.as_ref().is_none_or(|(b, _)| start > *b)
            {
                *best = Some((start, item_path.clone()));
            }
            walk_value(item.get_ref(), &item_path, offset, best);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "[a]\nx = 1\n\n[[a.list]]\ny = \"two\"\n\n[[a.list]]\ny = 3\n[\"b.c\"]\nz = [1, 2]\n";

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
        assert_eq!(
            f.field_at(TEXT.find("1\n").unwrap()).as_deref(),
            Some("a.x")
        );
        assert_eq!(
            f.field_at(TEXT.find("\"two\"").unwrap()).as_deref(),
            Some("a.list[0].y")
        );
        assert_eq!(
            f.field_at(TEXT.find("3\n").unwrap()).as_deref(),
            Some("a.list[1].y")
        );
        assert_eq!(
            f.field_at(TEXT.find("2]").unwrap()).as_deref(),
            Some("\"b.c\".z[1]")
        );
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
