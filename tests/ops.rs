//! Operations (issue 6, SPEC §3 `logger.*`, §6): the admin endpoint's `/metrics`,
//! `/healthz` and `/stats` over real HTTP, file and JSON logs, `log_keys`, systemd
//! readiness through a fake `NOTIFY_SOCKET`, and the shipped systemd unit.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{corecast, temp_config, Client, Relay, PATIENCE};

/// Starts a relay with an admin endpoint on a free loopback port; returns it and that port.
fn relay_with_admin(config: &str, args: &[&str]) -> (Relay, SocketAddr) {
    let mut full = vec!["--admin", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let relay = Relay::with_config(config, &full);
    let admin = admin_addr(&relay);
    (relay, admin)
}

fn admin_addr(relay: &Relay) -> SocketAddr {
    let line = relay.log.wait_for("admin listening on ");
    line.split("admin listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the admin address from {line:?}"))
}

/// One HTTP response: status, lower-cased headers, body.
struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// Sends `request` as it is and reads the response until the server closes.
fn http_raw(addr: SocketAddr, request: &[u8]) -> Response {
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

fn get(addr: SocketAddr, path: &str) -> Response {
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
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition strictly enough to catch a malformed one: every sample
/// belongs to a family declared by `# HELP` and `# TYPE`, and the text ends with `# EOF`.
fn parse_metrics(text: &str) -> Vec<Sample> {
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
            assert!(["counter", "gauge"].contains(&kind), "{line}");
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
        assert!(name.starts_with("corecast_"), "{name} lacks the corecast_ prefix");
        let family = match name.strip_suffix("_total") {
            Some(f) if types.get(f).map(String::as_str) == Some("counter") => f,
            _ => name,
        };
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

/// Sums a series over every label combination that includes `with` (e.g. a reason).
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> u64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value as u64)
        .sum()
}

fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let r = get(admin, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.headers["content-type"].starts_with("application/openmetrics-text"),
        "{:?}",
        r.headers
    );
    parse_metrics(&r.body)
}

/// Envelopes that reached a recipient or were dropped as undeliverable.
fn envelopes_accounted(m: &[Sample]) -> u64 {
    sum(m, "corecast_envelopes_out_total", &[])
        + sum(m, "corecast_dropped_total", &[("reason", "slow_consumer")])
        + sum(m, "corecast_dropped_total", &[("reason", "recipient_gone")])
}

/// Scrapes until `done` holds for the samples, within [`PATIENCE`].
fn scrape_until(admin: SocketAddr, what: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
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

/// Reads `n` lines; returns how many bytes they were.
fn read_lines(c: &mut Client, n: usize) -> u64 {
    (0..n).map(|_| c.line().len() as u64).sum()
}

#[test]
fn metrics_add_up_after_a_known_workload() {
    const K: usize = 40;
    let (relay, admin) = relay_with_admin(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#,
        &["--shards", "2"],
    );
    let mut clients = relay.connect_many(3);
    let mut sent_bytes = 0u64;
    for (i, c) in clients.iter_mut().enumerate() {
        let batch: String = (0..K).map(|j| format!("client {i} line {j}\n")).collect();
        sent_bytes += batch.len() as u64;
        c.send(batch.as_bytes());
    }
    // Fan-out is 2: each client gets every line of the two others.
    let received_bytes: u64 = clients.iter_mut().map(|c| read_lines(c, 2 * K)).sum();

    let lines = 3 * K as u64;
    let m = scrape_until(admin, "every envelope accounted for", |m| {
        envelopes_accounted(m) >= 2 * lines
    });
    assert_eq!(sum(&m, "corecast_lines_in_total", &[]), lines);
    assert_eq!(sum(&m, "corecast_lines_in_total", &[]) * 2, envelopes_accounted(&m));
    assert_eq!(
        sum(&m, "corecast_envelopes_out_total", &[]),
        2 * lines,
        "nothing was dropped"
    );
    assert_eq!(sum(&m, "corecast_dropped_total", &[]), 0);
    assert_eq!(sum(&m, "corecast_bytes_in_total", &[]), sent_bytes);
    assert_eq!(sum(&m, "corecast_bytes_out_total", &[]), received_bytes);
    let writes = sum(&m, "corecast_socket_writes_total", &[]);
    assert!((1..=2 * lines).contains(&writes), "{writes} socket writes");
    assert_eq!(sum(&m, "corecast_accepted_total", &[]), 3);
    assert_eq!(sum(&m, "corecast_connections", &[]), 3);
    assert_eq!(sum(&m, "corecast_closed_total", &[]), 0);
    assert_eq!(sum(&m, "corecast_quarantine_entries", &[]), 0);
    for shard in ["0", "1"] {
        assert_eq!(sum(&m, "corecast_shard_up", &[("shard", shard)]), 1);
        assert!(m
            .iter()
            .any(|s| s.name == "corecast_lines_in_total" && s.labels["shard"] == shard));
    }
    // Every close and drop reason is exported for every shard, even at zero.
    assert_eq!(
        m.iter().filter(|s| s.name == "corecast_closed_total").count(),
        2 * corecast::metrics::CloseReason::ALL.len()
    );
    assert_eq!(m.iter().filter(|s| s.name == "corecast_dropped_total").count(), 2 * 7);

    // /stats carries the same figures, per shard and in total.
    let r = get(admin, "/stats");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let stats: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(stats["healthy"], true);
    let shards = stats["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    for s in shards {
        let id = s["shard"].as_u64().unwrap().to_string();
        let on = |name: &str| sum(&m, name, &[("shard", &id)]);
        assert_eq!(s["state"], "running");
        assert_eq!(s["connections"], on("corecast_connections"));
        for key in [
            "accepted",
            "lines_in",
            "envelopes_out",
            "bytes_in",
            "bytes_out",
            "socket_writes",
            "reads_at_runs",
        ] {
            assert_eq!(s[key], on(&format!("corecast_{key}_total")), "shard {id} {key}");
        }
        for (reason, n) in s["closed"].as_object().unwrap() {
            assert_eq!(
                *n,
                sum(&m, "corecast_closed_total", &[("shard", &id), ("reason", reason)])
            );
        }
        for (reason, n) in s["dropped"].as_object().unwrap() {
            assert_eq!(
                *n,
                sum(&m, "corecast_dropped_total", &[("shard", &id), ("reason", reason)])
            );
        }
    }
    assert_eq!(stats["total"]["lines_in"], lines);
    assert_eq!(stats["total"]["envelopes_out"], 2 * lines);
    assert_eq!(stats["total"]["bytes_out"], received_bytes);
    assert_eq!(stats["total"]["connections"], 3);

    // A client leaving is a peer_closed close and one connection fewer.
    drop(clients.pop());
    scrape_until(admin, "one peer_closed close", |m| {
        sum(m, "corecast_closed_total", &[("reason", "peer_closed")]) == 1 && sum(m, "corecast_connections", &[]) == 2
    });
}

#[test]
fn drops_and_quarantine_show_on_metrics() {
    let (relay, admin) = relay_with_admin(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"write_deadline_ms":1000,"quarantine_strikes":1,
            "backpressure_policy":{"enable_throttle":false,"enable_flow_control":false,"disconnect_threshold":50}}}"#,
        &["--shards", "2"],
    );
    // The sender's only recipient never reads.
    let mut stuck = relay.connect_from("127.0.0.7:0".parse().unwrap(), Some(4096));
    let mut sender = relay.connect();
    // Far more than the kernel's socket buffers hold, so the stuck client really stalls.
    const N: usize = 20_000;
    let line = format!("{}\n", "q".repeat(500));
    sender.send(line.repeat(N).as_bytes());
    relay
        .log
        .wait_for(&format!("client disconnected: {} (slow_consumer)", stuck.local_addr));
    // What the stuck client did get before the close: complete envelopes only.
    let rest = stuck.read_to_eof();
    let got_by_stuck = rest.iter().filter(|b| **b == b'\n').count() as u64;

    let m = scrape_until(admin, "every line relayed and the slow consumer closed", |m| {
        sum(m, "corecast_lines_in_total", &[]) == N as u64
            && sum(m, "corecast_closed_total", &[("reason", "slow_consumer")]) == 1
    });
    // Delivered means the recipient got the whole envelope.
    assert_eq!(sum(&m, "corecast_envelopes_out_total", &[]), got_by_stuck);
    let dropped = sum(&m, "corecast_dropped_total", &[("reason", "slow_consumer")]);
    assert!(dropped > 0, "undelivered envelopes are counted");
    // Each line had one recipient while the stuck client was connected and none after.
    assert!(envelopes_accounted(&m) <= N as u64, "{} > {N}", envelopes_accounted(&m));
    assert!(sum(&m, "corecast_max_stalled_depth", &[]) >= 50);
    assert_eq!(sum(&m, "corecast_quarantine_entries", &[]), 1);
    assert_eq!(sum(&m, "corecast_quarantine_strikes_total", &[]), 1);
    assert_eq!(sum(&m, "corecast_quarantines_total", &[]), 1);

    // The quarantined peer comes back: refused, and counted as a drop and a close.
    let mut again = crate::util::Client::from_stream(
        crate::util::connect_socket(relay.addr, "127.0.0.7:0".parse().unwrap(), None).unwrap(),
    );
    assert!(again.read_to_eof().is_empty());
    scrape_until(admin, "the refused quarantined peer", |m| {
        sum(m, "corecast_dropped_total", &[("reason", "quarantined")]) == 1
            && sum(m, "corecast_closed_total", &[("reason", "quarantined")]) == 1
            && sum(m, "corecast_accepted_total", &[]) == 3
    });
}

#[test]
fn healthz_is_200_while_serving_and_503_while_draining() {
    let (mut relay, admin) = relay_with_admin(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"shutdown_grace_ms":60000,
            "max_pending_bytes":67108864,"backpressure_policy":{"enable_disconnect":false,"enable_throttle":false,"enable_flow_control":false}}}"#,
        &["--shards", "2"],
    );
    let r = get(admin, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok: 2 shards running\n"));
    let head = http_raw(admin, b"HEAD /healthz HTTP/1.1\r\n\r\n");
    assert_eq!((head.status, head.body.as_str()), (200, ""));

    // A consumer that never reads keeps the drain going with envelopes still queued.
    let mut stuck = relay.connect_from("127.0.0.8:0".parse().unwrap(), Some(4096));
    let mut sender = relay.connect();
    sender.send(format!("{}\n", "d".repeat(1000)).repeat(4000).as_bytes());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats: Value = serde_json::from_str(&get(admin, "/stats").body).unwrap();
        let stalled = stats["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["pending_bytes"].as_u64() > Some(0));
        if stalled {
            break;
        }
        assert!(Instant::now() < deadline, "the stuck consumer never stalled: {stats}");
        std::thread::sleep(Duration::from_millis(50));
    }

    relay.signal(libc::SIGTERM);
    let deadline = Instant::now() + PATIENCE;
    let r = loop {
        let r = get(admin, "/healthz");
        if r.status == 503 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "healthz stayed {} during the drain",
            r.status
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        r.body.starts_with("unhealthy\n") && r.body.contains("draining"),
        "{}",
        r.body
    );
    let m = scrape(admin);
    assert!(sum(&m, "corecast_shard_up", &[]) < 2);

    // Once the stuck consumer takes everything, the drain completes and the relay exits 0.
    let rest = stuck.read_to_eof();
    assert!(rest.ends_with(b"Warning: Server is shutting down.\n"));
    assert_eq!(relay.wait_exit(), Some(0));
}

#[cfg(debug_assertions)]
#[test]
fn healthz_reports_a_stuck_shard_until_it_runs_again() {
    let relay = Relay::with_env(
        "{}",
        &[
            ("CORECAST_TEST_STALL_LINE", "stall"),
            ("CORECAST_TEST_STALL_MS", "6000"),
        ],
        &["--shards", "1", "--admin", "127.0.0.1:0"],
    );
    let admin = admin_addr(&relay);
    assert_eq!(get(admin, "/healthz").status, 200);
    let mut c = relay.connect();
    c.send(b"stall\n");
    let deadline = Instant::now() + PATIENCE;
    let r = loop {
        let r = get(admin, "/healthz");
        if r.status == 503 {
            break r;
        }
        assert!(Instant::now() < deadline, "healthz never noticed the stuck shard");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(r.body.contains("shard 0: no heartbeat for "), "{}", r.body);
    let stats: Value = serde_json::from_str(&get(admin, "/stats").body).unwrap();
    assert_eq!(stats["healthy"], false);
    assert_eq!(stats["shards"][0]["healthy"], false);
    assert_eq!(stats["shards"][0]["state"], "running");
    // The shard's thread comes back: healthy again, and still relaying.
    let deadline = Instant::now() + PATIENCE;
    while get(admin, "/healthz").status != 200 {
        assert!(Instant::now() < deadline, "healthz never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut d = relay.connect();
    c.send(b"after\n");
    assert_eq!(d.line_str(), c.envelope("after"));
}

#[test]
fn the_admin_endpoint_answers_bad_requests_with_clear_statuses_and_keeps_serving() {
    let (_relay, admin) = relay_with_admin("{}", &["--shards", "1"]);
    let r = get(admin, "/nope");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/metrics"), "{}", r.body);
    let r = http_raw(admin, b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET, HEAD");
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"get metrics please\r\n\r\n",
    ] {
        assert_eq!(http_raw(admin, garbage).status, 400, "{garbage:?}");
    }
    // An oversize head is refused without reading it all.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while big.len() <= 9 << 10 {
        big.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    big.extend_from_slice(b"\r\n");
    assert_eq!(http_raw(admin, &big).status, 431);
    // A request that never completes times out instead of holding the endpoint.
    let r = http_raw(admin, b"GET /metrics HTTP/1.1\r\nHost: slow\r\n");
    assert_eq!(r.status, 408);
    // A client that connects and leaves without a word gets nothing and breaks nothing.
    drop(TcpStream::connect(admin).unwrap());
    let r = get(admin, "/healthz?verbose=1");
    assert_eq!(r.status, 200);
    assert_eq!(get(admin, "/metrics").status, 200);
}

#[test]
fn the_admin_endpoint_is_off_by_default_and_a_busy_admin_port_stops_start_up() {
    let relay = Relay::start(&[]);
    assert_eq!(relay.log.count("admin listening"), 0);
    drop(relay);
    let effective = |args: &[&str]| -> Value {
        let out = corecast().arg("check").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(effective(&[])["hyper_parameters"]["admin_addr"], Value::Null);
    let with_flag = effective(&["--admin", "127.0.0.1:9100"]);
    assert_eq!(with_flag["hyper_parameters"]["admin_addr"], "127.0.0.1:9100");
    let bad = corecast()
        .args(["--port", "0", "--admin", "localhost:9100"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--admin: expected an ip:port"));

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = busy.local_addr().unwrap().to_string();
    let path = temp_config(&format!(r#"{{"hyper_parameters":{{"admin_addr":"{at}"}}}}"#));
    let out = corecast()
        .args(["--port", "0", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot serve the admin endpoint on {at}")),
        "{err}"
    );
    assert!(!err.contains("listening on"), "nothing serves: {err}");
}

/// A fake systemd: a datagram socket that collects notifications.
fn expect_notification(socket: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no {what} notification: {e}"));
    let text = String::from_utf8(buf[..n].to_vec()).unwrap();
    assert!(text.lines().any(|l| l == what), "{text:?} lacks {what}");
    text
}

#[test]
fn a_notify_socket_receives_ready_then_stopping() {
    use std::os::linux::net::SocketAddrExt;
    let dir = test_dir("notify");
    let path = dir.join("notify.sock");
    let abstract_name = format!("corecast-ops-test-{}", std::process::id());
    let by_path = UnixDatagram::bind(&path).unwrap();
    let by_name =
        UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap()).unwrap();
    for (socket, env) in [
        (&by_path, path.to_str().unwrap().to_string()),
        (&by_name, format!("@{abstract_name}")),
    ] {
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut relay = Relay::with_env("{}", &[("NOTIFY_SOCKET", &env)], &["--shards", "2"]);
        let ready = expect_notification(socket, "READY=1");
        assert!(
            ready.contains(&format!("STATUS=listening on {} with 2 shards", relay.addr)),
            "{ready:?}"
        );
        // Ready means accepting: a client can connect and be relayed to at once.
        let mut a = relay.connect();
        let mut b = relay.connect();
        a.send(b"ready\n");
        assert_eq!(b.line_str(), a.envelope("ready"));
        relay.signal(libc::SIGTERM);
        expect_notification(socket, "STOPPING=1");
        assert_eq!(relay.wait_exit(), Some(0));
    }
}

/// A fresh directory for one test's files.
fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corecast-ops-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).expect("the log file exists")
}

#[test]
fn json_logs_go_to_console_and_file_with_the_expected_fields() {
    let dir = test_dir("json");
    let config = format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}","enable_json_log":true,
            "date_format":"%Y-%m-%dT%H:%M:%S"}}}}"#,
        dir.display()
    );
    let mut relay = Relay::with_config(&config, &["--name", "ops-json", "--log-level", "debug"]);
    let mut a = relay.connect();
    let mut b = relay.connect();
    a.send(b"hello \"json\"\n");
    assert_eq!(b.line_str(), a.envelope("hello \"json\""));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));

    let file = read_log(&dir, "ops-json");
    for (sink, text) in [("file", file.as_str()), ("console", &relay.log.text())] {
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{sink} line {l:?} is not JSON: {e}")))
            .collect();
        for l in &lines {
            let ts = l["timestamp"].as_str().unwrap();
            assert!(
                ts.len() == 19 && ts.as_bytes()[10] == b'T',
                "date_format not applied: {ts}"
            );
            assert!(["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"].contains(&l["level"].as_str().unwrap()));
            assert_eq!(l["name"], "ops-json");
            assert!(l["message"].is_string());
        }
        let find = |prefix: &str| {
            lines
                .iter()
                .find(|l| l["message"].as_str().unwrap().starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in the {sink} log:\n{text}"))
        };
        assert_eq!(find("listening on ")["level"], "INFO");
        let relayed = find("relayed line");
        assert_eq!(relayed["level"], "DEBUG");
        assert_eq!(relayed["remote_addr"], a.local_addr.to_string());
        assert_eq!(relayed["content"], "hello \"json\"");
        assert!(find("shard 0 stopped: accepted=").is_object());
    }
}

#[test]
fn the_text_file_log_appends_across_runs_and_the_console_can_be_off() {
    let dir = test_dir("text");
    let config = format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        dir.join("sub").display()
    );
    for _ in 0..2 {
        let mut relay = Relay::with_config(&config, &["--name", "ops-text"]);
        relay.signal(libc::SIGTERM);
        assert_eq!(relay.wait_exit(), Some(0));
    }
    let file = read_log(&dir.join("sub"), "ops-text");
    let listening: Vec<&str> = file.lines().filter(|l| l.contains("listening on")).collect();
    assert_eq!(listening.len(), 2, "{file}");
    for l in listening {
        let parts: Vec<&str> = l.splitn(4, " - ").collect();
        assert_eq!(&parts[1..3], &["ops-text", "INFO"], "{l}");
    }

    // Console off: nothing on stderr, everything in the file.
    let quiet = format!(
        r#"{{"logger":{{"enable_console_log":false,"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        dir.display()
    );
    let path = temp_config(&quiet);
    let mut child = corecast()
        .args(["--port", "0", "--name", "ops-quiet", "--config", path.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(dir.join("ops-quiet.log")).is_ok_and(|t| t.contains("listening on")) {
        assert!(Instant::now() < deadline, "the file log never said listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = wait_with_deadline(&mut child);
    assert_eq!(out.0, Some(0));
    assert_eq!(out.1, "", "the console is off");
    assert!(read_log(&dir, "ops-quiet").contains("all shards drained; exiting"));
}

/// Waits for `child` to exit (killing it past [`PATIENCE`]); returns its code and stderr.
fn wait_with_deadline(child: &mut std::process::Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), err)
}

#[test]
fn an_unopenable_log_file_is_a_config_error_naming_the_path() {
    let dir = test_dir("badlog");
    let not_a_dir = dir.join("plain-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let path = temp_config(&format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        not_a_dir.display()
    ));
    let out = corecast()
        .args(["--port", "0", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("cannot open log file") && err.contains(&format!("{}/corecast.log", not_a_dir.display())),
        "{err}"
    );
}

#[test]
fn log_keys_keep_only_the_listed_payload_keys_in_relay_log_lines() {
    let mut relay = Relay::with_config(
        r#"{"logger":{"log_keys":["type","id"]},"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#,
        &["--log-level", "debug"],
    );
    let mut a = relay.connect();
    let mut b = relay.connect();
    let payloads = [
        r#"{"secret":"hunter2","id":7,"type":"chat"}"#,
        "plain text with hunter2",
        r#"[{"secret":"hunter2"}]"#,
    ];
    for p in payloads {
        a.send(format!("{p}\n").as_bytes());
    }
    // Relaying is untouched: recipients get the whole line.
    for p in payloads {
        assert_eq!(b.line_str(), a.envelope(p));
    }
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    let relayed: Vec<String> = relay
        .log
        .text()
        .lines()
        .filter(|l| l.contains(" - DEBUG - relayed line "))
        .map(|l| l.split(" content=").nth(1).unwrap().to_string())
        .collect();
    assert_eq!(
        relayed,
        [
            r#"{"type":"chat","id":7}"#,
            "plain text with hunter2",
            r#"[{"secret":"hunter2"}]"#
        ],
        "a JSON object keeps only log_keys, in their order; anything else is logged as it is"
    );
}

#[test]
fn the_systemd_unit_has_what_a_notify_service_with_io_uring_needs() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/corecast.service")).unwrap();
    let mut settings: HashMap<String, Vec<String>> = HashMap::new();
    for line in unit.lines().map(str::trim) {
        if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            settings.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    let one = |k: &str| -> &str {
        match settings.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{k}: expected one value, found {other:?}"),
        }
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/corecast --config /etc/corecast/server_config.json"
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    let nofile: u64 = one("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 20_000);
    let memlock = one("LimitMEMLOCK");
    let memlock_mib: u64 = memlock.strip_suffix('M').unwrap().parse().unwrap();
    assert!(memlock_mib >= 8, "LimitMEMLOCK={memlock}");
    // The stop timeout must outlast the default shutdown grace (5 s).
    let stop: u64 = one("TimeoutStopSec").strip_suffix('s').unwrap().parse().unwrap();
    assert!(stop > 5);
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("DynamicUser", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    let filters = &settings["SystemCallFilter"];
    let allow = filters.iter().find(|f| !f.starts_with('~')).unwrap();
    for call in [
        "@system-service",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    ] {
        assert!(
            allow.split_whitespace().any(|c| c == call),
            "SystemCallFilter lacks {call}"
        );
    }
    // The deny list must not take back what glommio needs (rlimits, CPU pinning, io_uring).
    for f in filters.iter().filter(|f| f.starts_with('~')) {
        for needed in ["@resources", "@io-event", "io_uring", "setrlimit", "sched_setaffinity"] {
            assert!(!f.contains(needed), "{f} denies {needed}");
        }
    }

    // systemd's own check, when this machine has it: no warnings at all.
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze not installed; skipping `systemd-analyze verify`");
        return;
    }
    let dir = test_dir("unit");
    let copy = dir.join("corecast.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/corecast", env!("CARGO_BIN_EXE_corecast")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[test]
fn every_accepted_connection_ends_under_exactly_one_close_reason_through_a_reset_churn() {
    const CONNECTS: usize = 1500;
    let (mut relay, admin) = relay_with_admin(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#,
        &["--shards", "2"],
    );
    // Stays open throughout (and receives the churn's lines, a few tens of KB).
    let _listener = relay.connect();
    for i in 0..CONNECTS {
        let stream = TcpStream::connect(relay.addr).expect("connect to the relay");
        match i % 3 {
            // Reset at once: often before the relay has even looked at the connection.
            0 => socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap(),
            1 => {}
            _ => (&stream).write_all(format!("churn {i}\n").as_bytes()).unwrap(),
        }
        drop(stream);
    }
    let closed = |m: &[Sample]| sum(m, "corecast_closed_total", &[]);
    let m = scrape_until(admin, "every churned connection closed and accounted for", |m| {
        let accepted = sum(m, "corecast_accepted_total", &[]);
        let open = sum(m, "corecast_connections", &[]);
        accepted == CONNECTS as u64 + 1 && open == 1 && accepted == closed(m) + open
    });
    let reset_early = sum(&m, "corecast_closed_total", &[("reason", "reset_before_served")]);
    eprintln!(
        "churn of {CONNECTS}: {reset_early} reset before served, {} read errors, {} peer closes, {} write errors",
        sum(&m, "corecast_closed_total", &[("reason", "read_error")]),
        sum(&m, "corecast_closed_total", &[("reason", "peer_closed")]),
        sum(&m, "corecast_closed_total", &[("reason", "write_error")])
    );
    // /stats says the same.
    let stats: Value = serde_json::from_str(&get(admin, "/stats").body).unwrap();
    let total = &stats["total"];
    let closed_in_stats: u64 = total["closed"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        total["accepted"].as_u64().unwrap(),
        closed_in_stats + total["connections"].as_u64().unwrap(),
        "{total}"
    );
    // And the shutdown summary: after the drain nothing is open and everything is closed.
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    let closed_at_exit: u64 = corecast::metrics::CloseReason::ALL
        .iter()
        .map(|r| relay.final_counter(&format!("closed.{}", r.as_str())))
        .sum();
    assert_eq!(relay.final_counter("open"), 0);
    assert_eq!(relay.final_counter("accepted"), closed_at_exit);
}
