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
//! # Writes are applied once, and retried
//! Every put, delete and cas carries a request id (`kvpb.RequestId`: a random client id per
//! [`Client`], a seq per write, the client's lowest unanswered seq, and how many earlier sends
//! may have reached a range). Each range remembers the replies of recent ids and answers a
//! resent id with the recorded reply without applying it again (`collections::kv` dedup).
//! So when the answer is lost after the request was sent (connection lost, no answer within a
//! send's timeout, `UNKNOWN_OUTCOME` after a leader change), the client resends the *same* id
//! to the range's (possibly new) leader, with the backoff above, for at most
//! [`MAX_UNKNOWN_RETRIES`] sends, the client's timeout and [`RETRY_WINDOW`].
//! [`ClientError::UnknownOutcome`] is returned only when that budget runs out, or when the
//! range no longer remembers the id (`REQUEST_EXPIRED`): the write may or may not have
//! applied, and it will not apply later either.
//!
//! # Batches
//! [`Kv::batch`] groups its ops by the cached range holding each key and sends one `Batch`
//! command per range (concurrently), each with its own request id: a range applies its share
//! in one raft entry, op by op with consecutive revisions. The node checks that every op's
//! key lies in the range before proposing (else `WRONG_RANGE`: the client regroups); an op
//! whose key a split moved away before the entry applied gets `KEY_OUT_OF_RANGE` in its
//! slot, not applied, and only those ops are regrouped and sent again (under new ids: the
//! old id's reply says it did not apply them). Across ranges a batch is not atomic.
//!
//! A command whose answer was lost is resent whole, under its id, to the range it was sent
//! to, following that range's leader, also when a split separated its keys meanwhile: the
//! node proposes a resent batch to the range addressed whatever its keys (`seed::kv_port`),
//! and that range answers what the id did there: the recorded reply (a split copies the
//! range's ids to the daughter, so one applied before the split is remembered with every op
//! applied), with `KEY_OUT_OF_RANGE` in the slots of keys that had moved away (not applied:
//! regrouped as above), or, if no send applied, the resend's own apply, which refuses the
//! moved keys the same way.
//!
//! Keys in this API are collection-relative; the client adds the collection's prefix (its
//! slice of the global keyspace) and strips it from answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
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

/// What the client caches about collections and ranges. Descriptors are shared (`Arc`), so a
/// request that finds its range here copies nothing.
#[derive(Debug, Default)]
pub(crate) struct RangeCache {
    collections: HashMap<String, Arc<CollectionDescriptor>>,
    /// Per collection id: range descriptors (full keys).
    ranges: HashMap<u64, Vec<Arc<CachedRange>>>,
    /// Per range id: the node that answered as its leader last.
    leaders: HashMap<u64, SocketAddr>,
}

/// A cached range descriptor with its members' client addresses parsed once (members whose
/// address does not parse are left out).
#[derive(Debug)]
pub(crate) struct CachedRange {
    desc: RangeDescriptor,
    members: Vec<SocketAddr>,
}

impl CachedRange {
    fn new(desc: RangeDescriptor) -> Self {
        let members = desc
            .members
            .iter()
            .filter_map(|m| m.client_addr.parse().ok())
            .collect();
        CachedRange { desc, members }
    }
}

impl std::ops::Deref for CachedRange {
    type Target = RangeDescriptor;
    fn deref(&self) -> &RangeDescriptor {
        &self.desc
    }
}

/// Whether range `r` holds `prefix ‖ key` (`lo <= key < hi`).
pub(crate) fn holds(prefix: &[u8], key: &[u8], r: &RangeDescriptor) -> bool {
    use std::cmp::Ordering::Less;
    cmp_joined(prefix, key, &r.lo) != Less && cmp_joined(prefix, key, &r.hi) == Less
}

/// `prefix ‖ key` compared with `other`, without joining them.
pub(crate) fn cmp_joined(prefix: &[u8], key: &[u8], other: &[u8]) -> std::cmp::Ordering {
    let n = prefix.len().min(other.len());
    match prefix[..n].cmp(&other[..n]) {
        std::cmp::Ordering::Equal if n < prefix.len() => std::cmp::Ordering::Greater,
        std::cmp::Ordering::Equal => key.cmp(&other[n..]),
        o => o,
    }
}

impl RangeCache {
    /// The collection `name` and its cached range holding collection-relative `key`.
    fn find(
        &self,
        name: &str,
        key: &[u8],
    ) -> Option<(Arc<CollectionDescriptor>, Arc<CachedRange>)> {
        let c = self.collections.get(name)?;
        let r = self
            .ranges
            .get(&c.id)?
            .iter()
            .find(|r| holds(&c.prefix, key, r))?;
        Some((c.clone(), r.clone()))
    }

    /// Cache `r`, replacing the descriptors it overlaps, unless the cache holds the same
    /// range at a higher epoch (a lookup answered from a lagging meta).
    fn put_range(&mut self, r: RangeDescriptor) -> Option<Arc<CachedRange>> {
        let v = self.ranges.entry(r.collection).or_default();
        if v.iter().any(|o| o.id == r.id && o.epoch > r.epoch) {
            return None;
        }
        v.retain(|o| o.id != r.id && !(o.lo < r.hi && r.lo < o.hi));
        let r = Arc::new(CachedRange::new(r));
        v.push(r.clone());
        Some(r)
    }

    fn forget(&mut self, name: &str) {
        if let Some(c) = self.collections.remove(name) {
            self.ranges.remove(&c.id);
        }
    }
}

pub(crate) fn with_prefix(prefix: &[u8], key: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(prefix.len() + key.len());
    v.extend_from_slice(prefix);
    v.extend_from_slice(key);
    Bytes::from(v)
}

/// The first key after every key starting with `prefix` (empty: no such key).
pub(crate) fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::new()
}

/// Makes `kv`'s key collection-relative.
pub(crate) fn strip(prefix: &[u8], kv: &mut kvpb::KeyValue) {
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

/// Keys must not be empty.
pub(crate) fn check_key(key: &[u8]) -> Result<(), ClientError> {
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
            hook: None,
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

    /// Collection descriptor and range descriptor for `key` (collection-relative), from any
    /// seed (cached).
    pub(crate) async fn lookup(
        &self,
        name: &str,
        key: &[u8],
    ) -> Result<(CollectionDescriptor, RangeDescriptor), ClientError> {
        let (c, r) = self.lookup_shared(name, key).await?;
        Ok(((*c).clone(), r.desc.clone()))
    }

    /// [`Client::lookup`], answered as the cache holds it.
    async fn lookup_shared(
        &self,
        name: &str,
        key: &[u8],
    ) -> Result<(Arc<CollectionDescriptor>, Arc<CachedRange>), ClientError> {
        let mut req = ClientRequest::new();
        let mut l = Lookup::new();
        l.collection = name.to_string();
        l.key = Bytes::copy_from_slice(key);
        req.set_lookup(l);
        match self.any(req).await? {
            ClientResponse_oneof_kind::lookup(mut r) => {
                let c = Arc::new(r.take_collection());
                if !r.has_range() {
                    return Err(ClientError::Unavailable(format!(
                        "no range of collection {name:?} holds the key"
                    )));
                }
                let range = r.take_range();
                let mut cache = self.cache.lock();
                cache.collections.insert(name.to_string(), c.clone());
                // A higher epoch of the range is cached already: answer this lookup's own.
                let r = cache
                    .put_range(range.clone())
                    .unwrap_or_else(|| Arc::new(CachedRange::new(range)));
                Ok((c, r))
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
    ) -> Result<(Arc<CollectionDescriptor>, Arc<CachedRange>), ClientError> {
        loop {
            let cached = self.cache.lock().find(name, key);
            if let Some(x) = cached {
                return Ok(x);
            }
            match self.lookup_shared(name, key).await {
                Ok(x) => return Ok(x),
                Err(
                    ClientError::Unavailable(_)
                    | ClientError::Connect { .. }
                    | ClientError::ConnectionLost(_)
                    | ClientError::NoMeta,
                ) if Instant::now() + backoff.peek() < deadline => backoff.wait().await,
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
    ) -> Result<Routed, ClientError> {
        self.route_opt(name, key, write, mode, Resend::FollowKey, None, &|p, r| {
            Some(build(p, r))
        })
        .await?
        .ok_or_else(|| ClientError::Protocol("no command built".into()))
    }

    /// [`Client::route`] where `build` may find that the command no longer fits the range
    /// holding `key` (a batch whose keys a split separated): then `Ok(None)`, and no send of
    /// it can have applied (its ops may go out again under other request ids). A write whose
    /// send had an unknown outcome is sent again as `resend` says (with
    /// [`Resend::SameRange`], `build` is not asked again after that). `hook`, a test's, is
    /// asked before each send (see [`SendHook`]).
    #[allow(clippy::too_many_arguments)]
    async fn route_opt(
        &self,
        name: &str,
        key: &[u8],
        write: bool,
        mode: ReadMode,
        resend: Resend,
        hook: Option<&SendHook>,
        build: &(dyn Fn(&[u8], &RangeDescriptor) -> Option<kvpb::Command> + Sync),
    ) -> Result<Option<Routed>, ClientError> {
        let start = Instant::now();
        // A request id is retried for at most RETRY_WINDOW (the range remembers it longer).
        let deadline = start
            + if write {
                self.timeout.min(RETRY_WINDOW)
            } else {
                self.timeout
            };
        let attempt_timeout = (self.timeout / 4).max(MIN_ATTEMPT_TIMEOUT);
        let mut last = ClientError::Unavailable("no replica reachable".into());
        let mut skip: Vec<SocketAddr> = Vec::new();
        let mut backoff = Backoff::new();
        // Writes: one request id for every send; `sent` counts the sends whose outcome is
        // unknown (they may have applied), `unknown` why the last one is.
        let ticket = write.then(|| self.ids.begin());
        let mut sent: u32 = 0;
        let mut unknown: Option<String> = None;
        // With `Resend::SameRange`, from the first send of unknown outcome on: the range it
        // went to (its descriptor then, or a newer one of the same range) and the command.
        let mut pinned: Option<(Arc<CollectionDescriptor>, Arc<CachedRange>, kvpb::Command)> = None;
        // Hints followed in a row without a wait (two nodes naming each other during an
        // election would otherwise spin).
        let mut hints = 0;
        loop {
            if Instant::now() >= deadline {
                if let Some(why) = unknown {
                    return Err(ClientError::UnknownOutcome(format!(
                        "{why}; retried with the same request id for {:?}",
                        start.elapsed()
                    )));
                }
                return Err(match last {
                    ClientError::NotLeader(_) | ClientError::WrongRange(_) => ClientError::Timeout,
                    e => e,
                });
            }
            let (coll, range, built) = match &pinned {
                Some((c, r, cmd)) => (c.clone(), r.clone(), Some(cmd.clone())),
                None => match self.resolve(name, key, deadline, &mut backoff).await {
                    Ok((c, r)) => (c, r, None),
                    Err(e) => {
                        return Err(match unknown {
                            Some(why) => ClientError::UnknownOutcome(format!("{why}; then {e}")),
                            None => e,
                        })
                    }
                },
            };
            let members: &[SocketAddr] = &range.members;
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
                self.pick_follower(range.id, members, &skip)
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
            let Some(mut cmd) = built.or_else(|| build(&coll.prefix, &range.desc)) else {
                return match unknown {
                    None => Ok(None),
                    // Not with `Resend::SameRange` (pinned by then, `build` is not asked).
                    Some(why) => Err(ClientError::UnknownOutcome(format!(
                        "{why}; then the command no longer fits the range holding its key"
                    ))),
                };
            };
            if let Some(t) = &ticket {
                cmd.set_request_id(t.id(sent));
                if sent > 0 {
                    self.resends
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
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
            let attempt_deadline = deadline.min(Instant::now() + attempt_timeout);
            let fault = match hook {
                Some(h) => {
                    (h.0)(SendInfo {
                        range: range.id,
                        attempt: sent,
                    })
                    .await
                }
                None => SendFault::Deliver,
            };
            let answer = match fault {
                SendFault::Deliver => self.call_at(target, req, attempt_deadline).await,
                SendFault::DropRequest => Err(ClientError::Timeout),
                SendFault::DropAnswer => {
                    let _ = self.call_at(target, req, attempt_deadline).await;
                    Err(ClientError::Timeout)
                }
            };
            // From the first send of unknown outcome on, a `SameRange` write goes to this
            // range as it is (see `Resend`).
            let pin = |pinned: &mut Option<_>| {
                if resend == Resend::SameRange && pinned.is_none() {
                    *pinned = Some((coll.clone(), range.clone(), cmd.clone()));
                }
            };
            match answer {
                Ok(ClientResponse_oneof_kind::kv(r)) => {
                    let resp = kvpb::Response::parse_from_carllerche_bytes(&r.response)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    if !follower {
                        let mut c = self.cache.lock();
                        if c.leaders.get(&range.id) != Some(&target) {
                            c.leaders.insert(range.id, target);
                        }
                    }
                    if let Some(Response_oneof_result::error(e)) = &resp.result {
                        if e.code == kvpb::ErrorCode::KEY_OUT_OF_RANGE {
                            // The range split under a stale descriptor: nothing changed.
                            last = ClientError::WrongRange(e.why.clone());
                            self.cache.lock().forget(name);
                            backoff.wait().await;
                            continue;
                        }
                        if e.code == kvpb::ErrorCode::REQUEST_EXPIRED {
                            return Err(ClientError::UnknownOutcome(format!(
                                "{}; first: {}",
                                e.why,
                                unknown.unwrap_or_default()
                            )));
                        }
                        return Err(response_error(e));
                    }
                    return Ok(Some(Routed {
                        resp,
                        coll,
                        range,
                        node: target,
                    }));
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
                                    // A pinned command follows its range's members.
                                    if let Some((_, r, _)) = &mut pinned {
                                        *r = Arc::new(CachedRange::new(fresh.clone()));
                                    }
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
                        // Proposed, outcome unknown (leadership lost, timed out): resend the
                        // same request id; the range applies it at most once.
                        ClientError_Code::UNKNOWN_OUTCOME if ticket.is_some() => {
                            sent += 1;
                            pin(&mut pinned);
                            unknown = Some(format!("{target}: {}", e.message));
                            if sent > MAX_UNKNOWN_RETRIES {
                                return Err(ClientError::UnknownOutcome(format!(
                                    "{}; gave up after {sent} sends",
                                    e.message
                                )));
                            }
                            self.cache.lock().leaders.remove(&range.id);
                            backoff.wait().await;
                        }
                        _ => {
                            return Err(match unknown {
                                Some(why) => {
                                    ClientError::UnknownOutcome(format!("{why}; then {last}"))
                                }
                                None => last,
                            })
                        }
                    }
                }
                Ok(_) => return Err(ClientError::Protocol("unexpected answer".into())),
                // Sent, answer lost: the write may have applied. Resend the same request id
                // (elsewhere: the node may be gone), within the budget.
                Err(e @ (ClientError::Timeout | ClientError::ConnectionLost(_)))
                    if ticket.is_some() =>
                {
                    sent += 1;
                    pin(&mut pinned);
                    unknown = Some(format!("{target}: {e}"));
                    if sent > MAX_UNKNOWN_RETRIES {
                        return Err(ClientError::UnknownOutcome(format!(
                            "{e}; gave up after {sent} sends"
                        )));
                    }
                    self.cache.lock().leaders.remove(&range.id);
                    skip.push(target);
                    last = e;
                    backoff.wait().await;
                }
                Err(e @ ClientError::Timeout) if Instant::now() >= deadline => return Err(e),
                // Not a routing problem: the same request fails everywhere.
                Err(e @ (ClientError::TooLarge(_) | ClientError::Protocol(_))) => return Err(e),
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
        let turn = n.wrapping_add(range as usize);
        if skip.is_empty() {
            return members[turn % members.len()];
        }
        let open: Vec<SocketAddr> = members
            .iter()
            .copied()
            .filter(|m| !skip.contains(m))
            .collect();
        let pool = if open.is_empty() { members } else { &open };
        pool[turn % pool.len()]
    }
}

/// Where a write whose send had an unknown outcome is sent again (always under the same
/// request id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// To the range holding its key then (a single-key write: a split that moved the key
    /// copied the range's request ids to the daughter, and the parent refuses the key, so
    /// either range answers the id once).
    FollowKey,
    /// As first built, to the range it went to, whatever that range holds by then (a batch:
    /// the node proposes a resent batch to the range addressed, whose reply is right however
    /// a split separated the keys, see `seed::kv_port`).
    SameRange,
}

/// One send of a batch command, as a [`SendHook`] sees it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendInfo {
    /// The range it is addressed to.
    pub range: u64,
    /// Earlier sends of the command whose outcome is unknown (its request id's `attempt`).
    pub attempt: u32,
}

/// What happens to one send of a batch command (a [`SendHook`]'s answer).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFault {
    /// Sent and answered as usual.
    Deliver,
    /// Never sent, and taken as a send whose answer was lost.
    DropRequest,
    /// Sent, and its answer (whatever it is) taken as lost.
    DropAnswer,
}

/// Fault injection for tests: asked before each send of a batch's commands, it may hold the
/// send back (for as long as its future runs: the client's time budget keeps counting) and
/// lose it or its answer. Set with [`Kv::with_send_hook`].
#[doc(hidden)]
#[derive(Clone)]
pub struct SendHook(
    #[allow(clippy::type_complexity)]
    Arc<
        dyn Fn(SendInfo) -> std::pin::Pin<Box<dyn std::future::Future<Output = SendFault> + Send>>
            + Send
            + Sync,
    >,
);

impl SendHook {
    /// A hook running `f` before each send.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(SendInfo) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = SendFault> + Send + 'static,
    {
        SendHook(Arc::new(move |i| Box::pin(f(i))))
    }
}

impl std::fmt::Debug for SendHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendHook")
    }
}

/// A routed command's answer and where it came from.
struct Routed {
    resp: kvpb::Response,
    coll: Arc<CollectionDescriptor>,
    range: Arc<CachedRange>,
    node: SocketAddr,
}

/// A read and the state it was served at.
#[derive(Debug, Clone, PartialEq)]
pub struct Served<T> {
    /// What was read.
    pub value: T,
    /// The range's revision when it was served.
    pub revision: u64,
    /// The raft index the serving replica had applied (a follower read may lag the leader).
    pub applied_index: u64,
    /// The node that served it.
    pub node: SocketAddr,
}

/// Bytes (keys plus values) a scan asks per page by default.
pub const SCAN_PAGE_BYTES: u64 = 256 << 10;

/// How long a write's request id is resent at most (from its first send): the ranges
/// remember a client's replies far longer (`collections::kv::EXPIRY_MS`), so a resend always
/// finds the reply of an earlier send that applied.
pub const RETRY_WINDOW: Duration = Duration::from_secs(60);
/// Sends of one write whose outcome is unknown before the client gives up with
/// [`ClientError::UnknownOutcome`] (the time budget usually ends it first). 64 sends at
/// [`BACKOFF_MAX`] waits span about 2.5 s, what 16 spanned with the earlier 200 ms cap: a
/// write whose answers are lost across a leader election still outlives the election.
pub const MAX_UNKNOWN_RETRIES: u32 = 64;
/// The shortest wait for one send's answer; longer when the client's timeout is (a quarter
/// of it), so a node that stopped answering is left in time to try another.
pub const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// Seqs one client id may span: a write is begun under the current client id only while the
/// lowest seq still open is fewer than this below it. It must not exceed the replies a range
/// remembers per client (`collections::kv::dedup::WINDOW`, 64): a range then never evicts a
/// reply by count, so its floor never passes a seq still in flight (which would answer a first
/// send `REQUEST_EXPIRED`).
pub const ID_WINDOW: u64 = 64;

/// Request ids of one client: a random client id and a sequence per write, with the writes
/// still waiting for an answer (their lowest is the `first_incomplete` sent with every id).
/// When the open seqs would span more than [`ID_WINDOW`] (many writes in flight, or one
/// write retried for long), later writes start a fresh client id instead of waiting.
#[derive(Debug)]
pub(crate) struct RequestIds {
    current: Mutex<Arc<IdSpace>>,
}

/// One client id and its seqs.
#[derive(Debug)]
pub(crate) struct IdSpace {
    client: u64,
    state: Mutex<IdState>,
}

#[derive(Debug, Default)]
struct IdState {
    next: u64,
    open: std::collections::BTreeSet<u64>,
}

impl IdSpace {
    fn new() -> Arc<Self> {
        let mut client = 0;
        while client == 0 {
            client = rand::random::<u64>();
        }
        Arc::new(IdSpace {
            client,
            state: Mutex::new(IdState {
                next: 1,
                open: Default::default(),
            }),
        })
    }
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        RequestIds {
            current: Mutex::new(IdSpace::new()),
        }
    }

    /// The current client id.
    pub(crate) fn client(&self) -> u64 {
        self.current.lock().client
    }

    /// A new seq, open until the ticket is dropped.
    pub(crate) fn begin(&self) -> Ticket {
        let mut current = self.current.lock();
        loop {
            let space = current.clone();
            let mut st = space.state.lock();
            let seq = st.next;
            let lowest = st.open.first().copied().unwrap_or(seq);
            if seq - lowest >= ID_WINDOW {
                drop(st);
                *current = IdSpace::new();
                continue;
            }
            st.next += 1;
            st.open.insert(seq);
            drop(st);
            return Ticket { ids: space, seq };
        }
    }
}

/// One write's request id; dropping it finishes the seq.
#[derive(Debug)]
pub(crate) struct Ticket {
    ids: Arc<IdSpace>,
    seq: u64,
}

impl Ticket {
    /// The wire id for a send after `attempt` sends of unknown outcome.
    pub(crate) fn id(&self, attempt: u32) -> kvpb::RequestId {
        let first = self
            .ids
            .state
            .lock()
            .open
            .first()
            .copied()
            .unwrap_or(self.seq);
        let mut id = kvpb::RequestId::new();
        id.client = self.ids.client;
        id.seq = self.seq;
        id.first_incomplete = first.min(self.seq);
        id.attempt = attempt;
        id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.ids.state.lock().open.remove(&self.seq);
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
/// The longest wait between routing retries. Short because what a client waits for after a
/// split (meta recording it, the daughter's first leader) is typically done 50-150 ms after
/// the split applied: with 200 ms, the doubling waits (half to full of each step) let a write
/// whose key moved finish 400-550 ms after the split (W10's p99.9); with 50 ms it retries
/// within about 50 ms of the daughter serving. A retry is one small request answered at once
/// (NOT_LEADER, WRONG_RANGE), so even a long election costs about 20-40 of them per second per
/// waiting request.
pub const BACKOFF_MAX: Duration = Duration::from_millis(50);

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

/// One write of a batch ([`Kv::batch`]); keys are collection-relative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Write `value` at `key`.
    Put { key: Bytes, value: Bytes },
    /// Delete `key`.
    Delete { key: Bytes },
}

impl BatchOp {
    /// The op's key.
    pub fn key(&self) -> &[u8] {
        match self {
            BatchOp::Put { key, .. } | BatchOp::Delete { key } => key,
        }
    }

    /// Bytes of key and value.
    fn size(&self) -> usize {
        match self {
            BatchOp::Put { key, value } => key.len() + value.len(),
            BatchOp::Delete { key } => key.len(),
        }
    }

    /// The op as a command on full keys.
    fn command(&self, prefix: &[u8]) -> kvpb::Command {
        let mut cmd = kvpb::Command::new();
        match self {
            BatchOp::Put { key, value } => {
                let mut p = kvpb::Put::new();
                p.key = with_prefix(prefix, key);
                p.value = value.clone();
                cmd.set_put(p);
            }
            BatchOp::Delete { key } => {
                let mut d = kvpb::Delete::new();
                d.key = with_prefix(prefix, key);
                cmd.set_delete(d);
            }
        }
        cmd
    }
}

/// Where one op of a batch applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpApplied {
    /// The range's revision after the op: a put's own revision (ops of one range's batch take
    /// consecutive revisions); a delete of an absent key changes nothing and takes none.
    pub revision: u64,
    /// The range that answered.
    pub range: u64,
    /// The raft entry the op applied in: every op of one range's batch shares it.
    pub applied_index: u64,
}

/// Most ops in one `Batch` command (a range's share of a larger batch is cut into several).
pub const BATCH_MAX_OPS: usize = 1000;
/// Most bytes of keys and values in one `Batch` command (below the node's command limit).
pub const BATCH_MAX_BYTES: usize = 512 << 10;

/// The ops `pending` (indices into `ops`) grouped by the cached range of collection `name`
/// holding their keys, each group in the order of `pending` and cut at [`BATCH_MAX_OPS`] ops
/// and [`BATCH_MAX_BYTES`]; and the ops no cached range holds.
fn group_by_range(
    cache: &RangeCache,
    name: &str,
    ops: &[BatchOp],
    pending: &[usize],
) -> (Vec<(u64, Vec<usize>)>, Vec<usize>) {
    // Per range: its closed groups, the open one and the open one's bytes.
    let mut by_range: Vec<(u64, Vec<Vec<usize>>, usize)> = Vec::new();
    let mut missing = Vec::new();
    for &i in pending {
        let Some((_, r)) = cache.find(name, ops[i].key()) else {
            missing.push(i);
            continue;
        };
        let size = ops[i].size();
        let pos = match by_range.iter().position(|(id, _, _)| *id == r.id) {
            Some(p) => p,
            None => {
                by_range.push((r.id, vec![Vec::new()], 0));
                by_range.len() - 1
            }
        };
        let (_, groups, bytes) = &mut by_range[pos];
        let open = groups.last().map_or(0, Vec::len);
        if open > 0 && (open >= BATCH_MAX_OPS || *bytes + size > BATCH_MAX_BYTES) {
            groups.push(Vec::new());
            *bytes = 0;
        }
        *bytes += size;
        if let Some(g) = groups.last_mut() {
            g.push(i);
        }
    }
    let groups = by_range
        .into_iter()
        .flat_map(|(id, gs, _)| gs.into_iter().map(move |g| (id, g)))
        .collect();
    (groups, missing)
}

/// One op's slot in a range's answer to its batch.
#[derive(Debug)]
enum Slot {
    /// Applied (or refused for good, e.g. a key too large).
    Done(Result<OpApplied, ClientError>),
    /// Not applied: a split moved the key away before the entry applied.
    Moved,
}

/// A handle on one KV collection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Kv {
    client: Client,
    name: String,
    read: ReadMode,
    /// A test's fault injection on batch sends.
    hook: Option<SendHook>,
}

impl Kv {
    /// The same handle reading with `mode`.
    pub fn with_reads(mut self, mode: ReadMode) -> Self {
        self.read = mode;
        self
    }

    /// The same handle with `hook` asked before each send of a batch's commands: fault
    /// injection for tests (lose a send or its answer, hold a resend back).
    #[doc(hidden)]
    pub fn with_send_hook(mut self, hook: SendHook) -> Self {
        self.hook = Some(hook);
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
        Ok(self.get_served(key).await?.value)
    }

    /// [`Kv::get`] with the state it was served at (for [`ReadMode::Follower`]: which replica,
    /// at which applied index).
    ///
    /// # Errors
    /// As [`Kv::get`].
    pub async fn get_served(
        &self,
        key: &[u8],
    ) -> Result<Served<Option<kvpb::KeyValue>>, ClientError> {
        check_key(key)?;
        let k = key;
        let Routed {
            mut resp,
            coll,
            node,
            ..
        } = self
            .client
            .route(&self.name, key, false, self.read, &|p, _| {
                let mut g = kvpb::Get::new();
                g.key = with_prefix(p, k);
                let mut cmd = kvpb::Command::new();
                cmd.set_get(g);
                cmd
            })
            .await?;
        let h = resp.get_header().clone();
        match resp.result.take() {
            Some(Response_oneof_result::get(mut g)) => Ok(Served {
                value: g.kv.take().map(|mut kv| {
                    strip(&coll.prefix, &mut kv);
                    kv
                }),
                revision: h.revision,
                applied_index: h.applied_index,
                node,
            }),
            _ => Err(ClientError::Protocol("unexpected reply to get".into())),
        }
    }

    /// Write `key`; returns the range's revision after the write.
    ///
    /// # Errors
    /// Routing failures, typed command errors, [`ClientError::UnknownOutcome`].
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        self.put_with_ttl(key, value, Duration::ZERO).await
    }

    /// Write `key` to expire `ttl` after the write (zero: never; rounded to milliseconds,
    /// at least one); returns the range's revision after the write.
    ///
    /// # Errors
    /// As [`Kv::put`].
    pub async fn put_with_ttl(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> Result<u64, ClientError> {
        check_key(key)?;
        let ttl_ms = match ttl.as_millis() {
            0 if !ttl.is_zero() => 1,
            ms => u64::try_from(ms).unwrap_or(u64::MAX),
        };
        let (k, v) = (key, Bytes::copy_from_slice(value));
        let Routed { resp, .. } = self
            .client
            .route(&self.name, key, true, ReadMode::Leader, &|p, _| {
                let mut put = kvpb::Put::new();
                put.key = with_prefix(p, k);
                put.value = v.clone();
                put.ttl_ms = ttl_ms;
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
        let k = key;
        let Routed { resp, .. } = self
            .client
            .route(&self.name, key, true, ReadMode::Leader, &|p, _| {
                let mut d = kvpb::Delete::new();
                d.key = with_prefix(p, k);
                let mut cmd = kvpb::Command::new();
                cmd.set_delete(d);
                cmd
            })
            .await?;
        match resp.result {
            Some(Response_oneof_result::delete(d)) => Ok(d.deleted > 0),
            Some(_) => Err(ClientError::Protocol("unexpected reply to delete".into())),
            None => Err(ClientError::Protocol(
                "no delete result (async replication answers before apply)".into(),
            )),
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
        let k = key;
        let nv = new_value.map(Bytes::copy_from_slice);
        let Routed { resp, coll: c, .. } = self
            .client
            .route(&self.name, key, true, ReadMode::Leader, &|p, _| {
                let mut cas = kvpb::Cas::new();
                cas.key = with_prefix(p, k);
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

    /// Put every `(key, value)` of `items` (collection-relative keys): [`Kv::batch`] of puts.
    ///
    /// # Errors
    /// As [`Kv::batch`].
    pub async fn put_batch(
        &self,
        items: &[(Bytes, Bytes)],
    ) -> Result<Vec<Result<OpApplied, ClientError>>, ClientError> {
        let ops: Vec<BatchOp> = items
            .iter()
            .map(|(key, value)| BatchOp::Put {
                key: key.clone(),
                value: value.clone(),
            })
            .collect();
        self.batch(&ops).await
    }

    /// Apply `ops` with one `Batch` command per range their keys route to (sent
    /// concurrently); returns each op's result, in order.
    ///
    /// The ops of one range go out in one raft entry, each with its own revision and reply
    /// (a range's share is cut into commands of at most [`BATCH_MAX_OPS`] ops and
    /// [`BATCH_MAX_BYTES`]). Such a command applies atomically (every op in the same entry,
    /// at consecutive revisions) unless a split moves some of its keys away between the
    /// routing check and the apply: those ops are not applied there (`KEY_OUT_OF_RANGE` in
    /// their slots) and are sent again, regrouped by their new ranges. Across ranges a batch
    /// is **not** atomic: each range applies its share on its own, and a reader may see one
    /// range's share before another's.
    ///
    /// Each command carries a request id like every write and is resent with it when its
    /// answer is lost, so every op applies exactly once: an op is sent under a new id only
    /// after a range answered that the id did not apply it (a refusal before proposing, or
    /// its slot's `KEY_OUT_OF_RANGE`). A command whose answer was lost is resent whole to the
    /// range it was sent to, also when a split separated its keys since: that range answers
    /// each op as applied, or `KEY_OUT_OF_RANGE` (not applied there, regrouped as above).
    /// Its ops get [`ClientError::UnknownOutcome`] only as any write's do: when the range no
    /// longer remembers the id (`REQUEST_EXPIRED`) or the resends' budget runs out.
    ///
    /// # Errors
    /// An empty key (nothing is sent). Per op: routing failures, typed command errors,
    /// [`ClientError::UnknownOutcome`], [`ClientError::Timeout`] when the client's timeout
    /// passed before the op was answered.
    pub async fn batch(
        &self,
        ops: &[BatchOp],
    ) -> Result<Vec<Result<OpApplied, ClientError>>, ClientError> {
        for op in ops {
            check_key(op.key())?;
        }
        let ops: Arc<[BatchOp]> = ops.into();
        let deadline = Instant::now() + self.client.timeout.min(RETRY_WINDOW);
        let mut out: Vec<Option<Result<OpApplied, ClientError>>> = vec![None; ops.len()];
        let mut pending: Vec<usize> = (0..ops.len()).collect();
        let mut backoff = Backoff::new();
        let mut last_lookup: Option<usize> = None;
        while !pending.is_empty() {
            if Instant::now() >= deadline {
                for i in pending {
                    out[i] = Some(Err(ClientError::Timeout));
                }
                break;
            }
            let (groups, missing) =
                group_by_range(&self.client.cache.lock(), &self.name, &ops, &pending);
            if let Some(&i) = missing.first() {
                // One lookup per range not cached; the same key again: wait first.
                if last_lookup == Some(i) {
                    backoff.wait().await;
                }
                last_lookup = Some(i);
                if let Err(e) = self
                    .client
                    .resolve(&self.name, ops[i].key(), deadline, &mut backoff)
                    .await
                {
                    for i in pending {
                        out[i] = Some(Err(e.clone()));
                    }
                    break;
                }
                continue;
            }
            let mut answers = Vec::with_capacity(groups.len());
            if let [(_, idx)] = groups.as_slice() {
                answers.push((idx.clone(), self.send_group(&ops, idx).await));
            } else {
                let mut set = tokio::task::JoinSet::new();
                for (_, idx) in groups {
                    let (kv, ops) = (self.clone(), ops.clone());
                    set.spawn(async move {
                        let r = kv.send_group(&ops, &idx).await;
                        (idx, r)
                    });
                }
                while let Some(joined) = set.join_next().await {
                    answers.push(
                        joined.map_err(|e| ClientError::Protocol(format!("batch task: {e}")))?,
                    );
                }
            }
            let mut retry = Vec::new();
            for (idx, answer) in answers {
                match answer {
                    Ok(Some(slots)) => {
                        for (i, slot) in idx.into_iter().zip(slots) {
                            match slot {
                                Slot::Done(r) => out[i] = Some(r),
                                Slot::Moved => retry.push(i),
                            }
                        }
                    }
                    Ok(None) => retry.extend(idx),
                    Err(e) => {
                        for i in idx {
                            out[i] = Some(Err(e.clone()));
                        }
                    }
                }
            }
            if !retry.is_empty() {
                self.client
                    .regrouped
                    .fetch_add(retry.len() as u64, std::sync::atomic::Ordering::Relaxed);
                // A split moved keys: look the ranges up again.
                self.client.cache.lock().forget(&self.name);
                backoff.wait().await;
            }
            retry.sort_unstable();
            pending = retry;
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or(Err(ClientError::Timeout)))
            .collect())
    }

    /// Send the ops `idx` of `ops` as one `Batch` command, with one request id, to the range
    /// holding the first one: each op's slot, or `None` when the ops no longer lie in one
    /// range and no send can have applied any of them.
    async fn send_group(
        &self,
        ops: &[BatchOp],
        idx: &[usize],
    ) -> Result<Option<Vec<Slot>>, ClientError> {
        let first = ops[idx[0]].key();
        let routed = self
            .client
            .route_opt(
                &self.name,
                first,
                true,
                ReadMode::Leader,
                Resend::SameRange,
                self.hook.as_ref(),
                &|p, r| {
                    if !idx.iter().all(|&i| holds(p, ops[i].key(), r)) {
                        return None;
                    }
                    let mut b = kvpb::Batch::new();
                    b.ops = idx.iter().map(|&i| ops[i].command(p)).collect();
                    let mut cmd = kvpb::Command::new();
                    cmd.set_batch(b);
                    Some(cmd)
                },
            )
            .await?;
        let Some(Routed { resp, range, .. }) = routed else {
            return Ok(None);
        };
        let Some(Response_oneof_result::batch(b)) = resp.result else {
            return Err(ClientError::Protocol("unexpected reply to a batch".into()));
        };
        if b.results.len() != idx.len() {
            return Err(ClientError::Protocol(format!(
                "{} slots in the reply to a batch of {}",
                b.results.len(),
                idx.len()
            )));
        }
        Ok(Some(
            b.results
                .into_iter()
                .map(|r| match &r.result {
                    Some(Response_oneof_result::error(e))
                        if e.code == kvpb::ErrorCode::KEY_OUT_OF_RANGE =>
                    {
                        Slot::Moved
                    }
                    Some(Response_oneof_result::error(e)) => Slot::Done(Err(response_error(e))),
                    _ => Slot::Done(Ok(OpApplied {
                        revision: r.get_header().revision,
                        range: range.id,
                        applied_index: r.get_header().applied_index,
                    })),
                })
                .collect(),
        ))
    }

    /// Keys in `[start, end)` (`end` empty: to the end of the collection), at most `limit`
    /// (0: no limit), fetched in bounded pages across ranges (see [`Kv::scanner`]).
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
        let mut s = self.scanner(start, end, limit);
        while let Some(page) = s.next_page().await? {
            out.extend(page.value);
        }
        Ok(out)
    }

    /// A scan of `[start, end)` (`end` empty: to the end of the collection) streamed page by
    /// page: each page is one request to one range, at most [`SCAN_PAGE_BYTES`] of keys and
    /// values (see [`Scanner::page_bytes`]) and never more keys than `limit` still allows
    /// (0: no limit); pages continue across range boundaries and stop at `limit` or `end`.
    pub fn scanner(&self, start: &[u8], end: &[u8], limit: usize) -> Scanner {
        Scanner {
            kv: self.clone(),
            cursor: Some(start.to_vec()),
            end: end.to_vec(),
            limit,
            returned: 0,
            page_bytes: SCAN_PAGE_BYTES,
        }
    }
}

/// A scan in progress ([`Kv::scanner`]).
#[derive(Debug, Clone)]
pub struct Scanner {
    kv: Kv,
    /// Collection-relative key the next page starts at; `None` once done.
    cursor: Option<Vec<u8>>,
    end: Vec<u8>,
    limit: usize,
    returned: usize,
    page_bytes: u64,
}

impl Scanner {
    /// Bytes of keys plus values asked per page (at least one key comes back; the node caps
    /// pages too).
    pub fn page_bytes(mut self, bytes: u64) -> Self {
        self.page_bytes = bytes.max(1);
        self
    }

    /// The next page (possibly empty when a range holds no key of the scan), or `None` when
    /// the scan is done.
    ///
    /// # Errors
    /// Routing failures.
    pub async fn next_page(&mut self) -> Result<Option<Served<Vec<kvpb::KeyValue>>>, ClientError> {
        let Some(from) = self.cursor.take() else {
            return Ok(None);
        };
        let want = if self.limit == 0 {
            0
        } else {
            self.limit - self.returned
        };
        let end_rel = self.end.clone();
        let max_bytes = self.page_bytes;
        let Routed {
            resp,
            coll: c,
            range,
            node,
        } = self
            .kv
            .client
            .route(&self.kv.name, &from, false, self.kv.read, &|p, r| {
                let mut s = kvpb::Scan::new();
                s.start = with_prefix(p, &from);
                let full_end = if end_rel.is_empty() {
                    prefix_end(p)
                } else {
                    with_prefix(p, &end_rel)
                };
                s.end = if r.hi.is_empty() || full_end.as_ref() < r.hi.as_ref() {
                    full_end
                } else {
                    r.hi.clone()
                };
                s.limit = want as u64;
                s.max_bytes = max_bytes;
                let mut cmd = kvpb::Command::new();
                cmd.set_scan(s);
                cmd
            })
            .await?;
        let h = resp.get_header().clone();
        let Some(Response_oneof_result::scan(s)) = resp.result else {
            return Err(ClientError::Protocol("unexpected reply to scan".into()));
        };
        let mut page = Vec::with_capacity(s.kvs.len());
        for mut kv in s.kvs.into_iter() {
            strip(&c.prefix, &mut kv);
            page.push(kv);
        }
        if self.limit != 0 {
            page.truncate(self.limit - self.returned);
        }
        self.returned += page.len();
        let rel = |full: &[u8]| full.strip_prefix(c.prefix.as_ref()).map(<[u8]>::to_vec);
        if self.limit != 0 && self.returned >= self.limit {
            self.cursor = None;
        } else if s.more {
            let next = rel(&s.next_key).ok_or_else(|| {
                ClientError::Protocol("scan continues at a key outside the collection".into())
            })?;
            self.cursor = Some(next);
        } else if !range.hi.is_empty() && range.hi.as_ref() < prefix_end(&c.prefix).as_ref() {
            // The next range of the collection, unless past `end`.
            let next = rel(&range.hi);
            self.cursor =
                next.filter(|n| self.end.is_empty() || n.as_slice() < self.end.as_slice());
        }
        Ok(Some(Served {
            value: page,
            revision: h.revision,
            applied_index: h.applied_index,
            node,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmp_joined_equals_comparing_the_joined_key() {
        let alphabet: [&[u8]; 7] = [b"", b"a", b"b", b"ab", b"ba", b"aa", b"abb"];
        for p in alphabet {
            for k in alphabet {
                for o in alphabet {
                    let joined = [p, k].concat();
                    assert_eq!(
                        cmp_joined(p, k, o),
                        joined.as_slice().cmp(o),
                        "{p:?} {k:?} {o:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_cache_finds_the_range_holding_a_relative_key() {
        let mut cache = RangeCache::default();
        let mut c = CollectionDescriptor::new();
        c.id = 7;
        c.prefix = Bytes::from_static(b"p/");
        cache.collections.insert("c".into(), Arc::new(c));
        for (id, lo, hi) in [(1, &b"p/"[..], &b"p/m"[..]), (2, b"p/m", b"p0")] {
            let mut r = RangeDescriptor::new();
            r.id = id;
            r.collection = 7;
            r.lo = Bytes::copy_from_slice(lo);
            r.hi = Bytes::copy_from_slice(hi);
            let mut m = proto::metapb::Member::new();
            m.client_addr = "127.0.0.1:1".into();
            r.members.push(m);
            let mut bad = proto::metapb::Member::new();
            bad.client_addr = "not an address".into();
            r.members.push(bad);
            assert!(cache.put_range(r).is_some());
        }
        let id = |k: &[u8]| cache.find("c", k).map(|(_, r)| r.id);
        assert_eq!(id(b"a"), Some(1));
        assert_eq!(id(b""), Some(1));
        assert_eq!(id(b"l\xff"), Some(1));
        assert_eq!(id(b"m"), Some(2));
        assert_eq!(id(b"zz"), Some(2));
        assert_eq!(cache.find("other", b"a").map(|(_, r)| r.id), None);
        let (_, r) = cache.find("c", b"a").unwrap();
        assert_eq!(
            r.members,
            vec!["127.0.0.1:1".parse::<SocketAddr>().unwrap()]
        );
    }

    /// A cache of collection "c" (prefix `p/`) with ranges `[lo, hi)` (relative keys).
    fn cache_with(ranges: &[(u64, &str, &str)]) -> RangeCache {
        let mut cache = RangeCache::default();
        let mut c = CollectionDescriptor::new();
        c.id = 7;
        c.prefix = Bytes::from_static(b"p/");
        cache.collections.insert("c".into(), Arc::new(c));
        for &(id, lo, hi) in ranges {
            let mut r = RangeDescriptor::new();
            r.id = id;
            r.collection = 7;
            r.lo = with_prefix(b"p/", lo.as_bytes());
            r.hi = with_prefix(b"p/", hi.as_bytes());
            assert!(cache.put_range(r).is_some());
        }
        cache
    }

    fn put_op(key: &str, value_len: usize) -> BatchOp {
        BatchOp::Put {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from(vec![b'v'; value_len]),
        }
    }

    #[test]
    fn a_batch_is_grouped_by_the_range_of_each_key_in_order() {
        let cache = cache_with(&[(1, "", "g"), (2, "g", "p")]);
        let ops: Vec<BatchOp> = ["h", "a", "q", "g", "b", "o", "z"]
            .iter()
            .map(|k| put_op(k, 1))
            .collect();
        let all: Vec<usize> = (0..ops.len()).collect();
        let (groups, missing) = group_by_range(&cache, "c", &ops, &all);
        assert_eq!(groups, vec![(2, vec![0, 3, 5]), (1, vec![1, 4])]);
        assert_eq!(missing, vec![2, 6], "no cached range holds q and z");
        // Only the pending ops are grouped.
        let (groups, missing) = group_by_range(&cache, "c", &ops, &[4, 5]);
        assert_eq!(groups, vec![(1, vec![4]), (2, vec![5])]);
        assert!(missing.is_empty());
        // Another collection: nothing is cached.
        let (groups, missing) = group_by_range(&cache, "other", &ops, &[0, 1]);
        assert!(groups.is_empty());
        assert_eq!(missing, vec![0, 1]);
        // A delete routes by its key too.
        let del = [BatchOp::Delete {
            key: Bytes::from_static(b"x"),
        }];
        let cache = cache_with(&[(1, "", "g"), (2, "g", "p"), (3, "p", "zz")]);
        assert_eq!(
            group_by_range(&cache, "c", &del, &[0]).0,
            vec![(3, vec![0])]
        );
    }

    #[test]
    fn a_ranges_share_is_cut_by_ops_and_bytes() {
        let cache = cache_with(&[(1, "", "zz")]);
        let many: Vec<BatchOp> = (0..BATCH_MAX_OPS + 1)
            .map(|i| put_op(&format!("k{i:05}"), 1))
            .collect();
        let all: Vec<usize> = (0..many.len()).collect();
        let (groups, _) = group_by_range(&cache, "c", &many, &all);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].1.len(), BATCH_MAX_OPS);
        assert_eq!(groups[1].1, vec![BATCH_MAX_OPS]);
        // Bytes: three ops of a third of the bound (plus their keys) make two commands; an op
        // larger than the bound goes alone (the node answers it TOO_LARGE).
        let big = [
            put_op("a", BATCH_MAX_BYTES / 3),
            put_op("b", BATCH_MAX_BYTES / 3),
            put_op("c", BATCH_MAX_BYTES / 3),
            put_op("d", BATCH_MAX_BYTES + 1),
            put_op("e", 1),
        ];
        let (groups, _) = group_by_range(&cache, "c", &big, &[0, 1, 2, 3, 4]);
        let ids: Vec<Vec<usize>> = groups.into_iter().map(|(_, g)| g).collect();
        assert_eq!(ids, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
    }

    #[test]
    fn holds_is_lo_inclusive_hi_exclusive_on_joined_keys() {
        let mut r = RangeDescriptor::new();
        r.lo = Bytes::from_static(b"p/g");
        r.hi = Bytes::from_static(b"p/p");
        assert!(holds(b"p/", b"g", &r));
        assert!(holds(b"p/", b"o\xff", &r));
        assert!(!holds(b"p/", b"p", &r));
        assert!(!holds(b"p/", b"f", &r));
        assert!(!holds(b"q/", b"h", &r));
    }

    #[test]
    fn backoff_grows_from_10_to_50_ms_with_jitter() {
        let mut b = Backoff::new();
        let mut steps = Vec::new();
        for _ in 0..10 {
            let step = b.peek();
            let wait = b.step();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for step {step:?}"
            );
            steps.push(step.as_millis());
        }
        assert_eq!(steps, vec![10, 20, 40, 50, 50, 50, 50, 50, 50, 50]);
    }

    #[test]
    fn first_incomplete_is_the_lowest_open_seq() {
        let ids = Arc::new(RequestIds::new());
        assert_ne!(ids.client(), 0);
        let a = ids.begin();
        let b = ids.begin();
        let c = ids.begin();
        assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
        assert_eq!(c.id(0).first_incomplete, 1);
        drop(a);
        let id = c.id(2);
        assert_eq!((id.seq, id.first_incomplete, id.attempt), (3, 2, 2));
        drop(b);
        assert_eq!(c.id(0).first_incomplete, 3);
        drop(c);
        let d = ids.begin();
        assert_eq!((d.seq, d.id(0).first_incomplete), (4, 4));
        assert_eq!(d.id(0).client, ids.client());
    }

    #[test]
    fn open_seqs_never_span_more_than_the_window_under_one_client_id() {
        let ids = RequestIds::new();
        let stuck = ids.begin();
        let first = stuck.id(0).client;
        // Writes complete while the first stays open (retried for long).
        for seq in 2..=ID_WINDOW {
            let t = ids.begin();
            assert_eq!((t.seq, t.id(0).client), (seq, first));
        }
        // The next would span ID_WINDOW + 1 seqs from the open one: a fresh client id, from 1.
        let t = ids.begin();
        assert_ne!(t.id(0).client, first);
        assert_eq!((t.seq, t.id(0).first_incomplete), (1, 1));
        assert_eq!(ids.client(), t.id(0).client);
        // The stuck write keeps its own id and its own lowest open seq.
        assert_eq!(
            (stuck.id(3).client, stuck.id(3).first_incomplete),
            (first, 1)
        );
        // Many writes in flight at once: each id's open seqs span less than the window.
        let held: Vec<Ticket> = (0..3 * ID_WINDOW).map(|_| ids.begin()).collect();
        for t in &held {
            let id = t.id(0);
            assert!(id.seq - id.first_incomplete < ID_WINDOW, "{id:?}");
        }
    }
}
