//! Sources: where committed changes come from, and where their positions
//! are acknowledged.
//!
//! [`Source`] is the seam every source plugs into (Postgres logical
//! replication, Kafka topics of Debezium events, a replayed file). The
//! Debezium envelope decoder ([`debezium`]) is shared by the Kafka source,
//! `evictd replay` and `evictd explain`.
//!
//! **Invariant:** sources decode and acknowledge, nothing more: a message
//! that cannot be decoded is yielded as [`SourceEvent::Undecodable`], and
//! the run loop alone applies the dead-letter-or-stop policy to it.

pub mod debezium;
pub mod kafka;
pub(crate) mod postgres;

use std::future::Future;

use crate::change::{Change, Position};
pub use crate::change::{RawMessage, Undecodable, UndecodableReason};

/// What a source yields next. Changes come between a `Begin` and its
/// `Commit`, one at a time, so a transaction of any size streams through in
/// bounded memory.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A transaction starts.
    Begin,
    /// One row change of the open transaction.
    Change(Change),
    /// The open transaction committed; `position` is what to acknowledge
    /// once every effect of it (and of everything before) is confirmed.
    Commit { position: Position, commit_time_micros: Option<i64> },
    /// Nothing to do up to `position` (a keepalive between transactions).
    /// The run loop may acknowledge it only while nothing is in flight.
    Idle { position: Position },
    /// A message that cannot be turned into changes, with its raw payload.
    /// It comes alone, never between a `Begin` and its `Commit`. The run
    /// loop decides what becomes of it (`dead_letter.on_error`): a dead
    /// letter, after which its position is acknowledged like a commit
    /// without effects, or the end of the daemon with it unacknowledged.
    Undecodable(Undecodable),
}

/// The underlying error of a [`SourceError`].
pub(crate) type SourceCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a source failed: retry or stop (`crate::policy` decides on the
/// class), what the source was doing, and the error underneath it, if any.
/// The text is `context` alone, or `context: cause`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Worth retrying with backoff (connection lost, server restarting).
    #[error("{}", render(context, cause.as_deref()))]
    Transient {
        context: String,
        #[source]
        cause: Option<SourceCause>,
    },
    /// Will not go away by retrying (bad configuration, missing privilege).
    #[error("{}", render(context, cause.as_deref()))]
    Definite {
        context: String,
        #[source]
        cause: Option<SourceCause>,
    },
}

fn render(context: &str, cause: Option<&(dyn std::error::Error + Send + Sync + 'static)>) -> String {
    match cause {
        Some(cause) => format!("{context}: {cause}"),
        None => context.to_owned(),
    }
}

impl SourceError {
    /// A transient failure that the context says all about.
    pub(crate) fn transient(context: impl Into<String>) -> SourceError {
        SourceError::Transient { context: context.into(), cause: None }
    }

    /// A transient failure caused by `cause`.
    pub(crate) fn transient_from(context: impl Into<String>, cause: impl Into<SourceCause>) -> SourceError {
        SourceError::Transient { context: context.into(), cause: Some(cause.into()) }
    }

    /// A definite failure that the context says all about.
    pub(crate) fn definite(context: impl Into<String>) -> SourceError {
        SourceError::Definite { context: context.into(), cause: None }
    }

    /// A definite failure caused by `cause`.
    pub(crate) fn definite_from(context: impl Into<String>, cause: impl Into<SourceCause>) -> SourceError {
        SourceError::Definite { context: context.into(), cause: Some(cause.into()) }
    }

    #[cfg(test)]
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient { .. })
    }
}

/// A stream of committed transactions with at-least-once delivery.
///
/// Contract:
/// - transactions arrive in commit order, each whole (`Begin`, its changes,
///   `Commit`), never interleaved;
/// - `acknowledge(p)` tells the source that every effect of every
///   transaction up to and including `p` is applied and confirmed by every
///   sink; the run loop calls it with non-decreasing positions only, and
///   only with the contiguous watermark (see [`crate::checkpoint`]);
/// - after a crash or reconnect, delivery resumes after the last
///   acknowledged position: anything later may be delivered again, nothing
///   is skipped;
/// - **`next()` is cancel-safe.** The run loop's `select!` drops the
///   `next()` future whenever another branch is ready first, at any of its
///   awaits. Dropping it must lose nothing and emit nothing: an event
///   becomes visible only once every await its message needed (a read, a
///   catalogue look-up) has completed, and the events of one message
///   become visible together. A `next()` called after a dropped one
///   resumes the same work (or starts it again) and yields exactly the
///   sequence an undisturbed source would have yielded. In practice: do
///   the awaits first, or keep their futures in the source itself, and
///   queue a message's events only afterwards, without an await between;
/// - **a source only decodes and acknowledges.** A message it cannot
///   decode becomes [`SourceEvent::Undecodable`] with its raw payload;
///   what becomes of it (a dead letter, or the daemon stops) is the run
///   loop's decision, the same for every source. A source never writes
///   dead letters and never fails for one bad message.
pub trait Source {
    fn next(&mut self) -> impl Future<Output = Result<SourceEvent, SourceError>> + Send;
    fn acknowledge(&mut self, position: &Position) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// The server's own latest position, when the source knows it (the
    /// Postgres WAL end), for the position ladder and lag.
    fn server_position(&self) -> Option<Position> {
        None
    }
}
