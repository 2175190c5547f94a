//! `evictd migrate --config FILE`: applies evictd's migrations to its own
//! schema (`dead_letter.schema`) and exits — the command operators run when
//! `dead_letter.migrations = "verify"` keeps `evictd run` from applying them.
//!
//! Exit codes: 0 applied or up to date, 2 bad config, 1 database failure.

use std::path::PathBuf;

use clap::Args;

use super::{CliError, prepare, write_stdout};
use crate::daemon::wiring::dead_letter_store;
use crate::dead_letter::MigrationMode;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The config file (`evictd.toml`); its `[dead_letter]` section says
    /// where (default: the Postgres source's database, schema `evictd`).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
}

pub(crate) fn run(args: &MigrateArgs) -> Result<(), CliError> {
    let prepared = prepare(Some(&args.config), &[])?;
    let Some(config) = prepared.config else {
        return Err(CliError::Input("evictd migrate needs --config".into()));
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the runtime: {e}")))?;
    // The pool starts its maintenance task at once: inside the runtime.
    let (report, schema) = runtime.block_on(async {
        let store = dead_letter_store(&config)?;
        let report = store.migrate(MigrationMode::Apply).await.map_err(|e| CliError::Runtime(e.to_string()))?;
        Ok::<_, CliError>((report, store.schema().to_owned()))
    })?;
    let text = if report.applied.is_empty() {
        format!("migrations: schema {schema} is up to date\n")
    } else {
        format!("migrations: applied {} to schema {schema}\n", report.applied.join(", "))
    };
    write_stdout(&text)
}
