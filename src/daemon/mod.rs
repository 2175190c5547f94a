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
//! - **Exit codes**: [`DaemonError::Refused`] is bad input or a setup an
//!   operator must fix before starting (2); [`DaemonError::Failed`] is
//!   anything else (1).

mod kafka;
mod postgres;
mod slot_history;
mod supervisor;
pub(crate) mod wiring;

pub(crate) use kafka::check_client as check_kafka_client;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat, SourceConfig};
use crate::graph::Graph;
use crate::metrics::Metrics;
use crate::server::{Health, ServerState};

/// Why the daemon did not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    /// Bad config or a setup that contradicts it (publication, migrations,
    /// Redis eviction policy): exit 2.
    #[error("{0}")]
    Refused(String),
    /// Anything else: exit 1.
    #[error("{0}")]
    Failed(String),
}

/// Runs the daemon over a validated config and graph until shutdown; blocks.
pub(crate) fn run(config: Config, graph: Graph) -> Result<(), DaemonError> {
    if config.source.is_none() {
        return Err(DaemonError::Refused(format!("{}: source: missing", config.file.display())));
    }
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(daemon(config, graph))
}

fn init_logging(config: &Config) -> Result<(), DaemonError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .map_err(|e| DaemonError::Refused(format!("log.level: {e}")))?;
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    installed.map_err(|e| DaemonError::Failed(format!("cannot install the logger: {e}")))
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
    // The HTTP server stops last, so the probes answer while the loop flushes.
    let server_stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| DaemonError::Failed(format!("server.listen: cannot listen on {}: {e}", config.server.listen)))?;
    let address = listener.local_addr().map_or_else(|_| config.server.listen.to_string(), |a| a.to_string());
    tracing::info!(%address, "serving /metrics, /healthz, /readyz");
    let state = ServerState { metrics: metrics.clone(), health: health.clone() };
    let server = tokio::spawn(crate::server::serve(listener, state, server_stop.clone()));
    let shared = wiring::Shared { config: &config, graph, metrics, health, shutdown: &shutdown };
    let result = match &config.source {
        Some(SourceConfig::Postgres(pg)) => postgres::run(shared, pg).await,
        Some(SourceConfig::Kafka(kafka)) => kafka::run(shared, kafka).await,
        None => Err(DaemonError::Refused(format!("{}: source: missing", config.file.display()))),
    };
    server_stop.cancel();
    let _ = server.await;
    result
}
