//! The meta collection: what the cluster is made of, stored as a revisioned KV in range 1.
//!
//! # Layout
//! - [`keys`]: every meta key (`collection/<name>`, `range/<collection prefix><hi>`,
//!   `node/<capacity bucket>/<node id>`, counters, client scratch space), built and parsed in
//!   this one file.
//! - [`store`]: [`MetaStore`], a small revisioned KV (create/mod revision and version per key)
//!   whose only write is a [`Txn`](proto::metapb::Txn): compares on version or mod revision,
//!   then puts and deletes, all at one revision. This is the compare-and-swap every meta
//!   operation is built on. Deterministic: replicas applying the same txns hold the same bytes.
//! - [`ops`]: the meta operations (CreateMeta, CreateCollection, ReserveRangeId and
//!   RecordSplit, AddMember, DelMember, SetRole, node records) as functions from a read of the
//!   store to a guarded [`Txn`]: two writers that read the same record cannot both win.
//! - [`view`]: typed reads: descriptors with their revisions, key-to-range lookup (one seek),
//!   GetMembers, liveness of nodes.
//! - [`placement`]: which under-replicated range a node should claim.
//! - [`error`]: the error type, [`MetaError`].
//!
//! Pure logic: no I/O, no clocks (callers pass `now`), no threads.

pub mod error;
pub mod keys;
pub mod ops;
pub mod placement;
pub mod store;
pub mod view;

pub use error::MetaError;
pub use proto::metapb::{
    CollectionDescriptor, Member, MemberRole, NodeRecord, RangeDescriptor, Txn, TxnResult,
};
pub use store::MetaStore;
pub use view::Versioned;

/// The id of meta's own range (and cell).
pub const META_RANGE: u64 = 1;
/// The id of the meta collection.
pub const META_COLLECTION: u64 = 1;
/// Meta's default target replication factor.
pub const META_REPLICATION_FACTOR: u32 = 7;
