//! Crash tests of persistent mode (and logged mode): a memory-mode twin applies the same
//! commands and records its snapshot image at every index; the store under test is dropped
//! (a process crash), its data-log files are cut at a random offset past the durable end (a
//! power loss losing unsynced writes), and reopened. The recovered store must be exactly the
//! twin at the recovered applied index, and that index must be at least the last one `persist`
//! reported durable.

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};

use bytes::Bytes;
use collections::kv::KvStore;
use common::*;
use proptest::prelude::*;

fn image(store: &KvStore) -> Bytes {
    store.snapshot().to_bytes().expect("snapshot")
}

fn seg_path(dir: &std::path::Path, n: u64) -> std::path::PathBuf {
    dir.join("data").join(format!("{n:020}.seg"))
}

/// Zeroes every byte of the data log from `cut` (>= the durable end) on: the tail of the
/// durable end's segment from `cut`, and all later segments.
fn cut_after(dir: &std::path::Path, durable: seglog::Position, extra: u64, drop_later: bool) {
    let path = seg_path(dir, durable.segment);
    let len = std::fs::metadata(&path).expect("segment").len();
    let from = (durable.offset + extra).min(len);
    let mut f = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open segment");
    f.seek(SeekFrom::Start(from)).expect("seek");
    f.write_all(&vec![0u8; (len - from) as usize])
        .expect("zero");
    f.sync_all().expect("sync");
    if drop_later {
        let mut n = durable.segment + 1;
        while std::fs::remove_file(seg_path(dir, n)).is_ok() {
            n += 1;
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    Persist,
    Compact,
}

fn run(steps: &[Step], extra: u64, vlen: usize, cut: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Persistent, dir.path());
    let mut twin = open(Mode::Memory, dir.path());
    let mut model = Model::default();
    let mut twin_model = Model::default();
    let mut images: HashMap<u64, Bytes> = HashMap::new();
    images.insert(0, image(&twin));
    let mut persisted = 0;
    for s in steps {
        match s {
            Step::Op(op) => {
                step(&mut store, &mut model, op, vlen);
                step(&mut twin, &mut twin_model, op, vlen);
                images.insert(twin.apply_state().applied_index, image(&twin));
            }
            Step::Persist => {
                let d = store.persist().expect("persist");
                assert_eq!(d, store.apply_state());
                assert_eq!(store.durable_state(), d);
                persisted = d.applied_index;
            }
            Step::Compact => {
                store.compact_storage().expect("compact");
                assert!(store.durable_state().applied_index >= persisted);
                persisted = store.durable_state().applied_index;
            }
        }
    }
    let durable = store.data_durable_end().expect("persistent");
    drop(store);
    if cut {
        cut_after(dir.path(), durable, extra, true);
    }
    let store = open(Mode::Persistent, dir.path());
    let got = store.apply_state().applied_index;
    assert!(
        got >= persisted,
        "recovered index {got} below persisted {persisted}"
    );
    assert_eq!(store.durable_state(), store.apply_state());
    let want = images
        .get(&got)
        .unwrap_or_else(|| panic!("no twin image at {got}"));
    assert_eq!(&image(&store), want, "state at recovered index {got}");
    if !cut {
        // A process crash loses nothing: every applied command that changed data is back.
        assert_eq!(store.revision(), model.revision);
    }
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            12 => op_strategy(0).prop_map(Step::Op),
            2 => Just(Step::Persist),
            1 => Just(Step::Compact),
        ],
        1..80,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn power_loss_recovers_a_persisted_state(s in steps(), extra in 0u64..4000) {
        run(&s, extra, 8, true);
    }

    #[test]
    fn power_loss_with_segment_rolls(s in steps(), extra in 0u64..100_000) {
        run(&s, extra, 12 << 10, true);
    }

    #[test]
    fn process_crash_loses_nothing_applied(s in steps()) {
        run(&s, 0, 8, false);
    }
}

/// Logged mode: a crash loses what was applied after the last snapshot file, never more,
/// and a torn temporary snapshot file is ignored.
#[test]
fn logged_mode_recovers_the_last_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Logged, dir.path());
    let mut model = Model::default();
    for i in 0..20u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 8);
    }
    let durable = store.persist().expect("persist");
    let at_persist = image(&store);
    for i in 0..5u8 {
        step(&mut store, &mut model, &Op::Delete(i), 8);
    }
    assert_eq!(store.durable_state(), durable);
    drop(store);
    std::fs::write(dir.path().join("kv.snap.tmp"), b"torn").expect("write tmp");
    let store = open(Mode::Logged, dir.path());
    assert_eq!(store.apply_state(), durable);
    assert_eq!(image(&store), at_persist);
    // A damaged snapshot file is reported, never loaded.
    drop(store);
    let path = dir.path().join("kv.snap");
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).expect("write");
    assert!(matches!(
        KvStore::open(config(Mode::Logged, dir.path())),
        Err(collections::KvError::Corrupt { .. })
    ));
}

/// Logged mode: a replaced image is deleted off the writer's path (a second name keeps it
/// whole through the rename; a reaper thread shrinks and unlinks it), so every image write
/// leaves only `kv.snap` behind; and a crash between the link and the rename leaves a
/// `kv.snap.N.old` that is a second name of the current image: the next open unlinks it
/// without touching the image.
#[test]
fn logged_mode_deletes_replaced_images_and_leftover_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("kv.snap"))
            .collect();
        v.sort();
        v
    };
    let mut store = open(Mode::Logged, dir.path());
    let mut model = Model::default();
    for round in 0..4u8 {
        for i in 0..50u8 {
            step(&mut store, &mut model, &Op::Put(i, round, 0), 2000);
        }
        store.persist().expect("persist");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while names() != ["kv.snap"] {
        assert!(
            std::time::Instant::now() < deadline,
            "replaced images not deleted: {:?}",
            names()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let at_persist = image(&store);
    drop(store);
    std::fs::hard_link(dir.path().join("kv.snap"), dir.path().join("kv.snap.7.old")).expect("link");
    let store = open(Mode::Logged, dir.path());
    assert_eq!(names(), ["kv.snap"]);
    assert_eq!(image(&store), at_persist);
    drop(store);
    let store = open(Mode::Logged, dir.path());
    assert_eq!(image(&store), at_persist);
}

/// The apply meta (the consensus layer's ConfState) and the commit point come back with the
/// data they were stored with, in both durable modes.
#[test]
fn apply_meta_and_commit_are_stored_with_the_data() {
    for mode in [Mode::Logged, Mode::Persistent] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(mode, dir.path());
        let mut model = Model::default();
        step(&mut store, &mut model, &Op::Put(1, 1, 0), 8);
        store.set_commit(5, 2);
        store.set_apply_meta(2, 1, Bytes::from_static(b"conf-v1"));
        let d = store.persist().expect("persist");
        assert_eq!((d.applied_index, d.commit_index, d.commit_term), (2, 5, 2));
        assert_eq!(d.apply_meta, Bytes::from_static(b"conf-v1"));
        drop(store);
        let store = open(mode, dir.path());
        assert_eq!(store.durable_state(), d);
        assert_eq!(all(&store, 0), model.visible(0));
    }
}

/// The real durability path (msync/fsync on every persist) once, end to end.
#[test]
fn persistent_mode_with_real_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(Mode::Persistent, dir.path());
    cfg.seglog.sync = seglog::SyncMode::Data;
    let mut store = KvStore::open(cfg.clone()).expect("open");
    let mut model = Model::default();
    for i in 0..30u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 1000);
        if i % 10 == 9 {
            store.persist().expect("persist");
        }
    }
    let durable = store.persist().expect("persist");
    drop(store);
    let store = KvStore::open(cfg).expect("reopen");
    assert_eq!(store.durable_state(), durable);
    assert_eq!(all(&store, 0), model.visible(0));
}

/// A data-log record that passes seglog's checksum but is not a KV record (a bug or a foreign
/// log) is reported as corruption, never applied and never a panic.
#[test]
fn foreign_records_in_the_data_log_are_corruption() {
    for payload in [&b""[..], b"\x09junk", b"\x01\x00short", b"\x02\x00\x00"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(Mode::Persistent, dir.path());
        let mut store = KvStore::open(cfg.clone()).expect("open");
        step(&mut store, &mut Model::default(), &Op::Put(1, 1, 0), 8);
        store.persist().expect("persist");
        drop(store);
        let (log, _) =
            seglog::SegLog::open(dir.path().join("data"), cfg.seglog.clone()).expect("log");
        log.append(payload).expect("append");
        log.sync().expect("sync");
        drop(log);
        assert!(
            matches!(
                KvStore::open(cfg),
                Err(collections::KvError::Corrupt { .. })
            ),
            "{payload:?}"
        );
    }
}
