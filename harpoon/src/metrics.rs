//! Node-wide counters (atomics; read with [`crate::Node::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters shared by the shards of a node.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) rounds: AtomicU64,
    pub(crate) log_writes: AtomicU64,
    pub(crate) log_syncs: AtomicU64,
    pub(crate) log_sync_micros: AtomicU64,
    pub(crate) proposals: AtomicU64,
    pub(crate) applied: AtomicU64,
    pub(crate) async_lost: AtomicU64,
    pub(crate) snapshots: AtomicU64,
    pub(crate) compactions: AtomicU64,
    pub(crate) transport_sends: AtomicU64,
    pub(crate) log_segments_dropped: AtomicU64,
    pub(crate) lease_fast_reads: AtomicU64,
    pub(crate) packed_entries: AtomicU64,
    pub(crate) packed_parts: AtomicU64,
}

/// A copy of a node's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeMetrics {
    /// Driver rounds that handled at least one ready.
    pub rounds: u64,
    /// `LogStore::write` calls (one per store per round with something to write there).
    pub log_writes: u64,
    /// `LogStore::sync` calls of the durable store: at most one per round that wrote a
    /// durable cell's ready that had to be durable (the IO thread answers sync requests that
    /// queued up during a sync with one more). Rounds touching only volatile cells sync
    /// nothing and are not counted.
    pub log_syncs: u64,
    /// Wall time spent in those syncs, microseconds (on the IO threads, and on the shard
    /// threads for the inline syncs of idle shards and memory logs).
    pub log_sync_micros: u64,
    /// Proposals accepted by raft on this node as leader.
    pub proposals: u64,
    /// Apply batches.
    pub applied: u64,
    /// Async-mode writes acknowledged by this node as leader whose log slot was later
    /// applied with another entry: acknowledged, then lost.
    pub async_lost: u64,
    /// Snapshots generated for followers.
    pub snapshots: u64,
    /// Log compactions issued.
    pub compactions: u64,
    /// `Transport::send` calls (one per destination node per round phase).
    pub transport_sends: u64,
    /// Raft-log segments reclaimed by the periodic log GC.
    pub log_segments_dropped: u64,
    /// Lease reads answered from a cell's read view, without a trip through its shard.
    pub lease_fast_reads: u64,
    /// Packed entries (two or more packable proposals in one raft entry) accepted by raft on
    /// this node as leader.
    pub packed_entries: u64,
    /// Proposals carried by those packed entries (each also counted in `proposals`);
    /// `packed_parts / packed_entries` is the mean pack size.
    pub packed_parts: u64,
    /// Payload bytes appended to the durable log store (0 when it is in memory). Volatile
    /// cells add nothing here.
    pub log_bytes_appended: u64,
    /// Records appended to the durable log store (0 when it is in memory).
    pub log_records_appended: u64,
    /// Cells with a log in the durable store.
    pub log_cells: u64,
    /// Cells with a log in the volatile (in-memory) store.
    pub volatile_log_cells: u64,
    /// Entries held by the volatile store, all its cells.
    pub volatile_log_entries: u64,
}

impl Metrics {
    pub(crate) fn snapshot(&self) -> NodeMetrics {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeMetrics {
            rounds: g(&self.rounds),
            log_writes: g(&self.log_writes),
            log_syncs: g(&self.log_syncs),
            log_sync_micros: g(&self.log_sync_micros),
            proposals: g(&self.proposals),
            applied: g(&self.applied),
            async_lost: g(&self.async_lost),
            snapshots: g(&self.snapshots),
            compactions: g(&self.compactions),
            transport_sends: g(&self.transport_sends),
            log_segments_dropped: g(&self.log_segments_dropped),
            lease_fast_reads: g(&self.lease_fast_reads),
            packed_entries: g(&self.packed_entries),
            packed_parts: g(&self.packed_parts),
            // The stores' volume counters are filled in by `Node::metrics`.
            log_bytes_appended: 0,
            log_records_appended: 0,
            log_cells: 0,
            volatile_log_cells: 0,
            volatile_log_entries: 0,
        }
    }
}
