//! The memory engine is the reference model of the NATS engine: both are
//! the same `LogIndex` over a log, one keeping every body in memory, the
//! other following a JetStream stream and its state bucket. Given the same
//! seeded mix of writes — direct messages, broadcasts, topic events,
//! loop-guard holds and releases, retention steps, forgotten agents — the
//! NATS engine must read back exactly what the model reads.

use std::sync::Arc;

use hermod_core::engine::memory::MemoryEngine;
use hermod_core::engine::{conformance, Engine, Retention, View};
use hermod_core::model::{AgentName, Channel, Guarded, InboxKey, NewMessage, Seq};
use hermod_nats::testing::Cluster;
use hermod_nats::{NatsConfig, NatsEngine};

const AGENTS: [&str; 5] = ["ann", "bob", "cyd", "dee", "eve"];

/// A small seeded generator (xorshift), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn key(name: &str) -> InboxKey {
    InboxKey::new(Channel::default(), AgentName::parse(name).unwrap())
}

/// Everything a reader can see, as plain values.
async fn observe(e: &Arc<dyn Engine>) -> String {
    let mut out = Vec::new();
    let mut views: Vec<View> = AGENTS.iter().map(|a| View::Inbox(key(a))).collect();
    views.push(View::Topics(Channel::default()));
    views.push(View::AllTopics);
    for view in views {
        let page = e.read(&view, 0, 10_000).await.unwrap();
        let seqs: Vec<Seq> = page.messages.iter().map(|m| m.seq).collect();
        out.push(format!("{view:?}: pruned {} seqs {seqs:?}", page.pruned));
    }
    for a in AGENTS {
        let n = e.count_inbox(&key(a), 0).await.unwrap();
        out.push(format!("{a}: {n} unread"));
    }
    let mut floors = e.floors().await.unwrap();
    floors.sort_by_key(|(v, _)| format!("{v:?}"));
    out.push(format!("floors {floors:?}"));
    let held: Vec<Seq> = e
        .held(0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    out.push(format!("held {held:?}"));
    out.join("\n")
}

/// Three seeds of 400 steps each, every one on a stream of its own. (It
/// found that forgetting a name the registry did not know left its pruned
/// mark on NATS, so a reader of it was told of a gap the model had not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_engine_reads_what_the_memory_engine_reads() {
    let cluster = Cluster::start(1);
    for (n, seed) in [0x5eed_2026_1207_u64, 7, 0xdead_beef]
        .into_iter()
        .enumerate()
    {
        same_reads(&cluster, &format!("MODEL{n}"), seed).await;
    }
}

async fn same_reads(cluster: &Cluster, stream: &str, seed: u64) {
    let mut config = NatsConfig::new(cluster.urls());
    config.stream = stream.into();
    let nats: Arc<dyn Engine> = Arc::new(NatsEngine::open(config).await.unwrap());
    let model: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    conformance::follow(&nats);
    conformance::follow(&model);
    let mut rng = Rng(seed);
    let (mut n, mut holds) = (0u64, Vec::<(Seq, NewMessage)>::new());
    // What was done, for a failure to show.
    let mut done: Vec<String> = Vec::new();
    for round in 0..400 {
        match rng.next(10) {
            0..=5 => {
                let mut batch = Vec::new();
                for _ in 0..=rng.next(3) {
                    n += 1;
                    let to = AGENTS[rng.next(5) as usize];
                    let mut m = conformance::message(to, n, None);
                    match rng.next(6) {
                        // A broadcast to some of them.
                        0 => {
                            m.to = None;
                            m.recipients = AGENTS
                                .iter()
                                .filter(|_| rng.next(2) == 0)
                                .map(|a| AgentName::parse(*a).unwrap())
                                .collect();
                        }
                        // A topic event, kept by the durable subscribers.
                        1 => {
                            m = conformance::message(to, n, Some("work.done"));
                            m.recipients.retain(|_| rng.next(2) == 0);
                        }
                        // Held by the loop guard.
                        2 => {
                            m.guard = Guarded::Held;
                            m.recipients.clear();
                        }
                        // The release of a hold (sometimes one ended already).
                        3 if !holds.is_empty() => {
                            let pick = rng.next(holds.len() as u64) as usize;
                            let (seq, held) = holds[pick].clone();
                            m = held;
                            m.id = format!("release-{n}");
                            m.recipients = vec![AgentName::parse(to).unwrap()];
                            m.guard = Guarded::Releases(seq);
                        }
                        _ => {}
                    }
                    batch.push(m);
                }
                let a = nats.submit(batch.clone()).await.unwrap().await.unwrap();
                let b = model.submit(batch.clone()).await.unwrap().await.unwrap();
                let (a, b) = (a.unwrap(), b.unwrap());
                let seqs = |s: &[Arc<hermod_core::model::Message>]| {
                    s.iter().map(|m| m.seq).collect::<Vec<_>>()
                };
                assert_eq!(seqs(&a), seqs(&b), "seed {seed} round {round}: seqs");
                done.push(format!(
                    "{round}: stored {:?}",
                    batch
                        .iter()
                        .zip(&a)
                        .map(|(m, s)| (s.seq, m.recipients.len(), m.topic.is_some(), m.guard))
                        .collect::<Vec<_>>()
                ));
                for (m, stored) in batch.into_iter().zip(&a) {
                    if m.guard == Guarded::Held {
                        holds.push((stored.seq, m));
                    }
                }
            }
            6 | 7 => {
                let rules = match rng.next(3) {
                    0 => Retention {
                        inbox_messages: Some(2 + rng.next(6)),
                        ..Retention::default()
                    },
                    1 => Retention {
                        bytes: Some(200 + rng.next(400)),
                        ..Retention::default()
                    },
                    _ => Retention {
                        age: Some(3600.0),
                        ..Retention::default()
                    },
                };
                let now = hermod_core::model::now();
                for e in [&nats, &model] {
                    while e.prune(&rules, now).await.unwrap().more {}
                }
                done.push(format!("{round}: prune {rules:?}"));
            }
            8 => {
                let who = key(AGENTS[rng.next(5) as usize]);
                nats.forget_agent(who.clone()).await.unwrap();
                model.forget_agent(who.clone()).await.unwrap();
                done.push(format!("{round}: forget {}", who.agent.as_str()));
            }
            _ => {}
        }
        // After every step: the first one that differs is the one shown.
        let (a, b) = (observe(&nats).await, observe(&model).await);
        assert_eq!(
            a,
            b,
            "seed {seed} round {round}: NATS (left) against the model after\n{}",
            done[done.len().saturating_sub(12)..].join("\n")
        );
    }
    nats.close().await;
}
