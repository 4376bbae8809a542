//! Reads a connection's PROXY protocol header off its socket under a deadline
//! (docs/protocol.md#proxy-protocol); the decoding itself is [`crate::proxy_protocol`].
//!
//! The header is found by peeking (MSG_PEEK), and only its exact length is then consumed,
//! so whatever the client sent after it stays in the socket for the connection's reader:
//! nothing is copied between the two and the reader needs no special first read. A proxy
//! writes the header in one piece, so it is normally complete at the first peek. A peek
//! returns at once while bytes are waiting, so an incomplete header is peeked again after
//! a pause that doubles up to [`MAX_PAUSE`], until the header is complete, wrong, its
//! sender has closed (`POLLRDHUP`), or the deadline passes.

use std::os::fd::AsRawFd;
use std::time::Duration;

use futures_lite::future::or;
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use crate::metrics::CloseReason;
use crate::proxy_protocol::{self, Header, HeaderError, MAX_HEADER_BYTES};

/// Longest pause between two peeks at an incomplete header.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// The header at the start of `stream`, consumed; or the close reason that ends the
/// connection without a byte read by the relay or sent to the client.
pub async fn read(stream: &mut TcpStream, timeout: Duration) -> Result<Header, CloseReason> {
    let read = async {
        // On the heap: only connections waiting for their header hold it.
        let mut buf = vec![0u8; MAX_HEADER_BYTES];
        let mut pause = Duration::from_millis(1);
        loop {
            let n = stream.peek(&mut buf).await.map_err(|_| CloseReason::ProxyTruncated)?;
            if n == 0 {
                return Err(CloseReason::ProxyTruncated);
            }
            match proxy_protocol::parse(&buf[..n]) {
                Ok(Some(parsed)) => {
                    stream
                        .read_exact(&mut buf[..parsed.len])
                        .await
                        .map_err(|_| CloseReason::ProxyTruncated)?;
                    return Ok(parsed.header);
                }
                Ok(None) if sender_closed(stream) => return Err(CloseReason::ProxyTruncated),
                Ok(None) => {
                    glommio::timer::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Err(HeaderError::Malformed(why)) => {
                    tracing::debug!("malformed PROXY header: {why}");
                    return Err(CloseReason::ProxyMalformed);
                }
                Err(HeaderError::Oversize) => return Err(CloseReason::ProxyOversize),
            }
        }
    };
    or(read, async {
        glommio::timer::sleep(timeout).await;
        Err(CloseReason::ProxyTimeout)
    })
    .await
}

/// Whether the peer has shut down its side: the bytes waiting are all there will be.
fn sender_closed(stream: &TcpStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a descriptor `stream` keeps open; a zero timeout never
    // blocks.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
