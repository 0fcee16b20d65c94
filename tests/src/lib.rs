//! Quiver's process-level fault harness (Jepsen / etcd robustness style).
//!
//! - [`cluster`]: real `quiver node` processes on 127.0.0.1 (kill -9 + restart, SIGSTOP /
//!   SIGCONT, create-meta, bounded waits), each child killed when the cluster drops.
//! - [`proxy`]: a userspace TCP fault proxy in front of every peer port; rules per directed
//!   link (pass, blackhole, delay, loss / cut), the dialer's id read from its first frame.
//! - [`nemesis`]: a seeded schedule of faults (kill, pause, partitions: majority/minority,
//!   bridge, isolate meta's leader, isolate the KV range's leader, one-way; delay and loss
//!   windows; optionally long kills past `dead-after`, a membership change), healed between
//!   faults.
//! - [`workload`]: clients recording a [`checker`] KV history (ok / fail / unknown) of puts,
//!   gets and compare-and-swaps on a KV collection (or puts and gets on meta's scratch space).
//! - [`appends`]: an append workload (compare-and-swap on list-valued keys) whose logs are read
//!   from every replica at the end and checked with [`checker::append`].
//! - [`availability`]: unavailability per injected fault (longest stretch without a successful
//!   operation, p99 latency), by fault kind.
//! - [`crash`]: write-once load and read-back for the node-level crash tests (kill -9 of every
//!   node; storage damage).
//! - [`damage`]: damage to a stopped node's seglog files: a torn write at the tail, a bit flip
//!   below the durable mark.
//! - [`run_nemesis`]: one whole run and its [`RunReport`]; with a small split size a filler grows
//!   the collection so its ranges split during the run, and a watcher counts the splits.
//!
//! The `quiver` binary is not built by this crate: `cargo build -p cli` (or `cargo test
//! --workspace`) builds it into the same target dir; [`cluster::quiver_bin`] finds it there.
//! `QUIVER_NEMESIS_SEED=n` replays a seed; `QUIVER_TEST_KEEP=1` keeps the nodes' data and logs.

pub mod appends;
pub mod availability;
pub mod cluster;
pub mod crash;
pub mod damage;
pub mod nemesis;
pub mod proxy;
pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checker::history::{KvOp, KvOut, Recorder};
use checker::linearizable::{check_kv, CheckOptions, CheckReport};

use crate::availability::{ByKind, FaultAvailability};
use crate::cluster::Cluster;
use crate::nemesis::{NemesisLog, Schedule};
use crate::workload::{Store, Target, WorkloadConfig};

/// One run's shape.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    pub nodes: usize,
    /// Each fault kind this many times.
    pub rounds: usize,
    pub workload: WorkloadConfig,
    /// The append workload beside it (KV collections only; `None`: none).
    pub appends: Option<appends::AppendConfig>,
    /// The KV collection's split size (`create-collection --split-size`, e.g. `32KiB`); small
    /// enough, ranges split during the run (each split counted as a fault of kind `split`).
    pub split_size: Option<String>,
    /// With `Some(d)`: nodes run with `dead-after-ms` = `d` (else 60 s, so no fault removes
    /// a member) and the schedule has a long kill per round, held `d` + 2 s and until meta
    /// removed the node (a membership change); it is added back after it returns.
    pub dead_after: Option<Duration>,
}

impl RunConfig {
    /// `nodes` nodes, each fault kind `rounds` times, the default workload (a KV collection).
    pub fn new(seed: u64, nodes: usize, rounds: usize) -> RunConfig {
        RunConfig {
            seed,
            nodes,
            rounds,
            workload: WorkloadConfig::default(),
            appends: Some(appends::AppendConfig::default()),
            split_size: None,
            dead_after: None,
        }
    }
}

/// The seed to use: `QUIVER_NEMESIS_SEED` if set, else `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("QUIVER_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Figures of one run.
#[derive(Debug)]
pub struct RunReport {
    pub seed: u64,
    pub nodes: usize,
    pub check: CheckReport,
    pub faults: NemesisLog,
    /// What each fault cost the workload.
    pub availability: Vec<FaultAvailability>,
    pub lost_acknowledged: usize,
    /// The append check on the real replicas, when the run had appends.
    pub appends: Option<appends::AppendSummary>,
    /// With long kills: the time (after the final reads) until the range and meta had every
    /// replica back as voters (`Some(None)`: not within 60 s).
    pub refill: Option<Option<Duration>>,
    /// When the refill did not happen: meta's cell and the range as they were then.
    pub refill_state: String,
    /// Time from the final heal until meta served a write and a linearizable read again.
    pub recovery: Option<Duration>,
    /// Keys whose final read never succeeded.
    pub unread_keys: usize,
    /// What the proxies did to peer frames.
    pub proxy: String,
    pub wall: Duration,
}

impl RunReport {
    /// Anomalies found by the checker.
    pub fn anomalies(&self) -> usize {
        self.check.anomalies()
    }

    /// No anomaly (KV and append), no lost write, every key read, recovered after the heal,
    /// and every long-killed node back as a voter ([`RunReport::refilled`]).
    pub fn passed(&self) -> bool {
        self.check.is_linearizable()
            && self.lost_acknowledged == 0
            && self
                .appends
                .as_ref()
                .is_none_or(|a| a.anomalies == 0 && a.lost_acked == 0)
            && self.recovery.is_some()
            && self.unread_keys == 0
            && self.refilled()
    }

    /// False when a long-killed node did not become a voter of meta and of the range again.
    pub fn refilled(&self) -> bool {
        self.refill != Some(None)
    }

    /// Unavailability by fault kind.
    pub fn by_kind(&self) -> ByKind {
        let mut k = ByKind::default();
        k.add(&self.availability);
        k
    }

    /// The figures in one line.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self
            .faults
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        let appends = self
            .appends
            .as_ref()
            .map_or_else(|| "none".to_string(), |a| a.line());
        format!(
            "seed={} nodes={} histories={} ops={} (ok={} fail={} unknown={}) keys={} faults[{}] \
             unavailable(max/median)[{}] anomalies={} lost_acknowledged={} undecided_keys={} \
             unread_keys={} append[{}] membership[{}] recovery={} check={:.3}s wall={:.1}s \
             proxy[{}]",
            self.seed,
            self.nodes,
            self.check.histories,
            self.check.operations,
            self.check.ok,
            self.check.fail,
            self.check.unknown,
            self.check.keys,
            kinds.join(" "),
            self.by_kind().line(),
            self.anomalies(),
            self.lost_acknowledged,
            self.check.timed_out_keys.len(),
            self.unread_keys,
            appends,
            match self.refill {
                None => "no long kills".to_string(),
                Some(r) => format!(
                    "removed={} refilled={}",
                    self.faults.removed,
                    r.map_or_else(|| "NEVER".into(), |d| format!("{:.1}s", d.as_secs_f64()))
                ),
            },
            self.recovery
                .map(|d| format!("{:.2}s", d.as_secs_f64()))
                .unwrap_or_else(|| "NEVER".into()),
            self.check.elapsed.as_secs_f64(),
            self.wall.as_secs_f64(),
            self.proxy,
        )
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary())?;
        write!(f, "{}", self.by_kind())?;
        if !self.passed() {
            writeln!(
                f,
                "FAILED: replay with QUIVER_NEMESIS_SEED={} (nodes={})",
                self.seed, self.nodes
            )?;
            writeln!(f, "fault schedule:\n{}", self.faults)?;
            writeln!(f, "checker: {}", self.check)?;
            if let Some(a) = &self.appends {
                for (key, r) in &a.failing {
                    writeln!(f, "append log {key}:\n{r}")?;
                }
            }
        }
        if !self.refill_state.is_empty() {
            writeln!(f, "membership not refilled: {}", self.refill_state)?;
        }
        Ok(())
    }
}

/// Start a cluster, create meta and wait until it serves with every node a voter (up to 7).
///
/// # Panics
/// The cluster does not assemble within generous bounds.
pub async fn ready_cluster(nodes: usize) -> Cluster {
    ready_cluster_with(nodes, cluster::fast_flags()).await
}

/// [`ready_cluster`] with these node flags.
///
/// # Panics
/// As [`ready_cluster`].
pub async fn ready_cluster_with(nodes: usize, flags: Vec<(String, String)>) -> Cluster {
    let c = Cluster::start(nodes, flags).await;
    assert!(
        c.create_meta(0, Duration::from_secs(60)).await,
        "create-meta never succeeded; see {}",
        c.log(0).display()
    );
    assert!(
        c.wait_voters(nodes.min(7), Duration::from_secs(90)).await,
        "meta did not reach {} voters; logs in {}",
        nodes.min(7),
        c.dir.display()
    );
    assert!(
        c.wait_serving(Duration::from_secs(60)).await.is_some(),
        "meta does not serve"
    );
    c
}

/// One run: cluster, workload under the seeded nemesis, final heal, final reads, checks.
pub async fn run_nemesis(cfg: &RunConfig) -> RunReport {
    let t0 = Instant::now();
    let flags = match cfg.dead_after {
        Some(d) => cluster::fast_flags_with_dead_after(d),
        None => cluster::fast_flags(),
    };
    let mut c = ready_cluster_with(cfg.nodes, flags).await;
    let target = cfg.workload.target.clone();
    if let Target::Collection(name) = &target {
        let split: Vec<&str> = match &cfg.split_size {
            Some(s) => vec!["--split-size", s.as_str()],
            None => vec![],
        };
        assert!(
            c.create_collection_with(name, cfg.nodes.min(5), &split, Duration::from_secs(90))
                .await,
            "collection {name} does not serve with every replica a voter; logs in {}",
            c.dir.display()
        );
    }
    let schedule = Schedule::generate_with(
        cfg.seed,
        cfg.nodes,
        cfg.rounds,
        cfg.dead_after.map(|d| d + Duration::from_secs(2)),
    );
    let rec_start = Instant::now();
    let rec: Recorder<KvOp, KvOut> = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload::run(
        cfg.workload.clone(),
        c.client_addrs(),
        cfg.seed,
        cfg.seed,
        rec.clone(),
        stop.clone(),
    ));
    let append_logs = appends::AppendLogs::default();
    let mut appenders = match (&target, &cfg.appends) {
        (Target::Collection(name), Some(a)) => Some(appends::run(
            a,
            c.client_addrs(),
            name,
            append_logs.clone(),
            stop.clone(),
        )),
        _ => None,
    };
    // Splits, watched in meta's view (the ranges of the collection, polled).
    let splits = match &target {
        Target::Collection(name) => {
            let (cd, _) = c
                .lookup(name, b"k0")
                .await
                .expect("the collection's descriptor");
            Some(tokio::spawn(watch_splits(
                c.client(Duration::from_secs(1)),
                cd.id,
                t0,
                stop.clone(),
            )))
        }
        Target::Scratch => None,
    };
    // With a split size: a filler grows the collection at a steady pace (1 KiB values on keys
    // that sort between the workload's, one every 250 ms; not checked), so its ranges split
    // during the run however slow the machine is.
    let filler = match (&target, &cfg.split_size) {
        (Target::Collection(name), Some(_)) => Some(tokio::spawn(fill(
            c.client(Duration::from_secs(2)),
            name.clone(),
            cfg.workload.keys,
            stop.clone(),
        ))),
        _ => None,
    };
    // Some load before the first fault.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let collection = match &target {
        Target::Collection(n) => Some(n.as_str()),
        Target::Scratch => None,
    };
    let mut faults = nemesis::run(&mut c, &schedule, collection, t0).await;
    nemesis::heal(&mut c);
    let recovery = c.wait_target(&target, Duration::from_secs(60)).await;
    // Load on the healed cluster, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let load_end = Instant::now();
    joined(load).await;
    if let Some(set) = appenders.as_mut() {
        join_all(set).await;
    }
    if let Some(f) = filler {
        joined(f).await;
    }
    if let Some(w) = splits {
        let seen = joined(w).await.unwrap_or_default();
        let mut last = 1;
        for (at, n) in seen {
            faults.entries.push(nemesis::LogEntry {
                at,
                what: format!("split: the collection has {n} ranges"),
            });
            last = n;
        }
        faults.entries.sort_by_key(|e| e.at);
        if last > 1 {
            faults.by_kind.insert("split", last - 1);
        }
    }

    // Final linearizable reads of every key, recorded like any read.
    let st = Store::new(
        c.client(Duration::from_secs(3)),
        target.clone(),
        cfg.seed,
        false,
    );
    let mut finals = HashMap::new();
    let mut unread = 0;
    let final_process = 1u64 << 62;
    for k in 0..cfg.workload.keys {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            got = workload::recorded_get(&rec, &st, final_process + k, k).await;
            if got.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        match got {
            Some(v) => {
                finals.insert(k, v);
            }
            None => unread += 1,
        }
    }
    let mut refill_state = String::new();
    let refill = match cfg.dead_after {
        None => None,
        Some(_) => {
            let t = Instant::now();
            let want = cfg.nodes.min(5);
            let range_ok = match collection {
                Some(name) => c
                    .wait_range_voters(name, b"k0", want, Duration::from_secs(60))
                    .await
                    .is_some(),
                None => true,
            };
            let meta_ok = c
                .wait_voters(cfg.nodes.min(7), Duration::from_secs(60))
                .await;
            if !(range_ok && meta_ok) {
                refill_state = c.membership_state(collection).await;
            }
            Some((range_ok && meta_ok).then(|| t.elapsed()))
        }
    };
    let history = rec.finish();
    let append_summary = match (&target, appenders) {
        (Target::Collection(name), Some(_)) => Some(appends::check(&c, name, &append_logs).await),
        _ => None,
    };
    let check = check_kv(
        &history,
        &CheckOptions {
            deadline: Duration::from_secs(60),
            ..CheckOptions::default()
        },
    );
    let lost = workload::lost_acknowledged(&history, &finals);
    let availability = availability::measure(&history, rec_start, &faults.windows, load_end);
    if let Some(dir) = std::env::var_os("QUIVER_NEMESIS_HISTORY_DIR") {
        let p = std::path::Path::new(&dir).join(format!("history-{}.txt", cfg.seed));
        let _ = std::fs::write(&p, history.to_text());
    }
    RunReport {
        seed: cfg.seed,
        nodes: cfg.nodes,
        check,
        faults,
        availability,
        lost_acknowledged: lost,
        appends: append_summary,
        refill,
        refill_state,
        recovery,
        unread_keys: unread,
        proxy: c.proxy.stats().to_string(),
        wall: t0.elapsed(),
    }
}

/// The output of task `h`; `None` if it was cancelled. A panic in it goes on here.
async fn joined<T>(h: tokio::task::JoinHandle<T>) -> Option<T> {
    match h.await {
        Ok(v) => Some(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// Wait for every task of `set`. A panic in one goes on here.
pub(crate) async fn join_all(set: &mut tokio::task::JoinSet<()>) {
    while let Some(r) = set.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// Put 1 KiB values on keys `k<n>f<i>` (between the workload's keys `k<n>`) every 250 ms
/// until `stop`.
async fn fill(cl: client::Client, name: String, keys: u64, stop: Arc<AtomicBool>) {
    let kv = cl.kv(&name);
    let value = vec![b'f'; 1024];
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("k{}f{i}", i % keys.max(1));
        if kv.put(key.as_bytes(), &value).await.is_ok() {
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Poll meta's view of collection `id` every 250 ms until `stop`; each time its number of
/// ranges grew: when (since `t0`) and how many.
async fn watch_splits(
    cl: client::Client,
    id: u64,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<(Duration, usize)> {
    let mut seen = Vec::new();
    let mut last = 1;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(s) = cl.status().await {
            let n = s.ranges.iter().filter(|r| r.collection == id).count();
            if n > last {
                seen.push((t0.elapsed(), n));
                last = n;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    seen
}

/// Totals over several runs.
#[derive(Debug, Default)]
pub struct Totals {
    pub runs: usize,
    pub histories: usize,
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub faults: BTreeMap<&'static str, usize>,
    pub anomalies: usize,
    pub lost: usize,
    pub worst_recovery: Duration,
    /// Unavailability by fault kind over every run.
    pub unavailable: ByKind,
    /// Append checks: operations, entries, replica reads, anomalies, lost acknowledged.
    pub append_ops: usize,
    pub append_entries: usize,
    pub append_replica_reads: usize,
    pub append_anomalies: usize,
    pub append_lost: usize,
    /// Long kills after which the node was removed; runs whose replicas never came back.
    pub removed: usize,
    pub not_refilled: usize,
}

impl Totals {
    /// Add one run.
    pub fn add(&mut self, r: &RunReport) {
        self.runs += 1;
        self.histories += r.check.histories;
        self.ops += r.check.operations;
        self.ok += r.check.ok;
        self.fail += r.check.fail;
        self.unknown += r.check.unknown;
        for (k, n) in &r.faults.by_kind {
            *self.faults.entry(k).or_default() += n;
        }
        self.anomalies += r.anomalies();
        self.lost += r.lost_acknowledged;
        self.worst_recovery = self.worst_recovery.max(r.recovery.unwrap_or(Duration::MAX));
        self.unavailable.add(&r.availability);
        self.removed += r.faults.removed;
        self.not_refilled += usize::from(r.refill == Some(None));
        if let Some(a) = &r.appends {
            self.append_ops += a.operations;
            self.append_entries += a.entries;
            self.append_replica_reads += a.replica_reads;
            self.append_anomalies += a.anomalies;
            self.append_lost += a.lost_acked;
        }
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        write!(
            f,
            "runs={} histories={} ops={} (ok={} fail={} unknown={}) faults[{}] anomalies={} \
             lost_acknowledged={} worst_recovery={:.2}s append[ops={} entries={} replica_reads={} \
             anomalies={} lost_acked={}] membership[removed={} runs_not_refilled={}] \
             unavailable(max/median)[{}]\n{}",
            self.runs,
            self.histories,
            self.ops,
            self.ok,
            self.fail,
            self.unknown,
            kinds.join(" "),
            self.anomalies,
            self.lost,
            self.worst_recovery.as_secs_f64(),
            self.append_ops,
            self.append_entries,
            self.append_replica_reads,
            self.append_anomalies,
            self.append_lost,
            self.removed,
            self.not_refilled,
            self.unavailable.line(),
            self.unavailable
        )
    }
}
