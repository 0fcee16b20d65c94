//! Nodes restarted from their disk (raft log + durable recording state machine) recover their
//! state, repair their commit index, and rejoin. Over both transports (a restarted TCP node
//! listens on a new port; its peers are told).

#[macro_use]
mod common;

use common::{assert_acked_once, write_n, WAIT};
use harpoon::testkit::{Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, NodeId, ReplicationMode};

fn follower_restarted_from_disk_catches_up(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let mut acked = write_n(&c, cell, "a", 20);
    let f = (1..=3).map(NodeId).find(|n| *n != leader).unwrap();
    let before = c.applied(f, cell);
    c.kill(f);
    acked.extend(write_n(&c, cell, "b", 20));
    c.restart(f);
    // The restarted replica starts from what it had applied, not from scratch.
    let st = c.handle(f, cell).unwrap().apply_state();
    assert!(st.applied_index >= before.last().map(|e| e.index).unwrap_or(0));
    acked.extend(write_n(&c, cell, "c", 5));
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
    assert_eq!(c.applied(f, cell), seq);
}

fn whole_cluster_restarted_from_disk_recovers_and_continues(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    c.wait_leader(cell, WAIT).unwrap();
    let mut acked = write_n(&c, cell, "a", 30);
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT));
    for n in 1..=3 {
        c.kill(NodeId(n));
    }
    for n in 1..=3 {
        c.restart(NodeId(n));
    }
    for n in 1..=3 {
        let st = c.status(NodeId(n), cell).unwrap();
        assert!(
            st.applied >= last,
            "node {n} recovered its applied state: {st:?}"
        );
        assert!(st.commit >= st.applied, "commit repaired: {st:?}");
    }
    c.wait_leader(cell, WAIT)
        .expect("leader after full restart");
    acked.extend(write_n(&c, cell, "b", 10));
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
    for n in 1..=3 {
        assert_eq!(c.applied(NodeId(n), cell), seq, "node {n}");
    }
}

on_both_transports! {
    follower_restarted_from_disk_catches_up => follower_restarted_from_disk_catches_up();
    whole_cluster_restarted_from_disk_recovers_and_continues =>
        whole_cluster_restarted_from_disk_recovers_and_continues();
}
