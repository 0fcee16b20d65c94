//! A three-node cluster runs meta under-replicated (3/7) until a fourth node joins; peers
//! without the secret and garbage or oversized frames on both ports are refused while the
//! node keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use proto::metapb::{ControlRequest, ProposeTxn};
use protobuf::Message;

fn quiver(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(args)
        .output()
        .expect("run quiver");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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
    let dir = tempfile::Builder::new()
        .prefix("quiver-test-")
        .tempdir()
        .unwrap();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_quiver"));
    let mut c = cli::demo::LocalCluster::new(exe, dir.path().to_path_buf(), 4, fast()).unwrap();
    for i in 0..3 {
        c.start(i).unwrap();
    }
    create_meta(&c, 0).await;
    let cl = client_of(&c, &[0, 1, 2]);
    wait_voters(&cl, 3, LONG).await;
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

    // --- bad input ---
    let peer = c.nodes[0].peer;
    let client_addr = c.nodes[0].client;
    // Garbage on the peer port: an error frame, then close.
    let r = raw(peer, b"\x05\x00\x00\x00hello garbage that is not protobuf");
    assert!(!r.is_empty(), "peer port answers garbage with an error");
    // Oversized frame header on both ports.
    let r = raw(peer, &(1u32 << 30).to_le_bytes());
    assert!(String::from_utf8_lossy(&r).contains("too large") || !r.is_empty());
    let r = raw(client_addr, &(1u32 << 30).to_le_bytes());
    assert!(
        !r.is_empty(),
        "client port answers an oversized frame with an error"
    );
    let r = raw(client_addr, b"\x03\x00\x00\x00\xff\xff\xff");
    assert!(!r.is_empty(), "client port answers garbage with an error");
    // A client speaking to the peer port cannot reach peer operations.
    let mut req = proto::clientpb::ClientRequest::new();
    req.set_status(proto::clientpb::StatusRequest::new());
    let mut framed = Vec::new();
    proto::frame::encode_message(&req, 1 << 20, &mut framed).unwrap();
    let r = raw(peer, &framed);
    assert!(!r.is_empty());

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
    let _ = raw(peer, &b);
    // Nothing of it applied, and the node still serves.
    assert!(cl.get(b"intruder", true).await.unwrap().is_none());
    write_read(&cl, "still-serving", "yes", Duration::from_secs(20)).await;
    let _ = txn.write_to_bytes();

    // A fourth node joins: 4/7.
    c.start(3).unwrap();
    wait_voters(&cl, 4, LONG).await;
    let (ok, table, _) = quiver(&["status", "--seeds", &seeds]);
    assert!(ok && table.contains("under-replicated (4/7)"), "{table}");

    // Graceful shutdown on SIGTERM.
    assert!(
        c.terminate(3, Duration::from_secs(10)),
        "node exits on SIGTERM"
    );
}
