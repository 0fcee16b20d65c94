//! Several driver threads share one `LogStore` (as shards do): each owns some cells, writes a
//! round, syncs, and reads its cells back; a GC thread runs meanwhile. Afterwards a reopen
//! gives back exactly what every thread saw.

#[path = "storage_support.rs"]
mod support;

use std::sync::Arc;
use std::thread;

use harpoon::storage::{CellId, LogStore, WriteBatch};
use raft::Storage;
use support::*;

const THREADS: u64 = 4;
const CELLS_PER_THREAD: u64 = 5;
const ROUNDS: u64 = 60;

fn shard(store: LogStore, t: u64) {
    let cells: Vec<CellId> = (0..CELLS_PER_THREAD)
        .map(|i| CellId(t * 100 + i + 1))
        .collect();
    let handles: Vec<_> = cells
        .iter()
        .map(|&c| store.cell(c, voters(&[1])).unwrap())
        .collect();
    for round in 1..=ROUNDS {
        let mut b = WriteBatch::default();
        for (c, s) in cells.iter().zip(&handles) {
            let next = s.last_index().unwrap() + 1;
            // Every 7th round rewrites the last entry (a conflict).
            let start = if round % 7 == 0 { next - 1 } else { next };
            let mut es = ents(start..=next + 1, round);
            for e in &mut es {
                e.data = vec![round as u8; 200].into();
            }
            b.append(*c, es);
            b.set_hard_state(*c, hs(round, t, start.saturating_sub(1)));
            if round % 10 == 0 {
                b.compact(*c, next.saturating_sub(3).max(1));
            }
        }
        store.write(b).unwrap();
        // Readable before the sync (entry cache) and after it (cache or disk).
        for s in &handles {
            let last = s.last_index().unwrap();
            assert_eq!(s.term(last).unwrap(), round);
        }
        store.sync().unwrap();
        for s in &handles {
            let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
            assert_eq!(
                s.entries(first, last + 1, None, ctx()).unwrap().len() as u64,
                last + 1 - first
            );
        }
    }
}

#[test]
fn storage_concurrency_shards_share_one_log() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_durable(dir.path(), 32 << 10, 4);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (store, stop) = (store.clone(), stop.clone());
        thread::spawn(move || {
            let mut dropped = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                dropped += store.gc().unwrap().segments_dropped;
                thread::sleep(std::time::Duration::from_millis(5));
            }
            dropped
        })
    };
    let shards: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            thread::spawn(move || shard(store, t))
        })
        .collect();
    for s in shards {
        s.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    gc.join().unwrap();
    store.gc().unwrap();
    let ids = store.cells();
    assert_eq!(ids.len() as u64, THREADS * CELLS_PER_THREAD);
    let expect: Vec<Dump> = ids
        .iter()
        .map(|&c| dump(&store.cell(c, voters(&[1])).unwrap()))
        .collect();
    let stats = store.stats();
    assert!(stats.syncs >= ROUNDS, "{stats:?}");
    drop(store);
    let (store, found) = open_durable(dir.path(), 32 << 10, 4);
    assert_eq!(found, ids);
    let got: Vec<Dump> = ids
        .iter()
        .map(|&c| dump(&store.cell(c, voters(&[1])).unwrap()))
        .collect();
    assert_eq!(got, expect);
}

/// Rough throughput of the write path (run by hand: `cargo test --release -p harpoon --test
/// storage_concurrency -- --ignored --nocapture`): 100 cells x 10 entries of 256 B per round,
/// one write + one group commit per round.
#[test]
#[ignore]
fn storage_concurrency_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LogStore::open(dir.path(), seglog::Config::default()).unwrap();
    let handles: Vec<_> = (1..=100)
        .map(|c| store.cell(CellId(c), voters(&[1])).unwrap())
        .collect();
    let rounds = 200u64;
    let start = std::time::Instant::now();
    for round in 0..rounds {
        let mut b = WriteBatch::default();
        for (c, s) in (1..=100).zip(&handles) {
            let next = s.last_index().unwrap() + 1;
            let mut es = ents(next..=next + 9, 1);
            for e in &mut es {
                e.data = vec![7u8; 256].into();
            }
            b.append(CellId(c), es);
            b.set_hard_state(CellId(c), hs(1, 1, next.saturating_sub(1)));
            if round % 50 == 49 {
                b.compact(CellId(c), next);
            }
        }
        store.write(b).unwrap();
        store.sync().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let entries = rounds * 100 * 10;
    println!(
        "{entries} entries in {rounds} synced rounds: {secs:.2} s, {:.0} entries/s, {:.2} ms/round; {:?}",
        entries as f64 / secs,
        secs * 1000.0 / rounds as f64,
        store.stats()
    );
}
