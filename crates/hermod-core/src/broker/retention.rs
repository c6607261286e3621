//! Retention: the background task that prunes in bounded steps, moves
//! the views' pruned marks and expires names that hold nothing.

use super::*;

/// A name that never connected must be this old (seconds) to expire, so
/// a message on its way to it always finds it known.
const EXPIRE_AFTER: f64 = 3600.0;
/// Names expired per retention tick at most.
const EXPIRE_BATCH: usize = 256;

/// How often the retention task looks for work.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Expiry (a write even when there is nothing to expire) runs on every
/// this many ticks, so an idle bus does not sync once a second.
const EXPIRE_EVERY_TICKS: u64 = 60;

impl Broker {
    /// Applies `rules` from now on: a background task prunes in bounded
    /// steps (each one engine write, so sends interleave), and moves the
    /// views' marks so readers that start before them are told.
    pub fn start_retention(&self, rules: Retention) {
        if rules == Retention::default() {
            return;
        }
        // Weak: the task ends with the broker.
        let shared = Arc::downgrade(&self.shared);
        let engine = Arc::downgrade(&self.engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for ticks in 0u64.. {
                tick.tick().await;
                let (Some(shared), Some(engine)) = (shared.upgrade(), engine.upgrade()) else {
                    return;
                };
                if ticks % EXPIRE_EVERY_TICKS == 0 {
                    // Names that never connected and hold nothing (a mistyped
                    // `to` whose message expired) stop receiving broadcasts.
                    // Memory lets go of them as the feed reports it.
                    match engine
                        .expire_agents(model::now() - EXPIRE_AFTER, EXPIRE_BATCH)
                        .await
                    {
                        Ok(_) => {}
                        Err(Error::ShuttingDown) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "expiring names failed; retrying later")
                        }
                    }
                }
                loop {
                    match engine.prune(&rules, model::now()).await {
                        Ok(step) => {
                            // The marks that moved came through the feed.
                            shared.pruned.fetch_add(step.removed, Ordering::Relaxed);
                            if !step.more {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                        Err(Error::ShuttingDown) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "retention step failed; retrying later");
                            break;
                        }
                    }
                }
            }
        });
    }

    /// Reads told of a gap since start.
    pub fn gaps(&self) -> u64 {
        self.shared.gaps.load(Ordering::Relaxed)
    }

    /// Messages retention removed since start.
    pub fn pruned(&self) -> u64 {
        self.shared.pruned.load(Ordering::Relaxed)
    }
}
