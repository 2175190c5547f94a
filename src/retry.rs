//! The one retry policy: how long to wait between attempts ([`Backoff`]).
//!
//! Every retry loop of the daemon waits through a [`Backoff`]: the run
//! loop's sinks, look-ups and dead-letter writes (the Kafka dead-letter
//! topic's included), the supervisor's session starts, the start-up waits
//! for Redis and the dead-letter database.
//!
//! **Invariants:** the first wait is `min`, each next one doubles, up to
//! `max` (a `min` above `max` is waited once, then `max`); every delay is
//! whole milliseconds, as the config gives them; jitter only ever adds
//! (at most a quarter of the delay), never shortens a wait; a wait given a
//! shutdown token ends as soon as it is cancelled, and the delay it would
//! have slept is not consumed.
//!
//! The doubling and capping are `backon`'s [`ExponentialBuilder`] (a kept
//! crate rather than hand-written helpers). `backon` computes in `f32`
//! seconds, so each delay is rounded back to the millisecond; its own
//! jitter (up to +100 %) is not used: the quarter is what the daemon has
//! always added.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// How much randomness a wait adds on top of its delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Jitter {
    /// Exactly the delay: start-up and supervisor waits, whose delays the
    /// tests pin.
    None,
    /// Up to a quarter more (whole milliseconds): the run loop's retries,
    /// so that sessions failing together do not retry together.
    UpToAQuarter,
}

/// Shutdown came during a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// Doubling delays from `min` up to `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: ExponentialBuilder,
    delays: <ExponentialBuilder as backon::BackoffBuilder>::Backoff,
    current: Duration,
    jitter: Jitter,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, jitter: Jitter) -> Backoff {
        let builder =
            ExponentialBuilder::new().with_min_delay(min).with_max_delay(max).with_factor(2.0).without_max_times();
        Backoff { builder, delays: builder.build(), current: min, jitter }.started()
    }

    /// The same delay every time: a poll, such as a standby's for the
    /// slot's lock.
    pub(crate) fn constant(delay: Duration) -> Backoff {
        Backoff::new(delay, delay, Jitter::None)
    }

    /// A new backoff with the same settings, starting at `min`: one per
    /// thing retried.
    pub(crate) fn fresh(&self) -> Backoff {
        Backoff { builder: self.builder, delays: self.builder.build(), current: self.current, jitter: self.jitter }
            .started()
    }

    fn started(mut self) -> Backoff {
        self.reset();
        self
    }

    /// The delay the next wait sleeps, jitter aside (what logs report).
    pub(crate) fn current(&self) -> Duration {
        self.current
    }

    /// Starts over at `min`.
    pub(crate) fn reset(&mut self) {
        self.delays = self.builder.build();
        self.current = self.next_delay();
    }

    /// Sleeps the current delay (plus jitter) unless `shutdown` comes
    /// first, then moves to the next, doubled delay.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> Result<(), Stopped> {
        tokio::select! {
            () = tokio::time::sleep(self.jittered()) => {
                self.advance();
                Ok(())
            }
            () = shutdown.cancelled() => Err(Stopped),
        }
    }

    fn advance(&mut self) {
        self.current = self.next_delay();
    }

    fn next_delay(&mut self) -> Duration {
        // Never `None` without a limit on the number of attempts; keep the
        // last delay if that ever changes.
        self.delays.next().map_or(self.current, whole_millis)
    }

    fn jittered(&self) -> Duration {
        match self.jitter {
            Jitter::None => self.current,
            Jitter::UpToAQuarter => {
                self.current + Duration::from_millis(fastrand::u64(0..=self.current.as_millis() as u64 / 4))
            }
        }
    }
}

/// `backon` doubles in `f32` seconds (100 ms becomes 100.000001 ms): back
/// to the whole milliseconds every configured delay is made of.
fn whole_millis(delay: Duration) -> Duration {
    Duration::from_millis((delay.as_secs_f64() * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delays(mut backoff: Backoff, n: usize) -> Vec<u128> {
        (0..n)
            .map(|_| {
                let d = backoff.current().as_millis();
                backoff.advance();
                d
            })
            .collect()
    }

    #[test]
    fn delays_double_from_min_up_to_max_in_whole_milliseconds() {
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5), Jitter::None);
        assert_eq!(delays(backoff, 10), [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1600), Jitter::None);
        for _ in 0..40 {
            assert_eq!(backoff.current().subsec_nanos() % 1_000_000, 0);
            backoff.advance();
        }
        assert_eq!(backoff.current(), Duration::from_millis(1600));
    }

    #[test]
    fn a_min_above_max_is_waited_once_then_max() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(30), Jitter::None);
        assert_eq!(delays(backoff, 3), [100, 30, 30]);
    }

    #[test]
    fn a_constant_backoff_never_grows() {
        assert_eq!(delays(Backoff::constant(Duration::from_millis(250)), 4), [250, 250, 250, 250]);
    }

    #[test]
    fn reset_starts_over_at_min() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), Jitter::None);
        backoff.advance();
        backoff.advance();
        assert_eq!(delays(backoff.fresh(), 2), [100, 200]);
        backoff.reset();
        assert_eq!(delays(backoff, 2), [100, 200]);
    }

    #[test]
    fn jitter_adds_at_most_a_quarter_and_never_shortens() {
        let backoff = Backoff::new(Duration::from_millis(400), Duration::from_secs(5), Jitter::UpToAQuarter);
        for _ in 0..1000 {
            let d = backoff.jittered();
            assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(500), "{d:?}");
        }
        let exact = Backoff::new(Duration::from_millis(400), Duration::from_secs(5), Jitter::None);
        assert_eq!(exact.jittered(), Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_wait_without_consuming_its_delay() {
        let mut backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(60), Jitter::None);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        assert_eq!(backoff.wait(&shutdown).await, Err(Stopped));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
