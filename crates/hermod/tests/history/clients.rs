//! The concurrent clients: senders over every sending door, readers over
//! every reading door, and a cursor sampler. Each records what it asked
//! and what it got; each injects its own client-side faults (hanging up,
//! stalling, cutting requests) from its seeded generator.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::net::{Frames, Sse};
use super::record::*;

/// Switches for fault kinds (see `known_faults` in `history.rs`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Known {
    /// Interop `/subscribe` readers that stop reading and hang up without
    /// the rest.
    pub sse_drop: bool,
    /// `/poll` requests cut mid-request (still a known bug: a cut during
    /// the cursor swap can read a batch with no `read` step).
    pub poll_cut: bool,
}

pub struct Ctx {
    pub hist: History,
    /// The daemons (hermod nodes) the clients reach.
    pub nodes: Vec<Node>,
    /// Turns of [`Ctx::node`].
    pub turn: std::sync::atomic::AtomicUsize,
    pub http: reqwest::Client,
    pub known: Known,
    /// Senders stop.
    pub stop_send: AtomicBool,
    /// Everything stops.
    pub stop: AtomicBool,
    /// No more client faults (the drain after the run).
    pub calm: AtomicBool,
}

/// Where a client reaches one daemon (fixed across its restarts).
pub struct Node {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub url: String,
    pub socket: PathBuf,
}

impl Ctx {
    /// The node for the next session or request: each in turn, so on a
    /// cluster every door is used on every node, and a client that comes
    /// back comes back elsewhere.
    fn node(&self) -> &Node {
        &self.nodes[self.turn.fetch_add(1, Ordering::Relaxed) % self.nodes.len()]
    }

    /// The node the checker asks its questions after the run.
    fn first(&self) -> &Node {
        &self.nodes[0]
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn calm(&self) -> bool {
        self.calm.load(Ordering::SeqCst)
    }
}

/// The seq in a delivered message, whatever the door's shape.
fn seq_of(v: &Value) -> Option<u64> {
    v.get("seq").and_then(Value::as_u64).or_else(|| {
        v.get("_meta")
            .and_then(|m| m.get("seq"))
            .and_then(Value::as_u64)
    })
}

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await
}

enum Outcome {
    Acked(u64, Option<String>),
    Refused(String),
    Unknown,
}

// ---------------------------------------------------------------- senders

/// A sender: one message at a time (answered before the next), each
/// through a door picked at random, to a random agent or (sometimes) to
/// all of them.
pub async fn sender(ctx: Arc<Ctx>, index: usize, mut rng: Rng) {
    let name = format!("s{index}");
    let mut unix: Option<Frames> = None;
    let mut ws: Option<WsConn> = None;
    let mut n = 0u64;
    while !ctx.stop_send.load(Ordering::SeqCst) {
        let key = Key::new(index, n);
        n += 1;
        let to = (!rng.chance(0.04)).then(|| rng.below(AGENTS.len() as u64) as u8);
        let door = match (to, rng.below(4)) {
            (_, 0) => Door::UnixSend,
            (Some(_), 1) => Door::AbSend,
            (None, 1) => Door::IopBroadcast,
            (_, 2) => Door::V1Post,
            _ => Door::WsSend,
        };
        // Some HTTP sends are cut mid-request (a client that gives up).
        let cut = rng
            .chance(0.02)
            .then(|| Duration::from_micros(rng.between(100, 3000)));
        ctx.hist.push(Kind::Send { key, to, door });
        let to_name = to.map(|a| AGENTS[a as usize]);
        let body = json!({ "k": key.text() });
        let outcome = match door {
            Door::UnixSend => {
                let mut frame =
                    json!({"type": "send", "from": name, "id": key.text(), "body": body});
                if let Some(t) = to_name {
                    frame["to"] = json!(t);
                }
                unix_send(&ctx, &mut unix, &frame).await
            }
            Door::WsSend => {
                let mut frame = json!({"type": "send", "id": key.text(), "body": body});
                if let Some(t) = to_name {
                    frame["to"] = json!(t);
                }
                ws_send(&ctx, &mut ws, &name, &frame).await
            }
            Door::AbSend => {
                let req = json!({"from": name, "to": to_name, "msg": key.text()});
                http_send(
                    &ctx,
                    ctx.http.post(format!("{}/send", ctx.node().url)).json(&req),
                    cut,
                )
                .await
            }
            Door::V1Post => {
                let mut req = json!({"from": name, "id": key.text(), "body": body});
                if let Some(t) = to_name {
                    req["to"] = json!(t);
                }
                let r = ctx
                    .http
                    .post(format!("{}/v1/messages", ctx.node().url))
                    .json(&req);
                http_send(&ctx, r, cut).await
            }
            Door::IopBroadcast => {
                let r = ctx
                    .http
                    .post(format!("{}/broadcast?from={name}", ctx.node().url))
                    .json(&body);
                http_send(&ctx, r, cut).await
            }
            _ => unreachable!(),
        };
        match outcome {
            Outcome::Acked(seq, notice) => {
                ctx.hist.push(Kind::Acked { key, seq });
                if let Some(notice) = notice {
                    // The loop guard must not trip on this traffic (held
                    // messages are lost on restart: issue 21).
                    ctx.hist.push(Kind::Notice { key, notice });
                }
            }
            Outcome::Refused(why) => {
                ctx.hist.push(Kind::Refused { key, why });
                pause(20).await;
            }
            Outcome::Unknown => {
                ctx.hist.push(Kind::Unknown { key });
                pause(20).await;
            }
        }
        pause(rng.below(3)).await;
    }
}

async fn unix_send(ctx: &Ctx, conn: &mut Option<Frames>, frame: &Value) -> Outcome {
    if conn.is_none() {
        match Frames::connect(&ctx.node().socket).await {
            Ok(c) => *conn = Some(c),
            Err(e) => return Outcome::Refused(format!("connect: {e}")),
        }
    }
    let c = conn.as_mut().unwrap();
    if c.send(frame).await.is_err() {
        *conn = None;
        return Outcome::Unknown;
    }
    let reply = c
        .until(Duration::from_secs(10), |f| {
            matches!(f["type"].as_str(), Some("sent" | "error"))
        })
        .await;
    match reply {
        Ok(f) if f["type"] == "sent" => Outcome::Acked(
            f["seq"].as_u64().unwrap(),
            f["notice"].as_str().map(str::to_owned),
        ),
        Ok(f) => Outcome::Refused(f.to_string()),
        Err(_) => {
            *conn = None;
            Outcome::Unknown
        }
    }
}

async fn http_send(ctx: &Ctx, req: reqwest::RequestBuilder, cut: Option<Duration>) -> Outcome {
    let req = req.timeout(cut.unwrap_or(Duration::from_secs(10)));
    let _ = ctx;
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            match r.json::<Value>().await {
                Ok(v) if status.is_success() => match v["seq"].as_u64() {
                    Some(seq) => Outcome::Acked(seq, None),
                    None => Outcome::Refused(format!("200 without seq: {v}")),
                },
                Ok(v) => Outcome::Refused(format!("{status} {v}")),
                // The answer was cut: it may have been a 200.
                Err(_) if status.is_success() => Outcome::Unknown,
                Err(e) => Outcome::Refused(format!("{status} {e}")),
            }
        }
        // Never connected: nothing was sent.
        Err(e) if e.is_connect() => Outcome::Refused(format!("connect: {e}")),
        Err(_) => Outcome::Unknown,
    }
}

type WsConn =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(ctx: &Ctx, agent: &str) -> Result<WsConn, String> {
    let url = format!("ws://{}/v1/agents/{agent}/ws", ctx.node().addr);
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

async fn ws_send(ctx: &Ctx, conn: &mut Option<WsConn>, name: &str, frame: &Value) -> Outcome {
    if conn.is_none() {
        match ws_connect(ctx, name).await {
            Ok(c) => *conn = Some(c),
            Err(e) => return Outcome::Refused(format!("connect: {e}")),
        }
    }
    let ws = conn.as_mut().unwrap();
    if ws.send(WsMessage::text(frame.to_string())).await.is_err() {
        *conn = None;
        return Outcome::Unknown;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next()).await;
        let Ok(Some(Ok(WsMessage::Text(text)))) = next else {
            if matches!(next, Ok(Some(Ok(_)))) {
                continue;
            }
            *conn = None;
            return Outcome::Unknown;
        };
        let f: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
        match f["type"].as_str() {
            Some("sent") => {
                return Outcome::Acked(
                    f["seq"].as_u64().unwrap(),
                    f["notice"].as_str().map(str::to_owned),
                )
            }
            Some("error") => return Outcome::Refused(f.to_string()),
            _ => continue, // the sender's own inbox (broadcast copies)
        }
    }
}

/// One Unix connection pipelining `send` frames (up to 32 unanswered);
/// answers come in request order. Sometimes hangs up with sends in flight.
pub async fn pipeliner(ctx: Arc<Ctx>, index: usize, mut rng: Rng) {
    let name = format!("s{index}");
    let mut n = 0u64;
    'conn: while !ctx.stop_send.load(Ordering::SeqCst) {
        let Ok(mut c) = Frames::connect(&ctx.node().socket).await else {
            pause(50).await;
            continue;
        };
        let mut inflight = std::collections::VecDeque::new();
        let hang_up_after = rng.between(50, 3000);
        let mut written = 0;
        loop {
            let stopping = ctx.stop_send.load(Ordering::SeqCst);
            if (!ctx.calm() && written >= hang_up_after) || (stopping && inflight.is_empty()) {
                break;
            }
            if inflight.len() < 32 && !stopping {
                let key = Key::new(index, n);
                n += 1;
                let to = rng.below(AGENTS.len() as u64) as u8;
                ctx.hist.push(Kind::Send {
                    key,
                    to: Some(to),
                    door: Door::UnixPipe,
                });
                let frame = json!({"type": "send", "from": name, "to": AGENTS[to as usize],
                    "id": key.text(), "body": {"k": key.text()}});
                inflight.push_back(key);
                written += 1;
                if c.send(&frame).await.is_err() {
                    break;
                }
                if inflight.len() < 32 && rng.chance(0.7) {
                    continue;
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), c.read()).await {
                Ok(Ok(frames)) => {
                    for f in frames {
                        let Some(key) = inflight.pop_front() else {
                            continue;
                        };
                        // Replies come one per request, in order: each
                        // names the id it answers.
                        if f["id"].as_str() != Some(key.text().as_str()) {
                            ctx.hist.push(Kind::Refused {
                                key,
                                why: format!("REPLY OUT OF ORDER: {f}"),
                            });
                            continue;
                        }
                        match f["type"].as_str() {
                            Some("sent") => ctx.hist.push(Kind::Acked {
                                key,
                                seq: f["seq"].as_u64().unwrap(),
                            }),
                            _ => ctx.hist.push(Kind::Refused {
                                key,
                                why: f.to_string(),
                            }),
                        }
                    }
                }
                _ => {
                    for key in inflight.drain(..) {
                        ctx.hist.push(Kind::Unknown { key });
                    }
                    pause(50).await;
                    continue 'conn;
                }
            }
        }
        // Hung up: whatever was not answered is unknown.
        for key in inflight.drain(..) {
            ctx.hist.push(Kind::Unknown { key });
        }
        pause(rng.below(20)).await;
    }
}

// ---------------------------------------------------------------- readers

/// A registered Unix reader of `agent`: explicit acks (with a `ping`
/// after each, whose `pong` says the ack was processed) or auto mode.
/// Hangs up and stalls at random.
pub async fn unix_reader(ctx: Arc<Ctx>, agent: u8, explicit: bool, mut rng: Rng) {
    let door = if explicit {
        Door::UnixExplicit
    } else {
        Door::UnixAuto
    };
    let name = AGENTS[agent as usize];
    while !ctx.stopping() {
        let Ok(mut c) = Frames::connect(&ctx.node().socket).await else {
            pause(50).await;
            continue;
        };
        let mut reg = json!({"type": "register", "endpoint": name, "gaps": true});
        if explicit {
            reg["ack"] = json!("explicit");
        }
        if c.send(&reg).await.is_err() {
            continue;
        }
        let sess = ctx.hist.open(door, agent, &format!("{name}/unix"), None);
        let hang_up_after = rng.chance(0.6).then(|| rng.between(1, 1500));
        let mut got = 0u64;
        let mut last = None;
        let mut unacked = 0u64;
        let mut ack_every = rng.between(1, 100);
        let mut pending_ack = PendingAck::default();
        let why = loop {
            if ctx.stopping() {
                break "stop";
            }
            if !ctx.calm() {
                if hang_up_after.is_some_and(|h| got >= h) {
                    break "client hung up";
                }
                if rng.chance(0.002) {
                    let ms = rng.between(100, 1500);
                    ctx.hist.push(Kind::Stall { sess, ms });
                    pause(ms).await;
                }
            }
            if explicit
                && pending_ack.idle()
                && unacked > 0
                && (unacked >= ack_every || rng.chance(0.1))
            {
                let seq = last.unwrap();
                ctx.hist.push(Kind::AckSent { sess, seq });
                let ok = c.send(&json!({"type": "ack", "seq": seq})).await.is_ok()
                    && c.send(&json!({"type": "ping"})).await.is_ok();
                if !ok {
                    break "write failed";
                }
                pending_ack.sent(seq);
                unacked = 0;
                ack_every = rng.between(1, 100);
            }
            let frames = match tokio::time::timeout(Duration::from_millis(200), c.read()).await {
                Err(_) => continue,
                Ok(Err(_)) => break "eof",
                Ok(Ok(f)) => f,
            };
            let mut seqs = Vec::new();
            for f in frames {
                match f["type"].as_str() {
                    Some("message") => {
                        if let Some(seq) = seq_of(&f) {
                            seqs.push(seq);
                        }
                    }
                    Some("pong") => pending_ack.pong(&ctx, sess, agent),
                    // The ack's answer: it was not stored (a full disk).
                    Some("error") => pending_ack.error(&ctx, sess),
                    Some("gap") => ctx.hist.push(Kind::Gap { sess }),
                    _ => {}
                }
            }
            got += seqs.len() as u64;
            unacked += seqs.len() as u64;
            if let Some(&s) = seqs.last() {
                last = Some(s);
            }
            ctx.hist.deliver(sess, agent, door, &seqs);
        };
        ctx.hist.push(Kind::Close { sess, why });
        pause(rng.below(30)).await;
    }
}

/// An explicit `ack` in flight (followed by a `ping`), and whether the
/// daemon refused it: either way it is settled by that ping's pong. (Taking
/// the pong of a refused ack's ping for the next ack's raised a floor the
/// daemon never acknowledged: a false "cursor backwards".)
#[derive(Default)]
struct PendingAck(Option<(u64, bool)>);

impl PendingAck {
    fn idle(&self) -> bool {
        self.0.is_none()
    }

    fn sent(&mut self, seq: u64) {
        self.0 = Some((seq, false));
    }

    fn error(&mut self, ctx: &Ctx, sess: u32) {
        if let Some((seq, refused @ false)) = self.0.as_mut() {
            *refused = true;
            ctx.hist.push(Kind::AckRefused { sess, seq: *seq });
        }
    }

    fn pong(&mut self, ctx: &Ctx, sess: u32, agent: u8) {
        if let Some((seq, false)) = self.0.take() {
            ctx.hist.push(Kind::AckDone { sess, seq });
            ctx.hist.raise_floor(agent, seq);
        }
    }
}

/// The v1 WebSocket of `agent`: its inbox from the cursor, explicit `ack`
/// frames (each followed by a `ping`), hanging up at random.
pub async fn ws_reader(ctx: Arc<Ctx>, agent: u8, mut rng: Rng) {
    let name = AGENTS[agent as usize];
    while !ctx.stopping() {
        let Ok(mut ws) = ws_connect(&ctx, name).await else {
            pause(50).await;
            continue;
        };
        let sess = ctx
            .hist
            .open(Door::V1Ws, agent, &format!("{name}/ws"), None);
        let hang_up_after = rng.chance(0.6).then(|| rng.between(1, 1500));
        let mut got = 0u64;
        let mut last = None;
        let mut unacked = 0u64;
        let mut pending_ack = PendingAck::default();
        let why = loop {
            if ctx.stopping() {
                break "stop";
            }
            if !ctx.calm() && hang_up_after.is_some_and(|h| got >= h) {
                break "client hung up";
            }
            if pending_ack.idle() && unacked > 0 && (unacked >= 50 || rng.chance(0.1)) {
                let seq = last.unwrap();
                ctx.hist.push(Kind::AckSent { sess, seq });
                let ok = ws
                    .send(WsMessage::text(
                        json!({"type": "ack", "seq": seq}).to_string(),
                    ))
                    .await
                    .is_ok()
                    && ws
                        .send(WsMessage::text(json!({"type": "ping"}).to_string()))
                        .await
                        .is_ok();
                if !ok {
                    break "write failed";
                }
                pending_ack.sent(seq);
                unacked = 0;
            }
            let next = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => continue,
                Ok(n) => n,
            };
            let text = match next {
                Some(Ok(WsMessage::Text(t))) => t,
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break "eof",
                Some(Ok(_)) => continue,
            };
            let f: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            match f["type"].as_str() {
                Some("message") => {
                    if let Some(seq) = seq_of(&f) {
                        ctx.hist.deliver(sess, agent, Door::V1Ws, &[seq]);
                        got += 1;
                        unacked += 1;
                        last = Some(seq);
                    }
                }
                Some("pong") => pending_ack.pong(&ctx, sess, agent),
                Some("error") => pending_ack.error(&ctx, sess),
                Some("gap") => ctx.hist.push(Kind::Gap { sess }),
                _ => {}
            }
        };
        ctx.hist.push(Kind::Close { sess, why });
        pause(rng.below(30)).await;
    }
}

/// An SSE reader: interop `/subscribe` of `agent` (destructive, shares the
/// cursor with `/poll`) or the v1 stream (from the last id it saw).
/// Stalls at random; a stall that outlasts the daemon's write timeout gets
/// the stream closed, and the reader then reads it to the end (it throws
/// nothing away). With [`Known::sse_drop`] it also hangs up mid-stream.
pub async fn sse_reader(ctx: Arc<Ctx>, agent: u8, door: Door, mut rng: Rng) {
    let name = AGENTS[agent as usize];
    let mut last_id: Option<u64> = match door {
        Door::V1Sse => Some(0),
        _ => None,
    };
    let mut fresh = false;
    while !ctx.stopping() {
        // Interop: resume with Last-Event-ID or without (from the cursor);
        // v1: always from the last id seen, as a header or `after=`.
        let (path, header) = match door {
            Door::IopSubscribe => {
                // After giving up on a stalled stream, reconnect without
                // Last-Event-ID (issue 21's scenario).
                let resume = if rng.chance(0.5) && !fresh {
                    last_id
                } else {
                    None
                };
                fresh = false;
                (format!("/subscribe?agent={name}"), resume)
            }
            _ => {
                let after = last_id.unwrap_or(0);
                if rng.chance(0.5) {
                    (format!("/v1/agents/{name}/stream"), Some(after))
                } else {
                    (format!("/v1/agents/{name}/stream?after={after}"), None)
                }
            }
        };
        let from = match door {
            Door::V1Sse => last_id,
            _ => header,
        };
        let rcvbuf = rng.chance(0.5).then_some(4096);
        let Ok(Ok(mut sse)) = tokio::time::timeout(
            Duration::from_secs(5),
            Sse::connect(&ctx.node().addr, &path, header, rcvbuf),
        )
        .await
        else {
            pause(50).await;
            continue;
        };
        let sess = ctx.hist.open(
            door,
            agent,
            &format!(
                "{name}/{}",
                if door == Door::V1Sse {
                    "v1-sse"
                } else {
                    "subscribe"
                }
            ),
            from,
        );
        let hang_up_after = (door == Door::V1Sse || ctx.known.sse_drop)
            .then(|| rng.chance(0.6).then(|| rng.between(1, 2000)))
            .flatten();
        let mut got = 0u64;
        let record = |events: Vec<super::net::SseEvent>, last_id: &mut Option<u64>| {
            let mut seqs = Vec::new();
            for ev in events {
                if ev.event.as_deref() == Some("gap") {
                    ctx.hist.push(Kind::Gap { sess });
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                    continue;
                };
                if let Some(seq) = seq_of(&v) {
                    seqs.push(seq);
                    *last_id = Some(seq);
                }
            }
            let n = seqs.len() as u64;
            ctx.hist.deliver(sess, agent, door, &seqs);
            if door == Door::V1Sse {
                if let Some(&s) = seqs.last() {
                    ctx.hist.followed[agent as usize].fetch_max(s, Ordering::SeqCst);
                }
            }
            n
        };
        let why = loop {
            if ctx.stopping() {
                break "stop";
            }
            if !ctx.calm() {
                if hang_up_after.is_some_and(|h| got >= h) {
                    // Hang up, keeping what the kernel already holds.
                    record(sse.drain_now(), &mut last_id);
                    break "client hung up";
                }
                if rng.chance(if ctx.known.sse_drop { 0.02 } else { 0.003 }) {
                    let ms = rng.between(200, 4000);
                    ctx.hist.push(Kind::Stall { sess, ms });
                    pause(ms).await;
                    if ctx.known.sse_drop && rng.chance(0.5) {
                        // Stopped reading, then gives up on the stream
                        // (issue 21: what sat in the daemon's send buffer
                        // was counted as delivered).
                        record(sse.drain_now(), &mut last_id);
                        fresh = true;
                        break "client hung up after a stall";
                    }
                }
            }
            match tokio::time::timeout(Duration::from_millis(200), sse.next()).await {
                Err(_) => continue,
                Ok(Ok(Some(events))) => got += record(events, &mut last_id),
                Ok(Ok(None)) => break "eof",
                Ok(Err(_)) => break "error",
            }
        };
        // Closed as its end is recorded: open, the socket would still take
        // (and acknowledge) what the daemon writes during the pause below.
        drop(sse);
        ctx.hist.push(Kind::Close { sess, why });
        pause(rng.below(30)).await;
    }
}

/// Interop `/poll` of `agent` now and then; each answer is a session.
/// With [`Known::poll_cut`] some polls are cut mid-request.
pub async fn poller(ctx: Arc<Ctx>, agent: u8, mut rng: Rng) {
    let name = AGENTS[agent as usize];
    while !ctx.stopping() {
        pause(rng.between(10, 300)).await;
        let cut = (ctx.known.poll_cut && !ctx.calm() && rng.chance(0.05))
            .then(|| Duration::from_micros(rng.between(200, 3000)));
        let sess = ctx
            .hist
            .open(Door::IopPoll, agent, &format!("{name}/poll"), None);
        let r = ctx
            .http
            .get(format!("{}/poll?agent={name}", ctx.node().url))
            .timeout(cut.unwrap_or(Duration::from_secs(10)))
            .send()
            .await;
        let items = match r {
            Ok(r) if r.status().is_success() => r.json::<Vec<Value>>().await.ok(),
            _ => None,
        };
        let Some(items) = items else {
            ctx.hist.push(Kind::Close {
                sess,
                why: if cut.is_some() { "cut" } else { "failed" },
            });
            continue;
        };
        let seqs: Vec<u64> = items.iter().filter_map(seq_of).collect();
        ctx.hist.deliver(sess, agent, Door::IopPoll, &seqs);
        // No cursor floor from a `/poll` answer: it is stored only through
        // the claims before it, and a stream's batch its peer has not
        // acknowledged may be below it (released if the stream is cut: the
        // cursor readers start at goes back to it; lost with a crash).
        ctx.hist.push(Kind::Close {
            sess,
            why: "answered",
        });
    }
}

/// An agent-bus follower of `agent`: `GET /recv?since=` with `block=true`
/// and a random `max`, moving `since` to max(last ts, `now`) as clients do.
/// Some requests are cut; now and then it starts over from an older point.
pub async fn recv_follower(ctx: Arc<Ctx>, agent: u8, mut rng: Rng) {
    let name = AGENTS[agent as usize];
    let mut since = 0.0f64;
    let mut seen = vec![0.0f64];
    let mut sess = ctx.hist.open_since(
        Door::AbRecv,
        agent,
        &format!("{name}/recv"),
        None,
        Some(since),
    );
    while !ctx.stopping() {
        if !ctx.calm() && rng.chance(0.005) {
            // Start over from a point seen before (a client restarted
            // with an old cursor): a new session.
            since = seen[rng.below(seen.len() as u64) as usize];
            ctx.hist.push(Kind::Close {
                sess,
                why: "rewound",
            });
            sess = ctx.hist.open_since(
                Door::AbRecv,
                agent,
                &format!("{name}/recv"),
                None,
                Some(since),
            );
        }
        let max = rng.between(1, 50);
        let cut =
            (!ctx.calm() && rng.chance(0.03)).then(|| Duration::from_millis(rng.between(1, 50)));
        let r = ctx
            .http
            .get(format!(
                "{}/recv?to={name}&since={since}&block=true&max={max}",
                ctx.node().url
            ))
            .timeout(cut.unwrap_or(Duration::from_secs(10)))
            .send()
            .await;
        let answer = match r {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            _ => None,
        };
        let Some(answer) = answer else {
            pause(if cut.is_some() { 0 } else { 50 }).await;
            continue;
        };
        if answer.get("gap").is_some() {
            ctx.hist.push(Kind::Gap { sess });
        }
        let messages = answer["messages"].as_array().cloned().unwrap_or_default();
        let seqs: Vec<u64> = messages.iter().filter_map(seq_of).collect();
        ctx.hist.deliver(sess, agent, Door::AbRecv, &seqs);
        let last_ts = messages
            .last()
            .and_then(|m| m["ts"].as_f64())
            .unwrap_or(since);
        let now = answer["now"].as_f64().unwrap_or(since);
        since = since.max(last_ts).max(now);
        ctx.hist.push(Kind::Since { sess, since });
        ctx.hist.since[agent as usize].store(since.to_bits(), Ordering::SeqCst);
        if seen.len() < 10_000 {
            seen.push(since);
        }
    }
    ctx.hist.push(Kind::Close { sess, why: "stop" });
}

/// Samples the cursor of every agent; each sample carries the highest
/// acknowledged cursor move known before it was asked for.
pub async fn cursor_sampler(ctx: Arc<Ctx>, mut rng: Rng) {
    while !ctx.stopping() {
        pause(rng.between(50, 300)).await;
        let agent = rng.below(AGENTS.len() as u64) as u8;
        let floor = ctx.hist.floors[agent as usize].load(Ordering::SeqCst);
        let r = ctx
            .http
            .get(format!(
                "{}/v1/agents/{}/inbox?limit=1",
                ctx.node().url,
                AGENTS[agent as usize]
            ))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(r) = r {
            if let Ok(v) = r.json::<Value>().await {
                if let Some(cursor) = v["cursor"].as_u64() {
                    ctx.hist.push(Kind::Cursor {
                        agent,
                        cursor,
                        floor,
                    });
                }
            }
        }
    }
}

/// Every message in `agent`'s inbox, read without acknowledging anything:
/// `(seq, ts, key)`.
pub async fn list_inbox(ctx: &Ctx, agent: u8) -> Result<Vec<(u64, f64, Option<Key>)>, String> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let url = format!(
            "{}/v1/agents/{}/inbox?after={after}&limit=1000",
            ctx.first().url,
            AGENTS[agent as usize]
        );
        let v: Value = ctx
            .http
            .get(url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if v.get("gap").is_some_and(|g| !g.is_null()) {
            return Err(format!("gap in a non-destructive read: {v}"));
        }
        let messages = v["messages"].as_array().ok_or_else(|| v.to_string())?;
        if messages.is_empty() {
            return Ok(out);
        }
        for m in messages {
            let seq = m["seq"].as_u64().unwrap();
            let body = &m["body"];
            let key = body["k"]
                .as_str()
                .or(body["text"].as_str())
                .and_then(Key::parse);
            out.push((seq, m["ts"].as_f64().unwrap(), key));
            after = seq;
        }
    }
}

/// A recipient's `read` steps of a message, as the daemon recorded them:
/// `(door, ts)` (seconds since the epoch).
pub type Reads = Vec<(String, f64)>;

/// The `read` steps of `seqs` in `agent`'s inbox (its receipts).
pub async fn read_steps(
    ctx: &Ctx,
    agent: u8,
    seqs: &std::collections::BTreeSet<u64>,
) -> std::collections::HashMap<u64, Reads> {
    let name = AGENTS[agent as usize];
    let mut out = std::collections::HashMap::new();
    let Some(&first) = seqs.first() else {
        return out;
    };
    let mut ids = Vec::new();
    let mut after = first - 1;
    'pages: loop {
        let url = format!(
            "{}/v1/agents/{name}/inbox?after={after}&limit=1000",
            ctx.first().url
        );
        let Ok(r) = ctx.http.get(url).send().await else {
            break;
        };
        let Ok(v) = r.json::<Value>().await else {
            break;
        };
        let messages = v["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            break;
        }
        for m in messages {
            let seq = m["seq"].as_u64().unwrap_or(0);
            after = seq;
            if seqs.contains(&seq) {
                ids.push((seq, m["id"].as_str().unwrap_or_default().to_owned()));
            }
            if seqs.last().is_some_and(|&l| seq >= l) {
                break 'pages;
            }
        }
    }
    for (seq, id) in ids {
        let url = format!("{}/v1/messages/{id}", ctx.first().url);
        let Ok(r) = ctx.http.get(url).send().await else {
            continue;
        };
        let Ok(Value::Array(receipts)) = r.json::<Value>().await else {
            continue;
        };
        let mut reads = Vec::new();
        for receipt in receipts.iter().filter(|r| r["seq"].as_u64() == Some(seq)) {
            let recipients = receipt["recipients"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for who in recipients.iter().filter(|w| w["agent"] == name) {
                for step in who["steps"].as_array().into_iter().flatten() {
                    if step["state"] == "read" {
                        reads.push((
                            step["door"].as_str().unwrap_or_default().to_owned(),
                            step["ts"].as_f64().unwrap_or(0.0),
                        ));
                    }
                }
            }
        }
        out.insert(seq, reads);
    }
    out
}

/// The cursor of `agent`'s inbox (where a reader starts).
pub async fn cursor_of(ctx: &Ctx, agent: u8) -> Option<u64> {
    let url = format!(
        "{}/v1/agents/{}/inbox?limit=1",
        ctx.first().url,
        AGENTS[agent as usize]
    );
    let v: Value = ctx.http.get(url).send().await.ok()?.json().await.ok()?;
    v["cursor"].as_u64()
}
