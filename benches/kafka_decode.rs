//! The Kafka source's decoding of Debezium message values, per message.
//!
//! `cargo bench --bench kafka_decode`. The values are the fixture's
//! `dbserver1.shop.inventory` events with the JSON converter's default
//! `{schema, payload}` envelope (`tests/fixtures/debezium/with-schemas.jsonl`),
//! decoded in order by one decoder, as the source decodes one topic:
//!
//! - `envelope reused`: the source's path (`decode_message_with`, the
//!   schema parsed once per topic and then reused while its text is the
//!   same);
//! - `whole value`: what the source did before, each value parsed into one
//!   JSON tree, schema included, then decoded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn values(topic: &str) -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/debezium/with-schemas.jsonl")).unwrap();
    // The values as Debezium wrote them (`schema` first), not re-serialised.
    #[derive(serde::Deserialize)]
    struct Record {
        topic: String,
        value: Box<serde_json::value::RawValue>,
    }
    text.lines()
        .map(|l| serde_json::from_str::<Record>(l).unwrap())
        .filter(|r| r.topic == topic && r.value.get() != "null")
        .map(|r| r.value.get().to_owned())
        .collect()
}

fn decoding(c: &mut Criterion) {
    let values = values("dbserver1.shop.inventory");
    assert!(values.len() >= 10, "the fixture has the topic's events");
    let lines = values.join("\n");
    let mut group = c.benchmark_group("kafka_decode");
    group.throughput(Throughput::Elements(values.len() as u64));
    group.bench_function("envelope reused", |b| {
        b.iter(|| assert_eq!(evictd::fuzzing::kafka_messages(black_box(lines.as_bytes())), values.len()));
    });
    group.bench_function("whole value", |b| b.iter(|| evictd::fuzzing::debezium_once(black_box(lines.as_bytes()))));
    group.finish();
}

criterion_group!(benches, decoding);
criterion_main!(benches);
