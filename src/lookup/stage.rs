//! A batch's look-ups: run to completion through the pure resolver,
//! narrowed down to single changes when they fail, and the changes that
//! still fail handed on as dead letters.
//!
//! [`run_lookups`] runs a set of requests — one query per dependency, its
//! distinct arguments in `$1` — feeds the rows back to
//! [`Resolver::resolve_lookup_rows`] (or [`Resolver::fanout_exceeded`]),
//! and runs the look-ups those rows ask for along `embeds`, until none is
//! left.
//!
//! Failures are of four kinds ([`LookupFailure`], decided in `crate::policy`):
//! - **connection**: the database cannot be reached; waited out with
//!   backoff for as long as it lasts, never counted, never a dead letter;
//! - **retryable**: a statement timeout or another error a retry may fix;
//!   counted, and after `lookup_attempts` of them the look-ups give up;
//! - **definite**: the query fails for these values (division by zero, a
//!   bad cast) and will again; the look-ups give up at once;
//! - **broken query**: the query cannot run for any value (a syntax error,
//!   an unknown column, a missing privilege): not a bad change but a broken
//!   graph or schema, so the daemon stops rather than dead-letter every
//!   change that has look-ups.
//!
//! When a batch's look-ups give up, each change that asked for look-ups
//! ([`LookupOrigin`]) runs its own look-ups alone, with the same rules; the
//! ones that give up again become [`DeadLetter`]s — and the caches their
//! look-ups feed get a namespace bump, so no key they would have found stays
//! stale — and the others' keys are applied. Nothing here writes or
//! acknowledges: the caller records the dead letters (or stops) before the
//! batch is confirmed.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{LookupError, LookupExecutor, LookupOutcome};
use crate::change::{Change, Value};
use crate::dead_letter::{DeadLetter, DeadLetterReason};
use crate::graph::{DepId, Mapping};
use crate::policy::{self, Decision, Failure, LookupFailure};
use crate::resolve::{ArgKey, LookupRequest, Path, Resolution, Resolver};
use crate::retry::{Backoff, Stopped};

/// A change that asked for look-ups, and the look-ups it asked for: kept
/// with its batch so that failing look-ups can be narrowed down to it.
#[derive(Debug, Clone)]
pub(crate) struct LookupOrigin {
    pub(crate) change: Arc<Change>,
    pub(crate) requests: Vec<LookupRequest>,
}

impl LookupOrigin {
    /// About how many bytes keeping it costs.
    pub(crate) fn approx_bytes(&self) -> usize {
        self.change.approx_bytes() + self.requests.iter().map(LookupRequest::approx_bytes).sum::<usize>()
    }
}

/// Why the look-up stage could not settle a batch's look-ups. The texts are
/// the ones the daemon has always printed after `look-up: `.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupStageError {
    /// A look-up query that cannot run for any change (see `crate::policy`).
    #[error("{error}: {hint}")]
    Broken {
        #[source]
        error: LookupError,
        hint: &'static str,
    },
    /// A batch's look-ups gave up and there was no change to narrow them
    /// down to.
    #[error("{0}")]
    GaveUp(#[source] LookupError),
    /// Shutdown came while look-ups were waiting to be retried: the batch
    /// stays unconfirmed.
    #[error("shut down while look-ups were retrying")]
    Cancelled,
}

/// Requests grouped by dependency: distinct arguments (by
/// [`LookupRequest::key`]) in first-seen order, and the path of the first
/// request (for reasons).
pub(crate) fn group_requests(requests: Vec<LookupRequest>) -> BTreeMap<DepId, (Path, Vec<Value>)> {
    let mut groups: BTreeMap<DepId, (Path, Vec<Value>)> = BTreeMap::new();
    let mut seen: HashSet<(DepId, ArgKey)> = HashSet::new();
    for LookupRequest { dependency, arg, path } in requests {
        let key = (dependency, ArgKey::new(arg));
        if seen.contains(&key) {
            continue;
        }
        let group = groups.entry(dependency).or_insert_with(|| (path, Vec::new()));
        group.1.push(key.1.value().clone());
        seen.insert(key);
    }
    groups
}

/// Executes `resolution`'s look-ups (and the look-ups their results ask
/// for, along `embeds`) and folds the effects in, until none is left.
pub async fn run_lookups<E: LookupExecutor>(
    resolver: &Resolver<'_>,
    mut resolution: Resolution,
    executor: &E,
) -> Result<Resolution, LookupError> {
    let graph = resolver.graph();
    let mut pending = std::mem::take(&mut resolution.lookups);
    while !pending.is_empty() {
        let mut next = Vec::new();
        for (dep_id, (path, args)) in group_requests(pending) {
            let dep = graph.dependency(dep_id);
            let Mapping::Lookup(lookup) = &dep.mapping else {
                continue;
            };
            let cache = graph.cache(dep.cache);
            let field = format!("{}.lookup", dep.field);
            let span = tracing::debug_span!("lookup", dependency = %field, cache = %cache.name, args = args.len());
            let outcome = executor
                .execute(&field, lookup, &args, cache.template.params(), cache.options.fanout_limit)
                .instrument(span)
                .await?;
            if let LookupOutcome::FanoutExceeded { rows } = &outcome {
                tracing::warn!(
                    dependency = %field,
                    cache = %cache.name,
                    rows,
                    limit = cache.options.fanout_limit,
                    "look-up fan-out over the limit: bumping the cache's namespace"
                );
            }
            let mut part = match outcome {
                LookupOutcome::Rows(rows) => resolver.resolve_lookup_rows(dep_id, &path, &rows),
                LookupOutcome::FanoutExceeded { rows } => resolver.fanout_exceeded(dep_id, &path, rows),
            };
            next.append(&mut part.lookups);
            resolution.merge(part);
        }
        pending = next;
    }
    Ok(resolution)
}

/// How one set of look-ups ended.
enum Settled {
    Found(Resolution),
    GaveUp { reason: DeadLetterReason, error: LookupError, attempts: u32 },
}

/// How to retry look-ups.
pub(crate) struct Retries<'a> {
    /// A fresh copy of it for every set of look-ups retried.
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: u32,
    pub(crate) shutdown: &'a CancellationToken,
}

/// Runs a batch's look-ups; when they give up, runs each origin's alone.
/// Returns what was found and the changes whose look-ups gave up.
pub(crate) async fn resolve_batch<E: LookupExecutor>(
    resolver: &Resolver<'_>,
    executor: &E,
    lookups: &[LookupRequest],
    origins: &[LookupOrigin],
    retries: &Retries<'_>,
) -> Result<(Resolution, Vec<DeadLetter>), LookupStageError> {
    let error = match settle(resolver, executor, lookups, retries).await? {
        Settled::Found(found) => return Ok((found, Vec::new())),
        Settled::GaveUp { error, .. } => error,
    };
    if origins.is_empty() {
        // Nothing to narrow down to: never drop look-ups silently.
        return Err(LookupStageError::GaveUp(error));
    }
    tracing::warn!(
        error = %error,
        changes = origins.len(),
        "the batch's look-ups failed: running them change by change to set the failing ones aside"
    );
    let mut found = Resolution::default();
    let mut unresolved = Vec::new();
    for origin in origins {
        match settle(resolver, executor, &origin.requests, retries).await? {
            Settled::Found(part) => found.merge(part),
            Settled::GaveUp { reason, error, attempts } => {
                // The keys its look-ups would have found are unknown: the
                // caches they feed are invalidated whole.
                for request in &origin.requests {
                    found.merge(resolver.lookup_failed(request));
                }
                unresolved.push(DeadLetter {
                    change: origin.change.clone(),
                    reason,
                    error: error.to_string(),
                    attempts,
                });
            }
        }
    }
    Ok((found, unresolved))
}

/// Runs `requests` (and the look-ups their rows lead to) until they succeed
/// or give up; waits out connection failures. Shutdown abandons the batch.
async fn settle<E: LookupExecutor>(
    resolver: &Resolver<'_>,
    executor: &E,
    requests: &[LookupRequest],
    retries: &Retries<'_>,
) -> Result<Settled, LookupStageError> {
    let mut counted = 0u32;
    let mut backoff = retries.backoff.fresh();
    loop {
        let mut request = Resolution::default();
        request.lookups = requests.to_vec();
        let error = match run_lookups(resolver, request, executor).await {
            Ok(found) => return Ok(Settled::Found(found)),
            Err(e) => e,
        };
        let failure = error.failure();
        if failure != LookupFailure::Connection {
            counted += 1;
        }
        let verdict = policy::decide(Failure::Lookup { failure, counted, max_attempts: retries.max_attempts });
        match verdict.decision {
            Decision::Retry => {
                tracing::warn!(
                    error = %error,
                    kind = ?failure,
                    attempt = counted,
                    retry_in_ms = backoff.current().as_millis() as u64,
                    "look-up failed; retrying"
                );
                backoff.wait(retries.shutdown).await.map_err(|Stopped| LookupStageError::Cancelled)?;
            }
            Decision::DeadLetter(reason) => {
                return Ok(Settled::GaveUp { reason, error, attempts: counted.max(1) });
            }
            Decision::Stop => {
                return Err(LookupStageError::Broken { error, hint: verdict.hint });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::change::{Operation, Row};
    use crate::diagnostic::SourceFile;
    use crate::graph::load::load_sources;
    use crate::resolve::Effect;

    const GRAPH: &str = r#"
[tables."app.users"]
key = ["id"]
columns = ["id", "name"]

[caches.user]
key = "user:{id}"
[[caches.user.depends]]
table = "app.users"

[caches.article]
key = "article:{id}"
[[caches.article.depends]]
embeds = "user"
lookup = { query = "SELECT id FROM app.articles WHERE author_id = ANY($1)", arg = "id" }

[caches.article_page]
key = "page:{id}"
[[caches.article_page.depends]]
embeds = "article"
"#;

    /// A look-up executor over fixed rows, to test the loop without a database.
    struct FixedRows(HashMap<String, Vec<Vec<Option<Value>>>>);

    impl LookupExecutor for FixedRows {
        async fn execute(
            &self,
            field: &str,
            _lookup: &crate::graph::Lookup,
            args: &[Value],
            _params: &[Arc<str>],
            limit: u64,
        ) -> Result<LookupOutcome, LookupError> {
            let rows = self.0.get(field).cloned().unwrap_or_default();
            assert!(!args.is_empty());
            if rows.len() as u64 > limit {
                return Ok(LookupOutcome::FanoutExceeded { rows: rows.len() as u64 });
            }
            Ok(LookupOutcome::Rows(rows))
        }
    }

    fn keys(graph: &crate::graph::Graph, r: &Resolution) -> Vec<String> {
        let mut out: Vec<String> = r
            .effects
            .iter()
            .map(|e| match &e.effect {
                Effect::Key { key, .. } => key.clone(),
                other => format!("{other:?} of {}", graph.cache(other.cache()).name),
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn running_lookups_folds_their_keys_and_their_embedders_into_the_resolution() {
        let g = load_sources(&[SourceFile::new("t.toml", GRAPH.to_owned())]).unwrap();
        let row = |name: &str| Row::new().with("id", Value::Int(1)).with("name", Value::Text(name.into()));
        let c = Change::new("app.users", Operation::Update, Some(row("ann")), Some(row("bob")));
        let resolver = Resolver::new(&g);
        let rows = vec![vec![Some(Value::Text("10".into()))], vec![Some(Value::Text("11".into()))]];
        let executor = FixedRows([("caches.article.depends[0].lookup".to_owned(), rows)].into_iter().collect());
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let r = runtime.block_on(run_lookups(&resolver, resolver.resolve(&c), &executor)).unwrap();
        assert_eq!(keys(&g, &r), ["article:10", "article:11", "page:10", "page:11", "user:1"]);
        assert!(r.lookups.is_empty());
    }

    #[test]
    fn grouping_dedupes_arguments_per_dependency() {
        let req = |d, a| LookupRequest { dependency: DepId(d), arg: a, path: Path::new() };
        let groups = group_requests(vec![
            req(1, Value::Int(5)),
            req(0, Value::Int(7)),
            req(1, Value::Int(5)),
            req(1, Value::Int(6)),
            req(1, Value::Float(f64::NAN)),
            req(1, Value::Float(f64::NAN)),
            req(0, Value::Null),
            req(0, Value::Null),
        ]);
        let shown = |d| groups[&DepId(d)].1.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>();
        assert_eq!(shown(1), ["Int(5)", "Int(6)", "Float(NaN)"], "a NaN is sent once, unlike `==` would say");
        assert_eq!(shown(0), ["Int(7)", "Null"]);
    }
}
