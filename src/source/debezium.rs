//! Decoding Debezium change events (the JSON envelope) into [`Change`]s.
//!
//! Accepts both shapes Kafka Connect's JSON converter writes: with embedded
//! schemas (`{"schema": …, "payload": {…}}`) and without (the payload
//! alone). `op` is `c` (insert), `u` (update), `d` (delete), `t` (truncate)
//! or `r` (snapshot read, reported as [`Decoded::SnapshotRead`] so the
//! caller decides). The table is `source.schema` (or `source.db` for MySQL)
//! and `source.table`. Debezium's `__debezium_unavailable_value` (an
//! unchanged TOASTed column) is [`Cell::Unknown`](crate::change::Cell),
//! never NULL.

use std::sync::Arc;

use serde_json::Value as Json;

use crate::change::{Change, Operation, Position, Row, TransactionId};

/// The placeholder Debezium writes for a value it does not have.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// What one event decodes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Change(Change),
    /// A snapshot read (`op = r`): the row as it was, not a change.
    SnapshotRead(Change),
    /// A tombstone (null value) that follows a delete for log compaction.
    Tombstone,
}

/// Why an event could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebeziumError {
    #[error("not a Debezium change event: {0}")]
    Shape(String),
    #[error("unknown op `{0}` (expected c, u, d, t or r)")]
    Op(String),
}

/// Decodes one event value; `position` is where it came from.
pub fn decode(event: &Json, position: Position) -> Result<Decoded, DebeziumError> {
    if event.is_null() {
        return Ok(Decoded::Tombstone);
    }
    let payload = match event.get("payload") {
        Some(p) if event.get("schema").is_some() => p,
        _ => event,
    };
    if payload.is_null() {
        return Ok(Decoded::Tombstone);
    }
    let object = payload.as_object().ok_or_else(|| DebeziumError::Shape("the event is not a JSON object".into()))?;
    let op_text = object.get("op").and_then(Json::as_str).ok_or_else(|| DebeziumError::Shape("missing `op`".into()))?;
    let source = object
        .get("source")
        .and_then(Json::as_object)
        .ok_or_else(|| DebeziumError::Shape("missing `source`".into()))?;
    let table = source
        .get("table")
        .and_then(Json::as_str)
        .ok_or_else(|| DebeziumError::Shape("missing `source.table`".into()))?;
    let schema = source
        .get("schema")
        .and_then(Json::as_str)
        .or_else(|| source.get("db").and_then(Json::as_str))
        .ok_or_else(|| DebeziumError::Shape("missing `source.schema` (or `source.db`)".into()))?;
    let image = |name: &str| -> Result<Option<Row>, DebeziumError> {
        match object.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Object(map)) => Ok(Some(Row::from_json_object(map, Some(UNAVAILABLE)))),
            Some(_) => Err(DebeziumError::Shape(format!("`{name}` is neither an object nor null"))),
        }
    };
    let (op, snapshot) = match op_text {
        "c" => (Operation::Insert, false),
        "r" => (Operation::Insert, true),
        "u" => (Operation::Update, false),
        "d" => (Operation::Delete, false),
        "t" => (Operation::Truncate, false),
        other => return Err(DebeziumError::Op(other.to_owned())),
    };
    let before = image("before")?;
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
    let commit_time_micros = source
        .get("ts_us")
        .and_then(Json::as_i64)
        .or_else(|| source.get("ts_ms").and_then(Json::as_i64).map(|ms| ms.saturating_mul(1000)));
    let xid = match source.get("txId") {
        Some(Json::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).map(TransactionId::Postgres),
        Some(Json::String(s)) => Some(TransactionId::Other(Arc::from(s.as_str()))),
        _ => source.get("gtid").and_then(Json::as_str).map(|g| TransactionId::Other(Arc::from(g))),
    };
    let change =
        Change { table: Arc::from(format!("{schema}.{table}")), op, before, after, position, commit_time_micros, xid };
    Ok(if snapshot { Decoded::SnapshotRead(change) } else { Decoded::Change(change) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Cell, Value};
    use serde_json::json;

    fn at() -> Position {
        Position::File { line: 1 }
    }

    #[test]
    fn decodes_an_update_without_schema() {
        let event = json!({
            "before": {"id": 1, "name": "old", "body": UNAVAILABLE},
            "after": {"id": 1, "name": "new", "body": UNAVAILABLE},
            "op": "u",
            "source": {"schema": "shop", "table": "products", "txId": 771, "ts_ms": 1700000000000i64},
        });
        let Decoded::Change(change) = decode(&event, at()).unwrap() else { panic!("not a change") };
        assert_eq!(&*change.table, "shop.products");
        assert_eq!(change.op, Operation::Update);
        assert_eq!(change.old("name"), &Cell::Known(Value::Text("old".into())));
        assert_eq!(change.new_cell("body"), &Cell::Unknown);
        assert_eq!(change.xid, Some(TransactionId::Postgres(771)));
        assert_eq!(change.commit_time_micros, Some(1_700_000_000_000_000));
    }

    #[test]
    fn decodes_the_schema_and_payload_envelope() {
        let event = json!({
            "schema": {"type": "struct"},
            "payload": {"before": null, "after": {"id": 2}, "op": "c", "source": {"db": "app", "table": "users"}},
        });
        let Decoded::Change(change) = decode(&event, at()).unwrap() else { panic!("not a change") };
        assert_eq!(&*change.table, "app.users");
        assert_eq!(change.op, Operation::Insert);
        assert!(change.before.is_none());
    }

    #[test]
    fn tombstones_and_snapshot_reads_are_told_apart() {
        assert_eq!(decode(&Json::Null, at()), Ok(Decoded::Tombstone));
        let read = json!({"after": {"id": 3}, "op": "r", "source": {"schema": "s", "table": "t"}});
        assert!(matches!(decode(&read, at()), Ok(Decoded::SnapshotRead(_))));
    }

    #[test]
    fn malformed_events_are_errors() {
        let no_op = json!({"after": {}, "source": {"schema": "s", "table": "t"}});
        assert_eq!(decode(&no_op, at()), Err(DebeziumError::Shape("missing `op`".into())));
        let bad_op = json!({"op": "x", "source": {"schema": "s", "table": "t"}});
        assert_eq!(decode(&bad_op, at()), Err(DebeziumError::Op("x".into())));
        let no_after = json!({"op": "c", "source": {"schema": "s", "table": "t"}});
        assert!(decode(&no_after, at()).is_err());
    }
}
