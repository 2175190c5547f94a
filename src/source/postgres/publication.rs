//! The publication compared with the graph: is every change the graph
//! needs published, and under which name does it arrive?
//!
//! Membership alone is not enough. A publication can leave out operations
//! (`publish = 'insert, update'`), publish only some rows of a table (a
//! row filter, Postgres 15), only some columns (a column list, Postgres
//! 15), and send a partitioned table's changes under each leaf partition's
//! name, or (`publish_via_partition_root`) a partition's changes under its
//! ancestor's name. [`publication_report`] reads what the server says it
//! publishes (`pg_publication`, `pg_publication_tables`, the partition
//! tree) and [`assess`] decides, without I/O, what the graph would miss.
//!
//! Invariants:
//! - every hazard in [`PublicationReport::hazards`] is a change evictd would
//!   never see (or, for a column list, a value it would never see): `evictd
//!   run` refuses to start on any of them and `evictd check` reports the
//!   same lines, each with the SQL that removes it;
//! - a change that arrives under a partition's name belongs to the nearest
//!   partitioned ancestor the graph names: [`PublicationReport::partitions`]
//!   maps the names known at start, and the source resolves partitions
//!   attached later when their Relation message arrives
//!   ([`partition_parent`]). Resolving, rather than requiring
//!   `publish_via_partition_root`, works whatever the publication says
//!   (that setting is the publication's, shared with other subscribers)
//!   and still lets a graph name a single partition when it is published
//!   as itself.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::postgres::PgPool;

use super::SourceSetupError;
use crate::graph::Graph;

/// Every operation a change can be: the graph needs all of them (an insert
/// drops a cached "not found", a truncate bumps namespaces).
pub(crate) const OPERATIONS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// A graph table whose published rows are filtered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowFilter {
    pub(crate) table: String,
    /// The relation the filter is on (the table, or the partition its
    /// changes arrive as).
    pub(crate) published_as: String,
    /// The filter as Postgres prints it, e.g. `(id > 100)`.
    pub(crate) filter: String,
}

/// Columns the graph reads that a column list leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HiddenColumns {
    pub(crate) table: String,
    pub(crate) published_as: String,
    pub(crate) columns: Vec<String>,
}

/// A graph table whose changes arrive under an ancestor's name
/// (`publish_via_partition_root`), indistinguishable from the ancestor's
/// other partitions' changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishedAsAncestor {
    pub(crate) table: String,
    pub(crate) ancestor: String,
}

/// How a publication compares with the graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PublicationReport {
    pub(crate) exists: bool,
    /// Tables a dependency reads that exist but are not published (or only
    /// some of their partitions are): their changes would never reach evictd.
    pub(crate) unpublished: Vec<String>,
    /// Tables a dependency reads that do not exist in the database.
    pub(crate) missing: Vec<String>,
    /// Published tables no dependency reads: streamed, then ignored.
    pub(crate) unmapped: Vec<String>,
    /// Operations the publication leaves out, in [`OPERATIONS`] order.
    pub(crate) unpublished_operations: Vec<&'static str>,
    /// Graph tables that are published, for the messages.
    pub(crate) published_tables: Vec<String>,
    pub(crate) row_filters: Vec<RowFilter>,
    pub(crate) hidden_columns: Vec<HiddenColumns>,
    pub(crate) published_as_ancestor: Vec<PublishedAsAncestor>,
    /// Graph tables named with one of their own partitions, `(table,
    /// partition)`: a change resolves to one table only.
    pub(crate) overlapping: Vec<(String, String)>,
    /// Names changes arrive under that are partitions of a graph table, and
    /// that table.
    pub(crate) partitions: BTreeMap<String, String>,
}

/// A quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table` as a quoted SQL name.
pub(crate) fn quote_table(name: &str) -> String {
    match name.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(name),
    }
}

/// `ALTER PUBLICATION … ADD TABLE …` for `tables`.
pub(crate) fn add_tables_sql(publication: &str, tables: &[String]) -> String {
    let tables: Vec<String> = tables.iter().map(|t| quote_table(t)).collect();
    format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(publication), tables.join(", "))
}

/// Publishes `table` again without a row filter or column list, in one
/// transaction (so no change falls between the two statements).
fn republish_sql(publication: &str, table: &str) -> String {
    let (p, t) = (quote_ident(publication), quote_table(table));
    format!("BEGIN; ALTER PUBLICATION {p} DROP TABLE {t}; ALTER PUBLICATION {p} ADD TABLE {t}; COMMIT;")
}

/// "deletes and truncates".
fn operations_text(operations: &[&str]) -> String {
    let plural: Vec<String> = operations.iter().map(|o| format!("{o}s")).collect();
    match plural.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

impl PublicationReport {
    /// One line per way the publication would hide a change the graph
    /// needs, each with the SQL that fixes it. Membership (`unpublished`)
    /// is not among them: `run` may add missing tables itself.
    pub(crate) fn hazards(&self, publication: &str) -> Vec<String> {
        let mut out = Vec::new();
        let p = quote_ident(publication);
        let mut tables: Vec<&str> = self.published_tables.iter().chain(&self.unpublished).map(String::as_str).collect();
        tables.sort_unstable();
        if !self.unpublished_operations.is_empty() && !tables.is_empty() {
            out.push(format!(
                "publication `{publication}` does not publish {}: {} of {} would never reach evictd: ALTER PUBLICATION {p} SET (publish = '{}')",
                self.unpublished_operations.join(", "),
                operations_text(&self.unpublished_operations),
                tables.join(", "),
                OPERATIONS.join(", ")
            ));
        }
        for f in &self.row_filters {
            let of = if f.published_as == f.table { String::new() } else { format!(" (as {})", f.published_as) };
            out.push(format!(
                "publication `{publication}` filters the rows of {}{of} (WHERE {}): changes of the other rows would never reach evictd: {}",
                f.table,
                f.filter,
                republish_sql(publication, &f.published_as)
            ));
        }
        for h in &self.hidden_columns {
            let of = if h.published_as == h.table { String::new() } else { format!(" (as {})", h.published_as) };
            out.push(format!(
                "publication `{publication}` publishes {}{of} without column(s) {}, which the graph reads: their values would never reach evictd, so every change would bump the caches' namespaces instead of deleting keys: {}",
                h.table,
                h.columns.join(", "),
                republish_sql(publication, &h.published_as)
            ));
        }
        for a in &self.published_as_ancestor {
            out.push(format!(
                "publication `{publication}` publishes the changes of {} as changes of {} (publish_via_partition_root): they cannot be told from its other partitions' changes, so they would never reach {}'s caches: name {} in the graph, or ALTER PUBLICATION {p} SET (publish_via_partition_root = false)",
                a.table, a.ancestor, a.table, a.ancestor
            ));
        }
        for (table, partition) in &self.overlapping {
            out.push(format!(
                "the graph names both {table} and its partition {partition}: a change of {partition} resolves to {partition} only, so {table}'s dependencies would miss it: name one of them"
            ));
        }
        out
    }
}

/// What `pg_publication_tables` says of one published relation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Published {
    pub(crate) row_filter: Option<String>,
    /// `None` before Postgres 15 (every column is published).
    pub(crate) columns: Option<Vec<String>>,
}

/// A leaf partition of a graph table (or the table itself): its name and
/// its ancestors', nearest first, starting with itself.
pub(crate) type Chain = Vec<String>;

/// Decides what the publication hides of graph table `table`, given the
/// chains of its leaves and what is published (pure). `empty_member`
/// says, for a partitioned table without partitions, whether it belongs to
/// the publication (its future partitions then do).
pub(crate) fn assess(
    table: &str,
    columns: &[&str],
    chains: &[Chain],
    published: &BTreeMap<String, Published>,
    graph_tables: &BTreeSet<&str>,
    report: &mut PublicationReport,
) {
    let mut is_published = !chains.is_empty();
    for chain in chains {
        let Some(at) = chain.iter().position(|n| n == table) else { continue };
        for partition in &chain[..at] {
            let pair = (table.to_owned(), partition.clone());
            if graph_tables.contains(partition.as_str()) && !report.overlapping.contains(&pair) {
                report.overlapping.push(pair);
            }
        }
        let Some(arrives) = chain.iter().position(|n| published.contains_key(n)) else {
            is_published = false;
            continue;
        };
        let name = &chain[arrives];
        if arrives > at {
            let hazard = PublishedAsAncestor { table: table.to_owned(), ancestor: name.clone() };
            if !report.published_as_ancestor.contains(&hazard) {
                report.published_as_ancestor.push(hazard);
            }
            continue;
        }
        if arrives < at {
            report.partitions.insert(name.clone(), table.to_owned());
        }
        let Some(what) = published.get(name) else { continue };
        if let Some(filter) = &what.row_filter {
            let hazard = RowFilter { table: table.to_owned(), published_as: name.clone(), filter: filter.clone() };
            if !report.row_filters.contains(&hazard) {
                report.row_filters.push(hazard);
            }
        }
        if let Some(published_columns) = &what.columns {
            let hidden: Vec<String> = columns
                .iter()
                .filter(|c| !published_columns.iter().any(|p| p == *c))
                .map(|c| (*c).to_owned())
                .collect();
            if !hidden.is_empty() {
                report.hidden_columns.push(HiddenColumns {
                    table: table.to_owned(),
                    published_as: name.clone(),
                    columns: hidden,
                });
            }
        }
    }
    if is_published {
        report.published_tables.push(table.to_owned());
    } else {
        report.unpublished.push(table.to_owned());
    }
}

fn query(e: sqlx::Error) -> SourceSetupError {
    SourceSetupError::Transient(format!("preflight query failed: {e}"))
}

/// Graph tables that some dependency is triggered by.
fn mapped_tables(graph: &Graph) -> BTreeSet<&str> {
    graph.tables().iter().filter(|t| !t.dependents.is_empty()).map(|t| &*t.name).collect()
}

/// The leaves of a table's partition tree (the table itself when it has
/// none), each with its ancestors, nearest first; and whether the table is
/// partitioned without partitions.
const CHAINS_SQL: &str = "
WITH t AS (SELECT to_regclass($1) AS rel),
units AS (
    SELECT p.relid FROM t, pg_partition_tree(t.rel) p WHERE p.isleaf
    UNION ALL
    SELECT t.rel FROM t WHERE NOT EXISTS (SELECT 1 FROM pg_partition_tree(t.rel) p WHERE p.isleaf)
)
SELECT c.relkind = 'p' AS empty_partitioned,
    ARRAY(
        SELECT an.nspname || '.' || ac.relname
        FROM (
            SELECT a.relid, a.depth FROM pg_partition_ancestors(u.relid) WITH ORDINALITY AS a(relid, depth)
            UNION ALL
            SELECT u.relid, 1 WHERE NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(u.relid))
        ) anc
        JOIN pg_class ac ON ac.oid = anc.relid
        JOIN pg_namespace an ON an.oid = ac.relnamespace
        ORDER BY anc.depth
    ) AS chain
FROM units u JOIN pg_class c ON c.oid = u.relid";

/// What the publication publishes, per relation (row filters and column
/// lists from Postgres 15 on; read through `to_jsonb` so that older
/// servers, whose view lacks those columns, answer too).
const PUBLISHED_SQL: &str = "
SELECT pt.schemaname || '.' || pt.tablename AS name,
    to_jsonb(pt) ->> 'rowfilter' AS rowfilter,
    CASE WHEN jsonb_typeof(to_jsonb(pt) -> 'attnames') = 'array'
        THEN ARRAY(SELECT jsonb_array_elements_text(to_jsonb(pt) -> 'attnames')) END AS attnames
FROM pg_publication_tables pt WHERE pt.pubname = $1";

const PUBLICATION_SQL: &str = "
SELECT pubinsert, pubupdate, pubdelete, pubtruncate
FROM pg_publication WHERE pubname = $1";

/// Whether a table (partitioned, without partitions yet) or one of its
/// ancestors belongs to the publication, or the publication is for all
/// tables.
const MEMBER_SQL: &str = "
SELECT p.puballtables OR EXISTS (
    SELECT 1 FROM pg_publication_rel r
    WHERE r.prpubid = p.oid AND (r.prrelid = to_regclass($2)
        OR r.prrelid IN (SELECT relid FROM pg_partition_ancestors(to_regclass($2)))))
FROM pg_publication p WHERE p.pubname = $1";

/// Compares publication `name` with the tables the graph's dependencies read.
pub(crate) async fn publication_report(
    pool: &PgPool,
    name: &str,
    graph: &Graph,
) -> Result<PublicationReport, SourceSetupError> {
    use sqlx::Row as _;
    let flags = sqlx::query(PUBLICATION_SQL).bind(name).fetch_optional(pool).await.map_err(query)?;
    let mut report = PublicationReport { exists: flags.is_some(), ..PublicationReport::default() };
    if let Some(row) = &flags {
        for (i, operation) in OPERATIONS.iter().enumerate() {
            if !row.try_get::<bool, _>(i).map_err(query)? {
                report.unpublished_operations.push(operation);
            }
        }
    }
    let mut published = BTreeMap::new();
    for row in sqlx::query(PUBLISHED_SQL).bind(name).fetch_all(pool).await.map_err(query)? {
        let relation: String = row.try_get("name").map_err(query)?;
        let row_filter: Option<String> = row.try_get("rowfilter").map_err(query)?;
        let columns: Option<Vec<String>> = row.try_get("attnames").map_err(query)?;
        published.insert(relation, Published { row_filter, columns });
    }
    let mapped = mapped_tables(graph);
    let all: BTreeSet<&str> = graph.tables().iter().map(|t| &*t.name).collect();
    for table in graph.tables().iter().filter(|t| mapped.contains(&*t.name)) {
        let quoted = quote_table(&table.name);
        let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&quoted)
            .fetch_one(pool)
            .await
            .map_err(query)?;
        if !found {
            report.missing.push(table.name.to_string());
            continue;
        }
        let mut chains = Vec::new();
        let mut empty_partitioned = false;
        for row in sqlx::query(CHAINS_SQL).bind(&quoted).fetch_all(pool).await.map_err(query)? {
            empty_partitioned |= row.try_get::<bool, _>("empty_partitioned").map_err(query)?;
            chains.push(row.try_get::<Vec<String>, _>("chain").map_err(query)?);
        }
        if empty_partitioned {
            // No partition yet, so nothing that could arrive: what matters
            // is that the ones attached later will be published.
            let member: Option<bool> =
                sqlx::query_scalar(MEMBER_SQL).bind(name).bind(&quoted).fetch_optional(pool).await.map_err(query)?;
            if member == Some(true) {
                report.published_tables.push(table.name.to_string());
            } else {
                report.unpublished.push(table.name.to_string());
            }
            continue;
        }
        let columns: Vec<&str> = table.columns.iter().map(|c| &**c).collect();
        assess(&table.name, &columns, &chains, &published, &all, &mut report);
    }
    report.unmapped =
        published.into_keys().filter(|t| !mapped.contains(t.as_str()) && !report.partitions.contains_key(t)).collect();
    Ok(report)
}

/// The graph table a relation (by OID) is a partition of: its nearest
/// ancestor the graph names, if any. For partitions attached after start.
pub(crate) async fn partition_parent(
    pool: &PgPool,
    oid: u32,
    graph_tables: &BTreeSet<std::sync::Arc<str>>,
) -> Result<Option<String>, sqlx::Error> {
    let ancestors: Vec<String> = sqlx::query_scalar(
        "SELECT an.nspname || '.' || ac.relname
         FROM pg_partition_ancestors($1::int8::oid) WITH ORDINALITY AS a(relid, depth)
         JOIN pg_class ac ON ac.oid = a.relid JOIN pg_namespace an ON an.oid = ac.relnamespace
         ORDER BY a.depth",
    )
    .bind(i64::from(oid))
    .fetch_all(pool)
    .await?;
    Ok(ancestors.into_iter().skip(1).find(|a| graph_tables.contains(a.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(names: &[&str]) -> Chain {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn published(names: &[&str]) -> BTreeMap<String, Published> {
        names.iter().map(|n| ((*n).to_owned(), Published::default())).collect()
    }

    #[test]
    fn leaves_published_as_themselves_map_to_the_partitioned_table() {
        let mut report = PublicationReport::default();
        let chains =
            [chain(&["app.orders_eu", "app.orders"]), chain(&["app.orders_us_0", "app.orders_us", "app.orders"])];
        let graph = BTreeSet::from(["app.orders"]);
        assess("app.orders", &["id"], &chains, &published(&["app.orders_eu", "app.orders_us_0"]), &graph, &mut report);
        assert_eq!(report.partitions.get("app.orders_eu").map(String::as_str), Some("app.orders"));
        assert_eq!(report.partitions.get("app.orders_us_0").map(String::as_str), Some("app.orders"));
        assert_eq!(report.published_tables, vec!["app.orders"]);
        assert!(report.hazards("p").is_empty(), "{:?}", report.hazards("p"));
    }

    #[test]
    fn a_partition_published_via_its_root_is_a_hazard() {
        let mut report = PublicationReport::default();
        let graph = BTreeSet::from(["app.orders_eu"]);
        let chains = [chain(&["app.orders_eu", "app.orders"])];
        assess("app.orders_eu", &["id"], &chains, &published(&["app.orders"]), &graph, &mut report);
        assert_eq!(
            report.published_as_ancestor,
            vec![PublishedAsAncestor { table: "app.orders_eu".into(), ancestor: "app.orders".into() }]
        );
        assert!(report.hazards("p")[0].contains("SET (publish_via_partition_root = false)"));
    }

    #[test]
    fn one_unpublished_leaf_makes_the_table_unpublished() {
        let mut report = PublicationReport::default();
        let chains = [chain(&["app.orders_eu", "app.orders"]), chain(&["app.orders_as", "app.orders"])];
        let graph = BTreeSet::from(["app.orders"]);
        assess("app.orders", &["id"], &chains, &published(&["app.orders_eu"]), &graph, &mut report);
        assert_eq!(report.unpublished, vec!["app.orders"]);
    }

    #[test]
    fn row_filters_and_hidden_columns_are_hazards_with_the_sql_that_fixes_them() {
        let mut report = PublicationReport { unpublished_operations: vec!["delete", "truncate"], ..Default::default() };
        let mut what = BTreeMap::new();
        what.insert(
            "app.items".to_owned(),
            Published { row_filter: Some("(id > 100)".into()), columns: Some(vec!["id".into()]) },
        );
        let graph = BTreeSet::from(["app.items"]);
        assess("app.items", &["id", "name"], &[chain(&["app.items"])], &what, &graph, &mut report);
        let hazards = report.hazards("p");
        assert_eq!(hazards.len(), 3, "{hazards:?}");
        assert!(hazards[0].starts_with("publication `p` does not publish delete, truncate: deletes and truncates of app.items would never reach evictd: ALTER PUBLICATION \"p\" SET (publish = 'insert, update, delete, truncate')"), "{hazards:?}");
        assert!(hazards[1].contains("(WHERE (id > 100))"), "{hazards:?}");
        assert!(hazards[2].contains("without column(s) name"), "{hazards:?}");
        assert!(hazards[2].ends_with(
            "BEGIN; ALTER PUBLICATION \"p\" DROP TABLE \"app\".\"items\"; ALTER PUBLICATION \"p\" ADD TABLE \"app\".\"items\"; COMMIT;"
        ));
    }

    #[test]
    fn a_graph_naming_a_table_and_its_partition_is_a_hazard() {
        let mut report = PublicationReport::default();
        let graph = BTreeSet::from(["app.orders", "app.orders_eu"]);
        assess(
            "app.orders",
            &[],
            &[chain(&["app.orders_eu", "app.orders"])],
            &published(&["app.orders_eu"]),
            &graph,
            &mut report,
        );
        assert_eq!(report.overlapping, vec![("app.orders".to_owned(), "app.orders_eu".to_owned())]);
    }

    #[test]
    fn operations_read_as_a_list() {
        assert_eq!(operations_text(&["delete"]), "deletes");
        assert_eq!(operations_text(&["update", "delete", "truncate"]), "updates, deletes and truncates");
    }
}
