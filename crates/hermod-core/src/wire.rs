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
use serde_json::Value;
use tokio_util::codec::LengthDelimitedCodec;

use crate::error::{Error, Result};
use crate::model::{AgentName, Body, Channel, Message, Seq};

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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outgoing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// Frames a client sends. `message`, `register`, `ping` and
/// `list_endpoints` are hermes-bus 0.7.0; the rest are hermod extensions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Register {
        endpoint: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ack: Option<AckMode>,
    },
    Ping,
    Message(Outgoing),
    /// Like `message`, answered with `sent` once durable.
    Send(Outgoing),
    ListEndpoints,
    Ack {
        seq: Seq,
    },
    /// Every known agent with presence and unread counts.
    Agents,
}

const CLIENT_TYPES: &[&str] = &[
    "register",
    "ping",
    "message",
    "send",
    "list_endpoints",
    "ack",
    "agents",
];

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
}

/// A validated client request.
#[derive(Debug, Clone)]
pub enum Request {
    Register {
        endpoint: AgentName,
        channel: Channel,
        ack: AckMode,
    },
    Ping,
    /// Legacy message: no reply unless it fails.
    Message(Envelope),
    /// Extension: reply `sent` once durable.
    Send(Envelope),
    ListEndpoints,
    Ack(Seq),
    Agents,
}

/// Parses and validates one frame payload.
pub fn parse_client_frame(bytes: &[u8]) -> Result<Request> {
    let frame: ClientFrame = match serde_json::from_slice(bytes) {
        Ok(f) => f,
        Err(e) => return Err(classify(bytes, e)),
    };
    Ok(match frame {
        ClientFrame::Register {
            endpoint,
            channel,
            ack,
        } => Request::Register {
            endpoint: AgentName::parse(endpoint)?,
            channel: parse_channel(channel)?,
            ack: ack.unwrap_or_default(),
        },
        ClientFrame::Ping => Request::Ping,
        ClientFrame::Message(o) => Request::Message(o.validate()?),
        ClientFrame::Send(o) => Request::Send(o.validate()?),
        ClientFrame::ListEndpoints => Request::ListEndpoints,
        ClientFrame::Ack { seq } => Request::Ack(seq),
        ClientFrame::Agents => Request::Agents,
    })
}

/// Why a frame did not parse, as one of the stable error codes.
fn classify(bytes: &[u8], e: serde_json::Error) -> Error {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(_) => return Error::InvalidJson(e.to_string()),
    };
    let Some(obj) = value.as_object() else {
        return Error::InvalidJson("a frame must be a JSON object".into());
    };
    match obj.get("type") {
        Some(Value::String(t)) if !CLIENT_TYPES.contains(&t.as_str()) => {
            Error::UnknownType(t.chars().take(64).collect())
        }
        None => Error::InvalidRequest("missing \"type\"".into()),
        _ => Error::InvalidRequest(e.to_string()),
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

impl Outgoing {
    /// Validates names and the body; an empty or missing `to` is a broadcast.
    pub fn validate(self) -> Result<Envelope> {
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
            None | Some(Value::Null) => Body::new(),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(Error::InvalidRequest(
                    "\"body\" must be a JSON object".into(),
                ))
            }
        };
        Ok(Envelope {
            to,
            from,
            id,
            sent_ts: self.ts.as_ref().and_then(Value::as_f64),
            channel: parse_channel(self.channel)?,
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
            body: m.body.clone(),
        }
    }
}

/// One agent in an `agents_list` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSummary {
    pub name: String,
    pub channel: String,
    pub online: bool,
    /// Transports of the open connections (`unix`, ...).
    pub transports: Vec<String>,
    /// When the oldest open connection started.
    pub connected_since: Option<f64>,
    pub first_seen: f64,
    pub last_seen: f64,
    /// Messages after the agent's cursor.
    pub unread: u64,
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
    Message(MessageFrame),
    EndpointsList {
        endpoints: BTreeMap<String, String>,
    },
    AgentsList {
        agents: Vec<AgentSummary>,
    },
    /// Reply to the `send` extension: the message is durable.
    Sent {
        id: String,
        seq: Seq,
        ts: f64,
    },
    Error {
        code: String,
        detail: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl ServerFrame {
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

/// Serializes a message straight to a `message` frame payload.
pub fn message_bytes(m: &Message) -> bytes::Bytes {
    ServerFrame::Message(MessageFrame::from(m)).to_bytes()
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
    fn legacy_message() {
        let r = parse_client_frame(
            br#"{"type":"message","to":"","from":"a","id":"x","ts":12.5,"body":{"text":"hi"}}"#,
        )
        .unwrap();
        let Request::Message(e) = r else { panic!() };
        assert!(e.to.is_none());
        assert_eq!(e.sent_ts, Some(12.5));
        assert_eq!(e.channel.as_str(), "default");
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
