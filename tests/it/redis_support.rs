//! Helpers for the Redis sink tests: targets from the environment, a probe
//! connection to look at what the sink did, a graph with one cache per
//! action (unique names per test), and a TCP proxy that can be frozen to
//! play a hung target.

use std::sync::Arc;
use std::time::Duration;

use evictd::config::RedisTarget;
use evictd::diagnostic::SourceFile;
use evictd::graph::load::load_sources;
use evictd::graph::{CacheId, Graph};
use evictd::sink::redis::{RedisSink, RedisSinkOptions};
use redis::FromRedisValue;
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Standalone,
    Cluster,
}

pub const BOTH: [Kind; 2] = [Kind::Standalone, Kind::Cluster];

pub fn urls(kind: Kind) -> Vec<String> {
    let var = match kind {
        Kind::Standalone => "EVICTD_TEST_REDIS_URL",
        Kind::Cluster => "EVICTD_TEST_REDIS_CLUSTER_URLS",
    };
    let value =
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests through scripts/test.sh"));
    value.split(',').map(|u| u.trim().to_owned()).collect()
}

pub fn target(name: &str, urls: &[String], cluster: bool) -> RedisTarget {
    RedisTarget {
        name: name.to_owned(),
        urls: urls.iter().map(|u| SecretString::from(u.clone())).collect(),
        cluster,
        fill_guard_ttl: Some(std::time::Duration::from_secs(60)),
        broadcast: None,
        durability: None,
        eviction_check: evictd::config::EvictionCheck::Refuse,
        tls: None,
    }
}

pub fn kind_target(kind: Kind) -> RedisTarget {
    target(&format!("{kind:?}").to_lowercase(), &urls(kind), kind == Kind::Cluster)
}

pub async fn sink(kind: Kind) -> RedisSink {
    let options = RedisSinkOptions { timeout: Duration::from_secs(5), ..RedisSinkOptions::default() };
    RedisSink::connect_with(&kind_target(kind), options).await.expect("test Redis reachable")
}

/// A unique lowercase suffix, for key prefixes and cache names.
pub fn unique() -> String {
    format!("{}{:012x}", std::process::id(), fastrand::u64(..) >> 16)
}

/// A connection for looking at what the sink did.
#[derive(Clone)]
pub enum Probe {
    One(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Probe {
    pub async fn new(kind: Kind) -> Probe {
        let urls = urls(kind);
        match kind {
            Kind::Standalone => {
                let client = redis::Client::open(urls[0].as_str()).unwrap();
                Probe::One(client.get_multiplexed_async_connection().await.unwrap())
            }
            Kind::Cluster => {
                let client = redis::cluster::ClusterClient::new(urls).unwrap();
                Probe::Cluster(client.get_async_connection().await.unwrap())
            }
        }
    }

    pub async fn q<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        match self {
            Probe::One(c) => cmd.query_async(&mut c.clone()).await,
            Probe::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
        .unwrap_or_else(|e| panic!("probe command failed: {e}"))
    }

    pub async fn set(&self, key: &str, value: &str) {
        self.q::<()>(redis::cmd("SET").arg(key).arg(value)).await;
    }

    pub async fn exists(&self, key: &str) -> bool {
        self.q::<i64>(redis::cmd("EXISTS").arg(key)).await == 1
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        self.q(redis::cmd("GET").arg(key)).await
    }

    pub async fn pttl(&self, key: &str) -> i64 {
        self.q(redis::cmd("PTTL").arg(key)).await
    }

    pub async fn zadd(&self, key: &str, score: &str, member: &str) {
        self.q::<i64>(redis::cmd("ZADD").arg(key).arg(score).arg(member)).await;
    }

    pub async fn zscore(&self, key: &str, member: &str) -> Option<f64> {
        self.q(redis::cmd("ZSCORE").arg(key).arg(member)).await
    }
}

const GRAPH: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id"]

[caches.gone_SUFFIX]
key = "gone:{id}"
[[caches.gone_SUFFIX.depends]]
table = "app.items"

[caches.twice_SUFFIX]
key = "twice:{id}"
redelete_after_ms = 1000
[[caches.twice_SUFFIX.depends]]
table = "app.items"

[caches.versioned_SUFFIX]
key = "versioned:{id}"
action = "bump"
[[caches.versioned_SUFFIX.depends]]
table = "app.items"

[caches.fading_SUFFIX]
key = "fading:{id}"
action = "expire"
expire_after_ms = 60000
expire_jitter_ms = 5000
[[caches.fading_SUFFIX.depends]]
table = "app.items"

[caches.tagged_SUFFIX]
key = "tagged:{id}"
redelete_after_ms = 1000
[[caches.tagged_SUFFIX.depends]]
table = "app.items"
tags = ["item:{id}"]
"#;

/// A graph whose cache names end in `_<suffix>`: `gone` (delete), `twice`
/// (delete, second delete after 1 s), `versioned` (bump), `fading`
/// (expire 60 s + up to 5 s), `tagged` (tags, second delete after 1 s).
pub struct TestGraph {
    pub graph: Graph,
    pub suffix: String,
}

impl TestGraph {
    pub fn new(suffix: &str) -> TestGraph {
        let text = GRAPH.replace("SUFFIX", suffix);
        TestGraph { graph: load_sources(&[SourceFile::new("redis.toml", text)]).unwrap(), suffix: suffix.to_owned() }
    }

    pub fn cache(&self, name: &str) -> CacheId {
        self.graph.cache_id(&format!("{name}_{}", self.suffix)).unwrap()
    }
}

/// A TCP proxy in front of a Redis: while frozen, nothing it receives is
/// passed on, so the client sees a target that accepts and never answers;
/// while down, its connections are cut and new ones closed at once, as
/// when a Redis restarts.
pub struct Proxy {
    pub url: String,
    frozen: watch::Sender<bool>,
    down: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("redis://").trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let (frozen, frozen_rx) = watch::channel(false);
        let (down, down_rx) = watch::channel(false);
        let upstream = Arc::new(upstream);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *down_rx.borrow() {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream.as_str()).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, frozen_rx.clone(), down_rx.clone()));
                tokio::spawn(pump(sr, cw, frozen_rx.clone(), down_rx.clone()));
            }
        });
        Proxy { url, frozen, down }
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// Down: cut every connection and refuse new ones. Up: accept again.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

/// Copies one direction until either side closes or the proxy goes down.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    mut down: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = down.wait_for(|d| *d) => return,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A port on 127.0.0.1 that nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

/// A listener that accepts connections and never answers.
pub async fn silent_listener() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

/// A `redis-server` of a test's own on a fixed port (each test file has a
/// range of 6600-6699), without persistence: a restart loses every key, as
/// a Redis without AOF or RDB does. Killed when dropped.
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    pub fn start(port: u16) -> OwnRedis {
        let mut server = OwnRedis { port, child: None, dir: tempfile::tempdir().unwrap() };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        use std::process::{Command, Stdio};
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server on {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then a new server on the same port: every key is gone.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::kill(&mut child);
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
