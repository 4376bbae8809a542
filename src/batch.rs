//! Batches: the envelopes a shard accepted between two flushes, encoded once into a
//! [`BatchBuilder`] and then shared, immutable, by every recipient on every shard. A
//! [`Batch`] records which connection sent each run of envelopes, so that a sender never
//! receives its own lines; a [`PinnedBatch`] is a batch on one shard, counted in that
//! shard's [`Ledger`] of queued memory while any recipient still holds it.
//!
//! Pure data: no sockets, no tasks. `fanout` builds and moves batches, `client` queues
//! stretches of them.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::encode_envelope;

/// Envelopes from one connection, contiguous in a batch: `[previous run's end, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub origin: u64,
    pub end: usize,
    pub count: u32,
}

/// Encoded envelopes plus who sent them. Immutable once built; shared by `Arc` across
/// shards and by `Rc<Arc<_>>` among one shard's recipients.
#[derive(Debug, Default)]
pub struct Batch {
    pub data: Vec<u8>,
    pub runs: Vec<Run>,
    /// When its first line was read, for the relay-delay histogram; `None` for notices,
    /// copies and batches from other nodes.
    pub first_read: Option<Instant>,
}

/// A batch as one shard's recipients share it: one atomic reference per shard, then
/// shard-local reference counts per recipient.
pub type LocalBatch = Rc<PinnedBatch>;

/// The memory one shard's queued envelopes hold: the bytes of every batch its recipients
/// still reference (each batch once, however many recipients share it) plus a fixed cost
/// per outbox entry. Kept exact as batches and entries come and go, and published at each
/// change for the process-wide bound on queued bytes (`max_total_pending_bytes`), which
/// every shard's readers check.
pub struct Ledger {
    bytes: Cell<u64>,
    /// This shard's entry in the table every reader sums; only this shard writes it.
    published: Arc<AtomicU64>,
}

impl Ledger {
    pub fn new(published: Arc<AtomicU64>) -> Rc<Self> {
        Rc::new(Ledger {
            bytes: Cell::new(0),
            published,
        })
    }

    /// A ledger of its own, for tests and benches.
    pub fn detached() -> Rc<Self> {
        Ledger::new(Arc::default())
    }

    /// Makes `batch` shard-local; its bytes count until the last recipient lets go of it.
    pub fn pin(self: &Rc<Self>, batch: Arc<Batch>) -> LocalBatch {
        self.add(batch.data.len() as u64);
        Rc::new(PinnedBatch {
            batch,
            ledger: self.clone(),
        })
    }

    pub fn add(&self, n: u64) {
        self.set(self.bytes.get() + n);
    }

    pub fn sub(&self, n: u64) {
        self.set(self.bytes.get().saturating_sub(n));
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    fn set(&self, v: u64) {
        self.bytes.set(v);
        self.published.store(v, Ordering::Relaxed);
    }
}

/// A batch on one shard, counted in that shard's [`Ledger`] while it lives.
pub struct PinnedBatch {
    batch: Arc<Batch>,
    ledger: Rc<Ledger>,
}

impl PinnedBatch {
    pub fn ledger(&self) -> &Rc<Ledger> {
        &self.ledger
    }
}

impl std::ops::Deref for PinnedBatch {
    type Target = Batch;
    fn deref(&self) -> &Batch {
        &self.batch
    }
}

impl Drop for PinnedBatch {
    fn drop(&mut self) {
        self.ledger.sub(self.batch.data.len() as u64);
    }
}

impl Batch {
    /// Calls `f(start, end, count)` for each maximal stretch of envelopes not sent by
    /// `recipient`, in order.
    pub fn for_each_stretch_except(&self, recipient: u64, mut f: impl FnMut(usize, usize, u32)) {
        if !self.runs.iter().any(|r| r.origin == recipient) {
            // Notices are runs of count 0: still sent, never counted as envelopes.
            if !self.data.is_empty() {
                f(0, self.data.len(), self.runs.iter().map(|r| r.count).sum());
            }
            return;
        }
        let (mut start, mut open_start, mut open_count) = (0usize, None::<usize>, 0u32);
        for run in &self.runs {
            if run.origin == recipient {
                if let Some(s) = open_start.take() {
                    f(s, start, open_count);
                }
                open_count = 0;
            } else {
                open_start.get_or_insert(start);
                open_count += run.count;
            }
            start = run.end;
        }
        if let Some(s) = open_start {
            f(s, start, open_count);
        }
    }
}

/// Most bytes a new batch reserves up front, going by the size of the last one.
const MAX_BATCH_RESERVE: usize = 64 << 10;

/// The shard's batch under construction.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    batch: Batch,
    /// The last batch's size: the next one reserves that much on its first line instead
    /// of growing (and copying) a dozen times on the way.
    last_len: usize,
}

impl BatchBuilder {
    /// Appends one line's envelope, sent by connection `origin` from `remote_addr`.
    pub fn push(&mut self, origin: u64, line: &str, remote_addr: &str) {
        let b = &mut self.batch;
        if b.runs.is_empty() {
            b.first_read = Some(Instant::now());
        }
        if b.data.capacity() == 0 {
            b.data.reserve(self.last_len.min(MAX_BATCH_RESERVE));
        }
        encode_envelope(&mut b.data, line, remote_addr);
        let end = b.data.len();
        match b.runs.last_mut() {
            Some(run) if run.origin == origin => {
                run.end = end;
                run.count += 1;
            }
            _ => b.runs.push(Run { origin, end, count: 1 }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.batch.runs.is_empty()
    }

    pub fn len_bytes(&self) -> usize {
        self.batch.data.len()
    }

    /// Takes the batch built so far, leaving the builder empty.
    pub fn take(&mut self) -> Batch {
        self.last_len = self.batch.data.len();
        std::mem::take(&mut self.batch)
    }
}

impl Batch {
    /// A batch of one notice line that every recipient gets: origin 0 is never a client
    /// id, and count 0 because a notice is not an envelope.
    pub fn notice(text: &str) -> Batch {
        let data = text.as_bytes().to_vec();
        let end = data.len();
        Batch {
            data,
            runs: vec![Run {
                origin: 0,
                end,
                count: 0,
            }],
            first_read: None,
        }
    }

    /// A copy of `data[start..end]` as a batch of its own from nobody (origin 0), holding
    /// `count` envelopes.
    pub fn copy_of(data: &[u8], count: u32) -> Batch {
        Batch {
            data: data.to_vec(),
            runs: vec![Run {
                origin: 0,
                end: data.len(),
                count,
            }],
            first_read: None,
        }
    }
}

#[cfg(test)]
impl Batch {
    /// The batch of `lines`, each `(origin, content)`, all sent from `remote_addr`: the
    /// fixture the modules above this one build their tests on.
    pub fn of(lines: &[(u64, &str)], remote_addr: &str) -> Batch {
        let mut b = BatchBuilder::default();
        for &(origin, line) in lines {
            b.push(origin, line, remote_addr);
        }
        b.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stretches(batch: &Batch, recipient: u64) -> Vec<(usize, usize, u32)> {
        let mut out = Vec::new();
        batch.for_each_stretch_except(recipient, |s, e, c| out.push((s, e, c)));
        out
    }

    #[test]
    fn consecutive_lines_from_one_sender_share_a_run() {
        let mut b = BatchBuilder::default();
        b.push(1, "a", "x:1");
        b.push(1, "b", "x:1");
        b.push(2, "c", "x:2");
        let batch = b.take();
        assert!(b.is_empty());
        assert_eq!(batch.runs.len(), 2);
        assert_eq!((batch.runs[0].count, batch.runs[1].count), (2, 1));
        assert_eq!(batch.runs[1].end, batch.data.len());
    }

    #[test]
    fn a_sender_gets_everything_but_its_own_lines() {
        let mut b = BatchBuilder::default();
        for (origin, line) in [(1, "a"), (2, "b"), (2, "c"), (3, "d"), (1, "e"), (3, "f")] {
            b.push(origin, line, "h:1");
        }
        let batch = b.take();
        let text = |v: Vec<(usize, usize, u32)>| {
            v.iter()
                .map(|&(s, e, _)| String::from_utf8(batch.data[s..e].to_vec()).unwrap())
                .collect::<String>()
        };
        let only = |lines: &[&str]| {
            let mut out = Vec::new();
            for l in lines {
                encode_envelope(&mut out, l, "h:1");
            }
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(stretches(&batch, 2)), only(&["a", "d", "e", "f"]));
        assert_eq!(stretches(&batch, 2).iter().map(|s| s.2).sum::<u32>(), 4);
        assert_eq!(text(stretches(&batch, 1)), only(&["b", "c", "d", "f"]));
        assert_eq!(stretches(&batch, 9), vec![(0, batch.data.len(), 6)]);
        assert_eq!(text(stretches(&batch, 3)), only(&["a", "b", "c", "e"]));
    }

    #[test]
    fn a_notice_batch_reaches_everyone_and_counts_no_envelopes() {
        let notice = Batch {
            data: b"Warning: x\n".to_vec(),
            runs: vec![Run {
                origin: 0,
                end: 11,
                count: 0,
            }],
            first_read: None,
        };
        assert_eq!(stretches(&notice, 5), vec![(0, 11, 0)]);
    }

    #[test]
    fn a_batch_only_from_the_recipient_gives_nothing() {
        let mut b = BatchBuilder::default();
        b.push(7, "x", "h:1");
        assert!(stretches(&b.take(), 7).is_empty());
    }
}
