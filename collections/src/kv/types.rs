//! Public value types of the KV collection and its configuration.

use std::path::PathBuf;

use bytes::Bytes;
use proto::kvpb;

use crate::kv::state::KeyRange;

/// One key's current value and metadata (etcd semantics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Bytes,
    /// The value (empty in a delete event and in `keys_only` scans).
    pub value: Bytes,
    /// Revision of the put that created the key (since its last delete).
    pub create_revision: u64,
    /// Revision of the last write to the key (for a delete event: the delete's revision).
    pub mod_revision: u64,
    /// Puts since creation (1 after the first put; 0 in a delete event).
    pub version: u64,
    /// Entry-clock time at which the key expires; 0 = never.
    pub expires_at_ms: u64,
}

impl KeyValue {
    /// The wire form.
    pub fn to_pb(&self) -> kvpb::KeyValue {
        let mut kv = kvpb::KeyValue::new();
        kv.key = self.key.clone();
        kv.value = self.value.clone();
        kv.create_revision = self.create_revision;
        kv.mod_revision = self.mod_revision;
        kv.version = self.version;
        kv.expires_at_ms = self.expires_at_ms;
        kv
    }
}

/// Whether an event wrote or deleted its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was written.
    Put,
    /// The key was deleted (explicitly, by a range delete or by TTL expiry).
    Delete,
}

/// One change, as watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (for a delete: key and `mod_revision` = the delete's revision).
    pub kv: KeyValue,
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        self.kv.mod_revision
    }

    /// The wire form.
    pub fn to_pb(&self) -> kvpb::Event {
        let mut e = kvpb::Event::new();
        e.field_type = match self.kind {
            EventKind::Put => kvpb::EventType::PUT,
            EventKind::Delete => kvpb::EventType::DELETE,
        };
        e.kv = protobuf::SingularPtrField::some(self.kv.to_pb());
        e
    }
}

/// The durable (or current) apply state: what the consensus layer stores with the data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyState {
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// Term of that entry.
    pub applied_term: u64,
    /// Commit index the applies ran under (set by [`crate::kv::KvStore::set_commit`]).
    pub commit_index: u64,
    /// Term of the entry at `commit_index`.
    pub commit_term: u64,
    /// Opaque bytes of the consensus layer (e.g. its encoded `ConfState`), stored atomically
    /// with the data.
    pub apply_meta: Bytes,
}

/// The key bounds `[lo, hi)` a store serves (`hi` `None` = unbounded). Writes outside are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bounds {
    /// Inclusive lower bound (empty = from the start).
    pub lo: Bytes,
    /// Exclusive upper bound.
    pub hi: Option<Bytes>,
}

impl Bounds {
    /// Whether `key` lies in the bounds.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.lo.as_ref() && self.hi.as_ref().is_none_or(|hi| key < hi.as_ref())
    }

    /// Whether every key of `r` lies in the bounds (an empty range always does).
    pub fn covers(&self, r: &KeyRange) -> bool {
        if r.is_empty() {
            return true;
        }
        if r.start.as_ref() < self.lo.as_ref() {
            return false;
        }
        match (&self.hi, &r.end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(hi), Some(end)) => end <= hi,
        }
    }
}

/// Where a store keeps its data (DESIGN.md §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing on disk; the raft log (in memory too) is the only copy.
    Memory,
    /// State in memory; [`crate::kv::KvStore::persist`] writes a snapshot file `kv.snap` in
    /// `dir`, which bounds raft-log replay after a restart.
    Logged {
        /// The store's data dir.
        dir: PathBuf,
    },
    /// Data in a seglog data log under `dir`; the in-memory index holds positions, not values.
    Persistent {
        /// The store's data dir.
        dir: PathBuf,
    },
}

/// Size limits; violations are typed command errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest key (default 4 KiB). Empty keys are refused too.
    pub max_key_bytes: usize,
    /// Largest value (default 1.5 MiB, etcd's request limit).
    pub max_value_bytes: usize,
    /// Most ops in one `Batch` (default 10 000).
    pub max_batch_ops: usize,
    /// Largest command (default 16 MiB, the seglog record limit).
    pub max_command_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4 << 10,
            max_value_bytes: 3 << 19,
            max_batch_ops: 10_000,
            max_command_bytes: 16 << 20,
        }
    }
}

/// Configuration of one KV store (one range replica). Part of the collection's replicated
/// configuration: every replica must use the same `limits` and `history_max_events`, because
/// they influence what apply does.
#[derive(Clone, Debug)]
pub struct KvConfig {
    /// Persistence mode and data dir.
    pub persistence: Persistence,
    /// Size limits.
    pub limits: Limits,
    /// Watch history kept at most (events); older revisions are compacted at apply time,
    /// deterministically. Default 100 000. The leader's `Compact` commands implement time-based
    /// retention on top.
    pub history_max_events: usize,
    /// Watch history kept at most (bytes of keys plus values; default 64 MiB), enforced like
    /// `history_max_events`. In memory and logged modes history values are in memory (shared
    /// with live values where they are the same version), so this bounds that memory.
    pub history_max_bytes: u64,
    /// Data-log settings (persistent mode).
    pub seglog: seglog::Config,
    /// Capacity of each subscription channel (batches); a subscriber that falls this far behind
    /// is dropped and resumes from history. Default 1024.
    pub subscriber_capacity: usize,
}

impl KvConfig {
    /// A memory-mode config with defaults.
    pub fn memory() -> Self {
        Self::with(Persistence::Memory)
    }

    /// A config with defaults for `persistence`.
    pub fn with(persistence: Persistence) -> Self {
        KvConfig {
            persistence,
            limits: Limits::default(),
            history_max_events: 100_000,
            history_max_bytes: 64 << 20,
            seglog: seglog::Config::default(),
            subscriber_capacity: 1024,
        }
    }
}

/// Statistics of the live data, for split decisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeStats {
    /// Live keys (including expired keys not yet removed).
    pub keys: u64,
    /// Bytes of live keys plus values.
    pub bytes: u64,
    /// Events in the watch history.
    pub history_events: u64,
    /// The current revision.
    pub revision: u64,
    /// The history horizon.
    pub compact_revision: u64,
    /// A key near the middle of the live bytes (split candidate); `None` below two keys.
    pub middle_key: Option<Bytes>,
    /// Clients in the request-id table.
    pub dedup_clients: u64,
    /// Bytes of replies in the request-id table.
    pub dedup_bytes: u64,
}

/// Returns the exclusive end of the prefix range of `prefix` (`None`: unbounded, when the
/// prefix is empty or all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Bytes> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(Bytes::from(end));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_non_ff_byte() {
        assert_eq!(prefix_end(b"ab").as_deref(), Some(&b"ac"[..]));
        assert_eq!(prefix_end(b"a\xff").as_deref(), Some(&b"b"[..]));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn bounds_contain() {
        let b = Bounds {
            lo: Bytes::from_static(b"b"),
            hi: Some(Bytes::from_static(b"d")),
        };
        assert!(b.contains(b"b") && b.contains(b"c\xff") && !b.contains(b"d") && !b.contains(b"a"));
    }

    #[test]
    fn bounds_cover_ranges() {
        let r = |s: &'static [u8], e: Option<&'static [u8]>| KeyRange {
            start: Bytes::from_static(s),
            end: e.map(Bytes::from_static),
        };
        let b = Bounds {
            lo: Bytes::from_static(b"b"),
            hi: Some(Bytes::from_static(b"d")),
        };
        assert!(b.covers(&r(b"b", Some(b"d"))) && b.covers(&r(b"c", Some(b"c\0"))));
        assert!(!b.covers(&r(b"a", Some(b"c"))) && !b.covers(&r(b"c", Some(b"d\0"))));
        assert!(!b.covers(&r(b"c", None)));
        // Empty ranges are covered wherever they point.
        assert!(b.covers(&r(b"z", Some(b"a"))) && b.covers(&r(b"x", Some(b"x"))));
        assert!(r(b"x", Some(b"x")).is_empty() && !r(b"x", None).is_empty());
        let all = Bounds::default();
        assert!(all.covers(&KeyRange::all()) && all.covers(&r(b"q", None)));
    }
}
