//! A range's leader is visible: three real nodes and a logged collection of one range.
//! `quiver status --json` names the range's leader, the node that serves its leader reads;
//! `/metrics` on that node says `quiver_range_leader{range=..} 1` and 0 on the others. After
//! that leader is killed, `quiver status` (the killed node still among its seeds) names the
//! new leader, again the node serving leader reads, and the table shows it instead of "-".

mod common;

use std::time::{Duration, Instant};

use cli::demo::{wait_for, LocalCluster};
use common::*;

const NAME: &str = "led";

/// Column `i` (from 1) of a table row.
fn cell(row: &str, i: usize) -> Option<String> {
    row.split(['│', '┆']).nth(i).map(|c| c.trim().to_string())
}

/// Range `range`'s leader per `quiver status --json --seeds seeds`.
fn status_leader(seeds: &str, range: u64) -> Option<u64> {
    let (ok, out, _) = quiver(&["status", "--json", "--seeds", seeds]);
    if !ok {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
    v["ranges"]
        .as_array()?
        .iter()
        .find(|r| r["id"].as_u64() == Some(range))?["leader"]
        .as_u64()
}

/// Waits until `quiver status` and a served leader read agree on range `range`'s leader,
/// other than `not`; its node id.
async fn agreed_leader(
    c: &LocalCluster,
    kv: &client::Kv,
    seeds: &str,
    range: u64,
    not: Option<u64>,
) -> u64 {
    let cl = client(c);
    let last = std::sync::Mutex::new(None);
    wait_for(LONG, || async {
        let s = cl.status().await.ok()?;
        let led = status_leader(seeds, range)?;
        let served = leader_index(c, kv, b"k").await;
        *last.lock().unwrap() = Some((led, served));
        (Some(led) != not && index_of(c, &s, led) == served).then_some(led)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "status never agreed with the served leader reads (not {not:?}): last (status, served \
             index) {:?}",
            last.lock().unwrap()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_a_ranges_leader_after_a_leader_kill() {
    let t0 = Instant::now();
    let (mut c, _dir, cl, seeds) = ready_cluster(3).await;
    let coll = create_by_cli(&seeds, NAME, &["--persistence", "logged"]);
    let kv = cl.kv(NAME);
    first_put(&kv, b"k", b"1").await;
    let range = wait_placed(&cl, coll, 3).await[0].id;

    let first = agreed_leader(&c, &kv, &seeds, range, None).await;
    let s = cl.status().await.expect("status");
    let li = index_of(&c, &s, first);
    let sample = format!("quiver_range_leader{{range=\"{range}\"}}");
    for (i, n) in c.nodes.iter().enumerate() {
        let want = format!("{sample} {}\n", u64::from(i == li));
        let got = wait_for(LONG, || async {
            admin_metrics(n.admin).filter(|m| m.contains(&want))
        })
        .await;
        assert!(got.is_some(), "node {i}'s /metrics never showed {want:?}");
    }

    c.kill(li);
    let second = agreed_leader(&c, &kv, &seeds, range, Some(first)).await;
    assert_ne!(second, first);
    let (ok, table, err) = quiver(&["status", "--seeds", &seeds]);
    assert!(ok, "{err}");
    let row = table
        .lines()
        .find(|l| cell(l, 1) == Some(range.to_string()))
        .unwrap_or_else(|| panic!("no row for range {range}:\n{table}"));
    assert!(
        cell(row, 5) == Some(second.to_string()),
        "the leader column is not {second}: {row}"
    );
    for i in 0..3 {
        if i != li {
            c.terminate(i, Duration::from_secs(10));
        }
    }
    eprintln!("t85 took {:?}", t0.elapsed());
}
