//! TLS against real TLS servers with a CA the test set-up made
//! (`scripts/services/tls-start.sh`, run by `scripts/test.sh`; its PKI in
//! `EVICTD_TEST_TLS_DIR`): Postgres 15 with ssl=on on 56600, the plain
//! Postgres of the other tests (`EVICTD_TEST_PG_URL`, 55432), a TLS-only
//! Redis on 6600 and a TLS Redis Cluster on 6610-6612.
//!
//! Every Postgres case runs on both of evictd's connections: a sqlx
//! connection made as the pools make theirs and the replication stream as
//! the source starts it (`evictd::tls_probe`); each must reach the outcome
//! libpq reaches for the same URL, which `psql` checks in the same test.

use std::path::PathBuf;
use std::time::Duration;

use redis::AsyncCommands as _;
use sqlx::Connection as _;

use super::daemon::Daemon;
use super::support::pg_url;

const TLS_PG: &str = "127.0.0.1:56600";
const TLS_REDIS: &str = "localhost:6600";
const TLS_CLUSTER: [&str; 3] = ["localhost:6610", "localhost:6611", "localhost:6612"];
/// `evictd_pw`'s password (tls-start.sh): `+`, `%`, `@`, `/` and a space.
const PASSWORD: &str = "p+w%d@x/y z";
const PASSWORD_ENCODED: &str = "p%2Bw%25d%40x%2Fy%20z";

/// The TLS provider, as `main` installs it for the daemon's clients.
fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn pki() -> PathBuf {
    PathBuf::from(
        std::env::var("EVICTD_TEST_TLS_DIR")
            .expect("EVICTD_TEST_TLS_DIR is not set: run the integration tests through scripts/test.sh"),
    )
}

fn file(name: &str) -> String {
    pki().join(name).display().to_string()
}

/// The plain test server's `host:port`.
fn plain_pg() -> String {
    let url = pg_url();
    let rest = url.split_once("@").unwrap().1;
    rest.split_once('/').unwrap().0.to_owned()
}

/// A slot and publication on the database `evictd` of the server at
/// `hostport` (trusted `postgres`), dropped by [`Slot::drop`].
struct Slot {
    name: String,
    admin: String,
}

impl Slot {
    async fn new(hostport: &str) -> Slot {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("evictd_tls_{}_{n}", std::process::id());
        let admin = format!("postgres://postgres@{hostport}/evictd?sslmode=disable");
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        // Two statements: a slot cannot be made in a transaction that wrote.
        for sql in [
            format!("CREATE PUBLICATION {name}"),
            format!("SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.unwrap();
        }
        conn.close().await.ok();
        Slot { name, admin }
    }

    async fn drop(self) {
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        // The probe's walsender may take a moment to go.
        for _ in 0..100 {
            let done = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SELECT pg_drop_replication_slot('{0}'); DROP PUBLICATION {0};",
                self.name
            )))
            .execute(&mut conn)
            .await;
            if done.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("slot {} not dropped", self.name);
    }
}

/// What one URL gives on both connections: `Ok(tls?)` or the error.
async fn both(url: &str, hostport: &str) -> (Result<bool, String>, Result<bool, String>) {
    crypto();
    let pool = evictd::tls_probe::pool_uses_tls(url).await;
    let slot = Slot::new(hostport).await;
    let admin = slot.admin.clone();
    let replication = evictd::tls_probe::replication_uses_tls(url, &slot.name, &slot.name, &admin).await;
    slot.drop().await;
    (pool, replication)
}

enum Expect {
    Tls,
    Plain,
    Fails(&'static [&'static str]),
}

/// What libpq itself (psql) makes of `url`: `Ok(tls?)` or its error.
fn libpq(url: &str) -> Result<bool, String> {
    let out = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-w", "-d", url, "-c"])
        .arg("SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)")
        .output()
        .expect("psql runs (postgresql-client, installed with the test Postgres)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "t")
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Checks both of evictd's connections, and libpq as the reference: all
/// three reach `expect`.
async fn check(case: &str, url: &str, hostport: &str, expect: Expect) {
    let (pool, replication) = both(url, hostport).await;
    let reference = libpq(url);
    match (&expect, &reference) {
        (Expect::Tls, Ok(true)) | (Expect::Plain, Ok(false)) | (Expect::Fails(_), Err(_)) => {}
        _ => panic!("{case}: libpq (psql) gives {reference:?}: the expectation is not libpq's"),
    }
    for (which, got) in [("pool", pool), ("replication", replication)] {
        match (&expect, &got) {
            (Expect::Tls, Ok(true)) | (Expect::Plain, Ok(false)) => {}
            (Expect::Fails(words), Err(e)) => {
                assert!(words.iter().any(|w| e.contains(w)), "{case} ({which}): error {e:?} names none of {words:?}");
                assert!(!e.contains(PASSWORD), "{case} ({which}): the error shows the password: {e}");
            }
            _ => panic!("{case} ({which}): got {got:?}"),
        }
    }
}

#[tokio::test]
async fn each_sslmode_behaves_as_libpq_on_the_pools_and_the_replication_stream() {
    let ca = file("ca.crt");
    let other = file("other-ca.crt");
    let plain = plain_pg();
    let tls = |q: &str| format!("postgres://postgres@{TLS_PG}/evictd{q}");
    let on_plain = |q: &str| format!("postgres://postgres@{plain}/evictd{q}");
    let localhost = |q: &str| format!("postgres://postgres@localhost:56600/evictd{q}");
    let refused: &[&str] = &["does not support TLS"];
    let unknown_ca: &[&str] = &["UnknownIssuer"];
    let cases = [
        ("disable on the TLS server", tls("?sslmode=disable"), TLS_PG.to_owned(), Expect::Plain),
        ("no sslmode (prefer) on the TLS server", tls(""), TLS_PG.to_owned(), Expect::Tls),
        ("prefer on the plain server", on_plain("?sslmode=prefer"), plain.clone(), Expect::Plain),
        ("allow on the TLS server (plain accepted)", tls("?sslmode=allow"), TLS_PG.to_owned(), Expect::Plain),
        ("require on the TLS server", tls("?sslmode=require"), TLS_PG.to_owned(), Expect::Tls),
        ("require on the plain server", on_plain("?sslmode=require"), plain.clone(), Expect::Fails(refused)),
        (
            "verify-ca, the right CA",
            tls(&format!("?sslmode=verify-ca&sslrootcert={ca}")),
            TLS_PG.to_owned(),
            Expect::Tls,
        ),
        (
            "verify-ca, the wrong CA",
            tls(&format!("?sslmode=verify-ca&sslrootcert={other}")),
            TLS_PG.to_owned(),
            Expect::Fails(unknown_ca),
        ),
        (
            "require with a root certificate verifies it (libpq)",
            tls(&format!("?sslmode=require&sslrootcert={other}")),
            TLS_PG.to_owned(),
            Expect::Fails(unknown_ca),
        ),
        (
            "verify-full, a host name in the certificate",
            localhost(&format!("?sslmode=verify-full&sslrootcert={ca}")),
            TLS_PG.to_owned(),
            Expect::Tls,
        ),
        (
            "verify-full, 127.0.0.1 is not in the certificate",
            tls(&format!("?sslmode=verify-full&sslrootcert={ca}")),
            TLS_PG.to_owned(),
            Expect::Fails(&["NotValidForName", "not valid for"]),
        ),
        (
            "verify-full without a root certificate",
            localhost("?sslmode=verify-full"),
            TLS_PG.to_owned(),
            Expect::Fails(&["sslrootcert=FILE"]),
        ),
    ];
    for (case, url, hostport, expect) in cases {
        check(case, &url, &hostport, expect).await;
    }
}

#[tokio::test]
async fn passwords_are_percent_decoded_only_as_libpq_decodes_them() {
    let ca = file("ca.crt");
    let tls = format!("?sslmode=verify-full&sslrootcert={ca}");
    // In the user part: every special character encoded.
    let url = format!("postgres://evictd_pw:{PASSWORD_ENCODED}@localhost:56600/evictd{tls}");
    check("encoded password", &url, TLS_PG, Expect::Tls).await;
    // A raw `+` is a `+` (form-decoding made it a space: authentication failed).
    let raw_plus = PASSWORD_ENCODED.replace("%2B", "+");
    let url = format!("postgres://evictd_pw:{raw_plus}@localhost:56600/evictd{tls}");
    check("raw + in the password", &url, TLS_PG, Expect::Tls).await;
    // `?password=` overrides the user part's, with the same decoding.
    let url = format!("postgres://evictd_pw:wrong@localhost:56600/evictd{tls}&password={raw_plus}");
    check("?password= overrides", &url, TLS_PG, Expect::Tls).await;
    let url = format!("postgres://evictd_pw:wrong@localhost:56600/evictd{tls}");
    check("a wrong password", &url, TLS_PG, Expect::Fails(&["password authentication failed"])).await;
}

#[tokio::test]
async fn allow_retries_with_tls_when_the_server_refuses_plain() {
    let user = "postgres://evictd_tls_only@127.0.0.1:56600/evictd";
    check("allow, a TLS-only user", &format!("{user}?sslmode=allow"), TLS_PG, Expect::Tls).await;
    check("disable, a TLS-only user", &format!("{user}?sslmode=disable"), TLS_PG, Expect::Fails(&["no encryption"]))
        .await;
}

#[tokio::test]
async fn a_client_certificate_authenticates_on_both_connections() {
    let (ca, cert, key) = (file("ca.crt"), file("client.crt"), file("client.key"));
    let base = format!("postgres://evictd@localhost:56600/evictd?sslmode=verify-full&sslrootcert={ca}");
    check("with the client certificate", &format!("{base}&sslcert={cert}&sslkey={key}"), TLS_PG, Expect::Tls).await;
    check("without", &base, TLS_PG, Expect::Fails(&["certificate"])).await;
}

fn redis_tls(ca: &str) -> evictd::config::RedisTls {
    evictd::config::RedisTls { ca_file: Some(file(ca).into()), client_cert: None }
}

async fn ping(url: &str, tls: Option<&evictd::config::RedisTls>) -> Result<String, String> {
    crypto();
    let attempt = async {
        let client = evictd::redis_tls::client(url, tls)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test]
async fn rediss_is_verified_against_the_ca_file() {
    let url = format!("rediss://{TLS_REDIS}");
    assert_eq!(ping(&url, Some(&redis_tls("ca.crt"))).await, Ok("PONG".into()));
    let e = ping(&url, Some(&redis_tls("other-ca.crt"))).await.unwrap_err();
    assert!(e.contains("UnknownIssuer") || e.contains("certificate"), "{e}");
    // Without a CA file only the public roots are trusted.
    assert!(ping(&url, None).await.is_err());
    // `#insecure`: no certificate check at all (test set-ups only).
    assert_eq!(ping(&format!("{url}/#insecure"), None).await, Ok("PONG".into()));
    // A client certificate is accepted (the server checks it when given).
    let mut with_cert = redis_tls("ca.crt");
    with_cert.client_cert = Some((file("client.crt").into(), file("client.key").into()));
    assert_eq!(ping(&url, Some(&with_cert)).await, Ok("PONG".into()));
}

/// `evictd run` from the TLS Postgres (verify-full, the password user)
/// into a TLS Redis target: a committed change removes its key, and its
/// broadcast reaches a subscriber connected with the same TLS settings,
/// which drops its local copy.
async fn run_over_tls(cluster: bool) {
    crypto();
    let ca = file("ca.crt");
    let redis_urls: Vec<String> = if cluster {
        TLS_CLUSTER.iter().map(|h| format!("rediss://{h}")).collect()
    } else {
        vec![format!("rediss://{TLS_REDIS}")]
    };
    let extra =
        format!("[redis.primary]\nurl = \"{}\"\ncluster = {cluster}\ntls_ca_file = \"{ca}\"\n", redis_urls.join(","));
    let admin = format!("postgres://postgres@{TLS_PG}/evictd");
    let mut d = Daemon::custom(&admin, "unused", SCHEMA, graph, &extra).await;
    // The daemon connects as the password user, verifying the server.
    let config = std::fs::read_to_string(&d.config).unwrap();
    let source = format!(
        "postgres://evictd_pw:{PASSWORD_ENCODED}@localhost:56600/{}?sslmode=verify-full&sslrootcert={ca}",
        d.db.name
    );
    let config = config.replacen(&format!("url = \"{}\"", d.db.url), &format!("url = \"{source}\""), 1);
    assert!(config.contains(&source), "the source URL was replaced");
    std::fs::write(&d.config, config).unwrap();
    d.start().await;
    let key = d.key("item:1");
    let tls = redis_tls("ca.crt");
    let exists = |key: String| {
        let urls = redis_urls.clone();
        let tls = tls.clone();
        async move {
            if cluster {
                let client =
                    evictd::redis_tls::cluster(urls.iter().map(String::as_str), Some(&tls)).unwrap().build().unwrap();
                let mut conn = client.get_async_connection().await.unwrap();
                conn.exists::<_, bool>(&key).await.unwrap()
            } else {
                let client = evictd::redis_tls::client(&urls[0], Some(&tls)).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                conn.exists::<_, bool>(&key).await.unwrap()
            }
        }
    };
    let set = async {
        if cluster {
            let client =
                evictd::redis_tls::cluster(redis_urls.iter().map(String::as_str), Some(&tls)).unwrap().build().unwrap();
            let mut conn = client.get_async_connection().await.unwrap();
            let () = conn.set(&key, "cached").await.unwrap();
        } else {
            let client = evictd::redis_tls::client(&redis_urls[0], Some(&tls)).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let () = conn.set(&key, "cached").await.unwrap();
        }
    };
    set.await;
    assert!(exists(key.clone()).await);
    let servers = if cluster {
        evictd::subscriber::Servers::Cluster(redis_urls.clone())
    } else {
        evictd::subscriber::Servers::Standalone(redis_urls[0].clone())
    };
    let mut sub_config = evictd::subscriber::SubscriberConfig::new(servers, evictd::subscriber::Transport::PubSub);
    sub_config.tls = Some(tls.clone());
    let local: evictd::subscriber::LocalCache<String> = evictd::subscriber::LocalCache::builder()
        .ttl(Duration::from_secs(30), Duration::from_secs(5))
        .redis_ttl(Duration::from_secs(60))
        .build();
    let subscriber = evictd::subscriber::Subscriber::start(sub_config, local.clone()).await.unwrap();
    let load = evictd::subscriber::Load::new(format!("{}_item", d.prefix), key.clone());
    local.get_or_load(&load, || async { Ok::<_, std::convert::Infallible>("cached".to_owned()) }).await.unwrap();
    assert!(local.get(&key).await.is_some());
    d.sql("INSERT INTO app.items VALUES (1, 1, 'boots', NULL)").await;
    d.wait_for("the key to be invalidated over TLS", Duration::from_secs(30), || {
        let key = key.clone();
        let exists = &exists;
        async move { (!exists(key).await).then_some(()) }
    })
    .await;
    d.wait_for("the subscriber to drop its local copy", Duration::from_secs(30), || {
        let (local, key) = (local.clone(), key.clone());
        async move { local.get(&key).await.is_none().then_some(()) }
    })
    .await;
    subscriber.stop().await;
    let log = d.log();
    assert!(!log.contains(PASSWORD) && !log.contains(PASSWORD_ENCODED), "the log shows the password:\n{log}");
    d.finish().await;
}

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, owner_id bigint NOT NULL, name text NOT NULL, note text);
ALTER TABLE app.items REPLICA IDENTITY FULL;
";

fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "owner_id", "name", "note"]

[caches.{prefix}_item]
key = "{prefix}:item:{{id}}"
[[caches.{prefix}_item.depends]]
table = "app.items"
"#
    )
}

#[tokio::test]
async fn evictd_run_streams_over_tls_into_a_tls_redis() {
    run_over_tls(false).await;
}

#[tokio::test]
async fn evictd_run_streams_over_tls_into_a_tls_redis_cluster() {
    run_over_tls(true).await;
}
