//! The seam between consensus and data: harpoon applies committed entries through
//! [`StateMachine`] and knows nothing of collections.

use bytes::Bytes;
use raft::eraftpb::ConfState;

use crate::error::StateMachineError;

/// The state machine's apply state. Implementations store it atomically with the applied
/// data, so that after a crash the data and the state describe the same point of the log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyState {
    /// Index of the last applied entry (normal or conf change, or the snapshot's index).
    pub applied_index: u64,
    /// Term of that entry.
    pub applied_term: u64,
    /// The commit point the last apply batch ran under: that batch's last entry, which this
    /// replica had durably in its log (never raft's commit index, which may be beyond the
    /// local log). Equal to `applied_index` once the batch is applied.
    pub commit_index: u64,
    /// Term of the entry at `commit_index`.
    pub commit_term: u64,
    /// Membership as of `applied_index`.
    pub conf_state: ConfState,
}

/// A committed normal entry handed to [`StateMachine::apply`].
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub index: u64,
    pub term: u64,
    /// The proposed bytes; empty for the leader's no-op entry of each term and for conf
    /// changes raft dropped.
    pub data: &'a [u8],
}

/// A point-in-time image of a state machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SmSnapshot {
    /// The apply state the image corresponds to.
    pub state: ApplyState,
    /// Opaque, implementation-defined bytes.
    pub data: Bytes,
}

/// A replicated state machine.
///
/// # Correctness requirements
/// - `apply`, `apply_packed` and `apply_conf_change` are called with strictly increasing
///   indexes, each exactly once per index after the last `restore`; only committed entries
///   are ever applied.
/// - Entries applied before a crash but not yet reflected in [`StateMachine::apply_state`] are
///   re-applied on restart: `apply_state()` must describe exactly the data it survived with.
/// - `apply_state()` and the data must change atomically; the driver compacts the raft log only
///   up to `apply_state().applied_index` (after calling [`StateMachine::persist`]), so a
///   state machine that over-reports loses entries forever.
/// - `set_commit` values must be stored with the next applied state (RAFT.md §1.4: restart
///   repairs the raft commit index from them, which prevents "applied > commit").
///
/// # Errors
/// Any error is fatal for the node: the driver poisons it and answers `Error::StateMachine`.
pub trait StateMachine: Send {
    /// Apply one committed normal entry and return the reply for its proposer (ignored on
    /// followers). Empty entries must advance the applied index too.
    fn apply(&mut self, entry: EntryRef<'_>) -> Result<Bytes, StateMachineError>;

    /// Apply one committed *packed* entry: the proposals of several callers that the leader
    /// packed into one entry ([`crate::Node::propose_packable`]), in proposal order. Returns
    /// one reply per part, in the same order (each goes to that part's proposer; ignored on
    /// followers); a reply count other than `parts.len()` is an error.
    ///
    /// Contract: the parts are applied in order as if they were consecutive entries, all of
    /// them at `index` (and `term`): the applied index becomes `index` once, and the effect
    /// of each part (and its reply) must be what [`StateMachine::apply`] would have made of
    /// it as an entry of its own. Every replica applies the same parts at the same index.
    /// There are at least two parts (a pack of one is proposed as a plain entry).
    ///
    /// Default: an error (packed entries unsupported). harpoon only makes packed entries from
    /// `propose_packable`, so a state machine whose users never call it needs nothing here.
    fn apply_packed(
        &mut self,
        index: u64,
        term: u64,
        parts: &[&[u8]],
    ) -> Result<Vec<Bytes>, StateMachineError> {
        let _ = (term, parts);
        Err(StateMachineError::new(
            "apply_packed",
            format!("entry {index} is packed; this state machine does not support packed entries"),
        ))
    }

    /// Record a membership change applied at `index`: `conf_state` is the new membership.
    fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        conf_state: &ConfState,
    ) -> Result<(), StateMachineError>;

    /// The commit point the following applies run under; store it with the apply state.
    fn set_commit(&mut self, commit_index: u64, commit_term: u64);

    /// The durable apply state: what this state machine would hold after a restart. For a
    /// purely in-memory state machine (whose log is in memory too) it is the current state.
    fn apply_state(&self) -> ApplyState;

    /// A snapshot of the current (applied, not only durable) state.
    fn snapshot(&mut self) -> Result<SmSnapshot, StateMachineError>;

    /// Replace the whole state with `snapshot` (a snapshot from another replica of the cell,
    /// or the empty bootstrap image). Durable when it returns.
    fn restore(&mut self, snapshot: &SmSnapshot) -> Result<(), StateMachineError>;

    /// Make everything applied so far durable. Called before a forced log compaction.
    fn persist(&mut self) -> Result<(), StateMachineError> {
        Ok(())
    }

    /// Like [`StateMachine::persist`], but may only *start* making the applied state durable
    /// (e.g. write an image on a thread of its own) and return at once: the driver compacts
    /// the log up to `apply_state().applied_index`, which must keep reporting what is durable
    /// already, and calls again later. Called before periodic log compaction, on the thread
    /// that steps raft. Default: `persist`.
    fn persist_background(&mut self) -> Result<(), StateMachineError> {
        self.persist()
    }
}
