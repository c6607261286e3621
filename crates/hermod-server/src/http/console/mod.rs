//! The web console at `/console`: server-rendered pages and one SSE feed,
//! over the same broker every other door uses.
//!
//! Who may look: whoever holds a session, and a session comes only from a
//! one-time link that `hermod console` asks for over the Unix socket (as
//! the owner, or with an admin token). The session cookie is HttpOnly,
//! SameSite=Strict, Path=/console; without it every console route answers
//! 401 with a page saying how to log in, and no bus data. The HTTP edge's
//! token/uid check does not apply here (a browser on this machine runs as
//! the owner's uid, which must not be enough), its browser boundary does.
//! Every write needs the session, its CSRF token, and a same-origin
//! `Origin`.
//!
//! What it cannot do: hurt the bus. Pages read the broker's in-memory
//! views (the recent-traffic ring, the registry, the guard's holds) and a
//! bounded number of store reads (one receipt, one thread, unread counts
//! of at most [`AGENTS_MAX`] agents); the feed is a bounded queue that
//! misses updates rather than slowing the feed, and at most
//! [`hermod_core::broker::console::WATCHERS_MAX`] feeds run at once.
//! Assets are embedded in the binary and the CSP allows nothing else.

mod html;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use hermod_core::auth::{secrets_equal, Caller};
use hermod_core::broker::{AgentInfo, ConsoleSession, Live, Seen, Target};
use hermod_core::model::{self, Activity, AgentName, Auth, Body, Channel, Meta, State as Delivery};
use hermod_core::wire::Envelope;
use serde::Deserialize;

use super::AppState;
use crate::actions::Nudge;
use html::{esc, url, Nav};

/// The session cookie.
const COOKIE: &str = "hermod_console";
/// Rows of the feed a page starts with.
const FEED_ROWS: usize = 100;
/// Agents a page lists (and counts unread for) at most.
pub const AGENTS_MAX: usize = 500;
/// Unread messages from which an agent needs attention.
const UNREAD_PILING: u64 = 10;
/// Busy this long with mail waiting: needs attention.
const BUSY_LONG: f64 = 300.0;
/// Updates a feed may fall behind by before it misses some.
const FEED_QUEUE: usize = 256;
/// Recipients a message page shows the steps of, at most.
const RECIPIENTS_SHOWN: usize = 100;
/// Longest compose text.
const TEXT_MAX: usize = 64 * 1024;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; object-src 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const LOGO: &str = include_str!("assets/logo.svg");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(overview))
        .route("/console/", get(overview))
        .route("/console/login/{link}", get(login))
        .route("/console/logout", post(logout))
        .route("/console/feed", get(feed))
        .route("/console/agents", get(agents))
        .route("/console/agents/nudge", post(nudge))
        .route("/console/messages/{id}", get(message))
        .route("/console/threads", get(threads))
        .route("/console/threads/{id}", get(thread))
        .route("/console/holds", get(holds))
        .route("/console/holds/release", post(release))
        .route("/console/compose", get(compose_page).post(compose))
        .route("/console/assets/{name}", get(asset))
        .layer(axum::middleware::map_response(secure))
}

/// Every console answer: only hermod's own assets may load, never framed,
/// no referrer to other sites, nothing cached but assets. (Not
/// `no-referrer`: with it Chromium sends `Origin: null` on a form POST,
/// which the edge rightly refuses.)
async fn secure(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

/// The broker's view of a console user: the owner (a session was given
/// only to the owner or an admin).
fn operator_caller() -> Caller {
    Caller::trusted(Auth::Owner)
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

fn html_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn unauthorized(reason: &str) -> Response {
    html_response(StatusCode::UNAUTHORIZED, html::login_needed(reason))
}

/// The session of this request, or the 401 page.
/// (The refusal is boxed: a `Response` is large, and a refusal rare.)
fn session(app: &AppState, headers: &HeaderMap) -> Result<ConsoleSession, Box<Response>> {
    let idle = app.config.console_idle.as_secs_f64();
    // console.js marks its background refreshes: they are not a use.
    let renew = !headers.contains_key("x-console-refresh");
    cookie(headers)
        .and_then(|c| app.broker.console_session(&c, idle, renew))
        .ok_or_else(|| {
            Box::new(unauthorized(
                "You are not logged in to the console (or your session ended).",
            ))
        })
}

/// A write: the session, a same-origin request, and its CSRF token.
fn writer(
    app: &AppState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<ConsoleSession, Box<Response>> {
    let session = session(app, headers)?;
    let refuse = |why: &str| {
        Box::new(html_response(
            StatusCode::FORBIDDEN,
            html::page(
                "Refused",
                Nav::None,
                &session.csrf,
                &app.config.console_operator,
                &html::problem("Refused", why),
            ),
        ))
    };
    // The edge refused foreign origins already; a write must also *prove*
    // it comes from a console page: browsers send `Origin` on every POST.
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    let same = matches!((host, origin), (Some(h), Some(o)) if o == format!("http://{h}"));
    let site_ok = headers
        .get("sec-fetch-site")
        .is_none_or(|s| s.as_bytes() == b"same-origin");
    if !same || !site_ok {
        return Err(refuse("a console write must come from a console page"));
    }
    if !secrets_equal(&session.csrf, csrf) {
        return Err(refuse("the form's CSRF token is wrong (reload the page)"));
    }
    Ok(session)
}

fn framed(app: &AppState, s: &ConsoleSession, title: &str, nav: Nav, body: &str) -> Response {
    html_response(
        StatusCode::OK,
        html::page(title, nav, &s.csrf, &app.config.console_operator, body),
    )
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

async fn login(State(app): State<AppState>, Path(link): Path<String>) -> Response {
    let Some((secret, _)) = app.broker.console_login(&link) else {
        return unauthorized("This login link was already used, has expired (links work once, for 60 seconds), or never existed.");
    };
    let cookie = format!("{COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/console");
    let mut res = see_other("/console");
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("a token is a valid header value"),
    );
    res
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(app): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(res) = writer(&app, &headers, &form.csrf) {
        return *res;
    }
    if let Some(c) = cookie(&headers) {
        app.broker.console_logout(&c);
    }
    let mut res = unauthorized("You logged out.");
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "hermod_console=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0",
        ),
    );
    res
}

async fn asset(Path(name): Path<String>) -> Response {
    let (kind, body) = match name.as_str() {
        "console.css" => ("text/css; charset=utf-8", CSS),
        "console.js" => ("text/javascript; charset=utf-8", JS),
        "logo.svg" => ("image/svg+xml", LOGO),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The feed's filters (`?agent=&channel=&thread=`); empty means any.
#[derive(Deserialize, Default, Clone)]
struct Filter {
    #[serde(default)]
    agent: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    thread: String,
}

impl Filter {
    fn keeps(&self, s: &Seen) -> bool {
        let m = &s.message;
        (self.agent.is_empty()
            || m.from.as_str() == self.agent
            || m.to.as_deref() == Some(self.agent.as_str())
            || s.recipients.iter().any(|(r, _)| r.as_str() == self.agent))
            && (self.channel.is_empty() || m.channel.as_str() == self.channel)
            && (self.thread.is_empty()
                || m.id == self.thread
                || m.thread.as_deref() == Some(self.thread.as_str()))
    }

    fn query(&self) -> String {
        serde_urlencoded::to_string([
            ("agent", &self.agent),
            ("channel", &self.channel),
            ("thread", &self.thread),
        ])
        .unwrap_or_default()
    }
}

async fn overview(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> Response {
    let s = match session(&app, &headers) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let now = model::now();
    let (seq, ts) = app.broker.committed();
    let engine = tokio::time::timeout(Duration::from_millis(300), app.broker.describe_engine())
        .await
        .unwrap_or_else(|_| serde_json::json!({"engine": "(not answering)"}));
    let mut health = String::new();
    match app.broker.degraded() {
        None => health
            .push_str(r#"<p><span class="badge b-read">ok</span> the store accepts writes</p>"#),
        Some(why) => health.push_str(&format!(
            r#"<p><span class="badge b-bounced">degraded</span> {}</p>"#,
            esc(&why)
        )),
    }
    health.push_str("<dl>");
    if let serde_json::Value::Object(map) = &engine {
        for (k, v) in map {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            health.push_str(&format!("<dt>{}</dt><dd>{}</dd>", esc(k), esc(&v)));
        }
    }
    health.push_str(&format!(
        "<dt>log seq</dt><dd>{seq}</dd><dt>last commit</dt><dd>{}</dd><dt>retention floors</dt><dd>{}</dd><dt>pruned since start</dt><dd>{}</dd><dt>retention gaps told</dt><dd>{}</dd></dl>",
        if ts > 0.0 { html::ago(ts, now) } else { "never".into() },
        match app.broker.retention_floors() {
            (0, _) => "nothing pruned yet".to_owned(),
            (n, top) => format!("{n} view(s) pruned, up to seq {top}"),
        },
        app.broker.pruned(),
        app.broker.gaps(),
    ));

    let rates = app.broker.rates();
    let last_minute: u64 = rates.iter().rev().take(6).sum();
    let total: u64 = rates.iter().sum();
    let peak = rates.iter().copied().max().unwrap_or(0).max(1);
    let mut chart = String::from(
        r#"<svg class="chart" viewBox="0 0 600 80" width="100%" height="80" role="img" aria-label="messages per 10 seconds, last 10 minutes">"#,
    );
    for (i, n) in rates.iter().enumerate() {
        let h = (*n as f64 / peak as f64 * 76.0)
            .round()
            .max(if *n > 0 { 2.0 } else { 0.0 });
        chart.push_str(&format!(
            r#"<rect x="{}" y="{}" width="8" height="{}"><title>{n}</title></rect>"#,
            i * 10 + 1,
            80.0 - h,
            h
        ));
    }
    chart.push_str("</svg>");

    let rows = agent_rows(&app, now).await;
    let attention: Vec<&AgentRow> = rows
        .iter()
        .filter(|r| r.group == Group::Attention)
        .collect();
    let mut att = String::new();
    if attention.is_empty() {
        att.push_str(r#"<p class="muted">No agent needs attention.</p>"#);
    } else {
        att.push_str("<ul class=\"attention\">");
        for r in attention.iter().take(10) {
            att.push_str(&format!(
                "<li>{} <span class=\"muted\">({})</span>: {}</li>",
                html::agent_link(&r.info.name),
                esc(&r.info.channel),
                esc(&r.why.join("; "))
            ));
        }
        att.push_str("</ul>");
    }
    let known: Vec<String> = rows
        .iter()
        .map(|r| html::agent_link(&r.info.name))
        .collect();

    let feed: String = app
        .broker
        .recent(FEED_ROWS, |x| filter.keeps(x))
        .iter()
        .map(html::feed_row)
        .collect();
    let filtering =
        !(filter.agent.is_empty() && filter.channel.is_empty() && filter.thread.is_empty());
    let body = format!(
        r#"<div class="grid" id="summary" data-refresh="5">
<section class="card"><h2>Health and store</h2>{health}</section>
<section class="card"><h2>Messages</h2><p><b>{last_minute}</b> in the last minute · <b>{total}</b> in 10 minutes</p>{chart}<p class="muted">per 10 s, last 10 minutes (this node)</p></section>
<section class="card"><h2>Needs attention</h2>{att}<p class="muted">Known agents ({count}): <span id="known">{known}</span></p></section>
</div>
<section class="card">
<div class="feedhead"><h2>Live feed</h2>
<form class="filters" method="get" action="/console">
<input name="agent" placeholder="agent" value="{fa}"> <input name="channel" placeholder="channel" value="{fc}"> <input name="thread" placeholder="thread" value="{ft}">
<button type="submit">filter</button>{clear}</form>
<button type="button" id="pause" aria-pressed="false">pause</button> <span id="feed-status" class="muted">connecting…</span></div>
<table class="feed"><thead><tr><th>time</th><th>from → to</th><th>channel</th><th>message</th><th>sender</th><th>state</th></tr></thead>
<tbody id="feed" data-src="/console/feed?{query}">{feed}</tbody></table>
</section>"#,
        count = rows.len(),
        known = known.join(", "),
        fa = esc(&filter.agent),
        fc = esc(&filter.channel),
        ft = esc(&filter.thread),
        clear = if filtering {
            r#" <a href="/console">clear</a>"#
        } else {
            ""
        },
        query = esc(&filter.query()),
    );
    framed(&app, &s, "Overview", Nav::Overview, &body)
}

/// The live feed: new messages as rows, badge changes as they happen.
async fn feed(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> Response {
    let s = match session(&app, &headers) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let Some(watch) = app.broker.watch_traffic(FEED_QUEUE) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many console feeds are open; close one",
        )
            .into_response();
    };
    let lagged = watch.lagged.clone();
    let events = futures::stream::unfold(watch.rx, |mut rx| async move {
        let live = rx.recv().await?;
        Some((live, rx))
    })
    .filter_map(move |live| {
        // This feed's queue was full: it missed an update, and the page
        // reloads rather than show a stale badge.
        let event = if lagged.swap(false, std::sync::atomic::Ordering::Relaxed) {
            Some(Event::default().event("lagged").data("reload"))
        } else {
            match live {
                Live::Message(seen) if filter.keeps(&seen) => {
                    Some(Event::default().event("msg").data(html::feed_row(&seen)))
                }
                Live::Message(_) => None,
                Live::Badge { seq, badge } => Some(
                    Event::default()
                        .event("badge")
                        .data(serde_json::json!({"seq": seq, "badge": badge}).to_string()),
                ),
            }
        };
        std::future::ready(event.map(Ok::<_, std::convert::Infallible>))
    });
    app.sse(events, &s.ended).into_response()
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Attention,
    Busy,
    Idle,
    Offline,
}

struct AgentRow {
    info: AgentInfo,
    unread: u64,
    group: Group,
    why: Vec<String>,
}

/// Every agent the console lists (at most [`AGENTS_MAX`]), grouped.
async fn agent_rows(app: &AppState, now: f64) -> Vec<AgentRow> {
    let mut agents = app.broker.agents(&operator_caller());
    agents.truncate(AGENTS_MAX);
    let holds = app.broker.holds(AGENTS_MAX, 0);
    let mut bounced: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in app.broker.recent(usize::MAX, |s| {
        s.recipients.iter().any(|(_, st)| *st == Delivery::Bounced)
    }) {
        for (r, st) in &s.recipients {
            if *st == Delivery::Bounced {
                *bounced
                    .entry((s.message.channel.to_string(), r.to_string()))
                    .or_default() += 1;
            }
        }
    }
    let mut rows = Vec::with_capacity(agents.len());
    for info in agents {
        let key = model::InboxKey::new(info.channel.clone(), info.name.clone());
        let unread = app.broker.unread(&key).await.unwrap_or(0);
        let mut why = Vec::new();
        if unread >= UNREAD_PILING {
            why.push(format!("{unread} unread piling up"));
        }
        if let Some(n) = bounced.get(&(info.channel.to_string(), info.name.to_string())) {
            why.push(format!("{n} bounced"));
        }
        for h in holds
            .iter()
            .filter(|h| h.channel == info.channel && (h.a == info.name || h.b == info.name))
        {
            let other = if h.a == info.name { &h.b } else { &h.a };
            why.push(format!(
                "the loop guard holds {} message(s) with {other}",
                h.held
            ));
        }
        if let Some((Activity::Busy, since)) = info.activity {
            if unread > 0 && now - since > BUSY_LONG {
                why.push(format!(
                    "busy for {} min with mail waiting",
                    ((now - since) / 60.0) as u64
                ));
            }
        }
        let group = if !why.is_empty() {
            Group::Attention
        } else {
            match info.presence() {
                Activity::Busy => Group::Busy,
                Activity::Idle | Activity::Online => Group::Idle,
                Activity::Offline => Group::Offline,
            }
        };
        rows.push(AgentRow {
            info,
            unread,
            group,
            why,
        });
    }
    rows.sort_by(|a, b| (a.group, &a.info.name).cmp(&(b.group, &b.info.name)));
    rows
}

#[derive(Deserialize, Default)]
struct Flash {
    #[serde(default)]
    done: String,
}

fn flash(f: &Flash) -> String {
    if f.done.is_empty() {
        String::new()
    } else {
        format!(r#"<p class="flash">{}</p>"#, esc(&f.done))
    }
}

async fn agents(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&app, &headers) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let now = model::now();
    let rows = agent_rows(&app, now).await;
    let mut body = flash(&f);
    body.push_str(r#"<div id="groups" data-refresh="10">"#);
    for (group, title) in [
        (Group::Attention, "Needs attention"),
        (Group::Busy, "Busy"),
        (Group::Idle, "Idle"),
        (Group::Offline, "Offline"),
    ] {
        let members: Vec<&AgentRow> = rows.iter().filter(|r| r.group == group).collect();
        body.push_str(&format!(
            r#"<section class="card group g-{g}"><h2>{title} <span class="muted">({n})</span></h2>"#,
            g = title.split(' ').next().unwrap_or_default().to_lowercase(),
            n = members.len()
        ));
        if members.is_empty() {
            body.push_str(r#"<p class="muted">none</p></section>"#);
            continue;
        }
        body.push_str("<table><thead><tr><th>agent</th><th>channel</th><th>presence</th><th>transports</th><th>last seen</th><th>unread</th><th>verification</th><th>last wake-up</th><th></th></tr></thead><tbody>");
        for r in members {
            let a = &r.info;
            let transports: Vec<&str> = a.connections.iter().map(|c| c.transport).collect();
            let verification = if app.broker.trust().identity(&a.name).is_some() {
                "token"
            } else {
                app.broker.trust().mode().as_str()
            };
            let wake = match app.actions.last_wake(&a.name) {
                Some(w) => match &w.error {
                    None => format!(
                        r#"{} <span class="badge b-read">worked</span> {}"#,
                        w.kind,
                        html::ago(w.ts, now)
                    ),
                    Some(e) => format!(
                        r#"{} <span class="badge b-bounced" title="{}">failed</span> {}"#,
                        w.kind,
                        esc(e),
                        html::ago(w.ts, now)
                    ),
                },
                None => r#"<span class="muted">none yet</span>"#.to_owned(),
            };
            let why = if r.why.is_empty() {
                String::new()
            } else {
                format!(r#"<div class="why">{}</div>"#, esc(&r.why.join("; ")))
            };
            body.push_str(&format!(
                r#"<tr><td>{name}{why}</td><td>{channel}</td><td>{presence}</td><td>{transports}</td><td>{seen}</td><td>{unread}</td><td>{verification}</td><td>{wake}</td><td><form method="post" action="/console/agents/nudge"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="agent" value="{n}"><input type="hidden" name="channel" value="{c}"><button type="submit">nudge</button></form></td></tr>"#,
                name = html::agent_link(&a.name),
                channel = esc(&a.channel),
                presence = html::badge(presence_name(a.presence())),
                transports = esc(&transports.join(", ")),
                seen = html::ago(a.last_seen, now),
                unread = r.unread,
                csrf = esc(&s.csrf),
                n = esc(&a.name),
                c = esc(&a.channel),
            ));
        }
        body.push_str("</tbody></table></section>");
    }
    body.push_str("</div>");
    if rows.len() >= AGENTS_MAX {
        body.push_str(&format!(
            r#"<p class="muted">Only the first {AGENTS_MAX} agents are listed.</p>"#
        ));
    }
    framed(&app, &s, "Agents", Nav::Agents, &body)
}

fn presence_name(a: Activity) -> &'static str {
    match a {
        Activity::Online => "online",
        Activity::Idle => "idle",
        Activity::Busy => "busy",
        Activity::Offline => "offline",
    }
}

#[derive(Deserialize)]
struct NudgeForm {
    #[serde(default)]
    csrf: String,
    agent: String,
    channel: String,
}

async fn nudge(
    State(app): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<NudgeForm>,
) -> Response {
    if let Err(res) = writer(&app, &headers, &form.csrf) {
        return *res;
    }
    let (Ok(agent), Ok(channel)) = (AgentName::parse(&form.agent), Channel::parse(&form.channel))
    else {
        return see_other("/console/agents?done=no+such+agent");
    };
    let key = model::InboxKey::new(channel, agent);
    let unread = app.broker.unread(&key).await.unwrap_or(0);
    let done = match app.actions.nudge(Nudge {
        channel: key.channel.to_string(),
        agent: key.agent.to_string(),
        unread,
        by: app.config.console_operator.clone(),
    }) {
        Ok(()) => format!("nudged {}: its wake-up actions run now", key.agent),
        Err(why) => format!("cannot nudge {}: {why}", key.agent),
    };
    see_other(&format!("/console/agents?done={}", url(&done)))
}

async fn message(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let s = match session(&app, &headers) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let caller = operator_caller();
    let receipts = match app
        .broker
        .receipts_within(&caller, &id, RECIPIENTS_SHOWN)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let body = html::problem("No such message", &e.to_string());
            return html_response(
                StatusCode::NOT_FOUND,
                html::page(
                    "Message",
                    Nav::None,
                    &s.csrf,
                    &app.config.console_operator,
                    &body,
                ),
            );
        }
    };
    let now = model::now();
    let mut body = String::new();
    for r in &receipts {
        let m = &r.message;
        let meta = m.meta();
        let pretty = serde_json::from_str::<serde_json::Value>(m.body.as_str())
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or_else(|_| m.body.as_str().to_owned());
        let to = match &m.to {
            Some(to) => html::agent_link(to),
            None => "everyone (broadcast)".to_owned(),
        };
        let mut facts = format!(
            "<dt>from</dt><dd>{} {}</dd><dt>to</dt><dd>{to}</dd><dt>channel</dt><dd>{}</dd><dt>stored</dt><dd>{} UTC ({}) · seq {}</dd><dt>id</dt><dd class=\"mono\">{}</dd>",
            html::agent_link(&m.from),
            html::auth_mark(&m.from, m.auth),
            esc(&m.channel),
            html::clock(m.ts),
            html::ago(m.ts, now),
            m.seq,
            esc(&m.id),
        );
        if let Some(t) = &meta.thread {
            facts.push_str(&format!(
                r#"<dt>thread</dt><dd><a href="/console/threads/{}">{}</a></dd>"#,
                url(t),
                esc(t)
            ));
        }
        if let Some(p) = &meta.reply_to {
            facts.push_str(&format!(
                "<dt>reply to</dt><dd>{}</dd>",
                html::message_link(p)
            ));
        }
        let mut recipients = String::new();
        for rv in &r.recipients {
            recipients.push_str(&format!(
                r#"<div class="recipient"><h3>{} {}</h3><ol class="timeline">"#,
                html::agent_link(&rv.agent),
                html::badge(rv.state.as_str())
            ));
            for step in &rv.steps {
                recipients.push_str(&format!(
                    r#"<li class="s-{state}"><span class="mono">{time}</span> {badge} <span class="door">{door}</span>{note}</li>"#,
                    state = step.state.as_str(),
                    time = html::clock(step.ts),
                    badge = html::badge(step.state.as_str()),
                    door = match &step.door {
                        Some(d) => format!("via {}", esc(d)),
                        None => String::new(),
                    },
                    note = match &step.note {
                        Some(n) => format!(r#" <span class="muted">{}</span>"#, esc(n)),
                        None => String::new(),
                    },
                ));
            }
            recipients.push_str("</ol></div>");
        }
        if r.recipients.is_empty() {
            recipients.push_str(r#"<p class="muted">It landed in no inbox.</p>"#);
        }
        if r.recipients.len() >= RECIPIENTS_SHOWN {
            recipients.push_str(&format!(
                r#"<p class="muted">The first {RECIPIENTS_SHOWN} recipients are shown.</p>"#
            ));
        }
        body.push_str(&format!(
            r#"<section class="card"><h1>Message {short}</h1><dl>{facts}</dl></section>
<div class="grid two"><section class="card"><h2>Recipients</h2>{recipients}</section>
<section class="card"><h2>Body</h2><pre class="body">{pretty}</pre></section></div>"#,
            short = esc(&m.id.chars().take(8).collect::<String>()),
            pretty = esc(&pretty),
        ));
    }
    // The conversation around it: up to 25 before and after.
    if let Ok(thread) = app.broker.thread(&caller, &id).await {
        if thread.len() > 1 {
            let at = thread.iter().position(|m| m.id == id).unwrap_or(0);
            let lo = at.saturating_sub(25);
            let hi = (at + 26).min(thread.len());
            body.push_str(r#"<section class="card"><h2>Thread</h2><ol class="thread">"#);
            for m in &thread[lo..hi] {
                body.push_str(&html::thread_item(m, m.id == id, 120));
            }
            body.push_str("</ol></section>");
        }
    }
    framed(&app, &s, "Message", Nav::None, &body)
}

async fn threads(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let s = match session(&app, &headers) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let now = model::now();
    // Threads seen in the recent traffic, newest activity first.
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, (usize, HashSet<String>, Seen)> = BTreeMap::new();
    for seen in app
        .broker
        .recent(usize::MAX, |s| s.message.thread.is_some())
    {
        let t = seen.message.thread.clone().unwrap_or_default();
        let entry = by.entry(t.clone()).or_insert_with(|| {
            order.push(t.clone());
            (0, HashSet::new(), seen.clone())
        });
        entry.0 += 1;
        entry.1.insert(seen.message.from.to_string());
        if let Some(to) = &seen.message.to {
            entry.1.insert(to.to_string());
        }
    }
    let mut body = String::from(r#"<section class="card"><h1>Threads</h1>"#);
    if order.is_empty() {
        body.push_str(r#"<p class="muted">No conversation in the recent traffic. A reply (<code>reply_to</code>) starts one.</p>"#);
    } else {
        body.push_str("<table><thead><tr><th>thread</th><th>messages (recent)</th><th>who</th><th>last</th><th>newest</th></tr></thead><tbody>");
        for t in order.iter().take(200) {
            let (n, who, last) = &by[t];
            let mut who: Vec<&String> = who.iter().collect();
            who.sort();
            body.push_str(&format!(
                r#"<tr><td><a class="mono" href="/console/threads/{}">{}</a></td><td>{n}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                url(t),
                esc(&t.chars().take(8).collect::<String>()),
                who.iter().map(|w| html::agent_link(w)).collect::<Vec<_>>().join(", "),
                html::ago(last.message.ts, now),
                esc(&last.message.preview(100)),
            ));
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</section>");
    framed(&app, &s, "Threads", Nav::Threads, &body)
}

async fn thread(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let s = match session(&app, &headers) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let messages = match app.broker.thread(&operator_caller(), &id).await {
        Ok(m) => m,
        Err(e) => {
            return html_response(
                StatusCode::NOT_FOUND,
                html::page(
                    "Thread",
                    Nav::Threads,
                    &s.csrf,
                    &app.config.console_operator,
                    &html::problem("No such thread", &e.to_string()),
                ),
            )
        }
    };
    let mut body = format!(
        r#"<section class="card"><h1>Thread {}</h1><p><a href="/console?thread={}">follow it in the live feed</a></p><ol class="thread">"#,
        esc(&id.chars().take(8).collect::<String>()),
        url(&id)
    );
    for m in messages.iter().rev().take(200).rev() {
        body.push_str(&html::thread_item(m, false, 160));
    }
    body.push_str("</ol></section>");
    framed(&app, &s, "Thread", Nav::Threads, &body)
}

async fn holds(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&app, &headers) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let now = model::now();
    let holds = app.broker.holds(100, 20);
    let mut body = flash(&f);
    body.push_str(r#"<section class="card"><h1>Loop-guard holds</h1>"#);
    if holds.is_empty() {
        body.push_str(r#"<p class="muted">The loop guard holds nothing.</p>"#);
    }
    for h in &holds {
        let until = h
            .until
            .map(|u| {
                format!(
                    "cooldown ends {}",
                    if u > now {
                        format!("in {} s", (u - now) as u64)
                    } else {
                        "now".into()
                    }
                )
            })
            .unwrap_or_default();
        body.push_str(&format!(
            r#"<div class="hold"><h2>{a} ⇄ {b} <span class="muted">on {c}</span> {badge}</h2><p>{n} message(s) held · {until}</p>
<form method="post" action="/console/holds/release"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="channel" value="{ce}"><input type="hidden" name="a" value="{ae}"><input type="hidden" name="b" value="{be}"><button type="submit" class="primary">release</button></form><ol class="thread">"#,
            a = html::agent_link(&h.a),
            b = html::agent_link(&h.b),
            c = esc(&h.channel),
            badge = html::badge("held"),
            n = h.held,
            csrf = esc(&s.csrf),
            ce = esc(&h.channel),
            ae = esc(&h.a),
            be = esc(&h.b),
        ));
        for m in &h.oldest {
            body.push_str(&html::thread_item(m, false, 120));
        }
        body.push_str("</ol></div>");
    }
    body.push_str("</section>");
    framed(&app, &s, "Holds", Nav::Holds, &body)
}

#[derive(Deserialize)]
struct ReleaseForm {
    #[serde(default)]
    csrf: String,
    channel: String,
    a: String,
    b: String,
}

async fn release(
    State(app): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<ReleaseForm>,
) -> Response {
    if let Err(res) = writer(&app, &headers, &form.csrf) {
        return *res;
    }
    let parsed = (
        Channel::parse(&form.channel),
        AgentName::parse(&form.a),
        AgentName::parse(&form.b),
    );
    let (Ok(channel), Ok(a), Ok(b)) = parsed else {
        return see_other("/console/holds?done=no+such+hold");
    };
    let done = match app
        .broker
        .release_held(&operator_caller(), &channel, &a, &b)
        .await
    {
        Ok(n) => format!("released {a} and {b}: {n} held message(s) went on"),
        Err(e) => format!("releasing {a} and {b} failed: {e}"),
    };
    see_other(&format!("/console/holds?done={}", url(&done)))
}

fn compose_form(
    app: &AppState,
    s: &ConsoleSession,
    error: &str,
    to: &str,
    text: &str,
    channel: &str,
) -> Response {
    let names: Vec<String> = app
        .broker
        .agents(&operator_caller())
        .into_iter()
        .take(AGENTS_MAX)
        .map(|a| format!(r#"<option value="{}">"#, esc(&a.name)))
        .collect();
    let error = if error.is_empty() {
        String::new()
    } else {
        format!(r#"<p class="flash error">{}</p>"#, esc(error))
    };
    let body = format!(
        r#"<section class="card narrow"><h1>Compose</h1>{error}
<form method="post" action="/console/compose" class="compose">
<input type="hidden" name="csrf" value="{csrf}">
<label>to <input name="to" list="agents" value="{to}" placeholder="an agent, or empty for everyone"></label>
<datalist id="agents">{names}</datalist>
<label>channel <input name="channel" value="{channel}" placeholder="default"></label>
<label>text <textarea name="text" rows="6" required>{text}</textarea></label>
<p class="muted">Sent as <b>{operator}</b> (verified: owner) — the server stamps the sender.</p>
<button type="submit" class="primary">send</button>
</form></section>"#,
        csrf = esc(&s.csrf),
        to = esc(to),
        names = names.concat(),
        channel = esc(channel),
        text = esc(text),
        operator = esc(&app.config.console_operator),
    );
    framed(app, s, "Compose", Nav::Compose, &body)
}

async fn compose_page(State(app): State<AppState>, headers: HeaderMap) -> Response {
    match session(&app, &headers) {
        Ok(s) => compose_form(&app, &s, "", "", "", ""),
        Err(res) => *res,
    }
}

/// The compose form's fields. No `from`: the sender is the operator.
#[derive(Deserialize)]
struct ComposeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    channel: String,
}

async fn compose(
    State(app): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<ComposeForm>,
) -> Response {
    let s = match writer(&app, &headers, &form.csrf) {
        Ok(s) => s,
        Err(res) => return *res,
    };
    let fail = |e: &str| compose_form(&app, &s, e, &form.to, &form.text, &form.channel);
    if form.text.trim().is_empty() || form.text.len() > TEXT_MAX {
        return fail("the text must be 1 to 65536 bytes");
    }
    let to = match form.to.trim() {
        "" => None,
        name => match AgentName::parse(name) {
            Ok(n) => Some(n),
            Err(e) => return fail(&e.to_string()),
        },
    };
    let channel = match form.channel.trim() {
        "" => Channel::default(),
        c => match Channel::parse(c) {
            Ok(c) => c,
            Err(e) => return fail(&e.to_string()),
        },
    };
    let from = match AgentName::parse(&app.config.console_operator) {
        Ok(f) => f,
        Err(e) => return fail(&format!("the operator name is not valid: {e}")),
    };
    let mut body = serde_json::Map::new();
    body.insert("text".into(), serde_json::Value::String(form.text.clone()));
    let env = Envelope {
        to,
        from: Some(from),
        id: None,
        sent_ts: None,
        channel,
        body: Body::from_map(body),
        meta: Meta::default(),
    };
    match app
        .broker
        .send_durable(&operator_caller(), env, Target::Any)
        .await
    {
        Ok(m) => see_other(&format!("/console/messages/{}", url(&m.id))),
        Err(e) => fail(&e.to_string()),
    }
}
