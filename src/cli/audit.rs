//! The audit of operator commands (`invalidate`, `slot drop`, `retire`,
//! `dead-letters replay|purge`): every action that changes something is
//! recorded in three places, whatever its outcome.
//!
//! - **A log line** on stderr (target `evictd::audit`, at `info` whatever
//!   `EVICTD_LOG` says, in the config's `log.format`), naming who ran it
//!   (`user`, `uid`, `host`): [`line`].
//! - **An entry of the stream `evictd:audit`** on each Redis target, and
//! - **a count** in the hash `evictd:audit:actions` (field
//!   `<action>|<outcome>`), which every running daemon exports as
//!   `evictd_operator_actions_total{target,action,outcome}` (`docs/metrics.md`),
//!   so an emergency flush shows on the dashboards of the pods that did not
//!   run it.
//!
//! The Redis half is best-effort: a target that cannot take it is reported on
//! stderr, and the action's own outcome stands (the log line is always
//! written first). Commands that write their own stream entry (`invalidate`)
//! call [`crate::sink::redis::RedisSink::audit`] themselves; the others note
//! each action with [`record`] and the command line writes them all when the
//! command returns ([`flush`]).

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::config::{Config, LogFormat, RedisTarget};

/// Who runs the command: `$USER` (or `$LOGNAME`), the uid, the host name.
pub(crate) fn who() -> (String, String, String) {
    use std::os::unix::fs::MetadataExt as _;
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_default();
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid().to_string()).unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    (user, uid, host)
}

/// Runs `emit` (a `tracing` event of target `evictd::audit`) under a
/// subscriber of its own that writes it to stderr in `format`, at `info`
/// whatever `EVICTD_LOG` says.
pub(crate) fn line(format: LogFormat, emit: impl Fn()) {
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("evictd::audit=info"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => tracing::subscriber::with_default(builder.json().finish(), emit),
        LogFormat::Text => tracing::subscriber::with_default(builder.finish(), emit),
    }
}

/// What the command that loaded a config audits to: its log format and
/// Redis targets, set once by [`audit_as`].
struct Destination {
    format: LogFormat,
    targets: Vec<RedisTarget>,
}

static DESTINATION: OnceLock<Destination> = OnceLock::new();

/// Actions noted by [`record`] and not yet written to Redis.
static PENDING: Mutex<Vec<Vec<(&'static str, String)>>> = Mutex::new(Vec::new());

/// Audit lines follow `config`'s `log.format` from now on, and the actions
/// go to its Redis targets.
pub(crate) fn audit_as(config: &Config) {
    let _ = DESTINATION.set(Destination { format: config.log.format, targets: config.redis.clone() });
}

/// Audits one action: who (`user`, `uid`, `host`), the `action`, its
/// `object` (slot, publication, group, table or topic), the `outcome` and a
/// `detail`. The log line now; the Redis entry and count at [`flush`].
pub(crate) fn record(action: &str, object: &str, outcome: &str, detail: &str) {
    let (user, uid, host) = who();
    let format = DESTINATION.get().map_or(LogFormat::Text, |d| d.format);
    line(format, || {
        tracing::info!(
            target: "evictd::audit",
            action, object, outcome, detail,
            user = %user, uid = %uid, host = %host,
            "operator action"
        );
    });
    let entry = vec![
        ("action", action.to_owned()),
        ("object", object.to_owned()),
        ("outcome", outcome.to_owned()),
        ("detail", detail.to_owned()),
        ("user", user),
        ("uid", uid),
        ("host", host),
    ];
    if let Ok(mut pending) = PENDING.lock() {
        pending.push(entry);
    }
}

/// How long [`flush`] waits for each target.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes the actions [`record`] noted to every Redis target of the
/// config given to [`audit_as`]: one stream entry and one count each. A
/// target that cannot take them is reported on stderr; nothing fails.
pub(crate) fn flush() {
    let entries = PENDING.lock().map(|mut pending| std::mem::take(&mut *pending)).unwrap_or_default();
    let Some(destination) = DESTINATION.get() else { return };
    if entries.is_empty() || destination.targets.is_empty() {
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("warning: the audit entries were not written to Redis: {e}");
            return;
        }
    };
    runtime.block_on(async {
        for target in &destination.targets {
            let written = tokio::time::timeout(REDIS_TIMEOUT, async {
                let sink = crate::sink::redis::RedisSink::connect(target).await?;
                for entry in &entries {
                    sink.audit(entry).await?;
                }
                Ok::<_, crate::sink::SinkError>(())
            })
            .await;
            let error = match written {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {REDIS_TIMEOUT:?}"),
            };
            eprintln!("warning: redis.{}: could not write the audit entries: {error}", target.name);
        }
    });
}
