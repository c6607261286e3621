//! The real `hermes-bus==0.7.0` client from PyPI against hermod (scripts in
//! `tests/py/`, each exits non-zero with a reason on failure).

use crate::support::{run_python, Daemon};

#[test]
fn busclient_register_send_poll_send_message_list_endpoints_ping() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "busclient_basic.py"));
}

#[test]
fn offline_delivery_survives_the_clients_reconnect_churn() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "offline_delivery.py"));
}

#[test]
fn bad_input_gets_documented_answers_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "bad_input.py"));
}
