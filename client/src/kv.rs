//! KV collections: [`Kv`], the typed handle (`client.kv("name")`), and the range routing
//! behind it.
//!
//! # Routing
//! The client caches, per collection, its descriptor and the range descriptors it looked up
//! (key → descriptor by one meta `Lookup` at any seed), and per range the node that last
//! answered as its leader. A write or leader read goes to the cached leader, else the range's
//! first member; a follower read goes round robin over the range's members. Then:
//! - `NOT_LEADER{hint}` moves it to the hint; without a hint (an election) it moves to the
//!   next member after a backoff wait.
//! - `WRONG_RANGE{descriptor}` with a higher epoch than the cached one replaces the cached
//!   descriptor; otherwise (the node's meta may still show the parent of a split for a second
//!   or two, or not know the range yet) the collection's cached ranges are dropped and looked
//!   up again after a backoff wait. A `KEY_OUT_OF_RANGE` reply (the range split under a stale
//!   descriptor; nothing changed) is handled the same way.
//! - An unreachable node moves it to the next member after a backoff wait.
//!
//! Waits grow exponentially from [`BACKOFF_MIN`] to [`BACKOFF_MAX`] (jittered); the only
//! bound is the client's timeout per request, not a hop count, so routing rides out a split
//! whose meta change has not reached every node yet.
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

    /// Cache `r`, replacing the descriptors it overlaps, unless the cache holds the same
    /// range at a higher epoch (a lookup answered from a lagging meta).
    fn put_range(&mut self, r: RangeDescriptor) {
        let v = self.ranges.entry(r.collection).or_default();
        if v.iter().any(|o| o.id == r.id && o.epoch > r.epoch) {
            return;
        }
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

    /// The cached collection and range for `key`, else one lookup. Lookup failures that a
    /// retry can fix (no seed reachable, meta electing) are retried with `backoff` until
    /// `deadline`.
    async fn resolve(
        &self,
        name: &str,
        key: &[u8],
        deadline: Instant,
        backoff: &mut Backoff,
    ) -> Result<(CollectionDescriptor, RangeDescriptor), ClientError> {
        loop {
            let cached = {
                let c = self.cache.lock();
                c.collections
                    .get(name)
                    .and_then(|cd| c.find(name, &with_prefix(&cd.prefix, key)))
            };
            if let Some(x) = cached {
                return Ok(x);
            }
            match self.lookup(name, key).await {
                Ok(x) => return Ok(x),
                Err(
                    e @ (ClientError::Unavailable(_)
                    | ClientError::Connect { .. }
                    | ClientError::ConnectionLost(_)
                    | ClientError::NoMeta),
                ) if Instant::now() + backoff.peek() < deadline => {
                    let _ = e;
                    backoff.wait().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Route one command (full keys built by `build` from the collection prefix) to the
    /// range holding `key`, until it is answered or the client's timeout passes (see the
    /// module docs for the rules).
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
        let mut backoff = Backoff::new();
        // Hints followed in a row without a wait (two nodes naming each other during an
        // election would otherwise spin).
        let mut hints = 0;
        loop {
            if Instant::now() >= deadline {
                return Err(match last {
                    ClientError::NotLeader(_) | ClientError::WrongRange(_) => ClientError::Timeout,
                    e => e,
                });
            }
            let (coll, range) = self.resolve(name, key, deadline, &mut backoff).await?;
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
                backoff.wait().await;
                continue;
            }
            let follower = !write && mode == ReadMode::Follower;
            let target = if follower {
                self.pick_follower(range.id, &members, &skip)
            } else {
                let leader = self.cache.lock().leaders.get(&range.id).copied();
                leader
                    .filter(|l| !skip.contains(l))
                    .or_else(|| members.iter().copied().find(|m| !skip.contains(m)))
                    .unwrap_or_else(|| {
                        skip.clear();
                        members[0]
                    })
            };
            let cmd = build(&coll.prefix, &range);
            let bytes = cmd
                .write_to_bytes()
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let mut req = ClientRequest::new();
            let mut k = KvRequest::new();
            k.range = range.id;
            k.epoch = range.epoch;
            k.command = bytes.into();
            k.follower = follower;
            req.set_kv(k);
            match self.call_at(target, req, deadline).await {
                Ok(ClientResponse_oneof_kind::kv(r)) => {
                    let resp = kvpb::Response::parse_from_carllerche_bytes(&r.response)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    if !follower {
                        self.cache.lock().leaders.insert(range.id, target);
                    }
                    if let Some(Response_oneof_result::error(e)) = &resp.result {
                        if e.code == kvpb::ErrorCode::KEY_OUT_OF_RANGE {
                            // The range split under a stale descriptor: nothing changed.
                            last = ClientError::WrongRange(e.why.clone());
                            self.cache.lock().forget(name);
                            backoff.wait().await;
                            continue;
                        }
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
                                    self.cache.lock().leaders.insert(range.id, h);
                                    hints += 1;
                                    if hints > members.len() {
                                        hints = 0;
                                        backoff.wait().await;
                                    }
                                }
                                _ => {
                                    // No leader known there (an election): next member, wait.
                                    self.cache.lock().leaders.remove(&range.id);
                                    skip.push(target);
                                    backoff.wait().await;
                                }
                            }
                        }
                        ClientError_Code::WRONG_RANGE => {
                            let fresh = e.get_range();
                            let newer =
                                e.has_range() && fresh.id == range.id && fresh.epoch > range.epoch;
                            {
                                let mut c = self.cache.lock();
                                if newer {
                                    c.put_range(fresh.clone());
                                } else {
                                    // The node's meta may still show the parent of a split
                                    // (or not know the range yet): look it up again later.
                                    c.forget(name);
                                    c.leaders.remove(&range.id);
                                }
                            }
                            if !newer {
                                skip.push(target);
                                backoff.wait().await;
                            }
                        }
                        ClientError_Code::UNAVAILABLE | ClientError_Code::INTERNAL if !write => {
                            skip.push(target);
                            backoff.wait().await;
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
                    backoff.wait().await;
                }
            }
        }
    }

    /// A member of the range for a follower read: round robin over the members not
    /// skipped, so follower reads spread over the replicas (and reach followers).
    fn pick_follower(&self, range: u64, members: &[SocketAddr], skip: &[SocketAddr]) -> SocketAddr {
        let n = self
            .follower_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize;
        let open: Vec<SocketAddr> = members
            .iter()
            .copied()
            .filter(|m| !skip.contains(m))
            .collect();
        let pool = if open.is_empty() { members } else { &open };
        pool[(n.wrapping_add(range as usize)) % pool.len()]
    }
}

/// Waits between routing retries: exponential from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], with
/// jitter (half to full of the step), so clients that hit the same election do not retry
/// in lock step.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

/// The first wait of a routing retry.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait between routing retries.
pub const BACKOFF_MAX: Duration = Duration::from_millis(200);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    /// The step the next wait is drawn from.
    pub(crate) fn peek(&self) -> Duration {
        self.next
    }

    /// The next wait (jittered) and the step after it.
    pub(crate) fn step(&mut self) -> Duration {
        let cur = self.next;
        self.next = (cur * 2).min(BACKOFF_MAX);
        let half = cur / 2;
        let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.step()).await;
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

    /// The client behind this handle (for [`crate::watch`]).
    pub(crate) fn client(&self) -> &Client {
        &self.client
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
