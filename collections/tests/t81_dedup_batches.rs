//! Request-id dedup of batches: the table records a batch reply in packed form (runs of slots
//! that differ only by their revision; `dedup.rs` module doc), so a maximal batch's record is
//! small, and a duplicate still gets the very bytes the first attempt got: fresh vs duplicate
//! for random batches of every shape, two pipelined maximal batches from one client, and the
//! packed records across snapshot/restore and persistent-mode reopen (with and without a
//! data-log compaction).

mod common;

use bytes::Bytes;
use collections::kv::{cmd, KvStore};
use common::*;
use proptest::prelude::*;
use proto::kvpb::{self, Response_oneof_result as Res};
use protobuf::Message;

/// The default `max_batch_ops`.
const MAX_OPS: usize = 10_000;

fn with_id(mut c: kvpb::Command, client: u64, seq: u64, fi: u64, attempt: u32) -> kvpb::Command {
    let mut id = kvpb::RequestId::new();
    id.client = client;
    id.seq = seq;
    id.first_incomplete = fi;
    id.attempt = attempt;
    c.set_request_id(id);
    c
}

/// A put without `prev_kv` (the bulk-load shape).
fn put_plain(key: &[u8], value: &[u8]) -> kvpb::Command {
    let mut c = cmd::put(key, value, 0);
    c.mut_put().prev_kv = false;
    c
}

/// A batch of `n` plain puts of keys `{tag}{i:05}`.
fn put_batch(tag: &str, n: usize) -> kvpb::Command {
    cmd::batch(
        (0..n)
            .map(|i| put_plain(format!("{tag}{i:05}").as_bytes(), b"value"))
            .collect(),
    )
}

/// The first raft index the tests apply at: a range that has run a while (each slot's header
/// carries the applied index, here in 5 bytes, like the revision of a range that has taken
/// some million writes).
const FIRST_INDEX: u64 = 1 << 35;

/// Applies `c` at the next index (from [`FIRST_INDEX`] on) at clock `now` and returns the
/// encoded reply (the bytes a client gets).
fn apply_at(s: &mut KvStore, now: u64, c: &kvpb::Command) -> Bytes {
    let index = (s.apply_state().applied_index + 1).max(FIRST_INDEX);
    s.apply(index, 1, now, &cmd::encode(c)).expect("apply")
}

fn apply_bytes(s: &mut KvStore, c: &kvpb::Command) -> Bytes {
    apply_at(s, 0, c)
}

/// `c` again (attempt + 1): answers `want` byte for byte and changes nothing.
fn assert_duplicate(s: &mut KvStore, c: &kvpb::Command, want: &Bytes, what: &str) {
    let mut again = c.clone();
    again.mut_request_id().attempt += 1;
    let (rev, stats) = (s.revision(), s.range_stats().keys);
    let got = apply_bytes(s, &again);
    if got != *want {
        let r = kvpb::Response::parse_from_bytes(&got).expect("reply");
        panic!(
            "{what}: the duplicate of {:?} answered {r:?}",
            c.get_request_id()
        );
    }
    assert_eq!((s.revision(), s.range_stats().keys), (rev, stats), "{what}");
}

/// The batch's slots, each a put result at consecutive revisions.
fn assert_put_slots(reply: &Bytes, n: usize) {
    let r = kvpb::Response::parse_from_bytes(reply).expect("reply");
    match &r.result {
        Some(Res::batch(b)) => {
            assert_eq!(b.results.len(), n);
            assert!(b
                .results
                .iter()
                .all(|x| matches!(x.result, Some(Res::put(_)))));
        }
        other => panic!("{other:?}"),
    }
}

/// One client pipelines two maximal batches (the second sent before the first is answered:
/// `first_incomplete` stays 1). Both replies are remembered, so the retry of the first after a
/// lost answer gets its reply (not `REQUEST_EXPIRED`), in every mode, after a snapshot restored
/// into another mode, and after reopening (persistent mode: also after a data-log compaction,
/// which rewrites the table as an image).
#[test]
fn pipelined_maximal_batches_both_stay_remembered() {
    let src_dir = tempfile::tempdir().expect("tempdir");
    for mode in MODES {
        let dir = src_dir.path().join(format!("{mode:?}"));
        let mut s = open(mode, &dir);
        let sent: Vec<(kvpb::Command, Bytes)> = (1..=2u64)
            .map(|seq| {
                let c = with_id(put_batch(&format!("b{seq}-"), MAX_OPS), 7, seq, 1, 0);
                let r = apply_bytes(&mut s, &c);
                assert_put_slots(&r, MAX_OPS);
                (c, r)
            })
            .collect();
        for (c, r) in &sent {
            assert_duplicate(&mut s, c, r, &format!("{mode:?}"));
        }
        // Both records together stay far below what one full record would take.
        let bytes = s.range_stats().dedup_bytes;
        eprintln!(
            "two 10,000-put batch replies of {} and {} bytes, recorded in {bytes} bytes",
            sent[0].1.len(),
            sent[1].1.len()
        );
        assert!(bytes < 2 * 1024, "{bytes}");
        // Restored from a chunked image, into the next mode (so into every mode once).
        {
            let into = MODES[(MODES.iter().position(|m| *m == mode).expect("mode") + 1) % 3];
            let d = tempfile::tempdir().expect("tempdir");
            let mut t = open(into, d.path());
            restore_in_chunks(&mut t, &s, 4096);
            for (c, r) in &sent {
                assert_duplicate(&mut t, c, r, &format!("{mode:?} restored into {into:?}"));
            }
        }
        if mode == Mode::Memory {
            continue;
        }
        s.persist().expect("persist");
        drop(s);
        let mut s = open(mode, &dir);
        for (c, r) in &sent {
            assert_duplicate(&mut s, c, r, &format!("{mode:?} reopened"));
        }
        if mode == Mode::Persistent {
            s.persist().expect("persist");
            s.compact_storage().expect("compact");
            drop(s);
            let mut s = open(mode, &dir);
            for (c, r) in &sent {
                assert_duplicate(&mut s, c, r, "persistent, compacted and reopened");
            }
        }
    }
}

/// The record of a maximal batch of plain puts, of deletes (each deleting its key), and of
/// deletes of missing keys, is under 1 KiB; a duplicate gets the original bytes.
#[test]
fn maximal_batch_records_are_small() {
    let mut s = open(Mode::Memory, std::path::Path::new("unused"));
    let deletes = |tag: &str| {
        cmd::batch(
            (0..MAX_OPS)
                .map(|i| {
                    let mut c = cmd::delete(format!("{tag}{i:05}").as_bytes(), b"");
                    c.mut_delete().prev_kv = false;
                    c
                })
                .collect(),
        )
    };
    let cases = [
        ("puts", put_batch("p", MAX_OPS)),
        ("deletes", deletes("p")),
        ("deletes of missing keys", deletes("p")),
    ];
    for (client, (what, c)) in (1u64..).zip(cases) {
        let before = s.range_stats().dedup_bytes;
        let c = with_id(c, client, 1, 1, 0);
        let r = apply_bytes(&mut s, &c);
        let rec = s.range_stats().dedup_bytes - before;
        eprintln!("10,000 {what}: reply {} bytes, record {rec} bytes", r.len());
        assert!(r.len() > 100_000, "{what}: {}", r.len());
        assert!(rec < 1024, "{what}: {rec}");
        assert_duplicate(&mut s, &c, &r, what);
    }
}

/// One op of a random batch; a run repeats it on consecutive keys.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// A put (with `prev_kv` or not, with a TTL or not).
    Put { prev: bool, ttl: bool },
    /// A delete of one key (with `prev_kv` or not).
    Delete { prev: bool },
    /// A delete of a range of keys.
    DeleteRange,
    /// A cas on the value (it fails unless the value matches).
    Cas,
    /// An op that fails: no operation set.
    Empty,
    /// An op that fails: a key above the limit.
    TooLarge,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        4 => (any::<bool>(), any::<bool>()).prop_map(|(prev, ttl)| Shape::Put { prev, ttl }),
        2 => any::<bool>().prop_map(|prev| Shape::Delete { prev }),
        1 => Just(Shape::DeleteRange),
        1 => Just(Shape::Cas),
        1 => Just(Shape::Empty),
        1 => Just(Shape::TooLarge),
    ]
}

/// A run of `n` ops of one shape, on keys `start..start + n` (mod 16).
fn ops_of(shape: Shape, start: u8, n: usize) -> Vec<kvpb::Command> {
    let k = |i: usize| format!("key{:02}", (start as usize + i) % 16).into_bytes();
    (0..n)
        .map(|i| match shape {
            Shape::Put { prev, ttl } => {
                let mut c = cmd::put(&k(i), &val(i as u8, 3), if ttl { 5 } else { 0 });
                c.mut_put().prev_kv = prev;
                c
            }
            Shape::Delete { prev } => {
                let mut c = cmd::delete(&k(i), b"");
                c.mut_delete().prev_kv = prev;
                c
            }
            Shape::DeleteRange => cmd::delete(&k(i), &k(i + 2)),
            Shape::Cas => cmd::cas(
                &k(i),
                kvpb::CompareTarget::VALUE,
                &val(i as u8, 3),
                0,
                Some(b"c"),
            ),
            Shape::Empty => kvpb::Command::new(),
            Shape::TooLarge => put_plain(&vec![b'x'; 5_000], b"v"),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random batches mixing shapes (runs of one shape and single ops), at random clocks (TTLs
    /// expire between and within batches), each with a request id: every duplicate, sent
    /// right away and again at the end, after a snapshot restored into a fresh store and after
    /// a persistent-mode reopen, answers the first reply byte for byte and changes nothing;
    /// a second replica (memory mode) applying the same entries ends with the same image.
    #[test]
    fn batch_duplicates_answer_the_first_reply_byte_for_byte(
        batches in proptest::collection::vec(
            (proptest::collection::vec((shape(), any::<u8>(), 1usize..40), 1..6), 0u64..4),
            1..8,
        ),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(Mode::Persistent, dir.path());
        // A second replica applying the same entries.
        let mut replica = open(Mode::Memory, std::path::Path::new("unused"));
        let mut sent = Vec::new();
        let mut now = 0;
        for (seq, (runs, tick)) in (1u64..).zip(&batches) {
            now += tick;
            let ops = runs.iter().flat_map(|&(sh, start, n)| ops_of(sh, start, n)).collect();
            let c = with_id(cmd::batch(ops), 3, seq, 1, 0);
            let r = apply_at(&mut s, now, &c);
            prop_assert_eq!(&apply_at(&mut replica, now, &c), &r);
            assert_duplicate(&mut s, &c, &r, "right away");
            assert_duplicate(&mut replica, &c, &r, "right away on the replica");
            sent.push((c, r));
        }
        // Replicas hold the same table, byte for byte.
        let image = s.snapshot().to_bytes().expect("image");
        prop_assert!(image == replica.snapshot().to_bytes().expect("image"));
        for (c, r) in &sent {
            assert_duplicate(&mut s, c, r, "at the end");
        }
        let mut t = open(Mode::Memory, std::path::Path::new("unused"));
        t.restore_bytes(&image).expect("restore");
        for (c, r) in &sent {
            assert_duplicate(&mut t, c, r, "restored");
        }
        s.persist().expect("persist");
        drop(s);
        let mut s = open(Mode::Persistent, dir.path());
        for (c, r) in &sent {
            assert_duplicate(&mut s, c, r, "reopened");
        }
    }
}
