//! The TCP transport on 127.0.0.1: batching and order, reconnection, unreachable peers,
//! chunked snapshots, authentication, and bad input on the peer port.
//!
//! Every wait is a bounded poll until a condition holds; deadlines are generous because CI
//! shares two cores.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use harpoon::transport::tcp::{TcpConfig, TcpTransport};
use harpoon::transport::{Envelope, MessageSink, SnapshotStatus, Transport};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use proto::frame::{self, FrameDecoder};
use proto::peer::{decode_frame, encode_raft_batch};
use proto::peerpb::{Hello, PeerFrame, PeerFrame_oneof_kind, Proof};
use proto::{CellId, NodeId};
use raft::eraftpb::{Message, MessageType};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const SECRET: &[u8] = b"correct horse battery staple";
const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Recorder {
    msgs: Mutex<Vec<(NodeId, Envelope)>>,
    /// Messages delivered; with `discard` set only this is kept (for throughput runs).
    delivered: AtomicUsize,
    discard: AtomicBool,
    unreachable: Mutex<Vec<NodeId>>,
    snapshots: Mutex<Vec<(CellId, NodeId, SnapshotStatus)>>,
}

impl MessageSink for Recorder {
    fn deliver(&self, from: NodeId, batch: Vec<Envelope>) {
        let n = batch.len();
        if !self.discard.load(Ordering::Relaxed) {
            self.msgs
                .lock()
                .extend(batch.into_iter().map(|e| (from, e)));
        }
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }
    fn report_unreachable(&self, node: NodeId) {
        self.unreachable.lock().push(node);
    }
    fn report_snapshot(&self, cell: CellId, to: NodeId, status: SnapshotStatus) {
        self.snapshots.lock().push((cell, to, status));
    }
}

impl Recorder {
    fn count(&self) -> usize {
        self.delivered.load(Ordering::Relaxed)
    }
    /// Indexes of the messages received from `from`, in arrival order.
    fn indexes_from(&self, from: NodeId) -> Vec<u64> {
        self.msgs
            .lock()
            .iter()
            .filter(|(f, _)| *f == from)
            .map(|(_, e)| e.msg.index)
            .collect()
    }
}

/// Poll `cond` until it holds; fail the test after [`DEADLINE`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn config(secret: &[u8]) -> TcpConfig {
    TcpConfig {
        cluster_secret: secret.to_vec(),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..TcpConfig::default()
    }
}

struct Node {
    id: NodeId,
    t: Arc<TcpTransport>,
    sink: Arc<Recorder>,
    addr: SocketAddr,
}

async fn start(id: u64, cfg: TcpConfig) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(id, cfg, listener)
}

fn serve_on(id: u64, cfg: TcpConfig, listener: TcpListener) -> Node {
    let sink = Arc::new(Recorder::default());
    let addr = listener.local_addr().unwrap();
    let t = TcpTransport::new(
        NodeId(id),
        cfg,
        sink.clone(),
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    t.serve(listener);
    Node {
        id: NodeId(id),
        t: Arc::new(t),
        sink,
        addr,
    }
}

fn connect_all(nodes: &[&Node]) {
    for a in nodes {
        for b in nodes {
            if a.id != b.id {
                a.t.set_peer_address(b.id, b.addr);
            }
        }
    }
}

fn msg(kind: MessageType, from: NodeId, to: NodeId, index: u64) -> Envelope {
    let mut m = Message::new();
    m.set_msg_type(kind);
    m.from = from.get();
    m.to = to.get();
    m.term = 1;
    m.index = index;
    Envelope {
        cell: CellId(1 + index % 3),
        msg: m,
    }
}

fn append(from: &Node, to: &Node, index: u64) -> Envelope {
    msg(MessageType::MsgAppend, from.id, to.id, index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_batches_in_order() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    for round in 0..200u64 {
        a.t.send(
            b.id,
            (0..5).map(|i| append(&a, &b, round * 5 + i)).collect(),
        );
        b.t.send(a.id, vec![append(&b, &a, round)]);
    }
    wait_until("all messages", || {
        b.sink.count() == 1000 && a.sink.count() == 200
    })
    .await;
    assert_eq!(b.sink.indexes_from(a.id), (0..1000).collect::<Vec<_>>());
    assert_eq!(a.sink.indexes_from(b.id), (0..200).collect::<Vec<_>>());
    let got = b.sink.msgs.lock()[7].1.clone();
    assert_eq!(got, append(&a, &b, 7));
    assert!(a.sink.unreachable.lock().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_order_per_pair() {
    let nodes = [
        start(1, config(SECRET)).await,
        start(2, config(SECRET)).await,
        start(3, config(SECRET)).await,
    ];
    connect_all(&nodes.iter().collect::<Vec<_>>());
    for i in 0..300u64 {
        for a in &nodes {
            for b in &nodes {
                if a.id != b.id {
                    a.t.send(b.id, vec![append(a, b, i)]);
                }
            }
        }
    }
    for n in &nodes {
        wait_until("all messages", || n.sink.count() == 600).await;
        for m in &nodes {
            if m.id != n.id {
                assert_eq!(n.sink.indexes_from(m.id), (0..300).collect::<Vec<_>>());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_sends_are_coalesced() {
    // B's port accepts connections but B does not serve them yet, so A's handshake cannot
    // finish: every send queues behind the connection being set up.
    let b_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = start(1, config(SECRET)).await;
    a.t.set_peer_address(NodeId(2), b_listener.local_addr().unwrap());
    const SENDS: u64 = 2000;
    for i in 0..SENDS {
        a.t.send(
            NodeId(2),
            vec![msg(MessageType::MsgAppend, NodeId(1), NodeId(2), i)],
        );
    }
    let b = serve_on(2, config(SECRET), b_listener);
    b.t.set_peer_address(a.id, a.addr);
    wait_until("all messages", || b.sink.count() == SENDS as usize).await;
    assert_eq!(b.sink.indexes_from(a.id), (0..SENDS).collect::<Vec<_>>());
    let st = a.t.stats();
    assert_eq!(st.sends, SENDS);
    assert_eq!(st.msgs_sent, SENDS);
    assert_eq!(
        st.direct_writes, 0,
        "nothing was lent before the connection was up"
    );
    assert!(
        st.raft_frames < SENDS / 2,
        "{} frames for {SENDS} sends",
        st.raft_frames
    );
    assert_eq!(
        st.writes, st.raft_frames,
        "one write per round, one frame per round"
    );
    assert_eq!(b.t.stats().raft_frames_received, st.raft_frames);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_written_by_the_sender() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    a.t.send(b.id, vec![append(&a, &b, 0)]);
    wait_until("first message", || b.sink.count() == 1).await;
    // One send at a time, each after the last one arrived: the writer is idle for each.
    const SENDS: u64 = 100;
    for i in 1..=SENDS {
        a.t.send(b.id, vec![append(&a, &b, i)]);
        wait_until("message", || b.sink.count() == i as usize + 1).await;
    }
    assert_eq!(b.sink.indexes_from(a.id), (0..=SENDS).collect::<Vec<_>>());
    let st = a.t.stats();
    // The writer lends the connection a moment after its own write: a send can land in
    // that moment and go through it, rarely more than once.
    assert!(
        st.direct_writes >= SENDS / 2,
        "{} direct writes for {SENDS} sends to an idle peer",
        st.direct_writes
    );
    assert_eq!(st.msgs_sent, SENDS + 1);
    assert_eq!(b.t.stats().raft_frames_received, st.raft_frames);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_the_socket_takes_in_part_is_finished_in_order() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    a.t.send(b.id, vec![append(&a, &b, 0)]);
    wait_until("first message", || b.sink.count() == 1).await;
    // A frame far larger than a loopback socket's send buffer: the direct write takes part
    // of it and the writer finishes it, while small sends queue behind it. Repeated, so some
    // large frames start on an idle connection and some behind a busy one.
    let big = |i: u64| {
        let mut e = append(&a, &b, i);
        let mut entry = raft::eraftpb::Entry::new();
        entry.index = i;
        entry.data = (0..24u32 << 20)
            .map(|j| (j as u64 + i) as u8)
            .collect::<Vec<u8>>()
            .into();
        e.msg.entries = vec![entry].into();
        e
    };
    let mut next = 1;
    for _ in 0..3 {
        a.t.send(b.id, vec![big(next)]);
        next += 1;
        for _ in 0..200 {
            a.t.send(b.id, vec![append(&a, &b, next)]);
            next += 1;
        }
        wait_until("the round", || b.sink.count() == next as usize).await;
    }
    assert_eq!(b.sink.indexes_from(a.id), (0..next).collect::<Vec<_>>());
    for (_, e) in b.sink.msgs.lock().iter() {
        if let Some(entry) = e.msg.entries.first() {
            let i = e.msg.index;
            assert_eq!(entry.data.len(), 24 << 20, "message {i}");
            assert!(
                entry
                    .data
                    .iter()
                    .enumerate()
                    .all(|(j, &byte)| byte == (j as u64 + i) as u8),
                "message {i} arrived corrupted"
            );
        }
    }
    let st = a.t.stats();
    assert!(st.direct_writes >= 1, "{st:?}");
    assert_eq!(st.dropped_unreachable, 0);
    assert_eq!(b.t.stats().bad_frames, 0);
    assert!(a.sink.unreachable.lock().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_direct_write_after_shutdown() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    a.t.send(b.id, vec![append(&a, &b, 0)]);
    wait_until("first message", || b.sink.count() == 1).await;
    a.t.send(b.id, vec![append(&a, &b, 1)]);
    wait_until("second message", || b.sink.count() == 2).await;
    a.t.shutdown();
    let before = a.t.stats();
    for i in 2..50 {
        a.t.send(b.id, vec![append(&a, &b, i)]);
    }
    // Give anything that did slip out time to arrive before checking that nothing did.
    let other = start(3, config(SECRET)).await;
    connect_all(&[&b, &other]);
    other.t.send(
        b.id,
        vec![msg(MessageType::MsgHeartbeat, NodeId(3), NodeId(2), 1)],
    );
    wait_until("a later message from another node", || b.sink.count() >= 3).await;
    assert_eq!(a.t.stats().writes, before.writes);
    assert_eq!(b.sink.indexes_from(a.id), vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_peer_listener_restarts() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    a.t.send(b.id, vec![append(&a, &b, 1)]);
    wait_until("first message", || b.sink.count() == 1).await;

    let addr = b.addr;
    b.t.shutdown();
    drop(b);
    // Raft keeps sending; the writer notices the dead connection and reports it.
    let mut i = 2;
    wait_until("unreachable report", || {
        a.t.send(
            NodeId(2),
            vec![msg(MessageType::MsgHeartbeat, NodeId(1), NodeId(2), i)],
        );
        i += 1;
        !a.sink.unreachable.lock().is_empty()
    })
    .await;
    assert_eq!(a.sink.unreachable.lock()[0], NodeId(2));

    // The listener comes back on the same port (once the old socket is gone).
    let deadline = Instant::now() + DEADLINE;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot rebind {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let b2 = serve_on(2, config(SECRET), listener);
    wait_until("delivery after restart", || {
        a.t.send(b2.id, vec![append(&a, &b2, 1000)]);
        b2.sink.count() > 0
    })
    .await;
    assert!(a.t.stats().connects >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_when_peer_is_down() {
    let a = start(1, config(SECRET)).await;
    // A port nobody listens on.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    a.t.set_peer_address(NodeId(9), dead);
    let mut snap = msg(MessageType::MsgSnapshot, NodeId(1), NodeId(9), 5);
    snap.msg.mut_snapshot().data = Bytes::from_static(b"state");
    a.t.send(
        NodeId(9),
        vec![
            msg(MessageType::MsgAppend, NodeId(1), NodeId(9), 1),
            snap.clone(),
        ],
    );
    wait_until("unreachable", || {
        a.sink.unreachable.lock().contains(&NodeId(9))
    })
    .await;
    wait_until("snapshot failure", || {
        a.sink
            .snapshots
            .lock()
            .contains(&(snap.cell, NodeId(9), SnapshotStatus::Failure))
    })
    .await;
    let st = a.t.stats();
    assert!(st.connect_failures >= 1);
    assert!(st.dropped_unreachable >= 1);

    // A node without an address is unreachable too.
    a.t.send(
        NodeId(10),
        vec![msg(MessageType::MsgAppend, NodeId(1), NodeId(10), 1)],
    );
    wait_until("unreachable", || {
        a.sink.unreachable.lock().contains(&NodeId(10))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_snapshot_arrives_in_chunks() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    let data: Vec<u8> = (0..10u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut snap = msg(MessageType::MsgSnapshot, a.id, b.id, 77);
    snap.cell = CellId(42);
    snap.msg.mut_snapshot().mut_metadata().index = 77;
    snap.msg.mut_snapshot().mut_metadata().term = 3;
    snap.msg.mut_snapshot().data = Bytes::from(data);
    a.t.send(
        b.id,
        vec![append(&a, &b, 1), snap.clone(), append(&a, &b, 2)],
    );
    // Raft traffic keeps flowing while the snapshot streams.
    a.t.send(b.id, vec![append(&a, &b, 3)]);
    wait_until("snapshot finish report", || {
        a.sink
            .snapshots
            .lock()
            .contains(&(CellId(42), b.id, SnapshotStatus::Finish))
    })
    .await;
    wait_until("snapshot delivered", || b.sink.count() == 4).await;
    let got: Vec<Envelope> = b
        .sink
        .msgs
        .lock()
        .iter()
        .filter(|(_, e)| e.msg.msg_type == MessageType::MsgSnapshot)
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(got.len(), 1);
    assert!(got[0] == snap, "snapshot arrived altered");
    let st = a.t.stats();
    assert_eq!(st.snapshot_chunks_sent, 10);
    assert_eq!(st.snapshots_sent, 1);
    assert_eq!(b.t.stats().snapshots_received, 1);
    // The appends were not held back behind the whole snapshot.
    assert_eq!(
        b.sink.indexes_from(a.id).iter().filter(|i| **i < 4).count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_wrong_secret_is_refused() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    let evil = start(3, config(b"wrong secret")).await;
    connect_all(&[&a, &b]);
    evil.t.set_peer_address(b.id, b.addr);
    evil.t.send(b.id, vec![append(&evil, &b, 666)]);
    wait_until("evil sees refusal", || {
        evil.sink.unreachable.lock().contains(&b.id)
    })
    .await;
    wait_until("b counts the refusal", || b.t.stats().refused >= 1).await;

    // A good peer is still served, and nothing from the evil one ever arrived.
    a.t.send(b.id, vec![append(&a, &b, 1)]);
    wait_until("good peer delivered", || b.sink.count() == 1).await;
    assert_eq!(b.sink.indexes_from(a.id), vec![1]);
    assert!(b.sink.indexes_from(evil.id).is_empty());
}

// ---- Raw clients speaking the documented protocol (peerpb.proto), to send bad input. ----

async fn write_frame(s: &mut TcpStream, f: &PeerFrame) {
    let mut buf = Vec::new();
    frame::encode_message(f, frame::DEFAULT_MAX_FRAME, &mut buf).unwrap();
    s.write_all(&buf).await.unwrap();
}

/// Read frames until the server closes the connection; returns what it sent.
async fn read_until_closed(s: &mut TcpStream) -> Vec<PeerFrame_oneof_kind> {
    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::default();
    let mut got = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        while let Ok(Some(p)) = dec.decode(&mut buf) {
            got.push(decode_frame(&p).unwrap());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(_)) => {}
            Err(_) => panic!("server did not close the connection; got {got:?}"),
        }
    }
}

fn hello(from: u64, to: u64, nonce: &[u8]) -> PeerFrame {
    let mut h = Hello::new();
    h.version = 1;
    h.cluster = "quiver".into();
    h.from = from;
    h.to = to;
    h.nonce = Bytes::copy_from_slice(nonce);
    let mut f = PeerFrame::new();
    f.set_hello(h);
    f
}

fn proof_frame(proof: &[u8]) -> PeerFrame {
    let mut p = Proof::new();
    p.proof = Bytes::copy_from_slice(proof);
    let mut f = PeerFrame::new();
    f.set_proof(p);
    f
}

fn raft_frame(from: u64, to: u64, index: u64) -> Vec<u8> {
    let e = msg(MessageType::MsgAppend, NodeId(from), NodeId(to), index);
    let mut buf = Vec::new();
    encode_raft_batch(std::iter::once((e.cell, &e.msg)), 1 << 20, &mut buf).unwrap();
    buf
}

/// The dialer's proof, computed from the protocol description in `peerpb.proto`.
fn dialer_proof(secret: &[u8], nonce_d: &[u8], nonce_s: &[u8], from: u64, to: u64) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    for part in [&b"quiver-peer-v1 dialer"[..], nonce_d, nonce_s] {
        m.update(&(part.len() as u64).to_le_bytes());
        m.update(part);
    }
    m.update(&from.to_le_bytes());
    m.update(&to.to_le_bytes());
    m.finalize().into_bytes().to_vec()
}

async fn next_frame(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    dec: &mut FrameDecoder,
) -> PeerFrame_oneof_kind {
    loop {
        if let Some(p) = dec.decode(buf).unwrap() {
            return decode_frame(&p).unwrap();
        }
        let n = tokio::time::timeout(DEADLINE, s.read_buf(buf))
            .await
            .expect("handshake reply in time")
            .unwrap();
        assert!(n > 0, "closed during handshake");
    }
}

/// Connect to `server` as node `from` and complete the handshake with the real secret.
async fn authenticated(server: &Node, from: u64) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let nonce_d = [7u8; 32];
    write_frame(&mut s, &hello(from, server.id.get(), &nonce_d)).await;
    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::default();
    let PeerFrame_oneof_kind::challenge(c) = next_frame(&mut s, &mut buf, &mut dec).await else {
        panic!("expected a challenge")
    };
    let proof = dialer_proof(SECRET, &nonce_d, &c.nonce, from, server.id.get());
    write_frame(&mut s, &proof_frame(&proof)).await;
    let ack = next_frame(&mut s, &mut buf, &mut dec).await;
    assert!(matches!(ack, PeerFrame_oneof_kind::ack(_)), "got {ack:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_messages_of_an_unproven_peer_are_never_delivered() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);

    // Hello, a bad proof and raft messages, all at once.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let mut out = Vec::new();
    frame::encode_message(&hello(1, 2, &[1u8; 32]), 1 << 20, &mut out).unwrap();
    frame::encode_message(&proof_frame(&[0u8; 32]), 1 << 20, &mut out).unwrap();
    out.extend(raft_frame(1, 2, 13));
    s.write_all(&out).await.unwrap();
    let got = read_until_closed(&mut s).await;
    assert!(matches!(got[0], PeerFrame_oneof_kind::challenge(_)));
    assert!(matches!(got.last(), Some(PeerFrame_oneof_kind::refused(_))));

    // Raft messages instead of a proof.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let mut out = Vec::new();
    frame::encode_message(&hello(1, 2, &[1u8; 32]), 1 << 20, &mut out).unwrap();
    out.extend(raft_frame(1, 2, 14));
    s.write_all(&out).await.unwrap();
    read_until_closed(&mut s).await;

    // The real protocol with the real secret works (so the refusals above were about proof).
    let mut s = authenticated(&b, 1).await;
    s.write_all(&raft_frame(1, 2, 15)).await.unwrap();
    wait_until("authenticated raw peer delivered", || b.sink.count() == 1).await;
    assert_eq!(b.sink.indexes_from(NodeId(1)), vec![15]);
    assert_eq!(b.t.stats().refused, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    a.t.send(b.id, vec![append(&a, &b, 0)]);
    wait_until("good peer connected", || b.sink.count() == 1).await;

    // Before authentication (where frames are limited to a few KiB).
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: quiver\r\n\r\n".to_vec(),
        u32::MAX.to_le_bytes().to_vec(),
        (64u32 << 10).to_le_bytes().to_vec(),
        {
            let mut v = 3u32.to_le_bytes().to_vec();
            v.extend([0xff, 0xff, 0xff]);
            v
        },
    ];
    for bytes in &cases {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        read_until_closed(&mut s).await;
    }
    wait_until("refusals counted", || {
        b.t.stats().refused == cases.len() as u64
    })
    .await;

    // After authentication: an oversized frame, garbage, an unknown frame kind.
    let mut s = authenticated(&b, 5).await;
    s.write_all(&(65u32 << 20).to_le_bytes()).await.unwrap();
    read_until_closed(&mut s).await;
    let mut s = authenticated(&b, 5).await;
    let mut bad = 4u32.to_le_bytes().to_vec();
    bad.extend([0x0a, 0x05, 0xff, 0xff]);
    s.write_all(&bad).await.unwrap();
    read_until_closed(&mut s).await;
    let mut s = authenticated(&b, 5).await;
    write_frame(&mut s, &hello(5, 2, &[0u8; 32])).await;
    read_until_closed(&mut s).await;
    wait_until("bad frames counted", || b.t.stats().bad_frames == 3).await;

    // The good peer is still served, on its existing connection.
    for i in 1..=10 {
        a.t.send(b.id, vec![append(&a, &b, i)]);
    }
    wait_until("good peer still delivered", || b.sink.count() == 11).await;
    assert_eq!(b.sink.indexes_from(a.id), (0..=10).collect::<Vec<_>>());
    assert!(b.sink.indexes_from(NodeId(5)).is_empty());
    assert_eq!(a.t.stats().connects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_from_a_peer_closes_the_older_one() {
    let b = start(2, config(SECRET)).await;
    let mut old = authenticated(&b, 7).await;
    let mut new = authenticated(&b, 7).await;
    read_until_closed(&mut old).await;
    new.write_all(&raft_frame(7, 2, 1)).await.unwrap();
    wait_until("delivered on the newer connection", || b.sink.count() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_and_silent_peer_times_out() {
    // A listener that never answers: the handshake hangs until its timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = TcpConfig {
        queue_limit: 10,
        handshake_timeout: Duration::from_millis(300),
        ..config(SECRET)
    };
    let a = start(1, cfg).await;
    a.t.set_peer_address(NodeId(2), silent.local_addr().unwrap());
    for i in 0..100 {
        a.t.send(
            NodeId(2),
            vec![msg(MessageType::MsgAppend, a.id, NodeId(2), i)],
        );
    }
    let st = a.t.stats();
    assert_eq!(st.dropped_queue_full, 90);
    wait_until("unreachable after handshake timeout", || {
        a.sink.unreachable.lock().contains(&NodeId(2))
    })
    .await;
    wait_until("queue dropped", || a.t.stats().dropped_unreachable == 10).await;
    assert_eq!(a.t.stats().connect_failures, 1);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_larger_than_a_frame_are_split() {
    let cfg = TcpConfig {
        max_frame: 16 << 10,
        snapshot_chunk_size: 4 << 10,
        ..config(SECRET)
    };
    let a = start(1, cfg.clone()).await;
    let b = start(2, cfg).await;
    connect_all(&[&a, &b]);
    let big = |i: u64| {
        let mut e = append(&a, &b, i);
        let mut entry = raft::eraftpb::Entry::new();
        entry.data = Bytes::from(vec![i as u8; 1000]);
        e.msg.mut_entries().push(entry);
        e
    };
    // Too large for any frame: dropped, counted, and the rest still goes.
    let mut huge = append(&a, &b, 999);
    let mut entry = raft::eraftpb::Entry::new();
    entry.data = Bytes::from(vec![0u8; 20 << 10]);
    huge.msg.mut_entries().push(entry);
    let mut batch: Vec<Envelope> = (0..100).map(big).collect();
    batch.insert(50, huge);
    a.t.send(b.id, batch);
    wait_until("all but the huge one", || b.sink.count() == 100).await;
    assert_eq!(b.sink.indexes_from(a.id), (0..100).collect::<Vec<_>>());
    let st = a.t.stats();
    assert_eq!(st.dropped_too_large, 1);
    assert!(st.raft_frames >= 7, "{} frames", st.raft_frames);
    assert_eq!(b.sink.msgs.lock()[42].1, big(42));

    // A snapshot bigger than a frame streams in many small chunks.
    let mut snap = msg(MessageType::MsgSnapshot, a.id, b.id, 500);
    snap.msg.mut_snapshot().data = Bytes::from(vec![5u8; 100 << 10]);
    a.t.send(b.id, vec![snap.clone()]);
    wait_until("snapshot", || b.sink.count() == 101).await;
    assert!(b.sink.msgs.lock()[100].1 == snap);
    assert_eq!(a.t.stats().snapshot_chunks_sent, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_address_reaching_another_node_is_refused() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    // a thinks node 3 lives at b's address.
    a.t.set_peer_address(NodeId(3), b.addr);
    a.t.send(
        NodeId(3),
        vec![msg(MessageType::MsgAppend, a.id, NodeId(3), 1)],
    );
    wait_until("unreachable", || {
        a.sink.unreachable.lock().contains(&NodeId(3))
    })
    .await;
    assert_eq!(b.sink.count(), 0);
    // Fixing the address book fixes delivery.
    a.t.set_peer_address(NodeId(2), b.addr);
    a.t.send(b.id, vec![append(&a, &b, 2)]);
    wait_until("delivered", || b.sink.count() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_address_is_used_even_while_the_old_connection_is_lent() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    for i in 0..3 {
        a.t.send(b.id, vec![append(&a, &b, i)]);
        wait_until("message", || b.sink.count() == i as usize + 1).await;
    }
    assert!(
        a.t.stats().direct_writes >= 1,
        "the idle connection was lent"
    );
    // Node 2 moves (a new process on another port); the old one still listens.
    let b2 = start(2, config(SECRET)).await;
    a.t.set_peer_address(b.id, b2.addr);
    for i in 3..6 {
        a.t.send(b.id, vec![append(&a, &b2, i)]);
        wait_until("message at the new address", || {
            b2.sink.count() == i as usize - 2
        })
        .await;
    }
    assert_eq!(b2.sink.indexes_from(a.id), vec![3, 4, 5]);
    assert_eq!(
        b.sink.indexes_from(a.id),
        vec![0, 1, 2],
        "nothing more to the old address"
    );
}

/// Throughput of one node pair; run by hand:
/// `cargo test --release -p harpoon --test transport_tcp -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let a = start(1, config(SECRET)).await;
    let b = start(2, config(SECRET)).await;
    connect_all(&[&a, &b]);
    b.sink.discard.store(true, Ordering::Relaxed);
    const MSGS: u64 = 1_000_000;
    const PER_SEND: u64 = 10;
    let proto_msg = {
        let mut e = append(&a, &b, 0);
        let mut entry = raft::eraftpb::Entry::new();
        entry.data = Bytes::from(vec![1u8; 100]);
        e.msg.mut_entries().push(entry);
        e
    };
    let start = Instant::now();
    let t = a.t.clone();
    let sender = std::thread::spawn(move || {
        for i in 0..MSGS / PER_SEND {
            let batch = (0..PER_SEND)
                .map(|j| {
                    let mut e = proto_msg.clone();
                    e.msg.index = i * PER_SEND + j;
                    e
                })
                .collect();
            t.send(NodeId(2), batch);
            // Stay under the queue limit, as raft's inflight window would.
            while i % 1000 == 0 && t.stats().msgs_sent + 30_000 < i * PER_SEND {
                std::thread::yield_now();
            }
        }
    });
    wait_until("all delivered", || b.sink.count() as u64 == MSGS).await;
    let el = start.elapsed();
    sender.join().unwrap();
    let st = a.t.stats();
    println!(
        "{MSGS} msgs in {el:?}: {:.0} msgs/s, {} frames ({:.0} msgs/frame), {:.1} MB written, {} dropped",
        MSGS as f64 / el.as_secs_f64(),
        st.raft_frames,
        st.msgs_sent as f64 / st.raft_frames as f64,
        st.bytes_written as f64 / 1e6,
        st.dropped_queue_full
    );
}

/// A peer port that reads the first frame itself, then hands the connection over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_port_can_hand_over_a_connection_after_reading_the_first_frame() {
    let a = start(1, config(SECRET)).await;
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink = Arc::new(Recorder::default());
    let b = Arc::new(
        TcpTransport::new(
            NodeId(2),
            config(SECRET),
            sink.clone(),
            tokio::runtime::Handle::current(),
        )
        .unwrap(),
    );
    a.t.set_peer_address(NodeId(2), port.local_addr().unwrap());
    a.t.send(
        NodeId(2),
        vec![msg(MessageType::MsgAppend, a.id, NodeId(2), 1)],
    );

    let (mut stream, _) = port.accept().await.unwrap();
    let mut buf = BytesMut::new();
    // Dispatch on the first frame's kind without consuming it.
    let kind = loop {
        let mut peek = buf.clone();
        if let Some(p) = FrameDecoder::default().decode(&mut peek).unwrap() {
            break decode_frame(&p).unwrap();
        }
        stream.read_buf(&mut buf).await.unwrap();
    };
    assert!(matches!(kind, PeerFrame_oneof_kind::hello(_)));
    let served = b.clone();
    tokio::spawn(async move { served.serve_connection_buffered(stream, buf).await });
    wait_until("delivered through the handed-over connection", || {
        sink.count() == 1
    })
    .await;
    assert_eq!(sink.indexes_from(a.id), vec![1]);
}
