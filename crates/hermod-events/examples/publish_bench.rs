//! Benchmark: nanoseconds per `publish` to 100 synchronous subscribers of one
//! topic (plus 100 non-matching ones), including envelope stamping.
//!
//! `CARGO_TARGET_DIR=/tmp/events-target cargo run --release -p hermod-events --example publish_bench`

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hermod_events::{Bus, Event};
use serde_json::{json, Value};

fn main() {
    let bus = Bus::new();
    let calls = Arc::new(AtomicUsize::new(0));
    for i in 0..100 {
        let c = Arc::clone(&calls);
        // A mix of exact, `*` and `**` patterns, all matching the topic.
        let pattern = match i % 3 {
            0 => "tui.tool.start",
            1 => "tui.*.start",
            _ => "tui.**",
        };
        bus.subscribe(pattern, move |ev: &Event| {
            c.fetch_add(black_box(ev).len(), Ordering::Relaxed);
        })
        .unwrap();
    }
    for _ in 0..100 {
        bus.subscribe("other.**", |_| {}).unwrap();
    }
    let Value::Object(payload) = json!({"tool": "grep", "args": ["-n", "x"]}) else {
        unreachable!()
    };

    for _ in 0..10_000 {
        bus.publish("tui.tool.start", payload.clone()).unwrap();
    }
    let rounds = 200_000u32;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..rounds {
            let reached = bus.publish("tui.tool.start", payload.clone()).unwrap();
            debug_assert_eq!(reached, 100);
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(rounds);
        best = best.min(ns);
        println!("{ns:.0} ns per publish to 100 subscribers (of 200)");
    }
    // Baseline: what the payload clone and envelope alone cost.
    let start = Instant::now();
    for _ in 0..rounds {
        black_box(hermod_events::envelope("tui.tool.start", payload.clone()));
    }
    let env_ns = start.elapsed().as_nanos() as f64 / f64::from(rounds);
    println!(
        "best: {best:.0} ns/publish ({:.1} ns/subscriber); envelope alone {env_ns:.0} ns",
        best / 100.0
    );
    assert!(calls.load(Ordering::Relaxed) > 0);
}
