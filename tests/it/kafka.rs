//! The Kafka source end to end, against the real Kafka-protocol broker
//! (`EVICTD_TEST_KAFKA_BROKERS`) and, for the Debezium tests, the real
//! Debezium Postgres connector (`scripts/services/debezium-run.sh`, set up
//! by `scripts/test.sh`: `EVICTD_TEST_DEBEZIUM_VENV`).
//!
//! - events Debezium itself produced invalidate their keys;
//! - SIGKILL mid-topic and restart: nothing lost, offsets committed to the end;
//! - two replicas in one group split the partitions; killing one moves its
//!   partitions to the other with nothing lost;
//! - the same workload through the Postgres source and through Debezium
//!   invalidates the same keys;
//! - a message that cannot be decoded goes to the dead-letter topic and the
//!   partition goes on; with `on_error = "stop"` the daemon stops before it;
//! - a dead-letter producer fenced after an outage longer than its send
//!   timeout is replaced (a broker of the test's own behind
//!   scripts/drill/kafka_proxy.py).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::AsyncCommands as _;

use super::daemon::{Daemon, exists, fill, redis, redis_url};
use super::support::{TestDb, pg_url, root};

pub fn brokers() -> String {
    std::env::var("EVICTD_TEST_KAFKA_BROKERS")
        .expect("EVICTD_TEST_KAFKA_BROKERS is not set: run the integration tests through scripts/test.sh")
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub(super) fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000;
    format!("{prefix}{}x{n}x{nanos}", std::process::id())
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    for r in results {
        r.unwrap();
    }
}

fn producer() -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", brokers()).set("linger.ms", "5").create().unwrap()
}

/// A Debezium insert/update/delete event (no embedded schema) of
/// `app.items`, as the connector writes it.
pub(super) fn event(op: &str, before: Option<serde_json::Value>, after: Option<serde_json::Value>) -> String {
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    serde_json::json!({
        "before": before, "after": after, "op": op,
        "source": {"connector": "postgresql", "schema": "app", "table": "items", "txId": 1, "ts_ms": now_us / 1000, "ts_us": now_us},
        "ts_ms": now_us / 1000,
    })
    .to_string()
}

pub(super) fn item(id: i64, owner: i64) -> serde_json::Value {
    serde_json::json!({"id": id, "owner_id": owner, "name": format!("item {id}")})
}

/// Sends `(key id, value)` pairs to `topic`, each to partition `id % partitions`.
async fn produce(topic: &str, partitions: i32, messages: &[(i64, String)]) {
    let producer = producer();
    let sends = messages.iter().map(|(id, value)| {
        let key = serde_json::json!({"id": id}).to_string();
        let partition = (*id % i64::from(partitions)) as i32;
        let producer = &producer;
        async move {
            let record = FutureRecord::to(topic).key(&key).payload(value).partition(partition);
            producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        }
    });
    futures_util::future::join_all(sends).await;
}

/// `[source.kafka]`: the `app.items` topic of the test.
fn items_topic(prefix: &str) -> String {
    format!("topics = [\"{prefix}.app.items\"]")
}

pub(super) fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "owner_id", "name"]

[caches.{prefix}_item]
key = "{prefix}:item:{{id}}"
[[caches.{prefix}_item.depends]]
table = "app.items"

[caches.{prefix}_owner_items]
key = "{prefix}:owner:{{owner_id}}:items"
[[caches.{prefix}_owner_items.depends]]
table = "app.items"
"#
    )
}

/// One Kafka test's world: a graph, a config, replicas of `evictd run`.
struct KafkaDaemon {
    prefix: String,
    group: String,
    dead_letter_topic: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    replicas: Vec<Option<Child>>,
}

impl KafkaDaemon {
    /// `graph` and `source` (the `[source.kafka]` lines besides `brokers`,
    /// `group_id` and `properties`) are given the test's unique prefix.
    fn new(graph: impl Fn(&str) -> String, source: impl Fn(&str) -> String, extra: &str) -> KafkaDaemon {
        let prefix = unique("k");
        let group = format!("evictd-test-{prefix}");
        let dead_letter_topic = format!("{prefix}.dead-letters");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("graph.toml"), graph(&prefix)).unwrap();
        let source = source(&prefix);
        let config = dir.path().join("evictd.toml");
        let redis_section = if extra.contains("[redis.primary]") {
            String::new()
        } else {
            format!("[redis.primary]\nurl = \"{}\"\n", redis_url())
        };
        std::fs::write(
            &config,
            format!(
                r#"
[graph]
paths = ["graph.toml"]
[source]
kind = "kafka"
[source.kafka]
brokers = "{brokers}"
group_id = "{group}"
{source}
# A killed member's partitions move after the session timeout.
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[dead_letter]
topic = "{dead_letter_topic}"
[batch]
max_delay_ms = 5
[run]
retry_max_ms = 200
shutdown_grace_ms = 5000
{redis_section}{extra}
[server]
listen = "127.0.0.1:0"
[log]
level = "info,evictd=debug,librdkafka=warn"
"#,
                brokers = brokers()
            ),
        )
        .unwrap();
        KafkaDaemon { prefix, group, dead_letter_topic, dir, config, replicas: Vec::new() }
    }

    /// The topic of `app.items` in the tests that produce their own events.
    fn items_topic(&self) -> String {
        format!("{}.app.items", self.prefix)
    }

    fn log_path(&self, replica: usize) -> PathBuf {
        self.dir.path().join(format!("evictd-{replica}.log"))
    }

    fn log(&self, replica: usize) -> String {
        std::fs::read_to_string(self.log_path(replica)).unwrap_or_default()
    }

    fn logs(&self) -> String {
        (0..self.replicas.len()).map(|i| format!("--- replica {i}\n{}", self.log(i))).collect()
    }

    /// Starts replica `n` (a new one, or again after a kill).
    fn start(&mut self, n: usize) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(n)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_evictd"))
            .args(["run", "--config", self.config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("evictd starts");
        if self.replicas.len() <= n {
            self.replicas.resize_with(n + 1, || None);
        }
        self.replicas[n] = Some(child);
    }

    fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.replicas.get_mut(n).and_then(Option::take) {
            super::process::kill(&mut child);
        }
    }

    fn terminate(&mut self, n: usize) -> Option<i32> {
        let mut child = self.replicas.get_mut(n).and_then(Option::take)?;
        super::process::terminate(&mut child, Duration::from_secs(30)).unwrap_or_else(|e| panic!("replica {n}: {e}"))
    }

    async fn wait_for<F, Fut, T>(&self, what: &str, limit: Duration, check: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        super::support::wait_until(what, limit, || self.logs(), check).await
    }

    async fn wait_gone(&self, conn: &redis::aio::MultiplexedConnection, keys: &[String], limit: Duration) {
        let keys = keys.to_vec();
        self.wait_for(&format!("{} keys to be invalidated", keys.len()), limit, || {
            let mut conn = conn.clone();
            let keys = keys.clone();
            async move {
                let mut left = 0u64;
                for chunk in keys.chunks(500) {
                    let n: u64 = conn.exists(chunk).await.ok()?;
                    left += n;
                }
                (left == 0).then_some(())
            }
        })
        .await;
    }

    /// Waits until replica `n` logs a non-empty assignment.
    async fn wait_assigned(&self, n: usize) {
        self.wait_for(&format!("replica {n} to be assigned partitions"), Duration::from_secs(60), || async {
            self.log(n)
                .lines()
                .any(|l| l.contains("partitions assigned") && !l.contains("partitions=\"\""))
                .then_some(())
        })
        .await;
    }

    /// The group's committed offset per partition of `topic`.
    fn committed(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", &self.group).create().unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition(topic, p);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        (0..partitions)
            .map(|p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }
}

impl Drop for KafkaDaemon {
    fn drop(&mut self) {
        for n in 0..self.replicas.len() {
            self.kill(n);
        }
    }
}

/// Messages of `topic`, read from the start (every partition, no group)
/// until `count` arrived or `limit` passed.
fn read_topic(topic: &str, count: usize, limit: Duration) -> Vec<rdkafka::message::OwnedMessage> {
    read_topic_at(&brokers(), topic, count, limit)
}

/// [`read_topic`] on the broker at `bootstrap`; its `client.id` lets it
/// through the faults of scripts/drill/kafka_proxy.py.
fn read_topic_at(bootstrap: &str, topic: &str, count: usize, limit: Duration) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", DIRECT_CLIENT_ID)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let deadline = Instant::now() + limit;
    // The topic may not exist yet (Debezium creates its topics on first use).
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        let found = metadata.ok().and_then(|m| {
            m.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().len() as i32).filter(|n| *n > 0)
        });
        if let Some(n) = found {
            break n;
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&list).unwrap();
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    out
}

#[tokio::test]
async fn a_killed_consumer_resumes_from_committed_offsets_and_loses_nothing() {
    let mut d = KafkaDaemon::new(graph, items_topic, "");
    let topic = d.items_topic();
    // Small batches: many acknowledgements to be killed between.
    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, config.replace("max_delay_ms = 5", "max_delay_ms = 5\nmax_effects = 20")).unwrap();
    let partitions = 3;
    create_topic(&topic, partitions).await;
    let n = 3000;
    let messages: Vec<(i64, String)> = (0..n).map(|id| (id, event("c", None, Some(item(id, id % 7))))).collect();
    produce(&topic, partitions, &messages).await;
    let url = redis_url();
    let mut r = redis(&url).await;
    let keys: Vec<String> = (0..n).map(|id| format!("{}:item:{id}", d.prefix)).collect();
    fill(&mut r, &keys).await;

    d.start(0);
    // Kill as soon as the first keys are gone: mid-topic.
    d.wait_for("the first invalidations", Duration::from_secs(60), || {
        let mut r = r.clone();
        let keys = keys.clone();
        async move {
            let left: u64 = r.exists(&keys[..]).await.ok()?;
            (left < n as u64).then_some(())
        }
    })
    .await;
    d.kill(0);
    let left: u64 = r.exists(&keys[..]).await.unwrap();
    eprintln!("killed with {left} of {n} keys left");

    d.start(0);
    d.wait_gone(&r, &keys, Duration::from_secs(60)).await;
    // Everything confirmed is committed, up to the end of every partition.
    let expected: Vec<i64> = (0..partitions)
        .map(|p| (0..n).filter(|id| id % i64::from(partitions) == i64::from(p)).count() as i64)
        .collect();
    d.wait_for("the offsets to be committed to the end", Duration::from_secs(30), || async {
        (d.committed(&topic, partitions) == expected).then_some(())
    })
    .await;
    assert_eq!(d.terminate(0), Some(0), "{}", d.logs());
}

#[tokio::test]
async fn two_replicas_split_the_partitions_and_a_killed_one_loses_nothing() {
    let mut d = KafkaDaemon::new(graph, items_topic, "");
    let topic = d.items_topic();
    let partitions = 4;
    create_topic(&topic, partitions).await;
    let url = redis_url();
    let mut r = redis(&url).await;

    d.start(0);
    d.wait_assigned(0).await;
    d.start(1);
    d.wait_assigned(1).await;
    // Both hold some partitions once the second join settled.
    d.wait_for("a rebalance giving each replica partitions", Duration::from_secs(60), || async {
        let last = |n: usize| {
            d.log(n)
                .lines()
                .rev()
                .find(|l| l.contains("partitions assigned") || l.contains("partitions revoked"))
                .map(|l| l.contains("partitions assigned") && !l.contains("partitions=\"\""))
        };
        (last(0) == Some(true) && last(1) == Some(true)).then_some(())
    })
    .await;

    let first: Vec<i64> = (0..400).collect();
    let keys: Vec<String> = first.iter().map(|id| format!("{}:item:{id}", d.prefix)).collect();
    fill(&mut r, &keys).await;
    produce(
        &topic,
        partitions,
        &first.iter().map(|id| (*id, event("c", None, Some(item(*id, 1))))).collect::<Vec<_>>(),
    )
    .await;
    d.wait_gone(&r, &keys, Duration::from_secs(30)).await;
    let consumed = |n: usize| d.log(n).matches("acknowledging").count();
    assert!(consumed(0) > 0 && consumed(1) > 0, "both replicas applied batches:\n{}", d.logs());

    // Replica 0 dies without a word; its partitions go to replica 1 once
    // the group notices (session timeout), and nothing is lost.
    d.kill(0);
    let second: Vec<i64> = (400..800).collect();
    let keys: Vec<String> = second.iter().map(|id| format!("{}:item:{id}", d.prefix)).collect();
    fill(&mut r, &keys).await;
    produce(
        &topic,
        partitions,
        &second.iter().map(|id| (*id, event("c", None, Some(item(*id, 1))))).collect::<Vec<_>>(),
    )
    .await;
    d.wait_gone(&r, &keys, Duration::from_secs(90)).await;
    assert_eq!(d.terminate(1), Some(0), "{}", d.logs());
}

#[tokio::test]
async fn a_message_that_cannot_be_decoded_goes_to_the_dead_letter_topic() {
    let mut d = KafkaDaemon::new(graph, items_topic, "");
    let topic = d.items_topic();
    create_topic(&topic, 1).await;
    create_topic(&d.dead_letter_topic, 1).await;
    let url = redis_url();
    let mut r = redis(&url).await;
    let after = format!("{}:item:2", d.prefix);
    fill(&mut r, std::slice::from_ref(&after)).await;
    let producer = producer();
    let bad = FutureRecord::to(&topic).key("{\"id\": 1}").payload("{\"op\": \"c\", \"after\": {\"id\": 1}").headers(
        rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header { key: "trace", value: Some("abc") }),
    );
    producer.send(bad, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    produce(&topic, 1, &[(2, event("c", None, Some(item(2, 1))))]).await;

    d.start(0);
    // The partition went on past the bad message.
    d.wait_gone(&r, std::slice::from_ref(&after), Duration::from_secs(30)).await;
    let letters = read_topic(&d.dead_letter_topic, 1, Duration::from_secs(20));
    assert_eq!(letters.len(), 1, "one dead letter; logs:\n{}", d.logs());
    let letter = &letters[0];
    assert_eq!(letter.payload(), Some(&b"{\"op\": \"c\", \"after\": {\"id\": 1}"[..]));
    assert_eq!(letter.key(), Some(&b"{\"id\": 1}"[..]));
    let headers: Vec<(String, String)> = letter
        .headers()
        .unwrap()
        .iter()
        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
        .collect();
    let header = |k: &str| headers.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(header("trace"), Some("abc"), "original headers kept: {headers:?}");
    assert!(header("evictd.error").is_some_and(|e| e.contains("not JSON")), "{headers:?}");
    assert_eq!(header("evictd.source.topic"), Some(topic.as_str()));
    assert_eq!(header("evictd.source.offset"), Some("0"));
    assert!(d.log(0).contains("dead-lettered a message that cannot be decoded"), "{}", d.logs());
    assert_eq!(d.terminate(0), Some(0), "{}", d.logs());
    // The bad message's offset was committed with the rest.
    assert_eq!(d.committed(&topic, 1), vec![2]);
}

/// Issue 12, deliverable 3: with `dead_letter.on_error = "stop"` the run
/// loop (no longer the source) stops at a message that cannot be decoded,
/// with today's text, writes no dead letter and commits no offset past it.
#[tokio::test]
async fn with_on_error_stop_a_message_that_cannot_be_decoded_stops_the_daemon_before_it() {
    let mut d = KafkaDaemon::new(graph, items_topic, "");
    let text = std::fs::read_to_string(&d.config).unwrap();
    let stop = text.replace("[dead_letter]\n", "[dead_letter]\non_error = \"stop\"\n");
    assert_ne!(stop, text);
    std::fs::write(&d.config, stop).unwrap();
    let topic = d.items_topic();
    create_topic(&topic, 1).await;
    create_topic(&d.dead_letter_topic, 1).await;
    let url = redis_url();
    let mut r = redis(&url).await;
    let after = format!("{}:item:2", d.prefix);
    fill(&mut r, std::slice::from_ref(&after)).await;
    produce(&topic, 1, &[(1, event("c", None, Some(item(1, 1))))]).await;
    let bad = FutureRecord::to(&topic).key("{\"id\": 9}").payload("{\"op\": \"c\"").partition(0);
    producer().send(bad, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    produce(&topic, 1, &[(2, event("c", None, Some(item(2, 1))))]).await;

    d.start(0);
    let status = {
        let child = d.replicas[0].as_mut().unwrap();
        super::process::wait_within(child, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
    };
    d.replicas[0] = None;
    assert_eq!(status.code(), Some(1), "stops as a runtime failure; logs:\n{}", d.logs());
    let log = d.log(0);
    assert!(
        log.contains(&format!("source: cannot decode the message at kafka:{topic}/0@1"))
            && log.contains("stopping without acknowledging it (dead_letter.on_error = \"stop\")"),
        "{log}"
    );
    assert!(d.committed(&topic, 1)[0] <= 1, "an offset past the bad message was committed");
    assert!(exists(&mut r, &after).await, "nothing after the bad message was applied");
    assert!(read_topic(&d.dead_letter_topic, 1, Duration::from_secs(3)).is_empty(), "stop mode writes no dead letter");
}

/// The `client.id` prefix scripts/drill/kafka_proxy.py never cuts: the
/// test's own clients reach the broker whatever happens to evictd's.
const DIRECT_CLIENT_ID: &str = "drill-direct-it";

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A Tansu broker of the test's own (scripts/services/kafka-start.sh,
/// memory storage) behind scripts/drill/kafka_proxy.py. The broker
/// advertises the proxy's address, so every client's connections after
/// bootstrap go through the proxy, which can cut evictd's producing
/// connections (its dead-letter producer's) while its consumer's flow.
/// Stopped, with its directory, when dropped.
struct ProxiedBroker {
    dir: tempfile::TempDir,
    broker_port: u16,
    proxy_port: u16,
    proxy: Child,
    control: std::io::BufReader<std::net::TcpStream>,
}

impl ProxiedBroker {
    fn start(topics: &[&str]) -> ProxiedBroker {
        let dir = tempfile::tempdir().unwrap();
        let (broker_port, proxy_port, control_port) = (free_port(), free_port(), free_port());
        let mut proxy = Command::new("python3")
            .arg(root().join("scripts/drill/kafka_proxy.py"))
            .args(["--listen", &format!("127.0.0.1:{proxy_port}")])
            .args(["--upstream", &format!("127.0.0.1:{broker_port}")])
            .args(["--control", &format!("127.0.0.1:{control_port}")])
            .args(["--direct-client-id", DIRECT_CLIENT_ID])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs kafka_proxy.py");
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(proxy.stdout.take().unwrap()), &mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "kafka_proxy.py did not start");
        let control = std::net::TcpStream::connect(("127.0.0.1", control_port)).unwrap();
        let broker = ProxiedBroker { dir, broker_port, proxy_port, proxy, control: std::io::BufReader::new(control) };
        let topics: Vec<String> = topics.iter().map(|t| format!("{t}:1")).collect();
        let mut start = broker.script("kafka-start.sh");
        start.env("KAFKA_TOPICS", topics.join(" ")).stdout(Stdio::null());
        let status = super::process::status_within(&mut start, Duration::from_secs(120));
        assert!(status.success(), "kafka-start.sh failed; broker log:\n{}", broker.log());
        broker
    }

    fn script(&self, name: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(root().join("scripts/services").join(name))
            .env("KAFKA_HOST", "127.0.0.1")
            .env("KAFKA_PORT", self.broker_port.to_string())
            .env("KAFKA_ADVERTISED", format!("127.0.0.1:{}", self.proxy_port))
            .env("KAFKA_DIR", self.dir.path().join("kafka"));
        command
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kafka/broker.log")).unwrap_or_default()
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.proxy_port)
    }

    /// A proxy command (`partition produce`, `heal produce`), answered `ok`.
    fn command(&mut self, line: &str) {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.control.get_mut(), "{line}").unwrap();
        let mut answer = String::new();
        self.control.read_line(&mut answer).unwrap();
        assert!(answer.starts_with("ok"), "kafka proxy: {line:?} -> {answer:?}");
    }

    /// A producer of the test's own, never cut by the proxy.
    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("client.id", DIRECT_CLIENT_ID)
            .create()
            .unwrap()
    }
}

impl Drop for ProxiedBroker {
    fn drop(&mut self) {
        super::process::kill(&mut self.proxy);
        let mut stop = self.script("kafka-stop.sh");
        stop.env("KAFKA_WIPE", "1").stdout(Stdio::null()).stderr(Stdio::null());
        let _ = super::process::status_within(&mut stop, Duration::from_secs(60));
    }
}

/// The fault drill's finding: with the dead-letter topic unreachable for
/// longer than the dead-letter producer's send timeout (10 s), librdkafka's
/// idempotent producer bumps its epoch after the timed-out in-flight
/// request, and Tansu answers every later send with PRODUCER_FENCED. The
/// producer must be replaced: once the destination is back, the bad
/// message is dead-lettered and the change queued behind it applied.
#[tokio::test]
async fn a_dead_letter_producer_fenced_after_a_long_outage_is_replaced_and_the_partition_goes_on() {
    let mut d = KafkaDaemon::new(graph, items_topic, "");
    let topic = d.items_topic();
    let mut broker = ProxiedBroker::start(&[&topic, &d.dead_letter_topic]);
    let config = std::fs::read_to_string(&d.config).unwrap();
    let config =
        config.replace(&format!("brokers = \"{}\"", brokers()), &format!("brokers = \"{}\"", broker.bootstrap()));
    std::fs::write(&d.config, config).unwrap();
    let url = redis_url();
    let mut r = redis(&url).await;
    let after = format!("{}:item:2", d.prefix);
    fill(&mut r, std::slice::from_ref(&after)).await;

    d.start(0);
    d.wait_assigned(0).await;
    // The dead-letter producer's connections (it asked for a producer id
    // at start) go silent; the consumer's flow.
    broker.command("partition produce");
    let producer = broker.producer();
    let bad = FutureRecord::to(&topic).key("{\"id\": 1}").payload("not a Debezium event {");
    producer.send(bad, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    let good = event("c", None, Some(item(2, 1)));
    let good = FutureRecord::to(&topic).key("{\"id\": 2}").payload(&good);
    producer.send(good, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    // Past the send timeout, with the send in flight.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(exists(&mut r, &after).await, "the change behind the bad message waits for its dead letter");
    broker.command("heal produce");
    let healed = Instant::now();

    d.wait_gone(&r, std::slice::from_ref(&after), Duration::from_secs(20)).await;
    eprintln!("the change behind the bad message applied {:?} after the heal", healed.elapsed());
    let bootstrap = broker.bootstrap();
    let dead_letter_topic = d.dead_letter_topic.clone();
    let letters =
        tokio::task::spawn_blocking(move || read_topic_at(&bootstrap, &dead_letter_topic, 1, Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(!letters.is_empty(), "the bad message was dead-lettered; logs:\n{}", d.logs());
    assert_eq!(letters[0].payload(), Some(&b"not a Debezium event {"[..]));
    // This broker fences the bumped epoch: the way out was a new producer.
    let log = d.log(0);
    let replaced: Vec<&str> = log.lines().filter(|l| l.contains("replaced it with a new one")).collect();
    eprintln!("{}", replaced.join("\n"));
    assert!(!replaced.is_empty(), "{}", d.logs());
    assert_eq!(d.terminate(0), Some(0), "{}", d.logs());
}

/// The real Debezium Postgres connector, streaming one database into the
/// test broker; stopped (and its slot dropped) when dropped.
struct Debezium {
    state_dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Debezium {
    fn start(db: &TestDb, prefix: &str, slot: &str, extra: &[(&str, &str)]) -> Debezium {
        let url = url::Url::parse(&db.url).unwrap();
        let state_dir = std::env::temp_dir().join(format!("evictd-debezium-t-{prefix}"));
        let mut env: Vec<(String, String)> = vec![
            ("PGHOST".into(), url.host_str().unwrap().to_owned()),
            ("PGPORT".into(), url.port().unwrap_or(5432).to_string()),
            ("PGUSER".into(), url.username().to_owned()),
            ("PGDATABASE".into(), db.name.clone()),
            ("KAFKA_BOOTSTRAP".into(), brokers()),
            ("DBZ_STATE_DIR".into(), state_dir.display().to_string()),
            ("DBZ_SLOT".into(), slot.to_owned()),
            ("DBZ_PUBLICATION".into(), format!("{slot}_pub")),
            ("DBZ_TOPIC_PREFIX".into(), prefix.to_owned()),
            ("DBZ_SNAPSHOT_MODE".into(), "no_data".into()),
            ("DBZ_SCHEMAS".into(), "true".into()),
            ("DBZ_BACKGROUND".into(), "1".into()),
        ];
        if let Ok(venv) = std::env::var("EVICTD_TEST_DEBEZIUM_VENV") {
            env.push(("DBZ_VENV".into(), venv));
        }
        for (k, v) in extra {
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        let mut run = Command::new("bash");
        run.arg(root().join("scripts/services/debezium-run.sh"))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null());
        // DBZ_BACKGROUND=1: the script returns once Debezium streams.
        let status = super::process::status_within(&mut run, Duration::from_secs(300));
        let debezium = Debezium { state_dir, env };
        assert!(status.success(), "debezium-run.sh failed; its log:\n{}", debezium.log());
        debezium
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("debezium.log")).unwrap_or_default()
            + &std::fs::read_to_string(self.state_dir.join("runner.out")).unwrap_or_default()
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        let mut stop = Command::new("bash");
        stop.arg(root().join("scripts/services/debezium-stop.sh"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("DBZ_RESET", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = super::process::status_within(&mut stop, Duration::from_secs(120));
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Waits until `topic` holds at least `count` messages.
async fn wait_messages(topic: &str, count: usize, limit: Duration, debezium: &Debezium) {
    let topic = topic.to_owned();
    let found = tokio::task::spawn_blocking(move || read_topic(&topic, count, limit).len()).await.unwrap();
    assert!(found >= count, "Debezium wrote {found} of {count} messages; its log:\n{}", debezium.log());
}

const ITEMS: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, owner_id bigint NOT NULL, name text NOT NULL);
ALTER TABLE app.items REPLICA IDENTITY FULL;
INSERT INTO app.items SELECT g, g % 3, 'item ' || g FROM generate_series(1, 5) g;
";

#[tokio::test]
async fn events_from_the_real_debezium_connector_invalidate_their_keys() {
    let db = TestDb::new("kdbz").await;
    db.run_sql(ITEMS).await;
    let source =
        |prefix: &str| format!("topic_pattern = \"^{prefix}\\\\.app\\\\..*\"\nfull_row_deletes = [\"app.items\"]");
    let mut d = KafkaDaemon::new(graph, source, "");
    let prefix = d.prefix.clone();
    let debezium = Debezium::start(&db, &prefix, &format!("evictd_t_{prefix}"), &[]);
    let url = redis_url();
    let mut r = redis(&url).await;
    let key = |what: &str| format!("{prefix}:{what}");
    let keys = [
        key("item:1"),
        key("item:2"),
        key("item:3"),
        key("item:9"),
        key("owner:1:items"),
        key("owner:2:items"),
        key("owner:0:items"),
    ];
    fill(&mut r, &keys).await;
    // Update, owner move, delete, insert: four transactions.
    db.run_sql("UPDATE app.items SET name = 'renamed' WHERE id = 1").await;
    db.run_sql("UPDATE app.items SET owner_id = 0 WHERE id = 2").await;
    db.run_sql("DELETE FROM app.items WHERE id = 3").await;
    db.run_sql("INSERT INTO app.items VALUES (9, 1, 'nine')").await;
    let topic = format!("{prefix}.app.items");
    // Four events and the delete's tombstone.
    wait_messages(&topic, 5, Duration::from_secs(60), &debezium).await;

    d.start(0);
    d.wait_gone(&r, &keys, Duration::from_secs(60)).await;
    // An item nobody changed keeps its key.
    let untouched = key("item:4");
    fill(&mut r, std::slice::from_ref(&untouched)).await;
    db.run_sql("UPDATE app.items SET name = 'again' WHERE id = 5").await;
    let five = key("item:5");
    fill(&mut r, std::slice::from_ref(&five)).await;
    d.wait_gone(&r, std::slice::from_ref(&five), Duration::from_secs(60)).await;
    assert!(exists(&mut r, &untouched).await, "an unchanged row's key stays");
    assert_eq!(d.terminate(0), Some(0), "{}", d.logs());
    drop(debezium);
    db.drop().await;
}

/// Every key, tag and flushed cache broadcast on `channel` until no batch
/// message came for `quiet` (after at least one), or `limit`.
async fn collect_broadcasts(
    mut messages: impl futures_util::Stream<Item = redis::Msg> + Unpin,
    quiet: Duration,
    limit: Duration,
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + limit;
    // Quiet means no batch message: heartbeats come every second regardless.
    let mut last_batch: Option<Instant> = None;
    loop {
        let until = last_batch.map_or(deadline, |at| (at + quiet).min(deadline));
        let Some(wait) = until.checked_duration_since(Instant::now()) else { break };
        let Ok(Some(msg)) = tokio::time::timeout(wait, messages.next()).await else { break };
        let payload: String = msg.get_payload().unwrap();
        let message: serde_json::Value = serde_json::from_str(&payload).unwrap();
        if message["kind"] == "heartbeat" {
            continue;
        }
        last_batch = Some(Instant::now());
        for (field, what) in [("keys", "key"), ("tags", "tag"), ("flush", "flush")] {
            for item in message[field].as_array().into_iter().flatten() {
                seen.insert(format!("{what} {item}"));
            }
        }
    }
    seen
}

#[tokio::test]
async fn the_same_workload_invalidates_the_same_keys_through_postgres_and_through_debezium() {
    let url = redis_url();
    let schema = std::fs::read_to_string(root().join("examples/schema/ecommerce.sql")).unwrap();
    let setup = std::fs::read_to_string(root().join("tests/fixtures/debezium/setup.sql")).unwrap();
    // psql meta-commands aside, the workload is plain SQL.
    let workload: String = std::fs::read_to_string(root().join("tests/fixtures/debezium/workload.sql"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect();
    let graph = std::fs::read_to_string(root().join("dependency-graphs/ecommerce.toml")).unwrap();

    // The Postgres side: a daemon whose slot exists before the workload.
    let pg_channel = unique("evictd-test-pg:");
    let extra = format!("[redis.primary]\nurl = \"{url}\"\nbroadcast_channel = \"{pg_channel}\"\n");
    fn no_graph(_: &str) -> String {
        String::new()
    }
    let mut pg = Daemon::custom(&pg_url(), &url, &format!("{schema}\n{setup}"), no_graph, &extra).await;
    std::fs::write(pg.dir.path().join("graph.toml"), &graph).unwrap();
    pg.start().await;
    assert_eq!(pg.terminate(), Some(0), "{}", pg.log());

    // The Debezium side, on the same database.
    let source = |prefix: &str| {
        format!(
            "topic_pattern = \"^{prefix}\\\\.(shop|fixture)\\\\..*\"\nfull_row_deletes = [\"shop.products\", \"shop.skus\", \"shop.inventory\"]"
        )
    };
    let mut k = KafkaDaemon::new(|_: &str| graph.clone(), source, "");
    let prefix = k.prefix.clone();
    let k_channel = unique("evictd-test-kafka:");
    let config = std::fs::read_to_string(&k.config).unwrap().replace(
        "[redis.primary]\n",
        &format!("[lookup]\nurl = \"{}\"\n[redis.primary]\nbroadcast_channel = \"{k_channel}\"\n", pg.db.url),
    );
    std::fs::write(&k.config, config).unwrap();
    let debezium = Debezium::start(&pg.db, &prefix, &format!("evictd_t_{prefix}"), &[]);

    pg.sql(&workload).await;
    // The workload's last row, on the audit log.
    let expected = workload.matches("INSERT INTO fixture.audit_log").count().max(1);
    wait_messages(&format!("{prefix}.fixture.audit_log"), expected, Duration::from_secs(90), &debezium).await;

    // Both daemons now read the same committed changes, and run their
    // look-ups against the same final state of the database.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut pg_sub = client.get_async_pubsub().await.unwrap();
    pg_sub.subscribe(&pg_channel).await.unwrap();
    let mut k_sub = client.get_async_pubsub().await.unwrap();
    k_sub.subscribe(&k_channel).await.unwrap();
    pg.start().await;
    k.start(0);
    let quiet = Duration::from_secs(3);
    let limit = Duration::from_secs(90);
    let (through_pg, through_kafka) = tokio::join!(
        collect_broadcasts(pg_sub.into_on_message(), quiet, limit),
        collect_broadcasts(k_sub.into_on_message(), quiet, limit)
    );
    assert!(through_pg.len() > 20, "the workload invalidates keys: {through_pg:?}\n{}", pg.log());
    let only_pg: Vec<_> = through_pg.difference(&through_kafka).collect();
    let only_kafka: Vec<_> = through_kafka.difference(&through_pg).collect();
    assert!(
        only_pg.is_empty() && only_kafka.is_empty(),
        "only through Postgres: {only_pg:?}\nonly through Debezium: {only_kafka:?}\nkafka log:\n{}",
        k.logs()
    );
    assert_eq!(k.terminate(0), Some(0), "{}", k.logs());
    drop(debezium);
    pg.finish().await;
}

/// `evictd replay --dry-run` over a captured fixture: the sorted lines.
fn dry_run(fixture: &str) -> String {
    let file = root().join("tests/fixtures/debezium").join(fixture);
    let graph = root().join("dependency-graphs/ecommerce.toml");
    let out =
        super::support::evictd(&["replay", "--dry-run", "--graph", graph.to_str().unwrap(), file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", super::support::stderr(&out));
    super::support::stdout(&out)
}

#[test]
fn replay_dry_run_of_captured_events_gives_the_same_keys_with_and_without_schemas() {
    let with = dry_run("with-schemas.jsonl");
    assert!(with.lines().count() > 20, "{with}");
    assert!(with.contains("delete\tproduct_detail\tproduct:{1}:detail\n"), "{with}");
    assert_eq!(with, dry_run("without-schemas.jsonl"));
    assert_eq!(with, dry_run("without-schemas-tx.jsonl"));
    super::support::assert_golden(&root().join("tests/golden/replay-ecommerce.txt"), &with);
}

/// A line that cannot be decoded is reported as `FILE:LINE: error`, the
/// lines around it are replayed, and the command exits 2 at the end.
#[test]
fn replay_reports_a_line_it_cannot_decode_and_goes_on() {
    let fixture = std::fs::read_to_string(root().join("tests/fixtures/debezium/without-schemas.jsonl")).unwrap();
    // Two updates of products (not snapshot reads, which the default
    // replay ignores), whose caches have direct keys.
    let lines: Vec<&str> = fixture
        .lines()
        .filter(|l| l.contains(r#""op": "u""#) && l.contains(r#""topic": "dbserver1.shop.products""#))
        .collect();
    assert!(lines.len() >= 2, "the fixture has updates");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, format!("{}\n{{not json\n{}\n", lines[0], lines[1])).unwrap();
    let graph = root().join("dependency-graphs/ecommerce.toml");
    let out =
        super::support::evictd(&["replay", "--dry-run", "--graph", graph.to_str().unwrap(), file.to_str().unwrap()]);
    let stderr = super::support::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{}:2: not JSON", file.display())), "{stderr}");
    let good = dry_run("without-schemas.jsonl");
    let printed = super::support::stdout(&out);
    assert!(!printed.is_empty(), "the lines around the bad one are replayed");
    for line in printed.lines() {
        assert!(good.contains(line), "{line} is not one of the fixture's keys");
    }
}

/// A `[source.kafka]` for a test that drives `KafkaSource` itself.
fn source_config(group: &str, topic: &str, properties: &[(&str, &str)]) -> evictd::config::KafkaSource {
    let mut config = evictd::config::KafkaSource::new(&brokers(), group, vec![topic.to_owned()]);
    for (k, v) in properties {
        config.properties.insert((*k).to_owned(), (*v).to_owned());
    }
    config
}

/// Checks that `events` is a sequence of whole transactions (and of
/// undecodable messages between them) and returns the offsets of their
/// commits and of the undecodable messages, in order.
fn whole_transactions(events: &[evictd::source::SourceEvent]) -> Vec<i64> {
    use evictd::source::SourceEvent;
    let mut open = false;
    let mut offsets = Vec::new();
    for (i, event) in events.iter().enumerate() {
        match event {
            SourceEvent::Begin => {
                assert!(!open, "event {i}: a transaction began inside another: {events:#?}");
                open = true;
            }
            SourceEvent::Change(_) => assert!(open, "event {i}: a change outside a transaction"),
            SourceEvent::Commit { position, .. } => {
                assert!(open, "event {i}: a commit without a transaction");
                open = false;
                match position {
                    evictd::change::Position::Kafka { offset, .. } => offsets.push(*offset),
                    other => panic!("not a Kafka position: {other}"),
                }
            }
            SourceEvent::Idle { .. } => assert!(!open, "event {i}: idle inside a transaction"),
            SourceEvent::Undecodable(message) => {
                assert!(!open, "event {i}: an undecodable message inside a transaction");
                match &message.position {
                    evictd::change::Position::Kafka { offset, .. } => offsets.push(*offset),
                    other => panic!("not a Kafka position: {other}"),
                }
            }
        }
    }
    assert!(!open, "the last transaction is not whole");
    offsets
}

/// Issue 11, item 6: the run loop's `select!` drops `next()` whenever
/// another branch is ready. Every poll of `next()` here is cut short after
/// a millisecond; the events must still be whole transactions, one per
/// message, none lost and none repeated. Issue 12, deliverable 3: a bad
/// message comes as one `Undecodable` event with its raw payload, between
/// transactions; the source writes no dead letter (the run loop does).
#[tokio::test]
async fn next_cancelled_at_any_await_keeps_transactions_whole_and_undecodable_messages_alone() {
    use evictd::source::{Source as _, SourceEvent};
    let prefix = unique("kc");
    let topic = format!("{prefix}.app.items");
    create_topic(&topic, 1).await;
    let n: i64 = 45;
    let producer = producer();
    for id in 0..n {
        // Every third message cannot be decoded.
        let value = if id % 3 == 0 { "{\"op\": \"c\"".to_owned() } else { event("c", None, Some(item(id, 1))) };
        let key = serde_json::json!({"id": id}).to_string();
        let record = FutureRecord::to(&topic).key(&key).payload(&value).partition(0);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let config = source_config(&format!("evictd-test-{prefix}"), &topic, &[]);
    let metrics = std::sync::Arc::new(evictd::metrics::Metrics::new());
    let mut source = evictd::source::kafka::KafkaSource::start(&config, Default::default(), metrics).unwrap();
    let mut events = Vec::new();
    let mut delivered = 0;
    let mut cancelled = 0u32;
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(90);
    while delivered < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(1), source.next()).await {
            Ok(Ok(event)) => {
                if matches!(event, SourceEvent::Commit { .. } | SourceEvent::Undecodable(_)) {
                    delivered += 1;
                }
                events.push(event);
            }
            Ok(Err(e)) => panic!("the source failed: {e}"),
            Err(_) => cancelled += 1,
        }
    }
    eprintln!("{} events in {:?}, next() cancelled {cancelled} times", events.len(), started.elapsed());
    source.shutdown().await;
    let offsets = whole_transactions(&events);
    assert_eq!(offsets, (0..n).collect::<Vec<_>>(), "one transaction or undecodable message per message, in order");
    assert!(cancelled > 0, "next() was cancelled");
    let undecodable: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Undecodable(message) => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(undecodable.len(), (n as usize).div_ceil(3), "one event per bad message");
    for message in undecodable {
        assert_eq!(message.raw.value.as_deref(), Some(&b"{\"op\": \"c\""[..]));
        assert_eq!(message.reason, evictd::source::UndecodableReason::Decode);
        assert!(message.error.contains("not JSON"), "{}", message.error);
    }
}

/// Issue 11, item 9: a delete whose Kafka key is not a JSON object (a
/// string key converter) under `REPLICA IDENTITY DEFAULT`: its non-key
/// columns are Debezium's placeholders (`0`, `""`). The key column comes
/// from the graph; the cache keyed on a non-key column is bumped whole,
/// never invalidated under the placeholder's key.
#[test]
fn a_delete_with_a_string_key_bumps_caches_of_non_key_columns_instead_of_trusting_placeholders() {
    let dir = tempfile::tempdir().unwrap();
    let graph = dir.path().join("graph.toml");
    std::fs::write(&graph, self::graph("t")).unwrap();
    let delete = serde_json::json!({
        "topic": "dbserver1.app.items", "partition": 0, "offset": 7,
        "key": "5",
        "value": {"before": {"id": 5, "owner_id": 0, "name": ""}, "after": null, "op": "d",
                  "source": {"schema": "app", "table": "items"}},
    });
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, format!("{delete}\n")).unwrap();
    let out =
        super::support::evictd(&["replay", "--dry-run", "--graph", graph.to_str().unwrap(), file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", super::support::stderr(&out));
    let lines = super::support::stdout(&out);
    assert!(lines.contains("delete\tt_item\tt:item:5\n"), "{lines}");
    assert!(lines.contains("namespace\tt_owner_items\t*\n"), "{lines}");
    assert!(!lines.contains("t:owner:0:items"), "a placeholder rendered a key:\n{lines}");
}

/// Commits `offset` for `group` on partition 0 of `topic`, as a consumer
/// of the group that left long ago would have.
fn commit_offset(bootstrap: &str, group: &str, topic: &str, offset: i64) {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(topic, 0, rdkafka::Offset::Offset(offset)).unwrap();
    consumer.commit(&list, rdkafka::consumer::CommitMode::Sync).unwrap();
}

fn committed_offset(bootstrap: &str, group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, 0);
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    match committed.find_partition(topic, 0).map(|e| e.offset()) {
        Some(rdkafka::Offset::Offset(o)) => o,
        _ => -1,
    }
}

fn kafka_source(
    config: &evictd::config::KafkaSource,
    table_keys: evictd::source::debezium::TableKeys,
    metrics: &std::sync::Arc<evictd::metrics::Metrics>,
) -> evictd::source::kafka::KafkaSource {
    evictd::source::kafka::KafkaSource::start(config, std::sync::Arc::new(table_keys), metrics.clone()).unwrap()
}

/// The next event, or the source's error, within `limit`.
async fn next_event(
    source: &mut evictd::source::kafka::KafkaSource,
    limit: Duration,
) -> Result<evictd::source::SourceEvent, evictd::source::SourceError> {
    use evictd::source::Source as _;
    tokio::time::timeout(limit, source.next()).await.expect("the source yields something in time")
}

/// Issue 11, item 11: the group's committed offset is no longer on the
/// broker (retention deleted messages the group had not read, or the
/// topic was recreated). librdkafka used to jump silently (`earliest`, or
/// a configured `latest`); now the source stops, or (`on_offset_reset =
/// "flush"`) bumps every cache through the sinks and, once that is
/// acknowledged, resumes from the earliest offset. Both are counted.
///
/// The test broker (Tansu) answers a fetch past the end with an empty
/// batch rather than `OFFSET_OUT_OF_RANGE`, so this runs against
/// librdkafka's own mock cluster, which answers as Kafka does.
#[tokio::test]
async fn a_committed_offset_the_broker_no_longer_holds_stops_or_flushes_every_cache() {
    use evictd::source::{Source as _, SourceError, SourceEvent};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = "app.items";
    cluster.create_topic(topic, 1, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    for id in 0..3 {
        let value = event("c", None, Some(item(id, 1)));
        let record = FutureRecord::to(topic).key("k").payload(&value).partition(0);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let metrics = std::sync::Arc::new(evictd::metrics::Metrics::new());
    let config = |group: &str| evictd::config::KafkaSource::new(&bootstrap, group, vec![topic.to_owned()]);

    commit_offset(&bootstrap, "stop", topic, 1000);
    let mut source = kafka_source(&config("stop"), Default::default(), &metrics);
    match next_event(&mut source, Duration::from_secs(60)).await {
        Err(e @ SourceError::Definite { .. }) => assert!(e.to_string().contains("no longer exists"), "{e}"),
        other => panic!("expected the source to stop, got {other:?}"),
    }
    source.shutdown().await;

    commit_offset(&bootstrap, "flush", topic, 1000);
    let mut flush_config = config("flush");
    flush_config.on_offset_reset = evictd::config::OnOffsetReset::Flush;
    let keys = evictd::source::debezium::TableKeys::from([
        ("app.items".to_owned(), ["id".to_owned()].into()),
        ("app.owners".to_owned(), ["id".to_owned()].into()),
    ]);
    let mut source = kafka_source(&flush_config, keys.clone(), &metrics);
    let mut flush = Vec::new();
    loop {
        let event = next_event(&mut source, Duration::from_secs(60)).await.unwrap();
        let done = matches!(event, SourceEvent::Commit { .. });
        flush.push(event);
        if done {
            break;
        }
    }
    let truncated: Vec<String> = flush
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Change(c) if c.op == evictd::change::Operation::Truncate => Some(c.table.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(truncated, ["app.items", "app.owners"], "every table of the graph: {flush:?}");
    assert!(matches!(flush[0], SourceEvent::Begin), "{flush:?}");
    let Some(SourceEvent::Commit { position, .. }) = flush.last() else { unreachable!() };
    // Not acknowledged yet: the group's offset stays where it was.
    assert_eq!(committed_offset(&bootstrap, "flush", topic), 1000);
    source.acknowledge(position).await.unwrap();
    match next_event(&mut source, Duration::from_secs(10)).await {
        Err(e @ SourceError::Transient { .. }) => assert!(e.to_string().contains("resuming from the earliest"), "{e}"),
        other => panic!("expected the session to end, got {other:?}"),
    }
    source.shutdown().await;
    assert_eq!(committed_offset(&bootstrap, "flush", topic), 0);
    // The next session reads the partition from its beginning.
    let mut source = kafka_source(&flush_config, keys, &metrics);
    let mut offsets = Vec::new();
    while offsets.len() < 3 {
        if let SourceEvent::Commit { position: evictd::change::Position::Kafka { offset, .. }, .. } =
            next_event(&mut source, Duration::from_secs(60)).await.unwrap()
        {
            offsets.push(offset);
        }
    }
    assert_eq!(offsets, [0, 1, 2]);
    source.shutdown().await;
    let text = metrics.encode().unwrap();
    for action in ["stop", "flush"] {
        let line = format!("evictd_kafka_offset_resets_total{{action=\"{action}\"}} 1");
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
}

/// Issue 11, item 11: `auto.offset.reset = "latest"` would skip every
/// message the group has not read; `check` refuses it with its place.
#[test]
fn check_refuses_auto_offset_reset_latest_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evictd.toml");
    let graph = root().join("dependency-graphs");
    std::fs::write(
        &path,
        format!(
            "[graph]\npaths = [\"{}\"]\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"127.0.0.1:9\"\ntopics = [\"t\"]\n[source.kafka.properties]\n\"auto.offset.reset\" = \"latest\"\n[redis.primary]\nurl = \"redis://127.0.0.1:9\"\n",
            graph.display()
        ),
    )
    .unwrap();
    let out = super::support::evictd(&["check", "--offline", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", super::support::stderr(&out));
    let err = super::support::stderr(&out);
    let place = format!("{}:9:23: source.kafka.properties.\"auto.offset.reset\": `latest` skips", path.display());
    assert!(err.contains(&place), "{err}");
}

/// librdkafka's judgement of `source.kafka.properties` moved out of config
/// validation (which creates no client) into `check` and the daemon's
/// start: both still refuse an unknown property with exit 2, naming the
/// file and the property.
#[test]
fn check_and_run_refuse_a_property_librdkafka_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(
        dir.path().join("graph.toml"),
        "[tables.\"app.items\"]\nkey = [\"id\"]\ncolumns = [\"id\"]\n[caches.item]\nkey = \"item:{id}\"\n[[caches.item.depends]]\ntable = \"app.items\"\n",
    )
    .unwrap();
    std::fs::write(
        &path,
        "[graph]\npaths = [\"graph.toml\"]\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"127.0.0.1:9\"\ntopics = [\"t\"]\n[source.kafka.properties]\n\"no.such.property\" = \"1\"\n[redis.primary]\nurl = \"redis://127.0.0.1:9\"\n[server]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let expected =
        format!("{}: source.kafka.properties.\"no.such.property\": rejected by librdkafka: ", path.display());
    for args in [&["check", "--offline", "--config"][..], &["run", "--config"][..]] {
        let mut args = args.to_vec();
        args.push(path.to_str().unwrap());
        let out = super::support::evictd(&args);
        let err = super::support::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&expected), "{args:?}: {err}");
    }
}
