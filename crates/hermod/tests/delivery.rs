//! Delivery you can see: receipts, bounces, expiry, threads, the loop
//! guard and presence, driven by real clients (`py/delivery.py`: the PyPI
//! hermes-bus client, raw Unix frames, httpx on agent-bus, SSE interop and
//! v1, and the CLI).

use crate::support::{run_python, Daemon};

#[test]
fn receipts_bounces_expiry_threads_guard_and_presence() {
    // Sweeps every 0.2 s so 1–2 s deadlines are seen promptly.
    let d = Daemon::start_with_config("[delivery]\nsweep_every = 0.2\n", &[]);
    println!("{}", run_python(&d, "delivery.py"));
}
