//! KV bench (`cargo bench -p collections --bench kv`): apply throughput per persistence mode
//! (single puts and 100-put batches, the W9 shape) and the persistent-mode memory check:
//! resident memory (VmRSS) against the size of the data written, values read back from disk.
//!
//! It also times a split of a logged store shaped like a W10 range when it splits (what the
//! thread applying the split entry spends; `QUIVER_KV_BENCH_SPLIT_ONLY=1` runs only that),
//! and a snapshot capture (`KvStore::snapshot`) of a logged store shaped like the
//! etcd comparison's range after W1-W10: 100 000 live keys of 256 B and a full watch history
//! (100 000 events): what a log-GC forced compaction costs the shard thread.
//!
//! Single puts to random keys of a 100,000-key store (a W2 follower's apply) run alone with
//! `QUIVER_KV_BENCH_APPLY_ONLY=1`.
//!
//! Knobs: `QUIVER_KV_BENCH_OPS` (default 100 000 puts), `QUIVER_KV_BENCH_MB` (default 512 MiB
//! of 64 KiB values for the memory check), `QUIVER_KV_BENCH_DIR` (default a temp dir).

use std::time::Instant;

use collections::kv::{cmd, KvConfig, KvStore, Persistence};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `/proc/self/status` field in KiB (`VmRSS:` = all resident pages, `RssAnon:` = heap and
/// stacks without the file-backed pages of the mapped data log, which the kernel can reclaim).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn config(p: Persistence) -> KvConfig {
    let mut c = KvConfig::with(p);
    c.seglog.sync = seglog::SyncMode::None;
    c
}

fn throughput(name: &str, persistence: Persistence, ops: u64, batch: u64) {
    let mut store = KvStore::open(config(persistence)).expect("open");
    let value = vec![7u8; 100];
    let cmds: Vec<Vec<u8>> = (0..ops / batch)
        .map(|b| {
            let puts = (0..batch)
                .map(|i| {
                    cmd::put(
                        format!("key{:012}", (b * batch + i) % 50_000).as_bytes(),
                        &value,
                        0,
                    )
                })
                .collect::<Vec<_>>();
            if batch == 1 {
                cmd::encode(&puts[0])
            } else {
                cmd::encode(&cmd::batch(puts))
            }
        })
        .collect();
    let t = Instant::now();
    for (i, c) in cmds.iter().enumerate() {
        store.apply(i as u64 + 1, 1, 0, c).expect("apply");
        if i % 1000 == 999 {
            store.persist().expect("persist");
        }
    }
    store.persist().expect("persist");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{name:<32} {ops} puts (batch {batch}): {:>10.0} puts/s, {:.2} us/put",
        ops as f64 / secs,
        secs * 1e6 / ops as f64
    );
}

/// Single puts to random keys of a memory store holding 100,000 keys, the shape of a W2
/// follower's apply (keys of 19 bytes as the etcd comparison writes them: an 8-byte collection
/// prefix, `k` and 10 digits): what the index search costs when the key's path is not in cache.
fn apply_random(ops: u64) {
    let mut store = KvStore::open(config(Persistence::Memory)).expect("open");
    let value = vec![7u8; 256];
    let keys = 100_000u64;
    let key = |i: u64| {
        let mut k = vec![0, 0, 0, 0, 0, 0, 0, 2];
        k.extend_from_slice(format!("k{i:010}").as_bytes());
        k
    };
    let mut index = 0;
    for i in 0..keys {
        index += 1;
        store
            .apply(index, 1, 0, &cmd::encode(&cmd::put(&key(i), &value, 0)))
            .expect("apply");
    }
    // A fixed LCG: the same keys in the same order in every run.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let cmds: Vec<Vec<u8>> = (0..ops)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // As the client sends a put: no previous value asked for.
            let mut c = cmd::put(&key((x >> 33) % keys), &value, 0);
            if let Some(proto::kvpb::Command_oneof_op::put(p)) = &mut c.op {
                p.prev_kv = false;
            }
            cmd::encode(&c)
        })
        .collect();
    for round in 0..3 {
        let t = Instant::now();
        for c in &cmds {
            index += 1;
            store.apply(index, 1, 0, c).expect("apply");
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "memory, random keys of 100,000 (round {round}): {ops} puts: {:.2} us/put",
            secs * 1e6 / ops as f64
        );
    }
}

/// Times `snapshot()` (the capture under the read lock) and the encoding of the whole image.
fn capture(base: &std::path::Path) {
    let mut store = KvStore::open(config(Persistence::Logged {
        dir: base.join("capture"),
    }))
    .expect("open");
    let value = vec![7u8; 256];
    let keys = 100_000u64;
    for i in 0..2 * keys {
        let c = cmd::encode(&cmd::put(
            format!("key{:012}", i % keys).as_bytes(),
            &value,
            0,
        ));
        store.apply(i + 1, 1, 0, &c).expect("apply");
    }
    let mut best = f64::MAX;
    let mut worst = 0f64;
    let mut encode = 0f64;
    let rounds = 5;
    for _ in 0..rounds {
        let t = Instant::now();
        let snap = store.snapshot();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        best = best.min(ms);
        worst = worst.max(ms);
        let t = Instant::now();
        let bytes = snap.to_bytes().expect("encode").len();
        encode += t.elapsed().as_secs_f64() * 1e3 / rounds as f64;
        assert!(bytes > (keys * 256) as usize);
    }
    println!(
        "snapshot capture, {keys} keys + {} history events: {best:.2}-{worst:.2} ms \
         (shard thread), whole image encoded in {encode:.1} ms (image writer)",
        store.range_stats().history_events
    );
    // What a live capture costs the writer: each key's first change saves its pre-image, and
    // every put trims one history event the capture still needs.
    let mut next = 2 * keys + 1;
    let mut puts = |store: &mut KvStore| {
        let t = Instant::now();
        for i in 0..keys {
            let c = cmd::encode(&cmd::put(
                format!("key{:012}", (i * 7919) % keys).as_bytes(),
                &value,
                0,
            ));
            store.apply(next, 1, 0, &c).expect("apply");
            next += 1;
        }
        t.elapsed().as_secs_f64() * 1e6 / keys as f64
    };
    let free = puts(&mut store);
    let snap = store.snapshot();
    let held = puts(&mut store);
    drop(snap);
    let after = puts(&mut store);
    println!(
        "puts over every key: {free:.2} us/put, {held:.2} us/put while a snapshot is held \
         (pre-images saved), {after:.2} us/put after it is dropped"
    );
}

/// Times a split of a logged store shaped like a W10 range when it splits (about 90 MB:
/// 22 000 keys of 4 KiB, each written twice, so half its history is overwritten versions):
/// what applying the split entry costs the thread that applies it, on every replica.
fn split(base: &std::path::Path) {
    let keys = 22_000u64;
    let value = vec![7u8; 4096];
    for round in 0..3 {
        let mut store = KvStore::open(config(Persistence::Logged {
            dir: base.join(format!("split{round}")),
        }))
        .expect("open");
        for i in 0..2 * keys {
            let c = cmd::encode(&cmd::put(
                format!("key{:012}", i % keys).as_bytes(),
                &value,
                0,
            ));
            store.apply(i + 1, 1, 0, &c).expect("apply");
        }
        store.persist().expect("persist");
        let at = format!("key{:012}", keys / 2);
        let right = config(Persistence::Logged {
            dir: base.join(format!("split{round}-right")),
        });
        let t = Instant::now();
        let r = store
            .split_off(2 * keys + 1, 1, at.as_bytes(), right)
            .expect("split");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        store.wait_image_write().expect("left image");
        let left_ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "split of {} MB live ({keys} keys of 4 KiB, each written twice; {} history \
             events): {ms:.1} ms on the applying thread, then {left_ms:.1} ms until both \
             halves' images are durable",
            (keys * 4096) >> 20,
            store.range_stats().history_events + r.range_stats().history_events,
        );
    }
}

fn main() {
    let ops = env("QUIVER_KV_BENCH_OPS", 100_000);
    let base = match std::env::var("QUIVER_KV_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("tempdir"),
        Err(_) => tempfile::tempdir().expect("tempdir"),
    };
    if std::env::var("QUIVER_KV_BENCH_APPLY_ONLY").is_ok() {
        apply_random(ops);
        return;
    }
    if std::env::var("QUIVER_KV_BENCH_SPLIT_ONLY").is_ok() {
        split(base.path());
        return;
    }
    apply_random(ops);
    capture(base.path());
    split(base.path());
    if std::env::var("QUIVER_KV_BENCH_CAPTURE_ONLY").is_ok() {
        return;
    }
    for batch in [1, 100] {
        throughput("memory", Persistence::Memory, ops, batch);
        throughput(
            "logged (snapshot every 1000)",
            Persistence::Logged {
                dir: base.path().join(format!("logged{batch}")),
            },
            ops,
            batch,
        );
        throughput(
            "persistent",
            Persistence::Persistent {
                dir: base.path().join(format!("persistent{batch}")),
            },
            ops,
            batch,
        );
    }

    let mb = env("QUIVER_KV_BENCH_MB", 512);
    let mut store = KvStore::open(config(Persistence::Persistent {
        dir: base.path().join("big"),
    }))
    .expect("open");
    let value_len = 64 << 10;
    let n = (mb << 20) / value_len;
    let (rss0, anon0) = (status_kib("VmRSS:"), status_kib("RssAnon:"));
    let t = Instant::now();
    for i in 0..n {
        let v = vec![(i % 251) as u8; value_len as usize];
        store
            .apply(
                i + 1,
                1,
                0,
                &cmd::encode(&cmd::put(format!("big{i:08}").as_bytes(), &v, 0)),
            )
            .expect("apply");
        if i % 256 == 255 {
            store.persist().expect("persist");
        }
    }
    store.persist().expect("persist");
    let secs = t.elapsed().as_secs_f64();
    let (rss1, anon1) = (status_kib("VmRSS:"), status_kib("RssAnon:"));
    let mut checked = 0;
    for i in (0..n).step_by(97) {
        let (kv, _) = store.get(format!("big{i:08}").as_bytes(), 0).expect("get");
        assert_eq!(kv.expect("present").value.len() as u64, value_len);
        checked += 1;
    }
    println!(
        "persistent big values: {mb} MiB in {n} values of 64 KiB at {:.0} MiB/s; \
         VmRSS {} -> {} MiB (seglog releases written pages), \
         RssAnon {} -> {} MiB; values held in memory by the index: {} bytes; \
         {checked} values read back",
        mb as f64 / secs,
        rss0 >> 10,
        rss1 >> 10,
        anon0 >> 10,
        anon1 >> 10,
        store.inline_value_bytes()
    );
}
