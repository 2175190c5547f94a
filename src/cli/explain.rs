//! `evictd explain`: one change in, its effects and their paths out.
//!
//! The change is given as flags (`--table`, `--op`, `--before`, `--after`,
//! rows as JSON objects; a column left out of `--before` is unknown, as a
//! source that sent no old value) or as a Debezium event (`--debezium FILE`,
//! `-` for stdin). Look-ups are listed, and run when a database is given
//! (`--lookup-url`, or `--config` with one).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value as Json, json};

use super::{CliError, prepare, write_stdout};
use crate::change::{Change, Operation, Position, Row};
use crate::graph::{Graph, LookupArg, Mapping, Trigger};
use crate::lookup::PgLookupExecutor;
use crate::resolve::{Cause, Effect, Image, PathDisplay, Resolution, Resolver, Skip};
use crate::source::debezium::{self, Decoded};

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A graph file or directory (repeatable). Default: the config's
    /// `graph.paths`, else `dependency-graphs/`.
    #[arg(long = "graph", value_name = "GRAPH_OR_DIR")]
    pub(crate) graphs: Vec<PathBuf>,
    /// Graph files or directories, as for `check` (added to `--graph`).
    #[arg(value_name = "GRAPH_OR_DIR")]
    pub(crate) paths: Vec<PathBuf>,
    /// A config file; its graph and look-up database are used.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The changed table, `schema.table`.
    #[arg(long, requires = "op", conflicts_with = "debezium")]
    pub(crate) table: Option<String>,
    /// insert, update, delete or truncate.
    #[arg(long, requires = "table")]
    pub(crate) op: Option<Operation>,
    /// The old row as a JSON object (columns left out are unknown).
    #[arg(long, value_name = "JSON", requires = "table")]
    pub(crate) before: Option<String>,
    /// The new row as a JSON object.
    #[arg(long, value_name = "JSON", requires = "table")]
    pub(crate) after: Option<String>,
    /// A change as JSON in a file (`-` for stdin): either
    /// `{"table": …, "op": …, "before": {…}, "after": {…}}` or a Debezium
    /// change event, told apart by their fields.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["table", "debezium"])]
    pub(crate) change: Option<PathBuf>,
    /// A Debezium change event (JSON) in a file, or `-` for stdin.
    #[arg(long, value_name = "FILE")]
    pub(crate) debezium: Option<PathBuf>,
    /// Run look-ups against this database (secret: prefer --config or
    /// EVICTD_LOOKUP_URL).
    #[arg(long, value_name = "URL", env = "EVICTD_LOOKUP_URL", hide_env_values = true)]
    pub(crate) lookup_url: Option<SecretString>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(args: &ExplainArgs) -> Result<(), CliError> {
    let graphs: Vec<PathBuf> = args.graphs.iter().chain(&args.paths).cloned().collect();
    let prepared = prepare(args.config.as_ref(), &graphs)?;
    let graph = &prepared.graph;
    let change = read_change(args)?;
    if graph.table_id(&change.table).is_none() {
        let mut tables: Vec<&str> = graph.tables().iter().map(|t| &*t.name).collect();
        tables.sort_unstable();
        return Err(CliError::Input(format!(
            "table `{}` is not in the graph (tables: {})",
            change.table,
            tables.join(", ")
        )));
    }
    let resolver = Resolver::new(graph);
    let mut resolution = resolver.resolve(&change);
    let lookup = args.lookup_url.clone().or_else(|| prepared.config.as_ref().and_then(|c| c.lookup.url.clone()));
    let pending = resolution.lookups.clone();
    let ran_lookups = match lookup {
        Some(url) if !resolution.lookups.is_empty() => {
            let (timeout, batch) = prepared
                .config
                .as_ref()
                .map_or((Duration::from_secs(5), 1000), |c| (c.lookup.timeout, c.lookup.batch_size));
            resolution = run_lookups(&resolver, resolution, &url, timeout, batch)?;
            true
        }
        _ => false,
    };
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&to_json(graph, &change, &resolution, &pending, ran_lookups))
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        s.push('\n');
        s
    } else {
        to_text(graph, &change, &resolution, &pending, ran_lookups)
    };
    write_stdout(&text)
}

fn run_lookups(
    resolver: &Resolver<'_>,
    resolution: Resolution,
    url: &SecretString,
    timeout: Duration,
    batch: usize,
) -> Result<Resolution, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async {
        let options = PgLookupExecutor::connect_options(url.expose_secret())
            .map_err(|e| CliError::Input(format!("lookup.url: {e}")))?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await
            .map_err(|e| CliError::Runtime(format!("cannot connect to the look-up database: {e}")))?;
        let executor = PgLookupExecutor::new(pool, timeout, batch);
        crate::lookup::run_lookups(resolver, resolution, &executor).await.map_err(|e| CliError::Runtime(e.to_string()))
    })
}

fn parse_row(flag: &str, text: &str) -> Result<Row, CliError> {
    let json: Json = serde_json::from_str(text).map_err(|e| CliError::Input(format!("--{flag}: not JSON: {e}")))?;
    match json.as_object() {
        Some(map) => Ok(Row::from_json_object(map, None)),
        None => Err(CliError::Input(format!("--{flag}: expected a JSON object of column values"))),
    }
}

/// Reads a JSON document from a file, or stdin for `-`.
fn read_json(path: &Path) -> Result<Json, CliError> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| CliError::Runtime(format!("cannot read stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))?
    };
    serde_json::from_str(&text).map_err(|e| CliError::Input(format!("{}: not JSON: {e}", path.display())))
}

fn from_debezium(json: &Json, name: &str) -> Result<Change, CliError> {
    let record = debezium::Record::from_json(json);
    let options = debezium::DecodeOptions::default();
    match debezium::decode(record.value, record.key, Position::File { line: 1 }, &options) {
        Ok(Decoded::Change(c)) | Ok(Decoded::SnapshotRead(c)) => Ok(c),
        Ok(Decoded::Ignored(what)) => {
            Err(CliError::Input(format!("{name}: not a row change ({}), nothing to explain", what.as_str())))
        }
        Err(e) => Err(CliError::Input(format!("{name}: {e}"))),
    }
}

fn row_of(what: &str, json: Option<&Json>) -> Result<Option<Row>, CliError> {
    match json {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Object(map)) => Ok(Some(Row::from_json_object(map, None))),
        Some(_) => Err(CliError::Input(format!("{what}: expected a JSON object of column values"))),
    }
}

fn read_change(args: &ExplainArgs) -> Result<Change, CliError> {
    if let Some(path) = &args.debezium {
        return from_debezium(&read_json(path)?, &path.display().to_string());
    }
    if let Some(path) = &args.change {
        let json = read_json(path)?;
        let name = path.display().to_string();
        let (Some(table), Some(op)) = (json.get("table"), json.get("op")) else {
            return from_debezium(&json, &name);
        };
        let table = table.as_str().ok_or_else(|| CliError::Input(format!("{name}: `table` must be a string")))?;
        let op: Operation = op
            .as_str()
            .ok_or_else(|| CliError::Input(format!("{name}: `op` must be a string")))?
            .parse()
            .map_err(|e| CliError::Input(format!("{name}: {e}")))?;
        let before = row_of(&format!("{name}: `before`"), json.get("before"))?;
        let after = row_of(&format!("{name}: `after`"), json.get("after"))?;
        return change_of(table, op, before, after);
    }
    let (Some(table), Some(op)) = (&args.table, args.op) else {
        return Err(CliError::Input(
            "give a change: --table and --op (with --before/--after), --change FILE or --debezium FILE".into(),
        ));
    };
    let before = args.before.as_deref().map(|t| parse_row("before", t)).transpose()?;
    let after = args.after.as_deref().map(|t| parse_row("after", t)).transpose()?;
    change_of(table, op, before, after)
}

/// A change whose images fit its operation.
fn change_of(table: &str, op: Operation, before: Option<Row>, after: Option<Row>) -> Result<Change, CliError> {
    match op {
        Operation::Insert | Operation::Update if after.is_none() => {
            return Err(CliError::Input(format!("--op {op} needs --after")));
        }
        Operation::Delete if before.is_none() => return Err(CliError::Input("--op delete needs --before".into())),
        Operation::Insert if before.is_some() => return Err(CliError::Input("--op insert takes no --before".into())),
        Operation::Delete if after.is_some() => return Err(CliError::Input("--op delete takes no --after".into())),
        Operation::Truncate if before.is_some() || after.is_some() => {
            return Err(CliError::Input("--op truncate takes no row".into()));
        }
        _ => {}
    }
    Ok(Change::new(table, op, before, after))
}

fn action_label(graph: &Graph, effect: &Effect) -> String {
    match effect {
        Effect::Key { cache, .. } => {
            let options = &graph.cache(*cache).options;
            let mut label = options.action.as_str().to_owned();
            if let Some(ms) = options.redelete_after_ms {
                label.push_str(&format!(" (+{ms}ms)"));
            }
            if let (Some(after), jitter) = (options.expire_after_ms, options.expire_jitter_ms) {
                label.push_str(&format!(" ({after}+{jitter}ms)"));
            }
            label
        }
        Effect::Tag { .. } => "tag".to_owned(),
        Effect::NamespaceBump { .. } => "namespace".to_owned(),
    }
}

fn target(graph: &Graph, effect: &Effect) -> String {
    match effect {
        Effect::Key { key, .. } => key.clone(),
        Effect::Tag { tag, .. } => tag.clone(),
        Effect::NamespaceBump { cache } => format!("cache {}", graph.cache(*cache).name),
    }
}

fn image_text(image: Image) -> &'static str {
    match image {
        Image::Old => "old row",
        Image::New => "new row",
        Image::Both => "old and new row",
    }
}

fn cause_text(cause: &Cause) -> String {
    match cause {
        Cause::Row(image) => image_text(*image).to_owned(),
        Cause::LookupRow => "look-up row".to_owned(),
        Cause::Truncate => "truncate".to_owned(),
        Cause::Unknown { column, image } => {
            format!(
                "{} value of `{column}` unknown: the key cannot be rendered",
                image_text(*image).trim_end_matches(" row")
            )
        }
        Cause::FanoutExceeded { rows, limit } => {
            format!("look-up returned more than {limit} rows ({rows} read)")
        }
        Cause::EmbeddedBump => "embedded cache's namespace bumped".to_owned(),
        Cause::LookupFailed => "look-up failed: the change was dead-lettered".to_owned(),
        Cause::Operator => "operator".to_owned(),
        Cause::OperatorUnknownParam { param } => format!("operator: `{param}` unknown (normalised in the key)"),
    }
}

fn lookup_text(graph: &Graph, request: &crate::resolve::LookupRequest) -> (String, String) {
    let dep = graph.dependency(request.dependency);
    let query = match &dep.mapping {
        Mapping::Lookup(l) => l.query.clone(),
        _ => String::new(),
    };
    let arg_name = match (&dep.mapping, dep.trigger) {
        (Mapping::Lookup(l), Trigger::Embeds(e)) => match &l.arg {
            LookupArg::Param(i) => graph.cache(e).template.params()[*i].to_string(),
            LookupArg::Column(c) => c.to_string(),
        },
        (Mapping::Lookup(l), Trigger::Table(_)) => match &l.arg {
            LookupArg::Column(c) => c.to_string(),
            LookupArg::Param(i) => i.to_string(),
        },
        _ => String::new(),
    };
    (query, format!("{arg_name} = {}", request.arg))
}

fn skip_text(graph: &Graph, skip: &Skip) -> String {
    match skip {
        Skip::Filtered { dependency } => {
            let dep = graph.dependency(*dependency);
            let cols: Vec<&str> = dep.filter.iter().flatten().map(|c| &**c).collect();
            format!("{} ({}): the update changed none of {}", dep.field, graph.cache(dep.cache).name, cols.join(", "))
        }
        Skip::Null { dependency, name, image } => {
            let dep = graph.dependency(*dependency);
            format!(
                "{} ({}): `{name}` is NULL in the {}: no key",
                dep.field,
                graph.cache(dep.cache).name,
                image_text(*image)
            )
        }
    }
}

fn change_header(change: &Change) -> String {
    let mut out = format!("change: {} {}\n", change.op, change.table);
    if let Some(before) = &change.before {
        out.push_str(&format!("  before: {}\n", before.to_json()));
    }
    if let Some(after) = &change.after {
        out.push_str(&format!("  after:  {}\n", after.to_json()));
    }
    out
}

fn to_text(
    graph: &Graph,
    change: &Change,
    resolution: &Resolution,
    pending: &[crate::resolve::LookupRequest],
    ran: bool,
) -> String {
    let mut out = change_header(change);
    out.push_str(&format!("effects: {}\n", resolution.effects.len()));
    let labels: Vec<String> = resolution.effects.iter().map(|r| action_label(graph, &r.effect)).collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0);
    for (resolved, label) in resolution.effects.iter().zip(&labels) {
        let cache = &graph.cache(resolved.effect.cache()).name;
        out.push_str(&format!("  {label:<width$}  {}  [{cache}]\n", target(graph, &resolved.effect)));
        for reason in &resolved.reasons {
            out.push_str(&format!(
                "      via {} ({})\n",
                PathDisplay { graph, path: &reason.path },
                cause_text(&reason.cause)
            ));
        }
    }
    if !pending.is_empty() {
        let state = if ran { "run" } else { "not run: give --lookup-url or --config to run them" };
        out.push_str(&format!("look-ups: {} ({state})\n", pending.len()));
        for request in pending {
            let (query, arg) = lookup_text(graph, request);
            out.push_str(&format!("  {arg}: {query}\n"));
            out.push_str(&format!("      via {}\n", PathDisplay { graph, path: &request.path }));
        }
    }
    if !resolution.skipped.is_empty() {
        out.push_str(&format!("skipped: {}\n", resolution.skipped.len()));
        for skip in &resolution.skipped {
            out.push_str(&format!("  {}\n", skip_text(graph, skip)));
        }
    }
    out
}

fn to_json(
    graph: &Graph,
    change: &Change,
    resolution: &Resolution,
    pending: &[crate::resolve::LookupRequest],
    ran: bool,
) -> Json {
    let effects: Vec<Json> = resolution
        .effects
        .iter()
        .map(|r| {
            let (kind, target_field) = match &r.effect {
                Effect::Key { key, .. } => ("key", json!(key)),
                Effect::Tag { tag, .. } => ("tag", json!(tag)),
                Effect::NamespaceBump { .. } => ("namespace", Json::Null),
            };
            let action = match &r.effect {
                Effect::Key { cache, .. } => graph.cache(*cache).options.action.as_str(),
                Effect::Tag { .. } => "tag",
                Effect::NamespaceBump { .. } => "namespace_bump",
            };
            json!({
                "kind": kind,
                "action": action,
                "cache": &*graph.cache(r.effect.cache()).name,
                "target": target_field,
                "reasons": r.reasons.iter().map(|reason| json!({
                    "path": PathDisplay { graph, path: &reason.path }.to_string(),
                    "dependencies": reason.path.iter().map(|d| graph.dependency(*d).field.clone()).collect::<Vec<_>>(),
                    "cause": cause_text(&reason.cause),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let lookups: Vec<Json> = pending
        .iter()
        .map(|request| {
            let (query, arg) = lookup_text(graph, request);
            json!({
                "dependency": graph.dependency(request.dependency).field,
                "query": query,
                "arg": arg,
                "value": request.arg.to_json(),
                "path": PathDisplay { graph, path: &request.path }.to_string(),
            })
        })
        .collect();
    json!({
        "change": {
            "table": &*change.table,
            "op": change.op.as_str(),
            "before": change.before.as_ref().map(Row::to_json),
            "after": change.after.as_ref().map(Row::to_json),
        },
        "effects": effects,
        "lookups": lookups,
        "lookups_run": ran,
        "skipped": resolution.skipped.iter().map(|s| skip_text(graph, s)).collect::<Vec<_>>(),
    })
}
