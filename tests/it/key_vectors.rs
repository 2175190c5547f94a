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
