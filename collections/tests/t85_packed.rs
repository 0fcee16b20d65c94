//! Packed entries (`KvStore::apply_packed`): commands applied as packed entries, at random
//! pack boundaries, leave the same data, revisions, history, request-id table and replies
//! (their header's applied index aside: every part of a pack answers at the pack's index) as
//! the same commands applied one per entry; in every persistence mode, also after the store
//! is reopened (logged: snapshot file + the entries replayed after it; persistent: its data
//! log, where a pack is one group). Duplicates inside a pack and across packs, a part whose
//! key is out of the bounds, and the parts limit.

mod common;

use collections::kv::{cmd, Applied, Event, KeyRange, KvStore};
use common::*;
use proptest::prelude::*;
use proto::kvpb::{self, Response_oneof_result as Res};
use protobuf::Message;

/// A write command for `op` with request id `(client, seq)`; reads and maintenance without.
fn command(op: &Op, client: u64, seq: &mut u64) -> Option<kvpb::Command> {
    let c = match op {
        Op::Put(k, v, ttl) => cmd::put(&key(*k), &val(*v, 4), *ttl),
        Op::Delete(k) => cmd::delete(&key(*k), b""),
        Op::DeleteRange(a, z) => cmd::delete(&key(*a.min(z)), &key(*a.max(z))),
        Op::CasValue(k, v, n) => cmd::cas(
            &key(*k),
            kvpb::CompareTarget::VALUE,
            &val(*v, 4),
            0,
            n.map(|x| val(x, 4)).as_deref(),
        ),
        Op::CasVersion(k, num, n) | Op::CasModRev(k, num, n) => cmd::cas(
            &key(*k),
            if matches!(op, Op::CasVersion(..)) {
                kvpb::CompareTarget::VERSION
            } else {
                kvpb::CompareTarget::MOD_REVISION
            },
            b"",
            *num,
            n.map(|x| val(x, 4)).as_deref(),
        ),
        Op::CasAbsent(k, v) => cmd::cas(
            &key(*k),
            kvpb::CompareTarget::ABSENT,
            b"",
            0,
            Some(&val(*v, 4)),
        ),
        Op::Batch(ops) => cmd::batch(
            ops.iter()
                .map(|(k, v)| cmd::put(&key(*k), &val(*v, 4), 0))
                .collect(),
        ),
        Op::Expire => return Some(cmd::expire(0)),
        Op::Get(k) => return Some(cmd::get(&key(*k))),
        Op::CompactHistory(_) => return Some(cmd::compact(0)),
        Op::Tick(_) => return None,
    };
    *seq += 1;
    Some(with_id(c, client, *seq, 0))
}

fn with_id(mut c: kvpb::Command, client: u64, seq: u64, attempt: u32) -> kvpb::Command {
    let mut id = kvpb::RequestId::new();
    id.client = client;
    id.seq = seq;
    id.first_incomplete = 1;
    id.attempt = attempt;
    c.set_request_id(id);
    c
}

/// The command sequence of `ops` as `(now_ms, encoded command)`: clients 1..=3 in turn, a
/// tick moves the clock and adds an empty command, and `dups[i]` re-delivers an earlier
/// write (attempt 1) right after command `i`.
fn commands(ops: &[Op], dups: &[(bool, prop::sample::Index)]) -> Vec<(u64, Vec<u8>)> {
    let mut seqs = [0u64; 4];
    let mut clock = 1;
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut writes: Vec<kvpb::Command> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if let Op::Tick(d) = op {
            clock += d;
            out.push((clock, Vec::new()));
            continue;
        }
        let client = (i % 3) as u64 + 1;
        if let Some(c) = command(op, client, &mut seqs[client as usize]) {
            if c.request_id.is_some() {
                writes.push(c.clone());
            }
            out.push((clock, cmd::encode(&c)));
        }
        if let Some((true, at)) = dups.get(i) {
            if !writes.is_empty() {
                let mut c = writes[at.index(writes.len())].clone();
                c.mut_request_id().attempt = 1;
                out.push((clock, cmd::encode(&c)));
            }
        }
    }
    out
}

/// The reply with its headers' applied index cleared (a pack answers at its own index), the
/// batch slots' too.
fn normalized(reply: &[u8]) -> kvpb::Response {
    fn clear(r: &mut kvpb::Response) {
        if let Some(h) = r.header.as_mut() {
            h.applied_index = 0;
        }
        if let Some(Res::batch(b)) = r.result.as_mut() {
            b.results.iter_mut().for_each(clear);
        }
    }
    let mut r = kvpb::Response::parse_from_bytes(reply).expect("reply decodes");
    clear(&mut r);
    r
}

/// Data, revision, history and counters: what must match whatever the packing.
fn fingerprint(store: &KvStore) -> (Vec<collections::kv::KeyValue>, u64, String, u64) {
    let evs = store
        .events_since(1, &KeyRange::all(), 0, u64::MAX)
        .expect("events");
    (
        all(store, 0),
        store.revision(),
        format!("{evs:?}"),
        store.clock_ms(),
    )
}

/// Packs `cmds` at `cuts` (a cut after command `i` when `cuts[i]`): each pack is applied at
/// the index the one-per-entry run gives its last command (`first index + position`).
fn packs(cmds: &[(u64, Vec<u8>)], cuts: &[bool]) -> Vec<(u64, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..cmds.len() {
        let last = i + 1 == cmds.len();
        if last || cuts.get(i).copied().unwrap_or(false) || i + 1 - start >= 7 {
            out.push((i as u64 + 1, start..i + 1));
            start = i + 1;
        }
    }
    out
}

/// Applies one pack (plain if alone, as harpoon proposes a lone proposal) at `index`.
fn apply_pack(store: &mut KvStore, index: u64, cmds: &[(u64, Vec<u8>)]) -> Vec<bytes::Bytes> {
    if let [(now, c)] = cmds {
        return vec![store.apply(index, 1, *now, c).expect("apply")];
    }
    let parts: Vec<(u64, &[u8])> = cmds.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    store.apply_packed(index, 1, &parts).expect("apply_packed")
}

fn events(sub: &collections::kv::Subscription) -> Vec<Applied> {
    sub.try_iter().map(|a| (*a).clone()).collect()
}

fn flat(batches: &[Applied]) -> Vec<Event> {
    batches.iter().flat_map(|a| a.events.clone()).collect()
}

fn packed_like_one_per_entry(
    mode: Mode,
    cmds: &[(u64, Vec<u8>)],
    cuts: &[bool],
    mid: usize,
) -> Result<(), TestCaseError> {
    let rdir = tempfile::tempdir().expect("tempdir");
    let mut reference = open(Mode::Memory, rdir.path());
    let rsub = reference.subscribe();
    let want: Vec<kvpb::Response> = cmds
        .iter()
        .enumerate()
        .map(|(i, (now, c))| normalized(&reference.apply(i as u64 + 1, 1, *now, c).expect("apply")))
        .collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(mode, dir.path());
    let sub = store.subscribe();
    let packs = packs(cmds, cuts);
    let mid = mid % packs.len();
    let mut got = Vec::new();
    for (n, (index, range)) in packs.iter().enumerate() {
        got.extend(
            apply_pack(&mut store, *index, &cmds[range.clone()])
                .iter()
                .map(|b| normalized(b)),
        );
        if n == mid {
            store.persist().expect("persist");
        }
    }
    prop_assert_eq!(&got, &want);
    prop_assert_eq!(fingerprint(&store), fingerprint(&reference));
    prop_assert_eq!(
        store.apply_state().applied_index,
        reference.apply_state().applied_index
    );
    // One broadcast per entry that changed something, the same events in the same order.
    let (b, rb) = (events(&sub), events(&rsub));
    prop_assert_eq!(flat(&b), flat(&rb));
    prop_assert!(b.len() <= packs.len());
    for a in &b {
        prop_assert!(packs.iter().any(|(i, _)| *i == a.index));
    }

    if mode != Mode::Memory {
        // Reopen without a final persist: logged mode recovers the snapshot file written at
        // `mid`, persistent mode its data log (the packs' groups); harpoon then replays the
        // entries after the recovered applied index.
        drop(store);
        store = open(mode, dir.path());
        let from = store.apply_state().applied_index;
        let mut replayed = Vec::new();
        let mut expected = Vec::new();
        for (index, range) in packs.iter().filter(|(i, _)| *i > from) {
            replayed.extend(
                apply_pack(&mut store, *index, &cmds[range.clone()])
                    .iter()
                    .map(|b| normalized(b)),
            );
            expected.extend(want[range.clone()].iter().cloned());
        }
        prop_assert_eq!(replayed, expected);
        prop_assert_eq!(fingerprint(&store), fingerprint(&reference));
        prop_assert_eq!(
            store.apply_state().applied_index,
            reference.apply_state().applied_index
        );
    }

    // The request-id tables agree: every command re-delivered (as a retry) gets the same
    // answer from both and changes the same.
    let next = reference.apply_state().applied_index + 1;
    for (i, (now, c)) in cmds.iter().enumerate() {
        let mut pb = kvpb::Command::parse_from_bytes(c).expect("command");
        let Some(id) = pb.request_id.as_mut() else {
            continue;
        };
        id.attempt += 1;
        let c = cmd::encode(&pb);
        let index = next + i as u64;
        let a = normalized(&reference.apply(index, 1, *now, &c).expect("retry"));
        let b = normalized(&store.apply(index, 1, *now, &c).expect("retry"));
        prop_assert_eq!(a, b);
    }
    prop_assert_eq!(fingerprint(&store), fingerprint(&reference));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn packed_entries_apply_like_one_entry_per_command(
        ops in proptest::collection::vec(op_strategy(0), 1..60),
        dups in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 60),
        cuts in proptest::collection::vec(any::<bool>(), 80),
        mid in any::<usize>(),
    ) {
        let cmds = commands(&ops, &dups);
        prop_assume!(!cmds.is_empty());
        for mode in MODES {
            packed_like_one_per_entry(mode, &cmds, &cuts, mid)?;
        }
    }
}

fn reply(b: &[u8]) -> kvpb::Response {
    kvpb::Response::parse_from_bytes(b).expect("reply")
}

#[test]
fn duplicates_inside_a_pack_and_across_packs_apply_once() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(mode, dir.path());
        let a = cmd::encode(&with_id(cmd::put(b"a", b"1", 0), 1, 1, 0));
        let a_again = cmd::encode(&with_id(cmd::put(b"a", b"1", 0), 1, 1, 1));
        let b = cmd::encode(&with_id(cmd::put(b"b", b"2", 0), 2, 1, 0));
        let b_again = cmd::encode(&with_id(cmd::put(b"b", b"2", 0), 2, 1, 1));
        let r = s
            .apply_packed(1, 1, &[(1, &a), (1, &a_again), (1, &b)])
            .expect("pack");
        assert_eq!(r.len(), 3);
        // The duplicate inside the pack gets the first one's recorded reply: same revision.
        assert_eq!(r[0], r[1], "{mode:?}");
        assert_eq!(reply(&r[0]).get_header().revision, 1);
        assert_eq!(reply(&r[2]).get_header().revision, 2);
        assert_eq!(s.revision(), 2);
        // Across packs: the recorded reply again, nothing applied.
        let r2 = s
            .apply_packed(2, 1, &[(1, &b_again), (1, &a_again)])
            .expect("pack");
        assert_eq!(r2[0], r[2]);
        assert_eq!(r2[1], r[0]);
        assert_eq!(s.revision(), 2);
        assert_eq!(s.apply_state().applied_index, 2);
        if mode == Mode::Persistent {
            // The request-id table survives through the data log (one group per pack).
            s.persist().expect("persist");
            drop(s);
            let mut s = open(mode, dir.path());
            let r3 = s
                .apply_packed(3, 1, &[(1, &a_again), (1, &b_again)])
                .expect("pack");
            assert_eq!(r3, vec![r[0].clone(), r[2].clone()]);
            assert_eq!(s.revision(), 2);
        }
    }
}

#[test]
fn a_part_out_of_the_bounds_is_refused_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(Mode::Persistent, dir.path());
    s.apply(1, 1, 1, &cmd::encode(&cmd::put(b"a", b"0", 0)))
        .expect("apply");
    s.split_drop_right(2, 1, b"m").expect("split");
    let inside = cmd::encode(&cmd::put(b"b", b"1", 0));
    let outside = cmd::encode(&cmd::put(b"x", b"1", 0));
    let r = s
        .apply_packed(3, 1, &[(2, &inside), (2, &outside), (2, &inside)])
        .expect("pack");
    assert!(matches!(reply(&r[0]).result, Some(Res::put(_))));
    match &reply(&r[1]).result {
        Some(Res::error(e)) => assert_eq!(e.code, kvpb::ErrorCode::KEY_OUT_OF_RANGE),
        other => panic!("{other:?}"),
    }
    assert!(matches!(reply(&r[2]).result, Some(Res::put(_))));
    assert_eq!(s.revision(), 3);
    let keys: Vec<_> = all(&s, 0).into_iter().map(|kv| kv.key).collect();
    assert_eq!(
        keys,
        vec![
            bytes::Bytes::from_static(b"a"),
            bytes::Bytes::from_static(b"b")
        ]
    );
}

#[test]
fn stale_indexes_and_oversized_packs_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(Mode::Memory, dir.path());
    let c = cmd::encode(&cmd::put(b"a", b"1", 0));
    s.apply_packed(5, 1, &[(1, &c), (1, &c)]).expect("pack");
    assert_eq!((s.revision(), s.apply_state().applied_index), (2, 5));
    // Not after the applied index: every part gets the error reply.
    let r = s.apply_packed(5, 1, &[(1, &c), (1, &c)]).expect("stale");
    for b in &r {
        match &reply(b).result {
            Some(Res::error(e)) => assert_eq!(e.code, kvpb::ErrorCode::INVALID_ARGUMENT),
            other => panic!("{other:?}"),
        }
    }
    let many: Vec<(u64, &[u8])> = (0..=KvStore::MAX_PACKED_PARTS)
        .map(|_| (1, &c[..]))
        .collect();
    assert!(s.apply_packed(6, 1, &many).is_err());
    assert_eq!((s.revision(), s.apply_state().applied_index), (2, 5));
    // Still usable: the refusal did not poison it.
    s.apply_packed(6, 1, &many[..3]).expect("pack");
    assert_eq!(s.revision(), 5);
}
