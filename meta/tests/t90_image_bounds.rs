//! Regressions found by the `peer_frame` fuzz target (docs/fuzzing.md): meta images whose
//! counters would overflow on the next write must be refused, never wrap.

use proto::metapb::{Record, StoreImage, Txn};

fn put_txn() -> Txn {
    let mut t = Txn::new();
    meta::store::txn::put(&mut t, b"k", b"v".to_vec());
    t
}

#[test]
fn image_with_revision_max_is_refused() {
    let mut img = StoreImage::new();
    img.revision = u64::MAX;
    assert!(meta::MetaStore::from_image(&img).is_err());
}

#[test]
fn image_with_a_version_beyond_its_revisions_is_refused() {
    let mut img = StoreImage::new();
    img.revision = 10;
    let mut r = Record::new();
    r.key = b"k".to_vec().into();
    r.create_revision = 3;
    r.mod_revision = 5;
    r.version = u64::MAX; // at most 3 writes fit in revisions 3..=5
    img.records.push(r);
    assert!(meta::MetaStore::from_image(&img).is_err());
}

#[test]
fn image_at_the_largest_accepted_revision_still_advances() {
    let mut img = StoreImage::new();
    img.revision = u64::MAX - 1;
    let mut s = meta::MetaStore::from_image(&img).expect("u64::MAX - 1 is a valid revision");
    let r = s.apply(&put_txn());
    assert!(r.succeeded);
    assert_eq!(s.revision(), u64::MAX);
}
