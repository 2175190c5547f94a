//! `[source]`: the Postgres (pgoutput) or Kafka (Debezium) source.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;

use super::issues::{Issues, is_identifier, positive};
use super::raw::{RawKafka, RawPostgres, RawSource, RawTableSet};
use super::secrets::check_pg_url;

#[derive(Debug, Clone)]
pub(crate) enum SourceConfig {
    Postgres(PostgresSource),
    Kafka(KafkaSource),
}

#[derive(Debug, Clone)]
pub(crate) struct PostgresSource {
    pub(crate) url: SecretString,
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) create_slot: bool,
    pub(crate) create_publication: bool,
    pub(crate) status_interval: Duration,
    pub(crate) require_full_replica_identity: bool,
    /// How often a standby tries to become the slot's active consumer.
    pub(crate) standby_retry: Duration,
    /// The slot lock's lease: how long the lock's session may idle before
    /// the server ends it (`None`: no lease). Longer than `standby_retry`
    /// plus the lock's round-trip bound, so a healthy active replica, which
    /// checks its lock every `standby_retry`, never loses it.
    pub(crate) lock_lease: Option<Duration>,
    /// What to do when the slot evictd streamed from is gone.
    pub(crate) on_slot_loss: OnSlotLoss,
}

/// What `run` does when the slot is missing but evictd streamed from it
/// before (the changes since its last acknowledged position are lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum OnSlotLoss {
    /// Refuse to start, saying what happened and what to do.
    #[default]
    Refuse,
    /// Bump every cache's namespace on every target, then stream from a
    /// new slot.
    Flush,
}

/// Which tables' delete events carry the whole old row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum FullRowDeletes {
    /// None: a delete's non-key columns are unknown (the safe default).
    #[default]
    None,
    /// Every table (MySQL with `binlog_row_image=FULL`, Postgres tables all
    /// `REPLICA IDENTITY FULL`).
    All,
    /// These tables (`schema.table`).
    Tables(HashSet<String>),
}

impl FullRowDeletes {
    pub(crate) fn covers(&self, table: &str) -> bool {
        match self {
            FullRowDeletes::None => false,
            FullRowDeletes::All => true,
            FullRowDeletes::Tables(tables) => tables.contains(table),
        }
    }
}

/// `Debug` is written by hand: `properties` may hold secrets
/// (`sasl.password`, ...), which it shows as `****`.
#[derive(Clone)]
pub struct KafkaSource {
    pub(crate) brokers: String,
    pub(crate) group_id: String,
    pub(crate) topics: Vec<String>,
    pub(crate) topic_pattern: Option<String>,
    pub(crate) snapshot_reads: SnapshotReads,
    pub(crate) full_row_deletes: FullRowDeletes,
    /// Topic → table overrides.
    pub(crate) tables: BTreeMap<String, String>,
    pub on_offset_reset: OnOffsetReset,
    pub(crate) max_message_bytes: usize,
    pub(crate) max_value_bytes: usize,
    pub(crate) max_decode: Duration,
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let KafkaSource {
            brokers,
            group_id,
            topics,
            topic_pattern,
            snapshot_reads,
            full_row_deletes,
            tables,
            on_offset_reset,
            max_message_bytes,
            max_value_bytes,
            max_decode,
            properties,
        } = self;
        f.debug_struct("KafkaSource")
            .field("brokers", brokers)
            .field("group_id", group_id)
            .field("topics", topics)
            .field("topic_pattern", topic_pattern)
            .field("snapshot_reads", snapshot_reads)
            .field("full_row_deletes", full_row_deletes)
            .field("tables", tables)
            .field("on_offset_reset", on_offset_reset)
            .field("max_message_bytes", max_message_bytes)
            .field("max_value_bytes", max_value_bytes)
            .field("max_decode", max_decode)
            .field("properties", &super::secrets::redact_properties(properties))
            .finish()
    }
}

/// What a partition whose next offset no longer exists does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOffsetReset {
    /// Stop the daemon without acknowledging anything past the gap.
    #[default]
    Stop,
    /// Bump every cache's namespace, then resume from the earliest offset.
    Flush,
}

/// Default `source.kafka.max_message_bytes`.
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default `source.kafka.max_value_bytes`.
pub(crate) const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

impl KafkaSource {
    /// A source of `topics` with every other setting at its default, as
    /// `validate` would build it.
    pub fn new(brokers: &str, group_id: &str, topics: Vec<String>) -> KafkaSource {
        KafkaSource {
            brokers: brokers.to_owned(),
            group_id: group_id.to_owned(),
            topics,
            topic_pattern: None,
            snapshot_reads: SnapshotReads::Ignore,
            full_row_deletes: FullRowDeletes::None,
            tables: BTreeMap::new(),
            on_offset_reset: OnOffsetReset::Stop,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_decode: Duration::from_millis(1000),
            properties: BTreeMap::new(),
        }
    }
}

/// What a Debezium snapshot read (`op = r`) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SnapshotReads {
    #[default]
    Ignore,
    /// Invalidate as for an insert of the row.
    Invalidate,
}

/// librdkafka properties evictd sets itself (its delivery guarantee rests
/// on them).
pub(crate) const KAFKA_OWN_PROPERTIES: &[&str] = &[
    "enable.auto.offset.store",
    "enable.auto.commit",
    "group.id",
    "bootstrap.servers",
    "enable.partition.eof",
    "auto.offset.reset",
];

/// Validates `[source]` and its `[source.postgres]` or `[source.kafka]`.
pub(crate) fn validate_source(raw: RawSource, issues: &mut Issues<'_>, base: &Path) -> Option<SourceConfig> {
    match raw.kind.as_str() {
        "postgres" => {
            let Some(pg) = raw.postgres else {
                issues.push("source", "kind = \"postgres\" needs a [source.postgres] section");
                return None;
            };
            validate_postgres(pg, issues, base)
        }
        "kafka" => {
            let Some(kafka) = raw.kafka else {
                issues.push("source", "kind = \"kafka\" needs a [source.kafka] section");
                return None;
            };
            Some(validate_kafka(kafka, issues))
        }
        other => {
            issues.push("source.kind", format!("unknown source `{other}` (expected postgres or kafka)"));
            None
        }
    }
}

/// `[source.postgres]`; `None` without a usable URL.
fn validate_postgres(pg: RawPostgres, issues: &mut Issues<'_>, base: &Path) -> Option<SourceConfig> {
    let url = issues.secret("source.postgres.url", pg.url, pg.url_file.as_deref(), base);
    let Some(url) = url else {
        if !issues.list.iter().any(|i| i.field.starts_with("source.postgres.url")) {
            issues.push("source.postgres", "needs `url` (or `url_file`)");
        }
        return None;
    };
    check_pg_url(issues, "source.postgres.url", &url);
    let slot = pg.slot.unwrap_or_else(|| "evictd".to_owned());
    if !is_identifier(&slot) {
        issues.push(
            "source.postgres.slot",
            format!("`{slot}` is not a slot name (lowercase letters, digits and `_`, at most 63)"),
        );
    }
    let publication = pg.publication.unwrap_or_else(|| "evictd".to_owned());
    if !is_identifier(&publication) {
        issues.push(
            "source.postgres.publication",
            format!("`{publication}` is not a publication name (lowercase letters, digits and `_`, at most 63)"),
        );
    }
    let interval = pg.status_interval_ms.unwrap_or(1000);
    if !(100..=10_000).contains(&interval) {
        issues.push(
            "source.postgres.status_interval_ms",
            "must be between 100 and 10000 (keep it under half of wal_sender_timeout)",
        );
    }
    let standby_retry_ms = positive(issues, "source.postgres.standby_retry_ms", pg.standby_retry_ms, 1000);
    let on_slot_loss = match pg.on_slot_loss.as_deref().unwrap_or("refuse") {
        "refuse" => OnSlotLoss::Refuse,
        "flush" => OnSlotLoss::Flush,
        other => {
            issues.push("source.postgres.on_slot_loss", format!("unknown value `{other}` (expected refuse or flush)"));
            OnSlotLoss::Refuse
        }
    };
    Some(SourceConfig::Postgres(PostgresSource {
        on_slot_loss,
        url,
        slot,
        publication,
        create_slot: pg.create_slot.unwrap_or(true),
        create_publication: pg.create_publication.unwrap_or(false),
        status_interval: Duration::from_millis(interval),
        require_full_replica_identity: pg.require_full_replica_identity.unwrap_or(true),
        standby_retry: Duration::from_millis(standby_retry_ms),
        lock_lease: lock_lease(issues, pg.lock_lease_ms, standby_retry_ms),
    }))
}

/// Default `source.postgres.lock_lease_ms` (when `standby_retry_ms` leaves
/// room for it).
pub(crate) const DEFAULT_LOCK_LEASE_MS: u64 = 10_000;

/// The longest one round trip on the slot lock's session may take (the
/// lock steps its holder down past it).
pub(crate) const LOCK_ROUND_TRIP: Duration = Duration::from_secs(5);

/// `source.postgres.lock_lease_ms`: the lease, `None` when turned off (0).
/// A healthy active replica's lock session idles at most `standby_retry_ms`
/// plus one round trip (bounded by [`LOCK_ROUND_TRIP`]) between checks; a
/// shorter lease would end it.
fn lock_lease(issues: &mut Issues<'_>, lease_ms: Option<u64>, standby_retry_ms: u64) -> Option<Duration> {
    let least = standby_retry_ms.saturating_add(LOCK_ROUND_TRIP.as_millis() as u64);
    match lease_ms {
        None => Some(Duration::from_millis(DEFAULT_LOCK_LEASE_MS.max(least))),
        Some(0) => None,
        Some(ms) if ms < least => {
            issues.push(
                "source.postgres.lock_lease_ms",
                format!(
                    "must be at least {least} (standby_retry_ms + {} ms, the lock check's round-trip bound), \
                     or 0 for no lease: a healthy active replica checks its lock every standby_retry_ms, \
                     and a shorter lease would end its lock's session",
                    LOCK_ROUND_TRIP.as_millis()
                ),
            );
            None
        }
        Some(ms) => Some(Duration::from_millis(ms)),
    }
}

/// `[source.kafka]`.
fn validate_kafka(kafka: RawKafka, issues: &mut Issues<'_>) -> SourceConfig {
    let topics = kafka.topics.unwrap_or_default();
    if topics.is_empty() == kafka.topic_pattern.is_none() {
        issues.push("source.kafka.topics", "set either `topics` or `topic_pattern`");
    }
    if kafka.brokers.trim().is_empty() {
        issues.push("source.kafka.brokers", "needs at least one broker (host:port)");
    }
    let snapshot_reads = match kafka.snapshot_reads.as_deref().unwrap_or("ignore") {
        "ignore" => SnapshotReads::Ignore,
        "invalidate" => SnapshotReads::Invalidate,
        other => {
            issues.push(
                "source.kafka.snapshot_reads",
                format!("unknown value `{other}` (expected ignore or invalidate)"),
            );
            SnapshotReads::Ignore
        }
    };
    let full_row_deletes = match kafka.full_row_deletes {
        None => FullRowDeletes::None,
        Some(RawTableSet::Word(w)) if w == "none" => FullRowDeletes::None,
        Some(RawTableSet::Word(w)) if w == "all" => FullRowDeletes::All,
        Some(RawTableSet::Word(other)) => {
            issues.push(
                "source.kafka.full_row_deletes",
                format!("unknown value `{other}` (expected \"all\", \"none\" or a list of tables)"),
            );
            FullRowDeletes::None
        }
        Some(RawTableSet::List(tables)) => FullRowDeletes::Tables(tables.into_iter().collect()),
    };
    for (topic, table) in &kafka.tables {
        if table.split('.').count() != 2 || table.split('.').any(str::is_empty) {
            issues.push(
                &format!("source.kafka.tables.{topic}"),
                format!("`{table}` is not a table name of the form schema.table"),
            );
        }
    }
    let on_offset_reset = match kafka.on_offset_reset.as_deref().unwrap_or("stop") {
        "stop" => OnOffsetReset::Stop,
        "flush" => OnOffsetReset::Flush,
        other => {
            issues.push("source.kafka.on_offset_reset", format!("unknown value `{other}` (expected stop or flush)"));
            OnOffsetReset::Stop
        }
    };
    let max_message_bytes =
        positive(issues, "source.kafka.max_message_bytes", kafka.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES as u64)
            as usize;
    let max_value_bytes =
        positive(issues, "source.kafka.max_value_bytes", kafka.max_value_bytes, DEFAULT_MAX_VALUE_BYTES as u64)
            as usize;
    let max_decode = Duration::from_millis(positive(issues, "source.kafka.max_decode_ms", kafka.max_decode_ms, 1000));
    for (key, value) in &kafka.properties {
        if key == "auto.offset.reset" {
            let why = if ["latest", "largest", "end"].contains(&value.as_str()) {
                "`latest` skips every message the group has not read yet; evictd sets this property itself"
            } else {
                "evictd sets this property itself"
            };
            issues.push(
                &format!("source.kafka.properties.\"{key}\""),
                format!(
                    "{why} (`earliest` for partitions the group never committed, `error` otherwise, so that a gap is seen: see on_offset_reset)"
                ),
            );
            continue;
        }
        if KAFKA_OWN_PROPERTIES.contains(&key.as_str()) {
            issues.push(
                &format!("source.kafka.properties.\"{key}\""),
                "evictd sets this property itself (offsets are stored only once their effects are confirmed)",
            );
        }
    }
    // librdkafka's own judgement of the properties needs a client: `check`
    // and the daemon's start ask it (`daemon::check_kafka_client`), never
    // validation.
    SourceConfig::Kafka(KafkaSource {
        brokers: kafka.brokers,
        group_id: kafka.group_id.unwrap_or_else(|| "evictd".to_owned()),
        topics,
        topic_pattern: kafka.topic_pattern,
        snapshot_reads,
        full_row_deletes,
        tables: kafka.tables,
        on_offset_reset,
        max_message_bytes,
        max_value_bytes,
        max_decode,
        properties: kafka.properties,
    })
}
