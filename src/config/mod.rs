//! Configuration: `evictd.toml`, then `EVICTD__SECTION__KEY` environment
//! overrides, validated before anything starts.
//!
//! Loading goes raw → [`RawConfig::validate`] → [`Config`]. The file is
//! first parsed alone with spans, so a bad key or value is reported with the
//! file, line and field; the `config` crate then layers the environment on
//! top, and a bad override names its variable. `evictd check --config` and
//! `evictd run` call the same [`load`].
//!
//! **Secrets** (database and Redis URLs, which carry passwords) are
//! [`SecretString`]s: `Debug` prints `[REDACTED]`, and nothing here puts
//! them in an error message. Each may also be read from a file
//! (`url_file`), as Kubernetes mounts secrets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::batch::BatchLimits;
use crate::dead_letter::{MigrationMode, OnError};
use crate::diagnostic::{SourceFile, plain_serde_message, write_lines};
use crate::server::HealthThresholds;
pub use crate::source::debezium::FullRowDeletes;

/// The environment variable prefix: `EVICTD__BATCH__MAX_EFFECTS`.
pub const ENV_PREFIX: &str = "EVICTD";

/// The file as written (every field optional where a default exists).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub graph: RawGraph,
    pub source: Option<RawSource>,
    #[serde(default)]
    pub lookup: RawLookup,
    #[serde(default)]
    pub batch: RawBatch,
    #[serde(default)]
    pub run: RawRun,
    #[serde(default)]
    pub dead_letter: RawDeadLetter,
    /// Named Redis targets: `[redis.primary]`, `[redis.eu]`.
    #[serde(default)]
    pub redis: BTreeMap<String, RawRedis>,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
}

/// `[graph]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGraph {
    /// Graph files or directories of `*.toml` files, relative to the config
    /// file's directory. Default: `["dependency-graphs"]`.
    pub paths: Option<Vec<String>>,
}

/// `[source]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// `postgres` or `kafka`.
    pub kind: String,
    pub postgres: Option<RawPostgres>,
    pub kafka: Option<RawKafka>,
}

/// `[source.postgres]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// Connection URL (secret), e.g. `postgres://evictd@db:5432/app`.
    pub url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub url_file: Option<String>,
    /// Logical replication slot (pgoutput). Default `evictd`.
    pub slot: Option<String>,
    /// Publication to stream. Default `evictd`.
    pub publication: Option<String>,
    /// Create the slot when it does not exist. Default true.
    pub create_slot: Option<bool>,
    /// Create the publication (for the graph's tables) when missing. Default false.
    pub create_publication: Option<bool>,
    /// How often a standby status update is sent, in ms. Default 1000.
    pub status_interval_ms: Option<u64>,
    /// Refuse to start while a table whose caches read non-key columns of
    /// old rows lacks `REPLICA IDENTITY FULL`. Default true; false only
    /// warns (evictd then bumps whole namespaces where it cannot render an
    /// old key).
    pub require_full_replica_identity: Option<bool>,
    /// How often a standby tries to take the slot's lock, in ms. Default 1000.
    pub standby_retry_ms: Option<u64>,
    /// What to do when the slot is gone although evictd streamed from it
    /// (recorded in Redis): `refuse` (default) or `flush` (bump every
    /// cache's namespace, then stream from a new slot).
    pub on_slot_loss: Option<String>,
}

/// `[source.kafka]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Consumer group. Default `evictd`.
    pub group_id: Option<String>,
    /// Topics to consume (or `topic_pattern`).
    pub topics: Option<Vec<String>>,
    /// A regular expression of topics (librdkafka `^…` subscription).
    pub topic_pattern: Option<String>,
    /// Snapshot reads (`op = r`): `ignore` (default) or `invalidate` (as
    /// inserts).
    pub snapshot_reads: Option<String>,
    /// Tables whose delete events carry the whole old row: `"all"`,
    /// `"none"` (default: a delete's non-key columns are unknown) or a list
    /// of `schema.table`.
    pub full_row_deletes: Option<RawTableSet>,
    /// Topic → table (`schema.table`) for topics whose events should not be
    /// read as the table their `source` block names.
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    /// What a partition whose next offset is gone (retention deleted
    /// unread messages, or the topic was recreated) does: `stop` (default:
    /// the daemon stops, nothing is acknowledged) or `flush` (every cache
    /// of the graph is bumped, confirmed, and the partition resumes from
    /// its earliest message).
    pub on_offset_reset: Option<String>,
    /// Messages larger than this (key and value) are dead-lettered
    /// (`evictd.reason = too_large`) without being decoded. Default 16 MiB.
    pub max_message_bytes: Option<u64>,
    /// A column value larger than this (its JSON text) dead-letters its
    /// message (`evictd.reason = too_large`). Default 1 MiB.
    pub max_value_bytes: Option<u64>,
    /// The time one message's decoding may take before it is dead-lettered
    /// (`evictd.reason = too_slow`), in ms. Default 1000.
    pub max_decode_ms: Option<u64>,
    /// Extra librdkafka properties, e.g. `"security.protocol" = "ssl"`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `"all"`, `"none"` or a list of names.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawTableSet {
    Word(String),
    List(Vec<String>),
}

/// `[lookup]`: the connection look-up dependencies run their SQL on.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLookup {
    /// Connection URL (secret). Default: `source.postgres.url`.
    pub url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub url_file: Option<String>,
    /// Per-query timeout in ms, for dependencies that set none. Default 2000.
    pub timeout_ms: Option<u64>,
    /// Most `$1` values in one query. Default 1000.
    pub batch_size: Option<usize>,
    /// Pool size. Default 4.
    pub max_connections: Option<u32>,
}

/// `[batch]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    /// Close a batch at this many distinct effects (or whole transactions).
    /// Default 1000.
    pub max_effects: Option<usize>,
    /// Close a batch this long after its first transaction, in ms. Default 1
    /// (measured: see docs/performance.md).
    pub max_delay_ms: Option<u64>,
    /// Close a batch once it holds about this many bytes (keys, tags, and
    /// the changes kept for its look-ups); reading waits while it is full
    /// and another is in flight. Default 8388608 (8 MiB).
    pub max_bytes: Option<u64>,
}

/// `[run]`: how the daemon retries and shuts down.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRun {
    /// Longest wait between retries of a failing sink, look-up or source
    /// connection, in ms. Default 5000.
    pub retry_max_ms: Option<u64>,
    /// How long SIGTERM may take to flush and acknowledge, in ms. Default 10000.
    pub shutdown_grace_ms: Option<u64>,
    /// Distinct effects one transaction may collect before its caches are
    /// invalidated whole (namespace bumps). Default 100000.
    pub max_transaction_effects: Option<usize>,
    /// Bytes one transaction may hold (keys, tags, and the changes kept for
    /// its look-ups, wide rows included) before its caches are invalidated
    /// whole. Default 16777216 (16 MiB).
    pub max_transaction_bytes: Option<u64>,
}

/// `[dead_letter]`: changes that cannot be resolved, and evictd's own schema.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeadLetter {
    /// `dead_letter`: record an unresolvable change in the dead-letter table
    /// and keep going; `stop`: stop the daemon without acknowledging it.
    /// Default `dead_letter`.
    pub on_error: Option<String>,
    /// Connection URL (secret) of the database holding the dead-letter
    /// table. Default: `source.postgres.url`.
    pub url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub url_file: Option<String>,
    /// The schema of evictd's own tables (dead letters, applied migrations).
    /// Default `evictd`.
    pub schema: Option<String>,
    /// `apply`: apply pending migrations at start-up; `verify`: refuse to
    /// start while any is pending (apply them with `evictd migrate`).
    /// Default `apply`.
    pub migrations: Option<String>,
    /// How many times a batch's look-ups may fail with a query error or a
    /// timeout before the failing changes are isolated and dead-lettered (a
    /// database that cannot be reached is waited for, never counted).
    /// Default 5.
    pub lookup_attempts: Option<u32>,
    /// Kafka source: the topic that gets messages that cannot be decoded
    /// or resolved (original key, value and headers, the error in a
    /// header). Default `evictd.dead-letters`.
    pub topic: Option<String>,
}

/// `[redis.NAME]`: one Redis target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://[:password@]host:port[/db]` (secret). For a Cluster, one or
    /// more seed nodes separated by commas.
    pub url: Option<SecretString>,
    /// A file holding the URL, instead of `url`.
    pub url_file: Option<String>,
    /// Whether the target is a Redis Cluster. Default false.
    pub cluster: Option<bool>,
    /// Write a fill-guard stamp (`evictd:guard:…`) before every key
    /// invalidation, for readers that fill through the guard script.
    /// Default true.
    pub fill_guard: Option<bool>,
    /// How long a fill-guard stamp lives, in ms: longer than any reader's
    /// read-the-database-then-fill window. Default 60000.
    pub fill_guard_ttl_ms: Option<u64>,
    /// Publish one message per applied batch on `broadcast_channel`.
    /// Default true.
    pub broadcast: Option<bool>,
    /// The pub/sub channel of the broadcast. Default `evictd:invalidations`.
    pub broadcast_channel: Option<String>,
    /// Most keys one broadcast message lists; past it the message names the
    /// caches to drop whole instead. Default 10000.
    pub broadcast_max_keys: Option<usize>,
    /// Replicas that must have every write of a batch before it is confirmed
    /// (`WAIT` at the end of each pipeline). Default 0: confirmed when the
    /// primary replied.
    pub wait_replicas: Option<u32>,
    /// Also wait until the primary (and `wait_replicas` replicas) fsynced
    /// the writes to their append-only file (`WAITAOF`, Redis 7.2 or
    /// later, `appendonly yes`). Default false.
    pub wait_aof: Option<bool>,
    /// Longest durability wait per pipeline, in ms; fewer replicas by then
    /// fails the batch (transient: retried, never acknowledged). Default 1000.
    pub wait_timeout_ms: Option<u64>,
    /// What start-up does when the target's `maxmemory-policy` can evict
    /// evictd's own keys: `refuse` (default) or `warn`.
    pub eviction_check: Option<String>,
}

/// `[server]`: the HTTP server for `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Listen address. Default `127.0.0.1:9187`.
    pub listen: Option<String>,
    /// `/healthz` fails once the run loop has not turned for this long, in
    /// ms. Default 30000.
    pub heartbeat_timeout_ms: Option<u64>,
    /// `/readyz` fails while the source lag exceeds this many bytes.
    /// Default 1073741824 (1 GiB).
    pub ready_max_lag_bytes: Option<u64>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `text` or `json`. Default `text`.
    pub format: Option<String>,
    /// A `tracing` filter, e.g. `info` or `evictd=debug`. Default `info`.
    pub level: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config was read from.
    pub file: PathBuf,
    pub graph_paths: Vec<PathBuf>,
    pub source: Option<SourceConfig>,
    pub lookup: LookupConfig,
    pub batch: BatchLimits,
    pub run: RunConfig,
    pub dead_letter: DeadLetterConfig,
    pub redis: Vec<RedisTarget>,
    pub server: ServerConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    pub retry_max: Duration,
    pub shutdown_grace: Duration,
    pub max_transaction_effects: usize,
    pub max_transaction_bytes: usize,
}

#[derive(Debug, Clone)]
pub enum SourceConfig {
    Postgres(PostgresSource),
    Kafka(KafkaSource),
}

#[derive(Debug, Clone)]
pub struct PostgresSource {
    pub url: SecretString,
    pub slot: String,
    pub publication: String,
    pub create_slot: bool,
    pub create_publication: bool,
    pub status_interval: Duration,
    pub require_full_replica_identity: bool,
    /// How often a standby tries to become the slot's active consumer.
    pub standby_retry: Duration,
    /// What to do when the slot evictd streamed from is gone.
    pub on_slot_loss: OnSlotLoss,
}

/// What `run` does when the slot is missing but evictd streamed from it
/// before (the changes since its last acknowledged position are lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnSlotLoss {
    /// Refuse to start, saying what happened and what to do.
    #[default]
    Refuse,
    /// Bump every cache's namespace on every target, then stream from a
    /// new slot.
    Flush,
}

#[derive(Debug, Clone)]
pub struct KafkaSource {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub topic_pattern: Option<String>,
    pub snapshot_reads: SnapshotReads,
    pub full_row_deletes: FullRowDeletes,
    /// Topic → table overrides.
    pub tables: BTreeMap<String, String>,
    pub on_offset_reset: OnOffsetReset,
    pub max_message_bytes: usize,
    pub max_value_bytes: usize,
    pub max_decode: Duration,
    pub properties: BTreeMap<String, String>,
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
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default `source.kafka.max_value_bytes`.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

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
pub enum SnapshotReads {
    #[default]
    Ignore,
    /// Invalidate as for an insert of the row.
    Invalidate,
}

/// librdkafka properties evictd sets itself (its delivery guarantee rests
/// on them).
pub const KAFKA_OWN_PROPERTIES: &[&str] = &[
    "enable.auto.offset.store",
    "enable.auto.commit",
    "group.id",
    "bootstrap.servers",
    "enable.partition.eof",
    "auto.offset.reset",
];

#[derive(Debug, Clone)]
pub struct LookupConfig {
    /// `None` when no database is configured: look-up dependencies then
    /// cannot run, which `validate` reports if the graph has any.
    pub url: Option<SecretString>,
    pub timeout: Duration,
    pub batch_size: usize,
    pub max_connections: u32,
}

#[derive(Debug, Clone)]
pub struct DeadLetterConfig {
    pub on_error: OnError,
    /// `None` without a Postgres source or `dead_letter.url`: `run` then
    /// has nowhere to write dead letters and refuses to start.
    pub url: Option<SecretString>,
    pub schema: String,
    pub migrations: MigrationMode,
    pub lookup_attempts: u32,
    /// The dead-letter topic of a Kafka source.
    pub topic: String,
}

#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub name: String,
    pub urls: Vec<SecretString>,
    pub cluster: bool,
    /// Time to live of fill-guard stamps; `None`: no stamps written.
    pub fill_guard_ttl: Option<Duration>,
    /// Where and how batches are broadcast; `None`: not at all.
    pub broadcast: Option<BroadcastConfig>,
    /// The wait for replicas or the AOF before a batch is confirmed;
    /// `None`: confirmed when the primary replied.
    pub durability: Option<Durability>,
    /// Whether an eviction policy that can evict evictd's keys stops start-up.
    pub eviction_check: EvictionCheck,
}

/// What a pipeline waits for before its replies count as confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// Replicas that must have the pipeline's writes (`WAIT`).
    pub replicas: u32,
    /// `WAITAOF 1 replicas …`: fsynced to the AOF of the primary and of
    /// `replicas` replicas.
    pub aof: bool,
    /// The wait's timeout.
    pub timeout: Duration,
}

/// `[redis.NAME] eviction_check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionCheck {
    /// Start-up fails when the policy can evict evictd's keys.
    #[default]
    Refuse,
    /// Start-up logs a warning and goes on.
    Warn,
}

/// The broadcast of one Redis target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastConfig {
    pub channel: String,
    pub max_keys: usize,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub health: HealthThresholds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// `file:line:col`, an environment variable, or the file alone.
    pub place: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.place, self.message)
        } else {
            write!(f, "{}: {}: {}", self.place, self.field, self.message)
        }
    }
}

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lines(f, &self.0)
    }
}

/// Loads `path` with overrides from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    load_with_env(path, &env)
}

/// Loads `path` with overrides from `env` (variables named
/// `EVICTD__SECTION__KEY`; others are ignored).
pub fn load_with_env(path: &Path, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(vec![ConfigIssue {
            place: path.display().to_string(),
            field: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    let source = SourceFile::new(path, text);
    // The file alone first: its errors get a line.
    if let Err(e) = toml::from_str::<RawConfig>(&source.text) {
        let offset = e.span().map_or(0, |s| s.start);
        return Err(ConfigError(vec![ConfigIssue {
            place: source.location(offset).to_string(),
            field: source.field_at(offset).unwrap_or_default(),
            message: plain_message(e.message()),
        }]));
    }
    let overrides: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let raw = match merge(&source.text, &overrides) {
        Ok(raw) => raw,
        Err(e) => {
            // Find the variables that fail on their own, to name them.
            let mut culprits: Vec<&String> =
                overrides.iter().filter(|(k, v)| merge(&source.text, &single(k, v)).is_err()).map(|(k, _)| k).collect();
            culprits.sort();
            let place = if culprits.is_empty() {
                let mut all: Vec<&String> = overrides.keys().collect();
                all.sort();
                format!("environment ({})", all.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
            } else {
                culprits.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            };
            return Err(ConfigError(vec![ConfigIssue {
                place,
                field: String::new(),
                message: format!("override rejected: {}", plain_message(&e.to_string())),
            }]));
        }
    };
    raw.validate(&source, &overrides)
}

fn single(key: &str, value: &str) -> HashMap<String, String> {
    HashMap::from([(key.to_owned(), value.to_owned())])
}

/// The file with the environment layered on top (the `config` crate).
fn merge(text: &str, overrides: &HashMap<String, String>) -> Result<RawConfig, config::ConfigError> {
    let environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("graph.paths")
        .with_list_parse_key("source.kafka.topics")
        .source(Some(overrides.clone().into_iter().collect()));
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(environment)
        .build()
        .and_then(|c| c.try_deserialize())
}

/// A serde message in an operator's words, with any URL's password hidden
/// (a URL given where a table belongs is echoed back by serde).
fn plain_message(message: &str) -> String {
    plain_serde_message(&hide_passwords(message))
}

/// Replaces the password of every `scheme://user:password@` in `text`.
pub fn hide_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end =
            tail.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '/' | ',')).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split(':').next().unwrap_or("");
                out.push_str(user);
                if userinfo.contains(':') {
                    out.push_str(":****");
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The environment variable that overrides dotted `field`.
pub fn env_name(field: &str) -> String {
    let parts: Vec<String> = field.split('.').map(|p| p.to_uppercase()).collect();
    format!("{ENV_PREFIX}__{}", parts.join("__"))
}

struct Issues<'a> {
    source: &'a SourceFile,
    overrides: &'a HashMap<String, String>,
    list: Vec<ConfigIssue>,
}

impl Issues<'_> {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        let var = env_name(field);
        let place = if self.overrides.contains_key(&var) {
            var
        } else {
            match self.source.span_of(field) {
                Some(span) => self.source.location(span.start).to_string(),
                None => self.source.path.display().to_string(),
            }
        };
        self.list.push(ConfigIssue { place, field: field.to_owned(), message: message.into() });
    }

    /// A secret given inline or through a file; never both.
    fn secret(
        &mut self,
        field: &str,
        inline: Option<SecretString>,
        file: Option<&str>,
        base: &Path,
    ) -> Option<SecretString> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.push(&format!("{field}_file"), format!("set either `{field}` or `{field}_file`, not both"));
                None
            }
            (Some(s), None) => Some(s),
            (None, Some(f)) => {
                let path = base.join(f);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(SecretString::from(text.trim().to_owned())),
                    Err(e) => {
                        self.push(&format!("{field}_file"), format!("cannot read {}: {e}", path.display()));
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl RawConfig {
    /// Checks every value and builds the validated [`Config`].
    pub fn validate(self, source: &SourceFile, overrides: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let base = source.path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut issues = Issues { source, overrides, list: Vec::new() };

        let paths = self.graph.paths.unwrap_or_else(|| vec!["dependency-graphs".to_owned()]);
        if paths.is_empty() {
            issues.push("graph.paths", "needs at least one graph file or directory");
        }
        let graph_paths = paths.iter().map(|p| base.join(p)).collect();

        // `run` needs somewhere to read from and somewhere to apply to, and
        // `check` validates exactly what `run` will use.
        if self.source.is_none() {
            issues.push("source", "missing: add a [source] section with kind = \"postgres\" or \"kafka\"");
        }
        if self.redis.is_empty() {
            issues.push("redis", "no Redis target: add a [redis.NAME] section with a `url`");
        }
        let source_config = self.source.and_then(|s| validate_source(s, &mut issues, &base));
        let pg_url = match &source_config {
            Some(SourceConfig::Postgres(pg)) => Some(pg.url.clone()),
            _ => None,
        };
        let own_lookup_url = issues.secret("lookup.url", self.lookup.url, self.lookup.url_file.as_deref(), &base);
        if let Some(url) = &own_lookup_url {
            check_pg_url(&mut issues, "lookup.url", url);
        }
        let lookup_url = own_lookup_url.or(pg_url.clone());
        let lookup = LookupConfig {
            url: lookup_url,
            timeout: Duration::from_millis(positive(&mut issues, "lookup.timeout_ms", self.lookup.timeout_ms, 2000)),
            batch_size: positive(&mut issues, "lookup.batch_size", self.lookup.batch_size.map(|v| v as u64), 1000)
                as usize,
            max_connections: positive(
                &mut issues,
                "lookup.max_connections",
                self.lookup.max_connections.map(u64::from),
                4,
            ) as u32,
        };

        let max_delay_ms = self.batch.max_delay_ms.unwrap_or(1);
        if max_delay_ms > 60_000 {
            issues.push("batch.max_delay_ms", "must be at most 60000 (a minute)");
        }
        let batch = BatchLimits {
            max_effects: positive(&mut issues, "batch.max_effects", self.batch.max_effects.map(|v| v as u64), 1000)
                as usize,
            max_delay: Duration::from_millis(max_delay_ms),
            max_bytes: positive(&mut issues, "batch.max_bytes", self.batch.max_bytes, 8 << 20) as usize,
        };
        let run = RunConfig {
            retry_max: Duration::from_millis(positive(&mut issues, "run.retry_max_ms", self.run.retry_max_ms, 5000)),
            shutdown_grace: Duration::from_millis(positive(
                &mut issues,
                "run.shutdown_grace_ms",
                self.run.shutdown_grace_ms,
                10_000,
            )),
            max_transaction_effects: positive(
                &mut issues,
                "run.max_transaction_effects",
                self.run.max_transaction_effects.map(|v| v as u64),
                100_000,
            ) as usize,
            max_transaction_bytes: positive(
                &mut issues,
                "run.max_transaction_bytes",
                self.run.max_transaction_bytes,
                16 << 20,
            ) as usize,
        };

        let dead_letter = validate_dead_letter(self.dead_letter, &mut issues, &base, pg_url);

        let mut redis = Vec::new();
        for (name, target) in self.redis {
            let field = format!("redis.{name}");
            if !is_identifier(&name) {
                issues.push(&field, format!("target name `{name}` must use lowercase letters, digits and `_`"));
            }
            let Some(url) = issues.secret(&format!("{field}.url"), target.url, target.url_file.as_deref(), &base)
            else {
                if !issues.list.iter().any(|i| i.field.starts_with(&field)) {
                    issues.push(&field, "needs `url` (or `url_file`)");
                }
                continue;
            };
            let cluster = target.cluster.unwrap_or(false);
            let urls: Vec<SecretString> =
                url.expose_secret().split(',').map(|u| SecretString::from(u.trim().to_owned())).collect();
            if urls.len() > 1 && !cluster {
                issues.push(&format!("{field}.url"), "several URLs are only for a Cluster: set `cluster = true`");
            }
            for u in &urls {
                if let Err(e) = redis::Client::open(u.expose_secret()) {
                    let reason = e.to_string().replace(u.expose_secret(), "****");
                    issues.push(&format!("{field}.url"), format!("not a Redis URL ({reason})"));
                }
            }
            let fill_guard_ttl = target.fill_guard.unwrap_or(true).then(|| {
                Duration::from_millis(positive(
                    &mut issues,
                    &format!("{field}.fill_guard_ttl_ms"),
                    target.fill_guard_ttl_ms,
                    60_000,
                ))
            });
            let channel = target.broadcast_channel.unwrap_or_else(|| "evictd:invalidations".to_owned());
            if channel.is_empty() {
                issues.push(
                    &format!("{field}.broadcast_channel"),
                    "must not be empty (set `broadcast = false` to turn the broadcast off)",
                );
            }
            let max_keys = positive(
                &mut issues,
                &format!("{field}.broadcast_max_keys"),
                target.broadcast_max_keys.map(|v| v as u64),
                10_000,
            ) as usize;
            let broadcast = target.broadcast.unwrap_or(true).then_some(BroadcastConfig { channel, max_keys });
            let wait_timeout = Duration::from_millis(positive(
                &mut issues,
                &format!("{field}.wait_timeout_ms"),
                target.wait_timeout_ms,
                1000,
            ));
            let replicas = target.wait_replicas.unwrap_or(0);
            let aof = target.wait_aof.unwrap_or(false);
            let durability = (replicas > 0 || aof).then_some(Durability { replicas, aof, timeout: wait_timeout });
            let eviction_check = match target.eviction_check.as_deref().unwrap_or("refuse") {
                "refuse" => EvictionCheck::Refuse,
                "warn" => EvictionCheck::Warn,
                other => {
                    issues.push(
                        &format!("{field}.eviction_check"),
                        format!("unknown value `{other}` (expected refuse or warn)"),
                    );
                    EvictionCheck::Refuse
                }
            };
            redis.push(RedisTarget { name, urls, cluster, fill_guard_ttl, broadcast, durability, eviction_check });
        }

        let listen_text = self.server.listen.unwrap_or_else(|| "127.0.0.1:9187".to_owned());
        let listen = match SocketAddr::from_str(&listen_text) {
            Ok(a) => a,
            Err(_) => {
                issues.push("server.listen", format!("`{listen_text}` is not an address like 127.0.0.1:9187"));
                SocketAddr::from(([127, 0, 0, 1], 9187))
            }
        };
        let defaults = HealthThresholds::default();
        let default_timeout_ms = u64::try_from(defaults.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
        let health = HealthThresholds {
            heartbeat_timeout: Duration::from_millis(positive(
                &mut issues,
                "server.heartbeat_timeout_ms",
                self.server.heartbeat_timeout_ms,
                default_timeout_ms,
            )),
            max_lag_bytes: positive(
                &mut issues,
                "server.ready_max_lag_bytes",
                self.server.ready_max_lag_bytes,
                defaults.max_lag_bytes,
            ),
        };
        let format = match self.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                issues.push("log.format", format!("unknown format `{other}` (expected text or json)"));
                LogFormat::Text
            }
        };
        let level = self.log.level.unwrap_or_else(|| "info".to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            issues.push("log.level", format!("not a log filter: {e}"));
        }

        if !issues.list.is_empty() {
            return Err(ConfigError(issues.list));
        }
        Ok(Config {
            file: source.path.to_path_buf(),
            graph_paths,
            source: source_config,
            lookup,
            batch,
            run,
            dead_letter,
            redis,
            server: ServerConfig { listen, health },
            log: LogConfig { format, level },
        })
    }
}

fn positive(issues: &mut Issues<'_>, field: &str, value: Option<u64>, default: u64) -> u64 {
    match value {
        Some(0) => {
            issues.push(field, "must be greater than 0");
            default
        }
        Some(v) => v,
        None => default,
    }
}

fn check_pg_url(issues: &mut Issues<'_>, field: &str, url: &SecretString) {
    let text = url.expose_secret();
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        let scheme = text.split_once("://").map_or("none", |(s, _)| s);
        issues.push(field, format!("not a Postgres URL (scheme `{scheme}`; expected postgres:// or postgresql://)"));
        return;
    }
    // The parse error never contains the URL itself.
    if let Err(e) = sqlx::postgres::PgConnectOptions::from_str(url.expose_secret()) {
        let reason = match e {
            sqlx::Error::Configuration(inner) => inner.to_string(),
            _ => "unreadable".to_owned(),
        };
        let reason = if reason.contains(url.expose_secret()) { "unreadable".to_owned() } else { reason };
        issues.push(field, format!("not a Postgres URL ({reason})"));
    }
}

fn validate_dead_letter(
    raw: RawDeadLetter,
    issues: &mut Issues<'_>,
    base: &Path,
    source_url: Option<SecretString>,
) -> DeadLetterConfig {
    let on_error = match raw.on_error.as_deref().unwrap_or("dead_letter") {
        "dead_letter" => OnError::DeadLetter,
        "stop" => OnError::Stop,
        other => {
            issues.push("dead_letter.on_error", format!("unknown value `{other}` (expected dead_letter or stop)"));
            OnError::DeadLetter
        }
    };
    let own_url = issues.secret("dead_letter.url", raw.url, raw.url_file.as_deref(), base);
    if let Some(url) = &own_url {
        check_pg_url(issues, "dead_letter.url", url);
    }
    let schema = raw.schema.unwrap_or_else(|| "evictd".to_owned());
    if !is_identifier(&schema) {
        issues.push(
            "dead_letter.schema",
            format!("`{schema}` is not a schema name (lowercase letters, digits and `_`, at most 63)"),
        );
    }
    let migrations = match raw.migrations.as_deref().unwrap_or("apply") {
        "apply" => MigrationMode::Apply,
        "verify" => MigrationMode::Verify,
        other => {
            issues.push("dead_letter.migrations", format!("unknown value `{other}` (expected apply or verify)"));
            MigrationMode::Apply
        }
    };
    let lookup_attempts =
        positive(issues, "dead_letter.lookup_attempts", raw.lookup_attempts.map(u64::from), 5).min(1_000) as u32;
    let topic = raw.topic.unwrap_or_else(|| "evictd.dead-letters".to_owned());
    if topic.is_empty() || topic.len() > 249 || !topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        issues
            .push("dead_letter.topic", format!("`{topic}` is not a Kafka topic name (letters, digits, `.`, `_`, `-`)"));
    }
    DeadLetterConfig { on_error, url: own_url.or(source_url), schema, migrations, lookup_attempts, topic }
}

fn validate_source(raw: RawSource, issues: &mut Issues<'_>, base: &Path) -> Option<SourceConfig> {
    match raw.kind.as_str() {
        "postgres" => {
            let Some(pg) = raw.postgres else {
                issues.push("source", "kind = \"postgres\" needs a [source.postgres] section");
                return None;
            };
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
                    format!(
                        "`{publication}` is not a publication name (lowercase letters, digits and `_`, at most 63)"
                    ),
                );
            }
            let interval = pg.status_interval_ms.unwrap_or(1000);
            if !(100..=10_000).contains(&interval) {
                issues.push(
                    "source.postgres.status_interval_ms",
                    "must be between 100 and 10000 (keep it under half of wal_sender_timeout)",
                );
            }
            let on_slot_loss = match pg.on_slot_loss.as_deref().unwrap_or("refuse") {
                "refuse" => OnSlotLoss::Refuse,
                "flush" => OnSlotLoss::Flush,
                other => {
                    issues.push(
                        "source.postgres.on_slot_loss",
                        format!("unknown value `{other}` (expected refuse or flush)"),
                    );
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
                standby_retry: Duration::from_millis(positive(
                    issues,
                    "source.postgres.standby_retry_ms",
                    pg.standby_retry_ms,
                    1000,
                )),
            }))
        }
        "kafka" => {
            let Some(kafka) = raw.kafka else {
                issues.push("source", "kind = \"kafka\" needs a [source.kafka] section");
                return None;
            };
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
                    issues.push(
                        "source.kafka.on_offset_reset",
                        format!("unknown value `{other}` (expected stop or flush)"),
                    );
                    OnOffsetReset::Stop
                }
            };
            let max_message_bytes = positive(
                issues,
                "source.kafka.max_message_bytes",
                kafka.max_message_bytes,
                DEFAULT_MAX_MESSAGE_BYTES as u64,
            ) as usize;
            let max_value_bytes =
                positive(issues, "source.kafka.max_value_bytes", kafka.max_value_bytes, DEFAULT_MAX_VALUE_BYTES as u64)
                    as usize;
            let max_decode =
                Duration::from_millis(positive(issues, "source.kafka.max_decode_ms", kafka.max_decode_ms, 1000));
            let mut client = rdkafka::ClientConfig::new();
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
                client.set(key, value);
            }
            client.set("bootstrap.servers", &kafka.brokers);
            client.set("group.id", kafka.group_id.as_deref().unwrap_or("evictd"));
            if let Err(e) = client.create::<rdkafka::consumer::BaseConsumer>() {
                issues.push("source.kafka.properties", format!("rejected by librdkafka: {e}"));
            }
            Some(SourceConfig::Kafka(KafkaSource {
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
            }))
        }
        other => {
            issues.push("source.kind", format!("unknown source `{other}` (expected postgres or kafka)"));
            None
        }
    }
}

/// A URL with its password replaced by `****`, for logs and `check`.
pub fn redact_url(url: &SecretString) -> String {
    let text = url.expose_secret();
    let Some((scheme, rest)) = text.split_once("://") else {
        return "****".to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let shown = if userinfo.contains(':') { format!("{user}:****") } else { user.to_owned() };
            let tail = tail.split('?').next().unwrap_or("");
            format!("{scheme}://{shown}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{}", tail.split('?').next().unwrap_or("")),
    }
}

#[cfg(test)]
mod tests;
