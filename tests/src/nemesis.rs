//! A seeded schedule of faults and the runner that applies it to a [`Cluster`].
//!
//! The schedule is drawn up front from a seed (`SmallRng`): fault kind, duration, and the
//! random choices of each fault (victim index, group split, delay, loss probability). Choices
//! that depend on the cluster's state ("isolate the leader") are resolved when the fault starts.
//! Every fault is healed before the next one starts, after a quiet gap; every start and heal
//! is logged with its time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::cluster::Cluster;
use crate::proxy::Rule;

/// One kind of fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// kill -9 node index `node`, restart it from its data dir at heal.
    Kill { node: usize },
    /// kill -9 node index `node` and keep it down past the nodes' `dead-after`, until meta has
    /// removed it from meta's cell and from the workload collection's range (a membership
    /// change; bounded); restart it at heal (it is added back as a new member).
    LongKill { node: usize },
    /// SIGSTOP node index `node`, SIGCONT at heal.
    Pause { node: usize },
    /// Split the nodes (shuffled with `order`) into a minority and a majority, both ways.
    MajorityMinority { order: u64 },
    /// Two halves that cannot talk, and one bridge node that talks to both.
    Bridge { order: u64 },
    /// Cut meta's current leader from every other node, both ways.
    IsolateLeader,
    /// Cut the current leader of the workload collection's range (found by asking every node,
    /// see [`Cluster::range_leader`]) from every other node, both ways; meta's leader when the
    /// workload has no collection.
    IsolateRangeLeader,
    /// kill -9 the current leader of the workload collection's range (found like
    /// [`Fault::IsolateRangeLeader`]; meta's leader without a collection), restart it at heal.
    KillRangeLeader,
    /// Node index `node` cannot send to the others (`outbound`) or cannot hear them.
    OneWay { node: usize, outbound: bool },
    /// Every link delayed.
    Delay { fixed_ms: u64, jitter_ms: u64 },
    /// Every link loses raft batches with probability `p` (or is cut, with `cut`).
    Loss { p: f64, cut: bool },
}

impl Fault {
    /// Short name, for counting by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill",
            Fault::LongKill { .. } => "kill-long",
            Fault::Pause { .. } => "pause",
            Fault::MajorityMinority { .. } => "partition-majority",
            Fault::Bridge { .. } => "partition-bridge",
            Fault::IsolateLeader => "partition-isolate-leader",
            Fault::IsolateRangeLeader => "partition-isolate-range-leader",
            Fault::KillRangeLeader => "kill-range-leader",
            Fault::OneWay { .. } => "partition-one-way",
            Fault::Delay { .. } => "delay",
            Fault::Loss { .. } => "loss",
        }
    }
}

/// A fault with its planned duration.
#[derive(Debug, Clone)]
pub struct Planned {
    pub fault: Fault,
    pub hold: Duration,
    /// Quiet time before it starts.
    pub gap: Duration,
}

/// Fault kinds a schedule covers (each `rounds` times), long kills aside.
pub const KINDS: u8 = 10;

/// A seeded list of faults.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<Planned>,
}

impl Schedule {
    /// Faults for `nodes` nodes, covering every kind `rounds` times in a seeded order, each
    /// held for 1.5-3 s with 0.5-1.5 s of quiet before it; with `long_kill: Some(d)` also one
    /// [`Fault::LongKill`] per round, held `d` (the nodes' dead-after and a margin).
    pub fn generate_with(
        seed: u64,
        nodes: usize,
        rounds: usize,
        long_kill: Option<Duration>,
    ) -> Schedule {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut faults = Vec::new();
        let n = KINDS + u8::from(long_kill.is_some());
        for _ in 0..rounds {
            let mut kinds: Vec<u8> = (0..n).collect();
            kinds.shuffle(&mut rng);
            for k in kinds {
                let node = rng.gen_range(0..nodes);
                let fault = match k {
                    0 => Fault::Kill { node },
                    1 => Fault::Pause { node },
                    2 => Fault::MajorityMinority { order: rng.gen() },
                    3 => Fault::Bridge { order: rng.gen() },
                    4 => Fault::IsolateLeader,
                    5 => Fault::OneWay {
                        node,
                        outbound: rng.gen(),
                    },
                    8 => Fault::IsolateRangeLeader,
                    9 => Fault::KillRangeLeader,
                    6 => Fault::Delay {
                        fixed_ms: rng.gen_range(20..120),
                        jitter_ms: rng.gen_range(0..80),
                    },
                    7 => Fault::Loss {
                        p: rng.gen_range(0.1..0.4),
                        cut: rng.gen_bool(0.3),
                    },
                    _ => Fault::LongKill { node },
                };
                let hold = Duration::from_millis(rng.gen_range(1500..3000));
                let hold = match (&fault, long_kill) {
                    (Fault::LongKill { .. }, Some(d)) => d,
                    _ => hold,
                };
                faults.push(Planned {
                    fault,
                    hold,
                    gap: Duration::from_millis(rng.gen_range(500..1500)),
                });
            }
        }
        Schedule { seed, faults }
    }
}

/// One line of the fault log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub at: Duration,
    pub what: String,
}

/// One injected fault's window: from its start until it was healed.
#[derive(Debug, Clone)]
pub struct FaultWindow {
    pub kind: &'static str,
    pub start: Instant,
    pub heal: Instant,
}

/// What the nemesis did.
#[derive(Debug, Default, Clone)]
pub struct NemesisLog {
    pub entries: Vec<LogEntry>,
    pub by_kind: BTreeMap<&'static str, usize>,
    /// Long kills after which meta had removed the node from its cell and from the range.
    pub removed: usize,
    /// Every fault's window, in order (for unavailability, [`crate::availability`]).
    pub windows: Vec<FaultWindow>,
}

impl fmt::Display for NemesisLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            writeln!(f, "  {:>8.3}s {}", e.at.as_secs_f64(), e.what)?;
        }
        Ok(())
    }
}

fn shuffled(n: usize, order: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut SmallRng::seed_from_u64(order));
    v
}

fn cut_between(c: &Cluster, a: &[usize], b: &[usize], rules: &mut HashMap<(u64, u64), Rule>) {
    for x in a {
        for y in b {
            let (ix, iy) = (c.nodes[*x].id, c.nodes[*y].id);
            rules.insert((ix, iy), Rule::Drop);
            rules.insert((iy, ix), Rule::Drop);
        }
    }
}

fn isolate(c: &Cluster, li: usize, rules: &mut HashMap<(u64, u64), Rule>) {
    let others: Vec<usize> = (0..c.nodes.len()).filter(|i| *i != li).collect();
    cut_between(c, &[li], &others, rules);
}

/// Apply `fault` (`collection`: the workload's KV collection, if any); returns a description
/// of what was done (with resolved choices), or `None` when nothing was done (a leader-directed
/// fault found no leader within 5 s).
pub async fn apply(c: &mut Cluster, fault: &Fault, collection: Option<&str>) -> Option<String> {
    let n = c.nodes.len();
    let all: Vec<usize> = (0..n).collect();
    let mut rules = HashMap::new();
    let what = match fault {
        Fault::Kill { node } => {
            c.kill(*node);
            format!("kill -9 node {} (id {})", node, c.nodes[*node].id)
        }
        Fault::LongKill { node } => {
            c.kill(*node);
            format!(
                "kill -9 node {} (id {}) past dead-after",
                node, c.nodes[*node].id
            )
        }
        Fault::Pause { node } => {
            c.pause(*node);
            format!("SIGSTOP node {} (id {})", node, c.nodes[*node].id)
        }
        Fault::MajorityMinority { order } => {
            let v = shuffled(n, *order);
            let (minority, majority) = v.split_at((n - 1) / 2);
            cut_between(c, minority, majority, &mut rules);
            format!("partition minority {minority:?} | majority {majority:?}")
        }
        Fault::Bridge { order } => {
            let v = shuffled(n, *order);
            let bridge = v[0];
            let rest = &v[1..];
            let (a, b) = rest.split_at(rest.len() / 2);
            cut_between(c, a, b, &mut rules);
            format!("partition bridge {bridge} between {a:?} and {b:?}")
        }
        Fault::IsolateLeader => {
            let (li, _) = find_leader(c, None).await?;
            isolate(c, li, &mut rules);
            format!("partition isolate leader node {li}")
        }
        Fault::KillRangeLeader => {
            let (li, what) = find_leader(c, collection).await?;
            c.kill(li);
            format!(
                "kill -9 the leader of {what}: node {li} (id {})",
                c.nodes[li].id
            )
        }
        Fault::IsolateRangeLeader => {
            let (li, what) = find_leader(c, collection).await?;
            isolate(c, li, &mut rules);
            format!("partition isolate the leader of {what}: node {li}")
        }
        Fault::OneWay { node, outbound } => {
            let me = c.nodes[*node].id;
            for o in all.iter().filter(|i| *i != node) {
                let other = c.nodes[*o].id;
                let link = if *outbound { (me, other) } else { (other, me) };
                rules.insert(link, Rule::Drop);
            }
            if *outbound {
                format!("partition one-way: node {node} -/-> others")
            } else {
                format!("partition one-way: others -/-> node {node}")
            }
        }
        Fault::Delay {
            fixed_ms,
            jitter_ms,
        } => {
            every_link(
                c,
                Rule::Delay {
                    fixed: Duration::from_millis(*fixed_ms),
                    jitter: Duration::from_millis(*jitter_ms),
                },
                &mut rules,
            );
            format!("delay every link {fixed_ms} ms + up to {jitter_ms} ms")
        }
        Fault::Loss { p, cut } => {
            every_link(c, Rule::Loss { p: *p, cut: *cut }, &mut rules);
            format!(
                "loss on every link p={p:.2} ({})",
                if *cut { "cut connection" } else { "drop batch" }
            )
        }
    };
    if !rules.is_empty() {
        c.proxy.set_all(rules);
    }
    Some(what)
}

/// [`range_leader`], asked again every 100 ms for up to 5 s (a leader may be being elected
/// after the previous fault's heal).
async fn find_leader(c: &Cluster, collection: Option<&str>) -> Option<(usize, String)> {
    crate::cluster::wait_for(Duration::from_secs(5), || range_leader(c, collection)).await
}

/// The node index leading the workload collection's range holding `k0` (meta's leader without
/// a collection), with a description.
async fn range_leader(c: &Cluster, collection: Option<&str>) -> Option<(usize, String)> {
    match collection {
        Some(name) => c
            .range_leader(name, b"k0")
            .await
            .map(|(li, range)| (li, format!("range {range} of {name:?}"))),
        None => {
            let cl = c.client(Duration::from_secs(1));
            Cluster::meta_leader(&cl)
                .await
                .and_then(|l| c.index_of(l))
                .map(|li| (li, "meta (no collection)".to_string()))
        }
    }
}

fn every_link(c: &Cluster, rule: Rule, rules: &mut HashMap<(u64, u64), Rule>) {
    for a in &c.nodes {
        for b in &c.nodes {
            if a.id != b.id {
                rules.insert((a.id, b.id), rule);
            }
        }
    }
}

/// Undo every fault: all links pass, paused nodes resume, dead nodes restart.
pub fn heal(c: &mut Cluster) {
    c.proxy.heal();
    c.revive_all();
}

/// Run `schedule` against `c` (`collection`: the workload's, if any), logging with times
/// relative to `t0`.
pub async fn run(
    c: &mut Cluster,
    schedule: &Schedule,
    collection: Option<&str>,
    t0: Instant,
) -> NemesisLog {
    let mut log = NemesisLog::default();
    for p in &schedule.faults {
        tokio::time::sleep(p.gap).await;
        let Some(what) = apply(c, &p.fault, collection).await else {
            // Not injected: neither counted nor given a window.
            log.entries.push(LogEntry {
                at: t0.elapsed(),
                what: format!("skip {}: no leader found, nothing done", p.fault.kind()),
            });
            continue;
        };
        // The fault is in place once apply returns (a leader-directed one first looks up the
        // leader).
        let start = Instant::now();
        *log.by_kind.entry(p.fault.kind()).or_default() += 1;
        log.entries.push(LogEntry {
            at: t0.elapsed(),
            what: format!("start {what} for {:?}", p.hold),
        });
        tokio::time::sleep(p.hold).await;
        if let Fault::LongKill { node } = p.fault {
            // Down until meta removed it (a membership change), or 10 s more.
            let id = c.nodes[node].id;
            let removed = crate::cluster::wait_for(Duration::from_secs(10), || async {
                c.removed(id, collection).await.then_some(())
            })
            .await
            .is_some();
            log.removed += usize::from(removed);
            log.entries.push(LogEntry {
                at: t0.elapsed(),
                what: format!(
                    "node {node} {}",
                    if removed {
                        "removed from meta's cell and the range"
                    } else {
                        "NOT removed within 10 s past its hold"
                    }
                ),
            });
        }
        heal(c);
        log.windows.push(FaultWindow {
            kind: p.fault.kind(),
            start,
            heal: Instant::now(),
        });
        log.entries.push(LogEntry {
            at: t0.elapsed(),
            what: "heal".into(),
        });
    }
    log
}
