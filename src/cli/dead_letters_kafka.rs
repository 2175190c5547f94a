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

use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers as _;

use super::dead_letters::{ListArgs, PurgeArgs};
use super::slot::{Format, audit};
use super::{CliError, write_stdout};
use crate::config::{KAFKA_OWN_PROPERTIES, KafkaSource};

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
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = polled.map_err(|e| CliError::Runtime(format!("cannot read `{topic}`: {e}")))?;
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
        Ok(list) => list.elements().iter().find_map(|e| e.error().err().map(|err| format!("partition {}: {err}", e.partition()))),
    };
    if let Some(why) = failure {
        audit("dead-letters purge", topic, "failed", &why);
        return Err(CliError::Runtime(format!(
            "`{topic}`: DeleteRecords failed: {why} (the broker may not support it: set the topic's retention.ms to age letters out instead)"
        )));
    }
    audit("dead-letters purge", topic, "deleted", &format!("{count} letter(s), all"));
    write_stdout(&format!("purged {count} dead letter(s) from `{topic}`\n"))
}
