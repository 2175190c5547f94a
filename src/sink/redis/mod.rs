//! The Redis sink: applies a batch's effects to one Redis target,
//! standalone or Cluster, and confirms only once every reply was read.
//!
//! ```text
//! SinkBatch ──plan──► groups (one pipeline per slot) ─┐
//!            └──────► tag jobs (read, UNLINK, forget) ├─► all confirmed ──► Ok
//!                                                     └─► delayed second deletes (not acknowledged)
//! ```
//!
//! - [`plan`]: the pure batch → commands step, grouped by hash slot.
//! - [`layout`]: key names, the version format, the Lua scripts
//!   (`docs/redis-layout.md` is the user-facing contract).
//! - `conn`: the connection, round trips with a timeout, `NOSCRIPT` reload.
//! - `tags`: tag registries; `redelete`: the delayed second delete;
//!   `error`: transient or definite.
//!
//! **Invariants:** `apply` returns `Ok` only after every command of the
//! batch was answered without error (the [`Sink`] contract); every round
//! trip is bounded by [`RedisSinkOptions::timeout`]; a second delete
//! (`redelete_after_ms`) is scheduled only after the batch is confirmed, is
//! best-effort, and is not part of the acknowledgement. A batch's
//! broadcast message (`broadcast.rs`) is published after its effects and
//! before `Ok`; heartbeats ([`RedisSink::spawn_heartbeats`]) run on a task
//! of their own, best-effort, and never hold a batch up.
//!
//! Versions: every bump raises the stored version (see
//! [`layout::BUMP_LUA`]); a bump that found the stored version at or past
//! the batch's is *behind*. Behind bumps are counted
//! (`evictd_versions_behind_total`); for a Postgres source whose
//! [source record](record) is open, a batch above the record's highest
//! version is not a replay, so behind bumps in it mean versions went
//! backwards (a restore, another source) and are logged as a warning. The
//! record's highest version is written *before* such a batch's bumps, so a
//! batch replayed after a crash is always recognised as one; every batch
//! of a tracked session writes the record again if Redis lost it.

pub(crate) mod broadcast;
mod conn;
mod durability;
mod error;
mod operator;
pub(crate) mod plan;
pub(crate) mod record;
mod redelete;
pub(crate) mod setup;
mod tags;

/// Broadcast messages read back (format v2, `docs/broadcast.md`).
pub use broadcast::{Envelope, VERSION as BROADCAST_VERSION, WireApplied, WirePosition};

/// The Redis layout, shared with the clients: it lives in [`crate::layout`]
/// (compiled without the daemon), re-exported here for the sink's code.
pub use crate::layout;

pub use operator::TagRegistrations;

/// Keys of delayed second deletes that may wait at once, per target.
pub use redelete::MAX_PENDING_KEYS as REDELETE_MAX_PENDING_KEYS;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt, stream};
use prometheus_client::metrics::counter::Counter;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub(crate) use error::{Class, RedisCause};
pub(crate) use plan::{Command, Group, Plan, Topology};

use self::conn::{Conn, Runner};
use self::error::Errors;
use self::layout::Scripts;
use crate::change::{Lsn, Position};
use crate::config::{BroadcastConfig, Durability, RedisTarget};
use crate::metrics::{BroadcastKind, Metrics};
use crate::sink::{Sink, SinkBatch, SinkError};

/// How a [`RedisSink`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisSinkOptions {
    /// Longest wait for one round trip (connecting included). Past it the
    /// batch fails with a transient error.
    pub timeout: Duration,
    /// Pipelines in flight at once for one batch.
    pub max_in_flight: usize,
}

impl Default for RedisSinkOptions {
    fn default() -> RedisSinkOptions {
        RedisSinkOptions { timeout: Duration::from_secs(5), max_in_flight: 16 }
    }
}

/// A [`Sink`] for one Redis target. Cheap to clone.
#[derive(Clone)]
pub struct RedisSink {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    conn: Conn,
    scripts: Scripts,
    errors: Errors,
    options: RedisSinkOptions,
    /// Delayed second deletes still waiting or running.
    redeletes: TaskTracker,
    redelete_failures: AtomicU64,
    /// Keys of second deletes waiting, and those skipped for lack of room.
    redelete_pending: std::sync::atomic::AtomicUsize,
    redeletes_skipped: AtomicU64,
    /// Version keys that held something else, whose caches' namespaces
    /// were bumped instead.
    unbumpable_keys: AtomicU64,
    /// Time to live of fill-guard stamps, ms; `None`: no stamps.
    fill_guard_ttl_ms: Option<u64>,
    broadcast: Option<BroadcastConfig>,
    /// What each pipeline of a batch waits for before it counts as confirmed.
    durability: Option<Durability>,
    /// Where per-batch counts go, once the daemon attached its metrics.
    metrics: std::sync::OnceLock<Arc<Metrics>>,
    /// Bumps that found the stored version at or past the batch's.
    versions_behind: AtomicU64,
    /// The same count in the metrics, once [`RedisSink::count_versions_behind`] was called.
    versions_behind_metric: OnceLock<Counter>,
    /// When the last "versions went backwards" warning was logged (Unix ms).
    behind_warned_ms: AtomicU64,
    /// The source record of the stream this sink serves, once opened.
    source: Mutex<Option<record::Tracked>>,
    /// The highest applied Postgres LSN this process knows of (0: none):
    /// a batch's position once published, or one the run loop acknowledged.
    applied: AtomicU64,
    /// The `applied` field's kind, set by the first acknowledged position
    /// of a source that publishes one (Postgres).
    applied_kind: OnceLock<&'static str>,
    /// The highest `(epoch, seq)` any publish script's reply showed on the
    /// channel (batches and heartbeats, this process's and, through the
    /// heartbeats, other replicas'): a stored sequence below it means Redis
    /// went back in time (see [`layout::PUBLISH_LUA`]).
    seen: Mutex<Option<broadcast::Seen>>,
}

impl Inner {
    /// Round trips with the target's durability wait (and its timeout on
    /// top of the round-trip timeout).
    fn runner(&self) -> Runner<'_> {
        Runner {
            conn: &self.conn,
            scripts: &self.scripts,
            errors: &self.errors,
            timeout: self.options.timeout + self.durability.map_or(Duration::ZERO, |d| d.timeout),
            wait: self.durability,
        }
    }

    /// Round trips without the durability wait (the broadcast's).
    fn runner_without_wait(&self) -> Runner<'_> {
        Runner {
            conn: &self.conn,
            scripts: &self.scripts,
            errors: &self.errors,
            timeout: self.options.timeout,
            wait: None,
        }
    }
}

impl RedisSink {
    /// Connects to a target with the default options.
    pub async fn connect(target: &RedisTarget) -> Result<RedisSink, SinkError> {
        RedisSink::connect_with(target, RedisSinkOptions::default()).await
    }

    /// Connects to a target. An unreachable target is a transient error
    /// after at most `options.timeout`.
    pub async fn connect_with(target: &RedisTarget, options: RedisSinkOptions) -> Result<RedisSink, SinkError> {
        let secrets = target.urls.iter().map(|u| u.expose_secret().to_owned()).collect();
        let errors = Errors::new(&target.name, secrets);
        let options = RedisSinkOptions { max_in_flight: options.max_in_flight.max(1), ..options };
        // A pipeline's round trip includes its durability wait.
        let round_trip = options.timeout + target.durability.map_or(Duration::ZERO, |d| d.timeout);
        let conn = Conn::connect(target, options.timeout, round_trip, &errors).await?;
        Ok(RedisSink {
            inner: Arc::new(Inner {
                name: target.name.clone(),
                conn,
                scripts: Scripts::new(),
                errors,
                options,
                redeletes: TaskTracker::new(),
                redelete_failures: AtomicU64::new(0),
                redelete_pending: std::sync::atomic::AtomicUsize::new(0),
                redeletes_skipped: AtomicU64::new(0),
                unbumpable_keys: AtomicU64::new(0),
                fill_guard_ttl_ms: target.fill_guard_ttl.map(|ttl| ttl.as_millis().max(1) as u64),
                broadcast: target.broadcast.clone(),
                durability: target.durability,
                metrics: std::sync::OnceLock::new(),
                versions_behind: AtomicU64::new(0),
                versions_behind_metric: OnceLock::new(),
                behind_warned_ms: AtomicU64::new(0),
                source: Mutex::new(None),
                applied: AtomicU64::new(0),
                applied_kind: OnceLock::new(),
                seen: Mutex::new(None),
            }),
        })
    }

    /// The start-up check of this target (see [`setup`]): its eviction
    /// policy, persistence and replicas, and what `wait_aof` needs. `tags`:
    /// whether the graph has tag dependencies. An unreachable target is a
    /// transient error within the timeout.
    pub(crate) async fn check_setup(&self, target: &RedisTarget, tags: bool) -> Result<setup::Findings, SinkError> {
        let inner = &self.inner;
        let facts = match tokio::time::timeout(inner.options.timeout, setup::inspect(&inner.conn, &inner.errors)).await
        {
            Ok(facts) => facts?,
            Err(_) => return Err(inner.errors.timeout("reading INFO", inner.options.timeout)),
        };
        Ok(setup::assess(target, &facts, tags))
    }

    /// Records this sink's own counts (keys invalidated without a stamp)
    /// in `metrics`; the first call wins.
    pub(crate) fn observe(&self, metrics: Arc<Metrics>) {
        if let Some(config) = &self.inner.broadcast {
            metrics.broadcast_target(&self.inner.name, broadcast::transports(config.transport));
        }
        let _ = self.inner.metrics.set(metrics);
    }

    /// Bumps so far that found the stored version at or past the batch's
    /// (and raised it past that instead).
    pub fn versions_behind(&self) -> u64 {
        self.inner.versions_behind.load(Ordering::Relaxed)
    }

    /// Counts behind bumps in `counter` too (the target's series of
    /// `evictd_versions_behind_total`). Only the first call counts.
    pub(crate) fn count_versions_behind(&self, counter: Counter) {
        let _ = self.inner.versions_behind_metric.set(counter);
    }

    /// Delayed second deletes that failed so far (each is logged).
    pub fn redelete_failures(&self) -> u64 {
        self.inner.redelete_failures.load(Ordering::Relaxed)
    }

    /// Version keys so far that held something else than a version (their
    /// caches' namespaces were bumped instead).
    pub fn unbumpable_keys(&self) -> u64 {
        self.inner.unbumpable_keys.load(Ordering::Relaxed)
    }

    /// Second deletes skipped so far because too many were waiting.
    pub fn redeletes_skipped(&self) -> u64 {
        self.inner.redeletes_skipped.load(Ordering::Relaxed)
    }

    /// The delayed second deletes. They run to their end even if the sink
    /// is dropped; on shutdown, `close()` then `wait()` with the grace
    /// period as deadline, and what has not run by then is lost.
    pub fn redeletes(&self) -> &TaskTracker {
        &self.inner.redeletes
    }

    async fn apply_batch(&self, batch: SinkBatch<'_>) -> Result<(), SinkError> {
        let inner = &self.inner;
        let topology = inner.conn.topology();
        let plan = plan::plan(&batch, topology, &mut fastrand::Rng::new())
            .map_err(|e| inner.errors.make(Class::Definite, RedisCause::Plan(e)))?;
        let runner = inner.runner();
        let max = inner.options.max_in_flight;
        let now = now_ms();
        let stamp = inner
            .fill_guard_ttl_ms
            .map(|ttl_ms| Stamp { value: layout::guard_stamp(&plan.version, Some(stamp_nonce())), ttl_ms });
        let stamp = stamp.as_ref();
        // Before the bumps: a replay of this batch must find its version recorded.
        let exact = batch.position.is_some_and(Position::exact_versions);
        let has_bumps = plan.groups.iter().flat_map(|g| &g.commands).any(|c| matches!(c, Command::Bump(_)));
        let noted = exact && has_bumps;
        let replay = if noted { self.keep_record(&runner, Some(batch.version)).await? } else { None };
        // Otherwise the record is only checked (written again if missing):
        // it need not precede any effect, only the confirmation.
        let record = async {
            if !noted {
                self.keep_record(&runner, None).await?;
            }
            Ok(())
        };
        let behind = Behind::default();
        let unbumpable = Mutex::new(Vec::new());
        let bump = Bump { version: &plan.version, behind: Some(&behind), unbumpable: Some(&unbumpable) };
        let keys = run_groups(&runner, &plan.groups, bump, max, stamp);
        // The tag keys kept past their delete: those the second deletes
        // need (while there is room for them) and those to report unguarded.
        let cluster = topology == Topology::Cluster;
        let mut redelete_room = redelete::room(&self.inner);
        let mut keep = |job: usize, key: &[u8]| {
            let unguarded = cluster && stamp.is_some() && !layout::guard_in_slot(key);
            let redelete = plan.tags[job].redelete_after_ms.is_some() && redelete_room > 0;
            redelete_room -= usize::from(redelete);
            unguarded || redelete
        };
        let tags = tags::invalidate_all(&runner, &plan.tags, now, topology, max, stamp, &mut keep);
        let ((), tag_keys, ()) = futures_util::try_join!(keys, tags, record)?;
        let unbumpable = unbumpable.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !unbumpable.is_empty() {
            self.bump_namespaces_instead(&runner, &batch, &plan, unbumpable, &behind).await?;
        }
        self.report_behind(&runner, &batch, &behind, exact, replay).await;
        // Every effect confirmed: only now tell the local caches.
        if let Some(config) = &inner.broadcast
            && let Some(message) = broadcast::message(&batch, config, now)
        {
            // This batch's effects are confirmed on this target, and every
            // earlier batch's: its own position is applied here.
            let applied = batch.position.and_then(broadcast::applied_lsn);
            self.publish(config, &message, applied).await?;
        }
        tracing::debug!(groups = plan.groups.len(), tags = plan.tags.len(), "batch confirmed");
        if stamp.is_some() {
            self.report_unguarded(&plan, &tag_keys);
        }

        // Confirmed: only now schedule the second deletes.
        for redelete in plan.redeletes {
            redelete::schedule(&self.inner, batch.id, redelete.after_ms, redelete.keys);
        }
        for (job, keys) in plan.tags.iter().zip(tag_keys) {
            if let Some(after_ms) = job.redelete_after_ms
                && !keys.is_empty()
            {
                redelete::schedule(&self.inner, batch.id, after_ms, keys);
            }
        }
        Ok(())
    }
}

impl RedisSink {
    /// Publishes a batch's message through the publish script, with the
    /// higher of `applied` and the last acknowledged position.
    async fn publish(
        &self,
        config: &BroadcastConfig,
        message: &broadcast::BatchMessage<'_>,
        applied: Option<Lsn>,
    ) -> Result<(), SinkError> {
        let inner = &self.inner;
        if let Some(lsn) = applied {
            let _ = inner.applied_kind.set(broadcast::APPLIED_POSTGRES);
            inner.applied.fetch_max(lsn.0, Ordering::Relaxed);
        }
        let (head, tail) = message.parts().map_err(|e| inner.errors.make(Class::Definite, RedisCause::Broadcast(e)))?;
        let mut script = self.publish_cmd(config, "batch", head, tail, message.has_tags());
        script.arg(&message.touched);
        let mut pipe = redis::pipe();
        pipe.add_command(script);
        let what = format!("publishing on {}", config.channel);
        // No durability wait: a lost message is a gap subscribers repair.
        let reply = inner.runner_without_wait().pipeline(&what, &mut pipe).await;
        self.count_publish(broadcast::transports(config.transport), BroadcastKind::Batch, reply.is_ok());
        let seq = self.published(config, &reply?);
        tracing::debug!(channel = %config.channel, seq = ?seq, "broadcast");
        Ok(())
    }

    /// Reads the publish script's reply: keeps the highest `(epoch, seq)`
    /// seen, and logs a new sequence that started. The message's `seq`.
    fn published(&self, config: &BroadcastConfig, replies: &[redis::Value]) -> Option<u64> {
        let reply = replies.first().and_then(broadcast::Reply::read)?;
        if let Ok(mut seen) = self.inner.seen.lock() {
            broadcast::Seen::raise(&mut seen, &reply);
        }
        match reply.why.as_str() {
            "" => {}
            // Also every first use of a channel: nothing to warn about.
            "lost" => tracing::info!(
                target = %self.inner.name,
                channel = %config.channel,
                epoch = %reply.epoch,
                "the broadcast's sequence was not in Redis (a first use, or Redis lost it): started a new epoch; \
                 subscribers that saw the old one flush their local caches"
            ),
            why => tracing::warn!(
                target = %self.inner.name,
                channel = %config.channel,
                epoch = %reply.epoch,
                reason = why,
                "{}",
                broadcast::new_epoch_reason(why)
            ),
        }
        Some(reply.seq)
    }

    /// Counts one publish (`evictd_broadcast_publishes_total`), once the
    /// daemon attached its metrics.
    fn count_publish(&self, transports: &[&'static str], kind: BroadcastKind, ok: bool) {
        if let Some(metrics) = self.inner.metrics.get() {
            metrics.broadcast_published(&self.inner.name, transports, kind, ok);
        }
    }

    /// The publish script with its keys and arguments up to ARGV 11.
    fn publish_cmd(&self, config: &BroadcastConfig, kind: &str, head: String, tail: String, tags: bool) -> redis::Cmd {
        let keys = layout::BroadcastKeys::of(&config.channel);
        let seen = self.inner.seen.lock().ok().and_then(|seen| seen.clone());
        let (seen_epoch, seen_seq) = seen.map_or((String::new(), String::new()), |s| (s.epoch, s.seq.to_string()));
        let applied = self.inner.applied.load(Ordering::Relaxed);
        let (applied_kind, applied) = match self.inner.applied_kind.get() {
            Some(kind) if applied > 0 => (*kind, Lsn(applied).to_string()),
            Some(kind) => (*kind, String::new()),
            None => ("", String::new()),
        };
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.inner.scripts.publish.get_hash())
            .arg(6)
            .arg(&keys.script_keys()[..])
            .arg(&config.channel)
            .arg(kind)
            .arg(config.transport.as_str())
            .arg(config.stream_max_len)
            .arg(applied_kind)
            .arg(applied)
            .arg(head)
            .arg(tail)
            .arg(if tags { "1" } else { "0" })
            .arg(seen_epoch)
            .arg(seen_seq);
        cmd
    }

    /// One heartbeat: the channel's current `seq` and the applied position,
    /// published on pub/sub (not on the stream-only transport, where it
    /// only raises the stored applied position). Returns the `seq`.
    pub async fn heartbeat(&self) -> Result<Option<u64>, SinkError> {
        let inner = &self.inner;
        let Some(config) = &inner.broadcast else { return Ok(None) };
        let tail = broadcast::heartbeat_tail(now_ms())
            .map_err(|e| inner.errors.make(Class::Definite, RedisCause::Broadcast(e)))?;
        let mut pipe = redis::pipe();
        pipe.add_command(self.publish_cmd(config, "heartbeat", String::new(), tail, false));
        let what = format!("heartbeat on {}", config.channel);
        let reply = inner.runner_without_wait().pipeline(&what, &mut pipe).await;
        // On the stream-only transport a heartbeat publishes nothing.
        let transports: &[&'static str] = if config.transport.pubsub() { &["pubsub"] } else { &[] };
        self.count_publish(transports, BroadcastKind::Heartbeat, reply.is_ok());
        Ok(self.published(config, &reply?))
    }

    /// Publishes a heartbeat every `broadcast_heartbeat_ms` until `stop`,
    /// on a task of its own: a failure is logged and the next tick tries
    /// again; nothing waits for it (batches go through their own round
    /// trips). `postgres`: the source is Postgres, so heartbeats carry the
    /// stored applied position even before this process applied anything
    /// (a standby's, a fresh start's). `None` without a broadcast.
    pub fn spawn_heartbeats(&self, postgres: bool, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.inner.broadcast.as_ref()?.heartbeat;
        if postgres {
            let _ = self.inner.applied_kind.set(broadcast::APPLIED_POSTGRES);
        }
        let sink = self.clone();
        let span = tracing::info_span!("heartbeats", target = %self.inner.name);
        Some(tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut failing = false;
                loop {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    match sink.heartbeat().await {
                        Ok(_) if failing => {
                            tracing::info!("broadcast heartbeats resumed");
                            failing = false;
                        }
                        Ok(_) => {}
                        // Once per outage at warn: the batches report it too.
                        Err(e) if !failing => {
                            tracing::warn!(error = %e.cause(), "broadcast heartbeat failed; retrying every tick");
                            failing = true;
                        }
                        Err(e) => tracing::debug!(error = %e.cause(), "broadcast heartbeat failed"),
                    }
                }
            }
            .instrument(span),
        ))
    }

    /// Version keys of this batch that hold something else than a version
    /// (an application wrote into one, or two caches render the same key
    /// with different actions) cannot be raised; their caches' namespaces
    /// are bumped instead, which invalidates every key of those caches, and
    /// the keys are left as they are. Counted and logged per cache: data
    /// must never stop the daemon (it would stop again on every restart, on
    /// the same row). A namespace key that holds something else is evictd's
    /// own key damaged, not data: that stays a definite error.
    async fn bump_namespaces_instead(
        &self,
        runner: &Runner<'_>,
        batch: &SinkBatch<'_>,
        plan: &Plan,
        keys: Vec<String>,
        behind: &Behind,
    ) -> Result<(), SinkError> {
        let inner = &self.inner;
        let mut by_cache: std::collections::BTreeMap<Arc<str>, (u64, String)> = std::collections::BTreeMap::new();
        for key in keys {
            let cache = batch.effects.iter().find_map(|e| match e {
                crate::resolve::Effect::Key { cache, key: k } if *k == key => Some(*cache),
                _ => None,
            });
            let Some(cache) = cache else {
                return Err(inner.errors.make(Class::Definite, RedisCause::NamespaceNotAVersion { key }));
            };
            let name = batch.graph.cache(cache).name.clone();
            by_cache.entry(name).or_insert((0, key)).0 += 1;
        }
        let topology = inner.conn.topology();
        let commands: Vec<Command> = by_cache.keys().map(|cache| Command::Bump(layout::namespace_key(cache))).collect();
        let groups = plan::bump_groups(commands, topology);
        let bump = Bump { version: &plan.version, behind: Some(behind), unbumpable: None };
        run_groups(runner, &groups, bump, inner.options.max_in_flight, None).await?;
        for (cache, (count, example)) in by_cache {
            tracing::warn!(
                target = %inner.name,
                cache = %cache,
                keys = count,
                example = %example,
                "version keys hold something else than a version: bumped the cache's namespace instead (left the keys as they are)"
            );
            inner.unbumpable_keys.fetch_add(count, Ordering::Relaxed);
            if let Some(metrics) = inner.metrics.get() {
                metrics.unbumpable_keys(&inner.name, &cache, count);
            }
        }
        Ok(())
    }

    /// Counts and logs, per cache, the keys of a confirmed batch that were
    /// invalidated without a fill-guard stamp: on a Cluster, keys with braces
    /// but no hash tag have no stamp name in their own slot (see
    /// [`layout::guard_in_slot`]). No reader can hold a stamp for them
    /// either (its script would cross slots), so nothing is lost but the
    /// guard itself; a stamp `SET` in another slot would have failed the
    /// whole pipeline, on every retry and every restart.
    fn report_unguarded(&self, plan: &Plan, tag_keys: &[Vec<Vec<u8>>]) {
        if self.inner.conn.topology() != Topology::Cluster {
            return;
        }
        let mut by_cache: std::collections::BTreeMap<&str, (u64, &[u8])> = std::collections::BTreeMap::new();
        let tagged = plan.tags.iter().zip(tag_keys).flat_map(|(job, keys)| keys.iter().map(move |k| (&job.cache, k)));
        let named = plan.unguarded.iter().map(|(cache, key)| (cache, key));
        for (cache, key) in named.chain(tagged.filter(|(_, k)| !layout::guard_in_slot(k))) {
            by_cache.entry(cache).or_insert((0, key)).0 += 1;
        }
        for (cache, (count, example)) in by_cache {
            tracing::warn!(
                target = %self.inner.name,
                cache,
                keys = count,
                example = %String::from_utf8_lossy(example),
                "keys invalidated without a fill-guard stamp: they have braces but no Cluster hash tag, so no stamp name shares their slot"
            );
            if let Some(metrics) = self.inner.metrics.get() {
                metrics.unguarded_keys(&self.inner.name, cache, count);
            }
        }
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn apply(&self, batch: SinkBatch<'_>) -> impl Future<Output = Result<(), SinkError>> + Send {
        let span = tracing::info_span!(
            "redis_apply",
            batch_id = batch.id,
            target = %self.inner.name,
            effects = batch.effects.len()
        );
        self.apply_batch(batch).instrument(span)
    }

    fn acknowledged(&self, position: &Position) {
        if let Some(lsn) = broadcast::applied_lsn(position) {
            let _ = self.inner.applied_kind.set(broadcast::APPLIED_POSTGRES);
            self.inner.applied.fetch_max(lsn.0, Ordering::Relaxed);
        }
    }
}

/// The fill-guard stamp written before each key invalidation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// `i<version>.<nonce>`: see [`layout::guard_stamp`].
    pub(crate) value: String,
    pub(crate) ttl_ms: u64,
}

/// A value unique to each application of a batch, for its fill-guard
/// stamps: a random per-process start plus a per-process counter, so two
/// invalidations never write the same stamp, even with equal batch
/// versions (Kafka replicas, Postgres LSNs after a restore, two sources).
fn stamp_nonce() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    START.get_or_init(|| fastrand::u64(..)).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The arguments of the version script for one batch.
#[derive(Debug, Clone, Copy)]
struct Bump<'a> {
    version: &'a str,
    /// Where the groups tally their behind bumps.
    behind: Option<&'a Behind>,
    /// Where the groups put the keys that hold something else than a
    /// version (the script answered 3).
    unbumpable: Option<&'a Mutex<Vec<String>>>,
}

impl Bump<'static> {
    /// For groups without bumps (tags' keys, second deletes).
    const NONE: Bump<'static> = Bump { version: "", behind: None, unbumpable: None };
}

/// Behind bumps of one batch: the version script answered 2.
#[derive(Debug, Default)]
struct Behind {
    count: AtomicU64,
    /// One of the keys, for the warning.
    first: Mutex<Option<String>>,
}

impl Behind {
    fn add(&self, key: &str) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first.lock() {
            first.get_or_insert_with(|| key.to_owned());
        }
    }
}

/// Runs groups as pipelines, at most `max` at once; `Ok` once all replied.
/// With a `stamp`, every deleted or expired key's fill guard is set first.
async fn run_groups(
    runner: &Runner<'_>,
    groups: &[Group],
    bump: Bump<'_>,
    max: usize,
    stamp: Option<&Stamp>,
) -> Result<(), SinkError> {
    let pipelines: Vec<_> = groups.iter().map(|group| run_group(runner, group, bump, stamp)).collect();
    stream::iter(pipelines).buffer_unordered(max).try_collect::<()>().await
}

/// One group as one pipeline. A key's stamp (if a reader created one) goes
/// out before the command that invalidates it, in the same pipeline (same
/// connection, in order): a reader's guarded fill that runs after the
/// invalidation always sees the new stamp, so it cannot put back what the
/// reader read before.
///
/// On a Cluster, a key whose stamp would live in another slot
/// ([`layout::guard_in_slot`]) gets none: the pipeline must stay in one
/// slot, and no reader can have taken such a stamp.
///
/// With a durability wait, the pipeline ends with `WAIT` (or `WAITAOF`):
/// on the same connection, after the writes, so it covers them (Redis
/// waits for the offset of the connection's last write). On a Cluster the
/// client sends a pipeline whole to the node of its first keyed command
/// (a keyless `WAIT` does not change the route), which is the node that ran
/// the writes. Fewer replicas than asked fail the group, transiently.
async fn run_group(runner: &Runner<'_>, group: &Group, bump: Bump<'_>, stamp: Option<&Stamp>) -> Result<(), SinkError> {
    let mut pipe = redis::pipe();
    let cluster = runner.conn.topology() == Topology::Cluster;
    // Where each bump's reply is, by index in the pipeline.
    let mut bumps: Vec<(usize, &str)> = Vec::new();
    let guard = |pipe: &mut redis::Pipeline, key: &[u8]| {
        if let Some(stamp) = stamp
            && (!cluster || layout::guard_in_slot(key))
        {
            // XX: only a stamp a reader took matters; with none out there
            // is nothing to refuse, and a reader that starts later reads
            // the database after this change anyway.
            pipe.cmd("SET").arg(layout::guard_key(key)).arg(&stamp.value).arg("XX").arg("PX").arg(stamp.ttl_ms);
        }
    };
    for command in &group.commands {
        match command {
            Command::Unlink(keys) => {
                for key in keys {
                    guard(&mut pipe, key);
                }
                pipe.cmd("UNLINK").arg(keys);
            }
            Command::Bump(key) => {
                bumps.push((pipe.len(), key.as_str()));
                pipe.cmd("EVALSHA").arg(runner.scripts.bump.get_hash()).arg(1).arg(key).arg(bump.version);
            }
            Command::Expire { key, ttl_ms } => {
                guard(&mut pipe, key.as_bytes());
                pipe.cmd("PEXPIRE").arg(key).arg(*ttl_ms).arg("LT");
            }
        }
    }
    if let Some(wait) = &runner.wait {
        durability::push(&mut pipe, wait);
    }
    let what = format!("pipeline of {} commands", group.commands.len());
    let replies = runner.pipeline(&what, &mut pipe).await?;
    if let Some(wait) = &runner.wait {
        durability::check(wait, replies.last())
            .map_err(|error| runner.errors.make(error.class(), RedisCause::Durability { what: what.clone(), error }))?;
    }
    for (index, key) in bumps {
        match replies.get(index) {
            Some(redis::Value::Int(2)) => {
                if let Some(behind) = bump.behind {
                    behind.add(key);
                }
            }
            Some(redis::Value::Int(3)) => match bump.unbumpable.map(Mutex::lock) {
                Some(Ok(mut keys)) => keys.push(key.to_owned()),
                _ => {
                    let cause = RedisCause::NotAVersion { what, key: key.to_owned() };
                    return Err(runner.errors.make(Class::Definite, cause));
                }
            },
            _ => {}
        }
    }
    Ok(())
}

/// Now as Unix milliseconds (0 if the clock is before 1970): the clock of
/// every score, expiry and record evictd and its readers write to Redis.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
