//! Model test: random writes on several cells against a plain per-cell model
//! (`BTreeMap<index, Entry>` + truncated state + hard state). After every step the store equals
//! the model; the durable backend is also synced and reopened at random points (small segments
//! and a tiny entry cache, so rollover, GC and reads from disk all happen).

#[path = "storage_support.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use harpoon::storage::{CellId, CellStorage, LogStore, WriteBatch};
use proptest::prelude::*;
use raft::eraftpb::{Entry, HardState, SnapshotMetadata};
use raft::Storage;
use support::*;

const CELLS: u64 = 3;
const SEGMENT: u64 = 4 << 10;

#[derive(Clone, Debug)]
enum Op {
    /// Append `n` entries starting `back` entries before the end (a conflict when back > 0).
    Append {
        cell: u64,
        back: u64,
        n: u64,
        new_term: bool,
        size: usize,
    },
    HardState {
        cell: u64,
        vote: u64,
    },
    /// Compact to a point chosen in `[first, last + 1]`.
    Compact {
        cell: u64,
        at: u64,
    },
    Snapshot {
        cell: u64,
        ahead: u64,
    },
    Destroy {
        cell: u64,
    },
    Sync,
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..CELLS, 0u64..4, 1u64..6, any::<bool>(), 0usize..400).prop_map(
            |(cell, back, n, new_term, size)| Op::Append { cell, back, n, new_term, size }
        ),
        3 => (0..CELLS, 0u64..3).prop_map(|(cell, vote)| Op::HardState { cell, vote }),
        3 => (0..CELLS, any::<u64>()).prop_map(|(cell, at)| Op::Compact { cell, at }),
        1 => (0..CELLS, 1u64..4).prop_map(|(cell, ahead)| Op::Snapshot { cell, ahead }),
        1 => (0..CELLS).prop_map(|cell| Op::Destroy { cell }),
        2 => Just(Op::Sync),
        2 => Just(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Clone, Debug, Default)]
struct ModelCell {
    entries: BTreeMap<u64, Entry>,
    truncated: (u64, u64),
    hs: HardState,
    max_term: u64,
    /// Has a record on the log since its last destroy (so a reopen finds it).
    exists: bool,
}

impl ModelCell {
    fn first(&self) -> u64 {
        self.truncated.0 + 1
    }
    fn last(&self) -> u64 {
        self.entries
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.truncated.0)
    }
    fn dump(&self) -> Dump {
        Dump {
            first: self.first(),
            last: self.last(),
            truncated_term: self.truncated.1,
            entries: self.entries.values().cloned().collect(),
            hs: self.hs.clone(),
        }
    }
}

struct Run {
    store: LogStore,
    dir: Option<tempfile::TempDir>,
    model: BTreeMap<u64, ModelCell>,
    handles: BTreeMap<u64, CellStorage>,
    /// Segments freed by GC over the run (the durable runs must exercise GC).
    gc_dropped: u64,
}

impl Run {
    fn handle(&mut self, cell: u64) -> CellStorage {
        let store = self.store.clone();
        self.handles
            .entry(cell)
            .or_insert_with(|| store.cell(CellId(cell), voters(&[1])).unwrap())
            .clone()
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Append {
                cell,
                back,
                n,
                new_term,
                size,
            } => {
                let m = self.model.entry(cell).or_default();
                let start = m.first().max((m.last() + 1).saturating_sub(back));
                if new_term {
                    m.max_term += 1;
                }
                let term = m.max_term.max(1);
                m.max_term = term;
                let es: Vec<Entry> = (start..start + n)
                    .map(|i| {
                        let mut e = ent(i, term);
                        e.data = Bytes::from(vec![(i % 251) as u8; size]);
                        e
                    })
                    .collect();
                m.entries.split_off(&start);
                m.entries.extend(es.iter().map(|e| (e.index, e.clone())));
                m.exists = true;
                let mut b = WriteBatch::default();
                b.append(CellId(cell), es);
                self.store.write(b).unwrap();
            }
            Op::HardState { cell, vote } => {
                let m = self.model.entry(cell).or_default();
                let h = hs(m.max_term, vote, m.hs.commit.max(m.truncated.0));
                m.hs = h.clone();
                m.exists = true;
                let mut b = WriteBatch::default();
                b.set_hard_state(CellId(cell), h);
                self.store.write(b).unwrap();
            }
            Op::Compact { cell, at } => {
                let m = self.model.entry(cell).or_default();
                let (first, last) = (m.first(), m.last());
                let index = first + at % (last + 2 - first);
                if index > first {
                    let term = m.entries.get(&(index - 1)).map(|e| e.term).unwrap();
                    m.entries = m.entries.split_off(&index);
                    m.truncated = (index - 1, term);
                    m.exists = true;
                }
                let mut b = WriteBatch::default();
                b.compact(CellId(cell), index);
                self.store.write(b).unwrap();
            }
            Op::Snapshot { cell, ahead } => {
                let m = self.model.entry(cell).or_default();
                m.max_term += 1;
                let index = m.last() + ahead;
                m.entries.clear();
                m.truncated = (index, m.max_term);
                m.hs.term = m.hs.term.max(m.max_term);
                m.hs.commit = m.hs.commit.max(index);
                m.exists = true;
                let meta = SnapshotMetadata {
                    index,
                    term: m.max_term,
                    conf_state: Some(voters(&[1])).into(),
                    ..Default::default()
                };
                let mut b = WriteBatch::default();
                b.apply_snapshot(CellId(cell), meta);
                self.store.write(b).unwrap();
            }
            Op::Destroy { cell } => {
                self.model.remove(&cell);
                self.handles.remove(&cell);
                self.store.destroy_cell(CellId(cell)).unwrap();
            }
            Op::Sync => self.store.sync().unwrap(),
            Op::Gc => {
                let gc = self.store.gc().unwrap();
                self.gc_dropped += gc.segments_dropped;
            }
            Op::Reopen => {
                let Some(dir) = &self.dir else { return };
                self.store.sync().unwrap();
                self.handles.clear();
                let path = dir.path().to_path_buf();
                // Drop the old store (and its seglog lock) before reopening.
                self.store = LogStore::in_memory();
                let (store, found) = open_durable(&path, SEGMENT, 2);
                self.store = store;
                let expect: BTreeSet<CellId> = self
                    .model
                    .iter()
                    .filter(|(_, m)| m.exists)
                    .map(|(c, _)| CellId(*c))
                    .collect();
                assert_eq!(found.into_iter().collect::<BTreeSet<_>>(), expect);
            }
        }
    }

    fn check(&mut self) {
        for cell in 0..CELLS {
            let expect = self.model.get(&cell).cloned().unwrap_or_default().dump();
            let h = self.handle(cell);
            assert_eq!(dump(&h), expect, "cell {cell}");
            assert_eq!(h.term(expect.first - 1).unwrap(), expect.truncated_term);
        }
    }
}

fn run(ops: Vec<Op>, durable: bool) -> u64 {
    let (store, dir) = if durable {
        let dir = tempfile::tempdir().unwrap();
        let (store, found) = open_durable(dir.path(), SEGMENT, 2);
        assert!(found.is_empty());
        (store, Some(dir))
    } else {
        (LogStore::in_memory(), None)
    };
    let mut r = Run {
        store,
        dir,
        model: BTreeMap::new(),
        handles: BTreeMap::new(),
        gc_dropped: 0,
    };
    for op in &ops {
        r.step(op);
        r.check();
    }
    r.step(&Op::Gc);
    r.step(&Op::Reopen);
    r.check();
    r.gc_dropped
}

proptest! {
    // 64 cases in CI; `PROPTEST_CASES=5000` for a long run by hand.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn storage_model_memory(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, false);
    }

    #[test]
    fn storage_model_durable(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, true);
    }
}

/// The generator must exercise GC: over fixed seeds, some runs free segments.
#[test]
fn storage_model_durable_runs_gc() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strategy = proptest::collection::vec(op(), 40..60);
    let mut dropped = 0;
    for _ in 0..8 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        dropped += run(ops, true);
    }
    assert!(dropped > 0, "no GC in 8 runs");
}

/// Regression: GC dropped the segment of a snapshot whose hard-state bump (commit/term raised to
/// the snapshot's) was recorded nowhere else, so a reopen lost the hard state.
#[test]
fn storage_model_regression_snapshot_hard_state_survives_gc() {
    use Op::*;
    run(
        vec![
            Snapshot { cell: 0, ahead: 1 },
            Append {
                cell: 1,
                back: 0,
                n: 4,
                new_term: false,
                size: 110,
            },
            Append {
                cell: 1,
                back: 2,
                n: 2,
                new_term: false,
                size: 330,
            },
            Compact {
                cell: 1,
                at: 1024242023948032638,
            },
            Append {
                cell: 1,
                back: 1,
                n: 1,
                new_term: false,
                size: 341,
            },
            Append {
                cell: 0,
                back: 0,
                n: 4,
                new_term: false,
                size: 313,
            },
            Compact {
                cell: 1,
                at: 11591112478969620891,
            },
        ],
        true,
    );
}

/// Regression: after GC, recovery replays a suffix of the log and met dead entries (later
/// rewritten from a lower index) before the Compact record; treating them as the log's start
/// clipped the live rewrite.
#[test]
fn storage_model_regression_dead_entries_before_truncation_after_gc() {
    use Op::*;
    run(
        vec![
            Append {
                cell: 0,
                back: 0,
                n: 2,
                new_term: false,
                size: 18,
            },
            Append {
                cell: 0,
                back: 0,
                n: 2,
                new_term: false,
                size: 149,
            },
            Append {
                cell: 0,
                back: 0,
                n: 2,
                new_term: false,
                size: 346,
            },
            Append {
                cell: 1,
                back: 0,
                n: 2,
                new_term: false,
                size: 51,
            },
            Append {
                cell: 0,
                back: 0,
                n: 3,
                new_term: false,
                size: 329,
            },
            Append {
                cell: 2,
                back: 0,
                n: 1,
                new_term: false,
                size: 201,
            },
            Append {
                cell: 1,
                back: 0,
                n: 2,
                new_term: false,
                size: 151,
            },
            Compact {
                cell: 1,
                at: 17669198937325063626,
            },
            Compact {
                cell: 0,
                at: 16154401355798752669,
            },
            Append {
                cell: 2,
                back: 1,
                n: 1,
                new_term: false,
                size: 0,
            },
            Append {
                cell: 1,
                back: 3,
                n: 1,
                new_term: false,
                size: 0,
            },
        ],
        true,
    );
}
