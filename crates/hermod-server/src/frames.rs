//! One frame dispatcher for the framed transports, the Unix socket and
//! the v1 WebSocket, so a request frame means the same thing on both.
//!
//! A transport parses and authenticates a frame, calls [`dispatch`] with
//! what it knows about the connection ([`Conn`]) and carries out the
//! [`Outcome`]. It keeps only what really differs: the Unix socket
//! registers an agent with a `register` frame (the WebSocket's agent is
//! in its URL), and each writes in its own way.

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use hermod_core::auth::Caller;
use hermod_core::broker::{Batch, Target};
use hermod_core::engine::Durable;
use hermod_core::model::{self, InboxKey, Seq};
use hermod_core::wire::{self, AckMode, Envelope, Request, ServerFrame};
use hermod_core::{Broker, Error, Result};

/// Events a `tail` watcher may fall behind by before it misses some.
const TAIL_QUEUE: usize = 1024;

/// Live (non-durable) topic subscriptions one connection may hold at once:
/// each is a task or stream and a view, so a client looping `subscribe`
/// would otherwise grow the daemon without bound. Past it the frame is
/// answered `too_many_subscriptions`.
pub const MAX_LIVE_SUBSCRIPTIONS: usize = 256;

/// What the dispatcher knows about the connection a frame came on.
pub(crate) struct Conn<'a> {
    pub broker: &'a Broker,
    pub caller: &'a Caller,
    /// The connection's agent: registered (Unix) or in the URL (WebSocket).
    pub agent: Option<&'a InboxKey>,
    /// The client reads `gap` frames (legacy Unix clients do not).
    pub gaps: bool,
    /// The door delivery steps name: `unix` or `ws`.
    pub door: &'static str,
    /// Live subscriptions the connection holds now.
    pub live: usize,
}

/// What a durable commit is answered with.
pub(crate) enum Reply {
    /// `sent` (the `send` extension), with what the sender should know.
    Sent(Option<String>),
    /// `published` with seq and ts (`publish` with `durable: true`).
    Published,
    /// Nothing unless it failed (legacy `message`, fast `publish`).
    ErrorsOnly,
}

/// Frames a live subscription keeps producing, a batch at a time.
pub(crate) type Frames = BoxStream<'static, Vec<Bytes>>;

/// What the transport does with a frame.
pub(crate) enum Outcome {
    /// Write this now (`None`: nothing to answer, as for `ack`).
    Reply(Option<ServerFrame>),
    /// Write `first` now (if any), then answer once durable, in request
    /// order with the other durable answers.
    Pending {
        first: Option<ServerFrame>,
        durable: Durable,
        id: String,
        reply: Reply,
    },
    /// Write `reply` (if any), then every batch of `frames` as it comes.
    Stream {
        reply: Option<ServerFrame>,
        frames: Frames,
    },
    /// A `register` frame: the transport's own business.
    Register {
        key: InboxKey,
        ack: AckMode,
        gaps: bool,
    },
}

/// The id an error reply should carry, for requests that name one.
pub(crate) fn request_id(request: &Request) -> Option<String> {
    match request {
        Request::Message(env) | Request::Send(env) => env.id.clone(),
        Request::Publish(p) => p.id.clone(),
        _ => None,
    }
}

fn needs_agent<'a>(conn: &Conn<'a>, what: &str) -> Result<&'a InboxKey> {
    conn.agent
        .ok_or_else(|| Error::InvalidRequest(format!("{what} needs a registered connection")))
}

/// Applies one authenticated request; an `Err` is answered as an error
/// frame (with [`request_id`]).
pub(crate) async fn dispatch(conn: Conn<'_>, request: Request) -> Result<Outcome> {
    let caller = conn.caller;
    // A connection authenticated once speaks for every frame after: each
    // frame is refused once its token was revoked or rotated.
    caller.check()?;
    let outcome = apply(&conn, request).await?;
    Ok(match outcome {
        // A live stream ends with its caller's token.
        Outcome::Stream { reply, frames } => Outcome::Stream {
            reply,
            frames: frames
                .take_until(caller.revoked().clone().cancelled_owned())
                .boxed(),
        },
        other => other,
    })
}

async fn apply(conn: &Conn<'_>, request: Request) -> Result<Outcome> {
    let (broker, caller) = (conn.broker, conn.caller);
    let trust = broker.trust();
    let reply = |frame| Ok(Outcome::Reply(Some(frame)));
    match request {
        Request::Register {
            endpoint,
            channel,
            ack,
            gaps,
        } => Ok(Outcome::Register {
            key: InboxKey::new(channel, endpoint),
            ack,
            gaps,
        }),
        Request::Ping => reply(ServerFrame::Pong),
        Request::Status => {
            let mut status =
                ServerFrame::status(broker.degraded(), Some(broker.describe_engine().await));
            if let (ServerFrame::Status { memory, .. }, Ok(())) =
                (&mut status, trust.may_admin(caller))
            {
                let (cache_bytes, budget_bytes, views) = broker.cache_usage();
                *memory = Some(serde_json::json!({
                    "cache_bytes": cache_bytes,
                    "budget_bytes": budget_bytes,
                    "views": views,
                    "connections": broker.connections(caller),
                }));
            }
            reply(status)
        }
        // Legacy `message` keeps hermes-bus typo protection and answers only
        // errors; `send` may address an agent that has not connected yet.
        Request::Message(env) => submit(conn, env, Target::Known, Reply::ErrorsOnly).await,
        Request::Send(env) => submit(conn, env, Target::Any, Reply::Sent(None)).await,
        Request::Publish(p) => {
            let wait = p.durable;
            let from = conn.agent.map(|k| k.agent.clone());
            let (id, durable) = broker.publish_frame(caller, p, from).await;
            let durable = durable?;
            Ok(match wait {
                true => Outcome::Pending {
                    first: None,
                    durable,
                    id,
                    reply: Reply::Published,
                },
                // Fast class: accepted now; a failed commit is still reported.
                false => Outcome::Pending {
                    first: Some(ServerFrame::Published {
                        id: id.clone(),
                        seq: None,
                        ts: None,
                    }),
                    durable,
                    id,
                    reply: Reply::ErrorsOnly,
                },
            })
        }
        Request::Subscribe {
            pattern,
            durable,
            every_channel,
        } => {
            // A bad pattern is reported before anything else.
            model::parse_pattern(&pattern)?;
            if durable {
                let key = needs_agent(conn, "a durable subscription")?;
                broker.subscribe(caller, key.clone(), &pattern).await?;
                return reply(ServerFrame::Subscribed { pattern, durable });
            }
            if conn.live >= MAX_LIVE_SUBSCRIPTIONS {
                return Err(Error::TooManySubscriptions {
                    limit: MAX_LIVE_SUBSCRIPTIONS,
                });
            }
            let channel =
                (!every_channel).then(|| conn.agent.map(|k| k.channel.clone()).unwrap_or_default());
            // The start point is fixed before the client hears `subscribed`.
            let events = broker.follow_pattern(caller, channel, &pattern, broker.committed().0)?;
            let gaps = conn.gaps;
            // Ends at the first failed read, as the stream it follows does.
            let frames = events
                .take_while(|batch| futures::future::ready(batch.is_ok()))
                .filter_map(move |batch| {
                    futures::future::ready(batch.ok().map(|b| batch_frames(&b, gaps)))
                })
                .boxed();
            Ok(Outcome::Stream {
                reply: Some(ServerFrame::Subscribed { pattern, durable }),
                frames,
            })
        }
        Request::Ack(seq) => {
            let key = needs_agent(conn, "ack")?;
            broker.ack(key, seq, conn.door).await?;
            Ok(Outcome::Reply(None))
        }
        Request::ListEndpoints => reply(ServerFrame::EndpointsList {
            endpoints: broker.endpoints(caller),
        }),
        Request::Inbox { key, after, limit } => {
            trust.may_act_as(caller, &key)?;
            // Returned to the agent itself: delivered (not read).
            let own = conn.agent == Some(&key) || caller.agent() == Some(&key.agent);
            let door = own.then_some(conn.door);
            reply(peek(broker, &key, after, limit, door).await?)
        }
        Request::Receipt { id, wait, timeout } => {
            let receipts = match wait {
                Some(state) => {
                    let deadline =
                        tokio::time::Instant::now() + std::time::Duration::from_secs_f64(timeout);
                    let wait = broker.wait_receipt(caller, &id, state, deadline);
                    tokio::select! {
                        biased;
                        refused = trust.until_refused(|_| caller.check()) => return Err(refused),
                        done = wait => done?,
                    }
                }
                None => broker.receipts(caller, &id).await?,
            };
            reply(ServerFrame::Receipts {
                receipts: receipts.iter().map(|r| r.view()).collect(),
            })
        }
        Request::Thread(id) => reply(ServerFrame::Thread {
            messages: broker
                .thread(caller, &id)
                .await?
                .iter()
                .map(|m| wire::MessageFrame::from(m.as_ref()))
                .collect(),
        }),
        Request::Presence {
            status,
            agent,
            channel,
        } => {
            let key = match (agent, conn.agent) {
                (Some(agent), _) => InboxKey::new(channel, agent),
                (None, Some(key)) => key.clone(),
                (None, None) => match caller.agent() {
                    Some(agent) => InboxKey::new(channel, agent.clone()),
                    None => {
                        return Err(Error::InvalidRequest(
                            "presence needs an agent: register first or name one".into(),
                        ))
                    }
                },
            };
            broker.set_presence(caller, key.clone(), status).await?;
            reply(ServerFrame::Presence {
                agent: key.agent.to_string(),
                channel: key.channel.to_string(),
                status,
            })
        }
        Request::Release {
            channel,
            agent,
            peer,
        } => reply(ServerFrame::Released {
            released: broker.release_held(caller, &channel, &agent, &peer).await?,
        }),
        Request::Console { logout_all } => {
            // A browser's WebSocket on loopback is the owner too: only the
            // Unix socket's owner, or an admin token, gets a login link.
            if conn.door != "unix" && caller.identity().is_none() {
                return Err(Error::Forbidden {
                    rule: "admin",
                    detail:
                        "console links are for the owner over the Unix socket, or an admin token"
                            .into(),
                });
            }
            reply(if logout_all {
                ServerFrame::Console {
                    link: None,
                    ended: Some(broker.console_logout_all(caller)?),
                }
            } else {
                ServerFrame::Console {
                    link: Some(broker.console_link(caller)?),
                    ended: None,
                }
            })
        }
        Request::Tail => {
            // Every message on the bus (the caller's channel, for a token
            // bound to one): for the owner and admins only. A bounded tap:
            // a watcher that cannot keep up misses messages.
            trust.may_admin(caller)?;
            let sees = caller.clone();
            let tap = futures::stream::unfold(broker.tap(TAIL_QUEUE), move |mut tap| {
                let sees = sees.clone();
                async move {
                    loop {
                        let t = tap.recv().await?;
                        if sees.sees(&t.message.channel) {
                            return Some((vec![wire::message_bytes(&t.message)], tap));
                        }
                    }
                }
            });
            Ok(Outcome::Stream {
                reply: None,
                frames: tap.boxed(),
            })
        }
        Request::Agents => reply(ServerFrame::AgentsList {
            agents: broker.summaries(caller).await?,
        }),
        Request::Forget(key) => {
            broker.forget(caller, key.clone()).await?;
            reply(ServerFrame::Forgotten {
                agent: key.agent.to_string(),
                channel: key.channel.to_string(),
            })
        }
        Request::IdentityAdd(spec) => {
            trust.may_admin(caller)?;
            let (identity, token) = broker.add_identity(spec).await?;
            let token = Some(token);
            reply(ServerFrame::Identity { identity, token })
        }
        Request::IdentityRotate(name) => {
            trust.may_admin(caller)?;
            let (identity, token) = broker.rotate_identity(&name).await?;
            let token = Some(token);
            reply(ServerFrame::Identity { identity, token })
        }
        Request::IdentityRevoke(name) => {
            trust.may_admin(caller)?;
            let identity = broker.revoke_identity(&name).await?;
            reply(ServerFrame::Identity {
                identity,
                token: None,
            })
        }
        Request::IdentityList => {
            trust.may_admin(caller)?;
            reply(ServerFrame::Identities {
                identities: trust.identities(),
            })
        }
    }
}

/// A `send` or `message`: from the connection's agent unless it names one.
async fn submit(
    conn: &Conn<'_>,
    mut env: Envelope,
    target: Target,
    reply: Reply,
) -> Result<Outcome> {
    let id = env
        .id
        .get_or_insert_with(hermod_core::model::new_id)
        .clone();
    if env.from.is_none() {
        env.from = conn.agent.map(|k| k.agent.clone());
    }
    let (from, to) = (env.from.clone(), env.to.clone());
    let channel = env.channel.clone();
    let durable = conn.broker.send(conn.caller, env, target).await?;
    let reply = match (reply, from, to) {
        (Reply::Sent(_), Some(from), Some(to)) => {
            Reply::Sent(conn.broker.notice(&from, &InboxKey::new(channel, to)))
        }
        (reply, ..) => reply,
    };
    Ok(Outcome::Pending {
        first: None,
        durable,
        id,
        reply,
    })
}

async fn peek(
    broker: &Broker,
    key: &InboxKey,
    after: Option<Seq>,
    limit: usize,
    door: Option<&str>,
) -> Result<ServerFrame> {
    let cursor = broker.cursor(key).await?;
    let batch = broker.read(key, after.unwrap_or(cursor), limit).await?;
    if let Some(door) = door {
        broker.delivered(key, door, &batch.messages).await;
    }
    Ok(ServerFrame::InboxPage {
        messages: batch
            .messages
            .iter()
            .map(|m| wire::MessageFrame::from(m.as_ref()))
            .collect(),
        cursor,
        gap: batch.gap,
    })
}

/// A batch as frames: the gap first (for clients that read gaps), then
/// the messages.
pub(crate) fn batch_frames(batch: &Batch, gaps: bool) -> Vec<Bytes> {
    let gap = batch
        .gap
        .filter(|_| gaps)
        .map(|g| ServerFrame::Gap(g).to_bytes());
    gap.into_iter()
        .chain(batch.messages.iter().map(|m| wire::message_bytes(m)))
        .collect()
}

/// Waits for durability and returns the frame owed to the sender, if any.
pub(crate) async fn reply_when_durable(
    durable: Durable,
    id: String,
    reply: Reply,
) -> Option<Bytes> {
    let frame = match durable.await {
        Ok(Ok(stored)) => {
            // Every request is answered, in order (pipelining clients pair
            // receipts by position): never silence for an empty answer.
            let Some(m) = stored.first() else {
                let e = Error::StorageBusy("the store did not say where it put the message".into());
                return Some(ServerFrame::error(&e, Some(id)).to_bytes());
            };
            match reply {
                Reply::Sent(notice) => Some(ServerFrame::Sent {
                    id: m.id.clone(),
                    seq: m.seq,
                    ts: m.ts,
                    notice,
                }),
                Reply::Published => Some(ServerFrame::Published {
                    id: m.id.clone(),
                    seq: Some(m.seq),
                    ts: Some(m.ts),
                }),
                Reply::ErrorsOnly => None,
            }
        }
        Ok(Err(e)) => Some(ServerFrame::error(&e, Some(id))),
        Err(_) => Some(ServerFrame::error(&Error::ShuttingDown, Some(id))),
    };
    frame.map(|f| f.to_bytes())
}
