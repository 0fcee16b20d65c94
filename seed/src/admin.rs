//! The admin HTTP port: `GET /metrics` (Prometheus text), `/livez`, `/readyz`. A minimal
//! HTTP/1.1 responder: one request per connection, bounded header size.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::node::Seed;

const MAX_HEAD: usize = 8 << 10;

async fn respond(s: &mut TcpStream, code: u16, reason: &str, ctype: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// Serve one admin request.
pub async fn serve(seed: Arc<Seed>, mut s: TcpStream) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 || buf.len() + n > MAX_HEAD {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    })
    .await;
    if !matches!(read, Ok(Some(()))) {
        return respond(&mut s, 400, "Bad Request", "text/plain", "bad request\n").await;
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut s,
            405,
            "Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    match path {
        "/livez" => respond(&mut s, 200, "OK", "text/plain", "ok\n").await,
        "/readyz" => {
            if seed.ready() {
                respond(&mut s, 200, "OK", "text/plain", "ready\n").await
            } else if seed.draining.load(Ordering::Relaxed) {
                respond(
                    &mut s,
                    503,
                    "Service Unavailable",
                    "text/plain",
                    "draining\n",
                )
                .await
            } else {
                respond(
                    &mut s,
                    503,
                    "Service Unavailable",
                    "text/plain",
                    "no meta yet\n",
                )
                .await
            }
        }
        "/metrics" => {
            let body = metrics(&seed).await;
            respond(&mut s, 200, "OK", "text/plain; version=0.0.4", &body).await
        }
        _ => respond(&mut s, 404, "Not Found", "text/plain", "not found\n").await,
    }
}

async fn metrics(seed: &Arc<Seed>) -> String {
    let mut out = String::new();
    let mut g = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    let c = &seed.counters;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let st = seed.meta_status().await;
    let m = seed.node.metrics();
    let ts = seed.transport.stats();
    g("quiver_node_id", "This node's id.", "gauge", seed.id);
    g(
        "quiver_ready",
        "1 when the node knows meta and is not draining.",
        "gauge",
        u64::from(seed.ready()),
    );
    g(
        "quiver_meta_revision",
        "Revision of meta as this node sees it.",
        "gauge",
        seed.read_meta(|s| s.revision()),
    );
    g(
        "quiver_meta_replica",
        "1 when this node holds a meta replica.",
        "gauge",
        u64::from(st.is_some()),
    );
    g(
        "quiver_meta_leader",
        "1 when this node leads meta.",
        "gauge",
        u64::from(st.as_ref().is_some_and(|s| s.role == harpoon::Role::Leader)),
    );
    g(
        "quiver_meta_applied_index",
        "Applied index of the local meta replica.",
        "gauge",
        st.map_or(0, |s| s.applied),
    );
    g(
        "quiver_control_requests_total",
        "Authenticated control requests served.",
        "counter",
        l(&c.control_requests),
    );
    g(
        "quiver_control_refused_total",
        "Control connections refused at the handshake.",
        "counter",
        l(&c.control_refused),
    );
    g(
        "quiver_client_requests_total",
        "Client requests received.",
        "counter",
        l(&c.client_requests),
    );
    g(
        "quiver_client_bad_frames_total",
        "Client connections closed for a bad frame.",
        "counter",
        l(&c.client_bad_frames),
    );
    g(
        "quiver_peer_bad_frames_total",
        "Peer connections closed for a bad first frame.",
        "counter",
        l(&c.peer_bad_frames),
    );
    g(
        "quiver_heartbeats_total",
        "Heartbeats written into meta.",
        "counter",
        l(&c.heartbeats_sent),
    );
    g(
        "quiver_membership_changes_total",
        "Membership changes started by this node as leader.",
        "counter",
        l(&c.membership_changes),
    );
    g(
        "quiver_daughter_campaigns_total",
        "Daughter ranges of this node's splits whose first election it started at once.",
        "counter",
        l(&c.daughter_campaigns),
    );
    g(
        "quiver_daughter_campaigns_skipped_total",
        "Daughter ranges of this node's splits left to an ordinary election (a leader or a \
         later term was already known, or the replica was gone).",
        "counter",
        l(&c.daughter_campaigns_skipped),
    );
    g(
        "harpoon_rounds_total",
        "Driver rounds.",
        "counter",
        m.rounds,
    );
    g(
        "harpoon_log_syncs_total",
        "Raft log syncs.",
        "counter",
        m.log_syncs,
    );
    g(
        "harpoon_log_bytes_appended_total",
        "Bytes appended to the durable raft log (memory collections' cells use the volatile log).",
        "counter",
        m.log_bytes_appended,
    );
    g(
        "harpoon_log_records_appended_total",
        "Records appended to the durable raft log.",
        "counter",
        m.log_records_appended,
    );
    g(
        "harpoon_volatile_log_cells",
        "Cells whose raft log is held in memory only (memory collections).",
        "gauge",
        m.volatile_log_cells,
    );
    g(
        "harpoon_volatile_log_entries",
        "Raft entries held in the volatile (in-memory) log.",
        "gauge",
        m.volatile_log_entries,
    );
    g(
        "harpoon_proposals_total",
        "Proposals accepted as leader.",
        "counter",
        m.proposals,
    );
    g(
        "harpoon_packed_entries_total",
        "Packed raft entries (two or more concurrent writes of a range in one entry) accepted \
         as leader.",
        "counter",
        m.packed_entries,
    );
    g(
        "harpoon_packed_parts_total",
        "Writes carried by packed entries (also counted in harpoon_proposals_total); divided \
         by harpoon_packed_entries_total: the mean pack size.",
        "counter",
        m.packed_parts,
    );
    g(
        "harpoon_snapshots_total",
        "Snapshots generated.",
        "counter",
        m.snapshots,
    );
    g(
        "transport_peers_refused_total",
        "Raft peers refused at the handshake.",
        "counter",
        ts.refused,
    );
    g(
        "transport_msgs_sent_total",
        "Raft messages sent.",
        "counter",
        ts.msgs_sent,
    );
    g(
        "transport_msgs_delivered_total",
        "Raft messages received.",
        "counter",
        ts.msgs_delivered,
    );
    let leaders = crate::status::local_leaders(seed).await;
    range_gauges(&mut out, seed.id, &leaders);
    out
}

/// Per-replica leadership, one sample per replica held here (meta's is range 1):
/// `quiver_range_leader{range="7"} 1` where this node leads the range (0 elsewhere), and the
/// term its replica is in.
fn range_gauges(out: &mut String, me: u64, leaders: &[proto::clientpb::RangeLeader]) {
    let _ = writeln!(
        out,
        "# HELP quiver_range_leader 1 when this node leads the range.\n\
         # TYPE quiver_range_leader gauge"
    );
    for r in leaders {
        let _ = writeln!(
            out,
            "quiver_range_leader{{range=\"{}\"}} {}",
            r.range,
            u64::from(r.leader == me)
        );
    }
    let _ = writeln!(
        out,
        "# HELP quiver_range_term Raft term of this node's replica of the range.\n\
         # TYPE quiver_range_term gauge"
    );
    for r in leaders {
        let _ = writeln!(out, "quiver_range_term{{range=\"{}\"}} {}", r.range, r.term);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_gauges_mark_the_led_ranges_only() {
        let mut a = proto::clientpb::RangeLeader::new();
        a.range = 1;
        a.leader = 2;
        a.term = 4;
        let mut b = proto::clientpb::RangeLeader::new();
        b.range = 7;
        b.leader = 3;
        b.term = 9;
        let mut out = String::new();
        range_gauges(&mut out, 3, &[a, b]);
        assert!(out.contains("# TYPE quiver_range_leader gauge\n"), "{out}");
        assert!(
            out.contains("quiver_range_leader{range=\"1\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("quiver_range_leader{range=\"7\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("quiver_range_term{range=\"7\"} 9\n"), "{out}");
        assert_eq!(out.matches("# TYPE").count(), 2, "{out}");
    }
}
