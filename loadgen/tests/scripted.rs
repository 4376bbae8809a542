//! The generator against scripted servers (no relay), for what only the server side can
//! see or do: how a publisher's lines arrive (one write per line with `--burst-us 0`, in
//! bursts otherwise), and how the generator reports the server closing its receivers
//! (a notice and a close, a reset, a FIN behind data a stuck receiver never read).
//! `report/` checks the outputs of a run: the HTML report, `.hgrm`, CSV and metadata.

mod report;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs the generator against `port` with `args`; returns its JSON result.
fn loadgen(port: u16, args: &[&str]) -> serde_json::Value {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json: PathBuf = std::env::temp_dir().join(format!("corecast-loadgen-scripted-{}-{n}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_corecast-loadgen"))
        .args(["--target", &format!("127.0.0.1:{port}"), "--no-progress", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    r
}

/// A two-client relay that only forwards `SYNC` probes (so the generator's receivers know
/// they are subscribed) and records, for client 0, how many lines each read returned.
fn counting_server() -> (u16, std::thread::JoinHandle<Vec<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let conns: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
        let writers: Vec<Arc<Mutex<TcpStream>>> = conns
            .iter()
            .map(|c| Arc::new(Mutex::new(c.try_clone().unwrap())))
            .collect();
        let lines_per_read = Arc::new(Mutex::new(Vec::new()));
        let readers: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut conn)| {
                let other = writers[1 - i].clone();
                let counts = lines_per_read.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let chunk = &buf[..n];
                        if i == 0 {
                            counts
                                .lock()
                                .unwrap()
                                .push(chunk.iter().filter(|&&b| b == b'\n').count());
                        }
                        for line in chunk.split(|&b| b == b'\n').filter(|l| l.starts_with(b"SYNC")) {
                            let envelope = format!(
                                "{{\"content\":\"{}\",\"remote_addr\":\"127.0.0.1:1\"}}\n",
                                String::from_utf8_lossy(line)
                            );
                            let _ = other.lock().unwrap().write_all(envelope.as_bytes());
                        }
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        let counts = lines_per_read.lock().unwrap().clone();
        counts
    });
    (port, handle)
}

/// The median number of lines per read while client 0 published.
fn median_lines_per_read(burst_us: &str) -> usize {
    let (port, server) = counting_server();
    let r = loadgen(
        port,
        &[
            "--clients",
            "2",
            "--publishers",
            "1",
            "--rate",
            "200",
            "--burst-us",
            burst_us,
            "--duration",
            "1.5",
            "--warmup",
            "0",
            "--drain",
            "0",
        ],
    );
    assert!(r["sent"].as_u64().unwrap() >= 200, "{r:#}");
    let mut counts: Vec<usize> = server.join().unwrap().into_iter().filter(|&n| n > 0).collect();
    assert!(counts.len() >= 5, "too few reads: {counts:?}");
    counts.sort_unstable();
    counts[counts.len() / 2]
}

#[test]
fn per_line_writes_take_one_write_per_line_even_when_lines_fall_due_together() {
    // 100,000 lines/s: a line every 10 µs, so each turn of the event loop finds several
    // due; each still gets its own write.
    let (port, server) = counting_server();
    let r = loadgen(
        port,
        &[
            "--clients",
            "2",
            "--publishers",
            "1",
            "--rate",
            "100000",
            "--burst-us",
            "0",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--drain",
            "0",
        ],
    );
    let sent = r["sent"].as_u64().unwrap();
    let writes = r["publisher_writes"].as_u64().unwrap();
    let queued = r["queued_lines"].as_u64().unwrap();
    assert!(sent >= 10_000, "{r:#}");
    // Every line had a write of its own (one the socket took only in part counts too),
    // unless the socket still held refused bytes, which it then joined.
    assert!(
        writes + queued >= sent,
        "{writes} writes and {queued} queued lines for {sent} lines"
    );
    let lines: usize = server.join().unwrap().iter().sum();
    assert!(lines as u64 >= sent, "the server saw {lines} of {sent} lines");
}

#[test]
fn per_line_writes_arrive_a_line_at_a_time_and_bursts_arrive_together() {
    // 200 lines/s: a line every 5 ms, each with its own write; in 100 ms bursts, twenty
    // lines per write.
    assert_eq!(median_lines_per_read("0"), 1);
    let burst = median_lines_per_read("100000");
    assert!(burst >= 10, "median {burst} lines per read in 100 ms bursts");
}

/// When the server acts, after the last client connected: well inside the 3 s run.
const ACT_AFTER: Duration = Duration::from_millis(600);

/// Accepts `clients` connections in order (the generator connects them one by one), then
/// acts on each as `script` says; keeps every socket until the thread ends.
fn scripted_server(clients: usize) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..clients).map(|_| listener.accept().unwrap().0).collect();
        std::thread::sleep(ACT_AFTER);
        // Client 0 (healthy): a notice, then a close.
        conns[0].write_all(b"Warning: test notice, closing.\n").unwrap();
        conns[0].shutdown(std::net::Shutdown::Write).unwrap();
        // Client 1 (stuck): as much as the socket takes, then a plain close, whose FIN
        // waits behind the data the client never reads.
        let stuck = &mut conns[1];
        stuck.set_nonblocking(true).unwrap();
        // Envelopes without a payload header: read, but not deliveries and not notices.
        let envelope = format!(
            "{{\"content\":\"{}\",\"remote_addr\":\"127.0.0.1:1\"}}\n",
            "x".repeat(1000)
        );
        let filler = envelope.repeat(64);
        while stuck.write(filler.as_bytes()).is_ok() {}
        drop(conns.remove(1));
        // Former client 2 (stuck): a reset, which reaches it at once.
        let reset = conns.remove(1);
        socket2::SockRef::from(&reset).set_linger(Some(Duration::ZERO)).unwrap();
        drop(reset);
        // Hold client 0's socket until the run is over.
        std::thread::sleep(Duration::from_secs(5));
    });
    (port, handle)
}

#[test]
fn a_server_that_closes_clients_before_the_run_fails_it_at_once_with_the_reason() {
    // Like a relay that has quarantined this address: accepted, then closed at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            drop(listener.accept().unwrap());
        }
    });
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_corecast-loadgen"))
        .args(["--target", &format!("127.0.0.1:{port}"), "--no-progress"])
        .args(["--clients", "2", "--publishers", "1", "--duration", "1"])
        .output()
        .unwrap();
    server.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("closed") && stderr.contains("before every receiver was subscribed"),
        "{stderr}"
    );
    // Not after the 30 s the subscription may take.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn closes_are_counted_per_class_with_the_notice_and_when_they_arrived() {
    let (port, server) = scripted_server(3);
    // No publishers: nothing to synchronise, the server's script is all the traffic.
    let r = loadgen(
        port,
        &[
            "--clients",
            "3",
            "--publishers",
            "0",
            "--stuck-readers",
            "2",
            "--duration",
            "3",
            "--warmup",
            "0",
            "--drain",
            "0",
        ],
    );
    let class = |name: &str| {
        r["classes"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["class"] == name))
            .unwrap_or_else(|| panic!("no {name} class in {r:#}"))
            .clone()
    };

    let healthy = class("healthy");
    assert_eq!(healthy["disconnected"], 1, "{r:#}");
    assert_eq!(healthy["closed_by_server"], 1, "{r:#}");
    assert_eq!(healthy["warned"], 1, "{r:#}");
    assert_eq!(healthy["notices"][0], "Warning: test notice, closing.", "{r:#}");
    assert_eq!(r["readers_disconnected"], 1, "{r:#}");
    assert_eq!(r["closed_no_reader"], false, "{r:#}");

    let stuck = class("stuck");
    assert_eq!(stuck["receivers"], 2, "{r:#}");
    assert_eq!(stuck["closed_by_server"], 2, "{r:#}");
    // The reset arrived during the run; the FIN only once the data before it was read.
    assert_eq!(stuck["closed_seen_at_end"], 1, "{r:#}");
    let at = stuck["closed_after_ms"].as_array().unwrap();
    assert_eq!(at.len(), 1, "{r:#}");
    let ms = at[0].as_f64().unwrap();
    assert!(ms > 0.0 && ms < 3000.0, "reset seen {ms} ms after the start: {r:#}");
    server.join().unwrap();
}
