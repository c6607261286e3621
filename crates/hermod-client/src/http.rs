//! The client over hermod's HTTP front (the `/v1` API): what the CLI uses
//! when given `--url` (or `HERMOD_URL` / `AGENT_BUS_URL`).
//!
//! [`HttpClient::send`] returns once the message is durable;
//! [`HttpPoller`] long-polls an inbox from the agent's cursor and
//! acknowledges explicitly, retrying with backoff while the daemon is away.

use std::collections::VecDeque;
use std::time::Duration;

use hermod_proto::model::Body;
use hermod_proto::wire::{AgentSummary, MessageFrame};
use serde::Deserialize;
use serde_json::json;

use crate::{Draft, Error, Result, Sent};

/// Seconds one inbox long-poll is held by the daemon.
const LONG_POLL: f64 = 25.0;
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A handle on one daemon's HTTP front.
#[derive(Clone)]
pub struct HttpClient {
    base: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer` (`HERMOD_TOKEN`).
    token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    code: String,
}

#[derive(Deserialize)]
struct Receipt {
    id: String,
    seq: u64,
    ts: f64,
    #[serde(default)]
    notice: Option<String>,
}

#[derive(Deserialize)]
struct InboxPage {
    messages: Vec<V1Message>,
}

#[derive(Deserialize)]
struct V1Message {
    seq: u64,
    id: String,
    ts: f64,
    channel: String,
    from: String,
    to: Option<String>,
    topic: Option<String>,
    sent_ts: Option<f64>,
    #[serde(default)]
    auth: hermod_proto::model::Auth,
    #[serde(flatten)]
    meta: hermod_proto::model::Meta,
    body: Body,
}

impl From<V1Message> for MessageFrame {
    fn from(m: V1Message) -> Self {
        MessageFrame {
            id: m.id,
            from: m.from,
            to: m.to.unwrap_or_default(),
            ts: m.ts,
            sent_ts: m.sent_ts,
            topic: m.topic,
            channel: m.channel,
            seq: m.seq,
            auth: m.auth,
            meta: m.meta,
            body: m.body,
        }
    }
}

impl HttpClient {
    /// `base` is the daemon's URL, e.g. `http://127.0.0.1:18900`.
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            token: crate::env_token(),
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| Error::Unreachable {
            path: self.base.clone().into(),
            source: std::io::Error::other(e),
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => Error::Server {
                    code: e.code,
                    detail: e.error,
                },
                Err(_) => Error::Protocol(format!("HTTP {status}")),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Sends a message and waits until it is durable.
    pub async fn send(&self, draft: Draft) -> Result<Sent> {
        let mut body = json!({
            "from": draft.from.unwrap_or_else(|| "anonymous".into()),
            "to": draft.to,
            "channel": draft.channel,
            "body": draft.body,
        });
        if let (Ok(serde_json::Value::Object(meta)), Some(fields)) =
            (serde_json::to_value(&draft.meta), body.as_object_mut())
        {
            fields.extend(meta);
        }
        let r: Receipt = self
            .call(
                self.http
                    .post(format!("{}/v1/messages", self.base))
                    .json(&body),
            )
            .await?;
        Ok(Sent {
            id: r.id,
            seq: r.seq,
            ts: r.ts,
            notice: r.notice,
        })
    }

    /// Publishes a topic event; returns the receipt as JSON text.
    pub async fn publish(
        &self,
        topic: &str,
        payload: serde_json::Map<String, serde_json::Value>,
        from: Option<String>,
        channel: Option<String>,
        durable: bool,
    ) -> Result<String> {
        let body = json!({ "topic": topic, "payload": payload, "from": from, "channel": channel, "durable": durable });
        let receipt: serde_json::Value = self
            .call(
                self.http
                    .post(format!("{}/v1/events", self.base))
                    .json(&body),
            )
            .await?;
        Ok(receipt.to_string())
    }

    /// Every known agent with presence and unread counts.
    pub async fn agents(&self) -> Result<Vec<AgentSummary>> {
        self.call(self.http.get(format!("{}/v1/agents", self.base)))
            .await
    }

    /// Messages after the agent's cursor, without acknowledging them.
    pub async fn peek(&self, agent: &str, channel: Option<&str>) -> Result<Vec<MessageFrame>> {
        self.inbox_wait(agent, channel, None, 0.0).await
    }

    async fn inbox(
        &self,
        agent: &str,
        channel: Option<&str>,
        after: Option<u64>,
    ) -> Result<Vec<MessageFrame>> {
        self.inbox_wait(agent, channel, after, LONG_POLL).await
    }

    async fn inbox_wait(
        &self,
        agent: &str,
        channel: Option<&str>,
        after: Option<u64>,
        wait: f64,
    ) -> Result<Vec<MessageFrame>> {
        let mut req = self
            .http
            .get(format!("{}/v1/agents/{agent}/inbox", self.base))
            .query(&[("wait", wait.to_string())]);
        if let Some(c) = channel {
            req = req.query(&[("channel", c)]);
        }
        if let Some(a) = after {
            req = req.query(&[("after", a)]);
        }
        let page: InboxPage = self.call(req).await?;
        Ok(page.messages.into_iter().map(MessageFrame::from).collect())
    }

    async fn ack(&self, agent: &str, channel: Option<&str>, seq: u64) -> Result<()> {
        let body = json!({ "seq": seq, "channel": channel });
        let _: serde_json::Value = self
            .call(
                self.http
                    .post(format!("{}/v1/agents/{agent}/ack", self.base))
                    .json(&body),
            )
            .await?;
        Ok(())
    }
}

/// Receives an agent's messages over HTTP long-polls, from its cursor.
pub struct HttpPoller {
    client: HttpClient,
    agent: String,
    channel: Option<String>,
    /// Last seq handed out; `None` until the first page (start at the cursor).
    after: Option<u64>,
    buffer: VecDeque<MessageFrame>,
}

impl HttpPoller {
    pub fn new(client: HttpClient, agent: String, channel: Option<String>) -> Self {
        Self {
            client,
            agent,
            channel,
            after: None,
            buffer: VecDeque::new(),
        }
    }

    /// The next message; waits as long as it takes. Connection trouble is
    /// retried with backoff; a refusal (bad name) is returned.
    pub async fn next(&mut self) -> Result<MessageFrame> {
        let mut backoff = BACKOFF_START;
        loop {
            if let Some(m) = self.buffer.pop_front() {
                self.after = Some(m.seq);
                return Ok(m);
            }
            match self
                .client
                .inbox(&self.agent, self.channel.as_deref(), self.after)
                .await
            {
                Ok(page) => {
                    backoff = BACKOFF_START;
                    self.buffer.extend(page);
                }
                Err(e @ Error::Server { .. }) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, ?backoff, "inbox poll failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Acknowledges everything up to `seq`.
    pub async fn ack(&self, seq: u64) -> Result<()> {
        self.client
            .ack(&self.agent, self.channel.as_deref(), seq)
            .await
    }
}
