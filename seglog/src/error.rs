//! The one error type of the crate.
//!
//! Variants carry the ids a caller acts on (segment numbers, offsets, positions), not formatted text.
//! [`Error::Corrupt`] and [`Error::Poisoned`] are fatal for the log: the owner must stop using it
//! (a raft replica stops voting until it is repaired); the others describe one bad call.

use std::path::PathBuf;

use crate::Position;

/// Everything that can go wrong in `seglog`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed. `op` names what we were doing (`"open segment"`, `"msync"`, ...).
    #[error("seglog: {op} {}: {source}", path.display())]
    Io {
        /// What the log was doing.
        op: &'static str,
        /// The file or directory it was doing it to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Damage that is not a torn tail: an invalid record or segment header in data that was
    /// durable (below the persisted durable mark, or followed by a segment that claims durable
    /// records), or a missing segment. Recovery never skips it and never returns it as data.
    #[error("seglog: segment {segment} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// Segment number.
        segment: u64,
        /// Byte offset inside the segment file.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// The payload is larger than [`crate::Config::max_record_size`].
    #[error("seglog: record of {size} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge {
        /// Payload size.
        size: usize,
        /// The configured limit.
        limit: u32,
    },
    /// `pos` is not the position of a record in the log (never was, was truncated, or was
    /// dropped by segment GC).
    #[error("seglog: no record at position {}:{}", pos.segment, pos.offset)]
    InvalidPosition {
        /// The position asked for.
        pos: Position,
    },
    /// A [`crate::Config`] field is out of range.
    #[error("seglog: invalid config `{field}`: {why}")]
    InvalidConfig {
        /// Field name.
        field: &'static str,
        /// Why it was rejected.
        why: String,
    },
    /// Another `SegLog` (this process or another) holds the directory lock.
    #[error("seglog: {} is locked by another open log", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A flush (msync/fsync) failed earlier. After a failed fsync the kernel may have dropped the
    /// dirty pages, so what is on disk is unknown: the log refuses writes, syncs, truncates and GC
    /// until it is reopened (which re-runs recovery).
    #[error("seglog: poisoned by an earlier failed flush; reopen the log")]
    Poisoned,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_segment_and_offset() {
        let e = Error::Corrupt {
            segment: 7,
            offset: 4096,
            reason: "bad checksum".into(),
        };
        assert_eq!(
            e.to_string(),
            "seglog: segment 7 is corrupt at offset 4096: bad checksum"
        );
        let e = Error::InvalidPosition {
            pos: Position {
                segment: 2,
                offset: 9,
            },
        };
        assert_eq!(e.to_string(), "seglog: no record at position 2:9");
    }
}
