//! Behaviour of the in-process bus: delivery order, envelopes, panic
//! isolation, async delivery, and subscription management.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use hermod_events::{Bus, Error, Event, Handle};
use serde_json::{json, Value};

fn obj(v: Value) -> Event {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// A minimal `tracing` subscriber counting events per level, to check what
/// the bus logs without pulling in `tracing-subscriber`.
mod log {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata};

    #[derive(Default)]
    pub struct Counts {
        pub errors: AtomicUsize,
        pub warns: AtomicUsize,
    }

    pub struct Counter {
        pub counts: Arc<Counts>,
        next_span: AtomicU64,
    }

    impl Counter {
        pub fn new() -> (Self, Arc<Counts>) {
            let counts = Arc::new(Counts::default());
            let me = Self {
                counts: Arc::clone(&counts),
                next_span: AtomicU64::new(1),
            };
            (me, counts)
        }
    }

    impl tracing::Subscriber for Counter {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            match *event.metadata().level() {
                Level::ERROR => self.counts.errors.fetch_add(1, Ordering::SeqCst),
                Level::WARN => self.counts.warns.fetch_add(1, Ordering::SeqCst),
                _ => 0,
            };
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

/// Runs `f` on another thread and fails (rather than hangs) if it does not
/// finish within a few seconds, e.g. because of a deadlock.
fn within_timeout(f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("did not finish: deadlock?");
}

#[test]
fn sync_subscribers_run_in_order_before_publish_returns() {
    let bus = Bus::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    for i in 0..10 {
        let seen = Arc::clone(&seen);
        bus.subscribe("a.*", move |_| seen.lock().unwrap().push(i))
            .unwrap();
    }
    assert_eq!(bus.publish("a.b", Event::new()), Ok(10));
    assert_eq!(*seen.lock().unwrap(), (0..10).collect::<Vec<_>>());
}

#[test]
fn only_matching_subscribers_are_reached() {
    let bus = Bus::new();
    let star = counter();
    let globstar = counter();
    let exact = counter();
    let (s, g, e) = (star.clone(), globstar.clone(), exact.clone());
    bus.subscribe("tui.*", move |_| {
        s.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    bus.subscribe("tui.**", move |_| {
        g.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    bus.subscribe("tui.tool.start", move |_| {
        e.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();

    assert_eq!(bus.publish("tui", Event::new()), Ok(1));
    assert_eq!(bus.publish("tui.tool", Event::new()), Ok(2));
    assert_eq!(bus.publish("tui.tool.start", Event::new()), Ok(2));
    assert_eq!(bus.publish("other", Event::new()), Ok(0));
    assert_eq!(star.load(Ordering::SeqCst), 1);
    assert_eq!(globstar.load(Ordering::SeqCst), 3);
    assert_eq!(exact.load(Ordering::SeqCst), 1);
    assert!(bus.has_subscribers("tui.x"));
    assert!(!bus.has_subscribers("other"));
}

#[test]
fn invalid_topics_and_patterns_are_errors() {
    let bus = Bus::new();
    let calls = counter();
    let c = calls.clone();
    bus.subscribe("**", move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();

    assert_eq!(bus.publish("", Event::new()), Err(Error::EmptyTopic));
    assert_eq!(
        bus.publish("a..b", Event::new()),
        Err(Error::EmptyTopicSegment("a..b".into()))
    );
    assert_eq!(
        bus.publish(".a", Event::new()),
        Err(Error::EmptyTopicSegment(".a".into()))
    );
    assert_eq!(bus.publish_value("", json!({})), Err(Error::EmptyTopic));
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    assert_eq!(bus.subscribe("", |_| {}), Err(Error::EmptyPattern));
    assert_eq!(
        bus.subscribe("a..b", |_| {}),
        Err(Error::EmptyPatternSegment("a..b".into()))
    );
    assert_eq!(
        bus.subscribe_async("", |_| async {}),
        Err(Error::EmptyPattern)
    );
    assert_eq!(
        bus.subscribe_async("a.", |_| async {}),
        Err(Error::EmptyPatternSegment("a.".into()))
    );
    assert_eq!(bus.len(), 1);
}

#[test]
fn publish_value_takes_objects_and_null() {
    let bus = Bus::new();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    bus.subscribe("x", move |ev| g.lock().unwrap().push(ev.clone()))
        .unwrap();
    assert_eq!(bus.publish_value("x", json!({"k": 1})), Ok(1));
    assert_eq!(bus.publish_value("x", Value::Null), Ok(1));
    for (bad, kind) in [
        (json!(1), "a number"),
        (json!("s"), "a string"),
        (json!([1]), "an array"),
        (json!(true), "a boolean"),
    ] {
        assert_eq!(
            bus.publish_value("x", bad),
            Err(Error::PayloadNotObject(kind))
        );
    }
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["k"], 1);
    assert_eq!(got[1].len(), 3); // type, ts, src only
}

#[test]
fn subscribers_get_the_stamped_envelope() {
    let bus = Bus::new();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    bus.subscribe("**", move |ev| g.lock().unwrap().push(ev.clone()))
        .unwrap();

    let before = hermod_events::envelope::now();
    bus.publish("tui.tool.start", obj(json!({"tool": "grep"})))
        .unwrap();
    let after = hermod_events::envelope::now();
    // A relayed event: the publisher already set all three.
    bus.publish(
        "relay.remote",
        obj(json!({"type": "tui.tool.end", "ts": 12.5, "src": "tui", "ok": true})),
    )
    .unwrap();
    // Only some set: the rest are stamped.
    bus.publish("relay.remote", obj(json!({"src": "far"})))
        .unwrap();

    let got = got.lock().unwrap();
    assert_eq!(got[0]["tool"], "grep");
    assert_eq!(got[0]["type"], "tui.tool.start");
    assert_eq!(got[0]["src"], "tui");
    let ts = got[0]["ts"].as_f64().unwrap();
    assert!(before <= ts && ts <= after, "{before} <= {ts} <= {after}");

    assert_eq!(
        Value::Object(got[1].clone()),
        json!({"type": "tui.tool.end", "ts": 12.5, "src": "tui", "ok": true})
    );

    assert_eq!(got[2]["src"], "far");
    assert_eq!(got[2]["type"], "relay.remote");
    assert!(got[2]["ts"].is_f64());

    // Publishing a received envelope again (a relay) changes nothing.
    let first = got[0].clone();
    drop(got);
    let bus2 = Bus::new();
    let again = Arc::new(Mutex::new(None));
    let a = Arc::clone(&again);
    bus2.subscribe("relay.**", move |ev| *a.lock().unwrap() = Some(ev.clone()))
        .unwrap();
    bus2.publish("relay.in", first.clone()).unwrap();
    assert_eq!(again.lock().unwrap().as_ref(), Some(&first));
}

#[test]
fn panicking_sync_subscriber_is_isolated_and_logged() {
    let (log, counts) = log::Counter::new();
    tracing::subscriber::with_default(log, || {
        let bus = Bus::new();
        let before = counter();
        let after = counter();
        let b = before.clone();
        bus.subscribe("a", move |_| {
            b.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        bus.subscribe("a", |_| panic!("boom")).unwrap();
        bus.subscribe("a", |_| std::panic::panic_any(42_u32))
            .unwrap();
        let a = after.clone();
        bus.subscribe("a", move |_| {
            a.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();

        // The publisher is not affected: it gets Ok, twice.
        assert_eq!(bus.publish("a", Event::new()), Ok(4));
        assert_eq!(bus.publish("a", Event::new()), Ok(4));
        assert_eq!(before.load(Ordering::SeqCst), 2);
        assert_eq!(after.load(Ordering::SeqCst), 2);
    });
    assert_eq!(counts.errors.load(Ordering::SeqCst), 4);
}

#[test]
fn double_subscribe_gives_two_handles_both_called() {
    let bus = Bus::new();
    let calls = counter();
    let c = calls.clone();
    let callback = move |_: &Event| {
        c.fetch_add(1, Ordering::SeqCst);
    };
    let h1 = bus.subscribe("x.*", callback.clone()).unwrap();
    let h2 = bus.subscribe("x.*", callback).unwrap();
    assert_ne!(h1, h2);
    assert_eq!(bus.len(), 2);
    assert_eq!(bus.publish("x.y", Event::new()), Ok(2));
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    assert!(bus.unsubscribe(h1));
    assert_eq!(bus.publish("x.y", Event::new()), Ok(1));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn unsubscribe_twice_is_true_then_false() {
    let bus = Bus::new();
    let calls = counter();
    let c = calls.clone();
    let h = bus
        .subscribe("a", move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    assert!(bus.unsubscribe(h));
    assert!(!bus.unsubscribe(h));
    assert!(bus.is_empty());
    assert_eq!(bus.publish("a", Event::new()), Ok(0));
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // A handle from another bus removes nothing here.
    let other = Bus::new();
    let foreign = other.subscribe("a", |_| {}).unwrap();
    bus.subscribe("a", |_| {}).unwrap();
    assert!(!bus.unsubscribe(foreign));
    assert_eq!(bus.len(), 1);
    assert!(other.unsubscribe(foreign));
}

#[test]
fn unsubscribe_from_inside_a_callback() {
    within_timeout(|| {
        let bus = Bus::new();
        let calls = counter();
        let me: Arc<OnceLock<Handle>> = Arc::new(OnceLock::new());
        let (b, c, m) = (bus.clone(), calls.clone(), Arc::clone(&me));
        let h = bus
            .subscribe("once", move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                assert!(b.unsubscribe(*m.get().unwrap()));
            })
            .unwrap();
        me.set(h).unwrap();

        assert_eq!(bus.publish("once", Event::new()), Ok(1));
        assert_eq!(bus.publish("once", Event::new()), Ok(0));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(bus.is_empty());
    });
}

#[test]
fn unsubscribing_a_later_subscriber_mid_delivery_skips_it() {
    within_timeout(|| {
        let bus = Bus::new();
        let victim_calls = counter();
        let victim: Arc<OnceLock<Handle>> = Arc::new(OnceLock::new());
        let (b, v) = (bus.clone(), Arc::clone(&victim));
        bus.subscribe("e", move |_| {
            b.unsubscribe(*v.get().unwrap());
        })
        .unwrap();
        let vc = victim_calls.clone();
        let h = bus
            .subscribe("e", move |_| {
                vc.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        victim.set(h).unwrap();

        assert_eq!(bus.publish("e", Event::new()), Ok(1));
        assert_eq!(victim_calls.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn callbacks_may_subscribe_and_publish_reentrantly() {
    within_timeout(|| {
        let bus = Bus::new();
        let inner_calls = counter();
        let (b, ic) = (bus.clone(), inner_calls.clone());
        bus.subscribe("outer", move |_| {
            let ic = ic.clone();
            b.subscribe("inner", move |_| {
                ic.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            assert_eq!(b.publish("inner", Event::new()), Ok(1));
        })
        .unwrap();
        assert_eq!(bus.publish("outer", Event::new()), Ok(1));
        assert_eq!(inner_calls.load(Ordering::SeqCst), 1);
        assert_eq!(bus.len(), 2);
    });
}

#[test]
fn clones_share_subscribers() {
    let bus = Bus::new();
    let clone = bus.clone();
    let calls = counter();
    let c = calls.clone();
    let h = clone
        .subscribe("a", move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    assert_eq!(bus.publish("a", Event::new()), Ok(1));
    assert!(bus.unsubscribe(h));
    assert!(clone.is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(format!("{bus:?}").contains("subscribers"));
}

#[test]
fn async_subscribers_are_skipped_without_a_runtime() {
    let (log, counts) = log::Counter::new();
    tracing::subscriber::with_default(log, || {
        let bus = Bus::new();
        let async_calls = counter();
        let sync_calls = counter();
        let ac = async_calls.clone();
        bus.subscribe_async("a", move |_| {
            let ac = ac.clone();
            async move {
                ac.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
        let sc = sync_calls.clone();
        bus.subscribe("a", move |_| {
            sc.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();

        // Only the sync subscriber is reached.
        assert_eq!(bus.publish("a", Event::new()), Ok(1));
        assert_eq!(sync_calls.load(Ordering::SeqCst), 1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(async_calls.load(Ordering::SeqCst), 0);
    });
    assert_eq!(counts.warns.load(Ordering::SeqCst), 1);
    assert_eq!(counts.errors.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn async_subscribers_run_on_the_runtime() {
    let bus = Bus::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    bus.subscribe_async("job.*", move |ev| {
        let tx = tx.clone();
        async move {
            // Running inside the runtime, as a task of its own.
            assert!(tokio::runtime::Handle::try_current().is_ok());
            tokio::task::yield_now().await;
            tx.send(ev).unwrap();
        }
    })
    .unwrap();

    assert_eq!(bus.publish_value("job.done", json!({"id": 1})), Ok(1));
    // Current-thread runtime: the task has not run yet, publish did not
    // wait for it.
    assert!(rx.try_recv().is_err());
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev["id"], 1);
    assert_eq!(ev["type"], "job.done");
    assert_eq!(ev["src"], "job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_async_subscribers_share_one_envelope() {
    let bus = Bus::new();
    let sync_seen: Arc<Mutex<Option<Event>>> = Arc::new(Mutex::new(None));
    let s = Arc::clone(&sync_seen);
    bus.subscribe("t", move |ev| *s.lock().unwrap() = Some(ev.clone()))
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..3 {
        let tx = tx.clone();
        bus.subscribe_async("t", move |ev| {
            let tx = tx.clone();
            async move {
                tx.send(ev).unwrap();
            }
        })
        .unwrap();
    }
    drop(tx);
    assert_eq!(bus.publish("t", Event::new()), Ok(4));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(rx.recv().await.unwrap());
    }
    // All async subscribers got the very same allocation.
    assert!(Arc::ptr_eq(&got[0], &got[1]) && Arc::ptr_eq(&got[1], &got[2]));
    assert_eq!(sync_seen.lock().unwrap().as_ref(), Some(&*got[0]));
}

#[tokio::test]
async fn panicking_async_subscriber_is_isolated_and_logged() {
    let (log, counts) = log::Counter::new();
    let _guard = tracing::subscriber::set_default(log);

    let bus = Bus::new();
    // Panics inside the future...
    bus.subscribe_async("a", |_| async { panic!("async boom") })
        .unwrap();
    // ...and while creating it.
    bus.subscribe_async("a", |_| -> std::future::Ready<()> { panic!("eager boom") })
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    bus.subscribe_async("a", move |ev| {
        let tx = tx.clone();
        async move {
            tx.send(ev["n"].clone()).unwrap();
        }
    })
    .unwrap();
    let sync_calls = counter();
    let sc = sync_calls.clone();
    bus.subscribe("a", move |_| {
        sc.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();

    for n in 0..3 {
        assert_eq!(bus.publish_value("a", json!({ "n": n })), Ok(4));
    }
    for n in 0..3 {
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, n);
    }
    // Let the panicking tasks finish (current-thread runtime, FIFO tasks).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(sync_calls.load(Ordering::SeqCst), 3);
    assert_eq!(counts.errors.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn async_subscriber_unsubscribed_before_its_task_runs_is_not_called() {
    let bus = Bus::new();
    let calls = counter();
    let c = calls.clone();
    let h = bus
        .subscribe_async("a", move |_| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
    assert_eq!(bus.publish("a", Event::new()), Ok(1));
    assert!(bus.unsubscribe(h));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn concurrent_publish_and_subscribe() {
    within_timeout(|| {
        let bus = Bus::new();
        let calls = counter();
        let publishers: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        bus.publish("load.test", Event::new()).unwrap();
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            let c = calls.clone();
            let h = bus
                .subscribe("load.*", move |_| {
                    c.fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
            assert!(bus.unsubscribe(h));
        }
        let c = calls.clone();
        bus.subscribe("load.**", move |_| {
            c.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        for p in publishers {
            p.join().unwrap();
        }
        assert_eq!(bus.len(), 1);
    });
}

#[test]
fn a_hundred_subscribers_well_under_a_millisecond() {
    let bus = Bus::new();
    let calls = counter();
    for _ in 0..100 {
        let c = calls.clone();
        bus.subscribe("bench.topic", move |ev| {
            c.fetch_add(ev.len(), Ordering::Relaxed);
        })
        .unwrap();
    }
    let payload = obj(json!({"k": "v"}));
    let rounds = 1_000;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        assert_eq!(bus.publish("bench.topic", payload.clone()), Ok(100));
    }
    let per_publish = start.elapsed() / rounds;
    // Generous even for an unoptimised build on a busy machine; the release
    // figure is a few microseconds (see examples/publish_bench.rs).
    assert!(per_publish < Duration::from_millis(1), "{per_publish:?}");
    assert_eq!(calls.load(Ordering::Relaxed), 100 * 4 * rounds as usize);
}
