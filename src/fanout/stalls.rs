//! Stall tracking: the recipients whose socket refused data and has not taken everything
//! since, the backpressure policy applied to them (docs/protocol.md#backpressure), the
//! slow-consumer close with its quarantine strike, and this shard's published stage
//! (the largest among its stalled recipients), which every sender's reader obeys.
//!
//! Told by the flush task and the connections' writer halves when a recipient stalls or
//! catches up; re-examines its recipients from [`Stalls::sweep_loop`] while it has any.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backpressure::{Rule, Stage};
use crate::client::Client;
use crate::metrics::{CloseReason, ShardStats};
use crate::notify::Notify;
use crate::quarantine::Strike;
use crate::shared::{LocalTunables, Shared};

/// How often a shard re-examines its stalled recipients while it has any: the write
/// deadline, the messages rule and the end of pause allowances are seen this late at most.
pub const LAG_SWEEP_INTERVAL: Duration = Duration::from_millis(20);

pub struct Stalls {
    shard_id: usize,
    shared: Arc<Shared>,
    stats: Arc<ShardStats>,
    /// The shard's reloadable limits: the policy applied to stalled recipients.
    tunables: Rc<LocalTunables>,
    /// Stalled recipients by id (usually none or a few); each leaves when it catches up
    /// or closes.
    stalled: RefCell<HashMap<u64, Rc<Client>>>,
    /// This shard's stage, as last published in [`Shared`].
    stage: Cell<Stage>,
    /// Whether most of the process's clients were stalled at the last review (refreshed at
    /// each stall and review, not per delivery).
    crowd_behind: Cell<bool>,
    /// Wakes the sweep when the first recipient stalls.
    wake: Notify,
}

impl Stalls {
    pub fn new(shard_id: usize, shared: Arc<Shared>, stats: Arc<ShardStats>, tunables: Rc<LocalTunables>) -> Self {
        Stalls {
            shard_id,
            shared,
            stats,
            tunables,
            stalled: RefCell::default(),
            stage: Cell::new(Stage::None),
            crowd_behind: Cell::new(false),
            wake: Notify::default(),
        }
    }

    /// A recipient's socket refused data: it now counts toward `d` and the sweep watches
    /// it until it has taken everything.
    pub fn on_stall(&self, client: &Rc<Client>) {
        let now = Instant::now();
        client.lag_on_stall(now);
        if self.stalled.borrow_mut().insert(client.id, client.clone()).is_none() {
            self.wake.notify();
            self.publish_stalled();
        }
        self.check_and_raise(client, now);
    }

    /// A stalled recipient's socket took everything queued: it no longer counts.
    pub fn on_caught_up(&self, client: &Client) {
        let now = Instant::now();
        client.lag_on_caught_up(now);
        if self.stalled.borrow_mut().remove(&client.id).is_some() {
            self.publish_stalled();
            self.review(now);
        }
    }

    /// A recipient has gone: it no longer counts.
    pub fn forget(&self, client: &Client) {
        if self.stalled.borrow_mut().remove(&client.id).is_some() {
            self.publish_stalled();
            self.review(Instant::now());
        }
    }

    /// A stalled recipient got more envelopes: the policy looks at it again.
    pub fn on_more_queued(&self, client: &Client, now: Instant) {
        self.check_and_raise(client, now);
    }

    fn check_and_raise(&self, client: &Client, now: Instant) {
        let stage = self.check(client, now);
        if stage > self.stage.get() {
            self.publish(stage);
        }
    }

    /// Applies the backpressure policy to a stalled client: closes it if a rule says so,
    /// and returns how much it holds the senders back.
    fn check(&self, client: &Client, now: Instant) -> Stage {
        let depth = client.stalled_depth();
        let bytes = client.queued_bytes();
        self.stats.on_stalled_depth(depth);
        let verdict = client.observe_lag(&self.tunables.get().policy, depth, bytes, self.crowd_behind.get(), now);
        if let Some(rule) = verdict.close {
            self.close_slow_consumer(client, rule, &format!("{depth} messages / {bytes} bytes queued"));
        }
        verdict.stage
    }

    fn rule_text(&self, rule: Rule) -> String {
        let p = self.tunables.get().policy;
        let deadline_ms = p.write_deadline.as_millis();
        match rule {
            Rule::Deadline => format!("accepted nothing for {deadline_ms} ms"),
            Rule::Bytes => format!("over max_pending_bytes ({})", p.max_pending_bytes),
            Rule::Messages => format!(
                "over disconnect_threshold ({}) for {deadline_ms} ms",
                p.thresholds.disconnect_threshold
            ),
        }
    }

    /// Closes `client` as a slow consumer by `rule` (`queued` says how far behind it is),
    /// recording the strike against its key that may quarantine it. Every `slow_consumer`
    /// close goes through here; a client already closing is left alone (one close, one
    /// strike).
    fn close_slow_consumer(&self, client: &Client, rule: Rule, queued: &str) {
        if client.is_closing() {
            return;
        }
        self.stats.on_slow_consumer(rule);
        let why = format!("{queued}, {}", self.rule_text(rule));
        // A client that has read (its socket took more than a non-reader's could) is an
        // agent busy elsewhere, not an abuser: no strike (docs/protocol.md#quarantine).
        let read = client.accepted_bytes();
        let strike = if read > self.shared.unread_bytes_bound {
            Strike::Served { read }
        } else {
            self.shared.quarantine.strike(client.addr, Instant::now())
        };
        let action = match strike {
            Strike::Counted { count, limit } => format!("closing it (strike {count} of {limit})"),
            Strike::SameEpisode { count, limit } => {
                format!("closing it (same episode as strike {count} of {limit}, no new strike)")
            }
            Strike::Served { read } => format!("closing it (no strike: it has read {read} bytes)"),
            Strike::Quarantined { limit, cooldown } => format!(
                "closing it (strike {limit} of {limit}) and quarantining it for {} s",
                cooldown.as_secs()
            ),
            Strike::Off => "closing it".to_string(),
        };
        if matches!(strike, Strike::Counted { .. } | Strike::Quarantined { .. }) {
            self.stats.on_strike(matches!(strike, Strike::Quarantined { .. }));
        }
        tracing::warn!(
            peer = %client.addr,
            shard = self.shard_id,
            rule = rule.as_str(),
            quarantined = matches!(strike, Strike::Quarantined { .. }),
            "slow consumer {}: {why}; {action}",
            client.addr
        );
        client.request_close(CloseReason::SlowConsumer);
    }

    /// Re-examines every stalled client: applies the time-based rules, and publishes this
    /// shard's stage afresh (a stage falls only here).
    fn review(&self, now: Instant) {
        self.crowd_behind.set(self.shared.crowd_behind());
        let clients: Vec<Rc<Client>> = self.stalled.borrow().values().cloned().collect();
        let mut stage = Stage::None;
        for client in &clients {
            stage = stage.max(self.check(client, now));
        }
        self.publish(stage);
    }

    fn publish_stalled(&self) {
        self.shared.publish_stalled(self.shard_id, self.stalled.borrow().len());
        self.crowd_behind.set(self.shared.crowd_behind());
    }

    fn publish(&self, stage: Stage) {
        self.stage.set(stage);
        self.shared.publish_stage(self.shard_id, stage);
    }

    /// Re-examines stalled clients every [`LAG_SWEEP_INTERVAL`] while there are any, so
    /// that time-based rules act even when no new batch arrives for them; parked
    /// otherwise. Runs until `stopping` says the drain has begun.
    pub async fn sweep_loop(&self, stopping: impl Fn() -> bool) {
        while !stopping() {
            if self.stalled.borrow().is_empty() {
                self.wake.wait().await;
                continue;
            }
            glommio::timer::sleep(LAG_SWEEP_INTERVAL).await;
            self.review(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backpressure::BEHIND_AFTER;
    use crate::batch::{Batch, Ledger};
    use crate::config::Config;
    use crate::machine::Machine;
    use crate::pacing::Entry;

    fn defaults() -> Config {
        Config::defaults_for(&Machine::detect())
    }

    fn stalls(config: Config) -> (Stalls, Arc<Shared>) {
        let shared = Arc::new(Shared::new(config));
        let tunables = Rc::new(LocalTunables::new(shared.clone()));
        (
            Stalls::new(0, shared.clone(), shared.stats[0].clone(), tunables),
            shared,
        )
    }

    /// A stalled client with `n` envelopes of `len` bytes queued.
    fn stalled_client(id: u64, n: usize, len: usize) -> Rc<Client> {
        let client = Rc::new(Client::new(
            id,
            "127.0.0.1:5".parse().unwrap(),
            std::rc::Weak::new(),
            Entry::new(),
        ));
        let line = "x".repeat(len);
        let batch = Batch::of(&vec![(1, line.as_str()); n], "127.0.0.1:6");
        client.enqueue(&Ledger::detached().pin(Arc::new(batch)));
        assert!(client.mark_stalled());
        client
    }

    #[test]
    fn a_stalled_recipient_raises_the_shards_stage_once_stalled_a_moment_until_it_catches_up() {
        let (stalls, shared) = stalls(defaults());
        let throttle = defaults().backpressure.throttle_threshold as usize;
        let client = stalled_client(7, throttle + 1, 10);
        stalls.on_stall(&client);
        // A stall of a moment holds nobody back; one that has lasted does.
        assert_eq!(shared.shard_stage(0), Stage::None);
        stalls.on_more_queued(&client, Instant::now() + BEHIND_AFTER);
        assert_eq!(shared.shard_stage(0), Stage::Throttle);
        assert!(!client.is_closing());
        stalls.on_caught_up(&client);
        assert_eq!(shared.shard_stage(0), Stage::None);
    }

    #[test]
    fn a_recipient_over_max_pending_bytes_is_closed_as_a_slow_consumer_once() {
        let (stalls, shared) = stalls(Config {
            max_pending_bytes: 1000,
            ..defaults()
        });
        let client = stalled_client(8, 20, 100);
        stalls.on_stall(&client);
        assert!(client.is_closing());
        stalls.on_more_queued(&client, Instant::now());
        let by_rule = shared.stats[0].snapshot().slow_consumer_by_rule;
        let bytes = Rule::ALL.iter().position(|r| *r == Rule::Bytes).unwrap();
        assert_eq!(by_rule.iter().sum::<u64>(), 1, "one close, one count: {by_rule:?}");
        assert_eq!(by_rule[bytes], 1);
        stalls.forget(&client);
        assert_eq!(shared.shard_stage(0), Stage::None);
    }
}
