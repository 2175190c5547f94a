//! The loop against a scripted source and a sink that can fail or stall.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::*;
use crate::change::{Change, Lsn, Operation, Row, Value};
use crate::diagnostic::SourceFile;
use crate::graph::Lookup;
use crate::graph::load::load_sources;
use crate::resolve::{LookupError, LookupOutcome};

const GRAPH: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "name"]

[caches.item]
key = "item:{id}"
[[caches.item.depends]]
table = "app.items"
"#;

fn pos(n: u64) -> Position {
    Position::Postgres { commit_lsn: Lsn(n), lsn: Lsn(n) }
}

fn insert(id: i64) -> SourceEvent {
    let row = Row::new().with("id", Value::Int(id)).with("name", Value::Text("x".into()));
    SourceEvent::Change(Change::new("app.items", Operation::Insert, None, Some(row)))
}

/// A source that plays `events`, then waits forever; records acknowledgements.
/// A keepalive comes 10 ms after what precedes it, as a server sends them
/// when the stream is quiet.
struct Script {
    events: VecDeque<Result<SourceEvent, SourceError>>,
    acked: Arc<Mutex<Vec<Position>>>,
}

impl Source for Script {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        if matches!(self.events.front(), Some(Ok(SourceEvent::Idle { .. }))) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match self.events.pop_front() {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
    async fn acknowledge(&mut self, position: &Position) -> Result<(), SourceError> {
        self.acked.lock().unwrap().push(position.clone());
        Ok(())
    }
}

/// A sink that fails while `failing` is set, recording what it applied.
#[derive(Default)]
struct Recorder {
    failing: Mutex<u32>,
    applied: Mutex<Vec<String>>,
}

impl Sink for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    async fn apply(&self, batch: SinkBatch<'_>) -> Result<(), SinkError> {
        {
            let mut failing = self.failing.lock().unwrap();
            if *failing > 0 {
                *failing -= 1;
                return Err(SinkError::Transient { target: "recorder".into(), message: "down".into() });
            }
        }
        let mut applied = self.applied.lock().unwrap();
        for e in batch.effects {
            if let Effect::Key { key, .. } = e {
                applied.push(key.clone());
            }
        }
        Ok(())
    }
}

struct NoLookups;

impl LookupExecutor for NoLookups {
    async fn execute(
        &self,
        _: &str,
        _: &Lookup,
        _: &[Value],
        _: &[Arc<str>],
        _: u64,
    ) -> Result<LookupOutcome, LookupError> {
        Ok(LookupOutcome::Rows(Vec::new()))
    }
}

fn pipeline(sink: Arc<Recorder>) -> Pipeline<Recorder, NoLookups> {
    let graph = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
    let health = Arc::new(Health::new(crate::server::HealthThresholds::default(), ["recorder"]));
    Pipeline {
        graph: Arc::new(graph),
        sink,
        lookups: None,
        options: RunOptions::default(),
        metrics: Arc::new(Metrics::new()),
        health,
    }
}

fn tx(id: i64, at: u64) -> Vec<Result<SourceEvent, SourceError>> {
    vec![
        Ok(SourceEvent::Begin),
        Ok(insert(id)),
        Ok(SourceEvent::Commit { position: pos(at), commit_time_micros: None }),
    ]
}

/// Runs the session until `done` holds (checked as the loop idles), then shuts down.
async fn run_until(p: &Pipeline<Recorder, NoLookups>, source: &mut Script, done: impl Fn() -> bool) -> SessionEnd {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let watcher = async move {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.cancel();
        std::future::pending::<()>().await
    };
    tokio::select! {
        end = p.run_session(source, &shutdown) => end.unwrap(),
        () = watcher => unreachable!(),
    }
}

#[tokio::test(start_paused = true)]
async fn transactions_are_applied_then_acknowledged_in_order() {
    let sink = Arc::new(Recorder::default());
    let p = pipeline(sink.clone());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let events = [tx(1, 10), tx(2, 20), tx(1, 30)].into_iter().flatten().collect();
    let mut source = Script { events, acked: acked.clone() };
    let seen = acked.clone();
    let end = run_until(&p, &mut source, move || seen.lock().unwrap().last() == Some(&pos(30))).await;
    assert!(matches!(end, SessionEnd::Shutdown));
    let applied = sink.applied.lock().unwrap().clone();
    assert!(applied.contains(&"item:1".to_owned()) && applied.contains(&"item:2".to_owned()));
    let acked = acked.lock().unwrap().clone();
    assert!(acked.windows(2).all(|w| w[0] < w[1]), "acknowledged in order: {acked:?}");
}

#[tokio::test(start_paused = true)]
async fn nothing_is_acknowledged_while_the_sink_is_down() {
    let sink = Arc::new(Recorder::default());
    *sink.failing.lock().unwrap() = 5;
    let p = pipeline(sink.clone());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut source = Script { events: tx(7, 10).into(), acked: acked.clone() };
    let (s, a) = (sink.clone(), acked.clone());
    run_until(&p, &mut source, move || {
        // While failures remain, nothing may be acknowledged.
        let failing = *s.failing.lock().unwrap();
        let acks = a.lock().unwrap().len();
        assert!(failing == 0 || acks == 0, "acknowledged while the sink was failing");
        acks == 1
    })
    .await;
    assert_eq!(sink.applied.lock().unwrap().clone(), ["item:7"]);
    assert_eq!(acked.lock().unwrap().clone(), [pos(10)]);
}

#[tokio::test(start_paused = true)]
async fn an_open_transaction_is_not_acknowledged_at_shutdown() {
    let sink = Arc::new(Recorder::default());
    let p = pipeline(sink.clone());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut events: VecDeque<_> = tx(1, 10).into();
    events.extend([Ok(SourceEvent::Begin), Ok(insert(2))]);
    let mut source = Script { events, acked: acked.clone() };
    let seen = acked.clone();
    run_until(&p, &mut source, move || !seen.lock().unwrap().is_empty()).await;
    assert_eq!(acked.lock().unwrap().clone(), [pos(10)], "the open transaction stays unacknowledged");
}

#[tokio::test(start_paused = true)]
async fn keepalives_advance_an_idle_slot_only() {
    let sink = Arc::new(Recorder::default());
    let p = pipeline(sink);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut events: VecDeque<_> = VecDeque::from([Ok(SourceEvent::Idle { position: pos(5) })]);
    events.extend(tx(1, 10));
    events.push_back(Ok(SourceEvent::Idle { position: pos(50) }));
    let mut source = Script { events, acked: acked.clone() };
    let seen = acked.clone();
    run_until(&p, &mut source, move || seen.lock().unwrap().last() == Some(&pos(50))).await;
    assert_eq!(acked.lock().unwrap().clone(), [pos(5), pos(10), pos(50)]);
}

#[tokio::test(start_paused = true)]
async fn a_lost_source_ends_the_session_without_acknowledging() {
    let sink = Arc::new(Recorder::default());
    let p = pipeline(sink);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut events: VecDeque<_> = VecDeque::from([Ok(SourceEvent::Begin), Ok(insert(1))]);
    events.push_back(Err(SourceError::Transient("connection reset".into())));
    let mut source = Script { events, acked: acked.clone() };
    let end = p.run_session(&mut source, &CancellationToken::new()).await.unwrap();
    assert!(matches!(end, SessionEnd::SourceLost(m) if m == "connection reset"));
    assert!(acked.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_keepalive_is_not_acknowledged_while_a_batch_is_in_flight() {
    let sink = Arc::new(Recorder::default());
    *sink.failing.lock().unwrap() = 3;
    let p = pipeline(sink.clone());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut events: VecDeque<_> = tx(1, 10).into();
    events.push_back(Ok(SourceEvent::Idle { position: pos(50) }));
    let mut source = Script { events, acked: acked.clone() };
    let seen = acked.clone();
    run_until(&p, &mut source, move || !seen.lock().unwrap().is_empty()).await;
    assert_eq!(acked.lock().unwrap().clone(), [pos(10)], "the keepalive came while the batch was retrying");
}
