//! The run loop: source → resolve → batch → sinks → acknowledge.
//!
//! One `select!` drives a source session; its priorities, first to last:
//! 1. shutdown: stop reading, flush what is complete, wait for it, acknowledge;
//! 2. the in-flight batch finishing: confirm it, acknowledge the watermark;
//! 3. the open batch's deadline: send it;
//! 4. the next source event — only while the next batch has room, which is
//!    the back-pressure: a stalled sink stops the reading;
//! 5. nothing ready, the source included: send the open batch now. So a
//!    quiet stream pays no batching delay, and a busy one is read until
//!    `batch.max_delay_ms` or `max_effects` before its batch goes out.
//!
//! One batch is in flight at a time; its task runs the batch's look-ups and
//! then the sinks, retrying transient failures with backoff until they
//! succeed or shutdown comes. Which failures are retried, dead-lettered or
//! stop the daemon is decided in one place, `crate::policy`. Nothing is acknowledged that a sink has not
//! confirmed (the [`Watermark`]). A session that loses its source drops
//! everything unacknowledged; the next session gets it again from the slot.
//!
//! A change whose look-ups cannot be run (see `lookups.rs`) is, as
//! `on_error` says, either written to the dead-letter store — and its batch
//! confirmed only once that row is committed — or the daemon stops with the
//! batch unconfirmed, so that a restart meets the change again.

mod lookups;
mod transaction;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

pub use self::transaction::{LookupOrigin, TransactionEffects, TransactionLimits, TransactionOutput};
use crate::batch::{Batch, BatchLimits};
use crate::change::{Lsn, Position};
use crate::checkpoint::{NotInFlight, Watermark};
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterStore, OnError};
use crate::graph::Graph;
use crate::metrics::{Invalidation, Metrics, PositionLadder, SinkErrorKind};
use crate::policy::{self, Decision, Failure};
use crate::resolve::{Effect, LookupError, LookupExecutor, LookupRequest, Resolution, Resolver};
use crate::retry::{Backoff, Jitter, Stopped};
use crate::server::Health;
use crate::sink::{Sink, SinkBatch, SinkError};
use crate::source::{Source, SourceError, SourceEvent};

/// How the loop batches, bounds and retries.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub batch: BatchLimits,
    /// Distinct effects (and bytes) one transaction may accumulate before
    /// its caches collapse into namespace bumps.
    pub transaction: TransactionLimits,
    /// First and longest wait between retries of a failing sink or look-up.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// What to do with a change that cannot be resolved.
    pub on_error: OnError,
    /// Failed attempts (query errors, timeouts; never connection failures)
    /// before a batch's look-ups are narrowed down to the failing changes.
    pub lookup_attempts: u32,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            batch: BatchLimits { max_effects: 1000, max_delay: Duration::from_millis(1), max_bytes: 8 << 20 },
            transaction: TransactionLimits { max_effects: 100_000, max_bytes: 16 << 20 },
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            on_error: OnError::DeadLetter,
            lookup_attempts: 5,
        }
    }
}

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was asked for; everything complete was applied and acknowledged.
    Shutdown,
    /// The source failed in a way worth reconnecting for.
    SourceLost(String),
}

/// A failure that must stop the daemon (safely: nothing unconfirmed acknowledged).
///
/// Each variant carries the typed error it came from as its `#[source]`;
/// the texts are the ones the daemon has always printed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The source failed for good, or refused an acknowledgement.
    #[error("source: {0}")]
    Source(#[source] SourceError),
    /// The source's events broke the Begin / Change / Commit order.
    #[error("source: {0}")]
    OutOfOrder(#[source] OutOfOrder),
    /// A sink refused a batch for good.
    #[error("sink: {0}")]
    Sink(#[source] SinkError),
    /// A look-up query that cannot run for any change (see `crate::policy`).
    #[error("look-up: {error}: {hint}")]
    LookupBroken {
        #[source]
        error: LookupError,
        hint: &'static str,
    },
    /// A batch's look-ups gave up and there was no change to narrow them
    /// down to.
    #[error("look-up: {0}")]
    LookupGaveUp(#[source] LookupError),
    #[error("look-up: the graph has look-ups but no database is configured")]
    NoLookupDatabase,
    /// `on_error = "stop"` and a change cannot be resolved: nothing of its
    /// batch was acknowledged.
    #[error(
        "cannot resolve the change at {position} ({op} on {table}): {error}; stopping without acknowledging it (dead_letter.on_error = \"stop\")"
    )]
    Unresolvable { position: String, table: String, op: &'static str, error: String },
    /// The dead-letter store refused a write for good.
    #[error("dead letters: {0}")]
    DeadLetter(#[source] DeadLetterError),
    /// The batch task panicked or was aborted.
    #[error("internal: batch task: {0}")]
    BatchTask(#[source] tokio::task::JoinError),
    #[error("internal: {0}")]
    Watermark(#[source] NotInFlight),
    /// Shutdown came while a batch was still retrying: it stays
    /// unacknowledged and will be replayed.
    #[error("shut down with a batch unconfirmed; it will be replayed")]
    Cancelled,
}

/// How a source's events broke the transaction order.
#[derive(Debug, thiserror::Error)]
pub enum OutOfOrder {
    #[error("a transaction began inside another")]
    NestedBegin,
    #[error("change at {0} outside a transaction")]
    ChangeOutside(Position),
    #[error("commit at {0} without a transaction")]
    CommitOutside(Position),
}

/// Everything a batch task needs, shared.
pub struct Pipeline<K, L, D> {
    pub graph: Arc<Graph>,
    pub sink: Arc<K>,
    pub lookups: Option<Arc<L>>,
    /// Where changes that cannot be resolved are recorded.
    pub dead_letters: Arc<D>,
    pub options: RunOptions,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl<K, L, D> Clone for Pipeline<K, L, D> {
    fn clone(&self) -> Self {
        Pipeline {
            graph: self.graph.clone(),
            sink: self.sink.clone(),
            lookups: self.lookups.clone(),
            dead_letters: self.dead_letters.clone(),
            options: self.options,
            metrics: self.metrics.clone(),
            health: self.health.clone(),
        }
    }
}

/// A batch with the look-ups its transactions asked for.
struct Pending {
    batch: Batch,
    lookups: Vec<LookupRequest>,
    /// The changes that asked for `lookups`.
    origins: Vec<LookupOrigin>,
    /// About how many bytes `lookups` and `origins` hold.
    held_bytes: usize,
    opened: Instant,
    /// Commit time of the batch's last transaction (µs since the epoch).
    commit_time_micros: Option<i64>,
}

/// What a finished batch task reports.
struct Applied {
    batch: u64,
    effects: usize,
}

/// A position's LSN, for the position ladder (Postgres only).
fn lsn_of(position: &Position) -> Option<Lsn> {
    match position {
        Position::Postgres { lsn, .. } => Some(*lsn),
        _ => None,
    }
}

impl Pending {
    /// Full by its effects, or by the changes it holds for look-ups (their
    /// number, or the bytes of everything it holds): a full batch stops the
    /// reading while another is in flight, so memory stays bounded.
    fn is_full(&self, limits: &BatchLimits) -> bool {
        self.batch.is_full(limits)
            || self.origins.len() >= limits.max_effects
            || self.batch.bytes() + self.held_bytes >= limits.max_bytes
    }
}

impl<K, L, D> Pipeline<K, L, D>
where
    K: Sink + Send + Sync + 'static,
    L: LookupExecutor + Send + Sync + 'static,
    D: DeadLetterStore + Send + Sync + 'static,
{
    /// Runs one source session until shutdown or until the source fails.
    pub async fn run_session<S: Source>(
        &self,
        source: &mut S,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, RunError> {
        let graph = self.graph.clone();
        let resolver = Resolver::new(&graph);
        let mut watermark: Watermark<Position> = Watermark::new();
        let mut next_batch_id: u64 = 1;
        let mut open_tx: Option<TransactionEffects> = None;
        let mut pending: Option<Pending> = None;
        // Aborted if the session ends first: an unconfirmed batch is
        // abandoned (it will be replayed), never left retrying on its own.
        let mut in_flight: Option<(u64, AbortOnDropHandle<Result<Applied, RunError>>)> = None;
        let mut last_acked: Option<Position> = None;
        let mut stopping = false;
        let mut ladder = PositionLadder::default();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        // Set when the source had nothing ready: send what is complete now.
        let mut idle = false;
        self.health.set_source_connected(true);
        let _disconnected = OnDrop(|| self.health.set_source_connected(false));
        loop {
            self.health.heartbeat();
            if let Some(wal_end) = source.server_position().as_ref().and_then(lsn_of) {
                ladder.wal_end = ladder.wal_end.max(wal_end);
            }
            self.metrics.positions(&ladder);
            self.health.set_lag_bytes(ladder.lag_bytes());
            let full = pending.as_ref().is_some_and(|p| p.is_full(&self.options.batch));
            let deadline = pending.as_ref().map(|p| p.opened + self.options.batch.max_delay);
            // Send the open batch when nothing is in flight and it is due.
            if in_flight.is_none() {
                let due =
                    full || idle || deadline.is_some_and(|d| d <= Instant::now()) || (stopping && pending.is_some());
                idle = false;
                if let Some(p) = pending.take_if(|_| due) {
                    let id = p.batch.id();
                    if let Some(position) = p.batch.last_position() {
                        watermark.begin(id, position.clone());
                    }
                    in_flight = Some((id, AbortOnDropHandle::new(self.dispatch(p, shutdown.clone()))));
                    continue;
                }
                if stopping {
                    return Ok(SessionEnd::Shutdown);
                }
            }
            // Back-pressure: with a batch in flight and the next one full, stop reading.
            let backed_up = full && in_flight.is_some();
            let can_read = !(stopping || backed_up);
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if !stopping => {
                    tracing::info!("shutting down: no more reading; flushing what is complete");
                    stopping = true;
                }
                joined = async { match in_flight.as_mut() { Some((_, h)) => h.await, None => std::future::pending().await } }, if in_flight.is_some() => {
                                        in_flight = None;
                    let applied = match joined.map_err(RunError::BatchTask)? {
                        Ok(applied) => applied,
                        Err(RunError::Cancelled) if stopping => return Ok(SessionEnd::Shutdown),
                        Err(e) => return Err(e),
                    };
                    let moved = watermark.confirm(applied.batch).map_err(RunError::Watermark)?;
                                        if let Some(position) = moved {
                        tracing::debug!(batch_id = applied.batch, effects = applied.effects, %position, "acknowledging");
                        acknowledge(source, &position, &mut last_acked).await?;
                        if let Some(lsn) = lsn_of(&position) {
                            ladder.applied = ladder.applied.max(lsn);
                            ladder.acknowledged = ladder.acknowledged.max(lsn);
                        }
                    }
                }
                                () = sleep_until_or_never(deadline), if in_flight.is_none() && deadline.is_some() => {}
                _ = heartbeat.tick() => {}
                event = source.next(), if can_read => {
                    let event = match event {
                        Ok(e) => e,
                        Err(e) => {
                            return match (policy::decide(Failure::Source(&e)).decision, e) {
                                // Retried by the supervisor, in a new session.
                                (Decision::Retry, SourceError::Transient(m) | SourceError::Definite(m)) => Ok(SessionEnd::SourceLost(m)),
                                (Decision::DeadLetter(_) | Decision::Stop, e) => Err(RunError::Source(e)),
                            };
                        }
                    };
                    match event {
                        SourceEvent::Begin => {
                            if open_tx.is_some() {
                                return Err(RunError::OutOfOrder(OutOfOrder::NestedBegin));
                            }
                            open_tx = Some(TransactionEffects::new(self.options.transaction));
                        }
                        SourceEvent::Change(change) => {
                            let tx = open_tx.as_mut().ok_or_else(|| RunError::OutOfOrder(OutOfOrder::ChangeOutside(change.position.clone())))?;
                                                        self.metrics.changes_received(&change.table, change.op, 1);
                            if let Some(lsn) = lsn_of(&change.position) {
                                ladder.received = ladder.received.max(lsn);
                            }
                            let span = tracing::trace_span!("change", position = %change.position, table = %change.table, op = %change.op);
                            let resolution = span.in_scope(|| resolver.resolve(&change));
                            tx.add(&graph, change, resolution);
                        }
                                                SourceEvent::Commit { position, commit_time_micros } => {
                            if let Some(lsn) = lsn_of(&position) {
                                ladder.received = ladder.received.max(lsn);
                                ladder.resolved = ladder.resolved.max(lsn);
                            }
                            let tx = open_tx.take().ok_or_else(|| RunError::OutOfOrder(OutOfOrder::CommitOutside(position.clone())))?;
                            let TransactionOutput { effects, lookups, origins, held_bytes } = tx.finish();
                            let p = pending.get_or_insert_with(|| {
                                let id = next_batch_id;
                                next_batch_id += 1;
                                Pending { batch: Batch::new(id), lookups: Vec::new(), origins: Vec::new(), held_bytes: 0, opened: Instant::now(), commit_time_micros: None }
                            });
                            p.commit_time_micros = commit_time_micros.or(p.commit_time_micros);
                            p.batch.push_transaction(position, effects);
                            p.lookups.extend(lookups);
                            p.origins.extend(origins);
                            p.held_bytes += held_bytes;
                        }
                                                SourceEvent::Idle { position } => {
                            if let Some(lsn) = lsn_of(&position) {
                                ladder.wal_end = ladder.wal_end.max(lsn);
                            }
                            if open_tx.is_none() && pending.is_none() && in_flight.is_none() && watermark.is_idle() {
                                acknowledge(source, &position, &mut last_acked).await?;
                                if let Some(lsn) = lsn_of(&position) {
                                    ladder.acknowledged = ladder.acknowledged.max(lsn);
                                }
                            }
                        }
                    }
                }
                // Last: nothing else was ready, the source included. Send what
                // is complete now rather than wait for the deadline: latency
                // when the stream is quiet, batches when it is busy (they fill
                // while the previous one is in flight).
                () = std::future::ready(()), if in_flight.is_none() && pending.is_some() && !stopping => {
                    idle = true;
                }
            }
        }
    }

    /// Starts the task that applies one batch.
    fn dispatch(&self, pending: Pending, shutdown: CancellationToken) -> JoinHandle<Result<Applied, RunError>> {
        let pipeline = self.clone();
        let span =
            tracing::info_span!("batch", batch_id = pending.batch.id(), transactions = pending.batch.transactions());
        tokio::spawn(async move { pipeline.apply(pending, &shutdown).await }.instrument(span))
    }

    async fn apply(&self, pending: Pending, shutdown: &CancellationToken) -> Result<Applied, RunError> {
        let started = Instant::now();
        let Pending { batch, lookups, origins, commit_time_micros, .. } = pending;
        let mut effects: Vec<Effect> = batch.effects().to_vec();
        if !lookups.is_empty() {
            let executor = self.lookups.as_ref().ok_or_else(|| RunError::NoLookupDatabase)?;
            let resolver = Resolver::new(&self.graph);
            let retries =
                lookups::Retries { backoff: self.backoff(), max_attempts: self.options.lookup_attempts, shutdown };
            let (found, unresolved) =
                lookups::resolve_batch(&resolver, executor.as_ref(), &lookups, &origins, &retries).await?;
            // Dead letters are committed (or the daemon stops) before the
            // batch can be confirmed.
            self.handle_unresolved(&unresolved, shutdown).await?;
            self.record_lookups(&lookups, &found);
            let mut seen: std::collections::HashSet<Effect> = effects.iter().cloned().collect();
            for resolved in found.effects {
                if seen.insert(resolved.effect.clone()) {
                    effects.push(resolved.effect);
                }
            }
        }
        let version = batch.last_position().map_or(0, Position::version);
        let mut backoff = self.backoff();
        if !effects.is_empty() {
            loop {
                let sink_batch = SinkBatch {
                    id: batch.id(),
                    graph: &self.graph,
                    effects: &effects,
                    version,
                    position: batch.last_position(),
                };
                let e = match self.sink.apply(sink_batch).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                let (target, kind) = match &e {
                    SinkError::Transient { target, .. } => (target.as_str(), SinkErrorKind::Transient),
                    SinkError::Definite { target, .. } => (target.as_str(), SinkErrorKind::Definite),
                };
                self.metrics.sink_error(target, kind);
                match policy::decide(Failure::Sink(&e)).decision {
                    Decision::Retry => {
                        let (SinkError::Transient { target, message } | SinkError::Definite { target, message }) = e;
                        self.metrics.sink_retry(&target);
                        self.health.set_sink_reachable(&target, false);
                        tracing::warn!(%target, error = %message, retry_in_ms = backoff.current().as_millis() as u64, "sink unavailable; retrying (the source is paused)");
                        backoff.wait(shutdown).await.map_err(|Stopped| RunError::Cancelled)?;
                    }
                    Decision::DeadLetter(_) | Decision::Stop => return Err(RunError::Sink(e)),
                }
            }
        }
        self.record(&effects, started, commit_time_micros);
        Ok(Applied { batch: batch.id(), effects: effects.len() })
    }

    /// The run loop's retries: `retry_min` doubling to `retry_max`, with
    /// jitter. Shutdown during a wait abandons the batch.
    fn backoff(&self) -> Backoff {
        Backoff::new(self.options.retry_min, self.options.retry_max, Jitter::UpToAQuarter)
    }

    /// Changes that cannot be resolved: recorded as dead letters, each
    /// committed before this returns; or, with `on_error = "stop"`, the end
    /// of the daemon with the batch unconfirmed.
    async fn handle_unresolved(&self, unresolved: &[DeadLetter], shutdown: &CancellationToken) -> Result<(), RunError> {
        if let (OnError::Stop, Some(first)) = (self.options.on_error, unresolved.first()) {
            for letter in unresolved {
                let change = &letter.change;
                tracing::error!(
                    position = %change.position,
                    table = %change.table,
                    op = %change.op,
                    error = %letter.error,
                    "cannot resolve this change; stopping without acknowledging it (on_error = stop)"
                );
            }
            return Err(RunError::Unresolvable {
                position: first.change.position.to_string(),
                table: first.change.table.to_string(),
                op: first.change.op.as_str(),
                error: first.error.clone(),
            });
        }
        for letter in unresolved {
            let mut backoff = self.backoff();
            loop {
                let e = match self.dead_letters.record(letter).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                self.metrics.dead_letter_write_error(e.kind());
                match policy::decide(Failure::DeadLetterStore(&e)).decision {
                    Decision::Retry => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.current().as_millis() as u64, "cannot write a dead letter; retrying (the source is paused)");
                        backoff.wait(shutdown).await.map_err(|Stopped| RunError::Cancelled)?;
                    }
                    Decision::DeadLetter(_) | Decision::Stop => return Err(RunError::DeadLetter(e)),
                }
            }
            let change = &letter.change;
            self.metrics.dead_lettered(&change.table, letter.reason);
            tracing::warn!(
                position = %change.position,
                table = %change.table,
                op = %change.op,
                reason = letter.reason.as_str(),
                attempts = letter.attempts,
                error = %letter.error,
                "dead-lettered a change that cannot be resolved; the stream goes on"
            );
        }
        Ok(())
    }

    /// Look-up queries (one per dependency and batch), the keys their rows
    /// gave, and fan-outs past the limit, by cache.
    fn record_lookups(&self, requests: &[LookupRequest], found: &Resolution) {
        let mut per_cache: std::collections::HashMap<crate::graph::CacheId, (u64, u64)> =
            std::collections::HashMap::new();
        for dependency in crate::resolve::group_requests(requests.to_vec()).keys() {
            per_cache.entry(self.graph.dependency(*dependency).cache).or_default().0 += 1;
        }
        for resolved in &found.effects {
            let cache = resolved.effect.cache();
            for reason in &resolved.reasons {
                match reason.cause {
                    crate::resolve::Cause::LookupRow => per_cache.entry(cache).or_default().1 += 1,
                    crate::resolve::Cause::FanoutExceeded { .. } => {
                        self.metrics.fanout_overflow(&self.graph.cache(cache).name)
                    }
                    _ => {}
                }
            }
        }
        for (cache, (queries, rows)) in per_cache {
            self.metrics.lookups(&self.graph.cache(cache).name, queries, rows);
        }
    }

    /// Per-batch metrics (never per key), and the sinks are reachable again.
    fn record(&self, effects: &[Effect], started: Instant, commit_time_micros: Option<i64>) {
        let mut counts: std::collections::HashMap<(crate::graph::CacheId, u8), u64> = std::collections::HashMap::new();
        for e in effects {
            let kind = match e {
                Effect::Key { .. } => 0,
                Effect::Tag { .. } => 1,
                Effect::NamespaceBump { .. } => 2,
            };
            *counts.entry((e.cache(), kind)).or_insert(0) += 1;
        }
        for ((cache, kind), n) in counts {
            let cache = self.graph.cache(cache);
            let what = match kind {
                0 => Invalidation::Key(cache.options.action),
                1 => Invalidation::Tag(cache.options.action),
                _ => Invalidation::NamespaceBump,
            };
            self.metrics.effects_resolved(&cache.name, what, n);
        }
        self.metrics.batch_applied(effects.len(), started.elapsed());
        if let Some(committed) = commit_time_micros {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
            self.metrics.commit_to_applied(Duration::from_micros(now.saturating_sub(committed).max(0) as u64));
        }
        self.health.set_all_sinks_reachable();
    }
}

/// Runs a closure when dropped (on every way out of a session).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Acknowledges `position` if it is past what was acknowledged already.
async fn acknowledge<S: Source>(
    source: &mut S,
    position: &Position,
    last: &mut Option<Position>,
) -> Result<(), RunError> {
    if last.as_ref().is_some_and(|l| l.partial_cmp(position) != Some(std::cmp::Ordering::Less)) {
        return Ok(());
    }
    source.acknowledge(position).await.map_err(RunError::Source)?;
    *last = Some(position.clone());
    Ok(())
}

#[cfg(test)]
mod tests;
