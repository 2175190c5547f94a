//! The look-up seam: what running a dependency's SQL returns, how it fails,
//! and the trait every executor implements (Postgres in `postgres.rs`,
//! fixed rows in tests, "too many rows" in a dry-run replay).
//!
//! This module only classifies a failure ([`LookupError::is_transient`],
//! [`LookupError::is_query_fault`], [`LookupError::is_connection`]); what
//! to do about it is `crate::policy`'s decision.

use std::future::Future;
use std::sync::Arc;

use crate::change::Value;
use crate::graph::Lookup;
use crate::policy::LookupFailure;

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
    pub(crate) fn is_query_fault(&self) -> bool {
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
    /// The kind of failure it is, for `crate::policy`.
    pub(crate) fn failure(&self) -> LookupFailure {
        if self.is_connection() {
            LookupFailure::Connection
        } else if self.is_query_fault() {
            LookupFailure::BrokenQuery
        } else if self.is_transient() {
            LookupFailure::Retryable
        } else {
            LookupFailure::Definite
        }
    }

    pub(crate) fn is_connection(&self) -> bool {
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
pub(crate) type LookupRows = Vec<Vec<Option<Value>>>;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
