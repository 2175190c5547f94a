//! Whether evictd may stream from its slot, given what it recorded about
//! streaming it before.
//!
//! A slot is where the server keeps the changes evictd has not
//! acknowledged. When it is gone — dropped, a failover to a server without
//! failover slots, a restore — creating a new one starts at the current WAL
//! position, and every change committed since the last acknowledged one
//! would never be invalidated. So evictd keeps a
//! [`SourceRecord`](crate::sink::redis::record::SourceRecord) of each slot it
//! streamed in every Redis target (beside the versions it protects; it
//! survives restarts of evictd and the loss of the slot), and before
//! creating a slot, [`decide`]s:
//!
//! | slot    | record                | decision                                     |
//! |---------|-----------------------|----------------------------------------------|
//! | exists  | none, or any identity | stream (a new timeline or system is logged)  |
//! | missing | none                  | first run: create the slot                   |
//! | missing | on any target         | refuse, or with `on_slot_loss = "flush"`: flush |
//! | any     | a flush pending       | as for a missing slot                        |
//!
//! **Invariants:** a record is written only once the slot exists and before
//! the first acknowledgement of a session, so "streamed before" holds as
//! soon as anything could have been acknowledged; an unreadable record (an
//! unreachable target) is never taken for a missing one; a flush marks every
//! record first and is confirmed by every target before the record is
//! rewritten, so a crash in between flushes again.

use std::time::Duration;

use sqlx::Row as _;

use super::SourceSetupError;
use crate::change::Lsn;
use crate::config::{OnSlotLoss, PostgresSource as PostgresConfig};
use crate::sink::redis::record::{SourceRecord, source_key};

/// Who the server is, as far as a slot's history goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerIdentity {
    /// `pg_control_system().system_identifier`, or `unknown` when the role
    /// may not read it.
    pub(crate) system_identifier: String,
    /// The timeline of the last checkpoint (0 when unknown).
    pub(crate) timeline: u32,
    pub(crate) database: String,
    /// The server's WAL position now: the version of a flush.
    pub(crate) wal_lsn: Lsn,
}

/// The server's identity, and whether `config.slot` exists on it.
pub(crate) async fn inspect(config: &PostgresConfig) -> Result<(ServerIdentity, bool), SourceSetupError> {
    use secrecy::ExposeSecret as _;
    let options = crate::pgconn::connect_options(config.url.expose_secret())
        .await
        .map_err(|e| SourceSetupError::Definite(format!("source URL: {e}")))?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| {
            SourceSetupError::Transient(format!(
                "cannot connect to the source database: {}",
                crate::config::hide_passwords(&e.to_string())
            ))
        })?;
    let query = |e: sqlx::Error| SourceSetupError::Transient(format!("reading the server's identity: {e}"));
    let row = sqlx::query(
        "SELECT current_database() AS database,
                (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text AS lsn",
    )
    .fetch_one(&pool)
    .await
    .map_err(query)?;
    let database: String = row.try_get("database").map_err(query)?;
    let lsn: Option<String> = row.try_get("lsn").map_err(query)?;
    let wal_lsn = match lsn {
        Some(text) => {
            text.parse().map_err(|e| SourceSetupError::Definite(format!("the server's WAL position: {e}")))?
        }
        None => Lsn(0),
    };
    let control = sqlx::query(
        "SELECT s.system_identifier::text AS system, c.timeline_id AS timeline
         FROM pg_control_system() s, pg_control_checkpoint() c",
    )
    .fetch_one(&pool)
    .await;
    let (system_identifier, timeline) = match control {
        Ok(row) => {
            let system: String = row.try_get("system").map_err(query)?;
            let timeline: i32 = row.try_get("timeline").map_err(query)?;
            (system, u32::try_from(timeline).unwrap_or(0))
        }
        // Readable by every role by default; a hardened server may revoke it.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
            tracing::warn!(
                "cannot read pg_control_system() / pg_control_checkpoint(): the source record will not say which \
                 server and timeline evictd streamed from (GRANT EXECUTE on both to evictd's role)"
            );
            ("unknown".to_owned(), 0)
        }
        Err(e) => return Err(query(e)),
    };
    let exists = super::setup::read_slot(&pool, &config.slot).await?.is_some();
    pool.close().await;
    Ok((ServerIdentity { system_identifier, timeline, database, wal_lsn }, exists))
}

/// What to do before streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The slot exists: stream from it.
    Stream,
    /// No slot, and evictd never streamed it: create it.
    FirstRun,
    /// The slot was lost (or a flush did not finish) and the operator chose
    /// to flush: bump every namespace once the new slot exists.
    Flush,
    /// The slot was lost: stop, with this message.
    Refuse(String),
}

/// The decision for `slot`, given whether it exists and the records found
/// on the targets (a record on any target counts).
pub(crate) fn decide(slot: &str, exists: bool, records: &[SourceRecord], on_loss: OnSlotLoss) -> Decision {
    let pending = records.iter().any(|r| r.flush_pending);
    if exists && !pending {
        return Decision::Stream;
    }
    // The most recent stream evictd knows of.
    let Some(last) = records.iter().max_by_key(|r| r.last_streamed_ms) else { return Decision::FirstRun };
    match on_loss {
        OnSlotLoss::Flush => Decision::Flush,
        OnSlotLoss::Refuse if pending => Decision::Refuse(format!(
            "replication slot `{slot}` was lost and evictd started to bump every cache's namespace for it \
             (source.postgres.on_slot_loss = \"flush\"), but did not finish: set on_slot_loss = \"flush\" \
             again so that it finishes before streaming"
        )),
        OnSlotLoss::Refuse => Decision::Refuse(lost_message(slot, last)),
    }
}

/// What happened to a lost slot, and what to do.
fn lost_message(slot: &str, last: &SourceRecord) -> String {
    format!(
        "replication slot `{slot}` that evictd streamed from system {system} timeline {timeline} (database `{db}`) \
         since {first} is gone (last streamed {latest}): it was dropped, the server failed over without failover \
         slots, or it was restored from a backup. The changes committed since evictd's last acknowledged position \
         are lost to evictd, so caches may hold stale values. To go on: set source.postgres.on_slot_loss = \
         \"flush\" to bump every cache's namespace on every Redis target and stream from a new slot; or flush the \
         caches yourself and delete the record `{key}` on every target (redis-cli DEL {key}); or, after a \
         failover, point evictd at the server that still has the slot",
        system = last.system_identifier,
        timeline = last.timeline,
        db = last.database,
        first = format_utc(last.first_streamed_ms),
        latest = format_utc(last.last_streamed_ms),
        key = source_key(slot),
    )
}

/// A note when the slot is there but the server is not the recorded one:
/// failover slots on a promoted replica (new timeline), or an upgrade or
/// copy that kept the slot (new system). Streaming is safe: the slot kept
/// what evictd did not acknowledge.
pub(crate) fn moved(records: &[SourceRecord], server: &ServerIdentity) -> Option<String> {
    let last = records.iter().max_by_key(|r| r.last_streamed_ms)?;
    if last.system_identifier != server.system_identifier {
        Some(format!(
            "the slot is now on system {} (was {}): streaming from it",
            server.system_identifier, last.system_identifier
        ))
    } else if last.timeline != server.timeline {
        Some(format!("the slot is now on timeline {} (was {}): streaming from it", server.timeline, last.timeline))
    } else {
        None
    }
}

/// A new or updated record for a session on `server`: the identity and the
/// time are this session's, the first time and highest version are kept
/// unless `fresh` (a first run, a flush: a new stream).
pub(crate) fn session_record(
    slot: &str,
    previous: Option<&SourceRecord>,
    server: &ServerIdentity,
    now_ms: u64,
    fresh: bool,
) -> SourceRecord {
    let kept = previous.filter(|_| !fresh);
    SourceRecord {
        slot: slot.to_owned(),
        system_identifier: server.system_identifier.clone(),
        timeline: server.timeline,
        database: server.database.clone(),
        first_streamed_ms: kept.map_or(now_ms, |r| r.first_streamed_ms),
        last_streamed_ms: now_ms,
        highest_version: kept.map_or(0, |r| r.highest_version),
        flush_pending: false,
    }
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub(crate) fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(last: u64) -> SourceRecord {
        SourceRecord {
            slot: "evictd".into(),
            system_identifier: "7350".into(),
            timeline: 1,
            database: "app".into(),
            first_streamed_ms: 1_700_000_000_000,
            last_streamed_ms: last,
            highest_version: 99,
            flush_pending: false,
        }
    }

    #[test]
    fn a_missing_slot_is_created_only_on_a_first_run() {
        use OnSlotLoss::{Flush, Refuse};
        assert_eq!(decide("evictd", true, &[], Refuse), Decision::Stream);
        assert_eq!(decide("evictd", true, &[record(1)], Refuse), Decision::Stream);
        assert_eq!(decide("evictd", false, &[], Refuse), Decision::FirstRun);
        assert_eq!(decide("evictd", false, &[], Flush), Decision::FirstRun);
        assert_eq!(decide("evictd", false, &[record(1)], Flush), Decision::Flush);
        let Decision::Refuse(message) = decide("evictd", false, &[record(1), record(1_700_000_100_000)], Refuse) else {
            panic!("a lost slot was not refused");
        };
        assert!(message.starts_with("replication slot `evictd` that evictd streamed from system 7350 timeline 1"));
        assert!(message.contains("since 2023-11-14T22:13:20Z is gone (last streamed 2023-11-14T22:15:00Z)"));
        assert!(message.contains("on_slot_loss = \"flush\"") && message.contains("DEL evictd:source:evictd"));
    }

    #[test]
    fn an_unfinished_flush_is_finished_before_streaming_even_with_the_slot_there() {
        let pending = SourceRecord { flush_pending: true, ..record(1) };
        assert_eq!(decide("evictd", true, std::slice::from_ref(&pending), OnSlotLoss::Flush), Decision::Flush);
        assert!(
            matches!(decide("evictd", true, &[pending], OnSlotLoss::Refuse), Decision::Refuse(m) if m.contains("did not finish"))
        );
    }

    #[test]
    fn a_session_keeps_the_history_unless_it_starts_a_new_stream() {
        let server =
            ServerIdentity { system_identifier: "8000".into(), timeline: 2, database: "app".into(), wal_lsn: Lsn(5) };
        let old = record(10);
        let kept = session_record("evictd", Some(&old), &server, 20, false);
        assert_eq!(
            (kept.first_streamed_ms, kept.highest_version, kept.last_streamed_ms),
            (old.first_streamed_ms, 99, 20)
        );
        assert_eq!((kept.system_identifier.as_str(), kept.timeline), ("8000", 2));
        let fresh = session_record("evictd", Some(&old), &server, 20, true);
        assert_eq!((fresh.first_streamed_ms, fresh.highest_version), (20, 0));
        assert_eq!(
            moved(std::slice::from_ref(&old), &server).as_deref(),
            Some("the slot is now on system 8000 (was 7350): streaming from it")
        );
        let same = ServerIdentity { system_identifier: "7350".into(), timeline: 1, ..server };
        assert_eq!(moved(&[old], &same), None);
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
