//! Topic events through the daemon (hermes_events): pattern subscriptions
//! over SSE, WebSocket and the Unix socket, durable agent subscriptions, the
//! relay WebSockets with the real `websockets` client, and `hermod pub/sub`.

use crate::support::{run_python, Daemon};

#[test]
fn relay_accepts_relay_and_jsonrpc_frames_and_ignores_the_rest() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "relay.py"));
}

#[test]
fn topics_reach_pattern_subscribers_and_durable_subscriptions() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "topics.py"));
}

#[test]
fn pub_and_sub_commands() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "topics_cli.py"));
}
