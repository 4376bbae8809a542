//! Limits (docs/protocol.md#inbound-framing), notices (#notices), the policies (#policies)
//! and their counters (#observability), over real sockets.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use corecast::protocol::{self, decode_envelope};

use crate::util::http::{scrape, sum};
use crate::util::{connect_socket, wait_until, Client, Relay};

fn local(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Reads `n` envelopes and checks they are `prefix0 .. prefix{n-1}` from `from`, in order.
fn expect_sequence(c: &mut Client, from: SocketAddr, prefix: &str, n: usize) {
    for i in 0..n {
        let env = decode_envelope(&c.line()).unwrap_or_else(|| panic!("line {i} is not an envelope"));
        assert_eq!(env.remote_addr, from.to_string());
        assert_eq!(env.content, format!("{prefix}{i}"), "out of order or lost at {i}");
    }
}

#[test]
fn rate_limited_lines_are_dropped_counted_and_noticed_once() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":3}}"#,
        &["--shards", "1"],
    );
    let mut fast = relay.connect();
    let mut other = relay.connect();
    let burst: String = (0..10).map(|i| format!("line {i}\n")).collect();
    fast.send(burst.as_bytes());
    for i in 0..3 {
        assert_eq!(other.line_str(), fast.envelope(&format!("line {i}")));
    }
    // The notice comes once for the whole burst, before anything relayed later.
    assert_eq!(fast.line_str(), protocol::NOTICE_RATE_LIMITED);
    other.send(b"marker\n");
    assert_eq!(fast.line_str(), other.envelope("marker"));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("dropped.rate_limited"), 7);
    assert_eq!(relay.final_counter("lines_in"), 4);
}

#[test]
fn with_one_strike_a_slow_consumer_is_closed_and_quarantined_while_a_healthy_one_gets_everything_in_order() {
    const LINES: usize = 40_000;
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"quarantine_cooldown_secs":60,
            "quarantine_strikes":1,"write_deadline_ms":1000}}"#,
        &["--shards", "2"],
    );
    let slow = relay.connect_from(local("127.0.0.2:0"), Some(4096));
    let healthy = relay.connect();
    let mut sender = relay.connect_from(local("127.0.0.4:0"), None);
    let payload = "x".repeat(80);
    // The healthy consumer reads raw bytes as fast as it can and checks them afterwards.
    let reader = std::thread::spawn(move || read_lines_raw(healthy, LINES));
    let burst: String = (0..LINES).map(|i| format!("{payload}{i}\n")).collect();
    sender.send(burst.as_bytes());
    let received = reader.join().unwrap();
    for (i, line) in received.iter().enumerate() {
        assert_eq!(
            *line,
            sender.envelope(&format!("{payload}{i}")),
            "healthy consumer, line {i}"
        );
    }
    relay
        .log
        .wait_for(&format!("client disconnected: {} (slow_consumer)", slow.local_addr));
    let warning = relay.log.wait_for(&format!("slow consumer {}:", slow.local_addr));
    assert!(
        warning.ends_with("closing it (strike 1 of 1) and quarantining it for 60 s"),
        "{warning}"
    );

    // Quarantined by IP: any port of 127.0.0.2 is accepted and closed with no bytes...
    let mut again = Client::from_stream(connect_socket(relay.addr, local("127.0.0.2:0"), None).unwrap());
    assert_eq!(again.read_to_eof(), b"");
    // ...while another address is served.
    let mut other = relay.connect_from(local("127.0.0.3:0"), None);
    sender.send(b"after\n");
    assert_eq!(other.line_str(), sender.envelope("after"));
    drop(slow);
}

#[test]
fn with_the_default_three_strikes_a_slow_consumer_reconnects_and_receives_until_its_third_close() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"quarantine_cooldown_secs":60,"max_pending_bytes":65536,
            "write_deadline_ms":300,
            "backpressure_policy":{"enable_disconnect":false,"enable_throttle":false,"enable_flow_control":false}}}"#,
        &["--shards", "2"],
    );
    let mut sender = relay.connect();
    let host = local("127.0.0.11:0");
    for strike in 1..=3 {
        // Each time in an episode of its own (closes within the write deadline of a
        // counted strike are part of it).
        std::thread::sleep(Duration::from_millis(400));
        // Connected from the same host each time; reads nothing, so its outbox passes
        // max_pending_bytes and it is closed as a slow consumer.
        let stuck = relay.connect_from(host, Some(4096));
        // Far more than the kernel buffers hold, so the client really stalls.
        sender.send(format!("{}\n", "s".repeat(500)).repeat(20_000).as_bytes());
        relay
            .log
            .wait_for(&format!("client disconnected: {} (slow_consumer)", stuck.local_addr));
        let warning = relay.log.wait_for(&format!("slow consumer {}:", stuck.local_addr));
        let expected = if strike < 3 {
            format!("closing it (strike {strike} of 3)")
        } else {
            "closing it (strike 3 of 3) and quarantining it for 60 s".to_string()
        };
        assert!(warning.ends_with(&expected), "strike {strike}: {warning}");
        drop(stuck);
        if strike == 1 {
            // One close locks nobody out: the same host reconnects and receives. (Lines of
            // the burst may still reach it first: on another shard, batches read before it
            // connected can still be on their way through the mesh.)
            let mut back = relay.connect_from(host, None);
            sender.send(b"welcome back\n");
            let burst_line = sender.envelope(&"s".repeat(500));
            loop {
                let line = back.line_str();
                if line == sender.envelope("welcome back") {
                    break;
                }
                assert_eq!(line, burst_line, "strike 1: the reconnected client got something else");
            }
        }
    }
    // The third strike quarantined the host: a new connection is closed with no bytes...
    let mut refused = Client::from_stream(connect_socket(relay.addr, host, None).unwrap());
    assert_eq!(refused.read_to_eof(), b"");
    // ...while another host is served (after what is left of the last burst).
    let mut other = relay.connect_from(local("127.0.0.12:0"), None);
    sender.send(b"still relaying\n");
    while other.line_str() != sender.envelope("still relaying") {}
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("quarantine_strikes"), 3);
    assert_eq!(relay.final_counter("quarantines"), 1);
    assert_eq!(relay.final_counter("closed.slow_consumer"), 3);
    assert_eq!(relay.final_counter("closed.quarantined"), 1);
}

/// Three agents of one host that stop reading at once (a burst none of them takes) are
/// closed, but that is one episode: one strike, not three; they reconnect and are served.
#[test]
fn agents_of_one_host_that_block_at_once_cost_one_strike_and_are_served_again() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null,"write_deadline_ms":1000}}"#,
        &["--shards", "2"],
    );
    let mut sender = relay.connect();
    let host = local("127.0.0.21:0");
    let agents: Vec<Client> = (0..3).map(|_| relay.connect_from(host, Some(4096))).collect();
    sender.send(format!("{}\n", "b".repeat(500)).repeat(20_000).as_bytes());
    for a in &agents {
        relay
            .log
            .wait_for(&format!("client disconnected: {} (slow_consumer)", a.local_addr));
    }
    let text = relay.log.text();
    assert_eq!(relay.log.count("closing it (strike 1 of 3)"), 1, "{text}");
    assert_eq!(relay.log.count("no new strike"), 2, "{text}");
    drop(agents);
    // Back from the same host: served.
    let mut back = relay.connect_from(host, None);
    sender.send(b"welcome back\n");
    while back.line_str() != sender.envelope("welcome back") {}
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("quarantine_strikes"), 1);
    assert_eq!(relay.final_counter("quarantines"), 0);
}

/// Ten agents of one host, one after another, each read what the relay sends, then block
/// (a long call) until the write deadline closes them: none of these closes is a strike,
/// since each had read more than a peer that reads nothing can take, and the host is never
/// refused. (A short write deadline keeps the test short; the rule is the same.)
#[test]
fn agents_that_read_and_then_block_are_closed_but_never_strike() {
    const AGENTS: usize = 10;
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null,"write_deadline_ms":500}}"#,
        &["--shards", "1"],
    );
    let mut sender = relay.connect();
    let line = format!("{}\n", "r".repeat(4000));
    // More than the relay's send buffer and the agent's receive buffer together could take
    // from an agent that never read.
    let proof = corecast::quarantine::unread_bytes_bound() as usize + (1 << 20);
    let host = local("127.0.0.31:0");
    for i in 0..AGENTS {
        let agent = relay.connect_from(host, Some(64 << 10));
        let addr = agent.local_addr;
        let mut stream = agent.stream;
        let burst = line.repeat(proof / line.len() + 1);
        let want = burst.len() / line.len() * sender.envelope(&line[..line.len() - 1]).len();
        let writer = {
            let mut s = sender.stream.try_clone().unwrap();
            std::thread::spawn(move || s.write_all(burst.as_bytes()).unwrap())
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < want {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "agent {i} closed while reading");
            got += n;
        }
        writer.join().unwrap();
        // The long call: it reads nothing more while the room goes on.
        sender.send(line.repeat((6 << 20) / line.len()).as_bytes());
        let closed = relay.log.wait_for(&format!("slow consumer {addr}:"));
        assert!(closed.contains("no strike: it has read"), "agent {i}: {closed}");
        relay
            .log
            .wait_for(&format!("client disconnected: {addr} (slow_consumer)"));
    }
    // Never refused: the host is still served.
    let mut last = relay.connect_from(host, None);
    sender.send(b"still here\n");
    while last.line_str() != sender.envelope("still here") {}
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("closed.slow_consumer"), AGENTS as u64);
    assert_eq!(relay.final_counter("quarantine_strikes"), 0);
    assert_eq!(relay.final_counter("quarantines"), 0);
}

/// Reads exactly `n` lines with large raw reads, then splits them.
fn read_lines_raw(c: Client, n: usize) -> Vec<String> {
    let mut stream = c.stream;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut newlines = 0;
    while newlines < n {
        let got = stream.read(&mut buf).expect("healthy consumer read");
        assert!(got > 0, "healthy consumer was closed after {newlines} lines");
        newlines += buf[..got].iter().filter(|&&b| b == b'\n').count();
        data.extend_from_slice(&buf[..got]);
    }
    String::from_utf8(data)
        .unwrap()
        .split_inclusive('\n')
        .map(str::to_string)
        .collect()
}

#[test]
fn quarantine_by_addr_refuses_only_the_same_ip_and_port() {
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"quarantine_by":"addr","quarantine_strikes":1,"write_deadline_ms":1000,
            "backpressure_policy":{"disconnect_threshold":50}}}"#,
        &["--shards", "1"],
    );
    let slow = relay.connect_from(local("127.0.0.5:0"), Some(4096));
    let slow_addr = slow.local_addr;
    let mut sender = relay.connect();
    let line = format!("{}\n", "y".repeat(200));
    let burst = line.repeat(30_000);
    sender.send(burst.as_bytes());
    relay
        .log
        .wait_for(&format!("client disconnected: {slow_addr} (slow_consumer)"));
    drop(slow);
    // Another port on the same IP is served.
    let _same_ip = relay.connect_from(local("127.0.0.5:0"), None);
    // The same ip:port is refused: accepted, then closed with no bytes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = loop {
        match connect_socket(relay.addr, slow_addr, None) {
            Ok(s) => break Client::from_stream(s),
            // The old connection's port may take a moment to be reusable.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("cannot reconnect from {slow_addr}: {e}"),
        }
    };
    assert_eq!(refused.read_to_eof(), b"");
}

#[test]
fn an_idle_client_gets_the_notice_then_is_closed() {
    let relay = Relay::with_config(
        r#"{"logger":{"log_level":"debug"},"hyper_parameters":{"client_timeout_secs":1,"timeout_check_interval_secs":1}}"#,
        &["--log-level", "debug"],
    );
    let mut idle = relay.connect();
    assert_eq!(idle.line_str(), protocol::NOTICE_IDLE);
    assert_eq!(idle.read_to_eof(), b"");
    relay
        .log
        .wait_for(&format!("client disconnected: {} (idle_timeout)", idle.local_addr));
}

#[test]
fn an_oversize_line_without_newline_gets_the_notice_and_a_close() {
    let relay = Relay::with_config(r#"{"hyper_parameters":{"max_line_bytes":1000}}"#, &[]);
    let mut big = relay.connect();
    let mut other = relay.connect();
    big.send(b"fine\n");
    assert_eq!(other.line_str(), big.envelope("fine"));
    // Never terminated: the relay must refuse it while it is still partial.
    big.send(&[b'z'; 5000]);
    assert_eq!(
        big.line_str(),
        "Warning: Message too long (limit 1000 bytes). Disconnecting.\n"
    );
    assert_eq!(big.read_to_eof(), b"");
    relay
        .log
        .wait_for(&format!("client disconnected: {} (line_too_long)", big.local_addr));
}

#[test]
fn invalid_utf8_gets_the_notice_after_earlier_lines_are_relayed() {
    let relay = Relay::start(&[]);
    let mut bad = relay.connect();
    let mut other = relay.connect();
    bad.send(b"good line\nbad \xff\xfe line\nnever relayed\n");
    assert_eq!(other.line_str(), bad.envelope("good line"));
    assert_eq!(bad.line_str(), protocol::NOTICE_INVALID_UTF8);
    assert_eq!(bad.read_to_eof(), b"");
    relay
        .log
        .wait_for(&format!("client disconnected: {} (invalid_utf8)", bad.local_addr));
    bad_free_line(&mut other, &relay);
}

/// Nothing else from the closed client reached `other`: the next line is a fresh marker.
fn bad_free_line(other: &mut Client, relay: &Relay) {
    let mut marker = relay.connect();
    marker.send(b"marker\n");
    assert_eq!(other.line_str(), marker.envelope("marker"));
}

#[test]
fn a_full_server_turns_new_clients_away_with_a_notice() {
    let relay = Relay::with_config(r#"{"hyper_parameters":{"max_connections":2}}"#, &["--shards", "2"]);
    let mut a = relay.connect();
    let mut b = relay.connect();
    let mut third = Client::connect(relay.addr);
    assert_eq!(third.line_str(), protocol::NOTICE_SERVER_FULL);
    assert_eq!(third.read_to_eof(), b"");
    a.send(b"still relayed\n");
    assert_eq!(b.line_str(), a.envelope("still relayed"));
    // A slot frees up when a client leaves.
    drop(a);
    relay.log.wait_for("(peer_closed)");
    let mut c = relay.connect();
    c.send(b"welcome\n");
    assert_eq!(b.line_str(), c.envelope("welcome"));
}

#[test]
fn fd_exhaustion_backs_off_without_spinning_and_existing_clients_keep_relaying() {
    let mut cmd = Relay::command(
        r#"{"hyper_parameters":{"max_connections":1000,"accept_error_backoff_ms":50}}"#,
        &["--shards", "1"],
    );
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 40,
                rlim_max: 40,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let relay = Relay::spawn(cmd);
    let mut a = relay.connect();
    let mut b = relay.connect();
    // More connections than the relay has descriptors left: the kernel completes them,
    // the relay's accept fails with EMFILE.
    let mut extra = Vec::new();
    for _ in 0..60 {
        extra.push(std::net::TcpStream::connect(relay.addr).unwrap());
    }
    relay.log.wait_for("accept failed");
    let cpu_before = relay.cpu_time();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let (cpu, elapsed) = (relay.cpu_time() - cpu_before, wall.elapsed());
    // A spinning accept loop burns a whole core (cpu ≈ elapsed); backing off burns ~nothing.
    assert!(
        cpu * 4 < elapsed,
        "relay used {cpu:?} of CPU in {elapsed:?} while out of descriptors"
    );
    a.send(b"still here\n");
    assert_eq!(b.line_str(), a.envelope("still here"));
    // Repeated errors are summarised, not logged one per attempt.
    assert!(relay.log.count("accept failed") < 10, "{}", relay.log.text());
    // Once descriptors free up, accepting resumes.
    drop(extra);
    let mut c = relay.connect();
    c.send(b"back\n");
    assert_eq!(b.line_str(), c.envelope("back"));
}

#[test]
fn sigterm_flushes_queued_lines_then_sends_the_notice_and_exits_zero() {
    const LINES: usize = 3000;
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"backpressure_policy":{"enable_disconnect":false}}}"#,
        &["--shards", "2"],
    );
    let mut lagging = relay.connect_from(local("127.0.0.6:0"), Some(4096));
    let mut watcher = relay.connect();
    let mut sender = relay.connect();
    let payload = "q".repeat(100);
    let burst: String = (0..LINES).map(|i| format!("{payload}{i}\n")).collect();
    sender.send(burst.as_bytes());
    // Once the watcher has every line, the relay has read them all; much of it is still
    // queued for the lagging client, which has not read anything yet.
    expect_sequence(&mut watcher, sender.local_addr, &payload, LINES);
    relay.signal(libc::SIGTERM);
    expect_sequence(&mut lagging, sender.local_addr, &payload, LINES);
    assert_eq!(lagging.line_str(), protocol::NOTICE_SHUTDOWN);
    assert_eq!(lagging.read_to_eof(), b"");
    for c in [&mut watcher, &mut sender] {
        assert_eq!(c.line_str(), protocol::NOTICE_SHUTDOWN);
        assert_eq!(c.read_to_eof(), b"");
    }
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("closed.shutdown"), 3);
    // Every relayed line reached both other clients: nothing was dropped anywhere.
    assert_eq!(relay.final_counter("lines_in"), LINES as u64);
    assert_eq!(relay.final_counter("envelopes_out"), 2 * LINES as u64);
    for reason in ["slow_consumer", "recipient_gone", "rate_limited"] {
        assert_eq!(relay.final_counter(&format!("dropped.{reason}")), 0, "{reason}");
    }
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once() {
    const LINES: usize = 60_000;
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"shutdown_grace_ms":600000,
            "backpressure_policy":{"enable_disconnect":false,"enable_throttle":false,"enable_flow_control":false},
            "max_pending_bytes":1099511627776}}"#,
        &["--shards", "1"],
    );
    // A client that never reads holds megabytes in its outbox, so the drain would wait
    // for the whole (ten-minute) grace period.
    let _stuck = relay.connect_from(local("127.0.0.7:0"), Some(4096));
    let watcher = relay.connect();
    let mut sender = relay.connect();
    let reader = std::thread::spawn(move || read_lines_raw(watcher, LINES));
    let burst: String = (0..LINES).map(|i| format!("{}{i}\n", "w".repeat(100))).collect();
    sender.send(burst.as_bytes());
    reader.join().unwrap();
    relay.signal(libc::SIGTERM);
    relay.log.wait_for("draining");
    relay.signal(libc::SIGINT);
    assert_eq!(relay.wait_exit(), Some(130));
}

#[test]
fn a_panic_while_handling_one_connection_closes_only_that_connection() {
    let relay = Relay::with_env("{}", &[("CORECAST_TEST_PANIC_LINE", "boom")], &["--shards", "1"]);
    let mut a = relay.connect();
    let mut b = relay.connect();
    let mut victim = relay.connect();
    victim.send(b"boom\n");
    assert_eq!(victim.read_to_eof(), b"");
    relay
        .log
        .wait_for(&format!("client disconnected: {} (internal_error)", victim.local_addr));
    a.send(b"after the panic\n");
    assert_eq!(b.line_str(), a.envelope("after the panic"));
    let mut late = relay.connect();
    late.send(b"new clients too\n");
    assert_eq!(a.line_str(), late.envelope("new clients too"));
}

#[test]
fn senders_pause_while_a_consumer_is_stalled_and_stop_once_it_is_gone() {
    const PHASE1: usize = 40_000;
    const PHASE2: usize = 20_000;
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"throttle_delay_ms":20,"flow_control_delay_ms":50,"write_deadline_ms":1000,
            "backpressure_policy":{"throttle_threshold":50,"flow_control_threshold":200,"disconnect_threshold":1000}}}"#,
        &["--shards", "1", "--admin", "127.0.0.1:0"],
    );
    let admin = relay.admin_addr();
    let pauses = || sum(&scrape(admin), "corecast_sender_pauses_total", &[]);
    // What the summary lines have reported so far: "shard 0: N sender read pauses ...".
    let reported = || -> u64 {
        let text = relay.log.text();
        text.lines()
            .filter_map(|l| {
                let (head, _) = l.split_once(" sender read pauses")?;
                head.rsplit(' ').next()?.parse::<u64>().ok()
            })
            .sum()
    };
    let slow = relay.connect_from(local("127.0.0.8:0"), Some(4096));
    let healthy = relay.connect();
    let mut sender = relay.connect();
    let reader = std::thread::spawn(move || read_lines_raw(healthy, PHASE1 + PHASE2));
    let line = |i: usize| format!("{}{i}", "p".repeat(90));
    // Sent over a second, so that the sender is still being read once the stall has lasted
    // long enough to count (`backpressure::BEHIND_AFTER`).
    for chunk in (0..PHASE1).collect::<Vec<_>>().chunks(1000) {
        let text: String = chunk.iter().map(|&i| line(i) + "\n").collect();
        sender.send(text.as_bytes());
        std::thread::sleep(Duration::from_millis(25));
    }
    relay
        .log
        .wait_for(&format!("client disconnected: {} (slow_consumer)", slow.local_addr));
    relay.log.wait_for("sender read pauses for backpressure");
    // The summary of the last phase-1 pauses reaches the log: the summaries add up to the
    // relay's counter.
    wait_until(
        "the summaries to report every phase-1 pause",
        Duration::from_millis(100),
        || reported() == pauses(),
    );
    let pause_reports = relay.log.count("sender read pauses");
    let phase1_pauses = pauses();

    let burst: String = (PHASE1..PHASE1 + PHASE2).map(|i| line(i) + "\n").collect();
    sender.send(burst.as_bytes());
    let received = reader.join().unwrap();
    for (i, got) in received.iter().enumerate() {
        assert_eq!(*got, sender.envelope(&line(i)), "healthy consumer, line {i}");
    }
    // No pause in phase 2: neither counted, nor reported by the summaries, which would
    // say so within their 1 s interval. (Showing that nothing happens takes a wait.)
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(pauses(), phase1_pauses, "{}", relay.log.text());
    assert_eq!(
        relay.log.count("sender read pauses"),
        pause_reports,
        "{}",
        relay.log.text()
    );
    drop(slow);
}

#[test]
fn max_pending_bytes_closes_a_stuck_recipient_even_with_disconnect_disabled() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"max_pending_bytes":65536,
            "backpressure_policy":{"enable_disconnect":false,"enable_throttle":false,"enable_flow_control":false}}}"#,
        &["--shards", "2"],
    );
    let stuck = relay.connect_from(local("127.0.0.9:0"), Some(4096));
    let mut sender = relay.connect();
    let burst = format!("{}\n", "m".repeat(500)).repeat(20_000);
    sender.send(burst.as_bytes());
    relay
        .log
        .wait_for(&format!("client disconnected: {} (slow_consumer)", stuck.local_addr));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    // What it never got is counted, not silently lost.
    assert!(relay.final_counter("dropped.slow_consumer") > 0);
    assert_eq!(relay.final_counter("closed.slow_consumer"), 1);
}

/// The relay's resident memory in KiB, from /proc.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Forty connections each start a line of a megabyte and never finish it: with
/// `max_total_partial_bytes` at 1 MiB the relay holds about that much for them, not 40 MiB;
/// short lines from others are still relayed; the holders, no longer read, go idle and are
/// closed by the idle timeout, and then a long line gets through whole.
#[test]
fn partial_lines_are_held_within_max_total_partial_bytes() {
    const HOLDERS: usize = 40;
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":2,
            "timeout_check_interval_secs":1,"max_total_partial_bytes":1048576}}"#,
        &["--shards", "2"],
    );
    let mut reader = relay.connect();
    let mut talker = relay.connect();
    let before = rss_kib(relay.pid());
    let holders: Vec<_> = (0..HOLDERS)
        .map(|_| {
            let mut c = relay.connect();
            std::thread::spawn(move || {
                // Blocks once the relay stops reading it; ends when the relay closes it.
                let _ = c.stream.write_all(&vec![b'p'; 1 << 20]);
                c
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let during = rss_kib(relay.pid());
    eprintln!("relay RSS {before} KiB before, {during} KiB with {HOLDERS} partial lines of 1 MiB started");
    assert!(
        during < before + 16 * 1024,
        "{HOLDERS} partial lines grew the relay from {before} to {during} KiB"
    );
    // Short lines still get through.
    talker.send(b"short lines still relay\n");
    assert_eq!(reader.line_str(), talker.envelope("short lines still relay"));
    // The holders are closed as idle (the reader keeps itself alive with the talker's lines
    // only; it sends nothing, so it goes too, and a new one takes its place).
    for h in holders {
        let mut c = h.join().unwrap();
        assert!(c.read_to_eof().ends_with(protocol::NOTICE_IDLE.as_bytes()));
    }
    let mut reader = relay.connect();
    let mut long = relay.connect();
    let line = "q".repeat(600_000);
    long.send(format!("{line}\n").as_bytes());
    assert_eq!(reader.line_str(), long.envelope(&line));
}

/// Connections held unread because partial lines are over their bound do not hold up the
/// shutdown: each gets N3 and the relay exits 0.
#[test]
fn connections_waiting_for_partial_line_room_drain_at_shutdown() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"client_timeout_secs":null,"max_total_partial_bytes":65536}}"#,
        &["--shards", "1"],
    );
    let holders: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = relay.connect();
            c.send(&vec![b'h'; 40_000]);
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    relay.signal(libc::SIGTERM);
    for mut c in holders {
        assert_eq!(c.read_to_eof(), protocol::NOTICE_SHUTDOWN.as_bytes());
    }
    assert_eq!(relay.wait_exit(), Some(0));
}
