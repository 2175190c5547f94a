//! `evictd check --format json`: the same findings as the text report, as
//! one JSON object for CI and tooling:
//!
//! ```json
//! {"ok": false,
//!  "errors":   [{"file": "g.toml", "line": 16, "column": 15, "field": "caches.x.depends[0].bind.id", "message": "…"}],
//!  "warnings": [{"file": null, "line": null, "column": null, "field": null, "message": "…"}],
//!  "notes":    [...],
//!  "summary":  {"files": [...], "tables": 3, "caches": 5, "dependencies": 9, "config": "evictd.toml", "report": [...]}}
//! ```
//!
//! **Invariant:** the checks are exactly the text report's (the same
//! loaders, cross-check, librdkafka and live checks), and so are the exit
//! codes: 0 ok, 2 any error, 1 a live service that cannot be reached (the
//! object is printed then too, with that error in `errors`).

use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};

use super::{CheckArgs, CliError, cross_check, live, live_redis, write_stdout};
use crate::config::{self, Config, SourceConfig};
use crate::graph::{self, Graph};

/// One finding: where (each part `null` when unknown) and what.
fn finding(
    file: Option<String>,
    line: Option<usize>,
    column: Option<usize>,
    field: Option<&str>,
    message: &str,
) -> Json {
    json!({"file": file, "line": line, "column": column, "field": field, "message": message})
}

/// A message about a file as a whole.
fn about(file: Option<&Path>, message: &str) -> Json {
    finding(file.map(|f| f.display().to_string()), None, None, None, message)
}

/// A config issue's place is `file:line:col`, an `EVICTD__…` variable,
/// or the file alone.
fn config_issue(place: &str, field: &str, message: &str) -> Json {
    let field = (!field.is_empty()).then_some(field);
    let mut parts = place.rsplitn(3, ':');
    let (column, line, file) = (parts.next(), parts.next(), parts.next());
    match (file, line.and_then(|l| l.parse().ok()), column.and_then(|c| c.parse().ok())) {
        (Some(file), Some(line), Some(column)) => {
            finding(Some(file.to_owned()), Some(line), Some(column), field, message)
        }
        _ => finding(Some(place.to_owned()), None, None, field, message),
    }
}

#[derive(Default)]
struct Findings {
    errors: Vec<Json>,
    warnings: Vec<Json>,
    notes: Vec<Json>,
    /// The text report's other lines (what was checked).
    report: Vec<String>,
}

impl Findings {
    /// Live-check lines: `warning:` and `note:` lines are findings, the
    /// others what was checked.
    fn lines(&mut self, file: &Path, lines: Vec<String>) {
        for line in lines {
            let text = line.trim();
            if let Some(w) = text.strip_prefix("warning: ") {
                self.warnings.push(about(Some(file), w));
            } else if let Some(n) = text.strip_prefix("note: ") {
                self.notes.push(about(Some(file), n));
            } else {
                self.report.push(text.to_owned());
            }
        }
    }
}

pub(super) fn check(args: &CheckArgs) -> Result<(), CliError> {
    let mut found = Findings::default();
    let (outcome, graph, config) = collect(args, &mut found);
    let mut summary = json!({});
    if let Some(graph) = &graph {
        let files: Vec<String> = graph.files().iter().map(|f| f.file.display().to_string()).collect();
        summary = json!({
            "files": files,
            "tables": graph.tables().len(),
            "caches": graph.caches().len(),
            "dependencies": graph.dependencies().len(),
        });
    }
    summary["config"] = json!(config.as_ref().map(|c| c.file.display().to_string()));
    summary["report"] = json!(found.report);
    let object = json!({
        "ok": found.errors.is_empty(),
        "errors": found.errors,
        "warnings": found.warnings,
        "notes": found.notes,
        "summary": summary,
    });
    let mut text = serde_json::to_string_pretty(&object).map_err(|e| CliError::Runtime(e.to_string()))?;
    text.push('\n');
    write_stdout(&text)?;
    match outcome {
        Err(e) => Err(e),
        Ok(()) if object["ok"] == json!(true) => Ok(()),
        Ok(()) => Err(CliError::Input(format!(
            "{} error(s) (see the JSON on stdout)",
            object["errors"].as_array().map_or(0, Vec::len)
        ))),
    }
}

/// Runs every check `check` runs, into `found`. An `Err` is a live service
/// that could not be reached (exit 1).
fn collect(args: &CheckArgs, found: &mut Findings) -> (Result<(), CliError>, Option<Graph>, Option<Config>) {
    let config_path = args.source.config.as_ref();
    let config = match config_path {
        Some(path) => match config::load(path) {
            Ok(c) => Some(c),
            Err(e) => {
                found.errors.extend(e.0.iter().map(|i| config_issue(&i.place, &i.field, &i.message)));
                return (Ok(()), None, None);
            }
        },
        None => None,
    };
    let graph_paths: Vec<PathBuf> = if !args.paths.is_empty() {
        args.paths.clone()
    } else if let Some(c) = &config {
        c.graph_paths.clone()
    } else {
        vec![PathBuf::from("dependency-graphs")]
    };
    let graph = match graph::load_paths(&graph_paths) {
        Ok(g) => g,
        Err(e) => {
            for error in &e.0 {
                let (file, line, column) = match &error.location {
                    Some(l) => (Some(l.file.display().to_string()), Some(l.line), Some(l.column)),
                    None => (None, None, None),
                };
                found.errors.push(finding(file, line, column, error.field.as_deref(), &error.message));
            }
            return (Ok(()), None, config);
        }
    };
    let Some(config) = config else { return (Ok(()), Some(graph), None) };
    let file = config.file.clone();
    if let Err(e) = cross_check(&config, &graph) {
        found.errors.push(about(Some(&file), &e.to_string()));
        return (Ok(()), Some(graph), Some(config));
    }
    if let Some(SourceConfig::Kafka(kafka)) = &config.source
        && let Err(e) = crate::daemon::check_kafka_client(&config.file, kafka)
    {
        found.errors.push(about(Some(&file), &e.to_string()));
        return (Ok(()), Some(graph), Some(config));
    }
    if args.offline {
        return (Ok(()), Some(graph), Some(config));
    }
    let mut live_findings = Vec::new();
    if let Some(SourceConfig::Postgres(pg)) = &config.source {
        live_findings.push(live::check(&config, pg, &graph));
    }
    live_findings.push(live_redis::check(&config, &graph));
    for result in live_findings {
        match result {
            Ok(f) => {
                found.lines(&file, f.lines);
                found.errors.extend(f.errors.iter().map(|e| about(Some(&file), e)));
            }
            Err(e) => {
                found.errors.push(about(Some(&file), &e.to_string()));
                if matches!(e, CliError::Runtime(_)) {
                    return (Err(e), Some(graph), Some(config));
                }
            }
        }
    }
    (Ok(()), Some(graph), Some(config))
}
