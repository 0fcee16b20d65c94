//! [`Tracked`]: an ordered map that snapshots can read while it keeps changing.
//!
//! A snapshot of a store used to copy its whole index and watch history under the read lock:
//! 200 000 entries took 15-40 ms, and the applying thread (the shard of every range on the
//! node) waited for it on every log compaction. A [`Capture`] instead costs one registration.
//! From then on, the first mutation of each key saves the value the key had at the capture
//! (`None`: it had none) in the capture's pre-images, and the capture reads the live map a
//! batch at a time, taking a key's pre-image where there is one. Every mutation needs
//! `&mut Tracked` (under the store's write lock) and every batch is read under the read lock,
//! so each key read is either unchanged since the capture or answered by its pre-image: the
//! capture sees the map exactly as it was.
//!
//! What it costs the writer: nothing while no capture is alive (one check of an empty list);
//! while one is, one pre-image per key changed for the first time. A dropped capture is
//! forgotten at the next mutation (the map then holds its last reference). A map dropped (the
//! store's state replaced by a restore) first hands every live capture the entries it has not
//! saved yet, so those captures still finish with what they started from.
//!
//! Keys at or above a capture's `below` bound are not tracked and not read (the history's
//! events after the captured revision).

use std::collections::{btree_map, BTreeMap, VecDeque};
use std::ops::{Bound, Deref};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

/// What a capture saved: the pre-image of every key changed since it was taken.
#[derive(Debug)]
struct Saved<K, V> {
    /// The value each changed key had at the capture (`None`: absent).
    before: BTreeMap<K, Option<V>>,
    /// Keys at or above are neither tracked nor read.
    below: Option<K>,
    /// The map was dropped: `before` holds every key the capture still needs.
    detached: bool,
}

impl<K: Ord, V> Saved<K, V> {
    fn tracks(&self, key: &K) -> bool {
        self.below.as_ref().is_none_or(|b| key < b)
    }
}

/// A capture's saved entries, shared by the map (which fills them) and the capture (which
/// reads them).
type Shared<K, V> = Arc<Mutex<Saved<K, V>>>;

/// A `BTreeMap` whose mutations preserve, for each live [`Capture`], the entries as they were
/// when it was taken. Reads go through `Deref`; mutations through the methods below.
#[derive(Debug)]
pub(crate) struct Tracked<K: Ord + Clone, V: Clone> {
    map: BTreeMap<K, V>,
    /// Live captures. A mutex so that a capture can register under the store's read lock;
    /// writers own the map and reach it with `get_mut`, without locking.
    captures: Mutex<Vec<Shared<K, V>>>,
}

impl<K: Ord + Clone, V: Clone> Default for Tracked<K, V> {
    fn default() -> Self {
        Tracked {
            map: BTreeMap::new(),
            captures: Mutex::new(Vec::new()),
        }
    }
}

impl<K: Ord + Clone, V: Clone> Deref for Tracked<K, V> {
    type Target = BTreeMap<K, V>;

    fn deref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<'a, K: Ord + Clone, V: Clone> IntoIterator for &'a Tracked<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = btree_map::Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl<K: Ord + Clone, V: Clone> Tracked<K, V> {
    /// Forgets the captures that were dropped; whether any is still alive.
    fn live_captures(&mut self) -> bool {
        let captures = self.captures.get_mut();
        if captures.is_empty() {
            return false;
        }
        // The map's own reference is the last one once the capture was dropped.
        captures.retain(|c| Arc::strong_count(c) > 1);
        !captures.is_empty()
    }

    /// Saves `key`'s current value in every live capture that has none for it yet.
    fn save(&mut self, key: &K) {
        if self.live_captures() {
            self.save_live(key);
        }
    }

    /// [`Tracked::save`] once [`Tracked::live_captures`] has pruned the dropped captures.
    fn save_live(&mut self, key: &K) {
        for c in self.captures.get_mut().iter() {
            let mut c = c.lock();
            if c.tracks(key) {
                if let btree_map::Entry::Vacant(v) = c.before.entry(key.clone()) {
                    v.insert(self.map.get(key).cloned());
                }
            }
        }
    }

    /// [`Tracked::save`] for a key looked up by any form the map's keys borrow as: nothing to
    /// save when it is absent (a change of an absent key through this path changes nothing).
    fn save_existing<Q: Ord + ?Sized>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
    {
        if !self.live_captures() {
            return;
        }
        if let Some((k, _)) = self.map.get_key_value(key) {
            let k = k.clone();
            self.save_live(&k);
        }
    }

    /// Saves every entry for which `pick` holds (before a bulk change).
    fn save_where(&mut self, mut pick: impl FnMut(&K, &V) -> bool) {
        // A capture dropped since the last change would otherwise cost a pass over the map
        // (a split of 22,000 keys spent a third of its time here).
        if !self.live_captures() {
            return;
        }
        let keys: Vec<K> = self
            .map
            .iter()
            .filter(|(k, v)| pick(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            self.save_live(k);
        }
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.save(&key);
        self.map.insert(key, value)
    }

    /// Removes `key` (any form the map's keys borrow as), its value saved first.
    pub(crate) fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.save_existing(key);
        self.map.remove(key)
    }

    /// The entry of `key`, its value saved first (the caller may change or insert it).
    pub(crate) fn entry(&mut self, key: K) -> btree_map::Entry<'_, K, V> {
        self.save(&key);
        self.map.entry(key)
    }

    /// The value of `key` to change in place, saved first.
    pub(crate) fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.save_existing(key);
        self.map.get_mut(key)
    }

    /// Removes and returns the first entry.
    pub(crate) fn pop_first(&mut self) -> Option<(K, V)> {
        if self.live_captures() {
            let key = self.map.first_key_value()?.0.clone();
            self.save_live(&key);
        }
        self.map.pop_first()
    }

    /// Keeps only the entries for which `keep` holds. `keep` may be asked twice about an
    /// entry (once to save it for a live capture), so it must not count or change anything.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.save_where(|k, v| !keep(k, v));
        self.map.retain(|k, v| keep(k, v));
    }

    /// Moves the entries at or above `at` into a new map (a range split's right half),
    /// saved first for live captures like removals. The tree is split, not rebuilt: no
    /// per-entry tree operation without a live capture.
    pub(crate) fn split_off<Q: Ord + ?Sized>(&mut self, at: &Q) -> Tracked<K, V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.save_where(|k, _| k.borrow() >= at);
        Tracked {
            map: self.map.split_off(at),
            captures: Mutex::new(Vec::new()),
        }
    }

    /// Moves the entries for which `pick` holds into a new map, saved first for live
    /// captures like removals. One pass, both maps rebuilt from their sorted runs: linear,
    /// where removing and inserting each moved entry costs a tree walk each. Like
    /// [`Tracked::retain`]'s, `pick` may be asked twice about an entry.
    pub(crate) fn extract(&mut self, mut pick: impl FnMut(&K, &V) -> bool) -> Tracked<K, V> {
        self.save_where(|k, v| pick(k, v));
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for (k, v) in std::mem::take(&mut self.map) {
            if pick(&k, &v) {
                out.push((k, v));
            } else {
                keep.push((k, v));
            }
        }
        self.map = keep.into_iter().collect();
        Tracked {
            map: out.into_iter().collect(),
            captures: Mutex::new(Vec::new()),
        }
    }

    /// Registers a capture of the map as it is now; keys at or above `below` are left out.
    pub(crate) fn capture(&self, below: Option<K>) -> Capture<K, V> {
        let saved = Arc::new(Mutex::new(Saved {
            before: BTreeMap::new(),
            below,
            detached: false,
        }));
        let mut captures = self.captures.lock();
        captures.retain(|c| Arc::strong_count(c) > 1);
        captures.push(saved.clone());
        Capture {
            saved,
            after: None,
            done: false,
            ahead: VecDeque::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone> Drop for Tracked<K, V> {
    /// Hands each live capture the entries it still needs: the map is going away (a restore
    /// replaced the state), and the capture must finish with the map it started from.
    fn drop(&mut self) {
        for c in self.captures.get_mut().drain(..) {
            if Arc::strong_count(&c) == 1 {
                continue;
            }
            let mut c = c.lock();
            let c = &mut *c;
            let upto = match &c.below {
                Some(b) => Bound::Excluded(b),
                None => Bound::Unbounded,
            };
            for (k, v) in self.map.range((Bound::Unbounded, upto)) {
                c.before.entry(k.clone()).or_insert_with(|| Some(v.clone()));
            }
            c.detached = true;
        }
    }
}

/// A point-in-time view of a [`Tracked`] map, read in key order a batch at a time.
#[derive(Debug)]
pub(crate) struct Capture<K, V> {
    saved: Shared<K, V>,
    /// The last key read.
    after: Option<K>,
    done: bool,
    /// Entries read ahead by [`Capture::next`], not yet taken.
    ahead: VecDeque<(K, V)>,
}

impl<K: Ord + Clone, V: Clone> Capture<K, V> {
    /// The next entry in key order; when none is read ahead, reads up to `batch` more from the
    /// map `pick` finds in the state behind `lock`, under its read lock (which the map's
    /// mutations need for writing).
    pub(crate) fn next<S>(
        &mut self,
        lock: &RwLock<S>,
        pick: fn(&S) -> &Tracked<K, V>,
        batch: usize,
    ) -> Option<(K, V)> {
        if self.ahead.is_empty() {
            let mut ahead = std::mem::take(&mut self.ahead);
            self.read(pick(&lock.read()), batch, &mut ahead);
            self.ahead = ahead;
        }
        self.ahead.pop_front()
    }

    /// Appends up to `max` more entries (key order) to `out`; false once everything was read.
    /// `map` must be the map the capture was taken of, or whatever replaced it (a detached
    /// capture no longer reads it), borrowed under the lock that guards its mutations.
    pub(crate) fn read(
        &mut self,
        map: &Tracked<K, V>,
        max: usize,
        out: &mut VecDeque<(K, V)>,
    ) -> bool {
        if self.done {
            return false;
        }
        let saved = self.saved.lock();
        let from = match &self.after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        let upto = match &saved.below {
            Some(b) => Bound::Excluded(b),
            None => Bound::Unbounded,
        };
        let mut live = if saved.detached {
            None
        } else {
            Some(map.map.range((from, upto)).peekable())
        };
        let mut before = saved.before.range((from, Bound::Unbounded)).peekable();
        let mut taken = 0;
        let mut last: Option<&K> = None;
        while taken < max {
            let l = live.as_mut().and_then(|it| it.peek().map(|(k, _)| *k));
            let b = before.peek().map(|(k, _)| *k);
            let (key, value) = match (l, b) {
                (None, None) => break,
                // A key changed since the capture: its pre-image is what the capture saw.
                (Some(lk), Some(bk)) if bk <= lk => {
                    if bk == lk {
                        if let Some(it) = live.as_mut() {
                            it.next();
                        }
                    }
                    let (k, v) = before.next().expect("peeked");
                    (k, v.as_ref())
                }
                (None, Some(_)) => {
                    let (k, v) = before.next().expect("peeked");
                    (k, v.as_ref())
                }
                (Some(_), _) => {
                    let (k, v) = live.as_mut().and_then(|it| it.next()).expect("peeked");
                    (k, Some(v))
                }
            };
            last = Some(key);
            if let Some(v) = value {
                out.push_back((key.clone(), v.clone()));
                taken += 1;
            }
        }
        match last {
            Some(k) => self.after = Some(k.clone()),
            None => self.done = true,
        }
        if taken < max {
            self.done = true;
        }
        !self.done || taken > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(c: &mut Capture<u8, u32>, m: &Tracked<u8, u32>, step: usize) -> Vec<(u8, u32)> {
        let mut out = VecDeque::new();
        for _ in 0..1000 {
            if !c.read(m, step, &mut out) {
                break;
            }
        }
        out.into_iter().collect()
    }

    type Probe = (Capture<u8, u32>, Vec<(u8, u32)>, VecDeque<(u8, u32)>);

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u32),
        Remove(u8),
        Bump(u8),
        PopFirst,
        RetainEven,
        Entry(u8),
        Read(usize),
        Capture,
        DropCapture,
        SplitOff(u8),
        ExtractOdd,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..64, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0u8..64).prop_map(Op::Remove),
            2 => (0u8..64).prop_map(Op::Bump),
            1 => Just(Op::PopFirst),
            1 => Just(Op::RetainEven),
            2 => (0u8..64).prop_map(Op::Entry),
            3 => (1usize..8).prop_map(Op::Read),
            1 => Just(Op::Capture),
            1 => Just(Op::DropCapture),
            1 => (0u8..64).prop_map(Op::SplitOff),
            1 => Just(Op::ExtractOdd),
        ]
    }

    proptest! {
        /// Whatever the map goes through, interleaved with partial reads, each capture reads
        /// exactly the map as it was when taken (the copy taken beside it), `below` applied;
        /// and a map dropped under live captures leaves them able to finish.
        #[test]
        fn captures_read_the_map_as_it_was(
            init in proptest::collection::btree_map(0u8..64, any::<u32>(), 0..40),
            ops in proptest::collection::vec(op(), 0..120),
            below in proptest::option::of(0u8..64),
            drop_map in any::<bool>(),
        ) {
            let mut m: Tracked<u8, u32> = Tracked::default();
            for (k, v) in &init {
                m.insert(*k, *v);
            }
            // (capture, what it must read, what it read so far)
            let mut caps: Vec<Probe> = Vec::new();
            let expect = |m: &Tracked<u8, u32>| -> Vec<(u8, u32)> {
                m.iter()
                    .filter(|(k, _)| below.is_none_or(|b| **k < b))
                    .map(|(k, v)| (*k, *v))
                    .collect()
            };
            caps.push((m.capture(below), expect(&m), VecDeque::new()));
            for op in ops {
                match op {
                    Op::Insert(k, v) => { m.insert(k, v); }
                    Op::Remove(k) => { m.remove(&k); }
                    Op::Bump(k) => { if let Some(v) = m.get_mut(&k) { *v = v.wrapping_add(1); } }
                    Op::PopFirst => { m.pop_first(); }
                    Op::RetainEven => m.retain(|k, v| (*k as u32).wrapping_add(*v).is_multiple_of(2)),
                    Op::Entry(k) => { *m.entry(k).or_insert(7) += 3; }
                    Op::Read(n) => {
                        for (c, _, got) in caps.iter_mut() {
                            c.read(&m, n, got);
                        }
                    }
                    Op::Capture => caps.push((m.capture(below), expect(&m), VecDeque::new())),
                    Op::DropCapture => { if caps.len() > 1 { caps.remove(0); } }
                    Op::SplitOff(at) => {
                        let before: Vec<(u8, u32)> = m.iter().map(|(k, v)| (*k, *v)).collect();
                        let right = m.split_off(&at);
                        let (r, l): (Vec<_>, Vec<_>) = before.into_iter().partition(|(k, _)| *k >= at);
                        prop_assert_eq!(right.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), r);
                        prop_assert_eq!(m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), l);
                    }
                    Op::ExtractOdd => {
                        let before: Vec<(u8, u32)> = m.iter().map(|(k, v)| (*k, *v)).collect();
                        let odd = m.extract(|k, _| k % 2 == 1);
                        let (o, e): (Vec<_>, Vec<_>) = before.into_iter().partition(|(k, _)| k % 2 == 1);
                        prop_assert_eq!(odd.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), o);
                        prop_assert_eq!(m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), e);
                    }
                }
            }
            let replacement: Tracked<u8, u32> = Tracked::default();
            let live = if drop_map {
                drop(m);
                &replacement
            } else {
                &m
            };
            for (c, want, got) in caps.iter_mut() {
                let mut got: Vec<(u8, u32)> = std::mem::take(got).into_iter().collect();
                got.extend(read_all(c, live, 3));
                prop_assert_eq!(&got, want);
            }
        }
    }

    /// Captures cost nothing once dropped: the writer forgets them on its next mutation.
    #[test]
    fn dropped_captures_are_forgotten() {
        let mut m: Tracked<u8, u32> = Tracked::default();
        m.insert(1, 1);
        let c = m.capture(None);
        m.insert(2, 2);
        assert_eq!(c.saved.lock().before.len(), 1);
        drop(c);
        m.insert(3, 3);
        assert!(m.captures.get_mut().is_empty());
    }

    /// Keys at or above `below` are neither saved nor read.
    #[test]
    fn keys_past_below_are_not_saved() {
        let mut m: Tracked<u8, u32> = Tracked::default();
        m.insert(1, 1);
        let mut c = m.capture(Some(5));
        for k in 5..50 {
            m.insert(k, 0);
        }
        assert!(c.saved.lock().before.is_empty());
        assert_eq!(read_all(&mut c, &m, 2), vec![(1, 1)]);
    }
}
