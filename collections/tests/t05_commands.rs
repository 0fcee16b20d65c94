//! Command validation and replies: limits with typed errors, garbage bytes, stale indexes,
//! nested batches, prev_kv, cas replies, headers. Invalid input never panics and changes
//! nothing but the applied index.

mod common;

use bytes::Bytes;
use collections::kv::{cmd, KvStore};
use common::*;
use proptest::prelude::*;
use proto::kvpb::{self, ErrorCode, Response_oneof_result as Res};

fn error_code(r: &kvpb::Response) -> ErrorCode {
    match result(r) {
        Res::error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn mem() -> KvStore {
    KvStore::open(collections::kv::KvConfig::memory()).expect("open")
}

#[test]
fn limits_are_typed_errors() {
    let mut s = mem();
    let big_key = vec![b'k'; 4097];
    assert_eq!(
        error_code(&apply(&mut s, 0, &cmd::put(&big_key, b"v", 0))),
        ErrorCode::KEY_TOO_LARGE
    );
    assert_eq!(
        error_code(&apply(&mut s, 0, &cmd::put(b"", b"v", 0))),
        ErrorCode::KEY_TOO_LARGE
    );
    let big_val = vec![0u8; (3 << 19) + 1];
    let r = apply(&mut s, 0, &cmd::put(b"k", &big_val, 0));
    let Res::error(e) = result(&r) else { panic!() };
    assert_eq!(
        (e.code, e.limit, e.actual),
        (ErrorCode::VALUE_TOO_LARGE, 3 << 19, (3 << 19) + 1)
    );
    let ops = (0..10_001).map(|_| cmd::put(b"k", b"v", 0)).collect();
    assert_eq!(
        error_code(&apply(&mut s, 0, &cmd::batch(ops))),
        ErrorCode::BATCH_TOO_LARGE
    );
    // Nothing was written; only the applied index moved.
    assert_eq!(s.revision(), 0);
    assert_eq!(s.apply_state().applied_index, 4);
    // Configurable value limit.
    let mut cfg = collections::kv::KvConfig::memory();
    cfg.limits.max_value_bytes = 10;
    let mut s = KvStore::open(cfg).expect("open");
    assert_eq!(
        error_code(&apply(&mut s, 0, &cmd::put(b"k", &[0; 11], 0))),
        ErrorCode::VALUE_TOO_LARGE
    );
    assert!(matches!(
        result(&apply(&mut s, 0, &cmd::put(b"k", &[0; 10], 0))),
        Res::put(_)
    ));
}

#[test]
fn batch_ops_get_their_own_revisions_and_replies() {
    let mut s = mem();
    let r = apply(
        &mut s,
        0,
        &cmd::batch(vec![
            cmd::put(b"a", b"1", 0),
            cmd::put(b"", b"bad", 0),
            cmd::batch(vec![]),
            cmd::put(b"a", b"2", 0),
            kvpb::Command::new(),
        ]),
    );
    let Res::batch(b) = result(&r) else {
        panic!("{r:?}")
    };
    assert_eq!(b.results.len(), 5);
    assert_eq!(b.results[0].get_header().revision, 1);
    assert_eq!(error_code(&b.results[1]), ErrorCode::KEY_TOO_LARGE);
    assert_eq!(error_code(&b.results[2]), ErrorCode::INVALID_ARGUMENT);
    let Res::put(p) = result(&b.results[3]) else {
        panic!()
    };
    assert_eq!(p.get_prev_kv().value, Bytes::from_static(b"1"));
    assert_eq!(error_code(&b.results[4]), ErrorCode::INVALID_ARGUMENT);
    assert_eq!(r.get_header().revision, 2);
    let (kv, h) = s.get(b"a", 0).expect("get");
    let kv = kv.expect("present");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
    assert_eq!((h.revision, h.applied_index), (2, 1));
}

#[test]
fn cas_reports_current_value_and_does_not_bump_revision_on_failure() {
    let mut s = mem();
    apply(&mut s, 0, &cmd::put(b"k", b"v1", 0));
    let r = apply(
        &mut s,
        0,
        &cmd::cas(b"k", kvpb::CompareTarget::VALUE, b"nope", 0, Some(b"v2")),
    );
    let Res::cas(c) = result(&r) else { panic!() };
    assert!(!c.succeeded);
    assert_eq!(c.get_current().value, Bytes::from_static(b"v1"));
    assert_eq!(r.get_header().revision, 1);
    let r = apply(
        &mut s,
        0,
        &cmd::cas(b"k", kvpb::CompareTarget::VERSION, b"", 1, None),
    );
    let Res::cas(c) = result(&r) else { panic!() };
    assert!(c.succeeded);
    assert_eq!(s.get(b"k", 0).expect("get").0, None);
    let r = apply(
        &mut s,
        0,
        &cmd::cas(b"k", kvpb::CompareTarget::ABSENT, b"", 0, Some(b"new")),
    );
    let Res::cas(c) = result(&r) else { panic!() };
    assert!(c.succeeded && !c.has_current());
    assert_eq!(s.get(b"k", 0).expect("get").0.expect("kv").version, 1);
}

#[test]
fn ttl_follows_the_entry_clock() {
    let mut s = mem();
    assert_eq!(s.reader().next_expiry_ms(), None);
    apply(&mut s, 1_000, &cmd::put(b"t", b"v", 500));
    apply(&mut s, 1_000, &cmd::put(b"later", b"v", 900));
    apply(&mut s, 1_000, &cmd::put(b"never", b"v", 0));
    // The leader proposes Expire once the earliest TTL is due.
    assert_eq!(s.reader().next_expiry_ms(), Some(1_500));
    // Reads filter with the caller's clock.
    assert!(s.get(b"t", 1_499).expect("get").0.is_some());
    assert!(s.get(b"t", 1_500).expect("get").0.is_none());
    // An Expire proposed with a later timestamp removes it with a delete event.
    let sub = s.subscribe();
    let r = apply(&mut s, 1_600, &cmd::expire(0));
    let Res::expire(e) = result(&r) else { panic!() };
    assert_eq!(e.expired, 1);
    let a = sub.try_recv().expect("event");
    assert_eq!(a.events.len(), 1);
    assert_eq!(a.events[0].kind, collections::kv::EventKind::Delete);
    assert_eq!(s.reader().next_expiry_ms(), Some(1_900));
    // A clock that goes backwards (new leader) never revives anything: the entry clock is a max.
    apply(&mut s, 100, &cmd::put(b"u", b"v", 50));
    assert_eq!(
        s.get(b"u", 0).expect("get").0.expect("kv").expires_at_ms,
        1_650
    );
}

#[test]
fn stale_index_and_empty_entries() {
    let mut s = mem();
    let r = s.apply_pb(5, 2, 0, b"").expect("apply");
    assert!(r.result.is_none());
    assert_eq!(s.apply_state().applied_index, 5);
    let r = s
        .apply_pb(5, 2, 0, &cmd::encode(&cmd::put(b"k", b"v", 0)))
        .expect("apply");
    assert_eq!(error_code(&r), ErrorCode::INVALID_ARGUMENT);
    assert_eq!(s.revision(), 0);
}

#[test]
fn scan_revision_and_bounds_errors() {
    let mut s = mem();
    apply(&mut s, 0, &cmd::put(b"a", b"1", 0));
    apply(&mut s, 0, &cmd::put(b"a", b"2", 0));
    let mut scan = kvpb::Scan::new();
    scan.revision = 9;
    let mut c = kvpb::Command::new();
    c.op = Some(kvpb::Command_oneof_op::scan(scan.clone()));
    assert_eq!(
        error_code(&apply(&mut s, 0, &c)),
        ErrorCode::FUTURE_REVISION
    );
    apply(&mut s, 0, &cmd::compact(1));
    scan.revision = 1;
    c.op = Some(kvpb::Command_oneof_op::scan(scan));
    assert_eq!(error_code(&apply(&mut s, 0, &c)), ErrorCode::COMPACTED);
}

proptest! {
    #[test]
    fn garbage_commands_get_error_replies(bytes in proptest::collection::vec(any::<u8>(), 1..300)) {
        let mut s = mem();
        let r = s.apply_pb(1, 1, 0, &bytes).expect("never fatal");
        prop_assert!(r.has_header());
        prop_assert_eq!(s.apply_state().applied_index, 1);
        // Whatever it decoded to, the store still works.
        let r = apply(&mut s, 0, &cmd::put(b"after", b"ok", 0));
        prop_assert!(matches!(result(&r), Res::put(_)));
    }
}

#[test]
fn wire_forms_of_reads() {
    let mut s = mem();
    apply(&mut s, 0, &cmd::put(b"a", b"1", 0));
    apply(&mut s, 0, &cmd::put(b"b", b"2", 0));
    let page = s
        .scan(
            &collections::kv::ScanRequest {
                limit: 1,
                ..collections::kv::ScanRequest::range(collections::kv::KeyRange::all())
            },
            0,
        )
        .expect("scan");
    let r = page.to_pb();
    assert_eq!(r.get_header().revision, 2);
    let Res::scan(sr) = result(&r) else { panic!() };
    assert!(sr.more);
    assert_eq!(sr.next_key, Bytes::from_static(b"b"));
    let w = s
        .events_since(1, &collections::kv::KeyRange::all(), 0, 0)
        .expect("events")
        .to_pb();
    assert_eq!((w.events.len(), w.next_revision, w.resync), (2, 3, false));
}
