//! The seam between cells and the network.
//!
//! The node's driver hands every outgoing raft message to a [`Transport`], batched per
//! destination node (one batch per node pair per round). Incoming messages and delivery
//! feedback come back through the [`MessageSink`] the transport was built with.
//!
//! Implementations: `mem` (in-process, with fault filters, for tests) and `tcp` (protobuf
//! frames on the peer port, one batched connection per node pair). `filter` puts `mem`'s
//! connectivity rules (partition, cut, isolate, custom drops) in front of any transport, so
//! the same cluster tests run over TCP.

pub mod filter;
pub mod mem;
pub mod tcp;

use proto::{CellId, NodeId};
use raft::eraftpb::Message;

/// One raft message addressed to one cell. `msg.to` / `msg.from` are raft peer ids, which are
/// node ids (`NodeId::get`).
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub cell: CellId,
    pub msg: Message,
}

/// Outcome of sending a snapshot, reported back so raft can re-probe the follower
/// (without a `Failure` report the follower would stay in snapshot limbo forever).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotStatus {
    Finish,
    Failure,
}

/// Sends raft messages to other nodes.
///
/// # Contract
/// - `send` never blocks on the network and never fails: a message that cannot be delivered
///   is dropped (raft retransmits) and the node is reported through
///   [`MessageSink::report_unreachable`].
/// - Messages to one node are delivered in the order they were sent, or not at all (fault
///   filters in tests may deliberately break this; raft tolerates it).
/// - A `MsgSnapshot` may be large: implementations stream its data in chunks and report the
///   outcome through [`MessageSink::report_snapshot`].
pub trait Transport: Send + Sync + 'static {
    /// Queue `batch` for delivery to `to`.
    fn send(&self, to: NodeId, batch: Vec<Envelope>);
}

/// Where a transport delivers what it receives. Implemented by the node's router.
pub trait MessageSink: Send + Sync + 'static {
    /// Messages from `from`, in the order `from` sent them.
    fn deliver(&self, from: NodeId, batch: Vec<Envelope>);
    /// `node` could not be reached; raft should pause replication to it and probe later.
    fn report_unreachable(&self, node: NodeId);
    /// A snapshot for `cell` sent to `to` finished or failed.
    fn report_snapshot(&self, cell: CellId, to: NodeId, status: SnapshotStatus);
}
