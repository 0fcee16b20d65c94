//! The KV ranges this node holds: one harpoon cell per range, applying through a
//! [`collections::kv::KvStore`] wrapped into harpoon's [`StateMachine`] ([`KvStateMachine`]).
//!
//! # Entries
//! A proposed entry is `now_ms` (u64 big-endian, the proposing leader's clock: the entry
//! clock TTLs are measured on) followed by an encoded `kvpb.Command` with full keys
//! (collection prefix included). Every replica applies the same bytes, so the same clock.
//!
//! # On disk
//! `<data dir>/ranges/<range id>/range.meta` names the collection and its persistence mode
//! (written before the cell is created; read at start-up to reopen the range), and the
//! store's own files live in `<data dir>/ranges/<range id>/kv/`:
//! - `memory`: nothing of the store (it is empty after a restart). The node has one raft
//!   `LogStore` for all its cells, on disk, so a memory range's raft log is on disk like every
//!   other (harpoon's in-memory log store is per node, not per cell). The store reports its
//!   current apply state as durable (the KvStore contract), so harpoon compacts freely; after
//!   a restart the empty store is behind the log's first index and harpoon refuses the cell
//!   (`NeedsSnapshot`): the replica is recorded as lost ([`Registry::failed`]) and the range
//!   is served by its other members. Re-adding such a member needs a way to drop a cell's raft
//!   state (or a fresh replica id): not done yet.
//! - `logged`: the store's snapshot file `kv.snap`, written by `persist` (before every log
//!   compaction and at shutdown); the raft log replays the rest.
//! - `persistent`: the seglog data log of the store.
//!
//! The apply state (applied index, commit point, encoded `ConfState` as `apply_meta`) is
//! stored by the KvStore atomically with its data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use collections::kv::{KvConfig, KvReader, KvStore, Persistence};
use harpoon::{
    ApplyState, CellId, EntryRef, NodeId, ReplicationMode, SmSnapshot, StateMachine,
    StateMachineError,
};
use meta::CollectionDescriptor;
use parking_lot::Mutex;
use proto::metapb;
use protobuf::{Message, ProtobufEnum};
use raft::eraftpb::ConfState;

use crate::node::Seed;

/// Bytes of the entry header (the leader's clock).
pub const ENTRY_HEADER: usize = 8;

/// Encode an entry: the leader clock, then the command.
pub fn encode_entry(now_ms: u64, command: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(ENTRY_HEADER + command.len());
    v.extend_from_slice(&now_ms.to_be_bytes());
    v.extend_from_slice(command);
    Bytes::from(v)
}

fn split_entry(data: &[u8]) -> (u64, &[u8]) {
    match data.split_first_chunk::<ENTRY_HEADER>() {
        Some((ts, rest)) => (u64::from_be_bytes(*ts), rest),
        // Not an entry of ours: apply answers it with a typed error.
        None => (0, data),
    }
}

fn sm_err(doing: &'static str, e: impl std::fmt::Display) -> StateMachineError {
    StateMachineError::new(doing, e.to_string())
}

fn to_harpoon(s: collections::kv::ApplyState) -> Result<ApplyState, StateMachineError> {
    let conf_state = if s.apply_meta.is_empty() {
        ConfState::default()
    } else {
        ConfState::parse_from_bytes(&s.apply_meta).map_err(|e| sm_err("apply_state", e))?
    };
    Ok(ApplyState {
        applied_index: s.applied_index,
        applied_term: s.applied_term,
        commit_index: s.commit_index,
        commit_term: s.commit_term,
        conf_state,
    })
}

/// The image of an empty store whose apply state is `state`.
fn empty_image(state: &ApplyState) -> Result<Bytes, StateMachineError> {
    let mut s = KvStore::open(KvConfig::memory()).map_err(|e| sm_err("restore", e))?;
    let meta = state
        .conf_state
        .write_to_bytes()
        .map_err(|e| sm_err("restore", e))?;
    s.set_commit(state.commit_index, state.commit_term);
    s.set_apply_meta(state.applied_index, state.applied_term, meta.into());
    s.reader()
        .snapshot()
        .to_bytes()
        .map_err(|e| sm_err("restore", e))
}

/// A KV range replica as a harpoon state machine.
pub struct KvStateMachine {
    store: KvStore,
}

impl KvStateMachine {
    /// Wrap `store`.
    pub fn new(store: KvStore) -> Self {
        KvStateMachine { store }
    }
}

impl StateMachine for KvStateMachine {
    fn apply(&mut self, entry: EntryRef<'_>) -> Result<Bytes, StateMachineError> {
        let (now, cmd) = if entry.data.is_empty() {
            (0, entry.data)
        } else {
            split_entry(entry.data)
        };
        self.store
            .apply(entry.index, entry.term, now, cmd)
            .map_err(|e| sm_err("apply", e))
    }

    fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        conf_state: &ConfState,
    ) -> Result<(), StateMachineError> {
        let meta = conf_state
            .write_to_bytes()
            .map_err(|e| sm_err("apply_conf_change", e))?;
        self.store.set_apply_meta(index, term, meta.into());
        Ok(())
    }

    fn set_commit(&mut self, commit_index: u64, commit_term: u64) {
        self.store.set_commit(commit_index, commit_term);
    }

    fn apply_state(&self) -> ApplyState {
        // A store whose apply meta does not decode cannot be trusted about its membership
        // either; report nothing applied so harpoon asks for a snapshot.
        to_harpoon(self.store.durable_state()).unwrap_or_default()
    }

    fn snapshot(&mut self) -> Result<SmSnapshot, StateMachineError> {
        let snap = self.store.reader().snapshot();
        let state = to_harpoon(snap.apply_state().clone())?;
        let data = snap.to_bytes().map_err(|e| sm_err("snapshot", e))?;
        Ok(SmSnapshot { state, data })
    }

    fn restore(&mut self, snapshot: &SmSnapshot) -> Result<(), StateMachineError> {
        // An empty image (harpoon's bootstrap): no data, but the apply state (index, commit
        // point, membership) must become the store's, durably.
        let image = if snapshot.data.is_empty() {
            empty_image(&snapshot.state)?
        } else {
            snapshot.data.clone()
        };
        self.store
            .restore_bytes(&image)
            .map_err(|e| sm_err("restore", e))?;
        Ok(())
    }

    fn persist(&mut self) -> Result<(), StateMachineError> {
        self.store.persist().map_err(|e| sm_err("persist", e))?;
        Ok(())
    }
}

/// One range replica held here.
#[derive(Debug, Clone)]
pub struct LocalRange {
    pub id: u64,
    pub collection: u64,
    pub persistence: metapb::Persistence,
    pub reader: KvReader,
}

/// The ranges this node holds, by range id.
#[derive(Debug, Default)]
pub struct Registry {
    ranges: Mutex<HashMap<u64, LocalRange>>,
    /// Ranges this node is listed in but cannot open (why), not retried until restart.
    failed: Mutex<HashMap<u64, String>>,
}

impl Registry {
    /// The replica of range `id`, if held here.
    pub fn get(&self, id: u64) -> Option<LocalRange> {
        self.ranges.lock().get(&id).cloned()
    }

    /// Every range held here.
    pub fn ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.ranges.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Why range `id` could not be opened here, if it could not.
    pub fn failed(&self, id: u64) -> Option<String> {
        self.failed.lock().get(&id).cloned()
    }

    fn insert(&self, r: LocalRange) {
        self.ranges.lock().insert(r.id, r);
    }
}

/// The dir of range `id`.
pub fn range_dir(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join("ranges").join(id.to_string())
}

fn meta_file(dir: &Path) -> PathBuf {
    dir.join("range.meta")
}

/// What `range.meta` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeMeta {
    pub range: u64,
    pub collection: u64,
    pub persistence: metapb::Persistence,
    pub replication: metapb::ReplicationMode,
}

impl RangeMeta {
    fn encode(&self) -> String {
        format!(
            "range={}\ncollection={}\npersistence={}\nreplication={}\n",
            self.range, self.collection, self.persistence as i32, self.replication as i32
        )
    }

    fn decode(s: &str) -> Option<RangeMeta> {
        let mut m = RangeMeta {
            range: 0,
            collection: 0,
            persistence: metapb::Persistence::MEMORY,
            replication: metapb::ReplicationMode::CONSENSUS,
        };
        for line in s.lines() {
            let (k, v) = line.split_once('=')?;
            let n: u64 = v.trim().parse().ok()?;
            let e = i32::try_from(n).ok();
            match k.trim() {
                "range" => m.range = n,
                "collection" => m.collection = n,
                "persistence" => m.persistence = metapb::Persistence::from_i32(e?)?,
                "replication" => m.replication = metapb::ReplicationMode::from_i32(e?)?,
                _ => {}
            }
        }
        (m.range != 0).then_some(m)
    }
}

fn write_meta(dir: &Path, m: &RangeMeta) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("range.meta.tmp");
    std::fs::write(&tmp, m.encode())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, meta_file(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Why a range could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("range dir: {0}")]
    Io(#[from] std::io::Error),
    #[error("kv store: {0}")]
    Store(#[from] collections::KvError),
    #[error("cell: {0}")]
    Cell(#[from] harpoon::Error),
}

fn open_local(seed: &Seed, m: &RangeMeta) -> Result<KvStore, OpenError> {
    let dir = range_dir(&seed.dir(), m.range);
    write_meta(&dir, m)?;
    let kv_dir = dir.join("kv");
    let persistence = match m.persistence {
        metapb::Persistence::MEMORY => Persistence::Memory,
        metapb::Persistence::LOGGED => Persistence::Logged { dir: kv_dir },
        metapb::Persistence::PERSISTENT => Persistence::Persistent { dir: kv_dir },
    };
    Ok(KvStore::open(KvConfig::with(persistence))?)
}

async fn create(seed: &Seed, m: RangeMeta, voters: &[NodeId]) -> Result<(), OpenError> {
    if seed.ranges.get(m.range).is_some() {
        return Ok(());
    }
    let store = open_local(seed, &m)?;
    let reader = store.reader();
    let mode = match m.replication {
        metapb::ReplicationMode::CONSENSUS => ReplicationMode::Consensus,
        metapb::ReplicationMode::ASYNC => ReplicationMode::Async,
    };
    match seed
        .node
        .create_cell(
            CellId(m.range),
            voters,
            &[],
            mode,
            Box::new(KvStateMachine::new(store)),
        )
        .await
    {
        Ok(()) | Err(harpoon::Error::CellExists { .. }) => {}
        Err(e) => {
            if matches!(e, harpoon::Error::NeedsSnapshot { .. }) {
                tracing::warn!(
                    range = m.range,
                    error = %e,
                    "range replica lost (its log was compacted past the store): not served here"
                );
                seed.ranges.failed.lock().insert(m.range, e.to_string());
            }
            return Err(e.into());
        }
    }
    seed.ranges.insert(LocalRange {
        id: m.range,
        collection: m.collection,
        persistence: m.persistence,
        reader,
    });
    tracing::info!(
        node = seed.id,
        range = m.range,
        persistence = ?m.persistence,
        bootstrap = !voters.is_empty(),
        "range replica opened"
    );
    Ok(())
}

/// Open this node's replica of range `range` of `collection`: the cell with this node as
/// its only voter when `bootstrap` (the range's first member), else an empty replica that
/// the range's leader fills by snapshot.
///
/// # Errors
/// The range dir, the store or the cell cannot be created.
pub async fn open(
    seed: &Seed,
    range: u64,
    collection: &CollectionDescriptor,
    bootstrap: bool,
) -> Result<(), OpenError> {
    let m = RangeMeta {
        range,
        collection: collection.id,
        persistence: collection.persistence,
        replication: collection.replication,
    };
    let voters = if bootstrap {
        vec![NodeId(seed.id)]
    } else {
        vec![]
    };
    create(seed, m, &voters).await
}

/// At start-up: reopen every range whose `range.meta` is in the data dir.
pub async fn reopen_all(seed: &Arc<Seed>) {
    let root = seed.dir().join("ranges");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(s) = std::fs::read_to_string(meta_file(&e.path())) else {
            continue;
        };
        let Some(m) = RangeMeta::decode(&s) else {
            tracing::warn!(path = %e.path().display(), "unreadable range.meta; range skipped");
            continue;
        };
        let id = m.range;
        if let Err(err) = create(seed, m, &[]).await {
            tracing::warn!(range = id, error = %err, "cannot reopen range");
        }
    }
}

/// At shutdown: hand the leadership of every range led here to another voter, and make
/// every range's applied state durable (log compaction persists first).
pub async fn flush_all(seed: &Arc<Seed>) {
    for id in seed.ranges.ids() {
        let cell = CellId(id);
        if let Ok(st) = seed.node.status(cell).await {
            if st.role == harpoon::Role::Leader {
                if let Some(to) = st.conf.voters.iter().copied().find(|v| *v != seed.id) {
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
                    let _ = seed.node.transfer_leader(cell, NodeId(to), deadline).await;
                }
            }
        }
        let _ = seed.node.compact_log(cell).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_meta_round_trip() {
        let m = RangeMeta {
            range: 7,
            collection: 3,
            persistence: metapb::Persistence::PERSISTENT,
            replication: metapb::ReplicationMode::ASYNC,
        };
        assert_eq!(RangeMeta::decode(&m.encode()), Some(m));
        assert_eq!(RangeMeta::decode("garbage"), None);
    }

    #[test]
    fn adapter_applies_persists_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = KvConfig::with(Persistence::Logged {
            dir: dir.path().join("a"),
        });
        let mut sm = KvStateMachine::new(KvStore::open(cfg.clone()).unwrap());
        let cmd = collections::kv::cmd::encode(&collections::kv::cmd::put(b"k", b"v", 0));
        let data = encode_entry(1000, &cmd);
        sm.apply(EntryRef {
            index: 1,
            term: 1,
            data: &data,
        })
        .unwrap();
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        sm.apply_conf_change(2, 1, &cs).unwrap();
        // Garbage is answered, not fatal.
        sm.apply(EntryRef {
            index: 3,
            term: 1,
            data: b"\x01",
        })
        .unwrap();
        assert_eq!(sm.apply_state().applied_index, 0);
        sm.persist().unwrap();
        let st = sm.apply_state();
        assert_eq!(st.applied_index, 3);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        let snap = sm.snapshot().unwrap();
        drop(sm);
        let reopened = KvStateMachine::new(KvStore::open(cfg).unwrap());
        assert_eq!(reopened.apply_state(), st);
        let (kv, _) = reopened.store.get(b"k", 0).unwrap();
        assert_eq!(kv.unwrap().value.as_ref(), b"v");
        let mut other = KvStateMachine::new(KvStore::open(KvConfig::memory()).unwrap());
        other.restore(&snap).unwrap();
        assert_eq!(other.apply_state().conf_state.voters, vec![1, 2, 3]);
        assert!(other.store.get(b"k", 0).unwrap().0.is_some());
    }

    #[test]
    fn bootstrap_restore_of_an_empty_image_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = KvConfig::with(Persistence::Persistent {
            dir: dir.path().join("p"),
        });
        let mut sm = KvStateMachine::new(KvStore::open(cfg.clone()).unwrap());
        let state = ApplyState {
            applied_index: 5,
            applied_term: 5,
            commit_index: 5,
            commit_term: 5,
            conf_state: ConfState {
                voters: vec![9],
                ..Default::default()
            },
        };
        sm.restore(&SmSnapshot {
            state: state.clone(),
            data: Bytes::new(),
        })
        .unwrap();
        assert_eq!(sm.apply_state(), state);
        drop(sm);
        let reopened = KvStateMachine::new(KvStore::open(cfg).unwrap());
        assert_eq!(reopened.apply_state(), state);
    }
}
