//! Hooks, as hermes-bus runs them: after a message is stored, every
//! configured script runs with the message frame JSON on stdin.
//!
//! Hooks never delay routing: they read from a bounded tap of committed
//! messages (a hook that falls behind misses messages, with a warning), run
//! at most [`HookConfig::concurrency`] at once, and are killed after
//! [`HookConfig::timeout`]. Failures are logged, never answered.
//!
//! The list comes from `HERMES_BUS_HOOKS` (comma-separated paths or a JSON
//! array; `none` or empty disables), else `$HERMES_HOME/hermes-bus/hooks.yaml`
//! (`- /path/hook.py` lines), else nothing. A `.py` hook runs under `python3`,
//! as the original ran hooks under its own interpreter; anything else is
//! executed directly.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use hermod_core::{wire, Broker};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Committed messages buffered for hooks before they start missing some.
const TAP_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct HookConfig {
    pub scripts: Vec<PathBuf>,
    /// A hook still running after this is killed.
    pub timeout: Duration,
    /// Hook processes running at once.
    pub concurrency: usize,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            scripts: Vec::new(),
            timeout: Duration::from_secs(10),
            concurrency: 8,
        }
    }
}

/// Resolves the hook list the way hermes-bus does, from the environment.
pub fn scripts_from_env() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let hermes_home = std::env::var_os("HERMES_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".hermes"));
    resolve(
        std::env::var("HERMES_BUS_HOOKS").ok().as_deref(),
        &hermes_home.join("hermes-bus").join("hooks.yaml"),
        &home,
    )
}

fn resolve(env: Option<&str>, yaml: &Path, home: &Path) -> Vec<PathBuf> {
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

/// Runs hooks for every committed message until `shutdown`.
pub async fn run(broker: Broker, config: HookConfig, shutdown: CancellationToken) {
    if config.scripts.is_empty() {
        return;
    }
    tracing::info!(hooks = ?config.scripts, "hooks enabled");
    let mut tap = broker.tap(TAP_CAPACITY);
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let tasks = TaskTracker::new();
    let mut reported_drops = 0;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = tap.recv() => match m { Some(m) => m, None => break },
        };
        let dropped = broker.taps_dropped();
        if dropped > reported_drops {
            tracing::warn!(dropped, "hooks fell behind; some messages ran no hook");
            reported_drops = dropped;
        }
        let input = wire::message_bytes(&message);
        for script in &config.scripts {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let (script, input, timeout) = (script.clone(), input.clone(), config.timeout);
            tasks.spawn(async move {
                run_one(&script, &input, timeout).await;
                drop(permit);
            });
        }
    }
    tasks.close();
    tasks.wait().await;
}

async fn run_one(script: &Path, input: &[u8], timeout: Duration) {
    let mut cmd = if script.extension().is_some_and(|e| e == "py") {
        let mut c = Command::new("python3");
        c.arg(script);
        c
    } else {
        Command::new(script)
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(hook = %script.display(), error = %e, "hook failed to start");
            return;
        }
    };
    let mut stdin = child.stdin.take();
    let result = tokio::time::timeout(timeout, async {
        if let Some(stdin) = stdin.as_mut() {
            // A hook that never reads stdin must not block us: errors are fine.
            let _ = stdin.write_all(input).await;
        }
        drop(stdin.take());
        child.wait_with_output().await
    })
    .await;
    match result {
        Err(_) => {
            tracing::warn!(hook = %script.display(), ?timeout, "hook timed out and was killed")
        }
        Ok(Err(e)) => tracing::warn!(hook = %script.display(), error = %e, "hook failed"),
        Ok(Ok(out)) if !out.status.success() => tracing::warn!(
            hook = %script.display(),
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "hook exited with an error"
        ),
        Ok(Ok(_)) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_order() {
        let home = Path::new("/home/u");
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("hooks.yaml");
        std::fs::write(&yaml, "# hooks\n- ~/a.py\n- '/b.sh'\n").unwrap();
        assert_eq!(
            resolve(None, &yaml, home),
            [home.join("a.py"), PathBuf::from("/b.sh")]
        );
        assert_eq!(resolve(Some("none"), &yaml, home), Vec::<PathBuf>::new());
        assert_eq!(
            resolve(Some("/x, ~/y"), &yaml, home),
            [PathBuf::from("/x"), home.join("y")]
        );
        assert_eq!(
            resolve(Some(r#"["/j"]"#), &yaml, home),
            [PathBuf::from("/j")]
        );
        assert!(resolve(None, &dir.path().join("missing.yaml"), home).is_empty());
    }
}
