//! Cursors: acknowledgement, and the claim / confirm / release steps a
//! destructive reader (`/poll`, `/subscribe`) takes on the shared cursor.
//!
//! Two layers. In memory, a *claim* moves this node's cursor at once, so
//! readers on this node never hand out one message twice. In the store,
//! a claim is *confirmed* with compare-and-set from the value the store
//! holds, so a cursor another node moved meanwhile is never overwritten:
//! the claim then covers only what lies after that node's.

use super::*;
use crate::engine::Swap;

impl Broker {
    /// The cursor of an inbox as readers on this node see it (claims
    /// included).
    pub async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        if let Some(&seq) = self.shared.state.lock().unwrap().cursors.get(key) {
            return Ok(seq);
        }
        self.engine.cursor(key).await
    }

    /// Moves an inbox cursor forward (never back) and returns where this
    /// caller's share begins: it owns the messages after that, up to
    /// `seq`. Resolves once the new cursor is durable.
    ///
    /// Readers sharing one cursor (SSE-interop `/poll` and `/subscribe`,
    /// here or on another node) each deliver only their share, so no
    /// message goes out twice. If the store refuses the write, the claim
    /// is undone (unless a later claim moved past it) and the caller gets
    /// the error, so the messages stay unread rather than lost. The
    /// messages acknowledged are `read` through `door`.
    pub async fn ack(&self, key: &InboxKey, seq: Seq, door: &str) -> Result<Seq> {
        let previous = self.claim(key, seq).await?;
        if seq.min(self.committed().0) <= previous {
            return Ok(previous);
        }
        match self.confirm(key, previous, seq, door).await {
            Ok(from) => Ok(from),
            Err(e) => {
                self.release(key, previous, seq);
                Err(e)
            }
        }
    }

    /// The in-memory half of [`Broker::ack`]: moves the cursor (the claim
    /// every reader on this node sees at once) and returns where it was.
    /// Nothing is stored until [`Broker::confirm`]; [`Broker::release`]
    /// undoes a claim whose messages did not reach the client.
    pub async fn claim(&self, key: &InboxKey, seq: Seq) -> Result<Seq> {
        let stored = self.cursor(key).await?;
        // Never past the log: an ack from the future would skip messages.
        let seq = seq.min(self.committed().0);
        let mut state = self.shared.state.lock().unwrap();
        let c = state.cursors.entry(key.clone()).or_insert(stored);
        let previous = *c;
        *c = (*c).max(seq);
        Ok(previous)
    }

    /// Makes a claim from `previous` up to `seq` durable, by
    /// compare-and-set against the stored cursor. Returns where the
    /// caller's share begins: `previous`, or later when another node
    /// stored a cursor inside the claim meanwhile (`>= seq`: it took all
    /// of it). A share that went out already then went out twice, which
    /// the caller may log; a `/poll` confirms before it answers, so it
    /// never does.
    ///
    /// This node stores one inbox's cursor one swap at a time (a later
    /// confirm waits its turn, never holding a lock while it waits), so
    /// it always knows the value it expects, and a swap that fails can
    /// only mean another node moved the cursor.
    ///
    /// The caller's share is `read` through `door` from then on.
    pub async fn confirm(
        &self,
        key: &InboxKey,
        previous: Seq,
        seq: Seq,
        door: &str,
    ) -> Result<Seq> {
        let seq = seq.min(self.committed().0);
        let mut turn = self.store_turn(key).await;
        let mut expected = match turn.known {
            Some(v) => v,
            None => self.engine.cursor(key).await?,
        };
        loop {
            if expected >= seq {
                // Already stored: by this node's own later claim (which
                // covered this one: the share stands), or by another's.
                turn.known = Some(expected);
                let from = match turn.own {
                    Some((from, to)) if to >= seq && from < seq => previous.max(from),
                    _ => previous.max(expected),
                };
                let mut state = self.shared.state.lock().unwrap();
                let c = state.cursors.entry(key.clone()).or_insert(expected);
                *c = (*c).max(expected);
                return Ok(from);
            }
            // Unknown until the answer comes: a cancelled or failed swap
            // may or may not have been applied.
            turn.known = None;
            if let Swap::Lost(stored) = self.engine.swap_cursor(key.clone(), expected, seq).await? {
                // Another node stored `stored` since this node last looked
                // (maybe `seq` itself: it read the same batch).
                turn.own = None;
                expected = stored;
                continue;
            }
            turn.own = Some(match turn.own {
                Some((from, to)) if to == expected => (from, seq),
                _ => (expected, seq),
            });
            turn.known = Some(seq);
            drop(turn);
            let from = previous.max(expected);
            let step = crate::engine::Step {
                key: key.clone(),
                lo: from,
                hi: seq,
                state: model::State::Read,
                ts: model::now(),
                door: door.to_owned(),
                note: None,
            };
            self.note(step, None).await;
            return Ok(from);
        }
    }

    /// Waits until no other confirm of `key` is storing on this node, and
    /// takes the turn (given back when the guard drops).
    async fn store_turn(&self, key: &InboxKey) -> StoreTurn {
        loop {
            let notify = {
                let mut state = self.shared.state.lock().unwrap();
                let s = state.stores.entry(key.clone()).or_default();
                if !s.busy {
                    s.busy = true;
                    return StoreTurn {
                        shared: self.shared.clone(),
                        key: key.clone(),
                        known: s.known,
                        own: s.own,
                        turn: s.turn.clone(),
                    };
                }
                s.turn.clone()
            };
            // A turn given back before this waits leaves a permit, so the
            // wake-up is never missed (a stale one only loops once more).
            notify.notified().await;
        }
    }

    /// [`Broker::claim`] for a destructive stream (interop `/subscribe`),
    /// as a guard: the stream delivers the messages after
    /// [`Claim::previous`] up to `seq`, then [`Claim::confirm`]s once they
    /// reached the client. Dropped unconfirmed (the stream died with them
    /// in a buffer), the claim is released: the next reader gets them.
    pub async fn claim_through(
        &self,
        key: &InboxKey,
        seq: Seq,
        door: &'static str,
    ) -> Result<Claim> {
        let previous = self.claim(key, seq).await?;
        let seq = seq.min(self.committed().0);
        Ok(Claim {
            broker: self.clone(),
            key: key.clone(),
            door,
            range: (seq > previous).then_some((previous, seq)),
            previous,
        })
    }

    /// Undoes a claim from `previous` to `seq`, unless a later claim has
    /// moved the cursor on since.
    pub fn release(&self, key: &InboxKey, previous: Seq, seq: Seq) {
        let committed = self.committed().0;
        let mut state = self.shared.state.lock().unwrap();
        if let Some(c) = state.cursors.get_mut(key) {
            if *c == seq.min(committed) {
                *c = previous;
            }
        }
    }

    /// How many messages `key`'s inbox holds after `after`.
    pub async fn count(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        self.engine.count_inbox(key, after).await
    }

    /// How many messages wait in `key`'s inbox after its cursor.
    pub async fn unread(&self, key: &InboxKey) -> Result<u64> {
        let cursor = self.cursor(key).await?;
        self.engine.count_inbox(key, cursor).await
    }
}

/// A batch claimed from a shared cursor; see [`Broker::claim_through`].
pub struct Claim {
    broker: Broker,
    key: InboxKey,
    door: &'static str,
    previous: Seq,
    /// What is claimed and not stored yet (none: nothing new was claimed).
    range: Option<(Seq, Seq)>,
}

impl Claim {
    /// The claimer's share is the messages after this.
    pub fn previous(&self) -> Seq {
        self.previous
    }

    /// Stores the claim; resolves once durable.
    pub async fn confirm(mut self) -> Result<()> {
        let Some((previous, seq)) = self.range.take() else {
            return Ok(());
        };
        let from = self
            .broker
            .confirm(&self.key, previous, seq, self.door)
            .await?;
        if from > previous {
            // Another node's reader took part of it while this one
            // delivered it: those went out twice.
            tracing::warn!(agent = %self.key.agent, from = previous, to = from,
                "another node delivered part of this batch as well");
        }
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some((previous, seq)) = self.range.take() {
            self.broker.release(&self.key, previous, seq);
        }
    }
}

/// How this node stores one inbox's cursor: one swap at a time.
#[derive(Default)]
pub(crate) struct Stores {
    busy: bool,
    /// The value this node knows is stored (`None`: read it first).
    known: Option<Seq>,
    /// The newest run of stored values this node wrote itself, `(from,
    /// to]`: tells its own later stores from another node's.
    own: Option<(Seq, Seq)>,
    turn: Arc<tokio::sync::Notify>,
}

/// The turn to store one inbox's cursor; what the holder learned goes
/// back when it drops. A holder cancelled mid-swap leaves the stored
/// value unknown, so the next one reads it first.
struct StoreTurn {
    shared: Arc<Shared>,
    key: InboxKey,
    known: Option<Seq>,
    own: Option<(Seq, Seq)>,
    turn: Arc<tokio::sync::Notify>,
}

impl Drop for StoreTurn {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().unwrap();
        if let Some(s) = state.stores.get_mut(&self.key) {
            s.busy = false;
            s.known = self.known.take();
            s.own = self.own.take();
        }
        // Also when the inbox was forgotten meanwhile: nobody waits forever.
        self.turn.notify_one();
    }
}
