//! One module per subcommand; [`run`] dispatches.

mod agent;
mod agents;
mod bench;
mod console;
mod delivery;
mod inbox;
mod manage;
mod mcp;
mod recv;
mod send;
pub(crate) mod serve;
mod topics;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Exit code when `--timeout` runs out (as coreutils `timeout`).
pub const EXIT_TIMEOUT: u8 = 124;

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Start(args) => manage::start(&args),
        Command::Stop(args) => manage::stop(&args),
        Command::Status(args) => manage::status(&args),
        Command::Restart(args) => manage::restart(&args),
        Command::Send(args) => send::run(&args),
        Command::Recv(args) => recv::run(&args),
        Command::Wait(mut args) => {
            args.count = Some(1);
            recv::run(&args)
        }
        Command::Mcp(args) => mcp::run(&args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "hermod", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents(args) => agents::run(&args),
        Command::Inbox(args) => inbox::run(&args),
        Command::Tail(args) => inbox::tail(&args),
        Command::Pub(args) => topics::publish(&args),
        Command::Sub(args) => topics::subscribe(&args),
        Command::Bridge(args) => topics::bridge(&args),
        Command::Agent(command) => agent::run(command),
        Command::Bench(args) => bench::run(&args),
        Command::Receipt(args) => delivery::receipt(&args),
        Command::Thread(args) => delivery::thread(&args),
        Command::Presence(command) => delivery::presence(command),
        Command::Release(args) => delivery::release(&args),
        Command::Console(args) => console::run(&args),
    }
}

/// The runtime for client commands.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
