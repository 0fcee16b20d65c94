//! Helpers shared by the `storage_*` tests (included with `#[path]`; as a target of its own it
//! has no tests).
#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use harpoon::storage::{CellId, CellStorage, LogStore, StoreOptions};
use raft::eraftpb::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage};

pub fn ent(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: Bytes::from(format!("e{index}t{term}")),
        ..Default::default()
    }
}

pub fn ents(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| ent(i, term)).collect()
}

pub fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

pub fn voters(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        ..Default::default()
    }
}

/// Small segments so tests roll over and GC.
pub fn small_config(segment_size: u64) -> seglog::Config {
    seglog::Config {
        segment_size,
        // A segment must hold its header plus one maximal record.
        max_record_size: (segment_size / 2) as u32,
        ..seglog::Config::default()
    }
}

pub fn open_durable(dir: &Path, segment_size: u64, cache: usize) -> (LogStore, Vec<CellId>) {
    LogStore::open_with(
        dir,
        small_config(segment_size),
        StoreOptions {
            cache_entries_per_cell: cache,
            cache_bytes_per_cell: 1 << 20,
        },
    )
    .expect("open")
}

pub fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

/// Everything observable about a cell's log.
#[derive(PartialEq)]
pub struct Dump {
    pub first: u64,
    pub last: u64,
    pub truncated_term: u64,
    pub entries: Vec<Entry>,
    pub hs: HardState,
}

pub fn dump(s: &CellStorage) -> Dump {
    let first = s.first_index().expect("first");
    let last = s.last_index().expect("last");
    let entries = if last >= first {
        s.entries(first, last + 1, None, ctx()).expect("entries")
    } else {
        Vec::new()
    };
    Dump {
        first,
        last,
        truncated_term: s.term(first - 1).expect("term(first-1)"),
        entries,
        hs: s.hard_state(),
    }
}

impl std::fmt::Debug for Dump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Entries as index/term/data length: full payloads drown the diff.
        let es: Vec<String> = self
            .entries
            .iter()
            .map(|e| format!("{}/{}/{}b", e.index, e.term, e.data.len()))
            .collect();
        write!(
            f,
            "Dump {{ first: {}, last: {}, truncated_term: {}, hs: ({}, {}, {}), entries: {:?} }}",
            self.first,
            self.last,
            self.truncated_term,
            self.hs.term,
            self.hs.vote,
            self.hs.commit,
            es
        )
    }
}
