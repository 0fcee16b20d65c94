//! `Node::campaign_new`: a cell whose replicas all start at the same term with no leader (a
//! range made by a split) gets the leader it is asked for within a round trip, and the call
//! refuses once the replica is past that first term, so it can never depose a leader.
//!
//! Elections are made impossible otherwise: the election timeout is minutes long, so the only
//! way a leader appears is the campaign under test.

#[macro_use]
mod common;

use std::time::Duration;

use bytes::Bytes;
use harpoon::testkit::{Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, NodeId, ReplicationMode, Role};

use common::WAIT;

fn no_spontaneous_elections(kind: TransportKind) -> ClusterOptions {
    let mut o = ClusterOptions::over(kind);
    // 10 ms ticks: an election timeout of 30-60 s, far past every wait below.
    o.node.cell.election_tick = 3000;
    o.node.cell.heartbeat_tick = 2;
    o.node.cell.lease_ticks = 7;
    o
}

fn campaign_new_elects_the_asked_replica(kind: TransportKind) {
    let mut c = Cluster::new(3, no_spontaneous_elections(kind));
    let cell = CellId(7);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let t0 = c.status(NodeId(2), cell).expect("status").term;
    for n in 1..=3 {
        let s = c.status(NodeId(n), cell).expect("status");
        assert_eq!(
            (s.term, s.leader),
            (t0, None),
            "node {n} starts leaderless at t0"
        );
    }

    // Not the cell's first term: refused, nothing starts.
    assert!(!c.node(NodeId(2)).campaign_new(cell, t0 + 1).wait().unwrap());
    assert_eq!(c.status(NodeId(2), cell).unwrap().role, Role::Follower);

    assert!(c.node(NodeId(2)).campaign_new(cell, t0).wait().unwrap());
    let leader = c.wait_leader(cell, WAIT).expect("a leader");
    assert_eq!(leader, NodeId(2), "the replica that campaigned leads");
    assert_eq!(c.status(NodeId(2), cell).unwrap().term, t0 + 1);
    let r = c.propose(cell, Bytes::from_static(b"w")).expect("write");
    assert!(c.wait_applied(cell, r.index, WAIT));

    // Every replica is past t0 now: the call refuses everywhere, the leader stays.
    for n in 1..=3 {
        assert!(
            !c.node(NodeId(n)).campaign_new(cell, t0).wait().unwrap(),
            "node {n}"
        );
    }
    let s = c.status(NodeId(2), cell).unwrap();
    assert_eq!((s.role, s.term), (Role::Leader, t0 + 1));
}

#[test]
fn campaign_new_elects_the_asked_replica_mem() {
    campaign_new_elects_the_asked_replica(TransportKind::Mem);
}

#[test]
fn campaign_new_elects_the_asked_replica_tcp() {
    campaign_new_elects_the_asked_replica(TransportKind::Tcp);
}

/// Two replicas asking at once: at most one leader for the term, and the cell gets one.
#[test]
fn concurrent_campaigns_elect_one_leader() {
    let mut c = Cluster::new(3, no_spontaneous_elections(TransportKind::Mem));
    let cell = CellId(8);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let t0 = c.status(NodeId(1), cell).expect("status").term;
    let a = c.node(NodeId(1)).campaign_new(cell, t0);
    let b = c.node(NodeId(3)).campaign_new(cell, t0);
    assert!(a.wait().unwrap() && b.wait().unwrap());
    // A split vote stays leaderless until an election timeout (minutes here): accept either
    // outcome within a short bound, but never two leaders.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let leaders: Vec<_> = (1..=3)
            .filter_map(|n| c.status(NodeId(n), cell))
            .filter(|s| s.role == Role::Leader)
            .map(|s| s.term)
            .collect();
        let mut terms = leaders.clone();
        terms.dedup();
        assert_eq!(
            terms.len(),
            leaders.len(),
            "one leader per term: {leaders:?}"
        );
        if leaders.len() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
