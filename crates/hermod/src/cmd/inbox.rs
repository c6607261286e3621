//! `hermod inbox`: what waits for an agent (after its cursor), printed like
//! `recv` prints it but without acknowledging anything; `hermod tail`:
//! everything stored from now on, for a human watching.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hermod_client::http::HttpClient;
use hermod_client::{Connection, MessageFrame};
use hermod_core::wire::{ClientFrame, ServerFrame};

use crate::cli::{self, ClientArgs, Endpoint, InboxArgs};

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
            print!("{}", super::recv::block(m, None));
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
                    let to = if m.to.is_empty() { "*" } else { m.to.as_str() };
                    let what = m
                        .topic
                        .as_deref()
                        .map(|t| format!(" [{t}]"))
                        .unwrap_or_default();
                    print!("-> {to}{what} {}", super::recv::block(&m, None));
                    std::io::Write::flush(&mut std::io::stdout())?;
                }
                ServerFrame::Error { code, detail, .. } => bail!("{detail} ({code})"),
                _ => {}
            }
        }
    })
}
