//! The `evictd` binary as an operator runs it: exit codes, messages, and
//! golden outputs of `explain` and `graph` on the example graphs.

use std::path::PathBuf;

use super::support::{assert_golden, evictd, evictd_with_stdin, root, stderr, stdout};

#[test]
fn check_accepts_the_example_graphs() {
    let out = evictd(&["check", "dependency-graphs/"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ok: 2 file(s), "), "{}", stdout(&out));
}

#[test]
fn check_defaults_to_the_dependency_graphs_directory() {
    let out = evictd(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn version_prints_the_crate_version() {
    let out = evictd(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), format!("evictd {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_arguments_exit_2() {
    let out = evictd(&["graph", "--format", "svg"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("invalid value 'svg'"), "{}", stderr(&out));
}

#[test]
fn a_missing_graph_path_exits_2_naming_it() {
    let out = evictd(&["check", "no/such/dir"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: cannot read no/such/dir: "), "{}", stderr(&out));
}

/// Every malformed graph in tests/fixtures/bad-graphs (a file, or a
/// directory for cross-file cases) gives exit 2 and exactly the message in
/// its `.expected` file.
#[test]
fn bad_graphs_give_their_exact_message() {
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
        let out = evictd(&["check", &relative]);
        let expected_path = case.with_extension("expected");
        if out.status.code() != Some(2) {
            failures.push(format!("{relative}: exit {:?}, expected 2", out.status.code()));
            continue;
        }
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&expected_path, stderr(&out)).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != stderr(&out) {
            failures.push(format!("{relative}:\n  expected: {expected}  actual:   {}", stderr(&out)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn graph_prints_dot_and_json() {
    let out = evictd(&["graph", "--format", "dot", "dependency-graphs/ecommerce.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_golden(&root().join("tests/golden/graph/ecommerce.dot"), &stdout(&out));
    let out = evictd(&["graph", "--format", "json", "dependency-graphs/social.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["tables"].as_array().unwrap().len(), 4);
    assert_golden(&root().join("tests/golden/graph/social.json"), &stdout(&out));
}

fn product(name: &str, category: i64) -> String {
    serde_json::json!({
        "id": 1, "slug": "trail-runner-2", "brand_id": 10, "category_id": category, "name": name,
        "description": "Grippy.", "status": "active", "updated_at": "2026-11-20 10:00:00+00",
    })
    .to_string()
}

/// (golden name, arguments after `explain`)
fn explain_cases() -> Vec<(&'static str, Vec<String>)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("ecommerce-product-moves-category", {
            let mut a =
                s(&["--graph", "dependency-graphs/ecommerce.toml", "--table", "shop.products", "--op", "update"]);
            a.extend(["--before".into(), product("Trail Runner 2", 3), "--after".into(), product("Trail Runner 2", 4)]);
            a
        }),
        ("ecommerce-product-insert", {
            let mut a =
                s(&["--graph", "dependency-graphs/ecommerce.toml", "--table", "shop.products", "--op", "insert"]);
            a.extend(["--after".into(), product("Trail Runner 3", 3)]);
            a
        }),
        ("ecommerce-product-irrelevant-update", {
            let mut a =
                s(&["--graph", "dependency-graphs/ecommerce.toml", "--table", "shop.products", "--op", "update"]);
            let after = product("Trail Runner 2", 3).replace("2026-11-20 10:00:00+00", "2026-11-23 08:00:00+00");
            a.extend(["--before".into(), product("Trail Runner 2", 3), "--after".into(), after]);
            a
        }),
        (
            "ecommerce-inventory-update",
            s(&[
                "--graph",
                "dependency-graphs/ecommerce.toml",
                "--table",
                "shop.inventory",
                "--op",
                "update",
                "--before",
                r#"{"sku_id":100,"warehouse_id":1,"on_hand":5,"reserved":0}"#,
                "--after",
                r#"{"sku_id":100,"warehouse_id":1,"on_hand":4,"reserved":1}"#,
            ]),
        ),
        (
            "ecommerce-price-bump",
            s(&[
                "--graph",
                "dependency-graphs/ecommerce.toml",
                "--table",
                "shop.prices",
                "--op",
                "update",
                "--before",
                r#"{"sku_id":100,"currency":"EUR","amount_cents":8999,"valid_from":"2026-11-01"}"#,
                "--after",
                r#"{"sku_id":100,"currency":"EUR","amount_cents":7999,"valid_from":"2026-11-23"}"#,
            ]),
        ),
        (
            "ecommerce-products-truncate",
            s(&["--graph", "dependency-graphs/ecommerce.toml", "--table", "shop.products", "--op", "truncate"]),
        ),
        (
            "social-user-renamed",
            s(&[
                "--graph",
                "dependency-graphs/social.toml",
                "--table",
                "content.users",
                "--op",
                "update",
                "--before",
                r#"{"id":1,"handle":"ann","display_name":"Ann Example","avatar_url":null,"bio":"","email":"ann@example.com"}"#,
                "--after",
                r#"{"id":1,"handle":"ann","display_name":"Ann E.","avatar_url":null,"bio":"","email":"ann@example.com"}"#,
            ]),
        ),
        (
            "social-user-update-without-old-row",
            s(&[
                "--graph",
                "dependency-graphs/social.toml",
                "--table",
                "content.users",
                "--op",
                "update",
                "--after",
                r#"{"id":1,"handle":"Ann","display_name":"Ann","avatar_url":null,"bio":"","email":"ann@example.com"}"#,
            ]),
        ),
        (
            "social-article-changes-author",
            s(&[
                "--graph",
                "dependency-graphs/social.toml",
                "--table",
                "content.articles",
                "--op",
                "update",
                "--before",
                r#"{"id":10,"author_id":1,"title":"Choosing trail shoes","slug":"choosing-trail-shoes","body":"b","status":"published","published_at":"2026-11-01 09:00:00+00"}"#,
                "--after",
                r#"{"id":10,"author_id":3,"title":"Choosing trail shoes","slug":"choosing-trail-shoes","body":"b","status":"published","published_at":"2026-11-01 09:00:00+00"}"#,
            ]),
        ),
        (
            "social-follow-insert",
            s(&[
                "--graph",
                "dependency-graphs/social.toml",
                "--table",
                "content.follows",
                "--op",
                "insert",
                "--after",
                r#"{"follower_id":2,"followee_id":3,"created_at":"2026-11-23 10:00:00+00"}"#,
            ]),
        ),
        (
            "social-comment-delete-json",
            s(&[
                "--graph",
                "dependency-graphs/social.toml",
                "--json",
                "--table",
                "content.comments",
                "--op",
                "delete",
                "--before",
                r#"{"id":100,"article_id":10,"author_id":2,"body":"Which shoe for mud?","created_at":"2026-11-02 10:00:00+00"}"#,
            ]),
        ),
        (
            "debezium-product-update",
            s(&[
                "--graph",
                "dependency-graphs/ecommerce.toml",
                "--debezium",
                "tests/fixtures/explain/products-update.debezium.json",
            ]),
        ),
    ]
}

#[test]
fn explain_output_matches_the_golden_files() {
    for (name, args) in explain_cases() {
        let mut argv = vec!["explain"];
        argv.extend(args.iter().map(String::as_str));
        let out = evictd(&argv);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        let ext = if args.iter().any(|a| a == "--json") { "json" } else { "txt" };
        assert_golden(&root().join(format!("tests/golden/explain/{name}.{ext}")), &stdout(&out));
    }
}

#[test]
fn explain_reads_a_debezium_event_from_stdin() {
    let event = std::fs::read_to_string(root().join("tests/fixtures/explain/products-update.debezium.json")).unwrap();
    let out = evictd_with_stdin(&["explain", "--graph", "dependency-graphs", "--debezium", "-"], Some(&event));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("product:{1}:detail"), "{}", stdout(&out));
}

#[test]
fn explain_reads_a_change_document_and_positional_graph_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("change.json");
    let change = serde_json::json!({
        "table": "content.comments", "op": "delete",
        "before": {"id": 100, "article_id": 10, "author_id": 2, "body": "x", "created_at": "2026-11-02"},
        "after": null,
    });
    std::fs::write(&path, change.to_string()).unwrap();
    let out = evictd(&["explain", "dependency-graphs/social.toml", "--json", "--change", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let targets: Vec<&str> = json["effects"].as_array().unwrap().iter().filter_map(|e| e["target"].as_str()).collect();
    assert_eq!(targets, ["article:{10}:comments"]);
    // A Debezium event given to --change is recognised as one.
    let event = root().join("tests/fixtures/explain/products-update.debezium.json");
    let out = evictd(&["explain", "dependency-graphs", "--change", event.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("product:{1}:detail"), "{}", stdout(&out));
}

#[test]
fn explain_rejects_bad_changes_with_exit_2() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--table", "shop.nope", "--op", "insert", "--after", "{}"],
            "error: table `shop.nope` is not in the graph (tables: ",
        ),
        (&["--table", "shop.products", "--op", "insert", "--after", "{not json"], "error: --after: not JSON: "),
        (
            &["--table", "shop.products", "--op", "insert", "--after", "[1]"],
            "error: --after: expected a JSON object of column values",
        ),
        (&["--table", "shop.products", "--op", "delete", "--after", "{}"], "error: --op delete needs --before"),
        (&["--debezium", "Cargo.toml"], "error: Cargo.toml: not JSON: "),
    ];
    for (args, message) in cases {
        let mut argv = vec!["explain", "--graph", "dependency-graphs"];
        argv.extend_from_slice(args);
        let out = evictd(&argv);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with(message), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_bad_config_exits_2_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(&path, "[graph]\npaths = [\"dependency-graphs\"]\n\n[batch]\nmax_effects = -1\n").unwrap();
    let out = evictd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with(&format!("error: {}:5:15: batch.max_effects: ", path.display())), "{err}");
}

#[test]
fn check_with_the_example_config_validates_config_and_graph() {
    // Offline: the example's database is not this test's to shape
    // (check_live.rs covers the live report).
    let out = evictd(&["check", "--offline", "--config", "evictd.example.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("config: evictd.example.toml"), "{text}");
}

/// `EVICTD_LOG` goes through the same filter as `log.level`: a directive
/// after a space is read as written (it panicked on a non-ASCII target and
/// refused `info, evictd=debug`), and a span field value is text, not a
/// regular expression (a long one ran for minutes until out of memory).
#[test]
fn evictd_log_is_read_as_log_level_is() {
    let long_field = format!("[s{{f={}}}]=info", "(a|b)*c{1,100}".repeat(25));
    for value in [" Գ=info", "warn, evictd=debug", long_field.as_str()] {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
            .args(["check", "dependency-graphs/"])
            .current_dir(root())
            .env("EVICTD_LOG", value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "EVICTD_LOG={value:?}: {}", stderr(&out));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "EVICTD_LOG={value:?} took {:?}",
            started.elapsed()
        );
    }
}
