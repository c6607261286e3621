//! The hermes_events cross-process relay (PROTOCOLS.md §4).
//!
//! `GET /api/pub?token=&channel=` is a WebSocket whose text frames are
//! either relay frames (`{"_bus_relay":true,"topic":T,"envelope":{..}}`,
//! published as topic `T` with the envelope as is, so the original
//! `ts`/`src` survive) or JSON-RPC events (`{"jsonrpc":"2.0","method":
//! "event","params":{"type":E,"session_id":S,"payload":{..}}}`, published as
//! `tui.E` with `session_id` and the payload flattened in). Anything else is
//! ignored and the connection stays open. Every frame received is also
//! fanned out, as is, to the `GET /api/events?token=&channel=` WebSockets of
//! that channel. The relay channel is the bus channel the events land on.
//!
//! Both endpoints need the token set with `serve --relay-token` (or
//! `HERMOD_RELAY_TOKEN`), or an agent's token (then the agent's
//! `may_publish` / `may_subscribe` rules apply and events carry its name);
//! without either they answer 401 before upgrading.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use futures::{SinkExt, StreamExt};
use hermod_core::auth::{secrets_equal, Caller};
use hermod_core::model::{AgentName, Auth, Channel, RELAY_SENDER};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use super::error::{ApiError, Q};
use super::AppState;

/// Frames buffered per `/api/events` listener before it starts skipping.
const FANOUT_BUFFER: usize = 1024;

/// Per relay channel, the raw frames for `/api/events` listeners.
#[derive(Clone, Default)]
pub struct RelayHub {
    channels: Arc<Mutex<HashMap<Channel, broadcast::Sender<String>>>>,
}

impl RelayHub {
    fn sender(&self, channel: &Channel) -> broadcast::Sender<String> {
        self.channels
            .lock()
            .unwrap()
            .entry(channel.clone())
            .or_insert_with(|| broadcast::channel(FANOUT_BUFFER).0)
            .clone()
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/pub", get(publish))
        .route("/api/events", get(events))
}

#[derive(Deserialize)]
struct RelayQuery {
    token: Option<String>,
    channel: Option<String>,
}

/// Who feeds or reads a relay: the holder of the relay token, or an agent.
enum Relayer {
    /// The shared relay secret: events are published as `relay`, unverified.
    Relay,
    /// An agent's token (the guard verified it).
    Agent(Caller),
}

impl Relayer {
    /// The relay secret proves no agent: its events are the daemon's,
    /// published under the reserved name `relay`, unverified.
    fn caller(&self) -> Caller {
        match self {
            Relayer::Relay => Caller::daemon(Auth::Open),
            Relayer::Agent(c) => c.clone(),
        }
    }

    /// The publisher name: `relay` (so a bridge never ships these back), or
    /// the agent itself.
    fn sender(&self) -> Option<AgentName> {
        match self {
            Relayer::Relay => Some(AgentName::parse(RELAY_SENDER).expect("valid name")),
            Relayer::Agent(_) => None,
        }
    }
}

impl RelayQuery {
    /// Who is relaying, and the relay channel, once a token checks out.
    fn authorize(
        self,
        app: &AppState,
        caller: Option<Caller>,
    ) -> Result<(Relayer, Channel), ApiError> {
        let relay_token = match (&app.config.relay_token, &self.token) {
            (Some(expected), Some(given)) => secrets_equal(expected, given),
            _ => false,
        };
        let relayer = match caller.filter(|c| c.identity().is_some()) {
            _ if relay_token => Relayer::Relay,
            Some(agent) => Relayer::Agent(agent),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid relay token (serve --relay-token) or agent token is required",
                ))
            }
        };
        let channel = Channel::parse(self.channel.unwrap_or_else(|| "gateway".into()))?;
        Ok((relayer, channel))
    }
}

async fn publish(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    Q(q): Q<RelayQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (relayer, channel) = q.authorize(&app, caller.map(|c| c.0))?;
    let caller = relayer.caller();
    app.broker.trust().may_use_channel(&caller, &channel)?;
    Ok(upgrade
        .max_message_size(hermod_core::wire::MAX_FRAME)
        .on_upgrade(move |socket| relay_in(app, relayer, channel, socket))
        .into_response())
}

async fn relay_in(app: AppState, relayer: Relayer, channel: Channel, mut socket: WebSocket) {
    let fanout = app.relay.sender(&channel);
    let (caller, from) = (relayer.caller(), relayer.sender());
    loop {
        let frame = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            // An agent's token revoked or rotated (the relay token never is).
            _ = caller.revoked().cancelled() => break,
            frame = socket.recv() => frame,
        };
        let text = match frame {
            Some(Ok(ws::Message::Text(text))) => text.to_string(),
            Some(Ok(ws::Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let _ = fanout.send(text.clone()); // nobody listening is fine
        let Some((topic, payload)) = parse_relay_frame(&text) else {
            tracing::debug!("relay frame ignored (not a relay or event frame)");
            continue;
        };
        if let Err(e) = app
            .broker
            .publish(
                &caller,
                channel.clone(),
                from.clone(),
                &topic,
                payload,
                None,
            )
            .await
        {
            tracing::debug!(error = %e, %topic, "relay event refused");
        }
    }
}

/// The topic and payload of a relay or JSON-RPC event frame; `None` for
/// anything else.
pub fn parse_relay_frame(text: &str) -> Option<(String, Map<String, Value>)> {
    let Value::Object(frame) = serde_json::from_str(text).ok()? else {
        return None;
    };
    if frame.get("_bus_relay") == Some(&Value::Bool(true)) {
        let topic = frame.get("topic")?.as_str()?.to_owned();
        let envelope = frame.get("envelope")?.as_object()?.clone();
        return Some((topic, envelope));
    }
    if frame.get("jsonrpc")?.as_str()? == "2.0" && frame.get("method")?.as_str()? == "event" {
        let params = frame.get("params")?.as_object()?;
        let kind = params.get("type")?.as_str().filter(|t| !t.is_empty())?;
        let mut payload = match params.get("payload") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return None,
        };
        if let Some(session) = params.get("session_id") {
            payload.insert("session_id".into(), session.clone());
        }
        return Some((format!("tui.{kind}"), payload));
    }
    None
}

async fn events(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    Q(q): Q<RelayQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (relayer, channel) = q.authorize(&app, caller.map(|c| c.0))?;
    // Raw frames of every topic: an agent needs to be allowed them all.
    app.broker
        .trust()
        .may_subscribe(&relayer.caller(), &channel, "**")?;
    let caller = relayer.caller();
    Ok(upgrade
        .on_upgrade(move |socket| relay_out(app, caller, channel, socket))
        .into_response())
}

async fn relay_out(app: AppState, caller: Caller, channel: Channel, socket: WebSocket) {
    let mut frames = app.relay.sender(&channel).subscribe();
    let (mut tx, mut rx) = socket.split();
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => break,
            // An agent's token revoked or rotated (the relay token never is).
            _ = caller.revoked().cancelled() => break,
            incoming = rx.next() => match incoming {
                Some(Ok(ws::Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            frame = frames.recv() => match frame {
                Ok(text) => {
                    if tx.send(ws::Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "relay listener fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    let _ = tx.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_shapes() {
        let (t, env) = parse_relay_frame(
            r#"{"_bus_relay":true,"topic":"gateway.agent.start","envelope":{"type":"gateway.agent.start","ts":1.5,"src":"gateway","x":1}}"#,
        )
        .unwrap();
        assert_eq!(t, "gateway.agent.start");
        assert_eq!(env["ts"], 1.5);
        let (t, p) = parse_relay_frame(
            r#"{"jsonrpc":"2.0","method":"event","params":{"type":"tool.start","session_id":"s1","payload":{"tool":"bash"}}}"#,
        )
        .unwrap();
        assert_eq!(t, "tui.tool.start");
        assert_eq!(p["session_id"], "s1");
        assert_eq!(p["tool"], "bash");
        for junk in [
            "nope",
            "[1,2]",
            "{}",
            r#"{"_bus_relay":true,"topic":5}"#,
            r#"{"jsonrpc":"2.0","method":"event","params":{}}"#,
        ] {
            assert!(parse_relay_frame(junk).is_none(), "{junk}");
        }
    }
}
