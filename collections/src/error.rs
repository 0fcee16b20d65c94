//! [`KvError`]: the one error enum of the KV collection, and its wire form.
//!
//! Two families, kept apart (STYLE.md 6): *command errors* (limits, bad arguments, compacted
//! revisions) describe one bad request; [`KvStore::apply`](crate::kv::KvStore::apply) turns them
//! into an error reply and the store carries on. *Fatal errors* (`Storage`, `Io`, `Corrupt`,
//! `Poisoned`) mean the store's disk state is unknown: the node must stop applying to this range.

use std::path::PathBuf;

use proto::kvpb;

/// Everything that can go wrong in the KV collection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The command bytes or a field are invalid.
    #[error("kv: invalid argument `{field}`: {why}")]
    InvalidArgument {
        /// The field (or `"command"` for undecodable bytes).
        field: &'static str,
        /// Why it was refused.
        why: String,
    },
    /// Key longer than the limit (or empty: `size` 0).
    #[error("kv: key of {size} bytes outside the limit 1..={limit}")]
    KeyTooLarge {
        /// Key size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Value longer than the limit.
    #[error("kv: value of {size} bytes exceeds the limit {limit}")]
    ValueTooLarge {
        /// Value size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A batch with too many ops or bytes.
    #[error("kv: batch of {size} exceeds the limit {limit} ({what})")]
    BatchTooLarge {
        /// Ops or bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
        /// `"ops"` or `"bytes"`.
        what: &'static str,
    },
    /// History at or below `compact_revision` is gone.
    #[error("kv: revision {requested} is compacted (horizon {compact_revision})")]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The current horizon.
        compact_revision: u64,
    },
    /// A revision the store has not reached.
    #[error("kv: revision {requested} is in the future (current {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: u64,
        /// The store's revision.
        current: u64,
    },
    /// The key lies outside the store's bounds `[lo, hi)` (after a split).
    #[error("kv: key outside this range's bounds")]
    KeyOutOfRange,
    /// The data log failed (fatal).
    #[error("kv: data log: {0}")]
    Storage(#[from] seglog::Error),
    /// A file operation failed (fatal). `op` names what the store was doing.
    #[error("kv: {op} {}: {source}", path.display())]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Stored bytes (data-log record, snapshot file or chunk) do not decode (fatal for files).
    #[error("kv: corrupt {what}: {why}")]
    Corrupt {
        /// What was being decoded.
        what: &'static str,
        /// What was wrong.
        why: String,
    },
    /// A snapshot image or the recovered data log holds a field value no store can reach
    /// (revision u64::MAX, `create_revision > mod_revision`, version 0, ...): fatal like
    /// `Corrupt`. `field` names it (`"revision"`, `"kv.version"`, `"event.mod_revision"`, ...).
    #[error("kv: corrupt {what}: field `{field}`: {why}")]
    InvalidField {
        /// What was being restored or recovered (`"snapshot"`, `"data log"`).
        what: &'static str,
        /// The field.
        field: &'static str,
        /// Its value and why it was refused.
        why: String,
    },
    /// A counter cannot advance: the store's revision is at its maximum
    /// ([`MAX_REVISION`](crate::kv::MAX_REVISION)); a key's version never exceeds the revision,
    /// so it cannot run out first. A command error: the write is refused (deterministically on
    /// every replica), reads go on.
    #[error("kv: {counter} {value} cannot advance")]
    CounterExhausted {
        /// `"revision"`.
        counter: &'static str,
        /// Its current value.
        value: u64,
    },
    /// A write's request id is older than what the range remembers (`kv/dedup.rs`): it was
    /// not applied now, and whether it was before is unknown. Wire code `REQUEST_EXPIRED`.
    #[error(
        "kv: request id expired: outcome unknown (client {client:016x} seq {seq} is older \
         than what the range remembers)"
    )]
    RequestExpired {
        /// The request id's client.
        client: u64,
        /// The request id's seq.
        seq: u64,
    },
    /// A snapshot of a persistent store was being read when a restore replaced the store's
    /// state: the values it still had to load were in the replaced data log. Nothing is
    /// damaged; take a new snapshot.
    #[error("kv: snapshot abandoned: a restore replaced the store's state while it was read")]
    SnapshotAbandoned,
    /// An earlier fatal error; the store refuses writes until reopened.
    #[error("kv: poisoned by an earlier storage failure; reopen the store")]
    Poisoned,
}

impl KvError {
    /// Whether the error is fatal for the store (disk state unknown) rather than about one request.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            KvError::Storage(_)
                | KvError::Io { .. }
                | KvError::Poisoned
                | KvError::InvalidField { .. }
        ) || matches!(self, KvError::Corrupt { what, .. } if *what != "command")
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        KvError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn field(what: &'static str, field: &'static str, why: impl Into<String>) -> Self {
        KvError::InvalidField {
            what,
            field,
            why: why.into(),
        }
    }

    pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> Self {
        KvError::InvalidArgument {
            field,
            why: why.into(),
        }
    }

    /// The wire form of a command error (fatal errors map to `UNKNOWN` with their text).
    pub fn to_pb(&self) -> kvpb::Error {
        let mut e = kvpb::Error::new();
        let (code, limit, actual) = match self {
            KvError::InvalidArgument { field, why } => {
                e.field = (*field).to_string();
                e.why = why.clone();
                (kvpb::ErrorCode::INVALID_ARGUMENT, 0, 0)
            }
            KvError::KeyTooLarge { size, limit } => {
                (kvpb::ErrorCode::KEY_TOO_LARGE, *limit as u64, *size as u64)
            }
            KvError::ValueTooLarge { size, limit } => (
                kvpb::ErrorCode::VALUE_TOO_LARGE,
                *limit as u64,
                *size as u64,
            ),
            KvError::BatchTooLarge { size, limit, what } => {
                e.field = (*what).to_string();
                (
                    kvpb::ErrorCode::BATCH_TOO_LARGE,
                    *limit as u64,
                    *size as u64,
                )
            }
            KvError::Compacted {
                requested,
                compact_revision,
            } => (kvpb::ErrorCode::COMPACTED, *compact_revision, *requested),
            KvError::FutureRevision { requested, current } => {
                (kvpb::ErrorCode::FUTURE_REVISION, *current, *requested)
            }
            KvError::KeyOutOfRange => (kvpb::ErrorCode::KEY_OUT_OF_RANGE, 0, 0),
            KvError::RequestExpired { .. } => {
                e.field = "request_id".into();
                // The wire text is the message without the crate prefix.
                e.why = self.to_string().trim_start_matches("kv: ").to_string();
                (kvpb::ErrorCode::REQUEST_EXPIRED, 0, 0)
            }
            other => {
                e.why = other.to_string();
                (kvpb::ErrorCode::UNKNOWN, 0, 0)
            }
        };
        e.code = code;
        e.limit = limit;
        e.actual = actual;
        if e.why.is_empty() {
            e.why = self.to_string();
        }
        e
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = KvError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_keeps_limits() {
        let e = KvError::ValueTooLarge { size: 10, limit: 5 }.to_pb();
        assert_eq!(e.code, kvpb::ErrorCode::VALUE_TOO_LARGE);
        assert_eq!((e.limit, e.actual), (5, 10));
        assert!(!KvError::KeyOutOfRange.is_fatal());
        assert!(KvError::Poisoned.is_fatal());
        assert!(!KvError::SnapshotAbandoned.is_fatal());
        let e = KvError::RequestExpired {
            client: 0xab,
            seq: 7,
        };
        assert!(!e.is_fatal());
        let pb = e.to_pb();
        assert_eq!(pb.code, kvpb::ErrorCode::REQUEST_EXPIRED);
        assert_eq!(pb.field, "request_id");
        assert_eq!(
            pb.why,
            "request id expired: outcome unknown (client 00000000000000ab seq 7 is older than \
             what the range remembers)"
        );
    }
}
