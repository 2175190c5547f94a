//! The `graph` command's output: Graphviz DOT and JSON.

use std::fmt::Write as _;

use petgraph::visit::EdgeRef;
use serde_json::{Value as Json, json};

use super::{Graph, LookupArg, Mapping, Node, Trigger};

/// Graphviz DOT: tables as boxes, caches as ellipses labelled with their key
/// template, one edge per dependency labelled with its kind and filter.
pub(crate) fn to_dot(graph: &Graph) -> String {
    let view = graph.view();
    let mut out = String::from("digraph evictd {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n");
    for index in view.node_indices() {
        let line = match view[index] {
            Node::Table(t) => {
                let table = graph.table(t);
                format!("  {} [shape=box, label={}];\n", node_id(&view[index], graph), quote(&table.name))
            }
            Node::Cache(c) => {
                let cache = graph.cache(c);
                let label = format!("{}\n{}\n({})", cache.name, cache.template, cache.options.action.as_str());
                format!("  {} [shape=ellipse, label={}];\n", node_id(&view[index], graph), quote(&label))
            }
        };
        out.push_str(&line);
    }
    for edge in view.edge_references() {
        let dep = graph.dependency(*edge.weight());
        let mut label = dep.mapping.kind(dep.trigger).to_owned();
        if let Some(filter) = &dep.filter {
            let cols: Vec<&str> = filter.iter().map(|c| &**c).collect();
            let _ = write!(label, " [{}]", cols.join(","));
        }
        if let Mapping::Tags(tags) = &dep.mapping {
            let names: Vec<&str> = tags.iter().map(|t| t.template.source()).collect();
            let _ = write!(label, " {}", names.join(" "));
        }
        let _ = writeln!(
            out,
            "  {} -> {} [label={}];",
            node_id(&view[edge.source()], graph),
            node_id(&view[edge.target()], graph),
            quote(&label)
        );
    }
    out.push_str("}\n");
    out
}

fn node_id(node: &Node, graph: &Graph) -> String {
    match node {
        Node::Table(t) => quote(&format!("table:{}", graph.table(*t).name)),
        Node::Cache(c) => quote(&format!("cache:{}", graph.cache(*c).name)),
    }
}

fn quote(s: &str) -> String {
    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// The whole graph as JSON, for tools and dashboards.
pub(crate) fn to_json(graph: &Graph) -> Json {
    let tables: Vec<Json> = graph
        .tables()
        .iter()
        .map(|t| {
            json!({
                "name": &*t.name,
                "key": t.key.iter().map(|c| &**c).collect::<Vec<_>>(),
                "columns": t.columns.iter().map(|c| &**c).collect::<Vec<_>>(),
                "location": t.location.to_string(),
            })
        })
        .collect();
    let caches: Vec<Json> = graph
        .caches()
        .iter()
        .map(|c| {
            let dependencies: Vec<Json> = c.dependencies.iter().map(|d| dependency_json(graph, *d)).collect();
            json!({
                "name": &*c.name,
                "key": c.template.source(),
                "params": c.template.params().iter().map(|p| &**p).collect::<Vec<_>>(),
                "description": c.description,
                "action": c.options.action.as_str(),
                "redelete_after_ms": c.options.redelete_after_ms,
                "broadcast": c.options.broadcast,
                "fanout_limit": c.options.fanout_limit,
                "expire_after_ms": c.options.expire_after_ms,
                "expire_jitter_ms": c.options.expire_jitter_ms,
                "location": c.location.to_string(),
                "depends": dependencies,
            })
        })
        .collect();
    json!({ "tables": tables, "caches": caches })
}

fn dependency_json(graph: &Graph, id: super::DepId) -> Json {
    let dep = graph.dependency(id);
    let cache = graph.cache(dep.cache);
    let mut out = json!({
        "kind": dep.mapping.kind(dep.trigger),
        "location": dep.location.to_string(),
    });
    match dep.trigger {
        Trigger::Table(t) => out["table"] = json!(&*graph.table(t).name),
        Trigger::Embeds(c) => out["embeds"] = json!(&*graph.cache(c).name),
    }
    if let Some(filter) = &dep.filter {
        out["columns"] = json!(filter.iter().map(|c| &**c).collect::<Vec<_>>());
    }
    match &dep.mapping {
        Mapping::Columns(columns) => {
            let bind: serde_json::Map<String, Json> =
                cache.template.params().iter().zip(columns).map(|(p, c)| (p.to_string(), json!(&**c))).collect();
            out["bind"] = Json::Object(bind);
        }
        Mapping::Params(params) => {
            if let Trigger::Embeds(e) = dep.trigger {
                let embedded = graph.cache(e);
                let bind: serde_json::Map<String, Json> = cache
                    .template
                    .params()
                    .iter()
                    .zip(params)
                    .map(|(p, i)| (p.to_string(), json!(&*embedded.template.params()[*i])))
                    .collect();
                out["bind"] = Json::Object(bind);
            }
        }
        Mapping::Lookup(lookup) => {
            let arg = match (&lookup.arg, dep.trigger) {
                (LookupArg::Column(c), _) => c.to_string(),
                (LookupArg::Param(i), Trigger::Embeds(e)) => graph.cache(e).template.params()[*i].to_string(),
                (LookupArg::Param(i), Trigger::Table(_)) => i.to_string(),
            };
            out["lookup"] = json!({ "query": lookup.query, "arg": arg, "timeout_ms": lookup.timeout_ms });
        }
        Mapping::Tags(tags) => {
            out["tags"] = json!(tags.iter().map(|t| t.template.source()).collect::<Vec<_>>());
        }
    }
    out
}
