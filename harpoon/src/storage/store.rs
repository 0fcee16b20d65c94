//! [`LogStore`]: the node-wide raft log, and the write path.
//!
//! Write path (`LogStore::write`), one call per driver round:
//! 1. Check the poison flag and take the writer lock (one writer at a time, so the order of
//!    records in the log is the order in which cell indexes change).
//! 2. Per cell, in ascending id order, check the batch against the cell's log and turn it into
//!    records ([`CellLog::plan`]); any refusal returns before anything is written.
//! 3. Append every record with one `SegLog::append_batch` (a failure poisons the store).
//! 4. Apply each record to its cell index with its position ([`CellLog::apply`], the same code
//!    recovery runs); appended entries stay cached, so raft reads them before `sync`.
//! 5. `LogStore::sync` (separately, once per round) is one `SegLog::sync` for every cell written
//!    since the last sync, then trims those cells' caches to the configured budget.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use proto::CellId;
use raft::eraftpb::{ConfState, Snapshot};

use super::backend::Backend;
use super::cell_log::CellLog;
use super::cell_storage::CellStorage;
use super::error::{LogPosition, Op, StorageError};
use super::record::{self, Record};
use super::WriteBatch;

/// Tuning of the in-memory side of the log.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Durable entries kept cached per cell after a sync, newest first (default 1024). Entries
    /// not yet synced are always cached.
    pub cache_entries_per_cell: usize,
    /// Byte budget (data + context) of the cached durable entries per cell (default 4 MiB).
    pub cache_bytes_per_cell: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_entries_per_cell: 1024,
            cache_bytes_per_cell: 4 << 20,
        }
    }
}

/// Counters of a [`LogStore`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Payload bytes handed to the seglog (0 for memory).
    pub bytes_appended: u64,
    /// Records handed to the seglog (0 for memory).
    pub records_appended: u64,
    /// Group commits issued (`sync` calls that reached the seglog).
    pub syncs: u64,
    /// Entries held in memory, all cells.
    pub entries_cached: u64,
    /// Cells with a log on this node.
    pub cells: u64,
    /// Seglog segments on disk (0 for memory).
    pub segments: u64,
}

/// Snapshot offers and requests of one cell (see [`CellStorage::offer_snapshot`]).
#[derive(Debug, Default)]
pub(crate) struct SnapOffers {
    pub(crate) offered: Option<Snapshot>,
    pub(crate) requested: Option<u64>,
}

/// A cell's shared state: its index and its snapshot offers.
#[derive(Debug)]
pub(crate) struct CellShared {
    pub(crate) id: CellId,
    pub(crate) log: Mutex<CellLog>,
    pub(crate) snap: Mutex<SnapOffers>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) backend: Backend,
    pub(crate) options: StoreOptions,
    /// Largest record the backend accepts.
    pub(crate) max_record: usize,
    /// Held by every append (write, destroy, GC), so log order == index update order.
    pub(crate) writer: Mutex<()>,
    /// Cells written since the last sync (their caches are trimmed after it).
    pub(crate) dirty: Mutex<HashSet<CellId>>,
    pub(crate) cells: RwLock<HashMap<CellId, Arc<CellShared>>>,
    /// The first fatal error; once set, every call fails with it.
    pub(crate) poison: Mutex<Option<StorageError>>,
    pub(crate) bytes_appended: AtomicU64,
    pub(crate) records_appended: AtomicU64,
    pub(crate) syncs: AtomicU64,
}

/// The node-wide raft log shared by every cell of a node: one seglog (durable backend) or
/// memory. Cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct LogStore {
    pub(crate) inner: Arc<Inner>,
}

impl Inner {
    pub(crate) fn new(backend: Backend, options: StoreOptions, max_record: usize) -> Self {
        Inner {
            backend,
            options,
            max_record,
            writer: Mutex::new(()),
            dirty: Mutex::new(HashSet::new()),
            cells: RwLock::new(HashMap::new()),
            poison: Mutex::new(None),
            bytes_appended: AtomicU64::new(0),
            records_appended: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    pub(crate) fn check_poison(&self) -> Result<(), StorageError> {
        match &*self.poison.lock() {
            Some(e) => Err(StorageError::Poisoned(Box::new(e.clone()))),
            None => Ok(()),
        }
    }

    /// Records `e` as the poison (the first one wins) and returns it.
    pub(crate) fn poison(&self, e: StorageError) -> StorageError {
        let mut p = self.poison.lock();
        if p.is_none() {
            *p = Some(e.clone());
        }
        e
    }

    fn cell_shared(&self, cell: CellId) -> Arc<CellShared> {
        if let Some(c) = self.cells.read().get(&cell) {
            return c.clone();
        }
        self.cells
            .write()
            .entry(cell)
            .or_insert_with(|| {
                Arc::new(CellShared {
                    id: cell,
                    log: Mutex::new(CellLog::new(cell)),
                    snap: Mutex::new(SnapOffers::default()),
                })
            })
            .clone()
    }

    /// Encodes and appends records (writer lock held by the caller); poisons on failure.
    pub(crate) fn append_records(
        &self,
        records: &[Record],
    ) -> Result<Vec<Option<LogPosition>>, StorageError> {
        if matches!(self.backend, Backend::Memory) {
            return Ok(vec![None; records.len()]);
        }
        let mut bufs = Vec::with_capacity(records.len());
        for r in records {
            let buf = match r {
                Record::Entries { cell, entries } => record::encode_entries(*cell, entries)
                    .map_err(|_| StorageError::EntryTooLarge {
                        cell: *cell,
                        index: entries.first().map_or(0, |e| e.index),
                        size: usize::MAX,
                        max: self.max_record,
                    })?,
                other => record::encode_small(other),
            };
            bufs.push(buf);
        }
        let positions = self.backend.append(&bufs).map_err(|e| {
            let cell = records.first().map(Record::cell);
            self.poison(StorageError::log(Op::Append, cell, e))
        })?;
        let bytes: usize = bufs.iter().map(Vec::len).sum();
        self.bytes_appended
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.records_appended
            .fetch_add(bufs.len() as u64, Ordering::Relaxed);
        Ok(positions)
    }
}

impl LogStore {
    /// Durable backend on a seglog in `dir`; recovers every cell's log (entries, hard state,
    /// truncated state) from it. Returns the ids of the cells found, ascending.
    ///
    /// # Errors
    /// A seglog error, or a corrupt record (`StorageError::Corrupt`, naming the cell when the
    /// record's header was readable). Corruption is never truncated away: the node must not
    /// serve until it is repaired.
    pub fn open(
        dir: impl AsRef<Path>,
        config: seglog::Config,
    ) -> Result<(LogStore, Vec<CellId>), StorageError> {
        Self::open_with(dir, config, StoreOptions::default())
    }

    /// [`LogStore::open`] with cache options.
    pub fn open_with(
        dir: impl AsRef<Path>,
        config: seglog::Config,
        options: StoreOptions,
    ) -> Result<(LogStore, Vec<CellId>), StorageError> {
        super::recovery::open(dir.as_ref(), config, options)
    }

    /// Memory backend: nothing on disk; `sync` is a no-op.
    pub fn in_memory() -> LogStore {
        let max_record = seglog::Config::default().max_record_size as usize;
        LogStore {
            inner: Arc::new(Inner::new(
                Backend::Memory,
                StoreOptions::default(),
                max_record,
            )),
        }
    }

    /// This cell's raft storage (created empty if unknown). `conf_state` is the ConfState as of
    /// the state machine's durable applied index; it replaces the one held so far.
    pub fn cell(&self, cell: CellId, conf_state: ConfState) -> Result<CellStorage, StorageError> {
        self.inner.check_poison()?;
        let shared = self.inner.cell_shared(cell);
        shared.log.lock().conf_state = conf_state;
        Ok(CellStorage::new(shared, self.inner.clone()))
    }

    /// Applies one round's writes for many cells. Entries become readable through their
    /// `CellStorage` immediately (entry cache), before `sync`, as raft-rs requires.
    ///
    /// # Errors
    /// Request errors (the whole batch is refused, nothing written) or a fatal seglog error
    /// (the store is poisoned).
    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        match self.write_inner(batch, false)?.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Like [`LogStore::write`], but a cell whose writes are refused (a request error such as
    /// `EntryTooLarge` or `NonContiguous`) is left out and returned with its error, and the
    /// other cells' writes go ahead: one cell's bad batch fences that cell, not the node.
    ///
    /// # Errors
    /// Only fatal ones (poisoned store, failed seglog append).
    pub fn write_fencing(
        &self,
        batch: WriteBatch,
    ) -> Result<Vec<(CellId, StorageError)>, StorageError> {
        self.write_inner(batch, true)
    }

    fn write_inner(
        &self,
        batch: WriteBatch,
        partial: bool,
    ) -> Result<Vec<(CellId, StorageError)>, StorageError> {
        let inner = &self.inner;
        inner.check_poison()?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let _writer = inner.writer.lock();
        let mut planned = Vec::with_capacity(batch.cells.len());
        let mut refused = Vec::new();
        for (cell, w) in batch.cells {
            let shared = inner.cell_shared(cell);
            let records = match shared.log.lock().plan(&w, inner.max_record) {
                Ok(r) => r,
                Err(e) => {
                    refused.push((cell, e));
                    if partial {
                        continue;
                    }
                    return Ok(refused);
                }
            };
            let conf = w.snapshot.map(|mut m| m.take_conf_state());
            planned.push((shared, records, conf));
        }
        let all: Vec<Record> = planned
            .iter()
            .flat_map(|(_, records, _)| records.iter().cloned())
            .collect();
        if all.is_empty() {
            return Ok(refused);
        }
        let positions = inner.append_records(&all)?;
        let mut positions = positions.into_iter();
        let mut dirty = inner.dirty.lock();
        for (shared, records, conf) in planned {
            let mut log = shared.log.lock();
            for r in records {
                log.apply(r, positions.next().flatten());
            }
            if let Some(cs) = conf {
                log.conf_state = cs;
            }
            dirty.insert(shared.id);
        }
        Ok(refused)
    }

    /// Makes everything written so far durable: one group commit (seglog sync) for all cells.
    pub fn sync(&self) -> Result<(), StorageError> {
        let inner = &self.inner;
        inner.check_poison()?;
        let dirty: Vec<CellId> = inner.dirty.lock().drain().collect();
        let durable = inner
            .backend
            .sync()
            .map_err(|e| inner.poison(StorageError::log(Op::Sync, None, e)))?;
        let Some(end) = durable else {
            return Ok(());
        };
        inner.syncs.fetch_add(1, Ordering::Relaxed);
        let cells = inner.cells.read();
        for id in dirty {
            if let Some(c) = cells.get(&id) {
                c.log.lock().trim_cache(
                    end,
                    inner.options.cache_entries_per_cell,
                    inner.options.cache_bytes_per_cell,
                );
            }
        }
        Ok(())
    }

    /// Forgets a cell (removed from this node or merged): its records become garbage. Durable
    /// after the next `sync`; until then a crash brings the cell back. Existing `CellStorage`
    /// handles of the cell fail with `CellDestroyed`.
    pub fn destroy_cell(&self, cell: CellId) -> Result<(), StorageError> {
        let inner = &self.inner;
        inner.check_poison()?;
        let _writer = inner.writer.lock();
        let Some(shared) = inner.cells.read().get(&cell).cloned() else {
            return Ok(());
        };
        let rec = Record::Destroy { cell };
        inner.append_records(std::slice::from_ref(&rec))?;
        shared.log.lock().apply(rec, None);
        inner.cells.write().remove(&cell);
        inner.dirty.lock().remove(&cell);
        Ok(())
    }

    /// Ids of the cells with a log here, ascending.
    pub fn cells(&self) -> Vec<CellId> {
        let mut ids: Vec<CellId> = self.inner.cells.read().keys().copied().collect();
        ids.sort();
        ids
    }

    /// Reclaims whole seglog segments that no live record needs (re-writing live metadata
    /// first). See [`GcStats`](super::GcStats) for what blocks it.
    pub fn gc(&self) -> Result<super::GcStats, StorageError> {
        super::gc::run(&self.inner)
    }

    /// Counters: bytes appended, syncs issued, entries cached, segments.
    pub fn stats(&self) -> LogStats {
        let inner = &self.inner;
        let cells = inner.cells.read();
        let entries_cached = cells
            .values()
            .map(|c| c.log.lock().cached_entries() as u64)
            .sum();
        LogStats {
            bytes_appended: inner.bytes_appended.load(Ordering::Relaxed),
            records_appended: inner.records_appended.load(Ordering::Relaxed),
            syncs: inner.syncs.load(Ordering::Relaxed),
            entries_cached,
            cells: cells.len() as u64,
            segments: inner.backend.seg().map_or(0, |s| s.segments().len() as u64),
        }
    }

    /// Every record before this position is durable (`None` for the memory backend). For tests
    /// and diagnostics.
    pub fn durable_end(&self) -> Option<LogPosition> {
        self.inner
            .backend
            .seg()
            .map(|s| super::backend::from_pos(s.durable_end()))
    }

    /// Whether this is the memory backend (nothing on disk, `sync` is a no-op).
    pub fn is_memory(&self) -> bool {
        matches!(self.inner.backend, Backend::Memory)
    }

    /// The first fatal error, if the store is poisoned.
    pub fn poisoned(&self) -> Option<StorageError> {
        self.inner.poison.lock().clone()
    }
}
