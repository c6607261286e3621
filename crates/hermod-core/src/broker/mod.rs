//! The broker: the one place that routes, reads and acknowledges.
//!
//! Transports parse their wire format into calls on [`Broker`] and format
//! what it returns; they hold no routing or storage logic. One concept per
//! module: `routing` (who gets a message, subscriptions), `reads` (views,
//! gaps, follow streams, the bus clock), `cursors` (ack, claim / confirm /
//! release), `presence` (connections, registry, forgetting names),
//! `identities`, `retention` (the pruning task), `console` (what the web
//! console reads: recent traffic, rates, logins); `inbox` holds the views'
//! state and `registry` the agents'. The broker
//! resolves recipients, hands messages to the [`Engine`], serves inbox reads
//! (from the hot tail when it can), tracks cursors and presence, and wakes
//! waiters as it follows the engine's feed: one task applies every commit
//! (messages, registry, subscriptions, identities, pruned marks — local or
//! from another node) to memory, and only then are its writers answered.
//!
//! Locking: two `std::sync::Mutex`es, never held together: `state` (the
//! registry, cursors, subscriptions: routing) and `views` (hot tails,
//! pruned marks, the commit watermark: what the feed's messages write), so
//! the follower pushing a batch into the views never stalls a send's
//! routing. Every critical section is a few map operations and
//! never spans an `.await` or engine IO.

mod console;
mod cursors;
mod delivery;
mod guard;
mod identities;
mod inbox;
mod presence;
mod reads;
mod registry;
mod retention;
mod routing;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use crate::engine::log_index::cost;
pub use crate::model::SYSTEM_SENDER;
pub use console::{Brief, ConsoleSession, Live, Seen, TrafficWatch};
pub use cursors::Claim;
pub use delivery::{DeliveryConfig, Receipt};
pub use guard::GuardConfig;
pub use guard::Hold;
pub use reads::{Reader, SinceBatch, Watch};
pub use registry::{AgentInfo, Connection};

use crate::auth::{self, AuthMode, Caller, Identity, IdentitySpec, RateLimit, Trust};
use crate::engine::memory::MemoryEngine;
use crate::engine::sqlite::SqliteEngine;
use crate::engine::{Change, Commit, Durable, Engine, Retention};
use crate::error::{Error, Result};
use crate::model::{
    self, AgentName, Body, Channel, Gap, Guarded, InboxKey, Message, NewMessage, Seq,
};
use crate::wire::{Envelope, Publication};
use hermod_events::pattern::Pattern;
use inbox::{Inboxes, ViewKey};
use registry::Registry;

/// State shared by the broker handles and the feed's follower.
struct Shared {
    /// Routing state: the registry, cursors and subscriptions.
    state: Mutex<State>,
    /// The views of the log and the commit watermark, which the follower
    /// writes: a lock of its own, so pushing a batch into the views never
    /// holds up routing, and never taken with `state`.
    views: Mutex<Views>,
    /// Subscribers to every committed message (hooks, metrics); each has a
    /// bounded queue and misses messages rather than slowing commits.
    taps: Mutex<Vec<mpsc::Sender<Tapped>>>,
    taps_dropped: AtomicU64,
    /// The newest connection per channel and transport, live only (see
    /// [`presence::Notices`]).
    presence: Mutex<presence::Notices>,
    /// Engine commits that stored messages (batch size = messages / commits).
    commits: AtomicU64,
    /// Reads told that retention removed part of what they asked for.
    gaps: AtomicU64,
    /// Messages retention removed since start.
    pruned: AtomicU64,
    /// Delivery steps on their way to the store (see `delivery`).
    recorder: mpsc::Sender<delivery::Note>,
    /// Steps that could not be recorded (the store refused them, or the
    /// recorder's queue was full when the follower noted a reply).
    steps_lost: AtomicU64,
    /// Bumped for every step the store records, here or on another node:
    /// what `wait_receipt` wakes on.
    stepped: watch::Sender<u64>,
    /// The delivery policy, and when each inbox next needs the sweeper.
    delivery: Mutex<DeliveryConfig>,
    sweep: Mutex<delivery::Sweep>,
    /// The loop guard's counts and what it holds.
    guard: Mutex<guard::Guard>,
    /// What the web console reads: recent traffic, rates, logins.
    console: Mutex<console::Console>,
    /// Updates console streams missed (their queue was full).
    console_dropped: AtomicU64,
}

/// An agent connected: a live notice for whoever is listening now.
#[derive(Debug, Clone)]
pub struct Presence {
    pub key: InboxKey,
    pub transport: &'static str,
    pub ts: f64,
}

/// The log as readers see it: hot tails, pruned marks, wake-ups.
struct Views {
    inboxes: Inboxes,
    /// Newest committed seq and ts (the commit watermark).
    committed: (Seq, f64),
}

struct State {
    registry: Registry,
    /// Per inbox, the claims this node's readers hold over the stored
    /// cursor, and how it stores it (one swap at a time).
    cursors: HashMap<InboxKey, cursors::Cursor>,
    /// Durable topic subscriptions: matching events land in these inboxes.
    subscriptions: HashMap<Channel, Vec<(AgentName, Pattern)>>,
}

impl State {
    /// Drops everything held in memory for `key` (it was forgotten or
    /// expired in the store); an agent connected meanwhile stays.
    /// Returns whether it was forgotten (then its view goes too).
    fn forget(&mut self, key: &InboxKey) -> bool {
        if !self.registry.forget(key) {
            return false;
        }
        self.cursors.remove(key);
        if let Some(subs) = self.subscriptions.get_mut(&key.channel) {
            subs.retain(|(a, _)| a != &key.agent);
        }
        true
    }

    fn has_subscription(&self, key: &InboxKey, pattern: &str) -> bool {
        self.subscriptions.get(&key.channel).is_some_and(|subs| {
            subs.iter()
                .any(|(a, p)| a == &key.agent && p.as_str() == pattern)
        })
    }
}

impl Shared {
    /// Drops what memory holds for `key` (forgotten or expired in the
    /// store), unless it connected meanwhile. One lock at a time.
    fn forget(&self, key: &InboxKey) {
        if self.state.lock().unwrap().forget(key) {
            self.views
                .lock()
                .unwrap()
                .inboxes
                .forget(&ViewKey::Inbox(key.clone()));
        }
    }
}

impl Shared {
    /// Applies one commit of the engine's feed: changes first, then the
    /// messages into their views (waking their readers) and the taps.
    fn apply(&self, commit: &Commit, trust: &Trust) {
        for change in &commit.changes {
            match change {
                Change::Agent {
                    key,
                    seen,
                    connected,
                } => {
                    let mut state = self.state.lock().unwrap();
                    state.registry.know_as(key, *seen, *seen, *connected);
                }
                Change::Forgotten(key) => self.forget(key),
                Change::Subscription { key, pattern, on } => {
                    let mut state = self.state.lock().unwrap();
                    let exists = state.has_subscription(key, pattern);
                    let subs = state.subscriptions.entry(key.channel.clone()).or_default();
                    if !*on {
                        subs.retain(|(a, p)| !(a == &key.agent && p.as_str() == pattern));
                    } else if let (false, Ok(parsed)) = (exists, Pattern::parse(pattern)) {
                        subs.push((key.agent.clone(), parsed));
                    }
                }
                Change::Identity { name, identity } => {
                    trust.set(name, identity.clone());
                    self.state.lock().unwrap().registry.kick_agent(name);
                }
                Change::Floor(view, seq) => {
                    self.views
                        .lock()
                        .unwrap()
                        .inboxes
                        .set_pruned(view.clone(), *seq);
                }
                Change::Step(step) => {
                    self.stepped.send_modify(|n| *n += 1);
                    self.console
                        .lock()
                        .unwrap()
                        .step(step, &self.console_dropped);
                }
            }
        }
        let batch = &commit.messages;
        if batch.is_empty() {
            return;
        }
        self.watch_delivery(batch);
        if batch.iter().any(|c| c.guard != Guarded::Free) {
            let mut guard = self.guard.lock().unwrap();
            for c in batch {
                guard.apply(c);
            }
        }
        {
            let mut views = self.views.lock().unwrap();
            for c in batch {
                for r in &c.recipients {
                    let key = ViewKey::Inbox(InboxKey::new(c.message.channel.clone(), r.clone()));
                    views.inboxes.push(&key, &c.message);
                }
                if c.message.topic.is_some() {
                    let key = ViewKey::Topics(c.message.channel.clone());
                    views.inboxes.push(&key, &c.message);
                    views.inboxes.push(&ViewKey::AllTopics, &c.message);
                }
            }
            if let Some(last) = batch.last() {
                views.committed = (last.message.seq, last.message.ts);
                self.commits.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.console
            .lock()
            .unwrap()
            .push(batch, &self.console_dropped);
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
    /// Cancelled when a newer exclusive registration replaces this one, or
    /// the agent's identity is added, rotated or revoked (`kick_agent`: a
    /// token caller's session is always under its own name, so this covers
    /// its revocation too): every door ends the connection on it.
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
        Self::with_engine(Arc::new(SqliteEngine::open(path)?), trust).await
    }

    /// A broker over a throwaway in-memory store, with the default trust policy.
    pub async fn open_memory() -> Result<Self> {
        Self::open_memory_with(Trust::new(AuthMode::default(), RateLimit::default())).await
    }

    /// A broker over a throwaway in-memory store.
    pub async fn open_memory_with(trust: Trust) -> Result<Self> {
        Self::with_engine(Arc::new(MemoryEngine::new()), trust).await
    }

    /// Builds a broker over `engine` (freshly opened: the broker takes its
    /// feed and follows it from what it holds now).
    pub async fn with_engine(engine: Arc<dyn Engine>, trust: Trust) -> Result<Self> {
        let mut feed = engine
            .feed()
            .ok_or_else(|| Error::Storage("the engine's feed is already followed".into()))?;
        let (recorder, notes) = delivery::recorder();
        let shared = Arc::new(Shared {
            recorder,
            steps_lost: AtomicU64::new(0),
            stepped: watch::Sender::new(0),
            delivery: Mutex::default(),
            sweep: Mutex::default(),
            guard: Mutex::default(),
            console: Mutex::default(),
            console_dropped: AtomicU64::new(0),
            state: Mutex::new(State {
                registry: Registry::default(),
                cursors: HashMap::new(),
                subscriptions: HashMap::new(),
            }),
            views: Mutex::new(Views {
                inboxes: Inboxes::default(),
                committed: (0, 0.0),
            }),
            taps: Mutex::default(),
            taps_dropped: AtomicU64::new(0),
            presence: Mutex::default(),
            commits: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
        });
        let last = engine.last().await?;
        let floors = engine.floors().await?;
        let agents = engine.agents().await?;
        let subscriptions = engine.subscriptions().await?;
        for identity in engine.identities().await? {
            trust.set(&identity.name.clone(), Some(identity));
        }
        {
            let mut views = shared.views.lock().unwrap();
            views.committed = last;
            for (view, seq) in floors {
                views.inboxes.set_pruned(view, seq);
            }
        }
        {
            let mut state = shared.state.lock().unwrap();
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
        let trust = Arc::new(trust);
        let (follower, trusted) = (shared.clone(), trust.clone());
        // Ends when the engine drops its end of the feed (closed or gone).
        tokio::spawn(async move {
            while let Some(commit) = feed.recv().await {
                follower.apply(&commit, &trusted);
                // Dropping the commit answers its writers: after it applied.
            }
        });
        let broker = Self {
            shared,
            engine,
            trust,
        };
        broker.start_recorder(notes);
        Ok(broker)
    }

    /// The trust policy: authenticate callers, check what they may do.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// `None` while the store accepts writes, else why it does not.
    pub fn degraded(&self) -> Option<String> {
        self.engine.health().degraded()
    }

    /// The storage engine and what it is connected to (`hermod status`).
    pub async fn describe_engine(&self) -> serde_json::Value {
        self.engine.describe().await
    }

    /// The newest committed (seq, ts).
    pub fn committed(&self) -> (Seq, f64) {
        self.shared.views.lock().unwrap().committed
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

    /// Lets queued writes finish. Call once at shutdown.
    pub async fn close(&self) {
        self.engine.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{self, Swap};
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
            meta: Default::default(),
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
            assert_eq!(w.borrow_and_update(), stored[0].seq);

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
            assert_eq!(b.endpoints(&owner()).len(), 1);
        }
    }

    #[tokio::test]
    async fn over_long_client_strings_are_refused_and_leave_nothing() {
        for (b, _dir) in brokers().await {
            let long = "x".repeat(model::MAX_FIELD_LEN + 1);
            let refused = |e: Error, field: &str| {
                assert_eq!(e.code(), "invalid_request", "{e}");
                assert!(e.to_string().contains(&format!("\"{field}\"")), "{e}");
            };
            let mut with_id = env("a", Some("b"), 1);
            with_id.id = Some(long.clone());
            refused(
                b.send(&owner(), with_id, Target::Any).await.unwrap_err(),
                "id",
            );
            for field in ["reply_to", "thread"] {
                let mut e = env("a", Some("b"), 1);
                match field {
                    "reply_to" => e.meta.reply_to = Some(long.clone()),
                    _ => e.meta.thread = Some(long.clone()),
                }
                // In a batch, the whole batch is refused.
                let good = env("a", Some("b"), 2);
                let e = b.send_many(&owner(), vec![good, e], Target::Any).await;
                refused(e.unwrap_err(), field);
            }
            let topic = vec!["seg"; 100].join(".");
            for (topic, id, field) in [(topic.as_str(), None, "topic"), ("ok", Some(&long), "id")] {
                let e = b
                    .publish(
                        &owner(),
                        Channel::default(),
                        Some(name("gw")),
                        topic,
                        Default::default(),
                        id.cloned(),
                    )
                    .await
                    .unwrap_err();
                refused(e, field);
            }
            let dash = InboxKey::new(Channel::default(), name("dash"));
            let pattern = format!("{topic}.**");
            refused(
                b.subscribe(&owner(), dash.clone(), &pattern)
                    .await
                    .unwrap_err(),
                "pattern",
            );
            assert!(b
                .follow_pattern(&owner(), None, &pattern, 0)
                .is_err_and(|e| e.code() == "invalid_request"));
            // Nothing stored: no message, no subscription, no new name.
            assert_eq!(b.committed().0, 0);
            assert!(b.subscriptions(&dash).is_empty());
            assert!(b.agents(&owner()).is_empty(), "{:?}", b.agents(&owner()));
            // Exactly the cap is fine.
            let mut at_cap = env("a", Some("b"), 1);
            at_cap.id = Some("y".repeat(model::MAX_FIELD_LEN));
            b.send_durable(&owner(), at_cap, Target::Any).await.unwrap();
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

    /// The seqs of `1..=upto` that `claim` owns.
    fn owned(claim: &Claim, upto: Seq) -> Vec<Seq> {
        (1..=upto).filter(|&s| claim.owns(s)).collect()
    }

    fn seqs(lo: Seq, hi: Seq) -> Vec<Seq> {
        (lo + 1..=hi).collect()
    }

    async fn fill(b: &Broker, count: i64) {
        for n in 0..count {
            b.send_durable(&owner(), env("p", Some("q"), n), Target::Any)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn claims_confirmed_out_of_order_keep_their_shares() {
        for (b, _dir) in brokers().await {
            let key = InboxKey::new(Channel::default(), name("q"));
            fill(&b, 20).await;
            let mut first = b.claim(&key, 0, 10, "test").await.unwrap();
            let mut second = b.claim(&key, 0, 20, "test").await.unwrap();
            assert_eq!(owned(&first, 40), seqs(0, 10));
            assert_eq!(owned(&second, 40), seqs(10, 20));
            // The later claim (a stream's, handed out) is confirmed first:
            // it may not be stored over the earlier one, which could still
            // be released.
            second.confirm_handed_out().await.unwrap();
            assert_eq!(b.engine.cursor(&key).await.unwrap(), 0);
            assert_eq!(b.cursor(&key).await.unwrap(), 20, "both still held");
            // The earlier one's confirm stores both.
            first.confirm().await.unwrap();
            assert_eq!(b.engine.cursor(&key).await.unwrap(), 20);
            assert_eq!(owned(&second, 40), seqs(10, 20), "shares stand");
        }
        // On a store other nodes write (NATS; here the fault-injecting
        // engine, which says so), another writer moves it on:
        {
            let (b, _) = faulty().await;
            let key = InboxKey::new(Channel::default(), name("q"));
            fill(&b, 20).await;
            b.ack(&key, 20, "test").await.unwrap();
            // a claim never takes what it stored.
            assert_eq!(
                b.engine
                    .swap_cursor(key.clone(), 20, 25, Vec::new())
                    .await
                    .unwrap()
                    .0,
                Swap::Moved
            );
            fill(&b, 20).await;
            let mut c = b.claim(&key, 0, 30, "test").await.unwrap();
            assert_eq!(owned(&c, 40), seqs(25, 30), "20..25 went elsewhere");
            c.confirm().await.unwrap();
            let c = b.claim(&key, 0, 30, "test").await.unwrap();
            assert!(owned(&c, 40).is_empty(), "nothing twice");
            // Another node stores inside a claim while this node holds it:
            // its confirm loses that part.
            let mut c = b.claim(&key, 0, 40, "test").await.unwrap();
            assert_eq!(owned(&c, 40), seqs(30, 40));
            assert_eq!(
                b.engine
                    .swap_cursor(key.clone(), 30, 35, Vec::new())
                    .await
                    .unwrap()
                    .0,
                Swap::Moved
            );
            c.confirm().await.unwrap();
            assert_eq!(owned(&c, 40), seqs(35, 40), "30..35 went to the other node");
            assert_eq!(b.engine.cursor(&key).await.unwrap(), 40);
        }
    }

    /// An engine whose cursor swaps can be made to fail (`storage_busy`)
    /// or to wait until let through.
    struct Faulty {
        inner: Arc<dyn Engine>,
        fail: std::sync::atomic::AtomicBool,
        stall: std::sync::atomic::AtomicBool,
        stalled: tokio::sync::Notify,
        /// Swaps asked for.
        swaps: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Engine for Faulty {
        async fn submit(&self, batch: Vec<NewMessage>) -> Result<engine::Durable> {
            self.inner.submit(batch).await
        }
        // As on NATS: the tests move its cursors behind the broker's back
        // (another node), so the broker must read them every time.
        fn shares_cursors(&self) -> bool {
            true
        }
        async fn read(
            &self,
            view: &engine::View,
            after: Seq,
            limit: usize,
        ) -> Result<engine::Page> {
            self.inner.read(view, after, limit).await
        }
        async fn floors(&self) -> Result<Vec<(engine::View, Seq)>> {
            self.inner.floors().await
        }
        async fn prune(&self, rules: &engine::Retention, now: f64) -> Result<engine::Pruned> {
            self.inner.prune(rules, now).await
        }
        async fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
            self.inner.seq_at_ts(ts).await
        }
        async fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64> {
            self.inner.count_inbox(key, after).await
        }
        async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
            self.inner.cursor(key).await
        }
        async fn swap_cursor(
            &self,
            key: InboxKey,
            expected: Seq,
            new: Seq,
            steps: Vec<crate::engine::Step>,
        ) -> Result<(Swap, Vec<crate::engine::Step>)> {
            use std::sync::atomic::Ordering::SeqCst;
            self.swaps.fetch_add(1, SeqCst);
            if self.stall.load(SeqCst) {
                self.stalled.notified().await;
            }
            if self.fail.load(SeqCst) {
                return Err(Error::StorageBusy("injected".into()));
            }
            self.inner.swap_cursor(key, expected, new, steps).await
        }
        async fn remember_agent(&self, key: InboxKey, seen: f64, connected: bool) -> Result<()> {
            self.inner.remember_agent(key, seen, connected).await
        }
        async fn forget_agent(&self, key: InboxKey) -> Result<bool> {
            self.inner.forget_agent(key).await
        }
        async fn expire_agents(&self, before: f64, limit: usize) -> Result<Vec<InboxKey>> {
            self.inner.expire_agents(before, limit).await
        }
        async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()> {
            self.inner.set_subscription(key, pattern, on).await
        }
        async fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>> {
            self.inner.subscriptions().await
        }
        async fn set_identity(
            &self,
            name: AgentName,
            identity: Option<crate::auth::Identity>,
        ) -> Result<()> {
            self.inner.set_identity(name, identity).await
        }
        async fn identities(&self) -> Result<Vec<crate::auth::Identity>> {
            self.inner.identities().await
        }
        async fn agents(&self) -> Result<Vec<engine::KnownAgent>> {
            self.inner.agents().await
        }
        async fn last(&self) -> Result<(Seq, f64)> {
            self.inner.last().await
        }
        async fn record(&self, steps: Vec<engine::Step>) -> Result<Vec<engine::Step>> {
            self.inner.record(steps).await
        }
        async fn steps(&self, key: &InboxKey, seq: Seq) -> Result<Vec<engine::Step>> {
            self.inner.steps(key, seq).await
        }
        async fn held(&self, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>> {
            self.inner.held(after, limit).await
        }
        async fn find(&self, id: &str, limit: usize) -> Result<Vec<engine::Committed>> {
            self.inner.find(id, limit).await
        }
        async fn thread(&self, thread: &str, limit: usize) -> Result<Vec<Arc<Message>>> {
            self.inner.thread(thread, limit).await
        }
        fn health(&self) -> &engine::Health {
            self.inner.health()
        }
        async fn describe(&self) -> serde_json::Value {
            self.inner.describe().await
        }
        fn feed(&self) -> Option<engine::Feed> {
            self.inner.feed()
        }
        fn settled(&self) -> bool {
            self.inner.settled()
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }

    async fn faulty() -> (Broker, Arc<Faulty>) {
        let engine = Arc::new(Faulty {
            inner: Arc::new(MemoryEngine::new()),
            fail: Default::default(),
            stall: Default::default(),
            stalled: Default::default(),
            swaps: Default::default(),
        });
        let trust = Trust::new(AuthMode::default(), RateLimit::default());
        (
            Broker::with_engine(engine.clone(), trust).await.unwrap(),
            engine,
        )
    }

    // Issue 21 (the history checker's 30-minute NATS run): a Unix auto-mode
    // reader's batches were stored one swap each, one at a time; on NATS
    // (a replicated write per swap) its stored cursor fell thousands of
    // messages behind what its client had read, all of it handed out again
    // after a crash. Claims handed out together are stored in one swap.
    #[tokio::test]
    async fn batches_handed_out_together_are_stored_with_one_swap() {
        use std::sync::atomic::Ordering::SeqCst;
        let (b, engine) = faulty().await;
        let key = InboxKey::new(Channel::default(), name("q"));
        fill(&b, 40).await;
        let mut claims = Vec::new();
        for n in 0..4 {
            claims.push(b.claim(&key, n * 10, n * 10 + 10, "unix").await.unwrap());
        }
        let before = engine.swaps.load(SeqCst);
        Claim::confirm_all_handed_out(claims).await.unwrap();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 40);
        assert_eq!(
            engine.swaps.load(SeqCst) - before,
            1,
            "one swap for four batches"
        );
        let steps = b.engine.steps(&key, 35).await.unwrap();
        assert!(
            steps.iter().any(|s| s.door == "unix"),
            "read steps stored: {steps:?}"
        );
    }

    // Issue 21 (the history checker's NATS run): a `/poll` waited 10 s for
    // its turn behind a cursor write the store was slow to answer, its
    // client gave up meanwhile, and then it stored its batch as read: by
    // `poll`, handed out to no one. A reader gone when its turn comes
    // takes nothing.
    #[tokio::test]
    async fn a_confirm_whose_reader_left_while_it_waited_stores_nothing() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let (b, engine) = faulty().await;
        let key = InboxKey::new(Channel::default(), name("q"));
        fill(&b, 20).await;
        let mut stream = b.claim(&key, 0, 10, "sse").await.unwrap();
        engine.stall.store(true, SeqCst);
        let storing = tokio::spawn(async move {
            stream.confirm_handed_out().await.unwrap();
        });
        while engine.swaps.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let mut poll = b.claim_storable(&key, 10, 20, "poll").await.unwrap();
        assert_eq!(owned(&poll, 20), seqs(10, 20));
        let here = Arc::new(AtomicBool::new(true));
        let present = here.clone();
        // It waits for the turn the stalled swap holds; its client leaves.
        let confirming = tokio::spawn(async move {
            poll.confirm_while(move || present.load(SeqCst))
                .await
                .unwrap();
            poll
        });
        here.store(false, SeqCst);
        engine.stall.store(false, SeqCst);
        engine.stalled.notify_waiters();
        storing.await.unwrap();
        let poll = confirming.await.unwrap();
        assert!(owned(&poll, 20).is_empty(), "the poll owns nothing");
        assert_eq!(
            b.engine.cursor(&key).await.unwrap(),
            10,
            "not stored over its batch"
        );
        assert_eq!(b.cursor(&key).await.unwrap(), 10, "the next reader gets it");
    }

    // Issue 21 (the history checker's 30-minute SQLite run, seed 120727): a
    // stream's batch was confirmed as its peer acknowledged it, the disk
    // was full, and the cursor's store landed 2 s later: its `read` step
    // carried that time, long after the stream had ended. A step says when
    // its reader had the messages.
    #[tokio::test]
    async fn a_read_step_says_when_it_was_read_not_when_its_store_landed() {
        use std::sync::atomic::Ordering::SeqCst;
        let (b, engine) = faulty().await;
        let key = InboxKey::new(Channel::default(), name("q"));
        fill(&b, 10).await;
        let mut stream = b.claim(&key, 0, 10, "sse").await.unwrap();
        engine.fail.store(true, SeqCst);
        let read_at = crate::model::now();
        let storing = tokio::spawn(async move { stream.confirm_handed_out().await });
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
        engine.fail.store(false, SeqCst);
        storing.await.unwrap().unwrap();
        let landed = crate::model::now();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 10);
        let steps = b.engine.steps(&key, 5).await.unwrap();
        let read = steps.iter().find(|s| s.door == "sse").expect("a read step");
        assert!(
            read.ts - read_at < 0.2 && landed - read.ts > 0.6,
            "read at {read_at}, step at {}, stored at {landed}",
            read.ts
        );
    }

    // Issue 21: a `/poll` whose confirm failed (storage_busy) while a
    // `/subscribe` of the same inbox claimed beyond it left a hole the
    // stream's confirm then stored the cursor over: lost.
    #[tokio::test]
    async fn a_failed_confirm_leaves_no_hole() {
        use std::sync::atomic::Ordering::SeqCst;
        let (b, engine) = faulty().await;
        let key = InboxKey::new(Channel::default(), name("q"));
        fill(&b, 20).await;
        let mut poll = b.claim(&key, 0, 10, "poll").await.unwrap();
        let mut stream = b.claim(&key, 0, 20, "sse").await.unwrap();
        engine.fail.store(true, SeqCst);
        assert_eq!(poll.confirm().await.unwrap_err().code(), "storage_busy");
        assert!(owned(&poll, 20).is_empty(), "hands out nothing");
        engine.fail.store(false, SeqCst);
        stream.confirm_handed_out().await.unwrap();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 0, "not over the hole");
        assert_eq!(b.cursor(&key).await.unwrap(), 0, "the hole is read again");
        let mut again = b.claim(&key, 0, 20, "poll").await.unwrap();
        assert_eq!(
            owned(&again, 20),
            seqs(0, 10),
            "the stream's share stays its"
        );
        again.confirm().await.unwrap();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 20);
    }

    // Issue 21: a `/poll` answered while a stream's batch below it was
    // unacknowledged lived in memory only (the stored cursor could not pass
    // the batch), and a crash handed it out again (the history checker,
    // seed 6 with stalling streams: 487 twice). Now it takes nothing until
    // that batch settles.
    #[tokio::test]
    async fn a_poll_takes_nothing_behind_an_unconfirmed_claim() {
        let (b, _) = faulty().await;
        let key = InboxKey::new(Channel::default(), name("q"));
        fill(&b, 20).await;
        let mut stream = b.claim(&key, 0, 10, "sse").await.unwrap();
        let poll = b.claim_storable(&key, 10, 20, "poll").await.unwrap();
        assert!(
            owned(&poll, 20).is_empty(),
            "nothing behind the stream's batch"
        );
        drop(poll);
        stream.confirm().await.unwrap();
        let mut poll = b.claim_storable(&key, 10, 20, "poll").await.unwrap();
        assert_eq!(owned(&poll, 20), seqs(10, 20));
        poll.confirm().await.unwrap();
        assert_eq!(
            b.engine.cursor(&key).await.unwrap(),
            20,
            "stored when answered"
        );
    }

    // Issue 21 (the history checker on two NATS nodes): a claim that
    // confirms before it hands out, taken above a claim that was later
    // released and taken again (a hole below it), answered while its share
    // was only in memory: a crash, or another node reading the stored
    // cursor, handed it out again. Now it hands out what was stored.
    #[tokio::test]
    async fn a_confirm_behind_a_pending_claim_hands_out_only_what_was_stored() {
        let (b, _) = faulty().await;
        let key = InboxKey::new(Channel::default(), name("q"));
        fill(&b, 30).await;
        let mut stream = b.claim(&key, 0, 10, "sse").await.unwrap();
        let mut poll = b.claim(&key, 0, 20, "poll").await.unwrap();
        assert_eq!(owned(&poll, 30), seqs(10, 20));
        poll.confirm().await.unwrap();
        assert!(owned(&poll, 30).is_empty(), "nothing was stored");
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 0);
        assert_eq!(b.cursor(&key).await.unwrap(), 10, "10..20 released");
        // An ack behind it says so, and stores what it could.
        let err = b.ack(&key, 20, "unix").await.unwrap_err();
        assert_eq!(err.code(), "storage_busy");
        stream.confirm_handed_out().await.unwrap();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 10);
        b.ack(&key, 20, "unix").await.unwrap();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 20);
    }

    // Issue 21: a `/poll` whose client vanished mid-claim (its future
    // dropped) held its claim for ever, and a later confirm stored the
    // cursor over it.
    #[tokio::test]
    async fn a_cancelled_claim_is_released() {
        use std::sync::atomic::Ordering::SeqCst;
        let (b, engine) = faulty().await;
        let key = InboxKey::new(Channel::default(), name("q"));
        fill(&b, 30).await;
        // Dropped before confirming.
        drop(b.claim(&key, 0, 10, "poll").await.unwrap());
        assert_eq!(b.cursor(&key).await.unwrap(), 0);
        // A later claim confirmed over a released one stores nothing over
        // the hole, and the next reader gets the hole.
        let held = b.claim(&key, 0, 10, "poll").await.unwrap();
        let mut stream = b.claim(&key, 0, 20, "sse").await.unwrap();
        assert_eq!(owned(&stream, 30), seqs(10, 20));
        drop(held);
        stream.confirm_handed_out().await.unwrap();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 0, "not over the hole");
        // A confirm whose caller goes away while its swap waits on the
        // store (a `/poll` whose client hung up) still finishes: the store
        // may apply the swap, and then the messages are `read` by that
        // door, never counted read by nobody (they were lost that way).
        let mut poll = b.claim(&key, 0, 10, "poll").await.unwrap();
        assert_eq!(owned(&poll, 30), seqs(0, 10));
        engine.stall.store(true, SeqCst);
        {
            let confirm = poll.confirm();
            tokio::pin!(confirm);
            let waited =
                tokio::time::timeout(std::time::Duration::from_millis(50), &mut confirm).await;
            assert!(waited.is_err(), "the swap stalls");
        }
        drop(poll);
        engine.stall.store(false, SeqCst);
        engine.stalled.notify_waiters();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while b.engine.cursor(&key).await.unwrap() != 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "the confirm never finished"
            );
            tokio::task::yield_now().await;
        }
        let mut again = b.claim(&key, 0, 30, "poll").await.unwrap();
        assert_eq!(owned(&again, 30), seqs(20, 30));
        again.confirm().await.unwrap();
        assert_eq!(b.engine.cursor(&key).await.unwrap(), 30);
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
        assert_eq!(b.endpoints(&owner()).get("x"), Some(&s2.id));
        drop(s2);
        assert!(b.endpoints(&owner()).is_empty());
        assert!(!b.agents(&owner())[0].online());
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
