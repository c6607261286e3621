//! `hermod recv`: print messages as they arrive, one line each.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use hermod_client::http::{HttpClient, HttpPoller};
use hermod_client::{MessageFrame, Subscriber};
use hermod_core::text;
use serde_json::Value;

use crate::cli::{self, Endpoint, RecvArgs};

/// Where messages come from: a Unix-socket registration or HTTP long-polls.
enum Source {
    Unix(Subscriber),
    Http(HttpPoller),
}

impl Source {
    async fn next(&mut self) -> Option<Result<MessageFrame>> {
        match self {
            Source::Unix(s) => s.next().await.map(|r| r.map_err(Into::into)),
            Source::Http(p) => Some(p.next().await.map_err(Into::into)),
        }
    }

    async fn ack(&self, seq: u64) -> Result<()> {
        match self {
            Source::Unix(s) => s.ack(seq).await,
            Source::Http(p) => p.ack(seq).await?,
        }
        Ok(())
    }

    async fn close(self) {
        if let Source::Unix(s) = self {
            s.close().await;
        }
    }
}

pub fn run(args: &RecvArgs) -> Result<ExitCode> {
    super::runtime()?.block_on(async {
        let channel = cli::channel(&args.channel);
        let mut source = match args.client.endpoint() {
            Endpoint::Unix(socket) => {
                Source::Unix(Subscriber::start(socket, args.name.clone(), channel))
            }
            Endpoint::Http(url) => Source::Http(HttpPoller::new(
                HttpClient::new(&url),
                args.name.clone(),
                channel,
            )),
        };
        let result = print_messages(&mut source, args).await;
        source.close().await;
        result
    })
}

/// Prints until `--count` or `--timeout`; returns the exit code.
async fn print_messages(source: &mut Source, args: &RecvArgs) -> Result<ExitCode> {
    let mut printed = 0u64;
    let mut stdout = std::io::stdout();
    while args.count.is_none_or(|n| printed < n) {
        let next = match args.timeout {
            Some(secs) => {
                match tokio::time::timeout(Duration::from_secs_f64(secs), source.next()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(ExitCode::from(super::EXIT_TIMEOUT)),
                }
            }
            None => source.next().await,
        };
        let Some(message) = next else { break };
        let message = message?;
        let saved = match &args.save_dir {
            Some(dir) => save_attachment(&message, dir)?,
            None => None,
        };
        if args.json {
            writeln!(stdout, "{}", serde_json::to_string(&message)?)?;
        } else {
            let line = line(&message, saved.as_deref(), TEXT_MAX_CHARS, CUT_HINT);
            write!(stdout, "{line}")?;
        }
        stdout.flush()?;
        // Acknowledged only once printed: a crash re-prints, never skips.
        source.ack(message.seq).await?;
        printed += 1;
    }
    Ok(ExitCode::SUCCESS)
}

/// Longest text `recv`, `wait` and `inbox` print of one message: generous,
/// since an agent reads its mail through them; `--json` has all of it.
pub const TEXT_MAX_CHARS: usize = 16_000;

/// Said after a cut text, so the reader knows where the rest is.
pub const CUT_HINT: &str = " (--json shows all of it)";

/// Longest attachment name or topic shown.
const NAME_MAX_CHARS: usize = 256;

/// One line per message: `[HH:MM:SSZ] from SENDER [AUTH] (CHANNEL): TEXT`,
/// AUTH being how the sender was verified (`token`, `owner`, `open`). A
/// message with an attachment adds `[attachment NAME (SIZE bytes, sha256
/// HASH) SAVED]` after its text.
///
/// Everything the sender chose goes through [`text::terminal_line`]: a
/// line break shows as `\n`, an escape sequence as `\e[…`, so a message
/// can neither fake a second message nor drive the terminal, and the text
/// is cut after `max_chars` (with `hint` appended when it was).
pub fn line(m: &MessageFrame, saved: Option<&str>, max_chars: usize, hint: &str) -> String {
    let body = m.body.to_map();
    let (text, attachment) = match body.get("attachment").and_then(Value::as_object) {
        Some(a) => (
            body.get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            Some(format!(
                "[attachment {} ({} bytes, sha256 {}){}]",
                text::terminal_line(
                    a.get("name").and_then(Value::as_str).unwrap_or("?"),
                    NAME_MAX_CHARS
                ),
                a.get("size").and_then(Value::as_u64).unwrap_or(0),
                text::terminal_line(
                    a.get("sha256").and_then(Value::as_str).unwrap_or("?"),
                    NAME_MAX_CHARS
                ),
                saved
                    .map(|s| format!(" {}", text::terminal_line(s, 2 * NAME_MAX_CHARS)))
                    .unwrap_or_default(),
            )),
        ),
        None => (m.body.to_text(), None),
    };
    let (mut shown, cut) = text::terminal_line_cut(&text, max_chars);
    if cut > 0 {
        shown.push_str(hint);
    }
    if let Some(a) = attachment {
        if !shown.is_empty() {
            shown.push(' ');
        }
        shown.push_str(&a);
    }
    // Delivery fields, when set: what it answers, how urgent it is.
    let mut tags = String::new();
    if let Some(r) = &m.meta.reply_to {
        tags.push_str(&format!(" re {}", text::terminal_line(r, NAME_MAX_CHARS)));
    }
    if !m.meta.priority.is_normal() {
        tags.push_str(&format!(" [{}]", m.meta.priority.as_str()));
    }
    format!(
        "[{}] from {} [{}] ({}){tags}: {shown}\n",
        clock(m.ts),
        text::terminal_line(&m.from, NAME_MAX_CHARS),
        m.auth,
        text::terminal_line(&m.channel, NAME_MAX_CHARS),
    )
}

/// `HH:MM:SSZ` of a bus time.
pub fn clock(ts: f64) -> String {
    let secs = ts.floor() as i64;
    let (h, min, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{min:02}:{s:02}Z")
}

/// Tries for a free name after a collision: `name (1).ext` … `name (99).ext`.
const MAX_NAME_TRIES: u32 = 99;

/// Longest saved file name, in bytes: below NAME_MAX (255) with room for
/// ` (99)`.
const FILE_NAME_MAX_BYTES: usize = 200;

/// Saves a message's attachment into `dir` if its sha256 checks out;
/// returns what to print about it (`None` without an attachment).
///
/// The sender picks the name, so it is only a hint: reduced to a plain
/// visible basename ([`text::file_name`]; `attachment-<seq>` if nothing is
/// left), and the file is always *new*: created with `O_CREAT | O_EXCL |
/// O_NOFOLLOW`, so an existing file is never overwritten and a symlink
/// planted under the name is never followed. A taken name becomes
/// `name (1).ext`, `name (2).ext` …; the printed line says where it went.
fn save_attachment(m: &MessageFrame, dir: &Path) -> Result<Option<String>> {
    use base64::Engine;
    use sha2::Digest;
    let body = m.body.to_map();
    let Some(a) = body.get("attachment").and_then(Value::as_object) else {
        return Ok(None);
    };
    let field = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or_default();
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(field("data")) else {
        return Ok(Some("NOT saved: the data is not base64".into()));
    };
    if super::send::hex(&sha2::Sha256::digest(&bytes)) != field("sha256") {
        return Ok(Some("NOT saved: sha256 mismatch".into()));
    }
    let name = text::file_name(field("name"), FILE_NAME_MAX_BYTES)
        .unwrap_or_else(|| format!("attachment-{}", m.seq));
    std::fs::create_dir_all(dir)?;
    for n in 0..=MAX_NAME_TRIES {
        let path = dir.join(numbered(&name, n));
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT | O_EXCL: never an existing file
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600) // someone's mail: private, like the rest of it
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // O_NOFOLLOW's answer on a symlink when O_EXCL did not say EEXIST.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
        };
        if let Err(e) = file.write_all(&bytes).and_then(|()| file.sync_all()) {
            // Ours (we just created it): leave no truncated file behind.
            let _ = std::fs::remove_file(&path);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        let renamed = if n > 0 {
            format!(" ({} was taken)", name)
        } else {
            String::new()
        };
        return Ok(Some(format!(
            "saved to {}{renamed}, sha256 verified",
            path.display()
        )));
    }
    Ok(Some(format!(
        "NOT saved: {name} and {MAX_NAME_TRIES} numbered variants exist in {}",
        dir.display()
    )))
}

/// `name` for try 0, then `stem (n).ext` (the extension is what follows
/// the last dot, if that dot is not the first character).
fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_owned();
    }
    match name.rfind('.') {
        Some(i) if i > 0 => format!("{} ({n}){}", &name[..i], &name[i..]),
        _ => format!("{name} ({n})"),
    }
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn collisions_are_numbered_before_the_extension() {
        assert_eq!(numbered("a.txt", 0), "a.txt");
        assert_eq!(numbered("a.txt", 1), "a (1).txt");
        assert_eq!(numbered("a.tar.gz", 2), "a.tar (2).gz");
        assert_eq!(numbered("README", 3), "README (3)");
    }
}
