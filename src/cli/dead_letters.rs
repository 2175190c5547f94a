//! `evictd dead-letters list|replay|purge`: the dead letters an operator
//! reads, replays once their cause is fixed, and purges.
//!
//! The Postgres table (`dead_letter.schema`.dead_letters, [`crate::dead_letter`])
//! is the store of a Postgres source; the Kafka source's letters go to its
//! dead-letter topic ([`crate::source::kafka::dead_letters`]), which `list`
//! reads, replays (`replay --all`, tracked by a replay group's offsets) and
//! `purge --all` truncates (DeleteRecords); see `docs/dead-letters.md`.
//!
//! **Replay** runs each letter's change through the daemon's own pipeline,
//! assembled by [`wiring::pipeline`] as `run` and `replay` assemble theirs:
//! resolve → look-ups (against the configured database) → the Redis
//! targets → the broadcast. Letters are fed as one transaction each, at
//! position `line:<id>` (bump versions from a replay are raised past what
//! Redis holds, never set below it). A letter whose change now resolves is
//! **deleted** once its batch is confirmed (the audit line keeps its id and
//! position): the table holds only what still needs an operator, so there is
//! no "replayed" state to purge. A letter that still fails stays, with its
//! new error, error kind and attempts added; its direct keys and the caches
//! its look-ups feed were invalidated again on the way, as the daemon does.
//! `--dry-run` prints what each letter would invalidate and changes nothing.
//!
//! **Invariants:** a letter is deleted only after the sinks confirmed its
//! batch and the run loop acknowledged its position; one the run loop did
//! not reach (a target failed) is left as it was. Every change to the table
//! is audited (`evictd::audit`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::{Args, Subcommand};
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use super::audit;
use super::slot::Format;
use super::{CliError, prepare, write_stdout};
use crate::change::{Cell, Change, Operation, Position, Row, Value};
use crate::config::{Config, SourceConfig};
use crate::daemon::wiring;
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterStore, OnError, UNDECODABLE_OP};
use crate::graph::Graph;
use crate::metrics::Metrics;
use crate::resolve::Effect;
use crate::run::SessionEnd;
use crate::server::Health;
use crate::sink::{Sink, SinkBatch, SinkError};
use crate::source::{Source, SourceError, SourceEvent, Undecodable};

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    pub(crate) command: DeadLettersCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// List the dead letters, oldest first.
    List(ListArgs),
    /// Run dead letters through the pipeline again; delete those that now resolve.
    Replay(ReplayArgs),
    /// Delete dead letters.
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The config file (`evictd.toml`): its `[dead_letter]` (or the Kafka
    /// source's `dead_letter.topic`), Redis targets and graph.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: u32,
    /// Only those recorded since TIME: a timestamp (`2026-12-05 17:00Z`) or
    /// an age (`2h`, `30 min`, `1 day`).
    #[arg(long, value_name = "TIME")]
    pub(crate) since: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: Format,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The config file (`evictd.toml`): its `[dead_letter]` (or the Kafka
    /// source's `dead_letter.topic`), Redis targets and graph.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// The letter with this id.
    #[arg(long, value_name = "ID", conflicts_with = "all", required_unless_present = "all")]
    pub(crate) id: Option<i64>,
    /// Every letter.
    #[arg(long)]
    pub(crate) all: bool,
    /// Print what each letter would invalidate; change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// The config file (`evictd.toml`): its `[dead_letter]` (or the Kafka
    /// source's `dead_letter.topic`), Redis targets and graph.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// The letter with this id.
    #[arg(long, value_name = "ID", group = "which")]
    pub(crate) id: Option<i64>,
    /// Every letter recorded before TIME (a timestamp or an age, as `list --since`).
    #[arg(long, value_name = "TIME", group = "which")]
    pub(crate) before: Option<String>,
    /// Every letter.
    #[arg(long, group = "which")]
    pub(crate) all: bool,
    /// Needed for --before and --all: without it, the count is printed and nothing deleted.
    #[arg(long)]
    pub(crate) yes: bool,
}

pub(crate) fn run(args: &DeadLettersArgs) -> Result<(), CliError> {
    let config_path = match &args.command {
        DeadLettersCommand::List(a) => &a.config,
        DeadLettersCommand::Replay(a) => &a.config,
        DeadLettersCommand::Purge(a) => &a.config,
    };
    let prepared = prepare(Some(config_path), &[])?;
    let config = prepared.config.ok_or_else(|| CliError::Input("--config is required".into()))?;
    audit::audit_as(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    if let Some(SourceConfig::Kafka(kafka)) = &config.source {
        let topic = config.dead_letter.topic.clone();
        return runtime.block_on(async {
            match &args.command {
                DeadLettersCommand::List(a) => super::dead_letters_kafka::list(kafka, &topic, a).await,
                DeadLettersCommand::Purge(a) => super::dead_letters_kafka::purge(kafka, &topic, a).await,
                DeadLettersCommand::Replay(a) => {
                    super::dead_letters_kafka::replay(&config, kafka, &topic, prepared.graph, a).await
                }
            }
        });
    }
    runtime.block_on(async {
        let table = Table::open(&config)?;
        match &args.command {
            DeadLettersCommand::List(a) => table.list(a).await,
            DeadLettersCommand::Replay(a) => replay(&table, &config, prepared.graph, a).await,
            DeadLettersCommand::Purge(a) => table.purge(a).await,
        }
    })
}

/// The dead-letter table of `[dead_letter]`.
struct Table {
    pool: PgPool,
    /// `"schema".dead_letters`.
    name: String,
}

/// One letter as `list` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Listed {
    id: i64,
    recorded_at: String,
    source: String,
    position: String,
    table_name: String,
    op: String,
    error_kind: String,
    error: String,
    attempts: i32,
    /// The row image (after, else before), cut to 120 characters.
    preview: Option<String>,
}

/// A `--since`/`--before` value as SQL: an age (`2h`) counts back from now.
fn time_sql(param: &str, text: &str) -> String {
    let age = text.trim().starts_with(|c: char| c.is_ascii_digit()) && !text.contains(['-', ':', '/']);
    if age { format!("now() - {param}::interval") } else { format!("{param}::timestamptz") }
}

/// A database error as the command's failure: bad input (a time Postgres
/// cannot read, class 22) exits 2, anything else 1.
fn sql_error(what: &str, e: sqlx::Error) -> CliError {
    let text = crate::config::hide_passwords(&e.to_string());
    match &e {
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")) => {
            CliError::Input(format!("{what}: {text}"))
        }
        _ => CliError::Runtime(format!("{what}: {text}")),
    }
}

const TIMEOUT: Duration = wiring::DEAD_LETTER_TIMEOUT;

async fn bounded<T>(what: &str, f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, CliError> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(result) => result.map_err(|e| sql_error(what, e)),
        Err(_) => Err(CliError::Runtime(format!("{what}: no answer within {TIMEOUT:?}"))),
    }
}

impl Table {
    fn open(config: &Config) -> Result<Table, CliError> {
        let store = wiring::dead_letter_store(config)?;
        let schema = store.schema().replace('"', "\"\"");
        Ok(Table { pool: store.pool().clone(), name: format!("\"{schema}\".dead_letters") })
    }

    async fn list(&self, args: &ListArgs) -> Result<(), CliError> {
        let since = match &args.since {
            Some(t) => format!("WHERE recorded_at >= {}", time_sql("$2", t)),
            None => "WHERE $2::text IS NULL".to_owned(),
        };
        let sql = format!(
            "SELECT id, recorded_at::text AS recorded_at, source, position, table_name, op, error_kind, error, attempts,
                    left(coalesce(after, before)::text, 120) AS preview
             FROM {} {since} ORDER BY id LIMIT $1",
            self.name
        );
        let rows: Vec<Listed> = bounded(
            "cannot read the dead letters",
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(i64::from(args.limit))
                .bind(&args.since)
                .fetch_all(&self.pool),
        )
        .await?;
        let text = match args.format {
            Format::Json => {
                let mut s = serde_json::to_string_pretty(&serde_json::json!({ "dead_letters": rows }))
                    .map_err(|e| CliError::Runtime(e.to_string()))?;
                s.push('\n');
                s
            }
            Format::Text => {
                let mut t = format!("{} dead letter(s) in {}\n", rows.len(), self.name);
                for r in &rows {
                    t.push_str(&format!(
                        "#{} {} {} {} {} [{}] {}\n    {}\n",
                        r.id,
                        r.recorded_at,
                        r.position,
                        r.table_name,
                        r.op,
                        r.error_kind,
                        r.error,
                        r.preview.as_deref().unwrap_or("-")
                    ));
                }
                t
            }
        };
        write_stdout(&text)
    }

    async fn purge(&self, args: &PurgeArgs) -> Result<(), CliError> {
        let (condition, bind, what) = match (&args.id, &args.before, args.all) {
            (Some(id), _, _) => ("id = $1::bigint".to_owned(), Some(id.to_string()), format!("id {id}")),
            (None, Some(t), _) => {
                (format!("recorded_at < {}", time_sql("$1", t)), Some(t.clone()), format!("recorded before {t}"))
            }
            (None, None, true) => ("$1::text IS NULL".to_owned(), None, "all".to_owned()),
            (None, None, false) => return Err(CliError::Input("give --id ID, --before TIME or --all".into())),
        };
        if args.id.is_none() && !args.yes {
            let sql = format!("SELECT count(*) FROM {} WHERE {condition}", self.name);
            let n: i64 = bounded(
                "cannot count the dead letters",
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(&bind).fetch_one(&self.pool),
            )
            .await?;
            return Err(CliError::Input(format!(
                "{n} dead letter(s) ({what}) would be deleted: add --yes to delete them"
            )));
        }
        let sql = format!("DELETE FROM {} WHERE {condition} RETURNING id", self.name);
        let deleted: Vec<i64> = bounded(
            "cannot delete the dead letters",
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(&bind).fetch_all(&self.pool),
        )
        .await
        .inspect_err(|e| audit::record("dead-letters purge", &self.name, "failed", &e.to_string()))?;
        audit::record("dead-letters purge", &self.name, "deleted", &format!("{} letter(s), {what}", deleted.len()));
        write_stdout(&format!("purged {} dead letter(s) ({what})\n", deleted.len()))
    }
}

/// One letter to replay, as stored.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    id: i64,
    position: String,
    table_name: String,
    op: String,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
}

/// A stored row image back as a row: `{"unknown": true}` is a value the
/// source did not send (`dead_letter::row_json`), anything else is read as
/// `explain` reads JSON values (bytea comes back as its hex text).
pub(super) fn row_of(json: Option<&serde_json::Value>) -> Option<Row> {
    let object = json?.as_object()?;
    let mut row = Row::new();
    for (column, value) in object {
        let cell = if *value == serde_json::json!({"unknown": true}) {
            Cell::Unknown
        } else {
            Cell::Known(Value::from_json(value))
        };
        row.set(column.as_str(), cell);
    }
    Some(row)
}

impl Stored {
    /// The letter's change at position `line:<id>`, or why it cannot be replayed.
    fn change(&self) -> Result<Change, String> {
        if self.op == UNDECODABLE_OP {
            return Err("a message that could not be decoded: the table keeps only its raw payload".into());
        }
        let op: Operation = self.op.parse().map_err(|e| format!("{e}"))?;
        let mut change = Change::new(&self.table_name, op, row_of(self.before.as_ref()), row_of(self.after.as_ref()));
        change.position = Position::File { line: self.id.unsigned_abs() };
        Ok(change)
    }
}

/// The letters as a source: one transaction each; `done` is cancelled
/// after the last, and the run loop then flushes and ends.
struct LetterSource {
    queue: VecDeque<SourceEvent>,
    done: CancellationToken,
    /// The highest id acknowledged: every letter up to it was applied.
    acknowledged: Arc<AtomicU64>,
}

impl Source for LetterSource {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        match self.queue.pop_front() {
            Some(event) => Ok(event),
            None => {
                self.done.cancel();
                std::future::pending().await
            }
        }
    }

    async fn acknowledge(&mut self, position: &Position) -> Result<(), SourceError> {
        if let Position::File { line } = position {
            self.acknowledged.fetch_max(*line, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The replay's dead-letter store: remembers which letters failed again.
#[derive(Default)]
struct Failures {
    by_id: Mutex<BTreeMap<u64, Failure>>,
}

impl Failures {
    fn insert(&self, position: &Position, failure: Failure) {
        if let Position::File { line } = position {
            self.by_id.lock().unwrap_or_else(PoisonError::into_inner).insert(*line, failure);
        }
    }
}

impl DeadLetterStore for Failures {
    async fn record(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let failure =
            Failure { error: letter.error.clone(), reason: letter.reason.as_str(), attempts: letter.attempts };
        self.insert(&letter.change.position, failure);
        Ok(())
    }

    /// A letter of the topic that still cannot be decoded.
    async fn record_undecodable(&self, message: &Undecodable) -> Result<(), DeadLetterError> {
        let failure = Failure { error: message.error.clone(), reason: message.reason.as_str(), attempts: 0 };
        self.insert(&message.position, failure);
        Ok(())
    }
}

/// The dry run's sink: what each letter would invalidate.
#[derive(Default)]
struct DrySink {
    seen: Mutex<BTreeSet<(String, String, String)>>,
}

impl Sink for DrySink {
    fn name(&self) -> &str {
        "dry-run"
    }

    async fn apply(&self, batch: SinkBatch<'_>) -> Result<(), SinkError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for effect in batch.effects {
            let cache = batch.graph.cache(effect.cache());
            seen.insert(match effect {
                Effect::Key { key, .. } => {
                    (cache.options.action.as_str().to_owned(), cache.name.to_string(), key.clone())
                }
                Effect::Tag { tag, .. } => ("tag".to_owned(), cache.name.to_string(), tag.clone()),
                Effect::NamespaceBump { .. } => ("namespace".to_owned(), cache.name.to_string(), "*".to_owned()),
            });
        }
        Ok(())
    }
}

/// What a replay of letters came to: the highest letter acknowledged
/// (every one up to it went through the sinks), the letters that failed
/// again (by position line: error, reason, attempts), and for a dry run
/// the invalidations, sorted (`ACTION<TAB>CACHE<TAB>KEY`).
pub(super) struct Replayed {
    pub(super) acknowledged: u64,
    pub(super) failed: BTreeMap<u64, Failure>,
    pub(super) dry: Vec<String>,
}

/// A letter that failed again.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) error: String,
    pub(super) reason: &'static str,
    pub(super) attempts: u32,
}

/// Runs `events` (letters at `line:<n>` positions, one transaction each)
/// through the daemon's pipeline, as `run` wires it: look-ups against the
/// configured database, then the Redis targets and their broadcast (or,
/// with `dry_run`, a sink that only remembers). Changes that still fail
/// are collected, never written anywhere: the caller decides.
pub(super) async fn replay_events(
    config: &Config,
    graph: Graph,
    events: VecDeque<SourceEvent>,
    dry_run: bool,
) -> Result<Replayed, CliError> {
    let done = CancellationToken::new();
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut source = LetterSource { queue: events, done: done.clone(), acknowledged: acknowledged.clone() };
    let graph = Arc::new(graph);
    let lookups = wiring::lookup_executor(config)?;
    let failures = Arc::new(Failures::default());
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(Default::default(), std::iter::empty::<String>()));
    let (end, dry) = if dry_run {
        let sink = Arc::new(DrySink::default());
        let mut pipeline =
            wiring::pipeline(Some(config), graph, sink.clone(), lookups, failures.clone(), metrics, health);
        pipeline.options.on_error = OnError::DeadLetter;
        (pipeline.run_session(&mut source, &done).await, Some(sink))
    } else {
        // An unreachable Redis is waited for, as the daemon does, but not forever.
        let give_up = CancellationToken::new();
        let timer = {
            let give_up = give_up.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                give_up.cancel();
            })
        };
        let sink = wiring::connect_sinks(config, &graph, &metrics, &give_up).await?;
        timer.abort();
        let Some(sink) = sink else {
            return Err(CliError::Runtime("the Redis targets did not answer within 30 s: nothing replayed".into()));
        };
        let mut pipeline =
            wiring::pipeline(Some(config), graph, Arc::new(sink), lookups, failures.clone(), metrics, health);
        pipeline.options.on_error = OnError::DeadLetter;
        (pipeline.run_session(&mut source, &done).await, None)
    };
    match end {
        Ok(SessionEnd::Shutdown) => {}
        Ok(SessionEnd::SourceLost(e)) => return Err(CliError::Runtime(e.to_string())),
        Err(e) => return Err(CliError::Runtime(e.to_string())),
    }
    let failed = std::mem::take(&mut *failures.by_id.lock().unwrap_or_else(PoisonError::into_inner));
    let dry = match dry {
        Some(sink) => {
            let seen = sink.seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.iter().map(|(action, cache, key)| format!("{action}\t{cache}\t{key}\n")).collect()
        }
        None => Vec::new(),
    };
    Ok(Replayed { acknowledged: acknowledged.load(Ordering::Relaxed), failed, dry })
}

async fn replay(table: &Table, config: &Config, graph: Graph, args: &ReplayArgs) -> Result<(), CliError> {
    let sql = format!(
        "SELECT id, position, table_name, op, before, after FROM {} WHERE $1::bigint IS NULL OR id = $1 ORDER BY id",
        table.name
    );
    let stored: Vec<Stored> = bounded(
        "cannot read the dead letters",
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(args.id).fetch_all(&table.pool),
    )
    .await?;
    if let (Some(id), true) = (args.id, stored.is_empty()) {
        return Err(CliError::Input(format!("no dead letter with id {id} in {}", table.name)));
    }
    let mut queue = VecDeque::new();
    let mut skipped = Vec::new();
    for letter in &stored {
        match letter.change() {
            Ok(change) => {
                let position = change.position.clone();
                queue.push_back(SourceEvent::Begin);
                queue.push_back(SourceEvent::Change(change));
                queue.push_back(SourceEvent::Commit { position, commit_time_micros: None });
            }
            Err(why) => skipped.push((letter.id, why)),
        }
    }
    let Replayed { acknowledged, failed, dry } = replay_events(config, graph, queue, args.dry_run).await?;
    let mut out: String = dry.concat();
    let (mut resolved, mut still, mut unapplied) = (0, 0, 0);
    for letter in &stored {
        let id = letter.id.unsigned_abs();
        if let Some((_, why)) = skipped.iter().find(|(s, _)| *s == letter.id) {
            out.push_str(&format!("#{} {}: not replayed: {why}\n", letter.id, letter.position));
            continue;
        }
        if id > acknowledged {
            unapplied += 1;
            out.push_str(&format!("#{} {}: not applied (a target failed): kept\n", letter.id, letter.position));
            continue;
        }
        match failed.get(&id) {
            Some(Failure { error, reason: kind, attempts }) => {
                still += 1;
                out.push_str(&format!("#{} {}: still fails: {error}\n", letter.id, letter.position));
                if !args.dry_run {
                    let sql = format!(
                        "UPDATE {} SET error = $2, error_kind = $3, attempts = attempts + $4 WHERE id = $1",
                        table.name
                    );
                    bounded(
                        "cannot update the dead letter",
                        sqlx::query(sqlx::AssertSqlSafe(sql))
                            .bind(letter.id)
                            .bind(error.replace('\0', "\u{FFFD}"))
                            .bind(*kind)
                            .bind(i32::try_from(*attempts).unwrap_or(i32::MAX))
                            .execute(&table.pool),
                    )
                    .await?;
                    audit::record(
                        "dead-letters replay",
                        &format!("{}#{}", table.name, letter.id),
                        "still fails",
                        error,
                    );
                }
            }
            None => {
                resolved += 1;
                if args.dry_run {
                    out.push_str(&format!("#{} {}: resolves\n", letter.id, letter.position));
                } else {
                    let sql = format!("DELETE FROM {} WHERE id = $1", table.name);
                    bounded(
                        "cannot delete the replayed dead letter",
                        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(letter.id).execute(&table.pool),
                    )
                    .await?;
                    audit::record(
                        "dead-letters replay",
                        &format!("{}#{}", table.name, letter.id),
                        "replayed and deleted",
                        &letter.position,
                    );
                    out.push_str(&format!("#{} {}: replayed, deleted\n", letter.id, letter.position));
                }
            }
        }
    }
    out.push_str(&format!(
        "{} letter(s): {resolved} {}, {still} still failing, {} not replayed\n",
        stored.len(),
        if args.dry_run { "would resolve" } else { "replayed" },
        unapplied + skipped.len()
    ));
    write_stdout(&out)?;
    if unapplied > 0 {
        return Err(CliError::Runtime(format!("{unapplied} letter(s) not applied: replay again")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_counts_back_from_now_and_anything_else_is_a_timestamp() {
        assert_eq!(time_sql("$1", "2h"), "now() - $1::interval");
        assert_eq!(time_sql("$1", "30 min"), "now() - $1::interval");
        assert_eq!(time_sql("$1", "2026-12-05 17:00Z"), "$1::timestamptz");
    }

    #[test]
    fn stored_row_images_read_back_with_unknown_cells() {
        let row = row_of(Some(&serde_json::json!({"id": 2, "name": "x", "body": {"unknown": true}}))).unwrap();
        assert_eq!(row.get("id"), &Cell::Known(Value::Int(2)));
        assert_eq!(row.get("body"), &Cell::Unknown);
        assert_eq!(row_of(None), None);
    }

    #[test]
    fn an_undecodable_letter_is_not_replayed_from_the_table() {
        let stored = Stored {
            id: 1,
            position: "kafka:t/0@1".into(),
            table_name: String::new(),
            op: UNDECODABLE_OP.into(),
            before: None,
            after: None,
        };
        assert!(stored.change().is_err());
    }
}
