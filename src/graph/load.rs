//! Loading and validating graph files into a [`Graph`].
//!
//! Every problem is reported, not just the first, each as a [`GraphError`]
//! naming the file, the line and column, and the field
//! (`caches.product_detail.depends[1].bind.id`), sorted by place. Loading is
//! all or nothing: a graph with any error is not built.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use petgraph::algo::tarjan_scc;
use petgraph::graph::DiGraph;
use serde_spanned::Spanned;

use super::checks::{cycle_message, is_qualified, list, plain_toml_message, query_parameters};
use super::file::{CacheSpec, DependencySpec, GraphFile, LookupSpec, Names, TableSpec};
use super::{
    Action, Cache, CacheId, CacheOptions, DEFAULT_FANOUT_LIMIT, DepId, Dependency, Graph, Lookup, LookupArg, Mapping,
    Table, TableId, TagTemplate, Trigger,
};
use crate::diagnostic::{Location, SourceFile, path_key, string_offset, write_lines};
use crate::key::KeyTemplate;

/// One problem in the graph files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    /// Where; `None` for problems with a path as a whole (unreadable).
    pub(crate) location: Option<Location>,
    /// The dotted field path, when the problem is about one field.
    pub(crate) field: Option<String>,
    pub(crate) message: String,
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.location {
            write!(f, "{location}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found, in file and line order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct GraphErrors(pub Vec<GraphError>);

impl fmt::Display for GraphErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lines(f, &self.0)
    }
}

/// Loads every path (a file, or a directory whose `*.toml` files are read in
/// name order) into one graph.
pub fn load_paths(paths: &[PathBuf]) -> Result<Graph, GraphErrors> {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    for path in paths {
        match graph_files(path) {
            Ok(files) => {
                for file in files {
                    match std::fs::read_to_string(&file) {
                        Ok(text) => sources.push(SourceFile::new(file, text)),
                        Err(e) => errors.push(plain(format!("cannot read {}: {e}", file.display()))),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(GraphErrors(errors));
    }
    load_sources(&sources)
}

/// Loads already-read files into one graph.
pub fn load_sources(sources: &[SourceFile]) -> Result<Graph, GraphErrors> {
    let mut loader = Loader::default();
    let mut parsed = Vec::new();
    for source in sources {
        match toml::from_str::<GraphFile>(&source.text) {
            Ok(file) => parsed.push((source, file)),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let field = source.field_at(span.start);
                let message = plain_toml_message(e.message(), field.as_deref());
                loader.errors.push(GraphError { location: Some(source.location(span.start)), field, message });
            }
        }
    }
    // Cross-file checks against a file that did not parse would only mislead
    // (its tables would look undeclared): report the syntax first.
    if !loader.errors.is_empty() {
        return loader.finish(sources);
    }
    for (source, file) in &parsed {
        for (name, spec) in &file.tables {
            loader.table(source, name, spec);
        }
    }
    for (source, file) in &parsed {
        for (name, spec) in &file.caches {
            loader.cache(source, name, spec);
        }
    }
    for (source, file) in &parsed {
        for (name, spec) in &file.caches {
            // Only the declaration that was registered: a duplicate or an
            // invalid cache has had its error already.
            if let Some(&cache) = loader.declared_caches.get(&(source.path.clone(), name.span().start)) {
                for (i, dep) in spec.get_ref().depends.iter().enumerate() {
                    loader.dependency(source, cache, name.get_ref(), i, dep);
                }
                if spec.get_ref().depends.is_empty() {
                    loader.error(
                        source,
                        name.span(),
                        format!("caches.{}", path_key(name.get_ref())),
                        format!("cache `{}` has no `depends`: nothing would ever invalidate it", name.get_ref()),
                    );
                }
            }
        }
    }
    loader.check_cycles();
    loader.finish(sources)
}

fn plain(message: String) -> GraphError {
    GraphError { location: None, field: None, message }
}

fn graph_files(path: &Path) -> Result<Vec<PathBuf>, GraphError> {
    let meta = std::fs::metadata(path).map_err(|e| plain(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries =
        std::fs::read_dir(path).map_err(|e| plain(format!("cannot read directory {}: {e}", path.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(plain(format!("no graph files (*.toml) in {}", path.display())));
    }
    Ok(files)
}

#[derive(Default)]
struct Loader {
    errors: Vec<GraphError>,
    tables: Vec<Table>,
    table_index: HashMap<Arc<str>, TableId>,
    caches: Vec<Cache>,
    cache_index: HashMap<String, CacheId>,
    dependencies: Vec<Dependency>,
    /// The cache registered for each declaration (file, name offset).
    declared_caches: HashMap<(Arc<Path>, usize), CacheId>,
    /// Names declared with errors: references to them are not reported again.
    broken_tables: HashSet<String>,
    broken_caches: HashSet<String>,
}

/// File offset of byte `offset` of the string value at `span`.
fn inside_string(source: &SourceFile, span: &Range<usize>, offset: usize) -> usize {
    string_offset(&source.text, span.start, offset)
}

impl Loader {
    fn error(&mut self, source: &SourceFile, span: Range<usize>, field: String, message: String) {
        self.errors.push(GraphError { location: Some(source.location(span.start)), field: Some(field), message });
    }

    fn table(&mut self, source: &SourceFile, name: &Spanned<String>, spec: &Spanned<TableSpec>) {
        let field = format!("tables.{}", path_key(name.get_ref()));
        let spec = spec.get_ref();
        let table_name = name.get_ref().as_str();
        let before = self.errors.len();
        if !is_qualified(table_name) {
            self.error(
                source,
                name.span(),
                field.clone(),
                format!("table name `{table_name}` must be `schema.table`: a schema, one dot, a table"),
            );
        }
        if let Some(&existing) = self.table_index.get(table_name) {
            let at = self.tables[existing.0].location.clone();
            self.error(source, name.span(), field.clone(), format!("table `{table_name}` is already declared at {at}"));
        }
        let columns = self.name_list(source, &spec.columns, &format!("{field}.columns"), "column");
        if spec.columns.get_ref().is_empty() {
            self.error(
                source,
                spec.columns.span(),
                format!("{field}.columns"),
                "a table needs at least one column".into(),
            );
        }
        let key = self.name_list(source, &spec.key, &format!("{field}.key"), "key column");
        if spec.key.get_ref().is_empty() {
            self.error(source, spec.key.span(), format!("{field}.key"), "a table needs at least one key column".into());
        }
        for (i, k) in spec.key.get_ref().iter().enumerate() {
            if !k.get_ref().is_empty() && !columns.iter().any(|c| **c == **k.get_ref()) && !columns.is_empty() {
                self.error(
                    source,
                    k.span(),
                    format!("{field}.key[{i}]"),
                    format!("key column `{}` is not among the table's columns ({})", k.get_ref(), list(&columns)),
                );
            }
        }
        if self.errors.len() > before {
            self.broken_tables.insert(table_name.to_owned());
            return;
        }
        let id = TableId(self.tables.len());
        let location = source.location(name.span().start);
        let name: Arc<str> = Arc::from(table_name);
        self.table_index.insert(name.clone(), id);
        self.tables.push(Table { name, key, columns, location, dependents: Vec::new() });
    }

    /// Reads a list of names, reporting empty and repeated entries.
    fn name_list(&mut self, source: &SourceFile, names: &Spanned<Names>, field: &str, what: &str) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        for (i, n) in names.get_ref().iter().enumerate() {
            let name = n.get_ref().as_str();
            if name.is_empty() {
                self.error(source, n.span(), format!("{field}[{i}]"), format!("empty {what} name"));
            } else if out.iter().any(|c| &**c == name) {
                self.error(source, n.span(), format!("{field}[{i}]"), format!("{what} `{name}` is listed twice"));
            } else {
                out.push(Arc::from(name));
            }
        }
        out
    }

    fn cache(&mut self, source: &SourceFile, name: &Spanned<String>, spec: &Spanned<CacheSpec>) {
        let cache_name = name.get_ref().as_str();
        let field = format!("caches.{}", path_key(cache_name));
        let spec = spec.get_ref();
        let before = self.errors.len();
        let valid_name = !cache_name.is_empty()
            && cache_name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_name {
            self.error(
                source,
                name.span(),
                field.clone(),
                format!("cache name `{cache_name}` must use lowercase letters, digits and `_` only"),
            );
        }
        if let Some(&existing) = self.cache_index.get(cache_name) {
            let at = self.caches[existing.0].location.clone();
            self.error(source, name.span(), field.clone(), format!("cache `{cache_name}` is already declared at {at}"));
        }
        let template = match KeyTemplate::parse(spec.key.get_ref()) {
            Ok(t) => Some(t),
            Err(e) => {
                let at = inside_string(source, &spec.key.span(), e.offset);
                self.error(
                    source,
                    at..at,
                    format!("{field}.key"),
                    format!("{} in key template `{}`", e.message, spec.key.get_ref()),
                );
                None
            }
        };
        let options = self.options(source, &field, spec);
        let (Some(template), Some(options)) = (template, options) else {
            self.broken_caches.insert(cache_name.to_owned());
            return;
        };
        if self.errors.len() > before {
            if !self.cache_index.contains_key(cache_name) {
                self.broken_caches.insert(cache_name.to_owned());
            }
            return;
        }
        let id = CacheId(self.caches.len());
        self.cache_index.insert(cache_name.to_owned(), id);
        self.declared_caches.insert((source.path.clone(), name.span().start), id);
        self.caches.push(Cache {
            name: Arc::from(cache_name),
            template,
            description: spec.description.clone(),
            options,
            location: source.location(name.span().start),
            dependencies: Vec::new(),
            embedded_by: Vec::new(),
        });
    }

    fn options(&mut self, source: &SourceFile, field: &str, spec: &CacheSpec) -> Option<CacheOptions> {
        let before = self.errors.len();
        let action = match &spec.action {
            None => Action::Delete,
            Some(a) => match a.get_ref().as_str() {
                "delete" => Action::Delete,
                "bump" => Action::Bump,
                "expire" => Action::Expire,
                other => {
                    self.error(
                        source,
                        a.span(),
                        format!("{field}.action"),
                        format!("unknown action `{other}` (expected delete, bump or expire)"),
                    );
                    Action::Delete
                }
            },
        };
        if let Some(r) = &spec.redelete_after_ms {
            if action != Action::Delete {
                self.error(
                    source,
                    r.span(),
                    format!("{field}.redelete_after_ms"),
                    "`redelete_after_ms` applies only to action = \"delete\"".into(),
                );
            } else if *r.get_ref() == 0 {
                self.error(
                    source,
                    r.span(),
                    format!("{field}.redelete_after_ms"),
                    "must be greater than 0 (leave it out for no second delete)".into(),
                );
            }
        }
        for (name, value) in [("expire_after_ms", &spec.expire_after_ms), ("expire_jitter_ms", &spec.expire_jitter_ms)]
        {
            if let Some(v) = value
                && action != Action::Expire
            {
                self.error(
                    source,
                    v.span(),
                    format!("{field}.{name}"),
                    format!("`{name}` applies only to action = \"expire\""),
                );
            }
        }
        if action == Action::Expire {
            match &spec.expire_after_ms {
                None => {
                    let span = spec.action.as_ref().map_or(spec.key.span(), |a| a.span());
                    self.error(
                        source,
                        span,
                        format!("{field}.action"),
                        "action = \"expire\" needs `expire_after_ms`".into(),
                    );
                }
                Some(v) if *v.get_ref() == 0 => {
                    self.error(source, v.span(), format!("{field}.expire_after_ms"), "must be greater than 0".into());
                }
                Some(_) => {}
            }
        }
        if let Some(f) = &spec.fanout_limit
            && *f.get_ref() == 0
        {
            self.error(source, f.span(), format!("{field}.fanout_limit"), "must be at least 1".into());
        }
        if self.errors.len() > before {
            return None;
        }
        Some(CacheOptions {
            action,
            redelete_after_ms: spec.redelete_after_ms.as_ref().map(|v| *v.get_ref()),
            broadcast: spec.broadcast.unwrap_or(true),
            fanout_limit: spec.fanout_limit.as_ref().map_or(DEFAULT_FANOUT_LIMIT, |v| *v.get_ref()),
            expire_after_ms: spec.expire_after_ms.as_ref().map(|v| *v.get_ref()),
            expire_jitter_ms: spec.expire_jitter_ms.as_ref().map_or(0, |v| *v.get_ref()),
        })
    }

    fn dependency(
        &mut self,
        source: &SourceFile,
        cache: CacheId,
        cache_name: &str,
        index: usize,
        dep: &Spanned<DependencySpec>,
    ) {
        let field = format!("caches.{}.depends[{index}]", path_key(cache_name));
        let span = dep.span();
        let spec = dep.get_ref();
        let before = self.errors.len();
        let trigger = match (&spec.table, &spec.embeds) {
            (Some(_), Some(e)) => {
                self.error(
                    source,
                    e.span(),
                    format!("{field}.embeds"),
                    "a dependency takes either `table` or `embeds`, not both".into(),
                );
                return;
            }
            (None, None) => {
                self.error(
                    source,
                    span,
                    field,
                    "a dependency needs `table` (a row change) or `embeds` (another cache)".into(),
                );
                return;
            }
            (Some(t), None) => match self.table_index.get(t.get_ref().as_str()) {
                Some(&id) => Trigger::Table(id),
                None if self.broken_tables.contains(t.get_ref().as_str()) => return,
                None => {
                    let mut known: Vec<Arc<str>> = self.tables.iter().map(|t| t.name.clone()).collect();
                    known.sort();
                    self.error(
                        source,
                        t.span(),
                        format!("{field}.table"),
                        format!("unknown table `{}` (declared: {})", t.get_ref(), list(&known)),
                    );
                    return;
                }
            },
            (None, Some(e)) => match self.cache_index.get(e.get_ref().as_str()) {
                Some(&id) => Trigger::Embeds(id),
                None if self.broken_caches.contains(e.get_ref().as_str()) => return,
                None => {
                    let mut known: Vec<Arc<str>> = self.caches.iter().map(|c| c.name.clone()).collect();
                    known.sort();
                    let message = format!("unknown cache `{}` (declared: {})", e.get_ref(), list(&known));
                    self.error(source, e.span(), format!("{field}.embeds"), message);
                    return;
                }
            },
        };
        let given: Vec<(&str, Range<usize>)> = [
            spec.bind.as_ref().map(|b| ("bind", b.span())),
            spec.lookup.as_ref().map(|l| ("lookup", l.span())),
            spec.tags.as_ref().map(|t| ("tags", t.span())),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let [first, second, ..] = given.as_slice() {
            let message = format!(
                "`{}` and `{}` both given: a dependency takes one of `bind`, `lookup` and `tags`",
                first.0, second.0
            );
            self.error(source, second.1.clone(), format!("{field}.{}", second.0), message);
            return;
        }
        let filter = match (&spec.columns, trigger) {
            (None, _) => None,
            (Some(cols), Trigger::Embeds(_)) => {
                self.error(
                    source,
                    cols.span(),
                    format!("{field}.columns"),
                    "`columns` filters row changes: it needs `table`, not `embeds`".into(),
                );
                None
            }
            (Some(cols), Trigger::Table(t)) => {
                let names = self.name_list(source, cols, &format!("{field}.columns"), "column");
                for (i, c) in cols.get_ref().iter().enumerate() {
                    if !c.get_ref().is_empty() {
                        self.check_column(source, t, c, format!("{field}.columns[{i}]"));
                    }
                }
                if names.is_empty() {
                    self.error(
                        source,
                        cols.span(),
                        format!("{field}.columns"),
                        "an empty column filter would ignore every update; leave `columns` out instead".into(),
                    );
                }
                Some(names)
            }
        };
        let mapping = if let Some(tags) = &spec.tags {
            match trigger {
                Trigger::Table(t) => self.tags(source, t, tags, &field),
                Trigger::Embeds(_) => {
                    self.error(
                        source,
                        tags.span(),
                        format!("{field}.tags"),
                        "`tags` are rendered from a row: they need `table`, not `embeds`".into(),
                    );
                    None
                }
            }
        } else if let Some(lookup) = &spec.lookup {
            self.lookup(source, trigger, lookup, &format!("{field}.lookup"))
        } else {
            self.bind(source, cache, trigger, spec, span.clone(), &field)
        };
        let Some(mapping) = mapping else { return };
        if self.errors.len() > before {
            return;
        }
        let id = DepId(self.dependencies.len());
        match trigger {
            Trigger::Table(t) => self.tables[t.0].dependents.push(id),
            Trigger::Embeds(c) => self.caches[c.0].embedded_by.push(id),
        }
        self.caches[cache.0].dependencies.push(id);
        let at = spec.table.as_ref().or(spec.embeds.as_ref()).map_or(span.start, |s| s.span().start);
        self.dependencies.push(Dependency {
            id,
            cache,
            trigger,
            mapping,
            filter,
            location: source.location(at),
            field,
        });
    }

    fn check_column(&mut self, source: &SourceFile, table: TableId, column: &Spanned<String>, field: String) -> bool {
        let t = &self.tables[table.0];
        if t.has_column(column.get_ref()) {
            return true;
        }
        let message =
            format!("unknown column `{}` in table `{}` (columns: {})", column.get_ref(), t.name, list(&t.columns));
        self.error(source, column.span(), field, message);
        false
    }

    fn tags(&mut self, source: &SourceFile, table: TableId, tags: &Spanned<Names>, field: &str) -> Option<Mapping> {
        if tags.get_ref().is_empty() {
            self.error(source, tags.span(), format!("{field}.tags"), "`tags` needs at least one tag template".into());
            return None;
        }
        let mut out = Vec::new();
        for (i, tag) in tags.get_ref().iter().enumerate() {
            let tag_field = format!("{field}.tags[{i}]");
            let template = match KeyTemplate::parse(tag.get_ref()) {
                Ok(t) => t,
                Err(e) => {
                    let at = inside_string(source, &tag.span(), e.offset);
                    self.error(source, at..at, tag_field, format!("{} in tag template `{}`", e.message, tag.get_ref()));
                    continue;
                }
            };
            let mut columns = Vec::new();
            for param in template.params() {
                let t = &self.tables[table.0];
                if t.has_column(param) {
                    columns.push(param.clone());
                } else {
                    let message = format!(
                        "tag placeholder `{param}` is not a column of `{}` (tag placeholders name columns of the changed row; columns: {})",
                        t.name,
                        list(&t.columns)
                    );
                    self.error(source, tag.span(), tag_field.clone(), message);
                }
            }
            out.push(TagTemplate { template, columns });
        }
        Some(Mapping::Tags(out))
    }

    fn lookup(
        &mut self,
        source: &SourceFile,
        trigger: Trigger,
        lookup: &Spanned<LookupSpec>,
        field: &str,
    ) -> Option<Mapping> {
        let spec = lookup.get_ref();
        let query = spec.query.get_ref();
        let before = self.errors.len();
        let parameters = query_parameters(query);
        if let Some((offset, other)) = parameters.iter().find(|(_, p)| p != "$1") {
            let at = inside_string(source, &spec.query.span(), *offset);
            let message = format!("the query uses `{other}`: only `$1`, the array of `arg` values, is bound");
            self.error(source, at..at, format!("{field}.query"), message);
        } else if parameters.is_empty() {
            let message = "the query must use `$1`, the array of `arg` values, as in `WHERE id = ANY($1)`";
            self.error(source, spec.query.span(), format!("{field}.query"), message.into());
        }
        if let Some(t) = &spec.timeout_ms
            && *t.get_ref() == 0
        {
            self.error(source, t.span(), format!("{field}.timeout_ms"), "must be greater than 0".into());
        }
        let arg = match trigger {
            Trigger::Table(t) => {
                self.check_column(source, t, &spec.arg, format!("{field}.arg"));
                LookupArg::Column(Arc::from(spec.arg.get_ref().as_str()))
            }
            Trigger::Embeds(c) => {
                let embedded = &self.caches[c.0];
                match embedded.template.param_index(spec.arg.get_ref()) {
                    Some(i) => LookupArg::Param(i),
                    None => {
                        let message = format!(
                            "`{}` is not a placeholder of the embedded cache `{}` (`{}`; placeholders: {})",
                            spec.arg.get_ref(),
                            embedded.name,
                            embedded.template,
                            list(embedded.template.params())
                        );
                        self.error(source, spec.arg.span(), format!("{field}.arg"), message);
                        return None;
                    }
                }
            }
        };
        if self.errors.len() > before {
            return None;
        }
        Some(Mapping::Lookup(Lookup {
            query: query.clone(),
            arg,
            timeout_ms: spec.timeout_ms.as_ref().map(|t| *t.get_ref()),
        }))
    }

    fn bind(
        &mut self,
        source: &SourceFile,
        cache: CacheId,
        trigger: Trigger,
        spec: &DependencySpec,
        span: Range<usize>,
        field: &str,
    ) -> Option<Mapping> {
        let template = self.caches[cache.0].template.clone();
        let empty = BTreeMap::new();
        let bind = spec.bind.as_ref().map_or(&empty, |b| b.get_ref());
        let before = self.errors.len();
        for placeholder in bind.keys() {
            if template.param_index(placeholder.get_ref()).is_none() {
                let message = format!(
                    "`{}` is not a placeholder of the key template `{}` (placeholders: {})",
                    placeholder.get_ref(),
                    template,
                    list(template.params())
                );
                self.error(
                    source,
                    placeholder.span(),
                    format!("{field}.bind.{}", path_key(placeholder.get_ref())),
                    message,
                );
            }
        }
        let unbound_span = spec.bind.as_ref().map_or(span, |b| b.span());
        let unbound_field = if spec.bind.is_some() { format!("{field}.bind") } else { field.to_owned() };
        let mut columns = Vec::new();
        let mut params = Vec::new();
        for param in template.params() {
            let explicit = bind.iter().find(|(k, _)| **k.get_ref() == **param).map(|(_, v)| v);
            let source_name = explicit.map_or(param.to_string(), |v| v.get_ref().clone());
            let item_field = format!("{field}.bind.{}", path_key(param));
            match trigger {
                Trigger::Table(t) => {
                    let table = &self.tables[t.0];
                    if table.has_column(&source_name) {
                        columns.push(Arc::from(source_name.as_str()));
                    } else if let Some(v) = explicit {
                        self.check_column(source, t, v, item_field);
                    } else {
                        let message = format!(
                            "placeholder `{param}` of `{template}` is not bound: add `{param} = \"<column>\"` to `bind` (table `{}` has no column `{param}`)",
                            table.name
                        );
                        self.error(source, unbound_span.clone(), unbound_field.clone(), message);
                    }
                }
                Trigger::Embeds(c) => {
                    let embedded = &self.caches[c.0];
                    match embedded.template.param_index(&source_name) {
                        Some(i) => params.push(i),
                        None => {
                            let (at, f, message) = match explicit {
                                Some(v) => (
                                    v.span(),
                                    item_field,
                                    format!(
                                        "`{source_name}` is not a placeholder of the embedded cache `{}` (`{}`; placeholders: {})",
                                        embedded.name,
                                        embedded.template,
                                        list(embedded.template.params())
                                    ),
                                ),
                                None => (
                                    unbound_span.clone(),
                                    unbound_field.clone(),
                                    format!(
                                        "placeholder `{param}` of `{template}` is not bound: the embedded cache `{}` (`{}`) has no placeholder `{param}`; add `{param} = \"<placeholder of {}>\"` to `bind`, or use `lookup`",
                                        embedded.name, embedded.template, embedded.name
                                    ),
                                ),
                            };
                            self.error(source, at, f, message);
                        }
                    }
                }
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(match trigger {
            Trigger::Table(_) => Mapping::Columns(columns),
            Trigger::Embeds(_) => Mapping::Params(params),
        })
    }

    /// Reports every cycle among `embeds` edges, at one dependency of it.
    fn check_cycles(&mut self) {
        let mut embeds: DiGraph<CacheId, DepId> = DiGraph::new();
        let nodes: Vec<_> = (0..self.caches.len()).map(|i| embeds.add_node(CacheId(i))).collect();
        for dep in &self.dependencies {
            if let Trigger::Embeds(embedded) = dep.trigger {
                embeds.add_edge(nodes[embedded.0], nodes[dep.cache.0], dep.id);
            }
        }
        for component in tarjan_scc(&embeds) {
            let self_loop = component.len() == 1 && embeds.find_edge(component[0], component[0]).is_some();
            if component.len() < 2 && !self_loop {
                continue;
            }
            // Walk the cycle from its first-declared cache so the message is stable.
            let members: Vec<CacheId> = component.iter().map(|n| embeds[*n]).collect();
            let Some(&start) = members.iter().min() else {
                continue;
            };
            let mut path = vec![start];
            let mut current = start;
            let mut first_dep = None;
            loop {
                // The next cache in the cycle: one that embeds `current`.
                let next = self.caches[current.0]
                    .embedded_by
                    .iter()
                    .map(|d| &self.dependencies[d.0])
                    .filter(|d| members.contains(&d.cache))
                    .min_by_key(|d| d.cache);
                let Some(dep) = next else { break };
                first_dep.get_or_insert(dep.id);
                current = dep.cache;
                path.push(current);
                if current == start || path.len() > members.len() + 1 {
                    break;
                }
            }
            let Some(dep) = first_dep.map(|d| self.dependencies[d.0].clone()) else {
                continue;
            };
            let names: Vec<&str> = path.iter().map(|c| &*self.caches[c.0].name).collect();
            self.errors.push(GraphError {
                location: Some(dep.location.clone()),
                field: Some(format!("{}.embeds", dep.field)),
                message: cycle_message(&names),
            });
        }
    }

    fn finish(mut self, sources: &[SourceFile]) -> Result<Graph, GraphErrors> {
        if !self.errors.is_empty() {
            self.errors.sort_by(|a, b| a.location.cmp(&b.location).then_with(|| a.message.cmp(&b.message)));
            self.errors.dedup();
            return Err(GraphErrors(self.errors));
        }
        let mut graph = Graph {
            tables: self.tables,
            caches: self.caches,
            dependencies: self.dependencies,
            table_index: self.table_index,
            cache_index: self.cache_index.into_iter().map(|(k, v)| (Arc::from(k.as_str()), v)).collect(),
            view: DiGraph::new(),
            files: sources.iter().map(|s| s.location(0)).collect(),
        };
        graph.build_view();
        Ok(graph)
    }
}
