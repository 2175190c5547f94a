//! Error classification: every failure of a Redis target becomes a
//! [`SinkError`], transient (retry with backoff, pause the source) or
//! definite (retrying will not help; an operator must act), whose
//! `#[source]` is a typed [`RedisCause`].
//!
//! **Invariants:** unclassified means transient (style guide); no message
//! carries a target URL or password: a client error's text is scrubbed of
//! the target's URLs when the cause is built, and the other causes carry
//! only evictd's own texts, keys and the server's replies.

use std::time::Duration;

use redis::{ErrorKind, ParsingError, RedisError, ServerErrorKind, Value};

use super::durability::WaitError;
use super::plan::PlanError;
use crate::sink::SinkError;

/// Which way a failure goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Transient,
    Definite,
}

/// Error codes (the first word of a server error) that retrying cannot fix.
const DEFINITE_CODES: &[&str] = &["WRONGTYPE", "NOAUTH", "WRONGPASS", "NOPERM", "EVICTD_NOT_A_VERSION"];

/// Classifies a Redis client or server error.
pub(crate) fn classify(err: &RedisError) -> Class {
    if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal() {
        return Class::Transient;
    }
    match err.kind() {
        ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Parse
        | ErrorKind::UnexpectedReturnType => Class::Definite,
        ErrorKind::Server(kind) => match kind {
            ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask => Class::Transient,
            // `ERR`: syntax, unknown command or option (a Redis too old for
            // `PEXPIRE … LT`), a failing script. The one `ERR` that passes
            // is the server's client limit.
            ServerErrorKind::ResponseError => {
                if err.detail().is_some_and(|d| d.contains("max number of clients")) {
                    Class::Transient
                } else {
                    Class::Definite
                }
            }
            ServerErrorKind::ExecAbort
            | ServerErrorKind::NoScript
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NotBusy
            | ServerErrorKind::NoSub
            | ServerErrorKind::NoPerm => Class::Definite,
            _ => Class::Transient,
        },
        ErrorKind::Extension => match err.code() {
            Some(code) if DEFINITE_CODES.contains(&code) => Class::Definite,
            // OOM, BUSY (a long script), anything new: wait and retry.
            _ => Class::Transient,
        },
        _ => Class::Transient,
    }
}

/// Why a Redis target did not confirm: the `#[source]` of its
/// [`SinkError`]. Each text is the one the daemon has always logged.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisCause {
    /// The client failed or the server answered an error while doing
    /// `what` (a refusing script included: `EVICTD_NOT_A_VERSION`).
    /// `detail` is the error's text with the target's URLs scrubbed.
    #[error("{what}: {detail}")]
    Redis {
        what: String,
        detail: String,
        #[source]
        error: RedisError,
    },
    /// No reply within the command timeout: the target hangs or is gone.
    #[error("{what}: no reply within {} ms", after.as_millis())]
    Timeout { what: String, after: Duration },
    /// A reply that is not what the command returns: a protocol surprise.
    #[error("{what}: unexpected reply {reply:?}")]
    UnexpectedReply { what: String, reply: Value },
    /// A pipeline answered with another number of replies than it had
    /// commands.
    #[error("{what}: {replies} replies to {commands} commands")]
    ReplyCount { what: String, replies: usize, commands: usize },
    #[error("a standalone target takes one URL, got {0}")]
    StandaloneUrls(usize),
    /// `evictd:source:<slot>` holds something else than a record.
    #[error("{key} is not a source record: {error}")]
    NotASourceRecord {
        key: String,
        #[source]
        error: ParsingError,
    },
    /// The batch cannot be planned (an `expire` cache without a TTL).
    #[error("{0}")]
    Plan(#[source] PlanError),
    #[error("encoding the broadcast: {0}")]
    Broadcast(#[source] serde_json::Error),
    /// The durability wait reached fewer replicas (or AOFs) than asked.
    #[error("{what}: {error}")]
    Durability {
        what: String,
        #[source]
        error: WaitError,
    },
    /// A version key of a batch holds something else, and its cache's
    /// namespace cannot be bumped instead (`what`: the pipeline).
    #[error("{what}: {key} holds something else than a version")]
    NotAVersion { what: String, key: String },
    /// A namespace key (evictd's own) holds something else than a version.
    #[error(
        "{key} holds something else than a version; evictd keeps its own keys there: delete it (a missing key reads as version 0)"
    )]
    NamespaceNotAVersion { key: String },
}

/// Builds [`SinkError`]s for one target, scrubbing its URLs from messages.
#[derive(Debug, Clone)]
pub(crate) struct Errors {
    target: String,
    /// URL texts (with passwords) that must never appear in a message.
    secrets: Vec<String>,
}

impl Errors {
    pub(crate) fn new(target: &str, secrets: Vec<String>) -> Errors {
        Errors { target: target.to_owned(), secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect() }
    }

    fn scrub(&self, mut message: String) -> String {
        for secret in &self.secrets {
            if message.contains(secret.as_str()) {
                message = message.replace(secret.as_str(), "****");
            }
        }
        message
    }

    pub(crate) fn make(&self, class: Class, cause: RedisCause) -> SinkError {
        let target = self.target.clone();
        match class {
            Class::Transient => SinkError::transient(target, cause),
            Class::Definite => SinkError::definite(target, cause),
        }
    }

    /// A Redis error while doing `what`.
    pub(crate) fn redis(&self, what: &str, error: RedisError) -> SinkError {
        let detail = self.scrub(error.to_string());
        self.make(classify(&error), RedisCause::Redis { what: what.to_owned(), detail, error })
    }

    /// No reply within the command timeout: the target hangs or is gone.
    pub(crate) fn timeout(&self, what: &str, after: Duration) -> SinkError {
        self.make(Class::Transient, RedisCause::Timeout { what: what.to_owned(), after })
    }

    /// A reply that is not what the command returns: a protocol surprise.
    pub(crate) fn unexpected(&self, what: &str, reply: &Value) -> SinkError {
        self.make(Class::Definite, RedisCause::UnexpectedReply { what: what.to_owned(), reply: reply.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &str) -> RedisError {
        // Parse a real RESP error line, as the client would.
        let line = format!("-{code} {detail}\r\n");
        let value = redis::parse_redis_value(line.as_bytes()).expect("an error line parses");
        match value {
            redis::Value::ServerError(e) => e.into(),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn overload_and_topology_changes_are_transient() {
        for (code, detail) in [
            ("TRYAGAIN", "Multiple keys request during rehashing of slot"),
            ("CLUSTERDOWN", "The cluster is down"),
            ("LOADING", "Redis is loading the dataset in memory"),
            ("MASTERDOWN", "Link with MASTER is down"),
            ("OOM", "command not allowed when used memory > 'maxmemory'."),
            ("BUSY", "Redis is busy running a script."),
            ("ERR", "max number of clients reached"),
        ] {
            assert_eq!(classify(&server(code, detail)), Class::Transient, "{code}");
        }
    }

    #[test]
    fn type_script_and_auth_errors_are_definite() {
        for (code, detail) in [
            ("WRONGTYPE", "Operation against a key holding the wrong kind of value"),
            ("ERR", "user_script:1: Script attempted to access nonexistent global variable"),
            ("EVICTD_NOT_A_VERSION", "v:1 holds a value that is not a decimal version"),
            ("NOAUTH", "Authentication required."),
            ("WRONGPASS", "invalid username-password pair or user is disabled."),
            ("NOPERM", "this user has no permissions to run the 'unlink' command"),
            ("ERR", "Unsupported option LT"),
        ] {
            assert_eq!(classify(&server(code, detail)), Class::Definite, "{code}");
        }
    }

    #[test]
    fn io_errors_are_transient() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(classify(&RedisError::from(refused)), Class::Transient);
    }

    #[test]
    fn messages_never_show_a_url() {
        let errors = Errors::new("eu", vec!["redis://:hunter2@10.0.0.1:6379".to_owned()]);
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "cannot reach redis://:hunter2@10.0.0.1:6379");
        let e = errors.redis("connecting", RedisError::from(refused));
        assert_eq!(e.to_string(), "eu: connecting: cannot reach ****");
    }

    #[test]
    fn a_sink_error_carries_its_typed_cause() {
        use std::error::Error as _;
        let errors = Errors::new("eu", Vec::new());
        let e = errors.redis("pipeline of 1 commands", server("WRONGTYPE", "Operation against a key"));
        assert!(matches!(e, SinkError::Definite { .. }), "{e:?}");
        let cause = e.source().and_then(|c| c.downcast_ref::<RedisCause>());
        let Some(RedisCause::Redis { error, .. }) = cause else { panic!("not a Redis cause: {e:?}") };
        assert_eq!(error.code(), Some("WRONGTYPE"));
        assert!(cause.and_then(|c| c.source()).is_some_and(|s| s.is::<RedisError>()));
        let late = errors.timeout("reading INFO", Duration::from_millis(250));
        assert_eq!(late.to_string(), "eu: reading INFO: no reply within 250 ms");
    }
}
