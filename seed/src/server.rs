//! Start-up, the peer and admin ports, and graceful shutdown.
//!
//! Start-up order (DESIGN.md §6): data dir and node id; the raft log (recovering every cell
//! found in it); the harpoon node with the TCP transport; the meta replica from the data dir
//! if this node holds one; then the ports; then the loops that contact seeds.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use harpoon::storage::LogStore;
use harpoon::transport::tcp::{TcpConfig, TcpTransport};
use harpoon::transport::Transport;
use harpoon::{
    CellConfig, CellFactory, CellOptions, Node, NodeConfig, NodeId, ReplicationMode, Role,
};
use meta::META_RANGE;
use parking_lot::{Mutex, RwLock};
use proto::frame::{FrameDecoder, FrameError};
use proto::metapb::{
    ControlError_Code, ControlFrame, ControlFrame_oneof_kind, ControlRequest_oneof_kind,
    ControlResponse, CreatedMeta, MetaView,
};
use proto::peerpb::{PeerFrame, PeerFrame_oneof_kind};
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Settings;
use crate::control::{self, Dialer, Framed};
use crate::meta_sm::MetaStateMachine;
use crate::node::{Counters, Refusal, Seed, View, META_CELL};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("node id file {path} is corrupt: {why}")]
    NodeId {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("raft log: {0}")]
    Log(#[from] harpoon::storage::StorageError),
    #[error("consensus: {0}")]
    Node(#[from] harpoon::Error),
    #[error("meta replica in the data dir: {0}")]
    Replica(harpoon::StateMachineError),
}

/// Load the node id from `dir`, creating it (once) if absent.
///
/// # Errors
/// I/O, or a file that is not a positive integer.
pub fn node_id(dir: &Path) -> Result<u64, StartError> {
    let path = dir.join("node_id");
    let io = |source| StartError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(id) if id > 0 => Ok(id),
            _ => Err(StartError::NodeId {
                path: path.clone(),
                why: format!("{:?} is not a positive integer", s.trim()),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Ids fit in 53 bits so JSON tools print them exactly.
            let id = rand::random::<u64>() % ((1 << 53) - 1) + 1;
            crate::durable::write_durably(&path, format!("{id}\n").as_bytes()).map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

/// A running node and its tasks.
pub struct Running {
    pub seed: Arc<Seed>,
    ports: JoinSet<()>,
    loops: JoinSet<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("id", &self.seed.id)
            .finish()
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Start a node (must run inside a tokio runtime).
///
/// # Errors
/// The data dir, the raft log, a port or the replica on disk cannot be used.
pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let dir = settings.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| StartError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let id = node_id(&dir)?;
    let peer_l = bind("peer", settings.peer_listen).await?;
    let client_l = bind("client", settings.listen).await?;
    let admin_l = match settings.admin_listen {
        Some(a) => Some(bind("admin", a).await?),
        None => None,
    };
    let local = |l: &TcpListener, what, addr| {
        l.local_addr()
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let peer_addr = match settings.advertise_peer {
        Some(a) => a,
        None => local(&peer_l, "peer", settings.peer_listen)?,
    };
    let client_addr = local(&client_l, "client", settings.listen)?;
    let admin_addr = match (&admin_l, settings.admin_listen) {
        (Some(l), Some(a)) => Some(local(l, "admin", a)?),
        _ => None,
    };

    let seg = seglog::Config {
        segment_size: settings.log_segment_size,
        max_record_size: (settings.log_segment_size / 2).min(16 << 20) as u32,
        ..seglog::Config::default()
    };
    let (log, cells) = LogStore::open(dir.join("raft"), seg)?;
    let election = settings.election_ticks;
    let ncfg = NodeConfig {
        tick_interval: settings.tick,
        shards: 1,
        cell: CellConfig {
            election_tick: election,
            heartbeat_tick: (election / 5).max(1),
            lease_ticks: election.saturating_sub(3).max(1),
            ..CellConfig::default()
        },
        ..NodeConfig::default()
    };
    let tcfg = TcpConfig {
        cluster: settings.cluster.clone(),
        cluster_secret: settings.cluster_secret.clone(),
        ..TcpConfig::default()
    };
    let handle = tokio::runtime::Handle::current();
    let slot: Mutex<Option<Arc<TcpTransport>>> = Mutex::new(None);
    let node = Node::start_with(NodeId(id), ncfg, log, |sink| {
        let t = Arc::new(TcpTransport::new(NodeId(id), tcfg, sink, handle)?);
        *slot.lock() = Some(t.clone());
        Ok::<Arc<dyn Transport>, harpoon::transport::tcp::TcpConfigError>(t)
    })?;
    let transport = slot
        .lock()
        .take()
        .ok_or(StartError::Node(harpoon::Error::Stopped))?;

    // The meta replica this node held before it stopped.
    let replica_slot = Arc::new(Mutex::new(None));
    let sm_path = MetaStateMachine::path(&dir, META_RANGE);
    if sm_path.exists() {
        let (sm, replica) = MetaStateMachine::load(sm_path).map_err(StartError::Replica)?;
        *replica_slot.lock() = Some(replica);
        node.create_cell(
            META_CELL,
            &[],
            &[],
            ReplicationMode::Consensus,
            Box::new(sm),
        )
        .await?;
        tracing::info!(node = id, "meta replica restarted from the data dir");
    } else if cells.contains(&META_CELL) {
        tracing::info!(
            node = id,
            "raft log has meta entries but no replica file; waiting for a snapshot"
        );
    }
    // A new member's replica is created when the leader first contacts it.
    let factory_slot = replica_slot.clone();
    let factory_dir = dir.clone();
    let factory: CellFactory = Arc::new(move |cell| {
        if cell != META_CELL {
            return None;
        }
        let mut slot = factory_slot.lock();
        if slot.is_some() {
            return None;
        }
        let (sm, replica) =
            MetaStateMachine::fresh(MetaStateMachine::path(&factory_dir, META_RANGE));
        *slot = Some(replica);
        // Meta is never a memory collection: its log is the durable one.
        Some((
            CellOptions::durable(ReplicationMode::Consensus),
            Box::new(sm) as Box<dyn harpoon::StateMachine>,
        ))
    });
    node.set_cell_factory(factory);

    let dialer = Dialer {
        cluster: settings.cluster.clone(),
        secret: settings.cluster_secret.clone(),
        from: id,
        timeout: Duration::from_secs(5),
    };
    let (view_changed, _) = watch::channel(0);
    let seed = Arc::new(Seed {
        settings,
        id,
        node,
        transport,
        dialer,
        replica: replica_slot,
        ranges: crate::ranges::Registry::default(),
        view: RwLock::new(View::default()),
        view_changed,
        create_lock: tokio::sync::Mutex::new(()),
        claim_lock: tokio::sync::Mutex::new(()),
        reservation: Mutex::new(()),
        promoted: Mutex::default(),
        draining: std::sync::atomic::AtomicBool::new(false),
        replica_led: std::sync::atomic::AtomicBool::new(false),
        peer_addr,
        client_addr,
        admin_addr,
        counters: Counters::default(),
        started: Instant::now(),
    });
    seed.learn_addresses();
    crate::ranges::reopen_all(&seed).await;

    let mut ports = JoinSet::new();
    ports.spawn(accept_loop(seed.clone(), peer_l, Port::Peer));
    ports.spawn(accept_loop(seed.clone(), client_l, Port::Client));
    if let Some(l) = admin_l {
        ports.spawn(accept_loop(seed.clone(), l, Port::Admin));
    }
    let loops = crate::loops::spawn_all(&seed);
    tracing::info!(
        node = id,
        peer = %peer_addr,
        client = %client_addr,
        admin = ?admin_addr,
        zone = %seed.settings.zone,
        "node started"
    );
    Ok(Running { seed, ports, loops })
}

impl Running {
    /// Graceful shutdown: stop accepting, hand the leadership of meta and of every range led
    /// here to another voter (concurrently, 2 s at most in all), persist their state, stop the
    /// loops, the transport and the consensus threads.
    pub async fn shutdown(mut self) {
        let seed = self.seed.clone();
        seed.draining.store(true, Ordering::Relaxed);
        self.ports.abort_all();
        // Meta's cell and every range's, concurrently, under one deadline.
        let deadline = Instant::now() + HAND_OVER;
        let mut flushes = JoinSet::new();
        let cells = seed.ranges.ids().into_iter().map(harpoon::CellId);
        for cell in std::iter::once(META_CELL).chain(cells) {
            let seed = seed.clone();
            flushes.spawn(async move { hand_over_and_flush(&seed, cell, deadline).await });
        }
        while flushes.join_next().await.is_some() {}
        self.loops.abort_all();
        while self.loops.join_next().await.is_some() {}
        while self.ports.join_next().await.is_some() {}
        seed.transport.shutdown();
        tracing::info!(node = seed.id, "node stopped");
    }
}

/// How long a graceful shutdown waits for the leaderships led here to move.
const HAND_OVER: Duration = Duration::from_secs(2);

/// At shutdown: when this node leads `cell`, hand its leadership to another voter (waiting
/// until `deadline` at most), then make the cell's applied state durable (log compaction
/// persists the state machine first). A cell not open here is skipped.
async fn hand_over_and_flush(seed: &Seed, cell: harpoon::CellId, deadline: Instant) {
    let Ok(st) = seed.node.status(cell).await else {
        return;
    };
    if st.role == Role::Leader {
        if let Some(to) = st.conf.voters.iter().copied().find(|v| *v != seed.id) {
            let r = seed.node.transfer_leader(cell, NodeId(to), deadline).await;
            tracing::info!(cell = cell.0, to, result = ?r.err(), "handed the leadership over");
        }
    }
    // The flush of a logged store's image: a failure only means a longer replay at start-up,
    // but the operator should hear of it.
    if let Err(e) = seed.node.compact_log(cell).await {
        tracing::warn!(cell = cell.0, error = %e, "shutdown flush failed: the raft log replays it");
    }
}

/// Run a node until `stop` resolves, then shut it down gracefully.
///
/// # Errors
/// Start-up failures.
pub async fn run(settings: Settings, stop: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(settings).await?;
    stop.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

#[derive(Clone, Copy)]
enum Port {
    Peer,
    Client,
    Admin,
}

async fn accept_loop(seed: Arc<Seed>, l: TcpListener, port: Port) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        match l.accept().await {
            Ok((s, from)) => {
                let seed = seed.clone();
                conns.spawn(async move {
                    let _ = s.set_nodelay(true);
                    match port {
                        Port::Peer => serve_peer(seed, s, from).await,
                        Port::Client => crate::client_port::serve(seed, s, from).await,
                        Port::Admin => crate::admin::serve(seed, s).await,
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Read bytes until one whole frame is buffered (left in `buf`), within the pre-auth limit.
async fn first_frame(s: &mut TcpStream, buf: &mut BytesMut) -> Result<Bytes, FrameError> {
    loop {
        let mut probe = buf.clone();
        if let Some(p) = FrameDecoder::new(control::PREAUTH_MAX_FRAME).decode(&mut probe)? {
            return Ok(p);
        }
        buf.reserve(4096);
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => {
                return Err(FrameError::Truncated {
                    buffered: buf.len(),
                })
            }
            Ok(_) => {}
        }
    }
}

async fn refuse(s: TcpStream, buf: BytesMut, code: ControlError_Code, msg: String) {
    let mut c = Framed::new(s, buf, control::PREAUTH_MAX_FRAME);
    let _ = control::send_response(&mut c, control::error_response(0, code, msg)).await;
    let _ = c.io.shutdown().await;
}

/// One peer-port connection: a raft transport connection (peerpb Hello) or a control one.
async fn serve_peer(seed: Arc<Seed>, mut s: TcpStream, from: SocketAddr) {
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout(Duration::from_secs(5), first_frame(&mut s, &mut buf)).await;
    let payload = match first {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            seed.counters
                .peer_bad_frames
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, error = %e, "bad first frame on the peer port");
            let code = match e {
                FrameError::TooLarge { .. } => ControlError_Code::TOO_LARGE,
                _ => ControlError_Code::INVALID_ARGUMENT,
            };
            return refuse(s, buf, code, format!("bad frame: {e}")).await;
        }
        Err(_) => return,
    };
    if let Ok(f) = PeerFrame::parse_from_carllerche_bytes(&payload) {
        if matches!(f.kind, Some(PeerFrame_oneof_kind::hello(_))) {
            if let Err(e) = seed.transport.serve_connection_buffered(s, buf).await {
                tracing::debug!(%from, error = %e, "raft connection closed");
            }
            return;
        }
    }
    let hello = match ControlFrame::parse_from_carllerche_bytes(&payload) {
        Ok(ControlFrame {
            kind: Some(ControlFrame_oneof_kind::hello(h)),
            ..
        }) => h,
        _ => {
            seed.counters
                .peer_bad_frames
                .fetch_add(1, Ordering::Relaxed);
            return refuse(
                s,
                buf,
                ControlError_Code::INVALID_ARGUMENT,
                "expected a Hello".into(),
            )
            .await;
        }
    };
    // Consume the Hello frame from the buffer.
    let mut dec = FrameDecoder::new(control::PREAUTH_MAX_FRAME);
    let _ = dec.decode(&mut buf);
    let mut c = Framed::new(s, buf, control::PREAUTH_MAX_FRAME);
    let settings = &seed.settings;
    let auth = tokio::time::timeout(
        Duration::from_secs(5),
        control::accept(
            &mut c,
            hello,
            &settings.cluster,
            &settings.cluster_secret,
            seed.id,
        ),
    )
    .await;
    let peer = match auth {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            seed.counters
                .control_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%from, error = %e, "peer refused");
            let _ = control::send_response(
                &mut c,
                control::error_response(
                    0,
                    ControlError_Code::INVALID_ARGUMENT,
                    format!("refused: {e}"),
                ),
            )
            .await;
            let _ = c.io.shutdown().await;
            return;
        }
        Err(_) => return,
    };
    let req = match control::read_request(&mut c).await {
        Ok(r) => r,
        Err(e) => {
            seed.counters
                .peer_bad_frames
                .fetch_add(1, Ordering::Relaxed);
            let _ = control::send_response(
                &mut c,
                control::error_response(0, ControlError_Code::INVALID_ARGUMENT, e.to_string()),
            )
            .await;
            let _ = c.io.shutdown().await;
            return;
        }
    };
    seed.counters
        .control_requests
        .fetch_add(1, Ordering::Relaxed);
    let resp = handle_control(&seed, peer, req).await;
    let _ = control::send_response(&mut c, resp).await;
    let _ = c.io.shutdown().await;
}

fn refusal_response(id: u64, r: Refusal) -> ControlResponse {
    let (code, msg, redirect) = r.control();
    let mut resp = control::error_response(id, code, msg);
    if let Some(proto::metapb::ControlResponse_oneof_kind::error(e)) = resp.kind.as_mut() {
        e.redirect = redirect.into();
    }
    resp
}

async fn handle_control(
    seed: &Arc<Seed>,
    peer: u64,
    req: proto::metapb::ControlRequest,
) -> ControlResponse {
    let id = req.id;
    let mut resp = ControlResponse::new();
    resp.id = id;
    match req.kind {
        Some(ControlRequest_oneof_kind::create_meta(cm)) => {
            match seed.create_meta(cm.replication_factor).await {
                Ok(()) => {
                    let mut c = CreatedMeta::new();
                    c.node = seed.id;
                    resp.set_created(c);
                }
                Err(r) => return refusal_response(id, r),
            }
        }
        Some(ControlRequest_oneof_kind::watch_meta(w)) => {
            let Some(replica) = seed.live_replica() else {
                return refusal_response(id, seed.redirect().await);
            };
            let mut rx = replica.subscribe();
            let wait = Duration::from_millis(u64::from(w.wait_ms.min(10_000)));
            let _ = tokio::time::timeout(wait, async {
                while *rx.borrow_and_update() <= w.after_revision {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            let mut v = MetaView::new();
            v.set_image(replica.read(|s| s.image()));
            if let Some(l) = seed.meta_leader().await {
                v.leader = l;
                v.leader_peer_addr = seed.read_meta(|s| {
                    meta::view::node(s, l)
                        .ok()
                        .flatten()
                        .map(|n| n.value.peer_addr)
                        .unwrap_or_default()
                });
            }
            resp.set_view(v);
        }
        Some(ControlRequest_oneof_kind::heartbeat(hb)) => {
            let rec = hb.get_node().clone();
            if rec.id == 0 || rec.id != peer {
                return refusal_response(id, Refusal::Invalid("heartbeat for another node".into()));
            }
            let txn = match seed.read_meta(|s| meta::ops::put_node(s, &rec)) {
                Ok(t) => t,
                Err(e) => return refusal_response(id, Refusal::Invalid(e.to_string())),
            };
            match seed.propose_local(&txn).await {
                Ok(r) => resp.set_txn(r),
                Err(r) => return refusal_response(id, r),
            }
        }
        Some(ControlRequest_oneof_kind::propose(p)) => {
            match seed.propose_local(p.get_txn()).await {
                Ok(r) => resp.set_txn(r),
                Err(r) => return refusal_response(id, r),
            }
        }
        Some(ControlRequest_oneof_kind::reserve_meta(rm)) => {
            if rm.node == 0 || rm.node != peer {
                return refusal_response(
                    id,
                    Refusal::Invalid("reservation for another node".into()),
                );
            }
            match seed.reserve_meta(rm.node) {
                Ok((granted, holder)) => {
                    let mut r = proto::metapb::Reserved::new();
                    r.granted = granted;
                    r.holder = holder;
                    resp.set_reserved(r);
                }
                Err(r) => return refusal_response(id, r),
            }
        }
        None => return refusal_response(id, Refusal::Invalid("empty request".into())),
    }
    resp
}
