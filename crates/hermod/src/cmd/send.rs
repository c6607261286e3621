//! `hermod send`: one durable message.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result};
use hermod_client::Draft;

use crate::cli::{self, Endpoint, SendArgs};
use hermod_client::http::HttpClient;

pub fn run(args: &SendArgs) -> Result<ExitCode> {
    let text = match &args.text {
        Some(t) => t.clone(),
        None => {
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .context("cannot read the message from stdin")?;
            // `echo hi | hermod send` means "hi", not "hi\n".
            if t.ends_with('\n') {
                t.pop();
                if t.ends_with('\r') {
                    t.pop();
                }
            }
            t
        }
    };
    let body = hermod_core::model::Body::from_map(serde_json::Map::from_iter([(
        "text".to_owned(),
        text.into(),
    )]));
    let draft = Draft {
        to: Some(args.to.clone()),
        from: args
            .from
            .clone()
            .or_else(|| std::env::var("AGENT_NAME").ok())
            .filter(|f| !f.is_empty()),
        channel: cli::channel(&args.channel),
        body,
    };
    let sent = super::runtime()?.block_on(async {
        match args.client.endpoint() {
            Endpoint::Unix(socket) => hermod_client::send(&socket, draft).await,
            Endpoint::Http(url) => HttpClient::new(&url).send(draft).await,
        }
    })?;
    println!("sent {} (seq {})", sent.id, sent.seq);
    Ok(ExitCode::SUCCESS)
}
