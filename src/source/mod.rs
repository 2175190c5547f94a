//! Sources: where committed changes come from, and where their positions
//! are acknowledged.
//!
//! [`Source`] is the seam every source plugs into (Postgres logical
//! replication, Kafka topics of Debezium events, a replayed file). The
//! Debezium envelope decoder ([`debezium`]) is shared by the Kafka source,
//! `evictd replay` and `evictd explain`.

pub mod debezium;

use std::future::Future;

use crate::change::{Change, Position};

/// What a source yields next.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// One whole committed transaction, in commit order.
    Transaction(Transaction),
    /// Nothing to do up to `position` (a keepalive). The run loop may
    /// acknowledge it only while no batch is in flight.
    Idle { position: Position },
}

/// The changes of one source transaction, applied together.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    /// The position to acknowledge once every effect of the transaction is
    /// confirmed (Postgres: the commit's end LSN).
    pub position: Position,
    pub changes: Vec<Change>,
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
/// - transactions arrive in commit order, each whole;
/// - `acknowledge(p)` tells the source that every effect of every
///   transaction up to and including `p` is applied and confirmed by every
///   sink; the run loop calls it with non-decreasing positions only, and
///   only with the contiguous watermark (see [`crate::checkpoint`]);
/// - after a crash or reconnect, delivery resumes after the last
///   acknowledged position: anything later may be delivered again, nothing
///   is skipped.
pub trait Source {
    fn next(&mut self) -> impl Future<Output = Result<SourceEvent, SourceError>> + Send;
    fn acknowledge(&mut self, position: &Position) -> impl Future<Output = Result<(), SourceError>> + Send;
}
