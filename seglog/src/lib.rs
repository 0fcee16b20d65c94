//! `seglog`: an mmap-backed, segmented append log with group commit and tail-tolerant recovery.
//!
//! Used by harpoon (one raft log per node, shared by its cells) and by collections (data logs).
//! The byte format, the durability protocol and the crash analysis are in
//! `docs/design/log-format.md`.
//!
//! # Layout
//!
//! - `format.rs`: the bytes: segment header, durable-mark slot, record frame
//!   `[frame_len | crc32 | payload]`, the nonce-seeded checksum. Pure functions, no I/O.
//! - `map.rs`: the one module with `unsafe`: a shared writable mapping with bounds-checked copies,
//!   and `release` (`MADV_DONTNEED`: drop written pages from the resident set, bytes unchanged).
//! - `segment.rs`: one segment file: atomic creation (tmp, preallocate, header, fsync, rename,
//!   directory fsync), record and mark writes through the mapping, msync, record reads with
//!   `pread` (which keep the pages they touch out of the process's resident set).
//! - `recovery.rs`: the scan on open, with `pread` only: torn tail cut and zeroed, damage to
//!   durable data reported as [`Error::Corrupt`].
//! - `log.rs`: [`SegLog`]: append, group-commit `sync`, read, iterate, truncate, segment GC; its
//!   module doc lists the write path step by step, including when written pages are released.
//! - `reap.rs`: deletes the segments GC dropped (renamed `NNN.seg.old`) on a thread of its own,
//!   a few MiB at a time, so freeing them does not stall every fsync on the file system.
//! - `config.rs`: [`Config`] and [`SyncMode`].
//! - `error.rs`: [`Error`].
//!
//! # Memory
//!
//! The log's resident memory does not grow with its size: reads use `pread`, a segment's pages
//! are dropped from the mapping when the log rolls past it, and the active segment's written
//! pages are dropped at the end of a sync round once 4 MiB more were written. The page cache
//! keeps the file's pages as long as the kernel likes, but that is reclaimable kernel memory,
//! not the process's RSS.
//!
//! # Example
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let (log, _recovery) = seglog::SegLog::open(dir.path(), seglog::Config::default()).unwrap();
//! let pos = log.append(b"hello").unwrap();
//! log.sync().unwrap();
//! assert_eq!(log.read(pos).unwrap(), b"hello");
//! ```

mod config;
mod error;
mod format;
mod log;
mod map;
mod reap;
mod recovery;
mod segment;

pub use config::{Config, SyncMode, MAX_SEGMENT_SIZE};
pub use error::{Error, Result};
pub use log::{Iter, Position, SegLog, SegmentInfo, Stats};
pub use reap::{remove_file_gently, shrink_and_remove};
pub use recovery::Recovery;

/// Scratch directory for unit tests: `SEGLOG_TEST_DIR` if set, else tmpfs when available
/// (fsync-heavy tests stay fast on a shared machine), else the default temp dir.
#[cfg(test)]
pub(crate) fn test_dir() -> tempfile::TempDir {
    if let Ok(d) = std::env::var("SEGLOG_TEST_DIR") {
        return tempfile::tempdir_in(d).expect("SEGLOG_TEST_DIR is writable");
    }
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn log_is_send_and_sync() {
        assert_send_sync::<SegLog>();
        assert_send_sync::<Iter>();
    }
}
