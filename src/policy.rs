//! The run loop's one error policy: every failure it meets — from the
//! source, a sink, the look-ups or the dead-letter store — is classified
//! here, in one `match`, into retry, dead-letter or stop, with a hint for
//! the operator.
//!
//! **Invariants:** [`decide`] is pure (no I/O, no clock): the same failure
//! always gets the same decision. Only a change's look-ups and a message
//! a source cannot decode can be dead-lettered (the latter as
//! `dead_letter.on_error` says); a failure of the machinery itself (source,
//! sink, dead-letter store) is retried while it may pass and stops the
//! daemon, with nothing unconfirmed acknowledged, when it cannot.
//!
//! How long a retry waits is [`crate::retry::Backoff`]'s part.

use crate::dead_letter::{DeadLetterError, DeadLetterReason, OnError};
use crate::lookup::LookupError;
use crate::sink::SinkError;
use crate::source::{SourceError, UndecodableReason};

/// What kind of failure a look-up error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LookupFailure {
    /// The database cannot be reached: waited out, never counted.
    Connection,
    /// A statement timeout or another error a retry may fix: counted.
    Retryable,
    /// The query fails for these values (division by zero, a bad cast).
    Definite,
    /// The query cannot run for any value (syntax, unknown column,
    /// privilege): a broken graph or schema, not a bad change.
    BrokenQuery,
}

impl LookupFailure {
    pub(crate) fn of(error: &LookupError) -> LookupFailure {
        if error.is_connection() {
            LookupFailure::Connection
        } else if error.is_query_fault() {
            LookupFailure::BrokenQuery
        } else if error.is_transient() {
            LookupFailure::Retryable
        } else {
            LookupFailure::Definite
        }
    }
}

/// A failure the run loop met.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failure<'a> {
    /// `next()` failed.
    Source(&'a SourceError),
    /// A sink did not confirm a batch.
    Sink(&'a SinkError),
    /// A set of look-ups failed; `counted` failures so far (this one
    /// included; connection failures are never counted).
    Lookup { failure: LookupFailure, counted: u32, max_attempts: u32 },
    /// A dead letter could not be written.
    DeadLetterStore(&'a DeadLetterError),
    /// A source could not decode a message (`dead_letter.on_error` says
    /// what becomes of it).
    Undecodable { reason: UndecodableReason, on_error: OnError },
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Wait (backoff) and try again; for the source, end the session so
    /// that the supervisor starts another.
    Retry,
    /// Give the change up as a dead letter (as `on_error` says).
    DeadLetter(DeadLetterReason),
    /// Stop the daemon without acknowledging what is unconfirmed.
    Stop,
}

/// A decision and what the operator can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) decision: Decision,
    pub(crate) hint: &'static str,
}

/// Why a look-up that cannot run for any change stops the daemon.
pub(crate) const BROKEN_QUERY_HINT: &str =
    "the query cannot run for any change; fix the graph's look-up or the database schema";

/// The one classification of the run loop's failures.
pub(crate) fn decide(failure: Failure<'_>) -> Verdict {
    use Decision::{DeadLetter, Retry, Stop};
    let (decision, hint) = match failure {
        Failure::Source(SourceError::Transient { .. }) => {
            (Retry, "the source connection was lost; the supervisor reconnects with backoff")
        }
        Failure::Source(SourceError::Definite { .. }) => {
            (Stop, "the source refused for good; check its configuration and privileges, then restart")
        }
        Failure::Sink(SinkError::Transient { .. }) => {
            (Retry, "a Redis target is unreachable or did not confirm; reading is paused until it does")
        }
        Failure::Sink(SinkError::Definite { .. }) => {
            (Stop, "a Redis target refused the batch; fix the target, then restart: the batch is replayed")
        }
        Failure::Lookup { failure: LookupFailure::Connection, .. } => {
            (Retry, "the look-up database is unreachable; waited for as long as it lasts")
        }
        Failure::Lookup { failure: LookupFailure::BrokenQuery, .. } => (Stop, BROKEN_QUERY_HINT),
        Failure::Lookup { failure: LookupFailure::Definite, .. } => (
            DeadLetter(DeadLetterReason::LookupFailed),
            "the look-up fails for this change's values; inspect and replay it from the dead letters",
        ),
        Failure::Lookup { failure: LookupFailure::Retryable, counted, max_attempts } if counted >= max_attempts => (
            DeadLetter(DeadLetterReason::LookupAttemptsExhausted),
            "the look-up kept failing (dead_letter.lookup_attempts); inspect and replay it from the dead letters",
        ),
        Failure::Lookup { failure: LookupFailure::Retryable, .. } => {
            (Retry, "the look-up failed in a way a retry may fix (a timeout); retrying")
        }
        Failure::DeadLetterStore(e) if e.is_transient() => {
            (Retry, "the dead-letter database is unreachable; reading is paused until the row is committed")
        }
        Failure::DeadLetterStore(_) => {
            (Stop, "the dead-letter database refused the row; check its schema and privileges (evictd migrate)")
        }
        Failure::Undecodable { reason, on_error: OnError::DeadLetter } => (
            DeadLetter(DeadLetterReason::Undecodable(reason)),
            "the message cannot be decoded; it is kept with its raw payload in the dead letters",
        ),
        Failure::Undecodable { on_error: OnError::Stop, .. } => (
            Stop,
            "the message cannot be decoded and dead_letter.on_error = \"stop\"; fix or remove it at the source, then restart",
        ),
    };
    Verdict { decision, hint }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(failure: LookupFailure, counted: u32, max_attempts: u32) -> Decision {
        decide(Failure::Lookup { failure, counted, max_attempts }).decision
    }

    #[test]
    fn a_definite_lookup_failure_is_dead_lettered_at_once() {
        assert_eq!(lookup(LookupFailure::Definite, 1, 5), Decision::DeadLetter(DeadLetterReason::LookupFailed));
    }

    #[test]
    fn a_retryable_lookup_failure_is_dead_lettered_after_the_configured_attempts() {
        assert_eq!(lookup(LookupFailure::Retryable, 4, 5), Decision::Retry);
        assert_eq!(
            lookup(LookupFailure::Retryable, 5, 5),
            Decision::DeadLetter(DeadLetterReason::LookupAttemptsExhausted)
        );
    }

    #[test]
    fn a_query_that_cannot_run_stops_instead_of_dead_lettering_everything() {
        assert_eq!(lookup(LookupFailure::BrokenQuery, 1, 5), Decision::Stop);
        let unknown_column = LookupError::Query {
            field: "caches.x.depends[0].lookup".into(),
            source: sqlx::Error::ColumnNotFound("owner".into()),
        };
        assert_eq!(LookupFailure::of(&unknown_column), LookupFailure::BrokenQuery);
    }

    #[test]
    fn an_unreachable_lookup_database_is_waited_for_however_long() {
        assert_eq!(lookup(LookupFailure::Connection, u32::MAX, 1), Decision::Retry);
    }

    #[test]
    fn a_lost_source_is_retried_and_a_refusing_one_stops() {
        assert_eq!(decide(Failure::Source(&SourceError::transient("reset"))).decision, Decision::Retry);
        assert_eq!(decide(Failure::Source(&SourceError::definite("denied"))).decision, Decision::Stop);
    }

    #[test]
    fn a_transient_sink_error_is_retried_and_a_definite_one_stops() {
        let transient = SinkError::Transient { target: "a".into(), message: "down".into() };
        let definite = SinkError::Definite { target: "a".into(), message: "WRONGTYPE".into() };
        assert_eq!(decide(Failure::Sink(&transient)).decision, Decision::Retry);
        assert_eq!(decide(Failure::Sink(&definite)).decision, Decision::Stop);
    }

    #[test]
    fn an_unreachable_dead_letter_store_is_retried_and_a_refusing_one_stops() {
        let down = DeadLetterError::Unreachable("connection refused".into());
        assert_eq!(decide(Failure::DeadLetterStore(&down)).decision, Decision::Retry);
        let refused = DeadLetterError::Write { message: "permission denied".into(), transient: false };
        assert_eq!(decide(Failure::DeadLetterStore(&refused)).decision, Decision::Stop);
    }

    #[test]
    fn an_undecodable_message_is_dead_lettered_or_stops_as_on_error_says() {
        let undecodable = |on_error| decide(Failure::Undecodable { reason: UndecodableReason::TooLarge, on_error });
        assert_eq!(
            undecodable(OnError::DeadLetter).decision,
            Decision::DeadLetter(DeadLetterReason::Undecodable(UndecodableReason::TooLarge))
        );
        assert_eq!(undecodable(OnError::Stop).decision, Decision::Stop);
    }

    #[test]
    fn nothing_but_a_changes_lookups_or_an_undecodable_message_is_ever_dead_lettered() {
        let machinery = [
            decide(Failure::Source(&SourceError::definite("x"))),
            decide(Failure::Sink(&SinkError::Definite { target: "a".into(), message: "x".into() })),
            decide(Failure::DeadLetterStore(&DeadLetterError::Unreachable("x".into()))),
        ];
        for verdict in machinery {
            assert!(!matches!(verdict.decision, Decision::DeadLetter(_)), "{verdict:?}");
            assert!(!verdict.hint.is_empty());
        }
    }
}
