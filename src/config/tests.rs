use secrecy::ExposeSecret;

use super::source::DEFAULT_MAX_MESSAGE_BYTES;
use super::*;
use crate::dead_letter::{MigrationMode, OnError};

const VALID: &str = r#"
[graph]
paths = ["graphs"]

[source]
kind = "postgres"

[source.postgres]
url = "postgres://evictd:hunter2@127.0.0.1:5432/app"
slot = "evictd_main"

[batch]
max_effects = 500

[redis.primary]
url = "redis://:s3cret@127.0.0.1:6379"

[redis.cluster_eu]
url = "redis://127.0.0.1:7101,redis://127.0.0.1:7102"
cluster = true
"#;

/// The sections every config needs, for tests about other sections.
const REQUIRED: &str = "\n[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://u@h/db\"\n[redis.primary]\nurl = \"redis://h:6379\"\n";

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn messages(e: ConfigError) -> Vec<String> {
    e.0.iter().map(|i| i.to_string().replace(&i.place, "PLACE")).collect()
}

#[test]
fn a_valid_file_loads_with_defaults() {
    let (dir, path) = write(VALID);
    let c = load_with_env(&path, &env(&[])).unwrap();
    assert_eq!(c.graph_paths, vec![dir.path().join("graphs")], "relative to the config file");
    assert_eq!(c.batch.max_effects, 500);
    assert_eq!(c.batch.max_delay, Duration::from_millis(1));
    assert_eq!(c.redis.len(), 2);
    assert!(c.redis.iter().any(|t| t.name == "cluster_eu" && t.cluster && t.urls.len() == 2));
    let Some(SourceConfig::Postgres(pg)) = &c.source else { panic!("postgres source expected") };
    assert_eq!(pg.slot, "evictd_main");
    assert_eq!(pg.publication, "evictd");
    assert!(c.lookup.url.is_some(), "look-ups default to the source database");
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:9187");
    assert_eq!(c.server.health, crate::server::HealthThresholds::default());
}

#[test]
fn health_thresholds_come_from_the_server_section_or_the_environment() {
    let (_dir, path) = write(&format!("[server]\nheartbeat_timeout_ms = 5000\n{REQUIRED}"));
    let c = load_with_env(&path, &env(&[("EVICTD__SERVER__READY_MAX_LAG_BYTES", "1048576")])).unwrap();
    assert_eq!(c.server.health.heartbeat_timeout, Duration::from_secs(5));
    assert_eq!(c.server.health.max_lag_bytes, 1_048_576);
    let e = load_with_env(&path, &env(&[("EVICTD__SERVER__HEARTBEAT_TIMEOUT_MS", "0")])).unwrap_err();
    assert_eq!(e.0[0].place, "EVICTD__SERVER__HEARTBEAT_TIMEOUT_MS");
    assert_eq!(e.0[0].message, "must be greater than 0");
}

#[test]
fn secrets_never_show_in_debug_output() {
    let (_dir, path) = write(VALID);
    let c = load_with_env(&path, &env(&[])).unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("hunter2") && !debug.contains("s3cret"), "{debug}");
}

#[test]
fn an_unknown_key_names_the_file_line_and_field() {
    let (_dir, path) = write("[batch]\nmax_effects = 10\nmax_delay = 5\n");
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(e.0.len(), 1);
    let issue = &e.0[0];
    assert_eq!(issue.place, format!("{}:3:1", path.display()));
    assert_eq!(issue.field, "batch.max_delay");
    assert!(issue.message.starts_with("unknown field `max_delay`"), "{}", issue.message);
}

#[test]
fn a_value_of_the_wrong_type_names_the_field() {
    let (_dir, path) = write("[lookup]\ntimeout_ms = \"soon\"\n");
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(e.0[0].place, format!("{}:2:14", path.display()));
    assert_eq!(e.0[0].field, "lookup.timeout_ms");
}

#[test]
fn a_bad_value_is_reported_at_its_line() {
    let (_dir, path) = write(&format!("[batch]\n\nmax_effects = 0\n\n[log]\nformat = \"xml\"\n{REQUIRED}"));
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    let got: Vec<String> = e.0.iter().map(ToString::to_string).collect();
    let file = path.display();
    assert_eq!(
        got,
        [
            format!("{file}:3:15: batch.max_effects: must be greater than 0"),
            format!("{file}:6:10: log.format: unknown format `xml` (expected text or json)"),
        ]
    );
}

#[test]
fn environment_overrides_win_over_the_file() {
    let (_dir, path) = write(VALID);
    let c = load_with_env(
        &path,
        &env(&[
            ("EVICTD__BATCH__MAX_EFFECTS", "42"),
            ("EVICTD__REDIS__PRIMARY__URL", "redis://10.0.0.9:6379"),
            ("EVICTD__GRAPH__PATHS", "a,b"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(c.batch.max_effects, 42);
    let primary = c.redis.iter().find(|t| t.name == "primary").unwrap();
    assert_eq!(primary.urls[0].expose_secret(), "redis://10.0.0.9:6379");
    assert_eq!(c.graph_paths.len(), 2);
}

#[test]
fn a_bad_override_names_the_variable() {
    let (_dir, path) = write(VALID);
    let e = load_with_env(&path, &env(&[("EVICTD__BATCH__MAX_EFFECTS", "0")])).unwrap_err();
    assert_eq!(e.0[0].place, "EVICTD__BATCH__MAX_EFFECTS");
    assert_eq!(e.0[0].field, "batch.max_effects");
    let e = load_with_env(&path, &env(&[("EVICTD__BATCH__MAX_EFECTS", "5")])).unwrap_err();
    assert!(e.0[0].place.contains("EVICTD__BATCH__MAX_EFECTS"), "{:?}", e.0[0]);
    assert!(e.0[0].message.contains("max_efects"), "{:?}", e.0[0]);
}

#[test]
fn invalid_urls_are_rejected_without_printing_them() {
    let text = VALID
        .replace("postgres://evictd:hunter2@127.0.0.1:5432/app", "postgres://evictd:hunter2@127.0.0.1:notaport/app");
    let (_dir, path) = write(&text);
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    let all = e.to_string();
    assert!(all.contains("source.postgres.url: not a Postgres URL"), "{all}");
    assert!(!all.contains("hunter2"), "{all}");
}

#[test]
fn a_source_kind_needs_its_section_and_a_known_name() {
    let redis = "[redis.primary]\nurl = \"redis://h:6379\"\n";
    let (_dir, path) = write(&format!("[source]\nkind = \"mysql\"\n{redis}"));
    assert_eq!(
        messages(load_with_env(&path, &env(&[])).unwrap_err()),
        ["PLACE: source.kind: unknown source `mysql` (expected postgres or kafka)"]
    );
    let (_dir, path) = write(&format!("[source]\nkind = \"kafka\"\n{redis}"));
    assert_eq!(
        messages(load_with_env(&path, &env(&[])).unwrap_err()),
        ["PLACE: source: kind = \"kafka\" needs a [source.kafka] section"]
    );
    let (_dir, path) = write("[batch]\nmax_effects = 5\n");
    assert_eq!(
        messages(load_with_env(&path, &env(&[])).unwrap_err()),
        [
            "PLACE: source: missing: add a [source] section with kind = \"postgres\" or \"kafka\"",
            "PLACE: redis: no Redis target: add a [redis.NAME] section with a `url`",
        ]
    );
}

/// Validation creates no Kafka client: what librdkafka thinks of a
/// property is asked by `check` and at the daemon's start
/// (`daemon::check_kafka_client`, tested there and in tests/it/kafka.rs).
#[test]
fn validation_leaves_librdkafka_properties_to_check_and_start() {
    let text = "[redis.primary]\nurl = \"redis://h:6379\"\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"t\"]\n[source.kafka.properties]\n\"no.such.property\" = \"1\"\n";
    let (_dir, path) = write(text);
    let c = load_with_env(&path, &env(&[])).unwrap();
    let Some(SourceConfig::Kafka(kafka)) = &c.source else { panic!("a Kafka source: {:?}", c.source) };
    assert_eq!(kafka.properties.get("no.such.property").map(String::as_str), Some("1"));
}

#[test]
fn a_secret_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("redis-url"), "redis://:pw@127.0.0.1:6379\n").unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(&path, "[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://u@h/db\"\n[redis.primary]\nurl_file = \"redis-url\"\n").unwrap();
    let c = load_with_env(&path, &env(&[])).unwrap();
    assert_eq!(c.redis[0].urls[0].expose_secret(), "redis://:pw@127.0.0.1:6379");
}

#[test]
fn a_url_given_where_a_table_belongs_does_not_leak_its_password() {
    let (_dir, path) = write(VALID);
    let e = load_with_env(&path, &env(&[("EVICTD__REDIS__PRIMARY", "redis://:hunter2@r:6379")])).unwrap_err();
    let text = e.to_string();
    assert!(!text.contains("hunter2") && !text.contains("RawRedis"), "{text}");
    assert_eq!(e.0[0].place, "EVICTD__REDIS__PRIMARY", "the culprit is named alone");
    let (_dir, path) = write(&VALID.replace("[redis.primary]\nurl = ", "[redis]\nprimary = "));
    let text = load_with_env(&path, &env(&[])).unwrap_err().to_string();
    assert!(!text.contains("s3cret"), "{text}");
}

#[test]
fn a_bad_source_url_is_reported_once_and_by_scheme() {
    let (_dir, path) = write(&VALID.replace("postgres://evictd:hunter2@", "mysql://evictd:hunter2@"));
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].field, "source.postgres.url");
    assert_eq!(e.0[0].message, "not a Postgres URL (scheme `mysql`; expected postgres:// or postgresql://)");
}

#[test]
fn passwords_are_hidden_in_free_text() {
    assert_eq!(
        hide_passwords("invalid type: string \"redis://:pw@h:1\", and postgres://u:p@db/x"),
        "invalid type: string \"redis://:****@h:1\", and postgres://u:****@db/x"
    );
}

#[test]
fn query_string_passwords_are_hidden_in_free_text() {
    assert_eq!(
        hide_passwords("cannot use postgres://u@db/x?sslmode=require&password=se+cret&user=u, retrying"),
        "cannot use postgres://u@db/x?sslmode=require&password=****&user=u, retrying"
    );
}

#[test]
fn redacted_urls_hide_the_password_only() {
    let url = |s: &str| redact_url(&SecretString::from(s.to_owned()));
    assert_eq!(url("postgres://u:pw@h:5432/db?sslmode=require&password=x"), "postgres://u:****@h:5432/db");
    assert_eq!(url("redis://:pw@h:6379"), "redis://:****@h:6379");
    assert_eq!(url("redis://h:6379"), "redis://h:6379");
    assert_eq!(url("not a url"), "****");
}

#[test]
fn dead_letters_default_to_the_source_database_and_the_evictd_schema() {
    let (_dir, path) = write(VALID);
    let c = load_with_env(&path, &env(&[])).unwrap();
    let d = &c.dead_letter;
    assert_eq!(d.on_error, OnError::DeadLetter);
    assert_eq!(d.migrations, MigrationMode::Apply);
    assert_eq!(d.schema, "evictd");
    assert_eq!(d.lookup_attempts, 5);
    assert_eq!(
        d.url.as_ref().map(|u| u.expose_secret().to_owned()).as_deref(),
        Some("postgres://evictd:hunter2@127.0.0.1:5432/app")
    );
}

#[test]
fn the_dead_letter_section_is_read_and_overridden_by_the_environment() {
    let text = format!(
        "[dead_letter]\non_error = \"stop\"\nschema = \"evictd_ops\"\nmigrations = \"verify\"\nlookup_attempts = 2\nurl = \"postgres://dl@h/ops\"\n{REQUIRED}"
    );
    let (_dir, path) = write(&text);
    let c = load_with_env(&path, &env(&[("EVICTD__DEAD_LETTER__LOOKUP_ATTEMPTS", "9")])).unwrap();
    let d = &c.dead_letter;
    assert_eq!(
        (d.on_error, d.migrations, d.schema.as_str(), d.lookup_attempts),
        (OnError::Stop, MigrationMode::Verify, "evictd_ops", 9)
    );
    assert_eq!(d.url.as_ref().map(|u| u.expose_secret().to_owned()).as_deref(), Some("postgres://dl@h/ops"));
}

#[test]
fn bad_dead_letter_values_name_file_line_and_field() {
    let text = format!(
        "[dead_letter]\non_error = \"skip\"\nschema = \"Ops-Schema\"\nmigrations = \"later\"\nlookup_attempts = 0\n{REQUIRED}"
    );
    let (_dir, path) = write(&text);
    let got: Vec<String> = load_with_env(&path, &env(&[])).unwrap_err().0.iter().map(ToString::to_string).collect();
    let file = path.display();
    assert_eq!(
        got,
        [
            format!("{file}:2:12: dead_letter.on_error: unknown value `skip` (expected dead_letter or stop)"),
            format!(
                "{file}:3:10: dead_letter.schema: `Ops-Schema` is not a schema name (lowercase letters, digits and `_`, at most 63)"
            ),
            format!("{file}:4:14: dead_letter.migrations: unknown value `later` (expected apply or verify)"),
            format!("{file}:5:19: dead_letter.lookup_attempts: must be greater than 0"),
        ]
    );
    let (_dir, path) = write(&format!("[dead_letter]\nretries = 3\n{REQUIRED}"));
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(e.0[0].field, "dead_letter.retries");
    assert_eq!(e.0[0].place, format!("{}:2:1", path.display()));
}

#[test]
fn a_target_waits_for_replicas_or_the_aof_only_when_asked() {
    let (_dir, path) = write(VALID);
    let c = load_with_env(&path, &env(&[])).unwrap();
    assert!(c.redis.iter().all(|t| t.durability.is_none() && t.eviction_check == EvictionCheck::Refuse));
    let c = load_with_env(
        &path,
        &env(&[
            ("EVICTD__REDIS__PRIMARY__WAIT_REPLICAS", "2"),
            ("EVICTD__REDIS__PRIMARY__WAIT_TIMEOUT_MS", "250"),
            ("EVICTD__REDIS__CLUSTER_EU__WAIT_AOF", "true"),
            ("EVICTD__REDIS__CLUSTER_EU__EVICTION_CHECK", "warn"),
        ]),
    )
    .unwrap();
    let primary = c.redis.iter().find(|t| t.name == "primary").unwrap();
    assert_eq!(primary.durability, Some(Durability { replicas: 2, aof: false, timeout: Duration::from_millis(250) }));
    let eu = c.redis.iter().find(|t| t.name == "cluster_eu").unwrap();
    assert_eq!(eu.durability, Some(Durability { replicas: 0, aof: true, timeout: Duration::from_millis(1000) }));
    assert_eq!(eu.eviction_check, EvictionCheck::Warn);

    let (_dir, path) = write(&format!("{REQUIRED}eviction_check = \"ignore\"\nwait_timeout_ms = 0\n"));
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    let text = messages(e).join("\n");
    assert!(text.contains("redis.primary.eviction_check: unknown value `ignore` (expected refuse or warn)"), "{text}");
    assert!(text.contains("redis.primary.wait_timeout_ms: must be greater than 0"), "{text}");
}

#[test]
fn the_broadcast_defaults_to_both_transports_and_refuses_unknown_ones_with_their_place() {
    let (_dir, path) = write(VALID);
    let c = load_with_env(&path, &env(&[])).unwrap();
    let primary = c.redis.iter().find(|t| t.name == "primary").unwrap();
    assert_eq!(primary.broadcast, Some(crate::config::BroadcastConfig::new("evictd:invalidations")));
    let c = load_with_env(
        &path,
        &env(&[
            ("EVICTD__REDIS__PRIMARY__BROADCAST_TRANSPORT", "stream"),
            ("EVICTD__REDIS__PRIMARY__BROADCAST_STREAM_MAX_LEN", "500"),
            ("EVICTD__REDIS__PRIMARY__BROADCAST_HEARTBEAT_MS", "250"),
        ]),
    )
    .unwrap();
    let broadcast = c.redis.iter().find(|t| t.name == "primary").unwrap().broadcast.clone().unwrap();
    assert_eq!(broadcast.transport, crate::config::Transport::Stream);
    assert_eq!(broadcast.stream_max_len, 500);
    assert_eq!(broadcast.heartbeat, Duration::from_millis(250));

    let (_dir, path) = write(&format!(
        "{REQUIRED}broadcast_transport = \"kafka\"\nbroadcast_heartbeat_ms = 0\nbroadcast_channel = \"a}}b\"\n"
    ));
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    let transport = e.0.iter().find(|i| i.field == "redis.primary.broadcast_transport").unwrap();
    assert!(transport.place.starts_with(&format!("{}:", path.display())), "{}", transport.place);
    let text = messages(e).join("\n");
    assert!(
        text.contains("redis.primary.broadcast_transport: unknown value `kafka` (expected both, pubsub or stream)"),
        "{text}"
    );
    assert!(text.contains("redis.primary.broadcast_heartbeat_ms: must be greater than 0"), "{text}");
    assert!(text.contains("redis.primary.broadcast_channel: must not contain `}`"), "{text}");
}

#[test]
fn on_slot_loss_defaults_to_refuse_and_takes_flush_from_the_file_or_the_environment() {
    let pg = |c: Config| match c.source {
        Some(SourceConfig::Postgres(pg)) => pg.on_slot_loss,
        _ => panic!("postgres source expected"),
    };
    let (_dir, path) = write(VALID);
    assert_eq!(pg(load_with_env(&path, &env(&[])).unwrap()), OnSlotLoss::Refuse);
    let flush = env(&[("EVICTD__SOURCE__POSTGRES__ON_SLOT_LOSS", "flush")]);
    assert_eq!(pg(load_with_env(&path, &flush).unwrap()), OnSlotLoss::Flush);
    let (_dir, path) =
        write(&VALID.replace("slot = \"evictd_main\"", "slot = \"evictd_main\"\non_slot_loss = \"ignore\""));
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(
        messages(e),
        ["PLACE: source.postgres.on_slot_loss: unknown value `ignore` (expected refuse or flush)".to_owned()]
    );
}

/// Issue 11, item 11: `latest` would skip every message the group has not
/// read; evictd sets `auto.offset.reset` itself.
#[test]
fn auto_offset_reset_latest_is_refused_with_its_place() {
    let text = "[redis.primary]\nurl = \"redis://h:6379\"\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"t\"]\n[source.kafka.properties]\n\"auto.offset.reset\" = \"latest\"\n";
    let (_dir, path) = write(text);
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].field, "source.kafka.properties.\"auto.offset.reset\"");
    assert!(e.0[0].place.ends_with("evictd.toml:9:23"), "file:line:col of the value: {}", e.0[0].place);
    assert!(e.0[0].message.contains("`latest` skips every message"), "{}", e.0[0].message);
}

#[test]
fn kafka_offset_reset_and_size_caps_have_defaults_and_are_checked() {
    let base = "[redis.primary]\nurl = \"redis://h:6379\"\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"t\"]\n";
    let (_dir, path) = write(base);
    let c = load_with_env(&path, &env(&[])).unwrap();
    let Some(SourceConfig::Kafka(k)) = &c.source else { panic!("kafka source expected") };
    assert_eq!(k.on_offset_reset, OnOffsetReset::Stop);
    assert_eq!(k.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    assert_eq!(k.max_value_bytes, DEFAULT_MAX_VALUE_BYTES);
    let (_dir, path) = write(&format!("{base}on_offset_reset = \"flush\"\nmax_value_bytes = 4096\n"));
    let c = load_with_env(&path, &env(&[])).unwrap();
    let Some(SourceConfig::Kafka(k)) = &c.source else { panic!("kafka source expected") };
    assert_eq!((k.on_offset_reset, k.max_value_bytes), (OnOffsetReset::Flush, 4096));
    let (_dir, path) = write(&format!("{base}on_offset_reset = \"latest\"\nmax_message_bytes = 0\n"));
    assert_eq!(
        messages(load_with_env(&path, &env(&[])).unwrap_err()),
        [
            "PLACE: source.kafka.on_offset_reset: unknown value `latest` (expected stop or flush)",
            "PLACE: source.kafka.max_message_bytes: must be greater than 0",
        ]
    );
}

/// Issue 14: the slot lock's lease defaults to 10 s, or to
/// `standby_retry_ms` + the 5 s round-trip bound when that is more.
#[test]
fn the_lock_lease_has_a_default_above_the_standby_retry() {
    let pg = |text: &str| {
        let (_dir, path) = write(text);
        let c = load_with_env(&path, &env(&[])).unwrap();
        let Some(SourceConfig::Postgres(pg)) = c.source else { panic!("postgres source expected") };
        pg
    };
    assert_eq!(pg(REQUIRED).lock_lease, Some(Duration::from_secs(10)));
    let slow = REQUIRED.replace("[source.postgres]\n", "[source.postgres]\nstandby_retry_ms = 8000\n");
    assert_eq!(pg(&slow).lock_lease, Some(Duration::from_secs(13)), "a slow retry moves the default up");
    let off = REQUIRED.replace("[source.postgres]\n", "[source.postgres]\nlock_lease_ms = 0\n");
    assert_eq!(pg(&off).lock_lease, None, "0 turns the lease off");
    let exact =
        REQUIRED.replace("[source.postgres]\n", "[source.postgres]\nstandby_retry_ms = 200\nlock_lease_ms = 5200\n");
    assert_eq!(pg(&exact).lock_lease, Some(Duration::from_millis(5200)));
}

/// A lease a healthy active replica could lose (its checks every
/// `standby_retry_ms` may take up to 5 s) is refused at its line, from the
/// file or the environment.
#[test]
fn a_lock_lease_shorter_than_the_retry_and_a_round_trip_is_refused_at_its_place() {
    let text =
        REQUIRED.replace("[source.postgres]\n", "[source.postgres]\nstandby_retry_ms = 1000\nlock_lease_ms = 3000\n");
    let (_dir, path) = write(&text);
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].field, "source.postgres.lock_lease_ms");
    assert!(e.0[0].place.ends_with("evictd.toml:6:17"), "file:line:col of the value: {}", e.0[0].place);
    assert!(e.0[0].message.starts_with("must be at least 6000 (standby_retry_ms + 5000 ms"), "{}", e.0[0].message);

    let (_dir, path) = write(REQUIRED);
    let e = load_with_env(&path, &env(&[("EVICTD__SOURCE__POSTGRES__LOCK_LEASE_MS", "4000")])).unwrap_err();
    assert_eq!(e.0[0].place, "EVICTD__SOURCE__POSTGRES__LOCK_LEASE_MS");
    let c = load_with_env(&path, &env(&[("EVICTD__SOURCE__POSTGRES__LOCK_LEASE_MS", "20000")])).unwrap();
    let Some(SourceConfig::Postgres(pg)) = c.source else { panic!("postgres source expected") };
    assert_eq!(pg.lock_lease, Some(Duration::from_secs(20)));
}

/// tracing-subscriber 0.3 reads each comma-separated directive trimmed but
/// slices the untrimmed text with the trimmed offsets: after a space, a
/// non-ASCII target panicked (found by the `config` fuzz target,
/// `fuzz/regressions/config/`) and `info, evictd=debug` was refused.
#[test]
fn a_log_level_directive_after_a_space_is_read_as_written_not_a_panic() {
    let (_dir, path) = write(&format!("[log]\nlevel = \" Գ=info\"\n{REQUIRED}"));
    let c = load_with_env(&path, &env(&[])).unwrap();
    assert_eq!(c.log.level, "Գ=info");
    let (_dir, path) = write(&format!("[log]\nlevel = \"info, evictd=debug \"\n{REQUIRED}"));
    let c = load_with_env(&path, &env(&[])).unwrap();
    assert_eq!(c.log.level, "info,evictd=debug");
}

/// A field pattern in a span filter is text, not a regular expression: as a
/// regex, the one of `fuzz/regressions/config/log-level-field-pattern-regex-blowup.toml`
/// (found by the `config` fuzz target) took minutes and gigabytes to compile.
#[test]
fn a_log_level_field_pattern_is_matched_as_text_not_compiled_as_a_regex() {
    let regression = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions/config/log-level-field-pattern-regex-blowup.toml");
    let text = std::fs::read_to_string(regression).unwrap();
    let (_dir, path) = write(&format!("{text}{REQUIRED}"));
    let started = std::time::Instant::now();
    let result = load_with_env(&path, &env(&[]));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // Whatever the verdict on the rest of the filter, it is not about time.
    if let Err(e) = result {
        assert!(e.0.iter().all(|issue| issue.field == "log.level"), "{e:?}");
    }
    let (_dir, path) = write(&format!("[log]\nlevel = \"evictd[{{arg=a.*b}}]=debug\"\n{REQUIRED}"));
    assert_eq!(load_with_env(&path, &env(&[])).unwrap().log.level, "evictd[{arg=a.*b}]=debug");
}

#[test]
fn server_limits_default_and_come_from_the_server_section_or_the_environment() {
    let (_dir, path) = write(REQUIRED);
    let c = load_with_env(&path, &env(&[])).unwrap();
    assert_eq!(c.server.limits, crate::server::ServerLimits::default());
    assert_eq!(c.server.limits.header_read_timeout, Duration::from_secs(5));
    assert_eq!(c.server.limits.request_timeout, Duration::from_secs(10));
    assert_eq!(c.server.limits.max_connections, 64);
    let (_dir, path) = write(&format!("[server]\nheader_read_timeout_ms = 2000\nmax_connections = 8\n{REQUIRED}"));
    let c = load_with_env(&path, &env(&[("EVICTD__SERVER__REQUEST_TIMEOUT_MS", "3000")])).unwrap();
    assert_eq!(c.server.limits.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.server.limits.request_timeout, Duration::from_secs(3));
    assert_eq!(c.server.limits.max_connections, 8);
}

#[test]
fn server_limits_of_zero_or_past_their_bounds_are_refused_by_name() {
    let text = format!(
        "[server]\nheader_read_timeout_ms = 0\nrequest_timeout_ms = 3600001\nmax_connections = 100001\n{REQUIRED}"
    );
    let (_dir, path) = write(&text);
    let e = load_with_env(&path, &env(&[])).unwrap_err();
    assert_eq!(
        messages(e),
        [
            "PLACE: server.header_read_timeout_ms: must be between 1 and 3600000",
            "PLACE: server.request_timeout_ms: must be between 1 and 3600000",
            "PLACE: server.max_connections: must be between 1 and 100000",
        ]
    );
}

#[test]
fn redis_tls_files_are_relative_to_the_config_and_need_rediss() {
    let base = "\n[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://u@h/db\"\n";
    let (dir, path) = write(&format!(
        "{base}[redis.primary]\nurl = \"rediss://h:6380\"\ntls_ca_file = \"ca.pem\"\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n"
    ));
    for f in ["ca.pem", "c.pem", "k.pem"] {
        std::fs::write(dir.path().join(f), "").unwrap();
    }
    let c = load_with_env(&path, &env(&[])).unwrap();
    let tls = c.redis[0].tls.clone().unwrap();
    assert_eq!(tls.ca_file, Some(dir.path().join("ca.pem")));
    assert_eq!(tls.client_cert, Some((dir.path().join("c.pem"), dir.path().join("k.pem"))));

    let (_dir, path) =
        write(&format!("{base}[redis.primary]\nurl = \"redis://h:6379\"\ntls_ca_file = \"missing.pem\"\n"));
    let m = messages(load_with_env(&path, &env(&[])).unwrap_err());
    assert!(m.iter().any(|m| m.contains("need rediss:// URLs")), "{m:?}");
    assert!(m.iter().any(|m| m.contains("no such file") && m.contains("missing.pem")), "{m:?}");
}

#[test]
fn a_postgres_url_is_checked_as_libpq_reads_it() {
    let (_dir, path) = write(
        "\n[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://u@h/db?sslmod=require\"\n[redis.primary]\nurl = \"redis://h:6379\"\n",
    );
    let m = messages(load_with_env(&path, &env(&[])).unwrap_err());
    assert!(m.iter().any(|m| m.contains("`sslmod` is not a connection parameter libpq knows")), "{m:?}");
}

#[test]
fn a_postgres_url_needing_tls_files_it_lacks_is_refused_by_check() {
    let (_dir, path) = write(
        "\n[source]\nkind = \"postgres\"\n[source.postgres]\nurl = \"postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"\n[redis.primary]\nurl = \"redis://h:6379\"\n",
    );
    let m = messages(load_with_env(&path, &env(&[])).unwrap_err());
    assert!(m.iter().any(|m| m.contains("sslrootcert file `/nonexistent/ca.pem` does not exist")), "{m:?}");
}

#[test]
fn kafka_properties_holding_secrets_are_redacted_and_cut_out_of_messages() {
    for secret in [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "SASL.PASSWORD",
    ] {
        assert!(is_secret_property(secret), "{secret} is a secret");
    }
    for plain in
        ["sasl.username", "sasl.mechanism", "security.protocol", "ssl.ca.location", "ssl.ca.pem", "ssl.certificate.pem"]
    {
        assert!(!is_secret_property(plain), "{plain} is not a secret");
    }
    let text = "[redis.primary]\nurl = \"redis://h:6379\"\n[source]\nkind = \"kafka\"\n[source.kafka]\nbrokers = \"b:9096\"\ntopics = [\"t\"]\n[source.kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"evictd\"\n\"sasl.password\" = \"hunter2\"\n\"ssl.key.pem\" = \"-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\"\n";
    let (_dir, path) = write(text);
    let config = load_with_env(&path, &env(&[])).unwrap();
    let Some(SourceConfig::Kafka(kafka)) = &config.source else { panic!("a Kafka source") };
    // Debug (what a `{:?}` of the config would log) shows no secret.
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2") && !debug.contains("PRIVATE KEY"), "{debug}");
    assert!(debug.contains("\"sasl.password\": \"****\"") && debug.contains("SCRAM-SHA-512"), "{debug}");
    let shown = redact_properties(&kafka.properties);
    assert_eq!(shown["sasl.password"], "****");
    assert_eq!(shown["ssl.key.pem"], "****");
    assert_eq!(shown["sasl.username"], "evictd");
    // The values themselves are used as given.
    assert_eq!(kafka.properties["sasl.password"], "hunter2");
    assert_eq!(
        hide_property_secrets("Invalid value \"hunter2\" for sasl.password (user evictd)", &kafka.properties),
        "Invalid value \"****\" for sasl.password (user evictd)"
    );
}
