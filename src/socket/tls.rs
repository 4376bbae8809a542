//! A client's TLS session (rustls) over its TCP stream: the server handshake, decrypting
//! what arrives into the reader's buffer, and encrypting what the relay writes into
//! records written to the same descriptor. Only `Socket` (`socket.rs`) calls it.
//!
//! Writes keep the plain path's meaning of "the socket took n bytes": plaintext counts as
//! written once its records are in the kernel. A write encrypts only when no record is
//! waiting, takes its whole input (whole envelopes), and when the kernel refuses part of
//! the records it reports nothing yet (`WouldBlock`/`Pending`: the client stalls as over
//! plain TCP); the next write, which starts with the same bytes because the outbox is a
//! queue, first finishes the records and then reports those bytes as written. So the
//! ciphertext held per client is at most one write's worth.
//!
//! Reads take at most [`CIPHERTEXT_CHUNK`] bytes from the kernel at a time and decrypt
//! all of it into the caller's buffer, which is at least [`MIN_PLAINTEXT_BUF`] long, so
//! that no plaintext is left behind in rustls where no readiness would announce it.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite};
use glommio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

use super::{recv_now, send_now, sendmsg};

/// Most ciphertext one read takes from the kernel (a full TLS record is 16 KiB + 325).
const CIPHERTEXT_CHUNK: usize = 16 << 10;
/// The plaintext one read may produce: one chunk plus a record begun in an earlier read,
/// with room to spare.
pub const MIN_PLAINTEXT_BUF: usize = 48 << 10;

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The peer closed before the handshake was done.
    Closed,
    /// The peer broke the protocol or was refused (e.g. no or a bad client certificate).
    Tls(rustls::Error),
    /// Reading or writing the socket failed.
    Io(io::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Closed => f.write_str("peer closed during the handshake"),
            HandshakeError::Tls(e) => write!(f, "{e}"),
            HandshakeError::Io(e) => write!(f, "{e}"),
        }
    }
}

pub struct TlsSession {
    conn: ServerConnection,
    /// Plaintext encrypted by a write whose records the kernel has not all taken yet; the
    /// next writes report it once they have (see the module docs).
    unreported: usize,
    /// The peer sent close_notify: after the plaintext before it, the stream has ended.
    peer_closed: bool,
}

impl TlsSession {
    /// Runs the server handshake to its end, including the records that follow it (TLS 1.3
    /// session tickets). Application data that arrived with the client's last flight stays
    /// buffered for the first read.
    pub async fn handshake(stream: &mut TcpStream, config: Arc<ServerConfig>) -> Result<TlsSession, HandshakeError> {
        let mut conn = ServerConnection::new(config).map_err(HandshakeError::Tls)?;
        // Writes bound the ciphertext themselves (one write's worth, see the module docs).
        conn.set_buffer_limit(None);
        let mut session = TlsSession {
            conn,
            unreported: 0,
            peer_closed: false,
        };
        // On the heap: it lives across `.await`s, in the task's state.
        let mut buf = vec![0u8; CIPHERTEXT_CHUNK];
        loop {
            futures_lite::future::poll_fn(|cx| session.poll_flush(cx, stream))
                .await
                .map_err(HandshakeError::Io)?;
            if !session.conn.is_handshaking() {
                return Ok(session);
            }
            let n = stream.read(&mut buf).await.map_err(HandshakeError::Io)?;
            if n == 0 {
                return Err(HandshakeError::Closed);
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                if session.conn.read_tls(&mut rest).map_err(HandshakeError::Io)? == 0 {
                    // Nothing taken: see `absorb`. The peer has closed.
                    if session.conn.is_handshaking() {
                        return Err(HandshakeError::Closed);
                    }
                    break;
                }
                match session.conn.process_new_packets() {
                    Ok(state) => session.peer_closed |= state.peer_has_closed(),
                    Err(e) => {
                        // Tell the peer why (the alert rustls queued), without waiting.
                        let _ = futures_lite::future::poll_fn(|cx| Poll::Ready(session.poll_flush(cx, stream))).await;
                        return Err(HandshakeError::Tls(e));
                    }
                }
            }
        }
    }

    /// True if decrypted input waits to be read, or the end of the stream does.
    pub fn has_plaintext(&mut self) -> bool {
        self.peer_closed
            || self
                .conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
    }

    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut TcpStream,
        fd: RawFd,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(read) = self.buffered(out) {
            return Poll::Ready(read);
        }
        loop {
            let mut ciphertext = [0u8; CIPHERTEXT_CHUNK];
            let n = match Pin::new(&mut *stream).poll_read(cx, &mut ciphertext) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            if let Some(read) = self.absorb(fd, &ciphertext[..n], out) {
                return Poll::Ready(read);
            }
        }
    }

    pub fn try_read(&mut self, fd: RawFd, out: &mut [u8]) -> Option<io::Result<usize>> {
        if let Some(read) = self.buffered(out) {
            return Some(read);
        }
        loop {
            let mut ciphertext = [0u8; CIPHERTEXT_CHUNK];
            let n = match recv_now(fd, &mut ciphertext)? {
                Ok(0) => return Some(Ok(0)),
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            };
            if let Some(read) = self.absorb(fd, &ciphertext[..n], out) {
                return Some(read);
            }
        }
    }

    /// What is already decrypted (or the end of the stream), if anything.
    fn buffered(&mut self, out: &mut [u8]) -> Option<io::Result<usize>> {
        match self.drain_plaintext(out) {
            Ok(0) if self.peer_closed => Some(Ok(0)),
            Ok(0) => None,
            read => Some(read),
        }
    }

    /// Decrypts `ciphertext` into `out`; `None` when it held no complete record (read more).
    fn absorb(&mut self, fd: RawFd, mut ciphertext: &[u8], out: &mut [u8]) -> Option<io::Result<usize>> {
        debug_assert!(out.len() >= MIN_PLAINTEXT_BUF);
        let mut got = 0;
        while !ciphertext.is_empty() {
            match self.conn.read_tls(&mut ciphertext) {
                // Nothing taken: rustls takes at most 4 KiB a call and none after the peer's
                // close_notify, whose followers are to be ignored (RFC 8446 §6.1). Calling
                // again would take nothing again, for ever, and hang the shard.
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            match self.conn.process_new_packets() {
                Ok(state) => self.peer_closed |= state.peer_has_closed(),
                Err(e) => {
                    let _ = self.flush_now(fd);
                    return Some(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            }
            // Drained after every record batch: rustls holds at most 16 KiB of plaintext.
            match self.drain_plaintext(&mut out[got..]) {
                Ok(n) => got += n,
                Err(e) => return Some(Err(e)),
            }
        }
        // Records the peer's input called for (a key update's answer); what the kernel does
        // not take now goes out before the next write.
        if let Err(e) = self.flush_now(fd) {
            return Some(Err(e));
        }
        if got > 0 {
            Some(Ok(got))
        } else if self.peer_closed {
            Some(Ok(0))
        } else {
            None
        }
    }

    fn drain_plaintext(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < out.len() {
            match self.conn.reader().read(&mut out[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Writes waiting records without waiting; true once none is left.
    fn flush_now(&mut self, fd: RawFd) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut FdWriter(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes waiting records, waiting for room.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut PollWriter { stream, cx }) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The gathered write of `Socket::try_write_gathered` (see the module docs).
    pub fn try_write<'a>(&mut self, fd: RawFd, slices: impl Iterator<Item = &'a [u8]>) -> io::Result<usize> {
        if !self.flush_now(fd)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.unreported > 0 {
            // The bytes encrypted earlier are this write's first ones.
            let n = slices.map(<[u8]>::len).sum::<usize>().min(self.unreported);
            self.unreported -= n;
            return Ok(n);
        }
        let mut total = 0;
        for slice in slices {
            self.conn.writer().write_all(slice)?;
            total += slice.len();
        }
        if self.flush_now(fd)? {
            Ok(total)
        } else {
            self.unreported = total;
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    pub fn poll_write(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.unreported == 0 {
            if let Poll::Ready(Err(e)) = self.poll_flush(cx, stream) {
                return Poll::Ready(Err(e));
            }
            if self.conn.wants_write() {
                return Poll::Pending;
            }
            self.conn.writer().write_all(buf)?;
            self.unreported = buf.len();
        }
        match self.poll_flush(cx, stream) {
            Poll::Ready(Ok(())) => {
                let n = self.unreported.min(buf.len());
                self.unreported -= n;
                Poll::Ready(Ok(n))
            }
            other => other.map(|r| r.map(|()| 0)),
        }
    }

    /// Before a closing notice: the encrypted bytes not yet reported go out ahead of it and
    /// are no longer reported to anyone.
    pub fn forget_unreported(&mut self) {
        self.unreported = 0;
    }

    pub fn close_notify(&mut self) {
        self.conn.send_close_notify();
    }
}

/// Writes records to the descriptor without waiting (gathered, one `sendmsg`).
struct FdWriter(RawFd);

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_now(self.0, buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; IoSlice is ABI-compatible with iovec.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        loop {
            // SAFETY: the descriptor is open (its socket lives); the iovecs point into `bufs`.
            let sent = unsafe { sendmsg(self.0, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if sent >= 0 {
                return Ok(sent as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes records through glommio, registering the task's waker when the socket is full
/// (`WouldBlock` to rustls, `Pending` to the caller).
struct PollWriter<'a, 'b> {
    stream: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Write for PollWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
