//! The meta operations, each a function from what was read to a guarded [`Txn`].
//!
//! Every txn carries compares on the exact records (and counters) it was derived from, so a
//! txn built from a stale read fails as a whole; the caller re-reads and retries. Two nodes
//! racing for the last slot of a range both read the same `mod_revision`: one txn applies and
//! bumps it, the other's compare fails.

use proto::metapb::{
    CollectionDescriptor, CollectionKind, Member, MemberRole, NodeRecord, Persistence,
    RangeDescriptor, ReplicationMode, Txn,
};
use protobuf::Message;

use crate::error::MetaError;
use crate::keys;
use crate::store::{txn, MetaStore};
use crate::view::{self, Versioned};
use crate::{META_COLLECTION, META_RANGE};

fn enc<M: Message>(m: &M) -> Vec<u8> {
    // Encoding an in-memory message into a Vec cannot fail (no size limit, no I/O).
    m.write_to_bytes().unwrap_or_default()
}

fn counter(s: &MetaStore, key: &[u8]) -> Result<(u64, u64), MetaError> {
    match s.get(key) {
        None => Ok((0, 0)),
        Some(e) => {
            let v = keys::parse_counter(&e.value).ok_or_else(|| MetaError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                why: "counter is not 8 bytes".into(),
            })?;
            Ok((v, e.mod_revision))
        }
    }
}

/// CreateMeta: the meta collection and range 1 with `node` as its only (voter) member.
/// Guarded on meta being absent.
///
/// # Errors
/// [`MetaError::MetaExists`] if the store already holds meta.
pub fn create_meta(s: &MetaStore, node: &NodeRecord, rf: u32) -> Result<Txn, MetaError> {
    if view::meta_exists(s) {
        return Err(MetaError::MetaExists);
    }
    if rf == 0 {
        return Err(MetaError::InvalidArgument {
            field: "replication_factor",
            why: "must be at least 1".into(),
        });
    }
    let prefix = keys::collection_prefix(META_COLLECTION);
    let hi = keys::prefix_end(&prefix).unwrap_or_default();
    let mut c = CollectionDescriptor::new();
    c.id = META_COLLECTION;
    c.name = keys::META_NAME.into();
    c.prefix = prefix.clone().into();
    c.kind = CollectionKind::KV;
    c.persistence = Persistence::LOGGED;
    c.replication = ReplicationMode::CONSENSUS;
    c.replication_factor = rf;
    let mut r = RangeDescriptor::new();
    r.id = META_RANGE;
    r.collection = META_COLLECTION;
    r.lo = prefix.into();
    r.hi = hi.clone().into();
    r.epoch = 1;
    r.target_replication_factor = rf;
    r.members.push(member_of(node, MemberRole::VOTER));
    let mut t = Txn::new();
    let ckey = keys::collection(keys::META_NAME);
    txn::version_is(&mut t, &ckey, 0);
    txn::put(&mut t, &ckey, enc(&c));
    txn::put(&mut t, &keys::range(&hi), enc(&r));
    txn::put(
        &mut t,
        keys::COUNTER_COLLECTION,
        keys::counter_value(META_COLLECTION),
    );
    txn::put(&mut t, keys::COUNTER_RANGE, keys::counter_value(META_RANGE));
    put_node_into(&mut t, s, node)?;
    Ok(t)
}

/// A member entry for `node` with `role`.
pub fn member_of(node: &NodeRecord, role: MemberRole) -> Member {
    let mut m = Member::new();
    m.node = node.id;
    m.peer_addr = node.peer_addr.clone();
    m.client_addr = node.client_addr.clone();
    m.role = role;
    m
}

/// What CreateCollection needs besides the name.
#[derive(Debug, Clone)]
pub struct CollectionSpec {
    pub name: String,
    pub kind: CollectionKind,
    pub persistence: Persistence,
    pub replication: ReplicationMode,
    pub replication_factor: u32,
    pub split_size: u64,
    pub retention_secs: u64,
}

/// Longest collection name.
pub const MAX_NAME: usize = 64;

/// CreateCollection: a descriptor with a fresh id and prefix, and one range covering the
/// whole prefix with no members yet (filled by self-assignment). Returns the descriptor the
/// txn writes and the txn.
///
/// # Errors
/// Invalid arguments, or [`MetaError::CollectionExists`].
pub fn create_collection(
    s: &MetaStore,
    spec: &CollectionSpec,
) -> Result<(CollectionDescriptor, Txn), MetaError> {
    let name = &spec.name;
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(MetaError::InvalidArgument {
            field: "name",
            why: format!("1 to {MAX_NAME} characters of [a-z0-9_-]"),
        });
    }
    if !(1..=15).contains(&spec.replication_factor) {
        return Err(MetaError::InvalidArgument {
            field: "replication_factor",
            why: "must be between 1 and 15".into(),
        });
    }
    if spec.split_size == 0 {
        return Err(MetaError::InvalidArgument {
            field: "split_size",
            why: "must be positive".into(),
        });
    }
    let ckey = keys::collection(name);
    if s.get(&ckey).is_some() {
        return Err(MetaError::CollectionExists(name.clone()));
    }
    let (last_c, c_rev) = counter(s, keys::COUNTER_COLLECTION)?;
    let (last_r, r_rev) = counter(s, keys::COUNTER_RANGE)?;
    let id = last_c + 1;
    let prefix = keys::collection_prefix(id);
    let hi = keys::prefix_end(&prefix).ok_or(MetaError::InvalidArgument {
        field: "name",
        why: "collection ids exhausted".into(),
    })?;
    let mut c = CollectionDescriptor::new();
    c.id = id;
    c.name = name.clone();
    c.prefix = prefix.clone().into();
    c.kind = spec.kind;
    c.persistence = spec.persistence;
    c.replication = spec.replication;
    c.replication_factor = spec.replication_factor;
    c.split_size = spec.split_size;
    c.retention_secs = spec.retention_secs;
    let mut r = RangeDescriptor::new();
    r.id = last_r + 1;
    r.collection = id;
    r.lo = prefix.into();
    r.hi = hi.clone().into();
    r.epoch = 1;
    r.target_replication_factor = spec.replication_factor;
    let mut t = Txn::new();
    txn::version_is(&mut t, &ckey, 0);
    txn::mod_revision_is(&mut t, keys::COUNTER_COLLECTION, c_rev);
    txn::mod_revision_is(&mut t, keys::COUNTER_RANGE, r_rev);
    txn::put(&mut t, &ckey, enc(&c));
    txn::put(&mut t, &keys::range(&hi), enc(&r));
    txn::put(&mut t, keys::COUNTER_COLLECTION, keys::counter_value(id));
    txn::put(&mut t, keys::COUNTER_RANGE, keys::counter_value(r.id));
    Ok((c, t))
}

/// ReserveRangeId: allocate the next range id (a split's daughter), guarded on the range
/// counter's mod revision: two reservations built from the same read cannot both win, so a
/// reserved id is never handed out twice. Returns the id and the txn.
///
/// # Errors
/// [`MetaError::Corrupt`] if the counter does not decode; `InvalidArgument` if ids ran out.
pub fn reserve_range_id(s: &MetaStore) -> Result<(u64, Txn), MetaError> {
    let (last, rev) = counter(s, keys::COUNTER_RANGE)?;
    let id = last.checked_add(1).ok_or(MetaError::InvalidArgument {
        field: "range",
        why: "range ids exhausted".into(),
    })?;
    let mut t = Txn::new();
    txn::mod_revision_is(&mut t, keys::COUNTER_RANGE, rev);
    txn::put(&mut t, keys::COUNTER_RANGE, keys::counter_value(id));
    Ok((id, t))
}

/// RecordSplit: the split of `parent` at `at` into the daughter range `daughter` (an id
/// reserved by [`reserve_range_id`]), applied by the range's replicas, is recorded: the left
/// half keeps the parent's id as `[lo, at)` under the new key `range/<at>`, the daughter is
/// `[at, hi)` under the parent's old key `range/<hi>`; both have the parent's members and
/// epoch + 1. Guarded on the parent record (a stale read, or a second recorder of the same
/// split, fails as a whole) and on `range/<at>` being absent.
///
/// # Errors
/// [`MetaError::SplitOutsideRange`] unless `lo < at < hi`; `InvalidArgument` when `daughter`
/// is the parent, was never reserved, or already has a record.
pub fn record_split(
    s: &MetaStore,
    parent: &Versioned<RangeDescriptor>,
    at: &[u8],
    daughter: u64,
) -> Result<Txn, MetaError> {
    let p = &parent.value;
    if !(p.lo.as_ref() < at && at < p.hi.as_ref()) {
        return Err(MetaError::SplitOutsideRange { range: p.id });
    }
    let (last_r, _) = counter(s, keys::COUNTER_RANGE)?;
    if daughter == p.id || daughter == 0 || daughter > last_r {
        return Err(MetaError::InvalidArgument {
            field: "daughter",
            why: format!(
                "range id {daughter} was not reserved for a split of {}",
                p.id
            ),
        });
    }
    if view::range_by_id(s, daughter)?.is_some() {
        return Err(MetaError::InvalidArgument {
            field: "daughter",
            why: format!("range {daughter} is already recorded"),
        });
    }
    let mut left = p.clone();
    left.hi = at.to_vec().into();
    left.epoch = p.epoch + 1;
    let mut right = p.clone();
    right.id = daughter;
    right.lo = at.to_vec().into();
    right.epoch = p.epoch + 1;
    let left_key = keys::range(at);
    let mut t = Txn::new();
    txn::mod_revision_is(&mut t, &parent.key, parent.mod_revision);
    txn::version_is(&mut t, &left_key, 0);
    txn::put(&mut t, &left_key, enc(&left));
    txn::put(&mut t, &parent.key, enc(&right));
    Ok(t)
}

fn rewrite(range: &Versioned<RangeDescriptor>, new: &RangeDescriptor) -> Txn {
    let mut t = Txn::new();
    txn::mod_revision_is(&mut t, &range.key, range.mod_revision);
    txn::put(&mut t, &range.key, enc(new));
    t
}

/// AddMember: `member` joins `range` (normally as a learner), epoch + 1. Guarded on the
/// range record, so of several nodes racing for one slot exactly one wins.
///
/// # Errors
/// [`MetaError::AlreadyMember`], or [`MetaError::RangeFull`] when the range already has its
/// target number of members.
pub fn add_member(range: &Versioned<RangeDescriptor>, member: Member) -> Result<Txn, MetaError> {
    let r = &range.value;
    if r.members.iter().any(|m| m.node == member.node) {
        return Err(MetaError::AlreadyMember {
            range: r.id,
            node: member.node,
        });
    }
    if r.members.len() >= r.target_replication_factor as usize {
        return Err(MetaError::RangeFull {
            range: r.id,
            members: r.members.len(),
            target: r.target_replication_factor,
        });
    }
    let mut new = r.clone();
    new.members.push(member);
    new.epoch += 1;
    Ok(rewrite(range, &new))
}

/// DelMember: `node` leaves `range`, epoch + 1. Guarded on the range record.
///
/// # Errors
/// [`MetaError::NotMember`].
pub fn del_member(range: &Versioned<RangeDescriptor>, node: u64) -> Result<Txn, MetaError> {
    let r = &range.value;
    if !r.members.iter().any(|m| m.node == node) {
        return Err(MetaError::NotMember { range: r.id, node });
    }
    let mut new = r.clone();
    new.members.retain(|m| m.node != node);
    new.epoch += 1;
    Ok(rewrite(range, &new))
}

/// Record that `node`'s replica of `range` now has `role` (learner promoted to voter), epoch + 1.
///
/// # Errors
/// [`MetaError::NotMember`].
pub fn set_role(
    range: &Versioned<RangeDescriptor>,
    node: u64,
    role: MemberRole,
) -> Result<Txn, MetaError> {
    let r = &range.value;
    let mut new = r.clone();
    let Some(m) = new.members.iter_mut().find(|m| m.node == node) else {
        return Err(MetaError::NotMember { range: r.id, node });
    };
    m.role = role;
    new.epoch += 1;
    Ok(rewrite(range, &new))
}

fn put_node_into(t: &mut Txn, s: &MetaStore, rec: &NodeRecord) -> Result<(), MetaError> {
    let key = keys::node(rec.free, rec.id);
    match view::node(s, rec.id)? {
        Some(old) => {
            txn::mod_revision_is(t, &old.key, old.mod_revision);
            if old.key != key {
                txn::delete(t, &old.key);
                txn::version_is(t, &key, 0);
            }
        }
        None => txn::version_is(t, &key, 0),
    }
    txn::put(t, &key, enc(rec));
    Ok(())
}

/// Write (or refresh, as a heartbeat) a node record; it moves to a new key when its capacity
/// bucket changes. Guarded on the record read from `s`.
///
/// # Errors
/// [`MetaError::Corrupt`] if an existing record does not decode.
pub fn put_node(s: &MetaStore, rec: &NodeRecord) -> Result<Txn, MetaError> {
    let mut t = Txn::new();
    put_node_into(&mut t, s, rec)?;
    Ok(t)
}

/// Refresh the addresses kept in range members from the node's record (a node restarted on
/// other ports). Returns the txns for the ranges whose member entry changed.
///
/// # Errors
/// [`MetaError::Corrupt`] if a record does not decode.
pub fn refresh_member_addrs(s: &MetaStore, rec: &NodeRecord) -> Result<Vec<Txn>, MetaError> {
    let mut out = Vec::new();
    for r in view::ranges(s)? {
        if let Some(m) = r.value.members.iter().find(|m| m.node == rec.id) {
            if m.peer_addr != rec.peer_addr || m.client_addr != rec.client_addr {
                let mut new = r.value.clone();
                for m in new.members.iter_mut().filter(|m| m.node == rec.id) {
                    m.peer_addr = rec.peer_addr.clone();
                    m.client_addr = rec.client_addr.clone();
                }
                out.push(rewrite(&r, &new));
            }
        }
    }
    Ok(out)
}

/// Largest scratch key and value.
pub const MAX_SCRATCH_KEY: usize = 1024;
pub const MAX_SCRATCH_VALUE: usize = 64 << 10;

/// Put into the client scratch space (no guard).
///
/// # Errors
/// [`MetaError::InvalidArgument`] for an empty or oversized key or value.
pub fn scratch_put(key: &[u8], value: &[u8]) -> Result<Txn, MetaError> {
    if key.is_empty() || key.len() > MAX_SCRATCH_KEY {
        return Err(MetaError::InvalidArgument {
            field: "key",
            why: format!("1 to {MAX_SCRATCH_KEY} bytes"),
        });
    }
    if value.len() > MAX_SCRATCH_VALUE {
        return Err(MetaError::InvalidArgument {
            field: "value",
            why: format!("at most {MAX_SCRATCH_VALUE} bytes"),
        });
    }
    let mut t = Txn::new();
    txn::put(&mut t, &keys::scratch(key), value.to_vec());
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: u64) -> NodeRecord {
        let mut n = NodeRecord::new();
        n.id = id;
        n.peer_addr = format!("127.0.0.1:{}", 7000 + id);
        n.client_addr = format!("127.0.0.1:{}", 8000 + id);
        n.capacity = 1 << 30;
        n.free = 1 << 30;
        n
    }

    fn meta_store(rf: u32) -> MetaStore {
        let mut s = MetaStore::new();
        let t = create_meta(&s, &node(1), rf).unwrap();
        assert!(s.apply(&t).succeeded);
        s
    }

    fn meta_range(s: &MetaStore) -> Versioned<RangeDescriptor> {
        view::range_by_id(s, META_RANGE).unwrap().unwrap()
    }

    #[test]
    fn create_meta_once() {
        let s = meta_store(7);
        assert_eq!(create_meta(&s, &node(2), 7), Err(MetaError::MetaExists));
        let r = meta_range(&s);
        assert_eq!(r.value.members.len(), 1);
        assert_eq!(r.value.target_replication_factor, 7);
        assert!(view::node(&s, 1).unwrap().is_some());
        // The meta range is found by lookup of a meta-collection key.
        let k = keys::collection_prefix(META_COLLECTION);
        assert_eq!(view::lookup(&s, &k).unwrap().unwrap().value.id, META_RANGE);
    }

    #[test]
    fn members_fill_to_target_then_refuse() {
        let mut s = meta_store(3);
        for id in 2..=3 {
            let t = add_member(&meta_range(&s), member_of(&node(id), MemberRole::LEARNER)).unwrap();
            assert!(s.apply(&t).succeeded);
        }
        assert!(matches!(
            add_member(&meta_range(&s), member_of(&node(4), MemberRole::LEARNER)),
            Err(MetaError::RangeFull { .. })
        ));
        let t = del_member(&meta_range(&s), 2).unwrap();
        assert!(s.apply(&t).succeeded);
        assert_eq!(meta_range(&s).value.epoch, 4);
    }

    fn users(s: &mut MetaStore) -> CollectionDescriptor {
        let spec = CollectionSpec {
            name: "users".into(),
            kind: CollectionKind::KV,
            persistence: Persistence::PERSISTENT,
            replication: ReplicationMode::CONSENSUS,
            replication_factor: 3,
            split_size: 64 << 20,
            retention_secs: 0,
        };
        let (written, t) = create_collection(s, &spec).unwrap();
        assert!(s.apply(&t).succeeded);
        assert!(matches!(
            create_collection(s, &spec),
            Err(MetaError::CollectionExists(_))
        ));
        let stored = view::collection(s, "users").unwrap().unwrap().value;
        assert_eq!(stored, written);
        let by_id = view::collection_by_id(s, stored.id).unwrap().unwrap().value;
        assert_eq!(by_id, stored);
        assert!(view::collection_by_id(s, stored.id + 1).unwrap().is_none());
        stored
    }

    fn key(c: &CollectionDescriptor, k: &[u8]) -> Vec<u8> {
        let mut v = c.prefix.to_vec();
        v.extend_from_slice(k);
        v
    }

    fn reserve(s: &mut MetaStore) -> u64 {
        let (id, t) = reserve_range_id(s).unwrap();
        assert!(s.apply(&t).succeeded);
        id
    }

    #[test]
    fn record_split_keeps_members_and_tiles_the_parent() {
        let mut s = meta_store(3);
        let c = users(&mut s);
        let k = key(&c, b"m");
        let mut parent = view::lookup(&s, &k).unwrap().unwrap();
        let t = add_member(&parent, member_of(&node(2), MemberRole::VOTER)).unwrap();
        assert!(s.apply(&t).succeeded);
        parent = view::lookup(&s, &k).unwrap().unwrap();
        let d = reserve(&mut s);
        assert!(d > parent.value.id);
        assert!(
            s.apply(&record_split(&s, &parent, &k, d).unwrap())
                .succeeded
        );
        let left = view::lookup(&s, &c.prefix).unwrap().unwrap().value;
        let right = view::lookup(&s, &k).unwrap().unwrap().value;
        assert_eq!(
            left.id, parent.value.id,
            "the left half keeps the parent's id"
        );
        assert_eq!(right.id, d);
        assert_eq!(
            (left.lo.as_ref(), left.hi.as_ref()),
            (&c.prefix[..], &k[..])
        );
        assert_eq!(
            (right.lo.as_ref(), right.hi.as_ref()),
            (&k[..], parent.value.hi.as_ref())
        );
        assert_eq!(left.epoch, parent.value.epoch + 1);
        assert_eq!(right.epoch, parent.value.epoch + 1);
        assert_eq!(left.members, parent.value.members);
        assert_eq!(right.members, parent.value.members);
        // Split keys outside the (new) left half are refused.
        let d2 = reserve(&mut s);
        let left_v = view::lookup(&s, &c.prefix).unwrap().unwrap();
        assert!(matches!(
            record_split(&s, &left_v, &k, d2),
            Err(MetaError::SplitOutsideRange { .. })
        ));
        assert!(matches!(
            record_split(&s, &left_v, &c.prefix, 99),
            Err(MetaError::SplitOutsideRange { .. })
        ));
    }

    #[test]
    fn record_split_races_and_stale_parents_fail() {
        let mut s = meta_store(3);
        let c = users(&mut s);
        let k = key(&c, b"m");
        let parent = view::lookup(&s, &k).unwrap().unwrap();
        let d = reserve(&mut s);
        // Two recorders of the same split (the parent's leader and the daughter's repair),
        // both from the same read: exactly one applies.
        let a = record_split(&s, &parent, &k, d).unwrap();
        let b = record_split(&s, &parent, &k, d).unwrap();
        assert!(s.apply(&a).succeeded);
        assert!(!s.apply(&b).succeeded);
        // Once recorded, the daughter cannot be recorded again, even from a fresh read.
        let left = view::lookup(&s, &c.prefix).unwrap().unwrap();
        let k2 = key(&c, b"c");
        assert!(matches!(
            record_split(&s, &left, &k2, d),
            Err(MetaError::InvalidArgument { .. })
        ));
        // A split recorded from the stale parent read (another key, another id) fails whole.
        let d2 = reserve(&mut s);
        let stale = record_split(&s, &parent, &k2, d2).unwrap();
        let before = view::ranges(&s).unwrap().len();
        assert!(!s.apply(&stale).succeeded);
        assert_eq!(view::ranges(&s).unwrap().len(), before);
        // Ids never reserved, and the parent's own id, are refused.
        assert!(matches!(
            record_split(&s, &left, &k2, d2 + 10),
            Err(MetaError::InvalidArgument { .. })
        ));
        assert!(matches!(
            record_split(&s, &left, &k2, left.value.id),
            Err(MetaError::InvalidArgument { .. })
        ));
        assert!(
            s.apply(&record_split(&s, &left, &k2, d2).unwrap())
                .succeeded
        );
        assert_eq!(view::ranges(&s).unwrap().len(), before + 1);
    }

    #[test]
    fn racing_reservations_hand_out_distinct_ids() {
        let mut s = meta_store(3);
        let (a, ta) = reserve_range_id(&s).unwrap();
        let (b, tb) = reserve_range_id(&s).unwrap();
        assert_eq!(a, b, "both read the same counter");
        assert!(s.apply(&ta).succeeded);
        assert!(!s.apply(&tb).succeeded, "the second one's guard fails");
        let (c, tc) = reserve_range_id(&s).unwrap();
        assert_eq!(c, a + 1);
        assert!(s.apply(&tc).succeeded);
    }

    #[test]
    fn node_record_moves_with_its_bucket() {
        let mut s = meta_store(3);
        let mut n = node(1);
        n.free = 1 << 10;
        assert!(s.apply(&put_node(&s, &n).unwrap()).succeeded);
        let all = view::nodes(&s).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].value.free, 1 << 10);
    }

    proptest! {
        /// Any number of nodes racing for the free slots of a range, each with a txn built
        /// from the same read, applied in any order: exactly as many win as there were slots
        /// (one per read generation), never more than the target.
        #[test]
        fn racing_add_members_exactly_one_wins_per_read(
            racers in 2usize..8,
            order in proptest::collection::vec(any::<u8>(), 8),
        ) {
            let mut s = meta_store(7);
            let read = meta_range(&s);
            let mut txns: Vec<(u64, Txn)> = (0..racers as u64)
                .map(|i| (10 + i, add_member(&read, member_of(&node(10 + i), MemberRole::LEARNER)).unwrap()))
                .collect();
            // Shuffle by the generated order.
            for (i, o) in order.iter().enumerate() {
                let j = *o as usize % txns.len();
                let i = i % txns.len();
                txns.swap(i, j);
            }
            let winners: Vec<u64> = txns
                .iter()
                .filter_map(|(id, t)| s.apply(t).succeeded.then_some(*id))
                .collect();
            prop_assert_eq!(winners.len(), 1);
            let members: Vec<u64> = meta_range(&s).value.members.iter().map(|m| m.node).collect();
            prop_assert_eq!(members, vec![1, winners[0]]);
        }
    }
}
