//! [`Seed`]: one running node. Owns the harpoon [`Node`], the TCP transport, the meta replica
//! (when this node is a member) and the node's view of meta; the ports and background loops
//! (in `server.rs` and `loops.rs`) act through it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use harpoon::transport::tcp::TcpTransport;
use harpoon::{CellId, CellStatus, Error as HError, Node, NodeId, ReplicationMode, Role};
use meta::{keys, ops, view, MetaStore, NodeRecord, Txn, TxnResult, META_RANGE};
use parking_lot::{Mutex, RwLock};
use proto::metapb::{
    ControlError_Code, ControlRequest, ControlResponse_oneof_kind, ProposeTxn, ReserveMeta,
    WatchMeta,
};
use protobuf::Message;
use tokio::sync::watch;

use crate::config::Settings;
use crate::control::Dialer;
use crate::meta_sm::{MetaReplica, MetaStateMachine};

/// Meta's cell id.
pub const META_CELL: CellId = CellId(META_RANGE);

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The reservation to create meta, kept in the file `path`: granted to `node` when the file
/// is absent (written durably before answering) or already names `node`. Answers (granted,
/// holder).
fn reserve_in(path: &std::path::Path, node: u64) -> Result<(bool, u64), Refusal> {
    let io = |e: std::io::Error| Refusal::Unavailable(format!("meta reservation: {e}"));
    match std::fs::read_to_string(path) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(holder) if holder > 0 => Ok((holder == node, holder)),
            _ => Err(Refusal::Corrupt {
                path: path.to_path_buf(),
                why: format!("{:?} is not a positive node id", s.trim()),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::durable::write_durably(path, format!("{node}\n").as_bytes()).map_err(io)?;
            Ok((true, node))
        }
        Err(e) => Err(io(e)),
    }
}

/// Per KV cell this node leads: the term, and the members it promoted to voters in that term
/// and has not recorded as voters in meta yet.
#[derive(Debug, Default)]
pub struct Promotions(HashMap<u64, (u64, HashSet<u64>)>);

impl Promotions {
    /// This node, leading `cell` in `term`, promoted `node` to voter.
    pub fn note(&mut self, cell: u64, term: u64, node: u64) {
        let e = self.0.entry(cell).or_insert_with(|| (term, HashSet::new()));
        if e.0 != term {
            *e = (term, HashSet::new());
        }
        e.1.insert(node);
    }

    /// Whether this node promoted `node` in `cell` while leading it in `term` (and has not
    /// recorded it in meta since).
    pub fn contains(&self, cell: u64, term: u64, node: u64) -> bool {
        self.0
            .get(&cell)
            .is_some_and(|(t, nodes)| *t == term && nodes.contains(&node))
    }

    /// `node` is recorded as a voter of `cell` in meta.
    pub fn recorded(&mut self, cell: u64, node: u64) {
        if let Some((_, nodes)) = self.0.get_mut(&cell) {
            nodes.remove(&node);
        }
    }

    /// Drop the promotions of `cell` unless this node still leads it in the same term
    /// (`leading`: the term it leads in, `None` when it does not lead).
    pub fn keep(&mut self, cell: u64, leading: Option<u64>) {
        if self.0.get(&cell).is_some_and(|(t, _)| Some(*t) != leading) {
            self.0.remove(&cell);
        }
    }

    /// Drop the promotions of every cell not in `held` (sorted).
    pub fn retain_held(&mut self, held: &[u64]) {
        self.0.retain(|c, _| held.binary_search(c).is_ok());
    }
}

/// What one attempt of [`Seed::propose_retrying`] builds from this node's meta.
#[derive(Debug)]
pub enum Attempt<T> {
    /// Propose this txn (a compare-and-swap); once it succeeds, answer the value.
    Propose(Txn, T),
    /// Nothing (more) to do: answer the value now.
    Done(T),
    /// Not buildable from this node's meta yet (it may lag): read again after the back-off.
    Retry(String),
}

/// Why [`Seed::propose_retrying`] gave up.
#[derive(Debug)]
pub enum RetryError<E> {
    /// Building the txn failed for good.
    Build(E),
    /// Meta's leader refused the txn as invalid.
    Invalid(String),
    /// Every attempt failed: the last reason.
    GaveUp(String),
}

/// The most addresses one [`Seed::propose_anywhere`] tries (each at most once).
pub const MAX_HOPS: usize = 16;

/// The peer addresses [`Seed::propose_anywhere`] tries, in order, for one txn (and the
/// subscription loop, for one round, without a limit: each address once bounds it).
///
/// A redirect's list (meta's leader first, when the member that refused knows it) goes to
/// the front, in its order, so its leader is tried next even when that address is already
/// queued further back; an address is tried at most once, and never this node's own. (Before,
/// a redirect only added addresses not queued, at the front: two members that knew the leader
/// sent the proposer back and forth between them, each re-adding the other once tried, while
/// the leader waited at the back until the hop limit. A node whose own stale meta replica knew
/// no leader, so that its first list was meta's members in their order, could never claim a
/// slot when the leader came third or later.)
#[derive(Debug)]
pub struct Targets {
    queue: std::collections::VecDeque<String>,
    tried: HashSet<String>,
    own: String,
    hops: usize,
    limit: usize,
}

impl Targets {
    /// Nothing to try yet; `own` is this node's advertised peer address; at most `limit`
    /// addresses are tried.
    pub fn new(own: String, limit: usize) -> Targets {
        Targets {
            queue: Default::default(),
            tried: HashSet::new(),
            own,
            hops: 0,
            limit,
        }
    }

    /// A member refused and named `peers` (leader first when it knows it): try them next, in
    /// that order, except those already tried.
    pub fn redirected(&mut self, peers: Vec<String>) {
        for p in peers.into_iter().rev() {
            if p == self.own || self.tried.contains(&p) {
                continue;
            }
            self.queue.retain(|q| *q != p);
            self.queue.push_front(p);
        }
    }

    /// Whether no address is left to try.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() || self.hops >= self.limit
    }

    /// The next address to try (each at most once, the limit in all), or `None`.
    pub fn pop(&mut self) -> Option<String> {
        if self.hops >= self.limit {
            return None;
        }
        let t = self.queue.pop_front()?;
        self.tried.insert(t.clone());
        self.hops += 1;
        Some(t)
    }
}

/// Where to go instead, for a request this node cannot serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No meta anywhere this node knows of.
    NoMeta,
    /// Not meta's leader (or not a member); try these peer addresses (leader first).
    NotLeader {
        leader: Option<u64>,
        peers: Vec<String>,
        clients: Vec<String>,
    },
    /// Meta exists already.
    MetaExists(String),
    /// Transient failure.
    Unavailable(String),
    /// Bad request.
    Invalid(String),
    /// A file in the data dir does not hold what it must (left as it is: an operator looks).
    Corrupt {
        path: std::path::PathBuf,
        why: String,
    },
}

impl Refusal {
    /// The control-port error code and message.
    pub fn control(&self) -> (ControlError_Code, String, Vec<String>) {
        match self {
            Refusal::NoMeta => (
                ControlError_Code::NO_META,
                "no meta yet: run quiver create-meta".into(),
                vec![],
            ),
            Refusal::NotLeader { peers, .. } => (
                ControlError_Code::NOT_LEADER,
                "not meta's leader".into(),
                peers.clone(),
            ),
            Refusal::MetaExists(m) => (ControlError_Code::META_EXISTS, m.clone(), vec![]),
            Refusal::Unavailable(m) => (ControlError_Code::UNAVAILABLE, m.clone(), vec![]),
            Refusal::Invalid(m) => (ControlError_Code::INVALID_ARGUMENT, m.clone(), vec![]),
            Refusal::Corrupt { path, why } => (
                ControlError_Code::INTERNAL,
                format!("{} is corrupt: {why}", path.display()),
                vec![],
            ),
        }
    }
}

/// What this node knows of meta when it holds no replica (from its subscription).
#[derive(Debug, Default)]
pub struct View {
    pub store: MetaStore,
    pub leader: u64,
}

/// Counters exported on /metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub control_requests: AtomicU64,
    pub control_refused: AtomicU64,
    pub client_requests: AtomicU64,
    pub client_bad_frames: AtomicU64,
    pub peer_bad_frames: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub membership_changes: AtomicU64,
    /// Daughter ranges of this node's splits whose first election it started at once
    /// ([`crate::ranges::campaign_daughter`]), and those it left to an ordinary election.
    pub daughter_campaigns: AtomicU64,
    pub daughter_campaigns_skipped: AtomicU64,
}

/// One running node.
pub struct Seed {
    pub settings: Settings,
    pub id: u64,
    pub node: Node,
    pub transport: Arc<TcpTransport>,
    pub dialer: Dialer,
    /// The meta replica, once this node holds one (also set by the cell factory).
    pub replica: Arc<Mutex<Option<MetaReplica>>>,
    /// The KV ranges held here.
    pub ranges: crate::ranges::Registry,
    pub view: RwLock<View>,
    /// Bumped whenever the view changes.
    pub view_changed: watch::Sender<u64>,
    pub create_lock: tokio::sync::Mutex<()>,
    /// Held by self-assignment from recording a range claim's epoch until the claim is
    /// answered, and by housekeeping from reading that epoch until a lingering replica is
    /// dropped: a drop never races a claim of the same node (`crate::linger`).
    pub claim_lock: tokio::sync::Mutex<()>,
    /// Serializes the meta reservation file.
    pub reservation: Mutex<()>,
    /// Per KV cell this node leads: the term, and the members it promoted to voters in that
    /// term and has not recorded as voters in meta yet (a cell voter that meta lists as a
    /// learner is legitimate only here; see `loops`). Dropped when the leadership ends.
    pub promoted: Mutex<Promotions>,
    pub draining: AtomicBool,
    /// Whether the local meta replica currently knows a leader (refreshed by the
    /// subscription loop).
    pub replica_led: AtomicBool,
    pub peer_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub counters: Counters,
    pub started: Instant,
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed").field("id", &self.id).finish()
    }
}

impl Seed {
    /// The data dir.
    pub fn dir(&self) -> PathBuf {
        self.settings.data_dir.clone()
    }

    /// The meta replica, if this node holds one.
    pub fn replica(&self) -> Option<MetaReplica> {
        self.replica.lock().clone()
    }

    /// Forget the meta replica whose cell is gone (harpoon destroyed it when it applied this
    /// node's removal): the next [`Seed::open_meta_replica`] starts an empty one.
    pub fn forget_meta_replica(&self) {
        *self.replica.lock() = None;
        self.replica_led.store(false, Ordering::Relaxed);
    }

    /// Create a fresh (empty) meta replica here, unless one exists; `voters` non-empty only
    /// for the bootstrap.
    pub async fn open_meta_replica(&self, voters: &[NodeId]) -> Result<(), HError> {
        if self.replica().is_some() {
            return Ok(());
        }
        let path = MetaStateMachine::path(&self.dir(), META_RANGE);
        let (sm, replica) = MetaStateMachine::fresh(path);
        *self.replica.lock() = Some(replica);
        match self
            .node
            .create_cell(
                META_CELL,
                voters,
                &[],
                ReplicationMode::Consensus,
                Box::new(sm),
            )
            .await
        {
            Ok(()) | Err(HError::CellExists { .. }) => Ok(()),
            Err(e) => {
                *self.replica.lock() = None;
                Err(e)
            }
        }
    }

    /// The meta replica once it holds meta (a new member's replica is empty until its first
    /// snapshot arrives; until then the subscribed view is fresher).
    ///
    /// A replica that has no leader (e.g. it was removed from meta while this node was down
    /// and nobody talks to it any more) is used only while it is not older than the view.
    pub fn live_replica(&self) -> Option<MetaReplica> {
        let r = self.replica()?;
        if !r.read(view::meta_exists) {
            return None;
        }
        let fresh = self.replica_led.load(Ordering::Relaxed)
            || r.revision() >= self.view.read().store.revision();
        fresh.then_some(r)
    }

    /// Read the freshest meta this node has: its replica, else its subscribed view.
    pub fn read_meta<T>(&self, f: impl FnOnce(&MetaStore) -> T) -> T {
        match self.live_replica() {
            Some(r) => r.read(f),
            None => f(&self.view.read().store),
        }
    }

    /// Whether this node knows that meta exists.
    pub fn meta_known(&self) -> bool {
        self.read_meta(view::meta_exists)
    }

    /// The status of the local meta replica.
    pub async fn meta_status(&self) -> Option<CellStatus> {
        self.replica()?;
        self.node.status(META_CELL).await.ok()
    }

    /// Meta's leader as this node believes: its replica's, else the subscription's.
    pub async fn meta_leader(&self) -> Option<u64> {
        if let Some(s) = self.meta_status().await {
            return s.leader.map(|l| l.get());
        }
        let l = self.view.read().leader;
        (l != 0).then_some(l)
    }

    /// This node's record, stamped now.
    pub fn record(&self) -> NodeRecord {
        let mut r = NodeRecord::new();
        r.id = self.id;
        r.peer_addr = self.peer_addr.to_string();
        r.client_addr = self.client_addr.to_string();
        r.admin_addr = self.admin_addr.map(|a| a.to_string()).unwrap_or_default();
        r.zone = self.settings.zone.clone();
        r.capacity = self.settings.capacity;
        let used = self.node.log().stats().segments * self.settings.log_segment_size;
        r.free = self.settings.capacity.saturating_sub(used);
        r.last_heartbeat_ms = now_ms();
        r
    }

    /// Where to send a request for meta's leader: the hint first, then the other members.
    /// The hint is the local replica's leader, else the subscription's: a replica that knows
    /// no leader (a stale one, removed from meta while this node was down, that no leader
    /// talks to) does not hide the leader the subscription names.
    pub async fn redirect(&self) -> Refusal {
        if !self.meta_known() {
            return Refusal::NoMeta;
        }
        let viewed = || {
            let l = self.view.read().leader;
            (l != 0).then_some(l)
        };
        let leader = self
            .meta_leader()
            .await
            .or_else(viewed)
            .filter(|l| *l != self.id);
        let (peers, clients) = self.read_meta(|s| {
            let nodes = view::nodes(s).unwrap_or_default();
            let members = view::range_by_id(s, META_RANGE)
                .ok()
                .flatten()
                .map(|r| r.value.members.into_vec())
                .unwrap_or_default();
            let mut ids: Vec<u64> = leader.into_iter().collect();
            ids.extend(
                members
                    .iter()
                    .map(|m| m.node)
                    .filter(|n| Some(*n) != leader),
            );
            let mut peers = Vec::new();
            let mut clients = Vec::new();
            for id in ids {
                if id == self.id {
                    continue;
                }
                if let Some(m) = members.iter().find(|m| m.node == id) {
                    peers.push(m.peer_addr.clone());
                    clients.push(m.client_addr.clone());
                } else if let Some(n) = nodes.iter().find(|n| n.value.id == id) {
                    peers.push(n.value.peer_addr.clone());
                    clients.push(n.value.client_addr.clone());
                }
            }
            (peers, clients)
        });
        Refusal::NotLeader {
            leader,
            peers,
            clients,
        }
    }

    /// Propose `txn` to meta on this node (leader only).
    pub async fn propose_local(&self, txn: &Txn) -> Result<TxnResult, Refusal> {
        if self.replica().is_none() {
            return Err(self.redirect().await);
        }
        let data = txn
            .write_to_bytes()
            .map_err(|e| Refusal::Invalid(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        match self
            .node
            .propose_by(META_CELL, Bytes::from(data), deadline)
            .await
        {
            Ok(reply) => {
                let resp = reply.response.unwrap_or_default();
                TxnResult::parse_from_carllerche_bytes(&resp)
                    .map_err(|e| Refusal::Unavailable(format!("bad apply response: {e}")))
            }
            // Not the leader, or no replica any more: harpoon destroyed the cell when it
            // applied this node's removal from meta (the registration goes later, see
            // `loops::assign_meta`). Either way meta's leader is elsewhere: redirect, so a
            // heartbeat still reaches it (a node that cannot heartbeat is removed as dead and
            // could never rejoin).
            Err(HError::NotLeader { .. } | HError::CellNotFound { .. }) => {
                Err(self.redirect().await)
            }
            Err(e) => Err(Refusal::Unavailable(e.to_string())),
        }
    }

    /// Read meta, build a txn with `build`, propose it to meta's leader wherever it is, and
    /// on a failed guard (a stale read or a concurrent change) or a transient refusal back off
    /// (`step` times the attempt) and read again, for `attempts` attempts.
    ///
    /// # Errors
    /// `build` failing, the txn refused as invalid, or every attempt failing.
    pub async fn propose_retrying<T, E>(
        &self,
        attempts: u64,
        step: Duration,
        mut build: impl FnMut(&MetaStore) -> Result<Attempt<T>, E>,
    ) -> Result<T, RetryError<E>> {
        let mut last = String::from("no attempt");
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(step * attempt as u32).await;
            }
            let (txn, out) = match self.read_meta(&mut build).map_err(RetryError::Build)? {
                Attempt::Propose(txn, out) => (txn, out),
                Attempt::Done(out) => return Ok(out),
                Attempt::Retry(why) => {
                    last = why;
                    continue;
                }
            };
            match self.propose_anywhere(&txn).await {
                Ok(r) if r.succeeded => return Ok(out),
                Ok(_) => last = "meta changed concurrently (a stale read)".into(),
                Err(Refusal::Invalid(m)) => return Err(RetryError::Invalid(m)),
                Err(e) => last = format!("{e:?}"),
            }
        }
        Err(RetryError::GaveUp(last))
    }

    /// Propose `txn` to meta's leader wherever it is, following redirects ([`Targets`]: each
    /// address at most once, a redirect's leader next).
    pub async fn propose_anywhere(&self, txn: &Txn) -> Result<TxnResult, Refusal> {
        let mut targets = Targets::new(self.peer_addr.to_string(), MAX_HOPS);
        match self.propose_local(txn).await {
            Ok(r) => return Ok(r),
            Err(Refusal::NotLeader { peers, .. }) => targets.redirected(peers),
            Err(e) => return Err(e),
        }
        let mut last = Refusal::Unavailable("no meta member reachable".into());
        while let Some(t) = targets.pop() {
            let Ok(addr) = t.parse::<SocketAddr>() else {
                continue;
            };
            let mut req = ControlRequest::new();
            let mut p = ProposeTxn::new();
            p.set_txn(txn.clone());
            req.set_propose(p);
            match self.dialer.call(addr, req).await {
                Ok(resp) => match resp.kind {
                    Some(ControlResponse_oneof_kind::txn(r)) => return Ok(r),
                    Some(ControlResponse_oneof_kind::error(e)) => {
                        if e.code == ControlError_Code::NOT_LEADER {
                            targets.redirected(e.redirect.into_vec());
                        }
                        last = Refusal::Unavailable(e.message);
                    }
                    _ => last = Refusal::Unavailable("unexpected response".into()),
                },
                Err(e) => last = Refusal::Unavailable(e.to_string()),
            }
        }
        Err(last)
    }

    /// Ask `addr` for meta (long poll up to `wait_ms`).
    pub async fn watch_meta_at(
        &self,
        addr: SocketAddr,
        after: u64,
        wait_ms: u32,
    ) -> Result<ControlResponse_oneof_kind, crate::control::CallError> {
        let mut req = ControlRequest::new();
        let mut w = WatchMeta::new();
        w.after_revision = after;
        w.wait_ms = wait_ms;
        req.set_watch_meta(w);
        let resp = self.dialer.call(addr, req).await?;
        resp.kind
            .ok_or(crate::control::CallError::Protocol("empty response"))
    }

    /// Tell the transport where every known node listens.
    pub fn learn_addresses(&self) {
        let nodes = self.read_meta(|s| view::nodes(s).unwrap_or_default());
        for n in nodes {
            if n.value.id == self.id {
                continue;
            }
            if let Ok(a) = n.value.peer_addr.parse() {
                if self.transport.peer_address(NodeId(n.value.id)) != Some(a) {
                    self.transport.set_peer_address(NodeId(n.value.id), a);
                }
            }
        }
        let members = self.read_meta(|s| {
            view::range_by_id(s, META_RANGE)
                .ok()
                .flatten()
                .map(|r| r.value.members.into_vec())
                .unwrap_or_default()
        });
        for m in members {
            if m.node == self.id {
                continue;
            }
            if let Ok(a) = m.peer_addr.parse() {
                if self.transport.peer_address(NodeId(m.node)).is_none() {
                    self.transport.set_peer_address(NodeId(m.node), a);
                }
            }
        }
    }

    /// Whether this node is ready to serve: meta known and not draining.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.meta_known()
    }

    /// Grant (or not) the reservation to create meta to `node`: once granted to a node, a
    /// seed grants it to that node only, ever (the holder is kept in the data dir).
    pub fn reserve_meta(&self, node: u64) -> Result<(bool, u64), Refusal> {
        if self.meta_known() {
            return Err(Refusal::MetaExists(
                "meta already exists: create-meta runs once per cluster".into(),
            ));
        }
        let _g = self.reservation.lock();
        reserve_in(&self.settings.data_dir.join("meta_reservation"), node)
    }

    /// Reserve the creation of meta at a majority of the seeds (this node included when it
    /// is one). Refuses when a seed knows meta or granted another node.
    async fn reserve_at_seeds(&self) -> Result<(), Refusal> {
        let mut seeds = self.settings.seeds.clone();
        seeds.sort();
        seeds.dedup();
        if seeds.is_empty() {
            return Ok(());
        }
        let need = seeds.len() / 2 + 1;
        let mut granted = 0;
        let mut other = None;
        for s in &seeds {
            let r = if *s == self.peer_addr {
                self.reserve_meta(self.id)
            } else {
                let mut req = ControlRequest::new();
                let mut rm = ReserveMeta::new();
                rm.node = self.id;
                req.set_reserve_meta(rm);
                match self.dialer.call(*s, req).await {
                    Ok(resp) => match resp.kind {
                        Some(ControlResponse_oneof_kind::reserved(r)) => Ok((r.granted, r.holder)),
                        Some(ControlResponse_oneof_kind::error(e))
                            if e.code == ControlError_Code::META_EXISTS =>
                        {
                            Err(Refusal::MetaExists(format!(
                                "meta already exists (seed {s} knows it)"
                            )))
                        }
                        Some(ControlResponse_oneof_kind::error(e)) => {
                            tracing::warn!(seed = %s, code = ?e.code, message = %e.message, "seed refused the meta reservation");
                            Ok((false, 0))
                        }
                        other => {
                            tracing::warn!(seed = %s, answer = ?other, "seed answered the meta reservation with something else");
                            Ok((false, 0))
                        }
                    },
                    Err(e) => {
                        tracing::warn!(seed = %s, error = %e, "seed unreachable for the meta reservation");
                        Ok((false, 0))
                    }
                }
            };
            match r? {
                (true, _) => granted += 1,
                (false, h) if h != 0 => other = Some(h),
                _ => {}
            }
        }
        if granted >= need {
            return Ok(());
        }
        Err(match other {
            Some(h) => Refusal::MetaExists(format!(
                "meta is being created by node {h} (create-meta was sent to another seed)"
            )),
            None => Refusal::Unavailable(format!(
                "only {granted} of {} seeds granted the meta reservation (need {need}): start the seeds first",
                seeds.len()
            )),
        })
    }

    /// Bootstrap: create meta here with this node as its only member.
    pub async fn create_meta(&self, rf: u32) -> Result<(), Refusal> {
        let _g = self.create_lock.lock().await;
        if self.replica().is_some() || self.meta_known() {
            return Err(Refusal::MetaExists(
                "meta already exists: create-meta runs once per cluster".into(),
            ));
        }
        let rf = if rf == 0 {
            meta::META_REPLICATION_FACTOR
        } else {
            rf
        };
        // Two create-meta sent to different seeds cannot both hold a majority of
        // reservations.
        self.reserve_at_seeds().await?;
        self.open_meta_replica(&[NodeId(self.id)])
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        let deadline =
            Instant::now() + self.settings.tick * self.settings.election_ticks as u32 * 20;
        loop {
            if let Some(s) = self.meta_status().await {
                if s.role == Role::Leader {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(Refusal::Unavailable(
                    "meta's first leader not elected".into(),
                ));
            }
            tokio::time::sleep(self.settings.tick).await;
        }
        let rec = self.record();
        let txn = self
            .read_meta(|s| ops::create_meta(s, &rec, rf))
            .map_err(|e| Refusal::MetaExists(e.to_string()))?;
        let r = self.propose_local(&txn).await?;
        if !r.succeeded {
            return Err(Refusal::MetaExists("meta already exists".into()));
        }
        tracing::info!(node = self.id, rf, "meta created");
        Ok(())
    }

    /// The scratch-space key of a client key.
    pub fn scratch_key(key: &[u8]) -> Vec<u8> {
        keys::scratch(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The addresses one proposal tries through [`Targets`], starting from `first`, against
    /// members that accept (`None`: meta's leader) or refuse naming a redirect list.
    fn route(
        own: &str,
        first: &[&str],
        answer: impl Fn(&str) -> Option<Vec<String>>,
    ) -> Vec<String> {
        let mut t = Targets::new(own.into(), MAX_HOPS);
        t.redirected(first.iter().map(|s| s.to_string()).collect());
        let mut tried = Vec::new();
        while let Some(a) = t.pop() {
            tried.push(a.clone());
            match answer(&a) {
                None => break,
                Some(redirect) => t.redirected(redirect),
            }
        }
        tried
    }

    /// A member's redirect: the leader first, then meta's other members (in their order),
    /// without the member itself (what `Seed::redirect` answers).
    fn members_redirect(me: &str, leader: Option<&str>, members: &[&str]) -> Vec<String> {
        leader
            .into_iter()
            .chain(members.iter().copied().filter(|m| Some(*m) != leader))
            .filter(|m| *m != me)
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_proposal_reaches_the_leader_a_redirect_names_even_when_queued_behind() {
        // removed_node_rejoins_range: the restarted node's stale meta replica knows no leader,
        // so its first list is meta's members in their order, the leader third. Each member
        // that refuses names the leader first; the leader is tried next.
        let members = ["a", "b", "leader", "c"];
        let answer =
            |at: &str| (at != "leader").then(|| members_redirect(at, Some("leader"), &members));
        assert_eq!(route("v", &members, answer), ["a", "leader"]);
        // Its own address (listed by a member whose view still lists it) is never tried.
        let with_me = ["v", "a", "b", "leader"];
        let answer =
            |at: &str| (at != "leader").then(|| members_redirect(at, Some("leader"), &with_me));
        assert_eq!(route("v", &with_me, answer), ["a", "leader"]);
    }

    #[test]
    fn a_proposal_tries_each_member_once_when_none_knows_the_leader() {
        // An election: every member refuses and knows no leader; the last one accepts (it
        // just won). Each is tried once, in order, and the route ends.
        let members = ["a", "b", "c", "d"];
        let answer = |at: &str| (at != "d").then(|| members_redirect(at, None, &members));
        assert_eq!(route("v", &members, answer), ["a", "b", "c", "d"]);
        // Nobody accepts: every member once, then nothing.
        let answer = |at: &str| Some(members_redirect(at, None, &members));
        assert_eq!(route("v", &members, answer), ["a", "b", "c", "d"]);
        // A leader hint that was already tried (it refused: it lost the leadership) is not
        // tried again within the same proposal: the caller's next round starts over.
        let answer = |at: &str| Some(members_redirect(at, Some("a"), &members));
        assert_eq!(route("v", &members, answer), ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_proposal_stops_after_max_hops_of_new_addresses() {
        let answer = |at: &str| Some(vec![format!("{at}x")]);
        let tried = route("v", &["a"], answer);
        assert_eq!(tried.len(), MAX_HOPS);
        let unique: HashSet<_> = tried.iter().collect();
        assert_eq!(unique.len(), MAX_HOPS);
        // A subscription round has no limit: every address of a long list, once each.
        let many: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
        let mut t = Targets::new("v".into(), usize::MAX);
        t.redirected(many.clone());
        t.redirected(many[..5].to_vec());
        let mut all = Vec::new();
        while let Some(a) = t.pop() {
            t.redirected(vec![a.clone(), "m0".into()]);
            all.push(a);
        }
        assert_eq!(all, many);
        assert!(t.is_empty());
    }

    #[test]
    fn promotions_last_one_leadership_term() {
        let mut p = Promotions::default();
        p.note(5, 3, 7);
        assert!(p.contains(5, 3, 7));
        assert!(!p.contains(5, 4, 7), "another term");
        assert!(!p.contains(6, 3, 7), "another cell");
        p.keep(5, Some(3));
        assert!(p.contains(5, 3, 7), "same leadership");
        p.keep(5, Some(4));
        assert!(!p.contains(5, 3, 7), "term changed");
        p.note(5, 4, 7);
        p.keep(5, None);
        assert!(!p.contains(5, 4, 7), "no longer leader");
        p.note(5, 4, 7);
        p.note(5, 5, 8);
        assert!(!p.contains(5, 4, 7), "a new term starts over");
        assert!(p.contains(5, 5, 8));
        p.recorded(5, 8);
        assert!(!p.contains(5, 5, 8));
        p.note(5, 5, 8);
        p.note(9, 1, 8);
        p.retain_held(&[9]);
        assert!(!p.contains(5, 5, 8), "range no longer held");
        assert!(p.contains(9, 1, 8));
    }

    #[test]
    fn the_meta_reservation_is_granted_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta_reservation");
        assert_eq!(reserve_in(&p, 7).unwrap(), (true, 7));
        assert_eq!(reserve_in(&p, 9).unwrap(), (false, 7));
        assert_eq!(reserve_in(&p, 7).unwrap(), (true, 7));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "7\n");
    }

    #[test]
    fn a_corrupt_reservation_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta_reservation");
        for bad in ["", "x\n", "0\n", "-3"] {
            std::fs::write(&p, bad).unwrap();
            let r = reserve_in(&p, 7).unwrap_err();
            assert!(
                matches!(&r, Refusal::Corrupt { path, .. } if path == &p),
                "{r:?}"
            );
            let (code, msg, _) = r.control();
            assert_eq!(code, ControlError_Code::INTERNAL);
            assert!(msg.contains("meta_reservation"), "{msg}");
            // Left as it is for an operator to look at.
            assert_eq!(std::fs::read_to_string(&p).unwrap(), bad);
        }
    }
}
