//! `evictd check --config FILE` against the live Redis targets: the same
//! start-up check `evictd run` makes ([`RedisSink::check_setup`]): eviction
//! policy, persistence and replicas, what `wait_aof` needs.
//!
//! With a Postgres source, also the slot's history as `run` decides on it
//! (`source::postgres::identity`): a slot evictd streamed from that is gone.
//!
//! Errors (a policy that can evict evictd's keys under
//! `eviction_check = "refuse"`, `wait_aof` on a Redis that cannot, a lost
//! slot under `on_slot_loss = "refuse"`) exit 2; a target that cannot be
//! reached exits 1.

use super::CliError;
use crate::config::{Config, SourceConfig};
use crate::graph::{Graph, Mapping};
use crate::sink::redis::RedisSink;
use crate::source::postgres::identity::{self, Decision};

use super::live::LiveFindings;

/// Checks every Redis target of `config`.
pub(crate) fn check(config: &Config, graph: &Graph) -> Result<LiveFindings, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(check_async(config, graph))
}

async fn check_async(config: &Config, graph: &Graph) -> Result<LiveFindings, CliError> {
    let tags = graph.dependencies().iter().any(|d| matches!(d.mapping, Mapping::Tags(_)));
    let mut out = LiveFindings::default();
    let mut records = Vec::new();
    let slot = match &config.source {
        Some(SourceConfig::Postgres(pg)) => Some(pg),
        _ => None,
    };
    for target in &config.redis {
        let unreachable = |e: crate::sink::SinkError| CliError::Runtime(format!("cannot check Redis target: {e}"));
        let sink = RedisSink::connect(target).await.map_err(unreachable)?;
        let findings = sink.check_setup(target, tags).await.map_err(unreachable)?;
        out.lines.push(format!("redis.{}: checked", target.name));
        out.lines.extend(findings.warnings.iter().map(|w| format!("  warning: {w}")));
        out.errors.extend(findings.errors);
        if let Some(pg) = slot {
            records.extend(sink.read_source_record(&pg.slot).await.map_err(unreachable)?);
        }
    }
    // The slot's history, as `run` decides on it before streaming: a slot
    // evictd streamed from that is gone is an error here too.
    if let Some(pg) = slot {
        let (_, exists) = identity::inspect(pg)
            .await
            .map_err(|e| CliError::Runtime(format!("cannot check the replication slot: {e}")))?;
        match identity::decide(&pg.slot, exists, &records, pg.on_slot_loss) {
            Decision::Stream => out.lines.push(format!("slot {}: present", pg.slot)),
            Decision::FirstRun => out.lines.push(format!("slot {}: missing; `run` creates it (a first run)", pg.slot)),
            Decision::Flush => out.lines.push(format!(
                "slot {}: lost after evictd streamed from it; `run` bumps every cache's namespace, then streams from a new slot (on_slot_loss = \"flush\")",
                pg.slot
            )),
            Decision::Refuse(message) => out.errors.push(message),
        }
    }
    Ok(out)
}
