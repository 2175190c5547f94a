//! Resolution: one change → the deduplicated set of effects it calls for,
//! each with the path through the graph that led to it.
//!
//! **Invariant: resolution is pure.** This module does no I/O and never
//! waits: the same graph and change always resolve to the same effects. A
//! dependency that needs SQL comes out as a [`LookupRequest`]; the look-up
//! stage (`crate::lookup`) runs those (batched, bounded in time and rows)
//! and feeds the rows back through [`Resolver::resolve_lookup_rows`], which
//! may ask for more look-ups further along `embeds` edges. Requests are the
//! same look-up when their [`LookupRequest::key`]s are equal.
//!
//! Rules (see `dependency-graphs/README.md` for the user's view):
//! - insert renders from the new row (dropping a cached "not found"), delete
//!   from the old row, update from both, so a key-column move invalidates
//!   the old and the new key;
//! - a column filter skips an update that changes none of its columns; an
//!   old value the source did not send counts as changed; a new value it did
//!   not send (unchanged TOAST) counts as unchanged;
//! - an identity column missing from an update's old image is unchanged
//!   (sources send old identity values only when they change);
//! - a NULL parameter renders no key; an unknown one cannot be rendered, so
//!   the cache's namespace is bumped instead (never a silent miss);
//! - truncate bumps the namespace of every dependent cache;
//! - every key or namespace bump propagates to the caches that embed it.

use foldhash::HashMap;
use std::fmt;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::change::{Cell, Change, Operation, Value};
use crate::graph::{CacheId, DepId, Graph, Lookup, LookupArg, Mapping, TableId, Trigger};

/// The path through the graph: dependencies from the changed table to the
/// cache, in order.
pub(crate) type Path = SmallVec<[DepId; 4]>;

/// Something a sink must do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    /// Apply the cache's action (delete, bump or expire) to a key.
    Key { cache: CacheId, key: String },
    /// Invalidate every key registered under a tag.
    Tag { cache: CacheId, tag: String },
    /// Invalidate the whole cache by bumping its namespace version.
    NamespaceBump { cache: CacheId },
}

impl Effect {
    pub(crate) fn cache(&self) -> CacheId {
        match self {
            Effect::Key { cache, .. } | Effect::Tag { cache, .. } | Effect::NamespaceBump { cache } => *cache,
        }
    }

    /// About how many bytes holding this effect costs (in a set or a batch).
    pub(crate) fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Effect>()
            + match self {
                Effect::Key { key: text, .. } | Effect::Tag { tag: text, .. } => text.len(),
                Effect::NamespaceBump { .. } => 0,
            }
    }
}

/// Which row image an effect was rendered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Image {
    Old,
    New,
    Both,
}

/// Why an effect is there, besides its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Rendered from a row image.
    Row(Image),
    /// Rendered from a look-up result row.
    LookupRow,
    /// The table was truncated.
    Truncate,
    /// A value needed for the key was not sent by the source.
    Unknown { column: Arc<str>, image: Image },
    /// A look-up returned more rows than the cache's fan-out limit.
    FanoutExceeded { rows: u64, limit: u64 },
    /// A cache this one embeds had its namespace bumped.
    EmbeddedBump,
    /// The change's look-up could not be run (the change was dead-lettered):
    /// the keys it would have found are unknown.
    LookupFailed,
    /// An operator asked for it (`evictd invalidate`).
    Operator,
    /// An operator invalidated a key whose parameter this embedder needs,
    /// but the key shows it only normalised (`lower`, `sha256`, …): the
    /// embedder's keys are unknown.
    OperatorUnknownParam { param: Arc<str> },
}

/// One reason for an effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reason {
    pub(crate) path: Path,
    pub(crate) cause: Cause,
}

/// An effect with every reason that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub effect: Effect,
    /// Most effects have one reason: kept inline, not in an allocation.
    pub(crate) reasons: SmallVec<[Reason; 1]>,
}

/// A look-up the look-up stage must execute: run the dependency's query with
/// `arg` among the `$1` values, then feed the rows back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LookupRequest {
    pub(crate) dependency: DepId,
    pub(crate) arg: Value,
    pub(crate) path: Path,
}

impl LookupRequest {
    /// About how many bytes holding this request costs.
    pub(crate) fn approx_bytes(&self) -> usize {
        std::mem::size_of::<LookupRequest>() + self.arg.heap_bytes()
    }

    /// What makes two requests the same look-up: the dependency and the
    /// argument (the path is only the first request's reason).
    pub(crate) fn key(&self) -> (DepId, ArgKey) {
        (self.dependency, ArgKey::new(self.arg.clone()))
    }

    /// Whether `other` is the same look-up as this one (as [`key`](Self::key)
    /// says, without building the keys).
    pub(crate) fn same_lookup(&self, other: &LookupRequest) -> bool {
        self.dependency == other.dependency && canonical(&self.arg) == canonical(&other.arg)
    }
}

/// A look-up argument as a de-duplication key (`Hash` + `Eq`).
///
/// Two arguments are the same key exactly when they are the same variant
/// with the same payload; floats compare by their bits, with every NaN
/// made one. So `0.0` and `-0.0` stay two keys (they bind to `$1` as `0`
/// and `-0`, which a query comparing text tells apart: sending both is
/// never a lost invalidation), while NaNs, whatever their payload, bind as
/// the one `NaN` and are one key. `Value`'s own `==` cannot serve: it says
/// `NaN != NaN` (not an equivalence) and `0.0 == -0.0`. `Int(1)` and
/// `Text("1")` are two keys, as they bind differently.
#[derive(Debug, Clone)]
pub(crate) struct ArgKey(Value);

/// The canonical form [`ArgKey`] compares and hashes.
#[derive(PartialEq, Eq, Hash)]
enum Canonical<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(u64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

impl ArgKey {
    pub(crate) fn new(arg: Value) -> ArgKey {
        ArgKey(arg)
    }

    /// The argument it stands for.
    pub(crate) fn value(&self) -> &Value {
        &self.0
    }
}

fn canonical(value: &Value) -> Canonical<'_> {
    match value {
        Value::Null => Canonical::Null,
        Value::Bool(b) => Canonical::Bool(*b),
        Value::Int(i) => Canonical::Int(*i),
        Value::Float(x) if x.is_nan() => Canonical::Float(f64::NAN.to_bits()),
        Value::Float(x) => Canonical::Float(x.to_bits()),
        Value::Text(s) => Canonical::Text(s),
        Value::Bytes(b) => Canonical::Bytes(b),
    }
}

impl PartialEq for ArgKey {
    fn eq(&self, other: &ArgKey) -> bool {
        canonical(&self.0) == canonical(&other.0)
    }
}

impl Eq for ArgKey {}

impl std::hash::Hash for ArgKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        canonical(&self.0).hash(state);
    }
}

/// A dependency that produced nothing, and why (for `explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Skip {
    /// An update changed none of the filter's columns.
    Filtered { dependency: DepId },
    /// A parameter was NULL, so there is no key (or tag, or look-up).
    Null { dependency: DepId, name: Arc<str>, image: Image },
}

/// Everything one change (or one batch of look-up rows) resolves to.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    pub effects: Vec<Resolved>,
    pub(crate) lookups: Vec<LookupRequest>,
    pub(crate) skipped: Vec<Skip>,
    /// Effect → index in `effects`, built once there are too many effects
    /// for a linear scan (most changes resolve to a handful).
    index: Option<HashMap<Effect, usize>>,
}

/// Past this many effects, deduplication switches from a scan to a map.
const SCAN_LIMIT: usize = 16;

impl Resolution {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.effects.is_empty() && self.lookups.is_empty()
    }

    fn add(&mut self, effect: Effect, reason: Reason) {
        if self.index.is_none() && self.effects.len() >= SCAN_LIMIT {
            self.index = Some(self.effects.iter().enumerate().map(|(i, r)| (r.effect.clone(), i)).collect());
        }
        let found = match &self.index {
            Some(index) => index.get(&effect).copied(),
            None => self.effects.iter().position(|r| r.effect == effect),
        };
        match found {
            Some(i) => merge_reason(&mut self.effects[i].reasons, reason),
            None => {
                if let Some(index) = &mut self.index {
                    index.insert(effect.clone(), self.effects.len());
                }
                self.effects.push(Resolved { effect, reasons: smallvec::smallvec![reason] });
            }
        }
    }

    fn lookup(&mut self, request: LookupRequest) {
        // A change asks for a handful of look-ups: a scan, by the same key
        // as every other de-duplication of requests.
        let duplicate = self.lookups.iter().any(|r| r.same_lookup(&request));
        if !duplicate {
            self.lookups.push(request);
        }
    }

    /// Folds another resolution into this one, deduplicating.
    pub(crate) fn merge(&mut self, other: Resolution) {
        for resolved in other.effects {
            for reason in resolved.reasons {
                self.add(resolved.effect.clone(), reason);
            }
        }
        for request in other.lookups {
            self.lookup(request);
        }
        self.skipped.extend(other.skipped);
    }
}

/// The same path from the old and the new image reads as one reason.
fn merge_reason(reasons: &mut SmallVec<[Reason; 1]>, reason: Reason) {
    for existing in reasons.iter_mut() {
        if existing.path != reason.path {
            continue;
        }
        match (&mut existing.cause, &reason.cause) {
            (Cause::Row(a), Cause::Row(b)) if a != b => {
                *a = Image::Both;
                return;
            }
            (a, b) if a == b => return,
            _ => {}
        }
    }
    reasons.push(reason);
}

/// Resolves changes against one graph.
#[derive(Debug, Clone, Copy)]
pub struct Resolver<'g> {
    graph: &'g Graph,
}

impl<'g> Resolver<'g> {
    pub fn new(graph: &'g Graph) -> Resolver<'g> {
        Resolver { graph }
    }

    pub(crate) fn graph(&self) -> &'g Graph {
        self.graph
    }

    /// Resolves one change. A change of a table the graph does not know
    /// resolves to nothing.
    pub fn resolve(&self, change: &Change) -> Resolution {
        let mut out = Resolution::default();
        let Some(table) = self.graph.table_id(&change.table) else {
            return out;
        };
        let dependents = &self.graph.table(table).dependents;
        for &dep_id in dependents {
            let path: Path = smallvec::smallvec![dep_id];
            match change.op {
                Operation::Truncate => {
                    let cache = self.graph.dependency(dep_id).cache;
                    self.bump(cache, path, Cause::Truncate, &mut out);
                }
                Operation::Insert => self.apply(change, table, dep_id, Image::New, path, &mut out),
                Operation::Delete => self.apply(change, table, dep_id, Image::Old, path, &mut out),
                Operation::Update => {
                    if !self.passes_filter(change, table, dep_id) {
                        out.skipped.push(Skip::Filtered { dependency: dep_id });
                        continue;
                    }
                    self.apply(change, table, dep_id, Image::Old, path.clone(), &mut out);
                    self.apply(change, table, dep_id, Image::New, path, &mut out);
                }
            }
        }
        out
    }

    /// Continues resolution with the rows a look-up returned for
    /// `request`'s dependency: `rows[r][i]` is parameter `i` of the target
    /// cache's key.
    pub(crate) fn resolve_lookup_rows(
        &self,
        dependency: DepId,
        path: &Path,
        rows: &[Vec<Option<Value>>],
    ) -> Resolution {
        let mut out = Resolution::default();
        let cache = self.graph.dependency(dependency).cache;
        for row in rows {
            let params: SmallVec<[Option<&Value>; 8]> = row.iter().map(Option::as_ref).collect();
            self.key(cache, &params, path.clone(), Cause::LookupRow, dependency, Image::New, &mut out);
        }
        out
    }

    /// A look-up returned more rows than the cache's fan-out limit: bump the
    /// whole cache instead.
    pub(crate) fn fanout_exceeded(&self, dependency: DepId, path: &Path, rows: u64) -> Resolution {
        let mut out = Resolution::default();
        let cache = self.graph.dependency(dependency).cache;
        let limit = self.graph.cache(cache).options.fanout_limit;
        self.bump(cache, path.clone(), Cause::FanoutExceeded { rows, limit }, &mut out);
        out
    }

    /// A look-up that cannot be run for a dead-lettered change: bump the
    /// cache it feeds (and its embedders), since the keys it would have
    /// found are unknown. Never a silent miss.
    pub(crate) fn lookup_failed(&self, request: &LookupRequest) -> Resolution {
        let mut out = Resolution::default();
        let cache = self.graph.dependency(request.dependency).cache;
        self.bump(cache, request.path.clone(), Cause::LookupFailed, &mut out);
        out
    }

    /// An operator's invalidation of `key`, a key of `cache` (`evictd
    /// invalidate --key` or `--cache … --param …`), followed along `embeds`
    /// as a row change's key is. `params[i]` is parameter `i` of the key:
    /// `Some(None)` NULL or absent, `None` unknown (read back through a
    /// normaliser): an embedder that needs an unknown parameter has its
    /// namespace bumped, never skipped.
    pub(crate) fn operator_key(&self, cache: CacheId, key: String, params: &[Option<Option<Value>>]) -> Resolution {
        let mut out = Resolution::default();
        out.add(Effect::Key { cache, key }, Reason { path: Path::new(), cause: Cause::Operator });
        for &dep_id in &self.graph.cache(cache).embedded_by {
            let dep = self.graph.dependency(dep_id);
            let needed: SmallVec<[usize; 4]> = match &dep.mapping {
                Mapping::Params(indexes) => indexes.iter().copied().collect(),
                Mapping::Lookup(Lookup { arg: LookupArg::Param(i), .. }) => smallvec::smallvec![*i],
                _ => SmallVec::new(),
            };
            if let Some(&i) = needed.iter().find(|&&i| params.get(i).is_none_or(Option::is_none)) {
                let param = self.graph.cache(cache).template.params().get(i).cloned().unwrap_or_else(|| "?".into());
                let path: Path = smallvec::smallvec![dep_id];
                self.bump(dep.cache, path, Cause::OperatorUnknownParam { param }, &mut out);
                continue;
            }
            let known: SmallVec<[Option<&Value>; 8]> =
                params.iter().map(|p| p.as_ref().and_then(Option::as_ref)).collect();
            self.follow_embedder(dep_id, &known, &Path::new(), Cause::Operator, Image::New, &mut out);
        }
        out
    }

    /// An operator's invalidation of every key of `cache` (`evictd
    /// invalidate --cache … --all`): its namespace bump and, as every bump,
    /// its embedders'.
    pub(crate) fn operator_cache(&self, cache: CacheId) -> Resolution {
        let mut out = Resolution::default();
        self.bump(cache, Path::new(), Cause::Operator, &mut out);
        out
    }

    /// An operator's invalidation of tag `tag`, named by `cache`'s tag
    /// dependencies (`evictd invalidate --tag`): as a row change's tag is,
    /// the keys are found by the sink in the tag's registry.
    pub(crate) fn operator_tag(&self, cache: CacheId, tag: String) -> Resolution {
        let mut out = Resolution::default();
        out.add(Effect::Tag { cache, tag }, Reason { path: Path::new(), cause: Cause::Operator });
        out
    }

    /// Whether an update touches one of the dependency's filter columns, or
    /// one of the columns its keys, tags or look-up read: a key-column move
    /// always invalidates, whatever the filter says.
    fn passes_filter(&self, change: &Change, table: TableId, dep: DepId) -> bool {
        let dep = self.graph.dependency(dep);
        let Some(filter) = &dep.filter else {
            return true;
        };
        let table = self.graph.table(table);
        let changed = |column: &Arc<str>| column_changed(change, table.is_key(column), column);
        filter.iter().any(changed)
            || match &dep.mapping {
                Mapping::Columns(columns) => columns.iter().any(changed),
                Mapping::Tags(tags) => tags.iter().flat_map(|t| &t.columns).any(changed),
                Mapping::Lookup(lookup) => match &lookup.arg {
                    LookupArg::Column(column) => changed(column),
                    LookupArg::Param(_) => false,
                },
                Mapping::Params(_) => false,
            }
    }

    /// The value of `column` in one image of the change.
    fn cell<'c>(&self, change: &'c Change, table: TableId, column: &str, image: Image) -> &'c Cell {
        match image {
            Image::Old => {
                let old = change.old(column);
                if matches!(old, Cell::Unknown)
                    && change.op == Operation::Update
                    && self.graph.table(table).is_key(column)
                {
                    change.new_cell(column)
                } else {
                    old
                }
            }
            Image::New | Image::Both => {
                let new = change.new_cell(column);
                if matches!(new, Cell::Unknown) && change.op == Operation::Update { change.old(column) } else { new }
            }
        }
    }

    fn apply(&self, change: &Change, table: TableId, dep_id: DepId, image: Image, path: Path, out: &mut Resolution) {
        let dep = self.graph.dependency(dep_id);
        match &dep.mapping {
            Mapping::Columns(columns) => {
                let mut params: SmallVec<[Option<&Value>; 8]> = SmallVec::with_capacity(columns.len());
                for column in columns {
                    match self.cell(change, table, column, image) {
                        Cell::Known(v) => params.push(Some(v)),
                        Cell::Unknown => {
                            let cause = Cause::Unknown { column: column.clone(), image };
                            return self.bump(dep.cache, path, cause, out);
                        }
                    }
                }
                self.key(dep.cache, &params, path, Cause::Row(image), dep_id, image, out);
            }
            Mapping::Tags(tags) => {
                for tag in tags {
                    let mut params: SmallVec<[Option<&Value>; 8]> = SmallVec::with_capacity(tag.columns.len());
                    for column in &tag.columns {
                        match self.cell(change, table, column, image) {
                            Cell::Known(v) => params.push(Some(v)),
                            Cell::Unknown => {
                                let cause = Cause::Unknown { column: column.clone(), image };
                                return self.bump(dep.cache, path, cause, out);
                            }
                        }
                    }
                    match tag.template.render(&params) {
                        Ok(rendered) => out.add(
                            Effect::Tag { cache: dep.cache, tag: rendered },
                            Reason { path: path.clone(), cause: Cause::Row(image) },
                        ),
                        Err(e) => out.skipped.push(Skip::Null { dependency: dep_id, name: render_param(e), image }),
                    }
                }
            }
            Mapping::Lookup(lookup) => {
                let LookupArg::Column(column) = &lookup.arg else {
                    return;
                };
                match self.cell(change, table, column, image) {
                    Cell::Known(Value::Null) => {
                        out.skipped.push(Skip::Null { dependency: dep_id, name: column.clone(), image });
                    }
                    Cell::Known(v) => out.lookup(LookupRequest { dependency: dep_id, arg: v.clone(), path }),
                    Cell::Unknown => {
                        let cause = Cause::Unknown { column: column.clone(), image };
                        self.bump(dep.cache, path, cause, out);
                    }
                }
            }
            // Embeds dependencies are followed from the embedded cache's
            // effects, never triggered by a table.
            Mapping::Params(_) => {}
        }
    }

    /// Renders a key of `cache` from its parameters, then follows `embeds`.
    #[allow(clippy::too_many_arguments)]
    fn key(
        &self,
        cache: CacheId,
        params: &[Option<&Value>],
        path: Path,
        cause: Cause,
        dep: DepId,
        image: Image,
        out: &mut Resolution,
    ) {
        let template = &self.graph.cache(cache).template;
        match template.render(params) {
            Ok(key) => {
                out.add(Effect::Key { cache, key }, Reason { path: path.clone(), cause: cause.clone() });
                self.follow_embedders(cache, params, &path, cause, image, out);
            }
            Err(e) => out.skipped.push(Skip::Null { dependency: dep, name: render_param(e), image }),
        }
    }

    fn follow_embedders(
        &self,
        cache: CacheId,
        params: &[Option<&Value>],
        path: &Path,
        cause: Cause,
        image: Image,
        out: &mut Resolution,
    ) {
        for &dep_id in &self.graph.cache(cache).embedded_by {
            self.follow_embedder(dep_id, params, path, cause.clone(), image, out);
        }
    }

    /// Follows one `embeds` dependency from a key of the cache it embeds.
    fn follow_embedder(
        &self,
        dep_id: DepId,
        params: &[Option<&Value>],
        path: &Path,
        cause: Cause,
        image: Image,
        out: &mut Resolution,
    ) {
        let dep = self.graph.dependency(dep_id);
        let mut next_path = path.clone();
        next_path.push(dep_id);
        match &dep.mapping {
            Mapping::Params(indexes) => {
                let next: SmallVec<[Option<&Value>; 8]> =
                    indexes.iter().map(|&i| params.get(i).copied().flatten()).collect();
                self.key(dep.cache, &next, next_path, cause, dep_id, image, out);
            }
            Mapping::Lookup(lookup) => {
                if let LookupArg::Param(i) = lookup.arg {
                    match params.get(i).copied().flatten() {
                        Some(v) if !v.is_null() => {
                            out.lookup(LookupRequest { dependency: dep_id, arg: v.clone(), path: next_path });
                        }
                        _ => {}
                    }
                }
            }
            Mapping::Columns(_) | Mapping::Tags(_) => {}
        }
    }

    /// Bumps a cache's namespace and, transitively, every embedder's.
    fn bump(&self, cache: CacheId, path: Path, cause: Cause, out: &mut Resolution) {
        for &dep_id in &self.graph.cache(cache).embedded_by {
            let mut next = path.clone();
            next.push(dep_id);
            let embedder = self.graph.dependency(dep_id).cache;
            self.bump(embedder, next, Cause::EmbeddedBump, out);
        }
        out.add(Effect::NamespaceBump { cache }, Reason { path, cause });
    }
}

fn render_param(e: crate::key::RenderError) -> Arc<str> {
    match e {
        crate::key::RenderError::Missing(n) | crate::key::RenderError::Null(n) => n,
    }
}

/// Whether an update changed `column`: unknown old ⇒ changed (identity
/// columns excepted); unknown new (unchanged TOAST) ⇒ unchanged.
fn column_changed(change: &Change, is_key: bool, column: &str) -> bool {
    match (change.old(column), change.new_cell(column)) {
        (_, Cell::Unknown) => false,
        (Cell::Unknown, _) => !is_key,
        (Cell::Known(a), Cell::Known(b)) => a != b,
    }
}

/// Renders a reason's path as `shop.products ─direct[name]→ product_detail ─embeds→ page`.
pub(crate) struct PathDisplay<'a> {
    pub(crate) graph: &'a Graph,
    pub(crate) path: &'a Path,
}

impl fmt::Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &dep_id) in self.path.iter().enumerate() {
            let dep = self.graph.dependency(dep_id);
            if i == 0 {
                match dep.trigger {
                    Trigger::Table(t) => f.write_str(&self.graph.table(t).name)?,
                    Trigger::Embeds(c) => f.write_str(&self.graph.cache(c).name)?,
                }
            }
            let kind = dep.mapping.kind(dep.trigger);
            match &dep.filter {
                Some(cols) => {
                    let cols: Vec<&str> = cols.iter().map(|c| &**c).collect();
                    write!(f, " ─{kind}[{}]→ ", cols.join(","))?;
                }
                None => write!(f, " ─{kind}→ ")?,
            }
            f.write_str(&self.graph.cache(dep.cache).name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
