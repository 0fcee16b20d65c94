//! The workloads of the benchmark issue, as data.
//!
//! | name | what                                  | clients | keys    |
//! |------|---------------------------------------|--------:|---------|
//! | W1   | put 256 B                             | 1       | uniform |
//! | W2   | put 256 B                             | 64      | uniform |
//! | W3   | put 256 B                             | 256     | uniform |
//! | W4   | linearizable get                      | 64      | uniform |
//! | W5   | follower get                          | 64      | uniform |
//! | W6   | YCSB A: 50% get / 50% put             | 64      | zipfian |
//! | W7   | YCSB B: 95% get / 5% put              | 64      | zipfian |
//! | W8   | YCSB C: 100% get                      | 64      | zipfian |
//! | W9   | batched puts, 16 per request          | 64      | uniform |
//! | W10  | put 4 KiB                             | 64      | uniform |
//! | W12  | open loop 50/50 at a fixed rate       | ≤64 in flight | zipfian |
//!
//! YCSB reads are linearizable. Workloads that read need the records loaded first
//! ([`Workload::needs_load`]).

use crate::backend::Consistency;
use crate::keys::KeyDist;

/// Default record count (keys `0..records`).
pub const DEFAULT_RECORDS: u64 = 100_000;
/// Default value size in bytes.
pub const DEFAULT_VALUE_SIZE: usize = 256;
/// Default rate of the open-loop workload W12, requests per second: moderate, below what
/// either system sustains at 64 clients on a small machine.
pub const DEFAULT_OPEN_RATE: u64 = 1_000;

/// Closed loop (each client waits for its reply before sending again) or open loop (requests
/// start on a fixed schedule whatever the replies do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Mode {
    /// `clients` tasks, each with one request in flight.
    Closed,
    /// `rate` requests per second; at most `clients` in flight.
    Open { rate: u64 },
}

/// One workload: what each request is and how many clients send them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Workload {
    /// `W1`..`W12`.
    pub name: &'static str,
    /// One line for tables.
    pub description: &'static str,
    /// Percentage of requests that are gets (the rest are puts), 0..=100.
    pub read_percent: u32,
    /// Consistency of the gets.
    pub consistency: Consistency,
    /// Client tasks (closed loop) or maximum requests in flight (open loop).
    pub clients: usize,
    /// Value size of puts, bytes.
    pub value_size: usize,
    /// Pairs per put request: 1 = single put, more = one `put_batch` request.
    pub batch: usize,
    /// How keys are chosen.
    pub keys: KeyDist,
    /// Closed or open loop.
    pub mode: Mode,
}

const fn put(
    name: &'static str,
    description: &'static str,
    clients: usize,
    value_size: usize,
    batch: usize,
) -> Workload {
    Workload {
        name,
        description,
        read_percent: 0,
        consistency: Consistency::Linearizable,
        clients,
        value_size,
        batch,
        keys: KeyDist::Uniform,
        mode: Mode::Closed,
    }
}

const fn mix(
    name: &'static str,
    description: &'static str,
    read_percent: u32,
    consistency: Consistency,
    keys: KeyDist,
) -> Workload {
    Workload {
        name,
        description,
        read_percent,
        consistency,
        clients: 64,
        value_size: DEFAULT_VALUE_SIZE,
        batch: 1,
        keys,
        mode: Mode::Closed,
    }
}

impl Workload {
    /// Every workload, in order.
    pub fn all() -> Vec<Workload> {
        use Consistency::{Follower, Linearizable};
        use KeyDist::{Uniform, Zipfian};
        vec![
            put("W1", "put 256 B, 1 client", 1, DEFAULT_VALUE_SIZE, 1),
            put("W2", "put 256 B, 64 clients", 64, DEFAULT_VALUE_SIZE, 1),
            put("W3", "put 256 B, 256 clients", 256, DEFAULT_VALUE_SIZE, 1),
            mix(
                "W4",
                "linearizable get, 64 clients",
                100,
                Linearizable,
                Uniform,
            ),
            mix("W5", "follower get, 64 clients", 100, Follower, Uniform),
            mix(
                "W6",
                "YCSB A 50/50 get/put, zipfian",
                50,
                Linearizable,
                Zipfian,
            ),
            mix(
                "W7",
                "YCSB B 95/5 get/put, zipfian",
                95,
                Linearizable,
                Zipfian,
            ),
            mix("W8", "YCSB C 100% get, zipfian", 100, Linearizable, Zipfian),
            put(
                "W9",
                "batched put 16 x 256 B, 64 clients",
                64,
                DEFAULT_VALUE_SIZE,
                16,
            ),
            put("W10", "put 4 KiB, 64 clients", 64, 4096, 1),
            Workload {
                mode: Mode::Open {
                    rate: DEFAULT_OPEN_RATE,
                },
                ..mix(
                    "W12",
                    "open loop 50/50 at a fixed rate",
                    50,
                    Linearizable,
                    Zipfian,
                )
            },
        ]
    }

    /// The workload called `name` (case-insensitive: `w2` is `W2`).
    pub fn by_name(name: &str) -> Option<Workload> {
        Self::all()
            .into_iter()
            .find(|w| w.name.eq_ignore_ascii_case(name))
    }

    /// Whether the records must exist before the run (it reads).
    pub fn needs_load(&self) -> bool {
        self.read_percent > 0
    }

    /// Ops per put request.
    pub fn ops_per_put(&self) -> u64 {
        self.batch.max(1) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let all = Workload::all();
        for w in &all {
            assert_eq!(Workload::by_name(w.name).as_ref(), Some(w));
            assert_eq!(Workload::by_name(&w.name.to_lowercase()).as_ref(), Some(w));
        }
        let mut names: Vec<_> = all.iter().map(|w| w.name).collect();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert!(Workload::by_name("W11").is_none());
    }

    #[test]
    fn workloads_match_the_issue() {
        let w = |n| Workload::by_name(n).unwrap_or_else(|| panic!("{n}"));
        assert_eq!(
            (w("W1").clients, w("W2").clients, w("W3").clients),
            (1, 64, 256)
        );
        assert_eq!(w("W5").consistency, Consistency::Follower);
        assert_eq!(
            (
                w("W6").read_percent,
                w("W7").read_percent,
                w("W8").read_percent
            ),
            (50, 95, 100)
        );
        assert_eq!(w("W9").batch, 16);
        assert_eq!(w("W10").value_size, 4096);
        assert!(matches!(w("W12").mode, Mode::Open { .. }));
        assert!(!w("W2").needs_load() && w("W4").needs_load());
    }
}
