//! The daemon's components from the config: the Redis targets (connected
//! and checked), the dead-letter store (migrated), the look-up pool, the
//! run loop's options, and the one place a [`Pipeline`] is assembled —
//! `run` and `replay` both build theirs here.
//!
//! **Invariants:** an unreachable Redis target or dead-letter database is
//! waited for (with backoff, until shutdown), never skipped: what is
//! waited for and what stops is [`crate::policy::decide`]'s call, as in the
//! run loop; a target whose start-up check finds errors, or pending
//! migrations under `migrations = "verify"`, refuse to start (exit 2).

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::DaemonError;
use crate::batch::TransactionLimits;
use crate::config::Config;
use crate::dead_letter::DeadLetters;
use crate::graph::Graph;
use crate::lookup::PgLookupExecutor;
use crate::metrics::Metrics;
use crate::policy::{self, Decision, Failure};
use crate::retry::{Backoff, Jitter};
use crate::run::{Pipeline, RunOptions};
use crate::server::Health;
use crate::sink::Sink as _;
use crate::sink::multi::MultiSink;
use crate::sink::redis::RedisSink;

/// What every source's wiring shares: built once by the daemon.
pub(super) struct Shared<'a> {
    pub(crate) config: &'a Config,
    pub(crate) graph: Arc<Graph>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    pub(crate) shutdown: &'a CancellationToken,
}

/// The first wait between retries of an unreachable service.
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Waits for an unreachable service: [`FIRST_BACKOFF`] doubling to
/// `run.retry_max`, without jitter.
pub(super) fn backoff(retry_max: Duration) -> Backoff {
    Backoff::new(FIRST_BACKOFF, retry_max, Jitter::None)
}

/// Assembles the run loop's pipeline: the options come from `config`
/// (the defaults without one, as in `replay --dry-run`).
pub(crate) fn pipeline<K, L, D>(
    config: Option<&Config>,
    graph: Arc<Graph>,
    sink: Arc<K>,
    lookups: Option<Arc<L>>,
    dead_letters: Arc<D>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Pipeline<K, L, D> {
    let options = config.map(run_options).unwrap_or_default();
    Pipeline { graph, sink, lookups, dead_letters, options, metrics, health }
}

/// Connects every Redis target and runs its start-up check
/// ([`RedisSink::check_setup`]): warnings are logged, errors refuse to start
/// (exit 2). `graph` tells whether tag registries must be spared. `None`
/// when shutdown came first.
pub(crate) async fn connect_sinks(
    config: &Config,
    graph: &Graph,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Option<MultiSink<RedisSink>>, DaemonError> {
    let tags = graph.dependencies().iter().any(|d| matches!(d.mapping, crate::graph::Mapping::Tags(_)));
    let mut targets = Vec::new();
    for target in &config.redis {
        let mut backoff = backoff(config.run.retry_max);
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
                        return Err(DaemonError::RedisSetup(findings.errors));
                    }
                    sink.observe(metrics.clone());
                    targets.push(sink);
                    break;
                }
                Err(e) => match policy::decide(Failure::Sink(&e)).decision {
                    Decision::Retry => {
                        tracing::warn!(target = %target.name, error = %e.cause(), "Redis target unreachable; retrying");
                        if backoff.wait(shutdown).await.is_err() {
                            return Ok(None);
                        }
                    }
                    Decision::DeadLetter(_) | Decision::Stop => return Err(DaemonError::Redis(e)),
                },
            }
        }
    }
    Ok(Some(MultiSink::new(targets)))
}

/// Connected targets, as the daemon starts with them: behind bumps counted
/// in `evictd_versions_behind_total`, and reachable until a batch says
/// otherwise.
pub(super) fn sinks_connected(sink: &MultiSink<RedisSink>, metrics: &Metrics, health: &Health) {
    for target in sink.targets() {
        target.count_versions_behind(metrics.versions_behind(target.name()));
    }
    health.set_all_sinks_reachable();
}

/// Starts every target's broadcast heartbeats (`docs/broadcast.md`); they
/// stop when the guard is dropped, at the end of the daemon's run.
/// `postgres`: heartbeats carry the applied position.
pub(super) fn start_heartbeats(sink: &MultiSink<RedisSink>, postgres: bool) -> tokio_util::sync::DropGuard {
    let stop = CancellationToken::new();
    for target in sink.targets() {
        let _ = target.spawn_heartbeats(postgres, stop.clone());
    }
    stop.drop_guard()
}

/// How often each target's count of operator actions is read into
/// `evictd_operator_actions_total`.
const OPERATOR_ACTIONS_EVERY: Duration = Duration::from_secs(15);

/// Exports each target's count of audited operator actions
/// (`evictd:audit:actions`, written by `evictd invalidate`, `slot drop`,
/// `retire`, `dead-letters`) as `evictd_operator_actions_total`, read every
/// [`OPERATOR_ACTIONS_EVERY`]; it stops when the guard is dropped. A read
/// that fails is skipped (the sink's own batches report the target's
/// health).
pub(super) fn export_operator_actions(
    sink: &MultiSink<RedisSink>,
    metrics: &Arc<Metrics>,
) -> tokio_util::sync::DropGuard {
    let stop = CancellationToken::new();
    for target in sink.targets() {
        let (target, metrics, stop) = (target.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = std::collections::HashMap::<(String, String), u64>::new();
            let mut tick = tokio::time::interval(OPERATOR_ACTIONS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Ok(Ok(counts)) = tokio::time::timeout(OPERATOR_ACTIONS_EVERY, target.operator_actions()).await
                else {
                    continue;
                };
                for (action, outcome, count) in counts {
                    let seen = last.entry((action.clone(), outcome.clone())).or_default();
                    metrics.operator_actions(target.name(), &action, &outcome, count, seen);
                }
            }
        });
    }
    stop.drop_guard()
}

/// How long one statement against the dead-letter database may take.
pub(crate) const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);

/// The dead-letter store, connected lazily, from `[dead_letter]`.
pub(crate) fn dead_letter_store(config: &Config) -> Result<DeadLetters, DaemonError> {
    let Some(url) = &config.dead_letter.url else {
        return Err(DaemonError::NoDeadLetterDatabase(config.file.clone()));
    };
    DeadLetters::connect_lazy(url, &config.dead_letter.schema, DEAD_LETTER_TIMEOUT).map_err(DaemonError::DeadLetterUrl)
}

/// Connects the dead-letter store and applies (or verifies) evictd's
/// migrations before anything is consumed: an unreachable database is
/// waited for; pending migrations under `migrations = "verify"` exit 2.
/// `None` when shutdown came first.
pub(super) async fn open_dead_letters(
    config: &Config,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<DeadLetters>, DaemonError> {
    let store = dead_letter_store(config)?;
    metrics.dead_letter_store();
    let mut backoff = backoff(config.run.retry_max);
    loop {
        match store.migrate(config.dead_letter.migrations).await {
            Ok(report) => {
                for name in &report.applied {
                    tracing::info!(schema = store.schema(), migration = %name, "applied a migration");
                }
                return Ok(Some(store));
            }
            Err(e) => match policy::decide(Failure::DeadLetterStore(&e)).decision {
                Decision::Retry => {
                    tracing::warn!(error = %e, "dead-letter database unavailable; retrying");
                    if backoff.wait(shutdown).await.is_err() {
                        return Ok(None);
                    }
                }
                Decision::DeadLetter(_) | Decision::Stop => return Err(DaemonError::DeadLetters(e)),
            },
        }
    }
}

/// The look-up executor over `[lookup]`'s database, if there is one.
pub(crate) fn lookup_executor(config: &Config) -> Result<Option<Arc<PgLookupExecutor>>, DaemonError> {
    let Some(url) = &config.lookup.url else { return Ok(None) };
    let options = PgLookupExecutor::connect_options(url.expose_secret()).map_err(DaemonError::LookupUrl)?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.lookup.max_connections)
        .acquire_timeout(config.lookup.timeout)
        .connect_lazy_with(options);
    Ok(Some(Arc::new(PgLookupExecutor::new(pool, config.lookup.timeout, config.lookup.batch_size))))
}

/// The run loop's options from the config.
pub(crate) fn run_options(config: &Config) -> RunOptions {
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
