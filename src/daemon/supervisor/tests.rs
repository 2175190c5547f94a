//! The supervisor against scripted sessions, on tokio's paused clock: what
//! it must keep from the two loops it replaced (membership released after
//! the sessions, the backoff rules of each source, the exit codes).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::change::{Position, Value};
use crate::dead_letter::{DeadLetter, DeadLetterError};
use crate::diagnostic::SourceFile;
use crate::graph::Lookup;
use crate::graph::load::load_sources;
use crate::lookup::{LookupError, LookupOutcome};
use crate::metrics::Metrics;
use crate::run::RunOptions;
use crate::server::Health;
use crate::sink::{SinkBatch, SinkError};
use crate::source::{SourceError, SourceEvent, Undecodable};

const GRAPH: &str = r#"
[tables."app.items"]
key = ["id"]
columns = ["id"]

[caches.item]
key = "item:{id}"
[[caches.item.depends]]
table = "app.items"
"#;

/// A session's source: lost at once (`lose`), or quiet until stopped.
struct Fake {
    lose: bool,
}

impl Source for Fake {
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        if self.lose {
            return Err(SourceError::transient("gone"));
        }
        std::future::pending().await
    }
    async fn acknowledge(&mut self, _: &Position) -> Result<(), SourceError> {
        Ok(())
    }
}

#[derive(Clone)]
enum Start {
    Lost,
    Quiet,
    Transient,
    Definite { refused: bool },
}

/// Scripted starts; records what happened, in order, with the time of each
/// start. `CONNECTS` is [`Sessions::START_CONNECTS`].
struct Scripted<const CONNECTS: bool> {
    starts: Mutex<VecDeque<Start>>,
    log: Arc<Mutex<Vec<String>>>,
    start_times: Mutex<Vec<Instant>>,
    acquire_times: Mutex<Vec<Instant>>,
    /// [`Sessions::step_down`].
    step_down: Option<StepDown>,
    /// Cancelled by the test to make the holder lose the membership.
    lose_membership: CancellationToken,
    /// Cancelled once the script is used up: the test's shutdown.
    shutdown: CancellationToken,
}

impl<const CONNECTS: bool> Scripted<CONNECTS> {
    fn new(starts: Vec<Start>, shutdown: &CancellationToken) -> Self {
        Scripted {
            starts: Mutex::new(starts.into()),
            log: Arc::default(),
            start_times: Mutex::default(),
            acquire_times: Mutex::default(),
            step_down: None,
            lose_membership: CancellationToken::new(),
            shutdown: shutdown.clone(),
        }
    }
    /// Gives membership up after `after` ms of failing sessions, standing
    /// aside `aside` ms.
    fn stepping_down(mut self, after: u64, aside: u64) -> Self {
        self.step_down = Some(StepDown { after: Duration::from_millis(after), aside: Duration::from_millis(aside) });
        self
    }
    /// When membership was acquired, in ms since the first time.
    fn acquired_at(&self) -> Vec<u128> {
        let times = self.acquire_times.lock().unwrap();
        times.iter().map(|t| (*t - times[0]).as_millis()).collect()
    }
    fn note(&self, what: &str) {
        self.log.lock().unwrap().push(what.to_owned());
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    /// Pauses between consecutive starts, in ms.
    fn pauses(&self) -> Vec<u128> {
        let times = self.start_times.lock().unwrap();
        times.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect()
    }
}

impl<const CONNECTS: bool> Sessions for Scripted<CONNECTS> {
    type Source = Fake;
    type Membership = ();
    const START_CONNECTS: bool = CONNECTS;

    async fn acquire(&self, _: &CancellationToken) -> Option<()> {
        self.acquire_times.lock().unwrap().push(Instant::now());
        self.note("acquired");
        Some(())
    }

    fn hold(
        &self,
        (): (),
        stepped_down: CancellationToken,
        done: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (log, lose) = (self.log.clone(), self.lose_membership.clone());
        async move {
            tokio::select! {
                () = done.cancelled() => {}
                () = lose.cancelled() => {
                    stepped_down.cancel();
                    done.cancelled().await;
                }
            }
            log.lock().unwrap().push("released".into());
        }
    }

    fn step_down(&self) -> Option<StepDown> {
        self.step_down
    }

    async fn start(&self) -> Result<Fake, StartError> {
        self.start_times.lock().unwrap().push(Instant::now());
        let next = self.starts.lock().unwrap().pop_front();
        match next {
            Some(Start::Lost) => Ok(Fake { lose: true }),
            Some(Start::Quiet) => Ok(Fake { lose: false }),
            Some(Start::Transient) => Err(SourceSetupError::Transient("down".into()).into()),
            Some(Start::Definite { refused: true }) => Err(SourceSetupError::Publication("no".into()).into()),
            Some(Start::Definite { refused: false }) => Err(SourceSetupError::Definite("no".into()).into()),
            None => {
                self.shutdown.cancel();
                Ok(Fake { lose: false })
            }
        }
    }

    async fn close(&self, _: Fake, ended: Ended) {
        self.note(&format!("closed {ended:?}"));
    }

    fn log_lost(&self, _: &str) {}

    fn log_stepped_down(&self, why: SteppedDown) {
        match why {
            SteppedDown::Lost => self.note("stepped down"),
            SteppedDown::GaveUp(failing) => self.note(&format!("gave up after {} ms", failing.as_millis())),
        }
    }
}

struct Fine;

impl Sink for Fine {
    fn name(&self) -> &str {
        "ok"
    }
    async fn apply(&self, _: SinkBatch<'_>) -> Result<(), SinkError> {
        Ok(())
    }
}

impl LookupExecutor for Fine {
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

impl DeadLetterStore for Fine {
    async fn record(&self, _: &DeadLetter) -> Result<(), DeadLetterError> {
        Ok(())
    }
    async fn record_undecodable(&self, _: &Undecodable) -> Result<(), DeadLetterError> {
        Ok(())
    }
}

fn pipeline() -> Pipeline<Fine, Fine, Fine> {
    let graph = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
    let options = RunOptions { retry_max: Duration::from_millis(1600), ..RunOptions::default() };
    Pipeline {
        graph: Arc::new(graph),
        sink: Arc::new(Fine),
        lookups: None,
        dead_letters: Arc::new(Fine),
        options,
        metrics: Arc::new(Metrics::new()),
        health: Arc::new(Health::new(crate::server::HealthThresholds::default(), ["ok"])),
    }
}

#[tokio::test(start_paused = true)]
async fn a_connecting_source_retries_a_lost_session_after_the_first_pause_and_grows_only_on_failed_starts() {
    let shutdown = CancellationToken::new();
    let sessions = Scripted::<true>::new(
        vec![Start::Lost, Start::Transient, Start::Transient, Start::Lost, Start::Lost],
        &shutdown,
    );
    supervise(&sessions, &pipeline(), &shutdown).await.unwrap();
    // Lost → 100; a failed start after it → 100, then 200; a start that
    // connected resets: lost → 100, lost → 100.
    assert_eq!(sessions.pauses(), [100, 100, 200, 100, 100]);
}

#[tokio::test(start_paused = true)]
async fn a_source_whose_start_proves_nothing_backs_off_further_after_every_lost_session() {
    let shutdown = CancellationToken::new();
    let sessions = Scripted::<false>::new(vec![Start::Lost; 6], &shutdown);
    supervise(&sessions, &pipeline(), &shutdown).await.unwrap();
    assert_eq!(sessions.pauses(), [100, 200, 400, 800, 1600, 1600]);
}

#[tokio::test(start_paused = true)]
async fn membership_is_released_only_after_the_session_under_it_was_closed() {
    let shutdown = CancellationToken::new();
    let sessions = Scripted::<true>::new(vec![Start::Quiet], &shutdown);
    let lose = sessions.lose_membership.clone();
    let pipeline = pipeline();
    let supervised = supervise(&sessions, &pipeline, &shutdown);
    let stepping_down = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        lose.cancel();
    };
    let (result, ()) = tokio::join!(supervised, stepping_down);
    result.unwrap();
    // The step-down closes the session, then releases; the replica then
    // acquires again, and its next session ends with the shutdown.
    assert_eq!(
        sessions.log(),
        ["acquired", "closed Stopped", "released", "stepped down", "acquired", "closed Stopped", "released"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_definite_start_error_stops_with_the_exit_code_the_policy_gives() {
    for (refused, code) in [(true, 2), (false, 1)] {
        let shutdown = CancellationToken::new();
        let sessions = Scripted::<true>::new(vec![Start::Definite { refused }], &shutdown);
        let error = supervise(&sessions, &pipeline(), &shutdown).await.unwrap_err();
        assert!(matches!(error, DaemonError::Start(_)), "{error:?}");
        assert_eq!(error.exit_code(), code);
        assert_eq!(error.to_string(), "no");
        assert!(!error.hint().is_empty());
        assert_eq!(sessions.log(), ["acquired", "released"]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_record_that_cannot_be_read_is_retried_or_stops_as_the_sink_policy_says() {
    let unreachable = StartError::SourceRecord(SinkError::transient("eu", "connection refused"));
    assert_eq!(crate::policy::decide(unreachable.failure()).decision, crate::policy::Decision::Retry);
    let refused = DaemonError::Start(StartError::SourceRecord(SinkError::definite("eu", "NOPERM")));
    assert_eq!(refused.to_string(), "source record: eu: NOPERM");
    assert_eq!(refused.exit_code(), 1);
}

/// Issue 14: a replica whose replication connection is silent while its
/// lock works kept the lock for ever; now its failing sessions give it up
/// after the bound, it stands aside, then takes it again (no standby here)
/// with its backoff kept.
#[tokio::test(start_paused = true)]
async fn sessions_failing_past_the_bound_give_membership_up_and_stand_aside_before_acquiring_again() {
    let shutdown = CancellationToken::new();
    let sessions = Scripted::<true>::new(vec![Start::Transient; 6], &shutdown).stepping_down(3000, 300);
    supervise(&sessions, &pipeline(), &shutdown).await.unwrap();
    // Starts at 0, 100, 300, 700, 1500; the wait after the fifth would end
    // at 3100: the bound (3000 after the first failure) ends it. Aside
    // 300 ms, the next membership's first start at once (3300), and its
    // backoff goes on at 1600, not 100 (it was kept).
    assert_eq!(
        sessions.log(),
        ["acquired", "released", "gave up after 3000 ms", "acquired", "closed Stopped", "released"],
    );
    assert_eq!(sessions.acquired_at(), [0, 3300]);
    assert_eq!(sessions.pauses(), [100, 200, 400, 800, 1800, 1600]);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_connects_stops_the_step_down_clock() {
    let shutdown = CancellationToken::new();
    // Failing 0..700, a session that connects (then is lost), failing
    // again from 700: more than 1000 ms of failures in all, never 1000 in
    // a row.
    let starts =
        vec![Start::Transient, Start::Transient, Start::Transient, Start::Lost, Start::Transient, Start::Transient];
    let sessions = Scripted::<true>::new(starts, &shutdown).stepping_down(1000, 300);
    supervise(&sessions, &pipeline(), &shutdown).await.unwrap();
    assert_eq!(sessions.log(), ["acquired", "closed Lost", "closed Stopped", "released"]);
}

#[tokio::test(start_paused = true)]
async fn a_source_without_a_step_down_keeps_its_membership_however_long_sessions_fail() {
    let shutdown = CancellationToken::new();
    let sessions = Scripted::<false>::new(vec![Start::Transient; 12], &shutdown);
    supervise(&sessions, &pipeline(), &shutdown).await.unwrap();
    assert_eq!(sessions.log(), ["acquired", "closed Stopped", "released"]);
    assert!(sessions.pauses().iter().sum::<u128>() > 10_000);
}
