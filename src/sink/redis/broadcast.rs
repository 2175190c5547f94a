//! The broadcast: one pub/sub message per applied batch, so that every
//! process's local cache drops what the batch invalidated in Redis.
//!
//! Message format version 1 (JSON, documented in `docs/redis-layout.md`):
//!
//! ```json
//! {"v":1,"seq":1764000000000001,"batch":17,
//!  "position":{"kind":"postgres","commit_lsn":"0/1A2B3C8","lsn":"0/1A2B3C8"},
//!  "keys":["user:{42}:profile"],"tags":["user:42"],"flush":["feed"],
//!  "truncated":false,"published_at_ms":1764000000123}
//! ```
//!
//! **Invariants:** a message is published only after every Redis effect of
//! its batch was confirmed (a subscriber that refills from Redis right away
//! never reads what the batch deleted), and before the batch is confirmed
//! (a batch whose message was not published is never acknowledged, so it
//! is replayed and published again). `seq` grows by one per message on a
//! channel, across restarts of evictd and across active/standby takeovers
//! (it lives in Redis, see [`PUBLISH_LUA`](super::layout::PUBLISH_LUA)); a
//! replayed batch gets a new `seq`, so subscribers see at-least-once
//! delivery: a gap in `seq` means messages were missed (drop everything),
//! a repeat of the same keys is harmless.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::change::Position;
use crate::config::BroadcastConfig;
use crate::resolve::Effect;
use crate::sink::SinkBatch;

/// A message without its `v` and `seq`, which the publish script adds.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Message<'a> {
    pub(crate) batch: u64,
    pub(crate) position: Option<PositionJson<'a>>,
    /// Keys invalidated by the batch, of caches with `broadcast = true`.
    pub(crate) keys: Vec<&'a str>,
    /// Tags invalidated (every key registered under them is gone).
    pub(crate) tags: Vec<&'a str>,
    /// Caches to drop whole: namespace bumps, and caches whose keys did not
    /// fit the message (`truncated`).
    pub(crate) flush: Vec<&'a str>,
    /// Whether keys were left out (past `broadcast_max_keys`); their caches
    /// are in `flush`.
    pub(crate) truncated: bool,
    pub(crate) published_at_ms: u64,
}

/// A source position as the message carries it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum PositionJson<'a> {
    Postgres { commit_lsn: String, lsn: String },
    Kafka { topic: &'a str, partition: i32, offset: i64 },
    File { line: u64 },
}

impl<'a> PositionJson<'a> {
    fn of(position: &'a Position) -> PositionJson<'a> {
        match position {
            Position::Postgres { commit_lsn, lsn } => {
                PositionJson::Postgres { commit_lsn: commit_lsn.to_string(), lsn: lsn.to_string() }
            }
            Position::Kafka { topic, partition, offset, .. } => {
                PositionJson::Kafka { topic, partition: *partition, offset: *offset }
            }
            Position::File { line } => PositionJson::File { line: *line },
        }
    }
}

/// The message of a batch, or `None` when it invalidated nothing of a
/// broadcast cache.
pub(crate) fn message<'a>(batch: &SinkBatch<'a>, config: &BroadcastConfig, now_ms: u64) -> Option<Message<'a>> {
    let mut keys = Vec::new();
    let mut key_caches = BTreeSet::new();
    let mut tags = Vec::new();
    let mut flush = BTreeSet::new();
    for effect in batch.effects {
        let cache = batch.graph.cache(effect.cache());
        if !cache.options.broadcast {
            continue;
        }
        match effect {
            Effect::Key { key, .. } => {
                keys.push(key.as_str());
                key_caches.insert(&*cache.name);
            }
            Effect::Tag { tag, .. } => tags.push(tag.as_str()),
            Effect::NamespaceBump { .. } => {
                flush.insert(&*cache.name);
            }
        }
    }
    if keys.is_empty() && tags.is_empty() && flush.is_empty() {
        return None;
    }
    let truncated = keys.len() > config.max_keys;
    if truncated {
        keys.clear();
        flush.extend(key_caches);
    }
    tags.sort_unstable();
    tags.dedup();
    Some(Message {
        batch: batch.id,
        position: batch.position.map(PositionJson::of),
        keys,
        tags,
        flush: flush.into_iter().collect(),
        truncated,
        published_at_ms: now_ms,
    })
}

/// The message's JSON after `{"v":1,"seq":N`: it starts with `,` (or is `}`
/// alone for an empty object), as the publish script expects.
pub(crate) fn tail(message: &Message<'_>) -> Result<String, serde_json::Error> {
    let json = serde_json::to_string(message)?;
    Ok(match json.strip_prefix('{') {
        Some("}") | None => "}".to_owned(),
        Some(rest) => format!(",{rest}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Lsn;
    use crate::graph::Graph;
    use crate::resolve::Effect;

    fn graph() -> Graph {
        let text = r#"
[tables."app.users"]
key = ["id"]
columns = ["id"]
[caches.profile]
key = "user:{id}"
[[caches.profile.depends]]
table = "app.users"
[caches.quiet]
key = "quiet:{id}"
broadcast = false
[[caches.quiet.depends]]
table = "app.users"
"#;
        crate::graph::load::load_sources(&[crate::diagnostic::SourceFile::new("graph.toml", text.to_owned())]).unwrap()
    }

    fn key(graph: &Graph, cache: &str, key: &str) -> Effect {
        Effect::Key { cache: graph.cache_id(cache).unwrap(), key: key.to_owned() }
    }

    #[test]
    fn a_message_lists_broadcast_caches_only_and_its_tail_completes_the_envelope() {
        let g = graph();
        let effects = [key(&g, "profile", "user:1"), key(&g, "quiet", "quiet:1")];
        let position = Position::Postgres { commit_lsn: Lsn(0x10), lsn: Lsn(0x08) };
        let batch = SinkBatch { id: 3, graph: &g, effects: &effects, version: 16, position: Some(&position) };
        let config = BroadcastConfig { channel: "c".into(), max_keys: 10 };
        let m = message(&batch, &config, 5).unwrap();
        assert_eq!(m.keys, ["user:1"]);
        let full = format!("{{\"v\":1,\"seq\":9{}", tail(&m).unwrap());
        let json: serde_json::Value = serde_json::from_str(&full).unwrap();
        assert_eq!(json["seq"], 9);
        assert_eq!(json["batch"], 3);
        assert_eq!(json["position"]["kind"], "postgres");
        assert_eq!(json["position"]["commit_lsn"], "0/10");
        assert_eq!(json["keys"], serde_json::json!(["user:1"]));
        assert_eq!(json["truncated"], false);
    }

    #[test]
    fn too_many_keys_become_a_flush_of_their_caches_and_nothing_broadcast_is_no_message() {
        let g = graph();
        let effects = [key(&g, "profile", "user:1"), key(&g, "profile", "user:2")];
        let batch = SinkBatch { id: 1, graph: &g, effects: &effects, version: 1, position: None };
        let config = BroadcastConfig { channel: "c".into(), max_keys: 1 };
        let m = message(&batch, &config, 0).unwrap();
        assert!(m.truncated);
        assert!(m.keys.is_empty());
        assert_eq!(m.flush, ["profile"]);
        let quiet = [key(&g, "quiet", "quiet:1")];
        let batch = SinkBatch { id: 1, graph: &g, effects: &quiet, version: 1, position: None };
        assert_eq!(message(&batch, &config, 0), None);
    }
}
