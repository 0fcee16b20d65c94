//! `proto::frame::FrameDecoder` over arbitrary bytes fed in arbitrary pieces.
//!
//! Properties:
//! - `decode` returns whole payloads or a typed error, never panics;
//! - every payload is at most `max_frame` bytes; `TooLarge` only for a length above the limit,
//!   and it leaves the buffer untouched;
//! - the frames do not depend on where the stream was split (compared with a one-shot reference
//!   parser over the whole input);
//! - the buffer's capacity stays bounded by the limit and the bytes fed (no reservation beyond
//!   the limit);
//! - `decode_eof` at the end: nothing left, or `Truncated { buffered }` with the bytes left.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::frame::{FrameDecoder, FrameError, DEFAULT_MAX_FRAME, HEADER_LEN};

/// Input layout (plain bytes, so seeds are easy to write): `limit choice: u8`,
/// `n: u8` (reads, at most 16), `n` read sizes (`u16` LE), then the stream. The rest of the
/// stream after the `n` reads comes in one last read.
#[derive(Debug)]
struct Input {
    limit: u8,
    pieces: Vec<u16>,
    stream: Vec<u8>,
}

fn parse(data: &[u8]) -> Input {
    let limit = data.first().copied().unwrap_or(0);
    let n = data.get(1).map_or(0, |&n| usize::from(n % 17));
    let rest = data.get(2..).unwrap_or(&[]);
    let n = n.min(rest.len() / 2);
    let pieces = rest[..2 * n]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Input {
        limit,
        pieces,
        stream: rest[2 * n..].to_vec(),
    }
}

fn limit_of(choice: u8) -> usize {
    match choice % 6 {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 4 << 10, // the pre-auth limit of the peer and control ports
        4 => 1 << 20,
        _ => DEFAULT_MAX_FRAME,
    }
}

/// What a correct decoder yields for the whole stream at once.
enum Expected {
    Frames(Vec<Vec<u8>>, usize), // payloads, then bytes left over
    TooLarge(Vec<Vec<u8>>, u64), // payloads before the bad length, and that length
}

fn reference(stream: &[u8], max: usize) -> Expected {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        if rest.len() < HEADER_LEN {
            return Expected::Frames(out, rest.len());
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > max {
            return Expected::TooLarge(out, len as u64);
        }
        if rest.len() < HEADER_LEN + len {
            return Expected::Frames(out, rest.len());
        }
        out.push(rest[HEADER_LEN..HEADER_LEN + len].to_vec());
        at += HEADER_LEN + len;
    }
}

fuzz_target!(|data: &[u8]| {
    let input = parse(data);
    let max = limit_of(input.limit);
    let mut dec = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut too_large: Option<u64> = None;
    let mut fed = 0usize;
    let mut rest = &input.stream[..];
    let reads = input
        .pieces
        .iter()
        .map(|&n| n as usize)
        .chain(std::iter::once(usize::MAX));
    'reads: for n in reads {
        let (now, later) = rest.split_at(n.min(rest.len()));
        rest = later;
        buf.extend_from_slice(now);
        fed += now.len();
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(p)) => {
                    assert!(p.len() <= max, "payload of {} over limit {max}", p.len());
                    assert_eq!(buf.len(), before - HEADER_LEN - p.len());
                    got.push(p.to_vec());
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Err(FrameError::TooLarge { len, limit }) => {
                    assert!(len > limit, "TooLarge with len {len} <= limit {limit}");
                    assert_eq!(limit, max as u64);
                    assert_eq!(buf.len(), before, "TooLarge consumed bytes");
                    too_large = Some(len);
                    break 'reads;
                }
                Err(e) => panic!("decode returned {e:?}"),
            }
            // Capacity: a frame reserves at most its own size (plus the consumed prefix a shared
            // buffer keeps); growth is amortised, so at most twice that.
            let bound = 2 * (HEADER_LEN + max + fed) + (256 << 10);
            assert!(
                buf.capacity() <= bound,
                "capacity {} above bound {bound} (limit {max}, fed {fed})",
                buf.capacity()
            );
        }
        let bound = 2 * (HEADER_LEN + max + fed) + (256 << 10);
        assert!(
            buf.capacity() <= bound,
            "capacity {} above bound {bound} (limit {max}, fed {fed})",
            buf.capacity()
        );
    }

    match reference(&input.stream, max) {
        Expected::TooLarge(frames, len) => {
            assert_eq!(got, frames);
            assert_eq!(too_large, Some(len));
        }
        Expected::Frames(frames, left) => {
            assert_eq!(too_large, None);
            assert_eq!(got, frames);
            assert_eq!(buf.len(), left);
            match dec.decode_eof(&mut buf) {
                Ok(None) => assert_eq!(left, 0),
                Err(FrameError::Truncated { buffered }) => {
                    assert!(left > 0);
                    assert_eq!(buffered, left);
                }
                other => panic!("decode_eof returned {other:?} with {left} bytes left"),
            }
        }
    }

    // What the peer port does next with each payload: parse it; any outcome but a panic is fine.
    for p in got.iter().take(4) {
        let b = bytes::Bytes::copy_from_slice(p);
        if let Ok(proto::peerpb::PeerFrame_oneof_kind::raft(batch)) = proto::peer::decode_frame(&b)
        {
            let _ = proto::peer::decode_cell_messages(&batch);
        }
    }
});
