//! The v1 WebSocket of an agent: its inbox pushed from the cursor, and the
//! hermes-bus JSON frames (`send`, `ack`, `ping`, `publish`, `subscribe`, ...)
//! answered on the same socket.

use super::*;
use crate::frames::{self, Outcome};
use axum::extract::ws::{self, WebSocket};
use bytes::Bytes;

#[derive(Deserialize)]
pub(super) struct ChannelQuery {
    channel: Option<String>,
}

pub(super) async fn upgrade(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(name): P<String>,
    Q(q): Q<ChannelQuery>,
    Ws(upgrade): Ws,
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

/// Replies waiting for durability at once; beyond it the socket is not
/// read until some resolve.
const MAX_PENDING: usize = 8192;

pub(super) async fn ws_session(
    app: AppState,
    caller: Caller,
    key: InboxKey,
    session: hermod_core::broker::Session,
    socket: WebSocket,
) {
    let broker = app.broker.clone();
    let Ok(cursor) = broker.cursor(&key).await else {
        return;
    };
    let mut inbox = Box::pin(broker.follow(key.clone(), cursor));
    let mut live = futures::stream::SelectAll::<frames::Frames>::new();
    let mut pending = futures::stream::FuturesOrdered::<
        futures::future::BoxFuture<'static, Option<Bytes>>,
    >::new();
    let (mut tx, mut rx) = socket.split();
    loop {
        let out: Vec<Bytes> = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            // Kicked, or the agent's token revoked or rotated.
            _ = session.kicked.cancelled() => break,
            batch = inbox.next() => match batch {
                Some(Ok(batch)) => {
                    broker.delivered(&key, "ws", &batch.messages).await;
                    frames::batch_frames(&batch, true)
                }
                _ => break,
            },
            Some(batch) = live.next(), if !live.is_empty() => batch,
            Some(reply) = pending.next(), if !pending.is_empty() => reply.into_iter().collect(),
            incoming = rx.next(), if pending.len() < MAX_PENDING => match incoming {
                Some(Ok(ws::Message::Text(text))) => {
                    match ws_request(&app, &caller, &key, text.as_bytes(), live.len()).await {
                        Outcome::Reply(frame) => frame.map(|f| f.to_bytes()).into_iter().collect(),
                        Outcome::Pending { first, durable, id, reply } => {
                            pending.push_back(Box::pin(frames::reply_when_durable(durable, id, reply)));
                            first.map(|f| f.to_bytes()).into_iter().collect()
                        }
                        Outcome::Stream { reply, frames } => {
                            live.push(frames);
                            reply.map(|f| f.to_bytes()).into_iter().collect()
                        }
                        Outcome::Register { .. } => unreachable!("answered in ws_request"),
                    }
                }
                Some(Ok(ws::Message::Binary(_))) => {
                    let e = hermod_core::Error::InvalidJson("frames are JSON text".into());
                    vec![ServerFrame::error(&e, None).to_bytes()]
                }
                Some(Ok(_)) => continue, // ping/pong are answered by axum
                _ => break,
            },
        };
        for frame in out {
            // The frame's bytes as they are (serde_json writes UTF-8): no copy.
            let text = ws::Utf8Bytes::try_from(frame).expect("frames are JSON text");
            if tx.send(ws::Message::Text(text)).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.close().await;
}

/// Handles one client frame on a v1 WebSocket through the shared
/// dispatcher, as the socket's agent; frames without a `channel` use the
/// socket's channel. Never [`Outcome::Register`]: that is answered here.
/// `live`: the subscriptions the socket holds now (a `SelectAll` drops
/// ended ones).
async fn ws_request(
    app: &AppState,
    caller: &Caller,
    key: &InboxKey,
    bytes: &[u8],
    live: usize,
) -> Outcome {
    let error = |e: &hermod_core::Error, id| Outcome::Reply(Some(ServerFrame::error(e, id)));
    let request = match wire::parse_client_frame_in(bytes, &key.channel) {
        Ok(r) => r,
        Err(e) => return error(&e, None),
    };
    let refused = match &request {
        Request::Register { .. } => Some("the agent of a WebSocket is in its URL"),
        r if r.manages_identities() => {
            Some("identities are managed over the Unix socket (`hermod identity`)")
        }
        _ => None,
    };
    if let Some(why) = refused {
        return error(&hermod_core::Error::InvalidRequest(why.into()), None);
    }
    let id = frames::request_id(&request);
    let conn = frames::Conn {
        broker: &app.broker,
        caller,
        agent: Some(key),
        gaps: true,
        door: "ws",
        live,
    };
    match frames::dispatch(conn, request).await {
        Ok(outcome) => outcome,
        Err(e) => error(&e, id),
    }
}
