//! How hermod's names become NATS subjects and KV keys.
//!
//! Agent and channel names may hold `.` (a subject separator) and `:` or
//! `@` (not allowed in KV keys), so they go into subjects and keys as
//! unpadded base64url, which both accept. Topic segments stay readable
//! where NATS allows them, so a NATS-native client can tap topic events
//! with an ordinary subject filter ([`topic_filter`]).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hermod_core::engine::View;
use hermod_core::model::{AgentName, Channel, InboxKey};

/// A name as one subject token / key token.
pub fn token(name: &str) -> String {
    URL_SAFE_NO_PAD.encode(name)
}

/// The name a [`token`] stands for.
pub fn untoken(token: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    String::from_utf8(bytes).ok()
}

/// A topic segment as a subject token: itself when NATS can carry it,
/// else `~` and its base64url (so `*`, `>` and whitespace never become
/// wildcards or break the subject).
fn segment(s: &str) -> String {
    let plain = !s.is_empty()
        && s != "*"
        && s != ">"
        && !s.starts_with('~')
        && s.bytes().all(|b| b.is_ascii_graphic() && b != b'.');
    if plain {
        s.to_owned()
    } else {
        format!("~{}", token(s))
    }
}

/// The subject a message is published on.
pub fn message_subject(
    prefix: &str,
    channel: &Channel,
    to: Option<&AgentName>,
    topic: Option<&str>,
) -> String {
    let channel = token(channel.as_str());
    match (topic, to) {
        (Some(topic), _) => {
            let segments: Vec<String> = topic.split('.').map(segment).collect();
            format!("{prefix}.t.{channel}.{}", segments.join("."))
        }
        (None, Some(to)) => format!("{prefix}.d.{channel}.{}", token(to.as_str())),
        (None, None) => format!("{prefix}.b.{channel}"),
    }
}

/// The subject a part of a broadcast's recipient list is published on
/// (see [`hermod_core::engine::log_index::LogIndex::append_part`]).
pub fn part_subject(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}.r.{}", token(channel.as_str()))
}

/// Whether a log entry's subject is a recipient-list part's.
pub fn is_part_subject(prefix: &str, subject: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with(".r."))
}

/// A NATS subject filter for a hermod topic pattern on `channel`, and
/// whether hermod must still filter what it matches. `*` maps to `*` and
/// a trailing `**` to `>`; a `**` anywhere else (which NATS cannot
/// express) ends the filter with `>` and leaves the rest to hermod's own
/// pattern match.
pub fn topic_filter(prefix: &str, channel: &Channel, pattern: &str) -> (String, bool) {
    let mut out = vec![format!("{prefix}.t.{}", token(channel.as_str()))];
    let parts: Vec<&str> = pattern.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        match *part {
            "*" => out.push("*".into()),
            "**" => {
                out.push(">".into());
                let last = i == parts.len() - 1;
                // `a.**` also matches `a` itself, which `a.>` does not.
                return (out.join("."), !last || i > 0);
            }
            s => out.push(segment(s)),
        }
    }
    (out.join("."), false)
}

/// KV key (state bucket) of an agent in the registry.
pub fn agent_key(key: &InboxKey) -> String {
    format!("a.{}", inbox(key))
}

/// KV key (state bucket) of one durable subscription.
pub fn subscription_key(key: &InboxKey, pattern: &str) -> String {
    format!("s.{}.{}", inbox(key), token(pattern))
}

/// KV key (state bucket) of an identity.
pub fn identity_key(name: &AgentName) -> String {
    format!("i.{}", token(name.as_str()))
}

/// KV key (state bucket) of a view's pruned mark.
pub fn floor_key(view: &View) -> String {
    match view {
        View::Inbox(key) => format!("f.i.{}", inbox(key)),
        View::Topics(channel) => format!("f.t.{}", token(channel.as_str())),
        View::AllTopics => "f.all".into(),
    }
}

/// KV key (state bucket) of the seq an inbox was last forgotten at:
/// entries up to it are no longer the inbox's, even after a replay.
pub fn epoch_key(key: &InboxKey) -> String {
    format!("e.{}", inbox(key))
}

/// KV key (cursor bucket) of an inbox's cursor.
pub fn cursor_key(key: &InboxKey) -> String {
    inbox(key)
}

fn inbox(key: &InboxKey) -> String {
    format!(
        "{}.{}",
        token(key.channel.as_str()),
        token(key.agent.as_str())
    )
}

/// The key of a delivery step: one per inbox, state and last seq, so a
/// create that finds it taken leaves the first one.
pub fn step_key(step: &hermod_core::engine::Step) -> String {
    format!("p.{}.{}.{}", inbox(&step.key), step.state.as_str(), step.hi)
}

/// What a state-bucket key is about.
#[derive(Debug, PartialEq)]
pub enum StateKey {
    Agent(InboxKey),
    Subscription(InboxKey, String),
    Identity(AgentName),
    Floor(View),
    Epoch(InboxKey),
    /// A delivery step (the value holds all of it).
    Step,
}

impl StateKey {
    pub fn parse(key: &str) -> Option<Self> {
        let parts: Vec<&str> = key.split('.').collect();
        let name = |t: &str| untoken(t);
        let inbox = |c: &str, a: &str| {
            Some(InboxKey::new(
                Channel::parse(name(c)?).ok()?,
                AgentName::parse(name(a)?).ok()?,
            ))
        };
        Some(match parts.as_slice() {
            ["a", c, a] => StateKey::Agent(inbox(c, a)?),
            ["s", c, a, p] => StateKey::Subscription(inbox(c, a)?, name(p)?),
            ["i", n] => StateKey::Identity(AgentName::parse(name(n)?).ok()?),
            ["f", "i", c, a] => StateKey::Floor(View::Inbox(inbox(c, a)?)),
            ["f", "t", c] => StateKey::Floor(View::Topics(Channel::parse(name(c)?).ok()?)),
            ["f", "all"] => StateKey::Floor(View::AllTopics),
            ["e", c, a] => StateKey::Epoch(inbox(c, a)?),
            ["p", _, _, _, _] => StateKey::Step,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str, a: &str) -> InboxKey {
        InboxKey::new(Channel::parse(c).unwrap(), AgentName::parse(a).unwrap())
    }

    #[test]
    fn keys_round_trip() {
        let k = key("team.a", "bob@host:1");
        for (text, want) in [
            (agent_key(&k), StateKey::Agent(k.clone())),
            (
                subscription_key(&k, "work.**"),
                StateKey::Subscription(k.clone(), "work.**".into()),
            ),
            (
                floor_key(&View::Inbox(k.clone())),
                StateKey::Floor(View::Inbox(k.clone())),
            ),
            (
                floor_key(&View::AllTopics),
                StateKey::Floor(View::AllTopics),
            ),
            (epoch_key(&k), StateKey::Epoch(k.clone())),
        ] {
            assert!(text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            assert_eq!(StateKey::parse(&text), Some(want), "{text}");
        }
    }

    #[test]
    fn subjects_and_topic_filters() {
        let c = Channel::default();
        let ch = token("default");
        assert_eq!(
            message_subject("hermod", &c, None, Some("work.done")),
            format!("hermod.t.{ch}.work.done")
        );
        assert_eq!(
            message_subject("hermod", &c, None, Some("a.*.b c")),
            format!("hermod.t.{ch}.a.~{}.~{}", token("*"), token("b c"))
        );
        let f = |p| topic_filter("hermod", &c, p);
        assert_eq!(f("work.*"), (format!("hermod.t.{ch}.work.*"), false));
        assert_eq!(f("**"), (format!("hermod.t.{ch}.>"), false));
        // `work.**` matches `work` too, which `work.>` does not: filtered.
        assert_eq!(f("work.**"), (format!("hermod.t.{ch}.work.>"), true));
        assert_eq!(f("a.**.z"), (format!("hermod.t.{ch}.a.>"), true));
    }
}
