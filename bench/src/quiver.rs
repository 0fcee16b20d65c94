//! The Quiver backend: a `client` KV handle on `collection`, reached through `seeds`.
//!
//! put/get/cas map onto [`client::Kv`]; get with [`Consistency::Follower`] is a follower
//! read; `put_batch` is [`client::Kv::put_batch`]: one `Batch` command (one raft entry) per
//! range the keys route to, as etcd's backend sends one Txn (atomic when the keys lie in one
//! range, as with the benchmark's collection; across ranges each range's share applies on its
//! own). The collection must exist (`quiver create-collection`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use client::{Client, Expect, Kv, ReadMode};

use crate::backend::{Backend, BackendError, BackendFactory, Consistency};

/// Connects to a Quiver cluster through its seeds.
#[derive(Debug, Clone)]
pub struct QuiverFactory {
    /// Client addresses of seed nodes.
    pub seeds: Vec<String>,
    /// The KV collection the workloads use.
    pub collection: String,
}

/// One Quiver client with a handle on the collection (leader and follower reads).
#[derive(Debug)]
pub struct QuiverBackend {
    leader: Kv,
    follower: Kv,
}

fn req(op: &'static str, e: client::ClientError) -> BackendError {
    BackendError::Request {
        op,
        reason: e.to_string(),
    }
}

impl Backend for QuiverBackend {
    async fn put(&self, key: Bytes, value: Bytes) -> Result<(), BackendError> {
        self.leader
            .put(&key, &value)
            .await
            .map(|_| ())
            .map_err(|e| req("put", e))
    }

    async fn get(&self, key: Bytes, c: Consistency) -> Result<Option<Bytes>, BackendError> {
        let kv = match c {
            Consistency::Linearizable => &self.leader,
            Consistency::Follower => &self.follower,
        };
        kv.get(&key)
            .await
            .map(|v| v.map(|kv| kv.value))
            .map_err(|e| req("get", e))
    }

    async fn put_batch(&self, items: &[(Bytes, Bytes)]) -> Result<(), BackendError> {
        let results = self
            .leader
            .put_batch(items)
            .await
            .map_err(|e| req("put_batch", e))?;
        for r in results {
            r.map_err(|e| req("put_batch", e))?;
        }
        Ok(())
    }

    async fn cas(
        &self,
        key: Bytes,
        expected: Option<Bytes>,
        new: Bytes,
    ) -> Result<bool, BackendError> {
        let expect = match expected {
            Some(v) => Expect::Value(v.to_vec()),
            None => Expect::Absent,
        };
        self.leader
            .cas(&key, expect, Some(&new))
            .await
            .map(|o| o.succeeded)
            .map_err(|e| req("cas", e))
    }
}

impl BackendFactory for QuiverFactory {
    type Backend = QuiverBackend;

    fn name(&self) -> &'static str {
        "quiver"
    }

    async fn connect(&self, _index: usize) -> Result<QuiverBackend, BackendError> {
        let endpoint = self.seeds.join(",");
        let seeds: Vec<SocketAddr> = self
            .seeds
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| BackendError::Connect {
                endpoint: endpoint.clone(),
                reason: format!("bad seed address: {e}"),
            })?;
        let c = Client::new(seeds, Duration::from_secs(10)).map_err(|e| BackendError::Connect {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?;
        let leader = c.kv(&self.collection);
        // Fail early when the collection does not exist.
        match leader.get(b"\x00bench-probe").await {
            Ok(_) => {}
            Err(e) => {
                return Err(BackendError::Connect {
                    endpoint,
                    reason: e.to_string(),
                })
            }
        }
        let follower = leader.clone().with_reads(ReadMode::Follower);
        Ok(QuiverBackend { leader, follower })
    }
}
