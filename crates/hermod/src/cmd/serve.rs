//! `hermod serve`: the daemon in the foreground.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use hermod_core::Broker;
use hermod_server::{hooks::HookConfig, unix::UnixConfig, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::daemon;

/// File name of the SQLite log in the data directory.
pub const DB_FILE: &str = "hermod.db";

pub fn run(args: &ServeArgs) -> Result<ExitCode> {
    let dir = args.data.resolve();
    let _lock = daemon::lock(&dir)?;
    let socket = args.socket();
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let broker = if args.memory {
            Broker::open_memory()?
        } else {
            let db = dir.join(DB_FILE);
            Broker::open_sqlite(&db).with_context(|| format!("cannot open {}", db.display()))?
        };
        let mut unix = UnixConfig::new(socket.clone());
        unix.max_connections = args.max_connections;
        let config = ServerConfig {
            unix,
            hooks: HookConfig {
                scripts: hermod_server::hooks::scripts_from_env(),
                timeout: Duration::from_secs(args.hook_timeout),
                concurrency: args.hook_concurrency,
            },
        };
        let bound = hermod_server::bind(config)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        if let Some(http) = &args.http {
            tracing::warn!(%http, "--http is accepted but the HTTP front is not built yet");
        }
        let (seq, _) = broker.committed();
        tracing::info!(
            socket = %socket.display(),
            data_dir = %dir.display(),
            store = if args.memory { "memory" } else { "sqlite" },
            log_seq = seq,
            "hermod listening"
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        bound.serve(broker, shutdown).await;
        tracing::info!("hermod stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
