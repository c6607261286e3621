//! Views of the log: the hot tail of each inbox (and of each channel's topic
//! events) and its wake-up signal.
//!
//! For every view the commit observer keeps the newest messages (a bounded
//! tail shared by `Arc`, so a broadcast is stored once) and a `watch` of the
//! newest seq. Waiters hold a `watch::Receiver` and read from the log when
//! it changes — live delivery is a notification, never a second queue.
//! `floor` is the invariant that makes the tail safe to read: every message
//! of the inbox with `seq > floor` is in `tail`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::watch;

use crate::model::{AgentName, Message, Seq};

pub use crate::engine::View as ViewKey;

/// Messages kept in memory per inbox.
pub const TAIL_LEN: usize = 512;
/// Body bytes kept in memory per inbox (large messages are read from the log).
pub const TAIL_BYTES: usize = 8 << 20;

pub(crate) struct InboxView {
    floor: Seq,
    tail: VecDeque<Arc<Message>>,
    /// Body bytes in `tail`.
    bytes: usize,
    newest: watch::Sender<Seq>,
}

#[derive(Default)]
pub(crate) struct Inboxes {
    views: HashMap<ViewKey, InboxView>,
    /// Retention's mark per view: everything at or below it is gone.
    pruned: HashMap<ViewKey, Seq>,
    /// Newest seq per agent over all its channels (for `channel=*` readers).
    agents: HashMap<AgentName, watch::Sender<Seq>>,
}

impl Inboxes {
    /// The view of `key`, created covering everything after `committed`.
    fn view(&mut self, key: &ViewKey, committed: Seq) -> &mut InboxView {
        self.views.entry(key.clone()).or_insert_with(|| InboxView {
            floor: committed,
            tail: VecDeque::new(),
            bytes: 0,
            newest: watch::Sender::new(committed),
        })
    }

    /// Records a committed message in view `key` and wakes its waiters.
    pub(crate) fn push(&mut self, key: &ViewKey, message: &Arc<Message>) {
        let view = self.view(key, message.seq - 1);
        view.tail.push_back(message.clone());
        view.bytes += message.body.as_str().len();
        while view.tail.len() > TAIL_LEN || view.bytes > TAIL_BYTES {
            let Some(old) = view.tail.pop_front() else {
                break;
            };
            view.bytes -= old.body.as_str().len();
            view.floor = old.seq;
        }
        view.newest.send_replace(message.seq);
        if let ViewKey::Inbox(key) = key {
            if let Some(agent) = self.agents.get(&key.agent) {
                agent.send_replace(message.seq);
            }
        }
    }

    /// A receiver that changes whenever any inbox of `agent` grows.
    pub(crate) fn watch_agent(
        &mut self,
        agent: &AgentName,
        committed: Seq,
    ) -> watch::Receiver<Seq> {
        self.agents
            .entry(agent.clone())
            .or_insert_with(|| watch::Sender::new(committed))
            .subscribe()
    }

    /// A receiver that changes whenever view `key` grows.
    pub(crate) fn watch(&mut self, key: &ViewKey, committed: Seq) -> watch::Receiver<Seq> {
        self.view(key, committed).newest.subscribe()
    }

    /// Drops view `key` (its inbox was forgotten); waiters keep their
    /// receivers and simply see nothing more.
    pub(crate) fn forget(&mut self, key: &ViewKey) {
        self.views.remove(key);
        self.pruned.remove(key);
    }

    /// How far retention pruned view `key` (0: never).
    pub(crate) fn pruned(&self, key: &ViewKey) -> Seq {
        self.pruned.get(key).copied().unwrap_or(0)
    }

    /// Retention removed view `key` up to `seq`: the tail drops it too.
    pub(crate) fn set_pruned(&mut self, key: ViewKey, seq: Seq) {
        if let Some(view) = self.views.get_mut(&key) {
            while view.tail.front().is_some_and(|m| m.seq <= seq) {
                let old = view.tail.pop_front().expect("front exists");
                view.bytes -= old.body.as_str().len();
            }
            view.floor = view.floor.max(seq);
        }
        let mark = self.pruned.entry(key).or_default();
        *mark = (*mark).max(seq);
    }

    /// Serves a read from memory if the tail covers it.
    pub(crate) fn read_cached(
        &self,
        key: &ViewKey,
        after: Seq,
        limit: usize,
        committed: Seq,
    ) -> Option<Vec<Arc<Message>>> {
        match self.views.get(key) {
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
