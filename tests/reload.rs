//! docs/protocol.md#reload: SIGHUP reads the config file again. Keys marked live apply to
//! connected clients, the log level at once; keys that need a restart are named in the
//! log and kept; an invalid file is refused whole, logged and counted; a reload under
//! load loses no line and closes nobody.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use corecast::protocol;

use crate::util::http::{scrape, sum};
use crate::util::{connect_socket, corecast, temp_config, wait_until, Client, Relay};

/// Starts a relay on `path` with no `--log-level` flag (a flag would beat the file's
/// level on every reload too), plus `args`.
fn relay_on(path: &Path, args: &[&str]) -> Relay {
    let mut cmd = corecast();
    cmd.args(["--port", "0", "--config", path.to_str().unwrap()]).args(args);
    Relay::spawn(cmd)
}

/// Rewrites the config file and sends SIGHUP.
fn reload(relay: &Relay, path: &Path, json: &str) {
    std::fs::write(path, json).unwrap();
    relay.signal(libc::SIGHUP);
}

/// What arrives on `stream` within `wait`, or nothing.
fn read_within(stream: &TcpStream, wait: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    match (&*stream).read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Vec::new(),
        Err(e) => panic!("read: {e}"),
    }
}

#[test]
fn a_lowered_rate_limit_applies_to_a_connected_sender_after_sighup() {
    // A million lines a minute: a limit this test cannot reach, until the reload.
    let path =
        temp_config(r#"{"logger":{"log_level":"info"},"hyper_parameters":{"rate_limit_msgs_per_minute":1000000}}"#);
    let mut relay = relay_on(&path, &["--shards", "1"]);
    let mut fast = relay.connect();
    let mut other = relay.connect();
    fast.send(b"before\n");
    assert_eq!(other.line_str(), fast.envelope("before"));
    reload(
        &relay,
        &path,
        r#"{"logger":{"log_level":"info"},"hyper_parameters":{"rate_limit_msgs_per_minute":2}}"#,
    );
    relay
        .log
        .wait_for("config reloaded; applied hyper_parameters.rate_limit_msgs_per_minute");
    // The shard takes the new limit up at its next heartbeat: one line at a time until
    // the bucket (at most 2 tokens now) runs dry and N1 comes back on the same connection.
    let mut notice = Vec::new();
    let mut sent = 0;
    wait_until("the rate-limit notice", Duration::from_millis(1), || {
        fast.send(format!("line {sent}\n").as_bytes());
        sent += 1;
        notice.extend(read_within(&fast.stream, Duration::from_millis(100)));
        !notice.is_empty()
    });
    while !notice.ends_with(b"\n") {
        notice.extend(read_within(&fast.stream, Duration::from_secs(20)));
    }
    assert_eq!(String::from_utf8(notice).unwrap(), protocol::NOTICE_RATE_LIMITED);
    // Still connected: it gets what others send.
    let mut third = relay.connect();
    third.send(b"still here\n");
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let more = read_within(&fast.stream, Duration::from_secs(20));
        assert!(!more.is_empty(), "the rate-limited sender was closed or got nothing");
        got.extend(more);
    }
    assert_eq!(String::from_utf8(got).unwrap(), third.envelope("still here"));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert!(relay.final_counter("dropped.rate_limited") >= 1);
}

#[test]
fn a_raised_log_level_shows_debug_lines_after_sighup() {
    let path = temp_config(r#"{"logger":{"log_level":"info"}}"#);
    let relay = relay_on(&path, &["--shards", "1"]);
    let mut a = relay.connect();
    let mut b = relay.connect();
    a.send(b"at info\n");
    assert_eq!(b.line_str(), a.envelope("at info"));
    reload(&relay, &path, r#"{"logger":{"log_level":"debug"}}"#);
    relay.log.wait_for("config reloaded; applied logger.log_level");
    a.send(b"at debug\n");
    assert_eq!(b.line_str(), a.envelope("at debug"));
    relay.log.wait_for("content=at debug");
    assert_eq!(relay.log.count("content=at info"), 0, "{}", relay.log.text());
}

#[test]
fn an_invalid_file_is_refused_whole_logged_counted_and_the_running_config_stays() {
    let path = temp_config(r#"{"logger":{"log_level":"info"},"hyper_parameters":{"rate_limit_msgs_per_minute":5}}"#);
    let relay = relay_on(&path, &["--shards", "1", "--admin", "127.0.0.1:0"]);
    let admin = relay.admin_addr();
    // A valid change beside an invalid value: nothing of it may apply.
    reload(
        &relay,
        &path,
        r#"{"logger":{"log_level":"info"},"hyper_parameters":{"rate_limit_msgs_per_minute":null,"throttle_delay_ms":"fast"}}"#,
    );
    relay.log.wait_for(
        r#"config reload refused, the running config is kept: hyper_parameters.throttle_delay_ms: expected an integer, found "fast""#,
    );
    let m = scrape(admin);
    assert_eq!(sum(&m, "corecast_config_reloads_total", &[("result", "failure")]), 1);
    assert_eq!(sum(&m, "corecast_config_reloads_total", &[("result", "success")]), 0);
    // Not JSON at all: refused the same way.
    reload(&relay, &path, "{ not json");
    relay.log.wait_for("is not valid JSON");
    // The running config still has the limit of 5: lifting it now is a change, applied.
    reload(
        &relay,
        &path,
        r#"{"logger":{"log_level":"info"},"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#,
    );
    relay
        .log
        .wait_for("config reloaded; applied hyper_parameters.rate_limit_msgs_per_minute");
    let m = scrape(admin);
    assert_eq!(sum(&m, "corecast_config_reloads_total", &[("result", "failure")]), 2);
    assert_eq!(sum(&m, "corecast_config_reloads_total", &[("result", "success")]), 1);
}

#[test]
fn a_key_that_needs_a_restart_is_reported_and_its_running_value_kept() {
    let path = temp_config(r#"{"logger":{"log_level":"info"},"hyper_parameters":{"max_line_bytes":64}}"#);
    let relay = relay_on(&path, &["--shards", "1"]);
    reload(
        &relay,
        &path,
        r#"{"logger":{"log_level":"info"},"hyper_parameters":{"max_line_bytes":4096,"throttle_delay_ms":50}}"#,
    );
    relay
        .log
        .wait_for("SIGHUP: hyper_parameters.max_line_bytes changed but needs a restart; the running value is kept");
    relay
        .log
        .wait_for("config reloaded; applied hyper_parameters.throttle_delay_ms");
    // Still 64 bytes: a 100-byte line gets N4 for 64 and a close.
    let mut c = relay.connect();
    c.send(format!("{}\n", "x".repeat(100)).as_bytes());
    assert_eq!(c.line_str(), protocol::notice_line_too_long(64));
    assert!(c.try_line().is_none());
}

#[test]
fn the_pending_bytes_limit_gauge_shows_a_reloaded_max_total_pending_bytes() {
    let path = temp_config(r#"{"logger":{"log_level":"info"},"hyper_parameters":{"max_total_pending_bytes":1000000}}"#);
    let relay = relay_on(&path, &["--shards", "1", "--admin", "127.0.0.1:0"]);
    let admin = relay.admin_addr();
    assert_eq!(sum(&scrape(admin), "corecast_pending_bytes_limit", &[]), 1_000_000);
    reload(
        &relay,
        &path,
        r#"{"logger":{"log_level":"info"},"hyper_parameters":{"max_total_pending_bytes":2000000}}"#,
    );
    relay
        .log
        .wait_for("config reloaded; applied hyper_parameters.max_total_pending_bytes");
    assert_eq!(sum(&scrape(admin), "corecast_pending_bytes_limit", &[]), 2_000_000);
}

#[test]
fn a_reload_under_load_loses_no_line_and_closes_nobody() {
    const LINES: usize = 20_000;
    let live = |delay: u64| {
        format!(
            r#"{{"logger":{{"log_level":"info"}},"hyper_parameters":{{"rate_limit_msgs_per_minute":null,"throttle_delay_ms":{delay},"max_line_bytes":4096}}}}"#
        )
    };
    let path = temp_config(&live(200));
    let relay = relay_on(&path, &["--shards", "2"]);
    let mut sender = relay.connect();
    let mut receivers: Vec<Client> = relay.connect_many(3);
    let expected: Vec<String> = (0..LINES).map(|i| sender.envelope(&format!("line {i}"))).collect();
    let readers: Vec<_> = receivers
        .drain(..)
        .map(|mut r| {
            let n = expected.len();
            // The client comes back with its lines, so that it is still open below.
            std::thread::spawn(move || ((0..n).map(|_| r.line_str()).collect::<Vec<_>>(), r))
        })
        .collect();
    for chunk in 0..20 {
        let lines: String = (chunk * LINES / 20..(chunk + 1) * LINES / 20)
            .map(|i| format!("line {i}\n"))
            .collect();
        sender.send(lines.as_bytes());
        // A live change (and a restart-only one, kept) between chunks.
        let json = live(100 + chunk as u64).replace("4096", &(4096 + chunk).to_string());
        reload(&relay, &path, &json);
    }
    let mut open = Vec::new();
    for reader in readers {
        let (lines, client) = reader.join().unwrap();
        assert_eq!(lines, expected);
        open.push(client);
    }
    wait_until("the reloads to be logged", Duration::from_millis(20), || {
        relay.log.count("config reloaded") >= 1
    });
    assert_eq!(relay.log.count("client disconnected"), 0, "{}", relay.log.text());
}

#[test]
fn a_reload_that_denies_a_connected_client_closes_it_and_nobody_else() {
    let path = temp_config(r#"{"logger":{"log_level":"info"},"hyper_parameters":{"deny":["10.0.0.0/8"]}}"#);
    let relay = relay_on(&path, &["--shards", "2"]);
    let mut kept = relay.connect_from("127.0.0.2:0".parse().unwrap(), None);
    let mut denied = relay.connect_from("127.0.0.3:0".parse().unwrap(), None);
    let mut other = relay.connect_from("127.0.0.4:0".parse().unwrap(), None);
    reload(
        &relay,
        &path,
        r#"{"logger":{"log_level":"info"},"hyper_parameters":{"deny":["10.0.0.0/8","127.0.0.3"]}}"#,
    );
    relay.log.wait_for("config reloaded; applied hyper_parameters.deny");
    relay
        .log
        .wait_for(&format!("client disconnected: {} (denied)", denied.local_addr));
    assert!(denied.try_line().is_none(), "closed with no bytes");
    kept.send(b"still allowed\n");
    assert_eq!(other.line_str(), kept.envelope("still allowed"));
    assert_eq!(relay.log.count("client disconnected"), 1, "{}", relay.log.text());
    // A new connection from the denied address is refused at accept.
    let stream = connect_socket(relay.addr, "127.0.0.3:0".parse().unwrap(), None).unwrap();
    assert!(Client::from_stream(stream).try_line().is_none());
}
