//! One segment: a preallocated file, its immutable header and its shared mapping.
//!
//! Creation is atomic with respect to crashes: the file is built under a `.tmp` name
//! (preallocate, write header, fsync), then renamed to its final name and the directory is
//! fsynced. A file with a final name therefore always has a durable, valid header; a bad header is
//! corruption, never an interrupted creation. Leftover `.tmp` files are deleted by recovery.
//!
//! Writes go through the shared mapping; reads use `pread` on the same file. Both see the same
//! page-cache pages (Linux keeps a `MAP_SHARED` mapping and the file coherent), so a record is
//! readable by `pread` as soon as its copy into the mapping is done. Reading with `pread` keeps
//! the pages a reader touches out of the process's resident set, and [`Segment::release`] drops
//! the written ones (see `map.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::config::SyncMode;
use crate::error::{Error, Result};
use crate::format::{
    self, BadRecord, SegmentHeader, HEADER_LEN, MARK_LEN, MARK_OFFSET, RECORD_HEADER_LEN,
};
use crate::map::SharedMap;

/// Suffix of segment files.
pub(crate) const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of segment files under construction.
pub(crate) const TMP_SUFFIX: &str = ".seg.tmp";
/// Suffix of segment files dropped by GC and not yet deleted (`reap.rs`).
pub(crate) const RETIRED_SUFFIX: &str = ".seg.old";

/// The name segment `number`'s file takes once GC dropped it, until the reaper deletes it.
pub(crate) fn retired_file_name(number: u64) -> String {
    format!("{number:020}{RETIRED_SUFFIX}")
}

/// File name of segment `number`: 20 zero-padded digits, so names sort like numbers.
pub(crate) fn file_name(number: u64) -> String {
    format!("{number:020}{SEGMENT_SUFFIX}")
}

/// The segment number of a file name, if it is a segment file.
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// fsync of a directory, so that creations, renames and deletions in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Allocates every block of `[0, size)` so that writes through a mapping never hit a hole
/// (a hole can raise SIGBUS on ENOSPC). Uses `fallocate`, or writes zeros where it is unsupported.
pub(crate) fn preallocate(file: &File, size: u64) -> io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => return Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = file.metadata()?.len().min(size);
    while at < size {
        let n = (size - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Why [`Segment::read_record`] returned no record.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The bytes at the offset are not a valid record.
    Bad(BadRecord),
    /// `pread` failed.
    Io(Error),
}

impl From<BadRecord> for ReadError {
    fn from(b: BadRecord) -> Self {
        ReadError::Bad(b)
    }
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        ReadError::Io(e)
    }
}

/// A mapped segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Segment number (also in the header and the file name).
    pub(crate) number: u64,
    /// Checksum seed of this segment's records.
    pub(crate) nonce: u32,
    /// Where the previous segment's records end (from the header).
    pub(crate) prev_tail: u64,
    /// Path of the file.
    pub(crate) path: PathBuf,
    /// Read with `pread`; kept open so the mapping's file stays referenced.
    file: File,
    map: SharedMap,
}

impl Segment {
    /// Creates segment `number` of `size` bytes in `dir` (see the module doc for the protocol).
    /// `prev_tail` is where the previous segment's records end (0 if none).
    pub(crate) fn create(
        dir: &Path,
        number: u64,
        size: u64,
        prev_tail: u64,
        sync: SyncMode,
    ) -> Result<Segment> {
        let path = dir.join(file_name(number));
        let tmp = dir.join(format!("{number:020}{TMP_SUFFIX}"));
        let header = SegmentHeader {
            number,
            nonce: format::new_nonce(),
            size,
            prev_tail,
        };
        let build = || -> Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| Error::io("create segment", &tmp, e))?;
            preallocate(&f, size).map_err(|e| Error::io("preallocate segment", &tmp, e))?;
            f.write_all_at(&header.encode(), 0)
                .map_err(|e| Error::io("write segment header", &tmp, e))?;
            if sync == SyncMode::Data {
                f.sync_all()
                    .map_err(|e| Error::io("fsync new segment", &tmp, e))?;
            }
            std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename new segment", &path, e))?;
            Ok(f)
        };
        let file = match build() {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if sync == SyncMode::Data {
            fsync_dir(dir)?;
        }
        Segment::from_file(path, file, header)
    }

    /// Maps a file whose header was already checked (by recovery or by `create`).
    pub(crate) fn from_file(path: PathBuf, file: File, header: SegmentHeader) -> Result<Segment> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat segment", &path, e))?
            .len();
        let map = SharedMap::new(&file, len).map_err(|e| Error::io("mmap segment", &path, e))?;
        Ok(Segment {
            number: header.number,
            nonce: header.nonce,
            prev_tail: header.prev_tail,
            path,
            file,
            map,
        })
    }

    /// Bytes of the file (records must end at or before this).
    pub(crate) fn capacity(&self) -> u64 {
        self.map.len()
    }

    /// Writes one record (header then payload) at `off`; the caller checked it fits.
    pub(crate) fn write_record(&self, off: u64, payload: &[u8]) {
        self.map
            .write(off, &format::encode_record_header(self.nonce, payload));
        self.map.write(off + RECORD_HEADER_LEN, payload);
    }

    /// Reads and checks the record at `off`, whose frame must end at or before `tail` (`pread`).
    pub(crate) fn read_record(&self, off: u64, tail: u64) -> Result<Vec<u8>, ReadError> {
        if off < HEADER_LEN || off.saturating_add(RECORD_HEADER_LEN) > tail {
            return Err(BadRecord::NoHeader.into());
        }
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        self.pread(off, &mut h)?;
        let (len, crc) = format::parse_record_header(&h);
        if u64::from(len) < RECORD_HEADER_LEN {
            return Err(BadRecord::BadLength(len).into());
        }
        if off + u64::from(len) > tail {
            return Err(BadRecord::PastEnd {
                frame_len: len,
                available: tail - off,
            }
            .into());
        }
        let mut payload = vec![0u8; (u64::from(len) - RECORD_HEADER_LEN) as usize];
        self.pread(off + RECORD_HEADER_LEN, &mut payload)?;
        if format::record_crc(self.nonce, len, &payload) != crc {
            return Err(BadRecord::BadChecksum.into());
        }
        Ok(payload)
    }

    /// Length of the frame at `off` per its header, without checking the payload.
    pub(crate) fn frame_len_at(&self, off: u64) -> Result<u64> {
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        self.pread(off, &mut h)?;
        Ok(u64::from(format::parse_record_header(&h).0))
    }

    fn pread(&self, off: u64, dst: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(dst, off)
            .map_err(|e| Error::io("read segment", &self.path, e))
    }

    /// Drops the pages of `[off, off + n)` from the process's resident set (`map.rs`); the
    /// bytes, flushed or not, stay in the file and the page cache. A hint: errors are ignored,
    /// they cost memory, never data.
    pub(crate) fn release(&self, off: u64, n: u64) {
        let _ = self.map.release(off, n);
    }

    /// Test-only: bytes of the mapping resident in this process.
    #[cfg(test)]
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.map.resident_bytes()
    }

    /// Writes the durable-mark slot (`None` erases it). Not flushed: it reaches disk with the
    /// next flush of this segment's first page, or by writeback; either way after the data it
    /// vouches for was flushed.
    pub(crate) fn write_mark(&self, mark: Option<u64>) {
        let slot = match mark {
            Some(m) => format::encode_mark(m, self.nonce),
            None => [0u8; MARK_LEN],
        };
        self.map.write(MARK_OFFSET, &slot);
    }

    /// Zeroes `[off, off + n)`.
    pub(crate) fn zero(&self, off: u64, n: u64) {
        self.map.zero(off, n);
    }

    /// Test-only: (flushed image, current mapping contents).
    #[cfg(test)]
    pub(crate) fn images(&self) -> (Vec<u8>, Vec<u8>) {
        let mut cur = vec![0u8; self.map.len() as usize];
        self.map.read(0, &mut cur);
        (self.map.shadow(), cur)
    }

    /// Test-only: make the next flush of this segment fail.
    #[cfg(test)]
    pub(crate) fn fail_next_flush(&self) {
        self.map
            .fail_next_flush
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// msync of `[off, off + n)`.
    pub(crate) fn flush(&self, off: u64, n: u64) -> Result<()> {
        self.map
            .flush(off, n)
            .map_err(|e| Error::io("msync segment", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_like_numbers_and_parse_back() {
        assert_eq!(file_name(12), "00000000000000000012.seg");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("12.seg"), None);
        assert_eq!(parse_file_name("00000000000000000012.seg.tmp"), None);
        assert_eq!(retired_file_name(12), "00000000000000000012.seg.old");
        assert_eq!(parse_file_name(&retired_file_name(12)), None);
        assert!(file_name(9) < file_name(10));
    }

    #[test]
    fn create_writes_header_preallocates_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let s = Segment::create(dir.path(), 3, 64 << 10, 0, SyncMode::Data).unwrap();
        assert_eq!(s.capacity(), 64 << 10);
        let f = File::open(&s.path).unwrap();
        let mut h = vec![0u8; HEADER_LEN as usize];
        f.read_exact_at(&mut h, 0).unwrap();
        let header = SegmentHeader::decode(&h).unwrap();
        assert_eq!((header.number, header.nonce), (3, s.nonce));
        // Preallocated: the blocks are allocated, not a sparse file.
        let md = f.metadata().unwrap();
        assert!(std::os::unix::fs::MetadataExt::blocks(&md) * 512 >= 64 << 10);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![file_name(3)]);
    }

    #[test]
    fn record_write_read_and_mark() {
        let dir = tempfile::tempdir().unwrap();
        let s = Segment::create(dir.path(), 1, 8192, 0, SyncMode::None).unwrap();
        s.write_record(HEADER_LEN, b"abc");
        let tail = HEADER_LEN + 11;
        assert_eq!(s.read_record(HEADER_LEN, tail).unwrap(), b"abc");
        assert_eq!(s.frame_len_at(HEADER_LEN).unwrap(), 11);
        assert!(s.read_record(HEADER_LEN + 1, tail).is_err());
        assert!(s.read_record(HEADER_LEN, tail - 1).is_err());
        s.write_mark(Some(tail));
        let mut slot = [0u8; MARK_LEN];
        File::open(&s.path)
            .unwrap()
            .read_exact_at(&mut slot, MARK_OFFSET)
            .unwrap();
        assert_eq!(format::decode_mark(&slot, s.nonce), Some(tail));
        s.zero(HEADER_LEN, 11);
        assert!(matches!(
            s.read_record(HEADER_LEN, tail),
            Err(ReadError::Bad(BadRecord::BadLength(0)))
        ));
    }
}
