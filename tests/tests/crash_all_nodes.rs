//! Node-level crash consistency: kill -9 of every node at once in the middle of heavy
//! Consensus-mode writes, restart of all, and every acknowledged write read back.
//!
//! Three nodes; two collections (RF 3, consensus replication), one `logged` (the default) and
//! one `persistent`; 8 writers of write-once keys. Two rounds: load, kill -9 all, restart all,
//! read back every key acknowledged so far (earlier rounds included). (kill -9 loses nothing
//! written to a shared mapping, FAULTS.md §4, so this tests the restart and replay path, not
//! durability against power loss; `storage_damage.rs` damages the files themselves.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_tests::crash::{read_back, Load, Writes};
use quiver_tests::ready_cluster;
use quiver_tests::workload::Target;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_every_node() {
    let t0 = Instant::now();
    let mut c = ready_cluster(3).await;
    let colls = ["crash-logged", "crash-persistent"];
    assert!(
        c.create_collection(colls[0], 3, Duration::from_secs(90))
            .await,
        "{} does not serve; logs in {}",
        colls[0],
        c.dir.display()
    );
    assert!(
        c.create_collection_with(
            colls[1],
            3,
            &["--persistence", "persistent"],
            Duration::from_secs(90)
        )
        .await,
        "{} does not serve; logs in {}",
        colls[1],
        c.dir.display()
    );
    let writes = Arc::new(Mutex::new(Writes::default()));
    for round in 0..2 {
        // Heavy load for a while: at least 300 new acknowledged writes.
        let load = Load::start_until_acked(
            c.client_addrs(),
            colls.iter().map(|s| s.to_string()).collect(),
            8,
            &format!("r{round}"),
            &writes,
            300,
        )
        .await;
        // kill -9 every node at once, in the middle of the load.
        c.kill_all();
        load.stop().await;
        c.revive_all();
        for name in colls {
            assert!(
                c.wait_target(&Target::Collection(name.into()), Duration::from_secs(90))
                    .await
                    .is_some(),
                "round {round}: {name} does not serve after the restart of every node; logs in {}",
                c.dir.display()
            );
        }
        let w = writes.lock().clone();
        let r = read_back(c.client_addrs(), &w).await;
        eprintln!(
            "round {round}: acknowledged={} unknown={} failed={} read_back={} missing={} \
             wrong={} unread={} unknown_applied={} ({:.1}s)",
            w.acked.len(),
            w.unknown.len(),
            w.failed,
            r.acked_checked,
            r.missing.len(),
            r.wrong.len(),
            r.unread.len(),
            r.unknown_applied,
            t0.elapsed().as_secs_f64()
        );
        assert!(
            r.ok(),
            "round {round}: acknowledged writes lost after kill -9 of every node: missing {:?}, \
             wrong {:?}, unread {:?}; logs in {}",
            r.missing.iter().take(5).collect::<Vec<_>>(),
            r.wrong.iter().take(5).collect::<Vec<_>>(),
            r.unread.iter().take(5).collect::<Vec<_>>(),
            c.dir.display()
        );
    }
}
