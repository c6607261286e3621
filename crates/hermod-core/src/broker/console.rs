//! What the web console reads that no other door needs, and its logins.
//!
//! - **Recent traffic**: a ring of the newest [`RECENT`] direct messages
//!   and broadcasts (topic events are not traffic) with each recipient's
//!   delivery state, kept from the feed: the message's envelope and a
//!   short preview (never its body), then every recorded step that
//!   covers it. A console page reads this ring and
//!   never the store, so it costs the same whether the log holds a hundred
//!   messages or ten million.
//! - **Rates**: messages per [`RATE_BUCKET`] seconds over the last
//!   [`RATE_BUCKETS`] buckets.
//! - **Live traffic** for console streams: each watcher has a bounded
//!   queue; one that falls behind misses updates (it is told to reload)
//!   rather than slowing the feed.
//! - **Logins**: one-time links (valid [`LINK_TTL`] s, used once) that
//!   become sessions with a CSRF token, expiring when idle; only their
//!   SHA-256 is kept. Node-local memory: a restart logs everyone out.
//!
//! One lock of its own, taken after (never with) the broker's others.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;

use hermod_proto::identity::digest;

use super::*;
use crate::engine::{Committed, Step};
use crate::model::State as Delivery;

/// Messages the recent ring keeps.
pub const RECENT: usize = 1000;
/// Seconds per rate bucket.
pub const RATE_BUCKET: f64 = 10.0;
/// Rate buckets kept (10 minutes).
pub const RATE_BUCKETS: usize = 60;
/// How long a login link works.
pub const LINK_TTL: f64 = 60.0;
/// Unused login links kept at most (the oldest goes first).
const LINKS_MAX: usize = 16;
/// Sessions kept at most (the least recently used goes first).
const SESSIONS_MAX: usize = 64;
/// Console streams watching the traffic at once, at most.
pub const WATCHERS_MAX: usize = 16;
/// Recipients whose state the ring follows per message, at most (a
/// broadcast to thousands would otherwise cost the ring thousands of
/// entries): a broadcast's badge is that of its first ones.
pub const RECIPIENTS_MAX: usize = 64;

/// Characters of a body a preview shows at most.
pub const PREVIEW_CHARS: usize = 200;
/// Bytes of a body's JSON the ring keeps.
const HEAD_BYTES: usize = 1024;

/// What the ring keeps of a message: its envelope and the start of its
/// body, never the whole body (1,000 bodies of up to 10 MiB would be
/// memory outside the budget), so an entry costs about a kilobyte. The
/// body is not parsed here: this runs on the feed's path, for every
/// message; a page makes the preview when it shows one.
#[derive(Debug, Clone)]
pub struct Brief {
    pub seq: Seq,
    pub id: String,
    pub ts: f64,
    pub channel: Channel,
    pub from: AgentName,
    /// `None`: a broadcast.
    pub to: Option<AgentName>,
    pub auth: crate::model::Auth,
    pub thread: Option<String>,
    /// The first [`HEAD_BYTES`] of the body's JSON (at a character
    /// boundary), and whether that is all of it.
    head: String,
    whole: bool,
}

impl Brief {
    fn of(m: &Message) -> Self {
        let raw = m.body.as_str();
        let mut cut = raw.len().min(HEAD_BYTES);
        while !raw.is_char_boundary(cut) {
            cut -= 1;
        }
        Brief {
            seq: m.seq,
            id: m.id.clone(),
            ts: m.ts,
            channel: m.channel.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            auth: m.auth,
            thread: m.meta().thread.clone(),
            head: raw[..cut].to_owned(),
            whole: cut == raw.len(),
        }
    }

    /// The body's text (as text-only protocols show it) or, for a body
    /// longer than the ring keeps, the start of its JSON; control
    /// characters escaped, at most `max` characters.
    pub fn preview(&self, max: usize) -> String {
        let text = match self.whole {
            true => Body::from_json(self.head.clone())
                .map(|b| b.to_text())
                .unwrap_or_else(|_| self.head.clone()),
            false => self.head.clone(),
        };
        crate::text::terminal_line(&text, max.min(PREVIEW_CHARS))
    }
}

/// A message of the recent ring, with where it stands for each recipient.
#[derive(Debug, Clone)]
pub struct Seen {
    pub message: Brief,
    /// Each recipient and its furthest state (a held message: its `to`),
    /// at most [`RECIPIENTS_MAX`].
    pub recipients: Vec<(AgentName, Delivery)>,
    /// The loop guard held it and a release sent it on as this seq.
    pub released_as: Option<Seq>,
}

impl Seen {
    /// The badge the console shows: `released` for a hold that went on,
    /// else the least advanced recipient's state (a broadcast is `read`
    /// once everyone read it).
    pub fn badge(&self) -> &'static str {
        if self.released_as.is_some() {
            return "released";
        }
        self.recipients
            .iter()
            .map(|(_, s)| *s)
            .min_by_key(|s| rank(*s))
            .unwrap_or(Delivery::Stored)
            .as_str()
    }
}

/// How far a state is along (as receipts order them): a step never moves
/// a message back, and `expired` counts only for one never handed out.
fn rank(state: Delivery) -> u8 {
    match state {
        Delivery::Stored => 0,
        Delivery::Held => 1,
        Delivery::Bounced => 2,
        Delivery::Delivered => 3,
        Delivery::Read => 4,
        Delivery::Replied => 5,
        Delivery::Expired => 6,
    }
}

fn advance(current: Delivery, step: Delivery) -> Option<Delivery> {
    let handed = matches!(
        current,
        Delivery::Delivered | Delivery::Read | Delivery::Replied
    );
    if step == Delivery::Expired && handed {
        return None;
    }
    (rank(step) > rank(current)).then_some(step)
}

/// What a console stream is told.
#[derive(Debug, Clone)]
pub enum Live {
    /// A message was stored.
    Message(Seen),
    /// The message at `seq` has a new badge.
    Badge { seq: Seq, badge: &'static str },
}

/// One console stream's view of the live traffic.
pub struct TrafficWatch {
    pub rx: mpsc::Receiver<Live>,
    /// Set when an update did not fit in the queue: the stream missed it.
    pub lagged: Arc<AtomicBool>,
}

/// A logged-in console session.
#[derive(Debug, Clone)]
pub struct ConsoleSession {
    /// What every write must carry.
    pub csrf: String,
    /// Cancelled when the session ends (idle, or `--logout-all`): its
    /// streams end with it.
    pub ended: CancellationToken,
}

struct SessionEntry {
    session: ConsoleSession,
    last_used: f64,
}

#[derive(Default)]
pub(super) struct Console {
    recent: VecDeque<Seen>,
    /// (bucket number, messages) oldest first.
    rates: VecDeque<(i64, u64)>,
    /// Each console stream's queue, and its flag saying it missed some.
    watchers: Vec<(mpsc::Sender<Live>, Arc<AtomicBool>)>,
    links: HashMap<[u8; 32], f64>,
    sessions: HashMap<[u8; 32], SessionEntry>,
    /// Where the console is served (`http://HOST:PORT`), once known.
    url: Option<String>,
}

impl Console {
    /// A commit's messages: into the ring, the rates and the watchers.
    pub(super) fn push(&mut self, batch: &[Committed], dropped: &AtomicU64) {
        for c in batch {
            let m = &c.message;
            if m.topic.is_some() {
                continue;
            }
            let recipients = match (&m.to, c.guard) {
                (Some(to), Guarded::Held) => vec![(to.clone(), Delivery::Held)],
                _ => c
                    .recipients
                    .iter()
                    .take(RECIPIENTS_MAX)
                    .map(|r| (r.clone(), Delivery::Stored))
                    .collect(),
            };
            if let Guarded::Releases(held) = c.guard {
                if let Some(s) = self.recent.iter_mut().find(|s| s.message.seq == held) {
                    s.released_as = Some(m.seq);
                }
                self.tell(
                    Live::Badge {
                        seq: held,
                        badge: "released",
                    },
                    dropped,
                );
            }
            let seen = Seen {
                message: Brief::of(m),
                recipients,
                released_as: None,
            };
            let bucket = (m.ts / RATE_BUCKET).floor() as i64;
            match self.rates.back_mut() {
                Some((b, n)) if *b == bucket => *n += 1,
                _ => self.rates.push_back((bucket, 1)),
            }
            while self
                .rates
                .front()
                .is_some_and(|(b, _)| *b <= bucket - RATE_BUCKETS as i64)
            {
                self.rates.pop_front();
            }
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(seen.clone());
            self.tell(Live::Message(seen), dropped);
        }
    }

    /// A recorded step: the badges of the ring's messages it covers.
    pub(super) fn step(&mut self, step: &Step, dropped: &AtomicU64) {
        // The ring is in seq order: only its tail can be covered.
        let mut changed = Vec::new();
        for s in self.recent.iter_mut().rev() {
            if s.message.seq <= step.lo {
                break;
            }
            if !step.covers(s.message.seq) || s.message.channel != step.key.channel {
                continue;
            }
            let before = s.badge();
            for (agent, state) in &mut s.recipients {
                if agent == &step.key.agent {
                    if let Some(next) = advance(*state, step.state) {
                        *state = next;
                    }
                }
            }
            if s.badge() != before {
                changed.push((s.message.seq, s.badge()));
            }
        }
        for (seq, badge) in changed.into_iter().rev() {
            self.tell(Live::Badge { seq, badge }, dropped);
        }
    }

    fn tell(&mut self, live: Live, dropped: &AtomicU64) {
        self.watchers.retain(|(w, _)| !w.is_closed());
        for (w, lagged) in &self.watchers {
            if w.try_send(live.clone()).is_err() {
                lagged.store(true, Ordering::Relaxed);
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Messages per rate bucket, oldest first, the newest being now's.
pub type Rates = Vec<u64>;

impl Broker {
    /// The newest recent messages that `keep` accepts, newest first, at
    /// most `limit`.
    pub fn recent(&self, limit: usize, keep: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        let console = self.shared.console.lock().unwrap();
        console
            .recent
            .iter()
            .rev()
            .filter(|s| keep(s))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Retention's floors: how many views it pruned, and the highest
    /// pruned seq among them.
    pub fn retention_floors(&self) -> (usize, Seq) {
        self.shared.views.lock().unwrap().inboxes.floors()
    }

    /// Messages stored per [`RATE_BUCKET`] over the last [`RATE_BUCKETS`],
    /// oldest first (seen by this node since it started).
    pub fn rates(&self) -> Rates {
        let now = (model::now() / RATE_BUCKET).floor() as i64;
        let console = self.shared.console.lock().unwrap();
        (now - RATE_BUCKETS as i64 + 1..=now)
            .map(|b| {
                console
                    .rates
                    .iter()
                    .find(|(x, _)| *x == b)
                    .map_or(0, |(_, n)| *n)
            })
            .collect()
    }

    /// Live traffic for one console stream, through a queue of `capacity`;
    /// `None` when [`WATCHERS_MAX`] streams watch already.
    pub fn watch_traffic(&self, capacity: usize) -> Option<TrafficWatch> {
        let mut console = self.shared.console.lock().unwrap();
        console.watchers.retain(|(w, _)| !w.is_closed());
        if console.watchers.len() >= WATCHERS_MAX {
            return None;
        }
        let (tx, rx) = mpsc::channel(capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        console.watchers.push((tx, lagged.clone()));
        Some(TrafficWatch { rx, lagged })
    }

    /// Updates console streams missed because their queue was full.
    pub fn traffic_dropped(&self) -> u64 {
        self.shared.console_dropped.load(Ordering::Relaxed)
    }

    /// Where the console is served, for login links (set by the HTTP front).
    pub fn set_console_url(&self, url: String) {
        self.shared.console.lock().unwrap().url = Some(url);
    }

    /// A one-time console login link for `caller` (the owner or an admin):
    /// the full URL when the HTTP front is up, else an error.
    pub fn console_link(&self, caller: &Caller) -> Result<String> {
        self.trust.may_admin(caller)?;
        let (secret, _) = auth::new_token();
        let now = model::now();
        let mut console = self.shared.console.lock().unwrap();
        let Some(url) = console.url.clone() else {
            return Err(Error::InvalidRequest(
                "this daemon serves no HTTP (started with --no-http): no console".into(),
            ));
        };
        console.links.retain(|_, expires| *expires > now);
        if console.links.len() >= LINKS_MAX {
            let oldest = console
                .links
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                console.links.remove(&k);
            }
        }
        console.links.insert(digest(&secret), now + LINK_TTL);
        Ok(format!("{url}/console/login/{secret}"))
    }

    /// Uses a login link: once, within [`LINK_TTL`]. Answers the new
    /// session's secret (the cookie) and the session.
    pub fn console_login(&self, link: &str) -> Option<(String, ConsoleSession)> {
        let now = model::now();
        let mut console = self.shared.console.lock().unwrap();
        let expires = console.links.remove(&digest(link))?;
        if expires <= now {
            return None;
        }
        if console.sessions.len() >= SESSIONS_MAX {
            let oldest = console
                .sessions
                .iter()
                .min_by(|a, b| a.1.last_used.total_cmp(&b.1.last_used))
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                if let Some(old) = console.sessions.remove(&k) {
                    old.session.ended.cancel();
                }
            }
        }
        let (secret, _) = auth::new_token();
        let (csrf, _) = auth::new_token();
        let session = ConsoleSession {
            csrf,
            ended: CancellationToken::new(),
        };
        console.sessions.insert(
            digest(&secret),
            SessionEntry {
                session: session.clone(),
                last_used: now,
            },
        );
        Some((secret, session))
    }

    /// The session whose cookie is `secret`, if it was used within `idle`
    /// seconds (which this use renews when `renew`: a page's own
    /// background refresh does not, so a forgotten tab still expires).
    pub fn console_session(&self, secret: &str, idle: f64, renew: bool) -> Option<ConsoleSession> {
        let now = model::now();
        let key = digest(secret);
        let mut console = self.shared.console.lock().unwrap();
        let entry = console.sessions.get_mut(&key)?;
        if entry.last_used + idle < now {
            if let Some(old) = console.sessions.remove(&key) {
                old.session.ended.cancel();
            }
            return None;
        }
        if renew {
            entry.last_used = now;
        }
        Some(entry.session.clone())
    }

    /// Ends the session whose cookie is `secret` (logging out).
    pub fn console_logout(&self, secret: &str) {
        let mut console = self.shared.console.lock().unwrap();
        if let Some(old) = console.sessions.remove(&digest(secret)) {
            old.session.ended.cancel();
        }
    }

    /// Ends every console session and unused link (`hermod console
    /// --logout-all`); owner or admin. Answers how many sessions ended.
    pub fn console_logout_all(&self, caller: &Caller) -> Result<usize> {
        self.trust.may_admin(caller)?;
        let mut console = self.shared.console.lock().unwrap();
        console.links.clear();
        let n = console.sessions.len();
        for (_, old) in console.sessions.drain() {
            old.session.ended.cancel();
        }
        Ok(n)
    }
}
