//! Unavailability per injected fault, measured from the recorded history.
//!
//! A fault's *window* runs from its start to the start of the next fault (or the end of the
//! load), so it covers the fault itself, its heal and the recovery after it. Within the window:
//! - **unavailability**: the longest stretch in which no operation completed successfully
//!   (the window's start and end count as boundaries), i.e. how long the workload saw the
//!   store down;
//! - **p99 latency**: of every operation invoked between the fault's start and its heal (any
//!   outcome; a timed-out op counts with its timeout).
//!
//! Per fault kind the run reports the maximum and the median unavailability.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use checker::history::History;

use crate::nemesis::FaultWindow;

/// What one fault cost the workload.
#[derive(Debug, Clone)]
pub struct FaultAvailability {
    pub kind: &'static str,
    /// Longest stretch without a successful operation inside the window.
    pub unavailable: Duration,
    /// p99 latency of the operations invoked while the fault was active.
    pub p99: Duration,
    /// Operations invoked while the fault was active, and how many of them succeeded.
    pub ops: usize,
    pub ok: usize,
}

fn ns_since(base: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// Measure every fault of `windows` against `h`, a history recorded by a recorder created at
/// `rec_start`; the last window ends at `load_end`.
pub fn measure<I, R>(
    h: &History<I, R>,
    rec_start: Instant,
    windows: &[FaultWindow],
    load_end: Instant,
) -> Vec<FaultAvailability> {
    let mut ok_done: Vec<u64> = h
        .ops
        .iter()
        .filter(|o| o.outcome.is_ok())
        .map(|o| o.complete)
        .collect();
    ok_done.sort_unstable();
    let mut out = Vec::with_capacity(windows.len());
    for (i, w) in windows.iter().enumerate() {
        let start = ns_since(rec_start, w.start);
        let heal = ns_since(rec_start, w.heal);
        let end = windows
            .get(i + 1)
            .map_or(ns_since(rec_start, load_end), |n| {
                ns_since(rec_start, n.start)
            })
            .max(heal);
        let from = ok_done.partition_point(|t| *t <= start);
        let to = ok_done.partition_point(|t| *t < end);
        let mut prev = start;
        let mut gap = 0u64;
        for t in ok_done[from..to]
            .iter()
            .copied()
            .chain(std::iter::once(end))
        {
            gap = gap.max(t.saturating_sub(prev));
            prev = t;
        }
        let mut lat: Vec<u64> = Vec::new();
        let mut ok = 0;
        for o in h
            .ops
            .iter()
            .filter(|o| o.invoke >= start && o.invoke < heal)
        {
            lat.push(o.complete.saturating_sub(o.invoke));
            if o.outcome.is_ok() {
                ok += 1;
            }
        }
        lat.sort_unstable();
        let p99 = if lat.is_empty() {
            0
        } else {
            lat[((lat.len() * 99).div_ceil(100)).clamp(1, lat.len()) - 1]
        };
        out.push(FaultAvailability {
            kind: w.kind,
            unavailable: Duration::from_nanos(gap),
            p99: Duration::from_nanos(p99),
            ops: lat.len(),
            ok,
        });
    }
    out
}

/// Unavailability and p99 latency by fault kind, over one run or many.
#[derive(Debug, Default, Clone)]
pub struct ByKind {
    /// Per kind: (unavailability, p99 latency) of every fault of that kind.
    pub kinds: BTreeMap<&'static str, Vec<(Duration, Duration)>>,
}

impl ByKind {
    /// Add measured faults.
    pub fn add(&mut self, faults: &[FaultAvailability]) {
        for f in faults {
            self.kinds
                .entry(f.kind)
                .or_default()
                .push((f.unavailable, f.p99));
        }
    }

    /// (max, median) unavailability of `kind`.
    pub fn unavailable(&self, kind: &str) -> Option<(Duration, Duration)> {
        let v = self.kinds.get(kind)?;
        let mut u: Vec<Duration> = v.iter().map(|x| x.0).collect();
        u.sort_unstable();
        Some((*u.last()?, median(&u)))
    }

    /// The worst unavailability over every kind.
    pub fn worst(&self) -> Duration {
        self.kinds
            .values()
            .flatten()
            .map(|x| x.0)
            .max()
            .unwrap_or_default()
    }

    /// One line: `kind=max/median` per kind.
    pub fn line(&self) -> String {
        let parts: Vec<String> = self
            .kinds
            .keys()
            .filter_map(|k| {
                let (max, med) = self.unavailable(k)?;
                Some(format!(
                    "{k}={:.2}/{:.2}s",
                    max.as_secs_f64(),
                    med.as_secs_f64()
                ))
            })
            .collect();
        parts.join(" ")
    }
}

fn median(sorted: &[Duration]) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

impl fmt::Display for ByKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {:<31} {:>6} {:>11} {:>10} {:>12}",
            "fault kind", "faults", "unavail max", "median", "p99 lat max"
        )?;
        for (k, v) in &self.kinds {
            let Some((max, med)) = self.unavailable(k) else {
                continue;
            };
            let p99 = v.iter().map(|x| x.1).max().unwrap_or_default();
            writeln!(
                f,
                "  {:<31} {:>6} {:>10.2}s {:>9.2}s {:>11.2}s",
                k,
                v.len(),
                max.as_secs_f64(),
                med.as_secs_f64(),
                p99.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use checker::history::{KvOp, KvOut, Outcome};

    fn window(base: Instant, kind: &'static str, s: u64, h: u64) -> FaultWindow {
        FaultWindow {
            kind,
            start: base + Duration::from_millis(s),
            heal: base + Duration::from_millis(h),
        }
    }

    #[test]
    fn longest_gap_without_success_per_window() {
        let base = Instant::now();
        let ms = 1_000_000u64;
        let mut h: History<KvOp, KvOut> = History::new();
        let get = KvOp::Get { key: 0 };
        // ok completions at 100, 200, then nothing until 1500 (a fault 150..1000), then 1600.
        for (inv, done, ok) in [
            (90, 100, true),
            (190, 200, true),
            (250, 1250, false),
            (1400, 1500, true),
            (1590, 1600, true),
        ] {
            let out = if ok {
                Outcome::Ok(KvOut::Get(None))
            } else {
                Outcome::Unknown
            };
            h.push(1, inv * ms, done * ms, get, out);
        }
        let w = [
            window(base, "kill", 150, 1000),
            window(base, "pause", 1550, 1580),
        ];
        let r = measure(&h, base, &w, base + Duration::from_millis(2000));
        assert_eq!(r.len(), 2);
        // Window 1: 150..1550; successes at 200 and 1500: longest gap 200..1500.
        assert_eq!(r[0].unavailable, Duration::from_millis(1300));
        // Invoked during the fault: the ops at 190 (ok) and 250 (unknown).
        assert_eq!(r[0].ops, 2);
        assert_eq!(r[0].ok, 1);
        assert_eq!(r[0].p99, Duration::from_millis(1000));
        // Window 2: 1550..2000; success at 1600: longest gap 1600..2000.
        assert_eq!(r[1].unavailable, Duration::from_millis(400));
        let mut k = ByKind::default();
        k.add(&r);
        assert_eq!(
            k.unavailable("kill"),
            Some((Duration::from_millis(1300), Duration::from_millis(1300)))
        );
        assert_eq!(k.worst(), Duration::from_millis(1300));
        assert!(k.line().contains("kill=1.30/1.30s"), "{}", k.line());
    }

    #[test]
    fn median_of_even_and_odd() {
        let d = Duration::from_secs;
        assert_eq!(median(&[d(1), d(2), d(9)]), d(2));
        assert_eq!(median(&[d(1), d(3)]), d(2));
        assert_eq!(median(&[]), Duration::ZERO);
    }
}
