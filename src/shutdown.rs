//! Shutdown (docs/protocol.md#shutdown): the main thread catches SIGINT/SIGTERM and triggers a
//! [`ShutdownSignal`] that every shard awaits. Each shard then stops accepting, stops
//! reading, flushes its last batch to its peers and closes its mesh senders; a client is
//! closed once every batch bound for it has been delivered: its outbox is flushed, then N3,
//! then FIN. The whole drain is bounded by `shutdown_grace_ms`; a second signal exits at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Poll, Waker};

/// Exit code after a second signal during the drain (128 + SIGINT, as shells report it).
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Set once by the main thread, awaited by one task per shard. Crosses threads on purpose:
/// the flag is atomic and the wakers sit behind a mutex that is taken once per shard.
#[derive(Default)]
pub struct ShutdownSignal {
    triggered: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl ShutdownSignal {
    /// Starts the drain on every shard.
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in wakers {
            w.wake();
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::SeqCst)
    }

    /// Resolves once `trigger` has been called. glommio wakers may be woken from any thread.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        futures_lite::future::poll_fn(move |cx| {
            if self.is_triggered() {
                return Poll::Ready(());
            }
            let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
            // One waker per waiting task, however often it is polled.
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            drop(wakers);
            // Re-check: a trigger between the first check and the push would be missed.
            if self.is_triggered() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}
