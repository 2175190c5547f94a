//! Executing look-ups: the SQL half of resolution.
//!
//! Requests of one dependency are batched into one query per chunk of
//! distinct arguments (`$1` is the array of them, so the user's query says
//! `WHERE author_id = ANY($1)`; integers bind as `bigint[]`, anything else
//! as `text[]`). The user's query is wrapped so that:
//! - each key parameter comes back twice, as itself and as text: integers,
//!   booleans, floats and bytea are read as such (so a chained look-up binds them
//!   as `bigint[]` again), every other type as Postgres prints it (numeric,
//!   uuid, timestamps), which is how the replication stream renders them
//!   (both sessions pin the settings that change that: `source::postgres::session`);
//! - at most `fanout_limit + 1` rows are read: more than the limit and the
//!   cache's namespace is bumped instead, so memory stays bounded.
//!
//! Every query runs under a timeout. A look-up that keeps failing is the
//! run loop's to retry or dead-letter; this module only classifies the
//! failure ([`LookupError::is_transient`], [`LookupError::is_connection`]).
//! The connection is acquired before the timed query, so a database that
//! cannot be reached shows as a connection error, never as a query timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row as _;
use sqlx::postgres::{PgConnectOptions, PgPool};
use tracing::Instrument as _;

use super::{LookupRequest, Path, Resolution, Resolver};
use crate::change::Value;
use crate::graph::{DepId, Lookup};

/// Why a look-up failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("look-up of {field} timed out after {timeout_ms} ms")]
    Timeout { field: String, timeout_ms: u64 },
    #[error("look-up of {field} failed: {source}")]
    Query {
        field: String,
        #[source]
        source: sqlx::Error,
    },
}

impl LookupError {
    /// Transient failures are worth retrying; a definite one (a query that
    /// does not compile, a column that does not exist) will fail again.
    pub fn is_transient(&self) -> bool {
        match self {
            LookupError::Timeout { .. } => true,
            LookupError::Query { source, .. } => match source {
                sqlx::Error::Database(db) => {
                    // Class 42: syntax error or access rule violation;
                    // 22: data exception. Both are the query's fault.
                    let code = db.code();
                    let code = code.as_deref().unwrap_or("");
                    !(code.starts_with("42") || code.starts_with("22"))
                }
                sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::TypeNotFound { .. } => false,
                _ => true,
            },
        }
    }

    /// Whether the query itself cannot run, whatever the values: a syntax
    /// error, an unknown column or table, a missing privilege (class 42).
    /// That is the graph's or the schema's fault, not a change's.
    pub fn is_query_fault(&self) -> bool {
        match self {
            LookupError::Timeout { .. } => false,
            LookupError::Query { source, .. } => match source {
                sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("42")),
                sqlx::Error::ColumnNotFound(_) | sqlx::Error::TypeNotFound { .. } => true,
                _ => false,
            },
        }
    }

    /// Whether the database could not be reached or dropped the connection:
    /// back-pressure to wait out, never the fault of the change looked up.
    /// A query that timed out or failed on a live connection is not one.
    pub fn is_connection(&self) -> bool {
        match self {
            LookupError::Timeout { .. } => false,
            LookupError::Query { source, .. } => match source {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // Class 08: connection exception; 57P01-57P03: the server
                // is shutting down, crashed, or not accepting connections yet.
                sqlx::Error::Database(db) => {
                    let code = db.code();
                    let code = code.as_deref().unwrap_or("");
                    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
                }
                _ => false,
            },
        }
    }
}

/// What one batched look-up returned.
#[derive(Debug, Clone, PartialEq)]
pub enum LookupOutcome {
    /// `rows[r][i]` is key parameter `i` of the target cache.
    Rows(LookupRows),
    /// More rows than the cache's fan-out limit.
    FanoutExceeded { rows: u64 },
}

/// Key parameters returned by a look-up, one vector per row.
pub type LookupRows = Vec<Vec<Option<Value>>>;

/// Runs the SQL of look-up dependencies.
///
/// Contract: `execute` returns every row the query yields for `args`, up to
/// `limit`; past `limit` it returns [`LookupOutcome::FanoutExceeded`] and
/// never holds more than `limit + 1` rows in memory. It is safe to call
/// again with the same arguments (look-ups only read).
pub trait LookupExecutor {
    fn execute(
        &self,
        field: &str,
        lookup: &Lookup,
        args: &[Value],
        params: &[Arc<str>],
        limit: u64,
    ) -> impl Future<Output = Result<LookupOutcome, LookupError>> + Send;
}

/// Look-ups against Postgres through a `sqlx` pool.
#[derive(Debug, Clone)]
pub struct PgLookupExecutor {
    pool: PgPool,
    default_timeout: Duration,
    batch_size: usize,
}

impl PgLookupExecutor {
    /// `batch_size` bounds the `$1` array of one query; `default_timeout`
    /// applies to dependencies that set no `timeout_ms`.
    pub fn new(pool: PgPool, default_timeout: Duration, batch_size: usize) -> PgLookupExecutor {
        PgLookupExecutor { pool, default_timeout, batch_size: batch_size.max(1) }
    }

    /// Connection options for a look-up pool on `url`: the session settings
    /// that decide how values print are pinned as on the replication
    /// session ([`session`](crate::source::postgres::session)), so a key
    /// parameter read here renders as the same value from pgoutput does.
    pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
        Ok(crate::source::postgres::session::pin_lookup(PgConnectOptions::from_str(url)?))
    }
}

/// The user's query wrapped to return each parameter as itself and as text
/// (columns `2i` and `2i + 1`), and at most `limit + 1` rows.
pub fn wrap_query(query: &str, params: &[Arc<str>], limit: u64) -> String {
    let inner = query.trim().trim_end_matches(';').trim_end();
    let columns: Vec<String> = params
        .iter()
        .map(|p| {
            let quoted = p.replace('"', "\"\"");
            format!("evictd_lookup.\"{quoted}\", evictd_lookup.\"{quoted}\"::text")
        })
        .collect();
    format!("SELECT {} FROM ({inner}) AS evictd_lookup LIMIT {}", columns.join(", "), limit.saturating_add(1))
}

/// Reads parameter `i` of a wrapped look-up row.
fn read_param(row: &sqlx::postgres::PgRow, i: usize) -> Result<Option<Value>, sqlx::Error> {
    use sqlx::{Column as _, TypeInfo as _};
    let native = 2 * i;
    let type_name = row.columns().get(native).map(|c| c.type_info().name().to_owned()).unwrap_or_default();
    Ok(match type_name.as_str() {
        "INT2" => row.try_get::<Option<i16>, _>(native)?.map(|v| Value::Int(i64::from(v))),
        "INT4" => row.try_get::<Option<i32>, _>(native)?.map(|v| Value::Int(i64::from(v))),
        "INT8" => row.try_get::<Option<i64>, _>(native)?.map(Value::Int),
        "BOOL" => row.try_get::<Option<bool>, _>(native)?.map(Value::Bool),
        "FLOAT4" => row.try_get::<Option<f32>, _>(native)?.map(|v| Value::Float(f64::from(v))),
        "FLOAT8" => row.try_get::<Option<f64>, _>(native)?.map(Value::Float),
        // pgoutput's bytea is `Value::Bytes` too (the stream prints hex,
        // `typed` decodes it): never the printed text.
        "BYTEA" => row.try_get::<Option<Vec<u8>>, _>(native)?.map(Value::Bytes),
        _ => row.try_get::<Option<String>, _>(native + 1)?.map(Value::Text),
    })
}

/// How `$1` is bound: `bigint[]` when every argument is an integer,
/// `text[]` otherwise (booleans as `true`/`false`).
enum Args {
    Ints(Vec<i64>),
    Texts(Vec<String>),
}

fn bind_args(args: &[Value]) -> Args {
    let ints: Option<Vec<i64>> = args.iter().map(|a| if let Value::Int(i) = a { Some(*i) } else { None }).collect();
    match ints {
        Some(ints) => Args::Ints(ints),
        None => Args::Texts(
            args.iter()
                .map(|a| match a {
                    Value::Text(s) => s.clone(),
                    Value::Bytes(b) => hex::encode(b),
                    other => other.to_string(),
                })
                .collect(),
        ),
    }
}

impl LookupExecutor for PgLookupExecutor {
    async fn execute(
        &self,
        field: &str,
        lookup: &Lookup,
        args: &[Value],
        params: &[Arc<str>],
        limit: u64,
    ) -> Result<LookupOutcome, LookupError> {
        let timeout = lookup.timeout_ms.map_or(self.default_timeout, Duration::from_millis);
        let sql = wrap_query(&lookup.query, params, limit);
        let mut connection =
            self.pool.acquire().await.map_err(|source| LookupError::Query { field: field.to_owned(), source })?;
        let mut rows: LookupRows = Vec::new();
        for chunk in args.chunks(self.batch_size) {
            let remaining = limit.saturating_sub(rows.len() as u64);
            // The SQL is the operator's own look-up query from the graph file,
            // wrapped; values only ever travel as the bound `$1` array.
            let query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
            let query = match bind_args(chunk) {
                Args::Ints(v) => query.bind(v),
                Args::Texts(v) => query.bind(v),
            };
            let fetched = tokio::time::timeout(timeout, query.fetch_all(&mut *connection))
                .await
                .map_err(|_| LookupError::Timeout {
                    field: field.to_owned(),
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                })?
                .map_err(|source| LookupError::Query { field: field.to_owned(), source })?;
            if fetched.len() as u64 > remaining {
                return Ok(LookupOutcome::FanoutExceeded { rows: rows.len() as u64 + fetched.len() as u64 });
            }
            for row in fetched {
                let mut values = Vec::with_capacity(params.len());
                for i in 0..params.len() {
                    let value =
                        read_param(&row, i).map_err(|source| LookupError::Query { field: field.to_owned(), source })?;
                    values.push(value);
                }
                rows.push(values);
            }
        }
        Ok(LookupOutcome::Rows(rows))
    }
}

/// Requests grouped by dependency: distinct arguments in first-seen order,
/// and the path of the first request (for reasons).
pub fn group_requests(requests: Vec<LookupRequest>) -> BTreeMap<DepId, (Path, Vec<Value>)> {
    let mut groups: BTreeMap<DepId, (Path, Vec<Value>)> = BTreeMap::new();
    for request in requests {
        let group = groups.entry(request.dependency).or_insert_with(|| (request.path.clone(), Vec::new()));
        if !group.1.contains(&request.arg) {
            group.1.push(request.arg);
        }
    }
    groups
}

impl Resolver<'_> {
    /// Executes `resolution`'s look-ups (and the look-ups their results ask
    /// for, along `embeds`) and folds the effects in, until none is left.
    pub async fn run_lookups<E: LookupExecutor>(
        &self,
        mut resolution: Resolution,
        executor: &E,
    ) -> Result<Resolution, LookupError> {
        let mut pending = std::mem::take(&mut resolution.lookups);
        while !pending.is_empty() {
            let mut next = Vec::new();
            for (dep_id, (path, args)) in group_requests(pending) {
                let dep = self.graph().dependency(dep_id);
                let crate::graph::Mapping::Lookup(lookup) = &dep.mapping else {
                    continue;
                };
                let cache = self.graph().cache(dep.cache);
                let field = format!("{}.lookup", dep.field);
                let span = tracing::debug_span!("lookup", dependency = %field, cache = %cache.name, args = args.len());
                let outcome = executor
                    .execute(&field, lookup, &args, cache.template.params(), cache.options.fanout_limit)
                    .instrument(span)
                    .await?;
                if let LookupOutcome::FanoutExceeded { rows } = &outcome {
                    tracing::warn!(
                        dependency = %field,
                        cache = %cache.name,
                        rows,
                        limit = cache.options.fanout_limit,
                        "look-up fan-out over the limit: bumping the cache's namespace"
                    );
                }
                let mut part = match outcome {
                    LookupOutcome::Rows(rows) => self.resolve_lookup_rows(dep_id, &path, &rows),
                    LookupOutcome::FanoutExceeded { rows } => self.fanout_exceeded(dep_id, &path, rows),
                };
                next.append(&mut part.lookups);
                resolution.merge(part);
            }
            pending = next;
        }
        Ok(resolution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_query_casts_params_to_text_and_limits_rows() {
        let sql = wrap_query("SELECT id FROM a WHERE b = ANY($1);  ", &[Arc::from("id")], 100);
        assert_eq!(
            sql,
            "SELECT evictd_lookup.\"id\", evictd_lookup.\"id\"::text FROM (SELECT id FROM a WHERE b = ANY($1)) AS evictd_lookup LIMIT 101"
        );
    }

    #[test]
    fn integer_args_bind_as_bigint_and_others_as_text() {
        assert!(matches!(bind_args(&[Value::Int(1), Value::Int(2)]), Args::Ints(v) if v == vec![1, 2]));
        match bind_args(&[Value::Int(1), Value::Text("x".into()), Value::Bool(true)]) {
            Args::Texts(v) => assert_eq!(v, vec!["1", "x", "true"]),
            Args::Ints(_) => panic!("mixed arguments must bind as text"),
        }
    }

    #[test]
    fn an_unreachable_database_is_a_connection_error_and_a_timeout_is_not() {
        let field = || "caches.x.depends[0].lookup".to_owned();
        assert!(LookupError::Query { field: field(), source: sqlx::Error::PoolTimedOut }.is_connection());
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(LookupError::Query { field: field(), source: sqlx::Error::Io(refused) }.is_connection());
        let timeout = LookupError::Timeout { field: field(), timeout_ms: 10 };
        assert!(!timeout.is_connection() && timeout.is_transient());
        assert!(
            !LookupError::Query { field: field(), source: sqlx::Error::ColumnNotFound("id".into()) }.is_connection()
        );
    }

    #[test]
    fn grouping_dedupes_arguments_per_dependency() {
        let req = |d, a| LookupRequest { dependency: DepId(d), arg: Value::Int(a), path: Path::new() };
        let groups = group_requests(vec![req(1, 5), req(0, 7), req(1, 5), req(1, 6)]);
        assert_eq!(groups[&DepId(1)].1, vec![Value::Int(5), Value::Int(6)]);
        assert_eq!(groups[&DepId(0)].1, vec![Value::Int(7)]);
    }
}
