//! [`WriteBatch`]: one round's writes for many cells, applied and logged together.

use std::collections::BTreeMap;

use proto::CellId;
use raft::eraftpb::{Entry, HardState, SnapshotMetadata};

use super::cell_log::CellWrites;

/// One round's writes. Per cell, applied in this order: snapshot, entries, hard state, compact.
/// All records of one batch go to the seglog in one `append_batch`; cells are written in
/// ascending id order.
#[derive(Debug, Default)]
pub struct WriteBatch {
    pub(crate) cells: BTreeMap<CellId, CellWrites>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends entries; an entry whose index is <= the cell's last index replaces that suffix
    /// (raft conflict resolution): later indexes are dropped. Several calls for one cell in a
    /// batch behave like consecutive appends.
    pub fn append(&mut self, cell: CellId, entries: Vec<Entry>) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        let w = self.cells.entry(cell).or_default();
        if let Some(pending_first) = w.entries.first().map(|e| e.index) {
            if first >= pending_first {
                let keep = ((first - pending_first) as usize).min(w.entries.len());
                w.entries.truncate(keep);
            } else {
                w.entries.clear();
            }
        }
        w.entries.extend(entries);
    }

    /// Sets the cell's hard state (the last call in a batch wins).
    pub fn set_hard_state(&mut self, cell: CellId, hs: HardState) {
        self.cells.entry(cell).or_default().hard_state = Some(hs);
    }

    /// Installs a received snapshot's metadata: the log restarts after `metadata.index`
    /// (`first_index = index + 1`, `term(index) = metadata.term`), the ConfState becomes
    /// `metadata.conf_state`, and the hard state's commit/term are raised to the snapshot's.
    /// Applied before the batch's entries for this cell.
    pub fn apply_snapshot(&mut self, cell: CellId, metadata: SnapshotMetadata) {
        self.cells.entry(cell).or_default().snapshot = Some(metadata);
    }

    /// Log compaction: entries below `index` are no longer needed (their application is
    /// durable); keeps `(index - 1, term)` as the truncated state so `term(first_index - 1)` still
    /// answers. A no-op when `index <= first_index`; refused past `last_index + 1`.
    pub fn compact(&mut self, cell: CellId, index: u64) {
        let w = self.cells.entry(cell).or_default();
        w.compact = Some(w.compact.map_or(index, |c| c.max(index)));
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.cells.values().all(|w| {
            w.snapshot.is_none()
                && w.entries.is_empty()
                && w.hard_state.is_none()
                && w.compact.is_none()
        })
    }

    /// Cells with writes in this batch.
    pub fn cells(&self) -> impl Iterator<Item = CellId> + '_ {
        self.cells.keys().copied()
    }
}
