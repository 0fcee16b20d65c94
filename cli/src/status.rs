//! `quiver status`: nodes (address, zone, capacity, alive) and ranges (collection, members,
//! leader, under-replicated or not), as a table or JSON. Meta records no range leaders: each
//! range's leader is what the replicas of every reachable node report (the highest term in
//! which a replica says it leads). A range's collection is shown by name, or by id when the
//! answering node sent no collections (a node older than `StatusReply.collections`).

use std::collections::HashMap;

use std::net::SocketAddr;
use std::time::Duration;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use meta::{CollectionDescriptor, MemberRole};
use proto::clientpb::StatusReply;
use proto::metapb::CollectionKind;
use serde::Serialize;

use crate::CliError;

/// `quiver status` takes the client commands' seeds and output flags.
pub use crate::kv::ClientArgs as StatusArgs;

/// One node in the status.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    pub zone: String,
    pub capacity: u64,
    pub free: u64,
    pub alive: bool,
    pub heartbeat_age_ms: u64,
}

/// One member of a range.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub node: u64,
    pub role: String,
}

/// One range in the status.
#[derive(Debug, Clone, Serialize)]
pub struct RangeStatus {
    pub id: u64,
    pub collection: u64,
    /// The collection's name; `None` when the answer named no collection with this id.
    pub collection_name: Option<String>,
    /// The collection's kind (`kv`, `log`, `object`, `timeseries`), when named.
    pub collection_kind: Option<String>,
    pub epoch: u64,
    pub members: Vec<MemberStatus>,
    pub voters: usize,
    pub target: u32,
    /// The leader (see [`ClusterStatus::add_leaders`]); `None` when no reachable replica
    /// leads it.
    pub leader: Option<u64>,
    /// The term it leads in.
    pub leader_term: Option<u64>,
    pub under_replicated: bool,
}

/// The whole status.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub answered_by: u64,
    pub meta_revision: u64,
    pub nodes: Vec<NodeStatus>,
    pub ranges: Vec<RangeStatus>,
}

impl ClusterStatus {
    /// Interpret a node's status reply.
    pub fn from_reply(s: &StatusReply) -> Self {
        let nodes = s
            .nodes
            .iter()
            .map(|n| {
                let age = s.now_ms.saturating_sub(n.last_heartbeat_ms);
                NodeStatus {
                    id: n.id,
                    client_addr: n.client_addr.clone(),
                    peer_addr: n.peer_addr.clone(),
                    zone: n.zone.clone(),
                    capacity: n.capacity,
                    free: n.free,
                    alive: age <= s.dead_after_ms,
                    heartbeat_age_ms: age,
                }
            })
            .collect();
        let collections: HashMap<u64, &CollectionDescriptor> =
            s.collections.iter().map(|c| (c.id, c)).collect();
        let ranges = s
            .ranges
            .iter()
            .map(|r| {
                let coll = collections.get(&r.collection);
                let voters = r
                    .members
                    .iter()
                    .filter(|m| m.role == MemberRole::VOTER)
                    .count();
                RangeStatus {
                    id: r.id,
                    collection: r.collection,
                    collection_name: coll.map(|c| c.name.clone()),
                    collection_kind: coll.map(|c| kind_name(c.kind).to_string()),
                    epoch: r.epoch,
                    members: r
                        .members
                        .iter()
                        .map(|m| MemberStatus {
                            node: m.node,
                            role: match m.role {
                                MemberRole::VOTER => "voter".into(),
                                MemberRole::LEARNER => "learner".into(),
                            },
                        })
                        .collect(),
                    voters,
                    target: r.target_replication_factor,
                    leader: None,
                    leader_term: None,
                    under_replicated: voters < r.target_replication_factor as usize,
                }
            })
            .collect();
        let mut st = ClusterStatus {
            answered_by: s.node,
            meta_revision: s.meta_revision,
            nodes,
            ranges,
        };
        st.add_leaders(std::slice::from_ref(s));
        if let Some(m) = st.ranges.iter_mut().find(|r| r.id == meta::META_RANGE) {
            if m.leader.is_none() && s.meta_leader != 0 {
                m.leader = Some(s.meta_leader);
            }
        }
        st
    }

    /// Fill each range's leader from the replicas' reports in `replies` (one per node): the
    /// node that says it leads the range in the highest term. A replica that follows a
    /// leader does not count: it may lag behind a newer election.
    pub fn add_leaders(&mut self, replies: &[StatusReply]) {
        for r in &mut self.ranges {
            let id = r.id;
            let best = replies
                .iter()
                .flat_map(|s| {
                    s.range_leaders
                        .iter()
                        .filter(move |l| l.range == id && l.leader == s.node && l.leader != 0)
                })
                .max_by_key(|l| l.term);
            if let Some(l) = best {
                if r.leader_term.is_none_or(|t| l.term > t) {
                    r.leader = Some(l.leader);
                    r.leader_term = Some(l.term);
                }
            }
        }
    }

    /// The leader of range `id`, if known.
    pub fn leader_of(&self, id: u64) -> Option<u64> {
        self.ranges.iter().find(|r| r.id == id)?.leader
    }

    /// The two tables as text.
    pub fn tables(&self) -> String {
        let mut nodes = Table::new();
        nodes.load_preset(UTF8_FULL_CONDENSED);
        nodes.set_header(vec![
            "node",
            "client addr",
            "peer addr",
            "zone",
            "capacity",
            "free",
            "alive",
        ]);
        for n in &self.nodes {
            nodes.add_row(vec![
                n.id.to_string(),
                n.client_addr.clone(),
                n.peer_addr.clone(),
                n.zone.clone(),
                human(n.capacity),
                human(n.free),
                if n.alive {
                    "yes".to_string()
                } else {
                    format!("no ({}s silent)", n.heartbeat_age_ms / 1000)
                },
            ]);
        }
        let mut ranges = Table::new();
        ranges.load_preset(UTF8_FULL_CONDENSED);
        ranges.set_header(vec![
            "range",
            "collection",
            "epoch",
            "members",
            "leader",
            "replication",
        ]);
        for r in &self.ranges {
            let members: Vec<String> = r
                .members
                .iter()
                .map(|m| {
                    if m.role == "voter" {
                        m.node.to_string()
                    } else {
                        format!("{} (learner)", m.node)
                    }
                })
                .collect();
            ranges.add_row(vec![
                r.id.to_string(),
                r.collection_label(),
                r.epoch.to_string(),
                members.join(", "),
                r.leader
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "-".into()),
                if r.under_replicated {
                    format!("under-replicated ({}/{})", r.voters, r.target)
                } else {
                    format!("ok ({}/{})", r.voters, r.target)
                },
            ]);
        }
        format!("{nodes}\n{ranges}")
    }
}

impl RangeStatus {
    /// The collection as the ranges table shows it: its name, else `meta` for meta's own
    /// collection, else its id.
    pub fn collection_label(&self) -> String {
        match &self.collection_name {
            Some(n) => n.clone(),
            None if self.collection == meta::META_COLLECTION => meta::keys::META_NAME.into(),
            None => self.collection.to_string(),
        }
    }
}

/// A collection kind as `create-collection --type` spells it.
fn kind_name(k: CollectionKind) -> &'static str {
    match k {
        CollectionKind::KV => "kv",
        CollectionKind::LOG => "log",
        CollectionKind::OBJECT => "object",
        CollectionKind::TIMESERIES => "timeseries",
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Fetch the status (from meta's leader when reachable), then each range's leader from every
/// node it lists (and the seeds) that answers within `timeout`.
///
/// # Errors
/// No seed reachable, or no meta yet.
pub async fn fetch(seeds: &[SocketAddr], timeout: Duration) -> Result<ClusterStatus, CliError> {
    let c = client::Client::new(seeds.to_vec(), timeout)?;
    let s = c.leader_status().await?;
    let mut st = ClusterStatus::from_reply(&s);
    let mut addrs: Vec<SocketAddr> = s
        .nodes
        .iter()
        .filter(|n| n.id != s.node)
        .filter_map(|n| n.client_addr.parse().ok())
        .chain(seeds.iter().copied())
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    // A node that is down answers nothing: do not let it hold the whole status up.
    let replies = every_status(&addrs, timeout.min(Duration::from_secs(2))).await;
    st.add_leaders(&replies);
    Ok(st)
}

/// The status of each node at `addrs` that answers within `timeout` (asked concurrently).
pub async fn every_status(addrs: &[SocketAddr], timeout: Duration) -> Vec<StatusReply> {
    let mut set = tokio::task::JoinSet::new();
    for a in addrs {
        let a = *a;
        set.spawn(async move {
            let c = client::Client::new(vec![a], timeout).ok()?;
            tokio::time::timeout(timeout, c.status()).await.ok()?.ok()
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(s)) = r {
            out.push(s);
        }
    }
    out
}

/// `quiver status`.
///
/// # Errors
/// As [`fetch`].
pub async fn run(a: &StatusArgs) -> Result<(), CliError> {
    let st = fetch(&a.seeds, Duration::from_secs(a.timeout_secs)).await?;
    if a.json {
        let s = serde_json::to_string_pretty(&st).map_err(|e| CliError::Msg(e.to_string()))?;
        println!("{s}");
    } else {
        println!("{}", st.tables());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::clientpb::RangeLeader;
    use proto::metapb::RangeDescriptor;

    fn leader(range: u64, leader: u64, term: u64) -> RangeLeader {
        let mut l = RangeLeader::new();
        l.range = range;
        l.leader = leader;
        l.term = term;
        l
    }

    fn reply(node: u64, leaders: Vec<RangeLeader>) -> StatusReply {
        let mut s = StatusReply::new();
        s.node = node;
        s.range_leaders = leaders.into();
        s
    }

    #[test]
    fn a_range_leader_is_the_self_reported_leader_of_the_highest_term() {
        let mut base = reply(1, vec![leader(7, 2, 3)]);
        for id in [7, 8, 9] {
            let mut r = RangeDescriptor::new();
            r.id = id;
            base.ranges.push(r);
        }
        let mut st = ClusterStatus::from_reply(&base);
        // Node 1 follows node 2 in term 3: a follower's belief does not count.
        assert_eq!(st.leader_of(7), None);
        st.add_leaders(&[
            reply(2, vec![leader(7, 2, 3), leader(8, 0, 5)]),
            // Node 3 was elected in term 4 and node 2 has not heard yet.
            reply(3, vec![leader(7, 3, 4), leader(8, 1, 5)]),
        ]);
        assert_eq!(st.leader_of(7), Some(3));
        let r7 = st.ranges.iter().find(|r| r.id == 7).expect("range 7");
        assert_eq!(r7.leader_term, Some(4));
        // Nobody reports leading 8 (node 3 believes 1 leads it; 1 did not say so).
        assert_eq!(st.leader_of(8), None);
        assert_eq!(st.leader_of(9), None);
        assert!(st.tables().contains('-'));
    }

    fn range_of(id: u64, collection: u64) -> RangeDescriptor {
        let mut r = RangeDescriptor::new();
        r.id = id;
        r.collection = collection;
        r
    }

    fn collection(id: u64, name: &str) -> CollectionDescriptor {
        let mut c = CollectionDescriptor::new();
        c.id = id;
        c.name = name.into();
        c.kind = CollectionKind::KV;
        c
    }

    /// The collection column of the ranges table's row for range `id`.
    fn collection_cell(tables: &str, id: u64) -> Option<String> {
        let cells = |l: &str| -> Vec<String> {
            l.split(['│', '┆']).map(|c| c.trim().to_string()).collect()
        };
        tables
            .lines()
            .map(cells)
            .skip_while(|c| c.get(1).map(String::as_str) != Some("range"))
            .find(|c| c.get(1) == Some(&id.to_string()))
            .and_then(|c| c.get(2).cloned())
    }

    #[test]
    fn a_range_shows_its_collection_name_else_its_id() {
        let mut s = reply(1, vec![]);
        s.ranges = vec![range_of(1, 1), range_of(10, 2), range_of(11, 3)].into();
        s.collections = vec![collection(1, "meta"), collection(2, "users")].into();
        let st = ClusterStatus::from_reply(&s);
        let t = st.tables();
        assert_eq!(collection_cell(&t, 1).as_deref(), Some("meta"), "{t}");
        assert_eq!(collection_cell(&t, 10).as_deref(), Some("users"), "{t}");
        // Collection 3 is not in the answer (dropped meanwhile): its id.
        assert_eq!(collection_cell(&t, 11).as_deref(), Some("3"), "{t}");
        let v = serde_json::to_value(&st).expect("json");
        assert_eq!(v["ranges"][1]["collection"], 2);
        assert_eq!(v["ranges"][1]["collection_name"], "users");
        assert_eq!(v["ranges"][1]["collection_kind"], "kv");
        assert!(v["ranges"][2]["collection_name"].is_null());
        assert!(v["ranges"][2]["collection_kind"].is_null());

        // An older node sends no collections: ids, and meta's collection still as `meta`.
        s.collections.clear();
        let t = ClusterStatus::from_reply(&s).tables();
        assert_eq!(collection_cell(&t, 1).as_deref(), Some("meta"), "{t}");
        assert_eq!(collection_cell(&t, 10).as_deref(), Some("2"), "{t}");
        assert_eq!(collection_cell(&t, 11).as_deref(), Some("3"), "{t}");
    }
}
