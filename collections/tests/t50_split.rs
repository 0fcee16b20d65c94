//! Range split: keys below the split key stay, the others move to a new store (in its own data
//! dir when durable); both halves keep revisions and apply state, history is split by key,
//! writes outside a half's bounds are refused, and the split survives reopen.

mod common;

use bytes::Bytes;
use collections::kv::{cmd, KeyRange, KvStore, WatchBatch};
use common::*;
use proto::kvpb::{ErrorCode, Response_oneof_result as Res};

#[test]
fn split_keeps_revisions_and_divides_keys_and_history() {
    for mode in MODES {
        let ldir = tempfile::tempdir().expect("tempdir");
        let rdir = tempfile::tempdir().expect("tempdir");
        let mut left = open(mode, ldir.path());
        let mut model = Model::default();
        for i in 0..8u8 {
            step(&mut left, &mut model, &Op::Put(i, i, 0), 64);
            step(&mut left, &mut model, &Op::Put(i, i.wrapping_add(1), 0), 64);
        }
        let rev = model.revision;
        let index = left.apply_state().applied_index + 1;
        let at = key(4); // "ke"
        let right = left
            .split_off(index, 1, &at, config(mode, rdir.path()))
            .expect("split");
        let mut right = right;
        for (half, lo, hi) in [(&left, 0u8, 4u8), (&right, 4, 8)] {
            assert_eq!(half.revision(), rev);
            assert_eq!(half.apply_state().applied_index, index);
            let want: Vec<_> = model
                .visible(0)
                .into_iter()
                .filter(|kv| half.bounds().contains(&kv.key))
                .collect();
            assert_eq!(want.len(), (hi - lo) as usize);
            assert_eq!(all(half, 0), want, "{mode:?}");
            match half
                .events_since(1, &KeyRange::all(), 0, 0)
                .expect("history")
            {
                WatchBatch::Events { events, .. } => {
                    assert_eq!(events.len(), 2 * (hi - lo) as usize);
                    assert!(events.iter().all(|e| half.bounds().contains(&e.kv.key)));
                }
                other => panic!("{other:?}"),
            }
        }
        // Writes outside the bounds are refused with a typed error.
        let r = apply(&mut left, 0, &cmd::put(&key(5), b"x", 0));
        let Res::error(e) = result(&r) else {
            panic!("{r:?}")
        };
        assert_eq!(e.code, ErrorCode::KEY_OUT_OF_RANGE);
        let r = apply(&mut right, 0, &cmd::put(&key(1), b"x", 0));
        let Res::error(e) = result(&r) else {
            panic!("{r:?}")
        };
        assert_eq!(e.code, ErrorCode::KEY_OUT_OF_RANGE);
        // Both continue from the parent's revision.
        let r = apply(&mut right, 0, &cmd::put(&key(6), b"y", 0));
        assert_eq!(r.get_header().revision, rev + 1);
        if mode != Mode::Memory {
            left.persist().expect("persist");
            right.persist().expect("persist");
            let (l_img, r_img) = (
                left.snapshot().to_bytes().expect("img"),
                right.snapshot().to_bytes().expect("img"),
            );
            drop(left);
            drop(right);
            let left = open(mode, ldir.path());
            let right = open(mode, rdir.path());
            assert_eq!(left.snapshot().to_bytes().expect("img"), l_img);
            assert_eq!(right.snapshot().to_bytes().expect("img"), r_img);
            assert_eq!(left.bounds().hi, Some(Bytes::from(at.clone())));
            assert_eq!(right.bounds().lo, Bytes::from(at.clone()));
        }
    }
}

#[test]
fn split_refuses_bad_keys_and_non_empty_targets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rdir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Persistent, dir.path());
    let mut model = Model::default();
    step(&mut store, &mut model, &Op::Put(1, 1, 0), 4);
    assert!(store
        .split_off(5, 1, b"", config(Mode::Memory, rdir.path()))
        .is_err());
    // A right dir that already holds a store.
    let mut other = open(Mode::Persistent, rdir.path());
    step(&mut other, &mut Model::default(), &Op::Put(1, 1, 0), 4);
    other.persist().expect("persist");
    drop(other);
    assert!(store
        .split_off(5, 1, b"kz", config(Mode::Persistent, rdir.path()))
        .is_err());
    assert_eq!(all(&store, 0), model.visible(0));
}

#[test]
fn split_then_compaction_drops_the_moved_keys_from_the_left_log() {
    let ldir = tempfile::tempdir().expect("tempdir");
    let rdir = tempfile::tempdir().expect("tempdir");
    let mut left: KvStore = open(Mode::Persistent, ldir.path());
    let mut model = Model::default();
    for round in 0..4u8 {
        for i in 0..8u8 {
            step(&mut left, &mut model, &Op::Put(i, round, 0), 20 << 10);
        }
    }
    let index = left.apply_state().applied_index + 1;
    let right = left
        .split_off(index, 1, &key(4), config(Mode::Persistent, rdir.path()))
        .expect("split");
    let rev = left.revision();
    apply(&mut left, 0, &cmd::compact(rev));
    left.compact_storage().expect("compact");
    left.persist().expect("persist");
    drop(left);
    let left = open(Mode::Persistent, ldir.path());
    assert_eq!(all(&left, 0).len(), 4);
    assert_eq!(all(&right, 0).len(), 4);
    assert!(left.range_stats().bytes < 5 * (20 << 10));
}

/// A crash after the right half became durable but before the left one did: the split entry
/// is applied again on restart and reuses the materialised right half.
#[test]
fn split_replayed_after_a_crash_reuses_the_right_half() {
    let ldir = tempfile::tempdir().expect("tempdir");
    let rdir = tempfile::tempdir().expect("tempdir");
    let mut left = open(Mode::Persistent, ldir.path());
    let mut model = Model::default();
    for i in 0..8u8 {
        step(&mut left, &mut model, &Op::Put(i, i, 0), 16);
    }
    left.persist().expect("persist");
    let before = left.snapshot().to_bytes().expect("img");
    let index = left.apply_state().applied_index + 1;
    let right = left
        .split_off(index, 1, &key(4), config(Mode::Persistent, rdir.path()))
        .expect("split");
    let right_img = right.snapshot().to_bytes().expect("img");
    let left_img = left.snapshot().to_bytes().expect("img");
    drop(right);
    drop(left);
    // Simulate the left half losing the split: restore its pre-split image.
    let ldir2 = tempfile::tempdir().expect("tempdir");
    let mut left = open(Mode::Persistent, ldir2.path());
    left.restore_bytes(&before).expect("restore");
    let right = left
        .split_off(index, 1, &key(4), config(Mode::Persistent, rdir.path()))
        .expect("replayed split");
    assert_eq!(right.snapshot().to_bytes().expect("img"), right_img);
    assert_eq!(left.snapshot().to_bytes().expect("img"), left_img);
    // A different split into the same dir is refused.
    drop(right);
    let mut other = open(Mode::Memory, ldir2.path());
    step(&mut other, &mut Model::default(), &Op::Put(1, 1, 0), 4);
    assert!(other
        .split_off(99, 1, &key(4), config(Mode::Persistent, rdir.path()))
        .is_err());
}

/// `split_off_as` writes the right half once, already carrying its own apply meta: reopened
/// from its dir (what a crash right after the split would find) it has the meta, the split
/// index and the moved keys; the left half keeps the parent's meta.
#[test]
fn split_off_as_writes_the_right_half_with_its_own_apply_meta() {
    for mode in [Mode::Logged, Mode::Persistent] {
        let ldir = tempfile::tempdir().expect("tempdir");
        let rdir = tempfile::tempdir().expect("tempdir");
        let mut left = open(mode, ldir.path());
        let mut model = Model::default();
        for i in 0..8u8 {
            step(&mut left, &mut model, &Op::Put(i, i, 0), 16);
        }
        let index = left.apply_state().applied_index + 1;
        left.set_apply_meta(index - 1, 1, Bytes::from_static(b"parent-conf"));
        let meta = Bytes::from_static(b"daughter-conf");
        let right = left
            .split_off_as(
                index,
                1,
                &key(4),
                config(mode, rdir.path()),
                Some(meta.clone()),
            )
            .expect("split");
        assert_eq!(right.durable_state().apply_meta, meta, "{mode:?}");
        let want = all(&right, 0);
        drop(right);
        let reopened = open(mode, rdir.path());
        let st = reopened.durable_state();
        assert_eq!(
            (st.applied_index, st.apply_meta.clone()),
            (index, meta.clone()),
            "{mode:?}"
        );
        assert_eq!(all(&reopened, 0), want, "{mode:?}");
        assert_eq!(want.len(), 4, "{mode:?}");
        assert_eq!(
            left.apply_state().apply_meta,
            Bytes::from_static(b"parent-conf"),
            "{mode:?}"
        );
    }
}

#[test]
fn etcd_open_range_end_deletes_to_the_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(Mode::Memory, dir.path());
    let mut model = Model::default();
    for i in 0..8u8 {
        step(&mut store, &mut model, &Op::Put(i, i, 0), 4);
    }
    let r = apply(&mut store, 0, &cmd::delete(&key(5), b"\0"));
    let Res::delete(d) = result(&r) else {
        panic!("{r:?}")
    };
    assert_eq!(d.deleted, 3);
    assert_eq!(all(&store, 0).len(), 5);
}

fn op_key(op: &Op) -> Option<u8> {
    match op {
        Op::Put(k, ..)
        | Op::Delete(k)
        | Op::CasValue(k, ..)
        | Op::CasVersion(k, ..)
        | Op::CasModRev(k, ..)
        | Op::CasAbsent(k, ..)
        | Op::Get(k) => Some(*k),
        _ => None,
    }
}

fn restrict(model: &Model, lo: &[u8], hi: Option<&[u8]>) -> Model {
    let inside = |k: &[u8]| k >= lo && hi.is_none_or(|h| k < h);
    let mut m = model.clone();
    m.map.retain(|k, _| inside(k));
    m.events.retain(|e| inside(&e.kv.key));
    m
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random workload, split at a random key, more random single-key work routed to the
    /// owning half (TTL ticks and expiry to both): each half matches the model restricted to
    /// its bounds, also after reopen.
    #[test]
    fn halves_match_the_restricted_model(
        before in proptest::collection::vec(op_strategy(0), 1..60),
        after in proptest::collection::vec(op_strategy(0), 1..60),
        at in 1u8..8,
        mode in 0usize..3,
    ) {
        let mode = MODES[mode];
        let (ldir, rdir) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        let mut left = open(mode, ldir.path());
        let mut model = Model::default();
        for op in &before {
            step(&mut left, &mut model, op, 4);
        }
        let at_key = key(at);
        let index = left.apply_state().applied_index + 1;
        let mut right = left.split_off(index, 1, &at_key, config(mode, rdir.path())).expect("split");
        let mut ml = restrict(&model, b"", Some(&at_key));
        let mut mr = restrict(&model, &at_key, None);
        for op in &after {
            match op_key(op) {
                Some(k) if key(k) < at_key => step(&mut left, &mut ml, op, 4),
                Some(_) => step(&mut right, &mut mr, op, 4),
                None if matches!(op, Op::Tick(_) | Op::Expire) => {
                    step(&mut left, &mut ml, op, 4);
                    step(&mut right, &mut mr, op, 4);
                }
                None => {}
            }
        }
        for (store, m) in [(&left, &ml), (&right, &mr)] {
            prop_assert_eq!(all(store, m.clock), m.visible(m.clock));
            prop_assert_eq!(store.revision(), m.revision);
        }
        if mode != Mode::Memory {
            left.persist().expect("persist");
            right.persist().expect("persist");
            drop(left);
            drop(right);
            let (left, right) = (open(mode, ldir.path()), open(mode, rdir.path()));
            prop_assert_eq!(all(&left, ml.clock), ml.visible(ml.clock));
            prop_assert_eq!(all(&right, mr.clock), mr.visible(mr.clock));
        }
    }
}

/// Logged mode writes the left half's image in the background: until it is complete the
/// left's durable state is the one before the split. A crash then (the store dropped mid-write
/// or before it) reopens the left at that state; replaying the entries after it, the split
/// entry restricted with `split_drop_right` (the right half exists), gives exactly the left
/// half of an uninterrupted split.
#[test]
fn logged_left_half_is_written_in_the_background_and_a_crash_replays_the_split() {
    let (ldir, rdir, rdir2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut left = open(Mode::Logged, ldir.path());
    let mut twin = open(Mode::Memory, ldir.path());
    let mut model = Model::default();
    let mut twin_model = Model::default();
    for i in 0..6u8 {
        step(&mut left, &mut model, &Op::Put(i, i, 0), 32 << 10);
        step(&mut twin, &mut twin_model, &Op::Put(i, i, 0), 32 << 10);
    }
    let before = left.persist().expect("persist");
    // Applied after the last image: only the raft log has these.
    let mut later = Vec::new();
    for i in 0..6u8 {
        let c = cmd::put(&key(i), &val(i.wrapping_add(9), 32 << 10), 0);
        apply(&mut left, 0, &c);
        apply(&mut twin, 0, &c);
        later.push(c);
    }
    let index = left.apply_state().applied_index + 1;
    let right = left
        .split_off(index, 1, &key(3), config(Mode::Logged, rdir.path()))
        .expect("split");
    // The right half is durable at the split index; the left's durable state moves only once
    // its image is complete.
    assert_eq!(right.durable_state().applied_index, index);
    assert!(
        left.durable_state().applied_index == before.applied_index || !left.image_write_pending()
    );
    let full = left.snapshot().to_bytes().expect("image");
    drop(left); // a crash: a write in flight is abandoned, the previous file stays
    let mut left = open(Mode::Logged, ldir.path());
    let got = left.apply_state().applied_index;
    assert!(
        got == before.applied_index || got == index,
        "recovered at {got}"
    );
    if got == before.applied_index {
        // The raft log replays the rest, the split entry as the left half only.
        for c in &later {
            apply(&mut left, 0, c);
        }
        left.split_drop_right(index, 1, &key(3))
            .expect("replayed split");
    }
    assert_eq!(left.snapshot().to_bytes().expect("image"), full);
    // The uninterrupted split agrees (the twin split into a fresh right dir).
    let _ = twin
        .split_off(index, 1, &key(3), config(Mode::Logged, rdir2.path()))
        .expect("twin split");
    assert_eq!(twin.snapshot().to_bytes().expect("image"), full);
    assert_eq!(left.wait_image_write().expect("wait").applied_index, index);
    drop(right);
}

/// Logged mode writes neither half's image on the applying thread: one thread writes the
/// right half's, then the left half's. The right half reports its split state as durable at
/// once (its image may not exist yet), which is safe only because the left half's image is
/// never written before the right half's: a crash before the right image lands finds the
/// left at its state before the split, and replaying the split builds the right half again.
/// Here the right image cannot be written (its temporary file's name is taken by a dir): the
/// left image must not be written either, both stores fail, and the replay after the
/// "crash" rebuilds both halves exactly.
#[test]
fn logged_left_image_waits_for_the_right_one_and_a_crash_before_it_replays_the_split() {
    let (ldir, rdir, twin_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut left = open(Mode::Logged, ldir.path());
    let mut twin = open(Mode::Memory, ldir.path());
    let (mut model, mut twin_model) = (Model::default(), Model::default());
    for i in 0..8u8 {
        step(&mut left, &mut model, &Op::Put(i, i, 0), 16 << 10);
        step(&mut twin, &mut twin_model, &Op::Put(i, i, 0), 16 << 10);
    }
    let before = left.persist().expect("persist");
    let index = before.applied_index + 1;
    let twin_right = twin
        .split_off(index, 1, &key(4), config(Mode::Logged, twin_dir.path()))
        .expect("twin split");
    let (want_left, want_right) = (all(&twin, 0), all(&twin_right, 0));
    assert_eq!((want_left.len(), want_right.len()), (4, 4));

    // The right image fails: `kv.snap.tmp` is a dir (open leaves it: it only removes files).
    std::fs::create_dir_all(rdir.path().join("kv.snap.tmp")).expect("blocker");
    let mut right = left
        .split_off(index, 1, &key(4), config(Mode::Logged, rdir.path()))
        .expect("split: nothing is written on the applying thread");
    assert_eq!(right.durable_state().applied_index, index);
    assert_eq!(all(&right, 0), want_right, "the right half serves at once");
    assert_eq!(all(&left, 0), want_left);
    assert!(right.wait_image_write().is_err(), "the right image failed");
    assert!(
        left.wait_image_write().is_err(),
        "the left half cannot make its split durable"
    );
    drop(right);
    drop(left);
    assert!(!rdir.path().join("kv.snap").exists());

    // The restart: the left half's file is its image from before the split.
    let mut left = open(Mode::Logged, ldir.path());
    assert_eq!(left.apply_state().applied_index, before.applied_index);
    std::fs::remove_dir(rdir.path().join("kv.snap.tmp")).expect("unblock");
    let right = left
        .split_off(index, 1, &key(4), config(Mode::Logged, rdir.path()))
        .expect("replayed split");
    assert_eq!(all(&left, 0), want_left);
    assert_eq!(all(&right, 0), want_right);
    // Both images written, right first: reopened, each half is the split's.
    assert_eq!(left.wait_image_write().expect("left").applied_index, index);
    drop(right);
    drop(left);
    let (left, right) = (
        open(Mode::Logged, ldir.path()),
        open(Mode::Logged, rdir.path()),
    );
    assert_eq!(left.durable_state().applied_index, index);
    assert_eq!(right.durable_state().applied_index, index);
    assert_eq!(all(&left, 0), want_left);
    assert_eq!(all(&right, 0), want_right);
}
