//! `evictd slot status|drop` and `evictd retire`: the day-two commands for
//! the Postgres source's replication slot (and the Kafka source's group).
//!
//! `slot status` reads `pg_replication_slots`, `pg_stat_replication` and
//! `pg_locks` once and prints what an operator needs to decide about a
//! slot: whether it exists, who streams it (and whether that walsender is
//! an evictd: `application_name`), its positions, the WAL it holds back,
//! `wal_status`/`safe_wal_size` (Postgres 13+) and the replica holding the
//! slot's advisory lock (`source::postgres::lock`), and each Redis target's
//! record of evictd streaming it (the slot's history,
//! `daemon::slot_history`: a target that cannot be read says so in its
//! field and fails nothing). A slot that does not
//! exist is not an error: the output says `exists: false` (exit 0), so a
//! script reads the field rather than an exit code; an unreachable database
//! exits 1.
//!
//! `slot drop` and `retire` change things, and every change is audited: one
//! structured line on stderr ([`audit`]: target `evictd::audit`, in the
//! config's log format) with who (`$USER`, uid, host), what, and the outcome.
//!
//! **Invariants:** a slot that a walsender streams is never dropped without
//! `--force`, and with it only after that walsender was ended (Postgres
//! refuses to drop an active slot anyway); after a drop the command always
//! says what was lost — the invalidations between the slot's confirmed
//! position and now — and how to flush the caches.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use secrecy::ExposeSecret;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

use super::{CliError, audit, prepare, write_stdout};
use crate::config::{self, Config, PostgresSource, SourceConfig};
use crate::graph::Graph;

#[derive(Debug, Args)]
pub struct SlotArgs {
    #[command(subcommand)]
    pub(crate) command: SlotCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SlotCommand {
    /// The source's slot: active, who streams it, positions, WAL retained.
    Status(StatusArgs),
    /// Drop the source's slot (refused while a walsender streams it, unless --force).
    Drop(DropArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The config file (`evictd.toml`) with a Postgres source.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// Also every other logical slot of the source's database (forgotten
    /// slots hold WAL too).
    #[arg(long)]
    pub(crate) all: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: Format,
}

#[derive(Debug, Args)]
pub struct DropArgs {
    /// The config file (`evictd.toml`) with a Postgres source.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// Drop it even while a walsender streams it: ends that walsender first.
    #[arg(long)]
    pub(crate) force: bool,
}

/// `evictd retire`: leave nothing behind that keeps costing the source.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The config file (`evictd.toml`) of the evictd being retired.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// Postgres: drop the slot even while a walsender streams it.
    #[arg(long)]
    pub(crate) force: bool,
    /// Postgres: also drop the publication (only when the config lets
    /// evictd create it: `create_publication = true`).
    #[arg(long)]
    pub(crate) drop_publication: bool,
    /// Postgres: also delete the slot's source record on every Redis target
    /// (`evictd:source:<slot>`). Kept by default: an evictd started on this
    /// slot name later then knows the changes in between were missed.
    #[arg(long)]
    pub(crate) forget_history: bool,
    /// Kafka: delete the consumer group (its committed offsets).
    #[arg(long)]
    pub(crate) delete_group: bool,
}

/// How long the commands wait for the database.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One slot as `status` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct SlotStatus {
    pub(crate) slot: String,
    pub(crate) exists: bool,
    /// Whether this is the config's slot (with `--all`, others are listed).
    pub(crate) configured: bool,
    pub(crate) plugin: Option<String>,
    pub(crate) active: bool,
    pub(crate) active_pid: Option<i32>,
    /// The walsender's `application_name` (evictd's is `evictd`).
    pub(crate) application_name: Option<String>,
    pub(crate) evictd_walsender: bool,
    /// `pg_stat_replication.state` (streaming, catchup, startup).
    pub(crate) walsender_state: Option<String>,
    pub(crate) client_addr: Option<String>,
    pub(crate) restart_lsn: Option<String>,
    pub(crate) confirmed_flush_lsn: Option<String>,
    pub(crate) current_wal_lsn: Option<String>,
    /// `pg_current_wal_lsn() - restart_lsn`: the WAL the slot keeps.
    pub(crate) wal_retained_bytes: Option<i64>,
    pub(crate) wal_retained: Option<String>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: what evictd has not
    /// acknowledged yet.
    pub(crate) lag_bytes: Option<i64>,
    /// Postgres 13+: reserved, extended, unreserved, lost.
    pub(crate) wal_status: Option<String>,
    pub(crate) safe_wal_size_bytes: Option<i64>,
    /// The session holding evictd's advisory lock for the slot (the active replica).
    pub(crate) lock_holder: Option<LockHolder>,
    /// What each Redis target records about evictd streaming this slot
    /// (`evictd:source:<slot>`, the slot's history): whether a later start
    /// on this name counts as a first run or as a lost slot.
    pub(crate) history: Vec<History>,
}

/// One Redis target's record of a slot.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct History {
    pub(crate) target: String,
    /// Whether the target has a record (`None`: it could not be read).
    pub(crate) recorded: Option<bool>,
    pub(crate) first_streamed_ms: Option<u64>,
    pub(crate) last_streamed_ms: Option<u64>,
    pub(crate) system_identifier: Option<String>,
    pub(crate) timeline: Option<u32>,
    pub(crate) flush_pending: Option<bool>,
    /// Why the record could not be read (the target unreachable).
    pub(crate) error: Option<String>,
}

/// Each slot's record on every Redis target; a target that cannot be
/// reached within [`REDIS_TIMEOUT`] is reported in the field, never fails
/// the status.
async fn read_history(config: &Config, slots: &mut [SlotStatus]) {
    for target in &config.redis {
        let sink = match tokio::time::timeout(REDIS_TIMEOUT, crate::sink::redis::RedisSink::connect(target)).await {
            Ok(Ok(sink)) => Ok(sink),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
        };
        for slot in slots.iter_mut() {
            let read = match &sink {
                Ok(sink) => match tokio::time::timeout(REDIS_TIMEOUT, sink.read_source_record(&slot.slot)).await {
                    Ok(Ok(record)) => Ok(record),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
                },
                Err(e) => Err(e.clone()),
            };
            let mut history = History {
                target: target.name.to_string(),
                recorded: None,
                first_streamed_ms: None,
                last_streamed_ms: None,
                system_identifier: None,
                timeline: None,
                flush_pending: None,
                error: None,
            };
            match read {
                Ok(Some(r)) => {
                    history.recorded = Some(true);
                    history.first_streamed_ms = Some(r.first_streamed_ms);
                    history.last_streamed_ms = Some(r.last_streamed_ms);
                    history.system_identifier = Some(r.system_identifier);
                    history.timeline = Some(r.timeline);
                    history.flush_pending = Some(r.flush_pending);
                }
                Ok(None) => history.recorded = Some(false),
                Err(e) => history.error = Some(e),
            }
            slot.history.push(history);
        }
    }
}

/// How long `slot status` waits for a Redis target's record.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LockHolder {
    pub(crate) pid: i32,
    pub(crate) application_name: Option<String>,
    pub(crate) client_addr: Option<String>,
}

/// Bytes for people: 1536 → `1.5 KiB`.
pub(crate) fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// The slots' row: the columns of Postgres 13+ (`wal_status`,
/// `safe_wal_size`) through `to_jsonb`, so that an older server reads as
/// NULL rather than failing.
const STATUS_SQL: &str = "
SELECT s.slot_name, s.plugin, s.active, s.active_pid,
       r.application_name, r.state, r.client_addr::text,
       s.restart_lsn::text, s.confirmed_flush_lsn::text,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint END,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint END,
       to_jsonb(s) ->> 'wal_status',
       (to_jsonb(s) ->> 'safe_wal_size')::bigint
FROM pg_replication_slots s
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = $1
   OR ($2 AND s.slot_type = 'logical' AND s.database = current_database())
ORDER BY s.slot_name <> $1, s.slot_name";

type StatusRow = (
    String,
    Option<String>,
    bool,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

/// The holder of `lock::SlotLock`'s advisory lock: a bigint key shows in
/// `pg_locks` as `classid` (high half) and `objid` (low half), `objsubid` 1.
const LOCK_SQL: &str = "
SELECT l.pid, a.application_name, a.client_addr::text
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended('evictd slot ' || $1, 0)
LIMIT 1";

/// The config's Postgres source, or why the command cannot run.
fn postgres_source<'c>(config: &'c Config, command: &str) -> Result<&'c PostgresSource, CliError> {
    match &config.source {
        Some(SourceConfig::Postgres(pg)) => Ok(pg),
        _ => Err(CliError::Input(format!(
            "{}: evictd {command} needs a Postgres source ([source.postgres])",
            config.file.display()
        ))),
    }
}

fn db_error(what: &str, e: &sqlx::Error) -> CliError {
    CliError::Runtime(format!("{what}: {}", config::hide_passwords(&e.to_string())))
}

async fn bounded<T>(what: &str, f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, CliError> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(result) => result.map_err(|e| db_error(what, &e)),
        Err(_) => Err(CliError::Runtime(format!("{what}: no answer within {TIMEOUT:?}"))),
    }
}

pub(crate) async fn connect(pg: &PostgresSource) -> Result<PgConnection, CliError> {
    bounded("cannot connect to the source database", PgConnection::connect(pg.url.expose_secret())).await
}

/// The status of `slot` (and with `all`, of every logical slot of the database).
pub(crate) async fn status(conn: &mut PgConnection, slot: &str, all: bool) -> Result<Vec<SlotStatus>, CliError> {
    let rows: Vec<StatusRow> =
        bounded("cannot read the slots", sqlx::query_as(STATUS_SQL).bind(slot).bind(all).fetch_all(&mut *conn)).await?;
    let mut out = Vec::with_capacity(rows.len() + 1);
    for row in rows {
        let (name, plugin, active, active_pid, app, state, addr, restart, confirmed, current, retained, lag, ws, safe) =
            row;
        let lock_holder: Option<(i32, Option<String>, Option<String>)> =
            bounded("cannot read the slot's lock", sqlx::query_as(LOCK_SQL).bind(&name).fetch_optional(&mut *conn))
                .await?;
        out.push(SlotStatus {
            configured: name == slot,
            slot: name,
            exists: true,
            plugin,
            active,
            active_pid,
            evictd_walsender: app.as_deref() == Some("evictd"),
            application_name: app,
            walsender_state: state,
            client_addr: addr,
            restart_lsn: restart,
            confirmed_flush_lsn: confirmed,
            current_wal_lsn: current,
            wal_retained: retained.map(human_bytes),
            wal_retained_bytes: retained,
            lag_bytes: lag,
            wal_status: ws,
            safe_wal_size_bytes: safe,
            lock_holder: lock_holder.map(|(pid, application_name, client_addr)| LockHolder {
                pid,
                application_name,
                client_addr,
            }),
            history: Vec::new(),
        });
    }
    if !out.iter().any(|s| s.configured) {
        out.insert(
            0,
            SlotStatus {
                slot: slot.to_owned(),
                exists: false,
                configured: true,
                plugin: None,
                active: false,
                active_pid: None,
                application_name: None,
                evictd_walsender: false,
                walsender_state: None,
                client_addr: None,
                restart_lsn: None,
                confirmed_flush_lsn: None,
                current_wal_lsn: None,
                wal_retained_bytes: None,
                wal_retained: None,
                lag_bytes: None,
                wal_status: None,
                safe_wal_size_bytes: None,
                lock_holder: None,
                history: Vec::new(),
            },
        );
    }
    Ok(out)
}

fn text_of(s: &SlotStatus) -> String {
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut t = format!("slot {}{}\n", s.slot, if s.configured { " (the config's)" } else { "" });
    if !s.exists {
        t.push_str("  exists: false\n");
        t.push_str(&history_text(s));
        return t;
    }
    t.push_str("  exists: true\n");
    t.push_str(&format!("  plugin: {}\n", or(&s.plugin)));
    match s.active_pid {
        Some(pid) => t.push_str(&format!(
            "  active: {} (pid {pid}, application_name {}, {}{})\n",
            s.active,
            or(&s.application_name),
            if s.evictd_walsender { "an evictd" } else { "not an evictd" },
            s.walsender_state.as_deref().map(|st| format!(", {st}")).unwrap_or_default()
        )),
        None => t.push_str(&format!("  active: {}\n", s.active)),
    }
    t.push_str(&format!("  restart_lsn: {}\n", or(&s.restart_lsn)));
    t.push_str(&format!("  confirmed_flush_lsn: {}\n", or(&s.confirmed_flush_lsn)));
    t.push_str(&format!("  current_wal_lsn: {}\n", or(&s.current_wal_lsn)));
    if let Some(bytes) = s.wal_retained_bytes {
        t.push_str(&format!("  wal_retained: {} ({bytes} bytes)\n", human_bytes(bytes)));
    }
    if let Some(bytes) = s.lag_bytes {
        t.push_str(&format!("  unacknowledged: {} ({bytes} bytes)\n", human_bytes(bytes)));
    }
    t.push_str(&format!("  wal_status: {}\n", or(&s.wal_status)));
    if let Some(bytes) = s.safe_wal_size_bytes {
        t.push_str(&format!("  safe_wal_size: {} ({bytes} bytes)\n", human_bytes(bytes)));
    }
    match &s.lock_holder {
        Some(h) => t.push_str(&format!(
            "  lock holder: pid {} (application_name {}, from {})\n",
            h.pid,
            or(&h.application_name),
            h.client_addr.as_deref().unwrap_or("local socket")
        )),
        None => t.push_str("  lock holder: none\n"),
    }
    t.push_str(&history_text(s));
    t
}

fn history_text(s: &SlotStatus) -> String {
    let mut t = String::new();
    for h in &s.history {
        let line = match (&h.error, h.recorded) {
            (Some(e), _) => format!("cannot read: {e}"),
            (None, Some(true)) => format!(
                "streamed by evictd (first {} ms, last {} ms since the epoch; system {}, timeline {}{})",
                h.first_streamed_ms.unwrap_or_default(),
                h.last_streamed_ms.unwrap_or_default(),
                h.system_identifier.as_deref().unwrap_or("-"),
                h.timeline.unwrap_or_default(),
                if h.flush_pending == Some(true) { ", a flush pending" } else { "" }
            ),
            (None, _) => "no record (a start on this slot name is a first run)".to_owned(),
        };
        t.push_str(&format!("  history on redis.{}: {line}\n", h.target));
    }
    t
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))
}

pub(crate) fn run(args: &SlotArgs) -> Result<(), CliError> {
    match &args.command {
        SlotCommand::Status(a) => run_status(a),
        SlotCommand::Drop(a) => {
            let prepared = prepare(Some(&a.config), &[])?;
            let config = prepared.config.ok_or_else(|| CliError::Input("--config is required".into()))?;
            audit::audit_as(&config);
            let pg = postgres_source(&config, "slot drop")?.clone();
            runtime()?.block_on(async {
                let mut conn = connect(&pg).await?;
                let out = drop_slot(&mut conn, &pg.slot, a.force, "slot drop").await?;
                write_stdout(&out)?;
                write_stdout(&flush_advice(&config, &prepared.graph, &out))
            })
        }
    }
}

fn run_status(args: &StatusArgs) -> Result<(), CliError> {
    let prepared = prepare(Some(&args.config), &[])?;
    let config = prepared.config.ok_or_else(|| CliError::Input("--config is required".into()))?;
    let pg = postgres_source(&config, "slot status")?;
    let slots = runtime()?.block_on(async {
        let mut conn = connect(pg).await?;
        let mut slots = status(&mut conn, &pg.slot, args.all).await?;
        read_history(&config, &mut slots).await;
        Ok::<_, CliError>(slots)
    })?;
    let text = match args.format {
        Format::Json => {
            let doc = if args.all {
                serde_json::json!({ "slots": slots })
            } else {
                serde_json::to_value(&slots[0]).map_err(|e| CliError::Runtime(e.to_string()))?
            };
            let mut s = serde_json::to_string_pretty(&doc).map_err(|e| CliError::Runtime(e.to_string()))?;
            s.push('\n');
            s
        }
        Format::Text => slots.iter().map(text_of).collect::<Vec<_>>().join(""),
    };
    write_stdout(&text)
}

/// Drops `slot`: refused while active unless `force`, which ends the
/// walsender first. The text says what happened.
pub(crate) async fn drop_slot(
    conn: &mut PgConnection,
    slot: &str,
    force: bool,
    action: &str,
) -> Result<String, CliError> {
    let before = status(conn, slot, false).await?.remove(0);
    if !before.exists {
        audit::record(action, slot, "absent", "no slot of that name");
        return Ok(format!("slot {slot}: does not exist; nothing to drop\n"));
    }
    let mut out = String::new();
    if before.active {
        let pid = before.active_pid.unwrap_or_default();
        let who = if before.evictd_walsender { "an evictd" } else { "a client that is not evictd" };
        if !force {
            audit::record(action, slot, "refused", &format!("active: walsender pid {pid} ({who})"));
            return Err(CliError::Runtime(format!(
                "slot {slot} is active: walsender pid {pid} ({who}) streams it; stop that evictd first, or --force to end the walsender and drop the slot anyway (a running evictd then finds its slot gone: see source.postgres.on_slot_loss)"
            )));
        }
        out.push_str(&format!("slot {slot}: ending walsender pid {pid} ({who})\n"));
    }
    // A running evictd reconnects quickly after its walsender ends: end and
    // drop until the drop wins, for a bounded time.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if force {
            let pid: Option<i32> = bounded(
                "cannot read the slot's walsender",
                sqlx::query_scalar(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                )
                .bind(slot)
                .fetch_optional(&mut *conn),
            )
            .await?;
            if let Some(pid) = pid {
                bounded(
                    &format!("cannot end walsender {pid} (needs the same role or pg_signal_backend)"),
                    sqlx::query_scalar::<_, bool>("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&mut *conn),
                )
                .await?;
            }
        }
        let dropped = tokio::time::timeout(
            TIMEOUT,
            sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .execute(&mut *conn),
        )
        .await;
        match dropped {
            Ok(Ok(_)) => break,
            // 55006: object in use (active again, or not yet released).
            Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("55006") => {
                if tokio::time::Instant::now() >= deadline || !force {
                    audit::record(action, slot, "failed", &db.to_string());
                    return Err(CliError::Runtime(format!("cannot drop slot {slot}: {db}")));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => {
                audit::record(action, slot, "failed", &config::hide_passwords(&e.to_string()));
                return Err(db_error(&format!("cannot drop slot {slot}"), &e));
            }
            Err(_) => {
                audit::record(action, slot, "failed", "timed out");
                return Err(CliError::Runtime(format!("cannot drop slot {slot}: no answer within {TIMEOUT:?}")));
            }
        }
    }
    let confirmed = before.confirmed_flush_lsn.clone().unwrap_or_else(|| "-".into());
    audit::record(
        action,
        slot,
        "dropped",
        &format!(
            "confirmed_flush_lsn {confirmed}, {} of WAL released",
            before.wal_retained_bytes.map(human_bytes).unwrap_or_else(|| "-".into())
        ),
    );
    out.push_str(&format!(
        "slot {slot}: dropped (it was at confirmed_flush_lsn {confirmed}, holding {} of WAL)\n",
        before.wal_retained_bytes.map(human_bytes).unwrap_or_else(|| "-".into())
    ));
    Ok(out)
}

/// What a dropped slot means for the caches, and how to flush them.
fn flush_advice(config: &Config, graph: &Graph, dropped: &str) -> String {
    if !dropped.contains(": dropped") {
        return String::new();
    }
    let file = config.file.display();
    let mut t = String::from(
        "\nThe changes committed between the slot's confirmed_flush_lsn and now were never invalidated, \
         and nothing can replay them now: the caches may hold stale entries.\n\
         Flush every cache the graph names (a namespace bump: readers move to a new namespace at once):\n",
    );
    for cache in graph.caches() {
        t.push_str(&format!("  evictd invalidate --config {file} --cache {} --all --yes\n", cache.name));
    }
    t.push_str(
        "An evictd started on this config again creates a new slot (create_slot = true) and, since the Redis \
         source records say it streamed the old one, refuses or flushes as source.postgres.on_slot_loss says.\n",
    );
    t
}

/// Drops the configured publication when evictd may have created it.
async fn drop_publication(conn: &mut PgConnection, pg: &PostgresSource) -> Result<String, CliError> {
    let name = &pg.publication;
    if !pg.create_publication {
        audit::record("retire", name, "refused", "create_publication = false");
        return Err(CliError::Input(format!(
            "publication {name}: not dropped: the config does not let evictd create it (create_publication = false), so it is someone else's; drop it by hand if it is not"
        )));
    }
    let sql = format!("DROP PUBLICATION IF EXISTS \"{}\"", name.replace('"', "\"\""));
    bounded(&format!("cannot drop publication {name}"), sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn))
        .await
        .inspect_err(|e| audit::record("retire", name, "failed", &e.to_string()))?;
    audit::record("retire", name, "dropped", "publication");
    Ok(format!("publication {name}: dropped\n"))
}

pub(crate) fn retire(args: &RetireArgs) -> Result<(), CliError> {
    let prepared = prepare(Some(&args.config), &[])?;
    let config = prepared.config.ok_or_else(|| CliError::Input("--config is required".into()))?;
    audit::audit_as(&config);
    match &config.source {
        Some(SourceConfig::Postgres(pg)) => {
            if args.delete_group {
                return Err(CliError::Input("--delete-group is for a Kafka source".into()));
            }
            runtime()?.block_on(async {
                let mut conn = connect(pg).await?;
                let out = drop_slot(&mut conn, &pg.slot, args.force, "retire").await?;
                write_stdout(&out)?;
                if args.drop_publication {
                    write_stdout(&drop_publication(&mut conn, pg).await?)?;
                }
                if args.forget_history {
                    write_stdout(&forget_history(&config, &pg.slot).await?)?;
                }
                write_stdout(&retire_note(&config.file, pg, args.forget_history))
            })
        }
        Some(SourceConfig::Kafka(kafka)) => {
            if args.drop_publication || args.force || args.forget_history {
                return Err(CliError::Input(
                    "--drop-publication, --force and --forget-history are for a Postgres source".into(),
                ));
            }
            if !args.delete_group {
                return write_stdout(&format!(
                    "kafka group {}: kept (its committed offsets cost nothing on the brokers and expire with offsets.retention.minutes); --delete-group deletes it\n",
                    kafka.group_id
                ));
            }
            runtime()?.block_on(delete_group(kafka))
        }
        None => Err(CliError::Input(format!("{}: the config has no source to retire", config.file.display()))),
    }
}

fn retire_note(file: &Path, pg: &PostgresSource, forgot: bool) -> String {
    let records = if forgot {
        String::new()
    } else {
        format!(
            " and the Redis source records (evictd:source:{}: an evictd started again on this slot name knows it lost it, and refuses or flushes; --forget-history deletes them)",
            pg.slot
        )
    };
    format!(
        "retired: nothing of evictd holds WAL on the source any more. Kept: evictd's schema (dead letters: `evictd dead-letters list --config {}`){}{records}.\n",
        file.display(),
        if pg.create_publication { "" } else { ", the publication (not evictd's)" },
    )
}

/// Deletes the slot's source record on every Redis target.
async fn forget_history(config: &Config, slot: &str) -> Result<String, CliError> {
    let mut out = String::new();
    for target in &config.redis {
        let result = match tokio::time::timeout(TIMEOUT, async {
            let sink = crate::sink::redis::RedisSink::connect(target).await?;
            sink.delete_source_record(slot).await
        })
        .await
        {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
        };
        let object = format!("redis.{} evictd:source:{slot}", target.name);
        match result {
            Ok(deleted) => {
                audit::record("retire", &object, if deleted { "deleted" } else { "absent" }, "source record");
                out.push_str(&format!(
                    "redis.{}: source record of {slot} {}\n",
                    target.name,
                    if deleted { "deleted" } else { "absent" }
                ));
            }
            Err(e) => {
                audit::record("retire", &object, "failed", &e);
                return Err(CliError::Runtime(format!("redis.{}: cannot delete the source record: {e}", target.name)));
            }
        }
    }
    Ok(out)
}

/// Deletes the Kafka source's consumer group (it must have no members).
async fn delete_group(kafka: &config::KafkaSource) -> Result<(), CliError> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let mut client = rdkafka::config::ClientConfig::new();
    for (key, value) in &kafka.properties {
        if !config::KAFKA_OWN_PROPERTIES.contains(&key.as_str()) && !key.starts_with("group.") {
            client.set(key, value);
        }
    }
    client.set("bootstrap.servers", &kafka.brokers);
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| CliError::Input(format!("cannot create a Kafka admin client: {e}")))?;
    let options = AdminOptions::new().request_timeout(Some(TIMEOUT));
    let group = kafka.group_id.as_str();
    let results = admin.delete_groups(&[group], &options).await.map_err(|e| {
        audit::record("retire", group, "failed", &e.to_string());
        CliError::Runtime(format!("kafka group {group}: cannot delete: {e}"))
    })?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((name, code)) => {
                audit::record("retire", &name, "failed", &code.to_string());
                return Err(CliError::Runtime(format!(
                    "kafka group {name}: cannot delete: {code} (a group with live members cannot be deleted: stop every evictd of it first)"
                )));
            }
        }
    }
    audit::record("retire", group, "deleted", "kafka consumer group");
    write_stdout(&format!("kafka group {group}: deleted\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
