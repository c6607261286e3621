//! The HTTP edge: every request passes here before any protocol sees it.
//!
//! 1. **Browser boundary.** A request a browser makes on behalf of another
//!    site never reaches the broker: a `Host` that is not a loopback name or
//!    address (or the bound address, or `--allow-host`) — DNS rebinding —,
//!    an `Origin` that is not hermod's own (or `--allow-origin`), and any
//!    `Sec-Fetch-Site` other than `same-origin` or `none` (an `<img>` or
//!    form from a page on another port of localhost is `same-site` and sends
//!    no `Origin`) are refused with 403. Scripts and CLI clients send none
//!    of these headers and are unaffected. No CORS header is ever sent, so
//!    a page cannot read any answer either.
//! 2. **Who is calling.** The token (`Authorization: Bearer`, a `/a/TOKEN/`
//!    path prefix for clients that only take a base URL, or `?token=` on the
//!    relay WebSockets) and the peer's uid (looked up once per connection by
//!    the listener) become a [`Caller`] through the broker's trust policy;
//!    handlers take it as an extension. A caller that proved nothing the
//!    mode accepts gets 401 here.
//!
//! The console (`/console...`) passes the browser boundary only: it logs
//! its users in with its own session cookie, since a browser on this
//! machine runs as the owner's uid and must not be the owner for that.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hermod_core::auth::{Caller, Origin};

use super::error::ApiError;
use super::listener::Peer;
use super::AppState;

/// The path prefix that carries a token: `/a/TOKEN/send`.
const TOKEN_PREFIX: &str = "/a/";

pub async fn edge(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Err(e) = browser_boundary(&app, req.headers()) {
        return e.into_response();
    }
    let path = req.uri().path();
    if path == "/console" || path.starts_with("/console/") {
        return next.run(req).await;
    }
    let mut token = bearer(req.headers());
    if let Some((path_token, rest)) = split_token_path(req.uri()) {
        token = Some(path_token);
        *req.uri_mut() = rest;
    }
    let relay = matches!(req.uri().path(), "/api/pub" | "/api/events");
    if relay {
        let query = query_token(req.uri());
        // The relay's shared secret is checked by the relay itself; an
        // agent token may stand in for it.
        if query
            .as_deref()
            .is_some_and(|q| app.config.is_relay_token(q))
        {
            return next.run(req).await;
        }
        token = token.or(query);
    }
    let peer = req.extensions().get::<Peer>();
    let owner = peer
        .and_then(|p| p.uid)
        .is_some_and(|uid| app.config.owner_uids.contains(&uid));
    // What an unverified sender is charged to: the socket's uid where the
    // kernel told it, else the peer's address (never a header).
    let origin = peer.map(|p| match p.uid {
        Some(uid) => Origin::Uid(uid),
        None => Origin::Addr(p.addr.ip()),
    });
    match app.broker.trust().authenticate(owner, token.as_deref()) {
        Ok(caller) => {
            let caller = caller.from_origin(origin);
            req.extensions_mut().insert::<Caller>(caller);
            next.run(req).await
        }
        Err(e) => {
            let mut response = ApiError::from(e).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"hermod\""),
            );
            response
        }
    }
}

fn forbidden(detail: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

fn browser_boundary(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let config = &app.config;
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or_default();
        if !host_allowed(host, config) {
            return Err(forbidden(format!(
                "Host {host:?} is not this bus (a loopback name or address, or --allow-host)"
            )));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !origin_allowed(origin, config) {
            return Err(forbidden(format!(
                "requests from the web origin {origin:?} are refused (--allow-origin adds one)"
            )));
        }
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or_default();
        if !matches!(site, "same-origin" | "none") {
            // An allow-listed origin may still call cross-site.
            let listed = headers
                .get(header::ORIGIN)
                .and_then(|o| o.to_str().ok())
                .is_some_and(|o| config.allow_origins.iter().any(|a| a == o));
            if !listed {
                return Err(forbidden(format!(
                    "a {site} browser request is refused: pages of other sites may not use the bus"
                )));
            }
        }
    }
    Ok(())
}

/// The host part of a `Host` value (`name`, `name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn host_allowed(host: &str, config: &super::HttpConfig) -> bool {
    let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        if ip.is_loopback() || ip == config.addr.ip() {
            return true;
        }
    }
    config
        .allow_hosts
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(&name))
}

fn origin_allowed(origin: &str, config: &super::HttpConfig) -> bool {
    if config.allow_origins.iter().any(|a| a == origin) {
        return true;
    }
    // hermod's own origin on its bound port (for the console to come).
    let Some(rest) = origin.strip_prefix("http://") else {
        return false;
    };
    let port = config.addr.port();
    match rest.rsplit_once(':') {
        Some((name, p)) if p.parse::<u16>().ok() == Some(port) => {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip == config.addr.ip())
        }
        _ => false,
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// `/a/TOKEN/rest?q` → (`TOKEN`, `/rest?q`).
fn split_token_path(uri: &Uri) -> Option<(String, Uri)> {
    let rest = uri.path().strip_prefix(TOKEN_PREFIX)?;
    let (token, path) = match rest.split_once('/') {
        Some((t, p)) => (t, format!("/{p}")),
        None => (rest, "/".to_owned()),
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let rewritten = Uri::builder().path_and_query(path_and_query).build().ok()?;
    Some((token.to_owned(), rewritten))
}

fn query_token(uri: &Uri) -> Option<String> {
    let query = uri.query()?;
    url_form_value(query, "token")
}

fn url_form_value(query: &str, key: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> super::super::HttpConfig {
        super::super::HttpConfig::new("127.0.0.1:18900".parse().unwrap())
    }

    #[test]
    fn hosts_and_origins() {
        let c = config();
        for ok in [
            "127.0.0.1:18900",
            "localhost",
            "LOCALHOST:1",
            "[::1]:18900",
            "127.0.0.2",
        ] {
            assert!(host_allowed(ok, &c), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:18900",
            "10.0.0.1",
            "localhost.evil.com",
        ] {
            assert!(!host_allowed(bad, &c), "{bad}");
        }
        assert!(origin_allowed("http://127.0.0.1:18900", &c));
        assert!(origin_allowed("http://localhost:18900", &c));
        for bad in [
            "http://127.0.0.1:8000",
            "null",
            "http://evil.example",
            "https://127.0.0.1:18900",
        ] {
            assert!(!origin_allowed(bad, &c), "{bad}");
        }
    }

    #[test]
    fn token_paths() {
        let uri: Uri = "/a/hmd_x/recv?to=b&since=1".parse().unwrap();
        let (t, rest) = split_token_path(&uri).unwrap();
        assert_eq!(
            (t.as_str(), rest.to_string().as_str()),
            ("hmd_x", "/recv?to=b&since=1")
        );
        assert!(split_token_path(&"/send".parse().unwrap()).is_none());
        assert_eq!(
            query_token(&"/api/pub?channel=g&token=a%2Bb".parse().unwrap()).as_deref(),
            Some("a+b")
        );
    }
}
