//! A `memory` KV collection keeps nothing on disk, on three real nodes: its raft log lives in
//! harpoon's volatile (in-memory) log store, so memory writes do not grow the node's raft log
//! on disk (compared with as many `logged` writes) and no file under a node's data dir holds
//! a written value; its range dir holds only `range.meta`. A node killed (SIGKILL) and
//! restarted treats its memory replica as lost (no raft replica is created for it), rejoins
//! the range as a new member, and the collection serves every acknowledged write (the other
//! two replicas held them). So does a second node restarted with its memory `range.meta`
//! overwritten by bytes that do not read: start-up records that dir as lost (it never skips
//! it, which would let self-assignment open the replica blank under its old identity).

mod common;

use std::path::Path;

use client::ReadMode;
use common::*;
use proto::metapb::Persistence;

const MEM_MARK: &[u8] = b"MEMVAL-7f3a9c1e-";
const LOG_MARK: &[u8] = b"LOGVAL-2b8d4e6a-";
const WRITES: usize = 60;
const VALUE_SIZE: usize = 8 << 10;

fn value(mark: &[u8], i: usize) -> Vec<u8> {
    let mut v = mark.to_vec();
    v.extend_from_slice(format!("{i:04}-").as_bytes());
    v.resize(VALUE_SIZE, b'q');
    v
}

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The files under `dir` whose bytes contain `needle`.
fn holding(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    files(dir, &mut all);
    all.into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        .collect()
}

/// `text` without ANSI colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The position of the first log line holding `message` about range `range`.
fn first_line(log: &str, message: &str, range: u64) -> Option<usize> {
    let field = format!("range={range}");
    log.lines()
        .position(|l| l.contains(message) && l.split_whitespace().any(|t| t == field))
}

/// Bytes used in the node's raft log: per seglog segment (preallocated, zero-filled), up to
/// its last non-zero byte.
fn raft_log_used(data_dir: &Path) -> u64 {
    let mut all = Vec::new();
    files(&data_dir.join("raft"), &mut all);
    all.iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| b.iter().rposition(|x| *x != 0).map_or(0, |i| i as u64 + 1))
        .sum()
}

/// The memory collection a restarted node rejoins.
struct Target<'a> {
    cl: &'a client::Client,
    mkv: &'a client::Kv,
    coll: u64,
    ranges: &'a [proto::metapb::RangeDescriptor],
}

/// Kill node `node` (SIGKILL), with `corrupt` overwrite its memory ranges' `range.meta` with
/// bytes that do not read, restart it, and check: every memory range is recorded lost (naming
/// the unreadable `range.meta` when `corrupt`) and forgotten before any replica of it is
/// opened, the node becomes a voter again, every acknowledged write is served, and the node
/// itself serves the last one (a follower read: it got them by snapshot).
async fn restart_and_rejoin(
    c: &mut cli::demo::LocalCluster,
    t: &Target<'_>,
    node: usize,
    corrupt: bool,
) {
    let addr = c.clients([node])[0].to_string();
    let log_file = cli::demo::log_path(&c.nodes[node].data_dir);
    c.kill(node);
    if corrupt {
        for r in t.ranges {
            let meta = c.nodes[node]
                .data_dir
                .join("ranges")
                .join(r.id.to_string())
                .join("range.meta");
            assert!(meta.exists(), "node {node}: no {}", meta.display());
            std::fs::write(&meta, b"\xff\xfe\x00 not a range.meta").expect("corrupt range.meta");
        }
    }
    let log_before = std::fs::read_to_string(&log_file).unwrap_or_default().len();
    c.start(node).expect("restart");
    let forgotten = cli::demo::wait_for(LONG, || async {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        let log = plain(log.get(log_before..)?);
        t.ranges
            .iter()
            .all(|r| first_line(&log, "lost replica forgotten", r.id).is_some())
            .then_some(())
    })
    .await;
    assert!(
        forgotten.is_some(),
        "node {node} never forgot its lost replica (corrupt range.meta: {corrupt})"
    );
    assert!(
        wait_voter_again(t.cl, t.coll, &addr).await,
        "node {node} never became a voter again (corrupt range.meta: {corrupt})"
    );
    // After the restart no raft replica was opened for the memory range before it was
    // recorded lost and forgotten: the one opened later is the new member's.
    let log = plain(&std::fs::read_to_string(&log_file).expect("node log")[log_before..]);
    for r in t.ranges {
        let lost_at = first_line(&log, "range replica lost", r.id)
            .unwrap_or_else(|| panic!("node {node}: range {} not recorded lost", r.id));
        if corrupt {
            assert!(
                log.lines()
                    .nth(lost_at)
                    .is_some_and(|l| l.contains("range.meta")),
                "node {node}: range {} recorded lost, but not for its range.meta",
                r.id
            );
        }
        let forgotten_at = first_line(&log, "lost replica forgotten", r.id)
            .unwrap_or_else(|| panic!("node {node}: range {} not forgotten", r.id));
        let opened_at = first_line(&log, "range replica opened", r.id);
        assert!(
            lost_at < forgotten_at && opened_at.is_none_or(|o| o > forgotten_at),
            "node {node}, range {}: lost at line {lost_at}, forgotten at {forgotten_at}, \
             opened at {opened_at:?}",
            r.id
        );
    }

    // Every acknowledged memory write is served, and the rejoined node serves them too (it
    // got them by snapshot, into memory).
    for i in 0..WRITES {
        let key = format!("m{i:04}");
        let got = cli::demo::wait_for(LONG, || async { t.mkv.get(key.as_bytes()).await.ok() })
            .await
            .unwrap_or_else(|| panic!("no read of {key}"))
            .unwrap_or_else(|| panic!("acknowledged write {key} lost"));
        assert_eq!(got.value.as_ref(), value(MEM_MARK, i).as_slice(), "{key}");
    }
    let last = format!("m{:04}", WRITES - 1);
    let follower = client_of(c, &[node])
        .kv("mem")
        .with_reads(ReadMode::Follower);
    let served = cli::demo::wait_for(LONG, || async {
        let s = follower.get_served(last.as_bytes()).await.ok()?;
        (s.node.to_string() == addr).then_some(s.value).flatten()
    })
    .await
    .unwrap_or_else(|| panic!("no follower read served by the rejoined node {node}"));
    assert_eq!(
        served.value.as_ref(),
        value(MEM_MARK, WRITES - 1).as_slice()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_collection_keeps_nothing_on_disk_and_a_restarted_replica_rejoins() {
    let t0 = std::time::Instant::now();
    let (mut c, _dir, cl, _) = ready_cluster(3).await;
    let mem = cl
        .create_collection(kv_spec("mem", Persistence::MEMORY, 64 << 20, 0))
        .await
        .expect("create memory collection");
    let logged = cl
        .create_collection(kv_spec("lg", Persistence::LOGGED, 64 << 20, 0))
        .await
        .expect("create logged collection");
    let (mkv, lkv) = (cl.kv("mem"), cl.kv("lg"));
    first_put(&mkv, b"first", b"x").await;
    first_put(&lkv, b"first", b"x").await;
    let mem_ranges = wait_placed(&cl, mem.id, 3).await;
    wait_placed(&cl, logged.id, 3).await;
    let dirs: Vec<_> = c.nodes.iter().map(|n| n.data_dir.clone()).collect();

    // N memory writes, then N logged writes of the same size: the raft log on disk grows with
    // the logged ones only (meta's heartbeats go on in both phases).
    let used0: Vec<u64> = dirs.iter().map(|d| raft_log_used(d)).collect();
    for i in 0..WRITES {
        mkv.put(format!("m{i:04}").as_bytes(), &value(MEM_MARK, i))
            .await
            .expect("memory put");
    }
    let used1: Vec<u64> = dirs.iter().map(|d| raft_log_used(d)).collect();
    for i in 0..WRITES {
        lkv.put(format!("l{i:04}").as_bytes(), &value(LOG_MARK, i))
            .await
            .expect("logged put");
    }
    let used2: Vec<u64> = dirs.iter().map(|d| raft_log_used(d)).collect();
    let payload = (WRITES * VALUE_SIZE) as u64;
    for n in 0..3 {
        let mem_growth = used1[n].saturating_sub(used0[n]);
        let log_growth = used2[n].saturating_sub(used1[n]);
        eprintln!(
            "node {n}: raft log grew {mem_growth} B for {WRITES} memory writes, \
             {log_growth} B for {WRITES} logged writes ({payload} B of values)"
        );
        assert!(
            log_growth >= payload,
            "node {n}: logged writes must reach the raft log ({log_growth} < {payload})"
        );
        assert!(
            mem_growth * 8 < log_growth,
            "node {n}: memory writes grew the raft log by {mem_growth} B \
             (logged writes: {log_growth} B)"
        );
    }

    // No file of any node holds a memory value; the logged values are found (the search
    // works). A memory range's dir holds its metadata only.
    for (n, d) in dirs.iter().enumerate() {
        let found = holding(d, MEM_MARK);
        assert!(
            found.is_empty(),
            "node {n}: memory values on disk: {found:?}"
        );
        assert!(
            !holding(d, LOG_MARK).is_empty(),
            "node {n}: no logged value found on disk"
        );
        for r in &mem_ranges {
            let mut in_dir = Vec::new();
            files(&d.join("ranges").join(r.id.to_string()), &mut in_dir);
            let names: Vec<_> = in_dir
                .iter()
                .filter_map(|p| p.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                names,
                vec!["range.meta".to_string()],
                "node {n}, range {}",
                r.id
            );
        }
    }

    // Kill the memory range's leader outright and restart it: its replica is lost (data, raft
    // log, hard state), recorded as such without a raft replica, and rejoins as a new member.
    let lost = leader_index(&c, &mkv, b"first").await;
    let t = Target {
        cl: &cl,
        mkv: &mkv,
        coll: mem.id,
        ranges: &mem_ranges,
    };
    restart_and_rejoin(&mut c, &t, lost, false).await;
    // Then another node, whose memory `range.meta` is unreadable when it restarts (a dir
    // start-up cannot read must not be skipped: self-assignment would open it blank under its
    // old identity): recorded lost just the same, no cell opened, and it rejoins.
    restart_and_rejoin(&mut c, &t, (lost + 1) % 3, true).await;
    let found = holding(&dirs[lost], MEM_MARK);
    assert!(
        found.is_empty(),
        "rejoined node: memory values on disk: {found:?}"
    );
    for i in 0..3 {
        c.terminate(i, std::time::Duration::from_secs(10));
    }
    eprintln!("t86 took {:?}", t0.elapsed());
}
