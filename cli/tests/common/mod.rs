//! Shared helpers of the process tests: a cluster of real `quiver node` processes on
//! 127.0.0.1 with short ticks, and bounded waits.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use cli::demo::{wait_for, LocalCluster};
use cli::status::ClusterStatus;
use proto::clientpb::StatusReply;
use proto::metapb::{
    CollectionDescriptor, CollectionKind, Persistence, RangeDescriptor, ReplicationMode,
};

/// Generous bound for anything cluster-wide on 2 shared cores.
pub const LONG: Duration = Duration::from_secs(90);

/// Short ticks so elections and failure detection fit a test.
pub fn fast() -> Vec<(String, String)> {
    [
        ("tick-ms", "50"),
        ("election-ticks", "10"),
        ("heartbeat-ms", "300"),
        ("dead-after-ms", "3000"),
        ("log-segment-mb", "8"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A fresh directory for a cluster, removed when the guard drops unless
/// `QUIVER_TEST_KEEP=1` (then its logs stay for a post-mortem).
pub fn test_dir() -> (PathBuf, Option<tempfile::TempDir>) {
    let dir = tempfile::Builder::new()
        .prefix("quiver-test-")
        .tempdir()
        .expect("temp dir");
    if std::env::var_os("QUIVER_TEST_KEEP").is_some() {
        let path = dir.keep();
        eprintln!("keeping {}", path.display());
        return (path, None);
    }
    (dir.path().to_path_buf(), Some(dir))
}

/// `n` nodes started in a fresh temp dir (kept in the returned guard).
pub fn cluster(n: usize) -> (LocalCluster, Option<tempfile::TempDir>) {
    let (path, dir) = test_dir();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_quiver"));
    let mut c = LocalCluster::new(exe, path, n, fast()).expect("layout");
    c.start_all().expect("start nodes");
    (c, dir)
}

/// A client of every node.
pub fn client(c: &LocalCluster) -> client::Client {
    client::Client::new(c.clients(0..c.nodes.len()), Duration::from_secs(10)).expect("client")
}

/// A client of the nodes in `idx`.
pub fn client_of(c: &LocalCluster, idx: &[usize]) -> client::Client {
    client::Client::new(c.clients(idx.iter().copied()), Duration::from_secs(10)).expect("client")
}

/// Create meta on node `i`, retrying while the node is still starting.
pub async fn create_meta(c: &LocalCluster, i: usize) {
    let ok = wait_for(Duration::from_secs(30), || async {
        c.create_meta(i).await.ok()
    })
    .await;
    assert!(ok.is_some(), "create-meta on node {i} never succeeded");
}

/// The status as meta's leader sees it.
pub async fn leader_status(cl: &client::Client) -> Option<StatusReply> {
    let s = cl.leader_status().await.ok()?;
    (s.node == s.meta_leader).then_some(s)
}

/// Voter ids of meta per the descriptor, when the cell agrees (same voters, no learners).
pub fn settled_voters(s: &StatusReply) -> Option<Vec<u64>> {
    let st = ClusterStatus::from_reply(s);
    let r = st.ranges.iter().find(|r| r.id == meta::META_RANGE)?;
    let desc: HashSet<u64> = r
        .members
        .iter()
        .filter(|m| m.role == "voter")
        .map(|m| m.node)
        .collect();
    let cell: HashSet<u64> = s.meta_voters.iter().copied().collect();
    (desc == cell && s.meta_learners.is_empty() && desc.len() == r.members.len())
        .then(|| desc.into_iter().collect())
}

/// Wait until meta has exactly `n` settled voters, all alive; returns them.
pub async fn wait_voters(cl: &client::Client, n: usize, within: Duration) -> Vec<u64> {
    let last = std::sync::Mutex::new(String::new());
    let r = wait_for(within, || async {
        let s = leader_status(cl).await?;
        let st = ClusterStatus::from_reply(&s);
        if let Ok(mut l) = last.lock() {
            *l = format!("{:?}", st.ranges);
        }
        let v = settled_voters(&s)?;
        let alive: HashSet<u64> = st.nodes.iter().filter(|n| n.alive).map(|n| n.id).collect();
        (v.len() == n && v.iter().all(|x| alive.contains(x))).then_some(v)
    })
    .await;
    r.unwrap_or_else(|| {
        panic!(
            "meta did not settle on {n} voters within {within:?}; last: {}",
            last.lock().map(|l| l.clone()).unwrap_or_default()
        )
    })
}

/// Node index of node id `id`.
pub fn index_of(c: &LocalCluster, s: &StatusReply, id: u64) -> usize {
    let n = s.nodes.iter().find(|n| n.id == id).expect("node record");
    c.index_of_client(&n.client_addr).expect("node index")
}

/// Write then read back (linearizable) through the client; bounded retries.
pub async fn write_read(cl: &client::Client, key: &str, value: &str, within: Duration) {
    let ok = wait_for(within, || async {
        cl.put(key.as_bytes(), value.as_bytes()).await.ok()?;
        let v = cl.get(key.as_bytes(), true).await.ok()??;
        (v.value.as_ref() == value.as_bytes()).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "write+read of {key} did not succeed within {within:?}"
    );
}

/// Wait until a follower read of `key` in `kv` is served by `node` (a client address) and
/// returns `want`: reads go round robin over the range's members, so only a read that
/// `node` served shows what `node` holds.
pub async fn served_by(
    kv: &client::Kv,
    key: &[u8],
    node: std::net::SocketAddr,
    want: &[u8],
) -> bool {
    let f = kv.clone().with_reads(client::ReadMode::Follower);
    wait_for(LONG, || async {
        let s = f.get_served(key).await.ok()?;
        (s.node == node && s.value?.value.as_ref() == want).then_some(())
    })
    .await
    .is_some()
}

/// Run the `quiver` binary: (success, stdout, stderr).
pub fn quiver(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(args)
        .output()
        .expect("run quiver");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `--seeds` value naming every node of `c`.
pub fn seeds_arg(c: &LocalCluster) -> String {
    c.clients(0..c.nodes.len())
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `n` nodes with meta created on node 0 and settled on `n` voters: the cluster, its dir
/// guard, a client of every node and the `--seeds` value.
pub async fn ready_cluster(
    n: usize,
) -> (
    LocalCluster,
    Option<tempfile::TempDir>,
    client::Client,
    String,
) {
    let (c, dir) = cluster(n);
    create_meta(&c, 0).await;
    let cl = client(&c);
    wait_voters(&cl, n, LONG).await;
    let seeds = seeds_arg(&c);
    (c, dir, cl, seeds)
}

/// A KV collection spec: consensus replication, 3 replicas.
pub fn kv_spec(
    name: &str,
    persistence: Persistence,
    split_size: u64,
    retention_secs: u64,
) -> CollectionDescriptor {
    let mut s = CollectionDescriptor::new();
    s.name = name.into();
    s.kind = CollectionKind::KV;
    s.persistence = persistence;
    s.replication = ReplicationMode::CONSENSUS;
    s.replication_factor = 3;
    s.split_size = split_size;
    s.retention_secs = retention_secs;
    s
}

/// Put `key` until a put succeeds (a new collection is placed and led); returns its
/// revision.
pub async fn first_put(kv: &client::Kv, key: &[u8], value: &[u8]) -> u64 {
    wait_for(LONG, || async { kv.put(key, value).await.ok() })
        .await
        .unwrap_or_else(|| panic!("no put succeeded on collection {:?}", kv.name()))
}

/// Wait until every range of collection `coll` has exactly `voters` members, all voters,
/// in meta; returns the ranges.
pub async fn wait_placed(cl: &client::Client, coll: u64, voters: usize) -> Vec<RangeDescriptor> {
    wait_for(LONG, || async {
        let s = cl.status().await.ok()?;
        let rs: Vec<RangeDescriptor> = s
            .ranges
            .into_iter()
            .filter(|r| r.collection == coll)
            .collect();
        (!rs.is_empty()
            && rs.iter().all(|r| {
                r.members.len() == voters
                    && r.members.iter().all(|m| m.role == meta::MemberRole::VOTER)
            }))
        .then_some(rs)
    })
    .await
    .unwrap_or_else(|| panic!("collection {coll} never got {voters} voters"))
}

/// The node index of the leader of the range holding `key`: the node that serves a leader
/// read of it.
pub async fn leader_index(c: &LocalCluster, kv: &client::Kv, key: &[u8]) -> usize {
    let kv = kv.clone().with_reads(client::ReadMode::Leader);
    let node = wait_for(LONG, || async {
        kv.get_served(key).await.ok().map(|s| s.node)
    })
    .await
    .expect("a leader read is served");
    c.index_of_client(&node.to_string())
        .expect("a node of the cluster")
}

/// Put until acknowledged: every failure is retried with the same value (a write with an
/// unknown outcome that applied leaves the same value), so the last acknowledged value of a
/// key is the value it must read back.
pub async fn put_acked(kv: &client::Kv, key: &[u8], v: &[u8]) {
    let deadline = std::time::Instant::now() + LONG;
    let mut last: Option<client::ClientError> = None;
    while std::time::Instant::now() < deadline {
        match kv.put(key, v).await {
            Ok(_) => return,
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    }
    panic!(
        "put of {} never acknowledged: {last:?}",
        String::from_utf8_lossy(key)
    );
}

/// What the split tests' writers acknowledged: key → last acknowledged value.
pub type Model = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>>;

/// Writer `w`'s 1 KiB value of its key `i` in `round` (distinct per writer, key and round).
pub fn split_value(w: usize, i: usize, round: usize) -> Vec<u8> {
    let mut v = format!("{w}-{i}-{round}-").into_bytes();
    v.resize(1024, b'a' + (i % 26) as u8);
    v
}

/// Writes each of writer `w`'s `keys` keys (`w{w}/kNNN`) once, then overwrites a third of
/// them per round until `stop` (so splits happen under load); every put until acknowledged,
/// recorded in `model`. Returns the number of puts.
pub async fn overwriter(
    kv: client::Kv,
    w: usize,
    keys: usize,
    model: Model,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut puts = 0;
    for round in 0.. {
        for i in 0..keys {
            if round > 0 && (i + round) % 3 != 0 {
                continue;
            }
            let key = format!("w{w}/k{i:03}").into_bytes();
            let v = split_value(w, i, round);
            put_acked(&kv, &key, &v).await;
            model.lock().unwrap().insert(key, v);
            puts += 1;
            if round > 0 && stop.load(std::sync::atomic::Ordering::Relaxed) {
                return puts;
            }
        }
    }
    puts
}

/// `quiver create-collection NAME --replicas 3 --json --seeds SEEDS FLAGS...`: the new
/// collection's id (panics with the CLI's error when it fails).
pub fn create_by_cli(seeds: &str, name: &str, flags: &[&str]) -> u64 {
    let mut args = vec![
        "create-collection",
        name,
        "--replicas",
        "3",
        "--json",
        "--seeds",
        seeds,
    ];
    args.extend_from_slice(flags);
    let (ok, out, err) = quiver(&args);
    assert!(ok, "create {name}: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    v["id"].as_u64().expect("collection id")
}

/// Waits (up to [`LONG`]) until collection `coll`'s first range lists 3 members, all voters,
/// one of them the node whose client address is `addr`.
pub async fn wait_voter_again(cl: &client::Client, coll: u64, addr: &str) -> bool {
    wait_for(LONG, || async {
        let s = cl.status().await.ok()?;
        let r = s.ranges.iter().find(|r| r.collection == coll)?;
        (r.members.len() == 3
            && r.members.iter().all(|m| m.role == meta::MemberRole::VOTER)
            && r.members.iter().any(|m| m.client_addr == addr))
        .then_some(())
    })
    .await
    .is_some()
}

/// The collection's ranges in meta (as its leader sees it), sorted by `lo`.
pub async fn ranges_of(cl: &client::Client, coll: u64) -> Option<Vec<RangeDescriptor>> {
    let s = leader_status(cl).await?;
    let mut rs: Vec<RangeDescriptor> = s
        .ranges
        .into_iter()
        .filter(|r| r.collection == coll)
        .collect();
    rs.sort_by(|a, b| a.lo.cmp(&b.lo));
    Some(rs)
}

/// Whether `rs` (sorted by `lo`) tile `[prefix, prefix_end(prefix))` exactly.
pub fn tiles(rs: &[RangeDescriptor], prefix: &[u8]) -> bool {
    let end = meta::keys::prefix_end(prefix).unwrap_or_default();
    !rs.is_empty()
        && rs[0].lo.as_ref() == prefix
        && rs.last().is_some_and(|r| r.hi.as_ref() == end.as_slice())
        && rs.windows(2).all(|w| w[0].hi == w[1].lo)
        && rs.iter().all(|r| r.lo < r.hi)
}

/// `GET /metrics` of an admin port (`None`: no answer).
pub fn admin_metrics(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
