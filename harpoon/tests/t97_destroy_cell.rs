//! `Node::destroy_cell`: a replica removed from its cell while it was cut off never receives
//! the conf change that removes it (the leader stops replicating to removed members), so it
//! never destroys itself; its node destroys it on request. The replica stops, callers waiting
//! on it fail with `CellNotFound`, its raft state is gone from the log store durably (a
//! restart does not bring it back), an unknown cell is a typed error, and the cell goes on
//! without it.

#[macro_use]
mod common;

use std::time::Instant;

use common::{write_n, WAIT};
use harpoon::testkit::{wait_until, Cluster, ClusterOptions, TransportKind};
use harpoon::{CellId, CellOptions, Error, NodeId, ReplicationMode};

fn removed_while_isolated_then_destroyed(kind: TransportKind) {
    let mut c = Cluster::new(3, ClusterOptions::over(kind));
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).expect("leader");
    write_n(&c, cell, "a", 10);
    let victim = (1..=3).map(NodeId).find(|n| *n != leader).unwrap();
    assert!(
        c.wait_applied(cell, 11, WAIT),
        "every replica applied the writes"
    );

    // Cut off, then removed: it never hears of its removal.
    c.isolate(victim);
    let cs = c
        .node(leader)
        .remove(cell, victim, Instant::now() + WAIT)
        .wait()
        .expect("remove the isolated member");
    assert!(!cs.voters.contains(&victim.get()), "{cs:?}");
    c.note_removed(cell, victim);
    write_n(&c, cell, "b", 10);
    let st = c
        .node(victim)
        .status(cell)
        .wait()
        .expect("lingering replica");
    assert!(
        st.conf.voters.contains(&victim.get()),
        "the cut-off replica still believes it is a voter: {:?}",
        st.conf
    );
    assert!(
        c.node(victim).log().cells().contains(&cell),
        "its raft state is still in the log"
    );

    // A caller waiting on the replica is answered when it is destroyed.
    let waiting = c
        .node(victim)
        .wait_applied(cell, u64::MAX, Instant::now() + WAIT);
    c.node(victim).destroy_cell(cell).wait().expect("destroy");
    assert!(matches!(
        waiting.wait(),
        Err(Error::CellNotFound { cell: id }) if id == cell
    ));
    assert!(matches!(
        c.node(victim).status(cell).wait(),
        Err(Error::CellNotFound { .. })
    ));
    assert!(
        !c.node(victim).log().cells().contains(&cell),
        "raft state destroyed"
    );
    // Twice, or a cell never held: a typed error, nothing else changes.
    assert!(matches!(
        c.node(victim).destroy_cell(cell).wait(),
        Err(Error::CellNotFound { cell: id }) if id == cell
    ));
    assert!(matches!(
        c.node(victim).destroy_cell(CellId(99)).wait(),
        Err(Error::CellNotFound { cell: id }) if id == CellId(99)
    ));
    assert!(c.node(victim).poisoned().is_none());

    // The cell goes on without it; healing does not bring the replica back (only an initial
    // message could create one, through a cell factory, and none is registered).
    c.heal();
    write_n(&c, cell, "c", 10);
    let others: Vec<NodeId> = (1..=3).map(NodeId).filter(|n| *n != victim).collect();
    let last = c.status(leader, cell).expect("leader status").last_index;
    assert!(wait_until(WAIT, || others
        .iter()
        .all(|n| c.status(*n, cell).is_some_and(|s| s.applied >= last))));
    assert!(c.status(victim, cell).is_none(), "no replica came back");

    // Durable: the restarted node finds no raft state of the cell.
    c.kill(victim);
    c.restart(victim);
    assert!(
        !c.node(victim).log().cells().contains(&cell),
        "the destruction survived the restart"
    );
    assert!(c.status(victim, cell).is_none());
    let seq = c.assert_prefixes(cell);
    assert!(seq.len() >= 30, "every write applied: {}", seq.len());
}

on_both_transports! {
    removed_while_isolated_then_destroyed => removed_while_isolated_then_destroyed();
}

/// A volatile replica is destroyed in the volatile store; other cells of the node are
/// untouched.
#[test]
fn volatile_replica_is_destroyed_in_its_store() {
    let mut c = Cluster::new(1, ClusterOptions::default());
    let (gone, kept) = (CellId(5), CellId(6));
    c.create_cell(
        gone,
        &[1],
        CellOptions::volatile(ReplicationMode::Consensus),
    );
    c.create_cell(kept, &[1], ReplicationMode::Consensus);
    assert!(c.wait_leader(gone, WAIT).is_some() && c.wait_leader(kept, WAIT).is_some());
    write_n(&c, gone, "v", 5);
    write_n(&c, kept, "d", 5);
    let n = c.node(NodeId(1));
    assert!(n.volatile_log().cells().contains(&gone));

    n.destroy_cell(gone).wait().expect("destroy");
    assert!(!n.volatile_log().cells().contains(&gone));
    assert!(matches!(
        n.status(gone).wait(),
        Err(Error::CellNotFound { .. })
    ));
    assert!(
        n.log().cells().contains(&kept),
        "the durable cell keeps its log"
    );
    write_n(&c, kept, "e", 5);
    assert!(n.poisoned().is_none());
}
