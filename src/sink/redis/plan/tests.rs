use std::collections::HashMap;
use std::sync::LazyLock;

use proptest::prelude::*;

use super::*;
use crate::diagnostic::SourceFile;
use crate::graph::{CacheId, Graph, load::load_sources};

const GRAPH: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id"]

[caches.gone]
key = "gone:{id}"
[[caches.gone.depends]]
table = "app.items"

[caches.twice]
key = "twice:{id}"
action = "delete"
redelete_after_ms = 500
[[caches.twice.depends]]
table = "app.items"

[caches.versioned]
key = "versioned:{id}"
action = "bump"
[[caches.versioned.depends]]
table = "app.items"

[caches.fading]
key = "fading:{id}"
action = "expire"
expire_after_ms = 1000
expire_jitter_ms = 250
[[caches.fading.depends]]
table = "app.items"

[caches.tagged]
key = "tagged:{id}"
redelete_after_ms = 200
[[caches.tagged.depends]]
table = "app.items"
tags = ["item:{id}"]
"#;

fn graph() -> Graph {
    load_sources(&[SourceFile::new("plan.toml", GRAPH.to_owned())]).expect("the test graph loads")
}

/// Loaded once for the property test's many cases.
static SHARED: LazyLock<Graph> = LazyLock::new(graph);

fn cache(g: &Graph, name: &str) -> CacheId {
    g.cache_id(name).expect("cache exists")
}

fn batch<'a>(g: &'a Graph, effects: &'a [Effect], version: u64) -> SinkBatch<'a> {
    SinkBatch { id: 1, graph: g, effects, version, position: None, commit_time_micros: None }
}

fn key(g: &Graph, cache_name: &str, key: &str) -> Effect {
    Effect::Key { cache: cache(g, cache_name), key: key.to_owned() }
}

#[test]
fn each_action_becomes_its_command() {
    let g = graph();
    let effects = vec![
        key(&g, "gone", "gone:1"),
        key(&g, "versioned", "versioned:1"),
        key(&g, "fading", "fading:1"),
        Effect::NamespaceBump { cache: cache(&g, "gone") },
        Effect::Tag { cache: cache(&g, "tagged"), tag: "item:1".to_owned() },
    ];
    let plan = plan(&batch(&g, &effects, 77), Topology::Standalone, &mut fastrand::Rng::with_seed(1)).unwrap();
    assert_eq!(plan.version, "77");
    assert_eq!(plan.groups.len(), 1);
    let commands = &plan.groups[0].commands;
    assert_eq!(commands[0], Command::Unlink(vec![b"gone:1".to_vec()]));
    assert_eq!(commands[1], Command::Bump("versioned:1".to_owned()));
    assert!(
        matches!(&commands[2], Command::Expire { key, ttl_ms } if key == "fading:1" && (1000..=1250).contains(ttl_ms))
    );
    assert_eq!(commands[3], Command::Bump("evictd:ns:gone".to_owned()));
    assert_eq!(
        plan.tags,
        [TagJob {
            cache: "tagged".into(),
            tag: "item:1".to_owned(),
            registry: "evictd:tag:{item:1}".to_owned(),
            redelete_after_ms: Some(200)
        }]
    );
    assert!(plan.redeletes.is_empty());
}

#[test]
fn redelete_is_planned_for_delete_caches_only_by_delay() {
    let g = graph();
    let effects = vec![key(&g, "twice", "twice:1"), key(&g, "gone", "gone:1"), key(&g, "twice", "twice:2")];
    let plan = plan(&batch(&g, &effects, 1), Topology::Cluster, &mut fastrand::Rng::with_seed(1)).unwrap();
    assert_eq!(plan.redeletes, [Redelete { after_ms: 500, keys: vec![b"twice:1".to_vec(), b"twice:2".to_vec()] }]);
}

#[test]
fn unlinks_are_chunked_and_pipelines_bounded_on_a_standalone_target() {
    let g = graph();
    let effects: Vec<Effect> = (0..2000).map(|i| key(&g, "gone", &format!("gone:{i}"))).collect();
    let plan = plan(&batch(&g, &effects, 1), Topology::Standalone, &mut fastrand::Rng::with_seed(1)).unwrap();
    let unlinks: Vec<usize> = plan
        .groups
        .iter()
        .flat_map(|g| &g.commands)
        .map(|c| match c {
            Command::Unlink(keys) => keys.len(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(unlinks, [512, 512, 512, 464]);
}

#[test]
fn keys_sharing_a_hash_tag_share_a_cluster_group() {
    let g = graph();
    let effects = vec![key(&g, "gone", "p:{7}:a"), key(&g, "versioned", "p:{7}:b"), key(&g, "gone", "p:{7}:c")];
    let plan = plan(&batch(&g, &effects, 1), Topology::Cluster, &mut fastrand::Rng::with_seed(1)).unwrap();
    assert_eq!(plan.groups.len(), 1);
    assert_eq!(plan.groups[0].slot, Some(Slot::for_key("7")));
}

/// What a command does to one key, for counting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Seen {
    Unlink(Vec<u8>),
    Bump(String),
    Expire(String),
    Tag(String),
}

fn expected(g: &Graph, effect: &Effect) -> Seen {
    let c = g.cache(effect.cache());
    match effect {
        Effect::Key { key, .. } => match c.options.action {
            Action::Delete => Seen::Unlink(key.as_bytes().to_vec()),
            Action::Bump => Seen::Bump(key.clone()),
            Action::Expire => Seen::Expire(key.clone()),
        },
        Effect::NamespaceBump { .. } => Seen::Bump(format!("evictd:ns:{}", c.name)),
        Effect::Tag { tag, .. } => Seen::Tag(tag.clone()),
    }
}

fn effect_strategy() -> impl Strategy<Value = (u8, u8, String)> {
    // kind: 0..4 a key of one of the four key caches, 4 a namespace bump, 5 a tag.
    let key = prop_oneof![
        "[a-z]{1,3}:[0-9]{1,4}",
        "[a-z]{1,2}:\\{[0-9]{1,3}\\}:[a-z]{1,2}",
        "\\{\\}[a-z0-9]{1,4}",
        "[a-z{}]{0,6}",
    ];
    (0u8..6, 0u8..5, key)
}

proptest! {
    // Large batches are the point (pipeline and UNLINK limits); fewer cases keep it quick.
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn every_effect_lands_in_exactly_one_command_and_groups_never_mix_slots(
        raw in prop::collection::vec(effect_strategy(), 0..1200),
        cluster in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let g = &*SHARED;
        let names = ["gone", "twice", "versioned", "fading", "tagged"];
        let effects: Vec<Effect> = raw
            .iter()
            .map(|(kind, cache_index, key)| match kind {
                0..=3 => Effect::Key { cache: cache(g, names[*kind as usize]), key: key.clone() },
                4 => Effect::NamespaceBump { cache: cache(g, names[*cache_index as usize]) },
                _ => Effect::Tag { cache: cache(g, "tagged"), tag: key.clone() },
            })
            .collect();
        let topology = if cluster { Topology::Cluster } else { Topology::Standalone };
        let plan = plan(&batch(g, &effects, 9), topology, &mut fastrand::Rng::with_seed(seed)).unwrap();

        let mut want: HashMap<Seen, usize> = HashMap::new();
        for e in &effects {
            *want.entry(expected(g, e)).or_default() += 1;
        }
        let mut got: HashMap<Seen, usize> = HashMap::new();
        for group in &plan.groups {
            prop_assert!(!group.commands.is_empty() && group.commands.len() <= PIPELINE_COMMANDS);
            for command in &group.commands {
                let keys: Vec<Vec<u8>> = match command {
                    Command::Unlink(keys) => {
                        prop_assert!(!keys.is_empty() && keys.len() <= UNLINK_CHUNK);
                        for k in keys {
                            *got.entry(Seen::Unlink(k.clone())).or_default() += 1;
                        }
                        keys.clone()
                    }
                    Command::Bump(key) => {
                        *got.entry(Seen::Bump(key.clone())).or_default() += 1;
                        vec![key.as_bytes().to_vec()]
                    }
                    Command::Expire { key, ttl_ms } => {
                        prop_assert!((1000..=1250).contains(ttl_ms));
                        *got.entry(Seen::Expire(key.clone())).or_default() += 1;
                        vec![key.as_bytes().to_vec()]
                    }
                };
                for k in keys {
                    match topology {
                        Topology::Cluster => prop_assert_eq!(group.slot, Some(Slot::for_key(&k))),
                        Topology::Standalone => prop_assert_eq!(group.slot, None),
                    }
                }
            }
        }
        for job in &plan.tags {
            *got.entry(Seen::Tag(job.tag.clone())).or_default() += 1;
            prop_assert_eq!(&job.registry, &format!("evictd:tag:{{{}}}", job.tag));
        }
        prop_assert_eq!(got, want);

        let twice = effects.iter().filter(|e| e.cache() == cache(g, "twice") && matches!(e, Effect::Key { .. })).count();
        let planned: usize = plan.redeletes.iter().map(|r| r.keys.len()).sum();
        prop_assert_eq!(planned, twice);
    }
}

#[test]
fn keys_without_a_stamp_in_their_slot_are_flagged_on_a_cluster_only() {
    let g = graph();
    let effects = vec![
        key(&g, "gone", "gone:{}:1"),
        key(&g, "gone", "gone:{1}"),
        key(&g, "fading", "fading:}"),
        key(&g, "versioned", "versioned:{}"),
    ];
    let cluster = plan(&batch(&g, &effects, 1), Topology::Cluster, &mut fastrand::Rng::with_seed(1)).unwrap();
    let flagged: Vec<(&str, &[u8])> = cluster.unguarded.iter().map(|(c, k)| (&**c, k.as_slice())).collect();
    // A version key gets no stamp at all: nothing to flag.
    assert_eq!(flagged, [("gone", &b"gone:{}:1"[..]), ("fading", &b"fading:}"[..])]);
    let standalone = plan(&batch(&g, &effects, 1), Topology::Standalone, &mut fastrand::Rng::with_seed(1)).unwrap();
    assert!(standalone.unguarded.is_empty());
}
