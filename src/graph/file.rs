//! The on-disk form of a graph file, exactly as TOML deserialises it, with
//! the span of every value so that validation can point at it. Nothing here
//! is checked beyond TOML types and field names: `load` validates.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

/// `Spanned` string list.
pub(crate) type Names = Vec<Spanned<String>>;

/// One `dependency-graphs/*.toml` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GraphFile {
    #[serde(default)]
    pub(crate) tables: BTreeMap<Spanned<String>, Spanned<TableSpec>>,
    #[serde(default)]
    pub(crate) caches: BTreeMap<Spanned<String>, Spanned<CacheSpec>>,
}

/// `[tables."schema.table"]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TableSpec {
    /// Identity columns: the table's replica identity (primary key).
    pub(crate) key: Spanned<Names>,
    /// Every column the graph may reference.
    pub(crate) columns: Spanned<Names>,
}

/// `[caches.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheSpec {
    pub(crate) key: Spanned<String>,
    pub(crate) description: Option<String>,
    pub(crate) action: Option<Spanned<String>>,
    pub(crate) redelete_after_ms: Option<Spanned<u64>>,
    pub(crate) broadcast: Option<bool>,
    pub(crate) fanout_limit: Option<Spanned<u64>>,
    pub(crate) expire_after_ms: Option<Spanned<u64>>,
    pub(crate) expire_jitter_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub(crate) depends: Vec<Spanned<DependencySpec>>,
}

/// `[[caches.NAME.depends]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DependencySpec {
    pub(crate) table: Option<Spanned<String>>,
    pub(crate) embeds: Option<Spanned<String>>,
    pub(crate) bind: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    pub(crate) lookup: Option<Spanned<LookupSpec>>,
    pub(crate) tags: Option<Spanned<Names>>,
    pub(crate) columns: Option<Spanned<Names>>,
}

/// `lookup = { query = "...", arg = "..." }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LookupSpec {
    pub(crate) query: Spanned<String>,
    pub(crate) arg: Spanned<String>,
    pub(crate) timeout_ms: Option<Spanned<u64>>,
}
