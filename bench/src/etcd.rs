//! etcd v3 over gRPC (`etcd-client`), the comparison baseline. Behind the `etcd` feature.
//!
//! - put: `Put`, acknowledged after the quorum commit (etcd fsyncs its WAL on every member).
//! - get: `Range` on one key; [`Consistency::Linearizable`] is etcd's default (a quorum
//!   read), [`Consistency::Follower`] is `serializable` (served by the member it reaches).
//! - put_batch: one `Txn` whose success branch holds every put (atomic, one raft entry).
//! - cas: a `Txn` comparing the value (or `create_revision == 0` for "absent").
//!
//! A connection is one `etcd_client::Client`: one HTTP/2 channel balanced over the endpoints;
//! requests from the clients sharing it are multiplexed on it.

use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp};

use crate::backend::{Backend, BackendError, BackendFactory, Consistency};
use crate::procstat;

/// The etcd counter of WAL fsyncs.
pub const FSYNC_METRIC: &str = "etcd_disk_wal_fsync_duration_seconds_count";

/// Opens `etcd_client::Client`s to `endpoints`.
#[derive(Debug, Clone)]
pub struct EtcdFactory {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prometheus pages whose [`FSYNC_METRIC`] is summed; by default `<endpoint>/metrics`.
    pub metrics_urls: Vec<String>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl EtcdFactory {
    /// A factory for `endpoints`, reading fsyncs from each endpoint's `/metrics`.
    pub fn new(endpoints: Vec<String>) -> Self {
        let metrics_urls = endpoints
            .iter()
            .map(|e| {
                let base = if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                };
                format!("{}/metrics", base.trim_end_matches('/'))
            })
            .collect();
        Self {
            endpoints,
            metrics_urls,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One etcd connection.
#[derive(Clone)]
pub struct EtcdBackend {
    kv: KvClient,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdBackend")
    }
}

fn failed(op: &'static str) -> impl FnOnce(etcd_client::Error) -> BackendError {
    move |e| BackendError::Request {
        op,
        reason: e.to_string(),
    }
}

impl Backend for EtcdBackend {
    async fn put(&self, key: Bytes, value: Bytes) -> Result<(), BackendError> {
        // KvClient is a handle on the shared channel: cloning it is cheap and lets many
        // requests be in flight through `&self`.
        self.kv
            .clone()
            .put(key.to_vec(), value.to_vec(), None)
            .await
            .map_err(failed("put"))?;
        Ok(())
    }

    async fn get(&self, key: Bytes, c: Consistency) -> Result<Option<Bytes>, BackendError> {
        let opts = match c {
            Consistency::Linearizable => None,
            Consistency::Follower => Some(GetOptions::new().with_serializable()),
        };
        let resp = self
            .kv
            .clone()
            .get(key.to_vec(), opts)
            .await
            .map_err(failed("get"))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| Bytes::copy_from_slice(kv.value())))
    }

    async fn put_batch(&self, items: &[(Bytes, Bytes)]) -> Result<(), BackendError> {
        let ops: Vec<TxnOp> = items
            .iter()
            .map(|(k, v)| TxnOp::put(k.to_vec(), v.to_vec(), None))
            .collect();
        self.kv
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(failed("put_batch"))?;
        Ok(())
    }

    async fn cas(
        &self,
        key: Bytes,
        expected: Option<Bytes>,
        new: Bytes,
    ) -> Result<bool, BackendError> {
        let cmp = match expected {
            Some(v) => Compare::value(key.to_vec(), CompareOp::Equal, v.to_vec()),
            None => Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(key.to_vec(), new.to_vec(), None)]);
        let resp = self.kv.clone().txn(txn).await.map_err(failed("cas"))?;
        Ok(resp.succeeded())
    }
}

impl BackendFactory for EtcdFactory {
    type Backend = EtcdBackend;

    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn connect(&self, _index: usize) -> Result<EtcdBackend, BackendError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(self.timeout);
        let client = Client::connect(&self.endpoints, Some(opts))
            .await
            .map_err(|e| BackendError::Connect {
                endpoint: self.endpoints.join(","),
                reason: e.to_string(),
            })?;
        Ok(EtcdBackend {
            kv: client.kv_client(),
        })
    }

    async fn fsync_count(&self) -> Option<u64> {
        procstat::scrape_sum(&self.metrics_urls, FSYNC_METRIC).await
    }
}
