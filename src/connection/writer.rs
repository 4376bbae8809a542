//! A connection's writer half: drains the client's outbox whenever the flush task found the
//! socket full, waiting for room, and tells the shard's stall tracking what each write did.
//! The close path also uses it to flush a client at shutdown and to finish a half-written
//! envelope before a notice.

use std::rc::Rc;
use std::time::Instant;

use futures_lite::future::poll_fn;

use crate::client::Client;
use crate::metrics::CloseReason;
use crate::shard::Shard;
use crate::socket::Socket;

/// Waits for the client's writer to be woken, then writes everything queued; until a
/// write fails.
pub async fn write_half(shard: &Shard, client: &Rc<Client>, socket: &Socket) -> CloseReason {
    loop {
        client.writer_woken().await;
        if let Err(reason) = flush_outbox(shard, client, socket).await {
            return reason;
        }
    }
}

/// Writes everything queued: one write per queued stretch, or several gathered into one.
pub async fn flush_outbox(shard: &Shard, client: &Rc<Client>, socket: &Socket) -> Result<(), CloseReason> {
    loop {
        write_in_flight(shard, client, socket).await?;
        if !client.start_next_job() {
            return Ok(());
        }
    }
}

/// Finishes the client's write in progress, if any, telling the shard's stall tracking
/// when the socket refuses data and when the client has caught up.
pub async fn write_in_flight(shard: &Shard, client: &Rc<Client>, socket: &Socket) -> Result<(), CloseReason> {
    let fanout = &shard.fanout;
    loop {
        let written = poll_fn(|cx| {
            let poll = client.poll_write_in_flight(cx, socket);
            if poll.is_pending() {
                fanout.on_refused(client);
            }
            poll
        })
        .await;
        let n = match written {
            None => return Ok(()),
            Some(Ok(n)) if n > 0 => n,
            Some(_) => return Err(CloseReason::WriteError),
        };
        let outcome = client.on_written(n, &shard.stats, Instant::now());
        fanout.on_written(client, outcome);
        if outcome != crate::client::Written::Partial {
            return Ok(());
        }
    }
}
