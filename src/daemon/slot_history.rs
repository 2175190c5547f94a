//! A Postgres session's start, guarded by the slot's history: the checks of
//! `source::postgres::identity` against the source records of every Redis
//! target, then the slot and the stream, then (before anything can be
//! acknowledged) the flush a lost slot asked for and this session's record.
//!
//! **Invariants:** nothing here reads an unreachable target as "no record"
//! (its error is transient: the session is retried); a flush is confirmed
//! by every target (through the sink, like any batch) before the records
//! drop their pending flag; every target tracks its record before the run
//! loop gets the source.

use crate::sink::redis::now_ms;

use super::supervisor::StartError;
use crate::config::PostgresSource as PostgresConfig;
use crate::graph::{CacheId, Graph};
use crate::resolve::Effect;
use crate::sink::multi::MultiSink;
use crate::sink::redis::RedisSink;
use crate::sink::redis::record::SourceRecord;
use crate::sink::{Sink, SinkBatch};
use crate::source::postgres::identity::{self, Decision};
use crate::source::postgres::{PostgresSource, SourceSetupError};

/// Starts a session: decides from the slot and the records, refuses or
/// prepares a flush, starts the source (creating the slot if need be),
/// flushes, and writes this session's record on every target.
pub(super) async fn start(
    config: &PostgresConfig,
    graph: &Graph,
    sink: &MultiSink<RedisSink>,
) -> Result<PostgresSource, StartError> {
    let slot = config.slot.as_str();
    let (server, exists) = identity::inspect(config).await?;
    let mut records: Vec<Option<SourceRecord>> = Vec::with_capacity(sink.targets().len());
    for target in sink.targets() {
        records.push(target.read_source_record(slot).await.map_err(StartError::SourceRecord)?);
    }
    let found: Vec<SourceRecord> = records.iter().flatten().cloned().collect();
    let decision = identity::decide(slot, exists, &found, config.on_slot_loss);
    match &decision {
        Decision::Refuse(message) => return Err(SourceSetupError::Definite(message.clone()).into()),
        Decision::Stream => {
            if let Some(note) = identity::moved(&found, &server) {
                tracing::warn!(slot, system = %server.system_identifier, timeline = server.timeline, "{note}");
            }
        }
        Decision::FirstRun => tracing::info!(slot, "evictd never streamed this slot: a first run"),
        Decision::Flush => {
            tracing::warn!(
                slot,
                "replication slot lost although evictd streamed from it (source.postgres.on_slot_loss = \"flush\"): \
                 every cache's namespace will be bumped before streaming from a new slot"
            );
            // Marked first: a crash from here on flushes again.
            for (target, record) in sink.targets().iter().zip(&records) {
                let now = now_ms();
                let mut pending =
                    record.clone().unwrap_or_else(|| identity::session_record(slot, None, &server, now, true));
                pending.flush_pending = true;
                target.write_source_record(&pending).await.map_err(StartError::SourceRecord)?;
            }
        }
    }
    // A slot that vanished since the check must not be created silently.
    let mut checked = config.clone();
    checked.create_slot &= decision != Decision::Stream;
    let source = PostgresSource::start(&checked, graph).await?;
    match begin(config, graph, sink, &decision, &records, &server).await {
        Ok(()) => Ok(source),
        Err(e) => {
            source.shutdown().await;
            Err(e)
        }
    }
}

/// With the slot there and nothing acknowledged yet: the flush, if asked
/// for, then this session's record on every target.
async fn begin(
    config: &PostgresConfig,
    graph: &Graph,
    sink: &MultiSink<RedisSink>,
    decision: &Decision,
    records: &[Option<SourceRecord>],
    server: &identity::ServerIdentity,
) -> Result<(), StartError> {
    let slot = config.slot.as_str();
    let fresh = matches!(decision, Decision::FirstRun | Decision::Flush);
    if *decision == Decision::Flush {
        let effects: Vec<Effect> =
            (0..graph.caches().len()).map(|i| Effect::NamespaceBump { cache: CacheId(i) }).collect();
        let batch = SinkBatch {
            id: 0,
            graph,
            effects: &effects,
            version: server.wal_lsn.0,
            position: None,
            commit_time_micros: None,
        };
        sink.apply(batch).await.map_err(StartError::Flush)?;
        tracing::warn!(
            slot,
            caches = effects.len(),
            "bumped every cache's namespace on every target after the loss of the slot; streaming from the new slot"
        );
    }
    for (target, record) in sink.targets().iter().zip(records) {
        let record = identity::session_record(slot, record.as_ref(), server, now_ms(), fresh);
        target.write_source_record(&record).await.map_err(StartError::SourceRecord)?;
        target.track_source(&record);
    }
    Ok(())
}
