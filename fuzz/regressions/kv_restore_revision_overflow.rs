// Regression test for a bug found while fuzzing KV snapshot restore (target
// `kv_snapshot_restore`, docs/fuzzing.md). Move to collections/tests/ (public API only); needs
// `proto`, `protobuf` and `bytes` as dev-dependencies of collections (already dependencies).
//
// Bug: `KvStore::restore_bytes` (collections/src/kv/snapshot.rs, `Restorer::record`) checks the
// structure of a snapshot image but not the values of its fields. An image whose header says
// revision = u64::MAX (or whose KV record says version = u64::MAX) restores fine, and the next
// write overflows:
//   - revision: `let first_revision = st.revision + 1` in `KvStore::apply_pb`
//     (collections/src/kv/store.rs:435), then `State::next_revision` (state.rs:198);
//   - version: `p.meta.version + 1` in `State::put` (state.rs:217).
// Debug builds panic ("attempt to add with overflow"); release builds (no overflow checks) wrap
// the revision to 0 and the version to 0, so revisions go backwards. Images with
// mod_revision > revision, create_revision > mod_revision or version == 0 are accepted too.
// The image arrives as a MsgSnapshot's data on the peer port (from an authenticated peer).
// Fix: reject such images in `Restorer` with `KvError::Corrupt` (revision < u64::MAX,
// create_revision <= mod_revision <= revision, version >= 1, ...), or use checked arithmetic
// with a typed error in apply.

use collections::kv::{KvConfig, KvStore};
use protobuf::Message as _;

fn put(key: &[u8]) -> Vec<u8> {
    let mut p = proto::kvpb::Put::new();
    p.key = bytes::Bytes::copy_from_slice(key);
    p.value = bytes::Bytes::from_static(b"v");
    let mut c = proto::kvpb::Command::new();
    c.set_put(p);
    c.write_to_bytes().unwrap()
}

/// Snapshot of a store holding one key `a` (revision 1).
fn image() -> Vec<u8> {
    let mut s = KvStore::open(KvConfig::memory()).unwrap();
    s.apply(1, 1, 1000, &put(b"a")).unwrap();
    s.reader().snapshot().to_bytes().unwrap().to_vec()
}

/// Restores `img` into a fresh store and applies one put; the restore must refuse the image,
/// or the put must succeed without the revision going back.
fn restore_then_put(img: &[u8], key: &[u8]) {
    let mut s = KvStore::open(KvConfig::memory()).unwrap();
    let Ok(_) = s.restore_bytes(img) else {
        return; // refused as corrupt: fixed
    };
    let before = s.reader().revision();
    s.apply(2, 1, 1000, &put(key)).unwrap();
    assert!(s.reader().revision() > before, "revision went back");
}

#[test]
fn snapshot_with_revision_max_is_refused_or_safe() {
    let mut img = image();
    // Header record: [u32 len][tag][magic 8][applied_index][applied_term][commit_index]
    // [commit_term][apply_meta: u32 len = 0][revision] -> revision at bytes 49..57.
    assert_eq!(u64::from_le_bytes(img[49..57].try_into().unwrap()), 1);
    img[49..57].copy_from_slice(&u64::MAX.to_le_bytes());
    restore_then_put(&img, b"b");
}

#[test]
fn snapshot_with_version_max_is_refused_or_safe() {
    let mut img = image();
    // Second record (KV): [u32 len][tag 2][mod_revision][create_revision][version]...
    let r2 = 4 + u32::from_le_bytes(img[0..4].try_into().unwrap()) as usize;
    assert_eq!(img[r2 + 4], 2);
    img[r2 + 21..r2 + 29].copy_from_slice(&u64::MAX.to_le_bytes());
    restore_then_put(&img, b"a");
}
