//! `evictd invalidate` against a real Redis: each target kind removes
//! exactly the keys it names (and what embeds them), a dry run changes
//! nothing and lists the blast radius, whole-cache flushes need `--yes`,
//! the broadcast carries the invalidation, and every action is audited in
//! `evictd:audit`.

use std::path::Path;
use std::time::Duration;

use evictd::sink::redis::Envelope;
use futures_util::StreamExt as _;

use super::redis_support::{Kind, Probe, unique, urls};
use super::support::{TestDb, evictd, pg_url, stderr, stdout};

/// A graph whose names end in `_<s>`: `item` (delete), `page` embeds
/// `item`, `listing` (tags `item:<s>:{id}`), `price` (bump).
fn graph(s: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id"]

[caches.item_{s}]
key = "item:{s}:{{{{{{id}}}}}}"
[[caches.item_{s}.depends]]
table = "app.items"

[caches.page_{s}]
key = "page:{s}:{{{{{{id}}}}}}"
[[caches.page_{s}.depends]]
embeds = "item_{s}"

[caches.listing_{s}]
key = "listing:{s}:{{id}}"
[[caches.listing_{s}.depends]]
table = "app.items"
tags = ["item:{s}:{{id}}"]

[caches.price_{s}]
key = "price:{s}:{{id}}"
action = "bump"
[[caches.price_{s}.depends]]
table = "app.items"
"#
    )
}

/// A config (never connecting to its source) and graph in a temp dir.
struct Setup {
    dir: tempfile::TempDir,
    s: String,
    channel: String,
}

impl Setup {
    fn new() -> Setup {
        let redis = format!("url = \"{}\"", urls(Kind::Standalone)[0]);
        Setup::with(graph, &pg_url(), &redis)
    }

    /// A config with `graph(suffix)`, the source (and look-up) database at
    /// `pg`, and `redis` as the `[redis.primary]` connection lines.
    fn with(graph: fn(&str) -> String, pg: &str, redis: &str) -> Setup {
        let s = unique();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("graph.toml"), graph(&s)).unwrap();
        let channel = format!("evictd:test:{s}");
        let config = format!(
            r#"
[graph]
paths = ["graph.toml"]
[source]
kind = "postgres"
[source.postgres]
url = "{pg}"
slot = "unused_{s}"
publication = "unused_{s}"
[redis.primary]
{redis}
broadcast_channel = "{channel}"
"#
        );
        std::fs::write(dir.path().join("evictd.toml"), config).unwrap();
        Setup { dir, s, channel }
    }

    fn config(&self) -> String {
        self.dir.path().join("evictd.toml").display().to_string()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let config = self.config();
        let mut all = vec!["invalidate", "--config", &config];
        all.extend_from_slice(args);
        evictd(&all)
    }

    fn key(&self, prefix: &str, id: &str) -> String {
        match prefix {
            "item" | "page" => format!("{prefix}:{}:{{{id}}}", self.s),
            _ => format!("{prefix}:{}:{id}", self.s),
        }
    }
}

async fn fill(probe: &Probe, keys: &[&str]) {
    for key in keys {
        probe.set(key, "cached").await;
    }
}

/// Registers `key` under `tag` as the `REGISTER` script does (score: expiry).
async fn register(probe: &Probe, tag: &str, key: &str) {
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 600_000;
    probe.zadd(&format!("evictd:tag:{{{tag}}}"), &expiry.to_string(), key).await;
    probe.set(key, "cached").await;
}

fn ok(out: &std::process::Output) {
    assert_eq!(out.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", stdout(out), stderr(out));
}

#[tokio::test]
async fn a_key_removes_itself_and_what_embeds_it_only() {
    let t = Setup::new();
    let probe = Probe::new(Kind::Standalone).await;
    let (item1, page1, item2, page2) = (t.key("item", "1"), t.key("page", "1"), t.key("item", "2"), t.key("page", "2"));
    fill(&probe, &[&item1, &page1, &item2, &page2]).await;
    let out = t.run(&["--key", &item1]);
    ok(&out);
    assert!(stdout(&out).contains(&format!("caches reached through embeds: page_{}", t.s)), "{}", stdout(&out));
    assert!(!probe.exists(&item1).await && !probe.exists(&page1).await);
    assert!(probe.exists(&item2).await && probe.exists(&page2).await, "another key of the cache is left alone");
}

#[tokio::test]
async fn a_cache_with_parameters_renders_the_key_as_the_daemon_does() {
    let t = Setup::new();
    let probe = Probe::new(Kind::Standalone).await;
    let (item7, page7, item8) = (t.key("item", "7"), t.key("page", "7"), t.key("item", "8"));
    fill(&probe, &[&item7, &page7, &item8]).await;
    let out = t.run(&["--cache", &format!("item_{}", t.s), "--param", "id=7", "--format", "json"]);
    ok(&out);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["applied"], true);
    let keys: Vec<&str> = json["effects"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys, [item7.as_str(), page7.as_str()]);
    assert!(!probe.exists(&item7).await && !probe.exists(&page7).await);
    assert!(probe.exists(&item8).await);
}

#[tokio::test]
async fn a_tag_removes_its_registered_keys_and_a_dry_run_lists_them_and_changes_nothing() {
    let t = Setup::new();
    let probe = Probe::new(Kind::Standalone).await;
    let tag = format!("item:{}:5", t.s);
    let other_tag = format!("item:{}:6", t.s);
    let (a, b, c) = (t.key("listing", "a"), t.key("listing", "b"), t.key("listing", "c"));
    register(&probe, &tag, &a).await;
    register(&probe, &tag, &b).await;
    register(&probe, &other_tag, &c).await;

    let out = t.run(&["--tag", &tag, "--dry-run", "--format", "json"]);
    ok(&out);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["tags"][0]["count"], 2, "{json}");
    let mut listed: Vec<&str> =
        json["tags"][0]["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    listed.sort_unstable();
    assert_eq!(listed, [a.as_str(), b.as_str()]);
    assert!(probe.exists(&a).await && probe.exists(&b).await, "a dry run changes nothing");

    // More keys than --limit: refused without --yes, with the dry run's output.
    let out = t.run(&["--tag", &tag, "--limit", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("refused without --yes"), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 key(s) registered now"), "{}", stdout(&out));
    assert!(probe.exists(&a).await);

    ok(&t.run(&["--tag", &tag]));
    assert!(!probe.exists(&a).await && !probe.exists(&b).await);
    assert!(probe.exists(&c).await, "another tag's key is left alone");
}

#[tokio::test]
async fn a_whole_cache_needs_yes_and_bumps_its_namespace_and_its_embedders() {
    let t = Setup::new();
    let probe = Probe::new(Kind::Standalone).await;
    let (ns_item, ns_page) = (format!("evictd:ns:item_{}", t.s), format!("evictd:ns:page_{}", t.s));
    let item = format!("item_{}", t.s);

    let out = t.run(&["--cache", &item, "--all"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("refused without --yes"), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("namespace\tpage_{}", t.s)), "{}", stdout(&out));
    assert_eq!(probe.get(&ns_item).await, None, "nothing changed without --yes");

    ok(&t.run(&["--cache", &item, "--all", "--yes"]));
    assert_eq!(probe.get(&ns_item).await.as_deref(), Some("1"));
    assert_eq!(probe.get(&ns_page).await.as_deref(), Some("1"));
    assert_eq!(probe.get(&format!("evictd:ns:listing_{}", t.s)).await, None, "another cache is left alone");
    // Again: a bump always raises the version.
    ok(&t.run(&["--cache", &item, "--all", "--yes"]));
    assert_eq!(probe.get(&ns_item).await.as_deref(), Some("2"));
}

#[tokio::test]
async fn a_bump_cache_key_is_raised_and_a_key_of_no_cache_is_unlinked_with_a_warning() {
    let t = Setup::new();
    let probe = Probe::new(Kind::Standalone).await;
    let price = t.key("price", "3");
    probe.set(&price, "41").await;
    ok(&t.run(&["--key", &price]));
    assert_eq!(probe.get(&price).await.as_deref(), Some("42"));

    let stray = format!("stray:{}", t.s);
    probe.set(&stray, "x").await;
    let out = t.run(&["--key", &stray]);
    ok(&out);
    assert!(stderr(&out).contains("rendered by no cache"), "{}", stderr(&out));
    assert!(!probe.exists(&stray).await);
}

#[tokio::test]
async fn bad_names_exit_2_with_a_clear_message() {
    let t = Setup::new();
    let item = format!("item_{}", t.s);
    for (args, expected) in [
        (vec!["--cache", "nope", "--param", "id=1"], "--cache nope: no such cache in the graph"),
        (vec!["--cache", &item, "--param", "sku=1"], "has no placeholder `sku`"),
        (vec!["--cache", &item], "no value for placeholder `id`"),
        (vec!["--tag", "nope:1"], "no tag template of the graph renders this tag"),
        (vec!["--key", "a", "--tag", "b"], "cannot be used with"),
        (vec!["--param", "id=1"], "--cache"),
    ] {
        let out = t.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broadcast_carries_the_invalidation_and_the_audit_stream_records_it() {
    let t = Setup::new();
    let probe = Probe::new(Kind::Standalone).await;
    let mut pubsub = redis::Client::open(urls(Kind::Standalone)[0].as_str()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&t.channel).await.unwrap();
    let mut messages = pubsub.into_on_message();
    let item = t.key("item", "9");
    let out = tokio::task::spawn_blocking({
        let config = t.config();
        let item = item.clone();
        move || evictd(&["invalidate", "--config", &config, "--key", &item])
    })
    .await
    .unwrap();
    ok(&out);
    let msg = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.expect("a message").unwrap();
    let text: String = msg.get_payload().unwrap();
    let envelope = Envelope::parse(&text).unwrap();
    assert_eq!(envelope.kind.as_deref(), Some("batch"), "{text}");
    assert_eq!(envelope.keys, [item.clone(), t.key("page", "9")], "{text}");

    // The audit: an entry naming the key, and a structured log line.
    let entries: Vec<(String, Vec<(String, String)>)> =
        probe.q(redis::cmd("XREVRANGE").arg("evictd:audit").arg("+").arg("-").arg("COUNT").arg(200)).await;
    let ours = entries
        .iter()
        .map(|(_, fields)| fields.iter().cloned().collect::<std::collections::HashMap<_, _>>())
        .find(|f| f.get("value") == Some(&item))
        .expect("an audit entry for the key");
    assert_eq!(ours["outcome"], "applied");
    assert_eq!(ours["kind"], "key");
    assert!(ours["blast_radius"].contains(&t.key("page", "9")), "{ours:?}");
    assert!(stderr(&out).contains("operator action"), "{}", stderr(&out));
    assert!(Path::new(&t.config()).exists());
}

/// `author` (direct), `article` embeds `author` through a look-up.
fn lookup_graph(s: &str) -> String {
    format!(
        r#"
[tables."app.authors"]
key = ["id"]
columns = ["id"]

[tables."app.articles"]
key = ["id"]
columns = ["id", "author_id"]

[caches.author_{s}]
key = "author:{s}:{{id}}"
[[caches.author_{s}.depends]]
table = "app.authors"

[caches.article_{s}]
key = "article:{s}:{{id}}"
[[caches.article_{s}.depends]]
table = "app.articles"
[[caches.article_{s}.depends]]
embeds = "author_{s}"
lookup = {{ query = "SELECT id FROM app.articles WHERE author_id = ANY($1)", arg = "id" }}
"#
    )
}

#[tokio::test]
async fn a_key_follows_embeds_through_look_ups_on_the_database() {
    let db = TestDb::new("inv").await;
    db.run_sql(
        "CREATE SCHEMA app; CREATE TABLE app.articles (id int PRIMARY KEY, author_id int);
         INSERT INTO app.articles VALUES (10, 1), (11, 1), (12, 2);",
    )
    .await;
    let redis = format!("url = \"{}\"", urls(Kind::Standalone)[0]);
    let t = Setup::with(lookup_graph, &db.url, &redis);
    let probe = Probe::new(Kind::Standalone).await;
    let key = |cache: &str, id: u32| format!("{cache}:{}:{id}", t.s);
    let (author1, a10, a11, a12) = (key("author", 1), key("article", 10), key("article", 11), key("article", 12));
    fill(&probe, &[&author1, &a10, &a11, &a12]).await;

    let out = t.run(&["--key", &author1, "--dry-run"]);
    ok(&out);
    assert!(stdout(&out).contains(&a10) && stdout(&out).contains(&a11), "{}", stdout(&out));
    assert!(probe.exists(&a10).await, "a dry run changes nothing");

    ok(&t.run(&["--key", &author1]));
    assert!(!probe.exists(&author1).await && !probe.exists(&a10).await && !probe.exists(&a11).await);
    assert!(probe.exists(&a12).await, "another author's article is left alone");
    db.drop().await;
}

#[tokio::test]
async fn a_key_and_a_tag_on_a_cluster() {
    let redis = format!("url = \"{}\"\ncluster = true", urls(Kind::Cluster).join(","));
    let t = Setup::with(graph, &pg_url(), &redis);
    let probe = Probe::new(Kind::Cluster).await;
    let (item1, page1, item2) = (t.key("item", "1"), t.key("page", "1"), t.key("item", "2"));
    fill(&probe, &[&item1, &page1, &item2]).await;
    ok(&t.run(&["--key", &item1]));
    assert!(!probe.exists(&item1).await && !probe.exists(&page1).await);
    assert!(probe.exists(&item2).await);

    let tag = format!("item:{}:5", t.s);
    let (a, b) = (t.key("listing", "a"), t.key("listing", "b"));
    register(&probe, &tag, &a).await;
    register(&probe, &tag, &b).await;
    let out = t.run(&["--tag", &tag, "--dry-run"]);
    ok(&out);
    assert!(stdout(&out).contains("2 key(s) registered now"), "{}", stdout(&out));
    ok(&t.run(&["--tag", &tag]));
    assert!(!probe.exists(&a).await && !probe.exists(&b).await);
}

#[tokio::test]
async fn the_audit_log_line_takes_the_daemons_json_format() {
    let t = Setup::new();
    let mut config = std::fs::read_to_string(t.config()).unwrap();
    config.push_str("\n[log]\nformat = \"json\"\n");
    std::fs::write(t.config(), config).unwrap();
    let key = t.key("item", "4");
    let out = t.run(&["--key", &key]);
    ok(&out);
    let line = stderr(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|j| j["target"] == "evictd::audit")
        .unwrap_or_else(|| panic!("no JSON audit line in:\n{}", stderr(&out)));
    let fields = &line["fields"];
    assert_eq!(fields["message"], "operator action");
    assert_eq!(fields["value"], key.as_str());
    assert_eq!(fields["outcome"], "applied");
    assert!(fields["uid"].as_str().is_some_and(|u| !u.is_empty()), "{line}");
    assert!(fields["blast_radius"].as_str().unwrap().contains(&t.key("page", "4")), "{line}");
}
