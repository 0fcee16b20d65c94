//! Property tests of the append-log checker: histories of a real log are anomaly-free; planted
//! violations are always reported with the right kind.

use checker::append::{check_append, AnomalyKind, ReplicaId};
use checker::history::{AppendHistory, AppendOp, AppendOut, Outcome};
use checker::synth::{append_history, Rng, SynthConfig};
use proptest::prelude::*;

type Finals = Vec<(ReplicaId, Vec<u64>)>;

fn config() -> impl Strategy<Value = (u64, SynthConfig, u64)> {
    (
        any::<u64>(),
        1usize..300,
        1u64..8,
        0u32..3,
        0u32..3,
        1u64..5,
    )
        .prop_map(|(seed, ops, clients, fail, unknown, replicas)| {
            let cfg = SynthConfig {
                ops,
                clients,
                p_fail: f64::from(fail) * 0.05,
                p_unknown: f64::from(unknown) * 0.05,
                ..SynthConfig::default()
            };
            (seed, cfg, replicas)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn log_histories_are_valid((seed, cfg, replicas) in config()) {
        let (h, finals) = append_history(seed, &cfg, replicas);
        let r = check_append(&h, &finals);
        prop_assert!(r.is_valid(), "{}\n{}", r, h);
        prop_assert_eq!(r.lost_acked, 0);
        prop_assert_eq!(r.final_len, finals[0].1.len());
    }

    #[test]
    fn text_round_trip((seed, cfg, replicas) in config()) {
        let (h, _) = append_history(seed, &cfg, replicas);
        prop_assert_eq!(AppendHistory::from_text(&h.to_text()).unwrap(), h);
    }
}

// ----- planted violations -------------------------------------------------------------------

struct Ctx {
    end: u64,
    fresh: u64,
}

fn ctx(h: &AppendHistory) -> Ctx {
    let end = h.ops.iter().map(|o| o.complete).max().unwrap_or(0) + 1000;
    let fresh = h
        .ops
        .iter()
        .filter_map(|o| match o.input {
            AppendOp::Append { value } => Some(value),
            _ => None,
        })
        .max()
        .unwrap_or(0)
        + 1000;
    Ctx { end, fresh }
}

fn acked(h: &AppendHistory) -> Vec<(usize, u64, u64)> {
    h.ops
        .iter()
        .filter_map(|o| match (&o.input, &o.outcome) {
            (AppendOp::Append { value }, Outcome::Ok(AppendOut::Index(i))) => {
                Some((o.id, *value, *i))
            }
            _ => None,
        })
        .collect()
}

/// Appends `value` acknowledged at the end of the log (leader and history), at time `t`.
fn plant_append(h: &mut AppendHistory, f: &mut Finals, t: u64, value: u64) -> u64 {
    let idx = f[0].1.len() as u64;
    f[0].1.push(value);
    let out = Outcome::Ok(AppendOut::Index(idx));
    h.push(9_999, t, t + 10, AppendOp::Append { value }, out);
    idx
}

fn read_all(h: &mut AppendHistory, t: u64, vs: Vec<u64>) {
    let out = Outcome::Ok(AppendOut::Values(vs));
    h.push(9_998, t, t + 10, AppendOp::Read { from: 0, to: None }, out);
}

type Mutation = fn(&mut AppendHistory, &mut Finals, &mut Rng) -> AnomalyKind;

fn pick<T: Copy>(xs: &[T], rng: &mut Rng) -> Option<T> {
    (!xs.is_empty()).then(|| xs[rng.below(xs.len() as u64) as usize])
}

/// An acknowledged append vanishes from every replica.
fn lost_acknowledged_append(h: &mut AppendHistory, f: &mut Finals, rng: &mut Rng) -> AnomalyKind {
    let value = match pick(&acked(h), rng) {
        Some((_, v, _)) => v,
        None => {
            let c = ctx(h);
            plant_append(h, f, c.end, c.fresh);
            c.fresh
        }
    };
    for (_, seq) in f.iter_mut() {
        seq.retain(|&v| v != value);
    }
    AnomalyKind::LostAck
}

/// An entry appears twice in the leader's log.
fn duplicate_append(h: &mut AppendHistory, f: &mut Finals, rng: &mut Rng) -> AnomalyKind {
    if f[0].1.is_empty() {
        let c = ctx(h);
        plant_append(h, f, c.end, c.fresh);
    }
    let v = pick(&f[0].1, rng).expect("non-empty");
    f[0].1.push(v);
    AnomalyKind::Duplicate
}

/// A value nobody appended shows up in the log.
fn value_never_appended(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    f[0].1.push(c.fresh + 1);
    AnomalyKind::NeverAttempted
}

/// A value shows up in a read but was never appended.
fn read_of_never_appended(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    let mut vs = f[0].1.clone();
    vs.push(c.fresh + 1);
    read_all(h, c.end, vs);
    AnomalyKind::NeverAttempted
}

/// The value of a failed append is in the log.
fn failed_append_applied(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    h.push(
        9_999,
        c.end,
        c.end + 10,
        AppendOp::Append { value: c.fresh },
        Outcome::Fail,
    );
    f[0].1.push(c.fresh);
    AnomalyKind::FailedApplied
}

/// An acknowledged append reports the wrong index.
fn wrong_index(h: &mut AppendHistory, f: &mut Finals, rng: &mut Rng) -> AnomalyKind {
    let id = match pick(&acked(h), rng) {
        Some((id, _, _)) => id,
        None => {
            let c = ctx(h);
            plant_append(h, f, c.end, c.fresh);
            h.len() - 1
        }
    };
    if let Outcome::Ok(AppendOut::Index(i)) = &mut h.ops[id].outcome {
        *i += 1;
    }
    AnomalyKind::WrongIndex
}

/// A read returns a wrong value at some index of the log.
fn read_disagrees_with_log(h: &mut AppendHistory, f: &mut Finals, rng: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    let mut log = f[0].1.clone();
    while log.len() < 2 {
        let v = c.fresh + log.len() as u64;
        plant_append(h, f, c.end, v);
        log.push(v);
    }
    let i = rng.below(log.len() as u64 - 1) as usize;
    log.swap(i, i + 1);
    read_all(h, c.end + 100, log);
    AnomalyKind::ReadMismatch
}

/// Two appends in real-time order land in the opposite order.
fn real_time_order_violated(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    let i = plant_append(h, f, c.end, c.fresh) as usize;
    plant_append(h, f, c.end + 20, c.fresh + 1);
    f[0].1.swap(i, i + 1);
    for op in h.ops.iter_mut().rev().take(2) {
        if let Outcome::Ok(AppendOut::Index(x)) = &mut op.outcome {
            *x = if *x == i as u64 {
                i as u64 + 1
            } else {
                i as u64
            };
        }
    }
    AnomalyKind::RealTimeOrder
}

/// Two real-time ordered appends from the generated history swapped in the log.
fn existing_appends_reordered(h: &mut AppendHistory, f: &mut Finals, rng: &mut Rng) -> AnomalyKind {
    let a = acked(h);
    let pairs: Vec<(usize, usize)> = a
        .iter()
        .flat_map(|x| a.iter().map(move |y| (x.0, y.0)))
        .filter(|&(x, y)| h.ops[x].complete < h.ops[y].invoke)
        .collect();
    let Some((x, y)) = pick(&pairs, rng) else {
        return real_time_order_violated(h, f, rng);
    };
    let value = |id: usize| match h.ops[id].input {
        AppendOp::Append { value } => value,
        AppendOp::Read { .. } => unreachable!(),
    };
    let (vx, vy) = (value(x), value(y));
    for (_, seq) in f.iter_mut() {
        for v in seq.iter_mut() {
            if *v == vx {
                *v = vy;
            } else if *v == vy {
                *v = vx;
            }
        }
    }
    AnomalyKind::RealTimeOrder
}

/// A read that began after another completed sees a shorter log.
fn non_monotonic_read(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    if f[0].1.is_empty() {
        plant_append(h, f, c.end, c.fresh);
    }
    let log = f[0].1.clone();
    read_all(h, c.end + 100, log.clone());
    read_all(h, c.end + 200, log[..log.len() - 1].to_vec());
    AnomalyKind::NonMonotonicRead
}

/// A read invoked after an append was acknowledged does not see it.
fn stale_read(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    let before = f[0].1.clone();
    plant_append(h, f, c.end, c.fresh);
    read_all(h, c.end + 100, before);
    AnomalyKind::StaleRead
}

/// A follower holds a different entry than the leader at some index.
fn replica_divergence(h: &mut AppendHistory, f: &mut Finals, rng: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    if f[0].1.is_empty() {
        plant_append(h, f, c.end, c.fresh);
    }
    let mut seq = f[0].1.clone();
    let i = rng.below(seq.len() as u64) as usize;
    seq[i] = c.fresh + 7;
    seq.truncate(i + 1);
    f.push((99, seq));
    AnomalyKind::ReplicaDivergence
}

/// A follower applies an entry twice.
fn replica_applies_twice(h: &mut AppendHistory, f: &mut Finals, rng: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    if f[0].1.len() < 2 {
        plant_append(h, f, c.end, c.fresh);
        plant_append(h, f, c.end + 20, c.fresh + 1);
    }
    let n = 1 + rng.below(f[0].1.len() as u64 - 1) as usize;
    let mut seq = f[0].1[..n].to_vec();
    seq.push(seq[n - 1]);
    f.push((99, seq));
    AnomalyKind::ReplicaDuplicate
}

/// An append with unknown outcome lands twice (a retry applied again).
fn unknown_append_applied_twice(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    h.push(
        9_999,
        c.end,
        c.end + 10,
        AppendOp::Append { value: c.fresh },
        Outcome::Unknown,
    );
    f[0].1.push(c.fresh);
    f[0].1.push(c.fresh);
    AnomalyKind::Duplicate
}

/// Two reads past the end of the final log disagree with each other.
fn reads_disagree(h: &mut AppendHistory, f: &mut Finals, _: &mut Rng) -> AnomalyKind {
    let c = ctx(h);
    let mut a = f[0].1.clone();
    let mut b = a.clone();
    h.push(
        9_999,
        c.end,
        u64::MAX / 2,
        AppendOp::Append { value: c.fresh },
        Outcome::Unknown,
    );
    h.push(
        9_999,
        c.end,
        u64::MAX / 2,
        AppendOp::Append { value: c.fresh + 1 },
        Outcome::Unknown,
    );
    a.push(c.fresh);
    b.push(c.fresh + 1);
    read_all(h, c.end + 100, a);
    read_all(h, c.end + 100, b);
    AnomalyKind::ReadsDisagree
}

fn assert_detected(
    seed: u64,
    cfg: &SynthConfig,
    replicas: u64,
    mutate: Mutation,
) -> Result<(), TestCaseError> {
    let (mut h, mut finals) = append_history(seed, cfg, replicas);
    let mut rng = Rng::new(seed ^ 0xa99e);
    let kind = mutate(&mut h, &mut finals, &mut rng);
    h.normalize();
    let r = check_append(&h, &finals);
    prop_assert!(r.has(kind), "{} not detected:\n{}\n{}", kind, r, h);
    if kind == AnomalyKind::LostAck {
        prop_assert!(r.lost_acked >= 1);
    }
    Ok(())
}

macro_rules! mutation_tests {
    ($($name:ident),* $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(100))]
            $(
                #[test]
                fn $name((seed, cfg, replicas) in config()) {
                    assert_detected(seed, &cfg, replicas, super::$name)?;
                }
            )*
        }
    };
}

mod detected {
    use super::*;
    mutation_tests!(
        lost_acknowledged_append,
        duplicate_append,
        value_never_appended,
        read_of_never_appended,
        failed_append_applied,
        wrong_index,
        read_disagrees_with_log,
        real_time_order_violated,
        existing_appends_reordered,
        non_monotonic_read,
        stale_read,
        replica_divergence,
        replica_applies_twice,
        unknown_append_applied_twice,
        reads_disagree,
    );
}
