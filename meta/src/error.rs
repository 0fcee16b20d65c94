//! [`MetaError`]: why a meta operation was refused before anything was proposed.

/// Every refusal of a meta operation. A failed compare-and-swap is not an error here: it is
/// a [`TxnResult`](proto::metapb::TxnResult) with `succeeded == false`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    #[error("invalid {field}: {why}")]
    InvalidArgument { field: &'static str, why: String },
    #[error("meta already exists")]
    MetaExists,
    #[error("collection {0:?} already exists")]
    CollectionExists(String),
    #[error("no range {0}")]
    NoSuchRange(u64),
    #[error("node {node} is already a member of range {range}")]
    AlreadyMember { range: u64, node: u64 },
    #[error("node {node} is not a member of range {range}")]
    NotMember { range: u64, node: u64 },
    #[error("range {range} already has {members} members (target {target})")]
    RangeFull {
        range: u64,
        members: usize,
        target: u32,
    },
    #[error("split key is not strictly inside range {range}")]
    SplitOutsideRange { range: u64 },
    #[error("corrupt meta record at {key}: {why}")]
    Corrupt { key: String, why: String },
}
