//! What the admin endpoint shows of the cluster: the `/healthz` line, the `/stats` object
//! and the `corecast_cluster_*` series of `/metrics`, all read from [`ClusterStats`] at
//! request time.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde_json::{Map, Value};

use super::{Cluster, ClusterStats};

type Series = (&'static str, &'static str, MetricType, fn(&ClusterStats) -> u64);

fn get(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

const SERIES: [Series; 18] = [
    (
        "connected",
        "1 while the node's NATS connection is up, else 0.",
        MetricType::Gauge,
        |s| s.connected.load(Ordering::Relaxed) as u64,
    ),
    (
        "reconnects",
        "NATS connections made after the first one.",
        MetricType::Counter,
        |s| get(&s.reconnects),
    ),
    (
        "disconnects",
        "Times the NATS connection went down.",
        MetricType::Counter,
        |s| get(&s.disconnects),
    ),
    (
        "sent_batches",
        "Batches the shards handed to the uplink.",
        MetricType::Counter,
        |s| get(&s.batches_out),
    ),
    ("published_messages", "NATS messages published.", MetricType::Counter, |s| {
        get(&s.messages_out)
    }),
    (
        "published_envelopes",
        "Envelopes published to other nodes.",
        MetricType::Counter,
        |s| get(&s.envelopes_out),
    ),
    (
        "published_bytes",
        "Bytes published, headers included.",
        MetricType::Counter,
        |s| get(&s.bytes_out),
    ),
    (
        "received_messages",
        "NATS messages from other nodes delivered to this node's shards.",
        MetricType::Counter,
        |s| get(&s.messages_in),
    ),
    (
        "received_envelopes",
        "Envelopes from other nodes delivered to this node's shards.",
        MetricType::Counter,
        |s| get(&s.envelopes_in),
    ),
    (
        "received_bytes",
        "Bytes of those messages, headers included.",
        MetricType::Counter,
        |s| get(&s.bytes_in),
    ),
    (
        "unresponsive",
        "Times the NATS server stopped answering with the connection open (the uplink then reconnected).",
        MetricType::Counter,
        |s| get(&s.unresponsive),
    ),
    (
        "stalled",
        "1 while NATS takes nothing though the connection is up (what the node publishes is dropped meanwhile), else 0.",
        MetricType::Gauge,
        |s| s.stalled.load(Ordering::Relaxed) as u64,
    ),
    (
        "stalls",
        "Times NATS took nothing for 2 s with the connection up.",
        MetricType::Counter,
        |s| get(&s.stalls),
    ),
    (
        "gaps",
        "Gaps in another node's sequence numbers: messages NATS lost (at-most-once across a server failure).",
        MetricType::Counter,
        |s| get(&s.gaps),
    ),
    (
        "lost_envelopes",
        "Envelopes lost in those gaps.",
        MetricType::Counter,
        |s| get(&s.lines_lost),
    ),
    (
        "stale_messages",
        "Messages dropped because their sequence number was already passed (duplicates, late copies).",
        MetricType::Counter,
        |s| get(&s.stale),
    ),
    (
        "invalid_messages",
        "Messages on the subject that are not corecast's or are inconsistent: dropped.",
        MetricType::Counter,
        |s| get(&s.invalid),
    ),
    (
        "nodes_heard",
        "Other nodes heard from since start.",
        MetricType::Gauge,
        |s| get(&s.nodes_heard),
    ),
];

/// Reads the uplink's counters at scrape time; registered only when the cluster is on.
pub struct ClusterCollector(pub Arc<Cluster>);

impl std::fmt::Debug for ClusterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCollector")
    }
}

/// Envelopes not published, by reason: one metric, `cluster_dropped_envelopes{reason}`.
/// Reads one figure of the uplink's counters.
type Read = fn(&ClusterStats) -> u64;

const DROPPED: [(&str, Read); 5] = [
    // Not published because the NATS connection was down (local clients got them).
    ("disconnected", |s| get(&s.dropped_disconnected)),
    // Not published because the uplink thread was down after a panic (local clients got them).
    ("uplink_down", |s| get(&s.dropped_uplink_down)),
    // Larger than the NATS server's max_payload, never published.
    ("oversize", |s| get(&s.dropped_oversize)),
    // Not published while NATS took nothing (local clients got them).
    ("stalled", |s| get(&s.dropped_stalled)),
    // In messages whose publish failed.
    ("publish_error", |s| get(&s.dropped_publish_error)),
];

/// Lag gauges, kept in microseconds, exported in seconds.
const LAGS: [(&str, &str, Read); 2] = [
    (
        "cluster_lag_seconds",
        "Publish-to-receive age of the last message from another node, in seconds (wall clocks).",
        |s| get(&s.lag_us),
    ),
    (
        "cluster_lag_max_seconds",
        "Largest publish-to-receive age seen, in seconds.",
        |s| get(&s.lag_max_us),
    ),
];

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let stats = &self.0.stats;
        for (name, help, kind, value) in SERIES {
            let name = format!("cluster_{name}");
            let family = encoder.encode_descriptor(&name, help, None, kind)?;
            match kind {
                MetricType::Counter => ConstCounter::new(value(stats)).encode(family)?,
                _ => ConstGauge::new(value(stats)).encode(family)?,
            }
        }
        let mut family = encoder.encode_descriptor(
            "cluster_dropped_envelopes",
            "Envelopes not published to other nodes, by reason (disconnected, uplink_down, oversize, stalled, publish_error); local clients got them.",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in DROPPED {
            ConstCounter::new(value(stats)).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        for (name, help, value) in LAGS {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value(stats) as f64 / 1e6).encode(family)?;
        }
        Ok(())
    }
}

impl Cluster {
    /// The `/healthz` line. A node whose uplink is down still serves its own clients, so
    /// this does not make the node unhealthy: the status stays 200 and the line says so.
    pub fn health_line(&self) -> String {
        let mut line = String::new();
        if self.uplink_thread.is_down() {
            let _ = writeln!(
                line,
                "cluster: down (the uplink thread died: {}; restarting it); relaying locally only",
                self.uplink_thread.cause()
            );
        } else if self.is_connected() && self.stats.stalled.load(Ordering::Relaxed) {
            let _ = writeln!(
                line,
                "cluster: connected, but NATS takes nothing; relaying locally only"
            );
        } else if self.is_connected() {
            let _ = writeln!(
                line,
                "cluster: connected ({} other {} heard)",
                get(&self.stats.nodes_heard),
                if get(&self.stats.nodes_heard) == 1 {
                    "node"
                } else {
                    "nodes"
                }
            );
        } else {
            let since = get(&self.stats.disconnected_at_ms);
            let down = if since == 0 {
                "never connected".to_string()
            } else {
                format!("down for {} ms", self.clock_ms().saturating_sub(since))
            };
            let _ = writeln!(line, "cluster: disconnected ({down}); relaying locally only");
        }
        line
    }

    /// The `/stats` object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("node_id".into(), format!("{:016x}", self.node_id).into());
        m.insert("subject".into(), self.config.subject.clone().into());
        m.insert("nats".into(), self.config.nats.clone().into());
        for (name, _, _, value) in SERIES {
            m.insert(name.into(), value(&self.stats).into());
        }
        for (reason, value) in DROPPED {
            m.insert(format!("dropped_{reason}"), value(&self.stats).into());
        }
        m.insert("lag_us".into(), get(&self.stats.lag_us).into());
        m.insert("lag_max_us".into(), get(&self.stats.lag_max_us).into());
        m.insert("connected".into(), self.is_connected().into());
        Value::Object(m)
    }
}
