//! The Postgres source: logical replication with the built-in `pgoutput`
//! plugin over the streaming replication protocol (`START_REPLICATION …
//! LOGICAL`), never polling.
//!
//! ```text
//!  sqlx (setup.rs)            pgwire-replication              pgoutput.rs
//!  checks, slot, publication   START_REPLICATION, keepalives,  Relation/Insert/Update/
//!  confirmed_flush_lsn ──────► status updates (flushed = ours) Delete/Truncate → Change
//! ```
//!
//! Acknowledgement: [`Source::acknowledge`] hands the LSN to the client,
//! which reports it as flushed in its next standby status update (every
//! `status_interval`, also on an idle stream and while we are backed up).
//! Nothing else ever moves the slot: the client never acknowledges on its
//! own. Replication resumes from the slot's `confirmed_flush_lsn`; right
//! after `START_REPLICATION` we check that nobody moved the slot past it in
//! between (changes would have been skipped).
//!
//! A silent stream (a network that drops the replication connection's
//! packets) is found dead through a session connection once the server
//! ended its walsender (`liveness.rs`); the start's replication connection
//! is bounded ([`REPLICATION_START_TIMEOUT`]) and its client aborted, not
//! left behind, when the start fails or is cancelled.
//!
//! Large transactions: protocol version 1 delivers a transaction only once
//! it committed (the server spills it to disk, `logical_decoding_work_mem`),
//! and we hand it on change by change: memory holds one change at a time
//! here; the run loop bounds what it accumulates per transaction.

pub(crate) mod identity;
pub(crate) mod liveness;
pub(crate) mod lock;
pub(crate) mod pgoutput;
pub(crate) mod publication;
pub(crate) mod session;
pub(crate) mod setup;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgPool, PgPoolOptions};

use self::liveness::Liveness;
use self::pgoutput::{Decoder, TxContext};
use super::{Source, SourceError, SourceEvent};
use crate::change::{Lsn, Position};
use crate::config::PostgresSource as PostgresConfig;
use crate::graph::Graph;
use crate::pgconn::Conn;

/// Why the source could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SourceSetupError {
    /// Retry with backoff: the server is down or restarting.
    #[error("{0}")]
    Transient(String),
    /// An operator must act: the message says what is missing.
    #[error("{0}")]
    Definite(String),
    /// The publication hides changes the graph needs (or lacks its
    /// tables), or tables lack the `REPLICA IDENTITY FULL` the graph needs:
    /// the database's setup contradicts the graph, like bad input (exit 2).
    /// The message names the publication or table, what would be missed
    /// and the SQL that fixes it.
    #[error("{0}")]
    Publication(String),
}

impl From<SourceSetupError> for SourceError {
    fn from(e: SourceSetupError) -> SourceError {
        match e {
            SourceSetupError::Transient(m) => SourceError::transient(m),
            SourceSetupError::Definite(m) | SourceSetupError::Publication(m) => SourceError::definite(m),
        }
    }
}

/// The source URL read as libpq reads it, with its TLS settings settled:
/// the replication connection and the setup pools take it from here
/// (`crate::pgconn`), so both treat the URL alike.
fn endpoint(url: &str) -> Result<Conn, SourceSetupError> {
    Conn::new(url).map_err(|e| SourceSetupError::Definite(format!("source URL: {e}")))
}

/// How long the replication connection may take to start streaming
/// (connect, authenticate, `START_REPLICATION` accepted). A healthy server
/// answers in milliseconds (the slot's decoding starts after the answer);
/// a silent network would otherwise hold the start until TCP gives up.
pub(crate) const REPLICATION_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A replication client that is aborted if dropped before it is
/// [`Starting::started`]: a start that failed or was cancelled leaves no
/// worker behind to finish its handshake (and take the slot) once a silent
/// network heals.
pub(crate) struct Starting(Option<ReplicationClient>);

impl Starting {
    fn client(&mut self) -> Result<&mut ReplicationClient, SourceSetupError> {
        self.0.as_mut().ok_or_else(|| SourceSetupError::Transient("replication connection: already handed on".into()))
    }

    fn started(mut self) -> Result<ReplicationClient, SourceSetupError> {
        self.0.take().ok_or_else(|| SourceSetupError::Transient("replication connection: already handed on".into()))
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(client) = self.0.as_mut() {
            client.abort();
        }
    }
}

/// Logical replication from one slot.
pub(crate) struct PostgresSource {
    client: ReplicationClient,
    slot: String,
    /// The walsender streaming to us (the slot's `active_pid` right after
    /// the start), when it could be read.
    walsender: Option<i32>,
    /// When the stream was last heard from and the slot last checked.
    liveness: Liveness,
    decoder: Decoder,
    /// The open transaction, between Begin and Commit.
    tx: Option<TxContext>,
    /// Events decoded but not yet handed out (a Truncate of several tables).
    pending: VecDeque<SourceEvent>,
    /// The last position handed to the client for its status updates.
    acknowledged: Lsn,
    status_interval: Duration,
    /// The graph's table names: a relation described under another name
    /// may be a partition of one of them.
    graph_tables: BTreeSet<Arc<str>>,
    /// Relations described under a name the graph does not know, to look up
    /// (in order, before anything after them is decoded) as partitions.
    resolving: VecDeque<u32>,
    /// Catalog queries while streaming (partitions attached later, the slot
    /// of a silent stream); connects only when needed, so an idle stream
    /// keeps one session open (checked every `liveness::CHECK_EVERY`).
    catalog: PgPool,
}

impl PostgresSource {
    /// Checks the server, prepares the slot and publication, and starts
    /// streaming from the slot's `confirmed_flush_lsn`.
    pub(crate) async fn start(config: &PostgresConfig, graph: &Graph) -> Result<PostgresSource, SourceSetupError> {
        let url = config.url.expose_secret();
        let endpoint = endpoint(url)?;
        let pool = admin_pool(&endpoint).await?;
        let state = setup::prepare(
            &pool,
            &config.slot,
            &config.publication,
            config.create_slot,
            config.create_publication,
            config.require_full_replica_identity,
            graph,
        )
        .await?;
        // Read after `prepare`, which may have created or completed the
        // publication: the partitions whose changes belong to graph tables.
        let partitions = publication::publication_report(&pool, &config.publication, graph).await?.partitions;
        let starting = connect_replication(&endpoint, |tls| {
            ReplicationConfig::new(
                endpoint.url.host.clone(),
                endpoint.url.user.clone(),
                endpoint.url.password.as_ref().map(|p| p.expose_secret().to_owned()).unwrap_or_default(),
                endpoint.url.database.clone(),
                config.slot.clone(),
                config.publication.clone(),
            )
            .with_port(endpoint.url.port)
            .with_tls(tls)
            .with_start_lsn(pgwire_replication::Lsn(state.confirmed_flush.0))
            .with_status_interval(config.status_interval)
            .with_wakeup_interval(config.status_interval)
            .with_buffer_size(4096)
            .with_application_name("evictd")
            // Values print as a look-up session prints them (`session`).
            .with_options(session::replication_options())
        })
        .await?;
        // We hold the slot now. Had anyone advanced it since we read it,
        // what lies between would be skipped: refuse.
        let after = setup::read_slot(&pool, &config.slot).await?.ok_or_else(|| {
            SourceSetupError::Transient(format!("replication slot `{}` vanished while starting", config.slot))
        })?;
        let walsender = liveness::slot_walsender(&pool, &config.slot).await.ok().flatten().flatten();
        pool.close().await;
        // Start again from where it is now (an acknowledgement of a
        // replica that just stepped down can land late).
        if after.confirmed_flush > state.confirmed_flush {
            return Err(SourceSetupError::Transient(format!(
                "replication slot `{}` moved from {} to {} while evictd was starting: another consumer acknowledged it; starting again",
                config.slot, state.confirmed_flush, after.confirmed_flush
            )));
        }
        tracing::info!(slot = %config.slot, resume = %state.confirmed_flush, "streaming from the slot");
        let catalog = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(endpoint.options().await);
        Ok(PostgresSource {
            client: starting.started()?,
            slot: config.slot.clone(),
            walsender,
            liveness: Liveness::new(tokio::time::Instant::now()),
            decoder: Decoder::with_aliases(partitions.into_iter().map(|(leaf, table)| (leaf, Arc::from(table)))),
            graph_tables: graph.tables().iter().map(|t| t.name.clone()).collect(),
            resolving: VecDeque::new(),
            catalog,
            tx: None,
            pending: VecDeque::new(),
            acknowledged: state.confirmed_flush,
            status_interval: config.status_interval,
        })
    }

    /// The server's WAL end as last seen on the stream, and what we
    /// acknowledged: their difference is the slot's lag.
    pub(crate) fn positions(&self) -> (Lsn, Lsn) {
        (Lsn(self.client.metrics().last_wal_end().as_u64()), self.acknowledged)
    }

    /// Ends the session once the last acknowledgement has reached the
    /// server (the client sends status updates on its own schedule, and
    /// stopping does not send one), or after one status interval more.
    pub(crate) async fn shutdown(mut self) {
        let deadline = tokio::time::Instant::now() + self.status_interval + Duration::from_millis(500);
        let metrics = self.client.metrics();
        while metrics.last_applied_lsn().as_u64() < self.acknowledged.0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!(error = %e, "replication session ended with an error");
        }
        self.catalog.close().await;
    }

    /// Ends a lost session at once: no CopyDone into a connection that may
    /// be silent, no worker left to finish anything.
    pub(crate) fn abandon(mut self) {
        self.client.abort();
    }

    /// Checks, after a silence, that the server still streams the slot to
    /// this session (see `liveness.rs`); an error when it does not.
    async fn check_stream(&mut self) -> Result<(), SourceError> {
        let read = tokio::time::timeout(liveness::CHECK_TIMEOUT, liveness::slot_walsender(&self.catalog, &self.slot));
        let observed = read.await;
        let now = tokio::time::Instant::now();
        self.liveness.checked(now);
        match observed {
            Ok(Ok(slot)) if liveness::alive(slot, self.walsender) => Ok(()),
            Ok(Ok(slot)) => {
                let now_held_by = match slot {
                    None => "the slot is gone".to_owned(),
                    Some(None) => "nobody streams it".to_owned(),
                    Some(Some(pid)) => format!("walsender {pid} streams it"),
                };
                Err(SourceError::transient(format!(
                    "the replication connection was silent for {:.1} s and the server no longer streams slot `{}` to it \
                     ({now_held_by}; its walsender ended, e.g. after wal_sender_timeout): the connection is dead",
                    self.liveness.silent_for(now).as_secs_f64(),
                    self.slot
                )))
            }
            // Cannot tell: the session path is down too, which the lock's
            // own check acts on.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot check the silent replication stream's slot");
                Ok(())
            }
            Err(_) => {
                tracing::debug!("no answer checking the silent replication stream's slot");
                Ok(())
            }
        }
    }

    fn on_event(&mut self, event: ReplicationEvent) -> Result<(), SourceError> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                if self.tx.is_some() {
                    return Err(SourceError::definite(format!("nested BEGIN (xid {xid}) inside an open transaction")));
                }
                self.tx = Some(TxContext { final_lsn: final_lsn.as_u64(), xid, commit_time_micros });
                self.pending.push_back(SourceEvent::Begin);
            }
            ReplicationEvent::XLogData { wal_start, data, .. } => {
                let tx = self.tx.ok_or_else(|| {
                    SourceError::definite(format!("change at {} outside a transaction", Lsn(wal_start.as_u64())))
                })?;
                let position = Position::Postgres { commit_lsn: Lsn(tx.final_lsn), lsn: Lsn(wal_start.as_u64()) };
                self.decoder
                    .decode_into(&data, tx, position, &mut Changes(&mut self.pending))
                    .map_err(|e| SourceError::definite_from(format!("at {}", Lsn(wal_start.as_u64())), e))?;
                // A Relation message under a name the graph does not know:
                // perhaps a partition attached since start.
                if let [b'R', a, b, c, d, ..] = data[..] {
                    let oid = u32::from_be_bytes([a, b, c, d]);
                    if self.decoder.relation(oid).is_some_and(|r| !self.graph_tables.contains(&r.name)) {
                        self.resolving.push_back(oid);
                    }
                }
            }
            ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                let tx = self
                    .tx
                    .take()
                    .ok_or_else(|| SourceError::definite(format!("COMMIT at {} without BEGIN", Lsn(lsn.as_u64()))))?;
                if tx.final_lsn != lsn.as_u64() {
                    return Err(SourceError::definite(format!(
                        "COMMIT at {} does not match its BEGIN's final LSN {}",
                        Lsn(lsn.as_u64()),
                        Lsn(tx.final_lsn)
                    )));
                }
                self.pending.push_back(SourceEvent::Commit {
                    position: Position::Postgres { commit_lsn: Lsn(lsn.as_u64()), lsn: Lsn(end_lsn.as_u64()) },
                    commit_time_micros: Some(commit_time_micros.saturating_add(pgoutput::PG_EPOCH_OFFSET_MICROS)),
                });
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Only between transactions: inside one, nothing is settled.
                if self.tx.is_none() {
                    let lsn = Lsn(wal_end.as_u64());
                    self.pending.push_back(SourceEvent::Idle { position: Position::Postgres { commit_lsn: lsn, lsn } });
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                return Err(SourceError::transient("the replication stream stopped"));
            }
        }
        Ok(())
    }
}

/// Decoded changes, queued as events without an intermediate `Vec`.
struct Changes<'a>(&'a mut VecDeque<SourceEvent>);

impl Extend<crate::change::Change> for Changes<'_> {
    fn extend<I: IntoIterator<Item = crate::change::Change>>(&mut self, changes: I) {
        self.0.extend(changes.into_iter().map(SourceEvent::Change));
    }
}

/// Whether a replication error needs an operator: authentication, TLS, a
/// missing slot or privilege. "replication slot is active for PID …"
/// clears when the other session ends.
fn is_definite(e: &pgwire_replication::PgWireError) -> bool {
    use pgwire_replication::PgWireError as E;
    match e {
        E::Auth(_) | E::Tls(_) => true,
        E::Server(m) => m.contains("does not exist") || m.contains("permission denied"),
        _ => false,
    }
}

fn classify(e: pgwire_replication::PgWireError) -> SourceSetupError {
    let message = format!("replication connection: {e}");
    if is_definite(&e) { SourceSetupError::Definite(message) } else { SourceSetupError::Transient(message) }
}

/// A replication error while streaming, with the error as its cause.
fn replication_error(e: pgwire_replication::PgWireError) -> SourceError {
    if is_definite(&e) {
        SourceError::definite_from("replication connection", e)
    } else {
        SourceError::transient_from("replication connection", e)
    }
}

/// Starts the replication stream with `endpoint`'s TLS settings (`build`
/// makes the rest of the configuration): `allow` tries plain first and TLS
/// once the server refused the plain connection; every other mode is one
/// attempt.
pub(crate) async fn connect_replication(
    endpoint: &Conn,
    build: impl Fn(pgwire_replication::TlsConfig) -> ReplicationConfig,
) -> Result<Starting, SourceSetupError> {
    let attempts = endpoint.attempts();
    for (i, mode) in attempts.iter().enumerate() {
        let tls = endpoint.replication_tls_for(*mode).await.map_err(classify)?;
        match start_replication(build(tls)).await {
            Ok(started) => return Ok(started),
            Err((e, refused)) if refused && i + 1 < attempts.len() => {
                tracing::info!(error = %e, "the server refused a plain replication connection (sslmode=allow): trying TLS");
            }
            Err((e, _)) => return Err(e),
        }
    }
    Err(SourceSetupError::Transient("replication connection: no connection attempt".into()))
}

/// Connects and waits until the replication stream started; on failure,
/// also whether the server itself refused the connection (what `allow`
/// retries with TLS).
async fn start_replication(replication: ReplicationConfig) -> Result<Starting, (SourceSetupError, bool)> {
    let refused = |e: &pgwire_replication::PgWireError| {
        matches!(e, pgwire_replication::PgWireError::Server(_) | pgwire_replication::PgWireError::Auth(_))
    };
    let client = ReplicationClient::connect(replication).await.map_err(|e| {
        let r = refused(&e);
        (classify(e), r)
    })?;
    let mut starting = Starting(Some(client));
    let client = starting.client().map_err(|e| (e, false))?;
    tokio::time::timeout(REPLICATION_START_TIMEOUT, client.wait_started())
        .await
        .map_err(|_| {
            (
                SourceSetupError::Transient(format!(
                    "replication connection: not streaming within {REPLICATION_START_TIMEOUT:?} (the server or the network is silent)"
                )),
                false,
            )
        })?
        .map_err(|e| {
            let r = refused(&e);
            (classify(e), r)
        })?;
    Ok(starting)
}

/// A small pool for setup queries.
async fn admin_pool(endpoint: &Conn) -> Result<PgPool, SourceSetupError> {
    let options = endpoint.options().await;
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| {
            SourceSetupError::Transient(format!(
                "cannot connect to the source database: {}",
                crate::config::hide_passwords(&e.to_string())
            ))
        })
}

impl Source for PostgresSource {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        loop {
            // Cancel-safe: a relation leaves the queue only once looked up.
            while let Some(&oid) = self.resolving.front() {
                let parent =
                    publication::partition_parent(&self.catalog, oid, &self.graph_tables).await.map_err(|e| {
                        SourceError::transient_from(format!("cannot look up relation {oid}'s partition parent"), e)
                    })?;
                if let Some(table) = parent {
                    tracing::info!(relation = oid, table = %table, "a partition's changes belong to the graph's table");
                    self.decoder.alias_relation(oid, Arc::from(table));
                }
                self.resolving.pop_front();
            }
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            // Cancel-safe: `recv` is a channel's; a check dropped halfway
            // is simply made again.
            let check_at = self.liveness.check_at();
            tokio::select! {
                biased;
                received = self.client.recv() => {
                    self.liveness.heard(tokio::time::Instant::now());
                    match received {
                        Ok(Some(event)) => self.on_event(event)?,
                        Ok(None) => return Err(SourceError::transient("the replication stream ended")),
                        Err(e) => return Err(replication_error(e)),
                    }
                }
                () = tokio::time::sleep_until(check_at) => self.check_stream().await?,
            }
        }
    }

    fn server_position(&self) -> Option<Position> {
        let (wal_end, _) = self.positions();
        Some(Position::Postgres { commit_lsn: wal_end, lsn: wal_end })
    }

    async fn acknowledge(&mut self, position: &Position) -> Result<(), SourceError> {
        match position {
            Position::Postgres { lsn, .. } => {
                self.client.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
                self.acknowledged = self.acknowledged.max(*lsn);
                Ok(())
            }
            other => Err(SourceError::definite(format!("a Postgres source cannot acknowledge {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_password_plus_stays_a_plus_as_in_libpq() {
        let endpoint = endpoint("postgres://u:a+b@h/db").unwrap();
        assert_eq!(endpoint.url.password.as_ref().map(|p| p.expose_secret()), Some("a+b"));
    }
}
