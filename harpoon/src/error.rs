//! Harpoon's error type: one enum for the layer, structured fields, retryable apart from fatal.
//!
//! Retryable/redirect errors (`NotLeader`, `Busy`, `Timeout`, `ConfChangeInProgress`...) are API
//! answers: the caller may retry or follow the hint. Fatal errors (`Poisoned`, `Storage`,
//! `StateMachine`) mean the node stopped writing: a failed log write or sync is never retried
//! silently, because the log's durable state is then unknown.

use std::sync::Arc;

use proto::{CellId, NodeId};

/// What a state machine reports when it cannot apply, snapshot or restore. Fatal for the cell.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state machine failed while {doing}: {reason}")]
pub struct StateMachineError {
    /// What the state machine was doing (`"apply"`, `"snapshot"`, `"restore"`, `"persist"`).
    pub doing: &'static str,
    /// Why, in the implementation's words.
    pub reason: String,
}

impl StateMachineError {
    /// An error while `doing` something, for `reason`.
    pub fn new(doing: &'static str, reason: impl Into<String>) -> Self {
        StateMachineError {
            doing,
            reason: reason.into(),
        }
    }
}

/// Every error a harpoon operation can return.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// This replica does not lead the cell; proposals are never forwarded. Retry at the hint.
    #[error("{cell}: not the leader (hint: {leader_hint:?})")]
    NotLeader {
        cell: CellId,
        leader_hint: Option<NodeId>,
    },
    /// No such cell on this node.
    #[error("{cell}: no such cell on this node")]
    CellNotFound { cell: CellId },
    /// `create_cell` for a cell that already runs here.
    #[error("{cell}: cell already exists on this node")]
    CellExists { cell: CellId },
    /// The deadline passed before the operation completed (for example a ReadIndex that raft
    /// dropped because the new leader has not committed in its term yet). Outcome: nothing
    /// was changed by a read; a timed-out write may or may not apply.
    #[error("{cell}: deadline passed")]
    Timeout { cell: CellId },
    /// Backpressure: too many uncommitted bytes (`max_uncommitted_size`) or a leader transfer
    /// in progress; raft dropped the proposal. Retry later.
    #[error("{cell}: busy (proposal dropped by flow control)")]
    Busy { cell: CellId },
    /// The proposal's log slot was taken by another leader's entry: it was definitely not applied.
    #[error("{cell}: proposal at index {index} lost to a leader change")]
    ProposalDropped { cell: CellId, index: u64 },
    /// A snapshot replaced the log past the proposal's index before its outcome was seen:
    /// it may or may not have applied.
    #[error("{cell}: outcome of proposal at index {index} unknown (snapshot installed)")]
    OutcomeUnknown { cell: CellId, index: u64 },
    /// raft-rs turned the conf change into an empty entry (another one was pending), or a leader
    /// change dropped it: the membership did not change.
    #[error("{cell}: conf change dropped")]
    ConfChangeDropped { cell: CellId },
    /// A membership change is already under way (pending conf change or joint state).
    #[error("{cell}: a membership change is already in progress")]
    ConfChangeInProgress { cell: CellId },
    /// The change makes no sense for the current membership (e.g. promote a non-learner).
    #[error("{cell}: invalid membership change for {node}: {why}")]
    InvalidConfChange {
        cell: CellId,
        node: NodeId,
        why: &'static str,
    },
    /// A learner is too far behind to be promoted.
    #[error("{cell}: {node} not caught up (matched {matched}, last index {last_index})")]
    NotCaughtUp {
        cell: CellId,
        node: NodeId,
        matched: u64,
        last_index: u64,
    },
    /// Removing or demoting the leader: transfer leadership first.
    #[error("{cell}: refusing to remove the leader {node}: transfer leadership first")]
    RemoveLeader { cell: CellId, node: NodeId },
    /// The change would leave fewer healthy voters than a quorum of the new configuration.
    #[error("{cell}: removing {node} would lose quorum")]
    QuorumLoss { cell: CellId, node: NodeId },
    /// The replica's raft log was compacted past what its state machine holds (the state
    /// machine lost data, or is older than the log): starting it would skip the entries in
    /// between. The replica must be re-seeded by snapshot (remove its log and state machine
    /// and re-add it as a new member). Nothing was started; the node is not poisoned.
    #[error("{cell}: state machine applied {applied} but the log is compacted to {truncated}: re-seed the replica by snapshot")]
    NeedsSnapshot {
        cell: CellId,
        applied: u64,
        truncated: u64,
    },
    /// The proposal is larger than one raft-log record may be (data + context + record
    /// overhead must fit the log's `max_record_size`, which must be the same on every node).
    /// Nothing was proposed.
    #[error("{cell}: proposal of {size} bytes exceeds the log's record limit of {limit} bytes")]
    TooLarge {
        cell: CellId,
        size: usize,
        limit: usize,
    },
    /// This replica was fenced after a storage failure of its own (an unreadable record, or a
    /// write the log refused); the rest of the node keeps serving. Re-seed the replica.
    #[error("{cell}: replica fenced: {reason}")]
    Fenced { cell: CellId, reason: String },
    /// The node's raft log failed; fatal (the node is poisoned).
    #[error("storage failed{}: {source}", cell.map(|c| format!(" for {c}")).unwrap_or_default())]
    Storage {
        cell: Option<CellId>,
        source: Arc<crate::storage::StorageError>,
    },
    /// raft-rs refused an operation on a cell (e.g. invalid configuration).
    #[error("{cell}: raft: {source}")]
    Raft {
        cell: CellId,
        source: Arc<raft::Error>,
    },
    /// The cell's state machine failed; fatal for the node.
    #[error("{cell}: {source}")]
    StateMachine {
        cell: CellId,
        source: StateMachineError,
    },
    /// A fatal error earlier stopped all writes on this node.
    #[error("node poisoned by an earlier fatal error: {reason}")]
    Poisoned { reason: String },
    /// The transport could not be built.
    #[error("transport: {reason}")]
    Transport { reason: String },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The node shut down before answering.
    #[error("node stopped")]
    Stopped,
}

impl Error {
    /// True for errors after which the node refuses every write.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Storage { .. } | Error::StateMachine { .. } | Error::Poisoned { .. }
        )
    }
}

/// Harpoon's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
