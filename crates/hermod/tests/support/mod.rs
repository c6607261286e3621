//! Black-box harness: runs the real `hermod` binary on a temporary data
//! directory, and the real PyPI `hermes-bus` client in a virtualenv.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const HERMOD: &str = env!("CARGO_BIN_EXE_hermod");

/// The relay token every test daemon is started with.
pub const RELAY_TOKEN: &str = "sekret";

/// A small tmpfs mounted for one test (the tests run as root), unmounted
/// on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system under `dir` to the last byte.
pub fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    // Smaller pieces into whatever the last chunk did not fit, down to the
    // last byte (a log line must not fit either).
    for piece in [4096, 512, 64, 1] {
        while f.write_all(&chunk[..piece]).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

/// Another process (python3's sqlite3) holding the SQLite write lock
/// (`BEGIN EXCLUSIVE`) on `db` for a while; released on drop at the latest.
pub struct DbLock {
    child: Child,
}

impl DbLock {
    /// Returns once the lock is held; it is let go after `hold`.
    pub fn hold(db: &Path, hold: Duration) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys, time\n\
                 c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
                 c.execute('BEGIN EXCLUSIVE')\n\
                 print('locked', flush=True)\n\
                 time.sleep(float(sys.argv[2]))\n\
                 c.execute('COMMIT')\n",
            ])
            .arg(db)
            .arg(hold.as_secs_f64().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked", "python3 could not lock {db:?}");
        Self { child }
    }

    /// Waits until the holder let go; whether it committed cleanly.
    pub fn wait(mut self) -> bool {
        self.child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for DbLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `hermod serve` child process. Killed on drop; its log is printed if
/// the test is failing.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// `http://127.0.0.1:PORT` of the HTTP front (a free port per start).
    pub http: String,
    child: Option<Child>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    pub fn start_with_env(envs: &[(&str, &str)]) -> Self {
        Self::start_with(&[], envs)
    }

    /// Starts with a `config.toml` in the data directory.
    pub fn start_with_config(config: &str, envs: &[(&str, &str)]) -> Self {
        Self::start_inner(&[], envs, Some(config))
    }

    /// Starts with extra `serve` flags and environment.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_inner(args, envs, None)
    }

    /// Starts with extra `serve` flags, environment and a `config.toml`.
    pub fn start_with_args_config(args: &[&str], envs: &[(&str, &str)], config: &str) -> Self {
        Self::start_inner(args, envs, Some(config))
    }

    /// The pid of the running `hermod serve`, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts with extra `serve` flags on the data directory `dir`.
    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Self {
        Self::start_dir(dir, args, &[], None)
    }

    fn start_inner(args: &[&str], envs: &[(&str, &str)], config: Option<&str>) -> Self {
        Self::start_dir(tempfile::tempdir().unwrap(), args, envs, config)
    }

    /// Starts on the data directory `dir` (on a file system of its own,
    /// say) with extra flags, environment and an optional `config.toml`.
    pub fn start_dir(
        dir: tempfile::TempDir,
        args: &[&str],
        envs: &[(&str, &str)],
        config: Option<&str>,
    ) -> Self {
        if let Some(config) = config {
            std::fs::write(dir.path().join("config.toml"), config).unwrap();
        }
        let socket = dir.path().join("hermod.sock");
        let mut d = Daemon {
            dir,
            socket,
            http: String::new(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn();
        d
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("test-daemon.log")
    }

    /// Starts `hermod serve` on this data dir and waits until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(HERMOD);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--socket")
            .arg(&self.socket)
            .args(if self.args.iter().any(|a| a == "--http") {
                &[][..]
            } else {
                &["--http", "127.0.0.1:0"][..]
            })
            .args(["--sse-keepalive", "1"])
            .args(["--relay-token", RELAY_TOKEN])
            .args(&self.args)
            .env("RUST_LOG", "hermod=debug,info")
            .env("HERMES_BUS_HOOKS", "none")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hermod serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("hermod serve exited at start: {status}\n{}", self.log());
            }
            if let Some(http) = self.runtime_http(child.id()) {
                if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                    self.http = http;
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "hermod did not come up\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// The HTTP URL from `runtime.json`, once the process `pid` wrote it.
    fn runtime_http(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.path().join("runtime.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v["pid"] == pid).then(|| v["http"].as_str().map(str::to_owned))?
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    child.kill().unwrap();
                    panic!("hermod ignored SIGTERM\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs the hermod CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.cli_as(args, stdin, None)
    }

    /// Runs the CLI with `HERMOD_TOKEN` set to `token`.
    pub fn cli_token(&self, args: &[&str], token: &str) -> Output {
        self.cli_as(args, None, Some(token))
    }

    fn cli_as(&self, args: &[&str], stdin: Option<&str>, token: Option<&str>) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(HERMOD);
        match token {
            Some(t) => cmd.env("HERMOD_TOKEN", t),
            None => cmd.env_remove("HERMOD_TOKEN"),
        };
        let mut child = cmd
            .args(args)
            .env("HERMOD_SOCKET", &self.socket)
            .env("HERMOD_HOME", self.dir.path())
            .env_remove("HERMOD_URL")
            .env_remove("AGENT_BUS_URL")
            .env_remove("AGENT_NAME")
            .env_remove("AGENT_BUS_CHANNEL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- hermod log -----\n{}\n----------------------",
                self.log()
            );
        }
    }
}

/// A TCP port that was free a moment ago (for a daemon that must keep its
/// address across restarts).
pub use hermod_nats::testing::free_port;

fn workspace_target() -> PathBuf {
    // CARGO_BIN_EXE_hermod is <target>/<profile>/hermod.
    Path::new(HERMOD)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned()
}

/// A Python with `tests/py/requirements.txt` installed (the PyPI
/// `hermes-bus==0.7.0` client, HTTP/SSE/WebSocket clients, schemathesis):
/// `$HERMOD_TEST_PYTHON`, or a virtualenv made once under the target
/// directory (guarded by a file lock, so parallel test processes share it;
/// remade when the requirements change).
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Some(p) = std::env::var_os("HERMOD_TEST_PYTHON") {
            return PathBuf::from(p);
        }
        let venv = workspace_target().join("test-venv");
        let py = venv.join("bin").join("python");
        let requirements = py_dir().join("requirements.txt");
        let wanted = std::fs::read_to_string(&requirements).unwrap();
        let ready = venv.join(".installed-requirements.txt");
        std::fs::create_dir_all(workspace_target()).unwrap();
        let lock = std::fs::File::create(workspace_target().join("test-venv.lock")).unwrap();
        lock.lock().unwrap();
        if std::fs::read_to_string(&ready).ok().as_deref() != Some(wanted.as_str()) {
            run_ok(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            run_ok(
                Command::new(&py)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        "-r",
                    ])
                    .arg(&requirements),
            );
            std::fs::write(&ready, &wanted).unwrap();
        }
        py
    })
    .clone()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run setup command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn py_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("py")
}

/// Runs `tests/py/<script>` against `daemon`; panics with its output on failure.
pub fn run_python(daemon: &Daemon, script: &str) -> String {
    run_python_with(daemon, script, &[])
}

/// [`run_python`] with more environment (e.g. other nodes' URLs).
pub fn run_python_with(daemon: &Daemon, script: &str, envs: &[(&str, &str)]) -> String {
    let dir = py_dir();
    let out = Command::new(python())
        .envs(envs.iter().copied())
        .arg(dir.join(script))
        .current_dir(&dir)
        .env("HERMOD_URL", &daemon.http)
        .env("HERMOD_SOCKET", &daemon.socket)
        .env("HERMOD_BIN", HERMOD)
        .env("HERMOD_RELAY_TOKEN", RELAY_TOKEN)
        .env("HERMES_BUS_ROOT", daemon.data_dir())
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{text}",
        out.status
    );
    text
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Reads one raw length-prefixed frame from a blocking Unix socket.
pub fn read_frame(s: &mut std::os::unix::net::UnixStream) -> serde_json::Value {
    use std::io::Read;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    serde_json::from_slice(&buf).unwrap()
}

/// Writes one raw length-prefixed frame to a blocking Unix socket.
pub fn write_frame(s: &mut std::os::unix::net::UnixStream, v: serde_json::Value) {
    use std::io::Write;
    let bytes = serde_json::to_vec(&v).unwrap();
    s.write_all(&(bytes.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&bytes).unwrap();
}

// The browser tests' helpers.

/// `tool` on `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// A child process killed on drop.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl -i` with `args`: (status, lower-cased header block, body).
pub fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    let text = stdout(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response from curl {args:?}: {text}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

pub fn log_seq(d: &Daemon) -> u64 {
    let (status, _, body) = curl(&[&format!("{}/metrics", d.http)]);
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("hermod_log_seq "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hermod_log_seq in /metrics:\n{body}"))
}

/// `hermod inbox NAME --json` over the Unix socket: what waits, unacked.
pub fn inbox(d: &Daemon, agent: &str) -> Vec<serde_json::Value> {
    let out = d.cli(&["inbox", "--json", agent]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The SSE ids in the complete events of a raw `/subscribe` response (head,
/// then a chunked body) read so far.
pub fn sse_ids(raw: &[u8]) -> Vec<u64> {
    let Some(head) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let mut rest = &raw[head + 4..];
    let mut body = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
            .expect("a chunk size");
        let data = &rest[eol + 2..];
        body.extend_from_slice(&data[..size.min(data.len())]);
        if data.len() < size + 2 {
            break;
        }
        rest = &data[size + 2..];
    }
    let text = String::from_utf8_lossy(&body);
    // Only events that ended: a cut one was not received.
    let complete = text.rfind("\n\n").map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("id:"))
        .map(|id| id.trim().parse().unwrap())
        .collect()
}

/// Opens `/subscribe` for `agent` (no `Last-Event-ID`) on a socket whose
/// receive buffer is `rcvbuf` bytes, if given.
pub fn open_subscribe(http: &str, agent: &str, rcvbuf: Option<usize>) -> std::net::TcpStream {
    use std::io::Write;
    let addr: std::net::SocketAddr = http.trim_start_matches("http://").parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(size) = rcvbuf {
        // Before connecting: the window scale is agreed in the handshake.
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket.connect(&addr.into()).unwrap();
    let mut tcp: std::net::TcpStream = socket.into();
    write!(
        tcp,
        "GET /subscribe?agent={agent} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    tcp
}

/// Reads from `tcp` into `raw` until `done(ids so far)` or the deadline
/// (looking at the ids only now and then: they are parsed from the start).
pub fn read_until(
    tcp: &mut std::net::TcpStream,
    raw: &mut Vec<u8>,
    deadline: std::time::Instant,
    done: impl Fn(&std::collections::HashSet<u64>) -> bool,
) {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 16];
    let mut reads = 0;
    loop {
        if reads % 64 == 0 {
            let ids = sse_ids(raw).into_iter().collect();
            if done(&ids) || std::time::Instant::now() > deadline {
                return;
            }
        }
        reads += 1;
        match tcp.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => reads = 0,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => reads = 0,
            Err(e) => panic!("{e}"),
        }
    }
}
