//! The embedded engine: one SQLite database in WAL mode.
//!
//! One writer thread owns the write connection and does **group commit**: it
//! blocks for one queued operation, drains whatever else is queued (up to
//! [`MAX_BATCH`]), applies all of it in one transaction and commits once —
//! one fsync (`synchronous=FULL`) for the whole batch — then reports the
//! batch to the observer and completes every sender. No timer is involved:
//! under light load a batch is one message, under heavy load batches grow.
//!
//! Readers use a small pool of read-only connections; WAL lets them run
//! alongside the writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{CommitObserver, Committed, Durable, Engine, KnownAgent};
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::model::{AgentName, Auth, Body, BusClock, Channel, InboxKey, Message, NewMessage, Seq};

/// Most queued operations applied in one transaction.
pub const MAX_BATCH: usize = 4096;
/// Capacity of the writer's queue; senders wait when it is full.
const QUEUE: usize = 8192;
/// Read connections kept open.
const READERS: usize = 4;

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
    auth      TEXT
);
-- The inbox index: which inboxes each message landed in.
CREATE TABLE IF NOT EXISTS inbox (
    channel TEXT NOT NULL,
    agent   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (channel, agent, seq)
) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS agents (
    channel    TEXT NOT NULL,
    name       TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    PRIMARY KEY (channel, name)
) WITHOUT ROWID;
";

enum Op {
    Append {
        batch: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Arc<Message>>>>,
    },
    Cursor(InboxKey, Seq),
    Agent(InboxKey, f64),
    Subscription(InboxKey, String, bool),
    /// Answered once durable: a caller prints a token only after this.
    Identity {
        name: AgentName,
        identity: Option<Identity>,
        reply: oneshot::Sender<Result<()>>,
    },
    Close(oneshot::Sender<()>),
}

/// See the module docs.
pub struct SqliteEngine {
    tx: mpsc::Sender<Op>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
}

impl SqliteEngine {
    /// Opens (creating if needed) the database at `path` and starts the writer.
    pub fn open(path: &Path, observer: Arc<dyn CommitObserver>) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let (seq, ts) = newest(&conn)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            conn,
            seq,
            clock: BusClock::starting_after(ts),
            observer,
        };
        std::thread::Builder::new()
            .name("hermod-sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::Storage(format!("cannot start writer: {e}")))?;
        Ok(Self {
            tx,
            readers: Mutex::new(Vec::new()),
            path: path.to_owned(),
        })
    }

    /// Runs `f` on a pooled read connection.
    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let pooled = self.readers.lock().unwrap().pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                c
            }
        };
        let result = f(&conn);
        let mut pool = self.readers.lock().unwrap();
        if pool.len() < READERS {
            pool.push(conn);
        }
        Ok(result?)
    }

    async fn queue(&self, op: Op) -> Result<()> {
        self.tx.send(op).await.map_err(|_| Error::ShuttingDown)
    }
}

/// The newest (seq, ts) in the log, (0, 0.0) when empty. One B-tree step
/// from the end: `ts` grows with `seq`, so the last row holds both maxima
/// (`MAX(ts)` would scan every row: 0.4 s per 3 million messages at start).
fn newest(conn: &Connection) -> rusqlite::Result<(Seq, f64)> {
    conn.query_row(
        "SELECT seq, ts FROM messages ORDER BY seq DESC LIMIT 1",
        [],
        |r| Ok((r.get::<_, i64>(0)? as Seq, r.get(1)?)),
    )
    .optional()
    .map(|row| row.unwrap_or((0, 0.0)))
}

/// Brings a database made by an older hermod up to [`SCHEMA`].
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_auth: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('messages') WHERE name = 'auth'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_auth {
        // Older rows keep NULL: their senders were never verified (`open`).
        conn.execute_batch("ALTER TABLE messages ADD COLUMN auth TEXT")?;
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
        body: Body::from_json(body).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
        })?,
    })
}

#[async_trait]
impl Engine for SqliteEngine {
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable> {
        let (reply, rx) = oneshot::channel();
        self.queue(Op::Append { batch, reply }).await?;
        Ok(rx)
    }

    fn read_inbox(&self, key: &InboxKey, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT m.seq, m.id, m.ts, m.channel, m.sender, m.recipient, m.topic, m.sent_ts, m.body, m.auth
                 FROM inbox i JOIN messages m ON m.seq = i.seq
                 WHERE i.channel = ?1 AND i.agent = ?2 AND i.seq > ?3
                 ORDER BY i.seq LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![key.channel.as_str(), key.agent.as_str(), after as i64, limit as i64],
                row_to_message,
            )?;
            rows.map(|r| r.map(Arc::new)).collect()
        })
    }

    fn read_topics(
        &self,
        channel: &Channel,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, id, ts, channel, sender, recipient, topic, sent_ts, body, auth
                 FROM messages
                 WHERE topic IS NOT NULL AND channel = ?1 AND seq > ?2
                 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![channel.as_str(), after as i64, limit as i64],
                row_to_message,
            )?;
            rows.map(|r| r.map(Arc::new)).collect()
        })
    }

    fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
        // ts grows with seq, so a binary search over seq needs no ts index
        // (one less index to write per message).
        self.with_reader(|c| {
            let mut next = c.prepare_cached(
                "SELECT seq, ts FROM messages WHERE seq >= ?1 ORDER BY seq LIMIT 1",
            )?;
            let mut at_or_after = |seq: i64| -> rusqlite::Result<Option<(i64, f64)>> {
                next.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            };
            let (mut lo, mut hi) = match (
                at_or_after(0)?,
                c.query_row("SELECT MAX(seq) FROM messages", [], |r| {
                    r.get::<_, Option<i64>>(0)
                })?,
            ) {
                (Some((first, first_ts)), Some(last)) if first_ts <= ts => (first, last),
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
        })
    }

    fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        self.with_reader(|c| {
            c.prepare_cached(
                "SELECT COUNT(*) FROM inbox WHERE channel = ?1 AND agent = ?2 AND seq > ?3",
            )?
            .query_row(
                params![key.channel.as_str(), key.agent.as_str(), after as i64],
                |r| r.get::<_, i64>(0).map(|n| n as u64),
            )
        })
    }

    fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT seq FROM cursors WHERE channel = ?1 AND agent = ?2")?
                .query_row(params![key.channel.as_str(), key.agent.as_str()], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()
                .map(|s| s.unwrap_or(0) as Seq)
        })
    }

    async fn set_cursor(&self, key: InboxKey, seq: Seq) -> Result<()> {
        self.queue(Op::Cursor(key, seq)).await
    }

    async fn remember_agent(&self, key: InboxKey, seen: f64) -> Result<()> {
        self.queue(Op::Agent(key, seen)).await
    }

    async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()> {
        self.queue(Op::Subscription(key, pattern, on)).await
    }

    fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>> {
        self.with_reader(|c| {
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
                if let (Ok(channel), Ok(agent)) = (Channel::parse(channel), AgentName::parse(agent))
                {
                    out.push((InboxKey { channel, agent }, pattern));
                }
            }
            Ok(out)
        })
    }

    async fn set_identity(&self, name: AgentName, identity: Option<Identity>) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.queue(Op::Identity {
            name,
            identity,
            reply,
        })
        .await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    fn identities(&self) -> Result<Vec<Identity>> {
        self.with_reader(|c| {
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
                let Ok(name) = AgentName::parse(name) else { continue };
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
        })
    }

    fn agents(&self) -> Result<Vec<KnownAgent>> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT channel, name, first_seen, last_seen FROM agents ORDER BY channel, name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, f64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (channel, name, first_seen, last_seen) = row?;
                // Rows were validated on the way in; skip anything foreign.
                if let (Ok(channel), Ok(agent)) = (Channel::parse(channel), AgentName::parse(name))
                {
                    out.push(KnownAgent {
                        key: InboxKey { channel, agent },
                        first_seen,
                        last_seen,
                    });
                }
            }
            Ok(out)
        })
    }

    fn last(&self) -> Result<(Seq, f64)> {
        self.with_reader(newest)
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The single writer: owns the write connection, seq and clock.
struct Writer {
    conn: Connection,
    seq: Seq,
    clock: BusClock,
    observer: Arc<dyn CommitObserver>,
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

    /// Applies `ops` in one transaction and answers every sender. Returns
    /// the close handshake if one was queued.
    fn commit(&mut self, ops: &mut Vec<Op>) -> Option<oneshot::Sender<()>> {
        let start_seq = self.seq;
        let mut committed: Vec<Committed> = Vec::new();
        self.observer.stamping();
        let result = self.apply(ops, &mut committed);
        let mut closing = None;
        match result {
            Ok(()) => {
                self.observer.committed(&committed);
                let mut stored = committed.into_iter().map(|c| c.message);
                for op in ops.drain(..) {
                    match op {
                        Op::Append { batch, reply } => {
                            let mine: Vec<_> = stored.by_ref().take(batch.len()).collect();
                            let _ = reply.send(Ok(mine));
                        }
                        Op::Identity { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                        Op::Close(done) => closing = Some(done),
                        Op::Cursor(..) | Op::Agent(..) | Op::Subscription(..) => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; {} operations refused", ops.len());
                self.observer.committed(&[]);
                self.seq = start_seq;
                for op in ops.drain(..) {
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Err(Error::Storage(e.to_string())));
                        }
                        Op::Identity { reply, .. } => {
                            let _ = reply.send(Err(Error::Storage(e.to_string())));
                        }
                        Op::Close(done) => closing = Some(done),
                        Op::Cursor(..) | Op::Agent(..) | Op::Subscription(..) => {}
                    }
                }
            }
        }
        closing
    }

    fn apply(&mut self, ops: &[Op], committed: &mut Vec<Committed>) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut insert_msg = tx.prepare_cached(
                "INSERT INTO messages (seq, id, ts, channel, sender, recipient, topic, sent_ts, body, auth)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let mut insert_inbox =
                tx.prepare_cached("INSERT INTO inbox (channel, agent, seq) VALUES (?1, ?2, ?3)")?;
            let mut upsert_cursor = tx.prepare_cached(
                "INSERT INTO cursors (channel, agent, seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (channel, agent) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            )?;
            let mut upsert_agent = tx.prepare_cached(
                "INSERT INTO agents (channel, name, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (channel, name) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen)",
            )?;
            for op in ops {
                match op {
                    Op::Append { batch, .. } => {
                        for m in batch {
                            self.seq += 1;
                            let ts = self.clock.stamp();
                            insert_msg.execute(params![
                                self.seq as i64,
                                m.id,
                                ts,
                                m.channel.as_str(),
                                m.from.as_str(),
                                m.to.as_deref(),
                                m.topic,
                                m.sent_ts,
                                m.body.as_str(),
                                m.auth.as_str(),
                            ])?;
                            for r in &m.recipients {
                                insert_inbox.execute(params![
                                    m.channel.as_str(),
                                    r.as_str(),
                                    self.seq as i64
                                ])?;
                            }
                            committed.push(Committed {
                                recipients: m.recipients.clone(),
                                message: Arc::new(m.clone().into_message(self.seq, ts)),
                            });
                        }
                    }
                    Op::Cursor(key, seq) => {
                        upsert_cursor.execute(params![
                            key.channel.as_str(),
                            key.agent.as_str(),
                            *seq as i64
                        ])?;
                    }
                    Op::Agent(key, seen) => {
                        upsert_agent.execute(params![
                            key.channel.as_str(),
                            key.agent.as_str(),
                            seen
                        ])?;
                    }
                    Op::Subscription(key, pattern, on) => {
                        let sql = if *on {
                            "INSERT OR IGNORE INTO subscriptions (channel, agent, pattern) VALUES (?1, ?2, ?3)"
                        } else {
                            "DELETE FROM subscriptions WHERE channel = ?1 AND agent = ?2 AND pattern = ?3"
                        };
                        tx.prepare_cached(sql)?.execute(params![
                            key.channel.as_str(),
                            key.agent.as_str(),
                            pattern
                        ])?;
                    }
                    Op::Identity { name, identity, .. } => match identity {
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
                    },
                    Op::Close(_) => {}
                }
            }
        }
        tx.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sink(Mutex<Vec<Seq>>);
    impl CommitObserver for Sink {
        fn stamping(&self) {}
        fn committed(&self, batch: &[Committed]) {
            self.0
                .lock()
                .unwrap()
                .extend(batch.iter().map(|c| c.message.seq));
        }
    }

    fn msg(to: &str, n: i64) -> NewMessage {
        let body = Body::from_json(format!("{{\"n\":{n}}}")).unwrap();
        NewMessage {
            id: format!("id-{n}"),
            channel: Channel::default(),
            from: AgentName::parse("a").unwrap(),
            to: Some(AgentName::parse(to).unwrap()),
            topic: None,
            sent_ts: None,
            auth: Default::default(),
            body,
            recipients: vec![AgentName::parse(to).unwrap()],
        }
    }

    #[tokio::test]
    async fn append_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let sink = Arc::new(Sink(Mutex::default()));
        let key = InboxKey::new(Channel::default(), AgentName::parse("b").unwrap());
        {
            let e = SqliteEngine::open(&path, sink.clone()).unwrap();
            let mut pending = Vec::new();
            for n in 0..100 {
                pending.push(e.submit(vec![msg("b", n)]).await.unwrap());
            }
            for p in pending {
                p.await.unwrap().unwrap();
            }
            e.set_cursor(key.clone(), 40).await.unwrap();
            e.set_cursor(key.clone(), 30).await.unwrap();
            e.close().await;
        }
        assert_eq!(*sink.0.lock().unwrap(), (1..=100).collect::<Vec<_>>());
        let e = SqliteEngine::open(&path, sink.clone()).unwrap();
        assert_eq!(e.cursor(&key).unwrap(), 40);
        let got = e.read_inbox(&key, 40, 1000).unwrap();
        assert_eq!(got.len(), 60);
        assert_eq!(got[0].body.as_str(), r#"{"n":40}"#);
        assert!(got.windows(2).all(|w| w[0].ts < w[1].ts));
        assert_eq!(e.count_inbox(&key, 90).unwrap(), 10);
        assert_eq!(e.seq_at_ts(got[5].ts).unwrap(), 46);
        let next = e
            .submit(vec![msg("b", 100)])
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next[0].seq, 101);
        assert!(next[0].ts > got.last().unwrap().ts);
        e.close().await;
    }
}
