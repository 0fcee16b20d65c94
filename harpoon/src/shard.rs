//! A shard: one std thread that owns a set of cells and runs their rounds, and its IO thread
//! that makes the rounds' writes durable.
//!
//! One round (the write path's *append* hop for every cell touched):
//! 0. wait for the inbox (`crate::inbox`) until the next tick is due, unless a cell touched
//!    last round still has work (then do not wait at all);
//! 1. drain the inbox (messages, proposals, reads, admin, finished syncs) and step the cells;
//!    packable proposals ([`crate::Node::propose_packable`]) are buffered per cell meanwhile
//!    and proposed together (`Cell::propose_packed`, which packs runs of them into single
//!    entries): a cell's buffer is flushed, in arrival order, before any other command naming
//!    that cell (an unpackable proposal, a read, a membership change, admin) and at the end
//!    of the drain. Peer messages and sync reports do not flush it: no caller can observe
//!    their order relative to a proposal in the same drain;
//! 2. tick every cell of the shard if the coalesced tick is due;
//! 3. collect the ready of every touched cell (Ready steps 1-5, `Cell::ready_append`, which
//!    applies what is committed and advances raft asynchronously) into ONE write batch,
//!    sending leader messages first, one `Transport::send` per node;
//! 4. ONE `LogStore::write` per store with records (a copy into the mapped log, or into memory:
//!    the entries are readable at once): each cell's records go to its own store (`LogKind`);
//! 5. volatile cells' readies are persisted now: they are finished at once (step 6), with no
//!    sync and no IO thread. If any durable cell's ready must be durable, ask the IO thread for
//!    ONE `LogStore::sync` of the durable store and park the round's durable readies until it
//!    is done; the shard goes on with the next round meanwhile (proposals, acknowledgements,
//!    commits and applies keep flowing while the disk flushes);
//! 6. when a sync is reported, finish the readies it covers (steps 6-7,
//!    `Cell::ready_persisted`): persisted messages, async acks, `on_persist_ready`; one more
//!    `Transport::send` per node; those cells are touched, so what the persist released
//!    (commits, applies, replies) comes out of their next ready.
//!
//! Readies become durable in order: the IO thread serves sync requests in order (several
//! queued requests are one sync), and a ready that needs no sync of its own but follows an
//! unfinished ready of the same cell waits for that one. A memory log has no IO thread: its
//! no-op sync runs inline; so does a sync of an idle shard (a round made of one or two
//! commands, empty inbox, nothing in flight), which spares a lone writer two thread hand-offs.
//!
//! A parked ready belongs to one replica, not to a cell id: every replica the shard opens gets
//! a new generation, and a ready is finished only on the replica of its generation. Removing,
//! fencing or re-creating a cell fails its parked readies (a ready of a removed replica
//! finished on its successor would count the successor's unsynced entries as persisted).
//! A panic in the IO thread is reported as a failed sync, which poisons the node, so parked
//! readies never wait forever.
//!
//! A RawNode never leaves its shard thread, so nothing raft-related is held across an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use proto::{CellId, NodeId};
use raft::eraftpb::{ConfState, MessageType};

use crate::cell::{
    Ack, Cell, CellOptions, CellStatus, LogKind, Outbox, Packable, ReadConsistency, Reply,
    SharedView, Unpersisted,
};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::inbox::{self, Receiver, RecvError, Sender};
use crate::membership::MembershipChange;
use crate::metrics::Metrics;
use crate::state_machine::StateMachine;
use crate::storage::{LogStore, StorageError, WriteBatch};
use crate::transport::{Envelope, SnapshotStatus, Transport};
use crate::{CellFactory, Tx};

/// What the router and the API hand to a shard.
pub(crate) enum Command {
    Deliver(Vec<Envelope>),
    Unreachable(NodeId),
    SnapshotReport {
        cell: CellId,
        to: NodeId,
        status: SnapshotStatus,
    },
    Create {
        cell: CellId,
        voters: Vec<NodeId>,
        learners: Vec<NodeId>,
        opts: CellOptions,
        sm: Box<dyn StateMachine>,
        tx: Tx<()>,
    },
    /// [`crate::Node::destroy_cell`].
    Destroy {
        cell: CellId,
        tx: Tx<()>,
    },
    Propose {
        cell: CellId,
        data: bytes::Bytes,
        deadline: Instant,
        ack: Ack,
        /// May share an entry with other packable proposals of the same drain.
        packable: bool,
        tx: Tx<Reply>,
    },
    WaitApplied {
        cell: CellId,
        index: u64,
        deadline: Instant,
        tx: Tx<u64>,
    },
    Read {
        cell: CellId,
        consistency: ReadConsistency,
        deadline: Instant,
        tx: Tx<u64>,
    },
    Membership {
        cell: CellId,
        change: MembershipChange,
        deadline: Instant,
        tx: Tx<ConfState>,
    },
    Transfer {
        cell: CellId,
        to: NodeId,
        deadline: Instant,
        tx: Tx<()>,
    },
    Compact {
        cell: CellId,
        tx: Tx<u64>,
    },
    Status {
        cell: CellId,
        tx: Tx<CellStatus>,
    },
    CampaignNew {
        cell: CellId,
        initial_term: u64,
        tx: Tx<bool>,
    },
    /// From the shard's IO thread: every sync request up to `seq` is durable (or failed:
    /// a storage error, or `Error::Poisoned` when the IO thread panicked and stopped).
    Synced {
        seq: u64,
        result: Result<()>,
    },
    Shutdown,
    /// Test support ([`crate::Node::hold_shard`], feature `testkit`): the shard says so on
    /// `held`, then blocks until `release` is dropped (at most `limit`), and goes on with the
    /// same drain: what was queued meanwhile is handled in this round.
    #[cfg(any(test, feature = "testkit"))]
    Hold {
        held: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
        limit: Duration,
    },
}

/// Which buffered packable proposals must be proposed before a command is handled.
enum Flush {
    None,
    Cell(CellId),
    All,
}

impl Command {
    fn flush(&self) -> Flush {
        match self {
            Command::Deliver(_)
            | Command::Unreachable(_)
            | Command::SnapshotReport { .. }
            | Command::Synced { .. }
            | Command::Propose { packable: true, .. } => Flush::None,
            #[cfg(any(test, feature = "testkit"))]
            Command::Hold { .. } => Flush::None,
            Command::Create { cell, .. }
            | Command::Destroy { cell, .. }
            | Command::Propose { cell, .. }
            | Command::WaitApplied { cell, .. }
            | Command::Read { cell, .. }
            | Command::Membership { cell, .. }
            | Command::Transfer { cell, .. }
            | Command::Compact { cell, .. }
            | Command::Status { cell, .. }
            | Command::CampaignNew { cell, .. } => Flush::Cell(*cell),
            Command::Shutdown => Flush::All,
        }
    }
}

/// The shard's IO thread: serves sync requests in order; requests that queued up while a
/// sync ran are answered by the next one (group commit across rounds).
pub(crate) struct Io {
    tx: Sender<u64>,
    thread: Option<JoinHandle<()>>,
}

impl Io {
    /// Starts the IO thread of shard `name`; it reports to `inbox`.
    pub(crate) fn start(
        name: String,
        log: LogStore,
        inbox: Sender<Command>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Io> {
        Io::start_with(name, move || log.sync(), inbox, metrics)
    }

    /// [`Io::start`] with the sync given as a function (tests inject failing ones).
    fn start_with(
        name: String,
        sync: impl Fn() -> std::result::Result<(), StorageError> + Send + 'static,
        inbox: Sender<Command>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Io> {
        let (tx, mut rx) = inbox::channel::<u64>();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(mut seq) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    seq = more;
                }
                // A panic in the sync must not end this thread silently: the shard would wait
                // forever on the readies it parked. Report it as a failed sync and stop.
                let synced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    timed_sync(&sync, &metrics)
                }));
                let (result, panicked) = match synced {
                    Ok(r) => (r, false),
                    Err(payload) => (
                        Err(Error::Poisoned {
                            reason: format!(
                                "the shard's IO thread panicked in a log sync: {}",
                                panic_reason(&payload)
                            ),
                        }),
                        true,
                    ),
                };
                if inbox.send(Command::Synced { seq, result }).is_err() || panicked {
                    break;
                }
            }
        })?;
        Ok(Io {
            tx,
            thread: Some(thread),
        })
    }

    pub(crate) fn stop(&mut self) {
        // Closing the request channel ends the thread after its current sync.
        let (dead, _) = inbox::channel();
        drop(std::mem::replace(&mut self.tx, dead));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The node's two log stores (see [`LogKind`]).
#[derive(Clone)]
pub(crate) struct Logs {
    /// The store the node was started with; synced by the shards' IO threads.
    pub(crate) durable: LogStore,
    /// In memory, made at node start; never synced.
    pub(crate) volatile: LogStore,
}

impl Logs {
    pub(crate) fn of(&self, kind: LogKind) -> &LogStore {
        match kind {
            LogKind::Durable => &self.durable,
            LogKind::Volatile => &self.volatile,
        }
    }
}

pub(crate) struct Shard {
    pub(crate) node: NodeId,
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) logs: Logs,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) rx: Receiver<Command>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) poison: Arc<Mutex<Option<String>>>,
    pub(crate) factory: Arc<RwLock<Option<CellFactory>>>,
    pub(crate) cells: HashMap<CellId, Cell>,
    /// Cells fenced after a failure of their own (an unreadable record, a refused write),
    /// with the reason; every later call for them answers `Error::Fenced`.
    pub(crate) fenced: HashMap<CellId, String>,
    /// This shard's number; shard 0 runs the node's log GC.
    pub(crate) index: usize,
    /// Cells the last log GC found pinning old segments, for their shard to force-compact.
    pub(crate) gc_pins: Arc<Mutex<HashSet<CellId>>>,
    pub(crate) next_log_gc: Instant,
    pub(crate) touched: HashSet<CellId>,
    /// Compactions decided since the last round; they join the next write.
    pub(crate) pending: WriteBatch,
    /// The IO thread (`None` for a memory log: its sync is a no-op and runs inline).
    pub(crate) io: Option<Io>,
    /// Number of the next sync request.
    pub(crate) next_sync: u64,
    /// Readies waiting for a sync, in request order: `(sync request, readies)`.
    pub(crate) unsynced: VecDeque<(u64, Vec<(CellId, Unpersisted)>)>,
    /// Every cell's read view, shared with the node's API (lease reads outside the shard).
    pub(crate) views: Views,
    /// Commands handled in the current iteration (inline sync only when it was one or two).
    pub(crate) handled: usize,
    /// Packable proposals of the current drain not proposed yet, per cell, in arrival order.
    packs: HashMap<CellId, Vec<Packable>>,
    /// Generation of the next replica this shard opens (see `Cell::generation`).
    pub(crate) next_generation: u64,
}

/// What every shard of a node shares.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) node: NodeId,
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) logs: Logs,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) poison: Arc<Mutex<Option<String>>>,
    pub(crate) factory: Arc<RwLock<Option<CellFactory>>>,
    pub(crate) gc_pins: Arc<Mutex<HashSet<CellId>>>,
    pub(crate) views: Views,
}

/// The read views of a node's cells.
pub(crate) type Views = Arc<RwLock<HashMap<CellId, SharedView>>>;

/// A failure of the node's shared log (not of one cell's records).
fn log_error(e: StorageError) -> Error {
    Error::Storage {
        cell: None,
        source: Arc::new(e),
    }
}

/// Runs one log sync, counting it and its wall time when it succeeds.
fn timed_sync(
    sync: impl FnOnce() -> std::result::Result<(), StorageError>,
    m: &Metrics,
) -> Result<()> {
    let t0 = Instant::now();
    sync().map_err(log_error)?;
    m.log_syncs.fetch_add(1, Ordering::Relaxed);
    m.log_sync_micros
        .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    Ok(())
}

/// The message of a caught panic.
pub(crate) fn panic_reason(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

fn is_initial(m: &raft::eraftpb::Message) -> bool {
    matches!(
        m.get_msg_type(),
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
    ) || (m.get_msg_type() == MessageType::MsgHeartbeat && m.commit == 0)
}

impl Shard {
    /// Shard number `index` of a node, reading `rx`, syncing on `io` (`None`: inline).
    pub(crate) fn new(
        shared: Shared,
        index: usize,
        rx: Receiver<Command>,
        io: Option<Io>,
    ) -> Shard {
        let Shared {
            node,
            cfg,
            logs,
            transport,
            metrics,
            poison,
            factory,
            gc_pins,
            views,
        } = shared;
        Shard {
            node,
            next_log_gc: Instant::now() + cfg.log_gc_interval,
            cfg,
            logs,
            transport,
            rx,
            metrics,
            poison,
            factory,
            cells: HashMap::new(),
            fenced: HashMap::new(),
            index,
            gc_pins,
            touched: HashSet::new(),
            pending: WriteBatch::default(),
            io,
            next_sync: 0,
            unsynced: VecDeque::new(),
            views,
            handled: 0,
            packs: HashMap::new(),
            next_generation: 0,
        }
    }

    pub(crate) fn run(mut self) {
        let tick = self.cfg.tick_interval;
        let mut next_tick = Instant::now() + tick;
        crate::round::enable();
        let mut deferred = false;
        loop {
            let now = Instant::now();
            let wait = if self.touched.is_empty() && !deferred {
                next_tick.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            let mut stop = false;
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => stop |= self.handle(cmd),
                Err(RecvError::Empty) => {}
                Err(RecvError::Disconnected) => stop = true,
            }
            let mut n = 1;
            while n < self.cfg.max_commands_per_round {
                match self.rx.try_recv() {
                    Ok(cmd) => stop |= self.handle(cmd),
                    Err(_) => break,
                }
                n += 1;
            }
            self.handled = n;
            self.flush_all_packs();
            let now = Instant::now();
            if now >= next_tick {
                self.check_log();
                let ids: Vec<CellId> = self.cells.keys().copied().collect();
                for id in ids {
                    self.guarded(id, |c| c.tick(now));
                    self.touched.insert(id);
                }
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
                self.gc_tick();
                self.log_gc(now);
            }
            if let Err(e) = self.round() {
                self.poison_with(&e);
            }
            // What callers deferred to the end of the round (`crate::round`): the answers
            // this round released are finished here, on this thread.
            deferred = crate::round::run();
            if stop {
                break;
            }
        }
        if let Some(io) = self.io.as_mut() {
            io.stop();
        }
        let err = self.poisoned().unwrap_or(Error::Stopped);
        self.fail_unsynced(&err);
        for c in self.cells.values_mut() {
            c.fail_all(&err);
        }
        crate::round::finish();
    }

    fn fail_unsynced(&mut self, err: &Error) {
        for (_, readies) in self.unsynced.drain(..) {
            for (_, u) in readies {
                u.fail(err);
            }
        }
    }

    /// A poisoned log makes every raft call on it panic (raft-rs unwraps storage errors):
    /// poison the node before calling into any cell.
    fn check_log(&mut self) {
        if self.poison.lock().is_some() {
            return;
        }
        let poisoned = self
            .logs
            .durable
            .poisoned()
            .or_else(|| self.logs.volatile.poisoned());
        if let Some(e) = poisoned {
            self.poison_with(&log_error(e));
        }
    }

    /// Runs `f` on the cell. raft-rs panics on a storage error it cannot handle (an unreadable
    /// or corrupt record): that fences this cell instead of killing the shard thread and every
    /// other cell with it.
    fn guarded<R>(&mut self, id: CellId, f: impl FnOnce(&mut Cell) -> R) -> Option<R> {
        let c = self.cells.get_mut(&id)?;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c)));
        match r {
            Ok(r) => Some(r),
            Err(payload) => {
                let reason = panic_reason(&payload);
                self.fence(
                    id,
                    format!("raft failed on this replica's storage: {reason}"),
                );
                None
            }
        }
    }

    /// Takes one cell out of service (its callers get `Error::Fenced`); the node keeps
    /// serving its other cells. A poisoned log poisons the node instead.
    fn fence(&mut self, id: CellId, reason: String) {
        self.check_log();
        if self.poison.lock().is_some() {
            return;
        }
        tracing::error!(node = %self.node, cell = %id, %reason, "replica fenced");
        let err = Error::Fenced {
            cell: id,
            reason: reason.clone(),
        };
        self.retire(id, &err);
        self.fenced.insert(id, reason);
    }

    /// Takes replica `id` out of the shard (read view, parked readies, the cell itself),
    /// failing everything waiting on it with `err`; returns the cell if there was one.
    fn retire(&mut self, id: CellId, err: &Error) -> Option<Cell> {
        self.views.write().remove(&id);
        self.drop_unsynced(id, err);
        self.touched.remove(&id);
        let mut c = self.cells.remove(&id)?;
        c.fail_all(err);
        Some(c)
    }

    /// Takes the parked readies of cell `id` out of `unsynced` and fails them: the replica
    /// that made them is gone, and they must never be finished on a later one of that id.
    fn drop_unsynced(&mut self, id: CellId, err: &Error) {
        for (_, readies) in self.unsynced.iter_mut() {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(readies)
                .into_iter()
                .partition(|(c, _)| *c == id);
            *readies = kept;
            for (_, u) in gone {
                u.fail(err);
            }
        }
    }

    fn poisoned(&self) -> Option<Error> {
        self.poison.lock().as_ref().map(|reason| Error::Poisoned {
            reason: reason.clone(),
        })
    }

    fn poison_with(&mut self, e: &Error) {
        tracing::error!(node = %self.node, error = %e, "fatal: node poisoned");
        {
            let mut p = self.poison.lock();
            if p.is_none() {
                *p = Some(e.to_string());
            }
        }
        // No lease read outside the shards from now on (`create` refuses a poisoned node, so
        // no view comes back; no round runs to give a view left over a lease).
        self.views.write().clear();
        self.fail_unsynced(e);
        for c in self.cells.values_mut() {
            c.fail_all(e);
        }
    }

    fn cell_or<T>(&mut self, cell: CellId, tx: Tx<T>) -> Option<(&mut Cell, Tx<T>)> {
        self.check_log();
        if let Some(e) = self.poisoned() {
            let _ = tx.send(Err(e));
            return None;
        }
        if let Some(reason) = self.fenced.get(&cell) {
            let _ = tx.send(Err(Error::Fenced {
                cell,
                reason: reason.clone(),
            }));
            return None;
        }
        match self.cells.get_mut(&cell) {
            Some(c) => {
                self.touched.insert(cell);
                Some((c, tx))
            }
            None => {
                let _ = tx.send(Err(Error::CellNotFound { cell }));
                None
            }
        }
    }

    /// Proposes the buffered packable proposals of `cell` (see the module doc).
    fn flush_packs(&mut self, cell: CellId) {
        let Some(batch) = self.packs.remove(&cell) else {
            return;
        };
        self.check_log();
        let refuse = |batch: Vec<Packable>, e: &dyn Fn() -> Error| {
            for p in batch {
                let _ = p.tx.send(Err(e()));
            }
        };
        if let Some(e) = self.poisoned() {
            return refuse(batch, &|| e.clone());
        }
        if let Some(reason) = self.fenced.get(&cell) {
            return refuse(batch, &|| Error::Fenced {
                cell,
                reason: reason.clone(),
            });
        }
        if !self.cells.contains_key(&cell) {
            return refuse(batch, &|| Error::CellNotFound { cell });
        }
        self.touched.insert(cell);
        self.guarded(cell, |c| c.propose_packed(batch));
    }

    /// Proposes every buffered packable proposal (end of the drain).
    fn flush_all_packs(&mut self) {
        if self.packs.is_empty() {
            return;
        }
        let cells: Vec<CellId> = self.packs.keys().copied().collect();
        for cell in cells {
            self.flush_packs(cell);
        }
    }

    /// Returns true on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        let now = Instant::now();
        match cmd.flush() {
            Flush::None => {}
            Flush::Cell(cell) => self.flush_packs(cell),
            Flush::All => self.flush_all_packs(),
        }
        match cmd {
            Command::Deliver(batch) => {
                self.check_log();
                if self.poisoned().is_some() {
                    return false;
                }
                for env in batch {
                    self.deliver(env, now);
                }
            }
            Command::Unreachable(node) => {
                for c in self.cells.values_mut() {
                    c.report_unreachable(node);
                }
            }
            Command::SnapshotReport { cell, to, status } => {
                if let Some(c) = self.cells.get_mut(&cell) {
                    c.report_snapshot(to, status);
                    self.touched.insert(cell);
                }
            }
            Command::Create {
                cell,
                voters,
                learners,
                opts,
                sm,
                tx,
            } => {
                let r = self.create(cell, &voters, &learners, opts, sm);
                let _ = tx.send(r);
            }
            Command::Destroy { cell, tx } => {
                let r = self.destroy(cell);
                let _ = tx.send(r);
            }
            Command::Propose {
                cell,
                data,
                deadline,
                ack,
                packable: true,
                tx,
            } => self.packs.entry(cell).or_default().push(Packable {
                data,
                deadline,
                ack,
                tx,
            }),
            Command::Propose {
                cell,
                data,
                deadline,
                ack,
                packable: false,
                tx,
            } => {
                if let Some(tx) = self.cell_or(cell, tx).map(|(_, tx)| tx) {
                    self.guarded(cell, |c| c.propose(data, deadline, ack, tx));
                }
            }
            Command::WaitApplied {
                cell,
                index,
                deadline,
                tx,
            } => {
                if let Some(tx) = self.cell_or(cell, tx).map(|(_, tx)| tx) {
                    self.guarded(cell, |c| c.wait_applied(index, deadline, now, tx));
                }
            }
            Command::Read {
                cell,
                consistency,
                deadline,
                tx,
            } => {
                if let Some(tx) = self.cell_or(cell, tx).map(|(_, tx)| tx) {
                    self.guarded(cell, |c| c.read(consistency, deadline, now, tx));
                }
            }
            Command::Membership {
                cell,
                change,
                deadline,
                tx,
            } => {
                if let Some(tx) = self.cell_or(cell, tx).map(|(_, tx)| tx) {
                    self.guarded(cell, |c| c.change_membership(change, deadline, tx));
                }
            }
            Command::Transfer {
                cell,
                to,
                deadline,
                tx,
            } => {
                if let Some(tx) = self.cell_or(cell, tx).map(|(_, tx)| tx) {
                    self.guarded(cell, |c| c.transfer_leader(to, deadline, tx));
                }
            }
            Command::Compact { cell, tx } => {
                let mut wb = std::mem::take(&mut self.pending);
                if let Some(tx) = self.cell_or(cell, tx).map(|(_, tx)| tx) {
                    self.guarded(cell, |c| {
                        let _ = tx.send(c.maybe_compact(&mut wb, true, false));
                    });
                }
                self.pending = wb;
            }
            Command::Status { cell, tx } => {
                if let Some((c, tx)) = self.cell_or(cell, tx) {
                    let _ = tx.send(Ok(c.status()));
                }
            }
            Command::CampaignNew {
                cell,
                initial_term,
                tx,
            } => {
                if let Some(tx) = self.cell_or(cell, tx).map(|(_, tx)| tx) {
                    if let Some(r) = self.guarded(cell, |c| c.campaign_new(initial_term)) {
                        let _ = tx.send(r);
                        self.touched.insert(cell);
                    }
                }
            }
            Command::Synced { seq, result } => match result {
                Ok(()) => self.synced(seq),
                // The log's durability is unknown from here on: fail everything waiting.
                Err(e) => self.poison_with(&e),
            },
            Command::Shutdown => return true,
            #[cfg(any(test, feature = "testkit"))]
            Command::Hold {
                held,
                release,
                limit,
            } => {
                // Nobody waiting for `held` (the holder gave up): do not block.
                if held.send(()).is_ok() {
                    let _ = release.recv_timeout(limit);
                }
            }
        }
        false
    }

    /// Sync requests up to `seq` are durable: finish the readies they cover.
    fn synced(&mut self, seq: u64) {
        let mut late = Outbox::new();
        while self.unsynced.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, readies)) = self.unsynced.pop_front() {
                self.finish(readies, &mut late);
            }
        }
        self.flush(late);
    }

    /// Steps 6-7 for readies whose write is durable; their cells are touched so what the
    /// persist released comes out in the next round.
    fn finish(&mut self, readies: Vec<(CellId, Unpersisted)>, late: &mut Outbox) {
        for (id, u) in readies {
            let same = self
                .cells
                .get(&id)
                .is_some_and(|c| c.generation == u.generation());
            if !same {
                // Fenced or removed meanwhile, maybe re-created since: the ready belongs to
                // a replica that no longer exists.
                u.fail(&Error::CellNotFound { cell: id });
                continue;
            }
            self.guarded(id, |c| c.ready_persisted(u, late));
            if self.cells.contains_key(&id) {
                self.touched.insert(id);
            }
        }
    }

    fn create(
        &mut self,
        cell: CellId,
        voters: &[NodeId],
        learners: &[NodeId],
        opts: CellOptions,
        sm: Box<dyn StateMachine>,
    ) -> Result<()> {
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        if self.cells.contains_key(&cell) {
            return Err(Error::CellExists { cell });
        }
        // Re-creating a fenced cell (re-seeding it) lifts the fence.
        self.fenced.remove(&cell);
        // Readies of an earlier replica of this id must not finish on the new one.
        self.drop_unsynced(cell, &Error::CellNotFound { cell });
        let mut c = Cell::open(
            cell,
            self.node,
            self.cfg.clone(),
            self.metrics.clone(),
            self.logs.of(opts.log),
            sm,
            opts,
            voters,
            learners,
        )?;
        c.generation = self.next_generation;
        self.next_generation += 1;
        self.views.write().insert(cell, c.view.clone());
        self.cells.insert(cell, c);
        self.touched.insert(cell);
        Ok(())
    }

    /// Takes replica `cell` out of the shard and destroys its raft state (log, hard state,
    /// snapshot), durably: for a durable cell the log is synced before the answer. Everything
    /// waiting on the replica fails with `CellNotFound`, its queued writes are dropped (see
    /// `split_batch`) and its parked readies failed. A fenced replica's fence is lifted and
    /// its raft state destroyed in both stores (its kind is not known any more).
    ///
    /// # Errors
    /// `CellNotFound` for a cell neither served nor fenced here; a poisoned node's error; a
    /// failed log write or sync, which poisons the node (the log's durable state is unknown).
    fn destroy(&mut self, cell: CellId) -> Result<()> {
        self.check_log();
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        let kinds: &[LogKind] = match self.retire(cell, &Error::CellNotFound { cell }) {
            Some(c) if c.log_kind == LogKind::Durable => &[LogKind::Durable],
            Some(_) => &[LogKind::Volatile],
            None if self.fenced.remove(&cell).is_some() => &[LogKind::Durable, LogKind::Volatile],
            None => return Err(Error::CellNotFound { cell }),
        };
        for kind in kinds {
            let store = self.logs.of(*kind).clone();
            let r = store.destroy_cell(cell).map_err(log_error).and_then(|()| {
                if *kind == LogKind::Durable {
                    timed_sync(|| store.sync(), &self.metrics)
                } else {
                    Ok(())
                }
            });
            if let Err(e) = r {
                self.poison_with(&e);
                return Err(e);
            }
        }
        tracing::info!(node = %self.node, %cell, "replica destroyed on request");
        Ok(())
    }

    fn deliver(&mut self, env: Envelope, now: Instant) {
        let Envelope { cell, msg } = env;
        // raft-rs does not check `to`: a misrouted message (e.g. a heartbeat carrying another
        // follower's commit) would corrupt this replica's view. Drop it.
        if msg.to != self.node.get() {
            tracing::warn!(node = %self.node, to = msg.to, %cell, "dropping misaddressed message");
            return;
        }
        if self.fenced.contains_key(&cell) {
            return;
        }
        if !self.cells.contains_key(&cell) {
            // TiKV's `maybe_create_peer`: only an initial message may create a replica.
            if !is_initial(&msg) {
                return;
            }
            let made = self.factory.read().as_ref().and_then(|f| f(cell));
            let Some((opts, sm)) = made else { return };
            if let Err(e) = self.create(cell, &[], &[], opts, sm) {
                tracing::warn!(%cell, error = %e, "could not create cell for incoming message");
                return;
            }
        }
        if let Some(c) = self.cells.get_mut(&cell) {
            // TiKV's `allow_unsafe_vote_after_start = false`: with lease reads, a replica that
            // was (re)opened forgot its leader contact; voting now could elect a leader inside
            // the old leader's lease. Measured from when this replica opened, not from node
            // start: a replica restarted on a long-running node is just as forgetful.
            if self.cfg.cell.lease_reads
                && now.saturating_duration_since(c.opened) < self.cfg.election_timeout()
                && matches!(
                    msg.get_msg_type(),
                    MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                )
                && msg.get_context() != raft::CAMPAIGN_TRANSFER
            {
                return;
            }
            self.guarded(cell, |c| c.step(msg, now));
            self.touched.insert(cell);
        }
    }

    fn gc_tick(&mut self) {
        let mut wb = std::mem::take(&mut self.pending);
        let mut fatal = None;
        let ids: Vec<CellId> = self.cells.keys().copied().collect();
        for id in ids {
            if let Some(Err(e)) = self.guarded(id, |c| c.maybe_compact(&mut wb, false, false)) {
                fatal = Some(e);
                break;
            }
        }
        self.pending = wb;
        if let Some(e) = fatal {
            self.poison_with(&e);
        }
    }

    /// Node-wide log GC (shard 0) every `log_gc_interval`. Cells whose live entries sit two or
    /// more segments behind the active one block every drop; each shard force-compacts its own
    /// (to their durable applied index), so the next run can drop those segments.
    fn log_gc(&mut self, now: Instant) {
        let every = self.cfg.log_gc_interval;
        if every.is_zero() || self.poisoned().is_some() {
            return;
        }
        if now >= self.next_log_gc {
            self.next_log_gc = now + every;
            // Only the durable store has segments; volatile cells never write there, so they
            // never pin one (and their entries are bounded by `log_gc_threshold` compaction).
            if self.index == 0 {
                match self.logs.durable.gc() {
                    Ok(stats) => {
                        let mut pins = self.gc_pins.lock();
                        for p in &stats.pinned {
                            if p.segment + 2 <= stats.active_segment {
                                pins.insert(p.cell);
                            }
                        }
                        self.metrics
                            .log_segments_dropped
                            .fetch_add(stats.segments_dropped, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(node = %self.node, error = %e, "log gc failed");
                        self.check_log();
                        return;
                    }
                }
            }
        }
        // Compact one pinned cell of this shard per tick, not all of them in one round: a
        // forced compaction starts the cell's image write (a state machine may do work on
        // this thread for it: a KV store's capture took tens of milliseconds before it stopped
        // copying), and compacting every pinned cell at once stalled all of the shard's cells
        // for 100-140 ms (W12 after W1-W10); one per tick also spreads the image writes.
        let next = {
            let mut pins = self.gc_pins.lock();
            let mine = pins.iter().find(|c| self.cells.contains_key(c)).copied();
            if let Some(c) = mine {
                pins.remove(&c);
            }
            mine
        };
        let Some(id) = next else {
            return;
        };
        let mut wb = std::mem::take(&mut self.pending);
        let r = self.guarded(id, |c| c.maybe_compact(&mut wb, true, true));
        self.touched.insert(id);
        self.pending = wb;
        if let Some(Err(e)) = r {
            self.poison_with(&e);
        }
    }

    fn flush(&self, out: Outbox) {
        for (to, batch) in out {
            if to == self.node || batch.is_empty() {
                continue;
            }
            self.metrics.transport_sends.fetch_add(1, Ordering::Relaxed);
            self.transport.send(to, batch);
        }
    }

    fn round(&mut self) -> Result<()> {
        self.check_log();
        if self.poisoned().is_some() {
            self.touched.clear();
            return Ok(());
        }
        let touched: Vec<CellId> = self.touched.drain().collect();
        let mut wb = std::mem::take(&mut self.pending);
        let mut early = Outbox::new();
        // Only a durable cell's ready can require a sync; a volatile cell's is persisted as
        // soon as the volatile store holds it.
        let mut must_sync = false;
        let mut readies: Vec<(CellId, Unpersisted)> = Vec::new();
        let mut volatile_readies: Vec<(CellId, Unpersisted)> = Vec::new();
        for id in &touched {
            let mut cell_sync = false;
            match self.guarded(*id, |c| {
                c.ready_append(&mut wb, &mut early, &mut cell_sync)
                    .map(|u| (u, c.log_kind))
            }) {
                Some(r) => match r? {
                    (Some(u), LogKind::Durable) => {
                        must_sync |= cell_sync;
                        readies.push((*id, u));
                    }
                    (Some(u), LogKind::Volatile) => volatile_readies.push((*id, u)),
                    (None, _) => {}
                },
                // Fenced mid-ready: none of its writes may reach the log.
                None => {
                    wb.cells.remove(id);
                }
            }
        }
        self.flush(early);
        // Each cell's records go to its own store: one write per store with records.
        let (durable_wb, volatile_wb) = self.split_batch(wb);
        for (kind, batch) in [
            (LogKind::Durable, durable_wb),
            (LogKind::Volatile, volatile_wb),
        ] {
            let store = self.logs.of(kind).clone();
            if batch.is_empty() {
                continue;
            }
            let refused = store.write_fencing(batch).map_err(log_error)?;
            self.metrics.log_writes.fetch_add(1, Ordering::Relaxed);
            // A write the log refuses for one cell (e.g. an entry over the record limit from
            // a leader with a larger limit) fences that cell; the others were written.
            for (id, e) in refused {
                let reason = format!("its log write was refused: {e}");
                for list in [&mut readies, &mut volatile_readies] {
                    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(list)
                        .into_iter()
                        .partition(|(c, _)| *c == id);
                    *list = kept;
                    for (_, u) in gone {
                        u.fail(&Error::Fenced {
                            cell: id,
                            reason: reason.clone(),
                        });
                    }
                }
                self.fence(id, reason);
            }
        }
        if !readies.is_empty() || !volatile_readies.is_empty() {
            self.metrics.rounds.fetch_add(1, Ordering::Relaxed);
        }
        let mut late = Outbox::new();
        // Volatile readies are persisted now (in memory, no sync): finish them this round,
        // whatever the durable cells wait for. A volatile cell never has a ready parked, so
        // its readies still finish in order.
        self.finish(volatile_readies, &mut late);
        if must_sync {
            // Idle (this round came from one or two commands, nothing queued, no sync in
            // flight): sync inline, which saves the two thread hand-offs a lone writer would
            // otherwise wait for. Under load, the IO thread syncs while the shard goes on.
            let idle = self.unsynced.is_empty() && self.rx.is_empty() && self.handled <= 2;
            match self.io.as_ref().filter(|_| !idle) {
                Some(io) => {
                    let seq = self.next_sync;
                    self.next_sync += 1;
                    if io.tx.send(seq).is_err() {
                        return Err(Error::Poisoned {
                            reason: "the shard's IO thread stopped".into(),
                        });
                    }
                    self.unsynced.push_back((seq, readies));
                }
                None => {
                    // Answers this round released (deferred by their callers) go out
                    // before the shard blocks on the disk.
                    crate::round::run();
                    timed_sync(|| self.logs.durable.sync(), &self.metrics)?;
                    self.finish(readies, &mut late);
                }
            }
        } else {
            // Nothing of this round must be synced. A ready that follows an unfinished one of
            // its cell finishes with it (readies are durable in order); the others now.
            let mut now = Vec::new();
            for (id, u) in readies {
                let behind = self.cells.get(&id).is_some_and(|c| c.inflight() > 1);
                match self.unsynced.back_mut() {
                    Some((_, last)) if behind => last.push((id, u)),
                    _ => now.push((id, u)),
                }
            }
            self.finish(now, &mut late);
        }
        self.flush(late);
        let mut removed = Vec::new();
        for id in &touched {
            let Some(r) = self.guarded(*id, |c| {
                c.after_round().map(|()| (c.has_ready(), c.removed))
            }) else {
                continue;
            };
            let (again, gone) = r?;
            if again {
                // after_round proposed (leave joint): handle it in the next round.
                self.touched.insert(*id);
            }
            if gone {
                removed.push(*id);
            }
        }
        for id in removed {
            if let Some(c) = self.retire(id, &Error::CellNotFound { cell: id }) {
                if let Err(e) = self.logs.of(c.log_kind).destroy_cell(id) {
                    tracing::warn!(cell = %id, error = %e, "destroying removed cell's log failed");
                }
            }
        }
        Ok(())
    }

    /// Splits a round's writes by the store of each cell. Writes of a cell no longer served
    /// here (fenced or removed since a compaction was queued for it) are dropped: no store
    /// may get records of a replica that is gone.
    fn split_batch(&self, wb: WriteBatch) -> (WriteBatch, WriteBatch) {
        let mut durable = WriteBatch::default();
        let mut volatile = WriteBatch::default();
        for (id, w) in wb.cells {
            match self.cells.get(&id).map(|c| c.log_kind) {
                Some(LogKind::Durable) => {
                    durable.cells.insert(id, w);
                }
                Some(LogKind::Volatile) => {
                    volatile.cells.insert(id, w);
                }
                None => {}
            }
        }
        (durable, volatile)
    }
}

/// Default wait for API calls without an explicit deadline.
pub(crate) const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::ReplicationMode;
    use crate::testkit::LogStateMachine;

    struct Null;
    impl Transport for Null {
        fn send(&self, _: NodeId, _: Vec<Envelope>) {}
    }

    fn shard() -> (Shard, Sender<Command>) {
        let (tx, rx) = inbox::channel();
        let shared = Shared {
            node: NodeId(1),
            cfg: Arc::new(NodeConfig::default()),
            logs: Logs {
                durable: LogStore::in_memory(),
                volatile: LogStore::in_memory(),
            },
            transport: Arc::new(Null),
            metrics: Arc::new(Metrics::default()),
            poison: Arc::new(Mutex::new(None)),
            factory: Arc::new(RwLock::new(None)),
            gc_pins: Arc::new(Mutex::new(HashSet::new())),
            views: Views::default(),
        };
        (Shard::new(shared, 0, rx, None), tx)
    }

    /// Opens `id` on the shard, node 1 its single voter.
    fn create_single_voter(s: &mut Shard, id: CellId) {
        let (sm, _) = LogStateMachine::in_memory();
        s.create(
            id,
            &[NodeId(1)],
            &[],
            ReplicationMode::Consensus.into(),
            Box::new(sm),
        )
        .expect("create");
    }

    /// Opens `id` as the single voter and ticks it into an election: its first ready (the
    /// new term's hard state and empty entry) must be synced. The ready is parked in
    /// `unsynced` as sync request `seq`, as the IO thread path does.
    fn park_first_ready(s: &mut Shard, id: CellId, seq: u64) {
        create_single_voter(s, id);
        let c = s.cells.get_mut(&id).expect("cell");
        let now = Instant::now();
        for _ in 0..2 * s.cfg.cell.election_tick {
            c.tick(now);
        }
        let mut wb = WriteBatch::default();
        let mut early = Outbox::new();
        let mut must_sync = false;
        let u = c
            .ready_append(&mut wb, &mut early, &mut must_sync)
            .expect("ready")
            .expect("a ready after the election");
        assert!(must_sync, "a new term must be synced");
        assert_eq!(c.inflight(), 1);
        s.logs.durable.write_fencing(wb).expect("write");
        s.unsynced.push_back((seq, vec![(id, u)]));
        s.next_sync = seq + 1;
    }

    /// A replica fenced while its ready waits for a sync, then re-created before the sync
    /// returns: the old ready must not be finished on the new replica (its persisted index
    /// would move over entries that are not durable, and its inflight count would drop).
    #[test]
    fn ready_of_a_replaced_replica_is_not_finished_on_the_new_one() {
        let (mut s, _tx) = shard();
        let id = CellId(7);
        park_first_ready(&mut s, id, 0);
        s.fence(id, "test".into());
        assert!(!s.cells.contains_key(&id));
        // Re-seeded from scratch (as a removed replica's log is destroyed).
        s.logs.durable.destroy_cell(id).expect("destroy");
        park_first_ready(&mut s, id, 1);
        let gen = s.cells[&id].generation;
        // The old replica's sync returns.
        s.synced(0);
        let c = s.cells.get(&id).expect("the new replica is still served");
        assert_eq!(c.generation, gen);
        assert_eq!(
            c.inflight(),
            1,
            "the new replica's own ready is still waiting for its sync"
        );
        // Its own sync finishes it.
        s.synced(1);
        assert_eq!(s.cells[&id].inflight(), 0);
        assert!(s.unsynced.is_empty());
        assert!(!s.fenced.contains_key(&id));
    }

    /// `destroy` on a replica whose ready waits for a sync fails that ready and destroys its
    /// log; on a fenced replica it lifts the fence and destroys its log too; an unknown cell
    /// is `CellNotFound`, and a poisoned node refuses.
    #[test]
    fn destroy_fails_parked_readies_and_lifts_a_fence() {
        let (mut s, _tx) = shard();
        let (parked, fenced) = (CellId(7), CellId(8));
        park_first_ready(&mut s, parked, 0);
        create_single_voter(&mut s, fenced);
        s.fence(fenced, "test".into());
        for id in [parked, fenced] {
            s.destroy(id).expect("destroy");
            assert!(!s.cells.contains_key(&id) && !s.fenced.contains_key(&id));
            assert!(!s.logs.durable.cells().contains(&id), "{id} log destroyed");
        }
        assert!(s.unsynced.iter().all(|(_, r)| r.is_empty()));
        assert!(matches!(
            s.destroy(parked),
            Err(Error::CellNotFound { cell }) if cell == parked
        ));
        create_single_voter(&mut s, parked);
        s.poison_with(&Error::Poisoned {
            reason: "test".into(),
        });
        assert!(matches!(s.destroy(parked), Err(Error::Poisoned { .. })));
    }

    /// A panic in the IO thread's sync is reported to the shard as a failed sync (the shard
    /// then poisons the node and fails the parked readies) and ends the thread.
    #[test]
    fn io_thread_reports_a_panicking_sync() {
        let (inbox, mut rx) = inbox::channel();
        let mut io = Io::start_with(
            "io-test".into(),
            || panic!("disk on fire"),
            inbox,
            Arc::new(Metrics::default()),
        )
        .expect("spawn");
        io.tx.send(3).expect("request");
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Command::Synced {
                seq: 3,
                result: Err(Error::Poisoned { reason }),
            }) => assert!(reason.contains("disk on fire"), "{reason}"),
            Ok(_) => panic!("expected a failed sync of request 3"),
            Err(e) => panic!("no report from the IO thread: {e}"),
        }
        // The thread ended: a later request is never answered, and stop() joins at once.
        let _ = io.tx.send(4);
        io.stop();
        assert!(rx.try_recv().is_err());

        // The shard fails what was parked and poisons the node.
        let (mut s, _tx) = shard();
        park_first_ready(&mut s, CellId(9), 0);
        let stop = s.handle(Command::Synced {
            seq: 0,
            result: Err(Error::Poisoned {
                reason: "the shard's IO thread panicked".into(),
            }),
        });
        assert!(!stop);
        assert!(s.unsynced.is_empty());
        assert!(s.poisoned().is_some());
    }

    /// Runs rounds until `done` (at most 50), as the shard loop would under load (never idle,
    /// so a durable sync would go to the IO thread); finished syncs are handled as they come.
    fn rounds_until(s: &mut Shard, mut done: impl FnMut(&Shard) -> bool) -> bool {
        for _ in 0..50 {
            s.handled = 100;
            s.round().expect("round");
            while let Ok(cmd) = s.rx.recv_timeout(Duration::from_millis(5)) {
                s.handle(cmd);
            }
            if done(s) {
                return true;
            }
        }
        false
    }

    fn elect(s: &mut Shard, id: CellId) {
        let now = Instant::now();
        let c = s.cells.get_mut(&id).expect("cell");
        for _ in 0..2 * s.cfg.cell.election_tick {
            c.tick(now);
        }
        s.touched.insert(id);
    }

    /// A round touching only volatile cells is finished in that round: no sync request to the
    /// IO thread, no parked ready, no sync counted, nothing in the durable store. A durable
    /// cell's round (under load) does go through the IO thread.
    #[test]
    fn volatile_rounds_never_reach_the_io_thread() {
        let (mut s, inbox) = shard();
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = syncs.clone();
        s.io = Some(
            Io::start_with(
                "io-volatile-test".into(),
                move || {
                    counted.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
                inbox,
                s.metrics.clone(),
            )
            .expect("spawn"),
        );
        let v = CellId(3);
        let (sm, h) = LogStateMachine::in_memory();
        s.create(
            v,
            &[NodeId(1)],
            &[],
            CellOptions::volatile(ReplicationMode::Consensus),
            Box::new(sm),
        )
        .expect("create");
        elect(&mut s, v);
        assert!(rounds_until(&mut s, |s| s.cells[&v].status().role
            == crate::cell::Role::Leader));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        s.handle(Command::Propose {
            cell: v,
            data: bytes::Bytes::from_static(b"volatile"),
            deadline: Instant::now() + Duration::from_secs(30),
            ack: crate::cell::Ack::CellMode,
            packable: false,
            tx,
        });
        assert!(rounds_until(&mut s, |_| !h.data().is_empty()));
        match rx.try_recv() {
            Ok(Ok(r)) => assert_eq!(r.guarantee, crate::cell::Guarantee::Applied),
            other => panic!("no reply to the volatile proposal: {other:?}"),
        }
        assert_eq!(h.data(), vec![bytes::Bytes::from_static(b"volatile")]);
        assert_eq!(s.next_sync, 0, "no sync request for volatile rounds");
        assert!(s.unsynced.is_empty());
        assert_eq!(syncs.load(Ordering::Relaxed), 0);
        assert_eq!(s.metrics.log_syncs.load(Ordering::Relaxed), 0);
        assert_eq!(s.cells[&v].inflight(), 0);
        assert_eq!(s.logs.volatile.cells(), vec![v]);
        assert!(s.logs.durable.cells().is_empty());

        // The contrast: a durable cell's election must be synced, by the IO thread.
        let d = CellId(4);
        let (sm, _) = LogStateMachine::in_memory();
        s.create(
            d,
            &[NodeId(1)],
            &[],
            ReplicationMode::Consensus.into(),
            Box::new(sm),
        )
        .expect("create");
        elect(&mut s, d);
        assert!(rounds_until(&mut s, |s| s.cells[&d].status().role
            == crate::cell::Role::Leader));
        assert!(s.next_sync > 0, "durable rounds ask the IO thread");
        assert!(syncs.load(Ordering::Relaxed) > 0);
        assert_eq!(s.logs.durable.cells(), vec![d]);
    }

    /// Log GC's forced compactions are spread over ticks: each call compacts at most one
    /// pinned cell of this shard (each starts an image write), and leaves pins of cells on
    /// other shards alone.
    #[test]
    fn log_gc_compacts_one_pinned_cell_per_tick() {
        let (mut s, _tx) = shard();
        for id in [CellId(1), CellId(2), CellId(3)] {
            create_single_voter(&mut s, id);
        }
        let elsewhere = CellId(99);
        s.gc_pins
            .lock()
            .extend([CellId(1), CellId(2), CellId(3), elsewhere]);
        // Before the next GC pass is due: only the pinned cells are worked off.
        let now = Instant::now();
        assert!(now < s.next_log_gc);
        for left in [3, 2, 1, 1] {
            s.log_gc(now);
            assert_eq!(s.gc_pins.lock().len(), left);
        }
        assert!(s.gc_pins.lock().contains(&elsewhere));
        assert!(s.poisoned().is_none());
    }

    /// Same with the generation check alone: an old ready that is still parked (as if the
    /// replica was replaced without going through `fence`) is failed, not finished.
    #[test]
    fn finish_checks_the_generation() {
        let (mut s, _tx) = shard();
        let id = CellId(8);
        park_first_ready(&mut s, id, 0);
        let (_, old) = s.unsynced.pop_front().expect("parked");
        // Replace the replica behind the shard's back.
        s.views.write().remove(&id);
        s.cells.remove(&id);
        s.logs.durable.destroy_cell(id).expect("destroy");
        park_first_ready(&mut s, id, 1);
        let mut late = Outbox::new();
        s.finish(old, &mut late);
        assert_eq!(s.cells[&id].inflight(), 1, "old ready was dropped");
        s.synced(1);
        assert_eq!(s.cells[&id].inflight(), 0);
    }
}
