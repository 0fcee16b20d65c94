//! The load phase and the two runners.
//!
//! A run, step by step:
//! 1. open `connections` backends from the factory; client `c` uses connection `c % connections`;
//! 2. start the clients (each with its own RNG and histogram: nothing shared on the hot path but
//!    one relaxed counter for the progress bar);
//! 3. at the end of the warm-up, sample CPU (this process, the server pids) and the fsync counter;
//! 4. at the end of the window, sample them again; clients stop sending;
//! 5. join the clients (an in-flight request still pending `DRAIN` after the end counts as an
//!    error) and merge their histograms into one [`RunReport`].
//!
//! Closed loop: a request is counted when it *completes* inside the window (throughput is
//! completions per second), with its latency from its send. Open loop: see [`crate::openloop`].

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::backend::{Backend, BackendError, BackendFactory};
use crate::hist::{merge_all, LatencyHist};
use crate::keys::{keyspace, value_of, KeyChooser};
use crate::openloop::{Outcome, Schedule, Window};
use crate::procstat::{self, StatError};
use crate::report::RunReport;
use crate::workload::{Mode, Workload};

/// How long clients may take to finish their last request after the window ends.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Why a run could not be made (a failed request is not one: it is counted).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Stat(#[from] StatError),
    #[error("load failed at record {record}: {source}")]
    Load { record: u64, source: BackendError },
    #[error("a client task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Everything a run needs besides the workload.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The workload, with any command-line overrides already applied.
    pub workload: Workload,
    /// Keys `0..records`.
    pub records: u64,
    /// Connections opened from the factory (capped at the client count).
    pub connections: usize,
    /// Discarded start of the run.
    pub warmup: Duration,
    /// Measured window.
    pub duration: Duration,
    /// Open loop: a send later than this after its intended start is late.
    pub late_after: Duration,
    /// Server processes whose CPU time is measured.
    pub server_pids: Vec<u32>,
    /// RNG seed (client `c` uses `seed + c`).
    pub seed: u64,
    /// Show a progress bar (only drawn when stdout is a terminal).
    pub progress: bool,
    /// Free tag copied into the report.
    pub label: Option<String>,
}

impl RunConfig {
    /// Defaults for `workload`: 100K records, 8 connections, 1 s warm-up, 10 s window.
    pub fn new(workload: Workload) -> Self {
        Self {
            workload,
            records: crate::workload::DEFAULT_RECORDS,
            connections: 8,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(10),
            late_after: Duration::from_millis(5),
            server_pids: Vec::new(),
            seed: 1,
            progress: false,
            label: None,
        }
    }
}

/// What a client task brings back.
#[derive(Debug, Default)]
struct ClientResult {
    hist: LatencyHist,
    requests: u64,
    ops: u64,
    errors: u64,
    not_found: u64,
    late: u64,
    missed: u64,
    first_error: Option<String>,
}

impl ClientResult {
    fn error(&mut self, e: &BackendError) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// What every client shares (read-only).
struct Plan {
    workload: Workload,
    keys: Vec<Bytes>,
    chooser: KeyChooser,
    value: Bytes,
    /// Completed requests, for the progress bar only.
    done: AtomicU64,
}

/// One request of a workload.
enum Request {
    Get,
    Put,
    PutBatch,
}

/// [`send`], given up at `deadline` (a request still out after the run's drain time) as a
/// failed request.
async fn send_until<B: Backend>(
    deadline: Instant,
    b: &B,
    plan: &Plan,
    rng: &mut SmallRng,
    batch: &mut Vec<(Bytes, Bytes)>,
) -> (u64, Result<bool, BackendError>) {
    match tokio::time::timeout_at(deadline.into(), send(b, plan, rng, batch)).await {
        Ok(x) => x,
        Err(_) => (
            0,
            Err(BackendError::Request {
                op: "request",
                reason: "timed out after the run".into(),
            }),
        ),
    }
}

/// Send one request; `Ok(found)` for gets (`true` for puts). Reuses `batch` as the buffer.
async fn send<B: Backend>(
    b: &B,
    plan: &Plan,
    rng: &mut SmallRng,
    batch: &mut Vec<(Bytes, Bytes)>,
) -> (u64, Result<bool, BackendError>) {
    let w = &plan.workload;
    let req = if w.read_percent > 0 && rng.gen_range(0..100) < w.read_percent {
        Request::Get
    } else if w.batch > 1 {
        Request::PutBatch
    } else {
        Request::Put
    };
    let key = |rng: &mut SmallRng| plan.keys[plan.chooser.next(rng) as usize].clone();
    match req {
        Request::Get => (1, b.get(key(rng), w.consistency).await.map(|v| v.is_some())),
        Request::Put => (1, b.put(key(rng), plan.value.clone()).await.map(|()| true)),
        Request::PutBatch => {
            // Distinct keys: etcd refuses a txn that puts one key twice, and a batch that
            // writes a key twice is not 16 writes anyway.
            batch.clear();
            let distinct = plan.keys.len() >= w.batch * 4;
            while batch.len() < w.batch {
                let k = key(rng);
                if !distinct || !batch.iter().any(|(b, _)| *b == k) {
                    batch.push((k, plan.value.clone()));
                }
            }
            (w.batch as u64, b.put_batch(batch).await.map(|()| true))
        }
    }
}

fn record(r: &mut ClientResult, ops: u64, res: Result<bool, BackendError>, latency: Duration) {
    match res {
        Ok(found) => {
            r.requests += 1;
            r.ops += ops;
            r.not_found += u64::from(!found);
            r.hist.record(latency);
        }
        Err(e) => r.error(&e),
    }
}

async fn closed_client<B: Backend>(
    b: Arc<B>,
    plan: Arc<Plan>,
    seed: u64,
    warm_end: Instant,
    end: Instant,
) -> ClientResult {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut batch = Vec::with_capacity(plan.workload.batch);
    let mut r = ClientResult::default();
    loop {
        let start = Instant::now();
        if start >= end {
            break;
        }
        let (ops, res) = send_until(end + DRAIN, &*b, &plan, &mut rng, &mut batch).await;
        let done = Instant::now();
        plan.done.fetch_add(1, Ordering::Relaxed);
        if done >= warm_end && (done <= end || res.is_err()) {
            record(&mut r, ops, res, done - start);
        }
    }
    r
}

struct OpenShared {
    schedule: Schedule,
    window: Window,
    next: AtomicU64,
    t0: Instant,
}

async fn open_client<B: Backend>(
    b: Arc<B>,
    plan: Arc<Plan>,
    open: Arc<OpenShared>,
    seed: u64,
) -> ClientResult {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut batch = Vec::with_capacity(plan.workload.batch);
    let mut r = ClientResult::default();
    let deadline = open.t0 + open.window.end + DRAIN;
    loop {
        let i = open.next.fetch_add(1, Ordering::Relaxed);
        let intended = open.schedule.intended(i);
        if intended >= open.window.end {
            break;
        }
        tokio::time::sleep_until((open.t0 + intended).into()).await;
        let now = open.t0.elapsed();
        if !open.window.may_send(intended, now) {
            if open.window.account(intended, None, now) == Outcome::Missed {
                r.missed += 1;
            }
            continue;
        }
        let (ops, res) = send_until(deadline, &*b, &plan, &mut rng, &mut batch).await;
        let done = open.t0.elapsed();
        plan.done.fetch_add(1, Ordering::Relaxed);
        match open.window.account(intended, Some(now), done) {
            Outcome::Measured { latency, late } => {
                r.late += u64::from(late);
                record(&mut r, ops, res, latency);
            }
            Outcome::Missed => r.missed += 1,
            Outcome::Warmup | Outcome::AfterEnd => {}
        }
    }
    r
}

fn progress_bar(show: bool, total: Duration, name: &str) -> ProgressBar {
    let target = if show && std::io::stdout().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(Some(total.as_millis() as u64), target);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>5} [{bar:30}] {elapsed:>4} {msg}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(name.to_string());
    pb
}

fn per_kop(delta: f64, ops: u64) -> Option<f64> {
    (ops > 0).then(|| delta * 1000.0 / ops as f64)
}

async fn connect_all<F: BackendFactory>(f: &F, n: usize) -> Result<Vec<Arc<F::Backend>>, RunError> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(Arc::new(f.connect(i).await?));
    }
    Ok(conns)
}

/// Run one workload and report it.
///
/// # Errors
/// A connection cannot be opened, a server pid cannot be read, or a client task panicked.
/// Failed requests are counted in the report, not returned.
pub async fn run<F: BackendFactory>(factory: &F, cfg: &RunConfig) -> Result<RunReport, RunError> {
    let w = &cfg.workload;
    let clients = w.clients.max(1);
    let conns = connect_all(factory, cfg.connections.clamp(1, clients)).await?;
    let plan = Arc::new(Plan {
        workload: w.clone(),
        keys: keyspace(cfg.records.max(1)),
        chooser: KeyChooser::new(w.keys, cfg.records),
        value: value_of(w.value_size, cfg.seed),
        done: AtomicU64::new(0),
    });

    let pb = progress_bar(cfg.progress, cfg.warmup + cfg.duration, w.name);
    let t0 = Instant::now();
    let (warm_end, end) = (t0 + cfg.warmup, t0 + cfg.warmup + cfg.duration);
    let open = match w.mode {
        Mode::Closed => None,
        Mode::Open { rate } => Some(Arc::new(OpenShared {
            schedule: Schedule::new(rate),
            window: Window {
                warmup: cfg.warmup,
                end: cfg.warmup + cfg.duration,
                late_after: cfg.late_after,
            },
            next: AtomicU64::new(0),
            t0,
        })),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (b, plan, seed) = (
            conns[c % conns.len()].clone(),
            plan.clone(),
            cfg.seed.wrapping_add(c as u64),
        );
        match &open {
            None => tasks.spawn(closed_client(b, plan, seed, warm_end, end)),
            Some(o) => tasks.spawn(open_client(b, plan, o.clone(), seed)),
        };
    }

    let tick = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            pb.set_position(t0.elapsed().as_millis() as u64);
            pb.set_message(format!("{} requests", plan.done.load(Ordering::Relaxed)));
        }
    };
    let sample = async {
        tokio::time::sleep_until(warm_end.into()).await;
        let cpu0 = procstat::cpu_sample(&cfg.server_pids)?;
        let fs0 = factory.fsync_count().await;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        tokio::time::sleep_until(end.into()).await;
        let cpu1 = procstat::cpu_sample(&cfg.server_pids)?;
        let fs1 = factory.fsync_count().await;
        Ok::<_, RunError>((cpu0, cpu1, fs0, fs1, started))
    };
    let (cpu0, cpu1, fs0, fs1, started) = tokio::select! {
        s = sample => s?,
        () = tick => unreachable!("the ticker never ends"),
    };

    let mut results = Vec::with_capacity(clients);
    while let Some(r) = tasks.join_next().await {
        results.push(r?);
    }
    pb.finish_and_clear();

    let hist = merge_all(results.iter().map(|r| &r.hist));
    let s = hist.summary();
    let sum = |f: fn(&ClientResult) -> u64| results.iter().map(f).sum::<u64>();
    let ops = sum(|r| r.ops);
    let secs = cfg.duration.as_secs_f64();
    Ok(RunReport {
        workload: w.name.to_string(),
        backend: factory.name().to_string(),
        label: cfg.label.clone(),
        mode: match w.mode {
            Mode::Closed => "closed".into(),
            Mode::Open { .. } => "open".into(),
        },
        clients,
        connections: conns.len(),
        keys: w.keys.to_string(),
        records: cfg.records,
        value_size: w.value_size,
        batch: w.batch,
        read_percent: w.read_percent,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: secs,
        requests: sum(|r| r.requests),
        ops,
        ops_per_s: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
        errors: sum(|r| r.errors),
        not_found: sum(|r| r.not_found),
        rate: match w.mode {
            Mode::Closed => None,
            Mode::Open { rate } => Some(rate),
        },
        late: sum(|r| r.late),
        missed: sum(|r| r.missed),
        p50_us: s.p50_us,
        p90_us: s.p90_us,
        p99_us: s.p99_us,
        p999_us: s.p999_us,
        max_us: s.max_us,
        mean_us: s.mean_us,
        cpu_server_s_per_kop: match (cpu0.1, cpu1.1) {
            (Some(a), Some(b)) => per_kop(b - a, ops),
            _ => None,
        },
        cpu_client_s_per_kop: per_kop(cpu1.0 - cpu0.0, ops),
        fsyncs_per_kop: match (fs0, fs1) {
            (Some(a), Some(b)) => per_kop(b.saturating_sub(a) as f64, ops),
            _ => None,
        },
        first_error: results.iter().find_map(|r| r.first_error.clone()),
        started_unix_s: started,
    })
}

/// What the load phase did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    pub records: u64,
    pub secs: f64,
    /// Requests that failed and were retried.
    pub retries: u64,
}

/// Write records `0..records` (values of `value_size` bytes) in batches of `batch` (falling back
/// to single puts if the backend has no batch), with `concurrency` tasks over `connections`.
///
/// # Errors
/// A connection cannot be opened, or a batch still fails after 5 tries.
pub async fn load<F: BackendFactory>(
    factory: &F,
    records: u64,
    value_size: usize,
    connections: usize,
    concurrency: usize,
    batch: usize,
    progress: bool,
) -> Result<LoadReport, RunError> {
    let concurrency = concurrency.max(1);
    let conns = connect_all(factory, connections.clamp(1, concurrency)).await?;
    let batch = batch.max(1) as u64;
    let chunks = records.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let value = value_of(value_size, 1);
    let t0 = Instant::now();
    let pb = progress_bar(progress, Duration::from_millis(chunks), "load");
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let (b, next, retries, value, pb) = (
            conns[c % conns.len()].clone(),
            next.clone(),
            retries.clone(),
            value.clone(),
            pb.clone(),
        );
        tasks.spawn(async move {
            loop {
                let chunk = next.fetch_add(1, Ordering::Relaxed);
                if chunk >= chunks {
                    return Ok(());
                }
                let lo = chunk * batch;
                let items: Vec<(Bytes, Bytes)> = (lo..(lo + batch).min(records))
                    .map(|i| (crate::keys::key_of(i), value.clone()))
                    .collect();
                let mut tries = 0;
                loop {
                    let res = if items.len() > 1 {
                        match b.put_batch(&items).await {
                            Err(BackendError::Unsupported { .. }) => {
                                let mut r = Ok(());
                                for (k, v) in &items {
                                    r = b.put(k.clone(), v.clone()).await;
                                    if r.is_err() {
                                        break;
                                    }
                                }
                                r
                            }
                            r => r,
                        }
                    } else {
                        b.put(items[0].0.clone(), items[0].1.clone()).await
                    };
                    match res {
                        Ok(()) => break,
                        Err(e) if tries >= 4 => {
                            return Err(RunError::Load {
                                record: lo,
                                source: e,
                            })
                        }
                        Err(_) => {
                            tries += 1;
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                        }
                    }
                }
                pb.inc(1);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    pb.finish_and_clear();
    Ok(LoadReport {
        records,
        secs: t0.elapsed().as_secs_f64(),
        retries: retries.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryFactory;

    fn quick(w: &str) -> RunConfig {
        let mut cfg = RunConfig::new(crate::workload::Workload::by_name(w).expect("workload"));
        cfg.records = 1000;
        cfg.warmup = Duration::from_millis(50);
        cfg.duration = Duration::from_millis(250);
        cfg.connections = 4;
        cfg
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_counts_ops_and_errors() {
        let f = MemoryFactory::new().with_fail_every(10);
        let mut cfg = quick("W2");
        cfg.server_pids = vec![std::process::id()];
        let r = run(&f, &cfg).await.expect("run");
        assert!(r.ops > 0 && r.requests == r.ops, "{r:?}");
        assert!(r.errors > 0, "every 10th request fails: {r:?}");
        // Roughly one error per nine successes; counted, not fatal.
        assert!(
            r.errors * 5 < r.requests && r.requests < r.errors * 20,
            "{r:?}"
        );
        assert!(r
            .first_error
            .as_deref()
            .is_some_and(|e| e.contains("injected")));
        assert_eq!(
            (r.clients, r.connections, r.backend.as_str()),
            (64, 4, "memory")
        );
        assert!(r.p50_us >= 1 && r.p50_us <= r.p99_us && r.p99_us <= r.max_us);
        assert!(r.cpu_server_s_per_kop.is_some() && r.cpu_client_s_per_kop.is_some());
        assert!(r.fsyncs_per_kop.is_some_and(|f| f > 0.0));
        assert!(
            f.requests() > r.requests,
            "warm-up requests are sent but not counted"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_reads_and_load() {
        let f = MemoryFactory::new();
        let lr = load(&f, 1000, 256, 4, 8, 16, false).await.expect("load");
        assert_eq!((lr.records, f.len()), (1000, 1000));

        let r = run(&f, &quick("W9")).await.expect("W9");
        assert!(
            r.ops > 0 && r.ops == r.requests * 16 && r.errors == 0,
            "{r:?}"
        );

        let r = run(&f, &quick("W7")).await.expect("W7");
        assert!(r.ops > 0 && r.errors == 0 && r.not_found == 0, "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_runs_at_its_rate() {
        let f = MemoryFactory::new().with_latency(Duration::from_millis(1));
        load(&f, 1000, 256, 2, 8, 16, false).await.expect("load");
        let mut cfg = quick("W12");
        cfg.workload.mode = Mode::Open { rate: 2000 };
        let r = run(&f, &cfg).await.expect("W12");
        // 2000/s over 250 ms intends 500 requests; all are sent or counted as missed.
        assert_eq!(r.requests + r.errors + r.missed, 500, "{r:?}");
        assert_eq!(r.rate, Some(2000));
        assert_eq!(r.mode, "open");
    }

    #[tokio::test]
    async fn quiver_without_seeds_is_a_typed_connect_error() {
        let f = crate::quiver::QuiverFactory {
            seeds: vec![],
            collection: "bench".into(),
        };
        let e = run(&f, &quick("W1")).await.expect_err("no seeds");
        assert!(e.to_string().contains("at least one seed"), "{e}");
    }
}
