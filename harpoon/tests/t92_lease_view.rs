//! Lease reads answered from the published read view (no shard trip) stop on an isolated
//! leader before a new leader can acknowledge a write.

mod common;

/// Each read's start time and the applied index it was served at (None: refused).
type Reads = Vec<(Instant, Option<u64>)>;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{write_n, WAIT};
use harpoon::testkit::{wait_until, Cluster, ClusterOptions};
use harpoon::{CellId, NodeId, ReadConsistency, ReplicationMode, Role};

/// A leader with an established lease is isolated while a reader keeps asking it for lease
/// reads (answered from the read view). Once the new leader acknowledged a write, no lease
/// read *started* after that acknowledgement may succeed on the old leader.
#[test]
fn isolated_leader_stops_lease_view_reads_before_a_new_leader_acks() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let old = c.wait_leader(cell, WAIT).unwrap();
    write_n(&c, cell, "a", 5);
    let dl = || Instant::now() + Duration::from_secs(5);
    c.node(old)
        .read_barrier(cell, ReadConsistency::Lease, dl())
        .wait()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Reads>> = Arc::default();
    let fast0 = c.node(old).metrics().lease_fast_reads;
    c.isolate(old);
    std::thread::scope(|s| {
        let (stop2, log2, node) = (stop.clone(), log.clone(), c.node(old));
        s.spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = node
                    .read_barrier(
                        cell,
                        ReadConsistency::Lease,
                        Instant::now() + Duration::from_millis(50),
                    )
                    .wait()
                    .ok();
                log2.lock().unwrap().push((t, r));
            }
        });
        let others: Vec<NodeId> = (1..=3).map(NodeId).filter(|n| *n != old).collect();
        assert!(wait_until(WAIT, || others.iter().any(|n| c
            .status(*n, cell)
            .unwrap()
            .role
            == Role::Leader)));
        let new = *others
            .iter()
            .find(|n| c.status(**n, cell).unwrap().role == Role::Leader)
            .unwrap();
        let r = c
            .node(new)
            .propose(cell, bytes::Bytes::from_static(b"after"))
            .wait()
            .unwrap();
        let acked = Instant::now();
        // An observation window, not a wait for a condition: the reader keeps asking the old
        // leader for 300 ms after the new leader acknowledged a write.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let log = log.lock().unwrap();
        let fast = c.node(old).metrics().lease_fast_reads - fast0;
        let ok_before = log
            .iter()
            .filter(|(t, r)| *t < acked && r.is_some())
            .count();
        let bad: Vec<_> = log
            .iter()
            .filter(|(t, r)| *t > acked && r.is_some())
            .collect();
        eprintln!(
            "reads={} ok_before_ack={ok_before} fast={fast} new_write_index={}",
            log.len(),
            r.index
        );
        // Not vacuous: the isolated leader did answer lease reads from its read view.
        assert!(fast > 0, "no lease read was served from the read view");
        assert!(
            bad.is_empty(),
            "old leader served {} lease reads after the new leader acked index {}: {:?}",
            bad.len(),
            r.index,
            &bad[..bad.len().min(3)]
        );
    });
}
