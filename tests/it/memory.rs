//! Memory stays bounded in bytes, not only in items (issue 11, item 13):
//! a transaction of wide rows whose look-ups hold their changes must not
//! grow evictd past the memory limit of its pod (128 MiB in
//! `deploy/kubernetes/base/deployment.yaml`).

use std::time::Duration;

use super::daemon::{Daemon, redis_url};
use super::support::pg_url;

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.docs (id bigint PRIMARY KEY, owner_id bigint NOT NULL, body text NOT NULL);
";

/// `owner` is fed by a look-up on every doc change: each such change is
/// held until its batch's look-ups ran, with its 1 MiB body, which the graph
/// declares (a change keeps only declared columns).
fn graph(p: &str) -> String {
    format!(
        r#"
[tables."app.docs"]
key = ["id"]
columns = ["id", "owner_id", "body"]

[caches.{p}_owner]
key = "{p}:owner:{{id}}"
[[caches.{p}_owner.depends]]
table = "app.docs"
lookup = {{ query = "SELECT owner_id AS id FROM app.docs WHERE id = ANY($1)", arg = "id" }}
"#
    )
}

/// The pod's memory limit in the shipped Deployment.
const POD_LIMIT_BYTES: u64 = 128 * 1024 * 1024;

#[tokio::test]
async fn a_transaction_of_wide_rows_stays_under_the_pods_memory_limit() {
    let url = redis_url();
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    // 256 rows of 1 MiB each (compressible, so the WAL stays small; pgoutput
    // sends every value whole): 256 MiB of row images in one transaction.
    d.sql("INSERT INTO app.docs SELECT g, g % 7, repeat(md5(g::text), 32768) FROM generate_series(1, 256) g").await;
    let end = d.current_lsn().await;
    d.wait_for("the wide transaction to be acknowledged", Duration::from_secs(120), || async {
        (d.confirmed_flush().await >= end).then_some(())
    })
    .await;
    let peak = d.peak_rss_bytes().expect("the daemon's /proc status");
    eprintln!("peak RSS {:.1} MiB", peak as f64 / 1048576.0);
    assert!(
        peak < POD_LIMIT_BYTES,
        "evictd peaked at {:.1} MiB, past the pod's {} MiB limit",
        peak as f64 / 1048576.0,
        POD_LIMIT_BYTES / 1048576
    );
    d.finish().await;
}
