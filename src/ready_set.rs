//! A shard's ready set: the sockets of occasional senders that are read at the flush task's
//! runs instead of through a readiness wake-up each (see `connection/reader.rs` and
//! `fanout/reads.rs`). It is a level-triggered epoll set that is only ever polled with
//! a zero timeout, never slept on: the shard's thread sleeps in glommio's ring.
//!
//! A member is a [`Socket`] held weakly: once its connection task has closed it, the
//! kernel has dropped it from the set, and leaving touches no descriptor (the number may
//! already belong to another socket).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};

use crate::socket::Socket;

/// Most readable members one poll reports; the rest (level-triggered, so still readable)
/// come at the next poll.
const MAX_EVENTS: usize = 256;

pub struct ReadySet {
    epoll: OwnedFd,
    /// Members: client id → its socket.
    members: RefCell<HashMap<u64, Weak<Socket>>>,
}

impl ReadySet {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReadySet {
            // SAFETY: `fd` was just created and nothing else owns it.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            members: RefCell::default(),
        })
    }

    pub fn contains(&self, id: u64) -> bool {
        self.members.borrow().contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.members.borrow().is_empty()
    }

    /// Adds client `id`'s socket; false if the kernel refuses (out of memory or over
    /// `max_user_watches`) or the socket holds decrypted input that no readiness would
    /// announce, and the reader then keeps using readiness.
    pub fn insert(&self, id: u64, socket: &Rc<Socket>) -> bool {
        if socket.has_buffered_input() {
            return false;
        }
        let added = self.add(id, socket.as_raw_fd());
        if added {
            self.members.borrow_mut().insert(id, Rc::downgrade(socket));
        }
        added
    }

    fn add(&self, id: u64, fd: RawFd) -> bool {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: id,
        };
        // SAFETY: both descriptors are open; the kernel copies `event`.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) == 0 }
    }

    /// Removes client `id`, if it is a member.
    pub fn remove(&self, id: u64) {
        let member = self.members.borrow_mut().remove(&id);
        if let Some(socket) = member {
            self.delete(&socket);
        }
    }

    /// Empties the set, calling `f` with each member's id.
    pub fn drain(&self, mut f: impl FnMut(u64)) {
        let members = std::mem::take(&mut *self.members.borrow_mut());
        for (id, socket) in members {
            self.delete(&socket);
            f(id);
        }
    }

    /// Calls `f` with the id of every member whose socket is readable now (data, end of
    /// stream or an error), up to `MAX_EVENTS`. Does not wait.
    pub fn for_each_ready(&self, mut f: impl FnMut(u64)) {
        if self.is_empty() {
            return;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        // SAFETY: `events` is writable for MAX_EVENTS entries; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), MAX_EVENTS as i32, 0) };
        for event in &events[..n.max(0) as usize] {
            f(event.u64);
        }
    }

    fn delete(&self, socket: &Weak<Socket>) {
        // A closed socket has left the set with its descriptor.
        let Some(socket) = socket.upgrade() else {
            return;
        };
        // SAFETY: the descriptor is open while `socket` lives. A failure means it is not in
        // the set any more, which is what we want.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                socket.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    /// A connected pair: a std client and the relay's side as a plain [`Socket`].
    async fn pair(listener: &glommio::net::TcpListener) -> (TcpStream, Rc<Socket>) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let server = listener.accept().await.unwrap();
        (client, Rc::new(Socket::plain(server)))
    }

    fn ready(set: &ReadySet) -> Vec<u64> {
        let mut ids = Vec::new();
        set.for_each_ready(|id| ids.push(id));
        ids.sort();
        ids
    }

    fn wait_until(set: &ReadySet, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ready(set).len() < n && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
    }

    #[test]
    fn reports_exactly_the_readable_members_until_they_leave() {
        glommio::LocalExecutor::default().run(async {
            let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut a_client, a_server) = pair(&listener).await;
            let (b_client, b_server) = pair(&listener).await;
            let (_c_client, c_server) = pair(&listener).await;
            let set = ReadySet::new().unwrap();
            assert!(set.is_empty() && ready(&set).is_empty());
            assert!(set.insert(1, &a_server));
            assert!(set.insert(2, &b_server));
            assert!(set.contains(1) && !set.contains(3));
            assert!(ready(&set).is_empty(), "nothing sent yet");
            a_client.write_all(b"line\n").unwrap();
            // A readable socket that is not a member is not reported.
            assert!(set.insert(3, &c_server));
            set.remove(3);
            wait_until(&set, 1);
            assert_eq!(ready(&set), vec![1]);
            // Level-triggered: still reported while unread. End of stream is readable too.
            assert_eq!(ready(&set), vec![1]);
            b_client.shutdown(std::net::Shutdown::Write).unwrap();
            wait_until(&set, 2);
            assert_eq!(ready(&set), vec![1, 2]);
            set.remove(1);
            assert_eq!(ready(&set), vec![2]);
            let mut drained = Vec::new();
            set.drain(|id| drained.push(id));
            assert_eq!(drained, vec![2]);
            assert!(set.is_empty() && ready(&set).is_empty());
            // A closed socket leaves the set with its descriptor; leaving later touches
            // nothing.
            assert!(set.insert(4, &b_server));
            drop(b_server);
            assert!(ready(&set).is_empty());
            set.remove(4);
            assert!(set.is_empty());
        });
    }
}
