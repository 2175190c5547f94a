//! Issue 15, item 3: the metrics that were counted or known but not
//! exported, provoked against the real services and read from a running
//! daemon's `/metrics` (or, for the Kafka source, from the `Metrics` the
//! source reports into): broadcast publishes, the progress and change
//! times, the process metrics, sink up while a Redis of the test's own is
//! stopped, delayed second deletes that fail, and the Kafka partition
//! offsets.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::daemon::{Daemon, fill, redis, redis_url, wait_gone};

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, name text NOT NULL);
ALTER TABLE app.items REPLICA IDENTITY FULL;
";

fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "name"]

[caches.{prefix}_item]
key = "{prefix}:item:{{id}}"
[[caches.{prefix}_item.depends]]
table = "app.items"
"#
    )
}

/// The same, with a delayed second delete long enough for the test to stop
/// Redis between the two deletes.
fn graph_with_second_delete(prefix: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "name"]

[caches.{prefix}_item]
key = "{prefix}:item:{{id}}"
redelete_after_ms = 3000
[[caches.{prefix}_item.depends]]
table = "app.items"
"#
    )
}

/// The value of the sample whose name and labels are exactly `series`
/// (`name` or `name{labels}`).
pub(super) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(address: std::net::SocketAddr) -> String {
    let reply = super::server::get(address, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

/// A change is received, applied, broadcast on both transports and
/// acknowledged: the publish counters, the change and progress times (in
/// that order), sink up and the process metrics all show it.
#[tokio::test]
async fn an_applied_change_is_counted_as_published_received_and_acknowledged() {
    let url = redis_url();
    let channel = format!("evictd-test-metrics:{}", std::process::id());
    let extra =
        format!("[redis.primary]\nurl = \"{url}\"\nbroadcast_channel = \"{channel}\"\nbroadcast_heartbeat_ms = 200\n");
    let mut d = Daemon::custom(&super::support::pg_url(), &url, SCHEMA, graph, &extra).await;
    d.sql("INSERT INTO app.items VALUES (1, 'a')").await;
    d.start().await;
    let address = d.http_address().await;
    let before = scrape(address).await;
    assert_eq!(sample(&before, "evictd_last_change_timestamp_seconds"), Some(0.0), "{before}");
    for transport in ["pubsub", "stream"] {
        let series = format!(
            r#"evictd_broadcast_publishes_total{{target="primary",transport="{transport}",kind="batch",outcome="error"}}"#
        );
        assert_eq!(sample(&before, &series), Some(0.0), "{series} exists at zero: {before}");
    }

    let mut r = redis(&url).await;
    let key = format!("{}:item:1", d.prefix);
    fill(&mut r, std::slice::from_ref(&key)).await;
    let changed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    d.sql("UPDATE app.items SET name = 'b' WHERE id = 1").await;
    wait_gone(&d, &r, std::slice::from_ref(&key), Duration::from_secs(20)).await;

    let text = d
        .wait_for("the change's publish and acknowledgement in /metrics", Duration::from_secs(20), || async {
            let text = scrape(address).await;
            let change = sample(&text, "evictd_last_change_timestamp_seconds")?;
            let progress = sample(&text, "evictd_last_progress_timestamp_seconds")?;
            (change > 0.0 && progress >= change).then_some(text)
        })
        .await;
    for transport in ["pubsub", "stream"] {
        let series = format!(
            r#"evictd_broadcast_publishes_total{{target="primary",transport="{transport}",kind="batch",outcome="ok"}}"#
        );
        assert!(sample(&text, &series).is_some_and(|n| n >= 1.0), "{series} in:\n{text}");
    }
    let heartbeats =
        r#"evictd_broadcast_publishes_total{target="primary",transport="pubsub",kind="heartbeat",outcome="ok"}"#;
    assert!(sample(&text, heartbeats).is_some_and(|n| n >= 1.0), "{heartbeats} in:\n{text}");
    let change = sample(&text, "evictd_last_change_timestamp_seconds").unwrap();
    assert!((changed_at - 1.0..changed_at + 30.0).contains(&change), "change at {change}, committed at {changed_at}");
    assert_eq!(sample(&text, r#"evictd_sink_up{target="primary"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"evictd_sink_second_delete_failures_total{target="primary"}"#), Some(0.0));
    assert_eq!(sample(&text, "evictd_active"), Some(1.0), "the role is evictd_active: {text}");
    for name in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_start_time_seconds"] {
        assert!(sample(&text, name).is_some_and(|v| v > 0.0), "{name} in:\n{text}");
    }
    assert!(sample(&text, "process_cpu_seconds_total").is_some_and(|v| v > 0.0), "{text}");
    d.finish().await;
}

/// A `redis-server` of this test's own on a free port, stopped and started
/// again on the same port.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let mut redis = OwnRedis { port: super::outage::free_port(), dir: tempfile::tempdir().unwrap(), child: None };
        redis.up();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::kill(&mut child);
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// Redis goes away between a key's first delete and its delayed second
/// one: the second delete's failure is counted. A change during the
/// outage fails its batch: `evictd_sink_up` drops to 0 (and `/readyz`
/// says why); once Redis is back the batch goes through and it is 1 again.
#[tokio::test]
async fn a_stopped_redis_counts_the_failed_second_delete_and_sink_up_follows_it() {
    let mut own = OwnRedis::start();
    let mut d = Daemon::custom(&super::support::pg_url(), &own.url(), SCHEMA, graph_with_second_delete, "").await;
    d.sql("INSERT INTO app.items SELECT g, 'a' FROM generate_series(1, 2) g").await;
    d.start().await;
    let address = d.http_address().await;
    let up = r#"evictd_sink_up{target="primary"}"#;
    let failures = r#"evictd_sink_second_delete_failures_total{target="primary"}"#;
    d.wait_for("sink up after the start-up check", Duration::from_secs(10), || async {
        (sample(&scrape(address).await, up) == Some(1.0)).then_some(())
    })
    .await;

    let r = redis(&own.url()).await;
    let first = format!("{}:item:1", d.prefix);
    fill(&mut r.clone(), std::slice::from_ref(&first)).await;
    d.sql("UPDATE app.items SET name = 'b' WHERE id = 1").await;
    wait_gone(&d, &r, std::slice::from_ref(&first), Duration::from_secs(10)).await;
    // The first delete is done; its second one is 3 s away.
    drop(r);
    own.down();
    assert_eq!(sample(&scrape(address).await, failures), Some(0.0), "no second delete ran yet");
    d.wait_for("the failed second delete to be counted", Duration::from_secs(20), || async {
        (sample(&scrape(address).await, failures) == Some(1.0)).then_some(())
    })
    .await;

    d.sql("UPDATE app.items SET name = 'b' WHERE id = 2").await;
    d.wait_for("sink up to drop to 0 while Redis is stopped", Duration::from_secs(20), || async {
        (sample(&scrape(address).await, up) == Some(0.0)).then_some(())
    })
    .await;
    let ready = super::server::get(address, "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (503, "sink primary: unreachable\n"));

    own.up();
    d.wait_for("sink up to be 1 again once Redis is back", Duration::from_secs(30), || async {
        (sample(&scrape(address).await, up) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(super::server::get(address, "/readyz").await.status, 200);
    d.finish().await;
}

fn brokers() -> String {
    super::kafka::brokers()
}

/// Consumes a topic through the Kafka source and acknowledges every
/// message: the position, committed offset and high watermark of its
/// partition reach the end, the lag is their difference (0), and the
/// partition's series go away when the consumer leaves the group.
#[tokio::test]
async fn kafka_partition_offsets_follow_consumption_and_leave_with_the_partition() {
    use evictd::source::{Source as _, SourceEvent};
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000;
    let topic = format!("m{}x{n}.app.items", std::process::id());
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let new_topic = NewTopic::new(&topic, 1, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new_topic], &AdminOptions::new()).await.unwrap() {
        result.unwrap();
    }
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let messages = 7;
    for id in 0..messages {
        // Heartbeat-like messages (no row change): each is an empty
        // transaction whose offset flows through the watermark.
        let value = serde_json::json!({"ts_ms": 1}).to_string();
        let record = FutureRecord::to(&topic).key("k").payload(&value).partition(0);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        let _ = id;
    }

    let mut config = evictd::config::KafkaSource::new(&brokers(), &format!("evictd-test-{topic}"), vec![topic.clone()]);
    for (k, v) in [("statistics.interval.ms", "100"), ("auto.commit.interval.ms", "100")] {
        config.properties.insert(k.to_owned(), v.to_owned());
    }
    let metrics = std::sync::Arc::new(evictd::metrics::Metrics::new());
    let mut source = evictd::source::kafka::KafkaSource::start(&config, Default::default(), metrics.clone()).unwrap();
    let mut last = None;
    let mut delivered = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered < messages {
        assert!(Instant::now() < deadline, "only {delivered} of {messages} messages delivered");
        let event = tokio::time::timeout(Duration::from_secs(30), source.next()).await.expect("an event").unwrap();
        match event {
            SourceEvent::Commit { position, .. } => {
                delivered += 1;
                last = Some(position);
            }
            SourceEvent::Undecodable(message) => {
                delivered += 1;
                last = Some(message.position);
            }
            _ => {}
        }
    }
    source.acknowledge(&last.unwrap()).await.unwrap();

    let labels = format!(r#"{{topic="{topic}",partition="0"}}"#);
    let series = |name: &str| format!("{name}{labels}");
    let end = f64::from(messages);
    let started = Instant::now();
    let text = loop {
        // Keep polling the consumer: statistics and commits are served by it.
        let _ = tokio::time::timeout(Duration::from_millis(50), source.next()).await;
        let text = metrics.encode().unwrap();
        let at_end =
            ["evictd_kafka_position_offset", "evictd_kafka_committed_offset", "evictd_kafka_high_watermark_offset"]
                .iter()
                .all(|name| sample(&text, &series(name)) == Some(end));
        if at_end && sample(&text, &series("evictd_kafka_consumer_lag_messages")) == Some(0.0) {
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "offsets not at {end} in:\n{text}");
    };
    assert!(text.contains("# TYPE evictd_kafka_committed_offset gauge"), "{text}");

    source.shutdown().await;
    let text = metrics.encode().unwrap();
    assert!(!text.contains(&labels), "the revoked partition's series are gone:\n{text}");
}
