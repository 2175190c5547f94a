//! The Kafka source over TLS and SASL, against brokers of this module's
//! own (`scripts/services/kafka-tls-start.sh`: Tansu behind stunnel4, with
//! a CA the script makes, and for SASL_SSL the script's SASL gate, which
//! checks PLAIN and SCRAM passwords; ports 19200-19204,
//! `EVICTD_TEST_KAFKA_TLS_PORT` moves them). Started once per test
//! process, idempotent across processes; `scripts/test.sh` stops it
//! (`kafka-tls-stop.sh`).
//!
//! - `security.protocol = "SSL"` with the CA in `ssl.ca.location`: evictd
//!   consumes Debezium events of topics compressed with zstd, lz4 and snappy
//!   (the producer sets `compression.type`) and invalidates their keys;
//! - a CA that did not sign the broker's certificate: the TLS handshake
//!   fails, evictd says so (librdkafka's "certificate verify failed") and
//!   keeps retrying without consuming; it stops cleanly on SIGTERM;
//! - `SASL_SSL` with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512: evictd logs in,
//!   consumes and invalidates; with SCRAM-SHA-512 a message it cannot
//!   decode goes to the dead-letter topic, through the dead-letter
//!   producer, which logs in with the same properties;
//! - a wrong password: the broker refuses the login, evictd logs Kafka's
//!   "invalid credentials" and keeps retrying, never the password.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::daemon::{exists, fill, redis, redis_url};
use super::kafka::{event, graph, item, unique};
use super::support::root;

/// What kafka-tls-start.sh printed.
struct TlsBrokers {
    ssl: String,
    sasl_ssl: String,
    ca: PathBuf,
    other_ca: PathBuf,
}

fn brokers() -> &'static TlsBrokers {
    static BROKERS: OnceLock<TlsBrokers> = OnceLock::new();
    BROKERS.get_or_init(|| {
        let mut start = Command::new("bash");
        start.arg(root().join("scripts/services/kafka-tls-start.sh"));
        if let Ok(port) = std::env::var("EVICTD_TEST_KAFKA_TLS_PORT") {
            start.env("KAFKA_TLS_PORT", port);
        }
        let out = super::process::output_within(&mut start, Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "kafka-tls-start.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let last = stdout.lines().last().unwrap_or_default();
        let fields: Vec<&str> = last.split(' ').collect();
        assert_eq!(fields.len(), 4, "kafka-tls-start.sh's last line: {last:?}");
        TlsBrokers {
            ssl: fields[0].to_owned(),
            sasl_ssl: fields[1].to_owned(),
            ca: PathBuf::from(fields[2]),
            other_ca: PathBuf::from(fields[3]),
        }
    })
}

/// The test's own clients: SSL with the test CA.
fn ssl_client() -> ClientConfig {
    let b = brokers();
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &b.ssl)
        .set("security.protocol", "SSL")
        .set("ssl.ca.location", b.ca.to_str().unwrap());
    client
}

async fn create_topics(names: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ssl_client().create().unwrap();
    let topics: Vec<NewTopic<'_>> = names.iter().map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(&topics, &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
}

/// Sends one Debezium create event of item `id` to `topic`, compressed
/// with `codec`.
async fn produce_compressed(topic: &str, codec: &str, id: i64) {
    let producer: FutureProducer = ssl_client().set("compression.type", codec).set("linger.ms", "5").create().unwrap();
    let key = serde_json::json!({"id": id}).to_string();
    let value = event("c", None, Some(item(id, 1)));
    let record = FutureRecord::to(topic).key(&key).payload(&value);
    producer.send(record, Duration::from_secs(20)).await.map_err(|(e, _)| e).unwrap();
}

/// One `evictd run` against a TLS broker: `bootstrap`, the `topics`, and
/// the client `properties` under test. Killed when dropped.
struct TlsDaemon {
    prefix: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TlsDaemon {
    fn start(bootstrap: &str, topics: &[String], properties: &[(&str, &str)]) -> TlsDaemon {
        let prefix = unique("tls");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("graph.toml"), graph(&prefix)).unwrap();
        let topics: Vec<String> = topics.iter().map(|t| format!("\"{t}\"")).collect();
        let mut props = vec![
            "\"session.timeout.ms\" = \"6000\"".to_owned(),
            "\"heartbeat.interval.ms\" = \"500\"".to_owned(),
            "\"fetch.wait.max.ms\" = \"10\"".to_owned(),
        ];
        props.extend(properties.iter().map(|(k, v)| format!("\"{k}\" = \"{v}\"")));
        let config = dir.path().join("evictd.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[graph]
paths = ["graph.toml"]
[source]
kind = "kafka"
[source.kafka]
brokers = "{bootstrap}"
group_id = "evictd-test-{prefix}"
topics = [{topics}]
[source.kafka.properties]
{props}
[dead_letter]
topic = "{prefix}.dead-letters"
[batch]
max_delay_ms = 5
[run]
retry_max_ms = 200
shutdown_grace_ms = 5000
[redis.primary]
url = "{redis}"
[server]
listen = "127.0.0.1:0"
[log]
level = "info,evictd=debug,librdkafka=warn"
"#,
                topics = topics.join(", "),
                props = props.join("\n"),
                redis = redis_url(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("evictd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_evictd"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("evictd starts");
        TlsDaemon { prefix, dir, child: Some(child) }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("evictd.log")).unwrap_or_default()
    }

    /// Waits until the log has a line with every one of `words`.
    async fn wait_logged(&self, words: &[&str], limit: Duration) -> String {
        super::support::wait_until(
            &format!("a log line with {words:?}"),
            limit,
            || self.log(),
            || async { self.log().lines().find(|l| words.iter().all(|w| l.contains(w))).map(str::to_owned) },
        )
        .await
    }

    /// Still running (it retries): then SIGTERM, which it obeys with 0.
    fn still_running_then_terminate(&mut self) {
        let child = self.child.as_mut().unwrap();
        assert!(child.try_wait().unwrap().is_none(), "evictd exited; log:\n{}", self.log());
        let mut child = self.child.take().unwrap();
        let code = super::process::terminate(&mut child, Duration::from_secs(30)).unwrap();
        assert_eq!(code, Some(0), "log:\n{}", self.log());
    }
}

impl Drop for TlsDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::kill(&mut child);
        }
    }
}

#[tokio::test]
async fn over_ssl_evictd_consumes_zstd_lz4_and_snappy_topics_and_invalidates_their_keys() {
    let b = brokers();
    let codecs = ["zstd", "lz4", "snappy", "none"];
    let run = unique("tlsc");
    let topics: Vec<String> = codecs.iter().map(|c| format!("{run}.{c}.app.items")).collect();
    create_topics(&topics).await;
    let ca = b.ca.to_str().unwrap();
    let mut d = TlsDaemon::start(&b.ssl, &topics, &[("security.protocol", "SSL"), ("ssl.ca.location", ca)]);
    let mut r = redis(&redis_url()).await;
    let keys: Vec<String> = (1..=codecs.len()).map(|id| format!("{}:item:{id}", d.prefix)).collect();
    fill(&mut r, &keys).await;
    for (i, (topic, codec)) in topics.iter().zip(codecs).enumerate() {
        produce_compressed(topic, codec, i as i64 + 1).await;
    }
    super::support::wait_until(
        "every codec's key to be invalidated",
        Duration::from_secs(60),
        || d.log(),
        || {
            let mut r = r.clone();
            let keys = keys.clone();
            async move {
                for key in &keys {
                    if exists(&mut r, key).await {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    assert!(d.log().contains("partitions assigned"), "{}", d.log());
    d.still_running_then_terminate();
}

#[tokio::test]
async fn over_ssl_a_ca_that_did_not_sign_the_broker_fails_the_handshake_clearly_and_evictd_retries() {
    let b = brokers();
    let topic = format!("{}.app.items", unique("tlsca"));
    create_topics(std::slice::from_ref(&topic)).await;
    let other = b.other_ca.to_str().unwrap();
    let mut d = TlsDaemon::start(
        &b.ssl,
        std::slice::from_ref(&topic),
        &[("security.protocol", "SSL"), ("ssl.ca.location", other)],
    );
    let mut r = redis(&redis_url()).await;
    let key = format!("{}:item:1", d.prefix);
    fill(&mut r, std::slice::from_ref(&key)).await;
    produce_compressed(&topic, "none", 1).await;
    let line = d.wait_logged(&["SSL handshake failed", "certificate verify failed"], Duration::from_secs(30)).await;
    assert!(line.contains("ssl.ca.location"), "librdkafka names the setting to fix: {line}");
    // Retrying, not consuming: the key stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(exists(&mut r, &key).await, "nothing was consumed through an unverified broker");
    d.still_running_then_terminate();
}

/// The test's own clients on the SASL_SSL broker.
fn sasl_client(mechanism: &str) -> ClientConfig {
    let b = brokers();
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &b.sasl_ssl)
        .set("security.protocol", "SASL_SSL")
        .set("ssl.ca.location", b.ca.to_str().unwrap())
        .set("sasl.mechanism", mechanism)
        .set("sasl.username", SASL_USER)
        .set("sasl.password", SASL_PASSWORD);
    client
}

/// The one user kafka-tls-start.sh's SASL gate accepts.
const SASL_USER: &str = "evictd";
const SASL_PASSWORD: &str = "evictd-secret";

fn sasl_properties<'a>(mechanism: &'a str, password: &'a str, ca: &'a str) -> [(&'a str, &'a str); 5] {
    [
        ("security.protocol", "SASL_SSL"),
        ("ssl.ca.location", ca),
        ("sasl.mechanism", mechanism),
        ("sasl.username", SASL_USER),
        ("sasl.password", password),
    ]
}

/// Over SASL_SSL with `mechanism`: evictd logs in, consumes a Debezium
/// event and invalidates its key; with `dead_letter`, a message it cannot
/// decode is sent to the dead-letter topic over the same SASL_SSL
/// connection settings.
async fn consumes_over_sasl_ssl(mechanism: &str, dead_letter: bool) {
    let b = brokers();
    let run = unique("tlssasl");
    let topic = format!("{run}.app.items");
    let admin: AdminClient<DefaultClientContext> = sasl_client(mechanism).create().unwrap();
    let ca = b.ca.to_str().unwrap();
    let mut d =
        TlsDaemon::start(&b.sasl_ssl, std::slice::from_ref(&topic), &sasl_properties(mechanism, SASL_PASSWORD, ca));
    let dead_letters = format!("{}.dead-letters", d.prefix);
    let topics = [
        NewTopic::new(&topic, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&dead_letters, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    let mut r = redis(&redis_url()).await;
    let key = format!("{}:item:7", d.prefix);
    fill(&mut r, std::slice::from_ref(&key)).await;
    let producer: FutureProducer = sasl_client(mechanism).create().unwrap();
    if dead_letter {
        let bad = FutureRecord::to(&topic).key("{\"id\": 6}").payload("{\"op\": \"c\"");
        producer.send(bad, Duration::from_secs(20)).await.map_err(|(e, _)| e).unwrap();
    }
    let value = event("c", None, Some(item(7, 1)));
    let record = FutureRecord::to(&topic).key("{\"id\": 7}").payload(&value);
    producer.send(record, Duration::from_secs(20)).await.map_err(|(e, _)| e).unwrap();
    super::support::wait_until(
        "the key to be invalidated",
        Duration::from_secs(60),
        || d.log(),
        || {
            let mut r = r.clone();
            let key = key.clone();
            async move { (!exists(&mut r, &key).await).then_some(()) }
        },
    )
    .await;
    if dead_letter {
        d.wait_logged(&["dead-lettered a message that cannot be decoded"], Duration::from_secs(30)).await;
        let letters = read_all(sasl_client(mechanism), &dead_letters, 1, Duration::from_secs(30));
        assert_eq!(letters, vec![b"{\"op\": \"c\"".to_vec()], "the letter, read back over SASL_SSL; log:\n{}", d.log());
    }
    assert!(!d.log().contains(SASL_PASSWORD), "the password is never logged: {}", d.log());
    d.still_running_then_terminate();
}

/// The payloads of `topic` from its start, until `count` or `limit`.
fn read_all(mut client: ClientConfig, topic: &str, count: usize, limit: Duration) -> Vec<Vec<u8>> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::Message as _;
    let consumer: BaseConsumer =
        client.set("group.id", unique("reader")).set("enable.auto.commit", "false").create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&list).unwrap();
    let deadline = std::time::Instant::now() + limit;
    let mut out = Vec::new();
    while out.len() < count && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.payload().unwrap_or_default().to_vec());
        }
    }
    out
}

#[tokio::test]
async fn over_sasl_ssl_with_plain_evictd_consumes_and_invalidates() {
    consumes_over_sasl_ssl("PLAIN", false).await;
}

#[tokio::test]
async fn over_sasl_ssl_with_scram_sha_256_evictd_consumes_and_invalidates() {
    consumes_over_sasl_ssl("SCRAM-SHA-256", false).await;
}

#[tokio::test]
async fn over_sasl_ssl_with_scram_sha_512_evictd_consumes_and_its_dead_letters_go_out_over_sasl_ssl_too() {
    consumes_over_sasl_ssl("SCRAM-SHA-512", true).await;
}

/// A wrong password: the broker refuses the login; evictd logs Kafka's
/// message and keeps retrying (librdkafka reconnects with backoff; no
/// policy stops on it), and never logs the password. The TLS handshake
/// under it succeeded (the right CA).
async fn a_wrong_password_is_refused_clearly_and_retried(mechanism: &str) {
    let b = brokers();
    let topic = format!("{}.app.items", unique("tlsbad"));
    let ca = b.ca.to_str().unwrap();
    let mut d = TlsDaemon::start(&b.sasl_ssl, &[topic], &sasl_properties(mechanism, "hunter2-wrong", ca));
    let line = d
        .wait_logged(&["SASL authentication error", "invalid credentials with SASL mechanism"], Duration::from_secs(30))
        .await;
    assert!(line.contains(mechanism), "{line}");
    // The consumer hands the error to the source, which retries.
    d.wait_logged(&["consumer error; librdkafka retries", "Authentication"], Duration::from_secs(30)).await;
    assert!(!d.log().contains("certificate verify failed"), "TLS itself succeeded: {}", d.log());
    assert!(!d.log().contains("hunter2"), "the password is never logged: {}", d.log());
    d.still_running_then_terminate();
}

#[tokio::test]
async fn over_sasl_ssl_a_wrong_scram_password_fails_clearly_and_evictd_retries() {
    a_wrong_password_is_refused_clearly_and_retried("SCRAM-SHA-256").await;
}

#[tokio::test]
async fn over_sasl_ssl_a_wrong_plain_password_fails_clearly_and_evictd_retries() {
    a_wrong_password_is_refused_clearly_and_retried("PLAIN").await;
}

/// `check` prints the properties with the secrets hidden.
#[test]
fn check_shows_the_kafka_properties_with_their_secrets_hidden() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("graph.toml"), graph("chk")).unwrap();
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        format!(
            "[graph]\npaths = [\"graph.toml\"]\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"b:9096\"\ntopics = [\"t\"]\n\
             [source.kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"evictd\"\n\"sasl.password\" = \"hunter2\"\n[redis.primary]\nurl = \"{}\"\n",
            redis_url()
        ),
    )
    .unwrap();
    let out = super::process::output_within(
        Command::new(env!("CARGO_BIN_EXE_evictd")).args(["check", "--offline", "--config", config.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(
            "  kafka properties: sasl.mechanism=SCRAM-SHA-512, sasl.password=****, sasl.username=evictd, security.protocol=SASL_SSL\n"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
}
