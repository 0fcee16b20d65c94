//! quiver-bench: the load harness behind `quiver bench` and `bench/compare-etcd.sh`.
//!
//! # Layout
//!
//! - [`backend`]: the [`Backend`] trait a system under test implements (put, get with a
//!   [`Consistency`], batched put, optional CAS) and the [`BackendFactory`] that opens its
//!   connections. The harness knows nothing else about the system.
//! - [`memory`]: an in-process backend (a map behind a lock, optional injected latency and
//!   errors) for tests and for checking the harness itself.
//! - [`etcd`] (feature `etcd`): etcd v3 over gRPC, the comparison baseline.
//! - [`quiver`]: the Quiver backend, the `client` crate's KV handle on one collection.
//! - [`keys`]: key generators, uniform and YCSB's zipfian (theta 0.99), and key encoding.
//! - [`workload`]: the workloads W1..W12 as data, looked up with [`Workload::by_name`].
//! - [`hist`]: HDR latency histograms per client, merged per run, and their summary.
//! - [`openloop`]: the open-loop schedule: intended start times and the latency/late/missed
//!   accounting that avoids coordinated omission (pure, tested on a fake clock).
//! - [`runner`]: the load phase, the closed-loop runner and the open-loop runner.
//! - [`procstat`]: CPU seconds of this process and of server pids from `/proc/<pid>/stat`,
//!   and fsync counters scraped from a Prometheus `/metrics` page.
//! - [`report`]: one [`RunReport`] per run, as a JSON line and as a table; the Markdown
//!   comparison table `compare-etcd.sh` writes into `docs/benchmarks.md`.
//! - [`cli`]: [`BenchArgs`] (clap derive) and [`run_cli`], called by the `quiver-bench`
//!   binary and, later, by `quiver bench`.
//!
//! # What a number means
//!
//! Latency is measured per request: in the closed loop from the moment a client sends, in the
//! open loop from the moment the schedule *intended* the request to start. Only requests that
//! complete after the warm-up and before the end of the run are counted. A batched put counts
//! as one request (one latency sample) and as `batch` ops in ops/s.

pub mod backend;
pub mod cli;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod hist;
pub mod keys;
pub mod memory;
pub mod openloop;
pub mod procstat;
pub mod quiver;
pub mod report;
pub mod runner;
pub mod workload;

pub use backend::{Backend, BackendError, BackendFactory, Consistency};
pub use cli::{run_cli, BenchArgs, BenchError};
pub use report::RunReport;
pub use workload::Workload;
