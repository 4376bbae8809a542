//! The admin endpoint (SPEC §6): a small HTTP/1.1 server on its own std thread, off the
//! shard threads, serving
//! - `GET /metrics`: every per-shard counter in the Prometheus/OpenMetrics text format
//!   (encoded by `prometheus-client`), names prefixed `corecast_`, a `shard` label;
//! - `GET /healthz`: 200 when every shard is running and its heartbeat is fresh, else 503;
//! - `GET /stats`: the same figures as JSON, per shard and in total.
//!
//! [`crate::run`] binds it with [`bind`] before any shard starts (so a bad address fails
//! start-up) and starts it with [`spawn`] once every shard is accepting. It reads the
//! shards' [`ShardStats`] (relaxed atomics, see [`crate::metrics`]) and never writes
//! anything a shard reads. Requests are served one at a time: each has [`REQUEST_DEADLINE`]
//! to arrive and at most [`MAX_REQUEST_BYTES`] of head, so a slow or hostile client holds
//! the thread for a bounded time and memory. It has no authentication: bind it to loopback.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};

use crate::backpressure::Rule;
use crate::metrics::{CloseReason, DropReason, ShardState, StatsSnapshot};
use crate::shard::Shared;

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Time a client has to send its whole request head; past it the request gets 408.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Time allowed for writing a response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// After the response, unread request bytes are drained for at most this long (and this
/// much), so closing does not reset the connection and destroy the response in flight.
const LINGER: Duration = Duration::from_millis(200);
const LINGER_BYTES: usize = 64 << 10;
/// A running shard whose heartbeat (every `shard::HEARTBEAT_INTERVAL`) is older than this
/// is reported unhealthy: its thread has not run a timer task for that long.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(3);
/// Content type of `/metrics` (the encoder writes OpenMetrics text, which Prometheus reads).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the admin listener; called before any shard starts.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves `listener` on a new thread until the process exits.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>) -> io::Result<()> {
    let mut registry = Registry::with_prefix("corecast");
    registry.register_collector(Box::new(ShardCollector(shared.clone())));
    std::thread::Builder::new()
        .name("corecast-admin".into())
        .spawn(move || serve(listener, &shared, &registry))?;
    Ok(())
}

fn serve(listener: TcpListener, shared: &Shared, registry: &Registry) {
    let mut last_error_log: Option<Instant> = None;
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => handle(stream, shared, registry),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, log at most once a second.
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!("admin endpoint: accept failed: {e}");
                    last_error_log = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// An HTTP response, always sent with `Connection: close`.
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: String) -> Self {
        Response {
            status,
            content_type,
            body,
            allow: false,
        }
    }

    fn text(status: u16, body: impl Into<String>) -> Self {
        Response::new(status, "text/plain; charset=utf-8", body.into())
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The client closed before sending a whole head: nothing to answer.
    Closed,
    TooLarge,
    TimedOut,
}

fn handle(mut stream: TcpStream, shared: &Shared, registry: &Registry) {
    let head = read_head(&mut stream);
    let (response, head_only) = match head {
        Ok(head) => route(&head, shared, registry),
        Err(HeadError::Closed) => return,
        Err(HeadError::TooLarge) => (
            Response::text(431, format!("request head over {MAX_REQUEST_BYTES} bytes\n")),
            false,
        ),
        Err(HeadError::TimedOut) => (Response::text(408, "request not received in time\n"), false),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len()
    );
    if response.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&response.body);
    }
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    if stream.write_all(out.as_bytes()).is_err() {
        return;
    }
    // Half-close, then drain what the client may still send (a body, the rest of an
    // oversize head) so that the close is a FIN, not a reset that would destroy the response.
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// Reads up to the blank line that ends the request head, within [`REQUEST_DEADLINE`] and
/// [`MAX_REQUEST_BYTES`]. Returns the head without its final blank line.
fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(|_| HeadError::Closed)?;
        match stream.read(&mut buf) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(HeadError::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

/// Where the head ends: the first empty line (`\r\n\r\n`, or a bare `\n\n` from lenient clients).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n");
    let lf = memchr::memmem::find(buf, b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Picks the response for a complete request head; the flag says "HEAD: no body".
fn route(head: &[u8], shared: &Shared, registry: &Registry) -> (Response, bool) {
    let Some((method, path)) = parse_request_line(head) else {
        return (Response::text(400, "malformed request line\n"), false);
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let mut r = Response::text(405, "only GET and HEAD are served\n");
        r.allow = true;
        return (r, false);
    }
    let path = path.split('?').next().unwrap_or(path);
    let response = match path {
        "/metrics" => Response::new(200, METRICS_CONTENT_TYPE, metrics_text(registry)),
        "/healthz" => healthz(shared),
        "/stats" => {
            let mut body = stats_json(shared).to_string();
            body.push('\n');
            Response::new(200, "application/json", body)
        }
        _ => Response::text(404, "not found; try /metrics, /healthz or /stats\n"),
    };
    (response, head_only)
}

/// `METHOD SP target SP HTTP/1.x` from the first line of `head`.
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = memchr::memchr(b'\n', head).unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic());
    if parts.next().is_some() || !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return None;
    }
    Some((method, target))
}

fn metrics_text(registry: &Registry) -> String {
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

fn healthz(shared: &Shared) -> Response {
    let mut problems = String::new();
    for id in 0..shared.stats.len() {
        if let Some(p) = ShardHealth::of(shared, id).problem() {
            let _ = writeln!(problems, "shard {id}: {p}");
        }
    }
    if problems.is_empty() {
        Response::text(200, format!("ok: {} shards running\n", shared.stats.len()))
    } else {
        Response::text(503, format!("unhealthy\n{problems}"))
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
    })
}

/// Reads every shard's counters at scrape time for the `prometheus-client` encoder.
struct ShardCollector(Arc<Shared>);

impl std::fmt::Debug for ShardCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShardCollector")
    }
}

/// One per-shard series family: name (without prefix), help, type, and the value.
type Series = (&'static str, &'static str, MetricType, fn(&StatsSnapshot) -> u64);

const SERIES: [Series; 13] = [
    (
        "connections",
        "Connections currently open on the shard.",
        MetricType::Gauge,
        |s| s.open,
    ),
    (
        "accepted",
        "Connections accepted, including ones closed at once by admission.",
        MetricType::Counter,
        |s| s.accepted,
    ),
    (
        "lines_in",
        "Complete lines received and accepted for relaying.",
        MetricType::Counter,
        |s| s.lines_in,
    ),
    (
        "envelopes_out",
        "Envelopes written to recipients' sockets.",
        MetricType::Counter,
        |s| s.envelopes_out,
    ),
    (
        "bytes_in",
        "Bytes read from client sockets.",
        MetricType::Counter,
        |s| s.bytes_in,
    ),
    (
        "bytes_out",
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
        "sender_pause_ms",
        "Total time of those pauses, in milliseconds.",
        MetricType::Counter,
        |s| s.sender_pause_ms,
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
        let mut family =
            encoder.encode_descriptor("closed", "Connections closed, by reason.", None, MetricType::Counter)?;
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
        let mut family = encoder.encode_descriptor(
            "dropped",
            "Things not delivered, by reason: lines (rate_limited, line_too_long, invalid_utf8), \
             envelopes (slow_consumer, recipient_gone) or connections (quarantined, server_full).",
            None,
            MetricType::Counter,
        )?;
        for (id, snap) in snaps.iter().enumerate() {
            for reason in DropReason::ALL {
                let labels = ([("shard", id)], [("reason", reason.as_str())]);
                ConstCounter::new(snap.dropped(reason)).encode(family.encode_family(&labels)?)?;
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
            "How much the shard's stalled recipients hold senders back now: 0 none, 1 throttle, 2 flow control.",
            None,
            MetricType::Gauge,
        )?;
        for id in 0..snaps.len() {
            ConstGauge::new(shared.shard_stage(id) as u8 as u64).encode(family.encode_family(&[("shard", id)])?)?;
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
        let family = encoder.encode_descriptor(
            "quarantine_entries",
            "Entries in the quarantine table (shared by all shards).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(shared.quarantine.len() as u64).encode(family)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_strictly() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line(b"HEAD /stats?x=1 HTTP/1.0"),
            Some(("HEAD", "/stats?x=1"))
        );
        for bad in [
            &b"GET /metrics"[..],
            b"GET metrics HTTP/1.1",
            b"GET /metrics HTTP/2",
            b"GET  /metrics HTTP/1.1",
            b"G\xffT /metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1 extra",
            b"",
        ] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
