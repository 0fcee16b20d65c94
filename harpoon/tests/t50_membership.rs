//! Membership changes while proposals flow: a learner is added, catches up, is promoted
//! through an explicit joint configuration; a voter is removed; unsafe changes are refused;
//! leadership moves only by transfer. No acknowledged write is lost. Over both transports.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{assert_acked_once, WAIT};
use harpoon::testkit::{wait_until, Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, Error, NodeId, Pending, ReplicationMode, Reply};

fn fire(c: &Cluster, cell: CellId, prefix: &str, n: usize) -> Vec<(Bytes, Pending<Reply>)> {
    let leader = c.wait_leader(cell, WAIT).unwrap();
    (0..n)
        .map(|i| {
            let d = Bytes::from(format!("{prefix}{i}"));
            (d.clone(), c.node(leader).propose(cell, d))
        })
        .collect()
}

fn add_promote_remove_transfer_while_writing(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let deadline = || Instant::now() + WAIT;
    let mut inflight = fire(&c, cell, "a", 20);

    // Learner first: a new, empty replica on node 4.
    c.start_node(NodeId(4));
    c.add_replica(NodeId(4), cell);
    inflight.extend(fire(&c, cell, "b", 20));
    let cs = c
        .node(leader)
        .add_learner(cell, NodeId(4), deadline())
        .wait()
        .unwrap();
    assert_eq!(cs.learners, vec![4]);
    inflight.extend(fire(&c, cell, "c", 20));

    // One change at a time.
    match c
        .node(leader)
        .add_learner(cell, NodeId(5), deadline())
        .wait()
    {
        Err(Error::ConfChangeInProgress { .. }) | Ok(_) => {}
        other => panic!("unexpected {other:?}"),
    }
    if c.status(leader, cell).unwrap().conf.learners.contains(&5) {
        c.node(leader)
            .remove(cell, NodeId(5), deadline())
            .wait()
            .unwrap();
    }

    // Promote once caught up (retry while NotCaughtUp / in progress).
    let mut promoted = None;
    assert!(wait_until(WAIT, || {
        match c.node(leader).promote(cell, NodeId(4), deadline()).wait() {
            Ok(cs) => {
                promoted = Some(cs);
                true
            }
            Err(Error::NotCaughtUp { .. } | Error::ConfChangeInProgress { .. }) => false,
            Err(e) => panic!("promote: {e}"),
        }
    }));
    let cs = promoted.unwrap();
    assert_eq!(cs.voters.len(), 4, "{cs:?}");
    assert!(
        cs.voters_outgoing.is_empty(),
        "left the joint configuration: {cs:?}"
    );
    c.note_voters(cell, &[1, 2, 3, 4]);
    inflight.extend(fire(&c, cell, "d", 20));

    // The leader cannot be removed: transfer first.
    match c.node(leader).remove(cell, leader, deadline()).wait() {
        Err(Error::RemoveLeader { .. }) => {}
        other => panic!("expected RemoveLeader, got {other:?}"),
    }

    // Remove a voter that is not the leader.
    let victim = (1..=3).map(NodeId).find(|n| *n != leader).unwrap();
    let cs = c
        .node(leader)
        .remove(cell, victim, deadline())
        .wait()
        .unwrap();
    assert!(
        !cs.voters.contains(&victim.get()) && cs.voters_outgoing.is_empty(),
        "{cs:?}"
    );
    c.note_removed(cell, victim);
    // The removed replica destroys itself once it applies its removal.
    assert!(wait_until(WAIT, || matches!(
        c.node(victim).status(cell).wait(),
        Err(Error::CellNotFound { .. })
    )));
    inflight.extend(fire(&c, cell, "e", 20));

    // Leadership moves only by explicit transfer.
    c.node(leader)
        .transfer_leader(cell, NodeId(4), deadline())
        .wait()
        .unwrap();
    assert_eq!(c.wait_leader(cell, WAIT), Some(NodeId(4)));
    inflight.extend(fire(&c, cell, "f", 20));

    let mut acked = Vec::new();
    for (d, p) in inflight {
        if let Ok(r) = p.wait() {
            acked.push((d, r));
        }
    }
    assert!(
        acked.len() >= 100,
        "most writes acknowledged: {}",
        acked.len()
    );
    let last = acked.iter().map(|(_, r)| r.index).max().unwrap();
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    assert_acked_once(&seq, &acked);
    assert_eq!(
        c.applied(NodeId(4), cell),
        seq,
        "the new member has everything"
    );
}

fn quorum_losing_removal_is_refused(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    common::write_n(&c, cell, "a", 3);
    let others: Vec<NodeId> = (1..=3).map(NodeId).filter(|n| *n != leader).collect();
    c.kill(others[0]);
    // Setup, not an assertion: let failure detection (one election timeout) see it down.
    std::thread::sleep(Duration::from_millis(300));
    // With one voter down, removing the other healthy one would leave 1 of 2 healthy.
    assert!(wait_until(WAIT, || matches!(
        c.node(leader)
            .remove(cell, others[1], Instant::now() + WAIT)
            .wait(),
        Err(Error::QuorumLoss { .. })
    )));
}

fn unknown_cell_replica_is_created_only_from_an_initial_message(kind: TransportKind) {
    use harpoon::testkit::LogStateMachine;
    use std::sync::Arc;
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let acked = common::write_n(&c, cell, "a", 10);
    c.start_node(NodeId(4));
    let (sm, h) = LogStateMachine::in_memory();
    let slot = Arc::new(parking_lot::Mutex::new(Some(sm)));
    c.node(NodeId(4)).set_cell_factory(Arc::new(move |id| {
        let sm = slot.lock().take()?;
        (id == CellId(1)).then(|| {
            (
                ReplicationMode::Consensus.into(),
                Box::new(sm) as Box<dyn harpoon::StateMachine>,
            )
        })
    }));
    // No replica on node 4 yet: the leader's heartbeat (commit 0) to the new learner creates
    // it, then it catches up by snapshot.
    c.node(leader)
        .add_learner(cell, NodeId(4), Instant::now() + WAIT)
        .wait()
        .unwrap();
    let last = acked.last().unwrap().1.index;
    assert!(wait_until(WAIT, || c
        .status(NodeId(4), cell)
        .is_some_and(|s| s.applied >= last)));
    let seq = c.assert_prefixes(cell);
    assert_eq!(h.entries(), seq);
}

fn conf_change_lost_to_a_leader_change_is_reported_dropped(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let old = c.wait_leader(cell, WAIT).unwrap();
    common::write_n(&c, cell, "a", 3);
    c.isolate(old);
    // Appended on the isolated leader only: it can never commit.
    let p = c
        .node(old)
        .add_learner(cell, NodeId(9), Instant::now() + WAIT);
    let others: Vec<NodeId> = (1..=3).map(NodeId).filter(|n| *n != old).collect();
    assert!(wait_until(WAIT, || others.iter().any(|n| c
        .status(*n, cell)
        .is_some_and(|s| s.role == harpoon::Role::Leader))));
    common::write_n(&c, cell, "b", 3);
    c.heal();
    // The new leader's entry lands at the slot: the caller learns the change was dropped,
    // and the membership is unchanged.
    assert!(matches!(p.wait(), Err(Error::ConfChangeDropped { .. })));
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let conf = c.status(leader, cell).unwrap().conf;
    assert!(conf.learners.is_empty(), "{conf:?}");
}

on_both_transports! {
    add_promote_remove_transfer_while_writing => add_promote_remove_transfer_while_writing();
    quorum_losing_removal_is_refused => quorum_losing_removal_is_refused();
    unknown_cell_replica_is_created_only_from_an_initial_message => unknown_cell_replica_is_created_only_from_an_initial_message();
    conf_change_lost_to_a_leader_change_is_reported_dropped => conf_change_lost_to_a_leader_change_is_reported_dropped();
}
