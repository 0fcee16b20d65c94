//! KV ranges split at the nodes under load: three real nodes, a collection with a 64 KiB
//! split size, concurrent writers of distinct keys while the ranges split several times.
//! Then: meta lists at least 4 ranges that tile the collection's keyspace exactly, each with
//! 3 voters; every acknowledged write reads back with its last acknowledged value; a scan
//! across all ranges equals the model; a get of every key through every node as the only
//! seed follows redirects to the right range; a node restarted after the splits reopens
//! parents and daughters and serves every range from its own replica (follower scans sent
//! to it directly) and takes writes again. Prints the split latencies the nodes logged.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::Conn;
use common::*;
use proto::clientpb::{ClientRequest, ClientResponse_oneof_kind, KvRequest};
use proto::kvpb::{self, Response_oneof_result};
use proto::metapb::RangeDescriptor;
use protobuf::Message;

const NAME: &str = "splits";
const WRITERS: usize = 4;
const KEYS: usize = 128;

/// A log line without its colour escapes.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut esc = false;
    for ch in line.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

fn full(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(key);
    k
}

/// A follower scan of the whole of range `r`, sent to one node directly (served by its own
/// replica or refused).
async fn scan_at(conn: &Conn, r: &RangeDescriptor) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut start = r.lo.clone();
    loop {
        let mut s = kvpb::Scan::new();
        s.start = start.clone();
        s.end = r.hi.clone();
        let mut cmd = kvpb::Command::new();
        cmd.set_scan(s);
        let mut k = KvRequest::new();
        k.range = r.id;
        k.epoch = r.epoch;
        k.command = cmd.write_to_bytes().map_err(|e| e.to_string())?.into();
        k.follower = true;
        let mut req = ClientRequest::new();
        req.set_kv(k);
        let resp = match conn.call(req).await.map_err(|e| e.to_string())? {
            ClientResponse_oneof_kind::kv(k) => {
                kvpb::Response::parse_from_carllerche_bytes(&k.response)
                    .map_err(|e| e.to_string())?
            }
            other => return Err(format!("{other:?}")),
        };
        let Some(Response_oneof_result::scan(s)) = resp.result else {
            return Err(format!("{resp:?}"));
        };
        for kv in s.kvs.iter() {
            out.push((kv.key.to_vec(), kv.value.to_vec()));
        }
        if !s.more {
            return Ok(out);
        }
        start = s.next_key.clone();
    }
}

/// Whether the node at `addr` serves every range of the collection from its own replica
/// (follower scans sent to it), together holding exactly the model's keys and values.
async fn serves_all(
    addr: std::net::SocketAddr,
    cl: &client::Client,
    coll: u64,
    prefix: &[u8],
    model: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Option<()> {
    let rs = ranges_of(cl, coll).await?;
    if !tiles(&rs, prefix) {
        return None;
    }
    let conn = Conn::connect(addr, Duration::from_secs(2)).await.ok()?;
    let mut got = BTreeMap::new();
    for r in &rs {
        got.extend(scan_at(&conn, r).await.ok()?);
    }
    let want: BTreeMap<Vec<u8>, Vec<u8>> = model
        .iter()
        .map(|(k, v)| (full(prefix, k), v.clone()))
        .collect();
    (got == want).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_split_under_load_without_losing_or_repeating_writes() {
    let t0 = Instant::now();
    let (mut c, _dir, cl, seeds) = ready_cluster(3).await;
    let (ok, out, err) = quiver(&[
        "create-collection",
        NAME,
        "--persistence",
        "logged",
        "--replicas",
        "3",
        "--split-size",
        "64KiB",
        "--json",
        "--seeds",
        &seeds,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let coll = v["id"].as_u64().expect("collection id");
    let prefix = meta::keys::collection_prefix(coll);
    let kv = cl.kv(NAME);
    // Placed and led before the load starts.
    first_put(&kv, b"a-first", b"1").await;
    let model: Model = Arc::new(Mutex::new(BTreeMap::new()));
    model
        .lock()
        .unwrap()
        .insert(b"a-first".to_vec(), b"1".to_vec());

    // Concurrent writers of distinct keys while the ranges split, until meta shows 4 ranges
    // (or a minute passed).
    let load = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        tasks.push(tokio::spawn(overwriter(
            cl.kv(NAME),
            w,
            KEYS,
            model.clone(),
            stop.clone(),
        )));
    }
    let split_under_load = cli::demo::wait_for(Duration::from_secs(60), || async {
        let n = ranges_of(&cl, coll).await?.len();
        (n >= 4).then_some(n)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut puts = 0;
    for t in tasks {
        puts += t.await.expect("writer");
    }
    eprintln!(
        "load: {puts} acknowledged puts of {} keys in {:?}; {split_under_load:?} ranges while writing",
        model.lock().unwrap().len(),
        load.elapsed()
    );
    assert!(
        split_under_load.is_some(),
        "fewer than 4 ranges after a minute of writes"
    );

    // Meta: at least 4 ranges tiling the keyspace, each with 3 voters.
    let seen = Mutex::new(Vec::new());
    let rs = cli::demo::wait_for(LONG, || async {
        let rs = ranges_of(&cl, coll).await?;
        *seen.lock().unwrap() = rs
            .iter()
            .map(|r| (r.id, r.lo.to_vec(), r.hi.to_vec(), r.members.len()))
            .collect();
        (rs.len() >= 4
            && tiles(&rs, &prefix)
            && rs.iter().all(|r| {
                r.members.len() == 3 && r.members.iter().all(|m| m.role == meta::MemberRole::VOTER)
            }))
        .then_some(rs)
    })
    .await;
    let rs = rs.unwrap_or_else(|| {
        panic!(
            "meta never showed >= 4 tiling ranges with 3 voters: {:?}",
            seen.lock().unwrap()
        )
    });
    eprintln!("{} ranges after the load", rs.len());
    // The proposer of each split started its daughter's first election at once (before any
    // node restarts: the counters live in memory).
    let campaigns: Vec<(u64, u64)> = c
        .nodes
        .iter()
        .map(|n| {
            let m = admin_metrics(n.admin).unwrap_or_default();
            (
                metric_value(&m, "quiver_daughter_campaigns_total").unwrap_or(0),
                metric_value(&m, "quiver_daughter_campaigns_skipped_total").unwrap_or(0),
            )
        })
        .collect();
    eprintln!("daughter campaigns (started, skipped) per node: {campaigns:?}");
    assert!(
        campaigns.iter().map(|c| c.0).sum::<u64>() >= 1,
        "no split's proposer campaigned for its daughter: {campaigns:?}"
    );

    let mut model = model.lock().unwrap().clone();
    // Every acknowledged write reads back with its last acknowledged value.
    for (k, v) in &model {
        let got = cli::demo::wait_for(LONG, || async { kv.get(k).await.ok() }).await;
        let got = got.unwrap_or_else(|| panic!("get {} kept failing", String::from_utf8_lossy(k)));
        let got = got.unwrap_or_else(|| panic!("{} lost", String::from_utf8_lossy(k)));
        assert_eq!(got.value.as_ref(), &v[..], "{}", String::from_utf8_lossy(k));
    }
    // A scan across all ranges equals the model.
    let all = cli::demo::wait_for(LONG, || async { kv.scan(b"", b"", 0).await.ok() })
        .await
        .expect("scan across ranges");
    let scanned: BTreeMap<Vec<u8>, Vec<u8>> = all
        .iter()
        .map(|kv| (kv.key.to_vec(), kv.value.to_vec()))
        .collect();
    assert_eq!(all.len(), scanned.len(), "a key scanned twice");
    assert!(scanned == model, "the scan differs from the model");
    // Through every node as the only seed: redirects lead to the right range.
    for i in 0..3 {
        let one = client_of(&c, &[i]).kv(NAME);
        for (k, v) in &model {
            let got = cli::demo::wait_for(LONG, || async { one.get(k).await.ok() })
                .await
                .flatten();
            assert_eq!(got.map(|g| g.value.to_vec()).as_ref(), Some(v), "node {i}");
        }
    }
    let checked = Instant::now();

    // Restart a node (SIGKILL: its stores replay their logs, parents their splits), then
    // another (SIGTERM): each reopens parents and daughters and serves every range itself.
    for (node, kill) in [(1, true), (2, false)] {
        if kill {
            c.kill(node);
        } else {
            assert!(
                c.terminate(node, Duration::from_secs(15)),
                "node did not stop"
            );
        }
        c.start(node).expect("restart");
        let addr = c.clients([node])[0];
        let served =
            cli::demo::wait_for(LONG, || serves_all(addr, &cl, coll, &prefix, &model)).await;
        assert!(
            served.is_some(),
            "restarted node {node} (kill {kill}) never served every range with the model's keys"
        );
        // And the cluster takes writes in every range again, through that node.
        let again = client_of(&c, &[node]).kv(NAME);
        let some: Vec<Vec<u8>> = model.keys().step_by(37).cloned().collect();
        for k in some {
            let v = format!("after-restart-{node}").into_bytes();
            put_acked(&again, &k, &v).await;
            let got = cli::demo::wait_for(LONG, || async { again.get(&k).await.ok() })
                .await
                .flatten();
            assert_eq!(got.map(|g| g.value.to_vec()), Some(v.clone()));
            model.insert(k, v);
        }
    }
    eprintln!(
        "checks {:?}, restart checks {:?}",
        checked.duration_since(load),
        checked.elapsed()
    );

    // The split latencies the nodes logged (trigger to meta updated).
    let mut lat = Vec::new();
    for n in &c.nodes {
        let log = std::fs::read_to_string(cli::demo::log_path(&n.data_dir)).unwrap_or_default();
        for line in log
            .lines()
            .map(plain)
            .filter(|l| l.contains("range split and recorded"))
        {
            if let Some(ms) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("split_ms="))
                .and_then(|v| v.parse::<u64>().ok())
            {
                lat.push(ms);
            }
        }
    }
    lat.sort_unstable();
    assert!(!lat.is_empty(), "no split was logged");
    eprintln!(
        "{} splits; trigger to meta updated: min {} ms, median {} ms, max {} ms",
        lat.len(),
        lat[0],
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("t40 took {:?}", t0.elapsed());
}
