use super::*;

fn encoded(m: &Metrics) -> String {
    m.encode().unwrap()
}

/// Fails with the whole text when `line` is not one of its lines.
fn assert_lines(text: &str, expected: &[&str]) {
    for line in expected {
        assert!(text.lines().any(|l| l == *line), "missing line {line:?} in:\n{text}");
    }
}

#[test]
fn changes_are_counted_by_table_and_operation() {
    let m = Metrics::new();
    m.changes_received("public.users", Operation::Update, 3);
    m.changes_received("public.users", Operation::Update, 2);
    m.changes_received("shop.orders", Operation::Truncate, 1);
    assert_lines(
        &encoded(&m),
        &[
            "# HELP evictd_changes_received Row changes received from the source, by table and operation.",
            "# TYPE evictd_changes_received counter",
            r#"evictd_changes_received_total{table="public.users",op="update"} 5"#,
            r#"evictd_changes_received_total{table="shop.orders",op="truncate"} 1"#,
        ],
    );
}

#[test]
fn effects_are_counted_by_cache_kind_and_action() {
    let m = Metrics::new();
    m.effects_resolved("user_profile", Invalidation::Key(Action::Delete), 4);
    m.effects_resolved("product_detail", Invalidation::Tag(Action::Expire), 2);
    m.effects_resolved("product_detail", Invalidation::NamespaceBump, 1);
    assert_lines(
        &encoded(&m),
        &[
            r#"evictd_effects_resolved_total{cache="user_profile",kind="key",action="delete"} 4"#,
            r#"evictd_effects_resolved_total{cache="product_detail",kind="tag",action="expire"} 2"#,
            r#"evictd_effects_resolved_total{cache="product_detail",kind="namespace",action="bump"} 1"#,
        ],
    );
}

#[test]
fn the_position_ladder_sets_each_rung_and_the_lag() {
    let m = Metrics::new();
    let ladder = PositionLadder {
        wal_end: Lsn(0x16_B374_D848),
        received: Lsn(0x16_B374_D000),
        resolved: Lsn(0x16_B374_C000),
        applied: Lsn(0x16_B374_B000),
        acknowledged: Lsn(0x16_B374_A000),
    };
    m.positions(&ladder);
    assert_eq!(ladder.lag_bytes(), 0x3848);
    assert_lines(
        &encoded(&m),
        &[
            "# TYPE evictd_position_acknowledged_bytes gauge",
            "# UNIT evictd_position_acknowledged_bytes bytes",
            "evictd_position_wal_end_bytes 97500059720",
            "evictd_position_received_bytes 97500057600",
            "evictd_position_resolved_bytes 97500053504",
            "evictd_position_applied_bytes 97500049408",
            "evictd_position_acknowledged_bytes 97500045312",
            "evictd_source_lag_bytes 14408",
        ],
    );
}

#[test]
fn lag_is_zero_when_the_acknowledged_position_passed_the_last_reported_wal_end() {
    let ladder = PositionLadder { wal_end: Lsn(100), acknowledged: Lsn(150), ..PositionLadder::default() };
    assert_eq!(ladder.lag_bytes(), 0);
}

#[test]
fn commit_to_applied_latency_lands_in_its_bucket() {
    let m = Metrics::new();
    m.commit_to_applied(Duration::from_millis(3));
    assert_lines(
        &encoded(&m),
        &[
            "# TYPE evictd_commit_to_applied_seconds histogram",
            "# UNIT evictd_commit_to_applied_seconds seconds",
            "evictd_commit_to_applied_seconds_sum 0.003",
            "evictd_commit_to_applied_seconds_count 1",
            r#"evictd_commit_to_applied_seconds_bucket{le="0.0005"} 0"#,
            r#"evictd_commit_to_applied_seconds_bucket{le="0.0025"} 0"#,
            r#"evictd_commit_to_applied_seconds_bucket{le="0.005"} 1"#,
            r#"evictd_commit_to_applied_seconds_bucket{le="60.0"} 1"#,
            r#"evictd_commit_to_applied_seconds_bucket{le="+Inf"} 1"#,
        ],
    );
}

#[test]
fn a_batch_records_its_size_and_duration() {
    let m = Metrics::new();
    m.batch_applied(150, Duration::from_millis(20));
    assert_lines(
        &encoded(&m),
        &[
            r#"evictd_batch_effects_bucket{le="100.0"} 0"#,
            r#"evictd_batch_effects_bucket{le="200.0"} 1"#,
            "evictd_batch_effects_sum 150.0",
            r#"evictd_batch_duration_seconds_bucket{le="0.01"} 0"#,
            r#"evictd_batch_duration_seconds_bucket{le="0.025"} 1"#,
        ],
    );
}

#[test]
fn sink_series_start_at_zero_and_count_errors_by_kind() {
    let m = Metrics::new();
    m.sink_target("primary");
    assert_lines(
        &encoded(&m),
        &[
            r#"evictd_sink_errors_total{target="primary",kind="transient"} 0"#,
            r#"evictd_sink_errors_total{target="primary",kind="definite"} 0"#,
            r#"evictd_sink_retries_total{target="primary"} 0"#,
        ],
    );
    m.sink_error("primary", SinkErrorKind::Transient);
    m.sink_error("primary", SinkErrorKind::Transient);
    m.sink_retry("primary");
    m.sink_error("eu", SinkErrorKind::Definite);
    assert_lines(
        &encoded(&m),
        &[
            r#"evictd_sink_errors_total{target="primary",kind="transient"} 2"#,
            r#"evictd_sink_errors_total{target="eu",kind="definite"} 1"#,
            r#"evictd_sink_retries_total{target="primary"} 1"#,
        ],
    );
}

#[test]
fn dead_letters_look_ups_and_overflows_are_counted() {
    let m = Metrics::new();
    m.dead_lettered("app.items", DeadLetterReason::LookupFailed);
    m.dead_letter_store();
    m.dead_letter_write_error("transient");
    m.lookups("article_detail", 2, 340);
    m.fanout_overflow("article_detail");
    assert_lines(
        &encoded(&m),
        &[
            r#"evictd_dead_letters_total{table="app.items",reason="lookup_failed"} 1"#,
            r#"evictd_dead_letter_write_errors_total{kind="transient"} 1"#,
            r#"evictd_dead_letter_write_errors_total{kind="definite"} 0"#,
            r#"evictd_lookup_queries_total{cache="article_detail"} 2"#,
            r#"evictd_lookup_rows_total{cache="article_detail"} 340"#,
            r#"evictd_lookup_fanout_overflows_total{cache="article_detail"} 1"#,
        ],
    );
}

#[test]
fn build_info_carries_the_version_and_the_role_follows_set_role() {
    let m = Metrics::new();
    let version = format!(r#"evictd_build_info{{version="{}"}} 1"#, env!("CARGO_PKG_VERSION"));
    assert_lines(&encoded(&m), &[&version, "evictd_active 1"]);
    m.set_role(Role::Standby);
    assert_lines(&encoded(&m), &["evictd_active 0"]);
}

/// Every constant is a name Prometheus will see, in our naming form, with
/// help text; and the exposition is complete OpenMetrics.
#[test]
fn every_declared_name_is_exposed_as_written() {
    let m = Metrics::new();
    m.changes_received("t.t", Operation::Insert, 1);
    m.effects_resolved("c", Invalidation::NamespaceBump, 1);
    m.sink_target("primary");
    m.dead_lettered("t.t", DeadLetterReason::LookupAttemptsExhausted);
    m.dead_letter_store();
    m.lookups("c", 1, 1);
    m.fanout_overflow("c");
    m.kafka_message_counter("dbserver1.shop.products", "u").inc();
    let offsets = KafkaOffsets { position: Some(9), committed: Some(7), high_watermark: Some(10), lag: Some(3) };
    m.kafka_partition("dbserver1.shop.products", 0, Some(&offsets));
    m.second_delete_failed("primary");
    m.broadcast_published("primary", &["pubsub"], BroadcastKind::Batch, true);
    m.set_sink_up("primary", true);
    m.progressed();
    m.change_arrived();
    m.http_connection_refused();
    m.kafka_dead_lettered("dbserver1.shop.products", "decode");
    m.kafka_rebalance("assign");
    m.unguarded_keys("primary", "c", 1);
    m.kafka_offset_reset("stop");
    m.redeletes_skipped("primary", 1);
    m.unbumpable_keys("primary", "c", 1);
    m.operator_actions("primary", "invalidate", "applied", 1, &mut 0);
    let text = encoded(&m);
    assert!(text.ends_with("# EOF\n"), "{text}");
    for name in ALL {
        assert!(name.starts_with("evictd_"), "{name}");
        let sample = |l: &&str| {
            let rest = l.strip_prefix(name).unwrap_or("-");
            rest.starts_with(' ') || rest.starts_with('{') || rest.starts_with("_count ")
        };
        assert!(text.lines().any(|l| sample(&l)), "{name} has no sample in:\n{text}");
        let family = name.strip_suffix("_total").unwrap_or(name);
        let help = format!("# HELP {family} ");
        assert!(text.lines().any(|l| l.starts_with(&help) && l.len() > help.len() + 10), "{name}: no help");
        let is_counter = text.contains(&format!("# TYPE {family} counter\n"));
        assert_eq!(is_counter, name.ends_with("_total"), "{name}: counters, and only counters, end in _total");
    }
}

#[test]
fn second_delete_failures_start_at_zero_per_target_and_count() {
    let m = Metrics::new();
    m.sink_target("primary");
    assert_lines(&encoded(&m), &[r#"evictd_sink_second_delete_failures_total{target="primary"} 0"#]);
    m.second_delete_failed("primary");
    m.second_delete_failed("primary");
    assert_lines(
        &encoded(&m),
        &[
            "# TYPE evictd_sink_second_delete_failures counter",
            r#"evictd_sink_second_delete_failures_total{target="primary"} 2"#,
        ],
    );
}

#[test]
fn a_publish_on_both_transports_counts_once_per_transport_with_its_outcome() {
    let m = Metrics::new();
    m.broadcast_target("primary", &["pubsub", "stream"]);
    assert_lines(
        &encoded(&m),
        &[
            r#"evictd_broadcast_publishes_total{target="primary",transport="stream",kind="batch",outcome="error"} 0"#,
            r#"evictd_broadcast_publishes_total{target="primary",transport="pubsub",kind="heartbeat",outcome="ok"} 0"#,
        ],
    );
    m.broadcast_published("primary", &["pubsub", "stream"], BroadcastKind::Batch, true);
    m.broadcast_published("primary", &["pubsub", "stream"], BroadcastKind::Batch, false);
    m.broadcast_published("primary", &["pubsub"], BroadcastKind::Heartbeat, true);
    let text = encoded(&m);
    assert_lines(
        &text,
        &[
            "# TYPE evictd_broadcast_publishes counter",
            r#"evictd_broadcast_publishes_total{target="primary",transport="pubsub",kind="batch",outcome="ok"} 1"#,
            r#"evictd_broadcast_publishes_total{target="primary",transport="stream",kind="batch",outcome="ok"} 1"#,
            r#"evictd_broadcast_publishes_total{target="primary",transport="pubsub",kind="batch",outcome="error"} 1"#,
            r#"evictd_broadcast_publishes_total{target="primary",transport="stream",kind="batch",outcome="error"} 1"#,
            r#"evictd_broadcast_publishes_total{target="primary",transport="pubsub",kind="heartbeat",outcome="ok"} 1"#,
        ],
    );
    // The stream transport carries no heartbeats: no series for them.
    assert!(!text.contains(r#"transport="stream",kind="heartbeat""#), "{text}");
}

#[test]
fn sink_up_starts_down_with_its_target_and_follows_reachability() {
    let m = Metrics::new();
    m.sink_target("primary");
    assert_lines(&encoded(&m), &["# TYPE evictd_sink_up gauge", r#"evictd_sink_up{target="primary"} 0"#]);
    m.set_sink_up("primary", true);
    assert_lines(&encoded(&m), &[r#"evictd_sink_up{target="primary"} 1"#]);
    m.set_sink_up("primary", false);
    assert_lines(&encoded(&m), &[r#"evictd_sink_up{target="primary"} 0"#]);
}

#[test]
fn kafka_partition_offsets_are_set_together_and_forgotten_on_revocation() {
    let m = Metrics::new();
    let offsets = KafkaOffsets { position: Some(120), committed: Some(100), high_watermark: Some(130), lag: Some(30) };
    m.kafka_partition("db.shop.products", 2, Some(&offsets));
    m.kafka_partition("db.shop.skus", 0, Some(&KafkaOffsets { position: Some(4), ..KafkaOffsets::default() }));
    assert_lines(
        &encoded(&m),
        &[
            "# TYPE evictd_kafka_position_offset gauge",
            r#"evictd_kafka_position_offset{topic="db.shop.products",partition="2"} 120"#,
            r#"evictd_kafka_committed_offset{topic="db.shop.products",partition="2"} 100"#,
            r#"evictd_kafka_high_watermark_offset{topic="db.shop.products",partition="2"} 130"#,
            r#"evictd_kafka_consumer_lag_messages{topic="db.shop.products",partition="2"} 30"#,
            r#"evictd_kafka_position_offset{topic="db.shop.skus",partition="0"} 4"#,
        ],
    );
    m.kafka_partition("db.shop.products", 2, None);
    let text = encoded(&m);
    assert!(!text.contains(r#"topic="db.shop.products""#), "revoked partition still exposed:\n{text}");
    // Unknown offsets were never exposed for the other partition either.
    assert!(!text.contains(r#"evictd_kafka_committed_offset{topic="db.shop.skus""#), "{text}");
    assert_lines(&text, &[r#"evictd_kafka_position_offset{topic="db.shop.skus",partition="0"} 4"#]);
}

/// The value of the one sample of `name` (no labels).
fn sample(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ')));
    line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn progress_and_change_timestamps_start_at_zero_and_take_the_current_unix_time() {
    let m = Metrics::new();
    let text = encoded(&m);
    assert_lines(&text, &["# TYPE evictd_last_progress_timestamp_seconds gauge"]);
    assert_lines(&text, &["# UNIT evictd_last_change_timestamp_seconds seconds"]);
    assert_eq!(sample(&text, "evictd_last_progress_timestamp_seconds"), 0.0);
    assert_eq!(sample(&text, "evictd_last_change_timestamp_seconds"), 0.0);
    let before = unix_now_seconds();
    m.change_arrived();
    let between = unix_now_seconds();
    m.progressed();
    let after = unix_now_seconds();
    let text = encoded(&m);
    let change = sample(&text, "evictd_last_change_timestamp_seconds");
    let progress = sample(&text, "evictd_last_progress_timestamp_seconds");
    assert!(before <= change && change <= between, "{before} <= {change} <= {between}");
    assert!(between <= progress && progress <= after, "{between} <= {progress} <= {after}");
}

#[test]
fn refused_http_connections_are_counted() {
    let m = Metrics::new();
    assert_lines(&encoded(&m), &["evictd_http_connections_refused_total 0"]);
    m.http_connection_refused();
    assert_lines(&encoded(&m), &["evictd_http_connections_refused_total 1"]);
}

mod process_metrics {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::DescriptorEncoder;
    use prometheus_client::registry::Registry;

    use super::super::process::{
        ProcessSample, Stat, encode_sample, parse_boot_time, parse_max_fds, parse_stat, status_kib,
    };
    use super::{assert_lines, encoded, sample};
    use crate::metrics::Metrics;

    #[derive(Debug)]
    struct Fixed(ProcessSample);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_sample(&self.0, &mut encoder)
        }
    }

    fn text_of(sample: ProcessSample) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(sample)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn each_read_value_is_exposed_under_its_standard_name() {
        let text = text_of(ProcessSample {
            cpu_seconds: Some(12.34),
            resident_bytes: Some(25 << 20),
            virtual_bytes: Some(900 << 20),
            open_fds: Some(17),
            max_fds: Some(1_048_576),
            start_time_seconds: Some(1_764_000_000.25),
        });
        assert_lines(
            &text,
            &[
                "# TYPE process_cpu_seconds counter",
                "# UNIT process_cpu_seconds seconds",
                "process_cpu_seconds_total 12.34",
                "# TYPE process_resident_memory_bytes gauge",
                "process_resident_memory_bytes 26214400",
                "process_virtual_memory_bytes 943718400",
                "process_open_fds 17",
                "process_max_fds 1048576",
                "# TYPE process_start_time_seconds gauge",
                "process_start_time_seconds 1764000000.25",
            ],
        );
    }

    #[test]
    fn what_could_not_be_read_is_left_out_and_the_scrape_still_succeeds() {
        let text = text_of(ProcessSample { open_fds: Some(3), ..ProcessSample::default() });
        assert_lines(&text, &["process_open_fds 3"]);
        assert!(!text.contains("process_cpu") && !text.contains("process_max_fds"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn proc_files_parse_as_proc5_describes_them() {
        // A comm with spaces and parentheses: fields count from the last `)`.
        let stat = "4242 (evictd (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 98765 912345678 6400 18446744073709551615 1 1 0 0 0 0 0 4096 17664 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(stat), Some(Stat { utime: 250, stime: 75, starttime: 98765 }));
        assert_eq!(parse_stat("4242 (evictd) S 1"), None, "too few fields");
        assert_eq!(parse_boot_time("cpu  1 2 3\nbtime 1764000000\nprocesses 9\n"), Some(1_764_000_000));
        let status = "Name:\tevictd\nVmSize:\t  921600 kB\nVmRSS:\t   25600 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(25600));
        assert_eq!(status_kib(status, "VmSize:"), Some(921_600));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(parse_max_fds("Max open files            unlimited            unlimited            files\n"), None);
    }

    /// On Linux the real `/proc/self` is read at each scrape.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_scrape_reads_this_process_from_proc() {
        let m = Metrics::new();
        let text = encoded(&m);
        for name in ["process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds"] {
            assert!(sample(&text, name) > 0.0, "{name} in:\n{text}");
        }
        assert!(sample(&text, "process_max_fds") >= sample(&text, "process_open_fds"), "{text}");
        assert!(sample(&text, "process_cpu_seconds_total") >= 0.0, "{text}");
        let start = sample(&text, "process_start_time_seconds");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        // Started before now, and not before this test binary could have (a day back).
        assert!(start <= now + 1.0 && start > now - 86_400.0, "start {start}, now {now}");
    }
}

#[test]
fn operator_actions_follow_the_recorded_counts_and_a_lower_count_is_a_reset() {
    let m = Metrics::new();
    let series = r#"evictd_operator_actions_total{target="primary",action="slot drop",outcome="refused"}"#;
    let mut last = 0;
    m.operator_actions("primary", "slot drop", "refused", 2, &mut last);
    assert_lines(&encoded(&m), &["# TYPE evictd_operator_actions counter", &format!("{series} 2")]);
    m.operator_actions("primary", "slot drop", "refused", 2, &mut last);
    assert_lines(&encoded(&m), &[&format!("{series} 2")]);
    // The hash was lost: the counter stays, and counts from the new value on.
    m.operator_actions("primary", "slot drop", "refused", 1, &mut last);
    assert_lines(&encoded(&m), &[&format!("{series} 2")]);
    m.operator_actions("primary", "slot drop", "refused", 3, &mut last);
    assert_lines(&encoded(&m), &[&format!("{series} 4")]);
}

#[test]
fn operator_action_series_are_capped() {
    let m = Metrics::new();
    for i in 0..OPERATOR_ACTION_SERIES_MAX + 10 {
        m.operator_actions("primary", &format!("action {i}"), "ok", 1, &mut 0);
    }
    let text = encoded(&m);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("evictd_operator_actions_total{")).count(),
        OPERATOR_ACTION_SERIES_MAX
    );
    // A series already there still counts.
    let mut last = 1;
    m.operator_actions("primary", "action 0", "ok", 5, &mut last);
    assert_lines(
        &encoded(&m),
        &[r#"evictd_operator_actions_total{target="primary",action="action 0",outcome="ok"} 5"#],
    );
}
