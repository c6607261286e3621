//! The loop and storm guard: two agents answering each other with nobody
//! else involved, or one agent sending more than its limit, burn money
//! until someone notices. Past the limit the pair's further direct
//! messages are *held*: stored (acknowledged, never lost) as
//! [`Guarded::Held`] but in no inbox, with a `held` step for the
//! recipient; both agents and the operator topic are told once; `hermod
//! release A B` or the cooldown sends them on, in order, as new log
//! entries with the same ids, each a [`Guarded::Releases`] that ends its
//! hold in the same commit.
//!
//! A turn is a message in the other direction from the pair's previous
//! one, so a one-way stream (a producer feeding a worker) never trips it;
//! a message to or from anyone else ends both agents' runs. The counts
//! live in this node's memory, bounded. What is held is state in the
//! store: every node queues it from the feed (and from the store at
//! start), so any node can release it, retention keeps it, and a release
//! that two nodes make at once delivers it once.

use std::collections::{HashMap, VecDeque};

use hashlink::LruCache;

use serde_json::json;

use super::*;
use crate::engine::Committed;
use crate::model::{Guarded, State as Delivery};

/// Pairs and senders tracked at most. Past it the least recently active
/// sender's count is forgotten, and pairs that hold nothing and had no
/// turn within the window are dropped (at most once a second); only when
/// every tracked pair is busy is a new pair left uncounted.
const TRACKED: usize = 65_536;
/// Messages held per pair at most; past that a send is refused.
const HELD_MAX: usize = 10_000;
/// Held messages one release stores in one batch.
const RELEASE_BATCH: usize = 256;
/// Holds a starting node reads from the store per page.
const RECOVER_PAGE: usize = 1024;

/// The guard's policy (`[guard]` in `config.toml`).
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Turns within `window` that trip a pair (0: off).
    pub turns: usize,
    /// Seconds the counts look back.
    pub window: f64,
    /// Messages one agent may send within `window` (`None`: no limit).
    pub sender_limit: Option<usize>,
    /// Seconds a tripped pair stays held unless released.
    pub cooldown: f64,
    /// Pairs never held.
    pub exempt: Vec<(AgentName, AgentName)>,
    /// Where operators hear of a trip.
    pub topic: String,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            turns: 30,
            window: 300.0,
            sender_limit: None,
            cooldown: 300.0,
            exempt: Vec::new(),
            topic: "hermod.guard".to_owned(),
        }
    }
}

/// Two agents on a channel, in name order.
pub(super) type PairKey = (Channel, AgentName, AgentName);

fn pair_key(channel: &Channel, a: &AgentName, b: &AgentName) -> PairKey {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    (channel.clone(), x.clone(), y.clone())
}

#[derive(Default)]
struct Pair {
    turns: VecDeque<f64>,
    last_from: Option<AgentName>,
    /// Held until then (or until released).
    held_until: Option<f64>,
    /// What the store holds for the pair, seq ascending (kept from the
    /// feed: see [`Guard::apply`]).
    held: VecDeque<Arc<Message>>,
}

/// The counts, in memory (one lock, never held across an await).
pub(super) struct Guard {
    config: GuardConfig,
    pairs: HashMap<PairKey, Pair>,
    partner: LruCache<(Channel, AgentName), AgentName>,
    sent: LruCache<(Channel, AgentName), VecDeque<f64>>,
    /// When idle pairs were last dropped at the cap.
    pairs_swept: f64,
}

impl Default for Guard {
    fn default() -> Self {
        Self {
            config: GuardConfig::default(),
            pairs: HashMap::new(),
            partner: LruCache::new(TRACKED),
            sent: LruCache::new(TRACKED),
            pairs_swept: 0.0,
        }
    }
}

/// What the guard says of a message about to be routed.
pub(super) enum Verdict {
    Pass,
    /// Hold it; `tripped` is true for the message that tripped the pair.
    Hold {
        pair: PairKey,
        tripped: bool,
    },
}

impl Guard {
    /// Counts a direct message `from` → `to` at `now`.
    fn check(&mut self, channel: &Channel, from: &AgentName, to: &AgentName, now: f64) -> Verdict {
        let c = &self.config;
        if from == to
            || from.as_str() == SYSTEM_SENDER
            || c.exempt
                .iter()
                .any(|(a, b)| (a == from && b == to) || (a == to && b == from))
        {
            return Verdict::Pass;
        }
        let (window, turns, cooldown, limit) = (c.window, c.turns, c.cooldown, c.sender_limit);
        let key = pair_key(channel, from, to);
        if self.pairs.get(&key).is_some_and(|p| p.held_until.is_some()) {
            return Verdict::Hold {
                pair: key,
                tripped: false,
            };
        }
        // Anyone else in either agent's last exchange ends that run.
        for (me, other) in [(from, to), (to, from)] {
            let slot = (channel.clone(), me.clone());
            match self.partner.get(&slot) {
                Some(p) if p == other => {}
                Some(p) => {
                    let old = pair_key(channel, me, &p.clone());
                    if let Some(pair) = self.pairs.get_mut(&old) {
                        pair.turns.clear();
                        pair.last_from = None;
                    }
                    self.partner.insert(slot, other.clone());
                }
                // At the cap the least recently active agent is forgotten.
                None => {
                    self.partner.insert(slot, other.clone());
                }
            }
        }
        let mut over = false;
        if let Some(limit) = limit {
            let slot = (channel.clone(), from.clone());
            if !self.sent.contains_key(&slot) {
                self.sent.insert(slot.clone(), VecDeque::new());
            }
            let sent = self.sent.get_mut(&slot).expect("just inserted");
            sent.push_back(now);
            while sent.front().is_some_and(|&t| t < now - window) {
                sent.pop_front();
            }
            over = sent.len() > limit;
        }
        if turns > 0
            && !self.pairs.contains_key(&key)
            && self.pairs.len() >= TRACKED
            && now - self.pairs_swept >= 1.0
        {
            self.pairs_swept = now;
            self.pairs.retain(|_, p| {
                p.held_until.is_some()
                    || !p.held.is_empty()
                    || p.turns.back().is_some_and(|&t| t >= now - window)
            });
        }
        if turns > 0 && (self.pairs.contains_key(&key) || self.pairs.len() < TRACKED) {
            let pair = self.pairs.entry(key.clone()).or_default();
            if pair.last_from.as_ref() != Some(from) {
                pair.turns.push_back(now);
                pair.last_from = Some(from.clone());
            }
            while pair.turns.front().is_some_and(|&t| t < now - window) {
                pair.turns.pop_front();
            }
            over |= pair.turns.len() > turns;
        }
        if !over {
            return Verdict::Pass;
        }
        let pair = self.pairs.entry(key.clone()).or_default();
        pair.held_until = Some(now + cooldown);
        Verdict::Hold {
            pair: key,
            tripped: true,
        }
    }
}

impl Guard {
    /// Follows a commit: a hold joins its pair's queue (and holds the
    /// pair until the cooldown from its time, on every node), a release
    /// leaves it. Recovery at start may queue a hold the feed also brings:
    /// the queue stays ordered and without repeats.
    pub(super) fn apply(&mut self, c: &Committed) {
        let m = &c.message;
        let Some(to) = &m.to else { return };
        match c.guard {
            Guarded::Free => {}
            Guarded::Held => self.queue(m.clone(), m.ts + self.config.cooldown),
            Guarded::Releases(seq) => {
                let key = pair_key(&m.channel, &m.from, to);
                if let Some(p) = self.pairs.get_mut(&key) {
                    if let Ok(i) = p.held.binary_search_by_key(&seq, |h| h.seq) {
                        p.held.remove(i);
                    }
                }
            }
        }
    }

    /// Queues a held message for its pair's release, held until `until`
    /// at least.
    fn queue(&mut self, m: Arc<Message>, until: f64) {
        let Some(to) = &m.to else { return };
        let p = self
            .pairs
            .entry(pair_key(&m.channel, &m.from, to))
            .or_default();
        p.held_until = Some(p.held_until.map_or(until, |u| u.max(until)));
        match p.held.back() {
            Some(last) if last.seq >= m.seq => {
                if let Err(i) = p.held.binary_search_by_key(&m.seq, |h| h.seq) {
                    p.held.insert(i, m);
                }
            }
            _ => p.held.push_back(m),
        }
    }
}

/// A pair the loop guard holds, as the console lists it.
#[derive(Debug, Clone)]
pub struct Hold {
    pub channel: Channel,
    pub a: AgentName,
    pub b: AgentName,
    /// Messages held.
    pub held: usize,
    /// When the cooldown lets them through, unless released before.
    pub until: Option<f64>,
    /// The oldest held messages, at most as many as asked for.
    pub oldest: Vec<Arc<Message>>,
}

impl Broker {
    /// The pairs the loop guard holds now (at most `limit`, in name
    /// order), each with its oldest `messages` held messages.
    pub fn holds(&self, limit: usize, messages: usize) -> Vec<Hold> {
        let guard = self.shared.guard.lock().unwrap();
        let mut holds: Vec<Hold> = guard
            .pairs
            .iter()
            .filter(|(_, p)| !p.held.is_empty() || p.held_until.is_some())
            .map(|((channel, a, b), p)| Hold {
                channel: channel.clone(),
                a: a.clone(),
                b: b.clone(),
                held: p.held.len(),
                until: p.held_until,
                oldest: p.held.iter().take(messages).cloned().collect(),
            })
            .collect();
        drop(guard);
        holds.sort_by(|x, y| (&x.channel, &x.a, &x.b).cmp(&(&y.channel, &y.a, &y.b)));
        holds.truncate(limit);
        holds
    }

    /// Applies `config` to the loop guard from now on.
    pub fn configure_guard(&self, config: GuardConfig) {
        self.shared.guard.lock().unwrap().config = config;
    }

    /// What the guard says of `from` → `to` now: a pair that holds
    /// [`HELD_MAX`] messages already refuses more (sends racing past the
    /// check are still held, never dropped: the cap bounds the queue by
    /// what is in flight).
    pub(super) fn guard_check(
        &self,
        channel: &Channel,
        from: &AgentName,
        to: &AgentName,
    ) -> Result<Verdict> {
        let now = model::now();
        let mut guard = self.shared.guard.lock().unwrap();
        let verdict = guard.check(channel, from, to, now);
        if let Verdict::Hold { pair, .. } = &verdict {
            if guard
                .pairs
                .get(pair)
                .is_some_and(|p| p.held.len() >= HELD_MAX)
            {
                return Err(Error::Forbidden {
                    rule: "loop_guard",
                    detail: format!(
                        "the loop guard holds {HELD_MAX} messages between {from} and {to}; \
                         `hermod release {from} {to}` lets them through"
                    ),
                });
            }
        }
        Ok(verdict)
    }

    /// A message the guard held was stored (and queued, by the feed):
    /// its recipient's step says so, and a trip is announced (once).
    pub(super) async fn held(&self, m: Arc<Message>, pair: PairKey, tripped: bool) {
        let Some(to) = m.to.clone() else {
            return;
        };
        let key = InboxKey::new(m.channel.clone(), to);
        let note = "the loop guard holds it: `hermod release` or the cooldown lets it through";
        let step = self.single(&key, &m, Delivery::Held, "guard", Some(note.to_owned()));
        self.note(step, Some(vec![m.clone()])).await;
        if tripped {
            self.announce_trip(&pair).await;
        }
    }

    /// Tells both agents and the operator topic that `pair` is held.
    async fn announce_trip(&self, pair: &PairKey) {
        let (channel, a, b) = pair;
        let (turns, window, topic, until) = {
            let guard = self.shared.guard.lock().unwrap();
            let c = &guard.config;
            let until = guard.pairs.get(pair).and_then(|p| p.held_until);
            (c.turns, c.window, c.topic.clone(), until)
        };
        let text = format!(
            "loop guard: {a} and {b} exchanged more than {turns} messages in {window} s with nobody \
             else involved; their messages are held until `hermod release {a} {b}` or the cooldown"
        );
        let body = json!({
            "type": "loop_guard",
            "text": text,
            "agents": [a, b],
            "channel": channel,
            "until": until,
        });
        for agent in [a, b] {
            if let Err(e) = self.system_send(channel, agent, body.clone(), None).await {
                tracing::warn!(error = %e, %agent, "telling an agent of the loop guard failed");
            }
        }
        let serde_json::Value::Object(payload) = body else {
            unreachable!()
        };
        let system = Caller::daemon(crate::model::Auth::Owner);
        let from = AgentName::parse(SYSTEM_SENDER).expect("a valid name");
        match self
            .publish(&system, channel.clone(), Some(from), &topic, payload, None)
            .await
        {
            Ok(durable) => {
                let _ = durable.await;
            }
            Err(e) => tracing::warn!(error = %e, "publishing a loop guard notice failed"),
        }
    }

    /// Lets `a` and `b` talk again: what the guard held goes on, in
    /// order, and their counts start over. Owner or admin only.
    pub async fn release_held(
        &self,
        caller: &Caller,
        channel: &Channel,
        a: &AgentName,
        b: &AgentName,
    ) -> Result<usize> {
        self.trust.may_admin(caller)?;
        self.release_pair(pair_key(channel, a, b)).await
    }

    /// Releases what `pair` holds, oldest first, a batch at a time. The
    /// pair stays held meanwhile, so a message sent during the release is
    /// held behind the others and goes in a later batch, in order. Each
    /// batch's write resolves once the feed applied it, which took its
    /// holds off the queue. A failed batch leaves the rest queued and the
    /// pair due for the sweeper's next try.
    async fn release_pair(&self, pair: PairKey) -> Result<usize> {
        let mut released = 0;
        loop {
            let batch: Vec<NewMessage> = {
                let mut guard = self.shared.guard.lock().unwrap();
                let Some(p) = guard.pairs.get_mut(&pair) else {
                    return Ok(released);
                };
                if p.held.is_empty() {
                    p.held_until = None;
                    p.turns.clear();
                    p.last_from = None;
                    return Ok(released);
                }
                p.held
                    .iter()
                    .take(RELEASE_BATCH)
                    .map(|m| NewMessage {
                        id: m.id.clone(),
                        channel: m.channel.clone(),
                        from: m.from.clone(),
                        to: m.to.clone(),
                        topic: None,
                        sent_ts: m.sent_ts,
                        auth: m.auth,
                        meta: m.meta.clone(),
                        body: m.body.clone(),
                        recipients: m.to.iter().cloned().collect(),
                        guard: Guarded::Releases(m.seq),
                    })
                    .collect()
            };
            let n = batch.len();
            let stored = match self.engine.submit(batch).await {
                Ok(durable) => durable.await.unwrap_or(Err(Error::ShuttingDown)),
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                let mut guard = self.shared.guard.lock().unwrap();
                if let Some(p) = guard.pairs.get_mut(&pair) {
                    p.held_until = Some(model::now());
                }
                return Err(e);
            }
            released += n;
        }
    }

    /// Queues again what the store says the guard holds (at start: the
    /// queues live in memory), each pair held until the cooldown from its
    /// newest hold.
    pub(super) async fn recover_held(&self) {
        let mut after = 0;
        loop {
            let page = match self.engine.held(after, RECOVER_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "reading what the loop guard holds failed");
                    return;
                }
            };
            let Some(last) = page.last() else { return };
            after = last.seq;
            let mut guard = self.shared.guard.lock().unwrap();
            let cooldown = guard.config.cooldown;
            for m in page {
                let until = m.ts + cooldown;
                guard.queue(m, until);
            }
        }
    }

    /// Releases the pairs whose cooldown is over (from the sweeper).
    pub(super) async fn release_cooled(&self) {
        let now = model::now();
        let due: Vec<PairKey> = {
            let guard = self.shared.guard.lock().unwrap();
            guard
                .pairs
                .iter()
                .filter(|(_, p)| p.held_until.is_some_and(|t| t <= now))
                .map(|(k, _)| k.clone())
                .collect()
        };
        for pair in due {
            if let Err(e) = self.release_pair(pair).await {
                tracing::warn!(error = %e, "releasing a held pair failed; retrying");
            }
        }
    }

    /// What a sender to `key` from `from` should know now: the guard
    /// holds the pair, or the recipient is busy.
    pub fn notice(&self, from: &AgentName, key: &InboxKey) -> Option<String> {
        let held = {
            let guard = self.shared.guard.lock().unwrap();
            guard
                .pairs
                .get(&pair_key(&key.channel, from, &key.agent))
                .is_some_and(|p| p.held_until.is_some())
        };
        if held {
            return Some(format!(
                "held by the loop guard: {from} and {} exchanged too many messages; \
                 `hermod release {from} {}` lets them through",
                key.agent, key.agent
            ));
        }
        self.notice_for(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AgentName {
        AgentName::parse(s).unwrap()
    }

    /// Ping-pongs `a` and `b` `n` times from `t`; true if any was held.
    fn ping_pong(g: &mut Guard, a: &str, b: &str, n: usize, t: f64) -> bool {
        let (a, b, ch) = (name(a), name(b), Channel::default());
        (0..n).any(|i| {
            let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            matches!(
                g.check(&ch, from, to, t + i as f64 * 0.001),
                Verdict::Hold { .. }
            )
        })
    }

    // At the cap the guard used to stop counting new pairs (failing open):
    // a loop that started once 65,536 pairs had talked was never held.
    #[test]
    fn a_full_table_drops_idle_pairs_and_still_catches_a_new_loop() {
        let mut g = Guard::default();
        for i in 0..TRACKED {
            ping_pong(&mut g, &format!("x{i}"), &format!("y{i}"), 2, 0.0);
        }
        assert_eq!(g.pairs.len(), TRACKED);
        let later = g.config.window + 10.0;
        assert!(
            ping_pong(&mut g, "ping", "pong", 40, later),
            "loop not held"
        );
        assert!(g.pairs.len() < TRACKED);
        // The per-agent tables keep their cap and the newest agents.
        assert_eq!(g.partner.len(), TRACKED);
        assert!(g.partner.contains_key(&(Channel::default(), name("ping"))));
    }
}
