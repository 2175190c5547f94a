//! The subscriber's and local cache's counters and the commit → local drop
//! latency histogram: plain atomics, so the client needs no metrics crate;
//! an application exports a [`Snapshot`] to whatever it uses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds (the last bucket, above
/// 10 s, has none).
pub const LATENCY_BUCKETS_SECONDS: [f64; 13] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

/// Counters, shared by a [`LocalCache`](super::LocalCache) and its
/// [`Subscriber`](super::Subscriber).
#[derive(Debug, Default)]
pub struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    fills_rejected: AtomicU64,
    invalidations_applied: AtomicU64,
    replays: AtomicU64,
    gaps: AtomicU64,
    flushes: AtomicU64,
    reconnects: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len() + 1],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Reads served from the local cache.
    pub hits: u64,
    /// Reads that ran (or waited for) the loader.
    pub misses: u64,
    /// Loaded values not kept because an invalidation of their key, a tag
    /// or their cache arrived after the load started.
    pub fills_rejected: u64,
    /// Batch messages applied (their keys, tags and flushed caches dropped).
    pub invalidations_applied: u64,
    /// Stream entries read back after a (re)connection.
    pub replays: u64,
    /// Gaps found (a skipped `seq`), each repaired through `touched`.
    pub gaps: u64,
    /// Whole-cache flushes (a new epoch, an unknown format, Redis unreachable).
    pub flushes: u64,
    /// Connections re-established after a loss or a silence.
    pub reconnects: u64,
    /// Commit (or publication) → local drop latency: counts per bucket of
    /// [`LATENCY_BUCKETS_SECONDS`], not cumulative; the last is above 10 s.
    pub latency_buckets: Vec<u64>,
    pub latency_sum_seconds: f64,
    pub latency_count: u64,
}

impl Snapshot {
    /// The latency under which a fraction `q` (0..=1) of the drops fell, as
    /// the upper bound of its bucket (`None`: no drop measured, or above the
    /// last bound).
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let rank = (q * self.latency_count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return LATENCY_BUCKETS_SECONDS.get(i).copied();
            }
        }
        None
    }
}

impl Stats {
    pub(crate) fn hit(&self) {
        self.hits.fetch_add(1, Relaxed);
    }
    pub(crate) fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
    }
    pub(crate) fn fill_rejected(&self) {
        self.fills_rejected.fetch_add(1, Relaxed);
    }
    pub(crate) fn invalidation_applied(&self) {
        self.invalidations_applied.fetch_add(1, Relaxed);
    }
    pub(crate) fn replayed(&self, n: u64) {
        self.replays.fetch_add(n, Relaxed);
    }
    pub(crate) fn gap(&self) {
        self.gaps.fetch_add(1, Relaxed);
    }
    pub(crate) fn flush(&self) {
        self.flushes.fetch_add(1, Relaxed);
    }
    pub(crate) fn reconnect(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    /// One batch's drop latency.
    pub(crate) fn latency(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket =
            LATENCY_BUCKETS_SECONDS.iter().position(|&b| seconds <= b).unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        self.latency_buckets[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(latency.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
        self.latency_count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            fills_rejected: self.fills_rejected.load(Relaxed),
            invalidations_applied: self.invalidations_applied.load(Relaxed),
            replays: self.replays.load(Relaxed),
            gaps: self.gaps.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            latency_buckets: self.latency_buckets.iter().map(|b| b.load(Relaxed)).collect(),
            latency_sum_seconds: self.latency_sum_us.load(Relaxed) as f64 / 1e6,
            latency_count: self.latency_count.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_their_buckets_and_quantiles_read_them_back() {
        let stats = Stats::default();
        for ms in [0, 1, 3, 3, 40, 20_000] {
            stats.latency(Duration::from_millis(ms));
        }
        let s = stats.snapshot();
        assert_eq!(s.latency_count, 6);
        assert_eq!(s.latency_buckets[0], 2, "0 and 1 ms: ≤ 1 ms");
        assert_eq!(s.latency_buckets[2], 2, "3 ms: ≤ 5 ms");
        assert_eq!(s.latency_buckets[5], 1, "40 ms: ≤ 50 ms");
        assert_eq!(s.latency_buckets[13], 1, "20 s: above the last bound");
        assert_eq!(s.latency_quantile(0.5), Some(0.005));
        assert_eq!(s.latency_quantile(0.8), Some(0.05));
        assert_eq!(s.latency_quantile(1.0), None);
    }
}
