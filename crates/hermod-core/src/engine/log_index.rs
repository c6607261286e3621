//! One index of a log, written once for every engine that keeps its log
//! in memory or has none of its own to query: which seqs each view holds
//! (inboxes, topics), their ts, how far each view was pruned, what the
//! loop guard holds, the delivery steps, the registry, subscriptions and
//! identities, and the message bodies it keeps.
//!
//! The memory engine *is* this index, keeping every body
//! ([`LogIndex::keeping_bodies`]). The NATS engine builds one per node by
//! following the stream and the state bucket (JetStream has no secondary
//! index) and keeps only the newest bodies ([`LogIndex::with_cache`]),
//! fetching older ones. Retention ([`LogIndex::prune`]), step lookup and
//! the cache budget are therefore decided in one place, and the memory
//! engine is the reference model the NATS engine is checked against (both
//! run [`super::conformance`]).
//!
//! It is derived, deterministic state: applied to the same log and the
//! same marks in the same order, every copy agrees.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::auth::Identity;
use crate::engine::{KnownAgent, Retention, Step, View, PRUNE_BUDGET, STEP_PROBE};
use crate::model::{AgentName, Channel, Guarded, InboxKey, Message, Seq, State};

/// Newest message bodies a cache keeps: at most this many...
pub const CACHE_MESSAGES: usize = 65_536;
/// ...and at most this many bytes by default (bodies may be megabytes
/// each; the daemon gives it a share of `--memory-budget`).
pub const CACHE_BYTES: usize = 64 << 20;

/// What a cached entry costs besides its strings: the message struct, its
/// `Arc` and the queue slot, rounded up.
const ENTRY_OVERHEAD: usize = 256;

/// The bytes a cached message holds (an estimate that never undercounts
/// its strings).
pub fn cost(m: &Message) -> usize {
    ENTRY_OVERHEAD
        + m.body.as_str().len()
        + m.id.len()
        + m.channel.as_str().len()
        + m.from.as_str().len()
        + m.to.as_ref().map_or(0, |t| t.as_str().len())
        + m.topic.as_ref().map_or(0, String::len)
        + m.meta.as_ref().map_or(0, |_| ENTRY_OVERHEAD)
}

/// What the index keeps of one logged message.
struct Meta {
    ts: f64,
    id: String,
    thread: Option<String>,
    channel: Channel,
    topic: bool,
    bytes: u64,
    recipients: Box<[AgentName]>,
    /// The seqs of its recipient list's parts (see [`LogIndex::append_part`]).
    parts: Box<[Seq]>,
    /// Inboxes that still hold it.
    refs: usize,
}

/// How long a recipient-list part waits for its message (by the log's
/// own stamps, so every node decides the same): its writer publishes the
/// message as soon as the parts are acknowledged, and gives up well
/// within this ([`PART_PATIENCE`]), so an older part's message is never
/// coming.
pub const PART_WAIT: f64 = 600.0;

/// How long a writer may take from publishing its first part to
/// publishing its message; past it the send fails (`storage_busy`)
/// and the parts are left to [`PART_WAIT`].
pub const PART_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// An agent's registry entry (the NATS engine stores it as JSON).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AgentEntry {
    pub first_seen: f64,
    pub last_seen: f64,
    pub connected: bool,
}

/// A seq of a view, with its message when it is cached.
pub type Entry = (Seq, Option<Arc<Message>>);

/// See the module docs.
#[derive(Default)]
pub struct LogIndex {
    log: BTreeMap<Seq, Meta>,
    /// (seq, ts) of every message applied, oldest first: ts grows with
    /// seq, so `since=ts` is a binary search.
    times: VecDeque<(Seq, f64)>,
    inboxes: HashMap<InboxKey, VecDeque<Seq>>,
    topics: HashMap<Channel, VecDeque<Seq>>,
    all_topics: VecDeque<Seq>,
    floors: HashMap<View, Seq>,
    /// Recipient-list parts waiting for their message: (stamp, names).
    parts: BTreeMap<Seq, (f64, Vec<AgentName>)>,
    /// Parts of the messages `log` holds: kept with them.
    held_parts: BTreeSet<Seq>,
    /// Applied seqs no view holds (a broadcast to nobody, an entry hermod
    /// cannot read): the next prune removes them.
    unheld: VecDeque<Seq>,
    /// Where each forgotten inbox starts again.
    epochs: HashMap<InboxKey, Seq>,
    /// What the loop guard holds (each one of its message's refs): kept
    /// by every rule until a release in the log ends it.
    guard_holds: BTreeSet<Seq>,
    bytes: u64,
    cache: BTreeMap<Seq, Arc<Message>>,
    /// What `cache` costs ([`cost`] of each).
    cache_bytes: usize,
    /// The most `cache` may cost, `None`: it keeps every body it is given
    /// until the message goes (the index is the store).
    cache_budget: Option<usize>,
    /// The newest applied seq and its ts.
    pub last: (Seq, f64),
    pub agents: BTreeMap<InboxKey, AgentEntry>,
    pub subscriptions: BTreeSet<(InboxKey, String)>,
    pub identities: BTreeMap<AgentName, Identity>,
    /// Delivery steps by inbox, state and the seq they end at.
    pub steps: BTreeMap<(InboxKey, State, Seq), Step>,
    /// Seqs of every logged message by id, and by thread.
    ids: HashMap<String, Vec<Seq>>,
    threads: HashMap<String, Vec<Seq>>,
}

fn unindex(map: &mut HashMap<String, Vec<Seq>>, key: &str, seq: Seq) {
    if let Some(seqs) = map.get_mut(key) {
        seqs.retain(|&s| s != seq);
        if seqs.is_empty() {
            map.remove(key);
        }
    }
}

impl LogIndex {
    /// An empty index that keeps the newest bodies, up to `bytes` (and
    /// [`CACHE_MESSAGES`]); the engine fetches older ones itself.
    pub fn with_cache(bytes: usize) -> Self {
        Self {
            cache_budget: Some(bytes),
            ..Self::default()
        }
    }

    /// An empty index that keeps every body until its message goes: the
    /// memory engine's whole store.
    pub fn keeping_bodies() -> Self {
        Self::default()
    }

    /// See [`crate::engine::Engine::steps`].
    pub fn steps_of(&self, key: &InboxKey, seq: Seq) -> Vec<Step> {
        State::ALL
            .into_iter()
            .filter_map(|s| {
                self.steps
                    .range((key.clone(), s, seq)..=(key.clone(), s, Seq::MAX))
                    .take(STEP_PROBE)
                    .find(|(_, step)| step.covers(seq))
                    .map(|(_, step)| step.clone())
            })
            .collect()
    }

    /// Puts a delivery step on record unless it is already, or all its
    /// messages are gone; true if it was added.
    pub fn record(&mut self, step: &Step) -> bool {
        let oldest = self
            .log
            .first_key_value()
            .map_or(self.last.0 + 1, |(&f, _)| f);
        if step.hi < oldest {
            return false;
        }
        let at = (step.key.clone(), step.state, step.hi);
        match self.steps.entry(at) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(step.clone());
                true
            }
            std::collections::btree_map::Entry::Occupied(_) => false,
        }
    }

    /// Seqs with this id, with their recipients and whether the loop
    /// guard holds them, oldest first.
    pub fn with_id(&self, id: &str, limit: usize) -> Vec<(Seq, Vec<AgentName>, Guarded)> {
        let seqs = self.ids.get(id).map(Vec::as_slice).unwrap_or_default();
        seqs.iter()
            .take(limit)
            .filter_map(|s| {
                let m = self.log.get(s)?;
                let guard = if self.guard_holds.contains(s) {
                    Guarded::Held
                } else {
                    Guarded::Free
                };
                Some((*s, m.recipients.to_vec(), guard))
            })
            .collect()
    }

    /// What the loop guard holds after `after`, oldest first.
    pub fn held(&self, after: Seq, limit: usize) -> Vec<Seq> {
        self.guard_holds
            .range(after + 1..)
            .take(limit)
            .copied()
            .collect()
    }

    /// Seqs of a conversation, oldest first.
    pub fn in_thread(&self, thread: &str, limit: usize) -> Vec<Seq> {
        let mut seqs: Vec<Seq> = self
            .ids
            .get(thread)
            .into_iter()
            .chain(self.threads.get(thread))
            .flatten()
            .copied()
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs.truncate(limit);
        seqs
    }
}

/// One prune step's decisions, applied to the index already: the marks
/// that moved, the seqs that went, and the delivery steps that went with
/// them (for an engine that stores any of these elsewhere).
#[derive(Debug, Default, Clone)]
pub struct PruneStep {
    pub floors: Vec<(View, Seq)>,
    pub delete: Vec<Seq>,
    pub steps: Vec<Step>,
    /// The oldest seq the index still holds (the newest applied + 1 when
    /// it holds none): nothing before it is needed any more, whether this
    /// step removed it or an earlier one (or nobody ever held it), so a
    /// log that can drop a prefix at once may drop everything below it.
    pub kept_from: Seq,
    pub more: bool,
}

impl LogIndex {
    /// The ts the next message gets when the stream stamped it at
    /// `stamped`: strictly above the previous one (see the `ts` rule in
    /// hermod-core's engine docs). Every node computes the same.
    pub fn next_ts(&self, stamped: f64) -> f64 {
        let prev = self.last.1;
        if stamped > prev {
            return stamped;
        }
        let mut ts = prev + 1e-6;
        while ts <= prev {
            ts = f64::from_bits(ts.to_bits() + 1);
        }
        ts
    }

    /// Applies one message of the log; returns the inboxes it landed in
    /// (none for a release of a hold an earlier release ended).
    pub fn append(
        &mut self,
        message: Arc<Message>,
        recipients: Vec<AgentName>,
        guard: Guarded,
    ) -> Vec<AgentName> {
        self.append_with_parts(message, recipients, guard, &[])
    }

    /// Applies one part of a recipient list too long for one log entry
    /// (a broadcast to tens of thousands on a log whose entries have a
    /// size limit): its message follows it in the log and names it. A part
    /// is only a seq to the views; it stays in the log as long as its
    /// message does ([`PruneStep::kept_from`]) so a replay finds it again.
    pub fn append_part(&mut self, seq: Seq, stamped: f64, names: Vec<AgentName>) {
        self.last.0 = seq;
        self.parts.insert(seq, (stamped, names));
        self.drop_orphans(stamped);
    }

    /// A part whose message is not coming (its writer died between them)
    /// is an unheld seq like any other once [`PART_WAIT`] has passed by
    /// the log's stamps (looked at with every entry applied, so it never
    /// holds [`PruneStep::kept_from`] back for good).
    fn drop_orphans(&mut self, now: f64) {
        while let Some(entry) = self.parts.first_entry() {
            if entry.get().0 >= now - PART_WAIT {
                break;
            }
            self.unheld.push_back(entry.remove_entry().0);
        }
    }

    /// Applies a message whose recipients are `parts` (logged before it,
    /// in order) followed by `recipients`. A part this index does not
    /// have (dropped after [`PART_WAIT`]) is missing from the list.
    pub fn append_with_parts(
        &mut self,
        message: Arc<Message>,
        mut recipients: Vec<AgentName>,
        guard: Guarded,
        parts: &[Seq],
    ) -> Vec<AgentName> {
        let seq = message.seq;
        if !parts.is_empty() {
            let mut names = Vec::new();
            for p in parts {
                match self.parts.remove(p) {
                    Some((_, part)) => names.extend(part),
                    None => tracing::warn!(seq, part = p, "a recipient-list part is missing"),
                }
            }
            names.append(&mut recipients);
            recipients = names;
        }
        self.drop_orphans(message.ts);
        self.last = (seq, message.ts);
        self.times.push_back((seq, message.ts));
        // Every message passes through the cache, so the node that sent
        // it can answer with it once it is applied.
        self.cache_bytes += cost(&message);
        self.cache.insert(seq, message.clone());
        while let Some(budget) = self.cache_budget {
            if self.cache.len() <= CACHE_MESSAGES && self.cache_bytes <= budget {
                break;
            }
            let Some((_, old)) = self.cache.pop_first() else {
                break;
            };
            self.cache_bytes -= cost(&old);
        }
        let mut refs = 0;
        match guard {
            Guarded::Releases(held) if self.guard_holds.remove(&held) => {
                if self.unref(held) {
                    self.unheld.push_back(held);
                }
            }
            Guarded::Releases(_) => recipients.clear(),
            Guarded::Held => {
                self.guard_holds.insert(seq);
                refs += 1;
            }
            Guarded::Free => {}
        }
        for r in &recipients {
            let key = InboxKey::new(message.channel.clone(), r.clone());
            let floor = self.floor(&View::Inbox(key.clone()));
            if seq > floor && seq > self.epochs.get(&key).copied().unwrap_or(0) {
                self.inboxes.entry(key).or_default().push_back(seq);
                refs += 1;
            }
        }
        let topic = message.topic.is_some();
        if topic && seq > self.floor(&View::Topics(message.channel.clone())) {
            self.topics
                .entry(message.channel.clone())
                .or_default()
                .push_back(seq);
            self.all_topics.push_back(seq);
        } else if refs == 0 {
            // Nobody holds it: it is only a seq, and goes from the stream.
            self.unheld.push_back(seq);
            self.unheld.extend(parts);
            return recipients;
        }
        self.held_parts.extend(parts);
        let bytes = message.body.as_str().len() as u64;
        self.bytes += bytes;
        let thread = message.meta().thread.clone();
        self.ids.entry(message.id.clone()).or_default().push(seq);
        if let Some(t) = &thread {
            self.threads.entry(t.clone()).or_default().push(seq);
        }
        self.log.insert(
            seq,
            Meta {
                ts: message.ts,
                id: message.id.clone(),
                thread,
                channel: message.channel.clone(),
                topic,
                bytes,
                recipients: recipients.clone().into(),
                parts: parts.into(),
                refs,
            },
        );
        recipients
    }

    /// A message applied lately, if still cached.
    pub fn cached(&self, seq: Seq) -> Option<Arc<Message>> {
        self.cache.get(&seq).cloned()
    }

    /// The ts of any applied seq still in the index's time line.
    pub fn ts_of(&self, seq: Seq) -> Option<f64> {
        let i = self.times.partition_point(|&(s, _)| s < seq);
        self.times
            .get(i)
            .filter(|&&(s, _)| s == seq)
            .map(|&(_, t)| t)
    }

    pub fn floor(&self, view: &View) -> Seq {
        self.floors.get(view).copied().unwrap_or(0)
    }

    pub fn floors(&self) -> Vec<(View, Seq)> {
        self.floors.iter().map(|(v, s)| (v.clone(), *s)).collect()
    }

    /// A view's pruned mark moved to `seq` (here or on another node): its
    /// entries up to it go. Returns the messages no view holds any more.
    pub fn apply_floor(&mut self, view: View, seq: Seq) -> Vec<Seq> {
        let mut gone = Vec::new();
        let floor = self.floors.entry(view.clone()).or_default();
        if seq <= *floor {
            return gone;
        }
        *floor = seq;
        match view {
            View::Inbox(key) => self.trim_inbox(&key, seq, &mut gone),
            View::Topics(channel) => {
                let mut due = Vec::new();
                if let Some(q) = self.topics.get_mut(&channel) {
                    while q.front().is_some_and(|&s| s <= seq) {
                        due.push(q.pop_front().unwrap());
                    }
                }
                for s in due {
                    if self.log.get(&s).is_some_and(|m| m.refs == 0) && self.unlog(s) {
                        gone.push(s);
                    }
                }
            }
            View::AllTopics => pop_through(&mut self.all_topics, seq),
        }
        gone
    }

    /// An inbox was forgotten at `seq`: what it held is no longer its own.
    pub fn apply_epoch(&mut self, key: InboxKey, seq: Seq) -> Vec<Seq> {
        let mut gone = Vec::new();
        // The inbox's pruned mark goes with it, but what it pruned must
        // stay out: a node whose log lags (and so forgot at a lower seq)
        // would otherwise take old messages back in. Both come from the
        // state bucket in its order, so every node computes the same.
        let seq = seq.max(self.floor(&View::Inbox(key.clone())));
        let e = self.epochs.entry(key.clone()).or_default();
        *e = (*e).max(seq);
        self.trim_inbox(&key, seq, &mut gone);
        if self.inboxes.get(&key).is_some_and(|q| q.is_empty()) {
            self.inboxes.remove(&key);
        }
        self.floors.remove(&View::Inbox(key));
        gone
    }

    fn trim_inbox(&mut self, key: &InboxKey, seq: Seq, gone: &mut Vec<Seq>) {
        let mut due = Vec::new();
        if let Some(q) = self.inboxes.get_mut(key) {
            while q.front().is_some_and(|&s| s <= seq) {
                due.push(q.pop_front().unwrap());
            }
        }
        for s in due {
            if self.unref(s) {
                gone.push(s);
            }
        }
    }

    /// An inbox entry at `seq` went; the message goes once nothing holds
    /// it (a topic event stays while its topic view has it).
    fn unref(&mut self, seq: Seq) -> bool {
        let Some(m) = self.log.get_mut(&seq) else {
            return false;
        };
        m.refs = m.refs.saturating_sub(1);
        let held = m.refs > 0
            || (m.topic
                && seq
                    > self
                        .floors
                        .get(&View::Topics(m.channel.clone()))
                        .copied()
                        .unwrap_or(0));
        !held && self.unlog(seq)
    }

    fn unlog(&mut self, seq: Seq) -> bool {
        let Some(m) = self.log.remove(&seq) else {
            return false;
        };
        self.bytes -= m.bytes;
        for p in &m.parts {
            self.held_parts.remove(p);
            self.unheld.push_back(*p);
        }
        unindex(&mut self.ids, &m.id, seq);
        if let Some(t) = &m.thread {
            unindex(&mut self.threads, t, seq);
        }

        if let Some(m) = self.cache.remove(&seq) {
            self.cache_bytes -= cost(&m);
        }
        while self
            .times
            .front()
            .is_some_and(|&(s, _)| self.log.first_key_value().is_none_or(|(&f, _)| s < f))
            && self.times.len() > 1
        {
            self.times.pop_front();
        }
        true
    }

    /// Seqs of `view` after `after` (past its mark), at most `limit`,
    /// each with the message when it is cached.
    pub fn seqs(&self, view: &View, after: Seq, limit: usize) -> (Vec<Entry>, Seq) {
        let pruned = self.floor(view);
        let after = after.max(pruned);
        let q = match view {
            View::Inbox(key) => self.inboxes.get(key),
            View::Topics(channel) => self.topics.get(channel),
            View::AllTopics => Some(&self.all_topics),
        };
        let seqs = q
            .map(|q| {
                let start = q.partition_point(|&s| s <= after);
                q.range(start..)
                    .take(limit)
                    .map(|&s| (s, self.cache.get(&s).cloned()))
                    .collect()
            })
            .unwrap_or_default();
        (seqs, pruned)
    }

    pub fn count_inbox(&self, key: &InboxKey, after: Seq) -> u64 {
        self.inboxes
            .get(key)
            .map_or(0, |q| (q.len() - q.partition_point(|&s| s <= after)) as u64)
    }

    /// Seqs in `key`'s inbox that nothing else holds (no other inbox, no
    /// topic view): what goes from the stream when it is forgotten.
    pub fn held_only_by(&self, key: &InboxKey) -> Vec<Seq> {
        let topic_floor = |c: &Channel| self.floor(&View::Topics(c.clone()));
        self.inboxes
            .get(key)
            .into_iter()
            .flatten()
            .filter(|s| {
                self.log
                    .get(s)
                    .is_some_and(|m| m.refs == 1 && !(m.topic && **s > topic_floor(&m.channel)))
            })
            .copied()
            .collect()
    }

    pub fn holds(&self, key: &InboxKey) -> bool {
        self.inboxes.get(key).is_some_and(|q| !q.is_empty())
    }

    pub fn seq_at_ts(&self, ts: f64) -> Seq {
        let i = self.times.partition_point(|&(_, t)| t <= ts);
        if i == 0 {
            0
        } else {
            self.times[i - 1].0
        }
    }

    pub fn agents(&self) -> Vec<KnownAgent> {
        self.agents
            .iter()
            .map(|(k, a)| KnownAgent {
                key: k.clone(),
                first_seen: a.first_seen,
                last_seen: a.last_seen,
                connected: a.connected,
            })
            .collect()
    }

    /// A seq of the log that is not hermod's (or not readable): only a
    /// seq here, deleted from the stream by the next prune.
    pub fn skip(&mut self, seq: Seq) {
        self.last.0 = seq;
        self.unheld.push_back(seq);
    }

    /// Decides one prune step (see `Engine::prune`) on what this node
    /// knows, and applies it here at once; the marks are then stored for
    /// every node. `first` is the stream's first seq: the stream's own
    /// limits (set by an operator) removed everything before it.
    pub fn prune(&mut self, rules: &Retention, now: f64, first: Seq) -> PruneStep {
        let before = self.floors.clone();
        let mut step = PruneStep::default();
        // Steps of messages that are gone go with them (an engine that
        // stores them elsewhere removes them there too).
        let oldest = self.log.first_key_value().map_or(self.last.0, |(&f, _)| f);
        self.steps.retain(|_, s| {
            let keep = s.hi >= oldest;
            if !keep {
                step.steps.push(s.clone());
            }
            keep
        });
        // Age, size and the stream's own limits: the oldest messages go
        // from every view.
        for n in 1..=PRUNE_BUDGET {
            // Holds are kept until released.
            let Some((&seq, oldest)) = self.log.iter().find(|(s, _)| !self.guard_holds.contains(s))
            else {
                break;
            };
            let due = seq < first
                || rules.age.is_some_and(|age| oldest.ts < now - age)
                || rules.bytes.is_some_and(|limit| self.bytes > limit);
            if !due {
                break;
            }
            let (channel, topic) = (oldest.channel.clone(), oldest.topic);
            let recipients = oldest.recipients.clone();
            for r in recipients.iter() {
                let key = InboxKey::new(channel.clone(), r.clone());
                if self.inboxes.get(&key).and_then(|q| q.front()) == Some(&seq) {
                    self.inboxes.get_mut(&key).unwrap().pop_front();
                    self.bump(View::Inbox(key), seq);
                }
            }
            if topic {
                self.bump(View::Topics(channel.clone()), seq);
                self.bump(View::AllTopics, seq);
                // The oldest of the log is the oldest of both views.
                if let Some(q) = self.topics.get_mut(&channel) {
                    pop_through(q, seq);
                }
                pop_through(&mut self.all_topics, seq);
            }
            self.unlog(seq);
            step.delete.push(seq);
            step.more = n == PRUNE_BUDGET;
        }
        // The per-inbox count.
        if let Some(keep) = rules.inbox_messages {
            let over: Vec<(InboxKey, usize)> = self
                .inboxes
                .iter()
                .filter(|(_, q)| q.len() as u64 > keep)
                .map(|(k, q)| (k.clone(), (q.len() - keep as usize).min(PRUNE_BUDGET)))
                .collect();
            for (key, n) in over {
                let seq = self.inboxes[&key][n - 1];
                let mut gone = Vec::new();
                self.bump(View::Inbox(key.clone()), seq);
                self.trim_inbox(&key, seq, &mut gone);
                step.delete.extend(gone);
                step.more |= n == PRUNE_BUDGET;
            }
        }
        // Topic events leave the topic views (durable subscribers keep theirs).
        if let Some(age) = rules.topic_age {
            let due: Vec<(Seq, Channel)> = self
                .all_topics
                .iter()
                .take(PRUNE_BUDGET)
                .filter(|s| self.log.get(s).is_some_and(|m| m.ts < now - age))
                .map(|s| (*s, self.log[s].channel.clone()))
                .collect();
            step.more |= due.len() == PRUNE_BUDGET;
            for (seq, channel) in due {
                self.bump(View::AllTopics, seq);
                let floor = self.floor(&View::Topics(channel.clone())).max(seq);
                step.delete
                    .extend(self.apply_floor(View::Topics(channel), floor));
            }
            let all = self.floor(&View::AllTopics);
            pop_through(&mut self.all_topics, all);
        }
        let n = self.unheld.len().min(PRUNE_BUDGET);
        for seq in self.unheld.drain(..n) {
            if let Some(m) = self.cache.remove(&seq) {
                self.cache_bytes -= cost(&m);
            }
            step.delete.push(seq);
        }
        step.more |= n == PRUNE_BUDGET;
        step.floors = self
            .floors
            .iter()
            .filter(|(v, s)| before.get(*v) != Some(*s))
            .map(|(v, s)| (v.clone(), *s))
            .collect();
        // Parts stay while their message (or, waiting, their writer) may
        // need them.
        step.kept_from = [
            self.log.first_key_value().map(|(&f, _)| f),
            self.held_parts.first().copied(),
            self.parts.first_key_value().map(|(&f, _)| f),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.last.0 + 1);
        // An epoch keeps entries at or below it out of its inbox; this
        // index has applied the log past it, so none can come any more.
        self.epochs.retain(|_, &mut e| e >= step.kept_from);
        step
    }

    fn bump(&mut self, view: View, seq: Seq) {
        let f = self.floors.entry(view).or_default();
        *f = (*f).max(seq);
    }
}

/// Drops the seqs up to `seq` from the front of an ascending queue.
fn pop_through(q: &mut VecDeque<Seq>, seq: Seq) {
    while q.front().is_some_and(|&s| s <= seq) {
        q.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<AgentName> {
        n.iter().map(|s| AgentName::parse(*s).unwrap()).collect()
    }

    /// A part whose message never came (its writer died between them)
    /// stops holding the log back once [`PART_WAIT`] has passed, and the
    /// next prune removes it; a part still waiting is kept.
    #[test]
    fn a_part_whose_message_never_came_is_dropped_after_its_wait() {
        let mut index = LogIndex::with_cache(1 << 20);
        index.append_part(1, 100.0, names(&["a", "b"]));
        let step = index.prune(&Retention::default(), 100.0, 1);
        assert_eq!((step.kept_from, step.delete), (1, vec![]));
        index.append_part(2, 100.0 + PART_WAIT + 1.0, names(&["c"]));
        let step = index.prune(&Retention::default(), 100.0, 1);
        assert_eq!((step.kept_from, step.delete), (2, vec![1]));
        // A message (not only a part) lets an old part go too.
        let later = 100.0 + 2.0 * PART_WAIT + 2.0;
        let m = crate::engine::conformance::message("d", 3, None).into_message(3, later);
        index.append(Arc::new(m), names(&["d"]), Guarded::Free);
        let step = index.prune(&Retention::default(), later, 1);
        assert_eq!((step.kept_from, step.delete), (3, vec![2]));
    }
}
