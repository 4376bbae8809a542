//! How each receiving connection reads: the classes of receivers a run mixes, modelled on
//! the clients that real relays meet. Healthy receivers read everything as it arrives;
//! rate-limited ones take at most `--reader-rate` bytes/s, reading a small buffer and then
//! waiting as long as those bytes take at that rate (a client that reads and sleeps);
//! pausing ones stop reading once, for `--pause-ms`, then read normally; stuck ones connect
//! and never read. The engine asks [`ReaderMix::class_of`] once per connection and the
//! pure helpers here when to read next; nothing in this file touches a socket.

use serde::Serialize;

/// Bytes a rate-limited receiver asks for per `read`, like a client's `recv(4096)`.
pub const SLOW_READ_BUF: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReaderClass {
    /// Reads everything as soon as it arrives.
    Healthy,
    /// Reads at most `--reader-rate` bytes per second.
    RateLimited,
    /// Stops reading once for `--pause-ms`, then reads normally.
    Pausing,
    /// Never reads.
    Stuck,
}

impl ReaderClass {
    pub const ALL: [ReaderClass; 4] = [
        ReaderClass::Healthy,
        ReaderClass::RateLimited,
        ReaderClass::Pausing,
        ReaderClass::Stuck,
    ];

    /// Position in [`ReaderClass::ALL`], for per-class arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            ReaderClass::Healthy => "healthy",
            ReaderClass::RateLimited => "rate-limited",
            ReaderClass::Pausing => "pausing",
            ReaderClass::Stuck => "stuck",
        }
    }
}

/// Which clients read how. The special classes take the highest client numbers (stuck at
/// the top, then pausing, then rate-limited), so they overlap the publishers (the lowest
/// numbers) only when there are more of both than clients.
#[derive(Debug, Clone, Default)]
pub struct ReaderMix {
    pub clients: usize,
    pub rate_limited: usize,
    pub pausing: usize,
    pub stuck: usize,
    /// Bytes per second a rate-limited receiver reads at most.
    pub reader_rate: f64,
    /// When a pausing receiver stops reading, after the start of the measured window.
    pub pause_at_ns: u64,
    /// How long it stops.
    pub pause_ns: u64,
}

impl ReaderMix {
    pub fn class_of(&self, client: usize) -> ReaderClass {
        let from_top = self.clients.saturating_sub(client + 1);
        if from_top < self.stuck {
            ReaderClass::Stuck
        } else if from_top < self.stuck + self.pausing {
            ReaderClass::Pausing
        } else if from_top < self.stuck + self.pausing + self.rate_limited {
            ReaderClass::RateLimited
        } else {
            ReaderClass::Healthy
        }
    }

    /// Receivers whose deliveries are accounted for: all but the stuck ones.
    pub fn counted(&self) -> usize {
        self.clients - self.stuck
    }

    /// The pause as `[start, end)` in ns since the epoch, given where the window starts.
    pub fn pause_window(&self, window_start_ns: u64) -> (u64, u64) {
        let start = window_start_ns.saturating_add(self.pause_at_ns);
        (start, start.saturating_add(self.pause_ns))
    }

    /// How long a rate-limited receiver waits after reading `bytes`, in ns: the time those
    /// bytes take at its rate, so that over any stretch it reads at most the rate plus one
    /// buffer.
    pub fn rate_delay_ns(&self, bytes: usize) -> u64 {
        if self.reader_rate <= 0.0 {
            return 0;
        }
        (bytes as f64 * 1e9 / self.reader_rate) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix() -> ReaderMix {
        ReaderMix {
            clients: 10,
            rate_limited: 2,
            pausing: 1,
            stuck: 3,
            reader_rate: 2_000_000.0,
            pause_at_ns: 500_000_000,
            pause_ns: 300_000_000,
        }
    }

    #[test]
    fn special_classes_take_the_highest_client_numbers() {
        let m = mix();
        let classes: Vec<_> = (0..10).map(|c| m.class_of(c)).collect();
        use ReaderClass::*;
        assert_eq!(
            classes,
            [
                Healthy,
                Healthy,
                Healthy,
                Healthy,
                RateLimited,
                RateLimited,
                Pausing,
                Stuck,
                Stuck,
                Stuck
            ]
        );
        assert_eq!(m.counted(), 7);
    }

    #[test]
    fn a_rate_limited_reader_waits_as_long_as_its_bytes_take() {
        let m = mix();
        // 4096 bytes at 2 MB/s: 2.048 ms.
        assert_eq!(m.rate_delay_ns(4096), 2_048_000);
        assert_eq!(m.rate_delay_ns(0), 0);
        let unlimited = ReaderMix::default();
        assert_eq!(unlimited.rate_delay_ns(4096), 0);
    }

    #[test]
    fn the_pause_starts_after_the_window_opens() {
        assert_eq!(mix().pause_window(1_000), (500_001_000, 800_001_000));
    }
}
