//! Two replicas on one slot: one active, one standby. The active one is
//! killed under load, or frozen (SIGSTOP: its connections stay open), and
//! the standby takes over with nothing lost; a frozen one that wakes up
//! after the takeover acknowledges nothing and stands down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use sqlx::Connection as _;

use rustix::process::Signal;

use super::daemon::{Daemon, redis, redis_url, wait_gone};
use super::server::get;

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.events (id bigint PRIMARY KEY, body text NOT NULL);
";

fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.events"]
key = ["id"]
columns = ["id", "body"]

[caches.{prefix}_event]
key = "{prefix}:event:{{id}}"
[[caches.{prefix}_event.depends]]
table = "app.events"
"#
    )
}

/// Polls `/readyz` at `address` until its body is `body`.
async fn wait_ready(address: std::net::SocketAddr, body: &str, limit: Duration, log: impl Fn() -> String) -> Duration {
    let started = Instant::now();
    loop {
        let reply = get(address, "/readyz").await;
        if reply.status == 200 && reply.body == body {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "/readyz never said {body:?} (last: {} {:?}); log:\n{}",
            reply.status,
            reply.body,
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_standby_takes_over_from_a_killed_active_replica_with_nothing_lost() {
    let url = redis_url();
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, "").await;
    // Standbys retry the lock every 200 ms in this test.
    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        config.replace("status_interval_ms = 100", "status_interval_ms = 100\nstandby_retry_ms = 200"),
    )
    .unwrap();
    d.start().await;
    let active = d.http_address().await;
    wait_ready(active, "ready: active\n", Duration::from_secs(20), || d.log()).await;

    let mut standby = d.spawn_replica("b");
    let standby_address = standby.http_address(Duration::from_secs(20)).await;
    wait_ready(standby_address, "ready: standby\n", Duration::from_secs(20), || standby.log()).await;
    let metrics = get(standby_address, "/metrics").await.body;
    assert!(metrics.lines().any(|l| l == "evictd_active 0"), "the standby's role metric:\n{metrics}");

    // Load: each row's key is cached, then the row is inserted; every
    // committed row's key must end up gone, whoever was active.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pg, stop, prefix) = (d.db.url.clone(), stop.clone(), d.prefix.clone());
        let mut r = redis(&url).await;
        tokio::spawn(async move {
            let mut db = sqlx::PgConnection::connect(&pg).await.unwrap();
            let mut keys = Vec::new();
            let mut id: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let key = format!("{prefix}:event:{id}");
                let () = r.set(&key, "cached").await.unwrap();
                sqlx::query("INSERT INTO app.events VALUES ($1, 'x')").bind(id).execute(&mut db).await.unwrap();
                keys.push(key);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            keys
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    d.kill();
    let takeover = wait_ready(standby_address, "ready: active\n", Duration::from_secs(20), || standby.log()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let keys = writer.await.unwrap();
    assert!(keys.len() > 100, "too little load: {} rows", keys.len());
    let conn = redis(&url).await;
    wait_gone(&d, &conn, &keys, Duration::from_secs(30)).await;
    eprintln!("{} rows; the standby was active {:.2} s after the kill", keys.len(), takeover.as_secs_f64());
    let log = standby.log();
    assert!(log.contains("standby") && log.contains("active"), "the standby says what it did:\n{log}");
    standby.kill();
    d.finish().await;
}

/// The slot's walsender, if a session streams from it.
async fn slot_walsender(d: &Daemon) -> Option<i32> {
    let mut conn = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
        .bind(&d.slot)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Whether a server process `pid` still exists.
async fn backend_exists(d: &Daemon, pid: i32) -> bool {
    let mut conn = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
        .bind(pid)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Caches `ids`' keys, then commits their rows; the keys.
async fn commit_cached_rows(
    d: &Daemon,
    r: &mut ::redis::aio::MultiplexedConnection,
    ids: std::ops::Range<i64>,
) -> Vec<String> {
    let mut db = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    let mut keys = Vec::new();
    for id in ids {
        let key = format!("{}:event:{id}", d.prefix);
        let () = r.set(&key, "cached").await.unwrap();
        sqlx::query("INSERT INTO app.events VALUES ($1, 'x')").bind(id).execute(&mut db).await.unwrap();
        keys.push(key);
    }
    keys
}

/// Issue 14's drill: a frozen active replica (SIGSTOP) keeps its lock's
/// session open; the lock's lease (`lock_lease_ms`, enforced by the server
/// as `idle_session_timeout`) ends it, the standby takes the lock, ends the
/// frozen replica's walsender and invalidates what was committed meanwhile.
#[tokio::test]
async fn a_standby_takes_over_from_a_frozen_active_replica_within_the_lease() {
    const RETRY_MS: u64 = 200;
    const LEASE_MS: u64 = 5_500;
    let url = redis_url();
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, "").await;
    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        config.replace(
            "status_interval_ms = 100",
            &format!("status_interval_ms = 100\nstandby_retry_ms = {RETRY_MS}\nlock_lease_ms = {LEASE_MS}"),
        ),
    )
    .unwrap();
    d.start().await;
    let old_address = d.http_address().await;
    wait_ready(old_address, "ready: active\n", Duration::from_secs(20), || d.log()).await;
    let mut standby = d.spawn_replica("b");
    let standby_address = standby.http_address(Duration::from_secs(20)).await;
    wait_ready(standby_address, "ready: standby\n", Duration::from_secs(20), || standby.log()).await;
    let old_walsender = slot_walsender(&d).await.expect("the active replica streams");

    // Frozen: every socket stays open, nothing answers.
    d.signal(Signal::STOP);
    let frozen = Instant::now();
    let mut r = redis(&url).await;
    let keys = commit_cached_rows(&d, &mut r, 1..21).await;

    // The lease ends the lock's session at most LEASE_MS after the last
    // check; the standby tries every RETRY_MS; the rest is connecting,
    // ending the old walsender and starting to stream.
    let bound = Duration::from_millis(LEASE_MS + RETRY_MS + 4_000);
    wait_ready(standby_address, "ready: active\n", bound, || {
        format!("{}\n--- the frozen replica:\n{}", standby.log(), d.log())
    })
    .await;
    let active_after = frozen.elapsed();
    loop {
        let n: u64 = r.exists(&keys).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(
            frozen.elapsed() < bound,
            "{n} keys committed while the active replica was frozen still cached {:.1} s later; the standby's log:\n{}",
            frozen.elapsed().as_secs_f64(),
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let invalidated_after = frozen.elapsed();
    let new_walsender = slot_walsender(&d).await.expect("the new active replica streams");
    assert_ne!(new_walsender, old_walsender, "the slot's walsender is the new active replica's");
    assert!(!backend_exists(&d, old_walsender).await, "the frozen replica's walsender was ended");
    let log = standby.log();
    assert!(
        log.contains(&format!("pid={old_walsender}")) && log.contains("walsender"),
        "the new active replica logs the walsender it ended:\n{log}"
    );

    // Woken up: its lock is gone and its walsender too; it stands down
    // without ever streaming or acknowledging again.
    let before_wake = d.confirmed_flush().await;
    let asleep = d.log().len();
    d.signal(Signal::CONT);
    wait_ready(old_address, "ready: standby\n", Duration::from_secs(10), || d.log()).await;
    let later = commit_cached_rows(&d, &mut r, 21..31).await;
    wait_gone(&d, &r, &later, Duration::from_secs(10)).await;
    let committed = d.current_lsn().await;
    d.wait_for("the new active replica to acknowledge the later rows", Duration::from_secs(10), || async {
        (d.confirmed_flush().await >= committed).then_some(())
    })
    .await;
    assert!(d.confirmed_flush().await >= before_wake);
    assert_eq!(slot_walsender(&d).await, Some(new_walsender), "only the new active replica streamed since");
    let body = get(old_address, "/readyz").await.body;
    assert_eq!(body, "ready: standby\n", "the woken replica stays a standby");
    let woken = d.log()[asleep..].to_owned();
    assert!(woken.contains("lost the slot's lock"), "the woken replica says why it stood down:\n{woken}");
    assert!(!woken.contains("streaming from the slot"), "the woken replica never streamed again:\n{woken}");
    eprintln!(
        "frozen active replica: the standby was active after {:.2} s and had invalidated the {} rows after {:.2} s (lease {LEASE_MS} ms, retry {RETRY_MS} ms)",
        active_after.as_secs_f64(),
        keys.len(),
        invalidated_after.as_secs_f64()
    );
    standby.kill();
    d.finish().await;
}

/// `scripts/drill/proxy.py --postgres` between one replica and the server:
/// it tells replication connections from session ones and can cut either.
struct PgProxy {
    port: u16,
    control: u16,
    child: std::process::Child,
}

impl PgProxy {
    fn start(upstream: u16) -> PgProxy {
        use std::io::BufRead as _;
        let (port, control) = (super::outage::free_port(), super::outage::free_port());
        let mut child = std::process::Command::new("python3")
            .arg(super::support::root().join("scripts/drill/proxy.py"))
            .arg("--postgres")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}")])
            .args(["--control", &format!("127.0.0.1:{control}")])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the drill's proxy");
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "the proxy did not start");
        PgProxy { port, control, child }
    }

    /// Sends one control command; its answer must be `ok`.
    fn command(&self, command: &str) {
        use std::io::{BufRead as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.control)).unwrap();
        writeln!(stream, "{command}").unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(stream).read_line(&mut answer).unwrap();
        assert!(answer.starts_with("ok"), "proxy: {command}: {answer}");
    }

    /// `url` with its port replaced by the proxy's.
    fn url(&self, url: &str, server_port: u16) -> String {
        let through = url.replace(&format!(":{server_port}/"), &format!(":{}/", self.port));
        assert_ne!(through, url, "the URL names the server's port");
        through
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        super::process::kill(&mut self.child);
    }
}

/// Issue 14's drill: the active replica's replication connection goes
/// silent (a network that drops its packets) while its lock's session
/// still works. The server ends its walsender after `wal_sender_timeout`;
/// the active replica must notice (the slot is no longer active), and once
/// its sessions have failed for the lock's lease, hand the lock over: the
/// standby, whose path works, takes over and invalidates what was
/// committed, all while the partition lasts.
#[tokio::test]
async fn a_standby_takes_over_when_the_active_replicas_replication_connection_goes_silent() {
    const WAL_SENDER_TIMEOUT_MS: u64 = 5_000;
    const RETRY_MS: u64 = 200;
    const LEASE_MS: u64 = 5_500;
    let pg = tokio::task::spawn_blocking(|| super::outage::OwnPostgres::with_wal_sender_timeout("5s")).await.unwrap();
    let (via_a, via_b) = (PgProxy::start(pg.port), PgProxy::start(pg.port));
    let url = redis_url();
    let mut d = Daemon::custom(&pg.url, &url, SCHEMA, graph, "").await;
    let config = std::fs::read_to_string(&d.config).unwrap().replace(
        "status_interval_ms = 100",
        &format!("status_interval_ms = 100\nstandby_retry_ms = {RETRY_MS}\nlock_lease_ms = {LEASE_MS}"),
    );
    // Each replica reaches the server through its own proxy (a config is
    // read once, at start).
    std::fs::write(&d.config, config.replace(&d.db.url, &via_a.url(&d.db.url, pg.port))).unwrap();
    d.start().await;
    let old_address = d.http_address().await;
    wait_ready(old_address, "ready: active\n", Duration::from_secs(20), || d.log()).await;
    std::fs::write(&d.config, config.replace(&d.db.url, &via_b.url(&d.db.url, pg.port))).unwrap();
    let mut standby = d.spawn_replica("b");
    let standby_address = standby.http_address(Duration::from_secs(20)).await;
    wait_ready(standby_address, "ready: standby\n", Duration::from_secs(20), || standby.log()).await;

    via_a.command("partition replication");
    let silent = Instant::now();
    let mut r = redis(&url).await;
    let keys = commit_cached_rows(&d, &mut r, 1..21).await;

    // The server ends the silent walsender after wal_sender_timeout; the
    // active replica sees the slot inactive within its check period (2 s)
    // and steps down once its sessions failed for the lease; the rest is
    // the standby's retry, connecting and streaming.
    let bound = Duration::from_millis(WAL_SENDER_TIMEOUT_MS + 2_000 + LEASE_MS + 5_000);
    loop {
        let n: u64 = r.exists(&keys).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(
            silent.elapsed() < bound,
            "{n} keys committed while the active replica's replication connection was silent still cached {:.1} s later; \
             the standby's log:\n{}\n--- the silent replica's log:\n{}",
            silent.elapsed().as_secs_f64(),
            standby.log(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let invalidated_after = silent.elapsed();
    let body = get(standby_address, "/readyz").await.body;
    assert_eq!(body, "ready: active\n", "the standby took over");
    // The silent replica stands by: the lock is the other's now.
    wait_ready(old_address, "ready: standby\n", Duration::from_secs(10), || d.log()).await;
    let log = d.log();
    assert!(log.contains("no longer streams"), "the silent replica says what it saw:\n{log}");
    assert!(log.contains("giving the slot's lock up"), "the silent replica says why it stepped down:\n{log}");
    eprintln!(
        "silent replication connection: the standby had invalidated the {} rows after {:.2} s \
         (wal_sender_timeout {WAL_SENDER_TIMEOUT_MS} ms, lease {LEASE_MS} ms, retry {RETRY_MS} ms)",
        keys.len(),
        invalidated_after.as_secs_f64()
    );
    via_a.command("heal");
    standby.kill();
    d.finish().await;
    drop(pg);
}
