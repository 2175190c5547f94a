//! Shared helpers: the binary, golden files, a fresh database per test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::Connection;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `evictd` with `args` from the repository root.
pub fn evictd(args: &[&str]) -> Output {
    evictd_with_stdin(args, None)
}

pub fn evictd_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut command = Command::new(env!("CARGO_BIN_EXE_evictd"));
    command.args(args).current_dir(root()).env_remove("EVICTD_LOOKUP_URL").env_remove("EVICTD_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("EVICTD__") {
            command.env_remove(key);
        }
    }
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("evictd starts");
    if let Some(mut pipe) = child.stdin.take()
        && let Some(text) = stdin
    {
        pipe.write_all(text.as_bytes()).expect("stdin written");
    }
    drop(child.stdin.take());
    // Every command the CLI tests run ends in seconds; a hang fails the test.
    super::process::collect_within(child, std::time::Duration::from_secs(120), &format!("evictd {args:?}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Compares `actual` with the golden file, or rewrites it under
/// `UPDATE_GOLDEN=1`.
pub fn assert_golden(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (create it with UPDATE_GOLDEN=1)", path.display()));
    assert!(
        expected == actual,
        "{} differs (regenerate with UPDATE_GOLDEN=1 after checking the change):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

/// The admin URL of the test Postgres, started by scripts/test.sh.
pub fn pg_url() -> String {
    std::env::var("EVICTD_TEST_PG_URL")
        .expect("EVICTD_TEST_PG_URL is not set: run the integration tests through scripts/test.sh")
}

/// A database created for one test, dropped when done.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    pub async fn new(prefix: &str) -> TestDb {
        TestDb::new_on(&pg_url(), prefix).await
    }

    /// A database on the server at `admin`.
    pub async fn new_on(admin: &str, prefix: &str) -> TestDb {
        let admin = admin.to_owned();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let name = format!("evictd_{prefix}_{}_{}", std::process::id(), nanos % 1_000_000_000);
        let mut conn = sqlx::PgConnection::connect(&admin).await.expect("test Postgres reachable");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        conn.close().await.ok();
        let (base, _) = admin.rsplit_once('/').unwrap();
        TestDb { url: format!("{base}/{name}"), name, admin }
    }

    /// Runs a SQL script (several statements).
    pub async fn run_sql(&self, sql: &str) {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut conn).await.unwrap();
        conn.close().await.ok();
    }

    /// Stands in for a database already dropped.
    pub fn placeholder() -> TestDb {
        TestDb { name: String::new(), url: String::new(), admin: String::new() }
    }

    pub async fn drop(self) {
        if self.name.is_empty() {
            return;
        }
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

/// Polls `check` until it yields, or fails the test naming `what` and
/// showing `log()` (the daemon's log) as it is then.
pub async fn wait_until<F, Fut, T>(what: &str, limit: std::time::Duration, log: impl Fn() -> String, check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}; evictd log:\n{}", log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
