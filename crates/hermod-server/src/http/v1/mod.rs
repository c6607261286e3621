//! The native API, versioned under `/v1`: send, read an inbox (with an
//! optional long-poll wait), acknowledge, agents and presence, an SSE stream
//! and a WebSocket per agent. The OpenAPI document at `/v1/openapi.json` is
//! generated from these handlers and types by utoipa.
//!
//! The WebSocket speaks the same JSON frames as the Unix socket (without
//! the length prefix): the server pushes `message` frames from the agent's
//! cursor; the client sends `send`, `message`, `ack`, `ping`, `agents`,
//! `list_endpoints`. v1 readers acknowledge explicitly (`ack`), so a reader
//! that reconnects without acknowledging sees its messages again.
//!
//! - [`messages`]: send, inbox, ack, the per-agent SSE stream, agents.
//! - [`events`]: topic events and durable subscriptions.
//! - [`websocket`]: the per-agent WebSocket.

mod events;
mod messages;
mod websocket;

// Imports shared by the submodules (`use super::*`).
use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use futures::{SinkExt, Stream, StreamExt};
use hermod_core::auth::{Caller, Trust};
use hermod_core::broker::{Batch, Reader, Target};
use hermod_core::model::{
    Activity, AgentName, Body, Channel, InboxKey, Message, Meta, MetaFields, Priority, Seq,
    State as DeliveryState,
};
use hermod_core::wire::{
    self, AgentSummary, Envelope, Publication, ReceiptView, Request, ServerFrame,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::{ApiError, JsonBody, Ws, P, Q};
use super::last_event_id;
use super::AppState;

/// Most messages one inbox read returns.
const MAX_LIMIT: usize = 1000;
/// Largest seq the store can hold (SQLite integers are signed).
const SEQ_MAX: Seq = i64::MAX as Seq;
/// Longest `wait` a request may ask for, in seconds.
const MAX_WAIT: f64 = 30.0;

/// Accepts a seq written as an integer or an integral float (JSON Schema
/// counts `7.0` as an integer), within the store's range.
fn seq_from_json<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Seq, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    let seq = match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => Some(u),
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=SEQ_MAX as f64).contains(&f) => {
            Some(f as u64)
        }
        _ => None,
    };
    seq.filter(|&s| s <= SEQ_MAX).ok_or_else(|| {
        serde::de::Error::custom(format!("seq must be an integer from 0 to {SEQ_MAX}"))
    })
}

/// v1 names channels exactly: absent means `default`, `""` is invalid
/// (legacy protocols read `""` as `default`).
fn strict_channel(channel: Option<String>) -> Result<Channel, hermod_core::Error> {
    channel.map_or_else(|| Ok(Channel::default()), Channel::parse)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct AgentPath {
    /// Agent name.
    #[param(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    name: String,
}

pub fn router() -> Router<AppState> {
    use events::*;
    use messages::*;
    Router::new()
        .route("/v1/messages", post(send_message))
        .route("/v1/messages/{id}", get(get_message))
        .route("/v1/threads/{id}", get(get_thread))
        .route("/v1/agents/{name}/presence", post(set_presence))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{name}/inbox", get(read_inbox))
        .route("/v1/agents/{name}/ack", post(ack))
        .route("/v1/agents/{name}/stream", get(stream))
        .route("/v1/agents/{name}/ws", get(websocket::upgrade))
        .route("/v1/events", post(publish_event).get(event_stream))
        .route(
            "/v1/agents/{name}/subscriptions",
            get(list_subscriptions)
                .post(add_subscription)
                .delete(remove_subscription),
        )
        .route("/v1/openapi.json", get(openapi))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hermod v1 API",
        description = "Durable real-time message bus for AI agents. Streaming endpoints not \
                       listed here: GET /v1/agents/{name}/stream (SSE, `id:` = seq, resumable \
                       with Last-Event-ID) and GET /v1/agents/{name}/ws (WebSocket with the \
                       hermes-bus JSON frames, plus `publish` and `subscribe`)."
    ),
    paths(
        messages::send_message,
        messages::list_agents,
        messages::read_inbox,
        messages::ack,
        messages::get_message,
        messages::get_thread,
        messages::set_presence,
        events::publish_event,
        events::event_stream,
        events::list_subscriptions,
        events::add_subscription,
        events::remove_subscription
    ),
    components(schemas(
        messages::SendRequest,
        messages::SendMany,
        messages::SendReply,
        messages::SendOutcome,
        messages::SendReceipt,
        messages::InboxPage,
        messages::GapView,
        messages::MessageView,
        messages::AckRequest,
        messages::AckReply,
        messages::PresenceRequest,
        ReceiptView,
        wire::RecipientView,
        wire::StepView,
        AgentSummary,
        ErrorBody,
        events::PublishRequest,
        events::PublishReceipt,
        events::SubscriptionRequest,
        events::Subscriptions
    ))
)]
struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// An error: `error` is for humans, `code` is stable.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    error: String,
    code: String,
}

impl From<&hermod_core::Error> for ErrorBody {
    fn from(e: &hermod_core::Error) -> Self {
        ErrorBody {
            error: e.to_string(),
            code: e.code().to_owned(),
        }
    }
}
/// Publishes; answers at once (fast class) or once durable.
pub(super) async fn publish(
    app: &AppState,
    caller: &Caller,
    p: Publication,
    from: Option<AgentName>,
) -> Result<ServerFrame, hermod_core::Error> {
    let wait = p.durable;
    let (id, durable) = app.broker.publish_frame(caller, p, from).await;
    let durable = durable?;
    if !wait {
        return Ok(ServerFrame::Published {
            id,
            seq: None,
            ts: None,
        });
    }
    let stored = durable
        .await
        .map_err(|_| hermod_core::Error::ShuttingDown)??;
    let m = stored.first().ok_or(hermod_core::Error::ShuttingDown)?;
    Ok(ServerFrame::Published {
        id: m.id.clone(),
        seq: Some(m.seq),
        ts: Some(m.ts),
    })
}

/// Batches of the log as SSE events (`id:` = seq, `data:` = the message
/// frame), keeping the messages `keep` accepts.
pub(super) fn message_events(
    batches: impl Stream<Item = hermod_core::Result<Batch>> + Send + 'static,
    keep: impl Fn(&Message) -> bool + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    batches
        .map(move |batch| {
            let events: Vec<Result<Event, Infallible>> =
                match batch {
                    Ok(batch) => batch
                        .gap
                        .iter()
                        .map(|g| Ok(crate::http::gap_event(g)))
                        .chain(batch.messages.iter().filter(|m| keep(m)).map(|m| {
                            Ok(Event::default().id(m.seq.to_string()).data(frame_text(m)))
                        }))
                        .collect(),
                    Err(e) => {
                        tracing::error!(error = %e, "log read failed");
                        Vec::new()
                    }
                };
            futures::stream::iter(events)
        })
        .flatten()
}

/// A `message` frame as text (the same JSON the Unix socket sends).
pub(super) fn frame_text(m: &Message) -> String {
    String::from_utf8(wire::message_bytes(m).to_vec()).expect("serde_json writes UTF-8")
}
