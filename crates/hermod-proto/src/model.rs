//! Validated names and the message record.
//!
//! Agent names and channels follow PROTOCOLS.md: case-sensitive, 1–128
//! characters of `[A-Za-z0-9._:@-]`. They are validated once, at the edge,
//! by parsing into [`AgentName`] / [`Channel`]; past that point the broker
//! never re-checks them. Every other string a client chooses that the
//! daemon keeps (a message id, `reply_to`, `thread`, a topic, a
//! subscription pattern) is capped at [`MAX_FIELD_LEN`] characters, checked
//! by the broker where every door's sends, publications and subscriptions
//! pass ([`check_len`], [`check_topic`], [`parse_pattern`]).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Longest agent or channel name, in characters.
pub const MAX_NAME_LEN: usize = 128;

/// Longest string a client chooses that the daemon keeps, other than a
/// name, in characters: a message `id`, `reply_to`, `thread`, a topic, a
/// subscription pattern, an identity's rules. Far above any real id (a
/// UUID is 36) or topic, low enough that one client cannot grow every
/// index, receipt and log line it lands in without bound.
pub const MAX_FIELD_LEN: usize = 256;

/// The sender of receipts, bounces and loop-guard notices: the daemon.
pub const SYSTEM_SENDER: &str = "hermod";

/// The sender name of events that arrived through the relay endpoint; a
/// bridge never ships these back (no echo loops).
pub const RELAY_SENDER: &str = "relay";

/// The sender the SSE-interop door puts on its `subscriber_connected`
/// notices.
pub const INTEROP_SENDER: &str = "interop";

/// The names the daemon itself sends as. No client may send, register or
/// read as one, nor hold an identity by one, on any door and in every
/// `--auth` mode: a receipt, bounce or notice from them is the daemon's.
pub const RESERVED_NAMES: [&str; 3] = [SYSTEM_SENDER, RELAY_SENDER, INTEROP_SENDER];

/// The channel used when a client names none.
pub const DEFAULT_CHANNEL: &str = "default";

fn check_name(s: &str) -> Result<()> {
    let reason = if s.is_empty() {
        "must not be empty"
    } else if s.len() > MAX_NAME_LEN {
        "longer than 128 characters"
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
    {
        "only A-Z a-z 0-9 . _ : @ - are allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: s.chars().take(MAX_NAME_LEN + 8).collect(),
        reason,
    })
}

/// Refuses a value of `field` longer than [`MAX_FIELD_LEN`] characters
/// (`invalid_request`, naming the field).
pub fn check_len(field: &str, value: &str) -> Result<()> {
    // At most 4 bytes a character: a short value is never counted.
    if value.len() <= MAX_FIELD_LEN {
        return Ok(());
    }
    let chars = value.chars().count();
    if chars <= MAX_FIELD_LEN {
        return Ok(());
    }
    Err(Error::InvalidRequest(format!(
        "\"{field}\" is {chars} characters long; at most {MAX_FIELD_LEN} are allowed"
    )))
}

/// Checks a topic a client publishes: within the cap, and a valid topic.
pub fn check_topic(topic: &str) -> Result<()> {
    check_len("topic", topic)?;
    Ok(hermod_events::pattern::validate_topic(topic)?)
}

/// Parses a subscription pattern a client gives: within the cap, and a
/// valid pattern.
pub fn parse_pattern(pattern: &str) -> Result<hermod_events::Pattern> {
    check_len("pattern", pattern)?;
    Ok(hermod_events::Pattern::parse(pattern)?)
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `s` against the naming rule.
            pub fn parse(s: impl Into<String>) -> Result<Self> {
                let s = s.into();
                check_name(&s)?;
                Ok(Self(s))
            }
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::parse(s)
            }
        }
        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::ops::Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A participant on the bus (PROTOCOLS.md calls it agent or endpoint).
    AgentName
);
name_type!(
    /// An isolation namespace: the same agent on two channels has two inboxes.
    Channel
);

impl Default for Channel {
    fn default() -> Self {
        Channel(DEFAULT_CHANNEL.to_owned())
    }
}

impl Channel {
    /// The shared `default` channel (no allocation per use).
    pub fn default_ref() -> &'static Channel {
        static DEFAULT: std::sync::LazyLock<Channel> = std::sync::LazyLock::new(Channel::default);
        &DEFAULT
    }
}

impl AgentName {
    /// The sender name the hermes-bus client uses for short-lived senders.
    pub fn anonymous() -> Self {
        AgentName("anonymous".to_owned())
    }

    /// One of [`RESERVED_NAMES`]: only the daemon speaks as it.
    pub fn is_reserved(&self) -> bool {
        RESERVED_NAMES.contains(&self.as_str())
    }
}

/// The body of every message: always a JSON object, kept as the exact text
/// the sender wrote (key order, number spelling, escapes), so it reaches
/// receivers byte for byte and is never parsed on the hot path.
#[derive(Clone, Debug)]
pub struct Body(Box<RawValue>);

impl Body {
    /// `{}`.
    pub fn empty() -> Self {
        // (Cheap enough: bodies are built once per message.)
        Body(RawValue::from_string("{}".to_owned()).expect("valid JSON"))
    }

    /// Takes a raw JSON value if it is an object.
    pub fn from_raw(raw: &RawValue) -> Result<Self> {
        if !raw.get().starts_with('{') {
            return Err(Error::InvalidRequest(
                "\"body\" must be a JSON object".into(),
            ));
        }
        Ok(Body(raw.to_owned()))
    }

    /// Parses stored JSON text (kept as it is: no copy).
    pub fn from_json(text: String) -> Result<Self> {
        let raw = RawValue::from_string(text).map_err(|e| Error::InvalidJson(e.to_string()))?;
        if !raw.get().starts_with('{') {
            return Err(Error::InvalidRequest(
                "\"body\" must be a JSON object".into(),
            ));
        }
        Ok(Body(raw))
    }

    pub fn from_map(map: Map<String, Value>) -> Self {
        let text = serde_json::to_string(&map).expect("a JSON map always serializes");
        Body(RawValue::from_string(text).expect("serde_json output is valid JSON"))
    }

    /// The exact JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }

    /// The PROTOCOLS.md crossing rule for text-only protocols: a body whose
    /// only field is a string `text` is that text; any other body is its
    /// compact JSON.
    pub fn to_text(&self) -> String {
        let map = self.to_map();
        match map.get("text") {
            Some(Value::String(t)) if map.len() == 1 => t.clone(),
            _ => serde_json::to_string(&map).unwrap_or_default(),
        }
    }

    /// Parses the body into a map (off the hot path: CLI, crossing rules).
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.as_str()).unwrap_or_default()
    }
}

impl Default for Body {
    fn default() -> Self {
        Self::empty()
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Deserializes through a map, so it also works inside tagged enums (the
/// client side); the daemon builds bodies with [`Body::from_raw`] instead.
impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Body::from_map(Map::deserialize(d)?))
    }
}

/// Log position. Strictly increasing across the bus; 0 means "before the first".
pub type Seq = u64;

/// A reader asked to resume after `after`, but retention already removed
/// that view's messages up to `pruned_through`: whatever lay in between
/// is gone, and the read went on from there. Put on the wire as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub after: Seq,
    pub pruned_through: Seq,
}

/// An inbox is the log filtered for one agent on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InboxKey {
    pub channel: Channel,
    pub agent: AgentName,
}

impl InboxKey {
    pub fn new(channel: Channel, agent: AgentName) -> Self {
        Self { channel, agent }
    }
}

/// How a message's sender was verified; delivered as `"auth"` on every
/// transport (legacy clients ignore the extra field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Auth {
    /// The sender presented its agent's token: `from` *is* that agent.
    Token,
    /// The sender runs as the daemon's own user (proved by peer
    /// credentials); `from` is the name it claimed.
    Owner,
    /// Nothing was verified (`--auth open`, or stored before hermod
    /// verified senders).
    #[default]
    Open,
}

impl Auth {
    pub fn as_str(self) -> &'static str {
        match self {
            Auth::Token => "token",
            Auth::Owner => "owner",
            Auth::Open => "open",
        }
    }

    /// Parses the stored spelling; anything unknown reads as `open`.
    pub fn from_stored(s: Option<&str>) -> Self {
        match s {
            Some("token") => Auth::Token,
            Some("owner") => Auth::Owner,
            _ => Auth::Open,
        }
    }

    /// True when `from` was proved by a token (the only proof of a name).
    pub fn verified(self) -> bool {
        self == Auth::Token
    }
}

impl fmt::Display for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How soon a message wants its reader's attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Priority {
    /// Wake-ups fire at once.
    Urgent,
    #[default]
    Normal,
    /// Gathered into one digest wake-up per interval.
    Low,
}

impl Priority {
    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Urgent => "urgent",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "urgent" => Ok(Priority::Urgent),
            "normal" | "" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(Error::InvalidRequest(format!(
                "\"priority\" must be urgent, normal or low, not {:?}",
                s.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// Where one recipient's copy of a message stands. `stored` is implicit
/// (the message is in the log); the rest are recorded as they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum State {
    Stored,
    /// Handed to a live connection, or returned by a read.
    Delivered,
    /// Acknowledged: the recipient's cursor passed it.
    Read,
    /// A reply to it was sent.
    Replied,
    /// Nobody read it within its `bounce_after`; the sender was told.
    Bounced,
    /// Its `ttl` ran out before it was read: it is no longer delivered.
    Expired,
    /// The loop guard stopped it: it waits for `hermod release`.
    Held,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Stored,
        State::Delivered,
        State::Read,
        State::Replied,
        State::Bounced,
        State::Expired,
        State::Held,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Stored => "stored",
            State::Delivered => "delivered",
            State::Read => "read",
            State::Replied => "replied",
            State::Bounced => "bounced",
            State::Expired => "expired",
            State::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "unknown delivery state {:?} (stored, delivered, read, replied, bounced, expired, held)",
                    s.chars().take(32).collect::<String>()
                ))
            })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent is doing, as `hermod agents` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Activity {
    /// Connected (and said nothing else).
    Online,
    /// Between turns: it will see a message now.
    Idle,
    /// In a turn: it will see a message at its next one.
    Busy,
    Offline,
}

impl Activity {
    pub fn as_str(self) -> &'static str {
        match self {
            Activity::Online => "online",
            Activity::Idle => "idle",
            Activity::Busy => "busy",
            Activity::Offline => "offline",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "online" => Ok(Activity::Online),
            "idle" => Ok(Activity::Idle),
            "busy" => Ok(Activity::Busy),
            "offline" => Ok(Activity::Offline),
            _ => Err(Error::InvalidRequest(format!(
                "presence must be online, idle, busy or offline, not {:?}",
                s.chars().take(32).collect::<String>()
            ))),
        }
    }
}

impl fmt::Display for Activity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a sender asked of a message beyond its body: threading, urgency,
/// expiry, bounce and receipts. Every field is optional and travels as a
/// top-level field of the same name (legacy clients ignore them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Meta {
    /// The id of the message this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// The conversation: the id of its first message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// Bus time after which it is no longer delivered (from `ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<f64>,
    /// Seconds after which an unread direct message bounces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce_after: Option<f64>,
    /// The states the sender wants a receipt for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<State>,
}

impl Meta {
    pub fn is_empty(&self) -> bool {
        *self == Meta::default()
    }

    /// Parses a `notify` list: `["read", "bounced"]` or `"read,bounced"`.
    pub fn parse_notify(value: &Value) -> Result<Vec<State>> {
        let names: Vec<&str> = match value {
            Value::Null => vec![],
            Value::String(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect(),
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        Error::InvalidRequest("\"notify\" must list state names".into())
                    })
                })
                .collect::<Result<_>>()?,
            _ => {
                return Err(Error::InvalidRequest(
                    "\"notify\" must be a list of states".into(),
                ))
            }
        };
        let mut states = names
            .into_iter()
            .map(State::parse)
            .collect::<Result<Vec<_>>>()?;
        states.sort();
        states.dedup();
        Ok(states)
    }

    /// Parses a duration in seconds (`ttl`, `bounce_after`): positive and finite.
    pub fn parse_seconds(field: &str, value: &Value) -> Result<Option<f64>> {
        match value {
            Value::Null => Ok(None),
            v => match v.as_f64() {
                Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(s)),
                _ => Err(Error::InvalidRequest(format!(
                    "\"{field}\" must be a positive number of seconds"
                ))),
            },
        }
    }

    /// Checks an id a message refers to (`reply_to`, `thread`); its length
    /// is checked with the message's own id, by the broker.
    pub fn parse_ref(field: &str, value: &Value) -> Result<Option<String>> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            Value::String(s) if !s.chars().any(char::is_control) => Ok(Some(s.clone())),
            _ => Err(Error::InvalidRequest(format!(
                "\"{field}\" must be a message id (a string without control characters)"
            ))),
        }
    }
}

/// The delivery fields of a send as a client writes them, before
/// validation: one parser for every transport.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MetaFields {
    #[serde(default)]
    pub reply_to: Value,
    #[serde(default)]
    pub thread: Value,
    #[serde(default)]
    pub priority: Value,
    #[serde(default)]
    pub ttl: Value,
    #[serde(default)]
    pub bounce_after: Value,
    #[serde(default)]
    pub notify: Value,
}

impl MetaFields {
    /// Validates the fields; `ttl` counts from now.
    pub fn parse(&self) -> Result<Meta> {
        Ok(Meta {
            reply_to: Meta::parse_ref("reply_to", &self.reply_to)?,
            thread: Meta::parse_ref("thread", &self.thread)?,
            priority: match &self.priority {
                Value::Null => Priority::Normal,
                Value::String(s) => Priority::parse(s)?,
                _ => {
                    return Err(Error::InvalidRequest(
                        "\"priority\" must be a string".into(),
                    ))
                }
            },
            expires: Meta::parse_seconds("ttl", &self.ttl)?.map(|ttl| now() + ttl),
            bounce_after: Meta::parse_seconds("bounce_after", &self.bounce_after)?,
            notify: Meta::parse_notify(&self.notify)?,
        })
    }
}

/// An accepted message as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Log position, assigned by the engine.
    pub seq: Seq,
    /// The sender's id if it gave one, else a fresh UUID.
    pub id: String,
    /// Bus time (float Unix seconds), strictly increasing.
    pub ts: f64,
    pub channel: Channel,
    pub from: AgentName,
    /// `None` for a broadcast.
    pub to: Option<AgentName>,
    /// Set for topic events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The `ts` the sender put on the message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ts: Option<f64>,
    /// How `from` was verified.
    #[serde(default)]
    pub auth: Auth,
    /// Threading, priority, expiry and receipts (`None` for most messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Box<Meta>>,
    pub body: Body,
}

impl Message {
    /// The delivery fields (defaults when the sender set none).
    pub fn meta(&self) -> &Meta {
        static NONE: std::sync::LazyLock<Meta> = std::sync::LazyLock::new(Meta::default);
        self.meta.as_deref().unwrap_or(&NONE)
    }

    /// Its `ttl` ran out at `now`.
    pub fn expired(&self, now: f64) -> bool {
        self.meta().expires.is_some_and(|e| e <= now)
    }
}

/// A message the broker has routed but the engine has not yet stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub channel: Channel,
    pub from: AgentName,
    pub to: Option<AgentName>,
    pub topic: Option<String>,
    pub sent_ts: Option<f64>,
    pub auth: Auth,
    pub meta: Option<Box<Meta>>,
    pub body: Body,
    /// Whose inboxes it lands in (resolved by the broker at send time).
    pub recipients: Vec<AgentName>,
    /// What the loop guard does with it.
    pub guard: Guarded,
}

/// The loop guard's part in a stored message. A hold is state in the
/// store, written in the same commit as its message and ended in the same
/// commit as its release, so neither a restart nor retention nor another
/// node can lose a held message or release it twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarded {
    /// An ordinary message.
    #[default]
    Free,
    /// Held for its `to`: stored, in no inbox, kept (retention passes it
    /// by) until a release ends the hold.
    Held,
    /// The release of the message held at this seq: it lands in its
    /// recipients' inboxes only if that hold is still there, ending it;
    /// a second release of one hold lands nowhere.
    Releases(Seq),
}

impl NewMessage {
    /// Stamps the message with its log position and bus time.
    pub fn into_message(self, seq: Seq, ts: f64) -> Message {
        Message {
            seq,
            id: self.id,
            ts,
            channel: self.channel,
            from: self.from,
            to: self.to,
            topic: self.topic,
            sent_ts: self.sent_ts,
            auth: self.auth,
            meta: self.meta,
            body: self.body,
        }
    }
}

/// A fresh message id: a UUID v7, so ids the bus assigns sort by time and
/// the store's id index grows at its end instead of at random pages.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Wall-clock Unix time in float seconds.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Issues strictly increasing bus timestamps: the wall clock, or the last
/// stamp plus 1 µs when the clock has not moved (or went backwards).
#[derive(Debug, Default)]
pub struct BusClock {
    last: f64,
}

impl BusClock {
    /// Starts after `last` (the newest ts already in the log).
    pub fn starting_after(last: f64) -> Self {
        Self { last }
    }

    pub fn stamp(&mut self) -> f64 {
        let mut ts = now();
        if ts <= self.last {
            ts = self.last + 1e-6;
            // At ~1.7e9 s an f64 step is ~2.4e-7, so +1e-6 always moves; the
            // loop only guards against a pathological clock far in the future.
            while ts <= self.last {
                ts = f64::from_bits(ts.to_bits() + 1);
            }
        }
        self.last = ts;
        ts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(AgentName::parse("worker-alpha").is_ok());
        assert!(AgentName::parse("a.b_c:d@e-f9").is_ok());
        assert!(AgentName::parse("x".repeat(128)).is_ok());
        assert!(AgentName::parse("x".repeat(129)).is_err());
        assert!(AgentName::parse("").is_err());
        assert!(AgentName::parse("bad name").is_err());
        assert!(AgentName::parse("ünï").is_err());
        assert_eq!(AgentName::parse("a/b").unwrap_err().code(), "invalid_name");
        for reserved in RESERVED_NAMES {
            assert!(AgentName::parse(reserved).unwrap().is_reserved());
        }
        // Names are case-sensitive: only the exact spelling is the daemon's.
        assert!(!AgentName::parse("Hermod").unwrap().is_reserved());
        assert!(!AgentName::anonymous().is_reserved());
    }

    #[test]
    fn lengths_are_capped_in_characters_and_name_the_field() {
        assert!(check_len("id", &"x".repeat(MAX_FIELD_LEN)).is_ok());
        // 256 characters of 2 bytes each: counted as characters, not bytes.
        assert!(check_len("id", &"é".repeat(MAX_FIELD_LEN)).is_ok());
        let e = check_len("id", &"x".repeat(100_000)).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("\"id\""), "{e}");
        let long_topic = vec!["seg"; 100].join(".");
        let e = check_topic(&long_topic).unwrap_err();
        assert!(
            e.code() == "invalid_request" && e.to_string().contains("\"topic\""),
            "{e}"
        );
        assert_eq!(check_topic("a..b").unwrap_err().code(), "invalid_topic");
        assert!(check_topic("tui.tool.start").is_ok());
        let e = parse_pattern(&format!("{long_topic}.**")).unwrap_err();
        assert!(
            e.code() == "invalid_request" && e.to_string().contains("\"pattern\""),
            "{e}"
        );
        assert!(parse_pattern("tui.**").is_ok());
    }

    #[test]
    fn clock_strictly_increases_and_roundtrips() {
        let mut c = BusClock::starting_after(now() + 5.0);
        let mut prev = 0.0;
        for _ in 0..10_000 {
            let ts = c.stamp();
            assert!(ts > prev);
            let text = serde_json::to_string(&ts).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_bits(), ts.to_bits());
            prev = ts;
        }
    }
}
