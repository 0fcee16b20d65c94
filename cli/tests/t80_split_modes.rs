//! Splits of the other modes: three real nodes and a `--persistence memory` collection, or a
//! `--replication async` (logged) one, with a 32 KiB split size, written by concurrent
//! writers of distinct keys until it has at least 3 ranges. Then:
//! meta's ranges tile the collection's keyspace with 3 voters each; every acknowledged key
//! reads back with its last acknowledged value (no node fails, so the async collection's
//! leaders stay up and keep what they acknowledged: a write racing a split is answered at
//! apply or settled, never acknowledged and then refused); a scan across all ranges equals
//! the model. In the async collection, compare-and-swap and delete report their outcome
//! (answered at apply), through the client and the CLI.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::Expect;
use common::*;

const WRITERS: usize = 3;
const KEYS: usize = 64;
const RANGES: usize = 3;

/// Loads `name` until it has `RANGES` ranges, then checks meta, every key and a scan.
async fn split_and_check(cl: client::Client, name: &'static str, coll: u64) {
    let t = Instant::now();
    let prefix = meta::keys::collection_prefix(coll);
    let kv = cl.kv(name);
    first_put(&kv, b"a-first", b"1").await;
    let model: Model = Arc::new(Mutex::new(BTreeMap::new()));
    model
        .lock()
        .unwrap()
        .insert(b"a-first".to_vec(), b"1".to_vec());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(overwriter(
                cl.kv(name),
                w,
                KEYS,
                model.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let split = cli::demo::wait_for(LONG, || async {
        let n = ranges_of(&cl, coll).await?.len();
        (n >= RANGES).then_some(n)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut puts = 0;
    for task in tasks {
        puts += task.await.expect("writer");
    }
    assert!(
        split.is_some(),
        "{name}: fewer than {RANGES} ranges after {LONG:?} of writes"
    );

    let seen = Mutex::new(Vec::new());
    let rs = cli::demo::wait_for(LONG, || async {
        let rs = ranges_of(&cl, coll).await?;
        *seen.lock().unwrap() = rs
            .iter()
            .map(|r| (r.id, r.lo.to_vec(), r.hi.to_vec(), r.members.len()))
            .collect();
        (rs.len() >= RANGES
            && tiles(&rs, &prefix)
            && rs.iter().all(|r| {
                r.members.len() == 3 && r.members.iter().all(|m| m.role == meta::MemberRole::VOTER)
            }))
        .then_some(rs)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{name}: meta never showed >= {RANGES} tiling ranges with 3 voters: {:?}",
            seen.lock().unwrap()
        )
    });

    let model = model.lock().unwrap().clone();
    for (k, v) in &model {
        let got = cli::demo::wait_for(LONG, || async { kv.get(k).await.ok() })
            .await
            .unwrap_or_else(|| panic!("{name}: get {} kept failing", String::from_utf8_lossy(k)))
            .unwrap_or_else(|| panic!("{name}: {} lost", String::from_utf8_lossy(k)));
        assert!(
            got.value.as_ref() == &v[..],
            "{name}: {} reads {:?}, last acknowledged {:?}",
            String::from_utf8_lossy(k),
            String::from_utf8_lossy(&got.value[..got.value.len().min(16)]),
            String::from_utf8_lossy(&v[..v.len().min(16)]),
        );
    }
    let all = cli::demo::wait_for(LONG, || async { kv.scan(b"", b"", 0).await.ok() })
        .await
        .expect("scan across ranges");
    let scanned: BTreeMap<Vec<u8>, Vec<u8>> = all
        .iter()
        .map(|kv| (kv.key.to_vec(), kv.value.to_vec()))
        .collect();
    assert_eq!(all.len(), scanned.len(), "{name}: a key scanned twice");
    assert!(scanned == model, "{name}: the scan differs from the model");
    eprintln!(
        "{name}: {puts} acknowledged puts of {} keys, {} ranges, checked in {:?}",
        model.len(),
        rs.len(),
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_collection_splits_without_losing_acknowledged_writes() {
    let t0 = Instant::now();
    let (mut c, _dir, cl, seeds) = ready_cluster(3).await;
    let mem = create_by_cli(
        &seeds,
        "mem",
        &["--split-size", "32KiB", "--persistence", "memory"],
    );
    split_and_check(cl, "mem", mem).await;
    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("memory: took {:?}", t0.elapsed());
}

/// Compare-and-swap and delete on async collection `name` (split into ranges by now) say
/// whether they succeeded, through the client and the CLI.
async fn cas_and_delete_report_their_outcome(cl: &client::Client, seeds: &str, name: &str) {
    let kv = cl.kv(name);
    let key = b"w1/cas";
    let r = kv
        .cas(key, Expect::Absent, Some(b"v1"))
        .await
        .expect("cas absent");
    assert!(r.succeeded, "{name}: cas on an absent key: {r:?}");
    assert!(r.revision > 0, "{r:?}");
    let r = kv
        .cas(key, Expect::Absent, Some(b"v2"))
        .await
        .expect("cas absent again");
    assert!(
        !r.succeeded,
        "{name}: cas expecting absent on a present key: {r:?}"
    );
    assert_eq!(
        r.current.as_ref().map(|c| c.value.to_vec()),
        Some(b"v1".to_vec())
    );
    let r = kv
        .cas(key, Expect::Value(b"v1".to_vec()), Some(b"v2"))
        .await
        .expect("cas value");
    assert!(r.succeeded, "{name}: {r:?}");
    let r = kv
        .cas(key, Expect::Value(b"v1".to_vec()), Some(b"v3"))
        .await
        .expect("cas stale value");
    assert!(!r.succeeded, "{name}: {r:?}");
    assert_eq!(
        r.current.as_ref().map(|c| c.value.to_vec()),
        Some(b"v2".to_vec())
    );
    let k = "w1/cas";
    let (ok, out, err) = quiver(&[
        "kv", "cas", name, k, "v4", "--expect", "v2", "--seeds", seeds,
    ]);
    assert!(ok && out.starts_with("OK"), "{name}: cli cas: {out}{err}");
    let (ok, _, err) = quiver(&[
        "kv", "cas", name, k, "v5", "--expect", "v2", "--seeds", seeds,
    ]);
    assert!(
        !ok && err.contains("compare failed"),
        "{name}: cli cas: {err}"
    );
    let got = kv.get(key).await.expect("get").expect("present");
    assert_eq!(got.value.as_ref(), b"v4");
    let (ok, out, err) = quiver(&["kv", "del", name, k, "--seeds", seeds]);
    assert!(ok && out.trim() == "deleted", "{name}: cli del: {out}{err}");
    let (ok, out, err) = quiver(&["kv", "del", name, k, "--seeds", seeds]);
    assert!(
        ok && out.trim() == "not found",
        "{name}: cli del again: {out}{err}"
    );
    assert!(
        !kv.delete(key).await.expect("delete"),
        "{name}: deleted twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_collection_splits_without_losing_acknowledged_writes() {
    let t0 = Instant::now();
    let (mut c, _dir, cl, seeds) = ready_cluster(3).await;
    let asy = create_by_cli(
        &seeds,
        "asy",
        &[
            "--split-size",
            "32KiB",
            "--persistence",
            "logged",
            "--replication",
            "async",
        ],
    );
    split_and_check(cl.clone(), "asy", asy).await;
    cas_and_delete_report_their_outcome(&cl, &seeds, "asy").await;
    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("async: took {:?}", t0.elapsed());
}
