//! The subscriber's decision for each message: the `(epoch, seq)` state
//! machine of `docs/broadcast.md` ("What a subscriber does"). Pure: the
//! caller carries the decision out.
//!
//! **Invariant:** the tracked `(epoch, seq)` is the last message (batch,
//! heartbeat or a read of the channel's keys) every predecessor of which was
//! applied, or covered by a gap repair or a flush the caller was told to
//! do. A batch is applied at most once per sequence number, a skipped number
//! is never passed over silently (it is a [`Decision::Gap`]), and a new
//! epoch always flushes. The state moves as soon as a decision is returned:
//! a caller that cannot carry a repair out flushes everything instead.

/// What a gap after `last` costs: the caches the channel's `touched` hash
/// puts above `last` (sorted), and whether every tagged entry goes (its
/// `*tags` field above `last`). Every other cache was untouched since.
pub fn repair_plan(touched: &std::collections::HashMap<String, u64>, last: u64) -> (Vec<String>, bool) {
    let mut caches: Vec<String> = touched
        .iter()
        .filter(|(name, seq)| **seq > last && name.as_str() != crate::layout::TOUCHED_TAGS)
        .map(|(name, _)| name.clone())
        .collect();
    caches.sort();
    let all_tags = touched.get(crate::layout::TOUCHED_TAGS).is_some_and(|seq| *seq > last);
    (caches, all_tags)
}

/// What the caller must do for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Apply the batch: drop its keys, its tags' entries, its flushed caches.
    Apply,
    /// Nothing: a repeat, a heartbeat in step, or the first sight of the
    /// channel (nothing local can predate it).
    Ignore,
    /// Messages after `last` were missed: drop what the `touched` hash puts
    /// above `last`, then apply the message if `apply` (a batch).
    Gap { last: u64, apply: bool },
    /// Flush the whole local cache (a new epoch, or the channel's keys lost).
    Flush,
}

/// `(epoch, seq)` of the last message handled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    state: Option<(String, u64)>,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// The tracked `(epoch, seq)`, if any message or key read was seen.
    pub fn position(&self) -> Option<(&str, u64)> {
        self.state.as_ref().map(|(e, s)| (e.as_str(), *s))
    }

    /// A batch message.
    pub fn batch(&mut self, epoch: &str, seq: u64) -> Decision {
        self.observe(epoch, seq, true)
    }

    /// A heartbeat, or `:epoch` and `:seq` read after a (re)connection or
    /// an empty stream read: the last number given out.
    pub fn heartbeat(&mut self, epoch: &str, seq: u64) -> Decision {
        self.observe(epoch, seq, false)
    }

    /// `:epoch` or `:seq` missing from Redis: the sequence was lost (a
    /// restart without persistence). A tracked position means something
    /// may have been missed: flush, and take the next message as the start.
    pub fn keys_lost(&mut self) -> Decision {
        match self.state.take() {
            Some(_) => Decision::Flush,
            None => Decision::Ignore,
        }
    }

    /// Forget the position: the caller flushed everything for its own
    /// reasons (an unreachable Redis), so the next message is a start.
    pub fn reset(&mut self) {
        self.state = None;
    }

    fn observe(&mut self, epoch: &str, seq: u64, is_batch: bool) -> Decision {
        let Some((ours, last)) = &mut self.state else {
            self.state = Some((epoch.to_owned(), seq));
            return if is_batch { Decision::Apply } else { Decision::Ignore };
        };
        if ours != epoch {
            self.state = Some((epoch.to_owned(), seq));
            return Decision::Flush;
        }
        let previous = *last;
        if seq <= previous {
            return Decision::Ignore;
        }
        *last = seq;
        if is_batch && seq == previous + 1 {
            Decision::Apply
        } else {
            Decision::Gap { last: previous, apply: is_batch }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_spec_table_row_by_row() {
        let mut t = Tracker::new();
        assert_eq!(t.heartbeat("e1", 10), Decision::Ignore, "a first heartbeat is the start");
        assert_eq!(t.batch("e1", 11), Decision::Apply);
        assert_eq!(t.batch("e1", 11), Decision::Ignore, "a repeat");
        assert_eq!(t.batch("e1", 9), Decision::Ignore, "older");
        assert_eq!(t.batch("e1", 14), Decision::Gap { last: 11, apply: true });
        assert_eq!(t.heartbeat("e1", 14), Decision::Ignore, "in step");
        assert_eq!(t.heartbeat("e1", 16), Decision::Gap { last: 14, apply: false }, "a quiet loss");
        assert_eq!(t.batch("e2", 3), Decision::Flush, "a new epoch");
        assert_eq!(t.position(), Some(("e2", 3)));
        assert_eq!(t.batch("e2", 4), Decision::Apply);
        assert_eq!(t.keys_lost(), Decision::Flush);
        assert_eq!(t.keys_lost(), Decision::Ignore);
        assert_eq!(t.batch("e3", 1), Decision::Apply, "after a loss the next message is the start");
    }

    #[test]
    fn an_evictd_restart_continues_the_sequence_without_a_flush() {
        let mut t = Tracker::new();
        t.batch("e", 100);
        // A restart or a standby taking over: same epoch, seq + 1.
        assert_eq!(t.heartbeat("e", 100), Decision::Ignore);
        assert_eq!(t.batch("e", 101), Decision::Apply);
    }

    /// One message as published: its epoch index and sequence number.
    #[derive(Debug, Clone)]
    struct Published {
        epoch: u8,
        seq: u64,
        heartbeat: bool,
    }

    /// A publisher's history: batches with consecutive numbers, heartbeats
    /// repeating the last one, and occasional resets (a new epoch).
    fn history() -> impl Strategy<Value = Vec<Published>> {
        proptest::collection::vec((0u8..10, any::<bool>()), 1..60).prop_map(|steps| {
            let (mut epoch, mut seq, mut out) = (0u8, 1000u64, Vec::new());
            for (roll, heartbeat) in steps {
                if roll == 0 {
                    epoch += 1;
                    seq = 1000 * (u64::from(epoch) + 1);
                }
                if !heartbeat {
                    seq += 1;
                }
                out.push(Published { epoch, seq, heartbeat });
            }
            out
        })
    }

    proptest! {
        /// Whatever is lost or repeated (in order), every batch published
        /// after the first one seen is applied once, or covered by a gap
        /// repair that starts below it, or by a flush after it; none is
        /// applied twice.
        #[test]
        fn no_batch_is_passed_over_silently(
            published in history(),
            fate in proptest::collection::vec(0u8..4, 60),
        ) {
            let mut t = Tracker::new();
            // Indices into `published`, in delivery order.
            let mut delivered = Vec::new();
            for (i, fate) in fate.iter().enumerate().take(published.len()) {
                match fate {
                    0 => {}                                      // lost
                    1 => { delivered.push(i); delivered.push(i); } // repeated
                    _ => delivered.push(i),
                }
            }
            let mut applied = std::collections::HashMap::<(u8, u64), usize>::new();
            let mut covered = Vec::<(u8, u64, u64)>::new(); // (epoch, above, up to)
            let mut flushed_through = None::<usize>;
            for &i in &delivered {
                let m = &published[i];
                let epoch = format!("e{}", m.epoch);
                let decision = if m.heartbeat { t.heartbeat(&epoch, m.seq) } else { t.batch(&epoch, m.seq) };
                match decision {
                    Decision::Apply => *applied.entry((m.epoch, m.seq)).or_default() += 1,
                    Decision::Gap { last, apply } => {
                        covered.push((m.epoch, last, m.seq));
                        if apply { *applied.entry((m.epoch, m.seq)).or_default() += 1; }
                    }
                    Decision::Flush => flushed_through = flushed_through.max(Some(i)),
                    Decision::Ignore => {}
                }
            }
            prop_assert!(applied.values().all(|&n| n == 1), "applied twice: {applied:?}");
            let Some(&first) = delivered.first() else { return Ok(()) };
            for (j, m) in published.iter().enumerate().skip(first + 1).filter(|(_, m)| !m.heartbeat) {
                let ok = applied.contains_key(&(m.epoch, m.seq))
                    || covered.iter().any(|&(e, above, upto)| e == m.epoch && above < m.seq && m.seq <= upto)
                    || flushed_through.is_some_and(|f| j <= f)
                    // Lost, and nothing after it arrived to reveal the loss.
                    || !delivered.iter().any(|&d| d >= j);
                prop_assert!(ok, "batch {:?} passed over silently", m);
            }
        }
    }
}
