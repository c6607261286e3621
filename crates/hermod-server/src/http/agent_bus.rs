//! The agent-bus protocol (PROTOCOLS.md §2): `POST /send`, long-poll
//! `GET /recv`, `GET /inbox`, `GET /healthz`.
//!
//! `msg` strings cross into bodies as `{"text": msg}` and back out by the
//! crossing rule ([`hermod_core::model::Body::to_text`]). Receiving is a
//! `since=ts` cursor kept by the client; `now` in every reply is the bus's
//! commit-safe now ([`hermod_core::Broker::now`]), so a client that moves its
//! cursor to it never skips a message that was still being committed.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use hermod_core::auth::{Caller, Trust};
use hermod_core::broker::{Reader, Target};
use std::sync::Arc;

use hermod_core::model::{AgentName, Body, Channel, InboxKey, Message, MetaFields};
use hermod_core::wire::{parse_channel, Envelope};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, JsonBody, Q};
use super::AppState;

/// Largest `max` a `/recv` may ask for.
const MAX_BATCH: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/send", post(send))
        .route("/recv", get(recv))
        .route("/inbox", get(inbox))
        .route("/healthz", get(healthz))
}

fn required_str(value: Option<Value>, field: &str) -> Result<String, ApiError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::bad_request(format!(
            "\"{field}\" must be a string"
        ))),
        None => Err(ApiError::bad_request(format!("\"{field}\" is required"))),
    }
}

/// A `/send` body, parsed once into its fields (a body of up to 10 MiB was
/// parsed into a `Value` and then cloned whole for the delivery fields).
/// Each field is a `Value` so that a wrong type gets the agent-bus error
/// text; unknown fields are skipped, never buffered.
#[derive(Deserialize)]
struct SendBody {
    from: Option<Value>,
    to: Option<Value>,
    msg: Option<Value>,
    channel: Option<Value>,
    // hermod's extension fields (`MetaFields`): unknown to agent-bus, so
    // absent from what its scripts send.
    #[serde(default)]
    reply_to: Value,
    #[serde(default)]
    thread: Value,
    #[serde(default)]
    priority: Value,
    #[serde(default)]
    ttl: Value,
    #[serde(default)]
    bounce_after: Value,
    #[serde(default)]
    notify: Value,
}

/// [`SendBody`], or why the body is not a JSON object.
enum SendRequest {
    Object(Box<SendBody>),
    Other(serde::de::IgnoredAny),
}

impl<'de> Deserialize<'de> for SendRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = SendRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SendRequest, A::Error> {
                let body =
                    SendBody::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(SendRequest::Object(Box::new(body)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<SendRequest, A::Error> {
                serde::de::IgnoredAny.visit_seq(seq).map(SendRequest::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<SendRequest, E> {
                Ok(SendRequest::Other(serde::de::IgnoredAny))
            }
            fn visit_bool<E>(self, _: bool) -> Result<SendRequest, E> {
                Ok(SendRequest::Other(serde::de::IgnoredAny))
            }
            fn visit_i64<E>(self, _: i64) -> Result<SendRequest, E> {
                Ok(SendRequest::Other(serde::de::IgnoredAny))
            }
            fn visit_u64<E>(self, _: u64) -> Result<SendRequest, E> {
                Ok(SendRequest::Other(serde::de::IgnoredAny))
            }
            fn visit_f64<E>(self, _: f64) -> Result<SendRequest, E> {
                Ok(SendRequest::Other(serde::de::IgnoredAny))
            }
            fn visit_unit<E>(self) -> Result<SendRequest, E> {
                Ok(SendRequest::Other(serde::de::IgnoredAny))
            }
        }
        d.deserialize_any(Visit)
    }
}

async fn send(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<SendRequest>,
) -> Result<Json<Value>, ApiError> {
    let SendRequest::Object(req) = req else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let SendBody {
        from,
        to,
        msg,
        channel,
        reply_to,
        thread,
        priority,
        ttl,
        bounce_after,
        notify,
    } = *req;
    let from = AgentName::parse(required_str(from, "from")?)?;
    let to = AgentName::parse(required_str(to, "to")?)?;
    let msg = required_str(msg, "msg")?;
    let channel = match channel {
        None | Some(Value::Null) => Channel::default(),
        Some(Value::String(c)) => parse_channel(Some(c))?,
        Some(_) => return Err(ApiError::bad_request("\"channel\" must be a string")),
    };
    let meta = MetaFields {
        reply_to,
        thread,
        priority,
        ttl,
        bounce_after,
        notify,
    }
    .parse()?;
    let env = Envelope {
        to: Some(to),
        from: Some(from),
        id: None,
        sent_ts: None,
        channel: channel.clone(),
        meta,
        body: Body::from_map(serde_json::Map::from_iter([(
            "text".to_owned(),
            msg.into(),
        )])),
    };
    let m = app.broker.send_durable(&caller, env, Target::Any).await?;
    Ok(Json(
        json!({ "ok": true, "ts": m.ts, "channel": channel, "seq": m.seq, "id": m.id }),
    ))
}

#[derive(Deserialize)]
struct RecvQuery {
    to: Option<String>,
    since: Option<f64>,
    block: Option<String>,
    max: Option<usize>,
    channel: Option<String>,
}

/// One message as agent-bus clients print it (with hermod's delivery
/// fields, when set, beside the ones they read).
fn recv_item(m: &Message) -> Value {
    let mut item = json!({
        "ts": m.ts,
        "from": m.from,
        "msg": m.body.to_text(),
        "channel": m.channel,
        "seq": m.seq,
        "id": m.id,
        "auth": m.auth,
    });
    if let (Some(meta), Value::Object(fields)) = (&m.meta, &mut item) {
        if let Ok(Value::Object(extra)) = serde_json::to_value(meta) {
            fields.extend(extra);
        }
    }
    item
}

async fn recv(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Q(q): Q<RecvQuery>,
) -> Result<Json<Value>, ApiError> {
    let to = AgentName::parse(q.to.ok_or_else(|| ApiError::bad_request("\"to\" is required"))?)?;
    let block = match q.block.as_deref() {
        None | Some("false" | "0" | "no" | "") => false,
        Some("true" | "1" | "yes") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "block={other:?}: use true or false"
            )))
        }
    };
    let max = q.max.unwrap_or(100).clamp(1, MAX_BATCH);
    let since = q.since.unwrap_or(0.0);
    // `*` reads every channel (hermod extension); otherwise one inbox.
    let key = match q.channel.as_deref() {
        Some("*") => None,
        other => Some(InboxKey::new(
            parse_channel(other.map(str::to_owned))?,
            to.clone(),
        )),
    };
    // A receiver is a participant: it becomes known (broadcasts reach it)
    // and shows as connected while its request is held.
    let _presence = match &key {
        Some(key) => Some(
            app.broker
                .connect(&caller, key.clone(), "http", false)
                .await?,
        ),
        None => {
            app.broker.trust().may_act_as_agent(&caller, &to)?;
            None
        }
    };
    let to_name = to.clone();
    let reader = match key {
        Some(key) => Reader::Inbox(key),
        None => Reader::Agent(to),
    };
    let deadline = tokio::time::Instant::now() + app.config.max_wait;
    let read = app.broker.read_since(&reader, since, max, block, deadline);
    let may_read = |t: &Trust| match &reader {
        Reader::Inbox(key) => t.may_act_as(&caller, key),
        _ => t.may_act_as_agent(&caller, &to_name),
    };
    let got = app.long_poll(may_read, read).await?;
    // Per inbox: with `channel=*` the answer holds several.
    let mut by_channel: BTreeMap<&Channel, Vec<Arc<Message>>> = BTreeMap::new();
    for m in &got.messages {
        by_channel.entry(&m.channel).or_default().push(m.clone());
    }
    for (channel, messages) in by_channel {
        let key = InboxKey::new(channel.clone(), to_name.clone());
        app.broker.delivered(&key, "poll", &messages).await;
    }
    let items: Vec<Value> = got.messages.iter().map(|m| recv_item(m)).collect();
    let mut answer = json!({ "messages": items, "now": got.now });
    if let Some(gap) = got.gap {
        // An extra field: agent-bus clients ignore what they do not know.
        answer["gap"] = json!(gap);
    }
    Ok(Json(answer))
}

async fn inbox(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let mut recipients: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for agent in app.broker.agents(&caller) {
        let key = InboxKey::new(agent.channel.clone(), agent.name.clone());
        let held = app.broker.count(&key, 0).await?;
        recipients
            .entry(agent.channel.to_string())
            .or_default()
            .insert(agent.name.to_string(), held);
    }
    Ok(Json(
        json!({ "recipients": recipients, "now": app.broker.now() }),
    ))
}

/// `{"ok": true, "status": "ok"}`, or 503 with `"status": "degraded"` and
/// the reason while the store refuses writes (disk full, locked, stopped).
async fn healthz(State(app): State<AppState>) -> Response {
    let now = app.broker.now();
    match app.broker.degraded() {
        None => Json(json!({ "ok": true, "status": "ok", "now": now })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ok": false, "status": "degraded", "reason": reason, "now": now })),
        )
            .into_response(),
    }
}
