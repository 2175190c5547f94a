//! The command line: `check`, `graph`, `explain`, `run`, `migrate`, `replay`,
//! `invalidate`.
//!
//! Each command returns `Result<(), CliError>`; `main` maps
//! [`CliError::Input`] to exit code 2 (bad config, graph or arguments) and
//! [`CliError::Runtime`] to 1. Everything a command needs is validated
//! before it does any work, through the same [`prepare`] that `run` uses.

mod audit;
mod check_json;
mod dead_letters;
mod dead_letters_kafka;
mod explain;
mod invalidate;
mod live;
mod live_redis;
mod migrate;
mod replay;
mod run;
mod slot;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, Config};
use crate::graph::{self, Graph, Mapping};

/// evictd — invalidates every cache key a committed database change makes stale.
#[derive(Debug, Parser)]
#[command(name = "evictd", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate graph files (and a config file): exit 0 when valid, 2 otherwise.
    Check(CheckArgs),
    /// Print the dependency graph as Graphviz DOT or JSON.
    Graph(GraphArgs),
    /// Show what one change invalidates, and why.
    Explain(explain::ExplainArgs),
    /// Run the daemon: tail the source, invalidate the caches.
    Run(run::RunArgs),
    /// Apply evictd's migrations (the dead-letter table) to its schema, and exit.
    Migrate(migrate::MigrateArgs),
    /// Replay Debezium events from a JSON-lines file (--dry-run: print what would be invalidated).
    Replay(replay::ReplayArgs),
    /// Invalidate a key, a cache's key, a tag or a whole cache (--dry-run: show the blast radius).
    Invalidate(invalidate::InvalidateArgs),
    /// The Postgres source's replication slot: status, drop.
    Slot(slot::SlotArgs),
    /// Retire evictd: drop its slot (Postgres) or group (Kafka, --delete-group).
    Retire(slot::RetireArgs),
    /// The dead letters: list, replay, purge.
    DeadLetters(dead_letters::DeadLettersArgs),
}

/// Where the graph comes from: paths, else the config's `graph.paths`, else
/// `dependency-graphs/`.
#[derive(Debug, Args)]
pub(crate) struct GraphSource {
    /// A config file (`evictd.toml`); its `graph.paths` are used when no
    /// graph path is given.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub(crate) source: GraphSource,
    /// Graph files or directories of `*.toml` files.
    #[arg(value_name = "GRAPH_OR_DIR")]
    pub(crate) paths: Vec<PathBuf>,
    /// With --config: validate only, without connecting to the source
    /// database (publication, migrations).
    #[arg(long)]
    pub(crate) offline: bool,
    /// Output format: the text report, or one JSON object of the findings.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: OutputFormat,
}

/// The output of `check` and `invalidate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum GraphFormat {
    Dot,
    Json,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub(crate) source: GraphSource,
    /// Output format.
    #[arg(long, value_enum, default_value = "dot")]
    pub(crate) format: GraphFormat,
    /// Graph files or directories of `*.toml` files.
    #[arg(value_name = "GRAPH_OR_DIR")]
    pub(crate) paths: Vec<PathBuf>,
}

/// A command's failure, by exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad config, graph or arguments: exit 2.
    #[error("{0}")]
    Input(String),
    /// Anything else: exit 1.
    #[error("{0}")]
    Runtime(String),
}

impl From<crate::daemon::DaemonError> for CliError {
    fn from(e: crate::daemon::DaemonError) -> Self {
        match e.exit_code() {
            2 => CliError::Input(e.to_string()),
            _ => CliError::Runtime(e.to_string()),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

/// What a command runs with: the validated config (when given) and graph.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) config: Option<Config>,
    pub(crate) graph: Graph,
}

/// Loads and validates the config (when given) and the graph, and checks
/// them against each other. `check` runs exactly this; so will `run`.
pub(crate) fn prepare(config_path: Option<&PathBuf>, paths: &[PathBuf]) -> Result<Prepared, CliError> {
    let config = match config_path {
        Some(path) => Some(config::load(path).map_err(|e| CliError::Input(e.to_string()))?),
        None => None,
    };
    let graph_paths: Vec<PathBuf> = if !paths.is_empty() {
        paths.to_vec()
    } else if let Some(c) = &config {
        c.graph_paths.clone()
    } else {
        vec![PathBuf::from("dependency-graphs")]
    };
    let graph = graph::load_paths(&graph_paths).map_err(|e| CliError::Input(e.to_string()))?;
    if let Some(c) = &config {
        cross_check(c, &graph)?;
    }
    Ok(Prepared { config, graph })
}

/// Problems that only show with config and graph together.
fn cross_check(config: &Config, graph: &Graph) -> Result<(), CliError> {
    if config.lookup.url.is_none() {
        let lookups: Vec<&str> = graph
            .dependencies()
            .iter()
            .filter(|d| matches!(d.mapping, Mapping::Lookup(_)))
            .map(|d| d.field.as_str())
            .collect();
        if !lookups.is_empty() {
            return Err(CliError::Input(format!(
                "{}: lookup: the graph has look-up dependencies ({}) but no database to run them: set `lookup.url` or a Postgres source",
                config.file.display(),
                lookups.join(", ")
            )));
        }
    }
    Ok(())
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let result = match cli.command {
        Command::Check(args) => check(&args),
        Command::Graph(args) => print_graph(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Migrate(args) => migrate::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Invalidate(args) => invalidate::run(&args),
        Command::Slot(args) => slot::run(&args),
        Command::Retire(args) => slot::retire(&args),
        Command::DeadLetters(args) => dead_letters::run(&args),
    };
    // The actions audited on the way, whatever the outcome (`audit`).
    audit::flush();
    result
}

fn check(args: &CheckArgs) -> Result<(), CliError> {
    if args.format == OutputFormat::Json {
        return check_json::check(args);
    }
    let prepared = prepare(args.source.config.as_ref(), &args.paths)?;
    // librdkafka's judgement of the properties, as `run` asks it at start.
    if let Some(config) = &prepared.config
        && let Some(config::SourceConfig::Kafka(kafka)) = &config.source
    {
        crate::daemon::check_kafka_client(&config.file, kafka).map_err(|e| CliError::Input(e.to_string()))?;
    }
    let graph = &prepared.graph;
    let mut out = String::new();
    let files: Vec<String> = graph.files().iter().map(|f| f.file.display().to_string()).collect();
    out.push_str(&format!(
        "ok: {} file(s), {} table(s), {} cache(s), {} dependencies\n",
        files.len(),
        graph.tables().len(),
        graph.caches().len(),
        graph.dependencies().len()
    ));
    for file in files {
        out.push_str(&format!("  {file}\n"));
    }
    if let Some(config) = &prepared.config {
        out.push_str(&format!("config: {}\n", config.file.display()));
        match &config.source {
            Some(config::SourceConfig::Postgres(pg)) => out.push_str(&format!(
                "  source: postgres {} (slot {}, publication {})\n",
                config::redact_url(&pg.url),
                pg.slot,
                pg.publication
            )),
            Some(config::SourceConfig::Kafka(k)) => {
                out.push_str(&format!(
                    "  source: kafka {} (group {}, dead letters to topic {})\n",
                    k.brokers, k.group_id, config.dead_letter.topic
                ));
                // Secrets (`sasl.password`, ...) are shown as `****`.
                let properties: Vec<String> = config::redact_properties(&k.properties)
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                if !properties.is_empty() {
                    out.push_str(&format!("  kafka properties: {}\n", properties.join(", ")));
                }
            }
            None => out.push_str("  source: none\n"),
        }
        for target in &config.redis {
            let urls: Vec<String> = target.urls.iter().map(config::redact_url).collect();
            let kind = if target.cluster { "cluster" } else { "standalone" };
            out.push_str(&format!("  redis.{}: {kind} {}\n", target.name, urls.join(",")));
        }
        match &config.dead_letter.url {
            Some(url) => out.push_str(&format!(
                "  dead letters: {} schema {} (on_error {}, migrations {})\n",
                config::redact_url(url),
                config.dead_letter.schema,
                match config.dead_letter.on_error {
                    crate::dead_letter::OnError::DeadLetter => "dead_letter",
                    crate::dead_letter::OnError::Stop => "stop",
                },
                match config.dead_letter.migrations {
                    crate::dead_letter::MigrationMode::Apply => "apply",
                    crate::dead_letter::MigrationMode::Verify => "verify",
                },
            )),
            None => out.push_str("  dead letters: none (no database)\n"),
        }
        out.push_str(&format!("  server: {}\n", config.server.listen));
        // The live database, for what validation alone cannot know.
        if let (false, Some(config::SourceConfig::Postgres(pg))) = (args.offline, &config.source) {
            write_stdout(&out)?;
            let findings = live::check(config, pg, graph)?;
            let mut lines = findings.lines.join("\n");
            lines.push('\n');
            write_stdout(&lines)?;
            if !findings.errors.is_empty() {
                return Err(CliError::Input(findings.errors.join("\n")));
            }
            out.clear();
        }
        // The live Redis targets, as `run` checks them at start-up.
        if !args.offline {
            write_stdout(&out)?;
            out.clear();
            let findings = live_redis::check(config, graph)?;
            let mut lines = findings.lines.join("\n");
            lines.push('\n');
            write_stdout(&lines)?;
            if !findings.errors.is_empty() {
                return Err(CliError::Input(findings.errors.join("\n")));
            }
        }
    }
    write_stdout(&out)
}

fn print_graph(args: &GraphArgs) -> Result<(), CliError> {
    let prepared = prepare(args.source.config.as_ref(), &args.paths)?;
    let text = match args.format {
        GraphFormat::Dot => graph::export::to_dot(&prepared.graph),
        GraphFormat::Json => {
            let json = graph::export::to_json(&prepared.graph);
            let mut s = serde_json::to_string_pretty(&json).map_err(|e| CliError::Runtime(e.to_string()))?;
            s.push('\n');
            s
        }
    };
    write_stdout(&text)
}

/// Writes to stdout; a closed pipe (`evictd graph | head`) is not an error.
fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Runtime(format!("cannot write to stdout: {e}"))),
    }
}
