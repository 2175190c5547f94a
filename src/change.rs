//! The change model: one committed row change, shared by every source.
//!
//! A [`Change`] is what a source hands to the resolver. It keeps the
//! distinction every CDC stream forces on us: a column whose value the source
//! did not send (an unchanged TOASTed value, an old image under
//! `REPLICA IDENTITY DEFAULT`, Debezium's `__debezium_unavailable_value`) is
//! [`Cell::Unknown`], never [`Value::Null`]. Treating the two alike renders
//! wrong keys and silently misses invalidations.
//!
//! Positions are ordered ([`Position`]): Postgres by `(commit_lsn, lsn)`,
//! Kafka by the order one consumer session delivered messages in (offsets
//! only order one partition). Positions of different sources are not
//! comparable, so [`Position`] is only `PartialOrd`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A schema-qualified table name, `schema.table`, as the source reports it.
pub(crate) type TableName = Arc<str>;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    /// The whole table was emptied; a truncate carries no row images.
    Truncate,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation name that is none of `insert`, `update`, `delete`, `truncate`.
#[derive(Debug, thiserror::Error)]
#[error("unknown operation `{0}` (expected insert, update, delete or truncate)")]
pub struct UnknownOperation(pub String);

impl FromStr for Operation {
    type Err = UnknownOperation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "insert" | "c" => Ok(Operation::Insert),
            "update" | "u" => Ok(Operation::Update),
            "delete" | "d" => Ok(Operation::Delete),
            "truncate" | "t" => Ok(Operation::Truncate),
            _ => Err(UnknownOperation(s.to_owned())),
        }
    }
}

/// A typed column value as the source decoded it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Text and every type whose canonical form is text: numeric, uuid,
    /// timestamps, enums, JSON (as the source printed it).
    Text(String),
    Bytes(Vec<u8>),
}

impl Value {
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Bytes this value holds on the heap (text and byte strings).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Value::Text(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 0,
        }
    }

    /// Converts a JSON scalar the way `explain` and the Debezium decoder read
    /// row images: integral numbers are integers, other numbers floats,
    /// objects and arrays keep their JSON text.
    pub fn from_json(json: &serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        }
    }

    /// The JSON form used by `explain --json` and the look-up results.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Value::from(*f),
            Value::Text(s) => serde_json::Value::String(s.clone()),
            Value::Bytes(b) => serde_json::Value::String(hex::encode(b)),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => write!(f, "\\x{}", hex::encode(b)),
        }
    }
}

/// One column of a row image: a value, or the fact that the source did not
/// say what the value is.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Known(Value),
    /// The source did not send this value (unchanged TOAST, missing old
    /// image). Distinct from NULL.
    Unknown,
}

impl Cell {
    pub(crate) fn known(&self) -> Option<&Value> {
        match self {
            Cell::Known(v) => Some(v),
            Cell::Unknown => None,
        }
    }
}

/// A row image: column name → cell, in the source's column order. A column
/// that is absent reads as [`Cell::Unknown`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    columns: Vec<(Arc<str>, Cell)>,
}

impl Row {
    pub fn new() -> Row {
        Row::default()
    }

    pub(crate) fn with_capacity(n: usize) -> Row {
        Row { columns: Vec::with_capacity(n) }
    }

    /// Sets a column, replacing an earlier cell of the same name.
    pub fn set(&mut self, column: impl Into<Arc<str>>, cell: Cell) {
        let column = column.into();
        match self.columns.iter_mut().find(|(c, _)| *c == column) {
            Some(slot) => slot.1 = cell,
            None => self.columns.push((column, cell)),
        }
    }

    /// Appends a column known not to be in the row yet (a decoder that
    /// checked its relation's column names once), without [`Row::set`]'s
    /// search; a repeated name would shadow nothing and be ignored by
    /// [`Row::get`], so callers must not push one.
    pub(crate) fn push_new(&mut self, column: Arc<str>, cell: Cell) {
        debug_assert!(self.columns.iter().all(|(c, _)| *c != column), "column {column} pushed twice");
        self.columns.push((column, cell));
    }

    /// Builder form of [`Row::set`] for a known value.
    pub fn with(mut self, column: &str, value: Value) -> Row {
        self.set(column, Cell::Known(value));
        self
    }

    /// The cell of `column`; absent columns are unknown.
    pub(crate) fn get(&self, column: &str) -> &Cell {
        static UNKNOWN: Cell = Cell::Unknown;
        self.columns.iter().find(|(c, _)| &**c == column).map_or(&UNKNOWN, |(_, cell)| cell)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Cell)> {
        self.columns.iter().map(|(c, cell)| (&**c, cell))
    }

    pub(crate) fn len(&self) -> usize {
        self.columns.len()
    }

    /// About how many bytes the row holds: its cells and their values
    /// (column names are shared with the relation and not counted).
    pub(crate) fn approx_bytes(&self) -> usize {
        self.columns.len() * std::mem::size_of::<(Arc<str>, Cell)>()
            + self.columns.iter().map(|(_, cell)| cell.known().map_or(0, Value::heap_bytes)).sum::<usize>()
    }

    /// Keeps only the columns `keep` accepts.
    pub(crate) fn retain_columns(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.columns.retain(|(column, _)| keep(column));
    }

    /// Reads a JSON object as a row image (`explain`, Debezium without
    /// schemas). `unavailable` names a sentinel string that means unknown.
    pub(crate) fn from_json_object(
        object: &serde_json::Map<String, serde_json::Value>,
        unavailable: Option<&str>,
    ) -> Row {
        let mut row = Row::with_capacity(object.len());
        for (column, json) in object {
            let cell = match (json, unavailable) {
                (serde_json::Value::String(s), Some(sentinel)) if s == sentinel => Cell::Unknown,
                _ => Cell::Known(Value::from_json(json)),
            };
            row.columns.push((Arc::from(column.as_str()), cell));
        }
        row
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (column, cell) in &self.columns {
            let json = match cell {
                Cell::Known(v) => v.to_json(),
                Cell::Unknown => serde_json::json!({ "unknown": true }),
            };
            map.insert(column.to_string(), json);
        }
        serde_json::Value::Object(map)
    }
}

/// A Postgres log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Text that is not an LSN of the form `16/B374D848`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an LSN (expected two hexadecimal numbers like 16/B374D848)")]
pub struct BadLsn(pub String);

impl FromStr for Lsn {
    type Err = BadLsn;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| BadLsn(s.to_owned()))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| BadLsn(s.to_owned()))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| BadLsn(s.to_owned()))?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Where a change sits in its source's stream. Acknowledging a position
/// tells the source that every change up to and including it is done.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Position {
    /// Postgres: the transaction's commit LSN, then the change's own LSN
    /// (ordering inside the transaction).
    Postgres { commit_lsn: Lsn, lsn: Lsn },
    /// Kafka: a message of one topic partition. `seq` is the order in
    /// which this consumer session delivered it (across partitions):
    /// acknowledging a Kafka position means every message delivered up to
    /// it. `version` is the bump version the source gave it (see
    /// [`Position::exact_versions`]).
    Kafka { topic: Arc<str>, partition: i32, offset: i64, seq: u64, version: u64 },
    /// A line of a replayed file, or a change given on the command line.
    File { line: u64 },
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match (self, other) {
            (Position::Postgres { commit_lsn: a, lsn: al }, Position::Postgres { commit_lsn: b, lsn: bl }) => {
                Some((a, al).cmp(&(b, bl)))
            }
            (Position::Kafka { seq: a, .. }, Position::Kafka { seq: b, .. }) => Some(a.cmp(b)),
            (Position::File { line: a }, Position::File { line: b }) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

impl Position {
    /// A number that grows with the position inside one stream: the version
    /// written by the `bump` action (Postgres: the commit LSN; Kafka: the
    /// source's commit time in µs, kept rising by the consumer).
    pub(crate) fn version(&self) -> u64 {
        match self {
            Position::Postgres { commit_lsn, .. } => commit_lsn.0,
            Position::Kafka { version, .. } => *version,
            Position::File { line } => *line,
        }
    }

    /// The change's own WAL position, for the position ladder and lag
    /// (Postgres only: other sources have no byte positions to compare).
    pub(crate) fn lsn(&self) -> Option<Lsn> {
        match self {
            Position::Postgres { lsn, .. } => Some(*lsn),
            _ => None,
        }
    }

    /// Whether versions are exact commit positions, in commit order across
    /// the whole stream: Postgres commit LSNs are. Every bump raises the
    /// stored version (past it when it is not lower), whatever the source;
    /// this only says whether a bump that found a higher version is news:
    /// for exact versions outside a replay, versions went backwards (a
    /// restore, another source) and the sink warns. Kafka partitions (and
    /// replayed files) only approximate the database's commit order, so
    /// their bumps are often behind, by design.
    pub(crate) fn exact_versions(&self) -> bool {
        matches!(self, Position::Postgres { .. })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Postgres { commit_lsn, lsn } => write!(f, "pg:{commit_lsn}:{lsn}"),
            Position::Kafka { topic, partition, offset, .. } => {
                write!(f, "kafka:{topic}/{partition}@{offset}")
            }
            Position::File { line } => write!(f, "line:{line}"),
        }
    }
}

/// A source transaction identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TransactionId {
    /// Postgres `xid`.
    Postgres(u32),
    /// Whatever another source calls it (MySQL GTID, SQL Server LSN text…).
    Other(Arc<str>),
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransactionId::Postgres(x) => write!(f, "{x}"),
            TransactionId::Other(s) => f.write_str(s),
        }
    }
}

/// One committed row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: TableName,
    pub op: Operation,
    /// The old row image, as far as the source sent it. `None` when the
    /// source sent no old image at all (every column unknown).
    pub(crate) before: Option<Row>,
    /// The new row image. `None` for deletes and truncates.
    pub(crate) after: Option<Row>,
    pub(crate) position: Position,
    /// Commit time, microseconds since the Unix epoch, when the source says.
    pub(crate) commit_time_micros: Option<i64>,
    pub(crate) xid: Option<TransactionId>,
}

impl Change {
    /// About how many bytes the change holds, row images included: what
    /// keeping it costs (see `run::transaction`).
    pub(crate) fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Change>()
            + self.table.len()
            + self.before.as_ref().map_or(0, Row::approx_bytes)
            + self.after.as_ref().map_or(0, Row::approx_bytes)
    }

    /// A change with no position, commit time or transaction (for tests and
    /// `explain`).
    pub fn new(table: &str, op: Operation, before: Option<Row>, after: Option<Row>) -> Change {
        Change {
            table: Arc::from(table),
            op,
            before,
            after,
            position: Position::File { line: 0 },
            commit_time_micros: None,
            xid: None,
        }
    }

    /// The cell of `column` in the old image (unknown without one).
    pub(crate) fn old(&self, column: &str) -> &Cell {
        static UNKNOWN: Cell = Cell::Unknown;
        self.before.as_ref().map_or(&UNKNOWN, |r| r.get(column))
    }

    /// The cell of `column` in the new image (unknown without one).
    pub(crate) fn new_cell(&self, column: &str) -> &Cell {
        static UNKNOWN: Cell = Cell::Unknown;
        self.after.as_ref().map_or(&UNKNOWN, |r| r.get(column))
    }
}

/// A message a source received and could not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// Where the message is: acknowledged, once its dead letter is stored,
    /// like a commit. Its origin (for Kafka: topic, partition, offset).
    pub position: Position,
    pub reason: UndecodableReason,
    /// Why, as the operator should read it.
    pub error: String,
    /// The message as it was received.
    pub raw: RawMessage,
}

/// Why a message cannot be decoded: the dead-letter reason (`evictd.reason`
/// header, `error_kind` column, metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UndecodableReason {
    /// Not JSON, not a change event, a value that cannot be read.
    Decode,
    /// Past a size cap (`max_message_bytes`, `max_value_bytes`).
    TooLarge,
    /// Decoding ran past its time budget (`max_decode_ms`).
    TooSlow,
}

impl UndecodableReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UndecodableReason::Decode => "decode",
            UndecodableReason::TooLarge => "too_large",
            UndecodableReason::TooSlow => "too_slow",
        }
    }
}

/// A message's bytes as the source received them, for its dead letter.
/// Where it came from is the [`Undecodable::position`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMessage {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Header names and values, in the message's order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawMessage {
    /// About how many bytes the message holds (for the batch's memory cap).
    pub(crate) fn bytes(&self) -> usize {
        let header = |(k, v): &(String, Option<Vec<u8>>)| k.len() + v.as_ref().map_or(0, Vec::len);
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(header).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_column_reads_as_unknown_not_null() {
        let row = Row::new().with("id", Value::Int(1)).with("bio", Value::Null);
        assert_eq!(row.get("bio"), &Cell::Known(Value::Null));
        assert_eq!(row.get("avatar"), &Cell::Unknown);
    }

    #[test]
    fn json_sentinel_becomes_unknown() {
        let json = serde_json::json!({"id": 7, "body": "__debezium_unavailable_value", "n": null});
        let row = Row::from_json_object(json.as_object().unwrap(), Some("__debezium_unavailable_value"));
        assert_eq!(row.get("id"), &Cell::Known(Value::Int(7)));
        assert_eq!(row.get("body"), &Cell::Unknown);
        assert_eq!(row.get("n"), &Cell::Known(Value::Null));
    }

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn postgres_positions_order_by_commit_then_lsn() {
        let p = |c, l| Position::Postgres { commit_lsn: Lsn(c), lsn: Lsn(l) };
        assert!(p(10, 5) < p(10, 6));
        assert!(p(10, 9) < p(11, 1));
    }

    #[test]
    fn kafka_positions_order_by_delivery_across_partitions() {
        let k = |p, o, seq| Position::Kafka { topic: Arc::from("t"), partition: p, offset: o, seq, version: 7 };
        assert!(k(0, 9, 1) < k(1, 2, 2));
        assert!(k(1, 2, 2) < k(0, 10, 3));
        assert!(!k(0, 1, 1).exact_versions());
        assert_eq!(k(0, 1, 1).version(), 7);
    }

    #[test]
    fn operation_parses_names_and_debezium_codes() {
        assert_eq!("UPDATE".parse::<Operation>().ok(), Some(Operation::Update));
        assert_eq!("d".parse::<Operation>().ok(), Some(Operation::Delete));
        assert!("upsert".parse::<Operation>().is_err());
    }
}
