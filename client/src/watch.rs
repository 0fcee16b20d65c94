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
    /// `current` is the present state of those keys; changes continue from `next_revision`.
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
    /// The range believed to hold `lo` (`None`: look it up).
    range: Option<RangeDescriptor>,
    /// Which member to ask.
    turn: usize,
    tx: mpsc::Sender<Result<WatchUpdate, ClientError>>,
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
            // The range ends inside the piece: the rest is another piece, same revision.
            let rest = Piece {
                client: self.client.clone(),
                name: self.name.clone(),
                prefix: self.prefix.clone(),
                lo: range.hi.clone(),
                hi: self.hi.clone(),
                next: self.next,
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
        let mut req = ClientRequest::new();
        req.set_watch(w);
        let deadline = Instant::now() + wait + self.client.timeout;
        match self.client.call_at(target, req, deadline).await {
            Ok(ClientResponse_oneof_kind::watch(mut r)) => self.deliver(r.take_response()).await,
            Ok(ClientResponse_oneof_kind::error(e)) => {
                let err = ClientError::from_wire(&e);
                match e.code {
                    ClientError_Code::WRONG_RANGE => {
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

    /// Hands a reply's events (those not delivered yet) or its resync to the consumer.
    async fn deliver(&mut self, resp: kvpb::WatchResponse) -> Step {
        if resp.resync {
            if resp.next_revision <= self.next {
                return Step::Ok;
            }
            self.next = resp.next_revision;
            let end = if self.hi == prefix_end(&self.prefix) {
                Vec::new()
            } else {
                self.rel(&self.hi)
            };
            let current = resp
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
            return self.send(u).await;
        }
        let from = self.next;
        let events: Vec<WatchEvent> = resp
            .events
            .into_iter()
            .filter(|e| e.get_kv().mod_revision >= from)
            .map(|mut e| {
                let mut kv = e.take_kv();
                strip(&self.prefix, &mut kv);
                WatchEvent {
                    kind: e.field_type,
                    kv,
                }
            })
            .collect();
        self.next = self.next.max(resp.next_revision);
        if events.is_empty() {
            return Step::Ok;
        }
        self.send(WatchUpdate::Events(events)).await
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
