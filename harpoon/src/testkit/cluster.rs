//! N nodes in one process over the in-memory transport or over TCP on 127.0.0.1.
//!
//! Each node has a "disk": its `LogStore` and one [`LogStateMachine`] file per cell in a
//! temporary directory. [`Cluster::kill`] stops the node and takes it off the network;
//! [`Cluster::restart`] starts it again from that disk and re-creates its durable cells (a
//! volatile cell's replica died with the node: it is not reopened, see `LogKind::Volatile`).
//!
//! The fault API ([`Cluster::partition`], [`Cluster::isolate`], [`Cluster::cut`],
//! [`Cluster::drop_if`], [`Cluster::heal`], kill/restart) is the same for both transports:
//! over [`TransportKind::Mem`] it drives the [`MemNetwork`] (which also has probabilistic
//! faults, `Cluster::net`); over [`TransportKind::Tcp`] every node's `TcpTransport` sits
//! behind a [`FilterTransport`](crate::transport::filter::FilterTransport) applying the same
//! rules (`Cluster::filter`). TCP nodes listen on port 0; a restarted node gets a new port and
//! every peer is told.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::{CellId, NodeId};

use super::log_sm::{AppliedEntry, LogHandle, LogStateMachine};
use super::wait_until;
use crate::cell::{CellOptions, CellStatus, LogKind, ReplicationMode, Reply, Role};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::node::Node;
use crate::storage::LogStore;
use crate::transport::filter::{FilterId, FilterNetwork};
use crate::transport::mem::MemNetwork;
use crate::transport::tcp::{TcpConfig, TcpStats, TcpTransport};
use crate::transport::{Envelope, Transport};

/// Which transport a [`Cluster`] runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// `transport::mem`, with every fault it offers.
    #[default]
    Mem,
    /// `transport::tcp` on 127.0.0.1 (OS-picked ports) behind `transport::filter`.
    Tcp,
}

/// How a [`Cluster`] is built.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Node configuration (short ticks by default: 10 ms).
    pub node: NodeConfig,
    /// Seed of the network's fault randomness.
    pub seed: u64,
    /// Raft logs on a seglog in the node's directory (true) or in memory kept across
    /// restarts (false: a "disk" that never loses a write).
    pub durable: bool,
    /// The transport between nodes.
    pub transport: TransportKind,
}

impl ClusterOptions {
    /// The defaults over `transport`.
    pub fn over(transport: TransportKind) -> Self {
        ClusterOptions {
            transport,
            ..ClusterOptions::default()
        }
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        let mut node = NodeConfig {
            tick_interval: Duration::from_millis(10),
            ..NodeConfig::default()
        };
        node.cell.election_tick = 10;
        node.cell.heartbeat_tick = 2;
        node.cell.lease_ticks = 7;
        ClusterOptions {
            node,
            seed: 7,
            durable: true,
            transport: TransportKind::Mem,
        }
    }
}

struct CellInfo {
    opts: CellOptions,
    /// Nodes that hold a replica (created on them).
    replicas: Vec<NodeId>,
    voters: Vec<NodeId>,
}

/// The TCP side of a cluster: a runtime for the transports' tasks, each running node's
/// transport and listening address.
struct TcpNet {
    rt: tokio::runtime::Runtime,
    transports: HashMap<NodeId, Arc<TcpTransport>>,
    addrs: HashMap<NodeId, SocketAddr>,
}

/// Test settings of the TCP transport: quick reconnects after a kill or restart.
fn tcp_config() -> TcpConfig {
    TcpConfig {
        cluster: "testkit".into(),
        cluster_secret: b"testkit secret".to_vec(),
        connect_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(2),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..TcpConfig::default()
    }
}

/// An in-process cluster.
pub struct Cluster {
    /// The in-memory network (mem clusters only); use it for probabilistic faults.
    pub net: MemNetwork,
    /// The connectivity rules in front of each node's TCP transport (TCP clusters only).
    pub filter: FilterNetwork,
    tcp: Option<TcpNet>,
    opts: ClusterOptions,
    dir: tempfile::TempDir,
    nodes: BTreeMap<NodeId, Node>,
    stores: HashMap<NodeId, LogStore>,
    handles: HashMap<(NodeId, CellId), LogHandle>,
    cells: HashMap<CellId, CellInfo>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.nodes.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Generous bound for waits: CI shares 2 cores.
pub const WAIT: Duration = Duration::from_secs(30);

impl Cluster {
    /// Start nodes `1..=n`.
    ///
    /// # Panics
    /// Panics if a node cannot start (test helper).
    pub fn new(n: u64, opts: ClusterOptions) -> Cluster {
        let tcp = (opts.transport == TransportKind::Tcp).then(|| TcpNet {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("testkit-tcp")
                .enable_all()
                .build()
                .expect("tokio runtime"),
            transports: HashMap::new(),
            addrs: HashMap::new(),
        });
        let mut c = Cluster {
            net: MemNetwork::new(opts.seed),
            filter: FilterNetwork::new(),
            tcp,
            opts,
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: BTreeMap::new(),
            stores: HashMap::new(),
            handles: HashMap::new(),
            cells: HashMap::new(),
        };
        for i in 1..=n {
            c.start_node(NodeId(i));
        }
        c
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{}", id.get()))
    }

    fn store(&mut self, id: NodeId) -> LogStore {
        if self.opts.durable {
            // Small segments: a test cluster has up to 7 nodes in one temp dir.
            let cfg = seglog::Config {
                segment_size: 8 << 20,
                max_record_size: 4 << 20,
                ..seglog::Config::default()
            };
            let (store, _cells) =
                LogStore::open(self.node_dir(id).join("raft"), cfg).expect("open raft log");
            return store;
        }
        self.stores
            .entry(id)
            .or_insert_with(LogStore::in_memory)
            .clone()
    }

    /// Start (or restart) node `id` on its disk; does not create cells.
    ///
    /// # Panics
    /// Panics if the node cannot start.
    pub fn start_node(&mut self, id: NodeId) {
        std::fs::create_dir_all(self.node_dir(id)).expect("node dir");
        let store = self.store(id);
        let Some(tcp) = self.tcp.as_mut() else {
            let node = Node::start(id, self.opts.node.clone(), store, self.net.transport(id))
                .expect("node start");
            self.net.register(id, node.sink());
            self.nodes.insert(id, node);
            return;
        };
        let listener = tcp
            .rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let mut slot = None;
        let filter = self.filter.clone();
        let handle = tcp.rt.handle().clone();
        let node = Node::start_with(id, self.opts.node.clone(), store, |sink| {
            let t = Arc::new(TcpTransport::new(id, tcp_config(), sink.clone(), handle)?);
            slot = Some(t.clone());
            Ok::<Arc<dyn Transport>, crate::transport::tcp::TcpConfigError>(
                filter.wrap(id, t, sink),
            )
        })
        .expect("node start");
        let t = slot.expect("transport built");
        t.serve(listener);
        for (peer, a) in &tcp.addrs {
            if *peer != id {
                t.set_peer_address(*peer, *a);
            }
        }
        for (peer, other) in &tcp.transports {
            if *peer != id {
                other.set_peer_address(id, addr);
            }
        }
        tcp.addrs.insert(id, addr);
        tcp.transports.insert(id, t);
        self.nodes.insert(id, node);
    }

    /// Counters of `node`'s TCP transport (TCP clusters, running nodes only).
    pub fn tcp_stats(&self, node: NodeId) -> Option<TcpStats> {
        Some(self.tcp.as_ref()?.transports.get(&node)?.stats())
    }

    /// The transport this cluster runs over.
    pub fn transport_kind(&self) -> TransportKind {
        self.opts.transport
    }

    /// The running node `id`.
    ///
    /// # Panics
    /// Panics if it is not running.
    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes.get(&id).expect("node not running")
    }

    /// The running node `id`, if it runs.
    pub fn try_node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    /// Ids of the running nodes.
    pub fn running(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    fn open_replica(&mut self, node: NodeId, cell: CellId, voters: &[NodeId]) -> Result<()> {
        let path = self.node_dir(node).join(format!("cell-{}.sm", cell.get()));
        let (sm, h) = LogStateMachine::open(path).map_err(|e| Error::Poisoned {
            reason: format!("open sm: {e}"),
        })?;
        self.handles.insert((node, cell), h);
        let opts = self
            .cells
            .get(&cell)
            .map(|c| c.opts)
            .unwrap_or(CellOptions::durable(ReplicationMode::Consensus));
        self.node(node)
            .create_cell(cell, voters, &[], opts, Box::new(sm))
            .wait()
    }

    /// Create `cell` with initial `voters` on each of them; `opts` is a `ReplicationMode` (a
    /// durable log) or [`CellOptions`].
    ///
    /// # Panics
    /// Panics if a replica cannot be created.
    pub fn create_cell(&mut self, cell: CellId, voters: &[u64], opts: impl Into<CellOptions>) {
        let voters: Vec<NodeId> = voters.iter().map(|v| NodeId(*v)).collect();
        self.cells.insert(
            cell,
            CellInfo {
                opts: opts.into(),
                replicas: voters.clone(),
                voters: voters.clone(),
            },
        );
        for v in &voters {
            self.open_replica(*v, cell, &voters).expect("create cell");
        }
    }

    /// Start an empty replica of `cell` on `node` (before adding it as a learner): it will
    /// catch up by snapshot.
    ///
    /// # Panics
    /// Panics if the replica cannot be created.
    pub fn add_replica(&mut self, node: NodeId, cell: CellId) {
        if let Some(c) = self.cells.get_mut(&cell) {
            c.replicas.push(node);
        }
        self.open_replica(node, cell, &[]).expect("add replica");
    }

    /// Status of `cell` on `node`, if running.
    pub fn status(&self, node: NodeId, cell: CellId) -> Option<CellStatus> {
        self.nodes.get(&node)?.status(cell).wait().ok()
    }

    /// The leader of `cell` seen by running nodes (highest term), if any.
    pub fn leader(&self, cell: CellId) -> Option<(NodeId, u64)> {
        self.nodes
            .keys()
            .filter_map(|n| self.status(*n, cell).map(|s| (*n, s)))
            .filter(|(_, s)| s.role == Role::Leader)
            .max_by_key(|(_, s)| s.term)
            .map(|(n, s)| (n, s.term))
    }

    /// Wait until a leader of `cell` exists that a majority of its running replicas follow.
    pub fn wait_leader(&self, cell: CellId, timeout: Duration) -> Option<NodeId> {
        let mut found = None;
        wait_until(timeout, || {
            let Some((l, term)) = self.leader(cell) else {
                return false;
            };
            let voters = self.cells.get(&cell).map(|c| c.voters.len()).unwrap_or(1);
            let agree = self
                .nodes
                .keys()
                .filter_map(|n| self.status(*n, cell))
                .filter(|s| s.term == term && s.leader == Some(l))
                .count();
            if agree > voters / 2 {
                found = Some(l);
                true
            } else {
                false
            }
        });
        found
    }

    /// Propose once at the current leader.
    pub fn propose(&self, cell: CellId, data: impl Into<Bytes>) -> Result<Reply> {
        let leader = self
            .wait_leader(cell, WAIT)
            .ok_or(Error::Timeout { cell })?;
        self.node(leader).propose(cell, data.into()).wait()
    }

    /// Propose, retrying only on errors that guarantee the write was not applied
    /// (`NotLeader`, `Busy`, `ProposalDropped`), until `timeout`.
    pub fn propose_retry(
        &self,
        cell: CellId,
        data: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Reply> {
        let data = data.into();
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.propose(cell, data.clone());
            match r {
                Err(
                    Error::NotLeader { .. } | Error::Busy { .. } | Error::ProposalDropped { .. },
                ) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    /// Take `node` down: off the network, shard threads stopped. Its disk stays.
    pub fn kill(&mut self, node: NodeId) {
        self.net.kill(node);
        if let Some(t) = self.tcp.as_mut().and_then(|t| t.transports.remove(&node)) {
            // Closes its listener and connections: peers see the node go away.
            t.shutdown();
        }
        if let Some(n) = self.nodes.remove(&node) {
            n.shutdown();
        }
    }

    /// Restart `node` from its disk and re-open every durable replica it held. Its volatile
    /// replicas are gone with their logs: they are not reopened (and no longer counted as
    /// replicas of their cells); re-seed them with a membership change.
    ///
    /// # Panics
    /// Panics if the node or a replica cannot start.
    pub fn restart(&mut self, node: NodeId) {
        self.start_node(node);
        for c in self.cells.values_mut() {
            if c.opts.log == LogKind::Volatile {
                c.replicas.retain(|n| *n != node);
            }
        }
        let mine: Vec<(CellId, Vec<NodeId>)> = self
            .cells
            .iter()
            .filter(|(_, c)| c.replicas.contains(&node))
            .map(|(id, c)| (*id, c.voters.clone()))
            .collect();
        for (cell, voters) in mine {
            self.open_replica(node, cell, &voters)
                .expect("reopen replica");
        }
    }

    fn is_tcp(&self) -> bool {
        self.tcp.is_some()
    }

    /// Split the network into groups.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        if self.is_tcp() {
            self.filter.partition(groups);
        } else {
            self.net.partition(groups);
        }
    }

    /// Cut `node` off from everyone.
    pub fn isolate(&self, node: NodeId) {
        if self.is_tcp() {
            self.filter.isolate(node);
        } else {
            self.net.isolate(node);
        }
    }

    /// Drop every message from `from` to `to` (one way).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        if self.is_tcp() {
            self.filter.cut(from, to);
        } else {
            self.net.cut(from, to);
        }
    }

    /// Drop every message for which `pred(from, to, envelope)` is true, until
    /// [`remove_filter`](Self::remove_filter).
    pub fn drop_if(
        &self,
        pred: impl Fn(NodeId, NodeId, &Envelope) -> bool + Send + Sync + 'static,
    ) -> FilterId {
        if self.is_tcp() {
            self.filter.drop_if(pred)
        } else {
            self.net.drop_if(pred)
        }
    }

    /// Remove a filter added by [`drop_if`](Self::drop_if).
    pub fn remove_filter(&self, id: FilterId) {
        if self.is_tcp() {
            self.filter.remove_filter(id);
        } else {
            self.net.remove_filter(id);
        }
    }

    /// Remove every partition, cut and isolation (custom filters stay).
    pub fn heal(&self) {
        if self.is_tcp() {
            self.filter.heal();
        } else {
            self.net.heal();
        }
    }

    /// The applied sequence of `cell` on `node` (also after the node was killed).
    pub fn applied(&self, node: NodeId, cell: CellId) -> Vec<AppliedEntry> {
        self.handles
            .get(&(node, cell))
            .map(|h| h.entries())
            .unwrap_or_default()
    }

    /// The recorder of `cell` on `node`.
    pub fn handle(&self, node: NodeId, cell: CellId) -> Option<LogHandle> {
        self.handles.get(&(node, cell)).cloned()
    }

    /// Check that every replica's applied sequence of `cell` is a prefix of the longest one;
    /// returns the longest.
    ///
    /// # Panics
    /// Panics (test assertion) if a replica diverges.
    pub fn assert_prefixes(&self, cell: CellId) -> Vec<AppliedEntry> {
        let seqs: Vec<(NodeId, Vec<AppliedEntry>)> = self
            .handles
            .iter()
            .filter(|((_, c), _)| *c == cell)
            .map(|((n, _), h)| (*n, h.entries()))
            .collect();
        let longest = seqs
            .iter()
            .max_by_key(|(_, s)| s.len())
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        for (n, s) in &seqs {
            assert_eq!(
                s.as_slice(),
                &longest[..s.len()],
                "replica {n} of {cell} diverges from the longest applied sequence"
            );
        }
        longest
    }

    /// Wait until every running replica of `cell` has applied at least `index`.
    pub fn wait_applied(&self, cell: CellId, index: u64, timeout: Duration) -> bool {
        let replicas: Vec<NodeId> = self
            .cells
            .get(&cell)
            .map(|c| c.replicas.clone())
            .unwrap_or_default();
        wait_until(timeout, || {
            replicas
                .iter()
                .filter(|n| self.nodes.contains_key(n))
                .all(|n| self.status(*n, cell).is_some_and(|s| s.applied >= index))
        })
    }

    /// Record that `node` no longer holds a replica of `cell` (it was removed).
    pub fn note_removed(&mut self, cell: CellId, node: NodeId) {
        if let Some(c) = self.cells.get_mut(&cell) {
            c.replicas.retain(|n| *n != node);
            c.voters.retain(|n| *n != node);
        }
    }

    /// Record a membership change made through the API (so restarts re-open replicas with
    /// the right initial voters).
    pub fn note_voters(&mut self, cell: CellId, voters: &[u64]) {
        if let Some(c) = self.cells.get_mut(&cell) {
            c.voters = voters.iter().map(|v| NodeId(*v)).collect();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
        if let Some(t) = self.tcp.take() {
            t.rt.shutdown_background();
        }
    }
}
