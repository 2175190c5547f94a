//! `evictd run --config FILE`: the daemon.
//!
//! Validation first (the same `prepare` as `check`; bad input exits 2
//! before anything starts), then one runtime: signals, the dead-letter
//! store and evictd's migrations (applied, or verified: pending ones exit 2),
//! the Redis targets, the look-up pool; then, as a standby, waiting for the
//! slot's lock (`source::postgres::lock`), and once active, source sessions
//! one after another — a lost connection is retried with backoff and resumes
//! from the slot. Losing the lock's session steps the replica down to standby.
//!
//! Shutdown: the first SIGTERM or SIGINT stops the reading, flushes what is
//! complete and acknowledges it; after `run.shutdown_grace_ms` the process
//! exits anyway (nothing unconfirmed was acknowledged, so nothing is lost).
//! A second signal exits at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::{CliError, prepare};
use crate::config::{Config, KafkaSource as KafkaConfig, LogFormat, PostgresSource as PostgresConfig, SourceConfig};
use crate::dead_letter::{DeadLetterError, DeadLetters};
use crate::graph::Graph;
use crate::metrics::Metrics;
use crate::resolve::PgLookupExecutor;
use crate::run::{Pipeline, RunOptions, SessionEnd, TransactionLimits};
use crate::server::{Health, Role, ServerState};
use crate::sink::multi::MultiSink;
use crate::sink::redis::RedisSink;
use crate::sink::{Sink as _, SinkError};
use crate::source::kafka::{KafkaDeadLetters, KafkaSource};
use crate::source::postgres::SourceSetupError;
use crate::source::postgres::lock::SlotLock;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file (`evictd.toml`); see evictd.example.toml.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let prepared = prepare(Some(&args.config), &[])?;
    let Some(config) = prepared.config else {
        return Err(CliError::Input("evictd run needs --config".into()));
    };
    let source = match &config.source {
        Some(SourceConfig::Postgres(pg)) => Consumer::Postgres(pg.clone()),
        Some(SourceConfig::Kafka(kafka)) => Consumer::Kafka(kafka.clone()),
        None => return Err(CliError::Input(format!("{}: source: missing", config.file.display()))),
    };
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(daemon(config, source, prepared.graph))
}

/// The source a daemon consumes.
enum Consumer {
    Postgres(PostgresConfig),
    Kafka(KafkaConfig),
}

fn init_logging(config: &Config) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .map_err(|e| CliError::Input(format!("log.level: {e}")))?;
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    installed.map_err(|e| CliError::Runtime(format!("cannot install the logger: {e}")))
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

/// Sleeps `backoff` unless shutdown comes first; returns the next backoff.
async fn pause(backoff: Duration, max: Duration, shutdown: &CancellationToken) -> Option<Duration> {
    tokio::select! {
        () = tokio::time::sleep(backoff) => Some((backoff * 2).min(max)),
        () = shutdown.cancelled() => None,
    }
}

/// Connects every Redis target and runs its start-up check
/// ([`RedisSink::check_setup`]): warnings are logged, errors refuse to start
/// (exit 2). `graph` tells whether tag registries must be spared.
pub(super) async fn connect_sinks(
    config: &Config,
    graph: &Graph,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Option<MultiSink<RedisSink>>, CliError> {
    let tags = graph.dependencies().iter().any(|d| matches!(d.mapping, crate::graph::Mapping::Tags(_)));
    let mut targets = Vec::new();
    for target in &config.redis {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected = match RedisSink::connect(target).await {
                Ok(sink) => sink.check_setup(target, tags).await.map(|findings| (sink, findings)),
                Err(e) => Err(e),
            };
            match connected {
                Ok((sink, findings)) => {
                    for warning in &findings.warnings {
                        tracing::warn!(target = %target.name, "{warning}");
                    }
                    if !findings.errors.is_empty() {
                        return Err(CliError::Input(findings.errors.join("\n")));
                    }
                    sink.observe(metrics.clone());
                    targets.push(sink);
                    break;
                }
                Err(SinkError::Transient { message, .. }) => {
                    tracing::warn!(target = %target.name, error = %message, "Redis target unreachable; retrying");
                    match pause(backoff, config.run.retry_max, shutdown).await {
                        Some(next) => backoff = next,
                        None => return Ok(None),
                    }
                }
                Err(e @ SinkError::Definite { .. }) => return Err(CliError::Runtime(e.to_string())),
            }
        }
    }
    Ok(Some(MultiSink::new(targets)))
}

/// Behind bumps of every target count in `evictd_versions_behind_total`.
fn count_versions_behind(sink: &MultiSink<RedisSink>, metrics: &Metrics) {
    for target in sink.targets() {
        target.count_versions_behind(metrics.versions_behind(target.name()));
    }
}

/// How long one statement against the dead-letter database may take.
pub(super) const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);

/// The dead-letter store, connected lazily, from `[dead_letter]`.
pub(super) fn dead_letter_store(config: &Config) -> Result<DeadLetters, CliError> {
    let Some(url) = &config.dead_letter.url else {
        return Err(CliError::Input(format!(
            "{}: dead_letter.url: no database for dead letters: set `dead_letter.url` or use a Postgres source",
            config.file.display()
        )));
    };
    DeadLetters::connect_lazy(url, &config.dead_letter.schema, DEAD_LETTER_TIMEOUT)
        .map_err(|e| CliError::Input(e.to_string()))
}

/// Connects the dead-letter store and applies (or verifies) evictd's
/// migrations before anything is consumed: an unreachable database is
/// waited for; pending migrations under `migrations = "verify"` exit 2.
/// `None` when shutdown came first.
async fn open_dead_letters(
    config: &Config,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<DeadLetters>, CliError> {
    let store = dead_letter_store(config)?;
    metrics.dead_letter_store();
    let mut backoff = Duration::from_millis(100);
    loop {
        match store.migrate(config.dead_letter.migrations).await {
            Ok(report) => {
                for name in &report.applied {
                    tracing::info!(schema = store.schema(), migration = %name, "applied a migration");
                }
                return Ok(Some(store));
            }
            Err(e @ DeadLetterError::Pending { .. }) => return Err(CliError::Input(e.to_string())),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "dead-letter database unavailable; retrying");
                match pause(backoff, config.run.retry_max, shutdown).await {
                    Some(next) => backoff = next,
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(CliError::Runtime(e.to_string())),
        }
    }
}

async fn daemon(config: Config, source: Consumer, graph: Graph) -> Result<(), CliError> {
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
        .map_err(|e| CliError::Runtime(format!("server.listen: cannot listen on {}: {e}", config.server.listen)))?;
    let address = listener.local_addr().map_or_else(|_| config.server.listen.to_string(), |a| a.to_string());
    tracing::info!(%address, "serving /metrics, /healthz, /readyz");
    let state = ServerState { metrics: metrics.clone(), health: health.clone() };
    let server = tokio::spawn(crate::server::serve(listener, state, server_stop.clone()));
    let result = match source {
        Consumer::Postgres(pg) => work(&config, pg, graph, metrics, health, &shutdown).await,
        Consumer::Kafka(kafka) => work_kafka(&config, kafka, graph, metrics, health, &shutdown).await,
    };
    server_stop.cancel();
    let _ = server.await;
    result
}

async fn work(
    config: &Config,
    source_config: PostgresConfig,
    graph: Arc<Graph>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: &CancellationToken,
) -> Result<(), CliError> {
    let shutdown = shutdown.clone();
    let lookups = lookup_executor(config)?;
    let Some(dead_letters) = open_dead_letters(config, &metrics, &shutdown).await? else { return Ok(()) };
    let Some(sink) = connect_sinks(config, &graph, &metrics, &shutdown).await? else { return Ok(()) };
    count_versions_behind(&sink, &metrics);
    // Connected: reachable until a batch says otherwise.
    health.set_all_sinks_reachable();
    let options = run_options(config);
    let dead_letters = Arc::new(dead_letters);
    let pipeline =
        Pipeline { graph: graph.clone(), sink: Arc::new(sink), lookups, dead_letters, options, metrics, health };
    while !shutdown.is_cancelled() {
        let Some(lock) = wait_for_slot_lock(&source_config, &pipeline, &shutdown).await else { break };
        // Active until shutdown, or until the lock's session is lost.
        let stepped_down = shutdown.child_token();
        let done = CancellationToken::new();
        let watcher =
            tokio::spawn(watch_slot_lock(lock, source_config.standby_retry, stepped_down.clone(), done.clone()));
        let result = consume(&source_config, &graph, &pipeline, config, &stepped_down).await;
        // Released only now: a standby must not start before the final
        // acknowledgement of this replica went out.
        done.cancel();
        let _ = watcher.await;
        result?;
        if !shutdown.is_cancelled() {
            tracing::warn!(slot = %source_config.slot, "lost the slot's lock; stepped down to standby");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The look-up executor over `[lookup]`'s database, if there is one.
pub(super) fn lookup_executor(config: &Config) -> Result<Option<Arc<PgLookupExecutor>>, CliError> {
    let Some(url) = &config.lookup.url else { return Ok(None) };
    let options = PgLookupExecutor::connect_options(url.expose_secret())
        .map_err(|_| CliError::Input("lookup.url: not a Postgres URL".into()))?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.lookup.max_connections)
        .acquire_timeout(config.lookup.timeout)
        .connect_lazy_with(options);
    Ok(Some(Arc::new(PgLookupExecutor::new(pool, config.lookup.timeout, config.lookup.batch_size))))
}

/// The run loop's options from the config.
pub(super) fn run_options(config: &Config) -> RunOptions {
    RunOptions {
        batch: config.batch,
        transaction: TransactionLimits {
            max_effects: config.run.max_transaction_effects,
            max_bytes: config.run.max_transaction_bytes,
        },
        retry_min: Duration::from_millis(50),
        retry_max: config.run.retry_max,
        on_error: config.dead_letter.on_error,
        lookup_attempts: config.dead_letter.lookup_attempts,
    }
}

/// The Kafka daemon: every replica is an active member of the consumer
/// group (the group splits the partitions; there is no standby). Sessions
/// follow one another: a fatal consumer error starts a new consumer, which
/// resumes from the group's committed offsets.
async fn work_kafka(
    config: &Config,
    kafka: KafkaConfig,
    graph: Arc<Graph>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: &CancellationToken,
) -> Result<(), CliError> {
    let lookups = lookup_executor(config)?;
    let dead_letters = KafkaDeadLetters::new(&kafka, &config.dead_letter.topic, metrics.clone())
        .map_err(|e| CliError::Runtime(format!("dead_letter.topic: {e}")))?;
    let dead_letters = Arc::new(dead_letters);
    metrics.dead_letter_store();
    let Some(sink) = connect_sinks(config, &graph, &metrics, shutdown).await? else { return Ok(()) };
    count_versions_behind(&sink, &metrics);
    health.set_all_sinks_reachable();
    health.set_role(Role::Active);
    metrics.set_role(Role::Active);
    let pipeline = Pipeline {
        graph,
        sink: Arc::new(sink),
        lookups,
        dead_letters: dead_letters.clone(),
        options: run_options(config),
        metrics: metrics.clone(),
        health,
    };
    let table_keys = Arc::new(crate::source::debezium::table_keys(&pipeline.graph));
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let mut source = KafkaSource::start(
            &kafka,
            table_keys.clone(),
            config.dead_letter.on_error,
            dead_letters.clone(),
            metrics.clone(),
            config.run.retry_max,
        )
        .map_err(|e| CliError::Runtime(e.to_string()))?;
        match pipeline.run_session(&mut source, shutdown).await {
            Ok(SessionEnd::Shutdown) => {
                source.shutdown().await;
                break;
            }
            Ok(SessionEnd::SourceLost(m)) => {
                tracing::warn!(error = %m, "lost the consumer; rejoining the group from the committed offsets");
                source.shutdown().await;
                match pause(backoff, config.run.retry_max, shutdown).await {
                    Some(next) => backoff = next,
                    None => break,
                }
            }
            Err(e) => {
                source.shutdown().await;
                return Err(CliError::Runtime(e.to_string()));
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Waits as a standby until this replica holds the slot's lock; `None` on
/// shutdown. The run loop's heartbeat keeps beating meanwhile.
async fn wait_for_slot_lock(
    source: &PostgresConfig,
    pipeline: &Pipeline<MultiSink<RedisSink>, PgLookupExecutor, DeadLetters>,
    shutdown: &CancellationToken,
) -> Option<SlotLock> {
    let mut announced = false;
    loop {
        pipeline.health.heartbeat();
        match SlotLock::try_acquire(&source.url, &source.slot).await {
            Ok(Some(lock)) => {
                tracing::info!(slot = %source.slot, "holding the slot's lock: active");
                pipeline.health.set_role(Role::Active);
                pipeline.metrics.set_role(Role::Active);
                return Some(lock);
            }
            Ok(None) => {
                if !announced {
                    tracing::info!(slot = %source.slot, retry_ms = source.standby_retry.as_millis() as u64, "another replica holds the slot's lock: standby");
                    announced = true;
                }
                pipeline.health.set_role(Role::Standby);
                pipeline.metrics.set_role(Role::Standby);
            }
            // Neither role is known: /readyz reports the source as not
            // connected, as it does for any other database outage.
            Err(e) => tracing::warn!(slot = %source.slot, error = %e, "cannot take the slot's lock; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(source.standby_retry) => {}
            () = shutdown.cancelled() => return None,
        }
    }
}

/// Holds the lock while active: checks its session every `interval` and
/// cancels `stepped_down` if it is lost; releases it once `done`.
async fn watch_slot_lock(
    mut lock: SlotLock,
    interval: Duration,
    stepped_down: CancellationToken,
    done: CancellationToken,
) {
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(interval) => {
                if let Err(e) = lock.check().await {
                    tracing::error!(error = %e, "lost the slot's lock: stepping down");
                    stepped_down.cancel();
                    // Wait for the sessions to stop; the session is gone anyway.
                    done.cancelled().await;
                    return;
                }
            }
        }
    }
    lock.release().await;
}

/// Source sessions one after another while active: a lost connection is
/// retried with backoff and resumes from the slot. Returns on `stop`.
async fn consume(
    source_config: &PostgresConfig,
    graph: &Arc<Graph>,
    pipeline: &Pipeline<MultiSink<RedisSink>, PgLookupExecutor, DeadLetters>,
    config: &Config,
    stop: &CancellationToken,
) -> Result<(), CliError> {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let started = tokio::select! {
            s = super::slot_history::start(source_config, graph, &pipeline.sink) => s,
            () = stop.cancelled() => break,
        };
        let mut source = match started {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                s
            }
            Err(SourceSetupError::Transient(m)) => {
                tracing::warn!(error = %m, retry_in_ms = backoff.as_millis() as u64, "source unavailable; retrying");
                pipeline.health.heartbeat();
                match pause(backoff, config.run.retry_max, stop).await {
                    Some(next) => backoff = next,
                    None => break,
                }
                continue;
            }
            Err(SourceSetupError::Definite(m)) => return Err(CliError::Runtime(m)),
            Err(SourceSetupError::Publication(m)) => return Err(CliError::Input(m)),
        };
        match pipeline.run_session(&mut source, stop).await {
            Ok(SessionEnd::Shutdown) => {
                source.shutdown().await;
                break;
            }
            Ok(SessionEnd::SourceLost(m)) => {
                tracing::warn!(error = %m, "lost the source; reconnecting from the slot");
                drop(source);
                if pause(backoff, config.run.retry_max, stop).await.is_none() {
                    break;
                }
            }
            Err(e) => {
                source.shutdown().await;
                return Err(CliError::Runtime(e.to_string()));
            }
        }
    }
    Ok(())
}
