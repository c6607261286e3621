//! `hermod pub`, `hermod sub` and `hermod bridge`: topic events
//! (hermes_events) through the daemon, and across daemons.

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use hermod_client::http::HttpClient;
use hermod_client::Connection;
use hermod_core::wire::{ClientFrame, ServerFrame};
use serde_json::{Map, Value};

use std::time::Duration;

use hermod_client::bridge::{Bridge, BridgeConfig, Outbox};
use hermod_core::model::RELAY_SENDER;

use crate::cli::{self, BridgeArgs, Endpoint, PubArgs, SubArgs};

fn payload(args: &PubArgs) -> Result<Map<String, Value>> {
    let text = match &args.json {
        Some(j) => j.clone(),
        None => {
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .context("cannot read the payload from stdin")?;
            t
        }
    };
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str(&text).context("the payload is not JSON")? {
        Value::Object(map) => Ok(map),
        _ => bail!("the payload must be a JSON object"),
    }
}

pub fn publish(args: &PubArgs) -> Result<ExitCode> {
    let payload = payload(args)?;
    let from = args
        .from
        .clone()
        .or_else(|| std::env::var("AGENT_NAME").ok())
        .filter(|f| !f.is_empty());
    let channel = cli::channel(&args.channel);
    let reply = super::runtime()?.block_on(async {
        match args.client.endpoint() {
            Endpoint::Unix(socket) => {
                let frame = ClientFrame::Publish {
                    topic: args.topic.clone(),
                    payload: Some(hermod_core::model::Body::from_map(payload)),
                    channel,
                    durable: Some(args.durable),
                };
                let mut conn = Connection::connect(&socket).await?;
                // `from` travels like a message's sender.
                let frame = with_from(frame, from);
                conn.request_raw(&frame).await
            }
            Endpoint::Http(url) => {
                HttpClient::new(&url)
                    .publish(&args.topic, payload, from, channel, args.durable)
                    .await
            }
        }
    })?;
    println!("{reply}");
    Ok(ExitCode::SUCCESS)
}

/// Adds `from` to a frame (the typed frame has no field for it).
fn with_from(frame: ClientFrame, from: Option<String>) -> Value {
    let mut v = serde_json::to_value(frame).expect("frames serialize");
    if let (Some(from), Some(obj)) = (from, v.as_object_mut()) {
        obj.insert("from".into(), from.into());
    }
    v
}

/// Subscribes to the local daemon and feeds the bridge's outbox; survives
/// local daemon restarts (reconnecting with backoff), never blocks on the
/// remote (the outbox drops its oldest frame when full).
pub fn bridge(args: &BridgeArgs) -> Result<ExitCode> {
    let socket = args.local.socket();
    let config = BridgeConfig {
        url: args.to.clone(),
        token: args.token.clone(),
        channel: args.channel.clone(),
        pattern: args.pattern.clone(),
    };
    hermod_events::Pattern::parse(&args.pattern).map_err(|e| anyhow::anyhow!("{e}"))?;
    super::runtime()?.block_on(async {
        let bridge = Bridge::start(config);
        let outbox = bridge.outbox();
        let mut backoff = Duration::from_secs(1);
        loop {
            match feed(&socket, &args.pattern, &outbox).await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => tracing::warn!(error = %e, "local daemon unreachable; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    })
}

/// Pushes the local daemon's matching events into `outbox` until the
/// connection ends. Events that arrived by relay are not shipped back.
async fn feed(socket: &std::path::Path, pattern: &str, outbox: &Outbox) -> Result<()> {
    let mut conn = Connection::connect(socket).await?;
    conn.request(&ClientFrame::Subscribe {
        channel: None,
        pattern: pattern.to_owned(),
        durable: None,
    })
    .await?;
    tracing::info!("bridge subscribed to the local daemon");
    loop {
        if let ServerFrame::Message(m) = conn.next_frame().await? {
            match &m.topic {
                Some(topic) if m.from != RELAY_SENDER => outbox.push(topic, &m.body.to_map()),
                _ => {}
            }
        }
    }
}

pub fn subscribe(args: &SubArgs) -> Result<ExitCode> {
    let socket = args.local.socket();
    let channel = cli::channel(&args.channel);
    super::runtime()?.block_on(async {
        let mut conn = Connection::connect(&socket).await?;
        let every = channel.as_deref() == Some("*");
        if let Some(channel) = channel.filter(|_| !every) {
            // Live subscriptions follow the connection's channel.
            let frame = ClientFrame::Register {
                endpoint: format!("sub-{}", std::process::id()),
                channel: Some(channel),
                ack: Some(hermod_core::wire::AckMode::Explicit),
                gaps: None,
            };
            conn.request(&frame).await?;
        }
        conn.request(&ClientFrame::Subscribe {
            pattern: args.pattern.clone(),
            durable: None,
            channel: every.then(|| "*".to_owned()),
        })
        .await?;
        let mut stdout = std::io::stdout();
        let mut printed = 0;
        while args.count.is_none_or(|n| printed < n) {
            match conn.next_frame().await? {
                ServerFrame::Message(m) if m.topic.is_some() => {
                    writeln!(stdout, "{}", serde_json::to_string(&m)?)?;
                    stdout.flush()?;
                    printed += 1;
                }
                ServerFrame::Error { code, detail, .. } => bail!("{detail} ({code})"),
                _ => {}
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
