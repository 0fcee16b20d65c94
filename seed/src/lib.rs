//! The Quiver node: where harpoon (consensus) and meta (the cluster's records) meet.
//!
//! # Layout
//! - [`config`]: flags > `QUIVER_*` env > TOML file > defaults, validated into [`Settings`].
//! - [`server`]: start-up ([`start`], [`run`]), the peer port (dispatch between the raft
//!   transport and control connections), graceful shutdown.
//! - [`node`]: [`Seed`], the running node: its harpoon `Node`, transport, meta replica and view,
//!   proposing to meta's leader wherever it is, CreateMeta.
//! - [`durable`]: `write_durably` (temporary file, fsync, rename, fsync the directory), for
//!   every file in the data dir that is replaced.
//! - [`meta_sm`]: meta's replica as a harpoon `StateMachine`, persisted in the data dir.
//! - [`control`]: control connections on the peer port: HMAC challenge with the cluster
//!   secret, then one request (CreateMeta, WatchMeta, Heartbeat, ProposeTxn) and its response.
//! - [`ranges`]: the KV ranges held here: `KvStore` as a harpoon `StateMachine`, range dirs
//!   (17 MiB data-log segments), reopening at start-up, admin Split entries (daughters
//!   materialised on apply, one opener per range by registry claims), dropping removed and
//!   forgetting lost replicas.
//! - [`linger`]: replicas removed from a range while they lagged (they never apply their own
//!   removal): when meta's record says to drop one (epochs newer than this node's durable
//!   claim epoch, `<data dir>/claims/<range id>`), and why that is safe.
//! - [`loops`]: subscription to meta, heartbeats, self-assignment, the leader's reconcile,
//!   range splits (trigger, reserve, propose, record in meta; repair by the daughter),
//!   housekeeping (the range leader's `Expire` and retention `Compact`, removed replicas,
//!   lost replicas leaving the cell before rejoining as learners).
//! - [`client_port`]: the client port (multiplexed request ids).
//! - [`status`]: the `Status` request's answer (meta's records and leader as this node sees them,
//!   and the leader and term each local replica believes).
//! - [`kv_port`]: the client port's collection requests: CreateCollection, Lookup, and KV
//!   commands routed to a range's replica (epoch, meta's and the store's bounds checked, except
//!   a resent batch, which goes to the range it was first sent to; leader or follower reads;
//!   keys moved away by a split answered `WRONG_RANGE`).
//! - [`watch_port`]: the client port's watch long-poll on one range's history (any replica;
//!   events, wait for the next change, resync in pages; a revision too large for one reply is
//!   cut in key order; bounds re-checked after the read).
//! - [`admin`]: `/metrics`, `/livez`, `/readyz`.
//!
//! The async boundary is here: harpoon runs its shards on threads and answers with futures.

pub mod admin;
pub mod client_port;
pub mod config;
pub mod control;
pub mod durable;
pub mod kv_port;
pub mod linger;
pub mod loops;
pub mod meta_sm;
pub mod node;
pub mod ranges;
pub mod server;
pub mod status;
pub mod watch_port;

pub use config::{NodeArgs, Settings};
pub use node::Seed;
pub use server::{run, start, Running, StartError};
