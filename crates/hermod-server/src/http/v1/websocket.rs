//! The v1 WebSocket of an agent: its inbox pushed from the cursor, and the
//! hermes-bus JSON frames (`send`, `ack`, `ping`, `publish`, `subscribe`, ...)
//! answered on the same socket.

use super::*;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};

#[derive(Deserialize)]
pub(super) struct ChannelQuery {
    channel: Option<String>,
}

pub(super) async fn upgrade(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(name): P<String>,
    Q(q): Q<ChannelQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    // Refused before the upgrade, with a status the client can read.
    let session = app
        .broker
        .connect(&caller, key.clone(), "ws", false)
        .await?;
    Ok(upgrade
        .max_message_size(wire::MAX_FRAME)
        .on_upgrade(move |socket| ws_session(app, caller, key, session, socket))
        .into_response())
}

pub(super) async fn ws_session(
    app: AppState,
    caller: Caller,
    key: InboxKey,
    _session: hermod_core::broker::Session,
    socket: WebSocket,
) {
    let broker = app.broker.clone();
    let Ok(cursor) = broker.cursor(&key).await else {
        return;
    };
    let mut inbox = Box::pin(broker.follow(key.clone(), cursor));
    let mut live = TopicStreams::new();
    let (mut tx, mut rx) = socket.split();
    loop {
        let out: Vec<String> = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            batch = inbox.next() => match batch {
                Some(Ok(batch)) => batch_frames(&batch).collect(),
                _ => break,
            },
            Some(events) = live.next(), if !live.is_empty() => events,
            incoming = rx.next() => match incoming {
                Some(Ok(ws::Message::Text(text))) => ws_request(&app, &caller, &key, text.as_bytes(), &mut live).await.into_iter().collect(),
                Some(Ok(ws::Message::Binary(_))) => {
                    let e = hermod_core::Error::InvalidJson("frames are JSON text".into());
                    vec![frame_json(ServerFrame::error(&e, None))]
                }
                Some(Ok(_)) => continue, // ping/pong are answered by axum
                _ => break,
            },
        };
        for text in out {
            if tx.send(ws::Message::Text(text.into())).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.close().await;
}

/// A batch as WebSocket text frames: the gap first, if any.
fn batch_frames(batch: &Batch) -> impl Iterator<Item = String> + '_ {
    let gap = batch.gap.map(|g| frame_json(ServerFrame::Gap(g)));
    gap.into_iter()
        .chain(batch.messages.iter().map(|m| frame_text(m)))
}

pub(super) fn frame_json(frame: ServerFrame) -> String {
    String::from_utf8(frame.to_bytes().to_vec()).expect("serde_json writes UTF-8")
}
/// Live topic subscriptions of one WebSocket: each yields the frames of the
/// matching events of a batch.
pub(super) type TopicStreams =
    futures::stream::SelectAll<futures::stream::BoxStream<'static, Vec<String>>>;

/// Topic events of `channel` matching `pattern`, from now on, as frames.
pub(super) fn topic_frames(
    app: &AppState,
    caller: &Caller,
    channel: Channel,
    pattern: &str,
) -> hermod_core::Result<futures::stream::BoxStream<'static, Vec<String>>> {
    let start = app.broker.committed().0;
    let events = app
        .broker
        .follow_pattern(caller, Some(channel), pattern, start)?;
    Ok(events
        .filter_map(|batch| futures::future::ready(batch.ok().map(|b| batch_frames(&b).collect())))
        .boxed())
}

/// Handles one client frame on a v1 WebSocket; returns the reply, if any.
/// Frames without a `channel` use the socket's channel.
pub(super) async fn ws_request(
    app: &AppState,
    caller: &Caller,
    key: &InboxKey,
    bytes: &[u8],
    live: &mut TopicStreams,
) -> Option<String> {
    let request = match wire::parse_client_frame_in(bytes, &key.channel) {
        Ok(r) => r,
        Err(e) => return Some(frame_json(ServerFrame::error(&e, None))),
    };
    let reply = match request {
        Request::Ping => Ok(ServerFrame::Pong),
        Request::Status => Ok(ServerFrame::status(app.broker.degraded())),
        Request::Send(mut env) | Request::Message(mut env) => {
            env.from = env.from.or_else(|| Some(key.agent.clone()));
            let id = env.id.clone();
            match app.broker.send_durable(caller, env, Target::Any).await {
                Ok(m) => Ok(ServerFrame::Sent {
                    id: m.id.clone(),
                    seq: m.seq,
                    ts: m.ts,
                }),
                Err(e) => Err((e, id)),
            }
        }
        Request::Publish(p) => {
            let from = p.from.clone().or_else(|| Some(key.agent.clone()));
            match publish(app, caller, p, from).await {
                Ok(frame) => Ok(frame),
                Err(e) => Err((e, None)),
            }
        }
        Request::Subscribe {
            pattern, durable, ..
        } => match Pattern::parse(&pattern) {
            Err(e) => Err((e.into(), None)),
            Ok(_) if durable => match app.broker.subscribe(caller, key.clone(), &pattern).await {
                Ok(_) => Ok(ServerFrame::Subscribed { pattern, durable }),
                Err(e) => Err((e, None)),
            },
            Ok(_) => match topic_frames(app, caller, key.channel.clone(), &pattern) {
                Ok(frames) => {
                    live.push(frames);
                    Ok(ServerFrame::Subscribed { pattern, durable })
                }
                Err(e) => Err((e, None)),
            },
        },
        Request::Ack(seq) => match app.broker.ack(key, seq).await {
            Ok(_) => return None,
            Err(e) => Err((e, None)),
        },
        Request::ListEndpoints => Ok(ServerFrame::EndpointsList {
            endpoints: app.broker.endpoints(),
        }),
        Request::Agents
        | Request::Register { .. }
        | Request::Inbox { .. }
        | Request::Tail
        | Request::IdentityAdd(_)
        | Request::IdentityList
        | Request::IdentityRotate(_)
        | Request::IdentityRevoke(_)
        | Request::Forget(_) => Err((
            hermod_core::Error::InvalidRequest(
                "use GET /v1/agents; the agent of a WebSocket is in its URL".into(),
            ),
            None,
        )),
    };
    Some(match reply {
        Ok(frame) => frame_json(frame),
        Err((e, id)) => frame_json(ServerFrame::error(&e, id)),
    })
}
