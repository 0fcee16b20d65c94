//! A shard's inbox: a multi-producer, single-consumer queue whose receiver sleeps without
//! spinning.
//!
//! A crossbeam channel's blocking receive spins and calls `sched_yield` several times before
//! it parks; on a small machine running many more threads than cores each yield is a syscall
//! and often a context switch, and the shard threads spent a measurable share of the server's
//! CPU there. This inbox is a `Mutex<VecDeque>` the receiver swaps out whole when its local
//! batch is used up (one lock per batch, not per command), and a `Condvar` the receiver waits
//! on with a deadline. A sender notifies only when the receiver said it is about to sleep:
//! the `sleeping` flag is set and read under the same mutex as the queue, so a push either
//! comes before the receiver's last look at the queue (it sees the item and does not sleep)
//! or after it set the flag (the sender sees it and wakes it); no wake-up is lost, and a busy
//! receiver costs its senders no syscall.
//!
//! Semantics are a channel's: items come out in push order (so in order per sender); the
//! receiver sees `Disconnected` once every sender is gone and the queue is empty; a send
//! after the receiver is gone fails and hands the item back, and items still queued when the
//! receiver goes are dropped (their reply senders resolve their callers as stopped).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a receive returned no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecvError {
    /// Nothing arrived before the deadline (or, for `try_recv`, nothing is queued).
    Empty,
    /// Every sender is gone and nothing is queued.
    Disconnected,
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Empty => f.write_str("inbox empty"),
            RecvError::Disconnected => f.write_str("inbox disconnected"),
        }
    }
}

/// How long a receive may wait.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    No,
    Until(Instant),
    Forever,
}

struct State<T> {
    items: VecDeque<T>,
    /// The receiver is waiting (or about to): the next push notifies it.
    sleeping: bool,
    senders: usize,
    /// The receiver is gone: sends fail.
    closed: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
}

impl<T> Shared<T> {
    /// The lock; a panic while holding it (none of the critical sections below can panic
    /// short of an allocation failure) leaves the state consistent, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A new inbox: its first sender and its receiver.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            sleeping: false,
            senders: 1,
            closed: false,
        }),
        wake: Condvar::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver {
            shared,
            batch: VecDeque::new(),
        },
    )
}

/// The sending half; clone it for every producer.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `item`; `Err(item)` if the receiver is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(item);
        }
        st.items.push_back(item);
        let wake = std::mem::replace(&mut st.sleeping, false);
        drop(st);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.senders -= 1;
        let wake = st.senders == 0 && st.sleeping;
        drop(st);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

/// The receiving half (one consumer).
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The last batch taken from the queue, not received yet.
    batch: VecDeque<T>,
}

impl<T> Receiver<T> {
    /// The next item, without waiting.
    pub(crate) fn try_recv(&mut self) -> Result<T, RecvError> {
        self.recv_until(Wait::No)
    }

    /// The next item, waiting at most `wait` for one.
    pub(crate) fn recv_timeout(&mut self, wait: Duration) -> Result<T, RecvError> {
        // A deadline too far to represent waits "forever" (until an item or a disconnect).
        match Instant::now().checked_add(wait) {
            Some(deadline) => self.recv_until(Wait::Until(deadline)),
            None => self.recv_until(Wait::Forever),
        }
    }

    /// The next item, waiting as long as it takes; `Err` only when disconnected.
    pub(crate) fn recv(&mut self) -> Result<T, RecvError> {
        self.recv_until(Wait::Forever)
    }

    fn recv_until(&mut self, wait: Wait) -> Result<T, RecvError> {
        if let Some(item) = self.batch.pop_front() {
            return Ok(item);
        }
        let mut st = self.shared.lock();
        loop {
            if !st.items.is_empty() {
                st.sleeping = false;
                // The local batch is empty: swapping hands its capacity back to the queue.
                std::mem::swap(&mut st.items, &mut self.batch);
                drop(st);
                return self.batch.pop_front().ok_or(RecvError::Empty);
            }
            if st.senders == 0 {
                st.sleeping = false;
                return Err(RecvError::Disconnected);
            }
            let left = match wait {
                Wait::No => Duration::ZERO,
                Wait::Until(d) => d.saturating_duration_since(Instant::now()),
                Wait::Forever => Duration::MAX,
            };
            if left.is_zero() {
                st.sleeping = false;
                return Err(RecvError::Empty);
            }
            // Set under the lock that guards the queue: a push after this sees it.
            st.sleeping = true;
            st = if wait == Wait::Forever {
                self.shared.wake.wait(st).unwrap_or_else(|e| e.into_inner())
            } else {
                match self.shared.wake.wait_timeout(st, left) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                }
            };
        }
    }

    /// Nothing queued (neither in the local batch nor behind the lock).
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.shared.lock().items.is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut st = self.shared.lock();
            st.closed = true;
            std::mem::take(&mut st.items)
        };
        // Dropped outside the lock: an item's drop may run arbitrary code.
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Many senders, a receiver that sleeps between drains: every item arrives exactly once,
    /// in order per sender, and the receiver's bounded waits return.
    #[test]
    fn every_item_once_in_order_per_sender() {
        const SENDERS: u64 = 8;
        const PER: u64 = 20_000;
        let (tx, mut rx) = channel::<(u64, u64)>();
        let handles: Vec<_> = (0..SENDERS)
            .map(|s| {
                let tx = tx.clone();
                thread::spawn(move || {
                    for i in 0..PER {
                        tx.send((s, i)).expect("receiver alive");
                        if i.is_multiple_of(1000) {
                            thread::sleep(Duration::from_micros(200));
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = vec![0u64; SENDERS as usize];
        let mut got = 0u64;
        let mut rounds = 0u64;
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < give_up, "stuck after {got} items");
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok((s, i)) => {
                    assert_eq!(i, next[s as usize], "sender {s} out of order");
                    next[s as usize] += 1;
                    got += 1;
                }
                Err(RecvError::Empty) => continue,
                Err(RecvError::Disconnected) => break,
            }
            // Drain what is there, then sleep now and then so senders find it asleep or busy.
            while let Ok((s, i)) = rx.try_recv() {
                assert_eq!(i, next[s as usize], "sender {s} out of order");
                next[s as usize] += 1;
                got += 1;
            }
            rounds += 1;
            if rounds.is_multiple_of(7) {
                thread::sleep(Duration::from_micros(100));
            }
        }
        for h in handles {
            h.join().expect("sender");
        }
        assert_eq!(got, SENDERS * PER);
        assert!(next.iter().all(|&n| n == PER));
        assert!(rx.is_empty());
    }

    /// A receive with nothing to receive returns at its deadline, not before and not much
    /// after (bounded generously: this is a liveness check, not a timing benchmark).
    #[test]
    fn bounded_waits_return() {
        let (tx, mut rx) = channel::<u8>();
        let t0 = Instant::now();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(30)),
            Err(RecvError::Empty)
        );
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(30), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!(rx.try_recv(), Err(RecvError::Empty));
        assert_eq!(rx.recv_timeout(Duration::ZERO), Err(RecvError::Empty));
        assert!(rx.is_empty());
        tx.send(7).expect("send");
        assert!(!rx.is_empty());
        assert_eq!(rx.recv_timeout(Duration::ZERO), Ok(7));
        assert!(rx.is_empty());
    }

    /// A sleeping receiver is woken by a send (well before its long deadline) and by the
    /// last sender's drop (Disconnected), and only after the queue is drained.
    #[test]
    fn a_sleeping_receiver_is_woken() {
        let (tx, mut rx) = channel::<u32>();
        let t0 = Instant::now();
        let h = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            tx.send(1).expect("send");
            thread::sleep(Duration::from_millis(20));
            tx.send(2).expect("send");
            // tx dropped here: the receiver must still get 2 before Disconnected.
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(1));
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(2));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60)),
            Err(RecvError::Disconnected)
        );
        assert!(t0.elapsed() < Duration::from_secs(30));
        h.join().expect("sender");
        assert_eq!(rx.recv(), Err(RecvError::Disconnected));
    }

    /// Once the receiver is gone a send fails with the item, and queued items are dropped.
    #[test]
    fn a_send_to_a_dropped_receiver_fails() {
        let marker = Arc::new(());
        let (tx, rx) = channel::<Arc<()>>();
        tx.send(marker.clone()).expect("send");
        assert_eq!(Arc::strong_count(&marker), 2);
        drop(rx);
        assert_eq!(Arc::strong_count(&marker), 1, "queued items are dropped");
        let back = tx.send(marker.clone()).expect_err("receiver gone");
        assert!(Arc::ptr_eq(&back, &marker));
    }

    /// Stress without loom, bounded in time: in each of many rounds, four senders released
    /// together each push one item while the receiver is going to sleep, so pushes land on
    /// every side of "about to sleep". Each wait is bounded (10 s, far above any scheduling
    /// delay): a lost wake-up shows as an `Empty` instead of the item.
    #[test]
    fn stress_no_lost_wakeup() {
        use std::sync::Barrier;
        const SENDERS: u64 = 4;
        let stop_at = Instant::now() + Duration::from_secs(2);
        let (tx, mut rx) = channel::<(u64, u64)>();
        let go = Arc::new(Barrier::new(SENDERS as usize + 1));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let (tx, go, done) = (tx.clone(), go.clone(), done.clone());
                thread::spawn(move || {
                    let mut i = 0u64;
                    loop {
                        go.wait();
                        if done.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        if (i + s).is_multiple_of(3) {
                            thread::yield_now();
                        }
                        tx.send((s, i)).expect("send");
                        i += 1;
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u64; SENDERS as usize];
        let mut rounds = 0u64;
        while Instant::now() < stop_at {
            go.wait();
            for _ in 0..SENDERS {
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok((s, i)) => {
                        assert_eq!(i, next[s as usize], "round {rounds}: sender {s} order");
                        next[s as usize] += 1;
                    }
                    Err(e) => panic!("round {rounds}: {e} (a lost wake-up)"),
                }
            }
            rounds += 1;
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        go.wait();
        for h in senders {
            h.join().expect("sender");
        }
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(RecvError::Disconnected)
        );
        assert!(
            next.iter().all(|&n| n == rounds),
            "{next:?} after {rounds} rounds"
        );
    }
}
