//! The client port: length-prefixed `clientpb` frames, many requests in flight per
//! connection (each answered when ready, matched by its id).
//!
//! A frame that is oversized or does not decode gets one error response (id 0) and the
//! connection is closed; other connections are unaffected.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use harpoon::ReadConsistency;
use meta::ops;
use proto::clientpb::{
    ClientError, ClientError_Code, ClientRequest, ClientRequest_oneof_kind, ClientResponse,
    GetReply, PutReply,
};
use proto::frame::{self, FrameError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::control::Framed;
use crate::node::{Refusal, Seed, META_CELL};

/// Largest client frame.
pub const MAX_FRAME: usize = 1 << 20;

pub(crate) fn error(id: u64, code: ClientError_Code, msg: impl Into<String>) -> ClientResponse {
    let mut e = ClientError::new();
    e.code = code;
    e.message = msg.into();
    let mut r = ClientResponse::new();
    r.id = id;
    r.set_error(e);
    r
}

pub(crate) fn refusal(id: u64, r: Refusal) -> ClientResponse {
    match r {
        Refusal::NoMeta => error(
            id,
            ClientError_Code::NO_META,
            "no meta yet: run quiver create-meta",
        ),
        Refusal::NotLeader { clients, .. } => {
            let mut resp = error(id, ClientError_Code::NOT_LEADER, "not meta's leader");
            if let Some(proto::clientpb::ClientResponse_oneof_kind::error(e)) = resp.kind.as_mut() {
                e.leader_hint = clients.first().cloned().unwrap_or_default();
            }
            resp
        }
        Refusal::MetaExists(m) | Refusal::Unavailable(m) => {
            error(id, ClientError_Code::UNAVAILABLE, m)
        }
        Refusal::Invalid(m) => error(id, ClientError_Code::INVALID_ARGUMENT, m),
        Refusal::Corrupt { .. } => error(id, ClientError_Code::INTERNAL, r.control().1),
    }
}

/// Serve one client connection.
pub async fn serve(seed: Arc<Seed>, s: TcpStream, from: SocketAddr) {
    let (rd, mut wr) = s.into_split();
    let (tx, mut rx) = mpsc::channel::<ClientResponse>(256);
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(r) = rx.recv().await {
            out.clear();
            if frame::encode_message(&r, MAX_FRAME, &mut out).is_err() {
                out.clear();
                let e = error(r.id, ClientError_Code::TOO_LARGE, "response too large");
                if frame::encode_message(&e, MAX_FRAME, &mut out).is_err() {
                    break;
                }
            }
            // Write what is queued together.
            while let Ok(more) = rx.try_recv() {
                if frame::encode_message(&more, MAX_FRAME, &mut out).is_err() {
                    break;
                }
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut c = Framed::new(rd_wrap(rd), BytesMut::new(), MAX_FRAME);
    loop {
        let payload = match c.next().await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => {
                seed.counters
                    .client_bad_frames
                    .fetch_add(1, Ordering::Relaxed);
                let code = match e {
                    crate::control::CallError::Frame(FrameError::TooLarge { .. }) => {
                        ClientError_Code::TOO_LARGE
                    }
                    _ => ClientError_Code::INVALID_ARGUMENT,
                };
                tracing::debug!(%from, error = %e, "bad client frame; closing");
                let _ = tx.send(error(0, code, format!("bad frame: {e}"))).await;
                break;
            }
        };
        let req: ClientRequest = match frame::decode_message(&payload) {
            Ok(r) => r,
            Err(e) => {
                seed.counters
                    .client_bad_frames
                    .fetch_add(1, Ordering::Relaxed);
                let _ = tx
                    .send(error(
                        0,
                        ClientError_Code::INVALID_ARGUMENT,
                        format!("bad request: {e}"),
                    ))
                    .await;
                break;
            }
        };
        seed.counters
            .client_requests
            .fetch_add(1, Ordering::Relaxed);
        let (seed, tx) = (seed.clone(), tx.clone());
        tokio::spawn(async move {
            let resp = handle(&seed, req).await;
            let _ = tx.send(resp).await;
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// `Framed` wants a read+write stream; the write half is owned by the writer task.
fn rd_wrap(rd: tokio::net::tcp::OwnedReadHalf) -> ReadOnly {
    ReadOnly(rd)
}

/// A read half usable where `AsyncRead + AsyncWrite` is required (writes are refused).
pub struct ReadOnly(tokio::net::tcp::OwnedReadHalf);

impl tokio::io::AsyncRead for ReadOnly {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ReadOnly {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::Unsupported.into()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn handle(seed: &Arc<Seed>, req: ClientRequest) -> ClientResponse {
    let id = req.id;
    let mut resp = ClientResponse::new();
    resp.id = id;
    match req.kind {
        Some(ClientRequest_oneof_kind::status(_)) => {
            if !seed.meta_known() {
                return refusal(id, Refusal::NoMeta);
            }
            resp.set_status(crate::status::status(seed).await);
        }
        Some(ClientRequest_oneof_kind::get(g)) => {
            if g.key.is_empty() || g.key.len() > ops::MAX_SCRATCH_KEY {
                let mut r = error(
                    id,
                    ClientError_Code::INVALID_ARGUMENT,
                    "key must be 1 to 1024 bytes",
                );
                if let Some(proto::clientpb::ClientResponse_oneof_kind::error(e)) = r.kind.as_mut()
                {
                    e.field = "key".into();
                }
                return r;
            }
            if !seed.meta_known() {
                return refusal(id, Refusal::NoMeta);
            }
            if g.leader {
                let deadline = Instant::now() + Duration::from_secs(3);
                let ok = match seed.replica() {
                    Some(_) => seed
                        .node
                        .read_barrier(META_CELL, ReadConsistency::Lease, deadline)
                        .await
                        .is_ok(),
                    None => false,
                };
                let leader = seed
                    .meta_status()
                    .await
                    .is_some_and(|s| s.role == harpoon::Role::Leader);
                if !ok || !leader {
                    return refusal(id, seed.redirect().await);
                }
            }
            let key = Seed::scratch_key(&g.key);
            let mut g2 = GetReply::new();
            seed.read_meta(|s| {
                if let Some(e) = s.get(&key) {
                    g2.found = true;
                    g2.value = e.value.clone();
                    g2.mod_revision = e.mod_revision;
                }
            });
            resp.set_get(g2);
        }
        Some(ClientRequest_oneof_kind::put(p)) => {
            let txn = match ops::scratch_put(&p.key, &p.value) {
                Ok(t) => t,
                Err(e) => return error(id, ClientError_Code::INVALID_ARGUMENT, e.to_string()),
            };
            match seed.propose_local(&txn).await {
                Ok(r) => {
                    let mut pr = PutReply::new();
                    pr.revision = r.revision;
                    resp.set_put(pr);
                }
                Err(r) => return refusal(id, r),
            }
        }
        Some(ClientRequest_oneof_kind::create_collection(c)) => {
            return crate::kv_port::create_collection(seed, id, c).await
        }
        Some(ClientRequest_oneof_kind::lookup(l)) => return crate::kv_port::lookup(seed, id, l),
        Some(ClientRequest_oneof_kind::kv(k)) => return crate::kv_port::kv(seed, id, k).await,
        Some(ClientRequest_oneof_kind::watch(w)) => {
            return crate::watch_port::watch(seed, id, w).await
        }
        None => return error(id, ClientError_Code::INVALID_ARGUMENT, "empty request"),
    }
    resp
}
