//! Backpressure decisions (SPEC §2.2), pure: the fan-out code measures, this module decides.
//!
//! A recipient is *stalled* while its socket refuses data; `d` counts messages queued for
//! a stalled recipient (0 for one that is keeping up, however large a burst is queued for
//! it at the moment) and `b` counts queued bytes. Shards publish their largest `d`; a
//! sender whose line was relayed while the largest `d` anywhere is high pauses reading.

use std::time::Duration;

use crate::config::{BackpressureConfig, Config};

/// The thresholds and delays, copied out of the config.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub thresholds: BackpressureConfig,
    pub max_pending_bytes: usize,
    pub throttle_delay: Duration,
    pub flow_control_delay: Duration,
}

impl Policy {
    pub fn from_config(c: &Config) -> Self {
        Policy {
            thresholds: c.backpressure,
            max_pending_bytes: c.max_pending_bytes,
            throttle_delay: Duration::from_millis(c.throttle_delay_ms),
            flow_control_delay: Duration::from_millis(c.flow_control_delay_ms),
        }
    }

    /// Whether a recipient with `stalled_msgs` (`d`) and `queued_bytes` (`b`) must be closed.
    /// `max_pending_bytes` applies whatever the flags say: memory is bounded per connection.
    pub fn must_disconnect(&self, stalled_msgs: u64, queued_bytes: usize) -> bool {
        let t = &self.thresholds;
        queued_bytes > self.max_pending_bytes || (t.enable_disconnect && stalled_msgs >= t.disconnect_threshold)
    }

    /// How long to stop reading from a sender whose line was just relayed, given the largest
    /// `d` on any shard.
    pub fn sender_pause(&self, largest_stalled_msgs: u64) -> Option<Duration> {
        let t = &self.thresholds;
        if t.enable_flow_control && largest_stalled_msgs >= t.flow_control_threshold {
            Some(self.flow_control_delay)
        } else if t.enable_throttle && largest_stalled_msgs >= t.throttle_threshold {
            Some(self.throttle_delay)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::from_config(&Config::default())
    }

    #[test]
    fn pauses_follow_the_largest_stalled_depth() {
        let p = policy();
        assert_eq!(p.sender_pause(0), None);
        assert_eq!(p.sender_pause(99), None);
        assert_eq!(p.sender_pause(100), Some(Duration::from_millis(200)));
        assert_eq!(p.sender_pause(300), Some(Duration::from_millis(1000)));
    }

    #[test]
    fn disabled_stages_are_skipped() {
        let mut p = policy();
        p.thresholds.enable_flow_control = false;
        assert_eq!(p.sender_pause(400), Some(Duration::from_millis(200)));
        p.thresholds.enable_throttle = false;
        assert_eq!(p.sender_pause(400), None);
    }

    #[test]
    fn disconnect_at_the_threshold_or_over_the_byte_bound_whatever_the_flags() {
        let mut p = policy();
        assert!(!p.must_disconnect(499, 1000));
        assert!(p.must_disconnect(500, 1000));
        p.thresholds.enable_disconnect = false;
        assert!(!p.must_disconnect(100_000, 1000));
        assert!(p.must_disconnect(0, (8 << 20) + 1));
    }
}
