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

use std::convert::Infallible;

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, Stream, StreamExt};
use hermod_core::broker::Target;
use hermod_core::model::{AgentName, Body, Channel, InboxKey, Message, Seq};
use hermod_core::wire::{self, AgentSummary, Envelope, Publication, Request, ServerFrame};
use hermod_events::Pattern;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::{ApiError, JsonBody, P, Q};
use super::interop::last_event_id;
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
    Router::new()
        .route("/v1/messages", post(send_message))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{name}/inbox", get(read_inbox))
        .route("/v1/agents/{name}/ack", post(ack))
        .route("/v1/agents/{name}/stream", get(stream))
        .route("/v1/agents/{name}/ws", get(websocket))
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
                       with Last-Event-ID), GET /v1/events?pattern=GLOB (SSE of topic events, \
                       resumable the same way) and GET /v1/agents/{name}/ws (WebSocket with the \
                       hermes-bus JSON frames, plus `publish` and `subscribe`)."
    ),
    paths(
        send_message,
        list_agents,
        read_inbox,
        ack,
        publish_event,
        event_stream,
        list_subscriptions,
        add_subscription,
        remove_subscription
    ),
    components(schemas(
        SendRequest,
        SendReceipt,
        InboxPage,
        MessageView,
        AckRequest,
        AckReply,
        AgentSummary,
        ErrorBody,
        PublishRequest,
        PublishReceipt,
        SubscriptionRequest,
        Subscriptions
    ))
)]
struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// An error: `error` is for humans, `code` is stable.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    error: String,
    code: String,
}

/// A message to send: to one agent (`to`), or, without `to`, to every
/// agent known on the channel except the sender (a broadcast).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    /// Sender name.
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    from: String,
    /// Recipient; without it the message is a broadcast.
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    to: Option<String>,
    /// Channel (default `default`).
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    /// Message id; a UUID is assigned when absent.
    id: Option<String>,
    /// The payload: any JSON object, delivered byte for byte.
    #[schema(value_type = Object)]
    body: Box<RawValue>,
}

/// The message is durable.
#[derive(Serialize, ToSchema)]
struct SendReceipt {
    id: String,
    seq: Seq,
    ts: f64,
    channel: String,
}

#[utoipa::path(
    post,
    path = "/v1/messages",
    request_body = SendRequest,
    responses(
        (status = 200, description = "Durable", body = SendReceipt),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    )
)]
async fn send_message(
    State(app): State<AppState>,
    JsonBody(req): JsonBody<SendRequest>,
) -> Result<Json<SendReceipt>, ApiError> {
    let from = AgentName::parse(req.from)?;
    let to = req.to.map(AgentName::parse).transpose()?;
    let env = Envelope {
        to,
        from: Some(from.clone()),
        id: req.id.filter(|i| !i.is_empty()),
        sent_ts: None,
        channel: strict_channel(req.channel)?,
        body: Body::from_raw(&req.body)?,
    };
    let m = app.broker.send_durable(env, from, Target::Any).await?;
    Ok(Json(SendReceipt {
        id: m.id.clone(),
        seq: m.seq,
        ts: m.ts,
        channel: m.channel.to_string(),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/agents",
    responses((status = 200, description = "Every known agent", body = [AgentSummary]))
)]
async fn list_agents(State(app): State<AppState>) -> Result<Json<Vec<AgentSummary>>, ApiError> {
    Ok(Json(app.broker.summaries().await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct InboxQuery {
    /// Channel (default `default`).
    #[param(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    /// Return messages after this seq (default: the agent's cursor).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<Seq>,
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// When nothing is there yet, wait up to this many seconds for a message.
    #[param(minimum = 0, maximum = 30)]
    wait: Option<f64>,
}

/// One stored message.
#[derive(Serialize, ToSchema)]
struct MessageView {
    seq: Seq,
    id: String,
    ts: f64,
    channel: String,
    from: String,
    /// Absent for a broadcast.
    to: Option<String>,
    /// Set for topic events (the body is then the envelope).
    topic: Option<String>,
    sent_ts: Option<f64>,
    #[schema(value_type = Object)]
    body: Box<RawValue>,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        MessageView {
            seq: m.seq,
            id: m.id.clone(),
            ts: m.ts,
            channel: m.channel.to_string(),
            from: m.from.to_string(),
            to: m.to.as_ref().map(|t| t.to_string()),
            topic: m.topic.clone(),
            sent_ts: m.sent_ts,
            body: m.body.as_raw().to_owned(),
        }
    }
}

#[derive(Serialize, ToSchema)]
struct InboxPage {
    messages: Vec<MessageView>,
    /// The agent's acknowledged position.
    cursor: Seq,
}

#[utoipa::path(
    get,
    path = "/v1/agents/{name}/inbox",
    params(AgentPath, InboxQuery),
    responses(
        (status = 200, description = "Messages after `after`, oldest first", body = InboxPage),
        (status = 400, description = "Invalid name or parameter", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    )
)]
async fn read_inbox(
    State(app): State<AppState>,
    P(AgentPath { name }): P<AgentPath>,
    Q(q): Q<InboxQuery>,
) -> Result<Json<InboxPage>, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    let wait = q.wait.unwrap_or(0.0);
    if !(0.0..=MAX_WAIT).contains(&wait) {
        return Err(ApiError::bad_request(format!(
            "wait must be 0 to {MAX_WAIT} seconds"
        )));
    }
    if q.after.is_some_and(|a| a > SEQ_MAX) {
        return Err(ApiError::bad_request(format!(
            "after must be at most {SEQ_MAX}"
        )));
    }
    let cursor = app.broker.cursor(&key).await?;
    let after = q.after.unwrap_or(cursor);
    let wait = std::time::Duration::from_secs_f64(wait).min(app.config.max_wait);
    let mut newest = app.broker.watch(&key);
    let deadline = tokio::time::Instant::now() + wait;
    let messages = loop {
        let batch = app.broker.read(&key, after, limit).await?;
        if !batch.is_empty() || tokio::time::Instant::now() >= deadline {
            break batch;
        }
        app.wait_for(&mut newest, deadline).await?;
    };
    Ok(Json(InboxPage {
        messages: messages
            .iter()
            .map(|m| MessageView::from(m.as_ref()))
            .collect(),
        cursor,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    /// Everything up to and including this seq is acknowledged.
    #[serde(deserialize_with = "seq_from_json")]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    seq: Seq,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct AckReply {
    cursor: Seq,
}

#[utoipa::path(
    post,
    path = "/v1/agents/{name}/ack",
    params(AgentPath),
    request_body = AckRequest,
    responses(
        (status = 200, description = "The cursor after the acknowledgement", body = AckReply),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    )
)]
async fn ack(
    State(app): State<AppState>,
    P(AgentPath { name }): P<AgentPath>,
    JsonBody(req): JsonBody<AckRequest>,
) -> Result<Json<AckReply>, ApiError> {
    let key = InboxKey::new(strict_channel(req.channel)?, AgentName::parse(name)?);
    let previous = app.broker.ack(&key, req.seq).await?;
    let cursor = app.broker.cursor(&key).await?.max(previous);
    Ok(Json(AckReply { cursor }))
}

#[derive(Deserialize)]
struct StreamQuery {
    channel: Option<String>,
    after: Option<Seq>,
}

/// SSE: the inbox from `Last-Event-ID`, else `after`, else the cursor.
async fn stream(
    State(app): State<AppState>,
    P(name): P<String>,
    Q(q): Q<StreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    let session = app.broker.connect(key.clone(), "sse", false).await?;
    let after = match last_event_id(&headers).or(q.after) {
        Some(seq) => seq,
        None => app.broker.cursor(&key).await?,
    };
    let events = app
        .broker
        .follow(key, after)
        .map(move |batch| {
            let _presence = &session; // the stream holds the presence
            let events: Vec<Result<Event, Infallible>> = match batch {
                Ok(batch) => batch
                    .iter()
                    .map(|m| Ok(Event::default().id(m.seq.to_string()).data(frame_text(m))))
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "inbox read failed");
                    Vec::new()
                }
            };
            futures::stream::iter(events)
        })
        .flatten()
        .take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(app.config.keepalive)
            .text("keepalive"),
    ))
}

/// Publishes; answers at once (fast class) or once durable.
async fn publish(
    app: &AppState,
    p: Publication,
    from: AgentName,
) -> Result<ServerFrame, hermod_core::Error> {
    let id = p.id.clone().unwrap_or_else(hermod_core::model::new_id);
    let durable = app
        .broker
        .publish(p.channel, from, &p.topic, p.payload, Some(id.clone()))
        .await?;
    if !p.durable {
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

/// A `message` frame as text (the same JSON the Unix socket sends).
fn frame_text(m: &Message) -> String {
    String::from_utf8(wire::message_bytes(m).to_vec()).expect("serde_json writes UTF-8")
}

#[derive(Deserialize)]
struct ChannelQuery {
    channel: Option<String>,
}

async fn websocket(
    State(app): State<AppState>,
    P(name): P<String>,
    Q(q): Q<ChannelQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    Ok(upgrade
        .max_message_size(wire::MAX_FRAME)
        .on_upgrade(move |socket| ws_session(app, key, socket))
        .into_response())
}

async fn ws_session(app: AppState, key: InboxKey, socket: WebSocket) {
    let broker = app.broker.clone();
    let Ok(_session) = broker.connect(key.clone(), "ws", false).await else {
        return;
    };
    let Ok(cursor) = broker.cursor(&key).await else {
        return;
    };
    let mut inbox = Box::pin(broker.follow(key.clone(), cursor));
    let mut live = TopicStreams::new();
    let (mut tx, mut rx) = socket.split();
    loop {
        let out: Vec<String> = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            batch = inbox.next() => match batch {
                Some(Ok(batch)) => batch.iter().map(|m| frame_text(m)).collect(),
                _ => break,
            },
            Some(events) = live.next(), if !live.is_empty() => events,
            incoming = rx.next() => match incoming {
                Some(Ok(ws::Message::Text(text))) => ws_request(&app, &key, text.as_bytes(), &mut live).await.into_iter().collect(),
                Some(Ok(ws::Message::Binary(_))) => {
                    let e = hermod_core::Error::InvalidJson("frames are JSON text".into());
                    vec![frame_json(ServerFrame::error(&e, None))]
                }
                Some(Ok(_)) => continue, // ping/pong are answered by axum
                _ => break,
            },
        };
        for text in out {
            if tx.send(ws::Message::Text(text.into())).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.close().await;
}

fn frame_json(frame: ServerFrame) -> String {
    String::from_utf8(frame.to_bytes().to_vec()).expect("serde_json writes UTF-8")
}

/// Live topic subscriptions of one WebSocket: each yields the frames of the
/// matching events of a batch.
type TopicStreams = futures::stream::SelectAll<futures::stream::BoxStream<'static, Vec<String>>>;

/// Topic events of `channel` matching `pattern`, from now on, as frames.
fn topic_frames(
    app: &AppState,
    channel: Channel,
    pattern: Pattern,
) -> futures::stream::BoxStream<'static, Vec<String>> {
    let start = app.broker.committed().0;
    app.broker
        .follow_topics(channel, start)
        .filter_map(move |batch| {
            let frames: Vec<String> = batch
                .into_iter()
                .flatten()
                .filter(|m| m.topic.as_deref().is_some_and(|t| pattern.matches(t)))
                .map(|m| frame_text(&m))
                .collect();
            futures::future::ready((!frames.is_empty()).then_some(frames))
        })
        .boxed()
}

/// Handles one client frame on a v1 WebSocket; returns the reply, if any.
/// Frames without a `channel` use the socket's channel.
async fn ws_request(
    app: &AppState,
    key: &InboxKey,
    bytes: &[u8],
    live: &mut TopicStreams,
) -> Option<String> {
    let request = match wire::parse_client_frame_in(bytes, &key.channel) {
        Ok(r) => r,
        Err(e) => return Some(frame_json(ServerFrame::error(&e, None))),
    };
    let reply = match request {
        Request::Ping => Ok(ServerFrame::Pong),
        Request::Send(mut env) | Request::Message(mut env) => {
            let from = env.from.take().unwrap_or_else(|| key.agent.clone());
            let id = env.id.clone();
            match app.broker.send_durable(env, from, Target::Any).await {
                Ok(m) => Ok(ServerFrame::Sent {
                    id: m.id.clone(),
                    seq: m.seq,
                    ts: m.ts,
                }),
                Err(e) => Err((e, id)),
            }
        }
        Request::Publish(p) => {
            let from = p.from.clone().unwrap_or_else(|| key.agent.clone());
            match publish(app, p, from).await {
                Ok(frame) => Ok(frame),
                Err(e) => Err((e, None)),
            }
        }
        Request::Subscribe { pattern, durable } => match Pattern::parse(&pattern) {
            Err(e) => Err((e.into(), None)),
            Ok(_) if durable => match app.broker.subscribe(key.clone(), &pattern).await {
                Ok(_) => Ok(ServerFrame::Subscribed { pattern, durable }),
                Err(e) => Err((e, None)),
            },
            Ok(parsed) => {
                live.push(topic_frames(app, key.channel.clone(), parsed));
                Ok(ServerFrame::Subscribed { pattern, durable })
            }
        },
        Request::Ack(seq) => match app.broker.ack(key, seq).await {
            Ok(_) => return None,
            Err(e) => Err((e, None)),
        },
        Request::ListEndpoints => Ok(ServerFrame::EndpointsList {
            endpoints: app.broker.endpoints(),
        }),
        Request::Agents | Request::Register { .. } => Err((
            hermod_core::Error::InvalidRequest(
                "use GET /v1/agents; the agent of a WebSocket is in its URL".into(),
            ),
            None,
        )),
    };
    Some(match reply {
        Ok(frame) => frame_json(frame),
        Err((e, id)) => frame_json(ServerFrame::error(&e, id)),
    })
}

/// A topic event to publish (hermes_events): the payload becomes the
/// envelope, with `type` (the topic), `ts` and `src` (first segment) filled
/// in only where the publisher left them out.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// `.`-separated, non-empty segments, e.g. `tui.tool.start`.
    #[schema(pattern = "^[^.]+([.][^.]+)*$", min_length = 1)]
    topic: String,
    #[schema(value_type = Option<Object>)]
    payload: Option<serde_json::Map<String, serde_json::Value>>,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    from: Option<String>,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    id: Option<String>,
    /// Answer only once durable (default: the fast class, answered at once
    /// and written with the next commit).
    #[serde(default)]
    durable: bool,
}

/// The event is accepted (`seq`/`ts` present when it was published durably).
#[derive(Serialize, ToSchema)]
struct PublishReceipt {
    id: String,
    seq: Option<Seq>,
    ts: Option<f64>,
}

#[utoipa::path(
    post,
    path = "/v1/events",
    request_body = PublishRequest,
    responses(
        (status = 200, description = "Accepted (durable when asked)", body = PublishReceipt),
        (status = 400, description = "Invalid request or topic", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    )
)]
async fn publish_event(
    State(app): State<AppState>,
    JsonBody(req): JsonBody<PublishRequest>,
) -> Result<Json<PublishReceipt>, ApiError> {
    let from = match req.from {
        Some(f) => AgentName::parse(f)?,
        None => AgentName::anonymous(),
    };
    let publication = Publication {
        topic: req.topic,
        payload: req.payload.unwrap_or_default(),
        channel: strict_channel(req.channel)?,
        from: None,
        id: req.id.filter(|i| !i.is_empty()),
        durable: req.durable,
    };
    match publish(&app, publication, from).await? {
        ServerFrame::Published { id, seq, ts } => Ok(Json(PublishReceipt { id, seq, ts })),
        _ => Err(hermod_core::Error::ShuttingDown.into()),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// `*` matches one segment, `**` any number (default `**`).
    #[param(pattern = "^[^.]+([.][^.]+)*$", min_length = 1)]
    pattern: Option<String>,
    #[param(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    /// Start after this seq (default: from now; `Last-Event-ID` wins).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<Seq>,
}

/// SSE of topic events matching `pattern` (default `**`): from
/// `Last-Event-ID`, else `after`, else from now. Each event: `id:` = seq,
/// `data:` = a `message` frame whose `topic` is set and `body` is the envelope.
#[utoipa::path(
    get,
    path = "/v1/events",
    params(EventsQuery),
    responses(
        (status = 200, description = "An endless text/event-stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid pattern or channel", body = ErrorBody),
    )
)]
async fn event_stream(
    State(app): State<AppState>,
    Q(q): Q<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let pattern =
        Pattern::parse(q.pattern.as_deref().unwrap_or("**")).map_err(hermod_core::Error::from)?;
    let channel = strict_channel(q.channel)?;
    let after = last_event_id(&headers)
        .or(q.after)
        .unwrap_or_else(|| app.broker.committed().0);
    let events = app
        .broker
        .follow_topics(channel, after)
        .map(move |batch| {
            let events: Vec<Result<Event, Infallible>> = batch
                .into_iter()
                .flatten()
                .filter(|m| m.topic.as_deref().is_some_and(|t| pattern.matches(t)))
                .map(|m| Ok(Event::default().id(m.seq.to_string()).data(frame_text(&m))))
                .collect();
            futures::stream::iter(events)
        })
        .flatten()
        .take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(app.config.keepalive)
            .text("keepalive"),
    ))
}

/// A durable subscription: matching events land in the agent's inbox.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SubscriptionRequest {
    /// `*` matches one segment, `**` any number (also none).
    #[schema(pattern = "^[^.]+([.][^.]+)*$", min_length = 1)]
    pattern: String,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
}

/// The agent's durable subscriptions on the channel.
#[derive(Serialize, ToSchema)]
struct Subscriptions {
    patterns: Vec<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ChannelParam {
    #[param(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/agents/{name}/subscriptions",
    params(AgentPath, ChannelParam),
    responses(
        (status = 200, description = "Durable subscriptions", body = Subscriptions),
        (status = 400, description = "Invalid name", body = ErrorBody),
    )
)]
async fn list_subscriptions(
    State(app): State<AppState>,
    P(AgentPath { name }): P<AgentPath>,
    Q(q): Q<ChannelParam>,
) -> Result<Json<Subscriptions>, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    Ok(Json(Subscriptions {
        patterns: app.broker.subscriptions(&key),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/agents/{name}/subscriptions",
    params(AgentPath),
    request_body = SubscriptionRequest,
    responses(
        (status = 200, description = "Durable subscriptions after adding", body = Subscriptions),
        (status = 400, description = "Invalid name or pattern", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    )
)]
async fn add_subscription(
    State(app): State<AppState>,
    P(AgentPath { name }): P<AgentPath>,
    JsonBody(req): JsonBody<SubscriptionRequest>,
) -> Result<Json<Subscriptions>, ApiError> {
    let key = InboxKey::new(strict_channel(req.channel)?, AgentName::parse(name)?);
    app.broker.subscribe(key.clone(), &req.pattern).await?;
    Ok(Json(Subscriptions {
        patterns: app.broker.subscriptions(&key),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/agents/{name}/subscriptions",
    params(AgentPath),
    request_body = SubscriptionRequest,
    responses(
        (status = 200, description = "Durable subscriptions after removing", body = Subscriptions),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    )
)]
async fn remove_subscription(
    State(app): State<AppState>,
    P(AgentPath { name }): P<AgentPath>,
    JsonBody(req): JsonBody<SubscriptionRequest>,
) -> Result<Json<Subscriptions>, ApiError> {
    let key = InboxKey::new(strict_channel(req.channel)?, AgentName::parse(name)?);
    app.broker.unsubscribe(key.clone(), &req.pattern).await?;
    Ok(Json(Subscriptions {
        patterns: app.broker.subscriptions(&key),
    }))
}
