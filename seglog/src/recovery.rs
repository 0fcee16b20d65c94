//! Recovery on open: scan every segment with `pread` (never through a mapping), decide where the
//! log really ends, cut a torn tail, refuse corruption.
//!
//! The rules (the crash analysis in `docs/design/log-format.md` explains why they are complete):
//!
//! 1. Segment numbers must be contiguous and every header valid; otherwise [`Error::Corrupt`].
//!    (Creation is atomic and GC deletes oldest-first with a directory fsync after each file,
//!    so neither a crash nor GC can leave a gap or a bad header.)
//! 2. Each segment is walked record by record from its first record until the first invalid one
//!    at offset `o`. What counts as durable: everything below the segment's own durable mark, and
//!    the whole segment if any later segment has a valid mark (marks are written only after a sync
//!    that flushed every earlier segment).
//! 3. If `o` lies in durable data, the segment must still end naturally there (see 4); if not,
//!    that is [`Error::Corrupt`] naming the segment and `o`.
//! 4. A segment ends naturally at `o` when the next segment's header says the previous segment
//!    ended at `o` (the writer records where it rolled). Then the scan continues in the next
//!    segment.
//! 5. Otherwise `o` is the torn tail: the log ends at `o`. Non-zero bytes after `o` are zeroed
//!    (a stale record left there could later look like a continuation of the log) and every later
//!    segment is deleted, newest first.
//!
//! Damage in data that was not yet durable, including a hole followed by intact records (the
//! kernel writes dirty pages back in any order), is a torn tail by rule 5. That is the deliberate
//! refinement of "an invalid record followed by valid ones is corruption": the durable marks tell
//! the two cases apart.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::config::{Config, SyncMode};
use crate::error::{Error, Result};
use crate::format::{self, BadRecord, SegmentHeader, HEADER_LEN, MARK_LEN, MARK_OFFSET};
use crate::segment::{self, RETIRED_SUFFIX, SEGMENT_SUFFIX, TMP_SUFFIX};

/// What recovery found and did; returned by [`crate::SegLog::open`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments in the log after recovery.
    pub segments: usize,
    /// Records in the log after recovery.
    pub records: u64,
    /// Bytes cut from the tail: non-zero bytes zeroed after the last whole record plus the
    /// non-zero record bytes of deleted later segments. 0 after a clean shutdown.
    pub torn_tail_bytes: u64,
    /// Later segments deleted because they lay after the torn tail.
    pub removed_segments: usize,
}

/// One segment that survived recovery, not yet mapped.
#[derive(Debug)]
pub(crate) struct RecoveredSegment {
    pub(crate) header: SegmentHeader,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// End of the last whole record.
    pub(crate) tail: u64,
    /// Records in this segment.
    pub(crate) records: u64,
    /// The valid durable mark found on disk.
    pub(crate) mark: Option<u64>,
    /// The data up to `tail` was not covered by a durable mark before this open (recovery flushed
    /// it); the log should write a fresh mark.
    pub(crate) needs_mark: bool,
}

/// Output of [`recover`].
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) segments: Vec<RecoveredSegment>,
    pub(crate) report: Recovery,
}

struct Found {
    number: u64,
    path: PathBuf,
    file: File,
    len: u64,
    header: SegmentHeader,
    mark: Option<u64>,
}

fn corrupt(segment: u64, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        segment,
        offset,
        reason: reason.into(),
    }
}

/// Lists, checks and scans the segments of `dir` and repairs a torn tail.
pub(crate) fn recover(dir: &Path, config: &Config) -> Result<Recovered> {
    let mut numbered = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list log directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list log directory", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TMP_SUFFIX) || name.ends_with(RETIRED_SUFFIX) {
            // An interrupted creation (it never got its final name, so it holds no records), or
            // a segment GC dropped whose deletion a restart cut short.
            let _ = std::fs::remove_file(entry.path());
        } else if let Some(n) = segment::parse_file_name(name) {
            numbered.push((n, entry.path()));
        } else if name.ends_with(SEGMENT_SUFFIX) {
            return Err(corrupt(
                0,
                0,
                format!("unexpected segment file name {name}"),
            ));
        }
    }
    numbered.sort();
    for w in numbered.windows(2) {
        if w[1].0 != w[0].0 + 1 {
            return Err(corrupt(
                w[0].0 + 1,
                0,
                format!("segment file missing between {} and {}", w[0].0, w[1].0),
            ));
        }
    }

    // Open and check every header before deciding anything.
    let mut found = Vec::with_capacity(numbered.len());
    for (number, path) in numbered {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open segment", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat segment", &path, e))?
            .len();
        if len < HEADER_LEN {
            return Err(corrupt(
                number,
                len,
                format!("file of {len} bytes is shorter than the segment header"),
            ));
        }
        let mut h = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io("read segment header", &path, e))?;
        let header = SegmentHeader::decode(&h).map_err(|why| corrupt(number, 0, why))?;
        if header.number != number {
            return Err(corrupt(
                number,
                16,
                format!("header says segment {}", header.number),
            ));
        }
        let m = MARK_OFFSET as usize;
        let mark = format::decode_mark(&h[m..m + MARK_LEN], header.nonce);
        found.push(Found {
            number,
            path,
            file,
            len,
            header,
            mark,
        });
    }

    let mut report = Recovery::default();
    let mut out = Vec::with_capacity(found.len());
    let n = found.len();
    let mut cut_after: Option<usize> = None;
    for i in 0..n {
        let durable_whole = found[i + 1..].iter().any(|f| f.mark.is_some());
        let f = &found[i];
        let data = read_all(f)?;
        let (tail, records, bad) = walk(&data, f.header.nonce);
        let mark = f.mark;
        if let Some(m) = mark {
            if tail < m {
                return Err(corrupt(
                    f.number,
                    tail,
                    format!("{bad}, below the durable mark {m}"),
                ));
            }
        }
        // The writer rolled exactly at the tail it wrote into the next segment's header. (Bytes
        // after that tail are never read: a sealed segment is never appended to again.)
        let is_last = i + 1 == n;
        let natural_end = !is_last && tail == found[i + 1].header.prev_tail;
        if durable_whole {
            if !natural_end {
                return Err(corrupt(
                    f.number,
                    tail,
                    format!("{bad}, in a segment that a later segment's durable mark covers"),
                ));
            }
            out.push(recovered(f, tail, records, false)?);
            continue;
        }
        if natural_end {
            out.push(recovered(f, tail, records, true)?);
            continue;
        }
        // The torn tail: the log ends at (f.number, tail).
        let rs = recovered(f, tail, records, true)?;
        if let Some(last) = last_nonzero(&data[tail as usize..]) {
            let torn = last as u64 + 1;
            zero_range(&rs.file, &rs.path, tail, torn)?;
            report.torn_tail_bytes += torn;
            // Durable now, not with the next sync: a sync flushes only up to its own end, and a
            // stale record on a later page must never reappear right after new synced records.
            if config.sync == SyncMode::Data {
                rs.file
                    .sync_data()
                    .map_err(|e| Error::io("fdatasync segment", &rs.path, e))?;
            }
        }
        out.push(rs);
        cut_after = Some(i);
        break;
    }

    // Delete everything after the torn tail, newest first, so a crash here leaves a prefix.
    if let Some(i) = cut_after {
        for f in found[i + 1..].iter().rev() {
            let data = read_all(f)?;
            if let Some(last) = last_nonzero(&data[HEADER_LEN as usize..]) {
                report.torn_tail_bytes += last as u64 + 1;
            }
            std::fs::remove_file(&f.path)
                .map_err(|e| Error::io("remove torn segment", &f.path, e))?;
            report.removed_segments += 1;
        }
        if report.removed_segments > 0 && config.sync == SyncMode::Data {
            segment::fsync_dir(dir)?;
        }
    }
    // Recovered records not yet covered by a mark become durable now, so the log may report
    // them as durable (and mark them) after open.
    if config.sync == SyncMode::Data {
        for rs in out.iter().filter(|rs| rs.needs_mark) {
            rs.file
                .sync_data()
                .map_err(|e| Error::io("fdatasync segment", &rs.path, e))?;
        }
    }
    // The active segment gets back its full preallocated size if its file was cut short.
    if let Some(last) = out.last() {
        let len = last
            .file
            .metadata()
            .map_err(|e| Error::io("stat segment", &last.path, e))?
            .len();
        if len < last.header.size {
            segment::preallocate(&last.file, last.header.size)
                .map_err(|e| Error::io("preallocate segment", &last.path, e))?;
            if config.sync == SyncMode::Data {
                last.file
                    .sync_all()
                    .map_err(|e| Error::io("fsync segment", &last.path, e))?;
            }
        }
    }
    report.segments = out.len();
    report.records = out.iter().map(|s| s.records).sum();
    Ok(Recovered {
        segments: out,
        report,
    })
}

fn recovered(f: &Found, tail: u64, records: u64, needs_mark: bool) -> Result<RecoveredSegment> {
    let file = f
        .file
        .try_clone()
        .map_err(|e| Error::io("dup segment fd", &f.path, e))?;
    Ok(RecoveredSegment {
        header: f.header,
        path: f.path.clone(),
        file,
        tail,
        records,
        mark: f.mark,
        needs_mark: needs_mark && f.mark.is_none_or(|m| m < tail),
    })
}

fn read_all(f: &Found) -> Result<Vec<u8>> {
    let mut data = vec![0u8; f.len as usize];
    f.file
        .read_exact_at(&mut data, 0)
        .map_err(|e| Error::io("read segment", &f.path, e))?;
    Ok(data)
}

/// Walks whole records from the first record offset. Returns (offset after the last whole record,
/// records, why the walk stopped).
pub(crate) fn walk(data: &[u8], nonce: u32) -> (u64, u64, BadRecord) {
    let mut off = HEADER_LEN;
    let mut records = 0;
    loop {
        match format::check_record(&data[off as usize..], nonce) {
            Ok(frame) => {
                off += frame;
                records += 1;
            }
            Err(bad) => return (off, records, bad),
        }
    }
}

fn last_nonzero(b: &[u8]) -> Option<usize> {
    b.iter().rposition(|&x| x != 0)
}

fn zero_range(file: &File, path: &Path, from: u64, n: u64) -> Result<()> {
    let zeros = vec![0u8; (n as usize).min(1 << 20)];
    let mut done = 0;
    while done < n {
        let k = (n - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..k], from + done)
            .map_err(|e| Error::io("zero torn tail", path, e))?;
        done += k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_record;
    use proptest::prelude::*;

    const SIZE: u64 = 4096;

    fn config() -> Config {
        Config {
            segment_size: SIZE,
            max_record_size: 1024,
            sync: SyncMode::None,
        }
    }

    /// Writes segment `number` with `records` payloads; returns the tail.
    fn write_segment(
        dir: &Path,
        number: u64,
        prev_tail: u64,
        mark: Option<u64>,
        records: &[&[u8]],
    ) -> u64 {
        let nonce = 0x1234_5678 ^ number as u32;
        let mut b = vec![0u8; SIZE as usize];
        let h = SegmentHeader {
            number,
            nonce,
            size: SIZE,
            prev_tail,
        };
        b[..format::HEADER_USED].copy_from_slice(&h.encode());
        if let Some(m) = mark {
            b[MARK_OFFSET as usize..MARK_OFFSET as usize + MARK_LEN]
                .copy_from_slice(&format::encode_mark(m, nonce));
        }
        let mut off = HEADER_LEN as usize;
        for r in records {
            let e = encode_record(nonce, r);
            b[off..off + e.len()].copy_from_slice(&e);
            off += e.len();
        }
        std::fs::write(dir.join(segment::file_name(number)), b).unwrap();
        off as u64
    }

    fn corrupt_at(r: Result<Recovered>) -> (u64, u64) {
        match r {
            Err(Error::Corrupt {
                segment, offset, ..
            }) => (segment, offset),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn empty_directory_and_tmp_leftovers() {
        let dir = crate::test_dir();
        std::fs::write(dir.path().join("00000000000000000001.seg.tmp"), b"junk").unwrap();
        let r = recover(dir.path(), &config()).unwrap();
        assert!(r.segments.is_empty());
        assert!(!dir.path().join("00000000000000000001.seg.tmp").exists());
    }

    #[test]
    fn natural_end_uses_prev_tail() {
        let dir = crate::test_dir();
        let t1 = write_segment(dir.path(), 1, 0, None, &[b"a", b"bb"]);
        write_segment(dir.path(), 2, t1, None, &[b"ccc"]);
        let r = recover(dir.path(), &config()).unwrap();
        assert_eq!(r.report.records, 3);
        assert_eq!(r.report.segments, 2);
        assert_eq!(r.segments[0].tail, t1);
    }

    #[test]
    fn lost_tail_before_a_roll_cuts_the_later_segment() {
        let dir = crate::test_dir();
        let t1 = write_segment(dir.path(), 1, 0, None, &[b"a", b"bb"]);
        // Segment 2 says segment 1 ended later than it does: segment 1 lost a record.
        write_segment(dir.path(), 2, t1 + 20, None, &[b"ccc"]);
        let r = recover(dir.path(), &config()).unwrap();
        assert_eq!(r.report.records, 2);
        assert_eq!(r.report.removed_segments, 1);
        assert!(r.report.torn_tail_bytes > 0);
        assert!(!dir.path().join(segment::file_name(2)).exists());
    }

    #[test]
    fn same_loss_under_a_later_mark_is_corruption() {
        let dir = crate::test_dir();
        let t1 = write_segment(dir.path(), 1, 0, None, &[b"a", b"bb"]);
        write_segment(dir.path(), 2, t1 + 20, Some(HEADER_LEN), &[b"ccc"]);
        assert_eq!(corrupt_at(recover(dir.path(), &config())), (1, t1));
    }

    #[test]
    fn invalid_record_below_the_mark_is_corruption_above_it_a_torn_tail() {
        let dir = crate::test_dir();
        let t = write_segment(
            dir.path(),
            1,
            0,
            Some(HEADER_LEN + 9 + 10),
            &[b"a", b"bb", b"ccc"],
        );
        let path = dir.path().join(segment::file_name(1));
        let mut b = std::fs::read(&path).unwrap();
        b[HEADER_LEN as usize + 9 + 8] ^= 1; // payload of "bb", below the mark
        std::fs::write(&path, &b).unwrap();
        assert_eq!(
            corrupt_at(recover(dir.path(), &config())),
            (1, HEADER_LEN + 9)
        );
        b[HEADER_LEN as usize + 9 + 8] ^= 1;
        b[t as usize - 1] ^= 1; // payload of "ccc", above the mark
        b[t as usize + 100] = 7; // garbage after the tail
        std::fs::write(&path, &b).unwrap();
        let r = recover(dir.path(), &config()).unwrap();
        assert_eq!(r.report.records, 2);
        assert_eq!(r.report.torn_tail_bytes, t + 101 - (HEADER_LEN + 19));
        let after = std::fs::read(&path).unwrap();
        assert!(
            after[(HEADER_LEN + 19) as usize..].iter().all(|&x| x == 0),
            "cut bytes zeroed"
        );
    }

    #[test]
    fn gap_bad_header_and_short_file_are_corruption() {
        let dir = crate::test_dir();
        let t1 = write_segment(dir.path(), 1, 0, None, &[b"a"]);
        write_segment(dir.path(), 3, t1, None, &[b"c"]);
        assert_eq!(corrupt_at(recover(dir.path(), &config())), (2, 0));

        let dir = crate::test_dir();
        write_segment(dir.path(), 1, 0, None, &[b"a"]);
        let path = dir.path().join(segment::file_name(1));
        let mut b = std::fs::read(&path).unwrap();
        b[20] ^= 0xff;
        std::fs::write(&path, &b).unwrap();
        assert_eq!(corrupt_at(recover(dir.path(), &config())), (1, 0));
        b.truncate(100);
        std::fs::write(&path, &b).unwrap();
        assert_eq!(corrupt_at(recover(dir.path(), &config())), (1, 100));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Recovery over arbitrary bytes after a valid header: no panic, and either a clean prefix
        /// of whole records or a typed Corrupt.
        #[test]
        fn arbitrary_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            mark in proptest::option::of(HEADER_LEN..SIZE + 100),
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..5),
            splice in any::<proptest::sample::Index>(),
        ) {
            let dir = crate::test_dir();
            let refs: Vec<&[u8]> = records.iter().map(|r| r.as_slice()).collect();
            let t = write_segment(dir.path(), 1, 0, mark, &refs);
            let path = dir.path().join(segment::file_name(1));
            let mut b = std::fs::read(&path).unwrap();
            let at = HEADER_LEN as usize + splice.index((t - HEADER_LEN) as usize + 1);
            let n = body.len().min(b.len() - at);
            b[at..at + n].copy_from_slice(&body[..n]);
            std::fs::write(&path, &b).unwrap();
            match recover(dir.path(), &config()) {
                Ok(r) => {
                    let seg = &r.segments[0];
                    let data = std::fs::read(&path).unwrap();
                    let (tail, count, _) = walk(&data, seg.header.nonce);
                    prop_assert_eq!((tail, count), (seg.tail, seg.records));
                    prop_assert!(data[tail as usize..].iter().all(|&x| x == 0));
                }
                Err(Error::Corrupt { segment, .. }) => prop_assert_eq!(segment, 1),
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
    }
}
