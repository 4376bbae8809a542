//! One test per fixed bug, over real sockets.

use std::net::SocketAddr;

use corecast::protocol;

use crate::util::Relay;

/// A write cut short by the shutdown used to be abandoned: the client got a truncated
/// envelope glued to the next one, and the rest of that write was lost uncounted.
#[test]
fn shutdown_finishes_a_half_written_envelope_before_the_rest_and_the_notice() {
    const LINES: usize = 120;
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"max_pending_bytes":67108864,
            "backpressure_policy":{"enable_disconnect":false,"enable_throttle":false,"enable_flow_control":false}}}"#,
        &["--shards", "2"],
    );
    let local: SocketAddr = "127.0.0.10:0".parse().unwrap();
    let mut lagging = relay.connect_from(local, Some(4096));
    let mut watcher = relay.connect();
    let mut sender = relay.connect();
    let big = |i: usize| format!("{i:04}{}", "b".repeat(50_000));
    let burst: String = (0..LINES).map(|i| big(i) + "\n").collect();
    sender.send(burst.as_bytes());
    for i in 0..LINES {
        assert_eq!(watcher.line_str(), sender.envelope(&big(i)));
    }
    relay.signal(libc::SIGTERM);
    for i in 0..LINES {
        assert_eq!(lagging.line_str(), sender.envelope(&big(i)), "lagging client, line {i}");
    }
    assert_eq!(lagging.line_str(), protocol::NOTICE_SHUTDOWN);
    assert_eq!(lagging.read_to_eof(), b"");
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("envelopes_out"), 2 * LINES as u64);
    assert_eq!(relay.final_counter("dropped.recipient_gone"), 0);
}
