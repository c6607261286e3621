//! Cursors: acknowledgement, and the claim / confirm / release steps a
//! destructive reader (`/poll`, `/subscribe`) takes on the shared cursor.

use super::*;

impl Broker {
    /// The stored cursor of an inbox.
    pub async fn cursor(&self, key: &InboxKey) -> Result<Seq> {
        if let Some(&seq) = self.shared.state.lock().unwrap().cursors.get(key) {
            return Ok(seq);
        }
        self.engine.cursor(key).await
    }

    /// Moves an inbox cursor forward (never back) and returns where it was;
    /// resolves once the new cursor is durable.
    ///
    /// The move is a compare-and-set in memory, so readers sharing one
    /// cursor (SSE-interop `/poll` and `/subscribe`) can *claim* a batch:
    /// each delivers only the messages after the cursor it moved from, and
    /// no message goes out twice. If the store refuses the write, the claim
    /// is undone (unless a later claim moved past it) and the caller gets
    /// the error, so the messages stay unread rather than lost.
    pub async fn ack(&self, key: &InboxKey, seq: Seq) -> Result<Seq> {
        let previous = self.claim(key, seq).await?;
        if seq.min(self.committed().0) > previous {
            if let Err(e) = self.confirm(key, seq).await {
                self.release(key, previous, seq);
                return Err(e);
            }
        }
        Ok(previous)
    }

    /// The in-memory half of [`Broker::ack`]: moves the cursor (the claim
    /// every reader of the inbox sees at once) and returns where it was.
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

    /// Makes a claim up to `seq` durable.
    pub async fn confirm(&self, key: &InboxKey, seq: Seq) -> Result<()> {
        let seq = seq.min(self.committed().0);
        self.engine.set_cursor(key.clone(), seq).await
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
