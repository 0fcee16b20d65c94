//! Harpoon: consensus cells on raft-rs, many per node, never preempted.
//!
//! # Layout
//! - [`config`]: `NodeConfig`/`CellConfig`, validated once at start; ticks are configuration.
//! - [`state_machine`]: the `StateMachine` trait through which committed entries are applied
//!   (harpoon knows nothing of collections) and its `ApplyState`.
//! - `cell`: one replica: a `RawNode`, the Ready order, callers keyed by `(term, index)`,
//!   ReadIndex and leader-lease reads, Consensus/Async replies (and Async proposals answered
//!   at apply, [`Ack`]), snapshots, compaction.
//! - [`membership`]: learner → promote → leave joint, safe removal, dropped-change detection.
//! - `shard`: one thread owning many cells; one coalesced tick, one log write per round for
//!   every cell touched, one transport send per destination node; its IO thread syncs the log
//!   while the shard keeps stepping (readies are finished in order once durable).
//! - `inbox`: a shard's command queue (many senders, the shard the one receiver): drained a
//!   batch per lock, and a waiting shard sleeps on a condition variable that senders notify
//!   only when it is asleep (no spinning or `sched_yield` before it parks). The IO thread's
//!   sync requests use one too.
//! - `node`: [`Node`], the public API (futures), and the router that is the transport's sink.
//!   `Node::destroy_cell` destroys a replica on request (one removed while cut off never
//!   applies its own removal).
//! - [`round`]: work deferred to the end of a shard round (`round::defer`), for callers that
//!   finish an answer on the shard thread instead of waking another thread for it.
//! - `pack`: packed entries (several packable proposals in one raft entry): the envelope and
//!   the context tag, their limits.
//! - [`storage`]: the node's raft logs (`LogStore`) and per-cell raft storage. A node has
//!   two: the durable one it is started with and a volatile in-memory one; each cell picks
//!   one at creation ([`CellOptions`], [`LogKind`]).
//! - [`transport`]: the network seam (`Transport`, `MessageSink`), in-memory and TCP.
//! - [`error`]: one error enum; fatal errors poison the node.
//! - `testkit` (feature `testkit`): a recording state machine, an in-process cluster, and a
//!   held shard (`Node::hold_shard`: commands sent meanwhile are handled in one round).
//!
//! # The write path (DESIGN.md §4), as implemented here
//! 1. **route**: the caller picks the node it believes leads the cell (outside harpoon).
//! 2. **redirect**: [`Node::propose`] on a non-leader answers [`Error::NotLeader`] with a
//!    leader hint; proposals are never forwarded.
//! 3. **propose**: the leader's shard calls `RawNode::propose` and keys the caller by the
//!    `(term, index)` the entry got. Proposals made with [`Node::propose_packable`] that the
//!    shard drains in the same round are packed per cell into as few entries as possible
//!    (`pack`: at most [`MAX_PACK_PARTS`] parts and [`MAX_PACK_DATA`] bytes each, answered
//!    the same way), every caller keyed by the shared `(term, index)` with its own part.
//! 4. **append**: the shard collects the ready of every cell touched this round, sends leader
//!    messages at once, does one `LogStore::write` per store with records and hands one
//!    `LogStore::sync` of the durable store to its IO thread, then goes on stepping (raft-rs
//!    `advance_append_async`); followers of durable cells acknowledge only after that sync,
//!    and raft learns of it (`on_persist_ready`) only then. Volatile cells' readies count as
//!    persisted once written to the in-memory store, in the same round (no sync at all).
//! 5. **apply**: committed entries go to the cell's `StateMachine`, which stores its apply
//!    state (applied index, commit point, ConfState) atomically with the data; a packed
//!    entry goes to [`StateMachine::apply_packed`] (one reply per part).
//! 6. **respond**: Consensus mode answers when the entry applies with the proposing term
//!    (`Guarantee::Applied`); Async mode answers after step 4's sync on the leader
//!    (`Guarantee::LeaderDurable`), except for a proposal made with [`Ack::Applied`]
//!    ([`Node::propose_with`]) and every proposal to a leader that has not applied its own
//!    term's first entry yet: those are answered at apply as in Consensus mode (see
//!    [`ReplicationMode::Async`]). [`Node::wait_applied`] waits for a replica's applied
//!    index.
//! 7. **read**: a lease read on a leader whose lease has more than half left and which applied
//!    all it committed is answered from the cell's published read view, without the shard
//!    ([`Node::read_barrier`]); otherwise the shard answers (lease renewal or ReadIndex).

//!
//! # Operational invariants
//! - Every node of a cluster must run the same seglog `max_record_size`. A proposal whose
//!   record (data + context + record overhead) exceeds the leader's limit is refused at
//!   propose ([`Error::TooLarge`]); a follower with a smaller limit refuses the entry and that
//!   replica is fenced ([`Error::Fenced`]) until it is re-seeded.
//! - A replica whose log was compacted past its state machine refuses to open
//!   ([`Error::NeedsSnapshot`]): re-seed it (remove and re-add as a new member).
//! - `NodeConfig::log_gc_interval` reclaims raft-log segments; cells that pin old segments
//!   are force-compacted, so keep it enabled in production.

mod cell;
pub mod config;
pub mod error;
mod inbox;
pub mod membership;
mod metrics;
mod node;
mod pack;
pub mod round;
mod shard;
pub mod state_machine;
pub mod storage;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod transport;

pub use cell::{
    Ack, CellOptions, CellStatus, Guarantee, LogKind, ReadConsistency, ReplicationMode, Reply,
    Role, INIT_INDEX,
};
pub use config::{CellConfig, ConfigError, NodeConfig};
pub use error::{Error, Result, StateMachineError};
pub use membership::MembershipChange;
pub use metrics::NodeMetrics;
pub use node::{Node, Pending};
pub use pack::{MAX_DATA as MAX_PACK_DATA, MAX_PARTS as MAX_PACK_PARTS};
pub use proto::{CellId, NodeId};
pub use state_machine::{ApplyState, EntryRef, SmSnapshot, StateMachine};

/// Where a shard sends an answer.
pub(crate) type Tx<T> = tokio::sync::oneshot::Sender<Result<T>>;

/// Creates a replica (its options, including the log store that holds its raft log, and its
/// state machine) for an unknown cell on an initial message; `None` refuses.
pub type CellFactory =
    std::sync::Arc<dyn Fn(CellId) -> Option<(CellOptions, Box<dyn StateMachine>)> + Send + Sync>;
