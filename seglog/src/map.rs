//! The only module with `unsafe`: a shared, writable mapping of one segment file.
//!
//! Why raw pointers instead of `&mut [u8]`: appenders, readers and the sync leader touch the same
//! mapping from several threads at once, always on disjoint byte ranges that the log's locks hand
//! out (appenders write at and after `end`, readers read below `end`, the sync leader and truncate
//! write the mark slot and the truncated range while holding the sync lock and, for truncate, the
//! exclusive read/write lock). A `&mut [u8]` over the whole map would alias; raw copies on checked,
//! disjoint ranges do not.
//!
//! Reads do not go through the mapping (the log reads with `pread`, see `segment.rs`); the
//! mapping is for writes, and [`SharedMap::release`] drops written pages from this process's
//! resident set so that a log much larger than memory does not stay resident (RssFile).
//!
//! Invariants the callers keep, on which the `Safety:` comments rely:
//! - the file is never shrunk while mapped (the log only zeroes bytes in place), so every byte of
//!   `[0, len)` stays backed and no access raises SIGBUS;
//! - the file was fully preallocated (fallocate or written zeros) before being mapped, so writes
//!   need no block allocation (no SIGBUS on ENOSPC);
//! - no thread writes a byte range that another thread reads or writes at the same time.
//!
//! Outside processes that modify or shrink a segment file while the log is open break the first
//! invariant; the directory lock (`LOCK`) keeps other `SegLog`s away.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};

/// A `MAP_SHARED`, read-write mapping of `[0, len)` of a file.
#[derive(Debug)]
pub(crate) struct SharedMap {
    raw: MmapRaw,
    len: u64,
    /// Test-only model of the disk: the file as it was when mapped, updated with whole pages
    /// at every flush. What a power loss right now would certainly keep.
    #[cfg(test)]
    shadow: parking_lot::Mutex<Vec<u8>>,
    /// Test-only: the mapped file, read with `pread` to update `shadow` (reading through the
    /// mapping would fault every flushed page back in and defeat `release`).
    #[cfg(test)]
    file: File,
    /// Test-only failpoint: the next flush fails with EIO.
    #[cfg(test)]
    pub(crate) fail_next_flush: std::sync::atomic::AtomicBool,
}

impl SharedMap {
    /// Maps the first `len` bytes of `file`, which must be at least `len` bytes long.
    pub(crate) fn new(file: &File, len: u64) -> io::Result<SharedMap> {
        let ulen =
            usize::try_from(len).map_err(|_| io::Error::other("segment too large to map"))?;
        let raw = MmapOptions::new().len(ulen).map_raw(file)?;
        // No read-around on faults (`MADV_RANDOM`): appends fault in the pages ahead of the
        // tail, and the kernel's mmap read-around would put them in the page cache as ever
        // larger folios (up to 2 MiB) as the writes walk the segment. A write through the
        // mapping dirties its whole folio, so every sync would then write back up to 2 MiB for
        // a record of a few hundred bytes (measured on Linux 6.18: 2 MiB per sync, p50 0.64
        // instead of 0.10 ms, 40 MiB into a segment; tests/page_cache.rs). With it, a write
        // fault brings in one page. A hint: if refused, the log stays correct, only slower.
        let _ = raw.advise(Advice::Random);
        #[cfg(test)]
        let shadow = {
            let mut b = vec![0u8; ulen];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut b, 0)?;
            parking_lot::Mutex::new(b)
        };
        Ok(SharedMap {
            raw,
            len,
            #[cfg(test)]
            shadow,
            #[cfg(test)]
            file: file.try_clone()?,
            #[cfg(test)]
            fail_next_flush: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Mapped length.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn check(&self, off: u64, n: usize) -> usize {
        let end = off.checked_add(n as u64).expect("range overflows");
        assert!(
            end <= self.len,
            "range {off}+{n} outside map of {}",
            self.len
        );
        off as usize
    }

    /// Copies `src` into the map at `off`.
    pub(crate) fn write(&self, off: u64, src: &[u8]) {
        let at = self.check(off, src.len());
        // Safety: `check` proved `[at, at + src.len())` lies inside the live mapping, which stays
        // backed (module invariants); no other thread accesses these bytes now (callers' locks);
        // `src` is ordinary memory, so it cannot overlap the mapping's bytes we write.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.raw.as_mut_ptr().add(at), src.len())
        }
    }

    /// Copies `dst.len()` bytes at `off` out of the map. Test-only: the log reads with `pread`.
    #[cfg(test)]
    pub(crate) fn read(&self, off: u64, dst: &mut [u8]) {
        let at = self.check(off, dst.len());
        // Safety: the range is inside the live, backed mapping (`check`, module invariants) and no
        // thread writes it concurrently (callers' locks); `dst` is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.raw.as_ptr().add(at), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Sets `n` bytes at `off` to zero.
    pub(crate) fn zero(&self, off: u64, n: u64) {
        let n = usize::try_from(n).expect("zero range fits usize");
        let at = self.check(off, n);
        // Safety: in-bounds (`check`), backed (module invariants), and the caller holds the locks
        // that keep every other thread off these bytes.
        unsafe { std::ptr::write_bytes(self.raw.as_mut_ptr().add(at), 0, n) }
    }

    /// Drops the pages of `[off, off + n)` (widened to whole pages) from this process's page
    /// tables: `madvise(MADV_DONTNEED)`. The bytes do not change: on a `MAP_SHARED` file mapping
    /// the kernel moves each zapped entry's dirty bit to the page-cache page (so an unflushed
    /// write is still written back by the next msync or by writeback), and a later access faults
    /// the page back in from the page cache or the file ("repopulating the memory contents from
    /// the up-to-date contents of the underlying mapped file", madvise(2)). What it changes is
    /// residency: the pages stop counting in the process's RSS (RssFile), and the page cache
    /// keeps them only as long as the kernel finds no better use for the memory.
    ///
    /// A hint: an error costs memory, never data, so callers may ignore it.
    pub(crate) fn release(&self, off: u64, n: u64) -> io::Result<()> {
        let end = off.saturating_add(n).min(self.len);
        if end <= off {
            return Ok(());
        }
        let at = self.check(off, (end - off) as usize);
        // Safety: `[at, end)` lies inside the live mapping (`check`). On a shared file mapping
        // MADV_DONTNEED never changes the bytes seen through the mapping (see above), so copies
        // that other threads run on this range at the same time (writes by appenders or the
        // sync leader, which the callers' locks keep to disjoint ranges) see the same memory
        // before and after: they at most fault the page back in. No Rust reference into the
        // mapping exists (every access is a raw copy in this module), so none is invalidated.
        unsafe {
            self.raw
                .unchecked_advise_range(UncheckedAdvice::DontNeed, at, (end - off) as usize)
        }
    }

    /// Test-only: bytes of this mapping resident in this process (`Rss:` of its entry in
    /// `/proc/self/smaps`), so tests see exactly this map's residency whatever other threads do.
    #[cfg(test)]
    pub(crate) fn resident_bytes(&self) -> u64 {
        let start = self.raw.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let range = l.split_whitespace().next().unwrap_or("");
            let Some((a, _)) = range.split_once('-') else {
                continue;
            };
            if usize::from_str_radix(a, 16) != Ok(start) {
                continue;
            }
            for l in lines.by_ref() {
                if let Some(rest) = l.strip_prefix("Rss:") {
                    let kib: u64 = rest
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse().ok())
                        .expect("Rss: value in kB");
                    return kib * 1024;
                }
            }
        }
        panic!("mapping at {start:#x} not in /proc/self/smaps")
    }

    /// `msync(MS_SYNC)` of `[off, off + n)`: on Linux an fdatasync of that file range.
    pub(crate) fn flush(&self, off: u64, n: u64) -> io::Result<()> {
        let end = off.saturating_add(n).min(self.len);
        if end <= off {
            return Ok(());
        }
        #[cfg(test)]
        if self
            .fail_next_flush
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        self.raw.flush_range(off as usize, (end - off) as usize)?;
        #[cfg(test)]
        {
            // msync writes back whole pages.
            let page = 4096;
            let (a, e) = (off / page * page, end.div_ceil(page) * page);
            let e = e.min(self.len);
            let mut b = vec![0u8; (e - a) as usize];
            std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut b, a)?;
            self.shadow.lock()[a as usize..e as usize].copy_from_slice(&b);
        }
        Ok(())
    }

    /// Test-only: the flushed image (see `shadow`).
    #[cfg(test)]
    pub(crate) fn shadow(&self) -> Vec<u8> {
        self.shadow.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_zero_flush() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        let m = SharedMap::new(&f, 8192).unwrap();
        m.write(4090, b"0123456789");
        let mut b = [0u8; 10];
        m.read(4090, &mut b);
        assert_eq!(&b, b"0123456789");
        m.zero(4092, 2);
        m.read(4090, &mut b);
        assert_eq!(&b, b"01\0\x00456789");
        m.flush(0, 8192).unwrap();
        let mut on_disk = [0u8; 10];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 4090).unwrap();
        assert_eq!(on_disk, b);
    }

    #[test]
    fn release_drops_residency_and_keeps_every_byte() {
        let len = 64u64 << 10;
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        let m = SharedMap::new(&f, len).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        m.write(0, &data);
        assert!(m.resident_bytes() >= len, "written pages are resident");
        // Not flushed yet: the dirty pages leave the page tables but stay dirty in the cache.
        m.release(0, len).unwrap();
        assert_eq!(
            m.resident_bytes(),
            0,
            "released pages leave the resident set"
        );
        let mut by_pread = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut by_pread, 0).unwrap();
        assert!(by_pread == data, "pread sees the unflushed writes");
        let mut by_map = vec![0u8; len as usize];
        m.read(0, &mut by_map);
        assert!(by_map == data, "the mapping faults the same bytes back in");
        // Write into released pages, release again, flush: the file has every byte.
        m.write(5000, b"after release");
        m.release(4096, 8192).unwrap();
        m.flush(0, len).unwrap();
        let mut b = [0u8; 13];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 5000).unwrap();
        assert_eq!(&b, b"after release");
        // Partial ranges widen to pages; empty and out-of-range tails are no-ops.
        m.release(len - 1, 100).unwrap();
        m.release(len, 10).unwrap();
        m.release(3, 0).unwrap();
    }

    #[test]
    #[should_panic(expected = "outside map")]
    fn out_of_bounds_panics_instead_of_touching_memory() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let m = SharedMap::new(&f, 4096).unwrap();
        m.write(4095, b"ab");
    }
}
