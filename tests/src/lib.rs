//! Quiver's process-level fault harness (Jepsen / etcd robustness style).
//!
//! - [`cluster`]: real `quiver node` processes on 127.0.0.1 (kill -9 + restart, SIGSTOP /
//!   SIGCONT, create-meta, bounded waits), each child killed when the cluster drops.
//! - [`proxy`]: a userspace TCP fault proxy in front of every peer port; rules per directed
//!   link (pass, blackhole, delay, loss / cut), the dialer's id read from its first frame.
//! - [`nemesis`]: a seeded schedule of faults (kill, pause, partitions: majority/minority,
//!   bridge, isolate the leader, one-way; delay and loss windows), healed between faults.
//! - [`workload`]: clients recording a [`checker`] KV history (ok / fail / unknown) of puts,
//!   gets and compare-and-swaps on a KV collection (or puts and gets on meta's scratch space).
//! - [`run_nemesis`]: one whole run and its [`RunReport`].
//!
//! The `quiver` binary is not built by this crate: `cargo build -p cli` (or `cargo test
//! --workspace`) builds it into the same target dir; [`cluster::quiver_bin`] finds it there.
//! `QUIVER_NEMESIS_SEED=n` replays a seed; `QUIVER_TEST_KEEP=1` keeps the nodes' data and logs.

pub mod cluster;
pub mod nemesis;
pub mod proxy;
pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checker::history::{KvOp, KvOut, Recorder};
use checker::linearizable::{check_kv, CheckOptions, CheckReport, CheckResult};

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
}

impl RunConfig {
    /// `nodes` nodes, each fault kind `rounds` times, the default workload (a KV collection).
    pub fn new(seed: u64, nodes: usize, rounds: usize) -> RunConfig {
        RunConfig {
            seed,
            nodes,
            rounds,
            workload: WorkloadConfig::default(),
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
    pub lost_acknowledged: usize,
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

    /// No anomaly, no lost write, every key decided, recovered after the heal.
    pub fn passed(&self) -> bool {
        self.check.is_linearizable()
            && self.lost_acknowledged == 0
            && self.recovery.is_some()
            && self.unread_keys == 0
    }

    /// The figures in one line.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self
            .faults
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        format!(
            "seed={} nodes={} histories={} ops={} (ok={} fail={} unknown={}) keys={} faults[{}] \
             anomalies={} lost_acknowledged={} undecided_keys={} unread_keys={} recovery={} \
             check={:.3}s wall={:.1}s proxy[{}]",
            self.seed,
            self.nodes,
            self.check.histories,
            self.check.operations,
            self.check.ok,
            self.check.fail,
            self.check.unknown,
            self.check.keys,
            kinds.join(" "),
            self.anomalies(),
            self.lost_acknowledged,
            self.check.timed_out_keys.len(),
            self.unread_keys,
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
        if !self.passed() {
            writeln!(
                f,
                "FAILED: replay with QUIVER_NEMESIS_SEED={} (nodes={})",
                self.seed, self.nodes
            )?;
            writeln!(f, "fault schedule:\n{}", self.faults)?;
            writeln!(f, "checker: {}", self.check)?;
            if let CheckResult::Illegal { key, slice } = &self.check.result {
                writeln!(f, "smallest failing slice (key {key}):\n{slice}")?;
            }
        }
        Ok(())
    }
}

/// Start a cluster, create meta and wait until it serves with every node a voter (up to 7).
///
/// # Panics
/// The cluster does not assemble within generous bounds.
pub async fn ready_cluster(nodes: usize) -> Cluster {
    let c = Cluster::start(nodes, cluster::fast_flags()).await;
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
    let mut c = ready_cluster(cfg.nodes).await;
    let target = cfg.workload.target.clone();
    if let Target::Collection(name) = &target {
        assert!(
            c.create_collection(name, cfg.nodes.min(5), Duration::from_secs(90))
                .await,
            "collection {name} does not serve; logs in {}",
            c.dir.display()
        );
    }
    let schedule = Schedule::generate(cfg.seed, cfg.nodes, cfg.rounds);
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
    // Some load before the first fault.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let faults = nemesis::run(&mut c, &schedule, t0).await;
    nemesis::heal(&mut c);
    let recovery = c.wait_target(&target, Duration::from_secs(60)).await;
    // Load on the healed cluster, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;

    // Final linearizable reads of every key, recorded like any read.
    let st = Store::new(c.client(Duration::from_secs(3)), target, cfg.seed, false);
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
    let history = rec.finish();
    let check = check_kv(
        &history,
        &CheckOptions {
            deadline: Duration::from_secs(60),
            ..CheckOptions::default()
        },
    );
    let lost = workload::lost_acknowledged(&history, &finals);
    if let Some(dir) = std::env::var_os("QUIVER_NEMESIS_HISTORY_DIR") {
        let p = std::path::Path::new(&dir).join(format!("history-{}.txt", cfg.seed));
        let _ = std::fs::write(&p, history.to_text());
    }
    RunReport {
        seed: cfg.seed,
        nodes: cfg.nodes,
        check,
        faults,
        lost_acknowledged: lost,
        recovery,
        unread_keys: unread,
        proxy: c.proxy.stats().to_string(),
        wall: t0.elapsed(),
    }
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
             lost_acknowledged={} worst_recovery={:.2}s",
            self.runs,
            self.histories,
            self.ops,
            self.ok,
            self.fail,
            self.unknown,
            kinds.join(" "),
            self.anomalies,
            self.lost,
            self.worst_recovery.as_secs_f64()
        )
    }
}
