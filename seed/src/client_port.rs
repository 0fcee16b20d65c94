//! The client port: length-prefixed `clientpb` frames, many requests in flight per
//! connection (each answered when ready, matched by its id).
//!
//! A frame that is oversized or does not decode gets one error response (id 0) and the
//! connection is closed; other connections are unaffected.
//!
//! # Where answers are finished
//! A request answered at once (a lease read) is answered by the reader. One that waits (a
//! write, a ReadIndex read) becomes an [`Answer`], polled where it is woken: a shard thread
//! that applied the write finishes it at the end of its round (`harpoon::round`), queues the
//! response on the connection's [`Outbox`] and, once per round and connection, writes the
//! queued responses itself if the connection's writer is idle (it lends the socket then).
//! A lone write's answer thus costs no wake-up of a runtime worker. Wakes from anywhere else
//! poll the answer as a runtime task.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use harpoon::ReadConsistency;
use meta::ops;
use parking_lot::Mutex;
use proto::clientpb::{
    ClientError, ClientError_Code, ClientRequest, ClientRequest_oneof_kind, ClientResponse,
    GetReply, PutReply,
};
use proto::frame::{self, FrameDecoder, FrameError};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::kv_port::RouteCache;
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

/// Bytes of framed responses queued on one connection before answering requests wait for
/// the writer (a client that does not read cannot make a node buffer without bound).
pub const MAX_PENDING: usize = 4 << 20;

/// Serve one client connection.
///
/// One reader (this task) decodes every whole frame a read returned and starts each request:
/// one answered at once (a lease read) is queued right here, one that waits becomes an
/// [`Answer`] (finished where it is woken). Each answer is framed into the connection's
/// [`Outbox`] by whoever made it; the writer task writes everything queued with one syscall,
/// or a shard thread does while the writer is idle.
pub async fn serve(seed: Arc<Seed>, s: TcpStream, from: SocketAddr) {
    let stream = Arc::new(s);
    let outbox = Arc::new(Outbox::new(MAX_PENDING));
    let producer = Producer::new(outbox.clone());
    let routes = Arc::new(RouteCache::default());
    let rt = Handle::current();
    let writer = tokio::spawn(write_loop(
        outbox,
        SharedWrite(stream.clone()),
        Some(stream.clone()),
    ));
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut dec = FrameDecoder::new(MAX_FRAME);
    'read: loop {
        loop {
            let payload = match dec.decode(&mut buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    bad_frame(&seed, &producer, from, e).await;
                    break 'read;
                }
            };
            let req: ClientRequest = match frame::decode_message(&payload) {
                Ok(r) => r,
                Err(e) => {
                    seed.counters
                        .client_bad_frames
                        .fetch_add(1, Ordering::Relaxed);
                    let resp = error(
                        0,
                        ClientError_Code::INVALID_ARGUMENT,
                        format!("bad request: {e}"),
                    );
                    producer.push(&resp).await;
                    break 'read;
                }
            };
            seed.counters
                .client_requests
                .fetch_add(1, Ordering::Relaxed);
            let (seed, routes) = (seed.clone(), routes.clone());
            let id = req.id;
            let mut answer: AnswerFuture =
                Box::pin(async move { handle(&seed, &routes, req).await });
            // Most reads are answered without waiting (a lease read on the leader): answer
            // those here; a request that waits (a write, a ReadIndex) becomes an `Answer`,
            // polled again with its own waker, wherever that is woken.
            let polled = answer
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()));
            let ready = match polled {
                Poll::Ready(resp) => Some(resp),
                Poll::Pending => Answer::new(id, answer, producer.clone(), rt.clone()).poll_once(),
            };
            if let Some(resp) = ready {
                producer.push(&resp).await;
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        match read_some(&stream, &mut buf).await {
            Ok(0) => {
                if let Err(e) = dec.decode_eof(&mut buf) {
                    bad_frame(&seed, &producer, from, e).await;
                }
                break;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%from, error = %e, "client connection read failed");
                break;
            }
        }
    }
    // The writer ends once every answer still being made has been written.
    drop(producer);
    let _ = writer.await;
}

/// Bytes a read asks for at least.
const READ_CHUNK: usize = 16 << 10;

/// A frame that is oversized or cut: one error response (id 0), then the connection closes.
async fn bad_frame(seed: &Seed, out: &Producer, from: SocketAddr, e: FrameError) {
    seed.counters
        .client_bad_frames
        .fetch_add(1, Ordering::Relaxed);
    let code = match e {
        FrameError::TooLarge { .. } => ClientError_Code::TOO_LARGE,
        _ => ClientError_Code::INVALID_ARGUMENT,
    };
    tracing::debug!(%from, error = %e, "bad client frame; closing");
    out.push(&error(0, code, format!("bad frame: {e}"))).await;
}

/// Framed responses waiting to be written to one connection, in the order they were pushed.
///
/// Tasks that answer requests append their frame to one buffer (no allocation per response
/// once the buffer has grown); the writer swaps the buffer for its spare and writes it with
/// one syscall, so every answer that became ready while the previous write ran goes out
/// together. At most `limit` bytes wait: a push beyond that waits for the writer.
///
/// While the writer is idle it lends its socket (`OutState::direct`): a shard thread that
/// queued responses writes them itself at the end of its round ([`Outbox::flush_direct`]).
/// The writer takes the socket back, under the lock, before it writes anything; a direct
/// write happens entirely under the lock, so the two never interleave bytes.
#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    /// Wakes the writer: something was queued, or the last producer left.
    ready: Notify,
    /// Wakes pushers waiting for room (the writer took the buffer, or it failed).
    room: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct OutState {
    buf: Vec<u8>,
    /// Live [`Producer`]s: the writer ends when none is left and the buffer is written.
    producers: usize,
    /// The connection failed: pushes are dropped.
    failed: bool,
    /// The socket, lent by the idle writer to direct writes.
    direct: Option<Arc<TcpStream>>,
}

impl Outbox {
    pub(crate) fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(OutState::default()),
            ready: Notify::new(),
            room: Notify::new(),
            limit,
        }
    }

    /// Wait for queued frames and swap them into `out` (which must be empty). `false` when
    /// nothing is queued and no producer is left (or the connection failed). While it waits,
    /// `lend` (the socket the writer writes to) is lent to direct writes.
    pub(crate) async fn take(&self, out: &mut Vec<u8>, lend: Option<&Arc<TcpStream>>) -> bool {
        loop {
            {
                let mut st = self.state.lock();
                st.direct = None;
                if st.failed {
                    return false;
                }
                if !st.buf.is_empty() {
                    std::mem::swap(&mut st.buf, out);
                    drop(st);
                    self.room.notify_waiters();
                    return true;
                }
                if st.producers == 0 {
                    return false;
                }
                st.direct = lend.cloned();
            }
            // A push between the unlock and here stored a permit: this returns at once.
            self.ready.notified().await;
        }
    }

    /// The connection cannot be written: wake and drop every push.
    pub(crate) fn fail(&self) {
        {
            let mut st = self.state.lock();
            st.failed = true;
            st.direct = None;
        }
        self.room.notify_waiters();
    }

    /// Get what was queued written: at the end of this shard round if this is a shard thread
    /// (by [`Outbox::flush_direct`], once for everything queued this round), else by waking
    /// the writer.
    fn flush_soon(self: &Arc<Self>) {
        let me = self.clone();
        if harpoon::round::defer(move || me.flush_direct()).is_err() {
            self.ready.notify_one();
        }
    }

    /// Write the queued frames to the lent socket from this thread; if the writer has not
    /// lent it (it is writing), or the socket takes only part, the writer is woken for the
    /// rest.
    fn flush_direct(&self) {
        let mut st = self.state.lock();
        if st.buf.is_empty() {
            return;
        }
        let written = match st.direct.as_ref().map(|s| s.try_write(&st.buf)) {
            Some(Ok(n)) => n,
            // Not lent, would block, or failed: the writer writes (and meets any error).
            _ => 0,
        };
        if written == st.buf.len() {
            st.buf.clear();
            drop(st);
            self.room.notify_waiters();
            return;
        }
        // The writer takes the rest (the tail of a frame first) and owns the socket again.
        st.buf.drain(..written);
        st.direct = None;
        drop(st);
        self.ready.notify_one();
    }
}

/// A handle that queues responses on an [`Outbox`]; the writer ends after the last one is
/// dropped and everything queued is written.
#[derive(Debug)]
pub(crate) struct Producer(Arc<Outbox>);

impl Producer {
    pub(crate) fn new(outbox: Arc<Outbox>) -> Self {
        outbox.state.lock().producers += 1;
        Producer(outbox)
    }

    /// Queue `r`'s frame (a response too large for a frame is answered `TOO_LARGE`); waits
    /// while the outbox is full. `false` if the connection failed (the response is dropped).
    pub(crate) async fn push(&self, r: &ClientResponse) -> bool {
        let ob = &*self.0;
        loop {
            let room = ob.room.notified();
            tokio::pin!(room);
            {
                let mut st = ob.state.lock();
                if st.failed {
                    return false;
                }
                if st.buf.len() < ob.limit {
                    let was_empty = st.buf.is_empty();
                    encode_response(r, &mut st.buf);
                    drop(st);
                    if was_empty {
                        ob.ready.notify_one();
                    }
                    return true;
                }
                // Registered before the unlock: a take after it wakes this.
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// Queue `r`'s frame without waiting and get it written ([`Outbox::flush_soon`]).
    /// `false` if the outbox is full: nothing was queued, push with [`Producer::push`].
    /// A response to a failed connection is dropped (`true`).
    fn push_now(&self, r: &ClientResponse) -> bool {
        let ob = &self.0;
        let mut st = ob.state.lock();
        if st.failed {
            return true;
        }
        if st.buf.len() >= ob.limit {
            return false;
        }
        // A non-empty buffer already has its flush (or writer wake-up) coming.
        let was_empty = st.buf.is_empty();
        encode_response(r, &mut st.buf);
        drop(st);
        if was_empty {
            ob.flush_soon();
        }
        true
    }
}

impl Clone for Producer {
    fn clone(&self) -> Self {
        Producer::new(self.0.clone())
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let last = {
            let mut st = self.0.state.lock();
            st.producers -= 1;
            st.producers == 0
        };
        if last {
            self.0.ready.notify_one();
        }
    }
}

/// A request's answer, still being made.
type AnswerFuture = Pin<Box<dyn Future<Output = ClientResponse> + Send>>;

/// A request whose answer was not ready at once, polled where it is woken: on a shard thread
/// at the end of that round (`harpoon::round::defer`), so the response of a write goes out
/// from the thread that applied it; anywhere else as a runtime task. It is its own waker.
struct Answer {
    /// The request's id (for the error answered if making the answer panics).
    id: u64,
    /// `None` once answered.
    fut: Mutex<Option<AnswerFuture>>,
    /// A poll is queued: wakes meanwhile add nothing.
    queued: AtomicBool,
    out: Producer,
    rt: Handle,
}

impl std::task::Wake for Answer {
    fn wake(self: Arc<Self>) {
        self.schedule();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.clone().schedule();
    }
}

impl Answer {
    fn new(id: u64, fut: AnswerFuture, out: Producer, rt: Handle) -> Arc<Self> {
        Arc::new(Answer {
            id,
            fut: Mutex::new(Some(fut)),
            queued: AtomicBool::new(false),
            out,
            rt,
        })
    }

    /// Queue one poll: at the end of this round on a shard thread, else as a runtime task.
    fn schedule(self: Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        if let Err(run) = harpoon::round::defer(move || me.run()) {
            self.rt.spawn(async move { run() });
        }
    }

    /// Poll, and queue the response if that made it.
    fn run(self: &Arc<Self>) {
        if let Some(resp) = self.poll_once() {
            if !self.out.push_now(&resp) {
                let out = self.out.clone();
                self.rt.spawn(async move {
                    out.push(&resp).await;
                });
            }
        }
    }

    /// Poll the answer once (inside the runtime's context, wherever this thread is); its
    /// response if that made it. A panic while making it answers `INTERNAL`.
    fn poll_once(self: &Arc<Self>) -> Option<ClientResponse> {
        self.queued.store(false, Ordering::Release);
        let _rt = self.rt.enter();
        let waker = Waker::from(self.clone());
        let mut slot = self.fut.lock();
        let fut = slot.as_mut()?;
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fut.as_mut().poll(&mut Context::from_waker(&waker))
        }));
        let resp = match polled {
            Ok(Poll::Pending) => return None,
            Ok(Poll::Ready(resp)) => resp,
            Err(_) => {
                tracing::error!(id = self.id, "answering a client request panicked");
                error(
                    self.id,
                    ClientError_Code::INTERNAL,
                    "the node failed while answering",
                )
            }
        };
        *slot = None;
        Some(resp)
    }
}

/// Append `r` as a frame; one too large for a frame becomes a `TOO_LARGE` error for its id.
fn encode_response(r: &ClientResponse, out: &mut Vec<u8>) {
    if frame::encode_message(r, MAX_FRAME, out).is_err() {
        let e = error(r.id, ClientError_Code::TOO_LARGE, "response too large");
        // A short error always fits; nothing is written if it somehow did not.
        let _ = frame::encode_message(&e, MAX_FRAME, out);
    }
}

/// The writer of one connection: waits for queued frames, lets the other ready tasks queue
/// theirs (one yield), then writes them all with one `write_all`. Ends when every producer
/// is gone and everything is written, or on a write error; then shuts the write half. While
/// it waits, `lend` (the socket behind `wr`) is lent to direct writes ([`Outbox`]).
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    outbox: Arc<Outbox>,
    mut wr: W,
    lend: Option<Arc<TcpStream>>,
) {
    let mut out = Vec::with_capacity(READ_CHUNK);
    loop {
        // Answers finishing on this wake-up (other handler tasks already runnable) join the
        // write instead of costing a syscall each.
        tokio::task::yield_now().await;
        if !outbox.take(&mut out, lend.as_ref()).await {
            break;
        }
        if wr.write_all(&out).await.is_err() {
            outbox.fail();
            break;
        }
        out.clear();
        // Keep a spare of modest size: one huge answer does not pin its buffer forever.
        if out.capacity() > MAX_PENDING {
            out = Vec::with_capacity(READ_CHUNK);
        }
    }
    let _ = wr.shutdown().await;
}

/// The write side of a client connection whose socket is shared with direct writes
/// ([`Outbox`]). Shutting it down does nothing: the socket closes when its last holder (the
/// reader, after the writer) drops it.
pub(crate) struct SharedWrite(pub(crate) Arc<TcpStream>);

impl AsyncWrite for SharedWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            if let Err(e) = std::task::ready!(self.0.poll_write_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            match self.0.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Read what the socket has into `buf` (waiting until it has something); 0 at its end.
async fn read_some(s: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
}

async fn handle(seed: &Arc<Seed>, routes: &RouteCache, req: ClientRequest) -> ClientResponse {
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
        Some(ClientRequest_oneof_kind::kv(k)) => {
            return crate::kv_port::kv(seed, routes, id, k).await
        }
        Some(ClientRequest_oneof_kind::watch(w)) => {
            return crate::watch_port::watch(seed, id, w).await
        }
        None => return error(id, ClientError_Code::INVALID_ARGUMENT, "empty request"),
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn resp(id: u64, value_len: usize) -> ClientResponse {
        let mut r = ClientResponse::new();
        r.id = id;
        let mut g = GetReply::new();
        g.found = true;
        g.value = vec![id as u8; value_len].into();
        r.set_get(g);
        r
    }

    /// Every frame in `bytes`, decoded; panics on a torn or undecodable frame.
    fn decode_all(bytes: &[u8]) -> Vec<ClientResponse> {
        let mut buf = BytesMut::from(bytes);
        let mut dec = FrameDecoder::new(MAX_FRAME);
        let mut out = Vec::new();
        while let Some(p) = dec.decode(&mut buf).expect("frame") {
            out.push(frame::decode_message(&p).expect("response"));
        }
        assert!(buf.is_empty(), "a torn frame at the end");
        out
    }

    /// A writer into memory that counts its writes.
    #[derive(Default)]
    struct Counting {
        data: Vec<u8>,
        writes: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            self.data.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn queued_responses_go_out_in_one_write_and_decode_in_order() {
        let ob = Arc::new(Outbox::new(MAX_PENDING));
        let p = Producer::new(ob.clone());
        for id in 1..=500 {
            assert!(p.push(&resp(id, 100)).await);
        }
        drop(p);
        let mut w = Counting::default();
        write_loop(ob, &mut w, None).await;
        assert_eq!(w.writes, 1, "500 queued answers, one write");
        let ids: Vec<u64> = decode_all(&w.data).iter().map(|r| r.id).collect();
        assert_eq!(ids, (1..=500).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn answers_ready_on_one_wake_up_share_a_write() {
        // Tasks that finish together (all runnable when the writer wakes) queue before it
        // takes the buffer: one write, not one per answer.
        let ob = Arc::new(Outbox::new(MAX_PENDING));
        let p = Producer::new(ob.clone());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for id in 1..=64 {
            let (p, mut rx) = (p.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                let _ = rx.wait_for(|go| *go).await;
                assert!(p.push(&resp(id, 10)).await);
            }));
        }
        drop(p);
        let writer = tokio::spawn(async move {
            let mut w = Counting::default();
            write_loop(ob, &mut w, None).await;
            w
        });
        tokio::task::yield_now().await;
        tx.send(true).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let w = writer.await.unwrap();
        let mut ids: Vec<u64> = decode_all(&w.data).iter().map(|r| r.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=64).collect::<Vec<_>>());
        assert!(
            w.writes <= 2,
            "{} writes for 64 answers ready together",
            w.writes
        );
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_answer_in_order_and_the_outbox_stays_bounded() {
        let limit = 2048;
        let ob = Arc::new(Outbox::new(limit));
        let p = Producer::new(ob.clone());
        // A pipe of 64 bytes: the writer blocks almost at once.
        let (client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(write_loop(ob.clone(), server, None));
        let pusher = tokio::spawn(async move {
            for id in 1..=2000 {
                assert!(p.push(&resp(id, 50)).await);
            }
        });
        let one_frame = {
            let mut v = Vec::new();
            encode_response(&resp(2000, 50), &mut v);
            v.len()
        };
        let mut client = client;
        let mut got = Vec::new();
        let mut chunk = [0u8; 37];
        loop {
            let queued = ob.state.lock().buf.len();
            assert!(queued < limit + one_frame, "{queued} bytes queued");
            let n = client.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() % 5 == 0 {
                tokio::task::yield_now().await;
            }
        }
        pusher.await.unwrap();
        writer.await.unwrap();
        let ids: Vec<u64> = decode_all(&got).iter().map(|r| r.id).collect();
        assert_eq!(ids, (1..=2000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_connection_closed_mid_batch_ends_cleanly() {
        let ob = Arc::new(Outbox::new(1024));
        let p = Producer::new(ob.clone());
        let (mut client, server) = tokio::io::duplex(256);
        let writer = tokio::spawn(write_loop(ob.clone(), server, None));
        let pusher = tokio::spawn(async move {
            let mut accepted = 0u64;
            for id in 1..=10_000 {
                if !p.push(&resp(id, 64)).await {
                    break;
                }
                accepted += 1;
            }
            accepted
        });
        // Read part of the stream, then hang up mid-frame.
        let mut first = vec![0u8; 1000];
        client.read_exact(&mut first).await.unwrap();
        drop(client);
        let deadline = Duration::from_secs(10);
        let accepted = tokio::time::timeout(deadline, pusher)
            .await
            .expect("pushes end once the connection failed")
            .unwrap();
        assert!(accepted < 10_000, "pushes after the failure are refused");
        tokio::time::timeout(deadline, writer)
            .await
            .expect("the writer ends")
            .unwrap();
        // A push after the end is refused, not queued.
        let late = Producer::new(ob.clone());
        assert!(!late.push(&resp(1, 1)).await);
    }

    #[tokio::test]
    async fn the_writer_ends_when_the_last_producer_leaves() {
        let ob = Arc::new(Outbox::new(MAX_PENDING));
        let p = Producer::new(ob.clone());
        let p2 = p.clone();
        let writer = tokio::spawn(async move {
            let mut w = Counting::default();
            write_loop(ob, &mut w, None).await;
            w
        });
        assert!(p.push(&resp(1, 1)).await);
        drop(p);
        tokio::task::yield_now().await;
        assert!(!writer.is_finished(), "one producer is left");
        assert!(p2.push(&resp(2, 1)).await);
        drop(p2);
        let w = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends")
            .unwrap();
        let ids: Vec<u64> = decode_all(&w.data).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2]);
    }

    /// A connected pair on 127.0.0.1: the server side as the client port holds it, the
    /// client side as a plain non-blocking std socket, so a test can look at what arrived
    /// without letting the runtime run.
    fn tcp_pair() -> (Arc<TcpStream>, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client.set_nonblocking(true).unwrap();
        (Arc::new(TcpStream::from_std(server).unwrap()), client)
    }

    /// Whatever the socket has now (no waiting).
    fn read_now(c: &mut std::net::TcpStream) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match c.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        out
    }

    /// Read until `want` responses decoded, polling for up to 10 s.
    async fn read_responses(c: &mut std::net::TcpStream, want: usize) -> Vec<ClientResponse> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            got.extend(read_now(c));
            let mut buf = BytesMut::from(&got[..]);
            let mut dec = FrameDecoder::new(MAX_FRAME);
            let mut n = 0;
            while dec.decode(&mut buf).expect("frame").is_some() {
                n += 1;
            }
            if n >= want {
                return decode_all(&got);
            }
            assert!(Instant::now() < deadline, "{n} of {want} responses arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// An answer waiting on a oneshot, first polled as the reader does.
    fn waiting_answer(id: u64, p: &Producer) -> tokio::sync::oneshot::Sender<ClientResponse> {
        let (tx, rx) = tokio::sync::oneshot::channel::<ClientResponse>();
        let fut: AnswerFuture = Box::pin(async move { rx.await.expect("answer") });
        let a = Answer::new(id, fut, p.clone(), Handle::current());
        assert!(a.poll_once().is_none(), "waits for its oneshot");
        tx
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_woken_on_a_shard_thread_are_written_by_it() {
        let (server, mut client) = tcp_pair();
        let ob = Arc::new(Outbox::new(MAX_PENDING));
        let p = Producer::new(ob.clone());
        let writer = tokio::spawn(write_loop(
            ob.clone(),
            SharedWrite(server.clone()),
            Some(server.clone()),
        ));
        // Let the writer reach its wait (and lend the socket).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            ob.state.lock().direct.is_some(),
            "the idle writer lends its socket"
        );
        let txs: Vec<_> = (1..=50).map(|id| waiting_answer(id, &p)).collect();
        // One shard round answers all of them. This runtime has one thread, blocked in the
        // join below: the writer task cannot run, so whatever arrives was written by the
        // shard thread.
        harpoon::round::run_as_shard_thread(move || {
            for (i, tx) in txs.into_iter().enumerate() {
                tx.send(resp(i as u64 + 1, 10)).unwrap();
            }
        });
        let mut ids: Vec<u64> = decode_all(&read_now(&mut client))
            .iter()
            .map(|r| r.id)
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>());
        drop(p);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends")
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_shard_thread_wakes_a_busy_writer_instead_of_writing() {
        let (server, mut client) = tcp_pair();
        let ob = Arc::new(Outbox::new(MAX_PENDING));
        let p = Producer::new(ob.clone());
        let tx = waiting_answer(7, &p);
        // No writer has lent the socket yet (it is not even started).
        harpoon::round::run_as_shard_thread(move || tx.send(resp(7, 10)).unwrap());
        assert!(read_now(&mut client).is_empty(), "nothing written directly");
        let writer = tokio::spawn(write_loop(
            ob.clone(),
            SharedWrite(server.clone()),
            Some(server.clone()),
        ));
        let got = read_responses(&mut client, 1).await;
        assert_eq!(got[0].id, 7);
        drop(p);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_woken_elsewhere_are_finished_as_tasks() {
        let (server, mut client) = tcp_pair();
        let ob = Arc::new(Outbox::new(MAX_PENDING));
        let p = Producer::new(ob.clone());
        let writer = tokio::spawn(write_loop(
            ob.clone(),
            SharedWrite(server.clone()),
            Some(server.clone()),
        ));
        let txs: Vec<_> = (1..=20).map(|id| waiting_answer(id, &p)).collect();
        // A plain thread (not a shard's) answers.
        std::thread::spawn(move || {
            for (i, tx) in txs.into_iter().enumerate() {
                tx.send(resp(i as u64 + 1, 10)).unwrap();
            }
        })
        .join()
        .unwrap();
        let mut ids: Vec<u64> = read_responses(&mut client, 20)
            .await
            .iter()
            .map(|r| r.id)
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=20).collect::<Vec<_>>());
        drop(p);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_that_panics_is_answered_internal() {
        let (server, mut client) = tcp_pair();
        let ob = Arc::new(Outbox::new(MAX_PENDING));
        let p = Producer::new(ob.clone());
        let writer = tokio::spawn(write_loop(
            ob.clone(),
            SharedWrite(server.clone()),
            Some(server.clone()),
        ));
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let fut: AnswerFuture = Box::pin(async move {
            let _ = rx.await;
            panic!("a handler bug");
        });
        let a = Answer::new(9, fut, p.clone(), Handle::current());
        assert!(a.poll_once().is_none());
        drop(a);
        harpoon::round::run_as_shard_thread(move || tx.send(1).unwrap());
        let got = read_responses(&mut client, 1).await;
        assert_eq!(got[0].id, 9);
        assert_eq!(got[0].get_error().code, ClientError_Code::INTERNAL);
        drop(p);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends")
            .unwrap();
    }

    #[test]
    fn a_response_too_large_for_a_frame_becomes_too_large() {
        let mut out = Vec::new();
        encode_response(&resp(7, MAX_FRAME + 1), &mut out);
        let r = decode_all(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, 7);
        assert_eq!(r[0].get_error().code, ClientError_Code::TOO_LARGE);
    }
}
