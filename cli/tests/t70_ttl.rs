//! Range housekeeping end to end on three real nodes: the range leader's loop proposes
//! `Expire` (a key put with a TTL disappears and a watcher sees its delete) and `Compact` for
//! the collection's retention (a watch from revision 1 later gets a resync, also one of about
//! 7 MiB, paged by the node and stitched by the client); a memory-mode
//! replica lost in a restart leaves the range (demoted, taken out of the cell, then out of
//! meta) and rejoins it as a member that serves follower reads of the data.

mod common;

use std::time::{Duration, Instant};

use client::{ReadMode, WatchUpdate};
use common::*;
use proto::kvpb::EventType;
use proto::metapb::Persistence;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_and_retention_compaction_on_three_nodes() {
    let t0 = Instant::now();
    let (mut c, _dir, cl, _) = ready_cluster(3).await;

    // 1. TTL: no retention (history kept), a watcher of the key from before the put.
    let made = cl
        .create_collection(kv_spec("leases", Persistence::MEMORY, 64 << 20, 0))
        .await
        .expect("create");
    let leases = cl.kv("leases");
    first_put(&leases, b"plain", b"x").await;
    wait_placed(&cl, made.id, 3).await;
    let mut w = leases.watch(b"t1", 0).await.expect("watch");
    leases
        .put_with_ttl(b"t1", b"short-lived", Duration::from_millis(1500))
        .await
        .expect("TTL put");
    // The store hides an expired key from reads at once; the delete event proves the
    // leader's Expire entry removed it.
    let mut saw_put = false;
    let deleted = tokio::time::timeout(LONG, async {
        loop {
            match w.next().await.expect("watch") {
                WatchUpdate::Events(evs) => {
                    for e in evs {
                        assert_eq!(e.kv.key.as_ref(), b"t1");
                        match e.kind {
                            EventType::PUT => saw_put = true,
                            EventType::DELETE => return e.revision(),
                        }
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("no delete event for the TTL key");
    assert!(saw_put, "the TTL put was seen before its expiry");
    assert!(deleted > 0);
    assert_eq!(leases.get(b"t1").await.expect("get"), None);
    assert!(leases.get(b"plain").await.expect("get").is_some());

    // 2. Retention of 2 s: history of a few puts is compacted by the leader, so a watch from
    // revision 1 gets a resync carrying the current keys.
    cl.create_collection(kv_spec("recent", Persistence::MEMORY, 64 << 20, 2))
        .await
        .expect("create");
    let recent = cl.kv("recent");
    first_put(&recent, b"k0", b"x").await;
    for i in 1..5 {
        recent
            .put(format!("k{i}").as_bytes(), b"y")
            .await
            .expect("put");
    }
    let resync = cli::demo::wait_for(LONG, || async {
        let mut w = recent.watch_prefix(b"k", 1).await.ok()?;
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Ok(WatchUpdate::Resync { current, .. })) => Some(current),
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        }
    })
    .await
    .expect("a watch from revision 1 never got a resync");
    assert_eq!(resync.len(), 5, "the resync carries the current keys");

    // 3. A resync of about 7 MiB (several 1 MiB frames): the node pages it, the client
    // stitches the pages into one resync with every key and value, then resumes: a put made
    // after it is delivered exactly once.
    cl.create_collection(kv_spec("bigstate", Persistence::MEMORY, 64 << 20, 2))
        .await
        .expect("create");
    let big = cl.kv("bigstate");
    let value = |i: usize| {
        let mut v = format!("{i}-").into_bytes();
        v.resize(600 << 10, b'a' + i as u8);
        v
    };
    first_put(&big, b"b00", &value(0)).await;
    for i in 1..12 {
        put_acked(&big, format!("b{i:02}").as_bytes(), &value(i)).await;
    }
    let (mut w, current, next) = cli::demo::wait_for(LONG, || async {
        let mut w = big.watch_prefix(b"b", 1).await.ok()?;
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Ok(WatchUpdate::Resync {
                current,
                next_revision,
                ..
            })) => Some((w, current, next_revision)),
            other => {
                eprintln!("no resync yet: {:?}", other.map(|r| r.map(|_| ())));
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        }
    })
    .await
    .expect("a watch from revision 1 of ~7 MiB never got a resync");
    let got: Vec<(Vec<u8>, usize)> = current
        .iter()
        .map(|kv| (kv.key.to_vec(), kv.value.len()))
        .collect();
    let want: Vec<(Vec<u8>, usize)> = (0..12)
        .map(|i| (format!("b{i:02}").into_bytes(), 600 << 10))
        .collect();
    assert_eq!(got, want, "every key once, whole");
    for (i, kv) in current.iter().enumerate() {
        assert!(kv.value.as_ref() == value(i).as_slice(), "b{i:02}'s value");
    }
    let rev = big
        .put(b"b99", b"after")
        .await
        .expect("put after the resync");
    assert!(rev >= next);
    let mut after = Vec::new();
    while after.is_empty() {
        match tokio::time::timeout(LONG, w.next()).await {
            Ok(Ok(WatchUpdate::Events(evs))) => after.extend(evs),
            other => panic!("after the resync: {other:?}"),
        }
    }
    let keys: Vec<(Vec<u8>, u64)> = after
        .iter()
        .map(|e| (e.kv.key.to_vec(), e.revision()))
        .collect();
    assert_eq!(keys, vec![(b"b99".to_vec(), rev)], "the put after, once");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), w.next())
            .await
            .is_err(),
        "nothing else"
    );

    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("t70 took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_memory_replica_rejoins_as_a_member() {
    let t0 = Instant::now();
    let (mut c, _dir, cl, _) = ready_cluster(3).await;
    let made = cl
        .create_collection(kv_spec("cache", Persistence::MEMORY, 64 << 20, 0))
        .await
        .expect("create");
    let cache = cl.kv("cache");
    first_put(&cache, b"k0", b"v0").await;
    wait_placed(&cl, made.id, 3).await;
    for i in 1..20 {
        cache
            .put(format!("k{i}").as_bytes(), format!("v{i}").as_bytes())
            .await
            .expect("put");
    }
    // A memory range keeps its raft log in the node's volatile log store: the restarted node
    // finds only the range's `range.meta` and records the replica lost, creating no cell.
    let lost = 2;
    let addr = c.clients([lost])[0].to_string();
    assert!(
        c.terminate(lost, Duration::from_secs(15)),
        "node {lost} did not stop"
    );
    c.start(lost).expect("restart");
    // It is refused its cell, leaves the range (demoted, taken out of the cell, then out of
    // meta) and forgets its raft state and dir.
    let log_file = cli::demo::log_path(&c.nodes[lost].data_dir);
    let forgotten = cli::demo::wait_for(LONG, || async {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        (log.contains("range replica lost") && log.contains("lost replica forgotten")).then_some(())
    })
    .await;
    assert!(
        forgotten.is_some(),
        "node {lost} never forgot its lost replica"
    );
    assert!(
        wait_voter_again(&cl, made.id, &addr).await,
        "node {lost} never became a voter again"
    );
    // It serves follower reads of the data written before the restart.
    let f = client_of(&c, &[lost])
        .kv("cache")
        .with_reads(ReadMode::Follower);
    let served = cli::demo::wait_for(LONG, || async {
        // A follower read may lag (until the snapshot is installed it finds nothing).
        let s = f.get_served(b"k19").await.ok()?;
        (s.node.to_string() == addr).then_some(s.value).flatten()
    })
    .await
    .expect("no follower read of the data served by the rejoined node");
    assert_eq!(served.value.as_ref(), b"v19");
    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("t70 rejoin took {:?}", t0.elapsed());
}
