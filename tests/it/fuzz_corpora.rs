//! Replays every input of every fuzz corpus (`fuzz/corpus/<target>/`) and
//! every saved crash (`fuzz/regressions/<target>/`) through the entry point
//! its fuzz target calls (`evictd::fuzzing`), as an ordinary test: each must
//! return without panicking (an error is fine). No service needed.
//!
//! `debezium_value`'s inputs are `arbitrary` bytes that only the fuzz crate
//! can turn back into a value and a schema: its seeds are replayed from
//! `fuzz/replay/debezium_value.jsonl`, the cases the fuzz target printed for
//! them (`EVICTD_FUZZ_CASES=1`, docs/fuzzing.md).

use std::path::Path;

/// What a fuzz target calls with its input.
type Entry = fn(&[u8]);

/// The targets whose inputs are bytes or text, with their entry points.
const TARGETS: &[(&str, Entry)] = &[
    ("pgoutput", |b| {
        evictd::fuzzing::pgoutput(b);
    }),
    ("debezium", evictd::fuzzing::debezium),
    ("kafka_message", |b| {
        evictd::fuzzing::kafka_messages(b);
    }),
    ("broadcast", evictd::fuzzing::broadcast),
    ("key_template", |b| text(b, evictd::fuzzing::key_template)),
    ("graph", |b| text(b, evictd::fuzzing::graph)),
    ("config", |b| text(b, evictd::fuzzing::config)),
];

/// The text targets skip what is not UTF-8, as their fuzz targets do.
fn text(bytes: &[u8], f: fn(&str)) {
    if let Ok(t) = std::str::from_utf8(bytes) {
        f(t);
    }
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_corpus_and_regression_input_is_handled_without_a_panic() {
    let root = super::support::root().join("fuzz");
    for (target, entry) in TARGETS {
        let corpus = files(&root.join("corpus").join(target));
        assert!(!corpus.is_empty(), "fuzz/corpus/{target} has no seed input");
        for file in corpus.iter().chain(&files(&root.join("regressions").join(target))) {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| entry(&data));
            assert!(outcome.is_ok(), "{target} panicked on {}", file.display());
        }
    }
}

/// The pgoutput seeds exercise the decoder past the relation look-up: the
/// relation cache is seeded as the target expects, and a seed that writes a
/// row of a seeded relation decodes to a change.
#[test]
fn pgoutput_seeds_decode_against_the_seeded_relations() {
    let corpus = super::support::root().join("fuzz/corpus/pgoutput");
    for (seed, changes) in
        [("insert-product", 1), ("delete-order-full", 1), ("truncate-two", 2), ("relation-then-insert", 1)]
    {
        let data = std::fs::read(corpus.join(seed)).unwrap();
        assert_eq!(evictd::fuzzing::pgoutput(&data), changes, "{seed}");
    }
}

/// `debezium_value`'s seeds, as the cases its fuzz target decoded them to
/// (a schema, a value, unscaled bytes in hex and a scale): one per seed
/// file, each decoded with and without its schema, as the target does.
#[test]
fn every_debezium_value_seed_case_is_decoded_without_a_panic() {
    let root = super::support::root().join("fuzz");
    let seeds =
        files(&root.join("corpus/debezium_value")).len() + files(&root.join("regressions/debezium_value")).len();
    let cases = std::fs::read_to_string(root.join("replay/debezium_value.jsonl")).unwrap();
    let cases: Vec<serde_json::Value> = cases.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!cases.is_empty(), "fuzz/replay/debezium_value.jsonl has no case");
    assert_eq!(cases.len(), seeds, "one case per seed and regression input: regenerate the file (docs/fuzzing.md)");
    for case in &cases {
        let hex = case["unscaled"].as_str().unwrap();
        let unscaled: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let scale = case["scale"].as_i64().unwrap();
        let outcome = std::panic::catch_unwind(|| {
            evictd::fuzzing::debezium_value(&case["value"], Some(&case["schema"]));
            evictd::fuzzing::debezium_value(&case["value"], None);
            evictd::fuzzing::debezium_decimal(&unscaled, scale);
        });
        assert!(outcome.is_ok(), "debezium_value panicked on {case}");
    }
}
