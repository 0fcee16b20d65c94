//! Request-id deduplication: a write that carries a `kvpb.RequestId` is applied at most once
//! per range, however often the client resends it.
//!
//! # The table
//! Per client id: the replies of its most recently applied seqs (`recent`, seq → encoded
//! `kvpb.Response`) and a `floor`: every seq at or below it is forgotten. A command with an id:
//! - whose seq is in `recent` is a duplicate: it gets the recorded reply again and changes
//!   nothing (no revision, no event; only the applied index moves, as for every entry);
//! - whose seq is at or below `floor` is *expired*: it gets `REQUEST_EXPIRED` ("request id
//!   expired: outcome unknown") and changes nothing, never a second apply;
//! - of a client the table does not know, sent again (`attempt > 0`) while the table may have
//!   evicted that client under pressure (see below), is expired too;
//! - otherwise it is applied and its reply recorded.
//!
//! # Bounds (and what happens past them)
//! - per client at most [`WINDOW`] replies and [`CLIENT_MAX_BYTES`] of them: the oldest seq
//!   goes first and raises `floor`; a client's `first_incomplete` (its lowest unanswered seq)
//!   drops every reply below it at once;
//! - a reply longer than [`REPLY_FULL_MAX`] (`CLIENT_MAX_BYTES / WINDOW`: a full window of
//!   replies that size fits the byte bound, so only the count bound raises the floor) is
//!   recorded *without its values* ([`for_table`]): every `KeyValue` in it (a put's or a
//!   delete's previous values, a cas's current value, in batch slots too) keeps its key and
//!   revisions but not its value, and the record carries a marker (unknown field
//!   [`STRIPPED_FIELD`] of `kvpb.Response`). A duplicate of such a write gets the values back
//!   from the watch history, where each one is the event at `(mod_revision, key)`
//!   ([`restore_values`]): the client gets the reply it would have got the first time. If one
//!   of them has left the history (compacted), the duplicate is answered `REQUEST_EXPIRED`
//!   ("outcome unknown"), as if the reply had been forgotten, never with a wrong value;
//! - a batch reply is recorded *packed* ([`for_table`]) whenever that is shorter: one slot per
//!   op makes it long (a 10,000-put batch replies 160 KB: about 16 bytes a slot, each with its
//!   own header), yet within one entry its slots mostly differ only by their header's
//!   revision. The record is the reply's header, an empty batch and an unknown field
//!   [`PACKED_FIELD`] of `kvpb.Response` holding varints: format `1`, then runs, each `n`,
//!   `step`, a template's length and the template (an encoded slot, the run's first); slot
//!   `k` of a run is the template with revision `template's + k * step`. Runs are greedy: a
//!   slot joins the last run if it equals its template but for a revision `step` above the
//!   previous slot's (the run's second slot sets `step`: 1 for puts and deletes that deleted
//!   one key, 0 for deletes of missing keys, failed cas and slot errors; a put over an
//!   expired key takes 2 and starts a run). Slots carrying values (`prev_kv`, a cas's
//!   `current`) differ by key and stay one-slot runs; a batch whose runs average under two
//!   slots is not packed. `pack` unpacks each record it makes and keeps it only if that
//!   gives the encoded reply back byte for byte (else the full reply is recorded), so a
//!   duplicate gets exactly the first answer ([`restore_values`] unpacks). A 10,000-put
//!   batch without `prev_kv` records 38 bytes (10,000 single-key deletes 42, deletes of
//!   missing keys 41), so a client's 64 in-flight maximal batches all stay remembered. A
//!   packed reply still over [`REPLY_FULL_MAX`] is stripped of its values as above (the
//!   stripped reply packed, the marker after the packed field). Tables that load (images,
//!   data-log payloads) check every packed record ([`Packed::of`]: one value, format 1,
//!   templates with a header, no revision past `u64`, at most [`PACKED_MAX_REPLY`] bytes
//!   unpacked); records of the earlier forms (full, stripped) load and answer as before;
//! - a client idle for [`EXPIRY_MS`] on the entry clock is forgotten (the client retries a
//!   request id for at most `client::kv::RETRY_WINDOW`, far less);
//! - at most [`MAX_CLIENTS`] clients and [`MAX_BYTES`] of replies in all: the least recently
//!   used client is evicted; for [`EXPIRY_MS`] after that, a retry from a client the table does
//!   not know is answered expired (it may be the evicted one).
//!
//! # Determinism and persistence
//! Every decision depends only on the table, the command and the entry clock, and the form a
//! reply is recorded in only on the reply (packing, stripping), so replicas that applied the
//! same entries hold the same table, byte for byte. It is part of the snapshot image
//! (`snapshot.rs`, image version 2) and, in persistent mode, of the data log: each `COMMIT`
//! record carries the table changes since the previous one (or the whole table after a
//! compaction or restore), so the table is recovered exactly at the committed apply index.
//! The changes wait in a [`Journal`] owned by the data log (`DataLog`): the apply path hands
//! it every [`Recorded`] reply, so a store with a data log journals whatever its state went
//! through (a restore, a failed restore).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use proto::kvpb;
use protobuf::Message;

use crate::error::{KvError, Result};
use crate::kv::codec::{Dec, Enc};

/// Replies remembered per client.
pub const WINDOW: usize = 64;
/// Bytes of replies remembered per client.
pub const CLIENT_MAX_BYTES: u64 = 256 << 10;
/// Clients remembered per range.
pub const MAX_CLIENTS: usize = 4096;
/// Bytes of replies remembered per range.
pub const MAX_BYTES: u64 = 8 << 20;
/// A client idle this long (entry clock) is forgotten.
pub const EXPIRY_MS: u64 = 5 * 60 * 1000;

/// A reply longer than this is recorded without its values (module doc).
pub const REPLY_FULL_MAX: usize = (CLIENT_MAX_BYTES / WINDOW as u64) as usize;
/// The field number of `kvpb.Response` (an unknown field: the schema does not declare it)
/// that marks a reply recorded without its values. Never sent to a client.
pub const STRIPPED_FIELD: u32 = (1 << 29) - 1;

/// Tag of a data-log payload holding table changes since the previous `COMMIT`.
const PAYLOAD_DELTAS: u8 = 1;
/// Tag of a data-log payload holding the whole table.
const PAYLOAD_IMAGE: u8 = 2;

/// A validated request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReqId {
    pub(crate) client: u64,
    pub(crate) seq: u64,
    pub(crate) first_incomplete: u64,
    pub(crate) attempt: u32,
}

impl ReqId {
    /// Checks the wire form: client and seq non-zero, `first_incomplete <= seq`.
    pub(crate) fn from_pb(r: &kvpb::RequestId) -> Result<ReqId> {
        if r.client == 0 {
            return Err(KvError::invalid("request_id.client", "must not be 0"));
        }
        if r.seq == 0 {
            return Err(KvError::invalid("request_id.seq", "must not be 0"));
        }
        if r.first_incomplete > r.seq {
            return Err(KvError::invalid(
                "request_id.first_incomplete",
                "is above seq (the request itself is not finished)",
            ));
        }
        Ok(ReqId {
            client: r.client,
            seq: r.seq,
            first_incomplete: r.first_incomplete,
            attempt: r.attempt,
        })
    }
}

/// What to do with a command carrying a request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not seen: apply it, then [`DedupTable::record`] its reply.
    New,
    /// Applied before: this is its reply.
    Duplicate(Bytes),
    /// Too old to tell: refuse without applying ([`KvError::RequestExpired`]).
    Expired,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ClientEntry {
    /// Every seq at or below is forgotten.
    floor: u64,
    recent: BTreeMap<u64, Bytes>,
    /// Entry clock of the last record.
    last_ms: u64,
    /// Table tick of the last record (its LRU position; unique).
    last_tick: u64,
    bytes: u64,
}

/// The per-range table (module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DedupTable {
    clients: BTreeMap<u64, ClientEntry>,
    /// `(last_tick, client)`: least recently used first.
    lru: BTreeSet<(u64, u64)>,
    tick: u64,
    bytes: u64,
    /// Until this entry-clock time an unknown client's retry may be one evicted under pressure.
    pressure_until_ms: u64,
}

/// One reply recorded by [`DedupTable::record`]: the apply path hands it to the data log's
/// [`Journal`] (persistent mode) so the next `COMMIT` carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub(crate) id: ReqId,
    pub(crate) now_ms: u64,
    pub(crate) reply: Bytes,
}

/// Persistent mode: the table records not yet written to the data log. It belongs to the data
/// log (`DataLog`), so a store with a data log journals every record, whatever happened to
/// its state (a restore, a failed restore).
#[derive(Debug, Default)]
pub(crate) struct Journal {
    buf: Vec<u8>,
    len: u64,
}

impl Journal {
    /// Adds a record to the next `COMMIT`'s deltas.
    pub(crate) fn push(&mut self, r: &Recorded) {
        let mut e = Enc(std::mem::take(&mut self.buf));
        e.u64(r.id.client)
            .u64(r.id.seq)
            .u64(r.id.first_incomplete)
            .u64(r.now_ms)
            .bytes(&r.reply);
        self.buf = e.0;
        self.len += 1;
    }

    /// Forgets the records (the state they were made on is gone).
    pub(crate) fn clear(&mut self) {
        *self = Journal::default();
    }

    /// The payload the next `COMMIT` record carries: the records since the previous one
    /// (empty if none), or the whole `table` when `image` (after a compaction or a restore:
    /// the records before are about to go).
    pub(crate) fn take_payload(&mut self, table: &DedupTable, image: bool) -> Vec<u8> {
        let j = std::mem::take(self);
        let mut e = Enc::default();
        if image {
            e.u8(PAYLOAD_IMAGE);
            table.encode_image(&mut e);
        } else if j.len > 0 {
            e.u8(PAYLOAD_DELTAS).u64(j.len).raw(&j.buf);
        }
        e.0
    }
}

/// Calls `f` on every `KeyValue` of a write's reply (put: `prev_kv`; delete: `prev_kvs`; cas:
/// `current`; batch: each slot's). Stops at the first `Ok(false)` and returns `Ok(false)`.
fn each_kv(
    r: &mut kvpb::Response,
    f: &mut dyn FnMut(&mut kvpb::KeyValue) -> Result<bool>,
) -> Result<bool> {
    use kvpb::Response_oneof_result as Res;
    match r.result.as_mut() {
        Some(Res::put(p)) => match p.prev_kv.as_mut() {
            Some(kv) => f(kv),
            None => Ok(true),
        },
        Some(Res::delete(d)) => {
            for kv in d.prev_kvs.iter_mut() {
                if !f(kv)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Some(Res::cas(c)) => match c.current.as_mut() {
            Some(kv) => f(kv),
            None => Ok(true),
        },
        Some(Res::batch(b)) => {
            for x in b.results.iter_mut() {
                if !each_kv(x, f)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        _ => Ok(true),
    }
}

/// The form of a reply the table records (module doc): a batch reply packed if that is
/// smaller ([`pack`]); then, if still longer than [`REPLY_FULL_MAX`], without its values,
/// marked ([`STRIPPED_FIELD`]) and packed again if that is smaller.
pub(crate) fn for_table(resp: &kvpb::Response, encoded: Bytes) -> Result<Bytes> {
    let kept = match pack(resp, &encoded)? {
        Some(p) => Bytes::from(p),
        None => encoded,
    };
    if kept.len() <= REPLY_FULL_MAX {
        return Ok(kept);
    }
    let mut r = resp.clone();
    let mut stripped = false;
    each_kv(&mut r, &mut |kv| {
        stripped |= !kv.value.is_empty();
        kv.value = Bytes::new();
        Ok(true)
    })?;
    if !stripped {
        return Ok(kept);
    }
    let plain = crate::kv::apply::encode_reply(&r)?;
    let mut out = pack(&r, &plain)?.unwrap_or(plain);
    // The marker goes last, as protobuf writes unknown fields (so an unpacked record is the
    // stripped reply's encoding plus the marker, as it always was).
    put_varint(&mut out, tag(STRIPPED_FIELD, WIRE_VARINT));
    put_varint(&mut out, 1);
    Ok(Bytes::from(out))
}

/// The reply to send for a duplicate whose recorded reply is `recorded`: itself; or, if it
/// is packed, the batch reply it unpacks to; and if it was recorded without its values, the
/// reply with each value loaded by `value_at(key, mod_revision)`; `None` if one of them is
/// gone (the duplicate is answered expired).
pub(crate) fn restore_values(
    recorded: Bytes,
    value_at: &dyn Fn(&Bytes, u64) -> Result<Option<Bytes>>,
) -> Result<Option<Bytes>> {
    let corrupt = |e: protobuf::ProtobufError| KvError::Corrupt {
        what: "dedup reply",
        why: e.to_string(),
    };
    // Recorded replies were checked when the table took them: a parse error is corruption.
    let mut r = kvpb::Response::parse_from_carllerche_bytes(&recorded).map_err(corrupt)?;
    let stripped = r.get_unknown_fields().get(STRIPPED_FIELD).is_some();
    let mut r = match Packed::of(&r).map_err(|why| KvError::Corrupt {
        what: "dedup reply",
        why,
    })? {
        None if !stripped => return Ok(Some(recorded)),
        None => {
            protobuf::Clear::clear(r.mut_unknown_fields());
            r
        }
        Some(p) => {
            let full = p.unpack(r.header.as_ref())?;
            if !stripped {
                return Ok(Some(Bytes::from(full)));
            }
            kvpb::Response::parse_from_bytes(&full).map_err(corrupt)?
        }
    };
    let all = each_kv(
        &mut r,
        &mut |kv| match value_at(&kv.key, kv.mod_revision)? {
            Some(v) => {
                kv.value = v;
                Ok(true)
            }
            None => Ok(false),
        },
    )?;
    if !all {
        return Ok(None);
    }
    crate::kv::apply::encode_reply(&r).map(|b| Some(Bytes::from(b)))
}

/// Checks a recorded reply taken from an image or a data log: a `kvpb.Response`, and if it is
/// packed, runs that unpack within the bounds ([`Packed::of`]).
fn check_recorded(reply: &Bytes) -> std::result::Result<(), String> {
    let r = kvpb::Response::parse_from_carllerche_bytes(reply).map_err(|e| e.to_string())?;
    Packed::of(&r).map(|_| ())
}

/// Protobuf wire types and the field numbers the packed form writes by hand (`kvpb.proto`).
const WIRE_VARINT: u32 = 0;
const WIRE_LEN: u32 = 2;
/// `Response.header`.
const RESPONSE_HEADER: u32 = 1;
/// `Response.batch`.
const RESPONSE_BATCH: u32 = 5;
/// `BatchResult.results`.
const BATCH_RESULTS: u32 = 1;

/// The field number of `kvpb.Response` (an unknown field, like [`STRIPPED_FIELD`]) that holds
/// a batch reply's slots in packed form (module doc). Never sent to a client.
pub const PACKED_FIELD: u32 = (1 << 29) - 2;
/// The first varint of a [`PACKED_FIELD`]: the only format so far (runs of slots).
const PACKED_RUNS: u64 = 1;
/// The most bytes a packed reply may unpack to (bounded by the sum of `n * (template + 18)`
/// over its runs, [`Packed::bound`]); a longer batch reply is recorded unpacked.
pub const PACKED_MAX_REPLY: u64 = 64 << 20;
/// What a slot can grow by over its run's template: a revision of up to 10 varint bytes plus
/// its tag (the template's may be absent, if 0), and one more length byte each for the
/// header, the slot and its frame in the batch.
const SLOT_GROWTH: u64 = 18;

fn tag(field: u32, wire: u32) -> u64 {
    (u64::from(field) << 3) | u64::from(wire)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint off the front of `buf`.
fn get_varint(buf: &mut &[u8]) -> std::result::Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some((&b, rest)) = buf.split_first() else {
            return Err("truncated varint".into());
        };
        *buf = rest;
        if i == 9 && b > 1 {
            return Err("varint above 2^64".into());
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// One run of a packed batch reply: `n` slots, the first `template`, each next one the same
/// but for its header's revision, `step` above the previous one's.
#[derive(Debug)]
struct Run {
    template: kvpb::Response,
    n: u64,
    step: u64,
}

/// The runs of a packed batch reply ([`PACKED_FIELD`]).
#[derive(Debug)]
struct Packed(Vec<Run>);

/// Whether slot `a` is the slot `t` but for its header's revision.
fn same_but_revision(a: &kvpb::Response, t: &kvpb::Response) -> bool {
    let mut h = a.get_header().clone();
    h.revision = t.get_header().revision;
    a.has_header()
        && h == *t.get_header()
        && a.result == t.result
        && a.get_unknown_fields() == t.get_unknown_fields()
}

/// The packed record of batch reply `resp` (encoded: `encoded`), if it is smaller and
/// unpacks to exactly `encoded` (checked here, so a duplicate gets the very bytes); `None`
/// otherwise (not a batch, slots that do not form runs, past [`PACKED_MAX_REPLY`]).
fn pack(resp: &kvpb::Response, encoded: &[u8]) -> Result<Option<Vec<u8>>> {
    let slots = match resp.result.as_ref() {
        Some(kvpb::Response_oneof_result::batch(b)) if b.results.len() > 1 => b.results.as_slice(),
        _ => return Ok(None),
    };
    // Greedy runs: a slot joins the last run if it is its template but for a revision `step`
    // above the previous slot's (the second slot of a run sets the step).
    let mut runs: Vec<(&kvpb::Response, u64, u64)> = Vec::new();
    for slot in slots {
        if !slot.has_header() {
            return Ok(None);
        }
        if let Some((t, n, step)) = runs.last_mut() {
            let (base, rev) = (t.get_header().revision, slot.get_header().revision);
            let at = if *n == 1 {
                rev.checked_sub(base)
            } else {
                Some(*step)
                    .filter(|s| s.checked_mul(*n).and_then(|d| base.checked_add(d)) == Some(rev))
            };
            if let Some(s) = at.filter(|_| same_but_revision(slot, t)) {
                (*n, *step) = (*n + 1, s);
                continue;
            }
        }
        runs.push((slot, 1, 0));
    }
    if runs.len() * 2 > slots.len() {
        // Runs of fewer than 2 slots on average save nothing.
        return Ok(None);
    }
    let mut desc = Vec::new();
    put_varint(&mut desc, PACKED_RUNS);
    for (t, n, step) in &runs {
        let t = t.write_to_bytes().map_err(|e| KvError::Corrupt {
            what: "reply",
            why: e.to_string(),
        })?;
        put_varint(&mut desc, *n);
        put_varint(&mut desc, *step);
        put_varint(&mut desc, t.len() as u64);
        desc.extend_from_slice(&t);
        if desc.len() >= encoded.len() {
            return Ok(None);
        }
    }
    let mut base = kvpb::Response::new();
    base.header = resp.header.clone();
    base.set_batch(kvpb::BatchResult::new());
    let mut out = crate::kv::apply::encode_reply(&base)?;
    put_varint(&mut out, tag(PACKED_FIELD, WIRE_LEN));
    put_varint(&mut out, desc.len() as u64);
    out.extend_from_slice(&desc);
    if out.len() >= encoded.len() {
        return Ok(None);
    }
    // What a duplicate will do with the record: only a record that gives the reply back byte
    // for byte is kept (anything else, say past `PACKED_MAX_REPLY`, is recorded unpacked).
    let back = kvpb::Response::parse_from_bytes(&out)
        .ok()
        .and_then(|r| match Packed::of(&r) {
            Ok(Some(p)) => p.unpack(r.header.as_ref()).ok(),
            _ => None,
        });
    Ok(back.filter(|b| b == encoded).map(|_| out))
}

impl Packed {
    /// The runs of record `r` if it is packed: its [`PACKED_FIELD`] decoded and checked (one
    /// value, known format, templates with a header, no revision past `u64`, at most
    /// [`PACKED_MAX_REPLY`] unpacked); an error says what is wrong.
    fn of(r: &kvpb::Response) -> std::result::Result<Option<Packed>, String> {
        let Some(v) = r.get_unknown_fields().get(PACKED_FIELD) else {
            return Ok(None);
        };
        let [desc] = &v.length_delimited[..] else {
            return Err("packed field is not one length-delimited value".into());
        };
        if !(v.varint.is_empty() && v.fixed32.is_empty() && v.fixed64.is_empty()) {
            return Err("packed field is not one length-delimited value".into());
        }
        if !matches!(&r.result, Some(kvpb::Response_oneof_result::batch(b)) if b.results.is_empty())
        {
            return Err("a packed reply's result is not an empty batch".into());
        }
        let mut buf = &desc[..];
        let format = get_varint(&mut buf)?;
        if format != PACKED_RUNS {
            return Err(format!("unknown packed format {format}"));
        }
        let mut runs = Vec::new();
        while !buf.is_empty() {
            let n = get_varint(&mut buf)?;
            let step = get_varint(&mut buf)?;
            let len = get_varint(&mut buf)?;
            let Some(t) = usize::try_from(len).ok().and_then(|l| buf.get(..l)) else {
                return Err(format!("run template of {len} bytes past the end"));
            };
            buf = &buf[t.len()..];
            let template = kvpb::Response::parse_from_bytes(t).map_err(|e| e.to_string())?;
            let base = template.get_header().revision;
            if n == 0 || !template.has_header() {
                return Err("a run with no slot or a template without a header".into());
            }
            if step
                .checked_mul(n - 1)
                .and_then(|d| base.checked_add(d))
                .is_none()
            {
                return Err(format!(
                    "run of {n} revisions {step} apart from {base} overflows"
                ));
            }
            runs.push(Run { template, n, step });
        }
        let p = Packed(runs);
        match p.bound() {
            Some(b) if b <= PACKED_MAX_REPLY => Ok(Some(p)),
            _ => Err(format!("unpacks to more than {PACKED_MAX_REPLY} bytes")),
        }
    }

    /// Bounds the unpacked reply's length (over the slots: [`SLOT_GROWTH`] each over the
    /// template), `None` past `u64`.
    fn bound(&self) -> Option<u64> {
        self.0.iter().try_fold(64u64, |acc, r| {
            let slot = (r.template.compute_size() as u64).checked_add(SLOT_GROWTH)?;
            acc.checked_add(r.n.checked_mul(slot)?)
        })
    }

    /// The encoded batch reply: `header`, then the slots of every run, as protobuf writes
    /// them (fields in number order).
    fn unpack(&self, header: Option<&kvpb::ResponseHeader>) -> Result<Vec<u8>> {
        let corrupt = |why: String| KvError::Corrupt {
            what: "dedup reply",
            why,
        };
        let mut slots = Vec::new();
        for run in &self.0 {
            let mut slot = run.template.clone();
            let base = slot.get_header().revision;
            for k in 0..run.n {
                // Checked by `Packed::of`: no overflow.
                slot.mut_header().revision = run
                    .step
                    .checked_mul(k)
                    .and_then(|d| base.checked_add(d))
                    .ok_or_else(|| corrupt("revision overflow".into()))?;
                put_varint(&mut slots, tag(BATCH_RESULTS, WIRE_LEN));
                slot.write_length_delimited_to_vec(&mut slots)
                    .map_err(|e| corrupt(e.to_string()))?;
            }
        }
        let mut out = Vec::with_capacity(slots.len() + 32);
        if let Some(h) = header {
            put_varint(&mut out, tag(RESPONSE_HEADER, WIRE_LEN));
            h.write_length_delimited_to_vec(&mut out)
                .map_err(|e| corrupt(e.to_string()))?;
        }
        put_varint(&mut out, tag(RESPONSE_BATCH, WIRE_LEN));
        put_varint(&mut out, slots.len() as u64);
        out.extend_from_slice(&slots);
        Ok(out)
    }
}

impl DedupTable {
    /// Clients remembered.
    pub(crate) fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Bytes of replies remembered.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The verdict on `id` (no change to the table).
    pub(crate) fn check(&self, id: &ReqId, now_ms: u64) -> Verdict {
        match self.clients.get(&id.client) {
            Some(c) => match c.recent.get(&id.seq) {
                Some(r) => Verdict::Duplicate(r.clone()),
                None if id.seq <= c.floor => Verdict::Expired,
                None => Verdict::New,
            },
            None if id.attempt > 0 && now_ms < self.pressure_until_ms => Verdict::Expired,
            None => Verdict::New,
        }
    }

    /// Records the reply of the newly applied `id` at entry clock `now_ms`, then enforces the
    /// bounds (module doc).
    pub(crate) fn record(&mut self, id: &ReqId, now_ms: u64, reply: Bytes) {
        self.tick += 1;
        let tick = self.tick;
        let c = self.clients.entry(id.client).or_default();
        self.lru.remove(&(c.last_tick, id.client));
        c.last_tick = tick;
        c.last_ms = c.last_ms.max(now_ms);
        self.lru.insert((tick, id.client));
        let mut freed = 0u64;
        if id.first_incomplete > 1 {
            // Usually none or one reply goes per record: no new tree (`split_off`) for that.
            while let Some(e) = c.recent.first_entry() {
                if *e.key() >= id.first_incomplete {
                    break;
                }
                freed += e.remove().len() as u64;
            }
            c.floor = c.floor.max(id.first_incomplete - 1);
        }
        let added = reply.len() as u64;
        c.recent.insert(id.seq, reply);
        c.bytes = c.bytes + added - freed;
        while c.recent.len() > WINDOW || (c.bytes > CLIENT_MAX_BYTES && c.recent.len() > 1) {
            let Some((s, r)) = c.recent.pop_first() else {
                break;
            };
            c.bytes -= r.len() as u64;
            freed += r.len() as u64;
            c.floor = c.floor.max(s);
        }
        self.bytes = self.bytes + added - freed;
        self.evict(now_ms);
    }

    /// Drops expired clients, then least recently used ones past the caps.
    fn evict(&mut self, now_ms: u64) {
        while let Some(&(tick, client)) = self.lru.first() {
            // `lru` and `clients` name the same clients (record, evict and decode_image keep
            // them in step), so this always finds one.
            let Some(c) = self.clients.get(&client) else {
                break;
            };
            let idle = c.last_ms.saturating_add(EXPIRY_MS) <= now_ms;
            let pressure = self.clients.len() > MAX_CLIENTS || self.bytes > MAX_BYTES;
            if !idle && !pressure {
                break;
            }
            if self.lru.len() == 1 && !idle {
                // The client just recorded stays (its own bounds keep it under the caps).
                break;
            }
            if !idle {
                self.pressure_until_ms = self
                    .pressure_until_ms
                    .max(c.last_ms.saturating_add(EXPIRY_MS));
            }
            self.bytes -= c.bytes;
            self.clients.remove(&client);
            self.lru.remove(&(tick, client));
        }
    }

    fn encode_image(&self, e: &mut Enc) {
        e.u64(self.tick)
            .u64(self.pressure_until_ms)
            .u64(self.clients.len() as u64);
        for (id, c) in &self.clients {
            e.u64(*id)
                .u64(c.floor)
                .u64(c.last_ms)
                .u64(c.last_tick)
                .u64(c.recent.len() as u64);
            for (s, r) in &c.recent {
                e.u64(*s).bytes(r);
            }
        }
    }

    /// The whole table (snapshot images).
    pub(crate) fn image(&self) -> Vec<u8> {
        let mut e = Enc::default();
        self.encode_image(&mut e);
        e.0
    }

    /// Checks the table's tick against the applied index it was recovered at: every record
    /// takes the next tick and comes from an applied entry, which makes at most
    /// `KvStore::MAX_PACKED_PARTS` records (one per command of a packed entry), so the tick is
    /// at most that many times the applied index, and the next record (made by a later entry)
    /// cannot overflow it.
    pub(crate) fn check_tick(&self, what: &'static str, applied_index: u64) -> Result<()> {
        let most = applied_index.saturating_mul(crate::kv::KvStore::MAX_PACKED_PARTS as u64);
        if self.tick > most {
            return Err(KvError::field(
                what,
                "dedup.tick",
                format!(
                    "{} is above {most} (the applied index {applied_index} times the most \
                     records one entry makes)",
                    self.tick
                ),
            ));
        }
        Ok(())
    }

    /// Decodes [`DedupTable::image`], checking it is a table some sequence of records makes:
    /// client ids and seqs non-zero, replies above the floor and in order, unique ticks up to
    /// the table's tick, every reply a `kvpb.Response` (a duplicate answers it as is, or
    /// unpacked: a packed one must unpack within the bounds, [`Packed::of`]).
    pub(crate) fn from_image(buf: &[u8], what: &'static str) -> Result<DedupTable> {
        let mut d = Dec::new(buf, what);
        let t = Self::decode_image(&mut d, what)?;
        d.end()?;
        Ok(t)
    }

    fn decode_image(d: &mut Dec<'_>, what: &'static str) -> Result<DedupTable> {
        let bad = |field: &'static str, why: String| KvError::field(what, field, why);
        let mut t = DedupTable {
            tick: d.u64()?,
            pressure_until_ms: d.u64()?,
            ..DedupTable::default()
        };
        let n = d.u64()?;
        for _ in 0..n {
            let id = d.u64()?;
            if id == 0 || t.clients.last_key_value().is_some_and(|(k, _)| *k >= id) {
                return Err(bad("dedup.client", format!("{id} is 0 or out of order")));
            }
            let mut c = ClientEntry {
                floor: d.u64()?,
                last_ms: d.u64()?,
                last_tick: d.u64()?,
                ..ClientEntry::default()
            };
            if c.last_tick == 0 || c.last_tick > t.tick || !t.lru.insert((c.last_tick, id)) {
                return Err(bad(
                    "dedup.last_tick",
                    format!("{} is 0, above the table's tick or taken", c.last_tick),
                ));
            }
            let m = d.u64()?;
            for _ in 0..m {
                let s = d.u64()?;
                let r = Bytes::copy_from_slice(d.bytes()?);
                if let Err(e) = check_recorded(&r) {
                    return Err(bad("dedup.reply", format!("seq {s}: {e}")));
                }
                if s <= c.floor || c.recent.last_key_value().is_some_and(|(k, _)| *k >= s) {
                    return Err(bad(
                        "dedup.seq",
                        format!("{s} is at or below the floor or out of order"),
                    ));
                }
                c.bytes += r.len() as u64;
                c.recent.insert(s, r);
            }
            t.bytes += c.bytes;
            t.clients.insert(id, c);
        }
        Ok(t)
    }

    /// Persistent mode: replays a `COMMIT` record's payload ([`Journal::take_payload`];
    /// recovery).
    pub(crate) fn replay_payload(&mut self, payload: &[u8]) -> Result<()> {
        const WHAT: &str = "data-log dedup";
        if payload.is_empty() {
            return Ok(());
        }
        let mut d = Dec::new(payload, WHAT);
        match d.u8()? {
            PAYLOAD_DELTAS => {
                let n = d.u64()?;
                for _ in 0..n {
                    let client = d.u64()?;
                    let seq = d.u64()?;
                    let first_incomplete = d.u64()?;
                    let now_ms = d.u64()?;
                    let reply = Bytes::copy_from_slice(d.bytes()?);
                    if let Err(e) = check_recorded(&reply) {
                        return Err(KvError::field(
                            WHAT,
                            "dedup.reply",
                            format!("seq {seq}: {e}"),
                        ));
                    }
                    let mut pb = kvpb::RequestId::new();
                    (pb.client, pb.seq, pb.first_incomplete) = (client, seq, first_incomplete);
                    // Written by the apply path from a checked id: a bad one is corruption.
                    let id = ReqId::from_pb(&pb)
                        .map_err(|e| KvError::field(WHAT, "dedup.request_id", e.to_string()))?;
                    self.record(&id, now_ms, reply);
                }
            }
            PAYLOAD_IMAGE => *self = Self::decode_image(&mut d, WHAT)?,
            t => {
                return Err(KvError::Corrupt {
                    what: WHAT,
                    why: format!("unknown payload tag {t}"),
                })
            }
        }
        d.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: u64, seq: u64, fi: u64, attempt: u32) -> ReqId {
        ReqId {
            client,
            seq,
            first_incomplete: fi,
            attempt,
        }
    }

    /// A reply of fixed length (for n below 10^8).
    fn reply(n: u64) -> Bytes {
        let mut r = kvpb::Response::new();
        r.mut_error().why = format!("{n:08}");
        Bytes::from(r.write_to_bytes().unwrap())
    }

    #[test]
    fn duplicates_get_the_recorded_reply_and_old_seqs_expire() {
        let mut t = DedupTable::default();
        assert_eq!(t.check(&id(7, 1, 1, 0), 0), Verdict::New);
        t.record(&id(7, 1, 1, 0), 0, reply(1));
        assert_eq!(t.check(&id(7, 1, 1, 3), 0), Verdict::Duplicate(reply(1)));
        // Out of order within the window is fine.
        t.record(&id(7, 3, 1, 0), 0, reply(3));
        assert_eq!(t.check(&id(7, 2, 1, 0), 0), Verdict::New);
        // first_incomplete = 3: seqs 1 and 2 are finished and forgotten.
        t.record(&id(7, 4, 3, 0), 0, reply(4));
        assert_eq!(t.check(&id(7, 1, 1, 1), 0), Verdict::Expired);
        assert_eq!(t.check(&id(7, 2, 1, 0), 0), Verdict::Expired);
        assert_eq!(t.check(&id(7, 3, 3, 1), 0), Verdict::Duplicate(reply(3)));
        // The window: the oldest reply goes first.
        for s in 5..4 + WINDOW as u64 {
            t.record(&id(7, s, 3, 0), 0, reply(s));
        }
        assert_eq!(t.check(&id(7, 3, 3, 1), 0), Verdict::Expired);
        assert_eq!(t.check(&id(7, 4, 3, 1), 0), Verdict::Duplicate(reply(4)));
        assert_eq!(t.bytes(), reply(0).len() as u64 * WINDOW as u64);
    }

    #[test]
    fn idle_clients_expire_and_pressure_evictions_refuse_unknown_retries() {
        let mut t = DedupTable::default();
        t.record(&id(1, 1, 1, 0), 1_000, reply(1));
        t.record(&id(2, 1, 1, 0), 2_000, reply(1));
        // Client 1 idle for EXPIRY_MS: forgotten, and a retry from an unknown client is new.
        t.record(&id(3, 1, 1, 0), 1_000 + EXPIRY_MS, reply(1));
        assert_eq!(t.clients(), 2);
        assert_eq!(t.check(&id(1, 1, 1, 1), 1_000 + EXPIRY_MS), Verdict::New);
        // Past MAX_CLIENTS the least recently used goes, and unknown retries are refused for
        // EXPIRY_MS after its last use.
        let now = 3_000 + EXPIRY_MS;
        for c in 10..10 + MAX_CLIENTS as u64 {
            t.record(&id(c, 1, 1, 0), now, reply(c));
        }
        assert_eq!(t.clients(), MAX_CLIENTS);
        assert_eq!(t.check(&id(2, 1, 1, 1), now), Verdict::Expired);
        assert_eq!(t.check(&id(99_999, 5, 5, 1), now), Verdict::Expired);
        assert_eq!(t.check(&id(99_999, 5, 5, 0), now), Verdict::New);
        let later = 1_000 + 3 * EXPIRY_MS;
        assert_eq!(t.check(&id(99_999, 5, 5, 1), later), Verdict::New);
    }

    #[test]
    fn replies_are_bounded_in_bytes() {
        let mut t = DedupTable::default();
        let mut r = kvpb::Response::new();
        r.mut_error().why = "x".repeat((CLIENT_MAX_BYTES / 2) as usize);
        let big = Bytes::from(r.write_to_bytes().unwrap());
        t.record(&id(1, 1, 0, 0), 0, big.clone());
        t.record(&id(1, 2, 0, 0), 0, big.clone());
        assert_eq!(t.check(&id(1, 1, 0, 1), 0), Verdict::Expired);
        assert_eq!(t.bytes(), big.len() as u64);
        let mut c = 2;
        while t.bytes() <= MAX_BYTES - big.len() as u64 {
            t.record(&id(c, 1, 0, 0), 0, big.clone());
            c += 1;
        }
        t.record(&id(c, 1, 0, 0), 0, big.clone());
        assert!(t.bytes() <= MAX_BYTES, "{}", t.bytes());
        assert_eq!(t.check(&id(1, 2, 0, 1), 0), Verdict::Expired);
    }

    #[test]
    fn image_and_payloads_round_trip_and_bad_images_are_refused() {
        let mut t = DedupTable::default();
        let mut j = Journal::default();
        let rec = |t: &mut DedupTable, j: &mut Journal, i: ReqId, now_ms: u64, r: Bytes| {
            t.record(&i, now_ms, r.clone());
            j.push(&Recorded {
                id: i,
                now_ms,
                reply: r,
            });
        };
        assert!(j.take_payload(&t, false).is_empty());
        for (c, s) in [(5, 1), (9, 2), (5, 3), (9, 1)] {
            rec(&mut t, &mut j, id(c, s, 1, 0), 10, reply(s));
        }
        let img = t.image();
        assert_eq!(DedupTable::from_image(&img, "test").unwrap(), t);
        // Replaying deltas over the state of the previous payload gives the same table.
        let full = j.take_payload(&t, true);
        let mut r = DedupTable::default();
        r.replay_payload(&full).unwrap();
        assert_eq!(r, t);
        // The image took the journal.
        assert!(j.take_payload(&t, false).is_empty());
        rec(&mut t, &mut j, id(5, 4, 3, 0), 20, reply(4));
        rec(&mut t, &mut j, id(11, 1, 0, 0), 20, reply(4));
        r.replay_payload(&j.take_payload(&t, false)).unwrap();
        assert_eq!(r, t);
        assert!(j.take_payload(&t, false).is_empty());
        // Corrupt images: a seq at the floor, a tick above the table's, trailing bytes.
        let mut bad = DedupTable::default();
        bad.record(&id(5, 2, 2, 0), 0, reply(2));
        let mut img = bad.image();
        // The seq is the last u64 before the reply's length-prefixed bytes.
        let n = img.len();
        let seq_at = n - reply(2).len() - 4 - 8;
        img[seq_at..seq_at + 8].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(
            DedupTable::from_image(&img, "test"),
            Err(KvError::InvalidField { .. })
        ));
        let mut img = bad.image();
        img[..8].copy_from_slice(&0u64.to_le_bytes());
        assert!(DedupTable::from_image(&img, "test").is_err());
        let mut img = bad.image();
        img.push(0);
        assert!(DedupTable::from_image(&img, "test").is_err());
        // A reply that is not a `kvpb.Response` (here: a truncated field) is refused by name,
        // as is the same reply in a data-log delta.
        let mut garbage = DedupTable::default();
        let mut j = Journal::default();
        let r = Recorded {
            id: id(5, 2, 2, 0),
            now_ms: 0,
            reply: Bytes::from_static(&[0x12, 0x05, 0x01]),
        };
        garbage.record(&r.id, 0, r.reply.clone());
        j.push(&r);
        assert!(matches!(
            DedupTable::from_image(&garbage.image(), "test"),
            Err(KvError::InvalidField {
                field: "dedup.reply",
                ..
            })
        ));
        assert!(matches!(
            DedupTable::default().replay_payload(&j.take_payload(&garbage, false)),
            Err(KvError::InvalidField {
                field: "dedup.reply",
                ..
            })
        ));
        assert!(DedupTable::default().replay_payload(&[9]).is_err());
        // A bad request id in a data-log delta is data-log corruption (fatal), not a command
        // error.
        let mut j = Journal::default();
        j.push(&Recorded {
            id: id(0, 2, 2, 0),
            now_ms: 0,
            reply: reply(2),
        });
        let e = DedupTable::default()
            .replay_payload(&j.take_payload(&DedupTable::default(), false))
            .unwrap_err();
        assert!(e.is_fatal(), "{e:?}");
        assert!(
            matches!(
                e,
                KvError::InvalidField {
                    what: "data-log dedup",
                    field: "dedup.request_id",
                    ..
                }
            ),
            "{e:?}"
        );
        // The tick is at most MAX_PACKED_PARTS times the applied index (one record per
        // command, at most that many commands per applied entry).
        let per = crate::kv::KvStore::MAX_PACKED_PARTS as u64;
        assert!(t.tick > 0);
        assert!(t.check_tick("test", t.tick).is_ok());
        assert!(t.check_tick("test", t.tick.div_ceil(per)).is_ok());
        assert!(matches!(
            t.check_tick("test", (t.tick - 1) / per),
            Err(KvError::InvalidField {
                field: "dedup.tick",
                ..
            })
        ));
    }

    /// One slot shape of a generated batch reply, and how far it moves the revision.
    #[derive(Clone, Copy, Debug)]
    enum Slot {
        /// A put without `prev_kv`.
        Put,
        /// A put over an expired key (its delete takes a revision too).
        PutOverExpired,
        /// A put with `prev_kv` carrying a value of this length.
        PutPrev(usize),
        /// A delete that deleted `0` or `1` keys.
        Delete(u64),
        /// A failed cas with no current value.
        CasFailed,
        /// A slot error.
        Error,
    }

    fn slot_strategy() -> impl proptest::strategy::Strategy<Value = Slot> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(Slot::Put),
            1 => Just(Slot::PutOverExpired),
            1 => prop_oneof![Just(3usize), Just(REPLY_FULL_MAX + 1)].prop_map(Slot::PutPrev),
            2 => (0u64..2).prop_map(Slot::Delete),
            1 => Just(Slot::CasFailed),
            1 => Just(Slot::Error),
        ]
    }

    /// Values by `(key, mod_revision)`: the history of a generated batch.
    type Values = std::collections::HashMap<(Bytes, u64), Bytes>;

    /// A batch reply of `runs` (each shape repeated) at revisions from `rev` on, with the
    /// values its `prev_kv`s carry; and its encoding.
    fn batch_reply(
        runs: &[(Slot, usize)],
        mut rev: u64,
        index: u64,
    ) -> (kvpb::Response, Bytes, Values) {
        use kvpb::Response_oneof_result as Res;
        let header = |rev: u64| {
            let mut h = kvpb::ResponseHeader::new();
            (h.revision, h.applied_index, h.compact_revision) = (rev, index, 7);
            h
        };
        let mut values = Values::new();
        let mut b = kvpb::BatchResult::new();
        for (i, &(shape, n)) in runs.iter().enumerate() {
            for j in 0..n {
                let res = match shape {
                    Slot::Put => {
                        rev += 1;
                        Res::put(kvpb::PutResult::new())
                    }
                    Slot::PutOverExpired => {
                        rev += 2;
                        Res::put(kvpb::PutResult::new())
                    }
                    Slot::PutPrev(len) => {
                        let mut kv = kvpb::KeyValue::new();
                        kv.key = Bytes::from(format!("k{i}-{j}"));
                        kv.value = Bytes::from(vec![j as u8; len]);
                        (kv.mod_revision, kv.create_revision, kv.version) = (rev, 1, 2);
                        values.insert((kv.key.clone(), rev), kv.value.clone());
                        rev += 1;
                        let mut p = kvpb::PutResult::new();
                        p.prev_kv = protobuf::SingularPtrField::some(kv);
                        Res::put(p)
                    }
                    Slot::Delete(d) => {
                        rev += d;
                        let mut x = kvpb::DeleteResult::new();
                        x.deleted = d;
                        Res::delete(x)
                    }
                    Slot::CasFailed => Res::cas(kvpb::CasResult::new()),
                    Slot::Error => {
                        Res::error(KvError::invalid("batch.ops", "no operation set").to_pb())
                    }
                };
                let mut x = kvpb::Response::new();
                x.header = protobuf::SingularPtrField::some(header(rev));
                x.result = Some(res);
                b.results.push(x);
            }
        }
        let mut resp = kvpb::Response::new();
        resp.header = protobuf::SingularPtrField::some(header(rev));
        resp.set_batch(b);
        let encoded = Bytes::from(resp.write_to_bytes().unwrap());
        (resp, encoded, values)
    }

    /// What a duplicate gets for `recorded`.
    fn duplicate_reply(recorded: &Bytes, values: &Values) -> Option<Bytes> {
        let value_at = |k: &Bytes, rev: u64| Ok(values.get(&(k.clone(), rev)).cloned());
        restore_values(recorded.clone(), &value_at).unwrap()
    }

    fn is_packed(recorded: &Bytes) -> bool {
        let r = kvpb::Response::parse_from_carllerche_bytes(recorded).unwrap();
        r.get_unknown_fields().get(PACKED_FIELD).is_some()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Random batch replies (runs of each shape, values below and above `REPLY_FULL_MAX`,
        /// revisions from 1 or in the billions): the table's form of each gives the duplicate
        /// the encoded reply byte for byte (values from the history when stripped), also
        /// through an image and a data-log delta; it is never longer than the reply (but for
        /// the stripped marker); replies of long runs are packed.
        #[test]
        fn recorded_batch_replies_give_duplicates_the_very_bytes(
            runs in proptest::collection::vec((slot_strategy(), 1usize..40), 1..8),
            rev in proptest::prop_oneof![proptest::strategy::Just(0u64), 1u64 << 31..1u64 << 40],
            index in 1u64..1 << 40,
        ) {
            let (resp, encoded, values) = batch_reply(&runs, rev, index);
            let kept = for_table(&resp, encoded.clone()).unwrap();
            proptest::prop_assert!(kept.len() <= encoded.len() + 6, "{} > {}", kept.len(), encoded.len());
            let slots: usize = runs.iter().map(|r| r.1).sum();
            if runs.len() == 1 && runs[0].1 > 2 && !matches!(runs[0].0, Slot::PutPrev(_)) {
                proptest::prop_assert!(is_packed(&kept) && kept.len() < 128, "{}", kept.len());
            }
            if slots > 1 && runs.iter().all(|r| r.1 >= 3) && !runs.iter().any(|r| matches!(r.0, Slot::PutPrev(_))) {
                proptest::prop_assert!(is_packed(&kept));
            }
            proptest::prop_assert_eq!(duplicate_reply(&kept, &values), Some(encoded.clone()));
            // Through an image and a data-log delta.
            let mut t = DedupTable::default();
            let i = id(3, 1, 1, 0);
            t.record(&i, 0, kept.clone());
            let mut j = Journal::default();
            j.push(&Recorded { id: i, now_ms: 0, reply: kept.clone() });
            let mut from_log = DedupTable::default();
            from_log.replay_payload(&j.take_payload(&t, false)).unwrap();
            for t in [DedupTable::from_image(&t.image(), "test").unwrap(), from_log] {
                let Verdict::Duplicate(r) = t.check(&id(3, 1, 1, 1), 0) else {
                    return Err(proptest::test_runner::TestCaseError::fail("not remembered"));
                };
                proptest::prop_assert_eq!(duplicate_reply(&r, &values), Some(encoded.clone()));
            }
        }
    }

    #[test]
    fn a_maximal_put_batch_packs_small_and_a_stripped_one_needs_its_values() {
        // 10,000 puts at revisions in the billions: one run.
        let (resp, encoded, values) = batch_reply(&[(Slot::Put, 10_000)], 1 << 33, 1 << 35);
        assert!(encoded.len() > 150_000, "{}", encoded.len());
        let kept = for_table(&resp, encoded.clone()).unwrap();
        assert!(is_packed(&kept) && kept.len() < 64, "{}", kept.len());
        assert_eq!(duplicate_reply(&kept, &values), Some(encoded));
        // Slots that differ (each its own run) are recorded as they are.
        let (resp, encoded, _) = batch_reply(&[(Slot::PutPrev(3), 50)], 1, 2);
        assert_eq!(for_table(&resp, encoded.clone()).unwrap(), encoded);
        // 1,000 puts whose prev_kv carry values, between 2 runs of plain puts: their slots
        // stay as they are (but stripped), the runs around them are packed.
        let runs = [
            (Slot::Put, 3000),
            (Slot::PutPrev(40), 1000),
            (Slot::Put, 3000),
        ];
        let (resp, encoded, mut values) = batch_reply(&runs, 1, 2);
        let kept = for_table(&resp, encoded.clone()).unwrap();
        let r = kvpb::Response::parse_from_carllerche_bytes(&kept).unwrap();
        assert!(r.get_unknown_fields().get(STRIPPED_FIELD).is_some());
        assert!(
            is_packed(&kept) && kept.len() < encoded.len() / 2,
            "{}",
            kept.len()
        );
        assert_eq!(duplicate_reply(&kept, &values), Some(encoded));
        // One long value among long runs: packed and stripped; without the value in the
        // history, the duplicate is expired (`None`).
        let runs = [
            (Slot::Put, 3000),
            (Slot::PutPrev(REPLY_FULL_MAX), 1),
            (Slot::Put, 3000),
        ];
        let (resp, encoded, _) = batch_reply(&runs, 1, 2);
        let kept = for_table(&resp, encoded.clone()).unwrap();
        let r = kvpb::Response::parse_from_carllerche_bytes(&kept).unwrap();
        assert!(r.get_unknown_fields().get(STRIPPED_FIELD).is_some() && is_packed(&kept));
        assert!(kept.len() < 200, "{}", kept.len());
        values = Values::new();
        assert_eq!(duplicate_reply(&kept, &values), None);
    }

    /// Records of the formats before packing (a batch reply in full, one stripped of its
    /// values with the marker protobuf wrote) load from an image and a data-log delta and
    /// answer duplicates as before.
    #[test]
    fn records_of_older_formats_still_load_and_answer() {
        let runs = [(Slot::Put, 500), (Slot::PutPrev(REPLY_FULL_MAX + 1), 2)];
        let (resp, encoded, values) = batch_reply(&runs, 1, 2);
        let mut stripped = resp.clone();
        each_kv(&mut stripped, &mut |kv| {
            kv.value = Bytes::new();
            Ok(true)
        })
        .unwrap();
        stripped.mut_unknown_fields().add_varint(STRIPPED_FIELD, 1);
        let stripped = Bytes::from(stripped.write_to_bytes().unwrap());
        let (small, small_encoded, _) = batch_reply(&[(Slot::Put, 100)], 1, 2);
        let mut t = DedupTable::default();
        let mut j = Journal::default();
        for (seq, r) in [(1, &stripped), (2, &small_encoded)] {
            t.record(&id(4, seq, 1, 0), 0, r.clone());
            j.push(&Recorded {
                id: id(4, seq, 1, 0),
                now_ms: 0,
                reply: r.clone(),
            });
        }
        let mut from_log = DedupTable::default();
        from_log.replay_payload(&j.take_payload(&t, false)).unwrap();
        for t in [
            DedupTable::from_image(&t.image(), "test").unwrap(),
            from_log,
        ] {
            let dup = |seq| match t.check(&id(4, seq, 1, 1), 0) {
                Verdict::Duplicate(r) => duplicate_reply(&r, &values),
                v => panic!("{v:?}"),
            };
            assert_eq!(dup(1), Some(encoded.clone()));
            assert_eq!(dup(2), Some(small_encoded.clone()));
        }
        // The same replies recorded now: packed (the small one) and packed-stripped.
        assert!(for_table(&small, small_encoded.clone()).unwrap().len() < 64);
        assert!(for_table(&resp, encoded).unwrap().len() < stripped.len());
    }

    /// A packed record that is not what `pack` makes is refused by name when a table loads
    /// (image or data-log delta), never unpacked.
    #[test]
    fn malformed_packed_records_are_refused() {
        let record = |desc: &[u8], result_slots: usize| {
            let mut r = kvpb::Response::new();
            let mut b = kvpb::BatchResult::new();
            for _ in 0..result_slots {
                b.results.push(kvpb::Response::new());
            }
            r.set_batch(b);
            r.mut_unknown_fields()
                .add_length_delimited(PACKED_FIELD, desc.to_vec());
            Bytes::from(r.write_to_bytes().unwrap())
        };
        let mut slot = kvpb::Response::new();
        slot.mut_header().revision = u64::MAX - 1;
        slot.set_put(kvpb::PutResult::new());
        let t = slot.write_to_bytes().unwrap();
        let run = |n: u64, step: u64, t: &[u8]| {
            let mut d = Vec::new();
            put_varint(&mut d, PACKED_RUNS);
            put_varint(&mut d, n);
            put_varint(&mut d, step);
            put_varint(&mut d, t.len() as u64);
            d.extend_from_slice(t);
            d
        };
        let good = run(2, 0, &t);
        let mut no_header = Vec::new();
        put_varint(&mut no_header, PACKED_RUNS);
        no_header.extend_from_slice(&[1, 0, 2, 0x12, 0]);
        let mut as_varint = kvpb::Response::new();
        as_varint.set_batch(kvpb::BatchResult::new());
        as_varint.mut_unknown_fields().add_varint(PACKED_FIELD, 1);
        let mut twice = kvpb::Response::new();
        twice.set_batch(kvpb::BatchResult::new());
        twice
            .mut_unknown_fields()
            .add_length_delimited(PACKED_FIELD, good.clone());
        twice
            .mut_unknown_fields()
            .add_length_delimited(PACKED_FIELD, good.clone());
        let bad = [
            ("format", record(&[2], 0)),
            ("empty", record(&[], 0)),
            ("no slots", record(&run(0, 1, &t), 0)),
            ("overflow", record(&run(3, 1, &t), 0)),
            ("too long", record(&run(1 << 40, 0, &t), 0)),
            ("past the end", record(&run(2, 0, &t)[..t.len()], 0)),
            ("garbage template", record(&run(2, 0, &[0x12, 9]), 0)),
            ("template without header", record(&no_header, 0)),
            ("slots beside", record(&good, 1)),
            ("varint", Bytes::from(as_varint.write_to_bytes().unwrap())),
            ("twice", Bytes::from(twice.write_to_bytes().unwrap())),
        ];
        // The well-formed one loads.
        let mut ok = DedupTable::default();
        ok.record(&id(1, 1, 1, 0), 0, record(&good, 0));
        assert!(DedupTable::from_image(&ok.image(), "test").is_ok());
        for (what, r) in bad {
            let mut t = DedupTable::default();
            t.record(&id(1, 1, 1, 0), 0, r.clone());
            assert!(
                matches!(
                    DedupTable::from_image(&t.image(), "test"),
                    Err(KvError::InvalidField {
                        field: "dedup.reply",
                        ..
                    })
                ),
                "{what}"
            );
            let mut j = Journal::default();
            j.push(&Recorded {
                id: id(1, 1, 1, 0),
                now_ms: 0,
                reply: r,
            });
            assert!(
                DedupTable::default()
                    .replay_payload(&j.take_payload(&t, false))
                    .is_err(),
                "{what}"
            );
        }
    }
}
