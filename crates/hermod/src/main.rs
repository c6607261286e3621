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

/// jemalloc, because it gives memory back: 3,000 idle `/subscribe` streams
/// opened and closed left glibc's malloc at +178% of its idle RSS (+80%
/// with a `malloc_trim` every 2 s, +142% with mimalloc) and jemalloc at
/// +30% (README, Benchmarks). Its background thread returns freed pages
/// after a second (`dirty_decay_ms`) straight to the system
/// (`muzzy_decay_ms:0`: `MADV_FREE`d pages would still count as resident),
/// also while the daemon is idle.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read by it at its first allocation (a C string
/// under the name jemalloc looks for; the crate's documented way).
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
