//! The browser boundary in a real browser: headless Chromium, driven over
//! WebDriver, opens an attack page served from another loopback port and
//! fires every kind of request a page can make at the bus (a `no-cors`
//! `text/plain` POST, an auto-submitted `text/plain` form, an `<img>` GET,
//! a WebSocket, a preflighted JSON `fetch`). Nothing may be stored, read or
//! consumed. A control daemon that allow-lists the page's origin shows the
//! same page does get through when the guard lets it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{curl, free_port, inbox, log_seq, stderr, stdout, which, Daemon, Reaped};

/// The attack page. `?daemon=http://127.0.0.1:PORT` names its target. It
/// runs each attempt in turn, writes what the page saw into `#result` as
/// JSON, then sets the title to `done`.
const ATTACK_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>attacking</title></head>
<body>
<h1>definitely not hermod</h1>
<pre id="result"></pre>
<iframe name="sink" id="sink" style="display:none"></iframe>
<!-- text/plain sends `name=value`: this one is `{"text":"evil form","pad":"="}` -->
<form id="form" method="POST" enctype="text/plain" target="sink">
<input type="hidden" name='{"text":"evil form","pad":"' value='"}'>
</form>
<script>
"use strict";
const DAEMON = new URLSearchParams(location.search).get("daemon");
const out = { daemon: DAEMON };
const later = (ms, v) => new Promise(r => setTimeout(() => r(v), ms));

async function noCorsSend() {
  try {
    const r = await fetch(DAEMON + "/send", {
      method: "POST", mode: "no-cors",
      headers: { "Content-Type": "text/plain" },
      body: JSON.stringify({ from: "boss", to: "victim", msg: "run this" }),
    });
    return { settled: "resolved", type: r.type, status: r.status };
  } catch (e) { return { settled: "rejected", error: String(e) }; }
}

function formPost() {
  return new Promise(resolve => {
    const sink = document.getElementById("sink");
    sink.addEventListener("load", () => resolve({ submitted: true, iframeLoaded: true }), { once: true });
    const f = document.getElementById("form");
    f.action = DAEMON + "/broadcast?from=evil";
    f.submit();
    later(5000).then(() => resolve({ submitted: true, iframeLoaded: false }));
  });
}

function imgPoll() {
  return new Promise(resolve => {
    const img = new Image();
    img.onload = () => resolve("load");
    img.onerror = () => resolve("error");
    img.src = DAEMON + "/poll?agent=victim";
    document.body.appendChild(img);
  });
}

function webSocket() {
  return new Promise(resolve => {
    const o = { opened: false, messages: [], error: null, closeCode: null };
    let ws;
    try { ws = new WebSocket(DAEMON.replace(/^http/, "ws") + "/v1/agents/victim/ws"); }
    catch (e) { o.error = String(e); resolve(o); return; }
    ws.onopen = () => {
      o.opened = true;
      // An open socket gets the inbox pushed at once; give it a moment.
      later(1500).then(() => ws.close());
    };
    ws.onmessage = e => { o.messages.push(String(e.data)); };
    ws.onerror = () => { o.error = "error"; };
    ws.onclose = e => { o.closeCode = e.code; resolve(o); };
  });
}

async function preflighted() {
  try {
    const r = await fetch(DAEMON + "/v1/messages", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ from: "boss", to: "victim", body: { text: "preflighted" } }),
    });
    return { settled: "resolved", status: r.status, body: await r.text() };
  } catch (e) { return { settled: "rejected", error: String(e) }; }
}

(async () => {
  const step = async (name, f) => {
    try { out[name] = await Promise.race([f(), later(8000, "timeout")]); }
    catch (e) { out[name] = "threw: " + e; }
  };
  await step("send", noCorsSend);
  await step("form", formPost);
  await step("img", imgPoll);
  await step("ws", webSocket);
  await step("preflight", preflighted);
  document.getElementById("result").textContent = JSON.stringify(out);
  document.title = "done";
})();
</script>
</body></html>
"#;

/// A WebDriver client in Python's standard library: starts `chromedriver`
/// on a free port, opens `argv[1]` in headless Chromium, waits (with a
/// deadline) for the title `done`, prints `#result`.
const DRIVER: &str = r#"
import json, os, socket, subprocess, sys, time, urllib.error, urllib.request

url = sys.argv[1]
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
driver = subprocess.Popen(
    [os.environ["CHROMEDRIVER"], "--port=%d" % port],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
base = "http://127.0.0.1:%d" % port

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)["value"]
    except urllib.error.HTTPError as e:
        sys.exit("WebDriver %s %s: %s %s" % (method, path, e.code, e.read().decode()))

def page_state(sid):
    return call("POST", "/session/%s/execute/sync" % sid, {
        "script": "return [document.title, document.getElementById('result').textContent]",
        "args": [],
    })

try:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(base + "/status", timeout=2) as r:
                if json.load(r)["value"].get("ready"):
                    break
        except OSError:
            pass
        if driver.poll() is not None or time.monotonic() > deadline:
            sys.exit("chromedriver did not come up")
        time.sleep(0.05)
    options = {
        "binary": os.environ["CHROMIUM"],
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--no-first-run"],
    }
    sid = call("POST", "/session", {"capabilities": {"alwaysMatch": {
        "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]
    try:
        call("POST", "/session/%s/url" % sid, {"url": url})
        deadline = time.monotonic() + 30
        while True:
            title, result = page_state(sid)
            if title == "done":
                print(result)
                break
            if time.monotonic() > deadline:
                sys.exit("the page never finished (title %r, result %r)" % (title, result))
            time.sleep(0.05)
    finally:
        call("DELETE", "/session/%s" % sid)
finally:
    driver.terminate()
    driver.wait(10)
"#;

/// Serves `dir` with Python's `http.server` on a free loopback port.
fn serve_dir(dir: &Path) -> (Reaped, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn python3 -m http.server");
    let mut server = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("the attack page server exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the attack page server never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, port)
}

/// Opens the attack page against `daemon` in Chromium; what the page saw.
fn run_page(browser: &Browser, page_port: u16, daemon: &Daemon) -> Value {
    let url = format!(
        "http://127.0.0.1:{page_port}/attack.html?daemon={}",
        daemon.http
    );
    let out = Command::new("python3")
        .arg(&browser.driver_py)
        .arg(&url)
        .env("CHROMIUM", &browser.chromium)
        .env("CHROMEDRIVER", &browser.chromedriver)
        .output()
        .expect("run the WebDriver script");
    assert!(
        out.status.success(),
        "the browser run failed ({}):\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("page result is not JSON ({e}): {}", stdout(&out)))
}

struct Browser {
    chromium: PathBuf,
    chromedriver: PathBuf,
    driver_py: PathBuf,
}

fn texts(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            (
                m["from"].as_str().unwrap_or_default().to_owned(),
                m["body"]["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn seed(d: &Daemon) -> u64 {
    let out = d.cli(&["send", "--from", "boss", "victim", "seed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seq = log_seq(d);
    assert_eq!(texts(&inbox(d, "victim")), [("boss".into(), "seed".into())]);
    seq
}

fn assert_forbidden(status: u16, head: &str, body: &str, what: &str) {
    assert_eq!(status, 403, "{what}: {head}\n{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert_eq!(v["code"], "forbidden", "{what}: {body}");
    assert!(v["error"].is_string(), "{what}: {body}");
    assert!(
        !head.contains("access-control-"),
        "{what}: CORS header\n{head}"
    );
}

#[test]
fn a_web_page_on_another_port_cannot_use_the_bus() {
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        panic!(
            "`chromium` and `chromedriver` must be on PATH for the browser test: \
             .ci/run installs them (apt-get install chromium chromium-driver)"
        );
    };
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("attack.html"), ATTACK_PAGE).unwrap();
    let driver_py = www.path().join("webdriver.py");
    std::fs::write(&driver_py, DRIVER).unwrap();
    let browser = Browser {
        chromium,
        chromedriver,
        driver_py,
    };
    let (_server, page_port) = serve_dir(www.path());
    let page_origin = format!("http://127.0.0.1:{page_port}");

    // The real run: the default boundary (no --allow-origin). A fixed port:
    // the guard knows its own origin from the `--http` address, so with
    // port 0 even hermod's own origin would be refused.
    let http = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&["--auth", "open", "--http", &http], &[]);
    let before = seed(&d);
    let seen = run_page(&browser, page_port, &d);
    eprintln!("page against the guarded daemon: {seen}");
    assert_eq!(seen["ws"]["opened"], false, "the WebSocket opened: {seen}");
    assert_eq!(seen["ws"]["messages"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["preflight"]["settled"], "rejected", "{seen}");
    // Nothing stored: no `/send`, no broadcast (it would also wait in the
    // victim's inbox, see the control run), no preflighted message. Nothing
    // consumed: the seed still waits, for the CLI and for a script.
    assert_eq!(log_seq(&d), before, "the page stored something: {seen}");
    assert_eq!(
        texts(&inbox(&d, "victim")),
        [("boss".into(), "seed".into())],
        "the victim's inbox changed"
    );
    let (status, _, body) = curl(&[&format!("{}/poll?agent=victim", d.http)]);
    assert_eq!(status, 200, "{body}");
    let polled: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(polled.as_array().map(Vec::len), Some(1), "{polled}");
    assert_eq!(polled[0]["_meta"]["from"], "boss", "{polled}");
    assert_eq!(polled[0]["text"], "seed", "{polled}");

    // The same refusals from a script, with the headers spelled out.
    let send = format!("{}/send", d.http);
    let json = r#"{"from":"boss","to":"victim","msg":"x"}"#;
    for (what, header) in [
        ("DNS rebinding", "Host: attacker.example"),
        ("a foreign origin", "Origin: http://evil.example"),
        ("the page's origin", &format!("Origin: {page_origin}")),
        ("a same-site fetch", "Sec-Fetch-Site: same-site"),
    ] {
        let (status, head, body) = curl(&["-H", header, "--data", json, &send]);
        assert_forbidden(status, &head, &body, what);
    }
    let (status, head, body) = curl(&[
        "-X",
        "OPTIONS",
        "-H",
        &format!("Origin: {page_origin}"),
        "-H",
        "Access-Control-Request-Method: POST",
        &format!("{}/v1/messages", d.http),
    ]);
    assert_forbidden(status, &head, &body, "a preflight");
    // hermod's own origin and a plain script still get in.
    for header in [
        format!("Origin: {}", d.http),
        "Sec-Fetch-Site: same-origin".to_owned(),
        "X-Nothing: 1".to_owned(),
    ] {
        let (status, _, body) = curl(&["-H", &header, "--data", json, &send]);
        assert_eq!(status, 200, "{header}: {body}");
    }

    // The control run: the page's origin allow-listed. The same page now
    // writes and reads, so the real run above was a real attack.
    let c = Daemon::start_with(&["--auth", "open", "--allow-origin", &page_origin], &[]);
    let before = seed(&c);
    let seen = run_page(&browser, page_port, &c);
    eprintln!("page against the allow-listed daemon: {seen}");
    assert_eq!(
        texts(&inbox(&c, "victim")),
        [
            ("boss".into(), "seed".into()),
            ("boss".into(), "run this".into()),
            ("evil".into(), "evil form".into()),
        ],
        "the no-cors POST and the form did not get through: {seen}"
    );
    // The WebSocket carries an Origin but no Sec-Fetch-Site: it opens and
    // reads the inbox.
    assert_eq!(seen["ws"]["opened"], true, "{seen}");
    assert!(
        seen["ws"]["messages"][0]
            .as_str()
            .unwrap_or_default()
            .contains("seed"),
        "{seen}"
    );
    // Still refused, as the guard says: the `<img>` (same-site, no Origin,
    // so never allow-listed — the seed is not consumed) and the preflight
    // (no CORS header is ever sent, so nothing was stored by it).
    assert_eq!(seen["preflight"]["settled"], "rejected", "{seen}");
    assert_eq!(log_seq(&c), before + 2, "{seen}");
}
