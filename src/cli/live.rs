//! `evictd check --config FILE` against the live database: what the offline
//! validation cannot know.
//!
//! With a Postgres source (and without `--offline`), `check` connects with
//! a short timeout and compares the publication with the graph, through the
//! same [`publication::publication_report`] that `evictd run` acts on:
//! - a graph table missing from the publication is an error (its changes
//!   would never arrive), or a note when `create_publication = true`, since
//!   `run` then adds it; a missing publication likewise;
//! - a publication that hides changes a graph table needs is an error, as
//!   `run` refuses it: operations it does not publish, a row filter, a
//!   column list without a column the graph reads, a partition published
//!   under its ancestor's name (`publish_via_partition_root`);
//! - a published table no dependency reads is a warning (streamed, ignored;
//!   a partition of a graph table is that table);
//! - a graph table that does not exist is a warning;
//! - evictd's migrations not yet applied are a note, or an error when
//!   `dead_letter.migrations = "verify"` (then `run` would refuse).
//!
//! - the server's settings `run` refuses: `wal_level` other than `logical`,
//!   a role without `REPLICATION`, are errors;
//! - tables whose caches read non-key columns of old rows without `REPLICA
//!   IDENTITY FULL` are an error (`run` refuses them), or a warning under
//!   `require_full_replica_identity = false`.
//!
//! Errors exit 2; a database that cannot be reached exits 1.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;

use super::CliError;
use crate::config::{self, Config, PostgresSource};
use crate::daemon::wiring::dead_letter_store;
use crate::dead_letter::{DeadLetterError, MIGRATE_COMMAND, MigrationMode};
use crate::graph::Graph;
use crate::source::postgres::publication::{self, PublicationReport};
use crate::source::postgres::setup;

/// How long connecting and each query may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What the live check found: report lines for stdout, and errors.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LiveFindings {
    pub(crate) lines: Vec<String>,
    pub(crate) errors: Vec<String>,
}

/// Turns a publication report into lines and errors (pure, for tests).
pub(crate) fn publication_findings(pg: &PostgresSource, report: &PublicationReport) -> LiveFindings {
    let mut out = LiveFindings::default();
    let name = &pg.publication;
    if !report.exists {
        if pg.create_publication {
            out.lines.push(format!(
                "  note: publication `{name}` does not exist: `evictd run` will create it for the graph's tables (create_publication = true)"
            ));
        } else {
            out.errors.push(format!(
                "publication `{name}` does not exist: CREATE PUBLICATION \"{name}\" FOR TABLE <the graph's tables>, or set source.postgres.create_publication = true"
            ));
        }
    }
    for table in &report.unpublished {
        if !report.exists {
            continue;
        }
        if pg.create_publication {
            out.lines.push(format!(
                "  note: graph table {table} is not in publication `{name}`: `evictd run` will add it (create_publication = true)"
            ));
        } else {
            out.errors.push(format!(
                "graph table {table} is not in publication `{name}`: its changes would never reach evictd: {}; or set source.postgres.create_publication = true",
                publication::add_tables_sql(name, std::slice::from_ref(table))
            ));
        }
    }
    // What the publication hides: `run` refuses to start on any of these.
    if report.exists {
        out.errors.extend(report.hazards(name));
    }
    for table in &report.missing {
        out.lines.push(format!("  warning: graph table {table} does not exist in the database"));
    }
    for table in &report.unmapped {
        out.lines.push(format!(
            "  warning: table {table} is in publication `{name}` but no dependency maps it: its changes are streamed and ignored"
        ));
    }
    out
}

/// Runs the live checks for a Postgres source.
pub(crate) fn check(config: &Config, pg: &PostgresSource, graph: &Graph) -> Result<LiveFindings, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(check_async(config, pg, graph))
}

async fn check_async(config: &Config, pg: &PostgresSource, graph: &Graph) -> Result<LiveFindings, CliError> {
    let shown = config::redact_url(&pg.url);
    let unreachable = |e: String| CliError::Runtime(format!("cannot check the source database {shown}: {e}"));
    let pool = PgPoolOptions::new().max_connections(1).acquire_timeout(TIMEOUT).connect_lazy_with(
        crate::pgconn::connect_options(pg.url.expose_secret())
            .await
            .map_err(|e| CliError::Input(format!("source.postgres.url: {e}")))?,
    );
    let in_time =
        |what: &'static str| move |_| unreachable(format!("no answer within {} s ({what})", (TIMEOUT * 2).as_secs()));
    let unmet = tokio::time::timeout(TIMEOUT * 2, setup::server_prerequisites(&pool))
        .await
        .map_err(in_time("server settings"))?
        .map_err(|e| unreachable(e.to_string()))?;
    let report = tokio::time::timeout(TIMEOUT * 2, publication::publication_report(&pool, &pg.publication, graph))
        .await
        .map_err(in_time("publication"))?
        .map_err(|e| unreachable(e.to_string()))?;
    let without_full_identity = tokio::time::timeout(TIMEOUT * 2, setup::relations_without_full_identity(&pool, graph))
        .await
        .map_err(in_time("replica identity"))?
        .map_err(|e| unreachable(e.to_string()))?;
    pool.close().await;
    let mut findings = LiveFindings {
        lines: vec![format!("database: {shown} (publication {})", pg.publication)],
        ..LiveFindings::default()
    };
    // What `run` refuses to start on: the server's settings, ...
    findings.errors.extend(unmet);
    let publication = publication_findings(pg, &report);
    findings.lines.extend(publication.lines);
    findings.errors.extend(publication.errors);
    // ... and old rows without the columns the graph reads.
    if let Some(refusal) = setup::replica_identity_refusal(&without_full_identity) {
        if pg.require_full_replica_identity {
            findings.errors.push(refusal);
        } else {
            findings.lines.push(format!(
                "  warning: {} lack REPLICA IDENTITY FULL: updates that move their keys bump whole namespaces \
                 (require_full_replica_identity = false)",
                without_full_identity.join(", ")
            ));
        }
    }
    let store = dead_letter_store(config)?;
    match store.pending().await {
        Ok(pending) if pending.is_empty() => {}
        Ok(pending) => match config.dead_letter.migrations {
            MigrationMode::Apply => findings.lines.push(format!(
                "  note: schema {} lacks migration(s) {}: `evictd run` will apply them",
                store.schema(),
                pending.join(", ")
            )),
            MigrationMode::Verify => findings
                .errors
                .push(DeadLetterError::Pending { schema: store.schema().to_owned(), pending }.to_string()),
        },
        Err(e) if e.is_transient() => {
            return Err(CliError::Runtime(format!("cannot check the dead-letter database: {e}")));
        }
        Err(e) => findings.errors.push(format!("{e} (see `{MIGRATE_COMMAND}`)")),
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn source(create_publication: bool) -> PostgresSource {
        PostgresSource {
            url: SecretString::from("postgres://u@h/db".to_owned()),
            slot: "evictd".into(),
            publication: "evictd".into(),
            create_slot: true,
            create_publication,
            status_interval: Duration::from_secs(1),
            require_full_replica_identity: true,
            standby_retry: Duration::from_secs(1),
            lock_lease: Some(Duration::from_secs(10)),
            on_slot_loss: crate::config::OnSlotLoss::Refuse,
        }
    }

    #[test]
    fn an_unpublished_graph_table_is_an_error_unless_run_will_add_it() {
        let report = PublicationReport { exists: true, unpublished: vec!["app.items".into()], ..Default::default() };
        let strict = publication_findings(&source(false), &report);
        assert_eq!(strict.errors.len(), 1);
        assert!(strict.errors[0].contains("ALTER PUBLICATION \"evictd\" ADD TABLE \"app\".\"items\""), "{strict:?}");
        let lenient = publication_findings(&source(true), &report);
        assert!(lenient.errors.is_empty());
        assert!(lenient.lines[0].contains("`evictd run` will add it"), "{lenient:?}");
    }

    #[test]
    fn a_published_table_no_dependency_maps_is_a_warning() {
        let report = PublicationReport { exists: true, unmapped: vec!["app.audit".into()], ..Default::default() };
        let found = publication_findings(&source(false), &report);
        assert!(found.errors.is_empty());
        assert!(found.lines[0].starts_with("  warning: table app.audit is in publication `evictd`"), "{found:?}");
    }

    #[test]
    fn a_missing_publication_is_an_error_unless_run_creates_it() {
        let report = PublicationReport { exists: false, unpublished: vec!["app.items".into()], ..Default::default() };
        let strict = publication_findings(&source(false), &report);
        assert_eq!(strict.errors.len(), 1, "one error for the publication, not one per table: {strict:?}");
        assert!(strict.errors[0].starts_with("publication `evictd` does not exist"));
        assert!(publication_findings(&source(true), &report).errors.is_empty());
    }
}
