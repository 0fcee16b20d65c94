//! Typed reads of a [`MetaStore`]: descriptors with the revisions their CAS guards need.

use proto::metapb::{CollectionDescriptor, Member, NodeRecord, RangeDescriptor};
use protobuf::Message;

use crate::error::MetaError;
use crate::keys;
use crate::store::{Entry, MetaStore};

/// A decoded record with the key and revisions it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub key: Vec<u8>,
    pub value: T,
    pub mod_revision: u64,
    pub version: u64,
}

fn decode<T: Message>(key: &[u8], e: &Entry) -> Result<Versioned<T>, MetaError> {
    let value = T::parse_from_carllerche_bytes(&e.value).map_err(|err| MetaError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: err.to_string(),
    })?;
    Ok(Versioned {
        key: key.to_vec(),
        value,
        mod_revision: e.mod_revision,
        version: e.version,
    })
}

/// The descriptor of collection `name`.
///
/// # Errors
/// [`MetaError::Corrupt`] if the record does not decode.
pub fn collection(
    s: &MetaStore,
    name: &str,
) -> Result<Option<Versioned<CollectionDescriptor>>, MetaError> {
    let key = keys::collection(name);
    s.get(&key).map(|e| decode(&key, e)).transpose()
}

/// Every collection, by name.
///
/// # Errors
/// [`MetaError::Corrupt`] if a record does not decode.
pub fn collections(s: &MetaStore) -> Result<Vec<Versioned<CollectionDescriptor>>, MetaError> {
    s.scan_prefix(keys::COLLECTION)
        .map(|(k, e)| decode(k, e))
        .collect()
}

/// The collection with id `id` (a scan: ids are not keys).
///
/// # Errors
/// [`MetaError::Corrupt`] if a record does not decode.
pub fn collection_by_id(
    s: &MetaStore,
    id: u64,
) -> Result<Option<Versioned<CollectionDescriptor>>, MetaError> {
    Ok(collections(s)?.into_iter().find(|c| c.value.id == id))
}

/// Every range, ordered by `hi`.
///
/// # Errors
/// [`MetaError::Corrupt`] if a record does not decode.
pub fn ranges(s: &MetaStore) -> Result<Vec<Versioned<RangeDescriptor>>, MetaError> {
    s.scan_prefix(keys::RANGE)
        .map(|(k, e)| decode(k, e))
        .collect()
}

/// The range with id `id` (a scan: ids are not keys).
///
/// # Errors
/// [`MetaError::Corrupt`] if a record does not decode.
pub fn range_by_id(
    s: &MetaStore,
    id: u64,
) -> Result<Option<Versioned<RangeDescriptor>>, MetaError> {
    Ok(ranges(s)?.into_iter().find(|r| r.value.id == id))
}

/// The range holding full key `key`: the first range whose `hi` is above `key` (one seek),
/// if its `lo` is at or below it.
///
/// # Errors
/// [`MetaError::Corrupt`] if the record does not decode.
pub fn lookup(s: &MetaStore, key: &[u8]) -> Result<Option<Versioned<RangeDescriptor>>, MetaError> {
    let probe = keys::range(key);
    let Some((k, e)) = s.seek_after(&probe) else {
        return Ok(None);
    };
    if keys::range_hi(k).is_none() {
        return Ok(None);
    }
    let r: Versioned<RangeDescriptor> = decode(k, e)?;
    Ok((r.value.lo.as_ref() <= key).then_some(r))
}

/// GetMembers: the members of the range holding `key`.
///
/// # Errors
/// [`MetaError::Corrupt`] if the record does not decode.
pub fn get_members(s: &MetaStore, key: &[u8]) -> Result<Option<Vec<Member>>, MetaError> {
    Ok(lookup(s, key)?.map(|r| r.value.members.into_vec()))
}

/// Every node record, by capacity bucket then id.
///
/// # Errors
/// [`MetaError::Corrupt`] if a record does not decode.
pub fn nodes(s: &MetaStore) -> Result<Vec<Versioned<NodeRecord>>, MetaError> {
    s.scan_prefix(keys::NODE)
        .map(|(k, e)| decode(k, e))
        .collect()
}

/// The record of node `id`.
///
/// # Errors
/// [`MetaError::Corrupt`] if a record does not decode.
pub fn node(s: &MetaStore, id: u64) -> Result<Option<Versioned<NodeRecord>>, MetaError> {
    Ok(nodes(s)?.into_iter().find(|n| n.value.id == id))
}

/// Whether `n` heartbeated within `dead_after_ms` of `now_ms`.
pub fn is_alive(n: &NodeRecord, now_ms: u64, dead_after_ms: u64) -> bool {
    now_ms.saturating_sub(n.last_heartbeat_ms) <= dead_after_ms
}

/// Whether meta exists in this store.
pub fn meta_exists(s: &MetaStore) -> bool {
    s.get(&keys::collection(keys::META_NAME)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::txn;
    use proptest::prelude::*;
    use proto::metapb::Txn;

    fn store_with_ranges(bounds: &[Vec<u8>]) -> MetaStore {
        // Ranges [b0, b1), [b1, b2), ... with ids 1.., written in one txn.
        let mut t = Txn::new();
        for (i, w) in bounds.windows(2).enumerate() {
            let mut r = RangeDescriptor::new();
            r.id = i as u64 + 1;
            r.lo = w[0].clone().into();
            r.hi = w[1].clone().into();
            txn::put(&mut t, &keys::range(&w[1]), r.write_to_bytes().unwrap());
        }
        let mut s = MetaStore::new();
        assert!(s.apply(&t).succeeded);
        s
    }

    proptest! {
        /// Lookup by one seek equals a linear scan over every range.
        #[test]
        fn lookup_equals_linear_scan(
            cuts in proptest::collection::btree_set(proptest::collection::vec(any::<u8>(), 1..4), 2..12),
            probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..5), 1..40),
        ) {
            let bounds: Vec<Vec<u8>> = cuts.into_iter().collect();
            let s = store_with_ranges(&bounds);
            let all = ranges(&s).unwrap();
            for p in probes {
                let linear = all
                    .iter()
                    .find(|r| r.value.lo.as_ref() <= &p[..] && &p[..] < r.value.hi.as_ref())
                    .map(|r| r.value.id);
                let seek = lookup(&s, &p).unwrap().map(|r| r.value.id);
                prop_assert_eq!(seek, linear, "probe {:?}", p);
            }
        }
    }
}
