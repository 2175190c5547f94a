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
    m.kafka_message("dbserver1.shop.products", "u");
    m.kafka_lag("dbserver1.shop.products", 0, Some(3));
    m.kafka_dead_lettered("dbserver1.shop.products", "decode");
    m.kafka_rebalance("assign");
    m.unguarded_keys("primary", "c", 1);
    m.kafka_offset_reset("stop");
    m.redeletes_skipped("primary", 1);
    m.unbumpable_keys("primary", "c", 1);
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
