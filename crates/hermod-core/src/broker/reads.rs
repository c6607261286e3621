//! Reads: inbox and topic views from the hot tail or the log, with gap
//! signals; follow streams and wake-ups; the bus clock for `since` readers.

use super::*;

/// Messages per batch of [`Broker::follow`].
const FOLLOW_BATCH: usize = 256;

impl Broker {
    /// Up to `limit` messages of `key`'s inbox after `after`, oldest
    /// first, with the gap if retention removed some of what was asked.
    pub async fn read(&self, key: &InboxKey, after: Seq, limit: usize) -> Result<Batch> {
        self.read_view(&ViewKey::Inbox(key.clone()), after, limit)
            .await
    }

    /// Up to `limit` topic events of `channel` after `after`, oldest first.
    pub async fn read_topics(&self, channel: &Channel, after: Seq, limit: usize) -> Result<Batch> {
        self.read_view(&ViewKey::Topics(channel.clone()), after, limit)
            .await
    }

    /// Reads a view from its hot tail when it covers `after`, else from
    /// the log; never from before retention's mark, which it reports.
    /// Messages whose `ttl` ran out are left out (a page of nothing but
    /// those reads on past them) and, in an inbox, marked `expired`.
    async fn read_view(&self, key: &ViewKey, mut after: Seq, limit: usize) -> Result<Batch> {
        let mut gap = None;
        loop {
            let mut batch = self.read_view_once(key, after, limit).await?;
            gap = gap.or(batch.gap);
            let now = model::now();
            if !batch.messages.iter().any(|m| m.expired(now)) {
                return Ok(Batch {
                    messages: batch.messages,
                    gap,
                });
            }
            let last = batch.messages.last().map_or(after, |m| m.seq);
            let (expired, live): (Vec<_>, Vec<_>) =
                batch.messages.drain(..).partition(|m| m.expired(now));
            if let ViewKey::Inbox(inbox) = key {
                for m in &expired {
                    let step = self.single(inbox, m, model::State::Expired, "ttl", None);
                    self.note(step, Some(vec![m.clone()])).await;
                }
            }
            if !live.is_empty() {
                return Ok(Batch {
                    messages: live,
                    gap,
                });
            }
            after = last;
        }
    }

    async fn read_view_once(&self, key: &ViewKey, after: Seq, limit: usize) -> Result<Batch> {
        let (cached, mut pruned, committed) = {
            let mut views = self.shared.views.lock().unwrap();
            let pruned = views.inboxes.pruned(key);
            let start = after.max(pruned);
            let committed = views.committed.0;
            let cached = views.inboxes.read_cached(key, start, limit, committed);
            (cached, pruned, committed)
        };
        let messages = match cached {
            Some(hit) => hit,
            None => {
                let mut page = self.engine.read(key, after.max(pruned), limit).await?;
                pruned = pruned.max(page.pruned);
                // Readers see what the broker has applied, never more: the
                // engine may hold messages still on their way through the
                // feed, past anything a cursor can be moved to yet (a
                // `/poll` would hand them out without claiming them).
                page.messages.retain(|m| m.seq <= committed);
                page.messages
            }
        };
        let gap = (after < pruned).then_some(Gap {
            after,
            pruned_through: pruned,
        });
        if gap.is_some() {
            self.shared.gaps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Batch { messages, gap })
    }

    /// Up to `limit` messages for `agent` on every channel after `after`
    /// (the widest gap of any of its inboxes, if any).
    pub async fn read_agent(&self, agent: &AgentName, after: Seq, limit: usize) -> Result<Batch> {
        let channels = self
            .shared
            .state
            .lock()
            .unwrap()
            .registry
            .channels_of(agent);
        let mut all = Batch::default();
        for channel in channels {
            let key = InboxKey::new(channel, agent.clone());
            let batch = self.read(&key, after, limit).await?;
            all.messages.extend(batch.messages);
            if let Some(gap) = batch.gap {
                let widest = all.gap.map_or(0, |g| g.pruned_through);
                if gap.pruned_through > widest {
                    all.gap = Some(gap);
                }
            }
        }
        all.messages.sort_by_key(|m| m.seq);
        all.messages.truncate(limit);
        Ok(all)
    }

    /// The last seq whose ts is `<= ts`: turns a `since=ts` cursor into a seq.
    pub async fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
        let (seq, last_ts) = self.committed();
        if ts >= last_ts {
            return Ok(seq); // the common long-poll case: nothing newer yet
        }
        self.engine.seq_at_ts(ts).await
    }

    /// Bus "now" for `since` cursors: never later than the ts of a message
    /// that is accepted but not applied here yet (see the engine docs'
    /// `ts` rule).
    pub fn now(&self) -> f64 {
        // Read in this order: wall clock, watermark, then whether anything
        // is in flight; a commit stamped after that check gets ts >= wall.
        let wall = model::now();
        let committed = self.committed().1;
        if !self.engine.settled() {
            return committed;
        }
        // Anything stamped after this point gets ts >= wall: step back 1 µs
        // so that `ts > now` holds for it.
        (wall - 1e-6).max(committed)
    }

    /// Changes whenever any inbox of `agent` (any channel) receives a message.
    pub fn watch_agent(&self, agent: &AgentName) -> Watch {
        let rx = {
            let mut views = self.shared.views.lock().unwrap();
            let committed = views.committed.0;
            views.inboxes.watch_agent(agent, committed)
        };
        Watch {
            rx: Some(rx),
            of: Watched::Agent(agent.clone()),
            shared: self.shared.clone(),
        }
    }

    /// `key`'s inbox after `after` as a stream of batches: first what is
    /// there, then each new commit as it lands. Never ends by itself. A
    /// batch carries a gap whenever retention overtook the stream.
    pub fn follow(
        &self,
        key: InboxKey,
        after: Seq,
    ) -> impl futures::Stream<Item = Result<Batch>> + Send + 'static {
        self.follow_view(ViewKey::Inbox(key), after)
    }

    /// The topic events of `channel` (`None`: every channel) matching
    /// `pattern` after `after`, for `caller` (within its `may_subscribe`
    /// rule), as batches that are never empty (a gap alone counts): what
    /// every live pattern subscriber reads.
    pub fn follow_pattern(
        &self,
        caller: &Caller,
        channel: Option<Channel>,
        pattern: &str,
        after: Seq,
    ) -> Result<impl futures::Stream<Item = Result<Batch>> + Send + 'static> {
        use futures::StreamExt;
        let parsed = model::parse_pattern(pattern)?;
        let view = match channel {
            Some(channel) => {
                self.trust.may_subscribe(caller, &channel, pattern)?;
                ViewKey::Topics(channel)
            }
            None => {
                self.trust.may_subscribe_everywhere(caller, pattern)?;
                ViewKey::AllTopics
            }
        };
        let events = self.follow_view(view, after);
        Ok(events.filter_map(move |batch| {
            let kept = batch.map(|mut b| {
                b.messages
                    .retain(|m| m.topic.as_deref().is_some_and(|t| parsed.matches(t)));
                b
            });
            futures::future::ready(match kept {
                Ok(b) if b.messages.is_empty() && b.gap.is_none() => None,
                other => Some(other),
            })
        }))
    }

    fn follow_view(
        &self,
        key: ViewKey,
        after: Seq,
    ) -> impl futures::Stream<Item = Result<Batch>> + Send + 'static {
        // Subscribed before the first read, so no commit falls in between.
        let newest = self.watch_view(&key);
        let state = (self.clone(), key, after, newest);
        futures::stream::unfold(
            state,
            |(broker, key, mut position, mut newest)| async move {
                loop {
                    match broker.read_view(&key, position, FOLLOW_BATCH).await {
                        Ok(batch) if batch.messages.is_empty() && batch.gap.is_none() => {
                            newest.changed().await.ok()?
                        }
                        Ok(batch) => {
                            if let Some(gap) = batch.gap {
                                position = position.max(gap.pruned_through);
                            }
                            position = batch.messages.last().map_or(position, |m| m.seq);
                            return Some((Ok(batch), (broker, key, position, newest)));
                        }
                        Err(e) => return Some((Err(e), (broker, key, position, newest))),
                    }
                }
            },
        )
    }

    /// Changes whenever `key`'s inbox receives a committed message.
    pub fn watch(&self, key: &InboxKey) -> Watch {
        self.watch_view(&ViewKey::Inbox(key.clone()))
    }

    /// Sets what the inbox views' tails may hold together, in bytes.
    pub fn set_memory_budget(&self, bytes: usize) {
        self.shared.views.lock().unwrap().inboxes.set_budget(bytes);
    }

    /// What the views' tails hold, their budget, and how many views there
    /// are.
    pub fn cache_usage(&self) -> (usize, usize, usize) {
        self.shared.views.lock().unwrap().inboxes.usage()
    }

    fn watch_view(&self, key: &ViewKey) -> Watch {
        let rx = {
            let mut views = self.shared.views.lock().unwrap();
            let committed = views.committed.0;
            views.inboxes.watch(key, committed)
        };
        Watch {
            rx: Some(rx),
            of: Watched::View(key.clone()),
            shared: self.shared.clone(),
        }
    }
}

/// A wake-up: changes whenever the view (or any inbox of the agent) it
/// watches receives a committed message. Dropping the last one of a view
/// that holds nothing frees the view, so state for a name lives only
/// while it serves someone (10,000 streams that close leave nothing).
pub struct Watch {
    /// Always `Some` until dropped (taken first in `drop`, so the release
    /// sees the count without it).
    rx: Option<watch::Receiver<Seq>>,
    of: Watched,
    shared: Arc<Shared>,
}

enum Watched {
    View(ViewKey),
    Agent(AgentName),
}

impl Watch {
    fn rx(&mut self) -> &mut watch::Receiver<Seq> {
        self.rx.as_mut().expect("taken only in drop")
    }

    /// Waits for a change (an error once the view is gone for good).
    pub async fn changed(&mut self) -> std::result::Result<(), watch::error::RecvError> {
        self.rx().changed().await
    }

    /// Whether it changed since last seen.
    pub fn has_changed(&mut self) -> std::result::Result<bool, watch::error::RecvError> {
        self.rx().has_changed()
    }

    /// The newest seq, now seen.
    pub fn borrow_and_update(&mut self) -> Seq {
        *self.rx().borrow_and_update()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The receiver goes first: of two last waiters leaving at once, the
        // one that locks last sees no receiver left.
        drop(self.rx.take());
        let mut views = self.shared.views.lock().unwrap();
        match &self.of {
            Watched::View(key) => views.inboxes.release(key),
            Watched::Agent(agent) => views.inboxes.release_agent(agent),
        }
    }
}

/// Whose messages a long-poll reads: one inbox, or an agent's inboxes on
/// every channel (agent-bus `channel=*`).
#[derive(Debug, Clone)]
pub enum Reader {
    Inbox(InboxKey),
    Agent(AgentName),
}

/// An agent-bus `since` answer: the messages with `ts > since` and the
/// `now` to send back as the next `since`.
#[derive(Debug)]
pub struct SinceBatch {
    pub messages: Vec<Arc<Message>>,
    pub now: f64,
    pub gap: Option<Gap>,
}

impl Broker {
    /// The long-poll every transport uses: `reader`'s messages after
    /// `after`; with none (and no gap), waits for a commit until
    /// `deadline`, then answers what is there (perhaps nothing). Dropping
    /// the future (a transport's shutdown) cancels nothing but the wait.
    pub async fn read_wait(
        &self,
        reader: &Reader,
        after: Seq,
        limit: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Batch> {
        // Subscribed before the first read, so no commit falls in between.
        let mut newest = self.watch_reader(reader);
        loop {
            let batch = self.read_reader(reader, after, limit).await?;
            if !batch.messages.is_empty()
                || batch.gap.is_some()
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(batch);
            }
            self.wait_until(&mut newest, deadline).await?;
        }
    }

    /// The agent-bus rule for `since` cursors (bus ts, not seq): messages
    /// with `ts > since`, oldest first; `now` never passes a message that
    /// is accepted but not readable yet, nor the last of a full batch (more
    /// may be behind it). Waits like [`Broker::read_wait`] when `block`.
    pub async fn read_since(
        &self,
        reader: &Reader,
        since: f64,
        limit: usize,
        block: bool,
        deadline: tokio::time::Instant,
    ) -> Result<SinceBatch> {
        let mut newest = self.watch_reader(reader);
        // The ts cursor becomes a seq cursor once: a woken request reads on
        // from it (often from the hot tail) instead of searching the log again.
        let mut after = self.seq_at_ts(since).await?;
        // Told once per request, on the answer that follows it.
        let mut gap = None;
        loop {
            let now = self.now();
            let batch = self.read_reader(reader, after, limit).await?;
            gap = gap.or(batch.gap);
            let mut messages = batch.messages;
            let full = messages.len() == limit;
            // Only a `since` ahead of the bus clock lets a newer seq carry a
            // ts that is not newer than it: skip those.
            let stale = messages.partition_point(|m| m.ts <= since);
            if stale > 0 {
                after = messages[stale - 1].seq;
                messages.drain(..stale);
                if messages.is_empty() {
                    continue;
                }
            }
            let timed_out = tokio::time::Instant::now() >= deadline;
            if !messages.is_empty() || gap.is_some() || !block || timed_out {
                // `now` was read before the batch, which may hold messages
                // committed since (ts > now): answering below their ts
                // would hand them out again to a reader that follows
                // `since=now`. Every message up to the last one's ts is in
                // the batch (ts grows with seq), so that is a safe `now`.
                let now = match messages.last() {
                    Some(last) if full => last.ts,
                    Some(last) => now.max(last.ts),
                    None => now,
                };
                return Ok(SinceBatch { messages, now, gap });
            }
            self.wait_until(&mut newest, deadline).await?;
        }
    }

    fn watch_reader(&self, reader: &Reader) -> Watch {
        match reader {
            Reader::Inbox(key) => self.watch(key),
            Reader::Agent(agent) => self.watch_agent(agent),
        }
    }

    async fn read_reader(&self, reader: &Reader, after: Seq, limit: usize) -> Result<Batch> {
        match reader {
            Reader::Inbox(key) => self.read(key, after, limit).await,
            Reader::Agent(agent) => self.read_agent(agent, after, limit).await,
        }
    }

    /// Until `newest` changes or `deadline` passes.
    async fn wait_until(&self, newest: &mut Watch, deadline: tokio::time::Instant) -> Result<()> {
        tokio::select! {
            changed = newest.changed() => changed.map_err(|_| Error::ShuttingDown),
            _ = tokio::time::sleep_until(deadline) => Ok(()),
        }
    }
}
