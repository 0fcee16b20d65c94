//! Watch: every change exactly once and in order from any start revision (history and live
//! watchers), history rebuilt after reopen and storage compaction, and a compacted start
//! answered with the current state plus a resume revision.

mod common;

use std::time::Duration;

use collections::kv::{cmd, KeyRange, WatchBatch, WatchUpdate};
use common::*;
use proptest::prelude::*;

fn expected(model: &Model, from: u64, range: &KeyRange) -> Vec<collections::kv::Event> {
    model
        .events_sorted()
        .into_iter()
        .filter(|e| e.revision() >= from && range.contains(&e.kv.key))
        .collect()
}

fn history(
    store: &collections::kv::KvStore,
    from: u64,
    range: &KeyRange,
    limit: usize,
) -> Vec<collections::kv::Event> {
    let mut out = Vec::new();
    let mut next = from;
    for _ in 0..10_000 {
        match store
            .events_since(next, range, limit, 0)
            .expect("events_since")
        {
            WatchBatch::Events {
                events,
                next_revision,
            } => {
                assert!(next_revision > next || events.is_empty());
                let done = events.is_empty() && next_revision == store.revision() + 1;
                out.extend(events);
                next = next_revision;
                if done || next > store.revision() {
                    return out;
                }
            }
            WatchBatch::Resync { .. } => panic!("unexpected resync from {next}"),
        }
    }
    panic!("history paging did not end");
}

fn check_history(store: &collections::kv::KvStore, model: &Model) {
    let ranges = [
        KeyRange::all(),
        KeyRange::prefix(&b"kb"[..]),
        KeyRange {
            start: bytes::Bytes::from_static(b"kc"),
            end: Some(bytes::Bytes::from_static(b"kf")),
        },
    ];
    for from in 1..=model.revision + 1 {
        if from <= model.compact {
            match store.events_since(from, &ranges[1], 0, 0).expect("events") {
                WatchBatch::Resync {
                    current,
                    next_revision,
                } => {
                    let want: Vec<_> = model
                        .visible(0)
                        .into_iter()
                        .filter(|kv| ranges[1].contains(&kv.key))
                        .collect();
                    assert_eq!(current, want);
                    assert_eq!(next_revision, model.revision + 1);
                }
                other => panic!("from {from} at or below the horizon: {other:?}"),
            }
            continue;
        }
        for (i, range) in ranges.iter().enumerate() {
            let limit = if i == 0 { 0 } else { 2 };
            assert_eq!(
                history(store, from, range, limit),
                expected(model, from, range),
                "from {from} range {range:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn history_is_every_change_once_in_order(ops in proptest::collection::vec(op_strategy(0), 1..80), mode in 0usize..3) {
        let mode = MODES[mode];
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(mode, dir.path());
        let mut model = Model::default();
        let half = ops.len() / 2;
        for (i, op) in ops.iter().enumerate() {
            step(&mut store, &mut model, op, 4);
            if i == half && mode != Mode::Memory {
                store.persist().expect("persist");
                store.compact_storage().expect("compact");
                drop(store);
                store = open(mode, dir.path());
            }
        }
        check_history(&store, &model);
    }
}

#[test]
fn compacted_start_gets_current_state_and_resume_revision() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(mode, dir.path());
        let mut model = Model::default();
        for i in 0..10u8 {
            step(&mut store, &mut model, &Op::Put(i, i, 0), 4);
        }
        step(&mut store, &mut model, &Op::Delete(0), 4);
        apply(&mut store, 0, &cmd::compact(6));
        assert!(matches!(
            result(&apply(&mut store, 0, &cmd::compact(99))),
            proto::kvpb::Response_oneof_result::error(_)
        ));
        // Revision 6 is gone; 7 is the first watchable one.
        match store
            .events_since(6, &KeyRange::all(), 0, 0)
            .expect("events")
        {
            WatchBatch::Resync {
                current,
                next_revision,
            } => {
                assert_eq!(current, model.visible(0));
                assert_eq!(next_revision, model.revision + 1);
            }
            other => panic!("{other:?}"),
        }
        match store
            .events_since(7, &KeyRange::all(), 0, 0)
            .expect("events")
        {
            WatchBatch::Events {
                events,
                next_revision,
            } => {
                assert_eq!(events, expected(&model, 7, &KeyRange::all()));
                assert_eq!(next_revision, model.revision + 1);
            }
            other => panic!("{other:?}"),
        }
        if mode != Mode::Memory {
            store.persist().expect("persist");
            drop(store);
            let store = open(mode, dir.path());
            assert!(matches!(
                store.events_since(6, &KeyRange::all(), 0, 0),
                Ok(WatchBatch::Resync { .. })
            ));
            assert_eq!(
                history(&store, 7, &KeyRange::all(), 0),
                expected(&model, 7, &KeyRange::all())
            );
        }
    }
}

#[test]
fn history_cap_compacts_whole_revisions_deterministically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(Mode::Memory, dir.path());
    cfg.history_max_events = 5;
    let mut store = collections::kv::KvStore::open(cfg).expect("open");
    let mut model = Model::default();
    for i in 0..8u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 4);
    }
    // A range delete of 8 keys is one revision with 8 events: the cap keeps it whole.
    step(&mut store, &mut model, &Op::DeleteRange(0, 7), 4);
    let stats = store.range_stats();
    assert_eq!(stats.compact_revision, 8);
    assert_eq!(stats.history_events, 7); // [ka, kh): 7 keys
    assert_eq!(
        history(&store, 9, &KeyRange::all(), 0),
        expected(&model, 9, &KeyRange::all())
    );
}

/// A watcher polling from another thread while commands are applied sees exactly the model's
/// events from its start revision, also when its subscription overflows (capacity 1) and it
/// has to catch up from history.
#[test]
fn live_watchers_see_every_change_once() {
    for (mode, capacity) in [
        (Mode::Memory, 1024),
        (Mode::Memory, 1),
        (Mode::Persistent, 1),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(mode, dir.path());
        cfg.subscriber_capacity = capacity;
        let mut store = collections::kv::KvStore::open(cfg).expect("open");
        let mut model = Model::default();
        let pre: Vec<Op> = (0..20u8)
            .map(|i| Op::Put(i, i, if (i / 3) * 3 == i { 5 } else { 0 }))
            .collect();
        for op in &pre {
            step(&mut store, &mut model, op, 4);
        }
        let starts = [0u64, 1, 7, model.revision + 1];
        let handles: Vec<_> = starts
            .iter()
            .map(|&start| {
                let reader = store.reader();
                let range = if start == 7 {
                    KeyRange::prefix(&b"kc"[..])
                } else {
                    KeyRange::all()
                };
                let from = if start == 0 {
                    reader.revision() + 1
                } else {
                    start
                };
                let mut w = reader.watch(range.clone(), start);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    while std::time::Instant::now() < deadline {
                        match w.poll(Duration::from_millis(50), 0).expect("poll") {
                            Some(WatchUpdate::Events(ev)) => got.extend(ev),
                            Some(WatchUpdate::Resync { .. }) => panic!("unexpected resync"),
                            None => {
                                if w.next_revision() > reader.revision() && reader.revision() >= 400
                                {
                                    break;
                                }
                            }
                        }
                    }
                    (from, range, got)
                })
            })
            .collect();
        let mut rng = 12345u64;
        while model.revision < 400 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = (rng >> 33) as u8;
            let op = match (rng >> 40) % 6 {
                0 => Op::Delete(k),
                1 => Op::Tick(7),
                2 => Op::Expire,
                3 => Op::Batch(vec![(k, 1), (k.wrapping_add(1), 2)]),
                _ => Op::Put(k, (rng >> 48) as u8, if k & 3 == 0 { 10 } else { 0 }),
            };
            step(&mut store, &mut model, &op, 4);
        }
        for h in handles {
            let (from, range, got) = h.join().expect("watcher thread");
            let want = expected(&model, from, &range);
            if got != want {
                let i = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
                panic!(
                    "mode {mode:?} capacity {capacity} from {from}: {} events, want {}; \
                     first difference at {i}: {:?} vs {:?}",
                    got.len(),
                    want.len(),
                    got.get(i),
                    want.get(i)
                );
            }
        }
    }
}

#[test]
fn watcher_behind_the_horizon_resyncs_then_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Memory, dir.path());
    let mut model = Model::default();
    for i in 0..10u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 4);
    }
    apply(&mut store, 0, &cmd::compact(5));
    let mut w = store.watch(KeyRange::all(), 2);
    match w.poll(Duration::from_millis(10), 0).expect("poll") {
        Some(WatchUpdate::Resync {
            current,
            next_revision,
        }) => {
            assert_eq!(current, model.visible(0));
            assert_eq!(next_revision, 11);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.poll(Duration::from_millis(10), 0).expect("poll"), None);
    step(&mut store, &mut model, &Op::Put(1, 9, 0), 4);
    match w.poll(Duration::from_millis(10), 0).expect("poll") {
        Some(WatchUpdate::Events(ev)) => assert_eq!(ev, expected(&model, 11, &KeyRange::all())),
        other => panic!("{other:?}"),
    }
}

#[test]
fn history_byte_cap_bounds_retained_values() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(mode, dir.path());
        cfg.history_max_bytes = 10_000;
        let mut store = collections::kv::KvStore::open(cfg.clone()).expect("open");
        let mut model = Model::default();
        for i in 0..40u8 {
            // ~1 KiB values: at most ~10 revisions of history survive.
            step(&mut store, &mut model, &Op::Put(i, i, 0), 1000);
        }
        let stats = store.range_stats();
        assert!(stats.history_events <= 10, "{stats:?}");
        assert_eq!(
            stats.compact_revision + stats.history_events,
            model.revision
        );
        let from = stats.compact_revision + 1;
        assert_eq!(
            history(&store, from, &KeyRange::all(), 0),
            expected(&model, from, &KeyRange::all())
        );
        if mode != Mode::Memory {
            store.persist().expect("persist");
            drop(store);
            let store = collections::kv::KvStore::open(cfg).expect("reopen");
            assert_eq!(store.range_stats().compact_revision, stats.compact_revision);
            assert_eq!(
                history(&store, from, &KeyRange::all(), 0),
                expected(&model, from, &KeyRange::all())
            );
        }
    }
}
