//! A seeded nemesis run: 5 members over a lossy network (drops, duplicates, reorders, delays)
//! with partitions, isolations and kill/restart from disk, while clients append unique values
//! and readers do lease and ReadIndex reads. The history is checked with `checker::append`:
//! no acknowledged write lost or duplicated, acknowledged positions right, no stale or
//! mismatched read, replicas prefixes of one another.
//!
//! Knobs: `NEMESIS_SEED` (default 42) replays a run (thread interleavings aside);
//! `NEMESIS_NO_KILL` keeps every node up; `NEMESIS_MEM` uses in-memory raft logs.
//!
//! Regression: this test found raft-rs 0.7's `batch_append` merging entries into an empty
//! queued MsgAppend (followers acknowledged entries they did not have); see `config.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use checker::append::check_append;
use checker::history::{AppendHistory, AppendOp, AppendOut, Outcome};
use harpoon::testkit::{Cluster, ClusterOptions};
use harpoon::transport::mem::{Delay, Faults};
use harpoon::{CellId, Error, NodeId, ReadConsistency, ReplicationMode};
use parking_lot::{Mutex, RwLock};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const WAIT: Duration = Duration::from_secs(30);
const N: u64 = 5;

/// A raw record: (process, invoke, complete, op, outcome with raft index for appends).
type Raw = (u64, Instant, Instant, AppendOp, Outcome<RawOut>);

#[derive(Clone)]
enum RawOut {
    /// Acknowledged at this raft index.
    Raft(u64),
    Values(Vec<u64>),
}

fn value_of(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_le_bytes)
}

#[test]
fn nemesis_history_is_valid() {
    let seed: u64 = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    let opts = ClusterOptions {
        seed,
        durable: std::env::var("NEMESIS_MEM").is_err(),
        ..ClusterOptions::default()
    };
    let mut c = Cluster::new(N, opts);
    let cell = CellId(1);
    c.create_cell(
        cell,
        &(1..=N).collect::<Vec<_>>(),
        ReplicationMode::Consensus,
    );
    c.wait_leader(cell, WAIT).expect("leader");
    c.net.set_faults(Faults {
        drop: 0.02,
        duplicate: 0.02,
        reorder: 0.02,
        delay: Some(Delay::Uniform {
            min: Duration::ZERO,
            max: Duration::from_millis(3),
        }),
    });
    let c = RwLock::new(c);
    let raw: Mutex<Vec<Raw>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let run_for = Duration::from_secs(4);

    std::thread::scope(|s| {
        for p in 0..3u64 {
            let (c, raw, stop) = (&c, &raw, &stop);
            s.spawn(move || {
                let mut guess = NodeId(1);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let value = (p + 1) * 1_000_000 + i;
                    i += 1;
                    let invoke = Instant::now();
                    let pending = {
                        let g = c.read();
                        let Some(n) = g.try_node(guess) else {
                            guess = NodeId(guess.get() % N + 1);
                            continue;
                        };
                        n.propose_by(
                            cell,
                            Bytes::copy_from_slice(&value.to_le_bytes()),
                            Instant::now() + Duration::from_secs(1),
                        )
                    };
                    let outcome = match pending.wait() {
                        Ok(r) => Outcome::Ok(RawOut::Raft(r.index)),
                        Err(Error::NotLeader { leader_hint, .. }) => {
                            guess = leader_hint.unwrap_or(NodeId(guess.get() % N + 1));
                            Outcome::Fail
                        }
                        Err(
                            Error::Busy { .. }
                            | Error::ProposalDropped { .. }
                            | Error::CellNotFound { .. },
                        ) => Outcome::Fail,
                        Err(_) => {
                            guess = NodeId(guess.get() % N + 1);
                            Outcome::Unknown
                        }
                    };
                    let failed = outcome.is_fail();
                    raw.lock().push((
                        p,
                        invoke,
                        Instant::now(),
                        AppendOp::Append { value },
                        outcome,
                    ));
                    if failed {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            });
        }
        {
            let (c, raw, stop) = (&c, &raw, &stop);
            s.spawn(move || {
                let mut guess = NodeId(1);
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let consistency = if k.is_multiple_of(2) {
                        ReadConsistency::Lease
                    } else {
                        ReadConsistency::ReadIndex
                    };
                    let invoke = Instant::now();
                    let (pending, handle) = {
                        let g = c.read();
                        let Some(n) = g.try_node(guess) else {
                            guess = NodeId(guess.get() % N + 1);
                            continue;
                        };
                        (
                            n.read_barrier(
                                cell,
                                consistency,
                                Instant::now() + Duration::from_secs(1),
                            ),
                            g.handle(guess, cell),
                        )
                    };
                    let outcome = match (pending.wait(), handle) {
                        (Ok(at), Some(h)) => Outcome::Ok(RawOut::Values(
                            h.entries()
                                .iter()
                                .filter(|e| e.index <= at)
                                .filter_map(|e| value_of(&e.data))
                                .collect(),
                        )),
                        (Err(Error::NotLeader { leader_hint, .. }), _) => {
                            guess = leader_hint.unwrap_or(NodeId(guess.get() % N + 1));
                            Outcome::Fail
                        }
                        _ => {
                            guess = NodeId(guess.get() % N + 1);
                            Outcome::Fail
                        }
                    };
                    raw.lock().push((
                        100,
                        invoke,
                        Instant::now(),
                        AppendOp::Read { from: 0, to: None },
                        outcome,
                    ));
                    std::thread::sleep(Duration::from_millis(3));
                }
            });
        }
        // The nemesis.
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut down: Option<NodeId> = None;
        while start.elapsed() < run_for {
            let n = NodeId(rng.gen_range(1..=N));
            match rng.gen_range(0..4) {
                0 => c.read().isolate(n),
                1 => {
                    let mut ids: Vec<NodeId> = (1..=N).map(NodeId).collect();
                    ids.rotate_left(rng.gen_range(0..N as usize));
                    let (a, b) = ids.split_at(2);
                    c.read().partition(&[a, b]);
                }
                2 => {
                    if down.is_none() && std::env::var("NEMESIS_NO_KILL").is_err() {
                        c.write().kill(n);
                        down = Some(n);
                    }
                }
                _ => {
                    c.read().heal();
                    if let Some(d) = down.take() {
                        c.write().restart(d);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(100..400)));
            if rng.gen_bool(0.5) {
                c.read().heal();
            }
        }
        c.read().heal();
        if let Some(d) = down.take() {
            c.write().restart(d);
        }
        stop.store(true, Ordering::Relaxed);
    });

    let c = c.into_inner();
    c.net.clear_faults();
    c.heal();
    // A final write commits everything the leader has; every replica applies it.
    let fin = c
        .propose_retry(cell, Bytes::copy_from_slice(&u64::MAX.to_le_bytes()), WAIT)
        .expect("final write");
    assert!(c.wait_applied(cell, fin.index, WAIT), "replicas converge");

    let finals: Vec<(u64, Vec<harpoon::testkit::AppliedEntry>)> =
        (1..=N).map(|n| (n, c.applied(NodeId(n), cell))).collect();
    let longest = finals
        .iter()
        .max_by_key(|(_, s)| s.len())
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    let pos_of = |raft: u64| {
        longest
            .iter()
            .position(|e| e.index == raft)
            .map(|p| p as u64)
            .unwrap_or(u64::MAX)
    };
    let mut records = raw.into_inner();
    records.sort_by_key(|r| r.1);
    let mut history = AppendHistory::new();
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    for (p, invoke, complete, op, outcome) in records {
        let outcome = match outcome {
            Outcome::Ok(RawOut::Raft(i)) => Outcome::Ok(AppendOut::Index(pos_of(i))),
            Outcome::Ok(RawOut::Values(v)) => Outcome::Ok(AppendOut::Values(v)),
            Outcome::Fail => Outcome::Fail,
            Outcome::Unknown => Outcome::Unknown,
        };
        history.push(p, ns(invoke), ns(complete), op, outcome);
    }
    // The final write is part of the history too.
    history.push(
        99,
        ns(Instant::now()),
        ns(Instant::now()),
        AppendOp::Append { value: u64::MAX },
        Outcome::Ok(AppendOut::Index(pos_of(fin.index))),
    );
    let final_reads: Vec<(u64, Vec<u64>)> = finals
        .iter()
        .map(|(n, s)| (*n, s.iter().filter_map(|e| value_of(&e.data)).collect()))
        .collect();
    let (ok, fail, unknown) = history.outcome_counts();
    let report = check_append(&history, &final_reads);
    println!("seed {seed}: {ok} ok, {fail} fail, {unknown} unknown ops\n{report}");
    assert!(ok > 50, "the run made progress: {ok} acknowledged ops");
    assert!(report.is_valid(), "seed {seed}:\n{report}");
}
