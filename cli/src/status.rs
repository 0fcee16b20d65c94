//! `quiver status`: nodes (address, zone, capacity, alive) and ranges (members, leader,
//! under-replicated or not), as a table or JSON.

use std::net::SocketAddr;
use std::time::Duration;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use meta::MemberRole;
use proto::clientpb::StatusReply;
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
    pub epoch: u64,
    pub members: Vec<MemberStatus>,
    pub voters: usize,
    pub target: u32,
    pub leader: Option<u64>,
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
        let ranges = s
            .ranges
            .iter()
            .map(|r| {
                let voters = r
                    .members
                    .iter()
                    .filter(|m| m.role == MemberRole::VOTER)
                    .count();
                RangeStatus {
                    id: r.id,
                    collection: r.collection,
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
                    leader: (r.id == meta::META_RANGE && s.meta_leader != 0)
                        .then_some(s.meta_leader),
                    under_replicated: voters < r.target_replication_factor as usize,
                }
            })
            .collect();
        ClusterStatus {
            answered_by: s.node,
            meta_revision: s.meta_revision,
            nodes,
            ranges,
        }
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
                if r.collection == meta::META_COLLECTION {
                    "meta".to_string()
                } else {
                    r.collection.to_string()
                },
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

/// Fetch the status (from meta's leader when reachable).
///
/// # Errors
/// No seed reachable, or no meta yet.
pub async fn fetch(seeds: &[SocketAddr], timeout: Duration) -> Result<ClusterStatus, CliError> {
    let c = client::Client::new(seeds.to_vec(), timeout)?;
    let s = c.leader_status().await?;
    Ok(ClusterStatus::from_reply(&s))
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
