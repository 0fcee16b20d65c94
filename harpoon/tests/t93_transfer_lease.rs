//! A leadership transfer that raft aborts (the target never got MsgTimeoutNow) leaves lease
//! reads off for the rest of the term: a late MsgTimeoutNow would make the target campaign
//! with CAMPAIGN_TRANSFER, which followers grant inside the old leader's lease.

mod common;

use std::time::{Duration, Instant};

use common::{write_n, WAIT};
use harpoon::testkit::{Cluster, ClusterOptions};
use harpoon::{CellId, NodeId, ReadConsistency, ReplicationMode};
use raft::eraftpb::MessageType;

#[test]
fn aborted_transfer_keeps_lease_reads_off_for_the_term() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let old = c.wait_leader(cell, WAIT).unwrap();
    write_n(&c, cell, "a", 3);
    let dl = || Instant::now() + Duration::from_secs(5);
    // A lease read works before the transfer.
    c.node(old)
        .read_barrier(cell, ReadConsistency::Lease, dl())
        .wait()
        .unwrap();
    let term = c.status(old, cell).unwrap().term;
    let target = [1, 2, 3]
        .into_iter()
        .map(NodeId)
        .find(|n| *n != old)
        .unwrap();
    let filter = c.drop_if(|_, _, env| env.msg.get_msg_type() == MessageType::MsgTimeoutNow);
    // Longer than the election timeout (10 ticks of 10 ms): raft aborts the transfer first.
    let r = c
        .node(old)
        .transfer_leader(cell, target, Instant::now() + Duration::from_millis(400))
        .wait();
    assert!(
        r.is_err(),
        "the transfer cannot complete without MsgTimeoutNow"
    );
    let st = c.status(old, cell).unwrap();
    assert_eq!(
        (st.leader, st.term),
        (Some(old), term),
        "no election happened"
    );
    // Lease reads still succeed (through ReadIndex) but none is served under a lease.
    let fast0 = c.node(old).metrics().lease_fast_reads;
    for _ in 0..50 {
        c.node(old)
            .read_barrier(cell, ReadConsistency::Lease, dl())
            .wait()
            .unwrap();
    }
    assert_eq!(c.status(old, cell).unwrap().term, term);
    assert_eq!(
        c.node(old).metrics().lease_fast_reads,
        fast0,
        "no lease read in the term of an aborted transfer"
    );
    c.remove_filter(filter);
}
