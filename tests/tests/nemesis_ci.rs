//! CI-sized nemesis run: 5 real nodes, every fault kind once on a seeded schedule, under a
//! put/get/cas workload on a KV collection with 5 replicas; 0 anomalies and 0 lost
//! acknowledged writes.
//! Replay a failing run with `QUIVER_NEMESIS_SEED=<seed>`.

use quiver_tests::{run_nemesis, seed_from_env, RunConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_ci_five_nodes_every_fault_kind() {
    let cfg = RunConfig::new(seed_from_env(0x5eed_0001), 5, 1);
    let r = run_nemesis(&cfg).await;
    eprintln!("{r}");
    eprintln!("fault log:\n{}", r.faults);
    assert!(r.check.operations > 200, "too little load: {}", r.summary());
    assert_eq!(r.faults.by_kind.len(), 8, "every fault kind ran");
    assert!(r.passed(), "{r}");
}
