//! Connectivity faults in front of any [`Transport`], for cluster tests over real transports.
//!
//! A [`FilterNetwork`] holds one set of [`Rules`] shared by every node of a test cluster:
//! partitions, one-way cuts, isolated nodes and custom drop predicates (the same rules
//! `mem::MemNetwork` applies, and the same semantics). [`FilterNetwork::wrap`] puts a
//! [`FilterTransport`] in front of a node's real transport (TCP, or anything else): each
//! envelope the rules block is dropped before it reaches the inner transport, everything else
//! is handed on in order, in one batch.
//!
//! A dropped `MsgSnapshot` is reported as [`SnapshotStatus::Failure`] through the sender's own
//! sink (as `mem` does), so raft re-probes instead of waiting for a report that never comes.
//! The report is made on the sending thread: the sink must not block or call back into the
//! sender (the node's router only queues a command for the shard, which is fine).
//!
//! Probabilistic faults (drop/duplicate/reorder/delay) stay with `mem`; a real transport has
//! its own timing.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use proto::NodeId;
use raft::eraftpb::MessageType;

use super::{Envelope, MessageSink, SnapshotStatus, Transport};

/// Handle of a custom filter, for removing it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FilterId(pub(crate) u64);

/// A custom drop rule: `(from, to, envelope) -> drop?`.
pub(crate) type DropPredicate = dyn Fn(NodeId, NodeId, &Envelope) -> bool + Send + Sync;

/// Connectivity rules: which messages a network drops.
#[derive(Default, Clone)]
pub struct Rules {
    /// Partition groups: nodes in different groups cannot talk. Nodes in no group are free.
    groups: Vec<Vec<NodeId>>,
    /// One-way cuts `(from, to)`.
    cuts: Vec<(NodeId, NodeId)>,
    /// Nodes cut off from everyone (themselves included).
    isolated: Vec<NodeId>,
    filters: Vec<(FilterId, Arc<DropPredicate>)>,
    next_filter: u64,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("groups", &self.groups)
            .field("cuts", &self.cuts)
            .field("isolated", &self.isolated)
            .field("filters", &self.filters.len())
            .finish()
    }
}

impl Rules {
    /// Split the listed nodes into groups that cannot reach each other (both directions);
    /// replaces any previous partition.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        self.groups = groups.iter().map(|g| g.to_vec()).collect();
    }

    /// Block `from -> to` (one way).
    pub fn cut(&mut self, from: NodeId, to: NodeId) {
        self.cuts.push((from, to));
    }

    /// Block everything to and from `node`.
    pub fn isolate(&mut self, node: NodeId) {
        self.isolated.push(node);
    }

    /// Undo partitions, cuts and isolations (custom filters stay).
    pub fn heal(&mut self) {
        self.groups.clear();
        self.cuts.clear();
        self.isolated.clear();
    }

    /// Add a custom drop predicate.
    pub(crate) fn add_filter(&mut self, pred: Arc<DropPredicate>) -> FilterId {
        let id = FilterId(self.next_filter);
        self.next_filter += 1;
        self.filters.push((id, pred));
        id
    }

    /// Remove a custom drop predicate.
    pub fn remove_filter(&mut self, id: FilterId) {
        self.filters.retain(|(f, _)| *f != id);
    }

    /// Remove every custom drop predicate.
    pub fn clear_filters(&mut self) {
        self.filters.clear();
    }

    /// Whether the link `from -> to` is blocked by a partition, cut or isolation.
    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        if self.isolated.contains(&from) || self.isolated.contains(&to) {
            return true;
        }
        if self.cuts.contains(&(from, to)) {
            return true;
        }
        let group_of = |n: NodeId| self.groups.iter().position(|g| g.contains(&n));
        matches!((group_of(from), group_of(to)), (Some(a), Some(b)) if a != b)
    }

    /// The custom predicates (cloned out, so they run without the rules' lock).
    pub(crate) fn predicates(&self) -> Vec<Arc<DropPredicate>> {
        self.filters.iter().map(|(_, f)| f.clone()).collect()
    }
}

/// Shared rules for the [`FilterTransport`]s of one test cluster. Cheap to clone.
#[derive(Clone, Default)]
pub struct FilterNetwork {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    rules: RwLock<Rules>,
    dropped: AtomicU64,
}

impl fmt::Debug for FilterNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterNetwork")
            .field("rules", &*self.inner.rules.read())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl FilterNetwork {
    /// No rules: everything passes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put the rules in front of `inner`, the transport of `node`. `sink` is `node`'s own sink
    /// (where dropped snapshots are reported as failed).
    pub fn wrap(
        &self,
        node: NodeId,
        inner: Arc<dyn Transport>,
        sink: Arc<dyn MessageSink>,
    ) -> Arc<dyn Transport> {
        Arc::new(FilterTransport {
            node,
            net: self.inner.clone(),
            inner,
            sink,
        })
    }

    /// See [`Rules::partition`].
    pub fn partition(&self, groups: &[&[NodeId]]) {
        self.inner.rules.write().partition(groups);
    }

    /// See [`Rules::cut`].
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.inner.rules.write().cut(from, to);
    }

    /// See [`Rules::isolate`].
    pub fn isolate(&self, node: NodeId) {
        self.inner.rules.write().isolate(node);
    }

    /// See [`Rules::heal`].
    pub fn heal(&self) {
        self.inner.rules.write().heal();
    }

    /// Drop every message for which `pred(from, to, envelope)` is true.
    pub fn drop_if(
        &self,
        pred: impl Fn(NodeId, NodeId, &Envelope) -> bool + Send + Sync + 'static,
    ) -> FilterId {
        self.inner.rules.write().add_filter(Arc::new(pred))
    }

    /// Remove a filter added by [`drop_if`](Self::drop_if).
    pub fn remove_filter(&self, id: FilterId) {
        self.inner.rules.write().remove_filter(id);
    }

    /// Heal and remove every custom filter.
    pub fn clear_faults(&self) {
        let mut r = self.inner.rules.write();
        r.heal();
        r.clear_filters();
    }

    /// Messages dropped by the rules so far.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

/// One node's transport behind the [`FilterNetwork`]'s rules.
pub struct FilterTransport {
    node: NodeId,
    net: Arc<Shared>,
    inner: Arc<dyn Transport>,
    sink: Arc<dyn MessageSink>,
}

impl fmt::Debug for FilterTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterTransport")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Transport for FilterTransport {
    fn send(&self, to: NodeId, mut batch: Vec<Envelope>) {
        let (cut, preds) = {
            let r = self.net.rules.read();
            (r.is_cut(self.node, to), r.predicates())
        };
        if !cut && preds.is_empty() {
            self.inner.send(to, batch);
            return;
        }
        let before = batch.len();
        let mut failed = Vec::new();
        batch.retain(|env| {
            let drop = cut || preds.iter().any(|p| p(self.node, to, env));
            if drop && env.msg.msg_type == MessageType::MsgSnapshot {
                failed.push(env.cell);
            }
            !drop
        });
        let dropped = (before - batch.len()) as u64;
        if dropped > 0 {
            self.net.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if !batch.is_empty() {
            self.inner.send(to, batch);
        }
        for cell in failed {
            self.sink.report_snapshot(cell, to, SnapshotStatus::Failure);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use proto::CellId;
    use raft::eraftpb::Message;

    #[derive(Default)]
    struct Rec {
        sent: Mutex<Vec<(NodeId, u64)>>,
        snaps: Mutex<Vec<(CellId, NodeId, SnapshotStatus)>>,
    }
    impl Transport for Rec {
        fn send(&self, to: NodeId, batch: Vec<Envelope>) {
            let mut s = self.sent.lock();
            s.extend(batch.iter().map(|e| (to, e.msg.index)));
        }
    }
    impl MessageSink for Rec {
        fn deliver(&self, _: NodeId, _: Vec<Envelope>) {}
        fn report_unreachable(&self, _: NodeId) {}
        fn report_snapshot(&self, cell: CellId, to: NodeId, status: SnapshotStatus) {
            self.snaps.lock().push((cell, to, status));
        }
    }

    fn env(kind: MessageType, index: u64) -> Envelope {
        Envelope {
            cell: CellId(1),
            msg: Message {
                msg_type: kind,
                index,
                ..Default::default()
            },
        }
    }

    #[test]
    fn rules_block_and_heal() {
        let net = FilterNetwork::new();
        let rec = Arc::new(Rec::default());
        let (n1, n2, n3) = (NodeId(1), NodeId(2), NodeId(3));
        let t1 = net.wrap(n1, rec.clone(), rec.clone());
        net.partition(&[&[n1], &[n2, n3]]);
        t1.send(n2, vec![env(MessageType::MsgAppend, 1)]);
        t1.send(n3, vec![env(MessageType::MsgSnapshot, 2)]);
        assert!(rec.sent.lock().is_empty());
        assert_eq!(
            *rec.snaps.lock(),
            vec![(CellId(1), n3, SnapshotStatus::Failure)]
        );
        net.heal();
        net.cut(n1, n2);
        t1.send(n2, vec![env(MessageType::MsgAppend, 3)]);
        t1.send(n3, vec![env(MessageType::MsgAppend, 4)]);
        net.heal();
        net.isolate(n1);
        t1.send(n3, vec![env(MessageType::MsgAppend, 5)]);
        net.heal();
        let id = net.drop_if(|_, _, e| e.msg.msg_type == MessageType::MsgHeartbeat);
        t1.send(
            n2,
            vec![
                env(MessageType::MsgHeartbeat, 6),
                env(MessageType::MsgAppend, 7),
            ],
        );
        net.remove_filter(id);
        t1.send(n2, vec![env(MessageType::MsgHeartbeat, 8)]);
        assert_eq!(*rec.sent.lock(), vec![(n3, 4), (n2, 7), (n2, 8)]);
        assert_eq!(net.dropped(), 5);
    }
}
