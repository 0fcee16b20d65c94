//! KV collections: [`Kv`], the typed handle (`client.kv("name")`), and the range routing
//! behind it.
//!
//! # Routing
//! The client caches, per collection, its descriptor and the range descriptors it looked up
//! (key → descriptor by one meta `Lookup` at any seed), and per range the node that last
//! answered as its leader. A request goes to the cached leader, else the range's first
//! member; `NOT_LEADER{hint}` moves it to the hint (or the next member), `WRONG_RANGE` replaces
//! the cached descriptor with the one in the answer (or looks it up again), an unreachable
//! node moves it to the next member. At most [`MAX_ROUTE_HOPS`] hops and the client's timeout.
//!
//! # Writes are never applied twice
//! A write is retried only when it was definitely not applied: refused before it was
//! proposed (`NOT_LEADER`, `WRONG_RANGE`, a node that could not be reached). When the answer
//! is lost after the request was sent (connection lost, timeout) or the node reports an
//! unknown outcome, the write fails with [`ClientError::UnknownOutcome`]: it may or may not
//! have applied, and the caller decides (a `cas` on the version makes the retry safe).
//!
//! Keys in this API are collection-relative; the client adds the collection's prefix (its
//! slice of the global keyspace) and strips it from answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::clientpb::{
    ClientError_Code, ClientRequest, ClientResponse_oneof_kind, CreateCollection, KvRequest, Lookup,
};
use proto::kvpb::{self, Response_oneof_result};
use proto::metapb::{CollectionDescriptor, RangeDescriptor};
use protobuf::Message;

use crate::{Client, ClientError};

/// Hops (redirects, stale descriptors, unreachable members) per request.
pub const MAX_ROUTE_HOPS: usize = 16;

/// Where a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// At the range's leader, linearizable (lease or ReadIndex).
    #[default]
    Leader,
    /// At any replica; may lag (the header carries the applied index).
    Follower,
}

/// The compare of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The current value equals this.
    Value(Vec<u8>),
    /// The key's version equals this (0 = absent).
    Version(u64),
    /// The key does not exist.
    Absent,
}

/// The outcome of a compare-and-swap.
#[derive(Debug, Clone, PartialEq)]
pub struct CasOutcome {
    pub succeeded: bool,
    /// The key before the command (collection-relative key), if it existed.
    pub current: Option<kvpb::KeyValue>,
    /// The range's revision after the command.
    pub revision: u64,
}

/// What the client caches about collections and ranges.
#[derive(Debug, Default)]
pub(crate) struct RangeCache {
    collections: HashMap<String, CollectionDescriptor>,
    /// Per collection id: range descriptors (full keys).
    ranges: HashMap<u64, Vec<RangeDescriptor>>,
    /// Per range id: the node that answered as its leader last.
    leaders: HashMap<u64, SocketAddr>,
}

impl RangeCache {
    fn find(&self, name: &str, full: &[u8]) -> Option<(CollectionDescriptor, RangeDescriptor)> {
        let c = self.collections.get(name)?;
        let r = self
            .ranges
            .get(&c.id)?
            .iter()
            .find(|r| r.lo.as_ref() <= full && full < r.hi.as_ref())?;
        Some((c.clone(), r.clone()))
    }

    fn put_range(&mut self, r: RangeDescriptor) {
        let v = self.ranges.entry(r.collection).or_default();
        v.retain(|o| o.id != r.id && !(o.lo < r.hi && r.lo < o.hi));
        v.push(r);
    }

    fn forget(&mut self, name: &str) {
        if let Some(c) = self.collections.remove(name) {
            self.ranges.remove(&c.id);
        }
    }
}

fn with_prefix(prefix: &[u8], key: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(prefix.len() + key.len());
    v.extend_from_slice(prefix);
    v.extend_from_slice(key);
    Bytes::from(v)
}

fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::new()
}

fn strip(prefix: &[u8], kv: &mut kvpb::KeyValue) {
    if let Some(rest) = kv.key.strip_prefix(prefix) {
        kv.key = Bytes::copy_from_slice(rest);
    }
}

fn response_error(e: &kvpb::Error) -> ClientError {
    let field = if e.field.is_empty() {
        "request".to_string()
    } else {
        e.field.clone()
    };
    match e.code {
        kvpb::ErrorCode::KEY_TOO_LARGE | kvpb::ErrorCode::VALUE_TOO_LARGE => {
            ClientError::TooLarge(format!("{field}: {} (limit {})", e.why, e.limit))
        }
        _ => ClientError::InvalidArgument {
            field,
            message: e.why.clone(),
        },
    }
}

fn check_key(key: &[u8]) -> Result<(), ClientError> {
    if key.is_empty() {
        return Err(ClientError::InvalidArgument {
            field: "key".into(),
            message: "must not be empty".into(),
        });
    }
    Ok(())
}

impl Client {
    /// A typed handle on KV collection `name`.
    pub fn kv(&self, name: &str) -> Kv {
        Kv {
            client: self.clone(),
            name: name.to_string(),
            read: ReadMode::Leader,
        }
    }

    /// Create a collection from `spec` (name, kind, persistence, replication, factor, split
    /// size, retention); returns the stored descriptor (with its id and prefix).
    ///
    /// # Errors
    /// `Conflict` for a duplicate name, `InvalidArgument` for bad values, unreachable seeds.
    pub async fn create_collection(
        &self,
        spec: CollectionDescriptor,
    ) -> Result<CollectionDescriptor, ClientError> {
        let mut req = ClientRequest::new();
        let mut c = CreateCollection::new();
        c.set_spec(spec);
        req.set_create_collection(c);
        let deadline = Instant::now() + self.timeout;
        let mut last = ClientError::Unavailable("no seed reachable".into());
        for s in self.seed_order() {
            match self.call_at(s, req.clone(), deadline).await {
                Ok(ClientResponse_oneof_kind::collection(d)) => return Ok(d),
                Ok(ClientResponse_oneof_kind::error(e)) => {
                    let err = ClientError::from_wire(&e);
                    if e.code != ClientError_Code::UNAVAILABLE {
                        return Err(err);
                    }
                    last = err;
                }
                Ok(_) => return Err(ClientError::Protocol("unexpected answer".into())),
                // Sent but unanswered: it may have been created; do not send it twice.
                Err(e @ (ClientError::Timeout | ClientError::ConnectionLost(_))) => {
                    return Err(ClientError::UnknownOutcome(e.to_string()))
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Collection descriptor and range descriptor for `key` (collection-relative).
    async fn lookup(
        &self,
        name: &str,
        key: &[u8],
    ) -> Result<(CollectionDescriptor, RangeDescriptor), ClientError> {
        let mut req = ClientRequest::new();
        let mut l = Lookup::new();
        l.collection = name.to_string();
        l.key = Bytes::copy_from_slice(key);
        req.set_lookup(l);
        match self.any(req).await? {
            ClientResponse_oneof_kind::lookup(mut r) => {
                let c = r.take_collection();
                if !r.has_range() {
                    return Err(ClientError::Unavailable(format!(
                        "no range of collection {name:?} holds the key"
                    )));
                }
                let range = r.take_range();
                let mut cache = self.cache.lock();
                cache.collections.insert(name.to_string(), c.clone());
                cache.put_range(range.clone());
                Ok((c, range))
            }
            _ => Err(ClientError::Protocol("unexpected answer to lookup".into())),
        }
    }

    /// Route one command (full keys built by `build` from the collection prefix) to the
    /// range holding `key`.
    async fn route(
        &self,
        name: &str,
        key: &[u8],
        write: bool,
        mode: ReadMode,
        build: &(dyn Fn(&[u8], &RangeDescriptor) -> kvpb::Command + Sync),
    ) -> Result<(kvpb::Response, CollectionDescriptor, RangeDescriptor), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut last = ClientError::Unavailable("no replica reachable".into());
        let mut skip: Vec<SocketAddr> = Vec::new();
        // Redirects that named a target (hint, fresher descriptor); waits for an election or
        // an unreachable member are bounded by the deadline instead.
        let mut hops = 0;
        let mut backoff = Duration::from_millis(20);
        while hops <= MAX_ROUTE_HOPS {
            if Instant::now() >= deadline {
                return Err(match last {
                    ClientError::NotLeader(_) | ClientError::WrongRange(_) => ClientError::Timeout,
                    e => e,
                });
            }
            let cached = {
                let c = self.cache.lock();
                c.collections
                    .get(name)
                    .and_then(|cd| c.find(name, &with_prefix(&cd.prefix, key)))
            };
            let (coll, range) = match cached {
                Some(x) => x,
                None => self.lookup(name, key).await?,
            };
            let members: Vec<SocketAddr> = range
                .members
                .iter()
                .filter_map(|m| m.client_addr.parse().ok())
                .collect();
            if members.is_empty() {
                last = ClientError::Unavailable(format!(
                    "range {} of {name:?} has no replicas yet (under-replicated)",
                    range.id
                ));
                self.cache.lock().forget(name);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let leader = self.cache.lock().leaders.get(&range.id).copied();
            let target = leader
                .filter(|l| !skip.contains(l))
                .or_else(|| members.iter().copied().find(|m| !skip.contains(m)))
                .unwrap_or_else(|| {
                    skip.clear();
                    members[0]
                });
            let cmd = build(&coll.prefix, &range);
            let bytes = cmd
                .write_to_bytes()
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let mut req = ClientRequest::new();
            let mut k = KvRequest::new();
            k.range = range.id;
            k.epoch = range.epoch;
            k.command = bytes.into();
            k.follower = !write && mode == ReadMode::Follower;
            req.set_kv(k);
            match self.call_at(target, req, deadline).await {
                Ok(ClientResponse_oneof_kind::kv(r)) => {
                    let resp = kvpb::Response::parse_from_carllerche_bytes(&r.response)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    if write || mode == ReadMode::Leader {
                        self.cache.lock().leaders.insert(range.id, target);
                    }
                    if let Some(Response_oneof_result::error(e)) = &resp.result {
                        return Err(response_error(e));
                    }
                    return Ok((resp, coll, range));
                }
                Ok(ClientResponse_oneof_kind::error(e)) => {
                    last = ClientError::from_wire(&e);
                    match e.code {
                        ClientError_Code::NOT_LEADER => {
                            match e.leader_hint.parse::<SocketAddr>() {
                                // A hint at a node that just failed to answer is stale
                                // (the election has not timed out there yet): wait instead.
                                Ok(h) if h != target && !skip.contains(&h) => {
                                    hops += 1;
                                    self.cache.lock().leaders.insert(range.id, h);
                                }
                                _ => {
                                    // No leader known there (an election): next member, wait.
                                    self.cache.lock().leaders.remove(&range.id);
                                    skip.push(target);
                                    tokio::time::sleep(backoff).await;
                                    backoff = (backoff * 2).min(Duration::from_millis(300));
                                }
                            }
                        }
                        ClientError_Code::WRONG_RANGE => {
                            hops += 1;
                            let mut c = self.cache.lock();
                            let fresh = e.get_range();
                            if e.has_range() && fresh.epoch > range.epoch {
                                c.put_range(fresh.clone());
                            } else {
                                c.forget(name);
                                c.leaders.remove(&range.id);
                                skip.push(target);
                            }
                        }
                        ClientError_Code::UNAVAILABLE if !write => {
                            skip.push(target);
                        }
                        _ => return Err(last),
                    }
                }
                Ok(_) => return Err(ClientError::Protocol("unexpected answer".into())),
                Err(e @ (ClientError::Timeout | ClientError::ConnectionLost(_))) if write => {
                    return Err(ClientError::UnknownOutcome(e.to_string()))
                }
                Err(ClientError::Timeout) => return Err(ClientError::Timeout),
                Err(e) => {
                    self.cache.lock().leaders.remove(&range.id);
                    skip.push(target);
                    last = e;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(300));
                }
            }
        }
        Err(match last {
            ClientError::NotLeader(_) | ClientError::WrongRange(_) => {
                ClientError::TooManyRedirects(MAX_ROUTE_HOPS)
            }
            e => e,
        })
    }
}

/// A handle on one KV collection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Kv {
    client: Client,
    name: String,
    read: ReadMode,
}

impl Kv {
    /// The same handle reading with `mode`.
    pub fn with_reads(mut self, mode: ReadMode) -> Self {
        self.read = mode;
        self
    }

    /// The collection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read `key`; `None` if absent.
    ///
    /// # Errors
    /// Routing failures, typed command errors.
    pub async fn get(&self, key: &[u8]) -> Result<Option<kvpb::KeyValue>, ClientError> {
        check_key(key)?;
        let k = key.to_vec();
        let (mut resp, c, _) = self
            .client
            .route(&self.name, key, false, self.read, &|p, _| {
                let mut g = kvpb::Get::new();
                g.key = with_prefix(p, &k);
                let mut cmd = kvpb::Command::new();
                cmd.set_get(g);
                cmd
            })
            .await?;
        match resp.result.take() {
            Some(Response_oneof_result::get(mut g)) => Ok(g.kv.take().map(|mut kv| {
                strip(&c.prefix, &mut kv);
                kv
            })),
            _ => Err(ClientError::Protocol("unexpected reply to get".into())),
        }
    }

    /// Write `key`; returns the range's revision after the write.
    ///
    /// # Errors
    /// Routing failures, typed command errors, [`ClientError::UnknownOutcome`].
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        check_key(key)?;
        let (k, v) = (key.to_vec(), Bytes::copy_from_slice(value));
        let (resp, _, _) = self
            .client
            .route(&self.name, key, true, ReadMode::Leader, &|p, _| {
                let mut put = kvpb::Put::new();
                put.key = with_prefix(p, &k);
                put.value = v.clone();
                let mut cmd = kvpb::Command::new();
                cmd.set_put(put);
                cmd
            })
            .await?;
        Ok(resp.get_header().revision)
    }

    /// Delete `key`; returns whether it existed.
    ///
    /// # Errors
    /// As [`Kv::put`].
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        check_key(key)?;
        let k = key.to_vec();
        let (resp, _, _) = self
            .client
            .route(&self.name, key, true, ReadMode::Leader, &|p, _| {
                let mut d = kvpb::Delete::new();
                d.key = with_prefix(p, &k);
                let mut cmd = kvpb::Command::new();
                cmd.set_delete(d);
                cmd
            })
            .await?;
        match resp.result {
            Some(Response_oneof_result::delete(d)) => Ok(d.deleted > 0),
            _ => Ok(false),
        }
    }

    /// Compare-and-swap: if `expect` holds, write `new_value` (or delete the key when
    /// `None`).
    ///
    /// # Errors
    /// As [`Kv::put`].
    pub async fn cas(
        &self,
        key: &[u8],
        expect: Expect,
        new_value: Option<&[u8]>,
    ) -> Result<CasOutcome, ClientError> {
        check_key(key)?;
        let k = key.to_vec();
        let nv = new_value.map(Bytes::copy_from_slice);
        let (resp, c, _) = self
            .client
            .route(&self.name, key, true, ReadMode::Leader, &|p, _| {
                let mut cas = kvpb::Cas::new();
                cas.key = with_prefix(p, &k);
                match &expect {
                    Expect::Value(v) => {
                        cas.target = kvpb::CompareTarget::VALUE;
                        cas.value = Bytes::copy_from_slice(v);
                    }
                    Expect::Version(n) => {
                        cas.target = kvpb::CompareTarget::VERSION;
                        cas.number = *n;
                    }
                    Expect::Absent => cas.target = kvpb::CompareTarget::ABSENT,
                }
                match &nv {
                    Some(v) => cas.new_value = v.clone(),
                    None => cas.delete = true,
                }
                let mut cmd = kvpb::Command::new();
                cmd.set_cas(cas);
                cmd
            })
            .await?;
        let revision = resp.get_header().revision;
        match resp.result {
            Some(Response_oneof_result::cas(mut r)) => Ok(CasOutcome {
                succeeded: r.succeeded,
                current: r.current.take().map(|mut kv| {
                    strip(&c.prefix, &mut kv);
                    kv
                }),
                revision,
            }),
            _ => Err(ClientError::Protocol(
                "no compare-and-swap result (async replication answers before apply)".into(),
            )),
        }
    }

    /// Keys in `[start, end)` (`end` empty: to the end of the collection), at most `limit`
    /// (0: no limit), fetched in bounded pages across ranges.
    ///
    /// # Errors
    /// Routing failures.
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<kvpb::KeyValue>, ClientError> {
        let mut out = Vec::new();
        // Collection-relative cursor; `None` once done.
        let mut cursor = Some(start.to_vec());
        while let Some(from) = cursor.take() {
            let want = if limit == 0 { 0 } else { limit - out.len() };
            let end_rel = end.to_vec();
            let (resp, c, range) = self
                .client
                .route(&self.name, &from, false, self.read, &|p, r| {
                    let mut s = kvpb::Scan::new();
                    s.start = with_prefix(p, &from);
                    let full_end = if end_rel.is_empty() {
                        prefix_end(p)
                    } else {
                        with_prefix(p, &end_rel)
                    };
                    s.end = if full_end.as_ref() < r.hi.as_ref() {
                        full_end
                    } else {
                        r.hi.clone()
                    };
                    s.limit = want as u64;
                    let mut cmd = kvpb::Command::new();
                    cmd.set_scan(s);
                    cmd
                })
                .await?;
            let Some(Response_oneof_result::scan(s)) = resp.result else {
                return Err(ClientError::Protocol("unexpected reply to scan".into()));
            };
            for mut kv in s.kvs.into_iter() {
                strip(&c.prefix, &mut kv);
                out.push(kv);
            }
            if limit != 0 && out.len() >= limit {
                out.truncate(limit);
                break;
            }
            let rel = |full: &[u8]| full.strip_prefix(c.prefix.as_ref()).map(<[u8]>::to_vec);
            if s.more {
                cursor = rel(&s.next_key);
            } else if range.hi.as_ref() < prefix_end(&c.prefix).as_ref() {
                // The next range of the collection, unless past `end`.
                let next = rel(&range.hi);
                cursor = next.filter(|n| end.is_empty() || n.as_slice() < end);
            }
        }
        Ok(out)
    }
}
