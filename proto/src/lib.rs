//! Quiver's wire vocabulary: everything that crosses a process boundary.
//!
//! # Layout
//! - `protos/*.proto`: the protobuf messages (rust-protobuf 2.x, the runtime raft-rs uses),
//!   generated at build time by `build.rs` with the pure-Rust codegen (no `protoc`).
//! - [`ids`]: id newtypes (`NodeId`, `CellId`) so ids cannot be mixed up.
//!
//! Depends on nothing internal.

pub mod ids;

#[allow(warnings, clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/pb/mod.rs"));
}

pub use ids::{CellId, NodeId};
pub use pb::*;
