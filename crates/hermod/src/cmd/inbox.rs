//! `hermod inbox`: what waits for an agent (after its cursor), printed like
//! `recv` prints it (one line each) but without acknowledging anything;
//! `hermod tail`: everything stored from now on, for a human watching.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hermod_client::http::HttpClient;
use hermod_client::{Connection, MessageFrame};
use hermod_core::wire::{ClientFrame, ServerFrame};

use hermod_core::text;

use super::recv;
use crate::cli::{self, ClientArgs, Endpoint, InboxArgs};

/// Longest text `hermod tail` shows of one message.
const TAIL_MAX_CHARS: usize = 1000;

pub fn run(args: &InboxArgs) -> Result<ExitCode> {
    let channel = cli::channel(&args.channel);
    let messages: Vec<MessageFrame> = super::runtime()?.block_on(async {
        anyhow::Ok(match args.client.endpoint() {
            Endpoint::Unix(socket) => {
                let frame = ClientFrame::Inbox {
                    agent: args.name.clone(),
                    channel,
                    after: None,
                    limit: Some(1000),
                };
                match Connection::connect(&socket).await?.request(&frame).await? {
                    ServerFrame::InboxPage { messages, .. } => messages,
                    other => bail!("unexpected reply {other:?}"),
                }
            }
            Endpoint::Http(url) => {
                HttpClient::new(&url)
                    .peek(&args.name, channel.as_deref())
                    .await?
            }
        })
    })?;
    for m in &messages {
        if args.json {
            println!("{}", serde_json::to_string(m)?);
        } else {
            let line = recv::line(m, None, recv::TEXT_MAX_CHARS, recv::CUT_HINT);
            print!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn tail(args: &ClientArgs) -> Result<ExitCode> {
    let Endpoint::Unix(socket) = args.endpoint() else {
        bail!("tail watches through the Unix socket; drop --url / HERMOD_URL");
    };
    super::runtime()?.block_on(async {
        let mut conn = Connection::connect(&socket).await?;
        conn.send_frame(&ClientFrame::Tail).await?;
        loop {
            match conn.next_frame().await? {
                ServerFrame::Message(m) => {
                    let to = if m.to.is_empty() {
                        "*".to_owned()
                    } else {
                        text::terminal_line(&m.to, 256)
                    };
                    let what = m
                        .topic
                        .as_deref()
                        .map(|t| format!(" [{}]", text::terminal_line(t, 256)))
                        .unwrap_or_default();
                    // For a human watching everything: a screenful per
                    // message at most.
                    let line = recv::line(&m, None, TAIL_MAX_CHARS, "");
                    print!("-> {to}{what} {line}");
                    std::io::Write::flush(&mut std::io::stdout())?;
                }
                ServerFrame::Error { code, detail, .. } => bail!("{detail} ({code})"),
                _ => {}
            }
        }
    })
}
