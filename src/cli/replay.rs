//! `evictd replay FILE`: Debezium events from a JSON-lines file through the
//! daemon's own pipeline — for incident drills and tests.
//!
//! Each line is a Kafka message as `tests/fixtures/debezium/` stores them
//! (`{"topic", "partition", "offset", "key", "value", "headers"}`) or a bare
//! Debezium event. Decoding follows the config's `[source.kafka]` settings
//! when it has them (topic-to-table mapping, `full_row_deletes`,
//! `snapshot_reads`). Changes run through the run loop exactly as in
//! `evictd run` — batches, look-ups, the Redis targets, the broadcast — with
//! the line number as position: bump versions from a file are raised past
//! what Redis holds, never set below it.
//!
//! `--dry-run` applies nothing: it prints every distinct invalidation,
//! sorted (`ACTION<TAB>CACHE<TAB>KEY`), then a summary on stderr. Look-ups
//! still run against the configured database, since they decide the keys.
//!
//! A line that cannot be decoded is reported on stderr as `FILE:LINE: error`
//! (never skipped silently), the replay goes on, and the command exits 2 at
//! the end. A change whose look-ups fail is reported the same way. The file
//! source only decodes: it yields such a line as `SourceEvent::Undecodable`,
//! and the run loop hands it to the replay's dead-letter store, which
//! reports it. A replay goes on past both whatever `dead_letter.on_error`
//! says: it is a drill, and it reports everything it met at the end.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Args;
use serde_json::Value as Json;
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;

use super::{CliError, prepare, write_stdout};
use crate::change::Position;
use crate::change::Value;
use crate::config::{Config, DEFAULT_MAX_VALUE_BYTES, FullRowDeletes, SnapshotReads, SourceConfig};
use crate::daemon::wiring;
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterStore, OnError};
use crate::graph::Graph;
use crate::graph::Lookup;
use crate::lookup::{LookupError, LookupExecutor, LookupOutcome, PgLookupExecutor};
use crate::metrics::Metrics;
use crate::resolve::Effect;
use crate::run::SessionEnd;
use crate::server::Health;
use crate::sink::{Sink, SinkBatch, SinkError};
use crate::source::debezium::{self, DecodeOptions, Decoded, Record, TableKeys};
use crate::source::{RawMessage, Source, SourceError, SourceEvent, Undecodable, UndecodableReason};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// JSON lines of Debezium events (Kafka messages or bare events); `-`
    /// for stdin.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The config file: Redis targets, look-up database, `[source.kafka]`
    /// decoding settings and the graph.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// A graph file or directory (repeatable), instead of the config's.
    #[arg(long = "graph", value_name = "GRAPH_OR_DIR")]
    pub(crate) graphs: Vec<PathBuf>,
    /// Print what would be invalidated; change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

/// How lines are decoded.
#[derive(Debug, Clone, Default)]
struct Decoding {
    tables: std::collections::BTreeMap<String, String>,
    full_row_deletes: FullRowDeletes,
    snapshot_reads: SnapshotReads,
    /// The graph's key columns, for deletes whose key names none.
    table_keys: TableKeys,
    /// `source.kafka.max_value_bytes` (its default without one). A file has
    /// no time budget: its lines are an operator's, not a stream's.
    max_value_bytes: usize,
}

impl Decoding {
    fn of(config: Option<&Config>, graph: &Graph) -> Decoding {
        let table_keys = debezium::table_keys(graph);
        match config.and_then(|c| c.source.as_ref()) {
            Some(SourceConfig::Kafka(k)) => Decoding {
                tables: k.tables.clone(),
                full_row_deletes: k.full_row_deletes.clone(),
                snapshot_reads: k.snapshot_reads,
                table_keys,
                max_value_bytes: k.max_value_bytes,
            },
            _ => Decoding { table_keys, max_value_bytes: DEFAULT_MAX_VALUE_BYTES, ..Decoding::default() },
        }
    }
}

/// Problems met along the way, reported on stderr as they happen.
#[derive(Debug, Default)]
struct Tally {
    lines: AtomicU64,
    /// The number of the last line read.
    last: AtomicU64,
    changes: AtomicU64,
    bad: AtomicU64,
    acknowledged: AtomicU64,
}

/// The file as a source: one line, one transaction.
struct FileSource<R> {
    lines: tokio::io::Lines<R>,
    name: String,
    line: u64,
    decoding: Decoding,
    queue: std::collections::VecDeque<SourceEvent>,
    tally: Arc<Tally>,
    /// Cancelled at the end of the file: the run loop then flushes and ends.
    done: CancellationToken,
}

impl<R: tokio::io::AsyncBufRead + Unpin + Send> FileSource<R> {
    fn on_line(&mut self, text: &str) {
        let position = Position::File { line: self.line };
        let decoded = serde_json::from_str::<Json>(text)
            .map_err(|e| (UndecodableReason::Decode, format!("not JSON: {e}")))
            .and_then(|json| {
                let record = Record::from_json(&json);
                let options = DecodeOptions {
                    table: record.topic.and_then(|t| self.decoding.tables.get(t)).map(String::as_str),
                    full_row_deletes: Some(&self.decoding.full_row_deletes),
                    table_keys: Some(&self.decoding.table_keys),
                    max_value_bytes: Some(self.decoding.max_value_bytes),
                    deadline: None,
                };
                debezium::decode(record.value, record.key, position.clone(), &options)
                    .map_err(|e| (e.reason(), e.to_string()))
            });
        // A line that cannot be decoded is yielded as it is, alone: the
        // run loop reports it through the dead-letter store, as it does for
        // every source.
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err((reason, error)) => {
                let raw = RawMessage { key: None, value: Some(text.as_bytes().to_vec()), headers: Vec::new() };
                self.queue.push_back(SourceEvent::Undecodable(Undecodable { position, reason, error, raw }));
                return;
            }
        };
        self.queue.push_back(SourceEvent::Begin);
        let mut commit_time_micros = None;
        match decoded {
            Decoded::Change(change) => {
                commit_time_micros = change.commit_time_micros;
                self.tally.changes.fetch_add(1, Ordering::Relaxed);
                self.queue.push_back(SourceEvent::Change(change));
            }
            Decoded::SnapshotRead(change) if self.decoding.snapshot_reads == SnapshotReads::Invalidate => {
                self.tally.changes.fetch_add(1, Ordering::Relaxed);
                self.queue.push_back(SourceEvent::Change(change));
            }
            Decoded::SnapshotRead(_) | Decoded::Ignored(_) => {}
        }
        self.queue.push_back(SourceEvent::Commit { position, commit_time_micros });
    }
}

impl<R: tokio::io::AsyncBufRead + Unpin + Send> Source for FileSource<R> {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            if self.done.is_cancelled() {
                std::future::pending::<()>().await;
            }
            match self.lines.next_line().await {
                Ok(Some(text)) => {
                    self.line += 1;
                    if !text.trim().is_empty() {
                        self.tally.lines.fetch_add(1, Ordering::Relaxed);
                        self.tally.last.store(self.line, Ordering::Relaxed);
                        self.on_line(&text);
                    }
                }
                Ok(None) => self.done.cancel(),
                Err(e) => {
                    return Err(SourceError::definite_from(format!("{}:{}: cannot read", self.name, self.line + 1), e));
                }
            }
        }
    }

    async fn acknowledge(&mut self, position: &Position) -> Result<(), SourceError> {
        if let Position::File { line } = position {
            self.tally.acknowledged.fetch_max(*line, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The dry run's sink: remembers every invalidation.
struct PrintSink {
    seen: Mutex<BTreeSet<(String, String, String)>>,
}

impl Sink for PrintSink {
    fn name(&self) -> &str {
        "dry-run"
    }

    async fn apply(&self, batch: SinkBatch<'_>) -> Result<(), SinkError> {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for effect in batch.effects {
            let cache = batch.graph.cache(effect.cache());
            let line = match effect {
                Effect::Key { key, .. } => {
                    (cache.options.action.as_str().to_owned(), cache.name.to_string(), key.clone())
                }
                Effect::Tag { tag, .. } => ("tag".to_owned(), cache.name.to_string(), tag.clone()),
                Effect::NamespaceBump { .. } => ("namespace".to_owned(), cache.name.to_string(), "*".to_owned()),
            };
            seen.insert(line);
        }
        Ok(())
    }
}

/// Look-ups of a replay: against the database, or — in a dry run without
/// one — answered as "too many rows", which invalidates the whole cache, as
/// the daemon does whenever it cannot know the keys.
enum ReplayLookups {
    Database(Arc<PgLookupExecutor>),
    Skipped,
}

impl LookupExecutor for ReplayLookups {
    async fn execute(
        &self,
        field: &str,
        lookup: &Lookup,
        args: &[Value],
        params: &[Arc<str>],
        limit: u64,
    ) -> Result<LookupOutcome, LookupError> {
        match self {
            ReplayLookups::Database(pg) => pg.execute(field, lookup, args, params, limit).await,
            ReplayLookups::Skipped => Ok(LookupOutcome::FanoutExceeded { rows: limit.saturating_add(1) }),
        }
    }
}

/// Look-up failures: reported on stderr (a replay has no dead-letter store).
struct ReportDeadLetters {
    /// The file's name, for `FILE:LINE: error`.
    name: String,
    tally: Arc<Tally>,
}

impl DeadLetterStore for ReportDeadLetters {
    async fn record(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        self.tally.bad.fetch_add(1, Ordering::Relaxed);
        let change = &letter.change;
        eprintln!("{}: {} on {}: cannot resolve: {}", change.position, change.op, change.table, letter.error);
        Ok(())
    }

    /// A line that cannot be decoded, as `FILE:LINE: error`.
    async fn record_undecodable(&self, message: &Undecodable) -> Result<(), DeadLetterError> {
        self.tally.bad.fetch_add(1, Ordering::Relaxed);
        match &message.position {
            Position::File { line } => eprintln!("{}:{line}: {}", self.name, message.error),
            other => eprintln!("{other}: {}", message.error),
        }
        Ok(())
    }
}

pub(crate) fn run(args: &ReplayArgs) -> Result<(), CliError> {
    let prepared = prepare(args.config.as_ref(), &args.graphs)?;
    let config = prepared.config;
    if !args.dry_run && config.is_none() {
        return Err(CliError::Input(
            "evictd replay needs --config (its Redis targets), or --dry-run to only print".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(replay(args, config, prepared.graph))
}

async fn replay(args: &ReplayArgs, config: Option<Config>, graph: Graph) -> Result<(), CliError> {
    let name = args.file.display().to_string();
    let reader: Box<dyn tokio::io::AsyncBufRead + Unpin + Send> = if name == "-" {
        Box::new(tokio::io::BufReader::new(tokio::io::stdin()))
    } else {
        let file =
            tokio::fs::File::open(&args.file).await.map_err(|e| CliError::Input(format!("cannot read {name}: {e}")))?;
        Box::new(tokio::io::BufReader::new(file))
    };
    let tally = Arc::new(Tally::default());
    let done = CancellationToken::new();
    let mut source = FileSource {
        lines: reader.lines(),
        name: name.clone(),
        line: 0,
        decoding: Decoding::of(config.as_ref(), &graph),
        queue: Default::default(),
        tally: tally.clone(),
        done: done.clone(),
    };
    let graph = Arc::new(graph);
    let lookups = match &config {
        Some(c) => wiring::lookup_executor(c)?,
        None => None,
    };
    let has_lookups = graph.dependencies().iter().any(|d| matches!(d.mapping, crate::graph::Mapping::Lookup(_)));
    let lookups = match lookups {
        Some(pg) => Some(Arc::new(ReplayLookups::Database(pg))),
        None if has_lookups && args.dry_run => {
            eprintln!("{name}: no look-up database (--config): the caches look-ups feed are shown whole (`namespace`)");
            Some(Arc::new(ReplayLookups::Skipped))
        }
        None if has_lookups => {
            return Err(CliError::Input(
                "the graph has look-up dependencies: give --config with a database to run them (lookup.url or a Postgres source)".into(),
            ));
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(Default::default(), std::iter::empty::<String>()));
    let dead_letters = Arc::new(ReportDeadLetters { name: name.clone(), tally: tally.clone() });
    let result = if args.dry_run {
        let sink = Arc::new(PrintSink { seen: Mutex::new(BTreeSet::new()) });
        let mut pipeline =
            wiring::pipeline(config.as_ref(), graph, sink.clone(), lookups, dead_letters, metrics, health);
        pipeline.options.on_error = OnError::DeadLetter;
        let end = pipeline.run_session(&mut source, &done).await;
        let seen = sink.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        for (action, cache, key) in seen.iter() {
            out.push_str(&format!("{action}\t{cache}\t{key}\n"));
        }
        write_stdout(&out)?;
        end
    } else {
        let config = config.as_ref().ok_or_else(|| CliError::Input("--config is required".into()))?;
        let Some(sink) = wiring::connect_sinks(config, &graph, &metrics, &CancellationToken::new()).await? else {
            return Ok(());
        };
        let mut pipeline =
            wiring::pipeline(Some(config), graph, Arc::new(sink), lookups, dead_letters, metrics, health);
        pipeline.options.on_error = OnError::DeadLetter;
        pipeline.run_session(&mut source, &done).await
    };
    let lines = tally.lines.load(Ordering::Relaxed);
    let bad = tally.bad.load(Ordering::Relaxed);
    match result {
        Ok(SessionEnd::Shutdown) => {}
        Ok(SessionEnd::SourceLost(m)) => return Err(CliError::Runtime(m.to_string())),
        Err(e) => return Err(CliError::Runtime(e.to_string())),
    }
    let (acknowledged, last) = (tally.acknowledged.load(Ordering::Relaxed), tally.last.load(Ordering::Relaxed));
    if acknowledged < last {
        return Err(CliError::Runtime(format!(
            "{name}: stopped with lines {} to {last} not applied (a target failed; see above): replay again",
            acknowledged + 1
        )));
    }
    eprintln!(
        "{name}: {lines} message(s), {} change(s), {bad} not replayed; {} through line {}",
        tally.changes.load(Ordering::Relaxed),
        if args.dry_run { "resolved" } else { "applied" },
        tally.acknowledged.load(Ordering::Relaxed)
    );
    if bad > 0 {
        return Err(CliError::Input(format!("{name}: {bad} message(s) could not be replayed (see above)")));
    }
    Ok(())
}
