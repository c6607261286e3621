//! The HTTP front: one axum server for every HTTP protocol.
//!
//! Each protocol is a module exporting `router()`; [`app`] merges them
//! under the shared limits (10 MiB bodies) and a JSON 404, behind the
//! [`edge`] (browser boundary, tokens, who is calling).
//!
//! - [`agent_bus`]: `POST /send`, `GET /recv`, `GET /inbox`, `GET /healthz`.
//! - [`interop`]: the SSE-interop protocol (`/subscribe`, `/poll`, ...).
//! - [`v1`]: the native JSON API under `/v1`, with SSE, WebSocket and the
//!   generated OpenAPI document.
//! - [`relay`]: the hermes_events relay WebSockets (`/api/pub`, `/api/events`).
//! - [`metrics`]: `GET /metrics` in Prometheus text format.
//! - [`console`]: the web console under `/console` (its own session
//!   login; the edge's browser boundary still applies).
//!
//! [`listener`] owns the TCP connections under all of them: the accept
//! loop, connection cap, header/idle timeouts and each connection's
//! [`Peer`].

pub mod agent_bus;
pub mod console;
pub mod edge;
pub mod error;
pub mod interop;
pub mod listener;
pub mod metrics;
pub mod relay;
pub mod v1;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use hermod_core::auth::secrets_equal;
use hermod_core::wire::MAX_FRAME;
use hermod_core::Broker;
use tokio_util::sync::CancellationToken;

pub use listener::Peer;

/// Limits of the HTTP front.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub addr: std::net::SocketAddr,
    /// SSE keep-alive comment interval.
    pub keepalive: Duration,
    /// Longest a long-poll (`/recv?block=true`, `/v1/...?wait=`) is held.
    pub max_wait: Duration,
    /// Token the relay endpoints require; `None` (or an empty one, which
    /// `hermod serve` refuses at start) refuses every relay.
    pub relay_token: Option<String>,
    /// Peers running as these uids are the owner: the daemon's own uid plus
    /// `--allow-uid`.
    pub owner_uids: Vec<u32>,
    /// Web origins besides hermod's own that may call (`--allow-origin`).
    pub allow_origins: Vec<String>,
    /// `Host` values besides loopback names and addresses (`--allow-host`).
    pub allow_hosts: Vec<String>,
    /// TCP connections served at once; past it a connection is answered
    /// `503 too_many_connections` and closed (`--http-max-connections`).
    pub max_connections: usize,
    /// Longest from the first byte of a request head to its end; a
    /// slower (or half-sent) head closes the connection
    /// (`--http-header-timeout`).
    pub header_timeout: Duration,
    /// Longest a connection may sit with no request in flight and no byte
    /// received; long-polls, SSE and WebSockets are never idle in this
    /// sense (`--http-idle-timeout`).
    pub idle_timeout: Duration,
    /// Longest wait for the next piece of a request body; then `408
    /// request_timeout` (`--http-body-timeout`).
    pub body_timeout: Duration,
    /// Longest a response write may stay blocked (the client stopped
    /// reading); then the connection is closed (`--http-write-timeout`).
    pub write_timeout: Duration,
    /// The sender the console's compose stamps (`--console-operator`).
    pub console_operator: String,
    /// A console session unused this long ends (`--console-idle`).
    pub console_idle: Duration,
}

impl HttpConfig {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            addr,
            keepalive: Duration::from_secs(30),
            max_wait: Duration::from_secs(30),
            relay_token: None,
            owner_uids: vec![crate::peer::own_uid()],
            allow_origins: Vec::new(),
            allow_hosts: Vec::new(),
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
            console_operator: "operator".to_owned(),
            console_idle: Duration::from_secs(30 * 60),
        }
    }
}

impl HttpConfig {
    /// Is `given` the relay token? Never when none (or an empty one) is set.
    pub fn is_relay_token(&self, given: &str) -> bool {
        self.relay_token
            .as_deref()
            .is_some_and(|expected| !expected.is_empty() && secrets_equal(expected, given))
    }
}

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub broker: Broker,
    pub config: Arc<HttpConfig>,
    /// Fires at shutdown: long-polls return and streams end.
    pub shutdown: CancellationToken,
    pub relay: relay::RelayHub,
    /// Wake-up action counters, for `/metrics`.
    pub actions: std::sync::Arc<crate::actions::ActionStats>,
}

impl AppState {
    /// `work` (a broker long-poll), cut short by shutdown (an error), so a
    /// held request never delays the daemon's exit, and by `check` failing
    /// (the access it was allowed on ended: a token revoked or rotated, a
    /// name claimed by an identity), answered with that refusal.
    pub async fn long_poll<T>(
        &self,
        check: impl Fn(&hermod_core::auth::Trust) -> hermod_core::Result<()>,
        work: impl std::future::Future<Output = hermod_core::Result<T>>,
    ) -> Result<T, error::ApiError> {
        tokio::select! {
            biased;
            refused = self.broker.trust().until_refused(check) => Err(refused.into()),
            done = work => Ok(done?),
            _ = self.shutdown.cancelled() => Err(hermod_core::Error::ShuttingDown.into()),
        }
    }
}

/// The resume point an SSE client sent back (`Last-Event-ID` = a seq).
pub(crate) fn last_event_id(headers: &axum::http::HeaderMap) -> Option<hermod_core::model::Seq> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `event: gap`: retention removed messages the stream asked for, from
/// `after` up to `pruned_through`; the stream goes on after that. Without
/// an `id:`, so it does not move the client's `Last-Event-ID`.
pub(crate) fn gap_event(gap: &hermod_core::model::Gap) -> axum::response::sse::Event {
    axum::response::sse::Event::default()
        .event("gap")
        .data(serde_json::to_string(gap).expect("a gap serializes"))
}

impl AppState {
    /// An SSE response: ends at shutdown or when `ends` is cancelled (the
    /// stream's session was kicked, or its caller's token revoked),
    /// keep-alive comments as configured.
    pub(crate) fn sse<S>(
        &self,
        events: S,
        ends: &tokio_util::sync::CancellationToken,
    ) -> axum::response::sse::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >
    where
        S: futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
            + Send
            + 'static,
    {
        use futures::StreamExt;
        let keep_alive = axum::response::sse::KeepAlive::new()
            .interval(self.config.keepalive)
            .text("keepalive");
        let end = self.shutdown.child_token();
        let ends = ends.clone();
        let stop = async move {
            tokio::select! {
                _ = end.cancelled() => {}
                _ = ends.cancelled() => {}
            }
        };
        axum::response::sse::Sse::new(events.take_until(stop)).keep_alive(keep_alive)
    }
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let body_timeout = state.config.body_timeout;
    let routes = Router::new()
        .merge(agent_bus::router())
        .merge(interop::router())
        .merge(v1::router())
        .merge(metrics::router())
        .merge(relay::router())
        .merge(console::router())
        .fallback(error::fallback)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_FRAME))
        // A body that stops coming fails its read; `JsonBody` answers 408.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_timeout,
        ))
        .with_state(state.clone());
    // The edge check wraps the whole router (not each route) so that it runs
    // before routing: it may strip a `/a/TOKEN` prefix from the path.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn_with_state(state, edge::edge))
}

/// Serves `app` on `listener` until `shutdown` (see [`listener::serve`]).
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) {
    let shutdown = state.shutdown.clone();
    let config = state.config.clone();
    listener::serve(listener, app(state), &config, shutdown).await;
}
