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
//! wraps a [`kv::KvStore`] into harpoon's `StateMachine` (apply, apply state, persist,
//! snapshot, restore map one to one).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![forbid(unsafe_code)]

pub mod error;
pub mod kv;

pub use error::{KvError, Result};
