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
//! A change whose look-ups cannot be run (see `crate::lookup`) is, as
//! `on_error` says, either written to the dead-letter store — and its batch
//! confirmed only once that row is committed — or the daemon stops with the
//! batch unconfirmed, so that a restart meets the change again.
//!
//! A message a source cannot decode (`SourceEvent::Undecodable`, see
//! `undecodable.rs`) is the same for every source: a committed transaction
//! without effects that carries a dead letter, written and committed by its
//! batch's task before the batch is confirmed; or, with `on_error =
//! "stop"`, the end of the daemon with it unacknowledged.

mod dead_letters;
mod session;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

use self::session::{Action, Assemble, BatchOutcome, Input, Session};
use crate::batch::{Batch, BatchLimits, TransactionEffects, TransactionLimits};
use crate::change::{Change, Operation, Position};
use crate::checkpoint::NotInFlight;
use crate::dead_letter::{DeadLetterError, DeadLetterStore, OnError};
use crate::graph::Graph;
use crate::lookup::{self, LookupExecutor, LookupStageError};
use crate::metrics::{Invalidation, Metrics, PositionLadder, SinkErrorKind};
use crate::policy::{self, Decision, Failure};
use crate::resolve::{Effect, LookupRequest, Resolution, Resolver};
use crate::retry::{Backoff, Jitter, Stopped};
use crate::server::Health;
use crate::sink::{Sink, SinkBatch, SinkError};
use crate::source::{Source, SourceError, SourceEvent, Undecodable, UndecodableReason};

/// How the loop batches, bounds and retries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunOptions {
    pub(crate) batch: BatchLimits,
    /// Distinct effects (and bytes) one transaction may accumulate before
    /// its caches collapse into namespace bumps.
    pub(crate) transaction: TransactionLimits,
    /// First and longest wait between retries of a failing sink or look-up.
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
    /// What to do with a change that cannot be resolved.
    pub(crate) on_error: OnError,
    /// Failed attempts (query errors, timeouts; never connection failures)
    /// before a batch's look-ups are narrowed down to the failing changes.
    pub(crate) lookup_attempts: u32,
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
pub(crate) enum SessionEnd {
    /// Shutdown was asked for; everything complete was applied and acknowledged.
    Shutdown,
    /// The source failed in a way worth reconnecting for.
    SourceLost(SourceError),
}

/// A failure that must stop the daemon (safely: nothing unconfirmed acknowledged).
///
/// Each variant carries the typed error it came from as its `#[source]`;
/// the texts are the ones the daemon has always printed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    /// The source failed for good, or refused an acknowledgement.
    #[error("source: {0}")]
    Source(#[source] SourceError),
    /// The source's events broke the Begin / Change / Commit order.
    #[error("source: {0}")]
    OutOfOrder(#[source] OutOfOrder),
    /// A sink refused a batch for good.
    #[error("sink: {0}")]
    Sink(#[source] SinkError),
    /// The look-up stage failed: a query that cannot run for any change,
    /// or look-ups that gave up with no change to narrow them down to.
    #[error("look-up: {0}")]
    Lookup(#[source] LookupStageError),
    #[error("look-up: the graph has look-ups but no database is configured")]
    NoLookupDatabase,
    /// `on_error = "stop"` and a change cannot be resolved: nothing of its
    /// batch was acknowledged.
    #[error(
        "cannot resolve the change at {position} ({op} on {table}): {error}; stopping without acknowledging it (dead_letter.on_error = \"stop\")"
    )]
    Unresolvable { position: String, table: String, op: &'static str, error: String },
    /// `on_error = "stop"` and the source could not decode a message:
    /// nothing from it on was acknowledged.
    #[error(
        "source: cannot decode the message at {position}: {error}; stopping without acknowledging it (dead_letter.on_error = \"stop\")"
    )]
    Undecodable { position: Position, reason: UndecodableReason, error: String },
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

impl From<LookupStageError> for RunError {
    /// Shutdown while look-ups retried is the run loop's `Cancelled`.
    fn from(error: LookupStageError) -> RunError {
        match error {
            LookupStageError::Cancelled => RunError::Cancelled,
            error => RunError::Lookup(error),
        }
    }
}

/// How a source's events broke the transaction order.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OutOfOrder {
    #[error("a transaction began inside another")]
    NestedBegin,
    #[error("change at {0} outside a transaction")]
    ChangeOutside(Position),
    #[error("commit at {0} without a transaction")]
    CommitOutside(Position),
    #[error("a message that cannot be decoded at {0} inside a transaction")]
    UndecodableInside(Position),
}

/// Everything a batch task needs, shared.
pub(crate) struct Pipeline<K, L, D> {
    pub(crate) graph: Arc<Graph>,
    pub(crate) sink: Arc<K>,
    pub(crate) lookups: Option<Arc<L>>,
    /// Where changes that cannot be resolved are recorded.
    pub(crate) dead_letters: Arc<D>,
    pub(crate) options: RunOptions,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
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

/// What a finished batch task reports.
struct Applied {
    batch: u64,
    effects: usize,
}

/// The daemon's [`Assemble`]: changes resolved through the graph (pure),
/// accumulated per transaction in bounded memory, batched.
struct Assembler<'g> {
    graph: &'g Graph,
    resolver: Resolver<'g>,
    options: RunOptions,
    metrics: &'g Metrics,
    received: ReceivedCounters,
}

/// `evictd_changes_received_total`'s counters by table and operation, kept
/// by the loop as the Kafka source keeps its message counters: looking the
/// series up in the family for every change (a label allocated, hashed and
/// found under a lock) cost more than the count.
#[derive(Default)]
struct ReceivedCounters(foldhash::HashMap<(crate::change::TableName, Operation), Counter>);

impl ReceivedCounters {
    fn inc(&mut self, metrics: &Metrics, change: &Change) {
        self.0
            .entry((change.table.clone(), change.op))
            .or_insert_with(|| metrics.changes_received_counter(&change.table, change.op))
            .inc();
    }
}

impl Assemble for Assembler<'_> {
    type Transaction = TransactionEffects;
    type Batch = Batch;

    fn open(&mut self) -> TransactionEffects {
        TransactionEffects::new(self.options.transaction)
    }

    fn add(&mut self, transaction: &mut TransactionEffects, change: Change) {
        self.received.inc(self.metrics, &change);
        self.metrics.change_arrived();
        let span = tracing::trace_span!("change", position = %change.position, table = %change.table, op = %change.op);
        let resolution = span.in_scope(|| self.resolver.resolve(&change));
        transaction.add(self.graph, change, resolution);
    }

    fn new_batch(&mut self, id: u64) -> Batch {
        Batch::new(id)
    }

    fn commit(
        &mut self,
        batch: &mut Batch,
        transaction: TransactionEffects,
        position: Position,
        commit_time_micros: Option<i64>,
    ) {
        batch.push_output(position, transaction.finish(), commit_time_micros);
    }

    fn undecodable(&mut self, batch: &mut Batch, message: Undecodable) {
        batch.push_undecodable(message);
    }

    fn is_full(&self, batch: &Batch) -> bool {
        batch.is_full(&self.options.batch)
    }
}

impl<K, L, D> Pipeline<K, L, D>
where
    K: Sink + Send + Sync + 'static,
    L: LookupExecutor + Send + Sync + 'static,
    D: DeadLetterStore + Send + Sync + 'static,
{
    /// Runs one source session until `stop` (shutdown or step-down) or
    /// until the source fails: the driver of [`Session`], which decides;
    /// this waits and carries out.
    pub(crate) async fn run_session<S: Source>(
        &self,
        source: &mut S,
        stop: &CancellationToken,
    ) -> Result<SessionEnd, RunError> {
        let graph = self.graph.clone();
        let assembler = Assembler {
            graph: &graph,
            resolver: Resolver::new(&graph),
            options: self.options,
            metrics: &self.metrics,
            received: ReceivedCounters::default(),
        };
        let mut session = Session::new(assembler, self.options.batch.max_delay, self.options.on_error);
        // Aborted if the session ends first: an unconfirmed batch is
        // abandoned (it will be replayed), never left retrying on its own.
        let mut in_flight: Option<AbortOnDropHandle<Result<Applied, RunError>>> = None;
        let mut ladder = PositionLadder::default();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        self.health.set_source_connected(true);
        let _disconnected = OnDrop(|| self.health.set_source_connected(false));
        // One waiter for the whole session: `stop.cancelled()` made anew in
        // every pass of the loop registered and dropped a waiter on the
        // token's lock three times per change (Begin, Change, Commit).
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            while let Some(action) = session.next_action() {
                match action {
                    Action::Dispatch { id, batch } => {
                        in_flight = Some(AbortOnDropHandle::new(self.dispatch(id, batch, stop.clone())));
                    }
                    Action::Acknowledge(position) => {
                        tracing::debug!(%position, "acknowledging");
                        source.acknowledge(&position).await.map_err(RunError::Source)?;
                        // The session asks only for positions past the last.
                        self.metrics.progressed();
                        // The broadcast's applied position (read your writes).
                        self.sink.acknowledged(&position);
                        if let Some(lsn) = position.lsn() {
                            ladder.applied = ladder.applied.max(lsn);
                            ladder.acknowledged = ladder.acknowledged.max(lsn);
                        }
                    }
                    Action::End(end) => return Ok(end),
                }
            }
            self.health.heartbeat();
            if let Some(wal_end) = source.server_position().as_ref().and_then(Position::lsn) {
                ladder.wal_end = ladder.wal_end.max(wal_end);
            }
            self.metrics.positions(&ladder);
            self.health.set_lag_bytes(ladder.lag_bytes());
            let deadline = session.deadline();
            let input = tokio::select! {
                biased;
                () = &mut stopped, if !session.stopping() => Input::Stop,
                joined = async { match in_flight.as_mut() { Some(h) => h.await, None => std::future::pending().await } }, if in_flight.is_some() => {
                    in_flight = None;
                    let id = session.in_flight().unwrap_or_default();
                    let outcome = match joined.map_err(RunError::BatchTask)? {
                        Ok(applied) => {
                            tracing::debug!(batch_id = applied.batch, effects = applied.effects, "confirmed");
                            BatchOutcome::Confirmed
                        }
                        Err(RunError::Cancelled) => BatchOutcome::Abandoned,
                        Err(e) => BatchOutcome::Failed(e),
                    };
                    Input::BatchDone { id, outcome }
                }
                () = sleep_until_or_never(deadline), if deadline.is_some() => Input::Tick,
                _ = heartbeat.tick() => Input::Tick,
                event = source.next(), if session.reading() => match event {
                    Ok(event) => {
                        observe(&mut ladder, &event);
                        Input::Event(event)
                    }
                    Err(e) => Input::SourceFailed(e),
                },
                // Last: nothing else was ready, the source included. Send what
                // is complete now rather than wait for the deadline: latency
                // when the stream is quiet, batches when it is busy (they fill
                // while the previous one is in flight).
                () = std::future::ready(()), if session.wants_quiet() => Input::Quiet,
            };
            session.step(input, Instant::now())?;
        }
    }

    /// Starts the task that applies one batch.
    fn dispatch(&self, id: u64, batch: Batch, shutdown: CancellationToken) -> JoinHandle<Result<Applied, RunError>> {
        let pipeline = self.clone();
        let span = tracing::info_span!("batch", batch_id = id, transactions = batch.transactions());
        tokio::spawn(async move { pipeline.apply(batch, &shutdown).await }.instrument(span))
    }

    async fn apply(&self, mut batch: Batch, shutdown: &CancellationToken) -> Result<Applied, RunError> {
        let started = Instant::now();
        // Dead letters of undecodable messages are committed before the
        // batch can be confirmed.
        self.record_undecodable(&batch.take_undecodable(), shutdown).await?;
        let (lookups, origins) = batch.take_lookups();
        if !lookups.is_empty() {
            let executor = self.lookups.as_ref().ok_or_else(|| RunError::NoLookupDatabase)?;
            let resolver = Resolver::new(&self.graph);
            let retries =
                lookup::Retries { backoff: self.backoff(), max_attempts: self.options.lookup_attempts, shutdown };
            let (found, unresolved) =
                lookup::resolve_batch(&resolver, executor.as_ref(), &lookups, &origins, &retries).await?;
            // Dead letters are committed (or the daemon stops) before the
            // batch can be confirmed.
            self.handle_unresolved(&unresolved, shutdown).await?;
            self.record_lookups(&lookups, &found);
            batch.add_effects(found.effects.into_iter().map(|resolved| resolved.effect));
        }
        let effects = batch.effects();
        let version = batch.last_position().map_or(0, Position::version);
        let mut backoff = self.backoff();
        if !effects.is_empty() {
            loop {
                let sink_batch = SinkBatch {
                    id: batch.id(),
                    graph: &self.graph,
                    effects,
                    version,
                    position: batch.last_position(),
                    commit_time_micros: batch.commit_time_micros(),
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
                        let (SinkError::Transient { target, cause } | SinkError::Definite { target, cause }) = e;
                        self.metrics.sink_retry(&target);
                        self.health.set_sink_reachable(&target, false);
                        tracing::warn!(%target, error = %cause, retry_in_ms = backoff.current().as_millis() as u64, "sink unavailable; retrying (the source is paused)");
                        backoff.wait(shutdown).await.map_err(|Stopped| RunError::Cancelled)?;
                    }
                    Decision::DeadLetter(_) | Decision::Stop => return Err(RunError::Sink(e)),
                }
            }
        }
        self.record(effects, started, batch.commit_time_micros());
        Ok(Applied { batch: batch.id(), effects: effects.len() })
    }

    /// The run loop's retries: `retry_min` doubling to `retry_max`, with
    /// jitter. Shutdown during a wait abandons the batch.
    fn backoff(&self) -> Backoff {
        Backoff::new(self.options.retry_min, self.options.retry_max, Jitter::UpToAQuarter)
    }

    /// Look-up queries (one per dependency and batch), the keys their rows
    /// gave, and fan-outs past the limit, by cache.
    fn record_lookups(&self, requests: &[LookupRequest], found: &Resolution) {
        let mut per_cache: std::collections::HashMap<crate::graph::CacheId, (u64, u64)> =
            std::collections::HashMap::new();
        for dependency in lookup::group_requests(requests.to_vec()).keys() {
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

/// Moves the position ladder's received and resolved rungs (Postgres LSNs).
fn observe(ladder: &mut PositionLadder, event: &SourceEvent) {
    match event {
        SourceEvent::Change(change) => {
            if let Some(lsn) = change.position.lsn() {
                ladder.received = ladder.received.max(lsn);
            }
        }
        SourceEvent::Commit { position, .. } | SourceEvent::Undecodable(Undecodable { position, .. }) => {
            if let Some(lsn) = position.lsn() {
                ladder.received = ladder.received.max(lsn);
                ladder.resolved = ladder.resolved.max(lsn);
            }
        }
        SourceEvent::Idle { position } => {
            if let Some(lsn) = position.lsn() {
                ladder.wal_end = ladder.wal_end.max(lsn);
            }
        }
        SourceEvent::Begin => {}
    }
}

#[cfg(test)]
mod tests;
