//! Entry points for the fuzz targets (`fuzz/`) and for the test that replays
//! their corpora (`tests/it/fuzz_corpora.rs`): each hands outside input to
//! the same parser the daemon or a client uses, and discards the result.
//!
//! **Invariant: every function here returns for any input, without
//! panicking**; an error is a fine answer. Not a stable API: hidden from the
//! docs, and only the fuzzers and that test call it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::change::{Lsn, Position, Value};
use crate::config::FullRowDeletes;
use crate::diagnostic::SourceFile;
use crate::key::KeyTemplate;
use crate::source::debezium::{self, DecodeOptions, Record, TableKeys};
use crate::source::postgres::pgoutput::{Decoder, TxContext};

/// A column as a Relation message describes it: flags (1: part of the
/// replica identity), name, type OID.
type SeededColumn = (u8, &'static str, u32);

/// `(oid, namespace, name, replica identity, columns)`.
type SeededRelation = (u32, &'static str, &'static str, u8, &'static [SeededColumn]);

/// The relations the pgoutput decoder knows before the input is read, as
/// Postgres would have described them. They cover every type
/// [`crate::source::postgres::pgoutput::typed`] distinguishes.
const SEEDED_RELATIONS: &[SeededRelation] = &[
    (
        16384,
        "public",
        "products",
        b'd',
        &[
            (1, "id", 23),
            (0, "name", 25),
            (0, "price", 1700),
            (0, "active", 16),
            (0, "weight", 701),
            (0, "stock", 20),
            (0, "small", 21),
            (0, "updated_at", 1184),
            (0, "born", 1082),
            (0, "at", 1083),
            (0, "uid", 2950),
            (0, "doc", 3802),
            (0, "blob", 17),
            (0, "real", 700),
        ],
    ),
    (16385, "shop", "orders", b'f', &[(1, "id", 20), (1, "customer", 1043), (0, "total", 1700)]),
    (16386, "", "nothing", b'n', &[]),
];

/// A Relation message (`R`) for one seeded relation.
fn relation_message(oid: u32, namespace: &str, name: &str, identity: u8, columns: &[(u8, &str, u32)]) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&oid.to_be_bytes());
    for text in [namespace, name] {
        m.extend_from_slice(text.as_bytes());
        m.push(0);
    }
    m.push(identity);
    m.extend_from_slice(&u16::try_from(columns.len()).unwrap_or(u16::MAX).to_be_bytes());
    for (flags, column, type_oid) in columns {
        m.push(*flags);
        m.extend_from_slice(column.as_bytes());
        m.push(0);
        m.extend_from_slice(&type_oid.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
    }
    m
}

/// Splits `data` into messages, each a big-endian `u16` length and that
/// many bytes (fewer at the end); a last lone byte is a message of its own.
fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        if data.len() < 2 {
            let (m, rest) = data.split_at(data.len());
            data = rest;
            return Some(m);
        }
        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let body = &data[2..];
        let (m, rest) = body.split_at(n.min(body.len()));
        data = rest;
        Some(m)
    })
}

/// The seeded relations' Relation messages.
fn seed_relations() -> Vec<Vec<u8>> {
    SEEDED_RELATIONS.iter().map(|(oid, ns, name, id, cols)| relation_message(*oid, ns, name, *id, cols)).collect()
}

/// The pgoutput decoder, its relation cache seeded with
/// [`SEEDED_RELATIONS`] (a partition alias too), fed every framed message
/// of `data` in turn (a Relation message in the input replaces a relation
/// for the messages after it). Returns how many row changes decoded.
pub fn pgoutput(data: &[u8]) -> usize {
    let mut decoder = Decoder::with_aliases([("public.products_2026".to_owned(), Arc::<str>::from("public.products"))]);
    let tx = TxContext { final_lsn: 0x16_B374_D848, xid: 7, commit_time_micros: i64::MAX - 1 };
    let position = Position::Postgres { commit_lsn: Lsn(0x16_B374_D848), lsn: Lsn(0x16_B374_D000) };
    let mut out: Vec<crate::change::Change> = Vec::new();
    for relation in seed_relations() {
        let _ = decoder.decode_into(&relation, tx, position.clone(), &mut out);
    }
    out.clear();
    let mut changes = 0;
    for message in frames(data) {
        let _ = decoder.decode_into(message, tx, position.clone(), &mut out);
        changes += out.len();
        out.clear();
    }
    changes
}

/// The Debezium decoder on every line of `data` (JSON lines, as
/// `tests/fixtures/debezium/` and `evictd replay` hold them: a Kafka record
/// `{topic, key, value}` or a bare event value), with default options and
/// with a topic mapping, full-row deletes, graph key columns and a value cap.
pub fn debezium(data: &[u8]) {
    let keys: TableKeys = HashMap::from([
        ("inventory.products".to_owned(), HashSet::from(["id".to_owned()])),
        ("public.products".to_owned(), HashSet::from(["id".to_owned(), "sku".to_owned()])),
    ]);
    let full = FullRowDeletes::Tables(HashSet::from(["inventory.orders".to_owned()]));
    let seeded = DecodeOptions {
        table: None,
        full_row_deletes: Some(&full),
        table_keys: Some(&keys),
        max_value_bytes: Some(4096),
        deadline: None,
    };
    let mapped = DecodeOptions { table: Some("public.products"), ..seeded };
    for line in data.split(|b| *b == b'\n') {
        let Ok(json) = serde_json::from_slice::<Json>(line) else { continue };
        let record = Record::from_json(&json);
        for options in [&DecodeOptions::default(), &seeded, &mapped] {
            let position = Position::File { line: 1 };
            let _ = debezium::decode(record.value, record.key, position, options);
        }
    }
}

/// One Debezium column value decoded by its Connect `schema` (the
/// structure-aware target builds both): decimals, dates, times, bytes,
/// extended JSON.
/// Each JSON line of `data` (a Kafka record or a bare event) parsed whole
/// and decoded once with default options: how the Kafka source decoded a
/// value before it split the envelope (`benches/kafka_decode.rs`).
pub fn debezium_once(data: &[u8]) -> usize {
    let mut changes = 0;
    for line in data.split(|b| *b == b'\n') {
        let Ok(json) = serde_json::from_slice::<Json>(line) else { continue };
        let record = Record::from_json(&json);
        let decoded = debezium::decode(record.value, record.key, Position::File { line: 1 }, &DecodeOptions::default());
        if matches!(decoded, Ok(debezium::Decoded::Change(_) | debezium::Decoded::SnapshotRead(_))) {
            changes += 1;
        }
    }
    changes
}

/// The Kafka source's decoding of message values (`source::kafka`): each
/// line of `data` is one value of the same topic, decoded in order by one
/// decoder, so that the schema each envelope carries is reused or replaced
/// as the source does. Returns how many decoded to a change.
pub fn kafka_messages(data: &[u8]) -> usize {
    let config = crate::config::KafkaSource::new("localhost:9092", "fuzz", vec!["t".to_owned()]);
    let keys: TableKeys = HashMap::from([("inventory.products".to_owned(), HashSet::from(["id".to_owned()]))]);
    let mut envelopes = crate::source::kafka::Envelopes::default();
    let mut changes = 0;
    for line in data.split(|b| *b == b'\n') {
        let decoded = crate::source::kafka::decode_message_with(&mut envelopes, "t", None, Some(line), &config, &keys);
        if matches!(decoded, Ok(debezium::Decoded::Change(_) | debezium::Decoded::SnapshotRead(_))) {
            changes += 1;
        }
    }
    changes
}

pub fn debezium_value(value: &Json, schema: Option<&Json>) {
    let _ = debezium::typed(value, schema);
}

/// Debezium's decimal conversion: an unscaled big-endian two's-complement
/// integer at `scale`.
pub fn debezium_decimal(unscaled: &[u8], scale: i64) {
    let _ = debezium::decimal_text(unscaled, scale);
}

/// Key templates: the first line of `text` is parsed as a template; when it
/// parses, it is rendered with one value per parameter taken from the
/// following lines (`i:5` an integer, `f:1.5` a float, `b:xyz` bytes, `n`
/// NULL, `t` / `false` booleans, anything else text; missing lines are
/// NULL), positionally and by name.
pub fn key_template(text: &str) {
    let mut lines = text.split('\n');
    let Ok(template) = KeyTemplate::parse(lines.next().unwrap_or_default()) else { return };
    let values: Vec<Value> = lines.map(value_of).collect();
    let slots: Vec<Option<&Value>> = (0..template.params().len()).map(|i| values.get(i)).collect();
    let _ = template.render(&slots);
    let by_name: HashMap<String, Value> =
        template.params().iter().zip(values.iter()).map(|(name, value)| (name.to_string(), value.clone())).collect();
    let _ = template.render_map(&by_name);
}

fn value_of(line: &str) -> Value {
    match line.split_once(':') {
        Some(("i", n)) => n.parse().map_or_else(|_| Value::Text(line.to_owned()), Value::Int),
        Some(("f", n)) => n.parse().map_or_else(|_| Value::Text(line.to_owned()), Value::Float),
        Some(("b", bytes)) => Value::Bytes(bytes.as_bytes().to_vec()),
        _ => match line {
            "n" => Value::Null,
            "t" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::Text(line.to_owned()),
        },
    }
}

/// The graph loader on one file's TOML `text`.
pub fn graph(text: &str) {
    let _ = crate::graph::load::load_sources(&[SourceFile::new("fuzz.toml", text.to_owned())]);
}

/// The config loader on the TOML `text` of a file, without environment
/// overrides. Its directory does not exist, so graph paths resolve to
/// nothing.
pub fn config(text: &str) {
    let _ =
        crate::config::load_text(Path::new("/nonexistent/evictd-fuzz/evictd.toml"), text.to_owned(), &HashMap::new());
}

/// The broadcast message readers: the daemon-side [`crate::sink::redis::Envelope`]
/// and the subscriber's [`crate::subscriber::message::parse`].
pub fn broadcast(data: &[u8]) {
    let _ = crate::subscriber::message::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::sink::redis::Envelope::parse(text);
    }
}
