//! What the client port accepts, and the KV commands a range applies from its raft log.
//!
//! - `clientpb::ClientRequest` (the client port's only request message) decoded from arbitrary
//!   bytes, re-encoded to exactly `compute_size` bytes.
//! - A sequence of KV commands (structured `kvpb::Command`s, including nested batches, limits at
//!   their edges and TTLs; or raw bytes) applied as raft entries to two in-memory
//!   `collections::kv::KvStore`s in lockstep. Properties:
//!   - `apply` never panics and, in memory mode, never returns an error (a bad command gets an
//!     error reply);
//!   - the reply decodes, names the entry's index, and the revision never goes back;
//!   - both stores give the same replies (apply is deterministic: replicas must agree);
//!   - reads after each entry: keys strictly ascending, create <= mod <= revision, version >= 1,
//!     `get` agrees with `scan`;
//!   - a snapshot of the final state restores into a fresh store with the same keys and revision.
#![no_main]

use arbitrary::Arbitrary;
use collections::kv::{KeyRange, KvConfig, KvStore, ScanRequest};
use libfuzzer_sys::fuzz_target;
use proto::kvpb;
use protobuf::Message as _;
use quiver_fuzz::kv::{check_reads, command, Op};

#[derive(Debug, Arbitrary)]
enum Cmd {
    Op(Op),
    /// Arbitrary bytes as the entry's data.
    Raw(Vec<u8>),
    /// A leader's no-op entry.
    NoOp,
}

#[derive(Debug, Arbitrary)]
struct Step {
    /// Milliseconds the leader clock moves before this entry (it may also go back).
    clock: i16,
    /// Re-apply the previous index (a duplicate delivery) instead of the next one.
    replay: bool,
    cmd: Cmd,
}

#[derive(Debug, Arbitrary)]
struct Input {
    client_request: Vec<u8>,
    steps: Vec<Step>,
}

fuzz_target!(|input: Input| {
    if let Ok(req) = proto::clientpb::ClientRequest::parse_from_bytes(&input.client_request) {
        let size = req.compute_size() as usize;
        assert_eq!(req.write_to_bytes().expect("re-encode").len(), size);
    }

    let mut a = KvStore::open(KvConfig::memory()).expect("memory store");
    let mut b = KvStore::open(KvConfig::memory()).expect("memory store");
    let mut index = 0u64;
    let mut now: u64 = 1_000_000;
    let mut revision = 0u64;
    for step in input.steps.iter().take(32) {
        now = now.saturating_add_signed(i64::from(step.clock));
        let data: Vec<u8> = match &step.cmd {
            Cmd::Op(op) => command(op).write_to_bytes().expect("encode command"),
            Cmd::Raw(v) => v.clone(),
            Cmd::NoOp => Vec::new(),
        };
        let idx = if step.replay && index > 0 {
            index
        } else {
            index + 1
        };
        let ra = a
            .apply_pb(idx, 1, now, &data)
            .expect("memory apply never fails");
        let rb = b
            .apply_pb(idx, 1, now, &data)
            .expect("memory apply never fails");
        assert_eq!(ra, rb, "replicas disagree on entry {idx}");
        let h = ra.get_header();
        if idx > index {
            assert_eq!(h.applied_index, idx);
            index = idx;
        }
        assert!(h.revision >= revision, "revision went back");
        revision = h.revision;
        // The encoded reply (what goes back to the client) decodes.
        let bytes = ra.write_to_bytes().expect("encode reply");
        kvpb::Response::parse_from_bytes(&bytes).expect("reply decodes");
        check_reads(&a, now);
    }
    assert_eq!(a.reader().revision(), b.reader().revision());

    // Snapshot round trip.
    let image = a.reader().snapshot().to_bytes().expect("snapshot");
    let mut c = KvStore::open(KvConfig::memory()).expect("memory store");
    c.restore_bytes(&image).expect("own snapshot restores");
    assert_eq!(c.reader().revision(), a.reader().revision());
    let all = |s: &KvStore| {
        s.reader()
            .scan_all(ScanRequest::range(KeyRange::all()), now)
            .expect("scan")
    };
    assert_eq!(all(&c), all(&a), "snapshot changed the data");
});
