//! The hermes_events cross-process relay (PROTOCOLS.md §4).
//!
//! `GET /api/pub?token=&channel=` is a WebSocket whose text frames are
//! either relay frames (`{"_bus_relay":true,"topic":T,"envelope":{..}}`,
//! published as topic `T` with the envelope as is, so the original
//! `ts`/`src` survive) or JSON-RPC events (`{"jsonrpc":"2.0","method":
//! "event","params":{"type":E,"session_id":S,"payload":{..}}}`, published as
//! `tui.E` with `session_id` and the payload flattened in). Anything else is
//! ignored and the connection stays open. The relay channel is the bus
//! channel the events land on.
//!
//! Both endpoints need the token set with `serve --relay-token` (or
//! `HERMOD_RELAY_TOKEN`; an empty one is refused at start), or an agent's
//! token (then the agent's `may_publish` / `may_subscribe` rules apply and
//! events carry its name); without either they answer 401 before upgrading.
//!
//! Each frame is checked before anyone sees it, then fanned out, as is, to
//! the `GET /api/events?token=&channel=` WebSockets of its channel, and
//! published. The holder of the relay token may relay anything (every text
//! frame is fanned out, as the protocol has it). An agent's frame goes out
//! only if it is an event its `may_publish` allows on that channel: a
//! refused one reaches no listener and the bus stores nothing of it; the
//! publisher gets an error frame (`{"type":"error","code":..,"detail":..}`,
//! as on every hermod WebSocket) and the connection stays open, so the
//! allowed frames after it still go through. An agent's frame that is no
//! event at all is ignored, as above.
//!
//! Fan-out goes through one [`Ring`] per channel, which holds the frames
//! its slowest listener has not taken yet: at most [`RING_FRAMES`] and
//! [`RING_BYTES`] (the newest frame always stays, so a frame up to the
//! 10 MiB limit still passes). A listener that falls further behind skips
//! the oldest frames. A listener starts at the newest frame: a ring keeps
//! nothing while nobody listens. A channel with no listener, no publisher
//! and no frame for [`IDLE`] is dropped; at most [`MAX_CHANNELS`] exist at
//! once, past that a new one is refused (503 `too_many_channels`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{self, Utf8Bytes, WebSocket};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use futures::{SinkExt, StreamExt};
use hermod_core::auth::Caller;
use hermod_core::model::{AgentName, Auth, Channel, RELAY_SENDER};
use hermod_core::wire::ServerFrame;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

use super::error::{ApiError, Ws, Q};
use super::AppState;

/// Frames a channel's ring holds at most for its slowest listener.
pub const RING_FRAMES: usize = 1024;
/// Bytes of frames a channel's ring holds at most (beyond its newest frame).
pub const RING_BYTES: usize = 8 << 20;
/// A channel with no listener, no publisher and no frame for this long is
/// dropped (a bridge that reconnects within it keeps its channel).
pub const IDLE: Duration = Duration::from_secs(60);
/// Relay channels at once.
pub const MAX_CHANNELS: usize = 256;
/// Error frames queued for a publisher; one that never reads them loses
/// the excess instead of stalling its own frames.
const ERROR_QUEUE: usize = 16;

/// The relay channels, each with its ring.
#[derive(Clone, Default)]
pub struct RelayHub {
    // Lock order: this map, then a feed's ring; never the other way.
    channels: Arc<Mutex<Channels>>,
}

#[derive(Default)]
struct Channels {
    feeds: HashMap<Channel, Arc<Feed>>,
    /// When idle channels were last dropped.
    swept: Option<Instant>,
}

/// One relay channel. Publishers and listeners hold it, so a feed only
/// the hub holds has neither.
struct Feed {
    ring: Mutex<Ring>,
    /// Rings on every frame; the frames themselves sit in the ring.
    bell: watch::Sender<()>,
}

impl RelayHub {
    /// The feed of `channel`, made if need be.
    fn feed(&self, channel: &Channel) -> Result<Arc<Feed>, ApiError> {
        self.feed_at(channel, Instant::now())
    }

    fn feed_at(&self, channel: &Channel, now: Instant) -> Result<Arc<Feed>, ApiError> {
        let mut channels = self.channels.lock().unwrap();
        let due = channels.swept.is_none_or(|at| now >= at + IDLE);
        if due || channels.feeds.len() >= MAX_CHANNELS {
            channels.swept = Some(now);
            channels.feeds.retain(|_, feed| {
                Arc::strong_count(feed) > 1 || now < feed.ring.lock().unwrap().active + IDLE
            });
        }
        if let Some(feed) = channels.feeds.get(channel) {
            feed.ring.lock().unwrap().active = now;
            return Ok(feed.clone());
        }
        if channels.feeds.len() >= MAX_CHANNELS {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_channels",
                format!("{MAX_CHANNELS} relay channels are in use; try again later"),
            ));
        }
        let feed = Arc::new(Feed {
            ring: Mutex::new(Ring::new(RING_FRAMES, RING_BYTES, now)),
            bell: watch::Sender::new(()),
        });
        channels.feeds.insert(channel.clone(), feed.clone());
        Ok(feed)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.channels.lock().unwrap().feeds.len()
    }
}

impl Feed {
    /// Hands `frame` to every listener of the channel.
    fn fan_out(&self, frame: Utf8Bytes) {
        self.ring.lock().unwrap().push(frame, Instant::now());
        self.bell.send_replace(());
    }

    /// A listener from the next frame on.
    fn listen(self: Arc<Self>) -> Listener {
        let bell = self.bell.subscribe();
        let cursor = self.ring.lock().unwrap().join();
        Listener {
            feed: self,
            cursor,
            bell,
        }
    }
}

/// One `/api/events` connection's place in its channel's ring.
struct Listener {
    feed: Arc<Feed>,
    cursor: u64,
    bell: watch::Receiver<()>,
}

impl Listener {
    /// The frames after the last call, and how many were skipped because
    /// the ring let them go first; waits until there is something.
    /// Cancel-safe: nothing is taken unless it is returned.
    async fn next(&mut self) -> (u64, Vec<Utf8Bytes>) {
        loop {
            let (skipped, frames) = self.feed.ring.lock().unwrap().take(&mut self.cursor);
            if skipped > 0 || !frames.is_empty() {
                return (skipped, frames);
            }
            // A frame pushed since `take` has rung already: no wake-up lost.
            if self.bell.changed().await.is_err() {
                std::future::pending::<()>().await; // the feed outlives us
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.feed
            .ring
            .lock()
            .unwrap()
            .leave(self.cursor, Instant::now());
    }
}

/// A channel's frames that some listener has not taken yet, bounded in
/// count and bytes. Frames are numbered; each listener is a cursor (the
/// number it takes next).
struct Ring {
    frames: VecDeque<Utf8Bytes>,
    /// The number of `frames[0]`.
    first: u64,
    bytes: usize,
    /// Listener cursors → how many listeners are there.
    cursors: BTreeMap<u64, usize>,
    max_frames: usize,
    max_bytes: usize,
    /// The last frame, listener or lookup.
    active: Instant,
}

impl Ring {
    fn new(max_frames: usize, max_bytes: usize, now: Instant) -> Self {
        Self {
            frames: VecDeque::new(),
            first: 0,
            bytes: 0,
            cursors: BTreeMap::new(),
            max_frames: max_frames.max(1),
            max_bytes,
            active: now,
        }
    }

    /// The number the next frame gets.
    fn end(&self) -> u64 {
        self.first + self.frames.len() as u64
    }

    fn join(&mut self) -> u64 {
        let at = self.end();
        *self.cursors.entry(at).or_default() += 1;
        at
    }

    fn leave(&mut self, cursor: u64, now: Instant) {
        self.unmark(cursor);
        self.active = now;
        self.trim();
    }

    fn unmark(&mut self, cursor: u64) {
        if let Some(n) = self.cursors.get_mut(&cursor) {
            *n -= 1;
            if *n == 0 {
                self.cursors.remove(&cursor);
            }
        }
    }

    fn push(&mut self, frame: Utf8Bytes, now: Instant) {
        self.active = now;
        if self.cursors.is_empty() {
            // Nobody could ever take it (a listener starts at the end).
            debug_assert!(self.frames.is_empty(), "the last listener trimmed");
            self.first += 1;
            return;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        while self.frames.len() > 1
            && (self.frames.len() > self.max_frames || self.bytes > self.max_bytes)
        {
            self.pop();
        }
    }

    /// Everything from `cursor` on, which moves to the end, and how many
    /// frames before what is returned were let go before it took them.
    fn take(&mut self, cursor: &mut u64) -> (u64, Vec<Utf8Bytes>) {
        let skipped = self.first.saturating_sub(*cursor);
        let from = (*cursor).max(self.first) - self.first;
        let frames: Vec<Utf8Bytes> = self.frames.range(from as usize..).cloned().collect();
        let end = self.end();
        if *cursor != end {
            self.unmark(*cursor);
            *self.cursors.entry(end).or_default() += 1;
            *cursor = end;
            self.trim();
        }
        (skipped, frames)
    }

    /// Lets go of the frames every listener has taken.
    fn trim(&mut self) {
        let oldest = self.cursors.keys().next().copied().unwrap_or(self.end());
        while self.first < oldest && !self.frames.is_empty() {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some(f) = self.frames.pop_front() {
            self.bytes -= f.len();
            self.first += 1;
        }
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/pub", get(publish))
        .route("/api/events", get(events))
}

#[derive(Deserialize)]
struct RelayQuery {
    token: Option<String>,
    channel: Option<String>,
}

/// Who feeds or reads a relay: the holder of the relay token, or an agent.
enum Relayer {
    /// The shared relay secret: events are published as `relay`, unverified.
    Relay,
    /// An agent's token (the HTTP edge verified it).
    Agent(Caller),
}

impl Relayer {
    /// The relay secret proves no agent: its events are the daemon's,
    /// published under the reserved name `relay`, unverified.
    fn caller(&self) -> Caller {
        match self {
            Relayer::Relay => Caller::daemon(Auth::Open),
            Relayer::Agent(c) => c.clone(),
        }
    }

    /// The publisher name: `relay` (so a bridge never ships these back), or
    /// the agent itself.
    fn sender(&self) -> Option<AgentName> {
        match self {
            Relayer::Relay => Some(AgentName::parse(RELAY_SENDER).expect("valid name")),
            Relayer::Agent(_) => None,
        }
    }
}

impl RelayQuery {
    /// Who is relaying, and the relay channel, once a token checks out.
    fn authorize(
        self,
        app: &AppState,
        caller: Option<Caller>,
    ) -> Result<(Relayer, Channel), ApiError> {
        let relay_token = self
            .token
            .as_deref()
            .is_some_and(|t| app.config.is_relay_token(t));
        let relayer = match caller.filter(|c| c.identity().is_some()) {
            _ if relay_token => Relayer::Relay,
            Some(agent) => Relayer::Agent(agent),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid relay token (serve --relay-token) or agent token is required",
                ))
            }
        };
        let channel = Channel::parse(self.channel.unwrap_or_else(|| "gateway".into()))?;
        Ok((relayer, channel))
    }
}

async fn publish(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    Q(q): Q<RelayQuery>,
    Ws(upgrade): Ws,
) -> Result<Response, ApiError> {
    let (relayer, channel) = q.authorize(&app, caller.map(|c| c.0))?;
    let caller = relayer.caller();
    app.broker.trust().may_use_channel(&caller, &channel)?;
    let feed = app.relay.feed(&channel)?;
    Ok(upgrade
        .max_message_size(hermod_core::wire::MAX_FRAME)
        .on_upgrade(move |socket| relay_in(app, relayer, channel, feed, socket))
        .into_response())
}

async fn relay_in(
    app: AppState,
    relayer: Relayer,
    channel: Channel,
    feed: Arc<Feed>,
    socket: WebSocket,
) {
    let (caller, from) = (relayer.caller(), relayer.sender());
    let (mut tx, mut rx) = socket.split();
    // Error frames go out from their own task through a small queue: a
    // publisher that never reads (a bridge only ships) cannot stall the
    // reading of its own frames.
    let (errors, mut error_rx) = mpsc::channel::<ServerFrame>(ERROR_QUEUE);
    tokio::spawn(async move {
        while let Some(frame) = error_rx.recv().await {
            let text = Utf8Bytes::try_from(frame.to_bytes()).expect("frames are JSON text");
            if tx.send(ws::Message::Text(text)).await.is_err() {
                return;
            }
        }
        let _ = tx.close().await;
    });
    let refuse = |e: hermod_core::Error| {
        tracing::debug!(error = %e, "relay frame refused");
        if errors.try_send(ServerFrame::error(&e, None)).is_err() {
            tracing::debug!("relay publisher does not read its errors; one dropped");
        }
    };
    loop {
        let frame = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            // An agent's token revoked or rotated (the relay token never is).
            _ = caller.revoked().cancelled() => break,
            frame = rx.next() => frame,
        };
        let text = match frame {
            Some(Ok(ws::Message::Text(text))) => text,
            Some(Ok(ws::Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let event = parse_relay_frame(&text);
        // Checked before anyone sees it (see the module docs).
        match (&relayer, &event) {
            (Relayer::Relay, _) => {}
            (Relayer::Agent(agent), Some((topic, _))) => {
                if let Err(e) = app.broker.may_publish(agent, &channel, None, topic) {
                    refuse(e);
                    continue;
                }
            }
            (Relayer::Agent(_), None) => {
                tracing::debug!("relay frame ignored (not a relay or event frame)");
                continue;
            }
        }
        feed.fan_out(text);
        let Some((topic, payload)) = event else {
            tracing::debug!("relay frame not published (not a relay or event frame)");
            continue;
        };
        let published = app
            .broker
            .publish(
                &caller,
                channel.clone(),
                from.clone(),
                &topic,
                payload,
                None,
            )
            .await;
        match (published, &relayer) {
            (Ok(_), _) => {}
            (Err(e), Relayer::Relay) => tracing::debug!(error = %e, %topic, "relay event refused"),
            (Err(e), Relayer::Agent(_)) => refuse(e),
        }
    }
}

/// The topic and payload of a relay or JSON-RPC event frame; `None` for
/// anything else.
pub fn parse_relay_frame(text: &str) -> Option<(String, Map<String, Value>)> {
    let Value::Object(frame) = serde_json::from_str(text).ok()? else {
        return None;
    };
    if frame.get("_bus_relay") == Some(&Value::Bool(true)) {
        let topic = frame.get("topic")?.as_str()?.to_owned();
        let envelope = frame.get("envelope")?.as_object()?.clone();
        return Some((topic, envelope));
    }
    if frame.get("jsonrpc")?.as_str()? == "2.0" && frame.get("method")?.as_str()? == "event" {
        let params = frame.get("params")?.as_object()?;
        let kind = params.get("type")?.as_str().filter(|t| !t.is_empty())?;
        let mut payload = match params.get("payload") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return None,
        };
        if let Some(session) = params.get("session_id") {
            payload.insert("session_id".into(), session.clone());
        }
        return Some((format!("tui.{kind}"), payload));
    }
    None
}

async fn events(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    Q(q): Q<RelayQuery>,
    Ws(upgrade): Ws,
) -> Result<Response, ApiError> {
    let (relayer, channel) = q.authorize(&app, caller.map(|c| c.0))?;
    // Raw frames of every topic: an agent needs to be allowed them all.
    app.broker
        .trust()
        .may_subscribe(&relayer.caller(), &channel, "**")?;
    // Joined before the answer: every frame after the handshake arrives.
    let listener = app.relay.feed(&channel)?.listen();
    let caller = relayer.caller();
    Ok(upgrade
        .on_upgrade(move |socket| relay_out(app, caller, listener, socket))
        .into_response())
}

async fn relay_out(app: AppState, caller: Caller, mut listener: Listener, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => break,
            // An agent's token revoked or rotated (the relay token never is).
            _ = caller.revoked().cancelled() => break,
            incoming = rx.next() => match incoming {
                Some(Ok(ws::Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            (skipped, frames) = listener.next() => {
                if skipped > 0 {
                    tracing::warn!(skipped, "relay listener fell behind");
                }
                for text in frames {
                    if tx.send(ws::Message::Text(text)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = tx.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(byte: char, len: usize) -> Utf8Bytes {
        Utf8Bytes::from(String::from(byte).repeat(len))
    }

    #[test]
    fn the_ring_is_bounded_in_bytes() {
        let now = Instant::now();
        let mut ring = Ring::new(1000, 1000, now);
        // Nobody listening: nothing is kept.
        ring.push(frame('x', 300), now);
        assert_eq!((ring.frames.len(), ring.bytes), (0, 0));
        let (mut slow, mut quick) = (ring.join(), ring.join());
        for c in ['a', 'b', 'c', 'd', 'e', 'f', 'g'] {
            ring.push(frame(c, 300), now);
            assert!(ring.bytes <= 1000, "{} bytes held", ring.bytes);
        }
        // Three frames fit in 1000 bytes; the count bound (1000) never bit.
        assert_eq!((ring.frames.len(), ring.bytes), (3, 900));
        let (skipped, got) = ring.take(&mut slow);
        assert_eq!(skipped, 4);
        assert_eq!(
            got.iter().map(|f| &f[..1]).collect::<Vec<_>>(),
            ["e", "f", "g"]
        );
        // A frame over the bound alone still passes, and goes at the next.
        ring.push(frame('h', 5000), now);
        assert_eq!((ring.frames.len(), ring.bytes), (1, 5000));
        ring.push(frame('i', 10), now);
        assert_eq!((ring.frames.len(), ring.bytes), (1, 10));
        let (skipped, got) = ring.take(&mut slow);
        assert_eq!((skipped, got.len(), &got[0][..1]), (1, 1, "i"));
        // What every listener took is let go.
        let (skipped, got) = ring.take(&mut quick);
        assert_eq!((skipped, got.len()), (8, 1));
        assert_eq!((ring.frames.len(), ring.bytes), (0, 0));
        ring.push(frame('j', 10), now);
        ring.leave(slow, now);
        ring.leave(quick, now);
        assert_eq!((ring.frames.len(), ring.bytes), (0, 0));
    }

    #[test]
    fn the_ring_is_bounded_in_count() {
        let now = Instant::now();
        let mut ring = Ring::new(4, RING_BYTES, now);
        let mut cursor = ring.join();
        for _ in 0..10 {
            ring.push(frame('x', 1), now);
        }
        assert_eq!(ring.frames.len(), 4);
        assert_eq!(ring.take(&mut cursor).0, 6);
    }

    #[test]
    fn idle_channels_are_dropped_and_their_number_bounded() {
        let hub = RelayHub::default();
        let t0 = Instant::now();
        let channel = |i: usize| Channel::parse(format!("ch{i}")).unwrap();
        let listened = hub.feed_at(&channel(0), t0).unwrap().listen();
        let published = hub.feed_at(&channel(1), t0).unwrap();
        for i in 2..MAX_CHANNELS {
            hub.feed_at(&channel(i), t0).unwrap();
        }
        // Full: nothing is idle for long enough yet.
        let refused = hub.feed_at(&channel(MAX_CHANNELS), t0 + IDLE / 2);
        assert_eq!(refused.err().map(|e| e.code), Some("too_many_channels"));
        assert!(
            hub.feed_at(&channel(5), t0 + IDLE / 2).is_ok(),
            "a known one is served"
        );
        // Later the unused ones go (channel 5 was looked up at IDLE / 2);
        // the listened and the published stay.
        hub.feed_at(&channel(MAX_CHANNELS), t0 + IDLE).unwrap();
        assert_eq!(hub.len(), 4);
        drop((listened, published));
        hub.feed_at(&channel(0), t0 + IDLE * 3).unwrap();
        assert_eq!(hub.len(), 1, "only the one just asked for");
    }

    #[tokio::test]
    async fn listeners_get_every_frame_in_order_without_polling() {
        let hub = RelayHub::default();
        let feed = hub.feed(&Channel::parse("gw").unwrap()).unwrap();
        let mut listener = feed.clone().listen();
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 3 {
                got.extend(listener.next().await.1);
            }
            got
        });
        tokio::task::yield_now().await;
        for f in ["1", "2", "3"] {
            feed.fan_out(Utf8Bytes::from(f));
        }
        assert_eq!(waiting.await.unwrap(), ["1", "2", "3"]);
        assert_eq!(feed.ring.lock().unwrap().frames.len(), 0, "listener gone");
    }

    #[test]
    fn frame_shapes() {
        let (t, env) = parse_relay_frame(
            r#"{"_bus_relay":true,"topic":"gateway.agent.start","envelope":{"type":"gateway.agent.start","ts":1.5,"src":"gateway","x":1}}"#,
        )
        .unwrap();
        assert_eq!(t, "gateway.agent.start");
        assert_eq!(env["ts"], 1.5);
        let (t, p) = parse_relay_frame(
            r#"{"jsonrpc":"2.0","method":"event","params":{"type":"tool.start","session_id":"s1","payload":{"tool":"bash"}}}"#,
        )
        .unwrap();
        assert_eq!(t, "tui.tool.start");
        assert_eq!(p["session_id"], "s1");
        assert_eq!(p["tool"], "bash");
        for junk in [
            "nope",
            "[1,2]",
            "{}",
            r#"{"_bus_relay":true,"topic":5}"#,
            r#"{"jsonrpc":"2.0","method":"event","params":{}}"#,
        ] {
            assert!(parse_relay_frame(junk).is_none(), "{junk}");
        }
    }
}
