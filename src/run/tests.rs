//! The loop against a scripted source, a sink that can fail or stall, a
//! look-up executor that fails for a poison value, and a dead-letter store
//! that can fail.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::*;
use crate::change::{Change, Lsn, Operation, Row, Value};
use crate::dead_letter::{DeadLetterError, DeadLetterReason};
use crate::diagnostic::SourceFile;
use crate::graph::Lookup;
use crate::graph::load::load_sources;
use crate::lookup::{LookupError, LookupOutcome};
use crate::policy;

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
    /// Batches applied (not counting failed attempts).
    batches: Mutex<u32>,
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
        *self.batches.lock().unwrap() += 1;
        let mut applied = self.applied.lock().unwrap();
        for e in batch.effects {
            match e {
                Effect::Key { key, .. } => applied.push(key.clone()),
                Effect::NamespaceBump { cache } => applied.push(format!("ns:{}", batch.graph.cache(*cache).name)),
                Effect::Tag { .. } => {}
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

/// A dead-letter store that fails (transiently) while `failing` is set.
#[derive(Default)]
struct Letters {
    failing: Mutex<u32>,
    recorded: Mutex<Vec<DeadLetter>>,
    undecodable: Mutex<Vec<Undecodable>>,
}

impl Letters {
    fn fail(&self) -> Result<(), DeadLetterError> {
        let mut failing = self.failing.lock().unwrap();
        if *failing > 0 {
            *failing -= 1;
            return Err(DeadLetterError::Unreachable("connection refused".into()));
        }
        Ok(())
    }
}

impl DeadLetterStore for Letters {
    async fn record(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        self.fail()?;
        self.recorded.lock().unwrap().push(letter.clone());
        Ok(())
    }
    async fn record_undecodable(&self, message: &Undecodable) -> Result<(), DeadLetterError> {
        self.fail()?;
        self.undecodable.lock().unwrap().push(message.clone());
        Ok(())
    }
}

fn pipeline(sink: Arc<Recorder>) -> Pipeline<Recorder, NoLookups, Letters> {
    let graph = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
    let health = Arc::new(Health::new(crate::server::HealthThresholds::default(), ["recorder"]));
    Pipeline {
        graph: Arc::new(graph),
        sink,
        lookups: None,
        dead_letters: Arc::new(Letters::default()),
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
async fn run_until<L: LookupExecutor + Send + Sync + 'static>(
    p: &Pipeline<Recorder, L, Letters>,
    source: &mut Script,
    done: impl Fn() -> bool,
) -> SessionEnd {
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
async fn a_lone_commit_goes_out_at_once_without_waiting_for_the_batch_window() {
    let sink = Arc::new(Recorder::default());
    let mut p = pipeline(sink.clone());
    p.options.batch.max_delay = Duration::from_secs(10);
    let mut source = Script { events: tx(1, 10).into(), acked: Arc::default() };
    let started = tokio::time::Instant::now();
    let s = sink.clone();
    run_until(&p, &mut source, move || !s.applied.lock().unwrap().is_empty()).await;
    // Paused time jumps to the next timer when everything waits: a batch
    // held for its window would show 10 s here.
    assert!(started.elapsed() < Duration::from_secs(1), "waited {:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn transactions_ready_together_go_out_as_one_batch() {
    let sink = Arc::new(Recorder::default());
    let p = pipeline(sink.clone());
    let events = [tx(1, 10), tx(2, 20), tx(3, 30)].into_iter().flatten().collect();
    let mut source = Script { events, acked: Arc::default() };
    let s = sink.clone();
    run_until(&p, &mut source, move || s.applied.lock().unwrap().len() == 3).await;
    assert_eq!(*sink.batches.lock().unwrap(), 1, "a ready stream is read before its batch is sent");
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
    events.push_back(Err(SourceError::transient("connection reset")));
    let mut source = Script { events, acked: acked.clone() };
    let end = p.run_session(&mut source, &CancellationToken::new()).await.unwrap();
    assert!(matches!(end, SessionEnd::SourceLost(m) if m.to_string() == "connection reset"));
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

/// Items with an owner whose page is found by a look-up.
const LOOKUP_GRAPH: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "owner"]

[caches.item]
key = "item:{id}"
[[caches.item.depends]]
table = "app.items"

[caches.owner]
key = "owner:{id}"
[[caches.owner.depends]]
table = "app.items"
lookup = { query = "SELECT id FROM app.owners WHERE id = ANY($1)", arg = "owner" }
"#;

/// The owner whose look-up fails.
const POISON: i64 = 13;

/// How the look-up of the poison owner fails.
#[derive(Clone, Copy)]
enum Failure {
    /// A query error that will happen again (division by zero).
    Definite,
    /// A statement timeout.
    Timeout,
}

/// Owners exist for every id; a query that includes the poison owner fails.
/// The first `unreachable` calls fail as if the database were down.
struct Owners {
    failure: Failure,
    unreachable: Mutex<u32>,
    calls: Mutex<u32>,
}

impl Owners {
    fn new(failure: Failure) -> Owners {
        Owners { failure, unreachable: Mutex::new(0), calls: Mutex::new(0) }
    }
}

impl LookupExecutor for Owners {
    async fn execute(
        &self,
        field: &str,
        _: &Lookup,
        args: &[Value],
        _: &[Arc<str>],
        _: u64,
    ) -> Result<LookupOutcome, LookupError> {
        *self.calls.lock().unwrap() += 1;
        {
            let mut unreachable = self.unreachable.lock().unwrap();
            if *unreachable > 0 {
                *unreachable -= 1;
                return Err(LookupError::Query { field: field.to_owned(), source: sqlx::Error::PoolTimedOut });
            }
        }
        if args.contains(&Value::Int(POISON)) {
            return Err(match self.failure {
                Failure::Definite => LookupError::Query {
                    field: field.to_owned(),
                    source: sqlx::Error::ColumnDecode { index: "0".into(), source: "division by zero".into() },
                },
                Failure::Timeout => LookupError::Timeout { field: field.to_owned(), timeout_ms: 100 },
            });
        }
        Ok(LookupOutcome::Rows(args.iter().map(|a| vec![Some(a.clone())]).collect()))
    }
}

fn lookup_pipeline(sink: Arc<Recorder>, owners: Owners, options: RunOptions) -> Pipeline<Recorder, Owners, Letters> {
    let graph = load_sources(&[SourceFile::new("t.toml", LOOKUP_GRAPH.to_owned())]).unwrap();
    let health = Arc::new(Health::new(crate::server::HealthThresholds::default(), ["recorder"]));
    Pipeline {
        graph: Arc::new(graph),
        sink,
        lookups: Some(Arc::new(owners)),
        dead_letters: Arc::new(Letters::default()),
        options,
        metrics: Arc::new(Metrics::new()),
        health,
    }
}

/// A transaction inserting item `id` of `owner`, committed at `at`.
fn owned(id: i64, owner: i64, at: u64) -> Vec<Result<SourceEvent, SourceError>> {
    let row = Row::new().with("id", Value::Int(id)).with("owner", Value::Int(owner));
    let mut change = Change::new("app.items", Operation::Insert, None, Some(row));
    change.position = Position::Postgres { commit_lsn: Lsn(at), lsn: Lsn(at - 1) };
    vec![
        Ok(SourceEvent::Begin),
        Ok(SourceEvent::Change(change)),
        Ok(SourceEvent::Commit { position: pos(at), commit_time_micros: None }),
    ]
}

fn poison_between_good_changes() -> VecDeque<Result<SourceEvent, SourceError>> {
    [owned(1, 1, 10), owned(2, POISON, 20), owned(3, 3, 30)].into_iter().flatten().collect()
}

#[tokio::test(start_paused = true)]
async fn a_change_whose_look_up_fails_is_dead_lettered_and_the_stream_moves_on() {
    let sink = Arc::new(Recorder::default());
    let p = lookup_pipeline(sink.clone(), Owners::new(Failure::Definite), RunOptions::default());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut source = Script { events: poison_between_good_changes(), acked: acked.clone() };
    let seen = acked.clone();
    run_until(&p, &mut source, move || seen.lock().unwrap().last() == Some(&pos(30))).await;
    let applied = sink.applied.lock().unwrap().clone();
    for key in ["owner:1", "owner:3", "item:1", "item:2", "item:3"] {
        assert!(applied.contains(&key.to_owned()), "{key} missing from {applied:?}");
    }
    assert!(!applied.contains(&format!("owner:{POISON}")));
    // The keys the failed look-up would have found are unknown: the cache
    // it feeds is invalidated whole rather than left stale.
    assert!(applied.contains(&"ns:owner".to_owned()), "no namespace bump in {applied:?}");
    let letters = p.dead_letters.recorded.lock().unwrap().clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].change.position, Position::Postgres { commit_lsn: Lsn(20), lsn: Lsn(19) });
    assert_eq!(letters[0].reason, DeadLetterReason::LookupFailed);
    assert_eq!(letters[0].attempts, 1, "a definite failure is not retried");
    assert!(letters[0].error.contains("division by zero"), "{}", letters[0].error);
    let metrics = p.metrics.encode().unwrap();
    assert!(metrics.contains(r#"evictd_dead_letters_total{table="app.items",reason="lookup_failed"} 1"#), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn with_on_error_stop_the_session_ends_without_acknowledging_the_change() {
    let sink = Arc::new(Recorder::default());
    let options = RunOptions { on_error: OnError::Stop, ..RunOptions::default() };
    let p = lookup_pipeline(sink, Owners::new(Failure::Definite), options);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut source = Script { events: poison_between_good_changes(), acked: acked.clone() };
    let end = p.run_session(&mut source, &CancellationToken::new()).await;
    match end {
        Err(RunError::Unresolvable { position, table, .. }) => {
            assert_eq!(position, "pg:0/14:0/13");
            assert_eq!(table, "app.items");
        }
        other => panic!("expected the daemon to stop, got {other:?}"),
    }
    assert!(acked.lock().unwrap().iter().all(|p| *p < pos(20)), "{:?}", acked.lock().unwrap());
    assert!(p.dead_letters.recorded.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_acknowledged_only_once_its_dead_letter_is_written() {
    let sink = Arc::new(Recorder::default());
    let p = lookup_pipeline(sink, Owners::new(Failure::Definite), RunOptions::default());
    *p.dead_letters.failing.lock().unwrap() = 4;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut source = Script { events: poison_between_good_changes(), acked: acked.clone() };
    let (letters, seen) = (p.dead_letters.clone(), acked.clone());
    run_until(&p, &mut source, move || {
        let failing = *letters.failing.lock().unwrap();
        let passed = seen.lock().unwrap().iter().any(|p| *p >= pos(20));
        assert!(failing == 0 || !passed, "acknowledged past the poison change before its dead letter was written");
        seen.lock().unwrap().last() == Some(&pos(30))
    })
    .await;
    assert_eq!(p.dead_letters.recorded.lock().unwrap().len(), 1);
    let metrics = p.metrics.encode().unwrap();
    assert!(metrics.contains(r#"evictd_dead_letter_write_errors_total{kind="transient"} 4"#), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_retried_up_to_the_configured_attempts_then_dead_lettered() {
    let sink = Arc::new(Recorder::default());
    let options = RunOptions { lookup_attempts: 3, ..RunOptions::default() };
    let p = lookup_pipeline(sink.clone(), Owners::new(Failure::Timeout), options);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut source = Script { events: poison_between_good_changes(), acked: acked.clone() };
    let seen = acked.clone();
    run_until(&p, &mut source, move || seen.lock().unwrap().last() == Some(&pos(30))).await;
    let letters = p.dead_letters.recorded.lock().unwrap().clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, DeadLetterReason::LookupAttemptsExhausted);
    assert_eq!(letters[0].attempts, 3);
    assert!(sink.applied.lock().unwrap().contains(&"owner:3".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_database_is_waited_for_and_never_dead_letters() {
    let sink = Arc::new(Recorder::default());
    let owners = Owners::new(Failure::Definite);
    *owners.unreachable.lock().unwrap() = 20;
    let options = RunOptions { lookup_attempts: 1, ..RunOptions::default() };
    let p = lookup_pipeline(sink.clone(), owners, options);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let events = [owned(1, 1, 10), owned(3, 3, 30)].into_iter().flatten().collect();
    let mut source = Script { events, acked: acked.clone() };
    let seen = acked.clone();
    run_until(&p, &mut source, move || seen.lock().unwrap().last() == Some(&pos(30))).await;
    assert!(p.dead_letters.recorded.lock().unwrap().is_empty());
    let applied = sink.applied.lock().unwrap().clone();
    assert!(applied.contains(&"owner:1".to_owned()) && applied.contains(&"owner:3".to_owned()), "{applied:?}");
    let calls = *p.lookups.as_ref().unwrap().calls.lock().unwrap();
    assert!(calls > 20, "every failed call was retried: {calls}");
}

/// Transactions without end, the first with an effect and the others of a
/// table the graph does not know (no effect), counted as they are read.
struct Endless {
    read: Arc<std::sync::atomic::AtomicU64>,
    step: u64,
}

impl Source for Endless {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        tokio::task::yield_now().await;
        let step = self.step;
        self.step += 1;
        self.read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(match step % 3 {
            0 => SourceEvent::Begin,
            1 if step == 1 => insert(1),
            1 => SourceEvent::Change(Change::new("app.other", Operation::Insert, None, Some(Row::new()))),
            _ => SourceEvent::Commit { position: pos(step), commit_time_micros: None },
        })
    }
    async fn acknowledge(&mut self, _: &Position) -> Result<(), SourceError> {
        Ok(())
    }
}

/// Issue 11, item 13: while a batch is stuck on a sink that is down, the
/// next one is full at `max_effects` transactions even when they have no
/// effect, so reading stops: a source that holds every delivered message
/// until its acknowledgement (Kafka) holds a bounded number of them.
#[tokio::test]
async fn reading_stops_behind_a_stuck_batch_even_when_transactions_have_no_effect() {
    let sink = Arc::new(Recorder { failing: Mutex::new(u32::MAX), ..Recorder::default() });
    let p = pipeline(sink);
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut source = Endless { read: read.clone(), step: 0 };
    let shutdown = CancellationToken::new();
    let _ = tokio::time::timeout(Duration::from_millis(500), p.run_session(&mut source, &shutdown)).await;
    let read = read.load(std::sync::atomic::Ordering::Relaxed);
    let bound = 3 * 2 * p.options.batch.max_effects as u64 + 3;
    assert!(read <= bound, "read {read} events behind a stuck batch (bound {bound})");
}

#[test]
fn run_errors_keep_their_texts_and_carry_their_cause() {
    use std::error::Error as _;
    let sink = RunError::Sink(SinkError::Definite { target: "main".into(), message: "WRONGTYPE".into() });
    assert_eq!(sink.to_string(), "sink: main: WRONGTYPE");
    assert!(sink.source().is_some_and(|s| s.is::<SinkError>()));
    let order = RunError::OutOfOrder(OutOfOrder::NestedBegin);
    assert_eq!(order.to_string(), "source: a transaction began inside another");
    let letters = RunError::DeadLetter(DeadLetterError::Unreachable("refused".into()));
    assert_eq!(letters.to_string(), "dead letters: dead-letter database unreachable: refused");
    let broken = RunError::from(LookupStageError::Broken {
        error: LookupError::Timeout { field: "caches.x.depends[0].lookup".into(), timeout_ms: 5 },
        hint: policy::BROKEN_QUERY_HINT,
    });
    assert_eq!(
        broken.to_string(),
        "look-up: look-up of caches.x.depends[0].lookup timed out after 5 ms: the query cannot run for any change; fix the graph's look-up or the database schema"
    );
    let stage = broken.source().and_then(|s| s.downcast_ref::<LookupStageError>());
    assert!(stage.and_then(|s| s.source()).is_some_and(|s| s.is::<LookupError>()), "{broken:?}");
    let gave_up = RunError::from(LookupStageError::GaveUp(LookupError::Timeout {
        field: "caches.x.depends[0].lookup".into(),
        timeout_ms: 5,
    }));
    assert_eq!(gave_up.to_string(), "look-up: look-up of caches.x.depends[0].lookup timed out after 5 ms");
    assert!(
        matches!(RunError::from(LookupStageError::Cancelled), RunError::Cancelled),
        "shutdown during look-ups is the loop's own cancellation"
    );
    assert_eq!(RunError::NoLookupDatabase.to_string(), "look-up: the graph has look-ups but no database is configured");
}

/// A message at `at` that the source could not decode.
fn undecodable(at: u64) -> Undecodable {
    Undecodable {
        position: pos(at),
        reason: UndecodableReason::Decode,
        error: "the value is not JSON: EOF while parsing".into(),
        raw: crate::source::RawMessage { key: None, value: Some(b"{".to_vec()), headers: Vec::new() },
    }
}

/// Good transactions around a message that cannot be decoded (at 20).
fn undecodable_between_good_transactions() -> VecDeque<Result<SourceEvent, SourceError>> {
    let mut events: VecDeque<_> = tx(1, 10).into();
    events.push_back(Ok(SourceEvent::Undecodable(undecodable(20))));
    events.extend(tx(3, 30));
    events
}

/// Issue 12, deliverable 3: the run loop, not the source, dead-letters a
/// message that cannot be decoded, through its own retries, and its
/// position is acknowledged only once the letter is stored.
#[tokio::test(start_paused = true)]
async fn an_undecodable_message_is_acknowledged_only_after_its_dead_letter_is_recorded() {
    let sink = Arc::new(Recorder::default());
    let p = pipeline(sink.clone());
    *p.dead_letters.failing.lock().unwrap() = 4;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut source = Script { events: undecodable_between_good_transactions(), acked: acked.clone() };
    let (letters, seen) = (p.dead_letters.clone(), acked.clone());
    run_until(&p, &mut source, move || {
        let passed = seen.lock().unwrap().iter().any(|p| *p >= pos(20));
        let recorded = !letters.undecodable.lock().unwrap().is_empty();
        assert!(recorded || !passed, "acknowledged past the message before its dead letter was recorded");
        assert!(*letters.failing.lock().unwrap() == 0 || !passed, "acknowledged while the store was failing");
        seen.lock().unwrap().last() == Some(&pos(30))
    })
    .await;
    assert_eq!(p.dead_letters.undecodable.lock().unwrap().clone(), [undecodable(20)]);
    assert!(p.dead_letters.recorded.lock().unwrap().is_empty(), "no change was dead-lettered");
    let applied = sink.applied.lock().unwrap().clone();
    assert!(applied.contains(&"item:1".to_owned()) && applied.contains(&"item:3".to_owned()), "{applied:?}");
    let acked = acked.lock().unwrap().clone();
    assert!(acked.windows(2).all(|w| w[0] < w[1]), "acknowledged in order: {acked:?}");
    let metrics = p.metrics.encode().unwrap();
    assert!(metrics.contains(r#"evictd_dead_letter_write_errors_total{kind="transient"} 4"#), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn with_on_error_stop_an_undecodable_message_ends_the_run_unacknowledged() {
    let sink = Arc::new(Recorder::default());
    let mut p = pipeline(sink);
    p.options.on_error = OnError::Stop;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut source = Script { events: undecodable_between_good_transactions(), acked: acked.clone() };
    let end = p.run_session(&mut source, &CancellationToken::new()).await;
    match end {
        Err(e @ RunError::Undecodable { .. }) => assert_eq!(
            e.to_string(),
            "source: cannot decode the message at pg:0/14:0/14: the value is not JSON: EOF while parsing; \
             stopping without acknowledging it (dead_letter.on_error = \"stop\")"
        ),
        other => panic!("expected the daemon to stop, got {other:?}"),
    }
    assert!(acked.lock().unwrap().iter().all(|p| *p < pos(20)), "{:?}", acked.lock().unwrap());
    assert!(p.dead_letters.undecodable.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_message_inside_a_transaction_breaks_the_order() {
    let p = pipeline(Arc::new(Recorder::default()));
    let events = VecDeque::from([Ok(SourceEvent::Begin), Ok(SourceEvent::Undecodable(undecodable(20)))]);
    let mut source = Script { events, acked: Arc::default() };
    let end = p.run_session(&mut source, &CancellationToken::new()).await;
    assert!(matches!(end, Err(RunError::OutOfOrder(OutOfOrder::UndecodableInside(_)))), "{end:?}");
}
