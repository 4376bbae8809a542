//! Admission by network and the PROXY protocol (issue 22): allow and deny lists, the
//! per-host cap, hand-made v1/v2 headers over plain sockets (IPv4 and IPv6, LOCAL, broken
//! ones), quarantine behind a proxy, and a real HAProxy in front.
//!
//! The HAProxy test needs `haproxy` (the Debian package). Without it, it passes with a
//! message, unless `CORECAST_REQUIRE_HAPROXY` is set (as in CI), where it fails instead.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corecast::protocol;
use corecast::proxy_protocol::V2_SIGNATURE;

use crate::util::http::{get_json, relay_with_admin};
use crate::util::{connect_socket, envelope, wait_until, Client, Relay, PATIENCE};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Everything the relay sends on `stream` until it closes it; a reset (the relay closing
/// on bytes it never read) also ends it. Fails the test if the relay keeps it open.
fn bytes_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => return got,
            Err(e) => panic!("the relay did not close the connection: {e}; got {got:?}"),
        }
    }
}

/// A version 2 PROXY header for a TCP client at `source`, plus `tlv` bytes.
fn v2_header(source: SocketAddr, destination: SocketAddr, tlv: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => panic!("mixed families"),
    };
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    body.extend_from_slice(tlv);
    v2_raw(0x21, family, &body)
}

fn v2_raw(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[version_command, family]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

/// Connects from `local` (port 0: any) to the relay, sends `header`, and waits until the
/// relay has registered the client the header names.
fn proxied(relay: &Relay, local: SocketAddr, header: &[u8], client: SocketAddr) -> Client {
    let mut stream = if local.is_ipv4() {
        connect_socket(relay.addr, local, None).expect("connect")
    } else {
        TcpStream::connect(relay.addr).expect("connect")
    };
    stream.write_all(header).unwrap();
    relay.log.wait_for(&format!("client connected: {client}"));
    Client::from_stream(stream)
}

/// Connects from `local`, sends `bytes` (if any) and returns the stream.
fn raw(relay: &Relay, local: &str, bytes: &[u8]) -> TcpStream {
    let mut stream = connect_socket(relay.addr, addr(local), None).expect("connect");
    if !bytes.is_empty() {
        stream.write_all(bytes).unwrap();
    }
    stream
}

#[test]
fn denied_and_unlisted_addresses_get_no_bytes_while_allowed_ones_relay() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"allow":["127.0.0.0/29","::1"],"deny":["127.0.0.2"]}}"#,
        &["--shards", "2"],
    );
    let mut listener = relay.connect_from(addr("127.0.0.3:0"), None);
    let mut sender = relay.connect_from(addr("127.0.0.4:0"), None);
    // Denied (though inside the allowed /29), and outside the allow list: both closed at
    // accept, before a byte is read, and never given a relayed line.
    let mut denied = raw(&relay, "127.0.0.2:0", b"");
    let mut unlisted = raw(&relay, "127.0.0.9:0", b"");
    sender.send(b"for the allowed only\n");
    assert_eq!(listener.line_str(), sender.envelope("for the allowed only"));
    assert_eq!(bytes_until_closed(&mut denied), b"");
    assert_eq!(bytes_until_closed(&mut unlisted), b"");
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("closed.denied"), 2);
    assert_eq!(relay.log.count("client connected: 127.0.0.2:"), 0);
}

#[test]
fn past_max_connections_per_ip_a_host_gets_the_notice_and_other_hosts_are_served() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"max_connections_per_ip":2}}"#,
        &["--shards", "2"],
    );
    let host = addr("127.0.0.5:0");
    let a = relay.connect_from(host, None);
    let mut b = relay.connect_from(host, None);
    let mut third = Client::from_stream(connect_socket(relay.addr, host, None).unwrap());
    assert_eq!(third.line_str(), protocol::NOTICE_HOST_FULL);
    assert_eq!(third.read_to_eof(), b"");
    drop(third);
    let mut other = relay.connect_from(addr("127.0.0.6:0"), None);
    other.send(b"another host\n");
    assert_eq!(b.line_str(), other.envelope("another host"));
    // A place frees up when one of the host's connections closes (it has unread lines, so
    // it may end as a reset rather than an EOF).
    let gone = a.local_addr;
    drop(a);
    relay.log.wait_for(&format!("client disconnected: {gone} ("));
    let mut again = relay.connect_from(host, None);
    b.send(b"welcome back\n");
    // A line read on another shard just before it connected may still reach it first.
    let mut line = again.line_str();
    if line == other.envelope("another host") {
        line = again.line_str();
    }
    assert_eq!(line, b.envelope("welcome back"));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("closed.host_full"), 1);
}

#[test]
fn proxy_headers_v1_and_v2_give_envelopes_and_rules_the_clients_address() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["127.0.0.1/32"],
            "deny":["192.0.2.66"],"max_connections_per_ip":1}}"#,
        &["--shards", "2"],
    );
    let here = addr("127.0.0.1:0");
    let dst = addr("198.51.100.1:8888");
    let listener_addr = addr("198.51.100.20:40000");
    let mut listener = proxied(&relay, here, &v2_header(listener_addr, dst, &[]), listener_addr);
    // v1, with the client's first line in the same segment as the header.
    let v1_addr = addr("192.0.2.7:56324");
    let mut v1 = proxied(
        &relay,
        here,
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 8888\r\nfirst\n",
        v1_addr,
    );
    assert_eq!(listener.line_str(), envelope("first", v1_addr));
    // v2 with a TLV after the addresses (skipped).
    let v2_addr = addr("203.0.113.9:1234");
    let mut v2 = proxied(
        &relay,
        here,
        &v2_header(v2_addr, dst, &[0x05, 0x00, 0x02, b'i', b'd']),
        v2_addr,
    );
    v2.send(b"from v2\n");
    assert_eq!(listener.line_str(), envelope("from v2", v2_addr));
    assert_eq!(v1.line_str(), envelope("from v2", v2_addr));
    // The per-host cap counts the header's address: a second connection from 192.0.2.7
    // (through the same proxy) gets N7; the proxy's own address is not capped.
    let mut second = raw(
        &relay,
        "127.0.0.1:0",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56325 8888\r\n",
    );
    assert_eq!(bytes_until_closed(&mut second), protocol::NOTICE_HOST_FULL.as_bytes());
    // The deny list too: nothing for 192.0.2.66, not even a notice.
    let mut denied = raw(&relay, "127.0.0.1:0", &v2_header(addr("192.0.2.66:9"), dst, &[]));
    assert_eq!(bytes_until_closed(&mut denied), b"");
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("closed.host_full"), 1);
    assert_eq!(relay.final_counter("closed.denied"), 1);
}

#[test]
fn proxy_headers_over_ipv6_name_ipv6_and_ipv4_clients() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipping: this machine has no IPv6 loopback");
        return;
    }
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["::1/128"]}}"#,
        &["--host", "::1"],
    );
    let here = addr("[::1]:0");
    let dst = addr("[2001:db8::1]:8888");
    let a_addr = addr("[2001:db8::7]:5555");
    let mut a = proxied(&relay, here, &v2_header(a_addr, dst, &[]), a_addr);
    let b_addr = addr("[2001:db8:1::9]:65535");
    let mut b = proxied(
        &relay,
        here,
        b"PROXY TCP6 2001:db8:1::9 2001:db8::1 65535 8888\r\n",
        b_addr,
    );
    // A v4 client through a proxy reached over IPv6.
    let c_addr = addr("192.0.2.33:4000");
    let mut c = proxied(
        &relay,
        here,
        b"PROXY TCP4 192.0.2.33 198.51.100.1 4000 8888\r\n",
        c_addr,
    );
    a.send(b"over six\n");
    assert_eq!(b.line_str(), envelope("over six", a_addr));
    assert_eq!(c.line_str(), envelope("over six", a_addr));
    c.send(b"four in six\n");
    assert_eq!(a.line_str(), envelope("four in six", c_addr));
}

#[test]
fn spoofed_local_broken_truncated_oversize_and_trickling_headers_are_closed_unrelayed_and_counted() {
    let (mut relay, admin) = relay_with_admin(
        r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["127.0.0.1"],"proxy_header_timeout_ms":1000}}"#,
        &["--shards", "2"],
    );
    let dst = addr("198.51.100.1:8888");
    let watcher_addr = addr("192.0.2.1:1000");
    let mut watcher = proxied(
        &relay,
        addr("127.0.0.1:0"),
        &v2_header(watcher_addr, dst, &[]),
        watcher_addr,
    );
    // A valid header from an untrusted source (127.0.0.2) claiming to be someone else.
    let mut spoofed = raw(
        &relay,
        "127.0.0.2:0",
        b"PROXY TCP4 192.0.2.50 198.51.100.1 1 8888\r\nspoofed\n",
    );
    // Health checks: v2 LOCAL and v1 UNKNOWN, each followed by a line that must not relay.
    let mut local = raw(
        &relay,
        "127.0.0.1:0",
        &[v2_raw(0x20, 0x00, &[]), b"local\n".to_vec()].concat(),
    );
    let mut unknown = raw(&relay, "127.0.0.1:0", b"PROXY UNKNOWN\r\nunknown\n");
    let mut malformed = raw(&relay, "127.0.0.1:0", b"GET / HTTP/1.0\r\n\r\nmalformed\n");
    let mut wrong_port = raw(
        &relay,
        "127.0.0.1:0",
        b"PROXY TCP4 192.0.2.51 198.51.100.1 65536 8888\r\nport\n",
    );
    let mut oversize = raw(
        &relay,
        "127.0.0.1:0",
        &v2_header(addr("192.0.2.52:1"), dst, &vec![0u8; 5000]),
    );
    let mut truncated = raw(&relay, "127.0.0.1:0", b"PROXY TCP4 192.0.2.53 198.51");
    truncated.shutdown(std::net::Shutdown::Write).unwrap();
    // One byte every 50 ms, never completing: closed at the deadline.
    let mut trickle = raw(&relay, "127.0.0.1:0", b"");
    let mut drip = trickle.try_clone().unwrap();
    let dripper = std::thread::spawn(move || {
        for b in b"PROXY TCP4 192.0.2.54 198.51.100.1 7 88".iter() {
            if drip.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    for (name, stream) in [
        ("spoofed", &mut spoofed),
        ("local", &mut local),
        ("unknown", &mut unknown),
        ("malformed", &mut malformed),
        ("wrong port", &mut wrong_port),
        ("oversize", &mut oversize),
        ("truncated", &mut truncated),
        ("trickle", &mut trickle),
    ] {
        assert_eq!(bytes_until_closed(stream), b"", "{name}");
    }
    dripper.join().unwrap();
    // None of their lines was relayed: the next thing the watcher gets is this marker.
    let marker_addr = addr("192.0.2.2:2000");
    let mut marker = proxied(
        &relay,
        addr("127.0.0.1:0"),
        &v2_header(marker_addr, dst, &[]),
        marker_addr,
    );
    marker.send(b"marker\n");
    assert_eq!(watcher.line_str(), envelope("marker", marker_addr));
    let expected = [
        ("proxy_untrusted", 1),
        ("proxy_local", 2),
        ("proxy_malformed", 2),
        ("proxy_oversize", 1),
        ("proxy_truncated", 1),
        ("proxy_timeout", 1),
    ];
    let stats = get_json(admin, "/stats");
    for (reason, n) in expected {
        assert_eq!(stats["total"]["closed"][reason], n, "{reason} in /stats: {stats}");
    }
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    for (reason, n) in expected {
        assert_eq!(relay.final_counter(&format!("closed.{reason}")), n, "{reason}");
    }
}

#[test]
fn behind_one_proxy_three_slow_agents_quarantine_only_their_own_addresses() {
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["127.0.0.0/8"],
            "rate_limit_msgs_per_minute":null,"quarantine_cooldown_secs":60,"quarantine_strikes":1,
            "max_pending_bytes":65536,
            "backpressure_policy":{"enable_disconnect":false,"enable_throttle":false,"enable_flow_control":false}}}"#,
        &["--shards", "2"],
    );
    let proxy = addr("127.0.0.1:0");
    let dst = addr("198.51.100.1:8888");
    let slow: Vec<(SocketAddr, TcpStream)> = (1..=3)
        .map(|i| {
            let client = addr(&format!("192.0.2.{i}:{}", 5000 + i));
            let mut s = connect_socket(relay.addr, proxy, Some(4096)).unwrap();
            s.write_all(&v2_header(client, dst, &[])).unwrap();
            relay.log.wait_for(&format!("client connected: {client}"));
            (client, s)
        })
        .collect();
    let sender_addr = addr("192.0.2.10:6000");
    let mut sender = proxied(&relay, proxy, &v2_header(sender_addr, dst, &[]), sender_addr);
    // Far more than the kernel buffers hold, so the agents that read nothing really stall.
    sender.send(format!("{}\n", "s".repeat(500)).repeat(20_000).as_bytes());
    for (client, _) in &slow {
        relay
            .log
            .wait_for(&format!("client disconnected: {client} (slow_consumer)"));
    }
    // Each agent's own address is quarantined...
    for (client, _) in &slow {
        let mut again = raw(
            &relay,
            "127.0.0.1:0",
            &v2_header(addr(&format!("{}:7000", client.ip())), dst, &[]),
        );
        assert_eq!(bytes_until_closed(&mut again), b"", "{client}");
    }
    // ...but not the proxy's, nor its other clients.
    let fresh_addr = addr("192.0.2.20:7000");
    let mut fresh = proxied(&relay, proxy, &v2_header(fresh_addr, dst, &[]), fresh_addr);
    sender.send(b"still relaying\n");
    let burst_line = envelope(&"s".repeat(500), sender_addr);
    loop {
        let line = fresh.line_str();
        if line == envelope("still relaying", sender_addr) {
            break;
        }
        assert_eq!(line, burst_line);
    }
    drop(slow);
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("quarantines"), 3);
    assert_eq!(relay.final_counter("closed.quarantined"), 3);
}

/// Where `haproxy` is, or `None` (after saying why) if the test should skip.
fn haproxy() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CORECAST_REQUIRE_HAPROXY").is_none(),
            "haproxy is not installed but CORECAST_REQUIRE_HAPROXY is set (apt-get install haproxy)"
        );
        eprintln!("skipping the HAProxy test: haproxy is not installed (apt-get install haproxy)");
    }
    found
}

/// One haproxy process, killed (by PID) when dropped.
struct HaProxy(Child);

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn through_a_real_haproxy_with_send_proxy_and_send_proxy_v2_envelopes_carry_the_clients_address() {
    let Some(haproxy) = haproxy() else {
        return;
    };
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["127.0.0.1"]}}"#,
        &["--shards", "2", "--admin", "127.0.0.1:0"],
    );
    let (v1_port, v2_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("corecast-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("haproxy.cfg");
    let relay_addr = relay.addr;
    std::fs::write(
        &config,
        format!(
            "global\n    maxconn 100\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
             listen via_v1\n    bind 127.0.0.1:{v1_port}\n    server relay {relay_addr} send-proxy\n\
             listen via_v2\n    bind 127.0.0.1:{v2_port}\n    server relay {relay_addr} send-proxy-v2 check inter 100\n"
        ),
    )
    .unwrap();
    let child = Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start haproxy");
    let _haproxy = HaProxy(child);
    let listening = |port: u16| TcpStream::connect(("127.0.0.1", port)).is_ok();
    wait_until("haproxy to listen", Duration::from_millis(50), || {
        listening(v1_port) && listening(v2_port)
    });
    // Those probes reached the relay as connections too; each has ended by now or soon.
    let through = |port: u16, local: &str| {
        let stream = connect_socket(addr(&format!("127.0.0.1:{port}")), addr(local), None).unwrap();
        let client = Client::from_stream(stream);
        relay.log.wait_for(&format!("client connected: {}", client.local_addr));
        client
    };
    let mut a = through(v1_port, "127.0.0.3:0");
    let mut b = through(v2_port, "127.0.0.4:0");
    a.send(b"via send-proxy\n");
    assert_eq!(b.line_str(), a.envelope("via send-proxy"));
    b.send(b"via send-proxy-v2\n");
    assert_eq!(a.line_str(), b.envelope("via send-proxy-v2"));
    // HAProxy's health checks on the v2 server open with a LOCAL header: accepted, closed
    // with no bytes, never a client of the broadcast.
    let (admin, local) = (relay.admin_addr(), |stats: &serde_json::Value| {
        stats["total"]["closed"]["proxy_local"].as_u64()
    });
    wait_until("a LOCAL health check", Duration::from_millis(50), || {
        local(&get_json(admin, "/stats")) >= Some(1)
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_refuses_a_bad_network_or_an_empty_trust_list_with_exit_78_naming_the_key() {
    for (json, message) in [
        (
            r#"{"hyper_parameters":{"allow":["10.0.0.0/8","10.0.0.300/32"]}}"#,
            r#"hyper_parameters.allow[1]: expected a network in CIDR notation (a.b.c.d/n or x:y::z/n), found "10.0.0.300/32" is not an IPv4 or IPv6 address"#,
        ),
        (
            r#"{"hyper_parameters":{"deny":["2001:db8::/129"]}}"#,
            "hyper_parameters.deny[0]: expected a network in CIDR notation",
        ),
        (
            r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["10.1.0.0/8"]}}"#,
            r#"hyper_parameters.proxy_trusted[0]: expected a network in CIDR notation (a.b.c.d/n or x:y::z/n), found "10.1.0.0/8" has host bits set (the network is 10.0.0.0/8)"#,
        ),
        (
            r#"{"hyper_parameters":{"proxy_protocol":true}}"#,
            "hyper_parameters.proxy_trusted: expected at least one network when proxy_protocol is true",
        ),
    ] {
        let path = crate::util::temp_config(json);
        let out = crate::util::corecast()
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{json}: {stderr}");
        assert!(stderr.contains(message), "{json}: {stderr}");
    }
    let path = crate::util::temp_config(
        r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["10.0.0.0/8"],"deny":["::1"],"max_connections_per_ip":8}}"#,
    );
    let out = crate::util::corecast()
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hyper = &effective["hyper_parameters"];
    assert_eq!(hyper["proxy_trusted"], serde_json::json!(["10.0.0.0/8"]));
    assert_eq!(hyper["deny"], serde_json::json!(["::1/128"]));
    assert_eq!(
        (&hyper["allow"], &hyper["max_connections_per_ip"]),
        (&serde_json::Value::Null, &serde_json::json!(8))
    );
}
