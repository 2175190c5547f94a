//! `evictd run` end to end: a real Postgres (logical replication) and a
//! real Redis, the binary as an operator runs it, killed and restarted.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use sqlx::Connection as _;

use super::support::{TestDb, evictd, root, stderr, stdout};

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A unique name for this test's slot, publication and key prefix.
fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}_{}_{n}", std::process::id())
}

pub fn redis_url() -> String {
    std::env::var("EVICTD_TEST_REDIS_URL")
        .expect("EVICTD_TEST_REDIS_URL is not set: run the integration tests through scripts/test.sh")
}

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, owner_id bigint NOT NULL, name text NOT NULL, note text);
ALTER TABLE app.items REPLICA IDENTITY FULL;
";

/// The graph: an item's key, its owner's list (moves with owner_id), and a
/// column filter that ignores `note`.
fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "owner_id", "name", "note"]

[caches.{prefix}_item]
key = "{prefix}:item:{{id}}"
[[caches.{prefix}_item.depends]]
table = "app.items"
columns = ["name"]

[caches.{prefix}_owner_items]
key = "{prefix}:owner:{{owner_id}}:items"
[[caches.{prefix}_owner_items.depends]]
table = "app.items"
columns = ["name"]
"#
    )
}

/// One test's world: a database, a graph, a config, and a daemon.
pub struct Daemon {
    pub db: TestDb,
    pub prefix: String,
    pub slot: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub async fn new(redis: &str) -> Daemon {
        Daemon::new_on(&super::support::pg_url(), redis).await
    }

    /// A daemon on the Postgres at `admin_url` (a database of its own in it).
    pub async fn new_on(admin_url: &str, redis: &str) -> Daemon {
        Daemon::custom(admin_url, redis, SCHEMA, graph, "").await
    }

    /// A daemon with its own schema, graph (given the test's unique prefix)
    /// and extra config lines (`[redis.primary]` may be replaced by them).
    pub async fn custom(admin_url: &str, redis: &str, schema: &str, graph: fn(&str) -> String, extra: &str) -> Daemon {
        let prefix = unique("t");
        let db = TestDb::new_on(admin_url, &prefix).await;
        db.run_sql(schema).await;
        let slot = format!("evictd_{prefix}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("graph.toml"), graph(&prefix)).unwrap();
        // Extra `[run]` settings join the base `[run]` section.
        let (run_extra, extra) = match extra.strip_prefix("[run]\n") {
            Some(rest) => (rest, ""),
            None => ("", extra),
        };
        let redis_section = if extra.contains("[redis.primary]") {
            String::new()
        } else {
            format!("[redis.primary]\nurl = \"{redis}\"\n")
        };
        let config = dir.path().join("evictd.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[graph]
paths = ["graph.toml"]
[source]
kind = "postgres"
[source.postgres]
url = "{url}"
slot = "{slot}"
publication = "{slot}"
create_slot = true
create_publication = true
status_interval_ms = 100
[batch]
max_delay_ms = 5
[run]
retry_max_ms = 200
shutdown_grace_ms = 5000
{run_extra}
{redis_section}{extra}
[server]
listen = "127.0.0.1:0"
[log]
level = "info,evictd=debug"
"#,
                url = db.url
            ),
        )
        .unwrap();
        Daemon { db, prefix, slot, dir, config, child: None }
    }

    /// The running daemon's peak resident memory (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.prefix)
    }

    /// Starts `evictd run` without waiting for anything.
    pub fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("evictd.log")).unwrap();
        self.child = Some(run_evictd(&self.config, log));
    }

    /// Starts `evictd run` and waits until it streams from the slot.
    pub async fn start(&mut self) {
        self.spawn();
        let slot = self.slot.clone();
        self.wait_for("the daemon to hold its slot", Duration::from_secs(30), || {
            let slot = slot.clone();
            let url = self.db.url.clone();
            async move {
                let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
                                // Held by a streaming walsender: `active` alone is already true
                // while the slot is still being created, before its start
                // point, and a change committed then is before evictd began.
                let streaming: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                     WHERE s.slot_name = $1 AND r.state = 'streaming')",
                )
                .bind(&slot)
                .fetch_one(&mut conn)
                .await
                .ok()?;
                streaming.then_some(())
            }
        })
        .await;
    }

    /// Another `evictd run` with the same config (so the same slot): a second
    /// replica, logging to `evictd-NAME.log`. Does not wait for anything.
    pub fn spawn_replica(&self, name: &str) -> Replica {
        let log_path = self.dir.path().join(format!("evictd-{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        Replica { child: Some(run_evictd(&self.config, log)), log_path }
    }

    /// Sends `signal` to the running daemon (SIGSTOP freezes it with its
    /// connections open; SIGCONT wakes it).
    pub fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("the daemon runs");
        super::process::signal(child, signal).unwrap();
    }

    /// SIGKILL: no flush, no acknowledgement.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::kill(&mut child);
        }
    }

    /// Waits for the daemon to exit on its own; its exit code, or `None`
    /// if it was not running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            assert!(Instant::now() < deadline, "the daemon did not exit; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status. A daemon still running 30 s later
    /// (its grace period is 5 s) is killed and fails the test.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let exited = super::process::terminate(&mut child, Duration::from_secs(30));
        exited.unwrap_or_else(|e| panic!("{e}; its log:\n{}", self.log()))
    }

    /// Where the running daemon serves /metrics (from its log).
    pub async fn http_address(&self) -> std::net::SocketAddr {
        self.wait_for("the daemon's HTTP address in its log", Duration::from_secs(10), || async {
            let log = self.log();
            let line = log.lines().rev().find(|l| l.contains("serving /metrics"))?;
            line.split("address=").nth(1)?.split_whitespace().next()?.parse().ok()
        })
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("evictd.log")).unwrap_or_default()
    }

    pub async fn sql(&self, sql: &str) {
        let mut conn = sqlx::PgConnection::connect(&self.db.url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut conn).await.unwrap();
    }

    /// The slot's confirmed_flush_lsn as a number.
    pub async fn confirmed_flush(&self) -> u64 {
        let mut conn = sqlx::PgConnection::connect(&self.db.url).await.unwrap();
        let text: String =
            sqlx::query_scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&self.slot)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        let (hi, lo) = text.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    }

    pub async fn current_lsn(&self) -> u64 {
        let mut conn = sqlx::PgConnection::connect(&self.db.url).await.unwrap();
        let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut conn).await.unwrap();
        let (hi, lo) = text.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    }

    /// Polls `check` until it yields, or fails the test with the daemon's log.
    pub async fn wait_for<F, Fut, T>(&self, what: &str, limit: Duration, check: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        super::support::wait_until(what, limit, || self.log(), check).await
    }

    /// Stops the daemon and removes the slot and database.
    pub async fn finish(mut self) {
        self.kill();
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.db.url).await {
            // The slot can stay "active" for a moment after the kill.
            for _ in 0..100 {
                let dropped =
                    sqlx::query("SELECT pg_drop_replication_slot($1)").bind(&self.slot).execute(&mut conn).await;
                if dropped.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let db = std::mem::replace(&mut self.db, TestDb::placeholder());
        db.drop().await;
    }
}

/// `evictd run --config CONFIG`, its stderr (the log) to `log`.
fn run_evictd(config: &std::path::Path, log: std::fs::File) -> Child {
    Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("evictd starts")
}

/// A second `evictd run` of a [`Daemon`]'s config.
pub struct Replica {
    child: Option<Child>,
    log_path: PathBuf,
}

impl Replica {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Where it serves /metrics and the probes (from its log).
    pub async fn http_address(&self, limit: Duration) -> std::net::SocketAddr {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            let found = log
                .lines()
                .rev()
                .find(|l| l.contains("serving /metrics"))
                .and_then(|line| line.split("address=").nth(1)?.split_whitespace().next()?.parse().ok());
            if let Some(address) = found {
                return address;
            }
            assert!(Instant::now() < deadline, "no HTTP address in the replica's log:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::kill(&mut child);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Sets `keys` to "cached".
pub async fn fill(conn: &mut redis::aio::MultiplexedConnection, keys: &[String]) {
    for key in keys {
        let () = conn.set(key, "cached").await.unwrap();
    }
}

pub async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    conn.exists(key).await.unwrap()
}

/// Waits until none of `keys` exists.
pub async fn wait_gone(d: &Daemon, conn: &redis::aio::MultiplexedConnection, keys: &[String], limit: Duration) {
    let keys = keys.to_vec();
    d.wait_for(&format!("{} keys to be invalidated", keys.len()), limit, || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let n: u64 = conn.exists(&keys).await.ok()?;
            (n == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn every_operation_invalidates_its_keys() {
    let url = redis_url();
    let mut d = Daemon::new(&url).await;
    d.start().await;
    let mut r = redis(&url).await;
    let (item1, item2, owner1, owner2) =
        (d.key("item:1"), d.key("item:2"), d.key("owner:1:items"), d.key("owner:2:items"));

    // Insert: drops a cached "not found".
    fill(&mut r, &[item1.clone(), owner1.clone()]).await;
    d.sql("INSERT INTO app.items VALUES (1, 1, 'boots', NULL), (2, 1, 'socks', NULL)").await;
    wait_gone(&d, &r, &[item1.clone(), owner1.clone()], Duration::from_secs(30)).await;

    // Update of a filtered column, then key-column move: old and new owner.
    fill(&mut r, &[item1.clone(), owner1.clone(), owner2.clone()]).await;
    d.sql("UPDATE app.items SET name = 'boots 2', owner_id = 2 WHERE id = 1").await;
    wait_gone(&d, &r, &[item1.clone(), owner1.clone(), owner2.clone()], Duration::from_secs(30)).await;

    // An update of a column no dependency watches invalidates nothing: the
    // next change's key going proves the first was processed.
    fill(&mut r, &[item1.clone(), item2.clone()]).await;
    d.sql("UPDATE app.items SET note = 'ignored' WHERE id = 1").await;
    d.sql("UPDATE app.items SET name = 'socks 2' WHERE id = 2").await;
    wait_gone(&d, &r, std::slice::from_ref(&item2), Duration::from_secs(30)).await;
    assert!(exists(&mut r, &item1).await, "a filtered-out update deleted a key");

    // Delete.
    fill(&mut r, &[item2.clone(), owner1.clone()]).await;
    d.sql("DELETE FROM app.items WHERE id = 2").await;
    wait_gone(&d, &r, &[item2.clone(), owner1.clone()], Duration::from_secs(30)).await;

    // Truncate: the namespace versions of both caches move (cache names
    // carry the test's prefix: namespace keys are per cache name).
    d.sql("TRUNCATE app.items").await;
    let ns = [format!("evictd:ns:{}_item", d.prefix), format!("evictd:ns:{}_owner_items", d.prefix)];
    let conn = r.clone();
    d.wait_for("namespace bumps", Duration::from_secs(10), || {
        let mut conn = conn.clone();
        let ns = ns.clone();
        async move {
            let n: u64 = conn.exists(&ns).await.ok()?;
            (n == 2).then_some(())
        }
    })
    .await;

    // The position ladder and the counters moved; the probes say ready.
    let address = d.http_address().await;
    let metrics = super::server::get(address, "/metrics").await.body;
    assert!(metrics.contains("evictd_changes_received_total{table=\"app.items\",op=\"truncate\"} 1"), "{metrics}");
    let acknowledged =
        metrics.lines().find(|l| l.starts_with("evictd_position_acknowledged_bytes ")).unwrap_or_default();
    assert!(!acknowledged.ends_with(" 0") && !acknowledged.is_empty(), "{metrics}");
    assert_eq!(super::server::get(address, "/readyz").await.status, 200);

    // SIGTERM: a clean exit with everything acknowledged.
    let end = d.current_lsn().await;
    // Filled first: waiting for a key that was never there proves nothing,
    // and SIGTERM could then come before the insert is read.
    let item3 = d.key("item:3");
    fill(&mut r, std::slice::from_ref(&item3)).await;
    d.sql("INSERT INTO app.items VALUES (3, 3, 'hat', NULL)").await;
    wait_gone(&d, &r, &[item3], Duration::from_secs(30)).await;
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    // The server applies the last status update when it reads it: give it a moment.
    d.wait_for("the final acknowledgement to reach the slot", Duration::from_secs(5), || async {
        (d.confirmed_flush().await > end).then_some(())
    })
    .await;
    d.finish().await;
}

#[tokio::test]
async fn nothing_is_lost_when_the_daemon_is_killed_again_and_again() {
    let url = redis_url();
    let mut d = Daemon::new(&url).await;
    let mut r = redis(&url).await;
    let n = 300i64;
    d.sql(&format!("INSERT INTO app.items SELECT g, g % 7, 'n' || g, NULL FROM generate_series(1, {n}) g")).await;
    d.start().await;
    let keys: Vec<String> = (1..=n).map(|i| d.key(&format!("item:{i}"))).collect();
    fill(&mut r, &keys).await;
    // One transaction per row, while the daemon is killed at random moments.
    let writer_url = d.db.url.clone();
    let writer = tokio::spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&writer_url).await.unwrap();
        for i in 1..=n {
            sqlx::query("UPDATE app.items SET name = name || '!' WHERE id = $1")
                .bind(i)
                .execute(&mut conn)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..4))).await;
        }
    });
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..300))).await;
        d.kill();
        d.start().await;
    }
    writer.await.unwrap();
    wait_gone(&d, &r, &keys, Duration::from_secs(30)).await;
    d.finish().await;
}

#[tokio::test]
async fn a_bad_config_exits_2_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(&path, "[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://u@127.0.0.1:1/db\"\nslot = \"Bad-Slot\"\n[redis.primary]\nurl = \"redis://127.0.0.1:1\"\n[graph]\npaths = [\"graph.toml\"]\n").unwrap();
    std::fs::write(dir.path().join("graph.toml"), graph("bad")).unwrap();
    let out = evictd(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{}:5:8: source.postgres.slot: `Bad-Slot` is not a slot name", path.display())),
        "{}",
        stderr(&out)
    );
    let _ = root();
}

#[tokio::test]
async fn a_table_without_full_replica_identity_is_named_before_anything_starts() {
    const DEFAULT_IDENTITY: &str = "CREATE SCHEMA app; CREATE TABLE app.items (id bigint PRIMARY KEY, owner_id bigint NOT NULL, name text NOT NULL, note text);";
    let d = Daemon::custom(&super::support::pg_url(), &redis_url(), DEFAULT_IDENTITY, graph, "").await;
    const FIX: &str = "ALTER TABLE \"app\".\"items\" REPLICA IDENTITY FULL;";
    // The tables contradict the graph, as a hiding publication does: exit 2.
    let out = evictd(&["run", "--config", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(FIX), "the message says what to run: {}", stderr(&out));
    // `check --config` finds it before a rollout.
    let out = evictd(&["check", "--config", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(FIX), "{}", stderr(&out));
    // Accepted (namespace bumps instead), it is a warning.
    let text = std::fs::read_to_string(&d.config).unwrap();
    let lenient = text.replace("[source.postgres]\n", "[source.postgres]\nrequire_full_replica_identity = false\n");
    assert_ne!(lenient, text);
    std::fs::write(&d.config, lenient).unwrap();
    let out = evictd(&["check", "--config", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("  warning: app.items lack REPLICA IDENTITY FULL"), "{}", stdout(&out));
    d.finish().await;
}
