//! Catch-up by snapshot: after the log is compacted, a new member and a lagging follower can
//! only catch up from a state-machine snapshot; they end with the same applied sequence.
//! Over both transports (TCP streams the snapshot in chunks).

#[macro_use]
mod common;

use std::time::Instant;

use common::{assert_acked_once, write_n, WAIT};
use harpoon::testkit::{wait_until, Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, Error, NodeId, ReplicationMode, INIT_INDEX};

fn new_member_catches_up_by_snapshot_after_compaction(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let mut acked = write_n(&c, cell, "a", 50);
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT));
    for n in 1..=3 {
        c.node(NodeId(n)).compact_log(cell).wait().unwrap();
    }
    // The compaction joins the next round's write.
    assert!(wait_until(WAIT, || {
        c.status(leader, cell).unwrap().first_index > INIT_INDEX + 40
    }));
    let snaps_before = c.node(leader).metrics().snapshots;

    c.start_node(NodeId(4));
    c.add_replica(NodeId(4), cell);
    c.node(leader)
        .add_learner(cell, NodeId(4), Instant::now() + WAIT)
        .wait()
        .unwrap();
    acked.extend(write_n(&c, cell, "b", 10));
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT), "the learner caught up");
    assert!(
        c.node(leader).metrics().snapshots > snaps_before,
        "by snapshot"
    );
    if let Some(s) = c.tcp_stats(leader) {
        assert!(
            s.snapshots_sent >= 1 && s.snapshot_chunks_sent >= 1,
            "{s:?}"
        );
    }
    let s4 = c.status(NodeId(4), cell).unwrap();
    assert!(
        s4.first_index > INIT_INDEX + 40,
        "{s4:?}: no entries below the snapshot"
    );
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
    assert_eq!(c.applied(NodeId(4), cell), seq);
    // And it can be promoted and serve as a voter.
    c.node(leader)
        .promote(cell, NodeId(4), Instant::now() + WAIT)
        .wait()
        .unwrap();
}

fn lagging_follower_catches_up_by_snapshot(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let f = (1..=3).map(NodeId).find(|n| *n != leader).unwrap();
    let mut acked = write_n(&c, cell, "a", 10);
    c.isolate(f);
    acked.extend(write_n(&c, cell, "b", 40));
    let first = c.node(leader).compact_log(cell).wait().unwrap();
    assert!(wait_until(WAIT, || {
        c.status(leader, cell).unwrap().first_index >= first
    }));
    c.heal();
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
    assert_eq!(c.applied(f, cell), seq);
    assert!(c.node(leader).metrics().snapshots >= 1);
    // Compaction is refused nowhere but is a no-op on an unknown cell.
    assert!(matches!(
        c.node(leader).compact_log(CellId(99)).wait(),
        Err(Error::CellNotFound { .. })
    ));
}

on_both_transports! {
    new_member_catches_up_by_snapshot_after_compaction => new_member_catches_up_by_snapshot_after_compaction();
    lagging_follower_catches_up_by_snapshot => lagging_follower_catches_up_by_snapshot();
}
