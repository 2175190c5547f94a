//! The Kafka daemon: the dead-letter topic, the Redis targets and the
//! look-up pool, then the supervisor over consumers.
//!
//! Every replica is an active member of the consumer group (the group
//! splits the partitions; there is no standby), so membership is taken at
//! once and never lost. Consumers follow one another: a fatal consumer
//! error starts a new consumer, which resumes from the group's committed
//! offsets.

use std::path::Path;
use std::sync::Arc;

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::supervisor::{self, Ended, Sessions, StartError, StepDown, SteppedDown};
use super::wiring::{self, Shared};
use crate::config::KafkaSource as KafkaConfig;
use crate::metrics::Metrics;
use crate::server::{Health, Role};
use crate::source::debezium::TableKeys;
use crate::source::kafka::{KafkaDeadLetters, KafkaSource, client_config, without_secrets};

pub(super) async fn run(shared: Shared<'_>, kafka: &KafkaConfig) -> Result<(), DaemonError> {
    let Shared { config, graph, metrics, health, shutdown } = shared;
    // Before any client exists: a property librdkafka refuses is bad input.
    check_client(&config.file, kafka).map_err(DaemonError::KafkaClient)?;
    let lookups = wiring::lookup_executor(config)?;
    let dead_letters = KafkaDeadLetters::new(kafka, &config.dead_letter.topic, metrics.clone())
        .map_err(DaemonError::KafkaDeadLetters)?;
    let dead_letters = Arc::new(dead_letters);
    metrics.dead_letter_store();
    let Some(sink) = wiring::connect_sinks(config, &graph, &metrics, shutdown).await? else { return Ok(()) };
    wiring::sinks_connected(&sink, &metrics, &health);
    let _heartbeats = wiring::start_heartbeats(&sink, false);
    let _operator_actions = wiring::export_operator_actions(&sink, &metrics);
    let sessions = KafkaSessions {
        config: kafka.clone(),
        table_keys: Arc::new(crate::source::debezium::table_keys(&graph)),
        metrics: metrics.clone(),
        health: health.clone(),
    };
    let pipeline = wiring::pipeline(Some(config), graph, Arc::new(sink), lookups, dead_letters, metrics, health);
    supervisor::supervise(&sessions, &pipeline, shutdown).await
}

/// librdkafka refused the consumer's client configuration (bad input).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: rejected by librdkafka: {source}")]
pub(crate) struct ClientRejected {
    file: String,
    /// `source.kafka.properties."NAME"` when librdkafka named one of the
    /// operator's properties, else `source.kafka.properties`.
    field: String,
    #[source]
    source: Box<KafkaError>,
}

/// Asks librdkafka whether it accepts the consumer's client configuration
/// (the operator's `source.kafka.properties` with evictd's own settings,
/// exactly as the source builds it): every property is set, which refuses
/// unknown names and bad values, then a consumer is created and dropped at
/// once, which refuses what only a client sees (TLS files it cannot read,
/// say). The consumer gets no brokers, so it contacts nothing (`check
/// --offline` must not resolve or connect). `run` does this before it
/// creates any Kafka client and `check` does it too; config validation
/// does not, since it creates no client.
pub(crate) fn check_client(file: &Path, kafka: &KafkaConfig) -> Result<(), ClientRejected> {
    checked_client_config(kafka).create::<BaseConsumer>().map(drop).map_err(|source| {
        let source = without_secrets(source, &kafka.properties);
        let field = match &source {
            KafkaError::ClientConfig(_, _, key, _) if kafka.properties.contains_key(key) => {
                format!("source.kafka.properties.\"{key}\"")
            }
            _ => "source.kafka.properties".to_owned(),
        };
        ClientRejected { file: file.display().to_string(), field, source: Box::new(source) }
    })
}

/// The consumer's configuration as [`check_client`] judges it: everything
/// but the brokers, so that the judgement contacts nothing.
fn checked_client_config(kafka: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut config = client_config(kafka);
    config.remove("bootstrap.servers");
    config
}

/// Consumers of the group, one after another.
struct KafkaSessions {
    config: KafkaConfig,
    table_keys: Arc<TableKeys>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Sessions for KafkaSessions {
    type Source = KafkaSource;
    /// Group membership is the consumer's own: nothing to hold.
    type Membership = ();

    const START_CONNECTS: bool = false;

    async fn acquire(&self, _shutdown: &CancellationToken) -> Option<()> {
        self.health.set_role(Role::Active);
        self.metrics.set_role(Role::Active);
        Some(())
    }

    fn hold(
        &self,
        (): (),
        _stepped_down: CancellationToken,
        done: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        done.cancelled_owned()
    }

    /// Never: every replica is a member and there is no standby to hand
    /// over to; the group moves a failing member's partitions by itself
    /// (its session timeout), and a failing consumer keeps retrying.
    fn step_down(&self) -> Option<StepDown> {
        None
    }

    async fn start(&self) -> Result<KafkaSource, StartError> {
        KafkaSource::start(&self.config, self.table_keys.clone(), self.metrics.clone()).map_err(StartError::Consumer)
    }

    /// Always cleanly: the consumer commits what is stored and leaves the
    /// group, so its partitions move at once.
    async fn close(&self, source: KafkaSource, _ended: Ended) {
        source.shutdown().await;
    }

    fn log_lost(&self, error: &str) {
        tracing::warn!(error = %error, "lost the consumer; rejoining the group from the committed offsets");
    }

    fn log_stepped_down(&self, _: SteppedDown) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_property(key: &str, value: &str) -> KafkaConfig {
        let mut kafka = KafkaConfig::new("127.0.0.1:9", "evictd", vec!["t".to_owned()]);
        kafka.properties.insert(key.to_owned(), value.to_owned());
        kafka
    }

    #[test]
    fn an_unknown_property_is_refused_with_its_file_and_field() {
        let e = check_client(Path::new("evictd.toml"), &with_property("no.such.property", "1")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("evictd.toml: source.kafka.properties.\"no.such.property\": rejected by librdkafka: "),
            "{text}"
        );
        assert!(text.contains("no.such.property"), "{text}");
    }

    #[test]
    fn a_bad_value_is_refused_with_its_field() {
        let e = check_client(Path::new("evictd.toml"), &with_property("session.timeout.ms", "soon")).unwrap_err();
        assert_eq!(e.field, "source.kafka.properties.\"session.timeout.ms\"", "{e}");
    }

    #[test]
    fn a_refused_property_is_named_without_its_value_when_it_may_be_a_secret() {
        // A misspelt `sasl.password`: librdkafka quotes the value it refused.
        let e = check_client(Path::new("evictd.toml"), &with_property("sasl.passwrd", "hunter2")).unwrap_err();
        let text = chain(&e);
        assert!(text.contains("sasl.passwrd") && text.contains("****"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        // A bad value of a plain property is shown, but never a secret's
        // value, wherever it appears.
        let mut kafka = with_property("security.protocol", "sasl_tls");
        kafka.properties.insert("sasl.password".to_owned(), "sasl_tls".to_owned());
        let text = chain(&check_client(Path::new("evictd.toml"), &kafka).unwrap_err());
        assert!(text.contains("security.protocol") && !text.contains("sasl_tls"), "{text}");
    }

    /// The message and every cause, as main prints them.
    fn chain(e: &ClientRejected) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    }

    #[test]
    fn accepted_properties_pass() {
        check_client(Path::new("evictd.toml"), &with_property("session.timeout.ms", "6000")).unwrap();
    }

    /// `check --offline` must not resolve or connect to the brokers: the
    /// judged consumer has none (with them, librdkafka resolved the names
    /// of a Deployment's brokers on a CI machine and logged errors).
    #[test]
    fn the_judged_consumer_has_no_brokers_to_contact() {
        let kafka = with_property("session.timeout.ms", "6000");
        assert!(client_config(&kafka).get("bootstrap.servers").is_some());
        assert_eq!(checked_client_config(&kafka).get("bootstrap.servers"), None);
    }
}
