//! `hermod start|stop|status|restart`: the background daemon.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::cli::{ClientArgs, DataDirArgs, ServeArgs};
use crate::daemon;

/// Exit code of `status` when the daemon runs but its store refuses writes.
const EXIT_DEGRADED: u8 = 1;
/// Exit code of `status` when no daemon runs (as LSB init scripts).
const EXIT_NOT_RUNNING: u8 = 3;

pub fn start(args: &ServeArgs) -> Result<ExitCode> {
    let serve = args
        .serve_command()
        .context("cannot make the data directory or socket path absolute")?;
    daemon::start(&args.data.resolve(), &args.socket(), &serve)?;
    Ok(ExitCode::SUCCESS)
}

pub fn stop(args: &DataDirArgs) -> Result<ExitCode> {
    daemon::stop(&args.resolve())?;
    Ok(ExitCode::SUCCESS)
}

pub fn restart(args: &ServeArgs) -> Result<ExitCode> {
    daemon::stop(&args.data.resolve())?;
    start(args)
}

/// The engine lines of `hermod status`: its name, and for NATS the stream,
/// the server this node talks to and the stream's replicas (its peers).
fn print_engine(engine: &serde_json::Value) {
    let name = engine["engine"].as_str().unwrap_or("unknown");
    println!("engine:   {name}");
    if name != "nats" {
        return;
    }
    let server = &engine["server"];
    println!(
        "nats:     stream {} via server {} (cluster {}, version {}){}",
        engine["stream"].as_str().unwrap_or("?"),
        server["name"].as_str().unwrap_or("?"),
        server["cluster"].as_str().unwrap_or("-"),
        server["version"].as_str().unwrap_or("?"),
        if engine["connected"] == true {
            ""
        } else {
            ", disconnected"
        }
    );
    if let (Some(messages), Some(state)) = (
        engine["messages"].as_u64(),
        engine["state_entries"].as_u64(),
    ) {
        println!("nats log: {messages} messages, {state} state entries");
    }
    let cluster = &engine["cluster"];
    if let Some(leader) = cluster["leader"].as_str() {
        println!("peers:    {leader} (leader)");
    }
    for r in cluster["replicas"].as_array().into_iter().flatten() {
        let state = if r["offline"] == true {
            "offline".to_owned()
        } else if r["current"] == true {
            "current".to_owned()
        } else {
            format!("lagging by {}", r["lag"])
        };
        println!("          {} ({state})", r["name"].as_str().unwrap_or("?"));
    }
}

/// The daemon's caches against its budget, and its open connections.
fn print_memory(memory: &serde_json::Value) {
    let size = |key: &str| bytesize::ByteSize(memory[key].as_u64().unwrap_or(0)).to_string();
    println!(
        "cache:    {} of {} budget, {} views",
        size("cache_bytes"),
        size("budget_bytes"),
        memory["views"].as_u64().unwrap_or(0)
    );
    let connections = memory["connections"].as_object();
    let total: u64 = connections
        .into_iter()
        .flatten()
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    let each: Vec<String> = connections
        .into_iter()
        .flatten()
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    if each.is_empty() {
        println!("connections: 0");
    } else {
        println!("connections: {total} ({})", each.join(", "));
    }
}

pub fn status(args: &ClientArgs) -> Result<ExitCode> {
    let dir = args.local.data.resolve();
    let Some(pid) = daemon::running_pid(&dir) else {
        println!("hermod is not running (data dir {})", dir.display());
        return Ok(ExitCode::from(EXIT_NOT_RUNNING));
    };
    let socket = args.socket();
    println!("hermod is running (pid {pid})");
    println!("data dir: {}", dir.display());
    println!("socket:   {}", socket.display());
    let ((degraded, engine, memory), endpoints) = super::runtime()?.block_on(async {
        let mut c = hermod_client::Connection::connect(&socket).await?;
        anyhow::Ok((c.status_all().await?, c.list_endpoints().await?))
    })?;
    match &degraded {
        None => println!("store:    ok"),
        Some(reason) => println!("store:    degraded: {reason}"),
    }
    if let Some(engine) = &engine {
        print_engine(engine);
    }
    if let Some(memory) = &memory {
        print_memory(memory);
    }
    println!("connected endpoints: {}", endpoints.len());
    for (name, session) in endpoints {
        println!("  {name}  (session {session})");
    }
    // Running but not accepting writes is not a success.
    Ok(if degraded.is_some() {
        ExitCode::from(EXIT_DEGRADED)
    } else {
        ExitCode::SUCCESS
    })
}
