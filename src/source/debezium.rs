//! Decoding Debezium change events (the JSON envelope) into [`Change`]s.
//!
//! Accepts both shapes Kafka Connect's JSON converter writes: with embedded
//! schemas (`{"schema": …, "payload": {…}}`) and without (the payload
//! alone). `op` is `c` (insert), `u` (update), `d` (delete), `t` (truncate)
//! or `r` (snapshot read, reported as [`Decoded::SnapshotRead`] so the
//! caller decides). Events that are not row changes — transaction metadata,
//! heartbeats, schema changes, tombstones — are [`Decoded::Ignored`], each
//! with its reason.
//!
//! **Values** are typed so that a row renders the same cache keys as it does
//! through the Postgres source (`pgoutput` text, typed by OID): with
//! embedded schemas, each column is decoded by its Connect type and logical
//! name (`Decimal`, `VariableScaleDecimal`, Debezium's `Date`, `*Timestamp`,
//! `ZonedTimestamp`, `*Time`, `Json`, `Enum`, `Uuid`, base64 `bytes`) into
//! the text Postgres prints (`TimeZone = UTC`). Without schemas only what
//! JSON itself says is known: numbers, strings, booleans, and
//! `VariableScaleDecimal` objects; a `numeric` column arrives as base64 of
//! an unscaled integer whose scale is only in the schema (use
//! `decimal.handling.mode=string`), timestamps as bare numbers.
//!
//! **Unknown values**: `__debezium_unavailable_value` (an unchanged TOASTed
//! column) is [`Cell::Unknown`], never NULL. So are the non-key columns of a
//! delete's `before` unless its table is known to send whole old rows
//! ([`FullRowDeletes`]): under `REPLICA IDENTITY DEFAULT` Debezium fills
//! them with placeholders (`0`, `""`, the epoch) that would render wrong
//! keys. The key columns are the fields of the message key, or, when the
//! key is not a JSON object (a string key converter), the graph's key
//! columns of the table ([`DecodeOptions::table_keys`]); without either,
//! every column of such a `before` is unknown.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value as Json};

use crate::change::{Cell, Change, Operation, Position, Row, TransactionId, Value};
use crate::config::FullRowDeletes;
use crate::graph::Graph;

/// The placeholder Debezium writes for a value it does not have.
pub(crate) const UNAVAILABLE: &str = "__debezium_unavailable_value";

mod decimal;

/// What one event decodes to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decoded {
    Change(Change),
    /// A snapshot read (`op = r`): the row as it was, not a change.
    SnapshotRead(Change),
    /// Not a row change: a tombstone (null value) that follows a delete for
    /// log compaction, a transaction BEGIN/END, a heartbeat, a schema change.
    Ignored(Ignored),
}

/// Why an event was not a row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ignored {
    Tombstone,
    TransactionMetadata,
    Heartbeat,
    SchemaChange,
}

impl Ignored {
    /// The metric label (`op`) of such a message.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Ignored::Tombstone => "tombstone",
            Ignored::TransactionMetadata => "transaction",
            Ignored::Heartbeat => "heartbeat",
            Ignored::SchemaChange => "schema_change",
        }
    }
}

/// Why an event could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DebeziumError {
    #[error("not a Debezium change event: {0}")]
    Shape(String),
    #[error("unknown op `{0}` (expected c, u, d, t or r)")]
    Op(String),
    #[error("column `{column}`: {message}")]
    Value { column: String, message: String },
    /// A column value past `max_value_bytes`.
    #[error("column `{column}`: a value of more than {limit} bytes (source.kafka.max_value_bytes)")]
    TooLarge { column: String, limit: usize },
    /// Decoding ran past the per-message time budget.
    #[error("decoding took longer than the per-message budget (source.kafka.max_decode_ms)")]
    TooSlow,
}

impl DebeziumError {
    /// The dead-letter reason (`evictd.reason`, metric label).
    pub(crate) fn reason(&self) -> super::UndecodableReason {
        match self {
            DebeziumError::TooLarge { .. } => super::UndecodableReason::TooLarge,
            DebeziumError::TooSlow => super::UndecodableReason::TooSlow,
            _ => super::UndecodableReason::Decode,
        }
    }
}

/// How events are turned into changes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DecodeOptions<'a> {
    /// The table to report instead of the one in `source` (a configured
    /// topic-to-table mapping).
    pub(crate) table: Option<&'a str>,
    pub(crate) full_row_deletes: Option<&'a FullRowDeletes>,
    /// The graph's key columns per table: what a delete's old row keeps
    /// when its message key names no columns (not JSON, not an object).
    pub(crate) table_keys: Option<&'a TableKeys>,
    /// The largest column value (its JSON text, about), in bytes.
    pub(crate) max_value_bytes: Option<usize>,
    /// When decoding this event must have finished.
    pub(crate) deadline: Option<std::time::Instant>,
}

/// Key columns per table (`schema.table`), from the graph.
pub type TableKeys = HashMap<String, HashSet<String>>;

/// The key columns of every table of `graph`.
pub(crate) fn table_keys(graph: &Graph) -> TableKeys {
    graph.tables().iter().map(|t| (t.name.to_string(), t.key.iter().map(|c| c.to_string()).collect())).collect()
}

/// One Kafka message as written in a JSON-lines file (`evictd replay`,
/// `tests/fixtures/debezium/`): `{"topic", "partition", "offset", "key",
/// "value", "headers"}`; a line that is not in that shape is taken as a
/// bare event value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record<'a> {
    pub(crate) topic: Option<&'a str>,
    pub(crate) key: Option<&'a Json>,
    pub(crate) value: Option<&'a Json>,
}

impl<'a> Record<'a> {
    pub(crate) fn from_json(json: &'a Json) -> Record<'a> {
        match json.as_object() {
            Some(o) if o.contains_key("value") && o.contains_key("topic") => Record {
                topic: o.get("topic").and_then(Json::as_str),
                key: o.get("key").filter(|k| !k.is_null()),
                value: o.get("value"),
            },
            _ => Record { topic: None, key: None, value: Some(json) },
        }
    }
}

/// Decodes one event: `value` is the message value (`None` for a null
/// value), `key` the message key when there is one.
pub(crate) fn decode(
    value: Option<&Json>,
    key: Option<&Json>,
    position: Position,
    options: &DecodeOptions<'_>,
) -> Result<Decoded, DebeziumError> {
    let Some(event) = value.filter(|v| !v.is_null()) else {
        return Ok(Decoded::Ignored(Ignored::Tombstone));
    };
    let (payload, schema) = split_envelope(event);
    decode_payload(payload, schema, key, position, options)
}

/// Decodes one event given as its payload and, with the `{schema, payload}`
/// envelope, its value schema (what [`decode`] does after splitting the
/// envelope; the Kafka source splits it without building the schema's
/// tree when it saw the same schema before).
pub(crate) fn decode_payload(
    payload: &Json,
    schema: Option<&Json>,
    key: Option<&Json>,
    position: Position,
    options: &DecodeOptions<'_>,
) -> Result<Decoded, DebeziumError> {
    if payload.is_null() {
        return Ok(Decoded::Ignored(Ignored::Tombstone));
    }
    let object = payload.as_object().ok_or_else(|| DebeziumError::Shape("the event is not a JSON object".into()))?;
    let Some(op_json) = object.get("op") else {
        return match not_a_change(object) {
            Some(ignored) => Ok(Decoded::Ignored(ignored)),
            None => Err(DebeziumError::Shape("missing `op`".into())),
        };
    };
    let op_text = op_json.as_str().ok_or_else(|| DebeziumError::Shape("`op` is not a string".into()))?;
    let (op, snapshot) = match op_text {
        "c" => (Operation::Insert, false),
        "r" => (Operation::Insert, true),
        "u" => (Operation::Update, false),
        "d" => (Operation::Delete, false),
        "t" => (Operation::Truncate, false),
        other => return Err(DebeziumError::Op(other.to_owned())),
    };
    let source = object
        .get("source")
        .and_then(Json::as_object)
        .ok_or_else(|| DebeziumError::Shape("missing `source`".into()))?;
    let table: Arc<str> = match options.table {
        Some(t) => Arc::from(t),
        None => Arc::from(source_table(source)?),
    };
    let image = |name: &str| -> Result<Option<Row>, DebeziumError> {
        let columns = schema.and_then(|s| field_schema(s, name)).map(struct_fields);
        match object.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Object(map)) => row(map, columns.as_ref(), options).map(Some),
            // MongoDB: the document as extended-JSON text.
            Some(Json::String(text)) => match serde_json::from_str::<Json>(text) {
                Ok(Json::Object(map)) => row(&map, None, options).map(Some),
                _ => Err(DebeziumError::Shape(format!("`{name}` is a string but not a JSON document"))),
            },
            Some(_) => Err(DebeziumError::Shape(format!("`{name}` is neither an object nor null"))),
        }
    };
    let mut before = image("before")?;
    let after = image("after")?;
    match op {
        Operation::Insert | Operation::Update if after.is_none() => {
            return Err(DebeziumError::Shape(format!("op `{op_text}` without `after`")));
        }
        Operation::Delete if before.is_none() => {
            return Err(DebeziumError::Shape("op `d` without `before`".into()));
        }
        _ => {}
    }
    if op == Operation::Delete
        && !options.full_row_deletes.is_some_and(|f| f.covers(&table))
        && let Some(old) = before.as_mut()
    {
        // The message key names the identity columns; a key that is not a
        // JSON object (a string converter) names none, and then the graph's
        // key columns stand in. A table the graph does not know keeps
        // nothing: an unknown value is a namespace bump, a placeholder a
        // wrong key.
        let keep = key
            .and_then(key_columns)
            .or_else(|| options.table_keys.and_then(|keys| keys.get(&*table)).cloned())
            .unwrap_or_default();
        *old = only_key_columns(old, &keep);
    }
    let commit_time_micros = source
        .get("ts_us")
        .and_then(Json::as_i64)
        .or_else(|| source.get("ts_ms").and_then(Json::as_i64).map(|ms| ms.saturating_mul(1000)));
    let xid = match source.get("txId") {
        Some(Json::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).map(TransactionId::Postgres),
        Some(Json::String(s)) => Some(TransactionId::Other(Arc::from(s.as_str()))),
        _ => source.get("gtid").and_then(Json::as_str).map(|g| TransactionId::Other(Arc::from(g))),
    };
    let change = Change { table, op, before, after, position, commit_time_micros, xid };
    Ok(if snapshot { Decoded::SnapshotRead(change) } else { Decoded::Change(change) })
}

/// `(payload, value schema)` of either envelope shape.
fn split_envelope(event: &Json) -> (&Json, Option<&Json>) {
    match (event.get("schema"), event.get("payload")) {
        (Some(schema), Some(payload)) => (payload, Some(schema)),
        _ => (event, None),
    }
}

/// What a value without `op` is, if Debezium writes such values.
fn not_a_change(object: &Map<String, Json>) -> Option<Ignored> {
    if object.contains_key("status") && object.contains_key("id") {
        Some(Ignored::TransactionMetadata)
    } else if object.contains_key("ddl") || object.contains_key("tableChanges") {
        Some(Ignored::SchemaChange)
    } else if object.len() == 1 && object.contains_key("ts_ms") {
        Some(Ignored::Heartbeat)
    } else {
        None
    }
}

/// `schema.table` from the `source` block: Postgres and SQL Server give
/// `schema`, MySQL `db`; MongoDB names a `collection`.
fn source_table(source: &Map<String, Json>) -> Result<String, DebeziumError> {
    let text = |k: &str| source.get(k).and_then(Json::as_str);
    let table = text("table")
        .or_else(|| text("collection"))
        .ok_or_else(|| DebeziumError::Shape("missing `source.table` (or `source.collection`)".into()))?;
    let schema = text("schema")
        .or_else(|| text("db"))
        .ok_or_else(|| DebeziumError::Shape("missing `source.schema` (or `source.db`)".into()))?;
    Ok(format!("{schema}.{table}"))
}

/// The field schemas of a message key's columns: the key's field names.
fn key_columns(key: &Json) -> Option<HashSet<String>> {
    let (payload, _) = split_envelope(key);
    payload.as_object().map(|o| o.keys().cloned().collect())
}

/// `row` with every column outside `keep` unknown.
fn only_key_columns(row: &Row, keep: &HashSet<String>) -> Row {
    let mut out = Row::with_capacity(row.len());
    for (column, cell) in row.iter() {
        let cell = if keep.contains(column) { cell.clone() } else { Cell::Unknown };
        out.push_new(Arc::from(column), cell);
    }
    out
}

/// Whether `json`'s text is longer than `limit` bytes (strings and nested
/// values counted, punctuation approximated), without serialising it.
fn json_larger_than(json: &Json, limit: usize) -> bool {
    fn size(json: &Json, budget: usize) -> usize {
        match json {
            Json::String(s) => s.len() + 2,
            Json::Array(items) => {
                let mut total = 2;
                for item in items {
                    total += size(item, budget.saturating_sub(total)) + 1;
                    if total > budget {
                        break;
                    }
                }
                total
            }
            Json::Object(map) => {
                let mut total = 2;
                for (key, value) in map {
                    total += key.len() + 4 + size(value, budget.saturating_sub(total));
                    if total > budget {
                        break;
                    }
                }
                total
            }
            Json::Number(_) | Json::Bool(_) | Json::Null => 8,
        }
    }
    size(json, limit) > limit
}

/// The schema of field `name` of a struct schema.
fn field_schema<'s>(schema: &'s Json, name: &str) -> Option<&'s Json> {
    schema.get("fields")?.as_array()?.iter().find(|f| f.get("field").and_then(Json::as_str) == Some(name))
}

/// A struct schema's fields by name.
fn struct_fields(schema: &Json) -> Vec<(&str, &Json)> {
    schema
        .get("fields")
        .and_then(Json::as_array)
        .map(|fields| fields.iter().filter_map(|f| Some((f.get("field")?.as_str()?, f))).collect())
        .unwrap_or_default()
}

fn row(
    map: &Map<String, Json>,
    columns: Option<&Vec<(&str, &Json)>>,
    options: &DecodeOptions<'_>,
) -> Result<Row, DebeziumError> {
    let mut out = Row::with_capacity(map.len());
    for (column, json) in map {
        if options.deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Err(DebeziumError::TooSlow);
        }
        if let Some(limit) = options.max_value_bytes
            && json_larger_than(json, limit)
        {
            return Err(DebeziumError::TooLarge { column: column.clone(), limit });
        }
        let cell = match json {
            Json::String(s) if s == UNAVAILABLE => Cell::Unknown,
            _ => {
                let schema = columns.and_then(|c| c.iter().find(|(name, _)| *name == column).map(|(_, s)| *s));
                let value =
                    typed(json, schema).map_err(|message| DebeziumError::Value { column: column.clone(), message })?;
                Cell::Known(value)
            }
        };
        out.push_new(Arc::from(column.as_str()), cell);
    }
    Ok(out)
}

/// One column value, by its Connect schema when there is one.
pub(crate) fn typed(json: &Json, schema: Option<&Json>) -> Result<Value, String> {
    if json.is_null() {
        return Ok(Value::Null);
    }
    let name = schema.and_then(|s| s.get("name")).and_then(Json::as_str);
    let kind = schema.and_then(|s| s.get("type")).and_then(Json::as_str);
    let int = || json.as_i64().ok_or_else(|| format!("expected an integer, got {json}"));
    match name {
        Some("org.apache.kafka.connect.data.Decimal") => {
            let scale = schema
                .and_then(|s| s.pointer("/parameters/scale"))
                .and_then(|s| s.as_str().and_then(|s| s.parse().ok()).or_else(|| s.as_i64()))
                .ok_or("a Decimal schema without `parameters.scale`")?;
            let text = json.as_str().ok_or_else(|| format!("expected base64 text, got {json}"))?;
            return Ok(Value::Text(decimal_text(&base64_bytes(text)?, scale)?));
        }
        Some("io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => {
            let days = int()?;
            if days.unsigned_abs() > MAX_DAYS {
                return Err(format!("a date {days} days from 1970-01-01 is beyond any calendar"));
            }
            return Ok(Value::Text(date_text(days)));
        }
        Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
            return Ok(Value::Text(timestamp_text(i128::from(int()?) * 1_000_000)));
        }
        Some("io.debezium.time.MicroTimestamp") => return Ok(Value::Text(timestamp_text(i128::from(int()?) * 1000))),
        Some("io.debezium.time.NanoTimestamp") => return Ok(Value::Text(timestamp_text(i128::from(int()?)))),
        Some("io.debezium.time.Time" | "org.apache.kafka.connect.data.Time") => {
            return Ok(Value::Text(time_text(i128::from(int()?) * 1_000_000)));
        }
        Some("io.debezium.time.MicroTime") => return Ok(Value::Text(time_text(i128::from(int()?) * 1000))),
        Some("io.debezium.time.NanoTime") => return Ok(Value::Text(time_text(i128::from(int()?)))),
        Some("io.debezium.time.ZonedTimestamp" | "io.debezium.time.ZonedTime") => {
            let text = json.as_str().ok_or_else(|| format!("expected ISO-8601 text, got {json}"))?;
            return Ok(Value::Text(zoned_text(text)));
        }
        _ => {}
    }
    if let Some(decimal) = variable_scale_decimal(json)? {
        return Ok(Value::Text(decimal));
    }
    match (kind, json) {
        (Some("bytes"), Json::String(text)) => Ok(Value::Bytes(base64_bytes(text)?)),
        (Some("float" | "float32" | "float64" | "double"), Json::Number(n)) => {
            Ok(n.as_f64().map_or_else(|| Value::from_json(json), Value::Float))
        }
        (_, Json::Object(o)) => Ok(extended_json(o).unwrap_or_else(|| Value::Text(json.to_string()))),
        _ => Ok(Value::from_json(json)),
    }
}

/// Debezium's `VariableScaleDecimal`: `{"scale": 14, "value": "<base64>"}`.
fn variable_scale_decimal(json: &Json) -> Result<Option<String>, String> {
    let Some(object) = json.as_object().filter(|o| o.len() == 2) else { return Ok(None) };
    let (Some(scale), Some(Json::String(value))) = (object.get("scale").and_then(Json::as_i64), object.get("value"))
    else {
        return Ok(None);
    };
    decimal_text(&base64_bytes(value)?, scale).map(Some)
}

/// MongoDB extended JSON scalars: `{"$oid": …}`, `{"$numberLong": "5"}`, ….
fn extended_json(object: &Map<String, Json>) -> Option<Value> {
    if object.len() != 1 {
        return None;
    }
    let (tag, inner) = object.iter().next()?;
    match (tag.as_str(), inner) {
        ("$oid" | "$numberDecimal" | "$uuid" | "$symbol", Json::String(s)) => Some(Value::Text(s.clone())),
        ("$numberLong" | "$numberInt", Json::String(s)) => s.parse().ok().map(Value::Int),
        ("$numberDouble", Json::String(s)) => s.parse().ok().map(Value::Float),
        _ => None,
    }
}

fn base64_bytes(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| format!("bad base64 `{text}`: {e}"))
}

/// The largest unscaled decimal accepted, in bytes: Postgres's `numeric`
/// (the widest of any database Debezium reads) holds at most 131,072 digits
/// before the point and 16,383 after, about 61,300 bytes.
pub(crate) const MAX_DECIMAL_BYTES: usize = 64 * 1024;

/// The text of an unscaled big-endian two's-complement integer at `scale`,
/// as Postgres prints a numeric: `[-]digits[.fraction]`, exactly `scale`
/// fraction digits.
pub(crate) fn decimal_text(unscaled: &[u8], scale: i64) -> Result<String, String> {
    if !(-1000..=100_000).contains(&scale) {
        return Err(format!("decimal scale {scale} out of range"));
    }
    let negative = unscaled.first().is_some_and(|b| b & 0x80 != 0);
    // Magnitude: two's complement negated when negative.
    let mut magnitude: Vec<u8> = unscaled.to_vec();
    if negative {
        for b in &mut magnitude {
            *b = !*b;
        }
        for b in magnitude.iter_mut().rev() {
            let (sum, overflow) = b.overflowing_add(1);
            *b = sum;
            if !overflow {
                break;
            }
        }
    }
    let magnitude: Vec<u8> = magnitude.into_iter().skip_while(|b| *b == 0).collect();
    if magnitude.len() > MAX_DECIMAL_BYTES {
        return Err(format!(
            "a decimal of {} bytes is larger than any database's numeric (at most {MAX_DECIMAL_BYTES} bytes, about 157,000 digits)",
            magnitude.len()
        ));
    }
    let mut text = decimal::to_decimal_string(&magnitude);
    if scale < 0 {
        text.push_str(&"0".repeat(scale.unsigned_abs() as usize));
    } else if scale > 0 {
        let scale = scale as usize;
        if text.len() <= scale {
            text = format!("{}{text}", "0".repeat(scale + 1 - text.len()));
        }
        text.insert(text.len() - scale, '.');
    }
    if negative && text.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        text.insert(0, '-');
    }
    Ok(text)
}

/// The largest day count (either side of 1970) a date may have: far beyond
/// Connect's `int32` dates and any database's range, and small enough for
/// [`civil_from_days`] not to overflow. Timestamps stay inside it by
/// construction (an `i64` of milliseconds is about 1.07 × 10¹¹ days).
const MAX_DAYS: u64 = 1 << 40;

/// `(year, month, day)` of a day count since 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A date as Postgres prints it (`DateStyle = ISO`): `2026-02-03`, years
/// before 1 as `0044-03-15 BC`.
fn date_text(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    if year >= 1 { format!("{year:04}-{month:02}-{day:02}") } else { format!("{:04}-{month:02}-{day:02} BC", 1 - year) }
}

/// `HH:MM:SS[.ffffff]` of nanoseconds into a day, trailing zeros of the
/// fraction dropped (as Postgres prints a `time`, microsecond precision).
fn time_text(nanos_of_day: i128) -> String {
    let micros = nanos_of_day.div_euclid(1000);
    let seconds = micros.div_euclid(1_000_000);
    let fraction = micros.rem_euclid(1_000_000);
    let mut out = format!("{:02}:{:02}:{:02}", seconds / 3600, (seconds / 60) % 60, seconds % 60);
    push_fraction(&mut out, fraction);
    out
}

fn push_fraction(out: &mut String, micros: i128) {
    if micros != 0 {
        let digits = format!("{micros:06}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
}

/// A `timestamp` (no zone) of nanoseconds since the epoch, as Postgres
/// prints it: `2026-02-03 12:00:00.000001`.
fn timestamp_text(nanos: i128) -> String {
    let nanos_per_day = 86_400 * 1_000_000_000_i128;
    let days = nanos.div_euclid(nanos_per_day) as i64;
    let of_day = nanos.rem_euclid(nanos_per_day);
    let date = date_text(days);
    match date.strip_suffix(" BC") {
        Some(date) => format!("{date} {} BC", time_text(of_day)),
        None => format!("{date} {}", time_text(of_day)),
    }
}

/// Debezium's ISO-8601 `ZonedTimestamp`/`ZonedTime` (`…T12:00:00.000001Z`)
/// as Postgres prints a `timestamptz`/`timetz` in UTC
/// (`… 12:00:00.000001+00`). Text in another shape is kept as it is.
fn zoned_text(text: &str) -> String {
    let Some(local) = text.strip_suffix('Z') else { return text.replacen('T', " ", 1) };
    let local = local.replacen('T', " ", 1);
    let trimmed = match local.split_once('.') {
        Some((whole, fraction)) => {
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() { whole.to_owned() } else { format!("{whole}.{fraction}") }
        }
        None => local,
    };
    format!("{trimmed}+00")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at() -> Position {
        Position::File { line: 1 }
    }

    fn plain(event: &Json) -> Result<Decoded, DebeziumError> {
        decode(Some(event), None, at(), &DecodeOptions::default())
    }

    #[test]
    fn decodes_an_update_without_schema() {
        let event = json!({
            "before": {"id": 1, "name": "old", "body": UNAVAILABLE},
            "after": {"id": 1, "name": "new", "body": UNAVAILABLE},
            "op": "u",
            "source": {"schema": "shop", "table": "products", "txId": 771, "ts_ms": 1700000000000i64},
        });
        let Decoded::Change(change) = plain(&event).unwrap() else { panic!("not a change") };
        assert_eq!(&*change.table, "shop.products");
        assert_eq!(change.op, Operation::Update);
        assert_eq!(change.old("name"), &Cell::Known(Value::Text("old".into())));
        assert_eq!(change.new_cell("body"), &Cell::Unknown);
        assert_eq!(change.xid, Some(TransactionId::Postgres(771)));
        assert_eq!(change.commit_time_micros, Some(1_700_000_000_000_000));
    }

    /// Found reading the code while writing the `debezium_value` fuzz target
    /// (fuzz/README.md): a day count near `i64::MAX` overflowed the
    /// calendar arithmetic (a panic with overflow checks on).
    #[test]
    fn a_date_beyond_any_calendar_is_an_error_not_a_panic() {
        for name in ["io.debezium.time.Date", "org.apache.kafka.connect.data.Date"] {
            let schema = json!({"type": "int32", "name": name});
            for days in [i64::MAX, i64::MAX - 700_000, i64::MIN] {
                assert!(typed(&json!(days), Some(&schema)).is_err(), "{name} {days}");
            }
        }
        // A whole event too (fuzz/regressions/debezium/).
        let line = include_str!("../../fuzz/regressions/debezium/date-days-near-i64-max.jsonl");
        let event: Json = serde_json::from_str(line).unwrap();
        assert!(plain(&event).is_err());
        // Every int32 date and every millisecond timestamp still decodes.
        let date = json!({"type": "int32", "name": "io.debezium.time.Date"});
        for days in [i64::from(i32::MAX), i64::from(i32::MIN)] {
            assert!(typed(&json!(days), Some(&date)).is_ok(), "{days}");
        }
        let timestamp = json!({"type": "int64", "name": "io.debezium.time.Timestamp"});
        for ms in [i64::MAX, i64::MIN] {
            assert!(typed(&json!(ms), Some(&timestamp)).is_ok(), "{ms}");
        }
    }

    #[test]
    fn decodes_the_schema_and_payload_envelope() {
        let event = json!({
            "schema": {"type": "struct"},
            "payload": {"before": null, "after": {"id": 2}, "op": "c", "source": {"db": "app", "table": "users"}},
        });
        let Decoded::Change(change) = plain(&event).unwrap() else { panic!("not a change") };
        assert_eq!(&*change.table, "app.users");
        assert_eq!(change.op, Operation::Insert);
        assert!(change.before.is_none());
    }

    #[test]
    fn non_changes_are_told_apart() {
        assert_eq!(decode(None, None, at(), &DecodeOptions::default()), Ok(Decoded::Ignored(Ignored::Tombstone)));
        assert_eq!(plain(&Json::Null), Ok(Decoded::Ignored(Ignored::Tombstone)));
        let read = json!({"after": {"id": 3}, "op": "r", "source": {"schema": "s", "table": "t"}});
        assert!(matches!(plain(&read), Ok(Decoded::SnapshotRead(_))));
        let begin = json!({"status": "BEGIN", "id": "771:3456", "event_count": null, "ts_ms": 1});
        assert_eq!(plain(&begin), Ok(Decoded::Ignored(Ignored::TransactionMetadata)));
        assert_eq!(plain(&json!({"ts_ms": 1})), Ok(Decoded::Ignored(Ignored::Heartbeat)));
        let ddl = json!({"source": {}, "databaseName": "app", "ddl": "ALTER TABLE t ADD c int"});
        assert_eq!(plain(&ddl), Ok(Decoded::Ignored(Ignored::SchemaChange)));
    }

    #[test]
    fn malformed_events_are_errors() {
        let no_op = json!({"after": {}, "source": {"schema": "s", "table": "t"}});
        assert_eq!(plain(&no_op), Err(DebeziumError::Shape("missing `op`".into())));
        let bad_op = json!({"op": "x", "source": {"schema": "s", "table": "t"}});
        assert_eq!(plain(&bad_op), Err(DebeziumError::Op("x".into())));
        let no_after = json!({"op": "c", "source": {"schema": "s", "table": "t"}});
        assert!(plain(&no_after).is_err());
        assert!(plain(&json!([1, 2])).is_err());
        let bad_decimal = json!({
            "schema": {"fields": [{"field": "after", "fields": [
                {"field": "total", "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}}]}]},
            "payload": {"op": "c", "after": {"total": "%%%"}, "source": {"schema": "s", "table": "t"}},
        });
        assert!(matches!(plain(&bad_decimal), Err(DebeziumError::Value { column, .. }) if column == "total"));
    }

    #[test]
    fn a_delete_keeps_only_its_key_columns_unless_the_table_sends_whole_rows() {
        let event = json!({
            "before": {"sku_id": 7, "currency": "USD", "amount": 0, "note": ""},
            "op": "d",
            "source": {"schema": "shop", "table": "prices"},
        });
        let key = json!({"sku_id": 7, "currency": "USD"});
        let Decoded::Change(change) = decode(Some(&event), Some(&key), at(), &DecodeOptions::default()).unwrap() else {
            panic!("not a change")
        };
        assert_eq!(change.old("sku_id"), &Cell::Known(Value::Int(7)));
        assert_eq!(change.old("currency"), &Cell::Known(Value::Text("USD".into())));
        assert_eq!(change.old("amount"), &Cell::Unknown);
        assert_eq!(change.old("note"), &Cell::Unknown);
        let full = FullRowDeletes::Tables(HashSet::from(["shop.prices".to_owned()]));
        let options = DecodeOptions { full_row_deletes: Some(&full), ..DecodeOptions::default() };
        let Decoded::Change(change) = decode(Some(&event), Some(&key), at(), &options).unwrap() else {
            panic!("not a change")
        };
        assert_eq!(change.old("amount"), &Cell::Known(Value::Int(0)));
    }

    /// Issue 11, item 9: a string key converter (or any key that is not a
    /// JSON object) names no columns; the placeholders Debezium writes for
    /// a delete's non-key columns under `REPLICA IDENTITY DEFAULT` must
    /// still never pass for values.
    #[test]
    fn a_delete_whose_key_is_not_json_keeps_only_the_graphs_key_columns() {
        let event = json!({
            "before": {"sku_id": 7, "currency": "USD", "amount": 0, "note": ""},
            "op": "d",
            "source": {"schema": "shop", "table": "prices"},
        });
        let keys = TableKeys::from([("shop.prices".to_owned(), HashSet::from(["sku_id".to_owned()]))]);
        // A key that is not JSON (`7|USD`) reaches decode as `None`; a
        // string converter's `"7"` parses as a JSON number.
        for key in [None, Some(json!(7)), Some(json!("7|USD"))] {
            let options = DecodeOptions { table_keys: Some(&keys), ..DecodeOptions::default() };
            let Decoded::Change(change) = decode(Some(&event), key.as_ref(), at(), &options).unwrap() else {
                panic!("not a change")
            };
            assert_eq!(change.old("sku_id"), &Cell::Known(Value::Int(7)), "key {key:?}");
            assert_eq!(change.old("currency"), &Cell::Unknown, "key {key:?}");
            assert_eq!(change.old("amount"), &Cell::Unknown, "key {key:?}");
            assert_eq!(change.old("note"), &Cell::Unknown, "key {key:?}");
            // A table the graph does not know: nothing of the old row is trusted.
            let Decoded::Change(change) = decode(Some(&event), key.as_ref(), at(), &DecodeOptions::default()).unwrap()
            else {
                panic!("not a change")
            };
            assert_eq!(change.old("sku_id"), &Cell::Unknown, "key {key:?}");
            assert_eq!(change.old("amount"), &Cell::Unknown, "key {key:?}");
        }
    }

    #[test]
    fn a_configured_table_replaces_the_source_table() {
        let event = json!({"after": {"id": 1}, "op": "c", "source": {"schema": "s", "table": "t"}});
        let options = DecodeOptions { table: Some("app.renamed"), ..DecodeOptions::default() };
        let Decoded::Change(change) = decode(Some(&event), None, at(), &options).unwrap() else { panic!() };
        assert_eq!(&*change.table, "app.renamed");
    }

    #[test]
    fn mongodb_documents_and_extended_json() {
        let event = json!({
            "after": "{\"_id\": {\"$oid\": \"64f0\"}, \"n\": {\"$numberLong\": \"5\"}}",
            "op": "c",
            "source": {"db": "shop", "collection": "carts"},
        });
        let Decoded::Change(change) = plain(&event).unwrap() else { panic!() };
        assert_eq!(&*change.table, "shop.carts");
        assert_eq!(change.new_cell("_id"), &Cell::Known(Value::Text("64f0".into())));
        assert_eq!(change.new_cell("n"), &Cell::Known(Value::Int(5)));
    }

    #[test]
    fn decimals_print_as_postgres_numerics() {
        let d = |bytes: &[u8], scale| decimal_text(bytes, scale).unwrap();
        assert_eq!(d(&[0x2e, 0xae], 2), "119.50");
        assert_eq!(d(&[0x00], 2), "0.00");
        assert_eq!(d(&[], 0), "0");
        assert_eq!(d(&[0xff], 2), "-0.01");
        assert_eq!(d(&[0xff, 0x38], 1), "-20.0");
        assert_eq!(d(&[0x05], -2), "500");
        assert_eq!(d(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 0), i64::MAX.to_string());
        assert_eq!(d(&[0x80, 0, 0, 0, 0, 0, 0, 0], 0), i64::MIN.to_string());
        // Wider than 128 bits: 2^136.
        let mut big = vec![0x01];
        big.extend([0u8; 17]);
        assert_eq!(d(&big, 0), "87112285931760246646623899502532662132736");
    }

    /// The digit-at-a-time conversion this replaced, as a reference.
    fn decimal_digits_by_repeated_division(magnitude: &[u8]) -> String {
        let mut digits = Vec::new();
        let mut rest: Vec<u8> = magnitude.iter().copied().skip_while(|b| *b == 0).collect();
        while !rest.is_empty() {
            let mut remainder: u32 = 0;
            for b in &mut rest {
                let acc = (remainder << 8) | u32::from(*b);
                *b = (acc / 10) as u8;
                remainder = acc % 10;
            }
            digits.push(b'0' + remainder as u8);
            let zeros = rest.iter().take_while(|b| **b == 0).count();
            rest.drain(..zeros);
        }
        if digits.is_empty() {
            digits.push(b'0');
        }
        digits.reverse();
        String::from_utf8(digits).unwrap()
    }

    /// Issue 11, item 8: a decimal of tens of thousands of digits converts
    /// exactly (the divide-and-conquer path), here 10^20000 − 1 and a few
    /// pseudo-random sizes checked against the digit-at-a-time reference.
    #[test]
    fn huge_decimals_convert_exactly() {
        // 10^20000 - 1 = 20000 nines: its bytes from the reference's inverse.
        let nines = "9".repeat(20_000);
        let mut bytes = vec![0u8];
        // base-10 text to base-256 big-endian (test-only, quadratic).
        let mut magnitude: Vec<u8> = vec![0];
        for d in nines.bytes() {
            let mut carry = u32::from(d - b'0');
            for b in magnitude.iter_mut().rev() {
                let acc = u32::from(*b) * 10 + carry;
                *b = (acc & 0xff) as u8;
                carry = acc >> 8;
            }
            while carry > 0 {
                magnitude.insert(0, (carry & 0xff) as u8);
                carry >>= 8;
            }
        }
        bytes.extend(&magnitude);
        assert_eq!(decimal_text(&bytes, 0).unwrap(), nines);
        let text = decimal_text(&bytes, 3).unwrap();
        assert_eq!(text.len(), 20_001);
        assert!(text.ends_with(".999"));
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [1usize, 7, 8, 9, 63, 64, 65, 130, 257, 1000, 4099] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed & 0xff) as u8
                })
                .collect();
            let mut positive = vec![0u8];
            positive.extend(&bytes);
            assert_eq!(decimal_text(&positive, 0).unwrap(), decimal_digits_by_repeated_division(&bytes), "{len} bytes");
        }
    }

    /// Larger than any database's numeric: an error (the message is
    /// dead-lettered), never minutes of conversion.
    #[test]
    fn a_decimal_larger_than_any_numeric_is_refused() {
        let mut bytes = vec![0x01];
        bytes.extend(vec![0u8; MAX_DECIMAL_BYTES]);
        assert!(decimal_text(&bytes, 0).unwrap_err().contains("larger than"));
    }

    #[test]
    fn a_value_past_max_value_bytes_is_too_large() {
        let event = json!({
            "after": {"id": 1, "body": "x".repeat(100)}, "op": "c", "source": {"schema": "s", "table": "t"},
        });
        let options = DecodeOptions { max_value_bytes: Some(64), ..DecodeOptions::default() };
        let error = decode(Some(&event), None, at(), &options).unwrap_err();
        assert!(matches!(&error, DebeziumError::TooLarge { column, .. } if column == "body"), "{error}");
        assert_eq!(error.reason().as_str(), "too_large");
        let options = DecodeOptions { max_value_bytes: Some(128), ..DecodeOptions::default() };
        assert!(decode(Some(&event), None, at(), &options).is_ok());
        // Out of time: the budget is checked between columns.
        let past = std::time::Instant::now() - std::time::Duration::from_millis(1);
        let options = DecodeOptions { deadline: Some(past), ..DecodeOptions::default() };
        let error = decode(Some(&event), None, at(), &options).unwrap_err();
        assert_eq!(error.reason().as_str(), "too_slow");
    }

    #[test]
    fn times_print_as_postgres_does_in_utc() {
        assert_eq!(date_text(0), "1970-01-01");
        assert_eq!(date_text(20494), "2026-02-10");
        assert_eq!(date_text(-719_528), "0001-01-01 BC");
        assert_eq!(timestamp_text(1_770_123_600_000_000_000), "2026-02-03 13:00:00");
        assert_eq!(timestamp_text(1_000), "1970-01-01 00:00:00.000001");
        assert_eq!(timestamp_text(-1_000), "1969-12-31 23:59:59.999999");
        assert_eq!(time_text(3_723_500_000_000), "01:02:03.5");
        assert_eq!(zoned_text("2026-02-03T12:00:00.000001Z"), "2026-02-03 12:00:00.000001+00");
        assert_eq!(zoned_text("2026-02-03T12:00:00.500000Z"), "2026-02-03 12:00:00.5+00");
        assert_eq!(zoned_text("1970-01-01T00:00:00Z"), "1970-01-01 00:00:00+00");
        assert_eq!(zoned_text("12:30:00Z"), "12:30:00+00");
    }

    #[test]
    fn schema_types_decode_values() {
        let decimal =
            json!({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}});
        assert_eq!(typed(&json!("Lq4="), Some(&decimal)), Ok(Value::Text("119.50".into())));
        let micros = json!({"type": "int64", "name": "io.debezium.time.MicroTimestamp"});
        assert_eq!(typed(&json!(1_000_001), Some(&micros)), Ok(Value::Text("1970-01-01 00:00:01.000001".into())));
        let bytes = json!({"type": "bytes"});
        assert_eq!(typed(&json!("AQI="), Some(&bytes)), Ok(Value::Bytes(vec![1, 2])));
        assert_eq!(typed(&json!({"scale": 1, "value": "Bw=="}), None), Ok(Value::Text("0.7".into())));
        let float = json!({"type": "double"});
        assert_eq!(typed(&json!(2), Some(&float)), Ok(Value::Float(2.0)));
        assert_eq!(typed(&json!(["a", "b"]), None), Ok(Value::Text("[\"a\",\"b\"]".into())));
    }

    /// Every line of the captured fixtures (real Debezium output).
    fn fixture(name: &str) -> Vec<(Json, Result<Decoded, DebeziumError>)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium").join(name);
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|line| {
                let json: Json = serde_json::from_str(line).unwrap();
                let record = Record::from_json(&json);
                let decoded = decode(record.value, record.key, at(), &DecodeOptions::default());
                (json.clone(), decoded)
            })
            .collect()
    }

    fn orders_change(lines: &[(Json, Result<Decoded, DebeziumError>)], offset: i64) -> Change {
        let (_, decoded) = lines
            .iter()
            .find(|(json, _)| json["topic"] == "dbserver1.fixture.orders" && json["offset"] == offset)
            .unwrap();
        match decoded {
            Ok(Decoded::Change(c)) => c.clone(),
            other => panic!("offset {offset}: {other:?}"),
        }
    }

    #[test]
    fn every_captured_event_decodes() {
        for name in ["with-schemas.jsonl", "without-schemas.jsonl", "without-schemas-tx.jsonl"] {
            let lines = fixture(name);
            assert!(lines.len() >= 74, "{name}");
            for (json, decoded) in &lines {
                assert!(decoded.is_ok(), "{name}: {json}: {decoded:?}");
            }
            let ignored = |what| lines.iter().filter(|(_, d)| d == &Ok(Decoded::Ignored(what))).count();
            assert_eq!(ignored(Ignored::Tombstone), 10, "{name}: a tombstone after each delete");
            let transactions = if name.ends_with("-tx.jsonl") { 44 } else { 0 };
            assert_eq!(ignored(Ignored::TransactionMetadata), transactions, "{name}");
        }
    }

    #[test]
    fn captured_values_are_typed_by_their_schema() {
        let lines = fixture("with-schemas.jsonl");
        let order = orders_change(&lines, 3);
        let text = |s: &str| Cell::Known(Value::Text(s.into()));
        assert_eq!(order.new_cell("total"), &text("119.50"));
        assert_eq!(order.new_cell("discount_rate"), &text("0.125"));
        assert_eq!(order.new_cell("placed_at"), &text("2026-01-02 03:04:05.123456+00"));
        assert_eq!(order.new_cell("local_placed_at"), &text("2026-01-02 04:04:05.123456"));
        assert_eq!(order.new_cell("ship_by"), &text("2026-01-05"));
        assert_eq!(order.new_cell("state"), &text("shipped"));
        assert_eq!(order.new_cell("id"), &Cell::Known(Value::Int(1)));
        // A delete under REPLICA IDENTITY DEFAULT: the key is real, the
        // placeholders are not values.
        let deleted = orders_change(&lines, 5);
        assert_eq!(deleted.old("id"), &Cell::Known(Value::Int(2)));
        assert_eq!(deleted.old("total"), &Cell::Unknown);
        assert_eq!(deleted.old("placed_at"), &Cell::Unknown);
        // Without schemas the same row keeps what JSON says.
        let plain = orders_change(&fixture("without-schemas.jsonl"), 3);
        assert_eq!(plain.new_cell("id"), order.new_cell("id"));
        assert_eq!(plain.new_cell("state"), order.new_cell("state"));
        assert_eq!(plain.new_cell("discount_rate"), order.new_cell("discount_rate"));
    }
}
