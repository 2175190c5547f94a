//! The Kafka source: Debezium change events from a consumer group.
//!
//! Each message is one transaction for the run loop (`Begin`, its change if
//! it is one, `Commit`); messages that are not row changes (tombstones,
//! transaction metadata, heartbeats, ignored snapshot reads) are empty
//! transactions, so that their offsets flow through the same watermark.
//!
//! **Delivery guarantee.** `enable.auto.offset.store=false`: an offset is
//! *stored* (and then committed by librdkafka's auto-commit, and
//! synchronously on revocation and shutdown) only in [`Source::acknowledge`],
//! which the run loop calls with the contiguous watermark of confirmed
//! batches. Positions carry the order this session delivered messages in
//! (`seq`, across partitions); acknowledging one stores, for every partition,
//! the offset after the last message delivered up to it. Per-partition order
//! is the broker's. A message of a partition revoked meanwhile is still
//! applied (idempotent) but its offset is no longer ours to store: the new
//! owner starts from the last commit, so nothing is skipped.
//!
//! **Versions.** A Kafka position's bump version is the source's commit
//! time in µs, kept strictly rising within this consumer (`max(last + 1,
//! ts_us)`), and the Redis sink raises versions past what is stored for
//! such positions ([`Position::exact_versions`]).
//!
//! **Bad messages** (not JSON, not a Debezium event, a value that cannot be
//! decoded) go to the dead-letter topic with their original key, value and
//! headers and the error in `evictd.error` — produced and acknowledged by
//! the broker before the message's offset can move — or stop the daemon
//! (`dead_letter.on_error = "stop"`) without storing the offset.
//!
//! **Cancel safety** ([`Source`]'s contract). `next()` is dropped by the run
//! loop's `select!` at any await. The consumer's `recv` is cancel-safe; the
//! only other await, a dead-letter send, is a future owned by the source
//! (`held`): a dropped `next()` leaves it there, the next call awaits the
//! same send, and the message's events (`Begin`, `Commit`) and its place
//! in the delivered queue appear only once the broker has the letter.

mod dead_letters;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use serde_json::Value as Json;

pub use self::dead_letters::{DeadLetterMessage, KafkaDeadLetters};
use super::debezium::{self, DecodeOptions, Decoded, TableKeys};
use super::{Source, SourceError, SourceEvent};
use crate::change::Position;
use crate::config::{KafkaSource as KafkaConfig, SnapshotReads};
use crate::dead_letter::OnError;
use crate::metrics::Metrics;

/// librdkafka defaults evictd chooses (each can be overridden in
/// `source.kafka.properties`).
const DEFAULT_PROPERTIES: &[(&str, &str)] = &[
    // A new group reads what the topics retain rather than skip it.
    ("auto.offset.reset", "earliest"),
    ("auto.commit.interval.ms", "1000"),
    ("statistics.interval.ms", "5000"),
];

/// The client configuration of the consumer (and, with `group.id` and the
/// consumer-only settings left out, of the dead-letter producer).
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in DEFAULT_PROPERTIES {
        client.set(*key, *value);
    }
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("enable.partition.eof", "false");
    client
}

/// Rebalances, statistics and librdkafka's logs.
pub struct KafkaContext {
    metrics: Arc<Metrics>,
    /// Partitions currently assigned to this consumer.
    assigned: Mutex<HashSet<(String, i32)>>,
}

impl KafkaContext {
    fn assigned(&self) -> std::sync::MutexGuard<'_, HashSet<(String, i32)>> {
        // A panic while holding this lock cannot leave the set half-updated
        // in a way that matters (it only feeds the lag gauge).
        self.assigned.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }

    fn stats(&self, statistics: Statistics) {
        let assigned = self.assigned();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && assigned.contains(&(topic.clone(), *partition)) && p.consumer_lag_stored >= 0 {
                    self.metrics.kafka_lag(topic, *partition, Some(p.consumer_lag_stored));
                }
            }
        }
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                self.metrics.kafka_rebalance("revoke");
                // What is stored was confirmed: commit it now, so that the
                // partitions' next owner starts right after it.
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    // Nothing stored since the last commit, or the group is
                    // gone: the next owner repeats some work, never skips.
                    tracing::debug!(error = %e, "no commit before the revocation");
                }
                let mut assigned = self.assigned();
                for element in list.elements() {
                    assigned.remove(&(element.topic().to_owned(), element.partition()));
                    self.metrics.kafka_lag(element.topic(), element.partition(), None);
                }
                tracing::info!(partitions = %describe(list), "partitions revoked");
            }
            Rebalance::Assign(list) => {
                self.metrics.kafka_rebalance("assign");
                let mut assigned = self.assigned();
                for element in list.elements() {
                    assigned.insert((element.topic().to_owned(), element.partition()));
                }
                tracing::info!(partitions = %describe(list), "partitions assigned");
            }
            Rebalance::Error(e) => {
                self.metrics.kafka_rebalance("error");
                tracing::warn!(error = %e, "rebalance failed");
            }
        }
    }
}

/// `topic/0,topic/1` for logs.
fn describe(list: &TopicPartitionList) -> String {
    list.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect::<Vec<_>>().join(",")
}

/// A message delivered to the run loop and not yet acknowledged.
#[derive(Debug)]
struct Delivered {
    seq: u64,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
}

/// A Kafka source session: one consumer-group member.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<KafkaContext>>,
    config: KafkaConfig,
    /// The graph's key columns: a delete's identity when its key names none.
    table_keys: Arc<TableKeys>,
    on_error: OnError,
    dead_letters: Arc<KafkaDeadLetters>,
    metrics: Arc<Metrics>,
    /// Events of the message being handed over (Begin, Change, Commit).
    queue: VecDeque<SourceEvent>,
    /// A message whose events wait for its dead letter to be sent.
    held: Option<(Held, DeadLetterSend)>,
    delivered: VecDeque<Delivered>,
    next_seq: u64,
    last_version: u64,
    /// The highest offset stored per partition (the next one to read).
    stored: HashMap<(Arc<str>, i32), i64>,
    topics: HashMap<String, Arc<str>>,
    retry_max: Duration,
}

impl KafkaSource {
    /// Creates the consumer and subscribes; the group is joined on the
    /// first read.
    pub fn start(
        config: &KafkaConfig,
        table_keys: Arc<TableKeys>,
        on_error: OnError,
        dead_letters: Arc<KafkaDeadLetters>,
        metrics: Arc<Metrics>,
        retry_max: Duration,
    ) -> Result<KafkaSource, SourceError> {
        let context = KafkaContext { metrics: metrics.clone(), assigned: Mutex::new(HashSet::new()) };
        let consumer: StreamConsumer<KafkaContext> = client_config(config)
            .create_with_context(context)
            .map_err(|e| SourceError::Definite(format!("source.kafka: cannot create the consumer: {e}")))?;
        let mut topics: Vec<String> = config.topics.clone();
        if let Some(pattern) = &config.topic_pattern {
            // librdkafka reads a subscription starting with `^` as a regex.
            topics.push(if pattern.starts_with('^') { pattern.clone() } else { format!("^{pattern}") });
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| SourceError::Definite(format!("source.kafka: cannot subscribe to {names:?}: {e}")))?;
        tracing::info!(group = %config.group_id, topics = ?names, "subscribed");
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            config: config.clone(),
            table_keys,
            on_error,
            dead_letters,
            metrics,
            queue: VecDeque::new(),
            held: None,
            delivered: VecDeque::new(),
            next_seq: 1,
            last_version: 0,
            stored: HashMap::new(),
            topics: HashMap::new(),
            retry_max,
        })
    }

    /// Commits what is stored and leaves the group (its partitions move
    /// to the other members at once, not after the session timeout).
    pub async fn shutdown(self) {
        let consumer = self.consumer.clone();
        let done = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "nothing to commit at shutdown");
            }
            consumer.unsubscribe();
        });
        let _ = done.await;
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.topics.get(name) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(name);
        self.topics.insert(name.to_owned(), t.clone());
        t
    }

    /// Turns one message into the events of its transaction: queued at
    /// once, or held in [`KafkaSource::held`] until the message's dead
    /// letter is acknowledged. Nothing here awaits, so a dropped `next()`
    /// can never leave part of a message's events behind.
    fn on_message(&mut self, message: &BorrowedMessage<'_>) -> Result<(), SourceError> {
        let topic = self.topic(message.topic());
        let (partition, offset) = (message.partition(), message.offset());
        let seq = self.next_seq;
        self.next_seq += 1;
        let delivered = Delivered { seq, topic: topic.clone(), partition, offset };
        let decoded = decode_message(message, &self.config, &self.table_keys);
        let commit_time_micros = match &decoded {
            Ok(Decoded::Change(c) | Decoded::SnapshotRead(c)) => c.commit_time_micros,
            _ => None,
        };
        let version = next_version(self.last_version, commit_time_micros);
        self.last_version = version;
        let position = Position::Kafka { topic: topic.clone(), partition, offset, seq, version };
        let mut events = Vec::with_capacity(3);
        events.push(SourceEvent::Begin);
        let mut send = None;
        match decoded {
            Ok(Decoded::Change(mut change)) => {
                self.metrics.kafka_message(&topic, op_label(change.op));
                change.position = position.clone();
                events.push(SourceEvent::Change(change));
            }
            Ok(Decoded::SnapshotRead(mut change)) => {
                self.metrics.kafka_message(&topic, "r");
                if self.config.snapshot_reads == SnapshotReads::Invalidate {
                    change.position = position.clone();
                    events.push(SourceEvent::Change(change));
                }
            }
            Ok(Decoded::Ignored(what)) => self.metrics.kafka_message(&topic, what.as_str()),
            Err(error) => {
                self.metrics.kafka_message(&topic, "invalid");
                if self.on_error == OnError::Stop {
                    tracing::error!(%position, error, "cannot decode this message; stopping without acknowledging it (on_error = stop)");
                    return Err(SourceError::Definite(format!(
                        "cannot decode the message at {position}: {error}; stopping without acknowledging it (dead_letter.on_error = \"stop\")"
                    )));
                }
                let letter = DeadLetterMessage::from_message(message, "decode", &error);
                send = Some(Box::pin(send_dead_letter(
                    self.dead_letters.clone(),
                    self.metrics.clone(),
                    letter,
                    position.clone(),
                    error,
                    self.retry_max,
                )) as DeadLetterSend);
            }
        }
        events.push(SourceEvent::Commit { position, commit_time_micros });
        let held = Held { events, delivered };
        match send {
            None => self.release(held),
            Some(send) => self.held = Some((held, send)),
        }
        Ok(())
    }

    /// Makes a message's events visible, all at once.
    fn release(&mut self, held: Held) {
        self.delivered.push_back(held.delivered);
        self.queue.extend(held.events);
    }

    /// Stores, per partition, the offset after the last message delivered
    /// up to `seq`.
    fn store_up_to(&mut self, seq: u64) {
        let mut next: HashMap<(Arc<str>, i32), i64> = HashMap::new();
        while self.delivered.front().is_some_and(|d| d.seq <= seq) {
            if let Some(d) = self.delivered.pop_front() {
                let entry = next.entry((d.topic, d.partition)).or_insert(d.offset + 1);
                *entry = (*entry).max(d.offset + 1);
            }
        }
        for ((topic, partition), offset) in next {
            let stored = self.stored.entry((topic.clone(), partition)).or_insert(-1);
            if offset <= *stored {
                continue;
            }
            // The offset to resume from (librdkafka's `store_offset` would
            // add one to it: it takes a message's offset).
            let mut list = TopicPartitionList::with_capacity(1);
            if let Err(e) = list.add_partition_offset(&topic, partition, rdkafka::Offset::Offset(offset)) {
                tracing::warn!(%topic, partition, offset, error = %e, "cannot name the offset to store");
                continue;
            }
            match self.consumer.store_offsets(&list) {
                Ok(()) => *stored = offset,
                // Revoked meanwhile: the partition's new owner starts from
                // the last commit and repeats this work.
                Err(e) => {
                    tracing::debug!(%topic, partition, offset, error = %e, "offset not stored (partition not assigned)")
                }
            }
        }
    }
}

/// The send of one dead letter, owned by the source so that it survives a
/// dropped `next()`.
type DeadLetterSend = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A message's events, not yet visible to the run loop.
struct Held {
    events: Vec<SourceEvent>,
    delivered: Delivered,
}

/// Sends a message that cannot be decoded to the dead-letter topic,
/// retrying until the broker has it (the source is paused meanwhile).
async fn send_dead_letter(
    dead_letters: Arc<KafkaDeadLetters>,
    metrics: Arc<Metrics>,
    letter: DeadLetterMessage,
    position: Position,
    error: String,
    retry_max: Duration,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match dead_letters.send(&letter).await {
            Ok(()) => break,
            Err(e) => {
                metrics.dead_letter_write_error("transient");
                tracing::warn!(%position, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot write to the dead-letter topic; retrying (the source is paused)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(retry_max);
            }
        }
    }
    if let Position::Kafka { topic, .. } = &position {
        metrics.kafka_dead_lettered(topic, "decode");
    }
    tracing::warn!(%position, error, topic = dead_letters.topic(), "dead-lettered a message that cannot be decoded; the partition goes on");
}

/// The op label of a change.
fn op_label(op: crate::change::Operation) -> &'static str {
    match op {
        crate::change::Operation::Insert => "c",
        crate::change::Operation::Update => "u",
        crate::change::Operation::Delete => "d",
        crate::change::Operation::Truncate => "t",
    }
}

/// The next bump version: the commit time in µs, strictly above the last.
fn next_version(last: u64, commit_time_micros: Option<i64>) -> u64 {
    let time = commit_time_micros.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
    time.max(last.saturating_add(1))
}

/// Decodes a message's key and value.
fn decode_message(
    message: &BorrowedMessage<'_>,
    config: &KafkaConfig,
    table_keys: &TableKeys,
) -> Result<Decoded, String> {
    let value: Option<Json> = match message.payload() {
        None | Some(b"") => None,
        Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|e| format!("the value is not JSON: {e}"))?),
    };
    // A key that is not JSON (a plain string key) names no columns.
    let key: Option<Json> = message.key().and_then(|k| serde_json::from_slice(k).ok());
    let options = DecodeOptions {
        table: config.tables.get(message.topic()).map(String::as_str),
        full_row_deletes: Some(&config.full_row_deletes),
        table_keys: Some(table_keys),
    };
    let placeholder = Position::File { line: 0 };
    debezium::decode(value.as_ref(), key.as_ref(), placeholder, &options).map_err(|e| e.to_string())
}

impl Source for KafkaSource {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            if let Some((_, send)) = self.held.as_mut() {
                // The send lives in `self`: a dropped `next()` leaves it
                // here, and the next call goes on awaiting the same send.
                send.as_mut().await;
                if let Some((held, _)) = self.held.take() {
                    self.release(held);
                }
                continue;
            }
            let consumer = self.consumer.clone();
            match consumer.recv().await {
                Ok(message) => self.on_message(&message)?,
                // librdkafka reconnects by itself; a fatal error ends the
                // session (a new consumer rejoins the group).
                Err(KafkaError::MessageConsumptionFatal(code)) => {
                    return Err(SourceError::Transient(format!("fatal consumer error: {code}")));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error; librdkafka retries");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn acknowledge(&mut self, position: &Position) -> Result<(), SourceError> {
        match position {
            Position::Kafka { seq, .. } => {
                self.store_up_to(*seq);
                Ok(())
            }
            other => Err(SourceError::Definite(format!("not a Kafka position: {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_commit_time_and_always_rise() {
        assert_eq!(next_version(0, Some(1_700_000_000_000_000)), 1_700_000_000_000_000);
        assert_eq!(next_version(1_700_000_000_000_000, Some(1_700_000_000_000_000)), 1_700_000_000_000_001);
        assert_eq!(next_version(1_700_000_000_000_005, Some(1_600_000_000_000_000)), 1_700_000_000_000_006);
        assert_eq!(next_version(7, None), 8);
        assert_eq!(next_version(7, Some(-5)), 8);
    }

    #[test]
    fn evictd_owns_the_offset_properties() {
        let mut config = KafkaConfig {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            topics: vec!["t".into()],
            topic_pattern: None,
            snapshot_reads: SnapshotReads::Ignore,
            full_row_deletes: Default::default(),
            tables: Default::default(),
            properties: Default::default(),
        };
        config.properties.insert("auto.offset.reset".into(), "latest".into());
        let client = client_config(&config);
        assert_eq!(client.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client.get("auto.offset.reset"), Some("latest"));
        assert_eq!(client.get("group.id"), Some("g"));
    }
}
