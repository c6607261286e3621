//! hermod's transports: thin adapters from each wire protocol to the
//! [`hermod_core::Broker`]. They parse, call the broker and format; routing
//! and storage live in the core.
//!
//! - [`unix`]: the hermes-bus protocol over a Unix socket.
//! - [`hooks`]: hermes-bus style hook scripts run after each commit.
//!
//! [`serve`] runs all of them until a shutdown token fires.

pub mod hooks;
pub mod unix;

use hermod_core::Broker;
use tokio_util::sync::CancellationToken;

/// Everything `hermod serve` runs besides the broker.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub unix: unix::UnixConfig,
    pub hooks: hooks::HookConfig,
}

/// Binds every listener; fails early (before serving) on a bad address.
pub struct Bound {
    unix: tokio::net::UnixListener,
    config: ServerConfig,
}

/// Binds the listeners of `config`.
pub fn bind(config: ServerConfig) -> std::io::Result<Bound> {
    let unix = unix::bind(&config.unix.path)?;
    Ok(Bound { unix, config })
}

impl Bound {
    /// Serves until `shutdown` fires, then lets connections finish and
    /// flushes the store.
    pub async fn serve(self, broker: Broker, shutdown: CancellationToken) {
        let hooks = tokio::spawn(hooks::run(
            broker.clone(),
            self.config.hooks,
            shutdown.clone(),
        ));
        unix::serve(self.unix, broker.clone(), self.config.unix, shutdown).await;
        let _ = hooks.await;
        broker.close().await;
    }
}
