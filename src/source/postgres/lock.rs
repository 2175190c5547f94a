//! One active consumer per slot: a session-level advisory lock with a lease.
//!
//! Every replica of a Deployment runs `evictd run` on the same slot; the
//! one holding the slot's lock is **active** (it streams and acknowledges),
//! the others are **standbys**: they retry the lock every
//! `standby_retry_ms` and take over once the holder's database session ends
//! — at once when its process dies (the server sees the socket close), after
//! the lease when its process is frozen (SIGSTOP, a stalled VM: the kernel
//! still answers TCP, so the session would otherwise stay open), or after
//! TCP keepalives when its host vanishes.
//!
//! **The lease** is the lock session's `idle_session_timeout` (Postgres 14
//! and later), set to `lock_lease_ms`: the server ends a session that idles
//! that long, which frees the lock. The active replica checks its lock every
//! `standby_retry_ms`, so a live holder never idles that long (validation
//! keeps the lease above `standby_retry_ms` plus the round-trip bound).
//! Without the setting (an older server, or it was refused) the replica
//! runs without a lease and says so.
//!
//! A frozen holder's walsender keeps the slot "active for PID n" until
//! `wal_sender_timeout`, even once its lock is gone. The new holder ends it
//! (`pg_terminate_backend`): **only a replica holding the lock ends another
//! session's walsender**, and that walsender can only be a previous holder's
//! (the one holding the lock is the only one that streams). It needs the
//! same role as the walsender's or `pg_signal_backend`.
//!
//! The lock is a safety margin, not the only guard: Postgres itself lets
//! one walsender at a time use a slot, and every effect is idempotent, so
//! a moment with two replicas believing they are active (a lock session
//! lost while its holder still streams) repeats work, never skips any.
//! The active replica checks its lock session every `standby_retry_ms` and
//! steps down (flushes, acknowledges, stops streaming) when it is gone; a
//! frozen holder that wakes up finds both its lock and its replication
//! connection ended, so nothing it acknowledges reaches the slot.
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
    /// Why the lock has no lease although one was asked for.
    lease_unavailable: Option<String>,
}

/// How long one lock round trip may take.
const TIMEOUT: Duration = crate::config::LOCK_ROUND_TRIP;

/// The first server version with `idle_session_timeout`.
const LEASE_SINCE: i32 = 140_000;

impl SlotLock {
    /// Takes the lock if nobody holds it; `Ok(None)` if another session
    /// does. With a `lease`, the lock's session is ended by the server once
    /// it idles that long (see [`SlotLock::lease_unavailable`] for when it
    /// cannot be).
    pub(crate) async fn try_acquire(
        url: &SecretString,
        slot: &str,
        lease: Option<Duration>,
    ) -> Result<Option<SlotLock>, LockError> {
        // Bounded too: under sslmode=allow it probes the server.
        let options = bounded(crate::pgconn::connect_options(url.expose_secret()))
            .await?
            .map_err(|e| error("cannot connect", &sqlx::Error::from(e)))?;
        let connect = PgConnection::connect_with(&options);
        let mut conn = bounded(connect).await?.map_err(|e| error("cannot connect", &e))?;
        let query =
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock(hashtextextended('evictd slot ' || $1, 0))")
                .bind(slot)
                .fetch_one(&mut conn);
        let taken = bounded(query).await?.map_err(|e| error("cannot try the lock", &e))?;
        if !taken {
            // Closing the session drops nothing: we hold nothing.
            let _ = bounded(conn.close()).await;
            return Ok(None);
        }
        let lease_unavailable = match lease {
            Some(lease) => set_lease(&mut conn, lease).await?,
            None => None,
        };
        Ok(Some(SlotLock { conn, slot: slot.to_owned(), lease_unavailable }))
    }

    /// Why the lock has no lease although one was asked for: the server is
    /// older than 14, or refused `idle_session_timeout`. A frozen holder
    /// then keeps the lock until its process or host is gone.
    pub(crate) fn lease_unavailable(&self) -> Option<&str> {
        self.lease_unavailable.as_deref()
    }

    /// Ends the walsender that still streams the slot for a previous holder
    /// (a frozen replica's, until `wal_sender_timeout`), and waits a moment
    /// for the slot to be free; the pid ended, if any. Only for a replica
    /// that holds the lock.
    pub(crate) async fn end_stale_walsender(&mut self) -> Result<Option<i32>, LockError> {
        let query = sqlx::query_scalar::<_, i32>(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(&self.slot)
        .fetch_optional(&mut self.conn);
        let Some(pid) = bounded(query).await?.map_err(|e| error("cannot read the slot's walsender", &e))? else {
            return Ok(None);
        };
        let query =
            sqlx::query_scalar::<_, bool>("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&mut self.conn);
        bounded(query).await?.map_err(|e| {
            error(&format!("cannot end walsender {pid} (needs the same role or pg_signal_backend)"), &e)
        })?;
        // Its exit frees the slot; a session started before then is refused
        // ("active for PID") and retried, so waiting is only a courtesy.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            let query = sqlx::query_scalar::<_, bool>(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active_pid = $2)",
            )
            .bind(&self.slot)
            .bind(pid)
            .fetch_one(&mut self.conn);
            if bounded(query).await?.map_err(|e| error("cannot read the slot's walsender", &e))? {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Some(pid))
    }

    /// Checks that the lock's session is still alive (and so still holds
    /// it); each check also renews the lease.
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

/// Sets the lease on the lock's session: `Ok(Some(why))` when the server
/// cannot enforce one, `Err` when the session itself failed.
async fn set_lease(conn: &mut PgConnection, lease: Duration) -> Result<Option<String>, LockError> {
    let query = sqlx::query_scalar::<_, String>("SELECT current_setting('server_version_num')").fetch_one(&mut *conn);
    let version = bounded(query).await?.map_err(|e| error("cannot read the server version", &e))?;
    match version.parse::<i32>() {
        Ok(v) if v >= LEASE_SINCE => {}
        _ => return Ok(Some(format!("the server (version {version}) has no idle_session_timeout (Postgres 14)"))),
    }
    let query = sqlx::query("SELECT set_config('idle_session_timeout', $1, false)")
        .bind(lease.as_millis().to_string())
        .execute(&mut *conn);
    match bounded(query).await? {
        Ok(_) => Ok(None),
        Err(e @ sqlx::Error::Database(_)) => Ok(Some(format!(
            "the server refused idle_session_timeout: {}",
            crate::config::hide_passwords(&e.to_string())
        ))),
        Err(e) => Err(error("cannot set the lease", &e)),
    }
}

async fn bounded<T>(f: impl Future<Output = T>) -> Result<T, LockError> {
    tokio::time::timeout(TIMEOUT, f).await.map_err(|_| LockError(format!("no answer within {TIMEOUT:?}")))
}

fn error(what: &str, e: &sqlx::Error) -> LockError {
    LockError(format!("{what}: {}", crate::config::hide_passwords(&e.to_string())))
}
