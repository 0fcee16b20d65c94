//! One client connection: a writer task and a reader task; callers wait on a oneshot keyed
//! by their request id, so any number of requests are in flight at once.
//!
//! A call frames its request straight into the connection's send buffer (no buffer of its
//! own) under the same lock that registers its waiter; the writer swaps the buffer out and
//! writes every request queued since its last write with one syscall. The reader decodes
//! every whole frame a read returned and hands each answer to its waiter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use proto::clientpb::{ClientRequest, ClientResponse, ClientResponse_oneof_kind};
use proto::frame::{self, FrameDecoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use crate::error::ClientError;

/// Largest frame accepted from a node.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes of requests queued on one connection before callers wait for the writer.
pub const MAX_PENDING: usize = 4 << 20;
/// Bytes a read asks for at least.
const READ_CHUNK: usize = 16 << 10;

/// A multiplexed connection to one node. Cheap to clone; the connection closes when the
/// last clone is dropped (after the requests already queued are written).
#[derive(Debug, Clone)]
pub struct Conn {
    shared: Arc<Shared>,
    /// Held by the clones only (not by the tasks): its drop tells the writer to finish.
    _handle: Arc<Handle>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: requests queued, or the last handle dropped.
    ready: Notify,
    /// Wakes callers waiting for room in the send buffer.
    room: Notify,
    addr: SocketAddr,
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Framed requests not written yet.
    out: Vec<u8>,
    waiters: HashMap<u64, oneshot::Sender<ClientResponse>>,
    next: u64,
    /// The connection failed (read or write): no call waits on it any more.
    closed: bool,
    /// Every [`Conn`] clone is gone: the writer ends once `out` is written.
    dropped: bool,
}

#[derive(Debug)]
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.state.lock().dropped = true;
        self.0.ready.notify_one();
    }
}

impl Shared {
    /// Fail the connection: every waiting call gets `ConnectionLost`, later calls too.
    fn close(&self) {
        let waiters = {
            let mut st = self.state.lock();
            st.closed = true;
            std::mem::take(&mut st.waiters)
        };
        // Dropping the senders fails every waiting call.
        drop(waiters);
        self.room.notify_waiters();
        self.ready.notify_one();
    }
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
        let (rd, wr) = s.into_split();
        Ok(Conn::over(addr, rd, wr, MAX_PENDING))
    }

    /// A connection over `rd`/`wr` (named `addr` in errors) with at most `limit` bytes of
    /// requests queued.
    fn over<R, W>(addr: SocketAddr, rd: R, wr: W, limit: usize) -> Conn
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next: 1,
                ..State::default()
            }),
            ready: Notify::new(),
            room: Notify::new(),
            addr,
            limit,
        });
        tokio::spawn(write_loop(shared.clone(), wr));
        tokio::spawn(read_loop(shared.clone(), rd));
        Conn {
            _handle: Arc::new(Handle(shared.clone())),
            shared,
        }
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().closed
    }

    /// Send `req` (its id is assigned here) and wait for its answer.
    ///
    /// # Errors
    /// [`ClientError::ConnectionLost`] if the connection closes first.
    pub async fn call(
        &self,
        mut req: ClientRequest,
    ) -> Result<ClientResponse_oneof_kind, ClientError> {
        let sh = &*self.shared;
        let lost = || ClientError::ConnectionLost(sh.addr.to_string());
        let rx = loop {
            let room = sh.room.notified();
            tokio::pin!(room);
            {
                let mut st = sh.state.lock();
                if st.closed {
                    return Err(lost());
                }
                if st.out.len() < sh.limit {
                    let id = st.next;
                    req.id = id;
                    let was_empty = st.out.is_empty();
                    frame::encode_message(&req, MAX_FRAME, &mut st.out)
                        .map_err(|e| ClientError::TooLarge(e.to_string()))?;
                    st.next += 1;
                    let (tx, rx) = oneshot::channel();
                    st.waiters.insert(id, tx);
                    drop(st);
                    if was_empty {
                        sh.ready.notify_one();
                    }
                    break rx;
                }
                // Registered before the unlock: the writer's next take wakes this.
                room.as_mut().enable();
            }
            room.await;
        };
        // A call given up (its timeout) leaves its waiter until the answer or the close
        // removes it; ids are never reused, so a late answer is dropped.
        let resp = rx.await.map_err(|_| lost())?;
        resp.kind
            .ok_or_else(|| ClientError::Protocol("empty response".into()))
    }
}

/// Write whatever is queued, one `write_all` per wake-up (after one yield, so the callers
/// already runnable queue theirs first). Ends when the last handle is gone and everything
/// is written, or on a write error (which fails the connection).
async fn write_loop<W: AsyncWrite + Unpin>(sh: Arc<Shared>, mut wr: W) {
    let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        tokio::task::yield_now().await;
        let more = loop {
            {
                let mut st = sh.state.lock();
                if st.closed {
                    break false;
                }
                if !st.out.is_empty() {
                    std::mem::swap(&mut st.out, &mut out);
                    break true;
                }
                if st.dropped {
                    break false;
                }
            }
            // A push between the unlock and here stored a permit: this returns at once.
            sh.ready.notified().await;
        };
        if !more {
            break;
        }
        sh.room.notify_waiters();
        if wr.write_all(&out).await.is_err() {
            sh.close();
            return;
        }
        out.clear();
        if out.capacity() > MAX_PENDING {
            out = Vec::with_capacity(READ_CHUNK);
        }
    }
    let _ = wr.shutdown().await;
}

/// Hand every answer to its waiter, until the stream ends or breaks.
async fn read_loop<R: AsyncRead + Unpin>(sh: Arc<Shared>, mut rd: R) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
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
                    let w = sh.state.lock().waiters.remove(&r.id);
                    if let Some(w) = w {
                        let _ = w.send(r);
                    }
                }
                Ok(None) => break,
                Err(_) => break 'read,
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    sh.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::clientpb::{PutReply, ScratchPut};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    /// A put of `n` (its key is `n` in decimal), answered by [`echo`] with revision `n`.
    fn put(n: u64) -> ClientRequest {
        let mut r = ClientRequest::new();
        let mut p = ScratchPut::new();
        p.key = n.to_string().into_bytes().into();
        r.set_put(p);
        r
    }

    fn revision(r: ClientResponse_oneof_kind) -> u64 {
        match r {
            ClientResponse_oneof_kind::put(p) => p.revision,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Answer each request read: revision = its key, `reverse` answers each read's batch
    /// backwards; `max_answers` stops (and hangs up) after that many; `pause` sleeps before
    /// each read (a slow server).
    async fn echo(
        mut rd: ReadHalf<DuplexStream>,
        mut wr: WriteHalf<DuplexStream>,
        reverse: bool,
        max_answers: usize,
        pause: Duration,
    ) -> Vec<usize> {
        let mut buf = BytesMut::new();
        let mut dec = FrameDecoder::new(MAX_FRAME);
        let mut answered = 0;
        let mut batches = Vec::new();
        loop {
            let mut batch = Vec::new();
            while let Some(p) = dec.decode(&mut buf).unwrap() {
                let req: ClientRequest = frame::decode_message(&p).unwrap();
                let n: u64 = std::str::from_utf8(&req.get_put().key)
                    .unwrap()
                    .parse()
                    .unwrap();
                let mut resp = ClientResponse::new();
                resp.id = req.id;
                let mut pr = PutReply::new();
                pr.revision = n;
                resp.set_put(pr);
                batch.push(resp);
            }
            if !batch.is_empty() {
                batches.push(batch.len());
            }
            if reverse {
                batch.reverse();
            }
            let mut out = Vec::new();
            for r in batch.iter().take(max_answers - answered) {
                frame::encode_message(r, MAX_FRAME, &mut out).unwrap();
                answered += 1;
            }
            if wr.write_all(&out).await.is_err() || answered == max_answers {
                // Hang up: dropping both halves closes the pipe.
                return batches;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            buf.reserve(4096);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return batches,
                Ok(_) => {}
            }
        }
    }

    /// A write half that counts its writes.
    struct Counted<W> {
        inner: W,
        writes: Arc<AtomicUsize>,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<W> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A connection over an in-memory pipe of `pipe` bytes to an [`echo`] server.
    fn pair(
        pipe: usize,
        limit: usize,
        reverse: bool,
        max_answers: usize,
        pause: Duration,
    ) -> (Conn, Arc<AtomicUsize>, tokio::task::JoinHandle<Vec<usize>>) {
        let (client, server) = tokio::io::duplex(pipe);
        let (crd, cwr) = tokio::io::split(client);
        let (srd, swr) = tokio::io::split(server);
        let writes = Arc::new(AtomicUsize::new(0));
        let counted = Counted {
            inner: cwr,
            writes: writes.clone(),
        };
        let conn = Conn::over(addr(), crd, counted, limit);
        let server = tokio::spawn(echo(srd, swr, reverse, max_answers, pause));
        (conn, writes, server)
    }

    /// `n` concurrent puts whose revision is their number: each gets its own answer.
    async fn every_call_answered(conn: &Conn, n: u64) {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..n {
            let c = conn.clone();
            calls.spawn(async move { (i, c.call(put(i)).await) });
        }
        while let Some(r) = calls.join_next().await {
            let (i, r) = r.unwrap();
            assert_eq!(revision(r.unwrap()), i);
        }
    }

    #[tokio::test]
    async fn concurrent_calls_each_get_their_own_answer() {
        let (conn, _, _server) = pair(1 << 16, MAX_PENDING, true, usize::MAX, Duration::ZERO);
        every_call_answered(&conn, 300).await;
    }

    #[tokio::test]
    async fn requests_queued_together_share_a_write() {
        let (conn, writes, server) = pair(1 << 20, MAX_PENDING, false, usize::MAX, Duration::ZERO);
        // On this (current-thread) runtime every call queues before the writer runs.
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..200u64 {
            let c = conn.clone();
            calls.spawn(async move { revision(c.call(put(n)).await.unwrap()) == n });
        }
        while let Some(ok) = calls.join_next().await {
            assert!(ok.unwrap());
        }
        let w = writes.load(Ordering::Relaxed);
        assert!(w <= 2, "{w} writes for 200 requests queued together");
        drop(conn);
        let batches = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server sees the end once the last clone is dropped")
            .unwrap();
        assert_eq!(batches.iter().sum::<usize>(), 200);
    }

    #[tokio::test]
    async fn a_slow_peer_and_a_full_send_buffer_lose_nothing() {
        // 1 KiB of queued requests at most, a 100-byte pipe, a server that naps per read.
        let (conn, _, _server) = pair(100, 1024, true, usize::MAX, Duration::from_millis(1));
        every_call_answered(&conn, 500).await;
    }

    #[tokio::test]
    async fn a_connection_closed_mid_batch_fails_the_waiting_calls() {
        let (conn, _, server) = pair(1 << 16, MAX_PENDING, false, 10, Duration::ZERO);
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..50u64 {
            let c = conn.clone();
            calls.spawn(async move { (n, c.call(put(n)).await) });
        }
        let (mut answered, mut lost) = (0, 0);
        while let Some(r) = calls.join_next().await {
            match r.unwrap() {
                (n, Ok(r)) => {
                    assert_eq!(revision(r), n);
                    answered += 1;
                }
                (_, Err(ClientError::ConnectionLost(_))) => lost += 1,
                (_, Err(e)) => panic!("unexpected {e}"),
            }
        }
        assert_eq!((answered, lost), (10, 40));
        server.await.unwrap();
        assert!(conn.is_closed());
        assert!(matches!(
            conn.call(put(1)).await,
            Err(ClientError::ConnectionLost(_))
        ));
    }
}
