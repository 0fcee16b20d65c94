//! Checker speed: `cargo bench -p checker --bench checker` (release). Plain main, no harness.
//!
//! Workloads come from `checker::synth` (a real register / a real log with random linearization
//! points), so every history is valid unless a violation is planted.

use std::time::{Duration, Instant};

use checker::append::check_append;
use checker::history::{KvOp, KvOut, Outcome};
use checker::linearizable::{check_kv, CheckOptions};
use checker::synth::{append_history, kv_history, SynthConfig};

fn kv(ops: usize, keys: u64, clients: u64, p_unknown: f64, plant: bool) {
    let cfg = SynthConfig {
        ops,
        clients,
        keys,
        p_fail: 0.01,
        p_unknown,
        ..SynthConfig::default()
    };
    let t = Instant::now();
    let mut h = kv_history(42, &cfg);
    let gen = t.elapsed();
    if plant {
        // a stale read at the end of key 0
        let end = h.ops.iter().map(|o| o.complete).max().unwrap_or(0) + 1000;
        let (a, b) = (u64::MAX - 2, u64::MAX - 1);
        h.push(
            1,
            end,
            end + 10,
            KvOp::Put { key: 0, value: a },
            Outcome::Ok(KvOut::Put),
        );
        h.push(
            1,
            end + 20,
            end + 30,
            KvOp::Put { key: 0, value: b },
            Outcome::Ok(KvOut::Put),
        );
        h.push(
            1,
            end + 40,
            end + 50,
            KvOp::Get { key: 0 },
            Outcome::Ok(KvOut::Get(Some(a))),
        );
        h.normalize();
    }
    let opts = CheckOptions {
        deadline: Duration::from_secs(120),
        ..CheckOptions::default()
    };
    let r = check_kv(&h, &opts);
    let slice = match &r.result {
        checker::linearizable::CheckResult::Illegal { slice, .. } => slice.len(),
        _ => 0,
    };
    println!(
        "kv  {:>9} ops {:>5} keys {:>3} clients {:>4.1}% unknown planted={:<5} -> {:<16} in {:>8.3}s (generate {:.3}s, failing slice {} ops)",
        h.len(),
        keys,
        clients,
        p_unknown * 100.0,
        plant,
        if r.is_linearizable() { "linearizable" } else if r.is_illegal() { "ILLEGAL" } else { "UNKNOWN" },
        r.elapsed.as_secs_f64(),
        gen.as_secs_f64(),
        slice,
    );
}

fn append(ops: usize, clients: u64) {
    let cfg = SynthConfig {
        ops,
        clients,
        p_fail: 0.01,
        p_unknown: 0.01,
        ..SynthConfig::default()
    };
    let (h, finals) = append_history(7, &cfg, 3);
    let t = Instant::now();
    let r = check_append(&h, &finals);
    println!(
        "log {:>9} ops {:>5} entries {:>3} clients -> {:<16} in {:>8.3}s",
        h.len(),
        r.final_len,
        clients,
        if r.is_valid() { "valid" } else { "ANOMALIES" },
        t.elapsed().as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is ignored too.
    kv(100_000, 100, 10, 0.01, false);
    kv(100_000, 100, 10, 0.01, true);
    kv(1_000_000, 1000, 10, 0.01, false);
    kv(10_000, 1, 10, 0.0, false);
    kv(10_000, 1, 10, 0.01, false);
    // Reads copy the log, so keep the append history moderate.
    append(20_000, 10);
}
