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

mod dead_letter;
mod issues;
mod load;
pub(crate) mod pg_url;
mod raw;
mod redis;
mod secrets;
mod settings;
mod source;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

use self::dead_letter::validate_dead_letter;
use self::issues::{Issues, positive};
use self::redis::validate_redis;
use self::secrets::check_pg_url;
use self::source::validate_source;
use crate::diagnostic::SourceFile;

pub(crate) use self::dead_letter::DeadLetterConfig;
pub(crate) use self::issues::ConfigError;
pub(crate) use self::load::{load_text, load_with_env};
pub(crate) use self::raw::RawConfig;
pub use self::redis::{BroadcastConfig, Durability, EvictionCheck, RedisTarget, RedisTls, Transport};
pub(crate) use self::secrets::{hide_passwords, redact_url};
pub(crate) use self::secrets::{hide_property_secrets, is_secret_property, redact_properties};
pub(crate) use self::settings::{BatchLimits, MigrationMode, OnError};
pub use self::settings::{HealthThresholds, ServerLimits};
pub(crate) use self::source::{DEFAULT_LOCK_LEASE_MS, FullRowDeletes, LOCK_ROUND_TRIP, OnSlotLoss, PostgresSource};
pub(crate) use self::source::{DEFAULT_MAX_VALUE_BYTES, KAFKA_OWN_PROPERTIES, SnapshotReads, SourceConfig};
pub use self::source::{KafkaSource, OnOffsetReset};

/// The environment variable prefix: `EVICTD__BATCH__MAX_EFFECTS`.
pub(crate) const ENV_PREFIX: &str = "EVICTD";

/// The validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Where the config was read from.
    pub(crate) file: PathBuf,
    pub(crate) graph_paths: Vec<PathBuf>,
    pub(crate) source: Option<SourceConfig>,
    pub(crate) lookup: LookupConfig,
    pub(crate) batch: BatchLimits,
    pub(crate) run: RunConfig,
    pub(crate) dead_letter: DeadLetterConfig,
    pub(crate) redis: Vec<RedisTarget>,
    pub(crate) server: ServerConfig,
    pub(crate) log: LogConfig,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RunConfig {
    pub(crate) retry_max: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) max_transaction_effects: usize,
    pub(crate) max_transaction_bytes: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct LookupConfig {
    /// `None` when no database is configured: look-up dependencies then
    /// cannot run, which `validate` reports if the graph has any.
    pub(crate) url: Option<SecretString>,
    pub(crate) timeout: Duration,
    pub(crate) batch_size: usize,
    pub(crate) max_connections: u32,
}

/// The longest `server.*_timeout_ms` (an hour: past that a timeout no
/// longer protects anything).
const MAX_SERVER_TIMEOUT_MS: u64 = 3_600_000;

/// The most `server.max_connections` (each is a task and a socket).
const MAX_SERVER_CONNECTIONS: usize = 100_000;

/// `value` (or `default`) when it is 1 to `max`; otherwise an issue, and
/// the default.
fn between(issues: &mut Issues<'_>, field: &str, value: Option<u64>, default: u64, max: u64) -> u64 {
    match value {
        Some(v) if v == 0 || v > max => {
            issues.push(field, format!("must be between 1 and {max}"));
            default
        }
        Some(v) => v,
        None => default,
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) health: HealthThresholds,
    pub(crate) limits: ServerLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub(crate) struct LogConfig {
    pub(crate) format: LogFormat,
    pub(crate) level: String,
}

/// Loads `path` with overrides from the process environment.
pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    load_with_env(path, &env)
}

impl RawConfig {
    /// Checks every value and builds the validated [`Config`].
    pub(crate) fn validate(
        self,
        source: &SourceFile,
        overrides: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
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
            if let Some(target) = validate_redis(name, target, &mut issues, &base) {
                redis.push(target);
            }
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
        let defaults = ServerLimits::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let limits = ServerLimits {
            header_read_timeout: Duration::from_millis(between(
                &mut issues,
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
                ms(defaults.header_read_timeout),
                MAX_SERVER_TIMEOUT_MS,
            )),
            request_timeout: Duration::from_millis(between(
                &mut issues,
                "server.request_timeout_ms",
                self.server.request_timeout_ms,
                ms(defaults.request_timeout),
                MAX_SERVER_TIMEOUT_MS,
            )),
            max_connections: between(
                &mut issues,
                "server.max_connections",
                self.server.max_connections,
                defaults.max_connections as u64,
                MAX_SERVER_CONNECTIONS as u64,
            ) as usize,
        };
        let format = match self.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                issues.push("log.format", format!("unknown format `{other}` (expected text or json)"));
                LogFormat::Text
            }
        };
        let level = self.log.level.map_or_else(|| "info".to_owned(), |level| trimmed_directives(&level));
        if let Err(e) = log_filter(&level) {
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
            server: ServerConfig { listen, health, limits },
            log: LogConfig { format, level },
        })
    }
}

#[cfg(test)]
mod tests;

/// The daemon's log filter for a `log.level`. Field values in span filters
/// (`[span{field=value}]`) are matched as text, not compiled as regular
/// expressions: a 400-byte pattern built a regex automaton of gigabytes for
/// minutes (found by the `config` fuzz target,
/// `fuzz/regressions/config/log-level-field-pattern-regex-blowup.toml`).
///
/// The one parser of log filters: `log.level`, and `EVICTD_LOG` for the
/// commands other than `run` ([`stderr_log_filter`]).
pub(crate) fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder().with_regex(false).parse(trimmed_directives(level))
}

/// `level`'s comma-separated directives, each trimmed. tracing-subscriber
/// 0.3 reads each directive trimmed but slices the untrimmed text with the
/// trimmed offsets: after a space, `info, evictd=debug` was refused (target
/// ` evict`, level `d=debug`) and a non-ASCII target panicked.
fn trimmed_directives(level: &str) -> String {
    level.split(',').map(str::trim).collect::<Vec<_>>().join(",")
}

/// The filter of the commands that log to stderr (all but `run`, which logs
/// as its config says): `EVICTD_LOG`, read as `log.level` is, or `warn` when
/// it is unset or not a filter.
pub fn stderr_log_filter() -> tracing_subscriber::EnvFilter {
    std::env::var("EVICTD_LOG")
        .ok()
        .and_then(|level| log_filter(&level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"))
}
