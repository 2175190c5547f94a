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
            lose_membership: CancellationToken::new(),
            shutdown: shutdown.clone(),
        }
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

    async fn start(&self) -> Result<Fake, StartError> {
        self.start_times.lock().unwrap().push(Instant::now());
        let next = self.starts.lock().unwrap().pop_front();
        match next {
            Some(Start::Lost) => Ok(Fake { lose: true }),
            Some(Start::Quiet) => Ok(Fake { lose: false }),
            Some(Start::Transient) => Err(StartError::Transient("down".into())),
            Some(Start::Definite { refused }) => Err(StartError::Definite { message: "no".into(), refused }),
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

    fn log_stepped_down(&self) {
        self.note("stepped down");
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
async fn a_definite_start_error_stops_with_the_exit_code_it_asks_for() {
    for (refused, code) in [(true, 2), (false, 1)] {
        let shutdown = CancellationToken::new();
        let sessions = Scripted::<true>::new(vec![Start::Definite { refused }], &shutdown);
        let error = supervise(&sessions, &pipeline(), &shutdown).await.unwrap_err();
        let got = match error {
            DaemonError::Refused(_) => 2,
            DaemonError::Failed(_) => 1,
        };
        assert_eq!(got, code);
        assert_eq!(sessions.log(), ["acquired", "released"]);
    }
}
