//! `hermod recv`: print messages as they arrive, one block each.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use hermod_client::http::{HttpClient, HttpPoller};
use hermod_client::{MessageFrame, Subscriber};
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
            write!(stdout, "{}", block(&message, saved.as_deref()))?;
        }
        stdout.flush()?;
        // Acknowledged only once printed: a crash re-prints, never skips.
        source.ack(message.seq).await?;
        printed += 1;
    }
    Ok(ExitCode::SUCCESS)
}

/// `[HH:MM:SSZ] from SENDER (CHANNEL):`, the text, `---`. A message with
/// an attachment shows its text and one line describing the file.
pub fn block(m: &MessageFrame, saved: Option<&str>) -> String {
    let secs = m.ts.floor() as i64;
    let (h, min, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let body = m.body.to_map();
    let text = match body.get("attachment").and_then(Value::as_object) {
        Some(a) => {
            let mut text = body
                .get("text")
                .and_then(Value::as_str)
                .map(|t| format!("{t}\n"))
                .unwrap_or_default();
            text.push_str(&format!(
                "[attachment {} ({} bytes, sha256 {}){}]",
                a.get("name").and_then(Value::as_str).unwrap_or("?"),
                a.get("size").and_then(Value::as_u64).unwrap_or(0),
                a.get("sha256").and_then(Value::as_str).unwrap_or("?"),
                saved.map(|s| format!(" {s}")).unwrap_or_default(),
            ));
            text
        }
        None => m.body.to_text(),
    };
    format!(
        "[{h:02}:{min:02}:{s:02}Z] from {} ({}):\n{text}\n---\n",
        m.from, m.channel
    )
}

/// Saves a message's attachment into `dir` if its sha256 checks out;
/// returns what to print about it (`None` without an attachment).
fn save_attachment(m: &MessageFrame, dir: &std::path::Path) -> Result<Option<String>> {
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
    // Only the file name: a sender cannot write outside `dir`.
    let name = std::path::Path::new(field("name"))
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| format!("attachment-{}", m.seq).into());
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    std::fs::write(&path, &bytes)?;
    Ok(Some(format!(
        "saved to {}, sha256 verified",
        path.display()
    )))
}
