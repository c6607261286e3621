//! `hermod receipt`, `hermod thread`, `hermod presence set`, `hermod
//! release`: what happened to a message, a conversation, what an agent
//! is doing, and letting a pair the loop guard holds talk again.

use std::process::ExitCode;

use anyhow::Result;
use hermod_client::Connection;
use hermod_core::model::{Activity, State};
use hermod_core::text;
use hermod_core::wire::{all_reached, ReceiptView};

use super::{recv, EXIT_TIMEOUT};
use crate::cli::{self, PresenceCommand, ReceiptArgs, ReleaseArgs, ThreadArgs};

/// One block per stored copy: the message, then a line per recipient.
fn show(r: &ReceiptView) -> String {
    let name = |s: &str| text::terminal_line(s, 256);
    let mut out = format!(
        "{} (seq {}) from {} to {} ({}):\n",
        name(&r.id),
        r.seq,
        name(&r.from),
        r.to.as_deref().map_or("everyone".to_owned(), name),
        name(&r.channel),
    );
    for who in &r.recipients {
        let steps: Vec<String> = who
            .steps
            .iter()
            .map(|s| {
                let door = s.door.as_deref().map(|d| format!(" via {}", name(d)));
                let note = s.note.as_deref().map(|n| format!(": {}", name(n)));
                format!(
                    "{} {}{}{}",
                    s.state,
                    recv::clock(s.ts),
                    door.unwrap_or_default(),
                    note.unwrap_or_default()
                )
            })
            .collect();
        out.push_str(&format!(
            "  {}: {} ({})\n",
            name(&who.agent),
            who.state,
            steps.join(", ")
        ));
    }
    out
}

pub fn receipt(args: &ReceiptArgs) -> Result<ExitCode> {
    let wait = args.wait.as_deref().map(State::parse).transpose()?;
    let socket = args.local.socket();
    let receipts = super::runtime()?.block_on(async {
        let mut conn = Connection::connect(&socket).await?;
        let timeout = wait.map(|_| args.timeout);
        anyhow::Ok(conn.receipt(&args.id, wait, timeout).await?)
    })?;
    for r in &receipts {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            print!("{}", show(r));
        }
    }
    match wait {
        Some(state) if !receipts.iter().all(|r| all_reached(&r.recipients, state)) => {
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub fn thread(args: &ThreadArgs) -> Result<ExitCode> {
    let socket = args.local.socket();
    let messages = super::runtime()?.block_on(async {
        anyhow::Ok(Connection::connect(&socket).await?.thread(&args.id).await?)
    })?;
    for m in &messages {
        if args.json {
            println!("{}", serde_json::to_string(m)?);
        } else {
            let to = if m.to.is_empty() { "everyone" } else { &m.to };
            print!(
                "{} → {}  {}",
                text::terminal_line(&m.id, 256),
                text::terminal_line(to, 256),
                recv::line(m, None, recv::TEXT_MAX_CHARS, recv::CUT_HINT)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn presence(command: PresenceCommand) -> Result<ExitCode> {
    let PresenceCommand::Set(args) = command;
    let status = Activity::parse(&args.status)?;
    let agent = args
        .agent
        .clone()
        .or_else(|| std::env::var("AGENT_NAME").ok())
        .filter(|a| !a.is_empty());
    let channel = cli::channel(&args.channel);
    let socket = args.local.socket();
    super::runtime()?.block_on(async {
        let mut conn = Connection::connect(&socket).await?;
        conn.set_presence(status, agent.as_deref(), channel.as_deref())
            .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn release(args: &ReleaseArgs) -> Result<ExitCode> {
    let socket = args.local.socket();
    let channel = cli::channel(&args.channel);
    let released = super::runtime()?.block_on(async {
        let mut conn = Connection::connect(&socket).await?;
        anyhow::Ok(
            conn.release(&args.agent, &args.peer, channel.as_deref())
                .await?,
        )
    })?;
    println!(
        "released {} and {}: {released} held message(s) went on",
        text::terminal_line(&args.agent, 256),
        text::terminal_line(&args.peer, 256)
    );
    Ok(ExitCode::SUCCESS)
}
