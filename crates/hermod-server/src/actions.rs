//! Wake-up actions: after a message is stored, tell whoever should know —
//! so an idle agent learns it has mail.
//!
//! Each action has a kind and an optional filter (recipient, channel, topic
//! pattern):
//! - `exec`: run a command with the message frame JSON on stdin (hermes-bus
//!   hooks are `exec` actions: `HERMES_BUS_HOOKS`, else
//!   `$HERMES_HOME/hermes-bus/hooks.yaml`; a `.py` hook runs under `python3`);
//! - `append`: append the frame JSON as one line to a file or named pipe
//!   (opened non-blocking: a pipe without a reader is skipped, never waited on);
//! - `tmux`: type a one-line summary into a tmux pane and press Enter (the
//!   line is made inert for a shell, see [`hermod_core::text::pane_line`]);
//! - `webhook`: POST the frame JSON to a URL.
//!
//! Actions never delay routing: they read a bounded tap of committed
//! messages (a runner that falls behind misses messages, counted), run at
//! most [`ActionConfig::concurrency`] at once and are stopped after
//! [`ActionConfig::timeout`]. Runs and failures are counted per kind for
//! `/metrics`; failures are logged. The last wake-up of each agent (which
//! kind, whether it worked) is kept for the console, whose *nudge* runs an
//! agent's actions on demand ([`ActionStats::nudge`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hermod_core::broker::Tapped;
use hermod_core::model::{Message, Priority};
use hermod_core::{text, wire, Broker};
use hermod_events::Pattern;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Committed messages buffered for actions before they start missing some.
const TAP_CAPACITY: usize = 4096;

/// What an action does.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    Exec { command: Vec<String> },
    Append { path: PathBuf },
    Tmux { target: String },
    Webhook { url: String },
}

impl Action {
    fn kind(&self) -> usize {
        match self {
            Action::Exec { .. } => 0,
            Action::Append { .. } => 1,
            Action::Tmux { .. } => 2,
            Action::Webhook { .. } => 3,
        }
    }
}

/// Names of the kinds, in [`Action::kind`] order (metric labels).
pub const KINDS: [&str; 4] = ["exec", "append", "tmux", "webhook"];

/// An action with its filter, as written in `config.toml`:
///
/// ```toml
/// [[action]]
/// kind = "tmux"          # exec | append | tmux | webhook
/// target = "agents:0.1"  # exec: command = [...]; append: path; webhook: url
/// to = "leo"             # optional: only messages landing in leo's inbox
/// channel = "default"    # optional
/// topic = "tui.**"       # optional: only topic events matching
/// ```
#[derive(Debug, Clone, Deserialize)]
pub struct ActionSpec {
    #[serde(flatten)]
    pub action: Action,
    pub to: Option<String>,
    pub channel: Option<String>,
    pub topic: Option<String>,
}

impl ActionSpec {
    fn matches(&self, t: &Tapped, topic: Option<&Pattern>) -> bool {
        let m = &t.message;
        self.to
            .as_deref()
            .is_none_or(|to| t.recipients.iter().any(|r| r.as_str() == to))
            && self
                .channel
                .as_deref()
                .is_none_or(|c| m.channel.as_str() == c)
            && topic.is_none_or(|p| m.topic.as_deref().is_some_and(|t| p.matches(t)))
    }
}

/// The `[[action]]` tables of `config.toml`.
#[derive(Debug, Default, Deserialize)]
pub struct ActionsFile {
    #[serde(default)]
    pub action: Vec<ActionSpec>,
}

#[derive(Debug, Clone)]
pub struct ActionConfig {
    pub actions: Vec<ActionSpec>,
    /// An action still running after this is stopped.
    pub timeout: Duration,
    /// Actions running at once.
    pub concurrency: usize,
    /// `low` priority messages wake an agent once per this interval, as
    /// one digest (urgent and normal ones at once).
    pub digest_every: Duration,
}

impl Default for ActionConfig {
    fn default() -> Self {
        Self {
            actions: Vec::new(),
            timeout: Duration::from_secs(10),
            concurrency: 8,
            digest_every: Duration::from_secs(300),
        }
    }
}

/// Runs and failures per kind, for `/metrics`; the last wake-up per
/// agent and the nudge queue, for the console.
#[derive(Debug, Default)]
pub struct ActionStats {
    pub runs: [AtomicU64; 4],
    pub failures: [AtomicU64; 4],
    /// The last wake-up of each agent (at most [`WAKES_MAX`] agents).
    last: Mutex<HashMap<String, Wake>>,
    /// Where nudges go; `None` while no action runner is up.
    nudges: Mutex<Option<mpsc::Sender<Nudge>>>,
}

/// Agents whose last wake-up is remembered, at most.
const WAKES_MAX: usize = 4096;
/// Nudges waiting for the runner, at most.
const NUDGE_QUEUE: usize = 16;

/// An agent's last wake-up.
#[derive(Debug, Clone)]
pub struct Wake {
    /// The action kind (`tmux`, `exec`, ...).
    pub kind: &'static str,
    pub ts: f64,
    /// `None`: it worked; else why not.
    pub error: Option<String>,
}

/// Run `agent`'s wake-up actions now (the console's nudge).
#[derive(Debug, Clone)]
pub struct Nudge {
    pub channel: String,
    pub agent: String,
    pub unread: u64,
    /// Who asked (the console's operator name).
    pub by: String,
}

impl ActionStats {
    /// The last wake-up of `agent`, if one ran since start.
    pub fn last_wake(&self, agent: &str) -> Option<Wake> {
        self.last.lock().unwrap().get(agent).cloned()
    }

    fn woke(&self, agents: &[String], wake: Wake) {
        let mut last = self.last.lock().unwrap();
        for agent in agents {
            if last.len() >= WAKES_MAX && !last.contains_key(agent) {
                // Bounded: forget one (any) to make room.
                if let Some(k) = last.keys().next().cloned() {
                    last.remove(&k);
                }
            }
            last.insert(agent.clone(), wake.clone());
        }
    }

    /// Queues a nudge; `Err` says why it cannot run (no actions
    /// configured, or too many nudges waiting).
    pub fn nudge(&self, nudge: Nudge) -> Result<(), &'static str> {
        let nudges = self.nudges.lock().unwrap();
        let Some(tx) = nudges.as_ref() else {
            return Err("no wake-up actions are configured ([[action]] in config.toml)");
        };
        tx.try_send(nudge)
            .map_err(|_| "too many nudges are waiting; try again in a moment")
    }
}

/// hermes-bus hooks as `exec` actions, resolved from the environment.
pub fn hooks_from_env() -> Vec<ActionSpec> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let hermes_home = std::env::var_os("HERMES_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".hermes"));
    let scripts = resolve_hooks(
        std::env::var("HERMES_BUS_HOOKS").ok().as_deref(),
        &hermes_home.join("hermes-bus").join("hooks.yaml"),
        &home,
    );
    scripts
        .into_iter()
        .map(|script| {
            let mut command = Vec::new();
            if script.extension().is_some_and(|e| e == "py") {
                command.push("python3".to_owned());
            }
            command.push(script.display().to_string());
            ActionSpec {
                action: Action::Exec { command },
                to: None,
                channel: None,
                topic: None,
            }
        })
        .collect()
}

fn resolve_hooks(env: Option<&str>, yaml: &Path, home: &Path) -> Vec<PathBuf> {
    let expand = |s: &str| match s.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(s),
    };
    if let Some(list) = env.map(str::trim).filter(|s| !s.is_empty()) {
        if list.eq_ignore_ascii_case("none") {
            return Vec::new();
        }
        if list.starts_with('[') {
            if let Ok(paths) = serde_json::from_str::<Vec<String>>(list) {
                return paths.iter().map(|p| expand(p)).collect();
            }
        }
        return list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(expand)
            .collect();
    }
    let Ok(text) = std::fs::read_to_string(yaml) else {
        return Vec::new();
    };
    // hermes-bus reads this file line by line ("- path", optionally quoted;
    // `#` comments), not as general YAML; the same rule keeps every file
    // that worked there working here.
    text.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("- "))
        .map(|p| p.trim().trim_matches(|c| c == '\'' || c == '"'))
        .filter(|p| !p.is_empty())
        .map(expand)
        .collect()
}

/// Runs the actions for every committed message until `shutdown`.
pub async fn run(
    broker: Broker,
    config: ActionConfig,
    stats: Arc<ActionStats>,
    shutdown: CancellationToken,
) {
    if config.actions.is_empty() {
        return;
    }
    tracing::info!(actions = config.actions.len(), "wake-up actions enabled");
    let patterns: Vec<Option<Pattern>> = config
        .actions
        .iter()
        .map(|a| a.topic.as_deref().and_then(|t| Pattern::parse(t).ok()))
        .collect();
    let mut tap = broker.tap(TAP_CAPACITY);
    let (nudge_tx, mut nudges) = mpsc::channel(NUDGE_QUEUE);
    *stats.nudges.lock().unwrap() = Some(nudge_tx);
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let http = reqwest::Client::new();
    let tasks = TaskTracker::new();
    let mut reported_drops = 0;
    // Per action, the low-priority messages its next digest covers.
    // The first one waits at most `digest_every`: the digest is due then.
    let mut low: Vec<Vec<Arc<Message>>> = vec![Vec::new(); config.actions.len()];
    let mut digest_at: Option<tokio::time::Instant> = None;
    loop {
        let due = digest_at.unwrap_or_else(tokio::time::Instant::now);
        let tapped = tokio::select! {
            _ = shutdown.cancelled() => break,
            t = tap.recv() => match t { Some(t) => t, None => break },
            Some(nudge) = nudges.recv() => {
                for spec in config.actions.iter().filter(|a| a.nudges(&nudge)) {
                    let permit = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                    };
                    let job = Job::nudge(spec.action.clone(), &nudge, &config, &http);
                    spawn(&tasks, job, stats.clone(), permit);
                }
                continue;
            }
            _ = tokio::time::sleep_until(due), if digest_at.is_some() => {
                digest_at = None;
                for (spec, messages) in config.actions.iter().zip(low.iter_mut()) {
                    if messages.is_empty() {
                        continue;
                    }
                    let permit = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                    };
                    let job = Job::digest(spec.action.clone(), std::mem::take(messages), &config, &http);
                    spawn(&tasks, job, stats.clone(), permit);
                }
                continue;
            }
        };
        let dropped = broker.taps_dropped();
        if dropped > reported_drops {
            tracing::warn!(dropped, "actions fell behind; some messages ran no action");
            reported_drops = dropped;
        }
        let frame = wire::message_bytes(&tapped.message);
        let is_low = tapped.message.meta().priority == Priority::Low;
        for (i, (spec, pattern)) in config.actions.iter().zip(&patterns).enumerate() {
            if !spec.matches(&tapped, pattern.as_ref()) {
                continue;
            }
            if is_low {
                // Bounded: past DIGEST_MAX the digest says how many it left out.
                if low[i].len() < DIGEST_MAX {
                    low[i].push(tapped.message.clone());
                }
                digest_at.get_or_insert_with(|| tokio::time::Instant::now() + config.digest_every);
                continue;
            }
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let job = Job {
                action: spec.action.clone(),
                frame: frame.clone(),
                summary: summary(&tapped.message),
                timeout: config.timeout,
                http: http.clone(),
                agents: woken(spec, &tapped),
            };
            spawn(&tasks, job, stats.clone(), permit);
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// Low-priority messages one digest names at most.
const DIGEST_MAX: usize = 1000;

fn spawn(
    tasks: &TaskTracker,
    job: Job,
    stats: Arc<ActionStats>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    tasks.spawn(async move {
        let kind = job.action.kind();
        stats.runs[kind].fetch_add(1, Ordering::Relaxed);
        let agents = job.agents.clone();
        let result = job.run().await;
        if let Err(e) = &result {
            stats.failures[kind].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(action = KINDS[kind], error = %e, "wake-up action failed");
        }
        let wake = Wake {
            kind: KINDS[kind],
            ts: hermod_core::model::now(),
            error: result.err(),
        };
        stats.woke(&agents, wake);
        drop(permit);
    });
}

struct Job {
    action: Action,
    /// What `exec`, `append` and `webhook` hand over.
    frame: bytes::Bytes,
    /// What `tmux` types.
    summary: String,
    timeout: Duration,
    http: reqwest::Client,
    /// The agents it wakes (their last wake-up is this one).
    agents: Vec<String>,
}

/// Agents a message's action wakes, recorded at most per run.
const WOKEN_MAX: usize = 16;

/// The recipients `spec` wakes for `t`: its `to`, else every recipient.
fn woken(spec: &ActionSpec, t: &Tapped) -> Vec<String> {
    match &spec.to {
        Some(to) => vec![to.clone()],
        None => t
            .recipients
            .iter()
            .take(WOKEN_MAX)
            .map(|r| r.to_string())
            .collect(),
    }
}

impl ActionSpec {
    /// Does a nudge of this agent run this action? Its `to` and `channel`
    /// filters say so; a topic-only action wakes nobody's inbox.
    fn nudges(&self, n: &Nudge) -> bool {
        self.topic.is_none()
            && self.to.as_deref().is_none_or(|to| to == n.agent)
            && self.channel.as_deref().is_none_or(|c| c == n.channel)
    }
}

impl Job {
    /// A nudge from the console: a `nudge` frame for exec, append and
    /// webhook, a pane line for tmux.
    fn nudge(action: Action, n: &Nudge, config: &ActionConfig, http: &reqwest::Client) -> Self {
        let frame = serde_json::to_vec(&serde_json::json!({
            "type": "nudge",
            "to": n.agent,
            "channel": n.channel,
            "unread": n.unread,
            "from": n.by,
        }))
        .expect("a nudge serializes");
        let summary = text::pane_line(
            &format!(
                "[hermod] nudge from {}: {} has {} unread message(s) on {}; read them with hermod recv",
                n.by, n.agent, n.unread, n.channel
            ),
            PANE_MAX_CHARS,
        );
        Job {
            action,
            frame: frame.into(),
            summary,
            timeout: config.timeout,
            http: http.clone(),
            agents: vec![n.agent.clone()],
        }
    }

    /// One wake-up for many `low` messages: a `digest` frame holding
    /// them, and a pane line naming how many and from whom.
    fn digest(
        action: Action,
        messages: Vec<Arc<Message>>,
        config: &ActionConfig,
        http: &reqwest::Client,
    ) -> Self {
        let frames: Vec<wire::MessageFrame> = messages
            .iter()
            .map(|m| wire::MessageFrame::from(m.as_ref()))
            .collect();
        let frame = serde_json::to_vec(&serde_json::json!({
            "type": "digest",
            "count": frames.len(),
            "messages": frames,
        }))
        .expect("frames serialize");
        let mut senders: Vec<&str> = messages.iter().map(|m| m.from.as_str()).collect();
        senders.sort_unstable();
        senders.dedup();
        let last = messages.last().expect("a digest is never empty");
        let mut agents: Vec<String> = messages
            .iter()
            .filter_map(|m| m.to.as_ref().map(|t| t.to_string()))
            .collect();
        agents.sort_unstable();
        agents.dedup();
        agents.truncate(WOKEN_MAX);
        let summary = text::pane_line(
            &format!(
                "[hermod] digest: {} low-priority messages to {} from {}; newest: {}",
                messages.len(),
                last.to.as_deref().unwrap_or("*"),
                senders.join(", "),
                last.body.to_text()
            ),
            PANE_MAX_CHARS,
        );
        Job {
            action,
            frame: frame.into(),
            summary,
            timeout: config.timeout,
            http: http.clone(),
            agents,
        }
    }

    async fn run(self) -> Result<(), String> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.act())
            .await
            .map_err(|_| format!("timed out after {timeout:?} and was stopped"))?
    }

    async fn act(self) -> Result<(), String> {
        match &self.action {
            Action::Exec { command } => exec(command, &self.frame).await,
            Action::Append { path } => {
                let (path, frame) = (path.clone(), self.frame.clone());
                tokio::task::spawn_blocking(move || append(&path, &frame))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Action::Tmux { target } => tmux(target, &self.summary).await,
            Action::Webhook { url } => {
                let resp = self
                    .http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(self.frame.clone())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                match resp.status() {
                    s if s.is_success() => Ok(()),
                    s => Err(format!("{url} answered {s}")),
                }
            }
        }
    }
}

async fn exec(command: &[String], input: &[u8]) -> Result<(), String> {
    let (program, args) = command
        .split_first()
        .ok_or("exec action without a command")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true) // a timed-out run is killed when dropped
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that never reads stdin must not block us.
        let _ = stdin.write_all(input).await;
    }
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Appends one line without ever blocking: a named pipe with no reader
/// fails to open (ENXIO) and a full one refuses the write (EAGAIN).
fn append(path: &Path, frame: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = frame.to_vec();
    line.push(b'\n');
    file.write_all(&line)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Longest line a wake-up types into a pane: enough to tell what the
/// message is about; the agent reads all of it with `hermod recv`.
const PANE_MAX_CHARS: usize = 300;

/// One line an idle CLI agent reads as a prompt. All of it goes through
/// [`text::pane_line`], so it starts with the fixed word
/// [`text::PANE_PREFIX`] and is inert should the pane be a plain shell;
/// a line break in the text shows as `␊` instead of pressing Enter.
fn summary(m: &Message) -> String {
    let to = m.to.as_deref().unwrap_or("*");
    // Only a token proves a name; anyone else may have typed any `from`.
    let unverified = if m.auth.verified() {
        ""
    } else {
        " (unverified)"
    };
    text::pane_line(
        &format!(
            "[hermod] message from {}{unverified} to {to} ({}): {}",
            m.from,
            m.channel,
            m.body.to_text()
        ),
        PANE_MAX_CHARS,
    )
}

async fn tmux(target: &str, line: &str) -> Result<(), String> {
    for args in [
        vec!["send-keys", "-t", target, "-l", line],
        vec!["send-keys", "-t", target, "Enter"],
    ] {
        let out = Command::new("tmux")
            .args(&args)
            .output()
            .await
            .map_err(|e| format!("tmux: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tmux: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_resolution_order() {
        let home = Path::new("/home/u");
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("hooks.yaml");
        std::fs::write(&yaml, "# hooks\n- ~/a.py\n- '/b.sh'\n").unwrap();
        assert_eq!(
            resolve_hooks(None, &yaml, home),
            [home.join("a.py"), PathBuf::from("/b.sh")]
        );
        assert_eq!(
            resolve_hooks(Some("none"), &yaml, home),
            Vec::<PathBuf>::new()
        );
        assert_eq!(
            resolve_hooks(Some("/x, ~/y"), &yaml, home),
            [PathBuf::from("/x"), home.join("y")]
        );
        assert_eq!(
            resolve_hooks(Some(r#"["/j"]"#), &yaml, home),
            [PathBuf::from("/j")]
        );
        assert!(resolve_hooks(None, &dir.path().join("missing.yaml"), home).is_empty());
    }

    #[test]
    fn config_file_shapes() {
        let file: ActionsFile = toml::from_str(
            r#"
            [[action]]
            kind = "tmux"
            target = "agents:0.1"
            to = "leo"

            [[action]]
            kind = "exec"
            command = ["notify-send", "mail"]
            topic = "tui.**"
            "#,
        )
        .unwrap();
        assert_eq!(file.action.len(), 2);
        assert!(matches!(file.action[0].action, Action::Tmux { .. }));
        assert_eq!(file.action[1].topic.as_deref(), Some("tui.**"));
        assert!(toml::from_str::<ActionsFile>("[[action]]\nkind = \"nope\"\n").is_err());
    }
}
