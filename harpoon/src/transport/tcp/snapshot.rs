//! Snapshot streaming: cutting a `MsgSnapshot`'s data into `SnapshotChunk`s on the sending
//! side, and putting it back together on the receiving side.
//!
//! A sender streams one snapshot at a time per connection, so the receiver keeps at most one
//! transfer in progress per connection: a chunk at offset 0 starts a new one and drops any
//! unfinished one (stale: its sender gave up on it), and the size announced at offset 0 is
//! checked against `max_snapshot_size` before anything is buffered.

use bytes::{Bytes, BytesMut};
use proto::peerpb::SnapshotChunk;
use proto::CellId;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use super::TransportError;
use crate::transport::Envelope;

/// A snapshot being sent: its header (the message without data) and its data.
pub(super) struct Outgoing {
    pub(super) cell: CellId,
    header: Bytes,
    data: Bytes,
    offset: usize,
}

impl Outgoing {
    /// Split `env` (a `MsgSnapshot`) into header and data.
    pub(super) fn new(env: Envelope) -> Result<Self, TransportError> {
        let Envelope { cell, mut msg } = env;
        let data = std::mem::take(&mut msg.mut_snapshot().data);
        let header = Bytes::from(
            msg.write_to_bytes()
                .map_err(|e| TransportError::Frame(e.into()))?,
        );
        Ok(Outgoing {
            cell,
            header,
            data,
            offset: 0,
        })
    }

    /// The next chunk of at most `chunk_size` data bytes; `last` is set on the final one (an
    /// empty snapshot is one chunk). Call only while [`done`](Self::done) is false.
    pub(super) fn next_chunk(&mut self, chunk_size: usize) -> SnapshotChunk {
        let end = self.data.len().min(self.offset + chunk_size.max(1));
        let mut c = SnapshotChunk::new();
        c.cell = self.cell.get();
        if self.offset == 0 {
            c.message_header = self.header.clone();
        }
        c.offset = self.offset as u64;
        c.data = self.data.slice(self.offset..end);
        c.total_len = self.data.len() as u64;
        c.last = end == self.data.len();
        self.offset = end;
        if c.last {
            // Marks the transfer done even for an empty snapshot.
            self.offset = usize::MAX;
        }
        c
    }

    /// Whether the last chunk has been produced.
    pub(super) fn done(&self) -> bool {
        self.offset == usize::MAX
    }
}

/// Reassembly of incoming snapshots on one connection.
pub(super) struct Incoming {
    max_size: u64,
    current: Option<Partial>,
}

struct Partial {
    cell: CellId,
    header: Message,
    total: u64,
    data: BytesMut,
}

impl Incoming {
    pub(super) fn new(max_size: u64) -> Self {
        Incoming {
            max_size,
            current: None,
        }
    }

    /// Take one chunk; returns the whole message once its last chunk arrived.
    ///
    /// # Errors
    /// A chunk that does not continue the transfer in progress, an oversized snapshot or a
    /// header that is not a `MsgSnapshot`: the transfer is dropped (raft will send the snapshot
    /// again) and the error says why.
    pub(super) fn on_chunk(
        &mut self,
        c: SnapshotChunk,
    ) -> Result<Option<Envelope>, TransportError> {
        let cell = CellId(c.cell);
        if c.offset == 0 {
            // A new transfer; anything unfinished is stale.
            self.current = None;
            if c.total_len > self.max_size {
                return Err(TransportError::SnapshotTooLarge {
                    cell,
                    len: c.total_len,
                    limit: self.max_size,
                });
            }
            let header = Message::parse_from_carllerche_bytes(&c.message_header)
                .map_err(|e| TransportError::Frame(e.into()))?;
            if header.msg_type != MessageType::MsgSnapshot {
                return Err(TransportError::Protocol(
                    "snapshot header is not a MsgSnapshot",
                ));
            }
            self.current = Some(Partial {
                cell,
                header,
                total: c.total_len,
                data: BytesMut::new(),
            });
        }
        let Some(p) = self.current.as_mut() else {
            return Err(TransportError::Protocol(
                "snapshot chunk without a transfer",
            ));
        };
        let fits = p.cell == cell
            && c.offset == p.data.len() as u64
            && c.total_len == p.total
            && (c.data.len() as u64) <= p.total - c.offset;
        if !fits {
            self.current = None;
            return Err(TransportError::Protocol("snapshot chunk out of sequence"));
        }
        p.data.extend_from_slice(&c.data);
        if !c.last {
            return Ok(None);
        }
        let Some(mut p) = self.current.take() else {
            return Ok(None);
        };
        if p.data.len() as u64 != p.total {
            return Err(TransportError::Protocol("snapshot ended short"));
        }
        p.header.mut_snapshot().data = p.data.freeze();
        Ok(Some(Envelope {
            cell: p.cell,
            msg: p.header,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(cell: u64, len: usize) -> Envelope {
        let mut msg = Message::new();
        msg.set_msg_type(MessageType::MsgSnapshot);
        msg.to = 2;
        msg.from = 1;
        msg.term = 3;
        msg.mut_snapshot().mut_metadata().index = 10;
        msg.mut_snapshot().data = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>());
        Envelope {
            cell: CellId(cell),
            msg,
        }
    }

    fn chunks(env: Envelope, size: usize) -> Vec<SnapshotChunk> {
        let mut o = Outgoing::new(env).unwrap();
        let mut v = Vec::new();
        while !o.done() {
            v.push(o.next_chunk(size));
        }
        v
    }

    #[test]
    fn round_trip_in_chunks() {
        for (len, size) in [(0, 4), (1, 4), (4, 4), (10, 4), (1000, 7)] {
            let env = snap(5, len);
            let cs = chunks(env.clone(), size);
            assert_eq!(cs.len(), len.div_ceil(size).max(1));
            let mut inc = Incoming::new(1 << 20);
            let mut out = None;
            for c in cs {
                assert!(out.is_none());
                out = inc.on_chunk(c).unwrap();
            }
            assert_eq!(out, Some(env));
        }
    }

    #[test]
    fn new_transfer_replaces_stale_one() {
        let mut inc = Incoming::new(1 << 20);
        let a = chunks(snap(1, 100), 30);
        let b = chunks(snap(2, 50), 30);
        assert!(inc.on_chunk(a[0].clone()).unwrap().is_none());
        assert!(inc.on_chunk(b[0].clone()).unwrap().is_none());
        // The rest of the stale transfer is refused.
        assert!(inc.on_chunk(a[1].clone()).is_err());
        // ... and the refusal dropped the current one too; b must restart.
        assert!(inc.on_chunk(b[1].clone()).is_err());
        let mut out = None;
        for c in b {
            out = inc.on_chunk(c).unwrap();
        }
        assert_eq!(out.map(|e| e.cell), Some(CellId(2)));
    }

    #[test]
    fn oversized_and_bad_chunks_are_refused() {
        let mut inc = Incoming::new(10);
        let cs = chunks(snap(1, 11), 4);
        assert!(matches!(
            inc.on_chunk(cs[0].clone()),
            Err(TransportError::SnapshotTooLarge { len: 11, .. })
        ));
        let mut inc = Incoming::new(100);
        let mut c = chunks(snap(1, 11), 4).remove(0);
        c.message_header = Bytes::from_static(&[0xff]);
        assert!(inc.on_chunk(c).is_err());
        let mut c = chunks(snap(1, 11), 4).remove(0);
        c.data = Bytes::from(vec![0u8; 12]);
        assert!(inc.on_chunk(c).is_err());
        let mut c = chunks(snap(1, 11), 20).remove(0);
        c.data = c.data.slice(..5);
        assert!(inc.on_chunk(c).is_err(), "last chunk before total_len");
    }
}
