//! Write-path benchmark of one 3-member Harpoon cell with durable raft logs (seglog, fsync on).
//!
//! Measures proposals/s, p50/p99 latency and fsyncs per 1,000 proposals with 1 and 64
//! concurrent proposers on one cell, and 64 proposers spread over 16 cells (one sync per
//! round for every cell touched); then 64 proposers on one cell proposing *packable*
//! (`Node::propose_packable`: the proposals a shard drains in one round share a raft entry),
//! the consensus core's ceiling for a write path like Quiver's. Consensus mode: each reply
//! waits for quorum commit + apply.
//!
//! Run: `cargo bench -p harpoon --bench cell`. Env: `BENCH_SECS` (default 5 s per row),
//! `BENCH_TRANSPORT=tcp|mem` (default both: TCP on 127.0.0.1, then the in-process network).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harpoon::storage::LogStore;
use harpoon::transport::mem::MemNetwork;
use harpoon::transport::tcp::{TcpConfig, TcpTransport};
use harpoon::transport::Transport;
use harpoon::{
    Ack, ApplyState, CellId, EntryRef, Node, NodeConfig, NodeId, ReplicationMode, Role, SmSnapshot,
    StateMachine, StateMachineError,
};
use hdrhistogram::Histogram;
use raft::eraftpb::ConfState;

/// A state machine that only counts (the bench measures consensus, not data).
#[derive(Default)]
struct CountingSm {
    state: ApplyState,
}

impl StateMachine for CountingSm {
    fn apply(&mut self, e: EntryRef<'_>) -> Result<Bytes, StateMachineError> {
        self.state.applied_index = e.index;
        self.state.applied_term = e.term;
        Ok(Bytes::new())
    }
    fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        cs: &ConfState,
    ) -> Result<(), StateMachineError> {
        self.state.applied_index = index;
        self.state.applied_term = term;
        self.state.conf_state = cs.clone();
        Ok(())
    }
    fn set_commit(&mut self, index: u64, term: u64) {
        self.state.commit_index = index;
        self.state.commit_term = term;
    }
    fn apply_state(&self) -> ApplyState {
        self.state.clone()
    }
    fn snapshot(&mut self) -> Result<SmSnapshot, StateMachineError> {
        Ok(SmSnapshot {
            state: self.state.clone(),
            data: Bytes::new(),
        })
    }
    fn restore(&mut self, s: &SmSnapshot) -> Result<(), StateMachineError> {
        self.state = s.state.clone();
        Ok(())
    }
    fn apply_packed(
        &mut self,
        index: u64,
        term: u64,
        parts: &[&[u8]],
    ) -> Result<Vec<Bytes>, StateMachineError> {
        self.state.applied_index = index;
        self.state.applied_term = term;
        Ok(vec![Bytes::new(); parts.len()])
    }
}

struct Row {
    packable: bool,
    concurrency: usize,
    proposals: u64,
    secs: f64,
    hist: Histogram<u64>,
    cells: u64,
    /// Syncs of the node that synced most (the leader for one cell).
    max_node_syncs: u64,
    all_syncs: u64,
}

/// How the three nodes talk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Net {
    Mem,
    Tcp,
}

/// Start node `id` of 3 on `net`; returns the node and, for TCP, its transport (kept alive).
fn start_node(
    id: NodeId,
    net: Net,
    mem: &MemNetwork,
    tcp: &TcpSetup,
    cfg: &NodeConfig,
    store: LogStore,
) -> (Node, Option<Arc<TcpTransport>>) {
    match net {
        Net::Mem => {
            let node = Node::start(id, cfg.clone(), store, mem.transport(id)).expect("start");
            mem.register(id, node.sink());
            (node, None)
        }
        Net::Tcp => {
            let mut slot = None;
            let node = Node::start_with(id, cfg.clone(), store, |sink| {
                let t = Arc::new(TcpTransport::new(
                    id,
                    TcpConfig {
                        cluster_secret: b"bench".to_vec(),
                        ..TcpConfig::default()
                    },
                    sink,
                    tcp.rt.handle().clone(),
                )?);
                slot = Some(t.clone());
                Ok::<Arc<dyn Transport>, harpoon::transport::tcp::TcpConfigError>(t)
            })
            .expect("start");
            let t = slot.expect("transport built");
            let i = (id.get() - 1) as usize;
            let listener = tcp.listeners[i].lock().take().expect("listener");
            {
                let _g = tcp.rt.enter();
                t.serve(listener);
            }
            for (j, a) in tcp.addrs.iter().enumerate() {
                if j != i {
                    t.set_peer_address(NodeId(j as u64 + 1), *a);
                }
            }
            (node, Some(t))
        }
    }
}

struct TcpSetup<'a> {
    rt: &'a tokio::runtime::Runtime,
    listeners: Vec<parking_lot::Mutex<Option<tokio::net::TcpListener>>>,
    addrs: Vec<std::net::SocketAddr>,
}

fn run(
    net: Net,
    cells: u64,
    concurrency: usize,
    packable: bool,
    secs: u64,
    rt: &tokio::runtime::Runtime,
) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = NodeConfig {
        tick_interval: Duration::from_millis(50),
        ..NodeConfig::default()
    };
    let mem = MemNetwork::new(1);
    let listeners: Vec<_> = (0..3)
        .map(|_| {
            rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("bind")
        })
        .collect();
    let tcp = TcpSetup {
        rt,
        addrs: listeners
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect(),
        listeners: listeners
            .into_iter()
            .map(|l| parking_lot::Mutex::new(Some(l)))
            .collect(),
    };
    let mut nodes = Vec::new();
    let mut stores = Vec::new();
    let mut transports = Vec::new();
    for i in 1..=3u64 {
        let id = NodeId(i);
        let (store, _) = LogStore::open(
            dir.path().join(format!("n{}", id.get())),
            seglog::Config::default(),
        )
        .expect("open log");
        stores.push(store.clone());
        let (node, t) = start_node(id, net, &mem, &tcp, &cfg, store);
        transports.push(t);
        nodes.push(Arc::new(node));
    }
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut leaders = Vec::new();
    for c in 1..=cells {
        let cell = CellId(c);
        for n in &nodes {
            n.create_cell(
                cell,
                &voters,
                &[],
                ReplicationMode::Consensus,
                Box::new(CountingSm::default()),
            )
            .wait()
            .expect("create");
        }
        let leader = loop {
            if let Some(n) = nodes
                .iter()
                .find(|n| n.status(cell).wait().is_ok_and(|s| s.role == Role::Leader))
            {
                break n.clone();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Warm up (and let the leader commit its first entry).
        for _ in 0..20 {
            let _ = leader.propose(cell, Bytes::from_static(&[0u8; 128])).wait();
        }
        leaders.push((cell, leader));
    }
    let syncs0: Vec<u64> = stores.iter().map(|s| s.stats().syncs).collect();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let hists = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..concurrency {
            let (cell, leader) = leaders[i % leaders.len()].clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
                let payload = Bytes::from(vec![7u8; 128]);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let r = if packable {
                        leader
                            .propose_packable(cell, payload.clone(), deadline, Ack::CellMode)
                            .await
                    } else {
                        leader.propose(cell, payload.clone()).await
                    };
                    if r.is_ok() {
                        let _ = h.record(t.elapsed().as_micros() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                h
            }));
        }
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
        for t in tasks {
            if let Ok(h) = t.await {
                let _ = all.add(&h);
            }
        }
        all
    });
    let elapsed = start.elapsed().as_secs_f64();
    let syncs1: Vec<u64> = stores.iter().map(|s| s.stats().syncs).collect();
    let row = Row {
        packable,
        concurrency,
        proposals: done.load(Ordering::Relaxed),
        secs: elapsed,
        hist: hists,
        cells,
        max_node_syncs: syncs1
            .iter()
            .zip(&syncs0)
            .map(|(a, b)| a - b)
            .max()
            .unwrap_or(0),
        all_syncs: syncs1.iter().sum::<u64>() - syncs0.iter().sum::<u64>(),
    };
    drop(leaders);
    for n in nodes {
        if let Ok(n) = Arc::try_unwrap(n) {
            n.shutdown();
        }
    }
    for t in transports.into_iter().flatten() {
        t.shutdown();
    }
    row
}

fn main() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let nets: Vec<Net> = match std::env::var("BENCH_TRANSPORT").as_deref() {
        Ok("mem") => vec![Net::Mem],
        Ok("tcp") => vec![Net::Tcp],
        _ => vec![Net::Tcp, Net::Mem],
    };
    println!(
        "harpoon cell bench: 3 members in one process, seglog raft logs with fdatasync, \
         128 B proposals, Consensus mode, {secs} s per row"
    );
    println!(
        "{:>9} | {:>5} | {:>9} | {:>8} | {:>10} | {:>11} | {:>8} | {:>8} | {:>15} | {:>13}",
        "transport",
        "cells",
        "proposers",
        "packable",
        "proposals",
        "proposals/s",
        "p50 us",
        "p99 us",
        "max node sync/1k",
        "all fsyncs/1k"
    );
    let rows = [
        (1u64, 1usize, false),
        (1, 64, false),
        (16, 64, false),
        (1, 64, true),
    ];
    for (net, (cells, c, packable)) in nets
        .iter()
        .flat_map(|n| rows.into_iter().map(move |r| (*n, r)))
    {
        let r = run(net, cells, c, packable, secs, &rt);
        let per_k = |s: u64| s as f64 * 1000.0 / r.proposals.max(1) as f64;
        println!(
            "{:>9} | {:>5} | {:>9} | {:>8} | {:>10} | {:>11.0} | {:>8} | {:>8} | {:>15.1} | {:>13.1}",
            format!("{net:?}").to_lowercase(),
            r.cells,
            r.concurrency,
            if r.packable { "yes" } else { "no" },
            r.proposals,
            r.proposals as f64 / r.secs,
            r.hist.value_at_quantile(0.5),
            r.hist.value_at_quantile(0.99),
            per_k(r.max_node_syncs),
            per_k(r.all_syncs),
        );
    }
}
