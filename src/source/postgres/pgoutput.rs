//! Decoding `pgoutput` (protocol version 1) messages into [`Change`]s.
//!
//! The replication client hands us the payload of each XLogData message;
//! Begin and Commit are parsed by the client, everything else here:
//! Relation, Type, Origin, Insert, Update, Delete, Truncate. Format:
//! <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.
//!
//! Invariants:
//! - a relation's metadata is kept across schema changes: a new Relation
//!   message for an OID replaces the old one, and rows are always decoded
//!   with the latest one seen (Postgres sends it before the first row that
//!   needs it);
//! - an unchanged TOASTed value (`u`) is [`Cell::Unknown`], never NULL; in an
//!   old tuple sent as `K` (identity only), every non-identity column is
//!   unknown, whatever the wire says;
//! - values are typed by their column's type OID: integers, booleans and
//!   floats as such, `bytea` as bytes, everything else as the text Postgres
//!   printed;
//! - a partition's rows carry the name of the partitioned table the graph
//!   names when the decoder was told so ([`Decoder::with_aliases`],
//!   [`Decoder::alias_relation`]): without `publish_via_partition_root`
//!   Postgres sends them under the leaf partition's own name;
//! - anything unexpected (a row for a relation never described, a truncated
//!   message, an unknown tag, a relation naming a column twice) is an error,
//!   never a skip.
//!
//! Cost: this runs once per row change, on the path every change takes, so
//! a tuple is decoded without per-column searches (column names are checked
//! distinct once, when the Relation message arrives) and changes go straight
//! into the caller's queue ([`Decoder::decode_into`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use foldhash::HashMap;

use crate::change::{Cell, Change, Operation, Position, Row, TransactionId, Value};

/// A malformed or unexpected message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("pgoutput message `{tag}` is truncated (needed {needed} more bytes)")]
    Truncated { tag: char, needed: usize },
    #[error("pgoutput message `{0}` is not one evictd knows (protocol version 1 expected)")]
    UnknownTag(char),
    #[error("row for relation {0}, which was never described by a Relation message")]
    UnknownRelation(u32),
    #[error("pgoutput `{tag}` message: {message}")]
    Malformed { tag: char, message: String },
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    pub(crate) name: Arc<str>,
    pub(crate) type_oid: u32,
    /// Part of the replica identity.
    pub(crate) is_key: bool,
}

/// What a Relation message said about a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) oid: u32,
    /// `schema.table`.
    pub(crate) name: Arc<str>,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub(crate) replica_identity: u8,
    pub(crate) columns: Vec<Column>,
}

/// The transaction a message belongs to (from the client's Begin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TxContext {
    pub(crate) final_lsn: u64,
    pub(crate) xid: u32,
    pub(crate) commit_time_micros: i64,
}

/// Decodes pgoutput messages; owns the relation cache.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    relations: HashMap<u32, Relation>,
    /// Partitions whose changes belong to a partitioned table the graph
    /// names: relation name as sent → the graph's table.
    aliases: HashMap<String, Arc<str>>,
}

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub(crate) const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

struct Reader<'a> {
    tag: char,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated { tag: self.tag, needed: n - self.bytes.len() });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A NUL-terminated string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Malformed { tag: self.tag, message: "string without its terminating NUL".into() })?;
        let text = String::from_utf8_lossy(&self.bytes[..end]).into_owned();
        self.bytes = &self.bytes[end + 1..];
        Ok(text)
    }
}

/// A decoded tuple: for each column, its wire cell.
enum WireCell<'a> {
    Null,
    Unchanged,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

impl Decoder {
    #[cfg(test)]
    pub(crate) fn new() -> Decoder {
        Decoder::default()
    }

    /// A decoder that decodes the rows of each partition in `aliases` (its
    /// name as Postgres sends it) as rows of the graph table it maps to.
    pub(crate) fn with_aliases(aliases: impl IntoIterator<Item = (String, Arc<str>)>) -> Decoder {
        Decoder { relations: HashMap::default(), aliases: aliases.into_iter().collect() }
    }

    /// The relation last described for `oid`.
    pub(crate) fn relation(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// Rows of relation `oid` (a partition attached after the decoder was
    /// made) are rows of `table` from now on, and when it is described again.
    pub(crate) fn alias_relation(&mut self, oid: u32, table: Arc<str>) {
        if let Some(relation) = self.relations.get_mut(&oid) {
            self.aliases.insert(relation.name.to_string(), table.clone());
            relation.name = table;
        }
    }

    /// Decodes one XLogData payload, into a new vector (tests).
    #[cfg(test)]
    pub(crate) fn decode(
        &mut self,
        data: &[u8],
        tx: TxContext,
        position: Position,
    ) -> Result<Vec<Change>, DecodeError> {
        let mut out = Vec::new();
        self.decode_into(data, tx, position, &mut out)?;
        Ok(out)
    }

    /// Decodes one XLogData payload, appending the row changes it carries
    /// (none for Relation, Type and Origin; one per table for Truncate) to
    /// `out` (no allocation of its own per message). `position` is the
    /// change's place in the stream. On an error nothing was appended.
    pub(crate) fn decode_into(
        &mut self,
        data: &[u8],
        tx: TxContext,
        position: Position,
        out: &mut impl Extend<Change>,
    ) -> Result<(), DecodeError> {
        let Some((&tag, body)) = data.split_first() else {
            return Err(DecodeError::Truncated { tag: '?', needed: 1 });
        };
        let tag_char = char::from(tag);
        let mut r = Reader { tag: tag_char, bytes: body };
        let change = |table: Arc<str>, op, before, after| Change {
            table,
            op,
            before,
            after,
            position: position.clone(),
            commit_time_micros: Some(tx.commit_time_micros.saturating_add(PG_EPOCH_OFFSET_MICROS)),
            xid: Some(TransactionId::Postgres(tx.xid)),
        };
        match tag {
            b'R' => {
                let mut relation = read_relation(&mut r)?;
                if let Some(table) = self.aliases.get(&*relation.name) {
                    relation.name = table.clone();
                }
                self.relations.insert(relation.oid, relation);
            }
            b'Y' => {
                let _oid = r.u32()?;
                let _namespace = r.string()?;
                let _name = r.string()?;
            }
            b'O' => {
                let _lsn = r.u64()?;
                let _name = r.string()?;
            }
            b'I' => {
                let relation = self.lookup(r.u32()?)?;
                expect_byte(&mut r, b'N')?;
                let after = read_tuple(&mut r, relation, TupleKind::New)?;
                out.extend([change(relation.name.clone(), Operation::Insert, None, Some(after))]);
            }
            b'U' => {
                let relation = self.lookup(r.u32()?)?;
                let mut before = None;
                let mut marker = r.u8()?;
                if marker == b'K' || marker == b'O' {
                    let kind = if marker == b'K' { TupleKind::OldKey } else { TupleKind::OldFull };
                    before = Some(read_tuple(&mut r, relation, kind)?);
                    marker = r.u8()?;
                }
                if marker != b'N' {
                    return Err(malformed(
                        tag_char,
                        format!("expected `N` before the new tuple, got `{}`", char::from(marker)),
                    ));
                }
                let after = read_tuple(&mut r, relation, TupleKind::New)?;
                out.extend([change(relation.name.clone(), Operation::Update, before, Some(after))]);
            }
            b'D' => {
                let relation = self.lookup(r.u32()?)?;
                let kind = match r.u8()? {
                    b'K' => TupleKind::OldKey,
                    b'O' => TupleKind::OldFull,
                    other => {
                        return Err(malformed(tag_char, format!("expected `K` or `O`, got `{}`", char::from(other))));
                    }
                };
                let before = read_tuple(&mut r, relation, kind)?;
                out.extend([change(relation.name.clone(), Operation::Delete, Some(before), None)]);
            }
            b'T' => {
                let count = r.u32()?;
                let _options = r.u8()?;
                // Every relation is looked up before anything is appended.
                let mut tables = Vec::with_capacity(count.min(1024) as usize);
                for _ in 0..count {
                    tables.push(self.lookup(r.u32()?)?.name.clone());
                }
                out.extend(tables.into_iter().map(|table| change(table, Operation::Truncate, None, None)));
            }
            other => return Err(DecodeError::UnknownTag(char::from(other))),
        }
        Ok(())
    }

    fn lookup(&self, oid: u32) -> Result<&Relation, DecodeError> {
        self.relations.get(&oid).ok_or(DecodeError::UnknownRelation(oid))
    }
}

fn malformed(tag: char, message: String) -> DecodeError {
    DecodeError::Malformed { tag, message }
}

fn expect_byte(r: &mut Reader<'_>, want: u8) -> Result<(), DecodeError> {
    let got = r.u8()?;
    if got == want {
        Ok(())
    } else {
        Err(malformed(r.tag, format!("expected `{}`, got `{}`", char::from(want), char::from(got))))
    }
}

fn read_relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32()?;
    let namespace = r.string()?;
    let name = r.string()?;
    let replica_identity = r.u8()?;
    let count = r.u16()?;
    // Room for the columns the message can hold, not for the count it
    // claims: a column takes at least 10 bytes (flags, a name's NUL, type
    // OID, modifier), and a short message claiming 65 535 columns cost
    // megabytes to allocate, clear and free before it failed.
    let room = usize::from(count).min(r.bytes.len() / 10);
    let mut columns = Vec::with_capacity(room);
    let mut names = HashSet::with_capacity(room);
    for _ in 0..count {
        let flags = r.u8()?;
        let column = r.string()?;
        let type_oid = r.u32()?;
        let _type_modifier = r.u32()?;
        // Tuples are decoded by position without looking for repeats.
        if !names.insert(column.clone()) {
            return Err(malformed(r.tag, format!("relation {namespace}.{name} names column `{column}` twice")));
        }
        columns.push(Column { name: Arc::from(column.as_str()), type_oid, is_key: flags & 1 == 1 });
    }
    let schema = if namespace.is_empty() { "pg_catalog" } else { namespace.as_str() };
    Ok(Relation { oid, name: Arc::from(format!("{schema}.{name}")), replica_identity, columns })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TupleKind {
    New,
    /// `K`: only identity columns carry values.
    OldKey,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    OldFull,
}

fn read_tuple(r: &mut Reader<'_>, relation: &Relation, kind: TupleKind) -> Result<Row, DecodeError> {
    let count = usize::from(r.u16()?);
    if count > relation.columns.len() {
        return Err(malformed(
            r.tag,
            format!("tuple has {count} columns, relation `{}` has {}", relation.name, relation.columns.len()),
        ));
    }
    let mut row = Row::with_capacity(count);
    for column in &relation.columns[..count] {
        let cell = match r.u8()? {
            b'n' => WireCell::Null,
            b'u' => WireCell::Unchanged,
            b't' => {
                let len = r.u32()? as usize;
                WireCell::Text(r.take(len)?)
            }
            b'b' => {
                let len = r.u32()? as usize;
                WireCell::Binary(r.take(len)?)
            }
            other => return Err(malformed(r.tag, format!("unknown tuple cell kind `{}`", char::from(other)))),
        };
        if kind == TupleKind::OldKey && !column.is_key {
            // Not sent: the wire says `n`, which is not a NULL.
            row.push_new(column.name.clone(), Cell::Unknown);
            continue;
        }
        let cell = match cell {
            WireCell::Null => Cell::Known(Value::Null),
            WireCell::Unchanged => Cell::Unknown,
            WireCell::Text(text) => Cell::Known(typed(column.type_oid, text)),
            WireCell::Binary(bytes) => Cell::Known(Value::Bytes(bytes.to_vec())),
        };
        // Distinct names (checked in `read_relation`), each column once.
        row.push_new(column.name.clone(), cell);
    }
    Ok(row)
}

/// Types a text-format value by its column's type OID (`pg_type.oid`).
pub(crate) fn typed(type_oid: u32, text: &[u8]) -> Value {
    // Postgres sends UTF-8 (the replication connection's client_encoding):
    // check it the fast way, and only repair what is not.
    let s = match std::str::from_utf8(text) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(text),
    };
    match type_oid {
        // bool
        16 => match &*s {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::Text(s.into_owned()),
        },
        // int8, int2, int4, oid
        20 | 21 | 23 | 26 => s.parse().map(Value::Int).unwrap_or_else(|_| Value::Text(s.into_owned())),
        // float4, float8
        700 | 701 => s.parse().map(Value::Float).unwrap_or_else(|_| Value::Text(s.into_owned())),
        // bytea, hex output: \x0a0b
        17 => match s.strip_prefix("\\x").map(hex::decode) {
            Some(Ok(bytes)) => Value::Bytes(bytes),
            _ => Value::Text(s.into_owned()),
        },
        _ => Value::Text(s.into_owned()),
    }
}

#[cfg(test)]
mod tests;
