//! Outages of the real services `evictd run` depends on: a Redis target
//! that goes away (nothing acknowledged meanwhile, nothing lost), and a
//! Postgres restart (the daemon reconnects and resumes from the slot).
//! Each test gets servers of its own, so that it disturbs no other test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::{Daemon, exists, fill, redis, wait_gone};
use super::support::root;

/// A free port on 127.0.0.1.
pub(super) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A Redis of this test's own, persisting every write (AOF, fsync always),
/// so that its keys survive a kill and restart.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let mut redis = OwnRedis { port: free_port(), dir: tempfile::tempdir().unwrap(), child: None };
        redis.up();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::kill(&mut child);
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}

#[tokio::test]
async fn a_redis_outage_pauses_acknowledgement_and_loses_nothing() {
    let mut own = OwnRedis::start();
    let mut d = Daemon::new(&own.url()).await;
    d.sql("INSERT INTO app.items SELECT g, 1, 'n' || g, NULL FROM generate_series(1, 20) g").await;
    d.start().await;
    let mut r = redis(&own.url()).await;
    let first = d.key("item:1");
    fill(&mut r, std::slice::from_ref(&first)).await;
    d.sql("UPDATE app.items SET name = 'x' WHERE id = 1").await;
    wait_gone(&d, &r, std::slice::from_ref(&first), Duration::from_secs(10)).await;
    // Wait until that acknowledgement reached the slot.
    let settled = d.current_lsn().await;
    d.wait_for("the slot to catch up", Duration::from_secs(10), || async {
        (d.confirmed_flush().await >= settled).then_some(())
    })
    .await;

    let keys: Vec<String> = (2..=20).map(|i| d.key(&format!("item:{i}"))).collect();
    fill(&mut r, &keys).await;
    // A key no change touches, written last: if it survives the restart,
    // every key filled before it did (AOF, fsync always, replayed in order).
    // The item keys themselves cannot show that: the daemon's retry may
    // reconnect and unlink them before this test's own connection looks.
    let survivor = d.key("survivor");
    fill(&mut r, std::slice::from_ref(&survivor)).await;
    drop(r);
    own.down();
    // The slot may still move up to the first change of the outage (other
    // databases on this server write WAL too, and an idle evictd confirms
    // keepalives), but never past it: `bound` is at or after that change's
    // commit and before every later one.
    d.sql("UPDATE app.items SET name = 'y' WHERE id = 2").await;
    let bound = d.current_lsn().await;
    for i in 3..=20 {
        d.sql(&format!("UPDATE app.items SET name = 'y' WHERE id = {i}")).await;
    }
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let confirmed = d.confirmed_flush().await;
        assert!(
            confirmed < bound,
            "the slot advanced to {confirmed:X} while Redis was down (outage changes from {bound:X})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    own.up();
    let mut r = redis(&own.url()).await;
    assert!(exists(&mut r, &survivor).await, "the keys survived the restart (AOF)");
    wait_gone(&d, &r, &keys, Duration::from_secs(30)).await;
    let after = d.current_lsn().await;
    d.wait_for("the slot to advance after the outage", Duration::from_secs(10), || async {
        (d.confirmed_flush().await >= after).then_some(())
    })
    .await;
    d.finish().await;
}

/// A Postgres cluster of this test's own, on its own port and data dir.
pub(super) struct OwnPostgres {
    env: Vec<(String, String)>,
    pub(super) url: String,
    pub(super) port: u16,
}

impl OwnPostgres {
    fn script(env: &[(String, String)], name: &str) -> String {
        let mut out = Command::new("bash");
        out.arg(root().join("scripts/services").join(name))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stderr(Stdio::inherit());
        let out = super::process::output_within(&mut out, Duration::from_secs(120));
        assert!(out.status.success(), "{name} failed");
        String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned()
    }

    fn start() -> OwnPostgres {
        OwnPostgres::with_wal_sender_timeout("10s")
    }

    /// A cluster whose `wal_sender_timeout` is `timeout` (`5s`, `500ms`).
    pub(super) fn with_wal_sender_timeout(timeout: &str) -> OwnPostgres {
        let port = free_port();
        let data: PathBuf = std::env::temp_dir().join(format!("evictd-pg-restart-{port}")).join("data");
        let env = vec![
            ("PGPORT".to_owned(), port.to_string()),
            ("PGDATA".to_owned(), data.display().to_string()),
            ("PG_WAL_SENDER_TIMEOUT".to_owned(), timeout.to_owned()),
        ];
        let url = OwnPostgres::script(&env, "pg-start.sh");
        OwnPostgres { env, url, port }
    }

    fn restart(&self) {
        OwnPostgres::script(&self.env, "pg-stop.sh");
        OwnPostgres::script(&self.env, "pg-start.sh");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let mut env = self.env.clone();
        env.push(("PG_WIPE".to_owned(), "1".to_owned()));
        let mut stop = Command::new("bash");
        stop.arg(root().join("scripts/services/pg-stop.sh")).envs(env);
        let _ = super::process::status_within(&mut stop, Duration::from_secs(120));
    }
}

#[tokio::test]
async fn the_daemon_reconnects_after_a_postgres_restart() {
    let pg = tokio::task::spawn_blocking(OwnPostgres::start).await.unwrap();
    let redis_url = super::daemon::redis_url();
    let mut d = Daemon::new_on(&pg.url, &redis_url).await;
    d.sql("INSERT INTO app.items VALUES (1, 1, 'a', NULL), (2, 1, 'b', NULL)").await;
    d.start().await;
    let mut r = redis(&redis_url).await;
    let (one, two) = (d.key("item:1"), d.key("item:2"));
    fill(&mut r, std::slice::from_ref(&one)).await;
    d.sql("UPDATE app.items SET name = 'a2' WHERE id = 1").await;
    wait_gone(&d, &r, std::slice::from_ref(&one), Duration::from_secs(10)).await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    fill(&mut r, std::slice::from_ref(&two)).await;
    d.sql("UPDATE app.items SET name = 'b2' WHERE id = 2").await;
    wait_gone(&d, &r, std::slice::from_ref(&two), Duration::from_secs(30)).await;
    assert!(
        d.log().contains("reconnecting") || d.log().contains("retrying"),
        "no reconnection in the log:\n{}",
        d.log()
    );
    d.finish().await;
    drop(pg);
}
