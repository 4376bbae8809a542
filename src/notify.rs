//! Shard-local wake-ups: a task parks on a [`Notify`] until another task on the same shard
//! has something for it. Single-threaded (`Cell`), so only the shard that owns one touches
//! it; a notification sent before the wait is not lost. Neither type keeps more than one
//! waker per waiting future however often it is polled (glommio 0.9 panics past 32767
//! clones of one task's waker).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

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

    /// Forgets a notification not yet waited for. For a waiter that is about to re-read
    /// the state notifications announce: what it reads covers them.
    pub fn clear(&self) {
        self.notified.set(false);
    }

    /// Resolves once `notify` has been called since the last `wait` returned.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        futures_lite::future::poll_fn(move |cx| {
            if self.notified.replace(false) {
                Poll::Ready(())
            } else {
                // Replaces (and drops) the previous waker.
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

/// Any number of waiters, all released by one `notify_all` (readers paused on a shard-wide
/// condition). Each waiting future owns one slot; a waiter re-checks its condition after
/// waking.
#[derive(Default)]
pub struct NotifyAll {
    generation: Cell<u64>,
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl NotifyAll {
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers: Vec<Waker> = self.slots.borrow_mut().iter_mut().filter_map(Option::take).collect();
        for w in wakers {
            w.wake();
        }
    }

    /// True while any `wait` future is alive.
    pub fn has_waiters(&self) -> bool {
        self.slots.borrow().len() > self.free.borrow().len()
    }

    /// Resolves at the next `notify_all` after this call.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            owner: self,
            start: self.generation.get(),
            slot: None,
        }
    }
}

/// The future returned by [`NotifyAll::wait`].
pub struct Wait<'a> {
    owner: &'a NotifyAll,
    start: u64,
    slot: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.owner.generation.get() != self.start {
            return Poll::Ready(());
        }
        let mut slots = self.owner.slots.borrow_mut();
        match self.slot {
            Some(i) => match &mut slots[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                other => *other = Some(cx.waker().clone()),
            },
            None => {
                let i = self.owner.free.borrow_mut().pop().unwrap_or_else(|| {
                    slots.push(None);
                    slots.len() - 1
                });
                slots[i] = Some(cx.waker().clone());
                drop(slots);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            self.owner.slots.borrow_mut()[i] = None;
            self.owner.free.borrow_mut().push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn repeated_polls_keep_one_waker_per_waiter() {
        let n = NotifyAll::default();
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(n.wait());
        let mut b = Box::pin(n.wait());
        for _ in 0..100_000 {
            assert!(a.as_mut().poll(&mut cx).is_pending());
            assert!(b.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(n.slots.borrow().len(), 2);
        // `counter`, our `waker`, and one clone per waiter.
        assert_eq!(Arc::strong_count(&counter), 4);
        n.notify_all();
        assert_eq!(counter.0.load(Ordering::Relaxed), 2);
        assert!(a.as_mut().poll(&mut cx).is_ready());
        drop((a, b));
        let mut c = Box::pin(n.wait());
        assert!(c.as_mut().poll(&mut cx).is_pending());
        assert_eq!(n.slots.borrow().len(), 2, "freed slots are reused");
    }

    #[test]
    fn a_notify_before_the_wait_is_not_lost() {
        let n = Notify::default();
        n.notify();
        let waker = Waker::from(Arc::new(Counter(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        assert!(Box::pin(n.wait()).as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(n.wait()).as_mut().poll(&mut cx).is_pending());
    }
}
