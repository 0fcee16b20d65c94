//! Range housekeeping end to end on three real nodes: the range leader's loop proposes
//! `Expire` (a key put with a TTL disappears and a watcher sees its delete) and `Compact` for
//! the collection's retention (a watch from revision 1 later gets a resync); a memory-mode
//! replica lost in a restart leaves the range (demoted, taken out of the cell, then out of
//! meta) and rejoins it as a member that serves follower reads of the data.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::{Conn, ReadMode, WatchUpdate};
use common::*;
use proto::clientpb::{ClientRequest, ClientResponse_oneof_kind, KvRequest};
use proto::kvpb::EventType;
use proto::metapb::{
    CollectionDescriptor, CollectionKind, Persistence, RangeDescriptor, ReplicationMode,
};

fn spec(name: &str, retention_secs: u64) -> CollectionDescriptor {
    let mut s = CollectionDescriptor::new();
    s.name = name.into();
    s.kind = CollectionKind::KV;
    s.persistence = Persistence::MEMORY;
    s.replication = ReplicationMode::CONSENSUS;
    s.replication_factor = 3;
    s.split_size = 64 << 20;
    s.retention_secs = retention_secs;
    s
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `kvpb.Command{put: Put{key, value, ttl_ms}}` in protobuf wire format. The client has no
/// TTL put and this crate does not depend on the protobuf runtime: fields 1 (put), and in
/// `Put` 1 (key), 2 (value), 3 (ttl_ms).
fn ttl_put_command(key: &[u8], value: &[u8], ttl_ms: u64) -> Vec<u8> {
    let mut put = vec![0x0a];
    varint(key.len() as u64, &mut put);
    put.extend_from_slice(key);
    put.push(0x12);
    varint(value.len() as u64, &mut put);
    put.extend_from_slice(value);
    put.push(0x18);
    varint(ttl_ms, &mut put);
    let mut cmd = vec![0x0a];
    varint(put.len() as u64, &mut cmd);
    cmd.extend_from_slice(&put);
    cmd
}

/// Send a TTL put of `key` (collection-relative) to the range's leader: try each member
/// until one serves it.
async fn ttl_put(range: &RangeDescriptor, prefix: &[u8], key: &[u8], ttl_ms: u64) {
    let mut full = prefix.to_vec();
    full.extend_from_slice(key);
    let command = ttl_put_command(&full, b"short-lived", ttl_ms);
    let served = cli::demo::wait_for(LONG, || async {
        for m in range.members.iter() {
            let Ok(addr) = m.client_addr.parse::<SocketAddr>() else {
                continue;
            };
            let Ok(conn) = Conn::connect(addr, Duration::from_secs(5)).await else {
                continue;
            };
            let mut req = ClientRequest::new();
            let mut k = KvRequest::new();
            k.range = range.id;
            k.epoch = range.epoch;
            k.command = command.clone().into();
            req.set_kv(k);
            if let Ok(ClientResponse_oneof_kind::kv(_)) = conn.call(req).await {
                return Some(());
            }
        }
        None
    })
    .await;
    assert!(served.is_some(), "no member served the TTL put");
}

/// The range of collection `id` once it has three voters.
async fn placed(cl: &client::Client, id: u64) -> RangeDescriptor {
    cli::demo::wait_for(LONG, || async {
        let s = cl.status().await.ok()?;
        let r = s.ranges.iter().find(|r| r.collection == id)?.clone();
        (r.members.len() == 3 && r.members.iter().all(|m| m.role == meta::MemberRole::VOTER))
            .then_some(r)
    })
    .await
    .expect("range never got 3 voters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_and_retention_compaction_on_three_nodes() {
    let t0 = Instant::now();
    let (mut c, _dir) = cluster(3);
    create_meta(&c, 0).await;
    let cl = client(&c);
    wait_voters(&cl, 3, LONG).await;

    // 1. TTL: no retention (history kept), a watcher of the key from before the put.
    let made = cl
        .create_collection(spec("leases", 0))
        .await
        .expect("create");
    let leases = cl.kv("leases");
    let first = cli::demo::wait_for(LONG, || async { leases.put(b"plain", b"x").await.ok() }).await;
    assert!(first.is_some(), "no put succeeded on the new collection");
    let range = placed(&cl, made.id).await;
    let mut w = leases.watch(b"t1", 0).await.expect("watch");
    ttl_put(&range, &made.prefix, b"t1", 1500).await;
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
    cl.create_collection(spec("recent", 2))
        .await
        .expect("create");
    let recent = cl.kv("recent");
    let first = cli::demo::wait_for(LONG, || async { recent.put(b"k0", b"x").await.ok() }).await;
    assert!(first.is_some(), "no put succeeded on the new collection");
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

    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("t70 took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_memory_replica_rejoins_as_a_member() {
    let t0 = Instant::now();
    let (mut c, _dir) = cluster(3);
    create_meta(&c, 0).await;
    let cl = client(&c);
    wait_voters(&cl, 3, LONG).await;
    let made = cl
        .create_collection(spec("cache", 0))
        .await
        .expect("create");
    let cache = cl.kv("cache");
    let first = cli::demo::wait_for(LONG, || async { cache.put(b"k0", b"v0").await.ok() }).await;
    assert!(first.is_some(), "no put succeeded on the new collection");
    placed(&cl, made.id).await;
    for i in 1..20 {
        cache
            .put(format!("k{i}").as_bytes(), format!("v{i}").as_bytes())
            .await
            .expect("put");
    }
    // A graceful stop compacts every range's raft log: the restarted memory replica (empty)
    // is behind the log's first index and is refused (NeedsSnapshot).
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
    let member_again = cli::demo::wait_for(LONG, || async {
        let s = cl.status().await.ok()?;
        let r = s.ranges.iter().find(|r| r.collection == made.id)?;
        (r.members.len() == 3
            && r.members.iter().all(|m| m.role == meta::MemberRole::VOTER)
            && r.members.iter().any(|m| m.client_addr == addr))
        .then_some(())
    })
    .await;
    assert!(
        member_again.is_some(),
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
