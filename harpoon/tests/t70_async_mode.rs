//! Async replication mode: replies once the leader has the entry durably in its own log
//! (`Guarantee::LeaderDurable`); writes acknowledged by a leader that then loses its quorum
//! are lost and counted (`async_lost`), and never half-applied: only committed entries are
//! applied, on every replica, so replicas agree. Over both transports.

#[macro_use]
mod common;

use std::collections::HashSet;

use bytes::Bytes;
use common::WAIT;
use harpoon::testkit::{wait_until, Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, Guarantee, NodeId, ReplicationMode, Role};

fn async_writes(c: &Cluster, leader: NodeId, cell: CellId, prefix: &str, n: usize) -> Vec<Bytes> {
    let mut acked = Vec::new();
    for i in 0..n {
        let d = Bytes::from(format!("{prefix}{i}"));
        let r = c.node(leader).propose(cell, d.clone()).wait().unwrap();
        assert_eq!(r.guarantee, Guarantee::LeaderDurable);
        assert!(r.response.is_none());
        acked.push(d);
    }
    acked
}

fn lose_async_writes(kind: TransportKind, kill_old_leader: bool) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Async);
    let old = c.wait_leader(cell, WAIT).unwrap();
    let safe = async_writes(&c, old, cell, "safe", 10);
    let others: Vec<NodeId> = (1..=3).map(NodeId).filter(|n| *n != old).collect();
    // Make sure the safe writes reached the majority before the fault.
    let idx = c.status(old, cell).unwrap().last_index;
    assert!(wait_until(WAIT, || others.iter().all(|n| c
        .status(*n, cell)
        .unwrap()
        .applied
        >= idx)));

    c.isolate(old);
    let doomed = async_writes(&c, old, cell, "doomed", 10);
    let new = {
        let mut found = None;
        assert!(wait_until(WAIT, || {
            found = others
                .iter()
                .copied()
                .find(|n| c.status(*n, cell).unwrap().role == Role::Leader);
            found.is_some()
        }));
        found.unwrap()
    };
    let later = async_writes(&c, new, cell, "later", 20);
    if kill_old_leader {
        c.kill(old);
        c.heal();
        c.restart(old);
    } else {
        c.heal();
    }
    let last = c.status(new, cell).unwrap().last_index;
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    let applied: HashSet<Bytes> = seq.iter().map(|e| e.data.clone()).collect();
    for d in safe.iter().chain(&later) {
        assert!(applied.contains(d), "{d:?} committed");
    }
    let lost = doomed.iter().filter(|d| !applied.contains(*d)).count();
    assert_eq!(
        lost,
        doomed.len(),
        "the isolated leader's acked writes are lost"
    );
    for n in 1..=3 {
        assert_eq!(
            c.applied(NodeId(n), cell),
            seq,
            "replica {n} agrees (nothing half-applied)"
        );
    }
    // The old leader saw the new leader's entries apply at its acknowledged slots (after a
    // restart too: Async entries carry their proposer, so the acks are recovered from the log).
    let m = c.node(old).metrics();
    assert_eq!(m.async_lost, lost as u64, "{m:?}");
    assert_eq!(c.status(old, cell).unwrap().async_lost, lost as u64);
}

fn uncommitted_bytes_are_bounded_with_busy(kind: TransportKind) {
    let mut opts = ClusterOptions::over(kind);
    opts.node.cell.max_uncommitted_size = 4096;
    opts.node.cell.max_size_per_msg = 1024;
    // The isolated leader must stay leader (check_quorum) for the ~8 synced writes this takes,
    // also on a loaded machine where one fsync can take tens of milliseconds.
    opts.node.cell.election_tick = 50;
    let mut c = Cluster::new(3, opts);
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Async);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    c.isolate(leader);
    // Nothing commits now: after ~4 KiB of acknowledged async writes the leader pushes back.
    let mut busy = false;
    for i in 0..100 {
        match c
            .node(leader)
            .propose(cell, Bytes::from(vec![i as u8; 512]))
            .wait()
        {
            Ok(r) => assert_eq!(r.guarantee, Guarantee::LeaderDurable),
            Err(harpoon::Error::Busy { .. }) => {
                busy = true;
                break;
            }
            Err(harpoon::Error::NotLeader { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy, "the leader refused writes past max_uncommitted_size");
}

on_both_transports! {
    isolated_leader_async_writes_are_counted_lost_and_never_applied => lose_async_writes(false);
    isolated_then_killed_leader_async_writes_are_counted_lost_after_restart =>
        lose_async_writes(true);
    uncommitted_bytes_are_bounded_with_busy => uncommitted_bytes_are_bounded_with_busy();
}
