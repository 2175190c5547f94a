//! Sources: where committed changes come from, and where their positions
//! are acknowledged.
//!
//! [`Source`] is the seam every source plugs into (Postgres logical
//! replication, Kafka topics of Debezium events, a replayed file). The
//! Debezium envelope decoder ([`debezium`]) is shared by the Kafka source,
//! `evictd replay` and `evictd explain`.

pub mod debezium;
pub mod kafka;
pub mod postgres;

use std::future::Future;

use crate::change::{Change, Position};

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
}

/// Why a source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Worth retrying with backoff (connection lost, server restarting).
    #[error("{0}")]
    Transient(String),
    /// Will not go away by retrying (bad configuration, missing privilege).
    #[error("{0}")]
    Definite(String),
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
///   becomes visible only once every await its message needed (a
///   dead-letter send, a read) has completed, and the events of one
///   message become visible together. A `next()` called after a dropped
///   one resumes the same work (or starts it again) and yields exactly the
///   sequence an undisturbed source would have yielded. In practice: do
///   the awaits first, or keep their futures in the source itself, and
///   queue a message's events only afterwards, without an await between.
pub trait Source {
    fn next(&mut self) -> impl Future<Output = Result<SourceEvent, SourceError>> + Send;
    fn acknowledge(&mut self, position: &Position) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// The server's own latest position, when the source knows it (the
    /// Postgres WAL end), for the position ladder and lag.
    fn server_position(&self) -> Option<Position> {
        None
    }
}
