//! Recording client histories: [`Recorder`], [`OpHandle`], [`History`], the KV and append
//! operation types, and a line-oriented text format to save a history and load it back.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

/// A client (process) id, as in Jepsen: each client performs one operation at a time.
pub type ProcessId = u64;

/// A key of the KV workload.
pub type Key = u64;

/// A value of the KV workload.
pub type Value = u64;

/// The outcome of one operation, as seen by its client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome<R> {
    /// Acknowledged with this output.
    Ok(R),
    /// Definitely not applied.
    Fail,
    /// May or may not have been applied (timeout, connection lost, client gone).
    Unknown,
}

impl<R> Outcome<R> {
    /// The output, if the operation was acknowledged.
    pub fn ok(&self) -> Option<&R> {
        match self {
            Outcome::Ok(r) => Some(r),
            _ => None,
        }
    }
    /// True for [`Outcome::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
    /// True for [`Outcome::Fail`].
    pub fn is_fail(&self) -> bool {
        matches!(self, Outcome::Fail)
    }
    /// True for [`Outcome::Unknown`].
    pub fn is_unknown(&self) -> bool {
        matches!(self, Outcome::Unknown)
    }
}

/// One operation of a history.
///
/// Times are nanoseconds since the recorder started (monotonic clock). `complete` is the time the
/// client learnt the outcome; for [`Outcome::Unknown`] the checkers treat it as +infinity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op<I, R> {
    /// Position in the history (index into [`History::ops`]).
    pub id: usize,
    /// The client that performed it.
    pub process: ProcessId,
    /// Invocation time (ns).
    pub invoke: u64,
    /// Completion time (ns): when the outcome was recorded.
    pub complete: u64,
    /// What was asked.
    pub input: I,
    /// What came back.
    pub outcome: Outcome<R>,
}

/// A finished history: operations in invocation order (ids are indices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History<I, R> {
    /// The operations; `ops[i].id == i`.
    pub ops: Vec<Op<I, R>>,
}

impl<I, R> Default for History<I, R> {
    fn default() -> Self {
        History { ops: Vec::new() }
    }
}

impl<I, R> History<I, R> {
    /// An empty history (to build one by hand, e.g. in tests).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an operation and returns its id.
    pub fn push(
        &mut self,
        process: ProcessId,
        invoke: u64,
        complete: u64,
        input: I,
        outcome: Outcome<R>,
    ) -> usize {
        let id = self.ops.len();
        self.ops.push(Op {
            id,
            process,
            invoke,
            complete,
            input,
            outcome,
        });
        id
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True if there is no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Counts of (ok, fail, unknown) operations.
    pub fn outcome_counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for op in &self.ops {
            match op.outcome {
                Outcome::Ok(_) => c.0 += 1,
                Outcome::Fail => c.1 += 1,
                Outcome::Unknown => c.2 += 1,
            }
        }
        c
    }

    /// Sorts by invoke time (stable) and renumbers ids.
    pub fn normalize(&mut self) {
        self.ops.sort_by_key(|o| o.invoke);
        for (i, op) in self.ops.iter_mut().enumerate() {
            op.id = i;
        }
    }
}

struct RecorderInner<I, R> {
    ops: Vec<Option<Op<I, R>>>,
    pending: Vec<Option<(ProcessId, u64, I)>>,
}

/// A thread-safe history recorder. Clone it into every client thread.
pub struct Recorder<I, R> {
    start: Instant,
    inner: Arc<Mutex<RecorderInner<I, R>>>,
}

impl<I, R> Clone for Recorder<I, R> {
    fn clone(&self) -> Self {
        Recorder {
            start: self.start,
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<I, R> fmt::Debug for Recorder<I, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.inner.lock().ops.len();
        f.debug_struct("Recorder").field("ops", &n).finish()
    }
}

impl<I, R> Default for Recorder<I, R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I, R> Recorder<I, R> {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Recorder {
            start: Instant::now(),
            inner: Arc::new(Mutex::new(RecorderInner {
                ops: Vec::new(),
                pending: Vec::new(),
            })),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records the invocation of `input` by `process`; complete it through the handle.
    pub fn invoke(&self, process: ProcessId, input: I) -> OpHandle<I, R> {
        let mut g = self.inner.lock();
        // Take the time under the lock so that ids follow invocation order.
        let t = self.now();
        let slot = g.ops.len();
        g.ops.push(None);
        g.pending.push(Some((process, t, input)));
        OpHandle {
            rec: self.clone(),
            slot,
            done: false,
        }
    }

    fn complete(&self, slot: usize, outcome: Outcome<R>) {
        let mut g = self.inner.lock();
        let t = self.now();
        if let Some((process, invoke, input)) = g.pending[slot].take() {
            g.ops[slot] = Some(Op {
                id: slot,
                process,
                invoke,
                complete: t.max(invoke),
                input,
                outcome,
            });
        }
    }

    /// The history so far, taken out of the recorder. Operations still in flight are recorded as
    /// [`Outcome::Unknown`] (completing their handles later has no effect); operations invoked
    /// after this call go to the next `finish`.
    pub fn finish(&self) -> History<I, R> {
        let mut g = self.inner.lock();
        let t = self.now();
        let g = &mut *g;
        let mut ops = Vec::with_capacity(g.ops.len());
        for (slot, op) in g.ops.iter_mut().enumerate() {
            if let Some(op) = op.take() {
                ops.push(op);
            } else if let Some((process, invoke, input)) = g.pending[slot].take() {
                ops.push(Op {
                    id: slot,
                    process,
                    invoke,
                    complete: t.max(invoke),
                    input,
                    outcome: Outcome::Unknown,
                });
            }
        }
        let mut h = History { ops };
        h.normalize();
        h
    }
}

/// An operation in flight. Complete it with [`ok`](Self::ok), [`fail`](Self::fail) or
/// [`unknown`](Self::unknown); dropping it unfinished records `unknown`.
pub struct OpHandle<I, R> {
    rec: Recorder<I, R>,
    slot: usize,
    done: bool,
}

impl<I, R> fmt::Debug for OpHandle<I, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpHandle")
            .field("slot", &self.slot)
            .finish()
    }
}

impl<I, R> OpHandle<I, R> {
    /// Acknowledged with `output`.
    pub fn ok(mut self, output: R) {
        self.done = true;
        self.rec.complete(self.slot, Outcome::Ok(output));
    }
    /// Definitely not applied.
    pub fn fail(mut self) {
        self.done = true;
        self.rec.complete(self.slot, Outcome::Fail);
    }
    /// May or may not have been applied.
    pub fn unknown(mut self) {
        self.done = true;
        self.rec.complete(self.slot, Outcome::Unknown);
    }
}

impl<I, R> Drop for OpHandle<I, R> {
    fn drop(&mut self) {
        if !self.done {
            self.rec.complete(self.slot, Outcome::Unknown);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// KV and append operation types
// ---------------------------------------------------------------------------------------------

/// A KV operation on one key. A missing key reads as `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvOp {
    /// Read the key.
    Get { key: Key },
    /// Write the key.
    Put { key: Key, value: Value },
    /// Write `new` if the current value equals `expected` (`None`: the key is absent).
    Cas {
        key: Key,
        expected: Option<Value>,
        new: Value,
    },
    /// Remove the key.
    Delete { key: Key },
}

impl KvOp {
    /// The key the operation touches.
    pub fn key(&self) -> Key {
        match *self {
            KvOp::Get { key }
            | KvOp::Put { key, .. }
            | KvOp::Cas { key, .. }
            | KvOp::Delete { key } => key,
        }
    }
    /// True for operations that may change state.
    pub fn is_write(&self) -> bool {
        !matches!(self, KvOp::Get { .. })
    }
}

/// The output of an acknowledged [`KvOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvOut {
    /// `Get` result.
    Get(Option<Value>),
    /// `Put` done.
    Put,
    /// `Cas` result: whether it swapped.
    Cas(bool),
    /// `Delete` done.
    Delete,
}

/// A KV history.
pub type KvHistory = History<KvOp, KvOut>;

/// An append-only log operation (raft entries, Log collections). Positions are 0-based.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AppendOp {
    /// Append a value (values must be unique per history).
    Append { value: u64 },
    /// Read positions `from..to` (`to == None`: up to the end); `from == 0, to == None` reads the
    /// whole log.
    Read { from: u64, to: Option<u64> },
}

/// The output of an acknowledged [`AppendOp`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AppendOut {
    /// The position the value was appended at.
    Index(u64),
    /// The values at positions `from..from + len`.
    Values(Vec<u64>),
}

/// An append history.
pub type AppendHistory = History<AppendOp, AppendOut>;

// ---------------------------------------------------------------------------------------------
// Text format
// ---------------------------------------------------------------------------------------------

/// An error while parsing a saved history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number (0 when parsing a single item).
    pub line: usize,
    /// What was wrong.
    pub msg: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for ParseError {}

fn perr(msg: impl Into<String>) -> ParseError {
    ParseError {
        line: 0,
        msg: msg.into(),
    }
}

/// Types that have a one-line text form (no newline, no `" => "`).
pub trait TextCodec: Sized {
    /// Appends the text form to `out`.
    fn encode(&self, out: &mut String);
    /// Parses the text form.
    fn decode(s: &str) -> Result<Self, ParseError>;
}

fn num(s: Option<&str>) -> Result<u64, ParseError> {
    let s = s.ok_or_else(|| perr("missing number"))?;
    s.parse().map_err(|_| perr(format!("bad number {s:?}")))
}

fn opt_num(s: Option<&str>) -> Result<Option<u64>, ParseError> {
    match s {
        Some("nil") => Ok(None),
        s => num(s).map(Some),
    }
}

fn write_opt(out: &mut String, v: Option<u64>) {
    match v {
        Some(v) => out.push_str(&v.to_string()),
        None => out.push_str("nil"),
    }
}

impl TextCodec for KvOp {
    fn encode(&self, out: &mut String) {
        match *self {
            KvOp::Get { key } => out.push_str(&format!("get {key}")),
            KvOp::Put { key, value } => out.push_str(&format!("put {key} {value}")),
            KvOp::Cas { key, expected, new } => {
                out.push_str(&format!("cas {key} "));
                write_opt(out, expected);
                out.push_str(&format!(" {new}"));
            }
            KvOp::Delete { key } => out.push_str(&format!("delete {key}")),
        }
    }
    fn decode(s: &str) -> Result<Self, ParseError> {
        let mut it = s.split_whitespace();
        let op = match it.next() {
            Some("get") => KvOp::Get {
                key: num(it.next())?,
            },
            Some("put") => KvOp::Put {
                key: num(it.next())?,
                value: num(it.next())?,
            },
            Some("cas") => KvOp::Cas {
                key: num(it.next())?,
                expected: opt_num(it.next())?,
                new: num(it.next())?,
            },
            Some("delete") => KvOp::Delete {
                key: num(it.next())?,
            },
            other => return Err(perr(format!("unknown kv op {other:?}"))),
        };
        if it.next().is_some() {
            return Err(perr("trailing text after kv op"));
        }
        Ok(op)
    }
}

impl TextCodec for KvOut {
    fn encode(&self, out: &mut String) {
        match *self {
            KvOut::Get(v) => {
                out.push_str("get ");
                write_opt(out, v);
            }
            KvOut::Put => out.push_str("put"),
            KvOut::Cas(b) => out.push_str(&format!("cas {b}")),
            KvOut::Delete => out.push_str("delete"),
        }
    }
    fn decode(s: &str) -> Result<Self, ParseError> {
        let mut it = s.split_whitespace();
        let out = match it.next() {
            Some("get") => KvOut::Get(opt_num(it.next())?),
            Some("put") => KvOut::Put,
            Some("cas") => match it.next() {
                Some("true") => KvOut::Cas(true),
                Some("false") => KvOut::Cas(false),
                other => return Err(perr(format!("bad cas result {other:?}"))),
            },
            Some("delete") => KvOut::Delete,
            other => return Err(perr(format!("unknown kv output {other:?}"))),
        };
        if it.next().is_some() {
            return Err(perr("trailing text after kv output"));
        }
        Ok(out)
    }
}

impl TextCodec for AppendOp {
    fn encode(&self, out: &mut String) {
        match *self {
            AppendOp::Append { value } => out.push_str(&format!("append {value}")),
            AppendOp::Read { from, to } => {
                out.push_str(&format!("read {from} "));
                write_opt(out, to);
            }
        }
    }
    fn decode(s: &str) -> Result<Self, ParseError> {
        let mut it = s.split_whitespace();
        let op = match it.next() {
            Some("append") => AppendOp::Append {
                value: num(it.next())?,
            },
            Some("read") => AppendOp::Read {
                from: num(it.next())?,
                to: opt_num(it.next())?,
            },
            other => return Err(perr(format!("unknown append op {other:?}"))),
        };
        if it.next().is_some() {
            return Err(perr("trailing text after append op"));
        }
        Ok(op)
    }
}

impl TextCodec for AppendOut {
    fn encode(&self, out: &mut String) {
        match self {
            AppendOut::Index(i) => out.push_str(&format!("index {i}")),
            AppendOut::Values(vs) => {
                out.push_str("values");
                for v in vs {
                    out.push_str(&format!(" {v}"));
                }
            }
        }
    }
    fn decode(s: &str) -> Result<Self, ParseError> {
        let mut it = s.split_whitespace();
        match it.next() {
            Some("index") => {
                let i = num(it.next())?;
                if it.next().is_some() {
                    return Err(perr("trailing text after index"));
                }
                Ok(AppendOut::Index(i))
            }
            Some("values") => Ok(AppendOut::Values(
                it.map(|v| num(Some(v))).collect::<Result<_, _>>()?,
            )),
            other => Err(perr(format!("unknown append output {other:?}"))),
        }
    }
}

impl<I: TextCodec, R: TextCodec> History<I, R> {
    /// Renders the history, one operation per line:
    /// `PROCESS INVOKE_NS COMPLETE_NS ok|fail|unknown OP [=> OUTPUT]`. Lines starting with `#` and
    /// blank lines are ignored when parsing.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for op in &self.ops {
            let status = match op.outcome {
                Outcome::Ok(_) => "ok",
                Outcome::Fail => "fail",
                Outcome::Unknown => "unknown",
            };
            s.push_str(&format!(
                "{} {} {} {} ",
                op.process, op.invoke, op.complete, status
            ));
            op.input.encode(&mut s);
            if let Outcome::Ok(r) = &op.outcome {
                s.push_str(" => ");
                r.encode(&mut s);
            }
            s.push('\n');
        }
        s
    }

    /// Parses the format written by [`to_text`](Self::to_text). Ids are assigned in line order.
    pub fn from_text(text: &str) -> Result<Self, ParseError> {
        let mut h = History::new();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |mut e: ParseError| {
                e.line = line_no;
                e
            };
            let (head, out) = match line.split_once(" => ") {
                Some((h, o)) => (h, Some(o)),
                None => (line, None),
            };
            let mut parts = head.splitn(5, ' ');
            let process = num(parts.next()).map_err(at)?;
            let invoke = num(parts.next()).map_err(at)?;
            let complete = num(parts.next()).map_err(at)?;
            let status = parts.next().unwrap_or("");
            let input = I::decode(parts.next().unwrap_or("")).map_err(at)?;
            let outcome = match (status, out) {
                ("ok", Some(o)) => Outcome::Ok(R::decode(o).map_err(at)?),
                ("fail", None) => Outcome::Fail,
                ("unknown", None) => Outcome::Unknown,
                _ => return Err(at(perr(format!("bad status/output in {line:?}")))),
            };
            h.push(process, invoke, complete, input, outcome);
        }
        Ok(h)
    }
}

/// Formats nanoseconds compactly for reports (`1.234ms`, `12.5s`, `?` for `u64::MAX`).
pub fn fmt_ns(ns: u64) -> String {
    if ns == u64::MAX {
        "?".to_string()
    } else if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.3}us", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.3}ms", ns as f64 / 1e6)
    } else {
        format!("{:.3}s", ns as f64 / 1e9)
    }
}

impl fmt::Display for KvOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = |v: Option<u64>| v.map_or("nil".to_string(), |v| v.to_string());
        match *self {
            KvOp::Get { key } => write!(f, "get(k{key})"),
            KvOp::Put { key, value } => write!(f, "put(k{key}, {value})"),
            KvOp::Cas { key, expected, new } => {
                write!(f, "cas(k{key}, {} -> {new})", o(expected))
            }
            KvOp::Delete { key } => write!(f, "delete(k{key})"),
        }
    }
}

impl fmt::Display for KvOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KvOut::Get(Some(v)) => write!(f, "{v}"),
            KvOut::Get(None) => write!(f, "nil"),
            KvOut::Put | KvOut::Delete => write!(f, "ok"),
            KvOut::Cas(b) => write!(f, "{b}"),
        }
    }
}

impl fmt::Display for AppendOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AppendOp::Append { value } => write!(f, "append({value})"),
            AppendOp::Read { from, to: None } => write!(f, "read({from}..)"),
            AppendOp::Read { from, to: Some(t) } => write!(f, "read({from}..{t})"),
        }
    }
}

impl fmt::Display for AppendOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppendOut::Index(i) => write!(f, "@{i}"),
            AppendOut::Values(vs) => write!(f, "{vs:?}"),
        }
    }
}

impl<I: fmt::Display, R: fmt::Display> fmt::Display for Op<I, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (end, res) = match &self.outcome {
            Outcome::Ok(r) => (fmt_ns(self.complete), r.to_string()),
            Outcome::Fail => (fmt_ns(self.complete), "fail".to_string()),
            Outcome::Unknown => ("?".to_string(), "unknown".to_string()),
        };
        write!(
            f,
            "#{:<5} p{:<4} [{:>12} .. {:>12}] {} -> {}",
            self.id,
            self.process,
            fmt_ns(self.invoke),
            end,
            self.input,
            res
        )
    }
}

impl<I: fmt::Display, R: fmt::Display> fmt::Display for History<I, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for op in &self.ops {
            writeln!(f, "{op}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_records_all_outcomes_and_drop_is_unknown() {
        let rec: Recorder<KvOp, KvOut> = Recorder::new();
        let r2 = rec.clone();
        let h1 = rec.invoke(1, KvOp::Put { key: 1, value: 5 });
        let h2 = r2.invoke(2, KvOp::Get { key: 1 });
        let h3 = rec.invoke(3, KvOp::Delete { key: 1 });
        let h4 = rec.invoke(4, KvOp::Get { key: 2 });
        let h5 = rec.invoke(5, KvOp::Get { key: 3 });
        h1.ok(KvOut::Put);
        h2.fail();
        h3.unknown();
        drop(h4);
        let _still_open = h5;
        let h = rec.finish();
        assert_eq!(h.len(), 5);
        assert_eq!(h.ops[0].outcome, Outcome::Ok(KvOut::Put));
        assert_eq!(h.ops[1].outcome, Outcome::Fail);
        assert_eq!(h.ops[2].outcome, Outcome::Unknown);
        assert_eq!(h.ops[3].outcome, Outcome::Unknown);
        assert_eq!(h.ops[4].outcome, Outcome::Unknown);
        for (i, op) in h.ops.iter().enumerate() {
            assert_eq!(op.id, i);
            assert!(op.complete >= op.invoke);
        }
        assert!(h.ops.windows(2).all(|w| w[0].invoke <= w[1].invoke));
        assert_eq!(h.outcome_counts(), (1, 1, 3));
    }

    #[test]
    fn recorder_is_thread_safe() {
        let rec: Recorder<KvOp, KvOut> = Recorder::new();
        std::thread::scope(|s| {
            for p in 0..4 {
                let rec = rec.clone();
                s.spawn(move || {
                    for i in 0..100 {
                        rec.invoke(p, KvOp::Put { key: p, value: i }).ok(KvOut::Put);
                    }
                });
            }
        });
        let h = rec.finish();
        assert_eq!(h.len(), 400);
        assert_eq!(h.outcome_counts(), (400, 0, 0));
    }

    #[test]
    fn kv_text_round_trip() {
        let mut h = KvHistory::new();
        h.push(
            1,
            0,
            10,
            KvOp::Put { key: 1, value: 2 },
            Outcome::Ok(KvOut::Put),
        );
        h.push(
            2,
            1,
            11,
            KvOp::Get { key: 1 },
            Outcome::Ok(KvOut::Get(None)),
        );
        h.push(
            2,
            12,
            13,
            KvOp::Get { key: 1 },
            Outcome::Ok(KvOut::Get(Some(2))),
        );
        let cas = KvOp::Cas {
            key: 1,
            expected: None,
            new: 3,
        };
        h.push(3, 2, 20, cas, Outcome::Ok(KvOut::Cas(false)));
        let cas = KvOp::Cas {
            key: 1,
            expected: Some(2),
            new: 3,
        };
        h.push(3, 21, 22, cas, Outcome::Unknown);
        h.push(4, 3, 30, KvOp::Delete { key: 9 }, Outcome::Fail);
        h.push(
            4,
            31,
            32,
            KvOp::Delete { key: 9 },
            Outcome::Ok(KvOut::Delete),
        );
        let text = h.to_text();
        let back = KvHistory::from_text(&format!("# saved\n\n{text}")).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn append_text_round_trip() {
        let mut h = AppendHistory::new();
        h.push(
            1,
            0,
            10,
            AppendOp::Append { value: 7 },
            Outcome::Ok(AppendOut::Index(0)),
        );
        let read = AppendOp::Read { from: 0, to: None };
        h.push(
            2,
            1,
            11,
            read.clone(),
            Outcome::Ok(AppendOut::Values(vec![])),
        );
        h.push(2, 12, 13, read, Outcome::Ok(AppendOut::Values(vec![7, 8])));
        let read = AppendOp::Read {
            from: 1,
            to: Some(4),
        };
        h.push(3, 14, 15, read, Outcome::Fail);
        h.push(3, 16, 17, AppendOp::Append { value: 8 }, Outcome::Unknown);
        let back = AppendHistory::from_text(&h.to_text()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e =
            KvHistory::from_text("1 0 1 ok get 1 => get 2\n1 2 x ok get 1 => get 2\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(KvHistory::from_text("1 0 1 ok get 1\n").is_err());
        assert!(KvHistory::from_text("1 0 1 fail get 1 => get 2\n").is_err());
        assert!(KvHistory::from_text("1 0 1 ok frob 1 => get 2\n").is_err());
        assert!(AppendHistory::from_text("1 0 1 ok append 1 => index x\n").is_err());
    }

    #[test]
    fn display_is_readable() {
        let mut h = KvHistory::new();
        h.push(
            1,
            1_500,
            2_000_000,
            KvOp::Put { key: 1, value: 2 },
            Outcome::Ok(KvOut::Put),
        );
        h.push(2, 5, 6, KvOp::Get { key: 1 }, Outcome::Unknown);
        let s = h.to_string();
        assert!(s.contains("put(k1, 2) -> ok"), "{s}");
        assert!(s.contains("2.000ms"), "{s}");
        assert!(s.contains("get(k1) -> unknown"), "{s}");
    }
}
