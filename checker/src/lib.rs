//! History checkers for Quiver's Jepsen-style tests.
//!
//! Modules:
//! - [`history`]: recording what clients did. A thread-safe [`Recorder`](history::Recorder)
//!   hands out [`OpHandle`](history::OpHandle)s completed as `ok(output)`, `fail()` (definitely
//!   not applied) or `unknown()` (may or may not have applied; also what dropping an unfinished
//!   handle records). Finished [`History`](history::History)s are generic over the operation type;
//!   the KV ([`KvOp`](history::KvOp)/[`KvOut`](history::KvOut)) and append
//!   ([`AppendOp`](history::AppendOp)/[`AppendOut`](history::AppendOut)) types come with a
//!   line-oriented text format (`to_text`/`from_text`) to save and replay a failing run.
//! - [`linearizable`]: a Porcupine-style linearizability checker (Wing-Gong-Lowe search with
//!   memoisation, per key, on up to two threads, with a deadline) that shrinks a failing key's
//!   history to a small illegal slice, and a [`CheckReport`](linearizable::CheckReport).
//! - [`append`]: an Elle-style checker for append-only logs (raft entries, Log collections): no
//!   search, O(n log n), anomalies by kind including acknowledged writes lost and replica
//!   divergence.
//! - [`synth`]: seeded synthetic histories from a real register and a real log (linearizable /
//!   anomaly-free by construction), for property tests and benches.
//!
//! Uncertainty, as the checkers read it: `fail` means never applied (the op is dropped);
//! `unknown` means an append or a write (put, cas, delete) may take effect once at any time after
//! its invoke, or never; an `unknown` read says nothing and is dropped.
//!
//! Speed: `cargo bench -p checker --bench checker` checks 100K KV ops over 100 keys with 10
//! clients, 1M over 1,000 keys, 10K on a single key, and a 20K-op append history. Per-key
//! concurrency (and unknown writes per key) drive the KV cost: use many keys.
//!
//! Example:
//!
//! ```
//! use checker::history::{KvOp, KvOut, Recorder};
//! use checker::linearizable::{check_kv, CheckOptions};
//!
//! let rec = Recorder::new();
//! rec.invoke(1, KvOp::Put { key: 7, value: 42 }).ok(KvOut::Put);
//! let read = rec.invoke(2, KvOp::Get { key: 7 });
//! read.ok(KvOut::Get(Some(42)));
//! let timed_out = rec.invoke(3, KvOp::Delete { key: 7 });
//! drop(timed_out); // recorded as unknown: may or may not have been applied
//!
//! let report = check_kv(&rec.finish(), &CheckOptions::default());
//! assert!(report.is_linearizable(), "{report}");
//! println!("{report}");
//! ```

pub mod append;
pub mod history;
pub mod linearizable;
pub mod synth;
