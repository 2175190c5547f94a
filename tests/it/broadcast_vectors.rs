//! Runs `tests/vectors/broadcast.json`, the language-neutral specification
//! of what a subscriber does with each broadcast message
//! (`docs/broadcast.md`): every message parses with the daemon's own type
//! ([`Envelope`]), and a reference subscriber, written from the table in
//! the doc, takes the action and drops what each case says.

use std::collections::{BTreeMap, BTreeSet};

use evictd::change::Lsn;
use evictd::sink::redis::{BROADCAST_VERSION, Envelope, WireApplied};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Last {
    epoch: String,
    seq: u64,
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
struct Repair {
    caches: BTreeSet<String>,
    all_tags: bool,
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
struct Drop {
    keys: BTreeSet<String>,
    tags: BTreeSet<String>,
    caches: BTreeSet<String>,
    all_tags: bool,
    everything: bool,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    last: Last,
    message: String,
    #[serde(default)]
    touched: BTreeMap<String, String>,
    applied: Option<String>,
    #[serde(default)]
    applied_at_least: Option<String>,
    action: String,
    repair: Repair,
    drop: Drop,
    then: Last,
}

/// What the reference subscriber did with one message.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    action: &'static str,
    repair: Repair,
    drop: Drop,
    then: Last,
}

/// The gap repair: caches touched after `last`, and every tagged entry if
/// a message with tags came after it.
fn repair(touched: &BTreeMap<String, String>, last: u64) -> Repair {
    let after = |seq: &String| seq.parse::<u64>().unwrap() > last;
    let caches = touched.iter().filter(|(cache, seq)| *cache != "*tags" && after(seq)).map(|(c, _)| c.clone());
    Repair { caches: caches.collect(), all_tags: touched.get("*tags").is_some_and(after) }
}

fn message_drop(m: &Envelope) -> Drop {
    Drop {
        keys: m.keys.iter().cloned().collect(),
        tags: m.tags.iter().cloned().collect(),
        caches: m.flush.iter().cloned().collect(),
        ..Drop::default()
    }
}

/// The table of `docs/broadcast.md`, "What a subscriber does".
fn subscriber(last: &Last, m: &Envelope, touched: &BTreeMap<String, String>) -> Outcome {
    let everything = || Drop { everything: true, ..Drop::default() };
    if m.v != BROADCAST_VERSION {
        return Outcome {
            action: "flush_keep_state",
            repair: Repair::default(),
            drop: everything(),
            then: last.clone(),
        };
    }
    let kind = m.kind.as_deref().unwrap_or_default();
    let nothing = || Outcome { action: "ignore", repair: Repair::default(), drop: Drop::default(), then: last.clone() };
    if kind != "batch" && kind != "heartbeat" {
        return nothing();
    }
    let (epoch, seq) = (m.epoch.clone().unwrap(), m.seq.unwrap());
    let now = Last { epoch: epoch.clone(), seq };
    if epoch != last.epoch {
        return Outcome { action: "flush", repair: Repair::default(), drop: everything(), then: now };
    }
    match kind {
        "batch" if seq <= last.seq => nothing(),
        "batch" if seq == last.seq + 1 => {
            Outcome { action: "apply", repair: Repair::default(), drop: message_drop(m), then: now }
        }
        "batch" => {
            Outcome { action: "repair_then_apply", repair: repair(touched, last.seq), drop: message_drop(m), then: now }
        }
        _ if seq <= last.seq => nothing(),
        _ => Outcome { action: "repair", repair: repair(touched, last.seq), drop: Drop::default(), then: now },
    }
}

#[test]
fn every_broadcast_vector_parses_and_asks_for_the_documented_action() {
    let text = std::fs::read_to_string(super::support::root().join("tests/vectors/broadcast.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<Case> = serde_json::from_value(doc["cases"].clone()).unwrap();
    assert!(cases.len() >= 15, "the vector file lost cases");
    let actions: BTreeSet<&str> = cases.iter().map(|c| c.action.as_str()).collect();
    let documented: BTreeSet<&str> = doc["actions"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(actions, documented, "every action has a case");
    for case in &cases {
        let m = Envelope::parse(&case.message).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let applied = m.applied.as_ref().map(|WireApplied::Postgres { lsn }| lsn.clone());
        assert_eq!(applied, case.applied, "{}", case.name);
        if let (Some(applied), Some(floor)) = (&applied, &case.applied_at_least) {
            let (applied, floor): (Lsn, Lsn) = (applied.parse().unwrap(), floor.parse().unwrap());
            assert!(applied > floor, "{}", case.name);
        }
        let outcome = subscriber(&case.last, &m, &case.touched);
        let expected = Outcome {
            action: outcome.action,
            repair: Repair { caches: case.repair.caches.clone(), all_tags: case.repair.all_tags },
            drop: Drop {
                keys: case.drop.keys.clone(),
                tags: case.drop.tags.clone(),
                caches: case.drop.caches.clone(),
                all_tags: case.drop.all_tags,
                everything: case.drop.everything,
            },
            then: case.then.clone(),
        };
        assert_eq!(outcome.action, case.action, "{}", case.name);
        assert_eq!(outcome, expected, "{}", case.name);
    }
}

/// The same cases through the Rust subscriber's own parser, state machine
/// and gap repair (`evictd::subscriber`), as the Python and TypeScript
/// clients run them through theirs.
#[test]
fn the_rust_subscriber_takes_every_vector_action() {
    use std::collections::HashMap;

    use evictd::subscriber::message::{Message, parse};
    use evictd::subscriber::sequence::{Decision, Tracker, repair_plan};

    let text = std::fs::read_to_string(super::support::root().join("tests/vectors/broadcast.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<Case> = serde_json::from_value(doc["cases"].clone()).unwrap();
    for case in &cases {
        let mut tracker = Tracker::new();
        assert_eq!(tracker.heartbeat(&case.last.epoch, case.last.seq), Decision::Ignore, "{}", case.name);
        let message = parse(case.message.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let decision = match &message {
            Message::Batch(b) => Some(tracker.batch(&b.epoch, b.seq)),
            Message::Heartbeat(h) => Some(tracker.heartbeat(&h.epoch, h.seq)),
            Message::UnknownVersion | Message::UnknownKind => None,
        };
        let action = match (&message, decision) {
            (Message::UnknownVersion, _) => "flush_keep_state",
            (Message::UnknownKind, _) | (_, Some(Decision::Ignore)) => "ignore",
            (_, Some(Decision::Apply)) => "apply",
            (_, Some(Decision::Flush)) => "flush",
            (_, Some(Decision::Gap { last, apply })) => {
                let touched: HashMap<String, u64> =
                    case.touched.iter().map(|(k, v)| (k.clone(), v.parse().unwrap())).collect();
                let (caches, all_tags) = repair_plan(&touched, last);
                let want: Vec<String> = case.repair.caches.iter().cloned().collect();
                assert_eq!((caches, all_tags), (want, case.repair.all_tags), "{}", case.name);
                if apply { "repair_then_apply" } else { "repair" }
            }
            (_, None) => unreachable!(),
        };
        assert_eq!(action, case.action, "{}", case.name);
        if let Message::Batch(b) = &message
            && matches!(action, "apply" | "repair_then_apply")
        {
            assert_eq!(b.keys.iter().cloned().collect::<BTreeSet<_>>(), case.drop.keys, "{}", case.name);
            assert_eq!(b.tags.iter().cloned().collect::<BTreeSet<_>>(), case.drop.tags, "{}", case.name);
            assert_eq!(b.flush.iter().cloned().collect::<BTreeSet<_>>(), case.drop.caches, "{}", case.name);
        }
        assert_eq!(
            tracker.position(),
            Some((case.then.epoch.as_str(), case.then.seq)),
            "{}: the state after",
            case.name
        );
    }
}
