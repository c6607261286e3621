//! hermod's transports: thin adapters from each wire protocol to the
//! [`hermod_core::Broker`]. They parse, call the broker and format; routing
//! and storage live in the core.
//!
//! - [`unix`]: the hermes-bus protocol over a Unix socket.
//! - [`http`]: agent-bus, SSE-interop, the v1 API and metrics on one port.
//! - [`actions`]: wake-up actions (and hermes-bus hooks) run after each commit.
//! - `frames`: the one dispatcher of request frames, for the Unix socket and
//!   the v1 WebSocket alike.
//!
//! [`serve`] runs all of them until a shutdown token fires.

pub mod actions;
mod frames;
pub mod http;
pub(crate) mod peer;
pub mod unix;

use hermod_core::Broker;
use tokio_util::sync::CancellationToken;

/// Everything `hermod serve` runs besides the broker.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub unix: unix::UnixConfig,
    /// `None` runs no HTTP front.
    pub http: Option<http::HttpConfig>,
    pub actions: actions::ActionConfig,
}

/// Binds every listener; fails early (before serving) on a bad address.
pub struct Bound {
    unix: tokio::net::UnixListener,
    http: Option<tokio::net::TcpListener>,
    config: ServerConfig,
}

/// Binds the listeners of `config`.
pub async fn bind(config: ServerConfig) -> std::io::Result<Bound> {
    let http = match &config.http {
        Some(h) => Some(tokio::net::TcpListener::bind(h.addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on http://{}: {e}", h.addr))
        })?),
        None => None,
    };
    let unix = unix::bind(&config.unix.path)?;
    Ok(Bound { unix, http, config })
}

impl Bound {
    /// The HTTP address actually bound (port 0 resolved).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` fires, then lets connections finish and
    /// flushes the store.
    pub async fn serve(self, broker: Broker, shutdown: CancellationToken) {
        let stats = std::sync::Arc::new(actions::ActionStats::default());
        let actions = tokio::spawn(actions::run(
            broker.clone(),
            self.config.actions,
            stats.clone(),
            shutdown.clone(),
        ));
        let http = match (self.http, self.config.http) {
            (Some(listener), Some(mut config)) => {
                // The bound address (port 0 resolved): the HTTP edge's own origin.
                if let Ok(addr) = listener.local_addr() {
                    config.addr = addr;
                    // Where console login links point.
                    broker.set_console_url(format!("http://{addr}"));
                }
                let state = http::AppState {
                    broker: broker.clone(),
                    config: std::sync::Arc::new(config),
                    shutdown: shutdown.clone(),
                    relay: http::relay::RelayHub::default(),
                    actions: stats,
                };
                Some(tokio::spawn(http::serve(listener, state)))
            }
            _ => None,
        };
        unix::serve(self.unix, broker.clone(), self.config.unix, shutdown).await;
        if let Some(http) = http {
            let _ = http.await;
        }
        let _ = actions.await;
        broker.close().await;
    }
}
