//! One hermes-bus connection: a reader and a writer running side by side.
//!
//! The **reader** parses frames and calls the broker; it never writes to the
//! socket. It hands the writer what to send through a bounded queue, so a
//! client that stops reading only ever stalls its own connection.
//!
//! The **writer** owns the write half. It sends replies in request order
//! (`sent` replies wait for durability without blocking anything else),
//! and, once the connection registered, delivers the endpoint's inbox: first
//! everything after its cursor, then each new commit as the broker's watch
//! fires. In the default `auto` ack mode the cursor only advances once the
//! kernel shows the client consumed the bytes (see [`super::peer`]), so a
//! frame written to a client that was already closing is delivered again on
//! its next registration instead of being lost.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use hermod_core::auth::{Caller, Origin};
use hermod_core::broker::{Claim, Session};
use hermod_core::engine::Durable;
use hermod_core::model::{Channel, InboxKey, Seq};
use hermod_core::wire::{self, AckMode, Request, ServerFrame};
use hermod_core::{Broker, Error};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec, LengthDelimitedCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::UnixConfig;
use crate::frames::{self, reply_when_durable, Outcome, Reply};
use crate::peer;

/// Frames queued from the reader to the writer.
const OUT_QUEUE: usize = 256;
/// Replies waiting for durability at once; beyond it the reader waits.
const MAX_PENDING: usize = 8192;
/// Messages read from the inbox per delivery batch.
const DELIVERY_BATCH: usize = 512;
/// How often an auto-ack connection checks whether the client consumed what
/// was written (only while something is unconfirmed).
const CONFIRM_EVERY: Duration = Duration::from_millis(5);

/// How often an idle auto-mode delivery looks for a hole below it (see
/// [`Broker::hole_below`]): a claim another reader released.
const HOLES_EVERY: Duration = Duration::from_millis(500);

enum Out {
    Frame(Bytes),
    /// A submitted message: what to answer once it is durable (an error
    /// is always answered).
    Pending {
        durable: Durable,
        id: String,
        reply: Reply,
    },
    /// The connection registered: start delivering this inbox.
    Deliver {
        key: InboxKey,
        cursor: Seq,
        mode: AckMode,
        gaps: bool,
    },
    /// Send what is queued, then close.
    Close,
}

/// Tells a client over the connection limit why it is refused.
pub(super) async fn refuse(stream: UnixStream) {
    let frame = ServerFrame::Error {
        code: "too_many_connections".into(),
        detail: "the bus is at its connection limit; retry shortly".into(),
        id: None,
    };
    let mut sink = FramedWrite::new(stream, wire::codec());
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame.to_bytes())).await;
}

/// Serves one connection until either side ends it.
pub(super) async fn handle(
    stream: UnixStream,
    broker: Broker,
    config: &UnixConfig,
    shutdown: CancellationToken,
) {
    let fd = stream.as_raw_fd();
    // Who is calling, by the kernel's word (SO_PEERCRED), not the client's.
    let uid = match stream.peer_cred() {
        Ok(cred) => Some(cred.uid()),
        Err(e) => {
            tracing::debug!(error = %e, "no peer credentials; treating the peer as a stranger");
            None
        }
    };
    let owner = uid.is_some_and(|uid| config.owner_uids.contains(&uid));
    let origin = uid.map(Origin::Uid);
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let writer_done = CancellationToken::new();
    let shutdown_r = shutdown.clone();
    let reader = Reader {
        caller: authenticate(&broker, owner, origin, None).ok(),
        owner,
        origin,
        broker: broker.clone(),
        tx,
        session: None,
        gaps: false,
        idle_timeout: config.idle_timeout,
        live: Vec::new(),
    };
    let writer = Writer {
        sink: FramedWrite::new(wr, wire::codec()),
        fd,
        broker,
        write_timeout: config.write_timeout,
        sent: 0,
    };
    let done = writer_done.clone();
    let write_side = async move {
        writer.run(rx, shutdown.clone()).await;
        done.cancel();
    };
    // Joined, not spawned: both halves live and die with this task.
    tokio::join!(
        reader.run(FramedRead::new(rd, wire::codec()), shutdown_r, writer_done),
        write_side
    );
}

struct Reader {
    /// The peer runs as the daemon's user (or an allowed uid).
    owner: bool,
    /// The peer's uid, which its unverified sends are charged to.
    origin: Option<Origin>,
    /// Who this connection speaks for without a per-frame token: from the
    /// peer credentials, or the identity whose token registered it.
    caller: Option<Caller>,
    broker: Broker,
    tx: mpsc::Sender<Out>,
    session: Option<Session>,
    /// The client asked for `gap` frames at `register`.
    gaps: bool,
    idle_timeout: Duration,
    /// Live topic subscriptions; each forwards matching events to the writer
    /// and stops when the connection ends.
    live: Vec<AbortOnDropHandle<()>>,
}

impl Reader {
    async fn run(
        mut self,
        mut frames: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
        shutdown: CancellationToken,
        writer_done: CancellationToken,
    ) {
        loop {
            // An unregistered connection cannot be kicked: a token nobody cancels.
            let kicked = self
                .session
                .as_ref()
                .map(|s| s.kicked.clone())
                .unwrap_or_default();
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = writer_done.cancelled() => break,
                _ = kicked.cancelled() => {
                    tracing::debug!("endpoint re-registered elsewhere or its identity changed; closing the connection");
                    break;
                }
                _ = tokio::time::sleep(self.idle_timeout), if self.session.is_some() => {
                    tracing::info!("registered endpoint silent for {:?}; dropping it", self.idle_timeout);
                    break;
                }
                next = frames.next() => next,
            };
            match next {
                None => break,
                Some(Ok(bytes)) => {
                    if !self.handle(&bytes).await {
                        break;
                    }
                }
                Some(Err(e)) => {
                    if is_too_large(&e) {
                        // The body is never read: answer from the prefix and close.
                        let err = Error::TooLarge {
                            size: frames.read_buffer().len().max(wire::MAX_FRAME + 1),
                            limit: wire::MAX_FRAME,
                        };
                        self.send(ServerFrame::error(&err, None)).await;
                        let _ = self.tx.send(Out::Close).await;
                    }
                    // Otherwise a truncated frame or a reset: nothing to answer.
                    break;
                }
            }
        }
    }

    /// Handles one frame; false when the connection should end.
    async fn handle(&mut self, bytes: &[u8]) -> bool {
        if let Some(s) = &self.session {
            self.broker.touch(&s.key);
        }
        // A registered connection's messages default to its channel.
        let channel = self
            .session
            .as_ref()
            .map_or(Channel::default_ref(), |s| &s.key.channel);
        let (request, token) = match wire::parse_client_frame_with_token(bytes, channel) {
            Ok(r) => r,
            Err(e) => return self.send(ServerFrame::error(&e, None)).await,
        };
        let trust = self.broker.trust();
        let caller = match (token.as_deref(), &self.caller) {
            (None, Some(c)) => Ok(c.clone()),
            (token, _) => authenticate(&self.broker, self.owner, self.origin, token),
        };
        let caller = match request.manages_identities() {
            true => trust.manager(self.owner, caller),
            false => caller,
        };
        let caller = match caller {
            Ok(c) => c,
            Err(e) => {
                return self
                    .send(ServerFrame::error(&e, frames::request_id(&request)))
                    .await
            }
        };
        match self.dispatch(request, caller).await {
            Ok(more) => more,
            Err(e) => self.send(ServerFrame::error(&e, None)).await,
        }
    }

    /// Applies one authenticated request through the shared dispatcher;
    /// an `Err` is answered as an error frame.
    async fn dispatch(&mut self, request: Request, caller: Caller) -> hermod_core::Result<bool> {
        let id = frames::request_id(&request);
        // Subscriptions whose stream ended (a failed read, a revoked
        // token) no longer count.
        self.live.retain(|task| !task.is_finished());
        let conn = frames::Conn {
            broker: &self.broker,
            caller: &caller,
            agent: self.session.as_ref().map(|s| &s.key),
            gaps: self.gaps,
            door: "unix",
            live: self.live.len(),
        };
        let outcome = match frames::dispatch(conn, request).await {
            Ok(o) => o,
            Err(e) => return Ok(self.send(ServerFrame::error(&e, id)).await),
        };
        Ok(match outcome {
            Outcome::Reply(None) => true,
            Outcome::Reply(Some(frame)) => self.send(frame).await,
            Outcome::Pending {
                first,
                durable,
                id,
                reply,
            } => {
                if let Some(frame) = first {
                    if !self.send(frame).await {
                        return Ok(false);
                    }
                }
                self.out(Out::Pending { durable, id, reply }).await
            }
            Outcome::Stream { reply, frames } => {
                if let Some(frame) = reply {
                    if !self.send(frame).await {
                        return Ok(false);
                    }
                }
                let tx = self.tx.clone();
                self.live
                    .push(AbortOnDropHandle::new(tokio::spawn(async move {
                        let mut frames = frames;
                        while let Some(batch) = frames.next().await {
                            for f in batch {
                                if tx.send(Out::Frame(f)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    })));
                true
            }
            Outcome::Register { key, ack, gaps } => {
                if self.session.is_some() {
                    return Err(Error::InvalidRequest(
                        "this connection is already registered".into(),
                    ));
                }
                self.gaps = gaps;
                self.register(key, ack, caller).await
            }
        })
    }

    async fn register(&mut self, key: InboxKey, mode: AckMode, caller: Caller) -> bool {
        let session = match self
            .broker
            .connect(&caller, key.clone(), "unix", true)
            .await
        {
            Ok(s) => s,
            Err(e) => return self.send(ServerFrame::error(&e, None)).await,
        };
        // A token that registered the connection speaks for all its frames.
        self.caller = Some(caller);
        let cursor = match self.broker.cursor(&key).await {
            Ok(c) => c,
            Err(e) => return self.send(ServerFrame::error(&e, None)).await,
        };
        tracing::debug!(endpoint = %key.agent, channel = %key.channel, cursor, "registered");
        let registered = ServerFrame::Registered {
            endpoint: key.agent.to_string(),
            session_id: session.id.clone(),
        };
        self.session = Some(session);
        let gaps = self.gaps;
        self.send(registered).await
            && self
                .out(Out::Deliver {
                    key,
                    cursor,
                    mode,
                    gaps,
                })
                .await
    }

    async fn send(&self, frame: ServerFrame) -> bool {
        self.out(Out::Frame(frame.to_bytes())).await
    }

    async fn out(&self, out: Out) -> bool {
        self.tx.send(out).await.is_ok()
    }
}

/// The caller of a frame, from where it came (the kernel's word) and the
/// token it showed, if any.
fn authenticate(
    broker: &Broker,
    owner: bool,
    origin: Option<Origin>,
    token: Option<&str>,
) -> hermod_core::Result<Caller> {
    Ok(broker
        .trust()
        .authenticate(owner, token)?
        .from_origin(origin))
}

fn is_too_large(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

/// The inbox being delivered on a registered connection.
struct Delivery {
    key: InboxKey,
    /// Last seq written to the socket.
    position: Seq,
    mode: AckMode,
    newest: hermod_core::broker::Watch,
    /// Auto mode: the claims of what was written, not yet known to be
    /// consumed, each with the byte offset its batch ends before (dropped
    /// with the connection, they are released).
    written: VecDeque<(Claim, u64)>,
    /// The client asked for `gap` frames at `register`.
    gaps: bool,
    /// Claims of what the client consumed, not stored yet.
    unstored: Vec<Claim>,
    /// The one store of a claim in flight: stores run beside delivery, so
    /// an fsync never holds up the next batch.
    storing: Option<tokio::task::JoinHandle<()>>,
}

/// Moves the written claims whose batches the client has read to
/// `unstored` (final): `sent` is the bytes written to `fd` so far.
fn take_consumed(fd: std::os::fd::RawFd, sent: u64, d: &mut Delivery) {
    if d.written.is_empty() {
        return;
    }
    let consumed = peer::consumed(fd, sent).unwrap_or(0);
    let n = d
        .written
        .iter()
        .take_while(|(_, end)| *end <= consumed)
        .count();
    d.unstored
        .extend(d.written.drain(..n).map(|(claim, _)| claim));
}

impl Drop for Delivery {
    /// However the connection ends (the client hung up mid-write, say),
    /// what it consumed stays consumed: stored after the store in flight.
    /// (Dropped with a failed write, such claims were released, and a
    /// client that had read them got them again.)
    fn drop(&mut self) {
        if !self.unstored.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            store_claims(std::mem::take(&mut self.unstored), self.storing.take());
        }
    }
}

struct Writer {
    sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    fd: std::os::fd::RawFd,
    broker: Broker,
    write_timeout: Duration,
    /// Bytes handed to the kernel so far, every frame counted.
    sent: u64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Out>, shutdown: CancellationToken) {
        if let Err(e) = self.serve(&mut rx, shutdown).await {
            tracing::debug!(error = %e, "unix connection write side ended");
        }
    }

    async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Out>,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let mut pending = FuturesOrdered::new();
        let mut delivery: Option<Delivery> = None;
        let mut need_read = false;
        let mut reader_open = true;
        let mut closing = false;
        let mut confirm = tokio::time::interval(CONFIRM_EVERY);
        confirm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut holes = tokio::time::interval(HOLES_EVERY);
        holes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let unconfirmed = delivery
                .as_ref()
                .is_some_and(|d| !d.written.is_empty() || !d.unstored.is_empty());
            let watching = delivery.is_some() && !need_read;
            let auto = delivery.as_ref().is_some_and(|d| d.mode == AckMode::Auto);
            tokio::select! {
                _ = shutdown.cancelled(), if reader_open && !closing => {
                    // Stop taking requests; finish the replies already owed.
                    closing = true;
                    rx.close();
                }
                Some(reply) = pending.next(), if !pending.is_empty() => {
                    // Every other receipt that is ready too (a group commit
                    // resolves many at once) goes out in the same write.
                    let mut frames: Vec<Bytes> = Option::<Bytes>::into_iter(reply).collect();
                    while let Some(Some(more)) = pending.next().now_or_never() {
                        frames.extend(more);
                    }
                    if !frames.is_empty() {
                        self.write(frames).await?;
                    }
                }
                out = rx.recv(), if reader_open && pending.len() < MAX_PENDING => match out {
                    None => reader_open = false,
                    Some(Out::Frame(f)) => self.write(vec![f]).await?,
                    Some(Out::Pending { durable, id, reply }) => {
                        pending.push_back(reply_when_durable(durable, id, reply));
                    }
                    Some(Out::Deliver { key, cursor, mode, gaps }) => {
                        let newest = self.broker.watch(&key);
                        delivery = Some(Delivery { key, position: cursor, mode, newest, written: VecDeque::new(), gaps, unstored: Vec::new(), storing: None });
                        need_read = true;
                    }
                    Some(Out::Close) => return Ok(()),
                },
                changed = async { delivery.as_mut().unwrap().newest.changed().await }, if watching => {
                    need_read = changed.is_ok();
                }
                _ = confirm.tick(), if unconfirmed => {
                    self.confirm(delivery.as_mut().unwrap()).await;
                }
                _ = holes.tick(), if auto && !need_read => {
                    let d = delivery.as_ref().unwrap();
                    need_read = self.broker.hole_below(&d.key, d.position).is_some();
                }
                // More of the inbox is waiting: do not block, deliver below.
                _ = std::future::ready(()), if need_read => {}
            }
            if !reader_open {
                // The connection is over: no more deliveries, only owed replies.
                if let Some(mut d) = delivery.take() {
                    take_consumed(self.fd, self.sent, &mut d);
                    // Dropped: what is unstored follows the store in flight.
                }
                if pending.is_empty() {
                    return Ok(());
                }
            }
            if need_read {
                if let Some(d) = delivery.as_mut() {
                    need_read = self.deliver(d).await?;
                }
            }
        }
    }

    /// Writes the next batch of the inbox; true if more is waiting.
    ///
    /// In auto mode a batch is claimed (and, across nodes, leased) before
    /// it is written, as `/subscribe` does: no other destructive reader
    /// hands it out while this client reads it, and it is confirmed once
    /// the client consumed it ([`Writer::confirm`]).
    async fn deliver(&mut self, d: &mut Delivery) -> io::Result<bool> {
        if d.mode == AckMode::Auto {
            if let Some(hole) = self.broker.hole_below(&d.key, d.position) {
                // Another reader released a claim below (its store failed,
                // its client left): read from there again; what this
                // connection holds already is not claimed twice.
                d.position = hole;
            }
        }
        let batch = match self.broker.read(&d.key, d.position, DELIVERY_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, inbox = %d.key.agent, "inbox read failed");
                return Ok(false);
            }
        };
        let mut frames = Vec::with_capacity(batch.messages.len() + 1);
        // The claim starts where this read did: over a pruned part too, so
        // that the cursor moves over it once the batch is consumed.
        let from = d.position;
        if let Some(gap) = batch.gap {
            d.position = d.position.max(gap.pruned_through);
            if d.gaps {
                frames.push(ServerFrame::Gap(gap).to_bytes());
            } else {
                // Legacy clients cannot be told; the log and the counter can.
                tracing::warn!(inbox = %d.key.agent, after = gap.after, pruned_through = gap.pruned_through,
                    "retention removed messages this client had not received");
            }
        }
        let more = batch.messages.len() == DELIVERY_BATCH;
        let claim = match batch.messages.last() {
            Some(last) if d.mode == AckMode::Auto => {
                let claimed = self.broker.claim_streamed(&d.key, from, last.seq, "unix");
                match claimed.await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::error!(error = %e, inbox = %d.key.agent, "cursor read failed");
                        return Ok(false);
                    }
                }
            }
            _ => None,
        };
        if let Some(last) = batch.messages.last() {
            d.position = last.seq;
        }
        frames.extend(
            batch
                .messages
                .iter()
                .filter(|m| claim.as_ref().is_none_or(|c| c.owns(m.seq)))
                .map(|m| wire::message_bytes(m)),
        );
        if !frames.is_empty() {
            // A write into a full socket waits for the client; meanwhile
            // what it read of earlier batches is confirmed (counted up to
            // the bytes in the kernel before this write: never more than
            // it read), so a client that hangs up mid-write keeps it.
            let (fd, before) = (self.fd, self.sent);
            {
                let write = self.write(frames);
                tokio::pin!(write);
                let mut tick = tokio::time::interval(CONFIRM_EVERY);
                loop {
                    tokio::select! {
                        written = &mut write => break written?,
                        _ = tick.tick() => take_consumed(fd, before, d),
                    }
                }
            }
            take_consumed(self.fd, self.sent, d);
        }
        if let Some(claim) = claim {
            // Consumed once the client has read up to here.
            d.written.push_back((claim, self.sent));
        }
        if d.mode != AckMode::Auto {
            // Consumed once acknowledged (`read`); handed over now.
            self.broker.delivered(&d.key, "unix", &batch.messages).await;
        }
        Ok(more)
    }

    /// Advances the cursor over the batches the client has read: their
    /// claims are final at once, their store runs in the background, one
    /// at a time (retried until it lands). Batch by batch, by byte offset:
    /// a client reading a long backlog never has everything read at once,
    /// and one that hung up after reading thousands of messages, none of
    /// them confirmed, got them all again (the history checker's NATS run).
    async fn confirm(&mut self, d: &mut Delivery) {
        take_consumed(self.fd, self.sent, d);
        if !d.written.is_empty() {
            if let Err(e) = self.broker.keep_lease(&d.key).await {
                tracing::debug!(error = %e, "renewing the inbox lease failed");
            }
        }
        if d.storing.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if !d.unstored.is_empty() {
            let claims = std::mem::take(&mut d.unstored);
            d.storing = Some(store_claims(claims, None));
        }
    }

    async fn write(&mut self, frames: Vec<Bytes>) -> io::Result<()> {
        let sink = &mut self.sink;
        // Each frame goes out behind its 4-byte length.
        let bytes: u64 = frames.iter().map(|f| f.len() as u64 + 4).sum();
        let write = async move {
            for f in frames {
                sink.feed(f).await?;
            }
            SinkExt::<Bytes>::flush(sink).await
        };
        tokio::time::timeout(self.write_timeout, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))??;
        self.sent += bytes;
        Ok(())
    }
}

/// Confirms claims of what the client consumed, in order, in the
/// background, after the store `before` (if any) is done; a store that
/// fails is tried again until it lands (see [`Claim::confirm_all_handed_out`]).
/// Not aborted with the connection: what the client consumed stays consumed.
fn store_claims(
    claims: Vec<Claim>,
    before: Option<tokio::task::JoinHandle<()>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Some(h) = before {
            let _ = h.await;
        }
        if let Err(e) = Claim::confirm_all_handed_out(claims).await {
            tracing::warn!(error = %e, "cursor update failed");
        }
    })
}
