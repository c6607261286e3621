//! What the checker records: every request, answer and delivery, in the
//! order the harness saw them, compactly (a long run holds millions).

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The agents whose inboxes are checked, each read through its own doors.
pub const AGENTS: [&str; 7] = ["ux0", "ux1", "ua0", "ip0", "ip1", "vs0", "ua1"];
/// Indices into [`AGENTS`].
pub const UX0: u8 = 0;
pub const UX1: u8 = 1;
pub const UA0: u8 = 2;
pub const IP0: u8 = 3;
pub const IP1: u8 = 4;
pub const VS0: u8 = 5;
/// Read by Unix auto mode *and* `/poll` at once.
pub const UA1: u8 = 6;

/// A seeded xorshift64* generator: one per client, derived from the run's
/// seed, so the schedule of choices is reproducible (the interleaving with
/// the daemon's threads is what the seed cannot pin).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Rng((seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
        for _ in 0..4 {
            r.next();
        }
        r
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// A message the harness sent: sender index and its n-th send. It travels
/// in the body (`{"k": "s1-42"}`, or the text `s1-42` over agent-bus).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub u64);

impl Key {
    pub fn new(sender: usize, n: u64) -> Self {
        Key(sender as u64 * 1_000_000_000 + n)
    }

    pub fn sender(self) -> usize {
        (self.0 / 1_000_000_000) as usize
    }

    pub fn text(self) -> String {
        self.to_string()
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (sender, n) = s.strip_prefix('s')?.split_once('-')?;
        Some(Key::new(sender.parse().ok()?, n.parse().ok()?))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "s{}-{}", self.0 / 1_000_000_000, self.0 % 1_000_000_000)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The door a request or a session went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// Unix `send` frame, one at a time.
    UnixSend,
    /// Unix `send` frames pipelined on one connection.
    UnixPipe,
    /// agent-bus `POST /send`.
    AbSend,
    /// v1 `POST /v1/messages`.
    V1Post,
    /// v1 WebSocket `send` frame.
    WsSend,
    /// SSE-interop `POST /broadcast`.
    IopBroadcast,
    /// Unix registration with `"ack":"explicit"` (destructive on ack).
    UnixExplicit,
    /// Unix registration in the default auto-ack mode (destructive).
    UnixAuto,
    /// SSE-interop `/subscribe` (destructive, shares the cursor with `/poll`).
    IopSubscribe,
    /// SSE-interop `/poll` (destructive); one session per answer.
    IopPoll,
    /// v1 SSE `/v1/agents/{name}/stream` (from `after` / `Last-Event-ID`).
    V1Sse,
    /// v1 WebSocket inbox with explicit `ack` frames.
    V1Ws,
    /// agent-bus `GET /recv` following `since` (non-destructive).
    AbRecv,
}

impl Door {
    /// Destructive readers: what they are handed counts as read.
    pub fn destructive(self) -> bool {
        matches!(
            self,
            Door::UnixExplicit | Door::UnixAuto | Door::IopSubscribe | Door::IopPoll | Door::V1Ws
        )
    }

    /// Push streams whose last batch may come again after the stream ends
    /// (at-least-once across a cut: the daemon confirms what the peer
    /// consumed, and a cut can come between consuming and confirming).
    pub fn stream(self) -> bool {
        matches!(self, Door::UnixAuto | Door::IopSubscribe)
    }
}

#[derive(Clone, Debug)]
pub enum Kind {
    Send {
        key: Key,
        to: Option<u8>,
        door: Door,
    },
    Acked {
        key: Key,
        seq: u64,
    },
    /// An error answer: nothing may be stored.
    Refused {
        key: Key,
        why: String,
    },
    /// Acknowledged with a notice (held by the loop guard, ...): the
    /// traffic is built never to get one.
    Notice {
        key: Key,
        notice: String,
    },
    /// No answer (cut, timeout, daemon killed): either outcome is allowed.
    Unknown {
        key: Key,
    },
    Open {
        sess: u32,
    },
    Close {
        sess: u32,
        why: &'static str,
    },
    Deliver {
        sess: u32,
        seq: u64,
    },
    /// A `gap` signal (retention is off: there must be none).
    Gap {
        sess: u32,
    },
    AckSent {
        sess: u32,
        seq: u64,
    },
    /// The `pong` after an `ack`: the daemon processed it.
    AckDone {
        sess: u32,
        seq: u64,
    },
    /// An error answered an `ack` (before its `pong`): nothing moved.
    AckRefused {
        sess: u32,
        seq: u64,
    },
    /// An agent-bus follower's `since` after an answer.
    Since {
        sess: u32,
        since: f64,
    },
    /// The client stops reading for `ms`.
    Stall {
        sess: u32,
        ms: u64,
    },
    /// A sampled cursor, and the highest acknowledged cursor move known
    /// before the sample was asked for.
    Cursor {
        agent: u8,
        cursor: u64,
        floor: u64,
    },
    Kill,
    Restart,
    /// A store fault begins (`on`) or ends: a full disk, the database
    /// locked by another process, a NATS server killed.
    Fault {
        what: &'static str,
        on: bool,
    },
}

pub struct Ev {
    /// Microseconds since the start.
    pub t: u64,
    pub kind: Kind,
}

pub struct Session {
    pub door: Door,
    /// Index into [`AGENTS`], or `u8::MAX` for a sender's connection.
    pub agent: u8,
    pub actor: String,
    /// Where the session asked to start (`after`, `Last-Event-ID`).
    pub after: Option<u64>,
    /// An agent-bus follower's first `since`.
    pub since: Option<f64>,
}

pub struct History {
    start: Instant,
    /// The wall clock at `start` (seconds since the epoch, as the daemon's
    /// step times are): places a daemon's step among the events.
    pub epoch: f64,
    pub events: Mutex<Vec<Ev>>,
    pub sessions: Mutex<Vec<Session>>,
    /// Per agent: the highest cursor move the daemon acknowledged.
    pub floors: [AtomicU64; AGENTS.len()],
    /// Per agent: seqs handed out by a destructive door (for the drain).
    pub taken: Mutex<Vec<HashSet<u64>>>,
    /// Per agent: the last seq the v1 SSE follower saw, and the agent-bus
    /// follower's `since` (bits of an f64).
    pub followed: [AtomicU64; AGENTS.len()],
    pub since: [AtomicU64; AGENTS.len()],
}

impl History {
    pub fn new() -> Self {
        History {
            start: Instant::now(),
            epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64(),
            events: Mutex::new(Vec::new()),
            sessions: Mutex::new(Vec::new()),
            floors: Default::default(),
            taken: Mutex::new(vec![HashSet::new(); AGENTS.len()]),
            followed: Default::default(),
            since: Default::default(),
        }
    }

    pub fn push(&self, kind: Kind) {
        let t = self.start.elapsed().as_micros() as u64;
        self.events.lock().unwrap().push(Ev { t, kind });
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.start.elapsed()
    }

    /// Opens a session and records it.
    pub fn open(&self, door: Door, agent: u8, actor: &str, after: Option<u64>) -> u32 {
        self.open_since(door, agent, actor, after, None)
    }

    pub fn open_since(
        &self,
        door: Door,
        agent: u8,
        actor: &str,
        after: Option<u64>,
        since: Option<f64>,
    ) -> u32 {
        let sess = {
            let mut s = self.sessions.lock().unwrap();
            s.push(Session {
                door,
                agent,
                actor: actor.to_owned(),
                after,
                since,
            });
            (s.len() - 1) as u32
        };
        self.push(Kind::Open { sess });
        sess
    }

    /// A delivery on `sess` of `agent`'s inbox through `door`.
    pub fn deliver(&self, sess: u32, agent: u8, door: Door, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let t = self.start.elapsed().as_micros() as u64;
        {
            let mut ev = self.events.lock().unwrap();
            for &seq in seqs {
                ev.push(Ev {
                    t,
                    kind: Kind::Deliver { sess, seq },
                });
            }
        }
        if door.destructive() {
            self.taken.lock().unwrap()[agent as usize].extend(seqs.iter().copied());
        }
    }

    pub fn raise_floor(&self, agent: u8, seq: u64) {
        self.floors[agent as usize].fetch_max(seq, Ordering::SeqCst);
    }
}
