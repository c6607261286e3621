//! The engine conformance suite on a real 3-node JetStream cluster (R3).

use std::sync::Arc;

use hermod_core::engine::{conformance, Engine};
use hermod_nats::testing::Cluster;
use hermod_nats::{NatsConfig, NatsEngine};

/// Opens the engine from a synchronous factory, as the suite wants it.
fn opener(cluster: &Cluster, stream: &str, replicas: usize) -> impl Fn() -> Arc<dyn Engine> {
    let mut config = NatsConfig::new(cluster.urls());
    config.stream = stream.into();
    config.replicas = replicas;
    move || {
        let config = config.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                Arc::new(
                    NatsEngine::open(config)
                        .await
                        .expect("open the NATS engine"),
                ) as Arc<dyn Engine>
            })
        })
    }
}

/// How many messages `stream` holds, asked of the server directly.
async fn stream_messages(cluster: &Cluster, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_three_node_cluster() {
    let cluster = Cluster::start(3);
    conformance::run(opener(&cluster, "HERMOD", 3), true).await;
    conformance::retention(opener(&cluster, "RETENTION", 3)).await;
    conformance::delivery(opener(&cluster, "DELIVERY", 3)).await;
    conformance::holds(opener(&cluster, "HOLDS", 3), true).await;
}

/// Forgetting an agent takes what only its inbox held out of the stream
/// itself (not just out of every node's index), so the log shrinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_an_agent_removes_its_messages_from_the_stream() {
    use hermod_core::model::{AgentName, Channel, InboxKey};
    let cluster = Cluster::start(1);
    let e = opener(&cluster, "FORGET", 1)();
    conformance::follow(&e);
    let mut batch: Vec<_> = (0..5)
        .map(|n| conformance::message("dave", n, None))
        .collect();
    batch.push(conformance::message("bob", 9, None));
    e.submit(batch).await.unwrap().await.unwrap().unwrap();
    let dave = InboxKey::new(Channel::default(), AgentName::parse("dave").unwrap());
    e.remember_agent(dave.clone(), 1.0, true).await.unwrap();
    let messages = || stream_messages(&cluster, "FORGET");
    assert_eq!(messages().await, 6);
    assert!(e.forget_agent(dave).await.unwrap());
    assert_eq!(
        messages().await,
        1,
        "only bob's message is left in the stream"
    );
    e.close().await;
}

/// A batch with a message over the server's `max_payload` is refused
/// whole, with the limit in the error, and nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_servers_payload_limit_is_refused_whole() {
    use hermod_core::model::Body;
    let cluster = Cluster::start(1);
    let e = opener(&cluster, "BIG", 1)();
    conformance::follow(&e);
    let mut big = conformance::message("bob", 2, None);
    big.body = Body::from_json(format!("{{\"pad\":\"{}\"}}", "x".repeat(2 << 20))).unwrap();
    let refused = e
        .submit(vec![conformance::message("bob", 1, None), big])
        .await;
    match refused {
        Err(hermod_core::Error::TooLarge { limit, .. }) => assert_eq!(limit, 1 << 20),
        Err(other) => panic!("expected too_large, got {other}"),
        Ok(_) => panic!("a 2 MiB message was accepted by a 1 MiB server"),
    }
    assert_eq!(
        e.last().await.unwrap().0,
        0,
        "nothing of the batch was stored"
    );
    let ok = e
        .submit(vec![conformance::message("bob", 3, None)])
        .await
        .unwrap();
    assert_eq!(ok.await.unwrap().unwrap()[0].seq, 1);
}

/// A message no view holds (a broadcast nobody was there for) leaves the
/// stream at the next prune, so it never outlives every rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nobody_holds_leaves_the_stream_at_the_next_prune() {
    let cluster = Cluster::start(1);
    let e = opener(&cluster, "UNHELD", 1)();
    conformance::follow(&e);
    let mut nobody = conformance::message("bob", 1, None);
    nobody.to = None;
    nobody.recipients.clear();
    let kept = conformance::message("bob", 2, None);
    e.submit(vec![nobody, kept])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    let messages = || stream_messages(&cluster, "UNHELD");
    assert_eq!(messages().await, 2);
    let step = e
        .prune(&Default::default(), hermod_core::model::now())
        .await
        .unwrap();
    assert_eq!(
        (step.removed, messages().await),
        (1, 1),
        "only bob's message is left"
    );
}

/// A subscription or registration one node acknowledged is there for
/// another node's routing once that node has synced its state, however
/// soon after: each check follows the write at once, many times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_syncs_sees_what_another_node_just_wrote() {
    use hermod_core::model::{AgentName, Channel, InboxKey};
    let cluster = Cluster::start(1);
    let open = opener(&cluster, "SYNC", 1);
    let (a, b) = (open(), open());
    conformance::follow(&a);
    conformance::follow(&b);
    for n in 0..40 {
        let key = InboxKey::new(
            Channel::default(),
            AgentName::parse(format!("agent-{n}")).unwrap(),
        );
        let pattern = format!("work.{n}.**");
        a.set_subscription(key.clone(), pattern.clone(), true)
            .await
            .unwrap();
        b.sync_state().await.unwrap();
        assert!(
            b.subscriptions()
                .await
                .unwrap()
                .contains(&(key.clone(), pattern)),
            "round {n}: node b routes without the subscription node a acknowledged"
        );
        let other = InboxKey::new(
            Channel::default(),
            AgentName::parse(format!("newcomer-{n}")).unwrap(),
        );
        a.remember_agent(other.clone(), 1.0, true).await.unwrap();
        b.sync_state().await.unwrap();
        assert!(
            b.agents().await.unwrap().iter().any(|k| k.key == other),
            "round {n}: node b does not know the agent node a registered"
        );
    }
    a.close().await;
    b.close().await;
}

/// A message sent again (the same id, sender and target: a client's retry
/// after an unknown outcome, or this node's own) is stored once, and the
/// retry is answered with the first copy; a loop-guard release of it is a
/// message of its own. Each publish used to get a fresh `Nats-Msg-Id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_again_is_stored_once() {
    use hermod_core::model::Guarded;
    let cluster = Cluster::start(1);
    let e = opener(&cluster, "AGAIN", 1)();
    conformance::follow(&e);
    let send = |m| {
        let e = e.clone();
        async move { e.submit(vec![m]).await.unwrap().await.unwrap().unwrap()[0].clone() }
    };
    let mut held = conformance::message("bob", 1, None);
    held.recipients.clear();
    held.guard = Guarded::Held;
    let first = send(held.clone()).await;
    let again = send(held).await;
    assert_eq!(
        again.seq, first.seq,
        "the retry is answered with the first copy"
    );
    assert_eq!(stream_messages(&cluster, "AGAIN").await, 1);
    // Same id, another target or body: another message.
    let other = send(conformance::message("carl", 1, None)).await;
    assert!(other.seq > first.seq);
    let mut body = conformance::message("carl", 1, None);
    body.body = hermod_core::model::Body::from_json(r#"{"n":"other"}"#.into()).unwrap();
    let other = send(body).await;
    let mut release = conformance::message("bob", 1, None);
    release.guard = Guarded::Releases(first.seq);
    let released = send(release.clone()).await;
    assert!(
        released.seq > other.seq,
        "a release is not its hold's duplicate"
    );
    assert_eq!(send(release).await.seq, released.seq);
    assert_eq!(stream_messages(&cluster, "AGAIN").await, 4);
    e.close().await;
}

/// Issue 21: a cursor move and its `read` steps went to two buckets, the
/// steps right after the move, so a node killed between them left
/// messages read by nobody on record (the history checker cannot tell
/// that from a loss). Now the steps ride in the cursor's value: a lookup
/// finds them there, and the next move (any node's) records them first.
/// Here the value is written as a node killed right after its move left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_steps_a_killed_node_left_in_the_cursor_value_are_found_and_recorded() {
    use hermod_core::engine::{Step, Swap};
    use hermod_core::model::{AgentName, Channel, InboxKey, State};
    let cluster = Cluster::start(1);
    let e = opener(&cluster, "STEPS", 1)();
    conformance::follow(&e);
    let batch: Vec<_> = (0..10)
        .map(|n| conformance::message("dave", n, None))
        .collect();
    e.submit(batch).await.unwrap().await.unwrap().unwrap();
    let dave = InboxKey::new(Channel::default(), AgentName::parse("dave").unwrap());
    let read = |lo, hi, door: &str| Step {
        key: dave.clone(),
        lo,
        hi,
        state: State::Read,
        ts: 1.0,
        door: door.into(),
        note: None,
    };
    let (swap, _) = e
        .swap_cursor(dave.clone(), 0, 3, vec![read(0, 3, "poll")])
        .await
        .unwrap();
    assert_eq!(swap, Swap::Moved);
    // The move 3 → 6 by a node killed before it recorded its steps.
    let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
    let cursors = js.get_key_value("STEPS_cursors").await.unwrap();
    let keys: Vec<String> = futures::TryStreamExt::try_collect(cursors.keys().await.unwrap())
        .await
        .unwrap();
    // (The other key is the node's catch-up write.)
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|k| !k.starts_with("barrier."))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    cursors.put(&keys[0], "6 R3,6,1,sse".into()).await.unwrap();
    let found = e.steps(&dave, 5).await.unwrap();
    assert_eq!(
        found,
        vec![read(3, 6, "sse")],
        "found in the cursor's value"
    );
    // The next move records them before it stores its own.
    let (swap, added) = e
        .swap_cursor(dave.clone(), 6, 8, vec![read(6, 8, "poll")])
        .await
        .unwrap();
    assert_eq!(swap, Swap::Moved);
    assert_eq!(
        added,
        vec![read(3, 6, "sse"), read(6, 8, "poll")],
        "both told"
    );
    cursors.put(&keys[0], "8".into()).await.unwrap();
    assert_eq!(
        e.steps(&dave, 5).await.unwrap(),
        vec![read(3, 6, "sse")],
        "on record"
    );
}

/// Opens the engine on `urls` with tombstones purged at once and a
/// resync after one second away.
async fn open_quick(urls: Vec<String>, stream: &str) -> Arc<dyn Engine> {
    let mut config = NatsConfig::new(urls);
    config.only_listed = true;
    config.stream = stream.into();
    config.replicas = 3;
    config.tombstone_age = std::time::Duration::ZERO;
    config.resync_after = std::time::Duration::from_secs(1);
    Arc::new(
        NatsEngine::open(config)
            .await
            .expect("open the NATS engine"),
    )
}

fn inbox(name: &str) -> hermod_core::model::InboxKey {
    use hermod_core::model::{AgentName, Channel, InboxKey};
    InboxKey::new(Channel::default(), AgentName::parse(name).unwrap())
}

/// A forgotten agent's entries (its registry tombstone, its ended
/// subscription, its epoch and pruned mark, and its cursor reset to `0`)
/// leave the state and cursor buckets at the next prune, so a node's start
/// does not replay every name ever forgotten; an agent that came back
/// after its tombstone keeps its entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_entries_leave_the_state_bucket() {
    use hermod_core::engine::Retention;
    let cluster = Cluster::start(3);
    let e = open_quick(cluster.urls(), "ENDED").await;
    conformance::follow(&e);
    for n in 0..20 {
        let key = inbox(&format!("gone-{n}"));
        e.remember_agent(key.clone(), 1.0, true).await.unwrap();
        e.set_subscription(key.clone(), "work.**".into(), true)
            .await
            .unwrap();
        e.set_subscription(key.clone(), "work.**".into(), false)
            .await
            .unwrap();
        assert!(e.forget_agent(key).await.unwrap());
    }
    let back = inbox("back");
    e.remember_agent(back.clone(), 1.0, true).await.unwrap();
    assert!(e.forget_agent(back.clone()).await.unwrap());
    e.remember_agent(back.clone(), 2.0, true).await.unwrap();
    // Back, it reads: its cursor moves on from the forget's `0`.
    let (swap, _) = e.swap_cursor(back.clone(), 0, 1, vec![]).await.unwrap();
    assert_eq!(swap, hermod_core::engine::Swap::Moved);
    let before = stream_messages(&cluster, "KV_ENDED_state").await;
    let cursors_before = stream_messages(&cluster, "KV_ENDED_cursors").await;
    assert_eq!(
        cursors_before, 22,
        "20 forgotten cursors reset to 0, back's and this node's barrier"
    );
    assert!(
        before >= 61,
        "20 × (agent, subscription, epoch) + back: {before}"
    );
    e.prune(&Retention::default(), hermod_core::model::now())
        .await
        .unwrap();
    let after = stream_messages(&cluster, "KV_ENDED_state").await;
    // `back`'s registry entry is all that is left (its epoch went too).
    assert_eq!(after, 1, "state entries after the prune (before: {before})");
    // The reset cursors went with their epochs; back's moved one stays.
    let cursors = stream_messages(&cluster, "KV_ENDED_cursors").await;
    assert_eq!(cursors, 2, "cursor entries after the prune");
    assert_eq!(e.cursor(&back).await.unwrap(), 1);
    e.close().await;
    let e = open_quick(cluster.urls(), "ENDED").await;
    conformance::follow(&e);
    let agents: Vec<_> = e
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.key)
        .collect();
    assert_eq!(
        agents,
        vec![back],
        "a node started afresh knows the agent that came back"
    );
    e.close().await;
}

/// A node cut off from NATS while an agent was forgotten and its tombstone
/// purged reads the whole state bucket again when it is back: it forgets
/// the agent too (it could not learn it from the tombstone, gone by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_a_long_absence_drops_what_was_forgotten_meanwhile() {
    use hermod_core::engine::Retention;
    let mut cluster = Cluster::start(3);
    let a = open_quick(vec![cluster.url(0), cluster.url(1)], "ABSENT").await;
    let b = open_quick(vec![cluster.url(2)], "ABSENT").await;
    conformance::follow(&a);
    conformance::follow(&b);
    let gone = inbox("gone");
    a.remember_agent(gone.clone(), 1.0, true).await.unwrap();
    b.sync_state().await.unwrap();
    assert!(b.agents().await.unwrap().iter().any(|k| k.key == gone));
    cluster.kill(2);
    // The streams may have had their leader there: a few seconds of
    // election, answered as errors, before the forget goes through.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let forgot = a.forget_agent(gone.clone()).await;
        let pruned = match forgot {
            Ok(_) => {
                a.prune(&Retention::default(), hermod_core::model::now())
                    .await
            }
            Err(e) => Err(e),
        };
        match pruned {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("while the cluster elects: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("forget and prune with a server down: {e}"),
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    cluster.restart(2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while b.agents().await.unwrap().iter().any(|k| k.key == gone) {
        assert!(
            std::time::Instant::now() < deadline,
            "node b still knows the agent forgotten while it was away"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    a.close().await;
    b.close().await;
}

/// A message the log no longer answers while no retention or forget mark
/// accounts for it is not read as a gap: a destructive reader told of a
/// gap claims over it, and then it is read by nobody (the history
/// checker's NATS run, while servers were killed). The read answers
/// `storage_busy`; retention's own removals (mark first) still read as a
/// gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_log_lost_without_a_mark_is_not_a_gap() {
    use hermod_core::engine::View;
    let cluster = Cluster::start(1);
    let mut config = NatsConfig::new(cluster.urls());
    config.stream = "UNMARKED".into();
    config.replicas = 1;
    // No cache: every body comes from the log.
    config.cache_bytes = 0;
    let e: Arc<dyn Engine> = Arc::new(NatsEngine::open(config).await.unwrap());
    conformance::follow(&e);
    let batch = (1..=3)
        .map(|n| conformance::message("bob", n, None))
        .collect();
    let durable = e.submit(batch).await.unwrap().await.unwrap().unwrap();
    let seqs: Vec<_> = durable.iter().map(|m| m.seq).collect();
    let view = View::Inbox(inbox("bob"));
    let page = e.read(&view, 0, 10).await.unwrap();
    assert_eq!(page.messages.len(), 3);
    // Behind hermod's back: the middle one goes, and no mark says so.
    let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
    let stream = js.get_stream("UNMARKED").await.unwrap();
    assert!(stream.delete_message(seqs[1]).await.unwrap());
    let err = e.read(&view, 0, 10).await.unwrap_err();
    assert_eq!(err.code(), "storage_busy", "{err}");
    // Past it, the read is whole.
    let page = e.read(&view, seqs[1], 10).await.unwrap();
    assert_eq!((page.messages.len(), page.pruned), (1, 0));
}

/// A broadcast to more names than one stream entry holds (3,000 names,
/// 78 KB, against a server's `max_payload` of 64 KiB; 50,000 names pass
/// the default 1 MiB the same way) is stored: its
/// recipient list goes in parts logged before it, which this node, a
/// node that starts later and `find` put together again, which retention
/// keeps while the message stays and removes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_to_more_names_than_one_entry_holds_is_stored_in_parts() {
    use hermod_core::engine::{Retention, View};
    use hermod_core::model::AgentName;
    let cluster = Cluster::start_with(1, "max_payload: 65536");
    let open = opener(&cluster, "CROWD", 1);
    let e = open();
    conformance::follow(&e);
    let names: Vec<AgentName> = (0..3_000)
        .map(|n| AgentName::parse(format!("recipient-number-{n:06}")).unwrap())
        .collect();
    let mut crowd = conformance::message("bob", 2, None);
    crowd.to = None;
    crowd.recipients = names.clone();
    let batch = vec![
        conformance::message("bob", 1, None),
        crowd,
        conformance::message("bob", 3, None),
    ];
    let stored = e.submit(batch).await.unwrap().await.unwrap().unwrap();
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        [1, 4, 5],
        "two parts (seqs 2 and 3) before the broadcast"
    );
    let messages = || stream_messages(&cluster, "CROWD");
    assert_eq!(messages().await, 5);

    let holds = |e: Arc<dyn Engine>, name: &'static str| async move {
        let page = e.read(&View::Inbox(inbox(name)), 0, 10).await.unwrap();
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>()
    };
    for name in ["recipient-number-000000", "recipient-number-002999"] {
        assert_eq!(
            holds(e.clone(), name).await,
            [4],
            "{name} has the broadcast"
        );
    }
    let found = e.find("id-2", 10).await.unwrap();
    assert_eq!(found[0].recipients, names, "the whole list, in order");

    // Bob keeps his newest message; the broadcast and its parts stay.
    let keep_one = Retention {
        inbox_messages: Some(1),
        ..Default::default()
    };
    while e
        .prune(&keep_one, hermod_core::model::now())
        .await
        .unwrap()
        .more
    {}
    assert_eq!(
        messages().await,
        4,
        "bob's first message went, the parts stayed"
    );

    // A node that starts now replays the parts with their message.
    let late = open();
    conformance::follow(&late);
    assert_eq!(holds(late.clone(), "recipient-number-001415").await, [4]);
    assert_eq!(
        late.find("id-2", 10).await.unwrap()[0].recipients.len(),
        3_000
    );
    late.close().await;

    // When the broadcast goes, its parts go with it.
    let everything = Retention {
        age: Some(0.0),
        ..Default::default()
    };
    let later = hermod_core::model::now() + 10.0;
    while e.prune(&everything, later).await.unwrap().more {}
    assert_eq!(messages().await, 0, "nothing is left in the stream");
    e.close().await;
}
