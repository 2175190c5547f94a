//! The source record: what evictd knows about the stream whose versions a
//! target holds, kept in the target itself, beside those versions.
//!
//! `evictd:source:<slot>` is a hash ([`SourceRecord`]) written by a
//! Postgres source before the first acknowledgement of every session: the
//! server's `system_identifier` and timeline, the database, the slot, when
//! evictd first and last streamed it, and the highest batch version whose
//! bumps it applied. It survives a restart of evictd (and a loss of the
//! slot, which is what it is for: `source::postgres::identity`), and it
//! tells a replayed batch (at or below the highest version) from versions
//! that went backwards (above it, yet behind what is stored).
//!
//! The record must outlive Redis's own losses while evictd runs: a Redis
//! that restarted empty, was flushed, or evicted the key would otherwise
//! hold no record until the next session, and a slot lost meanwhile would
//! look like a first run. So every batch of a tracked session runs
//! [`RECORD_LUA`](super::layout::RECORD_LUA), which writes the session's
//! record again, whole, when it is missing.
//!
//! **Invariants:** the highest version is written before the bumps of the
//! batch that raises it, and never lowered except by a flush after a lost
//! slot (which starts a new stream); the record of a tracked session is in
//! Redis when a batch is confirmed (written again if it went missing), so
//! before the acknowledgement of every batch; a record's fields are only
//! ever set with `HSET`, never deleted and rewritten, so a crash never
//! leaves a half-written record that reads as "never streamed".

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::conn::Runner;
use super::error::{Class, RedisCause};
use super::{Behind, RedisSink};
use crate::resolve::Effect;
use crate::sink::{SinkBatch, SinkError};

/// Prefix of source records (the slot follows).
pub(crate) const SOURCE_PREFIX: &str = "evictd:source:";

/// Longest quiet time between two "versions went backwards" warnings of one
/// target: after a restore, every batch may be behind for a while.
const BEHIND_WARNING_EVERY_MS: u64 = 60_000;

/// The source record of a slot.
pub(crate) fn source_key(slot: &str) -> String {
    format!("{SOURCE_PREFIX}{slot}")
}

/// What evictd recorded about streaming one slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SourceRecord {
    pub(crate) slot: String,
    /// `pg_control_system().system_identifier` (decimal): changes with a new
    /// cluster (initdb, a logical copy), not with a physical replica.
    pub(crate) system_identifier: String,
    /// The server's timeline: changes with a promotion.
    pub(crate) timeline: u32,
    pub(crate) database: String,
    /// Unix time in ms.
    pub(crate) first_streamed_ms: u64,
    pub(crate) last_streamed_ms: u64,
    /// The highest batch version whose bumps evictd applied (0: none).
    pub(crate) highest_version: u64,
    /// A flush after a lost slot was started and not confirmed yet.
    pub(crate) flush_pending: bool,
}

impl SourceRecord {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("slot", self.slot.clone()),
            ("system_identifier", self.system_identifier.clone()),
            ("timeline", self.timeline.to_string()),
            ("database", self.database.clone()),
            ("first_streamed_ms", self.first_streamed_ms.to_string()),
            ("last_streamed_ms", self.last_streamed_ms.to_string()),
            ("highest_version", self.highest_version.to_string()),
            ("flush_pending", u8::from(self.flush_pending).to_string()),
        ]
    }

    /// Reads a record from its hash's fields; a field that is missing or
    /// unreadable takes its default (the record still counts as one).
    pub(crate) fn from_fields(fields: &HashMap<String, String>) -> SourceRecord {
        let text = |name: &str| fields.get(name).cloned().unwrap_or_default();
        let number = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        SourceRecord {
            slot: text("slot"),
            system_identifier: text("system_identifier"),
            timeline: fields.get("timeline").and_then(|v| v.parse().ok()).unwrap_or(0),
            database: text("database"),
            first_streamed_ms: number("first_streamed_ms"),
            last_streamed_ms: number("last_streamed_ms"),
            highest_version: number("highest_version"),
            flush_pending: fields.get("flush_pending").is_some_and(|v| v == "1"),
        }
    }
}

/// The record a sink keeps up to date while a source streams: the one
/// the session wrote, with its highest version as it rose since.
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    key: String,
    record: SourceRecord,
}

impl RedisSink {
    /// The record of `slot` on this target, if there is one. An unreachable
    /// target is a transient error, never "no record".
    pub(crate) async fn read_source_record(&self, slot: &str) -> Result<Option<SourceRecord>, SinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(source_key(slot));
        let replies = self.inner.runner().pipeline("reading the source record", &mut pipe).await?;
        let Some(reply) = replies.into_iter().next() else { return Ok(None) };
        let fields: HashMap<String, String> = redis::from_redis_value(reply).map_err(|error| {
            self.inner.errors.make(Class::Definite, RedisCause::NotASourceRecord { key: source_key(slot), error })
        })?;
        Ok((!fields.is_empty()).then(|| SourceRecord::from_fields(&fields)))
    }

    /// Sets every field of `record` (one `HSET`, atomic in Redis).
    pub(crate) async fn write_source_record(&self, record: &SourceRecord) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("HSET").arg(source_key(&record.slot));
        for (name, value) in record.fields() {
            cmd.arg(name).arg(value);
        }
        self.inner.runner().pipeline("writing the source record", &mut pipe).await?;
        Ok(())
    }

    /// Deletes the record of `slot` (`evictd retire --forget-history`):
    /// whether there was one.
    pub(crate) async fn delete_source_record(&self, slot: &str) -> Result<bool, SinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(source_key(slot));
        let replies = self.inner.runner().pipeline("deleting the source record", &mut pipe).await?;
        let deleted: i64 = match replies.into_iter().next() {
            Some(reply) => redis::from_redis_value(reply).unwrap_or(0),
            None => 0,
        };
        Ok(deleted > 0)
    }

    /// From now on, every batch keeps `record` (as the session just wrote
    /// it) in this target: written again when missing, its highest version
    /// raised by batches of exact versions (Postgres).
    pub(crate) fn track_source(&self, record: &SourceRecord) {
        if let Ok(mut source) = self.inner.source.lock() {
            *source = Some(Tracked { key: source_key(&record.slot), record: record.clone() });
        }
    }

    /// One round trip of [`RECORD_LUA`](super::layout::RECORD_LUA) for a
    /// batch: the tracked record is written again if it is missing, and
    /// with `version` (before the bumps of a batch of that version) its
    /// highest version is raised to it when above. `Some(true)` if such a
    /// batch is a replay (at or below the recorded highest version),
    /// `Some(false)` if not or without `version`, `None` without a
    /// tracked record (no round trip then).
    pub(super) async fn keep_record(
        &self,
        runner: &Runner<'_>,
        version: Option<u64>,
    ) -> Result<Option<bool>, SinkError> {
        let tracked = self.inner.source.lock().ok().and_then(|source| source.clone());
        let Some(Tracked { key, record }) = tracked else { return Ok(None) };
        let raise = version.filter(|v| *v > record.highest_version);
        let now = super::now_ms();
        let whole = SourceRecord { last_streamed_ms: now, highest_version: record.highest_version, ..record };
        let mut script = redis::cmd("EVALSHA");
        script
            .arg(runner.scripts.record.get_hash())
            .arg(1)
            .arg(&key)
            .arg(raise.map(|v| v.to_string()).unwrap_or_default())
            .arg(now.to_string());
        for (name, value) in whole.fields() {
            script.arg(name).arg(value);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(script);
        let replies = runner.pipeline("keeping the source record", &mut pipe).await?;
        if let Some(redis::Value::Int(1)) = replies.first() {
            tracing::warn!(
                target = %self.inner.name,
                key = %key,
                "the source record was missing from Redis (a restart without persistence, a flush, an eviction): \
                 wrote it again, so that a later loss of the slot is still recognised"
            );
        }
        if let Some(version) = raise
            && let Ok(mut source) = self.inner.source.lock()
            && let Some(tracked) = source.as_mut()
        {
            tracked.record.highest_version = tracked.record.highest_version.max(version);
        }
        Ok(Some(version.is_some() && raise.is_none()))
    }

    /// Counts a batch's behind bumps and, outside a replay of a source of
    /// exact versions, warns (at most once a minute per target): versions
    /// went backwards.
    pub(super) async fn report_behind(
        &self,
        runner: &Runner<'_>,
        batch: &SinkBatch<'_>,
        behind: &Behind,
        exact: bool,
        replay: Option<bool>,
    ) {
        let count = behind.count.load(Ordering::Relaxed);
        if count == 0 {
            return;
        }
        let inner = &self.inner;
        inner.versions_behind.fetch_add(count, Ordering::Relaxed);
        if let Some(counter) = inner.versions_behind_metric.get() {
            counter.inc_by(count);
        }
        let key = behind.first.lock().ok().and_then(|first| first.clone()).unwrap_or_default();
        if !exact || replay == Some(true) {
            // Kafka's commit times and replays are behind by design.
            tracing::debug!(target = %inner.name, bumps = count, version = batch.version, "bumps raised past stored versions");
            return;
        }
        let now = super::now_ms();
        let last = inner.behind_warned_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < BEHIND_WARNING_EVERY_MS
            || inner.behind_warned_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key);
        let stored = match runner.pipeline("reading a version", &mut pipe).await {
            Ok(replies) => replies
                .into_iter()
                .next()
                .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok().flatten())
                .unwrap_or_default(),
            Err(_) => String::from("?"),
        };
        tracing::warn!(
            target = %inner.name,
            cache = cache_of(batch, &key).unwrap_or("?"),
            key = %key,
            batch_version = batch.version,
            stored_version = %stored,
            bumps = count,
            "versions went backwards: stored versions were at or past this batch's, which is no replay of an \
             earlier one (a restore, a failover to another cluster, another source writing to this Redis); \
             evictd raised them past what was stored, so every bump still invalidates"
        );
    }
}

/// The cache a bumped key belongs to: its namespace or a version key.
fn cache_of<'a>(batch: &'a SinkBatch<'_>, key: &str) -> Option<&'a str> {
    batch.effects.iter().find_map(|effect| {
        let cache = &batch.graph.cache(effect.cache()).name;
        let hit = match effect {
            Effect::Key { key: k, .. } => k == key,
            Effect::NamespaceBump { .. } => super::layout::namespace_key(cache) == key,
            Effect::Tag { .. } => false,
        };
        hit.then_some(&**cache)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_what_was_written_and_tolerates_missing_fields() {
        let record = SourceRecord {
            slot: "evictd".into(),
            system_identifier: "7350000000000000001".into(),
            timeline: 2,
            database: "app".into(),
            first_streamed_ms: 1,
            last_streamed_ms: 2,
            highest_version: 42,
            flush_pending: true,
        };
        let fields: HashMap<String, String> = record.fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(SourceRecord::from_fields(&fields), record);
        let partial: HashMap<String, String> = [("slot".to_owned(), "evictd".to_owned())].into();
        let read = SourceRecord::from_fields(&partial);
        assert_eq!((read.slot.as_str(), read.highest_version, read.flush_pending), ("evictd", 0, false));
        assert_eq!(source_key("evictd"), "evictd:source:evictd");
    }
}
