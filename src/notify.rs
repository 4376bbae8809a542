//! Shard-local wake-ups: a task parks on a [`Notify`] until another task on the same shard
//! has something for it. Single-threaded (`Cell`), so it is only ever touched by the shard
//! that owns it; a notification sent before the wait is not lost.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::task::{Poll, Waker};

/// One waiter (a connection's writer, the shard's flush task).
#[derive(Default)]
pub struct Notify {
    notified: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    /// Wakes the waiter, or lets its next `wait` return at once.
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves once `notify` has been called since the last `wait` returned.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        futures_lite::future::poll_fn(move |cx| {
            if self.notified.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

/// Any number of waiters, all released by one `notify_all` (readers paused on a shard-wide
/// condition). A waiter re-checks its condition after waking.
#[derive(Default)]
pub struct NotifyAll {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl NotifyAll {
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers {
            w.wake();
        }
    }

    /// Resolves at the next `notify_all` after this call.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        let start = self.generation.get();
        futures_lite::future::poll_fn(move |cx| {
            if self.generation.get() != start {
                Poll::Ready(())
            } else {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}
