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
