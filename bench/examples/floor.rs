//! The floor under W1 on this machine: the fastest a replicated write with fsync on every
//! replica can be, with no raft, no runtime and no encoding in the way.
//!
//! `cargo run --release -p quiver-bench --example floor -- [SECS] [DIR]`
//!
//! Four threads, each with blocking I/O on loopback TCP (`TCP_NODELAY`), so every hop is one
//! thread wake-up and nothing else:
//! - a client keeps N 300-byte requests in flight on one connection (each answered request
//!   is replaced at once): N = 1 is W1's floor, N = 64 W2's;
//! - the leader takes every whole request that arrived as one batch, forwards it to both
//!   followers, appends it to its own log file (`pwrite` + `fdatasync` on a file whose blocks
//!   were written beforehand, so a sync writes data only), then waits for the first
//!   follower's acknowledgement (the leader and one follower are a quorum of three) and
//!   answers the batch's count. One batch is in flight at a time: requests arriving meanwhile
//!   make the next batch;
//! - each follower appends and syncs the same way, then acknowledges; the second follower's
//!   acknowledgement is read by a thread of its own, off the critical path, as a real leader
//!   also has to take it.
//!
//! That is the least work any system does for a 3-replica write with fsync on: three
//! appends, three syncs (two of them in parallel on the critical path), four network hops,
//! and no per-request work but copying bytes.
//!
//! Each case runs for SECS seconds (default 5) after a 1 s warm-up; DIR (default
//! `/var/tmp`) must be on the disk being measured. Prints ops/s and p50/p99/p99.9 per case,
//! each with and without the syncs.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

const REQUEST: usize = 300;
const LOG_SIZE: u64 = 256 << 20;
/// Largest batch the leader takes from its client at once (more than any case keeps in
/// flight).
const MAX_BATCH: usize = 1024;

/// A log file whose blocks are written (zeros) and synced before use, so an `fdatasync` after
/// an overwrite has data to write and no block allocation or extent conversion to record.
struct Log {
    file: File,
    at: u64,
    sync: bool,
}

impl Log {
    fn create(path: &Path, sync: bool) -> io::Result<Log> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < LOG_SIZE {
            file.write_all_at(&zeros, at)?;
            at += zeros.len() as u64;
        }
        file.sync_all()?;
        Ok(Log { file, at: 0, sync })
    }

    fn append(&mut self, record: &[u8]) -> io::Result<()> {
        if self.at + record.len() as u64 > LOG_SIZE {
            self.at = 0;
        }
        self.file.write_all_at(record, self.at)?;
        self.at += record.len() as u64;
        if self.sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// The log files of one case, removed when it ends (also when it fails).
struct LogFiles(Vec<PathBuf>);

impl Drop for LogFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn accept(l: &TcpListener) -> io::Result<TcpStream> {
    let (s, _) = l.accept()?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The next count on `s`; `None` when the peer closed the connection.
fn read_count(s: &mut TcpStream) -> io::Result<Option<u32>> {
    let mut b = [0u8; 4];
    match s.read_exact(&mut b) {
        Ok(()) => Ok(Some(u32::from_le_bytes(b))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// A follower: takes a counted batch of requests, appends it with one sync and acknowledges
/// the count, until the leader closes the connection.
fn follower(listener: TcpListener, mut log: Log) -> io::Result<()> {
    let mut leader = accept(&listener)?;
    let mut buf = vec![0u8; MAX_BATCH * REQUEST];
    while let Some(k) = read_count(&mut leader)? {
        let data = buf
            .get_mut(..k as usize * REQUEST)
            .ok_or_else(|| io::Error::other(format!("a batch of {k} requests is too large")))?;
        leader.read_exact(data)?;
        log.append(data)?;
        leader.write_all(&k.to_le_bytes())?;
    }
    Ok(())
}

/// The leader: serves its client until the client closes the connection, then closes the
/// followers' connections.
fn leader(listener: TcpListener, mut f1: TcpStream, f2: TcpStream, log: Log) -> io::Result<()> {
    let mut f2_acks = f2.try_clone()?;
    let drain = thread::spawn(move || -> io::Result<()> {
        while read_count(&mut f2_acks)?.is_some() {}
        Ok(())
    });
    let served = accept(&listener).and_then(|client| serve(client, &mut f1, &f2, log));
    // The drain holds a clone of f2's socket: shut it down so the followers and the drain end.
    let _ = f2.shutdown(Shutdown::Both);
    let _ = f1.shutdown(Shutdown::Both);
    let drained = drain
        .join()
        .map_err(|_| io::Error::other("the leader's drain thread panicked"))?;
    served?;
    // A read cut short by the shutdown above is the expected end; anything else is not.
    match drained {
        Err(e) if e.kind() != io::ErrorKind::ConnectionReset => Err(e),
        _ => Ok(()),
    }
}

/// The client closed its connection with requests still in flight: the end of a case.
fn client_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

fn serve(
    mut client: TcpStream,
    f1: &mut TcpStream,
    mut f2: &TcpStream,
    mut log: Log,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_BATCH * REQUEST];
    let mut have = 0;
    let mut frame = Vec::with_capacity(4 + buf.len());
    loop {
        let n = match client.read(&mut buf[have..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if client_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        have += n;
        let k = have / REQUEST;
        if k == 0 {
            continue;
        }
        let data = &buf[..k * REQUEST];
        frame.clear();
        frame.extend_from_slice(&(k as u32).to_le_bytes());
        frame.extend_from_slice(data);
        f1.write_all(&frame)?;
        f2.write_all(&frame)?;
        log.append(data)?;
        if read_count(f1)?.is_none() {
            return Err(io::Error::other("the first follower closed its connection"));
        }
        match client.write_all(&(k as u32).to_le_bytes()) {
            Err(e) if client_gone(&e) => return Ok(()),
            r => r?,
        }
        buf.copy_within(k * REQUEST..have, 0);
        have -= k * REQUEST;
    }
}

/// Three nodes: the leader's client address, their threads and their log files.
struct Nodes {
    addr: SocketAddr,
    threads: Vec<JoinHandle<io::Result<()>>>,
    _files: LogFiles,
}

impl Nodes {
    fn start(dir: &Path, sync: bool) -> io::Result<Nodes> {
        let files = LogFiles(
            (0..3)
                .map(|i| dir.join(format!("quiver-floor-{}-{i}.log", std::process::id())))
                .collect(),
        );
        let open = |i: usize| Log::create(&files.0[i], sync);
        let (l0, l1, l2) = (open(0)?, open(1)?, open(2)?);
        let bind = || TcpListener::bind("127.0.0.1:0");
        let (lf1, lf2, ll) = (bind()?, bind()?, bind()?);
        let (a1, a2, addr) = (lf1.local_addr()?, lf2.local_addr()?, ll.local_addr()?);
        let t1 = thread::spawn(move || follower(lf1, l1));
        let t2 = thread::spawn(move || follower(lf2, l2));
        let (f1, f2) = (connect(a1)?, connect(a2)?);
        let tl = thread::spawn(move || leader(ll, f1, f2, l0));
        Ok(Nodes {
            addr,
            threads: vec![tl, t1, t2],
            _files: files,
        })
    }

    /// Waits for the threads (the client closed its connection first) and reports the first
    /// error any of them met.
    fn finish(self) -> io::Result<()> {
        let mut first = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a node thread panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// One case: `in_flight` requests kept in flight on one connection for `secs` after a 1 s
/// warm-up. Latency runs from a request's send to its answer.
fn run(dir: &Path, secs: f64, sync: bool, in_flight: usize) -> io::Result<(Histogram<u64>, f64)> {
    let nodes = Nodes::start(dir, sync)?;
    let mut conn = connect(nodes.addr)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut sent = VecDeque::with_capacity(in_flight);
    let requests = vec![7u8; in_flight * REQUEST];
    let now = Instant::now();
    conn.write_all(&requests)?;
    sent.extend(std::iter::repeat_n(now, in_flight));
    let warm = now + Duration::from_secs(1);
    let mut start = None;
    let mut ops = 0u64;
    while let Some(k) = read_count(&mut conn)? {
        let done = Instant::now();
        for _ in 0..k {
            let t = sent
                .pop_front()
                .ok_or_else(|| io::Error::other("an answer for a request never sent"))?;
            if done >= warm {
                hist.saturating_record((done - t).as_nanos() as u64);
                ops += 1;
            }
        }
        if done >= warm && (done - *start.get_or_insert(done)).as_secs_f64() >= secs {
            break;
        }
        conn.write_all(&requests[..k as usize * REQUEST])?;
        sent.extend(std::iter::repeat_n(done, k as usize));
    }
    let elapsed = start.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
    let _ = conn.shutdown(Shutdown::Both);
    nodes.finish()?;
    if ops == 0 {
        return Err(io::Error::other(
            "the leader closed the connection before the warm-up ended",
        ));
    }
    Ok((hist, ops as f64 / elapsed))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = match args.next().map(|s| s.parse()) {
        None => 5.0,
        Some(Ok(s)) if s > 0.0 && s <= 600.0 => s,
        Some(_) => {
            eprintln!("error: SECS must be a number of seconds in (0, 600]");
            std::process::exit(2);
        }
    };
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "/var/tmp".into()));
    if !dir.is_dir() {
        eprintln!("error: {} is not a directory", dir.display());
        std::process::exit(2);
    }
    println!("| case | ops/s | p50 ms | p99 ms | p99.9 ms |");
    println!("|---|--:|--:|--:|--:|");
    for (clients, in_flight) in [("1 client", 1), ("64 requests in flight", 64)] {
        for (name, sync) in [
            ("3 replicas, fdatasync on each", true),
            ("3 replicas, no sync", false),
        ] {
            match run(&dir, secs, sync, in_flight) {
                Ok((h, rate)) => {
                    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
                    println!(
                        "| {clients}, {name} | {rate:.0} | {:.3} | {:.3} | {:.3} |",
                        ms(0.5),
                        ms(0.99),
                        ms(0.999)
                    );
                }
                Err(e) => {
                    eprintln!("error: {clients}, {name}: {e} (in {})", dir.display());
                    std::process::exit(1);
                }
            }
        }
    }
}
