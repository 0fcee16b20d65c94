//! The KV ranges this node holds: one harpoon cell per range, applying through a
//! [`collections::kv::KvStore`] wrapped into harpoon's [`StateMachine`] ([`KvStateMachine`]).
//!
//! # Entries
//! A proposed entry is `now_ms` (u64 big-endian, the proposing leader's clock: the entry
//! clock TTLs are measured on) followed by an encoded `kvpb.Command` with full keys
//! (collection prefix included). Every replica applies the same bytes, so the same clock.
//!
//! Admin entries set the top bit of the header (a clock is always below 2^63), followed by an
//! [`AdminCommand`] ([`encode_admin`]); normal entries pay nothing for them.
//!
//! # Splits
//! A [`AdminCommand::Split`] names the split key `at`, the daughter's range id (reserved in
//! meta) and the bounds the proposer's store had. Every replica applies it the same way
//! ([`KvStateMachine`] with a [`SplitHost`], the node): if the bounds differ or `at` is not
//! strictly inside them (a stale or duplicate split) the entry is answered with an error and
//! changes nothing. If the daughter is already held or being opened here (assign opened it
//! empty and a snapshot fills it), the store only drops its right half
//! ([`KvStore::split_drop_right`]). Otherwise the daughter's `range.meta` is written first
//! (`parent`, `split_index`), then [`KvStore::split_off`] builds the right half in the
//! daughter's dir (durable before the left half), its apply meta becomes the parent's
//! `ConfState` made non-joint ([`daughter_conf`]), and the daughter's cell is created without
//! waiting (the shard thread is applying) and registered. harpoon opens it with the state
//! machine ahead of an empty log and writes a Snapshot record at (split index, split term).
//! A registry claim makes exactly one of apply, self-assignment and start-up open a range.
//!
//! The leader proposes a split with [`propose_split`]: answered at apply (also in an Async
//! range), behind the range's [`SplitFence`], so that an Async-mode write acknowledged before
//! it applied is never one the split refuses at apply (its key moved away): client writes
//! ([`crate::kv_port`]) are proposed at apply while the fence is up ([`write_ack`]) and
//! settled after a LeaderDurable reply ([`settle_async_write`]). Writes that need their
//! result (compare-and-swap, deletes, previous values, batches: [`needs_apply_result`]) are
//! answered at apply in every mode.
//!
//! # On disk
//! `<data dir>/ranges/<range id>/range.meta` names the collection and its persistence mode
//! (written before the cell is created; read at start-up to reopen the range), for a daughter
//! also its parent and split index, and the
//! store's own files live in `<data dir>/ranges/<range id>/kv/`:
//! - `memory`: nothing but `range.meta` (metadata: ids, modes, a daughter's split index; no
//!   key or value). The store lives in memory and its raft log too: the cell is created
//!   with harpoon's volatile log store ([`harpoon::LogKind::Volatile`], the node's in-memory
//!   `LogStore`), so no entry, hard state or snapshot of a memory range reaches the disk and
//!   its rounds cost no fsync. The store reports its current apply state as durable (the
//!   KvStore contract), so harpoon compacts freely. After a restart the replica's data, log
//!   and hard state (term, vote) are gone; it must never come back as a blank replica with
//!   the same identity (it could vote twice in a term). So [`reopen_all`] creates no cell for
//!   a memory range whose `range.meta` it finds, nor for a range dir whose `range.meta` cannot
//!   be read or decoded (it may be a memory range; [`classify_range_dir`]), and
//!   self-assignment opens no memory replica whose dir is here ([`listed_unheld`]): the
//!   replica is recorded as lost ([`Registry::failed`], which no claim passes, not even a
//!   parent's replayed split) and the range is served by its other members. It rejoins
//!   ([`crate::loops`], housekeeping): listed as a voter, it asks meta to demote it to a
//!   learner; the range's leader takes such a voter out of the cell, then out of meta; once
//!   meta no longer lists it, [`forget_lost`] destroys what is left of its raft state and the
//!   range dir, and self-assignment claims a slot again as a learner, filled by snapshot.
//! - `logged`: the store's snapshot file `kv.snap`, written on the store's own thread
//!   (`persist_background`: periodic log compaction, log GC, a split's left half) or in place
//!   (`persist`: shutdown, a learner's snapshot); the raft log replays the rest.
//! - `persistent`: the seglog data log of the store, in [`RANGE_SEGMENT_SIZE`] (17 MiB)
//!   segments rather than seglog's 64 MiB default: every segment is preallocated and a reopen
//!   scans the active one, per range.
//!
//! A replica this node was removed from (harpoon destroyed its cell and raft log) is dropped
//! with its dir once meta no longer lists this node ([`drop_removed`], from the housekeeping
//! loop); one removed while it lagged, whose cell never learnt of it, is dropped when meta's
//! record says so ([`crate::linger`]: [`drop_lingering`] destroys the cell through harpoon,
//! then the dir); a lost replica's raft state and dir are forgotten the same way
//! ([`forget_lost`]). The range is claimed in the registry while its dir is deleted, so
//! nothing opens it into a dir being deleted.
//! Neither deletes a logged daughter's dir while its parent here may still replay the split
//! that materialised it (the parent's left-half image is written in the background): the
//! parent's image is made durable past the split first ([`settle_parent_image`]), or a crash
//! would materialise the daughter again, blank of its raft state, under the same identity.
//!
//! A store whose files are damaged (a `kv.snap` or data log that fails its checksum or holds
//! impossible values: [`damaged_image`]) is never served: opening it (at start-up or from
//! self-assignment) records the replica as lost, with an error line naming the file and the
//! reason (a data log's names the segment and offset), and it takes the same way out and back
//! in as a lost memory replica. Its dir, the only copy of the damage, is deleted only once
//! the range's leader took it out of the cell, that is once a quorum of healthy replicas
//! holds the range. If every replica (or a majority) is damaged, no leader is elected: the
//! replicas stay members, none is forgotten, each keeps its dir and logs its refusal, and the
//! range does not serve until an operator repairs or restores a store (a lost voter also
//! keeps its voter role in meta while meta lists no other voter, see [`crate::loops`]).
//!
//! The apply state (applied index, commit point, encoded `ConfState` as `apply_meta`) is
//! stored by the KvStore atomically with its data.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use collections::kv::{KeyRange, KvConfig, KvReader, KvStore, Persistence};
use harpoon::{
    Ack, ApplyState, CellId, CellOptions, EntryRef, NodeId, ReplicationMode, SmSnapshot,
    StateMachine, StateMachineError,
};
use meta::CollectionDescriptor;
use parking_lot::Mutex;
use proto::{kvpb, metapb};
use protobuf::{Message, ProtobufEnum};
use raft::eraftpb::ConfState;

use crate::meta_sm::{encode_conf, err};
use crate::node::Seed;

/// Bytes of the entry header (the leader's clock).
pub const ENTRY_HEADER: usize = 8;

/// The header bit that marks an admin entry.
pub const ADMIN_FLAG: u64 = 1 << 63;

/// Encode an entry: the leader clock, then the command.
pub fn encode_entry(now_ms: u64, command: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(ENTRY_HEADER + command.len());
    v.extend_from_slice(&(now_ms & !ADMIN_FLAG).to_be_bytes());
    v.extend_from_slice(command);
    Bytes::from(v)
}

/// A split proposed by the range's leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitCommand {
    /// The first key of the daughter.
    pub at: Bytes,
    /// The daughter's range id (reserved in meta).
    pub daughter: u64,
    /// The store's bounds when the split was proposed; a replica whose bounds differ when it
    /// applies the entry refuses it.
    pub lo: Bytes,
    pub hi: Option<Bytes>,
}

/// An admin entry's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    Split(SplitCommand),
}

const ADMIN_SPLIT: u8 = 1;

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_be_bytes());
    v.extend_from_slice(b);
}

/// Encode an admin entry: the clock with [`ADMIN_FLAG`] set, the command's kind, its fields
/// (u64 big-endian; byte strings as u32 big-endian length then bytes; an optional one as a
/// presence byte first).
pub fn encode_admin(now_ms: u64, cmd: &AdminCommand) -> Bytes {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&(now_ms | ADMIN_FLAG).to_be_bytes());
    match cmd {
        AdminCommand::Split(s) => {
            v.push(ADMIN_SPLIT);
            v.extend_from_slice(&s.daughter.to_be_bytes());
            put_bytes(&mut v, &s.at);
            put_bytes(&mut v, &s.lo);
            match &s.hi {
                None => v.push(0),
                Some(hi) => {
                    v.push(1);
                    put_bytes(&mut v, hi);
                }
            }
        }
    }
    Bytes::from(v)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("admin entry cut short in {what}"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self, what: &str) -> Result<Bytes, String> {
        let b = self.take(4, what)?;
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        Ok(Bytes::copy_from_slice(self.take(n, what)?))
    }
}

/// Decode an admin entry's payload (what follows the 8-byte header).
///
/// # Errors
/// A description of what does not decode (unknown kind, cut short, trailing bytes).
pub fn decode_admin(payload: &[u8]) -> Result<AdminCommand, String> {
    let mut c = Cursor(payload);
    let cmd = match c.u8("kind")? {
        ADMIN_SPLIT => {
            let daughter = c.u64("daughter")?;
            let at = c.bytes("at")?;
            let lo = c.bytes("lo")?;
            let hi = match c.u8("hi")? {
                0 => None,
                1 => Some(c.bytes("hi")?),
                n => return Err(format!("admin entry: bad presence byte {n} for hi")),
            };
            AdminCommand::Split(SplitCommand {
                at,
                daughter,
                lo,
                hi,
            })
        }
        k => return Err(format!("unknown admin command kind {k}")),
    };
    if !c.0.is_empty() {
        return Err(format!(
            "{} trailing bytes after the admin command",
            c.0.len()
        ));
    }
    Ok(cmd)
}

/// The daughter's membership: the parent's applied `ConfState` made non-joint, the same way
/// on every replica: the incoming voters stay voters, learners and the voters being demoted
/// (`learners_next`) are learners, the outgoing-only voters are dropped.
pub fn daughter_conf(parent: &ConfState) -> ConfState {
    let mut learners: Vec<u64> = parent.learners.clone();
    for l in &parent.learners_next {
        if !learners.contains(l) && !parent.voters.contains(l) {
            learners.push(*l);
        }
    }
    learners.retain(|l| !parent.voters.contains(l));
    ConfState {
        voters: parent.voters.clone(),
        learners,
        ..Default::default()
    }
}

fn decode_conf(meta: &[u8]) -> Result<ConfState, StateMachineError> {
    if meta.is_empty() {
        return Ok(ConfState::default());
    }
    ConfState::parse_from_bytes(meta).map_err(|e| err("conf_state", e))
}

fn split_entry(data: &[u8]) -> (u64, &[u8]) {
    match data.split_first_chunk::<ENTRY_HEADER>() {
        Some((ts, rest)) => (u64::from_be_bytes(*ts), rest),
        // Not an entry of ours: apply answers it with a typed error.
        None => (0, data),
    }
}

fn to_harpoon(s: collections::kv::ApplyState) -> Result<ApplyState, StateMachineError> {
    let conf_state = decode_conf(&s.apply_meta)?;
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
    let mut s = KvStore::open(KvConfig::memory()).map_err(|e| err("restore", e))?;
    let meta = encode_conf(&state.conf_state)?;
    s.set_commit(state.commit_index, state.commit_term);
    s.set_apply_meta(state.applied_index, state.applied_term, meta.into());
    s.reader()
        .snapshot()
        .to_bytes()
        .map_err(|e| err("restore", e))
}

/// What a replica applying a split needs from the node holding it.
pub trait SplitHost: Send + Sync {
    /// Claim range `range` for opening here: false if it is held, or being opened, here.
    fn claim(&self, range: u64) -> bool;
    /// Give a claim back (the range was not opened).
    fn release(&self, range: u64);
    /// Write the daughter's `range.meta` (durably) and return its store's configuration.
    fn prepare(&self, m: &RangeMeta) -> Result<KvConfig, String>;
    /// Create the daughter's cell around `store` without waiting, register it and give the
    /// claim back.
    fn start(&self, m: RangeMeta, store: KvStore);
}

/// A KV range replica as a harpoon state machine.
pub struct KvStateMachine {
    store: KvStore,
    /// The range's record and the node, for splits (without them a split is refused).
    host: Option<(RangeMeta, Arc<dyn SplitHost>)>,
}

fn admin_reply(
    store: &KvStore,
    index: u64,
    refused: Option<(kvpb::ErrorCode, String)>,
) -> Result<Bytes, StateMachineError> {
    let mut r = kvpb::Response::new();
    let mut h = kvpb::ResponseHeader::new();
    h.revision = store.revision();
    h.applied_index = index;
    r.set_header(h);
    if let Some((code, why)) = refused {
        let mut e = kvpb::Error::new();
        e.code = code;
        e.why = why;
        r.set_error(e);
    }
    r.write_to_bytes()
        .map(Bytes::from)
        .map_err(|e| err("admin reply", e))
}

impl KvStateMachine {
    /// Wrap `store` (splits are refused: no node to hold a daughter).
    pub fn new(store: KvStore) -> Self {
        KvStateMachine { store, host: None }
    }

    /// Wrap `store`, the replica of the range `meta` on the node `host`.
    pub fn with_host(store: KvStore, meta: RangeMeta, host: Arc<dyn SplitHost>) -> Self {
        KvStateMachine {
            store,
            host: Some((meta, host)),
        }
    }

    /// An admin entry that changes nothing: it is answered with an error, and applied.
    fn refuse(
        &mut self,
        index: u64,
        term: u64,
        code: kvpb::ErrorCode,
        why: String,
    ) -> Result<Bytes, StateMachineError> {
        self.store
            .apply(index, term, 0, &[])
            .map_err(|e| err("apply", e))?;
        admin_reply(&self.store, index, Some((code, why)))
    }

    fn apply_admin(
        &mut self,
        index: u64,
        term: u64,
        payload: &[u8],
    ) -> Result<Bytes, StateMachineError> {
        match decode_admin(payload) {
            Ok(AdminCommand::Split(s)) => self.apply_split(index, term, s),
            Err(why) => self.refuse(index, term, kvpb::ErrorCode::INVALID_ARGUMENT, why),
        }
    }

    fn apply_split(
        &mut self,
        index: u64,
        term: u64,
        s: SplitCommand,
    ) -> Result<Bytes, StateMachineError> {
        let b = self.store.bounds();
        if b.lo != s.lo || b.hi != s.hi {
            let why = format!(
                "stale split: the range's bounds are {:?}..{:?}, the split expected {:?}..{:?}",
                b.lo, b.hi, s.lo, s.hi
            );
            return self.refuse(index, term, kvpb::ErrorCode::INVALID_ARGUMENT, why);
        }
        if s.at <= b.lo || !b.contains(&s.at) {
            let why = "split key not strictly inside the range".to_string();
            return self.refuse(index, term, kvpb::ErrorCode::KEY_OUT_OF_RANGE, why);
        }
        let Some((me, host)) = self.host.clone() else {
            let why = "this replica cannot hold a daughter range".to_string();
            return self.refuse(index, term, kvpb::ErrorCode::INVALID_ARGUMENT, why);
        };
        if s.daughter == me.range || s.daughter == 0 {
            let why = format!("bad daughter range id {}", s.daughter);
            return self.refuse(index, term, kvpb::ErrorCode::INVALID_ARGUMENT, why);
        }
        let parent_conf = decode_conf(&self.store.apply_state().apply_meta)?;
        let conf = encode_conf(&daughter_conf(&parent_conf))?;
        let dm = RangeMeta {
            range: s.daughter,
            collection: me.collection,
            persistence: me.persistence,
            replication: me.replication,
            parent: me.range,
            split_index: index,
        };
        if !host.claim(s.daughter) {
            // Held here already (opened empty and filled by the daughter's leader): the
            // parent only lets go of the right half.
            self.store
                .split_drop_right(index, term, &s.at)
                .map_err(|e| err("split", e))?;
            return admin_reply(&self.store, index, None);
        }
        let cfg = match host.prepare(&dm) {
            Ok(c) => c,
            Err(e) => {
                host.release(s.daughter);
                return Err(err("split: daughter range dir", e));
            }
        };
        let conf = Bytes::from(conf);
        let t0 = std::time::Instant::now();
        match self
            .store
            .split_off_as(index, term, &s.at, cfg, Some(conf.clone()))
        {
            Ok(mut right) => {
                tracing::info!(
                    range = me.range,
                    daughter = s.daughter,
                    index,
                    apply_ms = t0.elapsed().as_millis() as u64,
                    "split applied here"
                );
                // Written once, with the daughter's membership. A right half reused from
                // before a crash may carry the parent's (built before `split_off_as` set it):
                // then set it and write it again.
                if right.durable_state().apply_meta != conf {
                    right.set_apply_meta(index, term, conf);
                    if let Err(e) = right.persist() {
                        host.release(s.daughter);
                        return Err(err("split: daughter store", e));
                    }
                }
                host.start(dm, right);
            }
            Err(e) if !e.is_fatal() => {
                // The daughter's dir holds another state of the daughter (it was held here
                // before, e.g. a replica that could not be reopened): keep it, drop the right
                // half here.
                host.release(s.daughter);
                tracing::warn!(daughter = s.daughter, error = %e, "split: daughter dir not empty; parent restricted only");
                self.store
                    .split_drop_right(index, term, &s.at)
                    .map_err(|e| err("split", e))?;
            }
            Err(e) => {
                host.release(s.daughter);
                return Err(err("split", e));
            }
        }
        admin_reply(&self.store, index, None)
    }
}

impl StateMachine for KvStateMachine {
    fn apply(&mut self, entry: EntryRef<'_>) -> Result<Bytes, StateMachineError> {
        let (now, cmd) = split_entry(entry.data);
        if now & ADMIN_FLAG != 0 {
            return self.apply_admin(entry.index, entry.term, cmd);
        }
        self.store
            .apply(entry.index, entry.term, now, cmd)
            .map_err(|e| err("apply", e))
    }

    /// A packed entry: client writes proposed with `propose_packable` ([`crate::kv_port`]),
    /// each part `now_ms ‖ command` as a plain entry's; the store applies them in order at
    /// `index` ([`KvStore::apply_packed`]). Admin entries are never packed (splits are
    /// proposed with `propose_with`): a part carrying [`ADMIN_FLAG`] is an error, never a
    /// split applied at an index it shares.
    fn apply_packed(
        &mut self,
        index: u64,
        term: u64,
        parts: &[&[u8]],
    ) -> Result<Vec<Bytes>, StateMachineError> {
        const _: () = assert!(harpoon::MAX_PACK_PARTS <= KvStore::MAX_PACKED_PARTS);
        let mut cmds = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let (now, cmd) = split_entry(part);
            if now & ADMIN_FLAG != 0 {
                return Err(StateMachineError::new(
                    "apply_packed",
                    format!("entry {index}: part {i} is an admin command (never packed)"),
                ));
            }
            cmds.push((now, cmd));
        }
        self.store
            .apply_packed(index, term, &cmds)
            .map_err(|e| err("apply_packed", e))
    }

    fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        conf_state: &ConfState,
    ) -> Result<(), StateMachineError> {
        let meta = encode_conf(conf_state)?;
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
        let data = snap.to_bytes().map_err(|e| err("snapshot", e))?;
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
            .map_err(|e| err("restore", e))?;
        Ok(())
    }

    fn persist(&mut self) -> Result<(), StateMachineError> {
        self.store.persist().map_err(|e| err("persist", e))?;
        Ok(())
    }

    /// Logged mode writes the image on a thread of its own: the shard keeps stepping, and
    /// `apply_state` reports the previous image until the new one is complete.
    fn persist_background(&mut self) -> Result<(), StateMachineError> {
        self.store
            .persist_background()
            .map_err(|e| err("persist", e))?;
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
    /// The range this one was split from, when it was materialised by a split here (0: none).
    pub parent: u64,
    /// Raised by this node's split of the range while the Split entry is in flight (see
    /// [`SplitFence`]).
    pub fence: Arc<SplitFence>,
}

/// A range's split fence: what lets an Async-mode write acknowledged before it applied never
/// be one that a split applied before it refuses (`KEY_OUT_OF_RANGE`: the key moved away).
///
/// [`propose_split`] raises it (`begin`: the generation moves, the fence is up) before it
/// proposes the Split entry, and lowers it (`end`: the generation moves again) once the
/// split applied here or can no longer apply. A client write to the range
/// ([`crate::kv_port`]) takes a [`FenceMark`] before it checks the store's bounds, proposes
/// with [`Ack::Applied`] when the fence was up ([`write_ack`]), and, answered at
/// `LeaderDurable`, settles the write with [`settle_async_write`] before it answers.
///
/// Why no acknowledged write is refused: say a write W to key `k` was answered at
/// LeaderDurable at index `w` (so with a mark taken with the fence down), and a split S at
/// `s < w` moves `k` away. S is in this leader's log before W.
/// - S was proposed in W's term, by this node (the leader of a term is its only proposer):
///   its `begin` came before its proposal, so before W's. If `begin` came after W's mark, the
///   generation moved between W's mark and W's reply: [`settle_async_write`] waits until `w`
///   applied and answers from the store's bounds then. If `begin` came before W's mark, the
///   fence was down at the mark, so `end` came before it too: S had applied (the store's
///   bounds dropped `k`, and W's bounds check, after the mark, refused W) or could never
///   apply; both contradict W being acknowledged and refused.
/// - S is of an earlier term: harpoon answers at LeaderDurable only once the leader applied
///   its own term's first entry (see [`harpoon::ReplicationMode::Async`]), which comes after
///   S in the log: S applied before W was proposed, so before W's reply, and the bounds check
///   [`settle_async_write`] makes after every LeaderDurable reply sees `k` gone.
///
/// A write whose settle finds `k` gone is answered `WRONG_RANGE` (the client resends it,
/// with its request id, to the range now holding `k`): either apply refused it, or it applied
/// before a split that came after it, and then dedup, which a split carries to both halves,
/// answers the resend with the first apply's reply.
#[derive(Debug, Default)]
pub struct SplitFence {
    /// The generation (bits 16..) and the splits in flight, begun and not ended (bits 0..16),
    /// in one word: read with one atomic load on every client request.
    state: AtomicU64,
}

/// One split in flight, in [`SplitFence::state`].
const FENCE_UP: u64 = 1;
/// One generation, in [`SplitFence::state`].
const FENCE_GENERATION: u64 = 1 << 16;

/// A [`SplitFence`]'s state as a write saw it before its bounds check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceMark {
    state: u64,
    /// A split was in flight.
    pub up: bool,
}

impl SplitFence {
    /// The fence now.
    pub fn mark(&self) -> FenceMark {
        let state = self.state.load(Ordering::SeqCst);
        FenceMark {
            state,
            up: !state.is_multiple_of(FENCE_GENERATION),
        }
    }

    /// Whether a split was in flight at `before` or began or ended since.
    pub fn moved_since(&self, before: FenceMark) -> bool {
        before.up || self.mark() != before
    }

    /// Raise the fence for one split; it is lowered when the guard drops.
    pub fn begin(self: &Arc<Self>) -> FenceGuard {
        // Splits of one range are proposed one at a time (a few more may be waiting for an
        // unknown outcome): far below 2^16.
        self.state
            .fetch_add(FENCE_GENERATION + FENCE_UP, Ordering::SeqCst);
        FenceGuard(self.clone())
    }
}

/// One split's hold on a [`SplitFence`] (lowered on drop).
#[derive(Debug)]
pub struct FenceGuard(Arc<SplitFence>);

impl Drop for FenceGuard {
    fn drop(&mut self) {
        // The next generation, one split fewer in flight (this one was counted: no borrow).
        self.0
            .state
            .fetch_add(FENCE_GENERATION - FENCE_UP, Ordering::SeqCst);
    }
}

/// Whether a client write needs the state machine's reply (a compare-and-swap's result, a
/// previous value, how many keys a delete removed, a batch's per-op results): an Async range
/// then answers it at apply too.
pub fn needs_apply_result(op: &kvpb::Command_oneof_op) -> bool {
    use kvpb::Command_oneof_op as Op;
    match op {
        Op::cas(_) | Op::delete(_) => true,
        Op::put(p) => p.prev_kv,
        // One result per op (an op whose key a split moved away is refused in its slot).
        Op::batch(_) => true,
        Op::expire(_) | Op::compact(_) | Op::get(_) | Op::scan(_) => false,
    }
}

/// How a client write `op` to a range is proposed, given the range's [`FenceMark`] taken
/// before its bounds check: at apply when it needs the result or a split is in flight, else
/// as the cell's mode says (a Consensus range answers at apply anyway).
pub fn write_ack(op: &kvpb::Command_oneof_op, mark: FenceMark) -> Ack {
    if mark.up || needs_apply_result(op) {
        Ack::Applied
    } else {
        Ack::CellMode
    }
}

/// A client write to `local` covering `span` that was answered at `LeaderDurable` at `index`,
/// with `mark` taken before its bounds check: whether it stands (`Ok(true)`) or its key
/// moved away in a split (`Ok(false)`: answer `WRONG_RANGE`). When a split of this node began
/// or ended since `mark`, first waits (until `deadline`) for `index` to apply here. See
/// [`SplitFence`] for why this is enough.
///
/// # Errors
/// harpoon's, when `index` did not apply here by `deadline` (the outcome is unknown).
pub async fn settle_async_write(
    seed: &Seed,
    local: &LocalRange,
    mark: FenceMark,
    index: u64,
    span: &KeyRange,
    deadline: std::time::Instant,
) -> Result<bool, harpoon::Error> {
    if local.fence.moved_since(mark) {
        seed.node
            .wait_applied(CellId(local.id), index, deadline)
            .await?;
    }
    Ok(local.reader.bounds().covers(span))
}

/// How long [`propose_split`] waits for its Split entry to apply.
pub const SPLIT_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Propose the admin Split entry `data` to `local` (led here) behind its [`SplitFence`],
/// answered at apply (also in an Async range): `Ok` once the split applied here. The fence is
/// lowered when the split applied here (or was refused), or could never apply (not
/// proposed, or its slot taken); when the outcome is unknown (timeout), it stays up until
/// this replica applied everything its log held then, the Split entry included if it is
/// still there.
///
/// Returns the Split entry's term: the term every replica of the daughter range starts at
/// (see [`campaign_daughter`]).
///
/// # Errors
/// Why the split is not applied here: refused by apply (a stale split), not proposed, or not
/// applied in [`SPLIT_APPLY_WAIT`].
pub async fn propose_split(
    seed: &Arc<Seed>,
    local: &LocalRange,
    data: Bytes,
) -> Result<u64, String> {
    let cell = CellId(local.id);
    let guard = local.fence.begin();
    let deadline = std::time::Instant::now() + SPLIT_APPLY_WAIT;
    let r = seed
        .node
        .propose_with(cell, data, deadline, Ack::Applied)
        .await;
    match &r {
        Ok(_)
        | Err(
            harpoon::Error::NotLeader { .. }
            | harpoon::Error::Busy { .. }
            | harpoon::Error::ProposalDropped { .. }
            | harpoon::Error::TooLarge { .. },
        ) => drop(guard),
        Err(_) => {
            let seed = seed.clone();
            tokio::spawn(async move {
                hold_until_settled(&seed, cell, guard).await;
            });
        }
    }
    let reply = r.map_err(|e| e.to_string())?;
    let Some(b) = reply.response else {
        return Err("answered before apply".into());
    };
    let resp =
        kvpb::Response::parse_from_carllerche_bytes(&b).map_err(|e| format!("reply: {e}"))?;
    if resp.has_error() {
        return Err(format!("refused: {}", resp.get_error().why));
    }
    Ok(reply.term)
}

/// Give the daughter of a split this node proposed and applied its first leader at once.
///
/// Each replica of a daughter range opens leaderless when its node applies the split, at the
/// Split entry's term, and would wait out an election timeout (and, with lease reads, refuse
/// ordinary votes for as long after it opened) before one is elected: a second or two in
/// which every request for the moved keys is refused. TiKV has the replica beside the
/// parent's leader campaign at once (RAFT.md, "Split", step 4); here the proposer's replica
/// does, as a leadership transfer would ([`harpoon::Node::campaign_new`], which also says why
/// that cannot depose a leader: it only runs at the daughter's first term).
///
/// It waits `settle` first: the followers open their replicas when they apply the split
/// (they learn its commit one round trip after this node, then write the right half as this
/// node did), and a vote reaching a node before its replica exists is dropped. If the
/// campaign still comes too early, or another replica was elected meanwhile, nothing is lost:
/// the daughter elects a leader the ordinary way.
pub async fn campaign_daughter(
    seed: Arc<Seed>,
    daughter: u64,
    split_term: u64,
    settle: std::time::Duration,
) {
    tokio::time::sleep(settle).await;
    match seed.node.campaign_new(CellId(daughter), split_term).await {
        Ok(true) => {
            seed.counters
                .daughter_campaigns
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(daughter, split_term, "daughter range campaign started");
        }
        Ok(false) => {
            seed.counters
                .daughter_campaigns_skipped
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(daughter, split_term, "daughter range past its first term");
        }
        Err(e) => {
            seed.counters
                .daughter_campaigns_skipped
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(daughter, error = %e, "daughter range campaign not made");
        }
    }
}

/// Keep `guard` until `cell` applied here everything its log holds now (the cell is gone or
/// the node stops: no write can be answered through it any more).
async fn hold_until_settled(seed: &Seed, cell: CellId, guard: FenceGuard) {
    let Ok(st) = seed.node.status(cell).await else {
        return;
    };
    loop {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        match seed.node.wait_applied(cell, st.last_index, deadline).await {
            Err(harpoon::Error::Timeout { .. }) => continue,
            _ => break,
        }
    }
    drop(guard);
}

#[derive(Debug, Default)]
struct Held {
    ranges: HashMap<u64, LocalRange>,
    /// Ranges being opened (by a split's apply, self-assignment or start-up).
    claims: HashSet<u64>,
}

/// The ranges this node holds, by range id.
#[derive(Debug, Default)]
pub struct Registry {
    held: Mutex<Held>,
    /// Ranges this node is listed in but cannot open (why), not retried until restart.
    failed: Mutex<HashMap<u64, String>>,
}

impl Registry {
    /// The replica of range `id`, if held here.
    pub fn get(&self, id: u64) -> Option<LocalRange> {
        self.held.lock().ranges.get(&id).cloned()
    }

    /// Every range held here.
    pub fn ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.held.lock().ranges.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Why range `id` could not be opened here, if it could not.
    pub fn failed(&self, id: u64) -> Option<String> {
        self.failed.lock().get(&id).cloned()
    }

    /// Every range recorded as lost here, ascending.
    pub fn failed_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.failed.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Claim range `id` for opening: false if it is held or being opened here, or recorded
    /// lost ([`Registry::failed`]: a lost replica is never opened again under its identity,
    /// not even by its parent's split replayed after a restart, until it is forgotten).
    pub fn claim(&self, id: u64) -> bool {
        let mut h = self.held.lock();
        if h.ranges.contains_key(&id) || self.failed.lock().contains_key(&id) {
            return false;
        }
        h.claims.insert(id)
    }

    /// Give back a claim on a range that was not opened.
    pub fn release(&self, id: u64) {
        self.held.lock().claims.remove(&id);
    }

    /// Whether range `id` is being opened here.
    pub fn claimed(&self, id: u64) -> bool {
        self.held.lock().claims.contains(&id)
    }

    /// A range of `collection` held here whose store still holds `key` (a parent that has
    /// not applied the split that created the range starting at `key`). An empty replica
    /// (nothing applied: waiting for its first snapshot) holds nothing.
    pub fn holding(&self, collection: u64, key: &[u8]) -> Option<u64> {
        let h = self.held.lock();
        h.ranges
            .values()
            .find(|r| {
                r.collection == collection
                    && r.reader.bounds().contains(key)
                    && r.reader.apply_state().applied_index > 0
            })
            .map(|r| r.id)
    }

    /// Register the opened range `m`, read through `reader` (its claim, if any, is given
    /// back).
    fn register(&self, m: &RangeMeta, reader: KvReader) {
        let r = LocalRange {
            id: m.range,
            collection: m.collection,
            persistence: m.persistence,
            reader,
            parent: m.parent,
            fence: Arc::default(),
        };
        let mut h = self.held.lock();
        h.claims.remove(&r.id);
        h.ranges.insert(r.id, r);
    }

    fn remove(&self, id: u64) {
        self.held.lock().ranges.remove(&id);
    }

    /// Take range `id` out of the held ranges and claim it, in one step, so that nothing
    /// (self-assignment, a split's apply) opens it while its replica is being deleted; the
    /// caller gives the claim back ([`Registry::release`]) once the deletion is done. `None`
    /// (nothing changed) if it is not held here.
    fn retire(&self, id: u64) -> Option<LocalRange> {
        let mut h = self.held.lock();
        let r = h.ranges.remove(&id)?;
        h.claims.insert(id);
        Some(r)
    }

    /// Undo [`Registry::retire`]: `r` is held again and its claim given back.
    fn restore(&self, r: LocalRange) {
        let mut h = self.held.lock();
        h.claims.remove(&r.id);
        h.ranges.insert(r.id, r);
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
    /// The range this one was split from here (0: none).
    pub parent: u64,
    /// The index of the split entry that created this range here (0: none).
    pub split_index: u64,
}

impl RangeMeta {
    fn encode(&self) -> String {
        let mut s = format!(
            "range={}\ncollection={}\npersistence={}\nreplication={}\n",
            self.range, self.collection, self.persistence as i32, self.replication as i32
        );
        if self.parent != 0 {
            s.push_str(&format!(
                "parent={}\nsplit_index={}\n",
                self.parent, self.split_index
            ));
        }
        s
    }

    fn decode(s: &str) -> Option<RangeMeta> {
        let mut m = RangeMeta {
            range: 0,
            collection: 0,
            persistence: metapb::Persistence::MEMORY,
            replication: metapb::ReplicationMode::CONSENSUS,
            parent: 0,
            split_index: 0,
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
                "parent" => m.parent = n,
                "split_index" => m.split_index = n,
                _ => {}
            }
        }
        (m.range != 0).then_some(m)
    }
}

fn write_meta(dir: &Path, m: &RangeMeta) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if let Ok(old) = std::fs::read_to_string(meta_file(dir)) {
        if RangeMeta::decode(&old).as_ref() == Some(m) {
            return Ok(());
        }
    }
    crate::durable::write_durably(&meta_file(dir), m.encode().as_bytes())
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
    #[error("apply state: {0}")]
    State(#[from] StateMachineError),
    #[error("raft log: {0}")]
    Log(String),
    #[error("parent range {parent} may still replay the split that made this one: {why}")]
    Parent { parent: u64, why: String },
}

/// The store configuration of range `m` held under `data_dir`; writes its `range.meta` first.
fn prepare_dir(data_dir: &Path, m: &RangeMeta) -> std::io::Result<KvConfig> {
    let dir = range_dir(data_dir, m.range);
    write_meta(&dir, m)?;
    let kv_dir = dir.join("kv");
    let persistence = match m.persistence {
        metapb::Persistence::MEMORY => Persistence::Memory,
        metapb::Persistence::LOGGED => Persistence::Logged { dir: kv_dir },
        metapb::Persistence::PERSISTENT => Persistence::Persistent { dir: kv_dir },
    };
    Ok(range_config(persistence))
}

/// Segment size of a range's data log (persistent mode): the smallest round size that holds
/// seglog's 1 KiB segment header plus one record of the default `max_record_size` (16 MiB),
/// instead of seglog's 64 MiB default. Every segment is preallocated in full, and a node holds
/// one data log per range: smaller segments make creating and reopening many ranges cheaper.
/// Existing segments keep the size they were created with.
pub const RANGE_SEGMENT_SIZE: u64 = 17 << 20;

/// The store configuration of a range held here, for `persistence`.
pub fn range_config(persistence: Persistence) -> KvConfig {
    let mut cfg = KvConfig::with(persistence);
    cfg.seglog.segment_size = RANGE_SEGMENT_SIZE;
    cfg
}

/// A daughter's store that holds exactly the split's image (a crash came before its
/// membership was set, or after it was set from a joint parent) gets the daughter's
/// membership, durably, before its cell opens.
fn settle_daughter(store: &mut KvStore, m: &RangeMeta) -> Result<(), OpenError> {
    let st = store.apply_state();
    if m.parent == 0 || m.split_index == 0 || st.applied_index != m.split_index {
        return Ok(());
    }
    let conf = decode_conf(&st.apply_meta)?;
    let want = daughter_conf(&conf);
    if want != conf {
        let b = encode_conf(&want)?;
        store.set_apply_meta(st.applied_index, st.applied_term, b.into());
        store.persist()?;
    }
    Ok(())
}

/// The cell options of range `m`: its replication mode, and the volatile raft log for a
/// memory range (nothing of it on disk), the durable one otherwise.
pub fn cell_options(m: &RangeMeta) -> CellOptions {
    let mode = match m.replication {
        metapb::ReplicationMode::CONSENSUS => ReplicationMode::Consensus,
        metapb::ReplicationMode::ASYNC => ReplicationMode::Async,
    };
    match m.persistence {
        metapb::Persistence::MEMORY => CellOptions::volatile(mode),
        metapb::Persistence::LOGGED | metapb::Persistence::PERSISTENT => CellOptions::durable(mode),
    }
}

/// The node as the [`SplitHost`] of its ranges' state machines.
#[derive(Clone)]
pub struct SeedHost {
    seed: Weak<Seed>,
    rt: Option<tokio::runtime::Handle>,
}

impl SeedHost {
    /// The host of `seed`'s ranges (from inside the runtime: daughters' cell creations are
    /// awaited on it).
    pub fn new(seed: &Arc<Seed>) -> Arc<SeedHost> {
        Arc::new(SeedHost {
            seed: Arc::downgrade(seed),
            rt: tokio::runtime::Handle::try_current().ok(),
        })
    }
}

impl SplitHost for SeedHost {
    fn claim(&self, range: u64) -> bool {
        self.seed.upgrade().is_some_and(|s| s.ranges.claim(range))
    }

    fn release(&self, range: u64) {
        if let Some(s) = self.seed.upgrade() {
            s.ranges.release(range);
        }
    }

    fn prepare(&self, m: &RangeMeta) -> Result<KvConfig, String> {
        let seed = self.seed.upgrade().ok_or("node stopped")?;
        prepare_dir(&seed.dir(), m).map_err(|e| e.to_string())
    }

    fn start(&self, m: RangeMeta, store: KvStore) {
        let Some(seed) = self.seed.upgrade() else {
            return;
        };
        let reader = store.reader();
        let host: Arc<dyn SplitHost> = Arc::new(self.clone());
        let sm = KvStateMachine::with_host(store, m.clone(), host);
        // The create command is queued to the daughter's shard before anything a client or a
        // loop sends it after the registration below: registering now is safe.
        let pending =
            seed.node
                .create_cell(CellId(m.range), &[], &[], cell_options(&m), Box::new(sm));
        seed.ranges.register(&m, reader);
        tracing::info!(
            node = seed.id,
            range = m.range,
            parent = m.parent,
            split_index = m.split_index,
            "daughter range materialised by a split"
        );
        let weak = self.seed.clone();
        let id = m.range;
        let watch = async move {
            match pending.await {
                Ok(()) | Err(harpoon::Error::CellExists { .. }) => {}
                Err(e) => {
                    tracing::warn!(range = id, error = %e, "daughter range cell not created");
                    if let Some(s) = weak.upgrade() {
                        s.ranges.remove(id);
                    }
                }
            }
        };
        if let Some(rt) = &self.rt {
            rt.spawn(watch);
        }
    }
}

/// Create the cell of range `m` around `store` (opened here if `None`) and register it. The
/// caller holds the claim on `m.range`; it is given back whatever happens.
async fn create_claimed(
    seed: &Arc<Seed>,
    m: RangeMeta,
    voters: &[NodeId],
    store: Option<KvStore>,
) -> Result<(), OpenError> {
    let mut store = match store {
        Some(s) => s,
        None => open_store(seed, &m)?,
    };
    settle_daughter(&mut store, &m)?;
    let reader = store.reader();
    let host: Arc<dyn SplitHost> = SeedHost::new(seed);
    let sm = KvStateMachine::with_host(store, m.clone(), host);
    match seed
        .node
        .create_cell(CellId(m.range), voters, &[], cell_options(&m), Box::new(sm))
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
    seed.ranges.register(&m, reader);
    tracing::info!(
        node = seed.id,
        range = m.range,
        persistence = ?m.persistence,
        bootstrap = !voters.is_empty(),
        "range replica opened"
    );
    Ok(())
}

async fn create(
    seed: &Arc<Seed>,
    m: RangeMeta,
    voters: &[NodeId],
    store: Option<KvStore>,
) -> Result<(), OpenError> {
    if !seed.ranges.claim(m.range) {
        // Held, or being opened (by a split's apply, for one).
        return Ok(());
    }
    let id = m.range;
    let r = create_claimed(seed, m, voters, store).await;
    if r.is_err() {
        seed.ranges.release(id);
    }
    r
}

/// Open this node's replica of range `range` of `collection`: the cell with this node as
/// its only voter when `bootstrap` (the range's first member), else an empty replica that
/// the range's leader fills by snapshot.
///
/// # Errors
/// The range dir, the store or the cell cannot be created.
pub async fn open(
    seed: &Arc<Seed>,
    range: u64,
    collection: &CollectionDescriptor,
    bootstrap: bool,
) -> Result<(), OpenError> {
    let m = RangeMeta {
        range,
        collection: collection.id,
        persistence: collection.persistence,
        replication: collection.replication,
        parent: 0,
        split_index: 0,
    };
    let voters = if bootstrap {
        vec![NodeId(seed.id)]
    } else {
        vec![]
    };
    create(seed, m, &voters, None).await
}

/// What start-up finds in one entry of `<data dir>/ranges` ([`classify_range_dir`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FoundDir {
    /// Not a range replica: a name that is not a range id, or a range dir without
    /// `range.meta` (its creation or deletion was cut short: `range.meta` is written before
    /// the store and the cell, and deleted first). Skipped.
    Skip(String),
    /// A replica that must not be opened under its identity: recorded lost
    /// ([`Registry::failed`]), without a cell, and it rejoins (see the module doc). A memory
    /// range (nothing of its replica survived the restart), or a range dir whose `range.meta`
    /// cannot be read or does not decode (or names another range): what it held, its
    /// persistence mode included, is unknown, so it cannot be reopened safely.
    Lost { range: u64, why: String },
    /// A logged or persistent replica: its store is reopened and its cell created.
    Reopen(RangeMeta),
}

/// What start-up does with the entry `name` of `<data dir>/ranges`, whose `range.meta` read
/// as `meta`.
pub fn classify_range_dir(name: &str, meta: std::io::Result<String>) -> FoundDir {
    let Ok(id) = name.parse::<u64>() else {
        return FoundDir::Skip(format!("{name:?} is not a range id"));
    };
    if id == 0 {
        return FoundDir::Skip("0 is not a range id".into());
    }
    let s = match meta {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return FoundDir::Skip("no range.meta (its creation or deletion was cut short)".into())
        }
        Err(e) => {
            return FoundDir::Lost {
                range: id,
                why: format!("its range.meta cannot be read: {e}"),
            }
        }
    };
    match RangeMeta::decode(&s) {
        None => FoundDir::Lost {
            range: id,
            why: "its range.meta does not decode".into(),
        },
        Some(m) if m.range != id => FoundDir::Lost {
            range: id,
            why: format!("its range.meta names range {}", m.range),
        },
        Some(m) if m.persistence == metapb::Persistence::MEMORY => FoundDir::Lost {
            range: id,
            why: MEMORY_LOST.into(),
        },
        Some(m) => FoundDir::Reopen(m),
    }
}

/// Why a memory replica found at start-up is lost.
const MEMORY_LOST: &str =
    "memory range: its data, raft log and hard state did not survive the restart";

/// What self-assignment does with a range that meta lists this node in and that is neither
/// held, being opened nor recorded lost here ([`listed_unheld`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedUnheld {
    /// Open the replica: a logged or persistent one reopens its store and its durable raft
    /// state; a memory range without a dir here has no replica here to come back as (its
    /// `range.meta` is written before its cell is created and deleted only once the replica
    /// was forgotten or removed from the cell): a new, empty one, or the sole member's first
    /// cell when the node stopped between claiming its slot and opening it.
    Open,
    /// Record it lost ([`Registry::failed`]) without a cell: a memory range whose dir is here
    /// had a replica here that did not survive (a restart, or a `range.meta` start-up could not
    /// read), and a blank one under the same identity could vote twice in a term (a sole
    /// member would bootstrap a new, empty group). It rejoins (see the module doc).
    Lost(String),
}

/// What self-assignment does with a range of a `persistence` collection that meta lists this
/// node in and that is not held, being opened or recorded lost here; `dir_exists`: whether the
/// range's dir is in the data dir (unknown counts as present).
pub fn listed_unheld(persistence: metapb::Persistence, dir_exists: bool) -> ListedUnheld {
    match persistence {
        metapb::Persistence::MEMORY if dir_exists => ListedUnheld::Lost(
            "memory range listed here whose replica is not held: its raft log and hard state \
             are gone"
                .into(),
        ),
        _ => ListedUnheld::Open,
    }
}

/// Self-assignment's path for range `id` of `collection`, listed in meta for this node and
/// neither held, being opened nor recorded lost here: a memory range whose dir is here is
/// recorded lost ([`listed_unheld`]) and `false` returned; otherwise `true` (open it).
pub fn may_reopen_listed(seed: &Seed, id: u64, collection: &CollectionDescriptor) -> bool {
    let dir_exists = range_dir(&seed.dir(), id).try_exists().unwrap_or(true);
    match listed_unheld(collection.persistence, dir_exists) {
        ListedUnheld::Open => true,
        ListedUnheld::Lost(why) => {
            record_lost(seed, id, &why);
            false
        }
    }
}

/// At start-up: reopen every range whose `range.meta` is in the data dir
/// ([`classify_range_dir`]).
///
/// A memory range is not reopened: its replica died with the previous process (data, raft
/// log and hard state were in memory). It is recorded as lost ([`Registry::failed`]) without
/// a cell, and rejoins as a new member (see the module doc). So is a range dir whose
/// `range.meta` cannot be read or decoded (keyed by the dir's name): it may be a memory
/// replica, and self-assignment would otherwise open it blank under its old identity.
///
/// Every store is opened (and its range claimed) before any cell is created, so a parent
/// replaying a split finds its daughter either held (restricted only), recorded lost
/// (restricted only: a lost replica cannot be claimed) or absent: a daughter whose store is
/// empty was cut short by a crash in its split and is left to the parent's replay, which
/// materialises it again.
pub async fn reopen_all(seed: &Arc<Seed>) {
    clean_trash(&seed.dir());
    let root = seed.dir().join("ranges");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    let mut opened = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!(path = %e.path().display(), "not a range dir: skipped");
            continue;
        }
        let file = meta_file(&e.path());
        let m = match classify_range_dir(&name, std::fs::read_to_string(&file)) {
            FoundDir::Reopen(m) => m,
            FoundDir::Lost { range, why } if why == MEMORY_LOST => {
                record_lost(seed, range, &why);
                continue;
            }
            FoundDir::Lost { range, why } => {
                record_lost(seed, range, &format!("{why}: {}", file.display()));
                continue;
            }
            FoundDir::Skip(why) => {
                tracing::info!(path = %e.path().display(), why, "not a range replica: skipped");
                continue;
            }
        };
        if !seed.ranges.claim(m.range) {
            continue;
        }
        match open_store(seed, &m) {
            Ok(store) if m.parent != 0 && store.apply_state().applied_index == 0 => {
                tracing::info!(
                    range = m.range,
                    parent = m.parent,
                    "daughter with an empty store: left to its parent's split"
                );
                seed.ranges.release(m.range);
            }
            Ok(store) => opened.push((m, store)),
            Err(err) => {
                tracing::warn!(range = m.range, error = %err, "cannot reopen range");
                seed.ranges.release(m.range);
            }
        }
    }
    for (m, store) in opened {
        let id = m.range;
        let r = create_claimed(seed, m, &[], Some(store)).await;
        if let Err(err) = r {
            seed.ranges.release(id);
            tracing::warn!(range = id, error = %err, "cannot reopen range");
        }
    }
}

/// Open range `m`'s store (writing its `range.meta` first). A store whose files are damaged
/// ([`damaged_image`]) is refused, never served: the replica is recorded as lost
/// ([`Registry::failed`]), with an error line naming the file and what is wrong, and rejoins
/// like a memory replica lost in a restart (see the module doc): it leaves the range, its dir
/// is deleted only once the range's leader took it out of the cell (so a quorum of healthy
/// replicas holds the data), and it is refilled by snapshot.
fn open_store(seed: &Seed, m: &RangeMeta) -> Result<KvStore, OpenError> {
    let cfg = prepare_dir(&seed.dir(), m)?;
    KvStore::open(cfg).map_err(|e| {
        if let Some(file) = damaged_image(&seed.dir(), m, &e) {
            record_damaged(seed, m, &file, &e);
        }
        e.into()
    })
}

/// The file (or dir, for a data log whose error names the segment and offset) of range `m`
/// under `data_dir` that `err`, from opening its store, reports as damaged; `None` if `err`
/// is not about damaged stored bytes (an I/O error, say: retried).
pub fn damaged_image(
    data_dir: &Path,
    m: &RangeMeta,
    err: &collections::KvError,
) -> Option<PathBuf> {
    use collections::KvError;
    let kv = range_dir(data_dir, m.range).join("kv");
    match err {
        KvError::Corrupt { what, .. } | KvError::InvalidField { what, .. }
            if *what != "command" =>
        {
            Some(match m.persistence {
                metapb::Persistence::LOGGED => kv.join("kv.snap"),
                _ => kv,
            })
        }
        KvError::Storage(seglog::Error::Corrupt { .. }) => Some(kv),
        _ => None,
    }
}

/// Record range `m`'s replica as lost here: its stored image `file` is damaged (`err`).
fn record_damaged(seed: &Seed, m: &RangeMeta, file: &Path, err: &collections::KvError) {
    let why = format!("damaged image {}: {err}", file.display());
    tracing::error!(
        node = seed.id,
        range = m.range,
        file = %file.display(),
        error = %err,
        "range replica refused: its stored image is damaged; not served here, it leaves the \
         range and rejoins by snapshot (its dir is deleted once it is out of the cell)"
    );
    seed.ranges.failed.lock().insert(m.range, why);
}

/// Record this node's replica of range `id` as lost (`why`), without a cell: a memory range
/// this node held before it restarted (a blank raft replica with this node's identity could
/// vote again in a term it already voted in), or one whose `range.meta` cannot be read. Not
/// while it is held or being opened.
fn record_lost(seed: &Seed, id: u64, why: &str) {
    if seed.ranges.get(id).is_some() || seed.ranges.claimed(id) {
        return;
    }
    tracing::warn!(
        node = seed.id,
        range = id,
        "range replica lost ({why}): not served here until it rejoins"
    );
    seed.ranges.failed.lock().insert(id, why.to_string());
}

/// Range `id`'s cell is gone here (harpoon removed this node from it and destroyed its raft
/// log) and the caller decided to drop it (meta no longer lists this node, or lists it for a
/// replica removed while the node was down: it reopens empty): forget the replica and delete
/// its dir, once a split of its parent that materialised it here can no longer be replayed
/// ([`settle_parent_image`]).
///
/// # Errors
/// The parent's image is not settled yet (nothing changed: retried by the next round), or the
/// dir cannot be deleted (the registry entry is gone anyway; the dir is retried at the next
/// start-up's cleanup only if meta still does not list this node).
pub async fn drop_removed(seed: &Seed, id: u64) -> Result<(), OpenError> {
    settle_parent_image(seed, id).await?;
    // Claimed while the dir is deleted: self-assignment (this node may be listed) must not
    // open a new replica into the dir being deleted.
    let claimed = seed.ranges.retire(id).is_some();
    let r = delete_dir(&seed.dir(), id);
    if claimed {
        seed.ranges.release(id);
    }
    r?;
    tracing::info!(
        node = seed.id,
        range = id,
        "removed replica dropped: range dir deleted"
    );
    Ok(())
}

/// Range `id`'s replica here was removed from the range while it lagged and never learnt of
/// it (its cell still runs, [`crate::linger`] decided to drop it): destroy its cell and raft
/// state through harpoon (`Node::destroy_cell`, durable before it answers), then delete its
/// dir, the range claimed meanwhile so nothing opens it again into the dir being deleted.
/// As for [`drop_removed`], a logged daughter waits until its parent's image here is durable
/// past the split ([`settle_parent_image`]).
///
/// # Errors
/// The parent's image is not settled yet, or harpoon failed to destroy the cell (nothing
/// changed: the replica is held again, retried by the next round), or the dir cannot be
/// deleted (the replica is gone from harpoon and the registry; the dir is retried at the next
/// start-up's cleanup only if meta still does not list this node).
pub async fn drop_lingering(seed: &Seed, id: u64) -> Result<(), OpenError> {
    settle_parent_image(seed, id).await?;
    let Some(held) = seed.ranges.retire(id) else {
        return Ok(());
    };
    match seed.node.destroy_cell(CellId(id)).await {
        // Gone already: it applied its own removal meanwhile.
        Ok(()) | Err(harpoon::Error::CellNotFound { .. }) => {}
        Err(e) => {
            seed.ranges.restore(held);
            return Err(e.into());
        }
    }
    drop(held);
    let r = delete_dir(&seed.dir(), id);
    seed.ranges.release(id);
    r?;
    tracing::info!(
        node = seed.id,
        range = id,
        "replica removed from the range while it lagged: cell, raft state and range dir deleted"
    );
    Ok(())
}

/// Where range `id`'s replica here came from, as far as deleting its dir is concerned
/// ([`split_origin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitOrigin {
    /// Nothing to wait for: not materialised by a split here, or its parent cannot replay
    /// the split (a memory parent has no raft log after a restart; a persistent one made its
    /// left half durable before the daughter's cell was created), or no `range.meta` (deleted
    /// only after this wait, or never written: a daughter's is written before its store).
    None,
    /// A logged daughter: its parent's image must be durable at `split_index` or later.
    Parent { parent: u64, split_index: u64 },
    /// Its `range.meta` cannot be read or decoded: every logged replica held here is made
    /// durable first (any of them may be its parent).
    Unknown,
}

/// Range `id`'s [`SplitOrigin`], from its `range.meta` read as `meta`.
pub fn split_origin(id: u64, meta: std::io::Result<String>) -> SplitOrigin {
    let s = match meta {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SplitOrigin::None,
        Err(_) => return SplitOrigin::Unknown,
    };
    match RangeMeta::decode(&s) {
        Some(m) if m.range != id => SplitOrigin::Unknown,
        Some(m) if m.persistence != metapb::Persistence::LOGGED => SplitOrigin::None,
        Some(m) if m.parent == 0 || m.split_index == 0 => SplitOrigin::None,
        Some(m) => SplitOrigin::Parent {
            parent: m.parent,
            split_index: m.split_index,
        },
        None => SplitOrigin::Unknown,
    }
}

/// What a parent replica's state says about replaying its split at `split_index` (`None`:
/// unknown) after a crash ([`parent_image_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentImage {
    /// Its log starts past the split entry: its durable image holds the split (harpoon
    /// compacts the log only up to the state machine's durable index).
    Settled,
    /// It has not applied the split yet: it will, and must find the daughter's dir (wait).
    Behind,
    /// Make its image durable now (`persist`, through a forced log compaction) to settle it.
    Persist,
}

/// [`ParentImage`] of a parent whose log starts at `first_index` and which applied `applied`,
/// for its split at `split_index` (`None`: unknown, always persisted).
pub fn parent_image_state(first_index: u64, applied: u64, split_index: Option<u64>) -> ParentImage {
    match split_index {
        Some(i) if first_index > i => ParentImage::Settled,
        Some(i) if applied < i => ParentImage::Behind,
        _ => ParentImage::Persist,
    }
}

/// Before range `id`'s dir and raft state are deleted ([`drop_removed`], [`forget_lost`]):
/// if the replica is a logged daughter materialised here by its parent's split, make sure the
/// parent's durable image is at or past the split. A logged parent writes its left half's
/// image in the background after the split, so its durable image may still be the one before
/// it: a crash would then replay the Split entry, find the daughter's dir gone and
/// materialise the daughter again, blank of the raft state (term, vote) its deleted replica
/// had, under the same identity (it could vote twice in a term). The parent held here is
/// made durable (a forced compaction of its log: `persist`, which waits for the image write
/// in flight) unless its log already starts past the split; a parent that has not applied the
/// split yet, being opened, or on disk but not open here (its split could replay when it
/// opens) makes the caller wait. A parent recorded lost, whose cell is gone, or with no dir
/// here cannot replay it.
///
/// # Errors
/// Why the daughter must wait (retried by the caller's next round).
pub async fn settle_parent_image(seed: &Seed, id: u64) -> Result<(), OpenError> {
    let meta = std::fs::read_to_string(meta_file(&range_dir(&seed.dir(), id)));
    let parents: Vec<(u64, Option<u64>)> = match split_origin(id, meta) {
        SplitOrigin::None => return Ok(()),
        SplitOrigin::Parent {
            parent,
            split_index,
        } => vec![(parent, Some(split_index))],
        SplitOrigin::Unknown => seed
            .ranges
            .ids()
            .into_iter()
            .filter(|p| *p != id)
            .filter(|p| {
                seed.ranges
                    .get(*p)
                    .is_some_and(|r| r.persistence == metapb::Persistence::LOGGED)
            })
            .map(|p| (p, None))
            .collect(),
    };
    for (parent, split_index) in parents {
        settle_image(seed, parent, split_index)
            .await
            .map_err(|why| OpenError::Parent { parent, why })?;
    }
    Ok(())
}

/// Make sure `parent`'s replica here cannot replay its split at `split_index` (`None`:
/// unknown: made durable if held).
async fn settle_image(seed: &Seed, parent: u64, split_index: Option<u64>) -> Result<(), String> {
    let cell = CellId(parent);
    if seed.ranges.get(parent).is_none() {
        if seed.ranges.claimed(parent) {
            return Err("being opened here".into());
        }
        if seed.ranges.failed(parent).is_some() {
            return Ok(());
        }
        return match meta_file(&range_dir(&seed.dir(), parent)).try_exists() {
            Ok(false) => Ok(()),
            _ => Err("on disk but not open here: its split could replay when it opens".into()),
        };
    }
    let st = match seed.node.status(cell).await {
        Ok(st) => st,
        // Harpoon removed this node from it and destroyed its raft log: nothing replays.
        Err(harpoon::Error::CellNotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    match parent_image_state(st.first_index, st.applied, split_index) {
        ParentImage::Settled => Ok(()),
        ParentImage::Behind => Err(format!(
            "has not applied the split at {} yet (applied {})",
            split_index.unwrap_or_default(),
            st.applied
        )),
        ParentImage::Persist => match seed.node.compact_log(cell).await {
            Ok(_) | Err(harpoon::Error::CellNotFound { .. }) => {
                tracing::info!(
                    node = seed.id,
                    range = parent,
                    split_index = ?split_index,
                    "parent image made durable before its daughter's replica is deleted"
                );
                Ok(())
            }
            Err(e) => Err(format!("image not made durable: {e}")),
        },
    }
}

/// Where deleted range dirs wait for [`delete_gently`], beside `ranges/` (`reopen_all` never
/// sees them).
const TRASH: &str = "trash";

/// Numbers trashed dirs in this process (with the pid: a leftover of an earlier process may
/// still be there while [`clean_trash`] works).
static TRASHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Delete range `id`'s dir: its `range.meta` first (durably), so a crash part way never
/// reopens a half-deleted store. The dir is then moved to `trash/` (a rename frees nothing)
/// and deleted there in the background ([`delete_gently`]): deleting a logged range's image
/// (hundreds of MB) at once frees its extents in one journal transaction that every fsync on
/// the disk, the raft log's included, waits for. The range's path is free when this returns.
pub fn delete_dir(data_dir: &Path, id: u64) -> std::io::Result<()> {
    let dir = range_dir(data_dir, id);
    match std::fs::remove_file(meta_file(&dir)) {
        Ok(()) => std::fs::File::open(&dir)?.sync_all()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let trash = data_dir.join(TRASH);
    let to = trash.join(format!(
        "{id}.{}.{}",
        std::process::id(),
        TRASHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let moved = std::fs::create_dir_all(&trash).and_then(|()| std::fs::rename(&dir, &to));
    match moved {
        Ok(()) => {
            std::fs::File::open(&trash)?.sync_all()?;
            delete_gently(to);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => {}
        // Not movable (the trash dir cannot be made, or a leftover of the same name is still
        // there): deleted here, at once, as before.
        Err(_) => match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        },
    }
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Deletes a trashed range dir on a thread of its own: its logged-mode images (`kv.snap*`,
/// read and written as files, never mapped) are shrunk a few MiB at a time first
/// (`seglog::shrink_and_remove`), then the dir goes. A persistent range's data segments are
/// unlinked as they are, unshrunk: a snapshot still being read may map them, and shrinking a
/// mapped file faults its reader. Best effort: what is left stays for [`clean_trash`].
fn delete_gently(dir: PathBuf) {
    let run = move || {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(path),
                    Ok(t)
                        if t.is_file()
                            && e.file_name().to_string_lossy().starts_with("kv.snap") =>
                    {
                        seglog::shrink_and_remove(&path)
                    }
                    _ => {}
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    };
    if std::thread::Builder::new()
        .name("range-delete".into())
        .spawn(run)
        .is_err()
    {
        tracing::warn!("no thread to delete a range dir: left in trash for the next start");
    }
}

/// Deletes what an earlier process left in `trash/` ([`delete_dir`]), in the background.
pub fn clean_trash(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir.join(TRASH)) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            delete_gently(e.path());
        }
    }
}

/// Forget this node's lost replica of range `id` (recorded in [`Registry::failed`]): its raft
/// state in the node's log stores (destroyed in both; the durable one then synced: a memory
/// range has nothing there, unless an older version wrote its log to disk), its dir, and the
/// failure record.
/// Self-assignment may then claim a slot of the range again, as a learner filled by snapshot.
///
/// Only once meta no longer lists this node for the range (the caller checks): a lost voter
/// first asks to be demoted in meta, and the range's leader takes it out of the cell before
/// it takes it out of meta (see [`crate::loops`]), so an empty replica opened later is never
/// counted as a voter of the old membership. And only once a split of its parent that
/// materialised it here can no longer be replayed ([`settle_parent_image`]).
///
/// # Errors
/// The parent's image is not settled yet, or the log store or the dir cannot be changed (the
/// failure record stays: retried).
pub async fn forget_lost(seed: &Seed, id: u64) -> Result<(), OpenError> {
    if seed.ranges.get(id).is_some() || seed.ranges.claimed(id) {
        return Ok(());
    }
    settle_parent_image(seed, id).await?;
    seed.node
        .volatile_log()
        .destroy_cell(CellId(id))
        .map_err(|e| OpenError::Log(e.to_string()))?;
    let log = seed.node.log();
    log.destroy_cell(CellId(id))
        .map_err(|e| OpenError::Log(e.to_string()))?;
    log.sync().map_err(|e| OpenError::Log(e.to_string()))?;
    delete_dir(&seed.dir(), id)?;
    // Logged before the record goes: self-assignment may claim a slot once it is gone.
    tracing::info!(
        node = seed.id,
        range = id,
        "lost replica forgotten (raft state and dir): may rejoin as a learner"
    );
    seed.ranges.failed.lock().remove(&id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use collections::kv::Bounds;

    /// A write that marked the fence down and saw it untouched until its reply needs no
    /// wait; one whose mark was taken with a split in flight, or across a split's begin or
    /// end, is proposed at apply or waits for its index to apply.
    #[test]
    fn split_fence_marks_every_write_that_overlaps_a_split() {
        let f = Arc::new(SplitFence::default());
        let quiet = f.mark();
        assert!(!quiet.up);
        assert!(!f.moved_since(quiet), "nothing happened");
        let put = kvpb::Command_oneof_op::put(kvpb::Put::new());
        assert_eq!(write_ack(&put, quiet), Ack::CellMode);

        // A split begins after the mark (before the write's reply): the write waits.
        let g = f.begin();
        assert!(f.moved_since(quiet));
        let during = f.mark();
        assert!(during.up);
        assert_eq!(write_ack(&put, during), Ack::Applied);
        drop(g);
        // Ended: a write marked before the end still counts it (its bounds check may have
        // come before the split applied).
        assert!(f.moved_since(quiet));
        assert!(f.moved_since(during));
        let after = f.mark();
        assert!(!after.up);
        assert!(
            !f.moved_since(after),
            "a write marked after the end checks the new bounds"
        );

        // Begin and end both between a write's mark and its reply: still seen.
        let before = f.mark();
        drop(f.begin());
        assert!(f.moved_since(before));

        // Two splits in flight (one left up by an unknown outcome): up until both end.
        let a = f.begin();
        let b = f.begin();
        drop(a);
        assert!(f.mark().up);
        drop(b);
        assert!(!f.mark().up);
    }

    #[test]
    fn writes_that_need_their_result_are_answered_at_apply() {
        use kvpb::Command_oneof_op as Op;
        let down = SplitFence::default().mark();
        let mut put = kvpb::Put::new();
        assert!(!needs_apply_result(&Op::put(put.clone())));
        put.prev_kv = true;
        assert!(needs_apply_result(&Op::put(put)));
        // A delete answers how many keys it removed.
        assert!(needs_apply_result(&Op::delete(kvpb::Delete::new())));
        assert!(needs_apply_result(&Op::cas(kvpb::Cas::new())));
        assert_eq!(write_ack(&Op::cas(kvpb::Cas::new()), down), Ack::Applied);
        let mut inner = kvpb::Command::new();
        inner.set_put(kvpb::Put::new());
        let mut batch = kvpb::Batch::new();
        batch.ops.push(inner);
        assert!(needs_apply_result(&Op::batch(batch)), "per-op results");
    }

    #[test]
    fn range_data_log_segments_are_small_and_valid() {
        let cfg = range_config(Persistence::Memory);
        assert_eq!(cfg.seglog.segment_size, RANGE_SEGMENT_SIZE);
        assert!(cfg.seglog.segment_size < seglog::Config::DEFAULT_SEGMENT_SIZE);
        cfg.seglog
            .validate()
            .expect("a record of max_record_size fits a segment");
        assert!(u64::from(cfg.seglog.max_record_size) >= cfg.limits.max_command_bytes as u64);
        // A persistent range opens with it and takes a command of the largest value.
        let dir = tempfile::tempdir().unwrap();
        let cfg = range_config(Persistence::Persistent {
            dir: dir.path().join("kv"),
        });
        let big = vec![7u8; cfg.limits.max_value_bytes];
        let mut store = KvStore::open(cfg).unwrap();
        let cmd = collections::kv::cmd::encode(&collections::kv::cmd::put(b"k", &big, 0));
        store.apply(1, 1, 1000, &cmd).unwrap();
        store.persist().unwrap();
        assert_eq!(store.segment_count(), 1);
    }

    #[test]
    fn deleting_a_range_dir_removes_its_meta_and_store() {
        let data = tempfile::tempdir().unwrap();
        let m = RangeMeta {
            range: 12,
            collection: 3,
            persistence: metapb::Persistence::PERSISTENT,
            replication: metapb::ReplicationMode::CONSENSUS,
            parent: 0,
            split_index: 0,
        };
        let cfg = prepare_dir(data.path(), &m).unwrap();
        let mut store = KvStore::open(cfg).unwrap();
        let cmd = collections::kv::cmd::encode(&collections::kv::cmd::put(b"k", b"v", 0));
        store.apply(1, 1, 1000, &cmd).unwrap();
        store.persist().unwrap();
        let other = RangeMeta { range: 13, ..m };
        prepare_dir(data.path(), &other).unwrap();
        assert!(meta_file(&range_dir(data.path(), 12)).exists());
        // A logged range's image beside it: shrunk and deleted in the background.
        let image = range_dir(data.path(), 12).join("kv").join("kv.snap");
        std::fs::write(&image, vec![7u8; 12 << 20]).unwrap();
        delete_dir(data.path(), 12).unwrap();
        assert!(!range_dir(data.path(), 12).exists());
        // Idempotent, and the other range is untouched.
        delete_dir(data.path(), 12).unwrap();
        assert!(meta_file(&range_dir(data.path(), 13)).exists());
        // The trashed dir goes within a bounded time (the store still maps its segments:
        // they are unlinked, not shrunk, so it can still read and write them).
        let trash = data.path().join(TRASH);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_dir(&trash).unwrap().next().is_some() {
            assert!(std::time::Instant::now() < deadline, "trash not emptied");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(store.get(b"k", 1000).unwrap().0.unwrap().value, &b"v"[..]);
        drop(store);
        // A leftover of an earlier process is deleted at the next start.
        let left = trash.join("12.1.0");
        std::fs::create_dir_all(left.join("kv")).unwrap();
        std::fs::write(left.join("kv").join("kv.snap"), b"old").unwrap();
        clean_trash(data.path());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while left.exists() {
            assert!(std::time::Instant::now() < deadline, "leftover not deleted");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A flipped bit in a logged range's `kv.snap` fails the open, and the error is classified
    /// as a damaged image naming that file; errors that are not about stored bytes are not.
    #[test]
    fn a_flipped_bit_in_a_range_image_is_a_damaged_image() {
        let data = tempfile::tempdir().unwrap();
        let m = RangeMeta {
            range: 7,
            collection: 3,
            persistence: metapb::Persistence::LOGGED,
            replication: metapb::ReplicationMode::CONSENSUS,
            parent: 0,
            split_index: 0,
        };
        let cfg = prepare_dir(data.path(), &m).unwrap();
        let mut store = KvStore::open(cfg).unwrap();
        for i in 0..20u64 {
            let k = format!("k{i}");
            let cmd =
                collections::kv::cmd::encode(&collections::kv::cmd::put(k.as_bytes(), b"value", 0));
            store.apply(i + 1, 1, 1000, &cmd).unwrap();
        }
        store.persist().unwrap();
        drop(store);
        let snap = range_dir(data.path(), 7).join("kv").join("kv.snap");
        let mut bytes = std::fs::read(&snap).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(&snap, &bytes).unwrap();
        let Err(e) = KvStore::open(prepare_dir(data.path(), &m).unwrap()) else {
            panic!("a damaged image is opened");
        };
        assert_eq!(damaged_image(data.path(), &m, &e), Some(snap), "{e}");

        let persistent = RangeMeta {
            persistence: metapb::Persistence::PERSISTENT,
            ..m.clone()
        };
        let seg = collections::KvError::Storage(seglog::Error::Corrupt {
            segment: 1,
            offset: 4096,
            reason: "checksum mismatch".into(),
        });
        assert_eq!(
            damaged_image(data.path(), &persistent, &seg),
            Some(range_dir(data.path(), 7).join("kv"))
        );
        let io = collections::KvError::Io {
            op: "read snapshot",
            path: "x".into(),
            source: std::io::Error::other("busy"),
        };
        assert_eq!(damaged_image(data.path(), &m, &io), None);
        let command = collections::KvError::Corrupt {
            what: "command",
            why: "garbage".into(),
        };
        assert_eq!(damaged_image(data.path(), &m, &command), None);
    }

    #[test]
    fn range_meta_round_trip() {
        let m = RangeMeta {
            range: 7,
            collection: 3,
            persistence: metapb::Persistence::PERSISTENT,
            replication: metapb::ReplicationMode::ASYNC,
            parent: 0,
            split_index: 0,
        };
        assert_eq!(RangeMeta::decode(&m.encode()), Some(m.clone()));
        let d = RangeMeta {
            range: 9,
            parent: 7,
            split_index: 42,
            ..m
        };
        assert_eq!(RangeMeta::decode(&d.encode()), Some(d));
        assert_eq!(RangeMeta::decode("garbage"), None);
    }

    /// Only memory ranges get the volatile raft log (nothing on disk); the modes carry over.
    #[test]
    fn memory_ranges_get_the_volatile_log() {
        use harpoon::LogKind;
        let m = |persistence, replication| RangeMeta {
            range: 7,
            collection: 3,
            persistence,
            replication,
            parent: 0,
            split_index: 0,
        };
        use metapb::Persistence::*;
        use metapb::ReplicationMode::*;
        for (p, kind) in [
            (MEMORY, LogKind::Volatile),
            (LOGGED, LogKind::Durable),
            (PERSISTENT, LogKind::Durable),
        ] {
            assert_eq!(cell_options(&m(p, CONSENSUS)).log, kind, "{p:?}");
        }
        let o = cell_options(&m(MEMORY, ASYNC));
        assert_eq!(o.mode, ReplicationMode::Async);
        assert_eq!(o.log, LogKind::Volatile);
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

    #[test]
    fn admin_entries_round_trip_and_garbage_is_refused() {
        for hi in [None, Some(Bytes::from_static(b"\x00\x00\x00\x03"))] {
            let cmd = AdminCommand::Split(SplitCommand {
                at: Bytes::from_static(b"\x00\x02key-5"),
                daughter: 17,
                lo: Bytes::new(),
                hi,
            });
            let e = encode_admin(1_700_000_000_000, &cmd);
            let (now, rest) = split_entry(&e);
            assert_ne!(now & ADMIN_FLAG, 0);
            assert_eq!(now & !ADMIN_FLAG, 1_700_000_000_000);
            assert_eq!(decode_admin(rest).unwrap(), cmd);
            // Every cut is refused, and so are trailing bytes.
            for n in 0..rest.len() {
                assert!(decode_admin(&rest[..n]).is_err(), "cut at {n}");
            }
            let mut long = rest.to_vec();
            long.push(0);
            assert!(decode_admin(&long).is_err());
        }
        assert!(decode_admin(&[9]).is_err());
        // A normal entry never carries the flag, whatever clock it is given.
        let e = encode_entry(u64::MAX, b"x");
        assert_eq!(split_entry(&e).0 & ADMIN_FLAG, 0);
    }

    #[test]
    fn daughter_conf_is_never_joint() {
        let joint = ConfState {
            voters: vec![1, 2, 4],
            voters_outgoing: vec![1, 2, 3],
            learners: vec![5],
            learners_next: vec![3],
            auto_leave: true,
            ..Default::default()
        };
        let d = daughter_conf(&joint);
        assert_eq!(d.voters, vec![1, 2, 4]);
        assert_eq!(d.learners, vec![5, 3]);
        assert!(d.voters_outgoing.is_empty() && d.learners_next.is_empty() && !d.auto_leave);
        assert_eq!(daughter_conf(&d), d);
    }

    /// A node stand-in: claims, daughters' dirs under a temp dir, started daughters kept.
    #[derive(Default)]
    struct FakeHost {
        dir: PathBuf,
        claims: Mutex<HashSet<u64>>,
        held: Mutex<HashSet<u64>>,
        started: Mutex<Vec<(RangeMeta, KvStore)>>,
    }

    impl SplitHost for FakeHost {
        fn claim(&self, range: u64) -> bool {
            !self.held.lock().contains(&range) && self.claims.lock().insert(range)
        }
        fn release(&self, range: u64) {
            self.claims.lock().remove(&range);
        }
        fn prepare(&self, m: &RangeMeta) -> Result<KvConfig, String> {
            prepare_dir(&self.dir, m).map_err(|e| e.to_string())
        }
        fn start(&self, m: RangeMeta, store: KvStore) {
            self.claims.lock().remove(&m.range);
            self.held.lock().insert(m.range);
            self.started.lock().push((m, store));
        }
    }

    fn parent_meta() -> RangeMeta {
        RangeMeta {
            range: 2,
            collection: 3,
            persistence: metapb::Persistence::LOGGED,
            replication: metapb::ReplicationMode::CONSENSUS,
            parent: 0,
            split_index: 0,
        }
    }

    /// A parent range's replica in `dir` with a fake host, keys a, c, e, g at indexes 1-4,
    /// persisted: the host, the parent's meta, its store config and its state machine.
    fn persisted_parent(dir: &Path) -> (Arc<FakeHost>, RangeMeta, KvConfig, KvStateMachine) {
        let host = Arc::new(FakeHost {
            dir: dir.to_path_buf(),
            ..Default::default()
        });
        let pm = parent_meta();
        let cfg = prepare_dir(dir, &pm).unwrap();
        let mut sm = KvStateMachine::with_host(
            KvStore::open(cfg.clone()).unwrap(),
            pm.clone(),
            host.clone(),
        );
        for (i, k) in [&b"a"[..], b"c", b"e", b"g"].iter().enumerate() {
            put_entry(&mut sm, 1 + i as u64, k);
        }
        sm.persist().unwrap();
        (host, pm, cfg, sm)
    }

    fn put_entry(sm: &mut KvStateMachine, index: u64, key: &[u8]) -> kvpb::Response {
        let cmd = collections::kv::cmd::encode(&collections::kv::cmd::put(key, b"v", 0));
        let data = encode_entry(1000, &cmd);
        let r = sm
            .apply(EntryRef {
                index,
                term: 2,
                data: &data,
            })
            .unwrap();
        kvpb::Response::parse_from_bytes(&r).unwrap()
    }

    fn split_entry_at(
        sm: &mut KvStateMachine,
        index: u64,
        at: &[u8],
        daughter: u64,
        b: &Bounds,
    ) -> kvpb::Response {
        let data = encode_admin(
            1000,
            &AdminCommand::Split(SplitCommand {
                at: Bytes::copy_from_slice(at),
                daughter,
                lo: b.lo.clone(),
                hi: b.hi.clone(),
            }),
        );
        let r = sm
            .apply(EntryRef {
                index,
                term: 2,
                data: &data,
            })
            .unwrap();
        kvpb::Response::parse_from_bytes(&r).unwrap()
    }

    #[test]
    fn split_entries_materialise_the_daughter_once_and_stale_ones_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let host = Arc::new(FakeHost {
            dir: dir.path().to_path_buf(),
            ..Default::default()
        });
        let pm = parent_meta();
        let cfg = prepare_dir(dir.path(), &pm).unwrap();
        let mut sm =
            KvStateMachine::with_host(KvStore::open(cfg).unwrap(), pm.clone(), host.clone());
        let joint = ConfState {
            voters: vec![1, 2],
            voters_outgoing: vec![1, 2, 3],
            ..Default::default()
        };
        sm.apply_conf_change(1, 2, &joint).unwrap();
        for (i, k) in [&b"a"[..], b"c", b"e", b"g"].iter().enumerate() {
            put_entry(&mut sm, 2 + i as u64, k);
        }
        let before = sm.store.bounds();
        let r = split_entry_at(&mut sm, 6, b"d", 9, &before);
        assert!(!r.has_error(), "{r:?}");
        assert_eq!(sm.store.bounds().hi.as_deref(), Some(&b"d"[..]));
        {
            let started = host.started.lock();
            assert_eq!(started.len(), 1);
            let (m, d) = &started[0];
            assert_eq!((m.range, m.parent, m.split_index), (9, 2, 6));
            assert_eq!(d.bounds().lo.as_ref(), b"d");
            assert_eq!(d.apply_state().applied_index, 6);
            let conf = decode_conf(&d.durable_state().apply_meta).unwrap();
            assert_eq!(conf, daughter_conf(&joint));
            assert!(d.get(b"e", 0).unwrap().0.is_some());
            // Its range.meta names the parent (written before the store).
            let s = std::fs::read_to_string(meta_file(&range_dir(dir.path(), 9))).unwrap();
            assert_eq!(RangeMeta::decode(&s).unwrap(), m.clone());
        }
        // The parent refuses the keys it gave away, and reads of them.
        let r = put_entry(&mut sm, 7, b"f");
        assert_eq!(r.get_error().code, kvpb::ErrorCode::KEY_OUT_OF_RANGE);
        assert!(sm.store.get(b"e", 0).is_err());
        // The same split again (a duplicate proposal): stale bounds, nothing changes.
        let r = split_entry_at(&mut sm, 8, b"d", 9, &before);
        assert_eq!(r.get_error().code, kvpb::ErrorCode::INVALID_ARGUMENT);
        let now = sm.store.bounds();
        let r = split_entry_at(&mut sm, 9, b"f", 10, &now);
        assert_eq!(r.get_error().code, kvpb::ErrorCode::KEY_OUT_OF_RANGE);
        let r = split_entry_at(&mut sm, 10, b"", 10, &now);
        assert!(r.has_error());
        assert_eq!(host.started.lock().len(), 1);
        assert_eq!(
            sm.store.apply_state().applied_index,
            10,
            "refusals are applied"
        );
        assert_eq!(sm.store.bounds(), now);
        // A daughter already held here: the parent only drops its right half.
        host.held.lock().insert(11);
        let r = split_entry_at(&mut sm, 11, b"b", 11, &now);
        assert!(!r.has_error(), "{r:?}");
        assert_eq!(sm.store.bounds().hi.as_deref(), Some(&b"b"[..]));
        assert_eq!(host.started.lock().len(), 1);
        assert!(!range_dir(dir.path(), 11).exists());
        // Without a node, splits are refused.
        let mut bare = KvStateMachine::new(KvStore::open(KvConfig::memory()).unwrap());
        let b = bare.store.bounds();
        put_entry(&mut bare, 1, b"a");
        put_entry(&mut bare, 2, b"z");
        let r = split_entry_at(&mut bare, 3, b"m", 5, &b);
        assert!(r.has_error());
        assert_eq!(bare.store.bounds(), b);
    }

    #[test]
    fn a_split_replayed_after_a_crash_reuses_the_durable_right_half() {
        let dir = tempfile::tempdir().unwrap();
        let (host, pm, cfg, sm) = persisted_parent(dir.path());
        let b = sm.store.bounds();
        // The crash: the right half durable, the parent not (its durable state is older).
        let dm = RangeMeta {
            range: 9,
            parent: 2,
            split_index: 5,
            ..pm.clone()
        };
        let dcfg = prepare_dir(dir.path(), &dm).unwrap();
        {
            let mut copy = KvStore::open(KvConfig::memory()).unwrap();
            copy.restore_bytes(&sm.store.reader().snapshot().to_bytes().unwrap())
                .unwrap();
            let right = copy.split_off(5, 2, b"d", dcfg.clone()).unwrap();
            assert_eq!(right.durable_state().applied_index, 5);
        }
        drop(sm);
        let mut sm = KvStateMachine::with_host(KvStore::open(cfg).unwrap(), pm, host.clone());
        let r = split_entry_at(&mut sm, 5, b"d", 9, &b);
        assert!(!r.has_error(), "{r:?}");
        let started = host.started.lock();
        assert_eq!(started.len(), 1);
        // The reused right half was built by `split_off` with the parent's membership: the
        // replay gives it the daughter's, durably.
        let conf = decode_conf(&started[0].1.durable_state().apply_meta).unwrap();
        let parent_conf = decode_conf(&sm.store.durable_state().apply_meta).unwrap();
        assert_eq!(conf, daughter_conf(&parent_conf));
        assert_eq!(
            started[0]
                .1
                .scan(
                    &collections::kv::ScanRequest::range(collections::kv::KeyRange::all()),
                    0
                )
                .unwrap()
                .kvs
                .len(),
            2
        );
    }

    fn meta_text(m: &RangeMeta) -> std::io::Result<String> {
        Ok(m.encode())
    }

    /// Start-up's decision per range dir: a logged or persistent replica reopens; a memory
    /// one, or one whose `range.meta` cannot be read, does not decode or names another range,
    /// is lost, keyed by the dir's name (never skipped: self-assignment would then open it
    /// blank under its old identity); what is not a range replica is skipped.
    #[test]
    fn start_up_records_a_range_dir_it_cannot_read_as_lost() {
        let logged = RangeMeta {
            range: 7,
            collection: 3,
            persistence: metapb::Persistence::LOGGED,
            replication: metapb::ReplicationMode::CONSENSUS,
            parent: 2,
            split_index: 40,
        };
        assert_eq!(
            classify_range_dir("7", meta_text(&logged)),
            FoundDir::Reopen(logged.clone())
        );
        let persistent = RangeMeta {
            persistence: metapb::Persistence::PERSISTENT,
            ..logged.clone()
        };
        assert_eq!(
            classify_range_dir("7", meta_text(&persistent)),
            FoundDir::Reopen(persistent)
        );
        let memory = RangeMeta {
            persistence: metapb::Persistence::MEMORY,
            ..logged.clone()
        };
        let lost = |d: FoundDir| match d {
            FoundDir::Lost { range, why } => (range, why),
            other => panic!("not lost: {other:?}"),
        };
        assert_eq!(
            lost(classify_range_dir("7", meta_text(&memory))),
            (7, MEMORY_LOST.to_string())
        );
        // Garbage, a cut-short file, an empty one, an unknown mode: lost under the dir's id.
        for text in [
            "range=7\ncollection=3\npersistence=9\n",
            "range=7\ncollection=x\n",
            "\u{0}\u{0}\u{0}",
            "",
            "rang",
        ] {
            let (range, why) = lost(classify_range_dir("7", Ok(text.to_string())));
            assert_eq!(range, 7, "{text:?}");
            assert!(why.contains("does not decode"), "{text:?}: {why}");
        }
        // A read error other than a missing file (bytes that are not UTF-8, an I/O error).
        let bad = std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8");
        let (range, why) = lost(classify_range_dir("7", Err(bad)));
        assert_eq!(range, 7);
        assert!(why.contains("cannot be read"), "{why}");
        // A readable file naming another range: it cannot be trusted either.
        let (range, why) = lost(classify_range_dir("8", meta_text(&logged)));
        assert_eq!(range, 8);
        assert!(why.contains("names range 7"), "{why}");
        // Not a range replica: skipped.
        let missing = || std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert!(matches!(
            classify_range_dir("7", Err(missing())),
            FoundDir::Skip(_)
        ));
        assert!(matches!(
            classify_range_dir("range.meta.tmp", meta_text(&logged)),
            FoundDir::Skip(_)
        ));
        assert!(matches!(
            classify_range_dir("0", Ok(String::new())),
            FoundDir::Skip(_)
        ));
        // The bytes start-up reads from a real dir: a flipped byte makes it lost.
        let data = tempfile::tempdir().unwrap();
        prepare_dir(data.path(), &memory).unwrap();
        let file = meta_file(&range_dir(data.path(), 7));
        std::fs::write(&file, b"\xff\xfe\x00garbage").unwrap();
        let (range, why) = lost(classify_range_dir("7", std::fs::read_to_string(&file)));
        assert_eq!(range, 7);
        assert!(why.contains("cannot be read"), "{why}");
    }

    /// Self-assignment's decision for a range listed here but not held: a memory range whose
    /// dir is here (or may be) is lost, never opened blank; without a dir it is a new replica;
    /// logged and persistent ones reopen (their raft state is durable).
    #[test]
    fn a_listed_memory_range_whose_dir_is_here_is_lost_not_reopened() {
        use metapb::Persistence as P;
        assert!(matches!(
            listed_unheld(P::MEMORY, true),
            ListedUnheld::Lost(_)
        ));
        assert_eq!(listed_unheld(P::MEMORY, false), ListedUnheld::Open);
        for p in [P::LOGGED, P::PERSISTENT] {
            assert_eq!(listed_unheld(p, true), ListedUnheld::Open);
            assert_eq!(listed_unheld(p, false), ListedUnheld::Open);
        }
    }

    /// A replica recorded lost cannot be claimed (so neither self-assignment nor a parent's
    /// replayed split opens it) until its record is gone.
    #[test]
    fn a_lost_replica_cannot_be_claimed() {
        let r = Registry::default();
        r.failed.lock().insert(9, "lost".into());
        assert!(!r.claim(9));
        assert!(!r.claimed(9));
        assert!(r.claim(10));
        r.failed.lock().remove(&9);
        assert!(r.claim(9));
        assert!(!r.claim(9), "claimed once");
    }

    /// A replica being dropped is out of the held ranges and claimed, in one step: nothing
    /// opens it (a claim fails) until the drop gives the claim back; a failed drop restores it.
    #[test]
    fn a_retired_replica_stays_claimed_until_released() {
        let r = Registry::default();
        let m = RangeMeta {
            range: 5,
            collection: 2,
            persistence: metapb::Persistence::MEMORY,
            replication: metapb::ReplicationMode::CONSENSUS,
            parent: 0,
            split_index: 0,
        };
        let store = KvStore::open(KvConfig::memory()).unwrap();
        r.register(&m, store.reader());
        assert!(r.retire(6).is_none(), "not held: nothing changes");
        assert!(!r.claimed(6));
        let held = r.retire(5).expect("held");
        assert!(r.get(5).is_none() && r.claimed(5));
        assert!(!r.claim(5), "nothing opens it meanwhile");
        r.restore(held);
        assert!(r.get(5).is_some() && !r.claimed(5));
        assert!(r.retire(5).is_some());
        r.release(5);
        assert!(r.get(5).is_none() && !r.claimed(5));
        assert!(r.claim(5), "opened again once released");
    }

    /// Which parent a daughter's deletion waits for, and when the parent's image is settled.
    #[test]
    fn deleting_a_logged_daughter_waits_for_its_parents_image() {
        let d = RangeMeta {
            range: 9,
            collection: 3,
            persistence: metapb::Persistence::LOGGED,
            replication: metapb::ReplicationMode::CONSENSUS,
            parent: 2,
            split_index: 40,
        };
        assert_eq!(
            split_origin(9, meta_text(&d)),
            SplitOrigin::Parent {
                parent: 2,
                split_index: 40
            }
        );
        // A persistent parent's left half is durable before the daughter exists; a memory
        // parent has nothing to replay; a range opened by assignment has no parent.
        for other in [
            RangeMeta {
                persistence: metapb::Persistence::PERSISTENT,
                ..d.clone()
            },
            RangeMeta {
                persistence: metapb::Persistence::MEMORY,
                ..d.clone()
            },
            RangeMeta {
                parent: 0,
                split_index: 0,
                ..d.clone()
            },
        ] {
            assert_eq!(split_origin(9, meta_text(&other)), SplitOrigin::None);
        }
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(split_origin(9, Err(missing)), SplitOrigin::None);
        let bad = std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8");
        assert_eq!(split_origin(9, Err(bad)), SplitOrigin::Unknown);
        assert_eq!(split_origin(9, Ok("garbage".into())), SplitOrigin::Unknown);
        assert_eq!(split_origin(8, meta_text(&d)), SplitOrigin::Unknown);

        // The parent's log starts past the split entry: its image holds the split.
        assert_eq!(parent_image_state(41, 50, Some(40)), ParentImage::Settled);
        // The split entry is still in its log: persist first.
        assert_eq!(parent_image_state(41, 50, Some(41)), ParentImage::Persist);
        assert_eq!(parent_image_state(1, 40, Some(40)), ParentImage::Persist);
        // Not applied yet: it will, and must find the daughter's dir.
        assert_eq!(parent_image_state(1, 39, Some(40)), ParentImage::Behind);
        // Unknown split: always persisted.
        assert_eq!(parent_image_state(100, 100, None), ParentImage::Persist);
    }

    /// What settling a parent does and why it closes the window: a logged parent's split
    /// leaves its durable image before the split (written in the background), so a crash
    /// then would replay the Split entry and, the daughter's dir deleted, materialise it again
    /// blank; once `persist` returned (what the forced compaction of the parent calls), the
    /// durable image holds the split and a reopened parent has nothing to replay.
    #[test]
    fn a_parent_made_durable_after_its_split_no_longer_replays_it() {
        let dir = tempfile::tempdir().unwrap();
        let (host, _, cfg, mut sm) = persisted_parent(dir.path());
        let b = sm.store.bounds();
        let r = split_entry_at(&mut sm, 5, b"d", 9, &b);
        assert!(!r.has_error(), "{r:?}");
        assert_eq!(host.started.lock().len(), 1);
        // Before the image write is adopted the parent's durable state may predate the split.
        assert!(sm.apply_state().applied_index <= 5);
        sm.persist().unwrap();
        assert_eq!(sm.apply_state().applied_index, 5, "durable at the split");
        drop(sm);
        // The daughter's replica is deleted, then a crash: the reopened parent starts at the
        // split (harpoon replays only entries past it) with the right half already gone.
        host.started.lock().clear();
        delete_dir(dir.path(), 9).unwrap();
        let reopened = KvStore::open(cfg).unwrap();
        assert_eq!(reopened.durable_state().applied_index, 5);
        assert_eq!(reopened.bounds().hi.as_deref(), Some(&b"d"[..]));
    }
}
