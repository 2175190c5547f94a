//! The start-up check of a Redis target: what its `INFO` says about the
//! guarantee (`docs/redis-layout.md`, "What the guarantee needs from Redis").
//! `evictd run` and `evictd check` (unless `--offline`) run it on every
//! target, on every primary of a Cluster.
//!
//! - `maxmemory-policy`: `allkeys-*` can evict namespace and version keys,
//!   which have no TTL; an evicted one reads as version 0 and makes old
//!   values valid again. `volatile-*` evicts only keys with a TTL: evictd's
//!   are the fill-guard stamps (an evicted stamp only refuses a reader's
//!   fill, a miss: safe) and the tag registries (an evicted registry loses
//!   its registrations: its keys are never invalidated). So `allkeys-*`
//!   always, and `volatile-*` when the graph has tags, are refused (or only
//!   warned about, with `eviction_check = "warn"`). A policy that cannot be
//!   read (`INFO` and `CONFIG GET` refused, as on some managed services) is
//!   a warning.
//! - Neither AOF nor replicas: a warning (a restart loses what was
//!   invalidated since the last snapshot).
//! - `wait_aof` on a Redis older than 7.2 (no `WAITAOF`) or without
//!   `appendonly yes`: refused, whatever `eviction_check` says.
//!
//! [`assess`] is pure; [`inspect`] reads the facts.

use redis::Value;

use super::conn::Conn;
use super::error::Errors;
use crate::config::{EvictionCheck, RedisTarget};
use crate::sink::SinkError;

/// What one primary's `INFO` says; `None`: not reported (or not readable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeFacts {
    /// `host:port` on a Cluster; empty for a standalone target.
    pub(crate) node: String,
    pub(crate) version: Option<(u32, u32, u32)>,
    pub(crate) aof: Option<bool>,
    pub(crate) replicas: Option<u32>,
    pub(crate) policy: Option<String>,
}

impl NodeFacts {
    /// Reads the fields evictd needs from an `INFO` reply.
    pub(crate) fn parse(node: &str, info: &str) -> NodeFacts {
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(str::trim)
        };
        let version = field("redis_version").and_then(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0), parts.next().flatten().unwrap_or(0)))
        });
        NodeFacts {
            node: node.to_owned(),
            version,
            aof: field("aof_enabled").map(|v| v == "1"),
            replicas: field("connected_slaves").and_then(|v| v.parse().ok()),
            policy: field("maxmemory_policy").filter(|p| !p.is_empty()).map(str::to_owned),
        }
    }

    fn place(&self) -> String {
        if self.node.is_empty() { String::new() } else { format!(" on {}", self.node) }
    }
}

/// What the check found: warnings to log or print, errors that stop.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Findings {
    pub(crate) warnings: Vec<String>,
    pub(crate) errors: Vec<String>,
}

/// Judges a target's facts (pure). `tags`: whether the graph has tag
/// dependencies (then tag registries, which have a TTL, must not be evicted).
pub(crate) fn assess(target: &RedisTarget, nodes: &[NodeFacts], tags: bool) -> Findings {
    let mut out = Findings::default();
    let name = &target.name;
    for n in nodes {
        let place = n.place();
        let eviction = match n.policy.as_deref() {
            None => {
                out.warnings.push(format!(
                    "redis.{name}: maxmemory-policy could not be read{place} (INFO and CONFIG GET refused): make sure it is noeviction{}",
                    if tags { "" } else { " or volatile-*" }
                ));
                None
            }
            Some(p) if p.starts_with("allkeys-") => Some(format!(
                "redis.{name}: maxmemory-policy {p}{place} can evict evictd's own keys: an evicted namespace or version key reads as version 0 and makes old cached values valid again; set maxmemory-policy noeviction{}",
                if tags { "" } else { " (or volatile-*)" }
            )),
            Some(p) if p.starts_with("volatile-") && tags => Some(format!(
                "redis.{name}: maxmemory-policy {p}{place} can evict tag registries (they have a TTL), and the keys registered in an evicted one are never invalidated; set maxmemory-policy noeviction"
            )),
            Some(_) => None,
        };
        if let Some(message) = eviction {
            match target.eviction_check {
                EvictionCheck::Refuse => {
                    out.errors.push(format!("{message}, or eviction_check = \"warn\" to start anyway"))
                }
                EvictionCheck::Warn => out.warnings.push(message),
            }
        }
        if n.aof == Some(false) && n.replicas == Some(0) {
            out.warnings.push(format!(
                "redis.{name}: neither AOF nor replicas{place}: a restart of Redis loses the invalidations since its last snapshot, and values they removed can come back"
            ));
        }
        if let Some(wait) = &target.durability {
            if wait.aof {
                match n.version {
                    Some(v) if v >= (7, 2, 0) => {}
                    Some((a, b, c)) => out.errors.push(format!(
                        "redis.{name}: wait_aof needs Redis 7.2 or later (WAITAOF), but the server{place} runs {a}.{b}.{c}"
                    )),
                    None => out.errors.push(format!(
                        "redis.{name}: wait_aof needs Redis 7.2 or later (WAITAOF), and the server's version{place} could not be read"
                    )),
                }
                if n.aof != Some(true) {
                    out.errors.push(format!("redis.{name}: wait_aof needs appendonly yes{place}"));
                }
            }
            if let Some(connected) = n.replicas
                && connected < wait.replicas
            {
                out.warnings.push(format!(
                    "redis.{name}: wait_replicas = {} but {connected} replica(s) connected{place}: no batch is confirmed until enough are",
                    wait.replicas
                ));
            }
        }
    }
    out
}

/// Reads every primary's facts. A node that refuses `INFO` has unknown
/// facts (its policy from `CONFIG GET` when that is allowed); an
/// unreachable target is an error (transient).
pub(crate) async fn inspect(conn: &Conn, errors: &Errors) -> Result<Vec<NodeFacts>, SinkError> {
    let info = redis::cmd("INFO");
    match conn {
        Conn::Standalone(c) => {
            let mut c = c.clone();
            let mut facts = match info.query_async::<Value>(&mut c).await {
                Ok(v) => text(&v).map(|t| NodeFacts::parse("", &t)).unwrap_or_default(),
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                    return Err(errors.redis("INFO", e));
                }
                Err(_) => NodeFacts::default(),
            };
            if facts.policy.is_none() {
                let got: redis::RedisResult<Vec<String>> =
                    redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query_async(&mut c).await;
                facts.policy = got.ok().and_then(|kv| kv.get(1).cloned());
            }
            Ok(vec![facts])
        }
        Conn::Cluster(c) => {
            let reply: Value = info.query_async(&mut c.clone()).await.map_err(|e| errors.redis("INFO", e))?;
            let Value::Map(nodes) = &reply else { return Err(errors.unexpected("INFO", &reply)) };
            Ok(nodes
                .iter()
                .map(|(node, v)| {
                    let node = text(node).unwrap_or_default();
                    text(v).map(|t| NodeFacts::parse(&node, &t)).unwrap_or(NodeFacts { node, ..NodeFacts::default() })
                })
                .collect())
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Durability;

    fn target(check: EvictionCheck, durability: Option<Durability>) -> RedisTarget {
        RedisTarget {
            name: "primary".into(),
            urls: Vec::new(),
            cluster: false,
            fill_guard_ttl: None,
            broadcast: None,
            durability,
            eviction_check: check,
            tls: None,
        }
    }

    fn node(policy: Option<&str>, aof: bool, replicas: u32, version: (u32, u32, u32)) -> NodeFacts {
        NodeFacts {
            node: String::new(),
            version: Some(version),
            aof: Some(aof),
            replicas: Some(replicas),
            policy: policy.map(str::to_owned),
        }
    }

    #[test]
    fn info_fields_are_read() {
        let info = "# Server\r\nredis_version:7.0.15\r\n# Persistence\r\naof_enabled:1\r\n# Replication\r\nrole:master\r\nconnected_slaves:2\r\n# Memory\r\nmaxmemory_policy:volatile-lru\r\n";
        assert_eq!(
            NodeFacts::parse("n:1", info),
            NodeFacts {
                node: "n:1".into(),
                version: Some((7, 0, 15)),
                aof: Some(true),
                replicas: Some(2),
                policy: Some("volatile-lru".into()),
            }
        );
        assert_eq!(NodeFacts::parse("", ""), NodeFacts::default());
    }

    #[test]
    fn allkeys_policies_are_refused_or_warned_about_as_configured() {
        let facts = [node(Some("allkeys-lru"), true, 1, (7, 0, 0))];
        let refused = assess(&target(EvictionCheck::Refuse, None), &facts, false);
        assert_eq!(refused.errors.len(), 1, "{refused:?}");
        assert!(
            refused.errors[0].starts_with("redis.primary: maxmemory-policy allkeys-lru can evict evictd's own keys")
        );
        assert!(refused.warnings.is_empty());
        let warned = assess(&target(EvictionCheck::Warn, None), &facts, false);
        assert!(warned.errors.is_empty());
        assert!(warned.warnings[0].starts_with("redis.primary: maxmemory-policy allkeys-lru can evict"));
    }

    #[test]
    fn volatile_policies_matter_only_for_tag_registries() {
        let facts = [node(Some("volatile-ttl"), true, 1, (7, 0, 0))];
        assert_eq!(assess(&target(EvictionCheck::Refuse, None), &facts, false), Findings::default());
        let with_tags = assess(&target(EvictionCheck::Refuse, None), &facts, true);
        assert!(with_tags.errors[0].contains("can evict tag registries"), "{with_tags:?}");
        let noeviction = [node(Some("noeviction"), true, 0, (7, 0, 0))];
        assert_eq!(assess(&target(EvictionCheck::Refuse, None), &noeviction, true), Findings::default());
    }

    #[test]
    fn an_unreadable_policy_and_a_target_without_aof_or_replicas_are_warnings() {
        let facts = [NodeFacts { aof: Some(false), replicas: Some(0), ..NodeFacts::default() }];
        let found = assess(&target(EvictionCheck::Refuse, None), &facts, true);
        assert!(found.errors.is_empty(), "{found:?}");
        assert!(found.warnings[0].contains("maxmemory-policy could not be read"), "{found:?}");
        assert!(found.warnings[1].contains("neither AOF nor replicas"), "{found:?}");
    }

    #[test]
    fn wait_aof_needs_redis_7_2_and_an_aof() {
        let wait = Some(Durability { replicas: 1, aof: true, timeout: Duration::from_secs(1) });
        let old = assess(&target(EvictionCheck::Warn, wait), &[node(Some("noeviction"), false, 1, (7, 0, 15))], false);
        assert_eq!(
            old.errors,
            [
                "redis.primary: wait_aof needs Redis 7.2 or later (WAITAOF), but the server runs 7.0.15",
                "redis.primary: wait_aof needs appendonly yes",
            ]
        );
        let new = assess(&target(EvictionCheck::Warn, wait), &[node(Some("noeviction"), true, 1, (7, 2, 4))], false);
        assert_eq!(new, Findings::default());
        let short = assess(&target(EvictionCheck::Warn, wait), &[node(Some("noeviction"), true, 0, (7, 2, 4))], false);
        assert!(short.warnings[0].contains("wait_replicas = 1 but 0 replica(s) connected"), "{short:?}");
    }
}
