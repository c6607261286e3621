//! The agent registry: who is known on each channel, and presence — who is
//! connected right now, over what, since when, and when last seen.
//!
//! An agent is *known* on a channel once it has connected there over any
//! transport or has messages waiting there. Broadcasts go to the known
//! agents of the channel; the legacy typo protection refuses to store a
//! message for an unknown name.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::model::{AgentName, Channel, InboxKey};

/// One open connection of an agent.
#[derive(Debug, Clone, Serialize)]
pub struct Connection {
    pub session_id: String,
    /// `unix`, `http`, `sse`, ...
    pub transport: &'static str,
    /// Bus time the connection registered.
    pub since: f64,
    /// An exclusive connection (a registered hermes-bus endpoint) is
    /// replaced by the next registration of the same name.
    #[serde(skip)]
    pub exclusive: bool,
    #[serde(skip)]
    pub kick: CancellationToken,
}

/// What the bus knows about one agent on one channel.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub name: AgentName,
    pub channel: Channel,
    pub first_seen: f64,
    pub last_seen: f64,
    pub connections: Vec<Connection>,
    /// What the agent said it is doing, and when (`hermod presence set`).
    pub activity: Option<(crate::model::Activity, f64)>,
    /// When the store last recorded this agent (see [`PERSIST_EVERY`]).
    #[serde(skip)]
    persisted: f64,
    /// The store knows the agent has connected at least once (a name that
    /// never did and holds nothing expires).
    #[serde(skip)]
    connected: bool,
}

/// How stale the stored `last_seen` may get before a connection refreshes
/// it: clients that reconnect every few seconds cost one write per interval.
pub const PERSIST_EVERY: f64 = 10.0;

impl AgentInfo {
    pub fn online(&self) -> bool {
        !self.connections.is_empty()
    }

    /// What `hermod agents` shows: what it said last (`online` clears
    /// that), else whether it is connected.
    pub fn presence(&self) -> crate::model::Activity {
        use crate::model::Activity;
        match self.activity {
            Some((a, _)) if a != Activity::Online => a,
            _ if self.online() => Activity::Online,
            _ => Activity::Offline,
        }
    }

    /// It connected at least once (else it is only a name messages went to).
    pub fn has_connected(&self) -> bool {
        self.connected || self.online()
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    channels: HashMap<Channel, BTreeMap<AgentName, AgentInfo>>,
}

impl Registry {
    pub(crate) fn is_known(&self, key: &InboxKey) -> bool {
        self.channels
            .get(&key.channel)
            .is_some_and(|c| c.contains_key(&key.agent))
    }

    /// Marks `key` known; returns true if it was not known before.
    pub(crate) fn know(&mut self, key: &InboxKey, first_seen: f64, last_seen: f64) -> bool {
        self.know_as(key, first_seen, last_seen, false)
    }

    /// [`Registry::know`], noting whether the store has it as connected.
    pub(crate) fn know_as(
        &mut self,
        key: &InboxKey,
        first_seen: f64,
        last_seen: f64,
        connected: bool,
    ) -> bool {
        let agents = self.channels.entry(key.channel.clone()).or_default();
        match agents.get_mut(&key.agent) {
            Some(info) => {
                info.last_seen = info.last_seen.max(last_seen);
                info.connected |= connected;
                false
            }
            None => {
                agents.insert(
                    key.agent.clone(),
                    AgentInfo {
                        name: key.agent.clone(),
                        channel: key.channel.clone(),
                        first_seen,
                        last_seen,
                        connections: Vec::new(),
                        activity: None,
                        persisted: last_seen,
                        connected,
                    },
                );
                true
            }
        }
    }

    /// The channels on which `agent` is known.
    pub(crate) fn channels_of(&self, agent: &AgentName) -> Vec<Channel> {
        self.channels
            .iter()
            .filter(|(_, agents)| agents.contains_key(agent))
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Everyone known on `channel` except `sender`.
    pub(crate) fn broadcast_targets(
        &self,
        channel: &Channel,
        sender: &AgentName,
    ) -> Vec<AgentName> {
        self.channels
            .get(channel)
            .map(|agents| agents.keys().filter(|a| *a != sender).cloned().collect())
            .unwrap_or_default()
    }

    /// Adds a connection; an exclusive one kicks the older exclusive ones.
    /// Returns true when the store should record the agent now (new, or its
    /// stored `last_seen` is older than [`PERSIST_EVERY`]).
    pub(crate) fn connect(&mut self, key: &InboxKey, conn: Connection) -> bool {
        let new = self.know(key, conn.since, conn.since);
        let info = self
            .channels
            .get_mut(&key.channel)
            .and_then(|c| c.get_mut(&key.agent))
            .expect("just inserted");
        if conn.exclusive {
            info.connections.retain(|old| {
                if old.exclusive {
                    old.kick.cancel();
                }
                !old.exclusive
            });
        }
        // The first connection is always stored: it saves the name from
        // expiring.
        let persist = new || !info.connected || conn.since - info.persisted >= PERSIST_EVERY;
        if persist {
            info.persisted = conn.since;
            info.connected = true;
        }
        info.connections.push(conn);
        persist
    }

    /// The store did not take `key`'s connection: the next one tries again.
    pub(crate) fn unpersist(&mut self, key: &InboxKey) {
        if let Some(info) = self
            .channels
            .get_mut(&key.channel)
            .and_then(|c| c.get_mut(&key.agent))
        {
            info.persisted = f64::NEG_INFINITY;
        }
    }

    /// Closes every connection of `agent`, on every channel (its identity
    /// was added, rotated or revoked: whoever was connected as it no longer
    /// may be).
    pub(crate) fn kick_agent(&self, agent: &AgentName) {
        for info in self.channels.values().filter_map(|c| c.get(agent)) {
            for c in &info.connections {
                c.kick.cancel();
            }
        }
    }

    pub(crate) fn disconnect(&mut self, key: &InboxKey, session_id: &str, now: f64) {
        if let Some(info) = self
            .channels
            .get_mut(&key.channel)
            .and_then(|c| c.get_mut(&key.agent))
        {
            info.connections.retain(|c| c.session_id != session_id);
            if info.connections.is_empty() {
                // A name stays known after its last connection: it keeps
                // no room for connections (10,000 agents that came and
                // went held 2.5 MB of it).
                info.connections = Vec::new();
            }
            info.last_seen = info.last_seen.max(now);
        }
    }

    /// Forgets `key` unless it is connected; true if it was known.
    pub(crate) fn forget(&mut self, key: &InboxKey) -> bool {
        let Some(agents) = self.channels.get_mut(&key.channel) else {
            return false;
        };
        if agents.get(&key.agent).is_some_and(AgentInfo::online) {
            return false;
        }
        agents.remove(&key.agent).is_some()
    }

    pub(crate) fn info(&self, key: &InboxKey) -> Option<&AgentInfo> {
        self.channels.get(&key.channel)?.get(&key.agent)
    }

    /// Records what a known agent says it is doing; false if unknown.
    pub(crate) fn set_activity(
        &mut self,
        key: &InboxKey,
        activity: crate::model::Activity,
        now: f64,
    ) -> bool {
        match self
            .channels
            .get_mut(&key.channel)
            .and_then(|c| c.get_mut(&key.agent))
        {
            Some(info) => {
                info.activity = Some((activity, now));
                true
            }
            None => false,
        }
    }

    /// Is `key` connected right now?
    pub(crate) fn is_online(&self, key: &InboxKey) -> bool {
        self.channels
            .get(&key.channel)
            .and_then(|c| c.get(&key.agent))
            .is_some_and(AgentInfo::online)
    }

    pub(crate) fn touch(&mut self, key: &InboxKey, now: f64) {
        if let Some(info) = self
            .channels
            .get_mut(&key.channel)
            .and_then(|c| c.get_mut(&key.agent))
        {
            info.last_seen = info.last_seen.max(now);
        }
    }

    pub(crate) fn agents(&self) -> Vec<AgentInfo> {
        let mut out: Vec<AgentInfo> = self
            .channels
            .values()
            .flat_map(|c| c.values().cloned())
            .collect();
        out.sort_by(|a, b| (&a.channel, &a.name).cmp(&(&b.channel, &b.name)));
        out
    }
}
