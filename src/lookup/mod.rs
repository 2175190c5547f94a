//! The look-up stage: runs the SQL that resolution asked for, between the
//! pure resolver and the sinks.
//!
//! ```text
//! resolve (pure) ──requests──► lookup ──rows──► resolve (pure) ──effects──► batch's sinks
//! ```
//!
//! - `executor.rs`: the seam ([`LookupExecutor`]): what a look-up returns
//!   ([`LookupOutcome`]) and how it fails ([`LookupError`], classified);
//! - `postgres.rs`: [`PgLookupExecutor`], the one real executor (batched
//!   `= ANY($1)`, bounded in time and rows);
//! - `stage.rs`: [`run_lookups`] (a set of requests to completion, along
//!   `embeds`) and a batch's look-ups with their retries, narrowed down to
//!   the changes that fail ([`LookupOrigin`]), which become dead letters.
//!
//! **Invariants:** this stage owns every await on the look-up database;
//! `crate::resolve` stays pure and is only called here with rows. A look-up
//! that cannot be run never goes missing: it is retried, its cache is
//! bumped with the change dead-lettered, or the stage fails
//! ([`LookupStageError`]) and the batch stays unacknowledged. The stage
//! does not know the run loop: it decides through `crate::policy` and waits
//! through `crate::retry`.

mod executor;
mod postgres;
mod stage;

pub(crate) use executor::LookupRows;
pub use executor::{LookupError, LookupExecutor, LookupOutcome};
pub use postgres::PgLookupExecutor;
pub use stage::run_lookups;
pub(crate) use stage::{LookupOrigin, LookupStageError, group_requests};
pub(crate) use stage::{Retries, resolve_batch};
