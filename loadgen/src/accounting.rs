//! Delivery accounting for one (receiver, publisher) pair: every line carries its
//! publisher's sequence number, so a receiver can tell in-order deliveries, gaps (possible
//! loss), late fills of a gap (reordering) and repeats (duplicates) without storing every
//! number: it keeps the highest number seen and the gaps below it. [`GapTracker`] keeps
//! the longest silence one receiver saw between deliveries during the measured window.

/// What one arriving sequence number was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next expected number.
    InOrder,
    /// Beyond the next expected number: the numbers in between are missing for now.
    AfterGap,
    /// Fills an earlier gap: it arrived after a later number.
    Reordered,
    /// Already seen.
    Duplicate,
}

/// Tracks one publisher's sequence as seen by one receiver. Sequence numbers start at 0.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// One past the highest number seen.
    next: u64,
    /// Missing ranges `[start, end)` below `next`, in order; usually empty.
    gaps: Vec<(u64, u64)>,
    pub delivered: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

impl SeqTracker {
    /// One past the highest number seen (0 before the first).
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn on_arrival(&mut self, seq: u64) -> Arrival {
        let arrival = if seq == self.next {
            self.next += 1;
            Arrival::InOrder
        } else if seq > self.next {
            self.gaps.push((self.next, seq));
            self.next = seq + 1;
            Arrival::AfterGap
        } else if let Some(i) = self.gaps.iter().position(|&(s, e)| s <= seq && seq < e) {
            let (s, e) = self.gaps[i];
            match (seq == s, seq + 1 == e) {
                (true, true) => {
                    self.gaps.remove(i);
                }
                (true, false) => self.gaps[i].0 = seq + 1,
                (false, true) => self.gaps[i].1 = seq,
                (false, false) => {
                    self.gaps[i].1 = seq;
                    self.gaps.insert(i + 1, (seq + 1, e));
                }
            }
            Arrival::Reordered
        } else {
            Arrival::Duplicate
        };
        match arrival {
            Arrival::Duplicate => self.duplicated += 1,
            Arrival::Reordered => {
                self.reordered += 1;
                self.delivered += 1;
            }
            _ => self.delivered += 1,
        }
        arrival
    }

    /// Numbers below `sent` that never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        let missing_in_gaps: u64 = self.gaps.iter().map(|&(s, e)| e.min(sent).saturating_sub(s)).sum();
        missing_in_gaps + sent.saturating_sub(self.next)
    }
}

/// The longest time one receiver went without a delivery inside the measured window
/// `[start, end)`, counting from the window's start and up to its end, so a receiver that
/// stops receiving shows the whole silence. Times are ns since the generator's epoch.
#[derive(Debug, Clone, Copy, Default)]
pub struct GapTracker {
    /// The last delivery inside the window, 0 before the first.
    last: u64,
    longest: u64,
}

impl GapTracker {
    /// A read at `now` delivered something.
    pub fn on_delivery(&mut self, now: u64, start: u64, end: u64) {
        if now < start || now >= end {
            return;
        }
        self.longest = self.longest.max(now - self.last.max(start));
        self.last = now;
    }

    /// The longest gap, including the one from the last delivery to the window's end.
    pub fn longest(&self, start: u64, end: u64) -> u64 {
        self.longest.max(end.saturating_sub(self.last.max(start)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_window_edges_and_ignores_outside_deliveries() {
        let mut g = GapTracker::default();
        g.on_delivery(50, 100, 1000); // before the window
        g.on_delivery(130, 100, 1000);
        g.on_delivery(160, 100, 1000);
        g.on_delivery(560, 100, 1000);
        g.on_delivery(900, 100, 1000);
        g.on_delivery(2000, 100, 1000); // after it
        assert_eq!(g.longest(100, 1000), 400);
        // A receiver that went silent early shows the silence up to the end.
        let mut early = GapTracker::default();
        early.on_delivery(120, 100, 1000);
        assert_eq!(early.longest(100, 1000), 880);
        assert_eq!(GapTracker::default().longest(100, 1000), 900);
    }

    fn feed(seqs: &[u64]) -> SeqTracker {
        let mut t = SeqTracker::default();
        for &s in seqs {
            t.on_arrival(s);
        }
        t
    }

    #[test]
    fn a_perfect_stream_has_no_loss_reorder_or_duplicate() {
        let t = feed(&(0..1000).collect::<Vec<_>>());
        assert_eq!((t.delivered, t.duplicated, t.reordered, t.lost(1000)), (1000, 0, 0, 0));
    }

    #[test]
    fn missing_numbers_are_lost_including_the_tail() {
        let t = feed(&[0, 1, 3, 4, 7]);
        assert_eq!(t.delivered, 5);
        assert_eq!(t.lost(10), 2 + 2 + 1);
        assert_eq!(t.lost(8), 3);
    }

    #[test]
    fn late_arrivals_are_reordered_not_lost() {
        let t = feed(&[0, 2, 1, 5, 3, 4]);
        assert_eq!((t.delivered, t.reordered, t.duplicated, t.lost(6)), (6, 3, 0, 0));
    }

    #[test]
    fn repeats_are_duplicates_whether_in_order_or_filled() {
        let t = feed(&[0, 1, 1, 0, 3, 2, 2, 3]);
        assert_eq!((t.delivered, t.duplicated, t.reordered, t.lost(4)), (4, 4, 1, 0));
    }

    #[test]
    fn a_gap_filled_from_the_middle_splits_correctly() {
        let mut t = feed(&[0, 10]);
        assert_eq!(t.on_arrival(5), Arrival::Reordered);
        assert_eq!(t.on_arrival(5), Arrival::Duplicate);
        assert_eq!(t.on_arrival(1), Arrival::Reordered);
        assert_eq!(t.on_arrival(9), Arrival::Reordered);
        assert_eq!(t.lost(11), 11 - 5);
    }

    #[test]
    fn a_receiver_that_got_nothing_lost_everything() {
        assert_eq!(SeqTracker::default().lost(42), 42);
    }
}
