//! Per-operation costs of the KV store on the paths the end-to-end workloads hit
//! (`cargo bench -p collections --bench ops`):
//!
//! - `apply put`: `KvStore::apply` of a put carrying a request id (the client always sends one),
//!   over 100K keys of `k{i:010}` (the `quiver-bench` keys), 64 clients with 16 writes in flight
//!   each (the W2 shape: 256 B values; the W10 shape: 4 KiB values); the reply is encoded;
//! - `get`: `KvReader::get` of a random present key (W4);
//! - `logged image`: what a logged store's persist costs the applying thread: the synchronous
//!   `persist` (the whole image written and fsynced) against `persist_background` (the capture
//!   only; the write runs on its own thread), for 100K keys of 4 KiB (W10's store).
//!
//! Knobs: `QUIVER_KV_BENCH_KEYS` (default 100 000), `QUIVER_KV_BENCH_OPS` (default 400 000
//! applies / gets), `QUIVER_KV_BENCH_DIR` (default a temp dir), `QUIVER_KV_BENCH_IMAGE`
//! (`0` skips the image case).

use std::time::Instant;

use collections::kv::{KvConfig, KvStore, Persistence};
use proto::kvpb;
use protobuf::Message;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i:010}").into_bytes()
}

/// A put as the client sends it: no prev_kv, a request id.
fn put(k: &[u8], v: &[u8], client: u64, seq: u64) -> Vec<u8> {
    let mut p = kvpb::Put::new();
    p.key = k.to_vec().into();
    p.value = v.to_vec().into();
    let mut c = kvpb::Command::new();
    c.set_put(p);
    let mut id = kvpb::RequestId::new();
    id.client = client;
    id.seq = seq;
    id.first_incomplete = seq.saturating_sub(15).max(1);
    c.request_id = protobuf::SingularPtrField::some(id);
    c.write_to_bytes().expect("encode")
}

/// This thread's time on a CPU, ns (`/proc/thread-self/schedstat`; 0 if unavailable): on a
/// shared machine, CPU time per op is steadier than wall time per op.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn load(store: &mut KvStore, keys: u64, vlen: usize) -> u64 {
    let v = vec![7u8; vlen];
    for i in 0..keys {
        let c = put(&key(i), &v, 1, i + 1);
        store.apply(i + 1, 1, 0, &c).expect("apply");
    }
    keys
}

fn apply_put(name: &str, p: Persistence, keys: u64, ops: u64, vlen: usize) {
    let mut store = KvStore::open(KvConfig::with(p)).expect("open");
    let mut index = load(&mut store, keys, vlen);
    let v = vec![9u8; vlen];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // 64 clients, seqs in turn: each client's first_incomplete trails its seq by 15.
    // Every command new (a reused one would be a duplicate or expired request id).
    let cmds: Vec<Vec<u8>> = (0..ops)
        .map(|n| put(&key(rng.next() % keys), &v, 100 + n % 64, n / 64 + 1))
        .collect();
    let (t, cpu) = (Instant::now(), cpu_ns());
    let mut bytes = 0usize;
    for n in 0..ops {
        index += 1;
        let r = store.apply(index, 1, 0, &cmds[n as usize]).expect("apply");
        bytes += r.len();
    }
    let (secs, cpu) = (t.elapsed().as_secs_f64(), cpu_ns() - cpu);
    println!(
        "{name:<26} {ops:>7} ops: {:>6} ns/op CPU, {:>6.0} ns/op wall (reply {} B)",
        cpu / ops,
        secs * 1e9 / ops as f64,
        bytes / ops as usize
    );
}

fn get(keys: u64, ops: u64) {
    let mut store = KvStore::open(KvConfig::memory()).expect("open");
    load(&mut store, keys, 256);
    let reader = store.reader();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let ks: Vec<Vec<u8>> = (0..ops.min(200_000))
        .map(|_| key(rng.next() % keys))
        .collect();
    let (t, cpu) = (Instant::now(), cpu_ns());
    let mut found = 0u64;
    for n in 0..ops {
        let (kv, _) = reader.get(&ks[(n as usize) % ks.len()], 0).expect("get");
        found += u64::from(kv.is_some());
    }
    let (secs, cpu) = (t.elapsed().as_secs_f64(), cpu_ns() - cpu);
    assert_eq!(found, ops);
    println!(
        "{:<26} {ops:>7} ops: {:>6} ns/op CPU, {:>6.0} ns/op wall",
        "get 256 B (memory)",
        cpu / ops,
        secs * 1e9 / ops as f64
    );
}

fn image(dir: &std::path::Path, keys: u64) {
    let mut store = KvStore::open(KvConfig::with(Persistence::Logged {
        dir: dir.join("image"),
    }))
    .expect("open");
    let mut index = load(&mut store, keys, 4096);
    let t = Instant::now();
    store.persist().expect("persist");
    let sync = t.elapsed();
    // Move the state, then persist in the background.
    let v = vec![3u8; 4096];
    for i in 0..1000 {
        index += 1;
        store
            .apply(index, 1, 0, &put(&key(i), &v, 2, i + 1))
            .expect("apply");
    }
    let t = Instant::now();
    store.persist_background().expect("persist_background");
    let capture = t.elapsed();
    let t = Instant::now();
    store.wait_image_write().expect("wait");
    let write = t.elapsed();
    let mb = std::fs::metadata(dir.join("image").join("kv.snap"))
        .map(|m| m.len())
        .unwrap_or(0) as f64
        / 1e6;
    println!(
        "logged image, {keys} x 4 KiB ({mb:.0} MB): persist (on the applying thread) {:.1} ms; \
         persist_background: {:.2} ms on the applying thread, then {:.1} ms on its own",
        sync.as_secs_f64() * 1e3,
        capture.as_secs_f64() * 1e3,
        write.as_secs_f64() * 1e3
    );
}

fn main() {
    let keys = env("QUIVER_KV_BENCH_KEYS", 100_000);
    let ops = env("QUIVER_KV_BENCH_OPS", 400_000);
    let base = match std::env::var("QUIVER_KV_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("tempdir"),
        Err(_) => tempfile::tempdir().expect("tempdir"),
    };
    apply_put(
        "apply put 256 B (memory)",
        Persistence::Memory,
        keys,
        ops,
        256,
    );
    apply_put(
        "apply put 256 B (logged)",
        Persistence::Logged {
            dir: base.path().join("logged"),
        },
        keys,
        ops,
        256,
    );
    apply_put(
        "apply put 4 KiB (logged)",
        Persistence::Logged {
            dir: base.path().join("logged4k"),
        },
        keys,
        ops / 8,
        4096,
    );
    get(keys, ops);
    if env("QUIVER_KV_BENCH_IMAGE", 1) != 0 {
        image(base.path(), keys);
    }
}
