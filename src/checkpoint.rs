//! Checkpointing: which source position may be acknowledged.
//!
//! Batches are applied concurrently and may be confirmed out of order; the
//! source may only hear of the **contiguous watermark**: the last position
//! of the longest prefix of batches that every sink has confirmed. A batch
//! confirmed before an earlier one moves nothing (vector lost data by
//! acknowledging any delivered offset). A batch that failed is never
//! confirmed, so the watermark stops below it until it is retried.

use std::collections::VecDeque;

/// Tracks in-flight batches in source order.
#[derive(Debug, Clone)]
pub(crate) struct Watermark<P> {
    in_flight: VecDeque<InFlight<P>>,
    acknowledged: Option<P>,
}

#[derive(Debug, Clone)]
struct InFlight<P> {
    batch: u64,
    position: P,
    confirmed: bool,
}

/// A confirmation for a batch that is not in flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch {0} is not in flight")]
pub(crate) struct NotInFlight(pub u64);

impl<P: Clone> Default for Watermark<P> {
    fn default() -> Self {
        Watermark { in_flight: VecDeque::new(), acknowledged: None }
    }
}

impl<P: Clone> Watermark<P> {
    pub(crate) fn new() -> Watermark<P> {
        Watermark::default()
    }

    /// Registers a batch, in source order, with its last position.
    pub(crate) fn begin(&mut self, batch: u64, position: P) {
        self.in_flight.push_back(InFlight { batch, position, confirmed: false });
    }

    /// Records that every sink confirmed `batch`; returns the new watermark
    /// when it moved.
    pub(crate) fn confirm(&mut self, batch: u64) -> Result<Option<P>, NotInFlight> {
        let entry = self.in_flight.iter_mut().find(|f| f.batch == batch).ok_or(NotInFlight(batch))?;
        entry.confirmed = true;
        let mut moved = None;
        while self.in_flight.front().is_some_and(|f| f.confirmed) {
            if let Some(done) = self.in_flight.pop_front() {
                moved = Some(done.position);
            }
        }
        if let Some(p) = &moved {
            self.acknowledged = Some(p.clone());
        }
        Ok(moved)
    }

    /// The highest position that may be acknowledged.
    #[cfg(test)]
    pub(crate) fn acknowledged(&self) -> Option<&P> {
        self.acknowledged.as_ref()
    }

    /// Whether nothing is in flight (an idle source may then acknowledge its
    /// keepalive position).
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_later_confirmation_moves_nothing_until_the_earlier_one_lands() {
        let mut w = Watermark::new();
        w.begin(1, 100);
        w.begin(2, 200);
        w.begin(3, 300);
        assert_eq!(w.confirm(2), Ok(None));
        assert_eq!(w.acknowledged(), None);
        assert_eq!(w.confirm(1), Ok(Some(200)));
        assert_eq!(w.confirm(3), Ok(Some(300)));
        assert!(w.is_idle());
    }

    #[test]
    fn confirming_an_unknown_batch_is_an_error() {
        let mut w: Watermark<u64> = Watermark::new();
        assert_eq!(w.confirm(9), Err(NotInFlight(9)));
    }

    proptest! {
        /// Whatever order confirmations arrive in, the watermark never passes
        /// a batch that is not confirmed, and ends at the last position.
        #[test]
        fn watermark_never_passes_an_unconfirmed_batch(order in Just((0u64..12).collect::<Vec<_>>()).prop_shuffle()) {
            let mut w = Watermark::new();
            for b in 0..12u64 {
                w.begin(b, b * 10);
            }
            let mut confirmed = std::collections::HashSet::new();
            for b in order {
                confirmed.insert(b);
                w.confirm(b).unwrap();
                if let Some(&acked) = w.acknowledged() {
                    for earlier in 0..=acked / 10 {
                        prop_assert!(confirmed.contains(&earlier));
                    }
                }
            }
            prop_assert_eq!(w.acknowledged(), Some(&110));
        }
    }
}
