//! Replicas removed while they lagged: when to drop a KV range replica whose cell still runs
//! here although the range's membership no longer has this node.
//!
//! A member removed while it is cut off (partitioned, SIGSTOPped, slower than `dead-after`
//! and replaced) never receives the conf change that removes it: the range's leader stops
//! replicating to removed members. Its cell never applies its own removal, so harpoon never
//! destroys it, and without this module it would live on (raft log, store, ticks, pre-votes,
//! a local replica in `Status`). Housekeeping ([`crate::loops`]) asks [`decide`] about every
//! replica it holds whose cell runs, and drops it ([`crate::ranges::drop_lingering`]: the
//! cell and its raft state through harpoon's `Node::destroy_cell`, then the range dir) on
//! [`Verdict::Drop`].
//!
//! # Why meta's record, and when it can be believed
//! The replica cannot learn of its removal from the cell (nothing reaches it), but meta's
//! range record can tell it: a KV range's member leaves meta only after it left the cell. The
//! range's leader takes a voter out of the cell before it takes it out of meta (`take_out`; a
//! dead voter is first demoted in meta, which still lists it), and a learner's
//! acknowledgements never counted. So a record that does not list this node says the cell no
//! longer counts its replica, the same fact the lost-replica path relies on before it forgets
//! a replica's raft state (`crate::ranges::forget_lost`).
//!
//! But only a record that is *newer* than this node's latest membership of the range says
//! so. The node's view of meta may lag (a follower's subscription, a meta replica of its own
//! that is itself stale, a restart reading an old one), and a lagging view may show a record
//! from before this node joined the range, or before it joined again. Only the node itself
//! adds itself to a range (self-assignment's compare-and-swap, `add_member`, which bumps the
//! record's epoch; a split's daughter copies its parent's members at the parent's epoch + 1,
//! and its record is newer than any its parent had). So before each claim of range `r` the
//! node durably records the epoch the claim would give the record ([`record_claim`]: the
//! epoch it compares against + 1, written before the compare-and-swap is proposed, so a claim
//! that wins is always covered, also across a crash and restart). A record at an epoch at or
//! below that *claim epoch* may predate the claim and proves nothing; a record at a higher
//! epoch without this node was written after the claim, so the node was removed after it
//! joined. Epochs only grow for a range id. Within the node, a claim and a drop never
//! overlap: self-assignment holds `Seed::claim_lock` from recording the claim epoch until the
//! claim is answered (and its replica opened), and housekeeping holds it from reading the
//! claim epoch until the replica is gone (or skips the round while a claim is in flight). So
//! a replica is never dropped on a decision made before a claim it did not see. Housekeeping also remembers (in memory) the
//! highest epoch at which it saw the record list this node: a view that went back behind it
//! proves nothing either (that covers replicas listed without a claim of this node's, e.g.
//! a split daughter, and claims made before claim epochs were recorded).
//!
//! Three more cases are kept whatever the record says:
//! - the record lists no voter at all: no quorum holds the range as meta sees it, and this
//!   replica may hold the only copy there is (an operator's case, as for lost replicas);
//! - the local cell has this node as its only voter: no conf change can have removed it
//!   without this replica committing and applying it itself, so meta's record was not made
//!   by the range's leader (meta's leader removes the dead members of a range that has no live
//!   voter directly), and this replica is the range's data;
//! - the local replica is the cell's leader: a removed replica that resumes as a stale leader
//!   steps down within an election timeout (check-quorum); the next round decides.
//!
//! A drop only deletes a replica that no one counts: this node is then not listed, so it does
//! not reopen the range; if it claims a slot again later, it is a new, empty learner filled by
//! snapshot, the way any new member starts.

use std::path::{Path, PathBuf};

use meta::{MemberRole, RangeDescriptor};

/// What [`decide`] says about a replica whose cell runs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the replica, and why.
    Keep(Keep),
    /// The range's membership removed this node after it last joined: drop the replica.
    Drop,
}

/// Why a replica is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Meta's view has no record of the range (not recorded yet, e.g. a daughter whose split
    /// is not recorded, or the view lags).
    NoRecord,
    /// The record lists this node.
    Listed,
    /// The record does not list this node, but it is not newer than this node's latest
    /// membership (`floor`: its claim epoch, or the highest epoch seen listing it).
    NotNewer { epoch: u64, floor: u64 },
    /// The record lists no voter.
    NoVoter,
    /// The local cell has this node as its only voter.
    SoleVoter,
    /// The local replica leads the cell.
    Leader,
}

/// What the local replica's cell says of itself (from harpoon's `CellStatus`).
#[derive(Debug, Clone, Default)]
pub struct LocalCell {
    /// The cell's voters as this replica applied them (incoming and outgoing).
    pub voters: Vec<u64>,
    /// Whether this replica leads the cell.
    pub leader: bool,
}

impl LocalCell {
    /// From a replica's status.
    pub fn of(st: &harpoon::CellStatus) -> LocalCell {
        let mut voters = st.conf.voters.clone();
        for v in &st.conf.voters_outgoing {
            if !voters.contains(v) {
                voters.push(*v);
            }
        }
        LocalCell {
            voters,
            leader: st.role == harpoon::Role::Leader,
        }
    }
}

/// Whether node `me` drops its replica of a range whose cell runs here: `record` is meta's
/// record of the range in this node's view, `floor` the highest of this node's claim epoch for
/// the range ([`claim_epoch`]) and the highest epoch at which it saw the record list it, and
/// `local` the replica's own view of its cell. See the module doc for why each case is safe.
pub fn decide(me: u64, record: Option<&RangeDescriptor>, floor: u64, local: &LocalCell) -> Verdict {
    let Some(r) = record else {
        return Verdict::Keep(Keep::NoRecord);
    };
    if r.members.iter().any(|m| m.node == me) {
        return Verdict::Keep(Keep::Listed);
    }
    if r.epoch <= floor {
        return Verdict::Keep(Keep::NotNewer {
            epoch: r.epoch,
            floor,
        });
    }
    if !r.members.iter().any(|m| m.role == MemberRole::VOTER) {
        return Verdict::Keep(Keep::NoVoter);
    }
    if local.voters == [me] {
        return Verdict::Keep(Keep::SoleVoter);
    }
    if local.leader {
        return Verdict::Keep(Keep::Leader);
    }
    Verdict::Drop
}

/// Where this node records its claim epoch for range `id`: `<data dir>/claims/<id>` (outside
/// the range dir, which a drop deletes while a claim may be in flight).
pub fn claim_file(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join("claims").join(id.to_string())
}

/// The claim epoch recorded for range `id` (0: never claimed here).
///
/// # Errors
/// The file cannot be read, or does not hold an epoch: the caller keeps the replica.
pub fn claim_epoch(data_dir: &Path, id: u64) -> std::io::Result<u64> {
    match std::fs::read_to_string(claim_file(data_dir, id)) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("claim epoch of range {id}: {e}"),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Record durably, before the claim of range `id` is proposed, that it may give the range's
/// record `epoch` (never lowers a recorded epoch).
///
/// # Errors
/// The file cannot be read or written: the caller does not propose the claim.
pub fn record_claim(data_dir: &Path, id: u64, epoch: u64) -> std::io::Result<()> {
    // An unreadable record is not overwritten: it may hold a higher epoch than this one.
    if claim_epoch(data_dir, id)? >= epoch {
        return Ok(());
    }
    let file = claim_file(data_dir, id);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::durable::write_durably(&file, format!("{epoch}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meta::Member;

    const ME: u64 = 4;

    fn record(epoch: u64, members: &[(u64, MemberRole)]) -> RangeDescriptor {
        let mut r = RangeDescriptor::new();
        r.id = 9;
        r.epoch = epoch;
        r.members = members
            .iter()
            .map(|(node, role)| {
                let mut m = Member::new();
                m.node = *node;
                m.role = *role;
                m
            })
            .collect();
        r
    }

    fn replaced(epoch: u64) -> RangeDescriptor {
        use MemberRole::VOTER;
        record(epoch, &[(1, VOTER), (2, VOTER), (3, VOTER)])
    }

    fn stale_follower() -> LocalCell {
        LocalCell {
            voters: vec![1, 2, ME],
            leader: false,
        }
    }

    #[test]
    fn a_newer_record_without_this_node_drops_it() {
        assert_eq!(
            decide(ME, Some(&replaced(7)), 5, &stale_follower()),
            Verdict::Drop
        );
        // Never claimed here (an initial member, a daughter): any record not listing it.
        assert_eq!(
            decide(ME, Some(&replaced(2)), 0, &stale_follower()),
            Verdict::Drop
        );
    }

    /// A view that lags behind this node's latest claim (or behind a record it saw listing
    /// it) shows a record from before it (re)joined: kept.
    #[test]
    fn a_stale_view_keeps_it() {
        for epoch in [3, 5] {
            assert_eq!(
                decide(ME, Some(&replaced(epoch)), 5, &stale_follower()),
                Verdict::Keep(Keep::NotNewer { epoch, floor: 5 })
            );
        }
        assert_eq!(
            decide(ME, None, 0, &stale_follower()),
            Verdict::Keep(Keep::NoRecord)
        );
    }

    /// Re-added while the view still shows the record it was removed by: its claim (epoch of
    /// the compared record + 1) protects the replica until the view shows a newer record.
    #[test]
    fn a_claim_in_flight_keeps_it() {
        let removed_at = replaced(8);
        let dir = tempfile::tempdir().unwrap();
        record_claim(dir.path(), 9, removed_at.epoch + 1).unwrap();
        let floor = claim_epoch(dir.path(), 9).unwrap();
        assert_eq!(floor, 9);
        assert_eq!(
            decide(ME, Some(&removed_at), floor, &stale_follower()),
            Verdict::Keep(Keep::NotNewer { epoch: 8, floor: 9 })
        );
        // The claim won: listed.
        let mut rejoined = replaced(9);
        rejoined
            .members
            .push(record(9, &[(ME, MemberRole::LEARNER)]).members[0].clone());
        assert_eq!(
            decide(ME, Some(&rejoined), floor, &stale_follower()),
            Verdict::Keep(Keep::Listed)
        );
        // The claim lost the race (someone else's change took epoch 9): still kept at 9,
        // dropped only by a record written after it.
        assert!(matches!(
            decide(ME, Some(&replaced(9)), floor, &stale_follower()),
            Verdict::Keep(Keep::NotNewer { .. })
        ));
        assert_eq!(
            decide(ME, Some(&replaced(10)), floor, &stale_follower()),
            Verdict::Drop
        );
    }

    #[test]
    fn listed_in_any_role_keeps_it() {
        use MemberRole::{LEARNER, VOTER};
        for role in [VOTER, LEARNER] {
            let r = record(20, &[(1, VOTER), (ME, role)]);
            assert_eq!(
                decide(ME, Some(&r), 0, &stale_follower()),
                Verdict::Keep(Keep::Listed)
            );
        }
    }

    /// The record lists no voter, or the local cell has this node as its only voter: the
    /// replica may be the only copy of the range, kept.
    #[test]
    fn the_only_voter_keeps_it() {
        let learners_only = record(20, &[(1, MemberRole::LEARNER)]);
        assert_eq!(
            decide(ME, Some(&learners_only), 0, &stale_follower()),
            Verdict::Keep(Keep::NoVoter)
        );
        assert_eq!(
            decide(ME, Some(&record(20, &[])), 0, &stale_follower()),
            Verdict::Keep(Keep::NoVoter)
        );
        let sole = LocalCell {
            voters: vec![ME],
            leader: false,
        };
        assert_eq!(
            decide(ME, Some(&replaced(20)), 0, &sole),
            Verdict::Keep(Keep::SoleVoter)
        );
        let leading = LocalCell {
            leader: true,
            ..stale_follower()
        };
        assert_eq!(
            decide(ME, Some(&replaced(20)), 0, &leading),
            Verdict::Keep(Keep::Leader)
        );
    }

    #[test]
    fn claim_epochs_only_grow_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(claim_epoch(dir.path(), 3).unwrap(), 0);
        record_claim(dir.path(), 3, 12).unwrap();
        record_claim(dir.path(), 3, 7).unwrap();
        assert_eq!(claim_epoch(dir.path(), 3).unwrap(), 12);
        assert_eq!(claim_epoch(dir.path(), 4).unwrap(), 0, "per range");
        std::fs::write(claim_file(dir.path(), 5), "twelve\n").unwrap();
        assert!(claim_epoch(dir.path(), 5).is_err());
        // Nor is a garbage record overwritten by a claim (it may have held a higher epoch):
        // the claim is refused.
        assert!(record_claim(dir.path(), 5, 3).is_err());
        assert!(claim_epoch(dir.path(), 5).is_err());
    }
}
