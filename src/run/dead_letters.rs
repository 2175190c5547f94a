//! The batch task's dead letters, each committed before its batch is
//! confirmed, through one retrying write:
//! - messages a source could not decode ([`SourceEvent::Undecodable`]), the
//!   same for every source. Whether such a message is dead-lettered or
//!   stops the daemon (`dead_letter.on_error`) is decided by `crate::policy`,
//!   asked by the session (`session.rs`) as the message arrives;
//! - changes whose look-ups gave up (`crate::lookup`): dead-lettered, or,
//!   with `on_error = "stop"`, the end of the daemon with the batch
//!   unconfirmed.
//!
//! **Invariants:** an undecodable message is a transaction of its batch
//! without effects; its dead letter is committed (the store returned `Ok`)
//! before the batch is confirmed, so its position is acknowledged only
//! after the letter is stored. A failed write is retried with the run
//! loop's backoff (transient) or stops the daemon (definite), never
//! skipped. With `on_error = "stop"` the session ends as the event
//! arrives, before it joins a batch: nothing from it on is acknowledged.
//!
//! [`SourceEvent::Undecodable`]: crate::source::SourceEvent::Undecodable

use std::future::Future;

use tokio_util::sync::CancellationToken;

use super::{Pipeline, RunError};
use crate::change::Position;
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterStore, OnError};
use crate::lookup::LookupExecutor;
use crate::policy::{self, Decision, Failure};
use crate::retry::Stopped;
use crate::sink::Sink;
use crate::source::Undecodable;

impl<K, L, D> Pipeline<K, L, D>
where
    K: Sink + Send + Sync + 'static,
    L: LookupExecutor + Send + Sync + 'static,
    D: DeadLetterStore + Send + Sync + 'static,
{
    /// Records each message's dead letter, committed before this returns,
    /// retrying a store that may recover.
    pub(super) async fn record_undecodable(
        &self,
        messages: &[Undecodable],
        shutdown: &CancellationToken,
    ) -> Result<(), RunError> {
        for message in messages {
            self.write_dead_letter(&message.position, || self.dead_letters.record_undecodable(message), shutdown)
                .await?;
            tracing::warn!(
                position = %message.position,
                error = message.error,
                reason = message.reason.as_str(),
                "dead-lettered a message that cannot be decoded; the partition goes on"
            );
        }
        Ok(())
    }

    /// Changes that cannot be resolved: recorded as dead letters, each
    /// committed before this returns; or, with `on_error = "stop"`, the end
    /// of the daemon with the batch unconfirmed.
    pub(super) async fn handle_unresolved(
        &self,
        unresolved: &[DeadLetter],
        shutdown: &CancellationToken,
    ) -> Result<(), RunError> {
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
            self.write_dead_letter(&letter.change.position, || self.dead_letters.record(letter), shutdown).await?;
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

    /// Writes one dead letter until the store committed it: a store that
    /// may recover is retried with the run loop's backoff (the source stays
    /// paused meanwhile), one that refused for good stops the daemon.
    async fn write_dead_letter<F, W>(
        &self,
        position: &Position,
        write: W,
        shutdown: &CancellationToken,
    ) -> Result<(), RunError>
    where
        W: Fn() -> F,
        F: Future<Output = Result<(), DeadLetterError>>,
    {
        let mut backoff = self.backoff();
        loop {
            let e = match write().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            self.metrics.dead_letter_write_error(e.kind());
            match policy::decide(Failure::DeadLetterStore(&e)).decision {
                Decision::Retry => {
                    tracing::warn!(%position, error = %e, retry_in_ms = backoff.current().as_millis() as u64, "cannot write a dead letter; retrying (the source is paused)");
                    backoff.wait(shutdown).await.map_err(|Stopped| RunError::Cancelled)?;
                }
                Decision::DeadLetter(_) | Decision::Stop => return Err(RunError::DeadLetter(e)),
            }
        }
    }
}
