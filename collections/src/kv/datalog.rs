//! Persistent mode: the data log (a [`SegLog`]) holding every version of every key, the
//! apply state, and the recovery and compaction that work on it.
//!
//! Record format (byte layout in `docs/design/collections.md` §3): every record starts with a
//! tag byte.
//! - `MUTATION` (1): one put or delete of one key, with its revision, metadata and value.
//!   Its origin says why it is there: `ORIGINAL` (written by apply), `LIVE_COPY` (compaction
//!   copied the key's live version), `HIST_COPY` (compaction copied a history version).
//! - `COMMIT` (2): the apply state and counters. It closes a *group*: the mutations of one
//!   applied command (or one compaction, restore or split), appended with one `append_batch`.
//!   An optional trailing field carries the request-id table's changes since the previous
//!   `COMMIT`, or the whole table after a compaction or restore (`dedup.rs`); records
//!   without it (older logs) decode as before.
//! - `BOUNDS` (3): the key bounds after a split.
//!
//! Recovery replays groups in log order and ignores (and cuts) a trailing group without its
//! `COMMIT`, so the recovered state is exactly the state of the last durable `COMMIT`.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use seglog::{Position, SegLog};

use crate::error::{KvError, Result};
use crate::kv::codec::{Dec, Enc};
use crate::kv::dedup::Journal;
use crate::kv::key::IndexKey;
use crate::kv::state::{Change, Entry, Hist, Meta, State, ValueRef};
use crate::kv::types::{ApplyState, Bounds, EventKind};

pub(crate) const REC_MUTATION: u8 = 1;
pub(crate) const REC_COMMIT: u8 = 2;
pub(crate) const REC_BOUNDS: u8 = 3;

/// Why a mutation record is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Written by apply: the key's newest version at its place in the log.
    Original = 0,
    /// Copied by compaction because it was the key's live version (newest at its new place).
    LiveCopy = 1,
    /// Copied by compaction for the watch history only: never becomes live on replay.
    HistCopy = 2,
}

/// A decoded mutation record; `value` borrows from the record.
pub(crate) struct Mutation<'a> {
    pub(crate) origin: Origin,
    pub(crate) kind: EventKind,
    pub(crate) key: &'a [u8],
    pub(crate) meta: Meta,
    pub(crate) value: &'a [u8],
}

/// A decoded commit record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Commit {
    pub(crate) apply: ApplyState,
    pub(crate) revision: u64,
    pub(crate) clock_ms: u64,
    pub(crate) compact_revision: u64,
    /// Request-id table payload (`Journal::take_payload`); empty if none.
    pub(crate) dedup: Bytes,
}

pub(crate) enum Record<'a> {
    Mutation(Mutation<'a>),
    Commit(Commit),
    Bounds(Bounds),
}

pub(crate) fn encode_mutation(
    origin: Origin,
    kind: EventKind,
    key: &[u8],
    meta: &Meta,
    value: &[u8],
) -> Vec<u8> {
    let mut e = Enc::with_capacity(48 + key.len() + value.len());
    let put = u8::from(kind == EventKind::Put);
    e.u8(REC_MUTATION)
        .u8(put | ((origin as u8) << 1))
        .u64(meta.mod_revision)
        .u64(meta.create_revision)
        .u64(meta.version)
        .u64(meta.expires_at_ms)
        .bytes(key)
        .raw(value);
    e.0
}

/// A `COMMIT` of `st` carrying the request-id table payload `dedup`
/// ([`Journal::take_payload`]).
fn encode_commit(st: &State, dedup: &[u8]) -> Vec<u8> {
    let a = &st.apply;
    let mut e = Enc::with_capacity(64 + a.apply_meta.len());
    e.u8(REC_COMMIT)
        .u64(a.applied_index)
        .u64(a.applied_term)
        .u64(a.commit_index)
        .u64(a.commit_term)
        .u64(st.revision)
        .u64(st.clock_ms)
        .u64(st.compact_revision)
        .bytes(&a.apply_meta);
    if !dedup.is_empty() {
        e.bytes(dedup);
    }
    e.0
}

pub(crate) fn encode_bounds(b: &Bounds) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(REC_BOUNDS).bytes(&b.lo);
    match &b.hi {
        Some(hi) => e.u8(1).bytes(hi),
        None => e.u8(0),
    };
    e.0
}

pub(crate) fn decode(buf: &[u8]) -> Result<Record<'_>> {
    let mut d = Dec::new(buf, "data-log record");
    let corrupt = |why: &str| KvError::Corrupt {
        what: "data-log record",
        why: why.to_string(),
    };
    match d.u8()? {
        REC_MUTATION => {
            let flags = d.u8()?;
            let origin = match flags >> 1 {
                0 => Origin::Original,
                1 => Origin::LiveCopy,
                2 => Origin::HistCopy,
                _ => return Err(corrupt("unknown origin")),
            };
            let kind = if flags & 1 == 1 {
                EventKind::Put
            } else {
                EventKind::Delete
            };
            let mod_revision = d.u64()?;
            let create_revision = d.u64()?;
            let version = d.u64()?;
            let expires_at_ms = d.u64()?;
            let key = d.bytes()?;
            let value = d.rest();
            Ok(Record::Mutation(Mutation {
                origin,
                kind,
                key,
                meta: Meta {
                    create_revision,
                    mod_revision,
                    version,
                    expires_at_ms,
                    value_len: u32::try_from(value.len()).unwrap_or(u32::MAX),
                },
                value,
            }))
        }
        REC_COMMIT => {
            let apply = ApplyState {
                applied_index: d.u64()?,
                applied_term: d.u64()?,
                commit_index: d.u64()?,
                commit_term: d.u64()?,
                apply_meta: Bytes::new(),
            };
            let revision = d.u64()?;
            let clock_ms = d.u64()?;
            let compact_revision = d.u64()?;
            let meta = Bytes::copy_from_slice(d.bytes()?);
            let dedup = if d.remaining() > 0 {
                Bytes::copy_from_slice(d.bytes()?)
            } else {
                Bytes::new()
            };
            d.end()?;
            Ok(Record::Commit(Commit {
                apply: ApplyState {
                    apply_meta: meta,
                    ..apply
                },
                revision,
                clock_ms,
                compact_revision,
                dedup,
            }))
        }
        REC_BOUNDS => {
            let lo = Bytes::copy_from_slice(d.bytes()?);
            let hi = match d.u8()? {
                0 => None,
                _ => Some(Bytes::copy_from_slice(d.bytes()?)),
            };
            d.end()?;
            Ok(Record::Bounds(Bounds { lo, hi }))
        }
        _ => Err(corrupt("unknown tag")),
    }
}

/// Reads the value of the mutation record at `pos` (no copy beyond the seglog read).
pub(crate) fn read_value(log: &SegLog, pos: Position) -> Result<Bytes> {
    let buf = log.read(pos)?;
    let len = match decode(&buf)? {
        Record::Mutation(m) => m.value.len(),
        _ => {
            return Err(KvError::Corrupt {
                what: "data-log record",
                why: format!("record at {pos} is not a mutation"),
            })
        }
    };
    let all = Bytes::from(buf);
    Ok(all.slice(all.len() - len..))
}

/// The data log of a persistent store and what it knows about durability.
#[derive(Debug)]
pub(crate) struct DataLog {
    pub(crate) log: Arc<SegLog>,
    /// Applied index of the last appended `COMMIT`.
    pub(crate) last_commit: ApplyState,
    /// The apply state of the last `COMMIT` known durable.
    pub(crate) durable: ApplyState,
    /// Request-id table records since the last `COMMIT` (the apply path pushes every record
    /// the table makes: a store with a data log always journals).
    pub(crate) journal: Journal,
}

/// Replays `log` into a fresh state (module doc). Cuts a trailing group without `COMMIT`.
pub(crate) fn recover(log: &SegLog) -> Result<State> {
    let mut st = State::default();
    let mut group: Vec<(Position, Replay)> = Vec::new();
    for item in log.iter(log.first()) {
        let (pos, buf) = item?;
        // Decoding every record up front reports corruption even in an uncommitted tail.
        // Only what replay needs is kept, never a value: a compaction's group holds the
        // whole live data set, and its payloads would sit in memory until its `COMMIT`.
        let c = match decode(&buf)? {
            Record::Commit(c) => c,
            Record::Mutation(m) => {
                group.push((
                    pos,
                    Replay::Mutation {
                        origin: m.origin,
                        kind: m.kind,
                        key: Bytes::copy_from_slice(m.key),
                        meta: m.meta,
                    },
                ));
                continue;
            }
            Record::Bounds(b) => {
                group.push((pos, Replay::Bounds(b)));
                continue;
            }
        };
        for (p, r) in group.drain(..) {
            replay_one(&mut st, p, r);
        }
        st.dedup.replay_payload(&c.dedup)?;
        st.apply = c.apply;
        st.revision = c.revision;
        st.clock_ms = c.clock_ms;
        st.drop_history_upto(c.compact_revision);
        st.compact_revision = c.compact_revision;
    }
    if let Some((first, _)) = group.first() {
        // A group cut by a crash: never applied, never reported durable.
        log.truncate(*first)?;
    }
    // Checksums say the records are intact, not that their fields are sane: the next write
    // must not overflow a counter recovered from disk.
    st.validate("data log")?;
    Ok(st)
}

/// A record of the group being recovered, as replay needs it: decoded, without the value
/// (values stay in the log; the index points at the record).
enum Replay {
    Mutation {
        origin: Origin,
        kind: EventKind,
        key: Bytes,
        meta: Meta,
    },
    Bounds(Bounds),
}

fn replay_one(st: &mut State, pos: Position, r: Replay) {
    match r {
        Replay::Mutation {
            origin,
            kind,
            key,
            meta,
        } => {
            let vref = match kind {
                EventKind::Put => ValueRef::Disk(pos),
                EventKind::Delete => ValueRef::Inline(Bytes::new()),
            };
            if origin != Origin::HistCopy {
                install(st, &key, kind, meta, vref.clone());
            }
            st.insert_hist(
                meta.mod_revision,
                key,
                Hist {
                    kind,
                    meta,
                    value: vref,
                },
            );
        }
        Replay::Bounds(b) => st.restrict(b),
    }
}

/// Sets the index entry of `key` as replay finds it (no history, no events).
fn install(st: &mut State, key: &Bytes, kind: EventKind, meta: Meta, value: ValueRef) {
    if let Some(prev) = st.index.remove(&key[..]) {
        st.live_bytes = st
            .live_bytes
            .saturating_sub(key.len() as u64 + u64::from(prev.meta.value_len));
        if prev.meta.expires_at_ms != 0 {
            st.expiry.remove(&(prev.meta.expires_at_ms, key.clone()));
        }
    }
    if kind == EventKind::Put {
        st.live_bytes += key.len() as u64 + u64::from(meta.value_len);
        if meta.expires_at_ms != 0 {
            st.expiry.insert((meta.expires_at_ms, key.clone()));
        }
        st.index.insert(IndexKey::new(key), Entry { meta, value });
    }
}

impl DataLog {
    /// A `COMMIT` of `st` carrying the request-id records since the previous one.
    pub(crate) fn encode_commit(&mut self, st: &State) -> Vec<u8> {
        encode_commit(st, &self.journal.take_payload(&st.dedup, false))
    }

    /// A `COMMIT` of `st` carrying the whole request-id table (the records before it may be
    /// dropped).
    pub(crate) fn encode_commit_image(&mut self, st: &State) -> Vec<u8> {
        encode_commit(st, &self.journal.take_payload(&st.dedup, true))
    }

    /// Appends the group of one applied command: its mutations, then a `COMMIT`; then points
    /// the index and history at the records (the values leave memory).
    pub(crate) fn append_group(&mut self, st: &mut State, changes: &[Change]) -> Result<()> {
        let mut recs: Vec<Vec<u8>> = changes
            .iter()
            .map(|c| encode_mutation(Origin::Original, c.kind, &c.key, &c.meta, &c.value))
            .collect();
        recs.push(self.encode_commit(st));
        let positions = self.log.append_batch(recs.iter().map(Vec::as_slice))?;
        for (c, pos) in changes.iter().zip(positions) {
            if c.kind != EventKind::Put {
                continue;
            }
            let rev = c.meta.mod_revision;
            if let Some(e) = st.index.get_mut(&c.key[..]) {
                if e.meta.mod_revision == rev {
                    e.value = ValueRef::Disk(pos);
                }
            }
            if let Some(h) = st.history.get_mut(&(rev, c.key.clone())) {
                h.value = ValueRef::Disk(pos);
            }
        }
        self.last_commit = st.apply.clone();
        Ok(())
    }

    /// Appends a `COMMIT` if the state moved since the last one, syncs, and returns the durable
    /// apply state.
    pub(crate) fn persist(&mut self, st: &State) -> Result<ApplyState> {
        if self.last_commit != st.apply {
            let rec = self.encode_commit(st);
            self.log.append(&rec)?;
            self.last_commit = st.apply.clone();
        }
        self.log.sync()?;
        self.durable = self.last_commit.clone();
        Ok(self.durable.clone())
    }

    /// Bytes used by sealed segments (for the compaction trigger).
    pub(crate) fn sealed_bytes(&self) -> (usize, u64) {
        let segs = self.log.segments();
        let n = segs.len().saturating_sub(1);
        (n, segs.iter().take(n).map(|s| s.used).sum())
    }

    /// Compaction: copies the records of every sealed segment that the index or the history
    /// still references to the end of the log, closes the group with `BOUNDS` + `COMMIT`,
    /// syncs, then deletes the sealed segments. Returns how many segments were dropped.
    ///
    /// Locking: the caller owns the store (`&mut`), so no apply runs meanwhile. The copy phase
    /// (reading sealed segments, appending copies) holds only the *read* lock, so readers go
    /// on; the write lock is taken briefly to move the references to the copies. Readers that
    /// took an old position before that and read it after the segments are deleted retry.
    ///
    /// Crash analysis: before the sync the copies are an uncommitted tail (cut on recovery) and
    /// the old segments are intact; after it the copies are durable, so deleting the old
    /// segments loses nothing the state references.
    pub(crate) fn compact(
        &mut self,
        lock: &RwLock<State>,
        pins: &std::sync::atomic::AtomicUsize,
    ) -> Result<u64> {
        let segs = self.log.segments();
        let Some(active) = segs.last().map(|s| s.number) else {
            return Ok(0);
        };
        if segs.len() < 2 {
            return Ok(0);
        }
        let mut moves: Vec<Move> = Vec::new();
        {
            let st = lock.read();
            let mut batch: Vec<(Position, Vec<u8>)> = Vec::new();
            let mut batch_bytes = 0usize;
            for item in self.log.iter(self.log.first()) {
                let (pos, buf) = item?;
                if pos.segment >= active {
                    break;
                }
                let Record::Mutation(m) = decode(&buf)? else {
                    continue;
                };
                let key = Bytes::copy_from_slice(m.key);
                let hist_ref = st.history.get(&(m.meta.mod_revision, key.clone()));
                let in_hist = match (m.kind, hist_ref) {
                    (EventKind::Put, Some(h)) => h.value == ValueRef::Disk(pos),
                    (EventKind::Delete, Some(h)) => h.kind == EventKind::Delete,
                    (_, None) => false,
                };
                let live = m.kind == EventKind::Put
                    && st
                        .index
                        .get(&key[..])
                        .is_some_and(|e| e.value == ValueRef::Disk(pos));
                let origin = if live {
                    Origin::LiveCopy
                } else if in_hist {
                    Origin::HistCopy
                } else {
                    continue;
                };
                batch.push((
                    pos,
                    encode_mutation(origin, m.kind, m.key, &m.meta, m.value),
                ));
                batch_bytes += batch.last().map_or(0, |(_, r)| r.len());
                // Bounded in records and bytes: the copies are in memory until appended.
                if batch.len() >= 256 || batch_bytes >= COPY_BATCH_BYTES {
                    self.copy(&mut batch, &mut moves)?;
                    batch_bytes = 0;
                }
            }
            self.copy(&mut batch, &mut moves)?;
        }
        {
            let mut st = lock.write();
            for Move { old, new, key, rev } in moves {
                if let Some(e) = st.index.get_mut(&key[..]) {
                    if e.value == ValueRef::Disk(old) {
                        e.value = ValueRef::Disk(new);
                    }
                }
                if let Some(h) = st.history.get_mut(&(rev, key)) {
                    if h.value == ValueRef::Disk(old) {
                        h.value = ValueRef::Disk(new);
                    }
                }
            }
            let mut tail = Vec::new();
            if st.bounds != Bounds::default() {
                tail.push(encode_bounds(&st.bounds));
            }
            tail.push(self.encode_commit_image(&st));
            self.log.append_batch(tail.iter().map(Vec::as_slice))?;
            self.last_commit = st.apply.clone();
        }
        self.log.sync()?;
        self.durable = self.last_commit.clone();
        // A snapshot pins its positions before it takes the read lock to capture them: with
        // the write lock held and no pin, no snapshot can hold a position in the old segments.
        // Otherwise they stay (garbage now) until the next compaction.
        let _guard = lock.write();
        if pins.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Ok(0);
        }
        Ok(self.log.drop_segments_before(active)?)
    }

    /// Appends a batch of copies and records where the puts moved.
    fn copy(&mut self, batch: &mut Vec<(Position, Vec<u8>)>, moves: &mut Vec<Move>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let positions = self
            .log
            .append_batch(batch.iter().map(|(_, b)| b.as_slice()))?;
        for ((old, buf), new) in batch.drain(..).zip(positions) {
            if let Record::Mutation(m) = decode(&buf)? {
                if m.kind == EventKind::Put {
                    moves.push(Move {
                        old,
                        new,
                        key: Bytes::copy_from_slice(m.key),
                        rev: m.meta.mod_revision,
                    });
                }
            }
        }
        Ok(())
    }

    /// Rewrites the whole log from `st` (restore): empties it, appends every live version and
    /// history event, then `BOUNDS` + `COMMIT`, syncs. `Inline` values move to disk.
    pub(crate) fn rewrite_all(&mut self, st: &mut State) -> Result<()> {
        self.log.truncate(self.log.first())?;
        let mut pending: Vec<Pending> = st
            .index
            .keys()
            .map(|k| Pending::Live(k.to_bytes()))
            .chain(st.history.keys().map(|(r, k)| Pending::Hist(*r, k.clone())))
            .collect();
        self.spill(st, &mut pending)?;
        self.close_group(st)
    }

    /// Appends the entries named in `pending` whose values are still `Inline` (as `LIVE_COPY`
    /// or `HIST_COPY` records) and points them at their records. A history put that is its
    /// key's live version shares the live record. Does not close the group.
    pub(crate) fn spill(&mut self, st: &mut State, pending: &mut Vec<Pending>) -> Result<()> {
        for part in std::mem::take(pending).chunks(256) {
            let mut recs = Vec::with_capacity(part.len());
            let mut targets = Vec::with_capacity(part.len());
            for p in part {
                match p {
                    Pending::Live(k) => {
                        if let Some(Entry {
                            meta,
                            value: ValueRef::Inline(v),
                        }) = st.index.get(&k[..])
                        {
                            recs.push(encode_mutation(
                                Origin::LiveCopy,
                                EventKind::Put,
                                k,
                                meta,
                                v,
                            ));
                            targets.push(p.clone());
                        }
                    }
                    Pending::Hist(rev, k) => {
                        let live = st.index.get(&k[..]).filter(|e| e.meta.mod_revision == *rev);
                        let Some(h) = st.history.get(&(*rev, k.clone())) else {
                            continue;
                        };
                        if h.kind == EventKind::Put {
                            if let Some(e) = live {
                                let v = e.value.clone();
                                if let ValueRef::Disk(_) = v {
                                    if let Some(h) = st.history.get_mut(&(*rev, k.clone())) {
                                        h.value = v;
                                    }
                                    continue;
                                }
                                // The live record is in this part or a later one: share it
                                // after it is written (below).
                                targets.push(p.clone());
                                recs.push(Vec::new());
                                continue;
                            }
                        }
                        if let ValueRef::Inline(v) = &h.value {
                            recs.push(encode_mutation(Origin::HistCopy, h.kind, k, &h.meta, v));
                            targets.push(p.clone());
                        }
                    }
                }
            }
            let real: Vec<&[u8]> = recs
                .iter()
                .filter(|r| !r.is_empty())
                .map(Vec::as_slice)
                .collect();
            let mut positions = self.log.append_batch(real)?.into_iter();
            let mut shared_later = Vec::new();
            for (t, r) in targets.into_iter().zip(&recs) {
                if r.is_empty() {
                    shared_later.push(t);
                    continue;
                }
                let Some(pos) = positions.next() else { break };
                match t {
                    Pending::Live(k) => {
                        if let Some(e) = st.index.get_mut(&k[..]) {
                            e.value = ValueRef::Disk(pos);
                        }
                    }
                    Pending::Hist(rev, k) => {
                        if let Some(h) = st.history.get_mut(&(rev, k)) {
                            if h.kind == EventKind::Put {
                                h.value = ValueRef::Disk(pos);
                            }
                        }
                    }
                }
            }
            for t in shared_later {
                if let Pending::Hist(rev, k) = t {
                    let v = st.index.get(&k[..]).map(|e| e.value.clone());
                    match (v, st.history.get_mut(&(rev, k.clone()))) {
                        (Some(v @ ValueRef::Disk(_)), Some(h)) => h.value = v,
                        _ => pending.push(Pending::Hist(rev, k)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Closes a rewrite group with `BOUNDS` (if any) and `COMMIT`, and syncs.
    pub(crate) fn close_group(&mut self, st: &State) -> Result<()> {
        let mut tail = Vec::new();
        if st.bounds != Bounds::default() {
            tail.push(encode_bounds(&st.bounds));
        }
        tail.push(self.encode_commit_image(st));
        self.log.append_batch(tail.iter().map(Vec::as_slice))?;
        self.log.sync()?;
        self.last_commit = st.apply.clone();
        self.durable = self.last_commit.clone();
        Ok(())
    }
}

/// Compaction appends its copies in batches of at most this many bytes (or 256 records).
const COPY_BATCH_BYTES: usize = 1 << 20;

/// A record copied by compaction: references to `old` move to `new`.
struct Move {
    old: Position,
    new: Position,
    key: Bytes,
    rev: u64,
}

/// An entry whose value may still need to reach the data log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// The live entry of a key.
    Live(Bytes),
    /// The history event `(revision, key)`.
    Hist(u64, Bytes),
}
