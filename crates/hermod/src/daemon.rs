//! The data directory's single-instance lock and the background manager
//! (`start`, `stop`, `status`, `restart`).
//!
//! `hermod.pid` in the data directory is both the pid file and the lock: a
//! server holds an exclusive OS file lock on it for its whole life and
//! writes its pid into it. The lock, not the pid, decides whether a server
//! runs, so a stale pid file from a crash never blocks a restart.
//!
//! Everything in the data directory is its user's alone: the log holds
//! every message, the socket lets whoever can open it act as that user.
//! The daemon runs under umask 077 ([`private_umask`]), so whatever it
//! creates — directory, database and its `-wal`/`-shm`, log, pid file,
//! `runtime.json`, the socket — is *born* without group or other access
//! (no window between creating and chmod-ing), and [`lock`] tightens a
//! data directory and files left by an older, laxer version.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::ServeCommand;

pub const PID_FILE: &str = "hermod.pid";
pub const LOG_FILE: &str = "hermod.log";

/// Held by a running server; released when dropped (or the process dies).
pub struct DataDirLock {
    _file: File,
}

/// Files in the data directory that older versions created with the
/// default umask (world-readable) and that [`prepare_data_dir`] tightens.
fn private_files() -> Vec<String> {
    use crate::cmd::serve::{DB_FILE, RUNTIME_FILE};
    let mut names = vec![LOG_FILE.to_owned(), PID_FILE.to_owned()];
    for suffix in ["", "-wal", "-shm", "-journal"] {
        names.push(format!("{DB_FILE}{suffix}"));
    }
    for suffix in ["", ".tmp"] {
        names.push(format!("{RUNTIME_FILE}{suffix}"));
    }
    names
}

/// From now on this process creates files 0600 and directories 0700 (and
/// a socket without group/other access) whatever mode it asks for; called
/// first thing by `serve` and `start`, before any thread exists.
#[allow(unsafe_code)]
pub fn private_umask() {
    // SAFETY: umask(2) only swaps the process's file-creation mask; it
    // cannot fail and reads or writes no memory of ours.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (0700 under [`private_umask`]) or tightens an existing
/// one to 0700, and the daemon's files in it to 0600. SQLite gives new
/// `-wal`/`-shm` files the database's mode, so a tightened database stays
/// private too. A data directory given as a symlink is the directory it
/// names; a symlink planted under one of the files' names is not followed.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let chmod = |path: &Path, meta: std::io::Result<std::fs::Metadata>, mode: u32| match meta {
        Ok(m) if (m.is_dir() || m.is_file()) && m.permissions().mode() & 0o7777 != mode => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot make {} private", path.display()))
        }
        _ => Ok(()),
    };
    chmod(dir, std::fs::metadata(dir), 0o700)?;
    for name in private_files() {
        let path = dir.join(name);
        chmod(&path, std::fs::symlink_metadata(&path), 0o600)?;
    }
    Ok(())
}

fn open_pid_file(dir: &Path) -> Result<File> {
    prepare_data_dir(dir)?;
    let path = dir.join(PID_FILE);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Takes the data directory for this process, or explains who has it.
pub fn lock(dir: &Path) -> Result<DataDirLock> {
    let mut file = open_pid_file(dir)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = read_pid(&mut file)
                .map(|p| format!("pid {p}"))
                .unwrap_or_else(|| "another process".into());
            bail!(
                "data directory {} is in use by a running hermod ({holder}); stop it first or pick another --data-dir",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", dir.display()))
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_all()?;
    Ok(DataDirLock { _file: file })
}

/// The pid of the server holding `dir`, if one runs.
pub fn running_pid(dir: &Path) -> Option<u32> {
    let mut file = OpenOptions::new()
        .read(true)
        .open(dir.join(PID_FILE))
        .ok()?;
    match file.try_lock() {
        Ok(()) => None, // nobody holds it; dropping the file releases ours
        Err(_) => Some(read_pid(&mut file).unwrap_or(0)),
    }
}

#[allow(unsafe_code)]
fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and has no memory effects here.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits until no server holds `dir`, up to `limit`.
fn wait_stopped(dir: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while running_pid(dir).is_some() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Starts `hermod serve` in the background as `serve` says and waits
/// until its socket answers.
pub fn start(dir: &Path, socket: &Path, serve: &ServeCommand) -> Result<u32> {
    if let Some(pid) = running_pid(dir) {
        println!("hermod is already running (pid {pid})");
        return Ok(pid);
    }
    // The log is created here, before the server sets its own umask.
    private_umask();
    prepare_data_dir(dir)?;
    let log_path = dir.join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let exe = std::env::current_exe().context("cannot find the hermod executable")?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(exe);
        for (name, value) in &serve.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
            .arg("serve")
            .args(&serve.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("cannot start hermod serve")?
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "hermod serve exited at start ({status}); see {}:\n{}",
                log_path.display(),
                tail(&log_path, 20)
            );
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() && running_pid(dir).is_some() {
            println!(
                "hermod started (pid {}), socket {}, log {}",
                child.id(),
                socket.display(),
                log_path.display()
            );
            return Ok(child.id());
        }
        if Instant::now() > deadline {
            bail!(
                "hermod did not come up within 15 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the server holding `dir`: SIGTERM, then SIGKILL after 15 s.
pub fn stop(dir: &Path) -> Result<bool> {
    let Some(pid) = running_pid(dir) else {
        println!("hermod is not running (data dir {})", dir.display());
        return Ok(false);
    };
    signal(pid, libc::SIGTERM).with_context(|| format!("cannot signal pid {pid}"))?;
    if !wait_stopped(dir, Duration::from_secs(15)) {
        eprintln!("hermod (pid {pid}) ignored SIGTERM for 15 s; killing it");
        signal(pid, libc::SIGKILL)?;
        if !wait_stopped(dir, Duration::from_secs(5)) {
            bail!("pid {pid} still holds {}", dir.display());
        }
    }
    println!("hermod stopped (pid {pid})");
    Ok(true)
}

fn tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
