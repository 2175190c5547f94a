//! What the fill guard costs, on a real Redis, side by side in one run:
//!
//! - a reader's miss: `GET` then `SET key value PX ttl`, against the
//!   guarded forms (`read` then `fill`; `GET`, `begin_fill`, `fill`), one
//!   client, one request at a time — the Redis time an application spends
//!   per cache miss (the database read in between is left out);
//! - evictd's side: applying 512-key delete batches of keys that exist,
//!   without the guard, with it and no reader filling (the stamps are
//!   `SET … XX` misses), and with a reader's stamp on every key.
//!
//! ```sh
//! scripts/services/redis-start.sh
//! cargo run --release --example fill_guard_cost -- redis://127.0.0.1:6479
//! ```
//!
//! Prints medians of `ROUNDS` alternating rounds.

use std::time::{Duration, Instant};

use evictd::config::RedisTarget;
use evictd::diagnostic::SourceFile;
use evictd::graph::load::load_sources;
use evictd::reader::{Read, begin_fill, fill, guard_key, read};
use evictd::resolve::Effect;
use evictd::sink::redis::RedisSink;
use evictd::sink::{Sink, SinkBatch};
use secrecy::SecretString;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const ROUNDS: usize = 7;
const FILLS: usize = 5_000;
const BATCHES: usize = 40;
const BATCH_KEYS: usize = 512;

const GRAPH: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id"]
[caches.cost_item]
key = "cost:item:{id}"
[[caches.cost_item.depends]]
table = "app.items"
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "redis://127.0.0.1:6479".to_owned());
    let mut con = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
    let value = vec![b'x'; 200];

    let (mut plain, mut guarded, mut separate) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let started = Instant::now();
        for i in 0..FILLS {
            let key = format!("cost:plain:{round}:{i}");
            let cached: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut con).await?;
            if cached.is_none() {
                redis::cmd("SET").arg(&key).arg(&value).arg("PX").arg(60_000).exec_async(&mut con).await?;
            }
        }
        plain.push(started.elapsed().as_secs_f64() * 1e6 / FILLS as f64);
        let started = Instant::now();
        for i in 0..FILLS {
            let key = format!("cost:guarded:{round}:{i}");
            if let Read::Miss { stamp } = read(&mut con, key.as_bytes(), 60_000).await?
                && !fill(&mut con, key.as_bytes(), &stamp, &value, 60_000).await?
            {
                return Err("a fill with nothing invalidated was refused".into());
            }
        }
        guarded.push(started.elapsed().as_secs_f64() * 1e6 / FILLS as f64);
        let started = Instant::now();
        for i in 0..FILLS {
            let key = format!("cost:begin:{round}:{i}");
            let _: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut con).await?;
            let stamp = begin_fill(&mut con, key.as_bytes(), 60_000).await?;
            if !fill(&mut con, key.as_bytes(), &stamp, &value, 60_000).await? {
                return Err("a fill with nothing invalidated was refused".into());
            }
        }
        separate.push(started.elapsed().as_secs_f64() * 1e6 / FILLS as f64);
    }
    let (plain, guarded, separate) = (median(plain), median(guarded), median(separate));
    println!("| reader miss, Redis side | median µs per miss | ratio |");
    println!("|---|---|---|");
    println!("| unguarded: GET + SET PX | {plain:.1} | 1.00 |");
    println!("| guarded: read + fill | {guarded:.1} | {:.2} |", guarded / plain);
    println!("| guarded: GET + begin_fill + fill | {separate:.1} | {:.2} |", separate / plain);

    let graph = load_sources(&[SourceFile::new("cost.toml", GRAPH.to_owned())])?;
    let cache = graph.cache_id("cost_item").ok_or("no cache")?;
    let target = |guard: bool| RedisTarget {
        name: if guard { "guarded" } else { "plain" }.to_owned(),
        urls: vec![SecretString::from(url.clone())],
        cluster: false,
        fill_guard_ttl: guard.then_some(Duration::from_secs(60)),
        broadcast: None,
        durability: None,
        eviction_check: evictd::config::EvictionCheck::Refuse,
        tls: None,
    };
    let with = RedisSink::connect(&target(true)).await?;
    let without = RedisSink::connect(&target(false)).await?;
    // (sink, whether a reader holds a stamp on every key, rates)
    let mut variants = [(&without, false, Vec::new()), (&with, false, Vec::new()), (&with, true, Vec::new())];
    for round in 0..ROUNDS {
        for (v, (sink, stamped, out)) in variants.iter_mut().enumerate() {
            let mut busy = Duration::ZERO;
            for b in 0..BATCHES {
                let keys: Vec<String> = (0..BATCH_KEYS).map(|i| format!("cost:item:{v}:{round}:{b}:{i}")).collect();
                // The keys exist, as cached values do: UNLINK frees them.
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("SET").arg(key).arg(&value).arg("PX").arg(60_000).ignore();
                    if *stamped {
                        pipe.cmd("SET").arg(guard_key(key.as_bytes())).arg("r1.1").arg("PX").arg(60_000).ignore();
                    }
                }
                pipe.exec_async(&mut con).await?;
                let effects: Vec<Effect> = keys.into_iter().map(|key| Effect::Key { cache, key }).collect();
                let batch = SinkBatch {
                    id: b as u64,
                    graph: &graph,
                    effects: &effects,
                    version: 1,
                    position: None,
                    commit_time_micros: None,
                };
                let started = Instant::now();
                sink.apply(batch).await?;
                busy += started.elapsed();
            }
            out.push((BATCHES * BATCH_KEYS) as f64 / busy.as_secs_f64());
        }
    }
    let [(_, _, off), (_, _, on), (_, _, held)] = variants;
    let (off, on, held) = (median(off), median(on), median(held));
    println!();
    println!("| evictd deletes (512-key batches of existing keys) | median keys/s | ratio |");
    println!("|---|---|---|");
    println!("| fill_guard = false | {off:.0} | 1.00 |");
    println!("| fill_guard = true, no reader filling | {on:.0} | {:.2} |", on / off);
    println!("| fill_guard = true, a reader's stamp on every key | {held:.0} | {:.2} |", held / off);
    // Everything written here expires within a minute.
    Ok(())
}
