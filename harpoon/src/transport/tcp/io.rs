//! Reading and writing peer frames on a byte stream.

use bytes::{Bytes, BytesMut};
use proto::frame::{self, FrameDecoder};
use proto::peer::decode_frame;
use proto::peerpb::{PeerFrame, PeerFrame_oneof_kind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TransportError;

/// Read buffer growth step; a frame's full length is reserved once its header is read.
const READ_CHUNK: usize = 64 << 10;

/// Incremental frame reader over any byte stream.
pub(super) struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(super) fn new(rd: R, max_frame: usize) -> Self {
        Self::with_buffer(rd, max_frame, BytesMut::new())
    }

    /// A reader that first consumes `buffered` (bytes already read off the stream).
    pub(super) fn with_buffer(rd: R, max_frame: usize, buffered: BytesMut) -> Self {
        FrameReader {
            rd,
            buf: buffered,
            decoder: FrameDecoder::new(max_frame),
        }
    }

    /// The stream, giving up any buffered bytes (call when none are expected).
    pub(super) fn into_inner(self) -> R {
        self.rd
    }

    /// Change the payload limit (small during the handshake, so an unauthenticated peer
    /// cannot make us reserve a large buffer).
    pub(super) fn set_max_frame(&mut self, max_frame: usize) {
        self.decoder = FrameDecoder::new(max_frame);
    }

    /// The next frame's payload, or `None` at a clean end of stream.
    ///
    /// Cancel safe: bytes read stay in the buffer.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            if let Some(payload) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(payload));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.rd.read_buf(&mut self.buf).await?;
            if n == 0 {
                return match self.decoder.decode_eof(&mut self.buf)? {
                    Some(payload) => Ok(Some(payload)),
                    None => Ok(None),
                };
            }
        }
    }

    /// The next frame, parsed; end of stream is an error here.
    pub(super) async fn next_kind(&mut self) -> Result<PeerFrame_oneof_kind, TransportError> {
        match self.next().await? {
            Some(payload) => Ok(decode_frame(&payload)?),
            None => Err(TransportError::Closed),
        }
    }
}

/// Encode `f` as one frame and write it.
pub(super) async fn write_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    f: &PeerFrame,
    max_frame: usize,
) -> Result<(), TransportError> {
    let mut buf = Vec::new();
    frame::encode_message(f, max_frame, &mut buf)?;
    wr.write_all(&buf).await?;
    Ok(())
}
