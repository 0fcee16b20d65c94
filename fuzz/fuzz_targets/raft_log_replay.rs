//! Harpoon's raft log recovery (`harpoon::storage::LogStore::open`) over a seglog holding
//! fuzzer-chosen records: well-formed records of every kind (built with harpoon's own encoder,
//! compiled in from `harpoon/src/storage/record.rs`) mixed with arbitrary payloads.
//!
//! Properties:
//! - `open` returns a store or a typed `StorageError`, never panics;
//! - an open that succeeds serves, for every live cell, exactly the log that the documented
//!   replay rules give (mod.rs / cell_log.rs: per index last writer wins; Entries at `i` drop
//!   every entry `>= i`; Compact drops `<= index` unless it is below the truncated index;
//!   Snapshot drops all; Destroy forgets the cell), computed here by a plain model. With a tiny
//!   entry cache most entries are read back from the seglog by position.
//! - an open fails with a typed error when the model says a cell is not contiguous or a record
//!   does not decode.
#![no_main]

use std::collections::{BTreeMap, HashMap};

use arbitrary::Arbitrary;
use bytes::Bytes;
use harpoon::storage::{LogStore, StoreOptions};
use libfuzzer_sys::fuzz_target;
use proto::CellId;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState};
use raft::{GetEntriesContext, Storage};

#[path = "../../harpoon/src/storage/record.rs"]
#[allow(dead_code)]
mod record;

use record::Record;

const MAX_INDEX: u64 = 1 << 62;

#[derive(Debug, Arbitrary)]
enum First {
    /// Right after the cell's last entry (the write path).
    Next,
    /// Rewrite from `last - n` (a conflict).
    Back(u8),
    /// Leave a hole.
    Gap(u8),
    Raw(u16),
    NearMax(u8),
}

#[derive(Debug, Arbitrary)]
struct E {
    term: u8,
    kind: u8,
    data: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum Rec {
    Entries {
        cell: u8,
        first: First,
        entries: Vec<E>,
    },
    HardState {
        cell: u8,
        term: u8,
        vote: u8,
        commit: u16,
    },
    Snapshot {
        cell: u8,
        index: u16,
        term: u8,
    },
    Compact {
        cell: u8,
        back: u8,
        term: u8,
    },
    Destroy {
        cell: u8,
    },
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    records: Vec<Rec>,
    cache_entries: u8,
}

/// The replay rules, on plain maps.
#[derive(Default, Clone, Debug)]
struct Model {
    slots: BTreeMap<u64, Entry>,
    truncated: (u64, u64),
    hs: HardState,
    destroyed: bool,
}

impl Model {
    fn last(&self) -> u64 {
        self.slots
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.truncated.0)
    }

    fn apply(&mut self, r: &Record) {
        match r {
            Record::Entries { entries, .. } => {
                let first = entries[0].index;
                self.slots.split_off(&first);
                for e in entries.iter().filter(|e| e.index > self.truncated.0) {
                    self.slots.insert(e.index, e.clone());
                }
            }
            Record::HardState { hs, .. } => self.hs = hs.clone(),
            Record::Snapshot { index, term, .. } => {
                self.slots.clear();
                self.truncated = (*index, *term);
                self.hs.term = self.hs.term.max(*term);
                self.hs.commit = self.hs.commit.max(*index);
            }
            Record::Compact { index, term, .. } => {
                if *index < self.truncated.0 {
                    return;
                }
                self.slots = self.slots.split_off(&(index + 1));
                self.truncated = (*index, *term);
            }
            Record::Destroy { .. } => {
                *self = Model {
                    destroyed: true,
                    ..Model::default()
                };
            }
        }
    }

    fn contiguous(&self) -> bool {
        let mut next = self.truncated.0 + 1;
        for &i in self.slots.keys() {
            if i != next {
                return false;
            }
            next += 1;
        }
        true
    }
}

fn to_record(r: &Rec, models: &HashMap<CellId, Model>) -> Option<Record> {
    let last = |c: CellId| models.get(&c).map_or(0, Model::last);
    Some(match r {
        Rec::Entries {
            cell,
            first,
            entries,
        } => {
            let cell = CellId(u64::from(*cell % 4));
            let l = last(cell);
            let first = match first {
                First::Next => l + 1,
                First::Back(n) => l.saturating_sub(u64::from(*n)).max(1),
                First::Gap(n) => l + 2 + u64::from(*n),
                First::Raw(x) => u64::from(*x).max(1),
                First::NearMax(n) => MAX_INDEX - u64::from(*n),
            };
            if entries.is_empty() {
                return None;
            }
            let entries = entries
                .iter()
                .take(8)
                .enumerate()
                .map(|(i, e)| Entry {
                    index: first + i as u64,
                    term: u64::from(e.term),
                    entry_type: match e.kind % 3 {
                        0 => EntryType::EntryNormal,
                        1 => EntryType::EntryConfChange,
                        _ => EntryType::EntryConfChangeV2,
                    },
                    data: Bytes::from(e.data.clone()),
                    ..Default::default()
                })
                .collect();
            Record::Entries { cell, entries }
        }
        Rec::HardState {
            cell,
            term,
            vote,
            commit,
        } => Record::HardState {
            cell: CellId(u64::from(*cell % 4)),
            hs: HardState {
                term: u64::from(*term),
                vote: u64::from(*vote),
                commit: u64::from(*commit),
                ..Default::default()
            },
        },
        Rec::Snapshot { cell, index, term } => Record::Snapshot {
            cell: CellId(u64::from(*cell % 4)),
            index: u64::from(*index),
            term: u64::from(*term),
        },
        Rec::Compact { cell, back, term } => {
            let cell = CellId(u64::from(*cell % 4));
            Record::Compact {
                cell,
                index: last(cell).saturating_sub(u64::from(*back)),
                term: u64::from(*term),
            }
        }
        Rec::Destroy { cell } => Record::Destroy {
            cell: CellId(u64::from(*cell % 4)),
        },
        Rec::Raw(_) => return None,
    })
}

fn config() -> seglog::Config {
    seglog::Config {
        segment_size: 256 << 10,
        max_record_size: 64 << 10,
        sync: seglog::SyncMode::None,
    }
}

fuzz_target!(|input: Input| {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    let mut models: HashMap<CellId, Model> = HashMap::new();
    let mut bad_record = false;
    {
        let (log, _) = seglog::SegLog::open(dir.path(), config()).expect("fresh seglog");
        for r in input.records.iter().take(48) {
            let bytes = match to_record(r, &models) {
                Some(rec) => {
                    let bytes = match &rec {
                        Record::Entries { cell, entries } => {
                            record::encode_entries(*cell, entries).expect("encode")
                        }
                        other => record::encode_small(other),
                    };
                    let m = models.entry(rec.cell()).or_default();
                    if m.destroyed && !matches!(rec, Record::Destroy { .. }) {
                        *m = Model::default();
                    }
                    m.apply(&rec);
                    bytes
                }
                None => match r {
                    Rec::Raw(b) => {
                        let b = &b[..b.len().min(4096)];
                        match record::decode(b) {
                            Ok(rec) => {
                                // Arbitrary bytes that happen to be a record: model them too.
                                let m = models.entry(rec.cell()).or_default();
                                if m.destroyed && !matches!(rec, Record::Destroy { .. }) {
                                    *m = Model::default();
                                }
                                m.apply(&rec);
                            }
                            Err(_) => bad_record = true,
                        }
                        b.to_vec()
                    }
                    _ => continue,
                },
            };
            log.append(&bytes).expect("append");
        }
        log.sync().expect("sync");
    }

    let options = StoreOptions {
        cache_entries_per_cell: usize::from(input.cache_entries % 4),
        cache_bytes_per_cell: 64,
    };
    let opened = LogStore::open_with(dir.path(), config(), options);
    let broken = bad_record || models.values().any(|m| !m.destroyed && !m.contiguous());
    let (store, cells) = match opened {
        Ok(x) => x,
        Err(e) => {
            assert!(broken, "open failed on a well-formed log: {e}");
            return;
        }
    };
    assert!(!broken, "open accepted a log the model calls broken");
    let mut live: Vec<CellId> = models
        .iter()
        .filter(|(_, m)| !m.destroyed)
        .map(|(c, _)| *c)
        .collect();
    live.sort();
    assert_eq!(cells, live, "live cells differ");
    for c in cells {
        let m = &models[&c];
        let s = store.cell(c, ConfState::default()).expect("cell storage");
        let first = s.first_index().expect("first_index");
        let last = s.last_index().expect("last_index");
        assert_eq!(first, m.truncated.0 + 1, "cell {c:?} first index");
        assert_eq!(last, m.last(), "cell {c:?} last index");
        assert_eq!(
            s.term(m.truncated.0).expect("truncated term"),
            m.truncated.1
        );
        let hs = s.initial_state().expect("initial_state").hard_state;
        assert_eq!(hs, m.hs, "cell {c:?} hard state");
        if last >= first {
            let got = s
                .entries(first, last + 1, None, GetEntriesContext::empty(false))
                .expect("entries of a recovered log");
            let want: Vec<Entry> = m.slots.values().cloned().collect();
            assert_eq!(got, want, "cell {c:?} entries");
            for e in &want {
                assert_eq!(s.term(e.index).expect("term"), e.term);
            }
        }
    }
});
