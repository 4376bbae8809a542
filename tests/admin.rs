//! The admin endpoint (issues 6 and 13): `/metrics`, `/healthz` and `/stats` over real
//! HTTP, its answers to bad requests, and its bounds: hundreds of silent or half-sent
//! connections do not delay `/healthz`, an oversize head gets 431, an unfinished head is
//! closed after the header timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::http::{
    admin_connection_bound, dropped_metric, envelopes_accounted, get, get_json, http_raw, matching, relay_with_admin,
    scrape, scrape_until, sum, Response, Sample, DROP_METRICS,
};
use crate::util::{corecast, temp_config, wait_until, Client, Relay, PATIENCE};

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
    assert_eq!(sum(&m, "corecast_received_lines_total", &[]), lines);
    assert_eq!(
        sum(&m, "corecast_received_lines_total", &[]) * 2,
        envelopes_accounted(&m)
    );
    assert_eq!(
        sum(&m, "corecast_sent_envelopes_total", &[]),
        2 * lines,
        "nothing was dropped"
    );
    for dropped in DROP_METRICS {
        assert_eq!(sum(&m, dropped, &[]), 0, "{dropped}");
    }
    assert_eq!(sum(&m, "corecast_received_bytes_total", &[]), sent_bytes);
    assert_eq!(sum(&m, "corecast_sent_bytes_total", &[]), received_bytes);
    let writes = sum(&m, "corecast_socket_writes_total", &[]);
    assert!((1..=2 * lines).contains(&writes), "{writes} socket writes");
    assert_eq!(sum(&m, "corecast_connections_accepted_total", &[]), 3);
    assert_eq!(sum(&m, "corecast_connections", &[]), 3);
    assert_eq!(sum(&m, "corecast_connections_closed_total", &[]), 0);
    assert_eq!(sum(&m, "corecast_quarantine_entries", &[]), 0);
    for shard in ["0", "1"] {
        assert_eq!(sum(&m, "corecast_shard_up", &[("shard", shard)]), 1);
        assert!(m
            .iter()
            .any(|s| s.name == "corecast_received_lines_total" && s.labels["shard"] == shard));
    }
    // Every close and drop reason is exported for every shard, even at zero.
    assert_eq!(
        m.iter()
            .filter(|s| s.name == "corecast_connections_closed_total")
            .count(),
        2 * corecast::metrics::CloseReason::ALL.len()
    );
    // One metric per unit: 3 line reasons, 3 envelope reasons, 2 connection reasons.
    for (dropped, reasons) in DROP_METRICS.into_iter().zip([3, 3, 2]) {
        assert_eq!(m.iter().filter(|s| s.name == dropped).count(), 2 * reasons, "{dropped}");
    }

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
        for (key, metric) in [
            ("accepted", "corecast_connections_accepted_total"),
            ("lines_in", "corecast_received_lines_total"),
            ("envelopes_out", "corecast_sent_envelopes_total"),
            ("bytes_in", "corecast_received_bytes_total"),
            ("bytes_out", "corecast_sent_bytes_total"),
            ("socket_writes", "corecast_socket_writes_total"),
            ("reads_at_runs", "corecast_reads_at_runs_total"),
        ] {
            assert_eq!(s[key], on(metric), "shard {id} {key}");
        }
        for (reason, n) in s["closed"].as_object().unwrap() {
            assert_eq!(
                *n,
                sum(
                    &m,
                    "corecast_connections_closed_total",
                    &[("shard", &id), ("reason", reason)]
                )
            );
        }
        for (reason, n) in s["dropped"].as_object().unwrap() {
            assert_eq!(
                *n,
                sum(&m, &dropped_metric(reason), &[("shard", &id), ("reason", reason)])
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
        sum(m, "corecast_connections_closed_total", &[("reason", "peer_closed")]) == 1
            && sum(m, "corecast_connections", &[]) == 2
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
        sum(m, "corecast_received_lines_total", &[]) == N as u64
            && sum(m, "corecast_connections_closed_total", &[("reason", "slow_consumer")]) == 1
    });
    // Delivered means the recipient got the whole envelope.
    assert_eq!(sum(&m, "corecast_sent_envelopes_total", &[]), got_by_stuck);
    let dropped = sum(&m, "corecast_dropped_envelopes_total", &[("reason", "slow_consumer")]);
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
        sum(m, "corecast_refused_connections_total", &[("reason", "quarantined")]) == 1
            && sum(m, "corecast_connections_closed_total", &[("reason", "quarantined")]) == 1
            && sum(m, "corecast_connections_accepted_total", &[]) == 3
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
    let admin = relay.admin_addr();
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
    // The main thread's watchdog signals a shard whose heartbeat is stale (a parked
    // executor wakes; a busy one, as here, loses nothing).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats: Value = serde_json::from_str(&get(admin, "/stats").body).unwrap();
        if stats["shards"][0]["kicks"].as_u64() > Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the stuck shard was never woken: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The shard's thread comes back: healthy again, and still relaying.
    wait_until("healthz to recover", Duration::from_millis(100), || {
        get(admin, "/healthz").status == 200
    });
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
    // An oversize head is refused (by hyper's own 431, empty body) without reading it all.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while big.len() <= 9 << 10 {
        big.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    big.extend_from_slice(b"\r\n");
    assert_eq!(http_raw(admin, &big).status, 431);
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

/// Opens `n` connections to `admin` that send `prefix` (maybe nothing) and then nothing more.
fn hold_connections(admin: SocketAddr, n: usize, prefix: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(admin).expect("connect to the admin endpoint");
            s.write_all(prefix).unwrap();
            s
        })
        .collect()
}

/// True while the server has neither closed `stream` nor sent anything on it.
fn still_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let open = matches!((&*stream).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

/// Lets the test process hold `n` more sockets than it has now, when its hard limit allows.
fn allow_open_files(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n + 256 {
            lim.rlim_cur = lim.rlim_max.min(n + 256);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Time from connect to the end of the response, and the response, for `GET /healthz`.
fn timed_healthz(admin: SocketAddr) -> (Duration, Response) {
    let started = Instant::now();
    let r = get(admin, "/healthz");
    (started.elapsed(), r)
}

#[test]
fn healthz_answers_promptly_while_hundreds_of_connections_are_silent_or_half_sent() {
    const SILENT: usize = 200;
    const HALF_SENT: usize = 20;
    let (relay, admin) = relay_with_admin("{}", &["--shards", "1"]);
    let bound = admin_connection_bound(&relay);
    assert!(
        bound > SILENT + HALF_SENT + 8,
        "the bound {bound} leaves no room for the test"
    );
    let opening = Instant::now();
    let mut held = hold_connections(admin, SILENT, b"");
    held.extend(hold_connections(admin, HALF_SENT, b"GET /metrics HTTP/1.1\r\nHost: sl"));
    let opened_in = opening.elapsed();

    let mut latencies = Vec::new();
    for _ in 0..5 {
        let (took, r) = timed_healthz(admin);
        assert_eq!((r.status, r.body.as_str()), (200, "ok: 1 shard running\n"));
        latencies.push(took);
    }
    let worst = *latencies.iter().max().unwrap();
    println!(
        "/healthz with {SILENT} silent and {HALF_SENT} half-sent connections open \
         (opened in {opened_in:?}): {latencies:?}"
    );
    // Generous (the target is 100 ms): a server taking connections one at a time needs
    // minutes here.
    assert!(
        worst < Duration::from_secs(2),
        "/healthz took {worst:?} with {SILENT} silent connections open: {latencies:?}"
    );
    // The answers came while the others were still held, not after they timed out.
    assert!(
        held.iter().all(still_open),
        "a held connection was closed before the header timeout"
    );
    assert_eq!(get(admin, "/metrics").status, 200);
}

#[test]
fn an_unfinished_or_silent_head_is_closed_after_the_header_timeout() {
    use corecast::admin::HEADER_READ_TIMEOUT;
    let (_relay, admin) = relay_with_admin("{}", &["--shards", "1"]);
    let started = Instant::now();
    let mut half = hold_connections(admin, 1, b"GET /metrics HTTP/1.1\r\nHost: slow\r\n").remove(0);
    let mut silent = hold_connections(admin, 1, b"").remove(0);
    for (what, stream) in [("half-sent", &mut half), ("silent", &mut silent)] {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut got = Vec::new();
        // Closed without a response: hyper sends no 408 for a header timeout.
        stream
            .read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("the {what} connection was not closed: {e}"));
        assert_eq!(got, b"", "the {what} connection got a response");
        let after = started.elapsed();
        // Timers never fire early; the margin is for the connect before the timer starts.
        assert!(
            after >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
            "the {what} connection was closed after {after:?}, before the header timeout"
        );
    }
    assert_eq!(get(admin, "/healthz").status, 200);
}

#[test]
fn connections_past_the_bound_are_closed_at_once_and_room_comes_back() {
    let (relay, admin) = relay_with_admin("{}", &["--shards", "1"]);
    let bound = admin_connection_bound(&relay);
    allow_open_files(bound as u64 + 8);
    let mut held = hold_connections(admin, bound, b"");
    // The listen backlog holds them all, so the accept loop takes them in the order they
    // connected: once the bound is reached, the next is closed unanswered (a reset or an
    // empty read, never a response) while the held ones stay open.
    let mut extra = TcpStream::connect(admin).expect("connect past the bound");
    extra.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let _ = extra.read_to_end(&mut got);
    assert_eq!(got, b"", "a connection past the bound got a response");
    relay.log.wait_for("connections open; closing new ones until one ends");
    assert!(held.iter().take(16).all(still_open), "a held connection was closed");

    // Ending some held connections frees their slots.
    held.truncate(bound - 8);
    wait_until(
        "a slot to come back after closing connections",
        Duration::from_millis(50),
        || {
            let mut s = TcpStream::connect(admin).unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut raw = Vec::new();
            let _ = s.read_to_end(&mut raw);
            raw.starts_with(b"HTTP/1.1 200 ")
        },
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
    let closed = |m: &[Sample]| sum(m, "corecast_connections_closed_total", &[]);
    let m = scrape_until(admin, "every churned connection closed and accounted for", |m| {
        let accepted = sum(m, "corecast_connections_accepted_total", &[]);
        let open = sum(m, "corecast_connections", &[]);
        accepted == CONNECTS as u64 + 1 && open == 1 && accepted == closed(m) + open
    });
    let reset_early = sum(
        &m,
        "corecast_connections_closed_total",
        &[("reason", "reset_before_served")],
    );
    eprintln!(
        "churn of {CONNECTS}: {reset_early} reset before served, {} read errors, {} peer closes, {} write errors",
        sum(&m, "corecast_connections_closed_total", &[("reason", "read_error")]),
        sum(&m, "corecast_connections_closed_total", &[("reason", "peer_closed")]),
        sum(&m, "corecast_connections_closed_total", &[("reason", "write_error")])
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

// The panic hook exists only in debug builds (as `cargo test` builds the relay).
#[cfg(debug_assertions)]
#[test]
fn an_admin_thread_that_panics_is_logged_counted_and_restarted_on_the_same_port() {
    let relay = Relay::with_env(
        "{}",
        &[
            ("CORECAST_TEST_PANIC", "admin"),
            // Down long enough that the request below surely arrives while it is.
            ("CORECAST_TEST_RESTART_BACKOFF_MS", "1500"),
        ],
        &["--admin", "127.0.0.1:0"],
    );
    let admin = relay.admin_addr();
    // The first connection accepted kills the thread: no answer, the connection just ends.
    let mut first = TcpStream::connect(admin).expect("connect to the admin endpoint");
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = first.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut nothing = Vec::new();
    let _ = first.read_to_end(&mut nothing);
    assert!(nothing.is_empty(), "{}", String::from_utf8_lossy(&nothing));
    let died = relay.log.wait_for("the admin thread died: ");
    assert!(
        died.contains(
            "ERROR - the admin thread died: panicked: test hook: CORECAST_TEST_PANIC=admin; restarting it in 1500 ms"
        ),
        "{died}"
    );
    // While it is down the listener stays open: a request waits in its backlog and is
    // answered once the thread is back.
    let waiting = std::thread::spawn(move || get(admin, "/healthz"));
    relay.log.wait_for("the admin thread restarted (restarts so far: 1)");
    let answered = waiting.join().expect("the waiting request");
    assert_eq!(answered.status, 200, "{}", answered.body);
    let m = scrape(admin);
    assert_eq!(sum(&m, "corecast_thread_restarts_total", &[("thread", "admin")]), 1);
    assert_eq!(sum(&m, "corecast_thread_up", &[("thread", "admin")]), 1);
    let stats = get_json(admin, "/stats");
    assert_eq!(
        stats["threads"]["admin"],
        serde_json::json!({"restarts": 1, "up": true})
    );
    // Only once: the endpoint keeps answering.
    for _ in 0..3 {
        assert_eq!(get(admin, "/healthz").status, 200);
    }
}

/// With the relay's clients holding every descriptor under its open-file limit, the admin
/// endpoint still answers `/healthz` and `/metrics`, from descriptors it keeps in reserve.
#[test]
fn healthz_and_metrics_answer_while_clients_hold_every_descriptor() {
    use std::os::unix::process::CommandExt;
    const NOFILE: libc::rlim_t = 256;
    // No connection cap below the limit: the data port accepts until EMFILE.
    let mut cmd = Relay::command(
        r#"{"hyper_parameters":{"max_connections":100000}}"#,
        &["--shards", "1", "--admin", "127.0.0.1:0"],
    );
    // SAFETY: setrlimit is async-signal-safe; the struct lives on this stack frame.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let relay = Relay::spawn(cmd);
    let admin = relay.admin_addr();
    assert_eq!(get(admin, "/healthz").status, 200);
    // More clients than descriptors: the rest wait in the listen backlog.
    let clients: Vec<TcpStream> = (0..NOFILE as usize + 50)
        .map(|_| TcpStream::connect(relay.addr).expect("connect a client"))
        .collect();
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", relay.pid())).map_or(0, |d| d.count());
    wait_until("the relay to hold every descriptor", Duration::from_millis(20), || {
        fds() >= NOFILE as usize
    });
    relay.log.wait_for("Too many open files");
    for path in ["/healthz", "/metrics", "/healthz", "/metrics"] {
        let asked = Instant::now();
        let r = get(admin, path);
        let took = asked.elapsed();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        eprintln!("{path} answered in {took:?} with every descriptor taken");
        // Still full: no client left, and the descriptors are all in use.
        assert!(fds() >= NOFILE as usize - 1, "{} descriptors", fds());
    }
    drop(clients);
}

#[test]
fn connections_lists_every_client_with_its_traffic_paged_and_sorted() {
    let (relay, admin) = relay_with_admin(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#,
        &["--shards", "2"],
    );
    let mut sender = relay.connect();
    let mut reader = relay.connect();
    let batch: String = (0..25).map(|i| format!("line {i}\n")).collect();
    sender.send(batch.as_bytes());
    let got = read_lines(&mut reader, 25);
    let page = |query: &str| {
        let r = get(admin, &format!("/connections{query}"));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.headers["content-type"], "application/json");
        serde_json::from_str::<Value>(&r.body).unwrap()
    };
    // Counters are updated just after the socket calls, so a scrape may see them trail
    // what the reader already has by a moment.
    let mut all = page("");
    wait_until(
        "the sender's bytes and the reader's lines to show",
        Duration::from_millis(20),
        || {
            all = page("");
            let list = all["connections"].as_array().unwrap().clone();
            list.iter().any(|c| c["bytes_in"] == batch.len() as u64) && list.iter().any(|c| c["lines_out"] == 25)
        },
    );
    assert_eq!((all["total"].as_u64(), all["offset"].as_u64()), (Some(2), Some(0)));
    assert_eq!(all["sort"], "queued_bytes");
    let by_addr = |addr: std::net::SocketAddr| {
        all["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["addr"] == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} not in {all}"))
            .clone()
    };
    let s = by_addr(sender.local_addr);
    let r = by_addr(reader.local_addr);
    assert_eq!((s["lines_in"].as_u64(), s["lines_out"].as_u64()), (Some(25), Some(0)));
    assert_eq!(
        (r["lines_in"].as_u64(), r["lines_out"].as_u64()),
        (Some(0), Some(25)),
        "{all}"
    );
    assert_eq!(r["bytes_out"], got);
    assert_eq!(
        (s["queued_bytes"].as_u64(), r["queued_bytes"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(s["backpressure_stage"], "none");
    assert!(s["shard"].as_u64().unwrap() < 2);
    let since = s["connected_since"].as_str().unwrap();
    assert!(since.ends_with('Z') && since.len() == 24, "RFC 3339 UTC: {since}");

    // Sorted by what is asked, largest first; pages neither skip nor repeat.
    let first = page("?sort=lines_in&limit=1");
    assert_eq!(first["connections"][0]["addr"], sender.local_addr.to_string());
    assert_eq!(first["connections"].as_array().unwrap().len(), 1);
    let second = page("?sort=lines_in&limit=1&offset=1");
    assert_eq!(second["connections"][0]["addr"], reader.local_addr.to_string());
    assert_eq!(page("?offset=2")["connections"], serde_json::json!([]));
    for bad in ["?limit=0", "?sort=nope", "?color=red"] {
        let r = get(admin, &format!("/connections{bad}"));
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    // A connection that closed is gone from the list.
    drop(sender);
    wait_until("the sender to leave /connections", Duration::from_millis(20), || {
        page("")["total"] == 1
    });
}

#[test]
fn connections_sort_the_slow_consumer_first_by_queued_bytes() {
    let (relay, admin) = relay_with_admin(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"write_deadline_ms":60000}}"#,
        &["--shards", "1"],
    );
    let mut sender = relay.connect();
    // Never reads, with a small receive buffer: once the kernel's buffers are full, what
    // the socket refuses is queued in the relay (up to 32 MiB sent here).
    let slow = relay.connect_from("127.0.0.1:0".parse().unwrap(), Some(4096));
    let line = format!("{}\n", "x".repeat(64 << 10));
    let mut top = Value::Null;
    for _ in 0..512 {
        sender.send(line.as_bytes());
        let r = get(admin, "/connections?limit=1");
        top = serde_json::from_str::<Value>(&r.body).unwrap()["connections"][0].clone();
        if top["addr"] == slow.local_addr.to_string() && top["queued_bytes"].as_u64() > Some(64 << 10) {
            break;
        }
    }
    assert_eq!(top["addr"], slow.local_addr.to_string(), "{top}");
    assert!(top["queued_bytes"].as_u64() > Some(64 << 10), "{top}");
}

#[test]
fn metrics_carry_build_info_process_figures_the_delay_histogram_and_stage_labels() {
    let (relay, admin) = relay_with_admin(r#"{}"#, &["--shards", "2"]);
    let mut a = relay.connect();
    let mut b = relay.connect();
    a.send(b"one\n");
    assert_eq!(b.line_str(), a.envelope("one"));
    let m = scrape_until(admin, "a relay delay observed", |m| {
        sum(m, "corecast_relay_delay_seconds_count", &[]) >= 1
    });
    let one = |name: &str, with: &[(&str, &str)]| {
        let found: Vec<&Sample> = matching(&m, name, with).collect();
        assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}");
        found[0].value
    };
    let info = m.iter().find(|s| s.name == "corecast_build_info").expect("build_info");
    assert_eq!(info.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!info.labels["commit"].is_empty());
    assert_eq!(info.value, 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = one("process_start_time_seconds", &[]);
    assert!(start <= now + 1.0 && start > now - 3600.0, "started {start}, now {now}");
    assert!(one("process_open_fds", &[]) >= 4.0);
    assert!(one("process_max_fds", &[]) >= one("process_open_fds", &[]));
    assert!(one("process_resident_memory_bytes", &[]) > 1e6);
    assert!(one("process_cpu_seconds_total", &[]) >= 0.0);
    // The histogram: cumulative buckets up to +Inf, which equals the count.
    for shard in ["0", "1"] {
        let buckets: Vec<f64> = m
            .iter()
            .filter(|s| s.name == "corecast_relay_delay_seconds_bucket" && s.labels["shard"] == shard)
            .map(|s| s.value)
            .collect();
        assert_eq!(buckets.len(), 15, "{buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        let count = one("corecast_relay_delay_seconds_count", &[("shard", shard)]);
        assert_eq!(
            one(
                "corecast_relay_delay_seconds_bucket",
                &[("shard", shard), ("le", "+Inf")]
            ),
            count
        );
        // At rest every shard's stage is `none`, one series per stage.
        assert_eq!(
            one("corecast_backpressure_stage", &[("shard", shard), ("stage", "none")]),
            1.0
        );
        assert_eq!(
            one(
                "corecast_backpressure_stage",
                &[("shard", shard), ("stage", "throttle")]
            ),
            0.0
        );
        assert_eq!(
            one(
                "corecast_backpressure_stage",
                &[("shard", shard), ("stage", "flow_control")]
            ),
            0.0
        );
    }
    assert_eq!(one("corecast_config_reloads_total", &[("result", "failure")]), 0.0);
    assert_eq!(one("corecast_sender_pause_seconds_total", &[("shard", "0")]), 0.0);
}
