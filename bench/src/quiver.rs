//! The Quiver backend: a placeholder until the `client` crate has a KV handle.
//!
//! To wire it: make [`QuiverFactory::connect`] open a `client` connection to `seeds` and a KV
//! handle on `collection`, make [`QuiverBackend`] hold it, map put/get/put_batch/cas onto it
//! (get with [`Consistency::Follower`] as a follower read), and report fsyncs from the nodes'
//! `/metrics` (admin port) in [`BackendFactory::fsync_count`].

use bytes::Bytes;

use crate::backend::{Backend, BackendError, BackendFactory, Consistency};

const NOT_BUILT: BackendError = BackendError::NotBuilt {
    backend: "quiver",
    why: "the Quiver KV client does not exist yet; the bench calls it once the client crate has it",
};

/// Connects to a Quiver cluster through its seeds.
#[derive(Debug, Clone)]
pub struct QuiverFactory {
    /// Client addresses of seed nodes.
    pub seeds: Vec<String>,
    /// The KV collection the workloads use.
    pub collection: String,
}

/// One connection to Quiver. No value of it exists yet: [`QuiverFactory::connect`] always
/// fails with [`BackendError::NotBuilt`].
#[derive(Debug)]
pub enum QuiverBackend {}

impl Backend for QuiverBackend {
    async fn put(&self, _key: Bytes, _value: Bytes) -> Result<(), BackendError> {
        match *self {}
    }

    async fn get(&self, _key: Bytes, _c: Consistency) -> Result<Option<Bytes>, BackendError> {
        match *self {}
    }

    async fn put_batch(&self, _items: &[(Bytes, Bytes)]) -> Result<(), BackendError> {
        match *self {}
    }
}

impl BackendFactory for QuiverFactory {
    type Backend = QuiverBackend;

    fn name(&self) -> &'static str {
        "quiver"
    }

    async fn connect(&self, _index: usize) -> Result<QuiverBackend, BackendError> {
        Err(NOT_BUILT)
    }
}
