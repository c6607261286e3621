//! The Rust client for hermod's Unix socket, reusing [`hermod_proto::wire`].
//!
//! - [`Connection`]: one framed connection; send [`ClientFrame`]s, read
//!   [`ServerFrame`]s, or [`Connection::split`] it to pipeline.
//! - [`send`]: the one-shot send (what hermes-bus `send_message()` is, but
//!   answered only once the bus made the message durable).
//! - [`Subscriber`]: a long-lived registration with heartbeat, explicit
//!   acknowledgements and automatic reconnect (backoff 1 s → 30 s) that
//!   resumes from the agent's cursor — `BusClient` without its churn.
//! - [`http`]: the same over the HTTP `/v1` API.
//! - [`bridge`]: ships topic events to a remote daemon's relay endpoint.

pub mod bridge;
pub mod http;
mod subscriber;

use std::path::{Path, PathBuf};

use futures::{SinkExt, StreamExt};
use hermod_proto::model::Body;
use hermod_proto::wire::{self, ClientFrame, Outgoing, ServerFrame};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

pub use hermod_proto::wire::MessageFrame;
pub use subscriber::Subscriber;

/// What went wrong, matchable without parsing strings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing answers at the socket path.
    #[error("cannot reach the hermod daemon at {path}: {source} (is `hermod serve` running?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error frame.
    #[error("{detail} ({code})")]
    Server { code: String, detail: String },
    /// The daemon closed the connection before answering.
    #[error("the daemon closed the connection")]
    Closed,
    /// The daemon sent something this client does not understand.
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The daemon's receipt for a durable message.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub id: String,
    pub seq: u64,
    pub ts: f64,
    /// What the sender should know: the recipient is busy, or the loop
    /// guard holds the message.
    pub notice: Option<String>,
}

/// A message to send.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    /// `None` broadcasts to every known agent on the channel.
    pub to: Option<String>,
    pub from: Option<String>,
    pub channel: Option<String>,
    pub body: Body,
    /// `reply_to`, `thread`, `priority`, `ttl`, `bounce_after`, `notify`.
    pub meta: wire::OutgoingMeta,
}

impl Draft {
    fn into_frame(self) -> ClientFrame {
        ClientFrame::Send(Outgoing {
            to: self.to,
            from: self.from,
            channel: self.channel,
            body: Some(self.body),
            meta: self.meta,
            ..Outgoing::default()
        })
    }
}

/// The agent token this process presents: `HERMOD_TOKEN` (never a command
/// line flag, so it does not show in `ps`).
pub fn env_token() -> Option<String> {
    std::env::var("HERMOD_TOKEN").ok().filter(|t| !t.is_empty())
}

/// Writing half of a split [`Connection`].
pub struct FrameWriter {
    sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    /// Added as the `token` field of every frame.
    token: Option<std::sync::Arc<str>>,
}
/// Reading half of a split [`Connection`].
pub struct FrameReader(FramedRead<OwnedReadHalf, LengthDelimitedCodec>);

impl FrameWriter {
    /// Queues a frame without flushing (see [`FrameWriter::flush`]).
    pub async fn feed(&mut self, frame: &ClientFrame) -> Result<()> {
        let bytes = match &self.token {
            None => serde_json::to_vec(frame).expect("client frames serialize"),
            Some(_) => {
                let value = serde_json::to_value(frame).expect("client frames serialize");
                return self.feed_value(value).await;
            }
        };
        self.sink.feed(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    async fn feed_value(&mut self, mut value: serde_json::Value) -> Result<()> {
        if let (Some(token), Some(map)) = (&self.token, value.as_object_mut()) {
            map.insert("token".into(), token.as_ref().into());
        }
        let bytes = serde_json::to_vec(&value).expect("JSON values serialize");
        self.sink.feed(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        SinkExt::<bytes::Bytes>::flush(&mut self.sink).await?;
        Ok(())
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        self.feed(frame).await?;
        self.flush().await
    }
}

impl FrameReader {
    /// The next frame's raw JSON payload, unparsed.
    pub async fn next_raw(&mut self) -> Result<Option<bytes::Bytes>> {
        match self.0.next().await {
            None => Ok(None),
            Some(bytes) => Ok(Some(bytes?.freeze())),
        }
    }

    /// The next frame, or `None` when the daemon closed the connection.
    pub async fn next(&mut self) -> Result<Option<ServerFrame>> {
        match self.0.next().await {
            None => Ok(None),
            Some(bytes) => {
                let bytes = bytes?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::Protocol(e.to_string()))
            }
        }
    }
}

/// One framed connection to the daemon.
pub struct Connection {
    reader: FrameReader,
    writer: FrameWriter,
}

impl Connection {
    /// Connects, presenting `HERMOD_TOKEN` if it is set.
    pub async fn connect(path: &Path) -> Result<Self> {
        Self::connect_with_token(path, env_token()).await
    }

    /// Connects; every frame carries `token` when given.
    pub async fn connect_with_token(path: &Path, token: Option<String>) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| Error::Unreachable {
                path: path.to_owned(),
                source,
            })?;
        let (rd, wr) = stream.into_split();
        Ok(Self {
            reader: FrameReader(FramedRead::new(rd, wire::codec())),
            writer: FrameWriter {
                sink: FramedWrite::new(wr, wire::codec()),
                token: token.map(Into::into),
            },
        })
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<()> {
        self.writer.send(frame).await
    }

    /// The next frame; a closed connection is [`Error::Closed`].
    pub async fn next_frame(&mut self) -> Result<ServerFrame> {
        self.reader.next().await?.ok_or(Error::Closed)
    }

    /// Sends a request and returns its reply; error frames become [`Error::Server`].
    pub async fn request(&mut self, frame: &ClientFrame) -> Result<ServerFrame> {
        self.send_frame(frame).await?;
        match self.next_frame().await? {
            ServerFrame::Error { code, detail, .. } => Err(Error::Server { code, detail }),
            other => Ok(other),
        }
    }

    /// Sends any JSON frame and returns the reply as JSON text (for frames
    /// the typed API does not cover); error frames become [`Error::Server`].
    pub async fn request_raw(&mut self, frame: &serde_json::Value) -> Result<String> {
        self.writer.feed_value(frame.clone()).await?;
        self.writer.flush().await?;
        let reply = self.reader.next_raw().await?.ok_or(Error::Closed)?;
        if let Ok(ServerFrame::Error { code, detail, .. }) = serde_json::from_slice(&reply) {
            return Err(Error::Server { code, detail });
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// Sends a message and waits until it is durable.
    pub async fn send(&mut self, draft: Draft) -> Result<Sent> {
        match self.request(&draft.into_frame()).await? {
            ServerFrame::Sent {
                id,
                seq,
                ts,
                notice,
            } => Ok(Sent {
                id,
                seq,
                ts,
                notice,
            }),
            other => Err(Error::Protocol(format!("expected `sent`, got {other:?}"))),
        }
    }

    /// Registered endpoints: name → session id.
    pub async fn list_endpoints(&mut self) -> Result<std::collections::BTreeMap<String, String>> {
        match self.request(&ClientFrame::ListEndpoints).await? {
            ServerFrame::EndpointsList { endpoints } => Ok(endpoints),
            other => Err(Error::Protocol(format!(
                "expected `endpoints_list`, got {other:?}"
            ))),
        }
    }

    /// `None` while the daemon's store accepts writes, else why not.
    pub async fn degraded(&mut self) -> Result<Option<String>> {
        Ok(self.status().await?.0)
    }

    /// [`Connection::degraded`], and the daemon's storage engine as it
    /// describes itself (`{"engine": ...}`; `None` from an older daemon).
    pub async fn status(&mut self) -> Result<(Option<String>, Option<serde_json::Value>)> {
        let (reason, engine, _) = self.status_all().await?;
        Ok((reason, engine))
    }

    /// [`Connection::status`], and what the daemon holds in memory
    /// (`{"cache_bytes", "budget_bytes", "views", "connections"}`; `None`
    /// from an older daemon or for a caller that is not an admin).
    pub async fn status_all(
        &mut self,
    ) -> Result<(
        Option<String>,
        Option<serde_json::Value>,
        Option<serde_json::Value>,
    )> {
        match self.request(&ClientFrame::Status).await? {
            ServerFrame::Status {
                reason,
                engine,
                memory,
                ..
            } => Ok((reason, engine, memory)),
            other => Err(Error::Protocol(format!("expected `status`, got {other:?}"))),
        }
    }

    /// Removes an offline agent with its inbox, cursor and subscriptions.
    pub async fn forget(&mut self, agent: &str, channel: Option<&str>) -> Result<()> {
        let frame = ClientFrame::Forget {
            agent: agent.to_owned(),
            channel: channel.map(str::to_owned),
        };
        match self.request(&frame).await? {
            ServerFrame::Forgotten { .. } => Ok(()),
            other => Err(Error::Protocol(format!(
                "expected `forgotten`, got {other:?}"
            ))),
        }
    }

    /// Every known agent with its presence and unread count.
    pub async fn agents(&mut self) -> Result<Vec<wire::AgentSummary>> {
        match self.request(&ClientFrame::Agents).await? {
            ServerFrame::AgentsList { agents } => Ok(agents),
            other => Err(Error::Protocol(format!(
                "expected `agents_list`, got {other:?}"
            ))),
        }
    }

    /// Where message `id` stands for each recipient; with `wait`, once
    /// every recipient reached that state or `timeout` seconds passed.
    pub async fn receipt(
        &mut self,
        id: &str,
        wait: Option<hermod_proto::model::State>,
        timeout: Option<f64>,
    ) -> Result<Vec<wire::ReceiptView>> {
        let frame = ClientFrame::Receipt {
            id: id.to_owned(),
            wait,
            timeout,
        };
        match self.request(&frame).await? {
            ServerFrame::Receipts { receipts } => Ok(receipts),
            other => Err(Error::Protocol(format!(
                "expected `receipts`, got {other:?}"
            ))),
        }
    }

    /// The conversation message `id` belongs to, oldest first.
    pub async fn thread(&mut self, id: &str) -> Result<Vec<MessageFrame>> {
        match self
            .request(&ClientFrame::Thread { id: id.to_owned() })
            .await?
        {
            ServerFrame::Thread { messages } => Ok(messages),
            other => Err(Error::Protocol(format!("expected `thread`, got {other:?}"))),
        }
    }

    /// Says what `agent` (default: the token's) is doing.
    pub async fn set_presence(
        &mut self,
        status: hermod_proto::model::Activity,
        agent: Option<&str>,
        channel: Option<&str>,
    ) -> Result<()> {
        let frame = ClientFrame::Presence {
            status,
            agent: agent.map(str::to_owned),
            channel: channel.map(str::to_owned),
        };
        match self.request(&frame).await? {
            ServerFrame::Presence { .. } => Ok(()),
            other => Err(Error::Protocol(format!(
                "expected `presence`, got {other:?}"
            ))),
        }
    }

    /// Lets a pair the loop guard holds talk again; how many messages went on.
    pub async fn release(
        &mut self,
        agent: &str,
        peer: &str,
        channel: Option<&str>,
    ) -> Result<usize> {
        let frame = ClientFrame::Release {
            agent: agent.to_owned(),
            peer: peer.to_owned(),
            channel: channel.map(str::to_owned),
        };
        match self.request(&frame).await? {
            ServerFrame::Released { released } => Ok(released),
            other => Err(Error::Protocol(format!(
                "expected `released`, got {other:?}"
            ))),
        }
    }

    /// A one-time web console login link (`logout_all`: ends every console
    /// session instead, answering how many).
    pub async fn console(&mut self, logout_all: bool) -> Result<(Option<String>, Option<usize>)> {
        match self.request(&ClientFrame::Console { logout_all }).await? {
            ServerFrame::Console { link, ended } => Ok((link, ended)),
            other => Err(Error::Protocol(format!(
                "expected `console`, got {other:?}"
            ))),
        }
    }

    pub fn split(self) -> (FrameReader, FrameWriter) {
        (self.reader, self.writer)
    }
}

/// Connects, sends one message, waits until it is durable, disconnects.
pub async fn send(socket: &Path, draft: Draft) -> Result<Sent> {
    Connection::connect(socket).await?.send(draft).await
}
