//! `evictd invalidate`: the scoped emergency flush. One target — a key, a
//! cache's key from its parameters, a tag, or a whole cache — resolved
//! through the daemon's own resolver (so `embeds` are followed exactly as
//! for a row change, look-ups included) and applied as one batch through
//! the daemon's own Redis sink on every target: fill-guard stamps, version
//! and namespace bumps, tag registries, and the broadcast, so every
//! process's local cache drops the same keys.
//!
//! **Invariants:**
//! - `--dry-run` changes nothing: it resolves (running look-ups, which
//!   only read) and reads tag registries, and prints the blast radius;
//! - nothing is applied without `--yes` when the blast radius is a whole
//!   cache (`--all`, or a namespace bump reached through `embeds`) or a tag
//!   with more than `--limit` keys: the command then exits 2 with the dry
//!   run's output;
//! - every applied action is audited, whatever its outcome: a log line
//!   (the daemon's JSON format when `log.format = "json"`) and an entry of
//!   the capped stream `evictd:audit` on each target (`docs/redis-layout.md`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{ArgGroup, Args};
use serde_json::{Value as Json, json};

use super::{CliError, OutputFormat, audit, prepare, write_stdout};
use crate::change::Value;
use crate::config::Config;
use crate::daemon::wiring;
use crate::diagnostic::SourceFile;
use crate::graph::{CacheId, Graph, Mapping};
use crate::key::read_back::ReadBack;
use crate::lookup::run_lookups;
use crate::resolve::{Cause, Effect, PathDisplay, Resolution, Resolver};
use crate::sink::multi::MultiSink;
use crate::sink::redis::RedisSink;
use crate::sink::{Sink, SinkBatch};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["key", "cache", "tag"])))]
pub struct InvalidateArgs {
    /// The config file: the graph and the Redis targets.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// One Redis key, as rendered.
    #[arg(long, value_name = "KEY")]
    pub(crate) key: Option<String>,
    /// A cache of the graph: with --param (one key) or --all (every key).
    #[arg(long, value_name = "NAME")]
    pub(crate) cache: Option<String>,
    /// A parameter of the cache's key template (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE", requires = "cache", conflicts_with = "all")]
    pub(crate) params: Vec<String>,
    /// Every key of the cache: its namespace bump (needs --yes).
    #[arg(long, requires = "cache")]
    pub(crate) all: bool,
    /// Every key registered under a tag.
    #[arg(long, value_name = "TAG")]
    pub(crate) tag: Option<String>,
    /// Print the blast radius; change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Apply a whole-cache invalidation or a tag of more than --limit keys.
    #[arg(long)]
    pub(crate) yes: bool,
    /// Keys of a tag listed, and the most applied without --yes.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub(crate) limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: OutputFormat,
}

/// The version of an operator's batch (see its use).
const OPERATOR_VERSION: u64 = 1;

/// What the operator asked for.
#[derive(Debug, Clone)]
enum Target {
    Key(String),
    /// A key rendered from the operator's parameters, kept with them.
    CacheKey {
        cache: String,
        key: String,
        params: Vec<Option<Value>>,
    },
    Tag(String),
    Cache(String),
}

impl Target {
    fn kind(&self) -> &'static str {
        match self {
            Target::Key(_) => "key",
            Target::CacheKey { .. } => "cache_key",
            Target::Tag(_) => "tag",
            Target::Cache(_) => "cache",
        }
    }

    fn value(&self) -> &str {
        match self {
            Target::Key(key) | Target::CacheKey { key, .. } => key,
            Target::Tag(tag) => tag,
            Target::Cache(cache) => cache,
        }
    }
}

/// The blast radius, and what became of it.
struct Report {
    target: Target,
    /// One line per effect: action, cache, key (or tag, or `*`), why.
    effects: Vec<(String, String, String, String)>,
    /// Caches other than the target's that the effects reach (`embeds`).
    embedders: BTreeSet<String>,
    /// Per Redis target and tag: live registrations now.
    tags: Vec<(String, String, crate::sink::redis::TagRegistrations)>,
    warnings: Vec<String>,
    /// Why `--yes` is needed, when it is.
    needs_yes: Vec<String>,
    dry_run: bool,
    applied: bool,
    error: Option<String>,
}

pub(crate) fn run(args: &InvalidateArgs) -> Result<(), CliError> {
    let prepared = prepare(Some(&args.config), &[])?;
    let config = prepared.config.ok_or_else(|| CliError::Input("--config is required".into()))?;
    let graph = prepared.graph;
    let target = target(args, &graph)?;
    let (graph, resolution, warnings) = resolve(&target, graph)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(invalidate(args, &config, target, graph, resolution, warnings))
}

/// The target from the arguments, checked against the graph (exit 2).
fn target(args: &InvalidateArgs, graph: &Graph) -> Result<Target, CliError> {
    if let Some(key) = &args.key {
        if key.is_empty() {
            return Err(CliError::Input("--key: an empty key".into()));
        }
        return Ok(Target::Key(key.clone()));
    }
    if let Some(tag) = &args.tag {
        if tag.is_empty() {
            return Err(CliError::Input("--tag: an empty tag".into()));
        }
        return Ok(Target::Tag(tag.clone()));
    }
    let Some(name) = &args.cache else {
        return Err(CliError::Input("give --key, --tag, or --cache with --param or --all".into()));
    };
    let cache_id = cache_id(graph, name)?;
    if args.all {
        return Ok(Target::Cache(name.clone()));
    }
    let cache = graph.cache(cache_id);
    let names = cache.template.params();
    let mut values: Vec<Option<Value>> = vec![None; names.len()];
    for param in &args.params {
        let Some((k, v)) = param.split_once('=') else {
            return Err(CliError::Input(format!("--param {param}: expected NAME=VALUE")));
        };
        let Some(i) = cache.template.param_index(k.trim()) else {
            return Err(CliError::Input(format!(
                "--param {param}: cache `{name}` (`{}`) has no placeholder `{}` (placeholders: {})",
                cache.template,
                k.trim(),
                list(names)
            )));
        };
        values[i] = Some(typed(v));
    }
    let refs: Vec<Option<&Value>> = values.iter().map(Option::as_ref).collect();
    match cache.template.render(&refs) {
        Ok(key) => Ok(Target::CacheKey { cache: name.clone(), key, params: values }),
        Err(e) => Err(CliError::Input(format!(
            "--cache {name}: {e}: give --param for each placeholder of `{}` (or --all for the whole cache)",
            cache.template
        ))),
    }
}

/// A parameter given on the command line: an integer when it reads as one
/// (it renders the same, and binds to a look-up as a row's integer does).
fn typed(text: &str) -> Value {
    match text.parse::<i64>() {
        Ok(i) if i.to_string() == text => Value::Int(i),
        _ => Value::Text(text.to_owned()),
    }
}

fn list(names: &[Arc<str>]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    }
}

fn cache_id(graph: &Graph, name: &str) -> Result<CacheId, CliError> {
    graph.cache_id(name).ok_or_else(|| {
        let mut names: Vec<&str> = graph.caches().iter().map(|c| &*c.name).collect();
        names.sort_unstable();
        CliError::Input(format!("--cache {name}: no such cache in the graph (caches: {})", names.join(", ")))
    })
}

/// A graph of one cache, `unmatched_key` (action `delete`), for a key no
/// cache of the graph renders: the sink needs a cache for each key.
fn unmatched_graph() -> Result<Graph, CliError> {
    const TEXT: &str = "[tables.\"evictd.operator\"]\nkey = [\"key\"]\ncolumns = [\"key\"]\n\n\
                        [caches.unmatched_key]\nkey = \"{key}\"\n\n\
                        [[caches.unmatched_key.depends]]\ntable = \"evictd.operator\"\n";
    crate::graph::load::load_sources(&[SourceFile::new("<evictd invalidate>", TEXT.to_owned())])
        .map_err(|e| CliError::Runtime(format!("the unmatched-key graph: {e}")))
}

/// The effects of the target, before look-ups, and the graph they refer to.
fn resolve(target: &Target, graph: Graph) -> Result<(Graph, Resolution, Vec<String>), CliError> {
    let resolver = Resolver::new(&graph);
    let mut warnings = Vec::new();
    let resolution = match target {
        Target::Cache(name) => resolver.operator_cache(cache_id(&graph, name)?),
        Target::CacheKey { cache, key, params } => {
            let id = cache_id(&graph, cache)?;
            let params: Vec<Option<Option<Value>>> = params.iter().map(|p| Some(p.clone())).collect();
            resolver.operator_key(id, key.clone(), &params)
        }
        Target::Key(key) => {
            let mut out = Resolution::default();
            let mut matched = Vec::new();
            for (i, cache) in graph.caches().iter().enumerate() {
                if let Some(params) = cache.template.read_back(key) {
                    matched.push(cache.name.to_string());
                    out.merge(resolver.operator_key(CacheId(i), key.clone(), &known(params)));
                }
            }
            match matched.len() {
                0 => {
                    warnings.push(format!(
                        "key `{key}` is rendered by no cache of the graph: invalidated as a `delete` cache's key (UNLINK), nothing embeds it"
                    ));
                    drop(out);
                    let unmatched = unmatched_graph()?;
                    let id = unmatched
                        .cache_id("unmatched_key")
                        .ok_or_else(|| CliError::Runtime("no unmatched_key".into()))?;
                    let out = Resolver::new(&unmatched).operator_key(id, key.clone(), &[]);
                    return Ok((unmatched, out, warnings));
                }
                1 => {}
                _ => warnings.push(format!(
                    "key `{key}` is rendered by {} caches ({}): invalidated with each one's action",
                    matched.len(),
                    matched.join(", ")
                )),
            }
            out
        }
        Target::Tag(tag) => {
            let mut out = Resolution::default();
            let mut templates = BTreeSet::new();
            for dep in graph.dependencies() {
                let Mapping::Tags(tags) = &dep.mapping else { continue };
                for template in tags {
                    templates.insert(format!("`{}`", template.template));
                    if template.template.read_back(tag).is_some() {
                        out.merge(resolver.operator_tag(dep.cache, tag.clone()));
                    }
                }
            }
            if out.effects.is_empty() {
                let known = if templates.is_empty() {
                    "none".to_owned()
                } else {
                    templates.into_iter().collect::<Vec<_>>().join(", ")
                };
                return Err(CliError::Input(format!(
                    "--tag {tag}: no tag template of the graph renders this tag (tag templates: {known})"
                )));
            }
            out
        }
    };
    Ok((graph, resolution, warnings))
}

/// Read-back parameters as the resolver takes them: `None` unknown.
fn known(params: Vec<ReadBack>) -> Vec<Option<Option<Value>>> {
    params
        .into_iter()
        .map(|p| match p {
            ReadBack::Value(v) => Some(Some(v)),
            ReadBack::Absent => Some(None),
            ReadBack::Normalised => None,
        })
        .collect()
}

async fn invalidate(
    args: &InvalidateArgs,
    config: &Config,
    target: Target,
    graph: Graph,
    resolution: Resolution,
    warnings: Vec<String>,
) -> Result<(), CliError> {
    // Look-ups along `embeds` decide keys: they run even in a dry run (they only read).
    let resolution = if resolution.lookups.is_empty() {
        resolution
    } else {
        let resolver = Resolver::new(&graph);
        match wiring::lookup_executor(config)? {
            Some(executor) => run_lookups(&resolver, resolution, executor.as_ref())
                .await
                .map_err(|e| CliError::Runtime(format!("look-up: {e}")))?,
            None => {
                let mut out = resolution;
                for request in std::mem::take(&mut out.lookups) {
                    out.merge(resolver.lookup_failed(&request));
                }
                out
            }
        }
    };
    let mut report = Report {
        target,
        effects: Vec::new(),
        embedders: BTreeSet::new(),
        tags: Vec::new(),
        warnings,
        needs_yes: Vec::new(),
        dry_run: args.dry_run,
        applied: false,
        error: None,
    };
    let mut effects: Vec<Effect> = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    for resolved in &resolution.effects {
        let cache = graph.cache(resolved.effect.cache());
        let (action, what) = match &resolved.effect {
            Effect::Key { key, .. } => (cache.options.action.as_str(), key.clone()),
            Effect::Tag { tag, .. } => {
                tags.push(tag.clone());
                ("tag", tag.clone())
            }
            Effect::NamespaceBump { .. } => ("namespace", "*".to_owned()),
        };
        let why: Vec<String> = resolved.reasons.iter().map(|r| reason_text(&graph, r)).collect();
        if resolved.reasons.iter().any(|r| !r.path.is_empty()) {
            report.embedders.insert(cache.name.to_string());
        }
        report.effects.push((action.to_owned(), cache.name.to_string(), what, why.join("; ")));
        effects.push(resolved.effect.clone());
    }
    // Caches that embed a tag's cache: the daemon does not follow a tag's
    // keys along `embeds` (they are only known in Redis), so neither does this.
    if let Target::Tag(_) = &report.target {
        let tagged: Vec<CacheId> = effects.iter().map(Effect::cache).collect();
        for id in graph.with_embedders(tagged.iter().copied()) {
            if !tagged.contains(&id) {
                report.warnings.push(format!(
                    "cache `{}` embeds a cache this tag belongs to: a tag's keys are not followed along `embeds` (as in the daemon)",
                    graph.cache(id).name
                ));
            }
        }
    }
    tags.sort_unstable();
    tags.dedup();
    if matches!(report.target, Target::Cache(_)) {
        report.needs_yes.push("--all invalidates every key of the cache".to_owned());
    } else if let Some(bumped) = effects.iter().find(|e| matches!(e, Effect::NamespaceBump { .. })) {
        report.needs_yes.push(format!(
            "the effects bump the namespace of cache `{}` (every key of it)",
            graph.cache(bumped.cache()).name
        ));
    }

    let sink = connect(config).await?;
    for target in sink.targets() {
        for tag in &tags {
            let found = target
                .tag_registrations(tag, args.limit)
                .await
                .map_err(|e| CliError::Runtime(format!("reading tag `{tag}`: {e}")))?;
            if found.count > args.limit as u64 {
                report.needs_yes.push(format!(
                    "tag `{tag}` has {} keys on redis.{} (more than --limit {})",
                    found.count,
                    target.name(),
                    args.limit
                ));
            }
            report.tags.push((target.name().to_owned(), tag.clone(), found));
        }
    }
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    if args.dry_run {
        return print(args, &report);
    }
    if !report.needs_yes.is_empty() && !args.yes {
        print(args, &report)?;
        return Err(CliError::Input(format!(
            "refused without --yes: {} (nothing was changed; check the effects above)",
            report.needs_yes.join("; ")
        )));
    }
    let batch = SinkBatch {
        // An operator's batch has no source position. Version 1, the lowest
        // that changes a missing key (the bump script writes the batch's
        // version there, and 0 reads as missing): every other bump raises the
        // stored version by one, never inflating it past what the daemon
        // writes next. Batch 0: none of the daemon's.
        id: 0,
        graph: &graph,
        effects: &effects,
        version: OPERATOR_VERSION,
        position: None,
        commit_time_micros: None,
    };
    let result = sink.apply(batch).await;
    report.applied = result.is_ok();
    report.error = result.as_ref().err().map(ToString::to_string);
    audit_action(config, &sink, &report).await;
    match result {
        Ok(()) => print(args, &report),
        Err(e) => {
            print(args, &report)?;
            Err(CliError::Runtime(format!("not applied (or only in part; running it again is safe): {e}")))
        }
    }
}

/// Every Redis target, connected: an unreachable one fails the command
/// (exit 1) after the sink's timeout, rather than being waited for.
async fn connect(config: &Config) -> Result<MultiSink<RedisSink>, CliError> {
    let mut targets = Vec::new();
    for target in &config.redis {
        let sink = RedisSink::connect(target)
            .await
            .map_err(|e| CliError::Runtime(format!("redis.{}: cannot connect: {e}", target.name)))?;
        targets.push(sink);
    }
    if targets.is_empty() {
        return Err(CliError::Input(format!("{}: no Redis target ([[redis]])", config.file.display())));
    }
    Ok(MultiSink::new(targets))
}

fn reason_text(graph: &Graph, reason: &crate::resolve::Reason) -> String {
    let cause = match &reason.cause {
        Cause::Operator => "operator".to_owned(),
        Cause::OperatorUnknownParam { param } => format!("`{param}` is normalised in the key: its keys are unknown"),
        Cause::EmbeddedBump => "embedded cache's namespace bumped".to_owned(),
        Cause::LookupRow => "look-up row".to_owned(),
        Cause::FanoutExceeded { rows, limit } => format!("look-up fan-out {rows} > {limit}"),
        Cause::LookupFailed => "look-up not run".to_owned(),
        other => format!("{other:?}"),
    };
    if reason.path.is_empty() { cause } else { format!("{} ({cause})", PathDisplay { graph, path: &reason.path }) }
}

fn to_json(report: &Report) -> Json {
    json!({
        "target": {"kind": report.target.kind(), "value": report.target.value()},
        "dry_run": report.dry_run,
        "applied": report.applied,
        "effects": report.effects.iter().map(|(action, cache, what, why)| json!({
            "action": action, "cache": cache, "key": what, "reason": why,
        })).collect::<Vec<_>>(),
        "embedders": report.embedders,
        "tags": report.tags.iter().map(|(target, tag, found)| json!({
            "redis": target, "tag": tag, "count": found.count, "keys": found.first,
        })).collect::<Vec<_>>(),
        "needs_yes": report.needs_yes,
        "warnings": report.warnings,
        "error": report.error,
    })
}

fn print(args: &InvalidateArgs, report: &Report) -> Result<(), CliError> {
    if args.format == OutputFormat::Json {
        let mut text = serde_json::to_string_pretty(&to_json(report)).map_err(|e| CliError::Runtime(e.to_string()))?;
        text.push('\n');
        return write_stdout(&text);
    }
    let mut out = String::new();
    let state = if report.dry_run {
        "dry run: nothing changed"
    } else if report.applied {
        "applied"
    } else if report.error.is_none() {
        "refused: nothing changed"
    } else {
        "not applied"
    };
    out.push_str(&format!("invalidate {} {} ({state})\n", report.target.kind(), report.target.value()));
    out.push_str(&format!("effects ({}):\n", report.effects.len()));
    for (action, cache, what, why) in &report.effects {
        out.push_str(&format!("  {action}\t{cache}\t{what}\t{why}\n"));
    }
    if !report.embedders.is_empty() {
        let names: Vec<&str> = report.embedders.iter().map(String::as_str).collect();
        out.push_str(&format!("caches reached through embeds: {}\n", names.join(", ")));
    }
    for (target, tag, found) in &report.tags {
        out.push_str(&format!("tag {tag} on redis.{target}: {} key(s) registered now\n", found.count));
        for key in &found.first {
            out.push_str(&format!("  {key}\n"));
        }
        if found.count > found.first.len() as u64 {
            out.push_str(&format!("  … and {} more\n", found.count - found.first.len() as u64));
        }
    }
    for reason in &report.needs_yes {
        out.push_str(&format!("needs --yes: {reason}\n"));
    }
    write_stdout(&out)
}

/// The audit of an applied action: one log line, always written (at
/// `info`, whatever `EVICTD_LOG` says), in the daemon's format, and one
/// entry of `evictd:audit` on each target. The entry is best-effort: a
/// target that cannot take it is reported on stderr, and the action's own
/// outcome stands.
async fn audit_action(config: &Config, sink: &MultiSink<RedisSink>, report: &Report) {
    let (user, uid, host) = audit::who();
    let outcome = if report.applied { "applied" } else { "failed" };
    let radius = to_json(report).to_string();
    let keys = report.effects.iter().filter(|e| e.0 != "tag" && e.0 != "namespace").count();
    let tag_keys: u64 = report.tags.iter().map(|t| t.2.count).sum();
    audit::line(config.log.format, || {
        tracing::info!(
            target: "evictd::audit",
            action = "invalidate",
            kind = report.target.kind(),
            value = report.target.value(),
            user = %user,
            uid = %uid,
            host = %host,
            effects = report.effects.len(),
            keys,
            tag_keys,
            outcome,
            error = report.error.as_deref().unwrap_or(""),
            blast_radius = %radius,
            "operator action"
        );
    });
    let fields = [
        ("action", "invalidate".to_owned()),
        ("kind", report.target.kind().to_owned()),
        ("value", report.target.value().to_owned()),
        ("user", user),
        ("uid", uid),
        ("host", host),
        ("effects", report.effects.len().to_string()),
        ("outcome", outcome.to_owned()),
        ("blast_radius", radius),
    ];
    for target in sink.targets() {
        if let Err(e) = target.audit(&fields).await {
            eprintln!("warning: redis.{}: could not write the audit entry: {e}", target.name());
        }
    }
}
