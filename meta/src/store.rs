//! [`MetaStore`]: a revisioned KV whose only write is a guarded transaction.
//!
//! Every successful transaction with at least one op bumps the store revision by one; each
//! key it puts gets that revision as `mod_revision` (and as `create_revision` if it was
//! absent) and its `version` incremented. A delete removes the key (its version is 0 again).

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use proto::metapb::{Compare_Target, Record, StoreImage, Txn, TxnResult, WriteOp_oneof_op};

use crate::error::MetaError;

/// One stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
}

/// The meta store. Cheap reads, deterministic writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaStore {
    revision: u64,
    map: BTreeMap<Bytes, Entry>,
}

impl MetaStore {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The revision of the last successful write.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    /// Every key starting with `prefix`, ascending.
    pub fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a Bytes, &'a Entry)> + 'a {
        self.map
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The first key strictly after `key` (one seek).
    pub fn seek_after(&self, key: &[u8]) -> Option<(&Bytes, &Entry)> {
        self.map
            .range::<[u8], _>((Bound::Excluded(key), Bound::Unbounded))
            .next()
    }

    /// Check `txn`'s compares and, if all hold, apply its ops at a new revision.
    pub fn apply(&mut self, txn: &Txn) -> TxnResult {
        let mut r = TxnResult::new();
        for (i, c) in txn.compares.iter().enumerate() {
            let e = self.map.get(&c.key[..]);
            let actual = match c.target {
                Compare_Target::VERSION => e.map_or(0, |e| e.version),
                Compare_Target::MOD_REVISION => e.map_or(0, |e| e.mod_revision),
            };
            if actual != c.value {
                r.succeeded = false;
                r.revision = self.revision;
                r.failed_compare = i as u32;
                return r;
            }
        }
        let writes = txn.ops.iter().filter(|o| o.op.is_some()).count();
        if writes > 0 {
            // Cannot overflow: a store starts at 0 and `from_image` refuses u64::MAX.
            let rev = self.revision + 1;
            for op in &txn.ops {
                match &op.op {
                    Some(WriteOp_oneof_op::put(p)) => {
                        let key = Bytes::copy_from_slice(&p.key);
                        let value = Bytes::copy_from_slice(&p.value);
                        match self.map.get_mut(&key) {
                            Some(e) => {
                                e.value = value;
                                e.mod_revision = rev;
                                e.version += 1;
                            }
                            None => {
                                self.map.insert(
                                    key,
                                    Entry {
                                        value,
                                        create_revision: rev,
                                        mod_revision: rev,
                                        version: 1,
                                    },
                                );
                            }
                        }
                    }
                    Some(WriteOp_oneof_op::delete(d)) => {
                        self.map.remove(&d.key[..]);
                    }
                    None => {}
                }
            }
            self.revision = rev;
        }
        r.succeeded = true;
        r.revision = self.revision;
        r
    }

    /// The whole store as one message.
    pub fn image(&self) -> StoreImage {
        let mut img = StoreImage::new();
        img.revision = self.revision;
        for (k, e) in &self.map {
            let mut r = Record::new();
            r.key = k.clone();
            r.value = e.value.clone();
            r.create_revision = e.create_revision;
            r.mod_revision = e.mod_revision;
            r.version = e.version;
            img.records.push(r);
        }
        img
    }

    /// Rebuild a store from [`MetaStore::image`].
    ///
    /// # Errors
    /// [`MetaError::Corrupt`] if the image's revision is `u64::MAX` (the next write could not
    /// advance it), a record claims a revision above the image's, revisions out of order, a
    /// version that more writes than its revisions allow, or a key twice. These bounds are what
    /// make [`MetaStore::apply`]'s `revision + 1` and `version + 1` unable to overflow.
    pub fn from_image(img: &StoreImage) -> Result<Self, MetaError> {
        if img.revision == u64::MAX {
            return Err(MetaError::Corrupt {
                key: String::new(),
                why: "image revision is u64::MAX".into(),
            });
        }
        let mut map = BTreeMap::new();
        for r in img.records.iter() {
            if r.mod_revision > img.revision
                || r.create_revision == 0
                || r.create_revision > r.mod_revision
                || r.version == 0
                || r.version > r.mod_revision - r.create_revision + 1
            {
                return Err(MetaError::Corrupt {
                    key: String::from_utf8_lossy(&r.key).into_owned(),
                    why: "revisions out of order".into(),
                });
            }
            let prev = map.insert(
                r.key.clone(),
                Entry {
                    value: r.value.clone(),
                    create_revision: r.create_revision,
                    mod_revision: r.mod_revision,
                    version: r.version,
                },
            );
            if prev.is_some() {
                return Err(MetaError::Corrupt {
                    key: String::from_utf8_lossy(&r.key).into_owned(),
                    why: "key present twice".into(),
                });
            }
        }
        Ok(MetaStore {
            revision: img.revision,
            map,
        })
    }
}

/// Builders for transactions.
pub mod txn {
    use proto::metapb::{Compare, Compare_Target, Delete, Put, Txn, WriteOp};

    /// Guard: `key`'s version equals `version` (0: absent).
    pub fn version_is(t: &mut Txn, key: &[u8], version: u64) {
        let mut c = Compare::new();
        c.key = key.to_vec().into();
        c.target = Compare_Target::VERSION;
        c.value = version;
        t.compares.push(c);
    }

    /// Guard: `key`'s mod revision equals `rev` (0: absent).
    pub fn mod_revision_is(t: &mut Txn, key: &[u8], rev: u64) {
        let mut c = Compare::new();
        c.key = key.to_vec().into();
        c.target = Compare_Target::MOD_REVISION;
        c.value = rev;
        t.compares.push(c);
    }

    /// Op: put `value` at `key`.
    pub fn put(t: &mut Txn, key: &[u8], value: Vec<u8>) {
        let mut p = Put::new();
        p.key = key.to_vec().into();
        p.value = value.into();
        let mut o = WriteOp::new();
        o.set_put(p);
        t.ops.push(o);
    }

    /// Op: delete `key`.
    pub fn delete(t: &mut Txn, key: &[u8]) {
        let mut d = Delete::new();
        d.key = key.to_vec().into();
        let mut o = WriteOp::new();
        o.set_delete(d);
        t.ops.push(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(k: &[u8], v: &[u8]) -> Txn {
        let mut t = Txn::new();
        txn::put(&mut t, k, v.to_vec());
        t
    }

    #[test]
    fn revisions_and_versions() {
        let mut s = MetaStore::new();
        assert!(s.apply(&put(b"a", b"1")).succeeded);
        assert!(s.apply(&put(b"a", b"2")).succeeded);
        let e = s.get(b"a").cloned().unwrap();
        assert_eq!((e.create_revision, e.mod_revision, e.version), (1, 2, 2));
        let mut t = put(b"a", b"3");
        txn::mod_revision_is(&mut t, b"a", 1);
        let r = s.apply(&t);
        assert!(!r.succeeded);
        assert_eq!(r.revision, 2);
        assert_eq!(s.get(b"a").unwrap().value.as_ref(), b"2");
    }

    #[test]
    fn image_round_trip() {
        let mut s = MetaStore::new();
        s.apply(&put(b"a", b"1"));
        s.apply(&put(b"b", b"2"));
        let mut t = Txn::new();
        txn::delete(&mut t, b"a");
        s.apply(&t);
        assert_eq!(MetaStore::from_image(&s.image()).unwrap(), s);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Del(u8),
        CasVersion(u8, u64, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            (0u8..6).prop_map(Op::Del),
            (0u8..6, 0u64..4, any::<u8>()).prop_map(|(k, ver, v)| Op::CasVersion(k, ver, v)),
        ]
    }

    proptest! {
        /// The store agrees with a plain map of (value, version) under any sequence of
        /// puts, deletes and version-guarded puts.
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 0..60)) {
            let mut s = MetaStore::new();
            let mut model: BTreeMap<u8, (u8, u64)> = BTreeMap::new();
            for o in ops {
                match o {
                    Op::Put(k, v) => {
                        prop_assert!(s.apply(&put(&[k], &[v])).succeeded);
                        let ver = model.get(&k).map_or(0, |e| e.1);
                        model.insert(k, (v, ver + 1));
                    }
                    Op::Del(k) => {
                        let mut t = Txn::new();
                        txn::delete(&mut t, &[k]);
                        prop_assert!(s.apply(&t).succeeded);
                        model.remove(&k);
                    }
                    Op::CasVersion(k, ver, v) => {
                        let mut t = put(&[k], &[v]);
                        txn::version_is(&mut t, &[k], ver);
                        let cur = model.get(&k).map_or(0, |e| e.1);
                        prop_assert_eq!(s.apply(&t).succeeded, cur == ver);
                        if cur == ver {
                            model.insert(k, (v, cur + 1));
                        }
                    }
                }
            }
            prop_assert_eq!(s.len(), model.len());
            for (k, (v, ver)) in model {
                let e = s.get(&[k]).unwrap();
                prop_assert_eq!(e.value.as_ref(), &[v][..]);
                prop_assert_eq!(e.version, ver);
            }
        }
    }
}
