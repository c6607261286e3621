//! The hermes-bus wire format, shared by the daemon and the Rust client.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
//! JSON (one object). [`codec`] enforces [`MAX_FRAME`] from the length prefix
//! alone, so an oversized frame is refused before its body is read.
//!
//! [`ClientFrame`] is what clients send, [`ServerFrame`] what the daemon
//! sends. [`parse_client_frame`] turns raw bytes into a validated
//! [`Request`] with the stable error codes of [`crate::Error`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::codec::LengthDelimitedCodec;

use crate::error::{Error, Result};
use crate::identity::{Identity, IdentitySpec};
use crate::model::{
    Activity, AgentName, Auth, Body, Channel, InboxKey, Message, Meta, MetaFields, Seq, State,
};

/// Largest frame payload: 10 MiB, as the original hermes-bus.
pub const MAX_FRAME: usize = 10 * 1024 * 1024;

/// The length-delimited codec for hermes-bus frames.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// How a registered connection's cursor advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// The daemon advances the cursor once the peer has consumed the bytes
    /// (what legacy clients get).
    #[default]
    Auto,
    /// Only `{"type":"ack","seq":N}` frames advance the cursor.
    Explicit,
}

/// The fields of a `message` (or `send`) frame as a client writes them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outgoing {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    /// Threading, priority, ttl, bounce and receipts (hermod extensions).
    #[serde(flatten)]
    pub meta: OutgoingMeta,
}

/// The delivery fields of an outgoing message as a client writes them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutgoingMeta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_after: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
}

/// Frames a client sends (the client's side; the daemon parses with
/// [`parse_client_frame`]). `message`, `register`, `ping` and
/// `list_endpoints` are hermes-bus 0.7.0; the rest are hermod extensions.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Register {
        endpoint: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ack: Option<AckMode>,
        /// Extension: also send `gap` frames when retention removed
        /// messages this connection would have received.
        #[serde(skip_serializing_if = "Option::is_none")]
        gaps: Option<bool>,
    },
    Ping,
    /// The daemon's health.
    Status,
    Message(Outgoing),
    /// Like `message`, answered with `sent` once durable.
    Send(Outgoing),
    ListEndpoints,
    Ack {
        seq: Seq,
    },
    /// Every known agent with presence and unread counts.
    Agents,
    /// Remove an offline agent with its inbox, cursor and subscriptions.
    Forget {
        agent: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
    },
    /// Peek at an agent's inbox after its cursor (or `after`); acknowledges nothing.
    Inbox {
        agent: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        after: Option<Seq>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Every message committed from now on, as it happens (for a human
    /// watching; a watcher that falls behind misses messages).
    Tail,
    /// Publish a topic event (hermes_events).
    Publish {
        topic: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<Body>,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        durable: Option<bool>,
    },
    /// Receive topic events matching `pattern`: live on this connection, or
    /// (`durable`, registered connections) into the agent's inbox.
    Subscribe {
        pattern: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        durable: Option<bool>,
        /// `*`: live events of every channel (else the connection's).
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
    },
    /// Create an agent identity (owner or admin token); answered with
    /// `identity` carrying the token, shown once.
    IdentityAdd {
        identity: IdentitySpec,
    },
    /// Every identity (without tokens).
    IdentityList,
    /// A new token for `name`; the old one stops working.
    IdentityRotate {
        name: String,
    },
    /// Delete `name`'s identity.
    IdentityRevoke {
        name: String,
    },
    /// Where message `id` stands for each recipient; with `wait`, answered
    /// once every recipient reached that state (or after `timeout` s).
    Receipt {
        id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        wait: Option<State>,
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout: Option<f64>,
    },
    /// The conversation message `id` belongs to, in order.
    Thread {
        id: String,
    },
    /// Sets an agent's presence (`busy`, `idle`, ...; default agent: the
    /// connection's).
    Presence {
        status: Activity,
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
    },
    /// Lets a pair the loop guard holds talk again (owner or admin).
    Release {
        agent: String,
        peer: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
    },
    /// A one-time web console login link (owner over the Unix socket, or
    /// an admin token); with `logout_all`, ends every console session
    /// instead.
    Console {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        logout_all: bool,
    },
}

/// A validated topic event to publish.
#[derive(Debug, Clone)]
pub struct Publication {
    pub topic: String,
    pub payload: serde_json::Map<String, Value>,
    pub channel: Channel,
    pub from: Option<AgentName>,
    pub id: Option<String>,
    /// Wait for durability before answering (default: the fast class).
    pub durable: bool,
}

/// A validated outgoing message.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `None` = broadcast.
    pub to: Option<AgentName>,
    pub from: Option<AgentName>,
    pub id: Option<String>,
    pub sent_ts: Option<f64>,
    pub channel: Channel,
    pub body: Body,
    /// What the sender asked of its delivery.
    pub meta: Meta,
}

/// A validated client request.
#[derive(Debug, Clone)]
pub enum Request {
    Register {
        endpoint: AgentName,
        channel: Channel,
        ack: AckMode,
        /// The client wants `gap` frames.
        gaps: bool,
    },
    Ping,
    /// Extension: the daemon's health (`status` reply).
    Status,
    /// Legacy message: no reply unless it fails.
    Message(Envelope),
    /// Extension: reply `sent` once durable.
    Send(Envelope),
    ListEndpoints,
    Ack(Seq),
    Agents,
    Forget(InboxKey),
    Publish(Publication),
    Subscribe {
        pattern: String,
        durable: bool,
        /// `"channel":"*"`: follow every channel (live subscriptions only).
        every_channel: bool,
    },
    Inbox {
        key: InboxKey,
        after: Option<Seq>,
        limit: usize,
    },
    Tail,
    IdentityAdd(IdentitySpec),
    IdentityList,
    IdentityRotate(AgentName),
    IdentityRevoke(AgentName),
    Receipt {
        id: String,
        wait: Option<State>,
        timeout: f64,
    },
    Thread(String),
    Presence {
        status: Activity,
        agent: Option<AgentName>,
        channel: Channel,
    },
    Release {
        channel: Channel,
        agent: AgentName,
        peer: AgentName,
    },
    Console {
        logout_all: bool,
    },
}

impl Request {
    /// Creating, listing, rotating or revoking agent identities.
    pub fn manages_identities(&self) -> bool {
        matches!(
            self,
            Request::IdentityAdd(_)
                | Request::IdentityList
                | Request::IdentityRotate(_)
                | Request::IdentityRevoke(_)
        )
    }
}

/// Every field any client frame may carry. One flat struct (rather than a
/// tagged enum) so the body can be borrowed as raw JSON text.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    endpoint: Option<String>,
    channel: Option<String>,
    ack: Option<AckMode>,
    gaps: Option<bool>,
    to: Option<String>,
    from: Option<String>,
    id: Option<Value>,
    ts: Option<Value>,
    /// `Some` even for `null` (a plain `Option` would read `null` as absent).
    #[serde(default, borrow, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    seq: Option<Seq>,
    topic: Option<String>,
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    pattern: Option<String>,
    durable: Option<bool>,
    agent: Option<String>,
    after: Option<Seq>,
    limit: Option<usize>,
    /// An agent token on any frame: it authenticates that frame (and, on
    /// `register`, the whole connection).
    token: Option<String>,
    identity: Option<IdentitySpec>,
    name: Option<String>,
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
    wait: Option<String>,
    timeout: Option<f64>,
    status: Option<String>,
    peer: Option<String>,
    logout_all: Option<bool>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses and validates one frame payload.
pub fn parse_client_frame(bytes: &[u8]) -> Result<Request> {
    parse_client_frame_in(bytes, Channel::default_ref())
}

/// [`parse_client_frame`] on a connection bound to `channel`: messages
/// without a `channel` field go there.
pub fn parse_client_frame_in(bytes: &[u8], channel: &Channel) -> Result<Request> {
    parse_client_frame_with_token(bytes, channel).map(|(request, _)| request)
}

/// [`parse_client_frame_in`], also returning the frame's `token` field.
pub fn parse_client_frame_with_token(
    bytes: &[u8],
    channel: &Channel,
) -> Result<(Request, Option<String>)> {
    // serde_json skips unknown fields without checking their UTF-8, so the
    // whole payload is validated first: a frame is UTF-8 JSON or an error.
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::InvalidJson(format!("payload is not UTF-8: {e}")))?;
    let frame: RawFrame<'_> = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return Err(classify(bytes, e)),
    };
    let missing = |field: &str| Error::InvalidRequest(format!("missing \"{field}\""));
    let kind = frame.kind.as_deref().ok_or_else(|| missing("type"))?;
    let token = frame.token.clone();
    let request = match kind {
        "register" => Request::Register {
            endpoint: AgentName::parse(frame.endpoint.ok_or_else(|| missing("endpoint"))?)?,
            channel: parse_channel(frame.channel)?,
            ack: frame.ack.unwrap_or_default(),
            gaps: frame.gaps.unwrap_or(false),
        },
        "ping" => Request::Ping,
        "status" => Request::Status,
        "message" => Request::Message(frame.envelope(channel)?),
        "send" => Request::Send(frame.envelope(channel)?),
        "list_endpoints" => Request::ListEndpoints,
        "ack" => Request::Ack(frame.seq.ok_or_else(|| missing("seq"))?),
        "agents" => Request::Agents,
        "forget" => Request::Forget(InboxKey::new(
            parse_channel(frame.channel)?,
            AgentName::parse(frame.agent.ok_or_else(|| missing("agent"))?)?,
        )),
        "publish" => Request::Publish(frame.publication(channel)?),
        "inbox" => Request::Inbox {
            key: InboxKey::new(
                parse_channel(frame.channel)?,
                AgentName::parse(frame.agent.ok_or_else(|| missing("agent"))?)?,
            ),
            after: frame.after,
            limit: frame.limit.unwrap_or(100).clamp(1, 1000),
        },
        "tail" => Request::Tail,
        "subscribe" => Request::Subscribe {
            pattern: frame.pattern.ok_or_else(|| missing("pattern"))?,
            durable: frame.durable.unwrap_or(false),
            every_channel: frame.channel.as_deref() == Some("*"),
        },
        "identity_add" => Request::IdentityAdd(frame.identity.ok_or_else(|| missing("identity"))?),
        "identity_list" => Request::IdentityList,
        "identity_rotate" => Request::IdentityRotate(AgentName::parse(
            frame.name.ok_or_else(|| missing("name"))?,
        )?),
        "identity_revoke" => Request::IdentityRevoke(AgentName::parse(
            frame.name.ok_or_else(|| missing("name"))?,
        )?),
        "receipt" => Request::Receipt {
            id: message_id(frame.id).ok_or_else(|| missing("id"))?,
            wait: frame.wait.as_deref().map(State::parse).transpose()?,
            timeout: match frame.timeout {
                None => 0.0,
                Some(t) if t.is_finite() && (0.0..=86_400.0).contains(&t) => t,
                Some(_) => {
                    return Err(Error::InvalidRequest(
                        "\"timeout\" must be 0 to 86400 seconds".into(),
                    ))
                }
            },
        },
        "thread" => Request::Thread(message_id(frame.id).ok_or_else(|| missing("id"))?),
        "presence" => Request::Presence {
            status: Activity::parse(frame.status.as_deref().ok_or_else(|| missing("status"))?)?,
            agent: frame.agent.map(AgentName::parse).transpose()?,
            channel: match frame.channel {
                Some(c) if !c.is_empty() => Channel::parse(c)?,
                _ => channel.clone(),
            },
        },
        "release" => Request::Release {
            channel: parse_channel(frame.channel)?,
            agent: AgentName::parse(frame.agent.ok_or_else(|| missing("agent"))?)?,
            peer: AgentName::parse(frame.peer.ok_or_else(|| missing("peer"))?)?,
        },
        "console" => Request::Console {
            logout_all: frame.logout_all.unwrap_or(false),
        },
        other => return Err(Error::UnknownType(other.chars().take(64).collect())),
    };
    Ok((request, token))
}

/// A message id as frames carry it (a string, or a number written as one).
fn message_id(id: Option<Value>) -> Option<String> {
    match id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    }
}

/// Why a frame did not parse, as one of the stable error codes.
fn classify(bytes: &[u8], e: serde_json::Error) -> Error {
    match serde_json::from_slice::<Value>(bytes) {
        Err(_) => Error::InvalidJson(e.to_string()),
        Ok(Value::Object(_)) => Error::InvalidRequest(e.to_string()),
        Ok(_) => Error::InvalidJson("a frame must be a JSON object".into()),
    }
}

/// `None` or `""` mean the default channel.
pub fn parse_channel(channel: Option<String>) -> Result<Channel> {
    match channel {
        None => Ok(Channel::default()),
        Some(c) if c.is_empty() => Ok(Channel::default()),
        Some(c) => Channel::parse(c),
    }
}

impl RawFrame<'_> {
    fn publication(self, default_channel: &Channel) -> Result<Publication> {
        let topic = self
            .topic
            .ok_or_else(|| Error::InvalidRequest("missing \"topic\"".into()))?;
        let payload = match self.payload {
            None => serde_json::Map::new(),
            Some(raw) => match serde_json::from_str(raw.get()) {
                Ok(Value::Object(map)) => map,
                Ok(Value::Null) => serde_json::Map::new(),
                _ => {
                    return Err(Error::InvalidRequest(
                        "\"payload\" must be a JSON object".into(),
                    ))
                }
            },
        };
        Ok(Publication {
            topic,
            payload,
            channel: match self.channel {
                Some(c) if !c.is_empty() => Channel::parse(c)?,
                _ => default_channel.clone(),
            },
            from: match self.from {
                Some(f) if !f.is_empty() => Some(AgentName::parse(f)?),
                _ => None,
            },
            id: match self.id {
                Some(Value::String(s)) if !s.is_empty() => Some(s),
                _ => None,
            },
            durable: self.durable.unwrap_or(false),
        })
    }

    /// Validates names and the body; an empty or missing `to` is a broadcast.
    fn envelope(self, default_channel: &Channel) -> Result<Envelope> {
        let to = match self.to {
            Some(t) if !t.is_empty() => Some(AgentName::parse(t)?),
            _ => None,
        };
        let from = match self.from {
            Some(f) if !f.is_empty() => Some(AgentName::parse(f)?),
            _ => None,
        };
        let id = match self.id {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => Some(other.to_string()),
        };
        let body = match self.body {
            None => Body::empty(),
            Some(raw) => Body::from_raw(raw)?,
        };
        let meta = MetaFields {
            reply_to: self.reply_to,
            thread: self.thread,
            priority: self.priority,
            ttl: self.ttl,
            bounce_after: self.bounce_after,
            notify: self.notify,
        }
        .parse()?;
        Ok(Envelope {
            meta,
            to,
            from,
            id,
            sent_ts: self.ts.as_ref().and_then(Value::as_f64),
            channel: match self.channel {
                Some(c) if !c.is_empty() => Channel::parse(c)?,
                _ => default_channel.clone(),
            },
            body,
        })
    }
}

/// A delivered message as it appears on the wire: the whole message object,
/// as hermes-bus forwards it, plus hermod's `seq` and `channel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageFrame {
    pub id: String,
    pub from: String,
    /// `""` for a broadcast, as the original forwards it.
    #[serde(default)]
    pub to: String,
    pub ts: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    pub channel: String,
    pub seq: Seq,
    /// How the sender was verified.
    #[serde(default)]
    pub auth: Auth,
    /// `reply_to`, `thread`, `priority`, `expires`, ... when set.
    #[serde(flatten)]
    pub meta: Meta,
    pub body: Body,
}

impl From<&Message> for MessageFrame {
    fn from(m: &Message) -> Self {
        MessageFrame {
            id: m.id.clone(),
            from: m.from.to_string(),
            to: m.to.as_ref().map(|t| t.to_string()).unwrap_or_default(),
            ts: m.ts,
            sent_ts: m.sent_ts,
            topic: m.topic.clone(),
            channel: m.channel.to_string(),
            seq: m.seq,
            auth: m.auth,
            meta: m.meta().clone(),
            body: m.body.clone(),
        }
    }
}

/// One agent on one channel, with its presence (`agents_list` replies,
/// `GET /v1/agents`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentSummary {
    pub name: String,
    pub channel: String,
    pub online: bool,
    /// Transports of the open connections (`unix`, `sse`, `ws`, `http`).
    pub transports: Vec<String>,
    /// When the oldest open connection started.
    pub connected_since: Option<f64>,
    pub first_seen: f64,
    pub last_seen: f64,
    /// Messages after the agent's cursor.
    pub unread: u64,
    /// `online`, `idle`, `busy` or `offline`: what the agent said last
    /// (`hermod presence set`), else whether it is connected.
    pub presence: Activity,
}

/// One step of a message's delivery to one recipient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepView {
    pub state: State,
    pub ts: f64,
    /// How it happened: `unix`, `ws`, `sse`, `poll`, `http`, `ttl`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<String>,
    /// Why, when the state alone does not say (a bounce's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Where one message stands for one recipient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecipientView {
    pub agent: String,
    /// The furthest state it reached.
    pub state: State,
    /// `stored` first, then every recorded step in time order.
    pub steps: Vec<StepView>,
}

impl RecipientView {
    /// It reached `state`, or went past it (`read` implies `delivered`,
    /// `replied` both).
    pub fn reached(&self, state: State) -> bool {
        let past = match state {
            State::Delivered => matches!(self.state, State::Read | State::Replied),
            State::Read => self.state == State::Replied,
            _ => false,
        };
        past || self.state == state || self.steps.iter().any(|s| s.state == state)
    }
}

/// Every one of `recipients` reached `state` (and there is one).
pub fn all_reached(recipients: &[RecipientView], state: State) -> bool {
    !recipients.is_empty() && recipients.iter().all(|r| r.reached(state))
}

/// A stored message and every recipient's state (`GET /v1/messages/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReceiptView {
    pub id: String,
    pub seq: Seq,
    pub ts: f64,
    pub channel: String,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(flatten)]
    pub meta: Meta,
    pub recipients: Vec<RecipientView>,
}

/// Frames the daemon sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Registered {
        endpoint: String,
        session_id: String,
    },
    Pong,
    /// Reply to `status`: `ok`, or `degraded` with the reason.
    Status {
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The storage engine and what it is connected to (hermod's
        /// extension; `{"engine": "sqlite" | "memory" | "nats", ...}`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        engine: Option<serde_json::Value>,
        /// What the daemon holds in memory, for the owner and admins
        /// (hermod's extension; `{"cache_bytes", "budget_bytes", "views",
        /// "connections": {transport: n}}`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory: Option<serde_json::Value>,
    },
    Message(MessageFrame),
    /// Retention removed messages this reader asked for (from `after` up
    /// to `pruned_through`); delivery goes on after them. Unix clients get
    /// it only if they asked at `register` (`gaps: true`).
    Gap(crate::model::Gap),
    EndpointsList {
        endpoints: BTreeMap<String, String>,
    },
    AgentsList {
        agents: Vec<AgentSummary>,
    },
    /// Reply to `forget`.
    Forgotten {
        agent: String,
        channel: String,
    },
    /// Reply to `inbox`: messages after the cursor (or `after`), unacknowledged.
    InboxPage {
        messages: Vec<MessageFrame>,
        cursor: Seq,
        /// Retention removed messages after `after` (see [`ServerFrame::Gap`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gap: Option<crate::model::Gap>,
    },
    /// Reply to `publish`: `seq`/`ts` once durable (`durable: true`), else
    /// only the id (the event is queued for the next commit).
    Published {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<Seq>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ts: Option<f64>,
    },
    /// Reply to `subscribe`.
    Subscribed {
        pattern: String,
        durable: bool,
    },
    /// Reply to `identity_add` / `identity_rotate` (with the token, shown
    /// once) and `identity_revoke` (without).
    Identity {
        identity: Identity,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Reply to `identity_list`.
    Identities {
        identities: Vec<Identity>,
    },
    /// Reply to the `send` extension: the message is durable.
    Sent {
        id: String,
        seq: Seq,
        ts: f64,
        /// What the sender should know (the recipient is busy, or the
        /// loop guard holds the message).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notice: Option<String>,
    },
    /// Reply to `receipt`.
    Receipts {
        receipts: Vec<ReceiptView>,
    },
    /// Reply to `thread`: the conversation, oldest first.
    Thread {
        messages: Vec<MessageFrame>,
    },
    /// Reply to `presence`.
    Presence {
        agent: String,
        channel: String,
        status: Activity,
    },
    /// Reply to `release`: how many held messages went on.
    Released {
        released: usize,
    },
    /// Reply to `console`: the one-time login link (valid 60 s, used
    /// once), or with `logout_all` how many sessions ended.
    Console {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        link: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ended: Option<usize>,
    },
    Error {
        code: String,
        detail: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl ServerFrame {
    /// The `status` reply for a store that is healthy (`None`) or degraded.
    pub fn status(degraded: Option<String>, engine: Option<serde_json::Value>) -> Self {
        ServerFrame::Status {
            status: if degraded.is_some() { "degraded" } else { "ok" }.into(),
            reason: degraded,
            engine,
            memory: None,
        }
    }

    pub fn error(e: &Error, id: Option<String>) -> Self {
        ServerFrame::Error {
            code: e.code().to_owned(),
            detail: e.to_string(),
            id,
        }
    }

    /// Serializes to a frame payload (without the length prefix).
    pub fn to_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("server frames always serialize")
            .into()
    }
}

/// Serializes a message straight to a `message` frame payload, borrowing
/// every field (the hot path: no copies of the body).
pub fn message_bytes(m: &Message) -> bytes::Bytes {
    #[derive(Serialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        id: &'a str,
        from: &'a str,
        to: &'a str,
        ts: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        sent_ts: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        topic: Option<&'a str>,
        channel: &'a str,
        seq: Seq,
        auth: &'static str,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        meta: Option<&'a Meta>,
        body: &'a RawValue,
    }
    let frame = Frame {
        meta: m.meta.as_deref(),
        kind: "message",
        id: &m.id,
        from: &m.from,
        to: m.to.as_deref().unwrap_or(""),
        ts: m.ts,
        sent_ts: m.sent_ts,
        topic: m.topic.as_deref(),
        channel: &m.channel,
        seq: m.seq,
        auth: m.auth.as_str(),
        body: m.body.as_raw(),
    };
    serde_json::to_vec(&frame)
        .expect("message frames always serialize")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(bytes: &[u8]) -> &'static str {
        parse_client_frame(bytes).unwrap_err().code()
    }

    #[test]
    fn error_codes() {
        assert_eq!(code(b"\xff\xfe"), "invalid_json");
        assert_eq!(code(b"[1,2]"), "invalid_json");
        assert_eq!(code(b"{\"type\":\"bogus\"}"), "unknown_type");
        assert_eq!(code(b"{\"x\":1}"), "invalid_request");
        assert_eq!(
            code(br#"{"type":"register","endpoint":"bad name"}"#),
            "invalid_name"
        );
        assert_eq!(
            code(br#"{"type":"message","to":"b","body":"text"}"#),
            "invalid_request"
        );
    }

    #[test]
    fn legacy_message_keeps_the_body_text() {
        let r = parse_client_frame(
            br#"{"type":"message","to":"","from":"a","id":"x","ts":12.5,"body":{ "z":1, "a":2.50E0 }}"#,
        )
        .unwrap();
        let Request::Message(e) = r else { panic!() };
        assert!(e.to.is_none());
        assert_eq!(e.sent_ts, Some(12.5));
        assert_eq!(e.channel.as_str(), "default");
        assert_eq!(e.body.as_str(), r#"{ "z":1, "a":2.50E0 }"#);
        assert_eq!(
            code(br#"{"type":"message","to":"b","body":null}"#),
            "invalid_request"
        );
    }

    #[test]
    fn server_frame_shapes() {
        let f = ServerFrame::EndpointsList {
            endpoints: [("a".to_string(), "s".to_string())].into(),
        };
        assert_eq!(
            String::from_utf8(f.to_bytes().to_vec()).unwrap(),
            r#"{"type":"endpoints_list","endpoints":{"a":"s"}}"#
        );
        assert_eq!(&ServerFrame::Pong.to_bytes()[..], br#"{"type":"pong"}"#);
    }
}
