//! Versions never go backwards, across restores too (non-negotiable 2):
//! Redis going back in time under a running evictd.
//!
//! - The broadcast's `seq` lives in Redis. A Redis restored from an older
//!   snapshot (or restarted on an RDB older than the last publishes) holds a
//!   `seq` below what subscribers already saw under the same epoch: unless
//!   evictd starts a new epoch, they take the next messages for repeats and
//!   keep stale entries. Checked with the subscribers' own rules
//!   (`subscriber::sequence::Tracker`, the conformance table of
//!   `docs/broadcast.md`) on what the stream carries.
//! - The source record (`evictd:source:<slot>`) must be back before the next
//!   acknowledgement after a Redis that restarted empty.
//!
//! The tests that restart Redis have their own `redis-server` on a port in
//! 6650-6669.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use evictd::change::{Lsn, Position};
use evictd::config::{BroadcastConfig, RedisTarget, Transport};
use evictd::resolve::Effect;
use evictd::sink::redis::layout::BroadcastKeys;
use evictd::sink::redis::{Envelope, RedisSink};
use evictd::sink::{Sink, SinkBatch};
use evictd::subscriber::sequence::{Decision, Tracker};

use super::redis_support::{BOTH, OwnRedis, Probe, TestGraph, kind_target, target, unique, urls};

/// A `redis-server` of a test's own with an RDB file: `SAVE` writes it and a
/// start loads it, so a test can put an older snapshot back.
struct SnapshotRedis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl SnapshotRedis {
    fn start(port: u16) -> SnapshotRedis {
        let mut server = SnapshotRedis { port, child: None, dir: tempfile::tempdir().unwrap() };
        server.spawn();
        server
    }

    fn rdb(&self) -> PathBuf {
        self.dir.path().join("dump.rdb")
    }

    fn spawn(&mut self) {
        // No automatic saves: the snapshot is exactly the one `SAVE` took.
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap(), "--dbfilename", "dump.rdb"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ping = redis::Client::open(self.url().as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "redis-server on {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::kill(&mut child);
        }
    }

    /// `SAVE`, and a copy of the snapshot at `to`.
    async fn snapshot(&self, to: &std::path::Path) {
        let mut conn = redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
        std::fs::copy(self.rdb(), to).unwrap();
    }

    /// SIGKILL (no save), `from` put back as the RDB, a new server on it.
    fn restore(&mut self, from: &std::path::Path) {
        self.stop();
        std::fs::copy(from, self.rdb()).unwrap();
        self.spawn();
    }
}

impl Drop for SnapshotRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn broadcast_target(url: &str, channel: &str) -> RedisTarget {
    let mut t = target("own", &[url.to_owned()], false);
    t.broadcast = Some(BroadcastConfig {
        transport: Transport::Both,
        stream_max_len: 1000,
        heartbeat: Duration::from_millis(100),
        ..BroadcastConfig::new(channel)
    });
    t
}

/// Applies a batch of one key, retrying while the target comes back (as
/// the run loop retries a batch).
async fn apply(sink: &RedisSink, g: &TestGraph, id: u64, key: &str) {
    let effects = [Effect::Key { cache: g.cache("gone"), key: key.to_owned() }];
    let position = Position::Postgres { commit_lsn: Lsn(id << 8), lsn: Lsn((id << 8) + 0x28) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let batch = SinkBatch {
            id,
            graph: &g.graph,
            effects: &effects,
            version: id,
            position: Some(&position),
            commit_time_micros: None,
        };
        match sink.apply(batch).await {
            Ok(()) => return,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "batch {id} keeps failing: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The newest message of the channel's stream.
async fn newest(url: &str, keys: &BroadcastKeys) -> Envelope {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(&keys.stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (_, fields) = entries.into_iter().next().expect("a stream entry");
    Envelope::parse(&fields[0].1).unwrap()
}

/// What a subscriber that saw every message so far does with the next one.
fn decide(tracker: &mut Tracker, m: &Envelope) -> Decision {
    tracker.batch(m.epoch.as_deref().unwrap(), m.seq.unwrap())
}

#[tokio::test]
async fn a_redis_restored_from_an_older_snapshot_under_a_running_evictd_starts_a_new_epoch() {
    let mut redis = SnapshotRedis::start(6650);
    let (g, p) = (TestGraph::new(&unique()), unique());
    let channel = format!("it:{p}:bc");
    let keys = BroadcastKeys::of(&channel);
    let sink = RedisSink::connect(&broadcast_target(&redis.url(), &channel)).await.unwrap();
    let mut subscriber = Tracker::new();

    apply(&sink, &g, 1, "k1").await;
    assert_eq!(decide(&mut subscriber, &newest(&redis.url(), &keys).await), Decision::Apply);
    let old = redis.dir.path().join("old.rdb");
    redis.snapshot(&old).await;
    for id in 2..=4 {
        apply(&sink, &g, id, &format!("k{id}")).await;
        assert_eq!(decide(&mut subscriber, &newest(&redis.url(), &keys).await), Decision::Apply);
    }
    let (epoch, seen) = subscriber.position().map(|(e, s)| (e.to_owned(), s)).unwrap();

    // Redis goes back to the snapshot while the same sink (evictd) runs.
    redis.restore(&old);
    apply(&sink, &g, 5, "k5").await;
    let after = newest(&redis.url(), &keys).await;
    assert_eq!(
        decide(&mut subscriber, &after),
        Decision::Flush,
        "the subscriber saw ({epoch}, {seen}); after the restore evictd published ({:?}, {:?}), which it ignores",
        after.epoch,
        after.seq
    );
    // The new sequence continues from there: the next batch is applied.
    apply(&sink, &g, 6, "k6").await;
    assert_eq!(decide(&mut subscriber, &newest(&redis.url(), &keys).await), Decision::Apply);
}

#[tokio::test]
async fn a_redis_restored_while_evictd_was_down_starts_a_new_epoch_at_the_first_publish() {
    let mut redis = SnapshotRedis::start(6651);
    let (g, p) = (TestGraph::new(&unique()), unique());
    let channel = format!("it:{p}:bc");
    let keys = BroadcastKeys::of(&channel);
    let mut subscriber = Tracker::new();
    let old = redis.dir.path().join("old.rdb");
    {
        let sink = RedisSink::connect(&broadcast_target(&redis.url(), &channel)).await.unwrap();
        apply(&sink, &g, 1, "k1").await;
        decide(&mut subscriber, &newest(&redis.url(), &keys).await);
        redis.snapshot(&old).await;
        apply(&sink, &g, 2, "k2").await;
        assert_eq!(decide(&mut subscriber, &newest(&redis.url(), &keys).await), Decision::Apply);
    }
    // evictd stopped; Redis restored; a new evictd (nothing in memory).
    redis.restore(&old);
    let sink = RedisSink::connect(&broadcast_target(&redis.url(), &channel)).await.unwrap();
    apply(&sink, &g, 3, "k3").await;
    assert_eq!(decide(&mut subscriber, &newest(&redis.url(), &keys).await), Decision::Flush);
    // A heartbeat on the new epoch does not start yet another one.
    let seq = sink.heartbeat().await.unwrap();
    assert_eq!(seq, newest(&redis.url(), &keys).await.seq);
    apply(&sink, &g, 4, "k4").await;
    assert_eq!(decide(&mut subscriber, &newest(&redis.url(), &keys).await), Decision::Apply);
}

#[tokio::test]
async fn a_sequence_lowered_without_a_redis_restart_starts_a_new_epoch() {
    // No restart, so Redis's identity is the same: only what the sink saw
    // tells that the stored sequence went back (a tool writing old values
    // back, `DEBUG RELOAD` of an older file). The shared servers, standalone
    // and Cluster: nothing here restarts them.
    for kind in BOTH {
        let url = urls(kind)[0].clone();
        let (g, p) = (TestGraph::new(&unique()), unique());
        let channel = format!("it:{p}:bc");
        let keys = BroadcastKeys::of(&channel);
        let mut t = kind_target(kind);
        t.broadcast = broadcast_target(&url, &channel).broadcast;
        let sink = RedisSink::connect(&t).await.unwrap();
        let probe = Probe::new(kind).await;
        let newest = || async {
            let entries: Vec<(String, Vec<(String, String)>)> =
                probe.q(redis::cmd("XREVRANGE").arg(&keys.stream).arg("+").arg("-").arg("COUNT").arg(1)).await;
            Envelope::parse(&entries[0].1[0].1).unwrap()
        };
        let mut subscriber = Tracker::new();
        for id in 1..=3 {
            apply(&sink, &g, id, &format!("it:{p}:k{id}")).await;
            decide(&mut subscriber, &newest().await);
        }
        let (_, seen) = subscriber.position().unwrap();
        let () = probe.q(redis::cmd("SET").arg(&keys.seq).arg(seen - 2)).await;
        apply(&sink, &g, 4, &format!("it:{p}:k4")).await;
        let after = newest().await;
        assert_eq!(decide(&mut subscriber, &after), Decision::Flush, "{kind:?}: {after:?}");
        assert!(after.epoch.as_deref().unwrap().parse::<u64>().unwrap() > seen, "{kind:?}: above every seq seen");
        apply(&sink, &g, 5, &format!("it:{p}:k5")).await;
        assert_eq!(decide(&mut subscriber, &newest().await), Decision::Apply, "{kind:?}");
    }
}

#[tokio::test]
async fn the_source_record_is_back_before_the_next_acknowledgement_after_redis_restarted_empty() {
    use super::daemon::{Daemon, fill, redis, wait_gone};
    let mut own = OwnRedis::start(6653);
    let mut d = Daemon::new(&own.url()).await;
    let record_key = format!("evictd:source:{}", d.slot);
    d.start().await;
    let mut r = redis(&own.url()).await;
    let item = d.key("item:1");
    fill(&mut r, std::slice::from_ref(&item)).await;
    d.sql("INSERT INTO app.items VALUES (1, 1, 'boots', NULL)").await;
    wait_gone(&d, &r, std::slice::from_ref(&item), Duration::from_secs(30)).await;
    let record: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(&record_key).query_async(&mut r).await.unwrap();
    assert_eq!(record.get("slot"), Some(&d.slot), "{record:?}");

    // Redis restarts without persistence under the running daemon.
    own.restart();
    let mut r = redis(&own.url()).await;
    fill(&mut r, std::slice::from_ref(&item)).await;
    d.sql("UPDATE app.items SET name = 'shoes' WHERE id = 1").await;
    let lsn = d.current_lsn().await;
    wait_gone(&d, &r, std::slice::from_ref(&item), Duration::from_secs(30)).await;
    d.wait_for("the change to be acknowledged", Duration::from_secs(30), || async {
        (d.confirmed_flush().await >= lsn).then_some(())
    })
    .await;
    let record: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(&record_key).query_async(&mut r).await.unwrap();
    assert_eq!(record.get("slot"), Some(&d.slot), "the record is gone after the restart: {record:?}\n{}", d.log());
    assert!(record.get("system_identifier").is_some_and(|s| !s.is_empty()), "{record:?}");
    assert!(record.get("first_streamed_ms").is_some_and(|s| s != "0"), "{record:?}");
    d.finish().await;
}
