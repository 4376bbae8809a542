//! What the admin endpoint says, apart from HTTP: the `/healthz` verdict, the `/stats`
//! JSON and the `prometheus-client` collector behind `/metrics`. Everything here reads the
//! shards' relaxed atomics (see [`crate::metrics`]) and the quarantine's current snapshot at
//! request time; nothing waits for a shard or writes what a shard reads.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};

use crate::backpressure::{Rule, Stage};
use crate::metrics::{CloseReason, DropReason, ShardState, StatsSnapshot, CONFIG_RELOADS};
use crate::shared::Shared;
use crate::supervisor::ThreadWatch;

/// A running shard whose heartbeat (every `executor::HEARTBEAT_INTERVAL`) is older than this
/// is reported unhealthy: its thread has not run a timer task for that long.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(3);

/// `/metrics`: the registry in the OpenMetrics text format.
pub fn metrics_text(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 << 10);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Only a failing `fmt::Write` can fail, and a String never does.
        tracing::error!("admin endpoint: encoding metrics failed: {e}");
    }
    out
}

/// One shard's health as `/healthz` and `/stats` report it.
pub struct ShardHealth {
    pub state: ShardState,
    /// Milliseconds since the shard's last heartbeat.
    pub heartbeat_age_ms: u64,
}

impl ShardHealth {
    pub fn of(shared: &Shared, id: usize) -> Self {
        let stats = &shared.stats[id];
        ShardHealth {
            state: stats.state(),
            heartbeat_age_ms: shared.clock_ms().saturating_sub(stats.last_heartbeat_ms()),
        }
    }

    /// Alive: running (accepting, not draining or stopped) with a fresh heartbeat.
    pub fn is_healthy(&self) -> bool {
        self.state == ShardState::Running && self.heartbeat_age_ms <= HEARTBEAT_STALE.as_millis() as u64
    }

    /// What is wrong, for the `/healthz` body.
    fn problem(&self) -> Option<String> {
        match self.state {
            ShardState::Running if self.is_healthy() => None,
            ShardState::Running => Some(format!("no heartbeat for {} ms", self.heartbeat_age_ms)),
            state => Some(state.as_str().to_string()),
        }
    }
}

/// `/healthz`: 200 and `ok: N shards running` (`1 shard`), or 503 and one line per unhealthy shard.
pub fn healthz(shared: &Shared) -> (u16, String) {
    let mut problems = String::new();
    for id in 0..shared.stats.len() {
        if let Some(p) = ShardHealth::of(shared, id).problem() {
            let _ = writeln!(problems, "shard {id}: {p}");
        }
    }
    let cluster = shared.cluster.as_ref().map(|c| c.health_line()).unwrap_or_default();
    if problems.is_empty() {
        let shards = crate::counted(shared.stats.len(), "shard", "shards");
        (200, format!("ok: {shards} running\n{cluster}"))
    } else {
        (503, format!("unhealthy\n{problems}{cluster}"))
    }
}

/// Every figure of `s` under the names `/metrics` uses (without prefix and `_total`).
fn snapshot_json(s: &StatsSnapshot) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("connections".into(), s.open.into());
    for (name, v) in s.scalars() {
        if name != "open" {
            m.insert(name.into(), v.into());
        }
    }
    let by_reason = |pairs: &mut dyn Iterator<Item = (&'static str, u64)>| {
        Value::Object(pairs.map(|(k, v)| (k.to_string(), Value::from(v))).collect())
    };
    m.insert(
        "closed".into(),
        by_reason(&mut CloseReason::ALL.iter().map(|r| (r.as_str(), s.closed(*r)))),
    );
    m.insert(
        "dropped".into(),
        by_reason(&mut DropReason::ALL.iter().map(|r| (r.as_str(), s.dropped(*r)))),
    );
    m.insert(
        "slow_consumer_closed".into(),
        by_reason(
            &mut Rule::ALL
                .iter()
                .zip(s.slow_consumer_by_rule)
                .map(|(r, n)| (r.as_str(), n)),
        ),
    );
    m
}

/// `/stats`: per-shard figures, their totals, health and the quarantine size.
pub fn stats_json(shared: &Shared) -> Value {
    let mut total = StatsSnapshot::default();
    let mut shards = Vec::with_capacity(shared.stats.len());
    let mut healthy = true;
    for (id, stats) in shared.stats.iter().enumerate() {
        let snap = stats.snapshot();
        total.merge(&snap);
        let health = ShardHealth::of(shared, id);
        healthy &= health.is_healthy();
        let mut m = snapshot_json(&snap);
        m.insert("shard".into(), id.into());
        m.insert("state".into(), health.state.as_str().into());
        m.insert("healthy".into(), health.is_healthy().into());
        m.insert("heartbeat_age_ms".into(), health.heartbeat_age_ms.into());
        m.insert("pending_bytes".into(), shared.shard_pending_bytes(id).into());
        m.insert("backpressure_stage".into(), (shared.shard_stage(id) as u8).into());
        shards.push(Value::Object(m));
    }
    json!({
        "name": shared.config.name,
        "healthy": healthy,
        "uptime_ms": shared.clock_ms(),
        "quarantine_entries": shared.quarantine.len(),
        "total": snapshot_json(&total),
        "shards": shards,
        "cluster": shared.cluster.as_ref().map(|c| c.to_json()),
        "threads": threads_json(shared),
    })
}

/// The supervised threads that are not shards, by name (see `supervisor`).
fn threads(shared: &Shared) -> Vec<(&'static str, &ThreadWatch)> {
    let mut threads = vec![("admin", &shared.admin_thread)];
    if let Some(cluster) = &shared.cluster {
        threads.push(("cluster", &cluster.uplink_thread));
    }
    threads
}

/// `/stats`' `threads`: each supervised thread's restarts and whether it runs.
fn threads_json(shared: &Shared) -> Value {
    let threads = threads(shared).into_iter().map(|(name, watch)| {
        (
            name.to_string(),
            json!({"restarts": watch.restarts(), "up": !watch.is_down()}),
        )
    });
    Value::Object(threads.collect())
}

/// Reads every shard's counters at scrape time for the `prometheus-client` encoder.
pub struct ShardCollector(pub Arc<Shared>);

impl std::fmt::Debug for ShardCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShardCollector")
    }
}

/// One per-shard series family: name (without the `corecast_` prefix and, for counters,
/// the `_total` the encoder appends), help, type, and the value.
type Series = (&'static str, &'static str, MetricType, fn(&StatsSnapshot) -> u64);

const SERIES: [Series; 13] = [
    (
        "connections",
        "Connections currently open on the shard.",
        MetricType::Gauge,
        |s| s.open,
    ),
    (
        "connections_accepted",
        "Connections accepted, including ones closed at once by admission.",
        MetricType::Counter,
        |s| s.accepted,
    ),
    (
        "received_lines",
        "Complete lines received and accepted for relaying.",
        MetricType::Counter,
        |s| s.lines_in,
    ),
    (
        "sent_envelopes",
        "Envelopes written to recipients' sockets.",
        MetricType::Counter,
        |s| s.envelopes_out,
    ),
    (
        "received_bytes",
        "Bytes read from client sockets.",
        MetricType::Counter,
        |s| s.bytes_in,
    ),
    (
        "sent_bytes",
        "Bytes written to client sockets by their writers: envelopes and rate-limit notices (closing notices are not counted).",
        MetricType::Counter,
        |s| s.bytes_out,
    ),
    (
        "socket_writes",
        "Socket writes that sent at least one byte.",
        MetricType::Counter,
        |s| s.socket_writes,
    ),
    (
        "max_stalled_depth",
        "Largest outbox depth: most messages seen queued for a stalled recipient since start.",
        MetricType::Gauge,
        |s| s.max_stalled_depth,
    ),
    (
        "sender_pauses",
        "Times a sender's reads were paused by throttle, flow control or the process-wide bound on queued memory.",
        MetricType::Counter,
        |s| s.sender_pauses,
    ),
    (
        "kicks",
        "Times the main thread woke the shard's thread because its heartbeat was stale (glommio parked it with work queued).",
        MetricType::Counter,
        |s| s.kicks,
    ),
    (
        "reads_at_runs",
        "Socket reads done at the flush task's runs instead of on a readiness wake-up of their own.",
        MetricType::Counter,
        |s| s.reads_at_runs,
    ),
    (
        "quarantine_strikes",
        "Slow-consumer closes counted as a strike against their key (peer IP or ip:port).",
        MetricType::Counter,
        |s| s.quarantine_strikes,
    ),
    (
        "quarantines",
        "Keys quarantined: strikes that reached quarantine_strikes within ten minutes.",
        MetricType::Counter,
        |s| s.quarantines,
    ),
];

/// The metric each drop reason is counted in: one metric per unit.
pub fn drop_metric(reason: DropReason) -> &'static str {
    match reason {
        DropReason::RateLimited | DropReason::LineTooLong | DropReason::InvalidUtf8 => "dropped_lines",
        DropReason::SlowConsumer | DropReason::RecipientGone | DropReason::PeerGone => "dropped_envelopes",
        DropReason::Quarantined | DropReason::ServerFull => "refused_connections",
    }
}

/// The three drop metrics: name and help.
const DROP_METRICS: [(&str, &str); 3] = [
    (
        "dropped_lines",
        "Lines received and not relayed, by reason (rate_limited, line_too_long, invalid_utf8).",
    ),
    (
        "dropped_envelopes",
        "Envelopes queued for a recipient and never written, by reason (slow_consumer, recipient_gone, peer_gone).",
    ),
    (
        "refused_connections",
        "Connections refused at admission, by reason (quarantined, server_full).",
    ),
];

/// The `stage` label of `corecast_backpressure_stage`.
pub fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::None => "none",
        Stage::Throttle => "throttle",
        Stage::FlowControl => "flow_control",
    }
}

const STAGES: [Stage; 3] = [Stage::None, Stage::Throttle, Stage::FlowControl];

/// `corecast_build_info`'s `commit`: the build's git commit when the build recorded one.
pub const COMMIT: &str = match option_env!("CORECAST_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

fn encode_value(kind: MetricType, v: u64, encoder: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(encoder),
        _ => ConstGauge::new(v).encode(encoder),
    }
}

impl Collector for ShardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let shared = &self.0;
        // One read of every shard per scrape, so the families agree with each other.
        let snaps: Vec<StatsSnapshot> = shared.stats.iter().map(|s| s.snapshot()).collect();
        for (name, help, kind, value) in SERIES {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (id, snap) in snaps.iter().enumerate() {
                let labels = [("shard", id)];
                encode_value(kind, value(snap), family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "sender_pause_seconds",
            "Total time of those pauses, in seconds.",
            None,
            MetricType::Counter,
        )?;
        for (id, snap) in snaps.iter().enumerate() {
            let seconds = snap.sender_pause_ms as f64 / 1000.0;
            ConstCounter::new(seconds).encode(family.encode_family(&[("shard", id)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "connections_closed",
            "Connections closed, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (id, snap) in snaps.iter().enumerate() {
            for reason in CloseReason::ALL {
                let labels = ([("shard", id)], [("reason", reason.as_str())]);
                ConstCounter::new(snap.closed(reason)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "slow_consumer_closed",
            "Slow-consumer closes, by the rule that closed them (deadline, bytes, messages).",
            None,
            MetricType::Counter,
        )?;
        for (id, snap) in snaps.iter().enumerate() {
            for (rule, n) in Rule::ALL.iter().zip(snap.slow_consumer_by_rule) {
                let labels = ([("shard", id)], [("rule", rule.as_str())]);
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        for (metric, help) in DROP_METRICS {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (id, snap) in snaps.iter().enumerate() {
                for reason in DropReason::ALL.into_iter().filter(|r| drop_metric(*r) == metric) {
                    let labels = ([("shard", id)], [("reason", reason.as_str())]);
                    ConstCounter::new(snap.dropped(reason)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "pending_bytes",
            "Bytes queued for stalled recipients on the shard now (against max_total_pending_bytes).",
            None,
            MetricType::Gauge,
        )?;
        for id in 0..snaps.len() {
            ConstGauge::new(shared.shard_pending_bytes(id)).encode(family.encode_family(&[("shard", id)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "backpressure_stage",
            "1 for the stage the shard's stalled recipients hold senders back at now (none, throttle, flow_control), 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for id in 0..snaps.len() {
            let now = shared.shard_stage(id);
            for stage in STAGES {
                let labels = ([("shard", id)], [("stage", stage_name(stage))]);
                ConstGauge::new(u64::from(stage == now)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "shard_up",
            "1 while the shard is running with a fresh heartbeat (what /healthz checks), else 0.",
            None,
            MetricType::Gauge,
        )?;
        for id in 0..snaps.len() {
            let up = u64::from(ShardHealth::of(shared, id).is_healthy());
            ConstGauge::new(up).encode(family.encode_family(&[("shard", id)])?)?;
        }
        let threads = threads(shared);
        let mut family = encoder.encode_descriptor(
            "thread_restarts",
            "Times a supervised thread (admin, cluster) died of a panic and was restarted.",
            None,
            MetricType::Counter,
        )?;
        for (name, watch) in &threads {
            ConstCounter::new(watch.restarts()).encode(family.encode_family(&[("thread", *name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "thread_up",
            "1 while a supervised thread (admin, cluster) runs, 0 from its death to its restart.",
            None,
            MetricType::Gauge,
        )?;
        for (name, watch) in &threads {
            let up = u64::from(!watch.is_down());
            ConstGauge::new(up).encode(family.encode_family(&[("thread", *name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "relay_delay_seconds",
            "The relay's own delay per batch: from its first line's read to the first socket write on the shard after it was queued.",
            None,
            MetricType::Histogram,
        )?;
        for (id, stats) in shared.stats.iter().enumerate() {
            let (sum, count, buckets) = stats.relay_delay.snapshot();
            family
                .encode_family(&[("shard", id)])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let family = encoder.encode_descriptor(
            "pending_bytes_limit",
            "max_total_pending_bytes: the process-wide bound on corecast_pending_bytes summed over shards, past which every shard stops reading.",
            None,
            MetricType::Gauge,
        )?;
        // The running value: the key applies live, so a reload changes the bound.
        ConstGauge::new(shared.live().max_total_pending_bytes as u64).encode(family)?;
        let family = encoder.encode_descriptor(
            "quarantine_entries",
            "Entries in the quarantine table (shared by all shards).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(shared.quarantine.len() as u64).encode(family)?;
        let mut family = encoder.encode_descriptor(
            "config_reloads",
            "SIGHUP config reloads, by result (success, failure: the file was refused and the running config kept).",
            None,
            MetricType::Counter,
        )?;
        for (result, counter) in [
            ("success", &CONFIG_RELOADS.success),
            ("failure", &CONFIG_RELOADS.failure),
        ] {
            let n = counter.load(std::sync::atomic::Ordering::Relaxed);
            ConstCounter::new(n).encode(family.encode_family(&[("result", result)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "build",
            "The running build: version and git commit.",
            None,
            MetricType::Info,
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)];
        family.encode_info(&labels)?;
        Ok(())
    }
}
