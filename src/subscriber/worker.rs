//! The subscriber's task: reads the channel over one transport and carries
//! out the [`Tracker`]'s decisions on the local cache.
//!
//! Pub/sub: SUBSCRIBE, *then* read `:epoch`/`:seq` (a message published in
//! between is both seen and counted, never lost unseen); silence for three
//! heartbeats reconnects and checks the keys again; a Redis that has not
//! answered for three heartbeats flushes the local cache (once per outage):
//! a shorter outage is repaired by the reconnection's check.
//!
//! Stream: the newest entry ID is read *before* the flush that starts the
//! reader, then `XREAD` from it; after a reconnection the reader continues
//! from the last ID it processed (counted as replays until it has caught
//! up); an empty blocking read checks `:epoch`/`:seq`, so a reset stream or
//! a trimmed-away part is seen on a quiet channel too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::local::LocalCache;
use super::message::{self, Batch, Message};
use super::sequence::{Decision, Tracker};
use super::stats::Stats;
use super::{ChannelKeys, Conn, Progress, Servers, SubscriberConfig, Transport, now_ms};

/// Entries read from the stream at once.
const STREAM_COUNT: usize = 512;

/// Pause between two connection attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

pub(super) struct Worker<V> {
    config: SubscriberConfig,
    keys: ChannelKeys,
    conn: Conn,
    cache: LocalCache<V>,
    stats: Arc<Stats>,
    tracker: Tracker,
    progress: watch::Sender<Progress>,
}

/// One stream entry: its ID and fields.
type Entry = (String, HashMap<String, Vec<u8>>);

/// A connection for blocking stream reads alone (a blocked `XREAD` holds
/// its connection), with a reply timeout longer than the block.
enum Reader {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl<V: Clone + Send + Sync + 'static> Worker<V> {
    pub(super) fn new(
        config: SubscriberConfig,
        keys: ChannelKeys,
        conn: Conn,
        cache: LocalCache<V>,
        progress: watch::Sender<Progress>,
    ) -> Worker<V> {
        let stats = cache.stats();
        Worker { config, keys, conn, cache, stats, tracker: Tracker::new(), progress }
    }

    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let run = async {
            match self.config.transport {
                Transport::PubSub => self.run_pubsub().await,
                Transport::Stream => self.run_stream().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => {}
            () = run => {}
        }
    }

    // ---- pub/sub ----

    async fn run_pubsub(&mut self) {
        let silence = self.config.heartbeat * 3;
        let (mut connected_once, mut outage_flushed) = (false, false);
        // The last sign of a live channel (a message, a connection): an
        // outage shorter than the silence rule's three heartbeats is
        // repaired by the reconnection's check of `:epoch` and `:seq`.
        let mut heard = Instant::now();
        loop {
            let connected = match self.subscribe().await {
                Ok(pubsub) => self.check_keys().await.map(|()| pubsub),
                Err(e) => Err(e),
            };
            let mut pubsub = match connected {
                Ok(pubsub) => pubsub,
                Err(e) => {
                    // Redis has not answered for three heartbeats: what is
                    // published meanwhile may be lost to us, so nothing
                    // local can be trusted (docs/broadcast.md).
                    if !outage_flushed && (!connected_once || heard.elapsed() >= silence) {
                        warn!(error = %e, "evictd broadcast: Redis does not answer; local cache flushed");
                        self.flush();
                        outage_flushed = true;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            if connected_once {
                self.stats.reconnect();
            }
            (connected_once, outage_flushed) = (true, false);
            heard = Instant::now();
            let mut messages = pubsub.on_message();
            loop {
                match tokio::time::timeout(silence, messages.next()).await {
                    Ok(Some(msg)) => {
                        heard = Instant::now();
                        self.handle(msg.get_payload_bytes()).await;
                    }
                    Ok(None) => {
                        debug!("evictd broadcast: pub/sub connection lost; reconnecting");
                        break;
                    }
                    Err(_) => {
                        debug!("evictd broadcast: no message for three heartbeats; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    /// A pub/sub connection to one node, subscribed to the channel.
    async fn subscribe(&self) -> RedisResult<PubSub> {
        let urls = match &self.config.servers {
            Servers::Standalone(url) => std::slice::from_ref(url),
            Servers::Cluster(urls) => urls.as_slice(),
        };
        let mut last = None;
        for url in urls {
            let attempt = async {
                let mut pubsub = crate::redis_tls::client(url, self.config.tls.as_ref())?.get_async_pubsub().await?;
                pubsub.subscribe(&self.keys.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(self.config.timeout, attempt).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(timed_out("SUBSCRIBE")),
            }
        }
        Err(last.unwrap_or_else(|| timed_out("no Redis URL")))
    }

    /// Reads `:epoch` and `:seq` and acts on them as on a heartbeat (or
    /// flushes when they are gone).
    async fn check_keys(&mut self) -> RedisResult<()> {
        let (epoch, seq): (Option<String>, Option<u64>) =
            self.conn.query(redis::cmd("MGET").arg(&self.keys.epoch).arg(&self.keys.seq)).await?;
        let decision = match (epoch, seq) {
            (Some(epoch), Some(seq)) => self.tracker.heartbeat(&epoch, seq),
            _ => self.tracker.keys_lost(),
        };
        self.act(decision, None).await;
        self.publish_progress(None);
        Ok(())
    }

    // ---- stream ----

    async fn run_stream(&mut self) {
        let mut last_id: Option<String> = None;
        let mut connected_once = false;
        loop {
            let reader = match self.reader().await {
                Ok(reader) => reader,
                Err(e) => {
                    debug!(error = %e, "evictd broadcast: stream connection failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            let mut reader = reader;
            let mut catching_up = connected_once;
            if connected_once {
                self.stats.reconnect();
            }
            connected_once = true;
            loop {
                let id = match &last_id {
                    Some(id) => id.clone(),
                    None => match self.stream_start(&mut reader).await {
                        Ok(id) => {
                            last_id = Some(id.clone());
                            id
                        }
                        Err(_) => break,
                    },
                };
                let block = (!catching_up).then_some(self.config.heartbeat);
                let entries = match xread(&mut reader, &self.keys.stream, &id, block).await {
                    Ok(entries) => entries,
                    Err(e) => {
                        debug!(error = %e, "evictd broadcast: stream read failed; reconnecting");
                        break;
                    }
                };
                if entries.is_empty() {
                    catching_up = false;
                    match self.stream_quiet(&mut reader, &id).await {
                        Ok(Some(restart)) => last_id = restart,
                        Ok(None) => {}
                        Err(_) => break,
                    }
                    continue;
                }
                if catching_up {
                    self.stats.replayed(entries.len() as u64);
                }
                for (id, fields) in entries {
                    self.handle(fields.get("m").map_or(&[][..], Vec::as_slice)).await;
                    last_id = Some(id);
                }
            }
        }
    }

    async fn reader(&self) -> RedisResult<Reader> {
        // The reply of a blocked XREAD comes after the block.
        let response = self.config.heartbeat + self.config.timeout;
        let connect = async {
            match &self.config.servers {
                Servers::Standalone(url) => {
                    let config = AsyncConnectionConfig::new()
                        .set_response_timeout(Some(response))
                        .set_connection_timeout(Some(self.config.timeout));
                    let client = crate::redis_tls::client(url, self.config.tls.as_ref())?;
                    Ok(Reader::One(client.get_multiplexed_async_connection_with_config(&config).await?))
                }
                Servers::Cluster(urls) => {
                    let client = crate::redis_tls::cluster(urls.iter().map(String::as_str), self.config.tls.as_ref())?
                        .response_timeout(response)
                        .connection_timeout(self.config.timeout)
                        .build()?;
                    Ok(Reader::Cluster(client.get_async_connection().await?))
                }
            }
        };
        tokio::time::timeout(self.config.timeout * 2, connect).await.unwrap_or_else(|_| Err(timed_out("connect")))
    }

    /// Where a reader with nothing to continue from starts: the newest
    /// entry's ID, read *before* the local cache is flushed, so every
    /// invalidation after the flush is in an entry after that ID.
    async fn stream_start(&mut self, reader: &mut Reader) -> RedisResult<String> {
        let newest: Vec<Entry> =
            reader.query(redis::cmd("XREVRANGE").arg(&self.keys.stream).arg("+").arg("-").arg("COUNT").arg(1)).await?;
        let (epoch, seq): (Option<String>, Option<u64>) =
            self.conn.query(redis::cmd("MGET").arg(&self.keys.epoch).arg(&self.keys.seq)).await?;
        self.cache.flush();
        self.tracker.reset();
        let newest = newest.into_iter().next();
        let start = newest.as_ref().and_then(|(_, fields)| match message::parse(fields.get("m")?) {
            Ok(Message::Batch(b)) => Some((b.epoch, b.seq)),
            _ => None,
        });
        if let Some((epoch, seq)) = start.or(epoch.zip(seq)) {
            self.tracker.heartbeat(&epoch, seq);
        }
        self.publish_progress(None);
        Ok(newest.map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }

    /// After an empty blocking read: `:epoch` and `:seq` tell a reset stream
    /// (flush, start again: `Some(None)`) or entries this reader cannot see
    /// (trimmed away, or published on pub/sub alone: a gap, repaired).
    async fn stream_quiet(&mut self, reader: &mut Reader, id: &str) -> RedisResult<Option<Option<String>>> {
        let (epoch, seq): (Option<String>, Option<u64>) =
            self.conn.query(redis::cmd("MGET").arg(&self.keys.epoch).arg(&self.keys.seq)).await?;
        let Some(((epoch, seq), (ours, last))) = epoch.zip(seq).zip(self.tracker.position()) else {
            return Ok(None);
        };
        if epoch != ours {
            self.stats.flush();
            return Ok(Some(None));
        }
        if seq <= last {
            return Ok(None);
        }
        // Entries published since the empty read are in the stream already
        // (one script writes `:seq` and the entry): read them first.
        let entries = xread(reader, &self.keys.stream, id, None).await?;
        let mut last_id = None;
        for (id, fields) in entries {
            self.handle(fields.get("m").map_or(&[][..], Vec::as_slice)).await;
            last_id = Some(id);
        }
        let decision = self.tracker.heartbeat(&epoch, seq);
        self.act(decision, None).await;
        self.publish_progress(None);
        Ok(last_id.map(Some))
    }

    // ---- both ----

    /// One message body, from either transport.
    async fn handle(&mut self, body: &[u8]) {
        let message = match message::parse(body) {
            Ok(message) => message,
            Err(e) => {
                warn!(error = %e, "evictd broadcast: unreadable message; local cache flushed");
                self.flush();
                return;
            }
        };
        match message {
            Message::Batch(batch) => {
                let decision = self.tracker.batch(&batch.epoch, batch.seq);
                self.act(decision, Some(&batch)).await;
                self.publish_progress(batch.applied);
            }
            Message::Heartbeat(heartbeat) => {
                let decision = self.tracker.heartbeat(&heartbeat.epoch, heartbeat.seq);
                self.act(decision, None).await;
                self.publish_progress(heartbeat.applied);
            }
            Message::UnknownVersion => {
                warn!("evictd broadcast: a message of an unknown format version; local cache flushed");
                self.flush();
            }
            Message::UnknownKind => {}
        }
    }

    async fn act(&mut self, decision: Decision, batch: Option<&Batch>) {
        match decision {
            Decision::Apply => {
                if let Some(batch) = batch {
                    self.apply(batch).await;
                }
            }
            Decision::Ignore => {}
            Decision::Gap { last, apply } => {
                self.stats.gap();
                self.repair(last).await;
                if let (true, Some(batch)) = (apply, batch) {
                    self.apply(batch).await;
                }
            }
            Decision::Flush => self.flush(),
        }
    }

    /// Drops what one batch invalidated, and records its latency.
    async fn apply(&self, batch: &Batch) {
        self.cache.drop_keys(&batch.keys).await;
        self.cache.drop_tags(&batch.tags).await;
        self.cache.drop_caches(&batch.flush);
        self.stats.invalidation_applied();
        if let Some(from) = batch.committed_at_ms.or(batch.published_at_ms) {
            self.stats.latency(Duration::from_millis(now_ms().saturating_sub(from)));
        }
    }

    /// A gap after `last`: drops the caches (and tagged entries) that
    /// `touched` says were invalidated since; everything if it cannot be read.
    async fn repair(&self, last: u64) {
        let touched: RedisResult<HashMap<String, u64>> =
            self.conn.query(redis::cmd("HGETALL").arg(&self.keys.touched)).await;
        let touched = match touched {
            Ok(touched) => touched,
            Err(e) => {
                warn!(error = %e, "evictd broadcast: a gap, and `touched` cannot be read; local cache flushed");
                self.flush();
                return;
            }
        };
        let (caches, all_tags) = super::sequence::repair_plan(&touched, last);
        debug!(after = last, caches = ?caches, "evictd broadcast: gap repaired");
        self.cache.drop_caches(&caches);
        if all_tags {
            self.cache.drop_tagged();
        }
    }

    fn flush(&self) {
        self.stats.flush();
        self.cache.flush();
    }

    /// Publishes the tracker's position and a raised applied position, after
    /// the drops they stand for.
    fn publish_progress(&self, applied: Option<super::Lsn>) {
        let (epoch, seq) = match self.tracker.position() {
            Some((epoch, seq)) => (Some(epoch.to_owned()), seq),
            None => (None, 0),
        };
        self.progress.send_modify(|p| {
            p.epoch = epoch;
            p.seq = seq;
            p.applied = p.applied.max(applied);
            p.ready = true;
        });
    }
}

impl Reader {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Reader::One(c) => cmd.query_async(c).await,
            Reader::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// `XREAD [BLOCK ms] COUNT n STREAMS stream id`: the entries after `id`.
async fn xread(reader: &mut Reader, stream: &str, id: &str, block: Option<Duration>) -> RedisResult<Vec<Entry>> {
    let mut cmd = redis::cmd("XREAD");
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block.as_millis() as u64);
    }
    cmd.arg("COUNT").arg(STREAM_COUNT).arg("STREAMS").arg(stream).arg(id);
    let reply: Option<Vec<(String, Vec<Entry>)>> = reader.query(&cmd).await?;
    Ok(reply.into_iter().flatten().flat_map(|(_, entries)| entries).collect())
}

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}
