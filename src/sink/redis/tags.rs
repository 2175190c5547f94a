//! Tag invalidation: every key registered under a tag is deleted.
//!
//! A registry is the sorted set `evictd:tag:{<tag>}` (member = key, score =
//! the key's expiry in Unix ms; see `docs/redis-layout.md`). All tags of a
//! batch are invalidated together, in three phases whose round trips are
//! pipelined across tags (one pipeline per hash slot on a Cluster, one in
//! all on a standalone server), so a batch costs the same few round trips
//! whether it names one tag or hundreds:
//!
//! 1. read the live registrations (score ≥ now − grace) of every tag with
//!    `ZSCAN` (one more round for the registries that have more pages);
//! 2. `UNLINK` their keys, grouped by the keys' own slots (on a Cluster they
//!    live on other slots than the registry), each after its fill-guard stamp;
//! 3. only then forget them with [`FORGET`](super::layout::FORGET_LUA):
//!    remove a registration only if its score is still the one read, and drop
//!    registrations expired for longer than the grace.
//!
//! A registry of any size is invalidated in bounded memory: once
//! [`HELD_REGISTRATIONS`] are read, they go through phases 2 and 3 before
//! the scans go on.
//!
//! **Invariants:** nothing is removed from a registry before its key's
//! `UNLINK` was confirmed, so a retried batch finds every registration it
//! has not finished with; a registration added or refreshed after the read
//! (new score) survives. Tag invalidation always `UNLINK`s, whatever the
//! action of the cache that names the tag.

use std::collections::HashMap;

use futures_util::{StreamExt, TryStreamExt, stream};
use redis::Value;
use redis::cluster_routing::Slot;

use super::conn::Runner;
use super::plan::{PIPELINE_COMMANDS, TagJob, Topology, unlink_groups};
use crate::sink::SinkError;

/// `COUNT` hint of each `ZSCAN` round trip.
pub(crate) const PAGE: usize = 1000;

/// Registration pairs per `FORGET` call.
const FORGET_CHUNK: usize = 256;

/// How long past its score a registration is still honoured: covers clock
/// skew between the applications that compute scores and evictd.
pub(crate) const GRACE_MS: u64 = 60_000;

/// One registration as read: member and score, both exactly as Redis sent
/// them (the score string is compared back by `FORGET`).
type Registration = (Vec<u8>, Vec<u8>);

/// One `ZSCAN` reply: the job it was for, the next cursor, the page.
type Page = (usize, Vec<u8>, Vec<Registration>);

/// Registrations held at once: past this many, the keys read so far are
/// deleted and forgotten before the scans go on, so a registry of any size
/// is invalidated in bounded memory.
pub(crate) const HELD_REGISTRATIONS: usize = 50_000;

/// Invalidates every tag of `jobs`, holding at most about
/// [`HELD_REGISTRATIONS`] registrations at once. Returns, per job, the
/// deleted keys that `keep(job, key)` asked for (the caller's second deletes
/// and reports; the others are not held).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn invalidate_all(
    runner: &Runner<'_>,
    jobs: &[TagJob],
    now_ms: u64,
    topology: Topology,
    max_in_flight: usize,
    stamp: Option<&super::Stamp>,
    keep: &mut (dyn FnMut(usize, &[u8]) -> bool + Send),
) -> Result<Vec<Vec<Vec<u8>>>, SinkError> {
    let held_max = HELD_REGISTRATIONS;
    let mut kept: Vec<Vec<Vec<u8>>> = vec![Vec::new(); jobs.len()];
    if jobs.is_empty() {
        return Ok(kept);
    }
    let from = now_ms.saturating_sub(GRACE_MS);
    // Whether a registry had any registration at all, live or expired, and
    // whether a FORGET (which also prunes) ran on it.
    let mut seen = vec![false; jobs.len()];
    let mut forgotten = vec![false; jobs.len()];
    // (job, cursor) of every scan still going.
    let mut scans: Vec<(usize, Vec<u8>)> = (0..jobs.len()).map(|i| (i, b"0".to_vec())).collect();
    while !scans.is_empty() {
        let (held, rest) = read_some(runner, jobs, from, topology, max_in_flight, scans, &mut seen, held_max).await?;
        scans = rest;
        let keys: Vec<Vec<u8>> = held.iter().flatten().map(|(member, _)| member.clone()).collect();
        if !keys.is_empty() {
            let groups = unlink_groups(keys, topology);
            super::run_groups(runner, &groups, super::Bump::NONE, max_in_flight, stamp).await?;
        }
        // A registry whose scan ended with nothing live to forget is still
        // pruned once, if it had anything at all.
        let scanning: std::collections::HashSet<usize> = scans.iter().map(|(job, _)| *job).collect();
        let prune: Vec<bool> =
            (0..jobs.len()).map(|job| seen[job] && !forgotten[job] && !scanning.contains(&job)).collect();
        forget_all(runner, jobs, from, &held, &prune, topology, max_in_flight).await?;
        for (job, registrations) in held.into_iter().enumerate() {
            forgotten[job] |= prune[job] || !registrations.is_empty();
            kept[job].extend(registrations.into_iter().map(|(member, _)| member).filter(|key| keep(job, key)));
        }
    }
    Ok(kept)
}
/// Splits `items` into pipelines: by the slot of `key(item)` on a Cluster,
/// all together on a standalone server; at most [`PIPELINE_COMMANDS`] each.
fn pipelines<T, K: AsRef<[u8]>>(items: Vec<T>, key: impl Fn(&T) -> K, topology: Topology) -> Vec<Vec<T>> {
    // Slots in first-seen order, so rounds are deterministic.
    let mut index: HashMap<Option<Slot>, usize> = HashMap::new();
    let mut by_slot: Vec<Vec<T>> = Vec::new();
    for item in items {
        let slot = match topology {
            Topology::Standalone => None,
            Topology::Cluster => Some(Slot::for_key(key(&item).as_ref())),
        };
        let i = *index.entry(slot).or_insert_with(|| {
            by_slot.push(Vec::new());
            by_slot.len() - 1
        });
        by_slot[i].push(item);
    }
    let mut out = Vec::new();
    for mut list in by_slot {
        while list.len() > PIPELINE_COMMANDS {
            let rest = list.split_off(PIPELINE_COMMANDS);
            out.push(list);
            list = rest;
        }
        out.push(list);
    }
    out
}

/// Reads live registrations of the `scans` with `ZSCAN`, which returns
/// every member present from the start to the end of a scan at least once,
/// whatever happens to the set meanwhile (a member whose score an
/// application raises keeps its place; paging by rank or score could skip
/// it; members removed after they were returned do not disturb it). A
/// member met twice is harmless. Scores are filtered here; one that does
/// not parse counts as live. Stops once `held_max` registrations are held
/// and returns them with the scans still going.
#[allow(clippy::too_many_arguments)]
async fn read_some(
    runner: &Runner<'_>,
    jobs: &[TagJob],
    from: u64,
    topology: Topology,
    max_in_flight: usize,
    mut scans: Vec<(usize, Vec<u8>)>,
    seen: &mut [bool],
    held_max: usize,
) -> Result<(Vec<Vec<Registration>>, Vec<(usize, Vec<u8>)>), SinkError> {
    let mut out: Vec<Vec<Registration>> = vec![Vec::new(); jobs.len()];
    let mut held = 0;
    while !scans.is_empty() && held < held_max {
        // No more scans at once than pages fit in what may still be held
        // (each returns about `PAGE`); the others wait for the next round.
        let room = ((held_max - held) / PAGE).max(1);
        let waiting = if scans.len() > room { scans.split_off(room) } else { Vec::new() };
        let rounds: Vec<_> = pipelines(scans, |(i, _)| jobs[*i].registry.as_bytes(), topology)
            .into_iter()
            .map(|round| scan_round(runner, jobs, round))
            .collect();
        let pages: Vec<Vec<Page>> = stream::iter(rounds).buffer_unordered(max_in_flight).try_collect().await?;
        scans = waiting;
        for (job, next, items) in pages.into_iter().flatten() {
            seen[job] |= !items.is_empty();
            let before = out[job].len();
            out[job].extend(items.into_iter().filter(|(_, score)| is_live(score, from)));
            held += out[job].len() - before;
            if next != b"0" {
                scans.push((job, next));
            }
        }
    }
    Ok((out, scans))
}

/// One pipeline of `ZSCAN`s: per scan, its job, next cursor and page.
async fn scan_round(
    runner: &Runner<'_>,
    jobs: &[TagJob],
    round: Vec<(usize, Vec<u8>)>,
) -> Result<Vec<Page>, SinkError> {
    let what = format!("reading {} tag registries", round.len());
    let mut pipe = redis::pipe();
    for (job, cursor) in &round {
        pipe.cmd("ZSCAN").arg(&jobs[*job].registry).arg(cursor).arg("COUNT").arg(PAGE);
    }
    let replies = runner.pipeline(&what, &mut pipe).await?;
    let mut out = Vec::with_capacity(round.len());
    for ((job, _), reply) in round.into_iter().zip(replies) {
        let (next, items) = match &reply {
            Value::Array(parts) => match parts.as_slice() {
                [Value::BulkString(next), Value::Array(items)] if items.len() % 2 == 0 => (next.clone(), items),
                _ => return Err(runner.errors.unexpected(&what, &reply)),
            },
            _ => return Err(runner.errors.unexpected(&what, &reply)),
        };
        let mut page = Vec::with_capacity(items.len() / 2);
        for pair in items.chunks_exact(2) {
            match pair {
                [Value::BulkString(member), Value::BulkString(score)] => page.push((member.clone(), score.clone())),
                _ => return Err(runner.errors.unexpected(&what, &Value::Array(pair.to_vec()))),
            }
        }
        out.push((job, next, page));
    }
    Ok(out)
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
/// not change since the read) and those expired longer than the grace:
/// one call per chunk of read registrations, and one for each registry to
/// `prune` that had nothing live to forget (an empty or missing registry
/// has nothing to forget or prune), all pipelined.
async fn forget_all(
    runner: &Runner<'_>,
    jobs: &[TagJob],
    from: u64,
    read: &[Vec<Registration>],
    prune: &[bool],
    topology: Topology,
    max_in_flight: usize,
) -> Result<(), SinkError> {
    let mut calls: Vec<(&str, &[Registration])> = Vec::new();
    for ((job, registrations), prune) in jobs.iter().zip(read).zip(prune) {
        if registrations.is_empty() && *prune {
            calls.push((&job.registry, &[]));
        }
        for chunk in registrations.chunks(FORGET_CHUNK) {
            calls.push((&job.registry, chunk));
        }
    }
    let rounds: Vec<_> = pipelines(calls, |(registry, _)| *registry, topology)
        .into_iter()
        .map(|round| async move {
            let what = format!("forgetting registrations in {} tag registries", round.len());
            let mut pipe = redis::pipe();
            for (registry, chunk) in round {
                pipe.cmd("EVALSHA").arg(runner.scripts.forget.get_hash()).arg(1).arg(registry).arg(from);
                for (member, score) in chunk {
                    pipe.arg(member).arg(score);
                }
            }
            runner.pipeline(&what, &mut pipe).await.map(|_| ())
        })
        .collect();
    stream::iter(rounds).buffer_unordered(max_in_flight).try_collect::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_group_by_slot_on_a_cluster_only_and_stay_bounded() {
        let keys: Vec<String> = (0..600).map(|i| format!("evictd:tag:{{t{}}}", i % 3)).collect();
        let standalone = pipelines(keys.clone(), String::clone, Topology::Standalone);
        assert_eq!(standalone.iter().map(Vec::len).collect::<Vec<_>>(), [256, 256, 88]);
        let cluster = pipelines(keys, String::clone, Topology::Cluster);
        assert_eq!(cluster.iter().map(Vec::len).sum::<usize>(), 600);
        for round in &cluster {
            assert!(round.len() <= PIPELINE_COMMANDS);
            assert!(round.iter().all(|k| Slot::for_key(k.as_bytes()) == Slot::for_key(round[0].as_bytes())));
        }
    }

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
