//! Dead letters: committed changes evictd could not resolve, written to a
//! table in the database so that the stream keeps moving and an operator can
//! read and replay them.
//!
//! A change is dead-lettered when its look-ups fail in a way that retrying
//! will not fix (a query error such as a division by zero or a bad cast for
//! this row's value), or keep failing `dead_letter.lookup_attempts` times
//! (statement timeouts). A database that cannot be reached is never a reason:
//! that is back-pressure, retried for as long as it lasts. A message a
//! source cannot decode ([`Undecodable`]) is recorded too
//! ([`DeadLetterStore::record_undecodable`]), with its raw payload.
//!
//! **Invariant:** a dead-lettered change counts as handled only once its row
//! is committed ([`DeadLetterStore::record`] returned `Ok`, or
//! [`DeadLetterStore::record_undecodable`] for a message); until then its
//! batch is not confirmed and its position not acknowledged. A failed write
//! is retried (transient) or stops the daemon (definite), never skipped.
//! Recording is idempotent: a change met again after a crash (recorded, not
//! yet acknowledged) keeps its one row (`UNIQUE (source, position,
//! table_name)`).
//!
//! evictd's own objects live in a schema of their own (`dead_letter.schema`,
//! default `evictd`): the migrations of `migrations/` run with `search_path`
//! set to it, so the dead-letter table and sqlx's `_sqlx_migrations` land
//! there, never in the application's `public`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::{Migration, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::change::{Change, Lsn, Position, Row};
use crate::change::{RawMessage, Undecodable, UndecodableReason};
pub(crate) use crate::config::{MigrationMode, OnError};

/// The migrations of `migrations/`, embedded at compile time.
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The command that applies the migrations, for messages.
pub(crate) const MIGRATE_COMMAND: &str = "evictd migrate --config FILE";

/// Why a change was dead-lettered: the `error_kind` column and the `reason`
/// label of the dead-letter metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterReason {
    /// A look-up failed in a way that will fail again (a query error).
    LookupFailed,
    /// A look-up failed `lookup_attempts` times with a retryable error
    /// (a statement timeout, a serialization failure).
    LookupAttemptsExhausted,
    /// A message the source could not decode.
    Undecodable(UndecodableReason),
}

impl DeadLetterReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::LookupFailed => "lookup_failed",
            DeadLetterReason::LookupAttemptsExhausted => "lookup_attempts_exhausted",
            DeadLetterReason::Undecodable(reason) => reason.as_str(),
        }
    }
}

/// One change that could not be resolved, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub(crate) change: Arc<Change>,
    pub(crate) reason: DeadLetterReason,
    /// The last error, as the operator should read it.
    pub(crate) error: String,
    /// How many times the change's look-ups ran.
    pub(crate) attempts: u32,
}

impl DeadLetter {
    /// The kind of source the change came from (the `source` column).
    pub(crate) fn source_kind(&self) -> &'static str {
        source_kind(&self.change.position)
    }

    /// The commit LSN of a Postgres change (the `lsn` column).
    pub(crate) fn commit_lsn(&self) -> Option<Lsn> {
        commit_lsn(&self.change.position)
    }
}

/// The kind of source a position belongs to (the `source` column).
fn source_kind(position: &Position) -> &'static str {
    match position {
        Position::Postgres { .. } => "postgres",
        Position::Kafka { .. } => "kafka",
        Position::File { .. } => "file",
    }
}

/// The commit LSN of a Postgres position (the `lsn` column).
fn commit_lsn(position: &Position) -> Option<Lsn> {
    match position {
        Position::Postgres { commit_lsn, .. } => Some(*commit_lsn),
        _ => None,
    }
}

/// Why a dead letter could not be written, or the migrations not run.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The database did not answer (down, restarting, unreachable).
    #[error("dead-letter database unreachable: {0}")]
    Unreachable(String),
    /// The database answered with an error.
    #[error("dead-letter write failed: {message}")]
    Write { message: String, transient: bool },
    /// `migrations = "verify"` and some are not applied.
    #[error(
        "the dead-letter schema `{schema}` lacks evictd's migration(s) {}: apply them with `{MIGRATE_COMMAND}` (or set dead_letter.migrations = \"apply\")",
        pending.join(", ")
    )]
    Pending { schema: String, pending: Vec<String> },
    /// Applying or checking the migrations failed; the message says why.
    #[error("migrations of schema `{schema}`: {message}")]
    Migrate { schema: String, message: String, transient: bool },
}

impl DeadLetterError {
    /// Transient failures are retried with backoff (never skipped); a
    /// definite one needs an operator.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            DeadLetterError::Unreachable(_) => true,
            DeadLetterError::Write { transient, .. } | DeadLetterError::Migrate { transient, .. } => *transient,
            DeadLetterError::Pending { .. } => false,
        }
    }

    /// The metric label of a failed write.
    pub(crate) fn kind(&self) -> &'static str {
        if self.is_transient() { "transient" } else { "definite" }
    }
}

/// Whether a database error will go away by itself: connection trouble and
/// server shutdowns do; syntax, permission (class 42) and data (22) errors
/// and a missing table do not.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            !(code.starts_with("42") || code.starts_with("22") || code.starts_with("23"))
        }
        sqlx::Error::Configuration(_) | sqlx::Error::ColumnNotFound(_) | sqlx::Error::TypeNotFound { .. } => false,
        _ => true,
    }
}

/// Whether `e` says the database could not be reached at all.
fn is_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

fn write_error(e: sqlx::Error) -> DeadLetterError {
    if is_unreachable(&e) {
        DeadLetterError::Unreachable(e.to_string())
    } else {
        DeadLetterError::Write { transient: is_transient(&e), message: e.to_string() }
    }
}

/// Where dead letters go. Contract: `record` and `record_undecodable`
/// return `Ok` only once the letter is durably stored; each is safe to call
/// again with the same letter.
pub trait DeadLetterStore {
    /// A change that could not be resolved.
    fn record(&self, letter: &DeadLetter) -> impl Future<Output = Result<(), DeadLetterError>> + Send;
    /// A message a source could not decode, with its raw payload.
    fn record_undecodable(&self, message: &Undecodable) -> impl Future<Output = Result<(), DeadLetterError>> + Send;
}

/// The dead-letter table in Postgres, through a `sqlx` pool.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    pool: PgPool,
    schema: String,
    timeout: Duration,
}

/// What [`DeadLetters::migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MigrationReport {
    /// Migrations applied now, as `0001_dead_letters`.
    pub(crate) applied: Vec<String>,
}

/// A migration's name as its file is named: `0001_dead_letters`.
fn migration_name(m: &Migration) -> String {
    format!("{:04}_{}", m.version, m.description.replace(' ', "_"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl DeadLetters {
    /// A store over a lazily connected pool; every statement is bounded by
    /// `timeout`. `schema` holds evictd's own tables.
    pub fn connect_lazy(url: &SecretString, schema: &str, timeout: Duration) -> Result<DeadLetters, DeadLetterError> {
        // Connected lazily: `sslmode=allow` takes prefer's rule here (`pgconn`).
        let options = crate::pgconn::Conn::new(url.expose_secret())
            .map_err(|e| DeadLetterError::Migrate {
                schema: schema.to_owned(),
                message: format!("dead_letter.url: {e}"),
                transient: false,
            })?
            .options_now()
            .application_name("evictd")
            .options([("search_path", schema)]);
        let pool = PgPoolOptions::new().max_connections(2).acquire_timeout(timeout).connect_lazy_with(options);
        Ok(DeadLetters { pool, schema: schema.to_owned(), timeout })
    }

    pub(crate) fn schema(&self) -> &str {
        &self.schema
    }

    /// The pool, for `evictd dead-letters` (its statements run with
    /// `search_path` set to the schema).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the pending migrations (`Apply`), or refuses with
    /// [`DeadLetterError::Pending`] when there are any (`Verify`).
    pub(crate) async fn migrate(&self, mode: MigrationMode) -> Result<MigrationReport, DeadLetterError> {
        let pending = self.pending().await?;
        if pending.is_empty() {
            return Ok(MigrationReport { applied: Vec::new() });
        }
        if mode == MigrationMode::Verify {
            return Err(DeadLetterError::Pending { schema: self.schema.clone(), pending });
        }
        let create = format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&self.schema));
        let created =
            tokio::time::timeout(self.timeout, sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&self.pool))
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut));
        match created {
            Ok(_) => {}
            // Another replica created it at the same moment.
            Err(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("42P06" | "23505")) => {}
            Err(e) => return Err(self.migrate_error(write_error(e))),
        }
        // Every pool connection has `search_path` set to the schema, so the
        // migrations and `_sqlx_migrations` land there. The migrator holds an
        // advisory lock: replicas starting together apply each once.
        MIGRATOR.run(&self.pool).await.map_err(|e| {
            let (transient, message) = match &e {
                sqlx::migrate::MigrateError::Execute(inner)
                | sqlx::migrate::MigrateError::ExecuteMigration(inner, _) => (is_transient(inner), e.to_string()),
                _ => (false, e.to_string()),
            };
            DeadLetterError::Migrate { schema: self.schema.clone(), message, transient }
        })?;
        Ok(MigrationReport { applied: pending })
    }

    /// The embedded migrations not applied to the schema yet; an applied
    /// migration that failed half-way or whose file changed is an error.
    pub(crate) async fn pending(&self) -> Result<Vec<String>, DeadLetterError> {
        let table = format!("{}._sqlx_migrations", quote_ident(&self.schema));
        let exists: bool = self
            .bounded(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(&table).fetch_one(&self.pool))
            .await
            .map_err(|e| self.migrate_error(e))?;
        let applied: Vec<(i64, Vec<u8>, bool)> = if exists {
            let sql = format!("SELECT version, checksum, success FROM {table} ORDER BY version");
            self.bounded(sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool))
                .await
                .map_err(|e| self.migrate_error(e))?
        } else {
            Vec::new()
        };
        let definite =
            |message: String| DeadLetterError::Migrate { schema: self.schema.clone(), message, transient: false };
        let mut pending = Vec::new();
        for migration in MIGRATOR.iter().filter(|m| !m.migration_type.is_down_migration()) {
            match applied.iter().find(|(v, _, _)| *v == migration.version) {
                None => pending.push(migration_name(migration)),
                Some((_, _, false)) => {
                    return Err(definite(format!(
                        "migration {} failed half-way: fix the schema by hand, then delete its row from {table}",
                        migration_name(migration)
                    )));
                }
                Some((_, checksum, true)) if checksum.as_slice() != &*migration.checksum => {
                    return Err(definite(format!(
                        "migration {} was applied from a different file than this evictd's",
                        migration_name(migration)
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(pending)
    }

    /// Runs `query` under the store's timeout.
    async fn bounded<T>(&self, query: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, DeadLetterError> {
        match tokio::time::timeout(self.timeout, query).await {
            Ok(result) => result.map_err(write_error),
            Err(_) => Err(DeadLetterError::Unreachable(format!(
                "no answer within {} ms",
                u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX)
            ))),
        }
    }

    fn migrate_error(&self, e: DeadLetterError) -> DeadLetterError {
        match e {
            DeadLetterError::Write { message, transient } => {
                DeadLetterError::Migrate { schema: self.schema.clone(), message, transient }
            }
            other => other,
        }
    }
}

/// `text` without NUL characters, which Postgres `text` and `jsonb` refuse.
fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// A row image as the `before`/`after` JSON: column → value, unknown cells
/// as `{"unknown": true}`, bytes as hex, NUL characters replaced.
pub(crate) fn row_json(row: &Row) -> serde_json::Value {
    fn clean(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::String(s) if s.contains('\0') => serde_json::Value::String(without_nul(&s)),
            serde_json::Value::Object(map) => {
                serde_json::Value::Object(map.into_iter().map(|(k, v)| (without_nul(&k), clean(v))).collect())
            }
            other => other,
        }
    }
    clean(row.to_json())
}

/// Bytes as JSON: a string when they are UTF-8 (NUL characters replaced),
/// else Postgres's bytea text (`\x` and hex), so as not to pass for text.
fn bytes_json(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::Value::String(without_nul(text)),
        Err(_) => serde_json::Value::String(format!("\\x{}", hex::encode(bytes))),
    }
}

/// A raw message as the `after` document of its row: `key`, `value` (each
/// null when absent) and `headers` as `[name, value]` pairs.
fn raw_json(raw: &RawMessage) -> serde_json::Value {
    let headers: Vec<serde_json::Value> = raw
        .headers
        .iter()
        .map(|(name, value)| serde_json::json!([without_nul(name), value.as_deref().map(bytes_json)]))
        .collect();
    serde_json::json!({
        "key": raw.key.as_deref().map(bytes_json),
        "value": raw.value.as_deref().map(bytes_json),
        "headers": headers,
    })
}

/// The `op` of a message that could not be decoded: it has no table and no
/// operation, only its raw payload (in `after`).
pub(crate) const UNDECODABLE_OP: &str = "undecodable";

impl DeadLetterStore for DeadLetters {
    async fn record(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let change = &letter.change;
        let sql = format!(
            "INSERT INTO {}.dead_letters (source, position, lsn, table_name, op, before, after, error, error_kind, attempts) \
             VALUES ($1, $2, $3::pg_lsn, $4, $5, $6::jsonb, $7::jsonb, $8, $9, $10) \
             ON CONFLICT (source, position, table_name) DO NOTHING",
            quote_ident(&self.schema)
        );
        let image = |row: &Option<Row>| row.as_ref().map(|r| row_json(r).to_string());
        let query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(letter.source_kind())
            .bind(change.position.to_string())
            .bind(letter.commit_lsn().map(|l| l.to_string()))
            .bind(without_nul(&change.table))
            .bind(change.op.as_str())
            .bind(image(&change.before))
            .bind(image(&change.after))
            .bind(without_nul(&letter.error))
            .bind(letter.reason.as_str())
            .bind(i32::try_from(letter.attempts).unwrap_or(i32::MAX));
        self.bounded(query.execute(&self.pool)).await.map(|_| ())
    }

    /// The table has no column for a raw message, and no source that
    /// writes here yields one today: it is stored without a migration as a
    /// row with no table (`''`), op `undecodable`, the reason as
    /// `error_kind`, no attempts (no look-up ran) and the raw message as
    /// the `after` document ([`raw_json`]), so that nothing is lost and no
    /// row image is faked.
    async fn record_undecodable(&self, message: &Undecodable) -> Result<(), DeadLetterError> {
        let sql = format!(
            "INSERT INTO {}.dead_letters (source, position, lsn, table_name, op, before, after, error, error_kind, attempts) \
             VALUES ($1, $2, $3::pg_lsn, '', $4, NULL, $5::jsonb, $6, $7, 0) \
             ON CONFLICT (source, position, table_name) DO NOTHING",
            quote_ident(&self.schema)
        );
        let query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(source_kind(&message.position))
            .bind(message.position.to_string())
            .bind(commit_lsn(&message.position).map(|l| l.to_string()))
            .bind(UNDECODABLE_OP)
            .bind(raw_json(&message.raw).to_string())
            .bind(without_nul(&message.error))
            .bind(message.reason.as_str());
        self.bounded(query.execute(&self.pool)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Cell, Operation, Value};

    #[test]
    fn the_embedded_migrations_start_with_the_dead_letter_table() {
        let names: Vec<String> = MIGRATOR.iter().map(migration_name).collect();
        assert_eq!(names.first().map(String::as_str), Some("0001_dead_letters"));
    }

    #[test]
    fn row_images_mark_unknown_cells_and_drop_nul_characters() {
        let mut row = Row::new().with("id", Value::Int(13)).with("name", Value::Text("a\0b".into()));
        row.set("body", Cell::Unknown);
        let json = row_json(&row);
        assert_eq!(json, serde_json::json!({"id": 13, "name": "a\u{FFFD}b", "body": {"unknown": true}}));
    }

    #[test]
    fn a_postgres_letter_carries_its_commit_lsn_and_source() {
        let mut change = Change::new("app.items", Operation::Insert, None, Some(Row::new()));
        change.position = Position::Postgres { commit_lsn: Lsn(0x10), lsn: Lsn(0x8) };
        let letter = DeadLetter {
            change: Arc::new(change),
            reason: DeadLetterReason::LookupFailed,
            error: "division by zero".into(),
            attempts: 1,
        };
        assert_eq!(letter.source_kind(), "postgres");
        assert_eq!(letter.commit_lsn(), Some(Lsn(0x10)));
    }

    #[test]
    fn a_raw_message_keeps_text_as_text_and_other_bytes_as_hex() {
        let raw = RawMessage {
            key: Some(b"{\"id\": 1}".to_vec()),
            value: Some(vec![0xff, 0x00, 0x41]),
            headers: vec![("trace".into(), Some(b"a\0b".to_vec())), ("empty".into(), None)],
        };
        assert_eq!(
            raw_json(&raw),
            serde_json::json!({
                "key": "{\"id\": 1}",
                "value": "\\xff0041",
                "headers": [["trace", "a\u{FFFD}b"], ["empty", null]],
            })
        );
        assert_eq!(DeadLetterReason::Undecodable(UndecodableReason::TooLarge).as_str(), "too_large");
    }

    #[test]
    fn verify_mode_names_the_pending_migrations_and_the_command() {
        let e = DeadLetterError::Pending { schema: "evictd".into(), pending: vec!["0001_dead_letters".into()] };
        let text = e.to_string();
        assert!(text.contains("0001_dead_letters") && text.contains(MIGRATE_COMMAND), "{text}");
        assert!(!e.is_transient());
    }

    #[test]
    fn an_unreachable_database_is_transient_and_a_missing_table_definite() {
        assert!(DeadLetterError::Unreachable("refused".into()).is_transient());
        assert!(!write_error(sqlx::Error::ColumnNotFound("x".into())).is_transient());
        assert!(write_error(sqlx::Error::PoolTimedOut).is_transient());
    }
}
