//! One client connection: a writer task and a reader task; callers wait on a oneshot keyed
//! by their request id, so any number of requests are in flight at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use proto::clientpb::{ClientRequest, ClientResponse, ClientResponse_oneof_kind};
use proto::frame::{self, FrameDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::ClientError;

/// Largest frame accepted from a node.
pub const MAX_FRAME: usize = 1 << 20;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<ClientResponse>>>>;

/// A multiplexed connection to one node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    waiters: Waiters,
    next: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Conn {
    /// Connect to `addr`.
    ///
    /// # Errors
    /// [`ClientError::Connect`] if the node cannot be reached within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, ClientError> {
        let err = |m: String| ClientError::Connect {
            addr: addr.to_string(),
            message: m,
        };
        let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let _ = s.set_nodelay(true);
        let (mut rd, mut wr) = s.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let waiters: Waiters = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let c2 = closed.clone();
        tokio::spawn(async move {
            while let Some(mut buf) = rx.recv().await {
                while let Ok(more) = rx.try_recv() {
                    buf.extend_from_slice(&more);
                }
                if wr.write_all(&buf).await.is_err() {
                    break;
                }
            }
            c2.store(true, Ordering::Relaxed);
        });
        let (w2, c3) = (waiters.clone(), closed.clone());
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut dec = FrameDecoder::new(MAX_FRAME);
            'read: loop {
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(p)) => {
                            let Ok(r) = frame::decode_message::<ClientResponse>(&p) else {
                                break 'read;
                            };
                            if r.id == 0 {
                                // A connection-level error: the node closes after it.
                                break 'read;
                            }
                            if let Some(w) = w2.lock().remove(&r.id) {
                                let _ = w.send(r);
                            }
                        }
                        Ok(None) => break,
                        Err(_) => break 'read,
                    }
                }
                buf.reserve(16 << 10);
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            c3.store(true, Ordering::Relaxed);
            // Dropping the senders fails every waiting call.
            w2.lock().clear();
        });
        Ok(Conn {
            tx,
            waiters,
            next: Arc::new(AtomicU64::new(1)),
            closed,
            addr,
        })
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Send `req` (its id is assigned here) and wait for its answer.
    ///
    /// # Errors
    /// [`ClientError::ConnectionLost`] if the connection closes first.
    pub async fn call(
        &self,
        mut req: ClientRequest,
    ) -> Result<ClientResponse_oneof_kind, ClientError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        let mut out = Vec::new();
        frame::encode_message(&req, MAX_FRAME, &mut out)
            .map_err(|e| ClientError::TooLarge(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().insert(id, tx);
        let lost = || ClientError::ConnectionLost(self.addr.to_string());
        if self.tx.send(out).await.is_err() {
            self.waiters.lock().remove(&id);
            return Err(lost());
        }
        let resp = rx.await.map_err(|_| lost())?;
        resp.kind
            .ok_or_else(|| ClientError::Protocol("empty response".into()))
    }
}
