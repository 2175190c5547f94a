//! Look-ups against Postgres: the [`LookupExecutor`] the daemon, `explain`
//! and `replay` run.
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
//! Every query runs under a timeout. The connection is acquired before the
//! timed query, so a database that cannot be reached shows as a connection
//! error, never as a query timeout.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row as _;
use sqlx::postgres::{PgConnectOptions, PgPool};

use super::{LookupError, LookupExecutor, LookupOutcome, LookupRows};
use crate::change::Value;
use crate::graph::Lookup;

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
    /// Read as every connection reads the URL (`crate::pgconn`); the pool
    /// is connected lazily, so `sslmode=allow` takes prefer's rule.
    pub(crate) fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
        Ok(crate::source::postgres::session::pin_lookup(crate::pgconn::Conn::new(url)?.options_now()))
    }
}

/// The user's query wrapped to return each parameter as itself and as text
/// (columns `2i` and `2i + 1`), and at most `limit + 1` rows.
pub(crate) fn wrap_query(query: &str, params: &[Arc<str>], limit: u64) -> String {
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
}
