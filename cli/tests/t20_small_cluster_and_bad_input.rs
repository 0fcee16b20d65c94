//! A three-node cluster runs meta under-replicated (3/7) until a fourth node joins; peers
//! without the secret and garbage or oversized frames on both ports are refused while the
//! node keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use proto::clientpb::{ClientError_Code, ClientResponse, ClientResponse_oneof_kind};
use proto::metapb::{
    ControlError_Code, ControlFrame, ControlFrame_oneof_kind, ControlRequest,
    ControlResponse_oneof_kind, ProposeTxn,
};

/// Send raw bytes, return what comes back until the node closes the connection.
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_replicated_then_fourth_joins_and_bad_input_is_refused() {
    let (path, _dir) = test_dir();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_quiver"));
    let mut c = cli::demo::LocalCluster::new(exe, path, 4, fast()).unwrap();
    for i in 0..3 {
        c.start(i).unwrap();
    }
    // create-meta sent at once to two different seeds: exactly one succeeds.
    for n in &c.nodes[0..3] {
        let peer = n.peer;
        let up = cli::demo::wait_for(Duration::from_secs(30), || async {
            TcpStream::connect(peer).ok().map(|_| ())
        })
        .await;
        assert!(up.is_some(), "node at {peer} did not start");
    }
    let (a, b) = tokio::join!(c.create_meta(0), c.create_meta(1));
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one concurrent create-meta wins: {a:?} / {b:?}"
    );
    let loser = if a.is_ok() { b } else { a };
    let msg = loser.unwrap_err().to_string();
    eprintln!("concurrent create-meta refused: {msg}");
    assert!(
        msg.contains("already exists") || msg.contains("being created"),
        "{msg}"
    );
    let cl = client_of(&c, &[0, 1, 2]);
    wait_voters(&cl, 3, LONG).await;
    // The three started nodes (the fourth joins later).
    let seeds = c
        .clients(0..3)
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let (ok, table, err) = quiver(&["status", "--seeds", &seeds]);
    assert!(ok, "{err}");
    assert!(table.contains("under-replicated (3/7)"), "{table}");
    let (ok, json, err) = quiver(&["status", "--json", "--seeds", &seeds]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ranges"][0]["under_replicated"], true);
    assert_eq!(v["ranges"][0]["voters"], 3);

    // --- bad input: each gets a typed error frame and a closed connection ---
    let peer = c.nodes[0].peer;
    let client_addr = c.nodes[0].client;
    let peer_err = |bytes: Vec<u8>| -> ControlError_Code {
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let p = proto::frame::FrameDecoder::new(1 << 20)
            .decode(&mut buf)
            .expect("a frame")
            .expect("a whole frame");
        let f: ControlFrame = proto::frame::decode_message(&p).expect("a control frame");
        match f.kind {
            Some(ControlFrame_oneof_kind::response(r)) => match r.kind {
                Some(ControlResponse_oneof_kind::error(e)) => e.code,
                other => panic!("expected an error, got {other:?}"),
            },
            other => panic!("expected a response, got {other:?}"),
        }
    };
    let client_err = |bytes: Vec<u8>| -> ClientError_Code {
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let p = proto::frame::FrameDecoder::new(1 << 20)
            .decode(&mut buf)
            .expect("a frame")
            .expect("a whole frame");
        let r: ClientResponse = proto::frame::decode_message(&p).expect("a client response");
        match r.kind {
            Some(ClientResponse_oneof_kind::error(e)) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    // Garbage on the peer port.
    let r = raw(peer, b"\x05\x00\x00\x00\xff\xff\xff\xff\xff");
    assert_eq!(peer_err(r), ControlError_Code::INVALID_ARGUMENT);
    // Oversized frames on both ports.
    let r = raw(peer, &(1u32 << 30).to_le_bytes());
    assert_eq!(peer_err(r), ControlError_Code::TOO_LARGE);
    let r = raw(client_addr, &(1u32 << 30).to_le_bytes());
    assert_eq!(client_err(r), ClientError_Code::TOO_LARGE);
    // Garbage on the client port.
    let r = raw(client_addr, b"\x03\x00\x00\x00\xff\xff\xff");
    assert_eq!(client_err(r), ClientError_Code::INVALID_ARGUMENT);
    // A client request sent to the peer port cannot reach peer operations.
    let mut req = proto::clientpb::ClientRequest::new();
    req.set_status(proto::clientpb::StatusRequest::new());
    let mut framed = Vec::new();
    proto::frame::encode_message(&req, 1 << 20, &mut framed).unwrap();
    assert_eq!(
        peer_err(raw(peer, &framed)),
        ControlError_Code::INVALID_ARGUMENT
    );

    // A peer without the secret: refused, and its proposal never applied.
    let wrong = seed::control::Dialer {
        cluster: "quiver".into(),
        secret: b"not-the-secret".to_vec(),
        from: 0,
        timeout: Duration::from_secs(5),
    };
    let txn = meta::ops::scratch_put(b"intruder", b"x").unwrap();
    let mut req = ControlRequest::new();
    let mut p = ProposeTxn::new();
    p.set_txn(txn.clone());
    req.set_propose(p);
    for n in &c.nodes[0..3] {
        let r = wrong.call(n.peer, req.clone()).await;
        assert!(r.is_err(), "unauthenticated peer must be refused: {r:?}");
    }
    // A peer that ignores the challenge and pipelines a made-up proof and a proposal:
    // refused by the server's check; the proposal is never read.
    let mut pipelined = Vec::new();
    let mut hello = proto::metapb::ControlHello::new();
    hello.version = 1;
    hello.cluster = "quiver".into();
    hello.from = 77;
    hello.nonce = vec![3u8; 32].into();
    let mut proof = proto::metapb::ControlProof::new();
    proof.proof = vec![0u8; 32].into();
    for kind in [
        ControlFrame_oneof_kind::hello(hello),
        ControlFrame_oneof_kind::proof(proof),
        ControlFrame_oneof_kind::request(req.clone()),
    ] {
        let mut f = ControlFrame::new();
        f.kind = Some(kind);
        proto::frame::encode_message(&f, 1 << 20, &mut pipelined).unwrap();
    }
    for n in &c.nodes[0..3] {
        let r = raw(n.peer, &pipelined);
        let mut buf = bytes::BytesMut::from(&r[..]);
        let mut dec = proto::frame::FrameDecoder::new(1 << 20);
        let mut kinds = Vec::new();
        while let Ok(Some(p)) = dec.decode(&mut buf) {
            let f: ControlFrame = proto::frame::decode_message(&p).unwrap();
            kinds.push(f.kind);
        }
        assert!(
            matches!(
                kinds.first(),
                Some(Some(ControlFrame_oneof_kind::challenge(_)))
            ),
            "{kinds:?}"
        );
        assert!(
            matches!(
                kinds.get(1),
                Some(Some(ControlFrame_oneof_kind::response(r)))
                    if matches!(r.kind, Some(ControlResponse_oneof_kind::error(_)))
            ),
            "refused after the bad proof: {kinds:?}"
        );
        assert_eq!(
            kinds.len(),
            2,
            "no answer to the pipelined request: {kinds:?}"
        );
    }
    // A raft-transport Hello with a wrong proof: refused by the transport's handshake.
    let mut hello = proto::peerpb::Hello::new();
    hello.version = 1;
    hello.cluster = "quiver".into();
    hello.from = 42;
    hello.to = 1;
    hello.nonce = vec![7u8; 32].into();
    let mut f = proto::peerpb::PeerFrame::new();
    f.set_hello(hello);
    let mut b = Vec::new();
    proto::frame::encode_message(&f, 4096, &mut b).unwrap();
    let r = raw(peer, &b);
    let mut buf = bytes::BytesMut::from(&r[..]);
    let challenge = proto::frame::FrameDecoder::new(4096)
        .decode(&mut buf)
        .unwrap();
    assert!(
        challenge.is_some(),
        "the transport answers Hello with a challenge (or refusal)"
    );
    // The server waits for a proof that cannot be made; the connection was closed without
    // anything delivered. The counters say the peers were refused.
    let admin = c.nodes[0].admin;
    let metrics = String::from_utf8_lossy(&raw(admin, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"))
        .into_owned();
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(counter("quiver_control_refused_total") >= 1, "{metrics}");
    assert!(counter("quiver_peer_bad_frames_total") >= 3, "{metrics}");
    assert!(counter("quiver_client_bad_frames_total") >= 2, "{metrics}");
    let live = String::from_utf8_lossy(&raw(admin, b"GET /livez HTTP/1.1\r\n\r\n")).into_owned();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let ready = String::from_utf8_lossy(&raw(admin, b"GET /readyz HTTP/1.1\r\n\r\n")).into_owned();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // Nothing of it applied, and the node still serves.
    assert!(cl.get(b"intruder", true).await.unwrap().is_none());
    write_read(&cl, "still-serving", "yes", Duration::from_secs(20)).await;

    // A fourth node joins: 4/7.
    c.start(3).unwrap();
    wait_voters(&cl, 4, LONG).await;
    let (ok, table, _) = quiver(&["status", "--seeds", &seeds]);
    assert!(ok && table.contains("under-replicated (4/7)"), "{table}");

    // Graceful shutdown on SIGTERM of meta's leader: it hands leadership over and exits by
    // itself; the others keep serving at once.
    let s = leader_status(&cl).await.expect("leader status");
    let li = index_of(&c, &s, s.meta_leader);
    let t = std::time::Instant::now();
    assert!(
        c.terminate(li, Duration::from_secs(10)),
        "node exits on SIGTERM"
    );
    let rest: Vec<usize> = (0..4).filter(|i| *i != li).collect();
    let cl = client_of(&c, &rest);
    write_read(&cl, "after-sigterm", "ok", Duration::from_secs(10)).await;
    eprintln!(
        "leader stopped and a successor served within {:?}",
        t.elapsed()
    );
    let s = leader_status(&cl).await.expect("a new leader");
    assert_ne!(s.meta_leader, 0);
}
