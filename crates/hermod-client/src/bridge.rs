//! The relay bridge: ships topic events to a remote hermod's `/api/pub`
//! WebSocket as relay frames (`{"_bus_relay":true,"topic":T,"envelope":E}`),
//! so one process's events reach another (gateway → dashboard).
//!
//! - [`Outbox`]: a bounded queue of 1024 frames that drops the oldest when
//!   full. Pushing never blocks, so the publisher never waits for the network.
//! - [`Bridge::start`]: a task that connects (reconnecting with backoff from
//!   1 s to 30 s) and drains the outbox; what is queued while the remote is
//!   down is shipped when it returns.
//! - [`Bridge::attach`]: the same for an in-process [`hermod_events::Bus`].
//!
//! No echo loops: events that arrived by relay are not shipped back (the
//! daemon stores them with sender `relay`; in-process envelopes can carry
//! `"_bus_relayed": true`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::task::AbortOnDropHandle;

/// Frames queued before the oldest are dropped.
pub const OUTBOX_CAPACITY: usize = 1024;
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Envelope key marking an event that arrived by relay (never shipped).
pub const RELAYED: &str = "_bus_relayed";

/// Where and how to ship events.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The remote `/api/pub` WebSocket, e.g. `ws://host:18900/api/pub`.
    pub url: String,
    pub token: String,
    /// The relay channel (default `gateway`).
    pub channel: String,
    /// Which local topics to ship (default `**`).
    pub pattern: String,
}

impl BridgeConfig {
    /// From `HERMES_DASHBOARD_EVENT_URL`, `HERMES_DASHBOARD_EVENT_TOKEN` and
    /// `HERMES_DASHBOARD_EVENT_CHANNEL` (default `gateway`); `None` without
    /// URL and token: then no bridge runs.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Some(Self {
            url: var("HERMES_DASHBOARD_EVENT_URL")?,
            token: var("HERMES_DASHBOARD_EVENT_TOKEN")?,
            channel: var("HERMES_DASHBOARD_EVENT_CHANNEL").unwrap_or_else(|| "gateway".into()),
            pattern: "**".into(),
        })
    }

    fn endpoint(&self) -> Result<String, String> {
        let mut url = reqwest::Url::parse(&self.url).map_err(|e| format!("{}: {e}", self.url))?;
        url.query_pairs_mut()
            .append_pair("token", &self.token)
            .append_pair("channel", &self.channel);
        Ok(url.to_string())
    }
}

/// The bounded, drop-oldest queue between publishers and the shipping task.
#[derive(Clone, Default)]
pub struct Outbox {
    frames: Arc<Mutex<VecDeque<String>>>,
    ready: Arc<Notify>,
    dropped: Arc<AtomicU64>,
}

impl Outbox {
    /// Queues an event as a relay frame; never blocks. Events marked as
    /// relayed are skipped (no echo loops).
    pub fn push(&self, topic: &str, envelope: &Map<String, Value>) {
        if envelope.get(RELAYED) == Some(&Value::Bool(true)) {
            return;
        }
        let frame = json!({ "_bus_relay": true, "topic": topic, "envelope": envelope }).to_string();
        {
            let mut frames = self.frames.lock().unwrap();
            frames.push_back(frame);
            if frames.len() > OUTBOX_CAPACITY {
                frames.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ready.notify_one();
    }

    /// Frames dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn pop(&self) -> String {
        loop {
            if let Some(frame) = self.frames.lock().unwrap().pop_front() {
                return frame;
            }
            self.ready.notified().await;
        }
    }

    /// Puts back a frame that could not be sent, keeping the bound.
    fn unpop(&self, frame: String) {
        let mut frames = self.frames.lock().unwrap();
        if frames.len() < OUTBOX_CAPACITY {
            frames.push_front(frame);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running bridge; dropping it stops the shipping task.
pub struct Bridge {
    outbox: Outbox,
    _task: AbortOnDropHandle<()>,
}

impl Bridge {
    /// Starts shipping whatever is pushed to [`Bridge::outbox`].
    pub fn start(config: BridgeConfig) -> Self {
        let outbox = Outbox::default();
        let task = AbortOnDropHandle::new(tokio::spawn(ship(config, outbox.clone())));
        Self {
            outbox,
            _task: task,
        }
    }

    /// Ships every event of `bus` matching `config.pattern`. Must be called
    /// inside a tokio runtime; publishing on the bus never waits for it.
    pub fn attach(
        bus: &hermod_events::Bus,
        config: BridgeConfig,
    ) -> Result<(Self, hermod_events::Handle), hermod_events::Error> {
        let pattern = config.pattern.clone();
        let bridge = Self::start(config);
        let outbox = bridge.outbox.clone();
        let handle = bus.subscribe(&pattern, move |event| {
            let topic = event
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            outbox.push(&topic, event);
        })?;
        Ok((bridge, handle))
    }

    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }
}

/// Connects, drains the outbox, reconnects with backoff; runs until dropped.
async fn ship(config: BridgeConfig, outbox: Outbox) {
    let endpoint = match config.endpoint() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "bridge URL is invalid; not shipping");
            return;
        }
    };
    let mut backoff = BACKOFF_START;
    loop {
        match tokio_tungstenite::connect_async(&endpoint).await {
            Ok((ws, _)) => {
                tracing::info!(url = %config.url, "bridge connected");
                backoff = BACKOFF_START;
                let (mut sink, mut incoming) = ws.split();
                loop {
                    let frame = tokio::select! {
                        // A closed remote is noticed before the next frame is
                        // taken: a write into a dead socket would be lost.
                        biased;
                        msg = incoming.next() => match msg {
                            Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                            Some(Ok(_)) => continue,
                        },
                        frame = outbox.pop() => frame,
                    };
                    if let Err(e) = sink.send(WsMessage::text(frame.clone())).await {
                        tracing::warn!(error = %e, "bridge connection lost");
                        outbox.unpop(frame);
                        break;
                    }
                }
                tracing::info!("bridge disconnected; reconnecting");
            }
            Err(e) => tracing::debug!(error = %e, ?backoff, "bridge cannot connect; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_drops_the_oldest_and_skips_relayed() {
        let o = Outbox::default();
        for n in 0..(OUTBOX_CAPACITY + 10) {
            o.push("t.x", &Map::from_iter([("n".to_owned(), json!(n))]));
        }
        assert_eq!(o.len(), OUTBOX_CAPACITY);
        assert_eq!(o.dropped(), 10);
        let first = o.frames.lock().unwrap().front().cloned().unwrap();
        assert!(first.contains("\"n\":10"), "{first}");
        o.push("t.y", &Map::from_iter([(RELAYED.to_owned(), json!(true))]));
        assert_eq!(o.dropped(), 10);
        assert!(!o.frames.lock().unwrap().back().unwrap().contains("t.y"));
    }
}
