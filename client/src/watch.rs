//! Watch a KV collection: [`Kv::watch`], [`Kv::watch_prefix`], [`Kv::watch_range`] return a
//! [`Watch`] whose [`Watch::next`] yields the changes of the watched keys.
//!
//! # How
//! The watched interval (full keys) is split by the ranges covering it. One task per piece
//! long-polls a replica of its range (`WatchRequest`, any member; the node waits for the next
//! change) and keeps the piece's next revision: events below it are dropped, so a change is
//! delivered at most once however often a poll is repeated or a replica changes, and, since
//! every replica has the same history, at least once unless the history was compacted (then
//! a [`WatchUpdate::Resync`] says so and carries the current state). On `WRONG_RANGE` (a
//! split, a stale descriptor) the piece looks its range up again; when the range found ends
//! before the piece, the rest becomes a new piece that continues from the same revision (a
//! split's daughters share the parent's revision counter and a copy of its history). On
//! `NOT_LEADER`/`UNAVAILABLE` (a replica that knows no leader) or an unreachable node the
//! piece asks the next member, backing off.
//!
//! # Large replies
//! A node pages what does not fit one reply (see `seed::watch_port`). A resync comes in pages
//! (`resync_more`, asked for with `resync_from`), each read at its own revision: the piece
//! collects them and delivers one [`WatchUpdate::Resync`] after the last, resumes from the
//! first page's revision, and drops an event that the page holding its key already contains
//! (below that page's revision). A revision too large for one reply comes in key order over
//! several (`after_key`): the piece's position is the revision and the last key delivered.
//! A range change while paging a resync (`WRONG_RANGE`, a split found) starts it over:
//! nothing of it was delivered.
//!
//! # Order
//! Revisions are counted per range. Within one range (and so for each key) updates come in
//! revision order; across ranges there is no global order: the updates of two ranges
//! interleave in arrival order.
//!
//! Keys are collection-relative. The updates of all pieces go through one bounded channel:
//! a consumer that stops reading stops the polls (back-pressure). Dropping the [`Watch`]
//! stops its tasks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::clientpb::{ClientError_Code, ClientRequest, ClientResponse_oneof_kind, WatchRequest};
use proto::kvpb;
use proto::metapb::RangeDescriptor;
use tokio::sync::mpsc;

use crate::kv::{check_key, prefix_end, strip, with_prefix, Backoff, Kv};
use crate::{Client, ClientError};

/// Longest a poll waits at the node for a change.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(5);
/// Updates buffered between the polls and the consumer.
const CHANNEL: usize = 16;

/// One change.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// `PUT` or `DELETE` (explicit, range delete or TTL expiry).
    pub kind: kvpb::EventType,
    /// The key after the change (collection-relative); for a delete, the key and the delete's
    /// revision as `mod_revision`.
    pub kv: kvpb::KeyValue,
}

impl WatchEvent {
    /// The revision of the change (in its range's counter).
    pub fn revision(&self) -> u64 {
        self.kv.mod_revision
    }
}

/// What [`Watch::next`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchUpdate {
    /// Changes of one range, in revision order.
    Events(Vec<WatchEvent>),
    /// The history of `[start, end)` (collection-relative; `end` empty: to the end of the
    /// collection) before the watch's position was compacted: changes in between are lost.
    /// `current` is the present state of those keys (in key order); changes continue from
    /// `next_revision`. A large state is read in pages at successive revisions, so a key's
    /// state may already include changes from `next_revision` on: those changes are not
    /// delivered again, and every later change is (each event is newer than the state it
    /// updates).
    Resync {
        start: Vec<u8>,
        end: Vec<u8>,
        current: Vec<kvpb::KeyValue>,
        next_revision: u64,
    },
}

/// A running watch. Dropping it stops the polls.
#[derive(Debug)]
pub struct Watch {
    rx: Option<mpsc::Receiver<Result<WatchUpdate, ClientError>>>,
}

impl Watch {
    /// The next update. Waits as long as it takes (no timeout of its own; wrap it in one if
    /// needed).
    ///
    /// # Errors
    /// A piece that cannot continue: the collection is gone, a reply would be too large, or
    /// no replica of a range answered for three times the client's timeout. The first error
    /// ends the watch; later calls return [`ClientError::Unavailable`].
    pub async fn next(&mut self) -> Result<WatchUpdate, ClientError> {
        let ended = || ClientError::Unavailable("the watch ended after an error".into());
        let Some(rx) = self.rx.as_mut() else {
            return Err(ended());
        };
        match rx.recv().await {
            Some(Ok(u)) => Ok(u),
            Some(Err(e)) => {
                self.rx = None;
                Err(e)
            }
            None => {
                self.rx = None;
                Err(ended())
            }
        }
    }
}

impl Kv {
    /// Watch one key from `from_revision` (inclusive; 0: from the next change).
    ///
    /// # Errors
    /// An empty key, an unknown collection, unreachable seeds.
    pub async fn watch(&self, key: &[u8], from_revision: u64) -> Result<Watch, ClientError> {
        check_key(key)?;
        let mut end = key.to_vec();
        end.push(0);
        self.watch_range(key, &end, from_revision).await
    }

    /// Watch every key starting with `prefix` (empty: the whole collection).
    ///
    /// # Errors
    /// As [`Kv::watch`].
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        from_revision: u64,
    ) -> Result<Watch, ClientError> {
        let end = if prefix.is_empty() {
            Bytes::new()
        } else {
            prefix_end(prefix)
        };
        self.watch_range(prefix, &end, from_revision).await
    }

    /// Watch the keys in `[start, end)` (`end` empty: to the end of the collection) from
    /// `from_revision` (inclusive, in each range's revision counter; 0: from the next change,
    /// fixed per range by its first reply).
    ///
    /// # Errors
    /// `start >= end`, an unknown collection, unreachable seeds.
    pub async fn watch_range(
        &self,
        start: &[u8],
        end: &[u8],
        from_revision: u64,
    ) -> Result<Watch, ClientError> {
        if !end.is_empty() && end <= start {
            return Err(ClientError::InvalidArgument {
                field: "end".into(),
                message: "must be empty or greater than start".into(),
            });
        }
        let client = self.client().clone();
        let name = self.name().to_string();
        let (coll, first) = client.lookup(&name, start).await?;
        let hi = if end.is_empty() {
            prefix_end(&coll.prefix)
        } else {
            with_prefix(&coll.prefix, end)
        };
        let (tx, rx) = mpsc::channel(CHANNEL);
        let piece = Piece {
            client,
            name,
            prefix: coll.prefix.clone(),
            lo: with_prefix(&coll.prefix, start),
            hi,
            next: from_revision,
            after: None,
            paging: None,
            seen: Vec::new(),
            range: Some(first),
            turn: rand::random::<usize>(),
            tx,
        };
        spawn_piece(piece);
        Ok(Watch { rx: Some(rx) })
    }
}

/// Runs `p` in its own task.
fn spawn_piece(p: Piece) {
    tokio::spawn(p.run());
}

/// One piece `[lo, hi)` (full keys) of a watch, inside one range.
struct Piece {
    client: Client,
    name: String,
    prefix: Bytes,
    lo: Bytes,
    hi: Bytes,
    /// Events below this revision were delivered (0: not fixed yet).
    next: u64,
    /// Events of revision `next` up to this key were delivered too (a revision sent over
    /// several replies).
    after: Option<Bytes>,
    /// A resync being received over several replies (nothing of it delivered yet).
    paging: Option<Paging>,
    /// Pages of the last resync read after its `next_revision`: an event of a key in one of
    /// them below that page's revision is already in the state delivered.
    seen: Vec<PageMark>,
    /// The range believed to hold `lo` (`None`: look it up).
    range: Option<RangeDescriptor>,
    /// Which member to ask.
    turn: usize,
    tx: mpsc::Sender<Result<WatchUpdate, ClientError>>,
}

/// A resync arriving in pages.
struct Paging {
    /// The first page's `next_revision`: events continue from it.
    base: u64,
    /// The state so far (full keys).
    current: Vec<kvpb::KeyValue>,
    /// The next page starts here.
    from: Bytes,
    marks: Vec<PageMark>,
}

/// One resync page: its keys end below `end` (full key) and it was read at `next - 1`.
#[derive(Debug, Clone, PartialEq)]
struct PageMark {
    end: Bytes,
    next: u64,
}

/// What one poll led to.
enum Step {
    /// Go on (delivered something, or nothing happened).
    Ok,
    /// Try again after a pause.
    Retry(ClientError),
    /// Give up.
    Fatal(ClientError),
}

impl Piece {
    fn rel(&self, full: &Bytes) -> Vec<u8> {
        full.strip_prefix(self.prefix.as_ref())
            .unwrap_or(full)
            .to_vec()
    }

    async fn run(mut self) {
        let give_up_after = self.client.timeout * 3;
        let mut failing_since: Option<Instant> = None;
        let mut backoff = Backoff::new();
        let tx = self.tx.clone();
        loop {
            let step = tokio::select! {
                _ = tx.closed() => return,
                s = self.step() => s,
            };
            match step {
                Step::Ok => {
                    failing_since = None;
                    backoff = Backoff::new();
                }
                Step::Retry(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= give_up_after {
                        let _ = self.tx.send(Err(e)).await;
                        return;
                    }
                    tokio::select! {
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(backoff.step()) => {}
                    }
                }
                Step::Fatal(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return;
                }
            }
        }
    }

    /// One lookup (if needed) and one poll.
    async fn step(&mut self) -> Step {
        let range = match self.range.clone() {
            Some(r) => r,
            None => match self.client.lookup(&self.name, &self.rel(&self.lo)).await {
                Ok((_, r)) => r,
                Err(e @ (ClientError::NotFound(_) | ClientError::InvalidArgument { .. })) => {
                    return Step::Fatal(e)
                }
                Err(e) => return Step::Retry(e),
            },
        };
        if !(range.lo.as_ref() <= self.lo.as_ref() && self.lo.as_ref() < range.hi.as_ref()) {
            // A lagging meta view answered with a range that does not hold the key.
            self.range = None;
            return Step::Retry(ClientError::WrongRange(
                "looked-up range does not hold the watched keys".into(),
            ));
        }
        if range.hi.as_ref() < self.hi.as_ref() {
            // The range ends inside the piece: the rest is another piece, same position. A
            // resync being paged starts over (nothing of it was delivered).
            self.paging = None;
            let rest = Piece {
                client: self.client.clone(),
                name: self.name.clone(),
                prefix: self.prefix.clone(),
                lo: range.hi.clone(),
                hi: self.hi.clone(),
                next: self.next,
                after: self.after.clone(),
                paging: None,
                seen: self.seen.clone(),
                range: None,
                turn: self.turn.wrapping_add(1),
                tx: self.tx.clone(),
            };
            self.hi = range.hi.clone();
            spawn_piece(rest);
        }
        self.range = Some(range.clone());
        let members: Vec<SocketAddr> = range
            .members
            .iter()
            .filter_map(|m| m.client_addr.parse().ok())
            .collect();
        if members.is_empty() {
            self.range = None;
            return Step::Retry(ClientError::Unavailable(format!(
                "range {} of {:?} has no replicas yet",
                range.id, self.name
            )));
        }
        let target = members[self.turn % members.len()];
        let wait = MAX_POLL_WAIT.min(self.client.timeout / 2);
        let mut w = WatchRequest::new();
        w.range = range.id;
        w.epoch = range.epoch;
        w.key = self.lo.clone();
        w.range_end = self.hi.clone();
        w.start_revision = self.next;
        w.wait_ms = wait.as_millis() as u64;
        match &self.paging {
            Some(pg) => w.resync_from = pg.from.clone(),
            None => w.after_key = self.after.clone().unwrap_or_default(),
        }
        if self.next == 0 {
            w.after_key = Bytes::new();
        }
        let mut req = ClientRequest::new();
        req.set_watch(w);
        let deadline = Instant::now() + wait + self.client.timeout;
        match self.client.call_at(target, req, deadline).await {
            Ok(ClientResponse_oneof_kind::watch(mut r)) => {
                let more = (!r.resync_more.is_empty()).then(|| r.resync_more.clone());
                let after = (!r.after_key.is_empty()).then(|| r.after_key.clone());
                self.deliver_page(r.take_response(), more, after).await
            }
            Ok(ClientResponse_oneof_kind::error(e)) => {
                let err = ClientError::from_wire(&e);
                match e.code {
                    ClientError_Code::WRONG_RANGE => {
                        // The range changed: a resync being paged starts over.
                        self.paging = None;
                        let fresh = e.get_range();
                        self.range =
                            (e.has_range() && fresh.epoch > range.epoch).then(|| fresh.clone());
                        // This member may not hold the range (any more).
                        self.turn = self.turn.wrapping_add(1);
                        Step::Retry(err)
                    }
                    ClientError_Code::NOT_LEADER
                    | ClientError_Code::UNAVAILABLE
                    | ClientError_Code::INTERNAL
                    | ClientError_Code::NO_META => {
                        self.turn = self.turn.wrapping_add(1);
                        Step::Retry(err)
                    }
                    _ => Step::Fatal(err),
                }
            }
            Ok(_) => Step::Fatal(ClientError::Protocol("unexpected answer to watch".into())),
            Err(e) => {
                // Unreachable, connection lost or no answer in time: the next member.
                self.turn = self.turn.wrapping_add(1);
                Step::Retry(e)
            }
        }
    }

    /// A reply without continuation (a whole resync, or events ending on a revision).
    #[cfg(test)]
    async fn deliver(&mut self, resp: kvpb::WatchResponse) -> Step {
        self.deliver_page(resp, None, None).await
    }

    /// Hands a reply's events (those not delivered yet) to the consumer, or adds a resync
    /// page and, after the last one, hands the whole resync over. `more`: the resync's next
    /// page starts at this key; `after`: the reply ends inside revision `next_revision`, after
    /// this key.
    async fn deliver_page(
        &mut self,
        resp: kvpb::WatchResponse,
        more: Option<Bytes>,
        after: Option<Bytes>,
    ) -> Step {
        if resp.resync {
            return self.resync_page(resp, more).await;
        }
        if self.paging.is_some() {
            // Events while paging a resync: from a replica that answered an older request;
            // the resync's position is what counts. Ask again.
            return Step::Ok;
        }
        let pos = (self.next, self.after.clone());
        let seen = &self.seen;
        let events: Vec<WatchEvent> = resp
            .events
            .into_iter()
            .filter(|e| {
                let kv = e.get_kv();
                (kv.mod_revision, Some(kv.key.clone())) > pos
                    && seen
                        .iter()
                        .find(|m| kv.key < m.end)
                        .is_none_or(|m| kv.mod_revision >= m.next)
            })
            .map(|mut e| {
                let mut kv = e.take_kv();
                strip(&self.prefix, &mut kv);
                WatchEvent {
                    kind: e.field_type,
                    kv,
                }
            })
            .collect();
        let reached = (resp.next_revision, after);
        if reached > pos {
            self.next = reached.0;
            self.after = reached.1;
        }
        // Once the position passed every page's revision, the marks filter nothing.
        let next = self.next;
        if self.seen.iter().all(|m| m.next <= next) {
            self.seen.clear();
        }
        if events.is_empty() {
            return Step::Ok;
        }
        self.send(WatchUpdate::Events(events)).await
    }

    /// One page of a resync; after the last, the whole state goes to the consumer.
    async fn resync_page(&mut self, resp: kvpb::WatchResponse, more: Option<Bytes>) -> Step {
        let mut pg = match self.paging.take() {
            Some(pg) => pg,
            None => {
                if resp.next_revision <= self.next {
                    return Step::Ok;
                }
                Paging {
                    base: resp.next_revision,
                    current: Vec::new(),
                    from: self.lo.clone(),
                    marks: Vec::new(),
                }
            }
        };
        if resp.next_revision < pg.base {
            // A lagging replica's page: read it again elsewhere.
            self.paging = Some(pg);
            self.turn = self.turn.wrapping_add(1);
            return Step::Ok;
        }
        let end = more.clone().unwrap_or_else(|| self.hi.clone());
        pg.marks.push(PageMark {
            end: end.clone(),
            next: resp.next_revision,
        });
        pg.current.extend(
            resp.current
                .into_iter()
                .filter(|kv| kv.key >= pg.from && kv.key < end),
        );
        if let Some(k) = more {
            pg.from = k;
            self.paging = Some(pg);
            return Step::Ok;
        }
        self.next = pg.base;
        self.after = None;
        // In key order: the first mark whose end is above a key is its page's.
        self.seen = pg.marks;
        if self.seen.iter().all(|m| m.next <= self.next) {
            self.seen.clear();
        }
        let end = if self.hi == prefix_end(&self.prefix) {
            Vec::new()
        } else {
            self.rel(&self.hi)
        };
        let current = pg
            .current
            .into_iter()
            .map(|mut kv| {
                strip(&self.prefix, &mut kv);
                kv
            })
            .collect();
        let u = WatchUpdate::Resync {
            start: self.rel(&self.lo),
            end,
            current,
            next_revision: self.next,
        };
        self.send(u).await
    }

    async fn send(&self, u: WatchUpdate) -> Step {
        // A closed channel: the watch was dropped; `run` notices.
        let _ = self.tx.send(Ok(u)).await;
        Step::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &[u8] = b"\x00\x00\x00\x07";

    fn piece(next: u64) -> (Piece, mpsc::Receiver<Result<WatchUpdate, ClientError>>) {
        let client =
            Client::new(vec!["127.0.0.1:9".parse().unwrap()], Duration::from_secs(1)).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let p = Piece {
            client,
            name: "c".into(),
            prefix: Bytes::from_static(P),
            lo: with_prefix(P, b"p/"),
            hi: prefix_end(P),
            next,
            after: None,
            paging: None,
            seen: Vec::new(),
            range: None,
            turn: 0,
            tx,
        };
        (p, rx)
    }

    fn event(key: &str, rev: u64) -> kvpb::Event {
        let mut e = kvpb::Event::new();
        e.field_type = kvpb::EventType::PUT;
        let mut kv = kvpb::KeyValue::new();
        kv.key = with_prefix(P, key.as_bytes());
        kv.value = Bytes::from(format!("v{rev}"));
        kv.mod_revision = rev;
        e.set_kv(kv);
        e
    }

    fn events(revs: &[u64], next: u64) -> kvpb::WatchResponse {
        let mut r = kvpb::WatchResponse::new();
        r.events = revs.iter().map(|r| event("p/k", *r)).collect();
        r.next_revision = next;
        r
    }

    fn revs(u: WatchUpdate) -> Vec<(String, u64)> {
        match u {
            WatchUpdate::Events(e) => e
                .iter()
                .map(|e| {
                    (
                        String::from_utf8_lossy(&e.kv.key).into_owned(),
                        e.revision(),
                    )
                })
                .collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn events_below_the_next_revision_are_dropped_and_it_never_goes_back() {
        let (mut p, mut rx) = piece(4);
        assert!(matches!(p.deliver(events(&[3, 4, 5], 6)).await, Step::Ok));
        let got = revs(rx.recv().await.unwrap().unwrap());
        assert_eq!(got, vec![("p/k".into(), 4), ("p/k".into(), 5)]);
        assert_eq!(p.next, 6);
        // The same reply again (a repeated poll, another replica): nothing delivered.
        p.deliver(events(&[3, 4, 5], 6)).await;
        assert!(rx.try_recv().is_err());
        // A lagging replica's "nothing yet, next 3": the position stays.
        p.deliver(events(&[], 3)).await;
        assert_eq!(p.next, 6);
        assert!(rx.try_recv().is_err());
        // Nothing for these keys up to 9: the position moves without an update.
        p.deliver(events(&[], 9)).await;
        assert_eq!(p.next, 9);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_resync_is_delivered_once_with_relative_keys() {
        let (mut p, mut rx) = piece(2);
        let mut r = kvpb::WatchResponse::new();
        r.resync = true;
        r.next_revision = 10;
        let mut kv = kvpb::KeyValue::new();
        kv.key = with_prefix(P, b"p/a");
        r.current.push(kv);
        p.deliver(r.clone()).await;
        match rx.recv().await.unwrap().unwrap() {
            WatchUpdate::Resync {
                start,
                end,
                current,
                next_revision,
            } => {
                assert_eq!(start, b"p/".to_vec());
                assert!(end.is_empty(), "to the end of the collection");
                assert_eq!(current[0].key.as_ref(), b"p/a");
                assert_eq!(next_revision, 10);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.next, 10);
        // Not again.
        p.deliver(r).await;
        assert!(rx.try_recv().is_err());
    }

    fn kv(key: &str, rev: u64) -> kvpb::KeyValue {
        let mut kv = kvpb::KeyValue::new();
        kv.key = with_prefix(P, key.as_bytes());
        kv.mod_revision = rev;
        kv
    }

    fn resync_page(keys: &[&str], next: u64) -> kvpb::WatchResponse {
        let mut r = kvpb::WatchResponse::new();
        r.resync = true;
        r.next_revision = next;
        r.current = keys.iter().map(|k| kv(k, 1)).collect();
        r
    }

    fn at(keys: &[(&str, u64)], next: u64) -> kvpb::WatchResponse {
        let mut r = kvpb::WatchResponse::new();
        r.events = keys.iter().map(|(k, rev)| event(k, *rev)).collect();
        r.next_revision = next;
        r
    }

    #[tokio::test]
    async fn a_paged_resync_is_delivered_once_whole_and_events_resume_exactly_once() {
        let (mut p, mut rx) = piece(2);
        // Page 1 read at revision 9, page 2 at 11 (two writes in between).
        let more = Some(with_prefix(P, b"p/c"));
        p.deliver_page(resync_page(&["p/a", "p/b"], 10), more.clone(), None)
            .await;
        assert!(rx.try_recv().is_err(), "nothing before the last page");
        assert_eq!(p.paging.as_ref().map(|pg| pg.from.clone()), more);
        p.deliver_page(resync_page(&["p/c", "p/d"], 12), None, None)
            .await;
        match rx.recv().await.unwrap().unwrap() {
            WatchUpdate::Resync {
                current,
                next_revision,
                ..
            } => {
                let keys: Vec<_> = current.iter().map(|kv| kv.key.to_vec()).collect();
                assert_eq!(
                    keys,
                    vec![
                        b"p/a".to_vec(),
                        b"p/b".to_vec(),
                        b"p/c".to_vec(),
                        b"p/d".to_vec()
                    ]
                );
                assert_eq!(next_revision, 10);
            }
            other => panic!("{other:?}"),
        }
        assert!(p.paging.is_none());
        // From the first page's revision: p/b at 10 and 11 are news (page 1 was read at 9);
        // p/c at 11 is already in page 2 (read at 11); p/d at 12 is news.
        p.deliver(at(
            &[("p/b", 10), ("p/c", 11), ("p/b", 11), ("p/d", 12)],
            13,
        ))
        .await;
        let got = revs(rx.recv().await.unwrap().unwrap());
        assert_eq!(
            got,
            vec![("p/b".into(), 10), ("p/b".into(), 11), ("p/d".into(), 12)]
        );
        assert!(p.seen.is_empty(), "past every page's revision");
        // The same events again: nothing.
        p.deliver(at(&[("p/c", 12)], 13)).await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_revision_sent_over_several_replies_is_delivered_once() {
        let (mut p, mut rx) = piece(5);
        p.deliver_page(
            at(&[("p/a", 5), ("p/b", 5)], 5),
            None,
            Some(with_prefix(P, b"p/b")),
        )
        .await;
        assert_eq!(revs(rx.recv().await.unwrap().unwrap()).len(), 2);
        assert_eq!((p.next, p.after.clone()), (5, Some(with_prefix(P, b"p/b"))));
        // A replica that ignores the continuation sends the whole revision again.
        p.deliver(at(&[("p/a", 5), ("p/b", 5), ("p/c", 5), ("p/a", 6)], 7))
            .await;
        let got = revs(rx.recv().await.unwrap().unwrap());
        assert_eq!(got, vec![("p/c".into(), 5), ("p/a".into(), 6)]);
        assert_eq!((p.next, p.after.clone()), (7, None));
    }

    #[tokio::test]
    async fn a_dropped_watch_stops_its_pieces() {
        let (p, rx) = piece(1);
        let task = tokio::spawn(p.run());
        drop(rx);
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the piece stopped")
            .unwrap();
    }
}
