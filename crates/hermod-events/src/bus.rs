//! The in-process bus: the subscriber list, and delivery of published events
//! to the subscribers whose pattern matches.
//!
//! The subscriber list is copy-on-write: `subscribe`/`unsubscribe` build a new
//! `Arc<[..]>` under a write lock, and `publish` only clones that `Arc` under a
//! read lock, then delivers with no lock held. Callbacks may therefore
//! subscribe, unsubscribe or publish on the same bus without deadlocking.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;

use crate::envelope::{envelope, Event};
use crate::pattern::{validate_topic, Pattern};
use crate::Error;

type SyncFn = dyn Fn(&Event) + Send + Sync;
type AsyncFn = dyn Fn(Arc<Event>) -> BoxFuture<'static, ()> + Send + Sync;

enum Callback {
    Sync(Box<SyncFn>),
    Async(Box<AsyncFn>),
}

struct Subscriber {
    id: u64,
    pattern: Pattern,
    /// Cleared by `unsubscribe`, so a delivery working from an older snapshot
    /// does not start a callback that has already been removed.
    active: AtomicBool,
    callback: Callback,
}

impl Subscriber {
    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

type Snapshot = Arc<[Arc<Subscriber>]>;

/// Identifies one subscription; pass it to [`Bus::unsubscribe`].
///
/// Handles are unique within the process (across all buses), so a handle
/// never removes a subscription it was not returned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(u64);

impl Handle {
    /// The subscription's numeric id (unique within the process).
    pub fn id(self) -> u64 {
        self.0
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An in-process topic pub/sub bus.
///
/// `Bus` is a cheap handle: clones share the same subscribers. See the
/// [crate docs](crate) for the delivery rules.
#[derive(Clone)]
pub struct Bus {
    subscribers: Arc<RwLock<Snapshot>>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("subscribers", &self.len())
            .finish()
    }
}

impl Bus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        let empty: Snapshot = Arc::new([]);
        Self {
            subscribers: Arc::new(RwLock::new(empty)),
        }
    }

    /// Subscribes a synchronous callback to every topic matching `pattern`
    /// (see [`pattern`](crate::pattern)). It runs on the publishing thread,
    /// before [`publish`](Self::publish) returns, in subscription order.
    ///
    /// Subscribing the same callback twice gives two subscriptions, each with
    /// its own handle, each called.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyPattern`] or [`Error::EmptyPatternSegment`] if `pattern`
    /// does not parse.
    pub fn subscribe<F>(&self, pattern: &str, callback: F) -> Result<Handle, Error>
    where
        F: Fn(&Event) + Send + Sync + 'static,
    {
        let pattern = Pattern::parse(pattern)?;
        Ok(self.add(pattern, Callback::Sync(Box::new(callback))))
    }

    /// Subscribes an asynchronous callback to every topic matching `pattern`.
    /// Each matching event is handed to it as an `Arc<Event>` in a task
    /// spawned on the tokio runtime the publisher is running in; with no
    /// runtime running, the event is not delivered to it (a `warn` is
    /// logged). No ordering is promised between tasks.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyPattern`] or [`Error::EmptyPatternSegment`] if `pattern`
    /// does not parse.
    pub fn subscribe_async<F, Fut>(&self, pattern: &str, callback: F) -> Result<Handle, Error>
    where
        F: Fn(Arc<Event>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let pattern = Pattern::parse(pattern)?;
        let callback: Box<AsyncFn> = Box::new(move |ev| callback(ev).boxed());
        Ok(self.add(pattern, Callback::Async(callback)))
    }

    fn add(&self, pattern: Pattern, callback: Callback) -> Handle {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Subscriber {
            id,
            pattern,
            active: AtomicBool::new(true),
            callback,
        });
        let mut subs = self.write();
        *subs = subs.iter().cloned().chain([sub]).collect();
        Handle(id)
    }

    /// Removes a subscription. Returns `true` if it was there, `false` if the
    /// handle was already unsubscribed (or belongs to another bus).
    ///
    /// Safe to call from inside a callback. Once it returns, the callback is
    /// not started again, not even for an event whose delivery is under way
    /// on this thread; a call already running on another thread finishes.
    pub fn unsubscribe(&self, handle: Handle) -> bool {
        let mut subs = self.write();
        let Some(pos) = subs.iter().position(|s| s.id == handle.0) else {
            return false;
        };
        subs[pos].active.store(false, Ordering::Release);
        *subs = subs
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != pos)
            .map(|(_, s)| Arc::clone(s))
            .collect();
        true
    }

    /// Publishes `payload` on `topic`. Each subscriber whose pattern matches
    /// receives the [`envelope`]: the payload with `type`, `ts` and `src`
    /// filled in where missing. The envelope is built once (and only if some
    /// subscriber matches) and shared by all of them.
    ///
    /// Synchronous subscribers run here, in subscription order, before this
    /// returns; asynchronous ones are spawned on the current tokio runtime
    /// (skipped, with a `warn`, if there is none). A subscriber that panics
    /// is logged with `error` and does not affect the others or the caller.
    ///
    /// Returns the number of subscribers reached: synchronous callbacks
    /// called (a panicking one counts: it received the event) plus
    /// asynchronous tasks spawned. Async subscribers skipped for want of a
    /// runtime are not counted.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyTopic`] or [`Error::EmptyTopicSegment`] if `topic` is
    /// not a valid topic; nothing is delivered then.
    pub fn publish(&self, topic: &str, payload: Event) -> Result<usize, Error> {
        validate_topic(topic)?;
        let subs = self.snapshot();
        let mut payload = Some(payload);
        let mut event: Option<Arc<Event>> = None;
        let mut runtime: Option<Option<tokio::runtime::Handle>> = None;
        let mut reached = 0;
        let mut skipped = 0;
        for sub in subs.iter() {
            if !sub.pattern.matches(topic) || !sub.is_active() {
                continue;
            }
            let event = event.get_or_insert_with(|| {
                Arc::new(envelope(topic, payload.take().unwrap_or_default()))
            });
            match &sub.callback {
                Callback::Sync(callback) => {
                    reached += 1;
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| callback(event))) {
                        tracing::error!(
                            topic,
                            subscription = sub.id,
                            pattern = sub.pattern.as_str(),
                            panic = panic_message(&*panic),
                            "event subscriber panicked"
                        );
                    }
                }
                Callback::Async(_) => {
                    let runtime =
                        runtime.get_or_insert_with(|| tokio::runtime::Handle::try_current().ok());
                    match runtime {
                        Some(runtime) => {
                            reached += 1;
                            runtime.spawn(run_async(Arc::clone(sub), Arc::clone(event)));
                        }
                        None => skipped += 1,
                    }
                }
            }
        }
        if skipped > 0 {
            tracing::warn!(
                topic,
                skipped,
                "no tokio runtime running: event not delivered to async subscribers"
            );
        }
        Ok(reached)
    }

    /// [`publish`](Self::publish) for a payload held as a JSON value: an
    /// object is published as is, `null` as an empty object.
    ///
    /// # Errors
    ///
    /// Those of [`publish`](Self::publish), and [`Error::PayloadNotObject`]
    /// for any other JSON value.
    pub fn publish_value(&self, topic: &str, payload: Value) -> Result<usize, Error> {
        validate_topic(topic)?;
        let payload = match payload {
            Value::Object(map) => map,
            Value::Null => Event::new(),
            Value::Bool(_) => return Err(Error::PayloadNotObject("a boolean")),
            Value::Number(_) => return Err(Error::PayloadNotObject("a number")),
            Value::String(_) => return Err(Error::PayloadNotObject("a string")),
            Value::Array(_) => return Err(Error::PayloadNotObject("an array")),
        };
        self.publish(topic, payload)
    }

    /// True if some subscriber's pattern matches `topic`: a publisher may
    /// skip building a costly payload when nobody listens.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.snapshot().iter().any(|s| s.pattern.matches(topic))
    }

    /// The number of subscriptions.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// True if there is no subscription.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Snapshot {
        let subs = self
            .subscribers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&subs)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        // No user code runs under this lock, so poisoning cannot leave the
        // list half-updated.
        self.subscribers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One async delivery, inside its own task; a panic is logged rather than
/// left to tokio's join handle, which nobody awaits.
async fn run_async(sub: Arc<Subscriber>, event: Arc<Event>) {
    if !sub.is_active() {
        return;
    }
    let Callback::Async(callback) = &sub.callback else {
        return;
    };
    let outcome = AssertUnwindSafe(async { callback(Arc::clone(&event)).await })
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        let topic = event.get(crate::envelope::TYPE).and_then(Value::as_str);
        tracing::error!(
            topic,
            subscription = sub.id,
            pattern = sub.pattern.as_str(),
            panic = panic_message(&*panic),
            "async event subscriber panicked"
        );
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}
