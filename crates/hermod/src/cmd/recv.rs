//! `hermod recv`: print messages as they arrive, one block each.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use hermod_client::http::{HttpClient, HttpPoller};
use hermod_client::{MessageFrame, Subscriber};

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
        if args.json {
            writeln!(stdout, "{}", serde_json::to_string(&message)?)?;
        } else {
            write!(stdout, "{}", block(&message))?;
        }
        stdout.flush()?;
        // Acknowledged only once printed: a crash re-prints, never skips.
        source.ack(message.seq).await?;
        printed += 1;
    }
    Ok(ExitCode::SUCCESS)
}

/// `[HH:MM:SSZ] from SENDER (CHANNEL):`, the text, `---`.
pub fn block(m: &MessageFrame) -> String {
    let secs = m.ts.floor() as i64;
    let (h, min, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!(
        "[{h:02}:{min:02}:{s:02}Z] from {} ({}):\n{}\n---\n",
        m.from,
        m.channel,
        m.body.to_text()
    )
}
