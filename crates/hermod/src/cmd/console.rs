//! `hermod console`: asks the daemon (over the Unix socket, as the owner
//! or with an admin `HERMOD_TOKEN`) for a one-time web console login link,
//! prints it and opens it in a browser; `--logout-all` ends every session.

use std::process::{ExitCode, Stdio};

use anyhow::{bail, Result};
use hermod_client::Connection;

use crate::cli::ConsoleArgs;

pub fn run(args: &ConsoleArgs) -> Result<ExitCode> {
    let socket = args.local.socket();
    let (link, ended) = super::runtime()?.block_on(async {
        let mut conn = Connection::connect(&socket).await?;
        anyhow::Ok(conn.console(args.logout_all).await?)
    })?;
    if args.logout_all {
        println!("ended {} console session(s)", ended.unwrap_or(0));
        return Ok(ExitCode::SUCCESS);
    }
    let Some(link) = link else {
        bail!("the daemon gave no console link");
    };
    println!("{link}");
    eprintln!("(works once, within 60 seconds)");
    if !args.no_open {
        // A browser that cannot start is not an error: the link is printed.
        let opened = std::process::Command::new("xdg-open")
            .arg(&link)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = opened {
            eprintln!("could not start a browser ({e}); open the link above");
        }
    }
    Ok(ExitCode::SUCCESS)
}
