//! The core error type. Every variant has a stable snake_case [`Error::code`]
//! that transports put on the wire; the `Display` text is the human detail.

/// Errors the broker and engines report to transports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame or body was not valid UTF-8 JSON, or not a JSON object.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The `type` of a frame is not one hermod knows.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// An agent or channel name breaks the naming rule.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A required field is missing or has the wrong type.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A frame or body is larger than the configured limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// A topic or pattern breaks the topic rules (non-empty `.`-segments).
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    /// A short-lived sender addressed a name the bus has never known.
    #[error("endpoint {0:?} is not known to the bus (never connected, no waiting messages)")]
    EndpointNotFound(String),
    /// No message, thread or agent by that id (`GET /v1/messages/{id}`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The store failed (disk full, an I/O error, writes stopped after an
    /// fsync failure); nothing was acknowledged.
    #[error("storage error: {0}")]
    Storage(String),
    /// Another process holds the store's write lock; nothing was
    /// acknowledged and the caller may retry.
    #[error("storage busy: {0}")]
    StorageBusy(String),
    /// The daemon is shutting down.
    #[error("the bus is shutting down")]
    ShuttingDown,
    /// The caller proved no identity the bus accepts (no token where one is
    /// needed, or a token that is unknown or revoked).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A token's sender is its agent: it may not send as another name, and a
    /// name that has an identity is only usable with its token.
    #[error("forbidden sender: {0}")]
    ForbiddenSender(String),
    /// An ACL rule denied the request; `rule` names it.
    #[error("forbidden by rule {rule}: {detail}")]
    Forbidden { rule: &'static str, detail: String },
    /// A connection already holds as many live subscriptions as it may;
    /// end one (or open another connection) first.
    #[error("this connection already has {limit} live subscriptions, the most one may hold; open another connection for more")]
    TooManySubscriptions { limit: usize },
    /// The sender is over its send rate; retry after `retry_after` seconds.
    #[error("rate limited: {sender} is over {rate} messages/s; retry in {retry_after:.3} s")]
    RateLimited {
        sender: String,
        rate: f64,
        retry_after: f64,
    },
}

impl Error {
    /// The stable code put on the wire (`{"type":"error","code":...}`).
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidJson(_) => "invalid_json",
            Error::UnknownType(_) => "unknown_type",
            Error::InvalidName { .. } => "invalid_name",
            Error::InvalidRequest(_) => "invalid_request",
            Error::InvalidTopic(_) => "invalid_topic",
            Error::TooLarge { .. } => "frame_too_large",
            Error::EndpointNotFound(_) => "endpoint_not_found",
            Error::NotFound(_) => "not_found",
            Error::Storage(_) => "storage_error",
            Error::StorageBusy(_) => "storage_busy",
            Error::ShuttingDown => "shutting_down",
            Error::Unauthorized(_) => "unauthorized",
            Error::ForbiddenSender(_) => "forbidden_sender",
            Error::Forbidden { .. } => "forbidden",
            Error::RateLimited { .. } => "rate_limited",
            Error::TooManySubscriptions { .. } => "too_many_subscriptions",
        }
    }
}

impl From<hermod_events::Error> for Error {
    fn from(e: hermod_events::Error) -> Self {
        Error::InvalidTopic(e.to_string())
    }
}

/// Result alias for the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
