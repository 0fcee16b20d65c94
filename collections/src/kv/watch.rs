//! Watch: reading the history ([`WatchBatch`]), the broadcast of applied changes
//! ([`Applied`], [`Subscription`]) and the [`Watcher`] that merges both into one ordered
//! stream with no gaps and no duplicates.
//!
//! Why both: history alone would make every watcher poll; the broadcast alone loses events
//! when a subscriber falls behind (its channel is bounded and it is dropped when full) and
//! knows nothing before the subscription. A watcher subscribes first, then reads history from
//! its next revision, then takes broadcast batches that continue exactly where it is; any gap
//! (a dropped subscription, a batch from before) sends it back to history. The history is
//! compacted; a watcher whose next revision fell below the horizon gets a resync: the current
//! state of its keys and the revision to continue from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::error::Result;
use crate::kv::state::KeyRange;
use crate::kv::store::KvReader;
use crate::kv::types::{Event, KeyValue};

/// The changes of one applied raft entry, as broadcast to subscribers: of its one command,
/// or of all the commands of a packed entry (`KvStore::apply_packed`), in their order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The first revision the entry's commands used.
    pub first_revision: u64,
    /// The store's revision after the entry (every event has a revision in
    /// `first_revision..=last_revision`).
    pub last_revision: u64,
    /// The raft index of the entry.
    pub index: u64,
    /// The events, in revision then key order.
    pub events: Vec<Event>,
}

/// A live subscription to applied changes. Bounded: a subscriber that falls behind by
/// `subscriber_capacity` batches is dropped (its receiver reports disconnection) and must
/// catch up from history.
pub type Subscription = Receiver<Arc<Applied>>;

/// What the history holds from a revision on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchBatch {
    /// The events from the asked revision (whole revisions), and the revision to ask next.
    Events {
        /// Matching events in revision order.
        events: Vec<Event>,
        /// Ask for this revision next.
        next_revision: u64,
    },
    /// History before the asked revision is compacted: the current state of the matching keys
    /// instead, and the revision from which events continue.
    Resync {
        /// The matching live keys.
        current: Vec<KeyValue>,
        /// Events continue from this revision.
        next_revision: u64,
    },
}

impl WatchBatch {
    /// The wire form (the caller sets `header`).
    pub fn to_pb(&self) -> proto::kvpb::WatchResponse {
        let mut r = proto::kvpb::WatchResponse::new();
        match self {
            WatchBatch::Events {
                events,
                next_revision,
            } => {
                r.events = events.iter().map(Event::to_pb).collect();
                r.next_revision = *next_revision;
            }
            WatchBatch::Resync {
                current,
                next_revision,
            } => {
                r.resync = true;
                r.current = current.iter().map(KeyValue::to_pb).collect();
                r.next_revision = *next_revision;
            }
        }
        r
    }
}

/// One step of a [`Watcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchUpdate {
    /// New events, in order.
    Events(Vec<Event>),
    /// The watcher's position was compacted: here is the current state instead.
    Resync {
        /// The matching live keys.
        current: Vec<KeyValue>,
        /// Events continue from this revision.
        next_revision: u64,
    },
}

/// A watch on a key range from a revision: each call to [`Watcher::poll`] returns the next
/// events in revision order; across calls every change is delivered exactly once.
#[derive(Debug)]
pub struct Watcher {
    reader: KvReader,
    range: KeyRange,
    next: u64,
    rx: Option<Subscription>,
    page: usize,
}

impl Watcher {
    pub(crate) fn new(reader: KvReader, range: KeyRange, start_revision: u64) -> Self {
        let rx = Some(reader.subscribe());
        let next = if start_revision == 0 {
            reader.revision().saturating_add(1)
        } else {
            start_revision
        };
        Watcher {
            reader,
            range,
            next,
            rx,
            page: 1000,
        }
    }

    /// The revision the next event will have at least.
    pub fn next_revision(&self) -> u64 {
        self.next
    }

    /// Waits up to `timeout` for the next events. `now_ms` is the clock for the TTL filter of a
    /// resync. `Ok(None)` on timeout.
    pub fn poll(&mut self, timeout: Duration, now_ms: u64) -> Result<Option<WatchUpdate>> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.rx.is_none() {
                self.rx = Some(self.reader.subscribe());
            }
            if self.next <= self.reader.revision() {
                match self
                    .reader
                    .events_since(self.next, &self.range, self.page, now_ms)?
                {
                    WatchBatch::Events {
                        events,
                        next_revision,
                    } => {
                        self.next = next_revision;
                        if !events.is_empty() {
                            return Ok(Some(WatchUpdate::Events(events)));
                        }
                        continue;
                    }
                    WatchBatch::Resync {
                        current,
                        next_revision,
                    } => {
                        self.next = next_revision;
                        return Ok(Some(WatchUpdate::Resync {
                            current,
                            next_revision,
                        }));
                    }
                }
            }
            let Some(rx) = &self.rx else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(a) => {
                    if a.last_revision < self.next || a.first_revision > self.next {
                        // Already seen, or a gap: the history check above handles it.
                        continue;
                    }
                    let events: Vec<Event> = a
                        .events
                        .iter()
                        .filter(|e| e.revision() >= self.next && self.range.contains(&e.kv.key))
                        .cloned()
                        .collect();
                    self.next = a.last_revision.saturating_add(1);
                    if !events.is_empty() {
                        return Ok(Some(WatchUpdate::Events(events)));
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => self.rx = None,
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
}
