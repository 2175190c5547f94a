//! evictd: tails a database's change stream and, for every committed row
//! change, invalidates every cache key the change makes stale.
//!
//! The pipeline, one module per stage (see `ARCHITECTURE.md`):
//!
//! ```text
//! source ──► change ──► resolve (pure) ──► lookup ──► batch ──► sink ──► checkpoint
//! ```
//!
//! - [`source`]: where changes come from, and where their positions are
//!   acknowledged ([`source::Source`]).
//! - [`change`]: the one change type every source produces.
//! - [`graph`]: the dependency graph loaded from `dependency-graphs/`.
//! - [`key`]: canonical key rendering.
//! - [`resolve`]: change → effects (keys, tags, namespace bumps) and
//!   look-up requests; pure, no I/O.
//! - [`lookup`]: the look-up stage: runs the requests' SQL, feeds the rows
//!   back to the resolver, retries, narrows failures down to dead letters.
//! - `batch`: effects of consecutive transactions merged and deduplicated.
//! - [`sink`]: where effects are applied ([`sink::Sink`]).
//! - `checkpoint`: which position may be acknowledged.
//! - [`config`], [`cli`]: the operator's surface.
//! - `daemon`: `evictd run`'s wiring and its one supervisor of source
//!   sessions (Postgres active/standby, Kafka group membership).
//! - `policy`: the one classification of failures into retry, dead-letter
//!   or stop.
//! - [`metrics`]: every exported metric, recorded through typed methods.
//! - [`reader`]: for applications: the fill guard, a race-free cache fill.
//! - [`server`]: `/metrics`, `/healthz` and `/readyz`, and the [`server::Health`]
//!   state the run loop reports into.

pub(crate) mod batch;
pub mod change;
pub(crate) mod checkpoint;
pub mod cli;
pub mod config;
pub(crate) mod daemon;
pub mod dead_letter;
pub mod diagnostic;
pub mod graph;
pub mod key;
pub mod lookup;
pub mod metrics;
pub(crate) mod policy;
pub mod reader;
pub mod resolve;
pub(crate) mod retry;
pub(crate) mod run;
pub mod server;
pub mod sink;
pub mod source;
