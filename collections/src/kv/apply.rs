//! Command semantics: decode a `kvpb::Command`, validate it, run it against the [`State`].
//!
//! The apply path of one raft entry (the store wraps it, see `store.rs`):
//!
//! 1. advance the applied index/term and the entry clock (`clock = max(clock, now_ms)`: TTL is
//!    judged by the leader's timestamp carried in the entry, never the local clock);
//! 2. decode and validate the command (limits, bounds); a bad command gets an error reply and
//!    changes nothing but the applied index; a write carrying a request id the range applied
//!    before gets that reply again, one too old to tell gets `REQUEST_EXPIRED`, and neither
//!    changes anything else (`dedup.rs`);
//! 3. run it: each write command that changes something takes the next revision; a key whose
//!    TTL passed is first removed (its delete event takes its own revision) when a put, cas or
//!    delete touches it;
//! 4. trim the watch history to the configured caps (events and bytes; whole revisions,
//!    oldest first);
//! 5. record the reply of a write with a new request id; return the reply and the list of
//!    changes (for the data log and the subscribers).
//!
//! A packed entry (several commands proposed as one raft entry, `KvStore::apply_packed`)
//! takes step 1's index once ([`begin_entry`]), then runs steps 1 (the clock) to 5 for each
//! of its commands in order ([`apply_command`]), exactly as for consecutive entries.

use bytes::Bytes;
use proto::kvpb::{self, Command_oneof_op as Op, Response_oneof_result as Res};
use protobuf::Message;

use crate::error::{KvError, Result};
use crate::kv::dedup::{for_table, restore_values, Recorded, ReqId, Verdict};
use crate::kv::state::{kv_of, Change, Entry, KeyRange, Loader, State};
use crate::kv::types::{EventKind, KeyValue, KvConfig, Limits};

/// Everything one command needs.
pub(crate) struct Ctx<'a> {
    pub(crate) st: &'a mut State,
    pub(crate) limits: &'a Limits,
    pub(crate) load: Loader<'a>,
    pub(crate) changes: Vec<Change>,
    /// The request-id table record the command made, if any (for the data log's journal).
    pub(crate) recorded: Option<Recorded>,
}

/// The reply of one entry, in the form the apply path already has it (each form is encoded or
/// parsed at most once).
#[derive(Debug)]
pub(crate) enum Reply {
    /// A reply made now, with its encoding if the request-id table recorded it.
    Pb(kvpb::Response, Option<Bytes>),
    /// The encoded reply the request-id table recorded for a duplicate.
    Recorded(Bytes),
}

/// Applies one entry. `Err` only for fatal errors (a value could not be loaded from disk).
pub(crate) fn apply_entry(
    ctx: &mut Ctx<'_>,
    cfg: &KvConfig,
    index: u64,
    term: u64,
    now_ms: u64,
    cmd: &[u8],
) -> Result<Reply> {
    if let Some(stale) = begin_entry(ctx.st, index, term) {
        return Ok(Reply::Pb(stale, None));
    }
    apply_command(ctx, cfg, now_ms, cmd)
}

/// Step 1's index: moves the applied index and term to the entry's, or returns the error
/// reply every command of an entry gets when its index is not after the applied index (and
/// changes nothing).
pub(crate) fn begin_entry(st: &mut State, index: u64, term: u64) -> Option<kvpb::Response> {
    if index <= st.apply.applied_index {
        return Some(error_response(
            st,
            &KvError::invalid(
                "index",
                format!(
                    "entry {index} is not after the applied index {}",
                    st.apply.applied_index
                ),
            ),
        ));
    }
    st.apply.applied_index = index;
    st.apply.applied_term = term;
    None
}

/// Steps 1 (the entry clock) to 5 for one command of the entry [`begin_entry`] began. `Err`
/// only for fatal errors.
pub(crate) fn apply_command(
    ctx: &mut Ctx<'_>,
    cfg: &KvConfig,
    now_ms: u64,
    cmd: &[u8],
) -> Result<Reply> {
    ctx.st.clock_ms = ctx.st.clock_ms.max(now_ms);
    let mut new_id = None;
    let result = if cmd.is_empty() {
        Ok(None)
    } else if cmd.len() > ctx.limits.max_command_bytes {
        Err(KvError::BatchTooLarge {
            size: cmd.len(),
            limit: ctx.limits.max_command_bytes,
            what: "bytes",
        })
    } else {
        match decode_command(cmd) {
            Err(e) => Err(e),
            Ok((op, None)) => exec(ctx, op, true).map(Some),
            Ok((op, Some(id))) => match ctx.st.dedup.check(&id, ctx.st.clock_ms) {
                Verdict::Duplicate(reply) => {
                    let st = &*ctx.st;
                    let load = ctx.load;
                    // A reply recorded without its values gets them from the history.
                    let value_at = |key: &Bytes, rev: u64| -> Result<Option<Bytes>> {
                        match st.history.get(&(rev, key.clone())) {
                            Some(h) if h.kind == EventKind::Put => load(&h.value).map(Some),
                            _ => Ok(None),
                        }
                    };
                    match restore_values(reply, &value_at)? {
                        Some(r) => return Ok(Reply::Recorded(r)),
                        None => Err(KvError::RequestExpired {
                            client: id.client,
                            seq: id.seq,
                        }),
                    }
                }
                Verdict::Expired => Err(KvError::RequestExpired {
                    client: id.client,
                    seq: id.seq,
                }),
                Verdict::New => {
                    new_id = Some(id);
                    exec(ctx, op, true).map(Some)
                }
            },
        }
    };
    ctx.st
        .trim_history(cfg.history_max_events, cfg.history_max_bytes);
    let resp = finish(ctx.st, result)?;
    let Some(id) = new_id else {
        return Ok(Reply::Pb(resp, None));
    };
    let reply = Bytes::from(encode_reply(&resp)?);
    let now_ms = ctx.st.clock_ms;
    let kept = for_table(&resp, reply.clone())?;
    ctx.st.dedup.record(&id, now_ms, kept.clone());
    ctx.recorded = Some(Recorded {
        id,
        now_ms,
        reply: kept,
    });
    Ok(Reply::Pb(resp, Some(reply)))
}

/// Decodes a command: its operation, and its request id if it is a write carrying one.
fn decode_command(cmd: &[u8]) -> Result<(Op, Option<ReqId>)> {
    // Parsing from a slice gives every `bytes` field its own allocation (a copy), so a stored
    // value never pins the whole command buffer.
    let mut c = kvpb::Command::parse_from_bytes(cmd)
        .map_err(|e| KvError::invalid("command", e.to_string()))?;
    let id = c.request_id.take().filter(|_| is_write(&c.op));
    let op =
        c.op.ok_or_else(|| KvError::invalid("command", "no operation set"))?;
    Ok((op, id.as_ref().map(ReqId::from_pb).transpose()?))
}

/// Encodes a reply (fails only on a message protobuf cannot size: fatal).
pub(crate) fn encode_reply(resp: &kvpb::Response) -> Result<Vec<u8>> {
    resp.write_to_bytes().map_err(|e| KvError::Corrupt {
        what: "reply",
        why: e.to_string(),
    })
}

/// Whether `op` is a write a request id applies to.
fn is_write(op: &Option<Op>) -> bool {
    matches!(
        op,
        Some(Op::put(_) | Op::delete(_) | Op::cas(_) | Op::batch(_))
    )
}

fn finish(st: &State, result: Result<Option<Res>>) -> Result<kvpb::Response> {
    match result {
        Ok(r) => {
            let mut resp = kvpb::Response::new();
            resp.header = protobuf::SingularPtrField::some(header(st));
            resp.result = r;
            Ok(resp)
        }
        Err(e) if e.is_fatal() => Err(e),
        Err(e) => Ok(error_response(st, &e)),
    }
}

pub(crate) fn header(st: &State) -> kvpb::ResponseHeader {
    let mut h = kvpb::ResponseHeader::new();
    h.revision = st.revision;
    h.applied_index = st.apply.applied_index;
    h.compact_revision = st.compact_revision;
    h
}

pub(crate) fn error_response(st: &State, e: &KvError) -> kvpb::Response {
    let mut resp = kvpb::Response::new();
    resp.header = protobuf::SingularPtrField::some(header(st));
    resp.result = Some(Res::error(e.to_pb()));
    resp
}

fn check_key(ctx: &Ctx<'_>, key: &[u8]) -> Result<()> {
    if key.is_empty() || key.len() > ctx.limits.max_key_bytes {
        return Err(KvError::KeyTooLarge {
            size: key.len(),
            limit: ctx.limits.max_key_bytes,
        });
    }
    if !ctx.st.bounds.contains(key) {
        return Err(KvError::KeyOutOfRange);
    }
    Ok(())
}

fn check_value(ctx: &Ctx<'_>, value: &[u8]) -> Result<()> {
    if value.len() > ctx.limits.max_value_bytes {
        return Err(KvError::ValueTooLarge {
            size: value.len(),
            limit: ctx.limits.max_value_bytes,
        });
    }
    Ok(())
}

fn deadline(now: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now.saturating_add(ttl_ms)
    }
}

/// Removes `key` if its TTL passed (step 3 of the module doc): its own revision and event.
fn expire_if_due(ctx: &mut Ctx<'_>, key: &Bytes) -> Result<()> {
    let now = ctx.st.clock_ms;
    if ctx
        .st
        .index
        .get(&key[..])
        .is_some_and(|e| e.meta.expired(now))
    {
        let rev = ctx.st.next_revision()?;
        ctx.st.remove(key, rev, &mut ctx.changes);
    }
    Ok(())
}

fn load_kv(ctx: &Ctx<'_>, key: &Bytes, e: &Entry) -> Result<KeyValue> {
    Ok(kv_of(key, &e.meta, (ctx.load)(&e.value)?))
}

fn exec(ctx: &mut Ctx<'_>, op: Op, top: bool) -> Result<Res> {
    match op {
        Op::put(p) => {
            check_key(ctx, &p.key)?;
            check_value(ctx, &p.value)?;
            let key = p.key.clone();
            expire_if_due(ctx, &key)?;
            let exp = deadline(ctx.st.clock_ms, p.ttl_ms);
            let prev = ctx
                .st
                .put(key.clone(), p.value.clone(), exp, &mut ctx.changes)?;
            let mut r = kvpb::PutResult::new();
            if let (true, Some(prev)) = (p.prev_kv, prev) {
                r.prev_kv = protobuf::SingularPtrField::some(load_kv(ctx, &key, &prev)?.to_pb());
            }
            Ok(Res::put(r))
        }
        Op::delete(d) => {
            let mut r = kvpb::DeleteResult::new();
            if d.range_end.is_empty() {
                check_key(ctx, &d.key)?;
                let key = d.key.clone();
                expire_if_due(ctx, &key)?;
                if ctx.st.index.contains_key(&key[..]) {
                    let rev = ctx.st.next_revision()?;
                    if let Some(prev) = ctx.st.remove(&key, rev, &mut ctx.changes) {
                        r.deleted = 1;
                        if d.prev_kv {
                            r.prev_kvs.push(load_kv(ctx, &key, &prev)?.to_pb());
                        }
                    }
                }
            } else {
                if d.key.len() > ctx.limits.max_key_bytes
                    || d.range_end.len() > ctx.limits.max_key_bytes
                {
                    return Err(KvError::KeyTooLarge {
                        size: d.key.len().max(d.range_end.len()),
                        limit: ctx.limits.max_key_bytes,
                    });
                }
                let range = KeyRange::etcd(d.key.clone(), d.range_end.clone());
                // Routing checked the span against the range; a split applied since may have
                // moved part of it away. Deleting only the part still here and answering
                // success would leave the moved keys behind: refused, nothing deleted, the
                // client routes the delete again.
                if !ctx.st.bounds.covers(&range) {
                    return Err(KvError::KeyOutOfRange);
                }
                let keys: Vec<Bytes> = if range.is_empty() {
                    Vec::new()
                } else {
                    ctx.st
                        .index
                        .range::<[u8], _>(range.bounds())
                        .map(|(k, _)| k.to_bytes())
                        .collect()
                };
                if !keys.is_empty() {
                    let rev = ctx.st.next_revision()?;
                    let now = ctx.st.clock_ms;
                    for k in keys {
                        if let Some(prev) = ctx.st.remove(&k, rev, &mut ctx.changes) {
                            if prev.meta.expired(now) {
                                continue;
                            }
                            r.deleted += 1;
                            if d.prev_kv {
                                r.prev_kvs.push(load_kv(ctx, &k, &prev)?.to_pb());
                            }
                        }
                    }
                }
            }
            Ok(Res::delete(r))
        }
        Op::cas(c) => {
            check_key(ctx, &c.key)?;
            check_value(ctx, &c.new_value)?;
            let key = c.key.clone();
            expire_if_due(ctx, &key)?;
            let cur = ctx.st.index.get(&key[..]).cloned();
            let cur_kv = match &cur {
                Some(e) => Some(load_kv(ctx, &key, e)?),
                None => None,
            };
            let ok = match c.target {
                kvpb::CompareTarget::VALUE => cur_kv.as_ref().is_some_and(|kv| kv.value == c.value),
                kvpb::CompareTarget::VERSION => {
                    cur_kv.as_ref().map_or(0, |kv| kv.version) == c.number
                }
                kvpb::CompareTarget::MOD_REVISION => {
                    cur_kv.as_ref().map_or(0, |kv| kv.mod_revision) == c.number
                }
                kvpb::CompareTarget::ABSENT => cur_kv.is_none(),
            };
            if ok {
                if c.delete {
                    if cur.is_some() {
                        let rev = ctx.st.next_revision()?;
                        ctx.st.remove(&key, rev, &mut ctx.changes);
                    }
                } else {
                    let exp = deadline(ctx.st.clock_ms, c.ttl_ms);
                    ctx.st
                        .put(key, c.new_value.clone(), exp, &mut ctx.changes)?;
                }
            }
            let mut r = kvpb::CasResult::new();
            r.succeeded = ok;
            if let Some(kv) = cur_kv {
                r.current = protobuf::SingularPtrField::some(kv.to_pb());
            }
            Ok(Res::cas(r))
        }
        Op::batch(b) => {
            if !top {
                return Err(KvError::invalid("batch", "nested batches are not allowed"));
            }
            if b.ops.len() > ctx.limits.max_batch_ops {
                return Err(KvError::BatchTooLarge {
                    size: b.ops.len(),
                    limit: ctx.limits.max_batch_ops,
                    what: "ops",
                });
            }
            let mut r = kvpb::BatchResult::new();
            for c in b.ops.into_iter() {
                let res = match c.op {
                    Some(op) => exec(ctx, op, false).map(Some),
                    None => Err(KvError::invalid("batch.ops", "no operation set")),
                };
                r.results.push(finish(ctx.st, res)?);
            }
            Ok(Res::batch(r))
        }
        Op::expire(e) => {
            let now = if e.now_ms == 0 {
                ctx.st.clock_ms
            } else {
                e.now_ms.min(ctx.st.clock_ms)
            };
            let mut due = ctx.st.due(now);
            // Key order, like every multi-key revision (history and broadcast order).
            due.sort();
            let mut r = kvpb::ExpireResult::new();
            if !due.is_empty() {
                let rev = ctx.st.next_revision()?;
                for k in due {
                    if ctx.st.remove(&k, rev, &mut ctx.changes).is_some() {
                        r.expired += 1;
                    }
                }
            }
            Ok(Res::expire(r))
        }
        Op::compact(c) => {
            if c.revision > ctx.st.revision {
                return Err(KvError::FutureRevision {
                    requested: c.revision,
                    current: ctx.st.revision,
                });
            }
            ctx.st.compact(c.revision);
            Ok(Res::compact(kvpb::CompactResult::new()))
        }
        Op::get(g) => {
            if g.key.is_empty() || g.key.len() > ctx.limits.max_key_bytes {
                return Err(KvError::KeyTooLarge {
                    size: g.key.len(),
                    limit: ctx.limits.max_key_bytes,
                });
            }
            let mut r = kvpb::GetResult::new();
            if let Some(e) = ctx.st.visible(&g.key, ctx.st.clock_ms).cloned() {
                r.kv = protobuf::SingularPtrField::some(load_kv(ctx, &g.key, &e)?.to_pb());
            }
            Ok(Res::get(r))
        }
        Op::scan(s) => {
            check_scan_revision(ctx.st, s.revision)?;
            let range = KeyRange {
                start: s.start.clone(),
                end: (!s.end.is_empty()).then(|| s.end.clone()),
            };
            let limit = usize::try_from(s.limit).unwrap_or(usize::MAX);
            let max_bytes = usize::try_from(s.max_bytes).unwrap_or(usize::MAX);
            let (page, next) =
                ctx.st
                    .collect_scan(&range, limit, max_bytes, s.keys_only, ctx.st.clock_ms);
            let kvs = crate::kv::state::load_all(page, ctx.load)?;
            Ok(Res::scan(scan_result(kvs, next)))
        }
    }
}

pub(crate) fn check_scan_revision(st: &State, revision: u64) -> Result<()> {
    if revision == 0 || revision == st.revision {
        return Ok(());
    }
    if revision > st.revision {
        return Err(KvError::FutureRevision {
            requested: revision,
            current: st.revision,
        });
    }
    if revision <= st.compact_revision {
        return Err(KvError::Compacted {
            requested: revision,
            compact_revision: st.compact_revision,
        });
    }
    Err(KvError::invalid(
        "revision",
        "scans at a past revision are not served yet (use 0 for the current state)",
    ))
}

pub(crate) fn scan_result(kvs: Vec<KeyValue>, next: Option<Bytes>) -> kvpb::ScanResult {
    let mut r = kvpb::ScanResult::new();
    for kv in kvs {
        r.kvs.push(kv.to_pb());
    }
    if let Some(n) = next {
        r.more = true;
        r.next_key = n;
    }
    r
}
