//! Property tests of the linearizability checker: histories from a real register are always
//! linearizable; planted violations are always detected.

use checker::history::{Key, KvHistory, KvOp, KvOut, Outcome, Value};
use checker::linearizable::{check_kv, CheckOptions, CheckResult};
use checker::synth::{kv_history, Rng, SynthConfig};
use proptest::prelude::*;

fn opts() -> CheckOptions {
    CheckOptions {
        deadline: std::time::Duration::from_secs(20),
        ..CheckOptions::default()
    }
}

fn config() -> impl Strategy<Value = (u64, SynthConfig)> {
    (
        any::<u64>(),
        1usize..250,
        1u64..7,
        1u64..6,
        0u32..3,
        0u32..3,
    )
        .prop_map(|(seed, ops, clients, keys, fail, unknown)| {
            let cfg = SynthConfig {
                ops,
                clients,
                keys,
                p_fail: f64::from(fail) * 0.04,
                p_unknown: f64::from(unknown) * 0.04,
                ..SynthConfig::default()
            };
            (seed, cfg)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn register_histories_are_linearizable((seed, cfg) in config()) {
        let h = kv_history(seed, &cfg);
        let r = check_kv(&h, &opts());
        prop_assert_eq!(&r.result, &CheckResult::Linearizable, "{}\n{}", r, h);
        prop_assert_eq!(r.operations, h.len());
    }

    #[test]
    fn text_round_trip((seed, cfg) in config()) {
        let h = kv_history(seed, &cfg);
        prop_assert_eq!(KvHistory::from_text(&h.to_text()).unwrap(), h);
    }
}

// ----- planted violations -------------------------------------------------------------------

/// Facts about a history that scenarios build on.
struct Ctx {
    end: u64,
    fresh_key: Key,
    fresh_value: Value,
}

fn ctx(h: &KvHistory) -> Ctx {
    let end = h
        .ops
        .iter()
        .map(|o| o.complete.max(o.invoke))
        .max()
        .unwrap_or(0)
        + 1000;
    let fresh_key = h
        .ops
        .iter()
        .map(|o| o.input.key())
        .max()
        .map_or(0, |k| k + 1);
    let mut max_v = 0;
    for o in &h.ops {
        match o.input {
            KvOp::Put { value, .. } => max_v = max_v.max(value),
            KvOp::Cas { new, expected, .. } => max_v = max_v.max(new).max(expected.unwrap_or(0)),
            _ => {}
        }
        if let Outcome::Ok(KvOut::Get(Some(v))) = o.outcome {
            max_v = max_v.max(v);
        }
    }
    Ctx {
        end,
        fresh_key,
        fresh_value: max_v + 1000,
    }
}

fn any_key(h: &KvHistory, rng: &mut Rng) -> Key {
    if h.is_empty() {
        0
    } else {
        h.ops[rng.below(h.len() as u64) as usize].input.key()
    }
}

/// Sequential ops by a planted client, starting at `t`, each 10 units long.
struct Seq<'a> {
    h: &'a mut KvHistory,
    t: u64,
}

impl Seq<'_> {
    fn op(&mut self, input: KvOp, out: Outcome<KvOut>) -> &mut Self {
        self.h.push(9_999, self.t, self.t + 10, input, out);
        self.t += 20;
        self
    }
    fn put(&mut self, key: Key, value: Value) -> &mut Self {
        self.op(KvOp::Put { key, value }, Outcome::Ok(KvOut::Put))
    }
    fn get(&mut self, key: Key, v: Option<Value>) -> &mut Self {
        self.op(KvOp::Get { key }, Outcome::Ok(KvOut::Get(v)))
    }
    fn cas(&mut self, key: Key, expected: Option<Value>, new: Value, ok: bool) -> &mut Self {
        self.op(
            KvOp::Cas { key, expected, new },
            Outcome::Ok(KvOut::Cas(ok)),
        )
    }
}

fn seq(h: &mut KvHistory, t: u64) -> Seq<'_> {
    Seq { h, t }
}

type Mutation = fn(&mut KvHistory, &mut Rng);

/// Read an older value after a newer write completed.
fn stale_read(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    let (a, b) = (c.fresh_value, c.fresh_value + 1);
    seq(h, c.end).put(k, a).put(k, b).get(k, Some(a));
}

/// An acknowledged put to a fresh key, then the key reads as absent.
fn lost_acknowledged_write(h: &mut KvHistory, _: &mut Rng) {
    let c = ctx(h);
    seq(h, c.end)
        .put(c.fresh_key, c.fresh_value)
        .get(c.fresh_key, None);
}

/// A read, at a random time, of a value nobody wrote.
fn read_never_written(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    let t = rng.below(c.end);
    h.push(
        9_999,
        t,
        t + 5,
        KvOp::Get { key: k },
        Outcome::Ok(KvOut::Get(Some(c.fresh_value))),
    );
}

/// An existing acknowledged get's result replaced by a value nobody wrote.
fn corrupt_existing_read(h: &mut KvHistory, rng: &mut Rng) {
    let c = ctx(h);
    let gets: Vec<usize> = h
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Ok(KvOut::Get(_))))
        .map(|o| o.id)
        .collect();
    if gets.is_empty() {
        return read_never_written(h, rng);
    }
    let i = gets[rng.below(gets.len() as u64) as usize];
    h.ops[i].outcome = Outcome::Ok(KvOut::Get(Some(c.fresh_value)));
}

/// A CAS that succeeded against a value that had been overwritten.
fn cas_succeeded_on_wrong_value(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    let (a, b, n) = (c.fresh_value, c.fresh_value + 1, c.fresh_value + 2);
    seq(h, c.end).put(k, a).put(k, b).cas(k, Some(a), n, true);
}

/// A CAS that reported failure although the value matched (fresh key: no pending writes).
fn cas_failed_on_matching_value(h: &mut KvHistory, _: &mut Rng) {
    let c = ctx(h);
    let k = c.fresh_key;
    seq(h, c.end)
        .put(k, c.fresh_value)
        .cas(k, Some(c.fresh_value), c.fresh_value + 1, false);
}

/// A CAS from "absent" succeeded on a key that had a value.
fn cas_on_absent_succeeded_on_present_key(h: &mut KvHistory, _: &mut Rng) {
    let c = ctx(h);
    let k = c.fresh_key;
    seq(h, c.end)
        .put(k, c.fresh_value)
        .cas(k, None, c.fresh_value + 1, true);
}

/// A read sees the new value of a concurrent write, a later read sees the old one again.
fn real_time_order_violated(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    let (a, b, t) = (c.fresh_value, c.fresh_value + 1, c.end);
    h.push(
        9_001,
        t,
        t + 10,
        KvOp::Put { key: k, value: a },
        Outcome::Ok(KvOut::Put),
    );
    h.push(
        9_002,
        t + 20,
        t + 200,
        KvOp::Put { key: k, value: b },
        Outcome::Ok(KvOut::Put),
    );
    h.push(
        9_003,
        t + 30,
        t + 40,
        KvOp::Get { key: k },
        Outcome::Ok(KvOut::Get(Some(b))),
    );
    h.push(
        9_004,
        t + 50,
        t + 60,
        KvOp::Get { key: k },
        Outcome::Ok(KvOut::Get(Some(a))),
    );
}

/// A read returns the value of a write that definitely failed.
fn read_of_failed_write(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    let t = c.end;
    h.push(
        9_001,
        t,
        t + 10,
        KvOp::Put {
            key: k,
            value: c.fresh_value,
        },
        Outcome::Fail,
    );
    h.push(
        9_002,
        t + 5,
        t + 30,
        KvOp::Get { key: k },
        Outcome::Ok(KvOut::Get(Some(c.fresh_value))),
    );
}

/// An acknowledged write in the history turned into a failure while a read saw its value.
fn observed_write_marked_failed(h: &mut KvHistory, rng: &mut Rng) {
    let observed: Vec<Value> = h
        .ops
        .iter()
        .filter_map(|o| match o.outcome {
            Outcome::Ok(KvOut::Get(Some(v))) => Some(v),
            _ => None,
        })
        .collect();
    let writer = h.ops.iter().position(|o| {
        let v = match o.input {
            KvOp::Put { value, .. } => value,
            KvOp::Cas { new, .. } => new,
            _ => return false,
        };
        !o.outcome.is_fail() && observed.contains(&v)
    });
    match writer {
        Some(i) => h.ops[i].outcome = Outcome::Fail,
        None => read_of_failed_write(h, rng),
    }
}

/// A read returns a value whose (unknown) write was invoked only after the read completed.
fn read_from_the_future(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    let t = c.end;
    h.push(
        9_001,
        t,
        t + 10,
        KvOp::Get { key: k },
        Outcome::Ok(KvOut::Get(Some(c.fresh_value))),
    );
    h.push(
        9_002,
        t + 20,
        t + 30,
        KvOp::Put {
            key: k,
            value: c.fresh_value,
        },
        Outcome::Unknown,
    );
}

/// A value comes back after an acknowledged delete.
fn deleted_value_resurrected(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    seq(h, c.end)
        .put(k, c.fresh_value)
        .op(KvOp::Delete { key: k }, Outcome::Ok(KvOut::Delete))
        .get(k, Some(c.fresh_value));
}

/// Two sequential CAS from the same value both succeed (one was applied twice / lost).
fn cas_applied_twice(h: &mut KvHistory, rng: &mut Rng) {
    let (c, k) = (ctx(h), any_key(h, rng));
    let a = c.fresh_value;
    seq(h, c.end)
        .put(k, a)
        .cas(k, Some(a), a + 1, true)
        .cas(k, Some(a), a + 2, true);
}

/// A completed read of a fresh key sees a value before its only write was invoked.
fn unknown_write_seen_too_early(h: &mut KvHistory, _: &mut Rng) {
    let c = ctx(h);
    let k = c.fresh_key;
    let t = c.end;
    h.push(
        9_001,
        t,
        t + 10,
        KvOp::Get { key: k },
        Outcome::Ok(KvOut::Get(Some(c.fresh_value))),
    );
    h.push(
        9_002,
        t + 11,
        t + 12,
        KvOp::Put {
            key: k,
            value: c.fresh_value,
        },
        Outcome::Unknown,
    );
    h.push(
        9_003,
        t + 20,
        t + 30,
        KvOp::Get { key: k },
        Outcome::Ok(KvOut::Get(Some(c.fresh_value))),
    );
}

fn assert_detected(seed: u64, cfg: &SynthConfig, mutate: Mutation) -> Result<(), TestCaseError> {
    let mut h = kv_history(seed, cfg);
    let mut rng = Rng::new(seed ^ 0x5eed);
    mutate(&mut h, &mut rng);
    h.normalize();
    let r = check_kv(&h, &opts());
    prop_assert!(r.is_illegal(), "not detected:\n{}\n{}", r, h);
    let CheckResult::Illegal { slice, .. } = &r.result else {
        unreachable!()
    };
    prop_assert!(
        !slice.is_empty() && slice.len() <= 8,
        "slice not small:\n{}",
        r
    );
    Ok(())
}

macro_rules! mutation_tests {
    ($($name:ident),* $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(40))]
            $(
                #[test]
                fn $name((seed, cfg) in config()) {
                    assert_detected(seed, &cfg, super::$name)?;
                }
            )*
        }
    };
}

mod detected {
    use super::*;
    mutation_tests!(
        stale_read,
        lost_acknowledged_write,
        read_never_written,
        corrupt_existing_read,
        cas_succeeded_on_wrong_value,
        cas_failed_on_matching_value,
        cas_on_absent_succeeded_on_present_key,
        real_time_order_violated,
        read_of_failed_write,
        observed_write_marked_failed,
        read_from_the_future,
        deleted_value_resurrected,
        cas_applied_twice,
        unknown_write_seen_too_early,
    );
}

// ----- exactness: the pruned search agrees with brute force on small random histories ----------

/// Every ordering of the known ops plus any subset of the unknown writes, respecting real time
/// (a known op that completed before another was invoked goes first). No pruning, no memo.
fn brute_force(h: &KvHistory) -> bool {
    use checker::linearizable::{KvRegister, Model};
    let ops: Vec<_> = h
        .ops
        .iter()
        .filter(|o| !o.outcome.is_fail() && (!o.outcome.is_unknown() || o.input.is_write()))
        .collect();
    fn go(
        ops: &[&checker::history::Op<KvOp, KvOut>],
        done: &mut Vec<bool>,
        state: Option<Value>,
    ) -> bool {
        let known_left = ops
            .iter()
            .zip(done.iter())
            .any(|(o, d)| !d && !o.outcome.is_unknown());
        if !known_left {
            return true;
        }
        for i in 0..ops.len() {
            if done[i] {
                continue;
            }
            // i may go next only if no pending known op completed before i was invoked
            let blocked = ops.iter().enumerate().any(|(j, o)| {
                j != i && !done[j] && !o.outcome.is_unknown() && o.complete < ops[i].invoke
            });
            if blocked {
                continue;
            }
            if let Some(ns) = KvRegister.step(&state, &ops[i].input, ops[i].outcome.ok()) {
                done[i] = true;
                let ok = go(ops, done, ns);
                done[i] = false;
                if ok {
                    return true;
                }
            }
        }
        false
    }
    let mut done = vec![false; ops.len()];
    go(&ops, &mut done, None)
}

fn small_history() -> impl Strategy<Value = KvHistory> {
    let op = (
        0u64..12,
        0u64..6,
        0u8..5,
        0u64..4,
        0u64..4,
        0u8..10,
        any::<bool>(),
    );
    proptest::collection::vec(op, 0..8).prop_map(|ops| {
        let mut h = KvHistory::new();
        for (p, (t, d, kind, a, b, status, flag)) in ops.into_iter().enumerate() {
            let opt = |v: u64| (v > 0).then_some(v);
            let (input, out) = match kind {
                0 | 1 => (KvOp::Get { key: 0 }, KvOut::Get(opt(a))),
                2 => (
                    KvOp::Put {
                        key: 0,
                        value: a + 1,
                    },
                    KvOut::Put,
                ),
                3 => (
                    KvOp::Cas {
                        key: 0,
                        expected: opt(a),
                        new: b + 1,
                    },
                    KvOut::Cas(flag),
                ),
                _ => (KvOp::Delete { key: 0 }, KvOut::Delete),
            };
            let outcome = match status {
                0 => Outcome::Fail,
                1 | 2 => Outcome::Unknown,
                _ => Outcome::Ok(out),
            };
            h.push(p as u64, t, t + d, input, outcome);
        }
        h.normalize();
        h
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn search_agrees_with_brute_force(h in small_history()) {
        let r = check_kv(&h, &opts());
        let decided = !matches!(r.result, CheckResult::Unknown { .. });
        prop_assert!(decided);
        prop_assert_eq!(r.is_linearizable(), brute_force(&h), "{}\n{}", r, h);
    }
}
