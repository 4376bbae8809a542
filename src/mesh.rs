//! The cross-shard mesh: a bounded, lock-free, single-producer single-consumer channel
//! ([`channel`]) and a full mesh of them, one per ordered pair of peers ([`full_mesh`]).
//!
//! Nothing here knows about glommio: each end is a plain value that is `Send`, usable the
//! moment it exists (no connect step), and waits through `std::task::Waker`s, so any
//! executor or thread can hold an end (a shard, or later an uplink thread on another
//! runtime). glommio accepts a wake of one of its tasks from any thread: it queues the
//! waker on the task's executor and writes that executor's eventfd if it is asleep.
//!
//! Why not glommio's `shared_channel`: its `connect()` is a rendezvous that can miss its
//! wake-up for good. Each end stores its executor id in the ring and then polls for the
//! peer's; while that is 0 the task re-arms itself on every pass of its own reactor (a
//! busy poll), and the peer's `connect()` only stores an id: it never notifies this
//! executor. glommio 0.9's run loop can meanwhile park with that task queued and not run
//! (when the 2 ms preempt timer fired before `run_task_queues` looked, it returns without
//! running anything, and the park that follows counts only wakers woken in that pass; see
//! `executor::kick`). At start-up nothing else is armed, so the executor sleeps for ever:
//! every shard parked in `io_uring_enter`, the pending connect polled a few thousand times
//! and then never again; 8 shards on 2 CPUs hung 7 starts in 10, and none with a 100 ms
//! preempt timer or with a 3 s timer armed beside the connect (which released them at 3 s).
//! Here a waiting side stores its waker and the other side wakes it, which glommio
//! delivers across threads by writing the sleeping executor's eventfd.
//!
//! Invariants: one [`Sender`] and one [`Receiver`] per ring (neither is `Clone`, and the
//! waiting methods take `&mut self`, so each waker slot has one possible owner); items come
//! out in the order they went in; at most `capacity` items are in flight; a side is woken
//! only if it registered its waker because it had to wait (the ring was empty or full).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

/// The state both ends share.
struct Ring<T> {
    queue: ArrayQueue<T>,
    /// The receiver's waker while it waits for an item (the ring was empty); taken and
    /// woken by the sender's next push or its drop.
    items: AtomicWaker,
    /// The sender's waker while it waits for room (the ring was full); taken and woken by
    /// the receiver's next pop or its drop.
    room: AtomicWaker,
    /// Set when the sender is dropped: the receiver drains what is left, then ends.
    sender_gone: AtomicBool,
    /// Set when the receiver is dropped: sends fail and hand the item back.
    receiver_gone: AtomicBool,
}

/// The sending end of a [`channel`].
pub struct Sender<T> {
    ring: Arc<Ring<T>>,
}

/// How many items a ring holds now (see [`Sender::depth`]).
pub struct Depth<T> {
    ring: Arc<Ring<T>>,
}

impl<T> Depth<T> {
    pub fn get(&self) -> usize {
        self.ring.queue.len()
    }
}

/// The receiving end of a [`channel`].
pub struct Receiver<T> {
    ring: Arc<Ring<T>>,
}

/// Why [`Sender::try_send`] handed the item back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The ring holds `capacity` items.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// Why [`Receiver::try_recv`] returned no item.
#[derive(Debug, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing in the ring now.
    Empty,
    /// Nothing in the ring and the sender is gone: nothing more will come.
    Closed,
}

/// A bounded SPSC channel holding at most `capacity` items (at least 1).
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    // ArrayQueue panics on 0; the capacity is a constant of the caller, never input.
    let ring = Arc::new(Ring {
        queue: ArrayQueue::new(capacity.max(1)),
        items: AtomicWaker::new(),
        room: AtomicWaker::new(),
        sender_gone: AtomicBool::new(false),
        receiver_gone: AtomicBool::new(false),
    });
    (Sender { ring: ring.clone() }, Receiver { ring })
}

impl<T> Sender<T> {
    /// Queues `item` if there is room, and wakes the receiver if it is waiting.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.ring.receiver_gone.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(item));
        }
        match self.ring.queue.push(item) {
            Ok(()) => {
                // Takes the waker only if the receiver registered one (it found the ring
                // empty); otherwise this is one atomic operation and no wake-up.
                self.ring.items.wake();
                Ok(())
            }
            Err(item) => Err(TrySendError::Full(item)),
        }
    }

    /// Queues `item`, waiting while the ring is full. Hands the item back if the receiver
    /// is gone.
    pub fn send(&mut self, item: T) -> SendFuture<'_, T> {
        SendFuture {
            sender: self,
            item: Some(item),
        }
    }

    /// A handle that reads how many items the ring holds, for the producer's side only
    /// (one atomic load of each end; exact for this producer, stale by the consumer's
    /// takes in progress).
    pub fn depth(&self) -> Depth<T> {
        Depth {
            ring: self.ring.clone(),
        }
    }

    /// True once the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.ring.receiver_gone.load(Ordering::Acquire)
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, slot: &mut Option<T>) -> Poll<Result<(), T>> {
        let Some(item) = slot.take() else {
            // Polled again after it completed: nothing left to send.
            return Poll::Ready(Ok(()));
        };
        let item = match self.try_send(item) {
            Ok(()) => return Poll::Ready(Ok(())),
            Err(TrySendError::Closed(item)) => return Poll::Ready(Err(item)),
            Err(TrySendError::Full(item)) => item,
        };
        self.ring.room.register(cx.waker());
        // The receiver may have made room (or left) between the failed push and the
        // registration, without seeing a waker to wake: try once more.
        match self.try_send(item) {
            Ok(()) => {
                // Not waiting after all: drop the waker so a later pop does not wake us.
                drop(self.ring.room.take());
                Poll::Ready(Ok(()))
            }
            Err(TrySendError::Closed(item)) => Poll::Ready(Err(item)),
            Err(TrySendError::Full(item)) => {
                *slot = Some(item);
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.ring.sender_gone.store(true, Ordering::Release);
        self.ring.items.wake();
    }
}

/// The future of [`Sender::send`].
pub struct SendFuture<'a, T> {
    sender: &'a mut Sender<T>,
    item: Option<T>,
}

// Nothing in the future is pinned structurally: the item is moved in and out by value.
impl<T> Unpin for SendFuture<'_, T> {}

impl<T> Future for SendFuture<'_, T> {
    type Output = Result<(), T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.sender.poll_send(cx, &mut this.item)
    }
}

impl<T> Receiver<T> {
    /// Takes the oldest item, if any, and wakes the sender if it is waiting for room.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        if let Some(item) = self.ring.queue.pop() {
            self.ring.room.wake();
            return Ok(item);
        }
        if self.ring.sender_gone.load(Ordering::Acquire) {
            // Everything the sender pushed happened before it set the flag, so one more
            // look finds what it pushed after our failed pop.
            return self.ring.queue.pop().ok_or(TryRecvError::Closed);
        }
        Err(TryRecvError::Empty)
    }

    /// The next item, or `None` once the sender is gone and the ring is drained.
    pub fn recv(&mut self) -> RecvFuture<'_, T> {
        RecvFuture { receiver: self }
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self.try_recv() {
            Ok(item) => return Poll::Ready(Some(item)),
            Err(TryRecvError::Closed) => return Poll::Ready(None),
            Err(TryRecvError::Empty) => {}
        }
        self.ring.items.register(cx.waker());
        // An item (or the close) may have arrived between the empty pop and the
        // registration, without a waker to wake: look once more.
        match self.try_recv() {
            Ok(item) => {
                // Not waiting after all: drop the waker so a later push does not wake us.
                drop(self.ring.items.take());
                Poll::Ready(Some(item))
            }
            Err(TryRecvError::Closed) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.ring.receiver_gone.store(true, Ordering::Release);
        self.ring.room.wake();
    }
}

/// The future of [`Receiver::recv`].
pub struct RecvFuture<'a, T> {
    receiver: &'a mut Receiver<T>,
}

impl<T> Future for RecvFuture<'_, T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().receiver.poll_recv(cx)
    }
}

/// One peer's ends of a [`full_mesh`].
pub struct MeshEnds<T> {
    /// To each other peer, in peer order.
    pub to_peers: Vec<Sender<T>>,
    /// From each other peer, in peer order.
    pub from_peers: Vec<Receiver<T>>,
}

/// A channel of `capacity` for every ordered pair of `peers` distinct peers; element `i`
/// holds peer `i`'s ends. Built on one thread, then each element is moved to its peer.
pub fn full_mesh<T>(peers: usize, capacity: usize) -> Vec<MeshEnds<T>> {
    let mut ends: Vec<MeshEnds<T>> = (0..peers)
        .map(|_| MeshEnds {
            to_peers: Vec::with_capacity(peers.saturating_sub(1)),
            from_peers: Vec::with_capacity(peers.saturating_sub(1)),
        })
        .collect();
    for from in 0..peers {
        for to in 0..peers {
            if from != to {
                let (tx, rx) = channel(capacity);
                ends[from].to_peers.push(tx);
                ends[to].from_peers.push(rx);
            }
        }
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};
    use std::time::Duration;

    use futures_lite::future::block_on;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker::default());
        (counter.clone(), Waker::from(counter))
    }

    #[test]
    fn items_cross_threads_in_the_order_they_were_sent() {
        let (mut tx, mut rx) = channel::<u32>(8);
        let producer = std::thread::spawn(move || {
            block_on(async {
                for i in 0..10_000 {
                    tx.send(i).await.unwrap();
                }
            })
        });
        let got: Vec<u32> = block_on(async {
            let mut got = Vec::new();
            while let Some(i) = rx.recv().await {
                got.push(i);
            }
            got
        });
        producer.join().unwrap();
        assert_eq!(got, (0..10_000).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_ring_hands_the_item_back_until_the_receiver_takes_one() {
        let (tx, rx) = channel::<u32>(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.try_recv(), Ok(0));
        tx.try_send(3).unwrap();
        assert_eq!(tx.try_send(4), Err(TrySendError::Full(4)));
        assert_eq!(
            (1..4).map(|_| rx.try_recv().unwrap()).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn a_sender_waiting_for_room_is_woken_by_a_pop_and_then_sends() {
        let (mut tx, rx) = channel::<u32>(1);
        tx.try_send(0).unwrap();
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut send = tx.send(1);
        assert!(Pin::new(&mut send).poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        let rx = std::thread::spawn(move || {
            assert_eq!(rx.try_recv(), Ok(0));
            rx
        })
        .join()
        .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the pop wakes the waiting sender");
        assert_eq!(Pin::new(&mut send).poll(&mut cx), Poll::Ready(Ok(())));
        assert_eq!(rx.try_recv(), Ok(1));
    }

    #[test]
    fn a_waiting_receiver_is_woken_from_another_thread_and_only_while_it_waits() {
        let (tx, mut rx) = channel::<u32>(4);
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        let tx = std::thread::spawn(move || {
            tx.try_send(7).unwrap();
            tx
        })
        .join()
        .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the push wakes the waiting receiver");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(7)));
        // Not waiting now: pushes do not wake it.
        tx.try_send(8).unwrap();
        tx.try_send(9).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(8)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(9)));
    }

    #[test]
    fn dropping_the_sender_wakes_the_receiver_which_drains_then_ends() {
        let (tx, mut rx) = channel::<u32>(4);
        let receiver = std::thread::spawn(move || {
            block_on(async {
                let mut got = Vec::new();
                while let Some(i) = rx.recv().await {
                    got.push(i);
                }
                got
            })
        });
        // Give the receiver time to park in recv (not required for correctness).
        std::thread::sleep(Duration::from_millis(20));
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        drop(tx);
        assert_eq!(receiver.join().unwrap(), vec![1, 2]);
    }

    #[test]
    fn dropping_the_receiver_fails_a_waiting_send_with_the_item() {
        let (mut tx, rx) = channel::<u32>(1);
        tx.try_send(0).unwrap();
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(rx);
        });
        assert_eq!(block_on(tx.send(5)), Err(5));
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(6), Err(TrySendError::Closed(6)));
        dropper.join().unwrap();
    }

    #[test]
    fn items_left_in_a_ring_are_dropped_with_it() {
        let item = Arc::new(());
        let (tx, rx) = channel(4);
        tx.try_send(item.clone()).unwrap();
        drop(tx);
        drop(rx);
        assert_eq!(Arc::strong_count(&item), 1);
    }

    #[test]
    fn a_full_mesh_links_every_ordered_pair_once() {
        let mut mesh = full_mesh::<(usize, usize)>(4, 2);
        for (from, ends) in mesh.iter().enumerate() {
            assert_eq!((ends.to_peers.len(), ends.from_peers.len()), (3, 3));
            let peers = (0..4).filter(|&p| p != from);
            for (tx, to) in ends.to_peers.iter().zip(peers) {
                tx.try_send((from, to)).unwrap();
            }
        }
        for (to, ends) in mesh.iter_mut().enumerate() {
            let peers: Vec<usize> = (0..4).filter(|&p| p != to).collect();
            for (rx, &from) in ends.from_peers.iter().zip(&peers) {
                assert_eq!(rx.try_recv(), Ok((from, to)));
            }
        }
        assert!(full_mesh::<u8>(1, 2)[0].to_peers.is_empty());
    }
}
