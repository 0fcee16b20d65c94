//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::collections::HashMap;

use bytes::Bytes;
use harpoon::testkit::{AppliedEntry, Cluster};
use harpoon::{CellId, Reply};

pub use harpoon::testkit::WAIT;

/// Propose `n` writes `"{prefix}{i}"` one after the other; returns the acknowledged ones.
pub fn write_n(c: &Cluster, cell: CellId, prefix: &str, n: usize) -> Vec<(Bytes, Reply)> {
    (0..n)
        .map(|i| {
            let d = Bytes::from(format!("{prefix}{i}"));
            let r = c
                .propose_retry(cell, d.clone(), WAIT)
                .unwrap_or_else(|e| panic!("write {prefix}{i}: {e}"));
            (d, r)
        })
        .collect()
}

/// Every acknowledged write appears exactly once in `seq`, at the acknowledged index.
pub fn assert_acked_once(seq: &[AppliedEntry], acked: &[(Bytes, Reply)]) {
    let mut count: HashMap<&Bytes, usize> = HashMap::new();
    for e in seq {
        *count.entry(&e.data).or_default() += 1;
    }
    for (d, r) in acked {
        assert_eq!(
            count.get(d),
            Some(&1),
            "acked write {d:?} must be applied once"
        );
        let e = seq.iter().find(|e| e.data == d).unwrap();
        assert_eq!(
            (e.index, e.term),
            (r.index, r.term),
            "acked write {d:?} position"
        );
    }
    // No entry applied twice at all.
    for w in seq.windows(2) {
        assert!(w[0].index < w[1].index, "indexes strictly increase");
    }
}

/// Runs each scenario over both transports: `mem::<name>` and `tcp::<name>`, one `#[test]`
/// each, calling `<f>(TransportKind, args...)` in the including file.
///
/// ```ignore
/// on_both_transports! {
///     three_members_leader_killed => failover(3, 1);
/// }
/// ```
#[allow(unused_macros)] // not every test file that includes `common` uses it
macro_rules! on_both_transports {
    ($($name:ident => $f:ident($($arg:expr),* $(,)?);)+) => {
        mod mem {
            $(
                #[test]
                fn $name() {
                    super::$f(harpoon::testkit::TransportKind::Mem $(, $arg)*)
                }
            )+
        }
        mod tcp {
            $(
                #[test]
                fn $name() {
                    super::$f(harpoon::testkit::TransportKind::Tcp $(, $arg)*)
                }
            )+
        }
    };
}
