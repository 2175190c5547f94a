//! Look-ups against a real Postgres: batching through `= ANY($1)`, text
//! parameters, the fan-out limit, timeouts and error classes, and the whole
//! resolve → look-up → embeds loop.

use std::sync::Arc;
use std::time::Duration;

use evictd::change::{Change, Operation, Row, Value};
use evictd::diagnostic::SourceFile;
use evictd::graph::load::load_sources;
use evictd::graph::{Graph, Lookup, LookupArg};
use evictd::lookup::{LookupError, LookupExecutor, LookupOutcome, PgLookupExecutor, run_lookups};
use evictd::resolve::{Effect, Resolver};
use sqlx::postgres::PgPoolOptions;

use super::support::{TestDb, evictd, root, stderr, stdout};

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.users (id bigint PRIMARY KEY, name text NOT NULL, handle text NOT NULL);
CREATE TABLE app.articles (id bigint PRIMARY KEY, author_id bigint NOT NULL, lang text);
CREATE TABLE app.comments (id bigint PRIMARY KEY, article_id bigint NOT NULL);
INSERT INTO app.users VALUES (1, 'ann', 'Ann'), (2, 'bo', 'Bo'), (3, 'cy', 'Cy');
INSERT INTO app.articles SELECT g, 1, 'en' FROM generate_series(1, 3) g;
INSERT INTO app.articles SELECT g, 2, NULL FROM generate_series(4, 5) g;
INSERT INTO app.articles SELECT g, 3, 'de' FROM generate_series(100, 120) g;
INSERT INTO app.comments VALUES (1000, 1), (1001, 1), (1002, 4);
";

const GRAPH: &str = r#"
[tables."app.users"]
key = ["id"]
columns = ["id", "name", "handle"]

[caches.user]
key = "user:{id}"
[[caches.user.depends]]
table = "app.users"

[caches.article]
key = "article:{id}:{?lang}"
fanout_limit = 10
[[caches.article.depends]]
embeds = "user"
lookup = { query = "SELECT id, lang FROM app.articles WHERE author_id = ANY($1)", arg = "id" }

[caches.article_comments]
key = "article:{article_id}:comments"
[[caches.article_comments.depends]]
embeds = "article"
lookup = { query = "SELECT article_id FROM app.comments WHERE article_id = ANY($1)", arg = "id" }
"#;

fn graph() -> Graph {
    load_sources(&[SourceFile::new("lookup.toml", GRAPH.to_owned())]).unwrap()
}

async fn executor(db: &TestDb, batch_size: usize) -> PgLookupExecutor {
    let pool = PgPoolOptions::new().max_connections(2).connect(&db.url).await.unwrap();
    PgLookupExecutor::new(pool, Duration::from_secs(5), batch_size)
}

fn lookup(query: &str) -> Lookup {
    Lookup { query: query.to_owned(), arg: LookupArg::Column(Arc::from("id")), timeout_ms: None }
}

fn keys(graph: &Graph, effects: &[evictd::resolve::Resolved]) -> Vec<String> {
    let mut out: Vec<String> = effects
        .iter()
        .map(|r| match &r.effect {
            Effect::Key { key, .. } => key.clone(),
            Effect::Tag { tag, .. } => format!("tag {tag}"),
            Effect::NamespaceBump { cache } => format!("namespace {}", graph.cache(*cache).name),
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn arguments_are_batched_and_parameters_come_back_as_text() {
    let db = TestDb::new("lookup_batch").await;
    db.run_sql(SCHEMA).await;
    // Five distinct arguments in chunks of two: three queries, one result.
    let exec = executor(&db, 2).await;
    let args: Vec<Value> = [1, 2, 3, 4, 5].into_iter().map(Value::Int).collect();
    let params = [Arc::from("id"), Arc::from("lang")];
    let outcome = exec
        .execute("t", &lookup("SELECT id, lang FROM app.articles WHERE author_id = ANY($1);"), &args, &params, 100)
        .await
        .unwrap();
    let LookupOutcome::Rows(rows) = outcome else { panic!("{outcome:?}") };
    assert_eq!(rows.len(), 3 + 2 + 21);
    assert!(rows.contains(&vec![Some(Value::Int(4)), None]), "NULL stays NULL");
    assert!(rows.contains(&vec![Some(Value::Int(100)), Some(Value::Text("de".into()))]));
    // Text arguments bind as text[].
    let handles = [Value::Text("Ann".into()), Value::Text("Cy".into())];
    let outcome = exec
        .execute("t", &lookup("SELECT id FROM app.users WHERE handle = ANY($1)"), &handles, &[Arc::from("id")], 100)
        .await
        .unwrap();
    assert_eq!(outcome, LookupOutcome::Rows(vec![vec![Some(Value::Int(1))], vec![Some(Value::Int(3))]]));
    // Types other than integers, booleans and floats come back as Postgres prints them.
    let query = "SELECT 12.50::numeric AS price, true AS ok, '2026-11-23 10:00'::timestamp AS at WHERE 1 = ANY($1)";
    let params = [Arc::from("price"), Arc::from("ok"), Arc::from("at")];
    let outcome = exec.execute("t", &lookup(query), &[Value::Int(1)], &params, 100).await.unwrap();
    let text = |s: &str| Some(Value::Text(s.to_owned()));
    assert_eq!(
        outcome,
        LookupOutcome::Rows(vec![vec![text("12.50"), Some(Value::Bool(true)), text("2026-11-23 10:00:00")]])
    );
    db.drop().await;
}

#[tokio::test]
async fn more_rows_than_the_limit_is_reported_not_collected() {
    let db = TestDb::new("lookup_fanout").await;
    db.run_sql(SCHEMA).await;
    let exec = executor(&db, 1000).await;
    let outcome = exec
        .execute(
            "t",
            &lookup("SELECT id FROM app.articles WHERE author_id = ANY($1)"),
            &[Value::Int(3)],
            &[Arc::from("id")],
            10,
        )
        .await
        .unwrap();
    assert_eq!(outcome, LookupOutcome::FanoutExceeded { rows: 11 }, "reads limit + 1 rows, no more");
    db.drop().await;
}

#[tokio::test]
async fn a_slow_lookup_times_out_as_a_transient_error() {
    let db = TestDb::new("lookup_timeout").await;
    db.run_sql(SCHEMA).await;
    let exec = executor(&db, 1000).await;
    let mut slow = lookup("SELECT id FROM app.users WHERE id = ANY($1) AND pg_sleep(2) IS NOT NULL");
    slow.timeout_ms = Some(100);
    let started = std::time::Instant::now();
    let err =
        exec.execute("caches.x.depends[0].lookup", &slow, &[Value::Int(1)], &[Arc::from("id")], 10).await.unwrap_err();
    assert!(matches!(err, LookupError::Timeout { timeout_ms: 100, .. }), "{err}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(2), "the timeout did not cut the query short");
    db.drop().await;
}

#[tokio::test]
async fn a_broken_query_is_a_definite_error_naming_the_dependency() {
    let db = TestDb::new("lookup_broken").await;
    db.run_sql(SCHEMA).await;
    let exec = executor(&db, 1000).await;
    let err = exec
        .execute(
            "caches.x.depends[0].lookup",
            &lookup("SELECT nope FROM app.users WHERE id = ANY($1)"),
            &[Value::Int(1)],
            &[Arc::from("id")],
            10,
        )
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().starts_with("look-up of caches.x.depends[0].lookup failed: "), "{err}");
    db.drop().await;
}

#[tokio::test]
async fn a_change_resolves_through_lookups_and_embeds_to_every_key() {
    let db = TestDb::new("lookup_chain").await;
    db.run_sql(SCHEMA).await;
    let exec = executor(&db, 1000).await;
    let g = graph();
    let resolver = Resolver::new(&g);
    let row = |name: &str| {
        Row::new()
            .with("id", Value::Int(1))
            .with("name", Value::Text(name.into()))
            .with("handle", Value::Text("Ann".into()))
    };
    let change = Change::new("app.users", Operation::Update, Some(row("ann")), Some(row("anne")));
    let resolution = run_lookups(&resolver, resolver.resolve(&change), &exec).await.unwrap();
    assert_eq!(
        keys(&g, &resolution.effects),
        ["article:1:comments", "article:1:lang=en", "article:2:lang=en", "article:3:lang=en", "user:1",]
    );
    // User 3 has 21 articles, past the cache's fan-out limit of 10: the whole
    // article namespace is bumped, and so is its embedder's.
    let row3 = Row::new()
        .with("id", Value::Int(3))
        .with("name", Value::Text("cy".into()))
        .with("handle", Value::Text("Cy".into()));
    let change = Change::new("app.users", Operation::Delete, Some(row3), None);
    let resolution = run_lookups(&resolver, resolver.resolve(&change), &exec).await.unwrap();
    assert_eq!(keys(&g, &resolution.effects), ["namespace article", "namespace article_comments", "user:3"]);
    db.drop().await;
}

#[tokio::test]
async fn explain_runs_lookups_against_the_example_schema() {
    let db = TestDb::new("explain_social").await;
    db.run_sql(&std::fs::read_to_string(root().join("examples/schema/social.sql")).unwrap()).await;
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        evictd(&[
            "explain",
            "--graph",
            "dependency-graphs/social.toml",
            "--lookup-url",
            &url,
            "--table",
            "content.users",
            "--op",
            "update",
            "--before",
            r#"{"id":1,"handle":"ann","display_name":"Ann Example","avatar_url":null,"bio":"","email":"ann@example.com"}"#,
            "--after",
            r#"{"id":1,"handle":"ann","display_name":"Ann E.","avatar_url":null,"bio":"","email":"ann@example.com"}"#,
        ])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    // Ann (id 1) wrote articles 10 and 11, and commented on article 12.
    for key in ["article:{10}:detail", "article:{11}:detail", "article:{12}:comments", "user:1:profile"] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    assert!(text.contains("look-ups: 2 (run)"), "{text}");
    db.drop().await;
}
