//! Node configuration: flags > `QUIVER_*` environment > TOML file (`--config`) > defaults,
//! merged into one [`Settings`] and validated once at start.
//!
//! clap reads flags and the environment ([`NodeArgs`], every field optional); the file is a
//! [`FileConfig`] with the same field names; [`Settings::resolve`] takes the first value
//! present in that order, then the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration was refused. One line each, naming the setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {why}")]
    ParseFile { path: PathBuf, why: String },
    #[error("missing {0}: pass --{0} (or set QUIVER_{1}, or `{2}` in the config file)")]
    Missing(&'static str, &'static str, &'static str),
    #[error("invalid {field} {value:?}: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: String,
    },
}

/// `quiver node` flags; each also reads `QUIVER_<NAME>` from the environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NodeArgs {
    /// Directory for this node's id, raft log and replicas (created if missing).
    #[arg(long, env = "QUIVER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client port address [default: 127.0.0.1:7400].
    #[arg(long, env = "QUIVER_LISTEN")]
    pub listen: Option<String>,
    /// Peer port address (raft, bootstrap, heartbeats) [default: 127.0.0.1:7401].
    #[arg(long, env = "QUIVER_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Peer address other nodes are told to dial, when it differs from the bound one (e.g. a
    /// proxy in front of the peer port) [default: the bound peer address].
    #[arg(long, env = "QUIVER_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,
    /// Admin HTTP address for /metrics, /livez and /readyz [default: off].
    #[arg(long, env = "QUIVER_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Peer addresses of seed nodes, comma separated.
    #[arg(long, env = "QUIVER_SEEDS", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Failure zone of this node (placement spreads replicas across zones) [default: default].
    #[arg(long, env = "QUIVER_ZONE")]
    pub zone: Option<String>,
    /// Bytes this node offers to replicas [default: 1073741824].
    #[arg(long, env = "QUIVER_CAPACITY")]
    pub capacity: Option<u64>,
    /// TOML file with any of these settings (underscores: data_dir, peer_listen, ...).
    #[arg(long, env = "QUIVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Cluster name; peers of another cluster are refused [default: quiver].
    #[arg(long, env = "QUIVER_CLUSTER")]
    pub cluster: Option<String>,
    /// Shared secret every peer must prove it knows (required).
    #[arg(long, env = "QUIVER_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Raft tick in milliseconds [default: 100].
    #[arg(long, env = "QUIVER_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Election timeout in ticks [default: 10].
    #[arg(long, env = "QUIVER_ELECTION_TICKS")]
    pub election_ticks: Option<usize>,
    /// Interval of the node's heartbeat into meta, in milliseconds [default: 1000].
    #[arg(long, env = "QUIVER_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// A node silent this long (ms) is removed from every range [default: 10000].
    #[arg(long, env = "QUIVER_DEAD_AFTER_MS")]
    pub dead_after_ms: Option<u64>,
    /// Size of each raft log segment file in MiB [default: 64].
    #[arg(long, env = "QUIVER_LOG_SEGMENT_MB")]
    pub log_segment_mb: Option<u64>,
}

/// The TOML file: the same settings as [`NodeArgs`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub peer_listen: Option<String>,
    pub advertise_peer: Option<String>,
    pub admin_listen: Option<String>,
    pub seeds: Option<Vec<String>>,
    pub zone: Option<String>,
    pub capacity: Option<u64>,
    pub cluster: Option<String>,
    pub cluster_secret: Option<String>,
    pub tick_ms: Option<u64>,
    pub election_ticks: Option<usize>,
    pub heartbeat_ms: Option<u64>,
    pub dead_after_ms: Option<u64>,
    pub log_segment_mb: Option<u64>,
}

/// The validated settings a node runs with.
#[derive(Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub peer_listen: SocketAddr,
    pub advertise_peer: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub seeds: Vec<SocketAddr>,
    pub zone: String,
    pub capacity: u64,
    pub cluster: String,
    pub cluster_secret: Vec<u8>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub log_segment_size: u64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("peer_listen", &self.peer_listen)
            .field("advertise_peer", &self.advertise_peer)
            .field("admin_listen", &self.admin_listen)
            .field("seeds", &self.seeds)
            .field("zone", &self.zone)
            .field("capacity", &self.capacity)
            .field("cluster", &self.cluster)
            .field("cluster_secret", &"<redacted>")
            .field("tick", &self.tick)
            .field("election_ticks", &self.election_ticks)
            .finish_non_exhaustive()
    }
}

fn addr(field: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
            field,
            value: v.into(),
            why: format!("{e} (expected IP:PORT)"),
        })
}

fn positive(field: &'static str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            field,
            value: "0".into(),
            why: "must be positive".into(),
        });
    }
    Ok(v)
}

/// Read and parse a TOML config file.
///
/// # Errors
/// The file cannot be read or is not valid TOML with known keys.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.into(),
        why: e.to_string().lines().next().unwrap_or("parse error").into(),
    })
}

impl Settings {
    /// Merge flags/env over the file (if `--config` names one) over defaults, and validate.
    ///
    /// # Errors
    /// The first missing or invalid setting.
    pub fn resolve(args: &NodeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let a = args.clone();
        let data_dir = a
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Missing("data-dir", "DATA_DIR", "data_dir"))?;
        let listen = a
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:7400".into());
        let peer_listen = a
            .peer_listen
            .or(file.peer_listen)
            .unwrap_or_else(|| "127.0.0.1:7401".into());
        let advertise_peer = a.advertise_peer.or(file.advertise_peer);
        let admin_listen = a.admin_listen.or(file.admin_listen);
        let seeds = a.seeds.or(file.seeds).unwrap_or_default();
        let secret = a
            .cluster_secret
            .or(file.cluster_secret)
            .ok_or(ConfigError::Missing(
                "cluster-secret",
                "CLUSTER_SECRET",
                "cluster_secret",
            ))?;
        if secret.len() < 8 {
            return Err(ConfigError::Invalid {
                field: "cluster-secret",
                value: "<redacted>".into(),
                why: "must be at least 8 characters".into(),
            });
        }
        let cluster = a
            .cluster
            .or(file.cluster)
            .unwrap_or_else(|| "quiver".into());
        if cluster.is_empty() {
            return Err(ConfigError::Invalid {
                field: "cluster",
                value: cluster,
                why: "must not be empty".into(),
            });
        }
        let zone = a.zone.or(file.zone).unwrap_or_else(|| "default".into());
        let tick_ms = positive("tick-ms", a.tick_ms.or(file.tick_ms).unwrap_or(100))?;
        let election_ticks = a.election_ticks.or(file.election_ticks).unwrap_or(10);
        if election_ticks < 5 {
            return Err(ConfigError::Invalid {
                field: "election-ticks",
                value: election_ticks.to_string(),
                why: "must be at least 5".into(),
            });
        }
        let heartbeat_ms = positive(
            "heartbeat-ms",
            a.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(1000),
        )?;
        let dead_after_ms = a.dead_after_ms.or(file.dead_after_ms).unwrap_or(10_000);
        if dead_after_ms < 2 * heartbeat_ms {
            return Err(ConfigError::Invalid {
                field: "dead-after-ms",
                value: dead_after_ms.to_string(),
                why: format!("must be at least twice heartbeat-ms ({heartbeat_ms})"),
            });
        }
        let seg_mb = a.log_segment_mb.or(file.log_segment_mb).unwrap_or(64);
        if !(8..=1024).contains(&seg_mb) {
            return Err(ConfigError::Invalid {
                field: "log-segment-mb",
                value: seg_mb.to_string(),
                why: "must be between 8 and 1024".into(),
            });
        }
        Ok(Settings {
            data_dir,
            listen: addr("listen", &listen)?,
            peer_listen: addr("peer-listen", &peer_listen)?,
            advertise_peer: advertise_peer
                .map(|v| addr("advertise-peer", &v))
                .transpose()?,
            admin_listen: admin_listen.map(|v| addr("admin-listen", &v)).transpose()?,
            seeds: seeds
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| addr("seeds", s.trim()))
                .collect::<Result<_, _>>()?,
            zone,
            capacity: positive("capacity", a.capacity.or(file.capacity).unwrap_or(1 << 30))?,
            cluster,
            cluster_secret: secret.into_bytes(),
            tick: Duration::from_millis(tick_ms),
            election_ticks,
            heartbeat: Duration::from_millis(heartbeat_ms),
            dead_after: Duration::from_millis(dead_after_ms),
            log_segment_size: seg_mb << 20,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NodeArgs {
        NodeArgs {
            data_dir: Some("/tmp/x".into()),
            cluster_secret: Some("0123456789".into()),
            ..NodeArgs::default()
        }
    }

    #[test]
    fn defaults_apply() {
        let s = Settings::resolve(&base()).unwrap();
        assert_eq!(s.listen.port(), 7400);
        assert_eq!(s.zone, "default");
        assert!(s.seeds.is_empty());
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.toml");
        std::fs::write(&p, "zone = \"b\"\ntick_ms = 50\nlisten = \"127.0.0.1:9\"\n").unwrap();
        let mut a = base();
        a.config = Some(p);
        a.zone = Some("a".into());
        let s = Settings::resolve(&a).unwrap();
        assert_eq!(s.zone, "a");
        assert_eq!(s.tick, Duration::from_millis(50));
        assert_eq!(s.listen.port(), 9);
    }

    #[test]
    fn clear_errors() {
        let mut a = base();
        a.cluster_secret = None;
        let e = Settings::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("--cluster-secret"), "{e}");
        let mut a = base();
        a.listen = Some("nope".into());
        let e = Settings::resolve(&a).unwrap_err().to_string();
        assert!(e.starts_with("invalid listen \"nope\""), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.toml");
        std::fs::write(&p, "bogus = 1\n").unwrap();
        let mut a = base();
        a.config = Some(p);
        assert!(matches!(
            Settings::resolve(&a),
            Err(ConfigError::ParseFile { .. })
        ));
    }
}
