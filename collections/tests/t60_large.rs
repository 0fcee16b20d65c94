//! Persistent mode beyond memory (scaffold): values live in the data log only (the index and
//! the history hold positions, no values), are read back from disk, and compaction reclaims
//! overwritten versions. The RSS-against-data-size measurement belongs in a bench.

mod common;

use std::time::Duration;

use collections::kv::{cmd, KeyRange, KvStore, ScanRequest};
use common::*;

fn value(i: u32, round: u32) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; 16 << 10];
    v[..4].copy_from_slice(&i.to_le_bytes());
    v[4..8].copy_from_slice(&round.to_le_bytes());
    v
}

#[test]
fn values_stay_on_disk_and_compaction_reclaims_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Persistent, dir.path());
    let n = 200u32; // 200 x 16 KiB = 3.2 MiB per round, ~13 segments of 256 KiB
    for round in 0..3u32 {
        for i in 0..n {
            let k = format!("key{i:05}");
            apply(&mut store, 0, &cmd::put(k.as_bytes(), &value(i, round), 0));
        }
    }
    assert_eq!(store.inline_value_bytes(), 0);
    let segs_before = store.segment_count();
    assert!(segs_before > 30, "{segs_before} segments");
    // Drop history, then compact: only the newest version per key survives.
    let rev = store.revision();
    apply(&mut store, 0, &cmd::compact(rev));
    let dropped = store.compact_storage().expect("compact");
    assert!(dropped > 0);
    let segs_after = store.segment_count();
    assert!(
        segs_after * 2 < segs_before,
        "{segs_before} -> {segs_after}"
    );
    assert_eq!(store.inline_value_bytes(), 0);
    let check = |store: &KvStore| {
        let kvs = store
            .scan_all(ScanRequest::range(KeyRange::prefix(&b"key"[..])), 0)
            .expect("scan");
        assert_eq!(kvs.len(), n as usize);
        for (i, kv) in kvs.iter().enumerate() {
            assert_eq!(kv.value.as_ref(), value(i as u32, 2).as_slice());
            assert_eq!(kv.version, 3);
        }
    };
    check(&store);
    store.persist().expect("persist");
    drop(store);
    let store = open(Mode::Persistent, dir.path());
    assert_eq!(store.inline_value_bytes(), 0);
    check(&store);
}

/// Readers run concurrently with apply and storage compaction: a reader whose record moved
/// retries and always sees a complete, current-or-newer value.
#[test]
fn reads_race_apply_and_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Persistent, dir.path());
    for i in 0..50u32 {
        apply(
            &mut store,
            0,
            &cmd::put(format!("k{i:03}").as_bytes(), &value(i, 0), 0),
        );
    }
    let reader = store.reader();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let mut reads = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            for i in (0..50u32).step_by(7) {
                let (kv, _) = reader.get(format!("k{i:03}").as_bytes(), 0).expect("get");
                let kv = kv.expect("present");
                assert_eq!(&kv.value[..4], &i.to_le_bytes());
                assert_eq!(kv.value.len(), 16 << 10);
                reads += 1;
            }
            let page = reader
                .scan(
                    &ScanRequest {
                        limit: 10,
                        ..ScanRequest::range(KeyRange::all())
                    },
                    0,
                )
                .expect("scan");
            assert_eq!(page.kvs.len(), 10);
        }
        reads
    });
    for round in 1..20u32 {
        for i in 0..50u32 {
            apply(
                &mut store,
                0,
                &cmd::put(format!("k{i:03}").as_bytes(), &value(i, round), 0),
            );
        }
        let rev = store.revision();
        apply(&mut store, 0, &cmd::compact(rev));
        store.maybe_compact().expect("compact");
    }
    // 20 rounds x 50 x 16 KiB = 16 MiB written; compaction keeps the log near the live data.
    assert!(
        store.segment_count() < 24,
        "{} segments",
        store.segment_count()
    );
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = t.join().expect("reader");
    assert!(reads > 0);
}

/// A snapshot being streamed pins the data log: compaction waits, the snapshot stays readable.
#[test]
fn snapshots_pin_the_data_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Persistent, dir.path());
    for round in 0..4u32 {
        for i in 0..30u32 {
            apply(
                &mut store,
                0,
                &cmd::put(format!("k{i:03}").as_bytes(), &value(i, round), 0),
            );
        }
    }
    let rev = store.revision();
    apply(&mut store, 0, &cmd::compact(rev));
    let mut snap = store.snapshot();
    let first = snap.next_chunk(1000).expect("chunk").expect("some");
    assert_eq!(store.compact_storage().expect("compact"), 0);
    let mut image = first.to_vec();
    while let Some(c) = snap.next_chunk(1 << 16).expect("chunk") {
        image.extend_from_slice(&c);
    }
    drop(snap);
    assert!(store.compact_storage().expect("compact") > 0);
    assert_eq!(
        store.snapshot().to_bytes().expect("image").as_ref(),
        image.as_slice()
    );
}
