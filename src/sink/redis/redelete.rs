//! The delayed second delete (`redelete_after_ms`, action `delete`): a
//! reader that read the database just before a commit can refill a key just
//! after evictd deleted it; deleting it once more later removes that copy.
//!
//! **Invariants:** scheduled only after the batch was confirmed; never part
//! of the acknowledgement (a crash loses pending second deletes, which is
//! acceptable: they narrow a race, they do not carry an invalidation);
//! failures are logged and counted, never retried.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::Instrument;

use super::conn::Runner;
use super::plan::unlink_groups;
use super::{Bump, Inner, run_groups};

/// Deletes `keys` once more, `after_ms` from now, on a task of the sink's
/// tracker.
pub(super) fn schedule(inner: &Arc<Inner>, batch_id: u64, after_ms: u64, keys: Vec<Vec<u8>>) {
    let span = tracing::info_span!("redelete", batch_id, target = %inner.name, after_ms, keys = keys.len());
    let inner = Arc::clone(inner);
    let tracker = inner.redeletes.clone();
    tracker.spawn(
        async move {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            let groups = unlink_groups(keys, inner.conn.topology());
            // Not part of any acknowledgement: nothing to wait for.
            let runner = Runner { wait: None, ..inner.runner() };
            match run_groups(&runner, &groups, Bump::NONE, inner.options.max_in_flight, None).await {
                Ok(()) => tracing::debug!("second delete done"),
                Err(e) => {
                    inner.redelete_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "second delete failed (best-effort, not retried)");
                }
            }
        }
        .instrument(span),
    );
}
