//! The frame codec shared by every Quiver port: `[u32 little-endian length][payload]`.
//!
//! The length counts the payload only; a payload is one protobuf message (on the peer port a
//! `peerpb::PeerFrame`). The decoder is incremental: feed it whatever the socket returned, in
//! pieces of any size, and it yields whole payloads as zero-copy `Bytes`. A length above the
//! configured limit is refused before any memory is reserved for it. Nothing here panics on
//! any input.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default limit on a payload for the peer port: room for a 1 MiB snapshot chunk or a large
/// coalesced raft batch, far below what a hostile length could make us reserve.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// What can go wrong reading or writing frames. A connection that returned one of these is
/// unusable and should be closed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix (or a payload to encode) exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u64, limit: u64 },
    /// The payload is not the protobuf message that was expected.
    #[error("malformed frame: {why}")]
    Malformed { why: String },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

impl From<protobuf::ProtobufError> for FrameError {
    fn from(e: protobuf::ProtobufError) -> Self {
        FrameError::Malformed { why: e.to_string() }
    }
}

/// Incremental decoder of length-prefixed frames.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder that refuses payloads longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    /// The payload limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Take one whole frame's payload off the front of `buf`, or `Ok(None)` if `buf` does not
    /// hold a whole frame yet (then more bytes are needed; capacity for the rest of the frame
    /// is reserved in `buf`).
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] if the length prefix exceeds the limit; `buf` is left as is.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; HEADER_LEN];
        len_bytes.copy_from_slice(header);
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: len as u64,
                limit: self.max_frame as u64,
            });
        }
        let need = HEADER_LEN + len;
        if buf.len() < need {
            buf.reserve(need - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// Like [`decode`](Self::decode), for when the stream has ended: leftover bytes that do
    /// not make a whole frame are an error.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] if `buf` holds part of a frame, or what `decode` returns.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: buf.len(),
            }),
        }
    }
}

/// Append one frame holding `payload` to `dst`.
///
/// # Errors
/// [`FrameError::TooLarge`] if `payload` is longer than `max_frame` (nothing is written).
pub fn encode(payload: &[u8], max_frame: usize, dst: &mut BytesMut) -> Result<(), FrameError> {
    let len = check_len(payload.len(), max_frame)?;
    dst.reserve(HEADER_LEN + payload.len());
    dst.extend_from_slice(&len.to_le_bytes());
    dst.extend_from_slice(payload);
    Ok(())
}

/// Append one frame holding the encoding of `msg` to `dst`, without an intermediate buffer.
///
/// # Errors
/// [`FrameError::TooLarge`] if the encoding is longer than `max_frame` (nothing is written).
pub fn encode_message<M: protobuf::Message>(
    msg: &M,
    max_frame: usize,
    dst: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let size = msg.compute_size() as usize;
    let len = check_len(size, max_frame)?;
    let start = dst.len();
    dst.reserve(HEADER_LEN + size);
    dst.extend_from_slice(&len.to_le_bytes());
    let written = {
        let mut os = protobuf::CodedOutputStream::vec(dst);
        msg.write_to_with_cached_sizes(&mut os)
            .and_then(|()| os.flush())
    };
    if let Err(e) = written {
        dst.truncate(start);
        return Err(e.into());
    }
    Ok(())
}

/// Parse a frame's payload as `M`; `bytes` fields of the result share `payload`'s memory.
///
/// # Errors
/// [`FrameError::Malformed`] if `payload` is not a valid `M`.
pub fn decode_message<M: protobuf::Message>(payload: &Bytes) -> Result<M, FrameError> {
    Ok(protobuf::Message::parse_from_carllerche_bytes(payload)?)
}

fn check_len(len: usize, max_frame: usize) -> Result<u32, FrameError> {
    let too_large = || FrameError::TooLarge {
        len: len as u64,
        limit: max_frame as u64,
    };
    if len > max_frame {
        return Err(too_large());
    }
    u32::try_from(len).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peerpb::{Hello, PeerFrame, PeerFrame_oneof_kind};
    use proptest::prelude::*;

    fn frames(payloads: &[&[u8]]) -> BytesMut {
        let mut b = BytesMut::new();
        for p in payloads {
            encode(p, 1024, &mut b).unwrap();
        }
        b
    }

    #[test]
    fn round_trip() {
        let mut buf = frames(&[b"", b"a", &[7u8; 1000]]);
        let mut d = FrameDecoder::new(1024);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), Bytes::new());
        assert_eq!(
            d.decode(&mut buf).unwrap().unwrap(),
            Bytes::from_static(b"a")
        );
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), vec![7u8; 1000]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert_eq!(d.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn split_reads_at_every_boundary() {
        let payloads: [&[u8]; 3] = [b"hello", b"", b"world!!"];
        let all = frames(&payloads);
        for cut in 0..=all.len() {
            for cut2 in cut..=all.len() {
                let mut d = FrameDecoder::new(1024);
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                for piece in [&all[..cut], &all[cut..cut2], &all[cut2..]] {
                    buf.extend_from_slice(piece);
                    while let Some(f) = d.decode(&mut buf).unwrap() {
                        got.push(f);
                    }
                }
                assert_eq!(got, payloads.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let all = frames(&[b"abc", b"defgh"]);
        let mut d = FrameDecoder::new(1024);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in all.iter() {
            buf.extend_from_slice(&[*b]);
            if let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defgh")]
        );
    }

    #[test]
    fn oversized_length_is_refused_without_reserving() {
        let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        let mut d = FrameDecoder::new(1024);
        assert_eq!(
            d.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: u32::MAX as u64,
                limit: 1024
            })
        );
        assert!(buf.capacity() < 1024);
        let mut out = BytesMut::new();
        assert!(matches!(
            encode(&[0u8; 1025], 1024, &mut out),
            Err(FrameError::TooLarge { len: 1025, .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_at_eof() {
        let all = frames(&[b"abcdef"]);
        for cut in 1..all.len() {
            let mut buf = BytesMut::from(&all[..cut]);
            assert_eq!(
                FrameDecoder::new(1024).decode_eof(&mut buf),
                Err(FrameError::Truncated { buffered: cut })
            );
        }
    }

    #[test]
    fn message_round_trip() {
        let mut hello = Hello::new();
        hello.version = 1;
        hello.cluster = "c".into();
        hello.from = 3;
        hello.nonce = Bytes::from_static(&[1, 2, 3]);
        let mut f = PeerFrame::new();
        f.set_hello(hello.clone());
        let mut out = Vec::new();
        encode_message(&f, 1024, &mut out).unwrap();
        let mut buf = BytesMut::from(&out[..]);
        let payload = FrameDecoder::new(1024).decode(&mut buf).unwrap().unwrap();
        let back: PeerFrame = decode_message(&payload).unwrap();
        assert_eq!(back.kind, Some(PeerFrame_oneof_kind::hello(hello)));

        let mut small = Vec::new();
        assert!(matches!(
            encode_message(&f, 3, &mut small),
            Err(FrameError::TooLarge { limit: 3, .. })
        ));
        assert!(small.is_empty());
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let payload = Bytes::from_static(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode_message::<PeerFrame>(&payload),
            Err(FrameError::Malformed { .. })
        ));
    }

    /// Decode everything in `input` (fed in `pieces`) as frames then `PeerFrame`s; the only
    /// acceptable outcomes are payloads and typed errors.
    fn chew(input: &[u8], pieces: &[usize], max: usize) {
        let mut d = FrameDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut rest = input;
        for &n in pieces.iter().chain(std::iter::once(&usize::MAX)) {
            let (now, later) = rest.split_at(n.min(rest.len()));
            rest = later;
            buf.extend_from_slice(now);
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(p)) => {
                        assert!(p.len() <= max);
                        if let Ok(PeerFrame_oneof_kind::raft(b)) = crate::peer::decode_frame(&p) {
                            let _ = crate::peer::decode_cell_messages(&b);
                        }
                    }
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, limit }) => {
                        assert!(len > limit);
                        return;
                    }
                    Err(e) => panic!("decode returned {e:?}"),
                }
            }
        }
        match d.decode_eof(&mut buf) {
            Ok(_) | Err(FrameError::Truncated { .. }) | Err(FrameError::TooLarge { .. }) => {}
            Err(e) => panic!("decode_eof returned {e:?}"),
        }
    }

    fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            (
                prop_oneof![
                    4 => 0u32..64,
                    1 => any::<u32>(),
                ],
                prop::collection::vec(any::<u8>(), 0..64),
            ),
            0..8,
        )
        .prop_map(|frames| {
            let mut out = Vec::new();
            for (len, body) in frames {
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&body);
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn garbage_never_panics(
            input in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..512),
                framed_garbage(),
            ],
            pieces in prop::collection::vec(0usize..64, 0..16),
            max in prop_oneof![Just(0usize), Just(16), Just(1024), Just(DEFAULT_MAX_FRAME)],
        ) {
            chew(&input, &pieces, max);
        }

        #[test]
        fn valid_frames_survive_any_split(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 0..10),
            pieces in prop::collection::vec(1usize..50, 0..20),
        ) {
            let mut all = BytesMut::new();
            for p in &payloads {
                encode(p, 1024, &mut all).unwrap();
            }
            let mut d = FrameDecoder::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &all[..];
            for &n in pieces.iter().chain(std::iter::once(&usize::MAX)) {
                let (now, later) = rest.split_at(n.min(rest.len()));
                rest = later;
                buf.extend_from_slice(now);
                while let Some(f) = d.decode(&mut buf).unwrap() {
                    got.push(f.to_vec());
                }
            }
            prop_assert_eq!(got, payloads);
            prop_assert_eq!(d.decode_eof(&mut buf), Ok(None));
        }
    }
}
