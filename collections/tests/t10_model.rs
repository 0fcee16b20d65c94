//! Model test: every persistence mode against a plain `BTreeMap` model (put, delete, range
//! delete, cas on value/version/mod_revision/absence, batch, TTL with the entry clock,
//! expire, get, scan), with reopen/recover for logged and persistent mode and storage
//! compaction for persistent mode.

mod common;

use common::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    /// Persist, drop, reopen (memory mode: skipped).
    Reopen,
    /// Persistent mode: compact the data log.
    CompactStorage,
    /// Compare a paged scan (limit / byte bound) with the model.
    Scan(usize, usize),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            20 => op_strategy(0).prop_map(Step::Op),
            1 => Just(Step::Reopen),
            1 => Just(Step::CompactStorage),
            2 => (0usize..4, 0usize..3000).prop_map(|(l, b)| Step::Scan(l, b)),
        ],
        1..120,
    )
}

fn check_all(store: &collections::kv::KvStore, model: &Model) {
    assert_eq!(all(store, model.clock), model.visible(model.clock));
    assert_eq!(store.revision(), model.revision);
}

fn run(mode: Mode, steps: &[Step], vlen: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(mode, dir.path());
    let mut model = Model::default();
    for s in steps {
        match s {
            Step::Op(op) => step(&mut store, &mut model, op, vlen),
            Step::Reopen => {
                if mode == Mode::Memory {
                    continue;
                }
                let durable = store.persist().expect("persist");
                assert_eq!(durable, store.apply_state());
                drop(store);
                store = open(mode, dir.path());
                assert_eq!(store.apply_state(), durable);
            }
            Step::CompactStorage => {
                store.compact_storage().expect("compact");
            }
            Step::Scan(limit, max_bytes) => {
                let mut req = collections::kv::ScanRequest::range(collections::kv::KeyRange::all());
                req.limit = *limit;
                req.max_bytes = *max_bytes;
                let mut got = Vec::new();
                let mut pages = 0;
                loop {
                    let page = store.scan(&req, model.clock).expect("scan");
                    assert!(!page.kvs.is_empty() || page.next_key.is_none());
                    if *limit > 0 {
                        assert!(page.kvs.len() <= *limit);
                    }
                    got.extend(page.kvs);
                    pages += 1;
                    assert!(pages < 1000);
                    match page.next_key {
                        Some(k) => req.range.start = k,
                        None => break,
                    }
                }
                assert_eq!(got, model.visible(model.clock));
            }
        }
        if mode == Mode::Persistent {
            assert_eq!(
                store.inline_value_bytes(),
                0,
                "persistent index holds values"
            );
        }
    }
    check_all(&store, &model);
    if mode != Mode::Memory {
        store.persist().expect("persist");
        drop(store);
        let store = open(mode, dir.path());
        check_all(&store, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn memory_matches_model(s in steps()) {
        run(Mode::Memory, &s, 8);
    }

    #[test]
    fn logged_matches_model(s in steps()) {
        run(Mode::Logged, &s, 8);
    }

    #[test]
    fn persistent_matches_model(s in steps()) {
        run(Mode::Persistent, &s, 8);
    }

    /// Values big enough (20 KiB) that the data log rolls segments and compaction drops them.
    #[test]
    fn persistent_with_big_values_matches_model(s in steps()) {
        run(Mode::Persistent, &s, 20 << 10);
    }
}
