//! One active consumer per slot: a session-level advisory lock.
//!
//! Every replica of a Deployment runs `evictd run` on the same slot; the
//! one holding the slot's lock is **active** (it streams and acknowledges),
//! the others are **standbys**: they retry the lock every
//! `standby_retry_ms` and take over once the holder's database session ends
//! — at once when its process dies (the server sees the socket close), or
//! after TCP keepalives / `wal_sender_timeout` when its host vanishes.
//!
//! The lock is a safety margin, not the only guard: Postgres itself lets
//! one walsender at a time use a slot, and every effect is idempotent, so
//! a moment with two replicas believing they are active (a lock session
//! lost while its holder still streams) repeats work, never skips any.
//! The active replica checks its lock session every `standby_retry_ms` and
//! steps down (flushes, acknowledges, stops streaming) when it is gone.
//!
//! The lock is `pg_try_advisory_lock(hashtextextended('evictd slot ' ||
//! slot, 0))`, in the slot's database: nothing needs the Kubernetes API.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// Why the lock could not be taken or kept. Always worth a retry: the
/// database is down or the session was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slot lock: {0}")]
pub(crate) struct LockError(String);

/// The slot's lock, held by this process while the value lives.
pub(crate) struct SlotLock {
    conn: PgConnection,
    slot: String,
}

/// How long one lock round trip may take.
const TIMEOUT: Duration = Duration::from_secs(5);

impl SlotLock {
    /// Takes the lock if nobody holds it; `Ok(None)` if another session does.
    pub(crate) async fn try_acquire(url: &SecretString, slot: &str) -> Result<Option<SlotLock>, LockError> {
        let connect = PgConnection::connect(url.expose_secret());
        let mut conn = bounded(connect).await?.map_err(|e| error("cannot connect", &e))?;
        let query =
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock(hashtextextended('evictd slot ' || $1, 0))")
                .bind(slot)
                .fetch_one(&mut conn);
        let taken = bounded(query).await?.map_err(|e| error("cannot try the lock", &e))?;
        if taken {
            Ok(Some(SlotLock { conn, slot: slot.to_owned() }))
        } else {
            // Closing the session drops nothing: we hold nothing.
            let _ = bounded(conn.close()).await;
            Ok(None)
        }
    }

    /// Checks that the lock's session is still alive (and so still holds it).
    pub(crate) async fn check(&mut self) -> Result<(), LockError> {
        let query = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut self.conn);
        bounded(query).await?.map_err(|e| error("the lock's session failed", &e))?;
        Ok(())
    }

    /// Releases the lock by ending its session.
    pub(crate) async fn release(self) {
        let slot = self.slot;
        if let Err(e) = bounded(self.conn.close()).await.and_then(|r| r.map_err(|e| error("closing", &e))) {
            tracing::warn!(%slot, error = %e, "could not close the lock's session; the server will end it");
        }
    }
}

async fn bounded<T>(f: impl Future<Output = T>) -> Result<T, LockError> {
    tokio::time::timeout(TIMEOUT, f).await.map_err(|_| LockError(format!("no answer within {TIMEOUT:?}")))
}

fn error(what: &str, e: &sqlx::Error) -> LockError {
    LockError(format!("{what}: {}", crate::config::hide_passwords(&e.to_string())))
}
