//! A `memory` replica lost while it is still a learner rejoins. Two of three nodes run and a
//! `--persistence memory` collection (3 replicas, so under-replicated at 2) gets some values.
//! The third node X starts advertising a peer address nobody listens on: it reaches the
//! others (joins meta, claims the free slot as a learner, opens its replica), but the range's
//! leader cannot reach it, so it stays a learner that never catches up. X is killed and
//! restarted normally (alive again before anyone deems it dead). When its replica did not
//! survive the restart (memory ranges whose raft log is in memory too) and meta lists it as a
//! learner, there is nothing to demote: it must ask meta to drop it, the range's leader takes it out of the cell, it forgets the replica and claims
//! the slot again. The range must end with 3 voters, X among them, and X's own replica must
//! serve every value.

mod common;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use cli::demo::{free_addr, node_command, wait_for, LocalCluster, NodeCommand};
use common::*;

const NAME: &str = "lost";
const KEYS: usize = 20;

fn value(i: usize) -> Vec<u8> {
    format!("v{i}").into_bytes()
}

/// A node process started outside the cluster's bookkeeping, killed when dropped.
struct Own(Child);

impl Drop for Own {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Node `id`'s role in range `range` per meta's leader, if listed.
async fn role(cl: &client::Client, range: u64, id: u64) -> Option<meta::MemberRole> {
    let s = leader_status(cl).await?;
    let r = s.ranges.iter().find(|r| r.id == range)?;
    Some(r.members.iter().find(|m| m.node == id)?.role)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_replica_lost_as_a_learner_rejoins_and_becomes_a_voter() {
    let t0 = Instant::now();
    let (path, _dir) = test_dir();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_quiver"));
    let mut c = LocalCluster::new(exe.clone(), path, 3, fast()).expect("layout");
    c.start(0).expect("start");
    c.start(1).expect("start");
    create_meta(&c, 0).await;
    let cl = client_of(&c, &[0, 1]);
    wait_voters(&cl, 2, LONG).await;
    let seeds = c
        .clients([0, 1])
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let coll = create_by_cli(&seeds, NAME, &["--persistence", "memory"]);
    let kv = cl.kv(NAME);
    first_put(&kv, b"k00", &value(0)).await;
    for i in 1..KEYS {
        put_acked(&kv, format!("k{i:02}").as_bytes(), &value(i)).await;
    }
    let range = wait_placed(&cl, coll, 2).await[0].id;

    // X advertises a peer address nobody listens on: it claims the free slot as a learner
    // and opens its replica, which the range's leader cannot fill.
    let x_spec = c.nodes[2].clone();
    let nowhere = free_addr().expect("a free port");
    let first = node_command(&NodeCommand {
        exe: &exe,
        data_dir: &x_spec.data_dir,
        client: x_spec.client,
        peer: x_spec.peer,
        advertise_peer: Some(nowhere),
        admin: Some(x_spec.admin),
        seeds: &c.seeds,
        zone: "zone-2".into(),
        secret: &c.secret,
        flags: &c.extra,
    })
    .expect("command")
    .spawn()
    .expect("start X");
    let first = Own(first);
    let addr = c.clients([2])[0];
    let x = wait_for(LONG, || async {
        let s = cl.status().await.ok()?;
        let a = addr.to_string();
        s.nodes.iter().find(|n| n.client_addr == a).map(|n| n.id)
    })
    .await
    .expect("X's node record");
    let replica_dir = x_spec.data_dir.join("ranges").join(range.to_string());
    let claimed = wait_for(LONG, || async {
        let learner = role(&cl, range, x).await == Some(meta::MemberRole::LEARNER);
        (learner && replica_dir.exists()).then_some(())
    })
    .await;
    assert!(
        claimed.is_some(),
        "X never claimed a slot and opened its replica"
    );
    drop(first);
    assert_eq!(
        role(&cl, range, x).await,
        Some(meta::MemberRole::LEARNER),
        "X was promoted although its leader could not reach it"
    );
    c.start(2).expect("restart X");

    // It rejoins: dropped from meta, out of the cell, forgotten, claimed again, promoted.
    let placed = wait_for(LONG, || async {
        let s = leader_status(&cl).await?;
        let r = s.ranges.iter().find(|r| r.id == range)?;
        (r.members.len() == 3
            && r.members.iter().all(|m| m.role == meta::MemberRole::VOTER)
            && r.members.iter().any(|m| m.node == x))
        .then_some(())
    })
    .await;
    let log = std::fs::read_to_string(cli::demo::log_path(&x_spec.data_dir)).unwrap_or_default();
    assert!(
        placed.is_some(),
        "range {range} never had 3 voters with X ({x}) among them; X's log {}",
        cli::demo::log_path(&x_spec.data_dir).display()
    );
    // A memory replica is lost at a restart once its raft log lives in memory too; while the
    // node's disk log keeps it, a learner that never received anything reopens empty instead
    // (nothing to lose). Either way it must rejoin; when it was lost, by the learner path.
    let lost = log.contains("range replica lost");
    eprintln!("X's replica lost at the restart: {lost}");
    assert!(
        !lost || log.contains("lost replica listed as a learner"),
        "X's replica was lost but X did not take the lost-learner path"
    );
    // Its own replica serves every value.
    for i in 0..KEYS {
        let key = format!("k{i:02}");
        assert!(
            served_by(&kv, key.as_bytes(), addr, &value(i)).await,
            "X's replica never served {key}"
        );
    }
    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("t87 took {:?}", t0.elapsed());
}
