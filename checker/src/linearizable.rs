//! A Porcupine-style linearizability checker: Wing-Gong-Lowe search with memoisation (bitset of
//! linearized operations + model state), run independently per key on at most two threads, with
//! a deadline and delta-debugging of a failing key's history down to a small illegal slice.
//!
//! Uncertainty semantics (exact):
//! - an `unknown` write (put, cas, delete) may take effect at any time after its invoke, or never:
//!   its return time is +infinity, so it can be linearized at the very end, which is the same as
//!   never (the search succeeds once every operation with a known outcome is linearized);
//! - an `unknown` get is dropped, and a `fail` operation of any kind is dropped (never applied);
//! - a CAS with unknown outcome is deterministic: `ok = (state == expected)`, the new state is
//!   `new` if ok, else unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::history::{History, Key, KvHistory, KvOp, KvOut, Op, Outcome, Value};

/// A sequential specification.
pub trait Model: Sync {
    /// The state; hashed for memoisation.
    type State: Clone + Eq + Hash + Send;
    /// Operation input.
    type Input: Sync + Eq + Hash;
    /// Operation output.
    type Output: Sync;
    /// The initial state.
    fn init(&self) -> Self::State;
    /// Applies `input` to `state`. `output` is `None` when the outcome is unknown (any output is
    /// accepted). Returns the new state, or `None` if the output is impossible in this state.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;

    /// True if `input`'s new state does not depend on the old one and its output says nothing
    /// about it (a blind write such as put or delete). Lets the search skip applying an unknown
    /// blind write that is overwritten before anything observes it. Default: false.
    fn is_blind(&self, _input: &Self::Input) -> bool {
        false
    }
}

/// A single KV register (one key): state is the value, `None` when absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvRegister;

impl Model for KvRegister {
    type State = Option<Value>;
    type Input = KvOp;
    type Output = KvOut;

    fn init(&self) -> Self::State {
        None
    }

    fn step(
        &self,
        state: &Option<Value>,
        input: &KvOp,
        output: Option<&KvOut>,
    ) -> Option<Self::State> {
        match (*input, output) {
            (KvOp::Get { .. }, Some(KvOut::Get(v))) => (v == state).then_some(*state),
            // An unknown get says nothing (the checker drops them before the search anyway).
            (KvOp::Get { .. }, None) => Some(*state),
            (KvOp::Put { value, .. }, Some(KvOut::Put) | None) => Some(Some(value)),
            (KvOp::Delete { .. }, Some(KvOut::Delete) | None) => Some(None),
            (KvOp::Cas { expected, new, .. }, out) => {
                let ok = *state == expected;
                match out {
                    Some(KvOut::Cas(b)) if *b != ok => None,
                    Some(KvOut::Cas(_)) | None => Some(if ok { Some(new) } else { *state }),
                    Some(_) => None,
                }
            }
            // An output of the wrong kind is never legal.
            _ => None,
        }
    }

    fn is_blind(&self, input: &KvOp) -> bool {
        matches!(input, KvOp::Put { .. } | KvOp::Delete { .. })
    }
}

/// The outcome of searching one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Ok,
    /// No linearization exists.
    Illegal,
    /// The deadline passed (or the check was cancelled) first.
    Timeout,
}

const NONE: usize = usize::MAX;
const HEAD: usize = 0;

#[derive(Clone, Copy)]
struct Node {
    prev: usize,
    next: usize,
    op: usize,
    /// For a call node: its return node (NONE for an unknown op). NONE for return nodes.
    ret: usize,
    is_call: bool,
}

fn unlink(nodes: &mut [Node], i: usize) {
    let Node { prev, next, .. } = nodes[i];
    nodes[prev].next = next;
    if next != NONE {
        nodes[next].prev = prev;
    }
}

fn relink(nodes: &mut [Node], i: usize) {
    let Node { prev, next, .. } = nodes[i];
    nodes[prev].next = i;
    if next != NONE {
        nodes[next].prev = i;
    }
}

/// Wing-Gong-Lowe search over the operations of one partition. Operations with an
/// [`Outcome::Fail`] must already have been removed; [`Outcome::Unknown`] operations get an
/// infinite return time and an unconstrained output.
pub fn check_ops<M: Model>(
    model: &M,
    ops: &[&Op<M::Input, M::Output>],
    deadline: Instant,
    cancel: &AtomicBool,
) -> Verdict {
    let n = ops.len();
    // Events: (time, kind (0 call, 1 return: calls first at equal times), op).
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    let mut known = 0usize;
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke, 0, i));
        if !op.outcome.is_unknown() {
            known += 1;
            events.push((op.complete.max(op.invoke), 1, i));
        }
    }
    events.sort_unstable();
    let mut nodes: Vec<Node> = Vec::with_capacity(events.len() + 1);
    nodes.push(Node {
        prev: NONE,
        next: NONE,
        op: NONE,
        ret: NONE,
        is_call: false,
    });
    let mut call_node = vec![NONE; n];
    for &(_, kind, op) in &events {
        let idx = nodes.len();
        let last = idx - 1;
        nodes[last].next = idx;
        nodes.push(Node {
            prev: last,
            next: NONE,
            op,
            ret: NONE,
            is_call: kind == 0,
        });
        if kind == 0 {
            call_node[op] = idx;
        } else {
            nodes[call_node[op]].ret = idx;
        }
    }

    // Bit slots: known ops and unknown ops are numbered separately, so that the cache can tell
    // which unknown ops were applied.
    let mut slot = vec![(false, 0usize); n];
    let (mut nk, mut nu) = (0, 0);
    for (i, op) in ops.iter().enumerate() {
        if op.outcome.is_unknown() {
            slot[i] = (true, nu);
            nu += 1;
        } else {
            slot[i] = (false, nk);
            nk += 1;
        }
    }
    let mut known_bits = vec![0u64; nk.div_ceil(64)];
    let mut unknown_bits = vec![0u64; nu.div_ceil(64)];
    let flip = |kb: &mut [u64], ub: &mut [u64], op: usize| {
        let (unknown, b) = slot[op];
        let bits = if unknown { ub } else { kb };
        bits[b / 64] ^= 1 << (b % 64);
    };
    // Memoisation: (known ops linearized, state, last op was an unknown blind write) -> sets of
    // unknown ops applied on the way. A configuration is skipped if one with the same key and a
    // subset of its applied unknown ops was reached before: that one can do everything this one
    // can (an unknown op not applied yet may still be applied later, or never).
    type Seen<S> = HashMap<(Box<[u64]>, S, bool), Vec<Box<[u64]>>>;
    let mut cache: Seen<M::State> = HashMap::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut remaining = known;
    // Exact reductions for unknown ops (their output is unconstrained, their return time is
    // +infinity), each of which only drops ops from a linearization or renames twins:
    // - an unknown op that leaves the state unchanged is not applied (it would only lose the
    //   option of applying it later);
    // - an unknown blind write immediately followed by another blind write can be dropped from
    //   any linearization, so it is only applied right before an op that observes the state;
    // - unknown ops with identical inputs are interchangeable, so they are applied in call order.
    let blind: Vec<bool> = ops.iter().map(|o| model.is_blind(&o.input)).collect();
    let unknown_blind: Vec<bool> = (0..n)
        .map(|i| blind[i] && ops[i].outcome.is_unknown())
        .collect();
    let mut twin_prev = vec![NONE; n];
    {
        let mut last: HashMap<&M::Input, usize> = HashMap::new();
        for &(_, kind, i) in &events {
            if kind == 0 && ops[i].outcome.is_unknown() {
                if let Some(prev) = last.insert(&ops[i].input, i) {
                    twin_prev[i] = prev;
                }
            }
        }
    }
    let is_set = |kb: &[u64], ub: &[u64], op: usize| {
        let (unknown, b) = slot[op];
        let bits = if unknown { ub } else { kb };
        bits[b / 64] & (1 << (b % 64)) != 0
    };
    let mut after_unknown_blind = false;

    let mut entry = nodes[HEAD].next;
    // Candidates are the calls before the first return in the list. They are tried in two
    // passes: calls with a known outcome first, then unknown ones, so that configurations with
    // few unknown writes applied are reached first and the others are pruned as dominated.
    let mut unknown_pass = false;
    let mut iter: u64 = 0;

    while remaining > 0 {
        iter += 1;
        if iter & 511 == 0 && (cancel.load(Ordering::Relaxed) || Instant::now() >= deadline) {
            return Verdict::Timeout;
        }
        let is_call = entry != NONE && nodes[entry].is_call;
        if is_call {
            let node = nodes[entry];
            let op = ops[node.op];
            if op.outcome.is_unknown() != unknown_pass
                || (after_unknown_blind && blind[node.op])
                || (twin_prev[node.op] != NONE
                    && !is_set(&known_bits, &unknown_bits, twin_prev[node.op]))
            {
                entry = node.next;
                continue;
            }
            let next = model.step(&state, &op.input, op.outcome.ok());
            // An unknown op that changes nothing can be dropped from any linearization.
            let next = next.filter(|ns| !(op.outcome.is_unknown() && *ns == state));
            if let Some(next_state) = next {
                flip(&mut known_bits, &mut unknown_bits, node.op);
                let key = (
                    known_bits.clone().into_boxed_slice(),
                    next_state.clone(),
                    unknown_blind[node.op],
                );
                let seen = cache.entry(key).or_default();
                let dominated = seen
                    .iter()
                    .any(|u| u.iter().zip(&unknown_bits).all(|(a, b)| a & !b == 0));
                if !dominated {
                    seen.push(unknown_bits.clone().into_boxed_slice());
                    let prev = std::mem::replace(&mut state, next_state);
                    stack.push((entry, prev));
                    unlink(&mut nodes, entry);
                    if node.ret != NONE {
                        unlink(&mut nodes, node.ret);
                        remaining -= 1;
                    }
                    entry = nodes[HEAD].next;
                    unknown_pass = false;
                    after_unknown_blind = unknown_blind[node.op];
                    continue;
                }
                flip(&mut known_bits, &mut unknown_bits, node.op);
            }
            entry = node.next;
        } else if !unknown_pass && nu > 0 {
            // End of the known pass: try the unknown calls of the same window.
            unknown_pass = true;
            entry = nodes[HEAD].next;
        } else {
            // A return whose call is not linearized yet (or the end of the list): backtrack.
            let Some((call, prev)) = stack.pop() else {
                return Verdict::Illegal;
            };
            state = prev;
            let node = nodes[call];
            flip(&mut known_bits, &mut unknown_bits, node.op);
            if node.ret != NONE {
                relink(&mut nodes, node.ret);
                remaining += 1;
            }
            relink(&mut nodes, call);
            unknown_pass = ops[node.op].outcome.is_unknown();
            after_unknown_blind = stack
                .last()
                .is_some_and(|&(c, _)| unknown_blind[nodes[c].op]);
            entry = nodes[call].next;
        }
    }
    Verdict::Ok
}

/// Options of a check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Time allowed for the whole check (searching all keys).
    pub deadline: Duration,
    /// Time allowed for shrinking a failing key's history (on top of `deadline`).
    pub shrink_budget: Duration,
    /// Worker threads over partitions (1 or 2).
    pub threads: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            deadline: Duration::from_secs(60),
            shrink_budget: Duration::from_secs(5),
            threads: 2,
        }
    }
}

/// The verdict of a KV linearizability check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    /// Every key's history is linearizable.
    Linearizable,
    /// `key`'s history is not; `slice` is a small illegal subset of it (ops keep their ids).
    Illegal {
        /// The first illegal key.
        key: Key,
        /// A minimised illegal sub-history of that key.
        slice: KvHistory,
    },
    /// The deadline passed before `key` was decided (and no key was found illegal).
    Unknown {
        /// The first undecided key.
        key: Key,
    },
}

/// What a KV linearizability check did and found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Histories checked.
    pub histories: usize,
    /// Distinct keys (partitions) checked.
    pub keys: usize,
    /// Operations in the histories.
    pub operations: usize,
    /// Operations acknowledged.
    pub ok: usize,
    /// Operations that definitely failed.
    pub fail: usize,
    /// Operations with unknown outcome.
    pub unknown: usize,
    /// Keys found not linearizable (anomalies), in key order.
    pub illegal_keys: Vec<Key>,
    /// Keys not decided before the deadline, in key order.
    pub timed_out_keys: Vec<Key>,
    /// The overall verdict.
    pub result: CheckResult,
    /// Time taken (search plus shrinking).
    pub elapsed: Duration,
}

impl CheckReport {
    /// Number of anomalies (illegal keys).
    pub fn anomalies(&self) -> usize {
        self.illegal_keys.len()
    }
    /// True if the verdict is [`CheckResult::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        self.result == CheckResult::Linearizable
    }
    /// True if the verdict is [`CheckResult::Illegal`].
    pub fn is_illegal(&self) -> bool {
        matches!(self.result, CheckResult::Illegal { .. })
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match &self.result {
            CheckResult::Linearizable => "LINEARIZABLE".to_string(),
            CheckResult::Illegal { key, .. } => format!("NOT LINEARIZABLE (key {key})"),
            CheckResult::Unknown { key } => format!("UNKNOWN (timed out on key {key})"),
        };
        writeln!(f, "linearizability: {verdict}")?;
        writeln!(
            f,
            "  histories {}, keys {}, operations {} (ok {}, fail {}, unknown {}), {:.3}s",
            self.histories,
            self.keys,
            self.operations,
            self.ok,
            self.fail,
            self.unknown,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  anomalies {} (illegal keys {:?}), keys timed out {}",
            self.anomalies(),
            self.illegal_keys,
            self.timed_out_keys.len()
        )?;
        if let CheckResult::Illegal { slice, .. } = &self.result {
            writeln!(f, "  smallest failing slice ({} ops):", slice.len())?;
            for op in &slice.ops {
                writeln!(f, "    {op}")?;
            }
        }
        Ok(())
    }
}

/// Checks one key's operations (no failed ops, no unknown gets) after merging every value that
/// no operation can observe into one.
///
/// Gets compare the state with their output and CASes with their expected value; a value that
/// is never an output or an expectation cannot be told apart from another such value, so
/// replacing all of them by one fresh value is exact. It makes the unknown writes of unobserved
/// values identical, and the search applies identical unknown ops in call order only.
pub fn check_kv_key(ops: &[&Op<KvOp, KvOut>], deadline: Instant, cancel: &AtomicBool) -> Verdict {
    let mut observed: HashSet<Value> = HashSet::new();
    for op in ops {
        match (op.input, &op.outcome) {
            (_, Outcome::Ok(KvOut::Get(Some(v)))) => {
                observed.insert(*v);
            }
            (
                KvOp::Cas {
                    expected: Some(v), ..
                },
                _,
            ) => {
                observed.insert(v);
            }
            _ => {}
        }
    }
    let mut blank = Value::MAX;
    while observed.contains(&blank) {
        blank -= 1;
    }
    let canon = |v: Value| if observed.contains(&v) { v } else { blank };
    let rewritten: Vec<Op<KvOp, KvOut>> = ops
        .iter()
        .map(|&op| {
            let mut op = op.clone();
            match &mut op.input {
                KvOp::Put { value, .. } => *value = canon(*value),
                KvOp::Cas { new, .. } => *new = canon(*new),
                _ => {}
            }
            op
        })
        .collect();
    let refs: Vec<&Op<KvOp, KvOut>> = rewritten.iter().collect();
    check_ops(&KvRegister, &refs, deadline, cancel)
}

/// The operations the search sees for one key: no failed ops, no unknown gets.
fn relevant(op: &Op<KvOp, KvOut>) -> bool {
    match op.outcome {
        Outcome::Fail => false,
        Outcome::Unknown => op.input.is_write(),
        Outcome::Ok(_) => true,
    }
}

/// Checks a KV history for linearizability, key by key.
pub fn check_kv(history: &KvHistory, opts: &CheckOptions) -> CheckReport {
    check_kv_histories(std::slice::from_ref(history), opts)
}

/// Checks several independent KV histories (e.g. runs); keys of different histories are checked
/// separately. The verdict is the first anomaly found in history order.
pub fn check_kv_histories(histories: &[KvHistory], opts: &CheckOptions) -> CheckReport {
    let start = Instant::now();
    let deadline = start + opts.deadline;
    let mut parts: Vec<(Key, Vec<&Op<KvOp, KvOut>>)> = Vec::new();
    let (mut ok, mut fail, mut unknown, mut operations) = (0, 0, 0, 0);
    for h in histories {
        let (o, f, u) = h.outcome_counts();
        ok += o;
        fail += f;
        unknown += u;
        operations += h.len();
        let mut by_key: BTreeMap<Key, Vec<&Op<KvOp, KvOut>>> = BTreeMap::new();
        for op in &h.ops {
            let e = by_key.entry(op.input.key()).or_default();
            if relevant(op) {
                e.push(op);
            }
        }
        parts.extend(by_key);
    }

    let verdicts: Vec<Mutex<Option<Verdict>>> = parts.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= parts.len() {
            break;
        }
        let v = check_kv_key(&parts[i].1, deadline, &cancel);
        *verdicts[i].lock() = Some(v);
    };
    let threads = opts.threads.clamp(1, 2).min(parts.len().max(1));
    if threads > 1 {
        std::thread::scope(|s| {
            s.spawn(work);
            work();
        });
    } else {
        work();
    }

    let mut illegal_keys = Vec::new();
    let mut timed_out_keys = Vec::new();
    let mut first_illegal = None;
    let mut first_timeout = None;
    for (i, v) in verdicts.into_iter().enumerate() {
        match v.into_inner().unwrap_or(Verdict::Timeout) {
            Verdict::Ok => {}
            Verdict::Illegal => {
                illegal_keys.push(parts[i].0);
                first_illegal.get_or_insert(i);
            }
            Verdict::Timeout => {
                timed_out_keys.push(parts[i].0);
                first_timeout.get_or_insert(i);
            }
        }
    }
    let result = if let Some(i) = first_illegal {
        let slice = shrink_kv(&parts[i].1, opts.shrink_budget);
        let mut ops: Vec<_> = slice.into_iter().cloned().collect();
        ops.sort_by_key(|o| (o.invoke, o.id));
        CheckResult::Illegal {
            key: parts[i].0,
            slice: History { ops },
        }
    } else if let Some(i) = first_timeout {
        CheckResult::Unknown { key: parts[i].0 }
    } else {
        CheckResult::Linearizable
    };
    CheckReport {
        histories: histories.len(),
        keys: parts.len(),
        operations,
        ok,
        fail,
        unknown,
        illegal_keys,
        timed_out_keys,
        result,
        elapsed: start.elapsed(),
    }
}

/// The value an operation needs to have been written before it (a read of `v`, a successful CAS
/// from `v`).
fn needs(op: &Op<KvOp, KvOut>) -> Option<Value> {
    match (op.input, &op.outcome) {
        (KvOp::Get { .. }, Outcome::Ok(KvOut::Get(Some(v)))) => Some(*v),
        (
            KvOp::Cas {
                expected: Some(v), ..
            },
            Outcome::Ok(KvOut::Cas(true)),
        ) => Some(v),
        _ => None,
    }
}

fn writes(op: &Op<KvOp, KvOut>) -> Option<Value> {
    match op.input {
        KvOp::Put { value, .. } => Some(value),
        KvOp::Cas { new, .. } => Some(new),
        _ => None,
    }
}

/// Delta-debugging (ddmin, complements only) of one key's illegal history: removes chunks of
/// operations while the rest stays illegal, within `budget`. A removal is allowed only if every
/// value still read keeps a writer (when the full history had one), so that a stale read is not
/// "shrunk" into a misleading read of a value that was never written.
pub fn shrink_kv<'a>(ops: &[&'a Op<KvOp, KvOut>], budget: Duration) -> Vec<&'a Op<KvOp, KvOut>> {
    let end = Instant::now() + budget;
    let grounded: HashSet<Value> = ops.iter().filter_map(|o| writes(o)).collect();
    let closed = |cand: &[&Op<KvOp, KvOut>]| {
        let written: HashSet<Value> = cand.iter().filter_map(|o| writes(o)).collect();
        cand.iter()
            .filter_map(|o| needs(o))
            .all(|v| !grounded.contains(&v) || written.contains(&v))
    };
    let never = AtomicBool::new(false);
    let illegal = |cand: &[&Op<KvOp, KvOut>]| {
        let now = Instant::now();
        now < end && check_kv_key(cand, end, &never) == Verdict::Illegal
    };
    let mut cur: Vec<&Op<KvOp, KvOut>> = ops.to_vec();
    let mut n = 2usize;
    while cur.len() >= 2 && Instant::now() < end {
        let chunk = cur.len().div_ceil(n);
        let mut found = None;
        for i in 0..n {
            let lo = i * chunk;
            if lo >= cur.len() {
                break;
            }
            let hi = (lo + chunk).min(cur.len());
            let cand: Vec<_> = cur[..lo].iter().chain(&cur[hi..]).copied().collect();
            if closed(&cand) && illegal(&cand) {
                found = Some(cand);
                break;
            }
        }
        let reduced = found.is_some();
        if let Some(cand) = found {
            cur = cand;
            n = (n - 1).max(2);
        }
        if !reduced {
            if n >= cur.len() {
                break;
            }
            n = (n * 2).min(cur.len());
        }
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(h: &mut KvHistory, p: u64, t: (u64, u64), key: Key, value: Value) -> usize {
        h.push(
            p,
            t.0,
            t.1,
            KvOp::Put { key, value },
            Outcome::Ok(KvOut::Put),
        )
    }
    fn get(h: &mut KvHistory, p: u64, t: (u64, u64), key: Key, v: Option<Value>) -> usize {
        h.push(p, t.0, t.1, KvOp::Get { key }, Outcome::Ok(KvOut::Get(v)))
    }
    fn with(h: &mut KvHistory, p: u64, t: (u64, u64), op: KvOp, o: Outcome<KvOut>) -> usize {
        h.push(p, t.0, t.1, op, o)
    }
    fn check(h: &KvHistory) -> CheckReport {
        check_kv(h, &CheckOptions::default())
    }

    #[test]
    fn empty_history_is_linearizable() {
        let r = check(&KvHistory::new());
        assert!(r.is_linearizable());
        assert_eq!(r.keys, 0);
    }

    #[test]
    fn sequential_put_get() {
        let mut h = KvHistory::new();
        get(&mut h, 1, (0, 1), 1, None);
        put(&mut h, 1, (2, 3), 1, 5);
        get(&mut h, 2, (4, 5), 1, Some(5));
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn stale_read_is_illegal_with_small_slice() {
        let mut h = KvHistory::new();
        for i in 0..20u64 {
            put(&mut h, 9, (i * 10, i * 10 + 1), 2, i);
        }
        put(&mut h, 1, (300, 301), 1, 1);
        put(&mut h, 1, (302, 303), 1, 2);
        get(&mut h, 2, (304, 305), 1, Some(1));
        get(&mut h, 2, (306, 307), 1, Some(2));
        let r = check(&h);
        let CheckResult::Illegal { key, slice } = &r.result else {
            panic!("{r}")
        };
        assert_eq!(*key, 1);
        assert_eq!(slice.len(), 3, "{r}");
        assert!(r.to_string().contains("NOT LINEARIZABLE"));
        assert_eq!(r.illegal_keys, vec![1]);
    }

    #[test]
    fn concurrent_read_may_see_either() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        put(&mut h, 1, (2, 10), 1, 2);
        get(&mut h, 2, (3, 4), 1, Some(2));
        get(&mut h, 3, (3, 4), 1, Some(1));
        // both reads concurrent with the put: 1 then 2 is fine
        assert!(check(&h).is_linearizable());
        // but a read after seeing 2 cannot see 1 again
        get(&mut h, 3, (5, 6), 1, Some(1));
        assert!(check(&h).is_illegal());
    }

    #[test]
    fn equal_times_count_as_concurrent() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 5), 1, 1);
        get(&mut h, 2, (5, 6), 1, None);
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn unknown_write_may_apply_late() {
        let mut h = KvHistory::new();
        with(
            &mut h,
            1,
            (0, 1),
            KvOp::Put { key: 1, value: 7 },
            Outcome::Unknown,
        );
        get(&mut h, 2, (10, 11), 1, None);
        get(&mut h, 2, (20, 21), 1, Some(7));
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn unknown_write_may_never_apply() {
        let mut h = KvHistory::new();
        with(
            &mut h,
            1,
            (0, 1),
            KvOp::Put { key: 1, value: 7 },
            Outcome::Unknown,
        );
        get(&mut h, 2, (10, 11), 1, None);
        get(&mut h, 2, (20, 21), 1, None);
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn unknown_write_cannot_apply_before_invoke() {
        let mut h = KvHistory::new();
        get(&mut h, 2, (0, 1), 1, Some(7));
        with(
            &mut h,
            1,
            (5, 6),
            KvOp::Put { key: 1, value: 7 },
            Outcome::Unknown,
        );
        assert!(check(&h).is_illegal());
    }

    #[test]
    fn unknown_write_applies_at_most_once() {
        // 7 visible, then overwritten by 8, then 7 again: the single unknown put cannot do both.
        let mut h = KvHistory::new();
        with(
            &mut h,
            1,
            (0, 1),
            KvOp::Put { key: 1, value: 7 },
            Outcome::Unknown,
        );
        get(&mut h, 2, (10, 11), 1, Some(7));
        put(&mut h, 2, (12, 13), 1, 8);
        get(&mut h, 2, (14, 15), 1, Some(7));
        assert!(check(&h).is_illegal());
    }

    #[test]
    fn unknown_delete_may_apply_or_not() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 3);
        with(&mut h, 1, (2, 3), KvOp::Delete { key: 1 }, Outcome::Unknown);
        get(&mut h, 2, (4, 5), 1, Some(3));
        get(&mut h, 2, (6, 7), 1, None);
        assert!(check(&h).is_linearizable());
        get(&mut h, 2, (8, 9), 1, Some(3));
        assert!(check(&h).is_illegal());
    }

    #[test]
    fn unknown_get_is_dropped() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 3);
        // this get "saw" a value never written, but it is unknown: it says nothing
        with(&mut h, 2, (2, 3), KvOp::Get { key: 1 }, Outcome::Unknown);
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn failed_write_is_never_applied() {
        let mut h = KvHistory::new();
        with(
            &mut h,
            1,
            (0, 1),
            KvOp::Put { key: 1, value: 7 },
            Outcome::Fail,
        );
        get(&mut h, 2, (10, 11), 1, None);
        assert!(check(&h).is_linearizable());
        get(&mut h, 2, (12, 13), 1, Some(7));
        assert!(check(&h).is_illegal());
    }

    #[test]
    fn failed_delete_and_cas_are_never_applied() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 3);
        with(&mut h, 1, (2, 3), KvOp::Delete { key: 1 }, Outcome::Fail);
        let cas = KvOp::Cas {
            key: 1,
            expected: Some(3),
            new: 4,
        };
        with(&mut h, 1, (4, 5), cas, Outcome::Fail);
        get(&mut h, 2, (6, 7), 1, Some(3));
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn cas_known_outcomes() {
        let cas = |expected, new| KvOp::Cas {
            key: 1,
            expected,
            new,
        };
        let mut h = KvHistory::new();
        with(
            &mut h,
            1,
            (0, 1),
            cas(None, 1),
            Outcome::Ok(KvOut::Cas(true)),
        );
        with(
            &mut h,
            1,
            (2, 3),
            cas(None, 2),
            Outcome::Ok(KvOut::Cas(false)),
        );
        with(
            &mut h,
            1,
            (4, 5),
            cas(Some(1), 3),
            Outcome::Ok(KvOut::Cas(true)),
        );
        get(&mut h, 1, (6, 7), 1, Some(3));
        assert!(check(&h).is_linearizable());
        // a CAS that succeeded against the wrong value
        let mut bad = h.clone();
        with(
            &mut bad,
            1,
            (8, 9),
            cas(Some(1), 4),
            Outcome::Ok(KvOut::Cas(true)),
        );
        assert!(check(&bad).is_illegal());
        // a CAS that failed although the value matched
        let mut bad = h;
        with(
            &mut bad,
            1,
            (8, 9),
            cas(Some(3), 4),
            Outcome::Ok(KvOut::Cas(false)),
        );
        assert!(check(&bad).is_illegal());
    }

    #[test]
    fn cas_unknown_outcome_is_deterministic() {
        let cas = KvOp::Cas {
            key: 1,
            expected: Some(1),
            new: 2,
        };
        // state is 5, so the unknown CAS cannot succeed: reading 2 is illegal
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 5);
        with(&mut h, 1, (2, 3), cas, Outcome::Unknown);
        get(&mut h, 2, (4, 5), 1, Some(2));
        assert!(check(&h).is_illegal());
        // state is 1: it may succeed (read 2) ...
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        with(&mut h, 1, (2, 3), cas, Outcome::Unknown);
        get(&mut h, 2, (4, 5), 1, Some(1));
        get(&mut h, 2, (6, 7), 1, Some(2));
        assert!(check(&h).is_linearizable());
        // ... or not at all
        let mut h2 = KvHistory::new();
        put(&mut h2, 1, (0, 1), 1, 1);
        with(&mut h2, 1, (2, 3), cas, Outcome::Unknown);
        get(&mut h2, 2, (6, 7), 1, Some(1));
        assert!(check(&h2).is_linearizable());
    }

    #[test]
    fn unknown_put_explains_a_failed_cas() {
        let cas = KvOp::Cas {
            key: 1,
            expected: Some(1),
            new: 2,
        };
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        with(&mut h, 1, (2, 30), cas, Outcome::Ok(KvOut::Cas(false)));
        assert!(check(&h).is_illegal());
        // an unobserved unknown write (its value is merged with other unobserved values)
        with(
            &mut h,
            2,
            (0, 1),
            KvOp::Put { key: 1, value: 9 },
            Outcome::Unknown,
        );
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn interchangeable_unknown_deletes_apply_one_each() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        with(&mut h, 2, (2, 3), KvOp::Delete { key: 1 }, Outcome::Unknown);
        get(&mut h, 1, (4, 5), 1, None);
        put(&mut h, 1, (6, 7), 1, 2);
        get(&mut h, 1, (8, 9), 1, None);
        assert!(check(&h).is_illegal());
        with(&mut h, 3, (2, 3), KvOp::Delete { key: 1 }, Outcome::Unknown);
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn unknown_cas_waits_for_its_value() {
        let cas = KvOp::Cas {
            key: 1,
            expected: Some(5),
            new: 6,
        };
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        with(&mut h, 2, (2, 3), cas, Outcome::Unknown);
        put(&mut h, 1, (4, 5), 1, 5);
        get(&mut h, 1, (6, 7), 1, Some(6));
        assert!(check(&h).is_linearizable());
        get(&mut h, 1, (8, 9), 1, Some(5));
        assert!(check(&h).is_illegal());
    }

    #[test]
    fn wrong_output_kind_is_illegal() {
        let mut h = KvHistory::new();
        with(
            &mut h,
            1,
            (0, 1),
            KvOp::Put { key: 1, value: 1 },
            Outcome::Ok(KvOut::Cas(true)),
        );
        assert!(check(&h).is_illegal());
    }

    #[test]
    fn keys_are_independent() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        get(&mut h, 2, (2, 3), 2, None);
        get(&mut h, 2, (4, 5), 1, Some(1));
        let r = check(&h);
        assert!(r.is_linearizable());
        assert_eq!(r.keys, 2);
        assert_eq!(r.operations, 3);
    }

    #[test]
    fn report_counts_outcomes() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        with(
            &mut h,
            1,
            (2, 3),
            KvOp::Put { key: 1, value: 2 },
            Outcome::Fail,
        );
        with(
            &mut h,
            1,
            (4, 5),
            KvOp::Put { key: 1, value: 3 },
            Outcome::Unknown,
        );
        let r = check(&h);
        assert_eq!((r.ok, r.fail, r.unknown), (1, 1, 1));
        assert_eq!(r.histories, 1);
        let s = r.to_string();
        assert!(s.contains("LINEARIZABLE") && s.contains("unknown 1"), "{s}");
    }

    #[test]
    fn deadline_gives_unknown() {
        // 40 fully concurrent puts, then a read of a value nobody wrote: proving this illegal
        // means trying every subset of the puts.
        let mut h = KvHistory::new();
        for p in 0..40u64 {
            put(&mut h, p, (0, 100), 1, p);
        }
        get(&mut h, 100, (200, 201), 1, Some(1000));
        put(&mut h, 101, (0, 1), 2, 1);
        let opts = CheckOptions {
            deadline: Duration::from_millis(200),
            ..CheckOptions::default()
        };
        let r = check_kv(&h, &opts);
        assert_eq!(r.result, CheckResult::Unknown { key: 1 }, "{r}");
        assert_eq!(r.timed_out_keys, vec![1]);
        assert!(r.elapsed < Duration::from_secs(10));
        assert!(r.to_string().contains("UNKNOWN"));
    }

    #[test]
    fn shrink_keeps_writer_of_stale_value() {
        let mut h = KvHistory::new();
        put(&mut h, 1, (0, 1), 1, 1);
        for i in 0..30u64 {
            put(&mut h, 3, (2 + i * 2, 3 + i * 2), 1, 100 + i);
        }
        get(&mut h, 2, (100, 101), 1, Some(1));
        let r = check(&h);
        let CheckResult::Illegal { slice, .. } = &r.result else {
            panic!("{r}")
        };
        // put 1, one overwrite, the stale get
        assert_eq!(slice.len(), 3, "{r}");
        assert!(slice
            .ops
            .iter()
            .any(|o| o.input == KvOp::Put { key: 1, value: 1 }));
    }

    #[test]
    fn multiple_histories() {
        let mut a = KvHistory::new();
        put(&mut a, 1, (0, 1), 1, 1);
        let mut b = KvHistory::new();
        get(&mut b, 1, (0, 1), 1, None);
        let r = check_kv_histories(&[a.clone(), b], &CheckOptions::default());
        assert!(r.is_linearizable());
        assert_eq!((r.histories, r.keys), (2, 2));
        let mut c = KvHistory::new();
        get(&mut c, 1, (0, 1), 1, Some(1));
        let r = check_kv_histories(&[a, c], &CheckOptions::default());
        assert!(r.is_illegal());
    }
}
