//! The floor under W1 on this machine: the fastest a replicated write with fsync on every
//! replica can be, with no raft, no runtime and no encoding in the way.
//!
//! `cargo run --release -p quiver-bench --example floor -- [SECS] [DIR]`
//!
//! Four threads, each with blocking I/O on loopback TCP (`TCP_NODELAY`), so every hop is one
//! thread wake-up and nothing else:
//! - a client sends a 300-byte request and waits for the answer, one at a time;
//! - the leader reads it, forwards it to both followers, appends it to its own log file
//!   (`pwrite` + `fdatasync` on a file whose blocks were written beforehand, so a sync writes
//!   data only), then waits for the first follower's acknowledgement (the leader and one
//!   follower are a quorum of three) and answers;
//! - each follower appends and syncs the same way, then acknowledges; the second follower's
//!   acknowledgement is read by a thread of its own, off the critical path, as a real leader
//!   also has to take it.
//!
//! That is the least work any system does for a 3-replica write with fsync on: three
//! appends, three syncs (two of them in parallel on the critical path), four network hops.
//!
//! The pipelined cases are W2's floor: 64 requests kept in flight on one connection; the
//! leader takes every whole request that arrived as one batch, forwards it, appends it with one
//! sync and answers the count once the first follower acknowledged; one batch is in flight at a
//! time, so requests arriving meanwhile make the next batch. No per-request work is left but
//! copying bytes.
//!
//! Each case runs for SECS seconds (default 5) after a 1 s warm-up; DIR (default
//! `/var/tmp`) must be on the disk being measured. Prints ops/s and p50/p99/p99.9 per case,
//! each with and without the syncs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

const REQUEST: usize = 300;
const LOG_SIZE: u64 = 256 << 20;

/// A log file whose blocks are written (zeros) and synced before use, so an `fdatasync` after
/// an overwrite has data to write and no block allocation or extent conversion to record.
struct Log {
    file: File,
    at: u64,
    sync: bool,
}

impl Log {
    fn create(path: &Path, sync: bool) -> std::io::Result<Log> {
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

    fn append(&mut self, record: &[u8]) -> std::io::Result<()> {
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

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect on loopback");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn accept(l: &TcpListener) -> TcpStream {
    let (s, _) = l.accept().expect("accept on loopback");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn follower(listener: TcpListener, mut log: Log) {
    let mut leader = accept(&listener);
    let mut buf = [0u8; REQUEST];
    while leader.read_exact(&mut buf).is_ok() {
        log.append(&buf).expect("follower append");
        if leader.write_all(&[1]).is_err() {
            break;
        }
    }
}

fn leader(listener: TcpListener, f1: TcpStream, f2: TcpStream, mut log: Log) {
    let mut client = accept(&listener);
    let (mut f1, mut f2) = (f1, f2);
    // The second follower's acknowledgements are read off the critical path.
    let mut f2_acks = f2.try_clone().expect("clone");
    let drain = thread::spawn(move || {
        let mut b = [0u8; 1];
        while f2_acks.read_exact(&mut b).is_ok() {}
    });
    let mut buf = [0u8; REQUEST];
    let mut ack = [0u8; 1];
    while client.read_exact(&mut buf).is_ok() {
        if f1.write_all(&buf).is_err() || f2.write_all(&buf).is_err() {
            break;
        }
        log.append(&buf).expect("leader append");
        if f1.read_exact(&mut ack).is_err() || client.write_all(&[1]).is_err() {
            break;
        }
    }
    // The drain holds a clone of f2's socket: shut it down so the followers and the drain end.
    let _ = f2.shutdown(Shutdown::Both);
    let _ = f1.shutdown(Shutdown::Both);
    let _ = drain.join();
}

/// Largest batch the leader takes from its client at once.
const MAX_BATCH: usize = 1024;

fn read_u32(s: &mut TcpStream) -> Option<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

/// Pipelined variant: the follower takes a counted batch of requests, appends it with one
/// sync and acknowledges the count.
fn batch_follower(listener: TcpListener, mut log: Log) {
    let mut leader = accept(&listener);
    let mut buf = vec![0u8; MAX_BATCH * REQUEST];
    while let Some(k) = read_u32(&mut leader) {
        let data = &mut buf[..k as usize * REQUEST];
        if leader.read_exact(data).is_err() {
            break;
        }
        log.append(data).expect("follower append");
        if leader.write_all(&k.to_le_bytes()).is_err() {
            break;
        }
    }
}

/// Pipelined variant: the leader takes every whole request its client has sent so far as one
/// batch, forwards it, appends it with one sync, waits for the first follower and answers the
/// count. One batch is in flight at a time: requests arriving meanwhile make the next batch.
fn batch_leader(listener: TcpListener, f1: TcpStream, f2: TcpStream, mut log: Log) {
    let mut client = accept(&listener);
    let (mut f1, mut f2) = (f1, f2);
    let mut f2_acks = f2.try_clone().expect("clone");
    let drain = thread::spawn(move || while read_u32(&mut f2_acks).is_some() {});
    let mut buf = vec![0u8; MAX_BATCH * REQUEST];
    let mut have = 0;
    let mut frame = Vec::with_capacity(4 + buf.len());
    loop {
        match client.read(&mut buf[have..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
        let k = have / REQUEST;
        if k == 0 {
            continue;
        }
        let data = &buf[..k * REQUEST];
        frame.clear();
        frame.extend_from_slice(&(k as u32).to_le_bytes());
        frame.extend_from_slice(data);
        if f1.write_all(&frame).is_err() || f2.write_all(&frame).is_err() {
            break;
        }
        log.append(data).expect("leader append");
        if read_u32(&mut f1).is_none() || client.write_all(&(k as u32).to_le_bytes()).is_err() {
            break;
        }
        buf.copy_within(k * REQUEST..have, 0);
        have -= k * REQUEST;
    }
    let _ = f2.shutdown(Shutdown::Both);
    let _ = f1.shutdown(Shutdown::Both);
    let _ = drain.join();
}

/// Starts three nodes of `kind` and returns the leader's client address and the threads.
fn nodes(
    dir: &Path,
    sync: bool,
    pipelined: bool,
) -> (
    std::net::SocketAddr,
    Vec<thread::JoinHandle<()>>,
    Vec<PathBuf>,
) {
    let logs: Vec<PathBuf> = (0..3)
        .map(|i| dir.join(format!("quiver-floor-{}-{i}.log", std::process::id())))
        .collect();
    let open = |i: usize| Log::create(&logs[i], sync).expect("create log file");
    let (l0, l1, l2) = (open(0), open(1), open(2));
    let lf1 = TcpListener::bind("127.0.0.1:0").expect("bind");
    let lf2 = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ll = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (a1, a2, al) = (
        lf1.local_addr().unwrap(),
        lf2.local_addr().unwrap(),
        ll.local_addr().unwrap(),
    );
    let fol = if pipelined { batch_follower } else { follower };
    let t1 = thread::spawn(move || fol(lf1, l1));
    let t2 = thread::spawn(move || fol(lf2, l2));
    let (f1, f2) = (connect(a1), connect(a2));
    let lead = if pipelined { batch_leader } else { leader };
    let tl = thread::spawn(move || lead(ll, f1, f2, l0));
    (al, vec![tl, t1, t2], logs)
}

/// `clients` requests kept in flight on one connection (each answered request is replaced by
/// a new one at once): throughput of the pipelined variant.
fn run_pipelined(dir: &Path, secs: f64, sync: bool, clients: usize) -> (Histogram<u64>, f64) {
    let (addr, threads, logs) = nodes(dir, sync, true);
    let mut conn = connect(addr);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("histogram");
    let mut sent = std::collections::VecDeque::with_capacity(clients);
    let requests = vec![7u8; clients * REQUEST];
    let now = Instant::now();
    conn.write_all(&requests).expect("client send");
    sent.extend(std::iter::repeat_n(now, clients));
    let warm = now + Duration::from_secs(1);
    let mut start = None;
    let mut ops = 0u64;
    while let Some(k) = read_u32(&mut conn) {
        let done = Instant::now();
        for _ in 0..k {
            let t = sent.pop_front().expect("answer for a request sent");
            if done >= warm {
                hist.saturating_record((done - t).as_nanos() as u64);
                ops += 1;
            }
        }
        if done >= warm {
            let s = *start.get_or_insert(done);
            if (done - s).as_secs_f64() >= secs {
                break;
            }
        }
        conn.write_all(&requests[..k as usize * REQUEST])
            .expect("client send");
        sent.extend(std::iter::repeat_n(done, k as usize));
    }
    let elapsed = start.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
    let _ = conn.shutdown(Shutdown::Both);
    for t in threads {
        let _ = t.join();
    }
    for p in logs {
        let _ = std::fs::remove_file(p);
    }
    (hist, ops as f64 / elapsed)
}

fn run(dir: &Path, secs: f64, sync: bool) -> (Histogram<u64>, f64) {
    let (al, threads, logs) = nodes(dir, sync, false);
    let mut client = connect(al);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("histogram");
    let request = [7u8; REQUEST];
    let mut answer = [0u8; 1];
    let warm = Instant::now() + Duration::from_secs(1);
    let mut start = None;
    let mut ops = 0u64;
    loop {
        let t = Instant::now();
        client.write_all(&request).expect("client send");
        client.read_exact(&mut answer).expect("client receive");
        let done = Instant::now();
        if done < warm {
            continue;
        }
        let s = *start.get_or_insert(done);
        hist.saturating_record((done - t).as_nanos() as u64);
        ops += 1;
        if (done - s).as_secs_f64() >= secs {
            break;
        }
    }
    let elapsed = start.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
    drop(client);
    for t in threads {
        let _ = t.join();
    }
    for p in logs {
        let _ = std::fs::remove_file(p);
    }
    (hist, ops as f64 / elapsed)
}

fn print_row(name: &str, (h, rate): (Histogram<u64>, f64)) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
    println!(
        "| {name} | {rate:.0} | {:.3} | {:.3} | {:.3} |",
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
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
    for (name, sync) in [
        ("3 replicas, fdatasync on each", true),
        ("3 replicas, no sync", false),
    ] {
        print_row(&format!("1 client, {name}"), run(&dir, secs, sync));
    }
    for (name, sync) in [
        ("3 replicas, fdatasync on each", true),
        ("3 replicas, no sync", false),
    ] {
        print_row(
            &format!("64 requests in flight, {name}"),
            run_pipelined(&dir, secs, sync, 64),
        );
    }
}
