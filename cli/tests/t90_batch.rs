//! Batched puts across ranges that split under them: three real nodes, a collection with a
//! 64 KiB split size, two writers each putting batches of 16 random keys of its own (1 KiB
//! values) through `Kv::put_batch` until meta shows at least 4 ranges. Then:
//! - every op's answer is an applied revision (or a typed error, counted as uncertain);
//! - ops answered by one range in one raft entry took consecutive revisions, one each (a
//!   range's share of a batch applies atomically, op by op); batching is real: far fewer
//!   entries than ops; some batches reached several ranges;
//! - every key reads back its last acknowledged value, and its version equals the number of
//!   acknowledged puts of it (each op applied exactly once, also when a split made the client
//!   regroup and resend), up to the uncertain ones.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use proto::metapb::Persistence;

const NAME: &str = "batches";
const WRITERS: usize = 2;
const KEYS: usize = 128;
const BATCH: usize = 16;
const VALUE: usize = 1024;

/// Per key: what its writer knows.
#[derive(Debug, Default, Clone)]
struct KeyModel {
    /// Puts answered with a revision.
    acked: u64,
    /// The value of the last acknowledged put.
    last: Option<Vec<u8>>,
    /// Values of puts answered with an error since the last acknowledged one (each may or may
    /// not have applied).
    uncertain: Vec<Vec<u8>>,
    /// Puts answered with an error, in all.
    uncertain_total: u64,
}

#[derive(Debug, Default)]
struct Stats {
    batches: u64,
    ops: u64,
    /// Distinct (range, raft entry) pairs the ops applied in.
    entries: u64,
    /// Batches whose ops were answered by more than one range.
    multi_range: u64,
    /// Ops answered with an error.
    errors: Vec<String>,
}

type Model = Arc<Mutex<BTreeMap<Vec<u8>, KeyModel>>>;

fn value(w: usize, i: usize, round: u64) -> Vec<u8> {
    let mut v = format!("{w}-{i}-{round}-").into_bytes();
    v.resize(VALUE, b'a' + (i % 26) as u8);
    v
}

/// Writer `w`: batches of [`BATCH`] distinct keys of its own, spread over its keyspace, until
/// `stop` (and at least one full pass over its keys).
async fn writer(
    kv: client::Kv,
    w: usize,
    model: Model,
    stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicBool>,
) {
    let mut round = 0u64;
    loop {
        // A permutation of the keys (a fixed stride coprime to KEYS), cut into batches.
        let stride = [1usize, 37, 53, 91][(round % 4) as usize];
        let order: Vec<usize> = (0..KEYS)
            .map(|j| (j * stride + round as usize) % KEYS)
            .collect();
        for chunk in order.chunks(BATCH) {
            let items: Vec<(Bytes, Bytes)> = chunk
                .iter()
                .map(|&i| {
                    (
                        Bytes::from(format!("w{w}/k{i:03}")),
                        Bytes::from(value(w, i, round)),
                    )
                })
                .collect();
            let results = kv
                .put_batch(&items)
                .await
                .unwrap_or_else(|e| panic!("put_batch refused: {e}"));
            assert_eq!(results.len(), items.len());
            let mut entries: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
            {
                let mut m = model.lock().unwrap();
                let mut st = stats.lock().unwrap();
                for ((k, v), r) in items.iter().zip(&results) {
                    let km = m.entry(k.to_vec()).or_default();
                    match r {
                        Ok(a) => {
                            km.acked += 1;
                            km.last = Some(v.to_vec());
                            km.uncertain.clear();
                            entries
                                .entry((a.range, a.applied_index))
                                .or_default()
                                .push(a.revision);
                        }
                        Err(e) => {
                            km.uncertain.push(v.to_vec());
                            km.uncertain_total += 1;
                            st.errors.push(e.to_string());
                        }
                    }
                }
                st.batches += 1;
                st.ops += items.len() as u64;
                st.entries += entries.len() as u64;
                let ranges: std::collections::HashSet<u64> =
                    entries.keys().map(|(r, _)| *r).collect();
                if ranges.len() > 1 {
                    st.multi_range += 1;
                }
            }
            // One range's ops in one entry: consecutive revisions, one each.
            for ((range, index), mut revs) in entries {
                revs.sort_unstable();
                let want: Vec<u64> = (revs[0]..revs[0] + revs.len() as u64).collect();
                assert_eq!(
                    revs, want,
                    "ops of range {range} in entry {index} did not take consecutive revisions"
                );
            }
        }
        round += 1;
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_puts_apply_once_per_op_across_splits() {
    let t0 = Instant::now();
    let (mut c, _dir, cl, _seeds) = ready_cluster(3).await;
    let d = cl
        .create_collection(kv_spec(NAME, Persistence::MEMORY, 64 << 10, 0))
        .await
        .expect("create collection");
    let prefix = meta::keys::collection_prefix(d.id);
    let kv = cl.kv(NAME);
    // Placed and led before the load starts (a single-op batch through the batch path).
    cli::demo::wait_for(LONG, || async {
        let r = kv
            .put_batch(&[(Bytes::from_static(b"a-first"), Bytes::from_static(b"1"))])
            .await
            .ok()?;
        r.into_iter().next()?.ok()
    })
    .await
    .expect("no batch applied on the new collection");

    let model: Model = Arc::default();
    let stats: Arc<Mutex<Stats>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                cl.kv(NAME),
                w,
                model.clone(),
                stats.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let split = cli::demo::wait_for(Duration::from_secs(60), || async {
        let n = ranges_of(&cl, d.id).await?.len();
        (n >= 4).then_some(n)
    })
    .await;
    // More batches over the split ranges (the client regroups by the new ranges).
    let after = stats.lock().unwrap().batches;
    cli::demo::wait_for(Duration::from_secs(30), || async {
        (stats.lock().unwrap().batches >= after + 32).then_some(())
    })
    .await
    .expect("the writers stopped making progress after the splits");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer");
    }
    let st = std::mem::take(&mut *stats.lock().unwrap());
    eprintln!(
        "{} batches, {} ops in {} entries, {} batches over several ranges, {} ops regrouped \
         after a split, {} op errors {:?}; {split:?} ranges",
        st.batches,
        st.ops,
        st.entries,
        st.multi_range,
        cl.regrouped_batch_ops(),
        st.errors.len(),
        st.errors.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        split.is_some(),
        "fewer than 4 ranges after a minute of batches"
    );
    assert!(
        st.entries * 4 <= st.ops,
        "batches were not applied as batches: {} entries for {} ops",
        st.entries,
        st.ops
    );
    assert!(st.multi_range > 0, "no batch reached several ranges");
    assert!(
        (st.errors.len() as u64) * 100 <= st.ops,
        "too many op errors: {:?}",
        st.errors
    );

    let rs = cli::demo::wait_for(LONG, || async {
        let rs = ranges_of(&cl, d.id).await?;
        tiles(&rs, &prefix).then_some(rs)
    })
    .await
    .expect("the ranges tile the collection");
    eprintln!("{} ranges after the load", rs.len());

    let model = model.lock().unwrap().clone();
    assert_eq!(model.len(), WRITERS * KEYS);
    for (k, m) in &model {
        let name = String::from_utf8_lossy(k);
        let got = cli::demo::wait_for(LONG, || async { kv.get(k).await.ok() })
            .await
            .unwrap_or_else(|| panic!("get {name} kept failing"))
            .unwrap_or_else(|| panic!("{name} lost"));
        let ok_value = m.last.as_deref() == Some(got.value.as_ref())
            || m.uncertain
                .iter()
                .any(|u| u.as_slice() == got.value.as_ref());
        assert!(ok_value, "{name}: not its last acknowledged value");
        assert!(
            got.version >= m.acked && got.version <= m.acked + m.uncertain_total,
            "{name}: version {} for {} acknowledged puts ({} uncertain)",
            got.version,
            m.acked,
            m.uncertain_total
        );
    }
    for i in 0..3 {
        c.terminate(i, Duration::from_secs(10));
    }
    eprintln!("t90 took {:?}", t0.elapsed());
}
