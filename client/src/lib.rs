//! The Quiver Rust client. It knows only a list of seeds (client-port addresses); it asks
//! them, follows redirects (`NotLeader{hint}`), bounded in hops and time, and keeps one
//! multiplexed connection per node.
//!
//! # Layout
//! - [`conn`]: one connection: length-prefixed `clientpb` frames, many requests in flight,
//!   answers matched by request id; requests queued together go out in one write.
//! - [`error`]: [`ClientError`], the typed errors of the wire plus local failures.
//! - [`kv`]: KV collections: [`kv::Kv`] (`client.kv("name")`; puts with a TTL by
//!   [`kv::Kv::put_with_ttl`]), create-collection, the
//!   range cache and routing to range leaders (backoff bounded by the timeout, descriptors
//!   refreshed from WRONG_RANGE by epoch), request ids on writes and the resend of a write
//!   whose answer was lost, follower reads round robin with the served-at applied index
//!   ([`kv::Served`]), scans streamed page by page across ranges ([`kv::Scanner`]),
//!   batches of writes as one `Batch` command per range ([`kv::Kv::batch`],
//!   [`kv::Kv::put_batch`]; regrouped after a split, each op applied once).
//! - [`watch`]: [`Watch`] (`client.kv("name").watch_prefix(p, rev)`): long-polls per range
//!   piece, exactly once per piece by its next revision, re-lookup after splits.
//! - this file: [`Client`], routing and redirects.
//!
//! Until KV collections exist (issue 4) the data operations are `get`/`put` on meta's client
//! scratch space, which exercises the same route → redirect → respond path.

pub mod conn;
pub mod error;
pub mod kv;
pub mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use proto::clientpb::{
    ClientError_Code, ClientRequest, ClientResponse_oneof_kind, ScratchGet, ScratchPut,
    StatusReply, StatusRequest,
};
use rand::seq::SliceRandom;

pub use conn::Conn;
pub use error::ClientError;
pub use kv::{BatchOp, CasOutcome, Expect, Kv, OpApplied, ReadMode, Scanner, Served};
pub use watch::{Watch, WatchEvent, WatchUpdate};

/// Redirects followed per request.
pub const MAX_HOPS: usize = 8;

/// A client of one cluster.
#[derive(Debug, Clone)]
pub struct Client {
    seeds: Vec<SocketAddr>,
    timeout: Duration,
    conns: Arc<Mutex<HashMap<SocketAddr, Conn>>>,
    /// Where meta's leader answered last.
    leader: Arc<Mutex<Option<SocketAddr>>>,
    /// Collections, ranges and range leaders (see [`kv`]).
    cache: Arc<Mutex<kv::RangeCache>>,
    /// Round-robin position of follower reads.
    follower_turn: Arc<AtomicU64>,
    /// This client's request ids (writes are deduplicated per range by them).
    ids: Arc<kv::RequestIds>,
    /// Sends of writes whose earlier send's outcome was unknown.
    resends: Arc<AtomicU64>,
    /// Batch ops sent again under a new request id after a split moved their keys.
    regrouped: Arc<AtomicU64>,
}

/// A value read with the revision it was last written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub mod_revision: u64,
}

impl Client {
    /// A client that knows `seeds` (client-port addresses); each request (with its
    /// redirects) gives up after `timeout`.
    ///
    /// # Errors
    /// [`ClientError::InvalidArgument`] when `seeds` is empty.
    pub fn new(seeds: Vec<SocketAddr>, timeout: Duration) -> Result<Self, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::InvalidArgument {
                field: "seeds".into(),
                message: "at least one seed address is needed".into(),
            });
        }
        Ok(Client {
            seeds,
            timeout,
            conns: Arc::default(),
            leader: Arc::default(),
            cache: Arc::default(),
            follower_turn: Arc::default(),
            ids: Arc::new(kv::RequestIds::new()),
            resends: Arc::default(),
            regrouped: Arc::default(),
        })
    }

    /// The random id this client puts in its writes' request ids.
    pub fn client_id(&self) -> u64 {
        self.ids.client()
    }

    /// How many times a write was resent (same request id) after a send whose outcome was
    /// unknown: each is a write that would have failed with `UnknownOutcome` before request
    /// ids. Shared by clones.
    pub fn resent_writes(&self) -> u64 {
        self.resends.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many ops of batches ([`Kv::batch`]) were sent again, regrouped under a new request
    /// id, because a split moved their keys (refused before proposing, or not applied by the
    /// entry). Shared by clones.
    pub fn regrouped_batch_ops(&self) -> u64 {
        self.regrouped.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn conn(&self, addr: SocketAddr) -> Result<Conn, ClientError> {
        if let Some(c) = self.conns.lock().get(&addr) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = Conn::connect(addr, self.timeout).await?;
        self.conns.lock().insert(addr, c.clone());
        Ok(c)
    }

    async fn call_at(
        &self,
        addr: SocketAddr,
        req: ClientRequest,
        deadline: Instant,
    ) -> Result<ClientResponse_oneof_kind, ClientError> {
        let c = self.conn(addr).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, c.call(req))
            .await
            .map_err(|_| ClientError::Timeout)?;
        if r.is_err() {
            self.conns.lock().remove(&addr);
        }
        r
    }

    fn seed_order(&self) -> Vec<SocketAddr> {
        let mut s = self.seeds.clone();
        s.shuffle(&mut rand::thread_rng());
        s
    }

    /// Send `req` to any seed (reads that any node can answer), trying each in random order.
    async fn any(&self, req: ClientRequest) -> Result<ClientResponse_oneof_kind, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut last = ClientError::Unavailable("no seed reachable".into());
        for s in self.seed_order() {
            match self.call_at(s, req.clone(), deadline).await {
                Ok(ClientResponse_oneof_kind::error(e)) => last = ClientError::from_wire(&e),
                Ok(r) => return Ok(r),
                Err(e @ ClientError::Timeout) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Send `req` to meta's leader, following `NotLeader` hints (at most [`MAX_HOPS`]).
    async fn leader_call(
        &self,
        req: ClientRequest,
    ) -> Result<ClientResponse_oneof_kind, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut queue: Vec<SocketAddr> = self.leader.lock().iter().copied().collect();
        queue.extend(self.seed_order());
        let mut last = ClientError::Unavailable("no seed reachable".into());
        let mut hops = 0;
        while !queue.is_empty() && hops < MAX_HOPS + self.seeds.len() {
            hops += 1;
            let addr = queue.remove(0);
            match self.call_at(addr, req.clone(), deadline).await {
                Ok(ClientResponse_oneof_kind::error(e)) => {
                    if e.code == ClientError_Code::NOT_LEADER {
                        if let Ok(h) = e.leader_hint.parse::<SocketAddr>() {
                            queue.retain(|a| *a != h);
                            queue.insert(0, h);
                        } else {
                            // No leader known there yet (election): wait a little.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            queue.push(addr);
                        }
                    }
                    last = ClientError::from_wire(&e);
                    if matches!(
                        last,
                        ClientError::InvalidArgument { .. } | ClientError::TooLarge(_)
                    ) {
                        return Err(last);
                    }
                }
                Ok(r) => {
                    *self.leader.lock() = Some(addr);
                    return Ok(r);
                }
                Err(e @ ClientError::Timeout) => return Err(e),
                Err(e) => {
                    if *self.leader.lock() == Some(addr) {
                        *self.leader.lock() = None;
                    }
                    last = e;
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
        }
        if matches!(last, ClientError::NotLeader(_)) {
            return Err(ClientError::TooManyRedirects(MAX_HOPS));
        }
        Err(last)
    }

    /// The cluster as one node sees it.
    ///
    /// # Errors
    /// `NoMeta` before create-meta, or no seed reachable.
    pub async fn status(&self) -> Result<StatusReply, ClientError> {
        let mut req = ClientRequest::new();
        req.set_status(StatusRequest::new());
        match self.any(req).await? {
            ClientResponse_oneof_kind::status(s) => Ok(s),
            _ => Err(ClientError::Protocol("unexpected answer to status".into())),
        }
    }

    /// The cluster as meta's leader sees it (leader, cell membership).
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn leader_status(&self) -> Result<StatusReply, ClientError> {
        let s = self.status().await?;
        let Some(leader) = s.nodes.iter().find(|n| n.id == s.meta_leader) else {
            return Ok(s);
        };
        let Ok(addr) = leader.client_addr.parse::<SocketAddr>() else {
            return Ok(s);
        };
        let mut req = ClientRequest::new();
        req.set_status(StatusRequest::new());
        let deadline = Instant::now() + self.timeout;
        match self.call_at(addr, req, deadline).await {
            Ok(ClientResponse_oneof_kind::status(l)) if l.node == l.meta_leader => Ok(l),
            _ => Ok(s),
        }
    }

    /// Read `key` of the scratch space; `leader` for a linearizable read.
    ///
    /// # Errors
    /// Wire errors, unreachable nodes, timeout.
    pub async fn get(&self, key: &[u8], leader: bool) -> Result<Option<Versioned>, ClientError> {
        let mut req = ClientRequest::new();
        let mut g = ScratchGet::new();
        g.key = Bytes::copy_from_slice(key);
        g.leader = leader;
        req.set_get(g);
        let r = if leader {
            self.leader_call(req).await?
        } else {
            self.any(req).await?
        };
        match r {
            ClientResponse_oneof_kind::get(g) => Ok(g.found.then_some(Versioned {
                value: g.value,
                mod_revision: g.mod_revision,
            })),
            _ => Err(ClientError::Protocol("unexpected answer to get".into())),
        }
    }

    /// Write `key` of the scratch space; returns meta's revision after the write.
    ///
    /// # Errors
    /// Wire errors, unreachable nodes, timeout (the write may or may not have applied).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        let mut req = ClientRequest::new();
        let mut p = ScratchPut::new();
        p.key = Bytes::copy_from_slice(key);
        p.value = Bytes::copy_from_slice(value);
        req.set_put(p);
        match self.leader_call(req).await? {
            ClientResponse_oneof_kind::put(p) => Ok(p.revision),
            _ => Err(ClientError::Protocol("unexpected answer to put".into())),
        }
    }
}
