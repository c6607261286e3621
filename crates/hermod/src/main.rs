//! The `hermod` binary: a thin shell over the library crates.
//!
//! `cli` holds the flags and how they resolve (flag, then env, then the
//! default); `daemon` the data-directory lock and the start/stop manager;
//! `cmd/` one file per subcommand. `anyhow` is used here and nowhere else.

mod cli;
mod cmd;
mod daemon;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (the log's disk is full: `hermod
        // start` keeps it in the data directory) is dropped. Reporting that
        // with `eprintln!` to the same full stderr panics, in whatever task
        // logged: the history checker saw every later send answered
        // `shutting_down` until a restart.
        .log_internal_errors(false)
        .init();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // A closed stdout (e.g. `hermod recv | head`) is not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("hermod: {e:#}");
            ExitCode::FAILURE
        }
    }
}
