//! The fill guard against the update race, end to end: real Postgres, real
//! Redis, `evictd run`, and readers that fill through `evictd::reader`.
//!
//! The race (a reader reads the old row, the writer commits, evictd
//! invalidates, the reader refills the old value, which then stays) is
//! first played step by step, unguarded and guarded, then under many
//! concurrent readers and writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use evictd::reader::{Read, begin_fill, fill, guard_key, read};
use redis::AsyncCommands as _;
use sqlx::Connection as _;

use super::daemon::{Daemon, redis, redis_url};

pub(super) const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.stock (id bigint PRIMARY KEY, quantity bigint NOT NULL);
INSERT INTO app.stock SELECT g, 0 FROM generate_series(1, 8) g;
";

fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.stock"]
key = ["id"]
columns = ["id", "quantity"]

[caches.{prefix}_stock]
key = "{prefix}:stock:{{id}}"
[[caches.{prefix}_stock.depends]]
table = "app.stock"
"#
    )
}

const STAMP_TTL_MS: u64 = 60_000;

pub(super) async fn quantity(conn: &mut sqlx::PgConnection, id: i64) -> i64 {
    sqlx::query_scalar("SELECT quantity FROM app.stock WHERE id = $1").bind(id).fetch_one(conn).await.unwrap()
}

/// Waits until evictd has acknowledged everything committed so far.
pub(super) async fn caught_up(d: &Daemon) {
    let target = d.current_lsn().await;
    d.wait_for("evictd to acknowledge every commit", Duration::from_secs(30), || async {
        (d.confirmed_flush().await >= target).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_guard_refuses_the_stale_refill_that_an_unguarded_set_keeps() {
    let url = redis_url();
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    let mut r = redis(&url).await;
    let mut db = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    let key = d.key("stock:1");

    // Unguarded: the reader reads the old row, the writer commits, evictd
    // invalidates, the reader's SET lands afterwards and the stale value stays.
    let old = quantity(&mut db, 1).await;
    d.sql("UPDATE app.stock SET quantity = quantity + 1 WHERE id = 1").await;
    caught_up(&d).await;
    let () = r.set(&key, old).await.unwrap();
    let cached: i64 = r.get(&key).await.unwrap();
    assert_eq!((cached, quantity(&mut db, 1).await), (old, old + 1), "the unguarded race leaves the old value");
    let () = r.del(&key).await.unwrap();

    // Guarded: the same interleaving, but the reader took the stamp first.
    let stamp = begin_fill(&mut r, key.as_bytes(), STAMP_TTL_MS).await.unwrap();
    let old = quantity(&mut db, 1).await;
    d.sql("UPDATE app.stock SET quantity = quantity + 1 WHERE id = 1").await;
    caught_up(&d).await;
    let now: Vec<u8> = r.get(guard_key(key.as_bytes())).await.unwrap();
    assert_ne!(now, stamp, "evictd wrote a new stamp when it invalidated the key");
    let stored = fill(&mut r, key.as_bytes(), &stamp, old.to_string().as_bytes(), 0).await.unwrap();
    assert!(!stored, "the stale refill is refused");
    assert!(!super::daemon::exists(&mut r, &key).await, "nothing was written");

    // A reader that starts after the invalidation fills the new value.
    let stamp = begin_fill(&mut r, key.as_bytes(), STAMP_TTL_MS).await.unwrap();
    let fresh = quantity(&mut db, 1).await;
    assert!(fill(&mut r, key.as_bytes(), &stamp, fresh.to_string().as_bytes(), 0).await.unwrap());
    let cached: i64 = r.get(&key).await.unwrap();
    assert_eq!(cached, fresh);
    d.finish().await;
}

#[tokio::test]
async fn under_concurrent_readers_and_writers_no_stale_value_survives() {
    const ROWS: i64 = 8;
    const WRITERS: usize = 4;
    const READERS: usize = 8;
    let url = redis_url();
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    let keys: Vec<String> = (1..=ROWS).map(|id| d.key(&format!("stock:{id}"))).collect();
    let keys = Arc::new(keys);
    let race = Race::start(&d, ROWS, WRITERS);
    let mut readers = Vec::new();
    for reader in 0..READERS {
        let (pg, stop, keys) = (d.db.url.clone(), race.stop_readers.clone(), keys.clone());
        let (accepted, refused) = (race.accepted.clone(), race.refused.clone());
        let mut r = redis(&url).await;
        readers.push(tokio::spawn(async move {
            let mut db = sqlx::PgConnection::connect(&pg).await.unwrap();
            let mut rng = fastrand::Rng::with_seed(100 + reader as u64);
            while !stop.load(Ordering::Relaxed) {
                let id = rng.i64(1..=ROWS);
                let key = keys[(id - 1) as usize].as_bytes();
                // The cache read and, on a miss, the stamp: one round trip.
                let stamp = match read(&mut r, key, STAMP_TTL_MS).await.unwrap() {
                    Read::Hit(_) => {
                        tokio::time::sleep(Duration::from_micros(rng.u64(0..500))).await;
                        continue;
                    }
                    Read::Miss { stamp } => stamp,
                };
                let value = quantity(&mut db, id).await;
                // Widen the window between the read and the fill, where the race lives.
                tokio::time::sleep(Duration::from_micros(rng.u64(0..3000))).await;
                // No TTL: a stale value that got in would stay for good.
                if fill(&mut r, key, &stamp, value.to_string().as_bytes(), 0).await.unwrap() {
                    accepted.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    race.finish(&d, &url, readers, &keys, "fills").await;
    d.finish().await;
}

/// Writers committing `quantity + 1` of random rows while readers (spawned
/// by the test, counting in `accepted` and `refused`) fill the cache.
pub(super) struct Race {
    pub stop_readers: Arc<AtomicBool>,
    pub accepted: Arc<AtomicU64>,
    pub refused: Arc<AtomicU64>,
    stop_writers: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Race {
    /// Starts `writers` tasks that each commit `quantity + 1` of a random
    /// row of `1..=rows` with a random pause.
    pub(super) fn start(d: &Daemon, rows: i64, writers: usize) -> Race {
        let (stop_writers, commits) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let writers = (0..writers)
            .map(|w| {
                let (url, stop, commits) = (d.db.url.clone(), stop_writers.clone(), commits.clone());
                tokio::spawn(async move {
                    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
                    let mut rng = fastrand::Rng::with_seed(w as u64);
                    while !stop.load(Ordering::Relaxed) {
                        let id = rng.i64(1..=rows);
                        sqlx::query("UPDATE app.stock SET quantity = quantity + 1 WHERE id = $1")
                            .bind(id)
                            .execute(&mut db)
                            .await
                            .unwrap();
                        commits.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_micros(rng.u64(0..2000))).await;
                    }
                })
            })
            .collect();
        Race {
            stop_readers: Arc::new(AtomicBool::new(false)),
            accepted: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
            stop_writers,
            commits,
            writers,
        }
    }

    /// Races for 4 s, stops the writers, lets the readers fill while evictd
    /// catches up with the last commits, stops them, and checks that the
    /// race was run and that no key of `keys` (row `i + 1` each) holds a
    /// stale quantity.
    pub(super) async fn finish(
        self,
        d: &Daemon,
        url: &str,
        readers: Vec<tokio::task::JoinHandle<()>>,
        keys: &[String],
        what: &str,
    ) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        self.stop_writers.store(true, Ordering::Relaxed);
        for w in self.writers {
            w.await.unwrap();
        }
        // Readers keep filling while evictd catches up with the last commits.
        caught_up(d).await;
        self.stop_readers.store(true, Ordering::Relaxed);
        for r in readers {
            r.await.unwrap();
        }
        caught_up(d).await;

        let (accepted, refused, commits) = (
            self.accepted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.commits.load(Ordering::Relaxed),
        );
        eprintln!("{commits} commits, {accepted} {what} stored, {refused} stale fills refused");
        assert!(commits > 100, "the writers made too few commits ({commits}) to race");
        assert!(refused > 0, "no fill was refused: the race was not exercised");
        assert!(accepted > 0, "no fill was stored");
        let mut r = redis(url).await;
        let mut db = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
        for (i, key) in keys.iter().enumerate() {
            let id = i as i64 + 1;
            let cached: Option<i64> = r.get(key).await.unwrap();
            if let Some(cached) = cached {
                assert_eq!(cached, quantity(&mut db, id).await, "row {id}: the cache holds a stale quantity");
            }
        }
    }
}
