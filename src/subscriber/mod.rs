//! The broadcast subscriber and its local cache, for applications
//! (feature `subscriber`): `docs/broadcast.md` is the protocol,
//! `docs/client-rust.md` the user's guide.
//!
//! ```text
//! evictd ──PUBLISH / XADD──► Redis ──► Subscriber (one task) ──► LocalCache (moka)
//!                                        │  Tracker: (epoch, seq) → apply | gap | flush
//!                                        └─ gap: HGETALL touched → drop those caches only
//! ```
//!
//! - [`message`]: parsing format v2; [`sequence`]: the pure `(epoch, seq)`
//!   state machine; [`local`]: the cache; [`stats`]: counters and the drop
//!   latency histogram; `worker`: the reading loops of both transports.
//!
//! **Invariants:** a message's drops are done before its `seq` and
//! `applied` are published to [`Subscriber::wait_applied`]; a missed
//! message is never passed over silently: it is replayed (stream), repaired
//! through the `touched` hash (a gap), or covered by a flush (a new epoch, a
//! Redis that does not answer on pub/sub); a repair that cannot be read
//! flushes everything instead.

pub mod local;
pub mod message;
pub mod sequence;
pub mod stats;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisResult};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use self::local::{Dropped, Load, LocalCache, LocalCacheBuilder};
pub use self::stats::{LATENCY_BUCKETS_SECONDS, Snapshot, Stats};
use crate::change::Lsn;

/// The channel evictd publishes on unless configured otherwise.
pub const DEFAULT_CHANNEL: &str = "evictd:invalidations";

/// What the subscriber reads (evictd's `broadcast_transport` must include it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `SUBSCRIBE C`: immediate and cheap; messages sent while disconnected
    /// are lost: a reconnection checks `:epoch`/`:seq` and repairs the gap
    /// through `touched`, and a Redis that does not answer flushes. Needs a
    /// Redis TTL at least as long as the local one.
    PubSub,
    /// `XREAD` from the last entry ID: a reconnection replays what it
    /// missed; only a fall behind the stream's retained length is a gap.
    Stream,
}

/// Where the channel lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Servers {
    Standalone(String),
    /// The cluster's node URLs. Pub/sub is read from one node (a `PUBLISH`
    /// reaches every node of a cluster), the keys and the stream through
    /// cluster routing (they share the hash tag `{C}`).
    Cluster(Vec<String>),
}

/// A subscriber's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    pub servers: Servers,
    /// evictd's `broadcast_channel`.
    pub channel: String,
    pub transport: Transport,
    /// evictd's `broadcast_heartbeat_ms`: three without a message on pub/sub
    /// is a lost connection; a stream read blocks this long.
    pub heartbeat: Duration,
    /// Longest wait for a connection or a reply.
    pub timeout: Duration,
    /// The CA bundle (and client certificate) of `rediss://` servers: the
    /// same as evictd's `tls_ca_file` … for the target (`crate::redis_tls`).
    pub tls: Option<crate::redis_tls::RedisTls>,
}

impl SubscriberConfig {
    pub fn new(servers: Servers, transport: Transport) -> SubscriberConfig {
        SubscriberConfig {
            servers,
            channel: DEFAULT_CHANNEL.to_owned(),
            transport,
            heartbeat: Duration::from_millis(1000),
            timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// Why a subscriber does not start.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error(
        "the local TTL (up to {local:?}) is longer than the Redis TTL ({redis:?}; set it with \
         LocalCacheBuilder::redis_ttl): refused on the pub/sub transport, where a lost message \
         leaves a local entry stale until it expires; shorten the local TTL or read the stream"
    )]
    LocalTtlAboveRedisTtl { local: Duration, redis: Option<Duration> },
    #[error("channel `{0}` contains `}}`: its keys' hash tag would not be the channel (evictd refuses it too)")]
    BadChannel(String),
    #[error("{what}: {source}")]
    Redis {
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
}

/// The names of one channel's keys (`docs/broadcast.md`, "Keys"), all in
/// the hash slot of `{C}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelKeys {
    pub channel: String,
    pub seq: String,
    pub epoch: String,
    pub stream: String,
    pub applied: String,
    pub touched: String,
}

/// The `touched` field of messages with tags.
pub use crate::layout::TOUCHED_TAGS;

impl ChannelKeys {
    /// The names the daemon publishes under ([`crate::layout::BroadcastKeys`]).
    pub fn of(channel: &str) -> ChannelKeys {
        let crate::layout::BroadcastKeys { seq, epoch, stream, applied, touched, .. } =
            crate::layout::BroadcastKeys::of(channel);
        ChannelKeys { channel: channel.to_owned(), seq, epoch, stream, applied, touched }
    }
}

/// A connection for plain commands, reconnecting by itself.
#[derive(Clone)]
enum Conn {
    One(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn connect(
        servers: &Servers,
        tls: Option<&crate::redis_tls::RedisTls>,
        response_timeout: Duration,
        timeout: Duration,
    ) -> RedisResult<Conn> {
        match servers {
            Servers::Standalone(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response_timeout))
                    .set_connection_timeout(Some(timeout))
                    .set_number_of_retries(1);
                let client = crate::redis_tls::client(url, tls)?;
                Ok(Conn::One(client.get_connection_manager_with_config(config).await?))
            }
            Servers::Cluster(urls) => {
                let client = crate::redis_tls::cluster(urls.iter().map(String::as_str), tls)?
                    .response_timeout(response_timeout)
                    .connection_timeout(timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Conn::One(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }
}

/// How far the subscriber got: the last `(epoch, seq)` handled and the
/// highest applied position seen, each published after the drops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Progress {
    epoch: Option<String>,
    seq: u64,
    applied: Option<Lsn>,
    /// The reader is in place (subscribed, or its stream start read).
    ready: bool,
}

/// A running subscriber: one task reading the channel and dropping what
/// it names from a [`LocalCache`]. Stops when [`Subscriber::stop`]ped or
/// dropped.
pub struct Subscriber {
    keys: ChannelKeys,
    conn: Conn,
    progress: watch::Receiver<Progress>,
    poll: Duration,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Subscriber {
    /// Checks the settings, connects, and starts reading; returns once the
    /// reader is in place (or after twice `config.timeout`, reading on).
    /// The local cache is flushed first: it cannot know what it missed
    /// before.
    pub async fn start<V: Clone + Send + Sync + 'static>(
        config: SubscriberConfig,
        cache: LocalCache<V>,
    ) -> Result<Subscriber, SubscriberError> {
        if config.transport == Transport::PubSub && cache.redis_ttl().is_none_or(|redis| cache.max_ttl() > redis) {
            return Err(SubscriberError::LocalTtlAboveRedisTtl { local: cache.max_ttl(), redis: cache.redis_ttl() });
        }
        if config.channel.contains('}') {
            return Err(SubscriberError::BadChannel(config.channel));
        }
        let conn = Conn::connect(&config.servers, config.tls.as_ref(), config.timeout, config.timeout)
            .await
            .map_err(|source| SubscriberError::Redis { what: "connecting to the channel's Redis", source })?;
        let keys = ChannelKeys::of(&config.channel);
        let (progress_tx, mut progress) = watch::channel(Progress::default());
        cache.flush();
        let (stop, stop_rx) = watch::channel(false);
        let stats = cache.stats();
        let poll = config.heartbeat.min(Duration::from_millis(200));
        let config_timeout = config.timeout;
        let worker = worker::Worker::new(config, keys.clone(), conn.clone(), cache, progress_tx);
        let task = tokio::spawn(worker.run(stop_rx));
        let _ = tokio::time::timeout(config_timeout * 2, progress.wait_for(|p| p.ready)).await;
        Ok(Subscriber { keys, conn, progress, poll, stop, task: Some(task), stats })
    }

    /// Waits until evictd has applied `lsn` (a Postgres LSN the application
    /// read with `SELECT pg_current_wal_lsn()` after its `COMMIT`) **and**
    /// this subscriber has dropped what evictd invalidated up to it.
    /// `false` after `timeout`: read from the database directly.
    ///
    /// It reads the channel's `applied` hash first (with the `seq` that
    /// covers it, then waits until this subscriber handled that `seq`),
    /// then follows heartbeats and batch messages, reading the hash again
    /// every `min(heartbeat, 200 ms)`.
    pub async fn wait_applied(&self, lsn: Lsn, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut progress = self.progress.clone();
        let mut target: Option<(String, u64)> = None;
        loop {
            {
                let now = progress.borrow_and_update();
                if now.applied.is_some_and(|a| a >= lsn) {
                    return true;
                }
                if let Some((epoch, seq)) = &target
                    && now.epoch.as_ref() == Some(epoch)
                    && now.seq >= *seq
                {
                    return true;
                }
            }
            if target.is_none() {
                target = self.applied_in_redis(lsn).await;
                if target.is_some() {
                    continue;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = self.poll.min(deadline - now);
            tokio::select! {
                changed = progress.changed() => if changed.is_err() { return false },
                () = tokio::time::sleep(wait) => target = None,
            }
        }
    }

    /// When the `applied` hash is at or past `lsn`: the `(epoch, seq)` read
    /// after it, which this subscriber must reach to have dropped it all.
    async fn applied_in_redis(&self, lsn: Lsn) -> Option<(String, u64)> {
        let applied: Option<String> =
            self.conn.query(redis::cmd("HGET").arg(&self.keys.applied).arg("postgres")).await.ok()?;
        let applied: Lsn = applied?.parse().ok()?;
        if applied < lsn {
            return None;
        }
        let (epoch, seq): (Option<String>, Option<u64>) =
            self.conn.query(redis::cmd("MGET").arg(&self.keys.epoch).arg(&self.keys.seq)).await.ok()?;
        Some((epoch?, seq?))
    }

    /// The highest applied position seen in a message.
    pub fn applied(&self) -> Option<Lsn> {
        self.progress.borrow().applied
    }

    /// The counters of the subscriber and its local cache.
    pub fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }

    /// Stops reading and waits for the task to end.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Unix time in ms (0 before 1970).
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
