//! Views of the log: the hot tail of each inbox (and of each channel's topic
//! events) and its wake-up signal.
//!
//! For every view the commit observer keeps the newest messages (a bounded
//! tail shared by `Arc`, so a broadcast is stored once) and a `watch` of the
//! newest seq. Waiters hold a `watch::Receiver` and read from the log when
//! it changes — live delivery is a notification, never a second queue.
//! `floor` is the invariant that makes the tail safe to read: every message
//! of the inbox with `seq > floor` is in `tail`.
//!
//! **One budget.** Every tail counts what it holds ([`cost`]: body, id,
//! names, topic and the per-message overhead) against one memory budget
//! (`--memory-budget`). Past it the least recently read views give up
//! their tails (their floor moves up, so a read there goes to the engine),
//! and a view nobody waits on goes altogether: memory holds state for a
//! name only while it serves someone. The same holds without pressure: a
//! view whose last waiter leaves goes at once when its tail is empty
//! ([`Inboxes::release`]), and so does an agent's watch.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use hashlink::LinkedHashMap;
use tokio::sync::watch;

use crate::engine::log_index::cost;
use crate::model::{AgentName, Message, Seq};

pub use crate::engine::View as ViewKey;

/// Messages kept in memory per inbox.
pub const TAIL_LEN: usize = 512;
/// Bytes kept in memory per inbox (large messages are read from the log).
pub const TAIL_BYTES: usize = 8 << 20;
/// The default budget of every view's tail together.
pub const DEFAULT_BUDGET: usize = 192 << 20;
/// Views kept at most (each is a watch and a queue even when empty).
const MAX_VIEWS: usize = 65_536;
pub(crate) struct InboxView {
    floor: Seq,
    tail: VecDeque<Arc<Message>>,
    /// What `tail` costs ([`cost`]).
    bytes: usize,
    newest: watch::Sender<Seq>,
}

impl InboxView {
    /// Drops the oldest cached message; returns what it cost.
    fn pop(&mut self) -> usize {
        let Some(old) = self.tail.pop_front() else {
            return 0;
        };
        let c = cost(&old);
        self.bytes -= c;
        self.floor = self.floor.max(old.seq);
        c
    }
}

pub(crate) struct Inboxes {
    /// Least recently read (or written) first.
    views: LinkedHashMap<ViewKey, InboxView>,
    /// What every tail costs together, and the most it may.
    bytes: usize,
    budget: usize,
    /// Retention's mark per view: everything at or below it is gone.
    pruned: HashMap<ViewKey, Seq>,
    /// Newest seq per agent over all its channels (for `channel=*` readers).
    agents: HashMap<AgentName, watch::Sender<Seq>>,
    /// `agents.len()` after its last sweep.
    agents_swept: usize,
}

impl Default for Inboxes {
    fn default() -> Self {
        Self {
            views: LinkedHashMap::new(),
            bytes: 0,
            budget: DEFAULT_BUDGET,
            pruned: HashMap::new(),
            agents: HashMap::new(),
            agents_swept: 0,
        }
    }
}

impl Inboxes {
    /// The view of `key` (now the most recently used), created covering
    /// everything after `committed`.
    fn view(&mut self, key: &ViewKey, committed: Seq) -> &mut InboxView {
        if self.views.contains_key(key) {
            return self.views.to_back(key).expect("present");
        }
        self.views.entry(key.clone()).or_insert_with(|| InboxView {
            floor: committed,
            tail: VecDeque::new(),
            bytes: 0,
            newest: watch::Sender::new(committed),
        })
    }

    /// Sets the budget of every tail together, evicting down to it.
    pub(crate) fn set_budget(&mut self, bytes: usize) {
        self.budget = bytes;
        self.evict();
    }

    /// What the tails cost, the budget, and how many views there are.
    pub(crate) fn usage(&self) -> (usize, usize, usize) {
        (self.bytes, self.budget, self.views.len())
    }

    /// Records a committed message in view `key` and wakes its waiters.
    pub(crate) fn push(&mut self, key: &ViewKey, message: &Arc<Message>) {
        let view = self.view(key, message.seq - 1);
        let before = view.bytes;
        view.tail.push_back(message.clone());
        view.bytes += cost(message);
        while view.tail.len() > TAIL_LEN || view.bytes > TAIL_BYTES {
            view.pop();
        }
        let after = view.bytes;
        view.newest.send_replace(message.seq);
        self.bytes = self.bytes - before + after;
        if let ViewKey::Inbox(key) = key {
            if let Some(agent) = self.agents.get(&key.agent) {
                agent.send_replace(message.seq);
            }
        }
        self.evict();
    }

    /// Brings the tails under the budget (and the views under
    /// [`MAX_VIEWS`]), least recently used first: a view nobody waits on
    /// goes (a later push or watch makes it anew, covering only what comes
    /// after), one with waiters keeps its watch and gives up its tail.
    fn evict(&mut self) {
        let mut turns = self.views.len();
        while (self.bytes > self.budget || self.views.len() > MAX_VIEWS) && turns > 0 {
            turns -= 1;
            let Some((key, view)) = self.views.front() else {
                break;
            };
            let key = key.clone();
            if view.newest.receiver_count() == 0 {
                let view = self.views.remove(&key).expect("present");
                self.bytes -= view.bytes;
                continue;
            }
            let view = self.views.to_back(&key).expect("present");
            while !view.tail.is_empty() {
                self.bytes -= view.pop();
            }
        }
    }

    /// A receiver that changes whenever any inbox of `agent` grows. Entries
    /// whose receivers all went are swept once the map doubled since the
    /// last sweep (so it stays within twice what is in use).
    pub(crate) fn watch_agent(
        &mut self,
        agent: &AgentName,
        committed: Seq,
    ) -> watch::Receiver<Seq> {
        if self.agents.len() >= 2 * self.agents_swept.max(64) {
            self.agents.retain(|_, w| w.receiver_count() > 0);
            self.agents_swept = self.agents.len();
        }
        self.agents
            .entry(agent.clone())
            .or_insert_with(|| watch::Sender::new(committed))
            .subscribe()
    }

    /// A receiver that changes whenever view `key` grows.
    pub(crate) fn watch(&mut self, key: &ViewKey, committed: Seq) -> watch::Receiver<Seq> {
        self.view(key, committed).newest.subscribe()
    }

    /// A waiter on view `key` left: the view goes if nobody else waits
    /// on it and its tail holds nothing (a later read, push or watch
    /// makes it anew). A tail is kept: it is cache, under the budget.
    pub(crate) fn release(&mut self, key: &ViewKey) {
        let idle = self
            .views
            .get(key)
            .is_some_and(|v| v.newest.receiver_count() == 0 && v.tail.is_empty());
        if idle {
            self.views.remove(key);
        }
    }

    /// A waiter on `agent`'s inboxes left: its entry goes if it was the last.
    pub(crate) fn release_agent(&mut self, agent: &AgentName) {
        if self
            .agents
            .get(agent)
            .is_some_and(|w| w.receiver_count() == 0)
        {
            self.agents.remove(agent);
        }
    }

    /// Drops view `key` (its inbox was forgotten); waiters keep their
    /// receivers and simply see nothing more.
    pub(crate) fn forget(&mut self, key: &ViewKey) {
        if let Some(view) = self.views.remove(key) {
            self.bytes -= view.bytes;
        }
        self.pruned.remove(key);
        // The agent's watch spans its channels: it goes only unwatched.
        if let ViewKey::Inbox(inbox) = key {
            self.release_agent(&inbox.agent);
        }
    }

    /// How many views retention pruned, and the highest mark (the console).
    pub(crate) fn floors(&self) -> (usize, Seq) {
        let marks = self.pruned.values().filter(|s| **s > 0);
        (marks.clone().count(), marks.copied().max().unwrap_or(0))
    }

    /// How far retention pruned view `key` (0: never).
    pub(crate) fn pruned(&self, key: &ViewKey) -> Seq {
        self.pruned.get(key).copied().unwrap_or(0)
    }

    /// Retention removed view `key` up to `seq`: the tail drops it too.
    pub(crate) fn set_pruned(&mut self, key: ViewKey, seq: Seq) {
        if let Some(view) = self.views.get_mut(&key) {
            while view.tail.front().is_some_and(|m| m.seq <= seq) {
                self.bytes -= view.pop();
            }
            view.floor = view.floor.max(seq);
        }
        let mark = self.pruned.entry(key).or_default();
        *mark = (*mark).max(seq);
    }

    /// Serves a read from memory if the tail covers it.
    pub(crate) fn read_cached(
        &mut self,
        key: &ViewKey,
        after: Seq,
        limit: usize,
        committed: Seq,
    ) -> Option<Vec<Arc<Message>>> {
        match self.views.to_back(key) {
            Some(view) if after >= view.floor => {
                let start = view.tail.partition_point(|m| m.seq <= after);
                Some(view.tail.range(start..).take(limit).cloned().collect())
            }
            Some(_) => None,
            // No view yet and nothing committed since start: a cold inbox.
            None if after >= committed => Some(Vec::new()),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Body, Channel, InboxKey, NewMessage};

    fn message(seq: Seq, to: &str, size: usize) -> Arc<Message> {
        let to = AgentName::parse(to).unwrap();
        let body = Body::from_json(format!("{{\"pad\":\"{}\"}}", "x".repeat(size))).unwrap();
        let m = NewMessage {
            id: format!("m{seq}"),
            channel: Channel::default(),
            from: AgentName::parse("sender").unwrap(),
            to: Some(to.clone()),
            topic: None,
            sent_ts: None,
            auth: Default::default(),
            meta: None,
            body,
            recipients: vec![to],
            guard: Default::default(),
        };
        Arc::new(m.into_message(seq, seq as f64))
    }

    fn key(agent: &str) -> ViewKey {
        ViewKey::Inbox(InboxKey::new(
            Channel::default(),
            AgentName::parse(agent).unwrap(),
        ))
    }

    // Every inbox kept up to 8 MiB with nothing global: 300 inboxes of
    // 64 KiB messages held the whole store in memory.
    #[test]
    fn the_tails_stay_within_one_budget_least_recently_read_first() {
        let mut inboxes = Inboxes::default();
        inboxes.set_budget(1 << 20);
        let watched = key("watched");
        let rx = inboxes.watch(&watched, 0);
        let mut seq = 0;
        for round in 0..10 {
            for agent in ["watched", "a", "b", "c", "d"] {
                seq += 1;
                inboxes.push(&key(agent), &message(seq, agent, 64 << 10));
            }
            assert!(
                inboxes.bytes <= 1 << 20,
                "round {round}: {} bytes",
                inboxes.bytes
            );
            let counted: usize = inboxes.views.values().map(|v| v.bytes).sum();
            assert_eq!(counted, inboxes.bytes);
        }
        // A view with a waiter keeps its watch (and wakes it); others go.
        assert!(inboxes.views.contains_key(&watched));
        assert_eq!(*rx.borrow(), seq - 4);
        // What was evicted is read from the engine, never wrongly "empty".
        assert_eq!(inboxes.read_cached(&key("a"), 0, 10, seq), None);
        // The newest stays readable from memory.
        let newest = inboxes.read_cached(&key("d"), seq - 1, 10, seq).unwrap();
        assert_eq!(newest.last().unwrap().seq, seq);
    }

    #[test]
    fn views_nobody_waits_on_are_bounded_in_number() {
        let mut inboxes = Inboxes::default();
        for seq in 1..=(MAX_VIEWS as Seq + 100) {
            let agent = format!("agent{seq}");
            inboxes.push(&key(&agent), &message(seq, &agent, 1));
        }
        assert!(inboxes.views.len() <= MAX_VIEWS);
    }
}
