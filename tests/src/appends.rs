//! An append workload on a KV collection, checked on the real replicas with
//! [`checker::append::check_append`].
//!
//! A *log* is one key (`a<j>`) whose value is a comma-separated list of unique numbers. An
//! append is a compare-and-swap from the list the appender knows to that list plus its value
//! (acknowledged at index = the old length; "not swapped" = definitely not appended; a lost
//! answer = unknown); reads are linearizable gets of the whole list. Two appenders per log, so
//! swaps conflict. A log is capped (`cap` entries); appenders then move on to key `a<j + logs>`.
//!
//! At the end each log is read from every node's own replica (follower reads sent to that node,
//! no ReadIndex) and from the leader: every replica's sequence must be a prefix of the longest,
//! without repeats; every acknowledged append must be in it at its index; no value that was never
//! appended, or whose append failed, may appear (the append checker's rules).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use checker::append::{check_append, AppendReport};
use checker::history::{AppendOp, AppendOut, Recorder};
use client::Expect;
use parking_lot::Mutex;

use crate::cluster::Cluster;
use crate::crash::outcome_unknown;

/// Shape of the append load.
#[derive(Debug, Clone)]
pub struct AppendConfig {
    /// Logs written at the same time.
    pub logs: u64,
    /// Appenders per log.
    pub per_log: u64,
    /// Entries per log key before the appenders move to the next key.
    pub cap: usize,
}

impl Default for AppendConfig {
    fn default() -> Self {
        AppendConfig {
            logs: 2,
            per_log: 2,
            cap: 200,
        }
    }
}

type Rec = Recorder<AppendOp, AppendOut>;

/// The recorders of every log key used.
#[derive(Debug, Clone, Default)]
pub struct AppendLogs {
    logs: Arc<Mutex<BTreeMap<u64, Rec>>>,
}

impl AppendLogs {
    fn recorder(&self, j: u64) -> Rec {
        self.logs.lock().entry(j).or_default().clone()
    }
}

/// The key of log `j`.
pub fn log_key(j: u64) -> String {
    format!("a{j}")
}

/// What an unparseable entry reads as: no append appends it, so the checker flags a damaged
/// log (`1,2,3x`) instead of taking its valid prefix for the log.
pub const GARBLED: u64 = u64::MAX;

fn parse(v: &[u8]) -> Vec<u64> {
    if v.is_empty() {
        return Vec::new();
    }
    match std::str::from_utf8(v) {
        Ok(s) => s.split(',').map(|t| t.parse().unwrap_or(GARBLED)).collect(),
        Err(_) => vec![GARBLED],
    }
}

fn render(v: &[u64]) -> String {
    let s: Vec<String> = v.iter().map(u64::to_string).collect();
    s.join(",")
}

async fn recorded_read(rec: &Rec, kv: &client::Kv, process: u64, key: &str) -> Option<Vec<u64>> {
    let h = rec.invoke(process, AppendOp::Read { from: 0, to: None });
    match kv.get(key.as_bytes()).await {
        Ok(v) => {
            let list = v.map(|kv| parse(&kv.value)).unwrap_or_default();
            h.ok(AppendOut::Values(list.clone()));
            Some(list)
        }
        Err(_) => {
            h.fail();
            None
        }
    }
}

/// Run the appenders on `collection` until `stop`; histories go to `logs`. Await the set.
pub fn run(
    cfg: &AppendConfig,
    seeds: Vec<SocketAddr>,
    collection: &str,
    logs: AppendLogs,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..cfg.logs * cfg.per_log {
        let cl = client::Client::new(seeds.clone(), Duration::from_secs(2)).expect("client");
        let kv = cl.kv(collection);
        let (cfg, logs, stop) = (cfg.clone(), logs.clone(), stop.clone());
        set.spawn(async move {
            let mut j = w % cfg.logs;
            let mut generation = 0u64;
            let mut known: Option<Vec<u64>> = None;
            let mut counter = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let process = (w << 32) | generation;
                let (key, rec) = (log_key(j), logs.recorder(j));
                counter += 1;
                let list = match known.take() {
                    Some(l) if !counter.is_multiple_of(8) => l,
                    _ => match recorded_read(&rec, &kv, process, &key).await {
                        Some(l) => l,
                        None => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                if list.len() >= cfg.cap {
                    j += cfg.logs;
                    continue;
                }
                let value = (w << 40) | counter;
                let mut next = list.clone();
                next.push(value);
                let expect = if list.is_empty() {
                    Expect::Absent
                } else {
                    Expect::Value(render(&list).into_bytes())
                };
                let h = rec.invoke(process, AppendOp::Append { value });
                match kv
                    .cas(key.as_bytes(), expect, Some(render(&next).as_bytes()))
                    .await
                {
                    Ok(o) if o.succeeded => {
                        h.ok(AppendOut::Index(list.len() as u64));
                        known = Some(next);
                    }
                    Ok(o) => {
                        h.fail();
                        known = Some(o.current.map(|kv| parse(&kv.value)).unwrap_or_default());
                    }
                    Err(e) if outcome_unknown(&e) => {
                        h.unknown();
                        generation += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => {
                        h.fail();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    set
}

/// What the append check found over every log.
#[derive(Debug, Default)]
pub struct AppendSummary {
    /// Log keys checked.
    pub logs: usize,
    pub operations: usize,
    /// Appends (ok, fail, unknown).
    pub appends: (usize, usize, usize),
    /// Entries in the final orders.
    pub entries: usize,
    /// Replica sequences compared (per log, every node that answered).
    pub replica_reads: usize,
    pub lost_acked: usize,
    pub anomalies: usize,
    /// Reports of the logs with anomalies.
    pub failing: Vec<(String, AppendReport)>,
}

impl AppendSummary {
    /// One line.
    pub fn line(&self) -> String {
        format!(
            "logs={} ops={} appends(ok={} fail={} unknown={}) entries={} replica_reads={} \
             anomalies={} lost_acked={}",
            self.logs,
            self.operations,
            self.appends.0,
            self.appends.1,
            self.appends.2,
            self.entries,
            self.replica_reads,
            self.anomalies,
            self.lost_acked
        )
    }
}

/// Read every log from every node's replica (and the leader) and check each.
pub async fn check(c: &Cluster, collection: &str, logs: &AppendLogs) -> AppendSummary {
    let mut s = AppendSummary::default();
    let recs: Vec<(u64, Rec)> = logs
        .logs
        .lock()
        .iter()
        .map(|(j, r)| (*j, r.clone()))
        .collect();
    let cl = c.client(Duration::from_secs(3));
    let kv = cl.kv(collection);
    for (j, rec) in recs {
        let key = log_key(j);
        let mut finals: Vec<(u64, Vec<u64>)> = Vec::new();
        // The leader's sequence, read linearizably (retried: the cluster just healed).
        for _ in 0..50 {
            if let Some(l) = recorded_read(&rec, &kv, u64::MAX - j, &key).await {
                finals.push((0, l));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some((cd, rd)) = c.lookup(collection, key.as_bytes()).await {
            for i in 0..c.nodes.len() {
                if let Some(Ok(mut resp)) = c.read_at(i, &cd, &rd, key.as_bytes(), true).await {
                    if resp.has_get() {
                        let mut g = resp.take_get();
                        let list = if g.has_kv() {
                            parse(&g.take_kv().value)
                        } else {
                            Vec::new()
                        };
                        finals.push((c.nodes[i].id, list));
                    }
                }
            }
        }
        let history = rec.finish();
        let r = check_append(&history, &finals);
        s.logs += 1;
        s.operations += r.operations;
        s.appends.0 += r.appends.0;
        s.appends.1 += r.appends.1;
        s.appends.2 += r.appends.2;
        s.entries += r.final_len;
        s.replica_reads += finals.len();
        s.lost_acked += r.lost_acked;
        s.anomalies += r.anomalies.len();
        if !r.is_valid() || finals.is_empty() {
            s.anomalies += usize::from(finals.is_empty());
            s.failing.push((key, r));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip() {
        assert_eq!(parse(b""), Vec::<u64>::new());
        assert_eq!(parse(render(&[3, 1, 2]).as_bytes()), vec![3, 1, 2]);
        assert_eq!(render(&[]), "");
    }

    #[test]
    fn a_damaged_entry_reads_as_a_value_never_appended() {
        assert_eq!(parse(b"1,2,3x"), vec![1, 2, GARBLED]);
        assert_eq!(parse(b"1,,2"), vec![1, GARBLED, 2]);
        assert_eq!(parse(&[0xff, b'1']), vec![GARBLED]);
    }
}
