//! [`KvStore`] (the applying owner) and [`KvReader`] (cloneable read handle).
//!
//! # Sharing between apply and reads
//! The state lives in `Arc<Shared>` behind one `parking_lot::RwLock`. `apply` takes the write
//! lock for the in-memory mutation and, in persistent mode, the `append_batch` of the command's
//! records (a copy into the mmap; the fsync happens in [`KvStore::persist`], outside any
//! apply). Reads take the read lock only to collect keys, metadata and value references;
//! values on disk are read after the lock is released. Records are immutable, so a reference
//! taken under the lock reads exactly that version; if compaction dropped the record in
//! between, the read is retried (bounded) with fresh references.
//!
//! # Durability per mode
//! - memory: nothing on disk; the durable apply state is the current one.
//! - logged: [`KvStore::persist`] writes the snapshot file (state + history + apply state);
//!   the durable apply state is the snapshot's. [`KvStore::persist_background`] does the same
//!   without blocking the caller: it captures the state under the read lock (references to
//!   the immutable, reference-counted keys and values, no value copied) and a thread of its
//!   own encodes, writes and fsyncs the file; the durable apply state moves to the captured
//!   one only once that write is complete (temporary file, fsync, rename, directory fsync: a
//!   crash in between leaves the previous file). At most one such write runs per store.
//! - persistent: every applied command that changes something appends its mutations plus a
//!   `COMMIT` record (apply state, counters, apply meta) in one `append_batch`; `persist`
//!   appends a `COMMIT` if only the apply state moved, then syncs the data log. A packed entry
//!   ([`KvStore::apply_packed`]) appends ONE group for the changes of all its commands.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};
use protobuf::Message;
use seglog::SegLog;

use crate::error::{KvError, Result};
use crate::kv::apply::{
    apply_command, apply_entry, begin_entry, check_scan_revision, encode_reply, Ctx, Reply,
};
use crate::kv::datalog::{self, DataLog};
use crate::kv::dedup::Journal;
use crate::kv::snapshot::{self, Pin, Restorer, SnapshotReader};
use crate::kv::state::{inline_only, kv_event, load_all, Change, KeyRange, State, ValueRef};
use crate::kv::types::{ApplyState, Bounds, KeyValue, KvConfig, Persistence, RangeStats};
use crate::kv::watch::{Applied, Subscription, WatchBatch, Watcher};

/// Header of every read: the state the read was served at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadHeader {
    /// The store's revision.
    pub revision: u64,
    /// The applied raft index (followers report it: reads may lag).
    pub applied_index: u64,
    /// The history horizon.
    pub compact_revision: u64,
}

impl ReadHeader {
    /// The wire form.
    pub fn to_pb(&self) -> proto::kvpb::ResponseHeader {
        let mut h = proto::kvpb::ResponseHeader::new();
        h.revision = self.revision;
        h.applied_index = self.applied_index;
        h.compact_revision = self.compact_revision;
        h
    }
}

/// A scan request. Pages: at most `limit` keys (0 = no limit) and about `max_bytes` of keys
/// plus values (0 = no bound; a page holds at least one key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanRequest {
    /// The keys to scan.
    pub range: KeyRange,
    /// Most keys per page.
    pub limit: usize,
    /// Byte bound per page.
    pub max_bytes: usize,
    /// Leave values out.
    pub keys_only: bool,
    /// 0 or the current revision (past revisions are refused with a typed error).
    pub revision: u64,
}

impl ScanRequest {
    /// Every key of `range`, unbounded pages.
    pub fn range(range: KeyRange) -> Self {
        ScanRequest {
            range,
            limit: 0,
            max_bytes: 0,
            keys_only: false,
            revision: 0,
        }
    }
}

/// One page of a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// The keys, in order.
    pub kvs: Vec<KeyValue>,
    /// More keys follow: continue with `range.start = next_key`.
    pub next_key: Option<Bytes>,
    /// The state the page was served at.
    pub header: ReadHeader,
}

impl ScanPage {
    /// The wire form: a `Response` with its header and a `ScanResult`.
    pub fn to_pb(&self) -> proto::kvpb::Response {
        let mut r = proto::kvpb::Response::new();
        r.header = protobuf::SingularPtrField::some(self.header.to_pb());
        r.result = Some(proto::kvpb::Response_oneof_result::scan(
            crate::kv::apply::scan_result(self.kvs.clone(), self.next_key.clone()),
        ));
        r
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    state: RwLock<State>,
    /// The data log (persistent mode).
    log: Option<Arc<SegLog>>,
    subs: Mutex<Vec<Sender<Arc<Applied>>>>,
    sub_capacity: usize,
    /// Snapshots holding disk positions; compaction waits for 0.
    pins: Arc<AtomicUsize>,
    /// Restores so far: bumped before a restore replaces the state (and, in persistent mode,
    /// rewrites the data log), so a snapshot still loading values from the old log can tell.
    restores: AtomicU64,
}

impl Shared {
    /// The state (snapshots read it between writes).
    pub(crate) fn state(&self) -> &RwLock<State> {
        &self.state
    }

    /// The data log (persistent mode).
    pub(crate) fn log(&self) -> Option<&Arc<SegLog>> {
        self.log.as_ref()
    }

    /// How many restores replaced the state so far.
    pub(crate) fn restores(&self) -> u64 {
        self.restores.load(Ordering::SeqCst)
    }

    fn load(&self, v: &ValueRef) -> Result<Bytes> {
        match (v, &self.log) {
            (ValueRef::Disk(p), Some(log)) => datalog::read_value(log, *p),
            _ => inline_only(v),
        }
    }
}

/// The apply state of both halves of a split applied as the entry `index`/`term` (a split
/// redone after a crash may find the index already applied).
fn split_apply(apply: &ApplyState, index: u64, term: u64) -> ApplyState {
    let mut a = apply.clone();
    if index > a.applied_index {
        a.applied_index = index;
        a.applied_term = term;
    }
    a
}

fn is_moved(e: &KvError) -> bool {
    matches!(e, KvError::Storage(seglog::Error::InvalidPosition { .. }))
}

/// Read handle on a store: cheap to clone, usable from any thread while the owner applies.
#[derive(Debug, Clone)]
pub struct KvReader {
    shared: Arc<Shared>,
}

impl KvReader {
    fn header(st: &State) -> ReadHeader {
        ReadHeader {
            revision: st.revision,
            applied_index: st.apply.applied_index,
            compact_revision: st.compact_revision,
        }
    }

    /// Runs `collect` under the read lock, then loads values outside it; retries if
    /// compaction moved a record in between.
    fn read<T, C>(
        &self,
        collect: impl Fn(&State) -> Result<C>,
        load: impl Fn(C) -> Result<T>,
    ) -> Result<T> {
        let mut attempt = 0;
        loop {
            let c = collect(&self.shared.state.read())?;
            match load(c) {
                Err(e) if is_moved(&e) && attempt < 8 => attempt += 1,
                r => return r,
            }
        }
    }

    /// The key's value at `now_ms` (expired keys are invisible).
    ///
    /// # Errors
    /// [`KvError::KeyOutOfRange`] for a key outside the store's bounds (it moved away in a
    /// split: an empty answer would be stale).
    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<(Option<KeyValue>, ReadHeader)> {
        self.read(
            |st| {
                if !st.bounds.contains(key) {
                    return Err(KvError::KeyOutOfRange);
                }
                // The stored key (a short key is copied out of the index) and the entry.
                let e = st
                    .visible_kv(key, now_ms)
                    .map(|(k, e)| (k.to_bytes(), e.meta, e.value.clone()));
                Ok((e, Self::header(st)))
            },
            |(e, h)| {
                let kv = match e {
                    Some((k, meta, v)) => Some(KeyValue {
                        value: self.shared.load(&v)?,
                        key: k,
                        create_revision: meta.create_revision,
                        mod_revision: meta.mod_revision,
                        version: meta.version,
                        expires_at_ms: meta.expires_at_ms,
                    }),
                    None => None,
                };
                Ok((kv, h))
            },
        )
    }

    /// One page of a scan at `now_ms`, of the keys of `req.range` that lie in the store's
    /// bounds (see [`KvReader::scan_in_bounds`] for a range's client reads).
    pub fn scan(&self, req: &ScanRequest, now_ms: u64) -> Result<ScanPage> {
        self.scan_inner(req, now_ms, false)
    }

    /// [`KvReader::scan`] for a range's clients: the whole of `req.range` must lie in the
    /// store's bounds, checked under the same lock as the read.
    ///
    /// # Errors
    /// [`KvError::KeyOutOfRange`] when the scanned keys reach outside the bounds (a part of
    /// them moved away in a split: a partial answer would be stale).
    pub fn scan_in_bounds(&self, req: &ScanRequest, now_ms: u64) -> Result<ScanPage> {
        self.scan_inner(req, now_ms, true)
    }

    fn scan_inner(&self, req: &ScanRequest, now_ms: u64, strict: bool) -> Result<ScanPage> {
        self.read(
            |st| {
                if strict && !st.bounds.covers(&req.range) {
                    return Err(KvError::KeyOutOfRange);
                }
                check_scan_revision(st, req.revision)?;
                let (c, next) =
                    st.collect_scan(&req.range, req.limit, req.max_bytes, req.keys_only, now_ms);
                Ok((c, next, Self::header(st)))
            },
            |(c, next_key, header)| {
                Ok(ScanPage {
                    kvs: load_all(c, &|v| self.shared.load(v))?,
                    next_key,
                    header,
                })
            },
        )
    }

    /// Every page of a scan, concatenated (tests and small ranges).
    pub fn scan_all(&self, mut req: ScanRequest, now_ms: u64) -> Result<Vec<KeyValue>> {
        let mut out = Vec::new();
        loop {
            let page = self.scan(&req, now_ms)?;
            out.extend(page.kvs);
            match page.next_key {
                Some(k) => req.range.start = k,
                None => return Ok(out),
            }
        }
    }

    /// Bytes of live keys plus values (constant time: the split check's first test).
    pub fn live_bytes(&self) -> u64 {
        self.shared.state.read().live_bytes
    }

    /// The earliest TTL among live keys (entry clock, ms), if any key has one (constant time:
    /// the first entry of the expiry index). The leader proposes `Expire` once it is due.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.shared.state.read().expiry.first().map(|(t, _)| *t)
    }

    /// Statistics for split decisions (walks the index for the middle key).
    pub fn range_stats(&self) -> RangeStats {
        self.shared.state.read().stats()
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.shared.state.read().revision
    }

    /// The current (applied, not necessarily durable) apply state.
    pub fn apply_state(&self) -> ApplyState {
        self.shared.state.read().apply.clone()
    }

    /// The entry clock: the largest leader timestamp applied.
    pub fn clock_ms(&self) -> u64 {
        self.shared.state.read().clock_ms
    }

    /// The key bounds the store serves.
    pub fn bounds(&self) -> Bounds {
        self.shared.state.read().bounds.clone()
    }

    /// History from revision `from` (inclusive; 0 = the next revision) for keys in `range`:
    /// whole revisions until at least `limit` events (0 = all). If `from` is at or below the
    /// horizon, the current state of the matching keys (at `now_ms`) and the revision to resume.
    pub fn events_since(
        &self,
        from: u64,
        range: &KeyRange,
        limit: usize,
        now_ms: u64,
    ) -> Result<WatchBatch> {
        self.read(
            |st| {
                let from = if from == 0 {
                    st.revision.saturating_add(1)
                } else {
                    from
                };
                if from <= st.compact_revision {
                    let (c, _) = st.collect_scan(range, 0, 0, false, now_ms);
                    Ok(Err((c, st.revision.saturating_add(1))))
                } else {
                    Ok(Ok(st.collect_events(from, range, limit)))
                }
            },
            |r| match r {
                Err((c, next_revision)) => Ok(WatchBatch::Resync {
                    current: load_all(c, &|v| self.shared.load(v))?,
                    next_revision,
                }),
                Ok((evs, next_revision)) => {
                    let events = evs
                        .into_iter()
                        .map(|(k, h)| {
                            Ok(kv_event(&k, h.kind, &h.meta, self.shared.load(&h.value)?))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Ok(WatchBatch::Events {
                        events,
                        next_revision,
                    })
                }
            },
        )
    }

    /// Subscribes to the changes of every command applied from now on.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = crossbeam_channel::bounded(self.shared.sub_capacity);
        self.shared.subs.lock().push(tx);
        rx
    }

    /// A watcher on `range` from `start_revision` (0 = the next change).
    pub fn watch(&self, range: KeyRange, start_revision: u64) -> Watcher {
        Watcher::new(self.clone(), range, start_revision)
    }

    /// A point-in-time image of the whole store, streamed with [`SnapshotReader::next_chunk`].
    /// In persistent mode, storage compaction waits until it is dropped.
    pub fn snapshot(&self) -> SnapshotReader {
        let pin = self
            .shared
            .log
            .as_ref()
            .map(|_| Pin::new(&self.shared.pins));
        SnapshotReader::capture_live(&self.shared, pin)
    }

    /// Bytes of values held in memory by the index and the history (0 in persistent mode once
    /// every applied command reached the data log).
    pub fn inline_value_bytes(&self) -> u64 {
        let st = self.shared.state.read();
        let inline = |v: &ValueRef| match v {
            ValueRef::Inline(b) => b.len() as u64,
            ValueRef::Disk(_) => 0,
        };
        st.index.values().map(|e| inline(&e.value)).sum::<u64>()
            + st.history.values().map(|h| inline(&h.value)).sum::<u64>()
    }
}

/// Fault injection for process tests: `QUIVER_TEST_SPLIT_IMAGE_DELAY_MS=n` makes a logged
/// split's image thread wait `n` ms before it writes the daughter's image, so a test can kill
/// a node while a daughter serves but its image is not written yet
/// (`tests/tests/split_image_crash.rs`). Read once per process; unset, nothing waits.
fn split_image_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("QUIVER_TEST_SPLIT_IMAGE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

/// A logged-mode image write running off the applying thread ([`KvStore::persist_background`],
/// and the two images of a split: [`KvStore::split_off_as`]).
#[derive(Debug)]
struct ImageJob {
    /// The apply state of the image being written: durable once it finished with `Ok(true)`.
    apply: ApplyState,
    /// Raised to stop the write between two chunks (a handed-over image never stops: see
    /// [`JobWait::Handed`]).
    cancel: Arc<AtomicBool>,
    wait: JobWait,
}

/// How an [`ImageJob`]'s outcome reaches the store.
#[derive(Debug)]
enum JobWait {
    /// A thread of this store's own writes the image and returns the outcome.
    Thread(std::thread::JoinHandle<Result<bool>>),
    /// A daughter's first image, written by the thread of its parent's split job, which hands
    /// the outcome over before it writes the parent's left half. It is never cancelled: until
    /// it is durable, the parent's raft log (which replays the split) is what this store
    /// recovers from, and the parent's left half is not written before it.
    Handed(Arc<Handover>),
}

/// The outcome of a daughter's first image, from the thread that writes it.
#[derive(Debug, Default)]
struct Handover {
    outcome: Mutex<Option<Result<bool>>>,
    done: parking_lot::Condvar,
}

impl Handover {
    fn set(&self, r: Result<bool>) {
        *self.outcome.lock() = Some(r);
        self.done.notify_all();
    }

    fn is_set(&self) -> bool {
        self.outcome.lock().is_some()
    }

    /// Waits for the outcome and takes it (the one store that reads it).
    fn take(&self) -> Result<bool> {
        let mut g = self.outcome.lock();
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            self.done.wait(&mut g);
        }
    }
}

impl ImageJob {
    fn is_finished(&self) -> bool {
        match &self.wait {
            JobWait::Thread(h) => h.is_finished(),
            JobWait::Handed(h) => h.is_set(),
        }
    }

    /// Waits for the outcome: `Ok(true)` written, `Ok(false)` cancelled.
    fn join(self) -> Result<bool> {
        match self.wait {
            JobWait::Thread(h) => h.join().unwrap_or_else(|_| {
                Err(KvError::Corrupt {
                    what: "image writer",
                    why: "the thread panicked".into(),
                })
            }),
            JobWait::Handed(h) => h.take(),
        }
    }
}

/// One replica of a KV range: applies committed commands, owns persistence.
#[derive(Debug)]
pub struct KvStore {
    reader: KvReader,
    cfg: KvConfig,
    data: Option<DataLog>,
    durable: ApplyState,
    poisoned: AtomicBool,
    /// The logged-mode image write in flight, if any.
    job: Option<ImageJob>,
}

impl Drop for KvStore {
    /// Stops an image write in flight (the previous file stays the durable one) and waits for
    /// its thread, so a store reopened on the same dir never races it. A daughter's first
    /// image is not stopped (see [`JobWait::Handed`]): dropping the store waits for it.
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            job.cancel.store(true, Ordering::Relaxed);
            let _ = job.join();
        }
    }
}

impl std::ops::Deref for KvStore {
    type Target = KvReader;
    fn deref(&self) -> &KvReader {
        &self.reader
    }
}

impl KvStore {
    /// Opens (creating) a store and recovers its durable state: the snapshot file (logged), the
    /// data log (persistent), or nothing (memory).
    ///
    /// # Errors
    /// Fatal errors only: I/O, a corrupt snapshot file or data log, a locked data dir.
    pub fn open(cfg: KvConfig) -> Result<KvStore> {
        let (state, log) = match &cfg.persistence {
            Persistence::Memory => (State::default(), None),
            Persistence::Logged { dir } => {
                snapshot::ensure_dir(dir)?;
                snapshot::clean_leftovers(dir);
                (snapshot::read_file(dir)?.unwrap_or_default(), None)
            }
            Persistence::Persistent { dir } => {
                snapshot::ensure_dir(dir)?;
                let (log, _recovery) = SegLog::open(dir.join("data"), cfg.seglog.clone())?;
                let st = datalog::recover(&log)?;
                (st, Some(Arc::new(log)))
            }
        };
        let durable = state.apply.clone();
        let data = log.as_ref().map(|l| DataLog {
            log: l.clone(),
            last_commit: durable.clone(),
            durable: durable.clone(),
            journal: Journal::default(),
        });
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            log,
            subs: Mutex::new(Vec::new()),
            sub_capacity: cfg.subscriber_capacity.max(1),
            pins: Arc::new(AtomicUsize::new(0)),
            restores: AtomicU64::new(0),
        });
        Ok(KvStore {
            reader: KvReader { shared },
            cfg,
            data,
            durable,
            poisoned: AtomicBool::new(false),
            job: None,
        })
    }

    /// A read handle for other threads.
    pub fn reader(&self) -> KvReader {
        self.reader.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &KvConfig {
        &self.cfg
    }

    fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(KvError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn poison<T>(&self, e: KvError) -> Result<T> {
        self.poisoned.store(true, Ordering::SeqCst);
        Err(e)
    }

    /// Applies the committed entry `index` (term `term`, leader timestamp `now_ms`) and returns
    /// the encoded `kvpb::Response`. An empty `cmd` (a leader's no-op entry) only advances the
    /// applied index. Invalid commands get an error reply (`Response.result = error`), never a
    /// panic; the same entry sequence gives the same state on every replica.
    ///
    /// # Errors
    /// Only fatal ones (the data log failed, a value could not be read back): the store is
    /// poisoned and refuses further applies; reopen it.
    pub fn apply(&mut self, index: u64, term: u64, now_ms: u64, cmd: &[u8]) -> Result<Bytes> {
        match self.apply_reply(index, term, now_ms, cmd)? {
            Reply::Pb(_, Some(b)) | Reply::Recorded(b) => Ok(b),
            Reply::Pb(r, None) => encode_reply(&r).map(Bytes::from),
        }
    }

    /// Most commands in one packed entry ([`KvStore::apply_packed`]). Each command may record
    /// one request-id reply, so the request-id table's tick grows by at most this much per
    /// applied index (what recovery checks it against).
    pub const MAX_PACKED_PARTS: usize = 256;

    /// Applies the committed *packed* entry `index` (term `term`): several commands, each with
    /// its own leader timestamp (`parts`: `(now_ms, command)`, in proposal order), proposed as
    /// one raft entry. Returns one encoded `kvpb::Response` per part, in order.
    ///
    /// Each part is applied exactly as [`KvStore::apply`] would apply it as an entry of its own
    /// (decode, dedup by its own request id, its own revisions, its own reply; an error reply
    /// such as `KEY_OUT_OF_RANGE` for that part only), except that every part sees `index` as
    /// the applied index (the index moves once, before the first part) and the whole entry
    /// takes ONE write lock, ONE data-log group (its `COMMIT` covers every part: a crash
    /// recovers all of the entry or none of it) and ONE broadcast to watchers (events in
    /// revision order). An `index` not after the applied index gets that error reply for every
    /// part and changes nothing.
    ///
    /// # Errors
    /// More than [`KvStore::MAX_PACKED_PARTS`] parts (nothing applied, the store is not
    /// poisoned); otherwise only fatal ones, as [`KvStore::apply`].
    pub fn apply_packed(
        &mut self,
        index: u64,
        term: u64,
        parts: &[(u64, &[u8])],
    ) -> Result<Vec<Bytes>> {
        self.check_poison()?;
        if parts.len() > Self::MAX_PACKED_PARTS {
            return Err(KvError::invalid(
                "packed entry",
                format!("{} parts (at most {})", parts.len(), Self::MAX_PACKED_PARTS),
            ));
        }
        let shared = self.reader.shared.clone();
        let mut st = shared.state.write();
        if let Some(stale) = begin_entry(&mut st, index, term) {
            drop(st);
            let b = Bytes::from(encode_reply(&stale)?);
            return Ok(vec![b; parts.len()]);
        }
        let first_revision = st.revision.saturating_add(1);
        let load = |v: &ValueRef| shared.load(v);
        let mut ctx = Ctx {
            st: &mut st,
            limits: &self.cfg.limits,
            load: &load,
            changes: Vec::new(),
            recorded: None,
        };
        let mut replies = Vec::with_capacity(parts.len());
        for (now_ms, cmd) in parts {
            let reply = match apply_command(&mut ctx, &self.cfg, *now_ms, cmd) {
                Ok(r) => r,
                Err(e) => return self.poison(e),
            };
            if let (Some(dl), Some(r)) = (&mut self.data, ctx.recorded.take()) {
                // Written with this entry's `COMMIT` (or a later one if nothing changed).
                dl.journal.push(&r);
            }
            replies.push(reply);
        }
        let changes = std::mem::take(&mut ctx.changes);
        self.publish_entry(st, changes, first_revision, index)?;
        replies
            .into_iter()
            .map(|r| match r {
                Reply::Pb(_, Some(b)) | Reply::Recorded(b) => Ok(b),
                Reply::Pb(r, None) => encode_reply(&r).map(Bytes::from),
            })
            .collect()
    }

    /// [`KvStore::apply`] returning the reply unencoded.
    pub fn apply_pb(
        &mut self,
        index: u64,
        term: u64,
        now_ms: u64,
        cmd: &[u8],
    ) -> Result<proto::kvpb::Response> {
        match self.apply_reply(index, term, now_ms, cmd)? {
            Reply::Pb(r, _) => Ok(r),
            // Checked when the table took it (`dedup.rs` validates decoded replies too), so
            // this cannot fail short of memory corruption: fatal.
            Reply::Recorded(b) => match proto::kvpb::Response::parse_from_carllerche_bytes(&b) {
                Ok(r) => Ok(r),
                Err(e) => self.poison(KvError::Corrupt {
                    what: "dedup reply",
                    why: e.to_string(),
                }),
            },
        }
    }

    /// The apply path of [`KvStore::apply`] and [`KvStore::apply_pb`].
    fn apply_reply(&mut self, index: u64, term: u64, now_ms: u64, cmd: &[u8]) -> Result<Reply> {
        self.check_poison()?;
        let shared = self.reader.shared.clone();
        let mut st = shared.state.write();
        // Exact whenever changes follow: their revisions were taken with checked arithmetic.
        let first_revision = st.revision.saturating_add(1);
        let load = |v: &ValueRef| shared.load(v);
        let mut ctx = Ctx {
            st: &mut st,
            limits: &self.cfg.limits,
            load: &load,
            changes: Vec::new(),
            recorded: None,
        };
        let resp = apply_entry(&mut ctx, &self.cfg, index, term, now_ms, cmd);
        let changes = std::mem::take(&mut ctx.changes);
        let recorded = ctx.recorded.take();
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return self.poison(e),
        };
        if let (Some(dl), Some(r)) = (&mut self.data, &recorded) {
            // Written with the next `COMMIT` (this group's, or a later one if none).
            dl.journal.push(r);
        }
        self.publish_entry(st, changes, first_revision, index)?;
        Ok(resp)
    }

    /// The end of one applied entry ([`KvStore::apply`], [`KvStore::apply_packed`]): its
    /// changes as one data-log group (persistent mode), then, the lock released, one
    /// broadcast to watchers. `first_revision` is the revision the entry's first change took.
    ///
    /// # Errors
    /// The data log failed: fatal, the store is poisoned.
    fn publish_entry(
        &mut self,
        mut st: parking_lot::RwLockWriteGuard<'_, State>,
        changes: Vec<Change>,
        first_revision: u64,
        index: u64,
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(dl) = &mut self.data {
            if let Err(e) = dl.append_group(&mut st, &changes) {
                drop(st);
                return self.poison(e);
            }
        }
        let last_revision = st.revision;
        drop(st);
        self.broadcast(|| Applied {
            first_revision,
            last_revision,
            index,
            // Changes come in revision order, each revision's keys in key order (range
            // delete, expire), the order of the history.
            events: changes.into_iter().map(|c| c.into_event()).collect(),
        });
        Ok(())
    }

    /// Sends the applied changes to the subscribers; built only if there are any.
    fn broadcast(&self, applied: impl FnOnce() -> Applied) {
        let mut subs = self.reader.shared.subs.lock();
        if subs.is_empty() {
            return;
        }
        let a = Arc::new(applied());
        subs.retain(|tx| tx.try_send(a.clone()).is_ok());
    }

    /// Records the commit point the following applies run under (stored with the next durable
    /// apply state).
    pub fn set_commit(&mut self, commit_index: u64, commit_term: u64) {
        let mut st = self.reader.shared.state.write();
        st.apply.commit_index = commit_index;
        st.apply.commit_term = commit_term;
    }

    /// Sets the consensus layer's opaque bytes (e.g. its `ConfState` after a membership change
    /// applied at `index`), advancing the applied index to `index` if it is ahead.
    pub fn set_apply_meta(&mut self, index: u64, term: u64, meta: Bytes) {
        let mut st = self.reader.shared.state.write();
        if index > st.apply.applied_index {
            st.apply.applied_index = index;
            st.apply.applied_term = term;
        }
        st.apply.apply_meta = meta;
    }

    /// The durable apply state: what this store would recover after a crash now.
    pub fn durable_state(&self) -> ApplyState {
        match self.cfg.persistence {
            Persistence::Memory => self.reader.apply_state(),
            _ => self.durable.clone(),
        }
    }

    /// Makes everything applied so far durable and returns the durable apply state. In logged
    /// mode this first waits for an image write in flight ([`KvStore::persist_background`]).
    ///
    /// # Errors
    /// Fatal: the store is poisoned.
    pub fn persist(&mut self) -> Result<ApplyState> {
        self.check_poison()?;
        self.finish_job(true)?;
        let shared = self.reader.shared.clone();
        let res = match &self.cfg.persistence {
            Persistence::Memory => Ok(shared.state.read().apply.clone()),
            Persistence::Logged { dir } => {
                let snap = self.reader.snapshot();
                if *snap.apply_state() == self.durable {
                    return Ok(self.durable.clone());
                }
                let apply = snap.apply_state().clone();
                snapshot::write_image(dir, snap, None).map(|_| apply)
            }
            Persistence::Persistent { .. } => match &mut self.data {
                Some(dl) => dl.persist(&shared.state.read()),
                None => Ok(self.durable.clone()),
            },
        };
        match res {
            Ok(a) => {
                self.durable = a.clone();
                Ok(a)
            }
            Err(e) => self.poison(e),
        }
    }

    /// [`KvStore::persist`] without blocking the caller on the image write (logged mode; the
    /// other modes persist as [`KvStore::persist`] does): returns the durable apply state, which
    /// may be behind the applied one.
    ///
    /// - An image write in flight that has finished is adopted: the durable apply state becomes
    ///   its captured one; nothing new starts in the same call (the caller compacts its log
    ///   with what became durable; the next call starts the next image).
    /// - One still running is left alone.
    /// - With none in flight and the applied state ahead of the durable one, the state is
    ///   captured (a registration, no copy: `tracked.rs`) and a thread reads, encodes, writes
    ///   and fsyncs the image while applies go on.
    ///
    /// # Errors
    /// Fatal: the previous image write failed, or the thread could not start; the store is
    /// poisoned.
    pub fn persist_background(&mut self) -> Result<ApplyState> {
        self.check_poison()?;
        let Persistence::Logged { dir } = &self.cfg.persistence else {
            return self.persist();
        };
        if let Some(job) = &self.job {
            if job.is_finished() {
                self.finish_job(true)?;
            }
            return Ok(self.durable.clone());
        }
        let snap = self.reader.snapshot();
        if *snap.apply_state() == self.durable {
            return Ok(self.durable.clone());
        }
        let apply = snap.apply_state().clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let (d, c) = (dir.clone(), cancel.clone());
        let spawned = std::thread::Builder::new()
            .name("kv-image".into())
            .spawn(move || snapshot::write_image(&d, snap, Some(&c)));
        match spawned {
            Ok(handle) => {
                self.job = Some(ImageJob {
                    apply,
                    cancel,
                    wait: JobWait::Thread(handle),
                });
                Ok(self.durable.clone())
            }
            Err(e) => self.poison(KvError::io("start image writer", dir, e)),
        }
    }

    /// Whether a logged-mode image write started by [`KvStore::persist_background`] is still
    /// to be adopted (running, or finished but not yet seen by a `persist*` call).
    pub fn image_write_pending(&self) -> bool {
        self.job.is_some()
    }

    /// Waits for the image write in flight, if any, and returns the durable apply state.
    ///
    /// # Errors
    /// Fatal: the image write failed; the store is poisoned.
    pub fn wait_image_write(&mut self) -> Result<ApplyState> {
        self.check_poison()?;
        self.finish_job(true)?;
        Ok(self.durable.clone())
    }

    /// Adopts the image job in flight once it finished (`wait`: waits for it). A cancelled job
    /// changes nothing; a failed one poisons the store.
    fn finish_job(&mut self, wait: bool) -> Result<()> {
        let Some(job) = self.job.take() else {
            return Ok(());
        };
        if !wait && !job.is_finished() {
            self.job = Some(job);
            return Ok(());
        }
        let apply = job.apply.clone();
        match job.join() {
            Ok(true) => {
                self.durable = apply;
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => self.poison(e),
        }
    }

    /// Stops the image write in flight, if any (the state is about to be replaced); a
    /// daughter's first image is waited for instead ([`JobWait::Handed`]).
    fn cancel_job(&mut self) -> Result<()> {
        if let Some(job) = &self.job {
            job.cancel.store(true, Ordering::Relaxed);
        }
        self.finish_job(true)
    }

    /// Replaces the whole state with a snapshot image (chunks already pushed into `restorer`).
    /// Durable when it returns (logged: snapshot file written; persistent: data log rewritten).
    ///
    /// # Errors
    /// [`KvError::Corrupt`] for an incomplete image (the store is unchanged); fatal I/O errors.
    pub fn restore(&mut self, restorer: Restorer) -> Result<ApplyState> {
        self.check_poison()?;
        let mut st = restorer.finish()?;
        // The image write in flight describes the state being replaced.
        self.cancel_job()?;
        let shared = self.reader.shared.clone();
        let mut guard = shared.state.write();
        // Before the data log is rewritten: snapshots still loading from it must know.
        shared.restores.fetch_add(1, Ordering::SeqCst);
        let res = match (&self.cfg.persistence, &mut self.data) {
            (Persistence::Persistent { .. }, Some(dl)) => dl.rewrite_all(&mut st),
            (Persistence::Logged { dir }, _) => {
                snapshot::write_image(dir, SnapshotReader::capture(&st, None, None), None)
                    .map(|_| ())
            }
            _ => Ok(()),
        };
        if let Err(e) = res {
            return self.poison(e);
        }
        let apply = st.apply.clone();
        *guard = st;
        drop(guard);
        self.durable = apply.clone();
        // Subscribers cannot follow a jump: drop them so they resync from history.
        self.reader.shared.subs.lock().clear();
        Ok(apply)
    }

    /// Replaces the whole state with the image streamed as `chunks`. In persistent mode each
    /// chunk's values go to the data log as it arrives, so an image larger than memory can be
    /// restored; the old state is gone as soon as the first chunk is taken, and if the image
    /// turns out incomplete or corrupt the store is left empty (applied index 0), ready for
    /// the next attempt. Other modes buffer the image and leave the store unchanged on error.
    ///
    /// # Errors
    /// [`KvError::Corrupt`] for a bad image; errors of the chunk source; fatal I/O errors.
    pub fn restore_chunks<I, C>(&mut self, chunks: I) -> Result<ApplyState>
    where
        I: IntoIterator<Item = Result<C>>,
        C: AsRef<[u8]>,
    {
        self.check_poison()?;
        if self.data.is_none() {
            let mut r = Restorer::new();
            for c in chunks {
                r.push(c?.as_ref())?;
            }
            return self.restore(r);
        }
        let shared = self.reader.shared.clone();
        let mut guard = shared.state.write();
        let Some(dl) = &mut self.data else {
            return Err(KvError::Poisoned);
        };
        shared.restores.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = dl.log.truncate(dl.log.first()) {
            drop(guard);
            return self.poison(e.into());
        }
        *guard = State::default();
        // Records made on the old state must not replay over the new one.
        dl.journal.clear();
        dl.last_commit = ApplyState::default();
        dl.durable = ApplyState::default();
        self.durable = ApplyState::default();
        self.reader.shared.subs.lock().clear();
        let mut r = Restorer::new();
        for c in chunks {
            r.push(c?.as_ref())?;
            if let Err(e) = dl.spill(&mut r.st, &mut r.pending) {
                drop(guard);
                return self.poison(e);
            }
        }
        let st = r.finish()?;
        if let Err(e) = dl.close_group(&st) {
            drop(guard);
            return self.poison(e);
        }
        let apply = st.apply.clone();
        *guard = st;
        drop(guard);
        self.durable = apply.clone();
        Ok(apply)
    }

    /// Restores from a whole image in one buffer.
    pub fn restore_bytes(&mut self, image: &[u8]) -> Result<ApplyState> {
        let mut r = Restorer::new();
        r.push(image)?;
        self.restore(r)
    }

    /// Range split at `at`, applied as the entry `index`/`term`: keys `>= at` (and their
    /// history) move to a new store opened with `right` (which must be empty, or hold the
    /// right half of this same split from before a crash), keys `< at` stay. Both halves keep
    /// the revision, the clock, the horizon and the apply state.
    ///
    /// Durability: in persistent mode both halves are durable on return. In logged mode
    /// neither image is written by the caller: one thread writes the right half's image and
    /// then the left half's (the applying thread would take 170-190 ms for a 45 MB half, on
    /// every replica, `cargo bench -p collections --bench kv`). Until the right image is
    /// written the right half reports its split state as durable although its dir holds no
    /// image yet; that is safe because the left half's durable state stays the one before the
    /// split until both images are written, so a crash replays the split entry from the raft
    /// log and builds the right half again (an empty right store is left to that replay;
    /// a right half that is durable already is restricted away with
    /// [`KvStore::split_drop_right`]). Other mode pairs (used by tests and tools) write the
    /// right half before returning.
    ///
    /// # Errors
    /// `InvalidArgument` if `at` is outside the bounds or `right` is not empty (nothing
    /// changed); fatal I/O errors.
    pub fn split_off(
        &mut self,
        index: u64,
        term: u64,
        at: &[u8],
        right: KvConfig,
    ) -> Result<KvStore> {
        self.split_off_as(index, term, at, right, None)
    }

    /// [`KvStore::split_off`], the right half's image carrying `right_meta` as its apply meta
    /// (the consensus layer's opaque bytes: a daughter range's own membership) instead of the
    /// parent's. The right half is then written once, already as what it is to become; setting
    /// the meta after the split would write its whole image a second time (`persist`). A right
    /// half reused from before a crash keeps the meta it was written with: compare it and set
    /// it if it differs.
    ///
    /// # Errors
    /// As [`KvStore::split_off`].
    pub fn split_off_as(
        &mut self,
        index: u64,
        term: u64,
        at: &[u8],
        right: KvConfig,
        right_meta: Option<Bytes>,
    ) -> Result<KvStore> {
        self.check_poison()?;
        let (at, bounds) = self.check_split_key(at)?;
        let mut right_store = KvStore::open(right)?;
        // A right half already materialised by this very split (a crash after the right half
        // was durable but before the left half was) is what this call would build again:
        // splits are deterministic. Anything else in the right dir is refused.
        let right_applied = right_store.reader.apply_state().applied_index;
        let reuse_right = right_applied != 0 && right_applied == index;
        if right_applied != 0 && !reuse_right {
            return Err(KvError::invalid(
                "right",
                "the right half's data dir is not empty",
            ));
        }
        // Values loaded from the data log and streamed into the right half's store: in
        // persistent mode the right half never sits in memory as a whole.
        let streamed = matches!(self.cfg.persistence, Persistence::Persistent { .. })
            || matches!(right_store.cfg.persistence, Persistence::Persistent { .. });
        // Both halves logged: both images are written off this thread (the dirs: left, right).
        let both_images = match (&self.cfg.persistence, &right_store.cfg.persistence) {
            (Persistence::Logged { dir: l }, Persistence::Logged { dir: r }) if !reuse_right => {
                Some((l.clone(), r.clone()))
            }
            _ => None,
        };
        if both_images.is_some() {
            // An image write in flight describes the state before the split: the left half's
            // image supersedes it. Stopped before the state is locked (its thread reads it).
            self.cancel_job()?;
        }
        let shared = self.reader.shared.clone();
        let mut st = shared.state.write();
        let right_bounds = Bounds {
            lo: at.clone(),
            hi: bounds.hi.clone(),
        };
        let mut view = State {
            revision: st.revision,
            compact_revision: st.compact_revision,
            clock_ms: st.clock_ms,
            apply: {
                let mut a = split_apply(&st.apply, index, term);
                if let Some(m) = right_meta {
                    a.apply_meta = m;
                }
                a
            },
            bounds: right_bounds.clone(),
            // A write applied in the parent and resent after the split reaches the right half.
            dedup: st.dedup.clone(),
            ..State::default()
        };
        if reuse_right {
            drop(view);
            self.keep_left(&mut st, index, term, bounds.lo, at)?;
            drop(st);
            self.persist_left()?;
            return Ok(right_store);
        }
        // The right half's entries, deadlines and history, moved out of the parent's state
        // (a split of 22,000 keys and 16,000 events took the applying thread 17-26 ms when
        // each entry was copied in and removed again).
        st.move_right(&at, &mut view);
        if streamed {
            let mut image = SnapshotReader::capture(&view, shared.log.clone(), None);
            drop(view);
            self.keep_left(&mut st, index, term, bounds.lo, at)?;
            drop(st);
            let chunks = std::iter::from_fn(|| image.next_chunk(1 << 20).transpose());
            right_store.restore_chunks(chunks)?;
            self.persist_left()?;
            return Ok(right_store);
        }
        self.keep_left(&mut st, index, term, bounds.lo, at)?;
        drop(st);
        right_store.install(view);
        if let Some((left_dir, right_dir)) = both_images {
            self.write_split_images(&mut right_store, left_dir, right_dir)?;
        } else {
            right_store.persist()?;
            self.persist_left()?;
        }
        Ok(right_store)
    }

    /// After a split whose right half exists already: the left half made durable (in logged
    /// mode in the background, [`KvStore::persist_background`]).
    fn persist_left(&mut self) -> Result<ApplyState> {
        if matches!(self.cfg.persistence, Persistence::Logged { .. }) {
            self.persist_background()
        } else {
            self.persist()
        }
    }

    /// Replaces a new, empty store's state with `st` (a split's right half, memory or
    /// logged mode). Nothing of it is durable yet: the caller persists it, or starts its image
    /// ([`KvStore::write_split_images`]).
    fn install(&mut self, st: State) {
        *self.reader.shared.state.write() = st;
    }

    /// Logged mode, a split just applied: writes the right half's image (`right`, a daughter
    /// just [`KvStore::install`]ed, into `right_dir`) and then this store's left half (into
    /// `left_dir`), both on one thread of
    /// their own, so the applying thread does not write either (a 45 MB half took it
    /// 170-190 ms, and every replica applies the split).
    ///
    /// Why the daughter may report its split state as durable before its image is: until
    /// that image is written, the parent's durable image is the one before the split (this
    /// thread writes the left half only after the right one, and the parent adopts the left
    /// half's apply state only when both are done), so the parent's raft log still holds the
    /// split entry, and a crash replays it: the node reopens a daughter with an empty store
    /// not as itself but leaves it to the parent, whose replay builds the right half again
    /// (`seed::ranges`). The daughter's image is never cancelled ([`JobWait::Handed`]); if it
    /// fails, both stores are poisoned (the parent cannot make its split durable).
    fn write_split_images(
        &mut self,
        right: &mut KvStore,
        left_dir: std::path::PathBuf,
        right_dir: std::path::PathBuf,
    ) -> Result<()> {
        let right_snap = right.reader.snapshot();
        let left_snap = self.reader.snapshot();
        let right_apply = right_snap.apply_state().clone();
        let left_apply = left_snap.apply_state().clone();
        let handover = Arc::new(Handover::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let (h, c, ld) = (handover.clone(), cancel.clone(), left_dir.clone());
        let spawned = std::thread::Builder::new()
            .name("kv-image".into())
            .spawn(move || {
                let never = AtomicBool::new(false);
                if let Some(d) = split_image_delay() {
                    std::thread::sleep(d);
                }
                let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    snapshot::write_image(&right_dir, right_snap, Some(&never))
                }))
                .unwrap_or_else(|_| {
                    Err(KvError::Corrupt {
                        what: "image writer",
                        why: "the thread panicked".into(),
                    })
                });
                let failed = first.as_ref().err().map(|e| e.to_string());
                h.set(first);
                if let Some(why) = failed {
                    return Err(KvError::io(
                        "write the daughter's image of a split",
                        &right_dir,
                        std::io::Error::other(why),
                    ));
                }
                snapshot::write_image(&ld, left_snap, Some(&c))
            });
        match spawned {
            Ok(handle) => {
                // Recoverable from the parent's replay of the split until its image lands
                // (see above).
                right.durable = right_apply.clone();
                right.job = Some(ImageJob {
                    apply: right_apply,
                    cancel: Arc::new(AtomicBool::new(false)),
                    wait: JobWait::Handed(handover),
                });
                self.job = Some(ImageJob {
                    apply: left_apply,
                    cancel,
                    wait: JobWait::Thread(handle),
                });
                Ok(())
            }
            // The caller drops the right half with the error.
            Err(e) => self.poison(KvError::io("start image writer", &left_dir, e)),
        }
    }

    /// The left half of a split at `at` applied as the entry `index`/`term`, when the right
    /// half already exists elsewhere (this replica got it by snapshot, or holds it from before a
    /// crash): keys `>= at` and their history are dropped without building the right half.
    /// Durable on return, at the split index.
    ///
    /// # Errors
    /// `InvalidArgument` if `at` is not strictly inside the bounds (nothing changed); fatal
    /// I/O errors.
    pub fn split_drop_right(&mut self, index: u64, term: u64, at: &[u8]) -> Result<ApplyState> {
        self.check_poison()?;
        let (at, bounds) = self.check_split_key(at)?;
        let shared = self.reader.shared.clone();
        let mut st = shared.state.write();
        self.keep_left(&mut st, index, term, bounds.lo, at)?;
        drop(st);
        self.persist()
    }

    /// The split key `at` and the current bounds, if `at` lies strictly inside them.
    fn check_split_key(&self, at: &[u8]) -> Result<(Bytes, Bounds)> {
        let at = Bytes::copy_from_slice(at);
        let bounds = self.reader.bounds();
        if !bounds.contains(&at) || at == bounds.lo {
            return Err(KvError::invalid(
                "at",
                "split key must lie strictly inside the bounds",
            ));
        }
        Ok((at, bounds))
    }

    /// The left half of a split at `at` applied as the entry `index`/`term`: advances the
    /// applied index, keeps `[lo, at)`, and (persistent) appends `BOUNDS` + `COMMIT`, not yet
    /// synced.
    fn keep_left(
        &mut self,
        st: &mut State,
        index: u64,
        term: u64,
        lo: Bytes,
        at: Bytes,
    ) -> Result<()> {
        st.apply = split_apply(&st.apply, index, term);
        st.restrict(Bounds { lo, hi: Some(at) });
        if let Some(dl) = &mut self.data {
            let recs = [datalog::encode_bounds(&st.bounds), dl.encode_commit(st)];
            if let Err(e) = dl.log.append_batch(recs.iter().map(|r| r.as_slice())) {
                return self.poison(e.into());
            }
            dl.last_commit = st.apply.clone();
        }
        Ok(())
    }

    /// [`KvStore::split_off`] returning both halves.
    pub fn split(
        mut self,
        index: u64,
        term: u64,
        at: &[u8],
        right: KvConfig,
    ) -> Result<(KvStore, KvStore)> {
        let r = self.split_off(index, term, at, right)?;
        Ok((self, r))
    }

    /// Persistent mode: rewrites what the state still references out of the sealed segments
    /// and deletes them. Returns how many segments were dropped (0 in other modes, or while a
    /// snapshot is being read).
    pub fn compact_storage(&mut self) -> Result<u64> {
        self.check_poison()?;
        let shared = self.reader.shared.clone();
        let Some(dl) = &mut self.data else {
            return Ok(0);
        };
        if shared.pins.load(Ordering::SeqCst) > 0 {
            return Ok(0);
        }
        match dl.compact(&shared.state, &shared.pins) {
            Ok(n) => {
                self.durable = dl.durable.clone();
                Ok(n)
            }
            Err(e) => self.poison(e),
        }
    }

    /// Runs [`KvStore::compact_storage`] when sealed segments hold more than twice the data
    /// the state references (live values plus history versions), and at least two are sealed.
    pub fn maybe_compact(&mut self) -> Result<u64> {
        let Some(dl) = &self.data else { return Ok(0) };
        let (sealed, used) = dl.sealed_bytes();
        let referenced = {
            let st = self.reader.shared.state.read();
            let hist: u64 = st
                .history
                .iter()
                .filter(|((rev, k), h)| {
                    h.kind == crate::kv::types::EventKind::Put
                        && st
                            .index
                            .get(&k[..])
                            .is_none_or(|e| e.meta.mod_revision != *rev)
                })
                .map(|((_, k), h)| k.len() as u64 + u64::from(h.meta.value_len))
                .sum();
            st.live_bytes + hist
        };
        if sealed >= 2 && used > 2 * referenced {
            self.compact_storage()
        } else {
            Ok(0)
        }
    }

    /// Persistent mode: every data-log record before this position is durable (for crash
    /// tests that cut the files past it).
    pub fn data_durable_end(&self) -> Option<seglog::Position> {
        self.data.as_ref().map(|d| d.log.durable_end())
    }

    /// Number of data-log segments (persistent mode; 0 otherwise).
    pub fn segment_count(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.log.segments().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::cmd;

    fn put(s: &mut KvStore, index: u64, k: &[u8]) {
        let c = cmd::encode(&cmd::put(k, b"v", 0));
        s.apply(index, 1, 0, &c).unwrap();
    }

    fn range(a: &[u8], b: Option<&[u8]>) -> ScanRequest {
        ScanRequest::range(KeyRange {
            start: Bytes::copy_from_slice(a),
            end: b.map(Bytes::copy_from_slice),
        })
    }

    /// A memory store holding a, c, e, g (entries 1-4) split at `d` (entry 5) into a logged
    /// right half in `dir`.
    fn split_aceg_at_d(dir: &std::path::Path) -> (KvStore, KvStore) {
        let mut left = KvStore::open(KvConfig::memory()).unwrap();
        for (i, k) in [&b"a"[..], b"c", b"e", b"g"].iter().enumerate() {
            put(&mut left, i as u64 + 1, k);
        }
        let cfg = KvConfig::with(Persistence::Logged { dir: dir.join("r") });
        let right = left.split_off(5, 1, b"d", cfg).unwrap();
        (left, right)
    }

    /// A range delete whose span a split cut (routing saw the whole span in the range, the
    /// split applied before the delete did) is refused whole: deleting the part still held
    /// and answering success would leave the moved keys behind.
    #[test]
    fn range_deletes_reaching_past_the_bounds_after_a_split_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut left, mut right) = split_aceg_at_d(dir.path());
        let del = |s: &mut KvStore, index: u64, k: &[u8], end: &[u8]| {
            let c = cmd::encode(&cmd::delete(k, end));
            let r = s.apply(index, 1, 0, &c).unwrap();
            proto::kvpb::Response::parse_from_bytes(&r).unwrap()
        };
        // Past the left half's end, or to the end of the key space: refused, nothing deleted.
        for (i, end) in [&b"f"[..], b"\0"].iter().enumerate() {
            let r = del(&mut left, 6 + i as u64, b"a", end);
            assert_eq!(
                r.get_error().code,
                proto::kvpb::ErrorCode::KEY_OUT_OF_RANGE,
                "{r:?}"
            );
        }
        assert!(left.get(b"a", 0).unwrap().0.is_some());
        // Below the right half's start: refused.
        let r = del(&mut right, 6, b"c", b"f");
        assert_eq!(
            r.get_error().code,
            proto::kvpb::ErrorCode::KEY_OUT_OF_RANGE,
            "{r:?}"
        );
        assert!(right.get(b"e", 0).unwrap().0.is_some());
        // Inside: applied.
        let r = del(&mut left, 8, b"a", b"d");
        assert!(!r.has_error(), "{r:?}");
        assert_eq!(r.get_delete().deleted, 2);
        let r = del(&mut right, 7, b"d", b"\0");
        assert!(!r.has_error(), "{r:?}");
        assert_eq!(r.get_delete().deleted, 2);
    }

    #[test]
    fn reads_outside_the_bounds_after_a_split_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (left, right) = split_aceg_at_d(dir.path());
        assert_eq!(left.live_bytes(), left.range_stats().bytes);
        assert_eq!(right.live_bytes(), right.range_stats().bytes);
        // Point reads: inside answered, outside refused (never an empty answer).
        assert!(left.get(b"a", 0).unwrap().0.is_some());
        assert!(left.get(b"b", 0).unwrap().0.is_none());
        assert!(matches!(left.get(b"e", 0), Err(KvError::KeyOutOfRange)));
        assert!(matches!(right.get(b"c", 0), Err(KvError::KeyOutOfRange)));
        assert!(right.get(b"e", 0).unwrap().0.is_some());
        // Client scans: the whole range must be held here.
        let ok = left.scan_in_bounds(&range(b"a", Some(b"d")), 0).unwrap();
        assert_eq!(ok.kvs.len(), 2);
        for r in [
            range(b"a", Some(b"e")),
            range(b"a", None),
            range(b"d", Some(b"f")),
        ] {
            assert!(matches!(
                left.scan_in_bounds(&r, 0),
                Err(KvError::KeyOutOfRange)
            ));
        }
        assert!(matches!(
            right.scan_in_bounds(&range(b"c", None), 0),
            Err(KvError::KeyOutOfRange)
        ));
        assert_eq!(
            right
                .scan_in_bounds(&range(b"d", None), 0)
                .unwrap()
                .kvs
                .len(),
            2
        );
        // An empty range is inside any bounds; the clipping scan is unchanged.
        assert!(left.scan_in_bounds(&range(b"z", Some(b"a")), 0).is_ok());
        assert_eq!(left.scan(&range(b"a", None), 0).unwrap().kvs.len(), 2);
    }

    /// A split while a snapshot reads the store (a background image, a learner's snapshot):
    /// the moved history is saved for the capture, and the byte count of the history that
    /// stays is exact (debug-asserted in `State::restrict`; the predicate `Tracked::retain`
    /// may ask twice must not count), so the capture still reads every event it started with.
    #[test]
    fn a_split_under_a_live_capture_keeps_history_bytes_exact() {
        let mut s = KvStore::open(KvConfig::with(Persistence::Memory)).unwrap();
        for (i, k) in [&b"a"[..], b"c", b"e", b"c"].iter().enumerate() {
            put(&mut s, i as u64 + 1, k);
        }
        let mut image = s.snapshot();
        s.split_drop_right(5, 1, b"d").unwrap();
        assert_eq!(s.range_stats().history_events, 3);
        let mut bytes = Vec::new();
        while let Some(c) = image.next_chunk(1 << 20).unwrap() {
            bytes.extend_from_slice(&c);
        }
        let mut r = KvStore::open(KvConfig::with(Persistence::Memory)).unwrap();
        r.restore_bytes(&bytes).unwrap();
        assert_eq!(
            r.range_stats().history_events,
            4,
            "the capture kept e's event"
        );
    }

    #[test]
    fn split_drop_right_keeps_the_left_half_durably() {
        for persistent in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().join("l");
            let cfg = if persistent {
                KvConfig::with(Persistence::Persistent { dir: d })
            } else {
                KvConfig::with(Persistence::Logged { dir: d })
            };
            let mut s = KvStore::open(cfg.clone()).unwrap();
            for (i, k) in [&b"a"[..], b"c", b"e"].iter().enumerate() {
                put(&mut s, i as u64 + 1, k);
            }
            s.persist().unwrap();
            let rev = s.revision();
            assert!(s.split_drop_right(4, 2, b"").is_err(), "at == lo");
            let st = s.split_drop_right(4, 2, b"d").unwrap();
            assert_eq!((st.applied_index, st.applied_term), (4, 2));
            assert!(
                s.split_drop_right(5, 2, b"e").is_err(),
                "outside the new bounds"
            );
            drop(s);
            let s = KvStore::open(cfg).unwrap();
            assert_eq!(s.durable_state().applied_index, 4);
            assert_eq!(s.revision(), rev);
            assert_eq!(s.bounds().hi.as_deref(), Some(&b"d"[..]));
            assert_eq!(s.scan(&range(b"a", None), 0).unwrap().kvs.len(), 2);
            assert!(matches!(s.get(b"e", 0), Err(KvError::KeyOutOfRange)));
        }
    }
}
