//! HTTP against the relay's admin endpoint, for the tests of every area that look at it:
//! a strict reader of one response, `GET` with the checks every answer must pass, and a
//! parser of the `/metrics` exposition strict enough to catch a malformed one.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Relay, PATIENCE};

/// Starts a relay with an admin endpoint on a free loopback port; returns it and that port.
pub fn relay_with_admin(config: &str, args: &[&str]) -> (Relay, SocketAddr) {
    let mut full = vec!["--admin", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let relay = Relay::with_config(config, &full);
    let admin = relay.admin_addr();
    (relay, admin)
}

/// The connection bound the relay logged with its admin address.
pub fn admin_connection_bound(relay: &Relay) -> usize {
    let line = relay.log.wait_for("admin listening on ");
    line.split("at most ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the connection bound from {line:?}"))
}

/// One HTTP response: status, lower-cased headers, body.
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// Sends `request` as it is and reads the response until the server closes.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin endpoint");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the admin response");
    let text = String::from_utf8(raw).expect("the response is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    let r = http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: ops-test\r\n\r\n").as_bytes(),
    );
    assert_eq!(r.headers.get("connection").map(String::as_str), Some("close"));
    assert_eq!(
        r.headers.get("content-length").and_then(|l| l.parse::<usize>().ok()),
        Some(r.body.len()),
        "Content-Length must match the body"
    );
    r
}

/// One sample of the exposition: name, labels, value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text exposition strictly enough to catch a malformed one: every sample
/// belongs to a family declared by `# HELP` and `# TYPE`, and the text ends with `# EOF`.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = Vec::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition must end with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            assert!(["counter", "gauge", "histogram", "info"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                let labels = body
                    .split(',')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, BTreeMap::new()),
        };
        assert!(
            name.starts_with("corecast_") || name.starts_with("process_"),
            "{name} lacks the corecast_ prefix"
        );
        // The family a sample belongs to: counters end in _total, histograms in _bucket,
        // _sum and _count, infos in _info.
        let suffixed = |suffix: &str, kind: &str| {
            name.strip_suffix(suffix)
                .filter(|f| types.get(*f).map(String::as_str) == Some(kind))
        };
        let family = suffixed("_total", "counter")
            .or_else(|| suffixed("_bucket", "histogram"))
            .or_else(|| suffixed("_sum", "histogram"))
            .or_else(|| suffixed("_count", "histogram"))
            .or_else(|| suffixed("_info", "info"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no # TYPE line");
        assert!(helped.iter().any(|h| h == family), "{name} has no # HELP line");
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// The samples of a series whose labels include `with` (e.g. a reason).
pub fn matching<'a>(
    samples: &'a [Sample],
    name: &'a str,
    with: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| {
        s.name == name
            && with
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

/// Sums a series over every label combination that includes `with` (e.g. a reason).
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> u64 {
    matching(samples, name, with).map(|s| s.value as u64).sum()
}

pub fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let r = get(admin, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.headers["content-type"].starts_with("application/openmetrics-text"),
        "{:?}",
        r.headers
    );
    parse_metrics(&r.body)
}

/// The three drop metrics, one per unit (lines, envelopes, connections).
pub const DROP_METRICS: [&str; 3] = [
    "corecast_dropped_lines_total",
    "corecast_dropped_envelopes_total",
    "corecast_refused_connections_total",
];

/// The drop metric that counts `reason`.
pub fn dropped_metric(reason: &str) -> String {
    let metric = match reason {
        "rate_limited" | "line_too_long" | "invalid_utf8" => "dropped_lines",
        "slow_consumer" | "recipient_gone" | "peer_gone" => "dropped_envelopes",
        "quarantined" | "server_full" => "refused_connections",
        other => panic!("unknown drop reason {other}"),
    };
    format!("corecast_{metric}_total")
}

/// Envelopes that reached a recipient or were dropped as undeliverable.
pub fn envelopes_accounted(m: &[Sample]) -> u64 {
    sum(m, "corecast_sent_envelopes_total", &[])
        + sum(m, "corecast_dropped_envelopes_total", &[("reason", "slow_consumer")])
        + sum(m, "corecast_dropped_envelopes_total", &[("reason", "recipient_gone")])
}

/// Scrapes until `done` holds for the samples, within [`PATIENCE`].
pub fn scrape_until(admin: SocketAddr, what: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = scrape(admin);
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "metrics never showed {what}: {m:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `path`'s body parsed as JSON (for `/stats`), after a 200.
pub fn get_json(addr: SocketAddr, path: &str) -> Value {
    let r = get(addr, path);
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("bad JSON from {path} ({e}): {}", r.body))
}
