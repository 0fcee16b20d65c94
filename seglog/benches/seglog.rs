//! `cargo bench -p seglog`: append throughput of seglog with and without syncs, against the raw
//! fdatasync floor of the same disk. Plain `main` (no criterion); prints one table.
//!
//! Each case runs until it has written its record count or spent its time budget, whichever comes
//! first, so the whole run stays under about 30 s even on a slow disk. Environment:
//! - `SEGLOG_BENCH_DIR`: directory to benchmark in (default: cargo's target tmp dir, i.e. the disk
//!   the workspace is on);
//! - `SEGLOG_BENCH_SECS`: time budget per case in seconds (default 1.5).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seglog::{Config, SegLog, SyncMode};

struct Row {
    case: String,
    records: u64,
    bytes: u64,
    secs: f64,
    syncs: u64,
    flushes: u64,
}

impl Row {
    fn print(&self) {
        let per_flush = if self.flushes > 0 {
            format!("{:>9.0}", self.secs * 1e6 / self.flushes as f64)
        } else {
            format!("{:>9}", "-")
        };
        println!(
            "| {:<48} | {:>9} | {:>6.2} | {:>11.0} | {:>8.1} | {:>7} | {:>7} | {} |",
            self.case,
            self.records,
            self.secs,
            self.records as f64 / self.secs,
            self.bytes as f64 / self.secs / 1e6,
            self.syncs,
            self.flushes,
            per_flush,
        );
    }
}

fn budget() -> Duration {
    let secs = std::env::var("SEGLOG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.5);
    Duration::from_secs_f64(secs)
}

/// One thread appends `size`-byte records, syncing every `every` records (0: never).
fn single(dir: &Path, size: usize, every: u64, max_records: u64, sync: SyncMode) -> Row {
    let sub = tempfile::tempdir_in(dir).unwrap();
    let config = Config {
        sync,
        ..Config::default()
    };
    let (log, _) = SegLog::open(sub.path(), config).unwrap();
    let payload = vec![0xa5u8; size];
    let budget = budget();
    let start = Instant::now();
    let mut n = 0;
    while n < max_records && (n % 64 != 0 || start.elapsed() < budget) {
        log.append(&payload).unwrap();
        n += 1;
        if every > 0 && n % every == 0 {
            log.sync().unwrap();
        }
    }
    if every > 0 && n % every != 0 {
        log.sync().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let stats = log.stats();
    let case = match (every, sync) {
        (0, _) => format!("{size} B, no sync"),
        (k, SyncMode::Data) => format!("{size} B, sync every {k}"),
        (k, SyncMode::None) => format!("{size} B, sync every {k}, SyncMode::None"),
    };
    Row {
        case,
        records: n,
        bytes: n * size as u64,
        secs,
        syncs: stats.sync_calls,
        flushes: stats.flush_rounds,
    }
}

/// `threads` threads each append one record and sync, in a loop: group commit at work.
fn concurrent(dir: &Path, size: usize, threads: u64) -> Row {
    let sub = tempfile::tempdir_in(dir).unwrap();
    let (log, _) = SegLog::open(sub.path(), Config::default()).unwrap();
    let log = Arc::new(log);
    let budget = budget();
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let log = log.clone();
            std::thread::spawn(move || {
                let payload = vec![0x5au8; size];
                let mut n = 0u64;
                while start.elapsed() < budget {
                    log.append(&payload).unwrap();
                    log.sync().unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let n: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    let stats = log.stats();
    Row {
        case: format!("{size} B, {threads} threads, each append+sync"),
        records: n,
        bytes: n * size as u64,
        secs,
        syncs: stats.sync_calls,
        flushes: stats.flush_rounds,
    }
}

/// The floor: `pwrite` of `size` bytes then `fdatasync`, on a plain file (growing, or
/// preallocated and overwritten like a seglog segment).
fn raw_fdatasync(dir: &Path, size: usize, preallocated: bool) -> Row {
    let path = dir.join(format!("raw-{preallocated}.dat"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    if preallocated {
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 64 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let payload = vec![0x11u8; size];
    let budget = budget();
    let start = Instant::now();
    let mut n = 0u64;
    while n < 20_000 && start.elapsed() < budget {
        f.write_all_at(&payload, n * size as u64).unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Row {
        case: format!(
            "raw pwrite {size} B + fdatasync, {}",
            if preallocated {
                "fallocated file"
            } else {
                "growing file"
            }
        ),
        records: n,
        bytes: n * size as u64,
        secs,
        syncs: n,
        flushes: n,
    }
}

/// The floor for the concurrent cases: `threads` threads take turns (one mutex) doing
/// `pwrite` of 256 B + `fdatasync` on one fallocated file. Shows what the disk does when fdatasync
/// calls come back to back from several threads, without any group commit.
fn raw_fdatasync_threads(dir: &Path, threads: u64) -> Row {
    let path = dir.join("raw-threads.dat");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 64 << 20).unwrap();
    f.sync_all().unwrap();
    let shared = Arc::new(std::sync::Mutex::new((f, 0u64)));
    let budget = budget();
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let payload = [0x22u8; 256];
                while start.elapsed() < budget {
                    let mut g = shared.lock().unwrap();
                    let off = g.1 * 256;
                    g.0.write_all_at(&payload, off).unwrap();
                    g.0.sync_data().unwrap();
                    g.1 += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = shared.lock().unwrap().1;
    let _ = std::fs::remove_file(&path);
    Row {
        case: format!("raw pwrite 256 B + fdatasync, {threads} threads in turn"),
        records: n,
        bytes: n * 256,
        secs,
        syncs: n,
        flushes: n,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a name filter on the cases.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let root = match std::env::var("SEGLOG_BENCH_DIR") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    };
    std::fs::create_dir_all(&root).unwrap();
    let dir = tempfile::tempdir_in(&root).unwrap();
    println!(
        "seglog bench in {} (budget {:?} per case, segment 64 MiB, SyncMode::Data unless noted)\n",
        dir.path().display(),
        budget()
    );
    println!(
        "| {:<48} | {:>9} | {:>6} | {:>11} | {:>8} | {:>7} | {:>7} | {:>9} |",
        "case", "records", "secs", "appends/s", "MB/s", "syncs", "flushes", "µs/flush"
    );
    println!(
        "|{:-<50}|{:-<11}:|{:-<7}:|{:-<12}:|{:-<9}:|{:-<8}:|{:-<8}:|{:-<10}:|",
        "", "", "", "", "", "", "", ""
    );
    type Case<'a> = (&'a str, Box<dyn Fn() -> Row + 'a>);
    let d = dir.path();
    let cases: Vec<Case> = vec![
        ("raw", Box::new(|| raw_fdatasync(d, 256, false))),
        ("raw", Box::new(|| raw_fdatasync(d, 256, true))),
        (
            "nosync",
            Box::new(|| single(d, 256, 0, 1_000_000, SyncMode::Data)),
        ),
        (
            "nosync",
            Box::new(|| single(d, 4096, 0, 100_000, SyncMode::Data)),
        ),
        (
            "sync1",
            Box::new(|| single(d, 256, 1, 20_000, SyncMode::Data)),
        ),
        (
            "sync1",
            Box::new(|| single(d, 4096, 1, 20_000, SyncMode::Data)),
        ),
        (
            "sync16",
            Box::new(|| single(d, 256, 16, 200_000, SyncMode::Data)),
        ),
        (
            "sync16",
            Box::new(|| single(d, 4096, 16, 100_000, SyncMode::Data)),
        ),
        (
            "sync256",
            Box::new(|| single(d, 256, 256, 1_000_000, SyncMode::Data)),
        ),
        (
            "sync256",
            Box::new(|| single(d, 4096, 256, 100_000, SyncMode::Data)),
        ),
        (
            "none",
            Box::new(|| single(d, 256, 1, 1_000_000, SyncMode::None)),
        ),
        ("raw", Box::new(|| raw_fdatasync_threads(d, 4))),
        ("group", Box::new(|| concurrent(d, 256, 1))),
        ("group", Box::new(|| concurrent(d, 256, 4))),
        ("group", Box::new(|| concurrent(d, 256, 16))),
    ];
    for (name, run) in cases {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        run().print();
    }
}
