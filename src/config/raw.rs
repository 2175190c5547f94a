//! The file as written: the deserialised `[section]` types, every field
//! optional where a default exists. Their doc comments are the reference
//! of each setting; [`RawConfig::validate`](super::RawConfig::validate)
//! turns them into the validated [`Config`](super::Config).

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::Deserialize;

/// The file as written (every field optional where a default exists).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) graph: RawGraph,
    pub(crate) source: Option<RawSource>,
    #[serde(default)]
    pub(crate) lookup: RawLookup,
    #[serde(default)]
    pub(crate) batch: RawBatch,
    #[serde(default)]
    pub(crate) run: RawRun,
    #[serde(default)]
    pub(crate) dead_letter: RawDeadLetter,
    /// Named Redis targets: `[redis.primary]`, `[redis.eu]`.
    #[serde(default)]
    pub(crate) redis: BTreeMap<String, RawRedis>,
    #[serde(default)]
    pub(crate) server: RawServer,
    #[serde(default)]
    pub(crate) log: RawLog,
}

/// `[graph]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGraph {
    /// Graph files or directories of `*.toml` files, relative to the config
    /// file's directory. Default: `["dependency-graphs"]`.
    pub(crate) paths: Option<Vec<String>>,
}

/// `[source]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    /// `postgres` or `kafka`.
    pub(crate) kind: String,
    pub(crate) postgres: Option<RawPostgres>,
    pub(crate) kafka: Option<RawKafka>,
}

/// `[source.postgres]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPostgres {
    /// Connection URL (secret), e.g. `postgres://evictd@db:5432/app`.
    pub(crate) url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub(crate) url_file: Option<String>,
    /// Logical replication slot (pgoutput). Default `evictd`.
    pub(crate) slot: Option<String>,
    /// Publication to stream. Default `evictd`.
    pub(crate) publication: Option<String>,
    /// Create the slot when it does not exist. Default true.
    pub(crate) create_slot: Option<bool>,
    /// Create the publication (for the graph's tables) when missing. Default false.
    pub(crate) create_publication: Option<bool>,
    /// How often a standby status update is sent, in ms. Default 1000.
    pub(crate) status_interval_ms: Option<u64>,
    /// Refuse to start while a table whose caches read non-key columns of
    /// old rows lacks `REPLICA IDENTITY FULL`. Default true; false only
    /// warns (evictd then bumps whole namespaces where it cannot render an
    /// old key).
    pub(crate) require_full_replica_identity: Option<bool>,
    /// How often a standby tries to take the slot's lock, in ms. Default 1000.
    pub(crate) standby_retry_ms: Option<u64>,
    /// The slot lock's lease, in ms: the server ends the lock's session
    /// (`idle_session_timeout`, Postgres 14 and later) once it has idled
    /// this long, so a frozen active replica loses the lock. At least
    /// `standby_retry_ms` + 5000; 0 turns the lease off. Default 10000 (or
    /// `standby_retry_ms` + 5000 when that is more).
    pub(crate) lock_lease_ms: Option<u64>,
    /// What to do when the slot is gone although evictd streamed from it
    /// (recorded in Redis): `refuse` (default) or `flush` (bump every
    /// cache's namespace, then stream from a new slot).
    pub(crate) on_slot_loss: Option<String>,
}

/// `[source.kafka]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKafka {
    /// `host:port[,host:port…]`.
    pub(crate) brokers: String,
    /// Consumer group. Default `evictd`.
    pub(crate) group_id: Option<String>,
    /// Topics to consume (or `topic_pattern`).
    pub(crate) topics: Option<Vec<String>>,
    /// A regular expression of topics (librdkafka `^…` subscription).
    pub(crate) topic_pattern: Option<String>,
    /// Snapshot reads (`op = r`): `ignore` (default) or `invalidate` (as
    /// inserts).
    pub(crate) snapshot_reads: Option<String>,
    /// Tables whose delete events carry the whole old row: `"all"`,
    /// `"none"` (default: a delete's non-key columns are unknown) or a list
    /// of `schema.table`.
    pub(crate) full_row_deletes: Option<RawTableSet>,
    /// Topic → table (`schema.table`) for topics whose events should not be
    /// read as the table their `source` block names.
    #[serde(default)]
    pub(crate) tables: BTreeMap<String, String>,
    /// What a partition whose next offset is gone (retention deleted
    /// unread messages, or the topic was recreated) does: `stop` (default:
    /// the daemon stops, nothing is acknowledged) or `flush` (every cache
    /// of the graph is bumped, confirmed, and the partition resumes from
    /// its earliest message).
    pub(crate) on_offset_reset: Option<String>,
    /// Messages larger than this (key and value) are dead-lettered
    /// (`evictd.reason = too_large`) without being decoded. Default 16 MiB.
    pub(crate) max_message_bytes: Option<u64>,
    /// A column value larger than this (its JSON text) dead-letters its
    /// message (`evictd.reason = too_large`). Default 1 MiB.
    pub(crate) max_value_bytes: Option<u64>,
    /// The time one message's decoding may take before it is dead-lettered
    /// (`evictd.reason = too_slow`), in ms. Default 1000.
    pub(crate) max_decode_ms: Option<u64>,
    /// Extra librdkafka properties, e.g. `"security.protocol" = "ssl"`.
    #[serde(default)]
    pub(crate) properties: BTreeMap<String, String>,
}

/// `"all"`, `"none"` or a list of names.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawTableSet {
    Word(String),
    List(Vec<String>),
}

/// `[lookup]`: the connection look-up dependencies run their SQL on.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLookup {
    /// Connection URL (secret). Default: `source.postgres.url`.
    pub(crate) url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub(crate) url_file: Option<String>,
    /// Per-query timeout in ms, for dependencies that set none. Default 2000.
    pub(crate) timeout_ms: Option<u64>,
    /// Most `$1` values in one query. Default 1000.
    pub(crate) batch_size: Option<usize>,
    /// Pool size. Default 4.
    pub(crate) max_connections: Option<u32>,
}

/// `[batch]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBatch {
    /// Close a batch at this many distinct effects (or whole transactions).
    /// Default 1000.
    pub(crate) max_effects: Option<usize>,
    /// Close a batch this long after its first transaction, in ms. Default 1
    /// (measured: see docs/performance.md).
    pub(crate) max_delay_ms: Option<u64>,
    /// Close a batch once it holds about this many bytes (keys, tags, and
    /// the changes kept for its look-ups); reading waits while it is full
    /// and another is in flight. Default 8388608 (8 MiB).
    pub(crate) max_bytes: Option<u64>,
}

/// `[run]`: how the daemon retries and shuts down.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    /// Longest wait between retries of a failing sink, look-up or source
    /// connection, in ms. Default 5000.
    pub(crate) retry_max_ms: Option<u64>,
    /// How long SIGTERM may take to flush and acknowledge, in ms. Default 10000.
    pub(crate) shutdown_grace_ms: Option<u64>,
    /// Distinct effects one transaction may collect before its caches are
    /// invalidated whole (namespace bumps). Default 100000.
    pub(crate) max_transaction_effects: Option<usize>,
    /// Bytes one transaction may hold (keys, tags, and the changes kept for
    /// its look-ups, wide rows included) before its caches are invalidated
    /// whole. Default 16777216 (16 MiB).
    pub(crate) max_transaction_bytes: Option<u64>,
}

/// `[dead_letter]`: changes that cannot be resolved, and evictd's own schema.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeadLetter {
    /// `dead_letter`: record an unresolvable change in the dead-letter table
    /// and keep going; `stop`: stop the daemon without acknowledging it.
    /// Default `dead_letter`.
    pub(crate) on_error: Option<String>,
    /// Connection URL (secret) of the database holding the dead-letter
    /// table. Default: `source.postgres.url`.
    pub(crate) url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub(crate) url_file: Option<String>,
    /// The schema of evictd's own tables (dead letters, applied migrations).
    /// Default `evictd`.
    pub(crate) schema: Option<String>,
    /// `apply`: apply pending migrations at start-up; `verify`: refuse to
    /// start while any is pending (apply them with `evictd migrate`).
    /// Default `apply`.
    pub(crate) migrations: Option<String>,
    /// How many times a batch's look-ups may fail with a query error or a
    /// timeout before the failing changes are isolated and dead-lettered (a
    /// database that cannot be reached is waited for, never counted).
    /// Default 5.
    pub(crate) lookup_attempts: Option<u32>,
    /// Kafka source: the topic that gets messages that cannot be decoded
    /// or resolved (original key, value and headers, the error in a
    /// header). Default `evictd.dead-letters`.
    pub(crate) topic: Option<String>,
}

/// `[redis.NAME]`: one Redis target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    /// `redis://[:password@]host:port[/db]` (secret). For a Cluster, one or
    /// more seed nodes separated by commas.
    pub(crate) url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub(crate) url_file: Option<String>,
    /// Whether the target is a Redis Cluster. Default false.
    pub(crate) cluster: Option<bool>,
    /// Write a fill-guard stamp (`evictd:guard:…`) before every key
    /// invalidation, for readers that fill through the guard script.
    /// Default true.
    pub(crate) fill_guard: Option<bool>,
    /// How long a fill-guard stamp lives, in ms: longer than any reader's
    /// read-the-database-then-fill window. Default 60000.
    pub(crate) fill_guard_ttl_ms: Option<u64>,
    /// Publish one message per applied batch on `broadcast_channel`.
    /// Default true.
    pub(crate) broadcast: Option<bool>,
    /// The pub/sub channel of the broadcast. Default `evictd:invalidations`.
    pub(crate) broadcast_channel: Option<String>,
    /// Most keys one broadcast message lists; past it the message names the
    /// caches to drop whole instead. Default 10000.
    pub(crate) broadcast_max_keys: Option<usize>,
    /// How messages go out: `both` (default: pub/sub and the channel's
    /// stream), `pubsub` or `stream`.
    pub(crate) broadcast_transport: Option<String>,
    /// About how many messages the channel's stream keeps (`XADD … MAXLEN ~`).
    /// Default 100000.
    pub(crate) broadcast_stream_max_len: Option<u64>,
    /// How often a heartbeat (current `seq`, applied position) goes out on
    /// pub/sub, in ms. Default 1000.
    pub(crate) broadcast_heartbeat_ms: Option<u64>,
    /// Replicas that must have every write of a batch before it is confirmed
    /// (`WAIT` at the end of each pipeline). Default 0: confirmed when the
    /// primary replied.
    pub(crate) wait_replicas: Option<u32>,
    /// Also wait until the primary (and `wait_replicas` replicas) fsynced
    /// the writes to their append-only file (`WAITAOF`, Redis 7.2 or
    /// later, `appendonly yes`). Default false.
    pub(crate) wait_aof: Option<bool>,
    /// Longest durability wait per pipeline, in ms; fewer replicas by then
    /// fails the batch (transient: retried, never acknowledged). Default 1000.
    pub(crate) wait_timeout_ms: Option<u64>,
    /// What start-up does when the target's `maxmemory-policy` can evict
    /// evictd's own keys: `refuse` (default) or `warn`.
    pub(crate) eviction_check: Option<String>,
    /// A PEM file of the CAs that sign the servers' certificates, for
    /// `rediss://` URLs (a managed service's bundle, a private CA); only
    /// these CAs are trusted. Default: the public (Mozilla) roots.
    pub(crate) tls_ca_file: Option<String>,
    /// A client certificate (PEM) for servers that ask for one; with
    /// `tls_key_file`.
    pub(crate) tls_cert_file: Option<String>,
    /// The client certificate's private key (PEM); with `tls_cert_file`.
    pub(crate) tls_key_file: Option<String>,
}

/// `[server]`: the HTTP server for `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    /// Listen address. Default `127.0.0.1:9187`.
    pub(crate) listen: Option<String>,
    /// `/healthz` fails once the run loop has not turned for this long, in
    /// ms. Default 30000.
    pub(crate) heartbeat_timeout_ms: Option<u64>,
    /// `/readyz` fails while the source lag exceeds this many bytes.
    /// Default 1073741824 (1 GiB).
    pub(crate) ready_max_lag_bytes: Option<u64>,
    /// Longest wait for a request's head (also how long an idle
    /// connection stays open), in ms. Default 5000.
    pub(crate) header_read_timeout_ms: Option<u64>,
    /// Longest a request may take once its head is read, answer written
    /// included, in ms. Default 10000.
    pub(crate) request_timeout_ms: Option<u64>,
    /// Connections open at once; more are refused (503). Default 64.
    pub(crate) max_connections: Option<u64>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    /// `text` or `json`. Default `text`.
    pub(crate) format: Option<String>,
    /// A `tracing` filter, e.g. `info` or `evictd=debug`. Default `info`.
    pub(crate) level: Option<String>,
}
