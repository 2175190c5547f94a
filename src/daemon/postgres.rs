//! The Postgres daemon: the dead-letter table, the Redis targets and the
//! look-up pool, then the supervisor over replication sessions.
//!
//! Membership is the slot's advisory lock (`source::postgres::lock`): the
//! replica holding it is active, the others wait as standbys; the lock's
//! session is checked every `standby_retry` (which renews its lease) and its
//! loss steps the replica down. A new holder first ends the walsender a
//! previous (frozen) holder may still keep on the slot. Each session starts through `slot_history.rs`, which refuses or
//! flushes when the slot was lost, and resumes from the slot.
//!
//! A holder whose sessions keep failing for the lock's lease (its
//! replication connection is silent or refused while its lock's session
//! works) gives the lock up and stands aside for two standby retries, so
//! that a standby whose path works takes over ([`StepDown`]): the lease is
//! already how long a standby waits for a frozen holder, and a holder that
//! cannot stream is no more use than a frozen one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::slot_history;
use super::supervisor::{self, Ended, Sessions, StartError, StepDown, SteppedDown};
use super::wiring::{self, Shared};
use crate::config::DEFAULT_LOCK_LEASE_MS;
use crate::config::PostgresSource as PostgresConfig;
use crate::graph::Graph;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::server::{Health, Role};
use crate::sink::multi::MultiSink;
use crate::sink::redis::RedisSink;
use crate::source::postgres::PostgresSource;
use crate::source::postgres::lock::SlotLock;

pub(super) async fn run(shared: Shared<'_>, source: &PostgresConfig) -> Result<(), DaemonError> {
    let Shared { config, graph, metrics, health, shutdown } = shared;
    let lookups = wiring::lookup_executor(config)?;
    let Some(dead_letters) = wiring::open_dead_letters(config, &metrics, shutdown).await? else { return Ok(()) };
    let Some(sink) = wiring::connect_sinks(config, &graph, &metrics, shutdown).await? else { return Ok(()) };
    wiring::sinks_connected(&sink, &metrics, &health);
    let _heartbeats = wiring::start_heartbeats(&sink, true);
    let _operator_actions = wiring::export_operator_actions(&sink, &metrics);
    let sink = Arc::new(sink);
    let sessions = PostgresSessions {
        config: source.clone(),
        graph: graph.clone(),
        sink: sink.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        lease_warned: AtomicBool::new(false),
    };
    let pipeline = wiring::pipeline(Some(config), graph, sink, lookups, Arc::new(dead_letters), metrics, health);
    supervisor::supervise(&sessions, &pipeline, shutdown).await
}

/// Replication sessions under the slot's lock.
struct PostgresSessions {
    config: PostgresConfig,
    graph: Arc<Graph>,
    sink: Arc<MultiSink<RedisSink>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Whether the lock's missing lease was reported (once per process).
    lease_warned: AtomicBool,
}

impl Sessions for PostgresSessions {
    type Source = PostgresSource;
    type Membership = SlotLock;

    const START_CONNECTS: bool = true;

    /// Waits as a standby until this replica holds the slot's lock. The
    /// run loop's heartbeat keeps beating meanwhile.
    async fn acquire(&self, shutdown: &CancellationToken) -> Option<SlotLock> {
        let source = &self.config;
        let mut announced = false;
        let mut poll = Backoff::constant(source.standby_retry);
        loop {
            self.health.heartbeat();
            match SlotLock::try_acquire(&source.url, &source.slot, source.lock_lease).await {
                Ok(Some(mut lock)) => {
                    tracing::info!(slot = %source.slot, "holding the slot's lock: active");
                    self.take_over(&mut lock).await;
                    self.health.set_role(Role::Active);
                    self.metrics.set_role(Role::Active);
                    return Some(lock);
                }
                Ok(None) => {
                    if !announced {
                        tracing::info!(slot = %source.slot, retry_ms = source.standby_retry.as_millis() as u64, "another replica holds the slot's lock: standby");
                        announced = true;
                    }
                    self.health.set_role(Role::Standby);
                    self.metrics.set_role(Role::Standby);
                }
                // Neither role is known: /readyz reports the source as not
                // connected, as it does for any other database outage.
                Err(e) => tracing::warn!(slot = %source.slot, error = %e, "cannot take the slot's lock; retrying"),
            }
            if poll.wait(shutdown).await.is_err() {
                return None;
            }
        }
    }

    fn hold(
        &self,
        lock: SlotLock,
        stepped_down: CancellationToken,
        done: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        watch_slot_lock(lock, self.config.standby_retry, stepped_down, done)
    }

    /// After the lock's lease (the default lease when it is turned off):
    /// as long as a standby waits for a frozen holder. Aside for two of a
    /// standby's retries, so that a polling standby tries at least once.
    fn step_down(&self) -> Option<StepDown> {
        let after = self.config.lock_lease.unwrap_or(Duration::from_millis(DEFAULT_LOCK_LEASE_MS));
        Some(StepDown { after, aside: self.config.standby_retry * 2 })
    }

    async fn start(&self) -> Result<PostgresSource, StartError> {
        slot_history::start(&self.config, &self.graph, &self.sink).await
    }

    async fn close(&self, source: PostgresSource, ended: Ended) {
        match ended {
            Ended::Stopped => source.shutdown().await,
            // The connection is gone: there is no acknowledgement to wait for.
            // Aborted, not stopped: the connection may be silent.
            Ended::Lost => source.abandon(),
        }
    }

    fn log_lost(&self, error: &str) {
        tracing::warn!(error = %error, "lost the source; reconnecting from the slot");
    }

    fn log_stepped_down(&self, why: SteppedDown) {
        let slot = &self.config.slot;
        match why {
            SteppedDown::Lost => tracing::warn!(%slot, "lost the slot's lock; stepped down to standby"),
            SteppedDown::GaveUp(failing) => tracing::warn!(
                %slot,
                failing_ms = failing.as_millis() as u64,
                "the sessions kept failing for the lock's lease: giving the slot's lock up so that a replica that can stream takes over; standby"
            ),
        }
    }
}

impl PostgresSessions {
    /// What a new holder does before streaming: reports a lock without a
    /// lease (once), and ends the walsender a previous holder may still
    /// keep on the slot: safe only because this replica holds the lock.
    async fn take_over(&self, lock: &mut SlotLock) {
        let slot = &self.config.slot;
        if let Some(why) = lock.lease_unavailable()
            && !self.lease_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                %slot,
                reason = why,
                "the slot's lock runs without a lease: a frozen active replica keeps it until its process or host is gone"
            );
        }
        match lock.end_stale_walsender().await {
            Ok(Some(pid)) => tracing::warn!(
                %slot,
                pid,
                "ended the previous active replica's walsender, which still held the slot"
            ),
            Ok(None) => {}
            // The session's start is refused and retried until the server
            // ends that walsender itself (wal_sender_timeout).
            Err(e) => {
                tracing::warn!(%slot, error = %e, "cannot end the walsender holding the slot; retrying the session")
            }
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
