//! The in-memory engine: everything in one mutex, gone when the process
//! exits. Used by `hermod serve --memory` and by unit tests. "Durable" here
//! means "in the log", which is as durable as this engine gets.
//!
//! Every write reserves a slot in the feed first, then changes the state
//! and sends its [`Commit`] under the one lock, so the feed's order is the
//! commit order and the lock is never held while waiting for the follower.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{
    Change, Commit, Committed, Durable, Engine, Feed, Health, KnownAgent, Page, Pruned, Retention,
    Step, Swap, View, FEED_CAPACITY, PRUNE_BUDGET, STEP_PROBE,
};
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::model::{
    AgentName, BusClock, Channel, Guarded, InboxKey, Message, NewMessage, Seq, State as Delivery,
};

#[derive(Default)]
struct State {
    log: BTreeMap<Seq, Arc<Message>>,
    /// Inbox entries pointing at each logged message.
    refs: HashMap<Seq, usize>,
    inboxes: HashMap<InboxKey, std::collections::VecDeque<Seq>>,
    floors: HashMap<View, Seq>,
    /// Body bytes in the log (the size rule's measure here).
    bytes: u64,
    cursors: HashMap<InboxKey, Seq>,
    /// first seen, last seen, connected.
    agents: BTreeMap<InboxKey, (f64, f64, bool)>,
    subscriptions: std::collections::BTreeSet<(InboxKey, String)>,
    identities: BTreeMap<AgentName, Identity>,
    /// Delivery steps by inbox, state and the seq they end at.
    steps: BTreeMap<(InboxKey, Delivery, Seq), Step>,
    /// What the loop guard holds (each one of its message's refs).
    held: std::collections::BTreeSet<Seq>,
    seq: Seq,
    clock: BusClock,
}

/// See the module docs.
pub struct MemoryEngine {
    state: Mutex<State>,
    feed_tx: mpsc::Sender<Commit>,
    feed: Mutex<Option<Feed>>,
    /// Commits sent down the feed and not applied by the follower yet.
    unapplied: Arc<AtomicUsize>,
    /// Always healthy: memory does not fill up or lock.
    health: Health,
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

/// What one write did: its answer, and what the feed reports of it.
type Applied<T> = (T, Vec<Committed>, Vec<Change>);

impl MemoryEngine {
    pub fn new() -> Self {
        let (feed_tx, feed) = mpsc::channel(FEED_CAPACITY);
        Self {
            state: Mutex::default(),
            feed_tx,
            feed: Mutex::new(Some(feed)),
            unapplied: Arc::default(),
            health: Health::default(),
        }
    }

    /// Applies `f` to the state and sends its commit down the feed, both
    /// under the lock (a feed slot is reserved before, so nothing waits
    /// while holding it); resolves with `f`'s answer once the follower has
    /// applied the commit.
    async fn commit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Applied<T>,
    ) -> Result<oneshot::Receiver<T>> {
        let permit = self
            .feed_tx
            .reserve()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().unwrap();
        let (answer, messages, changes) = f(&mut state);
        self.unapplied.fetch_add(1, Ordering::SeqCst);
        let unapplied = self.unapplied.clone();
        permit.send(Commit::new(messages, changes, move || {
            unapplied.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(answer);
        }));
        Ok(rx)
    }

    /// [`MemoryEngine::commit`], waiting for the answer.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Applied<T>,
    ) -> Result<T> {
        self.commit(f).await?.await.map_err(|_| Error::ShuttingDown)
    }

    fn inbox_after<'a>(
        state: &'a State,
        key: &InboxKey,
        after: Seq,
    ) -> impl Iterator<Item = Seq> + 'a {
        let seqs = state.inboxes.get(key);
        let start = seqs.map_or(0, |q| q.partition_point(|&s| s <= after));
        seqs.into_iter()
            .flat_map(move |q| q.range(start..).copied())
    }
}

impl MemoryEngine {
    /// One prune step (see [`Engine::prune`]) on the state.
    fn prune_step(state: &mut State, rules: &Retention, now: f64) -> Applied<Result<Pruned>> {
        let before = state.floors.clone();
        let mut removed = 0u64;
        let mut more = false;
        // Age and size: the oldest messages, from every view.
        for step in 1..=PRUNE_BUDGET {
            // Holds are kept until released.
            let Some((&seq, oldest)) = state.log.iter().find(|(s, _)| !state.held.contains(s))
            else {
                break;
            };
            let too_old = rules.age.is_some_and(|age| oldest.ts < now - age);
            let too_big = rules.bytes.is_some_and(|limit| state.bytes > limit);
            if !(too_old || too_big) {
                break;
            }
            let channel = oldest.channel.clone();
            let keys: Vec<InboxKey> = state
                .inboxes
                .iter()
                .filter(|(k, q)| k.channel == channel && q.front() == Some(&seq))
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                state.inboxes.get_mut(&key).unwrap().pop_front();
                state.bump(View::Inbox(key), seq);
            }
            removed += state.unlog(seq) as u64;
            more = step == PRUNE_BUDGET;
        }
        // The per-inbox count.
        if let Some(keep) = rules.inbox_messages {
            let over: Vec<(InboxKey, usize)> = state
                .inboxes
                .iter()
                .filter(|(_, q)| q.len() as u64 > keep)
                .map(|(k, q)| (k.clone(), (q.len() - keep as usize).min(PRUNE_BUDGET)))
                .collect();
            for (key, n) in over {
                for _ in 0..n {
                    let seq = state.inboxes.get_mut(&key).unwrap().pop_front().unwrap();
                    state.bump(View::Inbox(key.clone()), seq);
                    removed += state.unref(seq) as u64;
                }
                more |= n == PRUNE_BUDGET;
            }
        }
        // Topic events leave the topic views (durable subscribers keep theirs).
        if let Some(age) = rules.topic_age {
            let due: Vec<(Seq, Channel, bool)> = state
                .log
                .values()
                .filter(|m| m.topic.is_some() && m.ts < now - age)
                .filter(|m| {
                    state
                        .floors
                        .get(&View::Topics(m.channel.clone()))
                        .is_none_or(|&f| m.seq > f)
                })
                .take(PRUNE_BUDGET)
                .map(|m| (m.seq, m.channel.clone(), state.refs.get(&m.seq) == Some(&0)))
                .collect();
            more |= due.len() == PRUNE_BUDGET;
            for (seq, channel, unreferenced) in due {
                state.bump(View::Topics(channel), seq);
                if unreferenced {
                    removed += state.unlog(seq) as u64;
                }
            }
        }
        // Steps of messages that are gone go with them.
        let first = state.log.keys().next().copied().unwrap_or(state.seq + 1);
        state.steps.retain(|_, step| step.hi >= first);
        let floors = state
            .floors
            .iter()
            .filter(|(v, s)| before.get(*v) != Some(*s))
            .map(|(v, s)| Change::Floor(v.clone(), *s))
            .collect();
        (Ok(Pruned { removed, more }), Vec::new(), floors)
    }
}

impl State {
    fn bump(&mut self, view: View, seq: Seq) {
        if matches!(view, View::Topics(_)) {
            let all = self.floors.entry(View::AllTopics).or_default();
            *all = (*all).max(seq);
        }
        let f = self.floors.entry(view).or_default();
        *f = (*f).max(seq);
    }

    /// An inbox entry at `seq` went: the message loses a reference and
    /// goes once no inbox (nor a topic view) holds it. True if it went.
    fn unref(&mut self, seq: Seq) -> bool {
        let left = self.refs.get_mut(&seq).map(|r| {
            *r -= 1;
            *r
        });
        let topic = self.log.get(&seq).is_some_and(|m| m.topic.is_some());
        left == Some(0) && !topic && self.unlog(seq)
    }

    fn unlog(&mut self, seq: Seq) -> bool {
        match self.log.remove(&seq) {
            Some(m) => {
                self.bytes -= m.body.as_str().len() as u64;
                self.refs.remove(&seq);
                if m.topic.is_some() {
                    self.bump(View::Topics(m.channel.clone()), seq);
                }
                true
            }
            None => false,
        }
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable> {
        self.commit(move |state| {
            let mut committed = Vec::with_capacity(batch.len());
            for mut m in batch {
                state.seq += 1;
                let seq = state.seq;
                let ts = state.clock.stamp();
                let guard = m.guard;
                match guard {
                    Guarded::Releases(held) if state.held.remove(&held) => {
                        state.unref(held);
                    }
                    // Released already: this copy lands nowhere.
                    Guarded::Releases(_) => m.recipients.clear(),
                    Guarded::Held => {
                        state.held.insert(seq);
                    }
                    Guarded::Free => {}
                }
                let recipients = std::mem::take(&mut m.recipients);
                let message = Arc::new(m.into_message(seq, ts));
                for r in &recipients {
                    let key = InboxKey::new(message.channel.clone(), r.clone());
                    state.inboxes.entry(key).or_default().push_back(seq);
                }
                let refs = recipients.len() + usize::from(guard == Guarded::Held);
                state.refs.insert(seq, refs);
                state.bytes += message.body.as_str().len() as u64;
                state.log.insert(seq, message.clone());
                committed.push(Committed {
                    message,
                    recipients,
                    guard,
                });
            }
            let stored = committed.iter().map(|c| c.message.clone()).collect();
            (Ok(stored), committed, Vec::new())
        })
        .await
    }

    async fn read(&self, view: &View, after: Seq, limit: usize) -> Result<Page> {
        let state = self.state.lock().unwrap();
        let pruned = state.floors.get(view).copied().unwrap_or(0);
        let after = after.max(pruned);
        let messages = match view {
            View::Inbox(key) => Self::inbox_after(&state, key, after)
                .take(limit)
                .filter_map(|s| state.log.get(&s).cloned())
                .collect(),
            View::Topics(channel) => state
                .log
                .range(after + 1..)
                .map(|(_, m)| m)
                .filter(|m| m.topic.is_some() && &m.channel == channel)
                .take(limit)
                .cloned()
                .collect(),
            View::AllTopics => state
                .log
                .range(after + 1..)
                .map(|(_, m)| m)
                .filter(|m| m.topic.is_some())
                .take(limit)
                .cloned()
                .collect(),
        };
        Ok(Page { messages, pruned })
    }

    async fn floors(&self) -> Result<Vec<(View, Seq)>> {
        let state = self.state.lock().unwrap();
        Ok(state.floors.iter().map(|(v, s)| (v.clone(), *s)).collect())
    }

    async fn prune(&self, rules: &Retention, now: f64) -> Result<Pruned> {
        let rules = rules.clone();
        self.write(move |state| Self::prune_step(state, &rules, now))
            .await?
    }

    async fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
        let state = self.state.lock().unwrap();
        Ok(state
            .log
            .values()
            .rev()
            .find(|m| m.ts <= ts)
            .map_or(0, |m| m.seq))
    }

    async fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        let state = self.state.lock().unwrap();
        Ok(Self::inbox_after(&state, key, after).count() as u64)
    }

    async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        Ok(*self.state.lock().unwrap().cursors.get(key).unwrap_or(&0))
    }

    async fn swap_cursor(
        &self,
        key: InboxKey,
        expected: Seq,
        new: Seq,
        steps: Vec<Step>,
    ) -> Result<(Swap, Vec<Step>)> {
        {
            let mut state = self.state.lock().unwrap();
            let c = state.cursors.entry(key).or_default();
            if *c != expected {
                return Ok((Swap::Lost(*c), Vec::new()));
            }
            *c = new;
        }
        // Nothing of memory outlives a crash: recorded right after.
        Ok((Swap::Moved, self.record(steps).await?))
    }

    async fn remember_agent(&self, key: InboxKey, seen: f64, connected: bool) -> Result<()> {
        self.write(move |state| {
            let e = state
                .agents
                .entry(key.clone())
                .or_insert((seen, seen, connected));
            e.1 = e.1.max(seen);
            e.2 |= connected;
            let change = Change::Agent {
                key,
                seen,
                connected,
            };
            ((), Vec::new(), vec![change])
        })
        .await
    }

    async fn forget_agent(&self, key: InboxKey) -> Result<bool> {
        self.write(move |state| {
            for seq in state.inboxes.remove(&key).unwrap_or_default() {
                state.unref(seq);
            }
            state.cursors.remove(&key);
            state.subscriptions.retain(|(k, _)| k != &key);
            state.floors.remove(&View::Inbox(key.clone()));
            state.steps.retain(|(k, ..), _| k != &key);
            let known = state.agents.remove(&key).is_some();
            let changes = if known {
                vec![Change::Forgotten(key)]
            } else {
                Vec::new()
            };
            (known, Vec::new(), changes)
        })
        .await
    }

    async fn expire_agents(&self, before: f64, limit: usize) -> Result<Vec<InboxKey>> {
        self.write(move |state| {
            let gone: Vec<InboxKey> = state
                .agents
                .iter()
                .filter(|(k, &(first, _, connected))| {
                    !connected
                        && first < before
                        && state.inboxes.get(*k).is_none_or(|q| q.is_empty())
                        && !state.subscriptions.iter().any(|(s, _)| s == *k)
                })
                .take(limit)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &gone {
                state.agents.remove(k);
            }
            let changes = gone.iter().cloned().map(Change::Forgotten).collect();
            (gone, Vec::new(), changes)
        })
        .await
    }

    async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()> {
        self.write(move |state| {
            let entry = (key.clone(), pattern.clone());
            if on {
                state.subscriptions.insert(entry);
            } else {
                state.subscriptions.remove(&entry);
            }
            let change = Change::Subscription { key, pattern, on };
            ((), Vec::new(), vec![change])
        })
        .await
    }

    async fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .subscriptions
            .iter()
            .cloned()
            .collect())
    }

    async fn set_identity(&self, name: AgentName, identity: Option<Identity>) -> Result<()> {
        self.write(move |state| {
            match &identity {
                Some(i) => state.identities.insert(name.clone(), i.clone()),
                None => state.identities.remove(&name),
            };
            ((), Vec::new(), vec![Change::Identity { name, identity }])
        })
        .await
    }

    async fn identities(&self) -> Result<Vec<Identity>> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .identities
            .values()
            .cloned()
            .collect())
    }

    async fn agents(&self) -> Result<Vec<KnownAgent>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .agents
            .iter()
            .map(|(k, &(first_seen, last_seen, connected))| KnownAgent {
                key: k.clone(),
                first_seen,
                last_seen,
                connected,
            })
            .collect())
    }

    async fn record(&self, steps: Vec<Step>) -> Result<Vec<Step>> {
        self.write(move |state| {
            let first = state.log.keys().next().copied().unwrap_or(state.seq + 1);
            let mut changes = Vec::new();
            for step in steps {
                // Steps of messages retention already removed are moot.
                if step.hi < first {
                    continue;
                }
                let at = (step.key.clone(), step.state, step.hi);
                if let std::collections::btree_map::Entry::Vacant(e) = state.steps.entry(at) {
                    e.insert(step.clone());
                    changes.push(Change::Step(step));
                }
            }
            let added = changes
                .iter()
                .filter_map(|c| match c {
                    Change::Step(s) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            (added, Vec::new(), changes)
        })
        .await
    }

    async fn steps(&self, key: &InboxKey, seq: Seq) -> Result<Vec<Step>> {
        let state = self.state.lock().unwrap();
        let mut out = Vec::new();
        for s in Delivery::ALL {
            let from = (key.clone(), s, seq);
            let to = (key.clone(), s, Seq::MAX);
            if let Some((_, step)) = state
                .steps
                .range(from..=to)
                .take(STEP_PROBE)
                .find(|(_, step)| step.covers(seq))
            {
                out.push(step.clone());
            }
        }
        Ok(out)
    }

    async fn held(&self, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .held
            .range(after + 1..)
            .take(limit)
            .filter_map(|s| state.log.get(s).cloned())
            .collect())
    }

    async fn find(&self, id: &str, limit: usize) -> Result<Vec<Committed>> {
        let state = self.state.lock().unwrap();
        // A scan: this engine is for tests and demos.
        Ok(state
            .log
            .values()
            .filter(|m| m.id == id)
            .take(limit)
            .map(|m| Committed {
                message: m.clone(),
                recipients: state
                    .inboxes
                    .iter()
                    .filter(|(k, q)| k.channel == m.channel && q.binary_search(&m.seq).is_ok())
                    .map(|(k, _)| k.agent.clone())
                    .collect(),
                guard: if state.held.contains(&m.seq) {
                    Guarded::Held
                } else {
                    Guarded::Free
                },
            })
            .collect())
    }

    async fn thread(&self, thread: &str, limit: usize) -> Result<Vec<Arc<Message>>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .log
            .values()
            .filter(|m| m.id == thread || m.meta().thread.as_deref() == Some(thread))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn last(&self) -> Result<(Seq, f64)> {
        let state = self.state.lock().unwrap();
        Ok((
            state.seq,
            state.log.values().next_back().map_or(0.0, |m| m.ts),
        ))
    }

    fn health(&self) -> &Health {
        &self.health
    }

    async fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "engine": "memory" })
    }

    fn feed(&self) -> Option<Feed> {
        self.feed.lock().unwrap().take()
    }

    fn settled(&self) -> bool {
        self.unapplied.load(Ordering::SeqCst) == 0
    }

    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn retention() {
        super::super::conformance::retention(|| std::sync::Arc::new(super::MemoryEngine::new()))
            .await;
    }

    #[tokio::test]
    async fn delivery() {
        super::super::conformance::delivery(|| std::sync::Arc::new(super::MemoryEngine::new()))
            .await;
    }

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::run(|| std::sync::Arc::new(super::MemoryEngine::new()), false)
            .await;
    }

    #[tokio::test]
    async fn holds() {
        super::super::conformance::holds(|| std::sync::Arc::new(super::MemoryEngine::new()), false)
            .await;
    }
}
