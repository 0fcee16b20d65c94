//! CI-sized nemesis run: 5 real nodes, every fault kind once on a seeded schedule, under a
//! put/get/cas workload and an append workload on a KV collection with 5 replicas and a 32 KiB
//! split size (a filler grows it ~4 KiB/s, so its range splits during the run; splits count as
//! faults); 0 anomalies,
//! 0 lost acknowledged writes, every replica's append sequence a prefix of the others'.
//! Replay a failing run with `QUIVER_NEMESIS_SEED=<seed>`. (Long kills, which remove a member
//! and wait for its refill, run in `nemesis_long.rs`: they need `dead-after` plus a refill.)

use quiver_tests::{run_nemesis, seed_from_env, RunConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_ci_five_nodes_every_fault_kind() {
    let mut cfg = RunConfig::new(seed_from_env(0x5eed_0001), 5, 1);
    cfg.split_size = Some("32KiB".into());
    let r = run_nemesis(&cfg).await;
    eprintln!("{r}");
    eprintln!("fault log:\n{}", r.faults);
    assert!(r.check.operations > 200, "too little load: {}", r.summary());
    assert!(
        r.faults.by_kind.get("split").copied().unwrap_or(0) >= 1,
        "no range split during the run: {}",
        r.summary()
    );
    assert_eq!(
        r.faults.by_kind.len(),
        usize::from(quiver_tests::nemesis::KINDS) + 1,
        "every fault kind ran, and splits"
    );
    assert!(r.passed(), "{r}");
}
