//! Raft storage for Harpoon cells: a log store shared by many cells, on a seglog (durable) or
//! in memory. A node holds two, its durable one and a volatile in-memory one; each cell's log
//! lives in the one its `LogKind` names, and the two never share a record (so neither pins the
//! other's segments or memory).
//!
//! # Files
//! - `mod.rs`: this map, the record format and the recovery/GC rules.
//! - `store.rs`: [`LogStore`], the node's log, and the write path (write, sync, destroy).
//! - `batch.rs`: [`WriteBatch`], one driver round's writes for many cells.
//! - `cell_storage.rs`: [`CellStorage`], `raft::Storage` for one cell, and snapshot offers.
//! - `cell_log.rs`: one cell's index (entry locations, entry cache, truncated state, hard state);
//!   the only code that changes a cell, shared by the write path and recovery.
//! - `record.rs`: the byte format of every record (the only place that builds or parses one).
//! - `recovery.rs`: `LogStore::open`, replaying the seglog.
//! - `gc.rs`: segment GC and [`GcStats`].
//! - `backend.rs`: seglog or memory; everything else is shared by both backends.
//! - `error.rs`: [`StorageError`].
//!
//! # Records
//! Every cell appends to the same seglog; each record names its cell (`record.rs` has the
//! bytes, little-endian, fixed width):
//!
//! | kind | record | body | effect on the cell when applied |
//! |---|---|---|---|
//! | 1 | `Entries{cell, entries}` | first index, count, per entry term/type/flags/data/context | replaces the log from `entries[0].index` on |
//! | 2 | `HardState{cell, hs}` | term, vote, commit | hard state = `hs` |
//! | 3 | `Snapshot{cell, index, term}` | index, term | log emptied, truncated = (index, term), hs.commit/term raised |
//! | 4 | `Compact{cell, index, term}` | index, term | entries <= index dropped, truncated = (index, term) |
//! | 5 | `Destroy{cell}` | - | the cell is forgotten; later records start a new one |
//!
//! Length, checksum and torn-tail handling are the seglog's. The ConfState is not in the log:
//! the cell passes it to [`LogStore::cell`] from its state machine (and it follows installed
//! snapshots and [`CellStorage::set_conf_state`] in memory).
//!
//! # Conflicts, recovery, durability
//! - The shared log cannot be cut (other cells' records follow), so entries at index `i`
//!   logically replace the cell's entries `>= i`. Recovery replays every record in log order
//!   through the same `CellLog::apply`, so the state after a restart is the state before.
//! - The rules are per index (last writer wins; Compact/Snapshot remove below), which makes
//!   replaying only a suffix of the log (what GC leaves) exact: dead entries met before the
//!   record that truncated the log under them leave a transient hole, and recovery checks that
//!   every cell ends contiguous (`Corrupt` otherwise).
//! - A cell's appended entries stay in its in-memory cache at least until they are synced, so
//!   raft reads them before `sync` (raft's `persisted` only advances when `term(i)` answers).
//!   After a sync each cell keeps its newest `cache_entries_per_cell` entries; older ones are
//!   read back from the seglog by position.
//! - `sync` is one `SegLog::sync` for everything written by every cell since the last one.
//!   A failed append or sync poisons the store: every later call returns
//!   [`StorageError::Poisoned`].
//! - Corruption found while opening is returned as an error ([`StorageError::Corrupt`] or a
//!   seglog error), never truncated away; the node must not serve until repaired.
//!
//! # GC
//! See `gc.rs`: segments are dropped as a prefix once they hold no live entry, after the live
//! hard states and truncated states stored in them are re-appended. A cell that cannot compact
//! pins old segments and is reported in [`GcStats::pinned`]; forcing it is the caller's call.

mod backend;
mod batch;
mod cell_log;
mod cell_storage;
mod error;
mod gc;
mod record;
mod recovery;
mod store;

pub use batch::WriteBatch;
pub use cell_storage::CellStorage;
pub use error::{LogPosition, Op, StorageError};
pub use gc::{GcPin, GcStats};
pub use proto::CellId;
pub use store::{LogStats, LogStore, StoreOptions};
