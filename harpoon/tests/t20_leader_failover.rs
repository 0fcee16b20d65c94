//! Killing the leader: a new one is elected and no acknowledged (committed) write is lost.
//! Every replica's applied sequence is a prefix of the longest; every acknowledged write is in
//! it exactly once, at the index and term it was acknowledged with. Over both transports.

#[macro_use]
mod common;

use bytes::Bytes;
use common::{assert_acked_once, write_n, WAIT};
use harpoon::testkit::{Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, ReplicationMode};

fn failover(kind: TransportKind, n: u64, kills: usize) {
    let mut c = Cluster::new(n, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(
        cell,
        &(1..=n).collect::<Vec<_>>(),
        ReplicationMode::Consensus,
    );
    let mut acked = write_n(&c, cell, "a", 20);
    for k in 0..kills {
        let leader = c.wait_leader(cell, WAIT).expect("leader");
        let term = c.status(leader, cell).unwrap().term;
        // Proposals in flight when the leader dies: their outcome is unknown, not acked.
        let inflight: Vec<_> = (0..10)
            .map(|i| {
                c.node(leader)
                    .propose(cell, Bytes::from(format!("f{k}-{i}")))
            })
            .collect();
        c.kill(leader);
        for p in inflight {
            if let Ok(r) = p.wait() {
                // Acknowledged before the kill: must survive.
                let d = c
                    .applied(leader, cell)
                    .into_iter()
                    .find(|e| e.index == r.index)
                    .map(|e| e.data)
                    .unwrap();
                acked.push((d, r));
            }
        }
        let new = c.wait_leader(cell, WAIT).expect("a new leader is elected");
        assert_ne!(new, leader);
        assert!(c.status(new, cell).unwrap().term > term);
        acked.extend(write_n(&c, cell, &format!("b{k}-"), 20));
    }
    let last = acked.iter().map(|(_, r)| r.index).max().unwrap();
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
}

on_both_transports! {
    three_members_leader_killed_no_acked_write_lost => failover(3, 1);
    seven_members_two_leaders_killed_no_acked_write_lost => failover(7, 2);
}
