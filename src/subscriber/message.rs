//! Broadcast messages, format version 2 (`docs/broadcast.md`, "Messages"):
//! parsing only, no I/O.
//!
//! A message whose `v` is not 2 parses as [`Message::UnknownVersion`] (the
//! subscriber flushes its whole local cache and keeps reading); a version 2
//! message of another `kind` as [`Message::UnknownKind`] (ignored). A body
//! that is not a JSON object, or a version 2 batch or heartbeat without a
//! string `epoch` and an integer `seq`, is a [`MessageError`]: a protocol
//! surprise, which the subscriber treats like an unknown version.

use serde_json::Value;

use crate::change::Lsn;

/// The format version this client reads.
pub const FORMAT_VERSION: u64 = 2;

/// One broadcast message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Batch(Batch),
    Heartbeat(Heartbeat),
    /// `v` is not 2: flush everything.
    UnknownVersion,
    /// A version 2 message of a kind this client does not know: ignore it.
    UnknownKind,
}

/// What one batch of evictd invalidated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    pub epoch: String,
    pub seq: u64,
    /// The batch number, for logs.
    pub batch: Option<u64>,
    /// The batch's last commit LSN (Postgres sources).
    pub commit_lsn: Option<Lsn>,
    /// The highest position evictd has applied (Postgres sources).
    pub applied: Option<Lsn>,
    pub caches: Vec<String>,
    pub keys: Vec<String>,
    pub tags: Vec<String>,
    pub flush: Vec<String>,
    pub truncated: bool,
    /// The source's commit time of the batch's last transaction, when it
    /// gives one: the commit → local drop latency is measured from it.
    pub committed_at_ms: Option<u64>,
    pub published_at_ms: Option<u64>,
}

/// A heartbeat: the last sequence number given out, on pub/sub only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    pub epoch: String,
    pub seq: u64,
    pub applied: Option<Lsn>,
    pub published_at_ms: Option<u64>,
}

/// A message that cannot be read as format 2.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("a broadcast message is not a JSON object: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("a broadcast message is JSON but not an object")]
    NotAnObject,
    #[error("a version 2 {kind} needs a string `epoch` and an integer `seq`")]
    MissingSequence { kind: &'static str },
}

/// Parses one message body.
pub fn parse(body: &[u8]) -> Result<Message, MessageError> {
    let doc: Value = serde_json::from_slice(body).map_err(MessageError::NotJson)?;
    let doc = doc.as_object().ok_or(MessageError::NotAnObject)?;
    if doc.get("v").and_then(Value::as_u64) != Some(FORMAT_VERSION) {
        return Ok(Message::UnknownVersion);
    }
    let kind = match doc.get("kind").and_then(Value::as_str) {
        Some("batch") => "batch",
        Some("heartbeat") => "heartbeat",
        _ => return Ok(Message::UnknownKind),
    };
    let (Some(epoch), Some(seq)) = (doc.get("epoch").and_then(Value::as_str), doc.get("seq").and_then(Value::as_u64))
    else {
        return Err(MessageError::MissingSequence { kind });
    };
    let applied = doc.get("applied").and_then(postgres_lsn("lsn"));
    let published_at_ms = doc.get("published_at_ms").and_then(Value::as_u64);
    if kind == "heartbeat" {
        return Ok(Message::Heartbeat(Heartbeat { epoch: epoch.to_owned(), seq, applied, published_at_ms }));
    }
    Ok(Message::Batch(Batch {
        epoch: epoch.to_owned(),
        seq,
        batch: doc.get("batch").and_then(Value::as_u64),
        commit_lsn: doc.get("position").and_then(postgres_lsn("commit_lsn")),
        applied,
        caches: strings(doc.get("caches")),
        keys: strings(doc.get("keys")),
        tags: strings(doc.get("tags")),
        flush: strings(doc.get("flush")),
        truncated: doc.get("truncated").and_then(Value::as_bool).unwrap_or(false),
        committed_at_ms: doc.get("committed_at_ms").and_then(Value::as_u64),
        published_at_ms,
    }))
}

/// `field` of a `{"kind":"postgres", …}` position, as an LSN. Other kinds
/// (Kafka) carry no comparable position: `None`.
fn postgres_lsn(field: &'static str) -> impl Fn(&Value) -> Option<Lsn> {
    move |position| {
        if position.get("kind").and_then(Value::as_str) != Some("postgres") {
            return None;
        }
        position.get(field).and_then(Value::as_str)?.parse().ok()
    }
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_batch_parses() {
        let body = br#"{"v":2,"kind":"batch","epoch":"1764000000000000","seq":1764000000000417,
 "batch":17,"position":{"kind":"postgres","commit_lsn":"0/1A2B3C8","lsn":"0/1A2B3C8"},
 "committed_at_ms":1764000000101,"applied":{"kind":"postgres","lsn":"0/1A2B400"},
 "caches":["user_profile"],"keys":["user:{42}:profile"],"tags":["user:42"],"flush":["feed"],
 "truncated":false,"published_at_ms":1764000000123}"#;
        let Message::Batch(b) = parse(body).unwrap() else { panic!("not a batch") };
        assert_eq!(b.epoch, "1764000000000000");
        assert_eq!(b.seq, 1764000000000417);
        assert_eq!(b.commit_lsn, Some(Lsn(0x1A2B3C8)));
        assert_eq!(b.applied, Some(Lsn(0x1A2B400)));
        assert_eq!(b.keys, ["user:{42}:profile"]);
        assert_eq!(b.tags, ["user:42"]);
        assert_eq!(b.flush, ["feed"]);
        assert_eq!(b.committed_at_ms, Some(1764000000101));
    }

    #[test]
    fn the_documented_heartbeat_parses() {
        let body = br#"{"v":2,"kind":"heartbeat","epoch":"1764000000000000","seq":1764000000000417,
 "applied":{"kind":"postgres","lsn":"0/1A2B400"},"published_at_ms":1764000001123}"#;
        let expected = Heartbeat {
            epoch: "1764000000000000".into(),
            seq: 1764000000000417,
            applied: Some(Lsn(0x1A2B400)),
            published_at_ms: Some(1764000001123),
        };
        assert_eq!(parse(body).unwrap(), Message::Heartbeat(expected));
    }

    #[test]
    fn unknown_versions_and_kinds_are_told_apart_and_garbage_is_an_error() {
        assert_eq!(parse(br#"{"v":1,"seq":5,"keys":["a"]}"#).unwrap(), Message::UnknownVersion);
        assert_eq!(parse(br#"{"v":3,"kind":"batch"}"#).unwrap(), Message::UnknownVersion);
        assert_eq!(parse(br#"{"v":2,"kind":"snapshot","epoch":"1","seq":1}"#).unwrap(), Message::UnknownKind);
        assert!(matches!(parse(b"not json"), Err(MessageError::NotJson(_))));
        assert!(matches!(parse(b"[1]"), Err(MessageError::NotAnObject)));
        assert!(matches!(
            parse(br#"{"v":2,"kind":"batch","epoch":1,"seq":1}"#),
            Err(MessageError::MissingSequence { kind: "batch" })
        ));
    }

    #[test]
    fn kafka_positions_carry_no_applied_lsn() {
        let body = br#"{"v":2,"kind":"heartbeat","epoch":"1","seq":1,"applied":{"kind":"kafka","topic":"t"}}"#;
        let Message::Heartbeat(h) = parse(body).unwrap() else { panic!() };
        assert_eq!(h.applied, None);
    }
}
