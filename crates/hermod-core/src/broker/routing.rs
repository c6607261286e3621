//! Routing: who a message goes to (and who may send it), durable topic
//! subscriptions, and the hand-off to the engine.
//!
//! Every door's sends, publications and subscriptions enter here, so this
//! is where the strings a client chose are held to
//! [`model::MAX_FIELD_LEN`], before anything is stored.

use super::*;

/// The strings of a message a client chose, each within the cap (checked
/// first: a refused message leaves nothing behind, not even a new name).
fn check_lengths(env: &Envelope) -> Result<()> {
    let fields = [
        ("id", &env.id),
        ("reply_to", &env.meta.reply_to),
        ("thread", &env.meta.thread),
    ];
    for (field, value) in fields {
        if let Some(value) = value {
            model::check_len(field, value)?;
        }
    }
    Ok(())
}

impl Broker {
    /// Routes and submits a message from `caller` (its sender is the
    /// caller's verified name, or `env.from` for a trusted caller); the
    /// returned future resolves once it is durable.
    pub async fn send(&self, caller: &Caller, env: Envelope, target: Target) -> Result<Durable> {
        let (message, hold) = self.route(caller, env, target).await?;
        let durable = self.engine.submit(vec![message]).await?;
        Ok(match hold {
            None => durable,
            Some(hold) => self.after_hold(durable, vec![Some(hold)]),
        })
    }

    /// Passes on `durable` once the messages the guard held (`holds`, one
    /// per message of the batch) are queued for their release.
    fn after_hold(&self, durable: Durable, holds: Vec<Option<(guard::PairKey, bool)>>) -> Durable {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let broker = self.clone();
        tokio::spawn(async move {
            let result = durable.await.unwrap_or(Err(Error::ShuttingDown));
            if let Ok(stored) = &result {
                for (m, hold) in stored.iter().zip(holds) {
                    if let Some((pair, tripped)) = hold {
                        broker.held(m.clone(), pair, tripped).await;
                    }
                }
            }
            let _ = tx.send(result);
        });
        rx
    }

    /// Sends many messages in one engine append (one commit under light
    /// load): each is checked and routed on its own, so one refused message
    /// fails alone; the rest are stored in order and resolve together. A
    /// malformed one (a string over the cap) is a client bug, not an
    /// outcome: it refuses the whole batch, nothing stored, as a bad name
    /// does at the door.
    pub async fn send_many(
        &self,
        caller: &Caller,
        envs: Vec<Envelope>,
        target: Target,
    ) -> Result<Vec<Result<Arc<Message>>>> {
        for (i, env) in envs.iter().enumerate() {
            check_lengths(env).map_err(|e| match e {
                Error::InvalidRequest(detail) => {
                    Error::InvalidRequest(format!("message {i}: {detail}"))
                }
                other => other,
            })?;
        }
        let mut routed = Vec::with_capacity(envs.len());
        let mut batch = Vec::with_capacity(envs.len());
        let mut holds = Vec::with_capacity(envs.len());
        for env in envs {
            match self.route(caller, env, target).await {
                Ok((m, hold)) => {
                    routed.push(Ok(batch.len()));
                    batch.push(m);
                    holds.push(hold);
                }
                Err(e) => routed.push(Err(e)),
            }
        }
        let stored = if batch.is_empty() {
            Vec::new()
        } else {
            let mut durable = self.engine.submit(batch).await?;
            if holds.iter().any(Option::is_some) {
                durable = self.after_hold(durable, holds);
            }
            durable.await.map_err(|_| Error::ShuttingDown)??
        };
        Ok(routed
            .into_iter()
            .map(|r| r.map(|i| stored[i].clone()))
            .collect())
    }

    /// Checks what `caller` may send and resolves the recipients; a
    /// message the loop guard holds goes to nobody yet (and says why).
    async fn route(
        &self,
        caller: &Caller,
        env: Envelope,
        target: Target,
    ) -> Result<(NewMessage, Option<(guard::PairKey, bool)>)> {
        check_lengths(&env)?;
        let from = self.trust.sender(caller, env.from.clone())?;
        self.trust.may_send(caller, &env.channel, env.to.as_ref())?;
        self.trust.take_send(caller, &from)?;
        let now = model::now();
        let to = env
            .to
            .as_ref()
            .map(|to| InboxKey::new(env.channel.clone(), to.clone()));
        // A broadcast goes to every agent known anywhere, and a name this
        // node has not seen may have just registered on another node:
        // catch up with the shared registry first (at once on one node).
        let is_known = |key: &InboxKey| self.shared.state.lock().unwrap().registry.is_known(key);
        let mut known = to.as_ref().is_some_and(is_known);
        if !known {
            self.engine.sync_state().await?;
            known = to.as_ref().is_some_and(is_known);
        }
        let (recipients, unknown) = match to {
            Some(key) => {
                if !known && target == Target::Known {
                    return Err(Error::EndpointNotFound(key.agent.to_string()));
                }
                (vec![key.agent.clone()], (!known).then_some(key))
            }
            None => {
                let state = self.shared.state.lock().unwrap();
                (state.registry.broadcast_targets(&env.channel, &from), None)
            }
        };
        if let Some(key) = unknown {
            // Durable before it is known here: memory never claims a name
            // the store would forget (and the message follows it).
            self.engine.remember_agent(key.clone(), now, false).await?;
        }
        let mut meta = env.meta;
        self.complete_meta(&env.channel, &mut meta).await?;
        let hold = match &env.to {
            Some(to) => match self.guard_check(&env.channel, &from, to)? {
                guard::Verdict::Pass => None,
                guard::Verdict::Hold { pair, tripped } => Some((pair, tripped)),
            },
            None => None,
        };
        let recipients = if hold.is_some() {
            Vec::new()
        } else {
            recipients
        };
        let message = NewMessage {
            meta: (!meta.is_empty()).then(|| Box::new(meta)),
            id: env.id.unwrap_or_else(model::new_id),
            channel: env.channel,
            from,
            to: env.to,
            topic: None,
            sent_ts: env.sent_ts,
            auth: caller.auth(),
            body: env.body,
            recipients,
            guard: if hold.is_some() {
                Guarded::Held
            } else {
                Guarded::Free
            },
        };
        Ok((message, hold))
    }

    /// [`Broker::publish`] of a `publish` frame, as `from` when the frame
    /// names no sender; its id is assigned (if absent) before anything can
    /// fail, so an error can name it. Returns the id and the durability.
    pub async fn publish_frame(
        &self,
        caller: &Caller,
        p: Publication,
        from: Option<AgentName>,
    ) -> (String, Result<Durable>) {
        let id = p.id.unwrap_or_else(model::new_id);
        let from = p.from.or(from);
        let durable = self
            .publish(
                caller,
                p.channel,
                from,
                &p.topic,
                p.payload,
                Some(id.clone()),
            )
            .await;
        (id, durable)
    }

    /// The checks [`Broker::publish`] makes of an event before anything is
    /// stored: a valid topic, within `caller`'s channel and `may_publish`
    /// rule, from a sender it may claim (`from`); that sender. The relay
    /// asks them before it fans a frame out.
    pub fn may_publish(
        &self,
        caller: &Caller,
        channel: &Channel,
        from: Option<AgentName>,
        topic: &str,
    ) -> Result<AgentName> {
        model::check_topic(topic)?;
        self.trust.may_publish(caller, channel, topic)?;
        self.trust.sender(caller, from)
    }

    /// Publishes a topic event on `channel`. The payload becomes the
    /// hermes_events envelope (`type`, `ts`, `src` filled only where
    /// missing); the event lands in the log (so pattern readers see it) and
    /// in the inbox of every agent with a matching durable subscription.
    pub async fn publish(
        &self,
        caller: &Caller,
        channel: Channel,
        from: Option<AgentName>,
        topic: &str,
        payload: serde_json::Map<String, serde_json::Value>,
        id: Option<String>,
    ) -> Result<Durable> {
        let from = self.may_publish(caller, &channel, from, topic)?;
        if let Some(id) = &id {
            model::check_len("id", id)?;
        }
        let body = Body::from_map(hermod_events::envelope(topic, payload));
        // A subscription made on another node a moment ago counts.
        self.engine.sync_state().await?;
        let recipients = {
            let state = self.shared.state.lock().unwrap();
            let mut matching: Vec<AgentName> = state
                .subscriptions
                .get(&channel)
                .into_iter()
                .flatten()
                .filter(|(_, p)| p.matches(topic))
                .map(|(agent, _)| agent.clone())
                .collect();
            matching.sort();
            matching.dedup();
            matching
        };
        let message = NewMessage {
            id: id.unwrap_or_else(model::new_id),
            channel,
            from,
            to: None,
            topic: Some(topic.to_owned()),
            sent_ts: None,
            auth: caller.auth(),
            meta: None,
            body,
            recipients,
            guard: Guarded::Free,
        };
        self.engine.submit(vec![message]).await
    }

    /// Adds a durable subscription: events matching `pattern` published on
    /// the agent's channel land in its inbox. Returns false if it existed.
    /// Resolves once the subscription is durable and routing uses it.
    pub async fn subscribe(&self, caller: &Caller, key: InboxKey, pattern: &str) -> Result<bool> {
        model::parse_pattern(pattern)?;
        self.trust.may_act_as(caller, &key)?;
        self.trust.may_subscribe(caller, &key.channel, pattern)?;
        let now = model::now();
        let (exists, known) = {
            let state = self.shared.state.lock().unwrap();
            (
                state.has_subscription(&key, pattern),
                state.registry.is_known(&key),
            )
        };
        if exists {
            return Ok(false);
        }
        if !known {
            self.engine.remember_agent(key.clone(), now, false).await?;
        }
        self.engine
            .set_subscription(key, pattern.to_owned(), true)
            .await?;
        Ok(true)
    }

    /// Removes a durable subscription; false if there was none.
    pub async fn unsubscribe(&self, caller: &Caller, key: InboxKey, pattern: &str) -> Result<bool> {
        model::parse_pattern(pattern)?;
        self.trust.may_act_as(caller, &key)?;
        if !self
            .shared
            .state
            .lock()
            .unwrap()
            .has_subscription(&key, pattern)
        {
            return Ok(false);
        }
        self.engine
            .set_subscription(key, pattern.to_owned(), false)
            .await?;
        Ok(true)
    }

    /// The durable subscriptions of `key`.
    pub fn subscriptions(&self, key: &InboxKey) -> Vec<String> {
        let state = self.shared.state.lock().unwrap();
        state
            .subscriptions
            .get(&key.channel)
            .into_iter()
            .flatten()
            .filter(|(a, _)| a == &key.agent)
            .map(|(_, p)| p.as_str().to_owned())
            .collect()
    }

    /// [`Broker::send`], then waits until the message is durable.
    pub async fn send_durable(
        &self,
        caller: &Caller,
        env: Envelope,
        target: Target,
    ) -> Result<Arc<Message>> {
        let stored = self
            .send(caller, env, target)
            .await?
            .await
            .map_err(|_| Error::ShuttingDown)??;
        stored.into_iter().next().ok_or(Error::ShuttingDown)
    }
}
