//! `evictd check --format json`: the same findings as the text report, as
//! one object (`ok`, `errors`, `warnings`, `notes`, `summary`), with the
//! same exit codes.

use std::path::PathBuf;

use super::support::{assert_golden, evictd, root, stderr, stdout};

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

/// A finding as the text report prints it: `file:line:col: field: message`.
fn as_text(f: &serde_json::Value) -> String {
    let mut text = String::from("error: ");
    if let (Some(file), Some(line), Some(column)) = (f["file"].as_str(), f["line"].as_u64(), f["column"].as_u64()) {
        text.push_str(&format!("{file}:{line}:{column}: "));
    } else if let Some(file) = f["file"].as_str() {
        text.push_str(&format!("{file}: "));
    }
    if let Some(field) = f["field"].as_str() {
        text.push_str(&format!("{field}: "));
    }
    text.push_str(f["message"].as_str().unwrap());
    text.push('\n');
    text
}

/// Every malformed graph's JSON holds exactly the findings of its text
/// report (`.expected`), each with its file, line, column and field.
#[test]
fn every_bad_graph_gives_its_text_findings_as_json() {
    let dir = root().join("tests/fixtures/bad-graphs");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 40, "only {} malformed-graph cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let relative = case.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
        let out = evictd(&["check", "--format", "json", &relative]);
        if out.status.code() != Some(2) {
            failures.push(format!("{relative}: exit {:?}, expected 2", out.status.code()));
            continue;
        }
        let found = json(&out);
        assert_eq!(found["ok"], false, "{relative}");
        let text: String = found["errors"].as_array().unwrap().iter().map(as_text).collect();
        let expected = std::fs::read_to_string(case.with_extension("expected")).unwrap();
        if text != expected {
            failures.push(format!("{relative}:\n  expected: {expected}  json:     {text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_bad_graph_names_file_line_and_field() {
    let out = evictd(&["check", "--format", "json", "tests/fixtures/bad-graphs/bind-unknown-column.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let found = json(&out);
    let error = &found["errors"][0];
    assert_eq!(error["file"], "tests/fixtures/bad-graphs/bind-unknown-column.toml");
    assert_eq!(error["line"], 16);
    assert_eq!(error["field"], "caches.product_detail.depends[0].bind.id");
    assert_golden(&root().join("tests/golden/check/bind-unknown-column.json"), &stdout(&out));
}

#[test]
fn a_good_graph_is_ok_and_text_stays_the_default() {
    let out = evictd(&["check", "--format", "json", "dependency-graphs/"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let found = json(&out);
    assert_eq!(found["ok"], true);
    assert_eq!(found["errors"].as_array().unwrap().len(), 0);
    assert_eq!(found["summary"]["files"].as_array().unwrap().len(), 2);
    assert_golden(&root().join("tests/golden/check/dependency-graphs.json"), &stdout(&out));
    let out = evictd(&["check", "dependency-graphs/"]);
    assert!(stdout(&out).starts_with("ok: 2 file(s), "), "{}", stdout(&out));
}

#[test]
fn a_bad_config_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        "[graph]\npaths = [\"../dependency-graphs\"]\n[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://x@127.0.0.1:1/db\"\nslot = \"Bad-Slot\"\npublication = \"p\"\n[redis.primary]\nurl = \"redis://127.0.0.1:1\"\n",
    )
    .unwrap();
    let path = config.display().to_string();
    let out = evictd(&["check", "--offline", "--format", "json", "--config", &path]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let found = json(&out);
    let error = &found["errors"][0];
    assert_eq!(error["file"], path.as_str(), "{found}");
    assert_eq!(error["line"], 7, "{found}");
    assert_eq!(error["field"], "source.postgres.slot", "{found}");
}
