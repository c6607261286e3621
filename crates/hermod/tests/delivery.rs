//! Delivery you can see: receipts, bounces, expiry, threads, the loop
//! guard and presence, driven by real clients (`py/delivery.py`: the PyPI
//! hermes-bus client, raw Unix frames, httpx on agent-bus, SSE interop and
//! v1, and the CLI).

use crate::support::{run_python, stderr, stdout, Daemon};

#[test]
fn receipts_bounces_expiry_threads_guard_and_presence() {
    // Sweeps every 0.2 s so 1–2 s deadlines are seen promptly.
    let d = Daemon::start_with_config("[delivery]\nsweep_every = 0.2\n", &[]);
    println!("{}", run_python(&d, "delivery.py"));
}

/// What the loop guard holds is in the store, not only in memory: after a
/// restart `hermod release` still sends it on.
#[test]
fn held_messages_survive_a_restart_and_are_released() {
    let mut d = Daemon::start_with_config("[guard]\nturns = 2\ncooldown = 600\n", &[]);
    let send = |d: &Daemon, from: &str, to: &str, text: &str| {
        let out = d.cli(&["send", "--from", from, to, text]);
        assert!(out.status.success(), "{}", stderr(&out));
        let id = stdout(&out).split_whitespace().nth(1).unwrap().to_owned();
        (id, stderr(&out))
    };
    send(&d, "ping", "pong", "one");
    send(&d, "pong", "ping", "two");
    let (id, notice) = send(&d, "ping", "pong", "three");
    assert!(notice.contains("held by the loop guard"), "{notice}");
    let inbox = stdout(&d.cli(&["inbox", "pong"]));
    assert!(inbox.contains("one") && !inbox.contains("three"), "{inbox}");
    // Its `held` step is stored (the recorder writes steps behind the reply).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !stdout(&d.cli(&["receipt", &id])).contains("pong: held") {
        assert!(std::time::Instant::now() < deadline, "never held");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.stop();
    d.spawn();
    let out = d.cli(&["release", "ping", "pong"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 held message(s) went on"),
        "{}",
        stdout(&out)
    );
    let inbox = stdout(&d.cli(&["inbox", "pong"]));
    assert!(inbox.contains("three"), "{inbox}");
}
