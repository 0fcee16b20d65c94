//! TEMPORARY seam: the storage interface of `/work/notes/storage-interface.md` over
//! `raft::storage::MemStorage`, used only until `harpoon::storage` lands. Same names and
//! signatures, so switching is one line in `lib.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use proto::CellId;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

/// Storage failure (never happens in memory).
#[derive(Debug, thiserror::Error)]
#[error("storage error for {cell:?}: {what}")]
pub struct StorageError {
    pub cell: Option<CellId>,
    pub what: String,
}

/// Counters.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    pub syncs: u64,
    pub writes: u64,
}

#[derive(Clone, Default)]
pub struct LogStore {
    cells: Arc<Mutex<HashMap<CellId, CellStorage>>>,
    syncs: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
}

impl LogStore {
    pub fn in_memory() -> LogStore {
        LogStore::default()
    }

    pub fn cell(&self, cell: CellId, conf_state: ConfState) -> Result<CellStorage, StorageError> {
        let mut cells = self.cells.lock();
        let cs = cells.entry(cell).or_insert_with(|| CellStorage {
            mem: MemStorage::new(),
            snap: Arc::new(Mutex::new(SnapSlot::default())),
        });
        if conf_state != ConfState::default() {
            cs.mem.wl().set_conf_state(conf_state);
        }
        Ok(cs.clone())
    }

    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let cells = self.cells.lock();
        for (cell, op) in batch.ops {
            let Some(cs) = cells.get(&cell) else { continue };
            let mut core = cs.mem.wl();
            let r = match op {
                Op::Append(e) => core.append(&e),
                Op::Hs(hs) => {
                    core.set_hardstate(hs);
                    Ok(())
                }
                Op::Snap(meta) => {
                    let mut s = Snapshot::default();
                    s.set_metadata(meta);
                    core.apply_snapshot(s)
                }
                Op::Compact(i) => core.compact(i),
            };
            r.map_err(|e| StorageError {
                cell: Some(cell),
                what: e.to_string(),
            })?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<(), StorageError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn destroy_cell(&self, cell: CellId) -> Result<(), StorageError> {
        self.cells.lock().remove(&cell);
        Ok(())
    }

    pub fn stats(&self) -> LogStats {
        LogStats {
            syncs: self.syncs.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }
}

enum Op {
    Append(Vec<Entry>),
    Hs(HardState),
    Snap(SnapshotMetadata),
    Compact(u64),
}

#[derive(Default)]
pub struct WriteBatch {
    ops: Vec<(CellId, Op)>,
}

impl WriteBatch {
    pub fn append(&mut self, cell: CellId, entries: Vec<Entry>) {
        self.ops.push((cell, Op::Append(entries)));
    }
    pub fn set_hard_state(&mut self, cell: CellId, hs: HardState) {
        self.ops.push((cell, Op::Hs(hs)));
    }
    pub fn apply_snapshot(&mut self, cell: CellId, metadata: SnapshotMetadata) {
        self.ops.push((cell, Op::Snap(metadata)));
    }
    pub fn compact(&mut self, cell: CellId, index: u64) {
        self.ops.push((cell, Op::Compact(index)));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[derive(Default)]
struct SnapSlot {
    offered: Option<Snapshot>,
    request: Option<u64>,
}

#[derive(Clone)]
pub struct CellStorage {
    mem: MemStorage,
    snap: Arc<Mutex<SnapSlot>>,
}

impl CellStorage {
    pub fn set_conf_state(&self, cs: ConfState) {
        self.mem.wl().set_conf_state(cs);
    }
    pub fn hard_state(&self) -> HardState {
        self.mem.rl().hard_state().clone()
    }
    pub fn offer_snapshot(&self, snap: Snapshot) {
        self.snap.lock().offered = Some(snap);
    }
    pub fn take_snapshot_request(&self) -> Option<u64> {
        self.snap.lock().request.take()
    }
}

impl Storage for CellStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut slot = self.snap.lock();
        if let Some(s) = &slot.offered {
            if s.get_metadata().index >= request_index
                && s.get_metadata().index >= self.mem.first_index()?.saturating_sub(1)
            {
                return Ok(s.clone());
            }
        }
        slot.request = Some(request_index);
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
