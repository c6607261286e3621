//! Presence: connections, the registry view of who is known and online,
//! live connect notices, and forgetting a name.

use super::*;

/// The newest connection per channel and transport, live only. A `watch`,
/// not a queue: a connect costs one store whatever the number of
/// listeners, and a listener woken late sees only the newest (so 10,000
/// streams opening do not push 10,000² notices; listeners also pace
/// themselves, see the interop door). An entry lives while someone
/// listens: a connect to a channel nobody listens on drops it, and the
/// map is swept of such entries whenever it doubled since the last sweep.
#[derive(Default)]
pub(super) struct Notices {
    watches: HashMap<(Channel, &'static str), watch::Sender<Option<Presence>>>,
    /// `watches.len()` after its last sweep.
    swept: usize,
}

impl Notices {
    /// Tells the listeners of `key`'s channel over `transport`, if any.
    fn notify(&mut self, presence: Presence) {
        let slot = (presence.key.channel.clone(), presence.transport);
        match self.watches.get(&slot) {
            Some(tx) if tx.receiver_count() == 0 => {
                self.watches.remove(&slot);
            }
            Some(tx) => {
                tx.send_replace(Some(presence));
            }
            None => {}
        }
    }

    fn listen(&mut self, slot: (Channel, &'static str)) -> watch::Receiver<Option<Presence>> {
        if self.watches.len() >= 2 * self.swept.max(64) {
            self.watches.retain(|_, tx| tx.receiver_count() > 0);
            self.swept = self.watches.len();
        }
        self.watches
            .entry(slot)
            .or_insert_with(|| watch::Sender::new(None))
            .subscribe()
    }
}

impl Broker {
    /// Registers a connection of `key` over `transport` for `caller` (who
    /// must be allowed to act as `key`: nobody kicks a verified agent). An
    /// `exclusive` connection replaces (kicks) the agent's older exclusive one.
    pub async fn connect(
        &self,
        caller: &Caller,
        key: InboxKey,
        transport: &'static str,
        exclusive: bool,
    ) -> Result<Session> {
        self.trust.may_act_as(caller, &key)?;
        let now = model::now();
        let session = Session {
            id: uuid::Uuid::new_v4().to_string(),
            key: key.clone(),
            kicked: CancellationToken::new(),
            shared: self.shared.clone(),
        };
        let persist = self.shared.state.lock().unwrap().registry.connect(
            &key,
            Connection {
                session_id: session.id.clone(),
                transport,
                since: now,
                exclusive,
                kick: session.kicked.clone(),
            },
        );
        if persist {
            // A reader must not need a write: with the store full or
            // locked the connection is served from memory, and the next
            // connect tries to record the name again.
            if let Err(e) = self.engine.remember_agent(key.clone(), now, true).await {
                tracing::warn!(agent = %key.agent, channel = %key.channel, error = %e,
                    "could not record the agent's connection; serving it anyway");
                self.shared.state.lock().unwrap().registry.unpersist(&key);
            }
        }
        // Nobody listening is fine: presence is live-only.
        self.shared.presence.lock().unwrap().notify(Presence {
            key,
            transport,
            ts: now,
        });
        Ok(session)
    }

    /// The newest connection over `transport` on `channel` from now on
    /// (listeners that fall behind see only the newest).
    pub fn presence(
        &self,
        channel: &Channel,
        transport: &'static str,
    ) -> watch::Receiver<Option<Presence>> {
        self.shared
            .presence
            .lock()
            .unwrap()
            .listen((channel.clone(), transport))
    }

    /// Notes activity of a connected agent.
    pub fn touch(&self, key: &InboxKey) {
        self.shared
            .state
            .lock()
            .unwrap()
            .registry
            .touch(key, model::now());
    }

    /// Every known agent `caller` may see, with its presence: a token bound
    /// to a channel sees the agents of that channel only. Every door that
    /// lists agents or endpoints goes through here.
    pub fn agents(&self, caller: &Caller) -> Vec<AgentInfo> {
        let mut agents = self.shared.state.lock().unwrap().registry.agents();
        agents.retain(|a| caller.sees(&a.channel));
        agents
    }

    /// Open agent connections `caller` may see, per transport.
    pub fn connections(&self, caller: &Caller) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for c in self.agents(caller).iter().flat_map(|a| &a.connections) {
            *out.entry(c.transport).or_default() += 1;
        }
        out
    }

    /// Every known agent `caller` may see, with presence and unread count.
    pub async fn summaries(&self, caller: &Caller) -> Result<Vec<crate::wire::AgentSummary>> {
        let mut out = Vec::new();
        for a in self.agents(caller) {
            let key = InboxKey::new(a.channel.clone(), a.name.clone());
            out.push(crate::wire::AgentSummary {
                unread: self.unread(&key).await?,
                online: a.online(),
                transports: a
                    .connections
                    .iter()
                    .map(|c| c.transport.to_owned())
                    .collect(),
                connected_since: a.connections.iter().map(|c| c.since).reduce(f64::min),
                first_seen: a.first_seen,
                last_seen: a.last_seen,
                presence: a.presence(),
                name: a.name.to_string(),
                channel: a.channel.to_string(),
            });
        }
        Ok(out)
    }

    /// Records what `key` says it is doing (`busy` in a turn, `idle`
    /// between turns) and publishes it as the topic event
    /// `presence.<agent>` on its channel. `caller` must be allowed to act
    /// as `key`. Kept in this node's memory (like connections).
    pub async fn set_presence(
        &self,
        caller: &Caller,
        key: InboxKey,
        status: model::Activity,
    ) -> Result<()> {
        self.trust.may_act_as(caller, &key)?;
        let now = model::now();
        let known = self
            .shared
            .state
            .lock()
            .unwrap()
            .registry
            .set_activity(&key, status, now);
        if !known {
            // Durable first, as any name the bus starts to know.
            self.engine.remember_agent(key.clone(), now, false).await?;
            let mut state = self.shared.state.lock().unwrap();
            state.registry.know(&key, now, now);
            state.registry.set_activity(&key, status, now);
        }
        let payload = serde_json::Map::from_iter([
            ("agent".to_owned(), key.agent.as_str().into()),
            ("channel".to_owned(), key.channel.as_str().into()),
            ("status".to_owned(), status.as_str().into()),
            ("ts".to_owned(), now.into()),
        ]);
        let topic = format!("presence.{}", key.agent);
        // The daemon's notice about the agent (checked above that the caller
        // may act as it): not the caller's own publish, so neither its
        // `may_publish` rules nor the name's identity apply.
        let system = Caller::daemon(crate::model::Auth::Owner);
        let durable = self
            .publish(
                &system,
                key.channel.clone(),
                Some(key.agent.clone()),
                &topic,
                payload,
                None,
            )
            .await?;
        durable.await.map_err(|_| Error::ShuttingDown)??;
        Ok(())
    }

    /// What a sender to `key` should know now: that it is busy.
    pub fn notice_for(&self, key: &InboxKey) -> Option<String> {
        let state = self.shared.state.lock().unwrap();
        let info = state.registry.info(key)?;
        (info.presence() == model::Activity::Busy)
            .then(|| format!("{} is busy: it will see this at its next turn", key.agent))
    }

    /// Registered exclusive endpoints `caller` may see: name → session id
    /// (hermes-bus `list_endpoints`).
    pub fn endpoints(&self, caller: &Caller) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for agent in self.agents(caller) {
            for c in agent.connections.iter().filter(|c| c.exclusive) {
                out.insert(agent.name.to_string(), c.session_id.clone());
            }
        }
        out
    }

    /// Removes `key` from the bus: its registry entry, inbox, cursor and
    /// subscriptions (`hermod agents forget`). Owner or admin only; an
    /// agent that is connected is refused.
    pub async fn forget(&self, caller: &Caller, key: InboxKey) -> Result<()> {
        self.trust.may_admin(caller)?;
        {
            let state = self.shared.state.lock().unwrap();
            if !state.registry.is_known(&key) {
                return Err(Error::InvalidRequest(format!(
                    "{} is not known on channel {}",
                    key.agent, key.channel
                )));
            }
            if state.registry.is_online(&key) {
                return Err(Error::InvalidRequest(format!(
                    "{} is connected; it can be forgotten once it is offline",
                    key.agent
                )));
            }
        }
        // Memory lets go as the feed reports it, before this resolves.
        self.engine.forget_agent(key).await?;
        Ok(())
    }
}
