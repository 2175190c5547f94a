//! `evictd run --config FILE`: the daemon ([`crate::daemon`]).
//!
//! Validation first (the same `prepare` as `check`; bad input exits 2
//! before anything starts), then the daemon runs until shutdown.

use std::path::PathBuf;

use clap::Args;

use super::{CliError, prepare};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file (`evictd.toml`); see evictd.example.toml.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
}

pub(crate) fn run(args: &RunArgs) -> Result<(), CliError> {
    let prepared = prepare(Some(&args.config), &[])?;
    let Some(config) = prepared.config else {
        return Err(CliError::Input("evictd run needs --config".into()));
    };
    Ok(crate::daemon::run(config, prepared.graph)?)
}
