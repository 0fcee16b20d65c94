//! Nine real nodes assemble themselves: meta reaches 7 voters on 7 distinct nodes, survives
//! losing 3 of them (and then its leader), refills from the remaining nodes, and a killed
//! node rejoins from its data dir. A second create-meta is refused anywhere.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_nodes_meta_rf7_survives_kills_and_refills() {
    let t0 = Instant::now();
    let (mut c, _dir) = cluster(9);
    let cl = client(&c);

    // Before meta exists: a clear error.
    let e = cli::demo::wait_for(Duration::from_secs(20), || async {
        match cl.status().await {
            Err(client::ClientError::NoMeta) => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        e.is_some(),
        "client requests before create-meta must get NoMeta"
    );

    create_meta(&c, 0).await;
    let voters = wait_voters(&cl, 7, LONG).await;
    assert_eq!(
        voters.iter().collect::<HashSet<_>>().len(),
        7,
        "7 distinct nodes"
    );
    eprintln!("7 voters after {:?}", t0.elapsed());

    // A second create-meta: refused on the same seed and on another node.
    for i in [0, 4] {
        let r = c.create_meta(i).await;
        let msg = r
            .expect_err("second create-meta must be refused")
            .to_string();
        assert!(msg.contains("already exists"), "{msg}");
    }

    // Kill 3 of the 7 members (not the leader).
    let s = leader_status(&cl).await.expect("leader status");
    let leader = s.meta_leader;
    let victims: Vec<u64> = voters
        .iter()
        .copied()
        .filter(|v| *v != leader)
        .take(3)
        .collect();
    let killed: Vec<usize> = victims.iter().map(|v| index_of(&c, &s, *v)).collect();
    for i in &killed {
        c.kill(*i);
    }
    let alive: Vec<usize> = (0..9).filter(|i| !killed.contains(i)).collect();
    let cl = client_of(&c, &alive);
    // Readable and writable with 4 of 7.
    write_read(&cl, "after-kill", "v1", Duration::from_secs(30)).await;
    // The dead are removed and the 2 spare nodes join: 6 voters, all alive.
    let six = wait_voters(&cl, 6, LONG).await;
    assert!(victims.iter().all(|v| !six.contains(v)));
    eprintln!("refilled to 6 after {:?}", t0.elapsed());

    // Restart a killed node: same node id from its data dir, and it fills the 7th slot.
    c.start(killed[0]).expect("restart");
    let seven = wait_voters(&cl, 7, LONG).await;
    assert!(
        seven.contains(&victims[0]),
        "restarted node {} rejoined with its id",
        victims[0]
    );
    eprintln!("back to 7 after {:?}", t0.elapsed());

    // Kill the meta leader: a new one serves within a few election timeouts.
    let s = leader_status(&cl).await.expect("leader status");
    let li = index_of(&c, &s, s.meta_leader);
    c.kill(li);
    let started = Instant::now();
    let rest: Vec<usize> = (0..9)
        .filter(|i| !killed.contains(i) || *i == killed[0])
        .filter(|i| *i != li)
        .collect();
    let cl = client_of(&c, &rest);
    write_read(&cl, "after-leader-kill", "v2", Duration::from_secs(30)).await;
    let took = started.elapsed();
    eprintln!("new leader served after {took:?}");
    // Election timeout is 0.5 s here; allow generous slack for 2 shared cores.
    assert!(took < Duration::from_secs(15), "new leader took {took:?}");
    let s = leader_status(&cl).await.expect("leader status");
    assert_ne!(s.meta_leader, 0);
    eprintln!("total {:?}", t0.elapsed());
}
