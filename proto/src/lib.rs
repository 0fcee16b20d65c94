//! Quiver's wire vocabulary: everything that crosses a process boundary.
//!
//! # Layout
//! - `protos/*.proto`: the protobuf messages (rust-protobuf 2.x, the runtime raft-rs uses),
//!   generated at build time by `build.rs` with the pure-Rust codegen (no `protoc`):
//!   - `peerpb.proto` ([`peerpb`]): the peer port: handshake (`Hello`, `Challenge`, `Proof`,
//!     `HelloAck`, `Refused`), coalesced raft batches, snapshot chunks, all in one `PeerFrame`.
//!   - `kvpb.proto` ([`kvpb`]): the KV collection's commands and replies.
//!   - `metapb.proto` ([`metapb`]): meta records and commands, and the peer port's control
//!     messages (CreateMeta, meta subscription, heartbeats).
//! - [`ids`]: id newtypes (`NodeId`, `CellId`) so ids cannot be mixed up.
//! - [`frame`]: the frame codec of every port, `[u32 little-endian length][payload]`, with an
//!   incremental decoder, a size limit and typed errors ([`FrameError`]).
//! - [`peer`]: peer-port helpers: a copy-free encoder of raft batches and their decoders.
//!
//! Depends on nothing internal.

pub mod frame;
pub mod ids;
pub mod peer;

#[allow(warnings, clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/pb/mod.rs"));
}

pub use frame::{FrameDecoder, FrameError};
pub use ids::{CellId, NodeId};
pub use pb::*;
