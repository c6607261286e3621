//! The engine conformance suite: what every [`Engine`] must do, as one
//! test that each engine runs against itself (`memory` and `sqlite` in
//! their own test modules; a distributed engine in its crate's tests).
//!
//! [`run`] takes a factory that opens the engine under test; the suite
//! follows its feed the way the broker does. For a `persistent` engine
//! it is called again on the same store after [`Engine::close`], and
//! everything acknowledged must be there.

use std::sync::{Arc, Mutex};

use super::{Change, Engine, Retention, Step, Swap, View};
use crate::auth::IdentitySpec;
use crate::model::{AgentName, Body, Channel, Guarded, InboxKey, Message, NewMessage, Seq};

async fn read_inbox(
    e: &Arc<dyn Engine>,
    key: &InboxKey,
    after: Seq,
    limit: usize,
) -> Vec<Arc<Message>> {
    e.read(&View::Inbox(key.clone()), after, limit)
        .await
        .unwrap()
        .messages
}

/// Records what the engine's feed reports.
#[derive(Default)]
pub struct Recorder {
    /// Every committed seq, in feed order.
    pub seqs: Mutex<Vec<Seq>>,
    /// Every change, in feed order.
    pub changes: Mutex<Vec<Change>>,
}

/// Follows `e`'s feed in a task, as the broker would.
pub fn follow(e: &Arc<dyn Engine>) -> Arc<Recorder> {
    let recorder = Arc::new(Recorder::default());
    let mut feed = e.feed().expect("the feed is there to take once");
    assert!(e.feed().is_none(), "the feed has one follower");
    let r = recorder.clone();
    tokio::spawn(async move {
        while let Some(commit) = feed.recv().await {
            r.seqs
                .lock()
                .unwrap()
                .extend(commit.messages.iter().map(|c| c.message.seq));
            r.changes.lock().unwrap().extend(commit.changes.clone());
            // Dropped here: only now are its writers answered.
        }
    });
    recorder
}

fn name(s: &str) -> AgentName {
    AgentName::parse(s).unwrap()
}

/// A direct message `n` to `to` (or a topic event when `topic` is set).
pub fn message(to: &str, n: u64, topic: Option<&str>) -> NewMessage {
    NewMessage {
        meta: None,
        id: format!("id-{n}"),
        channel: Channel::default(),
        from: name("sender"),
        to: topic.is_none().then(|| name(to)),
        topic: topic.map(str::to_owned),
        sent_ts: None,
        auth: Default::default(),
        body: Body::from_json(format!("{{\"n\":{n}}}")).unwrap(),
        recipients: vec![name(to)],
        guard: Guarded::Free,
    }
}

/// Runs the whole suite. `open` opens the engine under test (on the same
/// store each time, for a `persistent` engine).
pub async fn run<F>(open: F, persistent: bool)
where
    F: Fn() -> Arc<dyn Engine>,
{
    let e = open();
    let recorder = follow(&e);
    let bob = InboxKey::new(Channel::default(), name("bob"));
    let eve = InboxKey::new(Channel::default(), name("eve"));

    // Append: seq is the engine's, ascending from 1, ts strictly ascending;
    // batches keep submission order; the feed carried each commit before
    // its acknowledgement resolved.
    let mut pending = Vec::new();
    for n in 1..=50 {
        let mut batch = vec![message("bob", n, None)];
        if n % 10 == 0 {
            batch.push(message("eve", 1000 + n, Some("work.done")));
        }
        pending.push(e.submit(batch).await.unwrap());
    }
    let mut acked = Vec::new();
    for p in pending {
        let stored = p.await.unwrap().unwrap();
        for m in &stored {
            assert!(
                recorder.seqs.lock().unwrap().contains(&m.seq),
                "seq {} acknowledged before the feed carried it",
                m.seq
            );
        }
        acked.extend(stored);
    }
    assert_eq!(
        acked.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=55).collect::<Vec<_>>()
    );
    assert!(acked.windows(2).all(|w| w[0].ts < w[1].ts), "ts ascends");
    assert_eq!(*recorder.seqs.lock().unwrap(), (1..=55).collect::<Vec<_>>());
    assert_eq!(e.last().await.unwrap(), (55, acked[54].ts));

    // Reads: by seq, bounded, per inbox and per channel's topics.
    let inbox = read_inbox(&e, &bob, 0, 1000).await;
    assert_eq!(inbox.len(), 50);
    assert_eq!(inbox[0].body.as_str(), r#"{"n":1}"#);
    let page = read_inbox(&e, &bob, inbox[9].seq, 5).await;
    assert_eq!(page.len(), 5);
    assert_eq!(page[0].body.as_str(), r#"{"n":11}"#);
    assert_eq!(e.count_inbox(&bob, inbox[39].seq).await.unwrap(), 10);
    let topics = e
        .read(&View::Topics(Channel::default()), 0, 100)
        .await
        .unwrap()
        .messages;
    assert_eq!(topics.len(), 5);
    assert!(topics
        .iter()
        .all(|m| m.topic.as_deref() == Some("work.done")));
    let every = e.read(&View::AllTopics, 0, 100).await.unwrap().messages;
    assert_eq!(
        every.iter().map(|m| m.seq).collect::<Vec<_>>(),
        topics.iter().map(|m| m.seq).collect::<Vec<_>>(),
        "every channel's topic events, in log order"
    );
    let other = Channel::parse("other").unwrap();
    assert!(e
        .read(&View::Topics(other), 0, 100)
        .await
        .unwrap()
        .messages
        .is_empty());
    assert_eq!(read_inbox(&e, &eve, 0, 100).await.len(), 5);

    // `since=ts`: the last seq at or before a ts, 0 before the first.
    assert_eq!(e.seq_at_ts(acked[20].ts).await.unwrap(), acked[20].seq);
    assert_eq!(e.seq_at_ts(acked[0].ts - 1.0).await.unwrap(), 0);
    assert_eq!(e.seq_at_ts(f64::MAX).await.unwrap(), 55);

    // Cursors move by compare-and-set from the value stored.
    let swap = |key: &InboxKey, expected, new| {
        let (e, key) = (e.clone(), key.clone());
        async move {
            e.swap_cursor(key, expected, new, Vec::new())
                .await
                .map(|(swap, _)| swap)
        }
    };
    assert_eq!(e.cursor(&bob).await.unwrap(), 0);
    assert_eq!(swap(&bob, 0, 40).await.unwrap(), Swap::Moved);
    assert_eq!(swap(&bob, 0, 30).await.unwrap(), Swap::Lost(40));
    assert_eq!(e.cursor(&bob).await.unwrap(), 40);
    // A move stores the `read` steps it covers with it (and returns the
    // ones it added); a lost swap stores none.
    let fay = InboxKey::new(Channel::default(), name("fay"));
    let read_step = |lo: Seq, hi: Seq, door: &str| Step {
        key: fay.clone(),
        lo,
        hi,
        state: crate::model::State::Read,
        ts: 50.0,
        door: door.into(),
        note: None,
    };
    let lost = e
        .swap_cursor(fay.clone(), 5, 45, vec![read_step(5, 45, "sse")])
        .await
        .unwrap();
    assert_eq!(lost, (Swap::Lost(0), Vec::new()));
    assert!(e.steps(&fay, 45).await.unwrap().is_empty());
    let moved = e
        .swap_cursor(fay.clone(), 0, 45, vec![read_step(0, 45, "poll")])
        .await
        .unwrap();
    assert_eq!(moved, (Swap::Moved, vec![read_step(0, 45, "poll")]));
    assert_eq!(
        e.steps(&fay, 45).await.unwrap(),
        vec![read_step(0, 45, "poll")]
    );
    // Compare-and-set: of two claims from the same value, one wins.
    let carl = InboxKey::new(Channel::default(), name("carl"));
    assert_eq!(swap(&carl, 0, 10).await.unwrap(), Swap::Moved);
    assert_eq!(swap(&carl, 0, 12).await.unwrap(), Swap::Lost(10));
    // Losing to someone who stored the very value wanted is still losing:
    // two readers of one batch claim the same end, and only one may hand
    // it out.
    assert_eq!(swap(&carl, 0, 10).await.unwrap(), Swap::Lost(10));
    assert_eq!(swap(&carl, 10, 20).await.unwrap(), Swap::Moved);
    for (a, b) in [(30, 31), (40, 40)] {
        let from = e.cursor(&carl).await.unwrap();
        let (x, y) = tokio::join!(swap(&carl, from, a), swap(&carl, from, b));
        let won = match (x.unwrap(), y.unwrap()) {
            (Swap::Moved, Swap::Lost(v)) if v == a => a,
            (Swap::Lost(v), Swap::Moved) if v == b => b,
            other => panic!("exactly one of two swaps from {from} wins: {other:?}"),
        };
        assert_eq!(e.cursor(&carl).await.unwrap(), won);
    }

    // Registry, subscriptions and identities, each durable on resolve.
    e.remember_agent(bob.clone(), 1.0, false).await.unwrap();
    e.remember_agent(bob.clone(), 5.0, true).await.unwrap();
    e.remember_agent(bob.clone(), 3.0, false).await.unwrap();
    // Names that never connected and hold nothing expire; others stay.
    let typo = InboxKey::new(Channel::default(), name("typo"));
    e.remember_agent(typo.clone(), 1.0, false).await.unwrap();
    e.remember_agent(eve.clone(), 1.0, false).await.unwrap();
    assert!(
        e.expire_agents(0.5, 100).await.unwrap().is_empty(),
        "too young"
    );
    assert_eq!(
        e.expire_agents(10.0, 100).await.unwrap(),
        vec![typo.clone()]
    );
    assert!(!e.forget_agent(typo).await.unwrap(), "already gone");
    e.set_subscription(eve.clone(), "work.**".into(), true)
        .await
        .unwrap();
    e.set_subscription(eve.clone(), "tmp.*".into(), true)
        .await
        .unwrap();
    e.set_subscription(eve.clone(), "tmp.*".into(), false)
        .await
        .unwrap();
    let (alice, _token) = IdentitySpec {
        name: "alice".into(),
        ..IdentitySpec::default()
    }
    .issue()
    .unwrap();
    let (gone, _) = IdentitySpec {
        name: "gone".into(),
        ..IdentitySpec::default()
    }
    .issue()
    .unwrap();
    e.set_identity(name("alice"), Some(alice.clone()))
        .await
        .unwrap();
    e.set_identity(name("gone"), Some(gone)).await.unwrap();
    e.set_identity(name("gone"), None).await.unwrap();
    // Each change came through the feed before its write resolved.
    {
        let changes = recorder.changes.lock().unwrap();
        let has = |c: &Change| changes.contains(c);
        assert!(has(&Change::Agent {
            key: bob.clone(),
            seen: 5.0,
            connected: true
        }));
        assert!(has(&Change::Forgotten(InboxKey::new(
            Channel::default(),
            name("typo")
        ))));
        assert!(has(&Change::Subscription {
            key: eve.clone(),
            pattern: "tmp.*".into(),
            on: false
        }));
        assert!(matches!(
            changes.last(),
            Some(Change::Identity { name, identity: None }) if name.as_str() == "gone"
        ));
    }

    let after_cursor = inbox.iter().filter(|m| m.seq > 40).count();
    let (bob, eve, alice) = (&bob, &eve, &alice);
    let check = |e: Arc<dyn Engine>| async move {
        let agents = e.agents().await.unwrap();
        let b = agents.iter().find(|a| &a.key == bob).expect("bob is known");
        assert_eq!((b.first_seen, b.last_seen, b.connected), (1.0, 5.0, true));
        assert_eq!(agents.len(), 2, "bob and eve (who holds messages)");
        assert_eq!(
            e.subscriptions().await.unwrap(),
            vec![(eve.clone(), "work.**".to_owned())]
        );
        let ids = e.identities().await.unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(
            (ids[0].name.as_str(), &ids[0].token_hash),
            ("alice", &alice.token_hash)
        );
        assert_eq!(e.cursor(bob).await.unwrap(), 40);
        assert_eq!(read_inbox(&e, bob, 40, 100).await.len(), after_cursor);
        assert!(e.health().degraded().is_none());
        e
    };
    let e = check(e).await;
    if persistent {
        e.close().await;
        drop(e);
        let e = open();
        follow(&e);
        let e = check(e).await;
        // The log goes on after the newest stored seq and ts.
        let next = e
            .submit(vec![message("bob", 56, None)])
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next[0].seq, 56);
        assert!(next[0].ts > acked[54].ts);
        e.close().await;
    }
}

/// Runs prune steps until the engine says nothing more is due.
async fn prune_all(e: &Arc<dyn Engine>, rules: &Retention, now: f64) -> u64 {
    let mut removed = 0;
    for _ in 0..1000 {
        let step = e.prune(rules, now).await.unwrap();
        removed += step.removed;
        if !step.more {
            return removed;
        }
    }
    panic!("prune never finished");
}

/// Retention: the per-inbox count, age and topic-view rules; every view's
/// mark says how far it was pruned, in the same answer as its messages.
pub async fn retention<F>(open: F)
where
    F: Fn() -> Arc<dyn Engine>,
{
    let e = open();
    let recorder = follow(&e);
    let bob = View::Inbox(InboxKey::new(Channel::default(), name("bob")));
    let carol = View::Inbox(InboxKey::new(Channel::default(), name("carol")));
    let topics = View::Topics(Channel::default());
    let mut to_bob = Vec::new();
    for n in 0..700u64 {
        let batch = match n % 100 {
            0 => vec![message("carol", n, None)],
            1 => vec![message("nobody", n, Some("note.made"))],
            _ => vec![message("bob", n, None)],
        };
        let stored = e.submit(batch).await.unwrap().await.unwrap().unwrap();
        if n % 100 > 1 {
            to_bob.push(stored[0].seq);
        }
    }
    let now = crate::model::now();
    // 676 over the limit: more than one step's budget, so `more` must
    // keep the caller going until all of it is done.
    let keep = Retention {
        inbox_messages: Some(10),
        ..Retention::default()
    };
    prune_all(&e, &keep, now).await;
    let page = e.read(&bob, 0, 100).await.unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        to_bob[to_bob.len() - 10..],
        "bob keeps his newest 10"
    );
    assert_eq!(
        page.pruned,
        to_bob[to_bob.len() - 11],
        "the mark is the newest removed"
    );
    let carols = e.read(&carol, 0, 100).await.unwrap();
    assert_eq!(
        (carols.messages.len(), carols.pruned),
        (7, 0),
        "under the limit: untouched"
    );
    // Reading from past the mark is no gap and loses nothing.
    let later = e.read(&bob, page.pruned, 100).await.unwrap();
    assert_eq!(later.messages.len(), 10);
    assert_eq!(
        e.floors()
            .await
            .unwrap()
            .into_iter()
            .find(|(v, _)| v == &bob)
            .unwrap()
            .1,
        page.pruned
    );
    assert!(
        recorder
            .changes
            .lock()
            .unwrap()
            .contains(&Change::Floor(bob.clone(), page.pruned)),
        "the feed reports the mark"
    );

    // Topic events leave the topic view after their age.
    let t = e.read(&topics, 0, 100).await.unwrap();
    assert_eq!(t.messages.len(), 7);
    let newest_topic = t.messages.last().unwrap().seq;
    let topic_rules = Retention {
        topic_age: Some(60.0),
        ..Retention::default()
    };
    prune_all(&e, &topic_rules, now + 120.0).await;
    let t = e.read(&topics, 0, 100).await.unwrap();
    assert!(t.messages.is_empty());
    assert_eq!(t.pruned, newest_topic);
    let all = e.read(&View::AllTopics, 0, 100).await.unwrap();
    assert!(all.messages.is_empty());
    assert_eq!(all.pruned, newest_topic, "the firehose's mark moves too");

    // Age: everything older goes, from every view.
    let age = Retention {
        age: Some(60.0),
        ..Retention::default()
    };
    assert!(prune_all(&e, &age, now + 120.0).await > 0);
    let carols = e.read(&carol, 0, 100).await.unwrap();
    assert!(carols.messages.is_empty());
    assert!(carols.pruned > 0);
    let bobs = e.read(&bob, 0, 100).await.unwrap();
    assert!(bobs.messages.is_empty());
    assert_eq!(bobs.pruned, *to_bob.last().unwrap());
    // Forgetting a name takes its inbox, cursor and subscriptions along.
    let dave = InboxKey::new(Channel::default(), name("dave"));
    e.remember_agent(dave.clone(), 1.0, true).await.unwrap();
    let kept = e
        .submit(vec![message("dave", 5000, None)])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    e.swap_cursor(dave.clone(), 0, 1, Vec::new()).await.unwrap();
    e.set_subscription(dave.clone(), "x.*".into(), true)
        .await
        .unwrap();
    assert!(e.forget_agent(dave.clone()).await.unwrap());
    let gone = e.read(&View::Inbox(dave.clone()), 0, 10).await.unwrap();
    assert!(gone.messages.is_empty());
    assert_eq!(e.cursor(&dave).await.unwrap(), 0);
    assert!(e
        .subscriptions()
        .await
        .unwrap()
        .iter()
        .all(|(k, _)| k != &dave));
    assert!(e.agents().await.unwrap().iter().all(|a| a.key != dave));
    assert!(kept[0].seq > 700);
    // The log goes on: seq never goes back after a prune.
    let next = e
        .submit(vec![message("bob", 9999, None)])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next[0].seq, 702);
    e.close().await;
}

/// Delivery steps, the delivery fields of a message, lookups by id and
/// threads: what every engine keeps for `GET /v1/messages/{id}`.
pub async fn delivery<F>(open: F)
where
    F: Fn() -> Arc<dyn Engine>,
{
    use super::Step;
    use crate::model::{Meta, Priority, State};
    let e = open();
    let recorder = follow(&e);
    let bob = InboxKey::new(Channel::default(), name("bob"));
    let mut batch: Vec<NewMessage> = (1..=30).map(|n| message("bob", n, None)).collect();
    batch[0].id = "root".into();
    let meta = Meta {
        reply_to: Some("root".into()),
        thread: Some("root".into()),
        priority: Priority::Low,
        expires: Some(4e9),
        bounce_after: Some(2.0),
        notify: vec![State::Read, State::Bounced],
    };
    batch[1].id = "r1".into();
    batch[1].meta = Some(Box::new(meta.clone()));
    batch[2].id = "r1".into(); // ids are the sender's: they may repeat
    batch[3].meta = Some(Box::new(Meta {
        thread: Some("root".into()),
        ..Meta::default()
    }));
    let stored = e.submit(batch).await.unwrap().await.unwrap().unwrap();
    let seq = |i: usize| stored[i].seq;

    // The fields come back as sent; ids and threads are found.
    let page = read_inbox(&e, &bob, 0, 100).await;
    assert_eq!(page[1].meta.as_deref(), Some(&meta));
    assert!(page[0].meta.is_none());
    let found = e.find("r1", 10).await.unwrap();
    assert_eq!(
        found.iter().map(|c| c.message.seq).collect::<Vec<_>>(),
        vec![seq(1), seq(2)]
    );
    assert_eq!(found[0].recipients, vec![name("bob")]);
    assert!(e.find("nobody", 10).await.unwrap().is_empty());
    let thread = e.thread("root", 100).await.unwrap();
    assert_eq!(
        thread.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![seq(0), seq(1), seq(3)],
        "the root, then every message of its thread, in order"
    );
    assert!(e.thread("nothing", 100).await.unwrap().is_empty());

    // Steps: runs over an inbox; the first of a kind stays, is the only
    // one reported as added, and came through the feed.
    let step = |lo: Seq, hi: Seq, state, door: &str| Step {
        key: bob.clone(),
        lo,
        hi,
        state,
        ts: 100.0 + hi as f64,
        door: door.into(),
        note: None,
    };
    let read = step(0, seq(9), State::Read, "unix");
    let delivered = step(seq(9), seq(19), State::Delivered, "sse");
    let added = e
        .record(vec![read.clone(), delivered.clone()])
        .await
        .unwrap();
    assert_eq!(added, vec![read.clone(), delivered.clone()]);
    let again = Step {
        ts: 999.0,
        door: "ws".into(),
        ..read.clone()
    };
    assert!(
        e.record(vec![again]).await.unwrap().is_empty(),
        "a repeat is not new"
    );
    let bounced = Step {
        note: Some("never connected".into()),
        ..step(seq(4) - 1, seq(4), State::Bounced, "bus")
    };
    e.record(vec![bounced.clone()]).await.unwrap();
    let mut at = e.steps(&bob, seq(4)).await.unwrap();
    at.sort_by_key(|s| s.state);
    assert_eq!(at, vec![read.clone(), bounced]);
    assert_eq!(e.steps(&bob, seq(15)).await.unwrap(), vec![delivered]);
    assert!(e.steps(&bob, seq(25)).await.unwrap().is_empty());
    let carl = InboxKey::new(Channel::default(), name("carl"));
    assert!(e.steps(&carl, seq(4)).await.unwrap().is_empty());
    assert!(recorder
        .changes
        .lock()
        .unwrap()
        .contains(&Change::Step(read)));
    e.close().await;
}

/// The loop guard's holds: kept in no inbox and by every retention rule
/// until released, across a reopen (for a `persistent` engine); a release
/// ends its hold in its own commit and lands once, however many are made.
pub async fn holds<F>(open: F, persistent: bool)
where
    F: Fn() -> Arc<dyn Engine>,
{
    let e = open();
    follow(&e);
    let bob = InboxKey::new(Channel::default(), name("bob"));
    let base = e.last().await.unwrap().0;
    let mut batch = Vec::new();
    for n in 1..=3 {
        let mut m = message("bob", n, None);
        m.recipients.clear();
        m.guard = Guarded::Held;
        batch.push(m);
    }
    batch.push(message("bob", 4, None));
    let stored = e.submit(batch).await.unwrap().await.unwrap().unwrap();
    let held: Vec<Seq> = stored[..3].iter().map(|m| m.seq).collect();
    assert_eq!(
        read_inbox(&e, &bob, base, 100).await.len(),
        1,
        "holds are in no inbox"
    );
    let found = |e: Arc<dyn Engine>| async move {
        e.held(0, 100)
            .await
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(found(e.clone()).await, held);
    assert_eq!(e.held(held[0], 1).await.unwrap()[0].seq, held[1], "paged");
    let c = e.find("id-2", 10).await.unwrap();
    assert_eq!((c.len(), c[0].guard), (1, Guarded::Held));

    // Every rule prunes everything else: the holds stay.
    let rules = Retention {
        age: Some(0.0),
        inbox_messages: Some(0),
        bytes: Some(0),
        topic_age: Some(0.0),
    };
    prune_all(&e, &rules, crate::model::now() + 10.0).await;
    assert_eq!(found(e.clone()).await, held);
    assert!(read_inbox(&e, &bob, 0, 100).await.is_empty());

    let e = if persistent {
        e.close().await;
        let e = open();
        follow(&e);
        assert_eq!(found(e.clone()).await, held, "holds survive a restart");
        e
    } else {
        e
    };

    // A release lands in the inbox and ends the hold; a second release of
    // the same hold (another node's, or a retry) lands nowhere.
    let release = |seq: Seq, n: u64| {
        let mut m = message("bob", n, None);
        m.guard = Guarded::Releases(seq);
        m
    };
    let first = e
        .submit(vec![release(held[0], 1), release(held[1], 2)])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found(e.clone()).await, vec![held[2]]);
    assert!(
        first[0].seq > base + 4,
        "no seq is handed out twice, even after a prune"
    );
    // (Another body, so no engine can take it for a retry of the first.)
    let again = e
        .submit(vec![release(held[0], 99)])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    let inbox: Vec<Seq> = read_inbox(&e, &bob, 0, 100)
        .await
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(
        inbox,
        vec![first[0].seq, first[1].seq],
        "released once, in order"
    );
    assert!(again[0].seq > first[1].seq);
    e.close().await;
}
