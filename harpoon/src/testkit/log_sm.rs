//! A state machine that records what it applied: the reference for "no acknowledged write
//! lost, none applied twice, every replica a prefix of the longest".
//!
//! Durable variant: an append-only file of records `[len u32 LE | fnv64 u64 LE | payload]`;
//! every applied entry, conf change and commit point is one record, so the apply state and
//! the data are one write (atomic per record: a torn tail record is ignored on open); a packed
//! entry is one record holding all its parts. A restore rewrites the file through a temporary
//! file and a rename.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::ConfState;

use crate::error::StateMachineError;
use crate::state_machine::{ApplyState, EntryRef, SmSnapshot, StateMachine};

/// One applied non-empty normal entry, or one non-empty part of a packed entry (the parts of
/// a pack share its index and term, in part order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedEntry {
    pub index: u64,
    pub term: u64,
    pub data: Bytes,
}

#[derive(Debug, Default)]
struct Inner {
    applied: Vec<AppliedEntry>,
    state: ApplyState,
}

/// A shared view of a [`LogStateMachine`]'s state, kept by the test.
#[derive(Debug, Clone, Default)]
pub struct LogHandle(Arc<Mutex<Inner>>);

impl LogHandle {
    /// The applied non-empty entries, in apply order.
    pub fn entries(&self) -> Vec<AppliedEntry> {
        self.0.lock().applied.clone()
    }
    /// The applied payloads, in apply order.
    pub fn data(&self) -> Vec<Bytes> {
        self.0
            .lock()
            .applied
            .iter()
            .map(|e| e.data.clone())
            .collect()
    }
    /// Number of applied non-empty entries.
    pub fn len(&self) -> usize {
        self.0.lock().applied.len()
    }
    /// Whether nothing was applied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The current apply state.
    pub fn apply_state(&self) -> ApplyState {
        self.0.lock().state.clone()
    }
}

/// The recording state machine. Its response to an entry is the entry's index (u64 LE); to a
/// part of a packed entry, the index followed by the part's own bytes.
#[derive(Debug)]
pub struct LogStateMachine {
    inner: Arc<Mutex<Inner>>,
    file: Option<(PathBuf, File)>,
}

const T_ENTRY: u8 = 1;
const T_CONF: u8 = 2;
const T_COMMIT: u8 = 3;
const T_RESET: u8 = 4;
const T_EMPTY: u8 = 5;
const T_PACK: u8 = 6;

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
}

fn sm_err(doing: &'static str, e: impl std::fmt::Display) -> StateMachineError {
    StateMachineError::new(doing, e.to_string())
}

fn encode_state(p: &mut Vec<u8>, s: &ApplyState) -> Result<(), StateMachineError> {
    for v in [
        s.applied_index,
        s.applied_term,
        s.commit_index,
        s.commit_term,
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    let cs = s
        .conf_state
        .write_to_bytes()
        .map_err(|e| sm_err("encode", e))?;
    p.extend_from_slice(&cs);
    Ok(())
}

/// Full image: a reset record with the apply state, then every applied entry.
fn encode_full(inner: &Inner) -> Result<Vec<u8>, StateMachineError> {
    let mut out = Vec::new();
    let mut p = vec![T_RESET];
    encode_state(&mut p, &inner.state)?;
    frame(&mut out, &p);
    for e in &inner.applied {
        let mut p = vec![T_ENTRY];
        p.extend_from_slice(&e.index.to_le_bytes());
        p.extend_from_slice(&e.term.to_le_bytes());
        p.extend_from_slice(&e.data);
        frame(&mut out, &p);
    }
    Ok(out)
}

/// Replay records onto `inner`; stops at the first torn or corrupt record (a torn tail).
fn replay(inner: &mut Inner, mut b: &[u8]) {
    while b.len() >= 12 {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let Some(sum) = u64_at(b, 4) else { return };
        let Some(p) = b.get(12..12 + len) else { return };
        if len == 0 || fnv(p) != sum {
            return;
        }
        let (Some(a), Some(t)) = (u64_at(p, 1), u64_at(p, 9)) else {
            return;
        };
        match p[0] {
            T_ENTRY => {
                inner.applied.push(AppliedEntry {
                    index: a,
                    term: t,
                    data: Bytes::copy_from_slice(&p[17..]),
                });
                inner.state.applied_index = a;
                inner.state.applied_term = t;
            }
            T_EMPTY => {
                inner.state.applied_index = a;
                inner.state.applied_term = t;
            }
            T_PACK => {
                let Ok(parts) = crate::pack::decode(&p[17..]) else {
                    return;
                };
                for part in parts.into_iter().filter(|d| !d.is_empty()) {
                    inner.applied.push(AppliedEntry {
                        index: a,
                        term: t,
                        data: Bytes::copy_from_slice(part),
                    });
                }
                inner.state.applied_index = a;
                inner.state.applied_term = t;
            }
            T_CONF => {
                let Ok(cs) = ConfState::parse_from_bytes(&p[17..]) else {
                    return;
                };
                inner.state.applied_index = a;
                inner.state.applied_term = t;
                inner.state.conf_state = cs;
            }
            T_COMMIT => {
                inner.state.commit_index = a;
                inner.state.commit_term = t;
            }
            T_RESET => {
                let (Some(ci), Some(ct)) = (u64_at(p, 17), u64_at(p, 25)) else {
                    return;
                };
                let Ok(cs) = ConfState::parse_from_bytes(&p[33..]) else {
                    return;
                };
                inner.applied.clear();
                inner.state = ApplyState {
                    applied_index: a,
                    applied_term: t,
                    commit_index: ci,
                    commit_term: ct,
                    conf_state: cs,
                };
            }
            _ => return,
        }
        b = &b[12 + len..];
    }
}

impl LogStateMachine {
    /// An in-memory recorder (for cells whose log is in memory too).
    pub fn in_memory() -> (LogStateMachine, LogHandle) {
        let h = LogHandle::default();
        (
            LogStateMachine {
                inner: h.0.clone(),
                file: None,
            },
            h,
        )
    }

    /// A durable recorder persisted at `path` (recovered if the file exists).
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<(LogStateMachine, LogHandle)> {
        let path = path.as_ref().to_path_buf();
        let mut inner = Inner::default();
        if let Ok(mut f) = File::open(&path) {
            let mut b = Vec::new();
            f.read_to_end(&mut b)?;
            replay(&mut inner, &b);
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let h = LogHandle(Arc::new(Mutex::new(inner)));
        Ok((
            LogStateMachine {
                inner: h.0.clone(),
                file: Some((path, file)),
            },
            h,
        ))
    }

    fn record(&mut self, payload: &[u8]) -> Result<(), StateMachineError> {
        if let Some((_, f)) = &mut self.file {
            let mut out = Vec::with_capacity(payload.len() + 12);
            frame(&mut out, payload);
            f.write_all(&out).map_err(|e| sm_err("apply", e))?;
        }
        Ok(())
    }
}

impl StateMachine for LogStateMachine {
    fn apply(&mut self, entry: EntryRef<'_>) -> Result<Bytes, StateMachineError> {
        let tag = if entry.data.is_empty() {
            T_EMPTY
        } else {
            T_ENTRY
        };
        let mut p = vec![tag];
        p.extend_from_slice(&entry.index.to_le_bytes());
        p.extend_from_slice(&entry.term.to_le_bytes());
        p.extend_from_slice(entry.data);
        self.record(&p)?;
        let mut g = self.inner.lock();
        if !entry.data.is_empty() {
            g.applied.push(AppliedEntry {
                index: entry.index,
                term: entry.term,
                data: Bytes::copy_from_slice(entry.data),
            });
        }
        g.state.applied_index = entry.index;
        g.state.applied_term = entry.term;
        Ok(Bytes::copy_from_slice(&entry.index.to_le_bytes()))
    }

    fn apply_packed(
        &mut self,
        index: u64,
        term: u64,
        parts: &[&[u8]],
    ) -> Result<Vec<Bytes>, StateMachineError> {
        // One record for the whole entry: a torn write never leaves half a pack applied.
        let mut p = vec![T_PACK];
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&term.to_le_bytes());
        p.extend_from_slice(&crate::pack::encode(parts.iter().copied()));
        self.record(&p)?;
        let mut g = self.inner.lock();
        let mut replies = Vec::with_capacity(parts.len());
        for part in parts {
            if !part.is_empty() {
                g.applied.push(AppliedEntry {
                    index,
                    term,
                    data: Bytes::copy_from_slice(part),
                });
            }
            let mut r = index.to_le_bytes().to_vec();
            r.extend_from_slice(part);
            replies.push(Bytes::from(r));
        }
        g.state.applied_index = index;
        g.state.applied_term = term;
        Ok(replies)
    }

    fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        conf_state: &ConfState,
    ) -> Result<(), StateMachineError> {
        let mut p = vec![T_CONF];
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&term.to_le_bytes());
        p.extend_from_slice(
            &conf_state
                .write_to_bytes()
                .map_err(|e| sm_err("encode", e))?,
        );
        self.record(&p)?;
        let mut g = self.inner.lock();
        g.state.applied_index = index;
        g.state.applied_term = term;
        g.state.conf_state = conf_state.clone();
        Ok(())
    }

    fn set_commit(&mut self, commit_index: u64, commit_term: u64) {
        let mut p = vec![T_COMMIT];
        p.extend_from_slice(&commit_index.to_le_bytes());
        p.extend_from_slice(&commit_term.to_le_bytes());
        // A failed write here surfaces at the next apply's write of the same file.
        let _ = self.record(&p);
        let mut g = self.inner.lock();
        g.state.commit_index = commit_index;
        g.state.commit_term = commit_term;
    }

    fn apply_state(&self) -> ApplyState {
        self.inner.lock().state.clone()
    }

    fn snapshot(&mut self) -> Result<SmSnapshot, StateMachineError> {
        let g = self.inner.lock();
        Ok(SmSnapshot {
            state: g.state.clone(),
            data: Bytes::from(encode_full(&g)?),
        })
    }

    fn restore(&mut self, snapshot: &SmSnapshot) -> Result<(), StateMachineError> {
        let mut fresh = Inner::default();
        replay(&mut fresh, &snapshot.data);
        fresh.state = snapshot.state.clone();
        if let Some((path, f)) = &mut self.file {
            let tmp = path.with_extension("tmp");
            let bytes = encode_full(&fresh)?;
            let mut t = File::create(&tmp).map_err(|e| sm_err("restore", e))?;
            t.write_all(&bytes).map_err(|e| sm_err("restore", e))?;
            t.sync_data().map_err(|e| sm_err("restore", e))?;
            std::fs::rename(&tmp, &*path).map_err(|e| sm_err("restore", e))?;
            *f = OpenOptions::new()
                .append(true)
                .open(&*path)
                .map_err(|e| sm_err("restore", e))?;
        }
        *self.inner.lock() = fresh;
        Ok(())
    }

    fn persist(&mut self) -> Result<(), StateMachineError> {
        if let Some((_, f)) = &mut self.file {
            f.sync_data().map_err(|e| sm_err("persist", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_roundtrip_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sm");
        {
            let (mut sm, _h) = LogStateMachine::open(&path).unwrap();
            sm.set_commit(7, 2);
            for i in 6..=7 {
                sm.apply(EntryRef {
                    index: i,
                    term: 2,
                    data: b"x",
                })
                .unwrap();
            }
        }
        // Torn tail: half a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let (sm, h) = LogStateMachine::open(&path).unwrap();
        assert_eq!(h.len(), 2);
        let st = sm.apply_state();
        assert_eq!((st.applied_index, st.commit_index), (7, 7));
    }

    #[test]
    fn packed_entries_are_recorded_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sm");
        {
            let (mut sm, h) = LogStateMachine::open(&path).unwrap();
            let r = sm.apply_packed(6, 2, &[b"a", b"", b"bc"]).unwrap();
            assert_eq!(r.len(), 3);
            assert_eq!(&r[2][..8], &6u64.to_le_bytes());
            assert_eq!(&r[2][8..], b"bc");
            assert_eq!(
                h.data(),
                vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
            );
            sm.apply_packed(7, 2, &[b"d", b"e"]).unwrap();
        }
        // A torn pack record: the first pack survives whole, the second not at all.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let (sm, h) = LogStateMachine::open(&path).unwrap();
        assert_eq!(
            h.data(),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
        );
        assert!(h.entries().iter().all(|e| e.index == 6));
        assert_eq!(sm.apply_state().applied_index, 6);
    }

    #[test]
    fn snapshot_restore() {
        let (mut a, _) = LogStateMachine::in_memory();
        a.apply(EntryRef {
            index: 6,
            term: 6,
            data: b"a",
        })
        .unwrap();
        let s = a.snapshot().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut b, hb) = LogStateMachine::open(dir.path().join("b")).unwrap();
        b.restore(&s).unwrap();
        assert_eq!(hb.data(), vec![Bytes::from_static(b"a")]);
        drop(b);
        let (_, hb2) = LogStateMachine::open(dir.path().join("b")).unwrap();
        assert_eq!(hb2.entries(), hb.entries());
        assert_eq!(hb2.apply_state().applied_index, 6);
    }
}
