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
//! ts_us)`); like every bump, the Redis sink raises versions past what is
//! stored when that is not lower, and only counts such bumps for Kafka
//! ([`Position::exact_versions`]).
//!
//! **Bad messages** (not JSON, not a Debezium event, a value that cannot be
//! decoded, past a size cap or the time budget) are yielded as
//! [`SourceEvent::Undecodable`] with their original key, value and headers;
//! the run loop dead-letters them (to the dead-letter topic,
//! [`KafkaDeadLetters`]) before their offset can move, or stops. The source
//! itself holds no dead-letter policy.
//!
//! **Cancel safety** ([`Source`]'s contract). `next()` is dropped by the run
//! loop's `select!` at any await. Its only awaits are the consumer's `recv`
//! (cancel-safe) and a short sleep after a consumer error; a message is
//! decoded and its events queued, with its place in the delivered queue,
//! without an await in between.

mod dead_letters;
mod envelope;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use serde_json::Value as Json;

pub(crate) use self::dead_letters::{DeadLetterMessage, KafkaDeadLetters};
pub(crate) use self::envelope::Envelopes;
use self::envelope::Parsed;
use super::debezium::{self, DecodeOptions, Decoded, TableKeys};
use super::{RawMessage, Source, SourceError, SourceEvent, Undecodable, UndecodableReason};
use crate::change::{Change, Operation, Position};
use crate::config::{KafkaSource as KafkaConfig, OnOffsetReset, SnapshotReads};
use crate::metrics::{KafkaOffsets, Metrics};

/// librdkafka defaults evictd chooses (each can be overridden in
/// `source.kafka.properties`). `session.timeout.ms`: 10 s (Kafka's default
/// before 3.0) rather than librdkafka's 45 s, so that a replica that died
/// hands its partitions over sooner, and so that a rebalance on a broker
/// that waits on the session timeout (Tansu: half of it) does not hold a
/// new topic back for 23 s.
const DEFAULT_PROPERTIES: &[(&str, &str)] =
    &[("auto.commit.interval.ms", "1000"), ("statistics.interval.ms", "5000"), ("session.timeout.ms", "10000")];

/// `topic.metadata.refresh.interval.ms` with a `topic_pattern`: how soon a
/// new matching topic is seen. One metadata request per interval, which
/// brokers answer from memory.
const PATTERN_METADATA_REFRESH_MS: &str = "1000";

/// The client configuration of the consumer (and, with `group.id` and the
/// consumer-only settings left out, of the dead-letter producer).
pub(crate) fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in DEFAULT_PROPERTIES {
        client.set(*key, *value);
    }
    if config.topic_pattern.is_some() {
        // A new topic under the pattern (a table's first change) is found
        // at the next metadata refresh: librdkafka's default waits 5 min.
        client.set("topic.metadata.refresh.interval.ms", PATTERN_METADATA_REFRESH_MS);
    }
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("enable.partition.eof", "false")
        // A missing offset is an error event, never a silent jump: a
        // partition the group never committed is assigned from its
        // beginning explicitly (`KafkaContext::rebalance`), so this fires
        // only when a committed or consumed offset no longer exists.
        .set("auto.offset.reset", "error");
    client
}

/// `error` with the values of the secret properties among `properties`
/// cut out (`****`): librdkafka's configuration errors quote the value they
/// refused, and a client's creation error may quote what it read.
pub(crate) fn without_secrets(error: KafkaError, properties: &BTreeMap<String, String>) -> KafkaError {
    let hide = |text: &str| crate::config::hide_property_secrets(text, properties);
    match error {
        KafkaError::ClientConfig(code, description, key, value) => {
            // An unknown name may be a misspelt secret (`sasl.passwrd`):
            // its value is not needed to fix it.
            let unknown = code == rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN;
            let value =
                if unknown || crate::config::is_secret_property(&key) { "****".to_owned() } else { hide(&value) };
            KafkaError::ClientConfig(code, hide(&description), key, value)
        }
        KafkaError::ClientCreation(text) => KafkaError::ClientCreation(hide(&text)),
        other => other,
    }
}

/// How long a metadata request (committed offsets, watermarks, a seek) may
/// take inside the source.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets every partition of `assignment` that the group never committed to
/// start from its beginning (what `auto.offset.reset = earliest` did for a
/// new group), leaving the others at their committed offsets. Partitions
/// whose committed offsets cannot be read are left as they are: if they
/// have none, the offset-reset error that follows is handled as a gap
/// (stop or flush), the safe side.
fn start_uncommitted_at_beginning(consumer: &impl Consumer<KafkaContext>, assignment: &mut TopicPartitionList) {
    let committed = match consumer.committed_offsets(assignment.clone(), METADATA_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the group's committed offsets at assignment");
            return;
        }
    };
    for element in committed.elements() {
        if !matches!(element.offset(), rdkafka::Offset::Offset(_)) {
            let (topic, partition) = (element.topic(), element.partition());
            tracing::info!(%topic, partition, "no committed offset: reading the partition from its beginning");
            if let Err(e) = assignment.set_partition_offset(topic, partition, rdkafka::Offset::Beginning) {
                tracing::warn!(%topic, partition, error = %e, "cannot set the partition's start");
            }
        }
    }
}

/// The offset a partition resumes from after an offset-reset error, if its
/// next offset is gone: `next` is the offset it would read next (its
/// position this session, else the group's commit), `low..=high` what the
/// broker holds. `None`: this partition's offset still exists.
fn gap_resume_offset(next: Option<i64>, low: i64, high: i64) -> Option<i64> {
    match next {
        Some(n) if (low..=high).contains(&n) => None,
        _ => Some(low),
    }
}

/// One partition's offsets from librdkafka's statistics, where negative
/// means unknown (librdkafka's `-1001`, `-1`). All four come from the same
/// report, so that the lag is exactly the high watermark minus the
/// committed offset; before the group's first commit of the partition it
/// is counted from the offset stored for it (acknowledged, not committed
/// yet), and with neither it is unknown.
pub(crate) fn partition_offsets(app: i64, committed: i64, high: i64, stored: i64) -> KafkaOffsets {
    let known = |offset: i64| (offset >= 0).then_some(offset);
    let high_watermark = known(high);
    let acknowledged = known(committed).or(known(stored));
    KafkaOffsets {
        position: known(app),
        committed: known(committed),
        high_watermark,
        lag: high_watermark.zip(acknowledged).map(|(high, acknowledged)| high.saturating_sub(acknowledged).max(0)),
    }
}

/// Rebalances, statistics and librdkafka's logs.
pub(crate) struct KafkaContext {
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
                if *partition >= 0 && assigned.contains(&(topic.clone(), *partition)) {
                    let offsets = partition_offsets(p.app_offset, p.committed_offset, p.hi_offset, p.stored_offset);
                    self.metrics.kafka_partition(topic, *partition, Some(&offsets));
                }
            }
        }
    }
}

impl ConsumerContext for KafkaContext {
    /// librdkafka's own rebalance (as `rdkafka`'s default does it), with
    /// partitions the group never committed set to their beginning first.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                start_uncommitted_at_beginning(consumer, tpl);
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                let assigned = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, "cannot take the assigned partitions");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                let revoked = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = revoked {
                    tracing::error!(error = %e, "cannot give up the revoked partitions");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => {
                let rebalance = Rebalance::Error(KafkaError::Rebalance(other.into()));
                self.pre_rebalance(consumer, &rebalance);
                let revoked = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = revoked {
                    tracing::error!(error = %e, "cannot give up the partitions after a failed rebalance");
                }
                self.post_rebalance(consumer, &rebalance);
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
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
                    self.metrics.kafka_partition(element.topic(), element.partition(), None);
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
    metrics: Arc<Metrics>,
    /// Events of the message being handed over (Begin, Change, Commit; or
    /// Undecodable alone).
    queue: VecDeque<SourceEvent>,
    delivered: VecDeque<Delivered>,
    next_seq: u64,
    last_version: u64,
    /// The highest offset stored per partition (the next one to read).
    stored: HashMap<(Arc<str>, i32), i64>,
    topics: HashMap<String, Arc<str>>,
    /// Partitions whose next offset was gone, each waiting for the flush
    /// transaction (`seq`) that covers it to be acknowledged.
    gaps: Vec<Gap>,
    /// Set once a gap's flush is acknowledged and its resume offset
    /// committed: the session ends, and the next consumer starts there.
    restart: Option<String>,
    /// The Debezium schemas seen per topic (`envelope`).
    envelopes: Envelopes,
    /// `evictd_kafka_messages_total`'s counter per topic and op, looked up
    /// once rather than per message.
    message_counters: HashMap<(Arc<str>, &'static str), prometheus_client::metrics::counter::Counter>,
}

/// A partition whose next offset no longer exists (`on_offset_reset =
/// "flush"`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Gap {
    /// The flush transaction's `seq`.
    seq: u64,
    topic: Arc<str>,
    partition: i32,
    /// Where the partition resumes: the broker's earliest offset.
    resume: i64,
}

impl KafkaSource {
    /// Creates the consumer and subscribes; the group is joined on the
    /// first read.
    pub fn start(
        config: &KafkaConfig,
        table_keys: Arc<TableKeys>,
        metrics: Arc<Metrics>,
    ) -> Result<KafkaSource, SourceError> {
        let context = KafkaContext { metrics: metrics.clone(), assigned: Mutex::new(HashSet::new()) };
        let consumer: StreamConsumer<KafkaContext> = client_config(config)
            .create_with_context(context)
            .map_err(|e| SourceError::definite_from("source.kafka: cannot create the consumer", e))?;
        let mut topics: Vec<String> = config.topics.clone();
        if let Some(pattern) = &config.topic_pattern {
            // librdkafka reads a subscription starting with `^` as a regex.
            topics.push(if pattern.starts_with('^') { pattern.clone() } else { format!("^{pattern}") });
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| SourceError::definite_from(format!("source.kafka: cannot subscribe to {names:?}"), e))?;
        tracing::info!(group = %config.group_id, topics = ?names, "subscribed");
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            config: config.clone(),
            table_keys,
            metrics,
            queue: VecDeque::new(),
            delivered: VecDeque::new(),
            next_seq: 1,
            last_version: 0,
            stored: HashMap::new(),
            topics: HashMap::new(),
            gaps: Vec::new(),
            restart: None,
            envelopes: Envelopes::default(),
            message_counters: HashMap::new(),
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

    /// Counts one message of `topic` (`evictd_kafka_messages_total`).
    fn count_message(&mut self, topic: &Arc<str>, op: &'static str) {
        let metrics = &self.metrics;
        self.message_counters
            .entry((topic.clone(), op))
            .or_insert_with(|| metrics.kafka_message_counter(topic, op))
            .inc();
    }

    /// Turns one message into the events of its transaction (or into one
    /// `Undecodable` event), all queued at once with its place in the
    /// delivered queue. Nothing here awaits, so a dropped `next()` can
    /// never leave part of a message's events behind.
    fn on_message(&mut self, message: &BorrowedMessage<'_>) {
        let topic = self.topic(message.topic());
        let (partition, offset) = (message.partition(), message.offset());
        let seq = self.next_seq;
        self.next_seq += 1;
        self.delivered.push_back(Delivered { seq, topic: topic.clone(), partition, offset });
        let decoded = decode_message_with(
            &mut self.envelopes,
            message.topic(),
            message.key(),
            message.payload(),
            &self.config,
            &self.table_keys,
        );
        let commit_time_micros = match &decoded {
            Ok(Decoded::Change(c) | Decoded::SnapshotRead(c)) => c.commit_time_micros,
            _ => None,
        };
        let version = next_version(self.last_version, commit_time_micros);
        self.last_version = version;
        let position = Position::Kafka { topic: topic.clone(), partition, offset, seq, version };
        let change = match decoded {
            Ok(Decoded::Change(change)) => {
                self.count_message(&topic, op_label(change.op));
                Some(change)
            }
            Ok(Decoded::SnapshotRead(change)) => {
                self.count_message(&topic, "r");
                (self.config.snapshot_reads == SnapshotReads::Invalidate).then_some(change)
            }
            Ok(Decoded::Ignored(what)) => {
                self.count_message(&topic, what.as_str());
                None
            }
            Err(DecodeFailure { reason, error }) => {
                self.count_message(&topic, "invalid");
                let raw = raw_message(message);
                self.queue.push_back(SourceEvent::Undecodable(Undecodable { position, reason, error, raw }));
                return;
            }
        };
        self.queue.push_back(SourceEvent::Begin);
        if let Some(mut change) = change {
            change.position = position.clone();
            self.queue.push_back(SourceEvent::Change(change));
        }
        self.queue.push_back(SourceEvent::Commit { position, commit_time_micros });
    }

    /// A partition's next offset is gone: retention deleted messages the
    /// group never read (or the topic was recreated). Every one of them may
    /// have been a change, so: stop, or (`flush`) queue a transaction that
    /// truncates every table of the graph — every cache's namespace is
    /// bumped through the sinks — and resume the partition from its
    /// earliest offset only once that transaction is acknowledged.
    ///
    /// Blocking metadata requests run here, on the runtime's thread: this
    /// is rare, and keeping it free of awaits keeps `next()` cancel-safe.
    fn on_offset_reset(&mut self) -> Result<(), SourceError> {
        if self.config.on_offset_reset == OnOffsetReset::Stop {
            self.metrics.kafka_offset_reset("stop");
            let message = "a partition's next offset no longer exists on the broker (retention deleted messages \
                           the group had not read, or the topic was recreated): their changes can never be \
                           invalidated; stopping without acknowledging anything past them \
                           (source.kafka.on_offset_reset = \"stop\"; \"flush\" bumps every cache and resumes \
                           from the earliest offset)";
            tracing::error!("{message}");
            return Err(SourceError::definite(message));
        }
        let found = self.find_gaps();
        let Some((topic, partition, resume)) = found.first().cloned() else {
            return Err(SourceError::transient(
                "an offset-reset error that no assigned partition explains; rejoining the group",
            ));
        };
        self.metrics.kafka_offset_reset("flush");
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_version = next_version(self.last_version, None);
        let position = Position::Kafka { topic, partition, offset: resume, seq, version: self.last_version };
        for (topic, partition, resume) in found {
            tracing::warn!(%topic, partition, resume, "the partition's next offset is gone: bumping every cache, then resuming from the earliest offset (on_offset_reset = flush)");
            self.gaps.push(Gap { seq, topic, partition, resume });
        }
        let mut tables: Vec<&String> = self.table_keys.keys().collect();
        tables.sort();
        self.queue.push_back(SourceEvent::Begin);
        for table in tables {
            let mut change = Change::new(table, Operation::Truncate, None, None);
            change.position = position.clone();
            self.queue.push_back(SourceEvent::Change(change));
        }
        self.queue.push_back(SourceEvent::Commit { position, commit_time_micros: None });
        Ok(())
    }

    /// The assigned partitions whose next offset is gone, with where each
    /// resumes. A partition whose offsets cannot be read counts as gone
    /// (a flush too many, never one too few).
    fn find_gaps(&self) -> Vec<(Arc<str>, i32, i64)> {
        let assigned: Vec<(String, i32)> = self.consumer.context().assigned().iter().cloned().collect();
        let positions = self.consumer.position().ok();
        let mut list = TopicPartitionList::with_capacity(assigned.len());
        for (topic, partition) in &assigned {
            list.add_partition(topic, *partition);
        }
        let committed = self.consumer.committed_offsets(list, METADATA_TIMEOUT).ok();
        let offset_in = |list: Option<&TopicPartitionList>, topic: &str, partition: i32| match list
            .and_then(|l| l.find_partition(topic, partition))
            .map(|e| e.offset())
        {
            Some(rdkafka::Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let mut gaps = Vec::new();
        for (topic, partition) in assigned {
            if self.gaps.iter().any(|g| *g.topic == *topic && g.partition == partition) {
                continue;
            }
            let next = offset_in(positions.as_ref(), &topic, partition)
                .or_else(|| offset_in(committed.as_ref(), &topic, partition));
            let resume = match self.consumer.fetch_watermarks(&topic, partition, METADATA_TIMEOUT) {
                Ok((low, high)) => gap_resume_offset(next, low, high),
                Err(e) => {
                    tracing::warn!(%topic, partition, error = %e, "cannot read the partition's watermarks");
                    Some(0)
                }
            };
            if let Some(resume) = resume {
                gaps.push((Arc::from(topic.as_str()), partition, resume));
            }
        }
        gaps
    }

    /// Commits the resume offset of every gap whose flush is acknowledged
    /// (`seq` and before), then ends the session: a stopped partition
    /// starts again only with a new assignment.
    fn resume_gaps(&mut self, seq: u64) {
        let (done, waiting): (Vec<Gap>, Vec<Gap>) = self.gaps.drain(..).partition(|g| g.seq <= seq);
        self.gaps = waiting;
        if done.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::with_capacity(done.len());
        for gap in &done {
            if let Err(e) = list.add_partition_offset(&gap.topic, gap.partition, rdkafka::Offset::Offset(gap.resume)) {
                tracing::warn!(topic = %gap.topic, partition = gap.partition, error = %e, "cannot name the resume offset");
            }
            self.stored.insert((gap.topic.clone(), gap.partition), gap.resume);
        }
        if let Err(e) = self.consumer.store_offsets(&list) {
            tracing::debug!(error = %e, "resume offsets not stored (partition not assigned)");
        }
        let committed = self.consumer.commit(&list, CommitMode::Sync);
        let what = describe(&list);
        self.restart = Some(match committed {
            Ok(()) => format!("every cache was bumped for the gap in {what}; resuming from the earliest offsets"),
            // Not committed: the next consumer meets the gap again and
            // flushes again (a flush too many, never a loss).
            Err(e) => {
                format!("every cache was bumped for the gap in {what}, but its resume offset was not committed ({e})")
            }
        });
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

/// A message's key, value and headers, as received.
fn raw_message(message: &BorrowedMessage<'_>) -> RawMessage {
    RawMessage {
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default(),
    }
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

/// Why a message cannot become a change: the dead-letter reason and the
/// error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeFailure {
    pub(crate) reason: UndecodableReason,
    pub(crate) error: String,
}

/// Decodes a message's key and value, within the size caps and the time
/// budget of `config` (also `evictd dead-letters replay`'s, for the
/// letters of the dead-letter topic).
pub(crate) fn decode_message(
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    config: &KafkaConfig,
    table_keys: &TableKeys,
) -> Result<Decoded, DecodeFailure> {
    decode_message_with(&mut Envelopes::default(), topic, key, payload, config, table_keys)
}

/// [`decode_message`], reusing the schemas `envelopes` saw on the topic
/// (the source's own, across its messages).
pub(crate) fn decode_message_with(
    envelopes: &mut Envelopes,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    config: &KafkaConfig,
    table_keys: &TableKeys,
) -> Result<Decoded, DecodeFailure> {
    let size = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
    if size > config.max_message_bytes {
        return Err(DecodeFailure {
            reason: UndecodableReason::TooLarge,
            error: format!(
                "a message of {size} bytes is larger than source.kafka.max_message_bytes ({})",
                config.max_message_bytes
            ),
        });
    }
    let deadline = std::time::Instant::now() + config.max_decode;
    let value = match payload {
        None | Some(b"") => None,
        Some(bytes) => Some(envelopes.parse(topic, bytes).map_err(|e| DecodeFailure {
            reason: UndecodableReason::Decode,
            error: format!("the value is not JSON: {e}"),
        })?),
    };
    // A key that is not JSON (a plain string key) names no columns.
    let key: Option<Json> = key.and_then(|k| serde_json::from_slice(k).ok());
    let options = DecodeOptions {
        table: config.tables.get(topic).map(String::as_str),
        full_row_deletes: Some(&config.full_row_deletes),
        table_keys: Some(table_keys),
        max_value_bytes: Some(config.max_value_bytes),
        deadline: Some(deadline),
    };
    let placeholder = Position::File { line: 0 };
    let decoded = match &value {
        None => debezium::decode(None, key.as_ref(), placeholder, &options),
        Some(Parsed::Whole(json)) => debezium::decode(Some(json), key.as_ref(), placeholder, &options),
        Some(Parsed::Envelope { payload, schema }) => {
            debezium::decode_payload(payload, Some(schema), key.as_ref(), placeholder, &options)
        }
    };
    decoded.map_err(|e| DecodeFailure { reason: e.reason(), error: e.to_string() })
}

impl Source for KafkaSource {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        loop {
            if let Some(message) = self.restart.take() {
                return Err(SourceError::transient(message));
            }
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            let consumer = self.consumer.clone();
            match consumer.recv().await {
                Ok(message) => self.on_message(&message),
                // librdkafka reconnects by itself; a fatal error ends the
                // session (a new consumer rejoins the group).
                // A partition's next offset is gone (`auto.offset.reset =
                // error`): librdkafka stopped fetching it.
                Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)) => self.on_offset_reset()?,
                Err(KafkaError::MessageConsumptionFatal(code)) => {
                    return Err(SourceError::transient_from("fatal consumer error", code));
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
                self.resume_gaps(*seq);
                Ok(())
            }
            other => Err(SourceError::definite(format!("not a Kafka position: {other}"))),
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

    /// Issue 11, item 8: a message past `max_message_bytes` is not even
    /// parsed, and a value past `max_value_bytes` fails its decoding; both
    /// are dead-lettered as `too_large`.
    #[test]
    fn messages_and_values_past_their_caps_are_too_large() {
        let mut config = KafkaConfig::new("b:9092", "g", vec!["t".into()]);
        config.max_message_bytes = 200;
        config.max_value_bytes = 50;
        let keys = TableKeys::new();
        let event = |body: &str| {
            serde_json::json!({"after": {"id": 1, "body": body}, "op": "c", "source": {"schema": "s", "table": "t"}})
                .to_string()
        };
        let small = event("short");
        assert!(matches!(
            decode_message("t", Some(b"{\"id\":1}"), Some(small.as_bytes()), &config, &keys),
            Ok(Decoded::Change(_))
        ));
        let wide = event(&"x".repeat(60));
        let error = decode_message("t", None, Some(wide.as_bytes()), &config, &keys).unwrap_err();
        assert_eq!(error.reason, UndecodableReason::TooLarge, "{}", error.error);
        assert!(error.error.contains("column `body`"), "{}", error.error);
        let huge = event(&"x".repeat(300));
        let error = decode_message("t", None, Some(huge.as_bytes()), &config, &keys).unwrap_err();
        assert_eq!(error.reason, UndecodableReason::TooLarge);
        assert!(error.error.contains("max_message_bytes (200)"), "{}", error.error);
        // The key counts too.
        let key = vec![b'k'; 190];
        let error = decode_message("t", Some(&key), Some(small.as_bytes()), &config, &keys).unwrap_err();
        assert_eq!(error.reason, UndecodableReason::TooLarge);
        let error = decode_message("t", None, Some(b"{"), &config, &keys).unwrap_err();
        assert_eq!(error.reason, UndecodableReason::Decode);
    }

    #[test]
    fn an_offset_outside_what_the_broker_holds_is_a_gap_resumed_from_the_earliest() {
        // Retention deleted offsets 0..100 the group had not read.
        assert_eq!(gap_resume_offset(Some(40), 100, 250), Some(100));
        // A committed offset past the end: the topic was recreated.
        assert_eq!(gap_resume_offset(Some(900), 0, 3), Some(0));
        // Nothing to go by: a gap, the safe side.
        assert_eq!(gap_resume_offset(None, 7, 9), Some(7));
        // Still there, including the end (nothing new yet).
        assert_eq!(gap_resume_offset(Some(100), 100, 250), None);
        assert_eq!(gap_resume_offset(Some(250), 100, 250), None);
    }

    #[test]
    fn evictd_owns_the_offset_properties() {
        let mut config = KafkaConfig::new("b:9092", "g", vec!["t".into()]);
        config.properties.insert("auto.offset.reset".into(), "latest".into());
        let client = client_config(&config);
        assert_eq!(client.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client.get("auto.offset.reset"), Some("error"), "a gap is an error event, never a jump");
        assert_eq!(client.get("group.id"), Some("g"));
    }

    #[test]
    fn the_session_timeout_defaults_to_ten_seconds_unless_the_properties_say_otherwise() {
        let mut config = KafkaConfig::new("b:9092", "g", vec!["t".into()]);
        assert_eq!(client_config(&config).get("session.timeout.ms"), Some("10000"));
        config.properties.insert("session.timeout.ms".into(), "45000".into());
        assert_eq!(client_config(&config).get("session.timeout.ms"), Some("45000"));
    }

    #[test]
    fn a_topic_pattern_refreshes_metadata_every_second_unless_the_properties_say_otherwise() {
        let mut config = KafkaConfig::new("b:9092", "g", vec!["t".into()]);
        assert_eq!(client_config(&config).get("topic.metadata.refresh.interval.ms"), None, "librdkafka's default");
        config.topic_pattern = Some("^db\\.app\\..*".into());
        assert_eq!(client_config(&config).get("topic.metadata.refresh.interval.ms"), Some("1000"));
        config.properties.insert("topic.metadata.refresh.interval.ms".into(), "30000".into());
        assert_eq!(client_config(&config).get("topic.metadata.refresh.interval.ms"), Some("30000"));
    }

    #[test]
    fn the_lag_is_the_high_watermark_minus_the_committed_offset_of_the_same_report() {
        let o = partition_offsets(120, 100, 130, 115);
        assert_eq!(
            o,
            KafkaOffsets { position: Some(120), committed: Some(100), high_watermark: Some(130), lag: Some(30) }
        );
        assert_eq!(o.lag, o.high_watermark.zip(o.committed).map(|(h, c)| h - c));
    }

    #[test]
    fn before_the_first_commit_the_lag_counts_from_the_stored_offset_and_unknowns_stay_unset() {
        let o = partition_offsets(12, -1001, 40, 10);
        assert_eq!(o, KafkaOffsets { position: Some(12), committed: None, high_watermark: Some(40), lag: Some(30) });
        let none = partition_offsets(-1001, -1001, -1, -1001);
        assert_eq!(none, KafkaOffsets::default());
        // A high watermark behind the committed offset (a stale report) is no lag.
        assert_eq!(partition_offsets(5, 50, 40, 50).lag, Some(0));
    }
}
