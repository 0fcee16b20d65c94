//! Request-id dedup: a write re-delivered with the same request id (a client retry after an
//! unknown outcome) applies exactly once. Checked against the same sequence without the
//! duplicates in every persistence mode, across snapshot/restore, restart (logged and
//! persistent, with and without data-log compaction) and old (version 1) snapshot images.

mod common;

use collections::kv::{cmd, KvStore, REPLY_FULL_MAX, WINDOW};
use common::*;
use proptest::prelude::*;
use proto::kvpb::{self, Response_oneof_result as Res};

/// A write command for `op` (reads, ticks and maintenance get no id: `None`).
fn write_of(op: &Op, vlen: usize) -> Option<kvpb::Command> {
    Some(match op {
        Op::Put(k, v, ttl) => cmd::put(&key(*k), &val(*v, vlen), *ttl),
        Op::Delete(k) => cmd::delete(&key(*k), b""),
        Op::DeleteRange(a, z) => cmd::delete(&key(*a.min(z)), &key(*a.max(z))),
        Op::CasValue(k, v, n) => cmd::cas(
            &key(*k),
            kvpb::CompareTarget::VALUE,
            &val(*v, vlen),
            0,
            n.map(|x| val(x, vlen)).as_deref(),
        ),
        Op::CasVersion(k, num, n) => cmd::cas(
            &key(*k),
            kvpb::CompareTarget::VERSION,
            b"",
            *num,
            n.map(|x| val(x, vlen)).as_deref(),
        ),
        Op::CasModRev(k, num, n) => cmd::cas(
            &key(*k),
            kvpb::CompareTarget::MOD_REVISION,
            b"",
            *num,
            n.map(|x| val(x, vlen)).as_deref(),
        ),
        Op::CasAbsent(k, v) => cmd::cas(
            &key(*k),
            kvpb::CompareTarget::ABSENT,
            b"",
            0,
            Some(&val(*v, vlen)),
        ),
        Op::Batch(ops) => cmd::batch(
            ops.iter()
                .map(|(k, v)| cmd::put(&key(*k), &val(*v, vlen), 0))
                .collect(),
        ),
        _ => return None,
    })
}

fn with_id(mut c: kvpb::Command, client: u64, seq: u64, fi: u64, attempt: u32) -> kvpb::Command {
    let mut id = kvpb::RequestId::new();
    id.client = client;
    id.seq = seq;
    id.first_incomplete = fi;
    id.attempt = attempt;
    c.set_request_id(id);
    c
}

/// One entry of a run: the command and the clock it is applied at.
#[derive(Clone, Debug)]
struct Entry {
    cmd: kvpb::Command,
    now: u64,
}

/// The entries of `ops` (clients 1..=3 in turn, seqs increasing per client, first_incomplete
/// lagging by `lag`), ticks as empty entries.
fn entries(ops: &[Op], lag: u64, vlen: usize) -> Vec<Option<Entry>> {
    let mut seqs = [0u64; 4];
    let mut clock = 0;
    ops.iter()
        .enumerate()
        .map(|(i, op)| {
            if let Op::Tick(d) = op {
                clock += d;
                return None;
            }
            let client = (i % 3) as u64 + 1;
            let cmd = match write_of(op, vlen) {
                Some(c) => {
                    seqs[client as usize] += 1;
                    let seq = seqs[client as usize];
                    with_id(c, client, seq, seq.saturating_sub(lag).max(1), 0)
                }
                None => match op {
                    Op::Expire => cmd::expire(0),
                    Op::Get(k) => cmd::get(&key(*k)),
                    _ => cmd::compact(0),
                },
            };
            Some(Entry { cmd, now: clock })
        })
        .collect()
}

fn apply_entry(store: &mut KvStore, e: &Option<Entry>, clock: &mut u64) -> Option<kvpb::Response> {
    let index = store.apply_state().applied_index + 1;
    match e {
        None => {
            *clock += 1;
            store.apply(index, 1, *clock, b"").expect("no-op");
            None
        }
        Some(e) => Some(
            store
                .apply_pb(index, 1, e.now.max(*clock), &cmd::encode(&e.cmd))
                .expect("apply"),
        ),
    }
}

/// What must match between a run with duplicates and one without: data, revision, history.
fn fingerprint(store: &KvStore) -> (Vec<collections::kv::KeyValue>, u64, String) {
    let evs = store
        .events_since(1, &collections::kv::KeyRange::all(), 0, u64::MAX)
        .expect("events");
    (all(store, 0), store.revision(), format!("{evs:?}"))
}

fn is_expired(r: &kvpb::Response) -> bool {
    matches!(&r.result, Some(Res::error(e)) if e.code == kvpb::ErrorCode::REQUEST_EXPIRED)
}

/// Re-delivers `e` (attempt + 1) and checks it changes nothing and answers the original reply
/// (or expired, if the id left the window).
fn redeliver(store: &mut KvStore, e: &Entry, original: &kvpb::Response) -> Result<(), String> {
    let before = fingerprint(store);
    let mut c = e.cmd.clone();
    c.mut_request_id().attempt += 1;
    let index = store.apply_state().applied_index + 1;
    let r = store
        .apply_pb(index, 1, e.now, &cmd::encode(&c))
        .expect("apply duplicate");
    if !is_expired(&r) && r != *original {
        return Err(format!("duplicate answered {r:?}, original {original:?}"));
    }
    if fingerprint(store) != before {
        return Err(format!("duplicate {c:?} changed the store"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn duplicates_apply_exactly_like_the_sequence_without_them(
        ops in proptest::collection::vec(op_strategy(0), 1..80),
        dups in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 80),
        lag in 1u64..200,
    ) {
        duplicates_like_without(&ops, &dups, lag, 4)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// Values above `REPLY_FULL_MAX`: the table records replies without them, and duplicates
    /// get them back from the history (or expired, never a wrong value).
    #[test]
    fn duplicates_with_large_values_get_their_values_back(
        ops in proptest::collection::vec(op_strategy(0), 1..60),
        dups in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 60),
        lag in 1u64..200,
    ) {
        duplicates_like_without(&ops, &dups, lag, REPLY_FULL_MAX + 100)?;
    }
}

fn duplicates_like_without(
    ops: &[Op],
    dups: &[(bool, prop::sample::Index)],
    lag: u64,
    vlen: usize,
) -> Result<(), TestCaseError> {
    {
        let es = entries(ops, lag, vlen);
        // The reference: each entry once.
        let mut reference = open(Mode::Memory, std::path::Path::new("unused"));
        let mut clock = 0;
        let replies: Vec<Option<kvpb::Response>> = es
            .iter()
            .map(|e| apply_entry(&mut reference, e, &mut clock))
            .collect();
        for mode in MODES {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut s = open(mode, dir.path());
            let mut clock = 0;
            let mut got: Vec<Option<kvpb::Response>> = Vec::new();
            for (i, e) in es.iter().enumerate() {
                let r = apply_entry(&mut s, e, &mut clock);
                // Equal up to the applied index (the duplicates are entries too).
                prop_assert_eq!(
                    r.clone().map(without_index),
                    replies[i].clone().map(without_index),
                    "reply of entry {} in {:?}",
                    i,
                    mode
                );
                got.push(r);
                // Re-deliver a random earlier write.
                let (dup, which) = &dups[i % dups.len()];
                if *dup {
                    let j = which.index(i + 1);
                    if let (Some(e), Some(orig)) = (&es[j], &got[j]) {
                        if e.cmd.has_request_id() {
                            redeliver(&mut s, e, orig).map_err(TestCaseError::fail)?;
                        }
                    }
                }
            }
            prop_assert_eq!(fingerprint(&s), fingerprint(&reference), "{:?}", mode);
            let stats = |s: &KvStore| collections::kv::RangeStats {
                dedup_bytes: 0,
                ..s.range_stats()
            };
            prop_assert_eq!(stats(&s), stats(&reference), "{:?}", mode);
            // Every write delivered again, after a restart where the mode has one.
            s.persist().expect("persist");
            if mode == Mode::Persistent {
                s.compact_storage().expect("compact");
            }
            let image = s.snapshot().to_bytes().expect("image");
            if mode != Mode::Memory {
                drop(s);
                s = open(mode, dir.path());
                prop_assert_eq!(&s.snapshot().to_bytes().expect("image"), &image);
            }
            for (e, orig) in es.iter().zip(&got) {
                if let (Some(e), Some(orig)) = (e, orig) {
                    if e.cmd.has_request_id() {
                        redeliver(&mut s, e, orig).map_err(TestCaseError::fail)?;
                    }
                }
            }
            prop_assert_eq!(
                fingerprint(&s),
                fingerprint(&reference),
                "{:?} after restart",
                mode
            );
        }
    }
    Ok(())
}

/// One client with 64 cas in flight (first_incomplete stays 1), each reply carrying an 8 KiB
/// current value: 512 KiB of replies, twice the per-client byte bound. Recorded without their
/// values, none is forgotten: every duplicate gets its original reply back, values included.
/// Once the history dropped a value, its duplicate is answered expired, and changes nothing.
#[test]
fn in_flight_writes_with_large_replies_stay_remembered() {
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in MODES {
        let d = dir.path().join(format!("{mode:?}"));
        let mut s = open(mode, &d);
        let big = |i: u64| vec![i as u8; 8 << 10];
        // The keys' current values.
        for i in 0..64u64 {
            apply(
                &mut s,
                0,
                &cmd::put(format!("k{i:02}").as_bytes(), &big(i), 0),
            );
        }
        let mut sent = Vec::new();
        for i in 0..64u64 {
            let c = with_id(
                cmd::cas(
                    format!("k{i:02}").as_bytes(),
                    kvpb::CompareTarget::VERSION,
                    b"",
                    1,
                    Some(&big(i + 100)),
                ),
                7,
                i + 1,
                1,
                0,
            );
            let r = apply(&mut s, 0, &c);
            match &r.result {
                Some(Res::cas(x)) => {
                    assert!(x.succeeded);
                    assert_eq!(x.get_current().value.len(), 8 << 10);
                }
                other => panic!("{other:?}"),
            }
            sent.push((c, r));
        }
        assert!(s.range_stats().dedup_bytes < collections::kv::CLIENT_MAX_BYTES);
        let before = fingerprint(&s);
        for (c, r) in &sent {
            let mut again = c.clone();
            again.mut_request_id().attempt = 1;
            let got = apply(&mut s, 0, &again);
            assert_eq!(without_index(got), without_index(r.clone()), "{mode:?}");
        }
        assert_eq!(fingerprint(&s), before);
        // Compact the history past the first writes' previous values.
        let rev = s.revision();
        apply(&mut s, 0, &cmd::compact(rev));
        let mut again = sent[0].0.clone();
        again.mut_request_id().attempt = 2;
        let before = fingerprint(&s);
        assert!(is_expired(&apply(&mut s, 0, &again)), "{mode:?}");
        assert_eq!(fingerprint(&s), before);
    }
}

/// A reply without the applied index of its header (batch replies: in each slot too).
fn without_index(mut r: kvpb::Response) -> kvpb::Response {
    r.mut_header().applied_index = 0;
    if let Some(Res::batch(b)) = r.result.as_mut() {
        for x in b.results.iter_mut() {
            x.mut_header().applied_index = 0;
        }
    }
    r
}

/// A store with three clients' writes, the last `WINDOW` of client 1 remembered.
fn populated(mode: Mode, dir: &std::path::Path) -> (KvStore, Vec<(kvpb::Command, kvpb::Response)>) {
    let mut s = open(mode, dir);
    let mut sent = Vec::new();
    for seq in 1..=(WINDOW as u64 + 10) {
        for client in 1..=3u64 {
            let c = with_id(
                cmd::put(&key(seq as u8), &val(client as u8, 8), 0),
                client,
                seq,
                1,
                0,
            );
            let r = apply(&mut s, seq, &c);
            assert!(matches!(r.result, Some(Res::put(_))), "{r:?}");
            sent.push((c, r));
        }
    }
    (s, sent)
}

/// Every command of `sent` again: the remembered ones answer their reply, the older ones
/// expired, and nothing changes.
fn assert_remembered(s: &mut KvStore, sent: &[(kvpb::Command, kvpb::Response)]) {
    let rev = s.revision();
    let data = all(s, 0);
    let (mut dup, mut expired) = (0, 0);
    for (c, orig) in sent {
        let mut c = c.clone();
        c.mut_request_id().attempt = 1;
        let r = apply(s, 0, &c);
        if is_expired(&r) {
            assert!(c.get_request_id().seq <= 10, "{c:?} expired");
            expired += 1;
        } else {
            assert_eq!(&r, orig);
            dup += 1;
        }
    }
    assert_eq!((dup, expired), (3 * WINDOW, 30));
    assert_eq!(s.revision(), rev);
    assert_eq!(all(s, 0), data);
}

#[test]
fn the_table_survives_snapshot_restore_into_every_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, sent) = populated(Mode::Persistent, &dir.path().join("src"));
    for mode in MODES {
        let d = tempfile::tempdir().expect("tempdir");
        let mut t = open(mode, d.path());
        restore_in_chunks(&mut t, &src, 300);
        assert_eq!(t.range_stats().dedup_clients, 3);
        assert_remembered(&mut t, &sent);
        if mode != Mode::Memory {
            // The restored table is durable too (logged: the file; persistent: the image in the
            // restore's COMMIT).
            drop(t);
            let mut t = open(mode, d.path());
            assert_remembered(&mut t, &sent);
        }
    }
}

#[test]
fn both_halves_of_a_split_keep_the_table() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut left, sent) = populated(mode, &dir.path().join("left"));
        let index = left.apply_state().applied_index + 1;
        let at = key((WINDOW / 2) as u8);
        let right = left
            .split_off(index, 1, &at, config(mode, &dir.path().join("right")))
            .expect("split");
        // A write applied before the split and resent after it reaches either half (the
        // client re-routes by key); each half answers the recorded reply and changes nothing.
        for mut half in [left, right] {
            assert_eq!(half.range_stats().dedup_clients, 3, "{mode:?}");
            assert_remembered(&mut half, &sent);
            if mode != Mode::Memory {
                let bounds = half.bounds();
                let d = if bounds.lo.is_empty() {
                    "left"
                } else {
                    "right"
                };
                // Logged mode writes the left half's image in the background (until then a
                // restart replays the split from the raft log): wait for it.
                half.wait_image_write().expect("image");
                drop(half);
                let mut again = open(mode, &dir.path().join(d));
                assert_remembered(&mut again, &sent);
            }
        }
    }
}

#[test]
fn the_table_survives_restart_exactly_at_the_durable_apply_index() {
    for mode in [Mode::Logged, Mode::Persistent] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut s, sent) = populated(mode, dir.path());
        s.persist().expect("persist");
        let durable = s.durable_state();
        // Applied after the last persist: not durable, so forgotten with the data it wrote.
        let late = with_id(cmd::put(b"late", b"v", 0), 9, 1, 1, 0);
        let late_reply = apply(&mut s, 0, &late);
        if mode == Mode::Logged {
            drop(s);
            let mut s = open(mode, dir.path());
            assert_eq!(s.apply_state(), durable);
            assert!(s.get(b"late", 0).expect("get").0.is_none());
            assert_remembered(&mut s, &sent);
            // The lost entry is applied again by raft replay: new to the table, applied once.
            let again = apply(&mut s, 0, &late);
            assert!(matches!(again.result, Some(Res::put(_))), "{again:?}");
        } else {
            // Persistent mode writes every command's group as it applies: the late write is in
            // the log (not synced here); recovery keeps exactly what the last COMMIT holds.
            drop(s);
            let mut s = open(mode, dir.path());
            assert!(s.apply_state().applied_index > durable.applied_index);
            assert!(s.get(b"late", 0).expect("get").0.is_some());
            let mut l = late.clone();
            l.mut_request_id().attempt = 1;
            assert_eq!(apply(&mut s, 0, &l), late_reply, "recovered with its reply");
            assert_remembered(&mut s, &sent);
            // Compaction rewrites the table as an image; a restart after it keeps it.
            for i in 0..200u64 {
                apply(&mut s, 0, &cmd::put(b"churn", &vec![i as u8; 4000], 0));
            }
            s.persist().expect("persist");
            assert!(
                s.compact_storage().expect("compact") > 0,
                "segments dropped"
            );
            drop(s);
            let mut s = open(mode, dir.path());
            assert_remembered(&mut s, &sent);
        }
    }
}

#[test]
fn a_failed_restore_leaves_the_table_journaled_in_persistent_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(Mode::Persistent, dir.path());
    apply(&mut s, 0, &cmd::put(b"before", b"v", 0));
    // A corrupt image: the store is left empty, ready for another attempt.
    let bad: Vec<Result<Vec<u8>, collections::KvError>> = vec![Ok(vec![0xff; 64])];
    assert!(s.restore_chunks(bad).is_err());
    assert_eq!(s.apply_state().applied_index, 0);
    let c = with_id(cmd::put(b"k", b"once", 0), 7, 1, 1, 0);
    let first = apply(&mut s, 0, &c);
    assert!(matches!(first.result, Some(Res::put(_))), "{first:?}");
    s.persist().expect("persist");
    drop(s);
    let mut s = open(Mode::Persistent, dir.path());
    let rev = s.revision();
    let mut again = c.clone();
    again.mut_request_id().attempt = 1;
    assert_eq!(
        apply(&mut s, 0, &again),
        first,
        "the recorded reply, not a second apply"
    );
    assert_eq!(s.revision(), rev);
}

#[test]
fn encoded_and_decoded_replies_agree_for_new_and_duplicate_writes() {
    use protobuf::Message;
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in MODES {
        let mut s = open(mode, &dir.path().join(format!("{mode:?}")));
        let c = cmd::encode(&with_id(cmd::put(b"k", b"v", 0), 3, 1, 1, 0));
        let first = s.apply(1, 1, 0, &c).expect("apply");
        let decoded = kvpb::Response::parse_from_bytes(&first).expect("reply");
        assert!(matches!(decoded.result, Some(Res::put(_))), "{decoded:?}");
        // The duplicate answers the very bytes, encoded or decoded.
        assert_eq!(s.apply(2, 1, 0, &c).expect("apply"), first);
        assert_eq!(s.apply_pb(3, 1, 0, &c).expect("apply"), decoded);
        // A write without an id is encoded as before.
        let plain = s.apply(4, 1, 0, &cmd::encode(&cmd::put(b"k", b"w", 0)));
        let plain = kvpb::Response::parse_from_bytes(&plain.expect("apply")).expect("reply");
        assert_eq!(plain.get_header().revision, 2);
        assert_eq!(s.revision(), 2);
    }
}

#[test]
fn a_write_that_changes_nothing_is_still_remembered() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(mode, dir.path());
        apply(&mut s, 0, &cmd::put(b"k", b"1", 0));
        // A failed cas changes no key (no data-log group of its own in persistent mode).
        let c = with_id(
            cmd::cas(b"k", kvpb::CompareTarget::VALUE, b"x", 0, Some(b"2")),
            4,
            1,
            1,
            0,
        );
        let r = apply(&mut s, 0, &c);
        assert!(matches!(&r.result, Some(Res::cas(x)) if !x.succeeded));
        s.persist().expect("persist");
        drop(s);
        let mut s = if mode == Mode::Memory {
            // Memory mode rebuilds from the raft log: replay the two entries.
            let mut s = open(mode, dir.path());
            apply(&mut s, 0, &cmd::put(b"k", b"1", 0));
            apply(&mut s, 0, &c);
            s
        } else {
            open(mode, dir.path())
        };
        // Now the compare would hold: the retry must not apply, it answers the failed cas.
        apply(&mut s, 0, &cmd::put(b"k", b"x", 0));
        let rev = s.revision();
        let mut retry = c.clone();
        retry.mut_request_id().attempt = 1;
        let again = apply(&mut s, 0, &retry);
        assert_eq!(again, r, "{mode:?}");
        assert_eq!(s.revision(), rev);
        assert_eq!(
            s.get(b"k", 0).expect("get").0.expect("k").value.as_ref(),
            b"x"
        );
    }
}

#[test]
fn bad_request_ids_are_refused_and_reads_ignore_them() {
    let mut s = open(Mode::Memory, std::path::Path::new("unused"));
    for (client, seq, fi, field) in [
        (0, 1, 0, "request_id.client"),
        (1, 0, 0, "request_id.seq"),
        (1, 2, 3, "request_id.first_incomplete"),
    ] {
        let r = apply(
            &mut s,
            0,
            &with_id(cmd::put(b"k", b"v", 0), client, seq, fi, 0),
        );
        match &r.result {
            Some(Res::error(e)) => {
                assert_eq!(e.code, kvpb::ErrorCode::INVALID_ARGUMENT);
                assert_eq!(e.field, field);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(s.revision(), 0);
    // A read with an id is served every time (nothing recorded).
    let g = with_id(cmd::get(b"k"), 1, 1, 1, 0);
    for _ in 0..2 {
        assert!(matches!(apply(&mut s, 0, &g).result, Some(Res::get(_))));
    }
    assert_eq!(s.range_stats().dedup_clients, 0);
    // Commands without an id (older clients) apply every time.
    let p = cmd::put(b"k", b"v", 0);
    apply(&mut s, 0, &p);
    apply(&mut s, 0, &p);
    assert_eq!(s.get(b"k", 0).expect("get").0.expect("k").version, 2);
}

/// A version-1 image (before request ids): the same records without `DEDUP`, magic `P1`.
fn as_v1(image: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = image;
    while rest.len() >= 4 {
        let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let rec = &rest[4..4 + n];
        rest = &rest[4 + n..];
        if rec[0] == 5 {
            continue;
        }
        let mut rec = rec.to_vec();
        if rec[0] == 1 {
            assert_eq!(&rec[1..9], b"QVKVSNP3");
            rec[1..9].copy_from_slice(b"QVKVSNP1");
        }
        out.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        out.extend_from_slice(&rec);
    }
    out
}

/// A version-2 image (before packed batch replies) is a version-3 image without packed
/// records: relabelled, it restores to the same store, table included.
#[test]
fn version_2_images_restore_as_they_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, _) = populated(Mode::Memory, dir.path());
    let v3 = src.snapshot().to_bytes().expect("image");
    let at = 5; // the magic in the first record (after the u32 length and the tag)
    assert_eq!(&v3[at..at + 8], b"QVKVSNP3");
    let mut v2 = v3.to_vec();
    v2[at..at + 8].copy_from_slice(b"QVKVSNP2");
    let mut t = open(Mode::Memory, dir.path());
    t.restore_bytes(&v2).expect("v2 restores");
    assert_eq!(t.snapshot().to_bytes().expect("image"), v3);
    assert!(t.range_stats().dedup_clients > 0);
    // An unknown version is refused.
    v2[at..at + 8].copy_from_slice(b"QVKVSNP4");
    assert!(t.restore_bytes(&v2).is_err());
}

#[test]
fn version_1_images_restore_with_an_empty_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, _) = populated(Mode::Memory, dir.path());
    let v2 = src.snapshot().to_bytes().expect("image");
    let v1 = as_v1(&v2);
    assert!(v1.len() < v2.len());
    let mut t = open(Mode::Memory, dir.path());
    t.restore_bytes(&v1).expect("v1 restores");
    assert_eq!(all(&t, 0), all(&src, 0));
    assert_eq!(t.range_stats().dedup_clients, 0);
    // A version-2 image without its DEDUP record, or with one in a version-1 image, is refused.
    let mut no_dedup = v1.clone();
    let at = 5; // the magic in the first record (after the u32 length and the tag)
    no_dedup[at..at + 8].copy_from_slice(b"QVKVSNP2");
    assert!(t.restore_bytes(&no_dedup).is_err());
    let mut extra = as_v1(&v2);
    let end = extra.len() - 5;
    let mut rec = vec![5u8];
    rec.extend_from_slice(&[0u8; 24]);
    let mut framed = (rec.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(&rec);
    extra.splice(end..end, framed);
    assert!(t.restore_bytes(&extra).is_err());
    // The restored v1 store accepts ids from now on.
    let c = with_id(cmd::put(b"n", b"v", 0), 1, 1, 1, 0);
    let r = apply(&mut t, 0, &c);
    let mut c2 = c.clone();
    c2.mut_request_id().attempt = 1;
    assert_eq!(apply(&mut t, 0, &c2), r);
}
