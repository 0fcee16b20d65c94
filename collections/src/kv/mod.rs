//! The KV collection: etcd-style keys with revisions, versions, TTL and watch, over one of
//! three persistence modes.
//!
//! - `types.rs`: public value types ([`KeyValue`], [`Event`], [`ApplyState`]) and config.
//! - `state.rs`: the in-memory state (index, TTL index, history); no I/O.
//! - `apply.rs`: command semantics (decode, validate, run); its module doc is the apply path.
//! - `dedup.rs`: request-id deduplication (a retried write applies once per range); the
//!   table's bounds and persistence are in its module doc.
//! - `store.rs`: [`KvStore`] (owner: apply, persist, restore, split, compaction) and
//!   [`KvReader`] (concurrent reads, watch, snapshots).
//! - `datalog.rs`: persistent mode's data-log records, recovery and compaction.
//! - `snapshot.rs`: the snapshot image (chunks, restore, logged-mode file).
//! - `key.rs`: the index's key type (short keys inline, so a search follows no pointers).
//! - `tracked.rs`: the map type of the index and history, which a snapshot reads while
//!   writes go on (a capture costs a registration, not a copy).
//! - `watch.rs`: history reads, the broadcast of applied changes, [`Watcher`].
//! - [`cmd`]: builders of `kvpb::Command`s.
//! - `codec.rs`: the little-endian field encoding of the data log and snapshots.

mod apply;
pub mod cmd;
mod codec;
mod datalog;
mod dedup;
mod key;
mod snapshot;
mod state;
mod store;
mod tracked;
mod types;
mod watch;

pub use dedup::{
    CLIENT_MAX_BYTES, EXPIRY_MS, MAX_BYTES, MAX_CLIENTS, PACKED_FIELD, PACKED_MAX_REPLY,
    REPLY_FULL_MAX, STRIPPED_FIELD, WINDOW,
};
pub use snapshot::{Restorer, SnapshotReader};
pub use state::{KeyRange, MAX_REVISION};
pub use store::{KvReader, KvStore, ReadHeader, ScanPage, ScanRequest};
pub use types::{
    prefix_end, ApplyState, Bounds, Event, EventKind, KeyValue, KvConfig, Limits, Persistence,
    RangeStats,
};
pub use watch::{Applied, Subscription, WatchBatch, WatchUpdate, Watcher};
