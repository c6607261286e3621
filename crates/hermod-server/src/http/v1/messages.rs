//! v1 messages: send, read an inbox (long-poll), acknowledge, the per-agent
//! SSE stream, and the agent list.

use super::*;

/// A message to send: to one agent (`to`), or, without `to`, to every
/// agent known on the channel except the sender (a broadcast).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SendRequest {
    /// Sender name.
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    from: String,
    /// Recipient; without it the message is a broadcast.
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    to: Option<String>,
    /// Channel (default `default`).
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    /// Message id; a UUID is assigned when absent.
    #[schema(max_length = 256)]
    id: Option<String>,
    /// The payload: any JSON object, delivered byte for byte.
    #[schema(value_type = Object)]
    body: Box<RawValue>,
    /// The id of the message this one answers (its original is marked
    /// `replied` for this sender, and this one joins its thread).
    #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    reply_to: Option<String>,
    /// The conversation (default: the thread of `reply_to`).
    #[schema(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    thread: Option<String>,
    /// `urgent` and `normal` wake at once; `low` waits for a digest.
    priority: Option<Priority>,
    /// Seconds after which it is no longer delivered.
    #[schema(exclusive_minimum = 0, exclusive_maximum = 1000000000)]
    ttl: Option<f64>,
    /// Seconds after which an unread direct message bounces to its sender.
    #[schema(exclusive_minimum = 0, exclusive_maximum = 1000000000)]
    bounce_after: Option<f64>,
    /// States to get a `receipt` message for.
    notify: Option<Vec<DeliveryState>>,
}

/// The message is durable.
#[derive(Serialize, ToSchema)]
pub(super) struct SendReceipt {
    id: String,
    seq: Seq,
    ts: f64,
    channel: String,
    /// What the sender should know: the recipient is busy (it will see
    /// the message at its next turn), or the loop guard holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    notice: Option<String>,
}

/// One message, or an array of them stored in one commit.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // the schema's shape; requests parse into `SendBody`
pub(super) enum SendMany {
    One(SendRequest),
    Many(Vec<SendRequest>),
}

/// The answer: a receipt, or for an array one outcome per element.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(super) enum SendReply {
    One(SendReceipt),
    Many(Vec<SendOutcome>),
}

/// One element's outcome: stored, or why not.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(super) enum SendOutcome {
    Sent(SendReceipt),
    Failed(ErrorBody),
}

/// Most messages in one `POST /v1/messages` array.
pub(super) const MAX_BATCH: usize = 1000;

/// The request body: an object sends one message, an array many (a
/// malformed element refuses the request; each valid one then succeeds or
/// fails on its own, e.g. `rate_limited`). Told apart by the first token,
/// so a single send keeps its precise field errors.
pub(super) enum SendBody {
    One(SendRequest),
    Many(Vec<SendRequest>),
}

impl<'de> Deserialize<'de> for SendBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = SendBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object or an array of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<SendBody, A::Error> {
                SendRequest::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(SendBody::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<SendBody, A::Error> {
                Vec::<SendRequest>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(SendBody::Many)
            }
        }
        d.deserialize_any(Either)
    }
}

impl SendRequest {
    fn envelope(self) -> hermod_core::Result<Envelope> {
        Ok(Envelope {
            to: self.to.map(AgentName::parse).transpose()?,
            from: Some(AgentName::parse(self.from)?),
            id: self.id.filter(|i| !i.is_empty()),
            sent_ts: None,
            channel: strict_channel(self.channel)?,
            body: Body::from_raw(&self.body)?,
            meta: MetaFields {
                reply_to: self.reply_to.into(),
                thread: self.thread.into(),
                priority: self.priority.map(|p| p.as_str()).into(),
                ttl: self.ttl.into(),
                bounce_after: self.bounce_after.into(),
                notify: self
                    .notify
                    .map(|n| n.iter().map(|s| s.as_str()).collect::<Vec<_>>())
                    .into(),
            }
            .parse()?,
        })
    }
}

impl From<&Message> for SendReceipt {
    fn from(m: &Message) -> Self {
        SendReceipt {
            id: m.id.clone(),
            seq: m.seq,
            ts: m.ts,
            channel: m.channel.to_string(),
            notice: None,
        }
    }
}

#[utoipa::path(
    post,
    path = "/v1/messages",
    request_body = SendMany,
    responses(
        (status = 200, description = "Durable (for an array: one receipt or error per element, in order)", body = SendReply),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down, or the store is locked by another process (`storage_busy`, with Retry-After)", body = ErrorBody),
        (status = 507, description = "The store cannot write (disk full, I/O error; `storage_error`): nothing was stored", body = ErrorBody),
    )
)]
pub(super) async fn send_message(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<SendBody>,
) -> Result<Json<SendReply>, ApiError> {
    match req {
        SendBody::One(req) => {
            let m = app
                .broker
                .send_durable(&caller, req.envelope()?, Target::Any)
                .await?;
            let mut receipt = SendReceipt::from(m.as_ref());
            if let Some(to) = &m.to {
                let key = InboxKey::new(m.channel.clone(), to.clone());
                receipt.notice = app.broker.notice(&m.from, &key);
            }
            Ok(Json(SendReply::One(receipt)))
        }
        SendBody::Many(reqs) => {
            if reqs.len() > MAX_BATCH {
                return Err(ApiError::bad_request(format!(
                    "at most {MAX_BATCH} messages per request"
                )));
            }
            // A malformed element (bad name, bad body) refuses the whole
            // request, nothing stored: it is a client bug, not an outcome.
            let envs = reqs
                .into_iter()
                .enumerate()
                .map(|(i, req)| {
                    req.envelope().map_err(|e| {
                        let mut api = ApiError::from(e);
                        api.detail = format!("message {i}: {}", api.detail);
                        api
                    })
                })
                .collect::<Result<Vec<_>, ApiError>>()?;
            let results = app
                .broker
                .send_many(&caller, envs, Target::Any)
                .await?
                .into_iter()
                .map(|result| match result {
                    Ok(m) => SendOutcome::Sent(SendReceipt::from(m.as_ref())),
                    Err(e) => SendOutcome::Failed(ErrorBody::from(&e)),
                })
                .collect();
            Ok(Json(SendReply::Many(results)))
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/agents",
    responses((status = 200, description = "Every known agent (for a token bound to a channel: those of its channel)", body = [AgentSummary]))
)]
pub(super) async fn list_agents(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<AgentSummary>>, ApiError> {
    Ok(Json(app.broker.summaries(&caller).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct InboxQuery {
    /// Channel (default `default`).
    #[param(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    /// Return messages after this seq (default: the agent's cursor).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<Seq>,
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// When nothing is there yet, wait up to this many seconds for a message.
    #[param(minimum = 0, maximum = 30)]
    wait: Option<f64>,
}

/// One stored message.
#[derive(Serialize, ToSchema)]
pub(super) struct MessageView {
    seq: Seq,
    id: String,
    ts: f64,
    channel: String,
    from: String,
    /// Absent for a broadcast.
    to: Option<String>,
    /// Set for topic events (the body is then the envelope).
    topic: Option<String>,
    sent_ts: Option<f64>,
    /// How the sender was verified: `token`, `owner` or `open`.
    auth: hermod_core::model::Auth,
    /// `reply_to`, `thread`, `priority`, `expires`, ... when set.
    #[serde(flatten)]
    meta: Meta,
    #[schema(value_type = Object)]
    body: Box<RawValue>,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        MessageView {
            seq: m.seq,
            id: m.id.clone(),
            ts: m.ts,
            channel: m.channel.to_string(),
            from: m.from.to_string(),
            to: m.to.as_ref().map(|t| t.to_string()),
            topic: m.topic.clone(),
            sent_ts: m.sent_ts,
            auth: m.auth,
            meta: m.meta().clone(),
            body: m.body.as_raw().to_owned(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct InboxPage {
    messages: Vec<MessageView>,
    /// The agent's acknowledged position.
    cursor: Seq,
    /// Present when retention already removed messages after `after`:
    /// those up to `pruned_through` are gone, `messages` start after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    gap: Option<GapView>,
}

/// Messages a reader asked for that retention removed.
#[derive(Serialize, ToSchema)]
pub(super) struct GapView {
    /// Where the read asked to start.
    after: Seq,
    /// Every message of the inbox up to this seq is gone.
    pruned_through: Seq,
}

#[utoipa::path(
    get,
    path = "/v1/agents/{name}/inbox",
    params(AgentPath, InboxQuery),
    responses(
        (status = 200, description = "Messages after `after`, oldest first", body = InboxPage),
        (status = 400, description = "Invalid name or parameter", body = ErrorBody),
        (status = 503, description = "Shutting down, or the store is locked by another process (`storage_busy`, with Retry-After)", body = ErrorBody),
        (status = 507, description = "The store cannot write (disk full, I/O error; `storage_error`): nothing was stored", body = ErrorBody),
    )
)]
pub(super) async fn read_inbox(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(AgentPath { name }): P<AgentPath>,
    Q(q): Q<InboxQuery>,
) -> Result<Json<InboxPage>, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    app.broker.trust().may_act_as(&caller, &key)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    let wait = q.wait.unwrap_or(0.0);
    if !(0.0..=MAX_WAIT).contains(&wait) {
        return Err(ApiError::bad_request(format!(
            "wait must be 0 to {MAX_WAIT} seconds"
        )));
    }
    if q.after.is_some_and(|a| a > SEQ_MAX) {
        return Err(ApiError::bad_request(format!(
            "after must be at most {SEQ_MAX}"
        )));
    }
    let cursor = app.broker.cursor(&key).await?;
    let after = q.after.unwrap_or(cursor);
    let wait = std::time::Duration::from_secs_f64(wait).min(app.config.max_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let reader = Reader::Inbox(key.clone());
    let read = app.broker.read_wait(&reader, after, limit, deadline);
    let may_read = |t: &Trust| t.may_act_as(&caller, &key);
    let batch = app.long_poll(may_read, read).await?;
    app.broker.delivered(&key, "poll", &batch.messages).await;
    Ok(Json(InboxPage {
        messages: batch
            .messages
            .iter()
            .map(|m| MessageView::from(m.as_ref()))
            .collect(),
        cursor,
        gap: batch.gap.map(|g| GapView {
            after: g.after,
            pruned_through: g.pruned_through,
        }),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AckRequest {
    /// Everything up to and including this seq is acknowledged.
    #[serde(deserialize_with = "seq_from_json")]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    seq: Seq,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct AckReply {
    cursor: Seq,
}

#[utoipa::path(
    post,
    path = "/v1/agents/{name}/ack",
    params(AgentPath),
    request_body = AckRequest,
    responses(
        (status = 200, description = "The cursor after the acknowledgement", body = AckReply),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down, or the store is locked by another process (`storage_busy`, with Retry-After)", body = ErrorBody),
        (status = 507, description = "The store cannot write (disk full, I/O error; `storage_error`): nothing was stored", body = ErrorBody),
    )
)]
pub(super) async fn ack(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(AgentPath { name }): P<AgentPath>,
    JsonBody(req): JsonBody<AckRequest>,
) -> Result<Json<AckReply>, ApiError> {
    let key = InboxKey::new(strict_channel(req.channel)?, AgentName::parse(name)?);
    app.broker.trust().may_act_as(&caller, &key)?;
    app.broker.ack(&key, req.seq, "http").await?;
    let cursor = app.broker.cursor(&key).await?;
    Ok(Json(AckReply { cursor }))
}

#[derive(Deserialize)]
pub(super) struct StreamQuery {
    channel: Option<String>,
    after: Option<Seq>,
}

/// SSE: the inbox from `Last-Event-ID`, else `after`, else the cursor.
pub(super) async fn stream(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(name): P<String>,
    Q(q): Q<StreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    let session = app
        .broker
        .connect(&caller, key.clone(), "sse", false)
        .await?;
    let after = match last_event_id(&headers).or(q.after) {
        Some(seq) => seq,
        None => app.broker.cursor(&key).await?,
    };
    let broker = app.broker.clone();
    let inbox = app.broker.follow(key.clone(), after).then(move |batch| {
        let (broker, key) = (broker.clone(), key.clone());
        async move {
            if let Ok(b) = &batch {
                broker.delivered(&key, "sse", &b.messages).await;
            }
            batch
        }
    });
    // The stream holds the presence: the agent shows online while it is
    // open, and it ends when the session is kicked or its token revoked.
    let ends = session.kicked.clone();
    Ok(app.sse(
        message_events(inbox, move |_| {
            let _presence = &session;
            true
        }),
        &ends,
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct IdPath {
    /// A message id.
    #[param(min_length = 1, max_length = 256)]
    id: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ReceiptQuery {
    /// Answer once every recipient reached this state (or `timeout` passed).
    wait: Option<DeliveryState>,
    /// Seconds `wait` waits at most (default 30).
    #[param(minimum = 0, maximum = 30)]
    timeout: Option<f64>,
}

#[utoipa::path(
    get,
    path = "/v1/messages/{id}",
    params(IdPath, ReceiptQuery),
    responses(
        (status = 200, description = "Every stored message with this id and each recipient's delivery state", body = [ReceiptView]),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 404, description = "No message with this id that the caller may see", body = ErrorBody),
    )
)]
pub(super) async fn get_message(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(IdPath { id }): P<IdPath>,
    Q(q): Q<ReceiptQuery>,
) -> Result<Json<Vec<ReceiptView>>, ApiError> {
    let wait = q.timeout.unwrap_or(30.0);
    if !(0.0..=MAX_WAIT).contains(&wait) {
        return Err(ApiError::bad_request(format!(
            "timeout must be 0 to {MAX_WAIT} seconds"
        )));
    }
    let receipts = match q.wait {
        Some(state) => {
            let wait = std::time::Duration::from_secs_f64(wait).min(app.config.max_wait);
            let deadline = tokio::time::Instant::now() + wait;
            let receipts = app.broker.wait_receipt(&caller, &id, state, deadline);
            app.long_poll(|_| caller.check(), receipts).await?
        }
        None => app.broker.receipts(&caller, &id).await?,
    };
    Ok(Json(receipts.iter().map(|r| r.view()).collect()))
}

#[utoipa::path(
    get,
    path = "/v1/threads/{id}",
    params(IdPath),
    responses(
        (status = 200, description = "The conversation the message belongs to, oldest first (what the caller may see; a token bound to a channel sees nothing of another)", body = [MessageView]),
        (status = 404, description = "No such thread", body = ErrorBody),
    )
)]
pub(super) async fn get_thread(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(IdPath { id }): P<IdPath>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    let messages = app.broker.thread(&caller, &id).await?;
    Ok(Json(
        messages
            .iter()
            .map(|m| MessageView::from(m.as_ref()))
            .collect(),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PresenceRequest {
    /// `busy` in a turn, `idle` between turns (`online` clears it).
    status: Activity,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/agents/{name}/presence",
    params(AgentPath),
    request_body = PresenceRequest,
    responses(
        (status = 200, description = "Set, and published as the topic event `presence.<name>`", body = PresenceRequest),
        (status = 400, description = "Invalid request", body = ErrorBody),
    )
)]
pub(super) async fn set_presence(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(AgentPath { name }): P<AgentPath>,
    JsonBody(req): JsonBody<PresenceRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = InboxKey::new(strict_channel(req.channel)?, AgentName::parse(name)?);
    app.broker
        .set_presence(&caller, key.clone(), req.status)
        .await?;
    Ok(Json(serde_json::json!({
        "status": req.status,
        "channel": key.channel,
    })))
}
