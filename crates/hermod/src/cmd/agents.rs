//! `hermod agents`: who is known, who is online, what waits for them.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{AgentsAction, AgentsArgs, Endpoint};

pub fn run(args: &AgentsArgs) -> Result<ExitCode> {
    if let Some(AgentsAction::Forget(f)) = &args.action {
        let socket = f.local.socket();
        super::runtime()?.block_on(async {
            hermod_client::Connection::connect(&socket)
                .await?
                .forget(&f.name, f.channel.as_deref())
                .await
        })?;
        println!("forgot {}", f.name);
        return Ok(ExitCode::SUCCESS);
    }
    let args = &args.client;
    let agents = super::runtime()?.block_on(async {
        match args.endpoint() {
            Endpoint::Unix(socket) => {
                hermod_client::Connection::connect(&socket)
                    .await?
                    .agents()
                    .await
            }
            Endpoint::Http(url) => hermod_client::http::HttpClient::new(&url).agents().await,
        }
    })?;
    let now = hermod_core::model::now();
    println!(
        "{:<24} {:<12} {:<8} {:<9} {:<10} {:>10} {:>7}",
        "AGENT", "CHANNEL", "ONLINE", "PRESENCE", "OVER", "LAST SEEN", "UNREAD"
    );
    for a in agents {
        println!(
            "{:<24} {:<12} {:<8} {:<9} {:<10} {:>9.0}s {:>7}",
            a.name,
            a.channel,
            if a.online { "yes" } else { "no" },
            a.presence.as_str(),
            a.transports.join(","),
            (now - a.last_seen).max(0.0),
            a.unread
        );
    }
    Ok(ExitCode::SUCCESS)
}
