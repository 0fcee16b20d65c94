//! Meta's replica: [`MetaStore`] as a harpoon [`StateMachine`], persisted in the data dir.
//!
//! Applied entries are encoded `metapb.Txn`s; the response is the encoded `TxnResult`. An
//! entry that does not decode is answered with a failed result, never applied (and never
//! fatal: bad input must not poison the node).
//!
//! Durability: the raft log is durable, the store lives in memory and is written to
//! `meta-<cell>.sm` (temporary file, fsync, rename) by `persist` (before every log compaction),
//! `restore` and on shutdown. `apply_state()` reports what that file holds, so after a restart
//! harpoon replays the log from there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use harpoon::{ApplyState, EntryRef, SmSnapshot, StateMachine, StateMachineError};
use meta::MetaStore;
use parking_lot::RwLock;
use proto::metapb::{PersistedReplica, StoreImage, Txn, TxnResult};
use protobuf::Message;
use raft::eraftpb::ConfState;
use tokio::sync::watch;

/// The shared, readable side of a meta replica: the node reads it, the state machine writes.
#[derive(Clone, Debug)]
pub struct MetaReplica {
    store: Arc<RwLock<MetaStore>>,
    revision: watch::Sender<u64>,
}

impl MetaReplica {
    fn new(store: MetaStore) -> Self {
        let (tx, _) = watch::channel(store.revision());
        MetaReplica {
            store: Arc::new(RwLock::new(store)),
            revision: tx,
        }
    }

    /// Read the store.
    pub fn read<T>(&self, f: impl FnOnce(&MetaStore) -> T) -> T {
        f(&self.store.read())
    }

    /// A copy of the store.
    pub fn snapshot(&self) -> MetaStore {
        self.store.read().clone()
    }

    /// The store's revision.
    pub fn revision(&self) -> u64 {
        self.store.read().revision()
    }

    /// Fires when the revision changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

/// The state machine of one meta replica.
pub struct MetaStateMachine {
    replica: MetaReplica,
    path: PathBuf,
    /// Apply state of the current (in-memory) store.
    current: ApplyState,
    /// Apply state of what the file holds.
    durable: ApplyState,
}

/// A state machine error while `doing`.
pub(crate) fn err(doing: &'static str, e: impl std::fmt::Display) -> StateMachineError {
    StateMachineError::new(doing, e.to_string())
}

/// The encoded `ConfState` (kept with a state machine's apply state).
pub(crate) fn encode_conf(cs: &ConfState) -> Result<Vec<u8>, StateMachineError> {
    cs.write_to_bytes().map_err(|e| err("encode", e))
}

impl MetaStateMachine {
    /// The file of cell `cell`'s replica in `dir`.
    pub fn path(dir: &Path, cell: u64) -> PathBuf {
        dir.join(format!("meta-{cell}.sm"))
    }

    /// A fresh replica (no file yet).
    pub fn fresh(path: PathBuf) -> (Self, MetaReplica) {
        let replica = MetaReplica::new(MetaStore::new());
        let sm = MetaStateMachine {
            replica: replica.clone(),
            path,
            current: ApplyState::default(),
            durable: ApplyState::default(),
        };
        (sm, replica)
    }

    /// Load a replica from its file.
    ///
    /// # Errors
    /// The file cannot be read or does not decode.
    pub fn load(path: PathBuf) -> Result<(Self, MetaReplica), StateMachineError> {
        let bytes = std::fs::read(&path).map_err(|e| err("load", e))?;
        let p = PersistedReplica::parse_from_bytes(&bytes).map_err(|e| err("load", e))?;
        let store = MetaStore::from_image(p.get_image()).map_err(|e| err("load", e))?;
        let conf_state = ConfState::parse_from_bytes(&p.conf_state).map_err(|e| err("load", e))?;
        let state = ApplyState {
            applied_index: p.applied_index,
            applied_term: p.applied_term,
            commit_index: p.commit_index,
            commit_term: p.commit_term,
            conf_state,
        };
        let replica = MetaReplica::new(store);
        Ok((
            MetaStateMachine {
                replica: replica.clone(),
                path,
                current: state.clone(),
                durable: state,
            },
            replica,
        ))
    }

    fn write_file(&mut self) -> Result<(), StateMachineError> {
        let mut p = PersistedReplica::new();
        p.set_image(self.replica.store.read().image());
        let s = &self.current;
        p.applied_index = s.applied_index;
        p.applied_term = s.applied_term;
        p.commit_index = s.commit_index;
        p.commit_term = s.commit_term;
        p.conf_state = encode_conf(&s.conf_state)?.into();
        let bytes = p.write_to_bytes().map_err(|e| err("persist", e))?;
        crate::durable::write_durably(&self.path, &bytes).map_err(|e| err("persist", e))?;
        self.durable = self.current.clone();
        Ok(())
    }
}

impl StateMachine for MetaStateMachine {
    fn apply(&mut self, entry: EntryRef<'_>) -> Result<Bytes, StateMachineError> {
        self.current.applied_index = entry.index;
        self.current.applied_term = entry.term;
        if entry.data.is_empty() {
            return Ok(Bytes::new());
        }
        let result = match Txn::parse_from_bytes(entry.data) {
            Ok(txn) => {
                let r = self.replica.store.write().apply(&txn);
                if r.succeeded {
                    self.replica.revision.send_replace(r.revision);
                }
                r
            }
            Err(e) => {
                tracing::warn!(index = entry.index, error = %e, "meta entry does not decode; not applied");
                TxnResult::new()
            }
        };
        Ok(result.write_to_bytes().map_err(|e| err("apply", e))?.into())
    }

    fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        conf_state: &ConfState,
    ) -> Result<(), StateMachineError> {
        self.current.applied_index = index;
        self.current.applied_term = term;
        self.current.conf_state = conf_state.clone();
        Ok(())
    }

    fn set_commit(&mut self, commit_index: u64, commit_term: u64) {
        self.current.commit_index = commit_index;
        self.current.commit_term = commit_term;
    }

    fn apply_state(&self) -> ApplyState {
        self.durable.clone()
    }

    fn snapshot(&mut self) -> Result<SmSnapshot, StateMachineError> {
        let img = self.replica.store.read().image();
        Ok(SmSnapshot {
            state: self.current.clone(),
            data: img.write_to_bytes().map_err(|e| err("snapshot", e))?.into(),
        })
    }

    fn restore(&mut self, snapshot: &SmSnapshot) -> Result<(), StateMachineError> {
        let store = if snapshot.data.is_empty() {
            MetaStore::new()
        } else {
            let img = StoreImage::parse_from_carllerche_bytes(&snapshot.data)
                .map_err(|e| err("restore", e))?;
            MetaStore::from_image(&img).map_err(|e| err("restore", e))?
        };
        let rev = store.revision();
        *self.replica.store.write() = store;
        self.current = snapshot.state.clone();
        self.write_file()?;
        self.replica.revision.send_replace(rev);
        Ok(())
    }

    fn persist(&mut self) -> Result<(), StateMachineError> {
        self.write_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meta::store::txn;

    #[test]
    fn persist_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = MetaStateMachine::path(dir.path(), 1);
        let (mut sm, replica) = MetaStateMachine::fresh(path.clone());
        sm.restore(&SmSnapshot::default()).unwrap();
        let mut t = Txn::new();
        txn::put(&mut t, b"k", b"v".to_vec());
        let data = t.write_to_bytes().unwrap();
        let r = sm
            .apply(EntryRef {
                index: 6,
                term: 5,
                data: &data,
            })
            .unwrap();
        assert!(TxnResult::parse_from_bytes(&r).unwrap().succeeded);
        // Garbage is answered, not applied, not fatal.
        let r = sm
            .apply(EntryRef {
                index: 7,
                term: 5,
                data: b"\xff\xff",
            })
            .unwrap();
        assert!(!TxnResult::parse_from_bytes(&r).unwrap().succeeded);
        assert_eq!(sm.apply_state().applied_index, 0);
        sm.persist().unwrap();
        assert_eq!(sm.apply_state().applied_index, 7);
        let (sm2, r2) = MetaStateMachine::load(path).unwrap();
        assert_eq!(sm2.apply_state().applied_index, 7);
        assert_eq!(r2.snapshot(), replica.snapshot());
    }
}
