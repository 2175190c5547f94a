//! The daemon: `evictd run` once the command line has loaded and validated
//! the config and the graph.
//!
//! Start-up, in order: the logger, one runtime, signals, the HTTP server
//! (`/metrics`, `/healthz`, `/readyz`), then the wiring of the source's
//! pipeline (`wiring.rs`: the dead-letter store and evictd's migrations,
//! the Redis targets and their start-up check, the look-up pool) and one
//! [`supervisor`] over the source's sessions:
//!
//! - Postgres (`postgres.rs`): a replica holds the slot's advisory lock to
//!   be active; without it, it waits as a standby. Losing the lock's
//!   session steps it down. While active, replication sessions follow one
//!   another, each started through `slot_history.rs`.
//! - Kafka (`kafka.rs`): every replica is an active member of the consumer
//!   group; consumers follow one another, each resuming from the group's
//!   committed offsets.
//!
//! **Invariants:**
//! - **Nothing starts consuming before every Redis target passed its
//!   start-up check and the dead-letter store is ready** (its migrations
//!   applied or verified).
//! - **A standby starts only once the active replica's last
//!   acknowledgement went out**: the slot's lock is released only after
//!   the active replica's sessions have stopped.
//! - **Shutdown**: the first SIGTERM or SIGINT stops the reading, flushes
//!   what is complete and acknowledges it; after `run.shutdown_grace_ms` the
//!   process exits anyway (exit 1; nothing unconfirmed was acknowledged, so
//!   nothing is lost). A second signal exits at once (130). The HTTP server
//!   stops last, so the probes answer while the loop flushes.
//! - **Exit codes** ([`DaemonError::exit_code`]): 2 for bad input or a
//!   setup an operator must fix before starting, 1 for anything else.
//!   Whether a failure of the source, a sink or the dead-letter store is
//!   retried, stops (1) or refuses (2) is [`crate::policy::decide`]'s call;
//!   when the daemon stops on one, its hint is logged with it.

mod kafka;
mod postgres;
mod slot_history;
mod supervisor;
pub(crate) mod wiring;

pub(crate) use kafka::check_client as check_kafka_client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat, SourceConfig};
use crate::dead_letter::DeadLetterError;
use crate::graph::Graph;
use crate::metrics::Metrics;
use crate::policy::{self, Failure, Verdict};
use crate::run::RunError;
use crate::server::{Health, ServerState};
use crate::sink::SinkError;
pub(crate) use supervisor::StartError;

/// Why the daemon did not start, or stopped: each cause typed, as its
/// `#[source]` where it has one; the texts are the ones the daemon has
/// always printed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error("{}: source: missing", .0.display())]
    NoSource(PathBuf),
    #[error("log.level: {0}")]
    LogLevel(#[source] tracing_subscriber::filter::ParseError),
    #[error("cannot install the logger: {0}")]
    Logger(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("server.listen: cannot listen on {address}: {error}")]
    Listen {
        address: SocketAddr,
        #[source]
        error: std::io::Error,
    },
    /// What the Redis targets' start-up checks found wrong, one per line.
    #[error("{}", .0.join("\n"))]
    RedisSetup(Vec<String>),
    /// A Redis target failed at start-up in a way the policy stops on.
    #[error("{0}")]
    Redis(#[source] SinkError),
    #[error(
        "{}: dead_letter.url: no database for dead letters: set `dead_letter.url` or use a Postgres source",
        .0.display()
    )]
    NoDeadLetterDatabase(PathBuf),
    /// `dead_letter.url` cannot be used (not a Postgres URL).
    #[error("{0}")]
    DeadLetterUrl(#[source] DeadLetterError),
    /// Applying or verifying evictd's migrations failed in a way the
    /// policy stops on.
    #[error("{0}")]
    DeadLetters(#[source] DeadLetterError),
    #[error("lookup.url: not a Postgres URL")]
    LookupUrl(#[source] sqlx::Error),
    /// librdkafka refused the Kafka source's client properties.
    #[error("{0}")]
    KafkaClient(#[source] kafka::ClientRejected),
    /// The dead-letter topic's producer could not be created (the Kafka
    /// source gives its reason as text).
    #[error("dead_letter.topic: {0}")]
    KafkaDeadLetters(String),
    /// A session could not start, and the policy stops on it.
    #[error("{0}")]
    Start(#[source] StartError),
    /// The run loop stopped.
    #[error("{0}")]
    Run(#[source] RunError),
}

impl DaemonError {
    /// The policy's verdict, for the failures it classifies.
    fn verdict(&self) -> Option<Verdict> {
        let failure = match self {
            DaemonError::Redis(e) => Failure::Sink(e),
            DaemonError::DeadLetters(e) => Failure::DeadLetterStore(e),
            DaemonError::Start(e) => e.failure(),
            DaemonError::Run(e) => Failure::in_chain(e)?,
            _ => return None,
        };
        Some(policy::decide(failure))
    }

    /// 2: bad input, or a setup that contradicts the config or the graph
    /// (an operator fixes it before starting again); 1: anything else.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            DaemonError::NoSource(_)
            | DaemonError::LogLevel(_)
            | DaemonError::RedisSetup(_)
            | DaemonError::NoDeadLetterDatabase(_)
            | DaemonError::DeadLetterUrl(_)
            | DaemonError::KafkaClient(_)
            | DaemonError::LookupUrl(_) => 2,
            DaemonError::Logger(_)
            | DaemonError::Runtime(_)
            | DaemonError::Listen { .. }
            | DaemonError::KafkaDeadLetters(_)
            | DaemonError::Run(_) => 1,
            DaemonError::Redis(_) | DaemonError::DeadLetters(_) | DaemonError::Start(_) => {
                if self.verdict().is_some_and(|v| v.refused) { 2 } else { 1 }
            }
        }
    }

    /// What the operator should check: the policy's hint where it
    /// classified the failure.
    pub(crate) fn hint(&self) -> &'static str {
        if let Some(verdict) = self.verdict() {
            return verdict.hint;
        }
        match self {
            DaemonError::NoSource(_)
            | DaemonError::LogLevel(_)
            | DaemonError::NoDeadLetterDatabase(_)
            | DaemonError::DeadLetterUrl(_)
            | DaemonError::LookupUrl(_) => "fix the config file (`evictd check --config` validates it), then restart",
            DaemonError::RedisSetup(_) => {
                "fix each Redis target as the lines say (eviction policy, persistence), then restart; \
                 `evictd check --config` reports the same"
            }
            DaemonError::Listen { .. } => {
                "another process holds server.listen's address, or it is not this host's; free it or change server.listen"
            }
            DaemonError::KafkaClient(_) => {
                "librdkafka does not accept this property or value; fix it in source.kafka.properties, then restart"
            }
            DaemonError::KafkaDeadLetters(_) => {
                "check dead_letter.topic and the producer properties in source.kafka.properties, then restart"
            }
            DaemonError::Logger(_) | DaemonError::Runtime(_) => "the process could not set itself up; check its limits",
            DaemonError::Run(_) | DaemonError::Redis(_) | DaemonError::DeadLetters(_) | DaemonError::Start(_) => {
                "evictd stopped without acknowledging anything unconfirmed; fix the cause above, then restart: \
                 the source resumes from the last acknowledged position"
            }
        }
    }
}

/// Runs the daemon over a validated config and graph until shutdown; blocks.
pub(crate) fn run(config: Config, graph: Graph) -> Result<(), DaemonError> {
    if config.source.is_none() {
        return Err(DaemonError::NoSource(config.file.clone()));
    }
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(daemon(config, graph))
}

fn init_logging(config: &Config) -> Result<(), DaemonError> {
    let filter = crate::config::log_filter(&config.log.level).map_err(DaemonError::LogLevel)?;
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    installed.map_err(DaemonError::Logger)
}

/// Cancels `shutdown` on the first SIGTERM/SIGINT, exits after the grace
/// period, and at once on a second signal.
fn watch_signals(shutdown: CancellationToken, grace: Duration) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        let signal = async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        };
        let first = signal.await;
        tracing::info!(signal = first, grace_ms = grace.as_millis() as u64, "shutting down");
        shutdown.cancel();
        tokio::select! {
            () = tokio::time::sleep(grace) => {
                tracing::warn!("grace period over: exiting with the last confirmed position acknowledged");
                std::process::exit(1);
            }
            _ = term.recv() => std::process::exit(130),
            _ = tokio::signal::ctrl_c() => std::process::exit(130),
        }
    });
}

async fn daemon(config: Config, graph: Graph) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone(), config.run.shutdown_grace);
    let graph = Arc::new(graph);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(config.server.health, config.redis.iter().map(|t| t.name.clone())));
    for target in &config.redis {
        metrics.sink_target(&target.name);
    }
    health.export_to(metrics.clone());
    // The HTTP server stops last, so the probes answer while the loop flushes.
    let server_stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|error| DaemonError::Listen { address: config.server.listen, error })?;
    let address = listener.local_addr().map_or_else(|_| config.server.listen.to_string(), |a| a.to_string());
    tracing::info!(%address, "serving /metrics, /healthz, /readyz");
    let state = ServerState { metrics: metrics.clone(), health: health.clone() };
    let server = tokio::spawn(crate::server::serve_with(listener, state, config.server.limits, server_stop.clone()));
    let shared = wiring::Shared { config: &config, graph, metrics, health, shutdown: &shutdown };
    let result = match &config.source {
        Some(SourceConfig::Postgres(pg)) => postgres::run(shared, pg).await,
        Some(SourceConfig::Kafka(kafka)) => kafka::run(shared, kafka).await,
        None => Err(DaemonError::NoSource(config.file.clone())),
    };
    if let Err(e) = &result {
        // The final error line says what failed; this says what to do.
        tracing::error!(error = %e, hint = e.hint(), "stopping");
    }
    server_stop.cancel();
    let _ = server.await;
    result
}
