//! Segment GC of the shared log, and the regression that one cell's entries survive other
//! cells' conflict overwrites and destroys (the log is shared, so "truncating" a cell must never
//! touch its neighbours' records).

#[path = "storage_support.rs"]
mod support;

use harpoon::storage::{CellId, LogStore, WriteBatch};
use raft::Storage;
use support::*;

const SEGMENT: u64 = 16 << 10;

fn all_dumps(store: &LogStore, cells: impl Iterator<Item = u64>) -> Vec<(u64, Dump)> {
    cells
        .map(|c| (c, dump(&store.cell(CellId(c), voters(&[1])).unwrap())))
        .collect()
}

fn round(store: &LogStore, cells: std::ops::RangeInclusive<u64>, term: u64) {
    let mut b = WriteBatch::default();
    for c in cells {
        let s = store.cell(CellId(c), voters(&[1])).unwrap();
        let next = s.last_index().unwrap() + 1;
        let mut es = ents(next..=next + 2, term);
        for e in &mut es {
            e.data = vec![c as u8; 100].into();
        }
        b.append(CellId(c), es);
        b.set_hard_state(CellId(c), hs(term, 1, next));
    }
    store.write(b).unwrap();
    store.sync().unwrap();
}

fn compact_all(store: &LogStore, cells: impl Iterator<Item = u64>) {
    let mut b = WriteBatch::default();
    for c in cells {
        let s = store.cell(CellId(c), voters(&[1])).unwrap();
        b.compact(CellId(c), s.last_index().unwrap().saturating_sub(1).max(1));
    }
    store.write(b).unwrap();
    store.sync().unwrap();
}

#[test]
fn storage_gc_frees_segments_and_reopen_is_equal() {
    const CELLS: u64 = 40;
    const LAGGARD: u64 = 7;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_durable(dir.path(), SEGMENT, 8);
    // An idle cell: one hard state at the start, never written again (its hard state must be
    // checkpointed, not dropped with its segment).
    let idle = CellId(1000);
    let mut b = WriteBatch::default();
    b.set_hard_state(idle, hs(3, 2, 0));
    store.write(b).unwrap();
    // A cell that was compacted to an empty log early (truncated state only).
    let mut b = WriteBatch::default();
    b.append(CellId(1001), ents(1..=5, 2));
    b.compact(CellId(1001), 6);
    store.write(b).unwrap();

    for term in 1..=12 {
        round(&store, 1..=CELLS, term);
        if term % 3 == 0 {
            compact_all(&store, (1..=CELLS).filter(|&c| c != LAGGARD));
        }
    }
    let before = store.stats().segments;
    assert!(before > 5, "test needs several segments, got {before}");

    // The laggard's first entries are in the oldest segment: nothing can go.
    let gc = store.gc().unwrap();
    assert_eq!(gc.segments_dropped, 0, "{gc:?}");
    let first_pin = gc.pinned.first().expect("laggard reported");
    assert_eq!(first_pin.cell, CellId(LAGGARD));
    assert_eq!(first_pin.first_index, 1);

    // Once it compacts, GC frees old segments.
    compact_all(&store, std::iter::once(LAGGARD));
    let gc = store.gc().unwrap();
    assert!(gc.segments_dropped > 0, "{gc:?}");
    assert!(
        gc.checkpoints >= 2,
        "idle hard state and truncated state: {gc:?}"
    );
    // Checkpoints may have opened one new segment.
    assert!(store.stats().segments <= before - gc.segments_dropped + 1);
    // Entries of every cell are still readable (from cache and from disk).
    let cells = || (1..=CELLS).chain([1000, 1001]);
    let expect = all_dumps(&store, cells());

    // A second GC right away has nothing more to do and changes nothing.
    store.gc().unwrap();
    assert_eq!(all_dumps(&store, cells()), expect);

    drop(store);
    let (store, found) = open_durable(dir.path(), SEGMENT, 8);
    assert_eq!(found.len() as u64, CELLS + 2);
    assert_eq!(all_dumps(&store, cells()), expect);
    let idle_hs = store.cell(idle, voters(&[1])).unwrap().hard_state();
    assert_eq!(idle_hs, hs(3, 2, 0));
    let s = store.cell(CellId(1001), voters(&[1])).unwrap();
    assert_eq!((s.first_index().unwrap(), s.term(5).unwrap()), (6, 2));

    // Writing on after GC and reopen keeps working, and GC again.
    for term in 13..=20 {
        round(&store, 1..=CELLS, term);
        compact_all(&store, 1..=CELLS);
    }
    let gc = store.gc().unwrap();
    assert!(gc.segments_dropped > 0, "{gc:?}");
    let expect = all_dumps(&store, cells());
    // Every handle keeps the store (and its seglog lock) alive.
    drop((s, store));
    let (store, _) = open_durable(dir.path(), SEGMENT, 8);
    assert_eq!(all_dumps(&store, cells()), expect);
}

#[test]
fn storage_gc_drops_destroyed_cells() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_durable(dir.path(), SEGMENT, 8);
    for term in 1..=10 {
        round(&store, 1..=10, term);
    }
    for c in 1..=10 {
        store.destroy_cell(CellId(c)).unwrap();
    }
    round(&store, 11..=11, 1);
    store.sync().unwrap();
    let gc = store.gc().unwrap();
    assert!(gc.segments_dropped > 0, "{gc:?}");
    assert!(gc.pinned.is_empty(), "{gc:?}");
    drop(store);
    let (_, found) = open_durable(dir.path(), SEGMENT, 8);
    assert_eq!(found, vec![CellId(11)]);
}

/// Regression: conflict overwrites and destroys of other cells must not touch a cell's entries,
/// neither live, nor after GC, nor after reopen.
#[test]
fn storage_gc_cell_survives_neighbours_conflicts_and_destroys() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_durable(dir.path(), SEGMENT, 2);
    let a = CellId(1);
    let b_cell = CellId(2);
    let mut expected_a = Vec::new();
    for i in 0..20u64 {
        let mut b = WriteBatch::default();
        // A appends two entries, B rewrites its log from index 1 every time (a conflict that
        // would truncate everything after it in a per-cell log).
        b.append(a, ents(2 * i + 1..=2 * i + 2, 1));
        expected_a.extend(ents(2 * i + 1..=2 * i + 2, 1));
        b.append(b_cell, ents(1..=3, i + 1));
        store.write(b).unwrap();
        if i % 5 == 3 {
            store.sync().unwrap();
            store.destroy_cell(b_cell).unwrap();
        }
    }
    store.sync().unwrap();
    let check = |store: &LogStore| {
        let sa = store.cell(a, voters(&[1])).unwrap();
        assert_eq!(sa.entries(1, 41, None, ctx()).unwrap(), expected_a);
        let sb = store.cell(b_cell, voters(&[1])).unwrap();
        assert_eq!(sb.entries(1, 4, None, ctx()).unwrap(), ents(1..=3, 20));
    };
    check(&store);
    store.gc().unwrap();
    check(&store);
    drop(store);
    let (store, found) = open_durable(dir.path(), SEGMENT, 2);
    assert_eq!(found, vec![a, b_cell]);
    check(&store);
    // Same on the memory backend.
    let mem = LogStore::in_memory();
    for i in 0..20u64 {
        let mut b = WriteBatch::default();
        b.append(a, ents(2 * i + 1..=2 * i + 2, 1));
        b.append(b_cell, ents(1..=3, i + 1));
        mem.write(b).unwrap();
        if i % 5 == 3 {
            mem.destroy_cell(b_cell).unwrap();
        }
    }
    check(&mem);
}
