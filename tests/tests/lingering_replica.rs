//! A replica removed from its range while it lags must not linger (seed's `linger` module,
//! harpoon's `Node::destroy_cell`).
//!
//! A voter of a 3-replica range is cut off (its peer links blackholed) and SIGSTOPped past
//! `dead-after`: meta demotes it, the range's
//! leader takes it out of the cell and then out of meta, and the fourth node takes its slot.
//! The paused replica never receives the conf change that removes it (no leader replicates
//! to a removed member), so it never destroys itself. Before the fix it lived on after
//! SIGCONT and the heal: its cell, raft log and range dir, ticking and pre-voting, listed as a local
//! replica in the node's status. Now, once the resumed node's view of meta shows the range's
//! record, newer than its claim, without it, the node drops the replica: gone from its
//! status and its data dir. The range keeps serving what was written before, with its three
//! voters, and the resumed node does not come back into it (the range is fully replicated).
//! The same with the victim killed instead and restarted from its data dir: start-up reopens
//! the stale replica, and it is dropped the same way.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proto::clientpb::{ClientRequest, ClientResponse_oneof_kind, StatusRequest};
use proto::metapb::MemberRole;
use quiver_tests::cluster::{fast_flags_with_dead_after, wait_for, Cluster};
use quiver_tests::proxy::Rule;
use quiver_tests::ready_cluster_with;
use quiver_tests::workload::{Store, Target};

/// The ranges node `i` holds a local replica of, from its own status (`None`: no answer).
async fn local_ranges(c: &Cluster, i: usize) -> Option<Vec<u64>> {
    let mut req = ClientRequest::new();
    req.set_status(StatusRequest::new());
    match c.ask(i, req, Duration::from_secs(2)).await? {
        ClientResponse_oneof_kind::status(s) => {
            Some(s.range_leaders.iter().map(|r| r.range).collect())
        }
        _ => None,
    }
}

/// How the victim lags while it is removed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lag {
    /// Blackholed and SIGSTOPped; healed and SIGCONTed once replaced.
    Paused,
    /// Killed (SIGKILL); restarted from its data dir once replaced: start-up reopens the
    /// stale replica from its range dir, and housekeeping finds it removed.
    Killed,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_removed_while_paused_is_dropped_when_it_resumes() {
    removed_while_lagging(Lag::Paused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_removed_while_down_is_dropped_when_it_restarts() {
    removed_while_lagging(Lag::Killed).await;
}

async fn removed_while_lagging(lag: Lag) {
    let mut c = ready_cluster_with(4, fast_flags_with_dead_after(Duration::from_secs(4))).await;
    let coll = "linger";
    assert!(
        c.create_collection(coll, 3, Duration::from_secs(90)).await,
        "the range never had 3 voters; {}",
        c.membership_state(Some(coll)).await
    );
    let store = Store::new(
        c.client(Duration::from_secs(2)),
        Target::Collection(coll.into()),
        0,
        false,
    );
    for k in 0..20 {
        let put = wait_for(Duration::from_secs(30), || async {
            store.put(k, k * 10).await.ok()
        })
        .await;
        assert!(put.is_some(), "put k{k}");
    }
    let (_, r) = c.lookup(coll, b"k0").await.expect("lookup");
    let range = r.id;
    let (leader, _) = c.range_leader(coll, b"k0").await.expect("range leader");
    // A voter that leads neither the range nor (when it can be helped) meta: the range keeps
    // serving and meta's leader stays up to remove it.
    let cl = c.client(Duration::from_secs(2));
    let meta_leader = Cluster::meta_leader(&cl)
        .await
        .and_then(|id| c.index_of(id));
    let voters: Vec<usize> = (0..c.nodes.len())
        .filter(|i| *i != leader && r.members.iter().any(|m| m.node == c.nodes[*i].id))
        .collect();
    let victim = voters
        .iter()
        .copied()
        .find(|i| Some(*i) != meta_leader)
        .or(voters.first().copied())
        .expect("a voter that does not lead the range");
    let id = c.nodes[victim].id;
    let dir = c.nodes[victim]
        .data_dir
        .join("ranges")
        .join(range.to_string());
    let held = wait_for(Duration::from_secs(30), || async {
        local_ranges(&c, victim)
            .await
            .filter(|l| l.contains(&range))
            .map(|_| ())
    })
    .await;
    assert!(
        held.is_some(),
        "node {victim} never listed its replica of range {range}"
    );
    assert!(dir.exists(), "{} missing", dir.display());

    // Cut off, then stopped. Stopped alone is not enough: the kernel keeps receiving into the
    // paused process's sockets what the range's leader sends it until it applies the removal,
    // the removal entry included, and the node applies it when it resumes. The blackhole
    // discards those frames, as a partition would.
    match lag {
        Lag::Paused => {
            let mut rules = HashMap::new();
            for other in c.nodes.iter().filter(|n| n.id != id) {
                rules.insert((id, other.id), Rule::Drop);
                rules.insert((other.id, id), Rule::Drop);
            }
            c.proxy.set_all(rules);
            c.pause(victim);
        }
        Lag::Killed => c.kill(victim),
    }
    // Out of the range's record, its slot taken by the fourth node, promoted to voter.
    let replaced = wait_for(Duration::from_secs(60), || async {
        let (_, r) = c.lookup(coll, b"k0").await?;
        let voters = r
            .members
            .iter()
            .filter(|m| m.role == MemberRole::VOTER)
            .count();
        (r.members.iter().all(|m| m.node != id) && voters == 3).then_some(())
    })
    .await;
    let state = c.membership_state(Some(coll)).await;
    match lag {
        Lag::Paused => {
            c.proxy.heal();
            c.resume(victim);
        }
        Lag::Killed => c.restart(victim),
    }
    assert!(
        replaced.is_some(),
        "node {victim} (id {id}) was not replaced in range {range}; {state}"
    );

    let t = Instant::now();
    let gone = wait_for(Duration::from_secs(45), || async {
        let l = local_ranges(&c, victim).await?;
        (!l.contains(&range) && !dir.exists()).then_some(())
    })
    .await;
    eprintln!(
        "{lag:?}: node {victim} (id {id}) replica of range {range} gone: {} after {:.1}s; {}",
        gone.is_some(),
        t.elapsed().as_secs_f64(),
        c.membership_state(Some(coll)).await
    );
    assert!(
        gone.is_some(),
        "the removed replica of range {range} lingers on node {victim} (id {id}): status {:?}, \
         dir exists {}; logs in {}",
        local_ranges(&c, victim).await,
        dir.exists(),
        c.dir.display()
    );

    // The range serves what it had, with three voters, the resumed node not among them.
    for k in 0..20 {
        let got = wait_for(Duration::from_secs(30), || async {
            store.get(k).await.ok()
        })
        .await;
        assert_eq!(got, Some(Some(k * 10)), "k{k} after the drop");
    }
    let put = wait_for(Duration::from_secs(30), || async {
        store.put(99, 1).await.ok()
    })
    .await;
    assert!(put.is_some(), "the range takes writes after the drop");
    let (_, r) = c.lookup(coll, b"k0").await.expect("lookup");
    let voters = r
        .members
        .iter()
        .filter(|m| m.role == MemberRole::VOTER)
        .count();
    assert!(
        voters == 3 && r.members.iter().all(|m| m.node != id),
        "range {range} after the drop: {:?}",
        r.members
    );
    assert!(
        !local_ranges(&c, victim)
            .await
            .is_some_and(|l| l.contains(&range)),
        "the replica did not come back"
    );
}
