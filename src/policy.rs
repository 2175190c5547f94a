//! The daemon's one error policy: every failure it meets — from the
//! source, a sink, the look-ups or the dead-letter store, in the run loop,
//! at a session's start or while the daemon starts — is classified here,
//! in one `match`, into retry, dead-letter or stop, with a hint for the
//! operator.
//!
//! **Invariants:** [`decide`] is pure (no I/O, no clock): the same failure
//! always gets the same decision. Only a change's look-ups and a message
//! a source cannot decode can be dead-lettered (the latter as
//! `dead_letter.on_error` says); a failure of the machinery itself (source,
//! sink, dead-letter store) is retried while it may pass and stops the
//! daemon, with nothing unconfirmed acknowledged, when it cannot. Every
//! stop has a hint that says what to check; a stop that is `refused` is a
//! setup that contradicts the config or the graph, which exits 2 like bad
//! input.
//!
//! How long a retry waits is [`crate::retry::Backoff`]'s part.

use std::error::Error;

use crate::change::UndecodableReason;
use crate::dead_letter::{DeadLetterError, DeadLetterReason, OnError};
use crate::sink::SinkError;
use crate::source::SourceError;
use crate::source::postgres::SourceSetupError;

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
    /// A dead letter could not be written, or (at start-up) evictd's
    /// migrations could not be applied or verified.
    DeadLetterStore(&'a DeadLetterError),
    /// A source could not decode a message (`dead_letter.on_error` says
    /// what becomes of it).
    Undecodable { reason: UndecodableReason, on_error: OnError },
    /// A Postgres session could not start: the server, the slot, the
    /// publication, the replication connection.
    SourceSetup(&'a SourceSetupError),
}

impl<'a> Failure<'a> {
    /// The first failure this policy classifies in `error`'s `#[source]`
    /// chain (`error` included): how a caller that only holds a wrapping
    /// error (the daemon's, the run loop's) finds the verdict on its cause.
    pub(crate) fn in_chain(error: &'a (dyn Error + 'static)) -> Option<Failure<'a>> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(e) = e.downcast_ref::<SourceError>() {
                return Some(Failure::Source(e));
            }
            if let Some(e) = e.downcast_ref::<SinkError>() {
                return Some(Failure::Sink(e));
            }
            if let Some(e) = e.downcast_ref::<DeadLetterError>() {
                return Some(Failure::DeadLetterStore(e));
            }
            if let Some(e) = e.downcast_ref::<SourceSetupError>() {
                return Some(Failure::SourceSetup(e));
            }
            next = e.source();
        }
        None
    }
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
    /// A stop because the setup contradicts the config or the graph (a
    /// publication that hides changes, missing migrations): like bad
    /// input, exit 2. Any other stop exits 1.
    pub(crate) refused: bool,
}

const fn retry(hint: &'static str) -> Verdict {
    Verdict { decision: Decision::Retry, hint, refused: false }
}

const fn stop(hint: &'static str) -> Verdict {
    Verdict { decision: Decision::Stop, hint, refused: false }
}

const fn refuse(hint: &'static str) -> Verdict {
    Verdict { decision: Decision::Stop, hint, refused: true }
}

const fn dead_letter(reason: DeadLetterReason, hint: &'static str) -> Verdict {
    Verdict { decision: Decision::DeadLetter(reason), hint, refused: false }
}

/// Why a look-up that cannot run for any change stops the daemon.
pub(crate) const BROKEN_QUERY_HINT: &str =
    "the query cannot run for any change; fix the graph's look-up or the database schema";

/// The one classification of the daemon's failures.
pub(crate) fn decide(failure: Failure<'_>) -> Verdict {
    match failure {
        Failure::Source(SourceError::Transient { .. }) => {
            retry("the source connection was lost; the supervisor reconnects with backoff")
        }
        Failure::Source(SourceError::Definite { .. }) => {
            stop("the source refused for good; check its configuration and privileges, then restart")
        }
        Failure::Sink(SinkError::Transient { .. }) => {
            retry("a Redis target is unreachable or did not confirm; reading is paused until it does")
        }
        Failure::Sink(SinkError::Definite { .. }) => stop(
            "a Redis target refused evictd's commands (permissions, a key of the wrong type, a command it lacks); \
             fix the target as the error says, then restart: nothing unconfirmed was acknowledged",
        ),
        Failure::Lookup { failure: LookupFailure::Connection, .. } => {
            retry("the look-up database is unreachable; waited for as long as it lasts")
        }
        Failure::Lookup { failure: LookupFailure::BrokenQuery, .. } => stop(BROKEN_QUERY_HINT),
        Failure::Lookup { failure: LookupFailure::Definite, .. } => dead_letter(
            DeadLetterReason::LookupFailed,
            "the look-up fails for this change's values; inspect and replay it from the dead letters",
        ),
        Failure::Lookup { failure: LookupFailure::Retryable, counted, max_attempts } if counted >= max_attempts => {
            dead_letter(
                DeadLetterReason::LookupAttemptsExhausted,
                "the look-up kept failing (dead_letter.lookup_attempts); inspect and replay it from the dead letters",
            )
        }
        Failure::Lookup { failure: LookupFailure::Retryable, .. } => {
            retry("the look-up failed in a way a retry may fix (a timeout); retrying")
        }
        Failure::DeadLetterStore(e) if e.is_transient() => {
            retry("the dead-letter database is unreachable; reading is paused until the row is committed")
        }
        Failure::DeadLetterStore(DeadLetterError::Pending { .. }) => refuse(
            "the dead-letter schema lacks evictd's migrations: apply them with `evictd migrate` \
             (or set dead_letter.migrations = \"apply\"), then restart",
        ),
        Failure::DeadLetterStore(_) => stop(
            "the dead-letter database refused evictd's statements; check the schema's privileges \
             and migrations (evictd migrate), then restart",
        ),
        Failure::SourceSetup(SourceSetupError::Transient(_)) => {
            retry("the source database is unreachable or restarting; the session is started again with backoff")
        }
        Failure::Undecodable { reason, on_error: OnError::DeadLetter } => dead_letter(
            DeadLetterReason::Undecodable(reason),
            "the message cannot be decoded; it is kept with its raw payload in the dead letters",
        ),
        Failure::Undecodable { on_error: OnError::Stop, .. } => stop(
            "the message cannot be decoded and dead_letter.on_error = \"stop\"; fix or remove it at the source, then restart",
        ),
        Failure::SourceSetup(SourceSetupError::Definite(_)) => stop(
            "the source database refused the session (privileges, wal_level, the slot, a lost slot); \
             do what the error says, then restart",
        ),
        Failure::SourceSetup(SourceSetupError::Publication(_)) => refuse(
            "the publication hides changes the graph needs; run the SQL the error gives (or change the graph), \
             then restart",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::LookupError;

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
        assert_eq!(unknown_column.failure(), LookupFailure::BrokenQuery);
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
        let transient = SinkError::transient("a", "down");
        let definite = SinkError::definite("a", "WRONGTYPE");
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
            decide(Failure::Sink(&SinkError::definite("a", "x"))),
            decide(Failure::DeadLetterStore(&DeadLetterError::Unreachable("x".into()))),
        ];
        for verdict in machinery {
            assert!(!matches!(verdict.decision, Decision::DeadLetter(_)), "{verdict:?}");
            assert!(!verdict.hint.is_empty());
        }
    }

    /// One failure of every kind `decide` tells apart (one per arm).
    fn every_kind_of_failure(f: impl Fn(Failure<'_>)) {
        let source = [SourceError::transient("reset"), SourceError::definite("denied")];
        let sink = [SinkError::transient("a", "down"), SinkError::definite("a", "WRONGTYPE")];
        let store = [
            DeadLetterError::Unreachable("refused".into()),
            DeadLetterError::Write { message: "permission denied".into(), transient: false },
            DeadLetterError::Pending { schema: "evictd".into(), pending: vec!["0001".into()] },
            DeadLetterError::Migrate { schema: "evictd".into(), message: "denied".into(), transient: false },
        ];
        let setup = [
            SourceSetupError::Transient("connection refused".into()),
            SourceSetupError::Definite("wal_level is replica".into()),
            SourceSetupError::Publication("publication `p` lacks app.items".into()),
        ];
        source.iter().for_each(|e| f(Failure::Source(e)));
        sink.iter().for_each(|e| f(Failure::Sink(e)));
        store.iter().for_each(|e| f(Failure::DeadLetterStore(e)));
        setup.iter().for_each(|e| f(Failure::SourceSetup(e)));
        for failure in
            [LookupFailure::Connection, LookupFailure::Retryable, LookupFailure::Definite, LookupFailure::BrokenQuery]
        {
            for counted in [1, 5] {
                f(Failure::Lookup { failure, counted, max_attempts: 5 });
            }
        }
    }

    #[test]
    fn every_stop_tells_the_operator_what_to_check() {
        let stops = std::cell::Cell::new(0);
        every_kind_of_failure(|failure| {
            let verdict = decide(failure);
            if verdict.decision == Decision::Stop {
                stops.set(stops.get() + 1);
                assert!(verdict.hint.split_whitespace().count() >= 5, "{failure:?}: {verdict:?}");
                assert!(!verdict.hint.ends_with("retrying"), "{failure:?}: {verdict:?}");
            } else {
                assert!(!verdict.refused, "only a stop is refused: {failure:?}: {verdict:?}");
                assert!(!verdict.hint.is_empty(), "{failure:?}");
            }
        });
        assert!(stops.get() >= 7, "every stopping arm was exercised: {}", stops.get());
    }

    #[test]
    fn a_session_start_is_retried_stopped_or_refused_by_its_setup_error() {
        let verdict = |e: SourceSetupError| decide(Failure::SourceSetup(&e));
        assert_eq!(verdict(SourceSetupError::Transient("down".into())).decision, Decision::Retry);
        let definite = verdict(SourceSetupError::Definite("denied".into()));
        assert_eq!((definite.decision, definite.refused), (Decision::Stop, false));
        let publication = verdict(SourceSetupError::Publication("hides deletes".into()));
        assert_eq!((publication.decision, publication.refused), (Decision::Stop, true));
    }

    #[test]
    fn missing_migrations_refuse_and_a_refusing_dead_letter_database_fails() {
        let pending = DeadLetterError::Pending { schema: "evictd".into(), pending: vec!["0001".into()] };
        assert!(decide(Failure::DeadLetterStore(&pending)).refused);
        let denied = DeadLetterError::Migrate { schema: "evictd".into(), message: "denied".into(), transient: false };
        let verdict = decide(Failure::DeadLetterStore(&denied));
        assert_eq!((verdict.decision, verdict.refused), (Decision::Stop, false));
    }

    #[test]
    fn the_verdict_on_a_wrapped_error_is_found_through_its_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("source record: {0}")]
        struct Wrapper(#[source] SinkError);
        let wrapped = Wrapper(SinkError::definite("eu", "NOPERM"));
        let failure = Failure::in_chain(&wrapped);
        assert!(matches!(failure, Some(Failure::Sink(SinkError::Definite { .. }))), "{failure:?}");
        assert!(Failure::in_chain(&std::io::Error::other("nothing known")).is_none());
    }
}
