//! The HTTP connection limits, black-box: a flood of idle and half-sent
//! connections neither starves the Unix socket nor other HTTP clients, and
//! the server closes every one of them within its timeouts; the connection
//! cap answers 503 JSON; a trickling body gets 408 JSON.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{stderr, Daemon};

/// Header timeout of the flood daemon, seconds.
const HEADER: u64 = 2;
/// Idle timeout of the flood daemon, seconds.
const IDLE: u64 = 3;
/// Slack on top of a timeout before a still-open socket fails the test.
const MARGIN: Duration = Duration::from_millis(2500);

fn addr(d: &Daemon) -> SocketAddr {
    d.http.trim_start_matches("http://").parse().unwrap()
}

/// Raises this test process's soft fd limit to its hard one (2,000 sockets
/// plus the harness's own).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// One request on its own connection; the whole response as text.
fn request(addr: SocketAddr, raw: &str) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the server has closed every socket (read gives EOF or an
/// error), by `deadline`; returns how many are still open then.
fn wait_closed(socks: &mut Vec<TcpStream>, deadline: Instant) -> usize {
    let mut buf = [0u8; 512];
    loop {
        socks.retain_mut(|s| match s.read(&mut buf) {
            Ok(0) => false,
            Ok(_) => true, // an answer (none is expected): wait for the close
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Err(_) => false,
        });
        if socks.is_empty() || Instant::now() > deadline {
            return socks.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_connection_flood_starves_nobody_and_is_closed_by_the_timeouts() {
    raise_fd_limit();
    let header = HEADER.to_string();
    let idle = IDLE.to_string();
    let d = Daemon::start_with(
        &[
            "--http-header-timeout",
            &header,
            "--http-idle-timeout",
            &idle,
            "--http-body-timeout",
            "1",
        ],
        &[],
    );
    let addr = addr(&d);
    let started = Instant::now();
    let mut idle_socks = Vec::new();
    let mut half_socks = Vec::new();
    for i in 0..2000 {
        let mut s = TcpStream::connect(addr).unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            half_socks.push(s);
        } else {
            idle_socks.push(s);
        }
    }
    let opened = started.elapsed();

    // While all 2,000 are open, the Unix socket and HTTP still answer.
    let out = d.cli(&["send", "--from", "a", "b", "hi"]);
    assert!(out.status.success(), "unix send failed: {}", stderr(&out));
    let health = request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = r#"{"from":"a","to":"b","msg":"over http"}"#;
    let sent = request(
        addr,
        &format!(
            "POST /send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");

    // A body that stops coming: 408 JSON after the body timeout.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(
        b"POST /send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"from\":",
    )
    .unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let _ = slow.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""code":"request_timeout""#), "{text}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "408 after {:?}",
        t0.elapsed()
    );

    // Every flood connection is closed by the server, half-sent heads at
    // the header timeout, idle ones at the idle timeout (both counted from
    // their connect, at the latest `started + opened`).
    for s in idle_socks.iter().chain(&half_socks) {
        s.set_nonblocking(true).unwrap();
    }
    let half_by = started + opened + Duration::from_secs(HEADER) + MARGIN;
    let left = wait_closed(&mut half_socks, half_by);
    assert_eq!(
        left,
        0,
        "half-sent connections still open {:?} after the first connect",
        started.elapsed()
    );
    let idle_by = started + opened + Duration::from_secs(IDLE) + MARGIN;
    let left = wait_closed(&mut idle_socks, idle_by);
    assert_eq!(
        left,
        0,
        "idle connections still open {:?} after the first connect",
        started.elapsed()
    );
    println!(
        "2,000 connections opened in {opened:?}, all closed by the server {:?} after the first",
        started.elapsed()
    );
}

#[test]
fn a_connection_over_the_cap_gets_503_json() {
    let d = Daemon::start_with(&["--http-max-connections", "3"], &[]);
    let addr = addr(&d);
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // The cap counts connections the server has accepted: wait until the
    // three are in (a fourth then gets 503), polling with a bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = request(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        if text.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains(r#""code":"too_many_connections""#), "{text}");
    drop(held);
    // Once they close, requests are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = request(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        if text.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
