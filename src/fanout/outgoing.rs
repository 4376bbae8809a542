//! A shard's outgoing batch: the envelopes its readers accepted since the flush task's
//! last run, and the pause of those readers while it is over [`MAX_OUTGOING_BYTES`] (the
//! flush task is behind because a peer's ring is full).

use std::cell::RefCell;

use crate::batch::{Batch, BatchBuilder};
use crate::notify::NotifyAll;

/// Encoded bytes a shard may hold unflushed before its readers pause. Readers already
/// waiting in a read may each add one more read's worth, so this is a soft bound.
pub const MAX_OUTGOING_BYTES: usize = 4 << 20;

#[derive(Default)]
pub struct Outgoing {
    builder: RefCell<BatchBuilder>,
    /// Releases readers paused because the batch passed [`MAX_OUTGOING_BYTES`].
    drained: NotifyAll,
}

impl Outgoing {
    /// Appends one line's envelope from connection `origin`; true if the batch was empty
    /// (the flush task should wake).
    pub fn push(&self, origin: u64, line: &str, remote_addr: &str) -> bool {
        let mut builder = self.builder.borrow_mut();
        let was_empty = builder.is_empty();
        builder.push(origin, line, remote_addr);
        was_empty
    }

    pub fn is_empty(&self) -> bool {
        self.builder.borrow().is_empty()
    }

    /// Takes the batch built so far, if any, and releases paused readers.
    pub fn take(&self) -> Option<Batch> {
        let batch = {
            let mut builder = self.builder.borrow_mut();
            if builder.is_empty() {
                return None;
            }
            builder.take()
        };
        self.drained.notify_all();
        Some(batch)
    }

    /// Waits while the batch is over [`MAX_OUTGOING_BYTES`].
    pub async fn wait_for_room(&self) {
        while self.builder.borrow().len_bytes() >= MAX_OUTGOING_BYTES {
            self.drained.wait().await;
        }
    }
}
