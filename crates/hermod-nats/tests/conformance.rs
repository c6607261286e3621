//! The engine conformance suite on a real 3-node JetStream cluster (R3).

use std::sync::Arc;

use hermod_core::engine::{conformance, Engine};
use hermod_nats::testing::Cluster;
use hermod_nats::{NatsConfig, NatsEngine};

/// Opens the engine from a synchronous factory, as the suite wants it.
fn opener(cluster: &Cluster, stream: &str) -> impl Fn() -> Arc<dyn Engine> {
    let mut config = NatsConfig::new(cluster.urls());
    config.stream = stream.into();
    config.replicas = 3;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_three_node_cluster() {
    let cluster = Cluster::start(3);
    conformance::run(opener(&cluster, "HERMOD"), true).await;
    conformance::retention(opener(&cluster, "RETENTION")).await;
}
