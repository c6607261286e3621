//! A long-lived registration that survives daemon restarts.
//!
//! A background task connects, registers with explicit acknowledgements,
//! pings every [`HEARTBEAT`], and forwards messages through a bounded queue.
//! When the connection drops it reconnects with exponential backoff from
//! 1 s to 30 s; the daemon resumes delivery from the stored cursor, and the
//! subscriber skips anything it already handed out (by `seq`), so the
//! caller sees every message once, in order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hermod_proto::wire::{AckMode, ClientFrame, MessageFrame, ServerFrame};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::{Connection, Error, Result};

/// Interval between pings (hermes-bus clients ping every 55–60 s).
pub const HEARTBEAT: Duration = Duration::from_secs(55);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// See the module docs.
pub struct Subscriber {
    messages: mpsc::Receiver<Result<MessageFrame>>,
    acks: mpsc::Sender<u64>,
    /// The connection task; dropping the subscriber stops it.
    task: AbortOnDropHandle<()>,
}

impl Subscriber {
    /// Starts receiving for `endpoint` on `channel` (default when `None`).
    pub fn start(socket: PathBuf, endpoint: String, channel: Option<String>) -> Self {
        let (msg_tx, messages) = mpsc::channel(256);
        let (acks, ack_rx) = mpsc::channel(256);
        let task =
            AbortOnDropHandle::new(tokio::spawn(run(socket, endpoint, channel, msg_tx, ack_rx)));
        Self {
            messages,
            acks,
            task,
        }
    }

    /// The next message. Connection trouble is retried in the background;
    /// only a refusal (e.g. an invalid name) comes back as an error.
    pub async fn next(&mut self) -> Option<Result<MessageFrame>> {
        self.messages.recv().await
    }

    /// Acknowledges everything up to `seq`: it will not be delivered again.
    pub async fn ack(&self, seq: u64) {
        let _ = self.acks.send(seq).await;
    }
}

impl Subscriber {
    /// Stops receiving and waits (up to 2 s) until every acknowledgement
    /// given so far has been written to the daemon.
    pub async fn close(self) {
        let Subscriber {
            messages,
            acks,
            mut task,
        } = self;
        drop(messages);
        drop(acks);
        // On timeout the handle drops here and aborts the task.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut task).await;
    }
}

async fn run(
    socket: PathBuf,
    endpoint: String,
    channel: Option<String>,
    out: mpsc::Sender<Result<MessageFrame>>,
    mut acks: mpsc::Receiver<u64>,
) {
    let mut last_seq = 0;
    let mut backoff = BACKOFF_START;
    loop {
        let mut registered = false;
        let session = session(
            &socket,
            &endpoint,
            &channel,
            &out,
            &mut acks,
            &mut last_seq,
            &mut registered,
        );
        match session.await {
            // A refusal will not get better by retrying.
            Err(Error::Server { code, detail }) => {
                let _ = out.send(Err(Error::Server { code, detail })).await;
                return;
            }
            Err(e) => {
                if out.is_closed() {
                    return;
                }
                tracing::debug!(error = %e, ?backoff, "subscriber connection lost; reconnecting");
            }
            Ok(()) => return,
        }
        if registered {
            // A fresh outage starts its backoff from the bottom.
            backoff = BACKOFF_START;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life. `Ok` means the caller went away.
async fn session(
    socket: &Path,
    endpoint: &str,
    channel: &Option<String>,
    out: &mpsc::Sender<Result<MessageFrame>>,
    acks: &mut mpsc::Receiver<u64>,
    last_seq: &mut u64,
    registered: &mut bool,
) -> Result<()> {
    let mut conn = Connection::connect(socket).await?;
    let reply = conn
        .request(&ClientFrame::Register {
            endpoint: endpoint.to_owned(),
            channel: channel.clone(),
            ack: Some(AckMode::Explicit),
            gaps: None,
        })
        .await?;
    if !matches!(reply, ServerFrame::Registered { .. }) {
        return Err(Error::Protocol(format!(
            "expected `registered`, got {reply:?}"
        )));
    }
    *registered = true;
    let (mut reader, mut writer) = conn.split();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            frame = reader.next() => match frame? {
                None => return Err(Error::Closed),
                Some(ServerFrame::Message(m)) => {
                    if m.seq <= *last_seq {
                        continue; // redelivered after a reconnect: already handed out
                    }
                    *last_seq = m.seq;
                    if out.send(Ok(m)).await.is_err() {
                        // The caller closed: write the acks it gave first,
                        // and wait until they were processed (see below).
                        while let Ok(seq) = acks.try_recv() {
                            writer.feed(&ClientFrame::Ack { seq }).await?;
                        }
                        writer.send(&ClientFrame::Ping).await?;
                        loop {
                            match reader.next().await? {
                                None | Some(ServerFrame::Pong) => return Ok(()),
                                Some(_) => {}
                            }
                        }
                    }
                }
                Some(ServerFrame::Error { code, detail, .. }) => {
                    tracing::warn!(%code, %detail, "daemon reported an error");
                }
                Some(_) => {}
            },
            seq = acks.recv() => match seq {
                Some(seq) => writer.send(&ClientFrame::Ack { seq }).await?,
                // The caller closed after its last ack: the daemon answers a
                // `ping` after the frames before it, so its `pong` says those
                // acks were processed. Leaving before it, a reader that
                // starts at once (the next `hermod recv`) could be handed
                // the acknowledged message again.
                None => {
                    writer.send(&ClientFrame::Ping).await?;
                    loop {
                        match reader.next().await? {
                            None | Some(ServerFrame::Pong) => return Ok(()),
                            Some(_) => {}
                        }
                    }
                }
            },
            _ = heartbeat.tick() => writer.send(&ClientFrame::Ping).await?,
        }
    }
}
