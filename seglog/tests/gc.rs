//! Segment GC on disk: the files of dropped segments are deleted off the caller's thread
//! (renamed `NNN.seg.old`, then shrunk and unlinked by the reaper), and a leftover `.seg.old`
//! from a restart that cut a deletion short is deleted at open without touching the log.

use std::path::Path;
use std::time::{Duration, Instant};

use seglog::{Config, SegLog, SyncMode};

fn config() -> Config {
    Config {
        segment_size: 256 << 10,
        max_record_size: 16 << 10,
        sync: SyncMode::Data,
    }
}

/// File names in `dir` ending in `suffix`, sorted.
fn names(dir: &Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

#[test]
fn dropped_segments_are_deleted_in_the_background_and_leftovers_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegLog::open(dir.path(), config()).unwrap();
    let record = vec![9u8; 8 << 10];
    let mut positions = Vec::new();
    for _ in 0..200 {
        positions.push(log.append(&record).unwrap());
    }
    log.sync().unwrap();
    let segs = log.segments();
    assert!(segs.len() >= 5, "{segs:?}");
    let keep = segs[3].number;
    assert_eq!(log.drop_segments_before(keep).unwrap(), 3);
    // The log forgot them at once; their files go within a bounded time.
    assert_eq!(log.first(), segs[3].first);
    let deadline = Instant::now() + Duration::from_secs(20);
    let gone = |n: &str| !dir.path().join(n).exists();
    loop {
        let all_gone = segs[..3].iter().all(|s| {
            let name = s.path.file_name().unwrap().to_str().unwrap().to_string();
            gone(&name) && gone(&format!("{name}.old"))
        });
        if all_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dropped segment files still there: {:?}",
            names(dir.path(), "")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(names(dir.path(), ".seg.old").is_empty());
    // A deletion a restart cut short: a retired file of any size, any content.
    drop(log);
    let leftover = dir.path().join(format!("{:020}.seg.old", keep - 1));
    std::fs::write(&leftover, vec![0xAB; 100_000]).unwrap();
    let (log, rec) = SegLog::open(dir.path(), config()).unwrap();
    assert!(!leftover.exists(), "the leftover was not deleted at open");
    assert_eq!(rec.removed_segments, 0, "{rec:?}");
    assert_eq!(log.first(), segs[3].first);
    let kept: Vec<_> = positions
        .iter()
        .filter(|p| p.segment >= keep)
        .map(|p| log.read(*p).unwrap())
        .collect();
    assert!(!kept.is_empty());
    assert!(kept.iter().all(|r| *r == record));
}

/// `remove_file_gently` (used for other large files, e.g. a KV store's replaced image) deletes
/// the file within a bounded time, and leaves other files alone.
#[test]
fn remove_file_gently_deletes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.old");
    std::fs::write(&big, vec![1u8; 20 << 20]).unwrap();
    let other = dir.path().join("other");
    std::fs::write(&other, b"stays").unwrap();
    seglog::remove_file_gently(big.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while big.exists() {
        assert!(Instant::now() < deadline, "file still there");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&other).unwrap(), b"stays");
    // A file already gone is no error.
    seglog::remove_file_gently(big);
}
