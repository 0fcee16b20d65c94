//! Control connections on the peer port: an HMAC challenge like the raft transport's, then
//! one request and its response per connection (control traffic is rare: bootstrap, meta
//! subscription, heartbeats, meta writes sent to the leader).
//!
//! 1. dialer -> `ControlHello { version, cluster, from, nonce_d }`
//! 2. server -> `ControlChallenge { node, nonce_s, proof_s }`
//! 3. dialer checks `proof_s` -> `ControlProof { proof_d }`
//! 4. server checks `proof_d` -> `ControlAck`; only now is a `ControlRequest` read.
//!
//! proof = HMAC-SHA256(secret, label || nonce_d || nonce_s || from || node), with distinct
//! labels for the two roles. A dialer that fails gets a `ControlResponse` error and a closed
//! connection; nothing it sent is acted on.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use proto::frame::{self, FrameDecoder, FrameError};
use proto::metapb::{
    ControlAck, ControlError, ControlError_Code, ControlFrame, ControlFrame_oneof_kind,
    ControlHello, ControlProof, ControlRequest, ControlResponse, ControlResponse_oneof_kind,
};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Version of the control protocol.
pub const VERSION: u32 = 1;
/// Largest control frame before authentication.
pub const PREAUTH_MAX_FRAME: usize = 4 << 10;
/// Largest control frame after authentication (meta views).
pub const MAX_FRAME: usize = 16 << 20;
const NONCE_LEN: usize = 32;
const LABEL_SERVER: &[u8] = b"quiver-control-v1 server";
const LABEL_DIALER: &[u8] = b"quiver-control-v1 dialer";

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("timed out")]
    Timeout,
    #[error("connection closed")]
    Closed,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("peer proof does not match the cluster secret")]
    BadProof,
    #[error("{0}")]
    Remote(String),
}

/// Error type of this module.
pub type Error = CallError;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], label: &[u8], nd: &[u8], ns: &[u8], from: u64, node: u64) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for part in [label, nd, ns] {
        m.update(&(part.len() as u64).to_le_bytes());
        m.update(part);
    }
    m.update(&from.to_le_bytes());
    m.update(&node.to_le_bytes());
    m
}

fn nonce() -> Bytes {
    let mut n = vec![0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut n);
    Bytes::from(n)
}

/// A framed byte stream.
pub struct Framed<S> {
    pub(crate) io: S,
    pub(crate) buf: BytesMut,
    decoder: FrameDecoder,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Frames on `io`, starting with the bytes already read in `buf`.
    pub fn new(io: S, buf: BytesMut, max_frame: usize) -> Self {
        Framed {
            io,
            buf,
            decoder: FrameDecoder::new(max_frame),
        }
    }

    /// Change the frame limit.
    pub fn set_max_frame(&mut self, max: usize) {
        self.decoder = FrameDecoder::new(max);
    }

    /// The next frame's payload; `None` at a clean end of stream.
    ///
    /// # Errors
    /// I/O, an oversized frame, or a stream cut inside a frame.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some(p) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(p));
            }
            self.buf.reserve(8 << 10);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Ok(self.decoder.decode_eof(&mut self.buf)?);
            }
        }
    }

    /// Write one message as a frame.
    ///
    /// # Errors
    /// I/O or the message exceeds `max`.
    pub async fn send<M: protobuf::Message>(&mut self, m: &M, max: usize) -> Result<(), Error> {
        let mut out = Vec::new();
        frame::encode_message(m, max, &mut out)?;
        self.io.write_all(&out).await?;
        Ok(())
    }

    async fn next_control(&mut self) -> Result<ControlFrame_oneof_kind, Error> {
        let p = self.next().await?.ok_or(Error::Closed)?;
        let f: ControlFrame = frame::decode_message(&p)?;
        f.kind.ok_or(Error::Protocol("unknown control frame"))
    }
}

fn wrap(kind: ControlFrame_oneof_kind) -> ControlFrame {
    let mut f = ControlFrame::new();
    f.kind = Some(kind);
    f
}

/// A control error response.
pub fn error_response(
    id: u64,
    code: ControlError_Code,
    message: impl Into<String>,
) -> ControlResponse {
    let mut e = ControlError::new();
    e.code = code;
    e.message = message.into();
    let mut r = ControlResponse::new();
    r.id = id;
    r.set_error(e);
    r
}

/// Send `resp` as a frame (best effort, for refusals before closing).
pub async fn send_response<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Framed<S>,
    resp: ControlResponse,
) -> Result<(), Error> {
    c.send(&wrap(ControlFrame_oneof_kind::response(resp)), MAX_FRAME)
        .await
}

/// Server side: `hello` was the first frame. Returns the dialer's id (0 for a tool) once it
/// proved the secret; on failure the caller sends a refusal and closes.
///
/// # Errors
/// Wrong version or cluster, bad proof, protocol violation, I/O.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Framed<S>,
    hello: ControlHello,
    cluster: &str,
    secret: &[u8],
    node: u64,
) -> Result<u64, Error> {
    if hello.version != VERSION {
        return Err(Error::Protocol("unsupported control version"));
    }
    if hello.cluster != cluster {
        return Err(Error::Protocol("wrong cluster"));
    }
    if hello.nonce.len() != NONCE_LEN {
        return Err(Error::Protocol("bad nonce"));
    }
    let ns = nonce();
    let proof_s = mac(secret, LABEL_SERVER, &hello.nonce, &ns, hello.from, node)
        .finalize()
        .into_bytes();
    let mut ch = proto::metapb::ControlChallenge::new();
    ch.node = node;
    ch.nonce = ns.clone();
    ch.proof = Bytes::copy_from_slice(&proof_s);
    c.send(
        &wrap(ControlFrame_oneof_kind::challenge(ch)),
        PREAUTH_MAX_FRAME,
    )
    .await?;
    let proof = match c.next_control().await? {
        ControlFrame_oneof_kind::proof(p) => p,
        _ => return Err(Error::Protocol("expected ControlProof")),
    };
    mac(secret, LABEL_DIALER, &hello.nonce, &ns, hello.from, node)
        .verify_slice(&proof.proof)
        .map_err(|_| Error::BadProof)?;
    c.send(
        &wrap(ControlFrame_oneof_kind::ack(ControlAck::new())),
        PREAUTH_MAX_FRAME,
    )
    .await?;
    c.set_max_frame(MAX_FRAME);
    Ok(hello.from)
}

/// Read the single request of an authenticated control connection.
///
/// # Errors
/// I/O, a bad frame, or anything but a request.
pub async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Framed<S>,
) -> Result<ControlRequest, Error> {
    match c.next_control().await? {
        ControlFrame_oneof_kind::request(r) => Ok(r),
        _ => Err(Error::Protocol("expected ControlRequest")),
    }
}

/// Who dials: the cluster credentials and this node's id (0 for a tool).
#[derive(Clone)]
pub struct Dialer {
    pub cluster: String,
    pub secret: Vec<u8>,
    pub from: u64,
    pub timeout: Duration,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("cluster", &self.cluster)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// Connect to `addr`, authenticate, send `req`, return the response. A `ControlError`
    /// response is returned as a response (the caller decides about redirects).
    ///
    /// # Errors
    /// Connection, handshake or protocol failures, and the overall timeout.
    pub async fn call(
        &self,
        addr: SocketAddr,
        req: ControlRequest,
    ) -> Result<ControlResponse, Error> {
        tokio::time::timeout(self.timeout, self.call_inner(addr, req))
            .await
            .map_err(|_| Error::Timeout)?
    }

    async fn call_inner(
        &self,
        addr: SocketAddr,
        req: ControlRequest,
    ) -> Result<ControlResponse, Error> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut c = Framed::new(s, BytesMut::new(), MAX_FRAME);
        let nd = nonce();
        let mut h = ControlHello::new();
        h.version = VERSION;
        h.cluster = self.cluster.clone();
        h.from = self.from;
        h.nonce = nd.clone();
        c.send(&wrap(ControlFrame_oneof_kind::hello(h)), PREAUTH_MAX_FRAME)
            .await?;
        let ch = match c.next_control().await? {
            ControlFrame_oneof_kind::challenge(ch) => ch,
            ControlFrame_oneof_kind::response(r) => return refused(r),
            _ => return Err(Error::Protocol("expected ControlChallenge")),
        };
        mac(
            &self.secret,
            LABEL_SERVER,
            &nd,
            &ch.nonce,
            self.from,
            ch.node,
        )
        .verify_slice(&ch.proof)
        .map_err(|_| Error::BadProof)?;
        let proof = mac(
            &self.secret,
            LABEL_DIALER,
            &nd,
            &ch.nonce,
            self.from,
            ch.node,
        )
        .finalize()
        .into_bytes();
        let mut p = ControlProof::new();
        p.proof = Bytes::copy_from_slice(&proof);
        c.send(&wrap(ControlFrame_oneof_kind::proof(p)), PREAUTH_MAX_FRAME)
            .await?;
        match c.next_control().await? {
            ControlFrame_oneof_kind::ack(_) => {}
            ControlFrame_oneof_kind::response(r) => return refused(r),
            _ => return Err(Error::Protocol("expected ControlAck")),
        }
        c.send(&wrap(ControlFrame_oneof_kind::request(req)), MAX_FRAME)
            .await?;
        match c.next_control().await? {
            ControlFrame_oneof_kind::response(r) => Ok(r),
            _ => Err(Error::Protocol("expected ControlResponse")),
        }
    }
}

fn refused(r: ControlResponse) -> Result<ControlResponse, Error> {
    match r.kind {
        Some(ControlResponse_oneof_kind::error(e)) => Err(Error::Remote(e.message)),
        _ => Err(Error::Protocol("unexpected response during handshake")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::metapb::{ControlRequest, WatchMeta};
    use tokio::net::TcpListener;

    /// A one-connection server: handshake with `secret`, then echo an error response.
    async fn server(
        secret: &'static [u8],
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<u64, CallError>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (s, _) = l.accept().await?;
            let mut c = Framed::new(s, BytesMut::new(), PREAUTH_MAX_FRAME);
            let hello = match c.next_control().await? {
                ControlFrame_oneof_kind::hello(h) => h,
                _ => return Err(CallError::Protocol("expected hello")),
            };
            let from = accept(&mut c, hello, "quiver", secret, 9).await?;
            let req = read_request(&mut c).await?;
            send_response(
                &mut c,
                error_response(req.id, ControlError_Code::NO_META, "none"),
            )
            .await?;
            Ok(from)
        });
        (addr, h)
    }

    fn dialer(secret: &[u8]) -> Dialer {
        Dialer {
            cluster: "quiver".into(),
            secret: secret.to_vec(),
            from: 5,
            timeout: Duration::from_secs(5),
        }
    }

    fn req() -> ControlRequest {
        let mut r = ControlRequest::new();
        r.id = 3;
        r.set_watch_meta(WatchMeta::new());
        r
    }

    #[tokio::test]
    async fn same_secret_gets_through() {
        let (addr, h) = server(b"the secret").await;
        let resp = dialer(b"the secret").call(addr, req()).await.unwrap();
        assert_eq!(resp.id, 3);
        assert_eq!(h.await.unwrap().unwrap(), 5);
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_before_any_request() {
        let (addr, h) = server(b"the secret").await;
        let r = dialer(b"another one").call(addr, req()).await;
        // The dialer notices first: the server's proof does not verify under its secret.
        assert!(matches!(r, Err(CallError::BadProof)), "{r:?}");
        // The server never read a request.
        assert!(h.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn bogus_proof_with_a_pipelined_request_is_refused() {
        let (addr, h) = server(b"the secret").await;
        let s = TcpStream::connect(addr).await.unwrap();
        let mut c = Framed::new(s, BytesMut::new(), MAX_FRAME);
        let mut hello = ControlHello::new();
        hello.version = VERSION;
        hello.cluster = "quiver".into();
        hello.from = 5;
        hello.nonce = vec![1u8; NONCE_LEN].into();
        let mut proof = ControlProof::new();
        proof.proof = vec![0u8; 32].into();
        // Hello, a made-up proof and a request, all at once.
        c.send(&wrap(ControlFrame_oneof_kind::hello(hello)), MAX_FRAME)
            .await
            .unwrap();
        c.send(&wrap(ControlFrame_oneof_kind::proof(proof)), MAX_FRAME)
            .await
            .unwrap();
        c.send(&wrap(ControlFrame_oneof_kind::request(req())), MAX_FRAME)
            .await
            .unwrap();
        assert!(matches!(h.await.unwrap(), Err(CallError::BadProof)));
    }
}
