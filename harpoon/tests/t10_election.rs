//! A fresh cell elects one leader, applies proposals on every replica in the same order, and
//! redirects proposals made at a follower. Over both transports.

#[macro_use]
mod common;

use bytes::Bytes;
use harpoon::testkit::{Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, Error, Guarantee, NodeId, ReplicationMode};

use common::WAIT;

fn elect_and_replicate(kind: TransportKind, n: u64) {
    let mut c = Cluster::new(n, ClusterOptions::over(kind));
    let cell = CellId(1);
    let voters: Vec<u64> = (1..=n).collect();
    c.create_cell(cell, &voters, ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).expect("a leader is elected");

    let mut acked = Vec::new();
    for i in 0..20u32 {
        let r = c
            .propose(cell, Bytes::from(format!("w{i}")))
            .expect("proposal applies");
        assert_eq!(r.guarantee, Guarantee::Applied);
        assert_eq!(
            r.response,
            Some(Bytes::copy_from_slice(&r.index.to_le_bytes()))
        );
        acked.push(r.index);
    }
    let last = *acked.last().unwrap();
    assert!(c.wait_applied(cell, last, WAIT), "every replica applies");
    let seq = c.assert_prefixes(cell);
    assert_eq!(seq.len(), 20);
    for v in &voters {
        assert_eq!(c.applied(NodeId(*v), cell).len(), 20, "replica {v}");
    }

    // A follower redirects instead of forwarding.
    let follower = NodeId(if leader.get() == 1 { 2 } else { 1 });
    match c
        .node(follower)
        .propose(cell, Bytes::from_static(b"x"))
        .wait()
    {
        Err(Error::NotLeader { leader_hint, .. }) => assert_eq!(leader_hint, Some(leader)),
        other => panic!("expected NotLeader, got {other:?}"),
    }
    // One log write and at most one sync per round on the leader.
    let m = c.node(leader).metrics();
    assert!(m.log_syncs <= m.rounds, "{m:?}");
    // And it really ran over the transport asked for.
    match kind {
        TransportKind::Tcp => {
            let s = c.tcp_stats(leader).expect("tcp transport");
            assert!(s.msgs_sent > 0 && s.connects > 0, "{s:?}");
        }
        TransportKind::Mem => assert!(c.net.stats().total().delivered > 0),
    }
}

on_both_transports! {
    three_member_cell_elects_and_replicates => elect_and_replicate(3);
    seven_member_cell_elects_and_replicates => elect_and_replicate(7);
}
