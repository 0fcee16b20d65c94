//! The multi-cell node: shards of cells on std threads, a router that is the transport's
//! [`MessageSink`], and the public API. Every call returns a [`Pending`] future that resolves
//! when the shard answers; it can be awaited from tokio or waited on from a plain thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use proto::{CellId, NodeId};
use raft::eraftpb::ConfState;
use tokio::sync::oneshot;

use crate::cell::{Ack, CellOptions, CellStatus, ReadConsistency, Reply};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::inbox::Sender;
use crate::membership::MembershipChange;
use crate::metrics::{Metrics, NodeMetrics};
use crate::shard::{Command, Logs, Shard, Shared, Views, DEFAULT_DEADLINE};
use crate::state_machine::StateMachine;
use crate::storage::LogStore;
use crate::transport::{Envelope, MessageSink, SnapshotStatus, Transport};
use crate::CellFactory;

/// The answer to an API call, delivered by a shard thread.
///
/// Await it (it is a `Future`) or call [`Pending::wait`] from a thread outside any async
/// runtime. Resolves to `Err(Error::Stopped)` if the node shut down first.
#[derive(Debug)]
#[must_use = "a Pending does nothing unless awaited or waited on"]
pub struct Pending<T> {
    rx: oneshot::Receiver<Result<T>>,
}

impl<T> Pending<T> {
    fn new() -> (oneshot::Sender<Result<T>>, Pending<T>) {
        let (tx, rx) = oneshot::channel();
        (tx, Pending { rx })
    }

    /// Block the current thread until the answer arrives.
    ///
    /// # Panics
    /// Panics if called from within an asynchronous execution context (await it there).
    pub fn wait(self) -> Result<T> {
        self.rx.blocking_recv().unwrap_or(Err(Error::Stopped))
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Stopped)))
    }
}

/// Routes incoming messages and transport feedback to the shard that owns the cell.
pub(crate) struct Router {
    shards: Vec<Sender<Command>>,
}

impl Router {
    fn shard(&self, cell: CellId) -> &Sender<Command> {
        // `shards` is never empty (validated), so the modulo is in range.
        &self.shards[(cell.get() % self.shards.len() as u64) as usize]
    }

    fn send(&self, cell: CellId, cmd: Command) {
        // A closed shard means the node is stopping: the caller's Pending resolves Stopped.
        let _ = self.shard(cell).send(cmd);
    }
}

impl MessageSink for Router {
    fn deliver(&self, from: NodeId, mut batch: Vec<Envelope>) {
        // `from` is the authenticated peer: a message claiming another sender is forged or
        // misrouted, and raft-rs would believe it. Drop it.
        let before = batch.len();
        batch.retain(|env| env.msg.from == from.get());
        if batch.len() != before {
            tracing::warn!(%from, dropped = before - batch.len(), "dropping messages whose sender is not the authenticated peer");
        }
        if batch.is_empty() {
            return;
        }
        if self.shards.len() == 1 {
            let _ = self.shards[0].send(Command::Deliver(batch));
            return;
        }
        let mut per: Vec<Vec<Envelope>> = vec![Vec::new(); self.shards.len()];
        for env in batch {
            per[(env.cell.get() % self.shards.len() as u64) as usize].push(env);
        }
        for (i, b) in per.into_iter().enumerate() {
            if !b.is_empty() {
                let _ = self.shards[i].send(Command::Deliver(b));
            }
        }
    }

    fn report_unreachable(&self, node: NodeId) {
        for s in &self.shards {
            let _ = s.send(Command::Unreachable(node));
        }
    }

    fn report_snapshot(&self, cell: CellId, to: NodeId, status: SnapshotStatus) {
        self.send(cell, Command::SnapshotReport { cell, to, status });
    }
}

/// A running node: many cells over two shared raft logs, the durable one it is started with
/// and a volatile in-memory one made at start (each cell picks one, [`CellOptions::log`]).
pub struct Node {
    id: NodeId,
    cfg: Arc<NodeConfig>,
    router: Arc<Router>,
    threads: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    logs: Logs,
    poison: Arc<Mutex<Option<String>>>,
    factory: Arc<RwLock<Option<CellFactory>>>,
    /// The cells' read views (lease reads answered without the shard).
    views: Views,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish()
    }
}

impl Node {
    /// Validate `cfg` and start the shard threads. Cells are added with [`Node::create_cell`]
    /// (also after a restart: pass the state machine recovered from disk; never a
    /// [`LogKind::Volatile`](crate::LogKind::Volatile) replica this node held before, whose
    /// log and hard state died with the previous process).
    ///
    /// `log` is the durable store; the node makes its volatile store
    /// (`LogStore::in_memory`), empty at every start.
    pub fn start(
        id: NodeId,
        cfg: NodeConfig,
        log: LogStore,
        transport: Arc<dyn Transport>,
    ) -> Result<Node> {
        Self::start_with(id, cfg, log, |_| Ok::<_, Error>(transport))
    }

    /// Like [`Node::start`] for transports that need the node's sink to be built (the TCP
    /// transport delivers into it): `make` gets the sink and returns the transport.
    pub fn start_with<F, E>(id: NodeId, cfg: NodeConfig, log: LogStore, make: F) -> Result<Node>
    where
        F: FnOnce(Arc<dyn MessageSink>) -> std::result::Result<Arc<dyn Transport>, E>,
        E: std::fmt::Display,
    {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        let metrics = Arc::new(Metrics::default());
        let poison = Arc::new(Mutex::new(None));
        let factory: Arc<RwLock<Option<CellFactory>>> = Arc::new(RwLock::new(None));
        let gc_pins = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..cfg.shards {
            let (tx, rx) = crate::inbox::channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let router = Arc::new(Router { shards: senders });
        let transport = make(router.clone()).map_err(|e| Error::Transport {
            reason: e.to_string(),
        })?;
        let views = Views::default();
        let logs = Logs {
            durable: log.clone(),
            volatile: LogStore::in_memory(),
        };
        let shared = Shared {
            node: id,
            cfg: cfg.clone(),
            logs: logs.clone(),
            transport,
            metrics: metrics.clone(),
            poison: poison.clone(),
            factory: factory.clone(),
            gc_pins,
            views: views.clone(),
        };
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        // A shard or IO thread that cannot be spawned stops the ones already running.
        let abort = |threads: Vec<JoinHandle<()>>, e: Error| {
            for s in &router.shards {
                let _ = s.send(Command::Shutdown);
            }
            for t in threads {
                let _ = t.join();
            }
            e
        };
        for (i, rx) in receivers.into_iter().enumerate() {
            let io = if log.is_memory() {
                None
            } else {
                let inbox = router.shards[i].clone();
                match crate::shard::Io::start(
                    format!("harpoon-{id}-io{i}"),
                    log.clone(),
                    inbox,
                    metrics.clone(),
                ) {
                    Ok(io) => Some(io),
                    Err(e) => {
                        return Err(abort(
                            threads,
                            Error::Poisoned {
                                reason: format!("spawning IO thread: {e}"),
                            },
                        ))
                    }
                }
            };
            let shard = Shard::new(shared.clone(), i, rx, io);
            // A failed spawn drops the shard, and with it its IO thread (`Io` stops on drop).
            match std::thread::Builder::new()
                .name(format!("harpoon-{id}-s{i}"))
                .spawn(move || shard.run())
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    return Err(abort(
                        threads,
                        Error::Poisoned {
                            reason: format!("spawning shard thread: {e}"),
                        },
                    ))
                }
            }
        }
        Ok(Node {
            id,
            cfg,
            router,
            threads,
            metrics,
            logs,
            poison,
            factory,
            views,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The sink to give to the transport: incoming messages and delivery feedback.
    pub fn sink(&self) -> Arc<dyn MessageSink> {
        self.router.clone()
    }

    /// The node's durable raft log (for its counters, and to destroy what a lost replica
    /// left in it).
    pub fn log(&self) -> &LogStore {
        &self.logs.durable
    }

    /// The node's volatile (in-memory) raft log, holding the logs of its
    /// [`LogKind::Volatile`](crate::LogKind::Volatile) cells; empty at every start.
    pub fn volatile_log(&self) -> &LogStore {
        &self.logs.volatile
    }

    /// Register how to create a replica for an unknown cell when an *initial* message
    /// (vote, pre-vote, heartbeat with commit 0) arrives for it; other messages for unknown
    /// cells are dropped (TiKV's `maybe_create_peer` rule).
    pub fn set_cell_factory(&self, f: CellFactory) {
        *self.factory.write() = Some(f);
    }

    /// Start a replica of `cell`. Initial members pass the initial `voters`/`learners` (the
    /// same on every node); a member being added passes empty lists and catches up by
    /// snapshot; a restarted member passes its recovered state machine.
    ///
    /// `opts` is the replication mode and the log store of the replica (a bare
    /// [`ReplicationMode`](crate::ReplicationMode) means the durable log). A volatile replica
    /// is never reopened after a restart: see [`LogKind::Volatile`](crate::LogKind::Volatile).
    pub fn create_cell(
        &self,
        cell: CellId,
        voters: &[NodeId],
        learners: &[NodeId],
        opts: impl Into<CellOptions>,
        sm: Box<dyn StateMachine>,
    ) -> Pending<()> {
        let (tx, p) = Pending::new();
        self.router.send(
            cell,
            Command::Create {
                cell,
                voters: voters.to_vec(),
                learners: learners.to_vec(),
                opts: opts.into(),
                sm,
                tx,
            },
        );
        p
    }

    /// Stop this node's replica of `cell` and destroy its raft state (log entries, hard
    /// state, snapshot, in the store the replica was created with), as the replica does by
    /// itself when it applies its own removal. Resolves once the destruction is durable (a
    /// durable replica's log is synced first). Callers waiting on the replica (proposals,
    /// reads, membership changes) get [`Error::CellNotFound`]; its state machine is dropped
    /// (the caller deletes whatever the state machine keeps outside harpoon). A replica
    /// fenced after a storage failure is destroyed as well, and its fence lifted.
    ///
    /// For a replica that will never learn of its removal: a member removed while it lagged
    /// (partitioned, stopped) gets no more messages from the cell, so it never applies the
    /// conf change that removes it. The caller must know the replica is no longer a member
    /// of the cell, or that it may be lost: a replica destroyed while the cell still counts
    /// it is a lost member (recreating it empty under the same node id as a voter is unsafe:
    /// it would have forgotten its votes and acknowledged entries).
    ///
    /// # Errors
    /// [`Error::CellNotFound`] when no replica of `cell` runs here (nor is fenced here);
    /// [`Error::Poisoned`] on a poisoned node; a failed log write or sync
    /// ([`Error::Storage`]) poisons the node.
    pub fn destroy_cell(&self, cell: CellId) -> Pending<()> {
        let (tx, p) = Pending::new();
        self.router.send(cell, Command::Destroy { cell, tx });
        p
    }

    /// Propose `data` to `cell` (leader only; never forwarded). Times out after 10 s.
    pub fn propose(&self, cell: CellId, data: Bytes) -> Pending<Reply> {
        self.propose_by(cell, data, Instant::now() + DEFAULT_DEADLINE)
    }

    /// Propose with an explicit deadline (answered at apply: `Timeout` if not applied by
    /// then; the write may still apply later).
    pub fn propose_by(&self, cell: CellId, data: Bytes, deadline: Instant) -> Pending<Reply> {
        self.propose_with(cell, data, deadline, Ack::CellMode)
    }

    /// Propose with an explicit deadline, answered as `ack` says: [`Ack::Applied`] waits for
    /// the entry to apply and returns the state machine's response also in an Async cell
    /// (same bookkeeping and failure answers as Consensus mode, see
    /// [`ReplicationMode::Async`](crate::ReplicationMode::Async)).
    pub fn propose_with(
        &self,
        cell: CellId,
        data: Bytes,
        deadline: Instant,
        ack: Ack,
    ) -> Pending<Reply> {
        self.send_proposal(cell, data, deadline, ack, false)
    }

    /// Like [`Node::propose_with`], but the proposal may share ONE raft entry with other
    /// packable proposals to the same cell that reach its shard in the same round (a *packed*
    /// entry: raft, the log record, the messages and the apply are paid once per pack).
    /// Each caller still gets its own reply: the entry's index and term (shared by the
    /// pack) and, when answered at apply, its own part's response from
    /// [`StateMachine::apply_packed`], which the cell's state machine must implement. A
    /// lone proposal is proposed as a plain entry. Proposals of one caller keep their order;
    /// a proposal too large for an entry of its own is refused alone (`TooLarge`).
    pub fn propose_packable(
        &self,
        cell: CellId,
        data: Bytes,
        deadline: Instant,
        ack: Ack,
    ) -> Pending<Reply> {
        self.send_proposal(cell, data, deadline, ack, true)
    }

    /// Routes one proposal to `cell`'s shard ([`Node::propose_with`],
    /// [`Node::propose_packable`]).
    fn send_proposal(
        &self,
        cell: CellId,
        data: Bytes,
        deadline: Instant,
        ack: Ack,
        packable: bool,
    ) -> Pending<Reply> {
        let (tx, p) = Pending::new();
        self.router.send(
            cell,
            Command::Propose {
                cell,
                data,
                deadline,
                ack,
                packable,
                tx,
            },
        );
        p
    }

    /// Resolves to this replica's applied index once it reached `index` (at once if it has),
    /// `Timeout` at `deadline`; any role. It says nothing of which entry applied at `index`
    /// (a caller that needs that proposes with [`Ack::Applied`]): e.g. an Async-mode writer
    /// that got [`Guarantee::LeaderDurable`](crate::Guarantee::LeaderDurable) and must look
    /// at the state machine after its entry's slot applied.
    pub fn wait_applied(&self, cell: CellId, index: u64, deadline: Instant) -> Pending<u64> {
        let (tx, p) = Pending::new();
        self.router.send(
            cell,
            Command::WaitApplied {
                cell,
                index,
                deadline,
                tx,
            },
        );
        p
    }

    /// A linearizable read barrier: resolves to the applied index at which the caller may
    /// read its own state machine handle.
    ///
    /// With [`ReadConsistency::Lease`] on a leader whose lease has more than half its length
    /// left and whose state machine has applied everything committed, the answer is ready at
    /// once from the cell's published read view (no trip through the shard thread); otherwise
    /// the shard answers (renewing the lease, or with a ReadIndex round).
    pub fn read_barrier(
        &self,
        cell: CellId,
        consistency: ReadConsistency,
        deadline: Instant,
    ) -> Pending<u64> {
        let (tx, p) = Pending::new();
        // A poisoned node has no views left (`Shard::poison_with` clears them).
        if consistency == ReadConsistency::Lease {
            let index = self
                .views
                .read()
                .get(&cell)
                .and_then(|v| v.lock().read(Instant::now()));
            if let Some(index) = index {
                self.metrics
                    .lease_fast_reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = tx.send(Ok(index));
                return p;
            }
        }
        self.router.send(
            cell,
            Command::Read {
                cell,
                consistency,
                deadline,
                tx,
            },
        );
        p
    }

    /// Change the membership of `cell` (on its leader). Resolves to the new configuration
    /// once applied (after leaving joint consensus where one was entered).
    pub fn change_membership(
        &self,
        cell: CellId,
        change: MembershipChange,
        deadline: Instant,
    ) -> Pending<ConfState> {
        let (tx, p) = Pending::new();
        self.router.send(
            cell,
            Command::Membership {
                cell,
                change,
                deadline,
                tx,
            },
        );
        p
    }

    /// Add `node` to `cell` as a learner.
    pub fn add_learner(&self, cell: CellId, node: NodeId, deadline: Instant) -> Pending<ConfState> {
        self.change_membership(cell, MembershipChange::AddLearner(node), deadline)
    }

    /// Promote learner `node` of `cell` to voter.
    pub fn promote(&self, cell: CellId, node: NodeId, deadline: Instant) -> Pending<ConfState> {
        self.change_membership(cell, MembershipChange::Promote(node), deadline)
    }

    /// Remove `node` from `cell`.
    pub fn remove(&self, cell: CellId, node: NodeId, deadline: Instant) -> Pending<ConfState> {
        self.change_membership(cell, MembershipChange::Remove(node), deadline)
    }

    /// Move the leadership of `cell` to `to` (the only way a healthy leader loses it).
    pub fn transfer_leader(&self, cell: CellId, to: NodeId, deadline: Instant) -> Pending<()> {
        let (tx, p) = Pending::new();
        self.router.send(
            cell,
            Command::Transfer {
                cell,
                to,
                deadline,
                tx,
            },
        );
        p
    }

    /// Compact `cell`'s log up to the state machine's durable applied index now (no slack).
    /// Resolves to the log's new first index (as requested; applied with the next write).
    pub fn compact_log(&self, cell: CellId) -> Pending<u64> {
        let (tx, p) = Pending::new();
        self.router.send(cell, Command::Compact { cell, tx });
        p
    }

    /// Start an election for `cell` here at once, the way a leadership transfer does (no
    /// pre-vote round; voters grant it even inside the window after they opened, or while
    /// they believe in a leader), but only if this replica is a follower that knows no leader
    /// and is still at `initial_term`: the term every replica of the cell was created with.
    /// Resolves to whether an election started (`false`: the replica is past its first term,
    /// knows a leader, is a learner or a candidate already).
    ///
    /// For a cell that starts without a leader on several nodes at once, created from the
    /// same image at the same term (a range made by a split, whose replicas appear as each
    /// node applies the split): one replica may take the lead within a round trip instead of
    /// an election timeout. Why it cannot depose a leader inside its lease: every leader the
    /// cell ever has was elected in a term past `initial_term`; this election is for
    /// `initial_term + 1`, so a quorum granting it means no quorum voted in that term for
    /// anyone else (quorums intersect) nor moved to a later one (they refuse a lower term):
    /// no other leader has existed. The caller must only pass the cell's true initial term
    /// (a later term some leader may hold would void that argument).
    pub fn campaign_new(&self, cell: CellId, initial_term: u64) -> Pending<bool> {
        let (tx, p) = Pending::new();
        self.router.send(
            cell,
            Command::CampaignNew {
                cell,
                initial_term,
                tx,
            },
        );
        p
    }

    /// The replica's current state.
    pub fn status(&self, cell: CellId) -> Pending<CellStatus> {
        let (tx, p) = Pending::new();
        self.router.send(cell, Command::Status { cell, tx });
        p
    }

    /// Test support (feature `testkit`): blocks the shard thread that owns `cell` (and every
    /// other cell of that shard) until the returned guard is dropped, so that commands sent
    /// meanwhile (proposals, [`MessageSink::deliver`]ed messages, ...) queue up and are then
    /// handled in ONE round, in the order sent (as long as fewer than
    /// `max_commands_per_round` are queued): tests that need several inputs stepped together
    /// need not rely on the scheduler. The shard ticks nothing while held, and blocks at most
    /// `limit` (a guard never dropped cannot hang the node for longer). Resolves once the
    /// shard is held; `Err(Timeout)` if it did not get there within `limit` (it then does not
    /// block), `Err(Stopped)` if the node is stopping. Not in non-test builds.
    #[cfg(any(test, feature = "testkit"))]
    pub fn hold_shard(
        &self,
        cell: CellId,
        limit: std::time::Duration,
    ) -> Result<crate::testkit::ShardHold<'_>> {
        use std::sync::mpsc::{channel, RecvTimeoutError};
        let (held, is_held) = channel();
        let (release_tx, release) = channel();
        self.router.send(
            cell,
            Command::Hold {
                held,
                release,
                limit,
            },
        );
        match is_held.recv_timeout(limit) {
            Ok(()) => Ok(crate::testkit::ShardHold::new(release_tx)),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout { cell }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Stopped),
        }
    }

    /// The node's counters, with both log stores' volume counters.
    pub fn metrics(&self) -> NodeMetrics {
        let mut m = self.metrics.snapshot();
        let d = self.logs.durable.stats();
        let v = self.logs.volatile.stats();
        m.log_bytes_appended = d.bytes_appended;
        m.log_records_appended = d.records_appended;
        m.log_cells = d.cells;
        m.volatile_log_cells = v.cells;
        m.volatile_log_entries = v.entries_cached;
        m
    }

    /// Why the node stopped writing, if it did.
    pub fn poisoned(&self) -> Option<String> {
        self.poison.lock().clone()
    }

    /// Stop the shards (waiting callers get `Stopped`) and join their threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for s in &self.router.shards {
            let _ = s.send(Command::Shutdown);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}
