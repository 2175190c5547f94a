//! The on-disk form of a graph file, exactly as TOML deserialises it, with
//! the span of every value so that validation can point at it. Nothing here
//! is checked beyond TOML types and field names: `load` validates.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

/// `Spanned` string list.
pub type Names = Vec<Spanned<String>>;

/// One `dependency-graphs/*.toml` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    #[serde(default)]
    pub tables: BTreeMap<Spanned<String>, Spanned<TableSpec>>,
    #[serde(default)]
    pub caches: BTreeMap<Spanned<String>, Spanned<CacheSpec>>,
}

/// `[tables."schema.table"]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// Identity columns: the table's replica identity (primary key).
    pub key: Spanned<Names>,
    /// Every column the graph may reference.
    pub columns: Spanned<Names>,
}

/// `[caches.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    pub key: Spanned<String>,
    pub description: Option<String>,
    pub action: Option<Spanned<String>>,
    pub redelete_after_ms: Option<Spanned<u64>>,
    pub broadcast: Option<bool>,
    pub fanout_limit: Option<Spanned<u64>>,
    pub expire_after_ms: Option<Spanned<u64>>,
    pub expire_jitter_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub depends: Vec<Spanned<DependencySpec>>,
}

/// `[[caches.NAME.depends]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependencySpec {
    pub table: Option<Spanned<String>>,
    pub embeds: Option<Spanned<String>>,
    pub bind: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    pub lookup: Option<Spanned<LookupSpec>>,
    pub tags: Option<Spanned<Names>>,
    pub columns: Option<Spanned<Names>>,
}

/// `lookup = { query = "...", arg = "..." }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    pub query: Spanned<String>,
    pub arg: Spanned<String>,
    pub timeout_ms: Option<Spanned<u64>>,
}
