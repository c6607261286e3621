//! The Unix-socket transport: the hermes-bus protocol (PROTOCOLS.md §1).
//!
//! [`bind`] prepares the socket file (mode 0600, a stale file from a dead
//! server is replaced, a live one is refused); [`serve`] accepts connections
//! up to a limit and runs one [`connection`] handler each.

mod connection;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hermod_core::Broker;

use crate::peer;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for connections to finish their owed replies.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Limits of the Unix-socket transport.
#[derive(Debug, Clone)]
pub struct UnixConfig {
    pub path: PathBuf,
    /// Open connections accepted at once; more are refused with an error frame.
    pub max_connections: usize,
    /// A registered endpoint silent this long is dropped (hermes-bus: 90 s).
    pub idle_timeout: Duration,
    /// A client that does not read for this long is disconnected.
    pub write_timeout: Duration,
    /// Peers running as these uids are the owner (by `SO_PEERCRED`): the
    /// daemon's own uid plus `--allow-uid`. Anyone else needs a token.
    pub owner_uids: Vec<u32>,
}

impl UnixConfig {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(30),
            owner_uids: vec![peer::own_uid()],
        }
    }
}

/// Binds the socket at `path`, accessible to its owner only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    // The mode comes from the process umask (077 in `hermod serve`): a
    // chmod after bind would leave a moment in which anyone could connect.
    // Should a caller run without that umask, refuse rather than serve a
    // socket others can open.
    let mode = std::fs::symlink_metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        let _ = std::fs::remove_file(path);
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} would be open to other users (mode {:o}); run under umask 077",
                path.display(),
                mode & 0o777
            ),
        ));
    }
    Ok(listener)
}

/// Accepts connections until `shutdown`, then waits for them to finish.
pub async fn serve(
    listener: UnixListener,
    broker: Broker,
    config: UnixConfig,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "unix accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tasks.spawn(connection::refuse(stream));
            continue;
        };
        let (broker, config, shutdown) = (broker.clone(), config.clone(), shutdown.clone());
        tasks.spawn(async move {
            connection::handle(stream, broker, &config, shutdown).await;
            drop(permit);
        });
    }
    tasks.close();
    // Connections finish the replies they owe; one whose client stopped
    // reading is not waited for beyond the grace period.
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} connections still busy after {SHUTDOWN_GRACE:?}; closing anyway",
            tasks.len()
        );
    }
    let _ = std::fs::remove_file(&config.path);
}
