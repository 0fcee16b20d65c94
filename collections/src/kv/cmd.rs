//! Builders for `kvpb::Command`s (clients, the node's leader tasks, tests).

use bytes::Bytes;
use proto::kvpb::{self, Command_oneof_op as Op};
use protobuf::Message;

fn b(v: &[u8]) -> Bytes {
    Bytes::copy_from_slice(v)
}

fn cmd(op: Op) -> kvpb::Command {
    let mut c = kvpb::Command::new();
    c.op = Some(op);
    c
}

/// `Put` with a TTL (0 = none), asking for the previous value.
pub fn put(key: &[u8], value: &[u8], ttl_ms: u64) -> kvpb::Command {
    let mut p = kvpb::Put::new();
    p.key = b(key);
    p.value = b(value);
    p.ttl_ms = ttl_ms;
    p.prev_kv = true;
    cmd(Op::put(p))
}

/// `Delete` of one key (`range_end` empty) or of `[key, range_end)`.
pub fn delete(key: &[u8], range_end: &[u8]) -> kvpb::Command {
    let mut d = kvpb::Delete::new();
    d.key = b(key);
    d.range_end = b(range_end);
    d.prev_kv = true;
    cmd(Op::delete(d))
}

/// `Cas`: if `target` compares equal (`value` or `number`), write `new_value` (or delete).
pub fn cas(
    key: &[u8],
    target: kvpb::CompareTarget,
    value: &[u8],
    number: u64,
    new_value: Option<&[u8]>,
) -> kvpb::Command {
    let mut c = kvpb::Cas::new();
    c.key = b(key);
    c.target = target;
    c.value = b(value);
    c.number = number;
    match new_value {
        Some(v) => c.new_value = b(v),
        None => c.delete = true,
    }
    cmd(Op::cas(c))
}

/// `Batch` of several commands.
pub fn batch(ops: Vec<kvpb::Command>) -> kvpb::Command {
    let mut bt = kvpb::Batch::new();
    bt.ops = ops.into();
    cmd(Op::batch(bt))
}

/// `Expire` at `now_ms` (0 = the entry's timestamp).
pub fn expire(now_ms: u64) -> kvpb::Command {
    let mut e = kvpb::Expire::new();
    e.now_ms = now_ms;
    cmd(Op::expire(e))
}

/// `Compact` the history up to `revision`.
pub fn compact(revision: u64) -> kvpb::Command {
    let mut c = kvpb::Compact::new();
    c.revision = revision;
    cmd(Op::compact(c))
}

/// `Get` through the log.
pub fn get(key: &[u8]) -> kvpb::Command {
    let mut g = kvpb::Get::new();
    g.key = b(key);
    cmd(Op::get(g))
}

/// Encodes a command.
pub fn encode(c: &kvpb::Command) -> Vec<u8> {
    c.write_to_bytes().unwrap_or_default()
}
