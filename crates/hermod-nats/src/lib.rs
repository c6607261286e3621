//! hermod's NATS JetStream engine: several hermod nodes over one
//! JetStream cluster, behind the same [`Engine`] contract as SQLite.
//!
//! # How the store maps onto JetStream
//! - **One stream holds the log** (`HERMOD` unless named otherwise), on
//!   subjects `{prefix}.d.{channel}.{to}` (direct), `{prefix}.b.{channel}`
//!   (broadcast) and `{prefix}.t.{channel}.{topic…}` (topic events); the
//!   stream sequence is hermod's seq. A broadcast's recipient list
//!   travels in its entry, except one too long for the servers'
//!   `max_payload`: its parts go first, on `{prefix}.r.{channel}`, and
//!   the message names their seqs (each a seq no view holds, kept as long
//!   as its message). Every publish carries a
//!   `Nats-Msg-Id` derived from the message's id, sender, channel, target
//!   and body ([`msg_id`]), so a client that resends the same message
//!   with the same id after an unknown outcome (`storage_busy`: a lost
//!   PubAck) within the stream's duplicate window (2 min) is stored once.
//!   The node itself never publishes again: a copy would land behind
//!   messages sent after it.
//! - **State beside the log lives in KV buckets**, never in a durable
//!   consumer per agent: `{stream}_state` holds the agent registry,
//!   durable subscriptions, identities and retention's pruned marks;
//!   `{stream}_cursors` holds the inbox cursors, read from the bucket's
//!   leader (a replica may lag). Every read-modify-write is a
//!   compare-and-set on the entry's revision. Retention purges the
//!   delivery steps of the messages it removes.
//! - **Each node follows the log and the state bucket once** (an ordered
//!   consumer and a KV watch, in one task): that is the engine's feed, and
//!   it builds the node's [`LogIndex`] (hermod-core's, the memory engine's
//!   whole store) — which seqs each inbox and
//!   topic view holds — since JetStream has no secondary index. Reads come
//!   from that index and a cache of the newest messages; older bodies are
//!   fetched with direct gets, never with a consumer per request.
//! - **A send is acknowledged** after its PubAck *and* after this node's
//!   follower has applied its seq and the broker has taken the commit off
//!   the feed, so the sender can read its own write at once.
//!
//! "Durable" is what the stream's replicas and the servers' fsync give:
//! with R3 a PubAck means a majority of servers stored it; each server
//! fsyncs per write only with `jetstream { sync_interval: always }` (the
//! test clusters set it; see the README).

pub mod keys;
pub mod testing;
mod tombstones;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hermod_core::auth::Identity;
use hermod_core::engine::{
    Change, Commit, Committed, Durable, Engine, Feed, Health, KnownAgent, Page, Pruned, Retention,
    Step, Swap, View, FEED_CAPACITY,
};
use hermod_core::error::{Error, Result};
use hermod_core::model::{
    AgentName, Auth, Body, Channel, Guarded, InboxKey, Message, Meta, NewMessage, Seq,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use hermod_core::engine::log_index::{self, AgentEntry, LogIndex, PruneStep};
use keys::StateKey;
use tombstones::{Known, Tombstone};

/// Where and how to reach the JetStream cluster.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`); the client fails over between them.
    pub urls: Vec<String>,
    /// A `.creds` file (JWT and NKey seed) to authenticate with.
    pub creds: Option<PathBuf>,
    /// The stream holding the log; its buckets are named after it.
    pub stream: String,
    /// Replicas of the stream and buckets when hermod creates them.
    pub replicas: usize,
    /// What the node's cache of the newest messages may hold, in bytes.
    pub cache_bytes: usize,
    /// This node's name in the cursor leases it takes (letters, digits,
    /// `-`). Kept across restarts (`hermod serve` keeps it in the data
    /// directory), a node back from a crash takes its own leases over at
    /// once: nothing of its earlier life is still sending. `None`: a new
    /// name at every start (its leases lapse after [`LEASE`]).
    ///
    /// [`LEASE`]: hermod_core::engine::LEASE
    pub node: Option<String>,
    /// How old a tombstone (a forgotten agent, an ended subscription, a
    /// forgotten inbox's epoch) in the state bucket must be before
    /// retention purges it: every node must have seen it by then.
    pub tombstone_age: Duration,
    /// A node away from NATS for longer than this reads the whole state
    /// bucket again when it is back (it may have missed a purged
    /// tombstone). Below [`NatsConfig::tombstone_age`].
    pub resync_after: Duration,
    /// Reconnect only to `urls`, never to the servers the cluster
    /// advertises (for networks where those addresses do not reach).
    pub only_listed: bool,
}

impl NatsConfig {
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            creds: None,
            stream: "HERMOD".into(),
            replicas: 1,
            cache_bytes: log_index::CACHE_BYTES,
            node: None,
            tombstone_age: Duration::from_secs(3600),
            resync_after: Duration::from_secs(1800),
            only_listed: false,
        }
    }
}

/// Concurrent direct gets one read issues at most.
const FETCH_CONCURRENCY: usize = 32;
/// Delivery steps one node creates in the state bucket at once: steps are
/// bookkeeping behind the replies, and a burst of them must not crowd out
/// the registry and cursor requests replies wait on (the JetStream API
/// answers "no responders" when swamped).
const STEP_CONCURRENCY: usize = 4;
/// How long a write waits for this node's follower to see it.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a JetStream request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the log follower or the state watch may stay silent before
/// the follower asks whether its stream holds more (see [`Inner::follow`]).
const FOLLOW_CHECK: Duration = Duration::from_secs(3);

/// How soon the follower makes a subscription anew again at the same
/// position.
const FOLLOW_REVIVE_AGAIN: Duration = Duration::from_secs(30);

/// How long a node that starts waits for JetStream to answer its first
/// requests (creating or finding the stream and buckets).
const SETUP_PATIENCE: Duration = Duration::from_secs(60);

/// A message as stored in the stream.
#[derive(Serialize, Deserialize)]
struct Stored<B> {
    id: String,
    channel: Channel,
    from: AgentName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<AgentName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent_ts: Option<f64>,
    #[serde(default)]
    auth: Auth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<Box<Meta>>,
    /// The body exactly as the sender wrote it.
    body: B,
    /// Its recipients (after those of `parts`).
    #[serde(default)]
    recipients: Vec<AgentName>,
    /// The seqs of its recipient list's parts, logged before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    parts: Vec<Seq>,
    #[serde(default, skip_serializing_if = "is_free")]
    guard: Guarded,
}

/// A part of a recipient list too long for its message's entry.
#[derive(Serialize, Deserialize)]
struct Part {
    recipients: Vec<AgentName>,
}

/// What one of hermod's messages adds to the index besides itself.
struct Routing {
    recipients: Vec<AgentName>,
    parts: Vec<Seq>,
    guard: Guarded,
}

fn is_free(g: &Guarded) -> bool {
    *g == Guarded::Free
}

/// The `Nats-Msg-Id` of a message: the same for every publish of it, so
/// JetStream stores it once. The message id alone is the sender's choice,
/// which may repeat (another sender, target or body: another message);
/// the delivery fields are not part of it (a retry's `ttl` runs from its
/// own time), and a loop-guard release is a message of its own beside the
/// hold it ends.
fn msg_id(m: &NewMessage) -> String {
    use sha2::{Digest, Sha256};
    let guard = match m.guard {
        Guarded::Free => String::new(),
        Guarded::Held => "held".to_owned(),
        Guarded::Releases(seq) => format!("releases {seq}"),
    };
    let mut h = Sha256::new();
    for part in [
        m.channel.as_str(),
        m.from.as_str(),
        m.to.as_ref().map_or("", |t| t.as_str()),
        m.topic.as_deref().unwrap_or(""),
        &m.id,
        &guard,
        m.body.as_str(),
    ] {
        // Length-prefixed, so no two different messages hash the same parts.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    format!("{:x}", h.finalize())
}

/// An error after a publish may have reached JetStream: what was sent may
/// be stored, so the caller hears `storage_busy` (retry: the same id is
/// stored once), never "nothing was stored".
fn unknown_outcome(e: Error) -> Error {
    match e {
        Error::Storage(why) => Error::StorageBusy(format!(
            "{why}; the message may be stored: send it again with the same id (stored once)"
        )),
        other => other,
    }
}

fn encode(m: &NewMessage, recipients: &[AgentName], parts: &[Seq]) -> Bytes {
    let stored = Stored {
        id: m.id.clone(),
        channel: m.channel.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        topic: m.topic.clone(),
        sent_ts: m.sent_ts,
        auth: m.auth,
        meta: m.meta.clone(),
        body: &m.body,
        recipients: recipients.to_vec(),
        parts: parts.to_vec(),
        guard: m.guard,
    };
    serde_json::to_vec(&stored)
        .expect("a message always serializes")
        .into()
}

fn decode(seq: Seq, ts: f64, payload: &[u8]) -> Option<(Message, Routing)> {
    let s: Stored<Box<RawValue>> = match serde_json::from_slice(payload) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(seq, "skipping a log entry hermod did not write: {e}");
            return None;
        }
    };
    let body = Body::from_raw(&s.body).ok()?;
    let message = Message {
        seq,
        id: s.id,
        ts,
        channel: s.channel,
        from: s.from,
        to: s.to,
        topic: s.topic,
        sent_ts: s.sent_ts,
        auth: s.auth,
        meta: s.meta,
        body,
    };
    let routing = Routing {
        recipients: s.recipients,
        parts: s.parts,
        guard: s.guard,
    };
    Some((message, routing))
}

/// What a publish adds to its payload against `max_payload`: the
/// subject and the `Nats-Msg-Id` header.
const HEADROOM: usize = 1024;

/// Whether a payload fits in one entry under `max_payload`.
fn fits(payload: usize, max: usize) -> bool {
    payload + HEADROOM <= max
}

/// What a message goes into the stream as.
enum Entries {
    /// One entry, its recipient list in it.
    Whole(Bytes),
    /// Its recipient list in parts that each fit, published before the
    /// message (which then names their seqs).
    Parted(Vec<Bytes>),
}

impl Entries {
    /// Too large without its recipient list (or with none to split):
    /// `too_large`.
    fn of(m: &NewMessage, max: usize) -> Result<Self> {
        let whole = encode(m, &m.recipients, &[]);
        if fits(whole.len(), max) {
            return Ok(Entries::Whole(whole));
        }
        let mut parts = Vec::new();
        let (mut part, mut size) = (Vec::new(), 0);
        // `{"recipients":[...]}`: names need no escaping (see AgentName).
        let room = max.saturating_sub(HEADROOM + 32);
        for r in &m.recipients {
            let cost = r.as_str().len() + 3;
            if size + cost > room && !part.is_empty() {
                parts.push(std::mem::take(&mut part));
                size = 0;
            }
            part.push(r.clone());
            size += cost;
        }
        parts.push(part);
        // The message must fit with the part seqs it names (20 digits each).
        let bare = encode(m, &[], &[]).len();
        if m.recipients.is_empty() || !fits(bare + parts.len() * 21, max) {
            return Err(Error::TooLarge {
                size: whole.len(),
                limit: max,
            });
        }
        Ok(Entries::Parted(
            parts
                .into_iter()
                .map(|recipients| {
                    serde_json::to_vec(&Part { recipients })
                        .expect("names always serialize")
                        .into()
                })
                .collect(),
        ))
    }
}

/// An identity as stored in the state bucket (with its token's hash,
/// which [`Identity`] never serializes).
#[derive(Serialize, Deserialize)]
struct StoredIdentity {
    identity: Identity,
    token_hash: String,
}

fn storage<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| Error::Storage(format!("NATS: {what}: {e}"))
}

/// A JetStream time as float Unix seconds.
macro_rules! unix {
    ($t:expr) => {
        $t.unix_timestamp_nanos() as f64 / 1e9
    };
}

/// What a [`Inner::swap_state`] did, with the revision to wait for.
enum Written {
    Changed(u64),
    /// Left as it was, at this revision.
    Unchanged(u64),
}

impl Written {
    fn revision(&self) -> u64 {
        match *self {
            Written::Changed(r) | Written::Unchanged(r) => r,
        }
    }
}

/// How far the follower has handed a sequence (log seq or KV revision)
/// to the broker, and who waits for which.
#[derive(Default)]
struct Mark {
    /// The sequence reached, and the waiters by the sequence they wait for.
    inner: Mutex<(u64, Waiters)>,
}

type Waiters = BTreeMap<u64, Vec<oneshot::Sender<()>>>;

/// Where [`Inner::state_revision`] answers: the revision, or why not.
type RevisionWaiter = oneshot::Sender<std::result::Result<u64, String>>;

impl Mark {
    fn advance(&self, to: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.0 = inner.0.max(to);
        let later = inner.1.split_off(&(to + 1));
        let due = std::mem::replace(&mut inner.1, later);
        drop(inner);
        for tx in due.into_values().flatten() {
            let _ = tx.send(());
        }
    }

    /// Resolves once `at` went through the feed, or fails after
    /// [`FOLLOW_TIMEOUT`]: JetStream stored the write but this node's
    /// follower has not seen it (it cannot consume, or is far behind).
    async fn wait(&self, at: u64) -> Result<()> {
        let rx = {
            let mut inner = self.inner.lock().unwrap();
            if inner.0 >= at {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            inner.1.entry(at).or_default().push(tx);
            rx
        };
        match tokio::time::timeout(FOLLOW_TIMEOUT, rx).await {
            Ok(answer) => answer.map_err(|_| Error::ShuttingDown),
            // Stored, so not "nothing was stored": busy, retry-safe.
            Err(_) => Err(Error::StorageBusy(format!(
                "NATS stored the write (sequence {at}) but this node has not seen it in \
                 its log within {} s: is it allowed to consume the stream and the \
                 state bucket ($JS.API.CONSUMER.>, _INBOX.>)?",
                FOLLOW_TIMEOUT.as_secs()
            ))),
        }
    }
}

struct Inner {
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    state: kv::Store,
    cursors: kv::Store,
    /// The cursor bucket's stream, for reads from its leader: a direct get
    /// may be answered by a replica that lags.
    cursors_stream: stream::Stream,
    index: Mutex<Known>,
    /// See [`NatsConfig::tombstone_age`].
    tombstone_age: Duration,
    /// Log seqs the broker has taken off the feed.
    log_mark: Mark,
    /// State-bucket revisions the broker has taken off the feed.
    kv_mark: Mark,
    /// The state bucket's stream, asked for its newest revision.
    state_stream: stream::Stream,
    /// Callers of [`Inner::state_revision`] waiting for the next request;
    /// `None` while no request runs.
    revision_waiters: Mutex<Option<Vec<RevisionWaiter>>>,
    /// A prune step decided and applied to the index but not yet stored
    /// (its marks written and messages deleted): the next call finishes it
    /// first, so a failure midway never leaves this node apart.
    pending_prune: Mutex<Option<PruneStep>>,
    link: Arc<Link>,
    /// The largest message the servers take (their `max_payload`, read at
    /// connect: a cluster's servers share it).
    max_payload: usize,
    /// The stream's name (the buckets are named after it).
    name: String,
    /// This node among the nodes, in the cursor leases it takes (see
    /// [`NatsConfig::node`]).
    node: String,
    /// Cursor key → the revision of a value this node stored and whose
    /// `read` steps it recorded since (at most [`RECORDED_MAX`]): no need
    /// to record them again before the next move.
    recorded: Mutex<std::collections::HashMap<String, u64>>,
}

/// Cursors whose recorded steps [`Inner`] remembers (then it forgets all:
/// recording again is harmless, only slower).
const RECORDED_MAX: usize = 4096;

/// The connection's state, which the client's event callback keeps.
#[derive(Default)]
struct Link {
    /// Connected now (sends are refused while not).
    connected: AtomicBool,
    /// A write to the cursor bucket went through since the connection
    /// was (re)made (see [`Inner::stored_cursor`]).
    current: AtomicBool,
    /// Since when the connection is down (`None` while up).
    down_since: Mutex<Option<Instant>>,
    /// The connection was down for longer than
    /// [`NatsConfig::resync_after`]: the follower reads the whole state
    /// bucket again (see the `tombstones` module).
    resync: AtomicBool,
    health: Health,
}

/// See the crate docs.
pub struct NatsEngine {
    inner: Arc<Inner>,
    feed: Mutex<Option<Feed>>,
    follower: tokio::task::JoinHandle<()>,
}

impl NatsEngine {
    /// Connects, creates the stream and buckets if they are missing,
    /// rebuilds this node's index from them, and starts following.
    pub async fn open(config: NatsConfig) -> Result<Self> {
        // The name is also the subject prefix (lowercased) and part of
        // the bucket names, so it keeps to what all three accept.
        let name_ok = !config.stream.is_empty()
            && config
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(Error::InvalidRequest(format!(
                "NATS stream name {:?}: use letters, digits, `_` and `-`",
                config.stream
            )));
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::Storage(format!(
                "cannot reach NATS at {}: {e}",
                config.urls.join(",")
            ))
        };
        let link = Arc::new(Link::default());
        let events = link.clone();
        let resync_after = config.resync_after;
        let mut options = async_nats::ConnectOptions::new()
            .name("hermod")
            .connection_timeout(Duration::from_secs(3))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .event_callback(move |event| {
                let link = events.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("NATS connection back");
                            let down = link.down_since.lock().unwrap().take();
                            if down.is_some_and(|d| d.elapsed() > resync_after) {
                                link.resync.store(true, Ordering::SeqCst);
                            }
                            link.connected.store(true, Ordering::SeqCst);
                            link.health.clear();
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(
                                "NATS connection lost; sends are refused until it is back"
                            );
                            link.connected.store(false, Ordering::SeqCst);
                            link.current.store(false, Ordering::SeqCst);
                            link.down_since
                                .lock()
                                .unwrap()
                                .get_or_insert_with(Instant::now);
                            link.health.set_degraded(
                                "NATS unreachable: sends are refused until it is back",
                            );
                        }
                        other => tracing::info!("NATS: {other}"),
                    }
                }
            });
        if config.only_listed {
            options = options.ignore_discovered_servers();
        }
        if let Some(creds) = &config.creds {
            options = options.credentials_file(creds).await.map_err(|e| {
                Error::Storage(format!("NATS credentials {}: {e}", creds.display()))
            })?;
        }
        let urls: Vec<async_nats::ServerAddr> = config
            .urls
            .iter()
            .map(|u| u.parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Storage(format!("NATS URL: {e}")))?;
        // `nats://user:pass@host` or `nats://token@host`, as other NATS
        // clients take them (async-nats leaves a URL's user info unused).
        if let Some(user) = urls.iter().find_map(|u| u.username()) {
            let user = user.to_owned();
            let password = urls.iter().find_map(|u| u.password()).map(str::to_owned);
            options = match password {
                Some(password) => options.user_and_password(user, password),
                None => options.token(user),
            };
        }
        // Fail at start when nothing answers (or the login is refused):
        // reconnecting forever belongs to a running node, not to a typo in
        // the URL.
        let client = tokio::time::timeout(Duration::from_secs(10), options.connect(urls))
            .await
            .map_err(|_| unreachable(&"no server answered within 10 s"))?
            .map_err(|e| unreachable(&e))?;
        link.connected.store(true, Ordering::SeqCst);
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        let prefix = config.stream.to_ascii_lowercase();
        // A cluster that is just starting, or busy electing leaders, may
        // let these first requests time out: wait for it a while.
        let deadline = tokio::time::Instant::now() + SETUP_PATIENCE;
        let Setup {
            stream,
            state,
            cursors,
            cursors_stream,
            state_stream,
        } = loop {
            match Setup::open(&js, &config, &prefix).await {
                // (A server of a forming cluster not yet seen as a peer:
                // "no suitable peers for placement, peer offline".)
                Err(Error::Storage(e))
                    if ["timed out", "no responders", "peer offline"]
                        .iter()
                        .any(|transient| e.contains(transient))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::warn!("{e}; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                done => break done?,
            }
        };
        let inner = Arc::new(Inner {
            js,
            cursors_stream,
            stream,
            prefix,
            state,
            cursors,
            index: Mutex::new(Known::new(LogIndex::with_cache(config.cache_bytes))),
            tombstone_age: config.tombstone_age,
            log_mark: Mark::default(),
            kv_mark: Mark::default(),
            state_stream,
            revision_waiters: Mutex::default(),
            pending_prune: Mutex::default(),
            link,
            max_payload: client.server_info().max_payload,
            name: config.stream.clone(),
            node: config
                .node
                .clone()
                .filter(|n| {
                    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
                .unwrap_or_else(hermod_core::model::new_id),
            recorded: Default::default(),
        });

        let (watch, revision) = inner.load_state().await?;
        let (log, seq) = inner.load_log().await?;
        inner.log_mark.advance(seq);
        inner.kv_mark.advance(revision);
        let (feed_tx, feed) = mpsc::channel(FEED_CAPACITY);
        let follower = tokio::spawn(inner.clone().follow(log, watch, seq, revision, feed_tx));
        Ok(Self {
            inner,
            feed: Mutex::new(Some(feed)),
            follower,
        })
    }

    /// The stream, the server this node talks to and the stream's
    /// replicas, for `hermod status`.
    async fn info(&self) -> serde_json::Value {
        let mut stream = self.inner.stream.clone();
        // Bounded: `hermod status` must answer while NATS is away too.
        let info = tokio::time::timeout(Duration::from_secs(1), stream.info()).await;
        let info = info.ok().and_then(|i| i.ok().cloned());
        // Registry, floors, delivery steps: what every node replays at start.
        let mut state = self.inner.state_stream.clone();
        let state = tokio::time::timeout(Duration::from_secs(1), state.info()).await;
        let state = state.ok().and_then(|i| i.ok().map(|i| i.state.messages));
        let server = self.inner.js.client().server_info();
        serde_json::json!({
            "engine": "nats",
            "stream": self.inner.name,
            "connected": self.inner.link.connected.load(Ordering::SeqCst),
            "server": { "name": server.server_name, "version": server.version, "cluster": server.cluster },
            "messages": info.as_ref().map(|i| i.state.messages),
            "state_entries": state,
            "cluster": info.and_then(|i| i.cluster).map(|c| serde_json::json!({
                "name": c.name,
                "leader": c.leader,
                "replicas": c.replicas.iter().map(|r| serde_json::json!({
                    "name": r.name, "current": r.current, "offline": r.offline, "lag": r.lag,
                })).collect::<Vec<_>>(),
            })),
        })
    }
}

/// The stream and buckets a node works on, created where missing.
struct Setup {
    stream: stream::Stream,
    state: kv::Store,
    cursors: kv::Store,
    cursors_stream: stream::Stream,
    state_stream: stream::Stream,
}

impl Setup {
    async fn open(js: &jetstream::Context, config: &NatsConfig, prefix: &str) -> Result<Self> {
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                description: Some("hermod's message log".into()),
                subjects: vec![format!("{prefix}.>")],
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                allow_direct: true,
                duplicate_window: Duration::from_secs(120),
                persist_mode: Some(stream::PersistenceMode::Default),
                ..Default::default()
            })
            .await
            .map_err(storage("creating the log stream"))?;
        let open = |suffix, what| open_bucket(js, config, suffix, what);
        let state = open(
            "state",
            "hermod: agents, subscriptions, identities, pruned marks",
        )
        .await?;
        let cursors = open("cursors", "hermod: inbox cursors").await?;

        let cursors_stream = js
            .get_stream(format!("KV_{}_cursors", config.stream))
            .await
            .map_err(storage("the cursor bucket's stream"))?;
        let state_stream = js
            .get_stream(format!("KV_{}_state", config.stream))
            .await
            .map_err(storage("the state bucket's stream"))?;
        Ok(Self {
            stream,
            state,
            cursors,
            cursors_stream,
            state_stream,
        })
    }
}

/// The bucket `<stream>_<suffix>`, created (one revision per key) if missing.
async fn open_bucket(
    js: &jetstream::Context,
    config: &NatsConfig,
    suffix: &str,
    what: &str,
) -> Result<kv::Store> {
    let bucket = format!("{}_{suffix}", config.stream);
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket,
        description: what.into(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(storage("creating a KV bucket"))
}

type LogStream = consumer::pull::Ordered;

/// Whether one of the follower's subscriptions (the log consumer, the
/// state watch) still delivers.
struct Liveness {
    /// When it last delivered (or was made anew).
    heard: Instant,
    /// The `(applied, stored)` position it was last made anew at, and when.
    revived: Option<((u64, u64), Instant)>,
}

impl Liveness {
    fn new() -> Self {
        Self {
            heard: Instant::now(),
            revived: None,
        }
    }

    fn heard(&mut self) {
        self.heard = Instant::now();
    }

    /// `(applied, stored)` when the subscription has been silent for
    /// [`FOLLOW_CHECK`] while `stream` holds messages past `applied`, and
    /// was not made anew at this position in the last
    /// [`FOLLOW_REVIVE_AGAIN`]: the caller then makes it anew. `None` too
    /// when the stream cannot be asked now (the next check asks again).
    async fn stuck(&mut self, stream: &stream::Stream, applied: u64) -> Option<(u64, u64)> {
        if self.heard.elapsed() < FOLLOW_CHECK {
            return None;
        }
        let stored = stream.get_info().await.ok()?.state.last_sequence;
        let at = (applied, stored);
        let lately = self
            .revived
            .is_some_and(|(was, when)| was == at && when.elapsed() < FOLLOW_REVIVE_AGAIN);
        if stored <= applied || lately {
            return None;
        }
        self.revived = Some((at, Instant::now()));
        self.heard();
        Some(at)
    }
}

impl Inner {
    /// Reads the whole state bucket into the index; returns the watch (to
    /// go on following) and the newest revision applied.
    async fn load_state(&self) -> Result<(kv::Watch, u64)> {
        self.replay_state(|entry| {
            apply_entry(&mut self.index.lock().unwrap(), entry);
        })
        .await
    }

    /// Reads the whole state bucket, each entry into `apply`; returns the
    /// watch (to go on following) and the newest revision read.
    async fn replay_state(&self, mut apply: impl FnMut(&kv::Entry)) -> Result<(kv::Watch, u64)> {
        let status = self.state.status().await.map_err(storage("state bucket"))?;
        let target = status.info.state.last_sequence;
        let mut watch = self
            .state
            .watch_all_from_revision(1)
            .await
            .map_err(storage("watching the state bucket"))?;
        let mut revision = 0;
        while revision < target {
            let Some(entry) = watch.next().await else {
                break;
            };
            let entry = entry.map_err(storage("reading the state bucket"))?;
            revision = entry.revision;
            apply(&entry);
        }
        Ok((watch, revision))
    }

    /// Replays the log into the index; returns the ordered consumer (to go
    /// on following) and the newest seq applied.
    async fn load_log(&self) -> Result<(LogStream, Seq)> {
        let mut stream = self.stream.clone();
        let info = stream.info().await.map_err(storage("log stream"))?.clone();
        let last = info.state.last_sequence;
        let mut log = self.log_from(1).await?;
        let (mut seq, mut stalled) = (0, 0);
        if info.state.messages > 0 {
            loop {
                // The last message may be deleted after the info was read:
                // a bounded wait then a fresh look at the stream.
                let next = tokio::time::timeout(Duration::from_secs(2), log.next()).await;
                let Ok(next) = next else {
                    let info = stream.info().await.map_err(storage("log stream"))?;
                    if info.state.messages == 0 || info.state.last_sequence <= seq {
                        break;
                    }
                    stalled += 1;
                    if stalled == 15 {
                        return Err(Error::Storage(format!(
                            "NATS: the log stream holds messages up to {} but none came \
                             after {seq} for 30 s: may this user consume it \
                             ($JS.API.CONSUMER.>, _INBOX.>)?",
                            info.state.last_sequence
                        )));
                    }
                    continue;
                };
                stalled = 0;
                let Some(message) = next else { break };
                let message = message.map_err(storage("reading the log"))?;
                let Ok(meta) = message.info() else { continue };
                let pending = meta.pending;
                seq = meta.stream_sequence;
                apply_log(
                    &mut self.index.lock().unwrap(),
                    &self.prefix,
                    &message,
                    seq,
                    unix!(meta.published),
                );
                if pending == 0 || seq >= last {
                    break;
                }
            }
        }
        let mut index = self.index.lock().unwrap();
        // Seqs go on after the stream's last even if its newest were deleted.
        index.last.0 = index.last.0.max(last);
        Ok((log, seq.max(last)))
    }

    async fn log_from(&self, start: Seq) -> Result<LogStream> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(storage("following the log"))?;
        consumer
            .messages()
            .await
            .map_err(storage("following the log"))
    }

    /// The follower: turns the log and the state bucket into the feed, in
    /// the order this node sees them. Recreates either subscription from
    /// where it stopped if it ends.
    async fn follow(
        self: Arc<Self>,
        log: LogStream,
        watch: kv::Watch,
        mut seq: Seq,
        mut revision: u64,
        feed: mpsc::Sender<Commit>,
    ) {
        let mut log = Some(log.ready_chunks(256));
        let mut watch = Some(watch.ready_chunks(256));
        // The client recreates a subscription whose server stopped
        // answering only after missed heartbeats, and not always once the
        // server that held its consumer died: one that stayed silent for a
        // check period while its stream holds more than it delivered is
        // made anew here (at one position at most every
        // FOLLOW_REVIVE_AGAIN, so a deleted tail message that will never
        // arrive does not cause a loop).
        let mut check = tokio::time::interval(FOLLOW_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut log_live, mut watch_live) = (Liveness::new(), Liveness::new());
        loop {
            if log.is_none() {
                match self.log_from(seq + 1).await {
                    Ok(l) => log = Some(l.ready_chunks(256)),
                    Err(e) => {
                        tracing::warn!("{e}; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            if watch.is_none() {
                match self.state.watch_all_from_revision(revision + 1).await {
                    Ok(w) => watch = Some(w.ready_chunks(256)),
                    Err(e) => {
                        tracing::warn!("NATS: watching the state bucket: {e}; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let commit = tokio::select! {
                chunk = log.as_mut().unwrap().next() => match chunk {
                    None => { log = None; continue; }
                    Some(chunk) => {
                        log_live.heard();
                        self.log_commit(chunk, &mut seq)
                    }
                },
                chunk = watch.as_mut().unwrap().next() => match chunk {
                    None => { watch = None; continue; }
                    Some(chunk) => {
                        watch_live.heard();
                        self.state_commit(chunk, &mut revision)
                    }
                },
                _ = check.tick() => {
                    if self.link.resync.swap(false, Ordering::SeqCst) {
                        match self.resync_state().await {
                            Ok(changes) if changes.is_empty() => {}
                            Ok(changes) => {
                                let commit = Commit::new(Vec::new(), changes, || {});
                                if feed.send(commit).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!("NATS: reading the state bucket again: {e}; trying again");
                                self.link.resync.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    if let Some(at) = log_live.stuck(&self.stream, seq).await {
                        tracing::warn!("NATS: the log follower is silent at {at:?} (applied, stored): following the log anew");
                        log = None;
                    }
                    if let Some(at) = watch_live.stuck(&self.state_stream, revision).await {
                        tracing::warn!("NATS: the state bucket's watch is silent at {at:?} (applied, stored): watching it anew");
                        watch = None;
                    }
                    continue;
                }
            };
            if feed.send(commit).await.is_err() {
                return; // The broker is gone.
            }
        }
    }

    fn log_commit(
        self: &Arc<Self>,
        chunk: Vec<std::result::Result<jetstream::Message, consumer::pull::OrderedError>>,
        seq: &mut Seq,
    ) -> Commit {
        let mut messages = Vec::with_capacity(chunk.len());
        {
            let mut index = self.index.lock().unwrap();
            for m in chunk {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("NATS: following the log: {e}");
                        continue;
                    }
                };
                let Ok(meta) = m.info() else { continue };
                if meta.stream_sequence <= *seq {
                    continue;
                }
                *seq = meta.stream_sequence;
                let stamped = unix!(meta.published);
                if let Some(c) = apply_log(&mut index, &self.prefix, &m, *seq, stamped) {
                    messages.push(c);
                }
            }
        }
        let done = *seq;
        let inner = self.clone();
        Commit::new(messages, Vec::new(), move || inner.log_mark.advance(done))
    }

    fn state_commit(
        self: &Arc<Self>,
        chunk: Vec<std::result::Result<kv::Entry, kv::WatcherError>>,
        revision: &mut u64,
    ) -> Commit {
        let mut changes = Vec::new();
        {
            let mut index = self.index.lock().unwrap();
            for entry in chunk {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!("NATS: watching the state bucket: {e}");
                        continue;
                    }
                };
                if entry.revision <= *revision {
                    continue;
                }
                *revision = entry.revision;
                changes.extend(apply_entry(&mut index, &entry));
            }
        }
        let done = *revision;
        let inner = self.clone();
        Commit::new(Vec::new(), changes, move || inner.kv_mark.advance(done))
    }

    fn check_connected(&self) -> Result<()> {
        if self.link.connected.load(Ordering::SeqCst) {
            Ok(())
        } else {
            // Busy, not failed: the caller may retry once NATS is back.
            Err(Error::StorageBusy(
                "NATS unreachable: nothing was stored; retry once the bus is healthy".into(),
            ))
        }
    }

    /// The state bucket's newest revision, asked of its stream's leader by
    /// a request sent after this call began. Callers that arrive while a
    /// request runs share the next one, so a burst of sends costs a few
    /// requests, not one each; the request runs in its own task so that a
    /// caller that gives up never strands the others.
    async fn state_revision(self: &Arc<Self>) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiters = self.revision_waiters.lock().unwrap();
            match waiters.as_mut() {
                Some(queue) => {
                    queue.push(tx);
                    false
                }
                None => {
                    *waiters = Some(vec![tx]);
                    true
                }
            }
        };
        if first {
            tokio::spawn(self.clone().ask_state_revisions());
        }
        // Nothing was stored when this fails: the caller may retry.
        rx.await
            .map_err(|_| Error::ShuttingDown)?
            .map_err(Error::StorageBusy)
    }

    /// Answers the waiting callers, a request per round, until none wait.
    async fn ask_state_revisions(self: Arc<Self>) {
        loop {
            let round = {
                let mut waiters = self.revision_waiters.lock().unwrap();
                match waiters.as_mut().map(std::mem::take) {
                    Some(round) if !round.is_empty() => round,
                    _ => {
                        *waiters = None;
                        return;
                    }
                }
            };
            let answer = match self.state_stream.get_info().await {
                Ok(info) => Ok(info.state.last_sequence),
                Err(e) => Err(format!(
                    "NATS: asking the state bucket's newest revision before routing: {e}; \
                     nothing was stored, retry"
                )),
            };
            for tx in round {
                let _ = tx.send(answer.clone());
            }
        }
    }

    /// Writes `value` at `key` in the state bucket (an empty value is a
    /// tombstone) and resolves once the change went through the feed.
    async fn put_state(&self, key: String, value: Bytes) -> Result<()> {
        self.check_connected()?;
        let revision = self
            .state
            .put(&key, value)
            .await
            .map_err(storage("writing the state bucket"))?;
        self.kv_mark.wait(revision).await
    }

    /// Compare-and-set on a state entry: `f` turns the stored value (if
    /// any) into the one to store, or `None` to leave it.
    async fn swap_state(
        &self,
        key: &str,
        mut f: impl FnMut(Option<&[u8]>) -> Option<Bytes>,
    ) -> Result<Written> {
        self.check_connected()?;
        loop {
            let entry = kv_entry(&self.state, key, "reading the state bucket").await?;
            let current = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put && !e.value.is_empty());
            let Some(value) = f(current.map(|e| &e.value[..])) else {
                // Nothing to change, but what was read may be newer than
                // what this node applied: let the caller wait for it.
                return Ok(Written::Unchanged(entry.map_or(0, |e| e.revision)));
            };
            // Someone else wrote it first: look again.
            if let Some(revision) = cas(&self.state, key, value, entry.map(|e| e.revision)).await? {
                return Ok(Written::Changed(revision));
            }
        }
    }

    /// Raises a view's pruned mark to `seq` (never lowers it); the
    /// revision to wait for.
    async fn raise_floor(&self, key: String, seq: Seq) -> Result<u64> {
        let written = self
            .swap_state(&key, |stored| {
                let stored = stored
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<Seq>().ok())
                    .unwrap_or(0);
                (stored < seq).then(|| seq_bytes(seq))
            })
            .await?;
        Ok(written.revision())
    }

    /// Deletes messages from the stream; how many were still there.
    ///
    /// Without `no_erase` the server overwrites each message on disk
    /// before it answers (a secure erase): about 46 deletes a second on an
    /// R3 stream, so retention fell behind any real send rate. Nothing
    /// here asks for erasure: retention is about space, not secrecy.
    async fn delete(&self, seqs: Vec<Seq>) -> Result<u64> {
        #[derive(serde::Deserialize)]
        struct Deleted {
            #[serde(default)]
            success: bool,
            error: Option<serde_json::Value>,
        }
        let subject = format!("STREAM.MSG.DELETE.{}", self.name);
        futures::stream::iter(seqs)
            .map(|seq| {
                let subject = subject.clone();
                async move {
                    let request = serde_json::json!({ "seq": seq, "no_erase": true });
                    let answer: Deleted = self
                        .js
                        .request(subject, &request)
                        .await
                        .map_err(storage("deleting a message"))?;
                    match answer.error {
                        None => Ok(answer.success as u64),
                        // Another node removed it first.
                        Some(e) if e.to_string().contains("no message found") => Ok(0),
                        Some(e) => Err(Error::Storage(format!("NATS: deleting a message: {e}"))),
                    }
                }
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_fold(0, |n, d| async move { Ok(n + d) })
            .await
    }

    /// Removes every message below `seq` from the stream in one request
    /// (the stream keeps its sequence numbers); how many went.
    async fn purge_below(&self, seq: Seq) -> Result<u64> {
        let purged = self
            .stream
            .purge()
            .sequence(seq)
            .await
            .map_err(storage("purging the log"))?;
        Ok(purged.purged)
    }

    /// Removes delivery steps from the state bucket, markers and all
    /// (their messages are gone; every node dropped them from memory in
    /// its own prune). Purged, not deleted: a delete would leave a marker
    /// per step, and every node's start replays the bucket, so what a node
    /// reads at start follows what is retained. Idempotent: another node
    /// may purge them too.
    async fn purge_steps(&self, steps: Vec<Step>) -> Result<()> {
        let prefix = format!("$KV.{}_state.", self.name);
        futures::stream::iter(steps)
            .map(|step| {
                let subject = format!("{prefix}{}", keys::step_key(&step));
                async move {
                    self.state_stream
                        .purge()
                        .filter(subject)
                        .await
                        .map(|_| ())
                        .map_err(storage("purging delivery steps"))
                }
            })
            .buffer_unordered(STEP_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    /// Publishes the parts of a message's recipient list and waits until
    /// they are stored: their seqs, in order, for the message to name.
    /// Each part's `Nats-Msg-Id` follows from the message's, so a resent
    /// message finds its parts stored once too.
    async fn publish_parts(&self, m: &NewMessage, id: &str, parts: Vec<Bytes>) -> Result<Vec<Seq>> {
        let started = Instant::now();
        let subject = keys::part_subject(&self.prefix, &m.channel);
        let failed = storage("publishing a recipient list");
        let mut acks = Vec::with_capacity(parts.len());
        for (i, payload) in parts.into_iter().enumerate() {
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(format!("{id}.r{i}"));
            acks.push(
                self.js
                    .send_publish(subject.clone(), publish)
                    .await
                    .map_err(&failed)?,
            );
        }
        let mut seqs = Vec::with_capacity(acks.len());
        for ack in acks {
            seqs.push(ack.await.map_err(&failed)?.sequence);
        }
        // Every node drops a part whose message has not come after
        // PART_WAIT: a message published later would lose recipients.
        if started.elapsed() > log_index::PART_PATIENCE {
            return Err(Error::StorageBusy(
                "NATS: storing a long recipient list took too long; send the message again".into(),
            ));
        }
        Ok(seqs)
    }

    /// Fetches logged messages the cache no longer holds.
    async fn fetch(&self, seqs: Vec<Seq>) -> Result<Vec<Option<Arc<Message>>>> {
        futures::stream::iter(seqs)
            .map(|seq| async move {
                let m = match self.stream.direct_get(seq).await {
                    Ok(m) => m,
                    // A replica that lags answers "not found" for what it
                    // has not stored yet: only the leader's word counts.
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                        match self.stream.get_raw_message(seq).await {
                            Ok(m) => m,
                            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                                return Ok(None)
                            }
                            Err(e) => return Err(storage("reading the log")(&e)),
                        }
                    }
                    Err(e) => return Err(storage("reading the log")(&e)),
                };
                let ts = self
                    .index
                    .lock()
                    .unwrap()
                    .ts_of(seq)
                    .unwrap_or(unix!(m.time));
                Ok(decode(seq, ts, &m.payload).map(|(m, _)| Arc::new(m)))
            })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await
    }

    /// The cursor stored under `k` and its revision (`None`: never stored),
    /// read from the bucket's leader. A direct get may be answered by a
    /// replica that lags — one just restarted, say — and a node that has
    /// no newer value in memory (after its own restart) would hand out
    /// again what was read (the history checker's NATS run: a cursor a
    /// thousand messages back). While a leader is being elected the read
    /// is tried again for about 1.5 s, then answers `storage_busy`.
    async fn stored_cursor(&self, k: &str) -> Result<Option<(StoredCursor, u64)>> {
        self.catch_up().await?;
        let subject = format!("$KV.{}_cursors.{k}", self.name);
        let mut attempt = 0;
        loop {
            match self
                .cursors_stream
                .get_last_raw_message_by_subject(&subject)
                .await
            {
                Ok(m) => return Ok(Some((StoredCursor::parse(&m.payload), m.sequence))),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    return Ok(None)
                }
                Err(e) => {
                    attempt += 1;
                    if attempt == KV_READ_ATTEMPTS {
                        return Err(Error::StorageBusy(format!("NATS: reading a cursor: {e}")));
                    }
                    tokio::time::sleep(Duration::from_millis(50 << (attempt - 1))).await;
                }
            }
        }
    }

    /// Before the first cursor read of this process, and after the
    /// connection comes back: one write to the cursor bucket (this node's
    /// `barrier.{node}` key), so the leader that answers has applied
    /// everything committed before it. Without it, the history checker's
    /// NATS run saw a node just restarted read a cursor hundreds of moves
    /// old (the leader answering had not caught up), and its explicit-ack
    /// readers were handed acknowledged messages again.
    async fn catch_up(&self) -> Result<()> {
        if self.link.current.load(Ordering::Acquire) {
            return Ok(());
        }
        let key = format!("barrier.{}", self.node);
        let mut attempt = 0;
        loop {
            match self.cursors.put(&key, Bytes::from_static(b"1")).await {
                Ok(_) => {
                    self.link.current.store(true, Ordering::Release);
                    return Ok(());
                }
                Err(e) => {
                    attempt += 1;
                    if attempt == KV_READ_ATTEMPTS {
                        return Err(Error::StorageBusy(format!(
                            "NATS: the cursor bucket is not answering writes: {e}"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50 << (attempt - 1))).await;
                }
            }
        }
    }

    /// Compare-and-set of the cursor under `k`: `change` gets the stored
    /// value (if its seq is `expected` and no other node's live lease
    /// stands) and answers the new one; looked at again after a lost race.
    ///
    /// With `repair`, the `read` steps the stored value carries are
    /// recorded in the state bucket first unless this node knows they are
    /// (its own move, recorded since): a move replaces them, and a node
    /// killed between storing a move and recording its steps would
    /// otherwise lose them. Returns the steps that repair added, and the
    /// new value's revision.
    async fn swap_stored_cursor(
        &self,
        key: &InboxKey,
        expected: Seq,
        repair: bool,
        change: impl Fn(&StoredCursor) -> StoredCursor,
    ) -> Result<(Swap, Vec<Step>, u64)> {
        let k = keys::cursor_key(key);
        let mut repaired = Vec::new();
        loop {
            let current = self.stored_cursor(&k).await?;
            let stored = current.as_ref().map(|c| c.0.clone()).unwrap_or_default();
            if stored.seq != expected {
                return Ok((Swap::Lost(stored.seq), repaired, 0));
            }
            if stored.leased_by_another(&self.node) {
                return Ok((Swap::Leased, repaired, 0));
            }
            let revision = current.as_ref().map(|c| c.1);
            if repair && !stored.read.is_empty() && !self.recorded(&k, revision) {
                repaired.extend(self.record_steps(stored.read_steps(key)).await?);
            }
            let value = change(&stored).encode();
            if let Some(written) = cas(&self.cursors, &k, value, revision).await? {
                return Ok((Swap::Moved, repaired, written));
            }
        }
    }

    /// Whether this node recorded the steps of the cursor value `k` holds
    /// at `revision` (it stored them, and recorded them after).
    fn recorded(&self, k: &str, revision: Option<u64>) -> bool {
        revision.is_some() && self.recorded.lock().unwrap().get(k) == revision.as_ref()
    }

    /// Records `steps` in the state bucket (see [`Engine::record`]).
    async fn record_steps(&self, steps: Vec<Step>) -> Result<Vec<Step>> {
        self.check_connected()?;
        let added: Vec<(u64, Step)> = futures::stream::iter(steps)
            .map(|step| async move {
                let value = serde_json::to_vec(&step).expect("a step serializes");
                // A create: the first step of its kind stays.
                let written = cas(&self.state, &keys::step_key(&step), value.into(), None).await?;
                Ok::<_, Error>(written.map(|revision| (revision, step)))
            })
            .buffer_unordered(STEP_CONCURRENCY)
            .try_filter_map(|r| async move { Ok(r) })
            .try_collect()
            .await?;
        if let Some(&(revision, _)) = added.iter().max_by_key(|(r, _)| *r) {
            self.kv_mark.wait(revision).await?;
        }
        Ok(added.into_iter().map(|(_, step)| step).collect())
    }
}

/// A cursor as the cursor bucket stores it: `"{seq}"`, then the tagged
/// fields that apply — a node's lease over what follows
/// (`L{upto},{node},{until_ms}`, see [`Engine::lease_cursor`]) and the
/// `read` steps of the move that stored it (`R{lo},{hi},{ts},{door}`,
/// one per run). The steps ride in the same compare-and-set as the move,
/// so a node killed between the move and recording them in the state
/// bucket loses nothing: the next move of this cursor records them
/// first, and a step lookup reads them here meanwhile. A deleted or
/// purged key's marker has no payload: 0.
#[derive(Clone, Debug, Default, PartialEq)]
struct StoredCursor {
    seq: Seq,
    lease: Option<CursorLease>,
    /// `(lo, hi, ts, door)` of the `read` steps the last move stored.
    read: Vec<(Seq, Seq, f64, String)>,
}

#[derive(Clone, Debug, PartialEq)]
struct CursorLease {
    upto: Seq,
    node: String,
    /// Unix milliseconds, by the holder's clock.
    until: u64,
}

impl StoredCursor {
    fn parse(payload: &[u8]) -> StoredCursor {
        let text = std::str::from_utf8(payload).unwrap_or("");
        let mut parts = text.split(' ');
        let mut cursor = StoredCursor {
            seq: parts.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            ..Default::default()
        };
        for part in parts {
            let mut fields = part.get(1..).unwrap_or("").split(',');
            let mut next = || fields.next().unwrap_or("");
            match part.as_bytes().first() {
                Some(b'L') => {
                    let (upto, node, until) = (next().parse(), next().to_owned(), next().parse());
                    if let (Ok(upto), Ok(until)) = (upto, until) {
                        cursor.lease = Some(CursorLease { upto, node, until });
                    }
                }
                Some(b'R') => {
                    let (lo, hi, ts) = (next().parse(), next().parse(), next().parse());
                    if let (Ok(lo), Ok(hi), Ok(ts)) = (lo, hi, ts) {
                        cursor.read.push((lo, hi, ts, next().to_owned()));
                    }
                }
                _ => {}
            }
        }
        cursor
    }

    fn encode(&self) -> Bytes {
        use std::fmt::Write;
        let mut text = self.seq.to_string();
        if let Some(l) = &self.lease {
            let _ = write!(text, " L{},{},{}", l.upto, l.node, l.until);
        }
        for (lo, hi, ts, door) in &self.read {
            let _ = write!(text, " R{lo},{hi},{ts},{door}");
        }
        text.into()
    }

    /// Another node's lease stands (not lapsed by this node's clock).
    fn leased_by_another(&self, node: &str) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.node != node && l.upto > self.seq && l.until > unix_millis())
    }

    /// The `read` steps this value carries, as steps of `key`'s inbox.
    fn read_steps(&self, key: &InboxKey) -> Vec<Step> {
        self.read
            .iter()
            .map(|(lo, hi, ts, door)| Step {
                key: key.clone(),
                lo: *lo,
                hi: *hi,
                state: hermod_core::model::State::Read,
                ts: *ts,
                door: door.clone(),
                note: None,
            })
            .collect()
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Applies one log entry to the index; what the feed reports of it, if it
/// is one of hermod's messages.
fn apply_log(
    index: &mut LogIndex,
    prefix: &str,
    entry: &async_nats::Message,
    seq: Seq,
    stamped: f64,
) -> Option<Committed> {
    let payload = &entry.payload[..];
    if keys::is_part_subject(prefix, &entry.subject) {
        match serde_json::from_slice::<Part>(payload) {
            Ok(part) => index.append_part(seq, stamped, part.recipients),
            Err(_) => index.skip(seq),
        }
        return None;
    }
    let ts = index.next_ts(stamped);
    let Some((message, routing)) = decode(seq, ts, payload) else {
        index.skip(seq);
        return None;
    };
    let message = Arc::new(message);
    let guard = routing.guard;
    let recipients =
        index.append_with_parts(message.clone(), routing.recipients, guard, &routing.parts);
    Some(Committed {
        message,
        recipients,
        guard,
    })
}

/// Applies one state-bucket entry to the index; the change it makes.
fn apply_entry(index: &mut Known, entry: &kv::Entry) -> Option<Change> {
    let value = (entry.operation == kv::Operation::Put && !entry.value.is_empty())
        .then_some(&entry.value[..]);
    let seq = || value.and_then(|v| std::str::from_utf8(v).ok()?.parse::<Seq>().ok());
    let tombstone = |epoch| Tombstone {
        key: entry.key.clone(),
        revision: entry.revision,
        created: unix!(entry.created),
        epoch,
    };
    let key = StateKey::parse(&entry.key)?;
    match &key {
        StateKey::Agent(_) | StateKey::Subscription(..) if value.is_none() => {
            index.tombstones.push_back(tombstone(None));
        }
        StateKey::Epoch(_) => index.tombstones.push_back(tombstone(Some(seq()?))),
        _ => {}
    }
    match key {
        StateKey::Agent(key) => {
            match value.and_then(|v| serde_json::from_slice::<AgentEntry>(v).ok()) {
                Some(a) => {
                    index.agents.insert(key.clone(), a);
                    Some(Change::Agent {
                        key,
                        seen: a.last_seen,
                        connected: a.connected,
                    })
                }
                None => index.agents.remove(&key).map(|_| Change::Forgotten(key)),
            }
        }
        StateKey::Subscription(key, pattern) => {
            let on = value.is_some();
            let entry = (key.clone(), pattern.clone());
            if on {
                index.subscriptions.insert(entry);
            } else {
                index.subscriptions.remove(&entry);
            }
            Some(Change::Subscription { key, pattern, on })
        }
        StateKey::Identity(name) => {
            let identity = value
                .and_then(|v| serde_json::from_slice::<StoredIdentity>(v).ok())
                .map(|s| Identity {
                    token_hash: s.token_hash,
                    ..s.identity
                });
            match &identity {
                Some(i) => index.identities.insert(name.clone(), i.clone()),
                None => index.identities.remove(&name),
            };
            Some(Change::Identity { name, identity })
        }
        StateKey::Floor(view) => {
            let seq = seq()?;
            index.apply_floor(view.clone(), seq);
            // Reported even when this node moved it already (it pruned).
            (index.floor(&view) == seq).then_some(Change::Floor(view, seq))
        }
        StateKey::Epoch(key) => {
            index.apply_epoch(key, seq()?);
            None
        }
        StateKey::Step => {
            let step: Step = serde_json::from_slice(value?).ok()?;
            let at = (step.key.clone(), step.state, step.hi);
            index.steps.insert(at, step.clone());
            Some(Change::Step(step))
        }
    }
}

/// Stores `value` at `key` only if the entry is still at `revision`
/// (`None`: absent or deleted); the revision written, or `None` when
/// someone else wrote first.
async fn cas(
    store: &kv::Store,
    key: &str,
    value: Bytes,
    revision: Option<u64>,
) -> Result<Option<u64>> {
    let fail = |e: &dyn std::fmt::Display| Error::Storage(format!("NATS: writing a KV entry: {e}"));
    match revision {
        Some(r) => match store.update(key, value, r).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost(&e) => Ok(None),
            Err(e) => Err(fail(&e)),
        },
        None => match store.create(key, value).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists || lost(&e) => Ok(None),
            Err(e) => Err(fail(&e)),
        },
    }
}

/// A compare-and-set lost to another writer. Servers since 2.12 answer a
/// stale expected sequence with error code 10164, which the client does
/// not map to its `WrongLastRevision` kind, so the text decides too.
fn lost(e: &dyn std::fmt::Display) -> bool {
    e.to_string().contains("wrong last sequence")
}

/// Reads of a KV entry tried while JetStream answers "no responders".
const KV_READ_ATTEMPTS: u32 = 6;

/// Reads a KV entry, trying again while JetStream answers "no responders"
/// (its API is swamped, or the bucket's leader is being elected): at most
/// about 1.5 s, then the caller hears `storage_busy` (retry), not a store
/// failure.
async fn kv_entry(store: &kv::Store, key: &str, what: &'static str) -> Result<Option<kv::Entry>> {
    let mut attempt = 0;
    loop {
        match store.entry(key).await {
            Ok(entry) => return Ok(entry),
            Err(e) if e.to_string().contains("no responders") => {
                attempt += 1;
                if attempt == KV_READ_ATTEMPTS {
                    return Err(Error::StorageBusy(format!("NATS: {what}: {e}")));
                }
                tokio::time::sleep(Duration::from_millis(50 << (attempt - 1))).await;
            }
            Err(e) => return Err(storage(what)(e)),
        }
    }
}

fn seq_bytes(seq: Seq) -> Bytes {
    seq.to_string().into()
}

impl NatsEngine {
    /// The messages at `seqs`, from the cache or the stream (`None`: gone).
    async fn messages(&self, seqs: Vec<Seq>) -> Result<Vec<Option<Arc<Message>>>> {
        let cached: Vec<Option<Arc<Message>>> = {
            let index = self.inner.index.lock().unwrap();
            seqs.iter().map(|&s| index.cached(s)).collect()
        };
        let missing: Vec<Seq> = seqs
            .iter()
            .zip(&cached)
            .filter(|(_, m)| m.is_none())
            .map(|(s, _)| *s)
            .collect();
        let mut fetched = self.inner.fetch(missing).await?.into_iter();
        Ok(cached
            .into_iter()
            .map(|m| m.or_else(|| fetched.next().flatten()))
            .collect())
    }
}

#[async_trait]
impl Engine for NatsEngine {
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable> {
        let inner = self.inner.clone();
        inner.check_connected()?;
        // Each message is handed to the connection here, in order, so
        // batches submitted from one task keep their order in the stream;
        // the acknowledgements are awaited in the background.
        let mut acks = Vec::with_capacity(batch.len());
        // Nothing of a batch goes out unless all of it fits: a refusal
        // halfway would leave part of it stored behind an error.
        let planned = batch
            .iter()
            .map(|m| Entries::of(m, inner.max_payload))
            .collect::<Result<Vec<_>>>()?;
        for (m, plan) in batch.iter().zip(planned) {
            let id = msg_id(m);
            let payload = match plan {
                Entries::Whole(whole) => whole,
                Entries::Parted(parts) => match inner.publish_parts(m, &id, parts).await {
                    Ok(seqs) => encode(m, &[], &seqs),
                    Err(e) if acks.is_empty() => return Err(e),
                    Err(e) => return Err(unknown_outcome(e)),
                },
            };
            let subject =
                keys::message_subject(&inner.prefix, &m.channel, m.to.as_ref(), m.topic.as_deref());
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(id);
            // The first failure is "nothing was stored"; after it, part of
            // the batch went out.
            let sent = inner
                .js
                .send_publish(subject, publish)
                .await
                .map_err(storage("publishing"));
            let ack = match sent {
                Ok(ack) => ack,
                Err(e) if acks.is_empty() => return Err(e),
                Err(e) => return Err(unknown_outcome(e)),
            };
            acks.push(ack);
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let stored: Result<Vec<Arc<Message>>> = async {
                let mut seqs = Vec::with_capacity(acks.len());
                for ack in acks {
                    // A lost acknowledgement is an unknown outcome, never
                    // published again here: later messages (of this batch,
                    // or this task's next submits) may be stored already, and
                    // a copy landing behind them would break their order
                    // (the history checker's NATS run: a pipelining sender's
                    // messages stored out of order). The caller hears
                    // `storage_busy`; a retry with the same id is stored once.
                    let seq = ack.await.map_err(storage("publishing"))?.sequence;
                    seqs.push(seq);
                }
                inner.link.health.clear();
                let newest = seqs.iter().copied().max().unwrap_or(0);
                inner.log_mark.wait(newest).await?;
                // Answered from the cache (which every applied message
                // passes through), else from the stream.
                let cached: Vec<Option<Arc<Message>>> = {
                    let index = inner.index.lock().unwrap();
                    seqs.iter().map(|&s| index.cached(s)).collect()
                };
                let missing = seqs.iter().zip(&cached).filter(|(_, m)| m.is_none());
                let missing = missing.map(|(&s, _)| s).collect();
                let mut fetched = inner.fetch(missing).await?.into_iter();
                // One answer per message, in order: a caller pairs them up
                // (a pipelining client pairs its receipts by position). A
                // message the stream acknowledged but this node cannot read
                // back (retention took it already, or a server that has not
                // caught up answered the read) is an unknown outcome: a
                // retry with the same id is stored once and answered then.
                cached
                    .into_iter()
                    .zip(&seqs)
                    .map(|(m, seq)| {
                        m.or_else(|| fetched.next().flatten()).ok_or_else(|| {
                            Error::StorageBusy(format!(
                                "NATS: stored as seq {seq}, but not read back yet; send it again with the same id"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            }
            .await
            .map_err(unknown_outcome);
            if let Err(e) = &stored {
                inner.link.health.set_degraded(e.to_string());
            }
            let _ = tx.send(stored);
        });
        Ok(rx)
    }

    /// A message the index lists but the log no longer holds was removed
    /// while this read ran (retention, a forget): its mark is written
    /// before the message goes, so the read waits until this node applied
    /// the state bucket as of now and reads again. If the log still lacks
    /// a message no mark accounts for, its answer is not trusted
    /// (`storage_busy`): taken for a gap, a destructive reader would claim
    /// over messages it never handed out (the history checker's NATS run,
    /// while servers were killed: read by `/poll`, handed out by nobody).
    async fn read(&self, view: &View, after: Seq, limit: usize) -> Result<Page> {
        let mut synced = false;
        loop {
            let (seqs, pruned) = self.inner.index.lock().unwrap().seqs(view, after, limit);
            let missing: Vec<Seq> = seqs
                .iter()
                .filter(|(_, m)| m.is_none())
                .map(|(s, _)| *s)
                .collect();
            let mut fetched = self.inner.fetch(missing).await?.into_iter();
            let mut messages = Vec::with_capacity(seqs.len());
            let mut gone = None;
            for (seq, m) in seqs {
                match m.or_else(|| fetched.next().flatten()) {
                    Some(m) => messages.push(m),
                    None => gone = Some(seq),
                }
            }
            let Some(gone) = gone else {
                return Ok(Page { messages, pruned });
            };
            if synced {
                return Err(Error::StorageBusy(format!(
                    "NATS: the log did not answer message {gone}, which no retention mark \
                     accounts for; try again"
                )));
            }
            self.sync_state().await?;
            synced = true;
        }
    }

    async fn floors(&self) -> Result<Vec<(View, Seq)>> {
        Ok(self.inner.index.lock().unwrap().floors())
    }

    async fn prune(&self, rules: &Retention, now: f64) -> Result<Pruned> {
        let inner = &self.inner;
        inner.check_connected()?;
        let mut stream = inner.stream.clone();
        let first = stream
            .info()
            .await
            .map_err(storage("log stream"))?
            .state
            .first_sequence;
        let pending = inner.pending_prune.lock().unwrap().take();
        let step = match pending {
            Some(step) => step,
            None => inner.index.lock().unwrap().prune(rules, now, first),
        };
        let more = step.more;
        // Kept until stored: on an error the next call redoes it (both the
        // marks and the deletes are idempotent).
        *inner.pending_prune.lock().unwrap() = Some(step.clone());
        // Marks first, then the messages: a reader that finds a message
        // gone can count on its mark being on the way.
        // Marks of different views are independent entries, so they are
        // written side by side: a broadcast's removal moves one per
        // recipient (60,000 one after another took 165 s on one server).
        let marks: Vec<(String, Seq)> = step
            .floors
            .iter()
            .map(|(view, seq)| (keys::floor_key(view), *seq))
            .collect();
        let newest = futures::stream::iter(marks)
            .map(|(key, seq)| inner.raise_floor(key, seq))
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_fold(0, |newest, r| async move { Ok(newest.max(r)) })
            .await?;
        // Whatever is below the oldest message the index still holds goes
        // in one purge (retention mostly removes the oldest); the rest one
        // by one.
        let mut removed = 0;
        if step.kept_from > first {
            removed += inner.purge_below(step.kept_from).await?;
        }
        let rest = step.delete.into_iter().filter(|&s| s >= step.kept_from);
        removed += inner.delete(rest.collect()).await?;
        inner.purge_steps(step.steps).await?;
        inner.purge_tombstones(now, step.kept_from).await?;
        inner.pending_prune.lock().unwrap().take();
        inner.kv_mark.wait(newest).await?;
        Ok(Pruned { removed, more })
    }

    async fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
        Ok(self.inner.index.lock().unwrap().seq_at_ts(ts))
    }

    async fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        Ok(self.inner.index.lock().unwrap().count_inbox(key, after))
    }

    async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        let stored = self.inner.stored_cursor(&keys::cursor_key(key)).await?;
        Ok(stored.map_or(0, |(cursor, _)| cursor.seq))
    }

    async fn swap_cursor(
        &self,
        key: InboxKey,
        expected: Seq,
        new: Seq,
        steps: Vec<Step>,
    ) -> Result<(Swap, Vec<Step>)> {
        let inner = &self.inner;
        inner.check_connected()?;
        // This node's lease stays while it reaches past the move (other
        // batches of its streams are still out); another's lapsed one goes.
        // The move's steps ride in the value (see `StoredCursor`).
        let read: Vec<_> = steps
            .iter()
            .map(|s| (s.lo, s.hi, s.ts, s.door.clone()))
            .collect();
        let (swap, mut added, revision) = inner
            .swap_stored_cursor(&key, expected, true, |stored| StoredCursor {
                seq: new,
                lease: stored
                    .lease
                    .clone()
                    .filter(|l| l.node == inner.node && l.upto > new),
                read: read.clone(),
            })
            .await?;
        if swap != Swap::Moved {
            return Ok((swap, added));
        }
        // Then in the state bucket, where step lookups find them; until
        // they are there (a kill right now), the value has them.
        match inner.record_steps(steps).await {
            Ok(mut steps) => {
                added.append(&mut steps);
                let mut recorded = inner.recorded.lock().unwrap();
                if recorded.len() >= RECORDED_MAX {
                    recorded.clear();
                }
                recorded.insert(keys::cursor_key(&key), revision);
            }
            Err(e) => {
                tracing::warn!(error = %e, "recording read steps after a cursor move failed; the next move records them");
            }
        }
        Ok((Swap::Moved, added))
    }

    async fn lease_cursor(&self, key: InboxKey, expected: Seq, upto: Seq) -> Result<Swap> {
        let inner = &self.inner;
        inner.check_connected()?;
        let until = unix_millis() + hermod_core::engine::LEASE.as_millis() as u64;
        let (swap, ..) = inner
            .swap_stored_cursor(&key, expected, false, |stored| StoredCursor {
                seq: expected,
                lease: (upto > expected).then(|| CursorLease {
                    upto,
                    node: inner.node.clone(),
                    until,
                }),
                read: stored.read.clone(),
            })
            .await?;
        Ok(swap)
    }

    async fn remember_agent(&self, key: InboxKey, seen: f64, connected: bool) -> Result<()> {
        let written = self
            .inner
            .swap_state(&keys::agent_key(&key), |stored| {
                let mut a = stored
                    .and_then(|v| serde_json::from_slice::<AgentEntry>(v).ok())
                    .unwrap_or(AgentEntry {
                        first_seen: seen,
                        last_seen: seen,
                        connected,
                    });
                let before = (a.last_seen, a.connected);
                a.last_seen = a.last_seen.max(seen);
                a.connected |= connected;
                let fresh = stored.is_none();
                (fresh || before != (a.last_seen, a.connected))
                    .then(|| serde_json::to_vec(&a).unwrap().into())
            })
            .await?;
        self.inner.kv_mark.wait(written.revision()).await
    }

    async fn forget_agent(&self, key: InboxKey) -> Result<bool> {
        let inner = &self.inner;
        let (known, held, patterns, last) = {
            let index = inner.index.lock().unwrap();
            let patterns: Vec<String> = index
                .subscriptions
                .iter()
                .filter(|(k, _)| k == &key)
                .map(|(_, p)| p.clone())
                .collect();
            (
                index.agents.contains_key(&key),
                index.held_only_by(&key),
                patterns,
                index.last.0,
            )
        };
        // Up to the stream's newest, not only what this node applied yet:
        // another node may have acknowledged more to this inbox already.
        let mut stream = inner.stream.clone();
        let last = stream
            .info()
            .await
            .map_err(storage("log stream"))?
            .state
            .last_sequence
            .max(last);
        // Something of it is left (an entry, a subscription, a pruned mark
        // a reader would be told of as a gap): forget that too.
        let left = {
            let index = inner.index.lock().unwrap();
            index.holds(&key) || index.floor(&View::Inbox(key.clone())) > 0
        };
        if !(known || left || !patterns.is_empty()) {
            return Ok(false);
        }
        // The inbox first (its entries up to now are no longer its own),
        // then its subscriptions and cursor, and the registry entry last:
        // once the broker hears it was forgotten, nothing of it is left.
        inner
            .put_state(keys::epoch_key(&key), seq_bytes(last))
            .await?;
        for p in patterns {
            inner
                .put_state(keys::subscription_key(&key, &p), Bytes::new())
                .await?;
        }
        inner
            .cursors
            .put(keys::cursor_key(&key), seq_bytes(0))
            .await
            .map_err(storage("resetting a cursor"))?;
        if known {
            inner.put_state(keys::agent_key(&key), Bytes::new()).await?;
        }
        // What only this inbox held leaves the stream too (every node has
        // dropped it from its index with the epoch).
        inner.delete(held).await?;
        Ok(known)
    }

    async fn expire_agents(&self, before: f64, limit: usize) -> Result<Vec<InboxKey>> {
        let inner = &self.inner;
        // "Holds nothing" is this node's view: only trust it once it has
        // applied the whole stream (else try again next time).
        let mut stream = inner.stream.clone();
        let newest = stream
            .info()
            .await
            .map_err(storage("log stream"))?
            .state
            .last_sequence;
        if inner.index.lock().unwrap().last.0 < newest {
            return Ok(Vec::new());
        }
        let due: Vec<InboxKey> = {
            let index = inner.index.lock().unwrap();
            index
                .agents
                .iter()
                .filter(|(k, a)| {
                    !a.connected
                        && a.first_seen < before
                        && !index.holds(k)
                        && !index.subscriptions.iter().any(|(s, _)| s == *k)
                })
                .take(limit)
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut gone = Vec::with_capacity(due.len());
        let mut newest = 0;
        for key in due {
            // Only if it still never connected (another node may have just
            // seen it connect).
            let written = inner
                .swap_state(&keys::agent_key(&key), |stored| {
                    let a = stored.and_then(|v| serde_json::from_slice::<AgentEntry>(v).ok())?;
                    (!a.connected && a.first_seen < before).then(Bytes::new)
                })
                .await?;
            newest = newest.max(written.revision());
            if let Written::Changed(_) = written {
                gone.push(key);
            }
        }
        inner.kv_mark.wait(newest).await?;
        Ok(gone)
    }

    async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()> {
        let value = if on {
            Bytes::from_static(b"1")
        } else {
            Bytes::new()
        };
        self.inner
            .put_state(keys::subscription_key(&key, &pattern), value)
            .await
    }

    async fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>> {
        let index = self.inner.index.lock().unwrap();
        Ok(index.subscriptions.iter().cloned().collect())
    }

    async fn set_identity(&self, name: AgentName, identity: Option<Identity>) -> Result<()> {
        let value = match identity {
            Some(identity) => {
                let token_hash = identity.token_hash.clone();
                serde_json::to_vec(&StoredIdentity {
                    identity,
                    token_hash,
                })
                .expect("an identity always serializes")
                .into()
            }
            None => Bytes::new(),
        };
        self.inner.put_state(keys::identity_key(&name), value).await
    }

    async fn identities(&self) -> Result<Vec<Identity>> {
        let index = self.inner.index.lock().unwrap();
        Ok(index.identities.values().cloned().collect())
    }

    async fn agents(&self) -> Result<Vec<KnownAgent>> {
        Ok(self.inner.index.lock().unwrap().agents())
    }

    fn shares_cursors(&self) -> bool {
        true
    }

    async fn last(&self) -> Result<(Seq, f64)> {
        Ok(self.inner.index.lock().unwrap().last)
    }

    async fn record(&self, steps: Vec<Step>) -> Result<Vec<Step>> {
        self.inner.record_steps(steps).await
    }

    async fn steps(&self, key: &InboxKey, seq: Seq) -> Result<Vec<Step>> {
        let mut steps = self.inner.index.lock().unwrap().steps_of(key, seq);
        if steps.is_empty() {
            // Nothing on record (yet): the last move of the cursor may carry
            // its `read` step. (A message with any step, a bounced one say,
            // is not looked up again here on every sweep.)
            if let Some((cursor, _)) = self.inner.stored_cursor(&keys::cursor_key(key)).await? {
                steps.extend(cursor.read_steps(key).into_iter().filter(|s| s.covers(seq)));
            }
        }
        Ok(steps)
    }

    async fn held(&self, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>> {
        let seqs = self.inner.index.lock().unwrap().held(after, limit);
        Ok(self.messages(seqs).await?.into_iter().flatten().collect())
    }

    async fn find(&self, id: &str, limit: usize) -> Result<Vec<Committed>> {
        let found = self.inner.index.lock().unwrap().with_id(id, limit);
        let seqs = found.iter().map(|(s, ..)| *s).collect();
        let messages = self.messages(seqs).await?;
        Ok(messages
            .into_iter()
            .zip(found)
            .filter_map(|(m, (_, recipients, guard))| {
                Some(Committed {
                    message: m?,
                    recipients,
                    guard,
                })
            })
            .collect())
    }

    async fn thread(&self, thread: &str, limit: usize) -> Result<Vec<Arc<Message>>> {
        let seqs = self.inner.index.lock().unwrap().in_thread(thread, limit);
        Ok(self.messages(seqs).await?.into_iter().flatten().collect())
    }

    fn health(&self) -> &Health {
        &self.inner.link.health
    }

    async fn describe(&self) -> serde_json::Value {
        self.info().await
    }

    fn feed(&self) -> Option<Feed> {
        self.feed.lock().unwrap().take()
    }

    /// Other nodes change the state bucket too: wait until this node has
    /// applied its newest revision as of now.
    async fn sync_state(&self) -> Result<()> {
        self.inner.check_connected()?;
        let revision = self.inner.state_revision().await?;
        self.inner.kv_mark.wait(revision).await
    }

    /// Other nodes stamp too: never settled (see the engine docs).
    fn settled(&self) -> bool {
        false
    }

    async fn close(&self) {
        self.inner.js.client().flush().await.ok();
        self.follower.abort();
    }
}

impl Drop for NatsEngine {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_cursor_reads_back_with_its_lease_and_steps_and_older_values_still_parse() {
        let leased = StoredCursor {
            seq: 40,
            lease: Some(CursorLease {
                upto: 90,
                node: "n1".into(),
                until: unix_millis() + 5_000,
            }),
            read: vec![(30, 35, 1.5, "poll".into()), (35, 40, 1.25, "sse".into())],
        };
        assert_eq!(StoredCursor::parse(&leased.encode()), leased);
        assert!(leased.leased_by_another("n2"));
        assert!(!leased.leased_by_another("n1"), "a node's own lease");
        let key = InboxKey::new(
            Default::default(),
            hermod_core::model::AgentName::parse("ivy").unwrap(),
        );
        let steps = leased.read_steps(&key);
        assert_eq!(
            (steps[1].lo, steps[1].hi, steps[1].door.as_str()),
            (35, 40, "sse")
        );
        assert!(steps[0].covers(31) && !steps[0].covers(36));
        // Written before leases, and a deleted key's empty marker.
        let plain = StoredCursor {
            seq: 17,
            ..Default::default()
        };
        assert_eq!(StoredCursor::parse(b"17"), plain);
        assert_eq!(plain.encode(), Bytes::from("17"));
        assert_eq!(StoredCursor::parse(b""), StoredCursor::default());
        // Lapsed, or covered by the cursor: nobody's.
        let mut lapsed = leased.clone();
        lapsed.lease.as_mut().unwrap().until = unix_millis() - 1;
        assert!(!lapsed.leased_by_another("n2"));
        let covered = StoredCursor { seq: 90, ..leased };
        assert!(!covered.leased_by_another("n2"));
    }
}
