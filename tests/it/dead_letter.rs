//! Dead letters on real services: evictd's migrations in a schema of their
//! own, `migrations = "verify"`, and `evictd run` meeting a change whose
//! look-up fails (a division by zero for owner 13) between good changes.

use std::time::Duration;

use sqlx::Connection as _;

use super::daemon::{Daemon, fill, redis, redis_url, wait_gone};
use super::support::{evictd, pg_url, stderr, stdout};

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, owner_id bigint NOT NULL, name text NOT NULL);
ALTER TABLE app.items REPLICA IDENTITY FULL;
";

/// The owner whose look-up fails.
const POISON: i64 = 13;

/// An item's key, and its owner's page found by a look-up that divides by
/// zero for owner 13 (it computes from `$1` alone, so only a batch that
/// holds that owner fails).
fn graph(p: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "owner_id", "name"]

[caches.{p}_item]
key = "{p}:item:{{id}}"
[[caches.{p}_item.depends]]
table = "app.items"

[caches.{p}_owner]
key = "{p}:owner:{{id}}"
[[caches.{p}_owner.depends]]
table = "app.items"
lookup = {{ query = "SELECT o AS id FROM unnest($1::bigint[]) AS o WHERE 1 / (o - {POISON}) IS NOT NULL", arg = "owner_id" }}
"#
    )
}

/// An LSN as text (`16/B374D848`) as a number.
fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

async fn table_exists(d: &Daemon, name: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(name).fetch_one(&mut conn).await.unwrap()
}

#[tokio::test]
async fn migrations_apply_to_a_fresh_database_in_their_own_schema() {
    let d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, graph, "[dead_letter]\nschema = \"evictd_ops\"\n").await;
    let config = d.config.to_str().unwrap();
    let out = evictd(&["migrate", "--config", config]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "migrations: applied 0001_dead_letters to schema evictd_ops\n");
    assert!(table_exists(&d, "evictd_ops.dead_letters").await);
    assert!(table_exists(&d, "evictd_ops._sqlx_migrations").await, "the migrations table is evictd's own");
    assert!(!table_exists(&d, "public._sqlx_migrations").await, "nothing lands in the application's schema");
    assert!(!table_exists(&d, "public.dead_letters").await);
    let again = evictd(&["migrate", "--config", config]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(stdout(&again), "migrations: schema evictd_ops is up to date\n");
    d.finish().await;
}

#[tokio::test]
async fn verify_mode_refuses_to_run_with_pending_migrations_and_names_the_command() {
    let extra = "[dead_letter]\nmigrations = \"verify\"\n";
    let mut d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, graph, extra).await;
    let config = d.config.to_str().unwrap().to_owned();
    let out = evictd(&["run", "--config", &config]);
    assert_eq!(out.status.code(), Some(2), "bad setup exits 2: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("lacks evictd's migration(s) 0001_dead_letters"), "{err}");
    assert!(err.contains("evictd migrate --config FILE"), "{err}");
    assert!(!table_exists(&d, "evictd.dead_letters").await, "verify mode applies nothing");
    let migrated = evictd(&["migrate", "--config", &config]);
    assert_eq!(migrated.status.code(), Some(0), "{}", stderr(&migrated));
    // Now verified: the daemon starts and streams.
    d.start().await;
    d.finish().await;
}

/// One dead-letter row as the test reads it.
#[derive(Debug, sqlx::FromRow)]
struct Letter {
    source: String,
    position: String,
    lsn: Option<String>,
    table_name: String,
    op: String,
    before: Option<String>,
    after: Option<String>,
    error: String,
    error_kind: String,
    attempts: i32,
}

async fn letters(d: &Daemon) -> Vec<Letter> {
    let mut conn = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    sqlx::query_as(
        "SELECT source, position, lsn::text AS lsn, table_name, op, before::text AS before, after::text AS after,
                error, error_kind, attempts
         FROM evictd.dead_letters ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_poison_change_is_dead_lettered_and_the_stream_keeps_moving() {
    let url = redis_url();
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    let mut r = redis(&url).await;
    let key = |what: &str| d.key(what);

    // A good change first.
    fill(&mut r, &[key("item:1"), key("owner:1")]).await;
    d.sql("INSERT INTO app.items VALUES (1, 1, 'boots')").await;
    wait_gone(&d, &r, &[key("item:1"), key("owner:1")], Duration::from_secs(30)).await;

    // The poison change, then a good one committed after it.
    let keys = [key("item:2"), key("item:3"), key("owner:3")];
    fill(&mut r, &keys).await;
    let before = d.current_lsn().await;
    d.sql(&format!("INSERT INTO app.items VALUES (2, {POISON}, 'poison')")).await;
    let after = d.current_lsn().await;
    d.sql("INSERT INTO app.items VALUES (3, 3, 'socks')").await;
    // The poison change's own direct key goes too; the stream moved past it.
    wait_gone(&d, &r, &keys, Duration::from_secs(30)).await;

    let found = letters(&d).await;
    assert_eq!(found.len(), 1, "exactly one dead letter: {found:?}");
    let letter = &found[0];
    assert_eq!(
        (letter.source.as_str(), letter.table_name.as_str(), letter.op.as_str()),
        ("postgres", "app.items", "insert")
    );
    let commit_lsn = letter.lsn.as_deref().map(lsn).expect("a Postgres dead letter has its commit LSN");
    assert!(before < commit_lsn && commit_lsn < after, "{before:X} < {commit_lsn:X} < {after:X}");
    assert!(letter.position.starts_with(&format!("pg:{}:", letter.lsn.as_deref().unwrap())), "{letter:?}");
    let row: serde_json::Value = serde_json::from_str(letter.after.as_deref().unwrap()).unwrap();
    assert_eq!(row, serde_json::json!({"id": 2, "owner_id": POISON, "name": "poison"}));
    assert_eq!(letter.before, None, "an insert has no old row");
    assert!(letter.error.contains("division by zero"), "{letter:?}");
    assert_eq!(letter.error_kind, "lookup_failed");
    assert_eq!(letter.attempts, 1, "a definite error is not retried");
    // The cache the failed look-up feeds was invalidated whole.
    let ns: Option<String> = redis::AsyncCommands::get(&mut r, format!("evictd:ns:{}_owner", d.prefix)).await.unwrap();
    assert!(ns.is_some(), "the look-up cache's namespace was not bumped");

    let address = d.http_address().await;
    let metrics = super::server::get(address, "/metrics").await.body;
    assert!(metrics.contains(r#"evictd_dead_letters_total{table="app.items",reason="lookup_failed"} 1"#), "{metrics}");
    assert!(d.log().contains("dead-lettered a change that cannot be resolved"), "{}", d.log());

    // The slot moved past the poison change.
    d.wait_for("the slot to move past the poison change", Duration::from_secs(10), || async {
        (d.confirmed_flush().await > commit_lsn).then_some(())
    })
    .await;
    d.finish().await;
}

#[tokio::test]
async fn with_on_error_stop_the_daemon_exits_and_the_slot_stays_before_the_poison_change() {
    let url = redis_url();
    let extra = "[dead_letter]\non_error = \"stop\"\n";
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, extra).await;
    d.start().await;
    let mut r = redis(&url).await;
    fill(&mut r, &[d.key("owner:1")]).await;
    d.sql("INSERT INTO app.items VALUES (1, 1, 'boots')").await;
    wait_gone(&d, &r, &[d.key("owner:1")], Duration::from_secs(30)).await;

    d.sql(&format!("INSERT INTO app.items VALUES (2, {POISON}, 'poison')")).await;
    let code = d.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "stops as a runtime failure; log:\n{}", d.log());
    let log = d.log();
    let line = log.lines().find(|l| l.contains("cannot resolve the change at pg:")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("app.items") && line.contains("division by zero"), "{line}");
    let position = line.split("cannot resolve the change at pg:").nth(1).unwrap();
    let commit_lsn = lsn(position.split(':').next().unwrap());
    assert!(d.confirmed_flush().await < commit_lsn, "the poison change was acknowledged");
    assert!(letters(&d).await.is_empty(), "stop mode writes no dead letter");
    d.finish().await;
}

/// Issue 12, deliverable 3: the dead-letter table keeps a message a
/// source could not decode (no source writes one there today) without a
/// migration: no table, op `undecodable`, the reason as `error_kind`, the
/// raw message as `after`; recorded twice, it keeps its one row.
#[tokio::test]
async fn the_table_keeps_an_undecodable_message_with_its_raw_payload_once() {
    use evictd::dead_letter::DeadLetterStore as _;
    let d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, graph, "").await;
    let out = evictd(&["migrate", "--config", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let url = secrecy::SecretString::from(d.db.url.clone());
    let store = evictd::dead_letter::DeadLetters::connect_lazy(&url, "evictd", Duration::from_secs(5)).unwrap();
    let message = evictd::source::Undecodable {
        position: evictd::change::Position::Kafka {
            topic: "dbserver1.app.items".into(),
            partition: 2,
            offset: 41,
            seq: 7,
            version: 1,
        },
        reason: evictd::source::UndecodableReason::TooLarge,
        error: "a message of 9 bytes is larger than source.kafka.max_message_bytes (8)".into(),
        raw: evictd::source::RawMessage {
            key: Some(b"{\"id\": 5}".to_vec()),
            value: Some(vec![0xff, 0xfe]),
            headers: vec![("trace".into(), Some(b"abc".to_vec()))],
        },
    };
    store.record_undecodable(&message).await.unwrap();
    store.record_undecodable(&message).await.unwrap();
    let letters = letters(&d).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(
        (letter.source.as_str(), letter.position.as_str(), letter.table_name.as_str(), letter.op.as_str()),
        ("kafka", "kafka:dbserver1.app.items/2@41", "", "undecodable")
    );
    assert_eq!((letter.error_kind.as_str(), letter.attempts, letter.lsn.as_deref()), ("too_large", 0, None));
    assert!(letter.error.contains("max_message_bytes"), "{}", letter.error);
    assert_eq!(letter.before, None);
    let after: serde_json::Value = serde_json::from_str(letter.after.as_deref().unwrap()).unwrap();
    assert_eq!(after, serde_json::json!({"key": "{\"id\": 5}", "value": "\\xfffe", "headers": [["trace", "abc"]]}));
    d.finish().await;
}
