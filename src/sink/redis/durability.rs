//! The durability wait (`[redis.NAME] wait_replicas`, `wait_aof`): what
//! ends every pipeline of a batch's invalidations, and how its reply is read.
//!
//! A primary's reply says only that the primary applied the writes.
//! Replication is asynchronous and `appendfsync everysec` flushes once a
//! second, so a failover or a crash can lose writes evictd already
//! confirmed, and with them the source position it acknowledged.
//! `WAIT n timeout` returns how many replicas acknowledged every write of
//! the connection so far; `WAITAOF 1 n timeout` (Redis 7.2+) how many of the
//! local AOF and the replicas' AOFs fsynced them.
//!
//! **Invariant:** a pipeline whose wait reached fewer than asked is a
//! transient failure (the batch is retried and not acknowledged); every
//! command evictd sends is idempotent, so the retry is safe.

use redis::{Pipeline, Value};

use super::error::Class;
use crate::config::Durability;

/// Appends the wait to a pipeline, after its writes.
pub(crate) fn push(pipe: &mut Pipeline, wait: &Durability) {
    let timeout_ms = u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX).max(1);
    if wait.aof {
        pipe.cmd("WAITAOF").arg(1).arg(wait.replicas).arg(timeout_ms);
    } else {
        pipe.cmd("WAIT").arg(wait.replicas).arg(timeout_ms);
    }
}

/// Why a wait did not confirm its pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WaitError {
    #[error("durability wait: {got} of {want} replica(s) acknowledged the writes within {timeout_ms} ms")]
    Replicas { got: i64, want: u32, timeout_ms: u128 },
    #[error("durability wait: the primary did not fsync the writes to its AOF within {timeout_ms} ms")]
    LocalAof { timeout_ms: u128 },
    #[error("durability wait: unexpected reply {0}")]
    Unexpected(String),
}

impl WaitError {
    /// Too few acknowledgements is a state of the servers that passes
    /// (a replica reconnects, a disk catches up); a reply of another shape
    /// is a protocol surprise.
    pub(crate) fn class(&self) -> Class {
        match self {
            WaitError::Replicas { .. } | WaitError::LocalAof { .. } => Class::Transient,
            WaitError::Unexpected(_) => Class::Definite,
        }
    }
}

/// Reads the wait's reply (the pipeline's last).
pub(crate) fn check(wait: &Durability, reply: Option<&Value>) -> Result<(), WaitError> {
    let timeout_ms = wait.timeout.as_millis();
    let (local, replicas) = match (wait.aof, reply) {
        (false, Some(Value::Int(n))) => (None, *n),
        (true, Some(Value::Array(parts))) => match parts.as_slice() {
            [Value::Int(local), Value::Int(replicas)] => (Some(*local), *replicas),
            _ => return Err(WaitError::Unexpected(format!("{reply:?}"))),
        },
        _ => return Err(WaitError::Unexpected(format!("{reply:?}"))),
    };
    if local.is_some_and(|l| l < 1) {
        return Err(WaitError::LocalAof { timeout_ms });
    }
    if replicas < i64::from(wait.replicas) {
        return Err(WaitError::Replicas { got: replicas, want: wait.replicas, timeout_ms });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn wait(replicas: u32, aof: bool) -> Durability {
        Durability { replicas, aof, timeout: Duration::from_millis(250) }
    }

    fn commands(pipe: &Pipeline) -> Vec<String> {
        let packed = pipe.get_packed_pipeline();
        String::from_utf8_lossy(&packed)
            .split("\r\n")
            .filter(|p| !p.starts_with(['*', '$']))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_wait_is_wait_for_replicas_and_waitaof_for_the_aof() {
        let mut pipe = redis::pipe();
        push(&mut pipe, &wait(2, false));
        assert_eq!(commands(&pipe)[..3], ["WAIT", "2", "250"]);
        let mut pipe = redis::pipe();
        push(&mut pipe, &wait(1, true));
        assert_eq!(commands(&pipe)[..4], ["WAITAOF", "1", "1", "250"]);
    }

    #[test]
    fn fewer_acknowledgements_than_asked_are_transient() {
        assert_eq!(check(&wait(2, false), Some(&Value::Int(2))), Ok(()));
        assert_eq!(check(&wait(2, false), Some(&Value::Int(3))), Ok(()));
        let short = check(&wait(2, false), Some(&Value::Int(1))).unwrap_err();
        assert_eq!(short, WaitError::Replicas { got: 1, want: 2, timeout_ms: 250 });
        assert_eq!(short.class(), Class::Transient);
        assert_eq!(short.to_string(), "durability wait: 1 of 2 replica(s) acknowledged the writes within 250 ms");

        let aof = |l, r| Value::Array(vec![Value::Int(l), Value::Int(r)]);
        assert_eq!(check(&wait(1, true), Some(&aof(1, 1))), Ok(()));
        assert_eq!(check(&wait(0, true), Some(&aof(1, 0))), Ok(()));
        assert_eq!(check(&wait(0, true), Some(&aof(0, 0))), Err(WaitError::LocalAof { timeout_ms: 250 }));
        assert!(matches!(check(&wait(1, true), Some(&aof(1, 0))), Err(WaitError::Replicas { got: 0, .. })));
    }

    #[test]
    fn a_reply_of_another_shape_is_definite() {
        for reply in [None, Some(Value::Okay), Some(Value::Array(vec![Value::Int(1)]))] {
            let err = check(&wait(1, true), reply.as_ref()).unwrap_err();
            assert_eq!(err.class(), Class::Definite, "{reply:?}");
        }
        assert_eq!(check(&wait(1, false), Some(&Value::Nil)).unwrap_err().class(), Class::Definite);
    }
}
