//! A Kafka message's value split into Debezium's `{schema, payload}`
//! envelope without building the schema's JSON tree for every message.
//!
//! With the JSON converter's default `schemas.enable = true`, every message
//! carries its table's whole Connect schema (typically 2-4 KiB, most of the
//! message) and a small payload. The schema is the same for every message
//! of a table until its DDL changes, so [`Envelopes`] keeps, per topic, the
//! last schema's text and its parsed tree: a message whose schema text is
//! byte-for-byte the one seen before reuses the tree, and only the payload
//! is parsed. Anything else (no envelope, an envelope whose first member is
//! not `schema`, a value that is not an object, `null`) is parsed whole, as
//! before.
//!
//! **Invariant:** the result is exactly what parsing the whole value and
//! splitting it (`debezium::decode`) gives; the cache only saves work.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value as Json;
use serde_json::value::RawValue;

/// The two members of the envelope, as unparsed text; anything else in the
/// object is skipped.
#[derive(Deserialize)]
struct Split<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

/// A value, parsed: the payload and, with the envelope, the schema.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// `{schema, payload}`, both present and not `null`.
    Envelope { payload: Json, schema: Arc<Json> },
    /// Anything else, parsed whole (`debezium::decode` splits it).
    Whole(Json),
}

/// The last schema seen on each topic.
#[derive(Debug, Default)]
pub(crate) struct Envelopes {
    schemas: HashMap<Box<str>, (Box<str>, Arc<Json>)>,
}

/// At most this many topics keep a schema: a `topic_pattern` over many
/// topics must not grow the cache without bound.
const TOPICS_MAX: usize = 4096;

impl Envelopes {
    /// Parses `bytes`, the value of a message of `topic`.
    pub(crate) fn parse(&mut self, topic: &str, bytes: &[u8]) -> Result<Parsed, serde_json::Error> {
        // The JSON converter writes `schema` first: only such a value is
        // tried as an envelope, so a schema-less topic's values are scanned
        // once, not twice (any other order is parsed whole, with the same
        // result). Only an object: serde would also read `[schema, payload]`.
        let envelope = bytes.trim_ascii_start().starts_with(br#"{"schema""#);
        if envelope
            && let Ok(Split { schema: Some(schema), payload: Some(payload) }) =
                serde_json::from_slice::<Split<'_>>(bytes)
        {
            let payload: Json = serde_json::from_str(payload.get())?;
            let schema = self.schema(topic, schema.get())?;
            return Ok(Parsed::Envelope { payload, schema });
        }
        serde_json::from_slice(bytes).map(Parsed::Whole)
    }

    /// The tree of `text`, the schema of a message of `topic`: the cached
    /// one when the text is the same as last time.
    fn schema(&mut self, topic: &str, text: &str) -> Result<Arc<Json>, serde_json::Error> {
        if let Some((seen, tree)) = self.schemas.get(topic)
            && **seen == *text
        {
            return Ok(tree.clone());
        }
        let tree = Arc::new(serde_json::from_str::<Json>(text)?);
        if self.schemas.len() >= TOPICS_MAX && !self.schemas.contains_key(topic) {
            self.schemas.clear();
        }
        self.schemas.insert(topic.into(), (text.into(), tree.clone()));
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Json {
        serde_json::from_slice(bytes).unwrap()
    }

    /// What `debezium::decode` would take as payload and schema.
    fn split(parsed: &Parsed) -> (Json, Option<Json>) {
        match parsed {
            Parsed::Envelope { payload, schema } => (payload.clone(), Some((**schema).clone())),
            Parsed::Whole(json) => match (json.get("schema"), json.get("payload")) {
                (Some(schema), Some(payload)) => (payload.clone(), Some(schema.clone())),
                _ => (json.clone(), None),
            },
        }
    }

    #[test]
    fn every_shape_splits_as_parsing_the_whole_value_does() {
        let mut envelopes = Envelopes::default();
        for text in [
            r#"{"schema":{"type":"struct","fields":[]},"payload":{"op":"c","after":{"id":1}}}"#,
            r#"{"payload":{"op":"c"},"schema":{"type":"struct"},"extra":[1,2]}"#,
            r#"{"schema":null,"payload":{"op":"c"}}"#,
            r#"{"schema":{"type":"struct"},"payload":null}"#,
            r#"{"op":"c","after":{"id":1},"source":{"schema":"app","table":"t"}}"#,
            r#"null"#,
            r#"[1,2]"#,
            r#""text""#,
        ] {
            let parsed = envelopes.parse("t", text.as_bytes()).unwrap();
            let json = whole(text.as_bytes());
            let expected = match (json.get("schema"), json.get("payload")) {
                (Some(schema), Some(payload)) => (payload.clone(), Some(schema.clone())),
                _ => (json.clone(), None),
            };
            assert_eq!(split(&parsed), expected, "{text}");
        }
        for bad in [&b"{\"schema\":{},\"payload\":{"[..], b"not json", b""] {
            assert!(envelopes.parse("t", bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_schema_seen_before_on_the_topic_is_reused_and_a_changed_one_is_parsed() {
        let mut envelopes = Envelopes::default();
        let message = |schema: &str| format!(r#"{{"schema":{schema},"payload":{{"op":"u"}}}}"#);
        let schema_of = |parsed: Parsed| match parsed {
            Parsed::Envelope { schema, .. } => schema,
            Parsed::Whole(_) => panic!("not split"),
        };
        let first = schema_of(envelopes.parse("a", message(r#"{"v":1}"#).as_bytes()).unwrap());
        let again = schema_of(envelopes.parse("a", message(r#"{"v":1}"#).as_bytes()).unwrap());
        assert!(Arc::ptr_eq(&first, &again), "the same text on the same topic is not parsed again");
        let changed = schema_of(envelopes.parse("a", message(r#"{"v":2}"#).as_bytes()).unwrap());
        assert_eq!(*changed, serde_json::json!({"v": 2}), "a DDL change is seen at its first message");
        let other = schema_of(envelopes.parse("b", message(r#"{"v":2}"#).as_bytes()).unwrap());
        assert!(!Arc::ptr_eq(&changed, &other), "each topic has its own");
    }
}
