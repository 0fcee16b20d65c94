//! Linearizable reads: leader-lease reads and ReadIndex reads (also on followers), always with
//! deadlines: a read that cannot be confirmed answers `Timeout`, never hangs, and a deposed
//! leader never serves a read from a stale lease.

mod common;

use std::time::{Duration, Instant};

use common::{write_n, WAIT};
use harpoon::testkit::{wait_until, Cluster, ClusterOptions};
use harpoon::{CellId, Error, NodeId, ReadConsistency, ReplicationMode, Role};

#[test]
fn lease_and_read_index_reads_see_acknowledged_writes() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let acked = write_n(&c, cell, "a", 10);
    let last = acked.last().unwrap().1.index;
    let dl = || Instant::now() + Duration::from_secs(5);
    for consistency in [ReadConsistency::Lease, ReadConsistency::ReadIndex] {
        let at = c
            .node(leader)
            .read_barrier(cell, consistency, dl())
            .wait()
            .unwrap();
        assert!(at >= last, "{consistency:?} read at {at} < acked {last}");
    }
    let f = (1..=3).map(NodeId).find(|n| *n != leader).unwrap();
    // Follower read through ReadIndex: waits until the follower applied the read index.
    let at = c
        .node(f)
        .read_barrier(cell, ReadConsistency::ReadIndex, dl())
        .wait()
        .unwrap();
    assert!(at >= last);
    assert!(c.handle(f, cell).unwrap().apply_state().applied_index >= last);
    // Lease reads are a leader's business.
    assert!(matches!(
        c.node(f)
            .read_barrier(cell, ReadConsistency::Lease, dl())
            .wait(),
        Err(Error::NotLeader { leader_hint: Some(l), .. }) if l == leader
    ));
}

/// Lease reads answered from the read view (no shard trip) still cover every write
/// acknowledged before them, including while writes keep applying; and they stop once the
/// leadership moved.
#[test]
fn fast_lease_reads_cover_acknowledged_writes_and_stop_after_transfer() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    write_n(&c, cell, "a", 3);
    let dl = || Instant::now() + Duration::from_secs(5);
    let node = c.node(leader);
    // The first lease read establishes the lease through the shard.
    node.read_barrier(cell, ReadConsistency::Lease, dl())
        .wait()
        .unwrap();
    let before = node.metrics().lease_fast_reads;
    for i in 0..200 {
        let r = node
            .propose(cell, bytes::Bytes::from(format!("w{i}")))
            .wait()
            .unwrap();
        let at = node
            .read_barrier(cell, ReadConsistency::Lease, dl())
            .wait()
            .unwrap();
        assert!(
            at >= r.index,
            "lease read at {at} misses acked write {}",
            r.index
        );
    }
    assert!(
        node.metrics().lease_fast_reads > before,
        "no lease read was answered from the read view"
    );
    // Once the leadership moved, the old leader's view answers nothing.
    let to = (1..=3).map(NodeId).find(|n| *n != leader).unwrap();
    node.transfer_leader(cell, to, dl()).wait().unwrap();
    let fast = node.metrics().lease_fast_reads;
    let r = node
        .read_barrier(
            cell,
            ReadConsistency::Lease,
            Instant::now() + Duration::from_millis(300),
        )
        .wait();
    assert!(r.is_err(), "the old leader served a lease read: {r:?}");
    assert_eq!(node.metrics().lease_fast_reads, fast);
}

#[test]
fn isolated_leader_never_serves_reads_once_a_new_leader_exists() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let old = c.wait_leader(cell, WAIT).unwrap();
    write_n(&c, cell, "a", 5);
    c.isolate(old);
    // ReadIndex without a quorum: deadline error, not a hang.
    let t0 = Instant::now();
    let r = c
        .node(old)
        .read_barrier(
            cell,
            ReadConsistency::ReadIndex,
            Instant::now() + Duration::from_millis(300),
        )
        .wait();
    assert!(
        matches!(r, Err(Error::Timeout { .. } | Error::NotLeader { .. })),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));

    let others: Vec<NodeId> = (1..=3).map(NodeId).filter(|n| *n != old).collect();
    assert!(wait_until(WAIT, || others.iter().any(|n| c
        .status(*n, cell)
        .unwrap()
        .role
        == Role::Leader)));
    // A new leader exists: the old one's lease must have expired.
    for consistency in [ReadConsistency::Lease, ReadConsistency::ReadIndex] {
        let r = c
            .node(old)
            .read_barrier(
                cell,
                consistency,
                Instant::now() + Duration::from_millis(200),
            )
            .wait();
        assert!(
            r.is_err(),
            "{consistency:?} read served by a deposed leader: {r:?}"
        );
    }
    c.heal();
    let new = c.wait_leader(cell, WAIT).unwrap();
    assert_ne!(new, old);
    c.node(new)
        .read_barrier(cell, ReadConsistency::Lease, Instant::now() + WAIT)
        .wait()
        .unwrap();
}
