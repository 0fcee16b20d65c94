//! The node's background loops.
//!
//! - **subscribe**: without a led meta replica, long-poll `WatchMeta` at a meta member (or a
//!   seed, following redirects: a redirect's leader next, each address once per round) and
//!   keep the view; with one, the replica is the view.
//! - **heartbeat**: every `heartbeat` interval, write this node's record (address, zone,
//!   capacity, free, time) into meta through its leader.
//! - **assign**: when meta is under its replication factor and placement ranks this node
//!   among the candidates, compare-and-swap this node into meta's members (as a learner),
//!   then open an empty replica that the leader fills by snapshot.
//! - **reconcile** (on meta's leader only): make the cell's membership follow the range
//!   descriptor: add learners, promote them once caught up and record the promotion, remove
//!   members the descriptor no longer lists; remove dead nodes from every range descriptor.
//! - **split** (on each KV range's leader, about every second): when the store holds more
//!   than the collection's split size, has a middle key, meta shows exactly the store's
//!   bounds (no split pending) and the cell is not mid membership change: reserve the
//!   daughter's id in meta, propose the admin Split entry, answered once it applied here
//!   (`ranges::propose_split`, behind the range's split fence), record the split in meta
//!   (`RecordSplit`, compare-and-swap). Repair: the leader of a daughter that meta does not
//!   list records its split from the parent's record while that still covers it (the
//!   parent's leader failed between apply and record).
//! - **housekeeping** (on each KV range's leader, about every second, jittered):
//!   - TTL expiry: once the earliest TTL of the range (`KvReader::next_expiry_ms`, constant
//!     time) has passed by the leader's clock, the leader proposes `Expire{now_ms: 0}` (the
//!     entry's own clock), at most once per [`EXPIRE_EVERY`]. Ranges without due TTLs propose
//!     nothing.
//!   - retention: the store cannot map time to revision, so the leader keeps a small ring of
//!     `(leader clock, applied revision)` samples ([`RevisionRing`]), one per interval in which
//!     the revision moved, and proposes `Compact{revision}` for the newest sample at least the
//!     collection's `retention_secs` old (0: keep everything). The ring lives on the leader in
//!     memory: a new leader starts an empty one, so after a leader change history is kept up to
//!     one retention period longer. The leader's clock is what the entry clock is made of.
//!     Followers never propose either.
//!   - removed replicas (every replica): a range registered here whose cell harpoon removed
//!     (this node was taken out of its membership) is dropped, dir included, once meta knows
//!     the range and no longer lists this node ([`crate::ranges::drop_removed`]); never while
//!     it is listed, and for a logged daughter materialised here by a split, not before its
//!     parent's image here is durable past the split ([`crate::ranges::settle_parent_image`]).
//!   - replicas removed while they lagged (every replica whose cell still runs): a member cut
//!     off or stopped while it was removed never receives its removal, so its cell never
//!     destroys itself; it is dropped (cell and raft state through harpoon's `destroy_cell`,
//!     then its dir: `crate::ranges::drop_lingering`) once meta's record, at an epoch newer
//!     than this node's durable claim epoch and than any epoch it saw listing it, no longer
//!     lists it and lists a voter; never when the local cell has this node as its only voter
//!     or while it leads (`crate::linger`, which says why this is safe).
//!   - lost replicas (every node): a replica recorded lost (`Registry::failed`) rejoins. It is
//!     recorded at start-up for a memory range, without a cell (its raft log and hard state
//!     were volatile); when harpoon refuses the cell with `NeedsSnapshot` (a logged or
//!     persistent store that lost data its raft log was compacted past); and when the store's
//!     image is damaged (`kv.snap` or data log failing its checksum: refused, never served,
//!     `crate::ranges::damaged_image`). Listed as a voter, it asks meta to demote it to a
//!     learner, unless meta lists no other voter (every replica lost or damaged: it keeps its
//!     role and its dir, and the range waits for an operator); the range's leader ([`reconcile_cell`]) takes a KV range voter that meta
//!     lists as a learner, and that it did not promote itself, out of the cell and only then
//!     out of meta (meta's leader demotes dead voters the same way, and leaves dead learners
//!     to the range's leader while the range has a live voter). So "not listed" means "not a
//!     voter of the cell", and only then does the node forget the cell's raft state and dir
//!     ([`crate::ranges::forget_lost`]) and let self-assignment claim a slot as a learner.
//!     Start-up also records as lost a range dir whose `range.meta` cannot be read, and
//!     self-assignment a memory range meta lists here whose replica is gone but whose dir is
//!     here (`crate::ranges::listed_unheld`): never a blank memory replica under an old identity.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use collections::kv::Bounds;
use harpoon::{CellId, NodeId, Role};
use meta::{
    keys, ops, placement, view, CollectionDescriptor, MemberRole, MetaError, MetaStore,
    RangeDescriptor, META_RANGE,
};
use proto::metapb::{ControlError_Code, ControlRequest, ControlResponse_oneof_kind, Heartbeat};
use protobuf::Message;
use rand::Rng;
use tokio::task::JoinSet;

use crate::node::{now_ms, Attempt, Refusal, RetryError, Seed, Targets, META_CELL};

/// Spawn every loop.
pub fn spawn_all(seed: &Arc<Seed>) -> JoinSet<()> {
    let mut set = JoinSet::new();
    set.spawn(subscribe(seed.clone()));
    set.spawn(heartbeat(seed.clone()));
    set.spawn(assign(seed.clone()));
    set.spawn(reconcile(seed.clone()));
    set.spawn(split(seed.clone()));
    set.spawn(housekeeping(seed.clone()));
    set
}

/// How often a range's leader does its housekeeping (expiry, retention).
pub const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The least time between two `Expire` proposals of one range (only proposed once a TTL is due).
pub const EXPIRE_EVERY: Duration = Duration::from_millis(500);

/// Samples kept per range by [`RevisionRing`] (thinned, never the newest, when full).
pub const RING_SAMPLES: usize = 1024;

/// `(leader clock ms, applied revision)` samples of one range on its leader, oldest first:
/// revision `r` sampled at `t` was applied at or before `t`, so once `t` is older than the
/// retention every event at or below `r` may be compacted.
#[derive(Debug, Default)]
pub struct RevisionRing {
    samples: VecDeque<(u64, u64)>,
}

impl RevisionRing {
    /// Record `revision` seen at `now_ms` (only when it moved since the last sample: the
    /// earliest time a revision was seen is the one that matters). When full, every other
    /// sample is dropped (coarser, so compaction keeps more history, never less).
    pub fn record(&mut self, now_ms: u64, revision: u64) {
        if self.samples.back().is_some_and(|&(_, r)| r >= revision) {
            return;
        }
        if self.samples.len() >= RING_SAMPLES {
            let kept: VecDeque<(u64, u64)> = self
                .samples
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, s)| *s)
                .collect();
            self.samples = kept;
        }
        self.samples.push_back((now_ms, revision));
    }

    /// The newest revision sampled at least `retention_ms` before `now_ms`, if any; the samples
    /// up to it are dropped (they are due).
    pub fn due(&mut self, now_ms: u64, retention_ms: u64) -> Option<u64> {
        let mut due = None;
        while let Some(&(t, r)) = self.samples.front() {
            if t.saturating_add(retention_ms) > now_ms {
                break;
            }
            due = Some(r);
            self.samples.pop_front();
        }
        due
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// What a range's leader remembers for its housekeeping (reset when its term changes).
#[derive(Debug, Default)]
struct Housekeeping {
    term: u64,
    ring: RevisionRing,
    /// The highest revision compacted by this leader (or due and not yet proposed).
    compacted: u64,
    want: u64,
    last_expire: Option<Instant>,
    /// When this range's cell was first seen gone while meta lists this node.
    missing_since: Option<Instant>,
}

async fn housekeeping(seed: Arc<Seed>) {
    let mut state: HashMap<u64, Housekeeping> = HashMap::new();
    // Per range held here: the highest epoch at which meta's record listed this node.
    let mut listed: HashMap<u64, u64> = HashMap::new();
    loop {
        tokio::time::sleep(jitter(HOUSEKEEPING)).await;
        if seed.draining.load(Ordering::Relaxed) || !seed.meta_known() {
            continue;
        }
        let ids = seed.ranges.ids();
        state.retain(|id, _| ids.contains(id));
        listed.retain(|id, _| ids.contains(id));
        let recs = Records::read(&seed);
        for id in ids {
            let hk = state.entry(id).or_default();
            let seen = listed.entry(id).or_default();
            if let Err(e) = housekeep(&seed, id, hk, seen, &recs).await {
                tracing::info!(range = id, error = %e, "housekeeping not done");
            }
        }
        for id in seed.ranges.failed_ids() {
            if let Err(e) = rejoin_lost(&seed, id).await {
                tracing::info!(range = id, error = %e, "lost replica not rejoined yet");
            }
        }
    }
}

/// This node's replica of range `id` was lost (recorded in `Registry::failed`). Listed in meta
/// as a voter: ask meta to demote it to a learner (the range's leader then takes it out of the
/// cell, and only then out of meta, see [`reconcile_cell`]); not while meta lists no other
/// voter (every replica lost: no leader could take it out, and its dir may be the only copy of
/// the range, damaged or not, so it is kept for an operator). Listed as a learner: ask meta to
/// drop it (compared against the record read here, so a concurrent change, such as a
/// promotion being recorded, makes it fail and the next round decides again); the range's
/// leader then removes the cell member meta no longer lists. A learner's acknowledgements
/// never counted, so its replica may start over while the cell still names it as a learner:
/// it is filled by snapshot before it can be promoted. (A cell voter that meta still lists as
/// a learner, promoted but not recorded yet, is removed the same way and its promotion
/// forgotten; only if it were listed again before the leader's next round would the leader
/// record that promotion for the new, empty replica: the promotion note would need the
/// record's epoch to rule that out.) No longer listed: forget its raft state and dir, and let
/// self-assignment claim a slot again as a learner.
async fn rejoin_lost(seed: &Arc<Seed>, id: u64) -> Result<(), String> {
    let Some(range) = seed.read_meta(|s| view::range_by_id(s, id).ok().flatten()) else {
        return Ok(());
    };
    match range.value.members.iter().find(|m| m.node == seed.id) {
        Some(m) if m.role == MemberRole::VOTER => {
            let others = range
                .value
                .members
                .iter()
                .any(|o| o.node != seed.id && o.role == MemberRole::VOTER);
            if !others {
                // No other voter holds the range: demoting this one would leave meta listing
                // none, and nothing could take it out of the cell anyway (no leader). Its dir
                // stays: the only copy there is, damaged or not.
                return Err(format!(
                    "the range's only voter in meta: kept, dir included, until repaired ({})",
                    seed.ranges.failed(id).unwrap_or_default()
                ));
            }
            // Remembered (durably, before meta hears of it) so that once meta lists this node
            // as a learner it still waits for the range's leader to take it out of the cell:
            // the cell may count it as a voter, and no one else may drop it (below).
            crate::durable::write_durably(&lost_voter_marker(seed, id), b"demoted\n")
                .map_err(|e| format!("lost-voter marker: {e}"))?;
            let txn =
                ops::set_role(&range, seed.id, MemberRole::LEARNER).map_err(|e| e.to_string())?;
            match seed.propose_anywhere(&txn).await {
                Ok(r) if r.succeeded => tracing::info!(
                    node = seed.id,
                    range = id,
                    "lost replica: asked meta to demote it (the range's leader takes it out)"
                ),
                Ok(_) => {}
                Err(e) => return Err(format!("demote: {e:?}")),
            }
            Ok(())
        }
        // A voter this node demoted in meta: the cell may still count it as a voter (with no
        // leader, e.g. every replica damaged, nothing changes the cell). Dropping it from meta
        // here would let it forget its dir and come back blank under its old identity; the
        // range's leader takes it out of the cell, then out of meta (the `None` arm).
        Some(_) if lost_voter_marker(seed, id).exists() => Err(
            "lost replica demoted from voter: waiting for the range's leader to take it out of \
             the cell"
                .into(),
        ),
        Some(_) => {
            let txn = ops::del_member(&range, seed.id).map_err(|e| e.to_string())?;
            match seed.propose_anywhere(&txn).await {
                Ok(r) if r.succeeded => tracing::info!(
                    node = seed.id,
                    range = id,
                    "lost replica listed as a learner: asked meta to drop it (the range's leader \
                     takes it out of the cell)"
                ),
                Ok(_) => {}
                Err(e) => return Err(format!("drop learner: {e:?}")),
            }
            Ok(())
        }
        None => crate::ranges::forget_lost(seed, id)
            .await
            .map_err(|e| e.to_string()),
    }
}

/// The file in a lost replica's range dir that says this node was a voter of the range when
/// it asked meta to demote it (removed with the dir by `forget_lost`).
fn lost_voter_marker(seed: &Seed, id: u64) -> std::path::PathBuf {
    crate::ranges::range_dir(&seed.dir(), id).join("lost-voter")
}

/// Range `id` is registered here but its cell is gone (harpoon removed this node from it):
/// once meta knows the range and no longer lists this node, drop the replica and its dir.
/// Never while meta lists it (this node's view may lag, or it is being re-added).
async fn drop_if_removed(
    seed: &Arc<Seed>,
    id: u64,
    hk: &mut Housekeeping,
    recs: &Records,
) -> Result<(), String> {
    let listed = recs
        .ranges
        .get(&id)
        .map(|r| r.value.members.iter().any(|m| m.node == seed.id));
    match listed {
        Some(false) => {}
        // Harpoon destroys a cell only when it applies its own replica's removal, so the
        // cell's membership no longer counts this node: a replica removed while its node was
        // down, which claimed its slot again (as a learner) and then caught up to its removal.
        // Its store is stale; drop it, and self-assignment opens an empty replica that the
        // range's leader fills by snapshot. Seen twice a housekeeping interval apart, because a
        // split's daughter is registered just before its cell is created.
        Some(true) => {
            let since = *hk.missing_since.get_or_insert_with(Instant::now);
            if since.elapsed() < HOUSEKEEPING {
                return Ok(());
            }
            hk.missing_since = None;
            tracing::info!(
                range = id,
                "cell removed while meta lists this node: reopening empty"
            );
        }
        None => return Ok(()),
    }
    crate::ranges::drop_removed(seed, id)
        .await
        .map_err(|e| format!("drop removed replica: {e}"))
}

/// Propose one range command (`cmd`, full keys) on `cell`, led here, and check its answer.
async fn propose_command(
    seed: &Arc<Seed>,
    cell: CellId,
    cmd: &proto::kvpb::Command,
) -> Result<(), String> {
    let data = crate::ranges::encode_entry(now_ms(), &collections::kv::cmd::encode(cmd));
    propose_entry(seed, cell, data).await
}

/// Propose one encoded range entry on `cell`, led here, and check its answer (a `kvpb`
/// response, when the mode answers after applying).
async fn propose_entry(seed: &Arc<Seed>, cell: CellId, data: Bytes) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let reply = seed
        .node
        .propose_by(cell, data, deadline)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(b) = reply.response {
        let r = proto::kvpb::Response::parse_from_carllerche_bytes(&b)
            .map_err(|e| format!("reply: {e}"))?;
        if r.has_error() {
            return Err(format!("refused: {}", r.get_error().why));
        }
    }
    Ok(())
}

/// This node's replica of range `id` runs (`st`) but may have been removed from the range
/// while it lagged, never to learn of it from the cell ([`crate::linger`]): drop it once meta's
/// record, newer than this node's latest membership of the range, no longer lists it. `seen`
/// is the highest epoch at which the record listed this node (raised here). True when the
/// replica was dropped.
async fn drop_if_lingering(
    seed: &Arc<Seed>,
    id: u64,
    st: &harpoon::CellStatus,
    recs: &Records,
    seen: &mut u64,
) -> Result<bool, String> {
    use crate::linger::{claim_epoch, decide, LocalCell, Verdict};
    let record = recs.ranges.get(&id).map(|r| &r.value);
    if let Some(r) = record.filter(|r| r.members.iter().any(|m| m.node == seed.id)) {
        *seen = (*seen).max(r.epoch);
    }
    let local = LocalCell::of(st);
    if decide(seed.id, record, *seen, &local) != Verdict::Drop {
        return Ok(false);
    }
    // No claim of this node in flight from here until the replica is gone (a claim records
    // its epoch under the same lock); a claim being made: decide again next round.
    let Ok(_claims) = seed.claim_lock.try_lock() else {
        return Ok(false);
    };
    // Only now (rarely) read the durable claim epoch: an unreadable one keeps the replica.
    let claimed = claim_epoch(&seed.dir(), id)
        .map_err(|e| format!("lingering replica kept: claim epoch unreadable: {e}"))?;
    let floor = (*seen).max(claimed);
    if let Verdict::Keep(why) = decide(seed.id, record, floor, &local) {
        tracing::debug!(range = id, ?why, "replica not listed in meta: kept");
        return Ok(false);
    }
    tracing::info!(
        node = seed.id,
        range = id,
        epoch = record.map_or(0, |r| r.epoch),
        floor,
        "meta's record no longer lists this node's replica, which never applied its removal: \
         dropping it"
    );
    crate::ranges::drop_lingering(seed, id)
        .await
        .map_err(|e| format!("drop lingering replica: {e}"))?;
    Ok(true)
}

async fn housekeep(
    seed: &Arc<Seed>,
    id: u64,
    hk: &mut Housekeeping,
    seen: &mut u64,
    recs: &Records,
) -> Result<(), String> {
    let Some(local) = seed.ranges.get(id) else {
        return Ok(());
    };
    let cell = CellId(id);
    let st = match seed.node.status(cell).await {
        Ok(st) => st,
        Err(harpoon::Error::CellNotFound { .. }) => {
            return drop_if_removed(seed, id, hk, recs).await
        }
        Err(_) => return Ok(()),
    };
    if drop_if_lingering(seed, id, &st, recs, seen).await? {
        return Ok(());
    }
    if st.role != Role::Leader {
        *hk = Housekeeping::default();
        return Ok(());
    }
    if hk.term != st.term {
        *hk = Housekeeping {
            term: st.term,
            ..Housekeeping::default()
        };
    }
    let retention = recs.colls.get(&local.collection).map(|c| c.retention_secs);
    let now = now_ms();
    let expiry_due = local.reader.next_expiry_ms().is_some_and(|t| t <= now);
    if expiry_due && hk.last_expire.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY) {
        hk.last_expire = Some(Instant::now());
        propose_command(seed, cell, &collections::kv::cmd::expire(0))
            .await
            .map_err(|e| format!("expire: {e}"))?;
    }
    let retention_ms = match retention {
        Some(r) if r > 0 => r.saturating_mul(1000),
        _ => return Ok(()),
    };
    hk.ring.record(now, local.reader.revision());
    if let Some(r) = hk.ring.due(now, retention_ms) {
        hk.want = hk.want.max(r);
    }
    if hk.want > hk.compacted {
        let to = hk.want;
        propose_command(seed, cell, &collections::kv::cmd::compact(to))
            .await
            .map_err(|e| format!("compact to {to}: {e}"))?;
        hk.compacted = to;
        tracing::debug!(range = id, revision = to, "history compacted for retention");
    }
    Ok(())
}

/// How often a range's leader checks whether to split it.
pub const SPLIT_CHECK: Duration = Duration::from_secs(1);

async fn split(seed: Arc<Seed>) {
    loop {
        tokio::time::sleep(jitter(SPLIT_CHECK)).await;
        if seed.draining.load(Ordering::Relaxed) || !seed.meta_known() {
            continue;
        }
        let recs = Records::read(&seed);
        for id in seed.ranges.ids() {
            if let Err(e) = split_check(&seed, id, &recs).await {
                tracing::info!(range = id, error = %e, "split not done");
            }
        }
    }
}

/// Whether the store's bounds are exactly the range's record (the first range of a
/// collection has an unbounded store: its ends are the collection's).
pub fn same_bounds(store: &Bounds, rec: &RangeDescriptor, coll: &CollectionDescriptor) -> bool {
    let lo = store.lo == rec.lo || (store.lo.is_empty() && rec.lo == coll.prefix);
    lo && same_hi(store, &rec.hi, coll)
}

/// Whether the store's upper bound is `hi` (an unbounded store's is its collection's end).
fn same_hi(store: &Bounds, hi: &[u8], coll: &CollectionDescriptor) -> bool {
    match &store.hi {
        Some(h) => h.as_ref() == hi,
        None => keys::prefix_end(&coll.prefix).is_some_and(|e| e == hi),
    }
}

/// Meta's ranges and collections by id, read once per pass of a per-range loop (instead of
/// decoding every record once per range).
#[derive(Debug, Default)]
struct Records {
    ranges: HashMap<u64, meta::Versioned<RangeDescriptor>>,
    colls: HashMap<u64, CollectionDescriptor>,
}

impl Records {
    fn read(seed: &Seed) -> Records {
        seed.read_meta(|s| Records {
            ranges: view::ranges(s)
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.value.id, r))
                .collect(),
            colls: view::collections(s)
                .unwrap_or_default()
                .into_iter()
                .map(|c| (c.value.id, c.value))
                .collect(),
        })
    }
}

async fn split_check(seed: &Arc<Seed>, id: u64, recs: &Records) -> Result<(), String> {
    let Some(local) = seed.ranges.get(id) else {
        return Ok(());
    };
    let cell = CellId(id);
    let Ok(st) = seed.node.status(cell).await else {
        return Ok(());
    };
    if st.role != Role::Leader {
        return Ok(());
    }
    let rec = recs.ranges.get(&id);
    let Some(coll) = recs.colls.get(&local.collection) else {
        return Ok(());
    };
    let bounds = local.reader.bounds();
    let Some(rec) = rec else {
        if local.parent != 0 {
            return repair_record(seed, &bounds, local.parent, id).await;
        }
        return Ok(());
    };
    if !same_bounds(&bounds, &rec.value, coll)
        || !st.conf.voters_outgoing.is_empty()
        || !st.conf.learners_next.is_empty()
    {
        return Ok(());
    }
    if local.reader.live_bytes() <= coll.split_size {
        return Ok(());
    }
    let stats = local.reader.range_stats();
    if stats.bytes <= coll.split_size {
        return Ok(());
    }
    let Some(at) = stats.middle_key else {
        return Ok(());
    };
    // Strictly inside the record, so inside the store's bounds (same_bounds above).
    if at.as_ref() <= rec.value.lo.as_ref() || at.as_ref() >= rec.value.hi.as_ref() {
        return Ok(());
    }
    let t0 = Instant::now();
    let daughter = reserve_range_id(seed).await?;
    let cmd = crate::ranges::AdminCommand::Split(crate::ranges::SplitCommand {
        at: at.clone(),
        daughter,
        lo: bounds.lo.clone(),
        hi: bounds.hi.clone(),
    });
    let data = crate::ranges::encode_admin(now_ms(), &cmd);
    // Answered once applied here (also in an Async range), behind the range's split fence.
    let proposed = Instant::now();
    let split_term = crate::ranges::propose_split(seed, &local, data)
        .await
        .map_err(|e| format!("split entry: {e}"))?;
    let applied = Instant::now();
    // The daughter's first leader: this node's replica, once the followers have had about
    // as long as this node took to commit and apply the split (plus a tick) to open theirs.
    tokio::spawn(crate::ranges::campaign_daughter(
        seed.clone(),
        daughter,
        split_term,
        seed.settings.tick + applied.duration_since(proposed),
    ));
    record_split(seed, id, &at, daughter).await?;
    tracing::info!(
        range = id,
        daughter,
        at = ?at,
        bytes = stats.bytes,
        split_ms = t0.elapsed().as_millis() as u64,
        record_ms = applied.elapsed().as_millis() as u64,
        "range split and recorded in meta"
    );
    Ok(())
}

async fn reserve_range_id(seed: &Arc<Seed>) -> Result<u64, String> {
    seed.propose_retrying(5, Duration::from_millis(50), |s| {
        ops::reserve_range_id(s).map(|(id, t)| Attempt::Propose(t, id))
    })
    .await
    .map_err(|e| format!("cannot reserve a range id: {}", retry_error(e)))
}

/// The text of a [`RetryError`].
fn retry_error<E: std::fmt::Display>(e: RetryError<E>) -> String {
    match e {
        RetryError::Build(e) => e.to_string(),
        RetryError::Invalid(m) => format!("refused: {m}"),
        RetryError::GaveUp(last) => last,
    }
}

/// Record in meta that `parent` split at `at` into `daughter` (compare-and-swap on the
/// parent's record, re-read and retried on a stale read, for about 2 s). Done if meta lists
/// the daughter.
async fn record_split(
    seed: &Arc<Seed>,
    parent: u64,
    at: &[u8],
    daughter: u64,
) -> Result<(), String> {
    let built = |s: &MetaStore| -> Result<Attempt<()>, MetaError> {
        if view::range_by_id(s, daughter)?.is_some() {
            return Ok(Attempt::Done(()));
        }
        let Some(p) = view::range_by_id(s, parent)? else {
            return Ok(Attempt::Retry(format!("range {parent} unknown to meta")));
        };
        match ops::record_split(s, &p, at, daughter) {
            Ok(t) => Ok(Attempt::Propose(t, ())),
            // A split key outside the parent's record will not get better.
            Err(e @ MetaError::SplitOutsideRange { .. }) => Err(e),
            // This node's meta may lag the reservation (or the parent's last change).
            Err(e) => Ok(Attempt::Retry(e.to_string())),
        }
    };
    seed.propose_retrying(8, Duration::from_millis(50), built)
        .await
        .map_err(|e| {
            format!(
                "split of {parent} into {daughter} not recorded: {}",
                retry_error(e)
            )
        })
}

/// The leader of daughter `id` (split here from `parent`, unknown to meta): record the split
/// from the parent's record while that still covers the daughter.
async fn repair_record(
    seed: &Arc<Seed>,
    bounds: &Bounds,
    parent: u64,
    id: u64,
) -> Result<(), String> {
    let at: Bytes = bounds.lo.clone();
    let covers = seed.read_meta(|s| {
        let p = view::range_by_id(s, parent).ok().flatten()?;
        let coll = view::collection_by_id(s, p.value.collection)
            .ok()
            .flatten()?;
        let hi_ok = same_hi(bounds, &p.value.hi, &coll.value);
        Some(p.value.lo.as_ref() < at.as_ref() && at.as_ref() < p.value.hi.as_ref() && hi_ok)
    });
    if covers != Some(true) {
        return Ok(());
    }
    record_split(seed, parent, &at, id).await?;
    tracing::info!(
        range = id,
        parent,
        "split recorded in meta by the daughter's leader (repair)"
    );
    Ok(())
}

fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms + rand::thread_rng().gen_range(0..=ms / 4 + 1))
}

async fn subscribe(seed: Arc<Seed>) {
    // The member whose view was the last answer (watched again), and the addresses of this
    // round (meta's members and the seeds, then redirects: each once per round, a redirect's
    // leader next, see `Targets`).
    let mut watching: Option<SocketAddr> = None;
    let mut targets = Targets::new(seed.peer_addr.to_string(), usize::MAX);
    loop {
        let led = seed.meta_status().await.is_some_and(|s| s.leader.is_some());
        seed.replica_led.store(led, Ordering::Relaxed);
        if let Some(replica) = seed.live_replica().filter(|_| led) {
            // The replica is the view; refresh addresses when it changes.
            let mut rx = replica.subscribe();
            seed.learn_addresses();
            seed.view_changed.send_modify(|v| *v += 1);
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
            continue;
        }
        let target = match watching.take() {
            Some(t) => t,
            None => {
                let Some(t) = targets.pop() else {
                    targets = Targets::new(seed.peer_addr.to_string(), usize::MAX);
                    targets.redirected(round_targets(&seed));
                    if targets.is_empty() {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    continue;
                };
                match t.parse::<SocketAddr>() {
                    Ok(a) => a,
                    Err(_) => continue,
                }
            }
        };
        let after = seed.view.read().store.revision();
        match seed.watch_meta_at(target, after, 2000).await {
            Ok(ControlResponse_oneof_kind::view(v)) => match MetaStore::from_image(v.get_image()) {
                Ok(store) => {
                    {
                        let mut w = seed.view.write();
                        if store.revision() >= w.store.revision() {
                            w.store = store;
                        }
                        w.leader = v.leader;
                    }
                    seed.learn_addresses();
                    seed.view_changed.send_modify(|x| *x += 1);
                    // Keep watching the same member.
                    watching = Some(target);
                }
                Err(e) => tracing::warn!(%target, error = %e, "bad meta view"),
            },
            Ok(ControlResponse_oneof_kind::error(e)) => {
                if e.code == ControlError_Code::NOT_LEADER {
                    targets.redirected(e.redirect.into_vec());
                } else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%target, error = %e, "meta subscription failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Where a subscription round starts: meta's members as this node knows them, then the seeds.
fn round_targets(seed: &Seed) -> Vec<String> {
    let mut out: Vec<String> = seed.read_meta(|s| {
        view::range_by_id(s, META_RANGE)
            .ok()
            .flatten()
            .map(|r| {
                r.value
                    .members
                    .iter()
                    .map(|m| m.peer_addr.clone())
                    .collect()
            })
            .unwrap_or_default()
    });
    for a in &seed.settings.seeds {
        let a = a.to_string();
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

async fn heartbeat(seed: Arc<Seed>) {
    loop {
        tokio::time::sleep(jitter(seed.settings.heartbeat)).await;
        if !seed.meta_known() {
            continue;
        }
        let rec = seed.record();
        // At the leader: write directly.
        let local = seed.read_meta(|s| ops::put_node(s, &rec));
        let Ok(txn) = local else { continue };
        match seed.propose_local(&txn).await {
            Ok(_) => {
                seed.counters
                    .heartbeats_sent
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(Refusal::NotLeader { peers, .. }) => {
                for p in peers {
                    let Ok(addr) = p.parse::<SocketAddr>() else {
                        continue;
                    };
                    let mut req = ControlRequest::new();
                    let mut hb = Heartbeat::new();
                    hb.set_node(rec.clone());
                    req.set_heartbeat(hb);
                    match seed.dialer.call(addr, req).await {
                        Ok(r) if matches!(r.kind, Some(ControlResponse_oneof_kind::txn(_))) => {
                            seed.counters
                                .heartbeats_sent
                                .fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => continue,
                    }
                }
            }
            Err(e) => tracing::debug!(error = ?e, "heartbeat failed"),
        }
    }
}

async fn assign(seed: Arc<Seed>) {
    let mut meta_missing: Option<Instant> = None;
    loop {
        tokio::time::sleep(jitter(seed.settings.heartbeat / 2)).await;
        if seed.draining.load(Ordering::Relaxed) || !seed.meta_known() {
            continue;
        }
        assign_meta(&seed, &mut meta_missing).await;
        assign_ranges(&seed).await;
    }
}

/// Claim one slot of an under-replicated KV range (compare-and-swap into its descriptor),
/// then open the replica: the range's first member bootstraps its cell alone; later ones
/// open an empty replica that the range's leader adds as a learner and fills by snapshot.
/// Also reopens a range this node is listed in but does not hold (a memory range whose dir is
/// here is recorded lost instead: `crate::ranges::listed_unheld`).
async fn assign_ranges(seed: &Arc<Seed>) {
    let (ranges, nodes, colls) = seed.read_meta(|s| {
        (
            view::ranges(s).unwrap_or_default(),
            view::nodes(s).unwrap_or_default(),
            view::collections(s).unwrap_or_default(),
        )
    });
    let coll = |id: u64| colls.iter().find(|c| c.value.id == id).map(|c| &c.value);
    for r in ranges.iter().filter(|r| r.value.id != META_RANGE) {
        let listed = r.value.members.iter().any(|m| m.node == seed.id);
        if !listed
            || seed.ranges.get(r.value.id).is_some()
            || seed.ranges.failed(r.value.id).is_some()
        {
            continue;
        }
        let Some(c) = coll(r.value.collection) else {
            continue;
        };
        // A range held here still holds this one's keys: it has not applied the split that
        // created this range yet, and will materialise it when it does.
        if seed
            .ranges
            .holding(r.value.collection, &r.value.lo)
            .is_some_and(|p| p != r.value.id)
        {
            continue;
        }
        // Being opened here (a split's apply claims its daughter before writing its dir).
        if seed.ranges.claimed(r.value.id) {
            continue;
        }
        // A memory replica that was here and is gone (a restart, or a `range.meta` start-up
        // could not read) is never opened blank under its identity: it is recorded lost and
        // rejoins as a new member.
        if !crate::ranges::may_reopen_listed(seed, r.value.id, c) {
            continue;
        }
        // The sole member whose cell was never created (stopped between claim and open).
        let bootstrap = r.value.members.len() == 1;
        if let Err(e) = crate::ranges::open(seed, r.value.id, c, bootstrap).await {
            tracing::warn!(range = r.value.id, error = %e, "cannot open range replica");
        }
    }
    let records: Vec<_> = nodes.iter().map(|n| n.value.clone()).collect();
    let data: Vec<_> = ranges
        .iter()
        .filter(|r| r.value.id != META_RANGE)
        .map(|r| r.value.clone())
        .collect();
    let dead_after = seed.settings.dead_after.as_millis() as u64;
    let claim = placement::claimable(seed.id, &data, &records, now_ms(), dead_after);
    // Not one whose lost replica is still being forgotten (its raft state would refuse the
    // new replica again), nor one being opened. A range held here that meta does not list is
    // a replica removed while this node was down: it claims its slot again as a learner, and
    // its stale cell catches up from the range's leader (or, applying its own removal, is
    // destroyed, dropped by housekeeping and reopened empty). If the range is full, nothing
    // is claimed, and housekeeping drops the stale replica (`crate::linger`); a claim records
    // its epoch first so that a view of meta from before it never drops the replica.
    let Some(target) = claim
        .iter()
        .find(|t| seed.ranges.failed(t.id).is_none() && !seed.ranges.claimed(t.id))
    else {
        return;
    };
    let Some(range) = ranges.iter().find(|r| r.value.id == target.id) else {
        return;
    };
    let Some(c) = coll(range.value.collection) else {
        return;
    };
    let first = range.value.members.is_empty();
    let role = if first {
        MemberRole::VOTER
    } else {
        MemberRole::LEARNER
    };
    let Ok(txn) = ops::add_member(range, ops::member_of(&seed.record(), role)) else {
        return;
    };
    // Durably before the claim can win: a replica is never dropped as removed by a record
    // that is not newer than its latest claim (`crate::linger`). Under the claim lock until
    // the claim is answered, so that housekeeping, which reads the claim epoch under it
    // before it drops a replica, never drops one while a claim is in flight.
    let _claims = seed.claim_lock.lock().await;
    if let Err(e) = crate::linger::record_claim(&seed.dir(), range.value.id, range.value.epoch + 1)
    {
        tracing::warn!(range = range.value.id, error = %e, "cannot record the claim epoch: not claiming");
        return;
    }
    match seed.propose_anywhere(&txn).await {
        Ok(r) if r.succeeded => {
            tracing::info!(
                node = seed.id,
                range = range.value.id,
                first,
                "claimed a range slot"
            );
            if let Err(e) = crate::ranges::open(seed, range.value.id, c, first).await {
                tracing::warn!(range = range.value.id, error = %e, "cannot open range replica");
            }
        }
        Ok(_) => tracing::debug!(range = range.value.id, "lost the race for a range slot"),
        Err(e) => tracing::debug!(error = ?e, "cannot claim a range slot"),
    }
}

async fn assign_meta(seed: &Arc<Seed>, missing: &mut Option<Instant>) {
    let (range, nodes) = seed.read_meta(|s| {
        (
            view::range_by_id(s, META_RANGE).ok().flatten(),
            view::nodes(s).unwrap_or_default(),
        )
    });
    let Some(range) = range else { return };
    let me_member = range.value.members.iter().any(|m| m.node == seed.id);
    // A replica whose cell harpoon destroyed: it applied its own removal (this node was
    // removed as dead while it could not heartbeat, or removed while down, claimed its slot
    // again and caught up to the removal). Drop the stale replica, seen gone twice (a replica
    // is registered just before its cell is created): listed, open an empty one below; not
    // listed, claim a learner slot below, and the leader's first message creates a fresh
    // replica (the cell factory only makes one while none is registered).
    let gone = seed.replica().is_some()
        && matches!(
            seed.node.status(META_CELL).await,
            Err(harpoon::Error::CellNotFound { .. })
        );
    if !gone {
        *missing = None;
    } else if missing.get_or_insert_with(Instant::now).elapsed() >= seed.settings.heartbeat / 2 {
        *missing = None;
        tracing::info!(
            node = seed.id,
            listed = me_member,
            "meta cell removed here: dropping the replica"
        );
        seed.forget_meta_replica();
    }
    if me_member {
        // Listed but no replica (e.g. it was lost): open an empty one to be filled.
        if seed.replica().is_none() {
            if let Err(e) = seed.open_meta_replica(&[]).await {
                tracing::warn!(error = %e, "cannot open meta replica");
            }
        }
        return;
    }
    let records: Vec<_> = nodes.iter().map(|n| n.value.clone()).collect();
    let dead_after = seed.settings.dead_after.as_millis() as u64;
    let ranges = [range.value.clone()];
    if placement::claimable(seed.id, &ranges, &records, now_ms(), dead_after).is_empty() {
        return;
    }
    let rec = seed.record();
    let Ok(txn) = ops::add_member(&range, ops::member_of(&rec, MemberRole::LEARNER)) else {
        return;
    };
    match seed.propose_anywhere(&txn).await {
        Ok(r) if r.succeeded => {
            tracing::info!(
                node = seed.id,
                epoch = range.value.epoch + 1,
                "joined meta as a learner"
            );
            if let Err(e) = seed.open_meta_replica(&[]).await {
                tracing::warn!(error = %e, "cannot open meta replica");
            }
        }
        Ok(_) => tracing::debug!("lost the race for a meta slot"),
        Err(e) => tracing::debug!(error = ?e, "cannot claim a meta slot"),
    }
}

async fn reconcile(seed: Arc<Seed>) {
    loop {
        tokio::time::sleep(seed.settings.tick * 3).await;
        reconcile_ranges(&seed).await;
        if seed.replica().is_none() {
            continue;
        }
        let Some(st) = seed.meta_status().await else {
            continue;
        };
        if st.role != Role::Leader || seed.draining.load(Ordering::Relaxed) {
            continue;
        }
        if let Err(e) = reconcile_once(&seed, &st).await {
            tracing::debug!(error = %e, "reconcile");
        }
    }
}

/// For every KV range this node leads: follow its descriptor (membership).
async fn reconcile_ranges(seed: &Arc<Seed>) {
    if seed.draining.load(Ordering::Relaxed) {
        return;
    }
    let ids = seed.ranges.ids();
    let recs = Records::read(seed);
    // Promotions of ranges no longer held here are forgotten.
    seed.promoted.lock().retain_held(&ids);
    for id in ids {
        let cell = harpoon::CellId(id);
        let Ok(st) = seed.node.status(cell).await else {
            seed.promoted.lock().keep(id, None);
            continue;
        };
        if st.role != Role::Leader {
            seed.promoted.lock().keep(id, None);
            continue;
        }
        seed.promoted.lock().keep(id, Some(st.term));
        let Some(range) = recs.ranges.get(&id) else {
            continue;
        };
        if let Err(e) = reconcile_cell(seed, cell, range, &st).await {
            tracing::debug!(range = id, error = %e, "reconcile range");
        }
    }
}

async fn reconcile_once(seed: &Arc<Seed>, st: &harpoon::CellStatus) -> Result<(), String> {
    let (ranges, nodes, store_nodes) = seed.read_meta(|s| {
        (
            view::ranges(s).unwrap_or_default(),
            view::nodes(s).unwrap_or_default(),
            s.clone(),
        )
    });
    let records: Vec<_> = nodes.iter().map(|n| n.value.clone()).collect();
    let now = now_ms();
    let dead_after = seed.settings.dead_after.as_millis() as u64;
    // Give nodes that just (re)started under this leader a heartbeat's chance.
    if seed.started.elapsed() < seed.settings.dead_after {
        // Nothing is dead yet from this leader's point of view.
    } else {
        for r in &ranges {
            let dead_members = placement::dead_members(&r.value, &records, now, dead_after);
            let live_voter = r
                .value
                .members
                .iter()
                .any(|m| m.role == MemberRole::VOTER && !dead_members.contains(&m.node));
            for dead in dead_members {
                if dead == seed.id {
                    continue;
                }
                let voter = r
                    .value
                    .members
                    .iter()
                    .any(|m| m.node == dead && m.role == MemberRole::VOTER);
                if voter && live_voter && r.value.id != META_RANGE {
                    // A KV range's dead voter is demoted: the range's leader takes it out of
                    // the cell, then out of meta (so "not listed" implies "not a voter").
                    let txn =
                        ops::set_role(r, dead, MemberRole::LEARNER).map_err(|e| e.to_string())?;
                    let res = seed
                        .propose_local(&txn)
                        .await
                        .map_err(|e| format!("{e:?}"))?;
                    if res.succeeded {
                        tracing::info!(range = r.value.id, node = dead, "demoted dead voter");
                    }
                    return Ok(());
                }
                if !voter && live_voter && r.value.id != META_RANGE {
                    // A dead learner (or one demoted above): the range's leader takes it out.
                    continue;
                }
                let txn = ops::del_member(r, dead).map_err(|e| e.to_string())?;
                let res = seed
                    .propose_local(&txn)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                if res.succeeded {
                    tracing::info!(range = r.value.id, node = dead, "removed dead member");
                }
                return Ok(());
            }
        }
    }
    for n in &records {
        let txns = ops::refresh_member_addrs(&store_nodes, n).map_err(|e| e.to_string())?;
        if let Some(txn) = txns.first() {
            seed.propose_local(txn)
                .await
                .map_err(|e| format!("{e:?}"))?;
            return Ok(());
        }
    }
    let Some(range) = ranges.iter().find(|r| r.value.id == META_RANGE) else {
        return Ok(());
    };
    reconcile_cell(seed, META_CELL, range, st).await
}

/// Make cell `cell`'s membership (this node leads it) follow `range`'s descriptor: add
/// learners, promote them once caught up and record the promotion, remove members the
/// descriptor no longer lists. One change per call.
async fn reconcile_cell(
    seed: &Arc<Seed>,
    cell: harpoon::CellId,
    range: &meta::Versioned<meta::RangeDescriptor>,
    st: &harpoon::CellStatus,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let voters = &st.conf.voters;
    let learners = &st.conf.learners;
    if cell != META_CELL && seed.started.elapsed() >= seed.settings.dead_after {
        // Dead learners (meta's leader demotes dead voters to learners): out of the cell,
        // then out of meta.
        let records: Vec<_> = seed
            .read_meta(|s| view::nodes(s).unwrap_or_default())
            .into_iter()
            .map(|n| n.value)
            .collect();
        let dead_after = seed.settings.dead_after.as_millis() as u64;
        let dead = placement::dead_members(&range.value, &records, now_ms(), dead_after);
        if let Some(m) =
            range.value.members.iter().find(|m| {
                m.role == MemberRole::LEARNER && m.node != seed.id && dead.contains(&m.node)
            })
        {
            return take_out(seed, cell, range, m.node, voters, deadline).await;
        }
    }
    for m in range.value.members.iter() {
        let id = NodeId(m.node);
        if let Ok(a) = m.peer_addr.parse() {
            if m.node != seed.id && seed.transport.peer_address(id) != Some(a) {
                seed.transport.set_peer_address(id, a);
            }
        }
        if !voters.contains(&m.node) && !learners.contains(&m.node) {
            let r = seed.node.add_learner(cell, id, deadline).await;
            seed.counters
                .membership_changes
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(cell = cell.0, node = m.node, result = ?r.as_ref().err(), "add learner");
            if r.is_ok() {
                // Compacting to the applied index makes the next snapshot a fresh one whose
                // membership includes the learner (raft ignores a snapshot without itself).
                let _ = seed.node.compact_log(cell).await;
            }
            return Ok(());
        }
        if learners.contains(&m.node) {
            match seed.node.promote(cell, id, deadline).await {
                Ok(_) => {
                    seed.counters
                        .membership_changes
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(cell = cell.0, node = m.node, "promoted to voter");
                    seed.promoted.lock().note(cell.0, st.term, m.node);
                    return record_voter(seed, cell, range, m.node).await;
                }
                Err(harpoon::Error::NotCaughtUp { matched: 0, .. }) => {
                    // Still waiting for a first snapshot it can install: offer a fresh one.
                    let _ = seed.node.compact_log(cell).await;
                }
                Err(e) => tracing::debug!(node = m.node, error = %e, "promote"),
            }
            return Ok(());
        }
        if voters.contains(&m.node) && m.role == MemberRole::LEARNER {
            if cell == META_CELL || seed.promoted.lock().contains(cell.0, st.term, m.node) {
                return record_voter(seed, cell, range, m.node).await;
            }
            // A KV range voter that meta lists as a learner and that this leader did not
            // promote: the member asked to be demoted (its replica was lost), or an earlier
            // leader promoted it and never recorded it. Take it out of the cell, then out of
            // meta: a node meta no longer lists is out of the cell, so it may start over as
            // an empty replica without ever being counted as a voter with an empty log.
            return take_out(seed, cell, range, m.node, voters, deadline).await;
        }
    }
    let listed = |n: &u64| range.value.members.iter().any(|m| m.node == *n);
    for n in voters.iter().chain(learners.iter()) {
        if listed(n) {
            continue;
        }
        if *n == seed.id {
            // This leader was dropped from the descriptor: hand over first.
            if let Some(to) = voters.iter().copied().find(|v| *v != seed.id && listed(v)) {
                let _ = seed.node.transfer_leader(cell, NodeId(to), deadline).await;
            }
            return Ok(());
        }
        // A promotion of it not recorded yet is void: meta dropped it (a lost learner asks
        // for that), and if it is listed again it is a new, empty replica.
        seed.promoted.lock().recorded(cell.0, *n);
        let r = seed.node.remove(cell, NodeId(*n), deadline).await;
        seed.counters
            .membership_changes
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(cell = cell.0, node = n, result = ?r.as_ref().err(), "removed from the cell");
        return Ok(());
    }
    Ok(())
}

/// Record in meta that `node` is a voter of `range` (promoted in the cell).
async fn record_voter(
    seed: &Arc<Seed>,
    cell: CellId,
    range: &meta::Versioned<meta::RangeDescriptor>,
    node: u64,
) -> Result<(), String> {
    let txn = ops::set_role(range, node, MemberRole::VOTER).map_err(|e| e.to_string())?;
    let r = seed
        .propose_anywhere(&txn)
        .await
        .map_err(|e| format!("{e:?}"))?;
    if r.succeeded {
        seed.promoted.lock().recorded(cell.0, node);
    }
    Ok(())
}

/// Take `node` out of cell `cell` (this node leads it), then out of `range` in meta (the
/// record is re-read and retried on a concurrent change). This leader itself hands its
/// leadership over first.
async fn take_out(
    seed: &Arc<Seed>,
    cell: CellId,
    range: &meta::Versioned<meta::RangeDescriptor>,
    node: u64,
    voters: &[u64],
    deadline: Instant,
) -> Result<(), String> {
    let listed = |n: &u64| range.value.members.iter().any(|m| m.node == *n);
    if node == seed.id {
        let others = voters
            .iter()
            .copied()
            .find(|v| *v != seed.id && listed(v) && !listed_as_learner(range, *v));
        if let Some(to) = others {
            let _ = seed.node.transfer_leader(cell, NodeId(to), deadline).await;
        }
        return Ok(());
    }
    if voters.contains(&node) || cell_learner(seed, cell, node).await {
        let r = seed.node.remove(cell, NodeId(node), deadline).await;
        seed.counters
            .membership_changes
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(cell = cell.0, node, result = ?r.as_ref().err(), "demoted member taken out of the cell");
        r.map_err(|e| format!("remove {node} from the cell: {e}"))?;
    }
    let id = range.value.id;
    let out = seed
        .propose_retrying(5, Duration::from_millis(50), |s| {
            let Some(cur) = view::range_by_id(s, id).ok().flatten() else {
                return Ok(Attempt::Done(false));
            };
            if !cur.value.members.iter().any(|m| m.node == node) {
                return Ok(Attempt::Done(false));
            }
            ops::del_member(&cur, node).map(|t| Attempt::Propose(t, true))
        })
        .await
        .map_err(|e| {
            format!(
                "{node} out of cell {} but not out of meta: {}",
                cell.0,
                retry_error(e)
            )
        })?;
    if out {
        tracing::info!(range = id, node, "member out of the cell, now out of meta");
    }
    Ok(())
}

fn listed_as_learner(range: &meta::Versioned<meta::RangeDescriptor>, node: u64) -> bool {
    range
        .value
        .members
        .iter()
        .any(|m| m.node == node && m.role == MemberRole::LEARNER)
}

async fn cell_learner(seed: &Arc<Seed>, cell: CellId, node: u64) -> bool {
    seed.node
        .status(cell)
        .await
        .is_ok_and(|st| st.conf.learners.contains(&node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coll(id: u64) -> CollectionDescriptor {
        let mut c = CollectionDescriptor::new();
        c.id = id;
        c.prefix = keys::collection_prefix(id).into();
        c
    }

    fn rec(lo: &[u8], hi: &[u8]) -> RangeDescriptor {
        let mut r = RangeDescriptor::new();
        r.lo = lo.to_vec().into();
        r.hi = hi.to_vec().into();
        r
    }

    fn key(c: &CollectionDescriptor, k: &[u8]) -> Vec<u8> {
        let mut v = c.prefix.to_vec();
        v.extend_from_slice(k);
        v
    }

    #[test]
    fn revision_ring_compacts_what_is_older_than_the_retention() {
        let mut r = RevisionRing::default();
        assert_eq!(r.due(10_000, 1_000), None);
        r.record(1_000, 5);
        r.record(1_500, 5); // unchanged revision: the first time it was seen counts
        r.record(2_000, 9);
        r.record(3_000, 12);
        assert_eq!(r.len(), 3);
        assert_eq!(r.due(2_999, 1_000), Some(5));
        assert_eq!(r.due(3_000, 1_000), Some(9));
        assert_eq!(r.due(3_500, 1_000), None);
        assert_eq!(r.due(4_000, 1_000), Some(12));
        assert!(r.is_empty());
        // Full: thinned, never losing the newest sample.
        for i in 0..(RING_SAMPLES as u64 * 3) {
            r.record(10_000 + i, 100 + i);
        }
        assert!(r.len() <= RING_SAMPLES);
        let newest = 100 + RING_SAMPLES as u64 * 3 - 1;
        assert_eq!(r.due(u64::MAX / 2, 0), Some(newest));
    }

    #[test]
    fn store_bounds_match_meta_only_without_a_pending_split() {
        let c = coll(5);
        let end = keys::prefix_end(&c.prefix).unwrap();
        let (m, z) = (key(&c, b"m"), key(&c, b"z"));
        let whole = rec(&c.prefix, &end);
        // The first range's store is unbounded: its ends are the collection's.
        let unbounded = Bounds::default();
        assert!(same_bounds(&unbounded, &whole, &c));
        // After the split applied here, meta still shows the parent's old bounds: pending.
        let left = Bounds {
            lo: Bytes::new(),
            hi: Some(m.clone().into()),
        };
        assert!(!same_bounds(&left, &whole, &c));
        assert!(same_bounds(&left, &rec(&c.prefix, &m), &c));
        // The daughter: [m, unbounded) matches [m, end) once recorded.
        let right = Bounds {
            lo: m.clone().into(),
            hi: None,
        };
        assert!(same_bounds(&right, &rec(&m, &end), &c));
        assert!(!same_bounds(&right, &rec(&m, &z), &c));
        let inner = Bounds {
            lo: m.clone().into(),
            hi: Some(z.clone().into()),
        };
        assert!(same_bounds(&inner, &rec(&m, &z), &c));
        assert!(!same_bounds(&inner, &rec(&c.prefix, &z), &c));
    }
}
