//! A source session as a pure state machine: what the run loop does about
//! each thing that happens, with no I/O and no clock of its own.
//!
//! ```text
//!   Input                                  Action
//!   ─────                                  ──────
//!   Event(Begin | Change | Commit |        Dispatch { id, batch }   start applying a batch
//!         Idle | Undecodable)        ──►   Acknowledge(position)    tell the source
//!   SourceFailed(error)                    End(SessionEnd)          the session is over
//!   BatchDone { id, outcome }
//!   Tick (now is given with every input)
//!   Quiet (the source had nothing ready)
//!   Stop (shutdown or step-down)
//! ```
//!
//! The driver (`run/mod.rs`) waits on the source, the batch task, the
//! deadline and the stop token, feeds what happened to [`Session::step`]
//! with the time, and carries out the actions [`Session::next_action`]
//! returns, in order. What a batch *is* stays outside: an [`Assemble`]
//! builds transactions and batches from changes (the daemon's resolves
//! them through the graph; the property test's records them).
//!
//! The rules, in priority order as the driver polls them:
//! 1. stop: no more reading; the open transaction is dropped (it will be
//!    replayed), the complete ones are sent, and once nothing is in flight
//!    the session ends;
//! 2. the batch in flight finished: if confirmed, the watermark moves and is
//!    acknowledged; a batch abandoned by a stop ends the session as it is;
//! 3. the next batch is due — full, past its deadline, the source quiet,
//!    or stopping — and nothing is in flight: it is dispatched;
//! 4. an undecodable message is put to the policy as it arrives: with
//!    `on_error = "dead_letter"` it joins the next batch as a transaction
//!    without effects, whose dead letter the batch task stores before the
//!    batch is confirmed; with `"stop"` the session fails before it;
//! 5. source events are read only while the next batch has room or nothing
//!    is in flight (back-pressure: a stalled sink stops the reading).
//!
//! A stop after a step-down is handled like a shutdown: the session keeps
//! the source (for Postgres, the slot's walsender) until it ends, so no
//! other replica streams meanwhile, and acknowledging what is confirmed
//! only spares the next owner work.
//!
//! **Invariants** (checked after every step by the property test beside
//! this file, over ≥ 100 000 random schedules):
//! - **a position is acknowledged only once every transaction up to it is
//!   confirmed** by the sinks;
//! - **acknowledgements strictly increase**;
//! - **a stopped session has acknowledged exactly its confirmed prefix**:
//!   the commit position of the last transaction before the first one not
//!   confirmed (or a later keepalive), never less, never more;
//! - at most one batch is in flight, and a batch holds whole transactions.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::{OutOfOrder, RunError, SessionEnd};
use crate::change::{Change, Position};
use crate::checkpoint::Watermark;
use crate::dead_letter::OnError;
use crate::policy::{self, Decision, Failure};
use crate::source::{SourceError, SourceEvent, Undecodable};

/// Builds transactions and batches out of changes: pure, no I/O.
pub(crate) trait Assemble {
    /// An open transaction's accumulated work.
    type Transaction;
    /// What is dispatched: whole transactions.
    type Batch;

    fn open(&mut self) -> Self::Transaction;
    fn add(&mut self, transaction: &mut Self::Transaction, change: Change);
    fn new_batch(&mut self, id: u64) -> Self::Batch;
    /// Adds a whole committed transaction to a batch.
    fn commit(
        &mut self,
        batch: &mut Self::Batch,
        transaction: Self::Transaction,
        position: Position,
        commit_time_micros: Option<i64>,
    );
    /// Adds a message the source could not decode, to be dead-lettered
    /// with the batch: a transaction without effects.
    fn undecodable(&mut self, batch: &mut Self::Batch, message: Undecodable);
    /// Whether the batch reached a size limit.
    fn is_full(&self, batch: &Self::Batch) -> bool;
}

/// Something that happened, for [`Session::step`].
#[derive(Debug)]
pub(crate) enum Input {
    /// `next()` yielded an event.
    Event(SourceEvent),
    /// `next()` failed.
    SourceFailed(SourceError),
    /// The batch task `id` finished.
    BatchDone { id: u64, outcome: BatchOutcome },
    /// Time passed (the open batch's deadline, a heartbeat).
    Tick,
    /// The source had nothing ready: send what is complete now.
    Quiet,
    /// Shutdown or step-down.
    Stop,
}

/// How a batch task ended.
#[derive(Debug)]
pub(crate) enum BatchOutcome {
    /// Every sink confirmed every effect (and its dead letters are stored).
    Confirmed,
    /// A stop came while it was still retrying: not confirmed, to be
    /// replayed by the next session.
    Abandoned,
    /// A failure that stops the daemon.
    Failed(RunError),
}

/// What the driver does next.
#[derive(Debug)]
pub(crate) enum Action<B> {
    /// Start applying a batch (nothing else is in flight).
    Dispatch { id: u64, batch: B },
    /// Every effect up to and including this position is confirmed.
    Acknowledge(Position),
    /// The session is over.
    End(SessionEnd),
}

/// The next batch, filling.
struct Filling<B> {
    id: u64,
    batch: B,
    opened: Instant,
    last: Position,
}

/// One source session's state.
pub(crate) struct Session<A: Assemble> {
    assemble: A,
    max_delay: Duration,
    on_error: OnError,
    open: Option<A::Transaction>,
    filling: Option<Filling<A::Batch>>,
    in_flight: Option<u64>,
    watermark: Watermark<Position>,
    acknowledged: Option<Position>,
    stopping: bool,
    ended: bool,
    next_id: u64,
    actions: VecDeque<Action<A::Batch>>,
}

impl<A: Assemble> Session<A> {
    /// A session whose batches go out at the latest `max_delay` after their
    /// first transaction, and whose undecodable messages are dead-lettered
    /// or stop the daemon as `on_error` says.
    pub(crate) fn new(assemble: A, max_delay: Duration, on_error: OnError) -> Session<A> {
        Session {
            assemble,
            max_delay,
            on_error,
            open: None,
            filling: None,
            in_flight: None,
            watermark: Watermark::new(),
            acknowledged: None,
            stopping: false,
            ended: false,
            next_id: 1,
            actions: VecDeque::new(),
        }
    }

    /// Takes in one input at `now`; the actions it leads to are queued for
    /// [`Session::next_action`]. An error ends the daemon (safely: nothing
    /// unconfirmed was acknowledged).
    pub(crate) fn step(&mut self, input: Input, now: Instant) -> Result<(), RunError> {
        if self.ended {
            return Ok(());
        }
        match input {
            Input::Event(event) => self.on_event(event, now)?,
            Input::SourceFailed(error) => {
                return match policy::decide(Failure::Source(&error)).decision {
                    // Retried by the supervisor, in a new session.
                    Decision::Retry => {
                        self.end(SessionEnd::SourceLost(error));
                        Ok(())
                    }
                    Decision::DeadLetter(_) | Decision::Stop => Err(RunError::Source(error)),
                };
            }
            Input::BatchDone { id, outcome } => {
                if self.in_flight != Some(id) {
                    return Err(RunError::Watermark(crate::checkpoint::NotInFlight(id)));
                }
                self.in_flight = None;
                match outcome {
                    BatchOutcome::Confirmed => {
                        if let Some(position) = self.watermark.confirm(id).map_err(RunError::Watermark)? {
                            self.acknowledge(position);
                        }
                    }
                    BatchOutcome::Abandoned if self.stopping => {
                        self.end(SessionEnd::Shutdown);
                        return Ok(());
                    }
                    BatchOutcome::Abandoned => return Err(RunError::Cancelled),
                    BatchOutcome::Failed(error) => return Err(error),
                }
            }
            Input::Quiet => {
                if self.in_flight.is_none() {
                    self.dispatch();
                }
            }
            Input::Tick => {}
            Input::Stop => {
                if !self.stopping {
                    tracing::info!("shutting down: no more reading; flushing what is complete");
                }
                self.stopping = true;
                self.open = None;
            }
        }
        self.settle(now);
        Ok(())
    }

    /// The next thing to do, in order.
    pub(crate) fn next_action(&mut self) -> Option<Action<A::Batch>> {
        self.actions.pop_front()
    }

    /// Whether the driver should poll the source: not when stopping, and not
    /// while the next batch is full behind one in flight (back-pressure).
    pub(crate) fn reading(&self) -> bool {
        let backed_up = self.in_flight.is_some() && self.next_is_full();
        !(self.ended || self.stopping || backed_up)
    }

    /// When the next batch is due, if it is waiting for its deadline.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match (&self.filling, self.in_flight) {
            (Some(f), None) if !self.ended => Some(f.opened + self.max_delay),
            _ => None,
        }
    }

    /// Whether a [`Input::Quiet`] would send something: a batch is waiting
    /// and nothing is in flight.
    pub(crate) fn wants_quiet(&self) -> bool {
        !self.ended && !self.stopping && self.in_flight.is_none() && self.filling.is_some()
    }

    /// Whether a batch is in flight.
    pub(crate) fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping
    }

    fn on_event(&mut self, event: SourceEvent, now: Instant) -> Result<(), RunError> {
        match event {
            SourceEvent::Begin => {
                if self.open.is_some() {
                    return Err(RunError::OutOfOrder(OutOfOrder::NestedBegin));
                }
                self.open = Some(self.assemble.open());
            }
            SourceEvent::Change(change) => {
                let Some(open) = self.open.as_mut() else {
                    return Err(RunError::OutOfOrder(OutOfOrder::ChangeOutside(change.position)));
                };
                self.assemble.add(open, change);
            }
            SourceEvent::Commit { position, commit_time_micros } => {
                let Some(transaction) = self.open.take() else {
                    return Err(RunError::OutOfOrder(OutOfOrder::CommitOutside(position)));
                };
                self.open_batch(now, &position);
                if let Some(filling) = self.filling.as_mut() {
                    self.assemble.commit(&mut filling.batch, transaction, position.clone(), commit_time_micros);
                    filling.last = position;
                }
            }
            SourceEvent::Undecodable(message) => {
                if self.open.is_some() {
                    return Err(RunError::OutOfOrder(OutOfOrder::UndecodableInside(message.position)));
                }
                let failure = Failure::Undecodable { reason: message.reason, on_error: self.on_error };
                if !matches!(policy::decide(failure).decision, Decision::DeadLetter(_)) {
                    tracing::error!(
                        position = %message.position,
                        error = message.error,
                        "cannot decode this message; stopping without acknowledging it (on_error = stop)"
                    );
                    return Err(RunError::Undecodable {
                        position: message.position,
                        reason: message.reason,
                        error: message.error,
                    });
                }
                // Dead-lettered with its batch, which is confirmed only
                // once the letter is stored.
                let position = message.position.clone();
                self.open_batch(now, &position);
                if let Some(filling) = self.filling.as_mut() {
                    self.assemble.undecodable(&mut filling.batch, message);
                    filling.last = position;
                }
            }
            SourceEvent::Idle { position } => {
                // A keepalive between transactions: acknowledged only when
                // nothing is open, waiting or in flight.
                if self.open.is_none() && self.filling.is_none() && self.in_flight.is_none() && self.watermark.is_idle()
                {
                    self.acknowledge(position);
                }
            }
        }
        Ok(())
    }

    /// After every input: dispatch the next batch if it is due, and end a
    /// stopping session once nothing is left to wait for.
    fn settle(&mut self, now: Instant) {
        if self.ended || self.in_flight.is_some() {
            return;
        }
        let due = self.stopping
            || self.next_is_full()
            || self.filling.as_ref().is_some_and(|f| f.opened + self.max_delay <= now);
        if due {
            self.dispatch();
        }
        if self.stopping && self.in_flight.is_none() && self.filling.is_none() {
            self.end(SessionEnd::Shutdown);
        }
    }

    fn dispatch(&mut self) {
        if let Some(Filling { id, batch, last, .. }) = self.filling.take() {
            self.watermark.begin(id, last);
            self.in_flight = Some(id);
            self.actions.push_back(Action::Dispatch { id, batch });
        }
    }

    /// Opens the next batch now if there is none.
    fn open_batch(&mut self, now: Instant, position: &Position) {
        if self.filling.is_none() {
            let id = self.next_id;
            self.next_id += 1;
            self.filling =
                Some(Filling { id, batch: self.assemble.new_batch(id), opened: now, last: position.clone() });
        }
    }

    fn next_is_full(&self) -> bool {
        self.filling.as_ref().is_some_and(|f| self.assemble.is_full(&f.batch))
    }

    /// Queues an acknowledgement of `position` if it is past the last one.
    fn acknowledge(&mut self, position: Position) {
        if self.acknowledged.as_ref().is_some_and(|last| last.partial_cmp(&position) != Some(std::cmp::Ordering::Less))
        {
            return;
        }
        self.acknowledged = Some(position.clone());
        self.actions.push_back(Action::Acknowledge(position));
    }

    fn end(&mut self, end: SessionEnd) {
        self.ended = true;
        self.actions.push_back(Action::End(end));
    }
}

#[cfg(test)]
mod tests;
