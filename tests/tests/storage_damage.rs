//! Storage damage at the node level (`docs/design/log-format.md` §4): with the cluster stopped,
//! node T's raft log gets a torn write at the tail of its newest segment, and node F's gets a
//! bit flipped in a record below the durable mark. On restart:
//! - T cuts the torn tail, starts, and rejoins (its replica applies new writes);
//! - F refuses to start, with one error line naming the damaged record (`segment:offset`),
//!   instead of serving from a log with a hole;
//! - the cluster (every node but F) keeps every acknowledged write.
//!
//! Three nodes: L (the KV range's leader before the stop, undamaged), T and F. With F down,
//! the range and meta serve only if T recovered and rejoined (2 of 3 voters; the test waits for
//! the range to have its 3 voters before the load).
//!
//! A second test flips a bit in a follower's range image (`kv.snap`): the node runs, refuses
//! that replica (never serves it), and the replica leaves the range and rejoins by snapshot.
//! A third flips a bit in every replica's image: nothing can be served or taken out of the
//! cell, so no replica is forgotten and meta keeps one voter.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use quiver_tests::cluster::wait_for;
use quiver_tests::crash::{read_back, Load, Writes};
use quiver_tests::damage::{flip_below_mark, tear_tail};
use quiver_tests::ready_cluster;
use quiver_tests::workload::Target;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_recovers_and_a_flip_below_the_mark_is_refused() {
    let mut c = ready_cluster(3).await;
    let coll = "damage";
    assert!(
        c.create_collection(coll, 3, Duration::from_secs(90)).await,
        "{coll} does not serve with 3 voters; logs in {}",
        c.dir.display()
    );
    let writes = Arc::new(Mutex::new(Writes::default()));
    let load = Load::start_until_acked(
        c.client_addrs(),
        vec![coll.to_string()],
        8,
        "d",
        &writes,
        300,
    )
    .await;
    let (l, _) = c
        .range_leader(coll, b"k0")
        .await
        .expect("the range has a leader");
    let (t, f) = ((l + 1) % 3, (l + 2) % 3);
    // Stop the cluster in the middle of the load (kill -9), then damage the stopped files.
    c.kill_all();
    load.stop().await;
    let (torn_scan, torn_at) = tear_tail(&c.raft_dir(t)).expect("tear T's tail");
    let (flip_scan, flip_at) = flip_below_mark(&c.raft_dir(f)).expect("flip F's log");
    eprintln!(
        "L = node {l}; T = node {t}: torn record at {}:{torn_at} (mark {}, {} records); F = node {f}: bit flipped \
         in record {}:{flip_at} (mark {}, {} records)",
        torn_scan.number,
        torn_scan.mark,
        torn_scan.records.len(),
        flip_scan.number,
        flip_scan.mark,
        flip_scan.records.len()
    );
    c.revive_all();

    // F refuses to start, naming the damaged record.
    let status = c.wait_exit(f, Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(c.log(f)).unwrap_or_default();
    let last = log.lines().last().unwrap_or_default().to_string();
    let status = status.unwrap_or_else(|| {
        panic!(
            "node {f} started on a log with a flipped bit below its durable mark; log {}",
            c.log(f).display()
        )
    });
    eprintln!("F = node {f} exited ({status}): {last}");
    assert!(!status.success(), "node {f} exited successfully: {last}");
    let position = format!("{}:{flip_at}", flip_scan.number);
    assert!(
        last.to_ascii_lowercase().contains("corrupt") && last.contains(&position),
        "node {f}'s last line does not report the corrupt record {position}: {last}"
    );

    // The others serve, with every acknowledged write.
    assert!(
        c.wait_target(&Target::Collection(coll.into()), Duration::from_secs(90))
            .await
            .is_some(),
        "{coll} does not serve without node {f}; logs in {}",
        c.dir.display()
    );
    let w = writes.lock().clone();
    let r = read_back(c.client_addrs(), &w).await;
    eprintln!(
        "acknowledged={} unknown={} read_back={} missing={} wrong={} unread={} unknown_applied={}",
        w.acked.len(),
        w.unknown.len(),
        r.acked_checked,
        r.missing.len(),
        r.wrong.len(),
        r.unread.len(),
        r.unknown_applied
    );
    assert!(
        r.ok(),
        "acknowledged writes lost: missing {:?}, wrong {:?}, unread {:?}; logs in {}",
        r.missing.iter().take(5).collect::<Vec<_>>(),
        r.wrong.iter().take(5).collect::<Vec<_>>(),
        r.unread.iter().take(5).collect::<Vec<_>>(),
        c.dir.display()
    );

    // T rejoined: its own replica applies a write made after the restart.
    let cl = c.client(Duration::from_secs(2));
    let key = b"after-restart";
    let put = wait_for(Duration::from_secs(30), || {
        let kv = cl.kv(coll);
        async move { kv.put(key, b"yes").await.ok() }
    })
    .await;
    assert!(put.is_some(), "no write after the restart");
    let (cd, rd) = c.lookup(coll, key).await.expect("lookup");
    let last = Mutex::new(String::new());
    let seen = wait_for(Duration::from_secs(30), || {
        let (c, cd, rd, last) = (&c, &cd, &rd, &last);
        async move {
            let r = c.read_at(t, cd, rd, key, true).await;
            *last.lock() = format!("{r:?}");
            match r? {
                Ok(resp) if resp.get_get().has_kv() => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        seen.is_some(),
        "node {t} (torn tail) never applied a write made after the restart; last answer of its \
         replica: {}; log {}",
        last.lock(),
        c.log(t).display()
    );
}

/// A bit flipped in a follower's range image (`ranges/<id>/kv/kv.snap`, the store of a
/// `logged` collection, which replays the raft log after it). Node F must refuse the replica
/// (an error line naming the file), never serve it (every read at F's replica is refused until
/// F has forgotten it), and walk it out of the range and back in (`seed/src/loops.rs`,
/// `rejoin_lost`): out of meta, its raft state and dir forgotten, a slot claimed again as a
/// learner, filled by snapshot and promoted. The range ends with 3 voters, F among them; the
/// cluster keeps every acknowledged write, and F's own new replica serves each one exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flip_in_a_range_image_is_refused_and_the_replica_rejoins() {
    let mut c = ready_cluster(3).await;
    let coll = "datalog";
    assert!(c.create_collection(coll, 3, Duration::from_secs(90)).await);
    let writes = Arc::new(Mutex::new(Writes::default()));
    let load = Load::start_until_acked(
        c.client_addrs(),
        vec![coll.to_string()],
        8,
        "g",
        &writes,
        300,
    )
    .await;
    let (l, range) = c.range_leader(coll, b"k0").await.expect("range leader");
    let f = (l + 1) % 3;
    let f_id = c.nodes[f].id;
    c.kill_all();
    load.stop().await;
    // A `logged` store keeps its image in `kv.snap` and replays the raft log after it.
    let snap = c.nodes[f]
        .data_dir
        .join("ranges")
        .join(range.to_string())
        .join("kv")
        .join("kv.snap");
    let mut bytes =
        std::fs::read(&snap).unwrap_or_else(|e| panic!("range image {}: {e}", snap.display()));
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&snap, &bytes).expect("write the damaged image");
    eprintln!(
        "F = node {f} (id {f_id}): bit flipped at byte {at} of the {}-byte image of range {range}",
        bytes.len()
    );
    let w = writes.lock().clone();
    let probe = w.acked.first().expect("acknowledged writes").clone();
    let log_from = std::fs::metadata(c.log(f)).map(|m| m.len()).unwrap_or(0) as usize;
    let f_log = |c: &quiver_tests::cluster::Cluster| {
        let log = std::fs::read(c.log(f)).unwrap_or_default();
        String::from_utf8_lossy(log.get(log_from..).unwrap_or_default()).into_owned()
    };
    c.revive_all();

    // F refuses the replica, naming the damaged file.
    let name = snap.display().to_string();
    let refused = wait_for(Duration::from_secs(60), || {
        let log = f_log(&c);
        let name = &name;
        async move {
            log.lines()
                .find(|l| l.contains("damaged") && l.contains(name.as_str()))
                .map(str::to_string)
        }
    })
    .await;
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "node {f} never reported its damaged image {name}; log {}",
            c.log(f).display()
        )
    });
    eprintln!("F: {refused}");
    assert!(
        refused.to_ascii_lowercase().contains("checksum mismatch"),
        "the refusal does not say what is wrong: {refused}"
    );
    assert!(
        c.running(f),
        "node {f} exited instead of refusing one replica"
    );

    // Until F has forgotten the damaged replica, every read at its replica is refused; then it
    // rejoins: the range ends with 3 voters, F among them.
    let mut served_damaged = Vec::new();
    let (mut reads, mut forgotten) = (0usize, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let rejoined = loop {
        if let Some((cd, rd)) = c.lookup(coll, probe.key.as_bytes()).await {
            let answer = c.read_at(f, &cd, &rd, probe.key.as_bytes(), true).await;
            reads += 1;
            // Read after the answer: the line is written before self-assignment may claim a
            // new slot, so an answer from before it came from the damaged replica.
            if !forgotten {
                forgotten = f_log(&c).contains("lost replica forgotten");
            }
            if let Some(Ok(resp)) = answer {
                if !forgotten {
                    served_damaged.push(format!("{resp:?}"));
                }
            }
            let voters = rd
                .members
                .iter()
                .filter(|m| m.role == proto::metapb::MemberRole::VOTER)
                .count();
            if forgotten && voters == 3 && rd.members.iter().any(|m| m.node == f_id) {
                break Some(rd);
            }
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        served_damaged.is_empty(),
        "node {f} served its damaged replica ({} answers, first {:?}); log {}",
        served_damaged.len(),
        served_damaged.first(),
        c.log(f).display()
    );
    let state = match &rejoined {
        Some(_) => String::new(),
        None => c.membership_state(Some(coll)).await,
    };
    let rd = rejoined.unwrap_or_else(|| {
        panic!(
            "node {f} did not leave and rejoin the range as a voter (forgotten: {forgotten}); {}; \
             log {}",
            state,
            c.log(f).display()
        )
    });
    eprintln!(
        "F's damaged replica refused for {reads} reads; range {} epoch {} has 3 voters again",
        rd.id, rd.epoch
    );

    // Every acknowledged write is served by the cluster.
    let r = read_back(c.client_addrs(), &w).await;
    assert!(
        r.ok(),
        "acknowledged writes lost: {} missing, {} wrong, {} unread; logs in {}",
        r.missing.len(),
        r.wrong.len(),
        r.unread.len(),
        c.dir.display()
    );
    // F's new replica, once it applied a write made now, serves every acknowledged write.
    let cl = c.client(Duration::from_secs(2));
    let marker = b"after-rejoin";
    assert!(
        wait_for(Duration::from_secs(30), || {
            let kv = cl.kv(coll);
            async move { kv.put(marker, b"m").await.ok() }
        })
        .await
        .is_some(),
        "no write after the rejoin"
    );
    // The collection has one range: one lookup serves every key.
    let (cd, rd) = c.lookup(coll, marker).await.expect("lookup");
    let caught_up = wait_for(Duration::from_secs(30), || {
        let (c, cd, rd) = (&c, &cd, &rd);
        async move {
            match c.read_at(f, cd, rd, marker, true).await? {
                Ok(resp) if resp.get_get().has_kv() => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        caught_up.is_some(),
        "node {f}'s new replica never applied a write made after the rejoin; log {}",
        c.log(f).display()
    );
    let mut bad = Vec::new();
    for x in &w.acked {
        match c.read_at(f, &cd, &rd, x.key.as_bytes(), true).await {
            Some(Ok(resp))
                if resp.get_get().has_kv()
                    && resp.get_get().get_kv().value.as_ref() == x.value.as_bytes() => {}
            other => bad.push((x.key.clone(), format!("{other:?}"))),
        }
    }
    assert!(
        bad.is_empty(),
        "node {f}'s new replica does not serve {} of {} acknowledged writes (first {:?}); logs in \
         {}",
        bad.len(),
        w.acked.len(),
        bad.first(),
        c.dir.display()
    );
    eprintln!(
        "F's new replica serves all {} acknowledged writes",
        w.acked.len()
    );
}

/// Every replica's range image damaged (a bit flipped in `kv.snap` on all three nodes): no
/// replica can be served and no leader can take one out of the cell, so none is forgotten.
/// Each node refuses its replica; the lost voters ask meta to demote them until meta lists one
/// voter, which keeps its role ("the range's only voter in meta: kept"); every range dir, the
/// damaged image in it, stays on disk for an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_range_image_damaged_keeps_every_replica() {
    let mut c = ready_cluster(3).await;
    let coll = "alldamaged";
    assert!(c.create_collection(coll, 3, Duration::from_secs(90)).await);
    let writes = Arc::new(Mutex::new(Writes::default()));
    let load = Load::start_until_acked(
        c.client_addrs(),
        vec![coll.to_string()],
        4,
        "a",
        &writes,
        50,
    )
    .await;
    let (_, range) = c.range_leader(coll, b"k0").await.expect("range leader");
    c.kill_all();
    load.stop().await;
    let snaps: Vec<_> = (0..3)
        .map(|i| {
            c.nodes[i]
                .data_dir
                .join("ranges")
                .join(range.to_string())
                .join("kv")
                .join("kv.snap")
        })
        .collect();
    for snap in &snaps {
        let mut bytes =
            std::fs::read(snap).unwrap_or_else(|e| panic!("range image {}: {e}", snap.display()));
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(snap, &bytes).expect("write the damaged image");
    }
    let from: Vec<usize> = (0..3)
        .map(|i| std::fs::metadata(c.log(i)).map(|m| m.len()).unwrap_or(0) as usize)
        .collect();
    let log_of = |c: &quiver_tests::cluster::Cluster, i: usize| {
        let log = std::fs::read(c.log(i)).unwrap_or_default();
        String::from_utf8_lossy(log.get(from[i]..).unwrap_or_default()).into_owned()
    };
    c.revive_all();
    let kept = wait_for(Duration::from_secs(60), || {
        let logs: Vec<String> = (0..3).map(|i| log_of(&c, i)).collect();
        async move {
            let refused = logs.iter().all(|l| l.contains("stored image is damaged"));
            let kept = logs
                .iter()
                .position(|l| l.contains("the range's only voter in meta: kept"));
            kept.filter(|_| refused)
        }
    })
    .await;
    let kept = kept.unwrap_or_else(|| {
        panic!(
            "the nodes did not all refuse their damaged replica, or none kept its voter role; \
             logs in {}",
            c.dir.display()
        )
    });
    // Meta (as every node sees it, once their views caught up) lists the three members, one
    // of them, the one kept, as the only voter.
    let kept_id = c.nodes[kept].id;
    let voters_of = |rd: &proto::metapb::RangeDescriptor| -> Vec<u64> {
        rd.members
            .iter()
            .filter(|m| m.role == proto::metapb::MemberRole::VOTER)
            .map(|m| m.node)
            .collect()
    };
    let rd = wait_for(Duration::from_secs(30), || async {
        let (_, rd) = c.lookup(coll, b"k0").await?;
        (voters_of(&rd) == vec![kept_id] && rd.members.len() == 3).then_some(rd)
    })
    .await;
    let state = c.membership_state(Some(coll)).await;
    let rd = rd.unwrap_or_else(|| {
        panic!("meta does not list the 3 members with node {kept} the only voter: {state}")
    });
    eprintln!(
        "node {kept} kept its voter role; range {} epoch {} voters {:?}, {} members",
        rd.id,
        rd.epoch,
        voters_of(&rd),
        rd.members.len()
    );
    for (i, snap) in snaps.iter().enumerate() {
        assert!(
            !log_of(&c, i).contains("lost replica forgotten"),
            "node {i} forgot a replica no healthy one holds; log {}",
            c.log(i).display()
        );
        assert!(
            snap.exists(),
            "node {i}'s damaged image {} was deleted",
            snap.display()
        );
    }
}
