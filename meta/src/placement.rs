//! Placement: which under-replicated range a node should claim.
//!
//! Every node runs the same ranking on its view of meta; a node claims a range only if it is
//! among the best `deficit` candidates for it, so a healthy cluster rarely races. Races that
//! do happen (views differ) are settled by the compare-and-swap of `ops::add_member`.
//!
//! Ranking of candidates for a range (best first): alive, not already a member, some free
//! capacity; then nodes whose zone is not yet among the members; then larger capacity bucket;
//! then smaller id (deterministic).

use proto::metapb::{NodeRecord, RangeDescriptor};

use crate::keys;
use crate::view::is_alive;

/// Candidates for one more replica of `range`, best first.
pub fn candidates<'a>(
    range: &RangeDescriptor,
    nodes: &'a [NodeRecord],
    now_ms: u64,
    dead_after_ms: u64,
) -> Vec<&'a NodeRecord> {
    let member_zones: Vec<&str> = range
        .members
        .iter()
        .filter_map(|m| nodes.iter().find(|n| n.id == m.node))
        .map(|n| n.zone.as_str())
        .collect();
    let mut c: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| n.free > 0 && is_alive(n, now_ms, dead_after_ms))
        .filter(|n| !range.members.iter().any(|m| m.node == n.id))
        .collect();
    c.sort_by_key(|n| {
        (
            member_zones.contains(&n.zone.as_str()),
            std::cmp::Reverse(keys::capacity_bucket(n.free)),
            n.id,
        )
    });
    c
}

/// The ranges `me` should try to join now: under their target, and `me` ranks within the
/// first `deficit` candidates. Most under-replicated first.
pub fn claimable<'a>(
    me: u64,
    ranges: &'a [RangeDescriptor],
    nodes: &[NodeRecord],
    now_ms: u64,
    dead_after_ms: u64,
) -> Vec<&'a RangeDescriptor> {
    let mut out: Vec<(usize, &RangeDescriptor)> = ranges
        .iter()
        .filter_map(|r| {
            let deficit = (r.target_replication_factor as usize).checked_sub(r.members.len())?;
            if deficit == 0 {
                return None;
            }
            let c = candidates(r, nodes, now_ms, dead_after_ms);
            c.iter()
                .take(deficit)
                .any(|n| n.id == me)
                .then_some((deficit, r))
        })
        .collect();
    out.sort_by_key(|(d, r)| (std::cmp::Reverse(*d), r.id));
    out.into_iter().map(|(_, r)| r).collect()
}

/// Members of `range` whose node is dead or unknown (to be removed with `ops::del_member`).
pub fn dead_members(
    range: &RangeDescriptor,
    nodes: &[NodeRecord],
    now_ms: u64,
    dead_after_ms: u64,
) -> Vec<u64> {
    range
        .members
        .iter()
        .filter(|m| {
            !nodes
                .iter()
                .any(|n| n.id == m.node && is_alive(n, now_ms, dead_after_ms))
        })
        .map(|m| m.node)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::metapb::Member;

    fn node(id: u64, zone: &str, free: u64, hb: u64) -> NodeRecord {
        let mut n = NodeRecord::new();
        n.id = id;
        n.zone = zone.into();
        n.free = free;
        n.capacity = free;
        n.last_heartbeat_ms = hb;
        n
    }

    fn range(target: u32, members: &[u64]) -> RangeDescriptor {
        let mut r = RangeDescriptor::new();
        r.id = 1;
        r.target_replication_factor = target;
        for m in members {
            let mut x = Member::new();
            x.node = *m;
            r.members.push(x);
        }
        r
    }

    #[test]
    fn prefers_new_zones_then_capacity_and_skips_dead() {
        let nodes = vec![
            node(1, "a", 100, 1000),
            node(2, "a", 1 << 20, 1000),
            node(3, "b", 10, 1000),
            node(4, "c", 1 << 30, 0),
            node(5, "d", 0, 1000),
        ];
        let r = range(3, &[1]);
        let c: Vec<u64> = candidates(&r, &nodes, 1000, 500)
            .iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(c, vec![3, 2]);
        let rs = [r];
        assert_eq!(claimable(3, &rs, &nodes, 1000, 500).len(), 1);
        assert_eq!(claimable(2, &rs, &nodes, 1000, 500).len(), 1);
        assert!(claimable(4, &rs, &nodes, 1000, 500).is_empty());
        assert_eq!(
            dead_members(&range(3, &[1, 4, 9]), &nodes, 1000, 500),
            vec![4, 9]
        );
    }

    #[test]
    fn full_range_is_not_claimable() {
        let nodes = vec![node(1, "a", 1, 0), node(2, "a", 1, 0)];
        let rs = [range(1, &[1])];
        assert!(claimable(2, &rs, &nodes, 0, 10).is_empty());
    }
}
