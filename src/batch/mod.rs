//! Batching: the effects of consecutive transactions merged and
//! deduplicated, so that a hot row updated a thousand times in a second
//! costs one `UNLINK`.
//!
//! - `transaction.rs`: one open transaction's effects, in bounded memory,
//!   collapsing into namespace bumps past its limits;
//! - [`Batch`]: whole transactions, their effects deduplicated in one set
//!   (the effects their look-ups find later join the same set), the
//!   look-ups still to run and the changes they came from.
//!
//! A batch is pure data: the run loop's session decides when to close it
//! (a size or time limit, [`BatchLimits`]); the look-up stage and the sinks
//! apply it; the checkpoint acknowledges its last position once every sink
//! confirmed it. **Invariant:** a batch holds whole transactions only, so
//! acknowledging its last position never acknowledges half a transaction.

pub(crate) mod transaction;

use std::hash::BuildHasher as _;

use hashbrown::HashTable;

pub(crate) use self::transaction::{TransactionEffects, TransactionLimits, TransactionOutput};
use crate::change::Position;
pub(crate) use crate::config::BatchLimits;
use crate::lookup::LookupOrigin;
use crate::resolve::{Effect, LookupRequest};
use crate::source::Undecodable;

/// Whole transactions: their effects, deduplicated, and the look-ups they
/// still need.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    id: u64,
    effects: Vec<Effect>,
    /// Indices into `effects`, by the effect's hash: the de-duplication,
    /// without a second copy of every key (that clone, its allocation and
    /// copy were a measurable part of a catch-up drain).
    seen: HashTable<usize>,
    hasher: foldhash::fast::RandomState,
    /// About how many bytes `effects` and `seen` hold.
    bytes: usize,
    transactions: usize,
    last_position: Option<Position>,
    lookups: Vec<LookupRequest>,
    /// The changes that asked for `lookups`.
    origins: Vec<LookupOrigin>,
    /// About how many bytes `lookups` and `origins` hold.
    held_bytes: usize,
    /// Commit time of the batch's last transaction (µs since the epoch).
    commit_time_micros: Option<i64>,
    /// Messages a source could not decode, each a transaction of the batch
    /// without effects: their dead letters are committed before it is
    /// confirmed.
    undecodable: Vec<Undecodable>,
}

impl Batch {
    pub(crate) fn new(id: u64) -> Batch {
        Batch {
            id,
            effects: Vec::new(),
            seen: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            bytes: 0,
            transactions: 0,
            last_position: None,
            lookups: Vec::new(),
            origins: Vec::new(),
            held_bytes: 0,
            commit_time_micros: None,
            undecodable: Vec::new(),
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Adds a whole transaction: its commit position and its effects.
    pub(crate) fn push_transaction(&mut self, position: Position, effects: impl IntoIterator<Item = Effect>) {
        self.add_effects(effects);
        self.transactions += 1;
        self.last_position = Some(position);
    }

    /// Adds a whole transaction as it finished: effects, look-ups still to
    /// run and the changes they came from, and its commit time.
    pub(crate) fn push_output(
        &mut self,
        position: Position,
        output: TransactionOutput,
        commit_time_micros: Option<i64>,
    ) {
        let TransactionOutput { effects, lookups, origins, held_bytes } = output;
        self.push_transaction(position, effects);
        self.lookups.extend(lookups);
        self.origins.extend(origins);
        self.held_bytes += held_bytes;
        self.commit_time_micros = commit_time_micros.or(self.commit_time_micros);
    }

    /// Adds a message the source could not decode: a transaction without
    /// effects, whose raw bytes the batch holds until its dead letter is
    /// written.
    pub(crate) fn push_undecodable(&mut self, message: Undecodable) {
        self.push_transaction(message.position.clone(), std::iter::empty());
        self.held_bytes += message.raw.bytes();
        self.undecodable.push(message);
    }

    /// Takes out the undecodable messages (for their dead letters).
    pub(crate) fn take_undecodable(&mut self) -> Vec<Undecodable> {
        std::mem::take(&mut self.undecodable)
    }

    /// Adds effects (of its transactions, or found by their look-ups): the
    /// batch's one de-duplication.
    pub(crate) fn add_effects(&mut self, effects: impl IntoIterator<Item = Effect>) {
        let Batch { effects: kept, seen, hasher, bytes, .. } = self;
        for effect in effects {
            let hash = hasher.hash_one(&effect);
            if seen.find(hash, |&i| kept[i] == effect).is_none() {
                seen.insert_unique(hash, kept.len(), |&i| hasher.hash_one(&kept[i]));
                *bytes += effect.approx_bytes() + std::mem::size_of::<usize>();
                kept.push(effect);
            }
        }
    }

    /// Distinct effects, in first-seen order.
    pub(crate) fn effects(&self) -> &[Effect] {
        &self.effects
    }

    /// Takes out the look-ups its transactions asked for, and the changes
    /// that asked (for the look-up stage, which adds what it finds back
    /// with [`Batch::add_effects`]).
    pub(crate) fn take_lookups(&mut self) -> (Vec<LookupRequest>, Vec<LookupOrigin>) {
        self.held_bytes = 0;
        (std::mem::take(&mut self.lookups), std::mem::take(&mut self.origins))
    }

    pub(crate) fn transactions(&self) -> usize {
        self.transactions
    }

    /// The commit position of the last transaction in the batch: what may be
    /// acknowledged once the batch is confirmed.
    pub(crate) fn last_position(&self) -> Option<&Position> {
        self.last_position.as_ref()
    }

    /// Commit time of the batch's last transaction that had one.
    pub(crate) fn commit_time_micros(&self) -> Option<i64> {
        self.commit_time_micros
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    /// Whether the batch reached a size limit: its effects, its whole
    /// transactions, the changes it keeps for look-ups (their number), or
    /// the bytes of everything it holds. Whole transactions count because
    /// a source may hold every delivered message until it is acknowledged
    /// (Kafka): a batch of transactions without effects must fill up as
    /// well, or reading would never stop behind a batch stuck on a sink. A
    /// full batch stops the reading while another is in flight, so memory
    /// stays bounded.
    pub(crate) fn is_full(&self, limits: &BatchLimits) -> bool {
        self.effects.len() >= limits.max_effects
            || self.transactions >= limits.max_effects
            || self.origins.len() >= limits.max_effects
            || self.bytes + self.held_bytes >= limits.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

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
