//! Every meta key, built and parsed here and nowhere else.
//!
//! | key | value | why this shape |
//! |---|---|---|
//! | `collection/<name>` | `CollectionDescriptor` | one get by name |
//! | `range/<hi>` | `RangeDescriptor` | `hi` is a full key (collection prefix + user key), so the range holding key `k` is the first `range/` key after `range/<k>`: one seek |
//! | `node/<bucket>/<id>` | `NodeRecord` | bucket = two decimal digits of `log2(free)`, so a scan lists nodes by coarse free capacity |
//! | `counter/collection`, `counter/range` | u64 big-endian | id allocation under compare-and-swap |
//! | `scratch/<key>` | bytes | a client-writable space (CLI, demo workload) until KV collections exist |
//!
//! Collection prefixes are the collection id as 8 bytes big-endian, so they never overlap and
//! `prefix_end(prefix)` is the next id's prefix.

/// Prefix of collection descriptors.
pub const COLLECTION: &[u8] = b"collection/";
/// Prefix of range descriptors.
pub const RANGE: &[u8] = b"range/";
/// Prefix of node records.
pub const NODE: &[u8] = b"node/";
/// Next collection id (u64 BE of the last one allocated).
pub const COUNTER_COLLECTION: &[u8] = b"counter/collection";
/// Next range id (u64 BE of the last one allocated).
pub const COUNTER_RANGE: &[u8] = b"counter/range";
/// Prefix of the client scratch space.
pub const SCRATCH: &[u8] = b"scratch/";

/// Name of the meta collection.
pub const META_NAME: &str = "meta";

fn join(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest);
    k
}

/// `collection/<name>`.
pub fn collection(name: &str) -> Vec<u8> {
    join(COLLECTION, name.as_bytes())
}

/// `range/<hi>` for a range whose exclusive end (a full key) is `hi`.
pub fn range(hi: &[u8]) -> Vec<u8> {
    join(RANGE, hi)
}

/// The `hi` of a range key, if `key` is one.
pub fn range_hi(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(RANGE)
}

/// Coarse free-capacity bucket: `floor(log2(free))`, 0 for 0 and 1.
pub fn capacity_bucket(free: u64) -> u8 {
    if free <= 1 {
        0
    } else {
        (63 - free.leading_zeros()) as u8
    }
}

/// `node/<bucket>/<id>`, the bucket as two digits and the id as 20 digits, so keys sort by
/// bucket then id.
pub fn node(free: u64, id: u64) -> Vec<u8> {
    format!("node/{:02}/{:020}", capacity_bucket(free), id).into_bytes()
}

/// The node id of a node key.
pub fn node_id(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(NODE)?;
    let s = std::str::from_utf8(rest).ok()?;
    let (_, id) = s.split_once('/')?;
    id.parse().ok()
}

/// `scratch/<key>`.
pub fn scratch(key: &[u8]) -> Vec<u8> {
    join(SCRATCH, key)
}

/// The keyspace prefix of collection `id`.
pub fn collection_prefix(id: u64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

/// The smallest key greater than every key starting with `prefix`; `None` if there is none
/// (`prefix` is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Encode a counter value.
pub fn counter_value(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// Decode a counter value (absent or malformed counts as 0 only when absent).
pub fn parse_counter(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_keys_sort_by_bucket_then_id() {
        let a = node(1 << 10, 5);
        let b = node(1 << 10, 40);
        let c = node(1 << 30, 1);
        assert!(a < b && b < c);
        assert_eq!(node_id(&b), Some(40));
        assert_eq!(node_id(b"node/xx"), None);
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[0, 1]), Some(vec![0, 2]));
        assert_eq!(prefix_end(&[0, 0xff]), Some(vec![1]));
        assert_eq!(prefix_end(&[0xff]), None);
        assert_eq!(
            prefix_end(&collection_prefix(7)),
            Some(collection_prefix(8))
        );
    }

    #[test]
    fn buckets() {
        assert_eq!(capacity_bucket(0), 0);
        assert_eq!(capacity_bucket(1), 0);
        assert_eq!(capacity_bucket(2), 1);
        assert_eq!(capacity_bucket(u64::MAX), 63);
    }
}
