//! The KV client's routing and retry rules against scripted fake nodes on 127.0.0.1 (real
//! TCP, the real frame codec): a write whose answer is lost is resent with the same request
//! id (a batch whole, to the range it went to, also after a split separated its keys);
//! `UnknownOutcome` only when the budget runs out or the id expired; NOT_LEADER and
//! WRONG_RANGE back off and are bounded by the timeout, not a hop count; a newer descriptor in
//! WRONG_RANGE replaces the cached one; follower reads go round robin and report where and at
//! which applied index they were served; scans stream page by page across ranges.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use client::{Client, ClientError, ReadMode};
use parking_lot::Mutex;
use proto::clientpb::{
    ClientError as WireError, ClientError_Code, ClientRequest, ClientRequest_oneof_kind,
    ClientResponse, ClientResponse_oneof_kind as Kind, KvReply, KvRequest, LookupReply,
};
use proto::frame::{self, FrameDecoder};
use proto::kvpb::{self, Command_oneof_op as Op};
use proto::metapb::{CollectionDescriptor, Member, RangeDescriptor};
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PREFIX: &[u8] = b"c/";

/// What a fake node does with one request.
enum Action {
    Reply(Box<Kind>),
    /// Close the connection without answering (a crash after the request arrived).
    Drop,
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    kv: Option<(KvRequest, kvpb::Command)>,
}

type Handler = Arc<dyn Fn(usize, &ClientRequest) -> Action + Send + Sync>;

struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    fn kvs(&self) -> Vec<(KvRequest, kvpb::Command)> {
        self.seen
            .lock()
            .iter()
            .filter_map(|s| s.kv.clone())
            .collect()
    }
    fn lookups(&self) -> usize {
        self.seen.lock().iter().filter(|s| s.kv.is_none()).count()
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

fn serve(l: TcpListener, handler: Handler) -> Fake {
    let addr = l.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let (h, seen) = (handler.clone(), s2.clone());
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let mut dec = FrameDecoder::new(1 << 20);
                loop {
                    while let Ok(Some(p)) = dec.decode(&mut buf) {
                        let req: ClientRequest = frame::decode_message(&p).expect("request");
                        let kv = match &req.kind {
                            Some(ClientRequest_oneof_kind::kv(k)) => Some((
                                k.clone(),
                                kvpb::Command::parse_from_carllerche_bytes(&k.command)
                                    .expect("command"),
                            )),
                            _ => None,
                        };
                        let n = {
                            let mut s = seen.lock();
                            s.push(Seen {
                                at: Instant::now(),
                                kv,
                            });
                            s.len() - 1
                        };
                        match h(n, &req) {
                            Action::Drop => return,
                            Action::Reply(kind) => {
                                let mut r = ClientResponse::new();
                                r.id = req.id;
                                r.kind = Some(*kind);
                                let mut out = Vec::new();
                                frame::encode_message(&r, 1 << 20, &mut out).expect("encode");
                                if sock.write_all(&out).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    match sock.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    Fake { addr, seen }
}

fn collection() -> CollectionDescriptor {
    let mut c = CollectionDescriptor::new();
    c.id = 1;
    c.name = "c".into();
    c.prefix = Bytes::from_static(PREFIX);
    c
}

fn range(id: u64, lo: &[u8], hi: &[u8], epoch: u64, members: &[SocketAddr]) -> RangeDescriptor {
    let mut r = RangeDescriptor::new();
    r.id = id;
    r.collection = 1;
    r.lo = Bytes::copy_from_slice(lo);
    r.hi = Bytes::copy_from_slice(hi);
    r.epoch = epoch;
    for (i, a) in members.iter().enumerate() {
        let mut m = Member::new();
        m.node = i as u64 + 1;
        m.client_addr = a.to_string();
        r.members.push(m);
    }
    r
}

fn lookup_reply(r: RangeDescriptor) -> Action {
    let mut l = LookupReply::new();
    l.set_collection(collection());
    l.set_range(r);
    Action::Reply(Box::new(Kind::lookup(l)))
}

fn kv_reply(resp: &kvpb::Response) -> Action {
    let mut k = KvReply::new();
    k.response = resp.write_to_bytes().expect("encode").into();
    Action::Reply(Box::new(Kind::kv(k)))
}

fn put_ok(revision: u64) -> Action {
    let mut r = kvpb::Response::new();
    r.mut_header().revision = revision;
    r.set_put(kvpb::PutResult::new());
    kv_reply(&r)
}

fn delete_ok(revision: u64, deleted: u64) -> Action {
    let mut r = kvpb::Response::new();
    r.mut_header().revision = revision;
    let mut d = kvpb::DeleteResult::new();
    d.deleted = deleted;
    r.set_delete(d);
    kv_reply(&r)
}

/// The command a kv request carries.
fn command(k: &KvRequest) -> kvpb::Command {
    kvpb::Command::parse_from_carllerche_bytes(&k.command).expect("command")
}

fn wire_error(code: ClientError_Code, hint: &str, range: Option<RangeDescriptor>) -> Action {
    let mut e = WireError::new();
    e.code = code;
    e.message = format!("{code:?}");
    e.leader_hint = hint.to_string();
    if let Some(r) = range {
        e.set_range(r);
    }
    Action::Reply(Box::new(Kind::error(e)))
}

fn is_lookup(req: &ClientRequest) -> bool {
    matches!(req.kind, Some(ClientRequest_oneof_kind::lookup(_)))
}

fn client(seeds: &[SocketAddr], timeout_ms: u64) -> Client {
    Client::new(seeds.to_vec(), Duration::from_millis(timeout_ms)).expect("client")
}

/// A one-range collection on `members`, the first of which answers lookups and kv requests
/// with `kv(n_kv_requests_before, request)`.
async fn one_node(kv: impl Fn(usize, &KvRequest) -> Action + Send + Sync + 'static) -> Fake {
    let l = bind().await;
    let me = l.local_addr().expect("addr");
    let n = Arc::new(Mutex::new(0usize));
    serve(
        l,
        Arc::new(move |_, req| match &req.kind {
            Some(ClientRequest_oneof_kind::kv(k)) => {
                let i = {
                    let mut n = n.lock();
                    *n += 1;
                    *n - 1
                };
                kv(i, k)
            }
            _ => lookup_reply(range(1, b"c/", b"c0", 1, &[me])),
        }),
    )
}

fn ids(f: &Fake) -> Vec<(u64, u64, u64, u32)> {
    f.kvs()
        .iter()
        .map(|(_, c)| {
            let id = c.get_request_id();
            (id.client, id.seq, id.first_incomplete, id.attempt)
        })
        .collect()
}

#[tokio::test]
async fn a_lost_answer_is_resent_with_the_same_request_id() {
    let f = one_node(|n, k| match n {
        0 => Action::Drop,
        _ if command(k).has_delete() => delete_ok(7, 1),
        _ => put_ok(7),
    })
    .await;
    let c = client(&[f.addr], 5_000);
    assert_eq!(c.kv("c").put(b"k", b"v").await, Ok(7));
    let id = c.client_id();
    assert_ne!(id, 0);
    assert_eq!(ids(&f), vec![(id, 1, 1, 0), (id, 1, 1, 1)]);
    assert_eq!(c.resent_writes(), 1);
    // The next write has the next seq; every write carries an id.
    assert_eq!(c.kv("c").delete(b"k").await, Ok(true));
    c.kv("c")
        .cas(b"k", client::Expect::Absent, Some(b"v"))
        .await
        .expect_err("the fake answers a put result to a cas");
    let seqs: Vec<u64> = ids(&f).iter().map(|i| i.1).collect();
    assert_eq!(seqs, vec![1, 1, 2, 3]);
    // Reads carry none.
    let g = one_node(|_, _| {
        let mut r = kvpb::Response::new();
        r.set_get(kvpb::GetResult::new());
        kv_reply(&r)
    })
    .await;
    let c = client(&[g.addr], 5_000);
    assert_eq!(c.kv("c").get(b"k").await, Ok(None));
    assert!(!g.kvs()[0].1.has_request_id());
}

#[tokio::test]
async fn a_delete_is_answered_by_its_delete_result_only() {
    let f = one_node(|_, _| delete_ok(3, 0)).await;
    let c = client(&[f.addr], 5_000);
    assert_eq!(c.kv("c").delete(b"k").await, Ok(false));
    // Another kind of result, or none (an async-mode ack), is not "did not exist".
    let f = one_node(|_, _| put_ok(4)).await;
    let c = client(&[f.addr], 5_000);
    assert!(matches!(
        c.kv("c").delete(b"k").await,
        Err(ClientError::Protocol(_))
    ));
    let f = one_node(|_, _| kv_reply(&kvpb::Response::new())).await;
    let c = client(&[f.addr], 5_000);
    assert!(matches!(
        c.kv("c").delete(b"k").await,
        Err(ClientError::Protocol(_))
    ));
}

#[tokio::test]
async fn unknown_outcome_only_when_the_budget_runs_out() {
    let f = one_node(|_, _| Action::Drop).await;
    let c = client(&[f.addr], 1_000);
    let t = Instant::now();
    match c.kv("c").put(b"k", b"v").await {
        Err(ClientError::UnknownOutcome(m)) => assert!(m.contains("retried"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let sent = ids(&f);
    assert!(sent.len() >= 3, "{sent:?}");
    for (i, s) in sent.iter().enumerate() {
        assert_eq!((s.1, s.3), (1, i as u32), "same seq, counted attempts");
    }
}

#[tokio::test]
async fn unknown_outcome_from_a_node_is_resent_to_the_new_leader() {
    let lb = bind().await;
    let b_addr = lb.local_addr().expect("addr");
    let b = serve(lb, Arc::new(|_, _| put_ok(9)));
    let la = bind().await;
    let a_addr = la.local_addr().expect("addr");
    let a = serve(
        la,
        Arc::new(move |n, req| {
            if is_lookup(req) {
                return lookup_reply(range(1, b"c/", b"c0", 1, &[a_addr, b_addr]));
            }
            if n <= 1 {
                wire_error(ClientError_Code::UNKNOWN_OUTCOME, "", None)
            } else {
                wire_error(ClientError_Code::NOT_LEADER, &b_addr.to_string(), None)
            }
        }),
    );
    let c = client(&[a.addr], 5_000);
    assert_eq!(c.kv("c").put(b"k", b"v").await, Ok(9));
    let at_a = ids(&a);
    let at_b = ids(&b);
    assert_eq!(at_a[0].3, 0);
    assert_eq!(at_b.len(), 1);
    assert_eq!(
        (at_b[0].1, at_b[0].3),
        (at_a[0].1, 1),
        "same id, one unknown send before"
    );
}

#[tokio::test]
async fn an_expired_request_id_is_an_unknown_outcome() {
    let f = one_node(|n, _| {
        if n == 0 {
            return Action::Drop;
        }
        let mut r = kvpb::Response::new();
        let mut e = kvpb::Error::new();
        e.code = kvpb::ErrorCode::REQUEST_EXPIRED;
        e.why = "request id expired: outcome unknown".into();
        r.set_error(e);
        kv_reply(&r)
    })
    .await;
    let c = client(&[f.addr], 5_000);
    match c.kv("c").put(b"k", b"v").await {
        Err(ClientError::UnknownOutcome(m)) => assert!(m.contains("expired"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.kvs().len(), 2, "not resent after the range said expired");
}

#[tokio::test]
async fn not_leader_without_a_hint_backs_off_until_the_timeout() {
    let f = one_node(|_, _| wire_error(ClientError_Code::NOT_LEADER, "", None)).await;
    let c = client(&[f.addr], 1_500);
    let t = Instant::now();
    assert_eq!(c.kv("c").put(b"k", b"v").await, Err(ClientError::Timeout));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1_400),
        "bounded by the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let at: Vec<Instant> = f
        .seen
        .lock()
        .iter()
        .filter(|s| s.kv.is_some())
        .map(|s| s.at)
        .collect();
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // Waits between sends (the exact steps are unit-tested with `Backoff`): never a spin,
    // never a long stall.
    assert!(at.len() >= 5, "{} sends: {gaps:?}", at.len());
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(4)),
        "{gaps:?}"
    );
    assert!(gaps.iter().all(|g| *g < Duration::from_secs(1)), "{gaps:?}");
}

#[tokio::test]
async fn wrong_range_with_a_newer_descriptor_replaces_the_cached_one() {
    let l = bind().await;
    let me = l.local_addr().expect("addr");
    let f = serve(
        l,
        Arc::new(move |_, req| match &req.kind {
            Some(ClientRequest_oneof_kind::kv(k)) if k.epoch < 2 => wire_error(
                ClientError_Code::WRONG_RANGE,
                "",
                Some(range(1, b"c/", b"c0", 2, &[me])),
            ),
            Some(ClientRequest_oneof_kind::kv(_)) => put_ok(3),
            _ => lookup_reply(range(1, b"c/", b"c0", 1, &[me])),
        }),
    );
    let c = client(&[f.addr], 5_000);
    assert_eq!(c.kv("c").put(b"k", b"v").await, Ok(3));
    assert_eq!(f.lookups(), 1, "no second lookup");
    let epochs: Vec<u64> = f.kvs().iter().map(|(k, _)| k.epoch).collect();
    assert_eq!(epochs, vec![1, 2]);
    // A stale lookup answer later does not replace the newer cached descriptor.
    assert_eq!(c.kv("c").put(b"k", b"v").await, Ok(3));
    assert_eq!(f.kvs().last().map(|(k, _)| k.epoch), Some(2));
}

#[tokio::test]
async fn a_lagging_meta_is_ridden_out_by_looking_up_again() {
    // The node's meta shows the parent (epoch 1) for 20 lookups: more than any hop limit.
    let l = bind().await;
    let me = l.local_addr().expect("addr");
    let lookups = Arc::new(Mutex::new(0u32));
    let f = serve(
        l,
        Arc::new(move |_, req| match &req.kind {
            Some(ClientRequest_oneof_kind::kv(k)) if k.epoch < 2 => {
                wire_error(ClientError_Code::WRONG_RANGE, "", None)
            }
            Some(ClientRequest_oneof_kind::kv(_)) => put_ok(4),
            _ => {
                let mut n = lookups.lock();
                *n += 1;
                let epoch = if *n > 20 { 2 } else { 1 };
                lookup_reply(range(1, b"c/", b"c0", epoch, &[me]))
            }
        }),
    );
    let c = client(&[f.addr], 10_000);
    assert_eq!(c.kv("c").put(b"k", b"v").await, Ok(4));
    assert_eq!(f.lookups(), 21);
    let sent = ids(&f);
    assert!(
        sent.iter().all(|s| s.3 == 0),
        "refusals are not unknown outcomes"
    );
}

#[tokio::test]
async fn follower_reads_go_round_robin_and_report_where_they_were_served() {
    let ls = [bind().await, bind().await, bind().await];
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().expect("addr")).collect();
    let mut fakes = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        let members = addrs.clone();
        fakes.push(serve(
            l,
            Arc::new(move |_, req| {
                if is_lookup(req) {
                    return lookup_reply(range(1, b"c/", b"c0", 1, &members));
                }
                let mut r = kvpb::Response::new();
                r.mut_header().applied_index = 100 + i as u64;
                r.set_get(kvpb::GetResult::new());
                kv_reply(&r)
            }),
        ));
    }
    let c = client(&addrs[..1], 5_000);
    let kv = c.kv("c").with_reads(ReadMode::Follower);
    let mut served = Vec::new();
    for _ in 0..6 {
        let s = kv.get_served(b"k").await.expect("get");
        let i = addrs.iter().position(|a| *a == s.node).expect("a member");
        assert_eq!(s.applied_index, 100 + i as u64);
        served.push(i);
    }
    for (i, f) in fakes.iter().enumerate() {
        let kvs = f.kvs();
        assert_eq!(kvs.len(), 2, "node {i}: {served:?}");
        assert!(kvs.iter().all(|(k, _)| k.follower));
    }
}

#[tokio::test]
async fn scans_stream_pages_across_ranges_and_stop_at_the_limit() {
    let l = bind().await;
    let me = l.local_addr().expect("addr");
    let keys: Vec<&[u8]> = vec![b"c/a", b"c/b", b"c/c", b"c/d", b"c/m", b"c/n", b"c/o"];
    let r1 = range(1, b"c/", b"c/m", 1, &[me]);
    let r2 = range(2, b"c/m", b"c0", 1, &[me]);
    let (r1c, r2c) = (r1.clone(), r2.clone());
    let f = serve(
        l,
        Arc::new(move |_, req| match &req.kind {
            Some(ClientRequest_oneof_kind::lookup(lk)) => {
                let r = if lk.key.as_ref() < b"m".as_slice() {
                    r1c.clone()
                } else {
                    r2c.clone()
                };
                lookup_reply(r)
            }
            Some(ClientRequest_oneof_kind::kv(k)) => {
                let cmd = kvpb::Command::parse_from_carllerche_bytes(&k.command).expect("cmd");
                let Some(Op::scan(s)) = cmd.op else {
                    panic!("{cmd:?}")
                };
                let r = if k.range == 1 { &r1c } else { &r2c };
                assert!(s.start >= r.lo && s.end <= r.hi, "scan inside its range");
                // Two keys per page (as a small max_bytes would give).
                let per = if s.limit == 0 { 2 } else { s.limit.min(2) } as usize;
                let inside: Vec<&[u8]> = keys
                    .iter()
                    .copied()
                    .filter(|k| *k >= s.start.as_ref() && *k < s.end.as_ref())
                    .collect();
                let mut res = kvpb::ScanResult::new();
                for k in inside.iter().take(per) {
                    let mut kv = kvpb::KeyValue::new();
                    kv.key = Bytes::copy_from_slice(k);
                    res.kvs.push(kv);
                }
                if inside.len() > per {
                    res.more = true;
                    res.next_key = Bytes::copy_from_slice(inside[per]);
                }
                let mut r = kvpb::Response::new();
                r.set_scan(res);
                kv_reply(&r)
            }
            _ => panic!("{req:?}"),
        }),
    );
    let c = client(&[f.addr], 5_000);
    let kv = c.kv("c");
    let mut s = kv.scanner(b"", b"", 5).page_bytes(1000);
    let mut pages = Vec::new();
    while let Some(p) = s.next_page().await.expect("page") {
        pages.push(p.value.iter().map(|kv| kv.key.to_vec()).collect::<Vec<_>>());
    }
    let want: Vec<Vec<Vec<u8>>> = vec![
        vec![b"a".to_vec(), b"b".to_vec()],
        vec![b"c".to_vec(), b"d".to_vec()],
        vec![b"m".to_vec()],
    ];
    assert_eq!(pages, want);
    let sent = f.kvs();
    let limits: Vec<u64> = sent.iter().map(|(_, c)| c.get_scan().limit).collect();
    assert_eq!(
        limits,
        vec![5, 3, 1],
        "never more than the limit still allows"
    );
    assert!(sent.iter().all(|(_, c)| c.get_scan().max_bytes == 1000));
    // No limit: every key, across the boundary; a start and end inside the collection.
    let all = kv.scan(b"", b"", 0).await.expect("scan");
    assert_eq!(all.len(), 7);
    let mid = kv.scan(b"b", b"n", 0).await.expect("scan");
    let got: Vec<&[u8]> = mid.iter().map(|kv| kv.key.as_ref()).collect();
    assert_eq!(got, vec![&b"b"[..], b"c", b"d", b"m"]);
}

#[tokio::test]
async fn a_put_with_a_ttl_carries_it_in_milliseconds() {
    let f = one_node(|_, _| put_ok(5)).await;
    let c = client(&[f.addr], 5_000);
    let kv = c.kv("c");
    assert_eq!(kv.put(b"k", b"v").await, Ok(5));
    assert_eq!(
        kv.put_with_ttl(b"k", b"v", Duration::from_millis(1500))
            .await,
        Ok(5)
    );
    // Below a millisecond rounds up: a TTL is never dropped to "no TTL".
    assert_eq!(
        kv.put_with_ttl(b"k", b"v", Duration::from_micros(10)).await,
        Ok(5)
    );
    let ttls: Vec<u64> = f
        .kvs()
        .iter()
        .map(|(_, cmd)| cmd.get_put().ttl_ms)
        .collect();
    assert_eq!(ttls, vec![0, 1500, 1]);
}

/// A node for the lost-batch tests: collection `c` in range 1 `[c/, c0)` until the first kv
/// request arrives; then range 1 `[c/, c/m)` (epoch 2) and range 2 `[c/m, c0)`: the split.
/// `kv(n, me)` answers the `n`th kv request (`me`: this node's address).
async fn splitting(kv: impl Fn(usize, SocketAddr) -> Action + Send + Sync + 'static) -> Fake {
    let l = bind().await;
    let me = l.local_addr().expect("addr");
    let n = Arc::new(Mutex::new(0usize));
    serve(
        l,
        Arc::new(move |_, req| match &req.kind {
            Some(ClientRequest_oneof_kind::kv(_)) => {
                let i = {
                    let mut n = n.lock();
                    *n += 1;
                    *n - 1
                };
                kv(i, me)
            }
            Some(ClientRequest_oneof_kind::lookup(l)) => {
                let split = *n.lock() > 0;
                lookup_reply(match (split, l.key.as_ref() >= b"m".as_slice()) {
                    (false, _) => range(1, b"c/", b"c0", 1, &[me]),
                    (true, false) => range(1, b"c/", b"c/m", 2, &[me]),
                    (true, true) => range(2, b"c/m", b"c0", 1, &[me]),
                })
            }
            _ => Action::Drop,
        }),
    )
}

/// A batch reply: per op, its revision (applied at entry `index`) or `None` for
/// `KEY_OUT_OF_RANGE`.
fn batch_reply(index: u64, slots: &[Option<u64>]) -> Action {
    let mut b = kvpb::BatchResult::new();
    for s in slots {
        let mut r = kvpb::Response::new();
        r.mut_header().applied_index = index;
        match s {
            Some(rev) => {
                r.mut_header().revision = *rev;
                r.set_put(kvpb::PutResult::new());
            }
            None => {
                let mut e = kvpb::Error::new();
                e.code = kvpb::ErrorCode::KEY_OUT_OF_RANGE;
                r.set_error(e);
            }
        }
        b.results.push(r);
    }
    let mut resp = kvpb::Response::new();
    resp.set_batch(b);
    kv_reply(&resp)
}

/// The keys of a batch command, and its request id's (seq, attempt).
fn batch_sent(k: &(KvRequest, kvpb::Command)) -> (u64, Vec<Bytes>, (u64, u32)) {
    let keys =
        k.1.get_batch()
            .ops
            .iter()
            .map(|o| o.get_put().key.clone())
            .collect();
    let id = k.1.get_request_id();
    (k.0.range, keys, (id.seq, id.attempt))
}

fn two_puts() -> Vec<client::BatchOp> {
    ["z", "a"]
        .iter()
        .map(|k| client::BatchOp::Put {
            key: Bytes::from_static(k.as_bytes()),
            value: Bytes::from_static(b"v"),
        })
        .collect()
}

#[tokio::test]
async fn a_lost_batch_is_resent_whole_to_its_range_after_a_split() {
    let f = splitting(|n, me| match n {
        // The first send: answer lost (the range splits meanwhile, see `splitting`).
        0 => Action::Drop,
        // A node refusing the resend with the range's newer descriptor: the client follows
        // it (members) but sends the same command again, not rebuilt for the new bounds.
        1 => wire_error(
            ClientError_Code::WRONG_RANGE,
            "",
            Some(range(1, b"c/", b"c/m", 2, &[me])),
        ),
        // Range 1 applies `a` and refuses `z` (moved); the daughter applies `z`.
        2 => batch_reply(7, &[None, Some(5)]),
        _ => batch_reply(3, &[Some(2)]),
    })
    .await;
    let cl = client(&[f.addr], 10_000);
    let got = cl.kv("c").batch(&two_puts()).await.expect("batch");
    let sent: Vec<_> = f.kvs().iter().map(batch_sent).collect();
    assert_eq!(sent.len(), 4, "{sent:?}");
    // One command, one id, both keys, to range 1 on every send; then `z` alone, a new id.
    let both = vec![Bytes::from_static(b"c/z"), Bytes::from_static(b"c/a")];
    for (i, s) in sent[..3].iter().enumerate() {
        assert_eq!((s.0, s.1.clone()), (1, both.clone()), "send {i}");
    }
    let seq = sent[0].2 .0;
    assert_eq!(
        sent[..3].iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![(seq, 0), (seq, 1), (seq, 1)]
    );
    assert_eq!((sent[3].0, sent[3].1.clone()), (2, vec![both[0].clone()]));
    assert_eq!(sent[3].2 .1, 0);
    assert_ne!(sent[3].2 .0, seq);
    assert_eq!(
        got,
        vec![
            Ok(client::OpApplied {
                revision: 2,
                range: 2,
                applied_index: 3
            }),
            Ok(client::OpApplied {
                revision: 5,
                range: 1,
                applied_index: 7
            }),
        ]
    );
    assert_eq!(cl.regrouped_batch_ops(), 1);
}

#[tokio::test]
async fn a_lost_batch_whose_id_expired_is_an_unknown_outcome() {
    let f = splitting(|n, _| match n {
        0 => Action::Drop,
        _ => {
            let mut e = kvpb::Error::new();
            e.code = kvpb::ErrorCode::REQUEST_EXPIRED;
            e.why = "request id expired".into();
            let mut r = kvpb::Response::new();
            r.set_error(e);
            kv_reply(&r)
        }
    })
    .await;
    let cl = client(&[f.addr], 10_000);
    let got = cl.kv("c").batch(&two_puts()).await.expect("batch");
    assert!(
        got.iter()
            .all(|r| matches!(r, Err(ClientError::UnknownOutcome(_)))),
        "{got:?}"
    );
    let sent: Vec<_> = f.kvs().iter().map(batch_sent).collect();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].0, 1);
    assert_eq!(sent[1].2 .1, 1);
}
