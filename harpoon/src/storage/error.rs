//! Storage errors: one enum for the node's raft log, with the cell and the operation in each
//! variant (openraft's subject/verb idea), split into request errors (nothing was written, the
//! log is fine) and fatal errors (the log is poisoned, see [`StorageError::is_fatal`]).

use std::fmt;
use std::sync::Arc;

use proto::CellId;

/// What the log was doing when an error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Opening the log and replaying its records.
    Recover,
    /// Appending one round's records (`LogStore::write`, `destroy_cell`, GC checkpoints).
    Append,
    /// Group commit (`LogStore::sync`).
    Sync,
    /// Reading an entry back from the seglog (`Storage::entries`).
    Read,
    /// Dropping whole segments (`LogStore::gc`).
    Gc,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Recover => "recover",
            Op::Append => "append",
            Op::Sync => "sync",
            Op::Read => "read",
            Op::Gc => "gc",
        })
    }
}

/// Where a record sits in the node's log (mirrors `seglog::Position`, kept here so the error
/// type does not depend on the backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition {
    /// Segment number.
    pub segment: u64,
    /// Byte offset of the record inside its segment.
    pub offset: u64,
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// Displays an optional cell as `" of c7"` or nothing.
struct OptCell(Option<CellId>);

impl fmt::Display for OptCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(c) => write!(f, " of {c}"),
            None => Ok(()),
        }
    }
}

/// Errors of the node's raft log.
///
/// Request errors (`EntryTooLarge`, `NonContiguous`, `OverwriteCompacted`, `SnapshotOutOfDate`,
/// `CompactBeyondLast`, `CellDestroyed`) are detected before anything is written: the batch is
/// refused as a whole and the log stays usable. Everything else is fatal: a failed append or sync
/// poisons the [`LogStore`](super::LogStore) and every later call returns
/// [`StorageError::Poisoned`] wrapping the first failure; corruption found on open refuses to open
/// (the cell, or the node when the cell is unknown, must not serve until repaired).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The seglog failed (I/O error, full disk, ...).
    #[error("raft log {op} failed{}: {source}", OptCell(*cell))]
    Log {
        op: Op,
        cell: Option<CellId>,
        #[source]
        source: Arc<seglog::Error>,
    },
    /// A record is damaged: a seglog checksum failure with valid records after it, or a record
    /// that passed its checksum but does not decode. Never truncated away.
    #[error("raft log record{} at {position} is corrupt ({op}): {reason}", OptCell(*cell))]
    Corrupt {
        op: Op,
        cell: Option<CellId>,
        position: LogPosition,
        reason: String,
    },
    /// An earlier append or sync failed; the log accepts nothing any more.
    #[error("raft log is poisoned by an earlier failure: {0}")]
    Poisoned(Box<StorageError>),
    /// One entry does not fit in a seglog record.
    #[error("entry {index} of {cell} is {size} bytes encoded, above the record limit {max}")]
    EntryTooLarge {
        cell: CellId,
        index: u64,
        size: usize,
        max: usize,
    },
    /// Appended entries are not contiguous, or leave a gap after the last index.
    #[error("append to {cell}: entry {index} does not follow {expected_before}")]
    NonContiguous {
        cell: CellId,
        index: u64,
        expected_before: u64,
    },
    /// Appended entries start inside the compacted prefix.
    #[error("append to {cell}: entry {index} is below first index {first_index}")]
    OverwriteCompacted {
        cell: CellId,
        index: u64,
        first_index: u64,
    },
    /// A snapshot at or below the truncated index.
    #[error("snapshot of {cell} at {index} is not after the truncated index {truncated}")]
    SnapshotOutOfDate {
        cell: CellId,
        index: u64,
        truncated: u64,
    },
    /// Compaction past the last index.
    #[error("compact {cell} to {index}: beyond last index {last_index}")]
    CompactBeyondLast {
        cell: CellId,
        index: u64,
        last_index: u64,
    },
    /// The cell was destroyed while a `CellStorage` handle was still in use.
    #[error("{cell} was destroyed")]
    CellDestroyed { cell: CellId },
}

impl StorageError {
    /// True for failures that poison the log (as opposed to a refused request).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StorageError::Log { .. } | StorageError::Corrupt { .. } | StorageError::Poisoned(_)
        )
    }

    /// Wraps a seglog error; seglog's `Corrupt` becomes [`StorageError::Corrupt`].
    pub(crate) fn log(op: Op, cell: Option<CellId>, source: seglog::Error) -> Self {
        match source {
            seglog::Error::Corrupt {
                segment,
                offset,
                reason,
            } => StorageError::Corrupt {
                op,
                cell,
                position: LogPosition { segment, offset },
                reason,
            },
            source => StorageError::Log {
                op,
                cell,
                source: Arc::new(source),
            },
        }
    }
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}
