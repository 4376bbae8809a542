//! One client's outbox: the stretches of batches queued for it ([`Segment`]s, each counted
//! in its shard's ledger), the write in progress ([`InFlight`]), and the counts the
//! backpressure policy reads (`d` and `b`). Only [`Client`](super::Client) holds one.

use std::collections::VecDeque;

use crate::batch::{Batch, LocalBatch};

/// Most bytes gathered into one socket write when several batches are queued.
pub const MAX_WRITE_BYTES: usize = 256 << 10;

/// What one outbox entry costs beyond its bytes (the entry and its queue slot), charged
/// to the shard's ledger so that many recipients with many small entries are bounded too.
pub const SEGMENT_COST: u64 = std::mem::size_of::<Segment>() as u64 + 16;

/// A stretch of one batch queued for this client, counted in its shard's ledger.
pub struct Segment {
    batch: LocalBatch,
    start: usize,
    end: usize,
    /// Envelopes in the stretch (0 for a notice).
    count: u32,
}

impl Segment {
    pub fn new(batch: LocalBatch, start: usize, end: usize, count: u32) -> Self {
        batch.ledger().add(SEGMENT_COST);
        Segment {
            batch,
            start,
            end,
            count,
        }
    }

    /// `batch[start..end]` as a batch of its own, so that a client that may hold it for
    /// long pins only these bytes.
    pub fn copied(batch: &LocalBatch, start: usize, end: usize, count: u32) -> Self {
        let own = batch
            .ledger()
            .pin(std::sync::Arc::new(Batch::copy_of(&batch.data[start..end], count)));
        Segment::new(own, 0, end - start, count)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.batch.data[self.start..self.end]
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    #[cfg(test)]
    pub fn batch(&self) -> &LocalBatch {
        &self.batch
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.batch.ledger().sub(SEGMENT_COST);
    }
}

/// What the writer sends next: one queued stretch as it is, or several copied together.
pub enum WriteJob {
    Single(Segment),
    Gathered { bytes: Vec<u8>, count: u64 },
}

impl WriteJob {
    pub fn bytes(&self) -> &[u8] {
        match self {
            WriteJob::Single(s) => s.bytes(),
            WriteJob::Gathered { bytes, .. } => bytes,
        }
    }

    pub fn count(&self) -> u64 {
        match self {
            WriteJob::Single(s) => s.count as u64,
            WriteJob::Gathered { count, .. } => *count,
        }
    }
}

/// A write job some of whose bytes may already be on the socket. It lives in the outbox,
/// not in the writer future, so a close that cancels the writer can still finish it
/// (shutdown flush, closing notice) and count it exactly.
pub struct InFlight {
    job: WriteJob,
    /// Bytes already written.
    done: usize,
    /// Envelopes (and notices) not yet completely written.
    unwritten: u64,
}

impl InFlight {
    pub fn new(job: WriteJob, done: usize) -> Self {
        let unwritten = job.count();
        let mut f = InFlight {
            job,
            done: 0,
            unwritten,
        };
        f.advance(done);
        f
    }

    /// Records `n` more bytes written. Every envelope (and notice) ends with the only raw
    /// `\n` it contains, so each `\n` written completes one.
    pub fn advance(&mut self, n: usize) {
        let written = &self.job.bytes()[self.done..self.done + n];
        let completed = memchr::memchr_iter(b'\n', written).count() as u64;
        self.unwritten = self.unwritten.saturating_sub(completed);
        self.done += n;
    }

    /// The bytes still to write.
    pub fn rest(&self) -> &[u8] {
        &self.job.bytes()[self.done..]
    }

    pub fn is_done(&self) -> bool {
        self.done >= self.job.bytes().len()
    }

    pub fn count(&self) -> u64 {
        self.job.count()
    }

    pub fn unwritten_envelopes(&self) -> u64 {
        self.unwritten
    }
}

/// Envelopes queued for one client: the write in progress, then the stretches not yet
/// handed to a write.
#[derive(Default)]
pub struct Outbox {
    segments: VecDeque<Segment>,
    /// Bytes in `segments`.
    bytes: usize,
    /// Envelopes in `segments`.
    msgs: u64,
    /// The write in progress, taken from `segments`.
    in_flight: Option<InFlight>,
}

impl Outbox {
    pub fn push(&mut self, segment: Segment) {
        self.bytes += segment.bytes().len();
        self.msgs += segment.count as u64;
        self.segments.push_back(segment);
    }

    pub fn pop(&mut self) -> Option<Segment> {
        let s = self.segments.pop_front()?;
        self.bytes -= s.bytes().len();
        self.msgs -= s.count as u64;
        Some(s)
    }

    /// The queued stretches, oldest first (not the write in progress).
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter()
    }

    pub fn front_len(&self) -> Option<usize> {
        self.segments.front().map(|s| s.bytes().len())
    }

    /// No stretch is queued (a write may still be in progress).
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn in_flight(&self) -> Option<&InFlight> {
        self.in_flight.as_ref()
    }

    pub fn in_flight_mut(&mut self) -> Option<&mut InFlight> {
        self.in_flight.as_mut()
    }

    pub fn set_in_flight(&mut self, f: InFlight) {
        self.in_flight = Some(f);
    }

    pub fn take_in_flight(&mut self) -> Option<InFlight> {
        self.in_flight.take()
    }

    /// Moves the next job (one stretch, or several gathered up to [`MAX_WRITE_BYTES`])
    /// into the write in progress; false when nothing is queued.
    pub fn start_next_job(&mut self) -> bool {
        debug_assert!(self.in_flight.is_none());
        match self.take_job() {
            Some(job) => {
                self.in_flight = Some(InFlight::new(job, 0));
                true
            }
            None => false,
        }
    }

    fn take_job(&mut self) -> Option<WriteJob> {
        let first = self.pop()?;
        if self.segments.is_empty() || first.bytes().len() >= MAX_WRITE_BYTES {
            return Some(WriteJob::Single(first));
        }
        let mut bytes = Vec::with_capacity(self.bytes.min(MAX_WRITE_BYTES) + first.bytes().len());
        bytes.extend_from_slice(first.bytes());
        let mut count = first.count as u64;
        while self
            .segments
            .front()
            .is_some_and(|next| bytes.len() + next.bytes().len() <= MAX_WRITE_BYTES)
        {
            let next = self.pop().expect("front() was Some");
            bytes.extend_from_slice(next.bytes());
            count += next.count as u64;
        }
        Some(WriteJob::Gathered { bytes, count })
    }

    /// `b`: bytes queued and not yet accepted by the socket.
    pub fn bytes(&self) -> usize {
        self.bytes + self.in_flight.as_ref().map_or(0, |f| f.rest().len())
    }

    /// Envelopes queued and not yet completely written.
    pub fn msgs(&self) -> u64 {
        self.msgs + self.in_flight.as_ref().map_or(0, InFlight::unwritten_envelopes)
    }

    /// Envelopes in the queued stretches only.
    pub fn queued_msgs(&self) -> u64 {
        self.msgs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Ledger;

    #[test]
    fn a_half_written_job_counts_only_its_unwritten_envelopes() {
        let lines = Batch::of(&[(1, "aaaa"), (2, "bbbb"), (3, "cccc")], "127.0.0.1:1");
        let batch = Ledger::detached().pin(std::sync::Arc::new(lines));
        let job = WriteJob::Single(Segment::new(batch.clone(), 0, batch.data.len(), 3));
        let first_end = memchr::memchr(b'\n', job.bytes()).unwrap() + 1;
        let mut f = InFlight::new(job, first_end + 3);
        assert_eq!(f.unwritten_envelopes(), 2);
        let rest = f.rest().len();
        f.advance(rest);
        assert!(f.is_done());
        assert_eq!(f.unwritten_envelopes(), 0);
    }

    #[test]
    fn queued_stretches_are_gathered_into_one_job_up_to_the_write_bound() {
        let batch = Ledger::detached().pin(std::sync::Arc::new(Batch::of(&[(1, "x")], "h:1")));
        let mut outbox = Outbox::default();
        for _ in 0..3 {
            outbox.push(Segment::new(batch.clone(), 0, batch.data.len(), 1));
        }
        assert_eq!((outbox.bytes(), outbox.msgs()), (3 * batch.data.len(), 3));
        assert!(outbox.start_next_job());
        assert!(outbox.is_empty());
        assert_eq!(outbox.in_flight().map(InFlight::count), Some(3));
        assert_eq!(outbox.bytes(), 3 * batch.data.len(), "in flight still counts");
    }
}
