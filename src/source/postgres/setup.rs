//! Preparing Postgres for evictd: checks that say what is missing, and the
//! publication and slot, created when configured to.
//!
//! Runs over an ordinary `sqlx` connection before replication starts:
//! `wal_level` must be `logical`, the role needs the `REPLICATION`
//! attribute, the publication and the slot must exist (or be created), the
//! publication must include every table a dependency reads (or have it
//! added, with `create_publication`), the slot must use `pgoutput`.
//! The publication must not hide changes the graph needs (`publication`;
//! `evictd check --config` reads the same [`publication_report`]). Tables
//! whose dependencies read non-identity columns of old rows get a warning
//! unless they (for a partitioned table: its leaf partitions) have `REPLICA
//! IDENTITY FULL`: without it evictd still invalidates correctly, but
//! through namespace bumps (see `resolve`).

use std::collections::BTreeSet;

use sqlx::postgres::PgPool;
use sqlx::{Executor as _, Row as _};

use super::SourceSetupError;
use super::publication::{add_tables_sql, publication_report, quote_ident, quote_table};
use crate::change::Lsn;
use crate::graph::{Graph, LookupArg, Mapping, Trigger};

/// What the slot looked like when replication was about to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotState {
    /// The slot's `confirmed_flush_lsn`: where replication resumes.
    pub(crate) confirmed_flush: Lsn,
    /// Whether another session holds the slot right now.
    pub(crate) active: bool,
}

/// Runs every check and creates what is configured to be created.
pub(crate) async fn prepare(
    pool: &PgPool,
    slot: &str,
    publication: &str,
    create_slot: bool,
    create_publication: bool,
    require_full_identity: bool,
    graph: &Graph,
) -> Result<SlotState, SourceSetupError> {
    if let Some(refusal) = server_prerequisites(pool).await?.into_iter().next() {
        return Err(SourceSetupError::Definite(refusal));
    }
    ensure_publication(pool, publication, create_publication, graph).await?;
    let state = ensure_slot(pool, slot, create_slot).await?;
    check_replica_identity(pool, graph, require_full_identity).await?;
    Ok(state)
}

/// What the server must allow before evictd can stream, each unmet one as
/// the message `run` refuses with: `wal_level = logical`, and a role that
/// may replicate. `evictd check --config` reports the same.
pub(crate) async fn server_prerequisites(pool: &PgPool) -> Result<Vec<String>, SourceSetupError> {
    let mut unmet = Vec::new();
    let wal_level: String = sqlx::query_scalar("SHOW wal_level").fetch_one(pool).await.map_err(query)?;
    if wal_level != "logical" {
        unmet.push(format!(
            "wal_level is `{wal_level}`: logical replication needs `wal_level = logical` in postgresql.conf (and a restart)"
        ));
    }
    let can_replicate: bool =
        sqlx::query_scalar("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(pool)
            .await
            .map_err(query)?;
    if !can_replicate {
        unmet.push("the role evictd connects as lacks the REPLICATION attribute: ALTER ROLE <role> REPLICATION".into());
    }
    Ok(unmet)
}

fn query(e: sqlx::Error) -> SourceSetupError {
    SourceSetupError::Transient(format!("preflight query failed: {e}"))
}

async fn ensure_publication(pool: &PgPool, name: &str, create: bool, graph: &Graph) -> Result<(), SourceSetupError> {
    let report = publication_report(pool, name, graph).await?;
    if report.exists {
        let hazards = report.hazards(name);
        if !hazards.is_empty() {
            return Err(SourceSetupError::Publication(hazards.join("; ")));
        }
        if report.unpublished.is_empty() {
            return Ok(());
        }
        let sql = add_tables_sql(name, &report.unpublished);
        if !create {
            return Err(SourceSetupError::Publication(format!(
                "publication `{name}` lacks the graph's table(s) {}: their changes would never reach evictd: {sql}; or set source.postgres.create_publication = true",
                report.unpublished.join(", ")
            )));
        }
        pool.execute(sqlx::AssertSqlSafe(sql)).await.map_err(|e| {
            SourceSetupError::Definite(format!("cannot add the graph's tables to publication `{name}`: {e}"))
        })?;
        tracing::info!(publication = name, tables = %report.unpublished.join(", "), "added the graph's tables to the publication");
        return Ok(());
    }
    if !create {
        return Err(SourceSetupError::Publication(format!(
            "publication `{name}` does not exist: CREATE PUBLICATION {} FOR TABLE <the graph's tables>, or set source.postgres.create_publication = true",
            quote_ident(name)
        )));
    }
    let tables: Vec<String> = graph.tables().iter().map(|t| quote_table(&t.name)).collect();
    let sql = format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(name), tables.join(", "));
    pool.execute(sqlx::AssertSqlSafe(sql)).await.map_err(|e| {
        SourceSetupError::Definite(format!("cannot create publication `{name}` for the graph's tables: {e}"))
    })?;
    tracing::info!(publication = name, tables = tables.len(), "created the publication");
    Ok(())
}

/// Reads the slot, creating it first when configured to.
pub(crate) async fn ensure_slot(pool: &PgPool, slot: &str, create: bool) -> Result<SlotState, SourceSetupError> {
    if read_slot(pool, slot).await?.is_none() {
        if !create {
            return Err(SourceSetupError::Definite(format!(
                "replication slot `{slot}` does not exist: SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'), or set source.postgres.create_slot = true"
            )));
        }
        let created =
            sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')").bind(slot).execute(pool).await;
        match created {
            Ok(_) => tracing::info!(slot, "created the replication slot"),
            // Another replica created it first: use it.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42710") => {}
            Err(e) => return Err(SourceSetupError::Definite(format!("cannot create replication slot `{slot}`: {e}"))),
        }
    }
    read_slot(pool, slot)
        .await?
        .ok_or_else(|| SourceSetupError::Transient(format!("replication slot `{slot}` vanished while starting")))
}

/// The slot's state, or `None` when it does not exist.
pub(crate) async fn read_slot(pool: &PgPool, slot: &str) -> Result<Option<SlotState>, SourceSetupError> {
    let row = sqlx::query(
        "SELECT plugin, slot_type, confirmed_flush_lsn::text AS confirmed, active FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await
    .map_err(query)?;
    let Some(row) = row else { return Ok(None) };
    let plugin: Option<String> = row.try_get("plugin").map_err(query)?;
    let slot_type: String = row.try_get("slot_type").map_err(query)?;
    if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(SourceSetupError::Definite(format!(
            "replication slot `{slot}` is a {slot_type} slot with plugin {}: evictd needs a logical slot with pgoutput",
            plugin.as_deref().unwrap_or("none")
        )));
    }
    let confirmed: Option<String> = row.try_get("confirmed").map_err(query)?;
    let confirmed_flush = match confirmed {
        Some(text) => text.parse().map_err(|e| SourceSetupError::Definite(format!("slot `{slot}`: {e}")))?,
        None => Lsn(0),
    };
    let active: bool = row.try_get("active").map_err(query)?;
    Ok(Some(SlotState { confirmed_flush, active }))
}

/// Graph tables whose dependencies read non-identity columns of old rows.
pub(crate) fn tables_needing_old_values(graph: &Graph) -> BTreeSet<&str> {
    let mut out = BTreeSet::new();
    for dep in graph.dependencies() {
        let Trigger::Table(t) = dep.trigger else { continue };
        let table = graph.table(t);
        let non_key = |c: &str| !table.is_key(c);
        let reads_non_key = match &dep.mapping {
            Mapping::Columns(columns) => columns.iter().any(|c| non_key(c)),
            Mapping::Tags(tags) => tags.iter().flat_map(|t| &t.columns).any(|c| non_key(c)),
            Mapping::Lookup(l) => matches!(&l.arg, LookupArg::Column(c) if non_key(c)),
            Mapping::Params(_) => false,
        };
        let filters_non_key = dep.filter.iter().flatten().any(|c| non_key(c));
        if reads_non_key || filters_non_key {
            out.insert(&*table.name);
        }
    }
    out
}

/// The relations whose replica identity decides a table's old rows, with
/// it: the table itself, or the leaves of its partition tree.
const IDENTITY_SQL: &str = "
WITH t AS (SELECT to_regclass($1) AS rel)
SELECT n.nspname || '.' || c.relname, c.relreplident::text
FROM t JOIN pg_class c ON c.oid = t.rel OR c.oid IN (SELECT relid FROM pg_partition_tree(t.rel) WHERE isleaf)
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind <> 'p' OR NOT EXISTS (SELECT 1 FROM pg_partition_tree(t.rel) WHERE isleaf)";

/// Tables whose caches read non-key columns of old rows need the whole old
/// row: an error naming them (or a warning, when not required).
async fn check_replica_identity(pool: &PgPool, graph: &Graph, required: bool) -> Result<(), SourceSetupError> {
    let missing = relations_without_full_identity(pool, graph).await?;
    match replica_identity_refusal(&missing) {
        // The tables contradict the graph as a hiding publication does: bad
        // setup, exit 2.
        Some(refusal) if required => Err(SourceSetupError::Publication(refusal)),
        _ => Ok(()),
    }
}

/// The relations (tables, or leaf partitions) whose caches read non-key
/// columns of old rows and that lack `REPLICA IDENTITY FULL`; each is
/// logged as a warning.
pub(crate) async fn relations_without_full_identity(
    pool: &PgPool,
    graph: &Graph,
) -> Result<Vec<String>, SourceSetupError> {
    let mut missing = Vec::new();
    for table in tables_needing_old_values(graph) {
        // A partitioned table's rows are written by its leaf partitions,
        // each with its own replica identity (setting it on the parent does
        // not reach them): check the leaves.
        let rows: Vec<(String, String)> =
            sqlx::query_as(IDENTITY_SQL).bind(table).fetch_all(pool).await.map_err(query)?;
        if rows.is_empty() {
            tracing::warn!(table, "graph table does not exist in the database");
        }
        for (relation, identity) in rows {
            if identity != "f" {
                tracing::warn!(
                    table,
                    relation = %relation,
                    replica_identity = %identity,
                    "old rows of this table arrive without the non-key columns its caches read: updates that move a \
                     key will bump whole namespaces instead of deleting two keys; ALTER TABLE {relation} REPLICA IDENTITY FULL"
                );
                missing.push(relation);
            }
        }
    }
    Ok(missing)
}

/// Why `run` refuses relations lacking `REPLICA IDENTITY FULL` (when
/// `require_full_replica_identity`), with the SQL that fixes it; `None`
/// when there are none.
pub(crate) fn replica_identity_refusal(missing: &[String]) -> Option<String> {
    if !missing.is_empty() {
        let statements: Vec<String> =
            missing.iter().map(|t| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", quote_table(t))).collect();
        return Some(format!(
            "the caches of {} read non-key columns of old rows (column filters, keys that can move), which Postgres \
             sends only with REPLICA IDENTITY FULL: {} (or set source.postgres.require_full_replica_identity = false \
             to accept namespace bumps instead)",
            missing.join(", "),
            statements.join(" ")
        ));
    }
    None
}
