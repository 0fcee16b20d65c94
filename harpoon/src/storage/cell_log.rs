//! One cell's view of the shared log: where each live entry is, which entries are cached in
//! memory, the truncated state, the hard state and the ConfState.
//!
//! Pure bookkeeping, no I/O. [`CellLog::apply`] is the single place where a record changes a
//! cell; the write path and recovery both go through it, so the state after a restart equals the
//! state before (the property the model test checks).

use std::collections::BTreeMap;

use proto::CellId;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};

use super::error::{LogPosition, StorageError};
use super::record::{entry_len, Record, ENTRIES_HEADER_LEN, HEADER_LEN};

/// One live entry.
#[derive(Clone, Debug)]
struct Slot {
    term: u64,
    /// The Entries record holding it (`None` in the memory backend, where `entry` is the data).
    loc: Option<LogPosition>,
    /// The entry itself while cached (boxed: most slots of a long log are not cached, and an
    /// unboxed `Entry` would make every slot three times larger).
    entry: Option<Box<Entry>>,
}

/// How [`CellLog::entries_plan`] says to get one entry.
#[derive(Debug)]
pub(crate) enum Fetch {
    Cached(Entry),
    /// Read the Entries record at `loc` and take entry `index` (whose term must be `term`).
    Disk {
        loc: LogPosition,
        index: u64,
        term: u64,
    },
}

/// Why `term`/`entries` cannot answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    Compacted,
    Unavailable,
}

/// One cell's share of a [`WriteBatch`](super::WriteBatch), in apply order.
#[derive(Debug, Default)]
pub(crate) struct CellWrites {
    pub(crate) snapshot: Option<SnapshotMetadata>,
    pub(crate) entries: Vec<Entry>,
    pub(crate) hard_state: Option<HardState>,
    pub(crate) compact: Option<u64>,
}

/// A cell's log index.
#[derive(Debug)]
pub(crate) struct CellLog {
    cell: CellId,
    /// Last discarded index and its term: `term(first_index - 1)`.
    truncated_index: u64,
    truncated_term: u64,
    /// Entry index -> slot. Contiguous from `truncated_index + 1` except transiently during
    /// recovery (see [`CellLog::apply`]).
    slots: BTreeMap<u64, Slot>,
    hard_state: HardState,
    /// Not persisted here: given by the cell (`cell()`, `set_conf_state`) or by a snapshot.
    pub(crate) conf_state: ConfState,
    /// Slots whose entry is cached, and the sum of their data sizes.
    cached: usize,
    cached_bytes: usize,
    /// Record holding the current hard state / truncated state (for GC checkpoints).
    hs_loc: Option<LogPosition>,
    trunc_loc: Option<LogPosition>,
    /// A Destroy record was applied (recovery) or `destroy_cell` was called.
    pub(crate) destroyed: bool,
}

fn data_size(e: &Entry) -> usize {
    e.data.len() + e.context.len()
}

impl CellLog {
    pub(crate) fn new(cell: CellId) -> Self {
        CellLog {
            cell,
            truncated_index: 0,
            truncated_term: 0,
            slots: BTreeMap::new(),
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            cached: 0,
            cached_bytes: 0,
            hs_loc: None,
            trunc_loc: None,
            destroyed: false,
        }
    }

    pub(crate) fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.slots
            .last_key_value()
            .map_or(self.truncated_index, |(&i, _)| i.max(self.truncated_index))
    }

    pub(crate) fn truncated(&self) -> (u64, u64) {
        (self.truncated_index, self.truncated_term)
    }

    pub(crate) fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub(crate) fn cached_entries(&self) -> usize {
        self.cached
    }

    /// Exact on `[first_index - 1, last_index]`.
    pub(crate) fn term(&self, idx: u64) -> Result<u64, Miss> {
        if idx == self.truncated_index {
            return Ok(self.truncated_term);
        }
        if idx < self.truncated_index {
            return Err(Miss::Compacted);
        }
        self.slot(idx).map(|s| s.term).ok_or(Miss::Unavailable)
    }

    fn slot(&self, idx: u64) -> Option<&Slot> {
        self.slots.get(&idx)
    }

    /// How to produce `[low, high)`, stopping early once cached entries alone exceed `max_size`
    /// (the first entry is always included, as `raft::util::limit_size` does).
    pub(crate) fn entries_plan(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Fetch>, Miss> {
        if low < self.first_index() {
            return Err(Miss::Compacted);
        }
        if high > self.last_index() + 1 {
            return Err(Miss::Unavailable);
        }
        let mut plan = Vec::new();
        let mut size = 0u64;
        for idx in low..high {
            let Some(slot) = self.slot(idx) else {
                return Err(Miss::Unavailable);
            };
            match (&slot.entry, slot.loc) {
                (Some(e), _) => {
                    size += u64::from(e.compute_size());
                    if !plan.is_empty() && max_size.is_some_and(|m| size > m) {
                        break;
                    }
                    plan.push(Fetch::Cached(Entry::clone(e)));
                }
                (None, Some(loc)) => plan.push(Fetch::Disk {
                    loc,
                    index: idx,
                    term: slot.term,
                }),
                // Every slot has its entry or a location (invariant of `append`).
                (None, None) => return Err(Miss::Unavailable),
            }
        }
        Ok(plan)
    }

    /// Checks one round's writes against this log and turns them into records, in apply order.
    /// Nothing is changed: a refused batch leaves the log as it was.
    pub(crate) fn plan(
        &self,
        w: &CellWrites,
        max_record: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let cell = self.cell;
        let mut records = Vec::new();
        let (mut first, mut last) = (self.first_index(), self.last_index());
        if let Some(meta) = &w.snapshot {
            if meta.index <= self.truncated_index {
                return Err(StorageError::SnapshotOutOfDate {
                    cell,
                    index: meta.index,
                    truncated: self.truncated_index,
                });
            }
            records.push(Record::Snapshot {
                cell,
                index: meta.index,
                term: meta.term,
            });
            first = meta.index + 1;
            last = meta.index;
        }
        let new_first = w.entries.first().map(|e| e.index);
        if let Some(e0) = new_first {
            if e0 < first {
                return Err(StorageError::OverwriteCompacted {
                    cell,
                    index: e0,
                    first_index: first,
                });
            }
            if e0 > last + 1 {
                return Err(StorageError::NonContiguous {
                    cell,
                    index: e0,
                    expected_before: last + 1,
                });
            }
            let mut chunk: Vec<Entry> = Vec::new();
            let mut chunk_len = HEADER_LEN + ENTRIES_HEADER_LEN;
            for (i, e) in w.entries.iter().enumerate() {
                if e.index != e0 + i as u64 {
                    return Err(StorageError::NonContiguous {
                        cell,
                        index: e.index,
                        expected_before: e0 + i as u64,
                    });
                }
                let len = entry_len(e);
                if HEADER_LEN + ENTRIES_HEADER_LEN + len > max_record {
                    return Err(StorageError::EntryTooLarge {
                        cell,
                        index: e.index,
                        size: HEADER_LEN + ENTRIES_HEADER_LEN + len,
                        max: max_record,
                    });
                }
                if chunk_len + len > max_record {
                    records.push(Record::Entries {
                        cell,
                        entries: std::mem::take(&mut chunk),
                    });
                    chunk_len = HEADER_LEN + ENTRIES_HEADER_LEN;
                }
                chunk_len += len;
                chunk.push(e.clone());
            }
            records.push(Record::Entries {
                cell,
                entries: chunk,
            });
            last = e0 + w.entries.len() as u64 - 1;
        }
        if let Some(hs) = &w.hard_state {
            records.push(Record::HardState {
                cell,
                hs: hs.clone(),
            });
        }
        if let Some(index) = w.compact {
            if index > last + 1 {
                return Err(StorageError::CompactBeyondLast {
                    cell,
                    index,
                    last_index: last,
                });
            }
            if index > first {
                let kept = index - 1;
                let term = match new_first {
                    Some(e0) if kept >= e0 => w.entries.get((kept - e0) as usize).map(|e| e.term),
                    _ => self.term(kept).ok(),
                };
                // `kept` is in [first, last]: in the batch's entries or in the untouched prefix.
                let term = term.ok_or(StorageError::CompactBeyondLast {
                    cell,
                    index,
                    last_index: last,
                })?;
                records.push(Record::Compact {
                    cell,
                    index: kept,
                    term,
                });
            }
        }
        Ok(records)
    }

    /// Applies one record. Used by the write path (after `plan` accepted it) and by recovery.
    ///
    /// The rules are per index, last writer wins: Entries at `i` removes every entry `>= i`
    /// and inserts its own; Compact removes entries `<= index`; Snapshot removes all. On a
    /// contiguous log (the write path: [`CellLog::plan`] refuses gaps) that is raft's append.
    /// Recovery after GC replays only a suffix of the log, starting from an empty cell, so it may
    /// meet dead entries (rewritten later) before the record that truncated the log below them:
    /// holes are allowed while replaying, and [`CellLog::is_contiguous`] checks the end result.
    pub(crate) fn apply(&mut self, record: Record, loc: Option<LogPosition>) {
        match record {
            Record::Entries { entries, .. } => self.append(entries, loc),
            Record::HardState { hs, .. } => {
                self.hard_state = hs;
                self.hs_loc = loc;
            }
            Record::Snapshot { index, term, .. } => {
                self.clear_slots();
                self.truncated_index = index;
                self.truncated_term = term;
                self.trunc_loc = loc;
                // As raft's MemStorage: the snapshot is committed. Keeps a restart valid even if
                // the hard state of the same round was lost.
                let before = (self.hard_state.term, self.hard_state.commit);
                self.hard_state.term = self.hard_state.term.max(term);
                self.hard_state.commit = self.hard_state.commit.max(index);
                // The hard state now depends on this record too. `hs_loc` names the oldest record
                // it depends on (an earlier HardState record, if any), which GC checkpoints.
                if before != (self.hard_state.term, self.hard_state.commit) && self.hs_loc.is_none()
                {
                    self.hs_loc = loc;
                }
            }
            Record::Compact { index, term, .. } => {
                if index < self.truncated_index {
                    return;
                }
                let kept = self.slots.split_off(&(index + 1));
                let dropped = std::mem::replace(&mut self.slots, kept);
                self.uncache(dropped.values());
                self.truncated_index = index;
                self.truncated_term = term;
                self.trunc_loc = loc;
            }
            Record::Destroy { cell } => {
                *self = CellLog::new(cell);
                self.destroyed = true;
            }
        }
    }

    fn clear_slots(&mut self) {
        self.slots.clear();
        self.cached = 0;
        self.cached_bytes = 0;
    }

    fn uncache<'a>(&mut self, removed: impl Iterator<Item = &'a Slot>) {
        for s in removed {
            if let Some(e) = &s.entry {
                self.cached -= 1;
                self.cached_bytes -= data_size(e);
            }
        }
    }

    fn append(&mut self, entries: Vec<Entry>, loc: Option<LogPosition>) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        let removed = self.slots.split_off(&first);
        self.uncache(removed.values());
        // Nothing at or below the truncated index is ever appended by the write path.
        for e in entries
            .into_iter()
            .filter(|e| e.index > self.truncated_index)
        {
            self.cached += 1;
            self.cached_bytes += data_size(&e);
            self.slots.insert(
                e.index,
                Slot {
                    term: e.term,
                    loc,
                    entry: Some(Box::new(e)),
                },
            );
        }
    }

    /// Drops cached entries, oldest first, while more than `max_entries` or `max_bytes` are
    /// cached. Only entries durable in the seglog (`loc < durable_end`) are dropped.
    pub(crate) fn trim_cache(
        &mut self,
        durable_end: LogPosition,
        max_entries: usize,
        max_bytes: usize,
    ) {
        if self.cached <= max_entries && self.cached_bytes <= max_bytes {
            return;
        }
        // The cached entries are the newest ones (appends are cached, trimming takes the oldest
        // first): start there rather than walking every uncached slot of a long log.
        let first_cached = (self.last_index() + 1).saturating_sub(self.cached as u64);
        for s in self.slots.range_mut(first_cached..).map(|(_, s)| s) {
            if self.cached <= max_entries && self.cached_bytes <= max_bytes {
                break;
            }
            match s.loc {
                Some(loc) if loc < durable_end => {}
                _ => break,
            }
            if let Some(e) = s.entry.take() {
                self.cached -= 1;
                self.cached_bytes -= data_size(&e);
            }
        }
    }

    /// True when the entries run without a hole from `first_index` to `last_index` (always,
    /// except in the middle of a recovery; false after one means the log is inconsistent).
    pub(crate) fn is_contiguous(&self) -> bool {
        self.slots.len() as u64 == self.last_index() - self.truncated_index
    }

    /// Segment of the oldest live entry's record.
    pub(crate) fn oldest_entry_segment(&self) -> Option<u64> {
        self.slots
            .first_key_value()
            .and_then(|(_, s)| s.loc)
            .map(|l| l.segment)
    }

    /// Checkpoint records for small state that lives only in segments below `segment`.
    pub(crate) fn checkpoints_before(&self, segment: u64) -> Vec<Record> {
        let mut out = Vec::new();
        if self.trunc_loc.is_some_and(|l| l.segment < segment) {
            out.push(Record::Compact {
                cell: self.cell,
                index: self.truncated_index,
                term: self.truncated_term,
            });
        }
        if self.hs_loc.is_some_and(|l| l.segment < segment) {
            out.push(Record::HardState {
                cell: self.cell,
                hs: self.hard_state.clone(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ents(range: std::ops::Range<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term,
                ..Default::default()
            })
            .collect()
    }

    fn rec(entries: Vec<Entry>) -> Record {
        Record::Entries {
            cell: CellId(1),
            entries,
        }
    }

    #[test]
    fn storage_cell_log_replay_suffix_with_dead_entries() {
        // A suffix of the log after GC: dead entries 12..13 (written when 10..11 existed, whose
        // record was dropped), then the (checkpointed) truncation, then the live rewrite.
        let mut log = CellLog::new(CellId(1));
        log.apply(rec(ents(12..14, 2)), None);
        assert!(!log.is_contiguous());
        log.apply(
            Record::Compact {
                cell: CellId(1),
                index: 9,
                term: 2,
            },
            None,
        );
        assert!(!log.is_contiguous());
        log.apply(rec(ents(10..12, 2)), None);
        assert!(log.is_contiguous());
        assert_eq!(log.first_index(), 10);
        assert_eq!(log.last_index(), 11);
        assert_eq!(log.term(9), Ok(2));
        assert_eq!(log.term(8), Err(Miss::Compacted));
        assert_eq!(log.cached_entries(), 2);
    }

    #[test]
    fn storage_cell_log_trim_keeps_undurable() {
        let mut log = CellLog::new(CellId(1));
        let at = |o| {
            Some(LogPosition {
                segment: 0,
                offset: o,
            })
        };
        log.apply(rec(ents(1..5, 1)), at(0));
        log.apply(rec(ents(5..9, 1)), at(100));
        log.trim_cache(
            at(100).unwrap_or(LogPosition {
                segment: 0,
                offset: 0,
            }),
            0,
            0,
        );
        assert_eq!(log.cached_entries(), 4);
        assert!(matches!(
            log.entries_plan(1, 9, None).unwrap().first(),
            Some(Fetch::Disk { index: 1, .. })
        ));
    }
}
