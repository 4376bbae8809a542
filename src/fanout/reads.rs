//! Read scheduling: when a shard's readers read, so that the lines they frame join the
//! flush task's next write pass instead of each read waking the shard on its own.
//!
//! - A sender that keeps sending waits for its *turn*, which the flush task gives at the
//!   start of every pass (see `pacing`).
//! - An occasional sender on a busy shard waits in the shard's [`ReadySet`] and is woken
//!   by the first pass that finds its socket readable. Only while a pass is coming: its
//!   line could not be written before that pass anyway. When the shard goes idle it goes
//!   back to readiness, so that a line after a quiet spell wakes the shard at once.
//!
//! The readers themselves are in `connection/reader.rs`; the flush task drives this.

use std::cell::Cell;

use crate::client::Client;
use crate::notify::NotifyAll;
use crate::pacing::NextRun;
use crate::ready_set::ReadySet;

pub struct Reads {
    /// Readers that just relayed lines wait here for their turn and then read at the start
    /// of the flush task's next pass, so their lines join its batch. A sender that keeps
    /// sending is then read once per pass, each read taking all that arrived since,
    /// instead of at every readiness wake-up.
    turn: NotifyAll,
    /// Occasional senders read at the flush task's passes (`None` if the kernel refused an
    /// epoll set: then every reader uses readiness).
    ready_set: Option<ReadySet>,
    /// A pass is coming: readers may join the set.
    runs_soon: Cell<bool>,
}

impl Reads {
    pub fn new(shard_id: usize) -> Self {
        Reads {
            turn: NotifyAll::default(),
            ready_set: ReadySet::new()
                .inspect_err(|e| {
                    tracing::warn!("shard {shard_id}: no epoll set ({e}); every reader waits for readiness")
                })
                .ok(),
            runs_soon: Cell::new(false),
        }
    }

    /// Waits for the next turn (the start of the next pass).
    pub async fn next_turn(&self) {
        self.turn.wait().await;
    }

    /// True while readers wait for their turn.
    pub fn turn_waiting(&self) -> bool {
        self.turn.has_waiters()
    }

    /// Gives the turn: every reader waiting for it reads now. True if any waited.
    pub fn release_turn(&self) -> bool {
        let waiting = self.turn.has_waiters();
        if waiting {
            self.turn.notify_all();
        }
        waiting
    }

    /// Puts an occasional sender's socket in the ready set, to be read at the flush task's
    /// passes instead of through a readiness wake-up of its own (each costs the shard an
    /// io_uring completion, a task wake-up and often a wake-up of its thread). Only while
    /// the next pass is near (see the module docs). False if the reader should wait for
    /// readiness instead.
    pub fn read_at_runs(&self, client: &Client) -> bool {
        let Some(set) = &self.ready_set else {
            return false;
        };
        if set.contains(client.id) {
            return true;
        }
        self.runs_soon.get()
            && !client.is_closing()
            && client.socket().is_some_and(|socket| set.insert(client.id, &socket))
    }

    /// True while readers wait in the ready set.
    pub fn ready_set_waiting(&self) -> bool {
        self.ready_set.as_ref().is_some_and(|set| !set.is_empty())
    }

    /// Takes a reader out of the ready set (it is closing, or it keeps sending and reads
    /// at its turns instead).
    pub fn leave_ready_set(&self, client: &Client) {
        if let Some(set) = &self.ready_set {
            set.remove(client.id);
        }
    }

    /// Calls `wake` with every reader in the ready set whose socket is readable; true if
    /// any was woken (`wake` says whether the client is still there).
    pub fn wake_ready(&self, mut wake: impl FnMut(u64) -> bool) -> bool {
        let Some(set) = &self.ready_set else {
            return false;
        };
        let mut woke = false;
        set.for_each_ready(|id| woke |= wake(id));
        woke
    }

    /// Records when the flush task runs next (`paced`: there is a flush window). When it
    /// goes idle, or passes are not paced, every reader in the ready set is handed to `wake`
    /// and goes back to readiness: no pass would read it.
    pub fn set_next_run(&self, next: NextRun, paced: bool, mut wake: impl FnMut(u64)) {
        // While a pass is coming, a line read before it could not be written earlier
        // anyway: reading it at the pass loses nothing and saves the shard a wake-up.
        let soon = paced && next != NextRun::Idle;
        self.runs_soon.set(soon);
        if !soon {
            if let Some(set) = &self.ready_set {
                set.drain(&mut wake);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::io::Write;
    use std::rc::Rc;

    use super::*;
    use crate::pacing::Entry;
    use crate::socket::Socket;
    use std::time::{Duration, Instant};

    const WINDOW: Duration = Duration::from_micros(500);

    #[test]
    fn a_reader_joins_the_ready_set_only_while_a_pass_is_coming_and_is_woken_when_readable() {
        glommio::LocalExecutor::default().run(async {
            let reads = Reads::new(0);
            let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let ours = Rc::new(Socket::plain(listener.accept().await.unwrap()));
            let client = Client::new(3, "127.0.0.1:7".parse().unwrap(), Rc::downgrade(&ours), Entry::new());
            reads.set_next_run(NextRun::At(Instant::now() + WINDOW), false, |_| {});
            assert!(!reads.read_at_runs(&client), "passes are not paced: readiness");
            reads.set_next_run(NextRun::Idle, true, |_| {});
            assert!(!reads.read_at_runs(&client), "no pass is coming: readiness");
            reads.set_next_run(NextRun::At(Instant::now() + WINDOW), true, |_| {});
            assert!(reads.read_at_runs(&client));
            let mut woken = Vec::new();
            assert!(!reads.wake_ready(|id| {
                woken.push(id);
                true
            }));
            peer.write_all(b"x\n").unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !reads.wake_ready(|id| {
                woken.push(id);
                true
            }) {
                assert!(Instant::now() < deadline, "the line never made the socket readable");
                std::thread::yield_now();
            }
            assert_eq!(woken, [3]);
            // The flush task goes idle: the reader is sent back to readiness.
            let mut sent_back = Vec::new();
            reads.set_next_run(NextRun::Idle, true, |id| sent_back.push(id));
            assert_eq!(sent_back, [3]);
            assert!(!reads.wake_ready(|_| true), "the set is empty");
        });
    }

    #[test]
    fn a_read_turn_is_released_only_to_waiting_readers() {
        let reads = Reads::new(0);
        assert!(!reads.turn_waiting());
        assert!(!reads.release_turn());
        let mut turn = Box::pin(reads.next_turn());
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(turn.as_mut().poll(&mut cx).is_pending());
        assert!(reads.turn_waiting());
        assert!(reads.release_turn());
        assert!(turn.as_mut().poll(&mut cx).is_ready());
    }
}
