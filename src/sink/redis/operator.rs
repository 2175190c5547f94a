//! What an operator command (`evictd invalidate`) asks of a target besides
//! a batch: the live registrations of a tag, for the blast radius of a dry
//! run, and the audit entry of the action.
//!
//! **Invariants:** reading a registry changes nothing (`ZCOUNT`, `ZRANGE`
//! only) and counts what the sink's tag invalidation would read: the
//! registrations whose score is at or after now − [`GRACE_MS`](super::tags::GRACE_MS);
//! the audit stream is capped (`MAXLEN ~`), so it never grows without bound.

use super::layout::{AUDIT_ACTIONS, AUDIT_STREAM, AUDIT_STREAM_MAX_LEN, tag_key};
use super::{RedisSink, now_ms, tags};
use crate::sink::SinkError;

/// A tag's live registrations on one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRegistrations {
    /// How many keys the tag's invalidation would delete now.
    pub count: u64,
    /// The first of them (by expiry), at most the limit asked for.
    pub first: Vec<String>,
}

impl RedisSink {
    /// The live registrations under `tag`: their count and the first
    /// `limit` keys. Read-only.
    pub async fn tag_registrations(&self, tag: &str, limit: usize) -> Result<TagRegistrations, SinkError> {
        let registry = tag_key(tag);
        let from = now_ms().saturating_sub(tags::GRACE_MS);
        let mut pipe = redis::pipe();
        pipe.cmd("ZCOUNT").arg(&registry).arg(from).arg("+inf");
        pipe.cmd("ZRANGE").arg(&registry).arg(from).arg("+inf").arg("BYSCORE").arg("LIMIT").arg(0).arg(limit);
        let replies = self.inner.runner_without_wait().pipeline(&format!("reading {registry}"), &mut pipe).await?;
        let mut replies = replies.into_iter();
        let count = match replies.next() {
            Some(redis::Value::Int(n)) => u64::try_from(n).unwrap_or(0),
            other => {
                let reply = other.unwrap_or(redis::Value::Nil);
                return Err(self.inner.errors.unexpected(&format!("ZCOUNT {registry}"), &reply));
            }
        };
        let reply = replies.next().unwrap_or(redis::Value::Nil);
        let first = match redis::from_redis_value::<Vec<Vec<u8>>>(reply.clone()) {
            Ok(keys) => keys.into_iter().map(|k| String::from_utf8_lossy(&k).into_owned()).collect(),
            Err(_) => return Err(self.inner.errors.unexpected(&format!("ZRANGE {registry}"), &reply)),
        };
        Ok(TagRegistrations { count, first })
    }

    /// Appends one entry (field, value pairs) to the audit stream
    /// [`AUDIT_STREAM`], capped at about [`AUDIT_STREAM_MAX_LEN`] entries,
    /// and counts it in [`AUDIT_ACTIONS`] under its `action` and `outcome`
    /// fields.
    pub async fn audit(&self, fields: &[(&str, String)]) -> Result<(), SinkError> {
        let field = |name: &str| fields.iter().find(|(f, _)| *f == name).map_or("", |(_, v)| v.as_str());
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("XADD").arg(AUDIT_STREAM).arg("MAXLEN").arg("~").arg(AUDIT_STREAM_MAX_LEN).arg("*");
        for (field, value) in fields {
            cmd.arg(*field).arg(value);
        }
        pipe.cmd("HINCRBY").arg(AUDIT_ACTIONS).arg(action_field(field("action"), field("outcome"))).arg(1);
        self.inner.runner_without_wait().pipeline(&format!("XADD {AUDIT_STREAM}"), &mut pipe).await?;
        Ok(())
    }

    /// The counts of [`AUDIT_ACTIONS`]: `(action, outcome, count)`, for
    /// `evictd_operator_actions_total`. Read-only.
    pub(crate) async fn operator_actions(&self) -> Result<Vec<(String, String, u64)>, SinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(AUDIT_ACTIONS);
        let replies = self.inner.runner_without_wait().pipeline(&format!("HGETALL {AUDIT_ACTIONS}"), &mut pipe).await?;
        let reply = replies.into_iter().next().unwrap_or(redis::Value::Nil);
        let counts: Vec<(String, String)> = match redis::from_redis_value(reply.clone()) {
            Ok(counts) => counts,
            Err(_) => return Err(self.inner.errors.unexpected(&format!("HGETALL {AUDIT_ACTIONS}"), &reply)),
        };
        Ok(counts
            .into_iter()
            .filter_map(|(field, count)| {
                let (action, outcome) = field.split_once('|')?;
                Some((action.to_owned(), outcome.to_owned(), count.parse().ok()?))
            })
            .collect())
    }
}

/// The field of [`AUDIT_ACTIONS`] counting `action` with `outcome`.
fn action_field(action: &str, outcome: &str) -> String {
    format!("{action}|{outcome}")
}
