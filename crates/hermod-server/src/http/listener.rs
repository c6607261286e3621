//! The HTTP accept loop: owns every TCP connection of the HTTP front, from
//! `accept` to close — the connection cap, the header and idle timeouts,
//! graceful shutdown, and who the peer of each connection is ([`Peer`]).
//!
//! It replaces `axum::serve`, which has no connection cap and no timeouts:
//! half-sent requests and idle sockets stayed open for ever, and enough of
//! them exhausted the daemon's file descriptors, starving the Unix socket
//! and `/healthz` too.
//!
//! # Limits (see [`HttpConfig`](super::HttpConfig))
//!
//! - **Connection cap** (`max_connections`): at the cap a new connection is
//!   still accepted, answered at once with `503` +
//!   `{"code":"too_many_connections"}` and closed. Leaving it in the kernel
//!   backlog instead would make every legitimate client wait behind the
//!   flood. A permit is held by the socket itself, so an upgraded WebSocket
//!   keeps counting until it closes.
//! - **Header timeout**: from the first byte of a request head to its end.
//! - **Idle timeout**: a connection with no request in flight and no byte
//!   received for this long (before its first request or between two
//!   keep-alive requests) is closed. A long-poll or an SSE stream has a
//!   request in flight (its response body has not ended) and an upgraded
//!   WebSocket has left hyper altogether, so neither is ever cut.
//! - The **body timeout** (a trickling request body) is a tower layer in
//!   [`app`](super::app), so the router answers it with a 408 JSON body.
//!
//! Both the header and idle timeouts are enforced here by a per-connection
//! watchdog, not by hyper's `header_read_timeout`: in hyper 1.12 that timer
//! also starts as soon as a keep-alive connection goes idle after a
//! response (`Conn::idle` sets `notify_read` so `poll_read_head` arms it
//! before any byte arrives; hyperium/hyper#3828 "Universal h1 header read
//! timeout", and #3185 for the first request), so it cannot tell an idle
//! client (allowed `idle_timeout`) from a slow one (allowed
//! `header_timeout`). The test `hyper_header_timeout_runs_while_idle`
//! pins that behaviour down.
//!
//! # Peer uid of loopback connections
//!
//! TCP has no `SO_PEERCRED`: the kernel only tells us the peer's address.
//! For a loopback peer the other end is a socket on this machine, and the
//! kernel's socket-diagnostics netlink interface (`NETLINK_SOCK_DIAG`,
//! `inet_diag_req_v2`, what `ss -e` uses) answers an exact lookup by
//! 4-tuple — source = the peer's address, destination = ours — with that
//! socket's owner uid (`idiag_uid`). It is one request and one reply,
//! computed by the kernel inside our `sendmsg`, so the reply is already
//! queued when `send` returns: the socket is non-blocking and a missing
//! reply is a failure, never a wait. Scanning `/proc/net/tcp{,6}` would
//! give the same uid, but by formatting and parsing the whole table (every
//! socket on the machine, O(n) per connection, slowest exactly under a
//! connection flood) with no exact-match lookup. Any failure records
//! `uid: None`, which callers treat as a stranger (fail closed). The lookup
//! runs in the connection's own task, so it never holds up `accept`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::HttpConfig;

/// Who is on the other end of an HTTP connection, found once per connection.
///
/// Inserted into the extensions of every request served on a TCP
/// connection; absent from requests that did not come through
/// [`serve`] (e.g. a router driven with `oneshot` in a test).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    /// The uid owning the peer's socket, for loopback peers whose lookup
    /// succeeded; `None` for remote peers and on any failure.
    pub uid: Option<u32>,
}

/// Connections being answered `503` at once. Past this (a flood well over
/// the cap) a connection is closed without a response, so rejecting costs
/// a bounded number of file descriptors and tasks.
const REJECTING_AT_ONCE: usize = 128;

/// Longest a rejected connection is kept to deliver its `503`: writing it,
/// then reading what the client sent until it closes — closing a socket
/// with unread bytes sends a RST, which can destroy the `503` before the
/// client reads it.
const REJECT_LINGER: Duration = Duration::from_secs(1);

/// The body of the `503` at the connection cap.
const TOO_MANY: &str =
    r#"{"error":"too many HTTP connections; try again later","code":"too_many_connections"}"#;

/// Serves `app` on `listener` until `shutdown`, then stops accepting, lets
/// in-flight requests finish (long-polls and SSE streams end on the same
/// token through `AppState`) and closes idle connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &HttpConfig,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let rejecting = Arc::new(Semaphore::new(REJECTING_AT_ONCE));
    let timeouts = Timeouts {
        header: config.header_timeout,
        idle: config.idle_timeout,
        write: config.write_timeout,
    };
    let connections = TaskTracker::new();
    let mut at_cap = false;
    loop {
        let (tcp, addr) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the connection stays in the
                    // backlog; retrying at once would spin.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
        };
        // Small request/response pairs: no Nagle delay.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                at_cap = false;
                connections.spawn(connection(
                    tcp,
                    addr,
                    app.clone(),
                    timeouts,
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(_) => {
                if !at_cap {
                    tracing::warn!(
                        max = config.max_connections,
                        "HTTP connection cap reached: answering 503"
                    );
                    at_cap = true;
                }
                if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                    tokio::spawn(reject(tcp, permit));
                }
            }
        }
    }
    // Closing the listener refuses new connections at once instead of
    // leaving them in a backlog nobody will accept from.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Errors of one connection that `accept` reports; the listener is fine.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers `503 too_many_connections` and closes, within [`REJECT_LINGER`].
async fn reject(mut tcp: TcpStream, _permit: OwnedSemaphorePermit) {
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{TOO_MANY}",
        TOO_MANY.len()
    );
    let _ = tokio::time::timeout(REJECT_LINGER, async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
    write: Duration,
}

/// One connection, from its peer lookup to its close.
async fn connection(
    tcp: TcpStream,
    addr: SocketAddr,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let uid = match tcp.local_addr() {
        Ok(local) if addr.ip().to_canonical().is_loopback() => peer_uid(addr, local),
        _ => None,
    };
    let peer = Peer { addr, uid };
    let state = Arc::new(ConnState::new(tcp.as_raw_fd()));
    let io = TokioIo::new(Watched {
        tcp,
        state: state.clone(),
        _permit: permit,
    });
    let service = ConnService {
        app,
        peer,
        state: state.clone(),
        flushes: Flushes(state.clone()),
    };
    // hyper's own header timer stays off (it would also cut idle
    // keep-alive connections at the header timeout: see the module doc);
    // the watchdog below does both timeouts.
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            // Done: closed by either side, or upgraded (the WebSocket task
            // owns the socket now and is no longer ours to time out).
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(peer = %addr, error = %e, "HTTP connection ended");
                }
                return;
            }
            why = state.expired(timeouts) => {
                // No request is in flight (or the watchdog would not fire):
                // dropping the connection cuts nothing but a wait.
                tracing::debug!(peer = %addr, timeout = why, "closing HTTP connection");
                if why == "write" {
                    // The peer stopped reading: drop what the kernel still
                    // buffers for it instead of delivering it later, when
                    // a stream has released (and will hand out again) what
                    // it had not confirmed.
                    let fd = state.fd.load(Ordering::Acquire);
                    if fd >= 0 {
                        crate::peer::reset_on_close(fd);
                    }
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                // Finish the request in flight, then close; an idle
                // connection closes now, a half-sent head within the
                // header timeout.
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What the watchdog of one connection reads; written by its reads and by
/// its requests. All in the connection's one task, so plain atomics do.
struct ConnState {
    born: Instant,
    /// Requests whose response body has not ended (an SSE stream's never
    /// does until shutdown).
    in_flight: AtomicUsize,
    /// Milliseconds after `born` of the first byte of a request head not
    /// yet complete, else [`NONE`].
    head_started: AtomicU64,
    /// Milliseconds after `born` the last request ended (0: none yet).
    last_done: AtomicU64,
    /// Milliseconds after `born` a write started waiting on a full
    /// socket, else [`NONE`].
    write_blocked: AtomicU64,
    changed: Notify,
    /// Flushes that completed: each means everything hyper had buffered
    /// when it started is in the kernel ([`Flushes`]).
    flushed: AtomicU64,
    flush_done: Notify,
    /// Bytes the kernel took from writes so far.
    written: AtomicU64,
    /// The socket's fd while [`Watched`] owns it, else -1.
    fd: AtomicI32,
}

const NONE: u64 = u64::MAX;

impl ConnState {
    fn new(fd: RawFd) -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            head_started: AtomicU64::new(NONE),
            last_done: AtomicU64::new(0),
            write_blocked: AtomicU64::new(NONE),
            changed: Notify::new(),
            flushed: AtomicU64::new(0),
            flush_done: Notify::new(),
            written: AtomicU64::new(0),
            fd: AtomicI32::new(fd),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Bytes arrived: with no request in flight they start a request head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == NONE
        {
            self.head_started.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(*n as u64, Ordering::AcqRel);
        }
    }

    /// A write returned `Pending` (`true`) or made progress (`false`).
    fn write_waits(&self, blocked: bool) {
        let was = self.write_blocked.load(Ordering::Acquire);
        if blocked && was == NONE {
            self.write_blocked.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        } else if !blocked && was != NONE {
            self.write_blocked.store(NONE, Ordering::Release);
        }
    }

    /// Resolves with the name of the timeout that expired: header and idle
    /// never while a request is in flight; a write blocked for longer than
    /// the write timeout always (the client stopped reading).
    async fn expired(&self, t: Timeouts) -> &'static str {
        loop {
            // `notify_one` stores a permit, so a change between reading the
            // state and awaiting is not lost.
            let changed = self.changed.notified();
            let blocked = self.write_blocked.load(Ordering::Acquire);
            let deadline = if blocked != NONE {
                Some((blocked, t.write, "write"))
            } else if self.in_flight.load(Ordering::Acquire) > 0 {
                None
            } else {
                match self.head_started.load(Ordering::Acquire) {
                    NONE => Some((self.last_done.load(Ordering::Acquire), t.idle, "idle")),
                    head => Some((head, t.header, "header")),
                }
            };
            match deadline {
                None => changed.await,
                Some((since, allowed, why)) => {
                    let at = self.born + Duration::from_millis(since) + allowed;
                    if Instant::now() >= at {
                        return why;
                    }
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }
}

/// A request in flight: from the end of its head to the end (or drop) of
/// its response body.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.head_started.store(NONE, Ordering::Release);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        s.last_done.store(s.now_ms(), Ordering::Release);
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
        s.changed.notify_one();
    }
}

/// The TCP stream, telling the watchdog when bytes arrive; holds the
/// connection's permit, so it counts until the socket closes (even after a
/// WebSocket upgrade took it over).
struct Watched {
    tcp: TcpStream,
    state: Arc<ConnState>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.state.write_waits(polled.is_pending());
        self.state.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.state.write_waits(polled.is_pending());
        self.state.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes the socket only after writing out all it buffered
        // (`Buffered::poll_flush`), so a completed flush means every byte
        // handed to hyper before it began is in the kernel.
        let polled = Pin::new(&mut self.tcp).poll_flush(cx);
        if polled.is_ready() {
            self.state.flushed.fetch_add(1, Ordering::AcqRel);
            self.state.flush_done.notify_waiters();
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // The fd closes with the stream and may be reused at once.
        self.state.fd.store(-1, Ordering::Release);
    }
}

/// The router as one connection's hyper service: every request gets the
/// connection's [`Peer`] and counts as in flight until its response ends.
#[derive(Clone)]
struct ConnService {
    app: Router,
    peer: Peer,
    state: Arc<ConnState>,
    flushes: Flushes,
}

/// A request extension: tells a streaming response when what it yielded
/// has reached the peer. A destructive stream (`/subscribe`) confirms a
/// claim only once the peer's TCP stack acknowledged it, and releases what
/// it has not confirmed when it ends, so a client that stalls loses
/// nothing to buffers in this process *or in the kernel*: data in the
/// socket's send buffer (megabytes on loopback) dies with the connection.
#[derive(Clone)]
pub struct Flushes(Arc<ConnState>);

impl Flushes {
    /// Waits until everything the response yielded so far is in the
    /// kernel, and returns the connection's byte offset it ends before.
    /// Call it while being polled by hyper (so everything yielded before
    /// is in hyper's buffer or beyond).
    pub async fn in_kernel(&self) -> u64 {
        let seen = self.0.flushed.load(Ordering::Acquire);
        loop {
            let done = self.0.flush_done.notified();
            if self.0.flushed.load(Ordering::Acquire) > seen {
                // hyper's buffer is written out: all of it is counted.
                return self.0.written.load(Ordering::Acquire);
            }
            done.await;
        }
    }

    /// True when the peer's TCP stack has acknowledged every byte before
    /// `end` (an offset from [`Flushes::in_kernel`]) and has not closed:
    /// what a closing peer had not read yet is gone with it.
    pub fn acked(&self, end: u64) -> bool {
        let fd = self.0.fd.load(Ordering::Acquire);
        if fd < 0 {
            return false;
        }
        let written = self.0.written.load(Ordering::Acquire);
        crate::peer::consumed(fd, written).is_some_and(|c| c >= end)
    }
}

impl Flushes {
    /// The peer closed (or the connection is over): a stream waiting for
    /// acknowledgements ends now rather than at its next write, so what it
    /// holds goes back to other readers at once.
    pub fn gone(&self) -> bool {
        let fd = self.0.fd.load(Ordering::Acquire);
        fd < 0 || crate::peer::hung_up(fd)
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = hyper::Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        let guard = InFlight::start(self.state.clone());
        req.extensions_mut().insert(self.peer);
        req.extensions_mut().insert(self.flushes.clone());
        // `Router` is always ready, so `oneshot` never waits.
        let response = tower::ServiceExt::oneshot(self.app.clone(), req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that ends its request's [`InFlight`] when it is done.
struct Tracked {
    body: axum::body::Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The uid owning the socket at `peer` connected to our `local`, or `None`
/// (logged at debug) when the kernel cannot tell.
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    match sock_diag_uid(peer, local) {
        Ok(uid) => Some(uid),
        Err(e) => {
            tracing::debug!(peer = %peer, error = %e, "peer uid unknown");
            None
        }
    }
}

/// One exact `inet_diag_req_v2` lookup of the TCP socket `peer` → `local`.
fn sock_diag_uid(peer: SocketAddr, local: SocketAddr) -> io::Result<u32> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

    // The family of the socket as the kernel has it: an IPv4 peer of a
    // dual-stack listener is an AF_INET6 socket with mapped addresses.
    let family = match peer {
        SocketAddr::V4(_) => AF_INET,
        SocketAddr::V6(_) => AF_INET6,
    };
    let mut header = NetlinkHeader::default();
    // No NLM_F_DUMP: an exact lookup of one socket by its 4-tuple.
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: peer.port(),
                destination_port: local.port(),
                source_address: peer.ip(),
                destination_address: local.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match by address, not by cookie.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    // The kernel answers inside `send`; a reply not there yet is a
    // failure, never a wait.
    socket.set_non_blocking(true)?;
    socket.send(&buf, 0)?;
    let mut reply = vec![0u8; 4096];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            let id = &response.header.socket_id;
            if id.source_port != peer.port() || id.destination_port != local.port() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "sock_diag answered for another socket",
                ));
            }
            Ok(response.header.uid)
        }
        NetlinkPayload::Error(e) => Err(e
            .code
            .map(|c| io::Error::from_raw_os_error(-c.get()))
            .unwrap_or_else(|| io::Error::other("sock_diag: empty reply"))),
        other => Err(io::Error::other(format!(
            "sock_diag: unexpected reply {other:?}"
        ))),
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, so the
/// HTTP and Unix connection caps, not the fd table, decide who is refused.
/// Returns the soft limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit cannot be the soft one for NOFILE (the
    // kernel caps it at fs.nr_open): keep a finite, generous value.
    let target = limit.maximum.unwrap_or(1 << 20);
    match limit.current {
        Some(current) if current >= target => return Ok(current),
        None => return Ok(u64::MAX),
        _ => {}
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    )?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    fn config(header_ms: u64, idle_ms: u64, max: usize) -> HttpConfig {
        let mut c = HttpConfig::new("127.0.0.1:0".parse().unwrap());
        c.header_timeout = Duration::from_millis(header_ms);
        c.idle_timeout = Duration::from_millis(idle_ms);
        c.max_connections = max;
        c
    }

    /// Serves a small test router; returns its address.
    async fn start(config: HttpConfig, shutdown: CancellationToken) -> SocketAddr {
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    "slow"
                }),
            )
            .route(
                "/peer",
                get(|peer: Option<axum::Extension<Peer>>| async move {
                    match peer {
                        Some(axum::Extension(p)) => format!("{:?}", p.uid),
                        None => "missing".into(),
                    }
                }),
            );
        let listener = TcpListener::bind(config.addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { serve(listener, app, &config, shutdown).await });
        addr
    }

    /// Reads one response (this test router's are small, with a length).
    async fn response(tcp: &mut TcpStream) -> String {
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        loop {
            let n = tcp.read(&mut buf[got..]).await.unwrap();
            assert!(n > 0, "closed before a response");
            got += n;
            let text = String::from_utf8_lossy(&buf[..got]).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if got >= end + 4 + len {
                    return text;
                }
            }
        }
    }

    /// Milliseconds until the server closes `tcp` (EOF or reset).
    async fn closed_after(tcp: &mut TcpStream, start: Instant, limit: Duration) -> u128 {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(start + limit, tcp.read(&mut buf)).await {
                Err(_) => panic!("still open after {limit:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed().as_millis(),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn idle_and_header_timeouts_are_separate() {
        let shutdown = CancellationToken::new();
        let addr = start(config(300, 1000, 100), shutdown.clone()).await;

        // A half-sent head: closed at the header timeout.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let t0 = Instant::now();
        let ms = closed_after(&mut half, t0, Duration::from_secs(3)).await;
        assert!(
            (250..900).contains(&ms),
            "half-sent head closed after {ms} ms"
        );

        // A keep-alive connection idle after a request: open past the
        // header timeout, closed at the idle timeout.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(response(&mut idle).await.starts_with("HTTP/1.1 200"));
        let t0 = Instant::now();
        let ms = closed_after(&mut idle, t0, Duration::from_secs(3)).await;
        assert!(
            (900..1800).contains(&ms),
            "idle connection closed after {ms} ms"
        );

        // No byte at all: the idle timeout too.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        let ms = closed_after(&mut silent, t0, Duration::from_secs(3)).await;
        assert!(
            (900..1800).contains(&ms),
            "silent connection closed after {ms} ms"
        );

        // A request in flight longer than both timeouts is never cut.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let text = response(&mut slow).await;
        assert!(text.ends_with("slow"), "{text}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn every_request_carries_the_peer() {
        let shutdown = CancellationToken::new();
        let addr = start(config(1000, 5000, 100), shutdown.clone()).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let uid = rustix::process::getuid().as_raw();
        for _ in 0..2 {
            tcp.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let text = response(&mut tcp).await;
            assert!(text.ends_with(&format!("Some({uid})")), "{text}");
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn over_the_cap_answers_503() {
        let shutdown = CancellationToken::new();
        let addr = start(config(5000, 5000, 2), shutdown.clone()).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            assert!(response(&mut tcp).await.starts_with("HTTP/1.1 200"));
            held.push(tcp);
        }
        let mut over = TcpStream::connect(addr).await.unwrap();
        over.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let text = response(&mut over).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains(r#""code":"too_many_connections""#), "{text}");
        // A closed connection frees its place.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            if response(&mut tcp).await.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "the place was never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn shutdown_finishes_requests_in_flight() {
        let shutdown = CancellationToken::new();
        let addr = start(config(5000, 5000, 100), shutdown.clone()).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        let t0 = Instant::now();
        // The idle one closes at once, the slow one gets its answer.
        let ms = closed_after(&mut idle, t0, Duration::from_secs(1)).await;
        assert!(ms < 500, "idle connection closed {ms} ms after shutdown");
        assert!(response(&mut slow).await.ends_with("slow"));
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    /// hyper 1.x's `header_read_timeout` also runs while a keep-alive
    /// connection is idle between requests (and before the first byte):
    /// why the watchdog does both timeouts instead.
    #[tokio::test]
    async fn hyper_header_timeout_runs_while_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_millis(300))
                        .serve_connection(
                            TokioIo::new(tcp),
                            hyper::service::service_fn(|_req| async {
                                Ok::<_, Infallible>(hyper::Response::new(axum::body::Body::from(
                                    "ok",
                                )))
                            }),
                        ),
                );
            }
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(response(&mut tcp).await.starts_with("HTTP/1.1 200"));
        // Idle, not a single byte of a next request: closed all the same.
        let ms = closed_after(&mut tcp, Instant::now(), Duration::from_secs(3)).await;
        assert!(ms < 1000, "closed after {ms} ms");
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let ms = closed_after(&mut silent, Instant::now(), Duration::from_secs(3)).await;
        assert!(ms < 1000, "closed after {ms} ms");
    }

    #[test]
    fn loopback_peer_uid_is_ours() {
        let uid = rustix::process::getuid().as_raw();
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(bind) else {
                continue; // no IPv6 loopback here
            };
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, peer) = listener.accept().unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            assert_eq!(
                peer_uid(peer, server.local_addr().unwrap()),
                Some(uid),
                "{bind}"
            );
        }
        // A 4-tuple with no socket: none, never a guess.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bogus: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(peer_uid(bogus, listener.local_addr().unwrap()), None);
    }

    #[test]
    fn loopback_peer_uid_of_another_user() {
        if !rustix::process::getuid().is_root() {
            eprintln!("skipped: not root, cannot run a client as nobody");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = format!(
            "import socket, sys\ns = socket.create_connection(('127.0.0.1', {port}))\nsys.stdin.read()"
        );
        let child = std::process::Command::new("setpriv")
            // The system python: a pyenv shim under /root is not nobody's to run.
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", &script])
            .stdin(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("skipped: no setpriv");
            return;
        };
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let accepted = loop {
            match listener.accept() {
                Ok(a) => break Some(a),
                Err(_)
                    if std::time::Instant::now() < deadline
                        && child.try_wait().unwrap().is_none() =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => break None,
            }
        };
        let uid = accepted.map(|(server, peer)| peer_uid(peer, server.local_addr().unwrap()));
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
        match uid {
            Some(uid) => assert_eq!(uid, Some(65534)),
            None => eprintln!("skipped: the nobody client did not connect (no python3?)"),
        }
    }
}
