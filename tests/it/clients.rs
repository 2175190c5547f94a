//! The clients end to end (issue 13, deliverable 7): a real Postgres row
//! change → `evictd run` → Redis → each language's subscriber, in a process
//! of its own (an *agent*), holding a local cache.
//!
//! What every agent must pass, for each transport it is started with:
//! (a) a committed row change drops the local entry (commit → drop latency
//! printed), and a tag drops the entries registered under it; (b) its
//! connections cut while a change commits: the stream transports replay it
//! (nothing flushed, the rest of the cache kept), pub/sub alone repairs the
//! gap through `touched` (only the touched cache dropped); (c) a Redis
//! restart without persistence is a new epoch: every agent flushes; (d) an
//! evictd restart, longer than 3 heartbeats, costs no flush and no gap.
//!
//! # The agents' line protocol
//!
//! An agent is started as `<program> --redis URL --channel C --transport
//! both|pubsub|stream --heartbeat-ms N`, keeps a local cache kept by its
//! language's subscriber (on `--channel`, with `--heartbeat-ms` = evictd's
//! `broadcast_heartbeat_ms`), and talks over stdin/stdout, one line each,
//! words separated by single spaces (keys, caches, tags and values never
//! contain spaces):
//!
//! | stdin | stdout (exactly one line per command) |
//! |---|---|
//! | (start) | `ready` once subscribed (baseline taken), or `error <text>` and exit 1 |
//! | `fill <cache> <key> <value> [<tag>...]` | `ok`, or `rejected` (the local fill guard refused it) |
//! | `get <key>` | `hit <value>` or `miss` |
//! | `stats` | `stats <json>`: an object with at least the integers `entries`, `invalidations`, `replays`, `gaps`, `flushes`; optionally `commit_to_drop: {"count", "p50_ms", "p99_ms"}`, the client's own histogram (from the messages' `committed_at_ms`) |
//! | `quit` (or end of stdin) | `bye`, then exit 0 |
//! | anything else | `error <text>` |
//!
//! Besides the replies, at any time, an event: `dropped <key> <unix_ms>` when
//! an entry it filled left the local cache because of the broadcast (a key,
//! a tag, a cache flush, a whole flush), with the wall-clock time of the drop
//! in milliseconds (fractions allowed). Entries are filled with a long TTL,
//! so only the broadcast removes them. Lines are written whole: an event
//! never splits a reply. The harness computes commit → drop from its own
//! clock at `COMMIT` (same machine).
//!
//! # Adding an agent
//!
//! One row in [`AGENTS`]: its language, how to start it, and the transports
//! its client offers (Rust's has no `both`). The variables that name
//! interpreters and binaries (`EVICTD_TEST_PYTHON`, `EVICTD_TEST_NODE`,
//! `EVICTD_TEST_RUST_AGENT`) are set by `scripts/test.sh` from each client's
//! `setup.sh` (a venv, `npm ci`, a `cargo build` of the Rust agent); a
//! missing one fails the test, as the other `EVICTD_TEST_*`.

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::daemon::{Daemon, redis_url};
use super::redis_support::{OwnRedis, Proxy};
use super::support::{pg_url, root};

/// How to start one language's agent (its arguments follow), and the
/// transports its client offers.
struct AgentKind {
    language: &'static str,
    command: fn() -> Command,
    transports: &'static [&'static str],
}

/// Every agent the tests run.
const AGENTS: &[AgentKind] = &[
    AgentKind {
        language: "python",
        command: || interpreter("EVICTD_TEST_PYTHON", "clients/python/tests/e2e_agent.py"),
        transports: &TRANSPORTS,
    },
    AgentKind {
        language: "typescript",
        // From clients/typescript, so that `--import tsx` resolves from its
        // node_modules (setup.sh ran `npm ci`).
        command: || {
            let mut command = interpreter_args("EVICTD_TEST_NODE", &["--import", "tsx", "test/e2e_agent.ts"]);
            command.current_dir(root().join("clients/typescript"));
            command
        },
        transports: &TRANSPORTS,
    },
    AgentKind {
        language: "rust",
        // clients/rust-example/setup.sh builds it (evictd without its default
        // features) and names it.
        command: || Command::new(program("EVICTD_TEST_RUST_AGENT")),
        // The Rust client has no combined transport.
        transports: &["pubsub", "stream"],
    },
];

const TRANSPORTS: [&str; 3] = ["both", "pubsub", "stream"];

/// The program named by `$VAR`, which `scripts/test.sh` sets (from
/// `clients/*/setup.sh`); missing, the test fails (never skips).
fn program(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through scripts/test.sh (it runs clients/*/setup.sh first)")
    })
}

/// `$VAR script`: the interpreter named by the environment on a script of
/// the repository.
fn interpreter(var: &str, script: &str) -> Command {
    let mut command = Command::new(program(var));
    command.arg(root().join(script));
    command
}

/// `$VAR args…`: the interpreter with arguments as given.
fn interpreter_args(var: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program(var));
    command.args(args);
    command
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

/// A running agent: its stdin, its replies and its `dropped` events.
struct Agent {
    name: String,
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::UnboundedReceiver<String>,
    drops: mpsc::UnboundedReceiver<(String, f64)>,
    /// Drops seen while waiting for another key.
    seen: HashMap<String, f64>,
    stderr: tempfile::NamedTempFile,
}

impl Agent {
    /// Starts `kind`'s agent and waits for `ready`.
    async fn start(kind: &AgentKind, redis: &str, channel: &str, transport: &str, heartbeat_ms: u64) -> Agent {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = (kind.command)()
            .args(["--redis", redis, "--channel", channel, "--transport", transport])
            .args(["--heartbeat-ms", &heartbeat_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("the {} agent starts: {e}", kind.language));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (drop_tx, drops) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(event) = line.strip_prefix("dropped ") {
                    let (key, at) = event.rsplit_once(' ').expect("dropped <key> <unix_ms>");
                    let _ = drop_tx.send((key.to_owned(), at.parse::<f64>().expect("unix_ms")));
                } else if reply_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let name = format!("{}/{transport}", kind.language);
        let mut agent = Agent { name, child, stdin, replies, drops, seen: HashMap::new(), stderr };
        let first = agent.reply(Duration::from_secs(30)).await;
        assert_eq!(first, "ready", "{}: {}", agent.name, agent.stderr());
        agent
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    async fn reply(&mut self, limit: Duration) -> String {
        match tokio::time::timeout(limit, self.replies.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("{}: the agent exited; its stderr:\n{}", self.name, self.stderr()),
            Err(_) => panic!("{}: no reply within {limit:?}; its stderr:\n{}", self.name, self.stderr()),
        }
    }

    async fn command(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").and_then(|()| self.stdin.flush()).unwrap_or_else(|e| {
            panic!("{}: writing {line:?}: {e}; its stderr:\n{}", self.name, self.stderr());
        });
        let reply = self.reply(Duration::from_secs(10)).await;
        assert!(!reply.starts_with("error"), "{}: {line:?} → {reply}", self.name);
        reply
    }

    async fn fill(&mut self, cache: &str, key: &str, tags: &[&str]) {
        let mut line = format!("fill {cache} {key} v-{key}");
        for tag in tags {
            line.push(' ');
            line.push_str(tag);
        }
        assert_eq!(self.command(&line).await, "ok", "{}: {line}", self.name);
    }

    /// The local value, `None` on a miss.
    async fn get(&mut self, key: &str) -> Option<String> {
        let reply = self.command(&format!("get {key}")).await;
        match reply.strip_prefix("hit ") {
            Some(value) => Some(value.to_owned()),
            None if reply == "miss" => None,
            None => panic!("{}: get {key} → {reply}", self.name),
        }
    }

    async fn stats(&mut self) -> serde_json::Value {
        let reply = self.command("stats").await;
        let json = reply.strip_prefix("stats ").unwrap_or_else(|| panic!("{}: stats → {reply}", self.name));
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{}: stats {json}: {e}", self.name))
    }

    async fn stat(&mut self, name: &str) -> u64 {
        let stats = self.stats().await;
        stats[name].as_u64().unwrap_or_else(|| panic!("{}: no integer {name} in {stats}", self.name))
    }

    /// Waits for `dropped <key>`; the drop's wall-clock time (ms).
    async fn dropped(&mut self, key: &str, d: &Daemon) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(at) = self.seen.remove(key) {
                return at;
            }
            match tokio::time::timeout_at(deadline, self.drops.recv()).await {
                Ok(Some((k, at))) => {
                    self.seen.insert(k, at);
                }
                _ => panic!(
                    "{}: {key} was not dropped within 20 s; its stderr:\n{}\nevictd's log:\n{}",
                    self.name,
                    self.stderr(),
                    d.log()
                ),
            }
        }
    }

    async fn quit(mut self) {
        assert_eq!(self.command("quit").await, "bye");
        let _ = super::process::wait_within(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        super::process::kill(&mut self.child);
    }
}

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE app.others (id bigint PRIMARY KEY, name text NOT NULL);
INSERT INTO app.items SELECT g, 'n' || g FROM generate_series(1, 100) g;
INSERT INTO app.others SELECT g, 'n' || g FROM generate_series(1, 10) g;
";

/// `item` (a key per row), `listing` (invalidated by the tag
/// `<prefix>-item:<id>` only), `other` (another table: no change in these
/// tests touches it).
fn graph(prefix: &str) -> String {
    format!(
        r#"
[tables."app.items"]
key = ["id"]
columns = ["id", "name"]

[tables."app.others"]
key = ["id"]
columns = ["id", "name"]

[caches.{prefix}_item]
key = "{prefix}:item:{{id}}"
[[caches.{prefix}_item.depends]]
table = "app.items"

[caches.{prefix}_listing]
key = "{prefix}:listing:{{id}}"
[[caches.{prefix}_listing.depends]]
table = "app.items"
tags = ["{prefix}-item:{{id}}"]

[caches.{prefix}_other]
key = "{prefix}:other:{{id}}"
[[caches.{prefix}_other.depends]]
table = "app.others"
"#
    )
}

/// The `[redis.primary]` section: the broadcast on `channel` with
/// `heartbeat_ms`, both transports.
fn target(redis: &str, channel: &str, heartbeat_ms: u64) -> String {
    format!(
        "[redis.primary]\nurl = \"{redis}\"\nbroadcast_channel = \"{channel}\"\nbroadcast_heartbeat_ms = {heartbeat_ms}\n"
    )
}

/// Fails at once, before a database or daemon exists, when an agent's
/// interpreter is not named.
fn agents_runnable() {
    for kind in AGENTS {
        let _ = (kind.command)();
    }
}

/// Every agent on every transport its client offers.
async fn every_agent(redis: &str, channel: &str, heartbeat_ms: u64) -> Vec<Agent> {
    let mut agents = Vec::new();
    for kind in AGENTS {
        for transport in kind.transports {
            agents.push(Agent::start(kind, redis, channel, transport, heartbeat_ms).await);
        }
    }
    agents
}

struct Names {
    item: String,
    listing: String,
    other: String,
}

impl Names {
    fn of(d: &Daemon) -> Names {
        Names {
            item: format!("{}_item", d.prefix),
            listing: format!("{}_listing", d.prefix),
            other: format!("{}_other", d.prefix),
        }
    }
}

/// The `p`-th percentile (0–100) of `values`, nearest rank.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// (a) A committed row change drops the local entry on every agent; commit
/// → local drop is measured over 20 changes, one at a time.
#[tokio::test]
async fn a_row_change_drops_the_local_entry_of_every_agent() {
    agents_runnable();
    let url = redis_url();
    let channel = format!("evictd-e2e:{}:a", std::process::id());
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, &target(&url, &channel, 1000)).await;
    d.start().await;
    let n = Names::of(&d);
    let mut agents = every_agent(&url, &channel, 1000).await;
    let changes = 20;
    for agent in &mut agents {
        for i in 1..=changes {
            agent.fill(&n.item, &d.key(&format!("item:{i}")), &[]).await;
        }
        agent.fill(&n.listing, &d.key("listing:search"), &[&format!("{}-item:1", d.prefix)]).await;
        agent.fill(&n.other, &d.key("other:1"), &[]).await;
    }

    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); agents.len()];
    for i in 1..=changes {
        d.sql(&format!("UPDATE app.items SET name = name || '!' WHERE id = {i}")).await;
        let committed = now_ms();
        let key = d.key(&format!("item:{i}"));
        for (agent, latency) in agents.iter_mut().zip(&mut latencies) {
            let at = agent.dropped(&key, &d).await;
            latency.push((at - committed).max(0.0));
            assert_eq!(agent.get(&key).await, None, "{}: a dropped entry is not served", agent.name);
        }
    }
    let listing = d.key("listing:search");
    let other = d.key("other:1");
    for (agent, latency) in agents.iter_mut().zip(&latencies) {
        // The first change's tag dropped the entry registered under it.
        agent.dropped(&listing, &d).await;
        assert!(agent.get(&other).await.is_some(), "{}: an untouched cache is kept", agent.name);
        let stats = agent.stats().await;
        assert_eq!((stats["flushes"].as_u64(), stats["gaps"].as_u64()), (Some(0), Some(0)), "{}: {stats}", agent.name);
        if let Some(count) = stats["commit_to_drop"]["count"].as_u64() {
            // The client's own histogram, from the messages' committed_at_ms.
            assert!(count >= changes, "{}: commit_to_drop counted every change: {stats}", agent.name);
        }
        eprintln!(
            "clients e2e: {} commit → local drop over {changes} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; client's own commit_to_drop: {}",
            agent.name,
            percentile(latency, 50.0),
            percentile(latency, 99.0),
            percentile(latency, 100.0),
            stats["commit_to_drop"]
        );
    }
    for agent in agents {
        agent.quit().await;
    }
    d.finish().await;
}

/// Waits until the channel's sequence is above `above` (evictd published).
async fn wait_published(d: &Daemon, redis: &redis::aio::MultiplexedConnection, channel: &str, above: u64) -> u64 {
    let seq_key = evictd::sink::redis::layout::BroadcastKeys::of(channel).seq;
    d.wait_for("evictd to publish the change", Duration::from_secs(20), || {
        let mut redis = redis.clone();
        let seq_key = seq_key.clone();
        async move {
            let seq: Option<u64> = redis::cmd("GET").arg(&seq_key).query_async(&mut redis).await.ok()?;
            seq.filter(|s| *s > above)
        }
    })
    .await
}

/// (b) The agents' connections are cut (at a proxy in front of Redis, which
/// then refuses them: a `CLIENT KILL` alone races the reconnection) while a
/// change commits and evictd publishes it. Afterwards no agent serves the
/// changed entry; the stream transports replayed the message (no flush, no
/// repair: the rest of the cache stays); pub/sub alone, back within 3
/// heartbeats, repaired the gap through `touched`: it dropped the touched
/// cache whole and kept the others.
#[tokio::test]
async fn a_cut_connection_is_replayed_or_repaired_and_nothing_stale_is_served() {
    agents_runnable();
    let url = redis_url();
    let channel = format!("evictd-e2e:{}:b", std::process::id());
    // Silence (3 heartbeats, 6 s) stays well above the outage.
    let heartbeat_ms = 2000;
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, &target(&url, &channel, heartbeat_ms)).await;
    d.start().await;
    let n = Names::of(&d);
    let redis = super::daemon::redis(&url).await;
    // The channel exists (one message) before the agents take their baseline.
    d.sql("UPDATE app.items SET name = 'x' WHERE id = 100").await;
    let before = wait_published(&d, &redis, &channel, 0).await;
    let proxy = Proxy::start(&url).await;
    let mut agents = every_agent(&proxy.url, &channel, heartbeat_ms).await;
    let (changed, kept, other) = (d.key("item:1"), d.key("item:2"), d.key("other:1"));
    for agent in &mut agents {
        agent.fill(&n.item, &changed, &[]).await;
        agent.fill(&n.item, &kept, &[]).await;
        agent.fill(&n.other, &other, &[]).await;
    }

    proxy.set_down(true);
    let cut = std::time::Instant::now();
    d.sql("UPDATE app.items SET name = 'y' WHERE id = 1").await;
    wait_published(&d, &redis, &channel, before).await;
    proxy.set_down(false);
    let outage = cut.elapsed();
    assert!(outage < Duration::from_secs(2), "the outage must stay under 3 heartbeats: {outage:?}");

    for agent in &mut agents {
        agent.dropped(&changed, &d).await;
        assert_eq!(agent.get(&changed).await, None, "{}: nothing stale after the reconnection", agent.name);
        assert!(agent.get(&other).await.is_some(), "{}: an untouched cache is kept", agent.name);
        let stats = agent.stats().await;
        assert_eq!(stats["flushes"].as_u64(), Some(0), "{}: {stats}", agent.name);
        if agent.name.ends_with("/pubsub") {
            assert!(stats["gaps"].as_u64() >= Some(1), "{}: the gap was seen: {stats}", agent.name);
            assert_eq!(agent.get(&kept).await, None, "{}: the touched cache goes whole", agent.name);
        } else {
            assert!(stats["replays"].as_u64() >= Some(1), "{}: the stream replayed it: {stats}", agent.name);
            assert!(agent.get(&kept).await.is_some(), "{}: a replay drops only its keys", agent.name);
        }
    }
    for agent in agents {
        agent.quit().await;
    }
    d.finish().await;
}

/// (c) A Redis restart without persistence loses the channel's sequence:
/// evictd's next heartbeat or batch starts a new epoch, and every agent
/// flushes its whole local cache (what it missed is unknowable); then it
/// follows the new epoch.
#[tokio::test]
async fn a_redis_restart_is_a_new_epoch_and_every_agent_flushes() {
    agents_runnable();
    let mut server = OwnRedis::start(6670);
    let url = server.url();
    let channel = format!("evictd-e2e:{}:c", std::process::id());
    let heartbeat_ms = 200;
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, &target(&url, &channel, heartbeat_ms)).await;
    d.start().await;
    let n = Names::of(&d);
    let mut agents = every_agent(&url, &channel, heartbeat_ms).await;
    let other = d.key("other:1");
    for agent in &mut agents {
        agent.fill(&n.other, &other, &[]).await;
    }

    server.restart();
    for agent in &mut agents {
        agent.dropped(&other, &d).await;
        assert!(agent.stat("flushes").await >= 1, "{}", agent.name);
        assert_eq!(agent.get(&other).await, None, "{}", agent.name);
    }
    // The new epoch is followed: a change drops its entry, with no new flush.
    let item = d.key("item:3");
    let mut flushes = Vec::new();
    for agent in &mut agents {
        agent.fill(&n.item, &item, &[]).await;
        agent.fill(&n.other, &other, &[]).await;
        flushes.push(agent.stat("flushes").await);
    }
    d.sql("UPDATE app.items SET name = 'z' WHERE id = 3").await;
    for (agent, before) in agents.iter_mut().zip(flushes) {
        agent.dropped(&item, &d).await;
        assert!(agent.get(&other).await.is_some(), "{}", agent.name);
        assert_eq!(agent.stat("flushes").await, before, "{}", agent.name);
    }
    for agent in agents {
        agent.quit().await;
    }
    d.finish().await;
}

/// (d) An evictd restart continues the sequence under the same epoch: no
/// agent flushes or sees a gap, although the restart is longer than 3
/// heartbeats of silence (the spec: silence reconnects and checks
/// `:epoch`/`:seq`; it flushes only while Redis does not answer).
#[tokio::test]
async fn an_evictd_restart_costs_no_flush() {
    agents_runnable();
    let url = redis_url();
    let channel = format!("evictd-e2e:{}:d", std::process::id());
    let heartbeat_ms = 200;
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, &target(&url, &channel, heartbeat_ms)).await;
    d.start().await;
    let n = Names::of(&d);
    let redis = super::daemon::redis(&url).await;
    d.sql("UPDATE app.items SET name = 'x' WHERE id = 100").await;
    wait_published(&d, &redis, &channel, 0).await;
    let mut agents = every_agent(&url, &channel, heartbeat_ms).await;
    let (changed, kept, other) = (d.key("item:1"), d.key("item:2"), d.key("other:1"));
    for agent in &mut agents {
        agent.fill(&n.item, &changed, &[]).await;
        agent.fill(&n.item, &kept, &[]).await;
        agent.fill(&n.other, &other, &[]).await;
    }

    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    // Silence for well over 3 heartbeats.
    tokio::time::sleep(Duration::from_millis(5 * heartbeat_ms)).await;
    d.start().await;
    d.sql("UPDATE app.items SET name = 'y' WHERE id = 1").await;
    for agent in &mut agents {
        agent.dropped(&changed, &d).await;
        let stats = agent.stats().await;
        assert_eq!((stats["flushes"].as_u64(), stats["gaps"].as_u64()), (Some(0), Some(0)), "{}: {stats}", agent.name);
        assert!(agent.get(&kept).await.is_some(), "{}", agent.name);
        assert!(agent.get(&other).await.is_some(), "{}", agent.name);
    }
    for agent in agents {
        agent.quit().await;
    }
    d.finish().await;
}
