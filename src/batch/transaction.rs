//! One open source transaction's effects, accumulated change by change in
//! bounded memory.
//!
//! A transaction may touch millions of rows, and rows may be wide. Its
//! effects are deduplicated as they arrive; past `max_effects` distinct
//! effects, or past `max_bytes` held (keys, tags, look-up arguments and the
//! changes kept for look-ups, see [`Change::approx_bytes`]), the keys and
//! tags of each cache collapse into one namespace bump of that cache, and
//! every later effect of a bumped cache is dropped as already covered. Look-up
//! requests are bounded the same way: past the limit, the look-up's cache
//! is bumped instead. **Invariant:** collapsing only ever widens what is
//! invalidated; it never loses an invalidation.
//!
//! A change that asks for look-ups is kept (shared, [`LookupOrigin`]) with
//! the requests it asked for, so that a batch whose look-ups fail can be
//! narrowed down to the changes that fail. Only such changes are kept, and
//! they count towards the limit like effects, so memory stays bounded.

use std::sync::Arc;

use foldhash::HashSet;

use crate::change::Change;
use crate::graph::{CacheId, DepId, Graph};
use crate::lookup::LookupOrigin;
use crate::resolve::{ArgKey, Effect, LookupRequest, Resolution};

/// What a finished transaction hands to its batch.
#[derive(Debug, Default)]
pub(crate) struct TransactionOutput {
    /// Deduplicated effects, in a stable order.
    pub(crate) effects: Vec<Effect>,
    /// Deduplicated look-ups of the whole transaction.
    pub(crate) lookups: Vec<LookupRequest>,
    /// The changes those look-ups came from.
    pub(crate) origins: Vec<LookupOrigin>,
    /// About how many bytes `lookups` and `origins` hold (the effects are
    /// counted by the batch).
    pub(crate) held_bytes: usize,
}

/// How much one open transaction may hold before it collapses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TransactionLimits {
    /// Distinct effects, look-ups and kept changes.
    pub(crate) max_effects: usize,
    /// Bytes held by them (about).
    pub(crate) max_bytes: usize,
}

/// The effects of one open transaction.
#[derive(Debug)]
pub(crate) struct TransactionEffects {
    max_effects: usize,
    max_bytes: usize,
    /// About how many bytes `effects`, `lookups` and `origins` hold.
    bytes: usize,
    effects: HashSet<Effect>,
    lookups: Vec<LookupRequest>,
    origins: Vec<LookupOrigin>,
    seen_lookups: HashSet<(DepId, ArgKey)>,
    bumped: HashSet<CacheId>,
    changes: u64,
}

impl TransactionEffects {
    pub(crate) fn new(limits: TransactionLimits) -> TransactionEffects {
        TransactionEffects {
            max_effects: limits.max_effects.max(1),
            max_bytes: limits.max_bytes.max(1),
            bytes: 0,
            effects: HashSet::default(),
            lookups: Vec::new(),
            origins: Vec::new(),
            seen_lookups: HashSet::default(),
            bumped: HashSet::default(),
            changes: 0,
        }
    }

    /// Adds one change's resolution; the change is kept only when it asked
    /// for look-ups.
    pub(crate) fn add(&mut self, graph: &Graph, change: Change, resolution: Resolution) {
        self.changes += 1;
        for resolved in resolution.effects {
            self.add_effect(resolved.effect);
        }
        let mut requests = Vec::new();
        for request in resolution.lookups {
            let cache = graph.dependency(request.dependency).cache;
            if self.bumped.contains(&cache) {
                continue;
            }
            if self.seen_lookups.insert(request.key()) {
                // The request, and its key in `seen_lookups`.
                self.bytes += 2 * request.approx_bytes();
                self.lookups.push(request.clone());
            }
            self.bytes += request.approx_bytes();
            requests.push(request);
        }
        if !requests.is_empty() {
            let change = only_graph_columns(graph, change);
            self.bytes += change.approx_bytes();
            self.origins.push(LookupOrigin { change: Arc::new(change), requests });
        }
        if self.effects.len() + self.lookups.len() + self.origins.len() > self.max_effects
            || self.bytes > self.max_bytes
        {
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
        let bytes = effect.approx_bytes();
        if self.effects.insert(effect) {
            self.bytes += bytes;
        }
    }

    /// Replaces every cache's keys, tags and look-ups by one namespace bump,
    /// of that cache and of every cache that embeds it, transitively: the
    /// keys a dropped look-up would have found, and the embedders' keys that
    /// applications registered under a dropped tag, are unknown now, and a
    /// bump of an embedded cache reaches its embedders only through this
    /// closure (as `Resolver::bump` does for every other bump).
    fn collapse(&mut self, graph: &Graph) {
        let caches = graph.with_embedders(
            self.effects
                .iter()
                .map(Effect::cache)
                .chain(self.lookups.iter().map(|l| graph.dependency(l.dependency).cache)),
        );
        tracing::warn!(
            changes = self.changes,
            caches = caches.len(),
            held_bytes = self.bytes,
            "transaction past its effect limit: bumping whole namespaces instead"
        );
        self.bumped.extend(caches.iter().copied());
        self.effects = caches.into_iter().map(|cache| Effect::NamespaceBump { cache }).collect();
        self.bytes = self.effects.iter().map(Effect::approx_bytes).sum();
        self.lookups.clear();
        self.origins.clear();
        self.seen_lookups.clear();
    }

    /// How many row changes were added.
    #[cfg(test)]
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    /// The accumulated effects (in a stable order), look-ups and origins.
    pub(crate) fn finish(self) -> TransactionOutput {
        let mut effects: Vec<Effect> = self.effects.into_iter().collect();
        effects.sort();
        let held_bytes = self.lookups.iter().map(LookupRequest::approx_bytes).sum::<usize>()
            + self.origins.iter().map(LookupOrigin::approx_bytes).sum::<usize>();
        TransactionOutput { effects, lookups: self.lookups, origins: self.origins, held_bytes }
    }
}

/// The change with only the columns the graph declares for its table: a
/// kept change needs no more (its look-ups are re-resolved from them, and a
/// dead letter replays through the graph), and a wide column nobody reads
/// (a document body, an image) is not held for the batch's look-ups.
fn only_graph_columns(graph: &Graph, mut change: Change) -> Change {
    let Some(table) = graph.table_id(&change.table).map(|t| graph.table(t)) else {
        return change;
    };
    for row in [change.before.as_mut(), change.after.as_mut()].into_iter().flatten() {
        row.retain_columns(|column| table.has_column(column));
    }
    change
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

    fn limits(max_effects: usize) -> TransactionLimits {
        TransactionLimits { max_effects, max_bytes: usize::MAX }
    }

    fn insert(id: i64) -> Change {
        let row = Row::new().with("id", Value::Int(id)).with("owner", Value::Int(id % 3));
        Change::new("app.items", Operation::Insert, None, Some(row))
    }

    #[test]
    fn a_small_transaction_keeps_every_key_once() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let mut tx = TransactionEffects::new(limits(100));
        for id in [1, 2, 1] {
            let change = insert(id);
            let resolution = Resolver::new(&g).resolve(&change);
            tx.add(&g, change, resolution);
        }
        let out = tx.finish();
        assert_eq!(out.effects.len(), 2);
        assert_eq!(out.lookups.len(), 2, "owners 1 and 2, once each");
        assert_eq!(out.origins.len(), 3, "every change keeps its own look-ups, duplicates included");
        assert!(out.origins.iter().all(|o| o.requests.len() == 1));
    }

    /// Issue 12, item 4: look-ups are de-duplicated by a typed key, not by
    /// their `{:?}` text.
    #[test]
    fn equal_look_ups_are_kept_once_and_different_ones_apart() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let dependency = g.cache(g.cache_id("owner_items").unwrap()).dependencies[0];
        let asking = |args: &[Value]| {
            let mut resolution = Resolution::default();
            resolution.lookups = args
                .iter()
                .map(|arg| LookupRequest { dependency, arg: arg.clone(), path: smallvec::smallvec![dependency] })
                .collect();
            resolution
        };
        let mut tx = TransactionEffects::new(limits(100));
        let nan = Value::Float(f64::NAN);
        let batches = [
            vec![Value::Float(2.5), Value::Null, nan.clone()],
            vec![Value::Float(2.5), Value::Null, Value::Float(f64::from_bits(f64::NAN.to_bits() | 1))],
            vec![Value::Float(-2.5), Value::Text("NULL".into()), Value::Int(2), Value::Text("2".into())],
        ];
        for args in batches {
            tx.add(&g, insert(1), asking(&args));
        }
        let out = tx.finish();
        let kept: Vec<String> = out.lookups.iter().map(|l| format!("{:?}", l.arg)).collect();
        assert_eq!(
            kept,
            ["Float(2.5)", "Null", "Float(NaN)", "Float(-2.5)", "Text(\"NULL\")", "Int(2)", "Text(\"2\")"]
        );
        assert_eq!(out.origins.iter().map(|o| o.requests.len()).collect::<Vec<_>>(), [3, 3, 4]);
    }

    #[test]
    fn changes_without_look_ups_are_not_kept() {
        const DIRECT: &str = "[tables.\"app.items\"]\nkey = [\"id\"]\ncolumns = [\"id\"]\n[caches.item]\nkey = \"item:{id}\"\n[[caches.item.depends]]\ntable = \"app.items\"\n";
        let g = load_sources(&[SourceFile::new("t.toml", DIRECT.to_owned())]).unwrap();
        let mut tx = TransactionEffects::new(limits(100));
        let change = insert(1);
        let resolution = Resolver::new(&g).resolve(&change);
        tx.add(&g, change, resolution);
        assert!(tx.finish().origins.is_empty());
    }

    /// Issue 11, item 1: `page` embeds `owner_items`, which only look-ups
    /// feed; `feed` embeds `item` through a tag-less key; `tagged` is fed by
    /// tags and embedded by `digest`. Collapsing must bump every embedder,
    /// transitively, of every cache it touches.
    const EMBEDDED: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "owner"]

[caches.item]
key = "item:{id}"
[[caches.item.depends]]
table = "app.items"

[caches.feed]
key = "feed:{id}"
[[caches.feed.depends]]
embeds = "item"

[caches.owner_items]
key = "owner:{id}:items"
[[caches.owner_items.depends]]
table = "app.items"
lookup = { query = "SELECT id FROM x WHERE y = ANY($1)", arg = "owner" }

[caches.page]
key = "page:{id}"
[[caches.page.depends]]
embeds = "owner_items"

[caches.site]
key = "site:{id}"
[[caches.site.depends]]
embeds = "page"

[caches.tagged]
key = "tagged:{id}"
[[caches.tagged.depends]]
table = "app.items"
tags = ["owner:{owner}"]

[caches.digest]
key = "digest:{id}"
[[caches.digest.depends]]
embeds = "tagged"
"#;

    #[test]
    fn a_collapse_bumps_every_cache_that_embeds_what_it_touched() {
        let g = load_sources(&[SourceFile::new("t.toml", EMBEDDED.to_owned())]).unwrap();
        let mut tx = TransactionEffects::new(limits(20));
        for id in 0..1_000 {
            let change = insert(id);
            let resolution = Resolver::new(&g).resolve(&change);
            tx.add(&g, change, resolution);
        }
        let TransactionOutput { effects, lookups, origins, .. } = tx.finish();
        let bumped: HashSet<&str> = effects
            .iter()
            .map(|e| match e {
                Effect::NamespaceBump { cache } => g.cache(*cache).name.as_ref(),
                other => panic!("only namespace bumps after a collapse, got {other:?}"),
            })
            .collect();
        let all: HashSet<&str> =
            ["item", "feed", "owner_items", "page", "site", "tagged", "digest"].into_iter().collect();
        assert_eq!(bumped, all, "the look-up's embedders (page, site) and the tags' (digest) are bumped too");
        assert!(lookups.is_empty() && origins.is_empty());
    }

    /// Issue 11, item 13: a few wide rows hold more than a count would say.
    #[test]
    fn wide_rows_kept_for_look_ups_collapse_past_the_byte_limit() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let limits = TransactionLimits { max_effects: 1_000, max_bytes: 4 << 20 };
        let mut tx = TransactionEffects::new(limits);
        for id in 0..64 {
            // `owner` itself is wide: a declared column is kept whole.
            let row = Row::new()
                .with("id", Value::Int(id))
                .with("owner", Value::Text(format!("{id}{}", "x".repeat(256 << 10))));
            let change = Change::new("app.items", Operation::Insert, None, Some(row));
            let resolution = Resolver::new(&g).resolve(&change);
            tx.add(&g, change, resolution);
            assert!(tx.bytes <= limits.max_bytes + (300 << 10), "held {} bytes after change {id}", tx.bytes);
        }
        let out = tx.finish();
        assert!(out.origins.len() < 16, "no more than 4 MiB of 256 KiB rows are kept: {}", out.origins.len());
        let owners = g.cache_id("owner_items").unwrap();
        assert!(out.effects.contains(&Effect::NamespaceBump { cache: owners }), "the look-ups' cache is bumped");
    }

    #[test]
    fn a_kept_change_holds_only_the_columns_the_graph_declares() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let mut tx = TransactionEffects::new(limits(100));
        let row = Row::new()
            .with("id", Value::Int(1))
            .with("owner", Value::Int(2))
            .with("body", Value::Text("x".repeat(1 << 20)));
        let change = Change::new("app.items", Operation::Insert, None, Some(row));
        let resolution = Resolver::new(&g).resolve(&change);
        tx.add(&g, change, resolution);
        let out = tx.finish();
        let kept = out.origins[0].change.after.as_ref().unwrap();
        let columns: Vec<&str> = kept.iter().map(|(c, _)| c).collect();
        assert_eq!(columns, ["id", "owner"], "the undeclared wide column is not held");
        assert!(out.held_bytes < 4096, "{}", out.held_bytes);
    }

    #[test]
    fn a_huge_transaction_collapses_into_namespace_bumps() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let mut tx = TransactionEffects::new(limits(50));
        for id in 0..10_000 {
            let change = insert(id);
            let resolution = Resolver::new(&g).resolve(&change);
            tx.add(&g, change, resolution);
        }
        assert_eq!(tx.changes(), 10_000);
        let TransactionOutput { effects, lookups, origins, .. } = tx.finish();
        let item = g.cache_id("item").unwrap();
        let owners = g.cache_id("owner_items").unwrap();
        let mut expected = vec![Effect::NamespaceBump { cache: item }, Effect::NamespaceBump { cache: owners }];
        expected.sort();
        assert_eq!(effects, expected, "every cache the transaction touched is invalidated whole");
        assert!(lookups.is_empty());
        assert!(origins.is_empty(), "no change is held once its look-ups became a bump");
    }
}
