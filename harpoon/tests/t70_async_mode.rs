//! Async replication mode: replies once the leader has the entry durably in its own log
//! (`Guarantee::LeaderDurable`); writes acknowledged by a leader that then loses its quorum
//! are lost and counted (`async_lost`), and never half-applied: only committed entries are
//! applied, on every replica, so replicas agree. Over both transports.
//!
//! Proposals answered at apply in an Async cell: `Ack::Applied` ones, and every proposal to
//! a leader that has not applied its own term's first entry (in-memory transport).

#[macro_use]
mod common;

use std::collections::HashSet;
use std::time::Instant;

use bytes::Bytes;
use common::WAIT;
use harpoon::testkit::{wait_until, Cluster, ClusterOptions, TransportKind};
use harpoon::{Ack, CellId, Guarantee, NodeId, ReplicationMode, Role};
use raft::eraftpb::MessageType;

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

/// Wait until leader `l` applied its own term's first entry (its writes are answered at
/// LeaderDurable from then on).
fn term_started(c: &Cluster, l: NodeId, cell: CellId) {
    let last = c.status(l, cell).unwrap().last_index;
    assert!(wait_until(WAIT, || c
        .status(l, cell)
        .is_some_and(|s| s.applied >= last)));
}

fn lose_async_writes(kind: TransportKind, kill_old_leader: bool) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Async);
    let old = c.wait_leader(cell, WAIT).unwrap();
    term_started(&c, old, cell);
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
    term_started(&c, new, cell);
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
    term_started(&c, leader, cell);
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

/// The testkit state machine's response to the entry at `index`.
fn response_of(index: u64) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(&index.to_le_bytes()))
}

/// `Ack::Applied` on an Async cell answers at apply with the state machine's response, while
/// the same leader's other proposals are still answered at LeaderDurable; `wait_applied`
/// resolves once a replica applied an index.
#[test]
fn async_propose_with_applied_returns_the_response() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Async);
    let l = c.wait_leader(cell, WAIT).unwrap();
    // The first proposal may come before the term's first entry applied (answered at apply);
    // once one applied, the leader answers at LeaderDurable.
    let first = c
        .node(l)
        .propose(cell, Bytes::from_static(b"w0"))
        .wait()
        .unwrap();
    assert!(c.wait_applied(cell, first.index, WAIT));
    let before = async_writes(&c, l, cell, "before", 3);
    let r = c
        .node(l)
        .propose_with(
            cell,
            Bytes::from_static(b"cas"),
            Instant::now() + WAIT,
            Ack::Applied,
        )
        .wait()
        .unwrap();
    assert_eq!(r.guarantee, Guarantee::Applied);
    assert_eq!(r.response, response_of(r.index));
    let applied = c.applied(l, cell);
    let e = applied
        .iter()
        .find(|e| e.index == r.index)
        .expect("applied on the leader");
    assert_eq!((e.term, e.data.as_ref()), (r.term, &b"cas"[..]));
    // Later writes of the same leader: LeaderDurable again.
    async_writes(&c, l, cell, "after", 3);
    let last = c
        .node(l)
        .propose(cell, Bytes::from_static(b"last"))
        .wait()
        .unwrap();
    assert_eq!(last.guarantee, Guarantee::LeaderDurable);
    for n in 1..=3 {
        let at = c
            .node(NodeId(n))
            .wait_applied(cell, last.index, Instant::now() + WAIT)
            .wait()
            .unwrap();
        assert!(at >= last.index);
        let data = c.handle(NodeId(n), cell).unwrap().data();
        assert!(data.contains(&Bytes::from_static(b"last")), "node {n}");
        for d in &before {
            assert!(data.contains(d), "node {n}: {d:?}");
        }
    }
}

/// A new Async leader whose own term's first entry has not applied (it cannot replicate it)
/// answers a proposal at apply, with the response, not at LeaderDurable; once that entry
/// applied, LeaderDurable again.
#[test]
fn async_leader_answers_at_apply_until_its_term_start_applied() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Async);
    let a = c.wait_leader(cell, WAIT).unwrap();
    let w = c
        .node(a)
        .propose(cell, Bytes::from_static(b"w0"))
        .wait()
        .unwrap();
    assert!(c.wait_applied(cell, w.index, WAIT));
    let b = (1..=3).map(NodeId).find(|n| *n != a).unwrap();
    // B's appends go nowhere (heartbeats do: it stays leader): its term's first entry cannot
    // commit.
    let filt = c
        .drop_if(move |from, _, env| from == b && env.msg.get_msg_type() == MessageType::MsgAppend);
    c.node(a)
        .transfer_leader(cell, b, Instant::now() + WAIT)
        .wait()
        .unwrap();
    assert!(wait_until(WAIT, || c
        .status(b, cell)
        .is_some_and(|s| s.role == Role::Leader)));
    let st = c.status(b, cell).unwrap();
    assert!(
        st.applied < st.last_index,
        "the term's first entry is not applied: {st:?}"
    );
    let early = c.node(b).propose(cell, Bytes::from_static(b"early"));
    // The entry is in B's log (and, B being the leader, written there) before it commits.
    assert!(wait_until(WAIT, || c
        .status(b, cell)
        .is_some_and(|s| s.last_index > st.last_index)));
    assert!(c.status(b, cell).unwrap().commit < st.last_index);
    c.remove_filter(filt);
    let r = early.wait().unwrap();
    assert_eq!(r.guarantee, Guarantee::Applied, "{r:?}");
    assert_eq!(r.response, response_of(r.index));
    assert_eq!(r.term, st.term);
    let late = c
        .node(b)
        .propose(cell, Bytes::from_static(b"late"))
        .wait()
        .unwrap();
    assert_eq!(late.guarantee, Guarantee::LeaderDurable, "{late:?}");
    assert!(late.response.is_none());
}

on_both_transports! {
    isolated_leader_async_writes_are_counted_lost_and_never_applied => lose_async_writes(false);
    isolated_then_killed_leader_async_writes_are_counted_lost_after_restart =>
        lose_async_writes(true);
    uncommitted_bytes_are_bounded_with_busy => uncommitted_bytes_are_bounded_with_busy();
}
