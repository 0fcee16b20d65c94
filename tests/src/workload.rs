//! Clients that record a [`checker`] KV history, against one of two [`Target`]s:
//! - [`Target::Collection`]: a KV collection (put / get / cas through the range leader, or
//!   follower reads for the planted-bug control);
//! - [`Target::Scratch`]: meta's scratch space (put through meta's leader, get through the
//!   leader or, for the control, from any node's local replica; no CAS).
//!
//! Test keys are `nemesis/<run>/<k>` (scratch) or `k<k>` (collection) for `k < keys`; every
//! written value is unique (the writer's id and a counter), so a read names the write it saw.
//! Outcomes:
//! - answered: `ok`;
//! - a failed read: `fail` (a read never changes state);
//! - a failed write on a collection: `unknown` for `UnknownOutcome`, `Timeout`,
//!   `ConnectionLost` and protocol errors, `fail` otherwise (the client returns those only
//!   when nothing was sent for proposal: redirects, refusals, unreachable nodes);
//! - a failed write on the scratch space: always `unknown` (its client does not say which hop
//!   failed).
//!
//! After an `unknown` op a client takes a new process id, so its next op never overlaps it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use checker::history::{KvHistory, KvOp, KvOut, OpHandle, Recorder};
use client::{ClientError, Expect, ReadMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What the workload reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Meta's scratch space.
    Scratch,
    /// The KV collection of this name.
    Collection(String),
}

/// Shape of the load.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub target: Target,
    /// Distinct keys.
    pub keys: u64,
    /// Concurrent clients (so at most this many per key).
    pub clients: u64,
    /// Share of reads.
    pub read_ratio: f64,
    /// Share of compare-and-swaps among writes (collections only).
    pub cas_ratio: f64,
    /// Per-request timeout (redirects included).
    pub timeout: Duration,
    /// Read from any replica without ReadIndex (a planted bug).
    pub stale_reads: bool,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            target: Target::Collection("nemesis".into()),
            keys: 128,
            clients: 8,
            read_ratio: 0.4,
            cas_ratio: 0.5,
            timeout: Duration::from_secs(2),
            stale_reads: false,
        }
    }
}

/// The scratch key of test key `k` in run `run`.
pub fn key_name(run: u64, k: u64) -> String {
    format!("nemesis/{run}/{k}")
}

/// One client's view of the target.
#[derive(Debug, Clone)]
pub struct Store {
    client: client::Client,
    target: Target,
    run: u64,
    stale: bool,
}

/// A value written by the workload; one it cannot have written (damaged, garbled) reads as
/// [`GARBLED`], which no write writes, so the checker flags the read instead of taking it
/// for an absent key.
fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(GARBLED)
}

/// What an unparseable value reads as: no write writes it.
pub const GARBLED: u64 = u64::MAX;

impl Store {
    /// A store over `client`; `stale` reads from any replica.
    pub fn new(client: client::Client, target: Target, run: u64, stale: bool) -> Store {
        Store {
            client,
            target,
            run,
            stale,
        }
    }

    fn key(&self, k: u64) -> Vec<u8> {
        match self.target {
            Target::Scratch => key_name(self.run, k).into_bytes(),
            Target::Collection(_) => format!("k{k}").into_bytes(),
        }
    }

    fn kv(&self) -> Option<client::Kv> {
        match &self.target {
            Target::Scratch => None,
            Target::Collection(n) => {
                let mode = if self.stale {
                    ReadMode::Follower
                } else {
                    ReadMode::Leader
                };
                Some(self.client.kv(n).with_reads(mode))
            }
        }
    }

    /// Whether the target supports compare-and-swap.
    pub fn has_cas(&self) -> bool {
        matches!(self.target, Target::Collection(_))
    }

    /// Read key `k`.
    ///
    /// # Errors
    /// The client's.
    pub async fn get(&self, k: u64) -> Result<Option<u64>, ClientError> {
        let key = self.key(k);
        match self.kv() {
            Some(kv) => Ok(kv.get(&key).await?.map(|v| parse(&v.value))),
            None => Ok(self
                .client
                .get(&key, !self.stale)
                .await?
                .map(|v| parse(&v.value))),
        }
    }

    /// Write key `k`.
    ///
    /// # Errors
    /// The client's.
    pub async fn put(&self, k: u64, v: u64) -> Result<(), ClientError> {
        let (key, val) = (self.key(k), v.to_string());
        match self.kv() {
            Some(kv) => kv.put(&key, val.as_bytes()).await.map(|_| ()),
            None => self.client.put(&key, val.as_bytes()).await.map(|_| ()),
        }
    }

    /// Compare-and-swap key `k` from `expected` (`None`: absent) to `new`.
    ///
    /// # Errors
    /// The client's; `InvalidArgument` on the scratch space.
    pub async fn cas(&self, k: u64, expected: Option<u64>, new: u64) -> Result<bool, ClientError> {
        let Some(kv) = self.kv() else {
            return Err(ClientError::InvalidArgument {
                field: "target".into(),
                message: "no compare-and-swap on the scratch space".into(),
            });
        };
        let expect = match expected {
            Some(v) => Expect::Value(v.to_string().into_bytes()),
            None => Expect::Absent,
        };
        let new = new.to_string();
        Ok(kv
            .cas(&self.key(k), expect, Some(new.as_bytes()))
            .await?
            .succeeded)
    }

    /// Whether a failed write may have applied.
    pub fn write_unknown(&self, e: &ClientError) -> bool {
        match self.target {
            Target::Scratch => true,
            Target::Collection(_) => crate::crash::outcome_unknown(e),
        }
    }
}

/// One get, recorded; the value read when answered.
pub async fn recorded_get(
    rec: &Recorder<KvOp, KvOut>,
    st: &Store,
    process: u64,
    key: u64,
) -> Option<Option<u64>> {
    let h = rec.invoke(process, KvOp::Get { key });
    match st.get(key).await {
        Ok(v) => {
            h.ok(KvOut::Get(v));
            Some(v)
        }
        Err(_) => {
            h.fail();
            None
        }
    }
}

/// What a recorded write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Ok,
    /// A compare-and-swap answered that did not swap.
    NotSwapped,
    Fail,
    Unknown,
}

/// Record a write that answered `e`: unknown when it may have applied, else failed.
fn settle(h: OpHandle<KvOp, KvOut>, st: &Store, e: &ClientError) -> WriteResult {
    if st.write_unknown(e) {
        h.unknown();
        WriteResult::Unknown
    } else {
        h.fail();
        WriteResult::Fail
    }
}

/// One put, recorded.
pub async fn recorded_put(
    rec: &Recorder<KvOp, KvOut>,
    st: &Store,
    process: u64,
    key: u64,
    value: u64,
) -> WriteResult {
    let h = rec.invoke(process, KvOp::Put { key, value });
    match st.put(key, value).await {
        Ok(()) => {
            h.ok(KvOut::Put);
            WriteResult::Ok
        }
        Err(e) => settle(h, st, &e),
    }
}

/// One compare-and-swap, recorded.
pub async fn recorded_cas(
    rec: &Recorder<KvOp, KvOut>,
    st: &Store,
    process: u64,
    key: u64,
    expected: Option<u64>,
    new: u64,
) -> WriteResult {
    let h = rec.invoke(process, KvOp::Cas { key, expected, new });
    match st.cas(key, expected, new).await {
        Ok(s) => {
            h.ok(KvOut::Cas(s));
            if s {
                WriteResult::Ok
            } else {
                WriteResult::NotSwapped
            }
        }
        Err(e) => settle(h, st, &e),
    }
}

/// Run `cfg.clients` clients until `stop` is set; client `w` draws from `seed + w`.
pub async fn run(
    cfg: WorkloadConfig,
    seeds: Vec<std::net::SocketAddr>,
    run_id: u64,
    seed: u64,
    rec: Recorder<KvOp, KvOut>,
    stop: Arc<AtomicBool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..cfg.clients {
        let (cfg, rec, stop) = (cfg.clone(), rec.clone(), stop.clone());
        let cl = client::Client::new(seeds.clone(), cfg.timeout).expect("client");
        let st = Store::new(cl, cfg.target.clone(), run_id, cfg.stale_reads);
        tasks.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(w));
            let mut generation = 0u64;
            let mut counter = 0u64;
            let mut seen: HashMap<u64, Option<u64>> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let process = (w << 32) | generation;
                let key = rng.gen_range(0..cfg.keys);
                let r = if rng.gen_bool(cfg.read_ratio) {
                    match recorded_get(&rec, &st, process, key).await {
                        Some(v) => {
                            seen.insert(key, v);
                            WriteResult::Ok
                        }
                        None => WriteResult::Fail,
                    }
                } else {
                    counter += 1;
                    let value = (w << 40) | counter;
                    if st.has_cas() && rng.gen_bool(cfg.cas_ratio) {
                        let expected = seen.get(&key).copied().flatten();
                        let r = recorded_cas(&rec, &st, process, key, expected, value).await;
                        if r == WriteResult::Ok {
                            seen.insert(key, Some(value));
                        }
                        r
                    } else {
                        let r = recorded_put(&rec, &st, process, key, value).await;
                        if r == WriteResult::Ok {
                            seen.insert(key, Some(value));
                        }
                        r
                    }
                };
                match r {
                    WriteResult::Unknown => {
                        generation += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    WriteResult::Fail => tokio::time::sleep(Duration::from_millis(50)).await,
                    _ => {}
                }
            }
        });
    }
    crate::join_all(&mut tasks).await;
}

/// Acknowledged writes lost, given final reads: a write `w` (a put, or a cas that answered
/// "swapped") acknowledged on key `k` is lost
/// when the final value of `k` is absent, or was written by a write that completed before `w`
/// was invoked (so `w` should have replaced it). Unknown writes and reads are ignored.
pub fn lost_acknowledged(
    h: &KvHistory,
    finals: &std::collections::HashMap<u64, Option<u64>>,
) -> usize {
    use std::collections::HashMap;
    // value -> complete time of the write (u64::MAX when unknown)
    let mut written: HashMap<(u64, u64), u64> = HashMap::new();
    let acked = |op: &checker::history::Op<KvOp, KvOut>| {
        matches!(op.outcome.ok(), Some(KvOut::Put) | Some(KvOut::Cas(true)))
    };
    for op in &h.ops {
        let (key, value) = match op.input {
            KvOp::Put { key, value } => (key, value),
            KvOp::Cas { key, new, .. } => (key, new),
            _ => continue,
        };
        let done = if acked(op) { op.complete } else { u64::MAX };
        written.insert((key, value), done);
    }
    let mut lost = 0;
    for op in &h.ops {
        let key = match op.input {
            KvOp::Put { key, .. } | KvOp::Cas { key, .. } => key,
            _ => continue,
        };
        if !acked(op) {
            continue;
        }
        match finals.get(&key) {
            Some(None) => lost += 1,
            Some(Some(v)) => {
                let done = written.get(&(key, *v)).copied().unwrap_or(u64::MAX);
                if done < op.invoke {
                    lost += 1;
                }
            }
            None => {}
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_garbled_value_reads_as_a_value_never_written() {
        assert_eq!(parse(b"42"), 42);
        assert_eq!(parse(b"42x"), GARBLED);
        assert_eq!(parse(b""), GARBLED);
        assert_eq!(parse(&[0xff]), GARBLED);
    }
}
