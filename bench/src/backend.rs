//! The seam between the harness and a system under test.
//!
//! A [`BackendFactory`] opens connections ([`BackendFactory::connect`]); the runner shares each
//! connection among `clients / connections` client tasks, so a [`Backend`] must allow many
//! requests in flight at once through `&self`. What a "connection" is (one TCP connection, one
//! HTTP/2 channel, a pool) is the factory's business.

use std::future::Future;

use bytes::Bytes;

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started (leader lease or ReadIndex in
    /// Quiver, the default quorum read in etcd).
    Linearizable,
    /// Served by whichever replica answers, possibly stale (Quiver follower read, etcd
    /// `serializable`).
    Follower,
}

/// Why one request failed. The runner counts errors; it never stops a run for one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend does not support this operation (e.g. CAS).
    #[error("the {backend} backend does not support {op}")]
    Unsupported {
        backend: &'static str,
        op: &'static str,
    },
    /// Opening a connection failed.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The request was sent and failed (a server error, a timeout, a broken connection).
    #[error("{op} failed: {reason}")]
    Request { op: &'static str, reason: String },
}

/// One connection to the system under test.
///
/// # Correctness requirements
/// - Every method may be called concurrently from many tasks through `&self`.
/// - A method returns `Ok` only once the system acknowledged the request with the durability or
///   freshness it promises for it: a put is acknowledged after its commit, a
///   [`Consistency::Linearizable`] get reflects every put acknowledged before it started.
/// - `put_batch` writes all pairs or none (one request, one atomic batch) when the system
///   offers that; the runner counts it as `items.len()` ops and one latency sample.
///
/// # Errors
/// Each method returns [`BackendError`] for a failed request; the runner counts it and goes on.
pub trait Backend: Send + Sync + 'static {
    /// Write `value` under `key`.
    fn put(
        &self,
        key: Bytes,
        value: Bytes,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Read `key`; `Ok(None)` when it is absent.
    fn get(
        &self,
        key: Bytes,
        consistency: Consistency,
    ) -> impl Future<Output = Result<Option<Bytes>, BackendError>> + Send;

    /// Write all pairs in one request.
    fn put_batch(
        &self,
        items: &[(Bytes, Bytes)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Compare-and-swap: write `new` if the current value equals `expected` (`None`: absent).
    /// `Ok(false)` when the comparison failed. Optional: the default is
    /// [`BackendError::Unsupported`].
    fn cas(
        &self,
        key: Bytes,
        expected: Option<Bytes>,
        new: Bytes,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let _ = (key, expected, new);
        async {
            Err(BackendError::Unsupported {
                backend: "this",
                op: "cas",
            })
        }
    }
}

/// Opens connections to one system and reports its server-side counters.
pub trait BackendFactory: Send + Sync + 'static {
    /// The connection type.
    type Backend: Backend;

    /// Name in reports (`etcd`, `quiver`, `memory`).
    fn name(&self) -> &'static str;

    /// Open connection number `index` (0-based); the runner opens `--connections` of them.
    fn connect(
        &self,
        index: usize,
    ) -> impl Future<Output = Result<Self::Backend, BackendError>> + Send;

    /// Total fsyncs the servers have done so far (a counter; the runner takes the difference
    /// over the measured window), or `None` when the system cannot tell.
    fn fsync_count(&self) -> impl Future<Output = Option<u64>> + Send {
        async { None }
    }
}
