//! The Rust agent of evictd's end-to-end client tests (`tests/it/clients.rs`,
//! which documents the line protocol): a process holding a [`LocalCache`]
//! kept by the [`Subscriber`], on evictd's client alone (this package
//! depends on evictd with `default-features = false`).
//!
//! ```sh
//! e2e_agent --redis URL --channel C --transport pubsub|stream --heartbeat-ms N
//! ```
//!
//! It prints `ready` once subscribed, answers every command line with one
//! line, and prints `dropped <key> <unix_ms>` whenever an entry it filled
//! leaves the local cache because of the broadcast (heard through
//! [`LocalCacheBuilder::on_drop`](evictd::subscriber::LocalCacheBuilder::on_drop)).
//! Every line is one `println!`, which holds stdout's lock: an event never
//! splits a reply. The Rust client has no combined transport: `both` is
//! refused (the harness runs this agent on `pubsub` and `stream`).
//!
//! Built and found by `clients/rust-example/setup.sh` (which prints
//! `EVICTD_TEST_RUST_AGENT=<path>` for `scripts/test.sh`).

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::BufRead as _;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evictd::subscriber::{Load, LocalCache, Servers, Subscriber, SubscriberConfig, Transport};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The agent's arguments.
struct Args {
    redis: String,
    channel: String,
    transport: Transport,
    heartbeat: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut redis, mut channel, mut transport, mut heartbeat) = (None, None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--redis" => redis = Some(value),
            "--channel" => channel = Some(value),
            "--transport" => {
                transport = Some(match value.as_str() {
                    "pubsub" => Transport::PubSub,
                    "stream" => Transport::Stream,
                    other => return Err(format!("--transport {other}: the Rust client reads pubsub or stream")),
                });
            }
            "--heartbeat-ms" => {
                let ms = value.parse().map_err(|e| format!("--heartbeat-ms {value}: {e}"))?;
                heartbeat = Some(Duration::from_millis(ms));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let missing = || "--redis, --channel, --transport and --heartbeat-ms are required".to_owned();
    Ok(Args {
        redis: redis.ok_or_else(missing)?,
        channel: channel.ok_or_else(missing)?,
        transport: transport.ok_or_else(missing)?,
        heartbeat: heartbeat.ok_or_else(missing)?,
    })
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The keys filled through `fill` that are still cached.
type Watched = Arc<Mutex<HashSet<String>>>;

/// After each invalidation: reports the watched keys that are gone.
fn report(watched: &Watched, cache: &OnceLock<LocalCache<String>>) {
    let Some(cache) = cache.get() else { return };
    let at = now_ms();
    let mut watched = watched.lock().unwrap_or_else(PoisonError::into_inner);
    watched.retain(|key| {
        let kept = cache.contains(key);
        if !kept {
            println!("dropped {key} {at:.3}");
        }
        kept
    });
}

fn stats(local: &LocalCache<String>, subscriber: &Subscriber) -> String {
    let s = subscriber.stats();
    // The client's histogram has buckets: its quantiles are bucket bounds.
    let ms = |q: f64| s.latency_quantile(q).map_or("null".to_owned(), |b| format!("{}", b * 1000.0));
    format!(
        "{{\"entries\":{},\"hits\":{},\"misses\":{},\"invalidations\":{},\"replays\":{},\"gaps\":{},\"flushes\":{},\
         \"rejected_fills\":{},\"reconnects\":{},\"commit_to_drop\":{{\"count\":{},\"p50_ms\":{},\"p99_ms\":{}}}}}",
        local.entry_count(),
        s.hits,
        s.misses,
        s.invalidations_applied,
        s.replays,
        s.gaps,
        s.flushes,
        s.fills_rejected,
        s.reconnects,
        s.latency_count,
        ms(0.5),
        ms(0.99),
    )
}

async fn command(line: &str, local: &LocalCache<String>, subscriber: &Subscriber, watched: &Watched) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["fill", cache, key, value, tags @ ..] => {
            watched.lock().unwrap_or_else(PoisonError::into_inner).insert((*key).to_owned());
            let rejected = local.stats().snapshot().fills_rejected;
            let load = Load::new(*cache, *key).tags(tags.iter().copied());
            let value = (*value).to_owned();
            match local.get_or_load(&load, || async move { Ok::<_, Infallible>(value) }).await {
                Ok(_) if local.stats().snapshot().fills_rejected > rejected => "rejected".to_owned(),
                Ok(_) => "ok".to_owned(),
                Err(e) => match *e {},
            }
        }
        ["get", key] => match local.get(key).await {
            Some(value) => format!("hit {value}"),
            None => "miss".to_owned(),
        },
        ["stats"] => format!("stats {}", stats(local, subscriber)),
        _ => format!("error unknown command: {}", line.trim()),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("error {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let args = parse_args()?;
    let watched: Watched = Arc::default();
    let cell: Arc<OnceLock<LocalCache<String>>> = Arc::default();
    // Entries live an hour: in these tests only the broadcast removes them.
    let hour = Duration::from_secs(3600);
    let local: LocalCache<String> = LocalCache::builder()
        .max_entries(100_000)
        .ttl(hour, Duration::ZERO)
        .redis_ttl(hour)
        .on_drop({
            let (watched, cell) = (Arc::clone(&watched), Arc::clone(&cell));
            move |_| report(&watched, &cell)
        })
        .build();
    let _ = cell.set(local.clone());
    let mut config = SubscriberConfig::new(Servers::Standalone(args.redis), args.transport);
    config.channel = args.channel;
    config.heartbeat = args.heartbeat;
    let subscriber =
        Subscriber::start(config, local.clone()).await.map_err(|e| format!("the subscriber did not start: {e}"))?;
    println!("ready");

    // stdin is read on a thread of its own: its lines come over a channel.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        if line.trim().is_empty() {
            continue;
        }
        if line.trim() == "quit" {
            break;
        }
        println!("{}", command(&line, &local, &subscriber, &watched).await);
    }
    println!("bye");
    subscriber.stop().await;
    Ok(())
}
