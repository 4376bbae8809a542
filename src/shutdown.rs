//! Shutdown (docs/protocol.md#shutdown): the main thread catches SIGINT/SIGTERM and
//! triggers a [`ShutdownSignal`] that every shard awaits. Each shard then stops accepting,
//! stops reading, flushes its last batch to its peers and closes its mesh senders; a client
//! is closed once every batch bound for it has been delivered: its outbox is flushed, then
//! N3, then FIN. The whole drain is bounded by `shutdown_grace_ms`; a second signal exits
//! at once.
//!
//! [`Drain`] is one shard's side of it: whether the drain has begun, whether batches can
//! still arrive for its clients, and a [`ConnectionPass`] per connection task, which the
//! drain waits for.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Poll, Waker};

use crate::notify::NotifyAll;

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

/// One shard's drain state, shared by its tasks through an `Rc`.
#[derive(Default)]
pub struct Drain {
    /// Set when the drain starts: no more accepts or reads.
    started: Cell<bool>,
    /// The shard's flush task has sent its last batch.
    flush_done: Cell<bool>,
    /// Peer receivers that have not yet seen their sender close.
    open_receivers: Cell<usize>,
    /// Connection tasks holding a [`ConnectionPass`].
    connections: Cell<usize>,
    /// Signalled at every change above.
    progress: NotifyAll,
}

impl Drain {
    pub fn new() -> Rc<Drain> {
        Rc::new(Drain::default())
    }

    /// Counts one more receiver of batches from a peer, which the drain waits for until
    /// it reports [`Drain::on_receiver_done`].
    pub fn add_receiver(&self) {
        self.open_receivers.set(self.open_receivers.get() + 1);
    }

    pub fn begin(&self) {
        self.started.set(true);
        self.progress.notify_all();
    }

    pub fn is_started(&self) -> bool {
        self.started.get()
    }

    pub fn on_flush_done(&self) {
        self.flush_done.set(true);
        self.progress.notify_all();
    }

    pub fn on_receiver_done(&self) {
        self.open_receivers.set(self.open_receivers.get().saturating_sub(1));
        self.progress.notify_all();
    }

    /// Resolves once no more batches can arrive for this shard's clients: its own flush
    /// task has finished and every peer shard has closed its sender.
    pub async fn deliveries_finished(&self) {
        while !(self.flush_done.get() && self.open_receivers.get() == 0) {
            self.progress.wait().await;
        }
    }

    /// A pass for one connection task; the drain waits until every pass is dropped.
    pub fn enter(self: &Rc<Self>) -> ConnectionPass {
        self.connections.set(self.connections.get() + 1);
        ConnectionPass { drain: self.clone() }
    }

    /// Connection tasks still running.
    pub fn connections(&self) -> usize {
        self.connections.get()
    }

    /// Resolves once every [`ConnectionPass`] has been dropped.
    pub async fn connections_closed(&self) {
        while self.connections.get() > 0 {
            self.progress.wait().await;
        }
    }
}

/// Held by one connection task from its admission to its end.
pub struct ConnectionPass {
    drain: Rc<Drain>,
}

impl Drop for ConnectionPass {
    fn drop(&mut self) {
        let d = &self.drain;
        d.connections.set(d.connections.get().saturating_sub(1));
        d.progress.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_counts_connection_passes_and_peer_receivers() {
        let drain = Drain::new();
        drain.add_receiver();
        drain.add_receiver();
        let a = drain.enter();
        let b = drain.enter();
        assert_eq!(drain.connections(), 2);
        drop(a);
        assert_eq!(drain.connections(), 1);
        drop(b);
        assert_eq!(drain.connections(), 0);
        futures_lite::future::block_on(drain.connections_closed());
        drain.on_flush_done();
        drain.on_receiver_done();
        drain.on_receiver_done();
        futures_lite::future::block_on(drain.deliveries_finished());
        assert!(!drain.is_started());
        drain.begin();
        assert!(drain.is_started());
    }
}
