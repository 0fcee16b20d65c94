// Regression test for a bug found while fuzzing the peer port's control messages (target
// `peer_frame`, MetaView images; docs/fuzzing.md). Move to meta/tests/ (public API only).
//
// Bug: `MetaStore::from_image` (meta/src/store.rs) accepts an image with revision = u64::MAX;
// the next successful write computes `self.revision + 1` (meta/src/store.rs:92, `apply`) and
// overflows: a panic in debug builds, a wrap to revision 0 in release builds. Images reach
// `from_image` from a meta snapshot (seed/src/meta_sm.rs restore) and from `MetaView` replies.
// Fix: refuse revision == u64::MAX in `from_image` (MetaError::Corrupt), or checked_add in
// `apply` with a failed TxnResult.

use proto::metapb::{StoreImage, Txn};

#[test]
fn image_with_revision_max_is_refused_or_safe() {
    let mut img = StoreImage::new();
    img.revision = u64::MAX;
    let Ok(mut s) = meta::MetaStore::from_image(&img) else {
        return; // refused: fixed
    };
    let mut t = Txn::new();
    meta::store::txn::put(&mut t, b"k", b"v".to_vec());
    let r = s.apply(&t);
    assert!(!r.succeeded || s.revision() > 0, "revision wrapped");
}
