//! One replica of one cell: a `RawNode` over the cell's raft storage plus its state machine,
//! its waiting callers and its leader lease. The driver (`shard.rs`) owns many cells and runs
//! the I/O; a cell only turns events into storage writes, messages and replies.
//!
//! The Ready order (RAFT.md §1.2, asynchronous as in §1.3) is split in two because the driver
//! does one log write for all cells of a round and syncs on its IO thread: [`Cell::ready_append`]
//! runs steps 1-5 and 8 (everything up to the write, then `advance_append_async`), and
//! [`Cell::ready_persisted`] runs steps 6-7 once the sync covering that ready is done
//! (persisted messages, `on_persist_ready`). A cell may have several readies in flight; they
//! become durable in order.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use proto::{CellId, NodeId};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot,
    SnapshotMetadata,
};
use raft::{RawNode, StateRole, Storage};

use crate::config::NodeConfig;
use crate::error::{Error, Result, StateMachineError};
use crate::membership::{self, MembershipChange, MembershipOp, Stage};
use crate::metrics::Metrics;
use crate::pack;
use crate::state_machine::{ApplyState, EntryRef, SmSnapshot, StateMachine};
use crate::storage::{CellStorage, LogStore, WriteBatch};
use crate::transport::Envelope;
use crate::Tx;

/// Index and term of the bootstrap image every initial member starts from. New members start
/// empty at 0, so they always catch up by snapshot and learn the initial membership from it
/// (TiKV's `RAFT_INIT_LOG_INDEX` does the same).
pub const INIT_INDEX: u64 = 5;

/// When a cell answers a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// Reply after quorum commit and local apply, with the state machine's response.
    Consensus,
    /// Reply once the leader has the entry durably in its own log
    /// ([`Guarantee::LeaderDurable`], no response). The write may still be lost if the
    /// leader fails before a quorum has it (counted in `async_lost`).
    ///
    /// Two kinds of proposal are answered at apply instead, exactly as in `Consensus` mode
    /// ([`Guarantee::Applied`] with the state machine's response; callers keyed by
    /// `(term, index)`, `ProposalDropped` when another entry applies at the index, `Timeout`
    /// at the deadline):
    /// - a proposal made with [`Ack::Applied`] ([`crate::Node::propose_with`]): the caller
    ///   needs the state machine's answer (a compare-and-swap's result, say), or must know
    ///   whether the state machine took the entry at all;
    /// - every proposal to a leader that has not yet applied the first entry of its own term
    ///   (the empty entry raft appends on becoming leader). Its log may still hold entries of
    ///   earlier terms that decide how the state machine treats a new one (a range split
    ///   applied there refuses writes to the keys it moved away): a state machine may refuse
    ///   an entry depending on earlier ones, and an acknowledgement before those applied
    ///   would promise what apply may take back. Once the term's first entry applied, every
    ///   earlier entry has, and what remains is the proposer's own business (it knows what it
    ///   proposed in its term).
    ///
    /// Async entries answered at `LeaderDurable` carry their proposer in the entry context
    /// (a restarted leader counts them as acknowledged); entries answered at apply do not.
    Async,
}

/// When a proposal is answered ([`crate::Node::propose_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// As the cell's [`ReplicationMode`] says (an Async cell may still answer at apply,
    /// see [`ReplicationMode::Async`]).
    #[default]
    CellMode,
    /// At apply, with the state machine's response ([`Guarantee::Applied`]), whatever the
    /// cell's mode.
    Applied,
}

/// Which of the node's two raft-log stores holds a replica's raft log (entries, hard state,
/// snapshot and compaction records). Chosen when the replica is created ([`CellOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogKind {
    /// The node's on-disk store (the `LogStore` given to [`crate::Node::start`]): a round's
    /// records are synced before any acknowledgement that depends on them, and the replica
    /// survives a restart.
    #[default]
    Durable,
    /// The node's in-memory store ([`crate::Node::volatile_log`]): nothing is written to disk
    /// and nothing is synced; a ready counts as persisted once it is in memory. A restart
    /// loses the replica's log and its hard state (term, vote): such a replica must never be
    /// reopened with the same identity (as a blank replica it could vote twice in a term).
    /// Re-seed it instead: remove it from the cell, then add it back as a new member.
    Volatile,
}

/// How a replica runs: its [`ReplicationMode`] and the [`LogKind`] holding its raft log.
/// A bare `ReplicationMode` converts into options with a durable log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellOptions {
    pub mode: ReplicationMode,
    pub log: LogKind,
}

impl CellOptions {
    /// `mode` over the node's durable log.
    pub fn durable(mode: ReplicationMode) -> Self {
        CellOptions {
            mode,
            log: LogKind::Durable,
        }
    }

    /// `mode` over the node's in-memory log (see [`LogKind::Volatile`]).
    pub fn volatile(mode: ReplicationMode) -> Self {
        CellOptions {
            mode,
            log: LogKind::Volatile,
        }
    }
}

impl From<ReplicationMode> for CellOptions {
    fn from(mode: ReplicationMode) -> Self {
        CellOptions::durable(mode)
    }
}

/// Which guarantee a [`Reply`] was given under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// Committed by a quorum and applied on the leader.
    Applied,
    /// Durable in the leader's log only.
    LeaderDurable,
}

/// The answer to a successful proposal.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Log position of the entry.
    pub index: u64,
    pub term: u64,
    pub guarantee: Guarantee,
    /// The state machine's response (only with [`Guarantee::Applied`]).
    pub response: Option<Bytes>,
}

/// How a read is made linearizable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Served by the leader under its lease without a network round (falls back to ReadIndex
    /// when the lease is not valid).
    Lease,
    /// One heartbeat round to a quorum (raft ReadIndex); works on followers too.
    ReadIndex,
}

/// A replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl From<StateRole> for Role {
    fn from(r: StateRole) -> Self {
        match r {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// A snapshot of one replica's state, for tests and operators.
#[derive(Debug, Clone, PartialEq)]
pub struct CellStatus {
    pub cell: CellId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub conf: ConfState,
    /// Async-mode writes acknowledged by this replica as leader and later found lost. Writes
    /// whose fate an installed snapshot hid (acknowledged, then covered by a snapshot before
    /// this replica applied them) are counted too: lost or indeterminate, never silently
    /// dropped.
    pub async_lost: u64,
}

struct PendingRead {
    deadline: Instant,
    /// `None` for the cell's own lease renewals.
    tx: Option<Tx<u64>>,
    issued: Instant,
    term: u64,
}

/// What `ready_append` leaves for `ready_persisted`: the ready's number (raft already
/// advanced it asynchronously), what may only happen once it is durable.
pub(crate) struct Unpersisted {
    number: u64,
    /// The generation of the replica that made the ready (see `Cell::generation`): a ready
    /// of a removed or fenced replica must never be finished on a later one of the same id.
    generation: u64,
    /// Messages that must wait for the sync (a follower's or candidate's).
    msgs: Vec<Message>,
    /// Async-mode callers whose entries this ready carries: `(index, term, caller)`.
    acks: Vec<(u64, u64, Tx<Reply>)>,
}

/// A proposal that may share a raft entry with others ([`crate::Node::propose_packable`]):
/// the shard buffers them per cell while it drains its inbox and hands them to
/// [`Cell::propose_packed`] in arrival order.
pub(crate) struct Packable {
    pub(crate) data: Bytes,
    pub(crate) deadline: Instant,
    pub(crate) ack: Ack,
    pub(crate) tx: Tx<Reply>,
}

/// The callers of one proposed entry: one, or every part's of a packed entry (in part order).
enum Callers {
    One(Tx<Reply>),
    Packed(Vec<Tx<Reply>>),
}

impl Callers {
    fn fail(self, err: impl Fn() -> Error) {
        match self {
            Callers::One(tx) => send(tx, Err(err())),
            Callers::Packed(txs) => {
                for tx in txs {
                    send(tx, Err(err()));
                }
            }
        }
    }
}

/// Callers waiting for the entry at an index to apply: the term it was proposed in (a reply
/// is sent only if the entry applied there has that term) and when they give up (a packed
/// entry's callers wait until the latest deadline among them).
struct Proposal {
    term: u64,
    deadline: Instant,
    callers: Callers,
}

/// What apply returned for one normal entry: one response, or one per part of a packed one.
enum Responses {
    One(Bytes),
    Packed(Vec<Bytes>),
}

/// Outgoing messages of one round, grouped per destination node.
pub(crate) type Outbox = HashMap<NodeId, Vec<Envelope>>;

/// What a leader publishes so that lease reads can be answered without a trip through the
/// shard thread ([`crate::Node::read_barrier`] with [`ReadConsistency::Lease`]).
///
/// Why a read answered from it is linearizable: the lease means no other leader exists before
/// its end; the view was taken when `applied >= committed`, in a term whose lease came from a
/// quorum round, which raft only completes after the leader committed an entry of its own term,
/// so every entry of earlier terms is applied; entries of this term are answered (Consensus
/// mode) only after their apply, and `applied` is raised before each answer, so the index a
/// read gets covers every write acknowledged before the read started.
#[derive(Debug, Default)]
pub(crate) struct ReadView {
    /// The lease's end, `None` when there is no valid lease (not leader, transfer under way,
    /// lease reads off). The shard withdraws it when the term or the role changes.
    lease: Option<Instant>,
    /// Half the lease: a read in the last half goes through the shard, which renews the lease.
    half: std::time::Duration,
    committed: u64,
    applied: u64,
    /// A read was answered from the view since the last tick (the tick then keeps the lease
    /// renewed ahead of time).
    used: bool,
}

impl ReadView {
    /// The applied index to read at, when the view answers at `now`.
    pub(crate) fn read(&mut self, now: Instant) -> Option<u64> {
        let until = self.lease?;
        if now + self.half < until && self.applied >= self.committed {
            self.used = true;
            Some(self.applied)
        } else {
            None
        }
    }
}

/// A cell's [`ReadView`], shared with the node's API.
pub(crate) type SharedView = Arc<parking_lot::Mutex<ReadView>>;

pub(crate) struct Cell {
    pub(crate) id: CellId,
    node: NodeId,
    raw: RawNode<CellStorage>,
    sm: Box<dyn StateMachine>,
    mode: ReplicationMode,
    /// The store holding this replica's raft log (the driver writes its records there and
    /// syncs only for durable ones).
    pub(crate) log_kind: LogKind,
    cfg: Arc<NodeConfig>,
    metrics: Arc<Metrics>,
    /// Callers answered at apply, keyed by log index (see [`Proposal`]).
    proposals: BTreeMap<u64, Proposal>,
    /// Async-mode callers whose entry `(index, term)` is not in a ready yet (one per part of a
    /// packed entry).
    durable_acks: Vec<(u64, u64, Tx<Reply>)>,
    /// Readies advanced with `advance_append_async` whose write is not durable yet.
    inflight: usize,
    /// Async writes acknowledged and not yet seen applied: index -> (term, writes: the parts
    /// of a packed entry each count).
    async_acked: BTreeMap<u64, (u64, u64)>,
    async_lost: u64,
    /// ReadIndex requests waiting for their ReadState, by request id.
    reads: HashMap<u64, PendingRead>,
    /// Reads whose read index is known, waiting for apply to reach it.
    read_waits: Vec<(u64, PendingRead)>,
    next_read_id: u64,
    /// Leader lease: valid in `term` until the instant.
    lease: Option<(u64, Instant)>,
    /// The last term in which a leadership transfer was under way. Lease reads stay off for
    /// the rest of that term even if raft aborts the transfer: a late MsgTimeoutNow makes
    /// the target campaign with CAMPAIGN_TRANSFER, which followers grant inside our lease.
    transfer_term: Option<u64>,
    membership: Option<MembershipOp>,
    transfer: Option<(NodeId, Instant, Tx<()>)>,
    conf: ConfState,
    applied: u64,
    /// The term of the entry at `applied`: a leader whose own term's first entry has not
    /// applied yet has `applied_term` below its term (see [`ReplicationMode::Async`]).
    applied_term: u64,
    /// When each peer was last heard from (any message), for membership safety checks.
    last_heard: HashMap<u64, Instant>,
    /// Set when this replica applied its own removal.
    pub(crate) removed: bool,
    /// When this replica was opened (created or restarted): it refuses votes for one election
    /// timeout from then (see `Shard::deliver`).
    pub(crate) opened: Instant,
    /// Published for lease reads outside the shard (see [`ReadView`]).
    pub(crate) view: SharedView,
    /// Which incarnation of this cell id on the shard this replica is (set by the shard from
    /// a counter when it opens the replica); carried by its unpersisted readies.
    pub(crate) generation: u64,
}

fn role_leader(raw: &RawNode<CellStorage>) -> bool {
    raw.raft.state == StateRole::Leader
}

fn hint(raw: &RawNode<CellStorage>) -> Option<NodeId> {
    match raw.raft.leader_id {
        0 => None,
        id => Some(NodeId(id)),
    }
}

fn send<T>(tx: Tx<T>, v: Result<T>) {
    // The caller may have given up (dropped its future): nothing to do then.
    let _ = tx.send(v);
}

fn raft_err(cell: CellId, e: raft::Error) -> Error {
    Error::Raft {
        cell,
        source: Arc::new(e),
    }
}

fn storage_err(cell: CellId, e: crate::storage::StorageError) -> Error {
    Error::Storage {
        cell: Some(cell),
        source: Arc::new(e),
    }
}

impl Cell {
    /// Open (or bootstrap) a replica.
    ///
    /// - Initial member (`voters` non-empty, empty state machine, empty log): write the
    ///   bootstrap image at [`INIT_INDEX`] to the log and the state machine.
    /// - New member (`voters` empty): start empty; the leader sends a snapshot.
    /// - Restart: `Config.applied` = the state machine's durable applied index, and the log's
    ///   commit index is repaired forward to the state machine's commit point (RAFT.md §1.4).
    ///
    /// `log` is the store of `opts.log` (the driver picks it); the repairs above write to it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        id: CellId,
        node: NodeId,
        cfg: Arc<NodeConfig>,
        metrics: Arc<Metrics>,
        log: &LogStore,
        mut sm: Box<dyn StateMachine>,
        opts: CellOptions,
        voters: &[NodeId],
        learners: &[NodeId],
    ) -> Result<Cell> {
        let CellOptions {
            mode,
            log: log_kind,
        } = opts;
        let mut st = sm.apply_state();
        let fresh_sm = st.applied_index == 0 && st.conf_state == ConfState::default();
        let storage = log
            .cell(id, st.conf_state.clone())
            .map_err(|e| storage_err(id, e))?;
        let sterr = |e: raft::Error| raft_err(id, e);
        let mut hs = storage.hard_state();
        let log_empty = storage.last_index().map_err(sterr)? == 0 && hs == HardState::default();
        // A log holding nothing but the bootstrap image (and perhaps a hard state) with an
        // empty state machine: an earlier bootstrap wrote the log and crashed before the state
        // machine got the image (older versions wrote the log first). Redo the bootstrap.
        let bootstrap_only = storage.first_index().map_err(sterr)? == INIT_INDEX + 1
            && storage.last_index().map_err(sterr)? == INIT_INDEX
            && storage.term(INIT_INDEX).ok() == Some(INIT_INDEX);
        if fresh_sm && (log_empty || bootstrap_only) && !voters.is_empty() {
            let conf = ConfState {
                voters: voters.iter().map(|n| n.get()).collect(),
                learners: learners.iter().map(|n| n.get()).collect(),
                ..Default::default()
            };
            st = ApplyState {
                applied_index: INIT_INDEX,
                applied_term: INIT_INDEX,
                commit_index: INIT_INDEX,
                commit_term: INIT_INDEX,
                conf_state: conf,
            };
            // The state machine first (durable when `restore` returns), then the log (the
            // repair below writes the Snapshot record): a crash in between leaves the state
            // machine ahead of the log, which the next open repairs the same way. The other
            // order could leave a log claiming an image the state machine never got.
            sm.restore(&SmSnapshot {
                state: st.clone(),
                data: Bytes::new(),
            })
            .map_err(|source| Error::StateMachine { cell: id, source })?;
            storage.set_conf_state(st.conf_state.clone());
        }
        // The state machine ahead of the log: a crash after a snapshot was restored into the
        // state machine and before the log's Snapshot record was synced (or a bootstrap cut
        // short the same way). What the state machine applied is committed, so the log
        // restarts after it.
        let last = storage.last_index().map_err(sterr)?;
        let first = storage.first_index().map_err(sterr)?;
        let sm_ahead = st.applied_index > last
            || (st.applied_index >= first
                && storage
                    .term(st.applied_index)
                    .is_ok_and(|t| t != st.applied_term));
        if sm_ahead {
            let mut meta = SnapshotMetadata {
                index: st.applied_index,
                term: st.applied_term,
                ..Default::default()
            };
            meta.set_conf_state(st.conf_state.clone());
            let mut wb = WriteBatch::default();
            wb.apply_snapshot(id, meta);
            log.write(wb).map_err(|e| storage_err(id, e))?;
            log.sync().map_err(|e| storage_err(id, e))?;
            hs = storage.hard_state();
        } else if st.applied_index + 1 < first {
            // The log was compacted past what the state machine holds (for example the state
            // machine's files were lost): the entries in between are gone from this replica.
            // Starting would make raft skip them silently (or panic); refuse instead.
            return Err(Error::NeedsSnapshot {
                cell: id,
                applied: st.applied_index,
                truncated: first - 1,
            });
        }
        // RAFT.md §1.4: the commit index may not have been durable when the state machine
        // applied up to it; move it forward if the log holds that entry with that term. Both
        // the recorded commit point and the applied entry itself are committed.
        let mut commit = hs.commit;
        for (i, t) in [
            (st.commit_index, st.commit_term),
            (st.applied_index, st.applied_term),
        ] {
            if i > commit && storage.term(i).ok() == Some(t) {
                commit = i;
            }
        }
        if commit > hs.commit {
            hs.commit = commit;
            let mut wb = WriteBatch::default();
            wb.set_hard_state(id, hs.clone());
            log.write(wb).map_err(|e| storage_err(id, e))?;
            log.sync().map_err(|e| storage_err(id, e))?;
        }
        if st.applied_index > hs.commit {
            return Err(Error::StateMachine {
                cell: id,
                source: StateMachineError::new(
                    "open",
                    format!(
                        "applied index {} beyond the log's commit {}",
                        st.applied_index, hs.commit
                    ),
                ),
            });
        }
        let rc = cfg.cell.raft_config(node.get(), st.applied_index);
        let logger = raft_logger(id, node);
        let raw = RawNode::new(&rc, storage, &logger).map_err(sterr)?;
        let async_acked = if mode == ReplicationMode::Async {
            recover_async_acks(&raw, node)
        } else {
            BTreeMap::new()
        };
        Ok(Cell {
            id,
            node,
            raw,
            sm,
            mode,
            log_kind,
            cfg,
            metrics,
            proposals: BTreeMap::new(),
            durable_acks: Vec::new(),
            inflight: 0,
            async_acked,
            async_lost: 0,
            reads: HashMap::new(),
            read_waits: Vec::new(),
            next_read_id: 1,
            lease: None,
            transfer_term: None,
            membership: None,
            transfer: None,
            conf: st.conf_state,
            applied: st.applied_index,
            applied_term: st.applied_term,
            last_heard: HashMap::new(),
            removed: false,
            opened: Instant::now(),
            view: SharedView::default(),
            generation: 0,
        })
    }

    pub(crate) fn step(&mut self, msg: Message, now: Instant) {
        self.last_heard.insert(msg.from, now);
        // Errors here are stale or foreign messages (e.g. from a removed peer): raft already
        // ignored them, and the sender retransmits if it matters.
        let _ = self.raw.step(msg);
        let transferring = self.note_transfer();
        if transferring
            || self
                .lease
                .is_some_and(|(t, _)| t != self.raw.raft.term || !role_leader(&self.raw))
        {
            self.lease = None;
            self.publish();
        }
    }

    /// Publishes the lease, commit and applied index for reads outside the shard.
    fn publish(&self) {
        let now = Instant::now();
        let lease = self.lease_valid(now).filter(|_| role_leader(&self.raw));
        let mut v = self.view.lock();
        v.lease = lease;
        v.half = self.cfg.lease() / 2;
        v.committed = self.raw.raft.raft_log.committed;
        v.applied = self.applied;
    }

    pub(crate) fn tick(&mut self, now: Instant) {
        self.raw.tick();
        let _ = self.note_transfer();
        if self.raw.raft.lead_transferee.is_some() || !role_leader(&self.raw) {
            self.lease = None;
        }
        // Reads answered from the view never reach the shard: renew the lease ahead of time
        // for them (the shard's own reads renew it when less than half is left).
        let used = std::mem::take(&mut self.view.lock().used);
        if used
            && self.lease_valid(now).is_some_and(|until| {
                until.saturating_duration_since(now) < self.cfg.lease() * 3 / 4
            })
        {
            self.read_index(None, now + self.cfg.election_timeout(), now);
        }
        self.publish();
        let cell = self.id;
        let expired = |d: Instant| d <= now;
        self.reads.retain(|_, r| {
            if expired(r.deadline) {
                if let Some(tx) = r.tx.take() {
                    send(tx, Err(Error::Timeout { cell }));
                }
                false
            } else {
                true
            }
        });
        self.read_waits.retain_mut(|(_, r)| {
            if expired(r.deadline) {
                if let Some(tx) = r.tx.take() {
                    send(tx, Err(Error::Timeout { cell }));
                }
                false
            } else {
                true
            }
        });
        let late: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| expired(p.deadline))
            .map(|(i, _)| *i)
            .collect();
        for i in late {
            if let Some(p) = self.proposals.remove(&i) {
                p.callers.fail(|| Error::Timeout { cell });
            }
        }
        if self
            .membership
            .as_ref()
            .is_some_and(|m| expired(m.deadline))
        {
            if let Some(op) = self.membership.take() {
                send(op.tx, Err(Error::Timeout { cell }));
            }
        }
        if self.transfer.as_ref().is_some_and(|t| expired(t.1)) {
            if let Some((_, _, tx)) = self.transfer.take() {
                send(tx, Err(Error::Timeout { cell }));
            }
        }
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            cell: self.id,
            leader_hint: hint(&self.raw),
        }
    }

    /// Whether a proposal made now with `ack` is answered at apply (else once durable in
    /// this leader's log): always in Consensus mode; in Async mode when asked to, or while
    /// this leader has not applied the first entry of its term (see
    /// [`ReplicationMode::Async`]).
    fn answers_at_apply(&self, ack: Ack) -> bool {
        match self.mode {
            ReplicationMode::Consensus => true,
            ReplicationMode::Async => ack == Ack::Applied || self.applied_term < self.raw.raft.term,
        }
    }

    /// Propose `data`. Never forwarded: a follower answers `NotLeader` with a hint.
    pub(crate) fn propose(&mut self, data: Bytes, deadline: Instant, ack: Ack, tx: Tx<Reply>) {
        if !role_leader(&self.raw) {
            return send(tx, Err(self.not_leader()));
        }
        let at_apply = self.answers_at_apply(ack);
        self.propose_one(data, deadline, at_apply, tx);
    }

    /// Propose packable proposals (in arrival order), sharing entries where they can: the
    /// batch is cut into runs of consecutive proposals answered the same way (at apply, or
    /// once durable on the leader), of at most [`pack::MAX_PARTS`] parts and
    /// [`pack::MAX_DATA`] bytes whose packed entry fits the log's record limit. A run of one
    /// is proposed as a plain entry (exactly as [`Cell::propose`]); a longer run becomes one
    /// packed entry (`pack.rs`), every caller keeping its own reply. A proposal too large
    /// for an entry of its own is refused alone (`TooLarge`); the others go on.
    pub(crate) fn propose_packed(&mut self, batch: Vec<Packable>) {
        if !role_leader(&self.raw) {
            for p in batch {
                send(p.tx, Err(self.not_leader()));
            }
            return;
        }
        let mut run: Vec<Packable> = Vec::new();
        let mut run_at_apply = false;
        let mut run_bytes = 0usize;
        for p in batch {
            let at_apply = self.answers_at_apply(p.ack);
            let (size, limit) = self
                .raw
                .store()
                .entry_record_size(p.data.len(), plain_context_len(at_apply));
            if size > limit {
                send(
                    p.tx,
                    Err(Error::TooLarge {
                        cell: self.id,
                        size,
                        limit,
                    }),
                );
                continue;
            }
            let bytes = run_bytes + p.data.len();
            if !run.is_empty()
                && (at_apply != run_at_apply
                    || run.len() >= pack::MAX_PARTS
                    || !self.pack_fits(bytes, run.len() + 1, at_apply))
            {
                self.propose_run(std::mem::take(&mut run), run_at_apply);
                run_bytes = 0;
            }
            run_at_apply = at_apply;
            run_bytes += p.data.len();
            run.push(p);
        }
        if !run.is_empty() {
            self.propose_run(run, run_at_apply);
        }
    }

    /// Whether a packed entry of `parts` parts holding `bytes` of data stays within the pack
    /// limits and the log's record limit.
    fn pack_fits(&self, bytes: usize, parts: usize, at_apply: bool) -> bool {
        let ctx = pack::context(None).len() + plain_context_len(at_apply);
        let (size, limit) = self
            .raw
            .store()
            .entry_record_size(bytes + pack::overhead(parts), ctx);
        bytes <= pack::MAX_DATA && size <= limit
    }

    /// Proposes one run of [`Cell::propose_packed`]: plain if alone, else one packed entry.
    fn propose_run(&mut self, mut run: Vec<Packable>, at_apply: bool) {
        if run.len() == 1 {
            if let Some(p) = run.pop() {
                self.propose_one(p.data, p.deadline, at_apply, p.tx);
            }
            return;
        }
        let data = pack::encode(run.iter().map(|p| &p.data[..]));
        let context = pack::context((!at_apply).then(|| self.node.get()));
        let deadline = run.iter().map(|p| p.deadline).max();
        let txs: Vec<Tx<Reply>> = run.into_iter().map(|p| p.tx).collect();
        let Some(deadline) = deadline else {
            return;
        };
        self.propose_entry(data, context, deadline, at_apply, Callers::Packed(txs));
    }

    /// Proposes one plain entry (refused `TooLarge` if its record would not fit the log).
    fn propose_one(&mut self, data: Bytes, deadline: Instant, at_apply: bool, tx: Tx<Reply>) {
        // Async entries acknowledged at LeaderDurable carry their proposer, so a restarted
        // leader still knows which of its uncommitted entries it acknowledged (see
        // `recover_async_acks`); one answered at apply was not acknowledged before it applied.
        let context = if at_apply {
            Vec::new()
        } else {
            self.node.get().to_le_bytes().to_vec()
        };
        let (size, limit) = self
            .raw
            .store()
            .entry_record_size(data.len(), context.len());
        if size > limit {
            // The leader sends before its own write: an entry the log cannot hold would reach
            // (and be refused by) every replica. Refuse it here, before it exists.
            return send(
                tx,
                Err(Error::TooLarge {
                    cell: self.id,
                    size,
                    limit,
                }),
            );
        }
        self.propose_entry(data.to_vec(), context, deadline, at_apply, Callers::One(tx));
    }

    /// Hands an entry to raft (the leader's, checked by the caller) and keys its callers by
    /// the `(term, index)` it got.
    fn propose_entry(
        &mut self,
        data: Vec<u8>,
        context: Vec<u8>,
        deadline: Instant,
        at_apply: bool,
        callers: Callers,
    ) {
        let cell = self.id;
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose(context, data) {
            Ok(()) => {}
            Err(raft::Error::ProposalDropped) => return callers.fail(|| Error::Busy { cell }),
            Err(e) => {
                let e = raft_err(cell, e);
                return callers.fail(|| e.clone());
            }
        }
        // The key is captured right after `propose`: (current term, new last index).
        let index = self.raw.raft.raft_log.last_index();
        if index == before {
            return callers.fail(|| Error::Busy { cell });
        }
        let term = self.raw.raft.term;
        let n = match &callers {
            Callers::One(_) => 1,
            Callers::Packed(txs) => txs.len() as u64,
        };
        self.metrics.proposals.fetch_add(n, Ordering::Relaxed);
        if let Callers::Packed(_) = &callers {
            self.metrics.packed_entries.fetch_add(1, Ordering::Relaxed);
            self.metrics.packed_parts.fetch_add(n, Ordering::Relaxed);
        }
        if !at_apply {
            match callers {
                Callers::One(tx) => self.durable_acks.push((index, term, tx)),
                Callers::Packed(txs) => self
                    .durable_acks
                    .extend(txs.into_iter().map(|tx| (index, term, tx))),
            }
            return;
        }
        let p = Proposal {
            term,
            deadline,
            callers,
        };
        if let Some(old) = self.proposals.insert(index, p) {
            // A previous leadership of ours proposed at this index: that entry is gone.
            old.callers.fail(|| Error::ProposalDropped { cell, index });
        }
    }

    /// Answer `tx` with the applied index once it is `index` or beyond (at once if it is),
    /// `Timeout` at `deadline`. Any role: it says nothing of which entry applied there.
    pub(crate) fn wait_applied(
        &mut self,
        index: u64,
        deadline: Instant,
        now: Instant,
        tx: Tx<u64>,
    ) {
        if self.applied >= index {
            return send(tx, Ok(self.applied));
        }
        self.read_waits.push((
            index,
            PendingRead {
                deadline,
                tx: Some(tx),
                issued: now,
                term: self.raw.raft.term,
            },
        ));
    }

    /// A linearizable read barrier: answers the applied index at which the caller may read
    /// its state machine.
    pub(crate) fn read(
        &mut self,
        consistency: ReadConsistency,
        deadline: Instant,
        now: Instant,
        tx: Tx<u64>,
    ) {
        if consistency == ReadConsistency::Lease {
            if !role_leader(&self.raw) {
                return send(tx, Err(self.not_leader()));
            }
            if let Some(until) = self.lease_valid(now) {
                // Under the lease no other leader can have committed anything: our commit
                // index is the read index.
                let index = self.raw.raft.raft_log.committed;
                self.wait_applied(index, deadline, now, tx);
                if until.saturating_duration_since(now) < self.cfg.lease() / 2 {
                    self.read_index(None, deadline, now);
                }
                return;
            }
        }
        self.read_index(Some(tx), deadline, now);
    }

    /// Remembers the term of a transfer under way (raft starts one on our API call or on a
    /// follower's forwarded MsgTransferLeader), see `transfer_term`; returns whether one is
    /// under way.
    fn note_transfer(&mut self) -> bool {
        if self.raw.raft.lead_transferee.is_some() {
            self.transfer_term = Some(self.raw.raft.term);
            self.lease = None;
            return true;
        }
        false
    }

    fn lease_valid(&self, now: Instant) -> Option<Instant> {
        match self.lease {
            Some((term, until))
                if self.cfg.cell.lease_reads
                    && term == self.raw.raft.term
                    && now < until
                    && self.raw.raft.lead_transferee.is_none()
                    && self.transfer_term != Some(term) =>
            {
                Some(until)
            }
            _ => None,
        }
    }

    fn read_index(&mut self, tx: Option<Tx<u64>>, deadline: Instant, now: Instant) {
        let id = self.next_read_id;
        self.next_read_id += 1;
        // raft drops the request silently if the leader has not committed in its term yet;
        // the deadline answers it then.
        self.raw.read_index(read_ctx(self.node, id));
        self.reads.insert(
            id,
            PendingRead {
                deadline,
                tx,
                issued: now,
                term: self.raw.raft.term,
            },
        );
    }

    pub(crate) fn change_membership(
        &mut self,
        change: MembershipChange,
        deadline: Instant,
        tx: Tx<ConfState>,
    ) {
        if !role_leader(&self.raw) {
            return send(tx, Err(self.not_leader()));
        }
        if self.membership.is_some() {
            return send(tx, Err(Error::ConfChangeInProgress { cell: self.id }));
        }
        let now = Instant::now();
        let timeout = self.cfg.election_timeout();
        let heard = &self.last_heard;
        let healthy = |id: u64| {
            heard
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < timeout)
        };
        let cc = match membership::plan(
            self.id,
            change,
            &self.raw.raft,
            &self.conf,
            self.cfg.cell.promote_max_lag,
            healthy,
        ) {
            Ok(cc) => cc,
            Err(e) => return send(tx, Err(e)),
        };
        let before = self.raw.raft.raft_log.last_index();
        if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
            return send(tx, Err(raft_err(self.id, e)));
        }
        let index = self.raw.raft.raft_log.last_index();
        if index == before {
            return send(tx, Err(Error::Busy { cell: self.id }));
        }
        self.membership = Some(MembershipOp {
            index,
            term: self.raw.raft.term,
            stage: Stage::Entering,
            deadline,
            tx,
        });
    }

    /// [`crate::Node::campaign_new`]: a leadership-transfer election at once, if this replica
    /// is a promotable follower at `initial_term` that knows no leader.
    pub(crate) fn campaign_new(&mut self, initial_term: u64) -> Result<bool> {
        let r = &self.raw.raft;
        if r.term != initial_term
            || r.leader_id != 0
            || r.state != StateRole::Follower
            || !r.promotable()
        {
            return Ok(false);
        }
        // A local MsgTimeoutNow (term 0): raft-rs campaigns with CAMPAIGN_TRANSFER, no
        // pre-vote, after its own checks (no unapplied conf change).
        let mut m = Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgTimeoutNow);
        m.from = self.node.get();
        m.to = self.node.get();
        self.raw.step(m).map_err(|e| raft_err(self.id, e))?;
        Ok(self.raw.raft.state != StateRole::Follower)
    }

    pub(crate) fn transfer_leader(&mut self, to: NodeId, deadline: Instant, tx: Tx<()>) {
        if !role_leader(&self.raw) {
            return send(tx, Err(self.not_leader()));
        }
        if to == self.node {
            return send(tx, Ok(()));
        }
        if !self.conf.voters.contains(&to.get()) {
            return send(
                tx,
                Err(Error::InvalidConfChange {
                    cell: self.id,
                    node: to,
                    why: "transfer target is not a voter",
                }),
            );
        }
        // The lease is suspect from now on: the target may win an election at once.
        self.lease = None;
        self.transfer_term = Some(self.raw.raft.term);
        self.publish();
        self.raw.transfer_leader(to.get());
        if let Some((_, _, old)) = self.transfer.replace((to, deadline, tx)) {
            send(old, Err(Error::Timeout { cell: self.id }));
        }
    }

    pub(crate) fn report_unreachable(&mut self, to: NodeId) {
        if role_leader(&self.raw) && self.raw.raft.prs().get(to.get()).is_some() {
            self.raw.report_unreachable(to.get());
        }
    }

    pub(crate) fn report_snapshot(&mut self, to: NodeId, status: crate::transport::SnapshotStatus) {
        if role_leader(&self.raw) && self.raw.raft.prs().get(to.get()).is_some() {
            let s = match status {
                crate::transport::SnapshotStatus::Finish => raft::SnapshotStatus::Finish,
                crate::transport::SnapshotStatus::Failure => raft::SnapshotStatus::Failure,
            };
            self.raw.report_snapshot(to.get(), s);
        }
    }

    pub(crate) fn status(&self) -> CellStatus {
        let r = &self.raw.raft;
        CellStatus {
            cell: self.id,
            role: r.state.into(),
            term: r.term,
            leader: hint(&self.raw),
            commit: r.raft_log.committed,
            applied: self.applied,
            first_index: r.raft_log.first_index(),
            last_index: r.raft_log.last_index(),
            conf: self.conf.clone(),
            async_lost: self.async_lost,
        }
    }

    /// Whether a ready is due now. A received snapshot waiting for earlier readies to become
    /// durable is not: finishing those touches the cell again.
    pub(crate) fn has_ready(&self) -> bool {
        self.raw.has_ready() && !self.snapshot_blocked()
    }

    fn snapshot_blocked(&self) -> bool {
        self.inflight > 0 && self.raw.snap().is_some_and(|s| !s.is_empty())
    }

    fn envelopes(&self, msgs: Vec<Message>, out: &mut Outbox) {
        for m in msgs {
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                // The message holds the image now; the offered copy is not needed any more.
                self.raw.store().drop_offered_snapshot();
            }
            out.entry(NodeId(m.to)).or_default().push(Envelope {
                cell: self.id,
                msg: m,
            });
        }
    }

    /// Ready steps 1-5: everything before the durable write, then hands the ready back to raft
    /// with `advance_append_async`, so the cell keeps stepping (and producing readies) while
    /// the driver's sync of this one runs. Returns `None` when there is nothing to do, or when
    /// a received snapshot must wait until every earlier ready of this cell is durable (the
    /// driver retouches the cell when that happens).
    pub(crate) fn ready_append(
        &mut self,
        wb: &mut WriteBatch,
        early: &mut Outbox,
        must_sync: &mut bool,
    ) -> Result<Option<Unpersisted>> {
        // TiKV's rule: no snapshot is installed while an earlier ready is unpersisted.
        if !self.has_ready() {
            return Ok(None);
        }
        let _ = self.note_transfer();
        let mut rd = self.raw.ready();
        // 1. Leader messages go out before our own fsync (thesis §10.2.1): replication and
        //    the local write overlap. Only a leader's messages are in `messages()`.
        self.envelopes(rd.take_messages(), early);
        // 2. A received snapshot is installed before any entries of this ready. The state
        //    machine restores it first (durably: `restore` returns after its data is safe),
        //    then its log metadata goes first in the write batch. A crash in between leaves
        //    the state machine ahead of the log, which `Cell::open` repairs by writing the
        //    Snapshot record then; the other order would leave a log that skips entries the
        //    state machine never got (silent data loss, or raft's "applied out of range").
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.restore(&snap)?;
            wb.apply_snapshot(self.id, snap.get_metadata().clone());
        }
        // 3. ReadIndex answers: they wait for apply to reach their index.
        for rs in rd.take_read_states() {
            // Only our own requests: a ctx of another replica or of an earlier process of
            // this node is not ours, whatever its counter says.
            let Some(id) = parse_read_ctx(self.node, &rs.request_ctx) else {
                continue;
            };
            let Some(p) = self.reads.remove(&id) else {
                continue;
            };
            // A quorum acknowledged a round sent at `p.issued` in `p.term`: no other leader
            // can be elected before `issued + election timeout`; the lease is shorter.
            if role_leader(&self.raw)
                && p.term == self.raw.raft.term
                && self.cfg.cell.lease_reads
                && self.transfer_term != Some(p.term)
            {
                let until = p.issued + self.cfg.lease();
                if self.lease.is_none_or(|(t, u)| t != p.term || u < until) {
                    self.lease = Some((p.term, until));
                }
            }
            if p.tx.is_some() {
                self.read_waits.push((rs.index, p));
            }
        }
        // 4. Committed entries are already durable locally (raft-rs 0.7 hands out only
        //    entries up to the persisted index): apply them now, overlapping the append below
        //    (after the snapshot, if any, was restored).
        self.apply(rd.take_committed_entries())?;
        // 5. New entries and the hard state join the round's single write; the driver syncs
        //    once for every cell if any of them must be durable.
        if !rd.entries().is_empty() {
            wb.append(self.id, rd.take_entries());
        }
        if let Some(hs) = rd.hs() {
            wb.set_hard_state(self.id, hs.clone());
        }
        *must_sync |= rd.must_sync();
        let u = Unpersisted {
            number: rd.number(),
            generation: self.generation,
            // Follower/candidate messages (append responses, votes) wait for the sync.
            msgs: rd.take_persisted_messages(),
            // Async mode: every proposal made before this ready has its entry in it.
            acks: std::mem::take(&mut self.durable_acks),
        };
        // raft-rs wants the entries readable through storage once it is told they are stable:
        // the driver's write of this round caches them before anything else touches this cell
        // (`advance_append_async` itself reads nothing).
        self.raw.advance_append_async(rd);
        self.inflight += 1;
        self.advance_applied();
        self.serve_reads();
        self.publish();
        Ok(Some(u))
    }

    /// Ready steps 6-7 once the write of the ready `u` (and of every earlier one) is durable:
    /// persisted messages go out, async writes are acknowledged, and raft learns the ready is
    /// persisted. What that releases (a commit, committed entries, messages) comes out of the
    /// cell's next ready, so the driver touches the cell again.
    pub(crate) fn ready_persisted(&mut self, u: Unpersisted, late: &mut Outbox) {
        let Unpersisted {
            number, msgs, acks, ..
        } = u;
        // 6. Follower/candidate messages (append responses, votes) only now that entries and
        //    hard state are durable: acknowledging an entry promises it survives a crash.
        self.envelopes(msgs, late);
        // Async mode: the leader has the entries durably in its own log now, unless a later
        // ready replaced them (a higher-term append conflicting at their index): acknowledge
        // only what the log holds with the proposing term.
        for (index, term, tx) in acks {
            if self.raw.store().term(index).ok() != Some(term) {
                send(
                    tx,
                    Err(Error::ProposalDropped {
                        cell: self.id,
                        index,
                    }),
                );
                continue;
            }
            self.note_async_ack(index, term);
            send(
                tx,
                Ok(Reply {
                    index,
                    term,
                    guarantee: Guarantee::LeaderDurable,
                    response: None,
                }),
            );
        }
        // 7. Raft's persisted index moves (it checks the log holds each entry with its term,
        //    so entries a later ready replaced are not counted).
        self.raw.on_persist_ready(number);
        debug_assert!(self.inflight > 0, "a ready finished twice");
        self.inflight = self.inflight.saturating_sub(1);
        self.advance_applied();
    }

    /// Counts one acknowledged async write in the entry `(index, term)` (a packed entry holds
    /// several). Writes acknowledged at that index in another term were lost: their entry is
    /// no longer in the log (this one is).
    fn note_async_ack(&mut self, index: u64, term: u64) {
        let e = self.async_acked.entry(index).or_insert((term, 0));
        if e.0 != term {
            let lost = std::mem::replace(e, (term, 0)).1;
            self.async_lost += lost;
            self.metrics.async_lost.fetch_add(lost, Ordering::Relaxed);
        }
        e.1 += 1;
    }

    /// Step 8: tell raft what was applied, only after applying it, and only once raft counts
    /// it persisted (an installed snapshot is applied before its Snapshot record is durable).
    fn advance_applied(&mut self) {
        let log = &self.raw.raft.raft_log;
        if self.applied > log.applied && self.applied <= log.committed.min(log.persisted) {
            self.raw.advance_apply_to(self.applied);
        }
    }

    /// Readies handed to the driver and not yet durable.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight
    }
}

impl Unpersisted {
    /// The generation of the replica that made this ready.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The ready will never be finished (node stopping or poisoned, cell fenced): its
    /// async-mode callers get `err`.
    pub(crate) fn fail(self, err: &Error) {
        for (_, _, tx) in self.acks {
            send(tx, Err(err.clone()));
        }
    }
}

impl Cell {
    fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        let meta = snap.get_metadata();
        let state = ApplyState {
            applied_index: meta.index,
            applied_term: meta.term,
            commit_index: meta.index,
            commit_term: meta.term,
            conf_state: meta.get_conf_state().clone(),
        };
        self.sm
            .restore(&SmSnapshot {
                state,
                data: snap.data.clone(),
            })
            .map_err(|source| Error::StateMachine {
                cell: self.id,
                source,
            })?;
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.conf = meta.get_conf_state().clone();
        // Anything offered while this replica led is older than what it just installed.
        self.raw.store().drop_offered_snapshot();
        let cell = self.id;
        // Callers whose entries the snapshot covers cannot learn their outcome here.
        let covered: Vec<u64> = self
            .proposals
            .range(..=meta.index)
            .map(|(i, _)| *i)
            .collect();
        for index in covered {
            if let Some(p) = self.proposals.remove(&index) {
                p.callers.fail(|| Error::OutcomeUnknown { cell, index });
            }
        }
        // Acknowledged async writes the snapshot covers: only the one at the snapshot's own
        // index can be checked (by term); for the others the log that would tell is gone.
        // They are counted as lost, conservatively (`async_lost` counts writes lost or whose
        // survival could not be established).
        let kept = self.async_acked.split_off(&(meta.index + 1));
        let covered = std::mem::replace(&mut self.async_acked, kept);
        let lost = covered
            .iter()
            .filter(|(i, (t, _))| !(**i == meta.index && *t == meta.term))
            .map(|(_, (_, n))| *n)
            .sum::<u64>();
        self.async_lost += lost;
        self.metrics.async_lost.fetch_add(lost, Ordering::Relaxed);
        self.check_removed();
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let cell = self.id;
        let sm_err = |source| Error::StateMachine { cell, source };
        // The commit point stored with the applied data is the last entry of this batch, not
        // raft's commit index: that one may be beyond what this replica has persisted, and a
        // restart could then neither verify it (`term` unavailable) nor start below it.
        self.sm.set_commit(last.index, last.term);
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal if pack::parse_context(&e.context).packed => {
                    let parts = pack::decode(&e.data).map_err(|why| {
                        sm_err(StateMachineError::new(
                            "decode packed entry",
                            format!("entry {}: {why}", e.index),
                        ))
                    })?;
                    let resps = self
                        .sm
                        .apply_packed(e.index, e.term, &parts)
                        .map_err(sm_err)?;
                    if resps.len() != parts.len() {
                        return Err(sm_err(StateMachineError::new(
                            "apply_packed",
                            format!(
                                "entry {}: {} replies for {} parts",
                                e.index,
                                resps.len(),
                                parts.len()
                            ),
                        )));
                    }
                    self.applied = e.index;
                    self.applied_term = e.term;
                    self.view.lock().applied = e.index;
                    self.on_applied_normal(e.index, e.term, Responses::Packed(resps));
                }
                EntryType::EntryNormal => {
                    let resp = self
                        .sm
                        .apply(EntryRef {
                            index: e.index,
                            term: e.term,
                            data: &e.data,
                        })
                        .map_err(sm_err)?;
                    self.applied = e.index;
                    self.applied_term = e.term;
                    // Before the reply: a lease read that starts after the caller learns of
                    // this write must be answered at this index or later.
                    self.view.lock().applied = e.index;
                    self.on_applied_normal(e.index, e.term, Responses::One(resp));
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc = decode_conf_change(&e)
                        .map_err(|why| sm_err(StateMachineError::new("decode conf change", why)))?;
                    let cs = self
                        .raw
                        .apply_conf_change(&cc)
                        .map_err(|err| raft_err(cell, err))?;
                    self.raw.store().set_conf_state(cs.clone());
                    // An offered snapshot carries the old ConfState: a member added now would
                    // ignore it (raft-rs refuses an image that does not name it).
                    self.raw.store().drop_offered_snapshot();
                    self.sm
                        .apply_conf_change(e.index, e.term, &cs)
                        .map_err(sm_err)?;
                    self.applied = e.index;
                    self.applied_term = e.term;
                    self.conf = cs;
                    self.on_applied_conf(e.index, e.term);
                }
            }
        }
        self.metrics
            .applied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn on_applied_normal(&mut self, index: u64, term: u64, resps: Responses) {
        let cell = self.id;
        if let Some(p) = self.proposals.remove(&index) {
            let ok = |resp| {
                Ok(Reply {
                    index,
                    term,
                    guarantee: Guarantee::Applied,
                    response: Some(resp),
                })
            };
            match (p.callers, resps) {
                (callers, _) if p.term != term => {
                    callers.fail(|| Error::ProposalDropped { cell, index })
                }
                (Callers::One(tx), Responses::One(resp)) => send(tx, ok(resp)),
                (Callers::Packed(txs), Responses::Packed(resps)) if txs.len() == resps.len() => {
                    for (tx, resp) in txs.into_iter().zip(resps) {
                        send(tx, ok(resp));
                    }
                }
                // Same index and term is the same entry, so the shapes always match; if they
                // did not, no caller may be told its own write applied.
                (callers, _) => callers.fail(|| Error::ProposalDropped { cell, index }),
            }
        }
        self.resolve_async(index, term);
        // An empty normal entry where our conf change should be: raft dropped it.
        if self
            .membership
            .as_ref()
            .is_some_and(|m| m.stage == Stage::Entering && m.index == index)
        {
            if let Some(op) = self.membership.take() {
                send(op.tx, Err(Error::ConfChangeDropped { cell }));
            }
        }
    }

    fn resolve_async(&mut self, index: u64, term: u64) {
        if let Some((t, n)) = self.async_acked.remove(&index) {
            if t != term {
                self.async_lost += n;
                self.metrics.async_lost.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn on_applied_conf(&mut self, index: u64, term: u64) {
        let cell = self.id;
        // A conf change occupies the slot of an acknowledged async write: that write is lost.
        if let Some((_, n)) = self.async_acked.remove(&index) {
            self.async_lost += n;
            self.metrics.async_lost.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(p) = self.proposals.remove(&index) {
            p.callers.fail(|| Error::ProposalDropped { cell, index });
        }
        let joint = membership::is_joint(&self.conf);
        if let Some(op) = self.membership.take() {
            let mine = op.index == index;
            match op.stage {
                Stage::Entering if mine && op.term != term => {
                    send(op.tx, Err(Error::ConfChangeDropped { cell }))
                }
                Stage::Entering if mine && joint => {
                    self.membership = Some(MembershipOp {
                        stage: Stage::Leaving,
                        ..op
                    })
                }
                Stage::Entering if mine => send(op.tx, Ok(self.conf.clone())),
                Stage::Leaving if !joint => send(op.tx, Ok(self.conf.clone())),
                _ => self.membership = Some(op),
            }
        }
        self.check_removed();
    }

    fn check_removed(&mut self) {
        if self.conf != ConfState::default() && !membership::contains(&self.conf, self.node.get()) {
            self.removed = true;
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        self.read_waits.retain_mut(|(index, r)| {
            if applied >= *index {
                if let Some(tx) = r.tx.take() {
                    send(tx, Ok(applied));
                }
                false
            } else {
                true
            }
        });
    }

    /// Work after the round: leave joint, finish transfers, answer snapshot requests.
    pub(crate) fn after_round(&mut self) -> Result<()> {
        if role_leader(&self.raw)
            && membership::is_joint(&self.conf)
            && !self.raw.raft.has_pending_conf()
        {
            // The explicit leave-joint step. Any leader does it, so a joint configuration
            // left behind by a deposed leader is still left.
            let _ = self
                .raw
                .propose_conf_change(Vec::new(), membership::leave_joint());
        }
        if let Some((to, _, _)) = &self.transfer {
            if self.raw.raft.leader_id == to.get() {
                if let Some((_, _, tx)) = self.transfer.take() {
                    send(tx, Ok(()));
                }
            }
        }
        if let Some(_req) = self.raw.store().take_snapshot_request() {
            let snap = self.sm.snapshot().map_err(|source| Error::StateMachine {
                cell: self.id,
                source,
            })?;
            let mut s = Snapshot {
                data: snap.data,
                ..Default::default()
            };
            let meta = s.mut_metadata();
            meta.index = snap.state.applied_index;
            meta.term = snap.state.applied_term;
            meta.set_conf_state(snap.state.conf_state);
            self.raw.store().offer_snapshot(s);
            self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Log compaction, once the applied state is durable. `force` compacts to the durable
    /// applied index with no slack (used to force catch-up by snapshot); `drain` (with `force`)
    /// drops the applied entry too, leaving no entry behind at all: what log GC needs from a
    /// cell that pins an old segment (an idle cell keeps its last entry forever otherwise).
    pub(crate) fn maybe_compact(
        &mut self,
        wb: &mut WriteBatch,
        force: bool,
        drain: bool,
    ) -> Result<u64> {
        let first = self.raw.raft.raft_log.first_index();
        let gc = &self.cfg.cell;
        if !force && self.applied < first + gc.log_gc_threshold {
            return Ok(first);
        }
        // Periodic compaction and log GC (`drain`) must not stall the shard: the state machine
        // may only start persisting, and the log is compacted to what is durable already (both
        // come back: the next tick, the next GC run). An explicit compaction (`force` alone:
        // shutdown flush, a fresh snapshot for a learner) waits for it.
        let persisted = if force && !drain {
            self.sm.persist()
        } else {
            self.sm.persist_background()
        };
        persisted.map_err(|source| Error::StateMachine {
            cell: self.id,
            source,
        })?;
        let durable = self.sm.apply_state().applied_index.min(self.applied);
        let to = if force && drain {
            // Never past the last entry of the log itself.
            (durable + 1).min(self.raw.raft.raft_log.last_index() + 1)
        } else if force {
            durable
        } else {
            durable.saturating_sub(gc.log_gc_slack)
        };
        if to > first {
            wb.compact(self.id, to);
            self.metrics.compactions.fetch_add(1, Ordering::Relaxed);
            return Ok(to);
        }
        Ok(first)
    }

    /// Fail every waiting caller (node stopping or poisoned).
    pub(crate) fn fail_all(&mut self, err: &Error) {
        self.lease = None;
        *self.view.lock() = ReadView::default();
        for (_, p) in std::mem::take(&mut self.proposals) {
            p.callers.fail(|| err.clone());
        }
        for (_, _, tx) in self.durable_acks.drain(..) {
            send(tx, Err(err.clone()));
        }
        for (_, mut r) in std::mem::take(&mut self.reads) {
            if let Some(tx) = r.tx.take() {
                send(tx, Err(err.clone()));
            }
        }
        for (_, mut r) in self.read_waits.drain(..) {
            if let Some(tx) = r.tx.take() {
                send(tx, Err(err.clone()));
            }
        }
        if let Some(op) = self.membership.take() {
            send(op.tx, Err(err.clone()));
        }
        if let Some((_, _, tx)) = self.transfer.take() {
            send(tx, Err(err.clone()));
        }
    }
}

/// A random nonce drawn once per process: part of every ReadIndex ctx.
fn read_nonce() -> u64 {
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE.get_or_init(rand::random)
}

/// The ReadIndex request context: node id ‖ per-process nonce ‖ per-cell counter (24 bytes,
/// little-endian). raft-rs keys pending reads by these bytes across every requester of the
/// group (the leader's own reads and those forwarded by followers) and counts any same-term
/// heartbeat response carrying them as an acknowledgement, so they must be unique across
/// replicas and restarts: a collision lets a stale acknowledgement (or another replica's
/// read) complete a read, and grant a lease, without a quorum round.
fn read_ctx(node: NodeId, id: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(24);
    ctx.extend_from_slice(&node.get().to_le_bytes());
    ctx.extend_from_slice(&read_nonce().to_le_bytes());
    ctx.extend_from_slice(&id.to_le_bytes());
    ctx
}

/// The counter of a ctx made by [`read_ctx`] in this process for `node`; `None` otherwise.
fn parse_read_ctx(node: NodeId, ctx: &[u8]) -> Option<u64> {
    let b = <[u8; 24]>::try_from(ctx).ok()?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    (word(0) == node.get() && word(1) == read_nonce()).then(|| word(2))
}

/// After a restart, the uncommitted entries this node proposed in Async mode answered at
/// `LeaderDurable` (their context names this node, plain or packed): each one was
/// acknowledged (its reply follows the sync that made it durable) unless the crash fell
/// between that sync and the reply, so counting it as acknowledged is conservative. A packed
/// entry counts one write per part.
fn recover_async_acks(raw: &RawNode<CellStorage>, node: NodeId) -> BTreeMap<u64, (u64, u64)> {
    let log = &raw.raft.raft_log;
    let (lo, hi) = (log.committed + 1, log.last_index() + 1);
    let mut acked = BTreeMap::new();
    if lo >= hi {
        return acked;
    }
    let ctx = raft::GetEntriesContext::empty(false);
    if let Ok(entries) = raw.store().entries(lo, hi, None, ctx) {
        for e in entries {
            if e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            let ctx = pack::parse_context(&e.context);
            if ctx.durable_ack_by != Some(node.get()) {
                continue;
            }
            // A malformed packed entry still names its proposer: count it once (apply will
            // refuse it).
            let writes = if ctx.packed {
                pack::decode(&e.data).map_or(1, |parts| parts.len() as u64)
            } else {
                1
            };
            acked.insert(e.index, (e.term, writes));
        }
    }
    acked
}

/// The context length of a plain entry answered as `at_apply` says (see `Cell::propose_one`).
fn plain_context_len(at_apply: bool) -> usize {
    if at_apply {
        0
    } else {
        8
    }
}

fn decode_conf_change(e: &Entry) -> std::result::Result<ConfChangeV2, String> {
    match e.get_entry_type() {
        // We only propose V2; a V1 change (from an older writer) is one single change.
        EntryType::EntryConfChange => ConfChange::parse_from_bytes(&e.data)
            .map(|cc| {
                let mut s = raft::eraftpb::ConfChangeSingle::default();
                s.set_change_type(cc.get_change_type());
                s.node_id = cc.node_id;
                let mut v2 = ConfChangeV2::default();
                v2.set_changes(vec![s].into());
                v2
            })
            .map_err(|err| err.to_string()),
        _ => ConfChangeV2::parse_from_bytes(&e.data).map_err(|err| err.to_string()),
    }
}

/// raft-rs's logger: silent unless `HARPOON_RAFT_LOG` is set (then info and above go to
/// stderr, for debugging).
fn raft_logger(cell: CellId, node: NodeId) -> slog::Logger {
    if std::env::var_os("HARPOON_RAFT_LOG").is_some() {
        slog::Logger::root(
            StderrDrain,
            slog::o!("cell" => cell.get(), "node" => node.get()),
        )
    } else {
        slog::Logger::root(slog::Discard, slog::o!())
    }
}

struct StderrDrain;

struct KvLine(String);

impl slog::Serializer for KvLine {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        self.0.push_str(&format!(" {key}={val}"));
        Ok(())
    }
}

impl slog::Drain for StderrDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, r: &slog::Record<'_>, kv: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        if !r.level().is_at_least(slog::Level::Info) {
            return Ok(());
        }
        let mut line = KvLine(String::new());
        let _ = r.kv().serialize(r, &mut line);
        let _ = kv.serialize(r, &mut line);
        eprintln!("{:?} {} {}{}", Instant::now(), r.level(), r.msg(), line.0);
        Ok(())
    }
}
