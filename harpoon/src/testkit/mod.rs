//! Test helpers for harpoon and for later crates' tests (feature `testkit`).
//!
//! - [`LogStateMachine`]: records the applied sequence `(index, term, data)`, in memory or
//!   persisted to a file together with its apply state.
//! - [`Cluster`]: N nodes in one process over `transport::mem` or over TCP on 127.0.0.1
//!   ([`TransportKind`]), with kill/restart from the node's "disk", partitions and bounded
//!   waits (never fixed sleeps as assertions), bounded by [`WAIT`].
//! - [`ShardHold`]: a shard held by [`Node::hold_shard`](crate::Node::hold_shard), so that
//!   commands sent meanwhile are handled in one round (deterministic same-round tests).

mod cluster;
mod log_sm;

pub use cluster::{Cluster, ClusterOptions, TransportKind, WAIT};
pub use log_sm::{AppliedEntry, LogHandle, LogStateMachine};

use std::time::{Duration, Instant};

/// A shard blocked by [`Node::hold_shard`](crate::Node::hold_shard); dropping it (or
/// [`ShardHold::release`]) lets the shard go on, handling what was queued meanwhile in the
/// same round. It borrows the node, which therefore cannot be stopped while it is held.
#[derive(Debug)]
#[must_use = "the shard is released when the hold is dropped"]
pub struct ShardHold<'a> {
    /// Dropping it wakes the shard.
    _release: std::sync::mpsc::Sender<()>,
    _node: std::marker::PhantomData<&'a crate::Node>,
}

impl ShardHold<'_> {
    pub(crate) fn new(release: std::sync::mpsc::Sender<()>) -> Self {
        ShardHold {
            _release: release,
            _node: std::marker::PhantomData,
        }
    }

    /// Lets the shard go on (the same as dropping the hold).
    pub fn release(self) {}
}

/// Poll `f` every few milliseconds until it returns true or `timeout` passes; returns whether
/// it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ack, CellId, ReplicationMode};
    use bytes::Bytes;

    /// Commands sent while the shard is held are handled in one round: packable proposals
    /// are packed per drain, so all of them land in ONE packed entry and share its index.
    #[test]
    fn commands_sent_while_held_are_handled_in_one_round() {
        let mut c = Cluster::new(1, ClusterOptions::default());
        let cell = CellId(1);
        c.create_cell(cell, &[1], ReplicationMode::Consensus);
        let l = c.wait_leader(cell, WAIT).expect("leader");
        let node = c.node(l);
        let before = node.metrics();
        let hold = node.hold_shard(cell, WAIT).expect("held");
        let deadline = Instant::now() + WAIT;
        let pending: Vec<_> = (0..8)
            .map(|i| {
                node.propose_packable(cell, Bytes::from(format!("p{i}")), deadline, Ack::Applied)
            })
            .collect();
        hold.release();
        let replies: Vec<_> = pending
            .into_iter()
            .map(|p| p.wait().expect("applied"))
            .collect();
        assert!(
            replies.iter().all(|r| r.index == replies[0].index),
            "{replies:?}"
        );
        let after = node.metrics();
        assert_eq!(after.packed_entries - before.packed_entries, 1);
        assert_eq!(after.packed_parts - before.packed_parts, 8);
        // A hold that is never released ends at its limit.
        let t0 = Instant::now();
        let hold = node
            .hold_shard(cell, Duration::from_millis(50))
            .expect("held");
        let s = node.status(cell).wait().expect("status after the limit");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(s.applied >= replies[0].index);
        drop(hold);
    }
}
