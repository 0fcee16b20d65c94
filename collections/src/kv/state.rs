//! The in-memory state of one KV store: key index, TTL index, watch history, counters.
//!
//! The same structure serves every persistence mode; only [`ValueRef`] differs: `Inline`
//! values (memory and logged modes, and persistent mode until the command's records are
//! appended) or `Disk` positions in the data log (persistent mode), so the index of a
//! persistent store holds no values.
//!
//! Nothing here does I/O: values behind `Disk` positions are loaded by a [`Loader`] the caller
//! passes in.

use std::collections::{btree_map, BTreeSet};
use std::ops::Bound;

use bytes::Bytes;
use seglog::Position;

use crate::error::{KvError, Result};
use crate::kv::dedup::DedupTable;
use crate::kv::key::IndexKey;
use crate::kv::tracked::Tracked;
use crate::kv::types::{ApplyState, Bounds, Event, EventKind, KeyValue, RangeStats};

/// Where a value lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ValueRef {
    /// In memory.
    Inline(Bytes),
    /// In the record at this position of the data log.
    Disk(Position),
}

/// Loads the bytes behind a [`ValueRef`].
pub(crate) type Loader<'a> = &'a dyn Fn(&ValueRef) -> Result<Bytes>;

/// Loader for stores without a data log.
pub(crate) fn inline_only(v: &ValueRef) -> Result<Bytes> {
    match v {
        ValueRef::Inline(b) => Ok(b.clone()),
        ValueRef::Disk(_) => Err(KvError::Corrupt {
            what: "index",
            why: "disk value in a store without a data log".into(),
        }),
    }
}

/// The largest revision a store reaches: `revision + 1` (the next revision, where a watch
/// resumes) must stay representable. A write that would go past it is refused
/// ([`KvError::CounterExhausted`]); an image or data log beyond it is refused on restore and
/// recovery ([`KvError::InvalidField`]).
pub const MAX_REVISION: u64 = u64::MAX - 1;

/// Per-version metadata (etcd's, plus the TTL deadline and the value length).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) create_revision: u64,
    pub(crate) mod_revision: u64,
    pub(crate) version: u64,
    pub(crate) expires_at_ms: u64,
    pub(crate) value_len: u32,
}

impl Meta {
    pub(crate) fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && self.expires_at_ms <= now_ms
    }
}

/// A live key's entry in the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) meta: Meta,
    pub(crate) value: ValueRef,
}

/// One event of the watch history (keyed by `(revision, key)`). For a delete, `meta` has
/// `mod_revision` = the delete's revision and `value` is empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hist {
    pub(crate) kind: EventKind,
    pub(crate) meta: Meta,
    pub(crate) value: ValueRef,
}

/// One mutation made by the command being applied (for the data log and the subscribers).
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) key: Bytes,
    pub(crate) kind: EventKind,
    pub(crate) meta: Meta,
    pub(crate) value: Bytes,
}

impl Change {
    pub(crate) fn into_event(self) -> Event {
        let m = self.meta;
        Event {
            kind: self.kind,
            kv: KeyValue {
                key: self.key,
                value: self.value,
                create_revision: m.create_revision,
                mod_revision: m.mod_revision,
                version: m.version,
                expires_at_ms: m.expires_at_ms,
            },
        }
    }
}

pub(crate) fn kv_of(key: &Bytes, meta: &Meta, value: Bytes) -> KeyValue {
    KeyValue {
        key: key.clone(),
        value,
        create_revision: meta.create_revision,
        mod_revision: meta.mod_revision,
        version: meta.version,
        expires_at_ms: meta.expires_at_ms,
    }
}

pub(crate) fn kv_event(key: &Bytes, kind: EventKind, meta: &Meta, value: Bytes) -> Event {
    Event {
        kind,
        kv: kv_of(key, meta, value),
    }
}

/// A key range `[start, end)`; `end` `None` = unbounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// Inclusive start.
    pub start: Bytes,
    /// Exclusive end.
    pub end: Option<Bytes>,
}

impl KeyRange {
    /// Exactly one key.
    pub fn key(key: impl Into<Bytes>) -> Self {
        let start: Bytes = key.into();
        let mut end = start.to_vec();
        end.push(0);
        KeyRange {
            start,
            end: Some(Bytes::from(end)),
        }
    }
    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let start: Bytes = prefix.into();
        let end = crate::kv::types::prefix_end(&start);
        KeyRange { start, end }
    }
    /// Every key.
    pub fn all() -> Self {
        KeyRange {
            start: Bytes::new(),
            end: None,
        }
    }
    /// etcd style: `range_end` empty = the single key `key`; `range_end` = `"\0"` = every
    /// key from `key` on.
    pub fn etcd(key: Bytes, range_end: Bytes) -> Self {
        if range_end.is_empty() {
            KeyRange::key(key)
        } else if range_end.as_ref() == [0] {
            KeyRange {
                start: key,
                end: None,
            }
        } else {
            KeyRange {
                start: key,
                end: Some(range_end),
            }
        }
    }
    /// Whether the range holds `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_ref() && self.end.as_ref().is_none_or(|e| key < e.as_ref())
    }
    pub(crate) fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        (
            Bound::Included(self.start.as_ref()),
            match &self.end {
                Some(e) => Bound::Excluded(e.as_ref()),
                None => Bound::Unbounded,
            },
        )
    }
    /// Whether the range holds no key (`end` at or below `start`).
    pub fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|e| e <= &self.start)
    }
}

/// The whole mutable state of a store.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) index: Tracked<IndexKey, Entry>,
    /// `(expires_at_ms, key)` of every live key with a TTL.
    pub(crate) expiry: BTreeSet<(u64, Bytes)>,
    pub(crate) history: Tracked<(u64, Bytes), Hist>,
    pub(crate) revision: u64,
    pub(crate) compact_revision: u64,
    /// The entry clock: the largest `now_ms` of any applied entry.
    pub(crate) clock_ms: u64,
    pub(crate) apply: ApplyState,
    pub(crate) bounds: Bounds,
    /// Bytes of live keys plus values.
    pub(crate) live_bytes: u64,
    /// Bytes of keys plus values in `history` (for the byte cap).
    pub(crate) history_bytes: u64,
    /// Replies of recent writes by request id (`dedup.rs`).
    pub(crate) dedup: DedupTable,
}

/// Checks the store-wide counters of a restored or recovered state (`what`: `"snapshot"`,
/// `"data log"`): revision <= [`MAX_REVISION`], compact revision <= revision, bounds not empty.
pub(crate) fn check_counters(
    what: &'static str,
    revision: u64,
    compact_revision: u64,
    bounds: &Bounds,
) -> Result<()> {
    if revision > MAX_REVISION {
        return Err(KvError::field(
            what,
            "revision",
            format!("{revision} is above the maximum {MAX_REVISION}"),
        ));
    }
    if compact_revision > revision {
        return Err(KvError::field(
            what,
            "compact_revision",
            format!("{compact_revision} is above the revision {revision}"),
        ));
    }
    if bounds.hi.as_ref().is_some_and(|hi| *hi <= bounds.lo) {
        return Err(KvError::field(
            what,
            "bounds.hi",
            "not above bounds.lo: the store would hold no key",
        ));
    }
    Ok(())
}

/// Checks one version of a key (a live entry, `in_history` false, or a history event) against
/// the counters of its state: what any sequence of applies produces, so that the next write
/// to the key cannot overflow and revisions never go back.
///
/// - the key is non-empty and inside the bounds;
/// - `1 <= mod_revision <= revision`; a history event lies above the compact revision;
/// - a put: `1 <= create_revision <= mod_revision` and
///   `1 <= version <= mod_revision - create_revision + 1` (each put takes its own revision);
/// - a delete event: no create revision, version, deadline or value.
pub(crate) fn check_version(
    what: &'static str,
    st: &State,
    key: &[u8],
    kind: EventKind,
    m: &Meta,
    in_history: bool,
) -> Result<()> {
    let (f_key, f_mod, f_create, f_version, f_expires, f_value) = if in_history {
        (
            "event.key",
            "event.mod_revision",
            "event.create_revision",
            "event.version",
            "event.expires_at_ms",
            "event.value",
        )
    } else {
        (
            "kv.key",
            "kv.mod_revision",
            "kv.create_revision",
            "kv.version",
            "kv.expires_at_ms",
            "kv.value",
        )
    };
    let bad = |field: &'static str, why: String| Err(KvError::field(what, field, why));
    if key.is_empty() {
        return bad(f_key, "empty".into());
    }
    if !st.bounds.contains(key) {
        return bad(f_key, "outside the store's bounds".into());
    }
    let (rev, create, version) = (m.mod_revision, m.create_revision, m.version);
    if rev == 0 || rev > st.revision {
        return bad(
            f_mod,
            format!("{rev} is outside 1..={} (the revision)", st.revision),
        );
    }
    if in_history && rev <= st.compact_revision {
        return bad(
            f_mod,
            format!(
                "{rev} is at or below the compact revision {}",
                st.compact_revision
            ),
        );
    }
    match kind {
        EventKind::Put => {
            if create == 0 || create > rev {
                return bad(
                    f_create,
                    format!("{create} is outside 1..={rev} (the mod revision)"),
                );
            }
            // create >= 1, so no overflow.
            let span = rev - create + 1;
            if version == 0 || version > span {
                return bad(
                    f_version,
                    format!(
                        "{version} is outside 1..={span} (one put per revision from {create} to {rev})"
                    ),
                );
            }
        }
        EventKind::Delete => {
            for (field, v) in [
                (f_create, create),
                (f_version, version),
                (f_expires, m.expires_at_ms),
                (f_value, u64::from(m.value_len)),
            ] {
                if v != 0 {
                    return bad(field, format!("{v} in a delete event (must be 0 / empty)"));
                }
            }
        }
    }
    Ok(())
}

/// What a point read collects under the lock; values are loaded afterwards.
pub(crate) type Collected = Vec<(Bytes, Meta, Option<ValueRef>)>;

impl State {
    /// Takes the next revision; refused (nothing changed) once the revision is
    /// [`MAX_REVISION`]. Counters can come from a snapshot or the data log, so never `+ 1`.
    pub(crate) fn next_revision(&mut self) -> Result<u64> {
        let next = self
            .revision
            .checked_add(1)
            .filter(|r| *r <= MAX_REVISION)
            .ok_or(KvError::CounterExhausted {
                counter: "revision",
                value: self.revision,
            })?;
        self.revision = next;
        Ok(next)
    }

    /// Writes `key` at the next revision; returns the previous entry. If the revision cannot
    /// advance, nothing changes.
    pub(crate) fn put(
        &mut self,
        key: Bytes,
        value: Bytes,
        expires_at_ms: u64,
        changes: &mut Vec<Change>,
    ) -> Result<Option<Entry>> {
        let rev = self.next_revision()?;
        let value_len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        let vref = ValueRef::Inline(value.clone());
        // One search of the index: the entry is replaced in place or inserted. The history,
        // the TTL index and the change share `key`'s buffer (the index keeps a short key
        // inline, see `key.rs`).
        let (meta, prev) = match self.index.entry(IndexKey::new(&key)) {
            btree_map::Entry::Occupied(mut o) => {
                let p = o.get().meta;
                // A version is at most its key's revision span (`check_version` refuses more
                // on restore and recovery; each put adds one to both), so it stays below
                // MAX_REVISION.
                let meta = Meta {
                    create_revision: p.create_revision,
                    mod_revision: rev,
                    version: p.version + 1,
                    expires_at_ms,
                    value_len,
                };
                let prev = o.insert(Entry {
                    meta,
                    value: vref.clone(),
                });
                (meta, Some(prev))
            }
            btree_map::Entry::Vacant(v) => {
                let meta = Meta {
                    create_revision: rev,
                    mod_revision: rev,
                    version: 1,
                    expires_at_ms,
                    value_len,
                };
                v.insert(Entry {
                    meta,
                    value: vref.clone(),
                });
                (meta, None)
            }
        };
        if let Some(p) = &prev {
            self.unlink(&key, &p.meta);
        }
        self.live_bytes += (key.len() + value.len()) as u64;
        if expires_at_ms != 0 {
            self.expiry.insert((expires_at_ms, key.clone()));
        }
        self.insert_hist(
            rev,
            key.clone(),
            Hist {
                kind: EventKind::Put,
                meta,
                value: vref,
            },
        );
        changes.push(Change {
            key,
            kind: EventKind::Put,
            meta,
            value,
        });
        Ok(prev)
    }

    /// Deletes `key` at revision `rev`; returns the removed entry (`None`: nothing happened).
    pub(crate) fn remove(
        &mut self,
        key: &Bytes,
        rev: u64,
        changes: &mut Vec<Change>,
    ) -> Option<Entry> {
        let prev = self.index.remove(&key[..])?;
        self.unlink(key, &prev.meta);
        let meta = Meta {
            mod_revision: rev,
            ..Meta::default()
        };
        self.insert_hist(
            rev,
            key.clone(),
            Hist {
                kind: EventKind::Delete,
                meta,
                value: ValueRef::Inline(Bytes::new()),
            },
        );
        changes.push(Change {
            key: key.clone(),
            kind: EventKind::Delete,
            meta,
            value: Bytes::new(),
        });
        Some(prev)
    }

    fn unlink(&mut self, key: &Bytes, meta: &Meta) {
        self.live_bytes = self
            .live_bytes
            .saturating_sub((key.len() as u64) + u64::from(meta.value_len));
        if meta.expires_at_ms != 0 {
            self.expiry.remove(&(meta.expires_at_ms, key.clone()));
        }
    }

    /// Keys whose TTL passed at `now_ms`, in `(deadline, key)` order.
    pub(crate) fn due(&self, now_ms: u64) -> Vec<Bytes> {
        self.expiry
            .range(..(now_ms.saturating_add(1), Bytes::new()))
            .map(|(_, k)| k.clone())
            .collect()
    }

    fn hist_size(key: &[u8], h: &Hist) -> u64 {
        key.len() as u64 + u64::from(h.meta.value_len)
    }

    /// Adds (or replaces) a history event, keeping `history_bytes` exact.
    pub(crate) fn insert_hist(&mut self, rev: u64, key: Bytes, h: Hist) {
        self.history_bytes += Self::hist_size(&key, &h);
        if let Some(old) = self.history.insert((rev, key.clone()), h) {
            self.history_bytes = self
                .history_bytes
                .saturating_sub(Self::hist_size(&key, &old));
        }
    }

    /// Drops history events at or below `rev` (the horizon is the caller's business).
    pub(crate) fn drop_history_upto(&mut self, rev: u64) {
        if self
            .history
            .first_key_value()
            .is_none_or(|((r, _), _)| *r > rev)
        {
            return;
        }
        // Oldest first, one event at a time: trimming at the caps drops one revision per
        // write, where a `split_off` would build a new tree each time.
        while self
            .history
            .first_key_value()
            .is_some_and(|((r, _), _)| *r <= rev)
        {
            let Some(((_, k), h)) = self.history.pop_first() else {
                break;
            };
            self.history_bytes = self.history_bytes.saturating_sub(Self::hist_size(&k, &h));
        }
    }

    /// Drops history at or below `rev` and moves the horizon there.
    pub(crate) fn compact(&mut self, rev: u64) {
        if rev <= self.compact_revision {
            return;
        }
        self.drop_history_upto(rev);
        self.compact_revision = rev;
    }

    /// Enforces the history caps (events and bytes) by compacting whole revisions, oldest
    /// first (deterministic: it depends only on the applied entries and the replicated
    /// config). The newest revision is always kept whole, even if it alone exceeds a cap.
    pub(crate) fn trim_history(&mut self, max_events: usize, max_bytes: u64) {
        while self.history.len() > max_events || self.history_bytes > max_bytes {
            let Some(((rev, _), _)) = self.history.first_key_value() else {
                break;
            };
            let rev = *rev;
            if rev >= self.revision {
                break;
            }
            self.compact(rev);
        }
    }

    /// A split's right half: moves the keys at or above `at` into `right` (the index tree is
    /// cut, not rebuilt), with their TTL deadlines and their history (one pass), and moves
    /// their bytes from this state's counts to `right`'s. This state keeps its bounds until
    /// [`State::restrict`].
    pub(crate) fn move_right(&mut self, at: &[u8], right: &mut State) {
        right.index = self.index.split_off(at);
        right.live_bytes = right
            .index
            .iter()
            .map(|(k, e)| k.len() as u64 + u64::from(e.meta.value_len))
            .sum();
        self.live_bytes = self.live_bytes.saturating_sub(right.live_bytes);
        let (moved, kept): (BTreeSet<_>, BTreeSet<_>) = std::mem::take(&mut self.expiry)
            .into_iter()
            .partition(|(_, k)| k.as_ref() >= at);
        (right.expiry, self.expiry) = (moved, kept);
        right.history = self.history.extract(|(_, k), _| k.as_ref() >= at);
        right.history_bytes = right
            .history
            .iter()
            .map(|((_, k), h)| Self::hist_size(k, h))
            .sum();
        self.history_bytes = self.history_bytes.saturating_sub(right.history_bytes);
    }

    /// Removes every key outside `bounds` (a split), with its history, without events.
    pub(crate) fn restrict(&mut self, bounds: Bounds) {
        // The index is ordered by key: what lies outside is its two ends, found by two seeks.
        let below = (Bound::Unbounded, Bound::Excluded(&bounds.lo[..]));
        let mut outside: Vec<IndexKey> = self
            .index
            .range::<[u8], _>(below)
            .map(|(k, _)| k.clone())
            .collect();
        if let Some(hi) = &bounds.hi {
            let above = (Bound::Included(&hi[..]), Bound::Unbounded);
            outside.extend(self.index.range::<[u8], _>(above).map(|(k, _)| k.clone()));
        }
        for k in outside {
            if let Some(e) = self.index.remove(&k) {
                self.unlink(&k.to_bytes(), &e.meta);
            }
        }
        // The history is ordered by revision: a pass to count what leaves, one to drop it
        // (`Tracked::retain` may ask its predicate twice per entry, so it counts nothing).
        let removed: u64 = self
            .history
            .iter()
            .filter(|((_, k), _)| !bounds.contains(k))
            .map(|((_, k), h)| Self::hist_size(k, h))
            .sum();
        self.history.retain(|(_, k), _| bounds.contains(k));
        self.history_bytes = self.history_bytes.saturating_sub(removed);
        debug_assert_eq!(
            self.history_bytes,
            self.history
                .iter()
                .map(|((_, k), h)| Self::hist_size(k, h))
                .sum::<u64>(),
            "history_bytes must stay exact (split and restore keep it so)"
        );
        self.bounds = bounds;
    }

    /// The live entry of `key` at `now_ms` (expired keys are invisible).
    pub(crate) fn visible(&self, key: &[u8], now_ms: u64) -> Option<&Entry> {
        self.index.get(key).filter(|e| !e.meta.expired(now_ms))
    }

    /// [`State::visible`] with the stored key.
    pub(crate) fn visible_kv(&self, key: &[u8], now_ms: u64) -> Option<(&IndexKey, &Entry)> {
        self.index
            .get_key_value(key)
            .filter(|(_, e)| !e.meta.expired(now_ms))
    }

    /// Collects a scan page: at most `limit` keys (0 = no limit) and about `max_bytes`
    /// (0 = no bound; at least one key). Returns the page and the next key if more follow.
    pub(crate) fn collect_scan(
        &self,
        range: &KeyRange,
        limit: usize,
        max_bytes: usize,
        keys_only: bool,
        now_ms: u64,
    ) -> (Collected, Option<Bytes>) {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if range.is_empty() {
            return (out, None);
        }
        for (k, e) in self.index.range::<[u8], _>(range.bounds()) {
            if e.meta.expired(now_ms) {
                continue;
            }
            let size = k.len()
                + if keys_only {
                    0
                } else {
                    e.meta.value_len as usize
                };
            let full = (limit != 0 && out.len() >= limit)
                || (max_bytes != 0 && !out.is_empty() && bytes + size > max_bytes);
            if full {
                return (out, Some(k.to_bytes()));
            }
            bytes += size;
            out.push((k.to_bytes(), e.meta, (!keys_only).then(|| e.value.clone())));
        }
        (out, None)
    }

    /// Collects history events with revision `>= from` in `range`: whole revisions only, until
    /// at least `limit` events (0 = no limit). Returns the events and the next revision to ask.
    pub(crate) fn collect_events(
        &self,
        from: u64,
        range: &KeyRange,
        limit: usize,
    ) -> (Vec<(Bytes, Hist)>, u64) {
        let mut out = Vec::new();
        let mut last = None;
        for ((rev, key), h) in self.history.range((from, Bytes::new())..) {
            if limit != 0 && out.len() >= limit && last != Some(*rev) {
                return (out, *rev);
            }
            last = Some(*rev);
            if range.contains(key) {
                out.push((key.clone(), h.clone()));
            }
        }
        (out, self.revision.saturating_add(1))
    }

    /// Checks every field value of a restored or recovered state ([`check_counters`],
    /// [`check_version`] for each live entry and history event).
    pub(crate) fn validate(&self, what: &'static str) -> Result<()> {
        check_counters(what, self.revision, self.compact_revision, &self.bounds)?;
        self.dedup.check_tick(what, self.apply.applied_index)?;
        for (k, e) in &self.index {
            check_version(what, self, k, EventKind::Put, &e.meta, false)?;
        }
        for ((rev, k), h) in &self.history {
            if *rev != h.meta.mod_revision {
                return Err(KvError::field(
                    what,
                    "event.mod_revision",
                    format!("{} filed under revision {rev}", h.meta.mod_revision),
                ));
            }
            check_version(what, self, k, h.kind, &h.meta, true)?;
        }
        Ok(())
    }

    pub(crate) fn stats(&self) -> RangeStats {
        let mut middle_key = None;
        if self.index.len() >= 2 {
            let half = self.live_bytes / 2;
            let mut acc = 0u64;
            for (k, e) in &self.index {
                acc += k.len() as u64 + u64::from(e.meta.value_len);
                if acc >= half {
                    middle_key = Some(k.to_bytes());
                    break;
                }
            }
        }
        RangeStats {
            keys: self.index.len() as u64,
            bytes: self.live_bytes,
            history_events: self.history.len() as u64,
            revision: self.revision,
            compact_revision: self.compact_revision,
            middle_key,
            dedup_clients: self.dedup.clients() as u64,
            dedup_bytes: self.dedup.bytes(),
        }
    }
}

/// Loads the values of collected entries into key-values.
pub(crate) fn load_all(collected: Collected, load: Loader<'_>) -> Result<Vec<KeyValue>> {
    collected
        .into_iter()
        .map(|(k, m, v)| {
            let value = match v {
                Some(v) => load(&v)?,
                None => Bytes::new(),
            };
            Ok(kv_of(&k, &m, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn put_and_remove_track_versions_history_and_bytes() {
        let mut st = State::default();
        let mut ch = Vec::new();
        assert!(st.put(b("a"), b("1"), 0, &mut ch).unwrap().is_none());
        let prev = st.put(b("a"), b("22"), 50, &mut ch).unwrap().unwrap();
        assert_eq!(prev.meta.version, 1);
        let e = st.index.get(&b("a")[..]).unwrap();
        assert_eq!(
            (e.meta.create_revision, e.meta.mod_revision, e.meta.version),
            (1, 2, 2)
        );
        assert_eq!(st.live_bytes, 3);
        assert_eq!(st.due(49).len(), 0);
        assert_eq!(st.due(50), vec![b("a")]);
        let r = st.next_revision().unwrap();
        assert!(st.remove(&b("a"), r, &mut ch).is_some());
        assert!(st.expiry.is_empty() && st.index.is_empty() && st.live_bytes == 0);
        assert_eq!(st.history.len(), 3);
        assert_eq!(ch.len(), 3);
        st.trim_history(1, u64::MAX);
        assert_eq!((st.history.len(), st.compact_revision), (1, 2));
    }

    #[test]
    fn scan_pages_by_limit_and_bytes() {
        let mut st = State::default();
        let mut ch = Vec::new();
        for k in ["a", "b", "c", "d"] {
            st.put(b(k), b("xxxx"), 0, &mut ch).unwrap();
        }
        let (page, next) = st.collect_scan(&KeyRange::all(), 2, 0, false, 0);
        assert_eq!(page.len(), 2);
        assert_eq!(next, Some(b("c")));
        let (page, next) = st.collect_scan(&KeyRange::all(), 0, 6, false, 0);
        assert_eq!((page.len(), next), (1, Some(b("b"))));
        let (page, next) = st.collect_scan(&KeyRange::prefix("c"), 0, 0, true, 0);
        assert_eq!((page.len(), next), (1, None));
    }
}
