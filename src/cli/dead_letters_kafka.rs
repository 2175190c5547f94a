//! `evictd dead-letters list|purge` for the Kafka source's dead-letter
//! topic (`dead_letter.topic`; its messages and headers are described in
//! [`crate::source::kafka::dead_letters`]).
//!
//! `list` reads every partition from its low watermark with a consumer
//! that is assigned partitions and never joins or commits to a group, so
//! reading changes nothing. `purge --all --yes` deletes every message up to
//! each partition's high watermark (Kafka's DeleteRecords): a topic can only
//! be truncated from its beginning, so a single letter (`--id`) or a time
//! (`--before`) cannot be purged; the topic's `retention.ms` ages letters
//! out by itself.
//!
//! `replay --all` reads the topic from the replay group's committed offsets
//! (`<group_id>.dead-letters-replay`; from the start without them) up to
//! the high watermarks as they were when it started, and feeds each letter
//! through the daemon's pipeline (`dead_letters::replay_events`): a change
//! the daemon could not resolve is read back from its JSON document, any
//! other letter is decoded again from the original message with the
//! config's current settings. A letter that still fails is sent to the
//! topic again, as it was with its new error (the daemon's producer,
//! acknowledged by the broker), and then counts as handled; the replay
//! group's offsets are committed past every letter handled in a row, so a
//! letter whose batch was not confirmed, or whose new copy could not be
//! sent, is read again by the next replay.

use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers as _;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use rdkafka::consumer::CommitMode;
use rdkafka::error::KafkaError;

use super::audit;
use super::dead_letters::{Failure, ListArgs, PurgeArgs, ReplayArgs, Replayed, replay_events, row_of};
use super::slot::Format;
use super::{CliError, write_stdout};
use crate::change::{Change, Operation, Position};
use crate::config::{Config, KAFKA_OWN_PROPERTIES, KafkaSource, SnapshotReads};
use crate::graph::Graph;
use crate::metrics::Metrics;
use crate::source::debezium::Decoded;
use crate::source::kafka::{DeadLetterMessage, KafkaDeadLetters, decode_message};
use crate::source::{RawMessage, SourceEvent, Undecodable, UndecodableReason};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The source's client settings (brokers, TLS, SASL) without its consumer's own.
fn client(kafka: &KafkaSource) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &kafka.properties {
        if !KAFKA_OWN_PROPERTIES.contains(&key.as_str()) && !key.starts_with("group.") {
            client.set(key, value);
        }
    }
    client.set("bootstrap.servers", &kafka.brokers);
    client
}

/// One message of the topic as `list` shows it.
#[derive(Debug, serde::Serialize)]
struct Listed {
    position: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    /// Where the letter came from (`evictd.source.*`).
    origin: Option<String>,
    reason: Option<String>,
    error: Option<String>,
    preview: Option<String>,
}

fn header(message: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The partitions of `topic` with their low and high watermarks.
fn watermarks(consumer: &BaseConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, CliError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| CliError::Runtime(format!("dead-letter topic `{topic}`: cannot read its metadata: {e}")))?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for partition in meta.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, partition.id(), TIMEOUT).map_err(|e| {
            CliError::Runtime(format!("dead-letter topic `{topic}`: cannot read partition {}: {e}", partition.id()))
        })?;
        out.push((partition.id(), low, high));
    }
    Ok(out)
}

fn consumer(kafka: &KafkaSource) -> Result<BaseConsumer, CliError> {
    // A group id librdkafka wants; nothing is ever committed to it.
    client(kafka)
        .set("group.id", "evictd-dead-letters-list")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The end of a partition is an event: a compacted or truncated
        // partition whose last offset is gone still ends the read.
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| CliError::Input(format!("cannot create a Kafka consumer: {e}")))
}

pub(crate) async fn list(kafka: &KafkaSource, topic: &str, args: &ListArgs) -> Result<(), CliError> {
    if args.since.is_some() {
        return Err(CliError::Input("--since is for the dead-letter table; a topic is listed from its start".into()));
    }
    let (kafka, topic, limit) = (kafka.clone(), topic.to_owned(), usize::try_from(args.limit).unwrap_or(usize::MAX));
    let read = tokio::task::spawn_blocking(move || read(&kafka, &topic, limit))
        .await
        .map_err(|e| CliError::Runtime(format!("internal: {e}")))??;
    let text = match args.format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&serde_json::json!({ "dead_letters": read }))
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            s.push('\n');
            s
        }
        Format::Text => {
            let mut t = format!("{} dead letter(s) in the topic\n", read.len());
            for r in &read {
                t.push_str(&format!(
                    "{} {} from {} [{}] {}\n    {}\n",
                    r.position,
                    r.timestamp_ms.map(|t| format!("ts {t}")).unwrap_or_default(),
                    r.origin.as_deref().unwrap_or("-"),
                    r.reason.as_deref().unwrap_or("-"),
                    r.error.as_deref().unwrap_or("-"),
                    r.preview.as_deref().unwrap_or("-"),
                ));
            }
            t
        }
    };
    write_stdout(&text)
}

fn read(kafka: &KafkaSource, topic: &str, limit: usize) -> Result<Vec<Listed>, CliError> {
    let consumer = consumer(kafka)?;
    let partitions = watermarks(&consumer, topic)?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0usize;
    for (partition, low, high) in &partitions {
        if high > low {
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(*low))
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            remaining += 1;
        }
    }
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    consumer.assign(&assignment).map_err(|e| CliError::Runtime(format!("cannot read `{topic}`: {e}")))?;
    let deadline = Instant::now() + TIMEOUT * 3;
    let mut done: std::collections::HashSet<i32> = std::collections::HashSet::new();
    while done.len() < remaining && out.len() < limit {
        if Instant::now() > deadline {
            return Err(CliError::Runtime(format!("`{topic}`: not read to its end within {:?}", TIMEOUT * 3)));
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                done.insert(partition);
                continue;
            }
            Some(Err(e)) => return Err(CliError::Runtime(format!("cannot read `{topic}`: {e}"))),
            Some(Ok(message)) => message,
        };
        let (partition, offset) = (message.partition(), message.offset());
        let high = partitions.iter().find(|p| p.0 == partition).map_or(0, |p| p.2);
        if offset + 1 >= high {
            done.insert(partition);
        }
        let origin = match (header(&message, "evictd.source.topic"), header(&message, "evictd.source.offset")) {
            (Some(t), Some(o)) => {
                Some(format!("{t}/{}@{o}", header(&message, "evictd.source.partition").unwrap_or_default()))
            }
            _ => None,
        };
        let preview = message.payload().map(|p| String::from_utf8_lossy(p).chars().take(120).collect());
        out.push(Listed {
            position: format!("{topic}/{partition}@{offset}"),
            partition,
            offset,
            timestamp_ms: message.timestamp().to_millis(),
            origin,
            reason: header(&message, "evictd.reason"),
            error: header(&message, "evictd.error"),
            preview,
        });
    }
    Ok(out)
}

pub(crate) async fn purge(kafka: &KafkaSource, topic: &str, args: &PurgeArgs) -> Result<(), CliError> {
    if !args.all {
        return Err(CliError::Input(format!(
            "the dead-letter topic `{topic}` can only be truncated from its start: `purge --all --yes` deletes every letter in it; for letters by age, set the topic's retention.ms"
        )));
    }
    let (k, t) = (kafka.clone(), topic.to_owned());
    let partitions = tokio::task::spawn_blocking(move || consumer(&k).and_then(|c| watermarks(&c, &t)))
        .await
        .map_err(|e| CliError::Runtime(format!("internal: {e}")))??;
    let count: i64 = partitions.iter().map(|(_, low, high)| high - low).sum();
    if !args.yes {
        return Err(CliError::Input(format!(
            "{count} dead letter(s) in `{topic}` would be deleted: add --yes to delete them"
        )));
    }
    let mut offsets = TopicPartitionList::new();
    for (partition, _, high) in &partitions {
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(*high))
            .map_err(|e| CliError::Runtime(e.to_string()))?;
    }
    let admin: AdminClient<DefaultClientContext> =
        client(kafka).create().map_err(|e| CliError::Input(format!("cannot create a Kafka admin client: {e}")))?;
    let options = AdminOptions::new().request_timeout(Some(TIMEOUT)).operation_timeout(Some(TIMEOUT));
    let result = admin.delete_records(&offsets, &options).await;
    let failure = match &result {
        Err(e) => Some(e.to_string()),
        Ok(list) => list
            .elements()
            .iter()
            .find_map(|e| e.error().err().map(|err| format!("partition {}: {err}", e.partition()))),
    };
    if let Some(why) = failure {
        audit::record("dead-letters purge", topic, "failed", &why);
        return Err(CliError::Runtime(format!(
            "`{topic}`: DeleteRecords failed: {why} (the broker may not support it: set the topic's retention.ms to age letters out instead)"
        )));
    }
    audit::record("dead-letters purge", topic, "deleted", &format!("{count} letter(s), all"));
    write_stdout(&format!("purged {count} dead letter(s) from `{topic}`\n"))
}

/// The group whose committed offsets say how far `dead-letters replay`
/// has gone through the topic: the source's group with this suffix.
pub(crate) const REPLAY_GROUP_SUFFIX: &str = ".dead-letters-replay";

/// A message of the dead-letter topic, as read.
struct Letter {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Letter {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// A consumer of the replay group (assigned, never subscribed).
fn replay_consumer(kafka: &KafkaSource) -> Result<BaseConsumer, CliError> {
    client(kafka)
        .set("group.id", format!("{}{REPLAY_GROUP_SUFFIX}", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The end of a partition is an event: a compacted or truncated
        // partition whose last offset is gone still ends the read.
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| CliError::Input(format!("cannot create a Kafka consumer: {e}")))
}

/// The letters after the replay group's committed offsets (from each
/// partition's start without one), up to the high watermarks as they are
/// now: letters sent again during the replay wait for the next one.
fn fetch(consumer: &BaseConsumer, topic: &str) -> Result<Vec<Letter>, CliError> {
    let partitions = watermarks(consumer, topic)?;
    let mut wanted = TopicPartitionList::new();
    for (partition, _, _) in &partitions {
        wanted.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(wanted, TIMEOUT)
        .map_err(|e| CliError::Runtime(format!("`{topic}`: cannot read the replay group's offsets: {e}")))?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for (partition, low, high) in &partitions {
        let start = match committed.find_partition(topic, *partition).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(*low),
            _ => *low,
        };
        if start < *high {
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(start))
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            ends.insert(*partition, *high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&assignment).map_err(|e| CliError::Runtime(format!("cannot read `{topic}`: {e}")))?;
    let deadline = Instant::now() + TIMEOUT * 3;
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(CliError::Runtime(format!("`{topic}`: not read to its end within {:?}", TIMEOUT * 3)));
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                ends.remove(&partition);
                continue;
            }
            Some(Err(e)) => return Err(CliError::Runtime(format!("cannot read `{topic}`: {e}"))),
            Some(Ok(message)) => message,
        };
        let (partition, offset) = (message.partition(), message.offset());
        let Some(high) = ends.get(&partition).copied() else { continue };
        if offset >= high {
            ends.remove(&partition);
            continue;
        }
        if offset + 1 >= high {
            ends.remove(&partition);
        }
        let headers = message
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        out.push(Letter {
            partition,
            offset,
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    out.sort_by_key(|l| (l.partition, l.offset));
    Ok(out)
}

/// The events of one letter at `position`: a change that could not be
/// resolved is the JSON document the daemon wrote; any other letter is the
/// original message, decoded as the source decodes it (the config's
/// current settings).
fn events_of(
    letter: &Letter,
    position: Position,
    kafka: &KafkaSource,
    table_keys: &crate::source::debezium::TableKeys,
) -> Vec<SourceEvent> {
    let reason = letter.header("evictd.reason").unwrap_or_default();
    let undecodable = |reason: UndecodableReason, error: String| {
        let raw = RawMessage { key: letter.key.clone(), value: letter.value.clone(), headers: letter.headers.clone() };
        vec![SourceEvent::Undecodable(Undecodable { position: position.clone(), reason, error, raw })]
    };
    let change = if reason == "lookup_failed" || reason == "lookup_attempts_exhausted" {
        match change_of_document(letter.value.as_deref()) {
            Ok(change) => Some(change),
            Err(error) => return undecodable(UndecodableReason::Decode, error),
        }
    } else {
        let origin = letter.header("evictd.source.topic").unwrap_or_default();
        match decode_message(&origin, letter.key.as_deref(), letter.value.as_deref(), kafka, table_keys) {
            Ok(Decoded::Change(change)) => Some(change),
            Ok(Decoded::SnapshotRead(change)) if kafka.snapshot_reads == SnapshotReads::Invalidate => Some(change),
            Ok(Decoded::SnapshotRead(_) | Decoded::Ignored(_)) => None,
            Err(failure) => return undecodable(failure.reason, failure.error),
        }
    };
    let mut events = vec![SourceEvent::Begin];
    if let Some(mut change) = change {
        change.position = position.clone();
        events.push(SourceEvent::Change(change));
    }
    events.push(SourceEvent::Commit { position, commit_time_micros: None });
    events
}

/// A change as `from_dead_letter` wrote it: `{"table", "op", "before", "after", …}`.
fn change_of_document(value: Option<&[u8]>) -> Result<Change, String> {
    let json: serde_json::Value =
        serde_json::from_slice(value.unwrap_or_default()).map_err(|e| format!("the letter is not JSON: {e}"))?;
    let table = json.get("table").and_then(|t| t.as_str()).ok_or("the letter has no `table`")?;
    let op: Operation =
        json.get("op").and_then(|o| o.as_str()).ok_or("the letter has no `op`")?.parse().map_err(|e| format!("{e}"))?;
    Ok(Change::new(table, op, row_of(json.get("before")), row_of(json.get("after"))))
}

pub(crate) async fn replay(
    config: &Config,
    kafka: &KafkaSource,
    topic: &str,
    graph: Graph,
    args: &ReplayArgs,
) -> Result<(), CliError> {
    if args.id.is_some() {
        return Err(CliError::Input(format!(
            "the dead-letter topic `{topic}` is replayed in order from the replay group's offsets: use --all"
        )));
    }
    let (k, t) = (kafka.clone(), topic.to_owned());
    let (consumer, letters) = tokio::task::spawn_blocking(move || {
        let consumer = replay_consumer(&k)?;
        let letters = fetch(&consumer, &t)?;
        Ok::<_, CliError>((consumer, letters))
    })
    .await
    .map_err(|e| CliError::Runtime(format!("internal: {e}")))??;
    let table_keys = crate::source::debezium::table_keys(&graph);
    let mut events = VecDeque::new();
    for (i, letter) in letters.iter().enumerate() {
        let position = Position::File { line: i as u64 + 1 };
        events.extend(events_of(letter, position, kafka, &table_keys));
    }
    let Replayed { acknowledged, failed, dry } = replay_events(config, graph, events, args.dry_run).await?;
    let mut out: String = dry.concat();
    let resend = if args.dry_run {
        None
    } else {
        let metrics = Arc::new(Metrics::new());
        Some(KafkaDeadLetters::new(kafka, topic, metrics).map_err(CliError::Input)?)
    };
    // Per partition, the offset to commit: past every letter handled in a row.
    let mut commit: BTreeMap<i32, i64> = BTreeMap::new();
    let mut blocked: std::collections::BTreeSet<i32> = std::collections::BTreeSet::new();
    let (mut replayed, mut still, mut unapplied) = (0, 0, 0);
    for (i, letter) in letters.iter().enumerate() {
        let seq = i as u64 + 1;
        let at = format!("{topic}/{}@{}", letter.partition, letter.offset);
        let handled = if seq > acknowledged {
            unapplied += 1;
            out.push_str(&format!("{at}: not applied (a target failed)\n"));
            false
        } else if let Some(failure) = failed.get(&seq) {
            still += 1;
            out.push_str(&format!("{at}: still fails: {}\n", failure.error));
            match &resend {
                None => true,
                Some(producer) => {
                    let message = again(letter, failure);
                    match producer.send(&message).await {
                        Ok(()) => true,
                        Err(e) => {
                            out.push_str(&format!(
                                "{at}: cannot send it again ({e}): kept before the replay group's offset\n"
                            ));
                            false
                        }
                    }
                }
            }
        } else {
            replayed += 1;
            out.push_str(&format!("{at}: {}\n", if args.dry_run { "resolves" } else { "replayed" }));
            true
        };
        if !handled {
            blocked.insert(letter.partition);
        } else if !blocked.contains(&letter.partition) {
            commit.insert(letter.partition, letter.offset + 1);
        }
    }
    out.push_str(&format!(
        "{} letter(s): {replayed} {}, {still} still failing{}, {unapplied} not applied\n",
        letters.len(),
        if args.dry_run { "would resolve" } else { "replayed" },
        if args.dry_run { "" } else { " (sent again with their new error)" }
    ));
    if !args.dry_run && !commit.is_empty() {
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in &commit {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(|e| CliError::Runtime(e.to_string()))?;
        }
        let committed = tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
            .await
            .map_err(|e| CliError::Runtime(format!("internal: {e}")))?;
        let group = format!("{}{REPLAY_GROUP_SUFFIX}", kafka.group_id);
        if let Err(e) = committed {
            audit::record("dead-letters replay", topic, "failed", &format!("committing group {group}: {e}"));
            write_stdout(&out)?;
            return Err(CliError::Runtime(format!(
                "`{topic}`: replayed, but the offsets of group {group} could not be committed ({e}): the next replay repeats these letters"
            )));
        }
        let summary = commit.iter().map(|(p, o)| format!("{p}@{o}")).collect::<Vec<_>>().join(",");
        audit::record(
            "dead-letters replay",
            topic,
            "replayed",
            &format!("{replayed} replayed, {still} still failing and sent again; group {group} at {summary}"),
        );
    }
    write_stdout(&out)?;
    if unapplied > 0 {
        return Err(CliError::Runtime(format!("{unapplied} letter(s) not applied: replay again")));
    }
    Ok(())
}

/// A letter that still fails, to send again: as it was, with the new error.
fn again(letter: &Letter, failure: &Failure) -> DeadLetterMessage {
    let mut headers: Vec<(String, Option<Vec<u8>>)> =
        letter.headers.iter().filter(|(k, _)| k != "evictd.error" && k != "evictd.reason").cloned().collect();
    headers.push(("evictd.error".into(), Some(failure.error.clone().into_bytes())));
    headers.push(("evictd.reason".into(), Some(failure.reason.as_bytes().to_vec())));
    DeadLetterMessage { key: letter.key.clone(), value: letter.value.clone(), headers }
}
