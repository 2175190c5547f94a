//! Writing the dead letters of messages a source could not decode
//! ([`SourceEvent::Undecodable`]), the same for every source. Whether a
//! message is dead-lettered or stops the daemon (`dead_letter.on_error`) is
//! decided by `crate::policy`, asked by the session (`session.rs`) as the
//! message arrives.
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

use tokio_util::sync::CancellationToken;

use super::{Pipeline, RunError};
use crate::dead_letter::DeadLetterStore;
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
            let mut backoff = self.backoff();
            loop {
                let e = match self.dead_letters.record_undecodable(message).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                self.metrics.dead_letter_write_error(e.kind());
                match policy::decide(Failure::DeadLetterStore(&e)).decision {
                    Decision::Retry => {
                        tracing::warn!(position = %message.position, error = %e, retry_in_ms = backoff.current().as_millis() as u64, "cannot write a dead letter; retrying (the source is paused)");
                        backoff.wait(shutdown).await.map_err(|Stopped| RunError::Cancelled)?;
                    }
                    Decision::DeadLetter(_) | Decision::Stop => return Err(RunError::DeadLetter(e)),
                }
            }
            tracing::warn!(
                position = %message.position,
                error = message.error,
                reason = message.reason.as_str(),
                "dead-lettered a message that cannot be decoded; the partition goes on"
            );
        }
        Ok(())
    }
}
