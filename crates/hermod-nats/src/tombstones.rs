//! State-bucket entries that only say something ended, and how they leave.
//!
//! A forgotten agent, an ended subscription and a forgotten inbox's epoch
//! stay in the state bucket as entries of their own (an empty value, or
//! the seq the inbox starts again at), and every node replays the whole
//! bucket at start: kept forever, start time and memory would grow with
//! every name ever forgotten. So each node lists them as it applies them
//! ([`Known::tombstones`]) and retention purges them once they are
//! [`NatsConfig::tombstone_age`] old (an epoch also only once the log
//! below it is gone, since it is what keeps a lagging node from taking
//! those messages back into the inbox; the inbox's reset cursor leaves the
//! cursor bucket with it). A purge names the entry's revision,
//! so a newer value of the same key (the agent came back) is never hit.
//!
//! A node that was away from NATS for longer than
//! [`NatsConfig::resync_after`] may have missed a tombstone that is purged
//! since; when it is back it reads the whole bucket once and drops the
//! agents, subscriptions and identities the bucket no longer has.
//!
//! [`NatsConfig::tombstone_age`]: crate::NatsConfig::tombstone_age
//! [`NatsConfig::resync_after`]: crate::NatsConfig::resync_after

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};

use futures::StreamExt;
use hermod_core::engine::log_index::LogIndex;
use hermod_core::engine::{Change, PRUNE_BUDGET};
use hermod_core::error::Result;
use hermod_core::model::Seq;

use super::{apply_entry, storage, Inner, StoredCursor, STEP_CONCURRENCY};

/// One entry that says something ended.
#[derive(Debug, Clone)]
pub(crate) struct Tombstone {
    pub key: String,
    pub revision: u64,
    /// When the bucket stored it (unix seconds).
    pub created: f64,
    /// An epoch: the seq its inbox starts again after; it may go only
    /// once the log below it is gone.
    pub epoch: Option<Seq>,
}

/// What one node knows of the store: the log's index and the tombstones
/// waiting to be purged, under the one lock (`Inner::index`).
pub(crate) struct Known {
    pub index: LogIndex,
    pub tombstones: VecDeque<Tombstone>,
}

impl Known {
    pub fn new(index: LogIndex) -> Self {
        Self {
            index,
            tombstones: VecDeque::new(),
        }
    }
}

impl Deref for Known {
    type Target = LogIndex;
    fn deref(&self) -> &LogIndex {
        &self.index
    }
}

impl DerefMut for Known {
    fn deref_mut(&mut self) -> &mut LogIndex {
        &mut self.index
    }
}

impl Inner {
    /// Purges the tombstones that are due (at most [`PRUNE_BUDGET`]);
    /// `kept_from` is the oldest seq the index still holds. On an error the
    /// ones not purged stay listed for the next prune.
    pub(crate) async fn purge_tombstones(&self, now: f64, kept_from: Seq) -> Result<()> {
        let before = now - self.tombstone_age.as_secs_f64();
        // The list is in revision order, so in `created` order: only its
        // old front is looked at (under the index lock, once a second),
        // where an epoch whose log is not gone yet waits its turn.
        let due: Vec<Tombstone> = {
            let mut known = self.index.lock().unwrap();
            let list = &mut known.tombstones;
            let (mut due, mut i) = (Vec::new(), 0);
            while i < list.len() && list[i].created < before && due.len() < PRUNE_BUDGET {
                if list[i].epoch.is_none_or(|seq| seq < kept_from) {
                    due.extend(list.remove(i));
                } else {
                    i += 1;
                }
            }
            due
        };
        let prefix = format!("$KV.{}_state.", self.name);
        let failed: Vec<Tombstone> = futures::stream::iter(due)
            .map(|t| {
                let prefix = &prefix;
                async move {
                    // An epoch takes its inbox's pruned mark along (the
                    // one from before it: a later one is the new inbox's).
                    let floor = t.key.strip_prefix("e.").map(|inbox| format!("f.i.{inbox}"));
                    for key in std::iter::once(&t.key).chain(floor.as_ref()) {
                        let purged = self
                            .state_stream
                            .purge()
                            .filter(format!("{prefix}{key}"))
                            .sequence(t.revision + 1)
                            .await;
                        if let Err(e) = purged {
                            tracing::warn!("NATS: purging an ended entry: {e}");
                            return Some(t);
                        }
                    }
                    if let Some(inbox) = t.key.strip_prefix("e.") {
                        if let Err(e) = self.purge_reset_cursor(inbox).await {
                            tracing::warn!("NATS: purging a forgotten inbox's cursor: {e}");
                            return Some(t);
                        }
                    }
                    None
                }
            })
            .buffer_unordered(STEP_CONCURRENCY)
            .filter_map(|t| async move { t })
            .collect()
            .await;
        if failed.is_empty() {
            return Ok(());
        }
        let n = failed.len();
        self.index.lock().unwrap().tombstones.extend(failed);
        Err(storage("purging ended entries")(format!(
            "{n} left for the next prune"
        )))
    }

    /// A forgotten inbox's cursor leaves the cursor bucket with its epoch:
    /// the forget reset it to `0`, and a cursor never stored reads as `0`
    /// too. Only a value still at `0` goes, and the purge names its
    /// revision, so a cursor the inbox stored since (its agent came back
    /// and read) stays.
    async fn purge_reset_cursor(&self, k: &str) -> Result<()> {
        let Some((cursor, revision)) = self.stored_cursor(k).await? else {
            return Ok(());
        };
        if cursor != StoredCursor::default() {
            return Ok(());
        }
        self.cursors_stream
            .purge()
            .filter(format!("$KV.{}_cursors.{k}", self.name))
            .sequence(revision + 1)
            .await
            .map_err(storage("purging a reset cursor"))?;
        Ok(())
    }

    /// Reads the whole state bucket and drops what this node still knows
    /// but the bucket no longer has (its tombstone was purged while this
    /// node was away); the changes, for the feed.
    pub(crate) async fn resync_state(&self) -> Result<Vec<Change>> {
        let mut bucket = Known::new(LogIndex::default());
        self.replay_state(|entry| {
            apply_entry(&mut bucket, entry);
        })
        .await?;
        let mut known = self.index.lock().unwrap();
        let mut changes = Vec::new();
        known.agents.retain(|key, _| {
            let kept = bucket.agents.contains_key(key);
            if !kept {
                changes.push(Change::Forgotten(key.clone()));
            }
            kept
        });
        known.subscriptions.retain(|entry| {
            let kept = bucket.subscriptions.contains(entry);
            if !kept {
                let (key, pattern) = entry.clone();
                changes.push(Change::Subscription {
                    key,
                    pattern,
                    on: false,
                });
            }
            kept
        });
        known.identities.retain(|name, _| {
            let kept = bucket.identities.contains_key(name);
            if !kept {
                changes.push(Change::Identity {
                    name: name.clone(),
                    identity: None,
                });
            }
            kept
        });
        if !changes.is_empty() {
            tracing::warn!(
                "NATS: back after a long absence, {} entries this node still had are gone from the state bucket",
                changes.len()
            );
        }
        Ok(changes)
    }
}
