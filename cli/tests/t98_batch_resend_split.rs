//! A batch command whose answer was lost, and whose keys a split then separated, is resent
//! whole to the range it was sent to and completes, every op applied exactly once (three real
//! nodes; `Kv::batch`, `seed::kv_port`'s routing of resent batches).
//!
//! Each case has its own collection (64 KiB split size) and client, and one batch of six
//! fresh keys, three below and three above the split key, in mixed order (the command is
//! routed by a key of the upper half). A test hook of the client loses the batch's first
//! send, then holds its resend back while 100 KiB of filler between the batch's keys makes
//! the range split at a middle key (meta shows the batch's keys in two ranges):
//! - **applied, answer lost**: the first send applied whole before the split. The resend gets
//!   the parent's recorded reply: every op applied in one raft entry of the parent at
//!   consecutive revisions, nothing regrouped;
//! - **never applied** (the request was lost): the resend applies the lower keys at the
//!   parent and answers `KEY_OUT_OF_RANGE` for the upper ones, which the client regroups and
//!   sends under a new id to the daughter;
//! - **every key moved** (a batch of upper keys only, the request lost): the parent refuses
//!   every op in its slot, all of them go to the daughter.
//!
//! In every case: no op error (no `UnknownOutcome`), the resend happened, and each key reads
//! back its value at version 1 with the revision its op was answered with. Before the node
//! routed resent batches to the range addressed, the first two cases ended `UnknownOutcome`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::kv::{SendFault, SendHook, SendInfo};
use client::{BatchOp, OpApplied};
use common::*;
use proto::metapb::{Persistence, RangeDescriptor};

const SPLIT_SIZE: u64 = 64 << 10;
const LOW: [&str; 3] = ["a0", "a1", "a2"];
const HIGH: [&str; 3] = ["z0", "z1", "z2"];

/// The batch's ops over `keys`: puts of `"<case>-<key>"`.
fn puts(case: &str, keys: &[&str]) -> Vec<BatchOp> {
    keys.iter()
        .map(|k| BatchOp::Put {
            key: Bytes::from(k.to_string()),
            value: Bytes::from(format!("{case}-{k}")),
        })
        .collect()
}

/// The range of `rs` holding collection-relative `key`.
fn holding<'a>(rs: &'a [RangeDescriptor], prefix: &[u8], key: &str) -> Option<&'a RangeDescriptor> {
    let mut full = prefix.to_vec();
    full.extend_from_slice(key.as_bytes());
    rs.iter()
        .find(|r| r.lo.as_ref() <= full.as_slice() && full.as_slice() < r.hi.as_ref())
}

/// Put 100 KiB of filler (keys `m000`..`m099`, between the batch's keys) into collection
/// `name` and wait until meta shows `a0` and `z0` in different ranges: `(parent, daughter)`.
async fn split_apart(
    cl: client::Client,
    name: String,
    coll: u64,
    prefix: Bytes,
) -> (RangeDescriptor, RangeDescriptor) {
    let kv = cl.kv(&name);
    let mut items: Vec<(Bytes, Bytes)> = (0..100)
        .map(|i| {
            (
                Bytes::from(format!("m{i:03}")),
                Bytes::from(vec![b'f'; 1024]),
            )
        })
        .collect();
    // Filler whose put failed is put again (its value and version do not matter).
    let put = cli::demo::wait_for(LONG, || {
        let (kv, batch) = (kv.clone(), items.clone());
        async move { kv.put_batch(&batch).await.ok() }
    })
    .await
    .expect("the filler batch was refused");
    items = items
        .into_iter()
        .zip(put)
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| i)
        .collect();
    for (k, v) in &items {
        cli::demo::wait_for(LONG, || async { kv.put(k, v).await.ok() })
            .await
            .expect("a filler put kept failing");
    }
    cli::demo::wait_for(LONG, || async {
        let rs = ranges_of(&cl, coll).await?;
        let lo = holding(&rs, &prefix, LOW[0])?.clone();
        let hi = holding(&rs, &prefix, HIGH[0])?.clone();
        (lo.id != hi.id).then_some((lo, hi))
    })
    .await
    .expect("the range did not split between the batch's keys")
}

/// What the hook saw.
#[derive(Debug, Default)]
struct Seen {
    sends: Vec<SendInfo>,
    /// The parent and daughter of the split done while the resend was held back.
    split: Option<(RangeDescriptor, RangeDescriptor)>,
}

/// A hook that applies `first` to the first send, and holds the first resend (attempt above
/// 0) back until [`split_apart`] is done (through `cl`, a client of its own) and `own`, the
/// batch's client, has read `probe` (its cache then shows the split). With
/// [`SendFault::DropAnswer`] it loses answers until the batch's key `probe` reads back (the
/// first send may have met a leader change instead of applying), so the batch applied
/// before the split.
fn hook(
    first: SendFault,
    own: &client::Client,
    cl: &client::Client,
    name: &str,
    d: &proto::metapb::CollectionDescriptor,
    probe: Bytes,
    seen: Arc<Mutex<Seen>>,
) -> SendHook {
    let calls = Arc::new(AtomicU32::new(0));
    let split = Arc::new(AtomicBool::new(false));
    let (cl, name, coll, prefix) = (cl.clone(), name.to_string(), d.id, d.prefix.clone());
    let own = own.clone();
    SendHook::new(move |info: SendInfo| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let (split, seen) = (split.clone(), seen.clone());
        let (cl, name, prefix, probe) = (cl.clone(), name.clone(), prefix.clone(), probe.clone());
        let own = own.clone();
        async move {
            seen.lock().unwrap().sends.push(info);
            if n == 0 {
                return first;
            }
            let applied = || async { matches!(cl.kv(&name).get(&probe).await, Ok(Some(_))) };
            if first == SendFault::DropAnswer && !split.load(Ordering::SeqCst) && !applied().await {
                return SendFault::DropAnswer;
            }
            if info.attempt > 0 && !split.swap(true, Ordering::SeqCst) {
                let s = split_apart(cl, name.clone(), coll, prefix).await;
                seen.lock().unwrap().split = Some(s);
                // The batch's own client learns the split (as other requests on it would):
                // the resend must not go by its first key's range then.
                let kv = own.kv(&name);
                cli::demo::wait_for(LONG, || async { kv.get(&probe).await.ok() })
                    .await
                    .expect("no read of the probe key after the split");
            }
            SendFault::Deliver
        }
    })
}

/// Every op applied (no error); its key reads back its value at version 1, modified at the
/// revision the op was answered with.
async fn check_applied_once(kv: &client::Kv, ops: &[BatchOp], results: &[OpApplied]) {
    for (op, a) in ops.iter().zip(results) {
        let BatchOp::Put { key, value } = op else {
            unreachable!("only puts")
        };
        let name = String::from_utf8_lossy(key);
        let got = cli::demo::wait_for(LONG, || async { kv.get(key).await.ok() })
            .await
            .unwrap_or_else(|| panic!("get {name} kept failing"))
            .unwrap_or_else(|| panic!("{name} lost"));
        assert_eq!(got.value, *value, "{name}: its value");
        assert_eq!(got.version, 1, "{name}: applied more than once");
        assert_eq!(
            got.mod_revision, a.revision,
            "{name}: the revision answered"
        );
    }
}

/// Ranges that answered the ops, and whether ops answered by one range share one entry at
/// consecutive revisions.
fn by_range(results: &[OpApplied]) -> std::collections::BTreeMap<u64, Vec<OpApplied>> {
    let mut m: std::collections::BTreeMap<u64, Vec<OpApplied>> = Default::default();
    for a in results {
        m.entry(a.range).or_default().push(*a);
    }
    for (range, ops) in &mut m {
        ops.sort_by_key(|a| a.revision);
        assert!(
            ops.iter().all(|a| a.applied_index == ops[0].applied_index),
            "range {range} applied its ops in several entries: {ops:?}"
        );
        assert!(
            ops.windows(2).all(|w| w[1].revision == w[0].revision + 1),
            "range {range}: not consecutive revisions: {ops:?}"
        );
    }
    m
}

/// One case on collection `name`: the batch of `keys` whose first send `first` loses, the
/// split while its resend is held back; returns each op's result, the hook's record and the
/// client's regrouped ops.
async fn case(
    c: &cli::demo::LocalCluster,
    name: &str,
    first: SendFault,
    keys: &[&str],
) -> (Vec<BatchOp>, Vec<OpApplied>, Seen, u64, client::Kv) {
    // Its own client (counters); a budget that outlasts the split held in the hook.
    let cl = client::Client::new(c.clients(0..3), Duration::from_secs(60)).expect("client");
    let d = cl
        .create_collection(kv_spec(name, Persistence::MEMORY, SPLIT_SIZE, 0))
        .await
        .expect("create collection");
    let kv = cl.kv(name);
    first_put(&kv, b"b-first", b"1").await;
    // Placed: no membership change holds the split back. Then one batch caches the range's
    // descriptor at its placed epoch (and its leader), so the batch's first send is not
    // refused for a stale epoch (a refusal whose answer is lost would not apply).
    wait_placed(&cl, d.id, 3).await;
    let one = [(Bytes::from_static(b"b-second"), Bytes::from_static(b"1"))];
    cli::demo::wait_for(LONG, || async {
        kv.put_batch(&one).await.ok()?.into_iter().next()?.ok()
    })
    .await
    .expect("no batch applied on the new collection");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let ops = puts(name, keys);
    let t = Instant::now();
    let filler = client::Client::new(c.clients(0..3), Duration::from_secs(10)).expect("client");
    let probe = Bytes::copy_from_slice(ops[0].key());
    let results = kv
        .clone()
        .with_send_hook(hook(first, &cl, &filler, name, &d, probe, seen.clone()))
        .batch(&ops)
        .await
        .expect("batch refused");
    eprintln!("{name}: batch took {:?}: {results:?}", t.elapsed());
    let results: Vec<OpApplied> = results
        .into_iter()
        .zip(&ops)
        .map(|(r, op)| r.unwrap_or_else(|e| panic!("{name}: {:?}: {e}", op.key())))
        .collect();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        cl.resent_writes() >= 1,
        "{name}: the lost send was not resent"
    );
    (ops, results, seen, cl.regrouped_batch_ops(), kv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_batch_split_apart_is_resent_and_applies_once() {
    let t0 = Instant::now();
    let (mut c, _dir, _cl, _seeds) = ready_cluster(3).await;
    // Mixed order: the command goes by its first key, in the upper half.
    let mixed: Vec<&str> = HIGH.iter().zip(LOW).flat_map(|(h, l)| [*h, l]).collect();

    // Applied before the split, answer lost: the parent's recorded reply, all ops applied.
    let (ops, results, seen, regrouped, kv) =
        case(&c, "applied", SendFault::DropAnswer, &mixed).await;
    let (parent, _) = seen
        .split
        .clone()
        .expect("the resend was not held for a split");
    let ranges = by_range(&results);
    assert_eq!(
        ranges.keys().copied().collect::<Vec<_>>(),
        vec![parent.id],
        "every op answered by the parent, in one entry: {results:?}"
    );
    assert_eq!(regrouped, 0, "nothing regrouped");
    assert!(
        seen.sends.iter().all(|s| s.range == parent.id),
        "every send went to the parent: {:?}",
        seen.sends
    );
    check_applied_once(&kv, &ops, &results).await;

    // Never applied (the request was lost): the lower keys at the parent, the upper ones
    // refused there and regrouped to the daughter.
    let (ops, results, seen, regrouped, kv) =
        case(&c, "unapplied", SendFault::DropRequest, &mixed).await;
    let (parent, daughter) = seen
        .split
        .clone()
        .expect("the resend was not held for a split");
    let ranges = by_range(&results);
    for (op, a) in ops.iter().zip(&results) {
        let want = if op.key()[0] == b'a' {
            parent.id
        } else {
            daughter.id
        };
        assert_eq!(
            a.range,
            want,
            "{:?} answered by range {}",
            op.key(),
            a.range
        );
    }
    assert_eq!(ranges.len(), 2);
    assert_eq!(
        regrouped,
        HIGH.len() as u64,
        "the upper keys regrouped once"
    );
    assert!(
        seen.sends[..2].iter().all(|s| s.range == parent.id) && seen.sends[1].attempt == 1,
        "the resend went to the parent under the same id: {:?}",
        seen.sends
    );
    check_applied_once(&kv, &ops, &results).await;

    // Every key of the command moved away: the parent refuses each op, the daughter applies.
    let (ops, results, seen, regrouped, kv) =
        case(&c, "all_moved", SendFault::DropRequest, &HIGH).await;
    let (parent, daughter) = seen
        .split
        .clone()
        .expect("the resend was not held for a split");
    let ranges = by_range(&results);
    assert_eq!(
        ranges.keys().copied().collect::<Vec<_>>(),
        vec![daughter.id],
        "every op answered by the daughter: {results:?}"
    );
    assert_eq!(regrouped, HIGH.len() as u64);
    assert!(
        seen.sends[..2].iter().all(|s| s.range == parent.id) && seen.sends[1].attempt == 1,
        "the resend went to the parent under the same id: {:?}",
        seen.sends
    );
    check_applied_once(&kv, &ops, &results).await;

    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("t98 took {:?}", t0.elapsed());
}
