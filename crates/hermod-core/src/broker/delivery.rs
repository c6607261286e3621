//! Delivery you can see: each recipient's steps (delivered, read,
//! replied, bounced, expired, held), receipts for senders who asked,
//! bounces, expiry and threads.
//!
//! Steps live in the engine (so every node of a shared store sees them)
//! as runs over an inbox: one acknowledgement of a hundred messages is one
//! step. Transports and the cursor code *note* steps; a recorder task
//! stores them in batches off the delivery path (a bounded queue: when it
//! is full, noting waits), and for each step the engine reports as new —
//! only one node, once — tells the senders who asked for that state. A
//! sweeper task bounces direct messages nobody took within their
//! `bounce_after` and marks unread messages whose `ttl` ran out.

use std::collections::HashMap;
use std::sync::Weak;

use serde_json::json;

use super::*;
use crate::engine::{Committed, Step, View};
use crate::model::{Auth, Meta, State as Delivery};
use crate::wire::{ReceiptView, RecipientView, StepView};

/// Steps waiting for the recorder, at most.
const RECORD_QUEUE: usize = 4096;
/// Steps stored in one engine write, at most.
const RECORD_BATCH: usize = 512;
/// Messages of a run the recorder reads at once to find who asked.
const RUN_PAGE: usize = 256;
/// Unread messages the sweeper looks at per inbox and sweep.
const SWEEP_PAGE: usize = 256;
/// Inboxes the sweeper remembers as due (each one entry).
const SWEEP_INBOXES: usize = 65_536;
/// Messages a thread listing returns at most.
pub const THREAD_LIMIT: usize = 1000;

/// The delivery policy (`[delivery]` in `config.toml`).
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Seconds after which an unread direct message bounces, unless the
    /// message says otherwise.
    pub bounce_after: f64,
    /// Default `ttl` per channel, for messages that name none.
    pub ttl: HashMap<Channel, f64>,
    /// How often the sweeper runs.
    pub sweep_every: std::time::Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            bounce_after: 600.0,
            ttl: HashMap::new(),
            sweep_every: std::time::Duration::from_secs(1),
        }
    }
}

/// What the recorder is told.
pub(super) enum Note {
    /// A step to store, with the messages it covers when the noter has them.
    Step {
        step: Step,
        messages: Option<Vec<Arc<Message>>>,
    },
    /// A reply was stored: what it answers is `replied` by its sender.
    Reply(Arc<Message>),
    /// Steps stored already (with a cursor move) whose senders are yet to
    /// be told.
    Added(Vec<Step>),
}

/// A stored message with every recipient's state.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub message: Arc<Message>,
    pub recipients: Vec<RecipientView>,
}

impl Receipt {
    /// As `GET /v1/messages/{id}` and `hermod receipt` show it.
    pub fn view(&self) -> ReceiptView {
        let m = &self.message;
        ReceiptView {
            id: m.id.clone(),
            seq: m.seq,
            ts: m.ts,
            channel: m.channel.to_string(),
            from: m.from.to_string(),
            to: m.to.as_ref().map(|t| t.to_string()),
            meta: m.meta().clone(),
            recipients: self.recipients.clone(),
        }
    }
}

impl Receipt {
    /// Whether every recipient reached `state` (or went past it).
    pub fn reached(&self, state: Delivery) -> bool {
        crate::wire::all_reached(&self.recipients, state)
    }
}

/// The delivery state kept in memory: when each inbox next needs the
/// sweeper (bounded; a full map sweeps everything on the next pass).
#[derive(Default)]
pub(super) struct Sweep {
    due: HashMap<InboxKey, f64>,
    overflowed: bool,
}

impl Sweep {
    fn due_at(&mut self, key: &InboxKey, at: f64) {
        if let Some(d) = self.due.get_mut(key) {
            *d = d.min(at);
        } else if self.due.len() < SWEEP_INBOXES {
            self.due.insert(key.clone(), at);
        } else {
            self.overflowed = true;
        }
    }
}

/// The recorder's queue, created with the broker.
pub(super) fn recorder() -> (mpsc::Sender<Note>, mpsc::Receiver<Note>) {
    mpsc::channel(RECORD_QUEUE)
}

/// A broker handle that does not keep the broker alive (background tasks).
struct WeakBroker {
    shared: Weak<Shared>,
    engine: Weak<dyn Engine>,
    trust: Weak<Trust>,
}

impl WeakBroker {
    fn new(b: &Broker) -> Self {
        Self {
            shared: Arc::downgrade(&b.shared),
            engine: Arc::downgrade(&b.engine),
            trust: Arc::downgrade(&b.trust),
        }
    }

    fn upgrade(&self) -> Option<Broker> {
        Some(Broker {
            shared: self.shared.upgrade()?,
            engine: self.engine.upgrade()?,
            trust: self.trust.upgrade()?,
        })
    }
}

impl Shared {
    /// Called by the follower for every committed message: a direct
    /// message (or one that expires) makes its inbox due for the sweeper,
    /// and a reply is handed to the recorder (which looks up what it
    /// answers: the follower never waits).
    pub(super) fn watch_delivery(&self, batch: &[Committed]) {
        let default_bounce = self.delivery.lock().unwrap().bounce_after;
        // Worked out before the sweep's lock is taken, once per commit.
        let mut due = Vec::new();
        for c in batch {
            let m = &c.message;
            if m.topic.is_some() || m.from.as_str() == SYSTEM_SENDER {
                continue;
            }
            if m.meta().reply_to.is_some()
                && self.recorder.try_send(Note::Reply(m.clone())).is_err()
            {
                self.steps_lost.fetch_add(1, Ordering::Relaxed);
            }
            let bounce =
                m.to.as_ref()
                    .map(|_| m.ts + m.meta().bounce_after.unwrap_or(default_bounce));
            let expires = m.meta().expires;
            if let Some(at) = [bounce, expires].into_iter().flatten().reduce(f64::min) {
                due.push((c, at));
            }
        }
        if due.is_empty() {
            return;
        }
        let mut sweep = self.sweep.lock().unwrap();
        for (c, at) in due {
            for r in &c.recipients {
                sweep.due_at(&InboxKey::new(c.message.channel.clone(), r.clone()), at);
            }
        }
    }
}

impl Broker {
    /// Starts the recorder (always on: transports note steps from the
    /// start) with its queue's receiving end.
    pub(super) fn start_recorder(&self, mut rx: mpsc::Receiver<Note>) {
        let weak = WeakBroker::new(self);
        tokio::spawn(async move {
            let mut notes = Vec::with_capacity(RECORD_BATCH);
            while rx.recv_many(&mut notes, RECORD_BATCH).await > 0 {
                let Some(broker) = weak.upgrade() else { return };
                broker.store_notes(std::mem::take(&mut notes)).await;
            }
        });
    }

    /// Stores a batch of notes, then tells the senders who asked.
    async fn store_notes(&self, notes: Vec<Note>) {
        let mut runs = Vec::with_capacity(notes.len());
        let mut stored = Vec::new();
        for note in notes {
            match note {
                Note::Step { step, messages } => runs.push((step, messages)),
                Note::Reply(reply) => runs.extend(self.replied(&reply).await),
                Note::Added(steps) => stored.extend(steps),
            }
        }
        for step in stored {
            if let Err(e) = self.tell_senders(&step, None).await {
                tracing::warn!(error = %e, agent = %step.key.agent, state = %step.state,
                    "sending receipts failed");
            }
        }
        if runs.is_empty() {
            return;
        }
        let steps: Vec<Step> = runs.iter().map(|(s, _)| s.clone()).collect();
        let added = match self.engine.record(steps).await {
            Ok(added) => added,
            Err(e) => {
                // Delivery itself went on; only its record is missing.
                tracing::warn!(error = %e, n = runs.len(), "recording delivery steps failed");
                self.shared
                    .steps_lost
                    .fetch_add(runs.len() as u64, Ordering::Relaxed);
                return;
            }
        };
        if added.is_empty() {
            return;
        }
        let mut given: HashMap<_, Option<Vec<Arc<Message>>>> = runs
            .into_iter()
            .map(|(s, messages)| ((s.key, s.state, s.hi), messages))
            .collect();
        for step in added {
            let messages = given
                .remove(&(step.key.clone(), step.state, step.hi))
                .flatten();
            if let Err(e) = self.tell_senders(&step, messages).await {
                tracing::warn!(error = %e, agent = %step.key.agent, state = %step.state,
                    "sending receipts failed");
            }
        }
    }

    /// Sends a receipt for every message of `step` whose sender asked for
    /// its state.
    async fn tell_senders(&self, step: &Step, messages: Option<Vec<Arc<Message>>>) -> Result<()> {
        let mut after = step.lo;
        let mut given = messages;
        loop {
            let page = match given.take() {
                Some(m) => m,
                None if after < step.hi => self.read(&step.key, after, RUN_PAGE).await?.messages,
                None => return Ok(()),
            };
            let Some(last) = page.last().map(|m| m.seq) else {
                return Ok(());
            };
            for m in page.iter().filter(|m| step.covers(m.seq)) {
                // A bounce is always told (but not to `anonymous`, whom
                // nobody reads); the rest when the sender asked.
                let told = match step.state {
                    Delivery::Bounced => m.from != AgentName::anonymous(),
                    state => m.meta().notify.contains(&state),
                };
                if told && m.from != step.key.agent {
                    self.send_receipt(m, step).await?;
                }
            }
            if last >= step.hi {
                return Ok(());
            }
            after = last;
        }
    }

    /// Tells `m`'s sender that `step` happened to it.
    async fn send_receipt(&self, m: &Message, step: &Step) -> Result<()> {
        let agent = &step.key.agent;
        let text = match (step.state, &step.note) {
            (Delivery::Bounced, Some(why)) => format!("{} bounced: {agent} {why}", m.id),
            (state, _) => format!("{agent}: {} {state} ({})", m.id, step.door),
        };
        let body = json!({
            "type": "receipt",
            "text": text,
            "message": m.id,
            "agent": agent,
            "state": step.state,
            "door": step.door,
            "ts": step.ts,
            "note": step.note,
        });
        self.system_send(&m.channel, &m.from, body, Some(m.id.clone()))
            .await
            .map(|_| ())
    }

    /// Sends a message from hermod itself (receipts, bounces, notices).
    pub(super) async fn system_send(
        &self,
        channel: &Channel,
        to: &AgentName,
        body: serde_json::Value,
        reply_to: Option<String>,
    ) -> Result<Arc<Message>> {
        let key = InboxKey::new(channel.clone(), to.clone());
        let known = self.shared.state.lock().unwrap().registry.is_known(&key);
        if !known {
            self.engine.remember_agent(key, model::now(), false).await?;
        }
        let serde_json::Value::Object(map) = body else {
            unreachable!("system bodies are objects")
        };
        let message = NewMessage {
            id: model::new_id(),
            channel: channel.clone(),
            from: AgentName::parse(SYSTEM_SENDER).expect("a valid name"),
            to: Some(to.clone()),
            topic: None,
            sent_ts: None,
            // The daemon itself: as trusted as its owner.
            auth: Auth::Owner,
            meta: reply_to.map(|r| {
                Box::new(Meta {
                    reply_to: Some(r),
                    ..Meta::default()
                })
            }),
            body: Body::from_map(map),
            recipients: vec![to.clone()],
            guard: Guarded::Free,
        };
        let stored = self
            .engine
            .submit(vec![message])
            .await?
            .await
            .map_err(|_| Error::ShuttingDown)??;
        stored.into_iter().next().ok_or(Error::ShuttingDown)
    }

    /// Notes that `messages` of `key`'s inbox (one read, oldest first)
    /// were handed out through `door`. Topic events are not tracked.
    pub async fn delivered(&self, key: &InboxKey, door: &str, messages: &[Arc<Message>]) {
        let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
            return;
        };
        if messages.iter().all(|m| m.topic.is_some()) {
            return;
        }
        let step = Step {
            key: key.clone(),
            lo: first.seq - 1,
            hi: last.seq,
            state: Delivery::Delivered,
            ts: model::now(),
            door: door.to_owned(),
            note: None,
        };
        self.note(step, Some(messages.to_vec())).await;
    }

    /// Delivery steps that could not be recorded since start.
    pub fn steps_lost(&self) -> u64 {
        self.shared.steps_lost.load(Ordering::Relaxed)
    }

    /// Has the recorder tell the senders of steps another write stored
    /// (the `read` steps a cursor move stored with it): in its batches,
    /// never a task per move. Never waits, like [`Broker::note`].
    pub(super) fn tell_senders_of(&self, added: Vec<Step>) {
        let n = added.len() as u64;
        if n > 0 && self.shared.recorder.try_send(Note::Added(added)).is_err() {
            self.shared.steps_lost.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Queues a step for the recorder. Never waits: an acknowledgement
    /// must not wait for bookkeeping, so a step that finds the queue full
    /// is dropped and counted (`hermod_delivery_steps_lost_total`).
    pub(super) async fn note(&self, step: Step, messages: Option<Vec<Arc<Message>>>) {
        if self
            .shared
            .recorder
            .try_send(Note::Step { step, messages })
            .is_err()
        {
            self.shared.steps_lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One message's state for every recipient.
    pub async fn receipt_of(&self, m: Arc<Message>, recipients: &[AgentName]) -> Result<Receipt> {
        let mut out = Vec::new();
        for agent in recipients {
            let key = InboxKey::new(m.channel.clone(), agent.clone());
            let mut steps: Vec<StepView> = self
                .engine
                .steps(&key, m.seq)
                .await?
                .into_iter()
                .map(|s| StepView {
                    state: s.state,
                    ts: s.ts,
                    door: Some(s.door),
                    note: s.note,
                })
                .collect();
            steps.sort_by(|a, b| a.ts.total_cmp(&b.ts));
            steps.insert(
                0,
                StepView {
                    state: Delivery::Stored,
                    ts: m.ts,
                    door: None,
                    note: None,
                },
            );
            let handed = steps
                .iter()
                .any(|s| matches!(s.state, Delivery::Delivered | Delivery::Read));
            // The furthest state: delivery states in their order; `expired`
            // counts only for a message that was never handed out.
            let state = steps
                .iter()
                .map(|s| s.state)
                .max_by_key(|s| match s {
                    Delivery::Stored => 0,
                    Delivery::Held => 1,
                    Delivery::Bounced => 2,
                    Delivery::Delivered => 3,
                    Delivery::Read => 4,
                    Delivery::Replied => 5,
                    Delivery::Expired if handed => 0,
                    Delivery::Expired => 6,
                })
                .unwrap_or(Delivery::Stored);
            out.push(RecipientView {
                agent: agent.to_string(),
                state,
                steps,
            });
        }
        Ok(Receipt {
            message: m,
            recipients: out,
        })
    }

    /// Every stored message with this id, with each recipient's state,
    /// if `caller` may see it (its sender, a recipient, or the owner).
    pub async fn receipts(&self, caller: &Caller, id: &str) -> Result<Vec<Receipt>> {
        self.receipts_within(caller, id, usize::MAX).await
    }

    /// [`Broker::receipts`] with the states of at most `max` recipients
    /// per copy (a broadcast to thousands costs a store read each); the
    /// others are left out of `recipients`.
    pub async fn receipts_within(
        &self,
        caller: &Caller,
        id: &str,
        max: usize,
    ) -> Result<Vec<Receipt>> {
        let mut out = Vec::new();
        for c in self.engine.find(id, 16).await? {
            // A held copy is in no inbox yet: its recipient is its `to`.
            let recipients = match (&c.message.to, c.guard) {
                (Some(to), Guarded::Held) => vec![to.clone()],
                _ => c.recipients,
            };
            if !self.may_see(caller, &c.message, &recipients) {
                continue;
            }
            let shown = &recipients[..recipients.len().min(max)];
            out.push(self.receipt_of(c.message, shown).await?);
        }
        if out.is_empty() {
            return Err(Error::NotFound(format!("no message with id {id:?}")));
        }
        Ok(out)
    }

    /// Waits until every recipient of message `id` reached `state`, or
    /// `deadline`; answers the receipts as they are then. No polling: it
    /// wakes on every step the store records.
    pub async fn wait_receipt(
        &self,
        caller: &Caller,
        id: &str,
        state: Delivery,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Receipt>> {
        let mut stepped = self.shared.stepped.subscribe();
        loop {
            stepped.borrow_and_update();
            let receipts = self.receipts(caller, id).await?;
            if receipts.iter().all(|r| r.reached(state)) || tokio::time::Instant::now() >= deadline
            {
                return Ok(receipts);
            }
            tokio::select! {
                changed = stepped.changed() => changed.map_err(|_| Error::ShuttingDown)?,
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// A conversation in order: the thread of message `id` (its own, or
    /// the one it starts), for `caller` (only messages it may see).
    pub async fn thread(&self, caller: &Caller, id: &str) -> Result<Vec<Arc<Message>>> {
        let thread = match self.engine.find(id, 1).await?.into_iter().next() {
            Some(c) => c
                .message
                .meta()
                .thread
                .clone()
                .unwrap_or_else(|| id.to_owned()),
            None => id.to_owned(),
        };
        let messages = self.engine.thread(&thread, THREAD_LIMIT).await?;
        if messages.is_empty() {
            return Err(Error::NotFound(format!("no thread with id {id:?}")));
        }
        Ok(messages
            .into_iter()
            .filter(|m| {
                let to: Vec<AgentName> = m.to.iter().cloned().collect();
                (m.to.is_none() && caller.sees(&m.channel)) || self.may_see(caller, m, &to)
            })
            .collect())
    }

    /// On a channel `caller` sees, and the sender, a recipient, or someone
    /// trusted with the whole bus.
    fn may_see(&self, caller: &Caller, m: &Message, recipients: &[AgentName]) -> bool {
        if !caller.sees(&m.channel) {
            return false;
        }
        if self.trust.may_admin(caller).is_ok() {
            return true;
        }
        match caller.agent() {
            Some(me) => &m.from == me || recipients.contains(me),
            None => true,
        }
    }

    /// Fills in what a new message inherits: its thread (from the message
    /// it answers) and the channel's default `ttl`.
    pub(super) async fn complete_meta(&self, channel: &Channel, meta: &mut Meta) -> Result<()> {
        if meta.expires.is_none() {
            let ttl = self
                .shared
                .delivery
                .lock()
                .unwrap()
                .ttl
                .get(channel)
                .copied();
            meta.expires = ttl.map(|t| model::now() + t);
        }
        if let (Some(parent), None) = (&meta.reply_to, &meta.thread) {
            let found = self.engine.find(parent, 1).await?.into_iter().next();
            meta.thread = Some(match found {
                Some(c) => c
                    .message
                    .meta()
                    .thread
                    .clone()
                    .unwrap_or_else(|| parent.clone()),
                None => parent.clone(),
            });
        }
        Ok(())
    }

    /// The `replied` steps a stored reply makes: its sender replied to
    /// each message it answers that reached it.
    async fn replied(&self, reply: &Message) -> Vec<(Step, Option<Vec<Arc<Message>>>)> {
        let Some(parent) = reply.meta().reply_to.as_deref() else {
            return Vec::new();
        };
        let found = match self.engine.find(parent, 16).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "looking up the message a reply answers failed");
                return Vec::new();
            }
        };
        found
            .into_iter()
            .filter(|c| c.message.channel == reply.channel && c.recipients.contains(&reply.from))
            .map(|c| {
                let step = Step {
                    key: InboxKey::new(c.message.channel.clone(), reply.from.clone()),
                    lo: c.message.seq - 1,
                    hi: c.message.seq,
                    state: Delivery::Replied,
                    ts: reply.ts,
                    door: "reply".to_owned(),
                    note: Some(format!("reply {}", reply.id)),
                };
                (step, Some(vec![c.message]))
            })
            .collect()
    }

    /// Applies `config` from now on and starts the sweeper (bounces and
    /// expiry). Inboxes already known are swept once.
    pub fn start_delivery(&self, config: DeliveryConfig) {
        let every = config.sweep_every;
        *self.shared.delivery.lock().unwrap() = config;
        let keys: Vec<InboxKey> = self
            .shared
            .state
            .lock()
            .unwrap()
            .registry
            .agents()
            .into_iter()
            .map(|a| InboxKey::new(a.channel, a.name))
            .collect();
        {
            let mut sweep = self.shared.sweep.lock().unwrap();
            for key in &keys {
                sweep.due_at(key, 0.0);
            }
        }
        let weak = WeakBroker::new(self);
        tokio::spawn(async move {
            if let Some(broker) = weak.upgrade() {
                broker.recover_held().await;
            }
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(broker) = weak.upgrade() else { return };
                broker.sweep().await;
            }
        });
    }

    /// One pass of the sweeper over the inboxes that are due (and the
    /// guard's pairs whose cooldown is over).
    async fn sweep(&self) {
        self.release_cooled().await;
        let now = model::now();
        let due: Vec<InboxKey> = {
            let mut sweep = self.shared.sweep.lock().unwrap();
            if std::mem::take(&mut sweep.overflowed) {
                for a in self.shared.state.lock().unwrap().registry.agents() {
                    sweep.due_at(&InboxKey::new(a.channel, a.name), now);
                }
            }
            let due: Vec<InboxKey> = sweep
                .due
                .iter()
                .filter(|(_, &at)| at <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &due {
                sweep.due.remove(k);
            }
            due
        };
        for key in due {
            match self.sweep_inbox(&key, now).await {
                Ok(Some(next)) => self.shared.sweep.lock().unwrap().due_at(&key, next),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, agent = %key.agent, "delivery sweep failed; retrying");
                    self.shared.sweep.lock().unwrap().due_at(&key, now + 5.0);
                }
            }
        }
    }

    /// Bounces and expires what is due in `key`'s unread messages; returns
    /// when the inbox is next due, if ever.
    async fn sweep_inbox(&self, key: &InboxKey, now: f64) -> Result<Option<f64>> {
        let config = self.shared.delivery.lock().unwrap().clone();
        // From what was read for good: a batch a stream wrote that its
        // peer has not consumed is unread (its reader may have stalled).
        let cursor = self.read_cursor(key).await?;
        let page = self
            .engine
            .read(&View::Inbox(key.clone()), cursor, SWEEP_PAGE)
            .await?;
        let mut next: Option<f64> = None;
        let mut soon = |at: f64| next = Some(next.map_or(at, |n: f64| n.min(at)));
        for m in &page.messages {
            if m.topic.is_some() || m.from.as_str() == SYSTEM_SENDER {
                continue;
            }
            if let Some(expires) = m.meta().expires {
                if expires <= now {
                    self.note(
                        self.single(key, m, Delivery::Expired, "ttl", None),
                        Some(vec![m.clone()]),
                    )
                    .await;
                    continue;
                }
                soon(expires);
            }
            if m.to.as_ref() != Some(&key.agent) {
                continue;
            }
            let bounce_at = m.ts + m.meta().bounce_after.unwrap_or(config.bounce_after);
            if bounce_at > now {
                soon(bounce_at);
                continue;
            }
            let steps = self.engine.steps(key, m.seq).await?;
            let taken = steps.iter().any(|s| {
                matches!(
                    s.state,
                    Delivery::Delivered | Delivery::Read | Delivery::Bounced | Delivery::Held
                )
            });
            if !taken {
                let why = self.why_unread(key);
                self.note(
                    self.single(key, m, Delivery::Bounced, "bus", Some(why)),
                    Some(vec![m.clone()]),
                )
                .await;
            }
        }
        if page.messages.len() == SWEEP_PAGE {
            soon(now + config.sweep_every.as_secs_f64());
        }
        Ok(next)
    }

    /// A step for one message of `key`'s inbox.
    pub(super) fn single(
        &self,
        key: &InboxKey,
        m: &Message,
        state: Delivery,
        door: &str,
        note: Option<String>,
    ) -> Step {
        Step {
            key: key.clone(),
            lo: m.seq - 1,
            hi: m.seq,
            state,
            ts: model::now(),
            door: door.to_owned(),
            note,
        }
    }

    /// Why `key` has not taken a message: what its bounce says.
    fn why_unread(&self, key: &InboxKey) -> String {
        let state = self.shared.state.lock().unwrap();
        match state.registry.info(key) {
            Some(a) if a.online() => "is online but not reading".to_owned(),
            Some(a) if a.has_connected() => format!(
                "is offline since {}",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs_f64(a.last_seen.max(0.0))
                )
            ),
            _ => "never connected".to_owned(),
        }
    }
}
