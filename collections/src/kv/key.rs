//! [`IndexKey`]: the key type of a store's index, kept inline when short.
//!
//! A lookup in a `BTreeMap<Bytes, _>` of 100,000 keys compares the probe with ~25 stored keys,
//! and each comparison follows the stored key's pointer to its bytes, somewhere on the heap
//! (for keys decoded from raft entries, inside the entry's buffer): a cache miss per
//! comparison. Under W2 (64-client puts) the first index lookup of each put was 16% of a
//! follower's CPU. A key of at most [`INLINE`] bytes is stored in the tree node itself, so the
//! search reads the node and nothing else; a longer key is a shared `Bytes`, as before.
//!
//! Order and equality are those of the key's bytes (`Borrow<[u8]>` is consistent with
//! them), so the index is searched with plain byte slices.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// Keys up to this many bytes are stored inline (the enum stays the size of a `Bytes`).
pub(crate) const INLINE: usize = 23;

/// A key of a store's index: inline when at most [`INLINE`] bytes, else shared.
#[derive(Clone)]
pub(crate) enum IndexKey {
    Inline { len: u8, buf: [u8; INLINE] },
    Shared(Bytes),
}

impl IndexKey {
    /// The key `bytes` (copied when short, else shared).
    pub(crate) fn new(bytes: &Bytes) -> IndexKey {
        Self::inline(bytes).unwrap_or_else(|| IndexKey::Shared(bytes.clone()))
    }

    fn inline(bytes: &[u8]) -> Option<IndexKey> {
        (bytes.len() <= INLINE).then(|| {
            let mut buf = [0u8; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            IndexKey::Inline {
                len: bytes.len() as u8,
                buf,
            }
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            IndexKey::Inline { len, buf } => &buf[..usize::from(*len)],
            IndexKey::Shared(b) => b,
        }
    }

    /// The key as `Bytes` (an inline key is copied into a new buffer).
    pub(crate) fn to_bytes(&self) -> Bytes {
        match self {
            IndexKey::Inline { .. } => Bytes::copy_from_slice(self.as_slice()),
            IndexKey::Shared(b) => b.clone(),
        }
    }
}

impl From<Bytes> for IndexKey {
    fn from(b: Bytes) -> IndexKey {
        Self::inline(&b).unwrap_or(IndexKey::Shared(b))
    }
}

impl Deref for IndexKey {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Borrow<[u8]> for IndexKey {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for IndexKey {
    fn eq(&self, other: &IndexKey) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for IndexKey {}

impl PartialOrd for IndexKey {
    fn partial_cmp(&self, other: &IndexKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IndexKey {
    fn cmp(&self, other: &IndexKey) -> Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&Bytes::copy_from_slice(self.as_slice()), f)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn key(b: &[u8]) -> IndexKey {
        IndexKey::from(Bytes::copy_from_slice(b))
    }

    #[test]
    fn short_keys_are_inline_and_long_ones_shared() {
        assert_eq!(
            std::mem::size_of::<IndexKey>(),
            std::mem::size_of::<Bytes>()
        );
        let short = Bytes::from(vec![7u8; INLINE]);
        let long = Bytes::from(vec![7u8; INLINE + 1]);
        assert!(matches!(IndexKey::new(&short), IndexKey::Inline { .. }));
        assert!(matches!(IndexKey::from(long.clone()), IndexKey::Shared(_)));
        assert_eq!(IndexKey::new(&short).to_bytes(), short);
        assert_eq!(key(&long).to_bytes(), long);
        assert_eq!(key(b"").as_slice(), b"");
    }

    proptest! {
        /// Order and equality are the bytes', across the inline/shared boundary, and a map
        /// keyed by `IndexKey` answers byte-slice lookups like one keyed by `Vec<u8>`.
        #[test]
        fn ordered_like_the_bytes(
            keys in prop::collection::vec(prop::collection::vec(0u8..4, 0..(INLINE + 6)), 0..40),
            probes in prop::collection::vec(prop::collection::vec(0u8..4, 0..(INLINE + 6)), 0..40),
        ) {
            for a in &keys {
                for b in &keys {
                    let (x, y) = (key(a), key(b));
                    prop_assert_eq!(x.cmp(&y), a.cmp(b));
                    prop_assert_eq!(x == y, a == b);
                }
            }
            let ours: BTreeMap<IndexKey, usize> =
                keys.iter().enumerate().map(|(i, k)| (key(k), i)).collect();
            let model: BTreeMap<Vec<u8>, usize> =
                keys.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
            prop_assert!(ours.keys().map(|k| k.to_vec()).eq(model.keys().cloned()));
            for p in &probes {
                prop_assert_eq!(ours.get(&p[..]), model.get(p));
                let lo: Vec<_> = ours.range::<[u8], _>((std::ops::Bound::Included(&p[..]), std::ops::Bound::Unbounded)).map(|(_, v)| *v).collect();
                let lm: Vec<_> = model.range(p.clone()..).map(|(_, v)| *v).collect();
                prop_assert_eq!(lo, lm);
            }
        }
    }
}
