//! `collections`: Quiver's typed state machines. Each collection applies committed commands
//! deterministically, serves reads concurrently with apply, and keeps its data in one of three
//! persistence modes (DESIGN.md §7). Design, formats and crash analysis:
//! `docs/design/collections.md`.
//!
//! # Layout
//! - [`kv`]: the KV collection ([`kv::KvStore`], [`kv::KvReader`]): put/delete/cas/batch,
//!   get/scan, per-key TTL on the entry clock, watch from a revision with history and resync,
//!   snapshots, range split, memory/logged/persistent modes (persistent: seglog data logs with
//!   an in-memory key index; values stay on disk).
//! - [`error`]: [`KvError`], command errors vs fatal storage errors, and their wire form.
//!
//! Commands and replies are the protobuf messages of `proto/protos/kvpb.proto`
//! ([`proto::kvpb`]).
//!
//! # Dependency rules
//! Depends on `proto` and `seglog` only. It must never depend on `harpoon`: the node layer
//! wraps a [`kv::KvStore`] into harpoon's `StateMachine`:
//!
//! | `StateMachine` | `KvStore` |
//! | --- | --- |
//! | `apply(entry)` | [`kv::KvStore::apply`]`(index, term, now_ms, data)` (`now_ms` from the entry) |
//! | `apply_conf_change(i, t, cs)` | [`kv::KvStore::set_apply_meta`]`(i, t, encoded cs)` |
//! | `set_commit(i, t)` | [`kv::KvStore::set_commit`] |
//! | `apply_state()` | [`kv::KvStore::durable_state`] (decode `apply_meta` back to a `ConfState`) |
//! | `persist()` | [`kv::KvStore::persist`] |
//! | `persist_background()` | [`kv::KvStore::persist_background`] (logged mode: the image is written on a thread of its own; `durable_state` moves when it is complete) |
//! | `snapshot()` | [`kv::KvReader::snapshot`] + `to_bytes` (or `next_chunk` to stream) |
//! | `restore(s)` | [`kv::KvStore::restore_chunks`] / [`kv::KvStore::restore_bytes`] |

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![forbid(unsafe_code)]

pub mod error;
pub mod kv;

pub use error::{KvError, Result};

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn stores_and_readers_cross_threads() {
        assert_send_sync::<crate::kv::KvStore>();
        assert_send_sync::<crate::kv::KvReader>();
        assert_send_sync::<crate::kv::Watcher>();
        assert_send_sync::<crate::kv::SnapshotReader>();
    }
}
