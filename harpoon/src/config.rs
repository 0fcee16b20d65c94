//! Cell and node configuration: plain structs, a doc on every field, defaults in one place,
//! and `validate()` called once by [`crate::Node::start`].
//!
//! Times are counted in ticks of [`NodeConfig::tick_interval`] so one knob scales a whole
//! deployment from a LAN (tens of ms) to a WAN (hundreds of ms).

use std::time::Duration;

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("tick_interval must be > 0")]
    ZeroTick,
    #[error("shards must be >= 1")]
    ZeroShards,
    #[error("heartbeat_tick must be >= 1")]
    ZeroHeartbeat,
    #[error("election_tick ({election}) must be > heartbeat_tick ({heartbeat})")]
    ElectionNotAboveHeartbeat { election: usize, heartbeat: usize },
    #[error("lease_ticks ({lease}) must be < election_tick - 2 ({election} - 2)")]
    LeaseTooLong { lease: usize, election: usize },
    #[error("{field} must be > 0")]
    Zero { field: &'static str },
    #[error("max_uncommitted_size ({uncommitted}) must be >= max_size_per_msg ({per_msg})")]
    UncommittedBelowMessage { uncommitted: u64, per_msg: u64 },
    #[error("log_gc_slack ({slack}) must be < log_gc_threshold ({threshold})")]
    SlackAboveThreshold { slack: u64, threshold: u64 },
}

/// How one cell runs raft. Shared by all cells of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct CellConfig {
    /// Ticks without a leader contact before a follower campaigns (randomised in
    /// `[election_tick, 2 * election_tick)` by raft). Must be well above the worst RTT in ticks.
    pub election_tick: usize,
    /// Ticks between leader heartbeats. Must be below `election_tick`.
    pub heartbeat_tick: usize,
    /// Largest MsgAppend in bytes. raft's default (0) sends one entry per message, which
    /// cripples throughput.
    pub max_size_per_msg: u64,
    /// MsgAppends in flight per follower (pipelining depth).
    pub max_inflight_msgs: usize,
    /// Bytes of uncommitted entries a leader accepts before dropping proposals with
    /// [`crate::Error::Busy`]. Bounds the Async-mode loss window.
    pub max_uncommitted_size: u64,
    /// Largest batch of committed entries handed to apply per ready (paginates apply).
    pub max_committed_size_per_ready: u64,
    /// Serve `ReadConsistency::Lease` reads from the leader lease. When on, a node refuses to
    /// vote for one election timeout after it starts (a restarted voter forgot its leader
    /// contact and could otherwise help elect a leader inside the old leader's lease).
    pub lease_reads: bool,
    /// Lease length in ticks, counted from the send time of a quorum-acknowledged round. Must be
    /// at most `election_tick - 3`: followers ignore votes for `election_tick` ticks after a
    /// contact, but ticks are not evenly spaced (the tick loop can fire one late and the next
    /// moments after it, so a follower may count two ticks in little more than one interval),
    /// and the leader's clock and its followers' tick phases differ by up to one tick. The
    /// three-tick margin covers both, plus the leader's own tick granularity.
    pub lease_ticks: usize,
    /// Compact a cell's log once it holds this many applied entries. Compacting first makes
    /// the state machine durable (`StateMachine::persist`), which for a `logged` KV store
    /// writes its whole image on the shard thread: keep this large (etcd's snapshot count is
    /// 100,000). Log GC bounds the log by bytes anyway (it force-compacts cells that pin old
    /// segments).
    pub log_gc_threshold: u64,
    /// Entries kept below the applied index when compacting, for slightly slow followers
    /// (beyond that they catch up by snapshot).
    pub log_gc_slack: u64,
    /// A learner is promoted only when its matched index is within this many entries of the
    /// leader's last index.
    pub promote_max_lag: u64,
}

impl Default for CellConfig {
    fn default() -> Self {
        CellConfig {
            election_tick: 10,
            heartbeat_tick: 2,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_size: 64 << 20,
            max_committed_size_per_ready: 16 << 20,
            lease_reads: true,
            lease_ticks: 7,
            log_gc_threshold: 65_536,
            log_gc_slack: 512,
            promote_max_lag: 256,
        }
    }
}

impl CellConfig {
    /// Check the invariants documented on the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_tick == 0 {
            return Err(ConfigError::ZeroHeartbeat);
        }
        if self.election_tick <= self.heartbeat_tick {
            return Err(ConfigError::ElectionNotAboveHeartbeat {
                election: self.election_tick,
                heartbeat: self.heartbeat_tick,
            });
        }
        if self.lease_reads && self.lease_ticks + 2 >= self.election_tick {
            return Err(ConfigError::LeaseTooLong {
                lease: self.lease_ticks,
                election: self.election_tick,
            });
        }
        for (field, v) in [
            ("max_size_per_msg", self.max_size_per_msg),
            ("max_inflight_msgs", self.max_inflight_msgs as u64),
            ("max_uncommitted_size", self.max_uncommitted_size),
            (
                "max_committed_size_per_ready",
                self.max_committed_size_per_ready,
            ),
            ("log_gc_threshold", self.log_gc_threshold),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        // raft-rs refuses this combination at cell creation; refuse it at start instead.
        if self.max_uncommitted_size < self.max_size_per_msg {
            return Err(ConfigError::UncommittedBelowMessage {
                uncommitted: self.max_uncommitted_size,
                per_msg: self.max_size_per_msg,
            });
        }
        if self.log_gc_slack >= self.log_gc_threshold {
            return Err(ConfigError::SlackAboveThreshold {
                slack: self.log_gc_slack,
                threshold: self.log_gc_threshold,
            });
        }
        Ok(())
    }

    /// The raft-rs config for replica `id`, restarting at durable `applied`.
    pub(crate) fn raft_config(&self, id: u64, applied: u64) -> raft::Config {
        raft::Config {
            id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            skip_bcast_commit: true,
            // Off on purpose (TiKV keeps it off too): raft-rs 0.7 `try_batching` merges new
            // entries into a queued *empty* MsgAppend without checking that they start at its
            // `index + 1`; after a reject rewinds `next` in the same round the merged message
            // claims more than it carries and the follower acknowledges entries it does not
            // have (then panics "to_commit .. out of range"). Found by t95_nemesis under
            // reordered/duplicated messages.
            batch_append: false,
            max_uncommitted_size: self.max_uncommitted_size,
            max_committed_size_per_ready: self.max_committed_size_per_ready,
            ..Default::default()
        }
    }
}

/// How a node drives its cells.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// One raft tick for every cell of a shard (coalesced). 100-200 ms on a WAN.
    pub tick_interval: Duration,
    /// Threads that own cells (a cell lives on shard `cell id % shards`). 1-2 on small boxes.
    pub shards: usize,
    /// Commands drained from a shard's inbox per round before its readies are handled;
    /// bounds round latency under load.
    pub max_commands_per_round: usize,
    /// Per-cell raft settings.
    pub cell: CellConfig,
    /// How often the node reclaims raft-log segments (`LogStore::gc`), force-compacting the
    /// cells that pin the oldest ones (idle cells never reach `log_gc_threshold`). Zero
    /// disables it (the log then grows until the disk fills).
    pub log_gc_interval: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            tick_interval: Duration::from_millis(100),
            shards: 1,
            max_commands_per_round: 4096,
            cell: CellConfig::default(),
            log_gc_interval: Duration::from_secs(10),
        }
    }
}

impl NodeConfig {
    /// Check the node and cell invariants.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tick_interval.is_zero() {
            return Err(ConfigError::ZeroTick);
        }
        if self.shards == 0 {
            return Err(ConfigError::ZeroShards);
        }
        if self.max_commands_per_round == 0 {
            return Err(ConfigError::Zero {
                field: "max_commands_per_round",
            });
        }
        self.cell.validate()
    }

    /// The leader lease as a duration.
    pub(crate) fn lease(&self) -> Duration {
        self.tick_interval * self.cell.lease_ticks as u32
    }

    /// One election timeout as a duration.
    pub(crate) fn election_timeout(&self) -> Duration {
        self.tick_interval * self.cell.election_tick as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(NodeConfig::default().validate(), Ok(()));
    }

    #[test]
    fn lease_must_be_below_election_timeout() {
        let mut c = CellConfig {
            lease_ticks: 9,
            ..CellConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::LeaseTooLong { .. })
        ));
        c.lease_reads = false;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn lease_keeps_a_three_tick_margin() {
        let mut c = CellConfig {
            election_tick: 10,
            lease_ticks: 8,
            ..CellConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::LeaseTooLong { .. })
        ));
        c.lease_ticks = 7;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn election_above_heartbeat() {
        let c = CellConfig {
            election_tick: 2,
            ..CellConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ElectionNotAboveHeartbeat { .. })
        ));
    }
}
