//! One open source transaction's effects, accumulated change by change in
//! bounded memory.
//!
//! A transaction may touch millions of rows. Its effects are deduplicated
//! as they arrive; past `max_effects` distinct effects, the keys and tags
//! of each cache collapse into one namespace bump of that cache, and every
//! later effect of a bumped cache is dropped as already covered. Look-up
//! requests are bounded the same way: past the limit, the look-up's cache
//! is bumped instead. **Invariant:** collapsing only ever widens what is
//! invalidated; it never loses an invalidation.

use std::collections::{HashMap, HashSet};

use crate::graph::{CacheId, Graph};
use crate::resolve::{Effect, LookupRequest, Resolution};

/// The effects of one open transaction.
#[derive(Debug)]
pub struct TransactionEffects {
    max_effects: usize,
    effects: HashSet<Effect>,
    lookups: Vec<LookupRequest>,
    seen_lookups: HashSet<(crate::graph::DepId, String)>,
    bumped: HashSet<CacheId>,
    changes: u64,
}

impl TransactionEffects {
    pub fn new(max_effects: usize) -> TransactionEffects {
        TransactionEffects {
            max_effects: max_effects.max(1),
            effects: HashSet::new(),
            lookups: Vec::new(),
            seen_lookups: HashSet::new(),
            bumped: HashSet::new(),
            changes: 0,
        }
    }

    /// Adds one change's resolution.
    pub fn add(&mut self, graph: &Graph, resolution: Resolution) {
        self.changes += 1;
        for resolved in resolution.effects {
            self.add_effect(resolved.effect);
        }
        for request in resolution.lookups {
            let cache = graph.dependency(request.dependency).cache;
            if self.bumped.contains(&cache) {
                continue;
            }
            let key = (request.dependency, format!("{:?}", request.arg));
            if self.seen_lookups.insert(key) {
                self.lookups.push(request);
            }
        }
        if self.effects.len() + self.lookups.len() > self.max_effects {
            self.collapse(graph);
        }
    }

    fn add_effect(&mut self, effect: Effect) {
        let cache = effect.cache();
        if self.bumped.contains(&cache) && !matches!(effect, Effect::NamespaceBump { .. }) {
            return;
        }
        if let Effect::NamespaceBump { cache } = effect {
            self.bumped.insert(cache);
        }
        self.effects.insert(effect);
    }

    /// Replaces every cache's keys, tags and look-ups by one namespace bump.
    fn collapse(&mut self, graph: &Graph) {
        let caches: HashSet<CacheId> = self
            .effects
            .iter()
            .map(Effect::cache)
            .chain(self.lookups.iter().map(|l| graph.dependency(l.dependency).cache))
            .collect();
        tracing::warn!(
            changes = self.changes,
            caches = caches.len(),
            "transaction past its effect limit: bumping whole namespaces instead"
        );
        self.bumped.extend(caches.iter().copied());
        self.effects = caches.into_iter().map(|cache| Effect::NamespaceBump { cache }).collect();
        self.lookups.clear();
        self.seen_lookups.clear();
    }

    /// How many row changes were added.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The accumulated effects and look-ups, in a stable order.
    pub fn finish(self) -> (Vec<Effect>, Vec<LookupRequest>) {
        let mut effects: Vec<Effect> = self.effects.into_iter().collect();
        effects.sort();
        (effects, self.lookups)
    }

    /// Per cache, how many effects there are (for metrics).
    pub fn per_cache(effects: &[Effect]) -> HashMap<CacheId, u64> {
        let mut out = HashMap::new();
        for e in effects {
            *out.entry(e.cache()).or_insert(0) += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Operation, Row, Value};
    use crate::diagnostic::SourceFile;
    use crate::graph::load::load_sources;
    use crate::resolve::Resolver;

    const GRAPH: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "owner"]

[caches.item]
key = "item:{id}"
[[caches.item.depends]]
table = "app.items"

[caches.owner_items]
key = "owner:{id}:items"
[[caches.owner_items.depends]]
table = "app.items"
lookup = { query = "SELECT id FROM x WHERE y = ANY($1)", arg = "owner" }
"#;

    fn insert(id: i64) -> Change {
        let row = Row::new().with("id", Value::Int(id)).with("owner", Value::Int(id % 3));
        Change::new("app.items", Operation::Insert, None, Some(row))
    }

    #[test]
    fn a_small_transaction_keeps_every_key_once() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let mut tx = TransactionEffects::new(100);
        for id in [1, 2, 1] {
            tx.add(&g, Resolver::new(&g).resolve(&insert(id)));
        }
        let (effects, lookups) = tx.finish();
        assert_eq!(effects.len(), 2);
        assert_eq!(lookups.len(), 2, "owners 1 and 2, once each");
    }

    #[test]
    fn a_huge_transaction_collapses_into_namespace_bumps() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let mut tx = TransactionEffects::new(50);
        for id in 0..10_000 {
            tx.add(&g, Resolver::new(&g).resolve(&insert(id)));
        }
        assert_eq!(tx.changes(), 10_000);
        let (effects, lookups) = tx.finish();
        let item = g.cache_id("item").unwrap();
        let owners = g.cache_id("owner_items").unwrap();
        let mut expected = vec![Effect::NamespaceBump { cache: item }, Effect::NamespaceBump { cache: owners }];
        expected.sort();
        assert_eq!(effects, expected, "every cache the transaction touched is invalidated whole");
        assert!(lookups.is_empty());
    }
}
