//! Keys registered under tags against the update race, end to end: real
//! Postgres, real Redis, `evictd run`, readers that register and fill.
//!
//! Issue 11, item 5. The race: a reader misses and reads the old row; a
//! writer commits; evictd invalidates the tag and finds the registry empty
//! (the reader has not registered yet); the reader fills and registers the
//! old value, which then stays. The protocol that closes it: take the
//! fill-guard stamp, register under the tags, read the database, fill
//! through the guard. The registration is in place before the database is
//! read, so evictd's tag scan after the commit finds the key and replaces
//! its stamp, and the stale fill is refused.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evictd::reader::{Read, fill, read, register};
use evictd::sink::redis::layout::tag_key;
use redis::AsyncCommands as _;
use sqlx::Connection as _;

use super::daemon::{Daemon, redis, redis_url};
use super::fill_guard::{Race, SCHEMA, caught_up, quantity};

/// A listing cache invalidated through tags only: the application names
/// its keys and registers them under `<prefix>-stock:<id>`.
fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.stock"]
key = ["id"]
columns = ["id", "quantity"]

[caches.{prefix}_listing]
key = "{prefix}:listing:{{?page}}"
[[caches.{prefix}_listing.depends]]
table = "app.stock"
tags = ["{prefix}-stock:{{id}}"]
"#
    )
}

const STAMP_TTL_MS: u64 = 60_000;
const TTL_MS: u64 = 600_000;

/// One reader's miss under the documented protocol: stamp, register, read
/// the database, fill through the guard. `Some(true)`: stored.
async fn guarded_miss(
    r: &mut redis::aio::MultiplexedConnection,
    db: &mut sqlx::PgConnection,
    key: &str,
    tag: &str,
    id: i64,
    window: Duration,
) -> Option<bool> {
    let Read::Miss { stamp } = read(r, key.as_bytes(), STAMP_TTL_MS).await.unwrap() else {
        return None;
    };
    register(r, key.as_bytes(), &[tag], TTL_MS).await.unwrap();
    let value = quantity(db, id).await;
    tokio::time::sleep(window).await;
    Some(fill(r, key.as_bytes(), &stamp, value.to_string().as_bytes(), TTL_MS).await.unwrap())
}

#[tokio::test]
async fn registering_before_the_database_read_refuses_the_stale_refill() {
    let url = redis_url();
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    let mut r = redis(&url).await;
    let mut db = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    let p = d.prefix.clone();
    let key = d.key("listing:page=1");
    let tag = format!("{p}-stock:1");

    // Fill first, register second (the protocol documented before): the
    // reader reads the old row, the writer commits, evictd finds no
    // registration, the reader fills and registers the old value.
    let old = quantity(&mut db, 1).await;
    d.sql("UPDATE app.stock SET quantity = quantity + 1 WHERE id = 1").await;
    caught_up(&d).await;
    let () = r.set(&key, old).await.unwrap();
    register(&mut r, key.as_bytes(), &[&tag], TTL_MS).await.unwrap();
    let cached: i64 = r.get(&key).await.unwrap();
    assert_eq!((cached, quantity(&mut db, 1).await), (old, old + 1), "fill-then-register keeps the old value");
    let () = r.del(&[key.clone(), tag_key(&tag)]).await.unwrap();

    // Stamp, register, read, fill: the same interleaving is refused.
    let Read::Miss { stamp } = read(&mut r, key.as_bytes(), STAMP_TTL_MS).await.unwrap() else {
        panic!("the key was deleted")
    };
    register(&mut r, key.as_bytes(), &[&tag], TTL_MS).await.unwrap();
    let old = quantity(&mut db, 1).await;
    d.sql("UPDATE app.stock SET quantity = quantity + 1 WHERE id = 1").await;
    caught_up(&d).await;
    let stored = fill(&mut r, key.as_bytes(), &stamp, old.to_string().as_bytes(), TTL_MS).await.unwrap();
    assert!(!stored, "evictd found the registration and replaced the stamp: the stale refill is refused");
    assert!(!super::daemon::exists(&mut r, &key).await, "nothing was written");

    // A reader after the invalidation stores the new value, registered.
    let stored = guarded_miss(&mut r, &mut db, &key, &tag, 1, Duration::ZERO).await;
    assert_eq!(stored, Some(true));
    let cached: i64 = r.get(&key).await.unwrap();
    assert_eq!(cached, quantity(&mut db, 1).await);
    let registered: Option<f64> = r.zscore(tag_key(&tag), &key).await.unwrap();
    assert!(registered.is_some(), "the fresh value is registered under its tag");
    d.finish().await;
}

#[tokio::test]
async fn under_concurrent_readers_and_writers_no_stale_tagged_value_survives() {
    const ROWS: i64 = 8;
    const WRITERS: usize = 4;
    const READERS: usize = 8;
    let url = redis_url();
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    let p = d.prefix.clone();
    let keys: Arc<Vec<(String, String)>> =
        Arc::new((1..=ROWS).map(|id| (d.key(&format!("listing:item={id}")), format!("{p}-stock:{id}"))).collect());
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
                let (key, tag) = &keys[(id - 1) as usize];
                let window = Duration::from_micros(rng.u64(0..3000));
                match guarded_miss(&mut r, &mut db, key, tag, id, window).await {
                    None => tokio::time::sleep(Duration::from_micros(rng.u64(0..500))).await,
                    Some(true) => drop(accepted.fetch_add(1, Ordering::Relaxed)),
                    Some(false) => drop(refused.fetch_add(1, Ordering::Relaxed)),
                }
            }
        }));
    }
    let cached: Vec<String> = keys.iter().map(|(key, _)| key.clone()).collect();
    race.finish(&d, &url, readers, &cached, "tagged fills").await;
    d.finish().await;
}

/// The race the concurrent test above found (a stale quantity kept for
/// good, once in a few runs): evictd reads registration (K, s), deletes K,
/// and a reader that started after the delete registers K again **in the
/// same millisecond**, so with the same score s; evictd's forget step then
/// removed that fresh registration (its score was still s), the reader's
/// fresh fill was registered nowhere, and the next change of the row did
/// not reach it. A registration must always change the score.
#[tokio::test]
async fn a_registration_in_the_same_millisecond_survives_the_forget_step() {
    use evictd::reader::register_at;
    use evictd::sink::redis::layout::FORGET_LUA;
    let mut r = redis(&redis_url()).await;
    let p = format!("tr{}_{}", std::process::id(), fastrand::u32(..));
    let (key, tag) = (format!("{p}:listing"), format!("{p}-stock:1"));
    let registry = tag_key(&tag);
    let expire_at = 4_102_444_800_000_u64; // one fixed millisecond
    register_at(&mut r, key.as_bytes(), &[&tag], expire_at).await.unwrap();
    // evictd's read of the registry, as ZSCAN prints it.
    let (_, page): (String, Vec<String>) = redis::cmd("ZSCAN").arg(&registry).arg(0).query_async(&mut r).await.unwrap();
    let read_score = page[1].clone();
    // A reader registers the key again within the same millisecond.
    register_at(&mut r, key.as_bytes(), &[&tag], expire_at).await.unwrap();
    // evictd's forget step, with what it read.
    let removed: i64 = redis::Script::new(FORGET_LUA)
        .key(&registry)
        .arg(0)
        .arg(&key)
        .arg(&read_score)
        .invoke_async(&mut r)
        .await
        .unwrap();
    assert_eq!(removed, 0, "the registration made after the read was forgotten");
    let score: Option<f64> = r.zscore(&registry, &key).await.unwrap();
    assert!(score.is_some_and(|s| s >= expire_at as f64 && s < expire_at as f64 + 1.0), "{score:?}");
    let () = r.del(&registry).await.unwrap();
}
