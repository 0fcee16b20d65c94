//! A cluster of real `quiver node` child processes on 127.0.0.1, each behind a fault proxy on
//! its peer port ([`crate::proxy`]): kill -9 and restart from the same data dir, SIGSTOP and
//! SIGCONT, create-meta, bounded waits. Every child is killed (SIGKILL) when the cluster drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::clientpb::{
    ClientError_Code, ClientRequest, ClientResponse_oneof_kind, KvRequest, Lookup,
};
use proto::kvpb;
use proto::metapb::{CollectionDescriptor, MemberRole, RangeDescriptor};
use protobuf::Message;
use rand::Rng;

use crate::proxy::Proxy;

/// Where the `quiver` binary is: `$QUIVER_BIN`, else `quiver` in the target dir of the running
/// test executable (`target/<profile>/deps/<test>` -> `target/<profile>/quiver`).
///
/// # Panics
/// When no binary is found: build it first (`cargo build -p cli`, or `cargo test --workspace`,
/// which builds every member's binaries).
pub fn quiver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QUIVER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("quiver");
    assert!(
        bin.exists(),
        "no quiver binary at {}: run `cargo build -p cli` (same profile and target dir) first, \
         or set QUIVER_BIN",
        bin.display()
    );
    bin
}

/// A free port on 127.0.0.1 for a node to listen on later, outside the kernel's ephemeral
/// range (see `cli::demo::free_addr`: a released `bind(0)` port can be taken by any outgoing
/// connection before the node binds it, and then the node cannot start).
pub fn free_addr() -> SocketAddr {
    cli::demo::free_addr().expect("a free port on 127.0.0.1")
}

/// Poll `f` every 100 ms until it returns `Some` or `within` passes.
pub use cli::demo::wait_for;

/// Node settings for tests: short ticks; a long `dead-after` so a killed or paused node is not
/// removed from meta during a fault window (membership churn is a separate nemesis).
pub fn fast_flags() -> Vec<(String, String)> {
    [
        ("tick-ms", "50"),
        ("election-ticks", "10"),
        ("heartbeat-ms", "500"),
        ("dead-after-ms", "60000"),
        ("log-segment-mb", "8"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// [`fast_flags`] with `dead-after-ms` = `d`: a node down longer is removed from meta's cell
/// and from its ranges.
pub fn fast_flags_with_dead_after(d: Duration) -> Vec<(String, String)> {
    let mut flags = fast_flags();
    for (k, v) in flags.iter_mut() {
        if k == "dead-after-ms" {
            *v = d.as_millis().to_string();
        }
    }
    flags
}

/// One child node.
#[derive(Debug)]
pub struct NodeProc {
    /// Its data dir (its log is `<data dir>.log`).
    pub data_dir: PathBuf,
    /// Client port.
    pub client: SocketAddr,
    /// Peer port the node binds.
    pub peer: SocketAddr,
    /// Peer address it advertises: its proxy.
    pub advertise: SocketAddr,
    /// Node id (read from `<data dir>/node_id` once started).
    pub id: u64,
    /// Whether it is stopped with SIGSTOP.
    pub paused: bool,
    child: Option<Child>,
}

/// The processes, their proxies and their data.
#[derive(Debug)]
pub struct Cluster {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub secret: String,
    pub nodes: Vec<NodeProc>,
    /// Extra `--flag value` pairs for every node.
    pub flags: Vec<(String, String)>,
    /// Extra environment variables for every node started from now on (fault-injection
    /// knobs such as `QUIVER_TEST_SPLIT_IMAGE_DELAY_MS`).
    pub env: Vec<(String, String)>,
    pub proxy: Proxy,
    _tmp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Lay out and start `n` nodes, each behind a proxy, in a fresh temp dir (kept when
    /// `QUIVER_TEST_KEEP=1`); waits until every node wrote its id. Must run in a tokio runtime.
    ///
    /// # Panics
    /// A node cannot be spawned or does not write its id within 30 s.
    pub async fn start(n: usize, flags: Vec<(String, String)>) -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix("quiver-nemesis-")
            .tempdir()
            .expect("temp dir");
        let (dir, tmp) = if std::env::var_os("QUIVER_TEST_KEEP").is_some() {
            let p = tmp.keep();
            eprintln!("keeping {}", p.display());
            (p, None)
        } else {
            (tmp.path().to_path_buf(), Some(tmp))
        };
        let mut nodes = Vec::new();
        let mut targets = Vec::new();
        for i in 0..n {
            let peer = free_addr();
            targets.push(peer);
            nodes.push(NodeProc {
                data_dir: dir.join(format!("node-{}", i + 1)),
                client: free_addr(),
                peer,
                advertise: peer,
                id: 0,
                paused: false,
                child: None,
            });
        }
        let proxy = Proxy::start(&targets).await;
        for (i, a) in proxy.addrs().into_iter().enumerate() {
            nodes[i].advertise = a;
        }
        let secret: String = (0..24)
            .map(|_| {
                char::from(
                    b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::thread_rng().gen_range(0..36)],
                )
            })
            .collect();
        let mut c = Cluster {
            exe: quiver_bin(),
            dir,
            secret,
            nodes,
            flags,
            env: Vec::new(),
            proxy,
            _tmp: tmp,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            let p = c.nodes[i].data_dir.join("node_id");
            let id = wait_for(Duration::from_secs(30), || {
                let p = p.clone();
                async move { std::fs::read_to_string(&p).ok()?.trim().parse::<u64>().ok() }
            })
            .await
            .unwrap_or_else(|| panic!("node {i} wrote no id; see {}", c.log(i).display()));
            c.nodes[i].id = id;
            c.proxy.set_node_id(i, id);
        }
        c
    }

    /// Log file of node `i`.
    pub fn log(&self, i: usize) -> PathBuf {
        self.nodes[i].data_dir.with_extension("log")
    }

    fn spawn(&mut self, i: usize) {
        let seeds: Vec<SocketAddr> = self.nodes.iter().take(3).map(|n| n.advertise).collect();
        let n = &self.nodes[i];
        let mut cmd = cli::demo::node_command(&cli::demo::NodeCommand {
            exe: &self.exe,
            data_dir: &n.data_dir,
            client: n.client,
            peer: n.peer,
            advertise_peer: Some(n.advertise),
            admin: None,
            seeds: &seeds,
            zone: format!("zone-{}", i % 3),
            secret: &self.secret,
            flags: &self.flags,
        })
        .unwrap_or_else(|e| panic!("node {i}: {e}"));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
        self.nodes[i].child = Some(child);
        self.nodes[i].paused = false;
    }

    /// Whether node `i`'s process runs (paused counts as running).
    pub fn running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How node `i`'s process ended, if it did (reaps it).
    pub fn exit_status(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i].child.as_mut()?.try_wait().ok().flatten()
    }

    /// Wait until node `i`'s process ended (polled every 100 ms); how, or `None` after
    /// `within`.
    pub async fn wait_exit(
        &mut self,
        i: usize,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.exit_status(i) {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The raft log directory of node `i`.
    pub fn raft_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].data_dir.join("raft")
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
    }

    /// SIGKILL every node and reap them.
    pub fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }

    /// Start node `i` again from its data dir (same ports).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    fn signal(&self, i: usize, sig: rustix::process::Signal) -> bool {
        let Some(c) = self.nodes[i].child.as_ref() else {
            return false;
        };
        match rustix::process::Pid::from_raw(c.id() as i32) {
            Some(pid) => rustix::process::kill_process(pid, sig).is_ok(),
            None => false,
        }
    }

    /// SIGSTOP node `i`.
    pub fn pause(&mut self, i: usize) {
        if self.signal(i, rustix::process::Signal::STOP) {
            self.nodes[i].paused = true;
        }
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, rustix::process::Signal::CONT);
        self.nodes[i].paused = false;
    }

    /// Resume every paused node and restart every dead one.
    pub fn revive_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i);
            }
            if !self.running(i) {
                self.restart(i);
            }
        }
    }

    /// Index of the node with id `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Client-port addresses of every node.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.client).collect()
    }

    /// A client of the nodes in `idx` with a per-request timeout.
    pub fn client_of(&self, idx: &[usize], timeout: Duration) -> client::Client {
        client::Client::new(idx.iter().map(|i| self.nodes[*i].client).collect(), timeout)
            .expect("client")
    }

    /// A client of every node.
    pub fn client(&self, timeout: Duration) -> client::Client {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.client_of(&all, timeout)
    }

    /// Run `quiver create-meta` against node `i` (through its proxy, like any peer) until it
    /// succeeds, up to `within`.
    pub async fn create_meta(&self, i: usize, within: Duration) -> bool {
        let exe = self.exe.clone();
        let seed = self.nodes[i].advertise.to_string();
        let secret = self.secret.clone();
        wait_for(within, || {
            let (exe, seed, secret) = (exe.clone(), seed.clone(), secret.clone());
            async move {
                let out = tokio::process::Command::new(exe)
                    .arg("create-meta")
                    .arg("--seed")
                    .arg(seed)
                    .env("QUIVER_CLUSTER_SECRET", secret)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .ok()?;
                let err = String::from_utf8_lossy(&out.stderr);
                (out.status.success() || err.contains("already exists")).then_some(())
            }
        })
        .await
        .is_some()
    }

    /// Meta's leader (node id) as its leader reports it, or `None`.
    pub async fn meta_leader(cl: &client::Client) -> Option<u64> {
        let s = cl.leader_status().await.ok()?;
        (s.meta_leader != 0 && s.node == s.meta_leader).then_some(s.meta_leader)
    }

    /// Wait until meta has a leader that serves a write and a linearizable read; returns how
    /// long it took, or `None` after `within`.
    pub async fn wait_serving(&self, within: Duration) -> Option<Duration> {
        self.wait_target(&crate::workload::Target::Scratch, within)
            .await
    }

    /// Wait until `target` serves a write and a linearizable read of a probe key (outside the
    /// test keys); returns how long it took, or `None` after `within`.
    pub async fn wait_target(
        &self,
        target: &crate::workload::Target,
        within: Duration,
    ) -> Option<Duration> {
        let t0 = Instant::now();
        let st = crate::workload::Store::new(
            self.client(Duration::from_secs(2)),
            target.clone(),
            u64::MAX,
            false,
        );
        let probe = u64::MAX;
        wait_for(within, || async {
            let v = t0.elapsed().as_nanos() as u64;
            st.put(probe, v).await.ok()?;
            (st.get(probe).await.ok()? == Some(v)).then_some(t0.elapsed())
        })
        .await
    }

    /// Create KV collection `name` with `replicas` replicas (through `quiver
    /// create-collection`) and wait until it serves and its range holding `k0` has `replicas`
    /// voters (a collection serves once its first replica does; faults injected before the
    /// others are voters can leave a range that cannot elect); false after `within` (each wait).
    pub async fn create_collection(&self, name: &str, replicas: usize, within: Duration) -> bool {
        self.create_collection_with(name, replicas, &[], within)
            .await
    }

    /// [`Cluster::create_collection`] with extra `create-collection` arguments (e.g.
    /// `["--persistence", "persistent"]`).
    pub async fn create_collection_with(
        &self,
        name: &str,
        replicas: usize,
        args: &[&str],
        within: Duration,
    ) -> bool {
        let seeds: Vec<String> = self.client_addrs().iter().map(|a| a.to_string()).collect();
        let out = tokio::process::Command::new(&self.exe)
            .arg("create-collection")
            .arg(name)
            .arg("--replicas")
            .arg(replicas.to_string())
            .arg("--seeds")
            .arg(seeds.join(","))
            .args(args)
            .kill_on_drop(true)
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!(
                    "create-collection {name}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return false;
            }
            Err(e) => {
                eprintln!("create-collection {name}: {e}");
                return false;
            }
        }
        if self
            .wait_target(&crate::workload::Target::Collection(name.into()), within)
            .await
            .is_none()
        {
            eprintln!("create-collection {name}: it does not serve");
            return false;
        }
        if self
            .wait_range_voters(name, b"k0", replicas, within)
            .await
            .is_none()
        {
            eprintln!(
                "create-collection {name}: its range never had {replicas} voters; {}",
                self.membership_state(Some(name)).await
            );
            return false;
        }
        true
    }

    /// Ask node `i` directly (no routing, no redirects) with a bounded wait.
    pub async fn ask(
        &self,
        i: usize,
        req: ClientRequest,
        within: Duration,
    ) -> Option<ClientResponse_oneof_kind> {
        tokio::time::timeout(within, async {
            let conn = client::Conn::connect(self.nodes[i].client, within)
                .await
                .ok()?;
            conn.call(req).await.ok()
        })
        .await
        .ok()
        .flatten()
    }

    /// The descriptors of collection `name` and of its range holding `key`
    /// (collection-relative), from the first node that answers a lookup.
    pub async fn lookup(
        &self,
        name: &str,
        key: &[u8],
    ) -> Option<(CollectionDescriptor, RangeDescriptor)> {
        let mut req = ClientRequest::new();
        let mut l = Lookup::new();
        l.collection = name.to_string();
        l.key = Bytes::copy_from_slice(key);
        req.set_lookup(l);
        for i in 0..self.nodes.len() {
            if let Some(ClientResponse_oneof_kind::lookup(mut r)) =
                self.ask(i, req.clone(), Duration::from_secs(1)).await
            {
                if r.has_range() {
                    return Some((r.take_collection(), r.take_range()));
                }
            }
        }
        None
    }

    /// Read `key` (collection-relative) of collection `name` directly at node `i`: a leader
    /// read (`follower == false`: answered only by the range's leader, after its read barrier)
    /// or a read of node `i`'s own replica. The answer's `kvpb::Response`, or the wire error.
    pub async fn read_at(
        &self,
        i: usize,
        coll: &CollectionDescriptor,
        range: &RangeDescriptor,
        key: &[u8],
        follower: bool,
    ) -> Option<Result<kvpb::Response, proto::clientpb::ClientError>> {
        let mut g = kvpb::Get::new();
        let mut full = coll.prefix.to_vec();
        full.extend_from_slice(key);
        g.key = full.into();
        let mut cmd = kvpb::Command::new();
        cmd.set_get(g);
        let mut k = KvRequest::new();
        k.range = range.id;
        k.epoch = range.epoch;
        k.command = cmd.write_to_bytes().ok()?.into();
        k.follower = follower;
        let mut req = ClientRequest::new();
        req.set_kv(k);
        match self.ask(i, req, Duration::from_secs(2)).await? {
            ClientResponse_oneof_kind::kv(r) => {
                kvpb::Response::parse_from_carllerche_bytes(&r.response)
                    .ok()
                    .map(Ok)
            }
            ClientResponse_oneof_kind::error(e) => Some(Err(e)),
            _ => None,
        }
    }

    /// The node (index) leading the range of collection `name` that holds `key`, and the
    /// range's id. Nodes expose no per-range leader (status and `/metrics` show meta's only),
    /// so every node is asked for a leader read of `key`: only the range's leader answers it
    /// (after its read barrier confirms the leadership); the others answer `NOT_LEADER` with
    /// a hint, which is the fallback when no node answered.
    pub async fn range_leader(&self, name: &str, key: &[u8]) -> Option<(usize, u64)> {
        let (coll, range) = self.lookup(name, key).await?;
        let mut hint = None;
        for i in 0..self.nodes.len() {
            match self.read_at(i, &coll, &range, key, false).await {
                Some(Ok(_)) => return Some((i, range.id)),
                Some(Err(e)) if e.code == ClientError_Code::NOT_LEADER => {
                    if let Ok(a) = e.leader_hint.parse::<SocketAddr>() {
                        hint = self.nodes.iter().position(|n| n.client == a);
                    }
                }
                _ => {}
            }
        }
        hint.map(|i| (i, range.id))
    }

    /// Wait until meta's descriptor of the range of collection `name` holding `key` lists `n`
    /// voters; the descriptor, or `None` after `within`.
    pub async fn wait_range_voters(
        &self,
        name: &str,
        key: &[u8],
        n: usize,
        within: Duration,
    ) -> Option<RangeDescriptor> {
        wait_for(within, || async {
            let (_, r) = self.lookup(name, key).await?;
            let voters = r
                .members
                .iter()
                .filter(|m| m.role == MemberRole::VOTER)
                .count();
            (voters >= n).then_some(r)
        })
        .await
    }

    /// Whether node `id` is out of meta's cell (per meta's leader) and, with `collection`, out
    /// of the members of the collection's range holding the workload's keys.
    pub async fn removed(&self, id: u64, collection: Option<&str>) -> bool {
        let cl = self.client(Duration::from_secs(1));
        let Ok(s) = cl.leader_status().await else {
            return false;
        };
        if s.node != s.meta_leader || s.meta_voters.contains(&id) || s.meta_learners.contains(&id) {
            return false;
        }
        match collection {
            None => true,
            Some(name) => self
                .lookup(name, b"k0")
                .await
                .is_some_and(|(_, r)| r.members.iter().all(|m| m.node != id)),
        }
    }

    /// Meta's cell (per its leader) and the members of the range of `collection` holding the
    /// workload's keys, as text, for failure reports.
    pub async fn membership_state(&self, collection: Option<&str>) -> String {
        let cl = self.client(Duration::from_secs(2));
        let meta = match cl.leader_status().await {
            Ok(s) => format!(
                "meta leader {} voters {:?} learners {:?}",
                s.meta_leader, s.meta_voters, s.meta_learners
            ),
            Err(e) => format!("meta status: {e}"),
        };
        let range = match collection {
            None => String::new(),
            Some(name) => match self.lookup(name, b"k0").await {
                Some((_, r)) => {
                    let m: Vec<String> = r
                        .members
                        .iter()
                        .map(|m| format!("{}:{:?}", m.node, m.role))
                        .collect();
                    format!(
                        "; range {} epoch {} members [{}]",
                        r.id,
                        r.epoch,
                        m.join(" ")
                    )
                }
                None => "; range: no lookup answer".into(),
            },
        };
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.to_string()).collect();
        format!("{meta}{range}; node ids by index [{}]", ids.join(" "))
    }

    /// Wait until meta has `n` voters per the leader's status.
    pub async fn wait_voters(&self, n: usize, within: Duration) -> bool {
        let cl = self.client(Duration::from_secs(2));
        wait_for(within, || async {
            let s = cl.leader_status().await.ok()?;
            (s.node == s.meta_leader && s.meta_voters.len() >= n && s.meta_learners.is_empty())
                .then_some(())
        })
        .await
        .is_some()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}
