//! Runs `tests/vectors/key-rendering.json`, the language-neutral
//! specification of key rendering, against the renderer.

use std::collections::HashMap;

use evictd::change::Value;
use evictd::key::{KeyTemplate, RenderError};
use serde_json::Value as Json;

fn param(json: &Json) -> Value {
    if let Some(hex_text) = json.get("bytes").and_then(Json::as_str) {
        return Value::Bytes(hex::decode(hex_text).unwrap());
    }
    // JSON has no NaN or infinities: {"float": "NaN" | "inf" | "-inf"}.
    if let Some(special) = json.get("float").and_then(Json::as_str) {
        return Value::Float(special.parse().unwrap());
    }
    Value::from_json(json)
}

#[test]
fn every_key_rendering_vector_holds() {
    let text = std::fs::read_to_string(super::support::root().join("tests/vectors/key-rendering.json")).unwrap();
    let doc: Json = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "the vector file lost cases");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let template = case["template"].as_str().unwrap();
        let params: HashMap<String, Value> =
            case["params"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), param(v))).collect();
        let got = match KeyTemplate::parse(template) {
            Err(_) => Err("template"),
            Ok(t) => t.render_map(&params).map_err(|e| match e {
                RenderError::Null(_) => "null",
                RenderError::Missing(_) => "missing",
            }),
        };
        let want = match (case.get("key"), case.get("error")) {
            (Some(k), _) => Ok(k.as_str().unwrap()),
            (None, Some(e)) => Err(e.as_str().unwrap()),
            _ => panic!("case {name} has neither key nor error"),
        };
        if got.as_deref().map_err(|e| *e) != want {
            failures.push(format!("{name}: {template} → {got:?}, expected {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs `tests/vectors/layout.json`: the Redis names and encodings every
/// client derives (stamp keys, namespace stamps, version keys, tag keys).
#[test]
fn every_layout_vector_holds() {
    use evictd::sink::redis::layout::{
        guard_in_slot, guard_key, namespace_key, parse_version, stamp, tag_key, unstamp, versioned_key,
    };
    let text = std::fs::read_to_string(super::support::root().join("tests/vectors/layout.json")).unwrap();
    let doc: Json = serde_json::from_str(&text).unwrap();
    let text_of = |v: &Json| v.as_str().unwrap().as_bytes().to_vec();
    let mut failures = Vec::new();
    let mut check = |what: String, ok: bool| {
        if !ok {
            failures.push(what);
        }
    };
    for case in doc["guard"].as_array().unwrap() {
        let key = text_of(&case["key"]);
        check(format!("guard_key {case}"), guard_key(&key) == text_of(&case["stamp_key"]));
        check(format!("guard_in_slot {case}"), guard_in_slot(&key) == case["in_slot"].as_bool().unwrap());
    }
    for case in doc["stamp"].as_array().unwrap() {
        let value = stamp(case["namespace"].as_u64().unwrap(), &text_of(&case["payload"]));
        check(format!("stamp {case}"), value == text_of(&case["value"]));
    }
    for case in doc["unstamp"].as_array().unwrap() {
        let value = text_of(&case["value"]);
        let got = unstamp(&value, case["namespace"].as_u64().unwrap()).map(<[u8]>::to_vec);
        check(format!("unstamp {case}"), got == case["payload"].as_str().map(|p| p.as_bytes().to_vec()));
    }
    for case in doc["version"].as_array().unwrap() {
        check(format!("parse_version {case}"), parse_version(&text_of(&case["stored"])) == case["version"].as_u64());
    }
    for case in doc["versioned"].as_array().unwrap() {
        let got = versioned_key(case["key"].as_str().unwrap(), case["version"].as_u64().unwrap());
        check(format!("versioned_key {case}"), got == case["data_key"].as_str().unwrap());
    }
    for case in doc["namespace"].as_array().unwrap() {
        check(
            format!("namespace_key {case}"),
            namespace_key(case["cache"].as_str().unwrap()) == case["key"].as_str().unwrap(),
        );
    }
    for case in doc["tag"].as_array().unwrap() {
        check(format!("tag_key {case}"), tag_key(case["tag"].as_str().unwrap()) == case["key"].as_str().unwrap());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
