//! Open-loop timing: when each request should start, and what its latency is.
//!
//! Request `i` is *intended* to start at `i / rate` seconds after the run starts, whether or not
//! earlier requests have returned. Its latency runs from that intended start to its reply, so a
//! stall that delays later sends shows up in their latencies (no coordinated omission: a closed
//! loop would instead send fewer requests during the stall and report only the one slow reply).
//!
//! Everything here is pure arithmetic on offsets from the start of the run, so it is tested on a
//! fake clock; the runner feeds it offsets measured with `Instant`.

use std::time::Duration;

/// The fixed-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    rate: u64,
}

impl Schedule {
    /// `rate` requests per second (at least 1).
    pub fn new(rate: u64) -> Self {
        Self { rate: rate.max(1) }
    }

    /// Requests per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Intended start of request `i`, as an offset from the start of the run. Computed from `i`
    /// directly (not by adding intervals), so it never drifts.
    pub fn intended(&self, i: u64) -> Duration {
        let ns = u128::from(i) * 1_000_000_000 / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Number of requests intended to start before offset `t`.
    pub fn count_before(&self, t: Duration) -> u64 {
        // Smallest i with intended(i) >= t is ceil(t * rate / 1e9).
        let n = (t.as_nanos() * u128::from(self.rate)).div_ceil(1_000_000_000);
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// The measured window of a run and the lateness threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Requests intended before this offset are warm-up: sent, not counted.
    pub warmup: Duration,
    /// Requests intended at or after this offset are not sent at all.
    pub end: Duration,
    /// A request sent more than this after its intended start is counted as late.
    pub late_after: Duration,
}

/// What happened to one scheduled request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Intended during the warm-up: not counted.
    Warmup,
    /// Intended after the end of the run: never sent.
    AfterEnd,
    /// Counted, with its latency from the intended start; `late` if its send was delayed past
    /// the threshold (no free client, or the scheduler fell behind).
    Measured { latency: Duration, late: bool },
    /// Intended inside the window but never sent: a client became free only after the run
    /// ended. The target rate was not sustained; its latency is unknown and unbounded.
    Missed,
}

impl Window {
    /// Whether a request intended at `intended` can still be sent at `now` (both offsets).
    /// The runner calls this when a client picks the request up.
    pub fn may_send(&self, intended: Duration, now: Duration) -> bool {
        intended < self.end && now < self.end.max(intended)
    }

    /// The outcome of a request intended at `intended`, sent at `sent` (`None`: not sent because
    /// [`Window::may_send`] said no), whose reply came at `done`.
    pub fn account(&self, intended: Duration, sent: Option<Duration>, done: Duration) -> Outcome {
        if intended >= self.end {
            return Outcome::AfterEnd;
        }
        if intended < self.warmup {
            return Outcome::Warmup;
        }
        match sent {
            None => Outcome::Missed,
            Some(sent) => Outcome::Measured {
                latency: done.saturating_sub(intended),
                late: sent.saturating_sub(intended) > self.late_after,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::LatencyHist;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn schedule_is_exact_and_does_not_drift() {
        let s = Schedule::new(3);
        assert_eq!(s.intended(0), Duration::ZERO);
        assert_eq!(s.intended(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.intended(3), Duration::from_secs(1));
        assert_eq!(s.intended(3_000_000), Duration::from_secs(1_000_000));
        assert_eq!(s.count_before(Duration::ZERO), 0);
        assert_eq!(s.count_before(Duration::from_nanos(1)), 1);
        assert_eq!(s.count_before(Duration::from_secs(1)), 3);
        assert_eq!(
            s.count_before(Duration::from_secs(1) + Duration::from_nanos(1)),
            4
        );
        assert_eq!(Schedule::new(0).rate(), 1);
    }

    /// One client (one request in flight) on a fake clock: the server stalls once for 500 ms
    /// while the schedule asks for a request every 10 ms. Measured from the intended start, every
    /// request queued behind the stall carries its share of it; measured from the send, only one
    /// request would look slow.
    #[test]
    fn latency_runs_from_the_intended_start() {
        let s = Schedule::new(100);
        let w = Window {
            warmup: 100 * MS,
            end: 2_000 * MS,
            late_after: MS,
        };
        let service = |i: u64| if i == 50 { 500 * MS } else { 2 * MS };

        let mut free_at = Duration::ZERO; // fake clock: when the only client is free again
        let (mut from_intended, mut from_send) = (LatencyHist::new(), LatencyHist::new());
        let (mut late, mut missed, mut warm) = (0, 0, 0);
        for i in 0.. {
            let intended = s.intended(i);
            if intended >= w.end {
                assert_eq!(w.account(intended, None, intended), Outcome::AfterEnd);
                break;
            }
            let pick = free_at.max(intended);
            let sent = w.may_send(intended, pick).then_some(pick);
            let done = sent.map_or(pick, |t| t + service(i));
            if sent.is_some() {
                free_at = done;
            }
            match w.account(intended, sent, done) {
                Outcome::Warmup => warm += 1,
                Outcome::Measured { latency, late: l } => {
                    from_intended.record(latency);
                    from_send.record(done - pick);
                    late += u64::from(l);
                }
                Outcome::Missed => missed += 1,
                Outcome::AfterEnd => unreachable!(),
            }
        }
        assert_eq!(warm, 10);
        assert_eq!(missed, 0);
        assert_eq!(from_intended.len(), 190);
        // The stall (request 50 sent at 500 ms, done at 1000 ms) delays request k > 50 until
        // 1000 + 2 (k - 51) ms; the backlog drains at 8 ms per request, so 51..=112 are sent
        // more than 1 ms late, and the tail shows the stall.
        assert_eq!(late, 62);
        let (a, b) = (from_intended.summary(), from_send.summary());
        assert!(a.p90_us > 200_000, "from intended: {a:?}");
        assert!(b.p90_us < 3_000, "from send: {b:?}");
        assert_eq!(a.max_us / 1000, 500);
    }

    /// A client that never catches up: requests left when the window closes are missed, not
    /// silently dropped from the count.
    #[test]
    fn requests_not_sent_before_the_end_are_missed() {
        let s = Schedule::new(1_000);
        let w = Window {
            warmup: Duration::ZERO,
            end: 100 * MS,
            late_after: MS,
        };
        let mut free_at = Duration::ZERO;
        let (mut measured, mut missed) = (0, 0);
        for i in 0..s.count_before(w.end) {
            let intended = s.intended(i);
            let pick = free_at.max(intended);
            let sent = w.may_send(intended, pick).then_some(pick);
            if let Some(t) = sent {
                free_at = t + 10 * MS; // ten times slower than the rate
            }
            match w.account(intended, sent, free_at) {
                Outcome::Measured { .. } => measured += 1,
                Outcome::Missed => missed += 1,
                o => panic!("{o:?}"),
            }
        }
        assert_eq!(measured, 10);
        assert_eq!(missed, 90);
    }
}
