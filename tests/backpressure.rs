//! Slow consumers (docs/protocol.md#backpressure), with readers written as plain
//! blocking sockets the way agents read: fast, at a fixed byte rate, pausing once, slower
//! than the traffic, or never. A consumer that keeps taking data gets everything in order;
//! one that stopped, or stays slower than the traffic, is closed in bounded time without
//! holding the others back for long.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::http::get_json;
use crate::util::{envelope, Client, Relay};

/// Rate limit and idle timeout off, as for a benchmark; everything else at its default.
const BENCH_LIKE: &str = r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null}}"#;

/// How a test reader takes its data.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// As fast as it can, 64 KiB reads.
    Fast,
    /// At most this many bytes per second, in 16 KiB reads.
    Rate(u64),
    /// Stops reading for this long after its first bytes, then reads fast.
    PauseOnce(Duration),
}

/// What a reader saw.
struct Seen {
    bytes: Vec<u8>,
    /// The connection ended (EOF or error) before `want` lines arrived.
    closed: bool,
    /// The longest wait between two reads that returned data, after the first.
    longest_gap: Duration,
}

/// Reads `want` lines from `stream` at `pace`, or until the relay closes it.
fn spawn_reader(stream: TcpStream, pace: Pace, want: usize) -> JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let chunk = match pace {
            Pace::Rate(_) => 16 << 10,
            _ => 64 << 10,
        };
        let mut buf = vec![0u8; chunk];
        let mut seen = Seen {
            bytes: Vec::new(),
            closed: false,
            longest_gap: Duration::ZERO,
        };
        let (mut lines, mut paused) = (0, false);
        let (mut started, mut last) = (None::<Instant>, None::<Instant>);
        while lines < want {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => {
                    seen.closed = true;
                    break;
                }
                Ok(n) => n,
            };
            let now = Instant::now();
            if let Some(l) = last {
                seen.longest_gap = seen.longest_gap.max(now - l);
            }
            last = Some(now);
            let start = *started.get_or_insert(now);
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
            seen.bytes.extend_from_slice(&buf[..n]);
            match pace {
                Pace::Fast => {}
                Pace::Rate(per_s) => {
                    // Hold the average: sleep until the bytes so far are due.
                    let due = start + Duration::from_secs_f64(seen.bytes.len() as f64 / per_s as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                Pace::PauseOnce(d) if !paused => {
                    paused = true;
                    std::thread::sleep(d);
                    last = Some(Instant::now());
                }
                Pace::PauseOnce(_) => {}
            }
        }
        seen
    })
}

/// The exact bytes a recipient gets for `lines` from `from`.
fn expected(lines: &[String], from: SocketAddr) -> Vec<u8> {
    lines.iter().flat_map(|l| envelope(l, from).into_bytes()).collect()
}

/// 200-byte lines, numbered.
fn numbered_lines(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| format!("{tag}{i:08}-{}", "x".repeat(190 - tag.len())))
        .collect()
}

/// Asserts `seen` is exactly `want`, or says where it first differs.
fn assert_complete(who: &str, seen: &Seen, want: &[u8]) {
    if seen.bytes != want {
        let at = seen
            .bytes
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(seen.bytes.len().min(want.len()));
        let lines_ok = want[..at].iter().filter(|&&b| b == b'\n').count();
        panic!(
            "{who}: got {} of {} bytes (closed: {}); first difference after {lines_ok} complete lines",
            seen.bytes.len(),
            want.len(),
            seen.closed
        );
    }
}

/// One client writes 60,000 lines of 200 bytes in one go (12 MB); a fast reader, a 2 MB/s
/// and a 5 MB/s reader, and readers that pause once for 0.3 s, 1 s and 3 s all get every
/// line, in order, and none is closed.
fn a_burst_reaches_every_reader_that_keeps_reading(shards: &str) {
    const LINES: usize = 60_000;
    let relay = Relay::with_config(BENCH_LIKE, &["--shards", shards]);
    let paces = [
        ("fast", Pace::Fast),
        ("2 MB/s", Pace::Rate(2_000_000)),
        ("5 MB/s", Pace::Rate(5_000_000)),
        ("pause 0.3 s", Pace::PauseOnce(Duration::from_millis(300))),
        ("pause 1 s", Pace::PauseOnce(Duration::from_secs(1))),
        ("pause 3 s", Pace::PauseOnce(Duration::from_secs(3))),
    ];
    let readers: Vec<_> = paces
        .iter()
        .map(|&(name, pace)| (name, spawn_reader(relay.connect().stream, pace, LINES)))
        .collect();
    let mut sender = relay.connect();
    let lines = numbered_lines(LINES, "b");
    let want = expected(&lines, sender.local_addr);
    let burst: String = lines.iter().map(|l| format!("{l}\n")).collect();
    sender.send(burst.as_bytes());
    for (name, reader) in readers {
        let seen = reader.join().unwrap();
        assert_complete(name, &seen, &want);
    }
    assert_eq!(relay.log.count("slow consumer"), 0, "{}", relay.log.text());
}

#[test]
fn a_burst_reaches_fast_slow_and_pausing_readers_complete_and_in_order_on_one_shard() {
    a_burst_reaches_every_reader_that_keeps_reading("1");
}

#[test]
fn a_burst_reaches_fast_slow_and_pausing_readers_complete_and_in_order_on_four_shards() {
    a_burst_reaches_every_reader_that_keeps_reading("4");
}

/// Sends `lines` from `sender` at `per_s` lines a second, in writes of 10 ms worth.
fn send_steadily(mut sender: Client, lines: Vec<String>, per_s: usize) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let per_tick = (per_s / 100).max(1);
        let start = Instant::now();
        for (tick, group) in lines.chunks(per_tick).enumerate() {
            let due = start + Duration::from_millis(10 * tick as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let text: String = group.iter().map(|l| format!("{l}\n")).collect();
            sender.send(text.as_bytes());
        }
    })
}

/// With the defaults, a consumer that connects and never reads is closed as a slow
/// consumer within 15 s, and meanwhile a healthy consumer keeps receiving at the offered
/// rate: every line, in order, with no long gap (a fresh stall may pause the senders for
/// at most `flow_control_delay_ms`, 1 s).
#[test]
fn a_consumer_that_never_reads_is_closed_within_the_deadline_while_the_others_get_everything() {
    const RATE: usize = 20_000; // lines/s, 4 MB/s
    const LINES: usize = RATE * 14;
    let relay = Relay::with_config(BENCH_LIKE, &["--shards", "2"]);
    let stuck = relay.connect_from("127.0.0.5:0".parse().unwrap(), None);
    let healthy = spawn_reader(relay.connect().stream, Pace::Fast, LINES);
    let sender = relay.connect().nodelay();
    let from = sender.local_addr;
    let lines = numbered_lines(LINES, "s");
    let want = expected(&lines, from);
    let started = Instant::now();
    let sending = send_steadily(sender, lines, RATE);
    let closed = relay
        .log
        .wait_for(&format!("client disconnected: {} (slow_consumer)", stuck.local_addr));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "closed only after {took:?}: {closed}");
    assert!(
        relay.log.text().contains("accepted nothing for 10000 ms"),
        "{}",
        relay.log.text()
    );
    sending.join().unwrap();
    let seen = healthy.join().unwrap();
    assert_complete("healthy", &seen, &want);
    eprintln!(
        "never-reading consumer closed after {took:?}; longest gap the healthy consumer saw: {:?}",
        seen.longest_gap
    );
    assert!(
        seen.longest_gap < Duration::from_secs(5),
        "the healthy consumer waited {:?}",
        seen.longest_gap
    );
    drop(stuck);
}

/// A consumer that keeps reading, but at 1 MB/s while 4 MB/s are offered, holds the room
/// back for at most its allowance, then is closed by the messages rule once it has stayed
/// over `disconnect_threshold` for `write_deadline_ms`; the healthy consumer gets
/// everything. (A short deadline keeps the test short; the rule is the same.)
#[test]
fn a_consumer_slower_than_the_traffic_is_closed_after_a_bounded_time() {
    const RATE: usize = 20_000;
    const LINES: usize = RATE * 7;
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null,"write_deadline_ms":3000}}"#,
        &["--shards", "1"],
    );
    let slow_client = relay.connect_from("127.0.0.6:0".parse().unwrap(), None);
    let slow_addr = slow_client.local_addr;
    let slow = spawn_reader(slow_client.stream, Pace::Rate(1_000_000), LINES);
    let healthy = spawn_reader(relay.connect().stream, Pace::Fast, LINES);
    let sender = relay.connect().nodelay();
    let lines = numbered_lines(LINES, "r");
    let want = expected(&lines, sender.local_addr);
    let started = Instant::now();
    let sending = send_steadily(sender, lines, RATE);
    let line = relay
        .log
        .wait_for(&format!("client disconnected: {slow_addr} (slow_consumer)"));
    let took = started.elapsed();
    assert!(
        relay.log.text().contains("over disconnect_threshold (500) for 3000 ms"),
        "{line}\n{}",
        relay.log.text()
    );
    // Behind from the first second; closed one deadline later, give or take the sweep.
    assert!(took < Duration::from_secs(6), "closed only after {took:?}");
    sending.join().unwrap();
    assert_complete("healthy", &healthy.join().unwrap(), &want);
    let seen = slow.join().unwrap();
    assert!(seen.closed, "the slow consumer was never closed");
    // What it did get is a prefix of the stream, in order.
    assert!(want.starts_with(&seen.bytes[..seen.bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)]));
}

/// With a process-wide bound of 2 MiB, consumers that stop reading cannot together hold
/// more than about that: reads pause (the sender is pushed back through TCP) instead of
/// queueing 64 MiB for each; once the deadline has closed them, the sender resumes and a
/// healthy consumer gets everything.
#[test]
fn the_process_wide_bound_pauses_reads_instead_of_queueing_for_every_stuck_consumer() {
    const LINES: usize = 100_000; // 20 MB
    const BOUND: u64 = 2 << 20;
    let mut relay = Relay::with_config(
        &format!(
            r#"{{"hyper_parameters":{{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null,
                "write_deadline_ms":2000,"max_total_pending_bytes":{BOUND}}}}}"#
        ),
        &["--shards", "2", "--admin", "127.0.0.1:0"],
    );
    let admin = relay.admin_addr();
    let stuck: Vec<Client> = (0..5)
        .map(|i| relay.connect_from(format!("127.0.1.{}:0", i + 1).parse().unwrap(), Some(4096)))
        .collect();
    let healthy = spawn_reader(relay.connect().stream, Pace::Fast, LINES);
    let mut sender = relay.connect();
    let lines = numbered_lines(LINES, "t");
    let want = expected(&lines, sender.local_addr);
    let writer = std::thread::spawn(move || {
        let burst: String = lines.iter().map(|l| format!("{l}\n")).collect();
        sender.send(burst.as_bytes());
        sender
    });
    let mut largest = 0u64;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let s = get_json(admin, "/stats");
        let pending: u64 = s["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sh| sh["pending_bytes"].as_u64().unwrap())
            .sum();
        largest = largest.max(pending);
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &stuck {
        relay
            .log
            .wait_for(&format!("client disconnected: {} (slow_consumer)", c.local_addr));
    }
    let _sender = writer.join().unwrap();
    assert_complete("healthy", &healthy.join().unwrap(), &want);
    let s = get_json(admin, "/stats");
    let total = |f: &dyn Fn(&Value) -> u64| s["shards"].as_array().unwrap().iter().map(f).sum::<u64>();
    assert_eq!(total(&|sh| sh["slow_consumer_closed"]["deadline"].as_u64().unwrap()), 5);
    assert!(total(&|sh| sh["sender_pause_ms"].as_u64().unwrap()) > 0, "{s}");
    eprintln!("largest queued total seen: {largest} bytes (bound {BOUND})");
    // One delivery round past the bound at most (each shard may add a batch per recipient).
    assert!(
        largest <= 4 * BOUND,
        "queued {largest} bytes against a bound of {BOUND}"
    );
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert!(relay.final_counter("sender_pauses") > 0);
    assert_eq!(relay.final_counter("closed.slow_consumer"), 5);
    assert_eq!(relay.final_counter("slow_consumer.deadline"), 5);
}

/// Ten clients each write every line with its own write and read with a plain loop, as a
/// simple agent does; nobody is closed and everybody gets everyone else's lines in order.
#[test]
fn line_by_line_writers_that_read_with_a_plain_loop_are_never_closed() {
    const CLIENTS: usize = 10;
    const LINES: usize = 3_000;
    let relay = Relay::with_config(BENCH_LIKE, &["--shards", "2"]);
    let clients: Vec<Client> = (0..CLIENTS).map(|_| relay.connect().nodelay()).collect();
    let addrs: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr).collect();
    let start = Instant::now() + Duration::from_millis(100);
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(me, client)| {
            let reader = spawn_reader(client.stream.try_clone().unwrap(), Pace::Fast, (CLIENTS - 1) * LINES);
            let mut writer = client;
            let sending = std::thread::spawn(move || {
                for i in 0..LINES {
                    // 3,000 lines/s each, one write(2) per line.
                    let due = start + Duration::from_micros(333 * i as u64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    writer.send(format!("c{me}-{i}\n").as_bytes());
                }
                writer
            });
            (me, reader, sending)
        })
        .collect();
    for (me, reader, sending) in handles {
        let _writer = sending.join().unwrap();
        let seen = reader.join().unwrap();
        assert!(!seen.closed, "client {me} was closed");
        let text = String::from_utf8(seen.bytes).unwrap();
        let mut next = [0usize; CLIENTS];
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let from = addrs.iter().position(|a| a.to_string() == v["remote_addr"]).unwrap();
            assert_ne!(from, me, "client {me} got its own line");
            assert_eq!(
                v["content"],
                format!("c{from}-{}", next[from]),
                "client {me}, from {from}"
            );
            next[from] += 1;
        }
        assert!(next.iter().enumerate().all(|(c, &n)| c == me || n == LINES));
    }
    assert_eq!(relay.log.count("slow consumer"), 0);
}

/// Reads from `stream` until `want` has arrived or the relay closes it, comparing as it
/// goes (large transfers are not kept); returns how many bytes matched and whether all did.
fn spawn_checking_reader(stream: TcpStream, want: std::sync::Arc<Vec<u8>>, pace: Pace) -> JoinHandle<(usize, bool)> {
    std::thread::spawn(move || {
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let (mut got, start) = (0usize, Instant::now());
        while got < want.len() {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => return (got, false),
                Ok(n) => n,
            };
            if buf[..n] != want[got..got + n] {
                return (got, false);
            }
            got += n;
            if let Pace::Rate(per_s) = pace {
                let due = start + Duration::from_secs_f64(got as f64 / per_s as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
        (got, true)
    })
}

/// `n` lines of `len` bytes, numbered.
fn large_lines(n: usize, len: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:06}{}", "L".repeat(len - 6))).collect()
}

/// Lines of a megabyte, sent as fast as the sender can, pause the sender by their bytes
/// before any reader's backlog reaches `max_pending_bytes`: six readers that keep reading
/// (at 2 MB/s each, slower than the sender, as readers are when the relay is fast) all
/// get 16 such lines byte for byte and in order, and nobody is closed or struck. (An
/// 8 MiB bound stands in for the default 64 MiB so the test stays small; with pauses
/// counting envelopes only, every one of these readers was closed by the bytes rule.)
#[test]
fn megabyte_lines_pause_the_sender_instead_of_closing_readers_that_keep_reading() {
    const READERS: usize = 6;
    const LINES: usize = 16;
    let mut relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null,"max_pending_bytes":4194304}}"#,
        &["--shards", "2"],
    );
    // Receive buffers of 256 KiB, so that the backlog is the relay's, not the kernel's
    // (loopback buffers can grow to tens of megabytes and hide it).
    let readers: Vec<TcpStream> = (0..READERS)
        .map(|_| {
            relay
                .connect_from("127.0.0.1:0".parse().unwrap(), Some(256 << 10))
                .stream
        })
        .collect();
    let mut sender = relay.connect();
    let lines = large_lines(LINES, 1_000_000);
    let want = std::sync::Arc::new(expected(&lines, sender.local_addr));
    let handles: Vec<_> = readers
        .into_iter()
        .map(|s| spawn_checking_reader(s, want.clone(), Pace::Rate(2_000_000)))
        .collect();
    let burst: String = lines.iter().map(|l| format!("{l}\n")).collect();
    sender.send(burst.as_bytes());
    for (i, h) in handles.into_iter().enumerate() {
        let (got, complete) = h.join().unwrap();
        assert!(
            complete,
            "reader {i} got {got} of {} bytes\n{}",
            want.len(),
            relay.log.text()
        );
    }
    assert_eq!(relay.log.count("slow consumer"), 0, "{}", relay.log.text());
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("closed.slow_consumer"), 0);
    assert_eq!(relay.final_counter("quarantine_strikes"), 0);
    assert!(relay.final_counter("sender_pauses") > 0, "the bytes paused nobody");
}

/// Among readers that keep up, one that reads megabyte lines at 1 MB/s while more is
/// offered is a lone laggard: it pauses the sender for its allowance only, then its
/// backlog reaches `max_pending_bytes` and the bytes rule closes it; the others get
/// everything.
#[test]
fn a_lone_reader_slower_than_megabyte_lines_is_closed_by_the_bytes_rule() {
    const LINES: usize = 40;
    let relay = Relay::with_config(
        r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"client_timeout_secs":null,"max_pending_bytes":8388608}}"#,
        &["--shards", "1"],
    );
    let slow = relay.connect_from("127.0.0.7:0".parse().unwrap(), None);
    let slow_addr = slow.local_addr;
    let fast: Vec<TcpStream> = (0..4).map(|_| relay.connect().stream).collect();
    let sender = relay.connect().nodelay();
    let lines = large_lines(LINES, 1_000_000);
    let want = std::sync::Arc::new(expected(&lines, sender.local_addr));
    let slow_reader = spawn_checking_reader(slow.stream, want.clone(), Pace::Rate(1_000_000));
    let handles: Vec<_> = fast
        .into_iter()
        .map(|s| spawn_checking_reader(s, want.clone(), Pace::Fast))
        .collect();
    // 4 MB/s offered: a line every 250 ms.
    let sending = std::thread::spawn(move || {
        let mut sender = sender;
        let start = Instant::now();
        for (i, l) in lines.iter().enumerate() {
            if let Some(wait) = (start + Duration::from_millis(250 * i as u64)).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sender.send(format!("{l}\n").as_bytes());
        }
    });
    let line = relay.log.wait_for(&format!("slow consumer {slow_addr}:"));
    assert!(line.contains("over max_pending_bytes (8388608)"), "{line}");
    sending.join().unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        let (got, complete) = h.join().unwrap();
        assert!(complete, "fast reader {i} got {got} of {} bytes", want.len());
    }
    let (_, complete) = slow_reader.join().unwrap();
    assert!(!complete, "the slow reader was not closed");
}
