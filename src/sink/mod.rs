//! Sinks: where effects are applied (Redis standalone or Cluster, the
//! broadcast channel).
//!
//! [`Sink`] is the seam. Effects are idempotent by construction — `UNLINK`
//! rather than update, version bumps that always raise a version (to the
//! change's commit position, or past what is stored) — so a sink may apply
//! a batch more than once: a replayed bump costs one extra miss.

pub(crate) mod multi;
pub mod redis;

use std::future::Future;

use crate::change::Position;
use crate::graph::Graph;
use crate::resolve::Effect;

pub use multi::MultiSink;

/// One batch as a sink sees it.
#[derive(Debug, Clone, Copy)]
pub struct SinkBatch<'a> {
    pub id: u64,
    pub graph: &'a Graph,
    /// Distinct effects, each applied with its cache's action and options.
    pub effects: &'a [Effect],
    /// The version written by `bump` and namespace bumps: the batch's last
    /// commit position as a number (raised past what is stored when that is
    /// not lower, so versions never move back).
    pub version: u64,
    /// The batch's last source position (carried by the broadcast).
    pub position: Option<&'a Position>,
    /// The source's commit time of the batch's last transaction (µs since
    /// the epoch), when it gives one (carried by the broadcast).
    pub commit_time_micros: Option<i64>,
}

/// A sink's own reason for not confirming, kept typed as the error's
/// `#[source]` (for Redis, [`redis::RedisCause`]: the client's error,
/// a timeout, a script's refusal, ...). Its text is what the logs show.
pub(crate) type SinkCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a sink could not confirm a batch: the class decides what the run
/// loop does (see `crate::policy`), the cause says why.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The target is unreachable or overloaded: retry with backoff, stop
    /// reading the source meanwhile, never acknowledge.
    #[error("{target}: {cause}")]
    Transient {
        target: String,
        #[source]
        cause: SinkCause,
    },
    /// The target refused the batch for a reason retrying will not fix.
    #[error("{target}: {cause}")]
    Definite {
        target: String,
        #[source]
        cause: SinkCause,
    },
}

impl SinkError {
    pub(crate) fn transient(target: impl Into<String>, cause: impl Into<SinkCause>) -> SinkError {
        SinkError::Transient { target: target.into(), cause: cause.into() }
    }

    pub(crate) fn definite(target: impl Into<String>, cause: impl Into<SinkCause>) -> SinkError {
        SinkError::Definite { target: target.into(), cause: cause.into() }
    }

    /// Why, without the target's name.
    pub(crate) fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            SinkError::Transient { cause, .. } | SinkError::Definite { cause, .. } => cause.as_ref(),
        }
    }
}

/// Applies effects.
///
/// Contract: `apply` returns `Ok` only when every effect of the batch has
/// been applied and confirmed by the target (the reply was read, not just
/// the command sent). An error means nothing may be acknowledged for the
/// batch; the caller retries the whole batch, which is safe because every
/// effect is idempotent. A future dropped before it completes confirms
/// nothing.
pub trait Sink {
    fn name(&self) -> &str;
    fn apply(&self, batch: SinkBatch<'_>) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// The run loop acknowledged `position` to the source: every change up
    /// to it is confirmed by every sink (a batch's last position, or a
    /// keepalive's while nothing was in flight). The Redis sink publishes
    /// it as the applied position (`docs/broadcast.md`). Must not block.
    fn acknowledged(&self, _position: &Position) {}
}
