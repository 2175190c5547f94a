//! Issue 11, item 10: a publication that hides changes the graph needs
//! (operations it does not publish, row filters, column lists, partitions
//! published under an ancestor's name) stops `evictd run` with exit 2 and
//! the SQL that fixes it, and `evictd check` reports the same; changes of a
//! partitioned table's partitions, which arrive under the partition's name,
//! resolve to the table the graph names.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::daemon::{Daemon, fill, redis, redis_url, wait_gone};
use super::support::{evictd, pg_url, stderr, stdout};

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, name text NOT NULL, note text);
ALTER TABLE app.items REPLICA IDENTITY FULL;
CREATE TABLE app.orders (id bigint NOT NULL, region text NOT NULL, total int NOT NULL, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE app.orders_eu PARTITION OF app.orders FOR VALUES IN ('eu');
CREATE TABLE app.orders_us PARTITION OF app.orders FOR VALUES IN ('us') PARTITION BY HASH (id);
CREATE TABLE app.orders_us_0 PARTITION OF app.orders_us FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE app.orders_us_1 PARTITION OF app.orders_us FOR VALUES WITH (MODULUS 2, REMAINDER 1);
";

fn items_graph(p: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "name"]

[caches.{p}_item]
key = "{p}:item:{{id}}"
[[caches.{p}_item.depends]]
table = "app.items"
columns = ["name"]
"#
    )
}

fn orders_graph(p: &str) -> String {
    format!(
        r#"
[tables."app.orders"]
key = ["id", "region"]
columns = ["id", "region", "total"]

[caches.{p}_order]
key = "{p}:order:{{region}}:{{id}}"
[[caches.{p}_order.depends]]
table = "app.orders"
"#
    )
}

fn leaf_graph(p: &str) -> String {
    format!(
        r#"
[tables."app.orders_eu"]
key = ["id", "region"]
columns = ["id", "region", "total"]

[caches.{p}_order]
key = "{p}:order:{{region}}:{{id}}"
[[caches.{p}_order.depends]]
table = "app.orders_eu"
"#
    )
}

/// A world with `graph` whose publication is the test's to create
/// (`create_publication = false`).
async fn world(graph: fn(&str) -> String, publication: &str) -> Daemon {
    let d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, graph, "").await;
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, text.replace("create_publication = true", "create_publication = false")).unwrap();
    d.sql(&format!("CREATE PUBLICATION {} {publication}", d.slot)).await;
    d
}

/// `evictd run` until it exits on its own; a daemon still running after
/// `limit` started streaming what it should have refused.
fn run_to_exit(d: &Daemon, limit: Duration) -> (Option<i32>, String) {
    let log_path = d.dir.path().join("refused.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["run", "--config", d.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "evictd run did not refuse to start within {limit:?}; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check(d: &Daemon) -> Output {
    evictd(&["check", "--config", d.config.to_str().unwrap()])
}

/// `run` exits 2 and `check` exits 2, both saying every one of `expected`.
async fn assert_refused(d: Daemon, expected: &[String]) {
    let (code, log) = run_to_exit(&d, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{log}");
    for line in expected {
        assert!(log.contains(line.as_str()), "run's message lacks {line:?}:\n{log}");
    }
    let out = check(&d);
    assert_eq!(out.status.code(), Some(2), "{}\n{}", stdout(&out), stderr(&out));
    for line in expected {
        assert!(stderr(&out).contains(line.as_str()), "check's report lacks {line:?}:\n{}", stderr(&out));
    }
    d.finish().await;
}

#[tokio::test]
async fn a_publication_without_deletes_and_truncates_is_refused_with_the_sql_that_fixes_it() {
    let d = world(items_graph, "FOR TABLE app.items WITH (publish = 'insert, update')").await;
    let slot = d.slot.clone();
    assert_refused(
        d,
        &[
            format!("publication `{slot}` does not publish delete, truncate: deletes and truncates of app.items would never reach evictd"),
            format!("ALTER PUBLICATION \"{slot}\" SET (publish = 'insert, update, delete, truncate')"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_row_filter_on_a_graph_table_is_refused_with_the_sql_that_fixes_it() {
    let d = world(items_graph, "FOR TABLE app.items WHERE (id > 100)").await;
    let slot = d.slot.clone();
    assert_refused(
        d,
        &[
            format!("publication `{slot}` filters the rows of app.items (WHERE (id > 100)): changes of the other rows would never reach evictd"),
            format!("BEGIN; ALTER PUBLICATION \"{slot}\" DROP TABLE \"app\".\"items\"; ALTER PUBLICATION \"{slot}\" ADD TABLE \"app\".\"items\"; COMMIT;"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_column_list_without_a_column_the_graph_reads_is_refused_with_the_sql_that_fixes_it() {
    let d = world(items_graph, "FOR TABLE app.items (id, note)").await;
    let slot = d.slot.clone();
    assert_refused(
        d,
        &[
            format!("publication `{slot}` publishes app.items without column(s) name, which the graph reads"),
            format!("BEGIN; ALTER PUBLICATION \"{slot}\" DROP TABLE \"app\".\"items\"; ALTER PUBLICATION \"{slot}\" ADD TABLE \"app\".\"items\"; COMMIT;"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_partition_named_by_the_graph_but_published_via_its_root_is_refused() {
    let d = world(leaf_graph, "FOR TABLE app.orders WITH (publish_via_partition_root = true)").await;
    let slot = d.slot.clone();
    assert_refused(
        d,
        &[
            format!("publication `{slot}` publishes the changes of app.orders_eu as changes of app.orders (publish_via_partition_root)"),
            format!("ALTER PUBLICATION \"{slot}\" SET (publish_via_partition_root = false)"),
        ],
    )
    .await;
}

#[tokio::test]
async fn changes_of_partitions_resolve_to_the_partitioned_table_the_graph_names() {
    let url = redis_url();
    // evictd creates the publication: without publish_via_partition_root,
    // changes arrive under each leaf partition's name.
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, orders_graph, "").await;
    d.start().await;
    let mut r = redis(&url).await;
    let (eu, us) = (d.key("order:eu:1"), d.key("order:us:2"));
    fill(&mut r, &[eu.clone(), us.clone()]).await;
    d.sql("INSERT INTO app.orders VALUES (1, 'eu', 10), (2, 'us', 20)").await;
    wait_gone(&d, &r, &[eu.clone(), us.clone()], Duration::from_secs(15)).await;

    // A partition attached while evictd streams.
    d.sql("CREATE TABLE app.orders_as (LIKE app.orders); ALTER TABLE app.orders ATTACH PARTITION app.orders_as FOR VALUES IN ('as')")
        .await;
    let asia = d.key("order:as:3");
    fill(&mut r, std::slice::from_ref(&asia)).await;
    d.sql("INSERT INTO app.orders VALUES (3, 'as', 30)").await;
    wait_gone(&d, &r, std::slice::from_ref(&asia), Duration::from_secs(15)).await;

    // A restart finds the table published (as its partitions).
    d.kill();
    let out = check(&d);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    assert!(!stdout(&out).contains("orders_"), "partitions are the graph's table, not unmapped: {}", stdout(&out));
    d.start().await;
    fill(&mut r, std::slice::from_ref(&eu)).await;
    d.sql("UPDATE app.orders SET total = 11 WHERE id = 1").await;
    wait_gone(&d, &r, std::slice::from_ref(&eu), Duration::from_secs(15)).await;
    d.finish().await;
}

/// A column filter on a non-key column: old rows need `REPLICA IDENTITY FULL`.
fn orders_filtered_graph(p: &str) -> String {
    format!(
        r#"
[tables."app.orders"]
key = ["id", "region"]
columns = ["id", "region", "total"]

[caches.{p}_order]
key = "{p}:order:{{region}}:{{id}}"
[[caches.{p}_order.depends]]
table = "app.orders"
columns = ["total"]
"#
    )
}

#[tokio::test]
async fn replica_identity_is_checked_on_the_partitions_that_write_the_rows() {
    // FULL on the parent does not reach its partitions, which write the WAL.
    let d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, orders_filtered_graph, "").await;
    d.sql("ALTER TABLE app.orders REPLICA IDENTITY FULL; ALTER TABLE app.orders_eu REPLICA IDENTITY FULL").await;
    let (code, log) = run_to_exit(&d, Duration::from_secs(20));
    // Bad input (the schema does not give what the graph needs): exit 2.
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("ALTER TABLE \"app\".\"orders_us_0\" REPLICA IDENTITY FULL;"), "{log}");
    assert!(log.contains("ALTER TABLE \"app\".\"orders_us_1\" REPLICA IDENTITY FULL;"), "{log}");
    assert!(!log.contains("\"orders_eu\" REPLICA"), "{log}");
    d.finish().await;
}
