//! [`SegLog`]: the log itself: append, group commit, read, iterate, truncate, segment GC.
//!
//! The write path, step by step (the same list is in `docs/design/log-format.md`):
//!
//! 1. **append** (under the state lock): if the frame does not fit in the active segment, create the
//!    next segment (tmp file, preallocate, header, fsync, rename, directory fsync) and make it
//!    active; copy `[frame_len | crc | payload]` into the mapping at `end`; advance `end`.
//!    Nothing is flushed: the record is in the page cache only.
//! 2. **sync** (group commit): wait at the sync gate until an earlier leader's flush covers this
//!    caller's `end` (then return), or the gate is free. Then become the leader: capture `end`,
//!    `msync(MS_SYNC)` every segment from the one holding the old durable end to the active one
//!    (plus sealed segments whose new mark was not yet flushed), then publish `durable = end` and
//!    write each flushed segment's durable mark into its header (reaching disk with the next flush
//!    or by writeback). Every waiter is woken; those covered return without flushing, one of the
//!    rest leads the next round.
//! 3. **release** (memory only, no durability role): the leader then drops from the resident set
//!    the pages of the round's sealed segments and, once it grew by `RELEASE_STEP` (4 MiB) since
//!    the last release, the active segment's pages below the one holding `end`. A roll releases
//!    the segment it seals at once (so a writer that never syncs, like compaction's copy phase,
//!    stays bounded too). `MADV_DONTNEED` on the shared mapping keeps unflushed bytes dirty in
//!    the page cache, so a release before a flush loses nothing (`map.rs`).
//!
//! Reads (`read`, `iter`) use `pread`, which sees the mapping's writes (same page-cache pages)
//! and faults nothing into the process's page tables.
//!
//! A roll (two fsyncs) and the copy of a large payload happen under the state lock, so they delay
//! other appends and the brief state lookups of readers; reads copy payloads outside it.
//!
//! Locks, always taken in this order: the sync gate -> `readers` -> `state`. Appends take only
//! `state`; reads take `readers` (shared) then `state` briefly, and `pread` payloads under
//! `readers` only; truncate takes all three (exclusive `readers`), so no read sees bytes being
//! zeroed.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::config::{Config, SyncMode};
use crate::error::{Error, Result};
use crate::format::{self, HEADER_LEN, MARK_LEN, MARK_OFFSET};
use crate::reap;
use crate::recovery::{self, Recovery};
use crate::segment::{self, ReadError, Segment};

/// The active segment's written pages are dropped from the resident set (`map.rs`) at the end of
/// a sync round once this many bytes were written since the last release (and a sealed segment
/// is released whole when the log rolls past it), so the log's resident pages stay near this
/// plus what was written since the last sync, however large the log grows.
pub(crate) const RELEASE_STEP: u64 = 4 << 20;

/// Page size assumed when rounding release ranges (a larger real page only widens a release
/// by whole pages, which changes no byte).
const PAGE: u64 = 4096;

/// Identifies one record: its segment number and the byte offset of its frame in that segment.
/// Ordering is log order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Segment number.
    pub segment: u64,
    /// Byte offset of the record frame inside the segment file.
    pub offset: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// One segment as seen by [`SegLog::segments`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Segment number.
    pub number: u64,
    /// Path of the segment file.
    pub path: PathBuf,
    /// Position of its first record (equals its end when it is empty).
    pub first: Position,
    /// Bytes used: header plus records (the file itself is preallocated to its full size).
    pub used: u64,
    /// Size of the file.
    pub size: u64,
}

/// Counters since open, for tests, benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records appended.
    pub appends: u64,
    /// Calls to `sync`.
    pub sync_calls: u64,
    /// Flush rounds actually run by a sync leader (group commit: usually far fewer than calls).
    pub flush_rounds: u64,
    /// Segments created (rolls, plus the first segment of a new log).
    pub segments_created: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appends: AtomicU64,
    sync_calls: AtomicU64,
    flush_rounds: AtomicU64,
    segments_created: AtomicU64,
}

/// One segment in the in-memory list.
#[derive(Debug)]
struct Entry {
    seg: Arc<Segment>,
    /// End of the last record. Final for sealed segments; equals `State::end.offset` for the active.
    tail: u64,
    /// The mark currently written in the mapping's mark slot.
    mark: Option<u64>,
    /// Whether `mark` has been flushed since it was written.
    mark_flushed: bool,
    /// Pages below this offset were last dropped from the resident set (`RELEASE_STEP`).
    released: u64,
}

#[derive(Debug)]
struct State {
    /// Never empty; the last one is the active segment; numbers are contiguous.
    segs: VecDeque<Entry>,
    /// Where the next record goes (unless it does not fit and the log rolls).
    end: Position,
    /// Every record before this is durable.
    durable: Position,
}

impl State {
    fn index(&self, number: u64) -> Option<usize> {
        let first = self.segs.front()?.seg.number;
        let i = usize::try_from(number.checked_sub(first)?).ok()?;
        (i < self.segs.len()).then_some(i)
    }

    fn entry(&self, number: u64) -> Option<&Entry> {
        self.index(number).map(|i| &self.segs[i])
    }

    fn active(&self) -> &Entry {
        self.segs.back().expect("log always has a segment")
    }

    /// The first record, or `end` if the log is empty. (A segment can be empty only if it is the
    /// active one, or if a larger `max_record_size` made the writer roll from an empty segment.)
    fn first(&self) -> Position {
        self.segs
            .iter()
            .find(|e| e.tail > HEADER_LEN)
            .map_or(self.end, |e| Position {
                segment: e.seg.number,
                offset: HEADER_LEN,
            })
    }
}

/// The sync gate: at most one flush round, truncate or GC runs at a time. Unlike a plain mutex
/// around the flush, callers whose records a finished round already covered are all woken and
/// return at once, instead of queueing behind the next leader's flush.
#[derive(Debug, Default)]
struct Gate {
    busy: Mutex<bool>,
    done: Condvar,
}

impl Gate {
    /// Waits until no round, truncate or GC is running and claims the gate.
    fn enter(&self) -> GateGuard<'_> {
        let mut busy = self.busy.lock();
        while *busy {
            self.done.wait(&mut busy);
        }
        *busy = true;
        GateGuard { gate: self }
    }
}

/// Releases the gate and wakes every waiter.
struct GateGuard<'a> {
    gate: &'a Gate,
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        *self.gate.busy.lock() = false;
        self.gate.done.notify_all();
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: Config,
    /// Holds the `flock` on `LOCK` for the lifetime of the log.
    _lock: File,
    /// Admits one sync leader, truncate or GC at a time (see [`Gate`]).
    gate: Gate,
    readers: RwLock<()>,
    state: Mutex<State>,
    poisoned: AtomicBool,
    counters: Counters,
}

/// An mmap-backed segmented append log. `Send + Sync`; share it (e.g. in an `Arc`) between threads.
#[derive(Debug)]
pub struct SegLog {
    inner: Arc<Inner>,
}

/// Iterator over records from a position up to the log's end when the iterator was created.
/// Created by [`SegLog::iter`]. It stops early if the log is truncated below its cursor, and yields
/// one error (then stops) if its start is not a record, its segment was dropped by GC, or the data
/// is damaged. It keeps the log's internals alive: the directory stays locked until it is dropped.
#[derive(Debug)]
pub struct Iter {
    inner: Arc<Inner>,
    next: Position,
    stop: Position,
    /// `next` is not yet known to be a record boundary.
    unverified: bool,
    done: bool,
}

impl SegLog {
    /// Opens (creating `dir` and a first segment if needed) and recovers the log in `dir`.
    ///
    /// Recovery cuts a torn tail (reported in [`Recovery`]) and fails with [`Error::Corrupt`] on
    /// damage to durable data. Only one `SegLog` may have a directory open (`LOCK` file,
    /// [`Error::Locked`]).
    pub fn open(dir: impl AsRef<Path>, config: Config) -> Result<(SegLog, Recovery)> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create log directory", &dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io("open lock file", &lock_path, e))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(Error::Locked { path: lock_path })
            }
            Err(e) => return Err(Error::io("lock log directory", &lock_path, e.into())),
        }

        let recovered = recovery::recover(&dir, &config)?;
        let mut report = recovered.report;
        let data_mode = config.sync == SyncMode::Data;
        let mut segs = VecDeque::with_capacity(recovered.segments.len().max(1));
        for rs in recovered.segments {
            let seg = Segment::from_file(rs.path, rs.file, rs.header)?;
            let mut mark = rs.mark;
            let mut mark_flushed = true;
            if rs.needs_mark && data_mode {
                // Recovery flushed this segment's records: vouch for them.
                seg.write_mark(Some(rs.tail));
                mark = Some(rs.tail);
                mark_flushed = false;
            }
            segs.push_back(Entry {
                seg: Arc::new(seg),
                tail: rs.tail,
                mark,
                mark_flushed,
                released: 0,
            });
        }
        let created_first = segs.is_empty();
        if created_first {
            let seg = Segment::create(&dir, 1, config.segment_size, 0, config.sync)?;
            segs.push_back(Entry {
                seg: Arc::new(seg),
                tail: HEADER_LEN,
                mark: None,
                mark_flushed: true,
                released: 0,
            });
            report.segments = 1;
        }
        let last = segs.back().expect("just ensured");
        let end = Position {
            segment: last.seg.number,
            offset: last.tail,
        };
        let state = State {
            segs,
            end,
            durable: end,
        };
        let inner = Inner {
            dir,
            config,
            _lock: lock,
            gate: Gate::default(),
            readers: RwLock::new(()),
            state: Mutex::new(state),
            poisoned: AtomicBool::new(false),
            counters: Counters::default(),
        };
        inner
            .counters
            .segments_created
            .store(u64::from(created_first), Ordering::Relaxed);
        Ok((
            SegLog {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends one record and returns its position. Not durable until [`SegLog::sync`] covers it.
    pub fn append(&self, payload: &[u8]) -> Result<Position> {
        self.inner.check_size(payload.len())?;
        self.inner.check_poison()?;
        let mut st = self.inner.state.lock();
        self.inner
            .append_locked(&mut st, payload, &mut VecDeque::new())
    }

    /// Appends several records under one lock acquisition; positions are consecutive in log order.
    ///
    /// All or nothing as far as the log can ensure it: sizes are checked and every new segment the
    /// batch needs is created before the first record is written, so a `RecordTooLarge` or a failed
    /// segment creation leaves the log unchanged.
    pub fn append_batch<'a>(
        &self,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Position>> {
        let payloads: Vec<&[u8]> = payloads.into_iter().collect();
        for p in &payloads {
            self.inner.check_size(p.len())?;
        }
        self.inner.check_poison()?;
        let inner = &self.inner;
        let mut st = inner.state.lock();
        // Lay the batch out to learn how many new segments it needs, and create them first.
        let mut off = st.end.offset;
        let mut cap = st.active().seg.capacity();
        let mut prev_tails = Vec::new();
        for p in &payloads {
            let frame = format::frame_len(p.len());
            if off + frame > cap {
                prev_tails.push(off);
                off = HEADER_LEN;
                cap = inner.config.segment_size;
            }
            off += frame;
        }
        let mut fresh = VecDeque::new();
        for (k, prev_tail) in (1..).zip(prev_tails) {
            match Segment::create(
                &inner.dir,
                st.end.segment + k,
                inner.config.segment_size,
                prev_tail,
                inner.config.sync,
            ) {
                Ok(s) => fresh.push_back(s),
                Err(e) => {
                    // Empty and never referenced: remove them (best effort; recovery would cut
                    // an empty trailing segment anyway).
                    for s in fresh {
                        let _ = std::fs::remove_file(&s.path);
                    }
                    return Err(e);
                }
            }
        }
        let mut out = Vec::with_capacity(payloads.len());
        for p in payloads {
            out.push(inner.append_locked(&mut st, p, &mut fresh)?);
        }
        debug_assert!(fresh.is_empty());
        Ok(out)
    }

    /// Group commit: makes every record appended before the call durable and returns the durable
    /// end (every record with a smaller position is durable). Concurrent callers share one flush.
    ///
    /// A failed flush poisons the log ([`Error::Poisoned`] from then on).
    pub fn sync(&self) -> Result<Position> {
        self.inner.sync()
    }

    /// Every record before this position is durable.
    pub fn durable_end(&self) -> Position {
        self.inner.state.lock().durable
    }

    /// Where the next record will go (if it fits in the active segment; otherwise it goes to the
    /// start of the next segment, which is still greater). Every record is before `end()`.
    pub fn end(&self) -> Position {
        self.inner.state.lock().end
    }

    /// Position of the first record still in the log; equals `end()` when the log is empty.
    pub fn first(&self) -> Position {
        self.inner.state.lock().first()
    }

    /// A copy of the payload at `pos`.
    ///
    /// `pos` must be a position returned by `append` that was neither truncated nor dropped by
    /// GC; otherwise [`Error::InvalidPosition`]. (Positions inside a segment are checked by the
    /// record's length and checksum: an arbitrary offset passes only with probability ~2^-32.)
    pub fn read(&self, pos: Position) -> Result<Vec<u8>> {
        let _r = self.inner.readers.read();
        let (seg, tail) = {
            let st = self.inner.state.lock();
            if pos >= st.end {
                return Err(Error::InvalidPosition { pos });
            }
            let e = st
                .entry(pos.segment)
                .ok_or(Error::InvalidPosition { pos })?;
            (e.seg.clone(), e.tail)
        };
        seg.read_record(pos.offset, tail).map_err(|e| match e {
            ReadError::Bad(_) => Error::InvalidPosition { pos },
            ReadError::Io(e) => e,
        })
    }

    /// Iterates over `(position, payload)` from `from` up to `end()` as of this call.
    ///
    /// `from` may be a record position, `end()`, the start of a segment (`offset` 0), or anything
    /// before `first()` (meaning "from the first record").
    pub fn iter(&self, from: Position) -> Iter {
        let st = self.inner.state.lock();
        let first = st.first();
        let (next, unverified) = if from <= first {
            (first, false)
        } else if from.offset <= HEADER_LEN {
            (
                Position {
                    segment: from.segment,
                    offset: HEADER_LEN,
                },
                false,
            )
        } else {
            (from, from < st.end)
        };
        Iter {
            inner: self.inner.clone(),
            next,
            stop: st.end,
            unverified,
            done: false,
        }
    }

    /// Removes the record at `from` and every later record. Durable before it returns: after a
    /// crash the removed records never come back. `from == end()` is a no-op.
    ///
    /// Cut bytes are zeroed in place (a mapped file is never shrunk); later segments are deleted.
    /// If `from` is the first record of a segment other than the first, that segment is deleted
    /// too and `end()` moves back to the tail of the previous segment.
    pub fn truncate(&self, from: Position) -> Result<()> {
        self.inner.truncate(from)
    }

    /// Segment GC: deletes whole segments numbered below `segment`, oldest first, never the active
    /// one. Returns how many were deleted. Records in them can no longer be read.
    pub fn drop_segments_before(&self, segment: u64) -> Result<u64> {
        self.inner.drop_segments_before(segment)
    }

    /// Counters since open.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            appends: c.appends.load(Ordering::Relaxed),
            sync_calls: c.sync_calls.load(Ordering::Relaxed),
            flush_rounds: c.flush_rounds.load(Ordering::Relaxed),
            segments_created: c.segments_created.load(Ordering::Relaxed),
        }
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let st = self.inner.state.lock();
        st.segs
            .iter()
            .map(|e| SegmentInfo {
                number: e.seg.number,
                path: e.seg.path.clone(),
                first: Position {
                    segment: e.seg.number,
                    offset: HEADER_LEN,
                },
                used: e.tail,
                size: e.seg.capacity(),
            })
            .collect()
    }
}

impl SegLog {
    /// Test-only: per segment file name, (what the flushes put on disk, what the mapping holds).
    #[cfg(test)]
    fn images(&self) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let st = self.inner.state.lock();
        st.segs
            .iter()
            .map(|e| {
                let (flushed, current) = e.seg.images();
                (segment::file_name(e.seg.number), flushed, current)
            })
            .collect()
    }
}

impl Inner {
    fn check_size(&self, size: usize) -> Result<()> {
        if size as u64 > u64::from(self.config.max_record_size) {
            return Err(Error::RecordTooLarge {
                size,
                limit: self.config.max_record_size,
            });
        }
        Ok(())
    }

    fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    fn poison(&self, e: Error) -> Error {
        self.poisoned.store(true, Ordering::Release);
        e
    }

    fn data_mode(&self) -> bool {
        self.config.sync == SyncMode::Data
    }

    /// Writes one record at `end`, rolling to the next segment (taken from `fresh` if the caller
    /// pre-created it) when it does not fit.
    fn append_locked(
        &self,
        st: &mut State,
        payload: &[u8],
        fresh: &mut VecDeque<Segment>,
    ) -> Result<Position> {
        let frame = format::frame_len(payload.len());
        if st.end.offset + frame > st.active().seg.capacity() {
            let seg = match fresh.pop_front() {
                Some(s) => s,
                None => Segment::create(
                    &self.dir,
                    st.end.segment + 1,
                    self.config.segment_size,
                    st.end.offset,
                    self.config.sync,
                )?,
            };
            debug_assert_eq!(seg.number, st.end.segment + 1);
            debug_assert_eq!(seg.prev_tail, st.end.offset);
            self.counters
                .segments_created
                .fetch_add(1, Ordering::Relaxed);
            st.end = Position {
                segment: seg.number,
                offset: HEADER_LEN,
            };
            let sealed = st.active().seg.clone();
            st.segs.push_back(Entry {
                seg: Arc::new(seg),
                tail: HEADER_LEN,
                mark: None,
                mark_flushed: true,
                released: 0,
            });
            // Sealed: nothing writes its records again, so none of its pages need to stay
            // resident (unflushed ones stay dirty in the page cache for the next sync).
            sealed.release(0, sealed.capacity());
        }
        let pos = st.end;
        self.counters.appends.fetch_add(1, Ordering::Relaxed);
        let active = st.segs.back_mut().expect("log always has a segment");
        active.seg.write_record(pos.offset, payload);
        active.tail = pos.offset + frame;
        st.end.offset = active.tail;
        Ok(pos)
    }

    fn sync(&self) -> Result<Position> {
        self.counters.sync_calls.fetch_add(1, Ordering::Relaxed);
        let target = {
            let st = self.state.lock();
            if st.durable >= st.end {
                return Ok(st.durable);
            }
            st.end
        };
        // Wait until an earlier leader's flush covers `target`, or become the leader.
        let _leader = {
            let mut busy = self.gate.busy.lock();
            loop {
                let durable = self.state.lock().durable;
                if durable >= target {
                    return Ok(durable); // an earlier leader's flush covered us
                }
                if !*busy {
                    *busy = true;
                    break GateGuard { gate: &self.gate };
                }
                self.gate.done.wait(&mut busy);
            }
        };
        self.check_poison()?;
        let (end, work) = {
            let st = self.state.lock();
            let work: Vec<(Arc<Segment>, u64)> = st
                .segs
                .iter()
                .filter(|e| e.seg.number >= st.durable.segment || !e.mark_flushed)
                .map(|e| (e.seg.clone(), e.tail))
                .collect();
            (st.end, work)
        };
        if self.data_mode() {
            self.counters.flush_rounds.fetch_add(1, Ordering::Relaxed);
            for (seg, tail) in &work {
                // [0, tail) includes the header page, so a mark written after the previous round
                // is persisted too; msync writes back only the dirty pages of the range.
                seg.flush(0, *tail).map_err(|e| self.poison(e))?;
            }
        }
        let mut st = self.state.lock();
        if self.data_mode() {
            for (seg, _) in &work {
                let Some(i) = st.index(seg.number) else {
                    continue;
                };
                let e = &mut st.segs[i];
                e.mark_flushed = true;
                let mark = if e.seg.number < end.segment {
                    e.tail
                } else if e.seg.number == end.segment {
                    end.offset
                } else {
                    continue;
                };
                if e.mark != Some(mark) {
                    e.seg.write_mark(Some(mark));
                    e.mark = Some(mark);
                    e.mark_flushed = false;
                }
            }
        }
        if end > st.durable {
            st.durable = end;
        }
        let durable = st.durable;
        // Drop this round's pages from the resident set: sealed segments whole (their header
        // page was just rewritten with the mark), the active one up to the page holding `end`
        // once it grew by `RELEASE_STEP`. After the flush the pages are clean (Data mode), and
        // in every mode the bytes stay in the page cache and the file.
        let mut release = Vec::new();
        for (seg, _) in &work {
            let Some(i) = st.index(seg.number) else {
                continue;
            };
            let e = &mut st.segs[i];
            let upto = if e.seg.number < end.segment {
                e.seg.capacity()
            } else {
                end.offset / PAGE * PAGE
            };
            if e.seg.number < end.segment || upto >= e.released.saturating_add(RELEASE_STEP) {
                e.released = upto;
                release.push((seg.clone(), upto));
            }
        }
        drop(st);
        for (seg, upto) in release {
            seg.release(0, upto);
        }
        Ok(durable)
    }

    fn truncate(&self, from: Position) -> Result<()> {
        self.check_poison()?;
        let _exclusive = self.gate.enter();
        let _w = self.readers.write();
        let mut st = self.state.lock();
        if from == st.end {
            return Ok(());
        }
        let invalid = Error::InvalidPosition { pos: from };
        if from > st.end {
            return Err(invalid);
        }
        let e = st
            .entry(from.segment)
            .ok_or(Error::InvalidPosition { pos: from })?;
        match e.seg.read_record(from.offset, e.tail) {
            Ok(_) => {}
            Err(ReadError::Bad(_)) => return Err(invalid),
            Err(ReadError::Io(err)) => return Err(err),
        }
        let first = st.segs.front().expect("non-empty").seg.number;
        // Cutting at the start of a later segment removes that whole segment.
        let (keep, keep_tail) = if from.offset == HEADER_LEN && from.segment > first {
            let prev = st.entry(from.segment - 1).expect("contiguous");
            (from.segment - 1, prev.tail)
        } else {
            (from.segment, from.offset)
        };
        let keep_idx = st.index(keep).expect("exists");
        let data = self.data_mode();
        let flush_mark = |e: &Entry| -> Result<()> {
            if data {
                e.seg.flush(0, MARK_OFFSET + MARK_LEN as u64)?;
            }
            Ok(())
        };

        // 1. No mark may vouch for what is about to be removed: erase the marks of the segments to
        //    delete (a mark in a later segment vouches for all of `keep`) and lower `keep`'s. Done
        //    in every sync mode: a directory written in `Data` mode may be reopened in `None`.
        for i in (keep_idx..st.segs.len()).rev() {
            let e = &mut st.segs[i];
            let mark = match e.mark {
                Some(_) if i > keep_idx => None,
                Some(m) => Some(m.min(keep_tail)),
                None => None,
            };
            if e.mark != mark {
                e.seg.write_mark(mark);
                e.mark = mark;
                flush_mark(e).map_err(|err| self.poison(err))?;
                e.mark_flushed = true;
            }
        }
        // From here on the in-memory log is the truncated one, even if a step below fails (which
        // poisons the log).
        st.end = Position {
            segment: keep,
            offset: keep_tail,
        };
        st.durable = st.durable.min(st.end);
        // 2. Delete later segments, newest first, then make the deletions durable. Before the
        //    zeroing, so that a crash in between leaves a prefix of the old log, never a log
        //    with a hole.
        while st.segs.len() > keep_idx + 1 {
            let path = st.segs.back().expect("non-empty").seg.path.clone();
            std::fs::remove_file(&path)
                .map_err(|err| self.poison(Error::io("remove truncated segment", &path, err)))?;
            st.segs.pop_back();
        }
        if data {
            segment::fsync_dir(&self.dir).map_err(|err| self.poison(err))?;
        }
        // 3. Zero the cut bytes of `keep` in place (never shrink a mapped file) and flush them.
        let e = &mut st.segs[keep_idx];
        if e.tail > keep_tail {
            let old_tail = e.tail;
            e.tail = keep_tail;
            e.seg.zero(keep_tail, old_tail - keep_tail);
            if data {
                e.seg
                    .flush(keep_tail, old_tail - keep_tail)
                    .map_err(|err| self.poison(err))?;
            }
            // The zeroing faulted the cut range in; it holds no records now.
            e.seg.release(keep_tail, old_tail - keep_tail);
            e.released = e.released.min(keep_tail);
        }
        Ok(())
    }

    fn drop_segments_before(&self, segment: u64) -> Result<u64> {
        self.check_poison()?;
        let mut retired = Vec::new();
        let res = self.retire_segments_before(segment, &mut retired);
        let dropped = retired.len() as u64;
        // Outside the gate; what was retired before an error is reaped all the same.
        reap::spawn(retired);
        res.map(|()| dropped)
    }

    /// Takes the segments below `segment` (never the active one) out of the log, oldest first,
    /// each renamed to its retired name; pushes each with that name onto `retired`.
    fn retire_segments_before(
        &self,
        segment: u64,
        retired: &mut Vec<(Arc<Segment>, PathBuf)>,
    ) -> Result<()> {
        let _exclusive = self.gate.enter();
        loop {
            let victim = {
                let st = self.state.lock();
                let front = st.segs.front().expect("non-empty");
                if st.segs.len() == 1 || front.seg.number >= segment {
                    return Ok(());
                }
                front.seg.clone()
            };
            // Oldest first with a directory fsync after each, so a crash leaves a contiguous
            // suffix of segments (recovery treats a gap as corruption). Renamed, not deleted:
            // freeing 64 MiB of extents is a long journal transaction that every fsync on the
            // file system then waits for (250 ms stalls with a few segments at once). The
            // reaper frees them a few MiB at a time, off this thread and outside the gate;
            // recovery deletes leftovers.
            let path = self.dir.join(segment::retired_file_name(victim.number));
            std::fs::rename(&victim.path, &path)
                .map_err(|e| Error::io("retire segment", &victim.path, e))?;
            if self.data_mode() {
                segment::fsync_dir(&self.dir).map_err(|e| self.poison(e))?;
            }
            self.state.lock().segs.pop_front();
            retired.push((victim, path));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Persist marks written after the last flush, so the next open knows exactly what was
        // durable. Unsynced records are not flushed (beyond the header page they share).
        if !self.data_mode() || self.poisoned.load(Ordering::Acquire) {
            return;
        }
        for e in self.state.get_mut().segs.iter().filter(|e| !e.mark_flushed) {
            let _ = e.seg.flush(0, MARK_OFFSET + MARK_LEN as u64);
        }
    }
}

impl Iterator for Iter {
    type Item = Result<(Position, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let _r = self.inner.readers.read();
        loop {
            let (seg, tail) = {
                let st = self.inner.state.lock();
                if self.next >= self.stop || self.next >= st.end {
                    self.done = true;
                    return None;
                }
                let Some(e) = st.entry(self.next.segment) else {
                    self.done = true;
                    return Some(Err(Error::InvalidPosition { pos: self.next }));
                };
                if self.next.offset >= e.tail {
                    if self.unverified && self.next.offset > e.tail {
                        self.done = true;
                        return Some(Err(Error::InvalidPosition { pos: self.next }));
                    }
                    self.next = Position {
                        segment: self.next.segment + 1,
                        offset: HEADER_LEN,
                    };
                    self.unverified = false;
                    continue;
                }
                (e.seg.clone(), e.tail)
            };
            let pos = self.next;
            return match seg.read_record(pos.offset, tail) {
                Ok(payload) => {
                    self.next.offset += format::frame_len(payload.len());
                    self.unverified = false;
                    Some(Ok((pos, payload)))
                }
                Err(ReadError::Io(e)) => {
                    self.done = true;
                    Some(Err(e))
                }
                Err(ReadError::Bad(bad)) => {
                    self.done = true;
                    Some(Err(if self.unverified {
                        Error::InvalidPosition { pos }
                    } else {
                        let frame_len = match seg.frame_len_at(pos.offset) {
                            Ok(n) => n.to_string(),
                            Err(e) => format!("unreadable: {e}"),
                        };
                        Error::Corrupt {
                            segment: pos.segment,
                            offset: pos.offset,
                            reason: format!("{bad} (frame length {frame_len})"),
                        }
                    }))
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Config {
        Config {
            segment_size: 4096,
            max_record_size: 1024,
            sync: SyncMode::Data,
        }
    }

    fn all(log: &SegLog) -> Vec<Vec<u8>> {
        log.iter(Position::default())
            .map(|r| r.unwrap().1)
            .collect()
    }

    #[test]
    fn append_sync_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, rec) = SegLog::open(dir.path(), small()).unwrap();
        assert_eq!(
            rec,
            Recovery {
                segments: 1,
                ..Recovery::default()
            }
        );
        assert_eq!(log.first(), log.end());
        let a = log.append(b"alpha").unwrap();
        let b = log.append(b"").unwrap();
        assert!(a < b);
        assert_eq!(log.read(a).unwrap(), b"alpha");
        assert_eq!(log.read(b).unwrap(), b"");
        assert!(log.durable_end() <= a);
        let d = log.sync().unwrap();
        assert_eq!(d, log.end());
        assert_eq!(log.durable_end(), d);
        drop(log);
        let (log, rec) = SegLog::open(dir.path(), small()).unwrap();
        assert_eq!(rec.records, 2);
        assert_eq!(rec.torn_tail_bytes, 0);
        assert_eq!(all(&log), vec![b"alpha".to_vec(), vec![]]);
        assert_eq!(log.first(), a);
    }

    #[test]
    fn rolls_segments_and_reads_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SegLog::open(dir.path(), small()).unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 300]).collect();
        let pos = log
            .append_batch(payloads.iter().map(|p| p.as_slice()))
            .unwrap();
        assert!(log.segments().len() >= 4);
        for (p, want) in pos.iter().zip(&payloads) {
            assert_eq!(&log.read(*p).unwrap(), want);
        }
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(all(&log), payloads);
        drop(log);
        let (log, rec) = SegLog::open(dir.path(), small()).unwrap();
        assert_eq!(rec.records, 40);
        assert_eq!(all(&log), payloads);
    }

    #[test]
    fn typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SegLog::open(dir.path(), small()).unwrap();
        assert!(matches!(
            log.append(&[0; 1025]),
            Err(Error::RecordTooLarge {
                size: 1025,
                limit: 1024
            })
        ));
        assert!(matches!(
            log.append_batch([&b"ok"[..], &[0; 2000]]),
            Err(Error::RecordTooLarge { .. })
        ));
        assert_eq!(log.end(), log.first(), "a rejected batch writes nothing");
        let p = log.append(b"hello world").unwrap();
        let bad = Position {
            segment: p.segment,
            offset: p.offset + 1,
        };
        assert!(matches!(log.read(bad), Err(Error::InvalidPosition { .. })));
        assert!(matches!(
            log.read(log.end()),
            Err(Error::InvalidPosition { .. })
        ));
        assert!(matches!(
            log.read(Position {
                segment: 99,
                offset: 1024
            }),
            Err(Error::InvalidPosition { .. })
        ));
        assert!(matches!(
            log.truncate(bad),
            Err(Error::InvalidPosition { .. })
        ));
        let mut it = log.iter(bad);
        assert!(matches!(
            it.next(),
            Some(Err(Error::InvalidPosition { .. }))
        ));
        assert!(it.next().is_none());
        assert!(matches!(
            SegLog::open(dir.path(), small()),
            Err(Error::Locked { .. })
        ));
    }

    #[test]
    fn truncate_removes_tail_and_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SegLog::open(dir.path(), small()).unwrap();
        let payloads: Vec<Vec<u8>> = (0..30u8).map(|i| vec![i; 200 + i as usize]).collect();
        let pos = log
            .append_batch(payloads.iter().map(|p| p.as_slice()))
            .unwrap();
        log.sync().unwrap();
        log.truncate(pos[20]).unwrap();
        assert_eq!(all(&log), payloads[..20].to_vec());
        assert!(matches!(
            log.read(pos[20]),
            Err(Error::InvalidPosition { .. })
        ));
        assert!(log.durable_end() <= log.end());
        let q = log.append(b"new").unwrap();
        assert!(q > pos[19]);
        drop(log);
        let (log, rec) = SegLog::open(dir.path(), small()).unwrap();
        assert_eq!(rec.torn_tail_bytes, 0);
        let mut want = payloads[..20].to_vec();
        want.push(b"new".to_vec());
        assert_eq!(all(&log), want);
        // Truncate at the first record of a segment, then everything.
        let first_of_seg = log.segments()[1].first;
        log.truncate(first_of_seg).unwrap();
        assert_eq!(log.segments().len(), 1);
        log.truncate(log.first()).unwrap();
        assert!(all(&log).is_empty());
        assert_eq!(log.first(), log.end());
    }

    #[test]
    fn config_change_keeps_old_segments_and_may_leave_an_empty_one() {
        let dir = crate::test_dir();
        drop(SegLog::open(dir.path(), small()).unwrap());
        let big = Config {
            segment_size: 16384,
            max_record_size: 8000,
            sync: SyncMode::Data,
        };
        let (log, _) = SegLog::open(dir.path(), big.clone()).unwrap();
        // Does not fit the old 4 KiB segment even though it is empty: roll, leaving it empty.
        let p = log.append(&[9; 7000]).unwrap();
        assert_eq!(p.segment, 2);
        assert_eq!(log.first(), p);
        assert_eq!(log.segments()[0].used, HEADER_LEN);
        drop(log);
        let (log, rec) = SegLog::open(dir.path(), big).unwrap();
        assert_eq!((rec.records, rec.segments, rec.torn_tail_bytes), (1, 2, 0));
        assert_eq!(log.first(), p);
        assert_eq!(all(&log), vec![vec![9; 7000]]);
    }

    #[test]
    fn failed_flush_poisons_until_reopen() {
        let dir = crate::test_dir();
        let (log, _) = SegLog::open(dir.path(), small()).unwrap();
        let a = log.append(b"durable").unwrap();
        log.sync().unwrap();
        let b = log.append(b"not durable").unwrap();
        log.inner.state.lock().active().seg.fail_next_flush();
        assert!(matches!(
            log.sync(),
            Err(Error::Io {
                op: "msync segment",
                ..
            })
        ));
        assert!(
            log.durable_end() <= b,
            "a failed flush does not advance the durable end"
        );
        assert!(matches!(log.append(b"x"), Err(Error::Poisoned)));
        assert!(matches!(log.sync(), Err(Error::Poisoned)));
        assert!(matches!(log.truncate(a), Err(Error::Poisoned)));
        assert!(matches!(log.drop_segments_before(9), Err(Error::Poisoned)));
        assert_eq!(log.read(a).unwrap(), b"durable", "reads still work");
        drop(log);
        let (log, _) = SegLog::open(dir.path(), small()).unwrap();
        assert_eq!(log.read(a).unwrap(), b"durable");
        log.append(b"again").unwrap();
        log.sync().unwrap();
    }

    #[test]
    fn gc_drops_old_segments_only() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SegLog::open(dir.path(), small()).unwrap();
        for i in 0..40u8 {
            log.append(&[i; 500]).unwrap();
        }
        let segs = log.segments();
        let n = segs.len() as u64;
        assert_eq!(log.drop_segments_before(segs[2].number).unwrap(), 2);
        assert_eq!(log.first(), segs[2].first);
        assert!(matches!(
            log.read(segs[0].first),
            Err(Error::InvalidPosition { .. })
        ));
        assert_eq!(
            log.iter(Position::default()).next().unwrap().unwrap().0,
            segs[2].first
        );
        assert_eq!(
            log.drop_segments_before(u64::MAX).unwrap(),
            n - 3,
            "never the active one"
        );
        assert_eq!(log.segments().len(), 1);
        drop(log);
        let (log, _) = SegLog::open(dir.path(), small()).unwrap();
        assert_eq!(log.segments().len(), 1);
    }

    /// Slack for a fault that maps a whole large folio or huge page (2 MiB on x86-64) where
    /// the test wrote one page.
    const FOLIO: u64 = 2 << 20;

    /// Resident bytes of each segment's mapping, oldest first.
    fn resident(log: &SegLog) -> Vec<u64> {
        let st = log.inner.state.lock();
        st.segs.iter().map(|e| e.seg.resident_bytes()).collect()
    }

    #[test]
    fn written_pages_are_released_and_reads_fault_nothing_in() {
        let dir = crate::test_dir();
        let config = Config {
            segment_size: 6 * RELEASE_STEP / 4,
            max_record_size: 64 << 10,
            sync: SyncMode::Data,
        };
        let (log, _) = SegLog::open(dir.path(), config.clone()).unwrap();
        let record = |i: usize| -> Vec<u8> {
            let mut v = vec![(i % 251) as u8; 16 << 10];
            v[..8].copy_from_slice(&(i as u64).to_le_bytes());
            v
        };
        // 4 segments' worth, synced every 1 MiB.
        let n = (4 * config.segment_size / (16 << 10)) as usize;
        let mut pos = Vec::new();
        for i in 0..n {
            pos.push(log.append(&record(i)).unwrap());
            if i % 64 == 63 {
                log.sync().unwrap();
                let r = resident(&log);
                let (active, sealed) = r.split_last().unwrap();
                assert!(sealed.iter().all(|&b| b <= PAGE), "sealed: {r:?}");
                assert!(*active <= RELEASE_STEP + (1 << 20) + FOLIO, "active: {r:?}");
            }
        }
        log.sync().unwrap();
        assert!(log.segments().len() >= 4);
        // The active segment grew past RELEASE_STEP once, so it was released at least once.
        let before = resident(&log);
        assert!(
            before.iter().sum::<u64>() < config.segment_size,
            "{before:?}"
        );
        // Reads (pread) return every record and fault no page of the mappings in.
        for (i, p) in pos.iter().enumerate() {
            assert!(log.read(*p).unwrap() == record(i), "record {i}");
        }
        let mut k = 0;
        for item in log.iter(Position::default()) {
            assert!(item.unwrap().1 == record(k), "record {k} by iter");
            k += 1;
        }
        assert_eq!(k, n);
        // No page faulted in (the kernel may still reclaim some meanwhile: never more).
        let after = resident(&log);
        assert_eq!(after.len(), before.len());
        assert!(
            after.iter().zip(&before).all(|(a, b)| a <= b),
            "reads fault nothing in: {before:?} -> {after:?}"
        );
        // Released, unflushed writes of a sealed segment are still there after a reopen.
        drop(log);
        let (log, rec) = SegLog::open(dir.path(), config).unwrap();
        assert_eq!(rec.records, n as u64);
        assert!(log.read(pos[n - 1]).unwrap() == record(n - 1));
        let after_open = resident(&log);
        assert!(after_open.iter().all(|&b| b <= FOLIO), "{after_open:?}");
    }

    #[test]
    fn rolls_release_sealed_segments_without_any_sync() {
        let dir = crate::test_dir();
        let config = Config {
            segment_size: 256 << 10,
            max_record_size: 16 << 10,
            sync: SyncMode::Data,
        };
        let (log, _) = SegLog::open(dir.path(), config.clone()).unwrap();
        let payloads: Vec<Vec<u8>> = (0..200u32).map(|i| vec![i as u8; 10_000]).collect();
        let pos = log
            .append_batch(payloads.iter().map(|p| p.as_slice()))
            .unwrap();
        let r = resident(&log);
        assert!(r.len() >= 7);
        let (_, sealed) = r.split_last().unwrap();
        assert!(
            sealed.iter().all(|&b| b == 0),
            "sealed before any sync: {r:?}"
        );
        for (p, want) in pos.iter().zip(&payloads) {
            assert_eq!(&log.read(*p).unwrap(), want);
        }
        // Sync after the release: everything is flushed and recovered.
        log.sync().unwrap();
        drop(log);
        let (log, rec) = SegLog::open(dir.path(), config).unwrap();
        assert_eq!(rec.records, 200);
        assert_eq!(rec.torn_tail_bytes, 0);
        assert_eq!(all(&log), payloads);
    }

    #[test]
    fn group_commit_shares_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SegLog::open(dir.path(), Config::default()).unwrap();
        let log = Arc::new(log);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50u32 {
                        let p = log.append(&(t * 1000 + i).to_le_bytes()).unwrap();
                        let d = log.sync().unwrap();
                        assert!(p < d);
                        assert!(log.durable_end() > p);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(all(&log).len(), 200);
        let stats = log.stats();
        assert_eq!((stats.appends, stats.sync_calls), (200, 200));
        assert!(stats.flush_rounds <= 200);
    }
}

/// Power loss against what the log really flushed: the test-only shadow in `map.rs` records the
/// pages each msync wrote back, so a sync that forgets a flush (or a truncate that does not flush
/// its zeroing) loses records here, unlike in the snapshot-based model of `tests/crash.rs`.
#[cfg(test)]
mod flush_shadow_tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    fn config() -> Config {
        Config {
            segment_size: 8192,
            max_record_size: 2048,
            sync: SyncMode::Data,
        }
    }

    /// Flushed image plus a random subset of the pages written since, some torn at sectors.
    fn crash(rng: &mut SmallRng, images: &[(String, Vec<u8>, Vec<u8>)], dir: &Path) {
        for (name, flushed, current) in images {
            let mut img = flushed.clone();
            for page in (0..img.len()).step_by(4096) {
                let end = (page + 4096).min(img.len());
                match rng.gen_range(0..4) {
                    0 => img[page..end].copy_from_slice(&current[page..end]),
                    1 => {
                        for s in (page..end).step_by(512) {
                            if rng.gen_bool(0.5) {
                                img[s..s + 512].copy_from_slice(&current[s..s + 512]);
                            }
                        }
                    }
                    _ => {}
                }
            }
            std::fs::write(dir.join(name), img).unwrap();
        }
    }

    #[test]
    fn synced_and_truncated_records_survive_power_loss_of_unflushed_pages() {
        for seed in 0..150u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let dir = scratch();
            let (log, _) = SegLog::open(dir.path(), config()).unwrap();
            let mut expected: Vec<(Position, Vec<u8>)> = Vec::new();
            let mut synced = 0;
            for _ in 0..rng.gen_range(1..12) {
                match rng.gen_range(0..10) {
                    0..=5 => {
                        for _ in 0..rng.gen_range(1..8) {
                            let len = if rng.gen_bool(0.1) {
                                1500
                            } else {
                                rng.gen_range(0..200)
                            };
                            let p: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                            expected.push((log.append(&p).unwrap(), p));
                        }
                    }
                    6..=8 => {
                        log.sync().unwrap();
                        synced = expected.len();
                    }
                    _ => {
                        let k = rng.gen_range(0..=expected.len());
                        let from = expected.get(k).map_or(log.end(), |r| r.0);
                        log.truncate(from).unwrap();
                        expected.truncate(k);
                        synced = synced.min(k);
                    }
                }
            }
            let images = log.images();
            drop(log);
            for k in 0..3 {
                let crashed = scratch();
                crash(&mut rng, &images, crashed.path());
                let (log, _) = SegLog::open(crashed.path(), config())
                    .unwrap_or_else(|e| panic!("seed {seed} crash {k}: open failed: {e}"));
                let got: Vec<_> = log.iter(Position::default()).map(|r| r.unwrap()).collect();
                assert!(
                    got.len() >= synced,
                    "seed {seed} crash {k}: {} of {synced} synced records back",
                    got.len()
                );
                assert!(
                    got.len() <= expected.len() && got[..] == expected[..got.len()],
                    "seed {seed} crash {k}: not a prefix of the expected log"
                );
            }
        }
    }
}
