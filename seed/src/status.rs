//! The `Status` request: the cluster as this node sees it (meta's records, meta's leader and
//! membership, this node's clock).

use std::sync::Arc;

use meta::view;
use proto::clientpb::StatusReply;

use crate::node::{now_ms, Seed};

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
    });
    st.meta_leader = seed.meta_leader().await.unwrap_or(0);
    if let Some(cs) = seed.meta_status().await {
        st.meta_voters = cs.conf.voters.clone();
        st.meta_learners = cs.conf.learners.clone();
    }
    st
}
