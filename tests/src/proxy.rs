//! A userspace TCP fault proxy in front of every node's peer port (no root needed).
//!
//! Node `j` advertises its proxy's address, so every peer connection to `j` passes through
//! it. Peer connections are one-way (the dialer sends raft batches, the server answers only
//! during the handshake), and the dialer speaks first: the first frame carries its node id
//! (`peerpb.Hello.from` on raft connections, `ControlHello.from` on control connections). The
//! proxy decodes that frame to learn the link `from -> j`, then forwards the dialer's frames
//! byte for byte unless the link's [`Rule`] says otherwise; the server's replies pass as is.
//! Connections whose dialer is not a node (create-meta, id 0) always pass.
//!
//! Rules per directed link `(from, to)` (node ids):
//! - [`Rule::Pass`];
//! - [`Rule::Drop`]: a blackhole. Frames are discarded; once one was, the connection stays dead
//!   (like a TCP connection whose packets vanish) and is closed when the rule is lifted, so the
//!   dialer reconnects; no partial stream ever resumes;
//! - [`Rule::Delay`]: every frame delivered `fixed + uniform(0..jitter)` later, order kept;
//! - [`Rule::Loss`]: each raft batch lost with probability `p` (a batch is a set of raft
//!   messages, which raft must tolerate losing), or, with `cut`, the connection cut instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use proto::frame::FrameDecoder;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// What happens to frames on one directed link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    Pass,
    Drop,
    Delay { fixed: Duration, jitter: Duration },
    Loss { p: f64, cut: bool },
}

/// Frames seen by the proxy, by fate.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub delayed: AtomicU64,
    pub lost: AtomicU64,
    pub cut: AtomicU64,
}

impl std::fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "connections={} forwarded={} blackholed={} delayed={} lost={} cut={}",
            g(&self.connections),
            g(&self.forwarded),
            g(&self.dropped),
            g(&self.delayed),
            g(&self.lost),
            g(&self.cut)
        )
    }
}

#[derive(Debug, Default)]
struct Shared {
    rules: RwLock<HashMap<(u64, u64), Rule>>,
    /// Node id behind proxy `j`.
    ids: RwLock<Vec<u64>>,
    stats: ProxyStats,
}

impl Shared {
    fn rule(&self, from: u64, to: u64) -> Rule {
        self.rules
            .read()
            .get(&(from, to))
            .copied()
            .unwrap_or(Rule::Pass)
    }
}

/// One listener per node, forwarding to its real peer port.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    tasks: JoinSet<()>,
}

/// Raft batch frames start with the tag of `PeerFrame.raft` (field 6, length-delimited).
const RAFT_TAG: u8 = (6 << 3) | 2;

impl Proxy {
    /// A proxy for each address in `targets` (real peer ports), on fresh 127.0.0.1 ports.
    pub async fn start(targets: &[SocketAddr]) -> Proxy {
        let shared = Arc::new(Shared::default());
        *shared.ids.write() = vec![0; targets.len()];
        let mut tasks = JoinSet::new();
        let mut addrs = Vec::new();
        for (j, t) in targets.iter().enumerate() {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
            addrs.push(l.local_addr().expect("proxy addr"));
            tasks.spawn(accept_loop(l, *t, j, shared.clone()));
        }
        Proxy {
            shared,
            addrs,
            tasks,
        }
    }

    /// The proxies' addresses (what the nodes advertise), by node index.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Record that node index `j` has id `id`.
    pub fn set_node_id(&self, j: usize, id: u64) {
        self.shared.ids.write()[j] = id;
    }

    /// Replace every rule with `rules`.
    pub fn set_all(&self, rules: HashMap<(u64, u64), Rule>) {
        *self.shared.rules.write() = rules;
    }

    /// Every link passes.
    pub fn heal(&self) {
        self.shared.rules.write().clear();
    }

    /// Counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn accept_loop(l: TcpListener, target: SocketAddr, j: usize, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = l.accept() => {
                let Ok((s, _)) = a else { continue };
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                conns.spawn(serve(s, target, j, shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The dialer's node id from the first frame, or 0 when it is not a node.
fn dialer_id(payload: &Bytes) -> u64 {
    use proto::metapb::{ControlFrame, ControlFrame_oneof_kind};
    use proto::peerpb::{PeerFrame, PeerFrame_oneof_kind};
    if let Ok(f) = <PeerFrame as protobuf::Message>::parse_from_bytes(payload) {
        if let Some(PeerFrame_oneof_kind::hello(h)) = f.kind {
            return h.from;
        }
    }
    if let Ok(f) = <ControlFrame as protobuf::Message>::parse_from_bytes(payload) {
        if let Some(ControlFrame_oneof_kind::hello(h)) = f.kind {
            return h.from;
        }
    }
    0
}

async fn serve(dialer: TcpStream, target: SocketAddr, j: usize, shared: Arc<Shared>) {
    let Ok(Ok(server)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = dialer.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut dr, dw) = dialer.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut dw = dw;
    // Server -> dialer: handshake replies, passed as is.
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut dw).await;
        let _ = dw.shutdown().await;
    });
    // Dialer -> server: frames, through the link's rule, delivered in order by a writer.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Bytes)>();
    let writer = tokio::spawn(async move {
        while let Some((at, b)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if sw.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    });
    let mut dec = FrameDecoder::default();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut from: Option<u64> = None;
    let mut last = Instant::now();
    let mut dead = false;
    let to = || shared.ids.read()[j];
    'conn: loop {
        let n = match tokio::time::timeout(Duration::from_millis(200), dr.read_buf(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => 0, // idle: re-check a dead link
        };
        if dead {
            buf.clear();
            if from.is_some_and(|f| shared.rule(f, to()) != Rule::Drop) {
                break;
            }
            continue;
        }
        if n == 0 {
            continue;
        }
        loop {
            let payload = match dec.decode(&mut buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => break 'conn,
            };
            let f = *from.get_or_insert_with(|| dialer_id(&payload));
            let rule = if f == 0 {
                Rule::Pass
            } else {
                shared.rule(f, to())
            };
            // The decoder took it with the same limit, so it encodes.
            let mut frame = BytesMut::new();
            if proto::frame::encode(&payload, dec.max_frame(), &mut frame).is_err() {
                break 'conn;
            }
            let now = Instant::now();
            let at = match rule {
                Rule::Pass => now,
                Rule::Drop => {
                    shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    dead = true;
                    buf.clear();
                    break;
                }
                Rule::Delay { fixed, jitter } => {
                    shared.stats.delayed.fetch_add(1, Ordering::Relaxed);
                    let j = if jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        rand::thread_rng().gen_range(Duration::ZERO..jitter)
                    };
                    now + fixed + j
                }
                Rule::Loss { p, cut } => {
                    if rand::thread_rng().gen_bool(p.clamp(0.0, 1.0)) {
                        if cut {
                            shared.stats.cut.fetch_add(1, Ordering::Relaxed);
                            break 'conn;
                        }
                        if payload.first() == Some(&RAFT_TAG) {
                            shared.stats.lost.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    now
                }
            };
            last = last.max(at);
            shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            if tx.send((last, frame.freeze())).is_err() {
                break 'conn;
            }
        }
    }
    drop(tx);
    back.abort();
    writer.abort();
}
