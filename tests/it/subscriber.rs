//! `evictd::subscriber` against a real Redis and Cluster. evictd does not
//! publish format v2 yet, so a STAND-IN publisher writes exactly what
//! `docs/broadcast.md` says (one script: `:seq` and `:epoch` started together
//! from the Redis clock in µs, `touched` before the message, `XADD … MAXLEN ~
//! N * m`, `PUBLISH`; heartbeats on pub/sub only), and can lose a message on
//! one path to play a disconnected subscriber.

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, Instant};

use evictd::change::Lsn;
use evictd::subscriber::{
    ChannelKeys, Load, LocalCache, Servers, Subscriber, SubscriberConfig, SubscriberError, Transport,
};

use crate::redis_support::{BOTH, Kind, Probe, Proxy, unique, urls};

const PUBLISH_V2_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  local start = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('SET', KEYS[1], start)
  redis.call('SET', KEYS[2], start)
end
local seq = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
local msg = '{"v":2,"kind":"batch","epoch":"' .. epoch .. '","seq":' .. string.format('%d', seq) .. ARGV[4]
for i = 6, #ARGV do redis.call('HSET', KEYS[4], ARGV[i], seq) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[5], 'postgres', ARGV[5]) end
if ARGV[2] == 'both' or ARGV[2] == 'stream' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'm', msg)
end
if ARGV[2] == 'both' or ARGV[2] == 'pubsub' then
  redis.call('PUBLISH', ARGV[1], msg)
end
return seq
"#;

/// What one stand-in batch invalidates, and where it is delivered.
#[derive(Default)]
struct Batch<'a> {
    caches: &'a [&'a str],
    keys: &'a [&'a str],
    tags: &'a [&'a str],
    flush: &'a [&'a str],
    applied: Option<&'a str>,
    /// `both` (default), `pubsub`, `stream` or `none`.
    deliver: &'a str,
}

struct StandIn {
    probe: Probe,
    keys: ChannelKeys,
}

impl StandIn {
    async fn new(kind: Kind, channel: &str) -> StandIn {
        StandIn { probe: Probe::new(kind).await, keys: ChannelKeys::of(channel) }
    }

    async fn publish(&self, b: Batch<'_>) -> u64 {
        let mut touched: Vec<&str> = b.caches.iter().chain(b.flush).copied().collect();
        if !b.tags.is_empty() {
            touched.push("*tags");
        }
        let applied = b.applied.map(|lsn| format!(r#","applied":{{"kind":"postgres","lsn":"{lsn}"}}"#));
        let tail = format!(
            r#","batch":1,"position":{{"kind":"postgres","commit_lsn":"0/10","lsn":"0/10"}},"committed_at_ms":{}{},"caches":{},"keys":{},"tags":{},"flush":{},"truncated":false,"published_at_ms":{}}}"#,
            now_ms(),
            applied.unwrap_or_default(),
            serde_json::to_string(b.caches).unwrap(),
            serde_json::to_string(b.keys).unwrap(),
            serde_json::to_string(b.tags).unwrap(),
            serde_json::to_string(b.flush).unwrap(),
            now_ms(),
        );
        let k = &self.keys;
        let deliver = if b.deliver.is_empty() { "both" } else { b.deliver };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUBLISH_V2_LUA).arg(5).arg(&k.seq).arg(&k.epoch).arg(&k.stream).arg(&k.touched).arg(&k.applied);
        cmd.arg(&k.channel).arg(deliver).arg(1000).arg(tail).arg(b.applied.unwrap_or(""));
        for cache in touched {
            cmd.arg(cache);
        }
        self.probe.q(&cmd).await
    }

    async fn heartbeat(&self) {
        let (epoch, seq): (String, u64) =
            self.probe.q(redis::cmd("MGET").arg(&self.keys.epoch).arg(&self.keys.seq)).await;
        let msg =
            format!(r#"{{"v":2,"kind":"heartbeat","epoch":"{epoch}","seq":{seq},"published_at_ms":{}}}"#, now_ms());
        self.probe.q::<i64>(redis::cmd("PUBLISH").arg(&self.keys.channel).arg(msg)).await;
    }

    /// Redis lost the channel's keys (a restart without persistence).
    async fn lose_sequence(&self) {
        for key in [&self.keys.seq, &self.keys.epoch, &self.keys.stream, &self.keys.touched] {
            self.probe.q::<i64>(redis::cmd("DEL").arg(key)).await;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn servers(kind: Kind) -> Servers {
    match kind {
        Kind::Standalone => Servers::Standalone(urls(kind)[0].clone()),
        Kind::Cluster => Servers::Cluster(urls(kind)),
    }
}

fn local() -> LocalCache<String> {
    LocalCache::builder()
        .ttl(Duration::from_secs(30), Duration::from_secs(5))
        .redis_ttl(Duration::from_secs(60))
        .build()
}

async fn config(servers: Servers, transport: Transport, channel: &str) -> SubscriberConfig {
    let mut config = SubscriberConfig::new(servers, transport);
    config.channel = channel.to_owned();
    config.heartbeat = Duration::from_millis(200);
    config.timeout = Duration::from_millis(500);
    config
}

async fn fill(cache: &LocalCache<String>, cache_name: &str, key: &str, tags: &[&str]) {
    let load = Load::new(cache_name, key).tags(tags.iter().copied());
    cache.get_or_load(&load, || async { Ok::<_, Infallible>(format!("value of {key}")) }).await.unwrap();
}

async fn cached(cache: &LocalCache<String>, key: &str) -> bool {
    cache.get(key).await.is_some()
}

/// Polls `check` until it holds, for at most `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscriber that has seen the channel (its first heartbeat or batch).
async fn started(kind: Kind, transport: Transport, channel: &str, cache: &LocalCache<String>) -> (Subscriber, StandIn) {
    let standin = StandIn::new(kind, channel).await;
    standin.publish(Batch { caches: &["warmup"], keys: &["warmup"], ..Batch::default() }).await;
    let sub = Subscriber::start(config(servers(kind), transport, channel).await, cache.clone()).await.unwrap();
    // The stream reader starts from the newest entry; the pub/sub one from
    // the keys: give both a moment to be in place, then check they apply.
    let mut n = 0;
    eventually("the subscriber applies a batch", Duration::from_secs(10), || {
        n += 1;
        let key = format!("probe-{n}");
        let (cache, standin) = (cache.clone(), &standin);
        async move {
            fill(&cache, "probe", &key, &[]).await;
            standin.publish(Batch { caches: &["probe"], keys: &[&key], ..Batch::default() }).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            !cached(&cache, &key).await
        }
    })
    .await;
    (sub, standin)
}

#[tokio::test]
async fn a_batch_drops_its_keys_tags_and_flushed_caches_on_both_transports() {
    for kind in BOTH {
        for transport in [Transport::PubSub, Transport::Stream] {
            let channel = format!("t:{}", unique());
            let cache = local();
            let (sub, standin) = started(kind, transport, &channel, &cache).await;
            fill(&cache, "user_profile", "user:{1}:profile", &[]).await;
            fill(&cache, "user_card", "user:{1}:card", &["user:1"]).await;
            fill(&cache, "feed", "feed:{1}", &[]).await;
            fill(&cache, "other", "other:{1}", &[]).await;
            standin.publish(Batch { caches: &["user_profile"], keys: &["user:{1}:profile"], ..Batch::default() }).await;
            standin.publish(Batch { tags: &["user:1"], ..Batch::default() }).await;
            standin.publish(Batch { flush: &["feed"], ..Batch::default() }).await;
            eventually(&format!("{kind:?} {transport:?}: drops"), Duration::from_secs(5), || async {
                !cached(&cache, "user:{1}:profile").await
                    && !cached(&cache, "user:{1}:card").await
                    && !cached(&cache, "feed:{1}").await
            })
            .await;
            assert!(cached(&cache, "other:{1}").await, "{kind:?} {transport:?}: untouched cache kept");
            let stats = sub.stats();
            assert_eq!((stats.gaps, stats.flushes), (0, 0), "{kind:?} {transport:?}: {stats:?}");
            assert!(stats.latency_count >= 3, "{stats:?}");
            sub.stop().await;
        }
    }
}

/// A message lost on pub/sub is a gap when the next one (or a heartbeat)
/// arrives: only the caches `touched` names since are dropped.
#[tokio::test]
async fn a_lost_pubsub_message_is_repaired_for_its_caches_only() {
    for kind in BOTH {
        let channel = format!("t:{}", unique());
        let cache = local();
        let (sub, standin) = started(kind, Transport::PubSub, &channel, &cache).await;
        fill(&cache, "lost", "lost:{1}", &[]).await;
        fill(&cache, "lost", "lost:{2}", &[]).await;
        fill(&cache, "tagged", "tagged:{1}", &["t:1"]).await;
        fill(&cache, "kept", "kept:{1}", &[]).await;
        standin
            .publish(Batch {
                caches: &["lost"],
                keys: &["lost:{1}"],
                tags: &["t:9"],
                deliver: "stream",
                ..Batch::default()
            })
            .await;
        standin.heartbeat().await;
        eventually(&format!("{kind:?}: the gap is repaired"), Duration::from_secs(5), || async {
            !cached(&cache, "lost:{2}").await && !cached(&cache, "tagged:{1}").await
        })
        .await;
        assert!(cached(&cache, "kept:{1}").await, "{kind:?}: a cache untouched since is kept");
        let stats = sub.stats();
        assert_eq!((stats.gaps, stats.flushes), (1, 0), "{kind:?}: {stats:?}");
        sub.stop().await;
    }
}

/// The sequence reset (Redis lost the keys): a new epoch flushes, on both
/// transports; the stream reader sees it on a quiet channel too.
#[tokio::test]
async fn a_new_epoch_flushes_everything() {
    for transport in [Transport::PubSub, Transport::Stream] {
        let channel = format!("t:{}", unique());
        let cache = local();
        let (sub, standin) = started(Kind::Standalone, transport, &channel, &cache).await;
        fill(&cache, "kept", "kept:{1}", &[]).await;
        standin.lose_sequence().await;
        tokio::time::sleep(Duration::from_millis(5)).await; // a new µs clock
        standin.publish(Batch { caches: &["x"], keys: &["x:{1}"], ..Batch::default() }).await;
        eventually(&format!("{transport:?}: flushed"), Duration::from_secs(5), || async {
            !cached(&cache, "kept:{1}").await
        })
        .await;
        assert!(sub.stats().flushes >= 1, "{transport:?}: {:?}", sub.stats());
        sub.stop().await;
    }
}

/// A dropped connection: the stream reader replays what it missed and
/// flushes nothing; the pub/sub reader, with Redis unreachable, flushes.
#[tokio::test]
async fn a_dropped_connection_replays_on_the_stream_and_flushes_on_pubsub() {
    let upstream = &urls(Kind::Standalone)[0];
    for transport in [Transport::Stream, Transport::PubSub] {
        let proxy = Proxy::start(upstream).await;
        let channel = format!("t:{}", unique());
        let cache = local();
        let standin = StandIn::new(Kind::Standalone, &channel).await;
        standin.publish(Batch { caches: &["warmup"], ..Batch::default() }).await;
        let sub =
            Subscriber::start(config(Servers::Standalone(proxy.url.clone()), transport, &channel).await, cache.clone())
                .await
                .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        fill(&cache, "lost", "lost:{1}", &[]).await;
        fill(&cache, "kept", "kept:{1}", &[]).await;
        proxy.set_down(true);
        standin.publish(Batch { caches: &["lost"], keys: &["lost:{1}"], ..Batch::default() }).await;
        tokio::time::sleep(Duration::from_millis(800)).await; // past 3 heartbeats
        proxy.set_down(false);
        eventually(&format!("{transport:?}: the missed key is dropped"), Duration::from_secs(10), || async {
            !cached(&cache, "lost:{1}").await
        })
        .await;
        let stats = sub.stats();
        match transport {
            Transport::Stream => {
                assert!(cached(&cache, "kept:{1}").await, "the stream replays: nothing else dropped");
                assert_eq!(stats.flushes, 0, "{stats:?}");
                assert!(stats.replays >= 1, "{stats:?}");
            }
            Transport::PubSub => assert!(stats.flushes >= 1, "Redis did not answer: flushed; {stats:?}"),
        }
        sub.stop().await;
    }
}

#[tokio::test]
async fn wait_applied_returns_once_the_drops_up_to_the_lsn_are_done() {
    for kind in BOTH {
        for transport in [Transport::PubSub, Transport::Stream] {
            let channel = format!("t:{}", unique());
            let cache = local();
            let (sub, standin) = started(kind, transport, &channel, &cache).await;
            let lsn: Lsn = "0/2000".parse().unwrap();
            assert!(!sub.wait_applied(lsn, Duration::from_millis(300)).await, "{kind:?} {transport:?}: not yet");
            fill(&cache, "user_profile", "user:{1}:profile", &[]).await;
            let publisher = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                standin
                    .publish(Batch {
                        caches: &["user_profile"],
                        keys: &["user:{1}:profile"],
                        applied: Some("0/2010"),
                        ..Batch::default()
                    })
                    .await;
            };
            let (applied, ()) = tokio::join!(sub.wait_applied(lsn, Duration::from_secs(5)), publisher);
            assert!(applied, "{kind:?} {transport:?}");
            assert!(!cached(&cache, "user:{1}:profile").await, "{kind:?} {transport:?}: dropped before it returned");
            sub.stop().await;
        }
    }
}

#[tokio::test]
async fn a_local_ttl_longer_than_the_redis_ttl_is_refused_on_pubsub_only() {
    let channel = format!("t:{}", unique());
    let long: LocalCache<String> = LocalCache::builder()
        .ttl(Duration::from_secs(50), Duration::from_secs(20))
        .redis_ttl(Duration::from_secs(60))
        .build();
    let refused =
        Subscriber::start(config(servers(Kind::Standalone), Transport::PubSub, &channel).await, long.clone()).await;
    assert!(matches!(refused, Err(SubscriberError::LocalTtlAboveRedisTtl { .. })));
    let unknown: LocalCache<String> = LocalCache::builder().build();
    let refused =
        Subscriber::start(config(servers(Kind::Standalone), Transport::PubSub, &channel).await, unknown).await;
    assert!(matches!(refused, Err(SubscriberError::LocalTtlAboveRedisTtl { redis: None, .. })));
    let stream = Subscriber::start(config(servers(Kind::Standalone), Transport::Stream, &channel).await, long).await;
    stream.unwrap().stop().await;
}
