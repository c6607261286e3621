//! The embedded engine: one SQLite database in WAL mode.
//!
//! One writer thread owns the write connection and does **group commit**: it
//! blocks for one queued operation, drains whatever else is queued (up to
//! [`MAX_BATCH`]), applies all of it in one transaction and commits once —
//! one fsync (`synchronous=FULL`) for the whole batch — then reports the
//! batch to the feed, whose follower completes every sender. No timer is involved:
//! under light load a batch is one message, under heavy load batches grow.
//!
//! Readers use a small pool of read-only connections on blocking threads;
//! WAL lets them run alongside the writer. A read takes its turn (one of
//! [`READERS`] permits) before it takes a thread, so a burst of readers
//! waits as tasks, not as blocking threads each opening a connection of
//! its own: 10,000 `/subscribe` streams opening 256 at a time grew the
//! daemon to 186 threads.
//!
//! The writer's queue is bounded twice: by operations ([`QUEUE`]) and by
//! the bytes of the messages waiting in it ([`QUEUE_BYTES`]), since one
//! append may carry 10 MiB. A send that finds no room waits up to
//! [`QUEUE_WAIT`] and is then answered `storage_busy` (nothing was stored:
//! the caller may retry).
//!
//! Failure is loud and loses nothing acknowledged. A failed transaction is
//! rolled back and every operation in it is answered with the error, so
//! no cursor, registry or subscription change is reported as done unless
//! it is on disk. A full disk or an I/O error marks the store degraded
//! ([`Health`]) until a write succeeds again; while degraded a probe write
//! runs every second, so health recovers by itself when space returns.
//! Another process holding the write lock costs at most [`BUSY_WAIT`] per
//! batch, answered with `storage_busy`. An fsync failure stops all writes
//! for good (the kernel may have dropped the dirty pages it could not
//! write, so what SQLite believes is on disk can no longer be trusted —
//! the PostgreSQL "fsyncgate" lesson); a restart re-reads the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{
    Change, Commit, Committed, Durable, Engine, Feed, Health, KnownAgent, Page, Pruned, Retention,
    Step, Swap, View, FEED_CAPACITY, PRUNE_BUDGET, STEP_PROBE,
};
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::model::{
    AgentName, Auth, Body, BusClock, Channel, Guarded, InboxKey, Message, NewMessage, Seq, State,
};

/// Most queued operations applied in one transaction.
pub const MAX_BATCH: usize = 4096;
/// Capacity of the writer's queue; senders wait when it is full.
const QUEUE: usize = 8192;
/// Bytes of messages queued for the writer at most (an append larger than
/// this alone waits for an empty queue).
pub const QUEUE_BYTES: usize = 64 << 20;
/// Longest a send waits for room in the writer's queue before it is
/// answered `storage_busy`.
pub const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Rows of a kind a prune step deletes at least while messages come in;
/// at most twice as many as the newest commit stored (up to
/// [`PRUNE_BUDGET`], all of which a step takes once no message was
/// stored for [`PRUNE_QUIET`]). Steps follow each other about once per
/// commit, so pruning keeps pace with what comes in, and a step costs a
/// busy commit about what its sends cost: 512 contiguous rows dirtied
/// some 35 pages, and the per-inbox rule ran about 13 such steps back to
/// back every second of the soak (p99 8–10 ms; 2.8–3.3 ms with steps of
/// 16).
const PRUNE_LEAST: usize = 16;
/// See [`PRUNE_LEAST`].
const PRUNE_QUIET: Duration = Duration::from_millis(100);
/// Inboxes one prune step checks against the per-inbox count.
const PRUNE_INBOXES: usize = 32;
/// Read connections kept open.
const READERS: usize = 4;
/// Longest wait for a database lock held by another process.
pub const BUSY_WAIT: Duration = Duration::from_secs(1);
/// How often a degraded store probes whether writes work again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq       INTEGER PRIMARY KEY,
    id        TEXT NOT NULL,
    ts        REAL NOT NULL,
    channel   TEXT NOT NULL,
    sender    TEXT NOT NULL,
    recipient TEXT,
    topic     TEXT,
    sent_ts   REAL,
    body      TEXT NOT NULL,
    auth      TEXT,
    -- Inbox rows that point here; the row goes when the last one does
    -- (NULL in rows of older versions: those go by age or size only).
    refs      INTEGER
);
-- The inbox index: which inboxes each message landed in.
CREATE TABLE IF NOT EXISTS inbox (
    channel TEXT NOT NULL,
    agent   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (channel, agent, seq)
) WITHOUT ROWID;
-- Inbox rows by seq, for pruning the oldest messages.
CREATE INDEX IF NOT EXISTS inbox_seq ON inbox(seq);
-- How far retention pruned each view ('i' inbox of channel/agent, 't'
-- topic events of channel with agent ''): a reader starting before it
-- is told it missed messages.
CREATE TABLE IF NOT EXISTS floors (
    kind    TEXT NOT NULL,
    channel TEXT NOT NULL,
    agent   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (kind, channel, agent)
) WITHOUT ROWID;
-- Topic events of every channel, for `channel=*` readers.
CREATE INDEX IF NOT EXISTS messages_every_topic ON messages(seq) WHERE topic IS NOT NULL;
-- Topic events per channel, for pattern subscribers resuming from a seq.
CREATE INDEX IF NOT EXISTS messages_topics ON messages(channel, seq) WHERE topic IS NOT NULL;
CREATE TABLE IF NOT EXISTS cursors (
    channel TEXT NOT NULL,
    agent   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (channel, agent)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    channel TEXT NOT NULL,
    agent   TEXT NOT NULL,
    pattern TEXT NOT NULL,
    PRIMARY KEY (channel, agent, pattern)
) WITHOUT ROWID;
-- Agent identities: the token's SHA-256 (never the token) and the ACL
-- rules, each a JSON array of globs.
CREATE TABLE IF NOT EXISTS identities (
    name          TEXT PRIMARY KEY,
    channel       TEXT,
    token_hash    TEXT NOT NULL UNIQUE,
    may_send      TEXT NOT NULL,
    may_publish   TEXT NOT NULL,
    may_subscribe TEXT NOT NULL,
    admin         INTEGER NOT NULL,
    created       REAL NOT NULL
);
-- Small facts about the store itself (the health probe's row).
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
);
-- Delivery steps: every message of the inbox (channel, agent) with
-- lo < seq <= hi reached `state` at `ts` through `door`. One row per
-- read or acknowledgement, not per message.
CREATE TABLE IF NOT EXISTS steps (
    channel TEXT NOT NULL,
    agent   TEXT NOT NULL,
    state   TEXT NOT NULL,
    hi      INTEGER NOT NULL,
    lo      INTEGER NOT NULL,
    ts      REAL NOT NULL,
    door    TEXT NOT NULL,
    note    TEXT,
    UNIQUE (channel, agent, state, hi)
);
-- For pruning the steps of removed messages.
CREATE INDEX IF NOT EXISTS steps_hi ON steps(hi);
-- The newest seq ever deleted, with its ts: the log's end when retention
-- (or a forget, or a release) removed its newest rows, so a restart never
-- hands out a seq again (cursors and pruned marks already passed it).
CREATE TRIGGER IF NOT EXISTS messages_end AFTER DELETE ON messages
WHEN old.seq > COALESCE((SELECT value FROM meta WHERE key = 'end_seq'), 0)
BEGIN
    INSERT OR REPLACE INTO meta (key, value) VALUES ('end_seq', old.seq), ('end_ts', old.ts);
END;
-- What the loop guard holds: messages stored for their `to` and in no
-- inbox until released (each counts as one of its message's refs, and
-- retention passes it by). A release deletes the row in its own commit.
CREATE TABLE IF NOT EXISTS held (
    seq INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS agents (
    channel    TEXT NOT NULL,
    name       TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    -- 1 once it connected (rows of older versions: 1, so they never expire).
    connected  INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (channel, name)
) WITHOUT ROWID;
";

/// Answered once the operation is durable, or failed with nothing applied.
type Ack = oneshot::Sender<Result<()>>;

enum Op {
    Append {
        /// Taken by the writer as it stores them (`len` stays).
        batch: Vec<NewMessage>,
        len: usize,
        reply: oneshot::Sender<Result<Vec<Arc<Message>>>>,
        /// The batch's share of [`QUEUE_BYTES`], given back when the
        /// operation is answered.
        _room: OwnedSemaphorePermit,
    },
    /// Compare-and-set of a cursor: (key, expected, new, the `read` steps
    /// recorded with the move).
    Swap(
        InboxKey,
        Seq,
        Seq,
        Vec<Step>,
        oneshot::Sender<Result<(Swap, Vec<Step>)>>,
    ),
    Agent(InboxKey, f64, bool, Ack),
    Forget(InboxKey, oneshot::Sender<Result<bool>>),
    Expire(f64, usize, oneshot::Sender<Result<Vec<InboxKey>>>),
    Subscription(InboxKey, String, bool, Ack),
    Identity(AgentName, Option<Identity>, Ack),
    /// Answered with the steps that were new.
    Record(Vec<Step>, oneshot::Sender<Result<Vec<Step>>>),
    /// A one-row write that tells whether writes work again.
    Probe,
    Prune(Plan, oneshot::Sender<Result<Pruned>>),
    /// Taken by the writer, which answers it after the commit.
    Close(Option<oneshot::Sender<()>>),
}

/// See the module docs.
pub struct SqliteEngine {
    tx: mpsc::Sender<Op>,
    /// Room in the writer's queue, in bytes (see the module docs).
    room: Arc<Semaphore>,
    room_bytes: usize,
    room_wait: Duration,
    readers: Arc<Readers>,
    health: Arc<Health>,
    /// Inboxes that grew since the last prune step looked at them.
    touched: Touched,
    track_inboxes: Arc<AtomicBool>,
    feed: Mutex<Option<Feed>>,
    /// See [`Writer::unapplied`].
    unapplied: Arc<AtomicUsize>,
}

/// Inboxes the writer added to since the per-inbox count last looked at
/// them, with how much they grew (one entry per inbox, so bounded by the
/// number of inboxes).
type Touched = Arc<Mutex<HashMap<InboxKey, Growth>>>;

/// Rows added to an inbox since it was last counted.
#[derive(Debug, Default, Clone, Copy)]
struct Growth {
    pending: u64,
    /// A cutoff found earlier whose rows are not all deleted yet (one
    /// step deletes at most [`PRUNE_BUDGET`]): used again, not walked for.
    cutoff: Option<Seq>,
    /// `pending` at the previous prune step: unchanged means the inbox went
    /// quiet, and is counted even below the threshold (so the rule ends up
    /// exact once the burst is over).
    seen: u64,
}

impl Growth {
    /// Worth an index walk (an `OFFSET keep` costs `keep` steps): only
    /// after it grew by a sixteenth of the limit, or went quiet.
    fn due(&self, keep: u64) -> bool {
        self.pending >= (keep / 16).max(1) || (self.pending > 0 && self.pending == self.seen)
    }
}

/// What one prune step removes, worked out on a read connection so the
/// writer only deletes.
struct Plan {
    /// The oldest message no hold keeps (0: none).
    oldest: Seq,
    /// Every message with `seq <= cut` goes (age and size rules).
    cut: Seq,
    /// Inbox rows with `seq <=` this go (the per-inbox count rule).
    inboxes: Vec<(InboxKey, Seq)>,
    /// Topic events with `lo < seq <= hi` leave the topic views.
    topics: Option<(Seq, Seq)>,
    /// The rules want more than this step's budget.
    more: bool,
}

/// The pool of read-only connections.
struct Readers {
    pool: Mutex<Vec<Connection>>,
    path: PathBuf,
    /// One per read running: with one held, the pool has a connection
    /// (or one is opened) and a blocking thread does the read.
    turns: Arc<Semaphore>,
}

impl Readers {
    /// Runs `f` on a pooled read connection (on a blocking thread).
    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let pooled = self.pool.lock().unwrap().pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(db)?;
                c.busy_timeout(BUSY_WAIT).map_err(db)?;
                c
            }
        };
        let result = f(&conn);
        let mut pool = self.pool.lock().unwrap();
        if pool.len() < READERS {
            pool.push(conn);
        }
        result.map_err(db)
    }
}

/// A SQLite error as the bus reports it: a lock held elsewhere is
/// `storage_busy` (retry), anything else `storage_error`.
fn db(e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            Error::StorageBusy(e.to_string())
        }
        _ => Error::Storage(e.to_string()),
    }
}

impl SqliteEngine {
    /// Opens (creating if needed) the database at `path` and starts the writer.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_queue(path, QUEUE_BYTES, QUEUE_WAIT)
    }

    /// [`SqliteEngine::open`] with a writer queue of `bytes`, where a send
    /// waits at most `wait` for room.
    pub fn open_with_queue(path: &Path, bytes: usize, wait: Duration) -> Result<Self> {
        // A semaphore holds at most `u32::MAX` permits per acquire.
        let bytes = bytes.clamp(1, u32::MAX as usize);
        let conn = Connection::open(path).map_err(db)?;
        let (seq, ts) = prepare(&conn).map_err(db)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let health = Arc::new(Health::default());
        let touched = Touched::default();
        let track_inboxes = Arc::new(AtomicBool::new(false));
        let (feed_tx, feed) = mpsc::channel(FEED_CAPACITY);
        let unapplied = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            pace: Pace {
                batch: 0,
                last_stored: std::time::Instant::now(),
            },
            touched: touched.clone(),
            track_inboxes: track_inboxes.clone(),
            conn,
            seq,
            clock: BusClock::starting_after(ts),
            feed: feed_tx,
            unapplied: unapplied.clone(),
            health: health.clone(),
            stopped: None,
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| Error::Storage(format!("cannot start {name}: {e}")))
        };
        spawn("hermod-sqlite-writer", Box::new(move || writer.run(rx)))?;
        let (probe_tx, probe_health) = (tx.downgrade(), health.clone());
        spawn(
            "hermod-sqlite-probe",
            Box::new(move || {
                // Lives as long as the engine: the weak sender stops
                // upgrading once the engine is dropped.
                loop {
                    std::thread::sleep(PROBE_EVERY);
                    let Some(tx) = probe_tx.upgrade() else { return };
                    if probe_health.degraded().is_some() {
                        let _ = tx.try_send(Op::Probe);
                    }
                }
            }),
        )?;
        Ok(Self {
            tx,
            room: Arc::new(Semaphore::new(bytes)),
            room_bytes: bytes,
            room_wait: wait,
            readers: Arc::new(Readers {
                pool: Mutex::new(Vec::new()),
                path: path.to_owned(),
                turns: Arc::new(Semaphore::new(READERS)),
            }),
            health,
            touched,
            track_inboxes,
            feed: Mutex::new(Some(feed)),
            unapplied,
        })
    }

    /// Runs `f` on a read connection, off the async threads.
    async fn on_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.readers.clone();
        let turn = readers
            .turns
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            readers.with(f)
        })
        .await
        .map_err(|e| Error::Storage(format!("read task failed: {e}")))?
    }

    async fn queue(&self, op: Op) -> Result<()> {
        self.tx.send(op).await.map_err(|_| Error::ShuttingDown)
    }

    /// Queues `op` (built around its reply) and waits until it is durable.
    async fn write(&self, op: impl FnOnce(Ack) -> Op) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.queue(op(reply)).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// Makes the write connection ready (WAL, full sync, schema) and returns
/// the newest (seq, ts).
fn prepare(conn: &Connection) -> rusqlite::Result<(Seq, f64)> {
    conn.busy_timeout(BUSY_WAIT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    migrate(conn)?;
    newest(conn)
}

/// The newest (seq, ts) the log ever held, (0, 0.0) when never written:
/// the last row, or the newest one deleted when that is later (see the
/// `messages_end` trigger). One B-tree step from the end: `ts` grows with
/// `seq`, so the last row holds both maxima (`MAX(ts)` would scan every
/// row: 0.4 s per 3 million messages at start).
fn newest(conn: &Connection) -> rusqlite::Result<(Seq, f64)> {
    let last = conn
        .query_row(
            "SELECT seq, ts FROM messages ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)? as Seq, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0.0));
    let end = conn.query_row(
        "SELECT (SELECT value FROM meta WHERE key = 'end_seq'),
                    (SELECT value FROM meta WHERE key = 'end_ts')",
        [],
        |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<f64>>(1)?)),
    )?;
    Ok(match end {
        (Some(seq), Some(ts)) if seq as Seq > last.0 => (seq as Seq, ts),
        _ => last,
    })
}

/// Columns older versions lacked, with how to add them: `auth` (older
/// rows keep NULL: their senders were never verified, `open`), `refs`
/// (NULL: such rows go by age or size only), `connected` (1: names from
/// before are never expired), `meta` and `thread` (NULL: no delivery
/// fields).
const ADDED_COLUMNS: [(&str, &str, &str); 5] = [
    ("messages", "auth", "auth TEXT"),
    ("messages", "refs", "refs INTEGER"),
    ("messages", "meta", "meta TEXT"),
    ("messages", "thread", "thread TEXT"),
    (
        "agents",
        "connected",
        "connected INTEGER NOT NULL DEFAULT 1",
    ),
];

/// Brings a database made by an older hermod up to [`SCHEMA`].
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, definition) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {definition}"))?;
        }
    }
    // On columns that older databases gain above. Message ids and
    // threads are looked up by `GET /v1/messages/{id}` and `/v1/threads`.
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS messages_id ON messages(id);
         CREATE INDEX IF NOT EXISTS messages_thread ON messages(thread, seq) WHERE thread IS NOT NULL;",
    )?;
    // Older versions kept holds only as `held` steps, so a restart read
    // released holds again and retention removed unreleased ones. Once: a
    // held step whose message is still stored, and whose id reached no
    // inbox later (a release), is a hold.
    let moved: bool = conn
        .query_row(
            "SELECT 1 FROM meta WHERE key = 'held_table'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !moved {
        conn.execute_batch(
            "BEGIN;
             INSERT OR IGNORE INTO held (seq)
                 SELECT s.hi FROM steps s JOIN messages m ON m.seq = s.hi
                 WHERE s.state = 'held' AND NOT EXISTS (SELECT 1 FROM messages r
                     WHERE r.id = m.id AND r.channel = m.channel AND r.seq > m.seq AND r.refs > 0);
             UPDATE messages SET refs = COALESCE(refs, 0) + 1 WHERE seq IN (SELECT seq FROM held);
             DROP INDEX IF EXISTS steps_held;
             INSERT INTO meta (key, value) VALUES ('held_table', 1);
             COMMIT;",
        )?;
    }
    Ok(())
}

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let text = |i: usize| r.get::<_, String>(i);
    let name = |i: usize, s: String| {
        AgentName::parse(s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    };
    let body: String = text(8)?;
    Ok(Message {
        seq: r.get::<_, i64>(0)? as Seq,
        id: text(1)?,
        ts: r.get(2)?,
        channel: Channel::parse(text(3)?).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e))
        })?,
        from: name(4, text(4)?)?,
        to: match r.get::<_, Option<String>>(5)? {
            Some(s) => Some(name(5, s)?),
            None => None,
        },
        topic: r.get(6)?,
        sent_ts: r.get(7)?,
        auth: Auth::from_stored(r.get::<_, Option<String>>(9)?.as_deref()),
        meta: match r.get::<_, Option<String>>(10)? {
            // A row this version cannot read keeps its message, without them.
            Some(text) => serde_json::from_str(&text).ok().map(Box::new),
            None => None,
        },
        body: Body::from_json(body).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
        })?,
    })
}

fn read_identities(c: &Connection) -> rusqlite::Result<Vec<Identity>> {
    let mut stmt = c.prepare_cached(
        "SELECT name, channel, token_hash, may_send, may_publish, may_subscribe, admin, created
         FROM identities ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        let globs = |i: usize| -> rusqlite::Result<Vec<String>> {
            serde_json::from_str(&r.get::<_, String>(i)?).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    i,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })
        };
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            Identity {
                name: AgentName::anonymous(),
                channel: None,
                token_hash: r.get(2)?,
                may_send: globs(3)?,
                may_publish: globs(4)?,
                may_subscribe: globs(5)?,
                admin: r.get::<_, i64>(6)? != 0,
                created: r.get(7)?,
            },
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, channel, mut identity) = row?;
        // Rows were validated on the way in; skip anything foreign.
        let Ok(name) = AgentName::parse(name) else {
            continue;
        };
        let channel = match channel.map(Channel::parse) {
            Some(Ok(c)) => Some(c),
            Some(Err(_)) => continue,
            None => None,
        };
        identity.name = name;
        identity.channel = channel;
        out.push(identity);
    }
    Ok(out)
}

fn read_agents(c: &Connection) -> rusqlite::Result<Vec<KnownAgent>> {
    let mut stmt = c.prepare_cached(
        "SELECT channel, name, first_seen, last_seen, connected FROM agents ORDER BY channel, name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, f64>(2)?,
            r.get::<_, f64>(3)?,
            r.get::<_, bool>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (channel, name, first_seen, last_seen, connected) = row?;
        // Rows were validated on the way in; skip anything foreign.
        if let (Ok(channel), Ok(agent)) = (Channel::parse(channel), AgentName::parse(name)) {
            out.push(KnownAgent {
                key: InboxKey { channel, agent },
                first_seen,
                last_seen,
                connected,
            });
        }
    }
    Ok(out)
}

fn read_subscriptions(c: &Connection) -> rusqlite::Result<Vec<(InboxKey, String)>> {
    let mut stmt = c.prepare_cached("SELECT channel, agent, pattern FROM subscriptions")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (channel, agent, pattern) = row?;
        if let (Ok(channel), Ok(agent)) = (Channel::parse(channel), AgentName::parse(agent)) {
            out.push((InboxKey { channel, agent }, pattern));
        }
    }
    Ok(out)
}

/// The last seq whose ts is `<= ts`, by binary search over seq: ts grows
/// with seq, so no ts index is needed (one less index per message).
fn seq_at_ts(c: &Connection, ts: f64) -> rusqlite::Result<Seq> {
    let mut next =
        c.prepare_cached("SELECT seq, ts FROM messages WHERE seq >= ?1 ORDER BY seq LIMIT 1")?;
    let mut at_or_after = |seq: i64| -> rusqlite::Result<Option<(i64, f64)>> {
        next.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    };
    let (mut lo, mut hi) = match (at_or_after(0)?, newest(c)?) {
        (Some((first, first_ts)), (last, _)) if first_ts <= ts => (first, last as i64),
        _ => return Ok(0),
    };
    // Invariant: the row at `lo` has ts <= `ts`; find the last such row.
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        match at_or_after(mid)? {
            Some((seq, row_ts)) if row_ts <= ts => lo = seq,
            // Every row from `mid` on is newer than `ts`.
            _ => hi = mid - 1,
        }
    }
    Ok(lo as Seq)
}

/// The `floors` row of a view: kind, channel, agent.
fn view_parts(view: &View) -> (&'static str, &str, &str) {
    match view {
        View::Inbox(k) => ("i", k.channel.as_str(), k.agent.as_str()),
        View::Topics(c) => ("t", c.as_str(), ""),
        // `*` is no channel name, so the row cannot clash.
        View::AllTopics => ("t", "*", ""),
    }
}

fn view_of(kind: &str, channel: String, agent: String) -> Option<View> {
    if kind == "t" && channel == "*" {
        return Some(View::AllTopics);
    }
    let channel = Channel::parse(channel).ok()?;
    match kind {
        "i" => Some(View::Inbox(InboxKey::new(
            channel,
            AgentName::parse(agent).ok()?,
        ))),
        "t" => Some(View::Topics(channel)),
        _ => None,
    }
}

/// Every inbox that holds a message: one index step per inbox (a skip
/// scan over the primary key), not a scan of the rows.
fn every_inbox(c: &Connection) -> rusqlite::Result<Vec<InboxKey>> {
    let mut next = c.prepare_cached(
        "SELECT channel, agent FROM inbox WHERE (channel, agent) > (?1, ?2)
         ORDER BY channel, agent LIMIT 1",
    )?;
    let mut out = Vec::new();
    let (mut channel, mut agent) = (String::new(), String::new());
    while let Some((c, a)) = next
        .query_row([&channel, &agent], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?
    {
        if let Some(View::Inbox(key)) = view_of("i", c.clone(), a.clone()) {
            out.push(key);
        }
        (channel, agent) = (c, a);
    }
    Ok(out)
}

/// How far retention pruned `view` (0: never).
fn floor(c: &Connection, view: &View) -> rusqlite::Result<Seq> {
    let (kind, channel, agent) = view_parts(view);
    c.prepare_cached("SELECT seq FROM floors WHERE kind = ?1 AND channel = ?2 AND agent = ?3")?
        .query_row(params![kind, channel, agent], |r| r.get::<_, i64>(0))
        .optional()
        .map(|s| s.unwrap_or(0) as Seq)
}

/// Works out one prune step on a read connection: index walks (the
/// per-inbox count) are the slow part and must not hold the writer.
fn plan(
    c: &Connection,
    rules: &Retention,
    now: f64,
    touched: Vec<(InboxKey, Option<Seq>)>,
) -> rusqlite::Result<Plan> {
    let budget = PRUNE_BUDGET as Seq;
    let oldest: Option<i64> = c
        .query_row(
            "SELECT seq FROM messages WHERE seq NOT IN (SELECT seq FROM held) ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let mut plan = Plan {
        oldest: oldest.unwrap_or(0) as Seq,
        cut: 0,
        inboxes: Vec::new(),
        topics: None,
        more: false,
    };
    if let Some(oldest) = oldest.map(|s| s as Seq) {
        let mut want = 0;
        if let Some(age) = rules.age {
            want = want.max(seq_at_ts(c, now - age)?);
        }
        if let Some(limit) = rules.bytes {
            let pages: i64 = c.query_row(
                "SELECT (SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM pragma_freelist_count())",
                [],
                |r| r.get(0),
            )?;
            let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            if (pages * page_size) as u64 > limit {
                want = want.max(oldest + budget - 1);
            }
        }
        if want >= oldest {
            plan.cut = want.min(oldest + budget - 1);
            plan.more = want > plan.cut;
        }
    }
    if let Some(keep) = rules.inbox_messages {
        let mut nth = c.prepare_cached(
            "SELECT seq FROM inbox WHERE channel = ?1 AND agent = ?2 ORDER BY seq DESC LIMIT 1 OFFSET ?3",
        )?;
        for (key, known) in touched {
            if let Some(cutoff) = known {
                plan.inboxes.push((key, cutoff));
                continue;
            }
            let cutoff: Option<i64> = nth
                .query_row(
                    params![key.channel.as_str(), key.agent.as_str(), keep as i64],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(cutoff) = cutoff {
                plan.inboxes.push((key, cutoff as Seq));
            }
        }
    }
    if let Some(age) = rules.topic_age {
        let done: Seq = c
            .query_row(
                "SELECT value FROM meta WHERE key = 'topic_pruned'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as Seq;
        let due = seq_at_ts(c, now - age)?;
        if due > done {
            let hi = due.min(done + budget);
            plan.topics = Some((done, hi));
            plan.more |= due > hi;
        }
    }
    Ok(plan)
}

/// Applies a prune [`Plan`] inside the writer's transaction, deleting at
/// most `limit` rows of a kind (see [`PRUNE_LEAST`]). Returns what it did
/// and the inboxes that are still over their count.
fn prune_rows(
    tx: &Connection,
    plan: &Plan,
    limit: usize,
    changes: &mut Vec<Change>,
) -> rusqlite::Result<(Pruned, Vec<(InboxKey, Seq)>)> {
    let cut = plan.cut.min(plan.oldest + limit as Seq - 1);
    let topics = plan.topics.map(|(lo, hi)| (lo, hi.min(lo + limit as Seq)));
    let trimmed = cut < plan.cut || topics != plan.topics;
    let mut floors: HashMap<View, Seq> = HashMap::new();
    let mut bump = |view: View, seq: i64| {
        if matches!(view, View::Topics(_)) {
            let all = floors.entry(View::AllTopics).or_default();
            *all = (*all).max(seq as Seq);
        }
        let f = floors.entry(view).or_default();
        *f = (*f).max(seq as Seq);
    };
    let mut removed = 0u64;
    let mut again = Vec::new();
    if cut > 0 {
        let mut rows =
            tx.prepare_cached("DELETE FROM inbox WHERE seq <= ?1 RETURNING channel, agent, seq")?;
        let deleted = rows.query_map([cut as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in deleted {
            let (channel, agent, seq) = row?;
            if let Some(view) = view_of("i", channel, agent) {
                bump(view, seq);
            }
        }
        let mut rows = tx.prepare_cached(
            "DELETE FROM messages WHERE seq <= ?1 AND seq NOT IN (SELECT seq FROM held)
             RETURNING channel, topic IS NOT NULL, seq",
        )?;
        let deleted = rows.query_map([cut as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in deleted {
            let (channel, topic, seq) = row?;
            removed += 1;
            if topic {
                if let Some(view) = view_of("t", channel, String::new()) {
                    bump(view, seq);
                }
            }
        }
    }
    for (key, cutoff) in &plan.inboxes {
        let mut rows = tx.prepare_cached(
            "DELETE FROM inbox WHERE channel = ?1 AND agent = ?2 AND seq IN
                (SELECT seq FROM inbox WHERE channel = ?1 AND agent = ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4)
             RETURNING seq",
        )?;
        let seqs = rows
            .query_map(
                params![
                    key.channel.as_str(),
                    key.agent.as_str(),
                    *cutoff as i64,
                    limit as i64
                ],
                |r| r.get::<_, i64>(0),
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if seqs.len() == limit {
            again.push((key.clone(), *cutoff));
        }
        // RETURNING has no order: the mark is the largest.
        if let Some(&newest) = seqs.iter().max() {
            bump(View::Inbox(key.clone()), newest);
        }
        removed += unref(tx, &seqs)?;
    }
    if let Some((lo, hi)) = topics {
        let mut rows = tx.prepare_cached(
            "SELECT channel, MAX(seq) FROM messages
             WHERE seq > ?1 AND seq <= ?2 AND topic IS NOT NULL GROUP BY channel",
        )?;
        let marks = rows.query_map([lo as i64, hi as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in marks {
            let (channel, seq) = row?;
            if let Some(view) = view_of("t", channel, String::new()) {
                bump(view, seq);
            }
        }
        // Events still in a durable subscriber's inbox stay for it.
        removed += tx
            .prepare_cached(
                "DELETE FROM messages WHERE seq > ?1 AND seq <= ?2 AND topic IS NOT NULL AND refs = 0",
            )?
            .execute([lo as i64, hi as i64])? as u64;
        tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('topic_pruned', ?1)")?
            .execute([hi as i64])?;
    }
    let mut mark = tx.prepare_cached(
        "INSERT INTO floors (kind, channel, agent, seq) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (kind, channel, agent) DO UPDATE SET seq = MAX(seq, excluded.seq)",
    )?;
    for (view, seq) in &floors {
        let (kind, channel, agent) = view_parts(view);
        mark.execute(params![kind, channel, agent, *seq as i64])?;
    }
    changes.extend(
        floors
            .into_iter()
            .map(|(view, seq)| Change::Floor(view, seq)),
    );
    // Steps of messages that are gone go with them (bounded like the rest).
    tx.prepare_cached(
        "DELETE FROM steps WHERE rowid IN (SELECT rowid FROM steps
             WHERE hi < (SELECT COALESCE(MIN(seq), 0) FROM messages) LIMIT ?1)",
    )?
    .execute([limit as i64])?;
    let more = plan.more || trimmed || !again.is_empty();
    Ok((Pruned { removed, more }, again))
}

#[async_trait]
impl Engine for SqliteEngine {
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable> {
        let bytes: usize = batch.iter().map(queued_bytes).sum();
        let want = bytes.min(self.room_bytes) as u32;
        let room = match tokio::time::timeout(
            self.room_wait,
            self.room.clone().acquire_many_owned(want),
        )
        .await
        {
            Ok(Ok(room)) => room,
            Ok(Err(_)) => return Err(Error::ShuttingDown),
            Err(_) => {
                return Err(Error::StorageBusy(format!(
                    "the writer's queue stayed full ({} bytes waiting) for {:?}; nothing was stored, retry",
                    self.room_bytes - self.room.available_permits(),
                    self.room_wait
                )))
            }
        };
        let (reply, rx) = oneshot::channel();
        let len = batch.len();
        self.queue(Op::Append {
            batch,
            len,
            reply,
            _room: room,
        })
        .await?;
        Ok(rx)
    }

    async fn read(&self, view: &View, after: Seq, limit: usize) -> Result<Page> {
        let view = view.clone();
        self.on_reader(move |c| {
            // One snapshot for the mark and the rows.
            let snapshot = c.unchecked_transaction()?;
            let pruned = floor(&snapshot, &view)?;
            let after = after.max(pruned) as i64;
            let messages = match &view {
                View::Inbox(key) => {
                    let mut stmt = snapshot.prepare_cached(
                        "SELECT m.seq, m.id, m.ts, m.channel, m.sender, m.recipient, m.topic, m.sent_ts, m.body, m.auth, m.meta
                         FROM inbox i JOIN messages m ON m.seq = i.seq
                         WHERE i.channel = ?1 AND i.agent = ?2 AND i.seq > ?3
                         ORDER BY i.seq LIMIT ?4",
                    )?;
                    let rows = stmt.query_map(
                        params![key.channel.as_str(), key.agent.as_str(), after, limit as i64],
                        row_to_message,
                    )?;
                    rows.map(|r| r.map(Arc::new)).collect::<rusqlite::Result<Vec<_>>>()?
                }
                View::AllTopics => {
                    let mut stmt = snapshot.prepare_cached(
                        "SELECT seq, id, ts, channel, sender, recipient, topic, sent_ts, body, auth, meta
                         FROM messages INDEXED BY messages_every_topic
                         WHERE topic IS NOT NULL AND seq > ?1
                         ORDER BY seq LIMIT ?2",
                    )?;
                    let rows = stmt.query_map(params![after, limit as i64], row_to_message)?;
                    rows.map(|r| r.map(Arc::new)).collect::<rusqlite::Result<Vec<_>>>()?
                }
                View::Topics(channel) => {
                    let mut stmt = snapshot.prepare_cached(
                        "SELECT seq, id, ts, channel, sender, recipient, topic, sent_ts, body, auth, meta
                         FROM messages
                         WHERE topic IS NOT NULL AND channel = ?1 AND seq > ?2
                         ORDER BY seq LIMIT ?3",
                    )?;
                    let rows =
                        stmt.query_map(params![channel.as_str(), after, limit as i64], row_to_message)?;
                    rows.map(|r| r.map(Arc::new)).collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            Ok(Page { messages, pruned })
        })
        .await
    }

    async fn floors(&self) -> Result<Vec<(View, Seq)>> {
        self.on_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT kind, channel, agent, seq FROM floors")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)? as Seq,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (kind, channel, agent, seq) = row?;
                if let Some(view) = view_of(&kind, channel, agent) {
                    out.push((view, seq));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn prune(&self, rules: &Retention, now: f64) -> Result<Pruned> {
        let tracking = rules.inbox_messages.is_some();
        if tracking && !self.track_inboxes.swap(true, Ordering::Relaxed) {
            // From now on the writer notes inboxes that grow; the ones
            // that exist already are looked at once.
            let existing = self.on_reader(every_inbox).await?;
            let mut touched = self.touched.lock().unwrap();
            for key in existing {
                touched.entry(key).or_default().pending = u64::MAX / 2;
            }
        }
        self.track_inboxes.store(tracking, Ordering::Relaxed);
        let keep = rules.inbox_messages.unwrap_or(0);
        let (touched, untouched_left) = {
            let mut map = self.touched.lock().unwrap();
            if !tracking {
                map.clear();
            }
            let due: Vec<(InboxKey, Option<Seq>)> = map
                .iter()
                .filter(|(_, g)| g.due(keep))
                .take(PRUNE_INBOXES)
                .map(|(k, g)| (k.clone(), g.cutoff))
                .collect();
            for (k, _) in &due {
                map.remove(k);
            }
            for g in map.values_mut() {
                g.seen = g.pending;
            }
            let left = map.values().any(|g| g.due(keep));
            (due, left)
        };
        let rules = rules.clone();
        let plan = self
            .on_reader(move |c| plan(c, &rules, now, touched))
            .await?;
        let mut pruned = if plan.cut == 0 && plan.inboxes.is_empty() && plan.topics.is_none() {
            Pruned::default()
        } else {
            let (reply, rx) = oneshot::channel();
            self.queue(Op::Prune(plan, reply)).await?;
            rx.await.map_err(|_| Error::ShuttingDown)??
        };
        pruned.more |= untouched_left;
        Ok(pruned)
    }

    async fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
        self.on_reader(move |c| seq_at_ts(c, ts)).await
    }

    async fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        let key = key.clone();
        self.on_reader(move |c| {
            c.prepare_cached(
                "SELECT COUNT(*) FROM inbox WHERE channel = ?1 AND agent = ?2 AND seq > ?3",
            )?
            .query_row(
                params![key.channel.as_str(), key.agent.as_str(), after as i64],
                |r| r.get::<_, i64>(0).map(|n| n as u64),
            )
        })
        .await
    }

    async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        let key = key.clone();
        self.on_reader(move |c| {
            c.prepare_cached("SELECT seq FROM cursors WHERE channel = ?1 AND agent = ?2")?
                .query_row(params![key.channel.as_str(), key.agent.as_str()], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()
                .map(|s| s.unwrap_or(0) as Seq)
        })
        .await
    }

    async fn swap_cursor(
        &self,
        key: InboxKey,
        expected: Seq,
        new: Seq,
        steps: Vec<Step>,
    ) -> Result<(Swap, Vec<Step>)> {
        let (reply, rx) = oneshot::channel();
        self.queue(Op::Swap(key, expected, new, steps, reply))
            .await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn remember_agent(&self, key: InboxKey, seen: f64, connected: bool) -> Result<()> {
        self.write(|ack| Op::Agent(key, seen, connected, ack)).await
    }

    async fn forget_agent(&self, key: InboxKey) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        self.queue(Op::Forget(key, reply)).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn expire_agents(&self, before: f64, limit: usize) -> Result<Vec<InboxKey>> {
        let (reply, rx) = oneshot::channel();
        self.queue(Op::Expire(before, limit, reply)).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()> {
        self.write(|ack| Op::Subscription(key, pattern, on, ack))
            .await
    }

    async fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>> {
        self.on_reader(read_subscriptions).await
    }

    async fn set_identity(&self, name: AgentName, identity: Option<Identity>) -> Result<()> {
        self.write(|ack| Op::Identity(name, identity, ack)).await
    }

    async fn identities(&self) -> Result<Vec<Identity>> {
        self.on_reader(read_identities).await
    }

    async fn agents(&self) -> Result<Vec<KnownAgent>> {
        self.on_reader(read_agents).await
    }

    async fn last(&self) -> Result<(Seq, f64)> {
        self.on_reader(newest).await
    }

    async fn record(&self, steps: Vec<Step>) -> Result<Vec<Step>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.queue(Op::Record(steps, reply)).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn steps(&self, key: &InboxKey, seq: Seq) -> Result<Vec<Step>> {
        let key = key.clone();
        self.on_reader(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT hi, lo, ts, door, note FROM steps
                 WHERE channel = ?1 AND agent = ?2 AND state = ?3 AND hi >= ?4
                 ORDER BY hi LIMIT ?5",
            )?;
            let mut out = Vec::new();
            for state in State::ALL {
                let rows = stmt.query_map(
                    params![
                        key.channel.as_str(),
                        key.agent.as_str(),
                        state.as_str(),
                        seq as i64,
                        STEP_PROBE as i64
                    ],
                    |r| {
                        Ok(Step {
                            key: key.clone(),
                            hi: r.get::<_, i64>(0)? as Seq,
                            lo: r.get::<_, i64>(1)? as Seq,
                            state,
                            ts: r.get(2)?,
                            door: r.get(3)?,
                            note: r.get(4)?,
                        })
                    },
                )?;
                for step in rows {
                    let step = step?;
                    if step.covers(seq) {
                        out.push(step);
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn held(&self, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>> {
        self.on_reader(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT m.seq, m.id, m.ts, m.channel, m.sender, m.recipient, m.topic, m.sent_ts, m.body, m.auth, m.meta
                 FROM held h JOIN messages m ON m.seq = h.seq
                 WHERE h.seq > ?1 ORDER BY h.seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after as i64, limit as i64], row_to_message)?;
            rows.map(|m| m.map(Arc::new)).collect()
        })
        .await
    }

    async fn find(&self, id: &str, limit: usize) -> Result<Vec<Committed>> {
        let id = id.to_owned();
        self.on_reader(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, id, ts, channel, sender, recipient, topic, sent_ts, body, auth, meta
                 FROM messages WHERE id = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let messages = stmt
                .query_map(params![id, limit as i64], row_to_message)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut inboxes = c.prepare_cached("SELECT agent FROM inbox WHERE seq = ?1")?;
            let mut held = c.prepare_cached("SELECT 1 FROM held WHERE seq = ?1")?;
            let mut out = Vec::new();
            for message in messages {
                let recipients = inboxes
                    .query_map([message.seq as i64], |r| r.get::<_, String>(0))?
                    .filter_map(|a| a.ok().and_then(|a| AgentName::parse(a).ok()))
                    .collect();
                let guard = if held.exists([message.seq as i64])? {
                    Guarded::Held
                } else {
                    Guarded::Free
                };
                out.push(Committed {
                    message: Arc::new(message),
                    recipients,
                    guard,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn thread(&self, thread: &str, limit: usize) -> Result<Vec<Arc<Message>>> {
        let thread = thread.to_owned();
        self.on_reader(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, id, ts, channel, sender, recipient, topic, sent_ts, body, auth, meta
                 FROM messages WHERE seq IN (
                     SELECT seq FROM messages WHERE id = ?1
                     UNION SELECT seq FROM messages WHERE thread = ?1)
                 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![thread, limit as i64], row_to_message)?;
            rows.map(|r| r.map(Arc::new)).collect()
        })
        .await
    }

    fn health(&self) -> &Health {
        &self.health
    }

    async fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "engine": "sqlite" })
    }

    fn feed(&self) -> Option<Feed> {
        self.feed.lock().unwrap().take()
    }

    fn settled(&self) -> bool {
        self.unapplied.load(Ordering::SeqCst) == 0
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Close(Some(tx))).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// How much a prune step may delete (see [`PRUNE_LEAST`]).
struct Pace {
    /// Messages the newest commit that stored any stored, and when.
    batch: usize,
    last_stored: std::time::Instant,
}

impl Pace {
    fn stored(&mut self, n: usize) {
        if n > 0 {
            self.batch = n;
            self.last_stored = std::time::Instant::now();
        }
    }

    fn prune_limit(&self) -> usize {
        if self.last_stored.elapsed() >= PRUNE_QUIET {
            PRUNE_BUDGET
        } else {
            (self.batch * 2).clamp(PRUNE_LEAST, PRUNE_BUDGET)
        }
    }
}

/// The single writer: owns the write connection, seq and clock.
struct Writer {
    conn: Connection,
    pace: Pace,
    seq: Seq,
    clock: BusClock,
    feed: mpsc::Sender<Commit>,
    /// Commits stamped and not yet applied by the feed's follower.
    unapplied: Arc<AtomicUsize>,
    health: Arc<Health>,
    /// Set after an fsync failure: every later write is refused with it.
    stopped: Option<String>,
    touched: Touched,
    /// Set once per-inbox retention is on: only then is `touched` kept.
    track_inboxes: Arc<AtomicBool>,
}

/// What one transaction produced, in op order per kind, for the replies.
#[derive(Default)]
struct Applied {
    committed: Vec<Committed>,
    /// What the feed reports beside the messages.
    changes: Vec<Change>,
    pruned: Vec<(Pruned, Vec<(InboxKey, Seq)>)>,
    forgotten: Vec<bool>,
    expired: Vec<Vec<InboxKey>>,
    /// What each swap did, and the steps it added.
    swapped: Vec<(Swap, Vec<Step>)>,
    /// The steps each record added.
    recorded: Vec<Vec<Step>>,
}

/// Answers every operation of a durable commit, in op order per kind.
fn answer(ops: Vec<Op>, stored: Vec<Arc<Message>>, out: Applied, touched: &Touched) {
    let (mut pruned, mut forgotten, mut expired, mut swapped, mut recorded) = (
        out.pruned.into_iter(),
        out.forgotten.into_iter(),
        out.expired.into_iter(),
        out.swapped.into_iter(),
        out.recorded.into_iter(),
    );
    let mut stored = stored.into_iter();
    for op in ops {
        match op {
            Op::Append { len, reply, .. } => {
                let mine: Vec<_> = stored.by_ref().take(len).collect();
                let _ = reply.send(Ok(mine));
            }
            Op::Agent(.., ack) | Op::Subscription(.., ack) | Op::Identity(.., ack) => {
                let _ = ack.send(Ok(()));
            }
            Op::Record(_, reply) => {
                let _ = reply.send(Ok(recorded.next().expect("one per record")));
            }
            Op::Swap(.., reply) => {
                let _ = reply.send(Ok(swapped.next().expect("one per swap")));
            }
            Op::Prune(_, reply) => {
                let (done, again) = pruned.next().expect("one result per prune");
                let mut touched = touched.lock().unwrap();
                for (key, cutoff) in again {
                    let g = touched.entry(key).or_default();
                    g.pending = u64::MAX / 2;
                    g.cutoff = Some(cutoff);
                }
                let _ = reply.send(Ok(done));
            }
            Op::Forget(_, reply) => {
                let _ = reply.send(Ok(forgotten.next().expect("one per forget")));
            }
            Op::Expire(.., reply) => {
                let _ = reply.send(Ok(expired.next().expect("one per expire")));
            }
            Op::Close(_) | Op::Probe => {}
        }
    }
}

/// The inbox rows at `seqs` were deleted: each message loses a reference,
/// and one that no inbox (nor a topic view) holds any more goes. Returns
/// the messages removed.
fn unref(tx: &Connection, seqs: &[i64]) -> rusqlite::Result<u64> {
    let mut unref = tx.prepare_cached("UPDATE messages SET refs = refs - 1 WHERE seq = ?1")?;
    let mut orphan =
        tx.prepare_cached("DELETE FROM messages WHERE seq = ?1 AND refs <= 0 AND topic IS NULL")?;
    let mut removed = 0;
    for &seq in seqs {
        unref.execute([seq])?;
        removed += orphan.execute([seq])? as u64;
    }
    Ok(removed)
}

/// Removes an agent and everything of its inbox (inside the writer's
/// transaction): true if it was known.
fn forget_rows(tx: &Connection, key: &InboxKey) -> rusqlite::Result<bool> {
    let (channel, agent) = (key.channel.as_str(), key.agent.as_str());
    let seqs = tx
        .prepare_cached("DELETE FROM inbox WHERE channel = ?1 AND agent = ?2 RETURNING seq")?
        .query_map([channel, agent], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    unref(tx, &seqs)?;
    for sql in [
        "DELETE FROM cursors WHERE channel = ?1 AND agent = ?2",
        "DELETE FROM subscriptions WHERE channel = ?1 AND agent = ?2",
        "DELETE FROM floors WHERE kind = 'i' AND channel = ?1 AND agent = ?2",
        "DELETE FROM steps WHERE channel = ?1 AND agent = ?2",
    ] {
        tx.prepare_cached(sql)?.execute([channel, agent])?;
    }
    Ok(tx
        .prepare_cached("DELETE FROM agents WHERE channel = ?1 AND name = ?2")?
        .execute([channel, agent])?
        > 0)
}

/// Removes up to `limit` names that never connected, were first seen
/// before `before` and hold nothing.
fn expire_rows(tx: &Connection, before: f64, limit: usize) -> rusqlite::Result<Vec<InboxKey>> {
    let rows = tx
        .prepare_cached(
            "DELETE FROM agents WHERE (channel, name) IN (
                SELECT channel, name FROM agents a
                WHERE connected = 0 AND first_seen < ?1
                  AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.channel = a.channel AND i.agent = a.name)
                  AND NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.channel = a.channel AND s.agent = a.name)
                LIMIT ?2)
             RETURNING channel, name",
        )?
        .query_map(params![before, limit as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(c, a)| match view_of("i", c, a) {
            Some(View::Inbox(key)) => Some(key),
            _ => None,
        })
        .collect())
}

/// How a failed transaction is reported.
enum Failure {
    /// Another process holds the lock: retry later.
    Busy,
    /// The disk is full or an I/O call failed: retry once it is fixed.
    Storage,
    /// fsync failed: what is on disk can no longer be trusted.
    Fsync,
}

fn failure(e: &rusqlite::Error) -> Failure {
    use rusqlite::ffi;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => match f.extended_code {
            ffi::SQLITE_IOERR_FSYNC | ffi::SQLITE_IOERR_DIR_FSYNC => Failure::Fsync,
            _ if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
            {
                Failure::Busy
            }
            _ => Failure::Storage,
        },
        _ => Failure::Storage,
    }
}

/// Inserts delivery steps; the first of a state ending at one seq in one
/// inbox stays. Returns (and reports to the feed) the ones it added.
fn insert_steps(
    tx: &rusqlite::Transaction<'_>,
    steps: &[Step],
    changes: &mut Vec<Change>,
) -> rusqlite::Result<Vec<Step>> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO steps (channel, agent, state, hi, lo, ts, door, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut new = Vec::new();
    for step in steps {
        let added = insert.execute(params![
            step.key.channel.as_str(),
            step.key.agent.as_str(),
            step.state.as_str(),
            step.hi as i64,
            step.lo as i64,
            step.ts,
            step.door,
            step.note,
        ])?;
        if added > 0 {
            changes.push(Change::Step(step.clone()));
            new.push(step.clone());
        }
    }
    Ok(new)
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.blocking_recv() {
            ops.push(first);
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let closing = self.commit(&mut ops);
            if let Some(done) = closing {
                let _ = done.send(());
                return;
            }
        }
    }

    /// Applies `ops` in one transaction and answers every sender — through
    /// the feed when the commit changed anything the broker follows, so
    /// they are answered only once it has applied it. Returns the close
    /// handshake if one was queued.
    fn commit(&mut self, ops: &mut Vec<Op>) -> Option<oneshot::Sender<()>> {
        let start_seq = self.seq;
        let mut out = Applied::default();
        // Counted before any ts is stamped, so the broker's `now` holds
        // back from here until the follower has applied this commit.
        self.unapplied.fetch_add(1, Ordering::SeqCst);
        let result = match &self.stopped {
            Some(reason) => Err(Error::Storage(reason.clone())),
            None => {
                let applied = self.apply(ops, &mut out);
                applied.map_err(|e| self.failed(&e))
            }
        };
        let closing = ops.iter_mut().find_map(|op| match op {
            Op::Close(done) => done.take(),
            _ => None,
        });
        match result {
            Ok(()) => {
                self.health.clear();
                self.note_growth(&out.committed);
                let ops = std::mem::take(ops);
                let (touched, unapplied) = (self.touched.clone(), self.unapplied.clone());
                let messages = std::mem::take(&mut out.committed);
                let stored: Vec<Arc<Message>> =
                    messages.iter().map(|c| c.message.clone()).collect();
                let changes = std::mem::take(&mut out.changes);
                let answer = move || {
                    answer(ops, stored, out, &touched);
                    unapplied.fetch_sub(1, Ordering::SeqCst);
                };
                if messages.is_empty() && changes.is_empty() {
                    answer();
                } else {
                    // Bounded: when the follower lags, the writer waits.
                    // A feed nobody follows any more (shutdown) hands the
                    // commit back, and dropping it answers the writers.
                    let _ = self
                        .feed
                        .blocking_send(Commit::new(messages, changes, answer));
                }
            }
            Err(e) => {
                self.seq = start_seq;
                self.unapplied.fetch_sub(1, Ordering::SeqCst);
                let refused = || match &e {
                    Error::StorageBusy(d) => Error::StorageBusy(d.clone()),
                    Error::Storage(d) => Error::Storage(d.clone()),
                    other => Error::Storage(other.to_string()),
                };
                for op in ops.drain(..) {
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Err(refused()));
                        }
                        Op::Agent(.., ack) | Op::Subscription(.., ack) | Op::Identity(.., ack) => {
                            let _ = ack.send(Err(refused()));
                        }
                        Op::Record(_, reply) => {
                            let _ = reply.send(Err(refused()));
                        }
                        Op::Swap(.., reply) => {
                            let _ = reply.send(Err(refused()));
                        }
                        Op::Prune(_, reply) => {
                            let _ = reply.send(Err(refused()));
                        }
                        Op::Forget(_, reply) => {
                            let _ = reply.send(Err(refused()));
                        }
                        Op::Expire(.., reply) => {
                            let _ = reply.send(Err(refused()));
                        }
                        Op::Close(_) | Op::Probe => {}
                    }
                }
            }
        }
        closing
    }

    /// Counts what each inbox grew by, for the per-inbox retention rule.
    fn note_growth(&self, committed: &[Committed]) {
        if !self.track_inboxes.load(Ordering::Relaxed) {
            return;
        }
        // Counted per distinct inbox first: one key (and one map update)
        // per inbox per commit, not per message.
        let mut grown: HashMap<(&Channel, &AgentName), u64> = HashMap::new();
        for c in committed {
            for r in &c.recipients {
                *grown.entry((&c.message.channel, r)).or_default() += 1;
            }
        }
        let mut touched = self.touched.lock().unwrap();
        for ((channel, agent), n) in grown {
            let key = InboxKey::new(channel.clone(), agent.clone());
            touched.entry(key).or_default().pending += n;
        }
    }

    /// Classifies a failed transaction, marks the store degraded (or
    /// stopped) and returns the error every operation in it gets.
    fn failed(&mut self, e: &rusqlite::Error) -> Error {
        let (error, reason) = match failure(e) {
            Failure::Busy => (
                Error::StorageBusy(format!(
                    "the database is locked by another process (waited {} ms): {e}",
                    BUSY_WAIT.as_millis()
                )),
                "storage busy: the database is locked by another process".to_owned(),
            ),
            Failure::Storage => (
                Error::Storage(format!("{e}; nothing was stored")),
                format!("storage error: {e}"),
            ),
            Failure::Fsync => {
                let reason = format!(
                    "writes stopped: fsync failed ({e}); data the kernel could not write may be lost, \
                     so no more writes are accepted; check the disk and restart hermod"
                );
                self.stopped = Some(reason.clone());
                (Error::Storage(reason.clone()), reason)
            }
        };
        if self.health.degraded().as_deref() != Some(&reason) {
            // The extended code tells which lock (SQLITE_BUSY_SNAPSHOT,
            // _RECOVERY, _TIMEOUT...) when SQLite's message does not.
            let code = match e {
                rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
                _ => 0,
            };
            tracing::error!(error = %e, code, "write failed; the store is degraded: {reason}");
        }
        self.health.set_degraded(reason);
        error
    }

    fn apply(&mut self, ops: &mut [Op], out: &mut Applied) -> rusqlite::Result<()> {
        // Delivery steps alone are not worth an fsync of their own (one per
        // acknowledgement would double the syncs): such a commit goes to
        // the WAL unsynced and is made durable by the next synced commit.
        let steps_only = ops.iter().all(|op| matches!(op, Op::Record(..)));
        if steps_only {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let result = self.apply_ops(ops, out);
        if steps_only {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        result
    }

    fn apply_ops(&mut self, ops: &mut [Op], out: &mut Applied) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut insert_msg = tx.prepare_cached(
                "INSERT INTO messages (seq, id, ts, channel, sender, recipient, topic, sent_ts, body, auth, refs, meta, thread)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            let mut insert_inbox =
                tx.prepare_cached("INSERT INTO inbox (channel, agent, seq) VALUES (?1, ?2, ?3)")?;
            let mut hold = tx.prepare_cached("INSERT INTO held (seq) VALUES (?1)")?;
            let mut unhold = tx.prepare_cached("DELETE FROM held WHERE seq = ?1")?;
            let mut upsert_agent = tx.prepare_cached(
                "INSERT INTO agents (channel, name, first_seen, last_seen, connected) VALUES (?1, ?2, ?3, ?3, ?4)
                 ON CONFLICT (channel, name) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen),
                     connected = MAX(connected, excluded.connected)",
            )?;
            let appended = ops.iter().map(|op| match op {
                Op::Append { len, .. } => *len,
                _ => 0,
            });
            self.pace.stored(appended.sum());
            for op in ops.iter_mut() {
                match op {
                    Op::Append { batch, .. } => {
                        // Moved, not copied: a failed commit answers with
                        // an error and never retries the batch.
                        for mut new in std::mem::take(batch) {
                            self.seq += 1;
                            let guard = new.guard;
                            let mut recipients = std::mem::take(&mut new.recipients);
                            match guard {
                                // The hold ends here, in this commit, or
                                // was ended by an earlier release.
                                Guarded::Releases(held) => {
                                    if unhold.execute([held as i64])? > 0 {
                                        unref(&tx, &[held as i64])?;
                                    } else {
                                        recipients.clear();
                                    }
                                }
                                Guarded::Held => {
                                    hold.execute([self.seq as i64])?;
                                }
                                Guarded::Free => {}
                            }
                            let refs = recipients.len() + usize::from(guard == Guarded::Held);
                            let m = Arc::new(new.into_message(self.seq, self.clock.stamp()));
                            insert_msg.execute(params![
                                m.seq as i64,
                                m.id,
                                m.ts,
                                m.channel.as_str(),
                                m.from.as_str(),
                                m.to.as_deref(),
                                m.topic,
                                m.sent_ts,
                                m.body.as_str(),
                                m.auth.as_str(),
                                refs as i64,
                                m.meta.as_ref().map(|meta| serde_json::to_string(meta)
                                    .expect("meta always serializes")),
                                m.meta().thread.as_deref(),
                            ])?;
                            for r in &recipients {
                                insert_inbox.execute(params![
                                    m.channel.as_str(),
                                    r.as_str(),
                                    m.seq as i64
                                ])?;
                            }
                            out.committed.push(Committed {
                                recipients,
                                message: m,
                                guard,
                            });
                        }
                    }
                    Op::Swap(key, expected, new, steps, _) => {
                        let (channel, agent) = (key.channel.as_str(), key.agent.as_str());
                        let now: Seq = tx
                            .prepare_cached(
                                "SELECT seq FROM cursors WHERE channel = ?1 AND agent = ?2",
                            )?
                            .query_row([channel, agent], |r| r.get::<_, i64>(0))
                            .optional()?
                            .map_or(0, |s| s as Seq);
                        if now == *expected {
                            tx.prepare_cached(
                                "INSERT OR REPLACE INTO cursors (channel, agent, seq) VALUES (?1, ?2, ?3)",
                            )?
                            .execute(params![channel, agent, *new as i64])?;
                            let added = insert_steps(&tx, steps, &mut out.changes)?;
                            out.swapped.push((Swap::Moved, added));
                        } else {
                            out.swapped.push((Swap::Lost(now), Vec::new()));
                        }
                    }
                    Op::Agent(key, seen, connected, _) => {
                        upsert_agent.execute(params![
                            key.channel.as_str(),
                            key.agent.as_str(),
                            *seen,
                            *connected
                        ])?;
                        out.changes.push(Change::Agent {
                            key: key.clone(),
                            seen: *seen,
                            connected: *connected,
                        });
                    }
                    Op::Forget(key, _) => {
                        let known = forget_rows(&tx, key)?;
                        if known {
                            out.changes.push(Change::Forgotten(key.clone()));
                        }
                        out.forgotten.push(known);
                    }
                    Op::Expire(before, limit, _) => {
                        let gone = expire_rows(&tx, *before, *limit)?;
                        out.changes
                            .extend(gone.iter().cloned().map(Change::Forgotten));
                        out.expired.push(gone);
                    }
                    Op::Subscription(key, pattern, on, _) => {
                        let sql = if *on {
                            "INSERT OR IGNORE INTO subscriptions (channel, agent, pattern) VALUES (?1, ?2, ?3)"
                        } else {
                            "DELETE FROM subscriptions WHERE channel = ?1 AND agent = ?2 AND pattern = ?3"
                        };
                        tx.prepare_cached(sql)?.execute(params![
                            key.channel.as_str(),
                            key.agent.as_str(),
                            pattern.as_str()
                        ])?;
                        out.changes.push(Change::Subscription {
                            key: key.clone(),
                            pattern: pattern.clone(),
                            on: *on,
                        });
                    }
                    Op::Identity(name, identity, _) => {
                        match identity {
                            Some(i) => {
                                let globs = |g: &Vec<String>| {
                                    serde_json::to_string(g).expect("strings serialize")
                                };
                                tx.prepare_cached(
                                "INSERT OR REPLACE INTO identities (name, channel, token_hash, may_send,
                                     may_publish, may_subscribe, admin, created)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                            )?
                            .execute(params![
                                name.as_str(),
                                i.channel.as_deref(),
                                i.token_hash,
                                globs(&i.may_send),
                                globs(&i.may_publish),
                                globs(&i.may_subscribe),
                                i.admin as i64,
                                i.created,
                            ])?;
                            }
                            None => {
                                tx.prepare_cached("DELETE FROM identities WHERE name = ?1")?
                                    .execute(params![name.as_str()])?;
                            }
                        }
                        out.changes.push(Change::Identity {
                            name: name.clone(),
                            identity: identity.clone(),
                        });
                    }
                    Op::Record(steps, _) => {
                        let new = insert_steps(&tx, steps, &mut out.changes)?;
                        out.recorded.push(new);
                    }
                    Op::Probe => {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?1)",
                        )?
                        .execute([crate::model::now()])?;
                    }
                    Op::Prune(plan, _) => {
                        let limit = self.pace.prune_limit();
                        out.pruned
                            .push(prune_rows(&tx, plan, limit, &mut out.changes)?)
                    }
                    Op::Close(_) => {}
                }
            }
        }
        tx.commit()
    }
}

/// What a queued message holds: its strings, and room for the rest.
fn queued_bytes(m: &NewMessage) -> usize {
    256 + m.body.as_str().len()
        + m.id.len()
        + m.topic.as_ref().map_or(0, String::len)
        + m.recipients
            .iter()
            .map(|r| r.as_str().len() + 24)
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a busy writer a prune step takes about what comes in (twice the
    /// newest commit, at least PRUNE_LEAST); on a quiet one, all it may.
    #[test]
    fn a_prune_step_keeps_pace_with_the_sends_it_shares_commits_with() {
        let mut pace = Pace {
            batch: 0,
            last_stored: std::time::Instant::now(),
        };
        pace.stored(8);
        assert_eq!(pace.prune_limit(), PRUNE_LEAST);
        pace.stored(0); // a commit that stored nothing changes nothing
        pace.stored(100);
        assert_eq!(pace.prune_limit(), 200);
        pace.stored(4096);
        assert_eq!(pace.prune_limit(), PRUNE_BUDGET);
        pace.stored(8);
        pace.last_stored -= PRUNE_QUIET;
        assert_eq!(pace.prune_limit(), PRUNE_BUDGET, "quiet: the whole budget");
    }

    // The queue was bounded by count alone: 8,192 appends of up to 10 MiB.
    #[tokio::test]
    async fn a_send_that_finds_the_writer_queue_full_waits_then_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let wait = Duration::from_millis(100);
        let engine: Arc<dyn Engine> =
            Arc::new(SqliteEngine::open_with_queue(&path, 1 << 20, wait).unwrap());
        super::super::conformance::follow(&engine);
        let big = |n| {
            let mut m = super::super::conformance::message("q", n, None);
            m.body = Body::from_json(format!("{{\"pad\":\"{}\"}}", "x".repeat(600 << 10))).unwrap();
            m
        };
        // Another process holds the write lock: the writer is stuck on its
        // first batch for BUSY_WAIT (1 s), far longer than `wait`.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let first = engine.submit(vec![big(1)]).await.unwrap();
        let start = std::time::Instant::now();
        let second = engine.submit(vec![big(2)]).await;
        let waited = start.elapsed();
        assert_eq!(second.err().map(|e| e.code()), Some("storage_busy"));
        assert!(waited >= wait, "answered after {waited:?}");
        // The first is answered (busy too: the lock), and its room given back.
        let _ = first.await;
        other.execute_batch("COMMIT").unwrap();
        let third = engine.submit(vec![big(3)]).await.unwrap();
        assert!(third.await.unwrap().is_ok(), "room again");
        // One batch larger than the whole queue still goes through alone.
        let huge: Vec<_> = (4..6).map(big).collect();
        assert!(engine.submit(huge).await.unwrap().await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn retention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        super::super::conformance::retention(|| Arc::new(SqliteEngine::open(&path).unwrap())).await;
    }

    #[tokio::test]
    async fn delivery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        super::super::conformance::delivery(|| Arc::new(SqliteEngine::open(&path).unwrap())).await;
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        super::super::conformance::run(|| Arc::new(SqliteEngine::open(&path).unwrap()), true).await;
    }

    #[tokio::test]
    async fn holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        super::super::conformance::holds(|| Arc::new(SqliteEngine::open(&path).unwrap()), true)
            .await;
    }
}
