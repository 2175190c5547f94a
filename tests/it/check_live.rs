//! `evictd check --config` against a real Postgres: every line of its
//! report on the publication and the migrations, and an unreachable
//! database.

use sqlx::Connection as _;

use super::daemon::{Daemon, redis_url};
use super::support::{evictd, pg_url, stderr, stdout};

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE app.audit (id bigint PRIMARY KEY, what text NOT NULL);
ALTER TABLE app.items REPLICA IDENTITY FULL;
";

fn graph(p: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "name"]

[caches.{p}_item]
key = "{p}:item:{{id}}"
[[caches.{p}_item.depends]]
table = "app.items"
"#
    )
}

/// A world whose config says `create_publication = create`.
async fn world(create: bool) -> Daemon {
    let d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, graph, "").await;
    if !create {
        let text = std::fs::read_to_string(&d.config).unwrap();
        std::fs::write(&d.config, text.replace("create_publication = true", "create_publication = false")).unwrap();
    }
    d
}

fn check(d: &Daemon) -> std::process::Output {
    evictd(&["check", "--config", d.config.to_str().unwrap()])
}

#[tokio::test]
async fn a_published_table_no_dependency_maps_is_a_warning() {
    let d = world(false).await;
    d.sql(&format!("CREATE PUBLICATION {} FOR TABLE app.items, app.audit", d.slot)).await;
    let out = check(&d);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("database: {} (publication {})", d.db.url, d.slot)), "{text}");
    assert!(
        text.contains(&format!(
            "  warning: table app.audit is in publication `{}` but no dependency maps it: its changes are streamed and ignored",
            d.slot
        )),
        "{text}"
    );
    assert!(!text.contains("app.items is"), "a mapped table is not reported: {text}");
    d.finish().await;
}

#[tokio::test]
async fn a_graph_table_missing_from_the_publication_is_an_error_unless_run_will_add_it() {
    let d = world(false).await;
    d.sql(&format!("CREATE PUBLICATION {} FOR TABLE app.audit", d.slot)).await;
    let out = check(&d);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "error: graph table app.items is not in publication `{0}`: its changes would never reach evictd: ALTER PUBLICATION \"{0}\" ADD TABLE \"app\".\"items\"",
            d.slot
        )),
        "{err}"
    );
    d.finish().await;

    let mut d = world(true).await;
    d.sql(&format!("CREATE PUBLICATION {} FOR TABLE app.audit", d.slot)).await;
    let out = check(&d);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "  note: graph table app.items is not in publication `{}`: `evictd run` will add it (create_publication = true)",
            d.slot
        )),
        "{}",
        stdout(&out)
    );
    // And it does.
    d.start().await;
    let mut conn = sqlx::PgConnection::connect(&d.db.url).await.unwrap();
    let published: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = 'app' AND tablename = 'items')",
    )
    .bind(&d.slot)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(published, "run added the graph's table to the publication");
    d.finish().await;
}

#[tokio::test]
async fn a_missing_publication_is_an_error_unless_run_creates_it_and_pending_migrations_are_noted() {
    let d = world(false).await;
    let out = check(&d);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("error: publication `{}` does not exist: CREATE PUBLICATION", d.slot)),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out)
            .contains("  note: schema evictd lacks migration(s) 0001_dead_letters: `evictd run` will apply them"),
        "{}",
        stdout(&out)
    );
    d.finish().await;

    let d = world(true).await;
    let out = check(&d);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("  note: publication `{}` does not exist: `evictd run` will create it", d.slot)),
        "{}",
        stdout(&out)
    );
    d.finish().await;
}

#[tokio::test]
async fn pending_migrations_are_an_error_in_verify_mode() {
    let d = Daemon::custom(&pg_url(), &redis_url(), SCHEMA, graph, "[dead_letter]\nmigrations = \"verify\"\n").await;
    let out = check(&d);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out)
            .contains("lacks evictd's migration(s) 0001_dead_letters: apply them with `evictd migrate --config FILE`"),
        "{}",
        stderr(&out)
    );
    d.finish().await;
}

#[tokio::test]
async fn an_unreachable_database_exits_1_and_offline_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("graph.toml"), graph("x")).unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(
        &path,
        "[graph]\npaths = [\"graph.toml\"]\n[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://evictd:pw@127.0.0.1:1/app\"\n[redis.primary]\nurl = \"redis://127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = evictd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot check the source database postgres://evictd:****@127.0.0.1:1/app"), "{err}");
    assert!(!err.contains("pw@"), "{err}");
    let offline = evictd(&["check", "--offline", "--config", path.to_str().unwrap()]);
    assert_eq!(offline.status.code(), Some(0), "{}", stderr(&offline));
    assert!(!stdout(&offline).contains("database:"), "{}", stdout(&offline));
}
