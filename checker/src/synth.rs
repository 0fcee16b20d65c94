//! Synthetic histories from real (sequential) objects, for property tests, benches and checking
//! the checkers: every operation gets a random linearization point inside its
//! `[invoke, complete]` interval and the outputs come from applying the operations in that order,
//! so the histories are linearizable (KV) or anomaly-free (append) by construction.
//!
//! Failed operations are never applied. Unknown writes are applied at a random point after their
//! invoke (possibly after their recorded completion) or not at all. Values written are unique.
//! Seeded ([`Rng`] is SplitMix64), so a history replays from its seed.

use std::collections::HashMap;

use crate::history::{
    AppendHistory, AppendOp, AppendOut, Key, KvHistory, KvOp, KvOut, Outcome, Value,
};

/// A small seeded PRNG (SplitMix64): enough for workloads, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

/// Shape of a synthetic workload.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Operations to generate.
    pub ops: usize,
    /// Concurrent clients (each performs one operation at a time).
    pub clients: u64,
    /// Distinct keys (KV only).
    pub keys: u64,
    /// Probability that an operation fails (definitely not applied).
    pub p_fail: f64,
    /// Probability that an operation's outcome is unknown.
    pub p_unknown: f64,
    /// Maximum operation duration (time units of 1 µs).
    pub max_duration: u64,
    /// Maximum pause of a client between operations (µs).
    pub max_gap: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            ops: 1000,
            clients: 5,
            keys: 5,
            p_fail: 0.03,
            p_unknown: 0.03,
            max_duration: 100,
            max_gap: 20,
        }
    }
}

/// One generated operation before outputs are known.
struct Planned<I> {
    process: u64,
    invoke: u64,
    complete: u64,
    input: I,
    status: u8, // 0 ok, 1 fail, 2 unknown
    lin: Option<(u64, u64)>,
}

/// Client timing and outcomes shared by both workloads.
fn plan<I>(
    rng: &mut Rng,
    cfg: &SynthConfig,
    mut input: impl FnMut(&mut Rng) -> I,
) -> Vec<Planned<I>> {
    let clients = cfg.clients.max(1);
    let mut clock = vec![0u64; clients as usize];
    // Clients are retired after an unknown outcome (as a real harness does): fresh process ids.
    let mut process: Vec<u64> = (0..clients).collect();
    let mut next_process = clients;
    let mut out = Vec::with_capacity(cfg.ops);
    for _ in 0..cfg.ops {
        let c = rng.below(clients) as usize;
        let invoke = clock[c] + rng.below(cfg.max_gap + 1) * 1000 + 1;
        let dur = (1 + rng.below(cfg.max_duration.max(1))) * 1000;
        let complete = invoke + dur;
        clock[c] = complete;
        let roll = rng.below(1_000_000) as f64 / 1e6;
        let status = if roll < cfg.p_fail {
            1
        } else if roll < cfg.p_fail + cfg.p_unknown {
            2
        } else {
            0
        };
        let lin = match status {
            0 => Some((invoke + rng.below(dur + 1), rng.next_u64())),
            2 if rng.chance(0.5) => Some((invoke + rng.below(3 * dur + 1), rng.next_u64())),
            _ => None,
        };
        out.push(Planned {
            process: process[c],
            invoke,
            complete,
            input: input(rng),
            status,
            lin,
        });
        if status == 2 {
            process[c] = next_process;
            next_process += 1;
        }
    }
    out
}

/// A linearizable KV history (puts, gets, CAS, deletes over `cfg.keys` keys).
pub fn kv_history(seed: u64, cfg: &SynthConfig) -> KvHistory {
    let mut rng = Rng::new(seed);
    let keys = cfg.keys.max(1);
    let mut next_value: Value = 1;
    // Values recently written per key, for CAS expectations that sometimes match.
    let mut recent: HashMap<Key, Vec<Value>> = HashMap::new();
    let planned = plan(&mut rng, cfg, |rng| {
        let key = rng.below(keys);
        match rng.below(10) {
            0..=3 => KvOp::Get { key },
            4..=6 => {
                let value = next_value;
                next_value += 1;
                recent.entry(key).or_default().push(value);
                KvOp::Put { key, value }
            }
            7 | 8 => {
                let r = recent.entry(key).or_default();
                let expected = if r.is_empty() || rng.chance(0.2) {
                    None
                } else {
                    let back = (rng.below(3) as usize).min(r.len() - 1);
                    Some(r[r.len() - 1 - back])
                };
                let new = next_value;
                next_value += 1;
                r.push(new);
                KvOp::Cas { key, expected, new }
            }
            _ => KvOp::Delete { key },
        }
    });
    let mut order: Vec<usize> = (0..planned.len())
        .filter(|&i| planned[i].lin.is_some())
        .collect();
    order.sort_by_key(|&i| planned[i].lin);
    let mut state: HashMap<Key, Value> = HashMap::new();
    let mut outputs: Vec<Option<KvOut>> = vec![None; planned.len()];
    for i in order {
        let out = match planned[i].input {
            KvOp::Get { key } => KvOut::Get(state.get(&key).copied()),
            KvOp::Put { key, value } => {
                state.insert(key, value);
                KvOut::Put
            }
            KvOp::Cas { key, expected, new } => {
                let ok = state.get(&key).copied() == expected;
                if ok {
                    state.insert(key, new);
                }
                KvOut::Cas(ok)
            }
            KvOp::Delete { key } => {
                state.remove(&key);
                KvOut::Delete
            }
        };
        outputs[i] = Some(out);
    }
    let mut h = KvHistory::new();
    for (p, out) in planned.into_iter().zip(outputs) {
        let outcome = match (p.status, out) {
            (0, Some(o)) => Outcome::Ok(o),
            (1, _) => Outcome::Fail,
            _ => Outcome::Unknown,
        };
        h.push(p.process, p.invoke, p.complete, p.input, outcome);
    }
    h.normalize();
    h
}

/// An anomaly-free append history and the final reads of `replicas` replicas (replica 0, the
/// leader, holds the whole log; the others random prefixes). Reads are mostly whole-log reads,
/// some ranges.
pub fn append_history(
    seed: u64,
    cfg: &SynthConfig,
    replicas: u64,
) -> (AppendHistory, Vec<(u64, Vec<u64>)>) {
    let mut rng = Rng::new(seed);
    let mut next_value = 1u64;
    let planned = plan(&mut rng, cfg, |rng| {
        if rng.chance(0.5) {
            let value = next_value;
            next_value += 1;
            AppendOp::Append { value }
        } else if rng.chance(0.7) {
            AppendOp::Read { from: 0, to: None }
        } else {
            let from = rng.below(8);
            let to = rng.chance(0.5).then(|| from + rng.below(8));
            AppendOp::Read { from, to }
        }
    });
    let mut order: Vec<usize> = (0..planned.len())
        .filter(|&i| planned[i].lin.is_some())
        .collect();
    order.sort_by_key(|&i| planned[i].lin);
    let mut log: Vec<u64> = Vec::new();
    let mut outputs: Vec<Option<AppendOut>> = vec![None; planned.len()];
    for i in order {
        let out = match planned[i].input {
            AppendOp::Append { value } => {
                log.push(value);
                AppendOut::Index(log.len() as u64 - 1)
            }
            AppendOp::Read { from, to } => {
                let lo = (from as usize).min(log.len());
                let hi = to.map_or(log.len(), |t| (t as usize).clamp(lo, log.len()));
                AppendOut::Values(log[lo..hi].to_vec())
            }
        };
        outputs[i] = Some(out);
    }
    let mut h = AppendHistory::new();
    for (p, out) in planned.into_iter().zip(outputs) {
        let outcome = match (p.status, out) {
            (0, Some(o)) => Outcome::Ok(o),
            (1, _) => Outcome::Fail,
            _ => Outcome::Unknown,
        };
        h.push(p.process, p.invoke, p.complete, p.input, outcome);
    }
    h.normalize();
    let mut finals = vec![(0, log.clone())];
    for r in 1..replicas {
        let n = rng.below(log.len() as u64 + 1) as usize;
        finals.push((r, log[..n].to_vec()));
    }
    (h, finals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        let mut r = Rng::new(1);
        let hits = (0..1000).filter(|_| r.chance(0.25)).count();
        assert!((150..350).contains(&hits), "{hits}");
        assert!(!Rng::new(3).chance(0.0));
    }

    #[test]
    fn kv_history_has_all_outcomes() {
        let cfg = SynthConfig {
            p_fail: 0.1,
            p_unknown: 0.1,
            ..SynthConfig::default()
        };
        let h = kv_history(1, &cfg);
        let (ok, fail, unknown) = h.outcome_counts();
        assert_eq!(h.len(), 1000);
        assert!(
            ok > 600 && fail > 30 && unknown > 30,
            "{ok} {fail} {unknown}"
        );
        assert_eq!(kv_history(1, &cfg), h);
    }

    #[test]
    fn append_history_final_reads_are_prefixes() {
        let (h, finals) = append_history(3, &SynthConfig::default(), 3);
        assert_eq!(finals.len(), 3);
        assert!(!finals[0].1.is_empty());
        for (_, f) in &finals {
            assert_eq!(&finals[0].1[..f.len()], f.as_slice());
        }
        assert_eq!(h.len(), 1000);
    }
}
