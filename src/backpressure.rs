//! Backpressure decisions (docs/protocol.md#backpressure), pure: the fan-out code
//! measures, this module decides, with the clock passed in.
//!
//! A recipient is *stalled* while its socket refuses data. For a stalled recipient, `d`
//! counts the envelopes queued for it and `b` the bytes. Its shard keeps one [`Lag`] per
//! recipient and calls [`Policy::observe`] whenever it delivers to a stalled recipient and at
//! every lag sweep; the answer says how much the recipient holds the senders back
//! ([`Stage`]) and whether it must be closed ([`Rule`]).
//!
//! The rules, together:
//! - *Pauses come first.* A recipient stalled for at least [`BEHIND_AFTER`] with `d` at
//!   the throttle threshold makes senders
//!   sleep `throttle_delay` after each read that relayed lines; at the flow-control
//!   threshold they stop reading until it drops below. A recipient may hold the senders
//!   back for at most `flow_control_delay` in any `write_deadline` window (its
//!   *allowance*): a fresh stall gets a brief pause, a stuck recipient cannot hold the room.
//! - *Bytes pause too.* A stalled recipient with a quarter of `max_pending_bytes` queued
//!   throttles the senders and one with half stops them, from the first moment (bytes are
//!   memory), so that large lines pause the senders long before the bytes rule could close
//!   anyone. Such a byte pause is charged to the recipient's allowance only while it is
//!   not reading (no progress for [`READING_WITHIN`]) or while it lags alone (fewer than
//!   half the process's clients are stalled): when most recipients are behind, the relay
//!   simply goes at their pace, as TCP would; a lone laggard gets only its allowance, then
//!   its backlog grows to the bytes rule.
//! - *Closes need time.* Deadline: data queued and no byte accepted for `write_deadline`.
//!   Messages: `d` at or over the disconnect threshold for a whole `write_deadline` without
//!   once dropping below it (it reads, but stays slower than the traffic). Bytes: `b` over
//!   `max_pending_bytes`, at once and whatever the flags say (memory is bounded).

use std::time::{Duration, Instant};

use crate::config::{BackpressureConfig, Config};

/// How long a recipient must have been stalled before its backlog pauses anyone. A reader
/// that keeps up stalls for moments at high rates (its socket is full while it catches
/// up: 300 envelopes are a millisecond at 270,000 a second); one that stopped, or a
/// blocking call in an agent, stays stalled far longer.
pub const BEHIND_AFTER: Duration = Duration::from_millis(100);

/// A stalled recipient whose socket accepted bytes this recently is still reading, for the
/// charging of byte pauses: readers that take large chunks at intervals (a 256 KiB read
/// every 130 ms is 2 MB/s) count, one that stopped stops counting after this.
pub const READING_WITHIN: Duration = Duration::from_secs(1);

/// The thresholds and delays, copied out of the config.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub thresholds: BackpressureConfig,
    pub max_pending_bytes: usize,
    /// Bound on all recipients' `b` together, per process; past it every shard stops
    /// reading until it drops below.
    pub max_total_pending_bytes: usize,
    pub throttle_delay: Duration,
    /// A recipient's pause allowance per `write_deadline` window.
    pub flow_control_delay: Duration,
    pub write_deadline: Duration,
}

/// How much one recipient (or the whole relay) holds the senders back. Ordered: the
/// largest stage anywhere is the one senders obey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Stage {
    #[default]
    None = 0,
    /// Senders sleep `throttle_delay` after each read that relayed lines.
    Throttle = 1,
    /// Senders stop reading until no recipient is at the flow-control stage.
    FlowControl = 2,
}

impl Stage {
    pub fn from_u8(v: u8) -> Stage {
        match v {
            1 => Stage::Throttle,
            2 => Stage::FlowControl,
            _ => Stage::None,
        }
    }
}

/// Which rule closed a slow consumer (all of them close with `slow_consumer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No byte accepted for `write_deadline_ms` while data was queued.
    Deadline,
    /// More than `max_pending_bytes` queued.
    Bytes,
    /// `d` at or over `disconnect_threshold` for `write_deadline_ms` without a dip.
    Messages,
}

impl Rule {
    pub const ALL: [Rule; 3] = [Rule::Deadline, Rule::Bytes, Rule::Messages];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Deadline => "deadline",
            Rule::Bytes => "bytes",
            Rule::Messages => "messages",
        }
    }
}

/// What one observation of a recipient concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub stage: Stage,
    pub close: Option<Rule>,
}

/// One recipient's standing. Plain data, owned by the recipient's shard.
#[derive(Debug, Clone, Copy)]
pub struct Lag {
    /// While stalled: the later of the stall's start and the last write that made
    /// progress (the deadline's clock). `None` while the socket keeps up.
    progress_at: Option<Instant>,
    /// When the current stall began.
    stalled_since: Option<Instant>,
    /// Since when `d` has stayed at or over the disconnect threshold.
    over_since: Option<Instant>,
    /// The current allowance window and the pause time charged in it.
    window_start: Instant,
    charged: Duration,
    /// The last observation, the stage it reported and whether that stage is charged to
    /// the allowance (until the next observation).
    last: Option<(Instant, Stage, bool)>,
}

impl Lag {
    pub fn new(now: Instant) -> Self {
        Lag {
            progress_at: None,
            stalled_since: None,
            over_since: None,
            window_start: now,
            charged: Duration::ZERO,
            last: None,
        }
    }

    /// The socket refused data.
    pub fn on_stall(&mut self, now: Instant) {
        self.progress_at.get_or_insert(now);
        self.stalled_since.get_or_insert(now);
    }

    /// A write to a stalled socket was accepted (some bytes went out).
    pub fn on_progress(&mut self, now: Instant) {
        if self.progress_at.is_some() {
            self.progress_at = Some(now);
        }
    }

    /// The socket took everything queued: the recipient keeps up again. The allowance
    /// already charged in this window stays charged.
    pub fn on_caught_up(&mut self, now: Instant) {
        self.charge(now);
        self.progress_at = None;
        self.stalled_since = None;
        self.over_since = None;
        self.last = None;
    }

    /// The stage this recipient reported last (`None` once it caught up).
    pub fn stage(&self) -> Stage {
        self.last.map_or(Stage::None, |(_, s, _)| s)
    }

    fn charge(&mut self, now: Instant) {
        if let Some((at, stage, charged)) = self.last {
            if stage != Stage::None && charged {
                self.charged += now.saturating_duration_since(at);
            }
        }
    }
}

impl Policy {
    pub fn from_config(c: &Config) -> Self {
        Policy {
            thresholds: c.backpressure,
            max_pending_bytes: c.max_pending_bytes,
            max_total_pending_bytes: c.max_total_pending_bytes,
            throttle_delay: Duration::from_millis(c.throttle_delay_ms),
            flow_control_delay: Duration::from_millis(c.flow_control_delay_ms),
            write_deadline: Duration::from_millis(c.write_deadline_ms),
        }
    }

    /// The stage a stalled recipient's `b` alone calls for: throttle from a quarter of
    /// `max_pending_bytes`, flow control from half of it.
    pub fn byte_stage(&self, b: usize) -> Stage {
        let t = &self.thresholds;
        if t.enable_flow_control && b >= self.max_pending_bytes / 2 {
            Stage::FlowControl
        } else if t.enable_throttle && b >= self.max_pending_bytes / 4 {
            Stage::Throttle
        } else {
            Stage::None
        }
    }

    /// Observes a stalled recipient with `d` envelopes and `b` bytes queued; `crowd_behind`
    /// says whether at least half the process's clients are stalled now.
    pub fn observe(&self, lag: &mut Lag, d: u64, b: usize, crowd_behind: bool, now: Instant) -> Verdict {
        let t = &self.thresholds;
        lag.charge(now);
        if now.saturating_duration_since(lag.window_start) >= self.write_deadline {
            lag.window_start = now;
            lag.charged = Duration::ZERO;
        }
        let over = t.enable_disconnect && d >= t.disconnect_threshold;
        if over {
            lag.over_since.get_or_insert(now);
        } else {
            lag.over_since = None;
        }
        let waited =
            |since: Option<Instant>| since.is_some_and(|s| now.saturating_duration_since(s) >= self.write_deadline);
        let close = if b > self.max_pending_bytes {
            Some(Rule::Bytes)
        } else if waited(lag.progress_at) {
            Some(Rule::Deadline)
        } else if waited(lag.over_since) {
            Some(Rule::Messages)
        } else {
            None
        };
        let fresh = lag
            .stalled_since
            .is_none_or(|s| now.saturating_duration_since(s) < BEHIND_AFTER);
        let exhausted = lag.charged >= self.flow_control_delay;
        let by_depth = if close.is_some() || fresh || exhausted {
            Stage::None
        } else if t.enable_flow_control && d >= t.flow_control_threshold {
            Stage::FlowControl
        } else if t.enable_throttle && d >= t.throttle_threshold {
            Stage::Throttle
        } else {
            Stage::None
        };
        // A byte pause is free while the recipient reads and most recipients are behind
        // with it: the relay then goes at their pace. Otherwise it spends the allowance.
        let reading = lag
            .progress_at
            .is_some_and(|p| now.saturating_duration_since(p) < READING_WITHIN);
        let free = reading && crowd_behind;
        let by_bytes = if close.is_some() || (exhausted && !free) {
            Stage::None
        } else {
            self.byte_stage(b)
        };
        let stage = by_depth.max(by_bytes);
        let charged = stage != Stage::None && (by_depth == stage || !free);
        lag.last = Some((now, stage, charged));
        Verdict { stage, close }
    }

    /// Whether `total` queued bytes across the process are past the process-wide bound.
    pub fn over_total(&self, total: u64) -> bool {
        total > self.max_total_pending_bytes as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::from_config(&Config::defaults_for(&crate::machine::Machine::detect()))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A recipient stalled since [`BEHIND_AFTER`] before `t0` whose last write went out at
    /// `t0`: its backlog counts for pauses from `t0` on.
    fn stalled(t0: Instant) -> Lag {
        let mut lag = Lag::new(t0);
        lag.on_stall(t0 - BEHIND_AFTER);
        lag.on_progress(t0);
        lag
    }

    #[test]
    fn a_stall_pauses_nobody_until_it_has_lasted_a_moment() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = Lag::new(t0);
        lag.on_stall(t0);
        assert_eq!(p.observe(&mut lag, 1000, 0, false, t0 + ms(99)).stage, Stage::None);
        assert_eq!(
            p.observe(&mut lag, 1000, 0, false, t0 + BEHIND_AFTER).stage,
            Stage::FlowControl
        );
        // Caught up and stalled again: the moment starts over.
        lag.on_caught_up(t0 + ms(200));
        lag.on_stall(t0 + ms(300));
        assert_eq!(p.observe(&mut lag, 1000, 0, false, t0 + ms(350)).stage, Stage::None);
    }

    #[test]
    fn a_fresh_backlog_throttles_then_flow_controls() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = stalled(t0);
        assert_eq!(p.observe(&mut lag, 99, 0, false, t0).stage, Stage::None);
        assert_eq!(p.observe(&mut lag, 100, 0, false, t0).stage, Stage::Throttle);
        assert_eq!(
            p.observe(&mut lag, 300, 0, false, t0 + ms(10)).stage,
            Stage::FlowControl
        );
        assert_eq!(p.observe(&mut lag, 299, 0, false, t0 + ms(20)).stage, Stage::Throttle);
    }

    #[test]
    fn disabled_stages_are_skipped() {
        let mut p = policy();
        let t0 = Instant::now();
        p.thresholds.enable_flow_control = false;
        assert_eq!(p.observe(&mut stalled(t0), 400, 0, false, t0).stage, Stage::Throttle);
        p.thresholds.enable_throttle = false;
        assert_eq!(p.observe(&mut stalled(t0), 400, 0, false, t0).stage, Stage::None);
    }

    #[test]
    fn a_recipient_holds_the_senders_back_only_for_its_allowance_per_window() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = stalled(t0);
        let mut t = t0;
        // Behind at the flow-control stage, observed every 50 ms: 1 s of pauses, no more.
        while p.observe(&mut lag, 1000, 0, false, t).stage == Stage::FlowControl {
            t += ms(50);
            lag.on_progress(t);
        }
        assert_eq!(t - t0, ms(1000));
        // Catching up and falling behind again in the same window gives nothing new...
        lag.on_caught_up(t);
        lag.on_stall(t + ms(100));
        assert_eq!(p.observe(&mut lag, 1000, 0, false, t + ms(300)).stage, Stage::None);
        // ...until the next window.
        let next = t0 + p.write_deadline;
        lag.on_progress(next);
        assert_eq!(p.observe(&mut lag, 1000, 0, false, next).stage, Stage::FlowControl);
    }

    #[test]
    fn a_recipient_that_accepts_nothing_is_closed_at_the_write_deadline() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = stalled(t0);
        assert_eq!(p.observe(&mut lag, 5, 100, false, t0 + ms(9_999)).close, None);
        assert_eq!(
            p.observe(&mut lag, 5, 100, false, t0 + ms(10_000)).close,
            Some(Rule::Deadline)
        );
    }

    #[test]
    fn progress_restarts_the_deadline_and_an_old_quiet_spell_does_not_count() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = Lag::new(t0);
        // Idle for a minute, then a burst the socket refuses at once.
        let t1 = t0 + ms(60_000);
        lag.on_stall(t1);
        assert_eq!(p.observe(&mut lag, 5, 100, false, t1).close, None);
        lag.on_progress(t1 + ms(9_000));
        assert_eq!(p.observe(&mut lag, 5, 100, false, t1 + ms(18_000)).close, None);
        assert_eq!(
            p.observe(&mut lag, 5, 100, false, t1 + ms(19_000)).close,
            Some(Rule::Deadline)
        );
    }

    #[test]
    fn a_reader_slower_than_the_traffic_is_closed_after_a_deadline_over_the_threshold() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = stalled(t0);
        let mut t = t0;
        // It keeps reading (progress), but d never drops under 500.
        let mut verdict = p.observe(&mut lag, 600, 0, false, t);
        while verdict.close.is_none() {
            t += ms(100);
            lag.on_progress(t);
            verdict = p.observe(&mut lag, 600, 0, false, t);
        }
        assert_eq!(verdict.close, Some(Rule::Messages));
        assert_eq!(t - t0, p.write_deadline);
    }

    #[test]
    fn a_dip_under_the_disconnect_threshold_restarts_the_messages_rule() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = stalled(t0);
        p.observe(&mut lag, 600, 0, false, t0);
        lag.on_progress(t0 + ms(6_000));
        p.observe(&mut lag, 400, 0, false, t0 + ms(6_000));
        lag.on_progress(t0 + ms(12_000));
        assert_eq!(p.observe(&mut lag, 600, 0, false, t0 + ms(12_000)).close, None);
        lag.on_progress(t0 + ms(21_000));
        assert_eq!(p.observe(&mut lag, 600, 0, false, t0 + ms(21_000)).close, None);
        lag.on_progress(t0 + ms(22_000));
        assert_eq!(
            p.observe(&mut lag, 600, 0, false, t0 + ms(22_000)).close,
            Some(Rule::Messages)
        );
    }

    #[test]
    fn enable_disconnect_off_disables_only_the_messages_rule() {
        let mut p = policy();
        p.thresholds.enable_disconnect = false;
        let t0 = Instant::now();
        let mut lag = stalled(t0);
        lag.on_progress(t0 + ms(30_000));
        assert_eq!(p.observe(&mut lag, 100_000, 1000, false, t0 + ms(30_000)).close, None);
        assert_eq!(
            p.observe(&mut lag, 5, p.max_pending_bytes + 1, false, t0 + ms(30_000))
                .close,
            Some(Rule::Bytes)
        );
        assert_eq!(
            p.observe(&mut lag, 5, 10, false, t0 + ms(40_000)).close,
            Some(Rule::Deadline)
        );
    }

    #[test]
    fn a_recipient_being_closed_pauses_nobody() {
        let p = policy();
        let t0 = Instant::now();
        let v = p.observe(&mut stalled(t0), 1000, p.max_pending_bytes + 1, false, t0);
        assert_eq!(
            v,
            Verdict {
                stage: Stage::None,
                close: Some(Rule::Bytes)
            }
        );
    }

    #[test]
    fn a_byte_backlog_pauses_at_once_whatever_the_envelope_count() {
        let p = policy();
        let t0 = Instant::now();
        let mut lag = Lag::new(t0);
        lag.on_stall(t0);
        // Ten envelopes of a megabyte and more: no moment of grace, bytes are memory.
        let quarter = p.max_pending_bytes / 4;
        assert_eq!(p.observe(&mut lag, 10, quarter - 1, false, t0).stage, Stage::None);
        assert_eq!(p.observe(&mut lag, 10, quarter, false, t0).stage, Stage::Throttle);
        assert_eq!(
            p.observe(&mut lag, 10, 2 * quarter, false, t0 + ms(1)).stage,
            Stage::FlowControl
        );
        let mut off = p;
        off.thresholds.enable_flow_control = false;
        off.thresholds.enable_throttle = false;
        assert_eq!(
            off.observe(&mut Lag::new(t0), 10, 2 * quarter, false, t0).stage,
            Stage::None
        );
    }

    #[test]
    fn a_byte_pause_is_free_while_the_recipient_reads_with_the_crowd_behind() {
        let p = policy();
        let half = p.max_pending_bytes / 2;
        let t0 = Instant::now();
        // Reading (progress every 50 ms) while most clients are stalled: paused for as
        // long as it takes, nothing charged.
        let mut lag = stalled(t0);
        let mut t = t0;
        while t - t0 < ms(5_000) {
            assert_eq!(p.observe(&mut lag, 30, half, true, t).stage, Stage::FlowControl);
            t += ms(50);
            lag.on_progress(t);
        }
        // Alone behind, the same reader spends its allowance and then pauses nobody...
        let mut alone = stalled(t0);
        let mut t = t0;
        while p.observe(&mut alone, 30, half, false, t).stage == Stage::FlowControl {
            t += ms(50);
            alone.on_progress(t);
        }
        assert_eq!(t - t0, p.flow_control_delay);
        // ...and so does one that stopped reading, even in a crowd.
        let mut stopped = stalled(t0);
        let mut t = t0;
        while p.observe(&mut stopped, 30, half, true, t).stage == Stage::FlowControl {
            t += ms(50);
        }
        assert!(t - t0 <= p.flow_control_delay + READING_WITHIN, "{:?}", t - t0);
    }

    #[test]
    fn the_process_wide_bound_is_exclusive() {
        let p = policy();
        assert!(!p.over_total(p.max_total_pending_bytes as u64));
        assert!(p.over_total(p.max_total_pending_bytes as u64 + 1));
    }
}
