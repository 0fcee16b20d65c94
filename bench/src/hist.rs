//! Latency histograms: one per client task (no sharing on the hot path), merged per run.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency a histogram holds: one hour, in microseconds. Longer samples are clamped.
const MAX_US: u64 = 3_600_000_000;

/// Microsecond latencies with 3 significant digits.
#[derive(Debug, Clone)]
pub struct LatencyHist {
    h: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencyHist {
    /// An empty histogram.
    pub fn new() -> Self {
        let h = Histogram::new_with_bounds(1, MAX_US, 3)
            .unwrap_or_else(|e| unreachable!("constant histogram bounds are valid: {e}"));
        Self { h }
    }

    /// Record one latency (sub-microsecond counts as 1 µs).
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(MAX_US)
            .clamp(1, MAX_US);
        self.h.saturating_record(us);
    }

    /// Record `us` microseconds directly.
    pub fn record_us(&mut self, us: u64) {
        self.h.saturating_record(us.clamp(1, MAX_US));
    }

    /// Add every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHist) {
        // Same bounds on both sides, so `add` cannot fail; saturate rather than panic anyway.
        if self.h.add(&other.h).is_err() {
            for v in other.h.iter_recorded() {
                self.h
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.h.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    /// Percentiles; all zero when empty.
    pub fn summary(&self) -> LatencySummary {
        if self.h.is_empty() {
            return LatencySummary {
                count: 0,
                mean_us: 0.0,
                p50_us: 0,
                p90_us: 0,
                p99_us: 0,
                p999_us: 0,
                max_us: 0,
            };
        }
        LatencySummary {
            count: self.h.len(),
            mean_us: self.h.mean(),
            p50_us: self.h.value_at_quantile(0.50),
            p90_us: self.h.value_at_quantile(0.90),
            p99_us: self.h.value_at_quantile(0.99),
            p999_us: self.h.value_at_quantile(0.999),
            max_us: self.h.max(),
        }
    }
}

/// Merge many histograms into one.
pub fn merge_all<'a>(hists: impl IntoIterator<Item = &'a LatencyHist>) -> LatencyHist {
    let mut out = LatencyHist::new();
    for h in hists {
        out.merge(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HDR with 3 significant digits: a value is known to within 0.1%.
    fn close(a: u64, b: u64) -> bool {
        a.abs_diff(b) <= b / 500 + 1
    }

    #[test]
    fn merge_keeps_every_sample_and_the_percentiles() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        for us in 1..=900 {
            a.record_us(us);
        }
        for us in 901..=1000 {
            b.record(Duration::from_micros(us));
        }
        let m = merge_all([&a, &b]);
        let s = m.summary();
        assert_eq!(s.count, 1000);
        assert!(close(s.p50_us, 500), "{s:?}");
        assert!(close(s.p90_us, 900), "{s:?}");
        assert!(close(s.p99_us, 990), "{s:?}");
        assert!(close(s.p999_us, 999), "{s:?}");
        assert!(close(s.max_us, 1000), "{s:?}");
        assert!((s.mean_us - 500.5).abs() < 1.0);
    }

    #[test]
    fn empty_and_extremes() {
        assert_eq!(LatencyHist::new().summary().count, 0);
        let mut h = LatencyHist::new();
        h.record(Duration::from_nanos(10));
        h.record(Duration::from_secs(10_000));
        let s = h.summary();
        assert_eq!(s.count, 2);
        assert!(s.p50_us >= 1);
        assert!(close(s.max_us, MAX_US));
    }
}
