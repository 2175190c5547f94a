//! The one supervisor: membership, then source sessions one after another,
//! over a [`Sessions`] factory per source.
//!
//! ```text
//! while not shut down:
//!     acquire membership (standby until then)      Sessions::acquire
//!     hold it in a task; losing it steps down      Sessions::hold
//!     while active:
//!         start a session (retried with backoff)   Sessions::start
//!         run it (Pipeline::run_session)
//!         shutdown → close it, stop; lost → close it, back off, start again
//!         failing (lost / not starting) for StepDown::after → give it up
//!     release membership once the sessions stopped
//!     gave it up → stand aside (StepDown::aside) before acquiring again
//! ```
//!
//! Postgres membership is the slot's advisory lock (active/standby); Kafka
//! membership is the consumer group, held by every replica.
//!
//! Giving membership up is for a replica that holds it but cannot use it:
//! its lock's session works while its replication connection does not (a
//! silent network path). Holding on would keep a standby whose path works
//! from taking over for as long as the fault lasts; giving up after
//! [`StepDown::after`] of failing sessions, then standing aside long enough
//! for a standby's next try, hands the slot over. With no standby (or none
//! that does better) the replica takes the lock again and keeps trying,
//! its backoff kept across memberships: at most one hand-over per
//! `after` + `aside`, never a storm.
//!
//! **Invariants:**
//! - **Membership is released only after the sessions under it have
//!   stopped**, their final acknowledgement included: a standby never
//!   streams while the previous active replica may still acknowledge.
//! - **An active replica whose sessions keep failing gives membership up**
//!   after [`StepDown::after`] (Postgres: the lock's lease) with no start
//!   in between that proved the source reachable; a source without
//!   standbys (Kafka) never does ([`Sessions::step_down`] is `None`).
//! - A session's failure that must stop the daemon ([`crate::run::RunError`],
//!   a start error [`crate::policy::decide`] stops on) stops it, with the
//!   source closed first; a lost source or a start error the policy
//!   retries is retried with backoff, resuming from what was acknowledged.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::wiring::backoff;
use crate::dead_letter::DeadLetterStore;
use crate::lookup::LookupExecutor;
use crate::policy::{self, Decision, Failure};
use crate::retry::Backoff;
use crate::run::{Pipeline, SessionEnd};
use crate::server::Role;
use crate::sink::{Sink, SinkError};
use crate::source::postgres::SourceSetupError;
use crate::source::{Source, SourceError};

/// Why a session could not start. Whether it is retried or stops the
/// daemon (and with which exit code) is [`crate::policy::decide`]'s call,
/// on [`StartError::failure`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// The Postgres server, slot, publication or replication connection.
    #[error("{0}")]
    Setup(#[from] SourceSetupError),
    /// A Redis target's source record could not be read or written.
    #[error("source record: {0}")]
    SourceRecord(#[source] SinkError),
    /// The flush after a lost slot (`on_slot_loss = "flush"`) was not
    /// confirmed (the text is the one it has always had).
    #[error("source record: {0}")]
    Flush(#[source] SinkError),
    /// The Kafka consumer could not be created or subscribe.
    #[error("{0}")]
    Consumer(#[source] SourceError),
}

impl StartError {
    /// The failure the policy decides on.
    pub(crate) fn failure(&self) -> Failure<'_> {
        match self {
            StartError::Setup(e) => Failure::SourceSetup(e),
            StartError::SourceRecord(e) | StartError::Flush(e) => Failure::Sink(e),
            StartError::Consumer(e) => Failure::Source(e),
        }
    }
}

/// How a session ended, for [`Sessions::close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// Shutdown, step-down or a failure of the run loop: the source still
    /// works and is closed cleanly.
    Stopped,
    /// The source failed.
    Lost,
}

/// When an active replica whose sessions keep failing gives its membership
/// up ([`Sessions::step_down`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StepDown {
    /// How long sessions may keep failing (lost, or failing to start) with
    /// no start in between that proved the source reachable.
    pub(super) after: Duration,
    /// How long the replica then waits, as a standby, before it tries to
    /// acquire membership again: long enough for a standby's next try.
    pub(super) aside: Duration,
}

/// Why an active replica stopped being active while the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SteppedDown {
    /// Its membership was lost.
    Lost,
    /// Its sessions failed for this long: it gave its membership up.
    GaveUp(Duration),
}

/// One source's sessions and membership: the seam between the supervisor
/// and a concrete source.
pub(super) trait Sessions {
    type Source: Source + Send;
    /// What keeps this replica a member while it is active.
    type Membership: Send + 'static;

    /// Whether a successful [`Sessions::start`] proves the source reachable.
    /// Then the backoff starts over after it, and the pause after losing
    /// such a session is the first one. A start that only prepares a client
    /// (a Kafka consumer joins on its first read) proves nothing, and the
    /// pauses after lost sessions keep growing.
    const START_CONNECTS: bool;

    /// Waits (as a standby, if there is such a role) until this replica
    /// may stream; `None` on shutdown.
    fn acquire(&self, shutdown: &CancellationToken) -> impl Future<Output = Option<Self::Membership>> + Send;

    /// Holds the membership while active: cancels `stepped_down` if it is
    /// lost, and releases it once `done`.
    fn hold(
        &self,
        membership: Self::Membership,
        stepped_down: CancellationToken,
        done: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static;

    /// When to give membership up while sessions keep failing, so that a
    /// replica with a working path takes over; `None`: never (every
    /// replica is a member, there is nobody to hand over to).
    fn step_down(&self) -> Option<StepDown>;

    /// Starts one session.
    fn start(&self) -> impl Future<Output = Result<Self::Source, StartError>> + Send;

    /// Closes a session's source.
    fn close(&self, source: Self::Source, ended: Ended) -> impl Future<Output = ()> + Send;

    /// Logs the loss of a session (the next one resumes from what was
    /// acknowledged).
    fn log_lost(&self, error: &str);

    /// Logs a step-down: membership was lost, or given up, while the
    /// daemon still runs.
    fn log_stepped_down(&self, why: SteppedDown);
}

/// Runs `sessions` until shutdown, or until a failure stops the daemon.
pub(super) async fn supervise<F, K, L, D>(
    sessions: &F,
    pipeline: &Pipeline<K, L, D>,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError>
where
    F: Sessions + Sync,
    K: Sink + Send + Sync + 'static,
    L: LookupExecutor + Send + Sync + 'static,
    D: DeadLetterStore + Send + Sync + 'static,
{
    // Kept across memberships: a replica that gives up and takes the lock
    // again goes on waiting as long as before.
    let mut backoff = backoff(pipeline.options.retry_max);
    while !shutdown.is_cancelled() {
        let Some(membership) = sessions.acquire(shutdown).await else { break };
        // Active until shutdown, until the membership is lost, or until the
        // sessions failed for too long.
        let stepped_down = shutdown.child_token();
        let done = CancellationToken::new();
        let holder = tokio::spawn(sessions.hold(membership, stepped_down.clone(), done.clone()));
        let result = active(sessions, pipeline, &stepped_down, &mut backoff).await;
        // Released only now: a standby must not start before the final
        // acknowledgement of this replica went out.
        done.cancel();
        let _ = holder.await;
        match result? {
            Active::Stopped if shutdown.is_cancelled() => {}
            Active::Stopped => sessions.log_stepped_down(SteppedDown::Lost),
            Active::GaveUp { failing_for, aside } => {
                sessions.log_stepped_down(SteppedDown::GaveUp(failing_for));
                pipeline.health.set_role(Role::Standby);
                pipeline.metrics.set_role(Role::Standby);
                pipeline.health.heartbeat();
                if Backoff::constant(aside).wait(shutdown).await.is_err() {
                    break;
                }
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// How a membership's active time ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Active {
    /// On `stop`: shutdown, or the membership was lost.
    Stopped,
    /// The sessions failed for `failing_for` (at least the step-down's
    /// bound): the membership is to be given up.
    GaveUp { failing_for: Duration, aside: Duration },
}

/// The step-down's clock: since when sessions keep failing. Pure.
#[derive(Debug, Clone, Copy, Default)]
struct Failing {
    since: Option<Instant>,
}

impl Failing {
    /// A session was lost or failed to start (the first failure starts the
    /// clock).
    fn failed(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// A start proved the source reachable: the clock stops.
    fn proven(&mut self) {
        self.since = None;
    }

    /// When to give up under `step_down`, if failing.
    fn give_up_at(&self, step_down: Option<StepDown>) -> Option<Instant> {
        Some(self.since? + step_down?.after)
    }

    fn failing_for(&self, now: Instant) -> Duration {
        self.since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// Waits until `at`; for ever without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sessions one after another while active: a lost source or a transient
/// start error is retried with backoff. Returns on `stop`, or once the
/// sessions failed for [`Sessions::step_down`]'s bound.
async fn active<F, K, L, D>(
    sessions: &F,
    pipeline: &Pipeline<K, L, D>,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<Active, DaemonError>
where
    F: Sessions + Sync,
    K: Sink + Send + Sync + 'static,
    L: LookupExecutor + Send + Sync + 'static,
    D: DeadLetterStore + Send + Sync + 'static,
{
    let step_down = sessions.step_down();
    let mut failing = Failing::default();
    let gave_up = move |failing: &Failing| Active::GaveUp {
        failing_for: failing.failing_for(Instant::now()),
        aside: step_down.map_or(Duration::ZERO, |s| s.aside),
    };
    while !stop.is_cancelled() {
        // A start that hangs (a silent network) counts as failing too.
        let started = tokio::select! {
            s = sessions.start() => s,
            () = stop.cancelled() => break,
            () = until(failing.give_up_at(step_down)) => return Ok(gave_up(&failing)),
        };
        let mut source = match started {
            Ok(s) => {
                if F::START_CONNECTS {
                    backoff.reset();
                    failing.proven();
                }
                s
            }
            Err(e) => match policy::decide(e.failure()).decision {
                Decision::Retry => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.current().as_millis() as u64, "source unavailable; retrying");
                    pipeline.health.heartbeat();
                    failing.failed(Instant::now());
                    tokio::select! {
                        waited = backoff.wait(stop) => if waited.is_err() { break },
                        () = until(failing.give_up_at(step_down)) => return Ok(gave_up(&failing)),
                    }
                    continue;
                }
                Decision::DeadLetter(_) | Decision::Stop => return Err(DaemonError::Start(e)),
            },
        };
        match pipeline.run_session(&mut source, stop).await {
            Ok(SessionEnd::Shutdown) => {
                sessions.close(source, Ended::Stopped).await;
                break;
            }
            Ok(SessionEnd::SourceLost(m)) => {
                sessions.log_lost(&m.to_string());
                sessions.close(source, Ended::Lost).await;
                failing.failed(Instant::now());
                tokio::select! {
                    waited = backoff.wait(stop) => if waited.is_err() { break },
                    () = until(failing.give_up_at(step_down)) => return Ok(gave_up(&failing)),
                }
                // A start that connects proves the source is back: the
                // next pause is the first one again.
                if F::START_CONNECTS {
                    backoff.reset();
                }
            }
            Err(e) => {
                sessions.close(source, Ended::Stopped).await;
                return Err(DaemonError::Run(e));
            }
        }
    }
    Ok(Active::Stopped)
}

#[cfg(test)]
mod tests;
