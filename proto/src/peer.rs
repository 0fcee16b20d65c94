//! Helpers for the peer port's frames (`protos/peerpb.proto`).
//!
//! [`encode_raft_batch`] writes a whole `PeerFrame { raft: RaftBatch { .. } }` frame straight
//! from raft messages: each `eraftpb.Message` is encoded once, in place, instead of into a
//! buffer of its own that is then copied into the frame. [`decode_cell_messages`] parses them
//! back, sharing the frame's memory for entry data.

use bytes::Bytes;
use protobuf::rt::compute_raw_varint64_size;
use protobuf::{CodedOutputStream, Message as _};
use raft::eraftpb::Message;

use crate::frame::{FrameError, HEADER_LEN};
use crate::peerpb::{PeerFrame, PeerFrame_oneof_kind, RaftBatch};
use crate::CellId;

/// Field numbers used by the hand-written encoder; they must match `peerpb.proto`.
const PEER_FRAME_RAFT: u32 = 6;
const RAFT_BATCH_MSGS: u32 = 1;
const CELL_MESSAGE_CELL: u32 = 1;
const CELL_MESSAGE_MESSAGE: u32 = 2;
/// Every tag used here fits in one byte (field number < 16).
const TAG_LEN: u64 = 1;

/// Append one frame holding `PeerFrame { raft: RaftBatch { msgs } }` to `dst`.
///
/// `msgs` is iterated twice (sizes first, then bytes), so it must be cheap to clone.
///
/// # Errors
/// [`FrameError::TooLarge`] if the frame would exceed `max_frame`; nothing is written then.
pub fn encode_raft_batch<'a, I>(
    msgs: I,
    max_frame: usize,
    dst: &mut Vec<u8>,
) -> Result<(), FrameError>
where
    I: Iterator<Item = (CellId, &'a Message)> + Clone,
{
    let mut batch_len: u64 = 0;
    for (cell, msg) in msgs.clone() {
        let m = u64::from(msg.compute_size());
        let cm = cell_message_len(cell, m);
        batch_len += TAG_LEN + varint_len(cm) + cm;
    }
    let payload = TAG_LEN + varint_len(batch_len) + batch_len;
    let too_large = || FrameError::TooLarge {
        len: payload,
        limit: max_frame as u64,
    };
    if payload > max_frame as u64 {
        return Err(too_large());
    }
    let payload32 = u32::try_from(payload).map_err(|_| too_large())?;
    let batch32 = u32::try_from(batch_len).map_err(|_| too_large())?;

    let start = dst.len();
    dst.reserve(HEADER_LEN + payload32 as usize);
    dst.extend_from_slice(&payload32.to_le_bytes());
    let written = (|| {
        let mut os = CodedOutputStream::vec(dst);
        os.write_tag(
            PEER_FRAME_RAFT,
            protobuf::wire_format::WireTypeLengthDelimited,
        )?;
        os.write_raw_varint32(batch32)?;
        for (cell, msg) in msgs {
            // Sizes were cached by `compute_size` above.
            let m = msg.get_cached_size();
            let cm = cell_message_len(cell, u64::from(m));
            os.write_tag(
                RAFT_BATCH_MSGS,
                protobuf::wire_format::WireTypeLengthDelimited,
            )?;
            os.write_raw_varint64(cm)?;
            if cell.get() != 0 {
                os.write_uint64(CELL_MESSAGE_CELL, cell.get())?;
            }
            os.write_tag(
                CELL_MESSAGE_MESSAGE,
                protobuf::wire_format::WireTypeLengthDelimited,
            )?;
            os.write_raw_varint32(m)?;
            msg.write_to_with_cached_sizes(&mut os)?;
        }
        os.flush()
    })();
    if let Err(e) = written {
        dst.truncate(start);
        return Err(e.into());
    }
    if dst.len() - start != HEADER_LEN + payload32 as usize {
        // Only possible if a message changed between the two passes.
        dst.truncate(start);
        return Err(FrameError::Malformed {
            why: "raft batch size changed while encoding".into(),
        });
    }
    Ok(())
}

fn cell_message_len(cell: CellId, msg_len: u64) -> u64 {
    let cell_len = if cell.get() != 0 {
        TAG_LEN + varint_len(cell.get())
    } else {
        0
    };
    cell_len + TAG_LEN + varint_len(msg_len) + msg_len
}

fn varint_len(v: u64) -> u64 {
    u64::from(compute_raw_varint64_size(v))
}

/// Parse a peer-port payload and return its kind.
///
/// # Errors
/// [`FrameError::Malformed`] if the payload is not a `PeerFrame` or carries no kind this
/// version knows.
pub fn decode_frame(payload: &Bytes) -> Result<PeerFrame_oneof_kind, FrameError> {
    let frame: PeerFrame = crate::frame::decode_message(payload)?;
    frame.kind.ok_or_else(|| FrameError::Malformed {
        why: "peer frame of unknown kind".into(),
    })
}

/// The raft messages of a batch, in order. Entry data shares the frame's memory.
///
/// # Errors
/// [`FrameError::Malformed`] if any message does not parse as an `eraftpb.Message`.
pub fn decode_cell_messages(batch: &RaftBatch) -> Result<Vec<(CellId, Message)>, FrameError> {
    let mut out = Vec::with_capacity(batch.msgs.len());
    for cm in batch.msgs.iter() {
        let msg = Message::parse_from_carllerche_bytes(&cm.message)?;
        out.push((CellId(cm.cell), msg));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_message, FrameDecoder};
    use crate::peerpb::CellMessage;
    use bytes::BytesMut;
    use raft::eraftpb::{Entry, MessageType};

    fn msg(i: u64) -> Message {
        let mut m = Message::new();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = 2;
        m.from = 1;
        m.term = 7;
        m.index = i;
        let mut e = Entry::new();
        e.index = i + 1;
        e.data = Bytes::from(vec![i as u8; (i as usize) * 37]);
        m.mut_entries().push(e);
        m
    }

    fn decode_one(buf: &[u8]) -> Vec<(CellId, Message)> {
        let mut b = BytesMut::from(buf);
        let payload = FrameDecoder::default().decode(&mut b).unwrap().unwrap();
        assert!(b.is_empty());
        match decode_frame(&payload).unwrap() {
            PeerFrame_oneof_kind::raft(batch) => decode_cell_messages(&batch).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn raft_batch_round_trip() {
        let msgs: Vec<(CellId, Message)> = (0..50)
            .map(|i| (CellId(if i % 7 == 0 { 0 } else { 1 << (i % 60) }), msg(i)))
            .collect();
        let mut out = Vec::new();
        encode_raft_batch(msgs.iter().map(|(c, m)| (*c, m)), 1 << 20, &mut out).unwrap();
        assert_eq!(decode_one(&out), msgs);
    }

    #[test]
    fn raft_batch_matches_generated_encoding() {
        let msgs = [(CellId(3), msg(1)), (CellId(9), msg(2))];
        let mut out = Vec::new();
        encode_raft_batch(msgs.iter().map(|(c, m)| (*c, m)), 1 << 20, &mut out).unwrap();

        let mut batch = RaftBatch::new();
        for (c, m) in &msgs {
            let mut cm = CellMessage::new();
            cm.cell = c.get();
            cm.message = Bytes::from(m.write_to_bytes().unwrap());
            batch.mut_msgs().push(cm);
        }
        let mut f = PeerFrame::new();
        f.set_raft(batch);
        let payload = Bytes::from(out[HEADER_LEN..].to_vec());
        let ours: PeerFrame = decode_message(&payload).unwrap();
        assert_eq!(ours, f);
    }

    #[test]
    fn empty_batch_and_too_large() {
        let mut out = Vec::new();
        encode_raft_batch(std::iter::empty(), 1024, &mut out).unwrap();
        assert!(decode_one(&out).is_empty());
        let big = msg(1000);
        let mut out2 = vec![9u8];
        assert!(matches!(
            encode_raft_batch(std::iter::once((CellId(1), &big)), 1000, &mut out2),
            Err(FrameError::TooLarge { limit: 1000, .. })
        ));
        assert_eq!(out2, vec![9u8]);
    }

    #[test]
    fn bad_inner_message_is_malformed() {
        let mut batch = RaftBatch::new();
        let mut cm = CellMessage::new();
        cm.cell = 1;
        cm.message = Bytes::from_static(&[0xff, 0xff]);
        batch.mut_msgs().push(cm);
        assert!(matches!(
            decode_cell_messages(&batch),
            Err(FrameError::Malformed { .. })
        ));
        assert!(matches!(
            decode_frame(&Bytes::new()),
            Err(FrameError::Malformed { .. })
        ));
    }
}
