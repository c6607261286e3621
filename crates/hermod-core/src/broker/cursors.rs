//! Cursors: acknowledgement, and the claims destructive readers (`/poll`,
//! `/subscribe`, Unix delivery, explicit acks) take over the stored cursor.
//!
//! The store holds one seq per inbox: everything up to it was read. On
//! top of it, each node keeps the *claims* its readers hold, as a set of
//! disjoint ranges `(lo, hi]` after the stored value:
//!
//! - A reader **claims** the unclaimed parts of what it read (in memory,
//!   at once), so readers on this node never hand out one message twice;
//!   its share is what it claimed ([`Claim::owns`]).
//! - It **confirms** once it handed them out (a stream: the peer has
//!   them) or before it does (`/poll`): the claim becomes final, and the
//!   stored cursor moves, by compare-and-set, through the confirmed claims
//!   that follow it *without a gap*. A confirm therefore never moves the
//!   stored cursor over a claim that may still be released; a confirmed
//!   claim behind a pending one stays in memory until that one settles.
//! - A claim dropped unconfirmed (error, cancellation, a disconnect) or
//!   whose store failed before anything was handed out (`/poll`) is
//!   **released**: the hole it leaves is read again by the next reader
//!   that starts at the cursor ([`Broker::cursor`] is the end of the stored
//!   value and the claims that follow it without a gap). A claim confirmed
//!   after its messages were handed out ([`Claim::confirm_handed_out`]) is
//!   never released: its store is retried until it lands.
//! - Every move of the stored cursor stores the `read` steps of the claims
//!   it covers in the same write, so a moved cursor always says who read.
//!
//! Another node may store the cursor meanwhile: every claim and cursor
//! read first takes the stored value (the newer of memory and the store),
//! and claims it covers are that node's, not this one's. A stream, which
//! hands out before it confirms, first takes this node's *lease* over
//! its claims in the store ([`Broker::claim_streamed`]), so no other node hands
//! those messages out meanwhile: their swaps answer [`Swap::Leased`] (a
//! `/poll` there takes nothing, a stream there looks again later).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use crate::engine::{Step, Swap, LEASE};

impl Broker {
    /// Which door read the message at `seq` of `key`'s inbox (its `read`
    /// step), if any was recorded: a stream resumed with `Last-Event-ID`
    /// replays only what a stream of its door read, never what another
    /// destructive door handed out (that would be twice).
    pub async fn read_through(&self, key: &InboxKey, seq: Seq) -> Result<Option<String>> {
        // This node's own claims and recent shares first: a claim's steps
        // are stored with the cursor move that covers it, which may still
        // be on its way (a `/poll` confirming right now).
        let known = {
            let state = self.shared.state.lock().unwrap();
            state.cursors.get(key).and_then(|c| {
                let claimed = c
                    .claims
                    .range(..seq)
                    .next_back()
                    .filter(|(_, r)| seq <= r.hi)
                    .map(|(_, r)| r.door.to_string());
                claimed.or_else(|| {
                    c.read_by
                        .iter()
                        .find(|(lo, hi, _)| *lo < seq && seq <= *hi)
                        .map(|(.., door)| door.clone())
                })
            })
        };
        if known.is_some() {
            return Ok(known);
        }
        Ok(self
            .engine
            .steps(key, seq)
            .await?
            .into_iter()
            .find(|s| s.state == model::State::Read)
            .map(|s| s.door))
    }

    /// The cursor of an inbox as readers on this node see it: the stored
    /// value (never a stale copy: read from the store each time, since
    /// another node may have moved it), then the claims held here that
    /// follow it without a gap. A reader starts after this.
    pub async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        if let Some(known) = self.known_cursor(key) {
            return Ok(known);
        }
        let stored = self.engine.cursor(key).await?;
        let mut state = self.shared.state.lock().unwrap();
        Ok(match state.cursors.get_mut(key) {
            Some(c) => {
                c.observe(stored);
                c.first_free()
            }
            None => stored,
        })
    }

    /// How far `key`'s inbox was read for good: the stored cursor and the
    /// confirmed claims that follow it without a gap (never a claim still
    /// pending: its reader may yet release it). What an SSE resume replays
    /// ends here.
    pub async fn read_cursor(&self, key: &InboxKey) -> Result<Seq> {
        let stored = match self.known_cursor(key) {
            Some(_) => None,
            None => Some(self.engine.cursor(key).await?),
        };
        let mut state = self.shared.state.lock().unwrap();
        Ok(match state.cursors.get_mut(key) {
            Some(c) => {
                if let Some(stored) = stored {
                    c.observe(stored);
                }
                c.confirmed_through()
            }
            None => stored.unwrap_or(0),
        })
    }

    /// The cursor readers on this node start after, when memory knows it
    /// for sure: the store is this node's alone ([`Engine::shares_cursors`]
    /// is false) and the inbox's cursor was read since start (every later
    /// move was made here). `None`: ask the store.
    fn known_cursor(&self, key: &InboxKey) -> Option<Seq> {
        if self.engine.shares_cursors() {
            return None;
        }
        let state = self.shared.state.lock().unwrap();
        state
            .cursors
            .get(key)
            .filter(|c| c.observed)
            .map(Cursor::first_free)
    }

    /// Acknowledges everything in `key`'s inbox up to `seq` (that no other
    /// reader holds) as `read` through `door`; resolves once stored, or
    /// with the store's error (then nothing was acknowledged), or with
    /// `storage_busy` if only part could be stored (another reader's batch
    /// below is still out, or another node's lease stands).
    pub async fn ack(&self, key: &InboxKey, seq: Seq, door: &str) -> Result<()> {
        let mut claim = self.claim(key, 0, seq, door).await?;
        let end = |c: &Claim| c.ranges.last().map_or(0, |r| r.1);
        let wanted = end(&claim);
        claim.confirm().await?;
        if end(&claim) < wanted {
            return Err(Error::StorageBusy(
                "another reader is handing out part of this inbox right now; acknowledge again"
                    .into(),
            ));
        }
        Ok(())
    }

    /// [`Broker::claim`] for a stream, which hands out before it confirms
    /// (`/subscribe`, Unix auto mode): where other nodes move this store's
    /// cursors too, it also stores this node's lease over its claims
    /// ([`Engine::lease_cursor`]), so no other node's reader hands them out
    /// while the stream's peer gets them. If another node's lease stands,
    /// the claim is released and owns nothing (that node's stream is
    /// sending them); the stream finds the hole later
    /// ([`Broker::hole_below`]) and tries again.
    pub async fn claim_streamed(
        &self,
        key: &InboxKey,
        after: Seq,
        seq: Seq,
        door: &str,
    ) -> Result<Claim> {
        let mut claim = self.claim(key, after, seq, door).await?;
        self.lease(&mut claim).await?;
        Ok(claim)
    }

    async fn lease(&self, claim: &mut Claim) -> Result<()> {
        if !self.engine.shares_cursors() || claim.ranges.is_empty() {
            return Ok(());
        }
        if self.relet(&claim.key).await? == Swap::Leased {
            claim.give_up();
        }
        claim.seen = claim.taken.load(Ordering::Acquire);
        Ok(())
    }

    /// Renews this node's lease over `key`'s inbox once a third of
    /// [`LEASE`] has passed since it was stored: a stream calls this while
    /// its peer has not acknowledged what it sent (so the lease outlives a
    /// slow reader, and lapses soon after this node dies).
    pub async fn keep_lease(&self, key: &InboxKey) -> Result<()> {
        let due = {
            let state = self.shared.state.lock().unwrap();
            state
                .cursors
                .get(key)
                .and_then(|c| c.lease)
                .is_some_and(|(_, at)| at.elapsed() > LEASE / 3)
        };
        if due && self.relet(key).await? == Swap::Leased {
            tracing::warn!(agent = %key.agent,
                "this node's lease lapsed and another node took the inbox; what its streams sent may come twice");
        }
        Ok(())
    }

    /// Stores this node's lease over `key` as its claims need it now: up
    /// to the end of the last one, or none. Another node's move first
    /// makes its claims that node's ([`Cursor::saw`]), then again.
    async fn relet(&self, key: &InboxKey) -> Result<Swap> {
        // One at a time per inbox, each reading the claims once it has the
        // turn: a relet that read them earlier (one giving the lease back
        // after a release) would otherwise store its older, shorter lease
        // over a newer one, and a stream would hand out unleased.
        let turn = {
            let mut state = self.shared.state.lock().unwrap();
            state.cursors.entry(key.clone()).or_default().relet.clone()
        };
        let _turn = turn.lock().await;
        let mut attempts = 0;
        loop {
            let (expected, upto) = {
                let mut state = self.shared.state.lock().unwrap();
                let c = state.cursors.entry(key.clone()).or_default();
                let upto = c.claims.last_key_value().map_or(0, |(_, r)| r.hi);
                (c.stored, upto)
            };
            let swap = self
                .engine
                .lease_cursor(key.clone(), expected, upto)
                .await?;
            tracing::debug!(agent = %key.agent, expected, upto, ?swap, "lease");
            let fresh = {
                let mut state = self.shared.state.lock().unwrap();
                let c = state.cursors.entry(key.clone()).or_default();
                match swap {
                    // (Says nothing of a swap of this node still in flight.)
                    Swap::Lost(stored) => c.saw(stored),
                    Swap::Moved => {
                        c.lease = (upto > expected).then(|| (upto, std::time::Instant::now()));
                        return Ok(swap);
                    }
                    Swap::Leased => return Ok(swap),
                }
            };
            if !fresh {
                stale(&mut attempts).await?;
            }
        }
    }

    /// Claims the messages of `key`'s inbox in `(after, seq]` that are
    /// neither stored as read nor claimed by another reader: the caller
    /// hands out only those ([`Claim::owns`]), then
    /// [`Claim::confirm`]s. Dropped unconfirmed, the claim is released.
    pub async fn claim(&self, key: &InboxKey, after: Seq, seq: Seq, door: &str) -> Result<Claim> {
        self.claim_as(key, after, seq, door, false).await
    }

    /// [`Broker::claim`] for a reader that confirms *before* it hands out
    /// (`/poll`): it takes nothing while another reader's claim on this
    /// inbox is unconfirmed (a stream whose peer has not acknowledged its
    /// batch yet). Its share could not be stored before that one settles —
    /// the stored cursor is one number — and a crash meanwhile would hand
    /// out again what it answered. That reader delivers those messages,
    /// or releases them for the next claim.
    pub async fn claim_storable(
        &self,
        key: &InboxKey,
        after: Seq,
        seq: Seq,
        door: &str,
    ) -> Result<Claim> {
        self.claim_as(key, after, seq, door, true).await
    }

    async fn claim_as(
        &self,
        key: &InboxKey,
        after: Seq,
        seq: Seq,
        door: &str,
        storable: bool,
    ) -> Result<Claim> {
        // Read before claiming: what another node stored is not ours.
        let stored = match self.known_cursor(key) {
            Some(_) => None,
            None => Some(self.engine.cursor(key).await?),
        };
        // (`known_cursor` answered for an entry observed since start: its
        // `stored` is every value this node made since.)
        // Never past the log: a claim from the future would skip messages.
        let seq = seq.min(self.committed().0);
        let taken = Arc::new(AtomicU64::new(0));
        let mut state = self.shared.state.lock().unwrap();
        let c = state.cursors.entry(key.clone()).or_default();
        if let Some(stored) = stored {
            c.observe(stored);
        }
        let mut ranges = Vec::new();
        let pending = c.claims.values().any(|r| r.confirmed.is_none());
        let seq = if storable && pending { 0 } else { seq };
        let mut pos = after.max(c.stored);
        for (&lo, r) in c.claims.range(..seq) {
            if r.hi <= pos {
                continue;
            }
            if lo > pos {
                ranges.push((pos, lo));
            }
            pos = r.hi;
        }
        if pos < seq {
            ranges.push((pos, seq));
        }
        tracing::debug!(agent = %key.agent, door, after, seq, stored = c.stored, ?ranges, "claim");
        let door_of: Arc<str> = Arc::from(door);
        for &(lo, hi) in &ranges {
            let range = Range {
                hi,
                confirmed: None,
                door: door_of.clone(),
                taken: taken.clone(),
            };
            c.claims.insert(lo, range);
        }
        Ok(Claim {
            broker: self.clone(),
            key: key.clone(),
            door: door.to_owned(),
            ranges,
            taken,
            seen: 0,
            settled: false,
        })
    }

    /// Stores what the confirmed claims of `key` let the cursor move
    /// through, after marking `claim`'s ranges confirmed. On an error the
    /// claim is released (with the turn: no other swap can be covering it)
    /// unless it is `kept` (its messages are handed out already): then it
    /// stays confirmed in memory, readers pass it by, and any later store
    /// of this inbox's cursor covers it.
    ///
    /// Every move stores the `read` steps of the claims it covers with it
    /// (see [`Engine::swap_cursor`]); returns the steps its moves added and
    /// the stored cursor (a claim not kept is released past it), or `None`
    /// if another node's lease stood (then the claim is released unless
    /// kept: kept, it is `storage_busy`, tried again), or if its reader
    /// was gone (`present` said so) when it got the turn.
    async fn store_claim(
        &self,
        key: &InboxKey,
        claim: &Claim,
        kept: bool,
        present: Option<&Present>,
    ) -> Result<Option<(Vec<Step>, Seq)>> {
        let mut added = Vec::new();
        let mut attempts = 0;
        // A move of this confirm stored something.
        let mut moved = false;
        let mut turn = self.store_turn(key, claim).await;
        if kept {
            turn.release = None;
        } else if present.is_some_and(|p| !p()) {
            // Its reader left while it waited for the turn (behind a swap
            // the store was slow to answer): nothing was sent for it, and
            // stored now it would be read by a reader no one answers.
            tracing::debug!(agent = %key.agent, door = claim.door, "the reader left before its confirm's turn: released");
            return Ok(None);
        }
        let mut unsure = {
            let mut state = self.shared.state.lock().unwrap();
            let c = state.cursors.entry(key.clone()).or_default();
            // Confirmed only now, with the turn: a swap of another claim
            // never covers a claim that is still waiting and may be
            // cancelled (and released) meanwhile.
            c.confirm(&claim.ranges, &claim.taken);
            c.unanswered.is_some()
        };
        loop {
            if unsure {
                // A swap whose storer was cancelled may have been applied:
                // look before swapping from a value that may be gone.
                let stored = self.engine.cursor(key).await?;
                let mut state = self.shared.state.lock().unwrap();
                let c = state.cursors.entry(key.clone()).or_default();
                c.observe(stored);
                c.unanswered = None;
                unsure = false;
            }
            let (expected, target, steps) = {
                let mut state = self.shared.state.lock().unwrap();
                let c = state.cursors.entry(key.clone()).or_default();
                let through = c.confirmed_through();
                if through > c.stored {
                    // Unknown until the answer comes: a cancelled or failed
                    // swap may or may not have been applied.
                    c.unanswered = Some(through);
                }
                (c.stored, through, c.read_steps(key, through))
            };
            if target <= expected {
                // Stored, or behind a claim still pending (its confirm
                // stores this one too).
                break;
            }
            let covered: Vec<(Seq, Seq, String)> =
                steps.iter().map(|s| (s.lo, s.hi, s.door.clone())).collect();
            let swap = self
                .engine
                .swap_cursor(key.clone(), expected, target, steps)
                .await;
            tracing::debug!(agent = %key.agent, door = claim.door, expected, target, swap = ?swap.as_ref().map(|s| s.0), "cursor swap");
            let fresh = {
                let mut state = self.shared.state.lock().unwrap();
                let c = state.cursors.entry(key.clone()).or_default();
                match swap {
                    Ok((Swap::Moved, mut steps)) => {
                        // Who read what, known here before the claims go
                        // (`observe` drops them) and before the steps are
                        // found in the store: a `/subscribe` resumed right
                        // now replays only what its own door read (it
                        // replayed what a `/poll` had just been answered
                        // with: the checker's NATS run, seed 878482111).
                        for r in covered {
                            if c.read_by.len() == READ_BY {
                                c.read_by.pop_front();
                            }
                            c.read_by.push_back(r);
                        }
                        c.observe(target);
                        if c.lease.is_some_and(|(upto, _)| upto <= target) {
                            // The engine let it go with the move.
                            c.lease = None;
                        }
                        added.append(&mut steps);
                        moved = true;
                        true
                    }
                    Ok((Swap::Lost(stored), _)) => {
                        // The answer to this very swap: it was not applied.
                        c.unanswered = None;
                        c.saw(stored)
                    }
                    Ok((Swap::Leased, _)) if kept => {
                        return Err(Error::StorageBusy(
                            "another node holds this inbox's lease".into(),
                        ))
                    }
                    // An earlier move of this confirm stored part of the
                    // claim (`read` by this door): that part is handed
                    // out, the rest released below.
                    Ok((Swap::Leased, _)) if moved => break,
                    // Released with the turn: that node is handing them out.
                    Ok((Swap::Leased, _)) => return Ok(None),
                    Err(e) => return Err(e),
                }
            };
            if !fresh {
                stale(&mut attempts).await?;
            }
        }
        let through = {
            let mut state = self.shared.state.lock().unwrap();
            let c = state.cursors.entry(key.clone()).or_default();
            if !kept {
                // What of the claim lies past the stored cursor waits behind
                // a claim still pending or a hole (a claim released after
                // this one was taken): not stored, so not handed out — a
                // crash, or another node reading the stored cursor, would
                // hand it out again. Released for the next reader.
                let above: Vec<(Seq, Seq)> = claim
                    .ranges
                    .iter()
                    .filter(|&&(_, hi)| hi > c.stored)
                    .map(|&(lo, hi)| (lo.max(c.stored), hi))
                    .collect();
                if !above.is_empty() {
                    tracing::debug!(agent = %key.agent, door = claim.door, ?above, "released past the stored cursor");
                }
                c.release(&above, &claim.taken);
            }
            c.stored
        };
        turn.release = None;
        Ok(Some((added, through)))
    }

    /// Waits until no other confirm of `key` is storing on this node, and
    /// takes the turn (given back when the guard drops; dropped while
    /// armed, it releases `claim` under the same lock).
    async fn store_turn(&self, key: &InboxKey, claim: &Claim) -> StoreTurn {
        loop {
            let notify = {
                let mut state = self.shared.state.lock().unwrap();
                let c = state.cursors.entry(key.clone()).or_default();
                if !c.busy {
                    c.busy = true;
                    return StoreTurn {
                        shared: self.shared.clone(),
                        key: key.clone(),
                        release: Some((claim.ranges.clone(), claim.taken.clone())),
                        turn: c.turn.clone(),
                    };
                }
                c.turn.clone()
            };
            // A turn given back before this waits leaves a permit, so the
            // wake-up is never missed (a stale one only loops once more).
            notify.notified().await;
        }
    }

    /// The first seq at or below `position` that is neither stored as
    /// read nor claimed on this node, if it is below `position`: a claim
    /// released after a later one was taken left a hole there, which a
    /// reader already past it (a stream) must read again. Memory only.
    pub fn hole_below(&self, key: &InboxKey, position: Seq) -> Option<Seq> {
        let state = self.shared.state.lock().unwrap();
        let free = state.cursors.get(key)?.first_free();
        (free < position).then_some(free)
    }

    /// How many messages `key`'s inbox holds after `after`.
    pub async fn count(&self, key: &InboxKey, after: Seq) -> Result<u64> {
        self.engine.count_inbox(key, after).await
    }

    /// How many messages of `key`'s inbox are not read for good: a batch
    /// a stream wrote whose peer has not consumed it yet still counts.
    pub async fn unread(&self, key: &InboxKey) -> Result<u64> {
        let cursor = self.read_cursor(key).await?;
        self.engine.count_inbox(key, cursor).await
    }
}

/// A reader's claim over part of an inbox; see [`Broker::claim`]. A guard:
/// dropped before [`Claim::confirm`] succeeded, it is released, so what it
/// held goes to the next reader (error, cancellation, a disconnect).
pub struct Claim {
    broker: Broker,
    key: InboxKey,
    door: String,
    /// What this claim took: disjoint, ascending.
    ranges: Vec<(Seq, Seq)>,
    /// The highest seq another node stored over this claim before it was
    /// stored here (those are that node's). Also the claim's identity in
    /// the inbox's ranges.
    taken: Arc<AtomicU64>,
    /// `taken` when its holder last looked at what it owns, before handing
    /// out ([`Broker::claim_streamed`]): more taken after that came twice.
    seen: Seq,
    /// Confirmed (or released after a failed store): nothing to release.
    settled: bool,
}

impl Claim {
    /// Whether the message at `seq` is this claimer's to hand out.
    pub fn owns(&self, seq: Seq) -> bool {
        seq > self.taken.load(Ordering::Acquire)
            && self.ranges.iter().any(|&(lo, hi)| lo < seq && seq <= hi)
    }

    /// Releases what this claim holds: it owns nothing.
    fn give_up(&mut self) {
        tracing::debug!(agent = %self.key.agent, door = self.door, ranges = ?self.ranges, "claim given up (leased elsewhere)");
        let mut state = self.broker.shared.state.lock().unwrap();
        if let Some(c) = state.cursors.get_mut(&self.key) {
            c.release(&self.ranges, &self.taken);
        }
        self.ranges.clear();
        self.settled = true;
    }

    /// Confirms the claim: it is final (never released), and stored as
    /// far as the claims before it allow; resolves once that is durable.
    /// The claimer's share ([`Claim::owns`]) is `read` through its door.
    /// On an error the claim is released and the caller hands out nothing.
    ///
    /// Once begun, a confirm runs to its end in a task of its own, even if
    /// its caller goes away (a `/poll` whose client hung up): the store may
    /// apply a cursor swap whose answer nobody waits for (SQLite's writer
    /// has it queued), and a swap applied with its claim released in memory
    /// would count those messages as read by nobody — lost. Finished, they
    /// are `read` through this door, as with an answer lost in flight.
    pub async fn confirm(&mut self) -> Result<()> {
        self.confirm_as(false, None).await
    }

    /// [`Claim::confirm`] for a reader that may leave while the confirm
    /// waits for its turn (a `/poll` whose client gave up): if `present`
    /// says it is gone once the turn comes, the claim is released and the
    /// reader owns nothing. (A `/poll` stored 10 s after its client had
    /// timed out, behind a cursor write NATS was slow to answer: read by
    /// `poll`, handed out to no one.)
    pub async fn confirm_while(
        &mut self,
        present: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<()> {
        self.confirm_as(false, Some(Arc::new(present))).await
    }

    /// Confirms a claim whose messages are in the reader's hands already
    /// (a stream's peer acknowledged them, a Unix client consumed them):
    /// final at once, whatever the store says. A store that fails (a full
    /// disk, the database locked) is tried again until it lands, the claim
    /// held confirmed in memory meanwhile, so no reader on this node hands
    /// those messages out again; resolves once stored. Only a crash before
    /// then loses the move (the messages come again after the restart).
    pub async fn confirm_handed_out(&mut self) -> Result<()> {
        self.confirm_as(true, None).await
    }

    /// [`Claim::confirm_handed_out`] for several claims, oldest first: all
    /// are final at once, so the first store moves the cursor over all of
    /// them (one write, not one per batch: on NATS each is a replicated
    /// round trip, and a fast auto-mode reader's cursor, stored batch by
    /// batch, fell thousands of messages behind what its client had).
    /// Every claim is confirmed even if one fails; the first error is
    /// returned.
    pub async fn confirm_all_handed_out(claims: Vec<Claim>) -> Result<()> {
        for claim in &claims {
            let mut state = claim.broker.shared.state.lock().unwrap();
            if let Some(c) = state.cursors.get_mut(&claim.key) {
                c.confirm(&claim.ranges, &claim.taken);
            }
        }
        let mut result = Ok(());
        for mut claim in claims {
            let confirmed = claim.confirm_handed_out().await;
            if result.is_ok() {
                result = confirmed;
            }
        }
        result
    }

    async fn confirm_as(&mut self, kept: bool, present: Option<Present>) -> Result<()> {
        if self.settled {
            return Ok(());
        }
        let mut claim = Claim {
            broker: self.broker.clone(),
            key: self.key.clone(),
            door: self.door.clone(),
            ranges: std::mem::take(&mut self.ranges),
            taken: self.taken.clone(),
            seen: self.seen,
            settled: false,
        };
        // Settled here: the task's claim is the one that settles or
        // releases (this one's drop must not release it meanwhile).
        self.settled = true;
        let task = tokio::spawn(async move {
            let mut result = claim.settle(kept, present.as_ref()).await;
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = &result {
                if !kept || !matches!(e.code(), "storage_error" | "storage_busy") {
                    break;
                }
                if backoff == Duration::from_millis(50) {
                    tracing::warn!(agent = %claim.key.agent, error = %e,
                        "storing a cursor over handed-out messages failed; trying again until it lands");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                result = claim.settle(kept, None).await;
            }
            (claim, result)
        });
        match task.await {
            Ok((claim, result)) => {
                *self = claim;
                result
            }
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    /// [`Claim::confirm`]'s work, in its task.
    async fn settle(&mut self, kept: bool, present: Option<&Present>) -> Result<()> {
        // Settled either way: a failed store releases the claim itself
        // (or, kept, holds it confirmed).
        let stored = self
            .broker
            .store_claim(&self.key, self, kept, present)
            .await;
        self.settled = true;
        let added = match stored {
            Ok(Some((added, through))) => {
                if !kept {
                    // Its share is what was stored (see `store_claim`).
                    self.ranges.retain_mut(|r| {
                        r.1 = r.1.min(through);
                        r.0 < r.1
                    });
                }
                added
            }
            Ok(None) => {
                // Another node's lease, or the reader left: released, it
                // owns nothing.
                self.ranges.clear();
                return Ok(());
            }
            Err(e) => {
                if !kept {
                    self.ranges.clear();
                }
                return Err(e);
            }
        };
        let taken = self.taken.load(Ordering::Acquire);
        if kept && taken > self.seen {
            // Another node's reader took part of it after this one handed
            // it out (this node's lease lapsed).
            tracing::warn!(agent = %self.key.agent, from = self.seen, to = taken,
                "another node delivered part of what this node handed out");
        }
        // The `read` steps were stored with the cursor; whoever added one
        // tells its senders (receipts are messages of their own: the
        // recorder sends them, the reader does not wait).
        self.broker.tell_senders_of(added);
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        tracing::debug!(agent = %self.key.agent, door = self.door, ranges = ?self.ranges, "claim dropped unconfirmed: released");
        let leased = {
            let mut state = self.broker.shared.state.lock().unwrap();
            state.cursors.get_mut(&self.key).is_some_and(|c| {
                c.release(&self.ranges, &self.taken);
                c.lease.is_some()
            })
        };
        // A stream cut before its peer had the batch: give the lease back
        // (or shorten it), so other nodes need not wait for it to lapse.
        if let (true, Ok(runtime)) = (leased, tokio::runtime::Handle::try_current()) {
            let (broker, key) = (self.broker.clone(), self.key.clone());
            runtime.spawn(async move {
                if let Err(e) = broker.relet(&key).await {
                    tracing::debug!(error = %e, "giving a cursor lease back failed; it lapses");
                }
            });
        }
    }
}

/// One inbox's cursor on this node: the stored value and the claims over it.
#[derive(Default)]
pub(crate) struct Cursor {
    /// The stored cursor as this node last saw it.
    stored: Seq,
    /// `stored` was read from the store at least once (an entry made
    /// before that knows nothing of it).
    observed: bool,
    /// Claims held after `stored`, by their start: `lo -> (lo, hi]`.
    claims: BTreeMap<Seq, Range>,
    /// A confirm is storing (one swap at a time per inbox on this node,
    /// so it knows the value it expects).
    busy: bool,
    /// The target of a swap whose answer was not seen yet (running, or its
    /// storer was cancelled or failed): seeing it stored means this node
    /// stored it, not another.
    unanswered: Option<Seq>,
    turn: Arc<tokio::sync::Notify>,
    /// The newest confirmed shares and their doors, `(lo, hi, door)`, at
    /// most [`READ_BY`]: known here the moment a reader hands them out,
    /// while their `read` steps are still on their way to the store.
    read_by: std::collections::VecDeque<(Seq, Seq, String)>,
    /// This node's lease over the stored cursor (shared stores): how far,
    /// and when it was stored.
    lease: Option<(Seq, std::time::Instant)>,
    /// The turn to store the lease ([`Broker::relet`]).
    relet: Arc<tokio::sync::Mutex<()>>,
}

/// Confirmed shares each inbox remembers with their door.
const READ_BY: usize = 64;

struct Range {
    hi: Seq,
    /// Final once its claimer confirmed it (the cursor may be stored over
    /// it): when, as its `read` step's time. The store of a move may land
    /// much later (a full disk, a locked database, NATS away), and the
    /// step says when the reader had the messages, not when that landed.
    confirmed: Option<f64>,
    /// Its claimer's door: the `read` step stored with the cursor.
    door: Arc<str>,
    /// Its claim's `taken` (and identity).
    taken: Arc<AtomicU64>,
}

impl Cursor {
    /// Where readers start: the stored value and the claims that follow it
    /// without a gap.
    fn first_free(&self) -> Seq {
        let mut pos = self.stored;
        while let Some(r) = self.claims.get(&pos) {
            pos = r.hi;
        }
        pos
    }

    /// The `read` steps of the confirmed claims between the stored value
    /// and `through` (what a move there covers), less what another node
    /// took of them.
    fn read_steps(&self, key: &InboxKey, through: Seq) -> Vec<Step> {
        let now = model::now();
        self.claims
            .range(self.stored..through)
            .filter_map(|(&lo, r)| {
                let taken = r.taken.load(Ordering::Acquire);
                (r.hi > taken).then(|| Step {
                    key: key.clone(),
                    lo: lo.max(taken),
                    hi: r.hi,
                    state: model::State::Read,
                    ts: r.confirmed.unwrap_or(now),
                    door: r.door.to_string(),
                    note: None,
                })
            })
            .collect()
    }

    /// How far the confirmed claims let the stored cursor move.
    fn confirmed_through(&self) -> Seq {
        let mut pos = self.stored;
        while let Some(r) = self.claims.get(&pos).filter(|r| r.confirmed.is_some()) {
            pos = r.hi;
        }
        pos
    }

    /// The store holds `stored`: claims it covers are stored (by this
    /// node's own swap) or taken (by another node's).
    fn observe(&mut self, stored: Seq) {
        if stored < self.stored && stored != 0 {
            // Kept out (values only grow), but worth knowing: a NATS server
            // that came back answered before it caught up.
            tracing::warn!(
                stored,
                known = self.stored,
                "the store answered an older cursor than this node knows"
            );
        }
        self.observed = true;
        if stored <= self.stored {
            return;
        }
        let ours = self.unanswered == Some(stored);
        if !ours && !self.claims.is_empty() {
            tracing::debug!(stored, known = self.stored, unanswered = ?self.unanswered,
                "a move this node did not make covers claims: taken");
        }
        if ours {
            self.unanswered = None;
        }
        self.stored = stored;
        let covered: Vec<Seq> = self.claims.range(..stored).map(|(&lo, _)| lo).collect();
        for lo in covered {
            let r = self.claims.remove(&lo).expect("listed above");
            if !ours {
                r.taken.fetch_max(r.hi.min(stored), Ordering::AcqRel);
            }
            if r.hi > stored {
                self.claims.insert(stored, r);
            }
        }
    }

    /// A swap found `stored`, not the value this node expected: another
    /// node stored it (maybe the very value wanted: it read the same
    /// batch), and what it covers is that node's. False if the answer is
    /// older than what this node knows (a read served by a NATS leader
    /// that was just replaced, say): nothing learned, ask again.
    fn saw(&mut self, stored: Seq) -> bool {
        if stored == 0 && self.stored > 0 {
            tracing::debug!(
                known = self.stored,
                "the store answered no cursor: taken as forgotten"
            );
            // The inbox was forgotten and began again (its new messages
            // all come after anything this node knew of it).
            self.stored = 0;
            return true;
        }
        if stored < self.stored {
            return false;
        }
        self.observe(stored);
        true
    }

    /// Marks one claim's ranges final: a store may move over them.
    fn confirm(&mut self, ranges: &[(Seq, Seq)], taken: &Arc<AtomicU64>) {
        for &(lo, hi) in ranges {
            for (_, r) in self.claims.range_mut(lo..hi) {
                if Arc::ptr_eq(&r.taken, taken) {
                    r.confirmed.get_or_insert_with(model::now);
                }
            }
        }
    }

    /// Drops what is left of one claim's ranges (only its own: a range
    /// released earlier may have been claimed again by another reader).
    fn release(&mut self, ranges: &[(Seq, Seq)], taken: &Arc<AtomicU64>) {
        for &(lo, hi) in ranges {
            let mine: Vec<Seq> = self
                .claims
                .range(lo..hi)
                .filter(|(_, r)| Arc::ptr_eq(&r.taken, taken))
                .map(|(&lo, _)| lo)
                .collect();
            for lo in mine {
                self.claims.remove(&lo);
            }
        }
    }
}

/// Waits a moment before asking the store again after a stale answer;
/// `storage_busy` once it stayed stale for about a second.
async fn stale(attempts: &mut u32) -> Result<()> {
    *attempts += 1;
    if *attempts > 50 {
        return Err(Error::StorageBusy(
            "the store keeps answering with an older cursor; try again".into(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

/// Whether a confirm's reader is still there (see [`Claim::confirm_while`]).
type Present = Arc<dyn Fn() -> bool + Send + Sync>;

/// A claim's ranges and identity, for releasing it.
type Held = (Vec<(Seq, Seq)>, Arc<AtomicU64>);

/// The turn to store one inbox's cursor. Dropped while still holding a
/// claim to release (its store failed or was cancelled), it releases it
/// before anyone else can take the turn.
struct StoreTurn {
    shared: Arc<Shared>,
    key: InboxKey,
    release: Option<Held>,
    turn: Arc<tokio::sync::Notify>,
}

impl Drop for StoreTurn {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().unwrap();
        if let Some(c) = state.cursors.get_mut(&self.key) {
            c.busy = false;
            if let Some((ranges, taken)) = self.release.take() {
                tracing::debug!(agent = %self.key.agent, ?ranges, "store failed or cancelled: claim released");
                c.release(&ranges, &taken);
            }
        }
        // Also when the inbox was forgotten meanwhile: nobody waits forever.
        self.turn.notify_one();
    }
}
