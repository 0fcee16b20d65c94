//! A 3-member cell over the TCP transport on 127.0.0.1 (ports picked by the OS): election,
//! replication, leader killed and a new one elected with no acknowledged write lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harpoon::storage::LogStore;
use harpoon::testkit::{wait_until, LogHandle, LogStateMachine};
use harpoon::transport::tcp::{TcpConfig, TcpTransport};
use harpoon::transport::Transport;
use harpoon::{CellId, Node, NodeConfig, NodeId, ReplicationMode, Reply, Role};

const WAIT: Duration = Duration::from_secs(30);

struct Member {
    node: Node,
    tcp: Arc<TcpTransport>,
    handle: LogHandle,
}

fn leader(members: &[Option<Member>], cell: CellId) -> Option<usize> {
    members
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((i, m.as_ref()?.node.status(cell).wait().ok()?)))
        .filter(|(_, s)| s.role == Role::Leader)
        .max_by_key(|(_, s)| s.term)
        .map(|(i, _)| i)
}

#[test]
fn three_members_over_tcp_fail_over_without_losing_writes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let listeners: Vec<_> = ids
        .iter()
        .map(|_| {
            rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap()
        })
        .collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let cfg = NodeConfig {
        tick_interval: Duration::from_millis(10),
        ..NodeConfig::default()
    };
    let cell = CellId(1);
    let mut members: Vec<Option<Member>> = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = ids[i];
        let (log, _) = LogStore::open(
            dir.path().join(format!("n{i}")),
            seglog::Config {
                segment_size: 8 << 20,
                max_record_size: 4 << 20,
                ..seglog::Config::default()
            },
        )
        .unwrap();
        let mut slot = None;
        let node = Node::start_with(id, cfg.clone(), log, |sink| {
            let t = Arc::new(TcpTransport::new(
                id,
                TcpConfig {
                    cluster_secret: b"test secret".to_vec(),
                    ..TcpConfig::default()
                },
                sink,
                rt.handle().clone(),
            )?);
            slot = Some(t.clone());
            Ok::<Arc<dyn Transport>, harpoon::transport::tcp::TcpConfigError>(t)
        })
        .unwrap();
        let tcp = slot.unwrap();
        let _guard = rt.enter();
        tcp.serve(listener);
        for (j, a) in addrs.iter().enumerate() {
            if j != i {
                tcp.set_peer_address(ids[j], *a);
            }
        }
        let (sm, handle) = LogStateMachine::open(dir.path().join(format!("sm{i}"))).unwrap();
        node.create_cell(cell, &ids, &[], ReplicationMode::Consensus, Box::new(sm))
            .wait()
            .unwrap();
        members.push(Some(Member { node, tcp, handle }));
    }

    let mut acked: Vec<(Bytes, Reply)> = Vec::new();
    let write = |members: &[Option<Member>], acked: &mut Vec<(Bytes, Reply)>, p: &str| {
        for i in 0..20 {
            let d = Bytes::from(format!("{p}{i}"));
            let deadline = Instant::now() + WAIT;
            loop {
                let l = leader(members, cell);
                let r = l.and_then(|l| {
                    members[l]
                        .as_ref()
                        .unwrap()
                        .node
                        .propose(cell, d.clone())
                        .wait()
                        .ok()
                });
                if let Some(r) = r {
                    acked.push((d, r));
                    break;
                }
                assert!(Instant::now() < deadline, "write {p}{i} never succeeded");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert!(wait_until(WAIT, || leader(&members, cell).is_some()));
    write(&members, &mut acked, "a");
    let old = leader(&members, cell).unwrap();
    if let Some(m) = members[old].take() {
        m.tcp.shutdown();
        m.node.shutdown();
    }
    assert!(wait_until(WAIT, || leader(&members, cell).is_some()));
    write(&members, &mut acked, "b");
    let last = acked.last().unwrap().1.index;
    assert!(wait_until(WAIT, || members.iter().flatten().all(|m| m
        .handle
        .apply_state()
        .applied_index
        >= last)));
    let seqs: Vec<_> = members
        .iter()
        .flatten()
        .map(|m| m.handle.entries())
        .collect();
    assert_eq!(seqs[0], seqs[1]);
    for (d, r) in &acked {
        let n = seqs[0].iter().filter(|e| e.data == d).count();
        assert_eq!(n, 1, "{d:?}");
        assert!(seqs[0]
            .iter()
            .any(|e| e.index == r.index && e.term == r.term));
    }
    for m in members.into_iter().flatten() {
        m.tcp.shutdown();
        m.node.shutdown();
    }
}
