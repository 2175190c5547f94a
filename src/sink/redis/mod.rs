//! The Redis sink: applies a batch's effects to one Redis target,
//! standalone or Cluster.
//!
//! - [`plan`]: the pure batch → commands step, grouped by hash slot.
//! - [`layout`]: key names, the version format, the Lua scripts.

pub mod layout;
pub mod plan;
