//! One mapping from errors to HTTP responses: a status and a JSON body
//! `{"error": detail, "code": stable_code}` (agent-bus clients read `error`).

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hermod_core::Error;
use serde::de::DeserializeOwned;

/// An error as an HTTP response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Seconds for a `Retry-After` header (rate limits).
    pub retry_after: Option<f64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidJson(_)
            | Error::UnknownType(_)
            | Error::InvalidName { .. }
            | Error::InvalidRequest(_)
            | Error::InvalidTopic(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::EndpointNotFound(_) | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Error::Storage(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::StorageBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::ForbiddenSender(_) | Error::Forbidden { .. } => StatusCode::FORBIDDEN,
            Error::RateLimited { .. } | Error::TooManySubscriptions { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
        };
        let retry_after = match &e {
            Error::RateLimited { retry_after, .. } => Some(*retry_after),
            Error::StorageBusy(_) => Some(1.0),
            _ => None,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        Self {
            status,
            code: e.code(),
            detail: e.to_string(),
            retry_after,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.detail, "code": self.code });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            // Whole seconds, rounded up, as RFC 9110 asks.
            let secs = (secs.ceil() as u64).max(1);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        ) {
            // The unread body makes the connection unusable: say so.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

/// A JSON request body whatever its content type (agent-bus scripts do not
/// always set one), with our error shapes: 413 over the body limit, 400
/// for anything that is not the expected JSON.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = hermod_core::wire::MAX_FRAME;
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // Refused from the header alone: the body is never read.
        if let Some(size) = declared.filter(|&n| n > limit) {
            return Err(Error::TooLarge { size, limit }.into());
        }
        let bytes =
            axum::body::Bytes::from_request(req, state)
                .await
                .map_err(|e: BytesRejection| {
                    if body_timed_out(&e) {
                        ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            "request_timeout",
                            "the request body stopped arriving",
                        )
                    } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::from(Error::TooLarge {
                            size: limit + 1,
                            limit,
                        })
                    } else {
                        ApiError::bad_request(e.body_text())
                    }
                })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            // Broken JSON is `invalid_json`; well-formed JSON of the wrong
            // shape (missing field, wrong type) is `invalid_request`.
            ApiError::from(
                match std::str::from_utf8(&bytes)
                    .map_err(|u| u.to_string())
                    .and_then(|text| {
                        serde_json::from_str::<serde::de::IgnoredAny>(text)
                            .map_err(|j| j.to_string())
                    }) {
                    Err(syntax) => Error::InvalidJson(syntax),
                    Ok(_) => Error::InvalidRequest(e.to_string()),
                },
            )
        })
    }
}

/// Did reading the body fail on the body timeout (`RequestBodyTimeoutLayer`
/// in [`app`](super::app))? The timeout error sits somewhere down the
/// rejection's source chain.
fn body_timed_out(e: &BytesRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Unknown routes answer 404 with a JSON body.
pub async fn fallback(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// A known route with the wrong method answers 405 with a JSON body.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// `Query<T>` with a JSON 400 on bad parameters.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(t)| Q(t))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// `WebSocketUpgrade` with our error shape: a request to a WebSocket route
/// that is not an upgrade (a plain GET, no `Connection: upgrade`, no
/// `Sec-WebSocket-Key`) is answered like any bad request, JSON with a code
/// (axum's own rejection is plain text), keeping its status.
pub struct Ws(pub axum::extract::ws::WebSocketUpgrade);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Ws {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::ws::WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(Ws)
            .map_err(|e| {
                let code = if e.status() == StatusCode::METHOD_NOT_ALLOWED {
                    "method_not_allowed"
                } else {
                    "invalid_request"
                };
                ApiError::new(e.status(), code, e.body_text())
            })
    }
}

/// `Path<T>` with a JSON 400 on bad segments.
pub struct P<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> axum::extract::FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(t)| P(t))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}
