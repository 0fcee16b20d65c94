//! Crash tests of the durable backend. A "crash" is a copy of the data directory taken while
//! the store is live (the page cache already holds unsynced bytes, so the copy has them too),
//! optionally damaged past the durable end the way a power loss can: files cut short, pages
//! zeroed, later segments missing. Reopening the copy must give back every synced entry and hard
//! state, and exactly the state after some prefix of the unsynced writes: nothing half-written.

#[path = "storage_support.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};

use harpoon::storage::{CellId, LogPosition, LogStore, StorageError, WriteBatch};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::*;

const SEGMENT: u64 = 32 << 10;
/// seglog's segment header size: damage below it in a segment file is not a torn write (segments
/// are created atomically and fsynced before use).
const SEG_HEADER: u64 = 1024;
const CELLS: u64 = 4;

fn cells(store: &LogStore) -> Vec<harpoon::storage::CellStorage> {
    (1..=CELLS)
        .map(|c| store.cell(CellId(c), voters(&[1])).unwrap())
        .collect()
}

fn dumps(store: &LogStore) -> Vec<Dump> {
    cells(store).iter().map(dump).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        // The seglog lock file is not data.
        if name.to_string_lossy().ends_with(".seg") {
            fs::copy(e.path(), to.join(name)).unwrap();
        }
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.seg"))
}

fn segment_numbers(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".seg").and_then(|n| n.parse().ok())
        })
        .collect();
    v.sort();
    v
}

/// Some synced history: appends with conflicts, hard states, a compaction.
fn synced_history(store: &LogStore, rng: &mut SmallRng) {
    for round in 0..30u64 {
        let mut b = WriteBatch::default();
        for c in 1..=CELLS {
            let s = store.cell(CellId(c), voters(&[1])).unwrap();
            let last = raft::Storage::last_index(&s).unwrap();
            let first = raft::Storage::first_index(&s).unwrap();
            let start = first.max((last + 1).saturating_sub(rng.gen_range(0..3)));
            b.append(
                CellId(c),
                ents(start..=start + rng.gen_range(0..4), round + 1),
            );
            b.set_hard_state(CellId(c), hs(round + 1, c, start.saturating_sub(1)));
            if round % 10 == 9 {
                b.compact(CellId(c), start.saturating_sub(2).max(1));
            }
        }
        store.write(b).unwrap();
        if rng.gen_bool(0.3) {
            store.sync().unwrap();
        }
    }
    store.sync().unwrap();
}

/// Unsynced writes, one record each; returns the states after 0..=n of them.
fn unsynced_tail(store: &LogStore, rng: &mut SmallRng, n: usize) -> Vec<Vec<Dump>> {
    let mut states = vec![dumps(store)];
    for i in 0..n {
        let c = CellId(rng.gen_range(1..=CELLS));
        let s = store.cell(c, voters(&[1])).unwrap();
        let mut b = WriteBatch::default();
        if rng.gen_bool(0.7) {
            let last = raft::Storage::last_index(&s).unwrap();
            let first = raft::Storage::first_index(&s).unwrap();
            let start = first.max((last + 1).saturating_sub(rng.gen_range(0..3)));
            let mut es = ents(start..=start + rng.gen_range(0..3), 100 + i as u64);
            for e in &mut es {
                // Vary record sizes so records straddle pages and segments.
                e.data = vec![0xab; rng.gen_range(0..3000)].into();
            }
            b.append(c, es);
        } else {
            b.set_hard_state(c, hs(100 + i as u64, 1, 0));
        }
        store.write(b).unwrap();
        states.push(dumps(store));
    }
    states
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// The copy as is (page cache intact: everything comes back).
    None,
    /// Zero everything from a random point past the durable end; later segments deleted.
    ZeroTail,
    /// Cut the file at a random point past the durable end; later segments deleted.
    CutFile,
    /// Zero one random range past the durable end, keeping what follows (pages written back
    /// out of order).
    Hole,
}

fn damage(dir: &Path, durable: LogPosition, how: Damage, rng: &mut SmallRng) {
    let segs: Vec<u64> = segment_numbers(dir)
        .into_iter()
        .filter(|&n| n >= durable.segment)
        .collect();
    let Some(&seg) = segs.get(rng.gen_range(0..segs.len().max(1))) else {
        return;
    };
    let path = segment_path(dir, seg);
    let len = fs::metadata(&path).unwrap().len();
    let lo = if seg == durable.segment {
        durable.offset
    } else {
        SEG_HEADER
    };
    if lo >= len {
        return;
    }
    let at = rng.gen_range(lo..len);
    let mut bytes = fs::read(&path).unwrap();
    match how {
        Damage::None => return,
        Damage::ZeroTail => bytes[at as usize..].fill(0),
        Damage::CutFile => bytes.truncate(at as usize),
        Damage::Hole => {
            let end = (at + rng.gen_range(1..8192)).min(len);
            bytes[at as usize..end as usize].fill(0);
        }
    }
    fs::write(&path, bytes).unwrap();
    if !matches!(how, Damage::Hole) {
        for &later in segs.iter().filter(|&&n| n > seg) {
            fs::remove_file(segment_path(dir, later)).unwrap();
        }
    }
}

fn crash_case(seed: u64, how: Damage) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let live = tempfile::tempdir().unwrap();
    let (store, _) = open_durable(live.path(), SEGMENT, 4);
    synced_history(&store, &mut rng);
    let n = rng.gen_range(0..25);
    let states = unsynced_tail(&store, &mut rng, n);
    let durable = store.durable_end().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(live.path(), crashed.path());
    damage(crashed.path(), durable, how, &mut rng);

    let (recovered, found) = open_durable(crashed.path(), SEGMENT, 4);
    assert_eq!(found.len() as u64, CELLS, "seed {seed} {how:?}");
    let got = dumps(&recovered);
    let k = states.iter().position(|s| *s == got);
    let Some(k) = k else {
        panic!("seed {seed} {how:?}: recovered state is no prefix of the writes (n = {n})");
    };
    if matches!(how, Damage::None) {
        assert_eq!(k, n, "seed {seed}: an intact copy must recover every write");
    }
    // The recovered store keeps working: append after the recovered end and reopen again.
    let s = recovered.cell(CellId(1), voters(&[1])).unwrap();
    let next = raft::Storage::last_index(&s).unwrap() + 1;
    let mut b = WriteBatch::default();
    b.append(CellId(1), ents(next..=next, 999));
    recovered.write(b).unwrap();
    recovered.sync().unwrap();
    let expect = dumps(&recovered);
    drop((s, recovered));
    let (again, _) = open_durable(crashed.path(), SEGMENT, 4);
    assert_eq!(
        dumps(&again),
        expect,
        "seed {seed} {how:?}: reopen after recovery"
    );
}

#[test]
fn storage_crash_copy_recovers_everything() {
    for seed in 0..6 {
        crash_case(seed, Damage::None);
    }
}

#[test]
fn storage_crash_zeroed_tail_recovers_a_prefix() {
    for seed in 100..125 {
        crash_case(seed, Damage::ZeroTail);
    }
}

#[test]
fn storage_crash_cut_file_recovers_a_prefix() {
    for seed in 200..225 {
        crash_case(seed, Damage::CutFile);
    }
}

#[test]
fn storage_crash_hole_recovers_a_prefix() {
    for seed in 300..325 {
        crash_case(seed, Damage::Hole);
    }
}

#[test]
fn storage_crash_corruption_in_synced_data_refuses_to_open() {
    let mut rng = SmallRng::seed_from_u64(7);
    let live = tempfile::tempdir().unwrap();
    let (store, _) = open_durable(live.path(), SEGMENT, 4);
    synced_history(&store, &mut rng);
    let durable = store.durable_end().unwrap();
    let first = segment_numbers(live.path())[0];
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(live.path(), crashed.path());
    // Flip a byte inside a synced record of the first segment.
    let path = segment_path(crashed.path(), first);
    let mut bytes = fs::read(&path).unwrap();
    let end = if durable.segment == first {
        durable.offset
    } else {
        SEGMENT
    };
    let at = (SEG_HEADER + (end - SEG_HEADER) / 2) as usize;
    bytes[at] ^= 0x5a;
    fs::write(&path, bytes).unwrap();
    match LogStore::open(crashed.path(), small_config(SEGMENT)) {
        Err(e @ StorageError::Corrupt { .. }) => assert!(e.is_fatal()),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened a log with corrupt synced data"),
    }
}

#[test]
fn storage_crash_undecodable_record_names_its_cell() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open_durable(dir.path(), SEGMENT, 4);
        let mut b = WriteBatch::default();
        b.append(CellId(1), ents(1..=3, 1));
        store.write(b).unwrap();
        store.sync().unwrap();
    }
    {
        // A record with a valid seglog checksum but an unknown kind, for cell 7.
        let (log, _) = seglog::SegLog::open(dir.path(), small_config(SEGMENT)).unwrap();
        let mut rec = vec![42u8];
        rec.extend_from_slice(&7u64.to_le_bytes());
        log.append(&rec).unwrap();
        log.sync().unwrap();
    }
    match LogStore::open(dir.path(), small_config(SEGMENT)) {
        Err(StorageError::Corrupt { cell, .. }) => assert_eq!(cell, Some(CellId(7))),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened a log with an undecodable record"),
    }
}

#[test]
fn storage_crash_failed_append_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("log");
    let (store, _) = open_durable(&data, SEGMENT, 4);
    let s = store.cell(CellId(1), voters(&[1])).unwrap();
    let mut b = WriteBatch::default();
    b.append(CellId(1), ents(1..=2, 1));
    store.write(b).unwrap();
    // The directory disappears: the next segment cannot be created.
    fs::remove_dir_all(&data).unwrap();
    let mut next = 3;
    let err = loop {
        let mut b = WriteBatch::default();
        let mut e = ent(next, 1);
        e.data = vec![1u8; 4000].into();
        b.append(CellId(1), vec![e]);
        match store.write(b) {
            Ok(()) => next += 1,
            Err(e) => break e,
        }
        assert!(next < 100, "segment rollover never failed");
    };
    assert!(err.is_fatal(), "{err}");
    assert!(store.poisoned().is_some());
    let mut b = WriteBatch::default();
    b.set_hard_state(CellId(1), hs(1, 1, 0));
    assert!(matches!(store.write(b), Err(StorageError::Poisoned(_))));
    assert!(matches!(store.sync(), Err(StorageError::Poisoned(_))));
    assert!(raft::Storage::last_index(&s).is_err());
}
