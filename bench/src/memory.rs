//! An in-process backend: a map behind a lock, with optional latency and injected errors.
//! It measures the harness, not a store; tests use it to check counting and error handling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

use crate::backend::{Backend, BackendError, BackendFactory, Consistency};

#[derive(Debug, Default)]
struct Shared {
    /// A std mutex: no `.await` while it is held.
    map: Mutex<HashMap<Bytes, Bytes>>,
    requests: AtomicU64,
    /// Counts one "fsync" per write request, as a store without group commit would.
    fsyncs: AtomicU64,
}

/// Factory of [`MemoryBackend`] connections that all share one map.
#[derive(Debug, Clone, Default)]
pub struct MemoryFactory {
    shared: Arc<Shared>,
    /// Sleep this long in every request (0: answer at once).
    pub latency: Duration,
    /// Fail every n-th request (0: never).
    pub fail_every: u64,
}

impl MemoryFactory {
    /// A factory with no latency and no errors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sleep `latency` in every request.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Fail every `n`-th request (0: never).
    #[must_use]
    pub fn with_fail_every(mut self, n: u64) -> Self {
        self.fail_every = n;
        self
    }

    /// Requests served so far (including failed ones).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Number of keys stored.
    pub fn len(&self) -> usize {
        self.shared.map.lock().map_or(0, |m| m.len())
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One "connection" to the shared map.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
    latency: Duration,
    fail_every: u64,
}

impl MemoryBackend {
    async fn begin(&self, op: &'static str) -> Result<(), BackendError> {
        let n = self.shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        } else {
            tokio::task::yield_now().await;
        }
        if self.fail_every > 0 && n % self.fail_every == 0 {
            return Err(BackendError::Request {
                op,
                reason: format!("injected failure #{n}"),
            });
        }
        Ok(())
    }

    /// The locked map; a poisoned lock fails request `op`.
    fn map(&self, op: &'static str) -> Result<MutexGuard<'_, HashMap<Bytes, Bytes>>, BackendError> {
        self.shared.map.lock().map_err(|_| BackendError::Request {
            op,
            reason: "memory map poisoned".into(),
        })
    }

    fn write(&self, op: &'static str, items: &[(Bytes, Bytes)]) -> Result<(), BackendError> {
        let mut m = self.map(op)?;
        for (k, v) in items {
            m.insert(k.clone(), v.clone());
        }
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Backend for MemoryBackend {
    async fn put(&self, key: Bytes, value: Bytes) -> Result<(), BackendError> {
        self.begin("put").await?;
        self.write("put", &[(key, value)])
    }

    async fn get(&self, key: Bytes, _c: Consistency) -> Result<Option<Bytes>, BackendError> {
        self.begin("get").await?;
        let m = self.map("get")?;
        Ok(m.get(&key).cloned())
    }

    async fn put_batch(&self, items: &[(Bytes, Bytes)]) -> Result<(), BackendError> {
        self.begin("put_batch").await?;
        // Like etcd's txn: one key twice in a batch is a client bug, refused.
        for (i, (k, _)) in items.iter().enumerate() {
            if items[..i].iter().any(|(p, _)| p == k) {
                return Err(BackendError::Request {
                    op: "put_batch",
                    reason: "duplicate key in batch".into(),
                });
            }
        }
        self.write("put_batch", items)
    }

    async fn cas(
        &self,
        key: Bytes,
        expected: Option<Bytes>,
        new: Bytes,
    ) -> Result<bool, BackendError> {
        self.begin("cas").await?;
        let mut m = self.map("cas")?;
        if m.get(&key) != expected.as_ref() {
            return Ok(false);
        }
        m.insert(key, new);
        Ok(true)
    }
}

impl BackendFactory for MemoryFactory {
    type Backend = MemoryBackend;

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn connect(&self, _index: usize) -> Result<MemoryBackend, BackendError> {
        Ok(MemoryBackend {
            shared: self.shared.clone(),
            latency: self.latency,
            fail_every: self.fail_every,
        })
    }

    async fn fsync_count(&self) -> Option<u64> {
        Some(self.shared.fsyncs.load(Ordering::Relaxed))
    }
}
