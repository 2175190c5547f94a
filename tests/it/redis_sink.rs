//! The Redis sink against real servers: a standalone Redis and a 3-master
//! Cluster (`EVICTD_TEST_REDIS_URL`, `EVICTD_TEST_REDIS_CLUSTER_URLS`).
//! Every test uses its own key prefix and cache names, so tests run in
//! parallel and repeated runs do not see each other's keys.

use std::time::{Duration, Instant};

use evictd::resolve::Effect;
use evictd::sink::redis::layout::{FORGET_LUA, namespace_key, tag_key};
use evictd::sink::redis::{RedisSink, RedisSinkOptions};
use evictd::sink::{MultiSink, Sink, SinkBatch, SinkError};

use super::redis_support::{
    BOTH, Kind, Probe, Proxy, TestGraph, closed_port, silent_listener, sink, target, unique, urls,
};

fn key(g: &TestGraph, cache: &str, key: &str) -> Effect {
    Effect::Key { cache: g.cache(cache), key: key.to_owned() }
}

async fn apply(sink: &impl Sink, g: &TestGraph, effects: &[Effect], version: u64) -> Result<(), SinkError> {
    sink.apply(SinkBatch { id: version, graph: &g.graph, effects, version, position: None, commit_time_micros: None })
        .await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn deletes_reach_keys_on_every_slot() {
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let keys: Vec<String> = (0..200).map(|i| format!("it:{p}:del:{i}")).collect();
        for k in &keys {
            probe.set(k, "cached").await;
        }
        let effects: Vec<Effect> = keys.iter().map(|k| key(&g, "gone", k)).collect();
        apply(&s, &g, &effects, 1).await.unwrap();
        for k in &keys {
            assert!(!probe.exists(k).await, "{kind:?}: {k} survived");
        }
    }
}

#[tokio::test]
async fn a_bump_always_raises_a_version_and_compares_every_u64_exactly() {
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let v = format!("it:{p}:version");
        let bump = [key(&g, "versioned", &v)];
        for (version, expected) in [
            (10, "10"),
            // Not above what is stored: raised past it.
            (5, "11"),
            (11, "12"),
            // 2^53 + 1 and 2^53 are the same double: Lua numbers would tie.
            (9_007_199_254_740_993, "9007199254740993"),
            (9_007_199_254_740_992, "9007199254740994"),
            (u64::MAX - 2, "18446744073709551613"),
            (u64::MAX - 3, "18446744073709551614"),
            (u64::MAX, "18446744073709551615"),
        ] {
            apply(&s, &g, &bump, version).await.unwrap();
            assert_eq!(probe.get(&v).await.as_deref(), Some(expected), "{kind:?} after {version}");
        }
        // A version written with leading zeros by someone else still compares.
        probe.set(&v, "000000000000000000042").await;
        apply(&s, &g, &bump, 41).await.unwrap();
        assert_eq!(probe.get(&v).await.as_deref(), Some("43"));
        apply(&s, &g, &bump, 50).await.unwrap();
        assert_eq!(probe.get(&v).await.as_deref(), Some("50"));
    }
}

/// A version key that holds something else (an application wrote text
/// into it, or two caches' templates render the same key with different
/// actions) was a definite error: the daemon stopped, and stopped again on
/// every restart, on the same row. Now the key is left as it is, the
/// cache's namespace is bumped instead (which invalidates every key of it),
/// and the batch is confirmed.
#[tokio::test]
async fn a_version_key_holding_something_else_bumps_its_caches_namespace_instead() {
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let ns = namespace_key(&format!("versioned_{}", g.suffix));
        let text = format!("it:{p}:text");
        probe.set(&text, "not a number").await;
        apply(&s, &g, &[key(&g, "versioned", &text)], 7).await.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(probe.get(&text).await.as_deref(), Some("not a number"), "{kind:?}: left as it was");
        assert_eq!(probe.get(&ns).await.as_deref(), Some("7"), "{kind:?}: the namespace was bumped instead");

        let list = format!("it:{p}:list");
        probe.q::<i64>(redis::cmd("RPUSH").arg(&list).arg("x")).await;
        apply(&s, &g, &[key(&g, "versioned", &list)], 9).await.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(probe.get(&ns).await.as_deref(), Some("9"), "{kind:?}: a list is not a version either");
        assert_eq!(s.unbumpable_keys(), 2, "{kind:?}: counted");

        // A namespace key is evictd's own: something else there stays an error.
        probe.set(&ns, "garbage").await;
        let err = apply(&s, &g, &[key(&g, "versioned", &text)], 11).await.unwrap_err();
        assert!(matches!(&err, SinkError::Definite { cause, .. } if cause.to_string().contains(&ns)), "{err:?}");
    }
}

#[tokio::test]
async fn scripts_are_loaded_again_when_the_server_forgot_them() {
    // Standalone only: flushing every Cluster node would race the other tests.
    let (s, probe, g, p) =
        (sink(Kind::Standalone).await, Probe::new(Kind::Standalone).await, TestGraph::new(&unique()), unique());
    let v = format!("it:{p}:flushed");
    probe.q::<()>(redis::cmd("SCRIPT").arg("FLUSH")).await;
    apply(&s, &g, &[key(&g, "versioned", &v)], 3).await.unwrap();
    assert_eq!(probe.get(&v).await.as_deref(), Some("3"));
}

#[tokio::test]
async fn expire_sets_a_jittered_ttl_and_never_lengthens_a_shorter_one() {
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let (fresh, short, absent) = (format!("it:{p}:fresh"), format!("it:{p}:short"), format!("it:{p}:absent"));
        probe.set(&fresh, "v").await;
        probe.set(&short, "v").await;
        probe.q::<i64>(redis::cmd("PEXPIRE").arg(&short).arg(2000)).await;
        let effects = [key(&g, "fading", &fresh), key(&g, "fading", &short), key(&g, "fading", &absent)];
        let started = Instant::now();
        apply(&s, &g, &effects, 1).await.unwrap();
        let ttl = probe.pttl(&fresh).await;
        let elapsed = started.elapsed().as_millis() as i64;
        assert!((60_000 - elapsed..=65_000).contains(&ttl), "{kind:?}: ttl {ttl}");
        assert!(probe.pttl(&short).await <= 2000, "{kind:?}: a shorter TTL was lengthened");
        assert!(!probe.exists(&absent).await, "{kind:?}: expire created a key");

        // Again: a repeated invalidation never lengthens the TTL it set.
        apply(&s, &g, &effects, 2).await.unwrap();
        assert!(probe.pttl(&fresh).await <= ttl, "{kind:?}: the TTL grew");
    }
}

#[tokio::test]
async fn a_namespace_bump_raises_the_cache_namespace_version_only() {
    for kind in BOTH {
        let (s, probe, g) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()));
        let bump = [Effect::NamespaceBump { cache: g.cache("gone") }];
        let ns = namespace_key(&format!("gone_{}", g.suffix));
        apply(&s, &g, &bump, 42).await.unwrap();
        assert_eq!(probe.get(&ns).await.as_deref(), Some("42"));
        apply(&s, &g, &bump, 41).await.unwrap();
        assert_eq!(probe.get(&ns).await.as_deref(), Some("43"), "{kind:?}: the namespace went back or stayed");
        assert_eq!(probe.pttl(&ns).await, -1, "namespace keys never expire");
    }
}

#[tokio::test]
async fn a_tag_deletes_its_registered_keys_on_any_slot_and_prunes_expired_registrations() {
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let tag = format!("item:{p}");
        let registry = tag_key(&tag);
        let live: Vec<String> = (0..50).map(|i| format!("it:{p}:search:{i}")).collect();
        let later = (now_ms() + 300_000).to_string();
        for k in &live {
            probe.set(k, "page").await;
            probe.zadd(&registry, &later, k).await;
        }
        // Expired ten minutes ago: its key is gone, the registration is pruned.
        let stale = format!("it:{p}:search:stale");
        probe.set(&stale, "kept: not a live registration").await;
        probe.zadd(&registry, &(now_ms() - 600_000).to_string(), &stale).await;
        // Registered without expiry.
        let forever = format!("it:{p}:search:forever");
        probe.set(&forever, "page").await;
        probe.zadd(&registry, "+inf", &forever).await;
        // A key of another tag stays.
        let other = format!("it:{p}:other");
        probe.set(&other, "page").await;
        probe.zadd(&tag_key(&format!("other:{p}")), &later, &other).await;

        let effects = [Effect::Tag { cache: g.cache("gone"), tag: tag.clone() }];
        apply(&s, &g, &effects, 1).await.unwrap();
        for k in live.iter().chain([&forever]) {
            assert!(!probe.exists(k).await, "{kind:?}: {k} survived");
        }
        assert!(probe.exists(&other).await);
        assert!(probe.exists(&stale).await, "an expired registration does not delete");
        assert_eq!(probe.q::<i64>(redis::cmd("ZCARD").arg(&registry)).await, 0, "{kind:?}: registrations left");

        // A registration made after the invalidation survives the next one's
        // bookkeeping: registered again, deleted again.
        probe.set(&live[0], "refilled").await;
        probe.zadd(&registry, &later, &live[0]).await;
        assert_eq!(probe.zscore(&registry, &live[0]).await, Some(later.parse().unwrap()));
        apply(&s, &g, &effects, 2).await.unwrap();
        assert!(!probe.exists(&live[0]).await);
    }
}

#[tokio::test]
async fn forgetting_spares_a_registration_refreshed_or_added_after_the_read() {
    for kind in BOTH {
        let (probe, p) = (Probe::new(kind).await, unique());
        let registry = tag_key(&format!("race:{p}"));
        let (a, b, c) = (format!("it:{p}:a"), format!("it:{p}:b"), format!("it:{p}:c"));
        probe.zadd(&registry, "1000000", &a).await;
        probe.zadd(&registry, "1000000", &b).await;
        // evictd read (a, 1000000) and (b, 1000000), then deleted their keys.
        // Meanwhile the application refilled b and registered it again with a
        // later expiry, and registered c.
        probe.zadd(&registry, "2000000", &b).await;
        probe.zadd(&registry, "1000000", &c).await;
        let removed: i64 = probe
            .q(redis::cmd("EVAL")
                .arg(FORGET_LUA)
                .arg(1)
                .arg(&registry)
                .arg(0)
                .arg(&a)
                .arg("1000000")
                .arg(&b)
                .arg("1000000"))
            .await;
        assert_eq!(removed, 1, "{kind:?}");
        assert_eq!(probe.zscore(&registry, &a).await, None);
        assert_eq!(probe.zscore(&registry, &b).await, Some(2_000_000.0));
        assert_eq!(probe.zscore(&registry, &c).await, Some(1_000_000.0));
    }
}

#[tokio::test]
async fn a_second_delete_follows_the_delay_after_confirmation() {
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let direct = format!("it:{p}:twice");
        let tagged = format!("it:{p}:tagged");
        let tag = format!("item:{p}");
        probe.set(&direct, "v").await;
        probe.set(&tagged, "v").await;
        probe.zadd(&tag_key(&tag), &(now_ms() + 60_000).to_string(), &tagged).await;
        let effects = [key(&g, "twice", &direct), Effect::Tag { cache: g.cache("tagged"), tag }];
        let applied = Instant::now();
        apply(&s, &g, &effects, 1).await.unwrap();
        assert!(!probe.exists(&direct).await && !probe.exists(&tagged).await);
        // A reader that raced the commit puts stale copies back.
        probe.set(&direct, "stale").await;
        probe.set(&tagged, "stale").await;
        assert!(applied.elapsed() < Duration::from_millis(1000), "the test was too slow to observe the delay");
        assert!(probe.exists(&direct).await, "{kind:?}: deleted again before the delay");

        let tracker = s.redeletes();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.expect("second deletes finish");
        assert!(applied.elapsed() >= Duration::from_millis(1000));
        assert!(!probe.exists(&direct).await, "{kind:?}: stale copy survived");
        assert!(!probe.exists(&tagged).await, "{kind:?}: stale tagged copy survived");
        assert_eq!(s.redelete_failures(), 0);
    }
}

#[tokio::test]
async fn several_targets_confirm_only_when_all_did() {
    let g = TestGraph::new(&unique());
    let p = unique();
    let proxy = Proxy::start(&urls(Kind::Standalone)[0]).await;
    let options = RedisSinkOptions { timeout: Duration::from_millis(800), ..RedisSinkOptions::default() };
    let cluster = RedisSink::connect_with(&target("cluster", &urls(Kind::Cluster), true), options).await.unwrap();
    let proxied =
        RedisSink::connect_with(&target("proxied", std::slice::from_ref(&proxy.url), false), options).await.unwrap();
    let both = MultiSink::new(vec![cluster, proxied]);
    let (cp, sp) = (Probe::new(Kind::Cluster).await, Probe::new(Kind::Standalone).await);

    let k = format!("it:{p}:multi");
    cp.set(&k, "v").await;
    sp.set(&k, "v").await;
    apply(&both, &g, &[key(&g, "gone", &k)], 1).await.unwrap();
    assert!(!cp.exists(&k).await && !sp.exists(&k).await);

    // The standalone target hangs: the cluster applies, the batch is not confirmed.
    cp.set(&k, "v").await;
    sp.set(&k, "v").await;
    proxy.freeze(true);
    let started = Instant::now();
    let err = apply(&both, &g, &[key(&g, "gone", &k)], 2).await.unwrap_err();
    assert!(matches!(&err, SinkError::Transient { target, .. } if target == "proxied"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(!cp.exists(&k).await);
    assert!(sp.exists(&k).await);

    // Back up: the retried batch confirms.
    proxy.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match apply(&both, &g, &[key(&g, "gone", &k)], 2).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => tracing::debug!("retrying: {e}"),
            Err(e) => panic!("the target did not come back: {e}"),
        }
    }
    assert!(!sp.exists(&k).await);
}

#[tokio::test]
async fn an_unreachable_or_silent_target_is_a_transient_error_within_the_timeout() {
    let options = RedisSinkOptions { timeout: Duration::from_millis(500), ..RedisSinkOptions::default() };
    let closed = format!("redis://127.0.0.1:{}", closed_port().await);
    let (silent, _listener) = silent_listener().await;
    for (url, cluster) in [(&closed, false), (&closed, true), (&silent, false), (&silent, true)] {
        let started = Instant::now();
        let result = RedisSink::connect_with(&target("down", std::slice::from_ref(url), cluster), options).await;
        let err = result.err().expect("no target there");
        assert!(matches!(err, SinkError::Transient { .. }), "{url} cluster={cluster}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{url} cluster={cluster}: took {:?}", started.elapsed());
    }

    // Connected, then the target stops answering: apply fails, never hangs.
    let g = TestGraph::new(&unique());
    let proxy = Proxy::start(&urls(Kind::Standalone)[0]).await;
    let s = RedisSink::connect_with(&target("hangs", std::slice::from_ref(&proxy.url), false), options).await.unwrap();
    proxy.freeze(true);
    let started = Instant::now();
    let err = apply(&s, &g, &[key(&g, "gone", "it:hung")], 1).await.unwrap_err();
    assert!(matches!(err, SinkError::Transient { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_restarted_target_fails_transiently_then_confirms_again() {
    let g = TestGraph::new(&unique());
    let p = unique();
    let proxy = Proxy::start(&urls(Kind::Standalone)[0]).await;
    let options = RedisSinkOptions { timeout: Duration::from_millis(800), ..RedisSinkOptions::default() };
    let s =
        RedisSink::connect_with(&target("restarts", std::slice::from_ref(&proxy.url), false), options).await.unwrap();
    let probe = Probe::new(Kind::Standalone).await;
    let k = format!("it:{p}:restart");
    let effects = [key(&g, "gone", &k)];

    proxy.set_down(true);
    probe.set(&k, "v").await;
    let started = Instant::now();
    let err = apply(&s, &g, &effects, 1).await.unwrap_err();
    assert!(matches!(err, SinkError::Transient { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert!(probe.exists(&k).await);

    proxy.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = apply(&s, &g, &effects, 1).await {
        assert!(Instant::now() < deadline, "no reconnection: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await; // the caller's backoff
    }
    assert!(!probe.exists(&k).await);
}

#[tokio::test]
async fn every_stamp_a_reader_took_is_replaced_before_the_invalidation_on_every_slot() {
    use evictd::reader::{begin_fill, fill, guard_key};
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        // Keys with and without hash tags, spread over slots.
        let keys: Vec<String> =
            (0..50).map(|i| if i % 2 == 0 { format!("it:{p}:{{{i}}}:g") } else { format!("it:{p}:g:{i}") }).collect();
        let mut stamps = Vec::new();
        for k in &keys {
            let stamp = match &probe {
                Probe::One(c) => begin_fill(&mut c.clone(), k.as_bytes(), 60_000).await,
                Probe::Cluster(c) => begin_fill(&mut c.clone(), k.as_bytes(), 60_000).await,
            };
            stamps.push(stamp.unwrap());
        }
        // A key no reader is filling gets no stamp: there is nothing to refuse.
        let unread = format!("it:{p}:g:unread");
        let mut effects: Vec<Effect> = keys.iter().map(|k| key(&g, "gone", k)).collect();
        effects.push(key(&g, "gone", &unread));
        apply(&s, &g, &effects, 77).await.unwrap();
        let unread_guard = String::from_utf8(guard_key(unread.as_bytes())).unwrap();
        assert!(!probe.exists(&unread_guard).await, "{kind:?}: a stamp nobody took was created");
        for (k, stamp) in keys.iter().zip(&stamps) {
            let guard = String::from_utf8(guard_key(k.as_bytes())).unwrap();
            let value = probe.get(&guard).await.unwrap_or_default();
            assert!(value.starts_with("i77."), "{kind:?}: {guard} = {value}");
            let ttl = probe.pttl(&guard).await;
            assert!(ttl > 0 && ttl <= 60_000, "{kind:?}: the stamp expires ({ttl} ms)");
            let stored = match &probe {
                Probe::One(c) => fill(&mut c.clone(), k.as_bytes(), stamp, b"stale", 0).await,
                Probe::Cluster(c) => fill(&mut c.clone(), k.as_bytes(), stamp, b"stale", 0).await,
            };
            assert!(!stored.unwrap(), "{kind:?}: a fill begun before the invalidation is refused");
            assert!(!probe.exists(k).await);
        }
    }
}

/// Issue 11, item 7: a key with braces but no valid hash tag (`p:{}:x`, an
/// empty value inside `{{…}}`), or a tag member with a stray `}`, has no
/// stamp in its own slot. On a Cluster the stamp's `SET` made the pipeline
/// cross slots: a definite error, replayed on every restart. Such keys are
/// invalidated without a stamp (no reader can hold one: its script would
/// cross slots too), and the batch is confirmed.
#[tokio::test]
async fn keys_whose_stamp_would_cross_slots_are_invalidated_without_one() {
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let (empty_tag, stray, fading) = (format!("it:{p}:{{}}:x"), format!("it:{p}:}}:y"), format!("it:{p}:{{}}:z"));
        let member = format!("it:{p}:{{}}m}}");
        let tag = format!("braces:{p}");
        for k in [&empty_tag, &stray, &fading, &member] {
            probe.set(k, "cached").await;
        }
        probe.zadd(&tag_key(&tag), &(now_ms() + 300_000).to_string(), &member).await;
        let effects = [
            key(&g, "gone", &empty_tag),
            key(&g, "gone", &stray),
            key(&g, "fading", &fading),
            Effect::Tag { cache: g.cache("gone"), tag: tag.clone() },
        ];
        apply(&s, &g, &effects, 5).await.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        for k in [&empty_tag, &stray, &member] {
            assert!(!probe.exists(k).await, "{kind:?}: {k} survived");
        }
        assert!(probe.pttl(&fading).await > 0, "{kind:?}: {fading} got no TTL");
    }
}

/// Issue 11, item 3: a restore, a move to a new cluster, a switch from the
/// Kafka source or a second source on the same Redis leave versions above
/// the Postgres LSNs to come. The next change must still raise them.
#[tokio::test]
async fn versions_above_the_postgres_lsn_are_raised_by_the_next_change() {
    use evictd::change::{Lsn, Position};
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let v = format!("it:{p}:restored");
        let ns = namespace_key(&format!("gone_{}", g.suffix));
        // What the old cluster (or Kafka's commit times) left behind.
        probe.set(&v, "900000").await;
        probe.set(&ns, "900000").await;
        let effects = [key(&g, "versioned", &v), Effect::NamespaceBump { cache: g.cache("gone") }];
        let position = Position::Postgres { commit_lsn: Lsn(5000), lsn: Lsn(5100) };
        let batch = SinkBatch {
            id: 1,
            graph: &g.graph,
            effects: &effects,
            version: 5000,
            position: Some(&position),
            commit_time_micros: None,
        };
        s.apply(batch).await.unwrap();
        assert_eq!(probe.get(&v).await.as_deref(), Some("900001"), "{kind:?}: the version key was not raised");
        assert_eq!(probe.get(&ns).await.as_deref(), Some("900001"), "{kind:?}: the namespace was not raised");
        assert_eq!(s.versions_behind(), 2, "{kind:?}: both bumps were behind");
        // A version below the batch's is set to it, and is not behind.
        let fresh = format!("it:{p}:fresh");
        probe.set(&fresh, "10").await;
        let effects = [key(&g, "versioned", &fresh)];
        let batch = SinkBatch {
            id: 2,
            graph: &g.graph,
            effects: &effects,
            version: 5000,
            position: Some(&position),
            commit_time_micros: None,
        };
        s.apply(batch).await.unwrap();
        assert_eq!(probe.get(&fresh).await.as_deref(), Some("5000"));
        assert_eq!(s.versions_behind(), 2, "{kind:?}");
    }
}

/// Issue 11, item 3: batch versions repeat (a restore, two sources on one
/// Redis, Kafka replicas), so a stamp must not be made of the version alone:
/// a reader holding the stamp of an earlier invalidation with the same
/// version would otherwise fill what it read before this one.
#[tokio::test]
async fn two_invalidations_with_the_same_version_write_different_stamps() {
    use evictd::change::{Lsn, Position};
    use evictd::reader::guard_key;
    let (s, probe, g, p) =
        (sink(Kind::Standalone).await, Probe::new(Kind::Standalone).await, TestGraph::new(&unique()), unique());
    let k = format!("it:{p}:again");
    let guard = String::from_utf8(guard_key(k.as_bytes())).unwrap();
    probe.set(&guard, "r1.2").await;
    let effects = [key(&g, "gone", &k)];
    let position = Position::Postgres { commit_lsn: Lsn(77), lsn: Lsn(78) };
    let mut seen = Vec::new();
    for id in 1..=2 {
        let batch = SinkBatch {
            id,
            graph: &g.graph,
            effects: &effects,
            version: 77,
            position: Some(&position),
            commit_time_micros: None,
        };
        s.apply(batch).await.unwrap();
        seen.push(probe.get(&guard).await.unwrap());
    }
    assert!(seen[0].starts_with("i77.") && seen[0] != seen[1], "{seen:?}");
}

/// Issue 11, item 13: a registry is read in rounds of a bounded number of
/// registrations (`tags::HELD_REGISTRATIONS`), each deleted and forgotten
/// before the scan goes on. A registry past that size loses no key and
/// keeps no registration across the rounds.
#[tokio::test]
async fn a_registry_larger_than_one_round_is_invalidated_whole() {
    const MEMBERS: usize = 120_000;
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let tag = format!("huge:{p}");
        let registry = tag_key(&tag);
        let later = (now_ms() + 300_000).to_string();
        // One hash tag for every key, so that a Cluster takes them in bulk.
        let keys: Vec<String> = (0..MEMBERS).map(|i| format!("it:{{{p}}}:k{i}")).collect();
        for chunk in keys.chunks(10_000) {
            let mut mset = redis::cmd("MSET");
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&registry);
            for k in chunk {
                mset.arg(k).arg("page");
                zadd.arg(&later).arg(k);
            }
            probe.q::<()>(&mset).await;
            probe.q::<i64>(&zadd).await;
        }
        let effects = [Effect::Tag { cache: g.cache("gone"), tag: tag.clone() }];
        apply(&s, &g, &effects, 1).await.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let mut left = 0;
        for chunk in keys.chunks(10_000) {
            left += probe.q::<i64>(redis::cmd("EXISTS").arg(chunk)).await;
        }
        assert_eq!(left, 0, "{kind:?}: keys survived");
        assert_eq!(probe.q::<i64>(redis::cmd("ZCARD").arg(&registry)).await, 0, "{kind:?}: registrations left");
    }
}

/// Issue 11, item 13: second deletes wait in bounded number. Past
/// `redelete::MAX_PENDING_KEYS` waiting keys, further ones are skipped and
/// counted; the first delete of every key was applied all the same.
#[tokio::test]
async fn second_deletes_past_the_pending_bound_are_skipped_and_counted() {
    use evictd::sink::redis::REDELETE_MAX_PENDING_KEYS as MAX_PENDING_KEYS;
    let (s, probe, g, p) =
        (sink(Kind::Standalone).await, Probe::new(Kind::Standalone).await, TestGraph::new(&unique()), unique());
    let keys: Vec<String> = (0..MAX_PENDING_KEYS + 500).map(|i| format!("it:{p}:twice:{i}")).collect();
    let effects: Vec<Effect> = keys.iter().map(|k| key(&g, "twice", k)).collect();
    probe.set(&keys[0], "v").await;
    apply(&s, &g, &effects, 1).await.unwrap();
    assert!(!probe.exists(&keys[0]).await, "the first delete was applied");
    assert_eq!(s.redeletes_skipped(), 500, "the keys past the bound get no second delete");
    let tracker = s.redeletes();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await.expect("second deletes finish");
    assert_eq!(s.redelete_failures(), 0);
}

/// Issue 11, item 13: many tags in one batch are scanned a slice at a time
/// (no more scans at once than their pages fit in a round), and none is
/// left behind.
#[tokio::test]
async fn a_batch_of_many_large_registries_is_invalidated_whole() {
    const TAGS: usize = 120;
    const MEMBERS: usize = 600;
    for kind in BOTH {
        let (s, probe, g, p) = (sink(kind).await, Probe::new(kind).await, TestGraph::new(&unique()), unique());
        let later = (now_ms() + 300_000).to_string();
        let mut effects = Vec::new();
        let mut all_keys = Vec::new();
        for t in 0..TAGS {
            let tag = format!("many:{p}:{t}");
            let keys: Vec<String> = (0..MEMBERS).map(|i| format!("it:{{{p}}}:t{t}:k{i}")).collect();
            let mut mset = redis::cmd("MSET");
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(tag_key(&tag));
            for k in &keys {
                mset.arg(k).arg("page");
                zadd.arg(&later).arg(k);
            }
            probe.q::<()>(&mset).await;
            probe.q::<i64>(&zadd).await;
            effects.push(Effect::Tag { cache: g.cache("gone"), tag });
            all_keys.extend(keys);
        }
        apply(&s, &g, &effects, 1).await.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let mut left = 0;
        for chunk in all_keys.chunks(10_000) {
            left += probe.q::<i64>(redis::cmd("EXISTS").arg(chunk)).await;
        }
        assert_eq!(left, 0, "{kind:?}: keys survived");
        for effect in &effects {
            let Effect::Tag { tag, .. } = effect else { unreachable!() };
            assert_eq!(
                probe.q::<i64>(redis::cmd("ZCARD").arg(tag_key(tag))).await,
                0,
                "{kind:?}: {tag} kept registrations"
            );
        }
    }
}
