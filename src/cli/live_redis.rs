//! `evictd check --config FILE` against the live Redis targets: the same
//! start-up check `evictd run` makes ([`RedisSink::check_setup`]): eviction
//! policy, persistence and replicas, what `wait_aof` needs.
//!
//! Errors (a policy that can evict evictd's keys under
//! `eviction_check = "refuse"`, `wait_aof` on a Redis that cannot) exit 2;
//! a target that cannot be reached exits 1.

use super::CliError;
use crate::config::Config;
use crate::graph::{Graph, Mapping};
use crate::sink::redis::RedisSink;

use super::live::LiveFindings;

/// Checks every Redis target of `config`.
pub fn check(config: &Config, graph: &Graph) -> Result<LiveFindings, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(check_async(config, graph))
}

async fn check_async(config: &Config, graph: &Graph) -> Result<LiveFindings, CliError> {
    let tags = graph.dependencies().iter().any(|d| matches!(d.mapping, Mapping::Tags(_)));
    let mut out = LiveFindings::default();
    for target in &config.redis {
        let unreachable = |e: crate::sink::SinkError| CliError::Runtime(format!("cannot check Redis target: {e}"));
        let sink = RedisSink::connect(target).await.map_err(unreachable)?;
        let findings = sink.check_setup(target, tags).await.map_err(unreachable)?;
        out.lines.push(format!("redis.{}: checked", target.name));
        out.lines.extend(findings.warnings.iter().map(|w| format!("  warning: {w}")));
        out.errors.extend(findings.errors);
    }
    Ok(out)
}
