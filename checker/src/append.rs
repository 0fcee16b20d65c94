//! An Elle-style checker for append-only logs (raft entries now, Log collections later). Reads
//! reveal the order directly, so there is no search: every rule is a sort and a sweep.
//!
//! Input: an [`AppendHistory`] (`append(value) -> index`, `read(from..to) -> values`, positions
//! 0-based, appended values unique) and the final reads of each replica's applied sequence. The
//! longest final read (the leader's) is the *final order*.
//!
//! Rules (FAULTS.md §1), each reported as an [`AnomalyKind`]:
//! 1. every acknowledged append appears in the final order ([`AnomalyKind::LostAck`]), exactly
//!    once ([`AnomalyKind::Duplicate`]), at the index it was acknowledged with
//!    ([`AnomalyKind::WrongIndex`]);
//! 2. no value appears that was never attempted ([`AnomalyKind::NeverAttempted`]) or whose append
//!    definitely failed ([`AnomalyKind::FailedApplied`]);
//! 3. every read is a slice of the final order ([`AnomalyKind::ReadMismatch`]) and reads beyond
//!    it agree with each other ([`AnomalyKind::ReadsDisagree`]);
//! 4. if append A was acknowledged before append B was invoked, `idx(A) < idx(B)`
//!    ([`AnomalyKind::RealTimeOrder`]);
//! 5. if read R1 completed before R2 began, R2 reaches at least as far
//!    ([`AnomalyKind::NonMonotonicRead`]);
//! 6. an acknowledged append is visible to every read invoked after the acknowledgement
//!    ([`AnomalyKind::StaleRead`]);
//! 7. every replica's applied sequence is a prefix of the longest
//!    ([`AnomalyKind::ReplicaDivergence`]) without repeats ([`AnomalyKind::ReplicaDuplicate`]).
//!
//! Unknown appends may appear once or not at all; failed and unknown reads are ignored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::history::{AppendHistory, AppendOp, AppendOut, Op, Outcome};

/// A replica id for final reads.
pub type ReplicaId = u64;

/// The kinds of anomaly the append checker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnomalyKind {
    /// An acknowledged append is missing from the final order.
    LostAck,
    /// A value appears more than once in the final order.
    Duplicate,
    /// A value appears (final order or a read) that no append attempted.
    NeverAttempted,
    /// A value whose append definitely failed appears.
    FailedApplied,
    /// An acknowledged append's index differs from its position in the final order.
    WrongIndex,
    /// A read disagrees with the final order (or reads past its end).
    ReadMismatch,
    /// Two reads disagree at an index past the end of the final order.
    ReadsDisagree,
    /// Real-time order of appends violated.
    RealTimeOrder,
    /// A read saw less than a read that completed before it began.
    NonMonotonicRead,
    /// A read missed an append acknowledged before it began.
    StaleRead,
    /// A replica's applied sequence is not a prefix of the longest one.
    ReplicaDivergence,
    /// A replica applied the same value twice.
    ReplicaDuplicate,
}

impl AnomalyKind {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::LostAck => "lost-ack",
            AnomalyKind::Duplicate => "duplicate",
            AnomalyKind::NeverAttempted => "never-attempted",
            AnomalyKind::FailedApplied => "failed-applied",
            AnomalyKind::WrongIndex => "wrong-index",
            AnomalyKind::ReadMismatch => "read-mismatch",
            AnomalyKind::ReadsDisagree => "reads-disagree",
            AnomalyKind::RealTimeOrder => "real-time-order",
            AnomalyKind::NonMonotonicRead => "non-monotonic-read",
            AnomalyKind::StaleRead => "stale-read",
            AnomalyKind::ReplicaDivergence => "replica-divergence",
            AnomalyKind::ReplicaDuplicate => "replica-duplicate",
        }
    }
}

impl fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One anomaly: its kind, the offending operations (ids), the replica if any, and a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// What rule was broken.
    pub kind: AnomalyKind,
    /// Ids of the offending operations in the history.
    pub ops: Vec<usize>,
    /// The replica, for replica anomalies.
    pub replica: Option<ReplicaId>,
    /// Human-readable detail.
    pub detail: String,
}

/// What the append checker did and found.
#[derive(Debug, Clone)]
pub struct AppendReport {
    /// Operations in the history.
    pub operations: usize,
    /// Appends: (ok, fail, unknown).
    pub appends: (usize, usize, usize),
    /// Acknowledged reads.
    pub reads: usize,
    /// Replicas whose final reads were given.
    pub replicas: usize,
    /// Length of the final order.
    pub final_len: usize,
    /// Acknowledged appends missing from the final order.
    pub lost_acked: usize,
    /// Every anomaly, grouped by kind in rule order.
    pub anomalies: Vec<Anomaly>,
    /// Time taken.
    pub elapsed: Duration,
    ops_text: HashMap<usize, String>,
}

impl AppendReport {
    /// True if no anomaly was found.
    pub fn is_valid(&self) -> bool {
        self.anomalies.is_empty()
    }
    /// Anomaly counts by kind.
    pub fn counts(&self) -> BTreeMap<AnomalyKind, usize> {
        let mut m = BTreeMap::new();
        for a in &self.anomalies {
            *m.entry(a.kind).or_insert(0) += 1;
        }
        m
    }
    /// True if at least one anomaly of `kind` was found.
    pub fn has(&self, kind: AnomalyKind) -> bool {
        self.anomalies.iter().any(|a| a.kind == kind)
    }
}

/// Anomalies shown per kind by `Display`.
const SHOW_PER_KIND: usize = 5;

impl fmt::Display for AppendReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_valid() {
            writeln!(f, "append log: VALID")?;
        } else {
            writeln!(f, "append log: {} ANOMALIES", self.anomalies.len())?;
        }
        let (ok, fail, unknown) = self.appends;
        writeln!(
            f,
            "  operations {} (appends ok {ok}, fail {fail}, unknown {unknown}; reads {}), \
             final order {} entries from {} replicas, {:.3}s",
            self.operations,
            self.reads,
            self.final_len,
            self.replicas,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "  acknowledged writes lost: {}", self.lost_acked)?;
        let counts = self.counts();
        if !counts.is_empty() {
            let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            writeln!(f, "  anomalies by kind: {}", list.join(", "))?;
        }
        for (kind, n) in counts {
            for a in self
                .anomalies
                .iter()
                .filter(|a| a.kind == kind)
                .take(SHOW_PER_KIND)
            {
                match a.replica {
                    Some(r) => writeln!(f, "  [{kind}] replica {r}: {}", a.detail)?,
                    None => writeln!(f, "  [{kind}] {}", a.detail)?,
                }
                for id in &a.ops {
                    if let Some(t) = self.ops_text.get(id) {
                        writeln!(f, "      {t}")?;
                    }
                }
            }
            if n > SHOW_PER_KIND {
                writeln!(f, "  [{kind}] ... {} more", n - SHOW_PER_KIND)?;
            }
        }
        Ok(())
    }
}

type AOp = Op<AppendOp, AppendOut>;

/// Checks an append history against the final reads of the replicas. Without final reads, the
/// longest whole-log read stands in for the final order and lost acknowledged appends are not
/// checked (nothing says what survived).
pub fn check_append(
    history: &AppendHistory,
    final_reads: &[(ReplicaId, Vec<u64>)],
) -> AppendReport {
    let start = Instant::now();
    let mut anomalies: Vec<Anomaly> = Vec::new();
    let mut add = |kind, ops: Vec<usize>, replica, detail: String| {
        anomalies.push(Anomaly {
            kind,
            ops,
            replica,
            detail,
        })
    };

    let appends: Vec<&AOp> = history
        .ops
        .iter()
        .filter(|o| matches!(o.input, AppendOp::Append { .. }))
        .collect();
    let reads: Vec<(&AOp, u64, Option<u64>, &[u64])> = history
        .ops
        .iter()
        .filter_map(|o| match (&o.input, &o.outcome) {
            (AppendOp::Read { from, to }, Outcome::Ok(AppendOut::Values(vs))) => {
                Some((o, *from, *to, vs.as_slice()))
            }
            _ => None,
        })
        .collect();
    let value_of = |o: &AOp| match o.input {
        AppendOp::Append { value } => value,
        AppendOp::Read { .. } => unreachable!("appends only"),
    };
    let mut counts = (0, 0, 0);
    // value -> append op (first one if a harness reused a value)
    let mut attempted: HashMap<u64, &AOp> = HashMap::new();
    for &o in &appends {
        match o.outcome {
            Outcome::Ok(_) => counts.0 += 1,
            Outcome::Fail => counts.1 += 1,
            Outcome::Unknown => counts.2 += 1,
        }
        attempted.entry(value_of(o)).or_insert(o);
    }

    // The final order: the longest final read, else the longest whole-log read.
    let has_final = !final_reads.is_empty();
    let reference: Vec<u64> = if has_final {
        final_reads
            .iter()
            .map(|(_, s)| s)
            .max_by_key(|s| s.len())
            .cloned()
            .unwrap_or_default()
    } else {
        reads
            .iter()
            .filter(|r| r.1 == 0)
            .map(|r| r.3)
            .max_by_key(|s| s.len())
            .map(<[u64]>::to_vec)
            .unwrap_or_default()
    };

    // Rule 2 and duplicates in the final order.
    let mut pos: HashMap<u64, usize> = HashMap::with_capacity(reference.len());
    for (i, &v) in reference.iter().enumerate() {
        let op_ids: Vec<usize> = attempted.get(&v).map(|o| vec![o.id]).unwrap_or_default();
        if let Some(&first) = pos.get(&v) {
            add(
                AnomalyKind::Duplicate,
                op_ids.clone(),
                None,
                format!("value {v} at indices {first} and {i} of the final order"),
            );
            continue;
        }
        pos.insert(v, i);
        match attempted.get(&v) {
            None => add(
                AnomalyKind::NeverAttempted,
                vec![],
                None,
                format!("value {v} at index {i} of the final order was never appended"),
            ),
            Some(o) if o.outcome.is_fail() => add(
                AnomalyKind::FailedApplied,
                op_ids,
                None,
                format!("value {v} at index {i} of the final order: its append failed"),
            ),
            Some(_) => {}
        }
    }

    // Rule 1: acknowledged appends present, at their index.
    let mut lost_acked = 0;
    for &o in &appends {
        let Outcome::Ok(out) = &o.outcome else {
            continue;
        };
        let v = value_of(o);
        match (pos.get(&v), out) {
            (None, _) if has_final => {
                lost_acked += 1;
                add(
                    AnomalyKind::LostAck,
                    vec![o.id],
                    None,
                    format!("acknowledged append of {v} is not in the final order"),
                );
            }
            (Some(&p), AppendOut::Index(i)) if p as u64 != *i => add(
                AnomalyKind::WrongIndex,
                vec![o.id],
                None,
                format!("append of {v} acknowledged at index {i}, final order has it at {p}"),
            ),
            (_, AppendOut::Values(_)) => add(
                AnomalyKind::WrongIndex,
                vec![o.id],
                None,
                format!("append of {v} acknowledged without an index"),
            ),
            _ => {}
        }
    }

    // Rule 3: reads are slices of the final order; beyond it, reads agree with each other.
    let mut beyond: HashMap<u64, (u64, usize)> = HashMap::new();
    for &(o, from, to, vs) in &reads {
        if let Some(to) = to {
            if vs.len() as u64 > to.saturating_sub(from) {
                add(
                    AnomalyKind::ReadMismatch,
                    vec![o.id],
                    None,
                    format!("read of {from}..{to} returned {} values", vs.len()),
                );
            }
        }
        let mut mismatch_reported = false;
        for (k, &v) in vs.iter().enumerate() {
            let idx = from + k as u64;
            if reference.get(idx as usize) == Some(&v) {
                // The final order's values were checked above.
                continue;
            }
            if !attempted.contains_key(&v) {
                add(
                    AnomalyKind::NeverAttempted,
                    vec![o.id],
                    None,
                    format!("read saw value {v} at index {idx}, never appended"),
                );
            } else if attempted[&v].outcome.is_fail() && !pos.contains_key(&v) {
                add(
                    AnomalyKind::FailedApplied,
                    vec![attempted[&v].id, o.id],
                    None,
                    format!("read saw value {v} at index {idx}: its append failed"),
                );
            }
            match reference.get(idx as usize) {
                Some(&r) if r == v => {}
                Some(&r) => {
                    if !mismatch_reported {
                        mismatch_reported = true;
                        add(
                            AnomalyKind::ReadMismatch,
                            vec![o.id],
                            None,
                            format!("read saw {v} at index {idx}, final order has {r}"),
                        );
                    }
                }
                None => {
                    if has_final && !mismatch_reported {
                        mismatch_reported = true;
                        add(
                            AnomalyKind::ReadMismatch,
                            vec![o.id],
                            None,
                            format!(
                                "read saw {v} at index {idx}, past the end of the final order \
                                 ({} entries)",
                                reference.len()
                            ),
                        );
                    }
                    match beyond.get(&idx) {
                        Some(&(w, other)) if w != v => add(
                            AnomalyKind::ReadsDisagree,
                            vec![other, o.id],
                            None,
                            format!("reads saw {w} and {v} at index {idx}"),
                        ),
                        Some(_) => {}
                        None => {
                            beyond.insert(idx, (v, o.id));
                        }
                    }
                }
            }
        }
    }

    // Positions of appends for the real-time rules: the final order, else the acknowledged index.
    let position = |o: &AOp| -> Option<u64> {
        match pos.get(&value_of(o)) {
            Some(&p) => Some(p as u64),
            None => match &o.outcome {
                Outcome::Ok(AppendOut::Index(i)) => Some(*i),
                _ => None,
            },
        }
    };
    // Acknowledged appends sorted by completion, with prefix maxima of position.
    let mut acked: Vec<(u64, u64, usize)> = appends
        .iter()
        .filter(|o| o.outcome.is_ok())
        .filter_map(|o| position(o).map(|p| (o.complete, p, o.id)))
        .collect();
    acked.sort_unstable();
    let mut acked_max: Vec<(u64, usize)> = Vec::with_capacity(acked.len());
    for &(_, p, id) in &acked {
        let m = match acked_max.last() {
            Some(&(mp, mid)) if mp >= p => (mp, mid),
            _ => (p, id),
        };
        acked_max.push(m);
    }
    let acked_before = |t: u64| -> Option<(u64, usize)> {
        let n = acked.partition_point(|a| a.0 < t);
        (n > 0).then(|| acked_max[n - 1])
    };

    // Rule 4: real-time order. B is any append with a position (ok, or unknown but present).
    for &b in &appends {
        if b.outcome.is_fail() {
            continue;
        }
        let Some(pb) = position(b) else { continue };
        if let Some((pa, a)) = acked_before(b.invoke) {
            if pa >= pb {
                add(
                    AnomalyKind::RealTimeOrder,
                    vec![a, b.id],
                    None,
                    format!(
                        "append at index {pa} was acknowledged before the append at index {pb} \
                         was invoked"
                    ),
                );
            }
        }
    }

    // Rules 5 and 6: monotonic reads, acknowledged appends visible.
    let mut by_complete: Vec<(u64, u64, usize)> = reads
        .iter()
        // What a read proves the log held: `from + len` entries, or nothing if it was empty.
        .map(|&(o, from, _, vs)| {
            let reach = if vs.is_empty() {
                0
            } else {
                from + vs.len() as u64
            };
            (o.complete, reach, o.id)
        })
        .collect();
    by_complete.sort_unstable();
    let mut read_max: Vec<(u64, usize)> = Vec::with_capacity(by_complete.len());
    for &(_, end, id) in &by_complete {
        let m = match read_max.last() {
            Some(&(me, mid)) if me >= end => (me, mid),
            _ => (end, id),
        };
        read_max.push(m);
    }
    for &(o, from, to, vs) in &reads {
        // The log held no more than `end` entries when this read ran (unless capped by `to`).
        let end = from + vs.len() as u64;
        let cap = to.unwrap_or(u64::MAX);
        let n = by_complete.partition_point(|r| r.0 < o.invoke);
        if n > 0 {
            let (prev_end, prev) = read_max[n - 1];
            if end < prev_end.min(cap) {
                add(
                    AnomalyKind::NonMonotonicRead,
                    vec![prev, o.id],
                    None,
                    format!("read reached index {end}, an earlier read reached {prev_end}"),
                );
            }
        }
        if let Some((pa, a)) = acked_before(o.invoke) {
            if pa >= from && end < (pa + 1).min(cap) {
                add(
                    AnomalyKind::StaleRead,
                    vec![a, o.id],
                    None,
                    format!("read of {from}..{end} misses index {pa}, acknowledged before it"),
                );
            }
        }
    }

    // Rule 7: replicas.
    for (r, seq) in final_reads {
        let mut seen = HashSet::with_capacity(seq.len());
        for (i, v) in seq.iter().enumerate() {
            if !seen.insert(*v) {
                add(
                    AnomalyKind::ReplicaDuplicate,
                    vec![],
                    Some(*r),
                    format!("value {v} applied again at index {i}"),
                );
            }
        }
        if let Some(i) = seq.iter().zip(&reference).position(|(a, b)| a != b) {
            add(
                AnomalyKind::ReplicaDivergence,
                vec![],
                Some(*r),
                format!(
                    "index {i} holds {}, the longest replica holds {}",
                    seq[i], reference[i]
                ),
            );
        }
    }

    anomalies.sort_by_key(|a| a.kind);
    let wanted: HashSet<usize> = anomalies
        .iter()
        .flat_map(|a| a.ops.iter().copied())
        .collect();
    let ops_text = history
        .ops
        .iter()
        .filter(|o| wanted.contains(&o.id))
        .map(|o| (o.id, o.to_string()))
        .collect();
    AppendReport {
        operations: history.len(),
        appends: counts,
        reads: reads.len(),
        replicas: final_reads.len(),
        final_len: reference.len(),
        lost_acked,
        anomalies,
        elapsed: start.elapsed(),
        ops_text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small builder: times are given explicitly.
    struct B(AppendHistory);

    impl B {
        fn new() -> Self {
            B(AppendHistory::new())
        }
        fn append(&mut self, t: (u64, u64), value: u64, idx: Option<u64>) -> usize {
            let o = idx.map_or(Outcome::Unknown, |i| Outcome::Ok(AppendOut::Index(i)));
            self.0.push(1, t.0, t.1, AppendOp::Append { value }, o)
        }
        fn append_fail(&mut self, t: (u64, u64), value: u64) -> usize {
            self.0
                .push(1, t.0, t.1, AppendOp::Append { value }, Outcome::Fail)
        }
        fn read(&mut self, t: (u64, u64), from: u64, to: Option<u64>, vs: &[u64]) -> usize {
            let o = Outcome::Ok(AppendOut::Values(vs.to_vec()));
            self.0.push(2, t.0, t.1, AppendOp::Read { from, to }, o)
        }
        fn check(&self, finals: &[&[u64]]) -> AppendReport {
            let f: Vec<(ReplicaId, Vec<u64>)> = finals
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u64, s.to_vec()))
                .collect();
            check_append(&self.0, &f)
        }
    }

    fn base() -> B {
        let mut b = B::new();
        b.append((0, 1), 10, Some(0));
        b.append((2, 3), 11, Some(1));
        b.append((4, 5), 12, Some(2));
        b.read((6, 7), 0, None, &[10, 11, 12]);
        b
    }

    fn only(r: &AppendReport, kind: AnomalyKind) {
        assert!(r.has(kind), "expected {kind}:\n{r}");
    }

    #[test]
    fn valid_history() {
        let r = base().check(&[&[10, 11, 12], &[10, 11], &[]]);
        assert!(r.is_valid(), "{r}");
        assert_eq!(r.final_len, 3);
        assert_eq!(r.appends, (3, 0, 0));
        assert!(r.to_string().contains("VALID"));
    }

    #[test]
    fn lost_ack() {
        let r = base().check(&[&[10, 12]]);
        only(&r, AnomalyKind::LostAck);
        assert_eq!(r.lost_acked, 1);
        assert!(r.to_string().contains("acknowledged writes lost: 1"), "{r}");
    }

    #[test]
    fn duplicate_in_final_order() {
        only(&base().check(&[&[10, 11, 12, 11]]), AnomalyKind::Duplicate);
    }

    #[test]
    fn never_attempted_value() {
        only(
            &base().check(&[&[10, 11, 12, 99]]),
            AnomalyKind::NeverAttempted,
        );
        let mut b = base();
        b.read((8, 9), 3, None, &[98]);
        only(&b.check(&[&[10, 11, 12]]), AnomalyKind::NeverAttempted);
    }

    #[test]
    fn failed_append_applied() {
        let mut b = base();
        b.append_fail((8, 9), 13);
        assert!(b.check(&[&[10, 11, 12]]).is_valid());
        only(&b.check(&[&[10, 11, 12, 13]]), AnomalyKind::FailedApplied);
    }

    #[test]
    fn wrong_index() {
        let mut b = B::new();
        b.append((0, 1), 10, Some(0));
        b.append((2, 3), 11, Some(5));
        only(&b.check(&[&[10, 11]]), AnomalyKind::WrongIndex);
    }

    #[test]
    fn read_mismatch_and_past_end() {
        let mut b = base();
        b.read((8, 9), 1, Some(3), &[12, 11]);
        only(&b.check(&[&[10, 11, 12]]), AnomalyKind::ReadMismatch);
        let mut b = base();
        b.read((8, 9), 0, Some(1), &[10, 11]);
        only(&b.check(&[&[10, 11, 12]]), AnomalyKind::ReadMismatch);
        // the read saw 12 at index 2, but the final order stops at 11: lost entry
        let r = base().check(&[&[10, 11]]);
        only(&r, AnomalyKind::ReadMismatch);
    }

    #[test]
    fn reads_disagree_past_final_order() {
        let mut b = base();
        b.append((8, 100), 13, None);
        b.append((8, 100), 14, None);
        b.read((10, 11), 3, None, &[13]);
        b.read((10, 11), 3, None, &[14]);
        // no final reads: the longest whole read (3 entries) is the reference
        let r = b.check(&[]);
        only(&r, AnomalyKind::ReadsDisagree);
    }

    #[test]
    fn real_time_order() {
        let mut b = B::new();
        b.append((0, 1), 10, Some(1));
        b.append((2, 3), 11, Some(0));
        let r = b.check(&[&[11, 10]]);
        only(&r, AnomalyKind::RealTimeOrder);
        // concurrent appends may go in any order
        let mut b = B::new();
        b.append((0, 3), 10, Some(1));
        b.append((2, 5), 11, Some(0));
        assert!(b.check(&[&[11, 10]]).is_valid());
        // an unknown append present in the log is ordered too
        let mut b = B::new();
        b.append((0, 1), 10, Some(1));
        b.append((2, 3), 11, None);
        only(&b.check(&[&[11, 10]]), AnomalyKind::RealTimeOrder);
    }

    #[test]
    fn monotonic_reads() {
        let mut b = base();
        b.read((8, 9), 0, None, &[10, 11]);
        let r = b.check(&[&[10, 11, 12]]);
        only(&r, AnomalyKind::NonMonotonicRead);
        // a read bounded by its range is not "shorter"
        let mut b = base();
        b.read((8, 9), 0, Some(2), &[10, 11]);
        assert!(b.check(&[&[10, 11, 12]]).is_valid());
        // overlapping reads may differ
        let mut b = B::new();
        b.append((0, 1), 10, Some(0));
        b.append((0, 20), 11, Some(1));
        b.read((2, 10), 0, None, &[10, 11]);
        b.read((5, 12), 0, None, &[10]);
        assert!(b.check(&[&[10, 11]]).is_valid());
    }

    #[test]
    fn empty_read_past_the_end_proves_nothing() {
        let mut b = base();
        b.read((8, 9), 5, None, &[]);
        b.read((10, 11), 0, None, &[10, 11, 12]);
        assert!(b.check(&[&[10, 11, 12]]).is_valid());
        // but an empty read from inside the log after it was acknowledged is stale
        let mut b = base();
        b.read((8, 9), 2, None, &[]);
        only(&b.check(&[&[10, 11, 12]]), AnomalyKind::StaleRead);
    }

    #[test]
    fn stale_read() {
        let mut b = B::new();
        b.append((0, 1), 10, Some(0));
        b.append((2, 3), 11, Some(1));
        b.read((4, 5), 0, None, &[10]);
        only(&b.check(&[&[10, 11]]), AnomalyKind::StaleRead);
        // a read concurrent with the ack may miss it
        let mut b = B::new();
        b.append((0, 1), 10, Some(0));
        b.append((2, 6), 11, Some(1));
        b.read((4, 5), 0, None, &[10]);
        assert!(b.check(&[&[10, 11]]).is_valid());
        // a range read below the append does not need it
        let mut b = B::new();
        b.append((0, 1), 10, Some(0));
        b.append((2, 3), 11, Some(1));
        b.read((4, 5), 0, Some(1), &[10]);
        assert!(b.check(&[&[10, 11]]).is_valid());
    }

    #[test]
    fn unknown_appends_may_appear_once_or_not() {
        let mut b = base();
        b.append((8, 9), 13, None);
        b.append((8, 9), 14, None);
        assert!(b.check(&[&[10, 11, 12, 13]]).is_valid());
        assert!(b.check(&[&[10, 11, 12]]).is_valid());
        assert!(b.check(&[&[10, 11, 12, 14, 13]]).is_valid());
        only(&b.check(&[&[10, 11, 12, 13, 13]]), AnomalyKind::Duplicate);
    }

    #[test]
    fn failed_and_unknown_reads_are_ignored() {
        let mut b = base();
        b.0.push(3, 8, 9, AppendOp::Read { from: 0, to: None }, Outcome::Fail);
        b.0.push(
            3,
            8,
            9,
            AppendOp::Read { from: 0, to: None },
            Outcome::Unknown,
        );
        let r = b.check(&[&[10, 11, 12]]);
        assert!(r.is_valid(), "{r}");
        assert_eq!(r.reads, 1);
    }

    #[test]
    fn replica_divergence_and_duplicates() {
        let r = base().check(&[&[10, 11, 12], &[10, 12]]);
        only(&r, AnomalyKind::ReplicaDivergence);
        assert_eq!(r.anomalies[0].replica, Some(1));
        let r = base().check(&[&[10, 11, 12], &[10, 10]]);
        only(&r, AnomalyKind::ReplicaDuplicate);
        assert!(r.to_string().contains("replica 1"), "{r}");
    }

    #[test]
    fn report_display_lists_offending_ops() {
        let r = base().check(&[&[10, 12]]);
        let s = r.to_string();
        assert!(s.contains("[lost-ack]") && s.contains("append(11)"), "{s}");
        assert!(s.contains("anomalies by kind"), "{s}");
    }
}
