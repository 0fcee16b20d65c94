//! Planted-bug control: reads served from a node's local replica without ReadIndex (meta's
//! scratch space read with `get(key, leader = false)` from a chosen follower) must be caught by
//! the checker once that node is cut off while the majority keeps writing. If this passes the
//! checker, the harness is too weak. (A KV collection's follower reads go to the range's first
//! member, not a chosen node: the random-nemesis version is in `nemesis_long.rs`.)

use std::time::Duration;

use checker::history::{KvOp, KvOut, Recorder};
use checker::linearizable::{check_kv, CheckOptions};
use quiver_tests::cluster::{wait_for, Cluster};
use quiver_tests::nemesis::{apply, heal, Fault};
use quiver_tests::ready_cluster;
use quiver_tests::workload::{recorded_get, recorded_put, Store, Target, WriteResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_reads_without_read_index_are_caught() {
    let mut c = ready_cluster(3).await;
    let rec: Recorder<KvOp, KvOut> = Recorder::new();
    let run = 7;
    let all = c.client(Duration::from_secs(2));
    // Pick a follower of meta as the stale reader.
    let leader = wait_for(Duration::from_secs(30), || Cluster::meta_leader(&all))
        .await
        .expect("leader");
    let li = c.index_of(leader).expect("leader index");
    let victim = (li + 1) % 3;
    let majority: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let writer = Store::new(
        c.client_of(&majority, Duration::from_secs(2)),
        Target::Scratch,
        run,
        false,
    );
    let stale = Store::new(
        c.client_of(&[victim], Duration::from_secs(2)),
        Target::Scratch,
        run,
        true,
    );
    assert_eq!(
        recorded_put(&rec, &writer, 1, 0, 1).await,
        WriteResult::Ok,
        "first write"
    );
    // The victim has applied it.
    let seen = wait_for(Duration::from_secs(20), || async {
        (stale.get(0).await.ok()? == Some(1)).then_some(())
    })
    .await;
    assert!(seen.is_some(), "victim never applied the first write");
    // Nothing reaches the victim any more; write through the majority, read at the victim.
    let _ = apply(
        &mut c,
        &Fault::OneWay {
            node: victim,
            outbound: false,
        },
        None,
    )
    .await;
    let acked = wait_for(Duration::from_secs(30), || async {
        (recorded_put(&rec, &writer, 2, 0, 2).await == WriteResult::Ok).then_some(())
    })
    .await;
    assert!(acked.is_some(), "majority write under partition");
    for _ in 0..5 {
        recorded_get(&rec, &stale, 3, 0).await;
    }
    heal(&mut c);
    let report = check_kv(&rec.finish(), &CheckOptions::default());
    eprintln!("{report}");
    assert!(
        report.is_illegal(),
        "the stale follower read was not caught: {report}"
    );
}
