//! `hermod inbox`: what waits for an agent (after its cursor), printed like
//! `recv` prints it but without acknowledging anything.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hermod_client::http::HttpClient;
use hermod_client::{Connection, MessageFrame};
use hermod_core::wire::{ClientFrame, ServerFrame};

use crate::cli::{self, Endpoint, InboxArgs};

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
