//! `hermod send`: one durable message: text (argument or stdin), a JSON
//! body, a type, an attachment, to one agent or as a broadcast.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use base64::Engine;
use hermod_client::http::HttpClient;
use hermod_client::Draft;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::cli::{self, Endpoint, SendArgs};

/// Largest attachment: what fits a 10 MiB frame once base64-encoded.
const MAX_ATTACHMENT: u64 = 7 * 1024 * 1024;

fn stdin_text() -> Result<String> {
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
    Ok(t)
}

/// The attachment field: name, size, sha256 and the bytes (base64).
pub fn attachment(path: &std::path::Path) -> Result<Value> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if size > MAX_ATTACHMENT {
        bail!(
            "{} is {size} bytes; attachments are limited to {MAX_ATTACHMENT}",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "attachment".into());
    Ok(json!({
        "name": name,
        "size": bytes.len(),
        "sha256": hex(&Sha256::digest(&bytes)),
        "data": base64::engine::general_purpose::STANDARD.encode(&bytes),
    }))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn body(args: &SendArgs, text: Option<String>) -> Result<Map<String, Value>> {
    let mut body = match &args.json {
        Some(j) => match serde_json::from_str(j).context("--json is not JSON")? {
            Value::Object(map) => map,
            _ => bail!("--json must be a JSON object"),
        },
        None => Map::new(),
    };
    let text = match (text, &args.json, &args.file) {
        (Some(t), _, _) => Some(t),
        (None, None, None) => Some(stdin_text()?),
        _ => None,
    };
    if let Some(t) = text {
        body.insert("text".into(), t.into());
    }
    if let Some(kind) = &args.kind {
        body.insert("type".into(), kind.clone().into());
    }
    if let Some(path) = &args.file {
        body.insert("attachment".into(), attachment(path)?);
    }
    Ok(body)
}

pub fn run(args: &SendArgs) -> Result<ExitCode> {
    // With --broadcast the one positional argument is the text.
    let (to, text) = if args.broadcast {
        if args.text.is_some() {
            bail!("--broadcast takes no recipient: hermod send --broadcast [TEXT]");
        }
        (None, args.to.clone())
    } else {
        (args.to.clone(), args.text.clone())
    };
    let draft = Draft {
        to,
        from: args
            .from
            .clone()
            .or_else(|| std::env::var("AGENT_NAME").ok())
            .filter(|f| !f.is_empty()),
        channel: cli::channel(&args.channel),
        body: hermod_core::model::Body::from_map(body(args, text)?),
        meta: hermod_core::wire::OutgoingMeta {
            reply_to: args.reply_to.clone(),
            thread: args.thread.clone(),
            priority: args.priority.clone(),
            ttl: args.ttl,
            bounce_after: args.bounce_after,
            notify: args
                .notify
                .iter()
                .flat_map(|n| n.split(','))
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        },
    };
    let sent = super::runtime()?.block_on(async {
        match args.client.endpoint() {
            Endpoint::Unix(socket) => hermod_client::send(&socket, draft).await,
            Endpoint::Http(url) => HttpClient::new(&url).send(draft).await,
        }
    })?;
    println!("sent {} (seq {})", sent.id, sent.seq);
    if let Some(notice) = &sent.notice {
        eprintln!("note: {}", hermod_core::text::terminal_line(notice, 1000));
    }
    Ok(ExitCode::SUCCESS)
}
