//! The Kafka daemon: the dead-letter topic, the Redis targets and the
//! look-up pool, then the supervisor over consumers.
//!
//! Every replica is an active member of the consumer group (the group
//! splits the partitions; there is no standby), so membership is taken at
//! once and never lost. Consumers follow one another: a fatal consumer
//! error starts a new consumer, which resumes from the group's committed
//! offsets.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::supervisor::{self, Ended, Sessions, StartError};
use super::wiring::{self, Shared};
use crate::config::KafkaSource as KafkaConfig;
use crate::metrics::Metrics;
use crate::server::{Health, Role};
use crate::source::debezium::TableKeys;
use crate::source::kafka::{KafkaDeadLetters, KafkaSource};

pub(super) async fn run(shared: Shared<'_>, kafka: &KafkaConfig) -> Result<(), DaemonError> {
    let Shared { config, graph, metrics, health, shutdown } = shared;
    let lookups = wiring::lookup_executor(config)?;
    let dead_letters = KafkaDeadLetters::new(kafka, &config.dead_letter.topic, metrics.clone())
        .map_err(DaemonError::KafkaDeadLetters)?;
    let dead_letters = Arc::new(dead_letters);
    metrics.dead_letter_store();
    let Some(sink) = wiring::connect_sinks(config, &graph, &metrics, shutdown).await? else { return Ok(()) };
    wiring::sinks_connected(&sink, &metrics, &health);
    let sessions = KafkaSessions {
        config: kafka.clone(),
        table_keys: Arc::new(crate::source::debezium::table_keys(&graph)),
        metrics: metrics.clone(),
        health: health.clone(),
    };
    let pipeline = wiring::pipeline(Some(config), graph, Arc::new(sink), lookups, dead_letters, metrics, health);
    supervisor::supervise(&sessions, &pipeline, shutdown).await
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

    fn log_stepped_down(&self) {}
}
