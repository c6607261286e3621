//! The in-memory engine: a [`LogIndex`] that keeps every body, and the
//! cursors, in one mutex, gone when the process exits. Used by `hermod
//! serve --memory` and by unit tests, and the reference model for the
//! NATS engine, which builds the same index per node. "Durable" here means
//! "in the log", which is as durable as this engine gets.
//!
//! Every write reserves a slot in the feed first, then changes the state
//! and sends its [`Commit`] under the one lock, so the feed's order is the
//! commit order and the lock is never held while waiting for the follower.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::log_index::{AgentEntry, LogIndex};
use super::{
    Change, Commit, Committed, Durable, Engine, Feed, Health, KnownAgent, Page, Pruned, Retention,
    Step, Swap, View, FEED_CAPACITY,
};
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::model::{AgentName, BusClock, InboxKey, Message, NewMessage, Seq};

struct State {
    index: LogIndex,
    cursors: HashMap<InboxKey, Seq>,
    seq: Seq,
    clock: BusClock,
}

impl Default for State {
    fn default() -> Self {
        Self {
            index: LogIndex::keeping_bodies(),
            cursors: HashMap::new(),
            seq: 0,
            clock: BusClock::default(),
        }
    }
}

impl State {
    /// The stored messages at `seqs` (every body is kept while its
    /// message is).
    fn messages(&self, seqs: impl IntoIterator<Item = Seq>) -> Vec<Arc<Message>> {
        seqs.into_iter()
            .filter_map(|s| self.index.cached(s))
            .collect()
    }
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
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable> {
        self.commit(move |state| {
            let mut committed = Vec::with_capacity(batch.len());
            for mut m in batch {
                state.seq += 1;
                let (seq, ts) = (state.seq, state.clock.stamp());
                let guard = m.guard;
                let recipients = std::mem::take(&mut m.recipients);
                let message = Arc::new(m.into_message(seq, ts));
                let recipients = state.index.append(message.clone(), recipients, guard);
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
        let (entries, pruned) = state.index.seqs(view, after, limit);
        let messages = entries.into_iter().filter_map(|(_, m)| m).collect();
        Ok(Page { messages, pruned })
    }

    async fn floors(&self) -> Result<Vec<(View, Seq)>> {
        Ok(self.state.lock().unwrap().index.floors())
    }

    async fn prune(&self, rules: &Retention, now: f64) -> Result<Pruned> {
        let rules = rules.clone();
        self.write(move |state| {
            // Nothing is stored elsewhere: the index's decisions are the
            // whole prune. No stream limits of its own (first seq 0).
            let step = state.index.prune(&rules, now, 0);
            let floors = step
                .floors
                .into_iter()
                .map(|(v, s)| Change::Floor(v, s))
                .collect();
            let pruned = Pruned {
                removed: step.delete.len() as u64,
                more: step.more,
            };
            (Ok(pruned), Vec::new(), floors)
        })
        .await?
    }

    async fn seq_at_ts(&self, ts: f64) -> Result<Seq> {
        Ok(self.state.lock().unwrap().index.seq_at_ts(ts))
    }

    async fn count_inbox(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        Ok(self.state.lock().unwrap().index.count_inbox(key, after))
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
            let e = state.index.agents.entry(key.clone()).or_insert(AgentEntry {
                first_seen: seen,
                last_seen: seen,
                connected,
            });
            e.last_seen = e.last_seen.max(seen);
            e.connected |= connected;
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
            // What the inbox holds up to now is no longer its own (what
            // only it held goes), nor are its pruned mark and steps.
            let at = state.seq;
            let index = &mut state.index;
            index.apply_epoch(key.clone(), at);
            index.subscriptions.retain(|(k, _)| k != &key);
            index.steps.retain(|(k, ..), _| k != &key);
            state.cursors.remove(&key);
            let known = state.index.agents.remove(&key).is_some();
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
            let index = &mut state.index;
            let gone: Vec<InboxKey> = index
                .agents
                .iter()
                .filter(|(k, a)| {
                    !a.connected
                        && a.first_seen < before
                        && !index.holds(k)
                        && !index.subscriptions.iter().any(|(s, _)| s == *k)
                })
                .take(limit)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &gone {
                index.agents.remove(k);
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
                state.index.subscriptions.insert(entry);
            } else {
                state.index.subscriptions.remove(&entry);
            }
            let change = Change::Subscription { key, pattern, on };
            ((), Vec::new(), vec![change])
        })
        .await
    }

    async fn subscriptions(&self) -> Result<Vec<(InboxKey, String)>> {
        let state = self.state.lock().unwrap();
        Ok(state.index.subscriptions.iter().cloned().collect())
    }

    async fn set_identity(&self, name: AgentName, identity: Option<Identity>) -> Result<()> {
        self.write(move |state| {
            match &identity {
                Some(i) => state.index.identities.insert(name.clone(), i.clone()),
                None => state.index.identities.remove(&name),
            };
            ((), Vec::new(), vec![Change::Identity { name, identity }])
        })
        .await
    }

    async fn identities(&self) -> Result<Vec<Identity>> {
        let state = self.state.lock().unwrap();
        Ok(state.index.identities.values().cloned().collect())
    }

    async fn agents(&self) -> Result<Vec<KnownAgent>> {
        Ok(self.state.lock().unwrap().index.agents())
    }

    async fn record(&self, steps: Vec<Step>) -> Result<Vec<Step>> {
        self.write(move |state| {
            let added: Vec<Step> = steps
                .into_iter()
                .filter(|s| state.index.record(s))
                .collect();
            let changes = added.iter().cloned().map(Change::Step).collect();
            (added, Vec::new(), changes)
        })
        .await
    }

    async fn steps(&self, key: &InboxKey, seq: Seq) -> Result<Vec<Step>> {
        Ok(self.state.lock().unwrap().index.steps_of(key, seq))
    }

    async fn held(&self, after: Seq, limit: usize) -> Result<Vec<Arc<Message>>> {
        let state = self.state.lock().unwrap();
        Ok(state.messages(state.index.held(after, limit)))
    }

    async fn find(&self, id: &str, limit: usize) -> Result<Vec<Committed>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .index
            .with_id(id, limit)
            .into_iter()
            .filter_map(|(seq, recipients, guard)| {
                Some(Committed {
                    message: state.index.cached(seq)?,
                    recipients,
                    guard,
                })
            })
            .collect())
    }

    async fn thread(&self, thread: &str, limit: usize) -> Result<Vec<Arc<Message>>> {
        let state = self.state.lock().unwrap();
        Ok(state.messages(state.index.in_thread(thread, limit)))
    }

    async fn last(&self) -> Result<(Seq, f64)> {
        Ok(self.state.lock().unwrap().index.last)
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
