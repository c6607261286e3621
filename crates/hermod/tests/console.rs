//! The web console in a real browser: headless Chromium, driven over
//! WebDriver (`chromedriver`), against the real daemon, with agents on the
//! real CLI and the PyPI hermes-bus client. Each screen is saved as a PNG
//! under `target/console-shots/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    curl, free_port, inbox, log_seq, run_python_with, stderr, stdout, which, Daemon, Reaped, HERMOD,
};

/// One headless Chromium session over WebDriver (plain HTTP JSON calls).
struct Browser {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: Reaped,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver"))
        else {
            panic!(
                "`chromium` and `chromedriver` must be on PATH for the console test: \
                 .ci/run installs them (apt-get install chromium chromium-driver)"
            );
        };
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = rt.block_on(async {
                let r = http.get(format!("{base}/status")).send().await.ok()?;
                let v: Value = r.json().await.ok()?;
                v["value"]["ready"].as_bool()
            });
            if ready == Some(true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser {
            rt,
            http,
            base,
            session: String::new(),
            _driver: Reaped(driver),
            _profile: profile,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--no-first-run",
                     "--window-size=1400,1000",
                     format!("--user-data-dir={}", b._profile.path().display())],
        }}}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().unwrap().to_owned();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let http = &self.http;
        self.rt.block_on(async {
            let req = match method {
                "GET" => http.get(&url),
                "DELETE" => http.delete(&url),
                _ => http.post(&url).json(&body.unwrap_or(json!({}))),
            };
            let resp = req.send().await.expect("WebDriver call");
            let status = resp.status();
            let v: Value = resp.json().await.expect("WebDriver JSON");
            assert!(
                status.is_success(),
                "WebDriver {method} {path}: {status} {v}"
            );
            v["value"].clone()
        })
    }

    fn s(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    fn go(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.call("GET", &self.s("/url"), None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The page's visible text.
    fn text(&self) -> String {
        self.js("return document.body ? document.body.innerText : ''")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn source(&self) -> String {
        self.call("GET", &self.s("/source"), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until `script` returns true.
    fn wait_for(&self, script: &str, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        while self.js(script) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "{what} (after {within:?}); page:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn click(&self, css: &str) {
        let el = self.call(
            "POST",
            &self.s("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_owned();
        self.call(
            "POST",
            &self.s(&format!("/element/{id}/click")),
            Some(json!({})),
        );
    }

    fn cookies(&self) -> Vec<Value> {
        self.call("GET", &self.s("/cookie"), None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Saves the viewport as `target/console-shots/<name>.png`.
    fn shot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let png = self.call("GET", &self.s("/screenshot"), None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = shots_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = self
                .rt
                .block_on(async { self.http.delete(url).send().await });
        }
    }
}

fn shots_dir() -> PathBuf {
    // HERMOD is <target>/<profile>/hermod.
    Path::new(HERMOD)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("console-shots")
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// `hermod send`; the stored message's id.
fn send(d: &Daemon, args: &[&str]) -> String {
    let mut all = vec!["send"];
    all.extend_from_slice(args);
    let out = ok(d.cli(&all));
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// A fresh one-time login link from `hermod console --no-open`.
fn link(d: &Daemon) -> String {
    let out = ok(d.cli(&["console", "--no-open"]));
    let link = out.trim().to_owned();
    assert!(
        link.starts_with(&format!("{}/console/login/", d.http)),
        "{link}"
    );
    link
}

const CONFIG: &str = r#"
[guard]
turns = 2
cooldown = 600

[[action]]
kind = "append"
path = "WAKE"
to = "bob"
"#;

#[test]
fn the_console_in_a_real_browser() {
    let wake_dir = tempfile::tempdir().unwrap();
    let wake = wake_dir.path().join("bob-wake.jsonl");
    let config = CONFIG.replace("WAKE", &wake.display().to_string());
    let d = Daemon::start_with_args_config(&["--console-operator", "ops-desk"], &[], &config);
    // Known agents, before anyone logs in.
    send(&d, &["--from", "alice", "bob", "hello bob"]);
    // (Not bob → alice: with `turns = 2` the guard would hold the pair.)
    send(&d, &["--from", "dave", "alice", "hello alice"]);
    let b = Browser::start();
    let mut shots = Vec::new();

    // No session: 401, a page saying what to run, no bus data.
    let (status, head, body) = curl(&[&format!("{}/console", d.http)]);
    assert_eq!(status, 401, "{head}{body}");
    assert!(body.contains("hermod console"), "{body}");
    for name in ["alice", "bob"] {
        assert!(
            !body.contains(name),
            "{name} shown without a session: {body}"
        );
    }
    for path in [
        "/console/agents",
        "/console/feed",
        "/console/holds",
        "/console/messages/x",
    ] {
        let (status, _, body) = curl(&[&format!("{}{path}", d.http)]);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(!body.contains("alice"), "{path}: {body}");
    }
    b.go(&format!("{}/console", d.http));
    let page = b.text();
    assert!(
        page.contains("hermod console") && !page.contains("alice"),
        "{page}"
    );
    shots.push(b.shot("login-needed"));

    // The printed link logs in once and lands on the overview.
    let first = link(&d);
    b.go(&first);
    assert_eq!(b.url(), format!("{}/console", d.http));
    b.wait_for(
        "return document.getElementById('known') !== null",
        Duration::from_secs(5),
        "no overview",
    );
    let known = b.js("return document.getElementById('known').innerText");
    let known = known.as_str().unwrap();
    assert!(known.contains("alice") && known.contains("bob"), "{known}");
    let cookie = b
        .cookies()
        .into_iter()
        .find(|c| c["name"] == "hermod_console")
        .expect("a session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(cookie["path"], "/console", "{cookie}");
    let session = cookie["value"].as_str().unwrap().to_owned();
    assert_eq!(
        b.js("return document.cookie"),
        json!(""),
        "the page's script can read the cookie"
    );
    // Second use of the link: refused, in the browser and from a script.
    let (status, _, body) = curl(&[&first]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("already used"), "{body}");

    // Every script, style and image comes from hermod itself.
    let foreign = b.js(&format!(
        "const own = {:?};
         const urls = [...performance.getEntriesByType('resource').map(e => e.name),
                       ...[...document.scripts].map(s => s.src),
                       ...[...document.querySelectorAll('link[href]')].map(l => l.href),
                       ...[...document.images].map(i => i.src)];
         return [urls.length, urls.filter(u => u && !u.startsWith(own + '/'))];",
        d.http
    ));
    assert!(foreign[0].as_u64().unwrap() >= 3, "{foreign}");
    assert_eq!(foreign[1], json!([]), "assets from elsewhere: {foreign}");
    let (_, head, _) = curl(&[
        "-H",
        &format!("Cookie: hermod_console={session}"),
        &format!("{}/console", d.http),
    ]);
    assert!(
        head.contains(
            "content-security-policy: default-src 'self'; script-src 'self'; style-src 'self'"
        ),
        "{head}"
    );

    // The live feed: a CLI message appears without a reload, and its badge
    // moves to `read` once the hermes-bus client reads it.
    b.wait_for(
        "return document.getElementById('feed-status').textContent === 'live'",
        Duration::from_secs(5),
        "the feed never connected",
    );
    b.js("window.notReloaded = true; return true");
    let text = format!("live check {}", std::process::id());
    let sent_at = Instant::now();
    let id = send(&d, &["--from", "alice", "bob", &text]);
    b.wait_for(
        &format!(
            "return [...document.querySelectorAll('#feed tr')].some(r => r.innerText.includes({text:?}))"
        ),
        Duration::from_secs(3),
        "the message never showed in the live feed",
    );
    eprintln!("feed row after {:?}", sent_at.elapsed());
    let badge_of = format!(
        "const r = [...document.querySelectorAll('#feed tr')].find(r => r.innerText.includes({text:?}));
         return r ? r.querySelector('.state').innerText : null"
    );
    assert_eq!(b.js(&badge_of), json!("stored"));
    run_python_with(
        &d,
        "console_reader.py",
        &[("AGENT", "bob"), ("TEXT", text.as_str())],
    );
    let is_read = format!(
        "const r = [...document.querySelectorAll('#feed tr')].find(r => r.innerText.includes({text:?}));
         return r !== undefined && r.querySelector('.state').innerText === 'read'"
    );
    b.wait_for(
        &is_read,
        Duration::from_secs(10),
        "the badge never moved to read",
    );
    assert_eq!(
        b.js("return window.notReloaded === true"),
        json!(true),
        "the page reloaded"
    );
    // Pause holds updates back; resume shows them.
    b.click("#pause");
    send(&d, &["--from", "alice", "bob", "sent while paused"]);
    let shown = "return [...document.querySelectorAll('#feed tr')].some(r => r.innerText.includes('sent while paused'))";
    b.wait_for(
        "return document.getElementById('feed-status').textContent.startsWith('paused · 1')",
        Duration::from_secs(3),
        "the paused feed did not count the update",
    );
    assert_eq!(b.js(shown), json!(false), "a paused feed showed a row");
    b.click("#pause");
    b.wait_for(shown, Duration::from_secs(1), "resume did not show the row");
    // The summary cards refresh themselves (every 5 s).
    b.wait_for(
        "return document.getElementById('summary').innerText.includes('4 in the last minute')",
        Duration::from_secs(8),
        "the summary never refreshed",
    );
    assert_eq!(
        b.js("return window.notReloaded === true"),
        json!(true),
        "the page reloaded"
    );
    shots.push(b.shot("overview"));

    // The message's page: the recipient and its steps with their doors.
    b.go(&format!("{}/console/messages/{id}", d.http));
    let page = b.text();
    assert!(page.contains("bob"), "{page}");
    // (Registered Unix delivery acknowledges as it hands out: `read`.)
    for step in ["stored", "read"] {
        assert!(page.contains(step), "no {step} step: {page}");
    }
    assert!(page.contains("via unix"), "no door: {page}");
    assert!(page.contains(&text), "no body: {page}");
    shots.push(b.shot("message"));

    // A hostile body is text, not markup.
    let evil = r#"<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>"#;
    let evil_id = send(&d, &["--from", "alice", "bob", evil]);
    b.go(&format!("{}/console/messages/{evil_id}", d.http));
    let page = b.text();
    assert!(
        page.contains("<script>window.pwned=2</script>") && page.contains("<img src=x onerror="),
        "{page}"
    );
    b.go(&format!("{}/console", d.http));
    assert!(b.text().contains("<img src=x"), "{}", b.text());
    assert_eq!(b.js("return window.pwned === undefined"), json!(true));

    // Compose: delivered with the operator as the sender, never the form's.
    b.go(&format!("{}/console/compose", d.http));
    b.js("const f = document.querySelector('form.compose');
         f.to.value = 'carol'; f.text.value = 'from the console';
         return true");
    shots.push(b.shot("compose"));
    // A `from` smuggled into the form changes nothing.
    b.js("const from = document.createElement('input');
         from.name = 'from'; from.value = 'alice'; from.type = 'hidden';
         document.querySelector('form.compose').appendChild(from);
         return true");
    b.click("form.compose button[type=submit]");
    b.wait_for(
        "return location.pathname.startsWith('/console/messages/')",
        Duration::from_secs(5),
        "compose did not land on the message",
    );
    let carol = inbox(&d, "carol");
    assert_eq!(carol.len(), 1, "{carol:?}");
    assert_eq!(carol[0]["from"], "ops-desk", "{carol:?}");
    assert_eq!(carol[0]["auth"], "owner", "{carol:?}");
    assert_eq!(carol[0]["body"]["text"], "from the console", "{carol:?}");

    // A reply makes a thread.
    send(
        &d,
        &[
            "--from",
            "carol",
            "--reply-to",
            carol[0]["id"].as_str().unwrap(),
            "ops-desk",
            "on it",
        ],
    );
    b.go(&format!("{}/console/threads", d.http));
    b.wait_for(
        "return document.querySelector('main table') !== null",
        Duration::from_secs(5),
        "no thread listed",
    );
    shots.push(b.shot("threads"));

    // The loop guard: ping and pong held; release from Holds delivers.
    send(&d, &["--from", "ping", "pong", "one"]);
    send(&d, &["--from", "pong", "ping", "two"]);
    send(&d, &["--from", "ping", "pong", "three (held)"]);
    send(&d, &["--from", "ping", "pong", "four (held)"]);
    let texts = |agent: &str| -> Vec<String> {
        inbox(&d, agent)
            .iter()
            .map(|m| m["body"]["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(
        !texts("pong").iter().any(|t| t.contains("(held)")),
        "{:?}",
        texts("pong")
    );
    b.go(&format!("{}/console/holds", d.http));
    let page = b.text();
    assert!(
        page.contains("ping") && page.contains("pong") && page.contains("2 message(s) held"),
        "{page}"
    );
    assert!(page.contains("three (held)"), "{page}");
    shots.push(b.shot("holds"));
    b.go(&format!("{}/console/agents", d.http));
    let page = b.text();
    assert!(
        page.contains("the loop guard holds 2 message(s) with pong"),
        "{page}"
    );
    shots.push(b.shot("agents"));
    b.go(&format!("{}/console/holds", d.http));
    b.click(".hold button[type=submit]");
    b.wait_for(
        "return document.body.innerText.includes('2 held message(s) went on')",
        Duration::from_secs(5),
        "release did not answer",
    );
    let pong = texts("pong");
    assert!(
        pong.contains(&"three (held)".to_owned()) && pong.contains(&"four (held)".to_owned()),
        "{pong:?}"
    );

    // Agents, grouped; nudge runs bob's wake-up action.
    b.go(&format!("{}/console/agents", d.http));
    let page = b.text();
    for name in ["alice", "bob", "carol", "ping", "pong"] {
        assert!(page.contains(name), "{name} missing: {page}");
    }
    b.click("form[action='/console/agents/nudge'] input[value='bob'] ~ button");
    b.wait_for(
        "return document.body.innerText.includes('nudged bob')",
        Duration::from_secs(5),
        "nudge did not answer",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = std::fs::read_to_string(&wake).unwrap_or_default();
        if lines
            .lines()
            .any(|l| l.contains(r#""type":"nudge""#) && l.contains("ops-desk"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no nudge in {lines}");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.go(&format!("{}/console/agents", d.http));
    assert!(b.text().contains("append worked"), "{}", b.text());

    // Writes need the session, the CSRF token and the same origin. A
    // cross-site form POST that carries the cookie stores nothing.
    b.go(&format!("{}/console/compose", d.http));
    let csrf = b.js("return document.querySelector('input[name=csrf]').value");
    let csrf = csrf.as_str().unwrap().to_owned();
    let before = log_seq(&d);
    let compose = format!("{}/console/compose", d.http);
    let cookie = format!("Cookie: hermod_console={session}");
    let form = format!("csrf={csrf}&to=bob&text=forged");
    let own = format!("Origin: {}", d.http);
    for (what, headers) in [
        (
            "a cross-site form",
            vec![
                cookie.as_str(),
                "Origin: http://evil.example",
                "Sec-Fetch-Site: cross-site",
            ],
        ),
        (
            "another localhost port",
            vec![
                cookie.as_str(),
                "Origin: http://127.0.0.1:9",
                "Sec-Fetch-Site: same-site",
            ],
        ),
        ("no Origin at all", vec![cookie.as_str()]),
        (
            "no session",
            vec![own.as_str(), "Sec-Fetch-Site: same-origin"],
        ),
    ] {
        let mut args: Vec<&str> = Vec::new();
        for h in &headers {
            args.extend(["-H", h]);
        }
        args.extend(["--data", &form, &compose]);
        let (status, head, body) = curl(&args);
        assert!(matches!(status, 401 | 403), "{what}: {head}{body}");
    }
    let bad_csrf = "csrf=nope&to=bob&text=forged";
    let (status, _, _) = curl(&["-H", &cookie, "-H", &own, "--data", bad_csrf, &compose]);
    assert_eq!(status, 403, "a wrong CSRF token");
    assert_eq!(log_seq(&d), before, "a refused write stored something");
    // The control: the same request from the console's origin is stored.
    let control = format!("csrf={csrf}&to=bob&text=a+write+with+session%2C+token+and+origin");
    let (status, head, body) = curl(&[
        "-H",
        &cookie,
        "-H",
        &own,
        "-H",
        "Sec-Fetch-Site: same-origin",
        "--data",
        &control,
        &compose,
    ]);
    assert_eq!(status, 303, "{head}{body}");
    assert_eq!(log_seq(&d), before + 1);
    // And a real page on another port, submitting a form in the browser.
    let www = tempfile::tempdir().unwrap();
    std::fs::write(
        www.path().join("attack.html"),
        format!(
            r#"<!doctype html><title>attack</title><form id=f method=post action="{compose}"><input name=csrf value="{csrf}"><input name=to value=bob><input name=text value=evil-browser></form><script>document.getElementById('f').submit()</script>"#
        ),
    )
    .unwrap();
    let page_port = free_port();
    let _server = Reaped(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &page_port.to_string(),
                "--directory",
            ])
            .arg(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", page_port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the attack page server never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seq = log_seq(&d);
    b.go(&format!("http://127.0.0.1:{page_port}/attack.html"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        log_seq(&d),
        seq,
        "the attack page stored something: {}",
        b.text()
    );
    assert!(!inbox(&d, "bob")
        .iter()
        .any(|m| m["body"]["text"] == "evil-browser"));

    // Filters: only ping's traffic, also what arrives live.
    b.go(&format!("{}/console?agent=ping", d.http));
    b.wait_for(
        "return document.getElementById('feed-status').textContent === 'live'",
        Duration::from_secs(5),
        "the filtered feed never connected",
    );
    send(&d, &["--from", "alice", "bob", "unrelated chatter"]);
    send(&d, &["--from", "carol", "ping", "about ping"]);
    b.wait_for(
        "return document.getElementById('feed').innerText.includes('about ping')",
        Duration::from_secs(3),
        "the filtered feed missed ping's message",
    );
    let rows =
        b.js("return [...document.querySelectorAll('#feed tr')].map(r => r.cells[1].innerText)");
    let rows: Vec<String> = serde_json::from_value(rows).unwrap();
    assert!(rows.len() >= 4, "{rows:?}");
    assert!(rows.iter().all(|r| r.contains("ping")), "{rows:?}");

    // --logout-all ends the session.
    b.go(&format!("{}/console", d.http));
    assert!(b.source().contains("id=\"known\""));
    shots.push(b.shot("overview-later"));
    let out = ok(d.cli(&["console", "--logout-all"]));
    assert!(out.contains("ended 1 console session"), "{out}");
    b.go(&format!("{}/console", d.http));
    assert!(b.text().contains("not logged in"), "{}", b.text());

    for shot in &shots {
        eprintln!("screenshot: {}", shot.display());
    }
}

/// A console page answers in under 100 ms with 100,000 messages stored.
#[test]
fn console_pages_stay_fast_over_100k_messages() {
    use std::io::Write;
    let d = Daemon::start();
    // Two inboxes: the default retention keeps 100,000 per inbox.
    send(&d, &["--from", "load", "sink0", "first"]);
    send(&d, &["--from", "load", "sink1", "first"]);
    // 100,000 legacy `message` frames down one socket: no replies to wait
    // for, the daemon batches them into few commits.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let mut buf = Vec::with_capacity(8 << 20);
    for i in 0..100_000 {
        let frame = serde_json::to_vec(&json!({
            "type": "message", "from": format!("load{}", i % 50), "to": format!("sink{}", i % 2),
            "body": {"text": format!("load message {i}")},
        }))
        .unwrap();
        buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        buf.extend_from_slice(&frame);
    }
    s.write_all(&buf).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while log_seq(&d) < 100_002 {
        assert!(Instant::now() < deadline, "only {} stored", log_seq(&d));
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(s);
    let id = send(&d, &["--from", "load", "sink0", "the one to look at"]);
    let link = link(&d);
    // (Not `curl()`: it lower-cases the head, and the cookie is not.)
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", &link])
        .output()
        .unwrap();
    let head = stdout(&out);
    let session = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("set-cookie")
                .then(|| value.trim().strip_prefix("hermod_console="))?
        })
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {head}"))
        .to_owned();
    let cookie = format!("Cookie: hermod_console={session}");
    let mut report = Vec::new();
    for path in [
        "/console".to_owned(),
        "/console/agents".to_owned(),
        format!("/console/messages/{id}"),
        "/console/threads".to_owned(),
        "/console/holds".to_owned(),
    ] {
        let url = format!("{}{path}", d.http);
        let mut times = Vec::new();
        for _ in 0..5 {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{time_total}",
                    "-H",
                    &cookie,
                    &url,
                ])
                .output()
                .unwrap();
            let out = stdout(&out);
            let (code, secs) = out.split_once(' ').unwrap();
            assert_eq!(code, "200", "{path}");
            times.push(secs.trim().parse::<f64>().unwrap() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let median = times[2];
        report.push(format!(
            "{path}: median {median:.1} ms (max {:.1} ms)",
            times[4]
        ));
        assert!(median < 100.0, "{path} took {median:.1} ms: {times:?}");
    }
    eprintln!(
        "console page latency with 100,003 messages stored:\n{}",
        report.join("\n")
    );
}

/// Sessions end when idle; console feeds are capped.
#[test]
fn console_sessions_expire_when_idle_and_feeds_are_capped() {
    use std::io::{BufRead, BufReader, Write};
    let d = Daemon::start_with(&["--console-idle", "3"], &[]);
    let link = link(&d);
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", &link])
        .output()
        .unwrap();
    let head = stdout(&out);
    let session = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("set-cookie")
                .then(|| value.trim().strip_prefix("hermod_console="))?
        })
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {head}"))
        .to_owned();
    let cookie = format!("Cookie: hermod_console={session}");
    let console = format!("{}/console", d.http);
    assert_eq!(curl(&["-H", &cookie, &console]).0, 200);
    // At most 16 feeds at once; the 17th is refused, not queued.
    let addr = d.http.trim_start_matches("http://").to_owned();
    let open = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET /console/feed HTTP/1.1\r\nHost: {addr}\r\n{cookie}\r\n\r\n"
        )
        .unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (s, line)
    };
    let feeds: Vec<_> = (0..16).map(|_| open()).collect();
    for (_, status) in &feeds {
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    let (_, status) = open();
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    drop(feeds);
    // A page's background refresh is answered but is not a use: unused for
    // longer than --console-idle, the session is gone.
    std::thread::sleep(Duration::from_millis(2000));
    let refresh = curl(&["-H", &cookie, "-H", "X-Console-Refresh: 1", &console]);
    assert_eq!(refresh.0, 200, "{}", refresh.2);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, _, body) = curl(&["-H", &cookie, &console]);
    assert_eq!(status, 401, "{body}");
}
