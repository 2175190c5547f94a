//! `evictd run` through every kind of dependency, on real services:
//! look-ups with their fan-out limit, tags registered by applications,
//! a transaction too large to hold, and a Redis Cluster target.

use std::time::Duration;

use redis::AsyncCommands as _;

use super::daemon::{Daemon, exists, fill, redis, redis_url, wait_gone};
use super::support::pg_url;

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE app.posts (id bigint PRIMARY KEY, author_id bigint NOT NULL, title text NOT NULL);
ALTER TABLE app.posts REPLICA IDENTITY FULL;
INSERT INTO app.users VALUES (1, 'ann'), (2, 'bo');
INSERT INTO app.posts SELECT g, 1, 'p' || g FROM generate_series(1, 2) g;
INSERT INTO app.posts SELECT g, 2, 'p' || g FROM generate_series(100, 119) g;
";

/// Cache names carry the prefix too: namespace keys are per cache name.
fn graph(p: &str) -> String {
    format!(
        r#"
[tables."app.users"]
key = ["id"]
columns = ["id", "name"]

[tables."app.posts"]
key = ["id"]
columns = ["id", "author_id", "title"]

[caches.{p}_user]
key = "{p}:user:{{id}}"
[[caches.{p}_user.depends]]
table = "app.users"

[caches.{p}_post]
key = "{p}:post:{{id}}"
fanout_limit = 5
[[caches.{p}_post.depends]]
table = "app.posts"
[[caches.{p}_post.depends]]
embeds = "{p}_user"
lookup = {{ query = "SELECT id FROM app.posts WHERE author_id = ANY($1)", arg = "id" }}

[caches.{p}_feed]
key = "{p}:feed:{{?page}}"
[[caches.{p}_feed.depends]]
table = "app.posts"
tags = ["{p}-author:{{author_id}}"]
"#
    )
}

/// Runs `sql` and waits until cache `name`'s namespace version moved.
async fn expect_namespace_bump(
    d: &Daemon,
    r: &redis::aio::MultiplexedConnection,
    name: &str,
    sql: &str,
    limit: Duration,
) {
    let ns = format!("evictd:ns:{name}");
    let before: Option<String> = r.clone().get(&ns).await.unwrap();
    d.sql(sql).await;
    d.wait_for(&format!("the namespace bump of {name}"), limit, || {
        let mut conn = r.clone();
        let (ns, before) = (ns.clone(), before.clone());
        async move {
            let now: Option<String> = conn.get(&ns).await.ok()?;
            (now.is_some() && now != before).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn lookups_find_embedding_keys_and_an_oversized_fanout_bumps_the_namespace() {
    let url = redis_url();
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    let mut r = redis(&url).await;
    let p = d.prefix.clone();
    let keys = [d.key("user:1"), d.key("post:1"), d.key("post:2")];
    fill(&mut r, &keys).await;
    d.sql("UPDATE app.users SET name = 'anne' WHERE id = 1").await;
    wait_gone(&d, &r, &keys, Duration::from_secs(30)).await;

    // Bo has 20 posts, past the cache's fan-out limit of 5: the post cache's
    // namespace version moves instead of 20 deletes.
    fill(&mut r, &[d.key("post:100")]).await;
    let bob = "UPDATE app.users SET name = 'bob' WHERE id = 2";
    expect_namespace_bump(&d, &r, &format!("{p}_post"), bob, Duration::from_secs(30)).await;
    assert!(exists(&mut r, &d.key("post:100")).await, "no key-by-key deletes past the limit");
    d.finish().await;
}

#[tokio::test]
async fn keys_registered_under_a_tag_are_invalidated_with_it() {
    let url = redis_url();
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, "").await;
    d.start().await;
    let mut r = redis(&url).await;
    let p = d.prefix.clone();
    // An application filled two feed pages and registered them under the tag.
    let pages = [d.key("feed:page=1"), d.key("feed:page=2")];
    fill(&mut r, &pages).await;
    let registry = format!("evictd:tag:{{{p}-author:1}}");
    let expires =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as f64 + 60_000.0;
    for page in &pages {
        let () = r.zadd(&registry, page, expires).await.unwrap();
    }
    d.sql("UPDATE app.posts SET title = 'new' WHERE id = 1").await;
    wait_gone(&d, &r, &pages, Duration::from_secs(30)).await;
    d.finish().await;
}

#[tokio::test]
async fn a_transaction_past_the_effect_limit_bumps_instead_of_holding_everything() {
    let url = redis_url();
    let extra = "[run]\nmax_transaction_effects = 1000\n";
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, extra).await;
    d.sql("INSERT INTO app.posts SELECT g, 3, 'bulk' FROM generate_series(1000, 20999) g").await;
    d.start().await;
    let mut r = redis(&url).await;
    let p = d.prefix.clone();
    // Under the limit: every key, one by one.
    let small: Vec<String> = (1000..1500).map(|i| d.key(&format!("post:{i}"))).collect();
    fill(&mut r, &small).await;
    d.sql("UPDATE app.posts SET title = 'a' WHERE id BETWEEN 1000 AND 1499").await;
    wait_gone(&d, &r, &small, Duration::from_secs(20)).await;
    // 20 000 rows in one transaction: the whole cache, once.
    let bulk = "UPDATE app.posts SET title = 'b' WHERE author_id = 3";
    expect_namespace_bump(&d, &r, &format!("{p}_post"), bulk, Duration::from_secs(30)).await;
    assert!(d.log().contains("past its effect limit"), "{}", d.log());
    d.finish().await;
}

#[tokio::test]
async fn a_cluster_target_loses_no_key_across_slots() {
    let seeds = std::env::var("EVICTD_TEST_REDIS_CLUSTER_URLS")
        .expect("EVICTD_TEST_REDIS_CLUSTER_URLS is not set: run the integration tests through scripts/test.sh");
    let extra = format!("[redis.primary]\nurl = \"{seeds}\"\ncluster = true\n");
    let mut d = Daemon::custom(&pg_url(), "", SCHEMA, graph, &extra).await;
    d.sql("INSERT INTO app.posts SELECT g, 4, 'c' FROM generate_series(5000, 5199) g").await;
    d.start().await;
    let nodes: Vec<String> = seeds.split(',').map(str::to_owned).collect();
    let client = redis::cluster::ClusterClient::new(nodes).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let keys: Vec<String> = (5000..5200).map(|i| d.key(&format!("post:{i}"))).collect();
    for key in &keys {
        let () = conn.set(key, "cached").await.unwrap();
    }
    d.sql("UPDATE app.posts SET title = 'moved' WHERE author_id = 4").await;
    let conn2 = conn.clone();
    let keys2 = keys.clone();
    d.wait_for("200 keys on 3 masters to go", Duration::from_secs(20), || {
        let mut conn = conn2.clone();
        let keys = keys2.clone();
        async move {
            for key in &keys {
                let present: bool = conn.exists(key).await.ok()?;
                if present {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    d.finish().await;
}

/// Issue 11, item 1: a look-up-fed cache embedded by another, in a
/// transaction past `max_transaction_effects`. The collapse bumps the
/// look-up's cache; the cache that embeds it must be bumped too, as every
/// other namespace bump is (`Resolver::bump` follows `embeds`).
fn embedded_lookup_graph(p: &str) -> String {
    format!(
        r#"
[tables."app.posts"]
key = ["id"]
columns = ["id", "author_id", "title"]

[caches.{p}_author]
key = "{p}:author:{{id}}"
[[caches.{p}_author.depends]]
table = "app.posts"
lookup = {{ query = "SELECT author_id AS id FROM app.posts WHERE id = ANY($1)", arg = "id" }}

[caches.{p}_author_page]
key = "{p}:author-page:{{id}}"
[[caches.{p}_author_page.depends]]
embeds = "{p}_author"
"#
    )
}

#[tokio::test]
async fn a_collapsed_transaction_bumps_the_caches_that_embed_its_lookup_caches() {
    let url = redis_url();
    let extra = "[run]\nmax_transaction_effects = 50\n";
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, embedded_lookup_graph, extra).await;
    d.sql("INSERT INTO app.posts SELECT g, 3, 'bulk' FROM generate_series(1000, 1199) g").await;
    d.start().await;
    let r = redis(&url).await;
    let p = d.prefix.clone();
    // 200 look-ups in one transaction, past the limit of 50.
    let bulk = "UPDATE app.posts SET title = 'b' WHERE author_id = 3";
    expect_namespace_bump(&d, &r, &format!("{p}_author_page"), bulk, Duration::from_secs(20)).await;
    let author: Option<String> = r.clone().get(format!("evictd:ns:{p}_author")).await.unwrap();
    assert!(author.is_some(), "the look-up's own cache is bumped too");
    assert!(d.log().contains("past its effect limit"), "{}", d.log());
    d.finish().await;
}
