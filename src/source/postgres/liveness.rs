//! Whether a silent replication stream is still alive.
//!
//! A replication connection can go silent without closing: a network that
//! drops its packets, a middlebox that forgot the flow. The server then
//! hears no status updates and ends our walsender after
//! `wal_sender_timeout`, but the client learns it only when TCP gives up
//! (about 15 minutes of retransmissions) or the network heals. Silence
//! alone proves nothing (an idle stream is quiet: the server sends a
//! keepalive only when it needs a reply, and our status updates keep it
//! from needing one), so the source asks the server, through a session
//! connection: once the stream has been silent for [`SILENT_FOR`], and
//! then every [`CHECK_EVERY`] while it stays silent, it reads the slot's
//! `active_pid`. A slot that is inactive, held by another walsender than
//! the one this session started, or gone, means the stream is dead: the
//! session ends as lost (a transient source error) and the supervisor
//! starts another.
//!
//! **Invariants:** the verdict is pure ([`alive`]); only what the server
//! says ends a session: a check that cannot reach the server (the session
//! path is down too) leaves the stream alone, and the lock's own check
//! steps the replica down then. A dead stream is seen at most
//! `wal_sender_timeout` + [`CHECK_EVERY`] (+ one check's round trip) after
//! it went silent; that bound is the operator's through
//! `wal_sender_timeout`, which is why these periods are not settings.

use std::time::Duration;

use tokio::time::Instant;

/// How long the stream stays silent before the slot is checked: short
/// against any sane `wal_sender_timeout` (the earliest a server ends a
/// silent walsender), long against a busy stream's gaps.
pub(crate) const SILENT_FOR: Duration = Duration::from_secs(2);

/// How often the slot is checked while the stream stays silent: one
/// catalog query (a read of shared memory on the server) per period on an
/// idle stream.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The longest one check may take before it counts as "cannot tell".
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The check's schedule: when the stream last delivered anything, and
/// when the slot was last checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Liveness {
    heard: Instant,
    checked: Option<Instant>,
}

impl Liveness {
    /// A stream that just started (its start counts as heard from).
    pub(crate) fn new(now: Instant) -> Liveness {
        Liveness { heard: now, checked: None }
    }

    /// Something arrived from the server.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.heard = now;
        self.checked = None;
    }

    /// The slot was checked (whatever the answer).
    pub(crate) fn checked(&mut self, now: Instant) {
        self.checked = Some(now);
    }

    /// When the next check is due if nothing arrives meanwhile.
    pub(crate) fn check_at(&self) -> Instant {
        let silent = self.heard + SILENT_FOR;
        match self.checked {
            Some(at) => silent.max(at + CHECK_EVERY),
            None => silent,
        }
    }

    /// How long the stream has been silent.
    pub(crate) fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.heard)
    }
}

/// The slot's `active_pid` (`None`: the slot does not exist).
pub(crate) async fn slot_walsender(pool: &sqlx::PgPool, slot: &str) -> Result<Option<Option<i32>>, sqlx::Error> {
    sqlx::query_scalar::<_, Option<i32>>("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
        .bind(slot)
        .fetch_optional(pool)
        .await
}

/// Whether the slot is still streamed to this session: `slot` is its
/// `active_pid` as read (`None`: the slot is gone; `Some(None)`: nobody
/// streams it), `ours` the walsender's pid read right after the start
/// (`None` when it could not be read: then any walsender counts).
pub(crate) fn alive(slot: Option<Option<i32>>, ours: Option<i32>) -> bool {
    match slot {
        None | Some(None) => false,
        Some(Some(pid)) => ours.is_none_or(|ours| ours == pid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_dead_once_its_slot_is_inactive_gone_or_another_walsenders() {
        assert!(alive(Some(Some(7)), Some(7)));
        assert!(alive(Some(Some(7)), None));
        assert!(!alive(Some(None), Some(7)), "the server ended our walsender");
        assert!(!alive(None, Some(7)), "the slot was dropped");
        assert!(!alive(Some(Some(8)), Some(7)), "another walsender streams the slot");
    }

    #[tokio::test(start_paused = true)]
    async fn the_slot_is_checked_after_a_silence_then_every_period_until_something_arrives() {
        let start = Instant::now();
        let mut l = Liveness::new(start);
        assert_eq!(l.check_at(), start + SILENT_FOR);
        let first = start + SILENT_FOR;
        l.checked(first);
        assert_eq!(l.check_at(), first + CHECK_EVERY);
        // A check that was itself slow does not bring the next one forward.
        l.checked(first + Duration::from_secs(3));
        assert_eq!(l.check_at(), first + Duration::from_secs(3) + CHECK_EVERY);
        assert_eq!(l.silent_for(first + Duration::from_secs(3)), SILENT_FOR + Duration::from_secs(3));
        // Anything from the server starts the silence over.
        let later = start + Duration::from_secs(10);
        l.heard(later);
        assert_eq!(l.check_at(), later + SILENT_FOR);
    }
}
