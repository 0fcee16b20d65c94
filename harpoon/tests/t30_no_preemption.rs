//! No leadership preemption (pre_vote + check_quorum): a healthy leader keeps its leadership
//! and term when a partitioned follower or a deposed leader comes back. Over both transports.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{assert_acked_once, write_n, WAIT};
use harpoon::testkit::{wait_until, Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, NodeId, ReplicationMode, Role};

/// Leader and term as seen by `nodes`; all must agree.
fn agreed(c: &Cluster, cell: CellId, nodes: &[NodeId]) -> (NodeId, u64) {
    let s: Vec<_> = nodes.iter().map(|n| c.status(*n, cell).unwrap()).collect();
    let l = s[0].leader.expect("leader known");
    for x in &s {
        assert_eq!((x.leader, x.term), (Some(l), s[0].term), "{x:?}");
    }
    (l, s[0].term)
}

fn partitioned_follower_rejoins_without_disrupting_the_leader(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let follower = (1..=3).map(NodeId).find(|n| *n != leader).unwrap();
    let mut acked = write_n(&c, cell, "a", 10);
    let (_, term) = agreed(&c, cell, &c.running());

    c.isolate(follower);
    // Several election timeouts (10 ticks of 10 ms) pass while writes continue.
    let until = Instant::now() + Duration::from_millis(600);
    let mut i = 0;
    while Instant::now() < until {
        acked.extend(write_n(&c, cell, &format!("p{i}-"), 1));
        i += 1;
    }
    // pre_vote: the isolated follower never bumped its term.
    assert_eq!(c.status(follower, cell).unwrap().term, term);
    c.heal();
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT), "follower catches up");
    // Several more election timeouts: still the same leader in the same term everywhere.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agreed(&c, cell, &c.running()), (leader, term));
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
}

fn old_leader_rejoins(kind: TransportKind, n: u64, minority: usize) {
    let mut c = Cluster::new(n, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(
        cell,
        &(1..=n).collect::<Vec<_>>(),
        ReplicationMode::Consensus,
    );
    let old = c.wait_leader(cell, WAIT).unwrap();
    let mut acked = write_n(&c, cell, "a", 10);
    let others: Vec<NodeId> = (1..=n).map(NodeId).filter(|x| *x != old).collect();
    let (small, big) = others.split_at(minority - 1);
    let mut small_side = vec![old];
    small_side.extend_from_slice(small);
    c.partition(&[&small_side, big]);

    // The old leader accepts proposals it can never commit.
    let doomed: Vec<_> = (0..5)
        .map(|i| {
            c.node(old).propose_by(
                cell,
                Bytes::from(format!("doomed{i}")),
                Instant::now() + Duration::from_millis(500),
            )
        })
        .collect();

    // The majority elects a new leader and commits.
    let new = wait_leader_among(&c, cell, big);
    acked.extend(write_n(&c, cell, "b", 10));
    let term = c.status(new, cell).unwrap().term;
    // check_quorum: the old leader steps down on its own.
    assert!(wait_until(WAIT, || c.status(old, cell).unwrap().role != Role::Leader));
    for p in doomed {
        assert!(
            p.wait().is_err(),
            "an uncommitted write is never acknowledged"
        );
    }

    c.heal();
    acked.extend(write_n(&c, cell, "c", 5));
    let last = acked.last().unwrap().1.index;
    assert!(c.wait_applied(cell, last, WAIT));
    std::thread::sleep(Duration::from_millis(300));
    // The rejoined old leader neither deposed the new one nor changed its term.
    assert_eq!(agreed(&c, cell, &c.running()), (new, term));
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
    assert!(
        !seq.iter().any(|e| e.data.starts_with(b"doomed")),
        "the old leader's uncommitted entries were discarded"
    );
    let old_seq = c.applied(old, cell);
    assert_eq!(old_seq.len(), seq.len(), "old leader caught up");
}

fn wait_leader_among(c: &Cluster, cell: CellId, nodes: &[NodeId]) -> NodeId {
    let mut found = None;
    assert!(wait_until(WAIT, || {
        found = nodes
            .iter()
            .copied()
            .find(|n| c.status(*n, cell).is_some_and(|s| s.role == Role::Leader));
        found.is_some()
    }));
    found.unwrap()
}

on_both_transports! {
    partitioned_follower_rejoins_without_disrupting_the_leader =>
        partitioned_follower_rejoins_without_disrupting_the_leader();
    three_members_old_leader_rejoins_without_deposing => old_leader_rejoins(3, 1);
    seven_members_old_leader_and_two_followers_rejoin_without_deposing =>
        old_leader_rejoins(7, 3);
}
