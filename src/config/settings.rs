//! Settings the runtime reads as they are: plain data, defined here so that
//! `config` imports nothing above it (the modules that use them re-export
//! them: `batch::BatchLimits`, `server::{HealthThresholds, ServerLimits}`,
//! `dead_letter::{OnError, MigrationMode}`).

use std::time::Duration;

/// When a batch is closed and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchLimits {
    /// Close once this many distinct effects, or whole transactions, or
    /// changes kept for look-ups, are queued.
    pub(crate) max_effects: usize,
    /// Close this long after the batch's first transaction arrived.
    pub(crate) max_delay: Duration,
    /// Close once the batch holds about this many bytes (effects, and the
    /// changes its look-ups came from).
    pub(crate) max_bytes: usize,
}

/// When the probes fail (`[server]` `heartbeat_timeout_ms` and
/// `ready_max_lag_bytes` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthThresholds {
    /// `/healthz` fails once the run loop has not beaten for longer than
    /// this. Default 30 s.
    pub heartbeat_timeout: Duration,
    /// `/readyz` fails while the source lag exceeds this. Default 1 GiB:
    /// lag counts all the server's WAL, including tables evictd ignores, so a
    /// low threshold would flap on unrelated bulk writes.
    pub max_lag_bytes: u64,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        HealthThresholds { heartbeat_timeout: Duration::from_secs(30), max_lag_bytes: 1 << 30 }
    }
}

/// The HTTP server's limits (`[server]` `header_read_timeout_ms`,
/// `request_timeout_ms` and `max_connections` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Longest wait for a request's head (request line and headers), from
    /// the moment the server waits for it: a new connection, or one idle
    /// after its previous answer. Past it the connection is closed.
    pub header_read_timeout: Duration,
    /// Longest a request may take once its head is read: producing the
    /// answer (else 503) and writing it to a client that stopped reading
    /// (else the connection is closed).
    pub request_timeout: Duration,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// What the run loop does with a change it cannot resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnError {
    /// Record it in the dead-letter table, count it, and keep going.
    DeadLetter,
    /// Stop the daemon without acknowledging it: a restart meets it again.
    Stop,
}

/// What `evictd run` does with migrations not applied yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MigrationMode {
    /// Apply them at start-up.
    Apply,
    /// Refuse to start, naming them and the command that applies them.
    Verify,
}
