//! Test helpers for harpoon and for later crates' tests (feature `testkit`).
//!
//! - [`LogStateMachine`]: records the applied sequence `(index, term, data)`, in memory or
//!   persisted to a file together with its apply state.
//! - [`Cluster`]: N nodes in one process over `transport::mem` or over TCP on 127.0.0.1
//!   ([`TransportKind`]), with kill/restart from the node's "disk", partitions and bounded
//!   waits (never fixed sleeps as assertions), bounded by [`WAIT`].

mod cluster;
mod log_sm;

pub use cluster::{Cluster, ClusterOptions, TransportKind, WAIT};
pub use log_sm::{AppliedEntry, LogHandle, LogStateMachine};

use std::time::{Duration, Instant};

/// Poll `f` every few milliseconds until it returns true or `timeout` passes; returns whether
/// it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
