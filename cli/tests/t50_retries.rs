//! Writes with request ids under leader kills, on three real nodes: writers put to their own
//! keys while the range's leader is SIGKILLed (twice, the first victim restarted in between).
//! A put whose answer the kill cut is resent by the client with the same request id; the
//! range applies it at most once. So each key's `version` (puts since creation) equals the
//! number of puts acknowledged to its writer (at most plus the puts that ended
//! `UnknownOutcome`, which must not happen within the client's budget here), and a counter
//! advanced by `cas` on its value equals the number of acknowledged increments.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use client::{ClientError, Expect, ReadMode};
use common::*;

const WRITERS: usize = 3;

#[derive(Default)]
struct Tally {
    acked: AtomicU64,
    unknown: AtomicU64,
    failed: AtomicU64,
}

async fn acked_total(t: &[Arc<Tally>], ctr: &Tally) -> u64 {
    t.iter()
        .map(|x| x.acked.load(Ordering::Relaxed))
        .sum::<u64>()
        + ctr.acked.load(Ordering::Relaxed)
}

/// Wait until `n` more writes were acknowledged.
async fn progress(t: &[Arc<Tally>], ctr: &Tally, n: u64) {
    let start = acked_total(t, ctr).await;
    let ok = cli::demo::wait_for(LONG, || async {
        (acked_total(t, ctr).await >= start + n).then_some(())
    })
    .await;
    assert!(ok.is_some(), "writes made no progress ({n} more acks)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_apply_exactly_once_across_leader_kills() {
    let t0 = std::time::Instant::now();
    let (mut c, _dir, cl, seeds) = ready_cluster(3).await;
    let coll = create_by_cli(&seeds, "ctr", &["--persistence", "logged"]);
    let kv = cl.kv("ctr");
    first_put(&kv, b"n", b"0").await;
    // All three members placed, so a kill leaves a majority.
    wait_placed(&cl, coll, 3).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = (0..WRITERS).map(|_| Arc::default()).collect();
    let ctr_tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    // A generous budget: a resend must outlast an election plus a node's failure detection.
    let writer_client =
        || client::Client::new(c.clients(0..3), Duration::from_secs(20)).expect("client");
    let mut writer_clients = Vec::new();
    for (i, t) in tallies.iter().enumerate() {
        let (stop, t) = (stop.clone(), t.clone());
        let wc = writer_client();
        writer_clients.push(wc.clone());
        tasks.push(tokio::spawn(async move {
            let kv = wc.kv("ctr");
            let key = format!("w{i}");
            while !stop.load(Ordering::Relaxed) {
                match kv.put(key.as_bytes(), b"x").await {
                    Ok(_) => t.acked.fetch_add(1, Ordering::Relaxed),
                    Err(ClientError::UnknownOutcome(m)) => {
                        eprintln!("w{i}: unknown outcome: {m}");
                        t.unknown.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        // Definitely not applied (refused before proposing, or never sent).
                        eprintln!("w{i}: {e}");
                        t.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // The counter: read, then cas on its value; only an acknowledged success counts.
    {
        let (stop, t) = (stop.clone(), ctr_tally.clone());
        let wc = writer_client();
        writer_clients.push(wc.clone());
        tasks.push(tokio::spawn(async move {
            let kv = wc.kv("ctr");
            while !stop.load(Ordering::Relaxed) {
                let Ok(cur) = kv.get(b"n").await else {
                    continue;
                };
                let n: u64 = cur
                    .map(|kv| {
                        String::from_utf8_lossy(&kv.value)
                            .parse()
                            .expect("a number")
                    })
                    .unwrap_or(0);
                let next = (n + 1).to_string();
                match kv
                    .cas(
                        b"n",
                        Expect::Value(n.to_string().into_bytes()),
                        Some(next.as_bytes()),
                    )
                    .await
                {
                    Ok(o) if o.succeeded => {
                        t.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => panic!("the only incrementer lost a cas: an increment applied twice"),
                    Err(ClientError::UnknownOutcome(m)) => {
                        eprintln!("ctr: unknown outcome: {m}");
                        t.unknown.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => {
                        eprintln!("ctr: {e}");
                        t.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    progress(&tallies, &ctr_tally, 50).await;
    let victim = leader_index(&c, &cl.kv("ctr"), b"n").await;
    eprintln!("killing range leader node {victim}");
    c.kill(victim);
    progress(&tallies, &ctr_tally, 50).await;
    c.start(victim).expect("restart");
    // The restarted node must serve the range again before the next kill (a majority).
    let cl2 = client(&c);
    let back = c.clients([victim])[0];
    let f = cl2.kv("ctr").with_reads(ReadMode::Follower);
    let served = cli::demo::wait_for(LONG, || async {
        let s = f.get_served(b"n").await.ok()?;
        (s.node == back && s.value.is_some()).then_some(())
    })
    .await;
    assert!(
        served.is_some(),
        "the restarted node never served the range"
    );
    let victim2 = leader_index(&c, &cl2.kv("ctr"), b"n").await;
    eprintln!("killing range leader node {victim2}");
    c.kill(victim2);
    progress(&tallies, &ctr_tally, 50).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer");
    }
    c.start(victim2).expect("restart");

    let resent: u64 = writer_clients.iter().map(|w| w.resent_writes()).sum();
    let reader = client(&c).kv("ctr").with_reads(ReadMode::Leader);
    let mut report = Vec::new();
    for (i, t) in tallies.iter().enumerate() {
        let acked = t.acked.load(Ordering::Relaxed);
        let unknown = t.unknown.load(Ordering::Relaxed);
        let got = cli::demo::wait_for(LONG, || async {
            reader.get(format!("w{i}").as_bytes()).await.ok()
        })
        .await
        .expect("read back");
        let version = got.map_or(0, |kv| kv.version);
        report.push(format!(
            "w{i}: acked {acked} unknown {unknown} version {version}"
        ));
        assert!(
            acked <= version && version <= acked + unknown,
            "w{i}: version {version}, acked {acked}, unknown {unknown}: a put applied twice or an acked put was lost"
        );
        assert_eq!(unknown, 0, "w{i}: the client gave up within its budget");
    }
    let n = cli::demo::wait_for(LONG, || async { reader.get(b"n").await.ok() })
        .await
        .expect("read back")
        .map(|kv| {
            String::from_utf8_lossy(&kv.value)
                .parse::<u64>()
                .expect("number")
        })
        .unwrap_or(0);
    let ctr_acked = ctr_tally.acked.load(Ordering::Relaxed);
    let ctr_unknown = ctr_tally.unknown.load(Ordering::Relaxed);
    assert!(
        ctr_acked <= n && n <= ctr_acked + ctr_unknown,
        "counter {n}, acked increments {ctr_acked}, unknown {ctr_unknown}"
    );
    eprintln!(
        "{}; counter {n} acked {ctr_acked}; writes resent after an unknown outcome: {resent}; {:?}",
        report.join("; "),
        t0.elapsed()
    );
}
