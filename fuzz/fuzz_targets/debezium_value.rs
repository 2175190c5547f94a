//! Structure-aware Debezium values: a Connect schema (type, logical name,
//! decimal scale) and a JSON value built from the fuzzer's bytes, decoded
//! by `typed`; plus the decimal conversion on raw unscaled bytes.
//!
//! With `EVICTD_FUZZ_CASES=1` in the environment, each input's decoded case
//! is also printed to stdout as one JSON line
//! (`{"schema", "value", "unscaled" (hex), "scale"}`): how the committed
//! seeds become `fuzz/replay/debezium_value.jsonl`, which the root test
//! replays without the `arbitrary` crate (docs/fuzzing.md).
#![no_main]
use arbitrary::Arbitrary;
use serde_json::{Value as Json, json};

const NAMES: &[&str] = &[
    "org.apache.kafka.connect.data.Decimal",
    "io.debezium.data.VariableScaleDecimal",
    "io.debezium.time.Date",
    "org.apache.kafka.connect.data.Date",
    "io.debezium.time.Timestamp",
    "org.apache.kafka.connect.data.Timestamp",
    "io.debezium.time.MicroTimestamp",
    "io.debezium.time.NanoTimestamp",
    "io.debezium.time.Time",
    "org.apache.kafka.connect.data.Time",
    "io.debezium.time.MicroTime",
    "io.debezium.time.NanoTime",
    "io.debezium.time.ZonedTimestamp",
    "io.debezium.time.ZonedTime",
    "io.debezium.data.Json",
    "io.debezium.data.Uuid",
    "io.debezium.data.Enum",
];
const TYPES: &[&str] = &["int8", "int16", "int32", "int64", "float32", "float64", "double", "boolean", "string", "bytes", "struct"];

#[derive(Debug, Arbitrary)]
enum Scale {
    None,
    Int(i64),
    Text(String),
}

#[derive(Debug, Arbitrary)]
enum Val {
    Null,
    Int(i64),
    /// An integer at an edge (overflow in date and time arithmetic).
    Edge(u8, i8),
    Float(f64),
    Bool(bool),
    Text(String),
    /// Base64 of these bytes (what decimals and `bytes` carry).
    Base64(Vec<u8>),
    VariableScale { scale: i64, unscaled: Vec<u8> },
    Extended { tag: u8, text: String },
    Array(Vec<i64>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    name: Option<u8>,
    kind: Option<u8>,
    scale: Scale,
    value: Val,
    unscaled: Vec<u8>,
    raw_scale: i16,
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn value(v: &Val) -> Json {
    match v {
        Val::Null => Json::Null,
        Val::Int(i) => json!(i),
        Val::Edge(which, delta) => {
            let edges = [i64::MAX, i64::MIN, i64::from(i32::MAX), i64::from(i32::MIN), 0, 86_400_000, 1 << 40, -(1 << 40)];
            json!(edges[usize::from(*which) % edges.len()].saturating_add(i64::from(*delta)))
        }
        Val::Float(f) => json!(f),
        Val::Bool(b) => json!(b),
        Val::Text(s) => json!(s),
        Val::Base64(b) => json!(base64(b)),
        Val::VariableScale { scale, unscaled } => json!({"scale": scale, "value": base64(unscaled)}),
        Val::Extended { tag, text } => {
            let tags = ["$oid", "$numberLong", "$numberInt", "$numberDouble", "$numberDecimal", "$uuid", "$date"];
            json!({ tags[usize::from(*tag) % tags.len()]: text })
        }
        Val::Array(a) => json!(a),
    }
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let mut schema = serde_json::Map::new();
    if let Some(n) = input.name {
        schema.insert("name".into(), json!(NAMES[usize::from(n) % NAMES.len()]));
    }
    if let Some(k) = input.kind {
        schema.insert("type".into(), json!(TYPES[usize::from(k) % TYPES.len()]));
    }
    match &input.scale {
        Scale::None => {}
        Scale::Int(s) => {
            schema.insert("parameters".into(), json!({"scale": s}));
        }
        Scale::Text(s) => {
            schema.insert("parameters".into(), json!({"scale": s}));
        }
    }
    let schema = Json::Object(schema);
    let value = value(&input.value);
    static CASES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *CASES.get_or_init(|| std::env::var_os("EVICTD_FUZZ_CASES").is_some()) {
        let unscaled: String = input.unscaled.iter().map(|b| format!("{b:02x}")).collect();
        println!("{}", json!({"schema": schema, "value": value, "unscaled": unscaled, "scale": input.raw_scale}));
    }
    evictd::fuzzing::debezium_value(&value, Some(&schema));
    evictd::fuzzing::debezium_value(&value, None);
    evictd::fuzzing::debezium_decimal(&input.unscaled, i64::from(input.raw_scale));
});
