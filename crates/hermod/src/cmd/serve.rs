//! `hermod serve`: the daemon in the foreground.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hermod_core::auth::{AuthMode, RateLimit, Trust};
use hermod_core::engine::Retention;
use hermod_core::Broker;
use hermod_nats::{NatsConfig, NatsEngine};
use hermod_server::actions::{self, ActionConfig};
use hermod_server::{http::HttpConfig, unix::UnixConfig, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::daemon;

/// File name of the SQLite log in the data directory.
pub const DB_FILE: &str = "hermod.db";
/// File in the data directory naming this node among NATS nodes.
const NODE_FILE: &str = "nats-node";

/// This node's name among NATS nodes, kept in the data directory so a
/// restarted node takes its own cursor leases over at once.
fn node_name(dir: &std::path::Path) -> Result<String> {
    let path = dir.join(NODE_FILE);
    if let Ok(name) = std::fs::read_to_string(&path) {
        let name = name.trim();
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Ok(name.to_owned());
        }
    }
    let name = hermod_core::model::new_id();
    std::fs::write(&path, &name).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(name)
}

/// File in the data directory naming the addresses actually bound.
pub const RUNTIME_FILE: &str = "runtime.json";

pub fn run(args: &ServeArgs) -> Result<ExitCode> {
    // Before anything is created (and before the runtime's threads exist):
    // see `daemon` for why everything is born private.
    daemon::private_umask();
    let dir = args.data.resolve();
    let _lock = daemon::lock(&dir)?;
    let socket = args.socket();
    // Once, before any listener: the connection caps, not the fd table,
    // decide who is refused.
    match hermod_server::http::listener::raise_fd_limit() {
        Ok(n) => tracing::info!(nofile = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let runtime = super::runtime()?;
    let mode: AuthMode = args.auth.parse().map_err(anyhow::Error::msg)?;
    let trust = || {
        let rate = RateLimit {
            rate: args.send_rate.max(0.0),
            burst: args.send_burst.max(1.0),
        };
        Trust::new(mode, rate)
    };
    let config_file = load_config(&dir)?;
    let rules = retention(args, &config_file.retention)?;
    // One memory budget: a NATS node's message cache takes a quarter, the
    // inbox and topic views the rest.
    let budget = args.memory_budget.as_u64() as usize;
    let nats_cache = if args.nats.is_empty() { 0 } else { budget / 4 };
    runtime.block_on(async {
        let broker = if !args.nats.is_empty() {
            let mut config = NatsConfig::new(args.nats.clone());
            config.creds = args.nats_creds.clone();
            config.stream = args.nats_stream.clone();
            config.replicas = args.nats_replicas.max(1);
            config.cache_bytes = nats_cache;
            config.node = Some(node_name(&dir)?);
            let engine = NatsEngine::open(config)
                .await
                .context("cannot open the NATS JetStream engine")?;
            Broker::with_engine(Arc::new(engine), trust()).await?
        } else if args.memory {
            Broker::open_memory_with(trust()).await?
        } else {
            let db = dir.join(DB_FILE);
            Broker::open_sqlite_with(&db, trust())
                .await
                .with_context(|| format!("cannot open {}", db.display()))?
        };
        broker.set_memory_budget(budget - nats_cache);
        tracing::info!(?rules, "retention");
        broker.start_retention(rules);
        let (delivery, digest_every) = config_file.delivery.resolve()?;
        broker.start_delivery(delivery);
        broker.configure_guard(config_file.guard.resolve()?);
        let mut unix = UnixConfig::new(socket.clone());
        unix.max_connections = args.max_connections;
        unix.owner_uids.extend(&args.allow_uids);
        let http = (!args.no_http).then(|| {
            let mut http = HttpConfig::new(args.http);
            http.keepalive = Duration::from_secs(args.sse_keepalive.max(1));
            http.max_wait = Duration::from_secs(args.long_poll_max);
            http.relay_token = args.relay_token.clone();
            http.owner_uids.extend(&args.allow_uids);
            http.allow_origins = args.allow_origins.clone();
            http.allow_hosts = args.allow_hosts.clone();
            // Connection limits; zero timeouts would close everything.
            http.max_connections = args.http_max_connections.max(1);
            http.header_timeout = Duration::from_secs(args.http_header_timeout.max(1));
            http.idle_timeout = Duration::from_secs(args.http_idle_timeout.max(1));
            http.body_timeout = Duration::from_secs(args.http_body_timeout.max(1));
            http.write_timeout = Duration::from_secs(args.http_write_timeout.max(1));
            http.console_operator = args.console_operator.clone();
            http.console_idle = Duration::from_secs(args.console_idle.max(1));
            http
        });
        let config = ServerConfig {
            unix,
            http,
            actions: ActionConfig {
                actions: {
                    let mut all = actions::hooks_from_env();
                    all.extend(config_file.actions.action);
                    all
                },
                timeout: Duration::from_secs(args.hook_timeout),
                concurrency: args.hook_concurrency,
                digest_every,
            },
        };
        let bound = hermod_server::bind(config)
            .await
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let http = bound.http_addr();
        write_runtime(&dir, &socket, http)?;
        let (seq, _) = broker.committed();
        tracing::info!(
            socket = %socket.display(),
            http = %http.map(|a| format!("http://{a}")).unwrap_or_else(|| "off".into()),
            data_dir = %dir.display(),
            store = if !args.nats.is_empty() {
                "nats"
            } else if args.memory {
                "memory"
            } else {
                "sqlite"
            },
            auth = mode.as_str(),
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

/// `config.toml`: wake-up actions and retention.
#[derive(Debug, Default, serde::Deserialize)]
struct ConfigFile {
    #[serde(flatten)]
    actions: actions::ActionsFile,
    #[serde(default)]
    retention: RetentionFile,
    #[serde(default)]
    delivery: DeliveryFile,
    #[serde(default)]
    guard: GuardFile,
}

/// `[delivery]`: bounces, wake-up digests and per-channel `ttl`s.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryFile {
    /// Seconds before an unread direct message bounces (default 600).
    bounce_after: Option<f64>,
    /// Seconds between digest wake-ups for `low` messages (default 300).
    digest_every: Option<f64>,
    /// Seconds between bounce and expiry sweeps (default 1).
    sweep_every: Option<f64>,
    /// Default `ttl` (seconds) per channel.
    #[serde(default)]
    ttl: std::collections::BTreeMap<String, f64>,
}

fn seconds(name: &str, value: Option<f64>, default: f64) -> Result<f64> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        Some(v) => anyhow::bail!("{name} = {v}: must be a positive number of seconds"),
    }
}

impl DeliveryFile {
    fn resolve(&self) -> Result<(hermod_core::broker::DeliveryConfig, Duration)> {
        let mut config = hermod_core::broker::DeliveryConfig {
            bounce_after: seconds("delivery.bounce_after", self.bounce_after, 600.0)?,
            sweep_every: Duration::from_secs_f64(seconds(
                "delivery.sweep_every",
                self.sweep_every,
                1.0,
            )?),
            ..Default::default()
        };
        for (channel, ttl) in &self.ttl {
            let name = hermod_core::model::Channel::parse(channel.clone())
                .with_context(|| format!("[delivery.ttl] {channel:?}"))?;
            config
                .ttl
                .insert(name, seconds("delivery.ttl", Some(*ttl), 0.0)?);
        }
        let digest = seconds("delivery.digest_every", self.digest_every, 300.0)?;
        Ok((config, Duration::from_secs_f64(digest)))
    }
}

/// `[guard]`: the loop and storm guard.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardFile {
    /// Turns (alternating messages) in `window` that hold a pair (0: off).
    turns: Option<usize>,
    window: Option<f64>,
    /// Messages one agent may send in `window` (default: no limit).
    sender_limit: Option<usize>,
    cooldown: Option<f64>,
    /// Pairs never held: `[["ci", "deployer"]]`.
    #[serde(default)]
    exempt: Vec<(String, String)>,
    /// Where operators hear of a trip (default `hermod.guard`).
    topic: Option<String>,
}

impl GuardFile {
    fn resolve(&self) -> Result<hermod_core::broker::GuardConfig> {
        let default = hermod_core::broker::GuardConfig::default();
        let name = |s: &str| {
            hermod_core::model::AgentName::parse(s).with_context(|| format!("[guard] exempt {s:?}"))
        };
        let topic = self.topic.clone().unwrap_or(default.topic);
        hermod_events::pattern::validate_topic(&topic)
            .with_context(|| format!("[guard] topic {topic:?}"))?;
        Ok(hermod_core::broker::GuardConfig {
            turns: self.turns.unwrap_or(default.turns),
            window: seconds("guard.window", self.window, default.window)?,
            sender_limit: self.sender_limit,
            cooldown: seconds("guard.cooldown", self.cooldown, default.cooldown)?,
            exempt: self
                .exempt
                .iter()
                .map(|(a, b)| Ok((name(a)?, name(b)?)))
                .collect::<Result<_>>()?,
            topic,
        })
    }
}

/// `[retention]`: the same values as the `--retention-*` flags.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    age: Option<toml::Value>,
    messages: Option<toml::Value>,
    bytes: Option<toml::Value>,
    topic_age: Option<toml::Value>,
}

/// `<data-dir>/config.toml`, else `~/.config/hermod/config.toml`, if any.
fn load_config(dir: &std::path::Path) -> Result<ConfigFile> {
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    let candidates = [
        dir.join("config.toml"),
        home.join(".config/hermod/config.toml"),
    ];
    let Some(path) = candidates.iter().find(|p| p.exists()) else {
        return Ok(ConfigFile::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: ConfigFile =
        toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
    for spec in &file.actions.action {
        if let Some(t) = &spec.topic {
            hermod_events::Pattern::parse(t)
                .with_context(|| format!("invalid topic pattern {t:?} in {}", path.display()))?;
        }
    }
    tracing::info!(file = %path.display(), actions = file.actions.action.len(), "config loaded");
    Ok(file)
}

/// The retention rules: a flag, else `[retention]`, else the default.
fn retention(args: &ServeArgs, file: &RetentionFile) -> Result<Retention> {
    fn pick(flag: &Option<String>, file: &Option<toml::Value>, default: &str) -> String {
        match (flag, file) {
            (Some(f), _) => f.clone(),
            (None, Some(toml::Value::String(s))) => s.clone(),
            (None, Some(v)) => v.to_string(),
            (None, None) => default.to_owned(),
        }
    }
    let off = |s: &str| matches!(s.trim(), "0" | "off" | "none");
    let duration = |what: &str, s: String| -> Result<Option<f64>> {
        if off(&s) {
            return Ok(None);
        }
        let d = humantime::parse_duration(s.trim())
            .with_context(|| format!("invalid {what} {s:?} (try 30d, 12h, 90m)"))?;
        Ok(Some(d.as_secs_f64()))
    };
    let count = |what: &str, s: String| -> Result<Option<u64>> {
        if off(&s) {
            return Ok(None);
        }
        let n: u64 = s
            .trim()
            .replace('_', "")
            .parse()
            .with_context(|| format!("invalid {what} {s:?} (a whole number)"))?;
        Ok(Some(n))
    };
    let size = |what: &str, s: String| -> Result<Option<u64>> {
        if off(&s) {
            return Ok(None);
        }
        let b: bytesize::ByteSize = s
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid {what} {s:?} (try 10GiB, 500MB): {e}"))?;
        Ok(Some(b.as_u64()))
    };
    Ok(Retention {
        age: duration("retention age", pick(&args.retention_age, &file.age, "30d"))?,
        inbox_messages: count(
            "retention messages",
            pick(&args.retention_messages, &file.messages, "100000"),
        )?,
        bytes: size(
            "retention bytes",
            pick(&args.retention_bytes, &file.bytes, "10GiB"),
        )?,
        topic_age: duration(
            "retention topic age",
            pick(&args.retention_topic_age, &file.topic_age, "7d"),
        )?,
    })
}

/// Publishes the bound addresses (port 0 resolved) for clients and tests.
fn write_runtime(
    dir: &std::path::Path,
    socket: &std::path::Path,
    http: Option<std::net::SocketAddr>,
) -> Result<()> {
    let runtime = serde_json::json!({
        "pid": std::process::id(),
        "socket": socket,
        "http": http.map(|a| format!("http://{a}")),
    });
    let path = dir.join(RUNTIME_FILE);
    let tmp = dir.join(format!("{RUNTIME_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&runtime)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
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
