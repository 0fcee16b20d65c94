//! Storage damage at the node level, done to a stopped node's seglog files (the format is in
//! `docs/design/log-format.md`): a torn write at the tail of the newest segment, and a bit flip
//! in a record below the segment's durable mark.
//!
//! The files are read and written with plain file I/O, never through seglog (opening the log
//! would run recovery and change what the node later finds).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// First record offset in a segment.
pub const RECORDS_START: u64 = 1024;
/// Offset of the durable-mark slot.
pub const MARK_OFFSET: u64 = 512;

/// A segment's records as the bytes show them.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    pub path: PathBuf,
    /// The segment number (from the file name).
    pub number: u64,
    /// The file's length.
    pub len: u64,
    /// The durable mark (0: none written, or below the first record).
    pub mark: u64,
    /// `(offset, frame_len)` of each record, walked by length from the first record until a
    /// frame length below 8 or past the file's end (the checksums are not checked: the caller
    /// damages a cleanly killed log, whose records are whole).
    pub records: Vec<(u64, u64)>,
}

impl SegmentScan {
    /// Where the records end.
    pub fn end(&self) -> u64 {
        self.records.last().map_or(RECORDS_START, |(o, l)| o + l)
    }
}

/// The newest segment (`NNN.seg`, highest number) of the seglog in `dir`.
///
/// # Errors
/// The directory cannot be read; `NotFound` when it holds no segment.
pub fn newest_segment(dir: &Path) -> io::Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(num) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| num > *b) {
            best = Some((num, p));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no segment"))
}

fn read_u32(f: &File, at: u64) -> io::Result<u32> {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at)?;
    Ok(u32::from_le_bytes(b))
}

/// Scan the segment at `path`.
///
/// # Errors
/// I/O errors; `InvalidData` for a name that is not a segment's.
pub fn scan(path: &Path) -> io::Result<SegmentScan> {
    let number = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".seg"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a segment name"))?;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut m = [0u8; 8];
    f.read_exact_at(&mut m, MARK_OFFSET)?;
    let mark = u64::from_le_bytes(m);
    let mut records = Vec::new();
    let mut o = RECORDS_START;
    while o + 8 <= len {
        let l = u64::from(read_u32(&f, o)?);
        if l < 8 || o + l > len {
            break;
        }
        records.push((o, l));
        o += l;
    }
    let mark = if (RECORDS_START..=o).contains(&mark) {
        mark
    } else {
        0
    };
    Ok(SegmentScan {
        path: path.to_path_buf(),
        number,
        len,
        mark,
        records,
    })
}

/// A torn write at the tail of the newest segment in `dir`: the start of a record that never
/// finished (a frame length promising more bytes than follow, a wrong checksum, part of a
/// payload) written where the records end, and the file cut short a few bytes into it. It lies
/// past the durable mark, so recovery must cut it as a torn tail and start. Returns the scan
/// before the damage and the offset of the torn record.
///
/// # Errors
/// I/O errors.
pub fn tear_tail(dir: &Path) -> io::Result<(SegmentScan, u64)> {
    let s = scan(&newest_segment(dir)?)?;
    let at = s.end();
    let f = OpenOptions::new().write(true).open(&s.path)?;
    let mut rec = Vec::new();
    rec.extend_from_slice(&4096u32.to_le_bytes());
    rec.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    rec.extend_from_slice(&[0x5a; 40]);
    f.write_all_at(&rec, at)?;
    // The file ends inside the torn record.
    f.set_len(at + 8 + 24)?;
    f.sync_all()?;
    Ok((s, at))
}

/// Flip one bit in the payload of a record that ends at or below the durable mark of the
/// newest segment in `dir` (the middle such record). Returns the scan and the damaged record's
/// offset, which recovery must report as `Corrupt { segment, offset }`.
///
/// # Errors
/// I/O errors; `InvalidData` when no whole record lies below the mark.
pub fn flip_below_mark(dir: &Path) -> io::Result<(SegmentScan, u64)> {
    let s = scan(&newest_segment(dir)?)?;
    let below: Vec<(u64, u64)> = s
        .records
        .iter()
        .copied()
        .filter(|(o, l)| o + l <= s.mark && *l > 8)
        .collect();
    let Some(&(o, l)) = below.get(below.len() / 2) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "no record with a payload below the mark {} of {}",
                s.mark,
                s.path.display()
            ),
        ));
    };
    let at = o + 8 + (l - 8) / 2;
    let f = OpenOptions::new().read(true).write(true).open(&s.path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    b[0] ^= 0x10;
    f.write_all_at(&b, at)?;
    f.sync_all()?;
    Ok((s, o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(dir: &Path, records: &[&[u8]], mark: u64) -> PathBuf {
        let p = dir.join("00000000000000000001.seg");
        let mut bytes = vec![0u8; 8192];
        bytes[..8].copy_from_slice(b"QVSEGLOG");
        bytes[512..520].copy_from_slice(&mark.to_le_bytes());
        let mut o = 1024;
        for r in records {
            let l = 8 + r.len();
            bytes[o..o + 4].copy_from_slice(&(l as u32).to_le_bytes());
            bytes[o + 4..o + 8].copy_from_slice(&7u32.to_le_bytes());
            bytes[o + 8..o + l].copy_from_slice(r);
            o += l;
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn scan_walks_records_and_reads_the_mark() {
        let d = tempfile::tempdir().unwrap();
        segment(d.path(), &[b"aaaa", b"bbbbbbbb", b"cc"], 1024 + 12 + 16);
        let s = scan(&newest_segment(d.path()).unwrap()).unwrap();
        assert_eq!(s.number, 1);
        assert_eq!(s.records, vec![(1024, 12), (1036, 16), (1052, 10)]);
        assert_eq!(s.end(), 1062);
        assert_eq!(s.mark, 1052);
        // A mark past the records is no promise this scan can use.
        segment(d.path(), &[b"aaaa"], 5000);
        assert_eq!(scan(&newest_segment(d.path()).unwrap()).unwrap().mark, 0);
    }

    #[test]
    fn flip_lands_in_a_record_below_the_mark() {
        let d = tempfile::tempdir().unwrap();
        let p = segment(d.path(), &[b"aaaa", b"bbbbbbbb", b"cc"], 1052);
        let before = std::fs::read(&p).unwrap();
        let (_, rec) = flip_below_mark(d.path()).unwrap();
        let after = std::fs::read(&p).unwrap();
        let diff: Vec<usize> = (0..before.len())
            .filter(|i| before[*i] != after[*i])
            .collect();
        assert_eq!(diff.len(), 1);
        assert_eq!(rec, 1036);
        assert!((1036 + 8..1052).contains(&(diff[0] as u64)));
        // No record below a missing mark: a typed error.
        segment(d.path(), &[b"aaaa"], 0);
        assert!(flip_below_mark(d.path()).is_err());
    }

    #[test]
    fn torn_tail_is_written_past_the_records_and_cuts_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = segment(d.path(), &[b"aaaa"], 1036);
        let (s, at) = tear_tail(d.path()).unwrap();
        assert_eq!(at, s.end());
        assert_eq!(at, 1036);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(after.len() as u64, at + 32);
        assert_eq!(&after[at as usize..at as usize + 4], &4096u32.to_le_bytes());
        // The torn record does not scan as a record.
        assert_eq!(scan(&p).unwrap().records.len(), 1);
    }
}
