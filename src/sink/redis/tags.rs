//! Tag invalidation: every key registered under a tag is deleted.
//!
//! A registry is the sorted set `evictd:tag:{<tag>}` (member = key, score =
//! the key's expiry in Unix ms; see `docs/redis-layout.md`). For one tag:
//!
//! 1. read the live registrations (score ≥ now − grace) with `ZSCAN`;
//! 2. `UNLINK` their keys, grouped by the keys' own slots (on a Cluster they
//!    live on other slots than the registry);
//! 3. only then forget them with [`FORGET`](super::layout::FORGET_LUA):
//!    remove a registration only if its score is still the one read, and drop
//!    registrations expired for longer than the grace.
//!
//! **Invariants:** nothing is removed from a registry before its key's
//! `UNLINK` was confirmed, so a retried batch finds every registration it
//! has not finished with; a registration added or refreshed after the read
//! (new score) survives. Tag invalidation always `UNLINK`s, whatever the
//! action of the cache that names the tag.

use redis::Value;

use super::conn::Runner;
use super::plan::{TagJob, Topology, unlink_groups};
use crate::sink::SinkError;

/// `COUNT` hint of each `ZSCAN` round trip.
pub const PAGE: usize = 1000;

/// Registration pairs per `FORGET` call.
const FORGET_CHUNK: usize = 256;

/// How long past its score a registration is still honoured: covers clock
/// skew between the applications that compute scores and evictd.
pub const GRACE_MS: u64 = 60_000;

/// One registration as read: member and score, both exactly as Redis sent
/// them (the score string is compared back by `FORGET`).
type Registration = (Vec<u8>, Vec<u8>);

/// Invalidates one tag; returns the keys it deleted.
pub async fn invalidate(
    runner: &Runner<'_>,
    job: &TagJob,
    now_ms: u64,
    topology: Topology,
    max_in_flight: usize,
    stamp: Option<&super::Stamp>,
) -> Result<Vec<Vec<u8>>, SinkError> {
    let from = now_ms.saturating_sub(GRACE_MS);
    let registrations = read(runner, job, from).await?;
    let keys: Vec<Vec<u8>> = registrations.iter().map(|(member, _)| member.clone()).collect();
    if !keys.is_empty() {
        let groups = unlink_groups(keys.clone(), topology);
        super::run_groups(runner, &groups, "", max_in_flight, stamp).await?;
    }
    forget(runner, job, from, &registrations).await?;
    Ok(keys)
}

/// Reads every live registration with `ZSCAN`, which returns every member
/// present from the start to the end of the scan at least once, whatever
/// happens to the set meanwhile (a member whose score an application raises
/// keeps its place; paging by rank or score could skip it). A member met
/// twice is harmless. Scores are filtered here; one that does not parse
/// counts as live.
async fn read(runner: &Runner<'_>, job: &TagJob, from: u64) -> Result<Vec<Registration>, SinkError> {
    let what = format!("reading tag registry {}", job.registry);
    let mut out = Vec::new();
    let mut cursor: Vec<u8> = b"0".to_vec();
    loop {
        let mut pipe = redis::pipe();
        pipe.cmd("ZSCAN").arg(&job.registry).arg(&cursor).arg("COUNT").arg(PAGE);
        let reply = runner.pipeline(&what, &mut pipe).await?;
        let (next, items) = match reply.as_slice() {
            [Value::Array(parts)] => match parts.as_slice() {
                [Value::BulkString(next), Value::Array(items)] if items.len() % 2 == 0 => (next.clone(), items),
                _ => return Err(runner.errors.unexpected(&what, &reply[0])),
            },
            _ => return Err(runner.errors.unexpected(&what, &Value::Array(reply.clone()))),
        };
        for pair in items.chunks_exact(2) {
            match pair {
                [Value::BulkString(member), Value::BulkString(score)] => {
                    if is_live(score, from) {
                        out.push((member.clone(), score.clone()));
                    }
                }
                _ => return Err(runner.errors.unexpected(&what, &Value::Array(pair.to_vec()))),
            }
        }
        if next == b"0" {
            return Ok(out);
        }
        cursor = next;
    }
}

/// Whether a registration's score (Redis's text of a double) is at or past
/// `from`, in Unix ms.
fn is_live(score: &[u8], from: u64) -> bool {
    match std::str::from_utf8(score).ok().and_then(|s| s.parse::<f64>().ok()) {
        Some(score) => score >= from as f64,
        None => true,
    }
}

/// Removes the registrations whose keys were deleted (if their score did
/// not change since the read) and those expired longer than the grace.
async fn forget(runner: &Runner<'_>, job: &TagJob, from: u64, read: &[Registration]) -> Result<(), SinkError> {
    let what = format!("forgetting registrations of {}", job.registry);
    let mut chunks: Vec<&[Registration]> = read.chunks(FORGET_CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    // One pipeline: every call goes to the registry's slot.
    let mut pipe = redis::pipe();
    for chunk in chunks {
        pipe.cmd("EVALSHA").arg(runner.scripts.forget.get_hash()).arg(1).arg(&job.registry).arg(from);
        for (member, score) in chunk {
            pipe.arg(member).arg(score);
        }
    }
    runner.pipeline(&what, &mut pipe).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_is_live_from_its_score_on_and_unparsable_ones_count_as_live() {
        assert!(is_live(b"1000", 1000));
        assert!(!is_live(b"999", 1000));
        assert!(is_live(b"1.7e12", 1_600_000_000_000));
        assert!(is_live(b"inf", u64::MAX));
        assert!(!is_live(b"-inf", 0));
        assert!(is_live(b"not a number", 1000));
    }
}
