//! Persistence: the [`Engine`] trait and its implementations.
//!
//! An engine owns the log (append, inbox reads), cursors and the agent
//! registry and agent identities. It assigns `seq` and bus `ts` in commit order and reports every
//! commit, in order, to a [`CommitObserver`] (the broker) *before* it
//! acknowledges the senders, so nobody can see an acknowledgement for a
//! message that readers cannot find yet.
//!
//! - [`sqlite::SqliteEngine`]: the embedded default, a SQLite WAL database
//!   written by one thread with group commit.
//! - [`memory::MemoryEngine`]: a throwaway store for tests and `--memory`.
//!
//! A distributed engine (NATS JetStream) implements the same trait: `submit`
//! publishes, the stream subscription feeds the observer.

pub mod memory;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::auth::Identity;
use crate::error::Result;
use crate::model::{AgentName, Channel, InboxKey, Message, NewMessage, Seq};

/// Resolves once the submitted batch is durable, with the stored messages
/// (seq and ts assigned) in submission order.
pub type Durable = oneshot::Receiver<Result<Vec<Arc<Message>>>>;

/// A stored message together with the inboxes it landed in.
pub struct Committed {
    pub message: Arc<Message>,
    pub recipients: Vec<AgentName>,
}

/// Receives every commit, in seq order, before senders are acknowledged.
pub trait CommitObserver: Send + Sync + 'static {
    /// The engine is about to stamp messages (assign seq and ts) that are
    /// not readable yet; `committed` follows, with an empty batch if the
    /// write failed. Between the two, "now" must not run ahead of the
    /// commit watermark.
    fn stamping(&self);

    fn committed(&self, batch: &[Committed]);
}

/// An agent the store remembers on a channel.
#[derive(Debug, Clone)]
pub struct KnownAgent {
    pub key: InboxKey,
    pub first_seen: f64,
    pub last_seen: f64,
}

/// What a storage engine does for the broker.
///
/// Read methods may block briefly (SQLite); the broker calls them from
/// `spawn_blocking`. Write methods queue work for the engine's writer and
/// return once it is queued (applying back-pressure when the queue is full).
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Queues messages for a durable append. Batches submitted from one task
    /// are stored in submission order.
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable>;

    /// Messages in `key`'s inbox with `seq > after`, oldest first, at most `limit`.
    fn read_inbox(&self, key: &InboxKey, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>>;

    /// Topic events published on `channel` with `seq > after`, oldest first.
    fn read_topics(&self, channel: &Channel, after: Seq, limit: usize)
        -> Result<Vec<Arc<Message>>>;

    /// The last seq whose ts is `<= ts` (0 if none): turns a `since=ts`
    /// cursor into a seq cursor.
    fn seq_at_ts(&self, ts: f64) -> Result<Seq>;

    /// Number of messages in `key`'s inbox with `seq > after`.
    fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64>;

    /// The stored cursor of an inbox (0 if never acknowledged).
    fn cursor(&self, key: &InboxKey) -> Result<Seq>;

    /// Queues a cursor update; the stored cursor only moves forward.
    async fn set_cursor(&self, key: InboxKey, seq: Seq) -> Result<()>;

    /// Queues an update to the agent registry (first/last seen).
    async fn remember_agent(&self, key: InboxKey, seen: f64) -> Result<()>;

    /// Adds (`on`) or removes a durable topic subscription of an agent.
    async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()>;

    /// Every durable topic subscription.
    fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>>;

    /// Stores (or with `None` deletes) the identity of `name`; resolves once
    /// the change is durable.
    async fn set_identity(&self, name: AgentName, identity: Option<Identity>) -> Result<()>;

    /// Every stored agent identity.
    fn identities(&self) -> Result<Vec<Identity>>;

    /// Every agent the store knows, on every channel.
    fn agents(&self) -> Result<Vec<KnownAgent>>;

    /// The newest seq and ts in the log.
    fn last(&self) -> Result<(Seq, f64)>;

    /// Finishes queued writes; called once at shutdown.
    async fn close(&self);
}
