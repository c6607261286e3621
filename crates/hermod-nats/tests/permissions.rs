//! The README's permission list is enough: the engine conformance suite
//! passes as a NATS user allowed exactly those subjects (and nothing else).

use std::sync::Arc;

use hermod_core::engine::{conformance, Engine};
use hermod_nats::testing::Cluster;
use hermod_nats::{NatsConfig, NatsEngine};

/// The README's list for stream `HERMOD` (keep the two in step).
const PUBLISH: &[&str] = &[
    "hermod.>",
    "$KV.HERMOD_state.>",
    "$KV.HERMOD_cursors.>",
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.>",
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.MSG.DELETE.HERMOD",
    "$JS.API.STREAM.PURGE.HERMOD",
    "$JS.API.STREAM.PURGE.KV_HERMOD_state",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.STREAM.MSG.GET.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.API.CONSUMER.MSG.NEXT.>",
    "$JS.FC.>",
];

/// A fresh one-server cluster that knows the user `hermod`, allowed
/// exactly [`PUBLISH`]; and how to open the engine on it as that user.
fn restricted() -> (Arc<Cluster>, impl Fn() -> Arc<dyn Engine>) {
    let quoted = |list: &[&str]| {
        list.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let auth = format!(
        "authorization {{ users = [ {{ user: hermod, password: s3cret, permissions: {{ \
         publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }} ] }}",
        quoted(PUBLISH)
    );
    let cluster = Arc::new(Cluster::start_with(1, &auth));
    let url = cluster.url(0).replace("nats://", "nats://hermod:s3cret@");
    let log = {
        let cluster = cluster.clone();
        move || cluster.log(0)
    };
    let open = move || {
        let config = NatsConfig::new(vec![url.clone()]);
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                match NatsEngine::open(config).await {
                    Ok(e) => Arc::new(e) as Arc<dyn Engine>,
                    Err(e) => panic!("open as the restricted user: {e}\n{}", log()),
                }
            })
        })
    };
    (cluster, open)
}

/// Every suite, retention's purges included, each on a store of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_as_a_user_with_only_the_documented_permissions() {
    let (_c, open) = restricted();
    conformance::retention(open).await;
    let (_c, open) = restricted();
    conformance::delivery(open).await;
    let (_c, open) = restricted();
    conformance::holds(open, true).await;
    let (cluster, open) = restricted();
    conformance::run(&open, true).await;
    // A user without them is refused with a clear error, not a hang.
    let stranger = cluster.url(0).replace("nats://", "nats://nobody:wrong@");
    match NatsEngine::open(NatsConfig::new(vec![stranger])).await {
        Err(e) => assert!(e.to_string().contains("cannot reach NATS"), "{e}"),
        Ok(_) => panic!("a user the server does not know was let in"),
    }
}
