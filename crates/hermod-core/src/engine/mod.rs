//! Persistence: the [`Engine`] trait and its implementations.
//!
//! An engine owns the log (append, reads by view), cursors, the agent
//! registry, durable subscriptions, agent identities and retention. It
//! assigns `seq` and bus `ts` in commit order. Every write resolves only
//! once durable, or fails with nothing of it applied. [`conformance`] is
//! the contract as a test every engine runs.
//!
//! **The feed.** Every commit — messages appended and changes to the
//! registry, subscriptions, identities and pruned marks, whether this
//! process wrote them or another node did — comes out of
//! [`Engine::feed`] once, in commit order, as a [`Commit`]. The broker
//! follows it to wake readers and keep its routing state; nothing else
//! tells it what the store holds after start. A write made here resolves
//! only once its commit has been through the feed (the follower drops the
//! [`Commit`] after applying it, which answers the writers), so whoever
//! is acknowledged can read their own write at once (read-your-writes):
//! nobody sees an acknowledgement for a message that readers cannot find,
//! nor for a subscription that routing does not use yet.
//!
//! - [`sqlite::SqliteEngine`]: the embedded default, a SQLite WAL database
//!   written by one thread with group commit.
//! - [`memory::MemoryEngine`]: a throwaway store for tests and `--memory`,
//!   which is a [`log_index::LogIndex`] (the index the NATS engine builds
//!   per node) keeping every body.
//!
//! **The `ts` rule.** `seq` is the one log order. `ts` is stamped by whoever
//! assigns `seq` (the single writer here; for a distributed log, the node
//! that learns the stream sequence stamps `max(wall clock, previous ts +
//! 1 µs)` in that order — a stream's own timestamp would do only if it is
//! strictly increasing), so `ts` grows strictly with `seq` across nodes
//! and clock skew. That is what keeps agent-bus `since=ts` readers exact:
//! `seq_at_ts` is a search over a monotone column, and the broker's `now`
//! never passes the ts of a commit it has not applied yet: while
//! [`Engine::settled`] is false it answers with the ts of the newest commit
//! it applied, so a reader can neither skip nor repeat.
//!
//! **Cursors** are compare-and-set ([`Engine::swap_cursor`]): a destructive
//! read (`/poll`, interop `/subscribe`) moves the cursor only from the
//! value it read, so two nodes serving one agent never hand out a message
//! twice.
//!
//! A distributed engine (NATS JetStream) implements the same trait:
//! `submit` publishes and resolves after the PubAck *and* after its seq has
//! come through the node's own log subscription, which is also the feed.

pub mod conformance;
pub mod log_index;
pub mod memory;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Identity;
use crate::error::Result;
use crate::model::{AgentName, Channel, Guarded, InboxKey, Message, NewMessage, Seq, State};

/// Resolves once the submitted batch is durable, with the stored messages
/// (seq and ts assigned) in submission order.
pub type Durable = oneshot::Receiver<Result<Vec<Arc<Message>>>>;

/// A stored message together with the inboxes it landed in.
pub struct Committed {
    pub message: Arc<Message>,
    pub recipients: Vec<AgentName>,
    /// The loop guard's part, as submitted: a [`Guarded::Releases`] with
    /// no recipients found its hold ended already (a second release).
    pub guard: Guarded,
}

/// A change to what the store keeps beside the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An agent was recorded as seen at `seen` (`connected` once it connected).
    Agent {
        key: InboxKey,
        seen: f64,
        connected: bool,
    },
    /// An agent went, with its inbox, cursor and subscriptions.
    Forgotten(InboxKey),
    /// A durable subscription was added (`on`) or removed.
    Subscription {
        key: InboxKey,
        pattern: String,
        on: bool,
    },
    /// An identity was stored, or deleted (`None`).
    Identity {
        name: AgentName,
        identity: Option<Identity>,
    },
    /// Retention moved a view's pruned mark.
    Floor(View, Seq),
    /// A delivery step was recorded.
    Step(Step),
}

/// A recorded step of delivery: every message of `key`'s inbox with
/// `lo < seq <= hi` reached `state` at `ts`, through `door` (`unix`,
/// `sse`, `ws`, `http`, `interop`, `tmux`, ...). A run, not a row per
/// message: one acknowledgement of a hundred messages is one step, so
/// recording delivery costs a write per read, not per message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Step {
    pub key: InboxKey,
    pub lo: Seq,
    pub hi: Seq,
    pub state: State,
    pub ts: f64,
    pub door: String,
    /// Why, when it says more than the state (a bounce's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Step {
    /// Whether it covers the message at `seq`.
    pub fn covers(&self, seq: Seq) -> bool {
        self.lo < seq && seq <= self.hi
    }
}

/// Steps [`Engine::steps`] looks at per state, at most: runs of one state
/// in one inbox seldom overlap (cursors only move forward), so the first
/// few that end at or after a seq include the one that covers it.
pub const STEP_PROBE: usize = 8;

/// One commit as the store applied it: what the feed carries.
///
/// Dropping it answers the writers of this commit that are waiting in this
/// process, so the follower drops it only after applying it.
pub struct Commit {
    /// Appended messages, seq ascending (and after every earlier commit's).
    pub messages: Vec<Committed>,
    pub changes: Vec<Change>,
    answer: Option<Box<dyn FnOnce() + Send>>,
}

impl Commit {
    /// A commit whose local writers `answer` resolves.
    pub fn new(
        messages: Vec<Committed>,
        changes: Vec<Change>,
        answer: impl FnOnce() + Send + 'static,
    ) -> Self {
        Self {
            messages,
            changes,
            answer: Some(Box::new(answer)),
        }
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            answer();
        }
    }
}

/// Every commit in order, from the one after what the store held when it
/// opened: see the module docs.
pub type Feed = mpsc::Receiver<Commit>;

/// Commits the feed holds before the engine waits for its follower.
pub const FEED_CAPACITY: usize = 256;

/// A filtered view of the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    /// One agent's inbox on one channel.
    Inbox(InboxKey),
    /// Every topic event published on a channel.
    Topics(Channel),
    /// Every topic event on every channel (`channel=*`: the hermes_events
    /// firehose, which has no channels).
    AllTopics,
}

/// Messages of a view after some seq, and how far retention has pruned
/// that view: every message of the view with `seq <= pruned` is gone.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<Arc<Message>>,
    pub pruned: Seq,
}

/// What the store keeps; `None` keeps everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    /// Messages older than this many seconds are removed.
    pub age: Option<f64>,
    /// Each inbox keeps its newest this many messages.
    pub inbox_messages: Option<u64>,
    /// The whole store stays under this many bytes (oldest removed first).
    pub bytes: Option<u64>,
    /// Topic events leave the topic views after this many seconds (they
    /// stay in the inboxes of durable subscribers under the rules above).
    pub topic_age: Option<f64>,
}

/// What one [`Engine::prune`] step did.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Message rows removed (the views' marks that moved come through
    /// the feed as [`Change::Floor`]).
    pub removed: u64,
    /// More is due: call again (after letting other work run).
    pub more: bool,
}

/// Rows one prune step touches at most, so a step never holds the writer
/// long enough to stall sends.
pub const PRUNE_BUDGET: usize = 512;

/// An agent the store remembers on a channel.
#[derive(Debug, Clone)]
pub struct KnownAgent {
    pub key: InboxKey,
    pub first_seen: f64,
    pub last_seen: f64,
    /// It connected at least once (else it is only a name messages went to).
    pub connected: bool,
}

/// Whether the store accepts writes right now, and if not, why.
///
/// Engines report trouble here as it happens (a full disk, a lock held
/// by another process, an fsync failure) and clear it once a write
/// succeeds again; `/healthz` and `hermod status` show it.
#[derive(Debug, Default)]
pub struct Health {
    degraded: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// `None` when healthy, else the reason.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().unwrap().clone()
    }

    pub fn set_degraded(&self, reason: impl Into<String>) {
        *self.degraded.lock().unwrap() = Some(reason.into());
    }

    pub fn clear(&self) {
        self.degraded.lock().unwrap().take();
    }
}

/// What [`Engine::swap_cursor`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// The cursor was at the expected value and is now at the new one.
    Moved,
    /// It was not: this is the value someone else stored. It may be the
    /// very value this swap wanted (two nodes that read the same batch
    /// claim the same end), which is why a swap does not answer with a
    /// bare value.
    Lost(Seq),
    /// The cursor is at the expected value, but another node holds a lease
    /// over what follows it (see [`Engine::lease_cursor`]): its stream is
    /// handing those messages out. Nothing was written; try again later.
    Leased,
}

/// How long a node's lease over an inbox lasts unless renewed (see
/// [`Engine::lease_cursor`]): a node that died holding one blocks other
/// nodes' destructive reads of that inbox for at most this long. Holders
/// renew at a third of it, so clocks may differ between nodes by a few
/// seconds without two nodes holding one inbox.
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(15);

/// What a storage engine does for the broker.
///
/// Every write resolves only once it is durable (or failed, with nothing
/// of it applied): the broker acknowledges nothing to a client before
/// that. Reads are async and never block the caller's thread. Errors are
/// [`Error::Storage`](crate::Error::Storage) (disk full, I/O, writes
/// stopped) or [`Error::StorageBusy`](crate::Error::StorageBusy) (the
/// store is locked by someone else; retry later).
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Queues messages for a durable append. Batches submitted from one task
    /// are stored in submission order. A [`Guarded::Held`] message is
    /// kept in no inbox, and no retention rule removes it, until a
    /// [`Guarded::Releases`] of it commits (which ends the hold in the same
    /// commit; a release whose hold is gone lands in no inbox).
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable>;

    /// Messages of `view` with `seq > after`, oldest first, at most
    /// `limit`, with the view's pruned mark from the same snapshot (so a
    /// reader can never miss a prune that happened before its read).
    async fn read(&self, view: &View, after: Seq, limit: usize) -> Result<Page>;

    /// Every view's pruned mark (views never pruned are absent).
    async fn floors(&self) -> Result<Vec<(View, Seq)>>;

    /// One bounded step of retention under `rules` at time `now`;
    /// resolves once durable. Never removes more than [`PRUNE_BUDGET`]
    /// rows of a kind per step.
    async fn prune(&self, rules: &Retention, now: f64) -> Result<Pruned>;

    /// The last seq whose ts is `<= ts` (0 if none): turns a `since=ts`
    /// cursor into a seq cursor.
    async fn seq_at_ts(&self, ts: f64) -> Result<Seq>;

    /// Number of messages in `key`'s inbox with `seq > after`.
    async fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64>;

    /// The stored cursor of an inbox (0 if never acknowledged).
    async fn cursor(&self, key: &InboxKey) -> Result<Seq>;

    /// Compare-and-set: moves the cursor of `key` to `new` only if it is
    /// `expected` now, and with the move records `steps` (the `read` steps
    /// of what it covers): in the same commit where the engine can
    /// (SQLite, memory), so a cursor that moved always has its steps on
    /// record, a crash or not; NATS records them right after the move.
    /// Resolves once durable, with the steps this call added (as
    /// [`Engine::record`] returns them: whoever gets a step back tells the
    /// sender). Where cursors are shared, another node's lease over what
    /// follows `expected` refuses the move ([`Swap::Leased`]).
    async fn swap_cursor(
        &self,
        key: InboxKey,
        expected: Seq,
        new: Seq,
        steps: Vec<Step>,
    ) -> Result<(Swap, Vec<Step>)>;

    /// Where cursors are shared between nodes ([`Engine::shares_cursors`]):
    /// a stream takes a *lease* over the messages of `key`'s inbox up to
    /// `upto` before it hands them out, and keeps it until its peer has
    /// them and the cursor moved through them. Taken (or renewed, or with
    /// `upto <= expected` given back) only if the stored cursor is
    /// `expected` and no other node's lease stands ([`Swap::Lost`],
    /// [`Swap::Leased`] otherwise). While it stands, other nodes' swaps of
    /// this cursor answer [`Swap::Leased`], so no other node hands out what
    /// the stream may be sending; it lapses after [`LEASE`] unless renewed.
    /// This node's own swaps keep it while it reaches past their new value.
    /// A store only this node moves needs none: the broker's claims in
    /// memory do that work (the default does nothing).
    async fn lease_cursor(&self, key: InboxKey, expected: Seq, upto: Seq) -> Result<Swap> {
        let _ = (key, expected, upto);
        Ok(Swap::Moved)
    }

    /// Records an agent in the registry (first/last seen, and whether it
    /// has `connected`: once set it stays); resolves once durable.
    async fn remember_agent(&self, key: InboxKey, seen: f64, connected: bool) -> Result<()>;

    /// Removes an agent from the registry with its inbox, cursor and
    /// subscriptions; resolves once durable. False if it was not known.
    async fn forget_agent(&self, key: InboxKey) -> Result<bool>;

    /// Removes (at most `limit`) agents that never connected, were first
    /// seen before `before`, and hold nothing (no inbox rows, no
    /// subscriptions); returns them once durable.
    async fn expire_agents(&self, before: f64, limit: usize) -> Result<Vec<InboxKey>>;

    /// Adds (`on`) or removes a durable topic subscription of an agent;
    /// resolves once durable.
    async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()>;

    /// Every durable topic subscription.
    async fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>>;

    /// Stores (or with `None` deletes) the identity of `name`; resolves once
    /// the change is durable.
    async fn set_identity(&self, name: AgentName, identity: Option<Identity>) -> Result<()>;

    /// Every stored agent identity.
    async fn identities(&self) -> Result<Vec<Identity>>;

    /// Every agent the store knows, on every channel.
    async fn agents(&self) -> Result<Vec<KnownAgent>>;

    /// Resolves once the broker has applied every change to the registry,
    /// subscriptions and identities that was durable when this was called,
    /// from whichever node made it: routing that follows it sees a
    /// subscription another node acknowledged a moment ago. An engine whose
    /// changes all go through this node (and are applied before they
    /// resolve) keeps this default.
    async fn sync_state(&self) -> Result<()> {
        Ok(())
    }

    /// Whether other processes (other nodes) move this store's cursors
    /// too. When not, a node that has read a cursor once knows every later
    /// value (it makes them all), so reads need not ask the store again.
    fn shares_cursors(&self) -> bool {
        false
    }

    /// The newest seq and ts in the log.
    async fn last(&self) -> Result<(Seq, f64)>;

    /// Records delivery steps; resolves once stored, with the steps this
    /// call added. Steps are bookkeeping, not messages: an engine may make
    /// them durable with its next durable commit rather than on their own
    /// (a crash can lose the newest steps, never a message). The first step of a state ending at one seq in one
    /// inbox stays (its time is when it first happened); a repeat, here or
    /// from another node, is ignored and not returned, so whoever gets a
    /// step back is the one who tells the sender.
    async fn record(&self, steps: Vec<Step>) -> Result<Vec<Step>>;

    /// The steps recorded for the message at `seq` in `key`'s inbox: for
    /// each state, the earliest-ending step that covers it.
    async fn steps(&self, key: &InboxKey, seq: Seq) -> Result<Vec<Step>>;

    /// The messages the loop guard holds now (stored as
    /// [`Guarded::Held`], not yet released), seq ascending after `after`,
    /// at most `limit`: what a node that starts queues again.
    async fn held(&self, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>>;

    /// The stored messages with this id (ids are the sender's, so there
    /// may be several), oldest first, at most `limit`, with their inboxes.
    async fn find(&self, id: &str, limit: usize) -> Result<Vec<Committed>>;

    /// A conversation: the message whose id is `thread` and every message
    /// whose `thread` is `thread`, oldest first, at most `limit`.
    async fn thread(&self, thread: &str, limit: usize) -> Result<Vec<Arc<Message>>>;

    /// Whether writes work now.
    fn health(&self) -> &Health;

    /// What this engine is and what it is connected to, for `hermod
    /// status`: at least `{"engine": <name>}`.
    async fn describe(&self) -> serde_json::Value;

    /// The feed of every commit (see the module docs); `None` once taken:
    /// it has one follower, the broker.
    fn feed(&self) -> Option<Feed>;

    /// True when no commit this engine stamped is still on its way through
    /// the feed. A distributed engine, which cannot know what other nodes
    /// are stamping, answers false.
    fn settled(&self) -> bool;

    /// Finishes queued writes; called once at shutdown.
    async fn close(&self);
}
