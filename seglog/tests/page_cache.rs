//! How the log's pages sit in the kernel's page cache, measured through the kernel's own
//! accounting (`write_bytes` of `/proc/thread-self/io`: when a write dirties a page-cache folio,
//! the thread is charged the folio's whole size, which is also what the next sync writes back).
//!
//! The regression: appends write through a shared mapping. The kernel's mmap read-around (and
//! `pread` read-ahead) brought the unwritten pages ahead of the tail into the page cache as ever
//! larger folios as the writes walked a segment, up to 2 MiB each; an append of a few hundred
//! bytes then dirtied a whole folio, and every sync wrote it back. Measured on the development
//! VM (Linux 6.18, ext4, read_ahead_kb 8192) before the fix: 2 MiB written per sync after
//! 40 MiB of a segment, sync p50 0.64 ms instead of 0.10 ms; in a 3-node cluster serving 1,000
//! ops/s, 1.2 GB/s of disk writes. The log now maps segments `MADV_RANDOM` (no read-around:
//! a write fault brings in one page). Reads (`pread`, read-ahead on) and recovery are checked
//! too: their read-ahead stops at the cached pages at the tail, so it does not reach past it.
//!
//! An integration test on purpose: the unit-test build of the mapping keeps a shadow copy of
//! the file (read back with `pread` on every flush), which changes the page cache it measures.

use seglog::{Config, SegLog, SyncMode};

/// Bytes the kernel charged this thread for dirtying pages, if it reports them.
fn thread_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes dirtied per sync of 64 appends of 300 bytes, each synced.
fn dirtied_per_sync(log: &SegLog) -> u64 {
    let before = thread_write_bytes().expect("checked by the caller");
    for _ in 0..64 {
        log.append(&[7u8; 300]).unwrap();
        log.sync().unwrap();
    }
    (thread_write_bytes().unwrap() - before) / 64
}

#[test]
fn small_syncs_write_back_pages_not_large_folios() {
    if thread_write_bytes().is_none() {
        eprintln!("skipped: this kernel does not report /proc/thread-self/io");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: 64 << 20,
        max_record_size: 1 << 20,
        sync: SyncMode::Data,
    };
    let (log, _) = SegLog::open(dir.path(), config.clone()).unwrap();
    // 40 MiB in 4 KiB records, synced every other append: far enough into the segment for
    // the kernel's read-around to have grown its folios to their largest.
    let big = vec![3u8; 4 << 10];
    let mut positions = Vec::new();
    for i in 0..10_240 {
        positions.push(log.append(&big).unwrap());
        if i % 2 == 1 {
            log.sync().unwrap();
        }
    }
    // A record's page or two, plus the header page that holds the durable mark.
    let w = dirtied_per_sync(&log);
    assert!(w <= 32 << 10, "each 300-byte sync dirtied {w} bytes");
    // Reads of records whose pages left the page cache (read here with read-ahead on a cold
    // cache) must not bring the pages ahead of the tail in as large folios either.
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let f = std::fs::File::open(&seg).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    for p in &positions[positions.len() - 1024..] {
        assert!(log.read(*p).unwrap() == big);
    }
    let w = dirtied_per_sync(&log);
    assert!(
        w <= 32 << 10,
        "after cold reads, each sync dirtied {w} bytes"
    );
    drop(log);
    // Recovery reads the segment sequentially (read-ahead on): the pages ahead of the tail
    // must not be cached as large folios after it either.
    let (log, _) = SegLog::open(dir.path(), config).unwrap();
    let w = dirtied_per_sync(&log);
    assert!(w <= 32 << 10, "after a reopen, each sync dirtied {w} bytes");
}
