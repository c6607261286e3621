//! The HTTP front with real clients: agent-bus, SSE-interop and v1 over
//! httpx / httpx-sse / websockets (scripts in `tests/py/`), the cross-
//! protocol matrix, schemathesis against the generated OpenAPI document,
//! and the CLI over `--url`.

use std::process::Command;

use crate::support::{
    open_subscribe, python, read_until, run_python, sse_ids, stderr, stdout, Daemon,
};

#[test]
fn every_protocol_reaches_every_other() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "http_matrix.py"));
}

#[test]
fn long_poll_wakes_on_send_and_cursors_never_skip() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "long_poll.py"));
}

#[test]
fn a_thousand_sse_subscribers_all_get_a_broadcast() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "sse_fanout.py"));
}

#[test]
fn sse_resumes_with_last_event_id_and_poll_shares_the_cursor() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "sse_resume.py"));
}

#[test]
fn http_limits_and_errors_are_json() {
    let d = Daemon::start();
    println!("{}", run_python(&d, "http_limits.py"));
}

/// schemathesis generates requests from `/v1/openapi.json` and checks every
/// response: no server errors, and nothing that breaks the schema.
#[test]
fn schemathesis_finds_no_server_errors_or_schema_violations() {
    // Long-polls answer at once here, so the generated `wait`s stay fast.
    let d = Daemon::start_with(&["--long-poll-max", "0"], &[]);
    let st = python().with_file_name("schemathesis");
    let out = Command::new(st)
        .args(["run", &format!("{}/v1/openapi.json", d.http)])
        .args(["--checks", "all", "--workers", "1", "--max-examples", "60"])
        // `DELETE /v1/agents/{name}/subscriptions` removes one pattern from
        // a list that stays (its `GET` answers 200 with what is left);
        // this check reads any 2xx DELETE as the whole path gone.
        .args(["--exclude-checks", "use_after_free"])
        .args(["--seed", "1"])
        // The SSE stream never ends by design; it has its own tests.
        .args(["--exclude-operation-id", "event_stream"])
        .env("NO_COLOR", "1")
        .current_dir(d.data_dir()) // its cache stays out of the source tree
        .output()
        .expect("run schemathesis");
    let report = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}"
    );
    assert!(report.contains("passed"), "{report}");
}

#[test]
fn cli_sends_and_receives_over_http() {
    let d = Daemon::start();
    let run = |args: &[&str]| {
        Command::new(crate::support::HERMOD)
            .args(args)
            .env("HERMOD_URL", &d.http)
            .env_remove("HERMOD_SOCKET")
            .env_remove("AGENT_NAME")
            .output()
            .unwrap()
    };
    let out = run(&["send", "--from", "web", "httpbob", "über HTTP ✓"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["recv", "--count", "1", "--timeout", "20", "httpbob"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("Z] from web [") && text.ends_with("] (default): über HTTP ✓\n"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
    // Acknowledged over HTTP too: nothing left.
    let out = run(&["recv", "--timeout", "1", "httpbob"]);
    assert_eq!(out.status.code(), Some(124));
    // AGENT_BUS_URL works as well, and the Unix socket sees the same store.
    let out = Command::new(crate::support::HERMOD)
        .args(["send", "httpbob", "via agent-bus env"])
        .env("AGENT_BUS_URL", &d.http)
        .env_remove("HERMOD_URL")
        .env_remove("HERMOD_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&[
        "recv",
        "--json",
        "--count",
        "1",
        "--timeout",
        "20",
        "httpbob",
    ]);
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(line["body"]["text"], "via agent-bus env");
}

/// `POST /v1/messages` with an array: one commit, one outcome per element
/// in order; a malformed element refuses the whole request.
#[test]
fn batch_ingest_answers_per_message_and_keeps_order() {
    let d = Daemon::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let mut batch: Vec<serde_json::Value> = (0..300)
            .map(|n| serde_json::json!({"from": "loader", "to": "bulk", "body": {"n": n}}))
            .collect();
        let post = |batch: &Vec<serde_json::Value>| {
            http.post(format!("{}/v1/messages", d.http))
                .json(batch)
                .send()
        };
        let good = batch[7].clone();
        batch[7] = serde_json::json!({"from": "no spaces", "to": "bulk", "body": {}});
        let r = post(&batch).await.unwrap();
        assert_eq!(r.status(), 400);
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["code"], "invalid_name");
        assert!(
            e["error"].as_str().unwrap().starts_with("message 7:"),
            "{e}"
        );
        batch[7] = good;
        let r = post(&batch).await.unwrap();
        assert_eq!(r.status(), 200);
        let out: Vec<serde_json::Value> = r.json().await.unwrap();
        assert_eq!(out.len(), 300);
        let seqs: Vec<u64> = out
            .iter()
            .map(|o| o["seq"].as_u64().expect("a receipt"))
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "stored in order");
        let page: serde_json::Value = http
            .get(format!(
                "{}/v1/agents/bulk/inbox?after=0&limit=1000",
                d.http
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"]["n"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = (0..300).collect();
        assert_eq!(got, want, "nothing of the refused request was stored");
        // Over the limit: refused whole, nothing stored.
        let too_many: Vec<serde_json::Value> = (0..1001)
            .map(|n| serde_json::json!({"from": "loader", "to": "bulk", "body": {"n": n}}))
            .collect();
        let r = post(&too_many).await.unwrap();
        assert_eq!(r.status(), 400);
    });
}

/// A `/subscribe` reader that stops reading while 100,000 messages flow,
/// then reconnects without `Last-Event-ID`, receives every one of them.
#[test]
fn a_stalled_subscribe_reader_loses_nothing() {
    let d = Daemon::start_with(&["--http-write-timeout", "2", "--send-rate", "0"], &[]);
    println!("{}", run_python(&d, "stalled_subscribe.py"));
}

// Seen in issue 21: `/recv` answered a `now` below the `ts` of messages it
// returned (the clock was read before the batch), so a reader that follows
// `since=now` got some messages twice (3 of 6,000 with max=7 and 4 senders).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_since_now_never_hands_a_message_out_twice() {
    const SENDERS: usize = 4;
    const EACH: usize = 1500;
    let d = Daemon::start_with(&["--send-rate", "0"], &[]);
    let http = reqwest::Client::new();
    let url = d.http.clone();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let body = serde_json::json!({"from": format!("s{s}"), "to": "reader", "msg": format!("{s}-{i}")});
                    let r = http.post(format!("{url}/send")).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    let mut since = 0.0_f64;
    let mut seen = std::collections::HashSet::new();
    let mut twice = Vec::new();
    while seen.len() < SENDERS * EACH {
        let r: serde_json::Value = http
            .get(format!("{url}/recv?to=reader&max=7&since={since}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for m in r["messages"].as_array().unwrap() {
            let text = m["msg"].as_str().unwrap().to_owned();
            assert!(
                m["ts"].as_f64().unwrap() <= r["now"].as_f64().unwrap(),
                "{r}"
            );
            if !seen.insert(text.clone()) {
                twice.push(text);
            }
        }
        since = r["now"].as_f64().unwrap();
    }
    for s in senders {
        s.await.unwrap();
    }
    assert!(twice.is_empty(), "handed out twice: {twice:?}");
}

// Issue 21: a `/subscribe` reader with a 4 KiB receive buffer stopped
// reading while senders ran, then went away and reconnected without
// `Last-Event-ID`: a batch counted as delivered once it was in the kernel's
// send buffer, and what sat there died with the connection (14,792 of
// 156,640 messages in the issue). Now a batch is confirmed only once the
// peer's TCP stack acknowledged it. The reader takes *everything* its
// kernel acknowledged (with MSG_PEEK, so its window stays shut and nothing
// more arrives), then closes with that unread, which resets the connection
// and drops the daemon's send buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscribe_reader_that_leaves_loses_nothing_in_kernel_buffers() {
    const AGENT: &str = "staller";
    const BATCH: usize = 500;
    let d = Daemon::start_with(&["--http-write-timeout", "60", "--send-rate", "0"], &[]);
    let (http, url) = (reqwest::Client::new(), d.http.clone());
    let send = move |first: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let count = if first == 0 { 1 } else { BATCH };
            let body: Vec<_> = (first..first + count)
                .map(|n| serde_json::json!({"from": "flood", "to": AGENT, "body": {"n": n, "pad": "x".repeat(150)}}))
                .collect();
            let r = http
                .post(format!("{url}/v1/messages"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let out: Vec<serde_json::Value> = r.json().await.unwrap();
            out.iter()
                .map(|o| o["seq"].as_u64().expect("stored"))
                .collect::<Vec<u64>>()
        }
    };

    let mut tcp = open_subscribe(&d.http, AGENT, Some(4096));
    let mut raw = Vec::new();
    let mut sent = send(0).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    read_until(&mut tcp, &mut raw, deadline, |ids| !ids.is_empty());
    assert!(
        !sse_ids(&raw).is_empty(),
        "the live stream delivered nothing"
    );
    // Stop reading; two senders run for a bounded while.
    let started = std::time::Instant::now();
    let senders: Vec<_> = (0..2)
        .map(|s| {
            let send = send.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for b in 0..60 {
                    if started.elapsed() > std::time::Duration::from_secs(3) {
                        break;
                    }
                    seqs.extend(send((1 + s * 60 + b) * BATCH).await);
                }
                seqs
            })
        })
        .collect();
    for s in senders {
        sent.extend(s.await.unwrap());
    }
    // Let the daemon write what it can.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut held = vec![0u8; 1 << 20];
    let n = tcp.peek(&mut held).unwrap();
    raw.extend_from_slice(&held[..n]);
    let first = sse_ids(&raw);
    assert!(
        first.len() * 2 < sent.len(),
        "the reader did not stall: {} of {}",
        first.len(),
        sent.len()
    );
    drop(tcp);

    let mut missing: std::collections::BTreeSet<u64> = sent.iter().copied().collect();
    for id in &first {
        missing.remove(id);
    }
    let mut tcp = open_subscribe(&d.http, AGENT, None);
    let mut raw = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    read_until(&mut tcp, &mut raw, deadline, |ids| {
        missing.iter().all(|m| ids.contains(m))
    });
    let second: std::collections::HashSet<u64> = sse_ids(&raw).into_iter().collect();
    let lost: Vec<u64> = missing
        .iter()
        .filter(|m| !second.contains(m))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} messages lost (first stream {}, second {}), e.g. {:?}",
        lost.len(),
        sent.len(),
        first.len(),
        second.len(),
        &lost[..lost.len().min(5)]
    );
}

/// Opens `/subscribe` for `agent` with a `Last-Event-ID` header.
fn open_subscribe_from(http: &str, agent: &str, last_event_id: u64) -> std::net::TcpStream {
    use std::io::Write;
    let addr = http.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "GET /subscribe?agent={agent} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
         Last-Event-ID: {last_event_id}\r\n\r\n"
    )
    .unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    tcp
}

// Seen by the history checker (seed 4): a `/subscribe` resumed with an
// older `Last-Event-ID` replayed everything after it up to the cursor,
// including what `/poll` had already handed out: twice. A resume replays
// what no other door read (the message's `read` step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_subscribe_never_replays_what_poll_handed_out() {
    const AGENT: &str = "resumer";
    let d = Daemon::start_with(&["--send-rate", "0"], &[]);
    let (http, url) = (reqwest::Client::new(), d.http.clone());
    let send = |n: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = serde_json::json!({"from": "src", "to": AGENT, "body": {"n": n}});
            let r: serde_json::Value = http
                .post(format!("{url}/v1/messages"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["seq"].as_u64().expect("stored")
        }
    };
    let cursor = || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let v: serde_json::Value = http
                .get(format!("{url}/v1/agents/{AGENT}/inbox?limit=1"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["cursor"].as_u64().unwrap()
        }
    };
    let deadline = || std::time::Instant::now() + std::time::Duration::from_secs(10);

    // Three messages read by a stream, confirmed (the stored cursor moved).
    let mut streamed = Vec::new();
    for n in 0..3 {
        streamed.push(send(n).await);
    }
    let mut tcp = open_subscribe(&d.http, AGENT, None);
    let mut raw = Vec::new();
    read_until(&mut tcp, &mut raw, deadline(), |ids| {
        streamed.iter().all(|s| ids.contains(s))
    });
    assert_eq!(sse_ids(&raw), streamed);
    let until = deadline();
    while cursor().await < streamed[2] {
        assert!(
            std::time::Instant::now() < until,
            "the stream never confirmed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(tcp);

    // Two more, handed out by /poll.
    let polled = vec![send(3).await, send(4).await];
    let got: Vec<serde_json::Value> = http
        .get(format!("{url}/poll?agent={AGENT}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got_ids: std::collections::HashMap<u64, String> = got
        .iter()
        .map(|m| {
            let meta = &m["_meta"];
            (
                meta["seq"].as_u64().unwrap(),
                meta["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let got: Vec<u64> = got
        .iter()
        .map(|m| m["_meta"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, polled);
    // The poll's `read` steps are recorded behind its answer: wait for
    // them (without one a resume replays, rather than risk a loss).
    for seq in &polled {
        let id = got_ids[seq].clone();
        let until = deadline();
        loop {
            let v: serde_json::Value = http
                .get(format!("{url}/v1/messages/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v.to_string().contains("\"read\"") {
                break;
            }
            assert!(std::time::Instant::now() < until, "never read: {v}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    // Resumed from the first: the stream's own reads come again, the
    // polled ones never; then it goes on live.
    let mut tcp = open_subscribe_from(&d.http, AGENT, streamed[0]);
    let live = send(5).await;
    let mut raw = Vec::new();
    read_until(&mut tcp, &mut raw, deadline(), |ids| ids.contains(&live));
    assert_eq!(
        sse_ids(&raw),
        [streamed[1], streamed[2], live],
        "polled {polled:?}"
    );
}

// Seen by the `http` fuzz target: a plain GET to a WebSocket route (no
// `Connection: upgrade`) was answered with axum's plain-text rejection,
// though errors everywhere are JSON with a code (README, "The v1 API").
#[tokio::test]
async fn websocket_routes_refuse_a_plain_request_with_json() {
    let d = Daemon::start();
    let http = reqwest::Client::new();
    for path in ["/v1/agents/bob/ws", "/api/pub", "/api/events"] {
        let r = http.get(format!("{}{path}", d.http)).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{path}: {text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        assert_eq!(v["code"], "invalid_request", "{path}: {text}");
        assert!(v["error"].is_string(), "{path}: {text}");
    }
}
