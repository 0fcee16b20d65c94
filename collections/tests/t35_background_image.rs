//! Logged mode's background image write (`KvStore::persist_background`): the store keeps
//! applying while a thread writes the snapshot file, and the durable apply state moves only
//! once that file is complete.
//!
//! - the proptest: a memory-mode twin records its image at every applied index; whenever the
//!   store reports a new durable apply state, the snapshot file on disk is byte for byte the
//!   twin's image at that index, and a reopen recovers exactly that state;
//! - a store dropped with a write in flight, and a process killed (SIGKILL) during one, recover
//!   the previous image or the new one, never anything else.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use collections::kv::{ApplyState, KvStore};
use common::*;
use proptest::prelude::*;

fn image(store: &KvStore) -> Bytes {
    store.snapshot().to_bytes().expect("snapshot")
}

/// The image in the snapshot file (the file is the image followed by its crc32).
fn file_image(dir: &Path) -> Bytes {
    let b = std::fs::read(dir.join("kv.snap")).expect("snapshot file");
    Bytes::copy_from_slice(&b[..b.len() - 4])
}

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    /// `persist_background`.
    Background,
    /// Wait for the write in flight.
    Wait,
    /// Synchronous `persist`.
    Persist,
}

/// Checks the durable apply state against the last one seen: if it moved, it moved to the
/// state the write in flight captured (`started`), and the file holds exactly that image.
fn check(
    dir: &Path,
    images: &HashMap<u64, Bytes>,
    store: &KvStore,
    durable: &mut ApplyState,
    started: &mut Option<u64>,
) {
    let d = store.durable_state();
    if d != *durable {
        assert_eq!(
            Some(d.applied_index),
            *started,
            "durable moved to an uncaptured state"
        );
        assert_eq!(&file_image(dir), &images[&d.applied_index]);
        *durable = d;
        *started = None;
    }
    assert!(durable.applied_index <= store.apply_state().applied_index);
}

fn run(steps: &[Step], vlen: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Logged, dir.path());
    let mut twin = open(Mode::Memory, dir.path());
    let (mut model, mut twin_model) = (Model::default(), Model::default());
    let mut images: HashMap<u64, Bytes> = HashMap::new();
    images.insert(0, image(&twin));
    let mut durable = store.durable_state();
    // The apply state captured by the write in flight.
    let mut started = None;
    for s in steps {
        match s {
            Step::Op(op) => {
                step(&mut store, &mut model, op, vlen);
                step(&mut twin, &mut twin_model, op, vlen);
                images.insert(twin.apply_state().applied_index, image(&twin));
            }
            Step::Background => {
                let was_pending = store.image_write_pending();
                let applied = store.apply_state();
                let d = store.persist_background().expect("persist_background");
                assert_eq!(d, store.durable_state());
                if !was_pending && store.image_write_pending() {
                    assert_ne!(applied, durable, "a write starts only when the state moved");
                    started = Some(applied.applied_index);
                }
                check(dir.path(), &images, &store, &mut durable, &mut started);
            }
            Step::Wait => {
                store.wait_image_write().expect("wait");
                assert!(!store.image_write_pending());
                check(dir.path(), &images, &store, &mut durable, &mut started);
            }
            Step::Persist => {
                let d = store.persist().expect("persist");
                assert_eq!(d, store.apply_state());
                started = None;
                durable = d;
                // No file until something was applied.
                if durable.applied_index > 0 {
                    assert_eq!(&file_image(dir.path()), &images[&durable.applied_index]);
                }
            }
        }
    }
    // A crash now (the store dropped: a write in flight is cancelled) recovers a durable state
    // at least the last one reported: the reported one, or the one being written.
    let reported = store.durable_state();
    drop(store);
    let store = open(Mode::Logged, dir.path());
    let got = store.apply_state();
    assert!(got.applied_index >= reported.applied_index);
    assert!(got == reported || Some(got.applied_index) == started);
    assert_eq!(&image(&store), &images[&got.applied_index]);
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            12 => op_strategy(0).prop_map(Step::Op),
            3 => Just(Step::Background),
            1 => Just(Step::Wait),
            1 => Just(Step::Persist),
        ],
        1..80,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_durable_image_is_the_state_at_the_reported_index(s in steps()) {
        run(&s, 8);
    }

    #[test]
    fn the_durable_image_is_the_state_at_the_reported_index_large_values(s in steps()) {
        run(&s, 3 << 10);
    }
}

/// The apply state only moves to a write's captured state once `persist_background` (or a
/// wait) adopts it; the adopting call does not start the next write.
#[test]
fn a_finished_write_is_adopted_by_the_next_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Logged, dir.path());
    let mut model = Model::default();
    for i in 0..10u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 64);
    }
    let at = store.apply_state();
    assert_eq!(store.persist_background().unwrap().applied_index, 0);
    assert!(store.image_write_pending());
    for i in 10..20u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 64);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.persist_background().unwrap() != at {
        assert!(Instant::now() < deadline, "the image write never finished");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!store.image_write_pending(), "adopting starts nothing");
    // The next call captures the state applied since.
    store.persist_background().unwrap();
    assert!(store.image_write_pending());
    assert_eq!(store.wait_image_write().unwrap(), store.apply_state());
    // Nothing moved: nothing to write.
    store.persist_background().unwrap();
    assert!(!store.image_write_pending());
}

const CHILD_ENV: &str = "QUIVER_T35_CHILD_DIR";
const CHILD_KEYS: u32 = 1500;
const CHILD_VALUE: usize = 8 << 10;

fn child_cmds(round: u32) -> Vec<proto::kvpb::Command> {
    (0..CHILD_KEYS)
        .map(|i| {
            let v = vec![(i as u8).wrapping_add(round as u8); CHILD_VALUE];
            collections::kv::cmd::put(format!("k{i:06}").as_bytes(), &v, 0)
        })
        .collect()
}

/// The child half of `a_process_killed_during_a_write_recovers_an_image`: writes the first
/// image synchronously, applies a second round, starts its image in the background, says so
/// on stdout and waits to be killed.
#[test]
fn child_process_writing_an_image() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut store = open(Mode::Logged, Path::new(&dir));
    for c in child_cmds(0) {
        apply(&mut store, 0, &c);
    }
    store.persist().expect("persist");
    for c in child_cmds(1) {
        apply(&mut store, 0, &c);
    }
    store.persist_background().expect("persist_background");
    println!("STARTED");
    std::thread::sleep(Duration::from_secs(120));
}

/// A process killed while the image is being written (a crash mid-write) recovers the
/// previous image or the complete new one.
#[test]
fn a_process_killed_during_a_write_recovers_an_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut twin = open(Mode::Memory, dir.path());
    let mut images = Vec::new();
    for round in 0..2 {
        for c in child_cmds(round) {
            apply(&mut twin, 0, &c);
        }
        images.push(image(&twin));
    }
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_process_writing_an_image", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let out = child.stdout.take().expect("stdout");
    let started = BufReader::new(out)
        .lines()
        .map_while(|l| l.ok())
        .any(|l| l.contains("STARTED"));
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(started, "the child never started its background write");
    let store = open(Mode::Logged, dir.path());
    let got = image(&store);
    assert!(
        got == images[0] || got == images[1],
        "recovered state at {:?} is neither image",
        store.apply_state()
    );
    assert!(!dir.path().join("kv.snap.tmp").exists());
}

/// A store dropped with a write in flight stops it: a reopen finds the previous image (or the
/// new one, if it completed first) and no temporary file.
#[test]
fn dropping_a_store_with_a_write_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Logged, dir.path());
    let mut model = Model::default();
    for i in 0..50u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 40 << 10);
    }
    let first = store.persist().unwrap();
    let first_image = image(&store);
    for i in 0..50u8 {
        step(
            &mut store,
            &mut model,
            &Op::Put(i, i.wrapping_add(1), 0),
            40 << 10,
        );
    }
    let second_image = image(&store);
    store.persist_background().unwrap();
    drop(store);
    assert!(!dir.path().join("kv.snap.tmp").exists());
    let store = open(Mode::Logged, dir.path());
    let got = image(&store);
    assert!(got == first_image || got == second_image);
    assert!(store.apply_state().applied_index >= first.applied_index);
}
