//! The session model-checked: a fake source and sink drive [`Session`]
//! through random schedules, and the invariants of `session.rs` are checked
//! after every step.
//!
//! A schedule is a random run of 1 to 3 sessions over one stream of
//! transactions (with keepalives between them). At each step one of the
//! inputs the driver could see next is chosen at random: the source's next
//! event, a `next()` dropped because another branch won (the source is
//! cancel-safe, so the event is offered again later), the batch in flight
//! confirmed, failing for good, or abandoned by a stop while it retried
//! (transient sink failures are retried inside the batch task: to the
//! session they are only delay), time passing, the source quiet, the source
//! failing (transient: the session ends and the next one resumes after what
//! was acknowledged; definite: the daemon stops), shutdown and step-down.
//! One transaction in ten is a message the source could not decode, and one
//! session in ten stops on such a message (`on_error = "stop"`).

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::change::{Lsn, Operation, Row, Value};
use crate::source::{RawMessage, UndecodableReason};

/// How many schedules `every_schedule_keeps_the_session_invariants` runs;
/// `EVICTD_SESSION_SCHEDULES` overrides it (e.g. a million, by hand).
const SCHEDULES: u64 = 100_000;

/// SplitMix64: a small, seedable generator, so a failing schedule is
/// reproduced from its seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn pos(n: u64) -> Position {
    Position::Postgres { commit_lsn: Lsn(n), lsn: Lsn(n) }
}

/// A transaction of the stream: its commit position and the effects (ids)
/// of its changes.
#[derive(Debug, Clone)]
struct Tx {
    commit: u64,
    effects: Vec<u32>,
    /// A message the source could not decode, in place of a transaction.
    undecodable: bool,
}

/// A fake batch: each transaction's commit and effects.
type RecordedBatch = Vec<(u64, Vec<u32>)>;

/// The fake assembler: a transaction is the ids of its changes, a batch the
/// transactions it holds.
struct Recording {
    full_at: usize,
}

impl Assemble for Recording {
    type Transaction = Vec<u32>;
    type Batch = RecordedBatch;

    fn open(&mut self) -> Vec<u32> {
        Vec::new()
    }

    fn add(&mut self, transaction: &mut Vec<u32>, change: Change) {
        let id = match change.after.as_ref().and_then(|row| row.get("id").known()) {
            Some(Value::Int(id)) => *id as u32,
            other => panic!("fake change without an id: {other:?}"),
        };
        transaction.push(id);
    }

    fn new_batch(&mut self, _id: u64) -> Self::Batch {
        Vec::new()
    }

    fn commit(&mut self, batch: &mut Self::Batch, transaction: Vec<u32>, position: Position, _: Option<i64>) {
        batch.push((position.version(), transaction));
    }

    fn undecodable(&mut self, batch: &mut Self::Batch, message: Undecodable) {
        batch.push((message.position.version(), Vec::new()));
    }

    fn is_full(&self, batch: &Self::Batch) -> bool {
        batch.len() >= self.full_at
    }
}

/// The source's stream: each transaction as Begin, its changes, Commit,
/// sometimes followed by a keepalive.
fn events_of(stream: &[Tx], keepalives: &[bool]) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    for (tx, keepalive) in stream.iter().zip(keepalives) {
        if tx.undecodable {
            events.push(SourceEvent::Undecodable(Undecodable {
                position: pos(tx.commit),
                reason: UndecodableReason::Decode,
                error: "not JSON".into(),
                raw: RawMessage { key: None, value: Some(b"{".to_vec()), headers: Vec::new() },
            }));
            if *keepalive {
                events.push(SourceEvent::Idle { position: pos(tx.commit + 5) });
            }
            continue;
        }
        events.push(SourceEvent::Begin);
        for id in &tx.effects {
            let row = Row::new().with("id", Value::Int(i64::from(*id)));
            let mut change = Change::new("t", Operation::Insert, None, Some(row));
            change.position = pos(tx.commit - 1);
            events.push(SourceEvent::Change(change));
        }
        events.push(SourceEvent::Commit { position: pos(tx.commit), commit_time_micros: None });
        if *keepalive {
            events.push(SourceEvent::Idle { position: pos(tx.commit + 5) });
        }
    }
    events
}

/// What the whole run (every session of one schedule) saw.
#[derive(Default)]
struct World {
    /// Transactions (by index) whose effects every sink confirmed.
    confirmed: Vec<bool>,
    /// The last position acknowledged to the source, over all sessions.
    acknowledged: Option<u64>,
    /// Counts, for the report.
    steps: u64,
    dropped_nexts: u64,
    stops: u64,
}

/// Why a schedule's run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// A session ended by a stop: the run is over.
    Stopped,
    /// The daemon stopped on an injected definite failure.
    Failed,
    /// The stream was played to its end and everything was acknowledged.
    Drained,
}

fn index_of(stream: &[Tx], commit: u64) -> usize {
    stream.iter().position(|t| t.commit == commit).unwrap_or_else(|| panic!("no transaction commits at {commit}"))
}

/// The longest prefix of the stream that is confirmed.
fn confirmed_prefix(world: &World) -> usize {
    world.confirmed.iter().take_while(|c| **c).count()
}

/// Checks an acknowledgement: it is past the last one, and every
/// transaction up to it is confirmed.
fn check_ack(world: &mut World, stream: &[Tx], position: &Position, seed: u64) {
    let at = position.version();
    if let Some(last) = world.acknowledged {
        assert!(at > last, "seed {seed}: acknowledged {at} after {last}");
    }
    for (i, tx) in stream.iter().enumerate() {
        if tx.commit <= at {
            assert!(world.confirmed[i], "seed {seed}: acknowledged {at} with transaction {} unconfirmed", tx.commit);
        }
    }
    world.acknowledged = Some(at);
}

/// Runs one schedule; returns how it ended.
fn run_schedule(seed: u64, world: &mut World) -> Outcome {
    let mut rng = Rng(seed);
    let n = 1 + rng.below(8) as usize;
    let stream: Vec<Tx> = (0..n)
        .map(|i| {
            let undecodable = rng.chance(10);
            let changes = if undecodable { 0 } else { rng.below(4) };
            Tx {
                commit: 100 * (i as u64 + 1),
                effects: (0..changes).map(|_| rng.below(50) as u32).collect(),
                undecodable,
            }
        })
        .collect();
    let keepalives: Vec<bool> = (0..n).map(|_| rng.chance(30)).collect();
    let events = events_of(&stream, &keepalives);
    world.confirmed = vec![false; n];
    world.acknowledged = None;
    let sessions = 1 + rng.below(3);
    let base = Instant::now();
    let mut now = base;
    for session_no in 0..sessions {
        let last_session = session_no + 1 == sessions;
        let full_at = 1 + rng.below(4) as usize;
        let max_delay = Duration::from_millis(rng.below(5));
        let on_error = if rng.chance(10) { OnError::Stop } else { OnError::DeadLetter };
        let mut session = Session::new(Recording { full_at }, max_delay, on_error);
        // Delivery resumes after what was acknowledged (at-least-once).
        let mut cursor = match world.acknowledged {
            None => 0,
            Some(acked) => events
                .iter()
                .position(|e| match e {
                    SourceEvent::Commit { position, .. } | SourceEvent::Idle { position } => position.version() > acked,
                    SourceEvent::Undecodable(message) => message.position.version() > acked,
                    _ => false,
                })
                .map_or(events.len(), |i| {
                    // Back to the Begin of the transaction that commits there.
                    let mut j = i;
                    while j > 0
                        && !matches!(
                            events[j],
                            SourceEvent::Begin | SourceEvent::Idle { .. } | SourceEvent::Undecodable(_)
                        )
                    {
                        j -= 1;
                    }
                    j
                }),
        };
        let mut in_flight: Option<(u64, RecordedBatch)> = None;
        let mut stopped = false;
        // Committed transactions this session delivered, in order.
        let mut delivered: Vec<u64> = Vec::new();
        let mut dispatched: Vec<u64> = Vec::new();
        let mut abandoned = false;
        for _ in 0..400 {
            world.steps += 1;
            // The inputs the driver could see next.
            let mut choices: Vec<u8> = vec![3];
            if session.reading() && cursor < events.len() {
                choices.extend([0, 0, 0, 0, 1]);
            }
            if session.reading() {
                choices.push(2);
            }
            if in_flight.is_some() {
                choices.extend([4, 4, 4, 5]);
                if stopped {
                    choices.push(6);
                }
            }
            if session.wants_quiet() {
                choices.push(7);
            }
            if !stopped && rng.chance(if last_session { 10 } else { 3 }) {
                choices.push(8);
            }
            let input = match choices[rng.below(choices.len() as u64) as usize] {
                0 => {
                    let event = events[cursor].clone();
                    cursor += 1;
                    match &event {
                        SourceEvent::Commit { position, .. } => delivered.push(position.version()),
                        SourceEvent::Undecodable(message) if on_error == OnError::DeadLetter => {
                            delivered.push(message.position.version())
                        }
                        _ => {}
                    }
                    Input::Event(event)
                }
                1 => {
                    world.dropped_nexts += 1;
                    continue;
                }
                2 => {
                    if rng.chance(10) && !last_session {
                        Input::SourceFailed(SourceError::definite("boom"))
                    } else if !last_session {
                        Input::SourceFailed(SourceError::transient("connection reset"))
                    } else {
                        continue;
                    }
                }
                3 => {
                    now += Duration::from_millis(rng.below(3));
                    Input::Tick
                }
                4 => {
                    let (id, batch) = in_flight.take().unwrap();
                    for (commit, effects) in &batch {
                        let i = index_of(&stream, *commit);
                        assert_eq!(effects, &stream[i].effects, "seed {seed}: a batch holds whole transactions");
                        world.confirmed[i] = true;
                    }
                    Input::BatchDone { id, outcome: BatchOutcome::Confirmed }
                }
                5 => {
                    if rng.chance(95) {
                        // A transient failure: retried inside the task; time passes.
                        now += Duration::from_millis(1);
                        Input::Tick
                    } else {
                        let (id, _) = in_flight.take().unwrap();
                        Input::BatchDone { id, outcome: BatchOutcome::Failed(RunError::Cancelled) }
                    }
                }
                6 => {
                    let (id, _) = in_flight.take().unwrap();
                    abandoned = true;
                    Input::BatchDone { id, outcome: BatchOutcome::Abandoned }
                }
                7 => Input::Quiet,
                _ => {
                    stopped = true;
                    world.stops += 1;
                    Input::Stop
                }
            };
            let injected_failure = match &input {
                Input::SourceFailed(e) => !e.is_transient(),
                Input::BatchDone { outcome: BatchOutcome::Failed(_), .. } => true,
                Input::Event(SourceEvent::Undecodable(_)) => on_error == OnError::Stop,
                _ => false,
            };
            if let Err(e) = session.step(input, now) {
                assert!(injected_failure, "seed {seed}: the session failed on its own: {e}");
                return Outcome::Failed;
            }
            while let Some(action) = session.next_action() {
                match action {
                    Action::Dispatch { id, batch } => {
                        assert!(in_flight.is_none(), "seed {seed}: two batches in flight");
                        assert!(!batch.is_empty(), "seed {seed}: an empty batch");
                        dispatched.extend(batch.iter().map(|(commit, _)| *commit));
                        in_flight = Some((id, batch));
                    }
                    Action::Acknowledge(position) => check_ack(world, &stream, &position, seed),
                    Action::End(SessionEnd::SourceLost(_)) => {
                        // The acknowledged prefix is confirmed (checked at
                        // each ack); the next session resumes after it.
                        if last_session {
                            panic!("seed {seed}: the last session lost its source without a failure injected");
                        }
                        break;
                    }
                    Action::End(SessionEnd::Shutdown) => {
                        assert!(stopped, "seed {seed}: ended as shut down without a stop");
                        // Exactly the confirmed prefix was acknowledged.
                        let prefix = confirmed_prefix(world);
                        if prefix > 0 {
                            let expected = stream[prefix - 1].commit;
                            assert!(
                                world.acknowledged.is_some_and(|a| a >= expected),
                                "seed {seed}: stopped with {:?} acknowledged, below the confirmed prefix {expected}",
                                world.acknowledged
                            );
                        }
                        if !abandoned {
                            // A clean stop flushed every complete transaction.
                            assert_eq!(
                                delivered, dispatched,
                                "seed {seed}: a complete transaction was not sent at stop"
                            );
                            for commit in &delivered {
                                assert!(
                                    world.confirmed[index_of(&stream, *commit)],
                                    "seed {seed}: {commit} unconfirmed at a clean stop"
                                );
                            }
                        }
                        return Outcome::Stopped;
                    }
                }
            }
            if session.ended {
                break;
            }
            if last_session
                && cursor == events.len()
                && in_flight.is_none()
                && !session.wants_quiet()
                && confirmed_prefix(world) == n
            {
                let last_commit = stream[n - 1].commit;
                assert!(
                    world.acknowledged.is_some_and(|a| a >= last_commit),
                    "seed {seed}: drained but acknowledged only {:?}",
                    world.acknowledged
                );
                return Outcome::Drained;
            }
        }
        if !session.ended && last_session {
            return Outcome::Stopped;
        }
    }
    Outcome::Stopped
}

#[test]
fn every_schedule_keeps_the_session_invariants() {
    let schedules = std::env::var("EVICTD_SESSION_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(SCHEDULES);
    let mut world = World::default();
    let mut outcomes = [0u64; 3];
    for seed in 0..schedules {
        let outcome = run_schedule(seed, &mut world);
        outcomes[outcome as usize] += 1;
    }
    println!(
        "session model check: {schedules} schedules, {} steps ({} dropped next() calls, {} stops); ended stopped {}, failed {}, drained {}",
        world.steps, world.dropped_nexts, world.stops, outcomes[0], outcomes[1], outcomes[2]
    );
    assert!(outcomes.iter().all(|n| *n > 0), "every kind of ending is reached: {outcomes:?}");
}

#[test]
fn a_batch_that_fills_stops_the_reading_while_another_is_in_flight() {
    let now = Instant::now();
    let mut session = Session::new(Recording { full_at: 1 }, Duration::from_secs(10), OnError::DeadLetter);
    for (i, event) in events_of(
        &[
            Tx { commit: 100, effects: vec![1], undecodable: false },
            Tx { commit: 200, effects: vec![2], undecodable: false },
        ],
        &[false, false],
    )
    .into_iter()
    .enumerate()
    {
        assert!(session.reading(), "event {i}");
        session.step(Input::Event(event), now).unwrap();
    }
    // The first batch went out when it filled; the second is full behind it.
    assert!(matches!(session.next_action(), Some(Action::Dispatch { id: 1, .. })));
    assert!(!session.reading());
    session.step(Input::BatchDone { id: 1, outcome: BatchOutcome::Confirmed }, now).unwrap();
    assert!(matches!(session.next_action(), Some(Action::Acknowledge(p)) if p == pos(100)));
    assert!(matches!(session.next_action(), Some(Action::Dispatch { id: 2, .. })));
}

#[test]
fn a_keepalive_is_acknowledged_only_when_nothing_is_waiting() {
    let now = Instant::now();
    let mut session = Session::new(Recording { full_at: 10 }, Duration::from_secs(10), OnError::DeadLetter);
    let events = events_of(&[Tx { commit: 100, effects: vec![1], undecodable: false }], &[true]);
    for event in events {
        session.step(Input::Event(event), now).unwrap();
    }
    // The transaction waits for its deadline: the keepalive after it moves nothing.
    assert!(session.next_action().is_none());
    session.step(Input::Tick, now + Duration::from_secs(10)).unwrap();
    assert!(matches!(session.next_action(), Some(Action::Dispatch { id: 1, .. })));
    session.step(Input::BatchDone { id: 1, outcome: BatchOutcome::Confirmed }, now).unwrap();
    assert!(matches!(session.next_action(), Some(Action::Acknowledge(p)) if p == pos(100)));
    session.step(Input::Event(SourceEvent::Idle { position: pos(150) }), now).unwrap();
    assert!(matches!(session.next_action(), Some(Action::Acknowledge(p)) if p == pos(150)));
}
