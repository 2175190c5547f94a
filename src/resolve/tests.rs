use super::*;
use crate::change::Row;
use crate::diagnostic::SourceFile;
use crate::graph::load::load_sources;
use proptest::prelude::*;

const GRAPH: &str = r#"
[tables."app.users"]
key = ["id"]
columns = ["id", "name", "email", "bio"]

[tables."app.articles"]
key = ["id"]
columns = ["id", "author_id", "title", "body", "category"]

[caches.user]
key = "user:{id}"
[[caches.user.depends]]
table = "app.users"
columns = ["name"]

[caches.user_by_email]
key = "user:email:{email|lower}"
[[caches.user_by_email.depends]]
table = "app.users"

[caches.user_card]
key = "card:{uid}"
[[caches.user_card.depends]]
embeds = "user"
bind = { uid = "id" }

[caches.user_page]
key = "page:{uid}"
[[caches.user_page.depends]]
embeds = "user_card"

[caches.article]
key = "article:{id}"
action = "bump"
[[caches.article.depends]]
table = "app.articles"
columns = ["title", "body"]
[[caches.article.depends]]
embeds = "user"
lookup = { query = "SELECT id FROM app.articles WHERE author_id = ANY($1)", arg = "id" }

[caches.author_articles]
key = "author:{author_id}:articles"
[[caches.author_articles.depends]]
table = "app.articles"
columns = ["title"]

[caches.feed]
key = "feed:{?page}"
[[caches.feed.depends]]
table = "app.articles"
tags = ["category:{category}", "author:{author_id}"]

[caches.by_category]
key = "category:{category}"
[[caches.by_category.depends]]
table = "app.articles"
lookup = { query = "SELECT category FROM app.articles WHERE author_id = ANY($1)", arg = "author_id" }
"#;

fn graph() -> Graph {
    load_sources(&[SourceFile::new("test.toml", GRAPH.to_owned())]).unwrap()
}

fn user(id: i64, name: &str, email: &str) -> Row {
    Row::new()
        .with("id", Value::Int(id))
        .with("name", Value::Text(name.into()))
        .with("email", Value::Text(email.into()))
        .with("bio", Value::Null)
}

fn article(id: i64, author: i64, title: &str, category: &str) -> Row {
    Row::new()
        .with("id", Value::Int(id))
        .with("author_id", Value::Int(author))
        .with("title", Value::Text(title.into()))
        .with("body", Value::Text("b".into()))
        .with("category", Value::Text(category.into()))
}

/// Effects as readable strings, sorted.
fn effects(graph: &Graph, r: &Resolution) -> Vec<String> {
    let mut out: Vec<String> = r
        .effects
        .iter()
        .map(|e| match &e.effect {
            Effect::Key { cache, key } => format!("{}:{key}", graph.cache(*cache).name),
            Effect::Tag { tag, .. } => format!("tag:{tag}"),
            Effect::NamespaceBump { cache } => format!("ns:{}", graph.cache(*cache).name),
        })
        .collect();
    out.sort();
    out
}

fn resolve(graph: &Graph, change: &Change) -> Resolution {
    Resolver::new(graph).resolve(change)
}

#[test]
fn an_update_of_a_filtered_column_invalidates_the_key_and_every_embedder() {
    let g = graph();
    let c = Change::new("app.users", Operation::Update, Some(user(1, "ann", "a@x")), Some(user(1, "anne", "a@x")));
    let r = resolve(&g, &c);
    assert_eq!(
        effects(&g, &r),
        ["user:user:1", "user_by_email:user:email:a@x", "user_card:card:1", "user_page:page:1"]
    );
    assert_eq!(r.lookups.len(), 1, "the article look-up through embeds is requested");
    assert_eq!(r.lookups[0].arg, Value::Int(1));
    let page = r.effects.iter().find(|e| matches!(&e.effect, Effect::Key { key, .. } if key == "page:1")).unwrap();
    assert_eq!(page.reasons[0].path.len(), 3, "table → user → user_card → user_page");
    assert_eq!(page.reasons[0].cause, Cause::Row(Image::Both));
}

#[test]
fn an_update_that_changes_no_filtered_column_is_skipped() {
    let g = graph();
    let mut after = user(1, "ann", "a@x");
    after.set("bio", Cell::Known(Value::Text("new bio".into())));
    let c = Change::new("app.users", Operation::Update, Some(user(1, "ann", "a@x")), Some(after));
    let r = resolve(&g, &c);
    assert_eq!(effects(&g, &r), ["user_by_email:user:email:a@x"], "only the unfiltered dependency fires");
    assert!(matches!(r.skipped[0], Skip::Filtered { .. }));
    assert!(r.lookups.is_empty());
}

#[test]
fn an_unknown_old_value_counts_as_changed() {
    let g = graph();
    // No old image at all (REPLICA IDENTITY DEFAULT): the filter must pass.
    let c = Change::new("app.users", Operation::Update, None, Some(user(1, "ann", "a@x")));
    let r = resolve(&g, &c);
    assert!(effects(&g, &r).contains(&"user:user:1".to_owned()));
}

#[test]
fn an_unchanged_toast_value_is_not_a_change_and_renders_from_the_old_row() {
    let g = graph();
    let mut after = Row::new().with("id", Value::Int(1)).with("name", Value::Text("ann".into()));
    after.set("email", Cell::Unknown);
    let c = Change::new("app.users", Operation::Update, Some(user(1, "ann", "A@X")), Some(after));
    let r = resolve(&g, &c);
    // name unchanged → `user` skipped; email unknown in the new row → taken from the old row.
    assert_eq!(effects(&g, &r), ["user_by_email:user:email:a@x"]);
}

#[test]
fn an_unknown_key_value_bumps_the_namespace_of_the_cache_and_its_embedders() {
    let g = graph();
    // The old email was not sent: its key cannot be rendered.
    let before = Row::new().with("id", Value::Int(1));
    let c = Change::new("app.users", Operation::Update, Some(before), Some(user(1, "ann", "b@x")));
    let r = resolve(&g, &c);
    let e = effects(&g, &r);
    assert!(e.contains(&"ns:user_by_email".to_owned()), "{e:?}");
    assert!(e.contains(&"user_by_email:user:email:b@x".to_owned()), "the new key is still deleted: {e:?}");
    // The identity column missing from the old image is taken as unchanged.
    assert!(e.contains(&"user:user:1".to_owned()), "{e:?}");
}

#[test]
fn a_key_column_move_invalidates_the_old_and_the_new_key_even_when_filtered_out() {
    let g = graph();
    let c = Change::new(
        "app.articles",
        Operation::Update,
        Some(article(9, 1, "t", "news")),
        Some(article(9, 2, "t", "news")),
    );
    let r = resolve(&g, &c);
    let e = effects(&g, &r);
    assert!(e.contains(&"author_articles:author:1:articles".to_owned()), "{e:?}");
    assert!(e.contains(&"author_articles:author:2:articles".to_owned()), "{e:?}");
    assert!(!e.iter().any(|x| x.starts_with("article:")), "title and body did not change: {e:?}");
    assert!(e.contains(&"tag:author:1".to_owned()) && e.contains(&"tag:author:2".to_owned()));
    let args: Vec<&Value> = r.lookups.iter().map(|l| &l.arg).collect();
    assert_eq!(args, [&Value::Int(1), &Value::Int(2)], "look-up with the old and the new argument");
}

#[test]
fn an_insert_renders_from_the_new_row_and_a_delete_from_the_old() {
    let g = graph();
    let insert = Change::new("app.users", Operation::Insert, None, Some(user(3, "c", "c@x")));
    let e = effects(&g, &resolve(&g, &insert));
    assert!(e.contains(&"user:user:3".to_owned()), "an insert drops a cached not-found: {e:?}");
    let delete = Change::new("app.users", Operation::Delete, Some(user(3, "c", "c@x")), None);
    let e = effects(&g, &resolve(&g, &delete));
    assert!(e.contains(&"user:user:3".to_owned()) && e.contains(&"user_by_email:user:email:c@x".to_owned()));
}

#[test]
fn truncate_bumps_every_dependent_namespace_transitively() {
    let g = graph();
    let c = Change::new("app.users", Operation::Truncate, None, None);
    // `article` embeds `user` through a look-up: it is bumped too.
    assert_eq!(
        effects(&g, &resolve(&g, &c)),
        ["ns:article", "ns:user", "ns:user_by_email", "ns:user_card", "ns:user_page"]
    );
}

#[test]
fn a_null_parameter_renders_no_key_and_says_so() {
    let g = graph();
    let mut row = article(4, 1, "t", "x");
    row.set("category", Cell::Known(Value::Null));
    let c = Change::new("app.articles", Operation::Insert, None, Some(row));
    let r = resolve(&g, &c);
    let e = effects(&g, &r);
    assert!(!e.iter().any(|x| x.starts_with("tag:category")), "{e:?}");
    assert!(e.contains(&"tag:author:1".to_owned()));
    assert!(r.skipped.iter().any(|s| matches!(s, Skip::Null { name, .. } if &**name == "category")));
}

#[test]
fn many_effects_are_deduplicated_past_the_scan_limit() {
    let mut r = Resolution::default();
    let reason = |image| Reason { path: Path::new(), cause: Cause::Row(image) };
    for round in [Image::Old, Image::New] {
        for k in 0..100 {
            r.add(Effect::Key { cache: CacheId(0), key: format!("k{k}") }, reason(round));
        }
    }
    assert_eq!(r.effects.len(), 100);
    assert!(r.effects.iter().all(|e| e.reasons.as_slice() == [reason(Image::Both)]));
}

#[test]
fn a_table_outside_the_graph_resolves_to_nothing() {
    let g = graph();
    let c = Change::new("app.other", Operation::Insert, None, Some(Row::new()));
    assert!(resolve(&g, &c).is_empty());
}

#[test]
fn lookup_rows_render_keys_and_follow_embeds() {
    let g = graph();
    let dep = g.cache(g.cache_id("article").unwrap()).dependencies[1];
    let r =
        Resolver::new(&g).resolve_lookup_rows(dep, &Path::new(), &[vec![Some(Value::Text("7".into()))], vec![None]]);
    assert_eq!(effects(&g, &r), ["article:article:7"], "a NULL look-up value renders no key");
}

#[test]
fn an_oversized_fanout_becomes_a_namespace_bump() {
    let g = graph();
    let dep = g.cache(g.cache_id("article").unwrap()).dependencies[1];
    let r = Resolver::new(&g).fanout_exceeded(dep, &Path::new(), 20_001);
    assert_eq!(effects(&g, &r), ["ns:article"]);
    assert_eq!(r.effects[0].reasons[0].cause, Cause::FanoutExceeded { rows: 20_001, limit: 10_000 });
}

#[test]
fn equal_lookup_requests_share_a_key_and_different_ones_do_not() {
    use std::collections::HashSet;
    let req = |d, arg| LookupRequest { dependency: DepId(d), arg, path: Path::new() };
    let nan = Value::Float(f64::NAN);
    let other_nan = Value::Float(f64::from_bits(f64::NAN.to_bits() | 1));
    let requests = [
        req(0, Value::Int(5)),
        req(0, Value::Int(5)),
        req(1, Value::Int(5)),
        req(0, Value::Text("5".into())),
        req(0, Value::Float(1.5)),
        req(0, Value::Float(1.5)),
        req(0, Value::Float(0.0)),
        req(0, Value::Float(-0.0)),
        req(0, nan.clone()),
        req(0, other_nan),
        req(0, Value::Null),
        req(0, Value::Null),
        req(1, Value::Null),
        req(0, Value::Bytes(vec![1, 2])),
        req(0, Value::Text("\\x0102".into())),
    ];
    let mut seen = HashSet::new();
    let kept: Vec<String> =
        requests.iter().filter(|r| seen.insert(r.key())).map(|r| format!("{} {:?}", r.dependency.0, r.arg)).collect();
    assert_eq!(
        kept,
        [
            "0 Int(5)",
            "1 Int(5)",
            "0 Text(\"5\")",
            "0 Float(1.5)",
            "0 Float(0.0)",
            "0 Float(-0.0)",
            "0 Float(NaN)",
            "0 Null",
            "1 Null",
            "0 Bytes([1, 2])",
            "0 Text(\"\\\\x0102\")",
        ],
        "the same dependency and argument once; another dependency, variant, sign of zero or NULL's dependency apart"
    );
    // `same_lookup` agrees with the keys, NaN included (where `==` does not).
    assert!(req(0, nan.clone()).same_lookup(&req(0, nan)));
    assert!(!req(0, Value::Float(0.0)).same_lookup(&req(0, Value::Float(-0.0))));
    assert!(req(2, Value::Null).same_lookup(&req(2, Value::Null)));
    assert!(!req(2, Value::Null).same_lookup(&req(2, Value::Text("NULL".into()))));
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![Just(Value::Null), (0i64..5).prop_map(Value::Int), "[a-c:]{0,3}".prop_map(Value::Text),]
}

fn arb_cell() -> impl Strategy<Value = Cell> {
    prop_oneof![1 => Just(Cell::Unknown), 6 => arb_value().prop_map(Cell::Known)]
}

fn arb_row(columns: &'static [&'static str]) -> impl Strategy<Value = Option<Row>> {
    prop::option::of(prop::collection::vec(arb_cell(), columns.len()).prop_map(move |cells| {
        let mut row = Row::new();
        for (c, cell) in columns.iter().zip(cells) {
            row.set(*c, cell);
        }
        row
    }))
}

const ARTICLE_COLUMNS: &[&str] = &["id", "author_id", "title", "body", "category"];

proptest! {
    /// Whatever the rows, resolution is deterministic, lists each effect
    /// once, never leaves a cache whose key could not be rendered
    /// unaccounted for, and every key it renders comes from a cell it saw.
    #[test]
    fn resolution_is_deterministic_and_deduplicated(
        op in prop_oneof![Just(Operation::Insert), Just(Operation::Update), Just(Operation::Delete)],
        before in arb_row(ARTICLE_COLUMNS),
        after in arb_row(ARTICLE_COLUMNS),
    ) {
        let g = graph();
        let (before, after) = match op {
            Operation::Insert => (None, after.or_else(|| Some(Row::new()))),
            Operation::Delete => (before.or_else(|| Some(Row::new())), None),
            _ => (before, after.or_else(|| Some(Row::new()))),
        };
        let c = Change::new("app.articles", op, before, after);
        let first = resolve(&g, &c);
        let second = resolve(&g, &c);
        prop_assert_eq!(effects(&g, &first), effects(&g, &second));
        let mut seen = std::collections::HashSet::new();
        for e in &first.effects {
            prop_assert!(seen.insert(e.effect.clone()), "duplicate effect {:?}", e.effect);
            prop_assert!(!e.reasons.is_empty());
        }
        // Every author-list key names an author_id the change carried.
        for e in &first.effects {
            if let Effect::Key { cache, key } = &e.effect
                && &*g.cache(*cache).name == "author_articles" {
                    let id = key.trim_start_matches("author:").trim_end_matches(":articles");
                    let carried = [c.old("author_id"), c.new_cell("author_id")]
                        .iter()
                        .any(|cell| matches!(cell, Cell::Known(v) if crate::key::KeyTemplate::parse("{v}").unwrap().render(&[Some(v)]).ok().as_deref() == Some(id)));
                    prop_assert!(carried, "key {} from no carried value", key);
                }
        }
    }

    /// An update whose rows are identical invalidates nothing through
    /// filtered dependencies.
    #[test]
    fn an_identical_update_passes_no_filter(row in arb_row(ARTICLE_COLUMNS)) {
        let g = graph();
        let Some(row) = row else { return Ok(()) };
        let known = ARTICLE_COLUMNS.iter().all(|c| matches!(row.get(c), Cell::Known(_)));
        prop_assume!(known);
        let c = Change::new("app.articles", Operation::Update, Some(row.clone()), Some(row));
        let r = resolve(&g, &c);
        for e in &r.effects {
            let name = &*g.cache(e.effect.cache()).name;
            prop_assert!(name == "feed" || name == "by_category", "filtered cache {} fired", name);
        }
    }
}

#[test]
fn an_operator_key_follows_embeds_as_a_row_change_does() {
    let g = graph();
    let user = g.cache_id("user").unwrap();
    let r = Resolver::new(&g).operator_key(user, "user:1".into(), &[Some(Some(Value::Int(1)))]);
    assert_eq!(effects(&g, &r), ["user:user:1", "user_card:card:1", "user_page:page:1"]);
    assert_eq!(r.lookups.len(), 1, "the article look-up through embeds is requested");
    assert_eq!(r.lookups[0].arg, Value::Int(1));
    let key = r.effects.iter().find(|e| matches!(&e.effect, Effect::Key { key, .. } if key == "user:1")).unwrap();
    assert_eq!(key.reasons[0].cause, Cause::Operator);
    assert!(key.reasons[0].path.is_empty());
}

#[test]
fn an_operator_key_with_an_unknown_parameter_bumps_the_embedders_that_need_it() {
    let g = graph();
    let user = g.cache_id("user").unwrap();
    let r = Resolver::new(&g).operator_key(user, "user:1".into(), &[None]);
    assert_eq!(
        effects(&g, &r),
        ["ns:article", "ns:user_card", "ns:user_page", "user:user:1"],
        "never a silent miss: every embedder that reads `id` is bumped whole"
    );
    assert!(r.lookups.is_empty());
}

#[test]
fn an_operator_cache_bumps_it_and_its_embedders() {
    let g = graph();
    let r = Resolver::new(&g).operator_cache(g.cache_id("user_card").unwrap());
    assert_eq!(effects(&g, &r), ["ns:user_card", "ns:user_page"]);
}
