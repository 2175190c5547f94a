//! `[redis.NAME]`: the Redis targets invalidations are applied to.

use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::issues::{Issues, is_identifier, positive};
use super::raw::RawRedis;
pub use crate::redis_tls::RedisTls;

#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub name: String,
    pub urls: Vec<SecretString>,
    pub cluster: bool,
    /// Time to live of fill-guard stamps; `None`: no stamps written.
    pub fill_guard_ttl: Option<Duration>,
    /// Where and how batches are broadcast; `None`: not at all.
    pub broadcast: Option<BroadcastConfig>,
    /// The wait for replicas or the AOF before a batch is confirmed;
    /// `None`: confirmed when the primary replied.
    pub durability: Option<Durability>,
    /// Whether an eviction policy that can evict evictd's keys stops start-up.
    pub eviction_check: EvictionCheck,
    /// `tls_ca_file`, `tls_cert_file`, `tls_key_file`: for `rediss://` URLs.
    pub tls: Option<RedisTls>,
}

/// What a pipeline waits for before its replies count as confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// Replicas that must have the pipeline's writes (`WAIT`).
    pub replicas: u32,
    /// `WAITAOF 1 replicas …`: fsynced to the AOF of the primary and of
    /// `replicas` replicas.
    pub aof: bool,
    /// The wait's timeout.
    pub timeout: Duration,
}

/// `[redis.NAME] eviction_check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionCheck {
    /// Start-up fails when the policy can evict evictd's keys.
    #[default]
    Refuse,
    /// Start-up logs a warning and goes on.
    Warn,
}

/// The broadcast of one Redis target (`docs/broadcast.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastConfig {
    /// The pub/sub channel; its keys are `evictd:bc:{channel}:…`.
    pub channel: String,
    pub max_keys: usize,
    pub transport: Transport,
    /// `MAXLEN ~` of the channel's stream.
    pub stream_max_len: u64,
    /// Time between two heartbeats.
    pub heartbeat: Duration,
}

impl BroadcastConfig {
    /// A channel with the defaults of every other setting.
    pub fn new(channel: impl Into<String>) -> BroadcastConfig {
        BroadcastConfig {
            channel: channel.into(),
            max_keys: 10_000,
            transport: Transport::Both,
            stream_max_len: 100_000,
            heartbeat: Duration::from_millis(1000),
        }
    }
}

/// `[redis.NAME] broadcast_transport`: where a batch's message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Pub/sub and the channel's stream.
    #[default]
    Both,
    /// Pub/sub only: immediate, lost while a subscriber is away.
    PubSub,
    /// The stream only: replayable; no heartbeats are published.
    Stream,
}

impl Transport {
    /// As the publish script takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Both => "both",
            Transport::PubSub => "pubsub",
            Transport::Stream => "stream",
        }
    }

    /// Whether messages (and heartbeats) are published on pub/sub.
    pub fn pubsub(self) -> bool {
        self != Transport::Stream
    }
}

/// Validates `[redis.NAME]`; `None` when it has no usable URL.
pub(crate) fn validate_redis(
    name: String,
    target: RawRedis,
    issues: &mut Issues<'_>,
    base: &Path,
) -> Option<RedisTarget> {
    let field = format!("redis.{name}");
    if !is_identifier(&name) {
        issues.push(&field, format!("target name `{name}` must use lowercase letters, digits and `_`"));
    }
    let Some(url) = issues.secret(&format!("{field}.url"), target.url, target.url_file.as_deref(), base) else {
        if !issues.list.iter().any(|i| i.field.starts_with(&field)) {
            issues.push(&field, "needs `url` (or `url_file`)");
        }
        return None;
    };
    let cluster = target.cluster.unwrap_or(false);
    let urls: Vec<SecretString> =
        url.expose_secret().split(',').map(|u| SecretString::from(u.trim().to_owned())).collect();
    if urls.len() > 1 && !cluster {
        issues.push(&format!("{field}.url"), "several URLs are only for a Cluster: set `cluster = true`");
    }
    for u in &urls {
        if let Err(e) = ::redis::Client::open(u.expose_secret()) {
            let reason = e.to_string().replace(u.expose_secret(), "****");
            issues.push(&format!("{field}.url"), format!("not a Redis URL ({reason})"));
        }
    }
    let fill_guard_ttl = target.fill_guard.unwrap_or(true).then(|| {
        Duration::from_millis(positive(issues, &format!("{field}.fill_guard_ttl_ms"), target.fill_guard_ttl_ms, 60_000))
    });
    let channel = target.broadcast_channel.unwrap_or_else(|| "evictd:invalidations".to_owned());
    if channel.is_empty() {
        issues.push(
            &format!("{field}.broadcast_channel"),
            "must not be empty (set `broadcast = false` to turn the broadcast off)",
        );
    } else if channel.contains('}') {
        // The channel is the Cluster hash tag of its keys, `evictd:bc:{C}:…`.
        issues.push(&format!("{field}.broadcast_channel"), "must not contain `}` (it is the hash tag of its keys)");
    }
    let max_keys =
        positive(issues, &format!("{field}.broadcast_max_keys"), target.broadcast_max_keys.map(|v| v as u64), 10_000)
            as usize;
    let transport = match target.broadcast_transport.as_deref().unwrap_or("both") {
        "both" => Transport::Both,
        "pubsub" => Transport::PubSub,
        "stream" => Transport::Stream,
        other => {
            issues.push(
                &format!("{field}.broadcast_transport"),
                format!("unknown value `{other}` (expected both, pubsub or stream)"),
            );
            Transport::Both
        }
    };
    let stream_max_len =
        positive(issues, &format!("{field}.broadcast_stream_max_len"), target.broadcast_stream_max_len, 100_000);
    let heartbeat = Duration::from_millis(positive(
        issues,
        &format!("{field}.broadcast_heartbeat_ms"),
        target.broadcast_heartbeat_ms,
        1000,
    ));
    let broadcast = target.broadcast.unwrap_or(true).then_some(BroadcastConfig {
        channel,
        max_keys,
        transport,
        stream_max_len,
        heartbeat,
    });
    let wait_timeout =
        Duration::from_millis(positive(issues, &format!("{field}.wait_timeout_ms"), target.wait_timeout_ms, 1000));
    let replicas = target.wait_replicas.unwrap_or(0);
    let aof = target.wait_aof.unwrap_or(false);
    let durability = (replicas > 0 || aof).then_some(Durability { replicas, aof, timeout: wait_timeout });
    let eviction_check = match target.eviction_check.as_deref().unwrap_or("refuse") {
        "refuse" => EvictionCheck::Refuse,
        "warn" => EvictionCheck::Warn,
        other => {
            issues
                .push(&format!("{field}.eviction_check"), format!("unknown value `{other}` (expected refuse or warn)"));
            EvictionCheck::Refuse
        }
    };
    let tls = validate_tls(&field, &urls, target.tls_ca_file, target.tls_cert_file, target.tls_key_file, issues, base);
    Some(RedisTarget { name, urls, cluster, fill_guard_ttl, broadcast, durability, eviction_check, tls })
}

/// `tls_ca_file`, `tls_cert_file` and `tls_key_file`, relative to the
/// config file's directory; they only make sense for `rediss://` URLs.
fn validate_tls(
    field: &str,
    urls: &[SecretString],
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    issues: &mut Issues<'_>,
    base: &Path,
) -> Option<RedisTls> {
    if ca.is_none() && cert.is_none() && key.is_none() {
        return None;
    }
    if urls.iter().any(|u| !u.expose_secret().starts_with("rediss://")) {
        issues.push(&format!("{field}.url"), "tls_ca_file, tls_cert_file and tls_key_file need rediss:// URLs (TLS)");
    }
    let mut file = |name: &str, path: Option<String>| {
        let path = base.join(path?);
        if !path.is_file() {
            issues.push(&format!("{field}.{name}"), format!("no such file: {}", path.display()));
        }
        Some(path)
    };
    let ca_file = file("tls_ca_file", ca);
    let client_cert = match (file("tls_cert_file", cert), file("tls_key_file", key)) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            issues.push(&format!("{field}.tls_cert_file"), "tls_cert_file and tls_key_file go together");
            None
        }
    };
    Some(RedisTls { ca_file, client_cert })
}
