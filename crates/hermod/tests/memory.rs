//! Memory stays within `--memory-budget` whatever the traffic: many inboxes
//! of large messages (which used to be cached up to 8 MiB per inbox, with
//! no global budget), and every message still readable from the store.

use serde_json::{json, Value};

use crate::support::Daemon;

/// The daemon's resident memory, in bytes.
fn rss(d: &Daemon) -> u64 {
    let pid = d.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_inboxes_of_large_messages_stay_within_the_memory_budget() {
    const BUDGET: u64 = 32 << 20;
    const INBOXES: usize = 300;
    const PER_INBOX: usize = 10;
    let d = Daemon::start_with(&["--memory-budget", "32MiB", "--send-rate", "0"], &[]);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/messages", d.http);
    let idle = rss(&d);
    // 3,000 messages of 64 KiB (192 MiB, six times the budget), 100 per
    // request, round-robin over 300 inboxes.
    let pad = "x".repeat(64 << 10);
    let mut n = 0;
    for _ in 0..(INBOXES * PER_INBOX / 100) {
        let batch: Vec<Value> = (0..100)
            .map(|_| {
                n += 1;
                json!({"from": "load", "to": format!("inbox{}", n % INBOXES), "body": {"n": n, "pad": pad}})
            })
            .collect();
        let reply = http.post(&url).json(&batch).send().await.unwrap();
        assert_eq!(reply.status(), 200);
    }
    let metrics = http
        .get(format!("{}/metrics", d.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let cached: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hermod_cache_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(cached <= BUDGET, "cache {cached} over the budget");
    let after = rss(&d);
    println!(
        "rss idle {} MiB, after 192 MiB sent {} MiB",
        idle >> 20,
        after >> 20
    );
    // The base: what the process held idle, plus room for SQLite's page
    // caches, the HTTP buffers and the allocator's slack.
    assert!(
        after < idle + BUDGET + (64 << 20),
        "rss {} MiB (idle {} MiB, budget 32 MiB)",
        after >> 20,
        idle >> 20
    );
    // Every message is still there, read from the store.
    for i in 0..INBOXES {
        let url = format!("{}/v1/agents/inbox{i}/inbox?after=0&limit=100", d.http);
        let page: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            page["messages"].as_array().unwrap().len(),
            PER_INBOX,
            "inbox{i}"
        );
    }
}
