//! The delayed second delete (`redelete_after_ms`, action `delete`): a
//! reader that read the database just before a commit can refill a key just
//! after evictd deleted it; deleting it once more later removes that copy.
//!
//! **Invariants:** scheduled only after the batch was confirmed; never part
//! of the acknowledgement (a crash loses pending second deletes, which is
//! acceptable: they narrow a race, they do not carry an invalidation);
//! failures are logged and counted (`evictd_sink_second_delete_failures_total`),
//! never retried. At most
//! [`MAX_PENDING_KEYS`] keys wait at once per target: past that, further
//! second deletes are skipped, counted and logged rather than held without
//! bound (the first delete already happened; holding the stream back for a
//! best-effort narrowing of a race would delay every invalidation behind it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::Instrument;

use super::conn::Runner;
use super::plan::unlink_groups;
use super::{Bump, Inner, run_groups};

/// Keys of second deletes that may wait at once, per target.
pub const MAX_PENDING_KEYS: usize = 100_000;

/// How many more keys may be scheduled now.
pub(super) fn room(inner: &Inner) -> usize {
    MAX_PENDING_KEYS.saturating_sub(inner.redelete_pending.load(Ordering::Relaxed))
}

/// Deletes `keys` once more, `after_ms` from now, on a task of the sink's
/// tracker; keys past [`MAX_PENDING_KEYS`] waiting are skipped and counted.
pub(super) fn schedule(inner: &Arc<Inner>, batch_id: u64, after_ms: u64, mut keys: Vec<Vec<u8>>) {
    let room = room(inner);
    if keys.len() > room {
        let skipped = keys.len() - room;
        keys.truncate(room);
        inner.redeletes_skipped.fetch_add(skipped as u64, Ordering::Relaxed);
        if let Some(metrics) = inner.metrics.get() {
            metrics.redeletes_skipped(&inner.name, skipped as u64);
        }
        tracing::warn!(
            target = %inner.name,
            batch_id,
            skipped,
            pending = MAX_PENDING_KEYS,
            "too many second deletes waiting: skipping these (their first delete was applied)"
        );
    }
    if keys.is_empty() {
        return;
    }
    inner.redelete_pending.fetch_add(keys.len(), Ordering::Relaxed);
    let span = tracing::info_span!("redelete", batch_id, target = %inner.name, after_ms, keys = keys.len());
    let inner = Arc::clone(inner);
    let tracker = inner.redeletes.clone();
    tracker.spawn(
        async move {
            // Released however the task ends (done, failed, or dropped).
            let count = keys.len();
            let _release = Release(&inner.redelete_pending, count);
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            let groups = unlink_groups(keys, inner.conn.topology());
            // Not part of any acknowledgement: nothing to wait for.
            let runner = Runner { wait: None, ..inner.runner() };
            match run_groups(&runner, &groups, Bump::NONE, inner.options.max_in_flight, None).await {
                Ok(()) => tracing::debug!("second delete done"),
                Err(e) => {
                    inner.redelete_failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(metrics) = inner.metrics.get() {
                        metrics.second_delete_failed(&inner.name);
                    }
                    tracing::warn!(error = %e, "second delete failed (best-effort, not retried)");
                }
            }
        }
        .instrument(span),
    );
}

/// Gives back `count` pending keys when dropped.
struct Release<'a>(&'a std::sync::atomic::AtomicUsize, usize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}
