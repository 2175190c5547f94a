//! The dead-letter topic of the Kafka source.
//!
//! A message that cannot be decoded (the source yields it as
//! [`Undecodable`], the run loop records it here) is copied there as it
//! was — key, value, headers — with these headers added:
//!
//! | header | value |
//! |---|---|
//! | `evictd.error` | the error, as logged |
//! | `evictd.reason` | `decode`, `too_large`, `too_slow`, `lookup_failed` or `lookup_attempts_exhausted` |
//! | `evictd.source.topic`, `evictd.source.partition`, `evictd.source.offset` | where it came from |
//!
//! A change whose look-ups cannot be run (it was decoded, so its payload is
//! no longer at hand) goes there as a JSON document of the change
//! (`table`, `op`, `before`, `after`, `position`, `error`) with the same
//! headers. A send counts only once the broker acknowledged it
//! (`acks=all`, idempotent producer), and the run loop acknowledges a
//! position only once its letters are sent, so the source's offset never
//! moves past a message whose dead letter could still be lost.
//!
//! A producer that can no longer send is replaced. When a send times out
//! with its request in flight (the topic unreachable for longer than
//! [`SEND_TIMEOUT`]), librdkafka's idempotent producer bumps its epoch by
//! itself; a broker that does not take the bump (Tansu) answers every later
//! send with `PRODUCER_FENCED`, and a producer in librdkafka's fatal state
//! fails every send too. Such a failure builds a new producer from the same
//! settings (once per producer, whichever send saw it first) and is still
//! returned as an error, so the run loop retries the letter as for any
//! failed send, on the new producer. Letters stay at least once: the failed
//! send may have reached the topic, and its retry then writes a duplicate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use super::without_secrets;
use crate::change::Position;
use crate::config::{KAFKA_OWN_PROPERTIES, KafkaSource as KafkaConfig};
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterStore, row_json};
use crate::metrics::Metrics;
use crate::source::Undecodable;

/// How long one send may wait in the producer's queue and for the broker.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A message bound for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetterMessage {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetterMessage {
    /// The original message, with evictd's headers after its own.
    pub(crate) fn from_undecodable(message: &Undecodable) -> DeadLetterMessage {
        let (topic, partition, offset) = origin(&message.position);
        let mut headers = message.raw.headers.clone();
        headers.extend(evictd_headers(message.reason.as_str(), &message.error, &topic, partition, offset));
        DeadLetterMessage { key: message.raw.key.clone(), value: message.raw.value.clone(), headers }
    }

    /// A change that could not be resolved, as a JSON document.
    pub(crate) fn from_dead_letter(letter: &DeadLetter) -> DeadLetterMessage {
        let change = &letter.change;
        let document = serde_json::json!({
            "table": &*change.table,
            "op": change.op.as_str(),
            "before": change.before.as_ref().map(row_json),
            "after": change.after.as_ref().map(row_json),
            "position": change.position.to_string(),
            "error": letter.error,
            "attempts": letter.attempts,
        });
        let (topic, partition, offset) = origin(&change.position);
        DeadLetterMessage {
            key: None,
            value: Some(document.to_string().into_bytes()),
            headers: evictd_headers(letter.reason.as_str(), &letter.error, &topic, partition, offset),
        }
    }
}

/// Where a position came from: its topic, partition and offset (another
/// source's position as the topic, with -1s).
fn origin(position: &Position) -> (String, i32, i64) {
    match position {
        Position::Kafka { topic, partition, offset, .. } => (topic.to_string(), *partition, *offset),
        other => (other.to_string(), -1, -1),
    }
}

fn evictd_headers(
    reason: &str,
    error: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Vec<(String, Option<Vec<u8>>)> {
    [
        ("evictd.error", error.to_owned()),
        ("evictd.reason", reason.to_owned()),
        ("evictd.source.topic", topic.to_owned()),
        ("evictd.source.partition", partition.to_string()),
        ("evictd.source.offset", offset.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Some(v.into_bytes())))
    .collect()
}

/// Why a dead letter could not be sent.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter topic `{topic}`: {message}")]
pub(crate) struct SendError {
    pub(crate) topic: String,
    pub(crate) message: String,
}

/// A producer for the dead-letter topic.
pub(crate) struct KafkaDeadLetters {
    /// What every producer is built from, a replacement included.
    client: ClientConfig,
    /// The source's properties, whose secrets are cut out of messages.
    properties: BTreeMap<String, String>,
    /// The producer sends use. Locked only to clone or swap it, never
    /// across an await.
    current: Mutex<Current>,
    topic: String,
    metrics: Arc<Metrics>,
}

/// The producer in use and how many were built before it: a send that saw
/// its producer fail replaces it only if no other send did meanwhile.
struct Current {
    generation: u64,
    producer: FutureProducer,
}

impl KafkaDeadLetters {
    /// A producer with the source's brokers and client properties (TLS,
    /// SASL), minus the consumer's own ([`producer_config`]).
    pub(crate) fn new(config: &KafkaConfig, topic: &str, metrics: Arc<Metrics>) -> Result<KafkaDeadLetters, String> {
        let client = producer_config(config);
        let producer: FutureProducer = client.create().map_err(|e| {
            format!("cannot create the dead-letter producer: {}", without_secrets(e, &config.properties))
        })?;
        Ok(KafkaDeadLetters {
            properties: config.properties.clone(),
            client,
            current: Mutex::new(Current { generation: 0, producer }),
            topic: topic.to_owned(),
            metrics,
        })
    }

    /// The producer in use and its generation.
    fn producer(&self) -> (u64, FutureProducer) {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        (current.generation, current.producer.clone())
    }

    /// Sends `letter`; `Ok` once the broker acknowledged it.
    pub(crate) async fn send(&self, letter: &DeadLetterMessage) -> Result<(), SendError> {
        let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len());
        for (key, value) in &letter.headers {
            headers = headers.insert(Header { key, value: value.as_deref() });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &letter.value {
            record = record.payload(value.as_slice());
        }
        let (generation, producer) = self.producer();
        match producer.send(record, SEND_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err((error, _)) => {
                let fatal = producer.client().fatal_error();
                if fatal.is_some() || is_fenced(&error) {
                    self.replace(generation, producer, &error, fatal);
                }
                Err(SendError { topic: self.topic.clone(), message: error.to_string() })
            }
        }
    }

    /// Puts a new producer in place of `failed` (of `generation`), unless
    /// another send did already. A new producer that cannot be built leaves
    /// the old one, and the next failure tries again.
    fn replace(
        &self,
        generation: u64,
        failed: FutureProducer,
        error: &KafkaError,
        fatal: Option<(RDKafkaErrorCode, String)>,
    ) {
        let old = {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            if current.generation != generation {
                // Another send replaced it already.
                None
            } else {
                // Under the lock, so that concurrent failures build one:
                // creating a producer starts its threads and awaits nothing.
                match self.client.create() {
                    Ok(fresh) => {
                        current.generation += 1;
                        Some(std::mem::replace(&mut current.producer, fresh))
                    }
                    Err(e) => {
                        let e = without_secrets(e, &self.properties);
                        tracing::warn!(topic = %self.topic, error = %e, "cannot build a new dead-letter producer; keeping the failed one");
                        None
                    }
                }
            }
        };
        if old.is_some() {
            let fatal = fatal.map(|(code, reason)| format!("{code:?}: {reason}"));
            tracing::warn!(
                topic = %self.topic,
                %error,
                fatal = fatal.as_deref().unwrap_or("none"),
                "the dead-letter producer can no longer send; replaced it with a new one (the letter is retried on it)"
            );
            self.metrics.kafka_dead_letter_producer_reset();
        }
        // Dropping the last handle of a producer purges it and waits for
        // the purge (up to 500 ms): off the runtime's threads.
        let handles = (old, failed);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(handles))),
            Err(_) => drop(handles),
        }
    }
}

/// Whether a send's error means its producer will fail every later send:
/// fenced (another producer, or its own epoch bump, took its place) or in
/// librdkafka's fatal state.
fn is_fenced(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Fatal)
    )
}

/// Consumer settings a producer would warn about.
/// The dead-letter producer's client configuration: every property of
/// the source that is not the consumer's (so the same `security.protocol`,
/// `sasl.*` and `ssl.*` as the consumer: it reaches the same brokers with
/// the same credentials), and the producer's own delivery settings.
fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &config.properties {
        if !KAFKA_OWN_PROPERTIES.contains(&key.as_str()) && !is_consumer_only(key) {
            client.set(key, value);
        }
    }
    client
        .set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", SEND_TIMEOUT.as_millis().to_string());
    client
}

fn is_consumer_only(key: &str) -> bool {
    key.starts_with("auto.offset")
        || key.starts_with("auto.commit")
        || key.starts_with("session.timeout")
        || key.starts_with("heartbeat.")
        || key.starts_with("max.poll")
        || key.starts_with("fetch.")
        || key.starts_with("partition.assignment")
        || key.starts_with("group.")
        || key == "isolation.level"
}

impl DeadLetterStore for KafkaDeadLetters {
    async fn record(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        self.send(&DeadLetterMessage::from_dead_letter(letter))
            .await
            .map_err(|e| DeadLetterError::Write { message: e.to_string(), transient: true })?;
        if let Position::Kafka { topic, .. } = &letter.change.position {
            self.metrics.kafka_dead_lettered(topic, letter.reason.as_str());
        }
        Ok(())
    }

    async fn record_undecodable(&self, message: &Undecodable) -> Result<(), DeadLetterError> {
        self.send(&DeadLetterMessage::from_undecodable(message))
            .await
            .map_err(|e| DeadLetterError::Write { message: e.to_string(), transient: true })?;
        if let Position::Kafka { topic, .. } = &message.position {
            self.metrics.kafka_dead_lettered(topic, message.reason.as_str());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{RawMessage, UndecodableReason};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// librdkafka's mock broker (in process, on loopback) answers one
    /// produce with PRODUCER_FENCED: that send fails, the producer is
    /// replaced once, and the retry goes through the new one.
    #[tokio::test]
    async fn a_fenced_producer_is_replaced_once_and_the_retry_is_sent_by_the_new_one() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("dead-letters", 1, 1).unwrap();
        let config = KafkaConfig::new(&cluster.bootstrap_servers(), "g", vec!["t".into()]);
        let metrics = Arc::new(Metrics::new());
        let letters = KafkaDeadLetters::new(&config, "dead-letters", Arc::clone(&metrics)).unwrap();
        let letter = DeadLetterMessage { key: None, value: Some(b"v".to_vec()), headers: Vec::new() };
        letters.send(&letter).await.unwrap();
        assert_eq!(letters.producer().0, 0, "a send that went through replaces nothing");

        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
        let error = letters.send(&letter).await.unwrap_err();
        assert_eq!(letters.producer().0, 1, "replaced after {error}");
        letters.send(&letter).await.unwrap();
        assert_eq!(letters.producer().0, 1, "the new producer sends");
        let text = metrics.encode().unwrap();
        assert!(text.contains("evictd_kafka_dead_letter_producer_resets_total 1\n"), "{text}");
    }

    #[test]
    fn the_producer_uses_the_consumers_security_properties_and_none_of_its_own() {
        let mut config = KafkaConfig::new("b:9093", "g", vec!["t".into()]);
        let security = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "evictd"),
            ("sasl.password", "hunter2"),
            ("ssl.ca.location", "/etc/ssl/ca.pem"),
            ("ssl.endpoint.identification.algorithm", "https"),
        ];
        for (key, value) in security {
            config.properties.insert(key.into(), value.into());
        }
        config.properties.insert("session.timeout.ms".into(), "6000".into());
        config.properties.insert("fetch.wait.max.ms".into(), "10".into());
        let client = producer_config(&config);
        for (key, value) in security {
            assert_eq!(client.get(key), Some(value), "{key}");
        }
        assert_eq!(client.get("bootstrap.servers"), Some("b:9093"));
        assert_eq!(client.get("session.timeout.ms"), None, "consumer-only");
        assert_eq!(client.get("fetch.wait.max.ms"), None, "consumer-only");
        assert_eq!(client.get("group.id"), None);
    }

    #[test]
    fn fenced_epoch_and_fatal_errors_call_for_a_new_producer_and_a_timeout_does_not() {
        let produce = |code| KafkaError::MessageProduction(code);
        assert!(is_fenced(&produce(RDKafkaErrorCode::ProducerFenced)));
        assert!(is_fenced(&produce(RDKafkaErrorCode::InvalidProducerEpoch)));
        assert!(is_fenced(&produce(RDKafkaErrorCode::Fatal)));
        assert!(!is_fenced(&produce(RDKafkaErrorCode::MessageTimedOut)));
        assert!(!is_fenced(&produce(RDKafkaErrorCode::BrokerTransportFailure)));
    }

    #[test]
    fn an_undecodable_message_keeps_its_key_value_and_headers_with_evictds_after_them() {
        let message = Undecodable {
            position: Position::Kafka { topic: "t".into(), partition: 3, offset: 9, seq: 1, version: 1 },
            reason: UndecodableReason::TooSlow,
            error: "decoding took too long".into(),
            raw: RawMessage {
                key: Some(b"k".to_vec()),
                value: Some(b"v".to_vec()),
                headers: vec![("trace".into(), Some(b"abc".to_vec())), ("none".into(), None)],
            },
        };
        let letter = DeadLetterMessage::from_undecodable(&message);
        assert_eq!((letter.key.as_deref(), letter.value.as_deref()), (Some(&b"k"[..]), Some(&b"v"[..])));
        let headers: Vec<(&str, Option<&[u8]>)> =
            letter.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        assert_eq!(
            headers,
            [
                ("trace", Some(&b"abc"[..])),
                ("none", None),
                ("evictd.error", Some(&b"decoding took too long"[..])),
                ("evictd.reason", Some(&b"too_slow"[..])),
                ("evictd.source.topic", Some(&b"t"[..])),
                ("evictd.source.partition", Some(&b"3"[..])),
                ("evictd.source.offset", Some(&b"9"[..])),
            ]
        );
    }
}
