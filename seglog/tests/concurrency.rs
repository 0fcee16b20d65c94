//! Several threads appending and syncing one log while another iterates it. Every position a thread
//! saw covered by its own `sync()` must be in the log after reopen, with its payload; group commit
//! must have shared flushes between callers.

mod common;

use std::sync::Arc;

use seglog::{Config, Position, SegLog, SyncMode};

const THREADS: u64 = 4;
const ROUNDS: u64 = 40;

fn payload(thread: u64, seq: u64) -> Vec<u8> {
    let mut p = thread.to_le_bytes().to_vec();
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend((0..(seq % 97) as u8).map(|k| k ^ thread as u8));
    p
}

fn check_payload(p: &[u8]) {
    assert!(p.len() >= 16, "short payload");
    let thread = u64::from_le_bytes(p[0..8].try_into().unwrap());
    let seq = u64::from_le_bytes(p[8..16].try_into().unwrap());
    assert_eq!(p, payload(thread, seq), "payload mangled");
}

#[test]
fn concurrent_appends_and_syncs_are_durable_after_reopen() {
    // A real disk (not tmpfs): flushes take milliseconds, so callers really queue behind a leader.
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: 8 << 10, // small: several rolls under concurrency
        max_record_size: 4096,
        sync: SyncMode::Data,
    };
    let (log, _) = SegLog::open(dir.path(), config.clone()).unwrap();
    let log = Arc::new(log);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let reader = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || passes == 0 {
                let mut last = None;
                for r in log.iter(Position::default()) {
                    let (pos, p) = r.expect("concurrent iteration never fails");
                    assert!(last < Some(pos), "positions increase");
                    last = Some(pos);
                    check_payload(&p);
                }
                passes += 1;
            }
            passes
        })
    };

    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut durable = Vec::new();
                let mut pending = Vec::new();
                let mut seq = 0;
                for round in 0..ROUNDS {
                    if round % 3 == 0 {
                        let ps: Vec<Vec<u8>> = (0..3).map(|k| payload(t, seq + k)).collect();
                        seq += 3;
                        let pos = log.append_batch(ps.iter().map(|p| p.as_slice())).unwrap();
                        assert!(pos.windows(2).all(|w| w[0] < w[1]));
                        pending.extend(pos.into_iter().zip(ps));
                    } else {
                        let p = payload(t, seq);
                        seq += 1;
                        pending.push((log.append(&p).unwrap(), p));
                    }
                    let d = log.sync().unwrap();
                    for (pos, p) in pending.drain(..) {
                        assert!(pos < d, "sync returned a durable end below our record");
                        durable.push((pos, p));
                    }
                }
                durable
            })
        })
        .collect();
    let mut durable: Vec<(Position, Vec<u8>)> = Vec::new();
    for w in writers {
        durable.extend(w.join().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let passes = reader.join().unwrap();
    let stats = log.stats();
    println!("reader passes {passes}; {stats:?}");
    assert_eq!(stats.sync_calls, THREADS * ROUNDS);
    assert!(stats.segments_created > 1, "no roll happened");
    assert!(
        stats.flush_rounds < stats.sync_calls,
        "group commit shared no flush: {stats:?}"
    );

    drop(log);
    let (log, rec) = SegLog::open(dir.path(), config).unwrap();
    assert_eq!(rec.torn_tail_bytes, 0);
    assert_eq!(rec.records, durable.len() as u64);
    for (pos, p) in &durable {
        assert_eq!(&log.read(*pos).unwrap(), p, "record at {pos} after reopen");
    }
    let all = common::records(&log);
    let mut sorted = durable.clone();
    sorted.sort();
    assert!(
        all == sorted,
        "the log is exactly the synced records, in position order"
    );
}
