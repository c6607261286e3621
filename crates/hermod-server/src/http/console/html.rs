//! The console's HTML: escaping, the page frame, and the pieces several
//! screens share (a feed row, a badge, times). Plain `format!` over
//! [`esc`]: every string that came from the bus (names, ids, bodies,
//! notes) goes through it, so a hostile message body is text, never markup.

use std::fmt::Write;

use hermod_core::broker::Seen;
use hermod_core::model::{AgentName, Auth, Message};

/// HTML-escapes `s` for text and for quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes `s` for a path segment or a query value.
pub fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `HH:MM:SS` (UTC) of a bus time.
pub fn clock(ts: f64) -> String {
    let secs = ts.max(0.0) as u64;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `3 s ago`, `5 min ago`, `2 h ago`, `4 d ago`.
pub fn ago(ts: f64, now: f64) -> String {
    let d = (now - ts).max(0.0);
    match d {
        d if d < 60.0 => format!("{} s ago", d as u64),
        d if d < 3600.0 => format!("{} min ago", (d / 60.0) as u64),
        d if d < 86_400.0 => format!("{} h ago", (d / 3600.0) as u64),
        d => format!("{} d ago", (d / 86_400.0) as u64),
    }
}

/// A one-line preview of a body: its text (or compact JSON), control
/// characters shown escaped, cut at `max` characters.
pub fn preview(m: &Message, max: usize) -> String {
    hermod_core::text::terminal_line(&m.body.to_text(), max)
}

/// A state badge (its class is the state, styled by console.css).
pub fn badge(state: &str) -> String {
    format!(r#"<span class="badge b-{0}">{0}</span>"#, esc(state))
}

/// How a sender was verified, marked when nothing proved the name.
pub fn auth_mark(from: &AgentName, auth: Auth) -> String {
    // The daemon's own names (receipts, guard notices) nobody else may use.
    if from.is_reserved() {
        return r#"<span class="auth ok" title="sent by the daemon itself">daemon</span>"#
            .to_owned();
    }
    if auth.verified() {
        r#"<span class="auth ok" title="sender proved by its token">token</span>"#.to_owned()
    } else {
        format!(
            r#"<span class="auth warn" title="the sender name was not proved by a token">{} · unverified</span>"#,
            auth.as_str()
        )
    }
}

/// One message of a conversation, as a list item: time, sender →
/// recipient, and its preview linked to its page (`here`: the one shown).
pub fn thread_item(m: &Message, here: bool, preview_chars: usize) -> String {
    format!(
        r#"<li{}><span class="mono">{}</span> {} → {}: <a href="/console/messages/{}">{}</a></li>"#,
        if here { r#" class="here""# } else { "" },
        clock(m.ts),
        agent_link(&m.from),
        m.to.as_deref().map_or("everyone".to_owned(), agent_link),
        url(&m.id),
        esc(&preview(m, preview_chars)),
    )
}

/// A link to an agent's filter of the overview feed.
pub fn agent_link(name: &str) -> String {
    format!(
        r#"<a class="agent" href="/console?agent={}">{}</a>"#,
        url(name),
        esc(name)
    )
}

/// A message id, linked to its page.
pub fn message_link(id: &str) -> String {
    let short: String = id.chars().take(8).collect();
    format!(
        r#"<a class="mono" href="/console/messages/{}" title="{}">{}</a>"#,
        url(id),
        esc(id),
        esc(&short)
    )
}

/// One row of the live feed (also what the stream pushes).
pub fn feed_row(s: &Seen) -> String {
    let m = &s.message;
    let to = match &m.to {
        Some(to) => agent_link(to),
        None => r#"<span class="muted">everyone</span>"#.to_owned(),
    };
    let thread = m
        .thread
        .as_deref()
        .map(|t| {
            format!(
                r#" <a class="thread" href="/console/threads/{}" title="thread">⤷</a>"#,
                url(t)
            )
        })
        .unwrap_or_default();
    format!(
        r#"<tr id="m-{seq}" data-seq="{seq}"><td class="mono">{time}</td><td>{from} → {to}</td><td>{channel}</td><td class="preview"><a href="/console/messages/{id}">{preview}</a>{thread}</td><td>{auth}</td><td class="state">{badge}</td></tr>"#,
        seq = m.seq,
        time = clock(m.ts),
        from = agent_link(&m.from),
        channel = esc(&m.channel),
        id = url(&m.id),
        preview = esc(&m.preview(140)),
        auth = auth_mark(&m.from, m.auth),
        badge = badge(s.badge()),
    )
}

/// Which screen a page belongs to (the nav marks it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Agents,
    Threads,
    Holds,
    Compose,
    None,
}

/// The page frame: head (only hermod's own stylesheet and script), nav,
/// `body`. `csrf` is there for the logout form.
pub fn page(title: &str, nav: Nav, csrf: &str, operator: &str, body: &str) -> String {
    let item = |n: Nav, href: &str, label: &str| {
        let class = if n == nav { r#" class="on""# } else { "" };
        format!(r#"<a href="{href}"{class}>{label}</a>"#)
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · hermod console</title>
<link rel="icon" href="/console/assets/logo.svg" type="image/svg+xml">
<link rel="stylesheet" href="/console/assets/console.css">
<script src="/console/assets/console.js" defer></script>
</head><body>
<header><a class="brand" href="/console"><img src="/console/assets/logo.svg" alt="" width="22" height="22"> hermod</a>
<nav>{o}{a}{t}{h}{c}</nav>
<form class="logout" method="post" action="/console/logout"><input type="hidden" name="csrf" value="{csrf}"><span class="muted">as {operator}</span> <button type="submit">log out</button></form>
</header>
<main>
{body}
</main></body></html>"#,
        title = esc(title),
        o = item(Nav::Overview, "/console", "Overview"),
        a = item(Nav::Agents, "/console/agents", "Agents"),
        t = item(Nav::Threads, "/console/threads", "Threads"),
        h = item(Nav::Holds, "/console/holds", "Holds"),
        c = item(Nav::Compose, "/console/compose", "Compose"),
        csrf = esc(csrf),
        operator = esc(operator),
    )
}

/// A page for someone without a session: how to get one, no bus data.
pub fn login_needed(reason: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Log in · hermod console</title>
<link rel="stylesheet" href="/console/assets/console.css">
</head><body class="bare">
<main class="card narrow">
<h1><img src="/console/assets/logo.svg" alt="" width="28" height="28"> hermod console</h1>
<p>{reason}</p>
<p>On the machine running hermod, as its owner, run</p>
<pre>hermod console</pre>
<p>It prints a one-time link (valid for 60 seconds) and opens it in your browser.</p>
</main></body></html>"#,
        reason = esc(reason)
    )
}

/// A small error page inside the frame.
pub fn problem(title: &str, detail: &str) -> String {
    format!(
        r#"<section class="card"><h1>{}</h1><p>{}</p><p><a href="/console">Back to the overview</a></p></section>"#,
        esc(title),
        esc(detail)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(url("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(clock(3661.5), "01:01:01");
    }
}
