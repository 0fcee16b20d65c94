//! Shared helpers of the collections integration tests: stores in every mode, reply decoding,
//! and a plain `BTreeMap` model of the KV semantics.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use collections::kv::{
    cmd, ApplyState, Event, EventKind, KeyRange, KeyValue, KvConfig, KvStore, Persistence,
    Restorer, ScanRequest,
};
use proto::kvpb::{self, Response_oneof_result as Res};

/// The three persistence modes, for tests that run in each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Memory,
    Logged,
    Persistent,
}

pub const MODES: [Mode; 3] = [Mode::Memory, Mode::Logged, Mode::Persistent];

pub fn config(mode: Mode, dir: &Path) -> KvConfig {
    let mut c = KvConfig::with(match mode {
        Mode::Memory => Persistence::Memory,
        Mode::Logged => Persistence::Logged {
            dir: dir.to_path_buf(),
        },
        Mode::Persistent => Persistence::Persistent {
            dir: dir.to_path_buf(),
        },
    });
    // Small segments so tests roll, compact and drop segments.
    c.seglog.segment_size = 256 << 10;
    c.seglog.max_record_size = 200 << 10;
    c.limits.max_value_bytes = 100 << 10;
    c.seglog.sync = seglog::SyncMode::None;
    c
}

/// Restores a snapshot of `src` into `dst`, pushed to a `Restorer` in chunks of `chunk` bytes.
pub fn restore_in_chunks(dst: &mut KvStore, src: &KvStore, chunk: usize) -> ApplyState {
    let mut r = Restorer::new();
    let mut reader = src.snapshot();
    while let Some(c) = reader.next_chunk(chunk).expect("chunk") {
        r.push(&c).expect("push");
    }
    dst.restore(r).expect("restore")
}

pub fn open(mode: Mode, dir: &Path) -> KvStore {
    KvStore::open(config(mode, dir)).expect("open store")
}

/// Applies `c` at the next index and returns the decoded reply.
pub fn apply(store: &mut KvStore, now_ms: u64, c: &kvpb::Command) -> kvpb::Response {
    let index = store.apply_state().applied_index + 1;
    store
        .apply_pb(index, 1, now_ms, &cmd::encode(c))
        .expect("apply")
}

pub fn result(r: &kvpb::Response) -> &Res {
    r.result.as_ref().expect("reply has a result")
}

pub fn all(store: &KvStore, now_ms: u64) -> Vec<KeyValue> {
    store
        .scan_all(ScanRequest::range(KeyRange::all()), now_ms)
        .expect("scan")
}

fn b(v: &[u8]) -> Bytes {
    Bytes::copy_from_slice(v)
}

/// One key in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MEntry {
    pub value: Bytes,
    pub create: u64,
    pub modr: u64,
    pub version: u64,
    pub expires: u64,
}

/// The reference model: a `BTreeMap` and counters, written independently of the store.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub map: BTreeMap<Bytes, MEntry>,
    pub revision: u64,
    pub clock: u64,
    pub events: Vec<Event>,
    /// The history horizon after `CompactHistory` steps.
    pub compact: u64,
}

impl Model {
    fn expired(e: &MEntry, now: u64) -> bool {
        e.expires != 0 && e.expires <= now
    }

    fn del_event(&mut self, key: &Bytes, rev: u64) {
        self.events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.clone(),
                value: Bytes::new(),
                create_revision: 0,
                mod_revision: rev,
                version: 0,
                expires_at_ms: 0,
            },
        });
    }

    fn lazy_expire(&mut self, key: &Bytes) {
        if self
            .map
            .get(key)
            .is_some_and(|e| Self::expired(e, self.clock))
        {
            self.revision += 1;
            self.map.remove(key);
            self.del_event(key, self.revision);
        }
    }

    fn put_raw(&mut self, key: &Bytes, value: &[u8], ttl: u64) {
        self.revision += 1;
        let rev = self.revision;
        let prev = self.map.get(key);
        let e = MEntry {
            value: b(value),
            create: prev.map_or(rev, |p| p.create),
            modr: rev,
            version: prev.map_or(1, |p| p.version + 1),
            expires: if ttl == 0 { 0 } else { self.clock + ttl },
        };
        self.events.push(Event {
            kind: EventKind::Put,
            kv: kv(key, &e),
        });
        self.map.insert(key.clone(), e);
    }

    pub fn tick(&mut self, now: u64) {
        self.clock = self.clock.max(now);
    }

    pub fn put(&mut self, key: &[u8], value: &[u8], ttl: u64) -> Option<KeyValue> {
        let key = b(key);
        self.lazy_expire(&key);
        let prev = self.map.get(&key).map(|e| kv(&key, e));
        self.put_raw(&key, value, ttl);
        prev
    }

    pub fn delete(&mut self, key: &[u8]) -> u64 {
        let key = b(key);
        self.lazy_expire(&key);
        if self.map.remove(&key).is_some() {
            self.revision += 1;
            self.del_event(&key, self.revision);
            1
        } else {
            0
        }
    }

    pub fn delete_range(&mut self, start: &[u8], end: &[u8]) -> u64 {
        let keys: Vec<Bytes> = self
            .map
            .keys()
            .filter(|k| k.as_ref() >= start && k.as_ref() < end)
            .cloned()
            .collect();
        if keys.is_empty() {
            return 0;
        }
        self.revision += 1;
        let mut n = 0;
        for k in keys {
            if let Some(e) = self.map.remove(&k) {
                if !Self::expired(&e, self.clock) {
                    n += 1;
                }
            }
            self.del_event(&k, self.revision);
        }
        n
    }

    /// Returns whether the compare held.
    pub fn cas(
        &mut self,
        key: &[u8],
        target: kvpb::CompareTarget,
        value: &[u8],
        number: u64,
        new: Option<&[u8]>,
    ) -> bool {
        let key = b(key);
        self.lazy_expire(&key);
        let cur = self.map.get(&key);
        let ok = match target {
            kvpb::CompareTarget::VALUE => cur.is_some_and(|e| e.value.as_ref() == value),
            kvpb::CompareTarget::VERSION => cur.map_or(0, |e| e.version) == number,
            kvpb::CompareTarget::MOD_REVISION => cur.map_or(0, |e| e.modr) == number,
            kvpb::CompareTarget::ABSENT => cur.is_none(),
        };
        if ok {
            match new {
                Some(v) => self.put_raw(&key, v, 0),
                None => {
                    if self.map.remove(&key).is_some() {
                        self.revision += 1;
                        self.del_event(&key, self.revision);
                    }
                }
            }
        }
        ok
    }

    pub fn expire(&mut self) -> u64 {
        let due: Vec<Bytes> = self
            .map
            .iter()
            .filter(|(_, e)| Self::expired(e, self.clock))
            .map(|(k, _)| k.clone())
            .collect();
        if due.is_empty() {
            return 0;
        }
        self.revision += 1;
        // Events of one revision are ordered by key in the store's history.
        for k in &due {
            self.map.remove(k);
            self.del_event(k, self.revision);
        }
        due.len() as u64
    }

    pub fn get(&self, key: &[u8], now: u64) -> Option<KeyValue> {
        self.map
            .get(key)
            .filter(|e| !Self::expired(e, now))
            .map(|e| kv(&b(key), e))
    }

    pub fn visible(&self, now: u64) -> Vec<KeyValue> {
        self.map
            .iter()
            .filter(|(_, e)| !Self::expired(e, now))
            .map(|(k, e)| kv(k, e))
            .collect()
    }

    /// Model events sorted the way the store's history orders them: by revision, then key.
    pub fn events_sorted(&self) -> Vec<Event> {
        let mut ev = self.events.clone();
        ev.sort_by(|a, b| (a.revision(), &a.kv.key).cmp(&(b.revision(), &b.kv.key)));
        ev
    }
}

pub fn kv(key: &Bytes, e: &MEntry) -> KeyValue {
    KeyValue {
        key: key.clone(),
        value: e.value.clone(),
        create_revision: e.create,
        mod_revision: e.modr,
        version: e.version,
        expires_at_ms: e.expires,
    }
}

pub fn from_pb(kv: &kvpb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key.clone(),
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        expires_at_ms: kv.expires_at_ms,
    }
}

/// A random workload step, shared by the model, watch, crash and determinism tests.
#[derive(Clone, Debug)]
pub enum Op {
    Put(u8, u8, u64),
    Delete(u8),
    DeleteRange(u8, u8),
    CasValue(u8, u8, Option<u8>),
    CasVersion(u8, u64, Option<u8>),
    CasModRev(u8, u64, Option<u8>),
    CasAbsent(u8, u8),
    Batch(Vec<(u8, u8)>),
    Expire,
    Tick(u64),
    Get(u8),
    /// `Compact` the history to `revision - back % 10`.
    CompactHistory(u8),
}

/// Sixteen keys: eight of 2 bytes (`ka`..`kh`), and eight longer than the index's inline
/// keys (`collections::kv` `key.rs`: up to 23 bytes): `ka`..`kd` followed by 22 `x` and a
/// digit, so two long keys differ only past byte 23, and each short key is a prefix of two
/// long ones.
pub fn key(k: u8) -> Vec<u8> {
    let k = k % 16;
    if k < 8 {
        return vec![b'k', b'a' + k];
    }
    let mut out = vec![b'k', b'a' + (k - 8) / 2];
    out.extend_from_slice(&[b'x'; 22]);
    out.push(b'0' + (k % 2));
    out
}

pub fn val(v: u8, len: usize) -> Vec<u8> {
    let mut out = vec![v; len];
    out.push(v);
    out
}

pub fn op_strategy(value_len: usize) -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let _ = value_len;
    prop_oneof![
        6 => (any::<u8>(), any::<u8>(), prop_oneof![3 => Just(0u64), 1 => 1u64..50]).prop_map(|(k, v, t)| Op::Put(k, v, t)),
        2 => any::<u8>().prop_map(Op::Delete),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::DeleteRange(a, b)),
        1 => (any::<u8>(), any::<u8>(), proptest::option::of(any::<u8>())).prop_map(|(k, v, n)| Op::CasValue(k, v, n)),
        1 => (any::<u8>(), 0u64..4, proptest::option::of(any::<u8>())).prop_map(|(k, v, n)| Op::CasVersion(k, v, n)),
        1 => (any::<u8>(), 0u64..40, proptest::option::of(any::<u8>())).prop_map(|(k, v, n)| Op::CasModRev(k, v, n)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| Op::CasAbsent(k, v)),
        1 => proptest::collection::vec((any::<u8>(), any::<u8>()), 1..4).prop_map(Op::Batch),
        1 => Just(Op::Expire),
        2 => (1u64..30).prop_map(Op::Tick),
        2 => any::<u8>().prop_map(Op::Get),
        1 => any::<u8>().prop_map(Op::CompactHistory),
    ]
}

/// Runs `op` on the store and the model at the model's clock and checks the reply.
pub fn step(store: &mut KvStore, model: &mut Model, op: &Op, vlen: usize) {
    let now = model.clock;
    match op {
        Op::Put(k, v, ttl) => {
            let prev = model.put(&key(*k), &val(*v, vlen), *ttl);
            let r = apply(store, now, &cmd::put(&key(*k), &val(*v, vlen), *ttl));
            let Res::put(p) = result(&r) else {
                panic!("{r:?}")
            };
            // The store returns the previous key even if it had expired only when not removed:
            // after the lazy expiry both have none.
            assert_eq!(p.prev_kv.as_ref().map(from_pb), prev, "prev_kv of {op:?}");
        }
        Op::Delete(k) => {
            let n = model.delete(&key(*k));
            let r = apply(store, now, &cmd::delete(&key(*k), b""));
            let Res::delete(d) = result(&r) else {
                panic!("{r:?}")
            };
            assert_eq!(d.deleted, n, "{op:?}");
        }
        Op::DeleteRange(a, z) => {
            let (a, z) = (key(*a.min(z)), key(*a.max(z)));
            let n = model.delete_range(&a, &z);
            let r = apply(store, now, &cmd::delete(&a, &z));
            let Res::delete(d) = result(&r) else {
                panic!("{r:?}")
            };
            assert_eq!(d.deleted, n, "{op:?}");
        }
        Op::CasValue(k, v, n) => {
            let newv = n.map(|x| val(x, vlen));
            cas_step(
                store,
                model,
                now,
                *k,
                kvpb::CompareTarget::VALUE,
                &val(*v, vlen),
                0,
                newv,
            );
        }
        Op::CasAbsent(k, v) => {
            let newv = Some(val(*v, vlen));
            cas_step(
                store,
                model,
                now,
                *k,
                kvpb::CompareTarget::ABSENT,
                b"",
                0,
                newv,
            );
        }
        Op::CasVersion(k, num, n) | Op::CasModRev(k, num, n) => {
            let target = if matches!(op, Op::CasVersion(..)) {
                kvpb::CompareTarget::VERSION
            } else {
                kvpb::CompareTarget::MOD_REVISION
            };
            let newv = n.map(|x| val(x, vlen));
            let ok = model.cas(&key(*k), target, b"", *num, newv.as_deref());
            let r = apply(
                store,
                now,
                &cmd::cas(&key(*k), target, b"", *num, newv.as_deref()),
            );
            let Res::cas(c) = result(&r) else {
                panic!("{r:?}")
            };
            assert_eq!(c.succeeded, ok, "{op:?}");
        }
        Op::Batch(ops) => {
            let cmds: Vec<_> = ops
                .iter()
                .map(|(k, v)| {
                    model.put(&key(*k), &val(*v, vlen), 0);
                    cmd::put(&key(*k), &val(*v, vlen), 0)
                })
                .collect();
            let r = apply(store, now, &cmd::batch(cmds));
            let Res::batch(bt) = result(&r) else {
                panic!("{r:?}")
            };
            assert_eq!(bt.results.len(), ops.len());
        }
        Op::Expire => {
            let n = model.expire();
            let r = apply(store, now, &cmd::expire(0));
            let Res::expire(e) = result(&r) else {
                panic!("{r:?}")
            };
            assert_eq!(e.expired, n, "{op:?}");
        }
        Op::Tick(d) => {
            model.tick(now + d);
            // An empty entry carries the new clock.
            let index = store.apply_state().applied_index + 1;
            store.apply(index, 1, model.clock, b"").expect("no-op");
        }
        Op::CompactHistory(back) => {
            let target = model.revision.saturating_sub(u64::from(*back % 10));
            model.compact = model.compact.max(target);
            let r = apply(store, now, &cmd::compact(target));
            assert!(matches!(result(&r), Res::compact(_)), "{r:?}");
            assert_eq!(r.get_header().compact_revision, model.compact);
        }
        Op::Get(k) => {
            let (got, _) = store.get(&key(*k), now).expect("get");
            assert_eq!(got, model.get(&key(*k), now), "{op:?}");
            let r = apply(store, now, &cmd::get(&key(*k)));
            let Res::get(g) = result(&r) else {
                panic!("{r:?}")
            };
            assert_eq!(g.kv.as_ref().map(from_pb), model.get(&key(*k), now));
        }
    }
    let h = r_header(store);
    assert_eq!(h, model.revision, "revision after {op:?}");
}

#[allow(clippy::too_many_arguments)]
fn cas_step(
    store: &mut KvStore,
    model: &mut Model,
    now: u64,
    k: u8,
    target: kvpb::CompareTarget,
    value: &[u8],
    number: u64,
    newv: Option<Vec<u8>>,
) {
    let ok = model.cas(&key(k), target, value, number, newv.as_deref());
    let r = apply(
        store,
        now,
        &cmd::cas(&key(k), target, value, number, newv.as_deref()),
    );
    let Res::cas(c) = result(&r) else {
        panic!("{r:?}")
    };
    assert_eq!(c.succeeded, ok, "cas {target:?} on {k}");
}

fn r_header(store: &KvStore) -> u64 {
    store.revision()
}
