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
//!     release membership once the sessions stopped
//! ```
//!
//! Postgres membership is the slot's advisory lock (active/standby); Kafka
//! membership is the consumer group, held by every replica.
//!
//! **Invariants:**
//! - **Membership is released only after the sessions under it have
//!   stopped**, their final acknowledgement included: a standby never
//!   streams while the previous active replica may still acknowledge.
//! - A session's failure that must stop the daemon ([`crate::run::RunError`],
//!   a start error [`crate::policy::decide`] stops on) stops it, with the
//!   source closed first; a lost source or a start error the policy
//!   retries is retried with backoff, resuming from what was acknowledged.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::wiring::backoff;
use crate::dead_letter::DeadLetterStore;
use crate::lookup::LookupExecutor;
use crate::policy::{self, Decision, Failure};
use crate::run::{Pipeline, SessionEnd};
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

    /// Starts one session.
    fn start(&self) -> impl Future<Output = Result<Self::Source, StartError>> + Send;

    /// Closes a session's source.
    fn close(&self, source: Self::Source, ended: Ended) -> impl Future<Output = ()> + Send;

    /// Logs the loss of a session (the next one resumes from what was
    /// acknowledged).
    fn log_lost(&self, error: &str);

    /// Logs a step-down: membership was lost while the daemon still runs.
    fn log_stepped_down(&self);
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
    while !shutdown.is_cancelled() {
        let Some(membership) = sessions.acquire(shutdown).await else { break };
        // Active until shutdown, or until the membership is lost.
        let stepped_down = shutdown.child_token();
        let done = CancellationToken::new();
        let holder = tokio::spawn(sessions.hold(membership, stepped_down.clone(), done.clone()));
        let result = active(sessions, pipeline, &stepped_down).await;
        // Released only now: a standby must not start before the final
        // acknowledgement of this replica went out.
        done.cancel();
        let _ = holder.await;
        result?;
        if !shutdown.is_cancelled() {
            sessions.log_stepped_down();
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Sessions one after another while active: a lost source or a transient
/// start error is retried with backoff. Returns on `stop`.
async fn active<F, K, L, D>(
    sessions: &F,
    pipeline: &Pipeline<K, L, D>,
    stop: &CancellationToken,
) -> Result<(), DaemonError>
where
    F: Sessions + Sync,
    K: Sink + Send + Sync + 'static,
    L: LookupExecutor + Send + Sync + 'static,
    D: DeadLetterStore + Send + Sync + 'static,
{
    let mut backoff = backoff(pipeline.options.retry_max);
    while !stop.is_cancelled() {
        let started = tokio::select! {
            s = sessions.start() => s,
            () = stop.cancelled() => break,
        };
        let mut source = match started {
            Ok(s) => {
                if F::START_CONNECTS {
                    backoff.reset();
                }
                s
            }
            Err(e) => match policy::decide(e.failure()).decision {
                Decision::Retry => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.current().as_millis() as u64, "source unavailable; retrying");
                    pipeline.health.heartbeat();
                    if backoff.wait(stop).await.is_err() {
                        break;
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
                if backoff.wait(stop).await.is_err() {
                    break;
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
    Ok(())
}

#[cfg(test)]
mod tests;
