//! Snapshots: a point-in-time image of a whole store, streamed in chunks (raft snapshots for
//! new members, split materialisation) and, concatenated, the logged-mode snapshot file.
//!
//! A chunk is a sequence of framed records `[u32 LE length][record]`; a record never spans
//! chunks. Records, in order: one `HEADER`, the live keys (`KV`, key order), the history
//! (`EVENT`, `(revision, key)` order), the request-id table (`DEDUP`, image versions 2 and
//! 3), one `END`. Version 3 (written) is version 2 whose table may hold packed batch replies
//! (`dedup.rs`): a binary that predates them refuses the image by its magic instead of
//! answering a duplicate with an empty batch. Images of version 2 (`QVKVSNP2`) restore as
//! they are, and of version 1 (`QVKVSNP1`, no `DEDUP` record) with an empty request-id
//! table. The encoding is a pure function of the logical
//! state (no positions, no persistence mode), so two replicas that applied the same entries
//! produce byte-identical snapshots. Byte layout: `docs/design/collections.md` §5.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use seglog::SegLog;

use crate::error::{KvError, Result};
use crate::kv::codec::{Dec, Enc};
use crate::kv::datalog::Pending;
use crate::kv::dedup::DedupTable;
use crate::kv::key::IndexKey;
use crate::kv::state::{check_counters, check_version, Entry, Hist, Meta, State, ValueRef};
use crate::kv::store::Shared;
use crate::kv::tracked::Capture;
use crate::kv::types::{ApplyState, Bounds, EventKind};

/// Image version 3 (written): version 2 whose `DEDUP` record may hold packed batch replies.
const MAGIC: &[u8; 8] = b"QVKVSNP3";
/// Image version 2 (still restored): version 1 plus the `DEDUP` record.
const MAGIC_V2: &[u8; 8] = b"QVKVSNP2";
/// Image version 1 (still restored).
const MAGIC_V1: &[u8; 8] = b"QVKVSNP1";
const REC_HEADER: u8 = 1;
const REC_KV: u8 = 2;
const REC_EVENT: u8 = 3;
const REC_END: u8 = 4;
const REC_DEDUP: u8 = 5;

/// Name of the logged-mode snapshot file in the data dir.
pub(crate) const SNAP_FILE: &str = "kv.snap";
/// Suffix of a replaced image waiting to be deleted (`kv.snap.N.old`).
const OLD_SUFFIX: &str = ".old";
/// Numbers replaced images in this process (their names must not collide while the reaper of
/// an earlier one still runs).
static RETIRED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn frame(out: &mut Vec<u8>, rec: &[u8]) {
    out.extend_from_slice(&u32::try_from(rec.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(rec);
}

fn header_record(st: &State, kvs: u64, events: u64) -> Vec<u8> {
    let a = &st.apply;
    let mut e = Enc::default();
    e.u8(REC_HEADER)
        .raw(MAGIC)
        .u64(a.applied_index)
        .u64(a.applied_term)
        .u64(a.commit_index)
        .u64(a.commit_term)
        .bytes(&a.apply_meta)
        .u64(st.revision)
        .u64(st.clock_ms)
        .u64(st.compact_revision)
        .bytes(&st.bounds.lo);
    match &st.bounds.hi {
        Some(hi) => e.u8(1).bytes(hi),
        None => e.u8(0),
    };
    e.u64(kvs).u64(events);
    e.0
}

fn dedup_record(st: &State) -> Vec<u8> {
    let img = st.dedup.image();
    let mut e = Enc::with_capacity(1 + img.len());
    e.u8(REC_DEDUP).raw(&img);
    e.0
}

fn meta_fields(e: &mut Enc, m: &Meta) {
    e.u64(m.mod_revision)
        .u64(m.create_revision)
        .u64(m.version)
        .u64(m.expires_at_ms);
}

fn read_meta(d: &mut Dec<'_>) -> Result<Meta> {
    Ok(Meta {
        mod_revision: d.u64()?,
        create_revision: d.u64()?,
        version: d.u64()?,
        expires_at_ms: d.u64()?,
        value_len: 0,
    })
}

/// Decrements the pin count of a persistent store when dropped: compaction waits for no
/// snapshot to hold positions.
#[derive(Debug)]
pub(crate) struct Pin(pub(crate) Arc<AtomicUsize>);

impl Pin {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Pin(count.clone())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many keys or events a live reader takes per visit to the state (under its read lock).
const LIVE_BATCH: usize = 512;

/// Where a reader's keys and events come from.
#[derive(Debug)]
enum Source {
    /// Copied at the capture: the state is a temporary about to go away (a split's right
    /// half, an image being restored).
    Copied {
        kvs: std::vec::IntoIter<(IndexKey, Entry)>,
        events: std::vec::IntoIter<((u64, Bytes), Hist)>,
    },
    /// The store's own state, read a batch at a time under its read lock while writes go on:
    /// what changed since the capture comes from the captures' pre-images (`tracked.rs`).
    Live {
        shared: Arc<Shared>,
        /// The store's restore count at the capture (`load` compares).
        restores: u64,
        kvs: Capture<IndexKey, Entry>,
        events: Capture<(u64, Bytes), Hist>,
    },
}

impl Source {
    fn next_kv(&mut self) -> Option<(IndexKey, Entry)> {
        match self {
            Source::Copied { kvs, .. } => kvs.next(),
            Source::Live { shared, kvs, .. } => kvs.next(shared.state(), |s| &s.index, LIVE_BATCH),
        }
    }

    fn next_event(&mut self) -> Option<((u64, Bytes), Hist)> {
        match self {
            Source::Copied { events, .. } => events.next(),
            Source::Live { shared, events, .. } => {
                events.next(shared.state(), |s| &s.history, LIVE_BATCH)
            }
        }
    }
}

/// A point-in-time image of a store, encoded chunk by chunk. Values stay where they are (in
/// memory, shared, or on disk) until their chunk is encoded.
#[derive(Debug)]
pub struct SnapshotReader {
    apply: ApplyState,
    header: Option<Vec<u8>>,
    source: Source,
    /// The `DEDUP` record, until written.
    dedup: Option<Vec<u8>>,
    ended: bool,
    log: Option<Arc<SegLog>>,
    _pin: Option<Pin>,
}

impl SnapshotReader {
    /// An image of `st` copied now (references to keys and values: nothing is loaded), for a
    /// state that will not outlive the call.
    pub(crate) fn capture(st: &State, log: Option<Arc<SegLog>>, pin: Option<Pin>) -> Self {
        let kvs: Vec<(IndexKey, Entry)> = st
            .index
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let events: Vec<((u64, Bytes), Hist)> = st
            .history
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        SnapshotReader {
            apply: st.apply.clone(),
            header: Some(header_record(st, kvs.len() as u64, events.len() as u64)),
            source: Source::Copied {
                kvs: kvs.into_iter(),
                events: events.into_iter(),
            },
            dedup: Some(dedup_record(st)),
            ended: false,
            log,
            _pin: pin,
        }
    }

    /// An image of the store's state as it is now, read while writes go on: the capture
    /// registers with the index and history (`tracked.rs`) instead of copying them, so the
    /// writer waits for no copy. Events after the current revision are left out.
    pub(crate) fn capture_live(shared: &Arc<Shared>, pin: Option<Pin>) -> Self {
        let st = shared.state().read();
        // Revisions stop at MAX_REVISION < u64::MAX: every event lies below this bound.
        let below = (st.revision.saturating_add(1), Bytes::new());
        SnapshotReader {
            apply: st.apply.clone(),
            header: Some(header_record(
                &st,
                st.index.len() as u64,
                st.history.len() as u64,
            )),
            source: Source::Live {
                shared: shared.clone(),
                restores: shared.restores(),
                kvs: st.index.capture(None),
                events: st.history.capture(Some(below)),
            },
            dedup: Some(dedup_record(&st)),
            ended: false,
            log: shared.log().cloned(),
            _pin: pin,
        }
    }

    /// The apply state the image corresponds to.
    pub fn apply_state(&self) -> &ApplyState {
        &self.apply
    }

    fn load(&self, v: &ValueRef) -> Result<Bytes> {
        match (v, &self.log) {
            (ValueRef::Inline(b), _) => Ok(b.clone()),
            (ValueRef::Disk(p), Some(log)) => {
                let value = crate::kv::datalog::read_value(log, *p);
                // Checked after the read: a restore counts itself before it rewrites the log,
                // so a read that may have seen the new log's records is always caught.
                if let Source::Live {
                    shared, restores, ..
                } = &self.source
                {
                    if shared.restores() != *restores {
                        return Err(KvError::SnapshotAbandoned);
                    }
                }
                value
            }
            (ValueRef::Disk(_), None) => crate::kv::state::inline_only(v),
        }
    }

    /// The next chunk of about `max_bytes` (at least one record), or `None` after the last.
    pub fn next_chunk(&mut self, max_bytes: usize) -> Result<Option<Bytes>> {
        if self.ended {
            return Ok(None);
        }
        let mut out = Vec::new();
        if let Some(h) = self.header.take() {
            frame(&mut out, &h);
        }
        while out.len() < max_bytes.max(1) {
            if let Some((k, e)) = self.source.next_kv() {
                let v = self.load(&e.value)?;
                let mut r = Enc::with_capacity(48 + k.len() + v.len());
                r.u8(REC_KV);
                meta_fields(&mut r, &e.meta);
                r.bytes(&k).bytes(&v);
                frame(&mut out, &r.0);
            } else if let Some(((_, k), h)) = self.source.next_event() {
                let v = self.load(&h.value)?;
                let mut r = Enc::with_capacity(48 + k.len() + v.len());
                r.u8(REC_EVENT).u8(u8::from(h.kind == EventKind::Put));
                meta_fields(&mut r, &h.meta);
                r.bytes(&k).bytes(&v);
                frame(&mut out, &r.0);
            } else if let Some(d) = self.dedup.take() {
                frame(&mut out, &d);
            } else {
                frame(&mut out, &[REC_END]);
                self.ended = true;
                break;
            }
        }
        Ok(Some(Bytes::from(out)))
    }

    /// The whole image in one buffer (all chunks concatenated).
    pub fn to_bytes(mut self) -> Result<Bytes> {
        let mut out = Vec::new();
        while let Some(c) = self.next_chunk(1 << 20)? {
            out.extend_from_slice(&c);
        }
        Ok(Bytes::from(out))
    }
}

/// Rebuilds a state from snapshot chunks pushed in order.
#[derive(Debug, Default)]
pub struct Restorer {
    pub(crate) st: State,
    /// Entries restored since the last spill to a data log (persistent mode).
    pub(crate) pending: Vec<Pending>,
    header: bool,
    kvs_left: u64,
    events_left: u64,
    /// Image version 2: a `DEDUP` record is due before `END`.
    dedup_due: bool,
    ended: bool,
}

impl Restorer {
    /// An empty restorer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk.
    ///
    /// # Errors
    /// [`KvError::Corrupt`] (what `"snapshot"`) if the chunk does not decode or is out of order;
    /// [`KvError::InvalidField`] if a field holds a value no store reaches (revision above
    /// [`MAX_REVISION`](crate::kv::MAX_REVISION), `create_revision > mod_revision`, version 0 or
    /// more puts than revisions, a key outside the bounds, ...: `state::check_version`).
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        let mut d = Dec::new(chunk, "snapshot");
        while d.remaining() > 0 {
            let rec = d.bytes()?;
            self.record(rec)?;
        }
        Ok(())
    }

    fn corrupt(why: &str) -> KvError {
        KvError::Corrupt {
            what: "snapshot",
            why: why.to_string(),
        }
    }

    fn record(&mut self, rec: &[u8]) -> Result<()> {
        if self.ended {
            return Err(Self::corrupt("record after END"));
        }
        let mut d = Dec::new(rec, "snapshot");
        let tag = d.u8()?;
        if !self.header && tag != REC_HEADER {
            return Err(Self::corrupt("first record is not the header"));
        }
        match tag {
            REC_HEADER => {
                if self.header {
                    return Err(Self::corrupt("second header"));
                }
                let magic = d.rest();
                let (m, rest) = magic
                    .split_at_checked(MAGIC.len())
                    .ok_or_else(|| Self::corrupt("short header"))?;
                if m == MAGIC || m == MAGIC_V2 {
                    self.dedup_due = true;
                } else if m != MAGIC_V1 {
                    return Err(Self::corrupt("bad magic"));
                }
                let mut d = Dec::new(rest, "snapshot");
                let st = &mut self.st;
                st.apply.applied_index = d.u64()?;
                st.apply.applied_term = d.u64()?;
                st.apply.commit_index = d.u64()?;
                st.apply.commit_term = d.u64()?;
                st.apply.apply_meta = Bytes::copy_from_slice(d.bytes()?);
                st.revision = d.u64()?;
                st.clock_ms = d.u64()?;
                st.compact_revision = d.u64()?;
                let lo = Bytes::copy_from_slice(d.bytes()?);
                let hi = match d.u8()? {
                    0 => None,
                    _ => Some(Bytes::copy_from_slice(d.bytes()?)),
                };
                st.bounds = Bounds { lo, hi };
                self.kvs_left = d.u64()?;
                self.events_left = d.u64()?;
                d.end()?;
                check_counters("snapshot", st.revision, st.compact_revision, &st.bounds)?;
                self.header = true;
            }
            REC_KV => {
                if self.kvs_left == 0 {
                    return Err(Self::corrupt("more keys than the header announced"));
                }
                self.kvs_left -= 1;
                let mut meta = read_meta(&mut d)?;
                let key = Bytes::copy_from_slice(d.bytes()?);
                let value = Bytes::copy_from_slice(d.bytes()?);
                d.end()?;
                if self
                    .st
                    .index
                    .last_key_value()
                    .is_some_and(|(k, _)| k.as_slice() >= key.as_ref())
                {
                    return Err(Self::corrupt("keys out of order"));
                }
                meta.value_len = u32::try_from(value.len()).unwrap_or(u32::MAX);
                check_version("snapshot", &self.st, &key, EventKind::Put, &meta, false)?;
                self.st.live_bytes += (key.len() + value.len()) as u64;
                if meta.expires_at_ms != 0 {
                    self.st.expiry.insert((meta.expires_at_ms, key.clone()));
                }
                self.pending.push(Pending::Live(key.clone()));
                self.st.index.insert(
                    IndexKey::from(key),
                    Entry {
                        meta,
                        value: ValueRef::Inline(value),
                    },
                );
            }
            REC_EVENT => {
                if self.events_left == 0 || self.kvs_left != 0 {
                    return Err(Self::corrupt("unexpected event record"));
                }
                self.events_left -= 1;
                let kind = match d.u8()? {
                    1 => EventKind::Put,
                    0 => EventKind::Delete,
                    k => {
                        return Err(KvError::field(
                            "snapshot",
                            "event.kind",
                            format!("{k} is neither 0 (delete) nor 1 (put)"),
                        ))
                    }
                };
                let mut meta = read_meta(&mut d)?;
                let key = Bytes::copy_from_slice(d.bytes()?);
                let value = Bytes::copy_from_slice(d.bytes()?);
                d.end()?;
                meta.value_len = u32::try_from(value.len()).unwrap_or(u32::MAX);
                check_version("snapshot", &self.st, &key, kind, &meta, true)?;
                if self
                    .st
                    .history
                    .last_key_value()
                    .is_some_and(|((r, k), _)| (*r, k) >= (meta.mod_revision, &key))
                {
                    return Err(Self::corrupt("events out of (revision, key) order"));
                }
                // Share the value with the live entry when the event is its current version.
                let value = match self.st.index.get(&key[..]) {
                    Some(e)
                        if e.meta.mod_revision == meta.mod_revision && kind == EventKind::Put =>
                    {
                        e.value.clone()
                    }
                    _ => ValueRef::Inline(value),
                };
                self.pending
                    .push(Pending::Hist(meta.mod_revision, key.clone()));
                self.st
                    .insert_hist(meta.mod_revision, key, Hist { kind, meta, value });
            }
            REC_DEDUP => {
                if !self.dedup_due || self.kvs_left != 0 || self.events_left != 0 {
                    return Err(Self::corrupt("unexpected dedup record"));
                }
                let t = DedupTable::from_image(d.rest(), "snapshot")?;
                t.check_tick("snapshot", self.st.apply.applied_index)?;
                self.st.dedup = t;
                self.dedup_due = false;
            }
            REC_END => {
                if self.kvs_left != 0 || self.events_left != 0 || self.dedup_due {
                    return Err(Self::corrupt("END before all announced records"));
                }
                d.end()?;
                self.ended = true;
            }
            _ => return Err(Self::corrupt("unknown record tag")),
        }
        Ok(())
    }

    /// The restored state; fails unless the `END` record was seen.
    pub(crate) fn finish(self) -> Result<State> {
        if !self.ended {
            return Err(Self::corrupt("missing END record"));
        }
        Ok(self.st)
    }
}

/// Chunk size of [`write_image`]: the writer checks for cancellation between chunks.
const WRITE_CHUNK: usize = 1 << 20;
/// A background image write flushes what it wrote every this many bytes (`fdatasync` of the
/// temporary file), so the page cache never holds more than this of its dirty data: the final
/// fsync, and the raft log's fsyncs on the same disk meanwhile (the journal commits they need
/// wait for the image data of the same transaction), queue behind at most this much
/// write-back. 16 MiB let a log-GC image stall a range's writes for 25-30 ms; with 1 MiB, W12
/// after W10 had p99.9 29-41 ms instead of 58-97 ms (docs/benchmarks.md).
const FLUSH_EVERY: u64 = 1 << 20;
/// The nice value of a background image writer's thread: it yields the CPU to the threads
/// that apply and step raft (a 2-core node writing a 400 MB image otherwise takes a core from
/// them for seconds).
const WRITER_NICE: i32 = 10;

/// Writes the logged-mode snapshot file from `snap`: the image, streamed chunk by chunk, then
/// a crc32 of it, through a temporary file, fsync, rename and directory fsync, so a crash
/// leaves the old file or the new one, never a mix. Returns `false` (temporary file removed,
/// old file untouched) if `cancel` was raised between two chunks.
///
/// With `cancel` (a background write) the thread lowers its priority ([`WRITER_NICE`]) and
/// flushes every [`FLUSH_EVERY`] bytes. Only one writer may run per directory at a time (the
/// store keeps at most one image job).
pub(crate) fn write_image(
    dir: &Path,
    mut snap: SnapshotReader,
    cancel: Option<&AtomicBool>,
) -> Result<bool> {
    let tmp = dir.join(format!("{SNAP_FILE}.tmp"));
    let path = dir.join(SNAP_FILE);
    let io = |e| KvError::io("write snapshot", &tmp, e);
    let background = cancel.is_some();
    if background {
        // A hint: on failure the write just competes at the normal priority. On Linux the
        // nice value is per thread, and `None` names the calling one.
        let _ = rustix::process::setpriority_process(None, WRITER_NICE);
    }
    let mut f = File::create(&tmp).map_err(|e| KvError::io("create snapshot", &tmp, e))?;
    let mut crc = crc32fast::Hasher::new();
    let mut unflushed = 0u64;
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            drop(f);
            let _ = fs::remove_file(&tmp);
            return Ok(false);
        }
        let chunk = match snap.next_chunk(WRITE_CHUNK) {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                drop(f);
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        crc.update(&chunk);
        f.write_all(&chunk).map_err(io)?;
        unflushed += chunk.len() as u64;
        if background && unflushed >= FLUSH_EVERY {
            f.sync_data().map_err(io)?;
            unflushed = 0;
        }
    }
    f.write_all(&crc.finalize().to_le_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    drop(f);
    // The image being replaced is deleted off this path: renaming over it would free its
    // extents (hundreds of MB for a large range) in one journal transaction, and every fsync
    // on the file system (the raft log's) would wait for it (W12 measured stalls of 225 ms).
    // A second name keeps it whole through the rename; the reaper shrinks it and unlinks it.
    let old = dir.join(format!(
        "{SNAP_FILE}.{}{OLD_SUFFIX}",
        RETIRED.fetch_add(1, Ordering::Relaxed)
    ));
    // No image yet, or no hard links here: the rename frees it (or nothing) as it always did.
    let linked = fs::hard_link(&path, &old).is_ok();
    if let Err(e) = fs::rename(&tmp, &path) {
        if linked {
            // Still a second name of the current image: dropping it frees nothing.
            let _ = fs::remove_file(&old);
        }
        return Err(KvError::io("rename snapshot", &path, e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| KvError::io("fsync data dir", dir, e))?;
    if linked {
        // Its only name now (the rename is durable): nothing else reads or links it.
        seglog::remove_file_gently(old);
    }
    Ok(true)
}

/// Reads the logged-mode snapshot file, if any.
pub(crate) fn read_file(dir: &Path) -> Result<Option<State>> {
    let path = dir.join(SNAP_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KvError::io("read snapshot", &path, e)),
    };
    let corrupt = |why: &str| KvError::Corrupt {
        what: "snapshot file",
        why: why.to_string(),
    };
    let (body, crc) = bytes
        .split_at_checked(bytes.len().saturating_sub(4))
        .ok_or_else(|| corrupt("too short"))?;
    let mut c = [0u8; 4];
    if crc.len() != 4 {
        return Err(corrupt("too short"));
    }
    c.copy_from_slice(crc);
    if crc32fast::hash(body) != u32::from_le_bytes(c) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Restorer::new();
    r.push(body)?;
    Ok(Some(r.finish()?))
}

/// Removes a leftover temporary snapshot file (a crash during `write_image`) and leftover
/// replaced images (`kv.snap.N.old`). These are unlinked, never shrunk: after a crash between
/// `write_image`'s link and rename, one is a second name of the current `kv.snap`.
pub(crate) fn clean_leftovers(dir: &Path) {
    let _ = fs::remove_file(dir.join(format!("{SNAP_FILE}.tmp")));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!("{SNAP_FILE}.")) && name.ends_with(OLD_SUFFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Opens (creating) a data dir.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| KvError::io("create data dir", dir, e))
}
