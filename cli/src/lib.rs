//! The `quiver` command line: thin wrappers over `seed` (the node) and `client`.
//!
//! # Layout
//! - this file: [`Cli`] (clap derive), [`run`], logging set-up, `node` and `create-meta`.
//! - [`kv`]: `quiver create-collection` and `quiver kv get|put|del|cas|scan|watch`.
//! - [`status`]: `quiver status` (table or `--json`; range leaders from every reachable node).
//! - [`demo`]: `quiver demo`, a local cluster of child processes with a short workload.

pub mod demo;
pub mod kv;
pub mod status;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto::metapb::{ControlRequest, ControlResponse_oneof_kind, CreateMeta};

/// Quiver: a self-assembling distributed store.
#[derive(Debug, Parser)]
#[command(
    name = "quiver",
    version,
    about = "Quiver: a self-assembling distributed store"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Node(Box<seed::NodeArgs>),
    /// Create meta (once per cluster) on a seed node.
    CreateMeta(CreateMetaArgs),
    /// Show nodes and ranges, each range with its collection's name and its leader (every
    /// reachable node is asked).
    Status(status::StatusArgs),
    /// Create a collection (its first range is placed by self-assignment).
    CreateCollection(Box<kv::CreateCollectionArgs>),
    /// Read and write a KV collection.
    #[command(subcommand)]
    Kv(kv::KvCommand),
    /// Load a running cluster and measure it (the `quiver-bench` harness).
    Bench(Box<quiver_bench::BenchArgs>),
    /// Start a local cluster of child processes, run a short workload, stay up until Ctrl-C.
    Demo(demo::DemoArgs),
}

/// `quiver create-meta` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateMetaArgs {
    /// Peer address of the seed that creates meta and becomes its first member.
    #[arg(long)]
    pub seed: SocketAddr,
    /// The cluster secret (peer operations need it).
    #[arg(long, env = "QUIVER_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: String,
    /// Cluster name.
    #[arg(long, env = "QUIVER_CLUSTER", default_value = "quiver")]
    pub cluster: String,
    /// Meta's target replication factor.
    #[arg(long, default_value_t = meta::META_REPLICATION_FACTOR)]
    pub replication_factor: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

/// Why a command failed: one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] seed::config::ConfigError),
    #[error("{0}")]
    Start(#[from] seed::StartError),
    #[error("{0}")]
    Client(#[from] client::ClientError),
    #[error("{0}")]
    Msg(String),
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| CliError::Msg(format!("cannot start the async runtime: {e}")))
}

fn init_logs(default: &str) {
    let filter = std::env::var("QUIVER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Run one command.
///
/// # Errors
/// Whatever stopped the command, as one line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Node(args) => {
            init_logs("info");
            let settings = seed::Settings::resolve(&args)?;
            runtime(2)?.block_on(seed::run(settings, stop_signal()))?;
            Ok(())
        }
        Command::CreateMeta(a) => {
            init_logs("warn");
            runtime(1)?.block_on(create_meta(&a))
        }
        Command::Status(a) => {
            init_logs("warn");
            runtime(1)?.block_on(status::run(&a))
        }
        Command::CreateCollection(a) => {
            init_logs("warn");
            runtime(1)?.block_on(kv::create_collection(&a))
        }
        Command::Kv(k) => {
            init_logs("warn");
            runtime(1)?.block_on(kv::run(&k))
        }
        Command::Bench(a) => {
            init_logs("warn");
            runtime(2)?
                .block_on(quiver_bench::run_cli(*a))
                .map_err(|e| CliError::Msg(e.to_string()))
        }
        Command::Demo(a) => {
            init_logs("warn");
            demo::run(&a)
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Send CreateMeta to a seed's peer port.
///
/// # Errors
/// The seed refused (meta exists) or cannot be reached.
pub async fn create_meta(a: &CreateMetaArgs) -> Result<(), CliError> {
    let dialer = seed::control::Dialer {
        cluster: a.cluster.clone(),
        secret: a.cluster_secret.clone().into_bytes(),
        from: 0,
        timeout: Duration::from_secs(a.timeout_secs),
    };
    let mut req = ControlRequest::new();
    let mut cm = CreateMeta::new();
    cm.replication_factor = a.replication_factor;
    req.set_create_meta(cm);
    let resp = dialer
        .call(a.seed, req)
        .await
        .map_err(|e| CliError::Msg(format!("create-meta at {}: {e}", a.seed)))?;
    match resp.kind {
        Some(ControlResponse_oneof_kind::created(c)) => {
            println!("meta created on node {} ({})", c.node, a.seed);
            Ok(())
        }
        Some(ControlResponse_oneof_kind::error(e)) => Err(CliError::Msg(format!(
            "create-meta refused by {}: {}",
            a.seed, e.message
        ))),
        _ => Err(CliError::Msg("unexpected answer to create-meta".into())),
    }
}
