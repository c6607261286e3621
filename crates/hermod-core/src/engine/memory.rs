//! The in-memory engine: everything in one mutex, gone when the process
//! exits. Used by `hermod serve --memory` and by unit tests. "Durable" here
//! means "in the log", which is as durable as this engine gets.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::{CommitObserver, Committed, Durable, Engine, Health, KnownAgent};
use crate::auth::Identity;
use crate::error::Result;
use crate::model::{AgentName, BusClock, Channel, InboxKey, Message, NewMessage, Seq};

#[derive(Default)]
struct State {
    log: BTreeMap<Seq, Arc<Message>>,
    inboxes: HashMap<InboxKey, Vec<Seq>>,
    cursors: HashMap<InboxKey, Seq>,
    agents: BTreeMap<InboxKey, (f64, f64)>,
    subscriptions: std::collections::BTreeSet<(InboxKey, String)>,
    identities: BTreeMap<AgentName, Identity>,
    seq: Seq,
    clock: BusClock,
}

/// See the module docs.
pub struct MemoryEngine {
    state: Mutex<State>,
    observer: Arc<dyn CommitObserver>,
    /// Always healthy: memory does not fill up or lock.
    health: Health,
}

impl MemoryEngine {
    pub fn new(observer: Arc<dyn CommitObserver>) -> Self {
        Self {
            state: Mutex::default(),
            observer,
            health: Health::default(),
        }
    }

    fn inbox_after<'a>(state: &'a State, key: &InboxKey, after: Seq) -> &'a [Seq] {
        let seqs = state.inboxes.get(key).map(Vec::as_slice).unwrap_or(&[]);
        &seqs[seqs.partition_point(|&s| s <= after)..]
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn submit(&self, batch: Vec<NewMessage>) -> Result<Durable> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().unwrap();
        self.observer.stamping();
        let mut committed = Vec::with_capacity(batch.len());
        for m in batch {
            state.seq += 1;
            let seq = state.seq;
            let ts = state.clock.stamp();
            let recipients = m.recipients.clone();
            let message = Arc::new(m.into_message(seq, ts));
            for r in &recipients {
                let key = InboxKey::new(message.channel.clone(), r.clone());
                state.inboxes.entry(key).or_default().push(seq);
            }
            state.log.insert(seq, message.clone());
            committed.push(Committed {
                message,
                recipients,
            });
        }
        // Observer first, then the acknowledgement (see the engine docs).
        self.observer.committed(&committed);
        drop(state);
        let _ = tx.send(Ok(committed.into_iter().map(|c| c.message).collect()));
        Ok(rx)
    }

    async fn read_inbox(
        &self,
        key: &InboxKey,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>> {
        let state = self.state.lock().unwrap();
        Ok(Self::inbox_after(&state, key, after)
            .iter()
            .take(limit)
            .filter_map(|s| state.log.get(s).cloned())
            .collect())
    }

    async fn read_topics(
        &self,
        channel: &Channel,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .log
            .range(after + 1..)
            .map(|(_, m)| m)
            .filter(|m| m.topic.is_some() && &m.channel == channel)
            .take(limit)
            .cloned()
            .collect())
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
        Ok(Self::inbox_after(&state, key, after).len() as u64)
    }

    async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        Ok(*self.state.lock().unwrap().cursors.get(key).unwrap_or(&0))
    }

    async fn set_cursor(&self, key: InboxKey, seq: Seq) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let c = state.cursors.entry(key).or_default();
        *c = (*c).max(seq);
        Ok(())
    }

    async fn remember_agent(&self, key: InboxKey, seen: f64) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let e = state.agents.entry(key).or_insert((seen, seen));
        e.1 = e.1.max(seen);
        Ok(())
    }

    async fn set_subscription(&self, key: InboxKey, pattern: String, on: bool) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        if on {
            state.subscriptions.insert((key, pattern));
        } else {
            state.subscriptions.remove(&(key, pattern));
        }
        Ok(())
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
        let mut state = self.state.lock().unwrap();
        match identity {
            Some(i) => state.identities.insert(name, i),
            None => state.identities.remove(&name),
        };
        Ok(())
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
            .map(|(k, &(first_seen, last_seen))| KnownAgent {
                key: k.clone(),
                first_seen,
                last_seen,
            })
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

    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        super::super::conformance::run(
            |observer| std::sync::Arc::new(super::MemoryEngine::new(observer)),
            false,
        )
        .await;
    }
}
