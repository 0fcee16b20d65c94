//! Determinism and snapshots: replicas in different persistence modes fed the same entries
//! produce byte-identical snapshot images; an image restored (in chunks of any size) into any
//! mode gives the same image back and the same reads; garbage chunks are refused; a snapshot
//! read while the store keeps changing (writes, history trims, compactions, persists, a
//! restore) is the image of the store when it was taken.

mod common;

use collections::kv::{KvStore, Restorer};
use collections::KvError;
use common::*;
use proptest::prelude::*;

fn image(store: &KvStore) -> bytes::Bytes {
    store.snapshot().to_bytes().expect("snapshot")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn replicas_produce_identical_snapshots(ops in proptest::collection::vec(op_strategy(0), 1..100), chunk in 1usize..2000) {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
        let mut stores: Vec<KvStore> = MODES.iter().zip(&dirs).map(|(m, d)| open(*m, d.path())).collect();
        let mut models = vec![Model::default(); 3];
        for op in &ops {
            for (s, m) in stores.iter_mut().zip(models.iter_mut()) {
                step(s, m, op, 6);
            }
        }
        let img = image(&stores[0]);
        for s in &stores[1..] {
            prop_assert_eq!(&image(s), &img);
        }
        // Restore the persistent replica's image, streamed in chunks, into every mode.
        for mode in MODES {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut target = open(mode, dir.path());
            // Something to overwrite.
            step(&mut target, &mut Model::default(), &Op::Put(1, 1, 0), 6);
            let applied = if chunk % 2 == 0 {
                restore_in_chunks(&mut target, &stores[2], chunk)
            } else {
                let mut reader = stores[2].snapshot();
                // Streamed: persistent mode spills each chunk to its data log.
                let chunks = std::iter::from_fn(|| reader.next_chunk(chunk).transpose());
                target.restore_chunks(chunks).expect("restore")
            };
            if mode == Mode::Persistent {
                prop_assert_eq!(target.inline_value_bytes(), 0);
            }
            prop_assert_eq!(applied, stores[2].apply_state());
            prop_assert_eq!(&image(&target), &img);
            prop_assert_eq!(all(&target, models[0].clock), models[0].visible(models[0].clock));
            if mode != Mode::Memory {
                drop(target);
                let target = open(mode, dir.path());
                prop_assert_eq!(&image(&target), &img);
            }
        }
    }

    /// A snapshot is captured without copying the state (`tracked.rs`) and read a chunk at a
    /// time while writes go on: it must stay the image of the moment it was taken. The history
    /// is capped small, so writes also trim events the snapshot has not read yet; persists and
    /// (persistent mode) storage compaction move values while it reads; and with `restore` the
    /// whole state is replaced half-way.
    #[test]
    fn snapshot_read_during_writes_is_the_image_at_capture(
        before in proptest::collection::vec(op_strategy(0), 0..60),
        after in proptest::collection::vec(op_strategy(0), 1..80),
        chunk in 1usize..400,
        restore in any::<bool>(),
    ) {
        for mode in MODES {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut cfg = config(mode, dir.path());
            cfg.history_max_events = 12;
            let mut store = KvStore::open(cfg).expect("open");
            let mut model = Model::default();
            // The small history cap compacts on its own: the model follows the store's horizon.
            let sync = |store: &KvStore, model: &mut Model| {
                model.compact = model.compact.max(store.range_stats().compact_revision);
            };
            for op in &before {
                sync(&store, &mut model);
                step(&mut store, &mut model, op, 40);
            }
            let want = image(&store);
            let mut reader = store.snapshot();
            let mut got = Vec::new();
            let mut more = true;
            let mut failed = None;
            for (i, op) in after.iter().enumerate() {
                sync(&store, &mut model);
                step(&mut store, &mut model, op, 40);
                if i % 3 == 0 && more && failed.is_none() {
                    match reader.next_chunk(chunk) {
                        Ok(Some(c)) => got.extend_from_slice(&c),
                        Ok(None) => more = false,
                        Err(e) => failed = Some(e),
                    }
                }
                if i % 7 == 6 {
                    store.persist().expect("persist");
                    store.compact_storage().expect("compact");
                }
                if restore && i == after.len() / 2 {
                    let other = tempfile::tempdir().expect("tempdir");
                    let mut src = open(Mode::Memory, other.path());
                    step(&mut src, &mut Model::default(), &Op::Put(3, 3, 0), 40);
                    store.restore_bytes(&image(&src)).expect("restore");
                    model = Model::default();
                    model.tick(src.clock_ms());
                    // The model is the restored store from here: one key, at revision 1.
                    model.put(&key(3), &val(3, 40), 0);
                }
            }
            let rest = match failed {
                Some(e) => Err(e),
                None => std::iter::from_fn(|| reader.next_chunk(chunk).transpose())
                    .collect::<Result<Vec<_>, _>>(),
            };
            match rest {
                Ok(rest) => {
                    for c in rest {
                        got.extend_from_slice(&c);
                    }
                    prop_assert_eq!(bytes::Bytes::from(got), want, "{:?}", mode);
                }
                // Values a persistent store had moved to its data log are gone with the log a
                // restore rewrote: the snapshot says so instead of reading the new log's
                // records at the old positions.
                Err(e) => {
                    prop_assert!(restore && mode == Mode::Persistent, "{:?}: {}", mode, e);
                    prop_assert!(matches!(e, KvError::SnapshotAbandoned), "{}", e);
                }
            }
        }
    }

    #[test]
    fn garbage_images_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut r = Restorer::new();
        let res = r.push(&bytes);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(Mode::Memory, dir.path());
        if res.is_ok() {
            prop_assert!(store.restore(r).is_err());
        }
        prop_assert_eq!(store.apply_state().applied_index, 0);
    }
}

#[test]
fn truncated_image_is_refused_and_store_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = open(Mode::Memory, dir.path());
    let mut model = Model::default();
    for i in 0..10u8 {
        step(&mut src, &mut model, &Op::Put(i, i, 0), 6);
    }
    let img = image(&src);
    let mut dst = open(Mode::Memory, dir.path());
    step(&mut dst, &mut Model::default(), &Op::Put(1, 1, 0), 6);
    let before = image(&dst);
    for cut in [0, 5, img.len() / 2, img.len() - 1] {
        let mut r = Restorer::new();
        let _ = r.push(&img[..cut]);
        assert!(dst.restore(r).is_err(), "cut {cut}");
        assert_eq!(image(&dst), before);
    }
}

/// A streamed restore into a persistent store that fails half-way leaves it empty and usable;
/// the next restore succeeds.
#[test]
fn persistent_streamed_restore_failure_leaves_an_empty_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = open(Mode::Memory, dir.path());
    let mut model = Model::default();
    for i in 0..50u8 {
        step(&mut src, &mut model, &Op::Put(i, i, 0), 300);
    }
    let img = image(&src);
    let pdir = tempfile::tempdir().expect("tempdir");
    let mut dst = open(Mode::Persistent, pdir.path());
    step(&mut dst, &mut Model::default(), &Op::Put(1, 1, 0), 6);
    // The first chunks are good (their values reach the data log), then garbage.
    let mut reader = src.snapshot();
    let mut chunks: Vec<collections::Result<bytes::Bytes>> = (0..3)
        .map(|_| Ok(reader.next_chunk(700).expect("chunk").expect("more")))
        .collect();
    chunks.push(Ok(bytes::Bytes::from_static(b"\x05\x00\x00\x00garbage")));
    assert!(dst.restore_chunks(chunks).is_err());
    assert_eq!(dst.apply_state().applied_index, 0);
    assert!(all(&dst, 0).is_empty());
    drop(dst);
    let mut dst = open(Mode::Persistent, pdir.path());
    assert_eq!(dst.apply_state().applied_index, 0);
    let mut reader = src.snapshot();
    let chunks = std::iter::from_fn(|| reader.next_chunk(700).transpose());
    dst.restore_chunks(chunks).expect("restore");
    assert_eq!(image(&dst), img);
    drop(dst);
    let dst = open(Mode::Persistent, pdir.path());
    assert_eq!(image(&dst), img);
    assert_eq!(dst.inline_value_bytes(), 0);
}
