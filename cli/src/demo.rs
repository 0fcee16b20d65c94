//! `quiver demo`: a local cluster of `quiver node` child processes on 127.0.0.1, bootstrapped
//! and exercised; also the harness the process tests use ([`LocalCluster`]).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

use crate::status::{self, ClusterStatus};
use crate::CliError;

/// `quiver demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Writes (and as many reads) in the workload.
    #[arg(long, default_value_t = 2000)]
    pub ops: u64,
    /// Exit after the workload instead of waiting for Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
}

/// Addresses and data dir of one child node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub data_dir: PathBuf,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub admin: SocketAddr,
}

/// Child `quiver node` processes; every child is killed when this is dropped.
#[derive(Debug)]
pub struct LocalCluster {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub secret: String,
    pub nodes: Vec<NodeSpec>,
    pub seeds: Vec<SocketAddr>,
    /// Extra `--flag value` pairs for every node (e.g. short ticks in tests).
    pub extra: Vec<(String, String)>,
    children: Vec<Option<Child>>,
}

/// A free port on 127.0.0.1 for a node to listen on later.
///
/// The port is chosen outside the kernel's ephemeral range when it can be: a port that
/// `bind(0)` returns is released before the node binds it, and meanwhile any outgoing
/// connection (every control call dials anew) may take it as its local port, so the node
/// would exit with "Address already in use". Ports handed out by this process are never
/// handed out twice.
///
/// # Errors
/// No port could be bound.
pub fn free_addr() -> Result<SocketAddr, CliError> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((lo, hi)) = non_ephemeral_ports() {
        let mut rng = rand::thread_rng();
        for _ in 0..1000 {
            let port = rng.gen_range(lo..=hi);
            if given.contains(&port) {
                continue;
            }
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                if let Ok(a) = l.local_addr() {
                    given.push(port);
                    return Ok(a);
                }
            }
        }
    }
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| CliError::Msg(format!("no free port: {e}")))?;
        let a = l
            .local_addr()
            .map_err(|e| CliError::Msg(format!("no free port: {e}")))?;
        if !given.contains(&a.port()) {
            given.push(a.port());
            return Ok(a);
        }
    }
    Err(CliError::Msg(
        "no free port: every port the kernel offered was taken".into(),
    ))
}

/// A range of ports the kernel does not hand out as ephemeral (local) ports, if any.
fn non_ephemeral_ports() -> Option<(u16, u16)> {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    if lo >= 12_000 {
        Some((10_000, (lo - 1) as u16))
    } else if hi <= 63_000 {
        Some(((hi + 1) as u16, 65_000))
    } else {
        None
    }
}

/// What a local `quiver node` child is started with (the demo's and the tests' clusters).
#[derive(Debug)]
pub struct NodeCommand<'a> {
    /// The `quiver` binary.
    pub exe: &'a Path,
    /// Its data dir; its output goes to `<data dir>.log`.
    pub data_dir: &'a Path,
    /// `--listen`.
    pub client: SocketAddr,
    /// `--peer-listen`.
    pub peer: SocketAddr,
    /// `--advertise-peer` (a fault proxy in front of the peer port), if any.
    pub advertise_peer: Option<SocketAddr>,
    /// `--admin-listen`, if any.
    pub admin: Option<SocketAddr>,
    /// `--seeds` (peer addresses).
    pub seeds: &'a [SocketAddr],
    /// `--zone`.
    pub zone: String,
    /// The cluster secret (passed in the environment, never on the command line).
    pub secret: &'a str,
    /// Extra `--name value` flags.
    pub flags: &'a [(String, String)],
}

/// The command that starts one local node as `spec` says, with stdout and stderr appended to
/// `<data dir>.log` and `QUIVER_LOG=info` unless a log level is already set.
///
/// # Errors
/// The log file cannot be opened.
pub fn node_command(spec: &NodeCommand<'_>) -> Result<Command, CliError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(spec.data_dir))
        .map_err(|e| CliError::Msg(format!("log file: {e}")))?;
    let err = log
        .try_clone()
        .map_err(|e| CliError::Msg(format!("log file: {e}")))?;
    let seeds: Vec<String> = spec.seeds.iter().map(|s| s.to_string()).collect();
    let mut cmd = Command::new(spec.exe);
    cmd.arg("node")
        .arg("--data-dir")
        .arg(spec.data_dir)
        .arg("--listen")
        .arg(spec.client.to_string())
        .arg("--peer-listen")
        .arg(spec.peer.to_string())
        .arg("--seeds")
        .arg(seeds.join(","))
        .arg("--zone")
        .arg(&spec.zone)
        .env("QUIVER_CLUSTER_SECRET", spec.secret)
        .env_remove("QUIVER_CONFIG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    if let Some(a) = spec.advertise_peer {
        cmd.arg("--advertise-peer").arg(a.to_string());
    }
    if let Some(a) = spec.admin {
        cmd.arg("--admin-listen").arg(a.to_string());
    }
    if std::env::var_os("QUIVER_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        cmd.env("QUIVER_LOG", "info");
    }
    for (k, v) in spec.flags {
        cmd.arg(format!("--{k}")).arg(v);
    }
    Ok(cmd)
}

impl LocalCluster {
    /// Lay out `n` nodes under `dir` (nothing is started); the first min(n, 3) are seeds.
    ///
    /// # Errors
    /// No free ports.
    pub fn new(
        exe: PathBuf,
        dir: PathBuf,
        n: usize,
        extra: Vec<(String, String)>,
    ) -> Result<Self, CliError> {
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(NodeSpec {
                data_dir: dir.join(format!("node-{}", i + 1)),
                client: free_addr()?,
                peer: free_addr()?,
                admin: free_addr()?,
            });
        }
        let seeds = nodes.iter().take(3).map(|n| n.peer).collect();
        let secret: String = (0..24)
            .map(|_| {
                char::from(
                    b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::thread_rng().gen_range(0..36)],
                )
            })
            .collect();
        Ok(LocalCluster {
            exe,
            dir,
            secret,
            children: (0..n).map(|_| None).collect(),
            nodes,
            seeds,
            extra,
        })
    }

    /// Start node `i` (again); its output goes to `<data dir>.log`.
    ///
    /// # Errors
    /// The process cannot be spawned.
    pub fn start(&mut self, i: usize) -> Result<(), CliError> {
        let n = &self.nodes[i];
        let mut cmd = node_command(&NodeCommand {
            exe: &self.exe,
            data_dir: &n.data_dir,
            client: n.client,
            peer: n.peer,
            advertise_peer: None,
            admin: Some(n.admin),
            seeds: &self.seeds,
            zone: format!("zone-{}", i % 3),
            secret: &self.secret,
            flags: &self.extra,
        })?;
        let child = cmd
            .spawn()
            .map_err(|e| CliError::Msg(format!("cannot start {}: {e}", self.exe.display())))?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Start every node.
    ///
    /// # Errors
    /// A process cannot be spawned.
    pub fn start_all(&mut self) -> Result<(), CliError> {
        for i in 0..self.nodes.len() {
            self.start(i)?;
        }
        Ok(())
    }

    /// Whether node `i`'s process runs.
    pub fn running(&mut self, i: usize) -> bool {
        match self.children[i].as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM node `i` and wait up to `grace` for it to exit (then SIGKILL). Returns whether
    /// it exited by itself.
    pub fn terminate(&mut self, i: usize, grace: Duration) -> bool {
        let Some(mut c) = self.children[i].take() else {
            return true;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Client-port addresses of the nodes in `idx`.
    pub fn clients(&self, idx: impl IntoIterator<Item = usize>) -> Vec<SocketAddr> {
        idx.into_iter().map(|i| self.nodes[i].client).collect()
    }

    /// Index of the node with client address `addr`.
    pub fn index_of_client(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.client.to_string() == addr)
    }

    /// Send CreateMeta to node `i`.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn create_meta(&self, i: usize) -> Result<(), CliError> {
        crate::create_meta(&crate::CreateMetaArgs {
            seed: self.nodes[i].peer,
            cluster_secret: self.secret.clone(),
            cluster: "quiver".into(),
            replication_factor: meta::META_REPLICATION_FACTOR,
            timeout_secs: 20,
        })
        .await
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Poll `f` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn port_open(a: SocketAddr) -> bool {
    TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
}

/// `quiver demo`.
///
/// # Errors
/// The cluster could not be started or did not assemble in time.
pub fn run(a: &DemoArgs) -> Result<(), CliError> {
    if a.nodes == 0 || a.nodes > 32 {
        return Err(CliError::Msg("--nodes must be between 1 and 32".into()));
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Msg(format!("cannot find the quiver binary: {e}")))?;
    let tmp = tempfile::Builder::new()
        .prefix("quiver-demo-")
        .tempdir()
        .map_err(|e| CliError::Msg(format!("temp dir: {e}")))?;
    let mut cluster = LocalCluster::new(exe, tmp.path().to_path_buf(), a.nodes, vec![])?;
    println!("starting {} nodes in {}", a.nodes, tmp.path().display());
    cluster.start_all()?;
    let rt = crate::runtime(2)?;
    let result = rt.block_on(demo(&mut cluster, a));
    println!("stopping the cluster");
    for i in 0..cluster.nodes.len() {
        cluster.terminate(i, Duration::from_secs(5));
    }
    drop(cluster);
    drop(tmp);
    result
}

async fn demo(cluster: &mut LocalCluster, a: &DemoArgs) -> Result<(), CliError> {
    let first = cluster.nodes[0].peer;
    wait_for(Duration::from_secs(20), || async {
        port_open(first).then_some(())
    })
    .await
    .ok_or_else(|| {
        CliError::Msg(format!(
            "node 1 did not open {first}; see {}",
            log_path(&cluster.nodes[0].data_dir).display()
        ))
    })?;
    cluster.create_meta(0).await?;
    let want = a.nodes.min(7);
    let seeds = cluster.clients(0..cluster.nodes.len().min(3));
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("waiting for meta to reach {want} voters"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let st = wait_for(Duration::from_secs(60), || async {
        let st = status::fetch(&seeds, Duration::from_secs(2)).await.ok()?;
        let r = st.ranges.iter().find(|r| r.id == meta::META_RANGE)?;
        spinner.set_message(format!("meta has {}/{} voters", r.voters, want));
        (r.voters >= want && st.nodes.iter().filter(|n| n.alive).count() >= a.nodes).then_some(st)
    })
    .await;
    spinner.finish_and_clear();
    let st: ClusterStatus =
        st.ok_or_else(|| CliError::Msg(format!("meta did not reach {want} voters within 60 s")))?;
    println!("{}", st.tables());

    let replicas = a.nodes.min(3) as u32;
    let c = client::Client::new(seeds.clone(), Duration::from_secs(10))?;
    let mut spec = proto::metapb::CollectionDescriptor::new();
    spec.name = DEMO_COLLECTION.into();
    spec.persistence = proto::metapb::Persistence::LOGGED;
    spec.replication_factor = replicas;
    spec.split_size = 64 << 20;
    let made = c.create_collection(spec).await?;
    let spinner = ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(100));
    // Members join by self-assignment: wait until the range has all its voters.
    let placed = wait_for(Duration::from_secs(60), || async {
        let st = status::fetch(&seeds, Duration::from_secs(2)).await.ok()?;
        let r = st.ranges.iter().find(|r| r.collection == made.id)?;
        spinner.set_message(format!(
            "collection {DEMO_COLLECTION:?}: {}/{replicas} voters placed",
            r.voters
        ));
        (r.voters >= replicas as usize).then_some(st)
    })
    .await;
    spinner.finish_and_clear();
    let st = placed.ok_or_else(|| {
        CliError::Msg(format!(
            "collection {DEMO_COLLECTION:?} was not placed on {replicas} nodes within 60 s"
        ))
    })?;
    let kv = c.kv(DEMO_COLLECTION);
    wait_for(Duration::from_secs(30), || async {
        kv.put(b"hello", b"world").await.ok()
    })
    .await
    .ok_or_else(|| CliError::Msg(format!("collection {DEMO_COLLECTION:?} has no leader")))?;
    println!("collection {DEMO_COLLECTION:?} created (kv, logged, {replicas} replicas)");
    println!("{}", st.tables());

    workload(&seeds, a.ops).await?;

    let client_seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
    let peer_seeds: Vec<String> = cluster.seeds.iter().map(|s| s.to_string()).collect();
    println!("\nseeds (client port): {}", client_seeds.join(","));
    println!("seeds (peer port):   {}", peer_seeds.join(","));
    println!(
        "admin of node 1:     http://{}/metrics",
        cluster.nodes[0].admin
    );
    println!("\ntry:");
    println!("  quiver status --seeds {}", client_seeds.join(","));
    println!("  quiver status --json --seeds {}", client_seeds[0]);
    println!(
        "  quiver kv put {DEMO_COLLECTION} greeting hi --seeds {}",
        client_seeds.join(",")
    );
    println!(
        "  quiver kv scan {DEMO_COLLECTION} --prefix demo/ --limit 5 --seeds {}",
        client_seeds[0]
    );
    println!(
        "  quiver create-collection users --persistence persistent --replicas 3 --seeds {}",
        client_seeds[0]
    );
    println!("  curl -s http://{}/readyz", cluster.nodes[0].admin);
    if a.no_wait {
        return Ok(());
    }
    println!(
        "\ncluster is up; press Ctrl-C to stop it and remove {}",
        cluster.dir.display()
    );
    crate::stop_signal().await;
    Ok(())
}

/// The demo's sample KV collection.
pub const DEMO_COLLECTION: &str = "demo";

/// Writes and linearizable reads on the demo collection through the client, with a progress
/// bar.
async fn workload(seeds: &[SocketAddr], ops: u64) -> Result<(), CliError> {
    let c = client::Client::new(seeds.to_vec(), Duration::from_secs(10))?.kv(DEMO_COLLECTION);
    let bar = ProgressBar::new(ops * 2);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ops ({per_sec})")
            .map_err(|e| CliError::Msg(e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_message("workload");
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers = 16u64;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (c, bar, done) = (c.clone(), bar.clone(), done.clone());
        tasks.spawn(async move {
            let mut i = w;
            while i < ops {
                let key = format!("demo/{i:06}");
                let value = format!("value-{i}");
                c.put(key.as_bytes(), value.as_bytes()).await?;
                let got = c.get(key.as_bytes()).await?;
                if got.map(|v| v.value.to_vec()) != Some(value.into_bytes()) {
                    return Err(client::ClientError::Protocol(format!(
                        "read of {key} did not see its write"
                    )));
                }
                bar.inc(2);
                done.fetch_add(2, Ordering::Relaxed);
                i += workers;
            }
            Ok::<(), client::ClientError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| CliError::Msg(e.to_string()))??;
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "workload: {n} ops ({} writes + {} linearizable reads at the range's leader) in {secs:.2} s = {:.0} ops/s",
        n / 2,
        n / 2,
        n as f64 / secs
    );
    Ok(())
}

/// Where a node's log goes.
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.with_extension("log")
}
