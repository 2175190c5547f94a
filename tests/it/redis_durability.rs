//! What "confirmed" needs from Redis (issue 11, item 4): the durability
//! wait against a real primary and replica, and the start-up check of the
//! eviction policy through `evictd check` and `evictd run`.
//!
//! Each test starts Redis servers of its own on fixed ports of this file's
//! range (6620-6639), one range per test, and stops them when it ends.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evictd::config::Durability;
use evictd::resolve::Effect;
use evictd::sink::redis::{RedisSink, RedisSinkOptions};
use evictd::sink::{Sink, SinkBatch, SinkError};

use super::daemon::{Daemon, redis_url};
use super::redis_support::{TestGraph, target, unique};
use super::support::{evictd, pg_url, stderr, stdout};

/// A `redis-server` of this test's own, without persistence unless asked.
struct Server {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(port: u16, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--dir", dir.path().to_str().unwrap(), "--enable-debug-command", "yes"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server on {port} did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { port, child, _dir: dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    async fn q<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.conn().await).await.unwrap_or_else(|e| panic!("{}: {e}", self.port))
    }

    /// One `INFO replication` field.
    async fn replication(&self, field: &str) -> String {
        let info: String = self.q(redis::cmd("INFO").arg("replication")).await;
        let prefix = format!("{field}:");
        info.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_default().trim().to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `what` with a deadline.
async fn until<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A primary on `port` and its replica on `port + 1`, in sync.
async fn pair(port: u16) -> (Server, Server) {
    let primary = Server::start(port, &[]);
    let replica = Server::start(port + 1, &["--replicaof", "127.0.0.1", &port.to_string()]);
    until("the replica to sync", Duration::from_secs(15), || async {
        replica.replication("master_link_status").await == "up" && primary.replication("connected_slaves").await == "1"
    })
    .await;
    (primary, replica)
}

async fn waiting_sink(url: &str, replicas: u32, timeout_ms: u64) -> RedisSink {
    let mut t = target("durable", &[url.to_owned()], false);
    t.durability = Some(Durability { replicas, aof: false, timeout: Duration::from_millis(timeout_ms) });
    RedisSink::connect_with(&t, RedisSinkOptions { timeout: Duration::from_secs(5), ..RedisSinkOptions::default() })
        .await
        .unwrap()
}

async fn delete(sink: &RedisSink, g: &TestGraph, keys: &[String], version: u64) -> Result<(), SinkError> {
    let effects: Vec<Effect> = keys.iter().map(|k| Effect::Key { cache: g.cache("gone"), key: k.clone() }).collect();
    sink.apply(SinkBatch {
        id: version,
        graph: &g.graph,
        effects: &effects,
        version,
        position: None,
        commit_time_micros: None,
    })
    .await
}

#[tokio::test]
async fn with_the_wait_a_batch_is_confirmed_only_once_the_replica_has_it() {
    let (primary, replica) = pair(6620).await;
    let (g, p) = (TestGraph::new(&unique()), unique());
    let keys: Vec<String> = (0..20).map(|i| format!("it:{p}:durable:{i}")).collect();
    for k in &keys {
        primary.q::<()>(redis::cmd("SET").arg(k).arg("cached")).await;
    }
    until("the replica to have the keys", Duration::from_secs(10), || async {
        replica.q::<i64>(redis::cmd("EXISTS").arg(&keys[19])).await == 1
    })
    .await;
    let sink = waiting_sink(&primary.url(), 1, 5000).await;
    // The replica stops applying the stream for a second.
    let sleeping = {
        let mut conn = replica.conn().await;
        tokio::spawn(async move { redis::cmd("DEBUG").arg("SLEEP").arg("1").exec_async(&mut conn).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    delete(&sink, &g, &keys, 1).await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(500), "confirmed after {waited:?}, while the replica slept");
    // (The client gives up on the sleeping reply after its own timeout.)
    let _ = sleeping.await;
    for k in &keys {
        assert_eq!(replica.q::<i64>(redis::cmd("EXISTS").arg(k)).await, 0, "the replica still has {k}");
    }
}

#[tokio::test]
async fn without_the_replica_a_batch_is_not_confirmed_and_is_retried() {
    let (primary, replica) = pair(6622).await;
    let (g, p) = (TestGraph::new(&unique()), unique());
    let keys = vec![format!("it:{p}:durable")];
    let sink = waiting_sink(&primary.url(), 1, 300).await;
    delete(&sink, &g, &keys, 1).await.unwrap();

    // The replica leaves: the primary still answers, nothing replicates.
    replica.q::<()>(redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await;
    until("the primary to lose its replica", Duration::from_secs(10), || async {
        primary.replication("connected_slaves").await == "0"
    })
    .await;
    let err = delete(&sink, &g, &keys, 2).await.unwrap_err();
    assert!(
        matches!(&err, SinkError::Transient { cause, .. } if cause.to_string().contains("0 of 1 replica")),
        "{err:?}"
    );

    // Back: the retried batch is confirmed.
    replica.q::<()>(redis::cmd("REPLICAOF").arg("127.0.0.1").arg(primary.port)).await;
    until("the replica to sync again", Duration::from_secs(15), || async {
        replica.replication("master_link_status").await == "up"
    })
    .await;
    delete(&sink, &g, &keys, 2).await.unwrap();
}

fn graph(p: &str) -> String {
    format!(
        "[tables.\"app.items\"]\nkey = [\"id\"]\ncolumns = [\"id\"]\n\n[caches.{p}_item]\nkey = \"{p}:item:{{id}}\"\n[[caches.{p}_item.depends]]\ntable = \"app.items\"\n"
    )
}

const SCHEMA: &str = "CREATE SCHEMA app; CREATE TABLE app.items (id bigint PRIMARY KEY);";

#[tokio::test]
async fn an_eviction_policy_that_can_evict_evictds_keys_refuses_check_and_run() {
    let lru = Server::start(6624, &["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]);
    let extra = format!("[redis.primary]\nurl = \"{}\"\n", lru.url());
    let mut d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, graph, &extra).await;
    let config = d.config.to_str().unwrap().to_owned();

    let out = evictd(&["check", "--config", &config]);
    assert_eq!(out.status.code(), Some(2), "{}{}", stdout(&out), stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("redis.primary") && err.contains("maxmemory-policy allkeys-lru"), "{err}");

    let mut run = Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["run", "--config", &config])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            let _ = run.wait();
            panic!("evictd run started on a Redis with maxmemory-policy allkeys-lru");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("redis.primary") && log.contains("maxmemory-policy allkeys-lru"), "{log}");

    // Warn instead: check reports it and passes.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, text.replace(&extra, &format!("{extra}eviction_check = \"warn\"\n"))).unwrap();
    let out = evictd(&["check", "--config", &config]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("warning: redis.primary: maxmemory-policy allkeys-lru"), "{}", stdout(&out));
    d.kill();
    d.finish().await;
}

/// A Cluster of this test's own: primary A (slots 0-8191) with a replica,
/// primary B (8192-16383) without. The `WAIT` of a pipeline must go to the
/// node that ran it: A's keys are confirmed, B's are not.
#[tokio::test]
async fn on_a_cluster_the_wait_goes_to_the_node_that_ran_the_pipeline() {
    let cluster = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
    let (a, b, r) = (Server::start(6630, &cluster), Server::start(6631, &cluster), Server::start(6632, &cluster));
    a.q::<()>(redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(8191)).await;
    b.q::<()>(redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(8192).arg(16383)).await;
    for port in [6631, 6632] {
        a.q::<()>(redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(port)).await;
    }
    let a_id: String = a.q(redis::cmd("CLUSTER").arg("MYID")).await;
    until("the nodes to meet", Duration::from_secs(20), || async {
        let nodes: String = r.q(redis::cmd("CLUSTER").arg("NODES")).await;
        nodes.contains(&a_id)
    })
    .await;
    r.q::<()>(redis::cmd("CLUSTER").arg("REPLICATE").arg(&a_id)).await;
    until("the cluster to be up with A's replica in sync", Duration::from_secs(30), || async {
        let mut ok = true;
        for s in [&a, &b, &r] {
            let info: String = s.q(redis::cmd("CLUSTER").arg("INFO")).await;
            ok &= info.contains("cluster_state:ok");
        }
        ok && r.replication("master_link_status").await == "up"
    })
    .await;

    let (g, p) = (TestGraph::new(&unique()), unique());
    let (mut on_a, mut on_b) = (None, None);
    for i in 0.. {
        let k = format!("it:{p}:{i}");
        let slot: i64 = a.q(redis::cmd("CLUSTER").arg("KEYSLOT").arg(&k)).await;
        let side = if slot < 8192 { &mut on_a } else { &mut on_b };
        side.get_or_insert(k);
        if on_a.is_some() && on_b.is_some() {
            break;
        }
    }
    let (on_a, on_b) = (on_a.unwrap(), on_b.unwrap());
    let mut t = target("cluster", &[a.url()], true);
    t.durability = Some(Durability { replicas: 1, aof: false, timeout: Duration::from_millis(300) });
    let sink = RedisSink::connect(&t).await.unwrap();
    delete(&sink, &g, std::slice::from_ref(&on_a), 1).await.unwrap();
    let err = delete(&sink, &g, std::slice::from_ref(&on_b), 2).await.unwrap_err();
    assert!(
        matches!(&err, SinkError::Transient { cause, .. } if cause.to_string().contains("0 of 1 replica")),
        "{err:?}"
    );
}
