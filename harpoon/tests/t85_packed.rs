//! Packed entries (`Node::propose_packable`): packable proposals that reach a leader's shard
//! in the same round share one raft entry, and every caller still gets its own reply (its own
//! part's response at apply, or `LeaderDurable` in Async mode). Followers apply the same
//! parts in the same order, a restarted replica replays packed entries from its log to the
//! same state, Async packed entries are recovered as acknowledged after a restart (one write
//! per part), and a part too large for the log is refused alone.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use bytes::Bytes;
use common::WAIT;
use harpoon::storage::LogStore;
use harpoon::testkit::{wait_until, AppliedEntry, Cluster, ClusterOptions, LogStateMachine};
use harpoon::transport::mem::MemNetwork;
use harpoon::{Ack, CellId, Error, Guarantee, Node, NodeId, ReplicationMode, Reply, Role};

/// Queues `n` packable proposals `"{prefix}{i}"` on `node` before waiting for any (so they
/// reach the shard together), then waits for every answer, in order.
fn burst(
    node: &Node,
    cell: CellId,
    prefix: &str,
    n: usize,
) -> Vec<(Bytes, harpoon::Result<Reply>)> {
    let deadline = Instant::now() + WAIT;
    let pending: Vec<_> = (0..n)
        .map(|i| {
            let d = Bytes::from(format!("{prefix}{i}"));
            let p = node.propose_packable(cell, d.clone(), deadline, Ack::CellMode);
            (d, p)
        })
        .collect();
    pending.into_iter().map(|(d, p)| (d, p.wait())).collect()
}

/// Whether `r` is the recording state machine's reply to the caller of `d`: the index, then
/// `d` itself for a part of a packed entry; the index alone for a plain entry (a proposal
/// alone in its round is proposed plain). `Some(packed)` if so.
fn own_response(r: &Reply, d: &Bytes) -> Option<bool> {
    let b = r.response.as_ref()?;
    if b.len() < 8 || b[..8] != r.index.to_le_bytes() {
        return None;
    }
    if b.len() == 8 && !d.is_empty() {
        return Some(false);
    }
    (b[8..] == d[..]).then_some(true)
}

/// Replies of plain entries have an index of their own; packed ones share it.
fn check_shapes(shapes: &[(u64, bool)]) {
    for (i, packed) in shapes {
        let same = shapes.iter().filter(|(j, _)| j == i).count();
        assert_eq!(
            same > 1,
            *packed,
            "entry {i}: {same} replies, packed {packed}"
        );
    }
}

fn data_after(seq: &[AppliedEntry], index: u64) -> Vec<Bytes> {
    seq.iter()
        .filter(|e| e.index > index)
        .map(|e| e.data.clone())
        .collect()
}

#[test]
fn packable_proposals_share_entries_keep_order_and_get_their_own_replies() {
    let c = {
        let mut c = Cluster::new(3, ClusterOptions::default());
        c.create_cell(CellId(1), &[1, 2, 3], ReplicationMode::Consensus);
        c
    };
    let cell = CellId(1);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let before = c.status(leader, cell).unwrap().last_index;

    // One submitter, a burst: packed, applied in submission order.
    let n = 200;
    let replies = burst(c.node(leader), cell, "b", n);
    let mut indexes = BTreeSet::new();
    let mut shapes = Vec::new();
    for (d, r) in &replies {
        let r = r.as_ref().unwrap_or_else(|e| panic!("{d:?}: {e}"));
        assert_eq!(r.guarantee, Guarantee::Applied);
        let packed = own_response(r, d).unwrap_or_else(|| panic!("{d:?} got {r:?}"));
        shapes.push((r.index, packed));
        indexes.insert(r.index);
    }
    check_shapes(&shapes);
    // The pack counters count exactly the packed entries of the burst and their parts (summed
    // over the nodes: nothing else here is packable, whoever led).
    let (entries, parts, proposals) = (1..=3).fold((0, 0, 0), |(e, p, n), i| {
        let m = c.node(NodeId(i)).metrics();
        (e + m.packed_entries, p + m.packed_parts, n + m.proposals)
    });
    let packed: Vec<u64> = shapes.iter().filter(|s| s.1).map(|s| s.0).collect();
    let distinct: BTreeSet<u64> = packed.iter().copied().collect();
    assert_eq!(entries, distinct.len() as u64, "packed entries");
    assert_eq!(parts, packed.len() as u64, "packed parts");
    assert!(
        entries >= 1 && parts >= 2 * entries,
        "{parts} parts in {entries}"
    );
    assert!(parts <= proposals, "{parts} parts, {proposals} proposals");
    let after = c.status(leader, cell).unwrap().last_index;
    assert!(
        after - before < n as u64 && indexes.len() < n,
        "packed: {} entries for {n} proposals",
        after - before
    );
    // Replies carry the entry's position, and callers sharing it share an entry.
    assert!(indexes.iter().all(|i| (before + 1..=after).contains(i)));
    assert!(c.wait_applied(cell, after, WAIT));
    let seq = c.assert_prefixes(cell);
    let sent: Vec<Bytes> = replies.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(
        data_after(&seq, before),
        sent,
        "applied in submission order"
    );
    for e in seq.iter().filter(|e| e.index > before) {
        let (_, r) = replies.iter().find(|(d, _)| *d == e.data).unwrap();
        let r = r.as_ref().unwrap();
        assert_eq!((e.index, e.term), (r.index, r.term));
    }
    for f in 1..=3 {
        assert_eq!(
            c.applied(NodeId(f), cell),
            seq,
            "replica {f} equals the leader"
        );
    }

    // Many concurrent writers, each waiting for its own replies: every writer's proposals
    // apply in its own order, each with its own response.
    let before = c.status(leader, cell).unwrap().last_index;
    let writers = 8;
    let per = 25;
    let shapes: Vec<(u64, bool)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let node = c.node(leader);
                s.spawn(move || {
                    let mut shapes = Vec::new();
                    for i in 0..per {
                        let d = Bytes::from(format!("w{w}-{i}"));
                        let r = node
                            .propose_packable(cell, d.clone(), Instant::now() + WAIT, Ack::CellMode)
                            .wait()
                            .unwrap_or_else(|e| panic!("{d:?}: {e}"));
                        let packed =
                            own_response(&r, &d).unwrap_or_else(|| panic!("{d:?} got {r:?}"));
                        shapes.push((r.index, packed));
                    }
                    shapes
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    check_shapes(&shapes);
    let after = c.status(leader, cell).unwrap().last_index;
    assert!(c.wait_applied(cell, after, WAIT));
    let seq = c.assert_prefixes(cell);
    let applied = data_after(&seq, before);
    assert_eq!(applied.len(), writers * per);
    for w in 0..writers {
        let mine: Vec<Bytes> = applied
            .iter()
            .filter(|d| d.starts_with(format!("w{w}-").as_bytes()))
            .cloned()
            .collect();
        let sent: Vec<Bytes> = (0..per).map(|i| Bytes::from(format!("w{w}-{i}"))).collect();
        assert_eq!(mine, sent, "writer {w}'s order");
    }
    for f in 1..=3 {
        assert_eq!(
            c.applied(NodeId(f), cell),
            seq,
            "replica {f} equals the leader"
        );
    }
}

#[test]
fn a_part_too_large_is_refused_alone_and_packs_stay_within_their_bounds() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Consensus);
    let leader = c.wait_leader(cell, WAIT).unwrap();
    let node = c.node(leader);
    let deadline = Instant::now() + WAIT;
    // The test cluster's log refuses records above 4 MiB.
    let huge = Bytes::from(vec![b'h'; 5 << 20]);
    let big = Bytes::from(vec![b'g'; 100 << 10]);
    let datas = [
        Bytes::from_static(b"s0"),
        Bytes::from_static(b"s1"),
        huge.clone(),
        Bytes::from_static(b"s2"),
        big.clone(),
        big.clone(),
        big.clone(),
        big.clone(),
        big.clone(),
        Bytes::from_static(b"s3"),
    ];
    let pending: Vec<_> = datas
        .iter()
        .map(|d| node.propose_packable(cell, d.clone(), deadline, Ack::CellMode))
        .collect();
    let replies: Vec<_> = pending.into_iter().map(|p| p.wait()).collect();
    let mut per_index = std::collections::BTreeMap::<u64, usize>::new();
    for (d, r) in datas.iter().zip(&replies) {
        if d.len() == huge.len() {
            assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
            continue;
        }
        let r = r.as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert!(own_response(r, d).is_some(), "{r:?}");
        if d.len() == big.len() {
            *per_index.entry(r.index).or_default() += d.len();
        }
    }
    // At most 256 KiB of data per packed entry: five 100 KiB parts need three entries.
    assert!(
        per_index.values().all(|b| *b <= harpoon::MAX_PACK_DATA),
        "{per_index:?}"
    );
    assert!(per_index.len() >= 3, "{per_index:?}");
    let last = c.status(leader, cell).unwrap().last_index;
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    assert!(seq.iter().all(|e| e.data != huge));
    let small: Vec<&Bytes> = seq
        .iter()
        .map(|e| &e.data)
        .filter(|d| d.len() < 8)
        .collect();
    assert_eq!(small, vec!["s0", "s1", "s2", "s3"]);
}

/// Waits until leader `l` applied its own term's first entry (its Async writes are answered
/// at LeaderDurable from then on).
fn term_started(c: &Cluster, l: NodeId, cell: CellId) {
    let last = c.status(l, cell).unwrap().last_index;
    assert!(wait_until(WAIT, || c
        .status(l, cell)
        .is_some_and(|s| s.applied >= last)));
}

#[test]
fn async_packed_entries_are_acknowledged_durable_and_recovered_after_a_restart() {
    let mut c = Cluster::new(3, ClusterOptions::default());
    let cell = CellId(1);
    c.create_cell(cell, &[1, 2, 3], ReplicationMode::Async);
    let old = c.wait_leader(cell, WAIT).unwrap();
    term_started(&c, old, cell);
    let safe = burst(c.node(old), cell, "safe", 40);
    for (_, r) in &safe {
        let r = r.as_ref().unwrap();
        assert_eq!(r.guarantee, Guarantee::LeaderDurable);
        assert!(r.response.is_none());
    }
    let idx = c.status(old, cell).unwrap().last_index;
    assert!(c.wait_applied(cell, idx, WAIT));

    // Acknowledged by an isolated leader, then lost: counted per write, also after the old
    // leader restarts (its packed entries name it, so the acks are recovered from its log).
    c.isolate(old);
    let before = c.status(old, cell).unwrap().last_index;
    let doomed = burst(c.node(old), cell, "doomed", 60);
    for (_, r) in &doomed {
        assert_eq!(r.as_ref().unwrap().guarantee, Guarantee::LeaderDurable);
    }
    let entries = c.status(old, cell).unwrap().last_index - before;
    assert!(entries < 60, "{entries} entries for 60 writes");
    let others: Vec<NodeId> = (1..=3).map(NodeId).filter(|n| *n != old).collect();
    let mut new = None;
    assert!(wait_until(WAIT, || {
        new = others
            .iter()
            .copied()
            .find(|n| c.status(*n, cell).is_some_and(|s| s.role == Role::Leader));
        new.is_some()
    }));
    let new = new.unwrap();
    term_started(&c, new, cell);
    // Enough later entries to cover every slot the doomed entries held.
    for i in 0..(entries + 5) {
        let r = c
            .node(new)
            .propose(cell, Bytes::from(format!("later{i}")))
            .wait()
            .unwrap();
        assert_eq!(r.guarantee, Guarantee::LeaderDurable);
    }
    c.kill(old);
    c.heal();
    c.restart(old);
    let last = c.status(new, cell).unwrap().last_index;
    assert!(c.wait_applied(cell, last, WAIT));
    let seq = c.assert_prefixes(cell);
    let applied: HashSet<&Bytes> = seq.iter().map(|e| &e.data).collect();
    assert!(safe.iter().all(|(d, _)| applied.contains(d)));
    assert!(doomed.iter().all(|(d, _)| !applied.contains(d)));
    for n in 1..=3 {
        assert_eq!(c.applied(NodeId(n), cell), seq, "replica {n} agrees");
    }
    let m = c.node(old).metrics();
    assert_eq!(m.async_lost, doomed.len() as u64, "{m:?}");
    assert_eq!(c.status(old, cell).unwrap().async_lost, doomed.len() as u64);
}

fn log_config() -> seglog::Config {
    seglog::Config {
        segment_size: 8 << 20,
        max_record_size: 4 << 20,
        ..seglog::Config::default()
    }
}

/// Starts node 1 alone over the raft log in `dir` and opens its cell with the recording state
/// machine at `sm`; waits until it leads and applied `applied`.
fn single(
    net: &MemNetwork,
    dir: &std::path::Path,
    sm: &std::path::Path,
) -> (Node, harpoon::testkit::LogHandle) {
    let (log, _) = LogStore::open(dir.join("raft"), log_config()).unwrap();
    let node = Node::start(
        NodeId(1),
        ClusterOptions::default().node,
        log,
        net.transport(NodeId(1)),
    )
    .unwrap();
    net.register(NodeId(1), node.sink());
    let (sm, h) = LogStateMachine::open(sm).unwrap();
    node.create_cell(
        CellId(1),
        &[NodeId(1)],
        &[],
        ReplicationMode::Consensus,
        Box::new(sm),
    )
    .wait()
    .unwrap();
    assert!(wait_until(WAIT, || node
        .status(CellId(1))
        .wait()
        .is_ok_and(
            |s| s.role == Role::Leader && s.applied >= s.last_index
        )));
    (node, h)
}

#[test]
fn a_restarted_replica_replays_packed_entries_from_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let sm = dir.path().join("cell.sm");
    let early = dir.path().join("cell.sm.early");
    let net = MemNetwork::new(1);
    let cell = CellId(1);
    let (node, h) = single(&net, dir.path(), &sm);
    let first = burst(&node, cell, "a", 30);
    assert!(first.iter().all(|(_, r)| r.is_ok()));
    // The state machine as it was here: what a crash before its later writes leaves.
    std::fs::copy(&sm, &early).unwrap();
    let at = h.apply_state().applied_index;
    let second = burst(&node, cell, "b", 120);
    assert!(second.iter().all(|(_, r)| r.is_ok()));
    let status = node.status(cell).wait().unwrap();
    assert!(status.last_index - at < 120, "packed");
    let want = h.entries();
    node.shutdown();

    // Back to the early state machine: the node replays the packed entries from its log.
    std::fs::rename(&early, &sm).unwrap();
    let (node, h) = single(&net, dir.path(), &sm);
    assert!(wait_until(WAIT, || h.apply_state().applied_index >= status.last_index));
    let got: Vec<AppliedEntry> = h
        .entries()
        .into_iter()
        .filter(|e| e.index <= status.last_index)
        .collect();
    assert_eq!(got, want);
    node.shutdown();
}
