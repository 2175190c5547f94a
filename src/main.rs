//! The `evictd` binary: parses arguments and hands over to the library.
//! Exit codes: 0 ok, 2 bad input (config, graph, arguments), 1 runtime failure.

use std::process::ExitCode;

use clap::Parser;

/// glibc's allocator was a fifth of the daemon's CPU in a catch-up drain
/// (many small, short-lived allocations across tokio's worker threads);
/// mimalloc's thread-local free lists cost a fraction of it
/// (docs/performance.md, "CPU per change").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Several TLS clients share rustls; both of its crypto back-ends are
    // compiled in, so pick one for the process before any connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // clap itself exits 2 on bad arguments and 0 for --help / --version.
    let cli = evictd::cli::Cli::parse();
    // `run` logs as its config says; the other commands warn on stderr
    // (stdout carries their output).
    if !matches!(cli.command, evictd::cli::Command::Run(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(evictd::config::stderr_log_filter())
            .with_writer(std::io::stderr)
            .init();
    }
    match evictd::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line per problem, each marked, so a list of them reads well.
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
