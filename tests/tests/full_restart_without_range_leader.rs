//! After a restart of every node, a KV range whose previous leader stays down elects a new
//! leader among the other 2 of its 3 replicas, and serves.
//!
//! (Found while writing the crash tests: without waiting for the range to have its 3 voters,
//! this failed every time. A collection serves as soon as its first replica does; the other
//! replicas join later, and a range of voters {L, X} cannot serve without L. The harness now
//! waits for every replica to be a voter before it injects faults: `Cluster::create_collection`.)

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use quiver_tests::crash::{Load, Writes};
use quiver_tests::ready_cluster;
use quiver_tests::workload::Target;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_elects_a_leader_without_its_old_one_after_a_full_restart() {
    let mut c = ready_cluster(3).await;
    let coll = "restart";
    assert!(
        c.create_collection(coll, 3, Duration::from_secs(90)).await,
        "{coll} does not serve with 3 voters; logs in {}",
        c.dir.display()
    );
    let writes = Arc::new(Mutex::new(Writes::default()));
    let load = Load::start_until_acked(
        c.client_addrs(),
        vec![coll.to_string()],
        4,
        "r",
        &writes,
        100,
    )
    .await;
    let (leader, _) = c.range_leader(coll, b"k0").await.expect("range leader");
    c.kill_all();
    load.stop().await;
    for i in (0..c.nodes.len()).filter(|i| *i != leader) {
        c.restart(i);
    }
    assert!(
        c.wait_serving(Duration::from_secs(60)).await.is_some(),
        "meta does not serve on 2 of 3 nodes"
    );
    assert!(
        c.wait_target(&Target::Collection(coll.into()), Duration::from_secs(60))
            .await
            .is_some(),
        "range of {coll} elects no leader on 2 of its 3 replicas after a full restart without \
         its old leader (node {leader}); logs in {}",
        c.dir.display()
    );
}
