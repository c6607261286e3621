//! The broker: the one place that routes, reads and acknowledges.
//!
//! Transports parse their wire format into calls on [`Broker`] and format
//! what it returns; they hold no routing or storage logic. The broker
//! resolves recipients, hands messages to the [`Engine`], serves inbox reads
//! (from the hot tail when it can), tracks cursors and presence, and wakes
//! waiters when the engine reports a commit.
//!
//! Locking: one `std::sync::Mutex` guards the in-memory state. Every critical
//! section is a few map operations and never spans an `.await` or engine IO.

mod inbox;
mod registry;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use registry::{AgentInfo, Connection};

use crate::auth::{self, AuthMode, Caller, Identity, IdentitySpec, RateLimit, Trust};
use crate::engine::memory::MemoryEngine;
use crate::engine::sqlite::SqliteEngine;
use crate::engine::{CommitObserver, Committed, Durable, Engine, Retention};
use crate::error::{Error, Result};
use crate::model::{self, AgentName, Body, Channel, Gap, InboxKey, Message, NewMessage, Seq};
use crate::wire::Envelope;
use hermod_events::pattern::{self, Pattern};
use inbox::{Inboxes, ViewKey};
use registry::Registry;

fn no_identity(name: &AgentName) -> Error {
    Error::InvalidRequest(format!("{name} has no identity"))
}

/// Messages per batch of [`Broker::follow`].
const FOLLOW_BATCH: usize = 256;

/// State shared by the broker handle and the engine's commit observer.
struct Shared {
    state: Mutex<State>,
    /// Subscribers to every committed message (hooks, metrics); each has a
    /// bounded queue and misses messages rather than slowing commits.
    taps: Mutex<Vec<mpsc::Sender<Tapped>>>,
    taps_dropped: AtomicU64,
    /// Set while the engine holds stamped messages that are not readable yet.
    stamping: AtomicBool,
    /// The newest connection per channel and transport, live only. A
    /// `watch`, not a queue: a connect costs one store whatever the number
    /// of listeners, and a listener woken late sees only the newest (so
    /// 10,000 streams opening do not push 10,000² notices).
    presence: Mutex<HashMap<(Channel, &'static str), PresenceWatch>>,
    /// Engine commits that stored messages (batch size = messages / commits).
    commits: AtomicU64,
    /// Reads told that retention removed part of what they asked for.
    gaps: AtomicU64,
    /// Messages retention removed since start.
    pruned: AtomicU64,
}

/// The newest connection of one channel over one transport.
type PresenceWatch = watch::Sender<Option<Presence>>;

/// An agent connected: a live notice for whoever is listening now.
#[derive(Debug, Clone)]
pub struct Presence {
    pub key: InboxKey,
    pub transport: &'static str,
    pub ts: f64,
}

struct State {
    inboxes: Inboxes,
    registry: Registry,
    /// Newest committed seq and ts (the commit watermark).
    committed: (Seq, f64),
    /// Cursors acknowledged since start (the engine stores them too, a
    /// batch later); read first so a quick re-registration resumes exactly.
    cursors: HashMap<InboxKey, Seq>,
    /// Durable topic subscriptions: matching events land in these inboxes.
    subscriptions: HashMap<Channel, Vec<(AgentName, Pattern)>>,
}

impl State {
    /// Drops everything held in memory for `key` (it was forgotten or
    /// expired in the store); an agent connected meanwhile stays.
    fn forget(&mut self, key: &InboxKey) {
        if !self.registry.forget(key) {
            return;
        }
        self.cursors.remove(key);
        if let Some(subs) = self.subscriptions.get_mut(&key.channel) {
            subs.retain(|(a, _)| a != &key.agent);
        }
        self.inboxes.forget(&ViewKey::Inbox(key.clone()));
    }

    fn has_subscription(&self, key: &InboxKey, pattern: &str) -> bool {
        self.subscriptions.get(&key.channel).is_some_and(|subs| {
            subs.iter()
                .any(|(a, p)| a == &key.agent && p.as_str() == pattern)
        })
    }
}

impl CommitObserver for Shared {
    fn stamping(&self) {
        self.stamping.store(true, Ordering::SeqCst);
    }

    fn committed(&self, batch: &[Committed]) {
        {
            let mut state = self.state.lock().unwrap();
            for c in batch {
                for r in &c.recipients {
                    let key = ViewKey::Inbox(InboxKey::new(c.message.channel.clone(), r.clone()));
                    state.inboxes.push(&key, &c.message);
                }
                if c.message.topic.is_some() {
                    let key = ViewKey::Topics(c.message.channel.clone());
                    state.inboxes.push(&key, &c.message);
                    state.inboxes.push(&ViewKey::AllTopics, &c.message);
                }
            }
            if let Some(last) = batch.last() {
                state.committed = (last.message.seq, last.message.ts);
                self.commits.fetch_add(1, Ordering::Relaxed);
            }
            // Cleared under the lock, after the watermark moved.
            self.stamping.store(false, Ordering::SeqCst);
        }
        let taps = self.taps.lock().unwrap();
        for tap in taps.iter() {
            for c in batch {
                let tapped = Tapped {
                    message: c.message.clone(),
                    recipients: c.recipients.clone().into(),
                };
                if tap.try_send(tapped).is_err() {
                    self.taps_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What a read returns: messages, and the gap before them when retention
/// removed some of what the reader asked for.
#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<Arc<Message>>,
    pub gap: Option<Gap>,
}

/// A name that never connected must be this old (seconds) to expire, so
/// a message on its way to it always finds it known.
const EXPIRE_AFTER: f64 = 3600.0;
/// Names expired per retention tick at most.
const EXPIRE_BATCH: usize = 256;

/// How often the retention task looks for work.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A committed message as a tap sees it: with the inboxes it landed in.
#[derive(Debug, Clone)]
pub struct Tapped {
    pub message: Arc<Message>,
    pub recipients: Arc<[AgentName]>,
}

/// How the broker treats a message's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The target must already be known (hermes-bus typo protection).
    Known,
    /// An unknown target becomes known and the message waits for it.
    Any,
}

/// A registered connection. Dropping it ends the agent's presence there.
pub struct Session {
    pub id: String,
    pub key: InboxKey,
    /// Cancelled when a newer exclusive registration replaces this one.
    pub kicked: CancellationToken,
    shared: Arc<Shared>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap()
            .registry
            .disconnect(&self.key, &self.id, model::now());
    }
}

/// A cheap, cloneable handle to the bus.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
    engine: Arc<dyn Engine>,
    trust: Arc<Trust>,
}

impl Broker {
    /// A broker over the SQLite log at `path`, with the default trust policy.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        Self::open_sqlite_with(path, Trust::new(AuthMode::default(), RateLimit::default())).await
    }

    /// A broker over the SQLite log at `path`.
    pub async fn open_sqlite_with(path: &Path, trust: Trust) -> Result<Self> {
        Self::with_engine(
            |observer| Ok(Arc::new(SqliteEngine::open(path, observer)?)),
            trust,
        )
        .await
    }

    /// A broker over a throwaway in-memory store, with the default trust policy.
    pub async fn open_memory() -> Result<Self> {
        Self::open_memory_with(Trust::new(AuthMode::default(), RateLimit::default())).await
    }

    /// A broker over a throwaway in-memory store.
    pub async fn open_memory_with(trust: Trust) -> Result<Self> {
        Self::with_engine(|observer| Ok(Arc::new(MemoryEngine::new(observer))), trust).await
    }

    /// Builds a broker over the engine `make` returns, given the observer
    /// it must report commits to.
    pub async fn with_engine(
        make: impl FnOnce(Arc<dyn CommitObserver>) -> Result<Arc<dyn Engine>>,
        trust: Trust,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                inboxes: Inboxes::default(),
                registry: Registry::default(),
                committed: (0, 0.0),
                cursors: HashMap::new(),
                subscriptions: HashMap::new(),
            }),
            taps: Mutex::default(),
            taps_dropped: AtomicU64::new(0),
            stamping: AtomicBool::new(false),
            presence: Mutex::default(),
            commits: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
        });
        let engine = make(shared.clone())?;
        let last = engine.last().await?;
        let floors = engine.floors().await?;
        let agents = engine.agents().await?;
        let subscriptions = engine.subscriptions().await?;
        for identity in engine.identities().await? {
            trust.set(&identity.name.clone(), Some(identity));
        }
        {
            let mut state = shared.state.lock().unwrap();
            state.committed = last;
            for (view, seq) in floors {
                state.inboxes.set_pruned(view, seq);
            }
            for a in agents {
                state
                    .registry
                    .know_as(&a.key, a.first_seen, a.last_seen, a.connected);
            }
            for (key, pattern) in subscriptions {
                if let Ok(pattern) = Pattern::parse(&pattern) {
                    state
                        .subscriptions
                        .entry(key.channel)
                        .or_default()
                        .push((key.agent, pattern));
                }
            }
        }
        Ok(Self {
            shared,
            engine,
            trust: Arc::new(trust),
        })
    }

    /// The trust policy: authenticate callers, check what they may do.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Routes and submits a message from `caller` (its sender is the
    /// caller's verified name, or `env.from` for a trusted caller); the
    /// returned future resolves once it is durable.
    pub async fn send(&self, caller: &Caller, env: Envelope, target: Target) -> Result<Durable> {
        let message = self.route(caller, env, target).await?;
        self.engine.submit(vec![message]).await
    }

    /// Sends many messages in one engine append (one commit under light
    /// load): each is checked and routed on its own, so one bad message
    /// fails alone; the rest are stored in order and resolve together.
    pub async fn send_many(
        &self,
        caller: &Caller,
        envs: Vec<Envelope>,
        target: Target,
    ) -> Result<Vec<Result<Arc<Message>>>> {
        let mut routed = Vec::with_capacity(envs.len());
        let mut batch = Vec::with_capacity(envs.len());
        for env in envs {
            match self.route(caller, env, target).await {
                Ok(m) => {
                    routed.push(Ok(batch.len()));
                    batch.push(m);
                }
                Err(e) => routed.push(Err(e)),
            }
        }
        let stored = if batch.is_empty() {
            Vec::new()
        } else {
            self.engine
                .submit(batch)
                .await?
                .await
                .map_err(|_| Error::ShuttingDown)??
        };
        Ok(routed
            .into_iter()
            .map(|r| r.map(|i| stored[i].clone()))
            .collect())
    }

    /// Checks what `caller` may send and resolves the recipients.
    async fn route(&self, caller: &Caller, env: Envelope, target: Target) -> Result<NewMessage> {
        let from = self.trust.sender(caller, env.from.clone())?;
        self.trust.may_send(caller, &env.channel, env.to.as_ref())?;
        self.trust.take_send(&from)?;
        let now = model::now();
        let (recipients, unknown) = {
            let state = self.shared.state.lock().unwrap();
            match &env.to {
                Some(to) => {
                    let key = InboxKey::new(env.channel.clone(), to.clone());
                    let known = state.registry.is_known(&key);
                    if !known && target == Target::Known {
                        return Err(Error::EndpointNotFound(to.to_string()));
                    }
                    (vec![to.clone()], (!known).then_some(key))
                }
                None => (state.registry.broadcast_targets(&env.channel, &from), None),
            }
        };
        if let Some(key) = unknown {
            // Durable before it is known here: memory never claims a name
            // the store would forget (and the message follows it).
            self.engine.remember_agent(key.clone(), now, false).await?;
            self.shared
                .state
                .lock()
                .unwrap()
                .registry
                .know(&key, now, now);
        }
        Ok(NewMessage {
            id: env.id.unwrap_or_else(model::new_id),
            channel: env.channel,
            from,
            to: env.to,
            topic: None,
            sent_ts: env.sent_ts,
            auth: caller.auth(),
            body: env.body,
            recipients,
        })
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
        pattern::validate_topic(topic)?;
        let from = self.trust.sender(caller, from)?;
        self.trust.may_publish(caller, &channel, topic)?;
        let body = Body::from_map(hermod_events::envelope(topic, payload));
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
            body,
            recipients,
        };
        self.engine.submit(vec![message]).await
    }

    /// Adds a durable subscription: events matching `pattern` published on
    /// the agent's channel land in its inbox. Returns false if it existed.
    /// Resolves once the subscription is durable; only then does routing
    /// use it.
    pub async fn subscribe(&self, caller: &Caller, key: InboxKey, pattern: &str) -> Result<bool> {
        let parsed = Pattern::parse(pattern)?;
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
            .set_subscription(key.clone(), pattern.to_owned(), true)
            .await?;
        let mut state = self.shared.state.lock().unwrap();
        state.registry.know(&key, now, now);
        if state.has_subscription(&key, pattern) {
            return Ok(false); // a concurrent call added it first
        }
        state
            .subscriptions
            .entry(key.channel.clone())
            .or_default()
            .push((key.agent, parsed));
        Ok(true)
    }

    /// Removes a durable subscription; false if there was none.
    pub async fn unsubscribe(&self, caller: &Caller, key: InboxKey, pattern: &str) -> Result<bool> {
        Pattern::parse(pattern)?;
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
            .set_subscription(key.clone(), pattern.to_owned(), false)
            .await?;
        let mut state = self.shared.state.lock().unwrap();
        let subs = state.subscriptions.entry(key.channel.clone()).or_default();
        let before = subs.len();
        subs.retain(|(a, p)| !(a == &key.agent && p.as_str() == pattern));
        Ok(subs.len() != before)
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

    /// Up to `limit` messages of `key`'s inbox after `after`, oldest
    /// first, with the gap if retention removed some of what was asked.
    pub async fn read(&self, key: &InboxKey, after: Seq, limit: usize) -> Result<Batch> {
        self.read_view(&ViewKey::Inbox(key.clone()), after, limit)
            .await
    }

    /// Up to `limit` topic events of `channel` after `after`, oldest first.
    pub async fn read_topics(&self, channel: &Channel, after: Seq, limit: usize) -> Result<Batch> {
        self.read_view(&ViewKey::Topics(channel.clone()), after, limit)
            .await
    }

    /// Reads a view from its hot tail when it covers `after`, else from
    /// the log; never from before retention's mark, which it reports.
    async fn read_view(&self, key: &ViewKey, after: Seq, limit: usize) -> Result<Batch> {
        let (cached, mut pruned) = {
            let state = self.shared.state.lock().unwrap();
            let pruned = state.inboxes.pruned(key);
            let start = after.max(pruned);
            let cached = state
                .inboxes
                .read_cached(key, start, limit, state.committed.0);
            (cached, pruned)
        };
        let messages = match cached {
            Some(hit) => hit,
            None => {
                let page = self.engine.read(key, after.max(pruned), limit).await?;
                pruned = pruned.max(page.pruned);
                page.messages
            }
        };
        let gap = (after < pruned).then_some(Gap {
            after,
            pruned_through: pruned,
        });
        if gap.is_some() {
            self.shared.gaps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Batch { messages, gap })
    }

    /// Up to `limit` messages for `agent` on every channel after `after`
    /// (the widest gap of any of its inboxes, if any).
    pub async fn read_agent(&self, agent: &AgentName, after: Seq, limit: usize) -> Result<Batch> {
        let channels = self
            .shared
            .state
            .lock()
            .unwrap()
            .registry
            .channels_of(agent);
        let mut all = Batch::default();
        for channel in channels {
            let key = InboxKey::new(channel, agent.clone());
            let batch = self.read(&key, after, limit).await?;
            all.messages.extend(batch.messages);
            if let Some(gap) = batch.gap {
                let widest = all.gap.map_or(0, |g| g.pruned_through);
                if gap.pruned_through > widest {
                    all.gap = Some(gap);
                }
            }
        }
        all.messages.sort_by_key(|m| m.seq);
        all.messages.truncate(limit);
        Ok(all)
    }

    /// The last seq whose ts is `<= ts`: turns a `since=ts` cursor into a seq.
    pub async fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
        let (seq, last_ts) = self.committed();
        if ts >= last_ts {
            return Ok(seq); // the common long-poll case: nothing newer yet
        }
        self.engine.seq_at_ts(ts).await
    }

    /// Bus "now" for `since` cursors: never later than the ts of a message
    /// that is accepted but not readable yet.
    pub fn now(&self) -> f64 {
        let wall = model::now();
        let committed = self.committed().1;
        if self.shared.stamping.load(Ordering::SeqCst) {
            return committed;
        }
        // Anything stamped after this point gets ts >= wall: step back 1 µs
        // so that `ts > now` holds for it.
        (wall - 1e-6).max(committed)
    }

    /// Changes whenever any inbox of `agent` (any channel) receives a message.
    pub fn watch_agent(&self, agent: &AgentName) -> watch::Receiver<Seq> {
        let mut state = self.shared.state.lock().unwrap();
        let committed = state.committed.0;
        state.inboxes.watch_agent(agent, committed)
    }

    /// `key`'s inbox after `after` as a stream of batches: first what is
    /// there, then each new commit as it lands. Never ends by itself. A
    /// batch carries a gap whenever retention overtook the stream.
    pub fn follow(
        &self,
        key: InboxKey,
        after: Seq,
    ) -> impl futures::Stream<Item = Result<Batch>> + Send + 'static {
        self.follow_view(ViewKey::Inbox(key), after)
    }

    /// The topic events of `channel` (`None`: every channel) matching
    /// `pattern` after `after`, for `caller` (within its `may_subscribe`
    /// rule), as batches that are never empty (a gap alone counts): what
    /// every live pattern subscriber reads.
    pub fn follow_pattern(
        &self,
        caller: &Caller,
        channel: Option<Channel>,
        pattern: &str,
        after: Seq,
    ) -> Result<impl futures::Stream<Item = Result<Batch>> + Send + 'static> {
        use futures::StreamExt;
        let parsed = Pattern::parse(pattern)?;
        let view = match channel {
            Some(channel) => {
                self.trust.may_subscribe(caller, &channel, pattern)?;
                ViewKey::Topics(channel)
            }
            None => {
                self.trust.may_subscribe_everywhere(caller, pattern)?;
                ViewKey::AllTopics
            }
        };
        let events = self.follow_view(view, after);
        Ok(events.filter_map(move |batch| {
            let kept = batch.map(|mut b| {
                b.messages
                    .retain(|m| m.topic.as_deref().is_some_and(|t| parsed.matches(t)));
                b
            });
            futures::future::ready(match kept {
                Ok(b) if b.messages.is_empty() && b.gap.is_none() => None,
                other => Some(other),
            })
        }))
    }

    fn follow_view(
        &self,
        key: ViewKey,
        after: Seq,
    ) -> impl futures::Stream<Item = Result<Batch>> + Send + 'static {
        // Subscribed before the first read, so no commit falls in between.
        let newest = self.watch_view(&key);
        let state = (self.clone(), key, after, newest);
        futures::stream::unfold(
            state,
            |(broker, key, mut position, mut newest)| async move {
                loop {
                    match broker.read_view(&key, position, FOLLOW_BATCH).await {
                        Ok(batch) if batch.messages.is_empty() && batch.gap.is_none() => {
                            newest.changed().await.ok()?
                        }
                        Ok(batch) => {
                            if let Some(gap) = batch.gap {
                                position = position.max(gap.pruned_through);
                            }
                            position = batch.messages.last().map_or(position, |m| m.seq);
                            return Some((Ok(batch), (broker, key, position, newest)));
                        }
                        Err(e) => return Some((Err(e), (broker, key, position, newest))),
                    }
                }
            },
        )
    }

    /// Changes whenever `key`'s inbox receives a committed message.
    pub fn watch(&self, key: &InboxKey) -> watch::Receiver<Seq> {
        self.watch_view(&ViewKey::Inbox(key.clone()))
    }

    fn watch_view(&self, key: &ViewKey) -> watch::Receiver<Seq> {
        let mut state = self.shared.state.lock().unwrap();
        let committed = state.committed.0;
        state.inboxes.watch(key, committed)
    }

    /// The stored cursor of an inbox.
    pub async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        if let Some(&seq) = self.shared.state.lock().unwrap().cursors.get(key) {
            return Ok(seq);
        }
        self.engine.cursor(key).await
    }

    /// Moves an inbox cursor forward (never back) and returns where it was;
    /// resolves once the new cursor is durable.
    ///
    /// The move is a compare-and-set in memory, so readers sharing one
    /// cursor (SSE-interop `/poll` and `/subscribe`) can *claim* a batch:
    /// each delivers only the messages after the cursor it moved from, and
    /// no message goes out twice. If the store refuses the write, the claim
    /// is undone (unless a later claim moved past it) and the caller gets
    /// the error, so the messages stay unread rather than lost.
    pub async fn ack(&self, key: &InboxKey, seq: Seq) -> Result<Seq> {
        let previous = self.claim(key, seq).await?;
        if seq.min(self.committed().0) > previous {
            if let Err(e) = self.confirm(key, seq).await {
                self.release(key, previous, seq);
                return Err(e);
            }
        }
        Ok(previous)
    }

    /// The in-memory half of [`Broker::ack`]: moves the cursor (the claim
    /// every reader of the inbox sees at once) and returns where it was.
    /// Nothing is stored until [`Broker::confirm`]; [`Broker::release`]
    /// undoes a claim whose messages did not reach the client.
    pub async fn claim(&self, key: &InboxKey, seq: Seq) -> Result<Seq> {
        let stored = self.cursor(key).await?;
        let mut state = self.shared.state.lock().unwrap();
        // Never past the log: an ack from the future would skip messages.
        let seq = seq.min(state.committed.0);
        let c = state.cursors.entry(key.clone()).or_insert(stored);
        let previous = *c;
        *c = (*c).max(seq);
        Ok(previous)
    }

    /// Makes a claim up to `seq` durable.
    pub async fn confirm(&self, key: &InboxKey, seq: Seq) -> Result<()> {
        let seq = seq.min(self.committed().0);
        self.engine.set_cursor(key.clone(), seq).await
    }

    /// Undoes a claim from `previous` to `seq`, unless a later claim has
    /// moved the cursor on since.
    pub fn release(&self, key: &InboxKey, previous: Seq, seq: Seq) {
        let mut state = self.shared.state.lock().unwrap();
        let committed = state.committed.0;
        if let Some(c) = state.cursors.get_mut(key) {
            if *c == seq.min(committed) {
                *c = previous;
            }
        }
    }

    /// How many messages `key`'s inbox holds after `after`.
    pub async fn count(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        self.engine.count_inbox(key, after).await
    }

    /// How many messages wait in `key`'s inbox after its cursor.
    pub async fn unread(&self, key: &InboxKey) -> Result<u64> {
        let cursor = self.cursor(key).await?;
        self.engine.count_inbox(key, cursor).await
    }

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
            // On failure the session drops here, ending the connection.
            self.engine.remember_agent(key.clone(), now, true).await?;
        }
        // Nobody listening is fine: presence is live-only.
        if let Some(tx) = self
            .shared
            .presence
            .lock()
            .unwrap()
            .get(&(key.channel.clone(), transport))
        {
            tx.send_replace(Some(Presence {
                key,
                transport,
                ts: now,
            }));
        }
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
            .entry((channel.clone(), transport))
            .or_insert_with(|| watch::Sender::new(None))
            .subscribe()
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

    /// Every known agent with its presence.
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.shared.state.lock().unwrap().registry.agents()
    }

    /// Every known agent with presence and unread count.
    pub async fn summaries(&self) -> Result<Vec<crate::wire::AgentSummary>> {
        let mut out = Vec::new();
        for a in self.agents() {
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
                name: a.name.to_string(),
                channel: a.channel.to_string(),
            });
        }
        Ok(out)
    }

    /// Registered exclusive endpoints: name → session id (hermes-bus
    /// `list_endpoints`).
    pub fn endpoints(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for agent in self.agents() {
            for c in agent.connections.iter().filter(|c| c.exclusive) {
                out.insert(agent.name.to_string(), c.session_id.clone());
            }
        }
        out
    }

    /// `None` while the store accepts writes, else why it does not.
    pub fn degraded(&self) -> Option<String> {
        self.engine.health().degraded()
    }

    /// The newest committed (seq, ts).
    pub fn committed(&self) -> (Seq, f64) {
        self.shared.state.lock().unwrap().committed
    }

    /// Every committed message from now on, through a bounded queue of
    /// `capacity`; when the queue is full the tap misses messages (counted
    /// in [`Broker::taps_dropped`]) instead of slowing the bus.
    pub fn tap(&self, capacity: usize) -> mpsc::Receiver<Tapped> {
        let (tx, rx) = mpsc::channel(capacity);
        let mut taps = self.shared.taps.lock().unwrap();
        taps.retain(|t| !t.is_closed());
        taps.push(tx);
        rx
    }

    /// Engine commits that stored at least one message since start.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    pub fn taps_dropped(&self) -> u64 {
        self.shared.taps_dropped.load(Ordering::Relaxed)
    }

    /// Creates an identity and returns it with its token (shown once; only
    /// its hash is stored). Resolves once the identity is durable.
    pub async fn add_identity(&self, spec: IdentitySpec) -> Result<(Identity, String)> {
        let (identity, token) = spec.issue()?;
        if self.trust.identity(&identity.name).is_some() {
            return Err(Error::InvalidRequest(format!(
                "{} already has an identity (rotate or revoke it)",
                identity.name
            )));
        }
        self.store_identity(&identity.name.clone(), Some(identity.clone()))
            .await?;
        Ok((identity, token))
    }

    /// Issues a new token for `name`; the old one stops working and the
    /// agent's open connections are closed.
    pub async fn rotate_identity(&self, name: &AgentName) -> Result<(Identity, String)> {
        let mut identity = self.trust.identity(name).ok_or_else(|| no_identity(name))?;
        let (token, hash) = auth::new_token();
        identity.token_hash = hash;
        self.store_identity(name, Some(identity.clone())).await?;
        Ok((identity, token))
    }

    /// Deletes `name`'s identity and closes its open connections.
    pub async fn revoke_identity(&self, name: &AgentName) -> Result<Identity> {
        let identity = self.trust.identity(name).ok_or_else(|| no_identity(name))?;
        self.store_identity(name, None).await?;
        Ok(identity)
    }

    async fn store_identity(&self, name: &AgentName, identity: Option<Identity>) -> Result<()> {
        // Durable first: a token is never printed for an identity a crash
        // would forget, and a revoked one never comes back.
        self.engine
            .set_identity(name.clone(), identity.clone())
            .await?;
        self.trust.set(name, identity);
        self.shared.state.lock().unwrap().registry.kick_agent(name);
        Ok(())
    }

    /// Applies `rules` from now on: a background task prunes in bounded
    /// steps (each one engine write, so sends interleave), and moves the
    /// views' marks so readers that start before them are told.
    pub fn start_retention(&self, rules: Retention) {
        if rules == Retention::default() {
            return;
        }
        // Weak: the task ends with the broker.
        let shared = Arc::downgrade(&self.shared);
        let engine = Arc::downgrade(&self.engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(shared), Some(engine)) = (shared.upgrade(), engine.upgrade()) else {
                    return;
                };
                // Names that never connected and hold nothing (a mistyped
                // `to` whose message expired) stop receiving broadcasts.
                match engine
                    .expire_agents(model::now() - EXPIRE_AFTER, EXPIRE_BATCH)
                    .await
                {
                    Ok(gone) => {
                        let mut state = shared.state.lock().unwrap();
                        for key in gone {
                            state.forget(&key);
                        }
                    }
                    Err(Error::ShuttingDown) => return,
                    Err(e) => tracing::warn!(error = %e, "expiring names failed; retrying later"),
                }
                loop {
                    match engine.prune(&rules, model::now()).await {
                        Ok(step) => {
                            shared.pruned.fetch_add(step.removed, Ordering::Relaxed);
                            if !step.floors.is_empty() {
                                let mut state = shared.state.lock().unwrap();
                                for (view, seq) in step.floors {
                                    state.inboxes.set_pruned(view, seq);
                                }
                            }
                            if !step.more {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                        Err(Error::ShuttingDown) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "retention step failed; retrying later");
                            break;
                        }
                    }
                }
            }
        });
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
        self.engine.forget_agent(key.clone()).await?;
        self.shared.state.lock().unwrap().forget(&key);
        Ok(())
    }

    /// Reads told of a gap since start.
    pub fn gaps(&self) -> u64 {
        self.shared.gaps.load(Ordering::Relaxed)
    }

    /// Messages retention removed since start.
    pub fn pruned(&self) -> u64 {
        self.shared.pruned.load(Ordering::Relaxed)
    }

    /// Lets queued writes finish. Call once at shutdown.
    pub async fn close(&self) {
        self.engine.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Body, Channel};

    fn name(s: &str) -> AgentName {
        AgentName::parse(s).unwrap()
    }

    fn owner() -> Caller {
        Caller::trusted(model::Auth::Owner)
    }

    fn env(from: &str, to: Option<&str>, n: i64) -> Envelope {
        let body = Body::from_json(format!("{{\"n\":{n}}}")).unwrap();
        Envelope {
            to: to.map(name),
            from: Some(name(from)),
            id: None,
            sent_ts: None,
            channel: Channel::default(),
            body,
        }
    }

    async fn brokers() -> Vec<(Broker, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Broker::open_sqlite(&dir.path().join("log.db"))
            .await
            .unwrap();
        vec![
            (Broker::open_memory().await.unwrap(), None),
            (sqlite, Some(dir)),
        ]
    }

    #[tokio::test]
    async fn routing_known_broadcast_and_wakeups() {
        for (b, _dir) in brokers().await {
            let key_b = InboxKey::new(Channel::default(), name("b"));
            // Typo protection for legacy senders; `Any` makes the target known.
            let err = b
                .send(&owner(), env("a", Some("b"), 0), Target::Known)
                .await;
            assert_eq!(err.unwrap_err().code(), "endpoint_not_found");
            let mut w = b.watch(&key_b);
            let stored = b
                .send(&owner(), env("a", Some("b"), 1), Target::Any)
                .await
                .unwrap()
                .await
                .unwrap()
                .unwrap();
            assert!(w.has_changed().unwrap());
            assert_eq!(*w.borrow_and_update(), stored[0].seq);

            let _s = b
                .connect(
                    &owner(),
                    InboxKey::new(Channel::default(), name("c")),
                    "unix",
                    true,
                )
                .await
                .unwrap();
            b.send(&owner(), env("c", None, 2), Target::Known)
                .await
                .unwrap()
                .await
                .unwrap()
                .unwrap();
            let got = b.read(&key_b, 0, 10).await.unwrap().messages;
            assert_eq!(got.len(), 2);
            let key_c = InboxKey::new(Channel::default(), name("c"));
            assert!(
                b.read(&key_c, 0, 10).await.unwrap().messages.is_empty(),
                "no echo"
            );
            assert_eq!(b.endpoints().len(), 1);
        }
    }

    #[tokio::test]
    async fn identities_persist_and_their_tokens_prove_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let spec = |n: &str| IdentitySpec {
            name: n.into(),
            ..IdentitySpec::default()
        };
        let token = {
            let b = Broker::open_sqlite(&path).await.unwrap();
            let (_, token) = b.add_identity(spec("alice")).await.unwrap();
            assert!(b.add_identity(spec("alice")).await.is_err(), "one per name");
            let (_, gone) = b.add_identity(spec("temp")).await.unwrap();
            b.revoke_identity(&name("temp")).await.unwrap();
            assert!(b.trust().authenticate(false, Some(&gone)).is_err());
            b.close().await;
            token
        };
        // Reopened: the identity is back, its token still proves alice.
        let b = Broker::open_sqlite(&path).await.unwrap();
        assert_eq!(b.trust().identities().len(), 1);
        let alice = b.trust().authenticate(false, Some(&token)).unwrap();
        let to_bob = env("alice", Some("bob"), 1);
        let stored = b
            .send_durable(
                &alice,
                Envelope {
                    from: None,
                    ..to_bob
                },
                Target::Any,
            )
            .await
            .unwrap();
        assert_eq!(
            (stored.from.as_str(), stored.auth),
            ("alice", model::Auth::Token)
        );
        let read = b
            .read(&InboxKey::new(Channel::default(), name("bob")), 0, 10)
            .await
            .unwrap()
            .messages;
        assert_eq!(read[0].auth, model::Auth::Token, "auth survives the log");
        // Rotating closes the agent's sessions and retires the old token.
        let s = b
            .connect(
                &alice,
                InboxKey::new(Channel::default(), name("alice")),
                "unix",
                true,
            )
            .await
            .unwrap();
        let (_, new) = b.rotate_identity(&name("alice")).await.unwrap();
        assert!(s.kicked.is_cancelled());
        assert!(b.trust().authenticate(false, Some(&token)).is_err());
        assert!(b.trust().authenticate(false, Some(&new)).is_ok());
    }

    #[tokio::test]
    async fn exclusive_sessions_kick() {
        let b = Broker::open_memory().await.unwrap();
        let key = InboxKey::new(Channel::default(), name("x"));
        let s1 = b
            .connect(&owner(), key.clone(), "unix", true)
            .await
            .unwrap();
        let s2 = b
            .connect(&owner(), key.clone(), "unix", true)
            .await
            .unwrap();
        assert!(s1.kicked.is_cancelled());
        assert!(!s2.kicked.is_cancelled());
        drop(s1);
        assert_eq!(b.endpoints().get("x"), Some(&s2.id));
        drop(s2);
        assert!(b.endpoints().is_empty());
        assert!(!b.agents()[0].online());
    }

    #[tokio::test]
    async fn topics_reach_durable_subscribers_and_the_topic_view() {
        for (b, _dir) in brokers().await {
            let dash = InboxKey::new(Channel::default(), name("dash"));
            assert!(b.subscribe(&owner(), dash.clone(), "tui.**").await.unwrap());
            assert!(
                !b.subscribe(&owner(), dash.clone(), "tui.**").await.unwrap(),
                "idempotent"
            );
            assert_eq!(
                b.subscribe(&owner(), dash.clone(), "a..b")
                    .await
                    .unwrap_err()
                    .code(),
                "invalid_topic"
            );
            let payload = |v: serde_json::Value| v.as_object().unwrap().clone();
            for (topic, p) in [
                ("tui.tool.start", serde_json::json!({"tool": "bash"})),
                (
                    "gateway.agent.start",
                    serde_json::json!({"ts": 1.5, "src": "orig"}),
                ),
            ] {
                b.publish(
                    &owner(),
                    Channel::default(),
                    Some(name("gw")),
                    topic,
                    payload(p),
                    None,
                )
                .await
                .unwrap()
                .await
                .unwrap()
                .unwrap();
            }
            let inbox = b.read(&dash, 0, 10).await.unwrap().messages;
            assert_eq!(inbox.len(), 1);
            let env = inbox[0].body.to_map();
            assert_eq!(env["type"], "tui.tool.start");
            assert_eq!(env["src"], "tui");
            let all = b
                .read_topics(&Channel::default(), 0, 10)
                .await
                .unwrap()
                .messages;
            assert_eq!(all.len(), 2);
            let kept = all[1].body.to_map();
            assert_eq!(
                (kept["ts"].as_f64(), kept["src"].as_str()),
                (Some(1.5), Some("orig"))
            );
            assert!(b
                .unsubscribe(&owner(), dash.clone(), "tui.**")
                .await
                .unwrap());
            assert!(b.subscriptions(&dash).is_empty());
        }
    }
}
