//! `GET /metrics`: bus gauges and counters in the Prometheus text format.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::AppState;
use axum::Extension;
use hermod_core::auth::Caller;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Bus-wide figures: for the owner and admin identities only.
async fn metrics(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    app.broker.trust().may_admin(&caller)?;
    let (seq, ts) = app.broker.committed();
    let agents = app.broker.agents(&caller);
    let online = agents.iter().filter(|a| a.online()).count();
    let connections = app.broker.connections(&caller);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "hermod_log_seq",
        "counter",
        "Messages committed to the log (newest seq).",
        vec![(String::new(), seq.to_string())],
    );
    metric(
        "hermod_log_last_ts_seconds",
        "gauge",
        "Bus time of the newest committed message.",
        vec![(String::new(), ts.to_string())],
    );
    metric(
        "hermod_agents_known",
        "gauge",
        "Agents known, counted per channel.",
        vec![(String::new(), agents.len().to_string())],
    );
    metric(
        "hermod_agents_online",
        "gauge",
        "Agents with at least one open connection.",
        vec![(String::new(), online.to_string())],
    );
    metric(
        "hermod_connections",
        "gauge",
        "Open agent connections by transport.",
        connections
            .iter()
            .map(|(t, n)| (format!("{{transport=\"{t}\"}}"), n.to_string()))
            .collect(),
    );
    let per_kind = |counters: &[std::sync::atomic::AtomicU64; 4]| {
        crate::actions::KINDS
            .iter()
            .zip(counters)
            .map(|(k, n)| {
                (
                    format!("{{kind=\"{k}\"}}"),
                    n.load(std::sync::atomic::Ordering::Relaxed).to_string(),
                )
            })
            .collect()
    };
    metric(
        "hermod_action_runs_total",
        "counter",
        "Wake-up actions started, by kind.",
        per_kind(&app.actions.runs),
    );
    metric(
        "hermod_action_failures_total",
        "counter",
        "Wake-up actions that failed or timed out, by kind.",
        per_kind(&app.actions.failures),
    );
    let (cache_bytes, budget, views) = app.broker.cache_usage();
    metric(
        "hermod_cache_bytes",
        "gauge",
        "What the inbox and topic views' cached messages hold (counted by hermod_core::broker::cost).",
        vec![(String::new(), cache_bytes.to_string())],
    );
    metric(
        "hermod_cache_budget_bytes",
        "gauge",
        "What the views' caches may hold together (--memory-budget, less a NATS node's share).",
        vec![(String::new(), budget.to_string())],
    );
    metric(
        "hermod_cache_views",
        "gauge",
        "Inbox and topic views in memory.",
        vec![(String::new(), views.to_string())],
    );
    metric(
        "hermod_commits_total",
        "counter",
        "Group commits that stored messages since start (messages per commit = batch size).",
        vec![(String::new(), app.broker.commits().to_string())],
    );
    metric(
        "hermod_tap_dropped_total",
        "counter",
        "Committed messages a slow hook runner missed.",
        vec![(String::new(), app.broker.taps_dropped().to_string())],
    );
    metric(
        "hermod_delivery_steps_lost_total",
        "counter",
        "Delivery steps (delivered, read, ...) that could not be recorded: the store refused them.",
        vec![(String::new(), app.broker.steps_lost().to_string())],
    );
    metric(
        "hermod_console_updates_dropped_total",
        "counter",
        "Live updates a slow web console feed missed (that page reloads).",
        vec![(String::new(), app.broker.traffic_dropped().to_string())],
    );
    let engine = app.broker.describe_engine().await;
    let engine = engine["engine"].as_str().unwrap_or("unknown");
    metric(
        "hermod_store_healthy",
        "gauge",
        "1 while this node's store accepts writes, 0 while degraded (see /healthz).",
        vec![(
            format!("{{engine=\"{engine}\"}}"),
            u8::from(app.broker.degraded().is_none()).to_string(),
        )],
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
