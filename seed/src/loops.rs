//! The node's background loops.
//!
//! - **subscribe**: without a meta replica, long-poll `WatchMeta` at a meta member (or a
//!   seed, following redirects) and keep the view; with one, the replica is the view.
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
//!   daughter's id in meta, propose the admin Split entry (see [`crate::ranges`]), wait until
//!   it applied here, record the split in meta (`RecordSplit`, compare-and-swap). Repair: the
//!   leader of a daughter that meta does not list records its split from the parent's record
//!   while that still covers it (the parent's leader failed between apply and record).

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

use crate::node::{now_ms, Refusal, Seed, META_CELL};

/// Spawn every loop.
pub fn spawn_all(seed: &Arc<Seed>) -> JoinSet<()> {
    let mut set = JoinSet::new();
    set.spawn(subscribe(seed.clone()));
    set.spawn(heartbeat(seed.clone()));
    set.spawn(assign(seed.clone()));
    set.spawn(reconcile(seed.clone()));
    set.spawn(split(seed.clone()));
    set
}

/// How often a range's leader checks whether to split it.
pub const SPLIT_CHECK: Duration = Duration::from_secs(1);

async fn split(seed: Arc<Seed>) {
    loop {
        tokio::time::sleep(jitter(SPLIT_CHECK)).await;
        if seed.draining.load(Ordering::Relaxed) || !seed.meta_known() {
            continue;
        }
        for id in seed.ranges.ids() {
            if let Err(e) = split_check(&seed, id).await {
                tracing::info!(range = id, error = %e, "split not done");
            }
        }
    }
}

/// Whether the store's bounds are exactly the range's record (the first range of a
/// collection has an unbounded store: its ends are the collection's).
pub fn same_bounds(store: &Bounds, rec: &RangeDescriptor, coll: &CollectionDescriptor) -> bool {
    let lo = store.lo == rec.lo || (store.lo.is_empty() && rec.lo == coll.prefix);
    let hi = match &store.hi {
        Some(h) => *h == rec.hi,
        None => keys::prefix_end(&coll.prefix).is_some_and(|e| e == rec.hi.as_ref()),
    };
    lo && hi
}

async fn split_check(seed: &Arc<Seed>, id: u64) -> Result<(), String> {
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
    let (rec, coll) = seed.read_meta(|s| {
        let rec = view::range_by_id(s, id).ok().flatten();
        let coll = view::collections(s)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.value.id == local.collection)
            .map(|c| c.value);
        (rec, coll)
    });
    let Some(coll) = coll else {
        return Ok(());
    };
    let bounds = local.reader.bounds();
    let Some(rec) = rec else {
        if local.parent != 0 {
            return repair_record(seed, &local.reader.bounds(), local.parent, id).await;
        }
        return Ok(());
    };
    if !same_bounds(&bounds, &rec.value, &coll)
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
    if at.as_ref() <= rec.value.lo.as_ref()
        || at.as_ref() >= rec.value.hi.as_ref()
        || at <= bounds.lo
        || !bounds.contains(&at)
    {
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
    let deadline = Instant::now() + Duration::from_secs(5);
    let reply = seed
        .node
        .propose_by(cell, data, deadline)
        .await
        .map_err(|e| format!("split entry: {e}"))?;
    if let Some(b) = reply.response {
        let r = proto::kvpb::Response::parse_from_carllerche_bytes(&b)
            .map_err(|e| format!("split reply: {e}"))?;
        if r.has_error() {
            return Err(format!("split refused: {}", r.get_error().why));
        }
    }
    let applied = Instant::now();
    // Async mode answers before applying: wait until the split applied here.
    let want = Some(at.clone());
    let ok = cli_wait(Duration::from_secs(5), || local.reader.bounds().hi == want).await;
    if !ok {
        return Err("split entry not applied here in 5 s".into());
    }
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

async fn cli_wait(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn reserve_range_id(seed: &Arc<Seed>) -> Result<u64, String> {
    let mut last = String::new();
    for attempt in 0..5u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
        }
        let (id, txn) = seed
            .read_meta(ops::reserve_range_id)
            .map_err(|e| e.to_string())?;
        match seed.propose_anywhere(&txn).await {
            Ok(r) if r.succeeded => return Ok(id),
            Ok(_) => last = "range counter changed concurrently".into(),
            Err(e) => last = format!("{e:?}"),
        }
    }
    Err(format!("cannot reserve a range id: {last}"))
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
    let mut last = String::new();
    for attempt in 0..8u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
        }
        let built = seed.read_meta(|s| -> Result<Option<_>, MetaError> {
            if view::range_by_id(s, daughter)?.is_some() {
                return Ok(None);
            }
            let Some(p) = view::range_by_id(s, parent)? else {
                return Err(MetaError::InvalidArgument {
                    field: "parent",
                    why: format!("range {parent} unknown to meta"),
                });
            };
            ops::record_split(s, &p, at, daughter).map(Some)
        });
        let txn = match built {
            Ok(None) => return Ok(()),
            Ok(Some(t)) => t,
            // This node's meta may lag the reservation (or the parent's last change): read
            // again. A split key outside the parent's record will not get better.
            Err(e @ MetaError::SplitOutsideRange { .. }) => return Err(e.to_string()),
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match seed.propose_anywhere(&txn).await {
            Ok(r) if r.succeeded => return Ok(()),
            Ok(_) => last = "parent record changed concurrently".into(),
            Err(e) => last = format!("{e:?}"),
        }
    }
    Err(format!(
        "split of {parent} into {daughter} not recorded: {last}"
    ))
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
        let coll = view::collections(s)
            .ok()?
            .into_iter()
            .find(|c| c.value.id == p.value.collection)?
            .value;
        let hi_ok = match &bounds.hi {
            Some(h) => *h == p.value.hi,
            None => keys::prefix_end(&coll.prefix).is_some_and(|e| e == p.value.hi.as_ref()),
        };
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
    let mut targets: Vec<SocketAddr> = Vec::new();
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
        if targets.is_empty() {
            targets = seed.read_meta(|s| {
                view::range_by_id(s, META_RANGE)
                    .ok()
                    .flatten()
                    .map(|r| {
                        r.value
                            .members
                            .iter()
                            .filter_map(|m| m.peer_addr.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default()
            });
            targets.extend(seed.settings.seeds.iter().copied());
            targets.retain(|a| *a != seed.peer_addr);
            if targets.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        let target = targets.remove(0);
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
                    targets.insert(0, target);
                }
                Err(e) => tracing::warn!(%target, error = %e, "bad meta view"),
            },
            Ok(ControlResponse_oneof_kind::error(e)) => {
                if e.code == ControlError_Code::NOT_LEADER {
                    for r in e.redirect.iter().rev() {
                        if let Ok(a) = r.parse::<SocketAddr>() {
                            if a != seed.peer_addr && !targets.contains(&a) {
                                targets.insert(0, a);
                            }
                        }
                    }
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
    loop {
        tokio::time::sleep(jitter(seed.settings.heartbeat / 2)).await;
        if seed.draining.load(Ordering::Relaxed) || !seed.meta_known() {
            continue;
        }
        assign_meta(&seed).await;
        assign_ranges(&seed).await;
    }
}

/// Claim one slot of an under-replicated KV range (compare-and-swap into its descriptor),
/// then open the replica: the range's first member bootstraps its cell alone; later ones
/// open an empty replica that the range's leader adds as a learner and fills by snapshot.
/// Also reopens a range this node is listed in but does not hold.
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
    let Some(target) = claim.first() else {
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

async fn assign_meta(seed: &Arc<Seed>) {
    let (range, nodes) = seed.read_meta(|s| {
        (
            view::range_by_id(s, META_RANGE).ok().flatten(),
            view::nodes(s).unwrap_or_default(),
        )
    });
    let Some(range) = range else { return };
    let me_member = range.value.members.iter().any(|m| m.node == seed.id);
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
    for id in seed.ranges.ids() {
        let cell = harpoon::CellId(id);
        let Ok(st) = seed.node.status(cell).await else {
            continue;
        };
        if st.role != Role::Leader {
            continue;
        }
        let Some(range) = seed.read_meta(|s| view::range_by_id(s, id).ok().flatten()) else {
            continue;
        };
        if let Err(e) = reconcile_cell(seed, cell, &range, &st).await {
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
            for dead in placement::dead_members(&r.value, &records, now, dead_after) {
                if dead == seed.id {
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
            let txn = ops::set_role(range, m.node, MemberRole::VOTER).map_err(|e| e.to_string())?;
            seed.propose_anywhere(&txn)
                .await
                .map_err(|e| format!("{e:?}"))?;
            return Ok(());
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
        let r = seed.node.remove(cell, NodeId(*n), deadline).await;
        seed.counters
            .membership_changes
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(cell = cell.0, node = n, result = ?r.as_ref().err(), "removed from the cell");
        return Ok(());
    }
    Ok(())
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
