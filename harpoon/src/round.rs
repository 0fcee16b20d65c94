//! Work deferred to the end of a shard round ([`defer`]).
//!
//! A shard thread answers many callers per round (replies are sent as entries apply). A
//! caller that would rather finish its work on that thread than pay a wake-up of another
//! thread per answer (the client port writes a request's response this way) queues a closure
//! with [`defer`] from the waker the shard calls. The closure runs on the same thread at the
//! end of the round (or earlier, just before the shard blocks on an inline log sync), when
//! the shard holds no lock and borrows no cell, in the order queued.
//! Closures queued while the queue runs (a flush after the responses it collects) run in
//! later passes of the same round, at most [`PASSES`]; whatever is left runs at the end of the
//! next round, which then does not wait for input.
//!
//! Closures must be short and must never wait on a shard: a closure that waits for an answer
//! of its own shard waits forever. A closure that panics is logged and dropped; the shard
//! goes on.

use std::cell::RefCell;

/// A closure queued with [`defer`].
type Deferred = Box<dyn FnOnce() + Send>;

/// Passes over the queue per round (closures queued by closures run in the next pass).
pub const PASSES: usize = 4;

thread_local! {
    /// `Some` on a shard thread: the closures queued this round.
    static QUEUE: RefCell<Option<Vec<Deferred>>> = const { RefCell::new(None) };
}

/// Queue `f` to run on this thread at the end of the current round if this is a shard
/// thread; otherwise give it back (the caller runs it some other way, e.g. as a runtime
/// task).
///
/// # Errors
/// `f` itself when the calling thread is not a shard thread.
pub fn defer<F: FnOnce() + Send + 'static>(f: F) -> std::result::Result<(), F> {
    QUEUE.with(|q| match q.borrow_mut().as_mut() {
        Some(v) => {
            v.push(Box::new(f));
            Ok(())
        }
        None => Err(f),
    })
}

/// Whether this thread is a shard thread (closures given to [`defer`] are queued).
pub fn on_shard_thread() -> bool {
    QUEUE.with(|q| q.borrow().is_some())
}

/// Make this thread a shard thread: [`defer`] queues from now on.
pub(crate) fn enable() {
    QUEUE.with(|q| *q.borrow_mut() = Some(Vec::new()));
}

/// Run what is queued (up to [`PASSES`] passes); `true` if closures are still queued.
pub(crate) fn run() -> bool {
    for _ in 0..PASSES {
        let batch = QUEUE.with(|q| q.borrow_mut().as_mut().map(std::mem::take));
        let Some(batch) = batch.filter(|b| !b.is_empty()) else {
            return false;
        };
        for f in batch {
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                tracing::error!(
                    reason = %crate::shard::panic_reason(&payload),
                    "a closure deferred to the end of a shard round panicked"
                );
            }
        }
    }
    pending()
}

/// Whether closures are queued on this thread.
pub(crate) fn pending() -> bool {
    QUEUE.with(|q| q.borrow().as_ref().is_some_and(|v| !v.is_empty()))
}

/// Run what is still queued (at most [`FINISH_ROUNDS`] rounds' worth of passes) and stop
/// queueing: the shard thread is ending. From here [`defer`] hands closures back.
pub(crate) fn finish() {
    for _ in 0..FINISH_ROUNDS {
        if !run() {
            break;
        }
    }
    QUEUE.with(|q| *q.borrow_mut() = None);
}

/// Rounds of passes [`finish`] runs at most (a closure that requeues itself forever is
/// dropped after them).
const FINISH_ROUNDS: usize = 64;

/// Run `f` on a new thread that queues like a shard thread, then run its queue as a round
/// would, and return `f`'s result: for tests of code that defers work.
#[doc(hidden)]
pub fn run_as_shard_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        enable();
        let r = f();
        finish();
        r
    })
    .join()
    .expect("the simulated shard thread panicked")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn off_a_shard_thread_the_closure_comes_back() {
        std::thread::spawn(|| {
            assert!(!on_shard_thread());
            let ran = Arc::new(AtomicUsize::new(0));
            let r = ran.clone();
            let back = defer(move || {
                r.fetch_add(1, Ordering::SeqCst);
            });
            let Err(f) = back else {
                panic!("queued off a shard thread")
            };
            f();
            assert_eq!(ran.load(Ordering::SeqCst), 1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn queued_closures_run_in_order_and_later_ones_in_later_passes() {
        std::thread::spawn(|| {
            enable();
            let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
            for i in 0..3 {
                let l = log.clone();
                assert!(defer(move || {
                    l.lock().push(i);
                    let l2 = l.clone();
                    // Queued while the queue runs: after every closure of this pass.
                    assert!(defer(move || l2.lock().push(10 + i)).is_ok());
                })
                .is_ok());
            }
            assert!(log.lock().is_empty(), "nothing runs before the round ends");
            assert!(!run());
            assert_eq!(*log.lock(), vec![0, 1, 2, 10, 11, 12]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_closure_that_keeps_requeueing_is_bounded_per_round() {
        std::thread::spawn(|| {
            enable();
            let runs = Arc::new(AtomicUsize::new(0));
            fn again(runs: Arc<AtomicUsize>) {
                runs.fetch_add(1, Ordering::SeqCst);
                let r = runs.clone();
                if runs.load(Ordering::SeqCst) < 100 {
                    assert!(defer(move || again(r)).is_ok());
                }
            }
            let r = runs.clone();
            assert!(defer(move || again(r)).is_ok());
            assert!(run(), "still queued after the round's passes");
            assert_eq!(runs.load(Ordering::SeqCst), PASSES);
            finish();
            assert_eq!(runs.load(Ordering::SeqCst), 100);
            assert!(!on_shard_thread());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_panicking_closure_does_not_stop_the_others() {
        std::thread::spawn(|| {
            enable();
            let ran = Arc::new(AtomicUsize::new(0));
            assert!(defer(|| panic!("boom")).is_ok());
            let r = ran.clone();
            assert!(defer(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .is_ok());
            assert!(!run());
            assert_eq!(ran.load(Ordering::SeqCst), 1);
        })
        .join()
        .unwrap();
    }
}
