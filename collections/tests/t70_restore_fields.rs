//! Restore checks field values, not only structure (fuzz target `kv_snapshot_restore`, known bug
//! `kv-restore-unchecked-fields` in docs/fuzzing.md; reproducer formerly
//! `fuzz/regressions/kv_restore_revision_overflow.rs`).
//!
//! Before the fix, an image with revision = u64::MAX or a key version = u64::MAX restored fine
//! and the next write overflowed (`st.revision + 1`, `version + 1`): a panic in debug builds,
//! revisions wrapping back to 0 in release. Now such an image is refused with
//! `KvError::InvalidField` naming the field, and a write that would push a counter past its
//! maximum gets a typed error reply instead of wrapping.

mod common;

use bytes::Bytes;
use collections::kv::{cmd, KvConfig, KvStore, MAX_REVISION};
use collections::KvError;
use common::*;
use proptest::prelude::*;
use proto::kvpb::{CompareTarget, Response_oneof_result as Res};

fn mem() -> KvStore {
    KvStore::open(KvConfig::memory()).expect("open")
}

/// Snapshot of a store holding one key `a` (revision 1).
fn image() -> Vec<u8> {
    let mut s = mem();
    apply(&mut s, 1000, &cmd::put(b"a", b"v", 0));
    s.reader().snapshot().to_bytes().unwrap().to_vec()
}

// Header record: [u32 len][tag][magic 8][applied_index][applied_term][commit_index]
// [commit_term][apply_meta: u32 len = 0][revision] -> revision at bytes 49..57.
const REVISION_AT: usize = 49;

/// Offset of the second record (the first KV record) in an image.
fn second_record(img: &[u8]) -> usize {
    4 + u32::from_le_bytes(img[0..4].try_into().unwrap()) as usize
}

fn set_u64(img: &mut [u8], at: usize, v: u64) {
    img[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Restores `img` into a fresh store and applies one put: the restore must refuse the image
/// (returned), or the put must succeed without the revision going back.
fn restore_then_put(img: &[u8], key: &[u8]) -> Option<KvError> {
    let mut s = mem();
    if let Err(e) = s.restore_bytes(img) {
        return Some(e);
    }
    let before = s.reader().revision();
    s.apply(2, 1, 1000, &cmd::encode(&cmd::put(key, b"v", 0)))
        .unwrap();
    assert!(s.reader().revision() > before, "revision went back");
    None
}

fn field_of(e: &KvError) -> &'static str {
    match e {
        KvError::InvalidField { field, .. } => field,
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

#[test]
fn restore_refuses_revision_max_that_overflowed_the_next_write() {
    let mut img = image();
    assert_eq!(
        u64::from_le_bytes(img[REVISION_AT..REVISION_AT + 8].try_into().unwrap()),
        1
    );
    set_u64(&mut img, REVISION_AT, u64::MAX);
    let e = restore_then_put(&img, b"b").expect("image refused");
    assert_eq!(field_of(&e), "revision");
    assert!(e.is_fatal());
}

#[test]
fn restore_refuses_key_version_max_that_overflowed_the_next_put() {
    let mut img = image();
    // Second record (KV): [u32 len][tag 2][mod_revision][create_revision][version]...
    let r2 = second_record(&img);
    assert_eq!(img[r2 + 4], 2);
    set_u64(&mut img, r2 + 21, u64::MAX);
    let e = restore_then_put(&img, b"a").expect("image refused");
    assert_eq!(field_of(&e), "kv.version");
}

#[test]
fn restore_refuses_inconsistent_key_fields() {
    let r2 = second_record(&image());
    // (offset in the KV record, value, field): mod_revision, create_revision, version.
    let cases: [(usize, u64, &str); 6] = [
        (5, 2, "kv.mod_revision"),     // above the image's revision 1
        (5, 0, "kv.mod_revision"),     // revisions start at 1
        (13, 2, "kv.create_revision"), // create > mod
        (13, 0, "kv.create_revision"), // never created
        (21, 0, "kv.version"),         // a live key has version >= 1
        (21, 2, "kv.version"),         // two puts in one revision
    ];
    for (off, v, field) in cases {
        let mut img = image();
        set_u64(&mut img, r2 + off, v);
        let e = restore_then_put(&img, b"a").unwrap_or_else(|| panic!("{field}={v} accepted"));
        assert_eq!(field_of(&e), field, "{field}={v}: {e}");
    }
}

#[test]
fn restore_refuses_compact_revision_above_revision() {
    let mut img = image();
    // compact_revision follows revision and clock_ms.
    set_u64(&mut img, REVISION_AT + 16, 2);
    let e = restore_then_put(&img, b"a").expect("image refused");
    assert_eq!(field_of(&e), "compact_revision");
}

#[test]
fn store_at_max_revision_refuses_writes_with_a_typed_error() {
    let mut img = image();
    set_u64(&mut img, REVISION_AT, MAX_REVISION);
    let mut s = mem();
    s.restore_bytes(&img)
        .expect("MAX_REVISION is a valid revision");
    for c in [
        cmd::put(b"a", b"w", 0),
        cmd::put(b"new", b"w", 0),
        cmd::delete(b"a", b""),
    ] {
        let r = apply(&mut s, 2000, &c);
        match result(&r) {
            Res::error(e) => assert!(e.why.contains("revision"), "{}", e.why),
            other => panic!("write at MAX_REVISION succeeded: {other:?}"),
        }
        assert_eq!(s.reader().revision(), MAX_REVISION);
    }
    // Reads, watch resume points and snapshots still work.
    assert_eq!(all(&s, 2000).len(), 1);
    let again = s.reader().snapshot().to_bytes().unwrap();
    mem().restore_bytes(&again).expect("own image restores");
}

#[test]
fn failed_restore_leaves_an_empty_usable_store_in_every_mode() {
    let mut img = image();
    set_u64(&mut img, REVISION_AT, u64::MAX);
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(mode, dir.path());
        apply(&mut s, 1000, &cmd::put(b"x", b"1", 0));
        s.persist().unwrap();
        let r = s.restore_chunks([Ok::<_, KvError>(img.as_slice())]);
        assert!(
            matches!(r, Err(KvError::InvalidField { .. })),
            "{mode:?}: {r:?}"
        );
        if mode == Mode::Persistent {
            assert_eq!(s.apply_state().applied_index, 0, "{mode:?}");
            assert!(all(&s, 1000).is_empty());
        }
        let r = apply(&mut s, 1000, &cmd::put(b"y", b"2", 0));
        assert!(matches!(result(&r), Res::put(_)), "{mode:?}");
        s.persist().unwrap();
        drop(s);
        let s = open(mode, dir.path());
        if mode != Mode::Memory {
            assert!(all(&s, 1000).iter().any(|kv| kv.key.as_ref() == b"y"));
        }
    }
}

/// The request id (client, seq) of the `i`th op of [`rich_image`], if it carries one.
fn request_id(i: usize, k: u8) -> Option<(u64, u64)> {
    (!k.is_multiple_of(3)).then(|| (u64::from(k % 3), i as u64 + 1))
}

/// Builds a valid image with live keys, history of puts and deletes, TTLs, a horizon and
/// request-id records (writes of two clients).
fn rich_image(ops: &[(u8, u8)]) -> Vec<u8> {
    let mut s = mem();
    for (i, (op, k)) in ops.iter().enumerate() {
        let key = [b'a' + k % 4];
        let now = 1000 + i as u64 * 10;
        let mut c = match op % 6 {
            0 | 1 => cmd::put(&key, b"val", 0),
            2 => cmd::put(&key, b"ttl", 15),
            3 => cmd::delete(&key, b""),
            4 => cmd::expire(0),
            _ => cmd::compact(s.reader().revision() / 2),
        };
        if let Some((client, seq)) = request_id(i, *k) {
            c.mut_request_id().client = client;
            c.mut_request_id().seq = seq;
        }
        apply(&mut s, now, &c);
    }
    s.reader().snapshot().to_bytes().unwrap().to_vec()
}

/// Every single field an edit can target: (offset, width 8 or 1).
fn fields(img: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= img.len() {
        let len = u32::from_le_bytes(img[at..at + 4].try_into().unwrap()) as usize;
        let r = at + 4;
        match img[r] {
            1 => {
                for i in 0..4 {
                    out.push((r + 9 + 8 * i, 8));
                }
                let meta_len = u32::from_le_bytes(img[r + 41..r + 45].try_into().unwrap());
                let c = r + 45 + meta_len as usize;
                for i in 0..3 {
                    out.push((c + 8 * i, 8));
                }
                // kvs and events counts: the last 16 bytes of the header.
                out.push((r + len - 16, 8));
                out.push((r + len - 8, 8));
            }
            2 => (0..4).for_each(|i| out.push((r + 1 + 8 * i, 8))),
            3 => {
                out.push((r + 1, 1));
                (0..4).for_each(|i| out.push((r + 2 + 8 * i, 8)));
            }
            5 => {
                // DEDUP: tick, pressure_until_ms, clients; per client id, floor, last_ms,
                // last_tick, replies; per reply its seq and the first byte of its bytes.
                let u = |p: usize| u64::from_le_bytes(img[p..p + 8].try_into().unwrap()) as usize;
                let mut p = r + 1;
                (0..3).for_each(|i| out.push((p + 8 * i, 8)));
                let clients = u(p + 16);
                p += 24;
                for _ in 0..clients {
                    (0..5).for_each(|i| out.push((p + 8 * i, 8)));
                    let replies = u(p + 32);
                    p += 40;
                    for _ in 0..replies {
                        out.push((p, 8));
                        let n = u32::from_le_bytes(img[p + 8..p + 12].try_into().unwrap());
                        if n > 0 {
                            out.push((p + 12, 1));
                        }
                        p += 12 + n as usize;
                    }
                }
            }
            _ => {}
        }
        at = r + len;
    }
    out
}

/// After a successful restore: writes apply (or get typed error replies), resent request ids
/// answer a recorded reply, an expiry or a first apply (never a fatal error), revisions never
/// go back, reads are consistent, and the store's own image restores again.
fn check_working(s: &mut KvStore, keys: &[u8]) {
    let mut now = s.reader().clock_ms().saturating_add(1);
    let mut index = s.apply_state().applied_index;
    for client in 1..=2 {
        for seq in 1..=24 {
            let mut c = cmd::put(b"a", b"again", 0);
            c.mut_request_id().client = client;
            c.mut_request_id().seq = seq;
            c.mut_request_id().attempt = 1;
            index = index.saturating_add(1);
            s.apply_pb(index, 1, now, &cmd::encode(&c))
                .expect("resend after restore");
        }
    }
    for k in keys.iter().chain([b'z'].iter()) {
        for c in [
            cmd::put(&[*k], b"x", 0),
            cmd::put(&[*k], b"y", 5),
            cmd::cas(&[*k], CompareTarget::ABSENT, b"", 0, Some(b"c")),
            cmd::expire(0),
            cmd::delete(&[*k], b""),
            cmd::get(&[*k]),
        ] {
            let before = s.reader().revision();
            // An image may carry applied_index u64::MAX: such entries are refused by reply.
            index = index.saturating_add(1);
            now = now.saturating_add(10);
            s.apply_pb(index, 1, now, &cmd::encode(&c))
                .expect("apply after restore");
            let after = s.reader().revision();
            assert!(after >= before, "revision went back: {before} -> {after}");
            assert!(after <= MAX_REVISION);
        }
    }
    let rev = s.reader().revision();
    for kv in all(s, 0) {
        assert!(kv.version >= 1, "{kv:?}");
        assert!(kv.create_revision >= 1 && kv.create_revision <= kv.mod_revision);
        assert!(kv.mod_revision <= rev, "{kv:?} above {rev}");
    }
    let img = s.reader().snapshot().to_bytes().expect("snapshot");
    mem().restore_bytes(&img).expect("own image restores");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any single-field edit of a valid image either restores to a store that keeps working
    /// or is refused with a typed error; never a panic, never a wrapped counter.
    #[test]
    fn single_field_edit_restores_to_a_working_store_or_is_refused(
        ops in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..24),
        pick in any::<prop::sample::Index>(),
        edge in 0usize..9,
        random in any::<u64>(),
        chunked in any::<bool>(),
    ) {
        let mut img = rich_image(&ops);
        let fields = fields(&img);
        let (at, width) = fields[pick.index(fields.len())];
        if width == 1 {
            img[at] = random as u8;
        } else {
            let old = u64::from_le_bytes(img[at..at + 8].try_into().unwrap());
            let v = [
                0,
                1,
                old.wrapping_sub(1),
                old.wrapping_add(1),
                MAX_REVISION - 1,
                MAX_REVISION,
                u64::MAX,
                random,
                old / 2,
            ][edge];
            set_u64(&mut img, at, v);
        }
        let mut s = mem();
        let r = if chunked {
            // One chunk per record boundary is not needed: any split of whole records works.
            s.restore_chunks([Ok::<_, KvError>(Bytes::from(img.clone()))])
        } else {
            s.restore_bytes(&img)
        };
        match r {
            Ok(_) => check_working(&mut s, b"abcd"),
            Err(KvError::InvalidField { .. } | KvError::Corrupt { .. }) => {
                // The store is still empty and usable.
                prop_assert_eq!(s.reader().revision(), 0);
                check_working(&mut s, b"a");
            }
            Err(e) => prop_assert!(false, "untyped refusal: {e:?}"),
        }
    }
}

/// A persistent store whose data log ends with `records` (appended after a valid group).
fn data_log_with(records: &[Vec<u8>]) -> (tempfile::TempDir, collections::Result<KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(Mode::Persistent, dir.path());
    {
        let mut s = KvStore::open(cfg.clone()).unwrap();
        apply(&mut s, 1000, &cmd::put(b"a", b"v", 0));
        s.persist().unwrap();
    }
    {
        let (log, _) = seglog::SegLog::open(dir.path().join("data"), cfg.seglog.clone()).unwrap();
        log.append_batch(records.iter().map(Vec::as_slice)).unwrap();
        log.sync().unwrap();
    }
    let r = KvStore::open(cfg);
    (dir, r)
}

/// A data-log `COMMIT` record (collections.md §3) at applied index 2.
fn commit_record(revision: u64) -> Vec<u8> {
    let mut r = vec![2u8];
    for v in [2u64, 1, 0, 0, revision, 1000, 0] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    r.extend_from_slice(&0u32.to_le_bytes());
    r
}

/// A data-log `MUTATION` record: an original put of `key`.
fn put_record(key: &[u8], mod_rev: u64, create: u64, version: u64) -> Vec<u8> {
    let mut r = vec![1u8, 1];
    for v in [mod_rev, create, version, 0] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    r.extend_from_slice(&(key.len() as u32).to_le_bytes());
    r.extend_from_slice(key);
    r.extend_from_slice(b"v");
    r
}

#[test]
fn recovery_refuses_data_log_revision_max_that_would_overflow_the_next_write() {
    let (_d, r) = data_log_with(&[commit_record(u64::MAX)]);
    match r {
        Err(KvError::InvalidField { what, field, .. }) => {
            assert_eq!((what, field), ("data log", "revision"))
        }
        other => panic!("expected InvalidField: {other:?}"),
    }
}

#[test]
fn recovery_refuses_data_log_key_version_max_that_would_overflow_the_next_put() {
    let (_d, r) = data_log_with(&[put_record(b"a", 2, 1, u64::MAX), commit_record(2)]);
    match r {
        Err(KvError::InvalidField { what, field, .. }) => {
            assert_eq!((what, field), ("data log", "kv.version"))
        }
        other => panic!("expected InvalidField: {other:?}"),
    }
    // The same records with sane fields recover, and the next put works.
    let (_d, r) = data_log_with(&[put_record(b"a", 2, 1, 2), commit_record(2)]);
    let mut s = r.expect("valid log recovers");
    let r = apply(&mut s, 2000, &cmd::put(b"a", b"w", 0));
    assert!(matches!(result(&r), Res::put(_)));
    let (kv, _) = s.get(b"a", 2000).unwrap();
    let kv = kv.unwrap();
    assert_eq!((kv.version, kv.mod_revision, kv.create_revision), (3, 3, 1));
}
