//! A range's state machine applies packed entries (client writes that shared one raft entry):
//! each part is `now_ms ‖ command`, applied in order at the entry's index with its own reply;
//! a part carrying an admin command is refused (splits are never packed) and nothing of the
//! entry applies.

use bytes::Bytes;
use collections::kv::{cmd, KvConfig, KvStore, Persistence};
use harpoon::StateMachine;
use proto::kvpb::{self, Response_oneof_result as Res};
use protobuf::Message;
use seed::ranges::{encode_admin, encode_entry, AdminCommand, KvStateMachine, SplitCommand};

fn machine() -> KvStateMachine {
    KvStateMachine::new(KvStore::open(KvConfig::with(Persistence::Memory)).expect("store"))
}

#[test]
fn parts_apply_in_order_with_their_own_clock_and_reply() {
    let mut sm = machine();
    let a = encode_entry(1_000, &cmd::encode(&cmd::put(b"k", b"1", 0)));
    let b = encode_entry(1_001, &cmd::encode(&cmd::put(b"k", b"2", 0)));
    let r = sm.apply_packed(6, 2, &[&a, &b]).expect("apply_packed");
    assert_eq!(r.len(), 2);
    let revs: Vec<u64> = r
        .iter()
        .map(|b| {
            let resp = kvpb::Response::parse_from_bytes(b).expect("reply");
            assert!(matches!(resp.result, Some(Res::put(_))), "{resp:?}");
            assert_eq!(resp.get_header().applied_index, 6);
            resp.get_header().revision
        })
        .collect();
    assert_eq!(revs, vec![1, 2]);
    let st = sm.apply_state();
    assert_eq!((st.applied_index, st.applied_term), (6, 2));
}

#[test]
fn an_admin_part_is_refused_and_nothing_applies() {
    let mut sm = machine();
    let put = encode_entry(1_000, &cmd::encode(&cmd::put(b"k", b"1", 0)));
    let split = encode_admin(
        1_000,
        &AdminCommand::Split(SplitCommand {
            at: Bytes::from_static(b"m"),
            daughter: 9,
            lo: Bytes::new(),
            hi: None,
        }),
    );
    assert!(sm.apply_packed(6, 2, &[&put, &split]).is_err());
    assert_eq!(sm.apply_state().applied_index, 0);
}
