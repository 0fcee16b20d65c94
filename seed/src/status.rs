//! The `Status` request: the cluster as this node sees it (meta's records: nodes, ranges and
//! collections; meta's leader and membership; this node's clock) and the leader each of its
//! replicas believes (meta does not record leaders: this is where a range's leader is visible).

use std::sync::Arc;

use meta::view;
use proto::clientpb::{RangeLeader, StatusReply};

use crate::node::{now_ms, Seed, META_CELL};

/// The cluster as this node sees it.
pub async fn status(seed: &Arc<Seed>) -> StatusReply {
    let mut st = StatusReply::new();
    st.node = seed.id;
    st.now_ms = now_ms();
    st.dead_after_ms = seed.settings.dead_after.as_millis() as u64;
    seed.read_meta(|s| {
        st.meta_revision = s.revision();
        st.nodes = view::nodes(s)
            .unwrap_or_default()
            .into_iter()
            .map(|n| n.value)
            .collect();
        st.ranges = view::ranges(s)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.value)
            .collect();
        st.collections = view::collections(s)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.value)
            .collect();
    });
    st.meta_leader = seed.meta_leader().await.unwrap_or(0);
    if let Some(cs) = seed.meta_status().await {
        st.meta_voters = cs.conf.voters.clone();
        st.meta_learners = cs.conf.learners.clone();
    }
    st.range_leaders = local_leaders(seed).await.into();
    st
}

/// What every replica held here believes of its range's leadership: meta's (when this node
/// holds a meta replica) then each KV range's, ascending. A range whose cell is gone (being
/// dropped) or not yet created is left out.
pub async fn local_leaders(seed: &Arc<Seed>) -> Vec<RangeLeader> {
    let mut out = Vec::new();
    if let Some(cs) = seed.meta_status().await {
        out.push(range_leader(seed.id, &cs));
    }
    for id in seed.ranges.ids() {
        if harpoon::CellId(id) == META_CELL {
            continue;
        }
        if let Ok(cs) = seed.node.status(harpoon::CellId(id)).await {
            out.push(range_leader(seed.id, &cs));
        }
    }
    out
}

fn range_leader(me: u64, cs: &harpoon::CellStatus) -> RangeLeader {
    let mut r = RangeLeader::new();
    r.range = cs.cell.0;
    r.leader = cs.leader.map_or(0, |l| l.get());
    r.term = cs.term;
    r.voter = cs.conf.voters.contains(&me);
    r
}
