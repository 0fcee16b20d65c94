//! The client port's collection requests.
//!
//! - **CreateCollection**: validated by `meta::ops::create_collection` against this node's
//!   freshest meta, proposed to meta's leader wherever it is (compare-and-swap; retried on a
//!   stale read), answered with the stored descriptor.
//! - **Lookup**: the collection's descriptor and the range holding a key (one seek in meta).
//! - **Kv**: one `kvpb.Command` for one range. The router answers `WRONG_RANGE{descriptor}`
//!   when this node does not hold the range, the key lies outside its bounds (meta's, or the
//!   local store's: a split applied here that meta does not show yet) or the client's
//!   epoch is older than the descriptor's. A write that reached the range after a split moved
//!   its key away is answered `KEY_OUT_OF_RANGE` by apply (not applied): the client gets
//!   `WRONG_RANGE` with meta's current descriptor; reads check the store's bounds under the
//!   same lock as the read, so a key the store no longer holds is never answered empty.
//!   A `Batch` of writes is routed and bounds-checked as the smallest span holding every
//!   op's keys (all of them must lie in the range, else `WRONG_RANGE` and nothing is
//!   proposed), and answered at apply whatever the range's mode (its per-op results, see
//!   [`crate::ranges::needs_apply_result`]): an op whose key a split moved
//!   away before the entry applied gets `KEY_OUT_OF_RANGE` in its own slot (not applied) while
//!   the others apply, and the client resends only those (`client::kv`, "Batches").
//!   Except a batch *resent* under its request id (`RequestId.attempt > 0`: an earlier send
//!   may have reached the range) whose ops are all single-key (puts, deletes of one key,
//!   compare-and-swaps): it is proposed to the range the client addressed whatever its keys
//!   and the client's epoch, as long as this node holds a replica of that range (else
//!   `WRONG_RANGE` with meta's descriptor of it). The client resends a batch whose answer was
//!   lost to the range it first sent it to, also after a split separated its keys, and the
//!   range's answer is right whatever its bounds now, because every case is answered once:
//!   - the command applied before the split: the split copied the range's request ids to the
//!     daughter (`collections::kv` `split_off_as`), so the parent answers the recorded reply
//!     (every op applied, in the parent's revisions);
//!   - it applied after the split (a first send still in flight, or applied then lost):
//!     recorded with `KEY_OUT_OF_RANGE` in the slots of the keys that moved, which were not
//!     applied; the resend gets that reply and the client regroups those ops under new ids;
//!   - it never applied: the resend applies the ops whose keys the range still holds and
//!     answers `KEY_OUT_OF_RANGE` for the others (all of them when every key moved away),
//!     and is recorded: a first send applied later is a duplicate and changes nothing.
//!
//!   Apply checks each single-key op against the store's bounds, so no key outside them is
//!   ever written. A batch holding a range delete is routed by its keys even when resent
//!   (apply would refuse the delete whole if a split cut its span, but nothing needs such a
//!   batch resent across a split: the Rust client's batches hold single keys only).
//!   A delete's `range_end` or a scan's `end` of `"\0"` (to the end of the key space: no
//!   range holds that) or at/below its start key is `INVALID_ARGUMENT` with the field named.
//!   `NOT_LEADER{hint}` when a write or a leader read
//!   reaches a follower. Writes are proposed as `now_ms ‖ command` (see [`crate::ranges`]),
//!   packable (`harpoon::Node::propose_packable`: concurrent writes to a range share raft
//!   entries, each keeping its own reply; admin entries are never packed);
//!   leader reads wait for harpoon's read barrier (lease, else ReadIndex), follower reads are
//!   served from the local replica and carry the applied index they were served at.
//!   In an Async range a write is answered once durable on the leader, except a
//!   compare-and-swap, a delete or a put asking for the previous value (answered at apply,
//!   with the result) and a write overlapping a split of this node (answered at apply, or
//!   waited for until applied; a key the split moved away is `WRONG_RANGE`): see
//!   [`crate::ranges::SplitFence`].
//!
//! A write whose outcome is unknown (timeout, snapshot over its index) is answered
//! `UNKNOWN_OUTCOME`, never retried here; `NOT_LEADER` is only answered for writes that were
//! not proposed (or whose slot was definitely lost), so a client may retry those.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use collections::kv::{Bounds, KeyRange, ScanRequest};
use collections::KvError;
use harpoon::{CellId, Error as HError, ReadConsistency};
use meta::ops::{self, CollectionSpec};
use meta::{view, MetaError, RangeDescriptor};
use parking_lot::Mutex;
use proto::clientpb::{
    ClientError_Code, ClientResponse, ClientResponse_oneof_kind, CreateCollection, KvReply,
    KvRequest, Lookup, LookupReply,
};
use proto::kvpb::{self, Command_oneof_op};
use proto::metapb::CollectionKind;
use protobuf::Message;

use crate::client_port::{error, refusal};
use crate::node::{now_ms, Attempt, Refusal, RetryError, Seed};
use crate::ranges::{encode_entry, LocalRange};

/// Most keys per scan page served.
pub const MAX_SCAN_KEYS: u64 = 1000;
/// Most bytes (keys plus values) per scan page served.
pub const MAX_SCAN_BYTES: u64 = 512 << 10;
/// Largest command accepted on the client port.
pub const MAX_COMMAND: usize = (1 << 20) - 4096;

fn ok(id: u64, kind: ClientResponse_oneof_kind) -> ClientResponse {
    let mut r = ClientResponse::new();
    r.id = id;
    r.kind = Some(kind);
    r
}

pub(crate) fn invalid(id: u64, field: &str, msg: impl Into<String>) -> ClientResponse {
    let mut r = error(id, ClientError_Code::INVALID_ARGUMENT, msg);
    if let Some(ClientResponse_oneof_kind::error(e)) = r.kind.as_mut() {
        e.field = field.into();
    }
    r
}

fn meta_error(id: u64, e: MetaError) -> ClientResponse {
    match e {
        MetaError::InvalidArgument { field, why } => invalid(id, field, why),
        MetaError::CollectionExists(n) => error(
            id,
            ClientError_Code::CONFLICT,
            format!("collection {n:?} already exists"),
        ),
        e => error(id, ClientError_Code::UNAVAILABLE, e.to_string()),
    }
}

/// CreateCollection.
pub async fn create_collection(seed: &Arc<Seed>, id: u64, c: CreateCollection) -> ClientResponse {
    let d = c.get_spec();
    if d.kind != CollectionKind::KV {
        return invalid(id, "type", "only kv collections exist yet");
    }
    if !seed.meta_known() {
        return refusal(id, Refusal::NoMeta);
    }
    let spec = CollectionSpec {
        name: d.name.clone(),
        kind: d.kind,
        persistence: d.persistence,
        replication: d.replication,
        replication_factor: d.replication_factor,
        split_size: d.split_size,
        retention_secs: d.retention_secs,
    };
    // A stale read (or a concurrent create) fails the guard: read again. The answer is the
    // descriptor as written (this node's view may not have it yet).
    let created = seed
        .propose_retrying(5, Duration::from_millis(100), |s| {
            ops::create_collection(s, &spec).map(|(c, t)| Attempt::Propose(t, c))
        })
        .await;
    match created {
        Ok(c) => ok(id, ClientResponse_oneof_kind::collection(c)),
        Err(RetryError::Build(e)) => meta_error(id, e),
        Err(RetryError::Invalid(m)) => invalid(id, "request", m),
        Err(RetryError::GaveUp(last)) => error(
            id,
            ClientError_Code::UNAVAILABLE,
            format!("create-collection not applied: {last}"),
        ),
    }
}

/// Lookup: collection descriptor and the range holding `key`.
pub fn lookup(seed: &Arc<Seed>, id: u64, l: Lookup) -> ClientResponse {
    if !seed.meta_known() {
        return refusal(id, Refusal::NoMeta);
    }
    let found = seed.read_meta(|s| -> Result<_, MetaError> {
        let Some(c) = view::collection(s, &l.collection)? else {
            return Ok(None);
        };
        let mut full = c.value.prefix.to_vec();
        full.extend_from_slice(&l.key);
        let r = view::lookup(s, &full)?;
        Ok(Some((c.value, r)))
    });
    match found {
        Ok(Some((c, r))) => {
            let mut reply = LookupReply::new();
            reply.set_collection(c);
            if let Some(r) = r {
                reply.set_range(r.value);
            }
            ok(id, ClientResponse_oneof_kind::lookup(reply))
        }
        Ok(None) => error(
            id,
            ClientError_Code::NOT_FOUND,
            format!("no collection named {:?}", l.collection),
        ),
        Err(e) => meta_error(id, e),
    }
}

pub(crate) fn wrong_range(id: u64, why: &str, d: Option<RangeDescriptor>) -> ClientResponse {
    let mut r = error(id, ClientError_Code::WRONG_RANGE, why);
    if let (Some(ClientResponse_oneof_kind::error(e)), Some(d)) = (r.kind.as_mut(), d) {
        e.set_range(d);
    }
    r
}

/// Meta's range descriptors as one client connection last read them, valid while the meta
/// this node reads ([`Seed::read_meta`]) stays at `revision`: meta's content is a function of
/// its revision (replica and subscribed view alike), so a descriptor read at the current
/// revision is what a fresh seek would return. A request then costs a revision check instead
/// of a seek and a descriptor decode.
#[derive(Debug, Default)]
pub struct RouteCache {
    state: Mutex<CachedRoutes>,
}

#[derive(Debug, Default)]
struct CachedRoutes {
    revision: u64,
    ranges: Vec<Arc<RangeDescriptor>>,
}

/// Descriptors a [`RouteCache`] holds at most (the oldest is dropped first).
pub const ROUTE_CACHE_RANGES: usize = 64;

impl RouteCache {
    /// The cached descriptor holding `key` at meta revision `revision`.
    fn get(&self, revision: u64, key: &[u8]) -> Option<Arc<RangeDescriptor>> {
        let st = self.state.lock();
        if st.revision != revision {
            return None;
        }
        st.ranges
            .iter()
            .find(|d| d.lo.as_ref() <= key && key < d.hi.as_ref())
            .cloned()
    }

    /// Remember `d`, read at meta revision `revision` (forgetting everything read at another).
    fn put(&self, revision: u64, d: Arc<RangeDescriptor>) {
        let mut st = self.state.lock();
        if st.revision != revision {
            st.revision = revision;
            st.ranges.clear();
        }
        if st.ranges.len() >= ROUTE_CACHE_RANGES {
            st.ranges.remove(0);
        }
        st.ranges.push(d);
    }
}

/// Meta's descriptor of the range holding `key` (one seek), through `cache` when given.
fn range_holding(
    seed: &Seed,
    cache: Option<&RouteCache>,
    key: &[u8],
) -> Option<Arc<RangeDescriptor>> {
    let Some(cache) = cache else {
        return seed
            .read_meta(|s| view::lookup(s, key).ok().flatten())
            .map(|d| Arc::new(d.value));
    };
    let revision = seed.read_meta(|s| s.revision());
    if let Some(d) = cache.get(revision, key) {
        return Some(d);
    }
    let (revision, d) = seed.read_meta(|s| (s.revision(), view::lookup(s, key).ok().flatten()));
    let d = Arc::new(d?.value);
    cache.put(revision, d.clone());
    Some(d)
}

/// Route a request for range `range` (the client's descriptor at `epoch`) whose first key is
/// `first_key`: this node's replica of the range and meta's descriptor of the range holding
/// `first_key` (one seek). `WRONG_RANGE` (with meta's descriptor when there is one) when this
/// node holds no replica, meta puts `first_key` in another range or none, or the client's
/// epoch is stale.
pub(crate) fn route(
    seed: &Seed,
    id: u64,
    range: u64,
    epoch: u64,
    first_key: &[u8],
) -> Result<(LocalRange, RangeDescriptor), Box<ClientResponse>> {
    route_cached(seed, None, id, range, epoch, first_key).map(|(l, d)| (l, Arc::unwrap_or_clone(d)))
}

/// [`route`] with meta's descriptors read through `cache`.
pub(crate) fn route_cached(
    seed: &Seed,
    cache: Option<&RouteCache>,
    id: u64,
    range: u64,
    epoch: u64,
    first_key: &[u8],
) -> Result<(LocalRange, Arc<RangeDescriptor>), Box<ClientResponse>> {
    let desc = range_holding(seed, cache, first_key);
    let owned = |d: Arc<RangeDescriptor>| Some(Arc::unwrap_or_clone(d));
    let Some(local) = seed.ranges.get(range) else {
        return Err(Box::new(wrong_range(
            id,
            "this node holds no replica of the range",
            desc.and_then(owned),
        )));
    };
    let Some(desc) = desc else {
        return Err(Box::new(wrong_range(
            id,
            "no range holds the key in this node's meta",
            None,
        )));
    };
    if desc.id != range {
        return Err(Box::new(wrong_range(
            id,
            "key in another range",
            owned(desc),
        )));
    }
    if epoch < desc.epoch {
        return Err(Box::new(wrong_range(
            id,
            "stale range descriptor",
            owned(desc),
        )));
    }
    Ok((local, desc))
}

/// The client address of node `node`, from meta.
fn client_addr(seed: &Seed, node: u64) -> String {
    seed.read_meta(|s| {
        view::node(s, node)
            .ok()
            .flatten()
            .map(|n| n.value.client_addr)
            .unwrap_or_default()
    })
}

fn not_leader(seed: &Seed, id: u64, hint: Option<u64>) -> ClientResponse {
    let mut r = error(id, ClientError_Code::NOT_LEADER, "not the range's leader");
    if let Some(ClientResponse_oneof_kind::error(e)) = r.kind.as_mut() {
        if let Some(h) = hint.filter(|h| *h != seed.id) {
            e.leader_hint = client_addr(seed, h);
        }
    }
    r
}

/// A descriptor's `[lo, hi)` as bounds.
pub(crate) fn descriptor_bounds(d: &RangeDescriptor) -> Bounds {
    Bounds {
        lo: d.lo.clone(),
        hi: Some(d.hi.clone()),
    }
}

/// The keys a command touches (a scan without an end: `None`, to the range's end) and
/// whether it reads; bad keys are answered `(field, why)`.
fn command_span(op: &Command_oneof_op) -> Result<(KeyRange, bool), (&'static str, &'static str)> {
    Ok(match op {
        Command_oneof_op::put(p) => (KeyRange::key(p.key.clone()), false),
        Command_oneof_op::cas(c) => (KeyRange::key(c.key.clone()), false),
        Command_oneof_op::get(g) => (KeyRange::key(g.key.clone()), true),
        Command_oneof_op::delete(d) => {
            if d.range_end.as_ref() == [0] {
                return Err((
                    "range_end",
                    "\"\\0\" (every key from key on) spans ranges: give an end inside the range",
                ));
            }
            if !d.range_end.is_empty() && d.range_end <= d.key {
                return Err((
                    "range_end",
                    "must be above key (or empty for the key alone)",
                ));
            }
            (KeyRange::etcd(d.key.clone(), d.range_end.clone()), false)
        }
        Command_oneof_op::scan(s) => {
            if s.end.as_ref() == [0] {
                return Err((
                    "end",
                    "\"\\0\" (every key from start on) spans ranges: give an end inside the \
                     range, or none for the range's end",
                ));
            }
            if !s.end.is_empty() && s.end <= s.start {
                return Err(("end", "must be above start (or empty for the range's end)"));
            }
            let end = (!s.end.is_empty()).then(|| s.end.clone());
            (
                KeyRange {
                    start: s.start.clone(),
                    end,
                },
                true,
            )
        }
        Command_oneof_op::batch(b) => (batch_span(b)?, false),
        _ => return Err(("command", "not a client command")),
    })
}

/// The keys a batch touches: the smallest span holding every op's keys (so a bounds check of
/// it checks every op). Each op must be a put, delete or compare-and-swap (with the same key
/// rules as alone); an empty batch, a nested batch or a read in a batch is invalid.
fn batch_span(b: &kvpb::Batch) -> Result<KeyRange, (&'static str, &'static str)> {
    let mut hull: Option<KeyRange> = None;
    for c in &b.ops {
        let span = match &c.op {
            Some(
                op @ (Command_oneof_op::put(_)
                | Command_oneof_op::delete(_)
                | Command_oneof_op::cas(_)),
            ) => command_span(op)?.0,
            Some(Command_oneof_op::batch(_)) => {
                return Err(("batch.ops", "nested batches are not allowed"))
            }
            _ => {
                return Err((
                    "batch.ops",
                    "only puts, deletes and compare-and-swaps can be batched",
                ))
            }
        };
        hull = Some(match hull {
            None => span,
            Some(h) => KeyRange {
                start: h.start.min(span.start),
                // Writes always have an end (a delete to the end of the key space is refused).
                end: h.end.max(span.end),
            },
        });
    }
    hull.ok_or(("batch.ops", "must not be empty"))
}

/// `WRONG_RANGE` for a key this replica's store no longer holds (a split moved it), with
/// meta's current descriptor of the range.
fn moved(seed: &Seed, id: u64, range: u64) -> ClientResponse {
    let desc = seed.read_meta(|s| view::range_by_id(s, range).ok().flatten());
    wrong_range(
        id,
        "key moved to another range by a split",
        desc.map(|d| d.value),
    )
}

/// Whether an applied write was refused because its key moved away in a split.
fn moved_away(resp: &[u8]) -> bool {
    kvpb::Response::parse_from_bytes(resp)
        .is_ok_and(|r| r.has_error() && r.get_error().code == kvpb::ErrorCode::KEY_OUT_OF_RANGE)
}

fn reply(id: u64, resp: &kvpb::Response) -> ClientResponse {
    match resp.write_to_bytes() {
        Ok(b) => {
            let mut k = KvReply::new();
            k.response = b.into();
            ok(id, ClientResponse_oneof_kind::kv(k))
        }
        Err(e) => error(id, ClientError_Code::INTERNAL, e.to_string()),
    }
}

/// How a KV command is routed to the range the client addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routing {
    /// Every key the command touches must lie in the range (meta's descriptor at the client's
    /// epoch or later, and the local store's bounds), else `WRONG_RANGE` and nothing is
    /// proposed ([`route_keys`]).
    KeysInRange,
    /// Proposed to the addressed range wherever its keys are now, if this node holds a
    /// replica of it ([`held_replica`]): a resent batch of single-key writes (its request id's
    /// `attempt` is above 0: an earlier send may have reached the range). See the module doc
    /// for why its answer is right whatever the range's bounds are now.
    Addressed,
}

/// How `cmd` is routed ([`Routing`]): a batch of puts, single-key deletes and
/// compare-and-swaps sent again under its request id goes to the range addressed; everything
/// else (first sends, a batch holding a range delete, single writes, reads) is checked
/// against the range's keys.
fn routing(cmd: &kvpb::Command) -> Routing {
    let resent = cmd.request_id.as_ref().is_some_and(|id| id.attempt > 0);
    let Some(Command_oneof_op::batch(b)) = &cmd.op else {
        return Routing::KeysInRange;
    };
    // Apply checks each of these ops' key against the store's bounds (`KEY_OUT_OF_RANGE` in
    // its slot, not applied); a range delete keeps the key check (see the module doc).
    let single_keys = b.ops.iter().all(|c| match &c.op {
        Some(Command_oneof_op::put(_) | Command_oneof_op::cas(_)) => true,
        Some(Command_oneof_op::delete(d)) => d.range_end.is_empty(),
        _ => false,
    });
    if resent && single_keys {
        Routing::Addressed
    } else {
        Routing::KeysInRange
    }
}

/// [`Routing::KeysInRange`]: the replica of range `k.range` held here, `span` (the command's
/// keys, a scan without an end to the range's end) and the range's split-fence mark taken
/// before the store's bounds check; `WRONG_RANGE` when [`route_cached`] refuses or the keys
/// are not all in meta's descriptor or in the local store's bounds (a split applied here
/// that meta does not show yet).
fn route_keys(
    seed: &Seed,
    cache: &RouteCache,
    id: u64,
    k: &KvRequest,
    span: KeyRange,
) -> Result<(LocalRange, KeyRange, crate::ranges::FenceMark), Box<ClientResponse>> {
    let (local, desc) = route_cached(seed, Some(cache), id, k.range, k.epoch, &span.start)?;
    let span = KeyRange {
        end: Some(span.end.unwrap_or_else(|| desc.hi.clone())),
        ..span
    };
    // Never empty: its start is below the descriptor's hi (route) and its end above it.
    if !descriptor_bounds(&desc).covers(&span) {
        return Err(Box::new(wrong_range(
            id,
            "key outside the range",
            Some(Arc::unwrap_or_clone(desc)),
        )));
    }
    // Before the store's bounds check: an Async write overlapping a split of this node is
    // answered at apply or settled after its reply (see `crate::ranges::SplitFence`).
    let mark = local.fence.mark();
    if !local.reader.bounds().covers(&span) {
        return Err(Box::new(moved(seed, id, k.range)));
    }
    Ok((local, span, mark))
}

/// [`Routing::Addressed`]: this node's replica of range `range`, whatever its bounds and the
/// client's epoch. Ranges are never removed from meta (splits only add them), so a replica
/// held here is of a range that exists. `WRONG_RANGE` with meta's current descriptor of the
/// range (its members) when this node holds none.
fn held_replica(seed: &Seed, id: u64, range: u64) -> Result<LocalRange, Box<ClientResponse>> {
    seed.ranges.get(range).ok_or_else(|| {
        let desc = seed.read_meta(|s| view::range_by_id(s, range).ok().flatten());
        Box::new(wrong_range(
            id,
            "this node holds no replica of the range",
            desc.map(|d| d.value),
        ))
    })
}

/// One KV command for one range (meta's descriptors read through `cache`, the connection's).
pub async fn kv(seed: &Arc<Seed>, cache: &RouteCache, id: u64, k: KvRequest) -> ClientResponse {
    if k.command.len() > MAX_COMMAND {
        return error(
            id,
            ClientError_Code::TOO_LARGE,
            format!("command of {} bytes (limit {MAX_COMMAND})", k.command.len()),
        );
    }
    let cmd = match kvpb::Command::parse_from_carllerche_bytes(&k.command) {
        Ok(c) => c,
        Err(e) => return invalid(id, "command", format!("does not decode: {e}")),
    };
    let Some(op) = &cmd.op else {
        return invalid(id, "command", "empty command");
    };
    let (span, read) = match command_span(op) {
        Ok(s) => s,
        Err((field, why)) => return invalid(id, field, why),
    };
    let (local, span, mark) = match routing(&cmd) {
        Routing::KeysInRange => match route_keys(seed, cache, id, &k, span) {
            Ok(r) => r,
            Err(r) => return *r,
        },
        Routing::Addressed => match held_replica(seed, id, k.range) {
            Ok(local) => {
                // Taken like a first send's (a batch is answered at apply whatever it is).
                let mark = local.fence.mark();
                (local, span, mark)
            }
            Err(r) => return *r,
        },
    };
    let cell = CellId(k.range);
    let deadline = Instant::now() + Duration::from_secs(5);
    if read {
        if !k.follower {
            // A lease read on a non-leader answers NotLeader at once (with its hint); a leader
            // with a fresh lease answers from its read view without a trip through the shard.
            match seed
                .node
                .read_barrier(cell, ReadConsistency::Lease, deadline)
                .await
            {
                Ok(_) => {}
                Err(HError::NotLeader { leader_hint, .. }) => {
                    return not_leader(seed, id, leader_hint.map(|l| l.get()))
                }
                Err(e) => return error(id, ClientError_Code::UNAVAILABLE, e.to_string()),
            }
        }
        let now = now_ms();
        let resp = match cmd.op {
            Some(Command_oneof_op::get(g)) => match local.reader.get(&g.key, now) {
                Ok((kv, h)) => {
                    let mut r = kvpb::Response::new();
                    r.set_header(h.to_pb());
                    let mut gr = kvpb::GetResult::new();
                    if let Some(kv) = kv {
                        gr.set_kv(kv.to_pb());
                    }
                    r.set_get(gr);
                    r
                }
                Err(KvError::KeyOutOfRange) => return moved(seed, id, k.range),
                Err(e) => return error(id, ClientError_Code::INTERNAL, e.to_string()),
            },
            Some(Command_oneof_op::scan(s)) => {
                let limit = if s.limit == 0 {
                    MAX_SCAN_KEYS
                } else {
                    s.limit.min(MAX_SCAN_KEYS)
                };
                let max_bytes = if s.max_bytes == 0 {
                    MAX_SCAN_BYTES
                } else {
                    s.max_bytes.min(MAX_SCAN_BYTES)
                };
                let req = ScanRequest {
                    range: span,
                    limit: limit as usize,
                    max_bytes: max_bytes as usize,
                    keys_only: s.keys_only,
                    revision: s.revision,
                };
                match local.reader.scan_in_bounds(&req, now) {
                    Ok(page) => page.to_pb(),
                    Err(KvError::KeyOutOfRange) => return moved(seed, id, k.range),
                    Err(e) => return invalid(id, "scan", e.to_string()),
                }
            }
            _ => return invalid(id, "command", "not a read"),
        };
        return reply(id, &resp);
    }
    let data: Bytes = encode_entry(now_ms(), &k.command);
    // At apply when the client needs the result (compare-and-swap, delete, previous value)
    // or a split is in flight; else as the range's mode says. Packable: the writes to this
    // range that reach its shard in the same round share one raft entry (one raft append,
    // log record, message and apply for all of them), each answered with its own reply.
    let ack = crate::ranges::write_ack(op, mark);
    match seed.node.propose_packable(cell, data, deadline, ack).await {
        Ok(r) => match r.response {
            // Applied as a refusal: the key moved away in a split before the write applied.
            Some(bytes) if moved_away(&bytes) => moved(seed, id, k.range),
            Some(bytes) => {
                let mut kr = KvReply::new();
                kr.response = bytes;
                ok(id, ClientResponse_oneof_kind::kv(kr))
            }
            None => {
                // Async replication: durable on the leader, not applied yet; unless a split
                // may have moved the key away before it applies.
                match crate::ranges::settle_async_write(
                    seed, &local, mark, r.index, &span, deadline,
                )
                .await
                {
                    Ok(true) => {}
                    Ok(false) => return moved(seed, id, k.range),
                    Err(e) => {
                        return error(
                            id,
                            ClientError_Code::UNKNOWN_OUTCOME,
                            format!("outcome unknown: durable on the leader, not applied: {e}"),
                        )
                    }
                }
                let mut resp = kvpb::Response::new();
                let mut h = kvpb::ResponseHeader::new();
                h.applied_index = r.index;
                resp.set_header(h);
                reply(id, &resp)
            }
        },
        Err(HError::NotLeader { leader_hint, .. }) => {
            not_leader(seed, id, leader_hint.map(|l| l.get()))
        }
        // Not proposed (flow control) or its slot was taken by another leader: not applied.
        Err(e @ (HError::Busy { .. } | HError::ProposalDropped { .. })) => {
            let mut r = not_leader(seed, id, None);
            if let Some(ClientResponse_oneof_kind::error(er)) = r.kind.as_mut() {
                er.message = format!("not applied: {e}");
            }
            r
        }
        Err(e) => error(
            id,
            ClientError_Code::UNKNOWN_OUTCOME,
            format!("outcome unknown: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::kvpb::{Delete, Get, Put, Scan};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn delete(key: &str, end: &[u8]) -> Command_oneof_op {
        let mut d = Delete::new();
        d.key = b(key);
        d.range_end = Bytes::copy_from_slice(end);
        Command_oneof_op::delete(d)
    }

    fn scan(start: &str, end: &[u8]) -> Command_oneof_op {
        let mut s = Scan::new();
        s.start = b(start);
        s.end = Bytes::copy_from_slice(end);
        Command_oneof_op::scan(s)
    }

    fn desc(id: u64, lo: &str, hi: &str) -> Arc<RangeDescriptor> {
        let mut d = RangeDescriptor::new();
        d.id = id;
        d.lo = b(lo);
        d.hi = b(hi);
        Arc::new(d)
    }

    #[test]
    fn the_route_cache_answers_only_at_the_revision_it_was_filled_at() {
        let c = RouteCache::default();
        assert!(c.get(0, b"a").is_none(), "empty");
        c.put(5, desc(1, "a", "m"));
        c.put(5, desc(2, "m", "z"));
        assert_eq!(c.get(5, b"a").map(|d| d.id), Some(1));
        assert_eq!(c.get(5, b"l").map(|d| d.id), Some(1));
        assert_eq!(c.get(5, b"m").map(|d| d.id), Some(2));
        assert!(c.get(5, b"z").is_none(), "hi is exclusive");
        assert!(c.get(5, b"0").is_none(), "below every lo");
        // Meta moved on: nothing read at 5 is answered at 6, and a put at 6 drops it all.
        assert!(c.get(6, b"a").is_none());
        c.put(6, desc(3, "a", "f"));
        assert_eq!(c.get(6, b"b").map(|d| d.id), Some(3));
        assert!(c.get(6, b"m").is_none());
        assert!(c.get(5, b"b").is_none());
    }

    #[test]
    fn the_route_cache_is_bounded_and_drops_the_oldest() {
        let c = RouteCache::default();
        let key = |i: usize| format!("k{i:04}");
        for i in 0..ROUTE_CACHE_RANGES + 1 {
            c.put(1, desc(i as u64, &key(i), &key(i + 1)));
        }
        assert_eq!(c.state.lock().ranges.len(), ROUTE_CACHE_RANGES);
        assert!(c.get(1, key(0).as_bytes()).is_none(), "the oldest went");
        assert_eq!(
            c.get(1, key(ROUTE_CACHE_RANGES).as_bytes()).map(|d| d.id),
            Some(ROUTE_CACHE_RANGES as u64)
        );
    }

    #[test]
    fn keys_past_the_range_are_invalid_not_wrong_range() {
        assert_eq!(
            command_span(&delete("k", b"\0")).unwrap_err().0,
            "range_end"
        );
        assert_eq!(command_span(&delete("k", b"k")).unwrap_err().0, "range_end");
        assert_eq!(command_span(&delete("k", b"a")).unwrap_err().0, "range_end");
        assert_eq!(command_span(&scan("k", b"\0")).unwrap_err().0, "end");
        assert_eq!(command_span(&scan("k", b"k")).unwrap_err().0, "end");
        assert_eq!(command_span(&scan("k", b"a")).unwrap_err().0, "end");
    }

    #[test]
    fn spans_of_the_commands() {
        let mut p = Put::new();
        p.key = b("k");
        assert_eq!(
            command_span(&Command_oneof_op::put(p)).unwrap(),
            (KeyRange::key(b("k")), false)
        );
        let mut g = Get::new();
        g.key = b("k");
        assert_eq!(
            command_span(&Command_oneof_op::get(g)).unwrap(),
            (KeyRange::key(b("k")), true)
        );
        assert_eq!(
            command_span(&delete("k", b"")).unwrap(),
            (KeyRange::key(b("k")), false)
        );
        assert_eq!(
            command_span(&delete("k", b"m")).unwrap(),
            (
                KeyRange {
                    start: b("k"),
                    end: Some(b("m"))
                },
                false
            )
        );
        assert_eq!(
            command_span(&scan("k", b"")).unwrap(),
            (
                KeyRange {
                    start: b("k"),
                    end: None
                },
                true
            )
        );
    }

    fn batch_of(ops: Vec<Command_oneof_op>) -> Command_oneof_op {
        let mut b = kvpb::Batch::new();
        for op in ops {
            let mut c = kvpb::Command::new();
            c.op = Some(op);
            b.ops.push(c);
        }
        Command_oneof_op::batch(b)
    }

    fn put(key: &str) -> Command_oneof_op {
        let mut p = Put::new();
        p.key = b(key);
        Command_oneof_op::put(p)
    }

    #[test]
    fn a_batch_spans_every_ops_keys() {
        let (span, read) =
            command_span(&batch_of(vec![put("m"), delete("c", b"e"), put("k")])).unwrap();
        assert!(!read);
        assert_eq!(
            span,
            KeyRange {
                start: b("c"),
                end: Some(b("m\0"))
            }
        );
        // A bounds check of the span checks every op: one key past hi fails it.
        let mut desc = RangeDescriptor::new();
        desc.lo = b("c");
        desc.hi = b("m");
        assert!(!descriptor_bounds(&desc).covers(&span));
        desc.hi = b("m\0");
        assert!(descriptor_bounds(&desc).covers(&span));
        let (one, _) = command_span(&batch_of(vec![put("k")])).unwrap();
        assert_eq!(one, KeyRange::key(b("k")));
    }

    fn command(op: Command_oneof_op, attempt: Option<u32>) -> kvpb::Command {
        let mut c = kvpb::Command::new();
        c.op = Some(op);
        if let Some(attempt) = attempt {
            let mut id = kvpb::RequestId::new();
            id.client = 7;
            id.seq = 3;
            id.first_incomplete = 3;
            id.attempt = attempt;
            c.set_request_id(id);
        }
        c
    }

    fn cas(key: &str) -> Command_oneof_op {
        let mut c = kvpb::Cas::new();
        c.key = b(key);
        Command_oneof_op::cas(c)
    }

    #[test]
    fn only_a_resent_batch_of_single_key_writes_goes_to_the_addressed_range() {
        let singles = || batch_of(vec![put("z"), delete("a", b""), cas("m")]);
        // Resent (an earlier send may have reached the range): proposed where addressed.
        for attempt in [1, 2, 16] {
            assert_eq!(
                routing(&command(singles(), Some(attempt))),
                Routing::Addressed
            );
        }
        // A first send, or no request id: every key must lie in the range.
        assert_eq!(routing(&command(singles(), Some(0))), Routing::KeysInRange);
        assert_eq!(routing(&command(singles(), None)), Routing::KeysInRange);
        // A range delete in the batch: routed by its keys even when resent.
        assert_eq!(
            routing(&command(
                batch_of(vec![put("a"), delete("c", b"e")]),
                Some(1)
            )),
            Routing::KeysInRange
        );
        // Resent single writes and reads keep the check (a resent put follows its key).
        assert_eq!(routing(&command(put("a"), Some(1))), Routing::KeysInRange);
        assert_eq!(routing(&command(cas("a"), Some(1))), Routing::KeysInRange);
        assert_eq!(
            routing(&command(delete("a", b""), Some(1))),
            Routing::KeysInRange
        );
        let mut g = Get::new();
        g.key = b("a");
        assert_eq!(
            routing(&command(Command_oneof_op::get(g), Some(1))),
            Routing::KeysInRange
        );
        assert_eq!(
            routing(&command(scan("a", b""), Some(1))),
            Routing::KeysInRange
        );
        // An op without an operation is not a single-key write (invalid later anyway).
        let mut empty = kvpb::Batch::new();
        empty.ops.push(kvpb::Command::new());
        assert_eq!(
            routing(&command(Command_oneof_op::batch(empty), Some(1))),
            Routing::KeysInRange
        );
    }

    #[test]
    fn bad_batches_are_invalid() {
        let field = |op| command_span(&op).unwrap_err().0;
        assert_eq!(field(batch_of(vec![])), "batch.ops");
        assert_eq!(
            field(batch_of(vec![put("a"), batch_of(vec![put("b")])])),
            "batch.ops"
        );
        let mut g = Get::new();
        g.key = b("a");
        assert_eq!(field(batch_of(vec![Command_oneof_op::get(g)])), "batch.ops");
        assert_eq!(field(batch_of(vec![scan("a", b"")])), "batch.ops");
        // An op's own key rules hold in a batch.
        assert_eq!(
            field(batch_of(vec![put("a"), delete("k", b"\0")])),
            "range_end"
        );
        let mut empty = kvpb::Batch::new();
        empty.ops.push(kvpb::Command::new());
        assert_eq!(
            command_span(&Command_oneof_op::batch(empty)).unwrap_err().0,
            "batch.ops"
        );
    }

    #[test]
    fn a_span_is_checked_against_the_descriptors_lo_and_hi() {
        let mut desc = RangeDescriptor::new();
        desc.lo = b("c");
        desc.hi = b("m");
        let d = descriptor_bounds(&desc);
        assert_eq!(d.lo, b("c"));
        assert_eq!(d.hi, Some(b("m")));
        assert!(d.covers(&KeyRange::key(b("c"))));
        assert!(!d.covers(&KeyRange::key(b("m"))));
        assert!(!d.covers(&KeyRange::key(b("b"))));
        let span = |s: &str, e: &str| KeyRange {
            start: b(s),
            end: Some(b(e)),
        };
        assert!(d.covers(&span("c", "m")));
        assert!(!d.covers(&span("c", "n")));
        assert!(!d.covers(&KeyRange::etcd(b("c"), b("\0"))));
        let unbounded = Bounds::default();
        assert!(unbounded.covers(&KeyRange::etcd(b("a"), b("\0"))));
    }
}
