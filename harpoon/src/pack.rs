//! Packed entries: the proposals of several callers carried by ONE raft entry
//! ([`crate::Node::propose_packable`]), so that raft, the log record, the messages and the
//! apply are paid once per pack instead of once per proposal.
//!
//! # Format
//! - `data`: the envelope, `count: u32` then `count` times `len: u32` ‖ `len` bytes, all
//!   little-endian; at least two parts (a lone proposal is proposed as a plain entry) and at
//!   most [`MAX_PARTS`].
//! - `context`: [`PACK_TAG`], then the proposer's node id (u64 little-endian) when the parts
//!   are answered once durable on the leader (Async mode, `LeaderDurable`: see
//!   `recover_async_acks`), nothing more when they are answered at apply. A plain entry's
//!   context is empty or the 8-byte node id, so the lengths (1 or 9) never collide.
//!
//! Every replica decodes the envelope at apply and hands the parts to
//! [`crate::StateMachine::apply_packed`]; a malformed envelope is a state machine error
//! (the node is poisoned), never a panic.

/// First byte of a packed entry's context.
pub(crate) const PACK_TAG: u8 = 0xB7;
/// Most proposals in one packed entry.
pub const MAX_PARTS: usize = 256;
/// Most bytes of proposal data in one packed entry (the entry's record must also fit the
/// log's record limit: whichever is smaller).
pub const MAX_DATA: usize = 256 << 10;

/// Bytes the envelope adds to `parts` parts.
pub(crate) fn overhead(parts: usize) -> usize {
    4 + 4 * parts
}

/// The context of a packed entry: the tag, plus the proposer's id when acknowledged once
/// durable on the leader.
pub(crate) fn context(durable_ack_by: Option<u64>) -> Vec<u8> {
    let mut c = Vec::with_capacity(9);
    c.push(PACK_TAG);
    if let Some(node) = durable_ack_by {
        c.extend_from_slice(&node.to_le_bytes());
    }
    c
}

/// What an entry's context says: whether the entry is packed, and the node that proposed it
/// answering at `LeaderDurable` (if it did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Context {
    pub(crate) packed: bool,
    pub(crate) durable_ack_by: Option<u64>,
}

/// Reads an entry's context (plain or packed; anything else is neither packed nor acked).
pub(crate) fn parse_context(ctx: &[u8]) -> Context {
    let node = |b: &[u8]| <[u8; 8]>::try_from(b).ok().map(u64::from_le_bytes);
    match ctx {
        [PACK_TAG] => Context {
            packed: true,
            durable_ack_by: None,
        },
        [PACK_TAG, rest @ ..] if rest.len() == 8 => Context {
            packed: true,
            durable_ack_by: node(rest),
        },
        _ if ctx.len() == 8 => Context {
            packed: false,
            durable_ack_by: node(ctx),
        },
        _ => Context {
            packed: false,
            durable_ack_by: None,
        },
    }
}

/// Encodes the envelope of `parts`.
pub(crate) fn encode<'a>(parts: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let len: usize = parts.clone().map(|p| p.len()).sum();
    let count = parts.len();
    let mut out = Vec::with_capacity(len + overhead(count));
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Decodes an envelope into its parts (borrowing from `data`). Refuses a truncated or
/// over-long envelope, a count below 2 or above [`MAX_PARTS`], and trailing bytes.
pub(crate) fn decode(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    fn u32_at(data: &[u8], at: usize) -> Option<usize> {
        let b = data.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let count = u32_at(data, 0).ok_or("packed entry shorter than its count")?;
    if !(2..=MAX_PARTS).contains(&count) {
        return Err(format!(
            "packed entry of {count} parts (2 to {MAX_PARTS} expected)"
        ));
    }
    let mut parts = Vec::with_capacity(count);
    let mut at = 4usize;
    for i in 0..count {
        let len = u32_at(data, at).ok_or_else(|| format!("part {i}: length truncated"))?;
        at += 4;
        let part = at
            .checked_add(len)
            .and_then(|end| data.get(at..end))
            .ok_or_else(|| format!("part {i}: {len} bytes announced, {} left", data.len() - at))?;
        parts.push(part);
        at += len;
    }
    if at != data.len() {
        return Err(format!(
            "{} bytes after the last part",
            data.len().saturating_sub(at)
        ));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn contexts_tell_packed_and_acked_entries_apart() {
        let me = 7u64;
        assert_eq!(
            parse_context(&context(None)),
            Context {
                packed: true,
                durable_ack_by: None
            }
        );
        assert_eq!(
            parse_context(&context(Some(me))),
            Context {
                packed: true,
                durable_ack_by: Some(me)
            }
        );
        // Plain entries: empty (answered at apply), the node id (answered LeaderDurable).
        assert_eq!(
            parse_context(&[]),
            Context {
                packed: false,
                durable_ack_by: None
            }
        );
        assert_eq!(
            parse_context(&me.to_le_bytes()),
            Context {
                packed: false,
                durable_ack_by: Some(me)
            }
        );
        // A plain node id whose first byte happens to be the tag is still plain.
        let id = u64::from_le_bytes([PACK_TAG, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(parse_context(&id.to_le_bytes()).durable_ack_by, Some(id));
        assert!(!parse_context(&id.to_le_bytes()).packed);
        // Anything else is neither.
        for odd in [&[1u8][..], &[PACK_TAG, 1], &[0; 10]] {
            let c = parse_context(odd);
            assert!(!c.packed && c.durable_ack_by.is_none(), "{odd:?}");
        }
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        let good = encode([&b"ab"[..], &b""[..], &b"xyz"[..]].into_iter());
        assert_eq!(
            decode(&good).unwrap(),
            vec![&b"ab"[..], &b""[..], &b"xyz"[..]]
        );
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short count", vec![2, 0]),
            ("zero parts", 0u32.to_le_bytes().to_vec()),
            ("one part", encode([&b"a"[..]].into_iter())),
            ("too many parts", {
                let mut v = ((MAX_PARTS + 1) as u32).to_le_bytes().to_vec();
                v.extend(std::iter::repeat_n(0u8, 4 * (MAX_PARTS + 1)));
                v
            }),
            ("truncated length", good[..good.len() - 5].to_vec()),
            ("truncated part", good[..good.len() - 1].to_vec()),
            ("trailing byte", {
                let mut v = good.clone();
                v.push(0);
                v
            }),
            ("huge length", {
                let mut v = 2u32.to_le_bytes().to_vec();
                v.extend(u32::MAX.to_le_bytes());
                v
            }),
        ];
        for (what, bytes) in cases {
            assert!(decode(&bytes).is_err(), "{what} accepted");
        }
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(parts in prop::collection::vec(
            prop::collection::vec(any::<u8>(), 0..40), 2..20)) {
            let enc = encode(parts.iter().map(Vec::as_slice));
            prop_assert_eq!(enc.len(), overhead(parts.len()) + parts.iter().map(Vec::len).sum::<usize>());
            let dec = decode(&enc).unwrap();
            prop_assert_eq!(dec.len(), parts.len());
            for (d, p) in dec.iter().zip(&parts) {
                prop_assert_eq!(*d, p.as_slice());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64),
                                       count in 0u32..6) {
            let mut v = count.to_le_bytes().to_vec();
            v.extend(bytes);
            if let Ok(parts) = decode(&v) {
                // Whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(encode(parts.iter().copied()), v);
            }
        }
    }
}
