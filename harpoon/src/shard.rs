//! A shard: one std thread that owns a set of cells and runs their rounds.
//!
//! One round (the write path's *append* hop for every cell touched):
//! 1. drain the inbox (messages, proposals, reads, admin) and step the cells;
//! 2. tick every cell of the shard if the coalesced tick is due;
//! 3. collect the ready of every touched cell (Ready steps 1-5, `Cell::ready_append`) into
//!    ONE write batch, sending leader messages first, one `Transport::send` per node;
//! 4. ONE `LogStore::write` and, if any ready must be durable, ONE `LogStore::sync`;
//! 5. finish every ready (steps 6-8, `Cell::ready_persisted`): persisted messages, advance,
//!    apply, reply; then one more `Transport::send` per node for what the persist released.
//!
//! A RawNode never leaves its shard thread, so nothing raft-related is held across an await.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::{Mutex, RwLock};
use proto::{CellId, NodeId};
use raft::eraftpb::{ConfState, MessageType};

use crate::cell::{Cell, CellStatus, Outbox, ReadConsistency, ReplicationMode, Reply};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::membership::MembershipChange;
use crate::metrics::Metrics;
use crate::state_machine::StateMachine;
use crate::storage::{LogStore, WriteBatch};
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
        mode: ReplicationMode,
        sm: Box<dyn StateMachine>,
        tx: Tx<()>,
    },
    Propose {
        cell: CellId,
        data: bytes::Bytes,
        deadline: Instant,
        tx: Tx<Reply>,
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
    Shutdown,
}

pub(crate) struct Shard {
    pub(crate) node: NodeId,
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) log: LogStore,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) rx: Receiver<Command>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) poison: Arc<Mutex<Option<String>>>,
    pub(crate) factory: Arc<RwLock<Option<CellFactory>>>,
    pub(crate) started: Instant,
    pub(crate) cells: HashMap<CellId, Cell>,
    pub(crate) touched: HashSet<CellId>,
    /// Compactions decided since the last round; they join the next write.
    pub(crate) pending: WriteBatch,
}

fn is_initial(m: &raft::eraftpb::Message) -> bool {
    matches!(
        m.get_msg_type(),
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
    ) || (m.get_msg_type() == MessageType::MsgHeartbeat && m.commit == 0)
}

impl Shard {
    pub(crate) fn run(mut self) {
        let tick = self.cfg.tick_interval;
        let mut next_tick = Instant::now() + tick;
        loop {
            let now = Instant::now();
            let wait = if self.touched.is_empty() {
                next_tick.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            let mut stop = false;
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => stop |= self.handle(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            let mut n = 1;
            while n < self.cfg.max_commands_per_round {
                match self.rx.try_recv() {
                    Ok(cmd) => stop |= self.handle(cmd),
                    Err(_) => break,
                }
                n += 1;
            }
            let now = Instant::now();
            if now >= next_tick {
                for (id, c) in self.cells.iter_mut() {
                    c.tick(now);
                    self.touched.insert(*id);
                }
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
                self.gc_tick();
            }
            if let Err(e) = self.round() {
                self.poison_with(&e);
            }
            if stop {
                break;
            }
        }
        let err = self.poisoned().unwrap_or(Error::Stopped);
        for c in self.cells.values_mut() {
            c.fail_all(&err);
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
        for c in self.cells.values_mut() {
            c.fail_all(e);
        }
    }

    fn cell_or<T>(&mut self, cell: CellId, tx: Tx<T>) -> Option<(&mut Cell, Tx<T>)> {
        if let Some(e) = self.poisoned() {
            let _ = tx.send(Err(e));
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

    /// Returns true on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        let now = Instant::now();
        match cmd {
            Command::Deliver(batch) => {
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
                mode,
                sm,
                tx,
            } => {
                let r = self.create(cell, &voters, &learners, mode, sm);
                let _ = tx.send(r);
            }
            Command::Propose {
                cell,
                data,
                deadline,
                tx,
            } => {
                if let Some((c, tx)) = self.cell_or(cell, tx) {
                    c.propose(data, deadline, tx);
                }
            }
            Command::Read {
                cell,
                consistency,
                deadline,
                tx,
            } => {
                if let Some((c, tx)) = self.cell_or(cell, tx) {
                    c.read(consistency, deadline, now, tx);
                }
            }
            Command::Membership {
                cell,
                change,
                deadline,
                tx,
            } => {
                if let Some((c, tx)) = self.cell_or(cell, tx) {
                    c.change_membership(change, deadline, tx);
                }
            }
            Command::Transfer {
                cell,
                to,
                deadline,
                tx,
            } => {
                if let Some((c, tx)) = self.cell_or(cell, tx) {
                    c.transfer_leader(to, deadline, tx);
                }
            }
            Command::Compact { cell, tx } => {
                let mut wb = std::mem::take(&mut self.pending);
                if let Some((c, tx)) = self.cell_or(cell, tx) {
                    let r = c.maybe_compact(&mut wb, true);
                    let _ = tx.send(r);
                }
                self.pending = wb;
            }
            Command::Status { cell, tx } => {
                if let Some((c, tx)) = self.cell_or(cell, tx) {
                    let _ = tx.send(Ok(c.status()));
                }
            }
            Command::Shutdown => return true,
        }
        false
    }

    fn create(
        &mut self,
        cell: CellId,
        voters: &[NodeId],
        learners: &[NodeId],
        mode: ReplicationMode,
        sm: Box<dyn StateMachine>,
    ) -> Result<()> {
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        if self.cells.contains_key(&cell) {
            return Err(Error::CellExists { cell });
        }
        let c = Cell::open(
            cell,
            self.node,
            self.cfg.clone(),
            self.metrics.clone(),
            &self.log,
            sm,
            mode,
            voters,
            learners,
        )?;
        self.cells.insert(cell, c);
        self.touched.insert(cell);
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
        // TiKV's `allow_unsafe_vote_after_start = false`: with lease reads, a restarted node
        // forgot its leader contact; voting now could elect a leader inside the old lease.
        if self.cfg.cell.lease_reads
            && now.duration_since(self.started) < self.cfg.election_timeout()
            && matches!(
                msg.get_msg_type(),
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
            )
            && msg.get_context() != raft::CAMPAIGN_TRANSFER
        {
            return;
        }
        if !self.cells.contains_key(&cell) {
            // TiKV's `maybe_create_peer`: only an initial message may create a replica.
            if !is_initial(&msg) {
                return;
            }
            let made = self.factory.read().as_ref().and_then(|f| f(cell));
            let Some((mode, sm)) = made else { return };
            if let Err(e) = self.create(cell, &[], &[], mode, sm) {
                tracing::warn!(%cell, error = %e, "could not create cell for incoming message");
                return;
            }
        }
        if let Some(c) = self.cells.get_mut(&cell) {
            c.step(msg, now);
            self.touched.insert(cell);
        }
    }

    fn gc_tick(&mut self) {
        let mut wb = std::mem::take(&mut self.pending);
        let mut fatal = None;
        for c in self.cells.values_mut() {
            if let Err(e) = c.maybe_compact(&mut wb, false) {
                fatal = Some(e);
                break;
            }
        }
        self.pending = wb;
        if let Some(e) = fatal {
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
        if self.poisoned().is_some() {
            self.touched.clear();
            return Ok(());
        }
        let touched: Vec<CellId> = self.touched.drain().collect();
        let mut wb = std::mem::take(&mut self.pending);
        let mut early = Outbox::new();
        let mut must_sync = false;
        let mut unpersisted = Vec::new();
        for id in &touched {
            if let Some(c) = self.cells.get_mut(id) {
                if let Some(u) = c.ready_append(&mut wb, &mut early, &mut must_sync)? {
                    unpersisted.push((*id, u));
                }
            }
        }
        self.flush(early);
        if !wb.is_empty() {
            self.log.write(wb).map_err(|e| Error::Storage {
                cell: None,
                source: Arc::new(e),
            })?;
            self.metrics.log_writes.fetch_add(1, Ordering::Relaxed);
        }
        if must_sync {
            self.log.sync().map_err(|e| Error::Storage {
                cell: None,
                source: Arc::new(e),
            })?;
            self.metrics.log_syncs.fetch_add(1, Ordering::Relaxed);
        }
        if !unpersisted.is_empty() {
            self.metrics.rounds.fetch_add(1, Ordering::Relaxed);
        }
        let mut late = Outbox::new();
        for (id, u) in unpersisted {
            if let Some(c) = self.cells.get_mut(&id) {
                c.ready_persisted(u, &mut late)?;
            }
        }
        self.flush(late);
        let mut removed = Vec::new();
        for id in &touched {
            if let Some(c) = self.cells.get_mut(id) {
                c.after_round()?;
                if c.has_ready() {
                    // after_round proposed (leave joint): handle it in the next round.
                    self.touched.insert(*id);
                }
                if c.removed {
                    removed.push(*id);
                }
            }
        }
        for id in removed {
            if let Some(mut c) = self.cells.remove(&id) {
                c.fail_all(&Error::CellNotFound { cell: id });
                if let Err(e) = self.log.destroy_cell(id) {
                    tracing::warn!(cell = %id, error = %e, "destroying removed cell's log failed");
                }
            }
        }
        Ok(())
    }
}

/// Default wait for API calls without an explicit deadline.
pub(crate) const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
