//! [`CellStorage`]: `raft::Storage` for one cell, over the shared log.

use std::sync::Arc;

use proto::CellId;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};

use super::cell_log::{Fetch, Miss};
use super::error::{LogPosition, Op, StorageError};
use super::record::{self, Record};
use super::store::{CellShared, Inner};

/// `raft::Storage` for one cell. Cheap to clone.
///
/// # Correctness requirements (what the cell must do)
/// - Write every `Ready`'s snapshot, entries and hard state through
///   [`LogStore::write`](super::LogStore::write) before `advance`, and `sync` before sending
///   persisted messages.
/// - Call [`CellStorage::set_conf_state`] after applying a conf change.
/// - Compact only below a durably applied index.
///
/// # Errors
/// `Compacted` below `first_index` (and below `first_index - 1` for `term`), `Unavailable`
/// above `last_index` (raft-rs panics there in `MemStorage`; this never panics),
/// `SnapshotTemporarilyUnavailable` from `snapshot` until the cell offers one, and `Other` with a
/// [`StorageError`] when the store is poisoned, the cell destroyed, or a read from disk fails.
#[derive(Clone, Debug)]
pub struct CellStorage {
    shared: Arc<CellShared>,
    store: Arc<Inner>,
}

fn miss(m: Miss) -> raft::Error {
    raft::Error::Store(match m {
        Miss::Compacted => raft::StorageError::Compacted,
        Miss::Unavailable => raft::StorageError::Unavailable,
    })
}

impl CellStorage {
    pub(crate) fn new(shared: Arc<CellShared>, store: Arc<Inner>) -> Self {
        CellStorage { shared, store }
    }

    /// The cell this storage belongs to.
    pub fn cell(&self) -> CellId {
        self.shared.id
    }

    /// The size one entry with `data_len` bytes of data and `context_len` bytes of context
    /// takes in the log, and the largest record the log accepts. An entry bigger than the
    /// limit is refused by every write that carries it; since the leader replicates before
    /// its own write, it must be refused before it is proposed. Every node of a cluster must
    /// run the same `max_record_size`, or a follower with a smaller one refuses entries its
    /// leader accepted.
    pub fn entry_record_size(&self, data_len: usize, context_len: usize) -> (usize, usize) {
        let e = Entry::default();
        let size = record::HEADER_LEN
            + record::ENTRIES_HEADER_LEN
            + record::entry_len(&e)
            + data_len
            + context_len;
        (size, self.store.max_record)
    }

    /// Sets the ConfState returned by `initial_state` (after applying a conf change).
    pub fn set_conf_state(&self, cs: ConfState) {
        self.shared.log.lock().conf_state = cs;
    }

    /// The last hard state written (raised by an installed snapshot).
    pub fn hard_state(&self) -> HardState {
        self.shared.log.lock().hard_state().clone()
    }

    /// The cell hands a freshly generated snapshot. `Storage::snapshot` returns it while its
    /// index is at least the requested index and the truncated index (an older one would make
    /// the follower ask again forever), and only to a member its ConfState names (the cell
    /// also drops it whenever a conf change applies, see [`drop_offered_snapshot`]).
    ///
    /// [`drop_offered_snapshot`]: Self::drop_offered_snapshot
    pub fn offer_snapshot(&self, snap: Snapshot) {
        self.shared.snap.lock().offered = Some(snap);
    }

    /// Forgets the offered snapshot: once it was sent (a cell's image is not kept in memory for
    /// ever) and whenever the membership changes (its ConfState is stale: a member added since
    /// would ignore it). Raft asks again and the cell builds a fresh one if a follower needs it.
    pub fn drop_offered_snapshot(&self) {
        self.shared.snap.lock().offered = None;
    }

    /// The highest snapshot index raft asked for and did not get, cleared by this call. The cell
    /// polls it after each ready round, builds a snapshot at its applied index (which must be
    /// >= the returned index) and offers it.
    pub fn take_snapshot_request(&self) -> Option<u64> {
        self.shared.snap.lock().requested.take()
    }

    fn check(&self) -> raft::Result<()> {
        self.store.check_poison()?;
        if self.shared.log.lock().destroyed {
            return Err(StorageError::CellDestroyed {
                cell: self.shared.id,
            }
            .into());
        }
        Ok(())
    }

    /// Reads the Entries record at `loc` back from the seglog.
    fn read_record(&self, loc: LogPosition) -> Result<Vec<Entry>, StorageError> {
        let cell = self.shared.id;
        let Some(seg) = self.store.backend.seg() else {
            return Err(StorageError::Corrupt {
                op: Op::Read,
                cell: Some(cell),
                position: loc,
                reason: "memory backend has no records".into(),
            });
        };
        let bytes = seg
            .read(super::backend::to_pos(loc))
            .map_err(|e| StorageError::log(Op::Read, Some(cell), e))?;
        let corrupt = |reason: String| StorageError::Corrupt {
            op: Op::Read,
            cell: Some(cell),
            position: loc,
            reason,
        };
        match record::decode(&bytes) {
            Ok(Record::Entries { cell: c, entries }) if c == cell => Ok(entries),
            Ok(other) => Err(corrupt(format!(
                "expected entries of {cell}, found {other:?}"
            ))),
            Err(e) => Err(corrupt(e.reason)),
        }
    }

    fn fetch(&self, plan: Vec<Fetch>, max_size: Option<u64>) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::with_capacity(plan.len());
        let mut size = 0u64;
        let mut decoded: Option<(LogPosition, Vec<Entry>)> = None;
        for f in plan {
            let e = match f {
                Fetch::Cached(e) => e,
                Fetch::Disk { loc, index, term } => {
                    if decoded.as_ref().is_none_or(|(l, _)| *l != loc) {
                        decoded = Some((loc, self.read_record(loc)?));
                    }
                    // Entries of a record are consecutive (checked when decoding).
                    let found = decoded
                        .as_ref()
                        .and_then(|(_, es)| {
                            let first = es.first()?.index;
                            es.get(usize::try_from(index.checked_sub(first)?).ok()?)
                        })
                        .filter(|e| e.index == index && e.term == term)
                        .cloned();
                    found.ok_or_else(|| StorageError::Corrupt {
                        op: Op::Read,
                        cell: Some(self.shared.id),
                        position: loc,
                        reason: format!("record lacks entry {index} at term {term}"),
                    })?
                }
            };
            size += u64::from(e.compute_size());
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }
}

impl raft::Storage for CellStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.check()?;
        let log = self.shared.log.lock();
        Ok(RaftState::new(
            log.hard_state().clone(),
            log.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.check()?;
        let max_size = max_size.into();
        let plan = self
            .shared
            .log
            .lock()
            .entries_plan(low, high, max_size)
            .map_err(miss)?;
        match self.fetch(plan, max_size) {
            Ok(entries) => Ok(entries),
            Err(e) => {
                // A compaction + GC may have removed the segment since the plan was made.
                if low < self.shared.log.lock().first_index() {
                    return Err(miss(Miss::Compacted));
                }
                Err(e.into())
            }
        }
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.check()?;
        self.shared.log.lock().term(idx).map_err(miss)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.check()?;
        Ok(self.shared.log.lock().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.check()?;
        Ok(self.shared.log.lock().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.check()?;
        let truncated = self.shared.log.lock().truncated().0;
        let mut offers = self.shared.snap.lock();
        if let Some(s) = &offers.offered {
            // An image from before `to` joined does not name it: raft-rs on `to` ignores it
            // and the member never catches up. Forget it; the cell builds a fresh one (the
            // leader has applied `to`'s addition, or raft would not be sending to it).
            if !crate::membership::contains(s.get_metadata().get_conf_state(), to) {
                offers.offered = None;
            } else if s.get_metadata().index >= request_index.max(truncated) {
                return Ok(s.clone());
            }
        }
        offers.requested = Some(
            offers
                .requested
                .map_or(request_index, |r| r.max(request_index)),
        );
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
