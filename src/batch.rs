//! Batching: the effects of consecutive transactions merged and
//! deduplicated, so that a hot row updated a thousand times in a second
//! costs one `UNLINK`.
//!
//! A [`Batch`] is pure data: the run loop decides when to close it (a size
//! or time limit, [`BatchLimits`]); sinks apply it; the checkpoint
//! acknowledges its last position once every sink confirmed it.
//! **Invariant:** a batch holds whole transactions only, so acknowledging
//! its last position never acknowledges half a transaction.

use std::collections::HashSet;
use std::time::Duration;

use crate::change::Position;
use crate::resolve::Effect;

/// When a batch is closed and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Close once this many distinct effects, or whole transactions, are
    /// queued.
    pub max_effects: usize,
    /// Close this long after the batch's first transaction arrived.
    pub max_delay: Duration,
    /// Close once the batch holds about this many bytes (effects, and the
    /// changes its look-ups came from).
    pub max_bytes: usize,
}

/// Effects of one or more whole transactions, deduplicated.
#[derive(Debug, Clone)]
pub struct Batch {
    id: u64,
    effects: Vec<Effect>,
    seen: HashSet<Effect>,
    /// About how many bytes `effects` and `seen` hold.
    bytes: usize,
    transactions: usize,
    last_position: Option<Position>,
}

impl Batch {
    pub fn new(id: u64) -> Batch {
        Batch { id, effects: Vec::new(), seen: HashSet::new(), bytes: 0, transactions: 0, last_position: None }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Adds a whole transaction: its commit position and its effects.
    pub fn push_transaction(&mut self, position: Position, effects: impl IntoIterator<Item = Effect>) {
        for effect in effects {
            if self.seen.insert(effect.clone()) {
                self.bytes += 2 * effect.approx_bytes();
                self.effects.push(effect);
            }
        }
        self.transactions += 1;
        self.last_position = Some(position);
    }

    /// Distinct effects, in first-seen order.
    pub fn effects(&self) -> &[Effect] {
        &self.effects
    }

    pub fn transactions(&self) -> usize {
        self.transactions
    }

    /// The commit position of the last transaction in the batch: what may be
    /// acknowledged once the batch is confirmed.
    pub fn last_position(&self) -> Option<&Position> {
        self.last_position.as_ref()
    }

    /// About how many bytes the batch's effects hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    /// Whether the batch reached its size limit.
    /// Whole transactions count too (as many as `max_effects`): a source
    /// may hold every delivered message until it is acknowledged (Kafka), so
    /// a batch of transactions without effects must fill up as well, or
    /// reading would never stop behind a batch stuck on a sink.
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.effects.len() >= limits.max_effects
            || self.transactions >= limits.max_effects
            || self.bytes >= limits.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Lsn;
    use crate::graph::CacheId;
    use proptest::prelude::*;

    fn pos(n: u64) -> Position {
        Position::Postgres { commit_lsn: Lsn(n), lsn: Lsn(n) }
    }

    fn key(k: u8) -> Effect {
        Effect::Key { cache: CacheId(0), key: format!("k{k}") }
    }

    #[test]
    fn repeated_effects_are_queued_once_and_the_last_position_wins() {
        let mut batch = Batch::new(1);
        batch.push_transaction(pos(10), [key(1), key(2)]);
        batch.push_transaction(pos(20), [key(2), key(1), key(3)]);
        assert_eq!(batch.effects(), &[key(1), key(2), key(3)]);
        assert_eq!(batch.transactions(), 2);
        assert_eq!(batch.last_position(), Some(&pos(20)));
    }

    #[test]
    fn a_transaction_without_effects_still_moves_the_position() {
        let mut batch = Batch::new(1);
        batch.push_transaction(pos(5), []);
        assert!(!batch.is_empty());
        assert_eq!(batch.last_position(), Some(&pos(5)));
    }

    proptest! {
        #[test]
        fn batching_keeps_every_effect_exactly_once(txs in prop::collection::vec(prop::collection::vec(0u8..20, 0..10), 1..20)) {
            let mut batch = Batch::new(7);
            for (i, tx) in txs.iter().enumerate() {
                batch.push_transaction(pos(i as u64), tx.iter().map(|k| key(*k)));
            }
            let expected: HashSet<Effect> = txs.iter().flatten().map(|k| key(*k)).collect();
            let got: HashSet<Effect> = batch.effects().iter().cloned().collect();
            prop_assert_eq!(got, expected);
            prop_assert_eq!(batch.effects().len(), batch.seen.len());
            let limits = BatchLimits { max_effects: 5, max_delay: Duration::from_millis(1), max_bytes: usize::MAX };
            prop_assert_eq!(batch.is_full(&limits), batch.effects().len() >= 5 || batch.transactions() >= 5);
        }
    }
}
