//! One client's socket: the only owner of its TCP stream and descriptor. Every read and
//! write of a client connection goes through a [`Socket`]: the reader's readiness reads and
//! non-blocking `recv`s (`connection/reader.rs`), the flush task's gathered `sendmsg`
//! (`client.rs`), the writer half's waiting writes, the closing notice with its half-close
//! and lingering read ([`Socket::farewell`]), and the ready set's epoll registration
//! (`ready_set.rs`, through [`AsRawFd`]).
//!
//! The connection task owns it (`Rc<Socket>`); the client that fan-out shares holds a
//! `Weak`, so the descriptor is valid exactly while the socket lives, and a write from the
//! flush task after the task has closed it finds no socket rather than a reused descriptor.
//!
//! A socket is plain TCP or TLS (`socket/tls.rs`, rustls). Plain TCP is today's fast path:
//! a `match` on the optional TLS session, then the same syscalls (raw `recvfrom`/`sendmsg`
//! through `syscall(2)` and glommio's io_uring reads and writes). Over TLS the same calls
//! decrypt what arrives and encrypt the same gathered bytes into records, written to the
//! same descriptor. The RefCells are borrowed only inside one call, never across `.await`.

mod tls;

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::future::{or, poll_fn};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

pub use tls::HandshakeError;
use tls::TlsSession;

/// Bound on sending a closing notice and draining unread input before the final close.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(500);
/// Unread input discarded after a notice, so that closing does not turn into a reset
/// that destroys the notice in flight.
const LINGER_READ_BYTES: usize = 256 << 10;

/// A client's stream, plain or TLS (see the module docs).
pub struct Socket {
    stream: RefCell<TcpStream>,
    /// `stream`'s descriptor, for the syscalls glommio does not offer (non-blocking `recv`,
    /// gathered `sendmsg`, `shutdown`, epoll). Valid while `self` lives: `stream` owns it.
    fd: RawFd,
    /// The TLS session over `stream`; `None` for plain TCP.
    tls: Option<RefCell<TlsSession>>,
}

impl Socket {
    /// A plain TCP socket.
    pub fn plain(stream: TcpStream) -> Socket {
        Socket {
            fd: stream.as_raw_fd(),
            stream: RefCell::new(stream),
            tls: None,
        }
    }

    /// Runs a TLS server handshake over `stream` with `config` (TLS 1.2/1.3, optional
    /// client certificates, as `tls::server_config` built it). Not bounded in time here:
    /// the caller races it against `tls.handshake_timeout_ms`.
    pub async fn tls_handshake(stream: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<Socket, HandshakeError> {
        let mut stream = stream;
        let session = TlsSession::handshake(&mut stream, config).await?;
        Ok(Socket {
            fd: stream.as_raw_fd(),
            stream: RefCell::new(stream),
            tls: Some(RefCell::new(session)),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads what has arrived into `buf`, waiting for readiness when nothing has; `Ok(0)`
    /// at the end of the stream. `buf` must hold at least [`MIN_READ_BUF`] bytes (one
    /// read's worth of TLS records decrypts into it at once).
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut stream = self.stream.borrow_mut();
        match &self.tls {
            None => Pin::new(&mut *stream).poll_read(cx, buf),
            Some(tls) => tls.borrow_mut().poll_read(cx, &mut stream, self.fd, buf),
        }
    }

    /// How much of a read buffer to offer for a read the caller wants to keep to `wanted`
    /// bytes (the partial-line bound, docs/protocol.md#memory-bounds): exactly that over
    /// plain TCP; at least [`MIN_READ_BUF`] over TLS, whose records decrypt whole, so a TLS
    /// connection may hold up to that much of a partial line past the bound.
    pub fn read_len(&self, wanted: usize) -> usize {
        if self.is_tls() {
            wanted.max(MIN_READ_BUF)
        } else {
            wanted
        }
    }

    /// One non-blocking read into `buf`; `None` when nothing has arrived. For the flush
    /// task's read turns and ready set, where no readiness poll should be armed.
    pub fn try_read(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        match &self.tls {
            None => recv_now(self.fd, buf),
            Some(tls) => tls.borrow_mut().try_read(self.fd, buf),
        }
    }

    /// True if input was received and decrypted but not yet handed out: the descriptor
    /// will not be readable for it, so the reader must not wait in the ready set.
    pub fn has_buffered_input(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.borrow_mut().has_plaintext())
    }

    /// Writes the gathered `iov` without waiting: how many of its bytes the socket took
    /// (possibly fewer than all), or `WouldBlock` when it took none. Over TLS the bytes are
    /// encrypted (whole iovecs, see `socket/tls.rs`) and written as records.
    pub fn try_write_gathered(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        match &self.tls {
            None => {
                // SAFETY: an all-zero msghdr is valid; it points at `iov`, which outlives
                // the call.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = iov.len() as _;
                loop {
                    // SAFETY: `fd` is open while `self` lives, and every iovec points at
                    // memory the caller keeps alive during the call.
                    let sent = unsafe { sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
                    if sent >= 0 {
                        return Ok(sent as usize);
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
            Some(tls) => {
                // SAFETY: the caller's iovecs point at live, initialised bytes of their length.
                let slices = iov
                    .iter()
                    .map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
                tls.borrow_mut().try_write(self.fd, slices)
            }
        }
    }

    /// Writes (part of) `buf`, waiting for room.
    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut stream = self.stream.borrow_mut();
        match &self.tls {
            None => Pin::new(&mut *stream).poll_write(cx, buf),
            Some(tls) => tls.borrow_mut().poll_write(cx, &mut stream, buf),
        }
    }

    /// Sends a closing notice, then half-closes (over TLS after a close_notify alert) and
    /// discards unread input for a moment, so that the kernel sends FIN rather than a
    /// reset that would destroy the notice in flight. Bounded by `FAREWELL_TIMEOUT`.
    pub async fn farewell(&self, text: &str) {
        let linger = async {
            if let Some(tls) = &self.tls {
                // What was encrypted but not yet counted as written ends at an envelope's
                // end, so the notice still starts a line; it simply goes out first.
                tls.borrow_mut().forget_unreported();
            }
            let mut done = 0;
            while done < text.len() {
                match poll_fn(|cx| self.poll_write(cx, &text.as_bytes()[done..])).await {
                    Ok(n) if n > 0 => done += n,
                    _ => return,
                }
            }
            if let Some(tls) = &self.tls {
                tls.borrow_mut().close_notify();
                let flushed = poll_fn(|cx| {
                    let mut stream = self.stream.borrow_mut();
                    tls.borrow_mut().poll_flush(cx, &mut stream)
                })
                .await;
                if flushed.is_err() {
                    return;
                }
            }
            // SAFETY: the fd is open while `self` lives; shutdown(2) does not block.
            unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
            // On the heap: a buffer here would sit in every connection task's state.
            let mut sink = vec![0u8; if self.is_tls() { MIN_READ_BUF } else { 4096 }];
            let mut drained = 0;
            while drained < LINGER_READ_BYTES {
                match poll_fn(|cx| self.poll_read(cx, &mut sink)).await {
                    Ok(n) if n > 0 => drained += n,
                    _ => return,
                }
            }
        };
        or(linger, glommio::timer::sleep(FAREWELL_TIMEOUT)).await;
    }
}

/// The smallest buffer [`Socket::poll_read`] and [`Socket::try_read`] take.
pub const MIN_READ_BUF: usize = tls::MIN_PLAINTEXT_BUF;

impl AsRawFd for Socket {
    /// For registering the socket with an epoll set; the descriptor is open while `self`
    /// lives and must not be used for I/O (that goes through the socket).
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

/// One non-blocking `recv` into `buf`; `None` when the socket has nothing to read.
fn recv_now(fd: RawFd, buf: &mut [u8]) -> Option<io::Result<usize>> {
    loop {
        // SAFETY: `fd` is an open socket and `buf` is writable for its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf.as_mut_ptr(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        if n >= 0 {
            return Some(Ok(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return None,
            _ => return Some(Err(e)),
        }
    }
}

/// `sendmsg(2)` through `syscall(2)`, as is `recv_now`: glibc's own wrappers are
/// thread-cancellation points and bracket every call with cancellation bookkeeping that a
/// shard thread, never cancelled, does not need (about 1 % of the relay's CPU at `T100x30`).
///
/// # Safety
/// As for `sendmsg(2)`: `fd` is open and `msg` points at valid iovecs.
unsafe fn sendmsg(fd: RawFd, msg: &libc::msghdr, flags: libc::c_int) -> isize {
    libc::syscall(libc::SYS_sendmsg, fd, msg as *const libc::msghdr, flags) as isize
}

/// `send(2)` of one buffer without waiting, for TLS records.
fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let iov = [libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    // SAFETY: an all-zero msghdr is valid; it points at `iov`, which outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    loop {
        // SAFETY: `fd` is open (the caller's socket lives) and `iov` points into `buf`.
        let sent = unsafe { sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
