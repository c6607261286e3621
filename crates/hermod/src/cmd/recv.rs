//! `hermod recv`: print messages as they arrive, one block each.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use hermod_client::{MessageFrame, Subscriber};

use crate::cli::{self, RecvArgs};

pub fn run(args: &RecvArgs) -> Result<ExitCode> {
    super::runtime()?.block_on(async {
        let mut sub = Subscriber::start(
            args.client.socket(),
            args.name.clone(),
            cli::channel(&args.channel),
        );
        let printed = print_messages(&mut sub, args).await;
        sub.close().await;
        printed
    })
}

/// Prints until `--count` or `--timeout`; returns the exit code.
async fn print_messages(sub: &mut Subscriber, args: &RecvArgs) -> Result<ExitCode> {
    {
        let mut printed = 0u64;
        let mut stdout = std::io::stdout();
        while args.count.is_none_or(|n| printed < n) {
            let next = match args.timeout {
                Some(secs) => {
                    match tokio::time::timeout(Duration::from_secs_f64(secs), sub.next()).await {
                        Ok(next) => next,
                        Err(_) => return Ok(ExitCode::from(super::EXIT_TIMEOUT)),
                    }
                }
                None => sub.next().await,
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
            sub.ack(message.seq).await;
            printed += 1;
        }
        Ok(ExitCode::SUCCESS)
    }
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
