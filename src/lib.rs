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
//! - [`layout`]: the Redis keys, stamps and scripts: the contract between
//!   the daemon and every client (`docs/redis-layout.md`).
//! - [`reader`]: for applications: the fill guard, a race-free cache fill.
//! - [`subscriber`]: for applications: the broadcast subscriber and its local
//!   cache (`docs/broadcast.md`, `docs/client-rust.md`).
//!
//! Features: `daemon` (default) builds all of it; `client` only [`change`],
//! [`key`], [`layout`] and [`reader`]; `subscriber` adds [`subscriber`]. Neither
//! of the last two compiles rdkafka, sqlx or the HTTP server.
//! - [`server`]: `/metrics`, `/healthz` and `/readyz`, and the [`server::Health`]
//!   state the run loop reports into.

// The daemon: everything `evictd run` and the other commands need (the
// `daemon` feature, on by default). An application builds without it
// (`client`, `subscriber`): see docs/client-rust.md.
#[cfg(feature = "daemon")]
pub(crate) mod batch;
#[cfg(feature = "daemon")]
pub(crate) mod checkpoint;
#[cfg(feature = "daemon")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub(crate) mod daemon;
#[cfg(feature = "daemon")]
pub mod dead_letter;
#[cfg(feature = "daemon")]
pub mod diagnostic;
#[cfg(feature = "daemon")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "daemon")]
pub mod graph;
#[cfg(feature = "daemon")]
pub mod lookup;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub(crate) mod pgconn;
#[cfg(feature = "daemon")]
pub(crate) mod policy;
#[cfg(feature = "daemon")]
pub mod resolve;
#[cfg(feature = "daemon")]
pub(crate) mod retry;
#[cfg(feature = "daemon")]
pub(crate) mod run;
#[cfg(feature = "daemon")]
pub mod server;
#[cfg(feature = "daemon")]
pub mod sink;
#[cfg(feature = "daemon")]
pub mod source;
#[cfg(feature = "daemon")]
#[doc(hidden)]
pub mod tls_probe;

// Shared by the daemon and the applications (`client`): what the daemon
// alone uses of them is dead code without it.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub mod change;
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub mod key;
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub mod layout;
pub mod reader;
#[cfg(feature = "subscriber")]
pub mod redis_tls;
#[cfg(feature = "subscriber")]
pub mod subscriber;
