//! What travels on NATS between nodes, and the receiving side's sequence check (pure, no
//! I/O; the uplink calls these).
//!
//! One NATS message = a fixed 40-byte header followed by whole envelopes, byte for byte as
//! the sending shard encoded them (`{"content":…,"remote_addr":…}\n`, the original sender's
//! address). The header, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `CCv1` |
//! | 4..8 | envelopes in this message (u32) |
//! | 8..16 | sending node id (u64, random per process start) |
//! | 16..24 | the node's message sequence number (u64, from 1, one per message) |
//! | 24..32 | envelopes the node published before this message (u64) |
//! | 32..40 | publish time, microseconds since the Unix epoch (u64) |
//!
//! The sequence number makes duplicates and late copies detectable (dropped, never
//! delivered twice or out of order); the envelope total makes the lines lost in a gap
//! countable exactly.

use std::collections::HashMap;

use crate::batch::Batch;

pub const MAGIC: [u8; 4] = *b"CCv1";
pub const HEADER_LEN: usize = 40;

/// A message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub count: u32,
    pub node: u64,
    pub seq: u64,
    pub envelopes_before: u64,
    pub sent_us: u64,
}

impl Header {
    /// Writes the header over the first [`HEADER_LEN`] bytes of `out` (a [`Packer`] body
    /// keeps them free), so a message is built without a second copy of its body.
    pub fn write_into(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&self.count.to_le_bytes());
        out[8..16].copy_from_slice(&self.node.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.envelopes_before.to_le_bytes());
        out[32..40].copy_from_slice(&self.sent_us.to_le_bytes());
    }
}

/// Why a received message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than a header, or not our magic: another program on the subject.
    NotOurs,
    /// The header's envelope count disagrees with the lines in the body.
    CountMismatch { said: u32, found: u32 },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NotOurs => f.write_str("not a corecast message (bad header)"),
            DecodeError::CountMismatch { said, found } => {
                write!(f, "header says {said} envelopes, body holds {found} lines")
            }
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Splits a message into its header and body, checking that the body is `count` whole
/// envelopes (lines, each ending in `\n`).
pub fn decode(payload: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
    if payload.len() < HEADER_LEN || payload[..4] != MAGIC {
        return Err(DecodeError::NotOurs);
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&payload[4..8]);
    let header = Header {
        count: u32::from_le_bytes(c),
        node: u64_at(payload, 8),
        seq: u64_at(payload, 16),
        envelopes_before: u64_at(payload, 24),
        sent_us: u64_at(payload, 32),
    };
    let body = &payload[HEADER_LEN..];
    let lines = memchr::memchr_iter(b'\n', body).count() as u32;
    if lines != header.count || body.last().is_some_and(|&b| b != b'\n') {
        return Err(DecodeError::CountMismatch {
            said: header.count,
            found: lines,
        });
    }
    Ok((header, body))
}

/// Packs batches into messages whose bodies hold at most `room` bytes, cutting only at
/// envelope boundaries. Consecutive batches share a message while they fit, so a busy node
/// sends few, large messages; a batch larger than `room` is split over several. Each
/// message it hands out starts with [`HEADER_LEN`] bytes left for [`Header::write_into`].
#[derive(Debug, Default)]
pub struct Packer {
    /// The message being filled: header space, then whole envelopes.
    msg: Vec<u8>,
    count: u32,
    /// Messages complete and ready to publish, in order, with their envelope counts.
    ready: Vec<(Vec<u8>, u32)>,
    /// Envelopes that could not be sent because one alone is larger than `room`.
    pub oversize: u64,
}

impl Packer {
    fn body_len(&self) -> usize {
        self.msg.len().saturating_sub(HEADER_LEN)
    }

    fn append(&mut self, envelopes: &[u8], count: u32) {
        if self.msg.is_empty() {
            self.msg.reserve(HEADER_LEN + envelopes.len());
            self.msg.resize(HEADER_LEN, 0);
        }
        self.msg.extend_from_slice(envelopes);
        self.count += count;
    }

    /// Adds `batch`'s envelopes, in order.
    pub fn push(&mut self, batch: &Batch, room: usize) {
        if self.body_len() + batch.data.len() <= room {
            let total = batch.runs.iter().map(|r| r.count).sum();
            self.append(&batch.data, total);
            return;
        }
        let lines = |b: &[u8]| memchr::memchr_iter(b'\n', b).count() as u32;
        let mut rest = &batch.data[..];
        while !rest.is_empty() {
            let free = room.saturating_sub(self.body_len());
            if rest.len() <= free {
                self.append(rest, lines(rest));
                return;
            }
            // The longest run of whole envelopes that fits in what is left of this message.
            match memchr::memrchr(b'\n', &rest[..free]) {
                Some(i) => {
                    let (head, tail) = rest.split_at(i + 1);
                    self.append(head, lines(head));
                    rest = tail;
                    self.seal();
                }
                None if self.count > 0 => self.seal(),
                None => {
                    // One envelope larger than a whole message: it cannot travel.
                    let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
                    self.oversize += 1;
                    rest = &rest[end..];
                }
            }
        }
    }

    /// Ends the current message (if any) so that it is published next.
    pub fn seal(&mut self) {
        if self.count > 0 {
            self.ready.push((std::mem::take(&mut self.msg), self.count));
            self.count = 0;
        }
        self.msg.clear();
    }

    /// Body bytes in the message being filled.
    pub fn pending_len(&self) -> usize {
        self.body_len()
    }

    /// Throws away the message being filled and every complete one; returns the envelopes
    /// they held (for a publisher that died before publishing them).
    pub fn discard(&mut self) -> u64 {
        let lost = self.count as u64 + self.ready.iter().map(|(_, n)| *n as u64).sum::<u64>();
        self.count = 0;
        self.msg.clear();
        self.ready.clear();
        lost
    }

    /// Seals the current message and hands over every complete one, in order.
    pub fn take(&mut self) -> Vec<(Vec<u8>, u32)> {
        self.seal();
        std::mem::take(&mut self.ready)
    }
}

/// What the receiving side does with a message from another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Next in order: deliver.
    Deliver,
    /// Deliver, after `messages` messages carrying `envelopes` envelopes were lost.
    AfterGap { messages: u64, envelopes: u64 },
    /// A sequence number already seen (a duplicate or a late copy): drop.
    Stale,
}

/// The last message seen from each node. Bounded by the number of nodes that ever
/// published (each restart is a new id); a node unheard for a long time costs 24 bytes.
#[derive(Debug, Default)]
pub struct SeqTracker {
    last: HashMap<u64, (u64, u64)>,
}

impl SeqTracker {
    /// Judges `h` against what was seen from its node and records it if delivered. The first
    /// message from a node is in order whatever its number: a node joining a running
    /// cluster has missed nothing it could have had.
    pub fn check(&mut self, h: &Header) -> Verdict {
        let next_total = h.envelopes_before + h.count as u64;
        match self.last.get_mut(&h.node) {
            None => {
                self.last.insert(h.node, (h.seq, next_total));
                Verdict::Deliver
            }
            Some((seq, _)) if h.seq <= *seq => Verdict::Stale,
            Some((seq, total)) => {
                let messages = h.seq - *seq - 1;
                let envelopes = h.envelopes_before.saturating_sub(*total);
                *seq = h.seq;
                *total = next_total;
                if messages == 0 {
                    Verdict::Deliver
                } else {
                    Verdict::AfterGap { messages, envelopes }
                }
            }
        }
    }

    /// Nodes heard from since start.
    pub fn nodes(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lines: &[(u64, &str)]) -> Batch {
        Batch::of(lines, "10.0.0.1:5")
    }

    fn header(node: u64, seq: u64, before: u64, count: u32) -> Header {
        Header {
            count,
            node,
            seq,
            envelopes_before: before,
            sent_us: 7,
        }
    }

    #[test]
    fn a_header_and_body_round_trip() {
        let b = batch(&[(1, "a"), (2, "b\nc")]);
        let mut msg = vec![0u8; HEADER_LEN];
        header(9, 3, 10, 2).write_into(&mut msg);
        msg.extend_from_slice(&b.data);
        let (h, body) = decode(&msg).unwrap();
        assert_eq!(h, header(9, 3, 10, 2));
        assert_eq!(body, &b.data[..]);
    }

    #[test]
    fn foreign_or_inconsistent_messages_are_refused() {
        assert_eq!(decode(b"hello"), Err(DecodeError::NotOurs));
        assert_eq!(decode(&[0u8; 64]), Err(DecodeError::NotOurs));
        let mut msg = vec![0u8; HEADER_LEN];
        header(1, 1, 0, 3).write_into(&mut msg);
        msg.extend_from_slice(b"{}\n{}\n");
        assert_eq!(decode(&msg), Err(DecodeError::CountMismatch { said: 3, found: 2 }));
        let mut msg = vec![0u8; HEADER_LEN];
        header(1, 1, 0, 1).write_into(&mut msg);
        msg.extend_from_slice(b"{}\n{");
        assert!(decode(&msg).is_err());
    }

    #[test]
    fn batches_that_fit_share_one_body() {
        let mut p = Packer::default();
        let a = batch(&[(1, "a"), (1, "b")]);
        let b = batch(&[(2, "c")]);
        p.push(&a, 1000);
        p.push(&b, 1000);
        let out = p.take();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, 3);
        assert_eq!(out[0].0[HEADER_LEN..], [a.data, b.data].concat());
        assert!(p.take().is_empty());
    }

    #[test]
    fn a_large_batch_is_split_at_envelope_boundaries_and_never_over_the_room() {
        let lines: Vec<String> = (0..50).map(|i| format!("line {i} {}", "x".repeat(i % 7 * 5))).collect();
        let pairs: Vec<(u64, &str)> = lines.iter().map(|l| (1, l.as_str())).collect();
        let b = batch(&pairs);
        let largest = b.data.split_inclusive(|&c| c == b'\n').map(<[u8]>::len).max().unwrap();
        for room in [largest, largest + 1, 333, 1000] {
            let mut p = Packer::default();
            p.push(&batch(&[(3, "first")]), room);
            p.push(&b, room);
            let out = p.take();
            assert!(out.len() > 1);
            let mut joined = Vec::new();
            for (msg, count) in &out {
                let body = &msg[HEADER_LEN..];
                assert!(body.len() <= room, "room {room}: {}", body.len());
                assert!(body.ends_with(b"\n"));
                assert_eq!(memchr::memchr_iter(b'\n', body).count() as u32, *count);
                joined.extend_from_slice(body);
            }
            let want = [batch(&[(3, "first")]).data, b.data.clone()].concat();
            assert!(joined == want, "room {room}: the envelopes changed");
            assert_eq!(p.oversize, 0);
        }
    }

    #[test]
    fn an_envelope_larger_than_a_message_is_counted_and_skipped() {
        let big = "y".repeat(200);
        let b = batch(&[(1, "a"), (1, &big), (1, "b")]);
        let mut p = Packer::default();
        p.push(&b, 100);
        let out = p.take();
        assert_eq!(p.oversize, 1);
        let bodies: Vec<u8> = out.iter().flat_map(|(m, _)| m[HEADER_LEN..].to_vec()).collect();
        assert_eq!(bodies, batch(&[(1, "a"), (1, "b")]).data);
        assert_eq!(out.iter().map(|o| o.1).sum::<u32>(), 2);
    }

    #[test]
    fn sequence_numbers_find_gaps_and_drop_duplicates() {
        let mut t = SeqTracker::default();
        assert_eq!(t.check(&header(1, 5, 40, 2)), Verdict::Deliver);
        assert_eq!(t.check(&header(1, 6, 42, 3)), Verdict::Deliver);
        assert_eq!(t.check(&header(1, 6, 42, 3)), Verdict::Stale);
        assert_eq!(t.check(&header(1, 2, 10, 3)), Verdict::Stale);
        // Messages 7 and 8 (envelopes 45..52) were lost.
        assert_eq!(
            t.check(&header(1, 9, 52, 1)),
            Verdict::AfterGap {
                messages: 2,
                envelopes: 7
            }
        );
        assert_eq!(
            t.check(&header(1, 8, 50, 2)),
            Verdict::Stale,
            "a late copy is never reordered"
        );
        assert_eq!(t.check(&header(2, 1, 0, 1)), Verdict::Deliver);
        assert_eq!(t.nodes(), 2);
    }
}
