//! `quiver bench` / `quiver-bench`: flags, and the loop over workloads.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::backend::{BackendError, BackendFactory};
use crate::keys::KeyDist;
use crate::report::{self, RunReport};
use crate::runner::{self, RunConfig, RunError};
use crate::workload::{Mode, Workload};

/// Which system to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// A Quiver cluster reached through `--seeds`.
    Quiver,
    /// An etcd cluster reached through `--endpoints` (needs the `etcd` cargo feature).
    Etcd,
    /// An in-process map: measures the harness itself.
    Memory,
}

/// What to print on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON line per run as it ends, then the table.
    Both,
    /// One JSON line per run.
    Json,
    /// The table at the end.
    Table,
}

/// When to load the records before the workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadWhen {
    /// Before the first workload that reads (once per invocation).
    Auto,
    /// Before the first workload, whatever it is.
    Always,
    /// Never (the records are already there).
    Never,
}

/// Load a running cluster and measure it: closed-loop workloads (C clients over K connections,
/// fixed duration, warm-up discarded) and an open-loop one (fixed rate, latency from the
/// intended start). Prints one JSON line per run and a table.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "quiver-bench", version)]
pub struct BenchArgs {
    /// System under test.
    #[arg(long, value_enum, default_value_t = BackendKind::Quiver)]
    pub backend: BackendKind,
    /// Quiver: client addresses of seed nodes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7400")]
    pub seeds: Vec<String>,
    /// Quiver: the KV collection to use.
    #[arg(long, default_value = "bench")]
    pub collection: String,
    /// etcd: client URLs, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// Workloads to run, comma separated (W1..W10, W12), or `all`.
    #[arg(long, short, value_delimiter = ',', default_value = "all")]
    pub workloads: Vec<String>,
    /// Measured seconds per workload [default: 10, or 2 with --quick].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Warm-up seconds per workload, not measured [default: 1, or 0.5 with --quick].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Records in the key space [default: 100000, or 10000 with --quick].
    #[arg(long)]
    pub records: Option<u64>,
    /// Short runs: 0.5 s warm-up, 2 s measured, 10K records (explicit flags win).
    #[arg(long)]
    pub quick: bool,
    /// Override the client count of every workload (open loop: maximum in flight).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Connections the clients share (capped at the client count).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Override the value size (bytes) of every workload.
    #[arg(long)]
    pub value_size: Option<usize>,
    /// Override the key distribution of every workload: uniform or zipfian.
    #[arg(long)]
    pub keys: Option<KeyDist>,
    /// Open-loop rate, requests per second [default: 1000].
    #[arg(long)]
    pub rate: Option<u64>,
    /// Open loop: a request sent more than this many milliseconds after its intended start is
    /// counted as late (tokio timers have 1 ms resolution, so less than 2 flags timer jitter).
    #[arg(long, default_value_t = 5.0)]
    pub late_after_ms: f64,
    /// When to load the records (keys 0..records, 256 B values) before the workloads.
    #[arg(long, value_enum, default_value_t = LoadWhen::Auto)]
    pub load: LoadWhen,
    /// Concurrent batched puts during the load.
    #[arg(long, default_value_t = 64)]
    pub load_concurrency: usize,
    /// Server pids whose CPU time (/proc/<pid>/stat) is reported per 1,000 ops, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Prometheus pages to read the fsync counter from, comma separated
    /// [default for etcd: <endpoint>/metrics].
    #[arg(long, value_delimiter = ',')]
    pub metrics_urls: Vec<String>,
    /// Name of the fsync counter in those pages [default for etcd:
    /// etcd_disk_wal_fsync_duration_seconds_count].
    #[arg(long)]
    pub fsync_metric: Option<String>,
    /// Free tag copied into every JSON line (e.g. rep=2).
    #[arg(long)]
    pub label: Option<String>,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// What to print on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Both)]
    pub format: OutputFormat,
    /// Also append the JSON lines to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Hide the progress bar (it is hidden anyway when stdout is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Run nothing: read JSON lines from these files and print the Markdown comparison table
    /// (medians over repetitions, ratio --numerator / --denominator).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub report_from: Vec<PathBuf>,
    /// With --report-from: also print the bar (W2/W4 at 10x the denominator, W1 p50
    /// under 0.3 ms) in absolute numbers, and where the numerator stands.
    #[arg(long)]
    pub bar: bool,
    /// Backend on the top of the ratio in --report-from.
    #[arg(long, default_value = "quiver")]
    pub numerator: String,
    /// Backend on the bottom of the ratio in --report-from.
    #[arg(long, default_value = "etcd")]
    pub denominator: String,
}

/// Why `quiver bench` stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown workload {0:?} (W1..W10, W12 or all)")]
    UnknownWorkload(String),
    #[error("{0}")]
    Run(#[from] RunError),
    #[error("the etcd backend is not compiled in: build with `--features etcd` (needs protoc)")]
    EtcdNotCompiled,
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a JSON line of a run: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid argument {arg}: {why}")]
    InvalidArgument { arg: &'static str, why: String },
}

impl From<BackendError> for BenchError {
    fn from(e: BackendError) -> Self {
        Self::Run(RunError::Backend(e))
    }
}

impl BenchArgs {
    /// The workloads selected by `--workloads`, with the overrides applied.
    ///
    /// # Errors
    /// An unknown workload name.
    pub fn selected(&self) -> Result<Vec<Workload>, BenchError> {
        let mut out = Vec::new();
        for name in &self.workloads {
            if name.eq_ignore_ascii_case("all") {
                out.extend(Workload::all());
            } else {
                out.push(
                    Workload::by_name(name)
                        .ok_or_else(|| BenchError::UnknownWorkload(name.clone()))?,
                );
            }
        }
        for w in &mut out {
            if let Some(c) = self.clients {
                w.clients = c.max(1);
            }
            if let Some(v) = self.value_size {
                w.value_size = v;
            }
            if let Some(k) = self.keys {
                w.keys = k;
            }
            if let (Some(r), Mode::Open { .. }) = (self.rate, w.mode) {
                w.mode = Mode::Open { rate: r.max(1) };
            }
        }
        Ok(out)
    }

    fn secs(
        &self,
        v: Option<f64>,
        normal: f64,
        quick: f64,
        arg: &'static str,
    ) -> Result<Duration, BenchError> {
        let s = v.unwrap_or(if self.quick { quick } else { normal });
        Duration::try_from_secs_f64(s).map_err(|e| BenchError::InvalidArgument {
            arg,
            why: e.to_string(),
        })
    }

    /// The run configuration for `w`.
    ///
    /// # Errors
    /// A negative or non-finite duration.
    pub fn run_config(&self, w: Workload) -> Result<RunConfig, BenchError> {
        Ok(RunConfig {
            workload: w,
            records: self.records(),
            connections: self.connections,
            warmup: self.secs(self.warmup, 1.0, 0.5, "--warmup")?,
            duration: self.secs(self.duration, 10.0, 2.0, "--duration")?,
            late_after: Duration::try_from_secs_f64(self.late_after_ms / 1000.0).map_err(|e| {
                BenchError::InvalidArgument {
                    arg: "--late-after-ms",
                    why: e.to_string(),
                }
            })?,
            server_pids: self.server_pids.clone(),
            seed: self.seed,
            progress: !self.no_progress,
            label: self.label.clone(),
        })
    }

    /// Records in the key space.
    pub fn records(&self) -> u64 {
        self.records
            .unwrap_or(if self.quick {
                10_000
            } else {
                crate::workload::DEFAULT_RECORDS
            })
            .max(1)
    }
}

/// A factory with an optional fsync counter from `--metrics-urls` / `--fsync-metric`.
struct WithMetrics<F> {
    inner: F,
    urls: Vec<String>,
    metric: Option<String>,
}

impl<F: BackendFactory> BackendFactory for WithMetrics<F> {
    type Backend = F::Backend;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn connect(&self, index: usize) -> Result<F::Backend, BackendError> {
        self.inner.connect(index).await
    }

    async fn fsync_count(&self) -> Option<u64> {
        match (&self.metric, self.urls.is_empty()) {
            (Some(m), false) => crate::procstat::scrape_sum(&self.urls, m).await,
            _ => self.inner.fsync_count().await,
        }
    }
}

/// Run `quiver bench` with parsed flags: load if needed, run each workload, print.
///
/// # Errors
/// Bad flags, a backend that cannot be reached or is not built, a failed load, an unwritable
/// `--json-out`.
pub async fn run_cli(args: BenchArgs) -> Result<(), BenchError> {
    if !args.report_from.is_empty() {
        return print_comparison(&args);
    }
    match args.backend {
        BackendKind::Memory => {
            run_all(&wrap(crate::memory::MemoryFactory::new(), &args), &args).await
        }
        BackendKind::Quiver => {
            let f = crate::quiver::QuiverFactory {
                seeds: args.seeds.clone(),
                collection: args.collection.clone(),
            };
            run_all(&wrap(f, &args), &args).await
        }
        BackendKind::Etcd => run_etcd(&args).await,
    }
}

/// `inner` with the server-side fsync counter of `--metrics-urls` / `--fsync-metric`.
fn wrap<F>(inner: F, args: &BenchArgs) -> WithMetrics<F> {
    WithMetrics {
        inner,
        urls: args.metrics_urls.clone(),
        metric: args.fsync_metric.clone(),
    }
}

#[cfg(feature = "etcd")]
async fn run_etcd(args: &BenchArgs) -> Result<(), BenchError> {
    let mut f = crate::etcd::EtcdFactory::new(args.endpoints.clone());
    if !args.metrics_urls.is_empty() && args.fsync_metric.is_none() {
        f.metrics_urls = args.metrics_urls.clone();
    }
    run_all(&wrap(f, args), args).await
}

#[cfg(not(feature = "etcd"))]
async fn run_etcd(_args: &BenchArgs) -> Result<(), BenchError> {
    Err(BenchError::EtcdNotCompiled)
}

fn print_comparison(args: &BenchArgs) -> Result<(), BenchError> {
    let mut runs = Vec::new();
    for p in &args.report_from {
        let path = p.display().to_string();
        let text = std::fs::read_to_string(p).map_err(|source| BenchError::Io {
            path: path.clone(),
            source,
        })?;
        runs.extend(
            report::parse_lines(&text).map_err(|source| BenchError::Parse { path, source })?,
        );
    }
    print!(
        "{}",
        report::markdown_comparison(&runs, &args.numerator, &args.denominator)
    );
    if args.bar {
        println!();
        print!(
            "{}",
            report::markdown_bar(&runs, &args.numerator, &args.denominator)
        );
    }
    Ok(())
}

async fn run_all<F: BackendFactory>(f: &F, args: &BenchArgs) -> Result<(), BenchError> {
    let workloads = args.selected()?;
    let mut json_out = match &args.json_out {
        None => None,
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| BenchError::Io {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
    };
    let mut loaded = args.load == LoadWhen::Never;
    let mut reports: Vec<RunReport> = Vec::new();
    for w in workloads {
        if !loaded && (args.load == LoadWhen::Always || w.needs_load()) {
            let records = args.records();
            eprintln!("{}: loading {records} records ...", f.name());
            let lr = runner::load(
                f,
                records,
                crate::workload::DEFAULT_VALUE_SIZE,
                args.connections,
                args.load_concurrency,
                16,
                !args.no_progress,
            )
            .await?;
            eprintln!(
                "{}: loaded {} records in {:.1} s ({} retries)",
                f.name(),
                lr.records,
                lr.secs,
                lr.retries
            );
            loaded = true;
        }
        let cfg = args.run_config(w)?;
        let r = runner::run(f, &cfg).await?;
        let line = r.json_line();
        if matches!(args.format, OutputFormat::Both | OutputFormat::Json) {
            println!("{line}");
        }
        if let Some(file) = &mut json_out {
            writeln!(file, "{line}").map_err(|source| BenchError::Io {
                path: args
                    .json_out
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                source,
            })?;
        }
        reports.push(r);
    }
    if matches!(args.format, OutputFormat::Both | OutputFormat::Table) {
        println!("{}", report::table(&reports));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn every_flag_is_documented() {
        BenchArgs::command().debug_assert();
        for a in BenchArgs::command().get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(a.get_help().is_some(), "--{id} has no help");
        }
    }

    #[test]
    fn overrides_and_quick_defaults() {
        let a = BenchArgs::parse_from([
            "quiver-bench",
            "--quick",
            "-w",
            "W2,w12",
            "--clients",
            "3",
            "--rate",
            "50",
            "--keys",
            "zipfian",
        ]);
        let ws = a.selected().expect("workloads");
        assert_eq!(ws.iter().map(|w| w.name).collect::<Vec<_>>(), ["W2", "W12"]);
        assert!(ws
            .iter()
            .all(|w| w.clients == 3 && w.keys == KeyDist::Zipfian));
        assert_eq!(ws[1].mode, Mode::Open { rate: 50 });
        let c = a.run_config(ws[0].clone()).expect("config");
        assert_eq!(
            (c.duration, c.warmup, c.records),
            (Duration::from_secs(2), Duration::from_millis(500), 10_000)
        );
        let bad = BenchArgs::parse_from(["quiver-bench", "-w", "W11"]);
        assert!(matches!(
            bad.selected(),
            Err(BenchError::UnknownWorkload(_))
        ));
        assert_eq!(
            BenchArgs::parse_from(["quiver-bench"])
                .selected()
                .map(|w| w.len())
                .ok(),
            Some(11)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_end_to_end_writes_json_lines() {
        let dir = std::env::temp_dir().join(format!("quiver-bench-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let a = BenchArgs::parse_from(
            [
                "quiver-bench",
                "--backend",
                "memory",
                "-w",
                "W1,W8",
                "--duration",
                "0.2",
                "--warmup",
                "0.05",
                "--records",
                "500",
                "--format",
                "json",
                "--no-progress",
                "--label",
                "rep=1",
                "--json-out",
            ]
            .into_iter()
            .map(String::from)
            .chain([dir.display().to_string()]),
        );
        run_cli(a).await.expect("run");
        let text = std::fs::read_to_string(&dir).expect("json out");
        let _ = std::fs::remove_file(&dir);
        let runs = report::parse_lines(&text).expect("lines");
        assert_eq!(runs.len(), 2);
        assert!(runs
            .iter()
            .all(|r| r.ops > 0 && r.label.as_deref() == Some("rep=1")));
        assert_eq!(runs[1].not_found, 0, "W8 reads after the load");
    }
}
