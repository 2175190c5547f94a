//! The dependency graph: which tables a cache depends on, and how a row
//! change of a table becomes keys, tags or look-ups of a cache.
//!
//! Files in `dependency-graphs/` ([`file`]) are loaded and validated by
//! [`load`] into one [`Graph`]. The graph is immutable once built; its ids
//! are indexes, so the resolver follows them without hashing. A `petgraph`
//! view (tables and caches as nodes, dependencies as edges) serves cycle
//! detection and the `graph` command's DOT and JSON output ([`export`]).
//!
//! **Invariants** (established by `load`, relied on by `resolve`): every
//! placeholder of a cache's key is bound by each of its direct and embeds
//! dependencies; every column named anywhere is declared for its table;
//! `embeds` edges form no cycle; cache and table names are unique.

mod checks;
pub(crate) mod export;
pub(crate) mod file;
pub mod load;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::diagnostic::Location;
use crate::key::KeyTemplate;

pub use load::{GraphError, GraphErrors, load_paths};

/// Index of a table in [`Graph::tables`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TableId(pub usize);

/// Index of a cache in [`Graph::caches`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheId(pub usize);

/// Index of a dependency in [`Graph::dependencies`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct DepId(pub usize);

/// A table the graph listens to.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) name: Arc<str>,
    /// Identity columns. An update's old image that lacks one of them means
    /// it did not change (sources send old identity values only on change).
    pub(crate) key: Vec<Arc<str>>,
    pub(crate) columns: Vec<Arc<str>>,
    pub(crate) location: Location,
    /// Dependencies triggered by a row change of this table.
    pub(crate) dependents: Vec<DepId>,
}

impl Table {
    pub(crate) fn has_column(&self, column: &str) -> bool {
        self.columns.iter().any(|c| &**c == column)
    }

    pub(crate) fn is_key(&self, column: &str) -> bool {
        self.key.iter().any(|c| &**c == column)
    }
}

/// What evictd does to a stale key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Action {
    /// `UNLINK` the key.
    Delete,
    /// The key is a version key: raise it to the change's commit position.
    Bump,
    /// Set a short, jittered TTL instead of deleting.
    Expire,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Delete => "delete",
            Action::Bump => "bump",
            Action::Expire => "expire",
        }
    }
}

/// Per-cache options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheOptions {
    pub(crate) action: Action,
    /// Delayed second delete (action `delete` only).
    pub(crate) redelete_after_ms: Option<u64>,
    /// Publish this cache's invalidations to in-process caches.
    pub(crate) broadcast: bool,
    /// Look-up rows past which the cache's namespace is bumped instead.
    pub(crate) fanout_limit: u64,
    /// Action `expire`: base TTL and random extra.
    pub(crate) expire_after_ms: Option<u64>,
    pub(crate) expire_jitter_ms: u64,
}

/// Default of [`CacheOptions::fanout_limit`].
pub(crate) const DEFAULT_FANOUT_LIMIT: u64 = 10_000;

/// A cache: a key template, what to do when a key goes stale, and what it
/// depends on.
#[derive(Debug, Clone)]
pub struct Cache {
    pub name: Arc<str>,
    pub(crate) template: KeyTemplate,
    pub(crate) description: Option<String>,
    pub(crate) options: CacheOptions,
    pub(crate) location: Location,
    /// This cache's own dependencies.
    pub(crate) dependencies: Vec<DepId>,
    /// Dependencies of other caches that embed this one.
    pub(crate) embedded_by: Vec<DepId>,
}

/// What sets a dependency off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// A row change of a table.
    Table(TableId),
    /// An invalidation of another cache (this cache embeds it).
    Embeds(CacheId),
}

/// Where a look-up's `$1` values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupArg {
    /// A column of the changed row.
    Column(Arc<str>),
    /// A parameter (index) of the embedded cache's key.
    Param(usize),
}

/// A SQL look-up that yields the cache's key parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub query: String,
    pub arg: LookupArg,
    pub timeout_ms: Option<u64>,
}

/// A tag template and, for each of its parameters, the column it reads.
#[derive(Debug, Clone)]
pub(crate) struct TagTemplate {
    pub(crate) template: KeyTemplate,
    pub(crate) columns: Vec<Arc<str>>,
}

/// How a triggered dependency finds what to invalidate.
#[derive(Debug, Clone)]
pub(crate) enum Mapping {
    /// Direct: key parameter `i` is column `columns[i]` of the changed row.
    Columns(Vec<Arc<str>>),
    /// Embeds: key parameter `i` is parameter `params[i]` of the embedded key.
    Params(Vec<usize>),
    /// Look-up through SQL.
    Lookup(Lookup),
    /// Tags rendered from the changed row.
    Tags(Vec<TagTemplate>),
}

impl Mapping {
    pub(crate) fn kind(&self, trigger: Trigger) -> &'static str {
        match (self, trigger) {
            (Mapping::Columns(_), _) => "direct",
            (Mapping::Params(_), _) => "embeds",
            (Mapping::Lookup(_), Trigger::Table(_)) => "lookup",
            (Mapping::Lookup(_), Trigger::Embeds(_)) => "embeds+lookup",
            (Mapping::Tags(_), _) => "tags",
        }
    }
}

/// One declared dependency of a cache.
#[derive(Debug, Clone)]
pub(crate) struct Dependency {
    pub(crate) id: DepId,
    pub(crate) cache: CacheId,
    pub(crate) trigger: Trigger,
    pub(crate) mapping: Mapping,
    /// Column filter: an update that changes none of these is ignored.
    pub(crate) filter: Option<Vec<Arc<str>>>,
    pub(crate) location: Location,
    /// `caches.NAME.depends[i]`, for messages.
    pub(crate) field: String,
}

/// A node of the petgraph view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    Table(TableId),
    Cache(CacheId),
}

/// The loaded, validated dependency graph.
#[derive(Debug, Clone)]
pub struct Graph {
    tables: Vec<Table>,
    caches: Vec<Cache>,
    dependencies: Vec<Dependency>,
    table_index: HashMap<Arc<str>, TableId>,
    cache_index: HashMap<Arc<str>, CacheId>,
    view: DiGraph<Node, DepId>,
    files: Vec<Location>,
}

impl Graph {
    pub(crate) fn tables(&self) -> &[Table] {
        &self.tables
    }

    pub(crate) fn caches(&self) -> &[Cache] {
        &self.caches
    }

    pub(crate) fn dependencies(&self) -> &[Dependency] {
        &self.dependencies
    }

    pub(crate) fn table(&self, id: TableId) -> &Table {
        &self.tables[id.0]
    }

    pub fn cache(&self, id: CacheId) -> &Cache {
        &self.caches[id.0]
    }

    pub(crate) fn dependency(&self, id: DepId) -> &Dependency {
        &self.dependencies[id.0]
    }

    pub(crate) fn table_id(&self, name: &str) -> Option<TableId> {
        self.table_index.get(name).copied()
    }

    pub fn cache_id(&self, name: &str) -> Option<CacheId> {
        self.cache_index.get(name).copied()
    }

    /// The petgraph view: tables and caches as nodes, one edge per
    /// dependency from its trigger to its cache.
    pub(crate) fn view(&self) -> &DiGraph<Node, DepId> {
        &self.view
    }

    /// The files the graph was loaded from (line 1 of each).
    pub(crate) fn files(&self) -> &[Location] {
        &self.files
    }

    /// `caches` and every cache that embeds one of them, directly or
    /// through others: what a namespace bump of `caches` must also bump.
    pub(crate) fn with_embedders(&self, caches: impl IntoIterator<Item = CacheId>) -> BTreeSet<CacheId> {
        let mut out = BTreeSet::new();
        let mut todo: Vec<CacheId> = caches.into_iter().collect();
        while let Some(cache) = todo.pop() {
            if out.insert(cache) {
                todo.extend(self.caches[cache.0].embedded_by.iter().map(|d| self.dependencies[d.0].cache));
            }
        }
        out
    }

    fn build_view(&mut self) {
        let mut view = DiGraph::new();
        let tables: Vec<NodeIndex> = (0..self.tables.len()).map(|i| view.add_node(Node::Table(TableId(i)))).collect();
        let caches: Vec<NodeIndex> = (0..self.caches.len()).map(|i| view.add_node(Node::Cache(CacheId(i)))).collect();
        for dep in &self.dependencies {
            let from = match dep.trigger {
                Trigger::Table(t) => tables[t.0],
                Trigger::Embeds(c) => caches[c.0],
            };
            view.add_edge(from, caches[dep.cache.0], dep.id);
        }
        self.view = view;
    }
}
