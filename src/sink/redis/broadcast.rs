//! The broadcast: one message per applied batch, so that every process's
//! local cache drops what the batch invalidated in Redis, and heartbeats, so
//! that a quiet channel still reveals a loss and applications can wait
//! until their own write was applied.
//!
//! Message format version 2 (JSON; the contract is `docs/broadcast.md`):
//!
//! ```json
//! {"v":2,"kind":"batch","epoch":"1764000000000000","seq":1764000000000417,
//!  "batch":17,"position":{"kind":"postgres","commit_lsn":"0/1A2B3C8","lsn":"0/1A2B3C8"},
//!  "committed_at_ms":1764000000101,"applied":{"kind":"postgres","lsn":"0/1A2B400"},
//!  "caches":["user_profile"],"keys":["user:{42}:profile"],"tags":["user:42"],"flush":["feed"],
//!  "truncated":false,"published_at_ms":1764000000123}
//! ```
//!
//! This module builds the parts evictd knows ([`Head`], [`Tail`], the
//! applied position); the publish script ([`PUBLISH_LUA`]) adds `v`,
//! `kind`, `epoch`, `seq` and the stored `applied`, atomically with the
//! channel's sequence, its `touched` hash and its stream. [`Envelope`]
//! reads any message back (the conformance vectors, the subscribers).
//!
//! **Invariants:** a batch's message is published only after every Redis
//! effect of its batch was confirmed (a subscriber that refills from Redis
//! right away never reads what the batch deleted), and before the batch is
//! confirmed (a batch whose message was not published is never
//! acknowledged, so it is replayed and published again). `seq` grows by
//! one per message on a channel, across restarts of evictd and
//! active/standby takeovers (it lives in Redis); it restarts, with a new
//! `epoch` above every `seq` the publishing process saw, only when it may
//! have gone back: Redis lost it, restarted or was replaced since the last
//! publish (its `run_id`), or holds one below what the process saw
//! ([`Seen`]). A subscriber never takes a message for a repeat because
//! Redis went back in time (the limits: `docs/broadcast.md`). `applied` is a position up to which
//! every change is confirmed on the target: the batch's own last position
//! (its effects on this target are confirmed when the message goes out, and
//! every earlier batch was), or the last one the run loop acknowledged; it
//! only rises, in the process and in Redis.
//!
//! [`PUBLISH_LUA`]: super::layout::PUBLISH_LUA

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::change::{Lsn, Position};
use crate::config::{BroadcastConfig, Transport};
use crate::resolve::Effect;
use crate::sink::SinkBatch;

/// The format version this evictd writes.
pub const VERSION: u64 = 2;

/// A batch's message, as evictd builds it before the script completes it.
#[derive(Debug, PartialEq)]
pub(crate) struct BatchMessage<'a> {
    pub(crate) head: Head<'a>,
    pub(crate) tail: Tail<'a>,
    /// Every cache the message touches (`caches` ∪ `flush`): their
    /// `touched` fields get the message's `seq`.
    pub(crate) touched: Vec<&'a str>,
}

/// The fields between `seq` and `applied`.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Head<'a> {
    pub(crate) batch: u64,
    pub(crate) position: Option<PositionJson<'a>>,
    /// The source's commit time of the batch's last transaction, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) committed_at_ms: Option<u64>,
}

/// The fields after `applied`.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Tail<'a> {
    /// The caches of `keys`, sorted.
    pub(crate) caches: Vec<&'a str>,
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

/// A heartbeat's fields after `applied`.
#[derive(Debug, Serialize, PartialEq)]
struct HeartbeatTail {
    published_at_ms: u64,
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

/// The transports one publish goes out on, as the `transport` label of
/// `evictd_broadcast_publishes_total` names them (`both`: one script call
/// publishes on pub/sub and appends to the stream).
pub(crate) fn transports(transport: Transport) -> &'static [&'static str] {
    match transport {
        Transport::Both => &["pubsub", "stream"],
        Transport::PubSub => &["pubsub"],
        Transport::Stream => &["stream"],
    }
}

/// The applied position a source kind publishes: Postgres positions only
/// (the end of the last applied commit record, or a keepalive's WAL
/// position). Kafka positions are per partition, not comparable with a
/// commit LSN: none.
pub(crate) fn applied_lsn(position: &Position) -> Option<Lsn> {
    match position {
        Position::Postgres { lsn, .. } => Some(*lsn),
        Position::Kafka { .. } | Position::File { .. } => None,
    }
}

/// The `applied` hash field of Postgres positions.
pub(crate) const APPLIED_POSTGRES: &str = "postgres";

/// The message of a batch, or `None` when it invalidated nothing of a
/// broadcast cache.
pub(crate) fn message<'a>(batch: &SinkBatch<'a>, config: &BroadcastConfig, now_ms: u64) -> Option<BatchMessage<'a>> {
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
    let caches = if truncated {
        keys.clear();
        flush.extend(key_caches);
        Vec::new()
    } else {
        key_caches.into_iter().collect()
    };
    tags.sort_unstable();
    tags.dedup();
    let touched = caches.iter().chain(&flush).copied().collect::<BTreeSet<_>>().into_iter().collect();
    Some(BatchMessage {
        head: Head {
            batch: batch.id,
            position: batch.position.map(PositionJson::of),
            committed_at_ms: batch.commit_time_micros.and_then(|micros| u64::try_from(micros / 1000).ok()),
        },
        tail: Tail { caches, keys, tags, flush: flush.into_iter().collect(), truncated, published_at_ms: now_ms },
        touched,
    })
}

/// An object's JSON without its braces, after a `,` (empty for `{}`): what
/// the script splices in after `seq`.
fn fields(json: &str) -> String {
    match json.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) {
        Some("") | None => String::new(),
        Some(inner) => format!(",{inner}"),
    }
}

impl BatchMessage<'_> {
    /// The script's ARGV 7 (`,"batch":…,"position":…`) and ARGV 8 (from
    /// `,"caches"` to the closing `}`).
    pub(crate) fn parts(&self) -> Result<(String, String), serde_json::Error> {
        let head = fields(&serde_json::to_string(&self.head)?);
        let tail = format!("{}}}", fields(&serde_json::to_string(&self.tail)?));
        Ok((head, tail))
    }

    /// Whether the message has tags (the `*tags` field of `touched`).
    pub(crate) fn has_tags(&self) -> bool {
        !self.tail.tags.is_empty()
    }
}

/// What the publish script answered: `{seq, epoch, why}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) seq: u64,
    pub(crate) epoch: String,
    /// Why a new sequence started (`lost`, `server`, `behind`), or empty.
    pub(crate) why: String,
}

impl Reply {
    /// `None` for anything but the script's three values.
    pub(crate) fn read(value: &redis::Value) -> Option<Reply> {
        let (seq, epoch, why): (u64, String, String) = redis::from_redis_value_ref(value).ok()?;
        Some(Reply { seq, epoch, why })
    }
}

/// The highest `(epoch, seq)` a process saw on a channel: epochs compared
/// as numbers (a new one always starts above every number its starter
/// knew of), then `seq`. What the publish script compares the stored
/// sequence with (ARGV 10 and 11 of `PUBLISH_LUA`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) epoch: String,
    pub(crate) seq: u64,
}

impl Seen {
    /// Raises `seen` to `reply`'s position if that is higher. A reply of a
    /// lower epoch (one that arrived late, or a Redis that went back) is
    /// not taken: the next publish starts a new epoch above `seen` then.
    pub(crate) fn raise(seen: &mut Option<Seen>, reply: &Reply) {
        let Ok(epoch) = reply.epoch.parse::<u64>() else { return };
        let higher = match seen.as_ref().map(|s| (s.epoch.parse::<u64>().unwrap_or(0), s.seq)) {
            None => true,
            Some(current) => (epoch, reply.seq) > current,
        };
        if higher {
            *seen = Some(Seen { epoch: reply.epoch.clone(), seq: reply.seq });
        }
    }
}

/// The warning for a new sequence started for `why` (`server`, `behind`).
pub(crate) fn new_epoch_reason(why: &str) -> &'static str {
    match why {
        "server" => {
            "Redis restarted or another server took over since the last publish (its run_id changed): it may hold an \
             older snapshot, so evictd started a new broadcast epoch; subscribers flush their local caches once"
        }
        "behind" => {
            "the broadcast's sequence in Redis is below one evictd already saw (Redis went back in time): evictd \
             started a new broadcast epoch; subscribers flush their local caches once"
        }
        _ => "evictd started a new broadcast epoch; subscribers flush their local caches once",
    }
}

/// A heartbeat's ARGV 8: `,"published_at_ms":N}`.
pub(crate) fn heartbeat_tail(now_ms: u64) -> Result<String, serde_json::Error> {
    Ok(format!("{}}}", fields(&serde_json::to_string(&HeartbeatTail { published_at_ms: now_ms })?)))
}

/// Any broadcast message, read back: every field of version 2 is optional
/// here, so a message of another version or kind still reads (and says so
/// through [`Envelope::v`] and [`Envelope::kind`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Envelope {
    /// The format version; a subscriber that does not know it flushes.
    pub v: u64,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub epoch: Option<String>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub batch: Option<u64>,
    #[serde(default)]
    pub position: Option<WirePosition>,
    #[serde(default)]
    pub committed_at_ms: Option<u64>,
    #[serde(default)]
    pub applied: Option<WireApplied>,
    #[serde(default)]
    pub caches: Vec<String>,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub flush: Vec<String>,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub published_at_ms: Option<u64>,
}

/// A message's `position`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WirePosition {
    Postgres { commit_lsn: String, lsn: String },
    Kafka { topic: String, partition: i32, offset: i64 },
    File { line: u64 },
}

/// A message's `applied`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WireApplied {
    /// `lsn` as Postgres prints it (`X/Y`); parse it with [`Lsn`]'s `FromStr`.
    Postgres { lsn: String },
}

impl Envelope {
    /// Reads a message. A version other than 2 reads as far as `v`: its
    /// other fields are not interpreted (they may mean something else).
    pub fn parse(text: &str) -> Result<Envelope, serde_json::Error> {
        #[derive(Deserialize)]
        struct Version {
            v: u64,
        }
        let Version { v } = serde_json::from_str(text)?;
        if v != VERSION {
            return Ok(Envelope {
                v,
                kind: None,
                epoch: None,
                seq: None,
                batch: None,
                position: None,
                committed_at_ms: None,
                applied: None,
                caches: Vec::new(),
                keys: Vec::new(),
                tags: Vec::new(),
                flush: Vec::new(),
                truncated: false,
                published_at_ms: None,
            });
        }
        serde_json::from_str(text)
    }
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

    /// What the publish script makes of the parts (`PUBLISH_LUA`), for
    /// golden strings: the integration tests check the script against it.
    fn assembled(kind: &str, epoch: &str, seq: u64, head: &str, applied: Option<&str>, tail: &str) -> String {
        let applied =
            applied.map(|lsn| format!(",\"applied\":{{\"kind\":\"postgres\",\"lsn\":\"{lsn}\"}}")).unwrap_or_default();
        format!("{{\"v\":2,\"kind\":\"{kind}\",\"epoch\":\"{epoch}\",\"seq\":{seq}{head}{applied}{tail}")
    }

    #[test]
    fn a_batch_with_a_commit_time_carries_it_in_ms() {
        let g = graph();
        let effects = [key(&g, "profile", "user:{42}:profile")];
        let position = Position::Postgres { commit_lsn: Lsn(0x1A2B3C8), lsn: Lsn(0x1A2B3C8) };
        let batch = SinkBatch {
            id: 17,
            graph: &g,
            effects: &effects,
            version: 16,
            position: Some(&position),
            commit_time_micros: Some(1_764_000_000_101_999),
        };
        let m = message(&batch, &BroadcastConfig::new("c"), 1764000000123).unwrap();
        let (head, _) = m.parts().unwrap();
        assert!(head.contains(r#""committed_at_ms":1764000000101"#), "{head}");
    }

    #[test]
    fn a_batch_message_is_the_documented_json_byte_for_byte() {
        let g = graph();
        let effects = [
            key(&g, "profile", "user:{42}:profile"),
            key(&g, "quiet", "quiet:1"),
            Effect::Tag { cache: g.cache_id("profile").unwrap(), tag: "user:42".into() },
        ];
        let position = Position::Postgres { commit_lsn: Lsn(0x1A2B3C8), lsn: Lsn(0x1A2B3C8) };
        let batch = SinkBatch {
            id: 17,
            graph: &g,
            effects: &effects,
            version: 16,
            position: Some(&position),
            commit_time_micros: None,
        };
        let m = message(&batch, &BroadcastConfig::new("c"), 1764000000123).unwrap();
        let (head, tail) = m.parts().unwrap();
        assert_eq!(head, r#","batch":17,"position":{"kind":"postgres","commit_lsn":"0/1A2B3C8","lsn":"0/1A2B3C8"}"#);
        assert_eq!(
            tail,
            r#","caches":["profile"],"keys":["user:{42}:profile"],"tags":["user:42"],"flush":[],"truncated":false,"published_at_ms":1764000000123}"#
        );
        assert_eq!(m.touched, ["profile"]);
        assert!(m.has_tags());
        let full = assembled("batch", "1764000000000000", 1764000000000417, &head, Some("0/1A2B400"), &tail);
        assert_eq!(
            full,
            concat!(
                r#"{"v":2,"kind":"batch","epoch":"1764000000000000","seq":1764000000000417,"#,
                r#""batch":17,"position":{"kind":"postgres","commit_lsn":"0/1A2B3C8","lsn":"0/1A2B3C8"},"#,
                r#""applied":{"kind":"postgres","lsn":"0/1A2B400"},"#,
                r#""caches":["profile"],"keys":["user:{42}:profile"],"tags":["user:42"],"flush":[],"#,
                r#""truncated":false,"published_at_ms":1764000000123}"#
            )
        );
        let read = Envelope::parse(&full).unwrap();
        assert_eq!(read.seq, Some(1764000000000417));
        assert_eq!(read.applied, Some(WireApplied::Postgres { lsn: "0/1A2B400".into() }));
        assert_eq!(read.keys, ["user:{42}:profile"]);
    }

    #[test]
    fn a_heartbeat_carries_only_its_envelope_the_applied_position_and_the_time() {
        let tail = heartbeat_tail(1764000001123).unwrap();
        assert_eq!(tail, r#","published_at_ms":1764000001123}"#);
        assert_eq!(
            assembled("heartbeat", "1764000000000000", 1764000000000417, "", Some("0/1A2B400"), &tail),
            r#"{"v":2,"kind":"heartbeat","epoch":"1764000000000000","seq":1764000000000417,"applied":{"kind":"postgres","lsn":"0/1A2B400"},"published_at_ms":1764000001123}"#
        );
        // Kafka: no applied position.
        assert_eq!(
            assembled("heartbeat", "5", 9, "", None, &tail),
            r#"{"v":2,"kind":"heartbeat","epoch":"5","seq":9,"published_at_ms":1764000001123}"#
        );
        let kafka = Position::Kafka { topic: "t".into(), partition: 0, offset: 1, seq: 1, version: 1 };
        assert_eq!(applied_lsn(&kafka), None);
        assert_eq!(applied_lsn(&Position::Postgres { commit_lsn: Lsn(1), lsn: Lsn(2) }), Some(Lsn(2)));
    }

    #[test]
    fn too_many_keys_become_a_flush_of_their_caches_and_nothing_broadcast_is_no_message() {
        let g = graph();
        let effects = [
            key(&g, "profile", "user:1"),
            key(&g, "profile", "user:2"),
            Effect::NamespaceBump { cache: g.cache_id("quiet").unwrap() },
        ];
        let batch =
            SinkBatch { id: 1, graph: &g, effects: &effects, version: 1, position: None, commit_time_micros: None };
        let config = BroadcastConfig { max_keys: 1, ..BroadcastConfig::new("c") };
        let m = message(&batch, &config, 0).unwrap();
        assert!(m.tail.truncated);
        assert!(m.tail.keys.is_empty() && m.tail.caches.is_empty());
        assert_eq!(m.tail.flush, ["profile"]);
        assert_eq!(m.touched, ["profile"]);
        assert_eq!(m.parts().unwrap().0, r#","batch":1,"position":null"#);
        let quiet = [key(&g, "quiet", "quiet:1")];
        let batch =
            SinkBatch { id: 1, graph: &g, effects: &quiet, version: 1, position: None, commit_time_micros: None };
        assert_eq!(message(&batch, &config, 0), None);
    }

    #[test]
    fn the_highest_position_seen_only_rises_epochs_compared_as_numbers() {
        let reply = |epoch: &str, seq| Reply { seq, epoch: epoch.into(), why: String::new() };
        let mut seen = None;
        Seen::raise(&mut seen, &reply("100", 105));
        Seen::raise(&mut seen, &reply("100", 103));
        assert_eq!(seen, Some(Seen { epoch: "100".into(), seq: 105 }), "a late reply");
        // "99" > "100" as text; as numbers it is an older epoch.
        Seen::raise(&mut seen, &reply("99", 200));
        assert_eq!(seen, Some(Seen { epoch: "100".into(), seq: 105 }));
        Seen::raise(&mut seen, &reply("106", 107));
        assert_eq!(seen, Some(Seen { epoch: "106".into(), seq: 107 }), "a new epoch");
        Seen::raise(&mut seen, &reply("not a number", 1_000));
        assert_eq!(seen.map(|s| s.seq), Some(107));
        let value = redis::Value::Array(vec![
            redis::Value::Int(42),
            redis::Value::BulkString(b"41".to_vec()),
            redis::Value::BulkString(b"server".to_vec()),
        ]);
        assert_eq!(Reply::read(&value), Some(Reply { seq: 42, epoch: "41".into(), why: "server".into() }));
        assert_eq!(Reply::read(&redis::Value::Int(42)), None);
    }

    #[test]
    fn another_version_reads_as_far_as_its_version() {
        let read = Envelope::parse(r#"{"v":3,"seq":"not a number","anything":[1]}"#).unwrap();
        assert_eq!(read.v, 3);
        assert_eq!(read.seq, None);
        let read = Envelope::parse(r#"{"v":2,"kind":"snapshot","epoch":"1","seq":2}"#).unwrap();
        assert_eq!(read.kind.as_deref(), Some("snapshot"));
        assert!(Envelope::parse(r#"{"seq":1}"#).is_err());
    }
}
