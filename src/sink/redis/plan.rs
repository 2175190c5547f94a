//! Planning: a batch → the Redis commands that apply it, grouped into
//! pipelines. Pure: no I/O, no clock; the TTL jitter comes from the
//! caller's random generator, so a plan is reproducible in tests.
//!
//! **Invariants** (checked by the property test below):
//! - every effect of the batch lands in exactly one command or tag job;
//! - on a Cluster, every key of a group hashes to the group's slot, so a
//!   group is one pipeline the client can route to one node;
//! - an `UNLINK` names at most [`UNLINK_CHUNK`] keys and a group holds at
//!   most [`PIPELINE_COMMANDS`] commands, so no reply is unbounded.
//!
//! Each key's action comes from its cache's options: `delete` → `UNLINK`
//! (plus a delayed second `UNLINK` with `redelete_after_ms`), `bump` → the
//! version script, `expire` → `PEXPIRE key ttl LT`. A namespace bump runs the
//! version script on `evictd:ns:<cache>`; a tag becomes a [`TagJob`], which
//! needs reads before it knows its keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use redis::cluster_routing::Slot;

use super::layout::{encode_version, guard_in_slot, namespace_key, tag_key};
use crate::graph::Action;
use crate::resolve::Effect;
use crate::sink::SinkBatch;

/// Most keys in one `UNLINK`.
pub(crate) const UNLINK_CHUNK: usize = 512;

/// Most commands in one pipeline.
pub(crate) const PIPELINE_COMMANDS: usize = 256;

/// What kind of target a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One server: any keys may share a pipeline.
    Standalone,
    /// Redis Cluster: a pipeline holds keys of one hash slot only.
    Cluster,
}

/// One Redis command of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// `UNLINK keys…`.
    Unlink(Vec<Vec<u8>>),
    /// The version script: raise `key` to the plan's version, or past it.
    Bump(String),
    /// `PEXPIRE key ttl_ms LT`: never lengthens an existing TTL.
    Expire { key: String, ttl_ms: u64 },
}

/// Commands that go out as one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    /// The hash slot of every key in the group (Cluster); `None` on a
    /// standalone target.
    pub(crate) slot: Option<Slot>,
    pub(crate) commands: Vec<Command>,
}

/// Invalidating one tag: read its registry, delete the keys, forget them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TagJob {
    /// The cache whose dependency names the tag.
    pub(crate) cache: Arc<str>,
    pub(crate) tag: String,
    /// `evictd:tag:{<tag>}`.
    pub(crate) registry: String,
    /// The cache's `redelete_after_ms` when its action is `delete`.
    pub(crate) redelete_after_ms: Option<u64>,
}

/// Keys to delete a second time, `after_ms` after the batch is confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redelete {
    pub(crate) after_ms: u64,
    pub(crate) keys: Vec<Vec<u8>>,
}

/// Everything one batch asks of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The batch version in stored form (canonical decimal); every bump
    /// raises the stored version to it or past it (see
    /// [`super::layout::BUMP_LUA`]).
    pub(crate) version: String,
    pub(crate) groups: Vec<Group>,
    pub(crate) tags: Vec<TagJob>,
    /// Delayed second deletes of keys named by the batch, by delay.
    pub(crate) redeletes: Vec<Redelete>,
    /// Keys deleted or expired on a Cluster that can get no fill-guard stamp
    /// in their own slot ([`guard_in_slot`]), with their caches: they are
    /// invalidated without one.
    pub(crate) unguarded: Vec<(Arc<str>, Vec<u8>)>,
}

/// A batch the sink cannot plan: the graph contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    #[error("cache `{cache}` has action expire but no expire_after_ms")]
    ExpireWithoutTtl { cache: String },
}

/// Bump commands as groups: one per slot on a Cluster (a namespace key has
/// no hash tag, so each is alone), all in one on a standalone server.
pub(crate) fn bump_groups(commands: Vec<Command>, topology: Topology) -> Vec<Group> {
    match topology {
        Topology::Standalone => vec![Group { slot: None, commands }],
        Topology::Cluster => commands
            .into_iter()
            .map(|command| Group { slot: Some(Slot::for_key(command_key(&command))), commands: vec![command] })
            .collect(),
    }
}

/// Plans a batch for a target.
pub(crate) fn plan(batch: &SinkBatch<'_>, topology: Topology, rng: &mut fastrand::Rng) -> Result<Plan, PlanError> {
    let mut unlinks: Vec<Vec<u8>> = Vec::new();
    let mut others: Vec<Command> = Vec::new();
    let mut tags = Vec::new();
    let mut redeletes: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut unguarded = Vec::new();
    for effect in batch.effects {
        let cache = batch.graph.cache(effect.cache());
        let options = &cache.options;
        if let Effect::Key { key, .. } = effect
            && topology == Topology::Cluster
            && options.action != Action::Bump
            && !guard_in_slot(key.as_bytes())
        {
            unguarded.push((cache.name.clone(), key.as_bytes().to_vec()));
        }
        match effect {
            Effect::Key { key, .. } => match options.action {
                Action::Delete => {
                    if let Some(after_ms) = options.redelete_after_ms {
                        redeletes.entry(after_ms).or_default().push(key.as_bytes().to_vec());
                    }
                    unlinks.push(key.as_bytes().to_vec());
                }
                Action::Bump => others.push(Command::Bump(key.clone())),
                Action::Expire => {
                    let Some(base) = options.expire_after_ms else {
                        return Err(PlanError::ExpireWithoutTtl { cache: cache.name.to_string() });
                    };
                    let jitter = rng.u64(0..=options.expire_jitter_ms);
                    others.push(Command::Expire { key: key.clone(), ttl_ms: base.saturating_add(jitter) });
                }
            },
            Effect::NamespaceBump { .. } => others.push(Command::Bump(namespace_key(&cache.name))),
            Effect::Tag { tag, .. } => tags.push(TagJob {
                cache: cache.name.clone(),
                tag: tag.clone(),
                registry: tag_key(tag),
                redelete_after_ms: match options.action {
                    Action::Delete => options.redelete_after_ms,
                    Action::Bump | Action::Expire => None,
                },
            }),
        }
    }
    let groups = group(unlinks, others, topology);
    let redeletes = redeletes.into_iter().map(|(after_ms, keys)| Redelete { after_ms, keys }).collect();
    Ok(Plan { version: encode_version(batch.version), groups, tags, redeletes, unguarded })
}

/// `UNLINK`s of arbitrary keys (tag members, second deletes), grouped.
pub(crate) fn unlink_groups(keys: Vec<Vec<u8>>, topology: Topology) -> Vec<Group> {
    group(keys, Vec::new(), topology)
}

/// The key a single-key command acts on.
fn command_key(command: &Command) -> &[u8] {
    match command {
        Command::Bump(key) | Command::Expire { key, .. } => key.as_bytes(),
        Command::Unlink(keys) => keys.first().map(Vec::as_slice).unwrap_or_default(),
    }
}

/// Keys to `UNLINK` and other commands of one slot.
type Bucket = (Vec<Vec<u8>>, Vec<Command>);

/// Buckets keys and commands by slot (one bucket on a standalone target),
/// chunks the keys into `UNLINK`s and the commands into pipelines.
fn group(unlinks: Vec<Vec<u8>>, others: Vec<Command>, topology: Topology) -> Vec<Group> {
    let slot_of = |key: &[u8]| match topology {
        Topology::Standalone => None,
        Topology::Cluster => Some(Slot::for_key(key)),
    };
    // Slots in first-seen order, so plans are deterministic.
    let mut order: Vec<Option<Slot>> = Vec::new();
    let mut buckets: HashMap<Option<Slot>, Bucket> = HashMap::new();
    for key in unlinks {
        let slot = slot_of(&key);
        let bucket = buckets.entry(slot).or_insert_with(|| {
            order.push(slot);
            Default::default()
        });
        bucket.0.push(key);
    }
    for command in others {
        let slot = slot_of(command_key(&command));
        let bucket = buckets.entry(slot).or_insert_with(|| {
            order.push(slot);
            Default::default()
        });
        bucket.1.push(command);
    }
    let mut groups = Vec::new();
    for slot in order {
        let Some((keys, others)) = buckets.remove(&slot) else { continue };
        let mut commands: Vec<Command> = Vec::with_capacity(keys.len().div_ceil(UNLINK_CHUNK) + others.len());
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() {
            commands.push(Command::Unlink(keys.by_ref().take(UNLINK_CHUNK).collect()));
        }
        commands.extend(others);
        let mut commands = commands.into_iter().peekable();
        while commands.peek().is_some() {
            groups.push(Group { slot, commands: commands.by_ref().take(PIPELINE_COMMANDS).collect() });
        }
    }
    groups
}

#[cfg(test)]
mod tests;
