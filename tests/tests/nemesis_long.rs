//! The long nemesis run, by hand: `cargo test -p quiver-tests --release -- --ignored
//! --nocapture`. Many seeds (`QUIVER_NEMESIS_RUNS`, default 6), each fault kind 3 times per
//! run (long kills past a 6 s dead-after included), on 5 nodes; prints each run and the
//! totals. `QUIVER_NEMESIS_SEED` sets the first seed.

use std::time::Duration;

use quiver_tests::workload::{Target, WorkloadConfig};
use quiver_tests::{run_nemesis, seed_from_env, RunConfig, Totals};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: minutes; run by hand with --ignored"]
async fn nemesis_long_many_seeds() {
    let runs: u64 = std::env::var("QUIVER_NEMESIS_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let first = seed_from_env(0x1000);
    let mut totals = Totals::default();
    let mut failed = Vec::new();
    for s in first..first + runs {
        // Alternate targets: a KV collection, and meta's scratch space every third seed.
        let mut cfg = RunConfig::new(s, 5, 3);
        cfg.dead_after = Some(Duration::from_secs(6));
        cfg.split_size = Some("64KiB".into());
        if s % 3 == 2 {
            cfg.workload.target = Target::Scratch;
        }
        let r = run_nemesis(&cfg).await;
        eprintln!("target={:?} {r}", cfg.workload.target);
        totals.add(&r);
        if !r.passed() {
            failed.push(s);
        }
    }
    eprintln!("TOTAL {totals}");
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

/// The planted-bug control under the random nemesis: reads of meta's scratch space from any
/// node's local replica (no ReadIndex, a random node per read) must be caught in at least one
/// of 3 seeds. (A KV collection's `ReadMode::Follower` is no control: a client that also writes
/// caches the range leader and sends its follower reads there; 3 seeds caught nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by hand with --ignored"]
async fn nemesis_catches_planted_stale_reads() {
    let first = seed_from_env(0x2000);
    let mut caught = 0;
    for s in first..first + 3 {
        let cfg = RunConfig {
            seed: s,
            nodes: 5,
            rounds: 1,
            workload: WorkloadConfig {
                target: Target::Scratch,
                stale_reads: true,
                ..WorkloadConfig::default()
            },
            appends: None,
            split_size: None,
            dead_after: None,
        };
        let r = run_nemesis(&cfg).await;
        eprintln!("planted: {}", r.summary());
        if r.anomalies() > 0 {
            caught += 1;
        }
    }
    assert!(caught > 0, "stale reads were never caught in 3 runs");
}
