//! Metrics: every metric evictd exports, and the only code that touches them.
//!
//! One [`Metrics`] is created at start-up and shared by `Arc`; it owns its
//! [`Registry`] (no global state), and creating it describes every metric
//! (name, help, unit). Callers record through small typed methods
//! ([`Metrics::changes_received`], [`Metrics::positions`], …) and never see a
//! label set.
//!
//! Rules (vector's `docs/specs/instrumentation.md`):
//! - names are the constants below, exactly as exposed: `evictd_<noun>_<unit>`,
//!   counters end in `_total`, units are seconds and bytes;
//! - labels take bounded values only — table, cache and target names from the
//!   graph and the config, and fixed words (`op`, `kind`, `action`,
//!   `reason`) — never a key, a tag or a position;
//! - record per batch, not per key: the methods take counts.
//!
//! The standard `process_*` metrics (CPU, memory, file descriptors, start
//! time) are read from `/proc` at each scrape (`process.rs`); what cannot
//! be read is left out of that scrape, never an error.
//!
//! The text is OpenMetrics 1.0 (what `prometheus-client` writes: counters
//! typed under their name without `_total`, `# UNIT` lines, a closing
//! `# EOF`), served with [`OPENMETRICS_CONTENT_TYPE`].

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::change::{Lsn, Operation};
use crate::dead_letter::DeadLetterReason;
use crate::graph::Action;

/// The content type of [`Metrics::encode`]'s text.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) const CHANGES_RECEIVED_TOTAL: &str = "evictd_changes_received_total";
pub(crate) const EFFECTS_RESOLVED_TOTAL: &str = "evictd_effects_resolved_total";
pub(crate) const BATCH_EFFECTS: &str = "evictd_batch_effects";
pub(crate) const BATCH_DURATION_SECONDS: &str = "evictd_batch_duration_seconds";
pub(crate) const COMMIT_TO_APPLIED_SECONDS: &str = "evictd_commit_to_applied_seconds";
pub(crate) const POSITION_RECEIVED_BYTES: &str = "evictd_position_received_bytes";
pub(crate) const POSITION_RESOLVED_BYTES: &str = "evictd_position_resolved_bytes";
pub(crate) const POSITION_APPLIED_BYTES: &str = "evictd_position_applied_bytes";
pub(crate) const POSITION_ACKNOWLEDGED_BYTES: &str = "evictd_position_acknowledged_bytes";
pub(crate) const POSITION_WAL_END_BYTES: &str = "evictd_position_wal_end_bytes";
pub(crate) const SOURCE_LAG_BYTES: &str = "evictd_source_lag_bytes";
pub(crate) const SINK_ERRORS_TOTAL: &str = "evictd_sink_errors_total";
pub(crate) const SINK_RETRIES_TOTAL: &str = "evictd_sink_retries_total";
pub(crate) const DEAD_LETTERS_TOTAL: &str = "evictd_dead_letters_total";
pub(crate) const DEAD_LETTER_WRITE_ERRORS_TOTAL: &str = "evictd_dead_letter_write_errors_total";
pub(crate) const LOOKUP_QUERIES_TOTAL: &str = "evictd_lookup_queries_total";
pub(crate) const LOOKUP_ROWS_TOTAL: &str = "evictd_lookup_rows_total";
pub(crate) const LOOKUP_FANOUT_OVERFLOWS_TOTAL: &str = "evictd_lookup_fanout_overflows_total";
pub(crate) const BUILD_INFO: &str = "evictd_build_info";
pub(crate) const ACTIVE: &str = "evictd_active";
pub(crate) const KAFKA_MESSAGES_TOTAL: &str = "evictd_kafka_messages_total";
pub(crate) const KAFKA_CONSUMER_LAG_MESSAGES: &str = "evictd_kafka_consumer_lag_messages";
pub(crate) const KAFKA_DEAD_LETTERS_TOTAL: &str = "evictd_kafka_dead_letters_total";
pub(crate) const KAFKA_REBALANCES_TOTAL: &str = "evictd_kafka_rebalances_total";
pub(crate) const KAFKA_DEAD_LETTER_PRODUCER_RESETS_TOTAL: &str = "evictd_kafka_dead_letter_producer_resets_total";
pub(crate) const UNGUARDED_KEYS_TOTAL: &str = "evictd_unguarded_keys_total";
pub(crate) const REDELETES_SKIPPED_TOTAL: &str = "evictd_redeletes_skipped_total";
pub(crate) const UNBUMPABLE_KEYS_TOTAL: &str = "evictd_unbumpable_keys_total";
pub(crate) const VERSIONS_BEHIND_TOTAL: &str = "evictd_versions_behind_total";
pub(crate) const KAFKA_OFFSET_RESETS_TOTAL: &str = "evictd_kafka_offset_resets_total";
pub(crate) const SINK_SECOND_DELETE_FAILURES_TOTAL: &str = "evictd_sink_second_delete_failures_total";
pub(crate) const BROADCAST_PUBLISHES_TOTAL: &str = "evictd_broadcast_publishes_total";
pub(crate) const SINK_UP: &str = "evictd_sink_up";
pub(crate) const KAFKA_POSITION_OFFSET: &str = "evictd_kafka_position_offset";
pub(crate) const KAFKA_COMMITTED_OFFSET: &str = "evictd_kafka_committed_offset";
pub(crate) const KAFKA_HIGH_WATERMARK_OFFSET: &str = "evictd_kafka_high_watermark_offset";
pub(crate) const LAST_PROGRESS_TIMESTAMP_SECONDS: &str = "evictd_last_progress_timestamp_seconds";
pub(crate) const LAST_CHANGE_TIMESTAMP_SECONDS: &str = "evictd_last_change_timestamp_seconds";
pub(crate) const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "evictd_http_connections_refused_total";
pub(crate) const OPERATOR_ACTIONS_TOTAL: &str = "evictd_operator_actions_total";

/// Whether this replica consumes the source or waits to take over (the
/// `evictd_active` gauge here, and `/readyz` in `server`, which imports it
/// from this module: metrics import nothing from the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

/// Every name above, for the tests.
#[cfg(test)]
pub(crate) const ALL: [&str; 39] = [
    CHANGES_RECEIVED_TOTAL,
    EFFECTS_RESOLVED_TOTAL,
    BATCH_EFFECTS,
    BATCH_DURATION_SECONDS,
    COMMIT_TO_APPLIED_SECONDS,
    POSITION_RECEIVED_BYTES,
    POSITION_RESOLVED_BYTES,
    POSITION_APPLIED_BYTES,
    POSITION_ACKNOWLEDGED_BYTES,
    POSITION_WAL_END_BYTES,
    SOURCE_LAG_BYTES,
    SINK_ERRORS_TOTAL,
    SINK_RETRIES_TOTAL,
    DEAD_LETTERS_TOTAL,
    DEAD_LETTER_WRITE_ERRORS_TOTAL,
    LOOKUP_QUERIES_TOTAL,
    LOOKUP_ROWS_TOTAL,
    LOOKUP_FANOUT_OVERFLOWS_TOTAL,
    BUILD_INFO,
    ACTIVE,
    KAFKA_MESSAGES_TOTAL,
    KAFKA_CONSUMER_LAG_MESSAGES,
    KAFKA_DEAD_LETTERS_TOTAL,
    KAFKA_REBALANCES_TOTAL,
    UNGUARDED_KEYS_TOTAL,
    REDELETES_SKIPPED_TOTAL,
    UNBUMPABLE_KEYS_TOTAL,
    VERSIONS_BEHIND_TOTAL,
    KAFKA_OFFSET_RESETS_TOTAL,
    SINK_SECOND_DELETE_FAILURES_TOTAL,
    BROADCAST_PUBLISHES_TOTAL,
    SINK_UP,
    KAFKA_POSITION_OFFSET,
    KAFKA_COMMITTED_OFFSET,
    KAFKA_HIGH_WATERMARK_OFFSET,
    LAST_PROGRESS_TIMESTAMP_SECONDS,
    LAST_CHANGE_TIMESTAMP_SECONDS,
    HTTP_CONNECTIONS_REFUSED_TOTAL,
    OPERATOR_ACTIONS_TOTAL,
];

/// Latency buckets, 0.5 ms to 60 s: a healthy invalidation lands in
/// milliseconds, a stalled one in tens of seconds.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Effects per batch; `batch.max_effects` defaults to 1000, and look-ups can
/// push a batch past it.
const BATCH_EFFECTS_BUCKETS: [f64; 13] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

/// What an effect does, as the `kind` and `action` labels of
/// [`EFFECTS_RESOLVED_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalidation {
    /// A key, with its cache's action.
    Key(Action),
    /// Every key registered under a tag, with its cache's action.
    Tag(Action),
    /// The cache's namespace version was bumped (`action="bump"`).
    NamespaceBump,
}

impl Invalidation {
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Invalidation::Key(action) => ("key", action.as_str()),
            Invalidation::Tag(action) => ("tag", action.as_str()),
            Invalidation::NamespaceBump => ("namespace", "bump"),
        }
    }
}

/// The position ladder of a Postgres source, as LSNs (byte offsets in the
/// WAL): each rung is at or behind the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PositionLadder {
    /// The server's WAL end, as last reported by a keepalive or XLogData.
    pub(crate) wal_end: Lsn,
    /// The last change read from the stream.
    pub(crate) received: Lsn,
    /// The last change whose effects are resolved (look-ups done).
    pub(crate) resolved: Lsn,
    /// The last change whose batch every sink confirmed.
    pub(crate) applied: Lsn,
    /// The position acknowledged to the server (the contiguous watermark).
    pub(crate) acknowledged: Lsn,
}

impl PositionLadder {
    /// WAL the server retains for us: its WAL end minus what we acknowledged.
    pub(crate) fn lag_bytes(&self) -> u64 {
        self.wal_end.0.saturating_sub(self.acknowledged.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableOp {
    table: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheKindAction {
    cache: String,
    kind: &'static str,
    action: &'static str,
}

/// The class of a sink error, as [`SINK_ERRORS_TOTAL`]'s `kind` label
/// reads it (the classes of `sink::SinkError`, named here so that metrics
/// need not know the sink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SinkErrorKind {
    Transient,
    Definite,
}

impl SinkErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            SinkErrorKind::Transient => "transient",
            SinkErrorKind::Definite => "definite",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetKind {
    target: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableReason {
    table: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabel {
    cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetCache {
    target: String,
    cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicOp {
    topic: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicPartition {
    topic: String,
    partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicReason {
    topic: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BroadcastLabels {
    target: String,
    transport: &'static str,
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperatorLabels {
    target: String,
    action: String,
    outcome: String,
}

/// At most this many `evictd_operator_actions_total` series: their labels
/// come from Redis, whose hash anyone can write to.
const OPERATOR_ACTION_SERIES_MAX: usize = 200;

type PositionGauge = Gauge<u64, std::sync::atomic::AtomicU64>;
type TimestampGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// What a broadcast publish carried, as the `kind` label of
/// [`BROADCAST_PUBLISHES_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BroadcastKind {
    /// A batch's message.
    Batch,
    /// A heartbeat (pub/sub only).
    Heartbeat,
}

impl BroadcastKind {
    fn as_str(self) -> &'static str {
        match self {
            BroadcastKind::Batch => "batch",
            BroadcastKind::Heartbeat => "heartbeat",
        }
    }
}

/// One assigned Kafka partition's offsets, as librdkafka last reported
/// them (its statistics); `None` where it knows none yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct KafkaOffsets {
    /// The next offset the application consumes (the last delivered + 1).
    pub(crate) position: Option<i64>,
    /// The group's committed offset: where a new owner would resume.
    pub(crate) committed: Option<i64>,
    /// The broker's high watermark (the offset the next message will get).
    pub(crate) high_watermark: Option<i64>,
    /// Messages not yet acknowledged.
    pub(crate) lag: Option<i64>,
}

/// Now as Unix seconds, to the microsecond (0 before 1970).
fn unix_now_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// All of evictd's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    changes_received: Family<TableOp, Counter>,
    effects_resolved: Family<CacheKindAction, Counter>,
    batch_effects: Histogram,
    batch_duration: Histogram,
    commit_to_applied: Histogram,
    received: PositionGauge,
    resolved: PositionGauge,
    applied: PositionGauge,
    acknowledged: PositionGauge,
    wal_end: PositionGauge,
    source_lag: PositionGauge,
    sink_errors: Family<TargetKind, Counter>,
    sink_retries: Family<TargetLabel, Counter>,
    dead_letters: Family<TableReason, Counter>,
    dead_letter_write_errors: Family<KindLabel, Counter>,
    lookup_queries: Family<CacheLabel, Counter>,
    lookup_rows: Family<CacheLabel, Counter>,
    fanout_overflows: Family<CacheLabel, Counter>,
    active: Gauge,
    kafka_messages: Family<TopicOp, Counter>,
    kafka_lag: Family<TopicPartition, Gauge>,
    kafka_dead_letters: Family<TopicReason, Counter>,
    kafka_rebalances: Family<KindLabel, Counter>,
    kafka_dead_letter_producer_resets: Counter,
    unguarded_keys: Family<TargetCache, Counter>,
    redeletes_skipped: Family<TargetLabel, Counter>,
    unbumpable_keys: Family<TargetCache, Counter>,
    versions_behind: Family<TargetLabel, Counter>,
    kafka_offset_resets: Family<ActionLabel, Counter>,
    second_delete_failures: Family<TargetLabel, Counter>,
    broadcast_publishes: Family<BroadcastLabels, Counter>,
    sink_up: Family<TargetLabel, Gauge>,
    kafka_position: Family<TopicPartition, Gauge>,
    kafka_committed: Family<TopicPartition, Gauge>,
    kafka_high_watermark: Family<TopicPartition, Gauge>,
    last_progress: TimestampGauge,
    last_change: TimestampGauge,
    http_refused: Counter,
    operator_actions: Family<OperatorLabels, Counter>,
    operator_action_series: std::sync::atomic::AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and describes every metric. The role starts as active, the
    /// state of a replica that runs no leader election.
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            changes_received: Family::default(),
            effects_resolved: Family::default(),
            batch_effects: Histogram::new(BATCH_EFFECTS_BUCKETS),
            batch_duration: Histogram::new(LATENCY_BUCKETS),
            commit_to_applied: Histogram::new(LATENCY_BUCKETS),
            received: PositionGauge::default(),
            resolved: PositionGauge::default(),
            applied: PositionGauge::default(),
            acknowledged: PositionGauge::default(),
            wal_end: PositionGauge::default(),
            source_lag: PositionGauge::default(),
            sink_errors: Family::default(),
            sink_retries: Family::default(),
            dead_letters: Family::default(),
            dead_letter_write_errors: Family::default(),
            lookup_queries: Family::default(),
            lookup_rows: Family::default(),
            fanout_overflows: Family::default(),
            active: Gauge::default(),
            kafka_messages: Family::default(),
            kafka_lag: Family::default(),
            kafka_dead_letters: Family::default(),
            kafka_rebalances: Family::default(),
            kafka_dead_letter_producer_resets: Counter::default(),
            unguarded_keys: Family::default(),
            redeletes_skipped: Family::default(),
            unbumpable_keys: Family::default(),
            versions_behind: Family::default(),
            kafka_offset_resets: Family::default(),
            second_delete_failures: Family::default(),
            broadcast_publishes: Family::default(),
            sink_up: Family::default(),
            kafka_position: Family::default(),
            kafka_committed: Family::default(),
            kafka_high_watermark: Family::default(),
            last_progress: TimestampGauge::default(),
            last_change: TimestampGauge::default(),
            http_refused: Counter::default(),
            operator_actions: Family::default(),
            operator_action_series: std::sync::atomic::AtomicUsize::new(0),
        };
        let r = &mut m.registry;
        let help = "Row changes received from the source, by table and operation";
        register(r, CHANGES_RECEIVED_TOTAL, help, m.changes_received.clone());
        let help = "Effects resolved, by cache, kind (key, tag, namespace) and action";
        register(r, EFFECTS_RESOLVED_TOTAL, help, m.effects_resolved.clone());
        register(r, BATCH_EFFECTS, "Distinct effects per applied batch", m.batch_effects.clone());
        let help = "Time from a batch being closed to every sink confirming it";
        register(r, BATCH_DURATION_SECONDS, help, m.batch_duration.clone());
        let help = "Time from a transaction's commit at the source to its batch being applied";
        register(r, COMMIT_TO_APPLIED_SECONDS, help, m.commit_to_applied.clone());
        let help = "LSN of the last change received from the source";
        register(r, POSITION_RECEIVED_BYTES, help, m.received.clone());
        let help = "LSN of the last change whose effects are resolved";
        register(r, POSITION_RESOLVED_BYTES, help, m.resolved.clone());
        let help = "LSN of the last change every sink has applied";
        register(r, POSITION_APPLIED_BYTES, help, m.applied.clone());
        let help = "LSN acknowledged to the source (the contiguous confirmed watermark)";
        register(r, POSITION_ACKNOWLEDGED_BYTES, help, m.acknowledged.clone());
        let help = "The source server's WAL end LSN, as last reported";
        register(r, POSITION_WAL_END_BYTES, help, m.wal_end.clone());
        let help = "WAL the source retains for evictd: server WAL end minus acknowledged LSN";
        register(r, SOURCE_LAG_BYTES, help, m.source_lag.clone());
        let help = "Failed batch applications, by sink target and kind (transient, definite)";
        register(r, SINK_ERRORS_TOTAL, help, m.sink_errors.clone());
        let help = "Batch applications retried after a transient error, by sink target";
        register(r, SINK_RETRIES_TOTAL, help, m.sink_retries.clone());
        let help = "Changes written to the dead-letter destination (table or topic), by table and reason (lookup_failed, lookup_attempts_exhausted)";
        register(r, DEAD_LETTERS_TOTAL, help, m.dead_letters.clone());
        let help = "Failed writes to the dead-letter table, by kind (transient: retried, definite: the daemon stops)";
        register(r, DEAD_LETTER_WRITE_ERRORS_TOTAL, help, m.dead_letter_write_errors.clone());
        register(r, LOOKUP_QUERIES_TOTAL, "Look-up queries run, by cache", m.lookup_queries.clone());
        register(r, LOOKUP_ROWS_TOTAL, "Rows returned by look-up queries, by cache", m.lookup_rows.clone());
        let help = "Look-ups past their fan-out limit, answered by a namespace bump of the cache, by cache";
        register(r, LOOKUP_FANOUT_OVERFLOWS_TOTAL, help, m.fanout_overflows.clone());
        let build = Family::<VersionLabel, Gauge>::default();
        build.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
        register(r, BUILD_INFO, "Always 1; the version label is evictd's version", build);
        let help = "1 while this replica is the active consumer, 0 while it is a standby";
        register(r, ACTIVE, help, m.active.clone());
        let help = "Kafka messages consumed, by topic and op (c, u, d, t, r, tombstone, transaction, heartbeat, schema_change, invalid)";
        register(r, KAFKA_MESSAGES_TOTAL, help, m.kafka_messages.clone());
        let help = "Messages of an assigned partition not yet acknowledged: evictd_kafka_high_watermark_offset minus evictd_kafka_committed_offset (before the group's first commit of the partition: minus the offset stored for it), by topic and partition";
        register(r, KAFKA_CONSUMER_LAG_MESSAGES, help, m.kafka_lag.clone());
        let help = "Kafka messages sent to the dead-letter topic, by source topic and reason (decode, lookup_failed, lookup_attempts_exhausted)";
        register(r, KAFKA_DEAD_LETTERS_TOTAL, help, m.kafka_dead_letters.clone());
        let help = "Consumer-group rebalances seen, by kind (assign, revoke, error)";
        register(r, KAFKA_REBALANCES_TOTAL, help, m.kafka_rebalances.clone());
        let help =
            "Dead-letter producers replaced because they could no longer send (fenced, or in librdkafka's fatal state)";
        register(r, KAFKA_DEAD_LETTER_PRODUCER_RESETS_TOTAL, help, m.kafka_dead_letter_producer_resets.clone());
        let help = "Keys invalidated on a Redis Cluster without a fill-guard stamp, because no stamp name shares their hash slot (a key with braces but no hash tag), by target and cache";
        register(r, UNGUARDED_KEYS_TOTAL, help, m.unguarded_keys.clone());
        let help = "Delayed second deletes skipped because too many were already waiting on the target (their first delete was applied), by target";
        register(r, REDELETES_SKIPPED_TOTAL, help, m.redeletes_skipped.clone());
        let help = "Version keys that held something else than a version (text, another type), whose cache's namespace was bumped instead, by target and cache";
        register(r, UNBUMPABLE_KEYS_TOTAL, help, m.unbumpable_keys.clone());
        let help = "Version bumps that found the stored version at or past the batch's and raised it past that, by sink target (replays, Kafka's commit times, or versions that went backwards: a restore, another source)";
        register(r, VERSIONS_BEHIND_TOTAL, help, m.versions_behind.clone());
        let help = "Kafka offsets that no longer existed (unread messages deleted by retention, a recreated topic), by what evictd did (stop, flush)";
        register(r, KAFKA_OFFSET_RESETS_TOTAL, help, m.kafka_offset_resets.clone());
        let help = "Delayed second deletes (redelete_after_ms) that failed; best-effort, never retried, by target";
        register(r, SINK_SECOND_DELETE_FAILURES_TOTAL, help, m.second_delete_failures.clone());
        let help = "Broadcast messages published, by target, transport (pubsub, stream; both for transport = \"both\"), kind (batch, heartbeat) and outcome (ok, error)";
        register(r, BROADCAST_PUBLISHES_TOTAL, help, m.broadcast_publishes.clone());
        let help = "1 while the Redis target answered its last command (what /readyz reads), 0 once a batch failed on it, by target";
        register(r, SINK_UP, help, m.sink_up.clone());
        let help = "Next offset the consumer delivers to evictd (the last delivered + 1), by topic and partition (assigned partitions only)";
        register(r, KAFKA_POSITION_OFFSET, help, m.kafka_position.clone());
        let help = "The consumer group's committed offset: where a new owner resumes (only confirmed messages are committed), by topic and partition";
        register(r, KAFKA_COMMITTED_OFFSET, help, m.kafka_committed.clone());
        let help = "The broker's high watermark: the offset of the next message produced, by topic and partition";
        register(r, KAFKA_HIGH_WATERMARK_OFFSET, help, m.kafka_high_watermark.clone());
        let help = "Unix time the acknowledged source position last advanced (Postgres: LSN confirmed to the slot; Kafka: offsets stored for the next commit); 0 before the first";
        register(r, LAST_PROGRESS_TIMESTAMP_SECONDS, help, m.last_progress.clone());
        let help = "Unix time a row change was last received from the source; 0 before the first";
        register(r, LAST_CHANGE_TIMESTAMP_SECONDS, help, m.last_change.clone());
        let help = "HTTP connections refused because server.max_connections were open";
        register(r, HTTP_CONNECTIONS_REFUSED_TOTAL, help, m.http_refused.clone());
        let help = "Operator actions audited (evictd invalidate, slot drop, retire, dead-letters replay|purge), by target, action and outcome: read from the target's evictd:audit:actions every 15 s, so every replica shows every action";
        register(r, OPERATOR_ACTIONS_TOTAL, help, m.operator_actions.clone());
        r.register_collector(Box::new(process::ProcessCollector));
        m.active.set(1);
        m
    }

    /// The counter of Kafka messages of `topic` read as `op` (`c`, `u`, `d`,
    /// `r`, `t`, an ignored kind, or `invalid`): the source keeps it and
    /// raises it per message.
    pub(crate) fn kafka_message_counter(&self, topic: &str, op: &'static str) -> Counter {
        self.kafka_messages.get_or_create(&TopicOp { topic: topic.to_owned(), op }).clone()
    }

    /// The offsets of one assigned partition (each series set when known,
    /// left as it was otherwise); `None` forgets every series of the
    /// partition (revoked).
    pub(crate) fn kafka_partition(&self, topic: &str, partition: i32, offsets: Option<&KafkaOffsets>) {
        let labels = TopicPartition { topic: topic.to_owned(), partition: partition.to_string() };
        let families = [&self.kafka_position, &self.kafka_committed, &self.kafka_high_watermark, &self.kafka_lag];
        match offsets {
            Some(o) => {
                for (family, value) in families.into_iter().zip([o.position, o.committed, o.high_watermark, o.lag]) {
                    if let Some(value) = value {
                        family.get_or_create(&labels).set(value);
                    }
                }
            }
            None => {
                for family in families {
                    family.remove(&labels);
                }
            }
        }
    }

    /// A message of `topic` went to the dead-letter topic.
    pub(crate) fn kafka_dead_lettered(&self, topic: &str, reason: &'static str) {
        self.kafka_dead_letters.get_or_create(&TopicReason { topic: topic.to_owned(), reason }).inc();
    }

    /// The dead-letter producer was replaced by a new one.
    pub(crate) fn kafka_dead_letter_producer_reset(&self) {
        self.kafka_dead_letter_producer_resets.inc();
    }

    /// A rebalance event: `assign`, `revoke` or `error`.
    pub(crate) fn kafka_rebalance(&self, kind: &'static str) {
        self.kafka_rebalances.get_or_create(&KindLabel { kind }).inc();
    }

    /// A partition's next offset was gone: `stop` or `flush`.
    pub(crate) fn kafka_offset_reset(&self, action: &'static str) {
        self.kafka_offset_resets.get_or_create(&ActionLabel { action }).inc();
    }

    /// The registry as OpenMetrics text, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// `count` changes of `table` (`schema.table`) with operation `op`.
    pub fn changes_received(&self, table: &str, op: Operation, count: u64) {
        self.changes_received_counter(table, op).inc_by(count);
    }

    /// The counter of changes of `table` with operation `op`, for a caller
    /// that keeps it and raises it per change (the run loop does).
    pub(crate) fn changes_received_counter(&self, table: &str, op: Operation) -> Counter {
        self.changes_received.get_or_create(&TableOp { table: table.to_owned(), op: op.as_str() }).clone()
    }

    /// `count` effects of `cache` resolved to `what`.
    pub(crate) fn effects_resolved(&self, cache: &str, what: Invalidation, count: u64) {
        let (kind, action) = what.labels();
        let labels = CacheKindAction { cache: cache.to_owned(), kind, action };
        self.effects_resolved.get_or_create(&labels).inc_by(count);
    }

    /// A batch of `effects` distinct effects was confirmed by every sink,
    /// `duration` after it was closed.
    pub(crate) fn batch_applied(&self, effects: usize, duration: Duration) {
        self.batch_effects.observe(effects as f64);
        self.batch_duration.observe(duration.as_secs_f64());
    }

    /// One applied transaction, `latency` after its commit at the source.
    /// Clocks differ: pass zero when the commit time is in the future.
    pub(crate) fn commit_to_applied(&self, latency: Duration) {
        self.commit_to_applied.observe(latency.as_secs_f64());
    }

    /// Sets the position ladder and the source lag it implies.
    pub(crate) fn positions(&self, ladder: &PositionLadder) {
        self.wal_end.set(ladder.wal_end.0);
        self.received.set(ladder.received.0);
        self.resolved.set(ladder.resolved.0);
        self.applied.set(ladder.applied.0);
        self.acknowledged.set(ladder.acknowledged.0);
        self.source_lag.set(ladder.lag_bytes());
    }

    /// Creates the sink series of `target` at zero, so that `rate()` and
    /// `increase()` see its first error.
    pub(crate) fn sink_target(&self, target: &str) {
        for kind in [SinkErrorKind::Transient, SinkErrorKind::Definite] {
            drop(self.sink_errors.get_or_create(&TargetKind { target: target.to_owned(), kind: kind.as_str() }));
        }
        drop(self.sink_retries.get_or_create(&TargetLabel { target: target.to_owned() }));
        drop(self.versions_behind.get_or_create(&TargetLabel { target: target.to_owned() }));
        drop(self.second_delete_failures.get_or_create(&TargetLabel { target: target.to_owned() }));
        // Down until the start-up check or a batch says otherwise, as
        // `/readyz` has it.
        drop(self.sink_up.get_or_create(&TargetLabel { target: target.to_owned() }));
    }

    /// A sink failed to apply a batch to `target`.
    pub(crate) fn sink_error(&self, target: &str, kind: SinkErrorKind) {
        self.sink_errors.get_or_create(&TargetKind { target: target.to_owned(), kind: kind.as_str() }).inc();
    }

    /// The series of [`VERSIONS_BEHIND_TOTAL`] of `target` (created at
    /// zero), for the target's sink to count in.
    pub(crate) fn versions_behind(&self, target: &str) -> Counter {
        self.versions_behind.get_or_create(&TargetLabel { target: target.to_owned() }).clone()
    }

    /// A batch is being applied again to `target` after a transient error.
    pub(crate) fn sink_retry(&self, target: &str) {
        self.sink_retries.get_or_create(&TargetLabel { target: target.to_owned() }).inc();
    }

    /// A change of `table` was written to the dead-letter table.
    pub(crate) fn dead_lettered(&self, table: &str, reason: DeadLetterReason) {
        self.dead_letters.get_or_create(&TableReason { table: table.to_owned(), reason: reason.as_str() }).inc();
    }

    /// Creates the dead-letter write error series at zero.
    pub(crate) fn dead_letter_store(&self) {
        for kind in ["transient", "definite"] {
            drop(self.dead_letter_write_errors.get_or_create(&KindLabel { kind }));
        }
    }

    /// A write to the dead-letter table failed; `kind` is transient or definite.
    pub(crate) fn dead_letter_write_error(&self, kind: &'static str) {
        self.dead_letter_write_errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// `queries` look-up queries for `cache` returned `rows` rows in all.
    pub(crate) fn lookups(&self, cache: &str, queries: u64, rows: u64) {
        let labels = CacheLabel { cache: cache.to_owned() };
        self.lookup_queries.get_or_create(&labels).inc_by(queries);
        self.lookup_rows.get_or_create(&labels).inc_by(rows);
    }

    /// A look-up for `cache` passed its fan-out limit, so the cache's
    /// namespace was bumped instead.
    pub(crate) fn fanout_overflow(&self, cache: &str) {
        self.fanout_overflows.get_or_create(&CacheLabel { cache: cache.to_owned() }).inc();
    }

    /// `count` keys of `cache` were invalidated on `target` without a
    /// fill-guard stamp (no stamp name shares their Cluster slot).
    pub(crate) fn unguarded_keys(&self, target: &str, cache: &str, count: u64) {
        let labels = TargetCache { target: target.to_owned(), cache: cache.to_owned() };
        self.unguarded_keys.get_or_create(&labels).inc_by(count);
    }

    /// Version keys of `cache` on `target` that held something else.
    pub(crate) fn unbumpable_keys(&self, target: &str, cache: &str, count: u64) {
        let labels = TargetCache { target: target.to_owned(), cache: cache.to_owned() };
        self.unbumpable_keys.get_or_create(&labels).inc_by(count);
    }

    /// Second deletes skipped on `target` (too many waiting).
    pub(crate) fn redeletes_skipped(&self, target: &str, count: u64) {
        self.redeletes_skipped.get_or_create(&TargetLabel { target: target.to_owned() }).inc_by(count);
    }

    /// A delayed second delete on `target` failed.
    pub(crate) fn second_delete_failed(&self, target: &str) {
        self.second_delete_failures.get_or_create(&TargetLabel { target: target.to_owned() }).inc();
    }

    /// Creates the broadcast series of `target` at zero for each transport
    /// it publishes on, so that `rate()` sees the first error.
    pub(crate) fn broadcast_target(&self, target: &str, transports: &[&'static str]) {
        for &transport in transports {
            for kind in [BroadcastKind::Batch, BroadcastKind::Heartbeat] {
                if kind == BroadcastKind::Heartbeat && transport != "pubsub" {
                    continue;
                }
                for outcome in ["ok", "error"] {
                    let labels = BroadcastLabels { target: target.to_owned(), transport, kind: kind.as_str(), outcome };
                    drop(self.broadcast_publishes.get_or_create(&labels));
                }
            }
        }
    }

    /// One broadcast message of `kind` was published on `target` through
    /// each of `transports` (one script call publishes on both), or failed.
    pub(crate) fn broadcast_published(&self, target: &str, transports: &[&'static str], kind: BroadcastKind, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        for &transport in transports {
            let labels = BroadcastLabels { target: target.to_owned(), transport, kind: kind.as_str(), outcome };
            self.broadcast_publishes.get_or_create(&labels).inc();
        }
    }

    /// Whether `target` answered its last command (the gauge `/readyz`'s
    /// sink check mirrors).
    pub(crate) fn set_sink_up(&self, target: &str, up: bool) {
        self.sink_up.get_or_create(&TargetLabel { target: target.to_owned() }).set(i64::from(up));
    }

    /// The acknowledged source position advanced, now.
    pub(crate) fn progressed(&self) {
        self.last_progress.set(unix_now_seconds());
    }

    /// A row change was received from the source, now.
    pub(crate) fn change_arrived(&self) {
        self.last_change.set(unix_now_seconds());
    }

    /// The count of an operator action as `target` records it (its
    /// `evictd:audit:actions`): the counter rises to it. A lower count (the
    /// hash was lost) is taken as a reset: the counter keeps its value and
    /// the next rise counts from the lower count on, as a Prometheus
    /// counter reset would.
    pub(crate) fn operator_actions(&self, target: &str, action: &str, outcome: &str, recorded: u64, last: &mut u64) {
        use std::sync::atomic::Ordering;
        let labels =
            OperatorLabels { target: target.to_owned(), action: action.to_owned(), outcome: outcome.to_owned() };
        if self.operator_actions.get(&labels).is_none() {
            if self.operator_action_series.load(Ordering::Relaxed) >= OPERATOR_ACTION_SERIES_MAX {
                return;
            }
            self.operator_action_series.fetch_add(1, Ordering::Relaxed);
        }
        let counter = self.operator_actions.get_or_create(&labels);
        if recorded > *last {
            counter.inc_by(recorded - *last);
        }
        *last = recorded;
    }

    /// The HTTP server refused a connection (too many open).
    pub(crate) fn http_connection_refused(&self) {
        self.http_refused.inc();
    }

    /// Whether this replica is the active consumer or a standby.
    pub(crate) fn set_role(&self, role: Role) {
        self.active.set(i64::from(role == Role::Active));
    }
}

/// Registers `metric` under its exposed `name`. `prometheus-client` appends
/// `_total` to counters and the unit to the name itself, so both are taken
/// off here and the unit is declared instead (a `# UNIT` line).
fn register(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    let base = name.strip_suffix("_total").unwrap_or(name);
    if let Some(base) = base.strip_suffix("_seconds") {
        registry.register_with_unit(base, help, Unit::Seconds, metric);
    } else if let Some(base) = base.strip_suffix("_bytes") {
        registry.register_with_unit(base, help, Unit::Bytes, metric);
    } else {
        registry.register(base, help, metric);
    }
}

mod process;

#[cfg(test)]
mod tests;
