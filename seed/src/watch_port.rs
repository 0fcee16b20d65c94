//! The client port's watch: a long-poll on one range's watch history.
//!
//! A `WatchRequest` names a range (and the epoch of the client's descriptor), the watched
//! keys `[key, range_end)` (full keys) and a start revision. The answer is, in order of
//! preference:
//! - the events from the start revision, in revision order: whole revisions, at most about
//!   `max_events` events and `max_bytes` bytes (at least one revision), and the revision to
//!   ask for next;
//! - when there are none yet, the same after waiting up to `wait_ms` for a change of the
//!   range (an empty reply with `next_revision` when none came);
//! - when the history before the start revision is compacted, a resync: the current state of
//!   the watched keys and the revision events continue from.
//!
//! # Paging
//! No reply exceeds [`MAX_REPLY`]. A resync is sent as pages: each holds the current state of
//! the next keys (at most `max_bytes` and [`RESYNC_KEYS`] keys), read at the replica's
//! revision then, and names the key the next page starts at (`resync_more`; the client asks
//! with `resync_from`). The store keeps no old versions, so pages are read at successive
//! revisions: the client resumes events from the first page's `next_revision` and drops an
//! event already contained in the page that holds its key (its revision is below that page's
//! `next_revision`). A single revision above [`MAX_BYTES`] (a range delete, an expiry or a
//! batch of many keys) is cut inside: the reply names the last key it sent (`after_key`, its
//! events are in key order) and the client asks for the same revision after that key.
//!
//! Any replica serves it: every replica applies the same commands, so revisions and history
//! are identical everywhere (a lagging replica answers later, never differently). The reply
//! header carries the replica's revision and applied index. A replica that knows no leader
//! (partitioned, or in an election) answers `UNAVAILABLE` so the client asks another member
//! instead of waiting on a replica that may never catch up.
//!
//! Refusals: `WRONG_RANGE` when this node holds no replica, the client's epoch is stale, or
//! the watched keys are not inside both the descriptor in meta and the replica's own bounds.
//! The bounds are checked again after the history is read: bounds only shrink (a split), so
//! when they still hold afterwards, the events read contain every change of the watched keys
//! up to `next_revision`; when they do not, the reply is `WRONG_RANGE` and nothing is
//! delivered (the client looks the ranges up again and continues from its revision in each
//! daughter, which has the same revision counter and a copy of the history).
//!
//! # Waiting
//! The store broadcasts each applied command to bounded crossbeam subscriptions
//! ([`KvReader::subscribe`]). Async tasks cannot block on a crossbeam channel, and a
//! subscription per poll would cost a channel buffer per poll until the range's next write.
//! So there is one subscription per watched range (per node), owned by one process-wide
//! thread, the pump, which selects over them and bumps a `tokio::sync::watch` counter per
//! range on every message. A poll takes a receiver of its range's counter *before* it reads
//! the history (creating the subscription if the range has none), so a change applied after
//! the read always bumps the counter it waits on. A subscription that disconnects (it
//! overflowed, the store restored a snapshot or was dropped) is removed and its counter
//! dropped, which wakes its polls; they take a fresh one and read again. A range nobody waits
//! on for [`SWEEP`] loses its subscription. A poll whose task is dropped just drops its
//! receiver; a poll never outlives `wait_ms`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use collections::kv::{KeyRange, KvReader, ScanRequest, Subscription, WatchBatch};
use collections::KvError;
use crossbeam_channel::{Receiver, Select, Sender};
use harpoon::{CellId, Role};
use parking_lot::Mutex;
use proto::clientpb::{ClientError_Code, ClientResponse, WatchReply, WatchRequest};
use proto::kvpb;
use protobuf::Message;
use tokio::sync::watch as counter;
use tokio::time::Instant;

use crate::client_port::error;
use crate::kv_port::{descriptor_bounds, invalid, route, wrong_range};
use crate::node::{now_ms, Seed};

/// Events per reply when the request leaves it 0.
pub const DEFAULT_MAX_EVENTS: u64 = 1000;
/// Most events per reply (whole revisions may add a few).
pub const MAX_EVENTS: u64 = 10_000;
/// Bytes (keys plus values) per reply when the request leaves it 0.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 10;
/// Most bytes per reply (the client port's frame limit is 1 MiB).
pub const MAX_BYTES: u64 = 768 << 10;
/// Longest wait for a change.
pub const MAX_WAIT_MS: u64 = 30_000;
/// Largest encoded reply (the `WatchResponse` plus the continuation key). Replies are cut
/// below it: a revision's events over several replies, a resync over several pages. Only a
/// single event above it would be refused `TOO_LARGE`, and the client port cannot write one:
/// a put's command (key, value and a few fields) is at most `kv_port::MAX_COMMAND` (this
/// limit less 3840 bytes), its event adds at most [`EVENT_OVERHEAD`] bytes, and the reply
/// header and the
/// frame's wrapping (the request id, `WatchReply`'s tags and lengths) fit in the 256 bytes
/// left below the frame limit (tested).
pub const MAX_REPLY: usize = crate::client_port::MAX_FRAME - 256;
/// Keys per resync page at most: with [`MAX_BYTES`] of keys and values, their per-key
/// encoding overhead (at most about 60 bytes) keeps a page below [`MAX_REPLY`].
pub const RESYNC_KEYS: u64 = 4096;
/// How long the pump keeps the subscription of a range nobody waits on.
pub const SWEEP: Duration = Duration::from_millis(500);
/// Bytes an event costs on the wire besides its key and value, at most (its type, the key
/// value's revisions, version and lease, tags and lengths).
pub const EVENT_OVERHEAD: u64 = 64;

/// One watch long-poll, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchParams {
    /// The watched keys (full keys).
    pub keys: KeyRange,
    /// Inclusive; 0 = from the next change.
    pub start_revision: u64,
    /// Events per reply (at least one whole revision).
    pub max_events: u64,
    /// Bytes per reply (at least one whole revision).
    pub max_bytes: u64,
    /// Wait this long for a change when there is none.
    pub wait: Duration,
    /// Continue a paged resync from this key (inside `keys`).
    pub resync_from: Option<Bytes>,
    /// Events of `start_revision` for keys up to this one were delivered.
    pub after_key: Option<Bytes>,
}

impl WatchParams {
    /// Validates `w` and applies the defaults and caps. `Err((field, why))` for bad input.
    pub fn from_request(w: &WatchRequest) -> Result<WatchParams, (&'static str, String)> {
        if w.key.is_empty() {
            return Err(("key", "must not be empty".into()));
        }
        let keys = if w.range_end.is_empty() {
            KeyRange::key(w.key.clone())
        } else if w.range_end <= w.key {
            return Err(("range_end", "must be empty or greater than key".into()));
        } else {
            KeyRange {
                start: w.key.clone(),
                end: Some(w.range_end.clone()),
            }
        };
        let resync_from = (!w.resync_from.is_empty()).then(|| w.resync_from.clone());
        if let Some(f) = &resync_from {
            if !keys.contains(f) {
                return Err(("resync_from", "must lie inside [key, range_end)".into()));
            }
        }
        let after_key = (!w.after_key.is_empty()).then(|| w.after_key.clone());
        if after_key.is_some() && w.start_revision == 0 {
            return Err(("after_key", "needs a start_revision".into()));
        }
        let pick = |v: u64, default: u64, cap: u64| if v == 0 { default } else { v.min(cap) };
        Ok(WatchParams {
            keys,
            start_revision: w.start_revision,
            max_events: pick(w.max_events, DEFAULT_MAX_EVENTS, MAX_EVENTS),
            max_bytes: pick(w.max_bytes, DEFAULT_MAX_BYTES, MAX_BYTES),
            wait: Duration::from_millis(w.wait_ms.min(MAX_WAIT_MS)),
            resync_from,
            after_key,
        })
    }
}

/// One reply of [`serve`]: the response and where the next one continues.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Events (possibly none after the wait) or (part of) a resync.
    pub resp: kvpb::WatchResponse,
    /// A resync page that is not the last: the next page starts at this key.
    pub resync_more: Option<Bytes>,
    /// The reply ends inside revision `resp.next_revision`: its events up to this key were
    /// sent.
    pub after_key: Option<Bytes>,
}

/// What [`serve`] answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Served {
    /// A reply.
    Reply(Page),
    /// The watched keys are not (or no longer) inside the replica's bounds.
    OutOfBounds,
    /// One event does not fit a reply; the reply's encoded size. Unreachable through the
    /// client port (see [`MAX_REPLY`]); kept as a typed refusal rather than an oversized frame.
    TooLarge(usize),
}

fn event_bytes(e: &collections::kv::Event) -> u64 {
    (e.kv.key.len() + e.kv.value.len()) as u64 + EVENT_OVERHEAD
}

/// The replica's revision, applied index and horizon, read together (a keys-only scan of at
/// most one key of `keys`: O(log n), unlike `range_stats`, which walks half the index).
fn header(
    reader: &KvReader,
    keys: &KeyRange,
    now_ms: u64,
) -> Result<kvpb::ResponseHeader, KvError> {
    let req = ScanRequest {
        range: KeyRange::key(keys.start.clone()),
        limit: 1,
        max_bytes: 0,
        keys_only: true,
        revision: 0,
    };
    Ok(reader.scan(&req, now_ms)?.header.to_pb())
}

/// Serves one long-poll on `reader` (no routing checks: see [`watch`]). `range` names the
/// store for the pump (unique per store in this process: the node and the range id). `clock`
/// is the time (unix ms) that filters expired keys out of a resync.
///
/// # Errors
/// Storage errors reading the history.
pub async fn serve(
    reader: &KvReader,
    range: RangeKey,
    p: &WatchParams,
    clock: &(dyn Fn() -> u64 + Sync),
) -> Result<Served, KvError> {
    if !reader.bounds().covers(&p.keys) {
        return Ok(Served::OutOfBounds);
    }
    if let Some(from) = &p.resync_from {
        return resync_page(reader, p, from.clone(), clock);
    }
    let deadline = Instant::now() + p.wait;
    // Listen before the first read: a change applied after the read is never missed.
    let mut changes = listen(range, reader);
    let mut from = if p.start_revision == 0 {
        reader.revision().saturating_add(1)
    } else {
        p.start_revision
    };
    loop {
        if let Some(c) = changes.as_mut() {
            c.borrow_and_update();
        }
        // Compacted history: page the current state instead (its first page).
        if from <= header(reader, &p.keys, clock())?.compact_revision {
            return resync_page(reader, p, p.keys.start.clone(), clock);
        }
        let batch = reader.events_since(from, &p.keys, p.max_events as usize, clock())?;
        // Bounds only shrink: still inside after the read means the read saw every change of
        // the watched keys up to its next revision.
        if !reader.bounds().covers(&p.keys) {
            return Ok(Served::OutOfBounds);
        }
        match batch {
            // Compacted between the two reads.
            WatchBatch::Resync { .. } => {
                return resync_page(reader, p, p.keys.start.clone(), clock);
            }
            WatchBatch::Events {
                mut events,
                next_revision,
            } => {
                if let Some(after) = &p.after_key {
                    // The part of revision `from` already delivered.
                    events.retain(|e| e.revision() != from || e.kv.key > *after);
                }
                // A lagging replica reports its own next revision; never send a client back.
                let next_revision = next_revision.max(from);
                if events.is_empty() && Instant::now() < deadline {
                    from = next_revision;
                    match changes.as_mut() {
                        Some(c) => {
                            tokio::select! {
                                r = c.changed() => if r.is_err() {
                                    // The subscription went away: listen again, then read.
                                    changes = listen(range, reader);
                                },
                                _ = tokio::time::sleep_until(deadline) => {}
                            }
                        }
                        None => {
                            // No pump thread (it could not be spawned): poll.
                            let step = Instant::now() + Duration::from_millis(20);
                            tokio::time::sleep_until(step.min(deadline)).await;
                        }
                    }
                    continue;
                }
                // Nothing new for the partly delivered revision: it is done.
                let (events, next_revision, after_key) = if events.is_empty() {
                    (events, next_revision, None)
                } else {
                    cut(events, next_revision, p.max_bytes)
                };
                let mut resp = WatchBatch::Events {
                    events,
                    next_revision,
                }
                .to_pb();
                resp.set_header(header(reader, &p.keys, clock())?);
                return Ok(checked(Page {
                    resp,
                    resync_more: None,
                    after_key,
                }));
            }
        }
    }
}

/// One page of a resync: the current state of the watched keys from `start`, at most
/// `max_bytes` of keys and values and [`RESYNC_KEYS`] keys (at least one), read at the
/// replica's revision; `next_revision` is that revision plus one.
fn resync_page(
    reader: &KvReader,
    p: &WatchParams,
    start: Bytes,
    clock: &(dyn Fn() -> u64 + Sync),
) -> Result<Served, KvError> {
    let req = ScanRequest {
        range: KeyRange {
            start,
            end: p.keys.end.clone(),
        },
        limit: p.max_events.min(RESYNC_KEYS) as usize,
        max_bytes: p.max_bytes as usize,
        keys_only: false,
        revision: 0,
    };
    let page = reader.scan(&req, clock())?;
    if !reader.bounds().covers(&p.keys) {
        return Ok(Served::OutOfBounds);
    }
    let mut resp = WatchBatch::Resync {
        current: page.kvs,
        next_revision: page.header.revision.saturating_add(1),
    }
    .to_pb();
    resp.set_header(page.header.to_pb());
    Ok(checked(Page {
        resp,
        resync_more: page.next_key,
        after_key: None,
    }))
}

/// `page`, or `TooLarge` when it does not fit a reply.
fn checked(page: Page) -> Served {
    let more = page.resync_more.as_ref().map_or(0, |k| k.len());
    let after = page.after_key.as_ref().map_or(0, |k| k.len());
    let size = page.resp.compute_size() as usize + more + after;
    if size > MAX_REPLY {
        return Served::TooLarge(size);
    }
    Served::Reply(page)
}

/// Keeps whole revisions of `events` up to about `max_bytes` (at least one revision); the
/// next revision is the first one left out. A revision above [`MAX_BYTES`] on its own (a
/// range delete, an expiry or a batch of many keys) is cut inside, after at least one event:
/// the next revision is then that one, with the last key sent (`Some`).
fn cut(
    mut events: Vec<collections::kv::Event>,
    next_revision: u64,
    max_bytes: u64,
) -> (Vec<collections::kv::Event>, u64, Option<Bytes>) {
    let mut bytes = 0u64;
    let mut prev = None;
    for i in 0..events.len() {
        let rev = events[i].revision();
        let b = event_bytes(&events[i]);
        let total = bytes.saturating_add(b);
        let boundary = prev.is_some_and(|p| p != rev);
        if boundary && total > max_bytes {
            events.truncate(i);
            return (events, rev, None);
        }
        if i > 0 && total > MAX_BYTES {
            // Inside a revision (a boundary was handled above, as MAX_BYTES >= max_bytes).
            let after = events[i - 1].kv.key.clone();
            events.truncate(i);
            return (events, rev, Some(after));
        }
        bytes = total;
        prev = Some(rev);
    }
    (events, next_revision, None)
}

/// Names one store for the pump: (namespace, range id); the node uses its own address as the
/// namespace so nodes sharing a process never share an entry.
pub type RangeKey = (u64, u64);

/// The counters of the watched ranges, and the pump's registration channel.
struct Hub {
    counters: Mutex<HashMap<RangeKey, Arc<counter::Sender<u64>>>>,
    reg: Sender<(RangeKey, Subscription, Arc<counter::Sender<u64>>)>,
}

/// The hub (`None` if the pump thread could not be spawned).
fn hub() -> Option<&'static Hub> {
    static HUB: OnceLock<Option<Hub>> = OnceLock::new();
    HUB.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded();
        match std::thread::Builder::new()
            .name("watch-pump".into())
            .spawn(move || run_pump(rx))
        {
            Ok(_) => Some(Hub {
                counters: Mutex::new(HashMap::new()),
                reg: tx,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the watch pump; watches poll");
                None
            }
        }
    })
    .as_ref()
}

/// A receiver of `range`'s change counter, subscribing the store if the range has none.
fn listen(range: RangeKey, reader: &KvReader) -> Option<counter::Receiver<u64>> {
    let hub = hub()?;
    let mut counters = hub.counters.lock();
    if let Some(c) = counters.get(&range) {
        return Some(c.subscribe());
    }
    let (tx, rx) = counter::channel(0);
    let tx = Arc::new(tx);
    hub.reg.send((range, reader.subscribe(), tx.clone())).ok()?;
    counters.insert(range, tx);
    Some(rx)
}

/// Drops `range`'s entry if it is still `tx` (a newer one may have replaced it).
fn forget(range: RangeKey, tx: &Arc<counter::Sender<u64>>, only_unused: bool) -> bool {
    let Some(hub) = hub() else { return true };
    let mut counters = hub.counters.lock();
    // Receivers are only made under this lock, so the count cannot grow meanwhile.
    if only_unused && tx.receiver_count() > 0 {
        return false;
    }
    if counters.get(&range).is_some_and(|c| Arc::ptr_eq(c, tx)) {
        counters.remove(&range);
    }
    true
}

type Entry = (RangeKey, Subscription, Arc<counter::Sender<u64>>);

fn run_pump(reg: Receiver<Entry>) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut idle_since: HashMap<RangeKey, std::time::Instant> = HashMap::new();
    let mut swept = std::time::Instant::now();
    loop {
        if swept.elapsed() >= SWEEP {
            let now = std::time::Instant::now();
            entries.retain(|(range, _, tx)| {
                if tx.receiver_count() > 0 {
                    idle_since.remove(range);
                    return true;
                }
                let since = *idle_since.entry(*range).or_insert(now);
                if now.duration_since(since) < SWEEP || !forget(*range, tx, true) {
                    return true;
                }
                idle_since.remove(range);
                false
            });
            swept = now;
        }
        let mut sel = Select::new();
        let ctl = sel.recv(&reg);
        for (_, sub, _) in &entries {
            sel.recv(sub);
        }
        let Ok(op) = sel.select_timeout(SWEEP) else {
            continue;
        };
        let i = op.index();
        if i == ctl {
            match op.recv(&reg) {
                Ok(e) => {
                    drop(sel);
                    entries.push(e);
                }
                // Every sender is gone: the process is exiting.
                Err(_) => return,
            }
            continue;
        }
        let got = op.recv(&entries[i - 1].1);
        drop(sel);
        match got {
            Ok(_) => entries[i - 1].2.send_modify(|n| *n = n.wrapping_add(1)),
            Err(_) => {
                // Overflowed, restored or dropped: its polls wake (the counter goes away) and
                // listen again.
                let (range, _, tx) = entries.swap_remove(i - 1);
                forget(range, &tx, false);
                idle_since.remove(&range);
            }
        }
    }
}

/// The client port's answer carrying `page`.
fn response(id: u64, page: Page) -> ClientResponse {
    let mut wr = WatchReply::new();
    wr.set_response(page.resp);
    wr.resync_more = page.resync_more.unwrap_or_default();
    wr.after_key = page.after_key.unwrap_or_default();
    let mut r = ClientResponse::new();
    r.id = id;
    r.set_watch(wr);
    r
}

/// One watch long-poll from the client port.
pub async fn watch(seed: &Arc<Seed>, id: u64, w: WatchRequest) -> ClientResponse {
    let p = match WatchParams::from_request(&w) {
        Ok(p) => p,
        Err((field, why)) => return invalid(id, field, why),
    };
    let (local, desc) = match route(seed, id, w.range, w.epoch, &p.keys.start) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if !descriptor_bounds(&desc).covers(&p.keys) {
        return wrong_range(id, "watched keys outside the range", Some(desc));
    }
    match seed.node.status(CellId(w.range)).await {
        Ok(s) if s.role == Role::Leader || s.leader.is_some() => {}
        Ok(_) => {
            return error(
                id,
                ClientError_Code::UNAVAILABLE,
                "this replica knows no leader (it may lag): ask another member",
            )
        }
        Err(e) => return error(id, ClientError_Code::UNAVAILABLE, e.to_string()),
    }
    let key = (Arc::as_ptr(seed) as usize as u64, w.range);
    match serve(&local.reader, key, &p, &now_ms).await {
        Ok(Served::Reply(page)) => response(id, page),
        Ok(Served::OutOfBounds) => wrong_range(
            id,
            "watched keys outside this replica's bounds (the range split)",
            Some(desc),
        ),
        Ok(Served::TooLarge(size)) => error(
            id,
            ClientError_Code::TOO_LARGE,
            format!("one event makes a reply of {size} bytes (reply limit {MAX_REPLY})"),
        ),
        Err(e) => error(id, ClientError_Code::INTERNAL, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use collections::kv::{cmd, KvConfig, KvStore};
    use proto::kvpb::EventType;

    use super::*;
    use collections::kv::Bounds;

    const NOW: u64 = 1_000_000;

    fn clock() -> u64 {
        NOW
    }

    /// A pump key no other test uses.
    fn fresh_key() -> RangeKey {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        (
            u64::MAX,
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }

    struct Store {
        s: KvStore,
        index: u64,
        key: RangeKey,
    }

    impl Store {
        fn new(cfg: KvConfig) -> Store {
            Store {
                s: KvStore::open(cfg).unwrap(),
                index: 0,
                key: fresh_key(),
            }
        }
        fn run(&mut self, c: proto::kvpb::Command) {
            self.index += 1;
            self.s.apply(self.index, 1, NOW, &cmd::encode(&c)).unwrap();
        }
        fn put(&mut self, k: &str, v: &str) {
            self.run(cmd::put(k.as_bytes(), v.as_bytes(), 0));
        }
        fn del(&mut self, k: &str) {
            self.run(cmd::delete(k.as_bytes(), b""));
        }
    }

    fn params(start: &str, end: &str, from: u64, wait_ms: u64) -> WatchParams {
        let mut w = WatchRequest::new();
        w.key = Bytes::copy_from_slice(start.as_bytes());
        w.range_end = Bytes::copy_from_slice(end.as_bytes());
        w.start_revision = from;
        w.wait_ms = wait_ms;
        WatchParams::from_request(&w).unwrap()
    }

    fn reply(s: Served) -> kvpb::WatchResponse {
        page(s).resp
    }

    fn page(s: Served) -> Page {
        match s {
            Served::Reply(p) => p,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn keys(r: &kvpb::WatchResponse) -> Vec<(EventType, String, u64)> {
        r.events
            .iter()
            .map(|e| {
                (
                    e.field_type,
                    String::from_utf8_lossy(&e.get_kv().key).into_owned(),
                    e.get_kv().mod_revision,
                )
            })
            .collect()
    }

    /// Polls `f` once (it must be pending), then returns it.
    async fn started<F: Future + Unpin>(mut f: F) -> F {
        tokio::select! {
            biased;
            _ = &mut f => panic!("the poll answered before any change"),
            _ = std::future::ready(()) => {}
        }
        f
    }

    #[tokio::test]
    async fn events_of_the_watched_keys_in_revision_order() {
        let mut st = Store::new(KvConfig::memory());
        st.put("a", "1"); // rev 1
        st.put("p/x", "1"); // rev 2
        st.put("p/y", "1"); // rev 3
        st.put("q", "1"); // rev 4
        st.del("p/x"); // rev 5
        st.put("p/y", "2"); // rev 6
        let r = st.s.reader();
        let got = reply(
            serve(&r, st.key, &params("p/", "p0", 1, 0), &clock)
                .await
                .unwrap(),
        );
        assert_eq!(
            keys(&got),
            vec![
                (EventType::PUT, "p/x".into(), 2),
                (EventType::PUT, "p/y".into(), 3),
                (EventType::DELETE, "p/x".into(), 5),
                (EventType::PUT, "p/y".into(), 6),
            ]
        );
        assert_eq!(got.next_revision, 7);
        assert!(!got.resync);
        assert_eq!(got.get_header().revision, 6);
        assert_eq!(got.get_header().applied_index, 6);
        // From the middle; a single key.
        let got = reply(
            serve(&r, st.key, &params("p/y", "", 4, 0), &clock)
                .await
                .unwrap(),
        );
        assert_eq!(keys(&got), vec![(EventType::PUT, "p/y".into(), 6)]);
        // Nothing new and no wait: an empty reply that moves the client forward.
        let got = reply(
            serve(&r, st.key, &params("p/", "p0", 7, 0), &clock)
                .await
                .unwrap(),
        );
        assert!(got.events.is_empty());
        assert_eq!(got.next_revision, 7);
        // A lagging replica never sends a client back below its revision.
        let got = reply(
            serve(&r, st.key, &params("p/", "p0", 50, 0), &clock)
                .await
                .unwrap(),
        );
        assert!(got.events.is_empty());
        assert_eq!(got.next_revision, 50);
    }

    #[tokio::test]
    async fn replies_are_bounded_by_whole_revisions() {
        let mut st = Store::new(KvConfig::memory());
        for i in 0..10 {
            st.put(&format!("k{i}"), &"v".repeat(100));
        }
        // One revision holding two events (a range delete).
        st.run(cmd::delete(b"k0", b"k2"));
        let r = st.s.reader();
        let mut p = params("k", "l", 1, 0);
        p.max_bytes = 250; // two events of ~133 bytes do not fit
        let got = reply(serve(&r, st.key, &p, &clock).await.unwrap());
        assert_eq!(keys(&got).len(), 1);
        assert_eq!(got.next_revision, 2);
        // A revision larger than the bound is sent whole.
        p.start_revision = 11;
        p.max_bytes = 1;
        let got = reply(serve(&r, st.key, &p, &clock).await.unwrap());
        assert_eq!(keys(&got).len(), 2);
        assert_eq!(got.next_revision, 12);
        // max_events: whole revisions until at least that many events.
        p.start_revision = 1;
        p.max_bytes = MAX_BYTES;
        p.max_events = 3;
        let got = reply(serve(&r, st.key, &p, &clock).await.unwrap());
        assert_eq!(keys(&got).len(), 3);
        assert_eq!(got.next_revision, 4);
    }

    #[tokio::test]
    async fn a_poll_waits_for_the_next_change_of_its_keys() {
        let mut st = Store::new(KvConfig::memory());
        st.put("w/a", "1");
        let r = st.s.reader();
        let p = params("w/", "w0", 2, 60_000);
        let poll = started(Box::pin(serve(&r, st.key, &p, &clock))).await;
        // A change of another key wakes it (the pump bumps the range's counter it waits on),
        // but it keeps waiting for its own keys.
        let mut bumped = listen(st.key, &r).expect("the pump runs");
        st.put("other", "x"); // rev 2
        tokio::time::timeout(std::time::Duration::from_secs(10), bumped.changed())
            .await
            .expect("the pump bumps the range's counter")
            .expect("the counter is still there");
        let poll = started(poll).await;
        st.put("w/b", "2"); // rev 3
        let got = reply(poll.await.unwrap());
        assert_eq!(keys(&got), vec![(EventType::PUT, "w/b".into(), 3)]);
        assert_eq!(got.next_revision, 4);
        // Start revision 0 = the next change.
        let p0 = params("w/", "w0", 0, 60_000);
        let poll = started(Box::pin(serve(&r, st.key, &p0, &clock))).await;
        st.del("w/a"); // rev 4
        let got = reply(poll.await.unwrap());
        assert_eq!(keys(&got), vec![(EventType::DELETE, "w/a".into(), 4)]);
        // A poll dropped while waiting (its client went away) leaves nothing stuck: the next
        // poll is woken as usual.
        {
            let gone = started(Box::pin(serve(&r, st.key, &p0, &clock))).await;
            drop(gone);
        }
        let poll = started(Box::pin(serve(&r, st.key, &p0, &clock))).await;
        st.put("w/c", "3"); // rev 5
        let got = reply(poll.await.unwrap());
        assert_eq!(keys(&got), vec![(EventType::PUT, "w/c".into(), 5)]);
        // With nothing happening, a short wait ends with an empty reply.
        let got = reply(
            serve(&r, st.key, &params("w/", "w0", 6, 20), &clock)
                .await
                .unwrap(),
        );
        assert!(got.events.is_empty());
        assert_eq!(got.next_revision, 6);
    }

    #[tokio::test]
    async fn compacted_history_gives_a_resync_of_the_watched_keys() {
        let mut st = Store::new(KvConfig::memory());
        st.put("r/a", "1"); // 1
        st.put("r/b", "1"); // 2
        st.put("s", "1"); // 3
        st.del("r/a"); // 4
        st.put("r/b", "2"); // 5
        st.run(cmd::compact(4));
        let r = st.s.reader();
        let got = reply(
            serve(&r, st.key, &params("r/", "r0", 2, 0), &clock)
                .await
                .unwrap(),
        );
        assert!(got.resync);
        assert!(got.events.is_empty());
        let cur: Vec<(String, String)> = got
            .current
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                )
            })
            .collect();
        assert_eq!(cur, vec![("r/b".to_string(), "2".to_string())]);
        assert_eq!(got.next_revision, r.revision() + 1);
        assert_eq!(got.get_header().compact_revision, 4);
        // Above the horizon: events again.
        let got = reply(
            serve(&r, st.key, &params("r/", "r0", 5, 0), &clock)
                .await
                .unwrap(),
        );
        assert!(!got.resync);
        assert_eq!(keys(&got), vec![(EventType::PUT, "r/b".into(), 5)]);
    }

    #[tokio::test]
    async fn keys_outside_the_bounds_are_refused_also_when_a_split_lands_mid_poll() {
        let mut st = Store::new(KvConfig::memory());
        st.put("a", "1");
        st.put("x", "1");
        let r = st.s.reader();
        // A poll across the future split point, waiting.
        let across = params("a", "z", 3, 60_000);
        let poll = started(Box::pin(serve(&r, st.key, &across, &clock))).await;
        st.index += 1;
        let mut right =
            st.s.split_off(st.index, 1, b"m", KvConfig::memory())
                .unwrap();
        st.put("b", "2"); // rev 3 in the left half: wakes the poll
        assert_eq!(poll.await.unwrap(), Served::OutOfBounds);
        // Inside the left half: served; the right half continues the same revisions.
        let got = reply(
            serve(&r, st.key, &params("a", "m", 1, 0), &clock)
                .await
                .unwrap(),
        );
        assert_eq!(
            keys(&got),
            vec![
                (EventType::PUT, "a".into(), 1),
                (EventType::PUT, "b".into(), 3)
            ]
        );
        assert_eq!(
            serve(&r, st.key, &params("a", "n", 1, 0), &clock)
                .await
                .unwrap(),
            Served::OutOfBounds
        );
        right
            .apply(st.index + 1, 1, NOW, &cmd::encode(&cmd::put(b"y", b"1", 0)))
            .unwrap();
        let rr = right.reader();
        let rkey = fresh_key();
        let got = reply(
            serve(&rr, rkey, &params("m", "z", 1, 0), &clock)
                .await
                .unwrap(),
        );
        assert_eq!(
            keys(&got),
            vec![
                (EventType::PUT, "x".into(), 2),
                (EventType::PUT, "y".into(), 3)
            ]
        );
        assert_eq!(
            serve(&rr, rkey, &params("a", "z", 1, 0), &clock)
                .await
                .unwrap(),
            Served::OutOfBounds
        );
    }

    #[tokio::test]
    async fn a_restore_wakes_waiting_polls_and_idle_ranges_are_unsubscribed() {
        let mut other = Store::new(KvConfig::memory());
        for i in 0..5 {
            other.put(&format!("n/{i}"), "x");
        }
        let image = other.s.reader().snapshot().to_bytes().unwrap();
        let mut st = Store::new(KvConfig::memory());
        st.put("n/0", "old");
        let r = st.s.reader();
        let p = params("n/", "n0", 2, 60_000);
        let poll = started(Box::pin(serve(&r, st.key, &p, &clock))).await;
        // The restore drops every subscription: the poll wakes, listens again, and reads the
        // restored history.
        st.s.restore_bytes(&image).unwrap();
        let got = reply(poll.await.unwrap());
        assert_eq!(keys(&got).first(), Some(&(EventType::PUT, "n/1".into(), 2)));
        assert_eq!(got.next_revision, 6);
        // Later polls use a fresh subscription.
        let p = params("n/", "n0", 6, 60_000);
        let poll = started(Box::pin(serve(&r, st.key, &p, &clock))).await;
        st.index = 100;
        st.put("n/9", "new");
        let got = reply(poll.await.unwrap());
        assert_eq!(keys(&got), vec![(EventType::PUT, "n/9".into(), 6)]);
        // Nobody waits any more: the range's subscription is dropped after the sweep period.
        let h = hub().expect("pump");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while h.counters.lock().contains_key(&st.key) {
            assert!(
                std::time::Instant::now() < deadline,
                "idle subscription kept"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn requests_are_validated_and_capped() {
        let mut w = WatchRequest::new();
        assert_eq!(WatchParams::from_request(&w).unwrap_err().0, "key");
        w.key = Bytes::from_static(b"k");
        w.range_end = Bytes::from_static(b"a");
        assert_eq!(WatchParams::from_request(&w).unwrap_err().0, "range_end");
        w.range_end = Bytes::new();
        w.max_events = u64::MAX;
        w.max_bytes = u64::MAX;
        w.wait_ms = u64::MAX;
        let p = WatchParams::from_request(&w).unwrap();
        assert_eq!(p.keys, KeyRange::key(Bytes::from_static(b"k")));
        assert_eq!(p.max_events, MAX_EVENTS);
        assert_eq!(p.max_bytes, MAX_BYTES);
        assert_eq!(p.wait, Duration::from_millis(MAX_WAIT_MS));
        w.max_events = 0;
        w.max_bytes = 0;
        let p = WatchParams::from_request(&w).unwrap();
        assert_eq!(
            (p.max_events, p.max_bytes),
            (DEFAULT_MAX_EVENTS, DEFAULT_MAX_BYTES)
        );
        let unbounded = Bounds {
            lo: Bytes::new(),
            hi: None,
        };
        let all = KeyRange::all();
        assert!(unbounded.covers(&all));
        let b = Bounds {
            lo: Bytes::from_static(b"b"),
            hi: Some(Bytes::from_static(b"d")),
        };
        assert!(!b.covers(&all));
        assert!(b.covers(&KeyRange::key(Bytes::from_static(b"c"))));
        assert!(!b.covers(&KeyRange::key(Bytes::from_static(b"a"))));
        assert!(b.covers(&KeyRange::prefix(Bytes::from_static(b"c"))));
        assert!(!b.covers(&KeyRange::prefix(Bytes::from_static(b"d"))));
        // Continuations: inside the watched keys, and after a known revision.
        w.key = Bytes::from_static(b"p/");
        w.range_end = Bytes::from_static(b"p0");
        w.resync_from = Bytes::from_static(b"q");
        assert_eq!(WatchParams::from_request(&w).unwrap_err().0, "resync_from");
        w.resync_from = Bytes::from_static(b"p/m");
        let p = WatchParams::from_request(&w).unwrap();
        assert_eq!(p.resync_from.as_deref(), Some(&b"p/m"[..]));
        w.after_key = Bytes::from_static(b"p/a");
        assert_eq!(WatchParams::from_request(&w).unwrap_err().0, "after_key");
        w.start_revision = 3;
        let p = WatchParams::from_request(&w).unwrap();
        assert_eq!(p.after_key.as_deref(), Some(&b"p/a"[..]));
    }

    fn encoded(s: &Served) -> usize {
        match s {
            Served::Reply(p) => {
                p.resp.compute_size() as usize
                    + p.resync_more.as_ref().map_or(0, |k| k.len())
                    + p.after_key.as_ref().map_or(0, |k| k.len())
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_resync_of_several_mib_is_paged_below_the_reply_limit() {
        let mut st = Store::new(KvConfig::memory());
        let big = "v".repeat(300 << 10);
        for i in 0..24 {
            st.put(&format!("r/{i:02}"), &big); // revs 1..=24: 7.2 MiB
        }
        st.put("s", "outside"); // 25
        st.run(cmd::compact(25));
        let r = st.s.reader();
        let mut p = params("r/", "r0", 3, 0);
        p.max_bytes = MAX_BYTES;
        let mut pages = Vec::new();
        let mut keys = Vec::new();
        loop {
            let served = serve(&r, st.key, &p, &clock).await.unwrap();
            assert!(encoded(&served) <= MAX_REPLY, "{}", encoded(&served));
            let pg = page(served);
            assert!(pg.resp.resync && pg.after_key.is_none());
            keys.extend(
                pg.resp
                    .current
                    .iter()
                    .map(|kv| String::from_utf8_lossy(&kv.key).into_owned()),
            );
            pages.push(pg.resp.next_revision);
            match pg.resync_more {
                Some(k) => {
                    // The next pages are read later: a change in between shows in them.
                    if pages.len() == 1 {
                        st.put("r/23", "changed"); // 26
                    }
                    p.resync_from = Some(k);
                }
                None => break,
            }
        }
        assert!(pages.len() >= 9, "7.2 MiB in {} pages", pages.len());
        let want: Vec<String> = (0..24).map(|i| format!("r/{i:02}")).collect();
        assert_eq!(keys, want, "every key once, in order");
        assert_eq!(pages[0], 26);
        assert_eq!(
            *pages.last().unwrap(),
            27,
            "later pages at the later revision"
        );
        // Events continue from the first page's revision (the client drops r/23's event at
        // 26: its page already holds it).
        let got = reply(
            serve(&r, st.key, &params("r/", "r0", pages[0], 0), &clock)
                .await
                .unwrap(),
        );
        assert_eq!(keys_of(&got), vec![(EventType::PUT, "r/23".into(), 26)]);
    }

    fn keys_of(r: &kvpb::WatchResponse) -> Vec<(EventType, String, u64)> {
        keys(r)
    }

    #[tokio::test]
    async fn a_revision_above_the_reply_limit_is_sent_over_several_replies_in_key_order() {
        let mut st = Store::new(KvConfig::memory());
        // 1200 keys of 1000 bytes, then one range delete: one revision of ~1.2 MB of events.
        let key = |i: usize| {
            let mut k = format!("d/{i:04}/").into_bytes();
            k.resize(1000, b'k');
            String::from_utf8(k).unwrap()
        };
        for i in 0..1200 {
            st.put(&key(i), "1");
        }
        st.run(cmd::delete(b"d/", b"d0")); // 1201
        st.put("d/zz", "after"); // 1202
        let r = st.s.reader();
        let mut p = params("d/", "d0", 1201, 0);
        p.max_bytes = 1; // whole revisions otherwise: only the reply limit cuts
        let mut got = Vec::new();
        let mut replies = 0;
        loop {
            let served = serve(&r, st.key, &p, &clock).await.unwrap();
            assert!(encoded(&served) <= MAX_REPLY, "{}", encoded(&served));
            let pg = page(served);
            replies += 1;
            got.extend(keys(&pg.resp));
            p.start_revision = pg.resp.next_revision;
            p.after_key = pg.after_key.clone();
            if pg.after_key.is_none() {
                break;
            }
            assert_eq!(pg.resp.next_revision, 1201);
        }
        assert!(replies >= 2);
        let want: Vec<(EventType, String, u64)> = (0..1200)
            .map(|i| (EventType::DELETE, key(i), 1201))
            .collect();
        assert_eq!(got, want, "every delete once, in key order");
        assert_eq!(p.start_revision, 1202);
        let next = reply(serve(&r, st.key, &p, &clock).await.unwrap());
        assert_eq!(keys(&next), vec![(EventType::PUT, "d/zz".into(), 1202)]);
    }

    #[tokio::test]
    async fn the_largest_put_the_client_port_takes_fits_a_watch_reply() {
        let mut st = Store::new(KvConfig::memory());
        let key = "k".repeat(4 << 10);
        let mut value = vec![b'v'; crate::kv_port::MAX_COMMAND];
        // The largest value whose put command the client port accepts.
        let c = loop {
            let c = cmd::put(key.as_bytes(), &value, 0);
            if cmd::encode(&c).len() <= crate::kv_port::MAX_COMMAND {
                break c;
            }
            value.pop();
        };
        st.run(c);
        let r = st.s.reader();
        let served = serve(&r, st.key, &params(&key, "", 1, 0), &clock)
            .await
            .unwrap();
        assert!(encoded(&served) <= MAX_REPLY, "{}", encoded(&served));
        let pg = page(served);
        assert_eq!(pg.resp.events.len(), 1);
        // And the client port's frame holds it, with the largest request id.
        let mut out = Vec::new();
        proto::frame::encode_message(
            &response(u64::MAX, pg),
            crate::client_port::MAX_FRAME,
            &mut out,
        )
        .expect("fits a frame");
    }
}
