//! The promises, checked on the recorded history and the inboxes as a
//! non-destructive read shows them after the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use super::record::*;

/// How many of a cut stream's last deliveries may come again: the batch
/// the daemon had not confirmed when the stream was cut (Unix delivers
/// 512 at a time, SSE 256; two in flight at most).
const TAIL: usize = 1024;

/// The inbox of one agent: `(seq, ts, key)` in seq order.
pub type Inbox = Vec<(u64, f64, Option<Key>)>;

pub struct Violation {
    pub promise: &'static str,
    pub agent: Option<u8>,
    pub seq: Option<u64>,
    pub key: Option<Key>,
    pub detail: String,
    /// Sessions whose opening and closing belong in the excerpt.
    pub sessions: Vec<u32>,
    /// Other events that belong in it (event indices).
    pub extra: Vec<usize>,
}

impl Violation {
    /// Deliveries by other doors that belong in the excerpt.
    fn shows(&self, door: Door) -> bool {
        match self.promise {
            DESTRUCTIVE_ONCE | HANDED_OUT => door.destructive(),
            _ => true,
        }
    }
}

const DESTRUCTIVE_ONCE: &str = "a destructive read hands a message out once";
const HANDED_OUT: &str = "every message is handed out by the destructive doors";

#[derive(Default)]
pub struct Figures {
    /// Store faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    pub sent: usize,
    pub acked: usize,
    pub refused: usize,
    /// Refusals by error code (`connect` while the daemon was down).
    pub refused_by: BTreeMap<String, usize>,
    pub unknown: usize,
    /// Unknown outcomes by the door of their send.
    pub unknown_by: BTreeMap<String, usize>,
    pub deliveries: BTreeMap<String, usize>,
    pub redelivered_after_cut: usize,
    /// Streams that went back to a hole another reader released.
    pub back_to_a_hole: usize,
    /// Read by a `/poll` whose answer the client cut (or never got).
    pub lost_with_cut_poll: usize,
    /// Read by a stream whose client hung up with them in its kernel.
    pub lost_with_hung_up_stream: usize,
    pub kills: usize,
    pub stored: usize,
    pub cursor_samples: usize,
    /// How sessions ended.
    pub ends: BTreeMap<&'static str, usize>,
}

struct Copy {
    ev: usize,
    sess: u32,
    /// Position among its session's deliveries.
    nth: usize,
}

/// How far a step's time may lie outside the session it belongs to
/// (the client records a close just before it closes; clocks read at
/// different moments).
const SLACK: f64 = 0.25;

pub fn check(
    events: &[Ev],
    sessions: &[Session],
    inboxes: &[Inbox],
    reads: &[HashMap<u64, super::clients::Reads>],
    epoch: f64,
    busy_is_unknown: bool,
) -> (Vec<Violation>, Figures) {
    let mut v = Vec::new();
    let mut fig = Figures::default();
    let pos: Vec<HashMap<u64, usize>> = inboxes
        .iter()
        .map(|i| i.iter().enumerate().map(|(p, e)| (e.0, p)).collect())
        .collect();
    fig.stored = inboxes.iter().map(Vec::len).sum();

    // Index the history.
    let mut sends: HashMap<Key, (usize, Option<u8>, Door)> = HashMap::new();
    let mut acked: Vec<(Key, u64, usize)> = Vec::new();
    let mut refused: Vec<(Key, usize, String)> = Vec::new();
    let mut delivered: Vec<Vec<(usize, u64)>> = vec![Vec::new(); sessions.len()];
    let mut opened = vec![usize::MAX; sessions.len()];
    let mut closed: Vec<Option<(usize, &'static str)>> = vec![None; sessions.len()];
    let mut stalled: Vec<Vec<usize>> = vec![Vec::new(); sessions.len()];
    let mut kills = Vec::new();
    let mut last_since: HashMap<u32, f64> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        match &e.kind {
            Kind::Send { key, to, door } => {
                fig.sent += 1;
                sends.insert(*key, (i, *to, *door));
            }
            Kind::Acked { key, seq } => {
                fig.acked += 1;
                acked.push((*key, *seq, i));
            }
            // On NATS `storage_busy` means the outcome is unknown (a
            // PubAck lost, the node slow to see its own write): the
            // message may be stored. On SQLite it means nothing was.
            Kind::Refused { key, why } if busy_is_unknown && why.contains("storage_busy") => {
                fig.unknown += 1;
                if let Some((_, _, door)) = sends.get(key) {
                    *fig.unknown_by.entry(format!("{door:?}")).or_default() += 1;
                }
            }
            Kind::Refused { key, why } if why.starts_with("REPLY OUT OF ORDER") => {
                v.push(Violation {
                    promise: "every request gets its own reply, in order",
                    agent: None,
                    seq: None,
                    key: Some(*key),
                    detail: why.clone(),
                    sessions: vec![],
                    extra: vec![i],
                });
            }
            Kind::Refused { key, why } => {
                fig.refused += 1;
                let code = ["storage_error", "storage_busy", "connect", "shutting_down"]
                    .into_iter()
                    .find(|c| why.contains(c))
                    .unwrap_or("other");
                *fig.refused_by.entry(code.to_owned()).or_default() += 1;
                refused.push((*key, i, why.clone()));
            }
            Kind::Notice { key, notice } => v.push(Violation {
                promise: "the traffic never trips the loop guard (held messages: issue 21)",
                agent: None,
                seq: None,
                key: Some(*key),
                detail: format!("acknowledged with notice {notice:?}"),
                sessions: vec![],
                extra: vec![i],
            }),
            Kind::Unknown { key } => {
                fig.unknown += 1;
                if let Some((_, _, door)) = sends.get(key) {
                    *fig.unknown_by.entry(format!("{door:?}")).or_default() += 1;
                }
            }
            Kind::Open { sess } => opened[*sess as usize] = i,
            Kind::Close { sess, why } => {
                closed[*sess as usize] = Some((i, why));
                *fig.ends.entry(why).or_default() += 1;
            }
            Kind::Deliver { sess, seq } => {
                delivered[*sess as usize].push((i, *seq));
                let door = format!("{:?}", sessions[*sess as usize].door);
                *fig.deliveries.entry(door).or_default() += 1;
            }
            Kind::Gap { sess } => v.push(Violation {
                promise: "no gap signal while retention is off",
                agent: Some(sessions[*sess as usize].agent),
                seq: None,
                key: None,
                detail: "a gap signal".into(),
                sessions: vec![*sess],
                extra: vec![i],
            }),
            Kind::Since { sess, since } => {
                last_since.insert(*sess, *since);
            }
            Kind::Stall { sess, .. } => stalled[*sess as usize].push(i),
            Kind::Cursor {
                agent,
                cursor,
                floor,
            } => {
                fig.cursor_samples += 1;
                if cursor < floor {
                    v.push(Violation {
                        promise: "no cursor moves backwards",
                        agent: Some(*agent),
                        seq: Some(*floor),
                        key: None,
                        detail: format!(
                            "cursor {cursor} read after the daemon acknowledged a move to {floor}"
                        ),
                        sessions: vec![],
                        extra: vec![i],
                    });
                }
            }
            Kind::Kill => {
                fig.kills += 1;
                kills.push(i)
            }
            Kind::Fault { what, on: true } => *fig.faults.entry(what).or_default() += 1,
            Kind::AckSent { .. }
            | Kind::AckDone { .. }
            | Kind::AckRefused { .. }
            | Kind::Restart
            | Kind::Fault { .. } => {}
        }
    }
    let killed_between = |a: usize, b: usize| {
        let (a, b) = (a.min(b), a.max(b));
        kills.iter().any(|&k| a < k && k < b)
    };
    let key_of = |agent: u8, seq: u64| -> Option<Key> {
        pos[agent as usize]
            .get(&seq)
            .and_then(|&p| inboxes[agent as usize][p].2)
    };

    // 1. Every acknowledged message is readable by each recipient.
    for &(key, seq, i) in &acked {
        let Some(&(_, to, door)) = sends.get(&key) else {
            continue;
        };
        let recipients: Vec<u8> = match to {
            Some(a) => vec![a],
            None => (0..AGENTS.len() as u8).collect(),
        };
        for a in recipients {
            match pos[a as usize].get(&seq) {
                None => v.push(Violation {
                    promise: "an acknowledged message is readable by its recipient",
                    agent: Some(a),
                    seq: Some(seq),
                    key: Some(key),
                    detail: format!(
                        "sent through {door:?}, acknowledged as seq {seq}, missing from {}'s inbox",
                        AGENTS[a as usize]
                    ),
                    sessions: vec![],
                    extra: vec![i],
                }),
                Some(&p) if inboxes[a as usize][p].2 != Some(key) => v.push(Violation {
                    promise: "an acknowledged message is stored as sent",
                    agent: Some(a),
                    seq: Some(seq),
                    key: Some(key),
                    detail: format!("seq {seq} holds {:?}", inboxes[a as usize][p].2),
                    sessions: vec![],
                    extra: vec![i],
                }),
                Some(_) => {}
            }
        }
    }

    // 2. A refused send stored nothing; 3. nothing is stored twice.
    for (a, inbox) in inboxes.iter().enumerate() {
        let mut seen: HashMap<Key, u64> = HashMap::new();
        for &(seq, _, key) in inbox {
            let Some(key) = key else { continue };
            if let Some(first) = seen.insert(key, seq) {
                v.push(Violation {
                    promise: "a message is stored once",
                    agent: Some(a as u8),
                    seq: Some(seq),
                    key: Some(key),
                    detail: format!("stored as seq {first} and seq {seq}"),
                    sessions: vec![],
                    extra: vec![],
                });
            }
        }
        for (key, i, why) in &refused {
            if let Some(seq) = seen.get(key) {
                v.push(Violation {
                    promise: "a refused send stores nothing",
                    agent: Some(a as u8),
                    seq: Some(*seq),
                    key: Some(*key),
                    detail: format!("refused ({why}) yet stored as seq {seq}"),
                    sessions: vec![],
                    extra: vec![*i],
                });
            }
        }
    }

    // 4. Per sender, acknowledged sends keep their order (each sender
    // sends one at a time, or pipelines on one connection).
    let mut by_sender: BTreeMap<usize, Vec<(usize, Key, u64, usize)>> = BTreeMap::new();
    for &(key, seq, i) in &acked {
        if let Some(&(issued, _, _)) = sends.get(&key) {
            by_sender
                .entry(key.sender())
                .or_default()
                .push((issued, key, seq, i));
        }
    }
    for list in by_sender.values_mut() {
        list.sort();
        for w in list.windows(2) {
            if w[1].2 <= w[0].2 {
                v.push(Violation {
                    promise: "per-sender order",
                    agent: None,
                    seq: Some(w[1].2),
                    key: Some(w[1].1),
                    detail: format!(
                        "{} (sent after {}) got seq {} <= {}",
                        w[1].1, w[0].1, w[1].2, w[0].2
                    ),
                    sessions: vec![],
                    extra: vec![w[0].0, w[0].3, w[1].0, w[1].3],
                });
            }
        }
    }

    // Whether a destructive door other than a stream that was then cut
    // handed out `seq` of agent `a` before event `before`.
    let handed_for_good = |a: usize, seq: u64, before: usize| {
        delivered.iter().enumerate().any(|(s, list)| {
            let info = &sessions[s];
            info.agent as usize == a
                && info.door.destructive()
                && !(info.door.stream()
                    && closed[s].is_some_and(|(c, why)| why != "stop" && c < before))
                && list.iter().any(|&(i, q)| q == seq && i < before)
        })
    };

    // 5. Per read: seqs increase. 6. Streams skip nothing.
    for (s, list) in delivered.iter().enumerate() {
        let info = &sessions[s];
        let a = info.agent as usize;
        for w in list.windows(2) {
            // `/subscribe` goes back to read a claim another reader
            // released below it (a stream cut before its peer had the
            // batch, a failed store): allowed for a message no destructive
            // door had handed out for good before (a cut stream's tail
            // counts as not for good; twice is checked below).
            if w[1].1 < w[0].1 && info.door.stream() && !handed_for_good(a, w[1].1, w[1].0) {
                fig.back_to_a_hole += 1;
                continue;
            }
            if w[1].1 <= w[0].1 {
                v.push(Violation {
                    promise: "per-inbox order (seq increases on every read)",
                    agent: Some(info.agent),
                    seq: Some(w[1].1),
                    key: key_of(info.agent, w[1].1),
                    detail: format!("{} gave seq {} after seq {}", info.actor, w[1].1, w[0].1),
                    sessions: vec![s as u32],
                    extra: vec![w[0].0, w[1].0],
                });
            }
        }
        for &(i, seq) in list {
            if !pos[a].contains_key(&seq) {
                v.push(Violation {
                    promise: "a reader gets only its own inbox",
                    agent: Some(info.agent),
                    seq: Some(seq),
                    key: None,
                    detail: format!("{} got seq {seq}, not in the inbox", info.actor),
                    sessions: vec![s as u32],
                    extra: vec![i],
                });
            }
        }
        let follows = matches!(info.door, Door::UnixExplicit | Door::V1Ws | Door::V1Sse);
        if !follows {
            continue;
        }
        for w in list.windows(2) {
            let (Some(&p0), Some(&p1)) = (pos[a].get(&w[0].1), pos[a].get(&w[1].1)) else {
                continue;
            };
            if p1 > p0 + 1 {
                let skipped = inboxes[a][p0 + 1].0;
                v.push(Violation {
                    promise: "a stream skips nothing of its inbox",
                    agent: Some(info.agent),
                    seq: Some(skipped),
                    key: inboxes[a][p0 + 1].2,
                    detail: format!(
                        "{} went from seq {} to seq {}, skipping {} message(s)",
                        info.actor,
                        w[0].1,
                        w[1].1,
                        p1 - p0 - 1
                    ),
                    sessions: vec![s as u32],
                    extra: vec![w[0].0, w[1].0],
                });
            }
        }
    }

    // Where each follower session had to start: nothing between that
    // point and its first delivery may be missing.
    let mut max_ack_sent = vec![0u64; AGENTS.len()];
    let mut floor = vec![0u64; AGENTS.len()];
    let mut floor_at_open = vec![0u64; sessions.len()];
    for e in events.iter() {
        match &e.kind {
            Kind::Open { sess } => {
                let info = &sessions[*sess as usize];
                let a = info.agent as usize;
                if a >= AGENTS.len() {
                    continue;
                }
                floor_at_open[*sess as usize] = floor[a];
                let start = match info.door {
                    Door::UnixExplicit | Door::V1Ws => Some(max_ack_sent[a]),
                    Door::V1Sse => info.after,
                    _ => None,
                };
                let (Some(start), Some(&(i, first))) = (start, delivered[*sess as usize].first())
                else {
                    continue;
                };
                let missed: Vec<u64> = inboxes[a]
                    .iter()
                    .map(|e| e.0)
                    .filter(|&s| s > start && s < first)
                    .collect();
                if let Some(&skipped) = missed.first() {
                    v.push(Violation {
                        promise: "a stream skips nothing of its inbox",
                        agent: Some(a as u8),
                        seq: Some(skipped),
                        key: key_of(a as u8, skipped),
                        detail: format!(
                            "{} started at seq {first}, after {start}: skipped {} message(s)",
                            info.actor,
                            missed.len()
                        ),
                        sessions: vec![*sess],
                        extra: vec![i],
                    });
                }
            }
            Kind::AckSent { sess, seq } => {
                let a = sessions[*sess as usize].agent as usize;
                max_ack_sent[a] = max_ack_sent[a].max(*seq);
            }
            Kind::AckDone { sess, seq } => {
                let a = sessions[*sess as usize].agent as usize;
                floor[a] = floor[a].max(*seq);
            }
            _ => {}
        }
    }

    // 7. agent-bus followers: everything with ts in (first since, last
    // since] came, once.
    for (s, info) in sessions.iter().enumerate() {
        if info.door != Door::AbRecv {
            continue;
        }
        let (Some(since0), Some(&last)) = (info.since, last_since.get(&(s as u32))) else {
            continue;
        };
        let a = info.agent as usize;
        let mut got: HashMap<u64, usize> = HashMap::new();
        for &(i, seq) in &delivered[s] {
            if got.insert(seq, i).is_some() {
                v.push(Violation {
                    promise: "an agent-bus follower gets each message once",
                    agent: Some(a as u8),
                    seq: Some(seq),
                    key: key_of(a as u8, seq),
                    detail: format!("{} got seq {seq} twice", info.actor),
                    sessions: vec![s as u32],
                    extra: vec![i],
                });
            }
        }
        for &(seq, ts, key) in &inboxes[a] {
            if ts > since0 && ts <= last && !got.contains_key(&seq) {
                v.push(Violation {
                    promise: "an agent-bus follower moving `since` skips nothing",
                    agent: Some(a as u8),
                    seq: Some(seq),
                    key,
                    detail: format!(
                        "{} moved since to {last} without seq {seq} (ts {ts})",
                        info.actor
                    ),
                    sessions: vec![s as u32],
                    extra: vec![],
                });
            }
        }
    }

    // 8. Destructive reads hand a message out once.
    for a in 0..AGENTS.len() {
        let mut copies: HashMap<u64, Vec<Copy>> = HashMap::new();
        for (s, info) in sessions.iter().enumerate() {
            if info.agent as usize != a || !info.door.destructive() {
                continue;
            }
            for (nth, &(ev, seq)) in delivered[s].iter().enumerate() {
                if matches!(info.door, Door::UnixExplicit | Door::V1Ws) {
                    if seq <= floor_at_open[s] {
                        v.push(Violation {
                            promise: DESTRUCTIVE_ONCE,
                            agent: Some(a as u8),
                            seq: Some(seq),
                            key: key_of(a as u8, seq),
                            detail: format!(
                                "{} handed out seq {seq} after an ack of {} was processed",
                                info.actor, floor_at_open[s]
                            ),
                            sessions: vec![s as u32],
                            extra: vec![ev],
                        });
                    }
                    // Otherwise unacknowledged: explicit mode hands it out again.
                    continue;
                }
                copies.entry(seq).or_default().push(Copy {
                    ev,
                    sess: s as u32,
                    nth,
                });
            }
        }
        let (opened, closed) = (&opened, &closed);
        let mine_open_at = |ev: usize| {
            (0..sessions.len() as u32).filter(move |&s| {
                let s = s as usize;
                sessions[s].agent as usize == a
                    && sessions[s].door.stream()
                    && opened[s] < ev
                    && closed[s].is_none_or(|(c, _)| c > ev)
            })
        };
        let mut seqs: Vec<_> = copies.into_iter().filter(|(_, c)| c.len() > 1).collect();
        seqs.sort_by_key(|(s, _)| *s);
        for (seq, mut list) in seqs {
            list.sort_by_key(|c| c.ev);
            for w in list.windows(2) {
                let (c1, c2) = (&w[0], &w[1]);
                let cut_tail = |c: &Copy, other: &Copy| {
                    let s = c.sess as usize;
                    let info = &sessions[s];
                    let tail = delivered[s].len() - c.nth <= TAIL;
                    let ended = match closed[s] {
                        Some((_, why)) => why != "stop",
                        None => false,
                    } || killed_between(c.ev, other.ev);
                    info.door.stream() && tail && ended
                };
                // A stream cut after it wrote a batch and before it
                // confirmed it: the batch comes again.
                // A stream opened before a kill carries only what the killed
                // daemon wrote (its client may read it from its kernel after
                // the kill): unconfirmed, so it comes again.
                let ok = (cut_tail(c1, c2)
                    && closed[c1.sess as usize].is_some_and(|(i, _)| i < c2.ev)
                    || killed_between(opened[c1.sess as usize], c2.ev)
                        && sessions[c1.sess as usize].door.stream()
                    // The same, read by its client only after the other
                    // copy: a stream that stopped reading before the kill
                    // reads what the killed daemon wrote it late.
                    || killed_between(opened[c2.sess as usize], c2.ev)
                        && sessions[c2.sess as usize].door.stream()
                        && stalled[c2.sess as usize].iter().any(|&st| st < c2.ev))
                    // A stalled stream read its (already claimed, then
                    // released) batch after another door took it.
                    || (cut_tail(c2, c1)
                        && stalled[c2.sess as usize].iter().any(|&st| st < c2.ev));
                if ok {
                    fig.redelivered_after_cut += 1;
                    continue;
                }
                let (d1, d2) = (&sessions[c1.sess as usize], &sessions[c2.sess as usize]);
                v.push(Violation {
                    promise: DESTRUCTIVE_ONCE,
                    agent: Some(a as u8),
                    seq: Some(seq),
                    key: key_of(a as u8, seq),
                    detail: format!(
                        "seq {seq} handed out by {} ({:?}) and again by {} ({:?})",
                        d1.actor, d1.door, d2.actor, d2.door
                    ),
                    // And the streams of this inbox open at the first
                    // copy (a claim of theirs may have held the cursor).
                    sessions: [c1.sess, c2.sess]
                        .into_iter()
                        .chain(previous(sessions, c2.sess))
                        .chain(mine_open_at(c1.ev).collect::<Vec<_>>())
                        .collect(),
                    extra: vec![c1.ev, c2.ev],
                });
            }
        }
    }

    // 11. The destructive doors handed out everything, and the followers
    // got to the end.
    let acked_at: HashMap<u64, usize> = acked.iter().map(|&(_, seq, i)| (seq, i)).collect();
    for (a, inbox) in inboxes.iter().enumerate() {
        let mine: Vec<usize> = (0..sessions.len())
            .filter(|&s| sessions[s].agent as usize == a && sessions[s].door.destructive())
            .collect();
        // Where each seq was first handed out.
        let mut taken: HashMap<u64, usize> = HashMap::new();
        for &s in &mine {
            for &(i, seq) in &delivered[s] {
                let first = taken.entry(seq).or_insert(i);
                *first = (*first).min(i);
            }
        }
        for (p, &(seq, _, key)) in inbox.iter().enumerate() {
            if !taken.contains_key(&seq) {
                // At most once across a cut: the daemon read it (its step
                // says through which door) for a reader whose client never
                // got it — a `/poll` whose answer was cut or lost, or a
                // stream whose client hung up while its kernel acknowledged
                // the bytes. Only within such a session's lifetime.
                let at = |i: usize| epoch + events[i].t as f64 / 1e6;
                let by = |door: Door, ends: &[&str], ts: f64| {
                    mine.iter().any(|&s| {
                        sessions[s].door == door
                            && closed[s].is_some_and(|(c, why)| {
                                ends.contains(&why)
                                    && at(opened[s]) - SLACK <= ts
                                    && ts <= at(c) + SLACK
                            })
                    })
                };
                let read = reads[a].get(&seq).into_iter().flatten();
                let mut excused = false;
                for (door, ts) in read {
                    if door == "poll" && by(Door::IopPoll, &["cut", "failed"], *ts) {
                        fig.lost_with_cut_poll += 1;
                        excused = true;
                    } else if door == "sse"
                        && by(
                            Door::IopSubscribe,
                            &["client hung up", "client hung up after a stall"],
                            *ts,
                        )
                    {
                        fig.lost_with_hung_up_stream += 1;
                        excused = true;
                    }
                    if excused {
                        break;
                    }
                }
                if excused {
                    continue;
                }
                // The readers that were there when it was acknowledged,
                // and where its neighbours went.
                let at = acked_at.get(&seq).copied();
                let live = mine
                    .iter()
                    .filter(|&&s| {
                        at.is_some_and(|at| opened[s] < at && closed[s].is_none_or(|(c, _)| c > at))
                            && sessions[s].door != Door::IopPoll
                    })
                    .map(|&s| s as u32)
                    .collect();
                let neighbours = [p.checked_sub(1), Some(p + 1)]
                    .into_iter()
                    .flatten()
                    .filter_map(|q| inbox.get(q))
                    .filter_map(|n| taken.get(&n.0).copied())
                    .collect();
                v.push(Violation {
                    promise: HANDED_OUT,
                    agent: Some(a as u8),
                    seq: Some(seq),
                    key,
                    detail: format!(
                        "seq {seq} of {} was never handed out (read steps: {:?})",
                        AGENTS[a],
                        reads[a].get(&seq)
                    ),
                    sessions: live,
                    extra: neighbours,
                });
            }
        }
    }
    (v, fig)
}

/// The session `sess`'s client had before it (where it resumed from).
fn previous(sessions: &[Session], sess: u32) -> Option<u32> {
    let actor = &sessions[sess as usize].actor;
    (0..sess)
        .rev()
        .find(|&s| &sessions[s as usize].actor == actor)
}

/// The events that show `violation`, in order: its message's send and
/// answer, every delivery of it to that agent, the sessions involved,
/// acks covering it, and kills between the first and the last of those.
pub fn excerpt(events: &[Ev], sessions: &[Session], violation: &Violation) -> String {
    let mut keep: Vec<usize> = violation.extra.clone();
    let wanted: HashSet<u32> = violation.sessions.iter().copied().collect();
    let mut acks_kept = 0;
    for (i, e) in events.iter().enumerate() {
        let k = match &e.kind {
            Kind::Send { key, .. }
            | Kind::Acked { key, .. }
            | Kind::Refused { key, .. }
            | Kind::Notice { key, .. }
            | Kind::Unknown { key } => Some(*key) == violation.key,
            Kind::Deliver { sess, seq } => {
                let info = &sessions[*sess as usize];
                Some(*seq) == violation.seq
                    && violation.agent.is_none_or(|a| info.agent == a)
                    && violation.shows(info.door)
            }
            Kind::Open { sess } | Kind::Close { sess, .. } | Kind::Stall { sess, .. } => {
                wanted.contains(sess)
            }
            Kind::AckDone { sess, seq } => {
                let covers = violation.seq.is_some_and(|s| *seq >= s)
                    && violation
                        .agent
                        .is_some_and(|a| sessions[*sess as usize].agent == a);
                if covers && acks_kept < 2 {
                    acks_kept += 1;
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if k {
            keep.push(i);
        }
    }
    // The sessions of the deliveries kept open and close too.
    let sess_of: HashSet<u32> = keep
        .iter()
        .filter_map(|&i| match events[i].kind {
            Kind::Deliver { sess, .. } => Some(sess),
            _ => None,
        })
        .collect();
    for (i, e) in events.iter().enumerate() {
        if let Kind::Open { sess } | Kind::Close { sess, .. } = e.kind {
            if sess_of.contains(&sess) {
                keep.push(i);
            }
        }
    }
    keep.sort();
    keep.dedup();
    if let (Some(&first), Some(&last)) = (keep.first(), keep.last()) {
        for (i, e) in events.iter().enumerate().take(last).skip(first) {
            if matches!(e.kind, Kind::Kill | Kind::Restart | Kind::Fault { .. }) {
                keep.push(i);
            }
        }
    }
    keep.sort();
    keep.dedup();
    let mut out = String::new();
    let shown = keep.len().min(60);
    for &i in &keep[..shown] {
        let e = &events[i];
        let _ = writeln!(
            out,
            "  #{i:<8} +{:>10.6}s  {}",
            e.t as f64 / 1e6,
            describe(&e.kind, sessions)
        );
    }
    if keep.len() > shown {
        let _ = writeln!(out, "  ... {} more", keep.len() - shown);
    }
    out
}

fn describe(kind: &Kind, sessions: &[Session]) -> String {
    let s = |sess: &u32| {
        let i = &sessions[*sess as usize];
        format!("{} [{:?} session {sess}]", i.actor, i.door)
    };
    match kind {
        Kind::Send { key, to, door } => format!(
            "s{}: send {key} to {} via {door:?}",
            key.sender(),
            to.map_or("everyone (broadcast)", |a| AGENTS[a as usize])
        ),
        Kind::Acked { key, seq } => format!("s{}: {key} acknowledged, seq {seq}", key.sender()),
        Kind::Refused { key, why } => format!("s{}: {key} refused: {why}", key.sender()),
        Kind::Notice { key, notice } => format!("s{}: {key} notice: {notice}", key.sender()),
        Kind::Unknown { key } => format!("s{}: {key} unanswered (cut or killed)", key.sender()),
        Kind::Open { sess } => {
            let i = &sessions[*sess as usize];
            let from = match (i.after, i.since) {
                (Some(a), _) => format!(" from seq {a}"),
                (_, Some(t)) => format!(" since {t}"),
                _ => String::new(),
            };
            format!("{}: opens{from}", s(sess))
        }
        Kind::Close { sess, why } => format!("{}: ends ({why})", s(sess)),
        Kind::Deliver { sess, seq } => format!("{}: got seq {seq}", s(sess)),
        Kind::Gap { sess } => format!("{}: gap signal", s(sess)),
        Kind::AckSent { sess, seq } => format!("{}: ack {seq} sent", s(sess)),
        Kind::AckDone { sess, seq } => format!("{}: ack {seq} processed (pong)", s(sess)),
        Kind::AckRefused { sess, seq } => format!("{}: ack {seq} answered with an error", s(sess)),
        Kind::Since { sess, since } => format!("{}: since -> {since}", s(sess)),
        Kind::Stall { sess, ms } => format!("{}: stops reading for {ms} ms", s(sess)),
        Kind::Cursor {
            agent,
            cursor,
            floor,
        } => format!(
            "sampler: cursor of {} is {cursor} (acknowledged before: {floor})",
            AGENTS[*agent as usize]
        ),
        Kind::Kill => "daemon: kill -9".into(),
        Kind::Restart => "daemon: restarted on the same data dir".into(),
        Kind::Fault { what, on } => {
            format!("fault: {what} {}", if *on { "begins" } else { "ends" })
        }
    }
}
