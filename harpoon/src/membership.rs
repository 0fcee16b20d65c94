//! Membership changes with ConfChangeV2, TiKV-style (`store/util.rs::check_conf_change`).
//!
//! Rules:
//! - a new member is added as a **learner**, catches up (by entries or snapshot), then is
//!   **promoted**; a promotion enters a joint configuration with an *explicit* transition and
//!   leaves it with a separate, explicit empty ConfChangeV2 proposed by the leader (we do not
//!   rely on raft-rs auto-leave, which may never happen if the leader steps down in between);
//! - a voter is removed the same way (joint, then leave); the leader is never removed (transfer
//!   first), and a removal that leaves fewer healthy voters than a quorum is refused;
//! - one change at a time: a pending conf change or a joint configuration refuses new ones;
//! - raft-rs silently turns a conf change proposed while another is pending into an empty
//!   normal entry; the cell detects that at apply and fails the caller with
//!   `ConfChangeDropped` (never assumes the change applied).

use std::time::Instant;

use proto::{CellId, NodeId};
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
};
use raft::Raft;

use crate::error::{Error, Result};
use crate::Tx;

/// A membership change of one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add `node` as a learner (receives the log, does not vote).
    AddLearner(NodeId),
    /// Promote learner `node` to voter (joint consensus, then leave joint).
    Promote(NodeId),
    /// Remove `node` (learner directly; voter through joint consensus).
    Remove(NodeId),
}

/// Whether `cs` is a joint configuration.
pub(crate) fn is_joint(cs: &ConfState) -> bool {
    !cs.voters_outgoing.is_empty()
}

/// Whether `id` appears anywhere in `cs`.
pub(crate) fn contains(cs: &ConfState, id: u64) -> bool {
    cs.voters.contains(&id)
        || cs.learners.contains(&id)
        || cs.voters_outgoing.contains(&id)
        || cs.learners_next.contains(&id)
}

/// The explicit "leave joint" step: an empty ConfChangeV2 with the Auto transition.
pub(crate) fn leave_joint() -> ConfChangeV2 {
    ConfChangeV2::default()
}

fn single(t: ConfChangeType, node: NodeId, transition: ConfChangeTransition) -> ConfChangeV2 {
    let mut s = ConfChangeSingle::default();
    s.set_change_type(t);
    s.node_id = node.get();
    let mut cc = ConfChangeV2::default();
    cc.set_transition(transition);
    cc.set_changes(vec![s].into());
    cc
}

/// Check `change` against the leader's view and build the conf change to propose.
pub(crate) fn plan<T: raft::Storage>(
    cell: CellId,
    change: MembershipChange,
    raft: &Raft<T>,
    conf: &ConfState,
    promote_max_lag: u64,
    healthy: impl Fn(u64) -> bool,
) -> Result<ConfChangeV2> {
    if is_joint(conf) || raft.has_pending_conf() {
        return Err(Error::ConfChangeInProgress { cell });
    }
    match change {
        MembershipChange::AddLearner(n) => {
            if contains(conf, n.get()) {
                return Err(Error::InvalidConfChange {
                    cell,
                    node: n,
                    why: "already a member",
                });
            }
            Ok(single(
                ConfChangeType::AddLearnerNode,
                n,
                ConfChangeTransition::Auto,
            ))
        }
        MembershipChange::Promote(n) => {
            if !conf.learners.contains(&n.get()) {
                return Err(Error::InvalidConfChange {
                    cell,
                    node: n,
                    why: "not a learner",
                });
            }
            let last_index = raft.raft_log.last_index();
            let matched = raft.prs().get(n.get()).map(|p| p.matched).unwrap_or(0);
            // TiKV also refuses a promoted commit index below first_index: a voter that must
            // first fetch a snapshot would stall commits.
            if matched + promote_max_lag < last_index || matched < raft.raft_log.first_index() {
                return Err(Error::NotCaughtUp {
                    cell,
                    node: n,
                    matched,
                    last_index,
                });
            }
            Ok(single(
                ConfChangeType::AddNode,
                n,
                ConfChangeTransition::Explicit,
            ))
        }
        MembershipChange::Remove(n) => {
            if n.get() == raft.id {
                return Err(Error::RemoveLeader { cell, node: n });
            }
            if conf.learners.contains(&n.get()) {
                return Ok(single(
                    ConfChangeType::RemoveNode,
                    n,
                    ConfChangeTransition::Auto,
                ));
            }
            if !conf.voters.contains(&n.get()) {
                return Err(Error::InvalidConfChange {
                    cell,
                    node: n,
                    why: "not a member",
                });
            }
            // Healthy = heard from within an election timeout, or the leader itself. raft's own
            // `recent_active` is only refreshed once per election timeout: too stale here.
            let remaining: Vec<u64> = conf
                .voters
                .iter()
                .copied()
                .filter(|v| *v != n.get())
                .collect();
            let healthy = remaining
                .iter()
                .filter(|v| **v == raft.id || healthy(**v))
                .count();
            if remaining.is_empty() || healthy < remaining.len() / 2 + 1 {
                return Err(Error::QuorumLoss { cell, node: n });
            }
            Ok(single(
                ConfChangeType::RemoveNode,
                n,
                ConfChangeTransition::Explicit,
            ))
        }
    }
}

/// Where an accepted membership change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Proposed at `(term, index)`; not applied yet.
    Entering,
    /// Applied and joint: waiting for the leave-joint entry to apply.
    Leaving,
}

/// An in-flight membership change and its caller.
pub(crate) struct MembershipOp {
    pub(crate) index: u64,
    pub(crate) term: u64,
    pub(crate) stage: Stage,
    pub(crate) deadline: Instant,
    pub(crate) tx: Tx<ConfState>,
}
