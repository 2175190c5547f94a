//! A batch's look-ups: run together, narrowed down to single changes when
//! they fail, and the changes that still fail handed on as dead letters.
//!
//! Failures are of four kinds ([`LookupFailure`], decided in `crate::policy`):
//! - **connection**: the database cannot be reached; waited out with
//!   backoff for as long as it lasts, never counted, never a dead letter;
//! - **retryable**: a statement timeout or another error a retry may fix;
//!   counted, and after `lookup_attempts` of them the look-ups give up;
//! - **definite**: the query fails for these values (division by zero, a
//!   bad cast) and will again; the look-ups give up at once;
//! - **broken query**: the query cannot run for any value (a syntax error,
//!   an unknown column, a missing privilege): not a bad change but a broken
//!   graph or schema, so the daemon stops rather than dead-letter every
//!   change that has look-ups.
//!
//! When a batch's look-ups give up, each change that asked for look-ups
//! ([`LookupOrigin`]) runs its own look-ups alone, with the same rules; the
//! ones that give up again become [`DeadLetter`]s — and the caches their
//! look-ups feed get a namespace bump, so no key they would have found stays
//! stale — and the others' keys are applied. Nothing here writes or acknowledges: the caller records the
//! dead letters (or stops) before the batch is confirmed.

use tokio_util::sync::CancellationToken;

use super::RunError;
use crate::batch::LookupOrigin;
use crate::dead_letter::{DeadLetter, DeadLetterReason};
use crate::policy::{self, Decision, Failure, LookupFailure};
use crate::resolve::{LookupError, LookupExecutor, LookupRequest, Resolution, Resolver};
use crate::retry::{Backoff, Stopped};

/// How one set of look-ups ended.
enum Settled {
    Found(Resolution),
    GaveUp { reason: DeadLetterReason, error: LookupError, attempts: u32 },
}

/// How to retry look-ups.
pub(super) struct Retries<'a> {
    /// A fresh copy of it for every set of look-ups retried.
    pub backoff: Backoff,
    pub max_attempts: u32,
    pub shutdown: &'a CancellationToken,
}

/// Runs a batch's look-ups; when they give up, runs each origin's alone.
/// Returns what was found and the changes whose look-ups gave up.
pub(super) async fn resolve_batch<E: LookupExecutor>(
    resolver: &Resolver<'_>,
    executor: &E,
    lookups: &[LookupRequest],
    origins: &[LookupOrigin],
    retries: &Retries<'_>,
) -> Result<(Resolution, Vec<DeadLetter>), RunError> {
    let error = match settle(resolver, executor, lookups, retries).await? {
        Settled::Found(found) => return Ok((found, Vec::new())),
        Settled::GaveUp { error, .. } => error,
    };
    if origins.is_empty() {
        // Nothing to narrow down to: never drop look-ups silently.
        return Err(RunError::LookupGaveUp(error));
    }
    tracing::warn!(
        error = %error,
        changes = origins.len(),
        "the batch's look-ups failed: running them change by change to set the failing ones aside"
    );
    let mut found = Resolution::default();
    let mut unresolved = Vec::new();
    for origin in origins {
        match settle(resolver, executor, &origin.requests, retries).await? {
            Settled::Found(part) => found.merge(part),
            Settled::GaveUp { reason, error, attempts } => {
                // The keys its look-ups would have found are unknown: the
                // caches they feed are invalidated whole.
                for request in &origin.requests {
                    found.merge(resolver.lookup_failed(request));
                }
                unresolved.push(DeadLetter {
                    change: origin.change.clone(),
                    reason,
                    error: error.to_string(),
                    attempts,
                });
            }
        }
    }
    Ok((found, unresolved))
}

/// Runs `requests` (and the look-ups their rows lead to) until they succeed
/// or give up; waits out connection failures. Shutdown abandons the batch.
async fn settle<E: LookupExecutor>(
    resolver: &Resolver<'_>,
    executor: &E,
    requests: &[LookupRequest],
    retries: &Retries<'_>,
) -> Result<Settled, RunError> {
    let mut counted = 0u32;
    let mut backoff = retries.backoff.fresh();
    loop {
        let mut request = Resolution::default();
        request.lookups = requests.to_vec();
        let error = match resolver.run_lookups(request, executor).await {
            Ok(found) => return Ok(Settled::Found(found)),
            Err(e) => e,
        };
        let failure = LookupFailure::of(&error);
        if failure != LookupFailure::Connection {
            counted += 1;
        }
        let verdict = policy::decide(Failure::Lookup { failure, counted, max_attempts: retries.max_attempts });
        match verdict.decision {
            Decision::Retry => {
                tracing::warn!(
                    error = %error,
                    kind = ?failure,
                    attempt = counted,
                    retry_in_ms = backoff.current().as_millis() as u64,
                    "look-up failed; retrying"
                );
                backoff.wait(retries.shutdown).await.map_err(|Stopped| RunError::Cancelled)?;
            }
            Decision::DeadLetter(reason) => {
                return Ok(Settled::GaveUp { reason, error, attempts: counted.max(1) });
            }
            Decision::Stop => {
                return Err(RunError::LookupBroken { error, hint: verdict.hint });
            }
        }
    }
}
