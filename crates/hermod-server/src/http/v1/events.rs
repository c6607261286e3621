//! v1 topic events: publish, the pattern SSE stream, and durable agent
//! subscriptions.

use super::*;

/// A topic event to publish (hermes_events): the payload becomes the
/// envelope, with `type` (the topic), `ts` and `src` (first segment) filled
/// in only where the publisher left them out.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishRequest {
    /// `.`-separated, non-empty segments, e.g. `tui.tool.start`.
    #[schema(pattern = "^[^.]+([.][^.]+)*$", min_length = 1, max_length = 256)]
    topic: String,
    #[schema(value_type = Option<Object>)]
    payload: Option<serde_json::Map<String, serde_json::Value>>,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    from: Option<String>,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    /// Event id; a UUID is assigned when absent.
    #[schema(max_length = 256)]
    id: Option<String>,
    /// Answer only once durable (default: the fast class, answered at once
    /// and written with the next commit).
    #[serde(default)]
    durable: bool,
}

/// The event is accepted (`seq`/`ts` present when it was published durably).
#[derive(Serialize, ToSchema)]
pub(super) struct PublishReceipt {
    id: String,
    seq: Option<Seq>,
    ts: Option<f64>,
}

#[utoipa::path(
    post,
    path = "/v1/events",
    request_body = PublishRequest,
    responses(
        (status = 200, description = "Accepted (durable when asked)", body = PublishReceipt),
        (status = 400, description = "Invalid request or topic", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down, or the store is locked by another process (`storage_busy`, with Retry-After)", body = ErrorBody),
        (status = 507, description = "The store cannot write (disk full, I/O error; `storage_error`): nothing was stored", body = ErrorBody),
    )
)]
pub(super) async fn publish_event(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<PublishRequest>,
) -> Result<Json<PublishReceipt>, ApiError> {
    let from = req.from.map(AgentName::parse).transpose()?;
    let publication = Publication {
        topic: req.topic,
        payload: req.payload.unwrap_or_default(),
        channel: strict_channel(req.channel)?,
        from: None,
        id: req.id.filter(|i| !i.is_empty()),
        durable: req.durable,
    };
    match publish(&app, &caller, publication, from).await? {
        ServerFrame::Published { id, seq, ts } => Ok(Json(PublishReceipt { id, seq, ts })),
        _ => Err(hermod_core::Error::ShuttingDown.into()),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    /// `*` matches one segment, `**` any number (default `**`).
    #[param(pattern = "^[^.]+([.][^.]+)*$", min_length = 1, max_length = 256)]
    pattern: Option<String>,
    /// Channel (default `default`); `*` follows every channel.
    #[param(
        pattern = "^([A-Za-z0-9._:@-]{1,128}|[*])$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
    /// Start after this seq (default: from now; `Last-Event-ID` wins).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<Seq>,
}

/// SSE of topic events matching `pattern` (default `**`): from
/// `Last-Event-ID`, else `after`, else from now. Each event: `id:` = seq,
/// `data:` = a `message` frame whose `topic` is set and `body` is the envelope.
#[utoipa::path(
    get,
    path = "/v1/events",
    params(EventsQuery),
    responses(
        (status = 200, description = "An endless text/event-stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid pattern or channel", body = ErrorBody),
    )
)]
pub(super) async fn event_stream(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Q(q): Q<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let pattern = q.pattern.as_deref().unwrap_or("**");
    // `*`: every channel at once (the hermes_events firehose has none).
    let channel = match q.channel.as_deref() {
        Some("*") => None,
        _ => Some(strict_channel(q.channel)?),
    };
    let after = last_event_id(&headers)
        .or(q.after)
        .unwrap_or_else(|| app.broker.committed().0);
    let topics = app
        .broker
        .follow_pattern(&caller, channel, pattern, after)?;
    Ok(app.sse(message_events(topics, |_| true), caller.revoked()))
}

/// A durable subscription: matching events land in the agent's inbox.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscriptionRequest {
    /// `*` matches one segment, `**` any number (also none).
    #[schema(pattern = "^[^.]+([.][^.]+)*$", min_length = 1, max_length = 256)]
    pattern: String,
    #[schema(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
}

/// The agent's durable subscriptions on the channel.
#[derive(Serialize, ToSchema)]
pub(super) struct Subscriptions {
    patterns: Vec<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ChannelParam {
    #[param(
        pattern = "^[A-Za-z0-9._:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    channel: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/agents/{name}/subscriptions",
    params(AgentPath, ChannelParam),
    responses(
        (status = 200, description = "Durable subscriptions", body = Subscriptions),
        (status = 400, description = "Invalid name or pattern", body = ErrorBody),
    )
)]
pub(super) async fn list_subscriptions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(AgentPath { name }): P<AgentPath>,
    Q(q): Q<ChannelParam>,
) -> Result<Json<Subscriptions>, ApiError> {
    let key = InboxKey::new(strict_channel(q.channel)?, AgentName::parse(name)?);
    app.broker.trust().may_act_as(&caller, &key)?;
    Ok(Json(Subscriptions {
        patterns: app.broker.subscriptions(&key),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/agents/{name}/subscriptions",
    params(AgentPath),
    request_body = SubscriptionRequest,
    responses(
        (status = 200, description = "Durable subscriptions after adding", body = Subscriptions),
        (status = 400, description = "Invalid name or pattern", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down, or the store is locked by another process (`storage_busy`, with Retry-After)", body = ErrorBody),
        (status = 507, description = "The store cannot write (disk full, I/O error; `storage_error`): nothing was stored", body = ErrorBody),
    )
)]
pub(super) async fn add_subscription(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(AgentPath { name }): P<AgentPath>,
    JsonBody(req): JsonBody<SubscriptionRequest>,
) -> Result<Json<Subscriptions>, ApiError> {
    let key = InboxKey::new(strict_channel(req.channel)?, AgentName::parse(name)?);
    app.broker
        .subscribe(&caller, key.clone(), &req.pattern)
        .await?;
    Ok(Json(Subscriptions {
        patterns: app.broker.subscriptions(&key),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/agents/{name}/subscriptions",
    params(AgentPath),
    request_body = SubscriptionRequest,
    responses(
        (status = 200, description = "Durable subscriptions after removing", body = Subscriptions),
        (status = 400, description = "Invalid name or pattern", body = ErrorBody),
        (status = 413, description = "Body over 10 MiB", body = ErrorBody),
        (status = 503, description = "Shutting down, or the store is locked by another process (`storage_busy`, with Retry-After)", body = ErrorBody),
        (status = 507, description = "The store cannot write (disk full, I/O error; `storage_error`): nothing was stored", body = ErrorBody),
    )
)]
pub(super) async fn remove_subscription(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    P(AgentPath { name }): P<AgentPath>,
    JsonBody(req): JsonBody<SubscriptionRequest>,
) -> Result<Json<Subscriptions>, ApiError> {
    let key = InboxKey::new(strict_channel(req.channel)?, AgentName::parse(name)?);
    app.broker
        .unsubscribe(&caller, key.clone(), &req.pattern)
        .await?;
    Ok(Json(Subscriptions {
        patterns: app.broker.subscriptions(&key),
    }))
}
