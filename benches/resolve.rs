//! Resolution and key-rendering throughput on the example graphs.
//!
//! `cargo bench --bench resolve`; the README quotes the medians. One
//! iteration resolves one change (or renders one key) on one core.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use evictd::change::{Change, Operation, Row, Value};
use evictd::graph::load_paths;
use evictd::key::KeyTemplate;
use evictd::resolve::Resolver;

fn row(pairs: &[(&str, Value)]) -> Row {
    let mut row = Row::new();
    for (column, value) in pairs {
        row = row.with(column, value.clone());
    }
    row
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn resolution(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let graph = load_paths(&[root.join("dependency-graphs")]).unwrap();
    let resolver = Resolver::new(&graph);

    // Direct: a new comment drops its article's comment list (one key).
    let comment = Change::new(
        "content.comments",
        Operation::Insert,
        None,
        Some(row(&[
            ("id", Value::Int(100)),
            ("article_id", Value::Int(10)),
            ("author_id", Value::Int(2)),
            ("body", text("Which shoe for mud?")),
            ("created_at", text("2026-11-23 10:00:00+00")),
        ])),
    );
    // Direct: a new follow, two counters and a timeline tag.
    let follow = Change::new(
        "content.follows",
        Operation::Insert,
        None,
        Some(row(&[
            ("follower_id", Value::Int(2)),
            ("followee_id", Value::Int(3)),
            ("created_at", text("2026-11-23 10:00:00+00")),
        ])),
    );
    // Embeds-heavy: a product renamed and moved to another category: detail,
    // page (embeds detail), both listings, bestsellers, search tags.
    let product = |name: &str, category: i64| {
        row(&[
            ("id", Value::Int(1)),
            ("slug", text("trail-runner-2")),
            ("brand_id", Value::Int(10)),
            ("category_id", Value::Int(category)),
            ("name", text(name)),
            ("description", text("Grippy.")),
            ("status", text("active")),
            ("updated_at", text("2026-11-20 10:00:00+00")),
        ])
    };
    let product_update = Change::new(
        "shop.products",
        Operation::Update,
        Some(product("Trail Runner 2", 3)),
        Some(product("Trail Runner 3", 4)),
    );
    // Tag-heavy: an article moves to another author (keys and tags, old and new).
    let article = |author: i64| {
        row(&[
            ("id", Value::Int(10)),
            ("author_id", Value::Int(author)),
            ("title", text("Choosing trail shoes")),
            ("slug", text("choosing-trail-shoes")),
            ("body", text("b")),
            ("status", text("published")),
            ("published_at", text("2026-11-01 09:00:00+00")),
        ])
    };
    let article_move = Change::new("content.articles", Operation::Update, Some(article(1)), Some(article(3)));
    // A filtered-out update: what most writes to a wide table look like.
    let mut touched = product("Trail Runner 2", 3);
    touched.set("updated_at", evictd::change::Cell::Known(text("2026-11-23 08:00:00+00")));
    let irrelevant = Change::new("shop.products", Operation::Update, Some(product("Trail Runner 2", 3)), Some(touched));

    let mut group = c.benchmark_group("resolve");
    for (name, change) in [
        ("direct/comment_insert", &comment),
        ("direct/follow_insert", &follow),
        ("embeds/product_update", &product_update),
        ("tags/article_author_move", &article_move),
        ("filtered/product_touch", &irrelevant),
    ] {
        assert!(
            !resolver.resolve(change).effects.is_empty() || name.starts_with("filtered"),
            "{name} resolves to nothing"
        );
        group.bench_function(name, |b| b.iter(|| resolver.resolve(black_box(change))));
    }
    group.finish();
}

fn rendering(c: &mut Criterion) {
    let mut group = c.benchmark_group("render");
    let cases: [(&str, &str, Vec<Value>); 4] = [
        ("integer", "user:{id}:profile", vec![Value::Int(42)]),
        ("hash_tag", "product:{{{id}}}:detail", vec![Value::Int(882_391)]),
        ("query_section", "spu:{id}:{?size,color|lower}", vec![Value::Int(882_391), text("XL"), text("Red")]),
        ("sha256", "user:email:{email|trim|lower|sha256}", vec![text(" Ann@Example.com ")]),
    ];
    for (name, source, values) in cases {
        let template = KeyTemplate::parse(source).unwrap();
        let refs: Vec<Option<&Value>> = values.iter().map(Some).collect();
        group.bench_function(name, |b| b.iter(|| template.render(black_box(&refs)).unwrap()));
    }
    let template = KeyTemplate::parse("spu:{id}:{?size,color}").unwrap();
    let params: HashMap<String, Value> =
        [("id".to_owned(), Value::Int(1)), ("size".to_owned(), text("XL")), ("color".to_owned(), text("red"))].into();
    group.bench_function("by_name", |b| b.iter(|| template.render_map(black_box(&params)).unwrap()));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = resolution, rendering
}
criterion_main!(benches);
