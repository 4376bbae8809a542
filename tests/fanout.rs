//! docs/protocol.md#ordering-and-delivery: everyone else on every shard gets every line, in
//! per-sender order.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::util::{Client, Relay};

/// Rate limiting and backpressure off: these tests are about delivery and order, and a
/// test reader thread descheduled on a busy machine must not count as a slow consumer.
const UNLIMITED: &str = r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,
    "backpressure_policy":{"enable_throttle":false,"enable_flow_control":false,"enable_disconnect":false}}}"#;

#[test]
fn sixteen_clients_over_two_shards_all_receive_everything() {
    let relay = Relay::start(&["--shards", "2"]);
    let mut clients = relay.connect_many(16);
    assert!(
        relay.log.count("(shard 0)") > 0 && relay.log.count("(shard 1)") > 0,
        "clients should land on both shards:\n{}",
        relay.log.text()
    );
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(format!("hello from {i}\n").as_bytes());
    }
    let senders: HashMap<SocketAddr, usize> = clients.iter().enumerate().map(|(i, c)| (c.local_addr, i)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut seen: Vec<usize> = (0..15)
            .map(|_| {
                let env = corecast::protocol::decode_envelope(&c.line()).expect("an envelope");
                let from = senders[&env.remote_addr.parse().unwrap()];
                assert_eq!(env.content, format!("hello from {from}"));
                from
            })
            .collect();
        seen.sort();
        let want: Vec<usize> = (0..16).filter(|&j| j != i).collect();
        assert_eq!(seen, want, "client {i}");
    }
}

#[test]
fn two_senders_bursting_5000_lines_arrive_complete_and_in_order_everywhere() {
    const LINES: usize = 5000;
    let relay = Relay::with_config(UNLIMITED, &["--shards", "2"]);
    let clients = relay.connect_many(6);
    let addrs: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr).collect();
    // Every client reads on its own thread (senders receive each other's burst too).
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let expected = if i < 2 { LINES } else { 2 * LINES };
            let writer = c.stream.try_clone().unwrap();
            (writer, std::thread::spawn(move || read_sequences(c, expected)))
        })
        .collect();
    let mut senders = Vec::new();
    for (i, (writer, _)) in readers.iter().enumerate().take(2) {
        let mut writer = writer.try_clone().unwrap();
        senders.push(std::thread::spawn(move || {
            use std::io::Write;
            let mut burst = String::new();
            for seq in 0..LINES {
                burst.push_str(&format!("sender {i} line {seq}\n"));
            }
            writer.write_all(burst.as_bytes()).unwrap();
        }));
    }
    for s in senders {
        s.join().unwrap();
    }
    for (i, (_, reader)) in readers.into_iter().enumerate() {
        let per_sender = reader.join().unwrap();
        for (s, addr) in addrs.iter().enumerate().take(2) {
            let got = per_sender.get(addr).cloned().unwrap_or_default();
            if s == i {
                assert!(got.is_empty(), "client {i} got its own lines back");
            } else {
                assert_eq!(got.len(), LINES, "client {i} from sender {s}");
                assert!(
                    got.iter().enumerate().all(|(k, &seq)| k == seq),
                    "client {i}: sender {s} out of order"
                );
            }
        }
    }
}

/// Reads `n` envelopes and returns each sender's sequence numbers in arrival order.
fn read_sequences(mut c: Client, n: usize) -> HashMap<SocketAddr, Vec<usize>> {
    let mut out: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
    for _ in 0..n {
        let env = corecast::protocol::decode_envelope(&c.line()).expect("an envelope");
        let seq = env.content.rsplit(' ').next().unwrap().parse().unwrap();
        out.entry(env.remote_addr.parse().unwrap()).or_default().push(seq);
    }
    out
}

/// The flush window coalesces: lines that arrive within one window reach a recipient in
/// fewer socket writes than lines, and with the window off every line costs one. (With
/// the window off the sender waits for each line to arrive before it sends the next, so
/// that a busy machine cannot merge two of them into one read.)
#[test]
fn the_flush_window_coalesces_writes_and_zero_turns_it_off() {
    let writes_for = |window_us: u64, lock_step: bool| {
        let config =
            format!(r#"{{"hyper_parameters":{{"rate_limit_msgs_per_minute":null,"flush_window_us":{window_us}}}}}"#);
        let mut relay = Relay::with_config(&config, &["--shards", "1"]);
        let mut sender = relay.connect();
        let mut receiver = relay.connect();
        for i in 0..20 {
            sender.send(format!("line {i}\n").as_bytes());
            if lock_step {
                assert_eq!(receiver.line_str(), sender.envelope(&format!("line {i}")));
            } else {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        if !lock_step {
            for i in 0..20 {
                assert_eq!(receiver.line_str(), sender.envelope(&format!("line {i}")));
            }
        }
        relay.signal(libc::SIGTERM);
        assert_eq!(relay.wait_exit(), Some(0));
        assert_eq!(relay.final_counter("envelopes_out"), 20);
        relay.final_counter("socket_writes")
    };
    let coalesced = writes_for(500_000, false);
    let immediate = writes_for(0, true);
    assert_eq!(immediate, 20, "with no window, each line is its own write");
    assert!(
        coalesced <= 5,
        "a 500 ms window should gather 20 lines sent 5 ms apart: {coalesced} writes"
    );
}

/// Connects until there is one client on shard 0 and one on shard 1 (SO_REUSEPORT spreads
/// connections by hash) and returns them in that order.
fn one_client_per_shard(relay: &Relay) -> (Client, Client) {
    let mut by_shard: [Option<Client>; 2] = [None, None];
    for _ in 0..64 {
        let c = Client::connect(relay.addr);
        let line = relay.log.wait_for(&format!("client connected: {}", c.local_addr));
        let shard = usize::from(line.contains("(shard 1)"));
        by_shard[shard].get_or_insert(c);
        if by_shard.iter().all(Option::is_some) {
            let [a, b] = by_shard;
            return (a.unwrap(), b.unwrap());
        }
    }
    panic!("64 connections all landed on one shard:\n{}", relay.log.text());
}

/// A line from another shard that reaches a recipient's shard within a window of its last
/// write pass waits for the next pass, and that shard must wake up for it even when it has
/// nothing of its own to do.
#[test]
fn a_line_from_another_shard_waiting_for_the_next_pass_is_delivered() {
    let config = r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,"flush_window_us":300000}}"#;
    let relay = Relay::with_config(config, &["--shards", "2"]);
    let (mut sender, mut receiver) = one_client_per_shard(&relay);
    // The first line is written at once (the receiver's shard has not written yet); the
    // next ones, each sent once the one before has arrived, wait for the next pass.
    for i in 0..3 {
        sender.send(format!("line {i}\n").as_bytes());
        assert_eq!(receiver.line_str(), sender.envelope(&format!("line {i}")));
    }
}

/// A steady stream: the reader keeps finding new lines each time the flush task lets it
/// read, and every one of them must still go out (a reader waiting for its next turn
/// keeps the flush task running).
#[test]
fn a_steady_stream_of_small_writes_arrives_complete() {
    const LINES: usize = 3000;
    // With no window the flush task runs only when asked, so nothing else would wake it.
    let config = UNLIMITED.replace(
        "\"rate_limit_msgs_per_minute\":null",
        "\"rate_limit_msgs_per_minute\":null,\"flush_window_us\":0",
    );
    assert!(config.contains("flush_window_us"));
    let relay = Relay::with_config(&config, &["--shards", "1"]);
    let mut sender = relay.connect();
    let mut receiver = relay.connect();
    let writer = std::thread::spawn(move || {
        for chunk in 0..LINES / 10 {
            let text: String = (chunk * 10..chunk * 10 + 10).map(|i| format!("line {i}\n")).collect();
            sender.send(text.as_bytes());
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        sender
    });
    for i in 0..LINES {
        let env = corecast::protocol::decode_envelope(&receiver.line()).expect("an envelope");
        assert_eq!(env.content, format!("line {i}"));
    }
    writer.join().unwrap();
}

#[test]
fn senders_pausing_between_bursts_are_read_again_whenever_they_resume() {
    // Bursts of several lines make a reader wait for read turns; pauses shorter and longer
    // than a window send it back to readiness in between, while the other sender reads.
    const BURSTS: usize = 120;
    let relay = Relay::with_config(UNLIMITED, &["--shards", "1"]);
    let mut receiver = relay.connect();
    let senders: Vec<_> = (0..2).map(|_| relay.connect()).collect();
    let names: Vec<String> = senders.iter().map(|s| s.local_addr.to_string()).collect();
    let writers: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(k, mut sender)| {
            std::thread::spawn(move || {
                for burst in 0..BURSTS {
                    let text: String = (0..5).map(|i| format!("s{k} {}\n", burst * 5 + i)).collect();
                    sender.send(text.as_bytes());
                    let pause_us = [100, 900, 3000][(burst + k) % 3];
                    std::thread::sleep(std::time::Duration::from_micros(pause_us));
                }
                sender
            })
        })
        .collect();
    let mut next = [0usize; 2];
    while next.iter().sum::<usize>() < 2 * BURSTS * 5 {
        let env = corecast::protocol::decode_envelope(&receiver.line()).expect("an envelope");
        let k = names
            .iter()
            .position(|n| *n == env.remote_addr)
            .expect("a known sender");
        assert_eq!(env.content, format!("s{k} {}", next[k]), "lost or out of order");
        next[k] += 1;
    }
    for w in writers {
        w.join().unwrap();
    }
}

/// On a busy shard an occasional sender is read at the flush task's runs, from the shard's
/// ready set, instead of on a readiness wake-up of its own. Its lines, and its end of
/// stream, must be picked up while the shard stays busy: a busy sender keeps the shard
/// running until the probes are all through, so a reader stuck in the ready set would be
/// read only once that traffic stopped, and this test would fail instead.
#[test]
fn occasional_senders_on_a_busy_shard_are_read_at_its_runs() {
    const PROBES: usize = 10;
    const ROUNDS: usize = 6;
    // A 40 ms window (passes at most every 40 ms) keeps the schedule far above the timing
    // noise of a debug build on a busy machine.
    let config = UNLIMITED.replace(
        "\"rate_limit_msgs_per_minute\":null",
        "\"rate_limit_msgs_per_minute\":null,\"flush_window_us\":40000",
    );
    let mut relay = Relay::with_config(&config, &["--shards", "1"]);
    // Only `reader` reads; the others take what comes in their socket buffers.
    let mut reader = relay.connect();
    let mut busy = relay.connect().nodelay();
    let mut probes: Vec<Client> = relay.connect_many(PROBES).into_iter().map(Client::nodelay).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy_sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // A line a millisecond: read at its turns, which keep the passes coming.
            let deadline = std::time::Instant::now() + crate::util::PATIENCE;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < deadline {
                busy.send(format!("busy {n}\n").as_bytes());
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            busy
        })
    };
    let index: HashMap<SocketAddr, usize> = probes.iter().enumerate().map(|(i, c)| (c.local_addr, i)).collect();
    // Each probe sender sends a line every 30 ms: far apart enough never to be read at
    // read turns.
    for round in 0..ROUNDS {
        for (i, probe) in probes.iter_mut().enumerate() {
            probe.send(format!("p{i} {round}\n").as_bytes());
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
    }
    let mut next = [0usize; PROBES];
    while next.iter().sum::<usize>() < PROBES * ROUNDS {
        let env = corecast::protocol::decode_envelope(&reader.line()).expect("an envelope");
        if let Some(&from) = index.get(&env.remote_addr.parse().unwrap()) {
            assert_eq!(env.content, format!("p{from} {}", next[from]));
            next[from] += 1;
        }
    }
    probes[0].shutdown();
    relay
        .log
        .wait_for(&format!("client disconnected: {}", probes[0].local_addr));
    assert!(
        !busy_sender.is_finished(),
        "the busy sender ran out of time before the probes got through"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _busy = busy_sender.join().unwrap();
    // The shard goes quiet (five windows without traffic) and sends its ready set back to
    // readiness: a probe's next line still gets through, with nothing running to read it.
    std::thread::sleep(std::time::Duration::from_millis(200));
    probes[1].send(b"after the traffic\n");
    while corecast::protocol::decode_envelope(&reader.line())
        .expect("an envelope")
        .content
        != "after the traffic"
    {}
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    assert!(
        relay.final_counter("reads_at_runs") > 0,
        "no read was done at a run:\n{}",
        relay.log.text()
    );
}
