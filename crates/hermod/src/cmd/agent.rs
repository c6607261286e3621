//! `hermod agent add|list|rotate|revoke`: agent identities, managed through
//! the running daemon's Unix socket (the owner's processes, proved by peer
//! credentials, or an admin token in `HERMOD_TOKEN`). A new token is printed
//! once, after the daemon made the identity durable; only its hash is kept.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hermod_client::Connection;
use hermod_core::auth::{Identity, IdentitySpec};
use hermod_core::wire::{ClientFrame, ServerFrame};

use crate::cli::{AgentCommand, SocketArgs};

pub fn run(command: AgentCommand) -> Result<ExitCode> {
    let (local, json, frame) = match command {
        AgentCommand::Add(a) => {
            let spec = IdentitySpec {
                name: a.name,
                channel: a.channel,
                may_send: a.may_send,
                may_publish: a.may_publish,
                may_subscribe: a.may_subscribe,
                admin: a.admin,
            };
            (a.local, a.json, ClientFrame::IdentityAdd { identity: spec })
        }
        AgentCommand::List(a) => (a.local, a.json, ClientFrame::IdentityList),
        AgentCommand::Rotate(a) => (
            a.local,
            a.json,
            ClientFrame::IdentityRotate { name: a.name },
        ),
        AgentCommand::Revoke(a) => (
            a.local,
            a.json,
            ClientFrame::IdentityRevoke { name: a.name },
        ),
    };
    let reply = request(&local, &frame)?;
    match reply {
        ServerFrame::Identity { identity, token } if json => {
            let mut v = serde_json::to_value(&identity)?;
            if let Some(t) = token {
                v["token"] = t.into();
            }
            println!("{v}");
        }
        ServerFrame::Identity { identity, token } => match token {
            Some(token) => {
                println!("{}", describe(&identity));
                println!("token (shown once; give it to the agent as HERMOD_TOKEN):");
                println!("{token}");
            }
            None => println!("revoked {}", identity.name),
        },
        ServerFrame::Identities { identities } if json => {
            for i in identities {
                println!("{}", serde_json::to_string(&i)?);
            }
        }
        ServerFrame::Identities { identities } => {
            if identities.is_empty() {
                println!("no identities (hermod agent add NAME creates one)");
            }
            for i in identities {
                println!("{}", describe(&i));
            }
        }
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn request(local: &SocketArgs, frame: &ClientFrame) -> Result<ServerFrame> {
    super::runtime()?.block_on(async {
        let mut conn = Connection::connect(&local.socket()).await?;
        Ok(conn.request(frame).await?)
    })
}

fn describe(i: &Identity) -> String {
    format!(
        "{}{} channel={} may-send={} may-publish={} may-subscribe={}",
        i.name,
        if i.admin { " (admin)" } else { "" },
        i.channel.as_deref().unwrap_or("*"),
        i.may_send.join(","),
        i.may_publish.join(","),
        i.may_subscribe.join(","),
    )
}
