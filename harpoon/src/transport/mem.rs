//! In-process [`Transport`] with fault filters, for cluster tests.
//!
//! A [`MemNetwork`] is a hub shared by every node of a test cluster. Each registered node gets a
//! delivery thread that owns its inbox, so [`Transport::send`] never blocks and never calls a
//! sink on the sender's thread (the sender is a raft shard thread; calling back into it inline
//! would recurse or deadlock). Works with or without a tokio runtime.
//!
//! # Faults (in the spirit of TiKV's `transport_simulate.rs` and raft-rs's harness `Network`)
//! - connectivity: [`MemNetwork::partition`], [`MemNetwork::cut`] (one-way),
//!   [`MemNetwork::isolate`], undone by [`MemNetwork::heal`];
//! - per link or for every link, [`Faults`]: drop, duplicate and reorder with a probability,
//!   delay (fixed or uniform in a range);
//! - down nodes: [`MemNetwork::kill`] (messages to it are dropped and the sender is told through
//!   [`MessageSink::report_unreachable`]); [`MemNetwork::register`] brings it back;
//! - custom predicates: [`MemNetwork::drop_if`].
//!
//! Every random choice comes from one `SmallRng` seeded by [`MemNetwork::new`], so a failing run
//! can be replayed from its seed (thread interleavings aside). [`MemNetwork::stats`] counts
//! messages sent, delivered, dropped, delayed, duplicated and reordered per message type.
//!
//! # Order
//! Without delay or reorder faults, messages from one node to another arrive in send order.
//! A `MsgSnapshot` travels whole; the sender's sink gets `report_snapshot(Finish)` once it was
//! handed to the receiver's sink, or `Failure` if a fault or a down node dropped it.

use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use proto::{CellId, NodeId};
use raft::eraftpb::MessageType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::filter::{DropPredicate, Rules};
use super::{Envelope, MessageSink, SnapshotStatus, Transport};

/// How long a reordered message waits for a later one before it is released anyway.
const REORDER_MAX_HOLD: Duration = Duration::from_millis(50);

/// Delay applied to a message before delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delay {
    /// Always this long (keeps per-link order).
    Fixed(Duration),
    /// Uniform in `[min, max]` (may reorder).
    Uniform { min: Duration, max: Duration },
}

/// Probabilistic faults on a link. Probabilities are in `[0, 1]` and apply per message.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability that a message is dropped.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Probability that a message is held back and released after a later one to the same node
    /// (or after a short timeout if none comes).
    pub reorder: f64,
    /// Delay before delivery.
    pub delay: Option<Delay>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// Drop with probability `p`.
    pub fn drop(p: f64) -> Self {
        Self {
            drop: p,
            ..Self::default()
        }
    }

    /// Duplicate with probability `p`.
    pub fn duplicate(p: f64) -> Self {
        Self {
            duplicate: p,
            ..Self::default()
        }
    }

    /// Reorder with probability `p`.
    pub fn reorder(p: f64) -> Self {
        Self {
            reorder: p,
            ..Self::default()
        }
    }

    /// Delay every message.
    pub fn delay(d: Delay) -> Self {
        Self {
            delay: Some(d),
            ..Self::default()
        }
    }
}

pub use super::filter::FilterId;

/// Counters for one message type (or for all of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Messages handed to [`Transport::send`].
    pub sent: u64,
    /// Messages handed to a receiver's sink (duplicates included).
    pub delivered: u64,
    /// Messages dropped by a fault, a filter or a down node.
    pub dropped: u64,
    /// Messages delayed.
    pub delayed: u64,
    /// Extra copies created.
    pub duplicated: u64,
    /// Messages held back to be delivered after a later one.
    pub reordered: u64,
}

impl KindStats {
    fn add(&mut self, o: &KindStats) {
        self.sent += o.sent;
        self.delivered += o.delivered;
        self.dropped += o.dropped;
        self.delayed += o.delayed;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
    }
}

/// Counters of a [`MemNetwork`], per message type.
#[derive(Clone, Debug, Default)]
pub struct NetStats {
    pub by_kind: HashMap<MessageType, KindStats>,
    /// `report_unreachable` calls made.
    pub unreachable_reports: u64,
}

impl NetStats {
    /// Counters of one message type.
    pub fn kind(&self, kind: MessageType) -> KindStats {
        self.by_kind.get(&kind).copied().unwrap_or_default()
    }

    /// Counters summed over every message type.
    pub fn total(&self) -> KindStats {
        let mut t = KindStats::default();
        for s in self.by_kind.values() {
            t.add(s);
        }
        t
    }
}

impl fmt::Display for NetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<_> = self.by_kind.iter().collect();
        kinds.sort_by_key(|(k, _)| **k as i32);
        for (k, s) in kinds {
            writeln!(
                f,
                "{k:?}: sent {} delivered {} dropped {} delayed {} duplicated {} reordered {}",
                s.sent, s.delivered, s.dropped, s.delayed, s.duplicated, s.reordered
            )?;
        }
        write!(f, "unreachable reports: {}", self.unreachable_reports)
    }
}

/// The in-process network: a cheap `Clone` handle to one shared hub.
#[derive(Clone)]
pub struct MemNetwork {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemNetwork")
            .field("seed", &self.inner.seed)
            .finish_non_exhaustive()
    }
}

/// The [`Transport`] of one node on a [`MemNetwork`].
pub struct MemTransport {
    node: NodeId,
    inner: Arc<Inner>,
}

impl fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemTransport")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

struct Inner {
    seed: u64,
    state: Mutex<State>,
}

struct State {
    rng: SmallRng,
    /// Monotonic sequence number: ties between items due at the same instant keep send order.
    seq: u64,
    nodes: HashMap<NodeId, NodeEntry>,
    /// Partitions, cuts, isolations and custom filters (shared with `filter`).
    rules: Rules,
    all_links: Faults,
    links: HashMap<(NodeId, NodeId), Faults>,
    stats: NetStats,
}

struct NodeEntry {
    tx: Sender<Item>,
    alive: Arc<AtomicBool>,
}

/// One unit of work for a node's delivery thread.
struct Item {
    at: Instant,
    seq: u64,
    hold: bool,
    work: Work,
}

enum Work {
    Deliver {
        from: NodeId,
        batch: Vec<Envelope>,
        /// Whether the sender wants snapshot reports for the `MsgSnapshot`s in `batch`
        /// (false for duplicate copies).
        report: bool,
    },
    Unreachable(NodeId),
    Snapshot(CellId, NodeId, SnapshotStatus),
}

// Min-heap by (at, seq).
impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

impl MemNetwork {
    /// A network with no nodes and no faults. `seed` drives every random fault.
    pub fn new(seed: u64) -> Self {
        MemNetwork {
            inner: Arc::new(Inner {
                seed,
                state: Mutex::new(State {
                    rng: SmallRng::seed_from_u64(seed),
                    seq: 0,
                    nodes: HashMap::new(),
                    rules: Rules::default(),
                    all_links: Faults::none(),
                    links: HashMap::new(),
                    stats: NetStats::default(),
                }),
            }),
        }
    }

    /// The seed this network was built with (print it when a test fails).
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// Attach `node` with the sink that receives its messages and reports. Registering a node
    /// again (after [`kill`](Self::kill) or to replace its sink) starts a fresh inbox; messages
    /// still queued for the old one are discarded.
    pub fn register(&self, node: NodeId, sink: Arc<dyn MessageSink>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let alive = Arc::new(AtomicBool::new(true));
        let old = self.inner.state.lock().nodes.insert(
            node,
            NodeEntry {
                tx,
                alive: alive.clone(),
            },
        );
        if let Some(old) = old {
            old.alive.store(false, Ordering::SeqCst);
        }
        let weak = Arc::downgrade(&self.inner);
        let spawned = thread::Builder::new()
            .name(format!("mem-net-{node}"))
            .spawn(move || inbox_loop(node, rx, alive, sink, weak));
        if let Err(e) = spawned {
            tracing::error!(%node, error = %e, "mem network: cannot spawn delivery thread");
            self.kill(node);
        }
    }

    /// Take `node` down: its inbox is discarded, messages sent to it are dropped and each sender
    /// gets `report_unreachable`; messages it sends are dropped. Undo with
    /// [`register`](Self::register).
    pub fn kill(&self, node: NodeId) {
        if let Some(old) = self.inner.state.lock().nodes.remove(&node) {
            old.alive.store(false, Ordering::SeqCst);
        }
    }

    /// Alias of [`kill`](Self::kill).
    pub fn unregister(&self, node: NodeId) {
        self.kill(node);
    }

    /// Whether `node` is registered and not killed.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.inner.state.lock().nodes.contains_key(&node)
    }

    /// The transport `node` sends through.
    pub fn transport(&self, node: NodeId) -> Arc<dyn Transport> {
        Arc::new(self.endpoint(node))
    }

    /// The concrete transport of `node`.
    pub fn endpoint(&self, node: NodeId) -> MemTransport {
        MemTransport {
            node,
            inner: self.inner.clone(),
        }
    }

    /// Split the listed nodes into groups that cannot reach each other (both directions).
    /// Nodes not listed keep reaching everyone. Replaces any previous partition.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        self.inner.state.lock().rules.partition(groups);
    }

    /// Drop every message from `from` to `to` (one way).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.inner.state.lock().rules.cut(from, to);
    }

    /// Drop every message to and from `node`.
    pub fn isolate(&self, node: NodeId) {
        self.inner.state.lock().rules.isolate(node);
    }

    /// Undo [`partition`](Self::partition), [`cut`](Self::cut) and [`isolate`](Self::isolate).
    /// Probabilistic faults and custom filters stay; see [`clear_faults`](Self::clear_faults).
    pub fn heal(&self) {
        self.inner.state.lock().rules.heal();
    }

    /// Faults for every link that has no faults of its own.
    pub fn set_faults(&self, faults: Faults) {
        self.inner.state.lock().all_links = faults;
    }

    /// Faults for the link `from -> to` (one way), replacing the network-wide ones there.
    pub fn set_link_faults(&self, from: NodeId, to: NodeId, faults: Faults) {
        self.inner.state.lock().links.insert((from, to), faults);
    }

    /// Drop every message for which `pred(from, to, envelope)` is true, e.g. only `MsgAppend`
    /// to node 3.
    pub fn drop_if(
        &self,
        pred: impl Fn(NodeId, NodeId, &Envelope) -> bool + Send + Sync + 'static,
    ) -> FilterId {
        self.inner.state.lock().rules.add_filter(Arc::new(pred))
    }

    /// Remove a filter added by [`drop_if`](Self::drop_if).
    pub fn remove_filter(&self, id: FilterId) {
        self.inner.state.lock().rules.remove_filter(id);
    }

    /// Heal, and remove every probabilistic fault and custom filter.
    pub fn clear_faults(&self) {
        self.heal();
        let mut s = self.inner.state.lock();
        s.all_links = Faults::none();
        s.links.clear();
        s.rules.clear_filters();
    }

    /// A copy of the counters.
    pub fn stats(&self) -> NetStats {
        self.inner.state.lock().stats.clone()
    }

    /// Zero the counters.
    pub fn reset_stats(&self) {
        self.inner.state.lock().stats = NetStats::default();
    }
}

impl Transport for MemTransport {
    fn send(&self, to: NodeId, batch: Vec<Envelope>) {
        self.inner.send(self.node, to, batch);
    }
}

impl Inner {
    fn send(&self, from: NodeId, to: NodeId, batch: Vec<Envelope>) {
        if batch.is_empty() {
            return;
        }
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let now = Instant::now();
        for env in &batch {
            s.stats.by_kind.entry(env.msg.msg_type).or_default().sent += 1;
        }
        let sender_up = s.nodes.contains_key(&from);
        let dest_up = s.nodes.contains_key(&to);
        if !sender_up || !dest_up {
            for env in &batch {
                s.stats.by_kind.entry(env.msg.msg_type).or_default().dropped += 1;
            }
            if sender_up {
                s.stats.unreachable_reports += 1;
                s.report(from, Work::Unreachable(to), now);
                for env in &batch {
                    if env.msg.msg_type == MessageType::MsgSnapshot {
                        s.report(
                            from,
                            Work::Snapshot(env.cell, to, SnapshotStatus::Failure),
                            now,
                        );
                    }
                }
            }
            return;
        }
        let link_cut = s.rules.is_cut(from, to);
        let faults = s.links.get(&(from, to)).copied().unwrap_or(s.all_links);
        let filters: Vec<Arc<DropPredicate>> = s.rules.predicates();

        // Consecutive envelopes with the same fate travel together.
        let mut pending: Vec<(Duration, bool, Vec<Envelope>)> = Vec::new();
        let mut dups: Vec<(Duration, Envelope)> = Vec::new();
        for env in batch {
            let kind = env.msg.msg_type;
            let dropped = link_cut
                || filters.iter().any(|f| f(from, to, &env))
                || (faults.drop > 0.0 && s.rng.gen_bool(faults.drop.min(1.0)));
            if dropped {
                s.stats.by_kind.entry(kind).or_default().dropped += 1;
                if kind == MessageType::MsgSnapshot {
                    s.report(
                        from,
                        Work::Snapshot(env.cell, to, SnapshotStatus::Failure),
                        now,
                    );
                }
                continue;
            }
            let delay = match faults.delay {
                None => Duration::ZERO,
                Some(Delay::Fixed(d)) => d,
                Some(Delay::Uniform { min, max }) if max > min => s.rng.gen_range(min..=max),
                Some(Delay::Uniform { min, .. }) => min,
            };
            if !delay.is_zero() {
                s.stats.by_kind.entry(kind).or_default().delayed += 1;
            }
            let hold = faults.reorder > 0.0 && s.rng.gen_bool(faults.reorder.min(1.0));
            if hold {
                s.stats.by_kind.entry(kind).or_default().reordered += 1;
            }
            if faults.duplicate > 0.0 && s.rng.gen_bool(faults.duplicate.min(1.0)) {
                s.stats.by_kind.entry(kind).or_default().duplicated += 1;
                dups.push((delay, env.clone()));
            }
            match pending.last_mut() {
                Some((d, h, v)) if *d == delay && *h == hold => v.push(env),
                _ => pending.push((delay, hold, vec![env])),
            }
        }
        for (delay, hold, batch) in pending {
            let work = Work::Deliver {
                from,
                batch,
                report: true,
            };
            s.push(to, now + delay, hold, work);
        }
        for (delay, env) in dups {
            let work = Work::Deliver {
                from,
                batch: vec![env],
                report: false,
            };
            s.push(to, now + delay, false, work);
        }
    }
}

impl State {
    fn push(&mut self, node: NodeId, at: Instant, hold: bool, work: Work) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(entry) = self.nodes.get(&node) {
            // A send error means the inbox thread is gone: the node is being replaced or killed.
            let _ = entry.tx.send(Item {
                at,
                seq,
                hold,
                work,
            });
        }
    }

    /// Queue a report for `node`'s sink, on `node`'s own delivery thread.
    fn report(&mut self, node: NodeId, work: Work, now: Instant) {
        self.push(node, now, false, work);
    }
}

/// A node's delivery thread: waits until items are due and hands them to the sink.
fn inbox_loop(
    node: NodeId,
    rx: Receiver<Item>,
    alive: Arc<AtomicBool>,
    sink: Arc<dyn MessageSink>,
    net: Weak<Inner>,
) {
    let mut heap: BinaryHeap<Item> = BinaryHeap::new();
    let mut held: Vec<(Instant, Item)> = Vec::new();
    loop {
        let next = heap
            .peek()
            .map(|i| i.at)
            .into_iter()
            .chain(held.iter().map(|(d, _)| *d))
            .min();
        let got = match next {
            Some(at) => rx.recv_deadline(at),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(item) => heap.push(item),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while let Ok(item) = rx.try_recv() {
            heap.push(item);
        }
        if !alive.load(Ordering::SeqCst) {
            break;
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|i| i.at <= now) {
            let Some(item) = heap.pop() else { break };
            if item.hold {
                held.push((now + REORDER_MAX_HOLD, item));
                continue;
            }
            let delivered = matches!(item.work, Work::Deliver { .. });
            run(node, item.work, &sink, &net);
            if delivered {
                // Release held messages behind a later one: that is the reordering.
                for (_, h) in held.drain(..) {
                    run(node, h.work, &sink, &net);
                }
            }
        }
        let mut i = 0;
        while i < held.len() {
            if held[i].0 <= now {
                let (_, h) = held.remove(i);
                run(node, h.work, &sink, &net);
            } else {
                i += 1;
            }
        }
    }
    // Whatever is still queued was in flight to a node that went down.
    let mut lost: Vec<Item> = heap.into_vec();
    lost.extend(held.into_iter().map(|(_, i)| i));
    lost.extend(rx.try_iter());
    if let Some(net) = net.upgrade() {
        let mut s = net.state.lock();
        let now = Instant::now();
        for item in lost {
            if let Work::Deliver {
                from,
                batch,
                report: true,
            } = item.work
            {
                for env in batch {
                    if env.msg.msg_type == MessageType::MsgSnapshot {
                        s.report(
                            from,
                            Work::Snapshot(env.cell, node, SnapshotStatus::Failure),
                            now,
                        );
                    }
                }
            }
        }
    }
}

fn run(node: NodeId, work: Work, sink: &Arc<dyn MessageSink>, net: &Weak<Inner>) {
    match work {
        Work::Deliver {
            from,
            batch,
            report,
        } => {
            let snaps: Vec<CellId> = if report {
                batch
                    .iter()
                    .filter(|e| e.msg.msg_type == MessageType::MsgSnapshot)
                    .map(|e| e.cell)
                    .collect()
            } else {
                Vec::new()
            };
            if let Some(net) = net.upgrade() {
                let mut s = net.state.lock();
                for env in &batch {
                    s.stats
                        .by_kind
                        .entry(env.msg.msg_type)
                        .or_default()
                        .delivered += 1;
                }
            }
            sink.deliver(from, batch);
            if !snaps.is_empty() {
                if let Some(net) = net.upgrade() {
                    let mut s = net.state.lock();
                    let now = Instant::now();
                    for cell in snaps {
                        s.report(
                            from,
                            Work::Snapshot(cell, node, SnapshotStatus::Finish),
                            now,
                        );
                    }
                }
            }
        }
        Work::Unreachable(to) => sink.report_unreachable(to),
        Work::Snapshot(cell, to, status) => sink.report_snapshot(cell, to, status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Condvar;
    use raft::eraftpb::Message;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[derive(Clone, Debug, PartialEq)]
    enum Event {
        Msg {
            from: NodeId,
            cell: CellId,
            index: u64,
        },
        Unreachable(NodeId),
        Snap(CellId, NodeId, SnapshotStatus),
    }

    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<Event>>,
        cv: Condvar,
    }

    impl MessageSink for Recorder {
        fn deliver(&self, from: NodeId, batch: Vec<Envelope>) {
            let mut e = self.events.lock();
            for env in batch {
                e.push(Event::Msg {
                    from,
                    cell: env.cell,
                    index: env.msg.index,
                });
            }
            self.cv.notify_all();
        }
        fn report_unreachable(&self, node: NodeId) {
            self.events.lock().push(Event::Unreachable(node));
            self.cv.notify_all();
        }
        fn report_snapshot(&self, cell: CellId, to: NodeId, status: SnapshotStatus) {
            self.events.lock().push(Event::Snap(cell, to, status));
            self.cv.notify_all();
        }
    }

    impl Recorder {
        /// Wait (bounded) until `pred` holds over the events; returns them.
        fn wait(&self, pred: impl Fn(&[Event]) -> bool) -> Vec<Event> {
            let deadline = Instant::now() + DEADLINE;
            let mut e = self.events.lock();
            while !pred(&e) {
                if self.cv.wait_until(&mut e, deadline).timed_out() {
                    panic!("timed out; events: {:?}", *e);
                }
            }
            e.clone()
        }
        fn indexes(&self) -> Vec<u64> {
            self.events
                .lock()
                .iter()
                .filter_map(|e| match e {
                    Event::Msg { index, .. } => Some(*index),
                    _ => None,
                })
                .collect()
        }
        fn msgs(e: &[Event]) -> usize {
            e.iter().filter(|e| matches!(e, Event::Msg { .. })).count()
        }
    }

    fn env(kind: MessageType, index: u64) -> Envelope {
        let msg = Message {
            msg_type: kind,
            index,
            ..Default::default()
        };
        Envelope {
            cell: CellId(1),
            msg,
        }
    }

    fn app(index: u64) -> Envelope {
        env(MessageType::MsgAppend, index)
    }

    fn cluster(n: u64, seed: u64) -> (MemNetwork, Vec<Arc<Recorder>>) {
        let net = MemNetwork::new(seed);
        let mut sinks = Vec::new();
        for i in 1..=n {
            let r = Arc::new(Recorder::default());
            net.register(NodeId(i), r.clone());
            sinks.push(r);
        }
        (net, sinks)
    }

    /// Send a marker through a clean link and wait for it: everything sent before it on a
    /// FIFO link has been handled by then.
    fn flush(net: &MemNetwork, from: u64, to: u64, sink: &Recorder) {
        net.endpoint(NodeId(from))
            .send(NodeId(to), vec![app(u64::MAX)]);
        sink.wait(|e| {
            e.iter().any(|e| {
                matches!(
                    e,
                    Event::Msg {
                        index: u64::MAX,
                        ..
                    }
                )
            })
        });
    }

    #[test]
    fn delivers_in_order_on_another_thread() {
        let (net, sinks) = cluster(2, 1);
        let t = net.transport(NodeId(1));
        for i in 0..100 {
            t.send(NodeId(2), vec![app(2 * i), app(2 * i + 1)]);
        }
        sinks[1].wait(|e| Recorder::msgs(e) == 200);
        assert_eq!(sinks[1].indexes(), (0..200).collect::<Vec<_>>());
        assert_eq!(net.stats().kind(MessageType::MsgAppend).delivered, 200);
    }

    /// A sink that sends from inside `deliver` must not deadlock (no re-entrant locking).
    #[test]
    fn sink_may_send_from_deliver() {
        struct Echo {
            t: Arc<dyn Transport>,
        }
        impl MessageSink for Echo {
            fn deliver(&self, from: NodeId, batch: Vec<Envelope>) {
                self.t.send(from, batch);
            }
            fn report_unreachable(&self, _: NodeId) {}
            fn report_snapshot(&self, _: CellId, _: NodeId, _: SnapshotStatus) {}
        }
        let net = MemNetwork::new(2);
        let r = Arc::new(Recorder::default());
        net.register(NodeId(1), r.clone());
        net.register(
            NodeId(2),
            Arc::new(Echo {
                t: net.transport(NodeId(2)),
            }),
        );
        net.endpoint(NodeId(1)).send(NodeId(2), vec![app(7)]);
        r.wait(|e| Recorder::msgs(e) == 1);
    }

    #[test]
    fn partition_cut_isolate_heal() {
        let (net, sinks) = cluster(3, 3);
        let (n1, n2, n3) = (NodeId(1), NodeId(2), NodeId(3));
        net.partition(&[&[n1], &[n2, n3]]);
        net.endpoint(n1).send(n2, vec![app(1)]);
        net.endpoint(n2).send(n1, vec![app(2)]);
        flush(&net, 3, 2, &sinks[1]);
        flush(&net, 1, 1, &sinks[0]);
        assert_eq!(sinks[1].indexes(), vec![u64::MAX]);
        assert_eq!(sinks[0].indexes(), vec![u64::MAX]);

        net.heal();
        net.cut(n1, n2);
        net.endpoint(n1).send(n2, vec![app(3)]);
        net.endpoint(n2).send(n1, vec![app(4)]);
        sinks[0].wait(|e| Recorder::msgs(e) == 2);
        flush(&net, 3, 2, &sinks[1]);
        assert!(!sinks[1].indexes().contains(&3));

        net.heal();
        net.isolate(n3);
        net.endpoint(n3).send(n1, vec![app(5)]);
        net.endpoint(n1).send(n3, vec![app(6)]);
        flush(&net, 2, 1, &sinks[0]);
        assert!(!sinks[0].indexes().contains(&5));
        net.heal();
        flush(&net, 1, 3, &sinks[2]);
        assert_eq!(sinks[2].indexes(), vec![u64::MAX]);

        net.heal();
        net.endpoint(n1).send(n2, vec![app(8)]);
        sinks[1].wait(|e| {
            e.contains(&Event::Msg {
                from: n1,
                cell: CellId(1),
                index: 8,
            })
        });
        assert!(net.stats().kind(MessageType::MsgAppend).dropped >= 3);
    }

    #[test]
    fn isolate_blocks_self_loop_too() {
        // Documented behaviour: an isolated node cannot reach itself either.
        let (net, sinks) = cluster(1, 4);
        net.isolate(NodeId(1));
        net.endpoint(NodeId(1)).send(NodeId(1), vec![app(1)]);
        net.heal();
        flush(&net, 1, 1, &sinks[0]);
        assert_eq!(sinks[0].indexes(), vec![u64::MAX]);
    }

    #[test]
    fn drop_with_probability_is_seeded() {
        let run = |seed| {
            let (net, sinks) = cluster(2, seed);
            net.set_link_faults(NodeId(1), NodeId(2), Faults::drop(0.5));
            let t = net.endpoint(NodeId(1));
            for i in 0..400 {
                t.send(NodeId(2), vec![app(i)]);
            }
            net.clear_faults();
            flush(&net, 1, 2, &sinks[1]);
            let got = sinks[1].indexes();
            let dropped = net.stats().kind(MessageType::MsgAppend).dropped;
            assert_eq!(got.len() as u64 - 1 + dropped, 400);
            (got, dropped)
        };
        let (a, dropped) = run(42);
        assert!((100..300).contains(&dropped), "dropped {dropped}");
        assert_eq!(run(42).0, a, "same seed, same drops");
    }

    #[test]
    fn fixed_delay_holds_messages_back() {
        let (net, sinks) = cluster(2, 5);
        let d = Duration::from_millis(100);
        net.set_faults(Faults::delay(Delay::Fixed(d)));
        let t0 = Instant::now();
        net.endpoint(NodeId(1))
            .send(NodeId(2), vec![app(1), app(2)]);
        sinks[1].wait(|e| Recorder::msgs(e) == 2);
        assert!(t0.elapsed() >= d);
        assert_eq!(sinks[1].indexes(), vec![1, 2]);
        assert_eq!(net.stats().kind(MessageType::MsgAppend).delayed, 2);
    }

    #[test]
    fn random_delay_delivers_everything() {
        let (net, sinks) = cluster(2, 6);
        net.set_faults(Faults::delay(Delay::Uniform {
            min: Duration::from_millis(1),
            max: Duration::from_millis(30),
        }));
        let t = net.endpoint(NodeId(1));
        for i in 0..50 {
            t.send(NodeId(2), vec![app(i)]);
        }
        sinks[1].wait(|e| Recorder::msgs(e) == 50);
        let mut got = sinks[1].indexes();
        got.sort_unstable();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn duplicate_delivers_copies() {
        let (net, sinks) = cluster(2, 7);
        net.set_faults(Faults::duplicate(1.0));
        net.endpoint(NodeId(1))
            .send(NodeId(2), vec![app(1), app(2)]);
        sinks[1].wait(|e| Recorder::msgs(e) == 4);
        let mut got = sinks[1].indexes();
        got.sort_unstable();
        assert_eq!(got, vec![1, 1, 2, 2]);
        assert_eq!(net.stats().kind(MessageType::MsgAppend).duplicated, 2);
    }

    #[test]
    fn reorder_releases_held_message_after_a_later_one() {
        let (net, sinks) = cluster(2, 8);
        let t = net.endpoint(NodeId(1));
        net.set_faults(Faults::reorder(1.0));
        t.send(NodeId(2), vec![app(1)]);
        net.set_faults(Faults::none());
        t.send(NodeId(2), vec![app(2)]);
        sinks[1].wait(|e| Recorder::msgs(e) == 2);
        assert_eq!(sinks[1].indexes(), vec![2, 1]);
        assert_eq!(net.stats().total().reordered, 1);
    }

    #[test]
    fn reorder_without_later_message_is_released_by_timeout() {
        let (net, sinks) = cluster(2, 9);
        net.set_faults(Faults::reorder(1.0));
        net.endpoint(NodeId(1)).send(NodeId(2), vec![app(1)]);
        sinks[1].wait(|e| Recorder::msgs(e) == 1);
    }

    #[test]
    fn killed_node_is_reported_unreachable_and_can_come_back() {
        let (net, sinks) = cluster(2, 10);
        net.kill(NodeId(2));
        assert!(!net.is_up(NodeId(2)));
        net.endpoint(NodeId(1)).send(NodeId(2), vec![app(1)]);
        sinks[0].wait(|e| e.contains(&Event::Unreachable(NodeId(2))));
        // A down node sends nothing.
        net.endpoint(NodeId(2)).send(NodeId(1), vec![app(2)]);
        assert_eq!(net.stats().unreachable_reports, 1);

        let fresh = Arc::new(Recorder::default());
        net.register(NodeId(2), fresh.clone());
        net.endpoint(NodeId(1)).send(NodeId(2), vec![app(3)]);
        fresh.wait(|e| Recorder::msgs(e) == 1);
        assert_eq!(fresh.indexes(), vec![3]);
        assert!(sinks[1].indexes().is_empty());
    }

    #[test]
    fn custom_filter_drops_only_matching_messages() {
        let (net, sinks) = cluster(3, 11);
        let id =
            net.drop_if(|_, to, e| to == NodeId(3) && e.msg.msg_type == MessageType::MsgAppend);
        let t = net.endpoint(NodeId(1));
        t.send(NodeId(3), vec![app(1), env(MessageType::MsgHeartbeat, 2)]);
        t.send(NodeId(2), vec![app(3)]);
        sinks[2].wait(|e| Recorder::msgs(e) == 1);
        sinks[1].wait(|e| Recorder::msgs(e) == 1);
        assert_eq!(sinks[2].indexes(), vec![2]);
        net.remove_filter(id);
        t.send(NodeId(3), vec![app(4)]);
        sinks[2].wait(|e| Recorder::msgs(e) == 2);
        let st = net.stats();
        assert_eq!(st.kind(MessageType::MsgAppend).dropped, 1);
        assert_eq!(st.kind(MessageType::MsgHeartbeat).delivered, 1);
        assert!(st.to_string().contains("MsgAppend"));
    }

    #[test]
    fn snapshot_reports_finish_on_delivery_and_failure_on_drop() {
        let (net, sinks) = cluster(3, 12);
        let mut snap = env(MessageType::MsgSnapshot, 9);
        snap.msg.mut_snapshot().data = bytes::Bytes::from(vec![7u8; 1 << 20]);
        let t = net.endpoint(NodeId(1));
        t.send(NodeId(2), vec![snap.clone()]);
        sinks[0].wait(|e| e.contains(&Event::Snap(CellId(1), NodeId(2), SnapshotStatus::Finish)));
        assert_eq!(sinks[1].indexes(), vec![9]);

        net.cut(NodeId(1), NodeId(3));
        t.send(NodeId(3), vec![snap.clone()]);
        sinks[0].wait(|e| e.contains(&Event::Snap(CellId(1), NodeId(3), SnapshotStatus::Failure)));

        net.heal();
        net.kill(NodeId(3));
        t.send(NodeId(3), vec![snap]);
        sinks[0].wait(|e| {
            e.iter()
                .filter(|e| **e == Event::Snap(CellId(1), NodeId(3), SnapshotStatus::Failure))
                .count()
                == 2
        });
    }

    #[test]
    fn snapshot_in_flight_to_a_killed_node_fails() {
        let (net, sinks) = cluster(2, 13);
        net.set_faults(Faults::delay(Delay::Fixed(Duration::from_secs(30))));
        net.endpoint(NodeId(1))
            .send(NodeId(2), vec![env(MessageType::MsgSnapshot, 1)]);
        net.kill(NodeId(2));
        // Wake the killed inbox so it notices; it reports the lost snapshot.
        sinks[0].wait(|e| e.contains(&Event::Snap(CellId(1), NodeId(2), SnapshotStatus::Failure)));
    }
}
