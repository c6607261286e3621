//! The SSE-interop protocol (PROTOCOLS.md §3): `/health`, `/status`,
//! `/subscribe` (SSE push), `/poll` (destructive read), `/broadcast`.
//!
//! `/poll` and `/subscribe` read the same inbox through the same cursor:
//! each *claims* what it sends by moving the cursor atomically
//! ([`hermod_core::Broker::ack`] returns where it was), so a message goes
//! out through exactly one of them. An SSE reconnect with `Last-Event-ID`
//! replays what the previous stream claimed after that id (it may have died
//! in flight), then continues. Streams also carry live
//! `subscriber_connected` notices when a peer opens its stream.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use hermod_core::auth::Caller;
use hermod_core::broker::{Session, Target};
use hermod_core::model::{AgentName, Body, InboxKey, Message, Seq};
use hermod_core::wire::{parse_channel, Envelope};
use hermod_core::Broker;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::error::{ApiError, JsonBody, Q};
use super::{last_event_id, AppState};

/// Most messages one `/poll` returns.
const POLL_MAX: usize = 1000;

/// The sender name of notices the bus itself sends.
const INTEROP: &str = "interop";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/subscribe", get(subscribe))
        .route("/poll", get(poll))
        .route("/broadcast", post(broadcast))
}

#[derive(Deserialize)]
struct AgentQuery {
    agent: Option<String>,
    channel: Option<String>,
}

impl AgentQuery {
    fn key(self) -> Result<InboxKey, ApiError> {
        let agent = self
            .agent
            .ok_or_else(|| ApiError::bad_request("\"agent\" is required"))?;
        Ok(InboxKey::new(
            parse_channel(self.channel)?,
            AgentName::parse(agent)?,
        ))
    }
}

/// A delivered message as interop clients get it: the body's fields plus
/// `_meta` (`from`, `ts`, `id`, and hermod's `seq`, `channel`, `to`).
pub fn interop_json(m: &Message) -> String {
    let meta = json!({
        "from": m.from,
        "ts": m.ts,
        "id": m.id,
        "seq": m.seq,
        "channel": m.channel,
        "to": m.to,
        "auth": m.auth,
    });
    let body = m.body.as_str();
    if body.contains("\"_meta\"") {
        // Rare: the body has its own `_meta`; ours replaces it.
        let mut map = m.body.to_map();
        map.insert("_meta".into(), meta);
        return Value::Object(map).to_string();
    }
    // Splice `_meta` in front of the sender's fields without re-encoding them.
    let rest = body[1..].trim_start();
    if rest.starts_with('}') {
        format!("{{\"_meta\":{meta}}}")
    } else {
        format!("{{\"_meta\":{meta},{rest}")
    }
}

async fn health(State(app): State<AppState>) -> Json<Value> {
    Json(json!({ "ok": true, "service": "hermod", "now": app.broker.now() }))
}

#[derive(Deserialize)]
struct ChannelQuery {
    channel: Option<String>,
}

async fn status(
    State(app): State<AppState>,
    Q(q): Q<ChannelQuery>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(q.channel)?;
    let mut agents = BTreeMap::new();
    let mut queues = BTreeMap::new();
    let mut subscribers = BTreeMap::new();
    for a in app
        .broker
        .agents()
        .into_iter()
        .filter(|a| a.channel == channel)
    {
        let key = InboxKey::new(a.channel.clone(), a.name.clone());
        let transports: Vec<&str> = a.connections.iter().map(|c| c.transport).collect();
        queues.insert(a.name.to_string(), app.broker.unread(&key).await?);
        subscribers.insert(a.name.to_string(), transports.contains(&"sse"));
        agents.insert(
            a.name.to_string(),
            json!({ "online": a.online(), "last_seen": a.last_seen, "transports": transports }),
        );
    }
    Ok(Json(json!({
        "agents": agents,
        "queues": queues,
        "subscribers": subscribers,
        "channel": channel,
        "now": app.broker.now(),
    })))
}

async fn poll(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Q(q): Q<AgentQuery>,
) -> Result<Json<Value>, ApiError> {
    let key = q.key()?;
    let _presence = app
        .broker
        .connect(&caller, key.clone(), "http", false)
        .await?;
    let cursor = app.broker.cursor(&key).await?;
    let batch = app.broker.read(&key, cursor, POLL_MAX).await?;
    let Some(last) = batch.last() else {
        return Ok(Json(json!([])));
    };
    // Claim the batch: anything a concurrent stream already sent is skipped.
    let previous = app.broker.ack(&key, last.seq).await?;
    let items: Vec<Value> = batch
        .iter()
        .filter(|m| m.seq > previous)
        .map(|m| serde_json::from_str(&interop_json(m)).expect("valid JSON"))
        .collect();
    Ok(Json(Value::Array(items)))
}

#[derive(Deserialize)]
struct BroadcastQuery {
    from: Option<String>,
    channel: Option<String>,
}

async fn broadcast(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Q(q): Q<BroadcastQuery>,
    JsonBody(body): JsonBody<Box<RawValue>>,
) -> Result<Json<Value>, ApiError> {
    let from = AgentName::parse(
        q.from
            .ok_or_else(|| ApiError::bad_request("\"from\" is required"))?,
    )?;
    let channel = parse_channel(q.channel)?;
    let recipients = app
        .broker
        .agents()
        .iter()
        .filter(|a| a.channel == channel && a.name != from)
        .count();
    let env = Envelope {
        to: None,
        from: Some(from.clone()),
        id: None,
        sent_ts: None,
        channel,
        body: Body::from_raw(&body)?,
    };
    let m = app.broker.send_durable(&caller, env, Target::Any).await?;
    Ok(Json(json!({
        "delivered": true,
        "recipients": recipients,
        "id": m.id,
        "seq": m.seq,
        "ts": m.ts,
    })))
}

async fn subscribe(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Q(q): Q<AgentQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let key = q.key()?;
    let session = app
        .broker
        .connect(&caller, key.clone(), "sse", false)
        .await?;
    let cursor = app.broker.cursor(&key).await?;
    let resume = last_event_id(&headers);
    // With Last-Event-ID, replay what an earlier stream claimed after it.
    let (after, replay_until) = match resume {
        Some(id) if id < cursor => (id, cursor),
        _ => (cursor, 0),
    };
    let notices = peer_notices(&app.broker, key.clone());
    let inbox = claimed_events(app.broker.clone(), key, after, replay_until, session);
    Ok(app.sse(futures::stream::select(inbox, notices)))
}

/// `subscriber_connected` notices: another agent of this channel opened
/// its stream. Live only (not stored, no `id:`), so a waiting agent learns
/// its peer is back without filling every inbox with stale notices.
fn peer_notices(broker: &Broker, me: InboxKey) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(broker.presence(), move |mut rx| {
        let me = me.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(p)
                        if p.transport == "sse"
                            && p.key.channel == me.channel
                            && p.key.agent != me.agent =>
                    {
                        let notice = json!({
                            "type": "subscriber_connected",
                            "agent": p.key.agent,
                            "_meta": { "from": INTEROP, "ts": p.ts, "id": hermod_core::model::new_id(), "channel": p.key.channel },
                        });
                        return Some((Ok(Event::default().data(notice.to_string())), rx));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    })
}

/// The inbox as SSE events, each claimed through the shared cursor.
fn claimed_events(
    broker: Broker,
    key: InboxKey,
    after: Seq,
    replay_until: Seq,
    session: Session,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let batches = Box::pin(broker.follow(key.clone(), after));
    let state = (
        batches,
        VecDeque::<Arc<Message>>::new(),
        broker,
        key,
        session,
    );
    futures::stream::unfold(
        state,
        move |(mut batches, mut queue, broker, key, session)| async move {
            loop {
                if let Some(m) = queue.pop_front() {
                    let event = Event::default()
                        .id(m.seq.to_string())
                        .data(interop_json(&m));
                    return Some((Ok(event), (batches, queue, broker, key, session)));
                }
                let batch = match batches.next().await? {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "inbox read failed; ending the stream");
                        return None;
                    }
                };
                let last = batch.last().map_or(0, |m| m.seq);
                let previous = match broker.ack(&key, last).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "cursor update failed; ending the stream");
                        return None;
                    }
                };
                queue.extend(
                    batch
                        .into_iter()
                        .filter(|m| m.seq <= replay_until || m.seq > previous),
                );
            }
        },
    )
}
