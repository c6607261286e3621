//! The SSE-interop protocol (PROTOCOLS.md §3): `/health`, `/status`,
//! `/subscribe` (SSE push), `/poll` (destructive read), `/broadcast`.
//!
//! `/poll` and `/subscribe` read the same inbox through the same cursor:
//! each *claims* what it sends by moving the cursor atomically
//! ([`hermod_core::Broker::ack`] returns where it was), so a message goes
//! out through exactly one of them. An SSE reconnect with `Last-Event-ID`
//! replays what earlier streams read after that id (the client says it
//! never got them), then continues; not what `/poll` handed out. Streams also carry live
//! `subscriber_connected` notices when a peer opens its stream.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use hermod_core::auth::Caller;
use hermod_core::broker::{Claim, Session, Target};
use hermod_core::model::{
    AgentName, Body, InboxKey, Message, Meta, MetaFields, Seq, INTEROP_SENDER,
};
use hermod_core::wire::{parse_channel, Envelope};
use hermod_core::Broker;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::error::{ApiError, JsonBody, Q};
use super::listener::Flushes;
use super::{last_event_id, AppState};

/// Most messages one `/poll` returns.
const POLL_MAX: usize = 1000;

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
    let mut meta = json!({
        "from": m.from,
        "ts": m.ts,
        "id": m.id,
        "seq": m.seq,
        "channel": m.channel,
        "to": m.to,
        "auth": m.auth,
    });
    // hermod's delivery fields (`reply_to`, `thread`, ...), when set.
    if let (Some(extra), Value::Object(fields)) = (&m.meta, &mut meta) {
        if let Ok(Value::Object(extra)) = serde_json::to_value(extra) {
            fields.extend(extra);
        }
    }
    let body = m.body.as_str();
    if body.contains("\"_meta\"") || body.contains("\\u") {
        // Rare: the body may have its own `_meta` (perhaps spelled with
        // `\u` escapes); ours replaces it. The other fields keep their text.
        let mut out = format!("{{\"_meta\":{meta}");
        for (key, value) in raw_fields(body).iter().filter(|(k, _)| k != "_meta") {
            out.push(',');
            out.push_str(&Value::from(key.as_str()).to_string());
            out.push(':');
            out.push_str(value.get());
        }
        out.push('}');
        return out;
    }
    // Splice `_meta` in front of the sender's fields without re-encoding them.
    let rest = body[1..].trim_start();
    if rest.starts_with('}') {
        format!("{{\"_meta\":{meta}}}")
    } else {
        format!("{{\"_meta\":{meta},{rest}")
    }
}

/// The fields of a JSON object, keys unescaped, values as written (a
/// `Value` would refuse numbers it cannot hold, like `1e400`).
fn raw_fields(object: &str) -> Vec<(String, Box<RawValue>)> {
    struct Fields(Vec<(String, Box<RawValue>)>);
    impl<'de> Deserialize<'de> for Fields {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Fields;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Fields, A::Error> {
                    let mut fields = Vec::new();
                    while let Some(field) = map.next_entry()? {
                        fields.push(field);
                    }
                    Ok(Fields(fields))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    // A stored body is always a JSON object.
    serde_json::from_str::<Fields>(object).map_or_else(|_| Vec::new(), |f| f.0)
}

/// A JSON array of already-encoded items, sent as they are.
fn json_array(items: impl Iterator<Item = String>) -> Response {
    let mut body = String::from("[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&item);
    }
    body.push(']');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
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
    Extension(caller): Extension<Caller>,
    Q(q): Q<ChannelQuery>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(q.channel)?;
    let mut agents = BTreeMap::new();
    let mut queues = BTreeMap::new();
    let mut subscribers = BTreeMap::new();
    for a in app
        .broker
        .agents(&caller)
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
    flushes: Option<Extension<Flushes>>,
    Q(q): Q<AgentQuery>,
) -> Result<Response, ApiError> {
    let key = q.key()?;
    let _presence = app
        .broker
        .connect(&caller, key.clone(), "http", false)
        .await?;
    let cursor = app.broker.cursor(&key).await?;
    let read = app.broker.read(&key, cursor, POLL_MAX).await?;
    let batch = read.messages;
    let mut response = match batch.last() {
        None => json_array(std::iter::empty()),
        Some(last) => {
            // Claim the batch (anything a concurrent reader holds is
            // skipped; nothing while a stream's batch is unacknowledged)
            // and confirm it before answering: if the store refuses, or
            // the client goes away meanwhile, the claim is released and the
            // batch stays unread.
            let mut claim = app
                .broker
                .claim_storable(&key, cursor, last.seq, "poll")
                .await?;
            match flushes {
                // A client that left while the confirm waited its turn gets
                // nothing stored as read for it.
                Some(Extension(f)) => claim.confirm_while(move || !f.gone()).await?,
                None => claim.confirm().await?,
            }
            // Sent as written: re-parsing the bodies could fail (and lose the batch).
            json_array(
                batch
                    .iter()
                    .filter(|m| claim.owns(m.seq))
                    .map(|m| interop_json(m)),
            )
        }
    };
    // The body is the bare array interop clients expect; a gap goes in a
    // header they can ignore.
    if let Some(gap) = read.gap {
        let value = serde_json::to_string(&gap).expect("a gap serializes");
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            response.headers_mut().insert("hermod-gap", value);
        }
    }
    Ok(response)
}

#[derive(Deserialize)]
struct BroadcastQuery {
    from: Option<String>,
    channel: Option<String>,
    /// hermod's extensions: `reply_to`, `thread`, `priority`, `ttl`, ...
    #[serde(flatten)]
    meta: std::collections::HashMap<String, String>,
}

/// The delivery fields of a `/broadcast` query (every value a string).
fn query_meta(q: &std::collections::HashMap<String, String>) -> hermod_core::Result<Meta> {
    let text = |k: &str| q.get(k).map_or(Value::Null, |v| Value::from(v.as_str()));
    let number = |k: &str| -> hermod_core::Result<Value> {
        match q.get(k) {
            None => Ok(Value::Null),
            Some(v) => v.parse::<f64>().map(Value::from).map_err(|_| {
                hermod_core::Error::InvalidRequest(format!("\"{k}\" must be a number of seconds"))
            }),
        }
    };
    MetaFields {
        reply_to: text("reply_to"),
        thread: text("thread"),
        priority: text("priority"),
        ttl: number("ttl")?,
        bounce_after: number("bounce_after")?,
        notify: text("notify"),
    }
    .parse()
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
        .agents(&caller)
        .iter()
        .filter(|a| a.channel == channel && a.name != from)
        .count();
    let env = Envelope {
        to: None,
        from: Some(from.clone()),
        id: None,
        sent_ts: None,
        meta: query_meta(&q.meta)?,
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
    flushes: Option<Extension<Flushes>>,
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
    // With Last-Event-ID, replay what an earlier stream read after it: up
    // to what was read for good, never into a claim still pending (a
    // stream that is going away releases it, and this one then reads it
    // as its own; replayed too, it came twice).
    let (after, replay_until) = match resume {
        Some(id) if id < cursor => (id, app.broker.read_cursor(&key).await?),
        _ => (cursor, 0),
    };
    let notices = peer_notices(&app.broker, key.clone());
    let flushes = flushes.map(|Extension(f)| f);
    let ends = session.kicked.clone();
    let inbox = claimed_events(
        app.broker.clone(),
        key,
        after,
        replay_until,
        session,
        flushes,
    );
    Ok(app.sse(futures::stream::select(inbox, notices), &ends))
}

/// Least time between two `subscriber_connected` notices on one stream.
/// Without it every connect woke every open stream: 3,000 streams opening
/// pushed 348,873 notices and took 8.95 s. Paced, a stream hears of the
/// newest peer at most once a second, so a burst of N streams opening costs
/// about N notices a second in all, whatever N.
const NOTICE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `subscriber_connected` notices: another agent of this channel opened
/// its stream. Live only (not stored, no `id:`), so a waiting agent learns
/// its peer is back without filling every inbox with stale notices; at
/// most one per [`NOTICE_EVERY`], naming the newest peer.
fn peer_notices(broker: &Broker, me: InboxKey) -> impl Stream<Item = Result<Event, Infallible>> {
    let rx = broker.presence(&me.channel, "sse");
    futures::stream::unfold((rx, None), move |(mut rx, next)| {
        let me = me.clone();
        async move {
            // Paced before waiting: a stream in its pause is not among the
            // waiters a connect wakes.
            if let Some(next) = next {
                tokio::time::sleep_until(next).await;
            }
            loop {
                rx.changed().await.ok()?;
                let Some(p) = rx.borrow_and_update().clone() else {
                    continue;
                };
                if p.key.agent == me.agent {
                    continue;
                }
                let notice = json!({
                    "type": "subscriber_connected",
                    "agent": p.key.agent,
                    "_meta": { "from": INTEROP_SENDER, "ts": p.ts, "id": hermod_core::model::new_id(), "channel": p.key.channel },
                });
                let next = Some(tokio::time::Instant::now() + NOTICE_EVERY);
                return Some((Ok(Event::default().data(notice.to_string())), (rx, next)));
            }
        }
    })
}

/// How often a stream with batches the peer has not acknowledged yet
/// looks again when nothing new arrives.
const ACK_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// How often an idle stream looks for a hole below it (see
/// [`Broker::hole_below`]).
const HOLES_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The inbox as SSE events, each batch claimed through the shared cursor.
///
/// A batch is claimed (in memory, so `/poll` skips it) before it is
/// written, and confirmed (stored) only once the peer's TCP stack has
/// acknowledged every byte of it (`flushes`): what sits in the socket's
/// send buffer when the connection dies was never received. If the stream
/// ends first — the client stopped reading and the write timeout closed
/// the connection, or it went away — the unconfirmed claims are released,
/// so a reader that reconnects without `Last-Event-ID` misses nothing (it
/// may see what its own kernel had acknowledged but it never read twice).
/// Across nodes, each batch is leased before it is written
/// ([`Broker::claim_streamed`]): another node hands none of it out meanwhile.
fn claimed_events(
    broker: Broker,
    key: InboxKey,
    after: Seq,
    replay_until: Seq,
    session: Session,
    flushes: Option<Flushes>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Follow {
        batches: std::pin::Pin<
            Box<dyn Stream<Item = hermod_core::Result<hermod_core::broker::Batch>> + Send>,
        >,
        /// Events of the batch being written.
        queue: VecDeque<Event>,
        /// The claim of the batch being written.
        writing: Option<Claim>,
        /// Claims written out, with the byte offset each ends before,
        /// waiting for the peer to acknowledge them (oldest first).
        unacked: VecDeque<(Claim, u64)>,
        /// The end of the last batch read.
        position: Seq,
        broker: Broker,
        key: InboxKey,
        flushes: Option<Flushes>,
        // The session rides along: the agent is connected while this streams.
        _session: Session,
    }
    impl Follow {
        /// The oldest written claim, if the peer's TCP stack has
        /// acknowledged its bytes.
        fn pop_acked(&mut self) -> Option<Claim> {
            let f = self.flushes.as_ref()?;
            let (_, end) = self.unacked.front()?;
            if !f.acked(*end) {
                return None;
            }
            self.unacked.pop_front().map(|(claim, _)| claim)
        }

        /// Before the stream ends on an error of its own (a claim or a
        /// read the store failed, a NATS outage): what the peer
        /// acknowledged is the peer's, confirmed rather than released with
        /// the rest. (A stream whose next claim failed in an outage
        /// released a batch its client had read, and a `/poll` handed it
        /// out again.)
        async fn end(mut self: Box<Self>) -> Option<(Result<Event, Infallible>, Box<Self>)> {
            let acked = std::iter::from_fn(|| self.pop_acked()).collect();
            if let Err(e) = Claim::confirm_all_handed_out(acked).await {
                tracing::warn!(error = %e, "storing the cursor over a stream's last batches failed");
            }
            None
        }
    }
    // Boxed, as are the futures it rarely waits on: an idle stream rests
    // at its `select!`, but the stream's size is that of its largest
    // wait, and the state sat in it twice (10,000 streams, each of these
    // bytes ten thousand times).
    let state = Box::new(Follow {
        batches: Box::pin(broker.follow(key.clone(), after)),
        queue: VecDeque::new(),
        writing: None,
        unacked: VecDeque::new(),
        position: after,
        broker,
        key,
        flushes,
        _session: session,
    });
    futures::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(event) = s.queue.pop_front() {
                return Some((Ok(event), s));
            }
            // Polled with the queue empty: all of the claimed batch is in
            // hyper's buffer or beyond.
            if let Some(mut claim) = s.writing.take() {
                match &s.flushes {
                    Some(f) => s.unacked.push_back((claim, Box::pin(f.in_kernel()).await)),
                    // Not on a TCP connection of ours (a test's router):
                    // handed over is all there is to know.
                    None => {
                        if let Err(e) = Box::pin(claim.confirm_handed_out()).await {
                            tracing::error!(error = %e, "cursor update failed; ending the stream");
                            return None;
                        }
                    }
                }
            }
            // One batch, one store, in order (grouped, they changed the
            // shared-cursor race `sse_resume.py` relies on).
            while let Some(mut claim) = s.pop_acked() {
                if let Err(e) = Box::pin(claim.confirm_handed_out()).await {
                    tracing::error!(error = %e, "cursor update failed; ending the stream");
                    return None;
                }
            }
            if !s.unacked.is_empty() && s.flushes.as_ref().is_some_and(|f| f.gone()) {
                // Its peer left with the batch unread: released now, not at
                // the next write.
                return None;
            }
            if !s.unacked.is_empty() {
                if let Err(e) = Box::pin(s.broker.keep_lease(&s.key)).await {
                    tracing::debug!(error = %e, "renewing the inbox lease failed");
                }
            }
            if let Some(hole) = s.broker.hole_below(&s.key, s.position) {
                // Another reader released a claim below this stream (its
                // store failed, or its client left): read from there again;
                // what this stream holds already is not claimed twice.
                s.batches = Box::pin(s.broker.follow(s.key.clone(), hole));
                s.position = hole;
            }
            let wait = if s.unacked.is_empty() {
                HOLES_EVERY
            } else {
                ACK_EVERY
            };
            // `follow` is an `unfold`: a `next` dropped here loses nothing.
            let next = tokio::select! {
                next = s.batches.next() => next,
                _ = tokio::time::sleep(wait) => continue,
            };
            let batch = match next? {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "inbox read failed; ending the stream");
                    return Box::pin(s.end()).await;
                }
            };
            s.queue
                .extend(batch.gap.as_ref().map(crate::http::gap_event));
            let Some(last) = batch.messages.last().map(|m| m.seq) else {
                continue;
            };
            // Only this batch's range: a hole below (a claim another
            // reader released) is the next reader's, not this stream's.
            // Leased where other nodes read this inbox too: none of them
            // hands these out while this stream's peer gets them.
            let claimed = s.broker.claim_streamed(&s.key, s.position, last, "sse");
            let claim = match Box::pin(claimed).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cursor read failed; ending the stream");
                    return Box::pin(s.end()).await;
                }
            };
            s.position = last;
            for m in &batch.messages {
                let send = if m.seq <= replay_until {
                    // Replayed unless its `read` step names another door
                    // (a `/poll` answer handed it out). A crash can lose
                    // the newest steps: then it is replayed — twice at
                    // worst, never lost to a client that says it never
                    // got it.
                    match Box::pin(s.broker.read_through(&s.key, m.seq)).await {
                        Ok(door) => door.is_none_or(|d| d == "sse"),
                        Err(e) => {
                            tracing::error!(error = %e, "step read failed; ending the stream");
                            return Box::pin(s.end()).await;
                        }
                    }
                } else {
                    claim.owns(m.seq)
                };
                if send {
                    s.queue
                        .push_back(Event::default().id(m.seq.to_string()).data(interop_json(m)));
                }
            }
            s.writing = Some(claim);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{relay::RelayHub, HttpConfig};
    use std::collections::HashMap;

    /// Broadcasts `body` from alice to the default channel (where bob is
    /// known), then answers bob's `/poll` body.
    async fn broadcast_then_poll(body: &str) -> String {
        let app = AppState {
            broker: Broker::open_memory().await.unwrap(),
            config: std::sync::Arc::new(HttpConfig::new(([127, 0, 0, 1], 0).into())),
            shutdown: tokio_util::sync::CancellationToken::new(),
            relay: RelayHub::default(),
            actions: std::sync::Arc::new(crate::actions::ActionStats::default()),
        };
        let owner = Caller::trusted(hermod_core::model::Auth::Owner);
        let bob = InboxKey::new(Default::default(), AgentName::parse("bob").unwrap());
        drop(
            app.broker
                .connect(&owner, bob, "http", false)
                .await
                .unwrap(),
        );
        let query = BroadcastQuery {
            from: Some("alice".into()),
            channel: None,
            meta: Default::default(),
        };
        let raw = RawValue::from_string(body.to_owned()).unwrap();
        let as_owner = || Extension(owner.clone());
        let Json(sent) = broadcast(State(app.clone()), as_owner(), Q(query), JsonBody(raw))
            .await
            .unwrap();
        assert_eq!(sent["delivered"], true);
        let query = AgentQuery {
            agent: Some("bob".into()),
            channel: None,
        };
        let response = poll(State(app), as_owner(), None, Q(query))
            .await
            .unwrap()
            .into_response();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// `_meta.from` of each polled item, reading duplicate keys as most
    /// JSON parsers do (the last one wins).
    fn senders(poll: &str) -> Vec<Value> {
        let items: Vec<HashMap<String, Box<RawValue>>> = serde_json::from_str(poll).unwrap();
        items
            .iter()
            .map(|i| serde_json::from_str::<Value>(i["_meta"].get()).unwrap()["from"].clone())
            .collect()
    }

    // Seen while writing the `http` fuzz target: a number a
    // `serde_json::Value` cannot hold is valid JSON, so the body was stored,
    // and `/poll` panicked re-parsing it (after claiming the batch, so the
    // batch was lost).
    #[tokio::test]
    async fn poll_delivers_numbers_a_json_value_cannot_hold() {
        let text = broadcast_then_poll(r#"{"n":1e400}"#).await;
        assert!(text.contains(r#""n":1e400"#), "{text}");
        assert_eq!(senders(&text), ["alice"]);
    }

    // A body key spelled with `\u` escapes is still `_meta`: ours must
    // replace it, or a sender could pose as another in `_meta.from`.
    #[tokio::test]
    async fn an_escaped_meta_key_cannot_spoof_the_sender() {
        for body in [
            r#"{"\u005fmeta":{"from":"mallory"},"x":1}"#,
            r#"{"_\u006d\u0065ta":{"from":"mallory"}}"#,
            r#"{"_meta":{"from":"mallory"},"y":[1e400]}"#,
        ] {
            let text = broadcast_then_poll(body).await;
            assert_eq!(senders(&text), ["alice"], "{body} -> {text}");
        }
    }
}
