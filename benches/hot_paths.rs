//! Criterion benches of the relay's hot paths: envelope encoding, line framing, batch
//! building, the token bucket, the quarantine and allow/deny lookups on accept, fan-out into recipients'
//! outboxes, one end-to-end fan-out through the real binary over loopback, and the
//! kernel's own cost of one loopback send by size (the floor under every delivery), and
//! the CPU a shard spends each time it sleeps until its next tick and wakes, and the
//! per-batch cost of the relay-delay histogram (two clock reads and one observation).
//! `cargo bench` runs them all; each reports throughput per byte or element.
//!
//! The pure benches drive time with a fake `Instant` stepped forward by hand. The
//! end-to-end bench starts the `corecast` binary as a child process that a guard kills
//! when the bench function returns or unwinds.

use std::cell::OnceCell;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use corecast::batch::{BatchBuilder, Ledger, LocalBatch};
use corecast::client::Client;
use corecast::config::QuarantineBy;
use corecast::limiter::{Decision, TokenBucket};
use corecast::metrics::DelayHistogram;
use corecast::netlist::NetList;
use corecast::pacing::Entry;
use corecast::protocol::{encode_envelope, Framer};
use corecast::quarantine::Quarantine;

const ADDR: &str = "127.0.0.1:54321";

fn envelope_encoding(c: &mut Criterion) {
    let long = "x".repeat(4096);
    let escapes = "\"quoted\" \\ \t\u{1b}[0m\n".repeat(64);
    let non_ascii = "é😀中文ü".repeat(100);
    let cases = [
        ("short", "hello from agent 7"),
        ("long_4k", long.as_str()),
        ("escape_heavy", escapes.as_str()),
        ("non_ascii", non_ascii.as_str()),
    ];
    let mut group = c.benchmark_group("envelope_encoding");
    for (name, line) in cases {
        group.throughput(Throughput::Bytes(line.len() as u64));
        let mut out = Vec::with_capacity(64 << 10);
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_envelope(&mut out, black_box(line), ADDR);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn line_framing(c: &mut Criterion) {
    let mut stream = Vec::new();
    for i in 0..1000 {
        stream.extend_from_slice(format!("{{\"seq\":{i},\"payload\":\"{}\"}}\r\n", "p".repeat(80)).as_bytes());
    }
    let mut group = c.benchmark_group("line_framing");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for read_size in [64usize, 1500, 65536] {
        group.bench_function(format!("reads_of_{read_size}"), |b| {
            b.iter_batched(
                || Framer::new(1 << 20),
                |mut framer| {
                    let mut lines = 0usize;
                    for chunk in stream.chunks(read_size) {
                        framer.feed(chunk, |l| lines += l.len()).unwrap();
                    }
                    black_box(lines)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn batch_building(c: &mut Criterion) {
    let line = "x".repeat(100);
    let mut group = c.benchmark_group("batch_building");
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_lines_of_100_bytes", |b| {
        let mut builder = BatchBuilder::default();
        b.iter(|| {
            for origin in 0..64u64 {
                builder.push(origin / 8, black_box(&line), ADDR);
            }
            black_box(builder.take().data.len())
        })
    });
    group.finish();
}

/// What `corecast_relay_delay_seconds` costs per batch: the clock read when the batch's
/// first line is pushed, the one at its first write, and the histogram observation.
fn relay_delay(c: &mut Criterion) {
    let histogram = DelayHistogram::default();
    let mut group = c.benchmark_group("relay_delay");
    group.throughput(Throughput::Elements(1));
    group.bench_function("per_batch", |b| {
        b.iter(|| {
            let first_read = Instant::now();
            histogram.observe(black_box(first_read).elapsed());
        })
    });
    group.finish();
    black_box(histogram.snapshot());
}

/// Checks per timed iteration of the token-bucket benches.
const BUCKET_CHECKS: u64 = 1024;

/// Runs `BUCKET_CHECKS` checks, stepping the fake clock by `step` before each; returns how
/// many were allowed.
fn run_checks(bucket: &mut TokenBucket, now: &mut Instant, step: Duration) -> u64 {
    let mut allowed = 0;
    for _ in 0..BUCKET_CHECKS {
        *now += step;
        allowed += u64::from(bucket.check(black_box(*now)) == Decision::Allow);
    }
    allowed
}

fn token_bucket(c: &mut Criterion) {
    let mut group = c.benchmark_group("token_bucket");
    group.throughput(Throughput::Elements(BUCKET_CHECKS));
    group.bench_function("allow", |b| {
        let mut now = Instant::now();
        // u32::MAX per minute refills ~70 tokens per 1 µs step: the bucket never runs dry.
        let mut bucket = TokenBucket::per_minute(u64::from(u32::MAX), now);
        let (mut checks, mut allowed) = (0, 0);
        b.iter(|| {
            checks += BUCKET_CHECKS;
            allowed += run_checks(&mut bucket, &mut now, Duration::from_micros(1));
        });
        assert_eq!(allowed, checks, "the allow bench must only take the allow path");
    });
    group.bench_function("drop", |b| {
        let mut now = Instant::now();
        // One per minute, spent at once; 1 ns steps refill one token per 60e9 checks, far
        // more than a run makes. The N1 notice check still fires once per fake second.
        let mut bucket = TokenBucket::per_minute(1, now);
        assert_eq!(bucket.check(now), Decision::Allow);
        let mut allowed = 0;
        b.iter(|| allowed += run_checks(&mut bucket, &mut now, Duration::from_nanos(1)));
        assert_eq!(allowed, 0, "the drop bench must only take the drop path");
    });
    group.finish();
}

/// A distinct IPv4 peer per `i` (below 2^24) in the `/8` network `net`.
fn peer(net: u8, i: u32, port: u16) -> SocketAddr {
    let [_, a, b, c] = i.to_be_bytes();
    SocketAddr::from(([net, a, b, c], port))
}

fn quarantine_lookup(c: &mut Criterion) {
    /// A fifth of the 100_000 default bound: `insert` copies the whole table, so filling
    /// one by one is quadratic (about 4 s here, against 2.5 min for 100_000).
    const ENTRIES: u32 = 20_000;
    /// Lookups per timed iteration, spread over the table so that they are not all served
    /// from one cache line.
    const PROBES: u32 = 1024;
    let t0 = Instant::now();
    // Filled on first use, so that filtering these benches out skips the fill.
    let table = OnceCell::new();
    let fill = || {
        let table = Quarantine::new(
            QuarantineBy::Ip,
            Duration::from_secs(300),
            1,
            Duration::ZERO,
            ENTRIES as usize,
        );
        for i in 0..ENTRIES {
            table.insert(peer(10, i, 40_000), t0);
        }
        assert_eq!(table.len(), ENTRIES as usize);
        table
    };
    // By IP, any port of a quarantined host matches.
    let hits: Vec<_> = (0..PROBES).map(|k| peer(10, k * (ENTRIES / PROBES), 50_000)).collect();
    let misses: Vec<_> = (0..PROBES).map(|k| peer(11, k * (ENTRIES / PROBES), 50_000)).collect();
    let now = t0 + Duration::from_secs(1);

    let mut group = c.benchmark_group("quarantine_lookup");
    group.throughput(Throughput::Elements(u64::from(PROBES)));
    for (name, probes, expected) in [("hit", &hits, PROBES), ("miss", &misses, 0)] {
        group.bench_function(format!("{name}_in_{ENTRIES}"), |b| {
            let table = table.get_or_init(fill);
            b.iter(|| {
                let found = probes
                    .iter()
                    .filter(|&&addr| table.contains(black_box(addr), now))
                    .count() as u32;
                assert_eq!(found, expected);
            })
        });
    }
    group.finish();
}

/// The allow/deny lookup on accept: 10,000 scattered /24 networks (every other /24 of
/// 10.0.0.0/8, so none merge), probed with addresses inside and between them.
fn netlist_lookup(c: &mut Criterion) {
    const ENTRIES: u32 = 10_000;
    const PROBES: u32 = 1024;
    let cidrs: Vec<String> = (0..ENTRIES)
        .map(|i| {
            let net = peer(10, i * 2 * 256, 0);
            format!("{}/24", net.ip())
        })
        .collect();
    let list = NetList::parse(cidrs.iter().map(String::as_str)).unwrap();
    let step = ENTRIES / PROBES;
    let hits: Vec<_> = (0..PROBES).map(|k| peer(10, k * step * 2 * 256 + 7, 0).ip()).collect();
    let misses: Vec<_> = (0..PROBES)
        .map(|k| peer(10, (k * step * 2 + 1) * 256 + 7, 0).ip())
        .collect();
    let mut group = c.benchmark_group("netlist_lookup");
    group.throughput(Throughput::Elements(u64::from(PROBES)));
    for (name, probes, expected) in [("hit", &hits, PROBES), ("miss", &misses, 0)] {
        group.bench_function(format!("{name}_in_{ENTRIES}"), |b| {
            b.iter(|| {
                let found = probes.iter().filter(|&&ip| list.contains(black_box(ip))).count() as u32;
                assert_eq!(found, expected);
            })
        });
    }
    group.finish();
}

fn fanout_enqueue(c: &mut Criterion) {
    const LINES: u64 = 64;
    /// Origins are connections 1..=4; recipient ids start above them, so every recipient
    /// takes the whole batch as one stretch of `LINES` envelopes.
    const FIRST_RECIPIENT: u64 = 1000;
    let line = "x".repeat(100);
    let mut builder = BatchBuilder::default();
    for i in 0..LINES {
        let origin = 1 + i / 16;
        builder.push(origin, &line, &format!("127.0.0.1:{}", 40_000 + origin));
    }
    let batch: LocalBatch = Ledger::detached().pin(Arc::new(builder.take()));
    let recipients = |n: u64| -> Vec<Client> {
        (0..n)
            // No socket: enqueueing never writes.
            .map(|i| {
                Client::new(
                    FIRST_RECIPIENT + i,
                    peer(127, i as u32 + 1, 50_000),
                    std::rc::Weak::new(),
                    Entry::new(),
                )
            })
            .collect()
    };
    let probe = &recipients(1)[0];
    probe.enqueue(&batch);
    assert_eq!(probe.queued_bytes(), batch.data.len());

    let mut group = c.benchmark_group("fanout_enqueue");
    for n in [1u64, 64, 1024] {
        group.throughput(Throughput::Elements(n * LINES));
        // Outboxes only grow here (no writer drains them), so each timed pass gets fresh,
        // idle clients; building and dropping them is outside the timing.
        group.bench_function(format!("recipients_{n}"), |b| {
            b.iter_batched(
                || recipients(n),
                |clients| {
                    for client in &clients {
                        client.enqueue(&batch);
                    }
                    clients
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// The end-to-end bench's relay config: no rate limit, no idle timeout, and no slow
/// consumer policy, so that a burst to receivers that are briefly descheduled on a small
/// machine is measured rather than throttled or cut off.
const RELAY_CONFIG: &str = r#"{
    "hyper_parameters": {
        "rate_limit_msgs_per_minute": null,
        "client_timeout_secs": null,
        "backpressure_policy": {
            "enable_throttle": false,
            "enable_flow_control": false,
            "enable_disconnect": false
        }
    }
}"#;
/// Longest wait for any one event from the relay or a receiver; past it the bench panics.
const LOOPBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The relay binary, running until this guard is dropped (also when a bench panics).
struct Relay {
    child: Child,
    config_path: PathBuf,
    /// Lines from the relay's stderr, read by a thread that drains the pipe until the
    /// process exits so that logging never blocks the relay.
    log: Receiver<String>,
}

impl Relay {
    fn start() -> Relay {
        let config_path = std::env::temp_dir().join(format!("corecast-bench-{}.json", std::process::id()));
        std::fs::write(&config_path, RELAY_CONFIG).expect("cannot write the bench relay config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_corecast"));
        command
            .arg("--config")
            .arg(&config_path)
            .args(["--port", "0", "--shards", "1", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent. It
        // kills the relay if the bench process dies without unwinding (Ctrl-C, abort).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("cannot start the corecast binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Keep draining after the bench stops listening.
                let _ = tx.send(line);
            }
        });
        Relay {
            child,
            config_path,
            log,
        }
    }

    /// Reads log lines until one contains `needle`; returns the text that follows it.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + LOOPBACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(needle) {
                        return line[at + needle.len()..].to_string();
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("relay did not log {needle:?} within {LOOPBACK_TIMEOUT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("relay exited before logging {needle:?}"),
            }
        }
    }

    fn listening_addr(&self) -> SocketAddr {
        let rest = self.wait_for("listening on ");
        let addr = rest.split_whitespace().next().unwrap_or_default();
        addr.parse()
            .unwrap_or_else(|_| panic!("cannot parse the relay's address from {rest:?}"))
    }

    /// Waits until the relay has registered a client from each of `addrs`.
    fn wait_for_clients(&self, addrs: &[SocketAddr]) {
        let mut pending: HashSet<String> = addrs.iter().map(SocketAddr::to_string).collect();
        while !pending.is_empty() {
            let rest = self.wait_for("client connected: ");
            pending.remove(rest.split_whitespace().next().unwrap_or_default());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Kills this child by its PID; nothing else.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// One sender and some receivers connected to a running relay. Reader threads live for
/// the whole bench; each reports once per `lines` newlines it has read.
struct Loopback {
    sender: TcpStream,
    burst: Vec<u8>,
    receivers: Vec<TcpStream>,
    /// One message per receiver per completed burst; `Err` when its stream failed.
    done: Receiver<Result<(), String>>,
    readers: Vec<JoinHandle<()>>,
    /// Kept only to be dropped last, after the readers have been stopped and joined.
    _relay: Relay,
}

impl Loopback {
    fn start(receivers: usize, lines: usize, line_bytes: usize) -> Loopback {
        let relay = Relay::start();
        let addr = relay.listening_addr();
        let connect = || {
            let s = TcpStream::connect(addr).expect("cannot connect to the relay");
            s.set_nodelay(true).expect("set_nodelay");
            s.set_read_timeout(Some(LOOPBACK_TIMEOUT)).expect("set_read_timeout");
            s
        };
        let sender = connect();
        let receivers: Vec<TcpStream> = (0..receivers).map(|_| connect()).collect();
        let mut locals = vec![sender.local_addr().expect("local_addr")];
        locals.extend(receivers.iter().map(|r| r.local_addr().expect("local_addr")));
        relay.wait_for_clients(&locals);

        let (tx, done) = mpsc::channel();
        let readers = receivers
            .iter()
            .map(|r| {
                let mut stream = r.try_clone().expect("cannot clone a receiver stream");
                let tx = tx.clone();
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut newlines = 0;
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => newlines += buf[..n].iter().filter(|&&b| b == b'\n').count(),
                            Err(e) => {
                                let _ = tx.send(Err(format!("receiver read failed: {e}")));
                                return;
                            }
                        }
                        while newlines >= lines {
                            newlines -= lines;
                            if tx.send(Ok(())).is_err() {
                                return;
                            }
                        }
                    }
                })
            })
            .collect();

        let mut burst = Vec::with_capacity(lines * (line_bytes + 1));
        for i in 0..lines {
            let line = format!("{i:08} {}", "y".repeat(line_bytes - 9));
            burst.extend_from_slice(line.as_bytes());
            burst.push(b'\n');
        }
        Loopback {
            sender,
            burst,
            receivers,
            done,
            readers,
            _relay: relay,
        }
    }

    /// Sends one burst and waits until every receiver has all of it.
    fn round(&mut self) {
        self.sender.write_all(&self.burst).expect("sender write failed");
        for _ in 0..self.receivers.len() {
            match self.done.recv_timeout(LOOPBACK_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("receivers did not get a burst within {LOOPBACK_TIMEOUT:?}"),
            }
        }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        // Ends each reader's blocking read at once, then waits for the threads.
        for r in &self.receivers {
            let _ = r.shutdown(Shutdown::Both);
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        // `_relay` drops after this, killing the process.
    }
}

fn loopback_fanout(c: &mut Criterion) {
    const RECEIVERS: usize = 8;
    const LINES: usize = 1000;
    const LINE_BYTES: usize = 100;
    let mut group = c.benchmark_group("loopback_fanout");
    group.throughput(Throughput::Elements((RECEIVERS * LINES) as u64));
    // Each iteration is a few milliseconds of real I/O; ten samples are enough.
    group.sample_size(10);
    // Started on first use, so that filtering this bench out starts no process; the guard
    // drops at the end of this function or while a panic unwinds through it.
    let mut fixture: Option<Loopback> = None;
    group.bench_function("1_sender_8_receivers_1000_lines_of_100_bytes", |b| {
        let loopback = fixture.get_or_insert_with(|| Loopback::start(RECEIVERS, LINES, LINE_BYTES));
        b.iter(|| loopback.round())
    });
    group.finish();
    drop(fixture);
}

/// What one `send` of a given size costs on a loopback TCP socket whose peer drains it on
/// another thread: the part of every delivery that no relay code can avoid. Per-write
/// overhead dominates small sends, copying dominates large ones.
fn loopback_send(c: &mut Criterion) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    let mut writer = TcpStream::connect(listener.local_addr().expect("local_addr")).expect("connect");
    writer.set_nodelay(true).expect("set_nodelay");
    let (mut reader, _) = listener.accept().expect("accept");
    let drain = thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut group = c.benchmark_group("loopback_send");
    for size in [700usize, 4 << 10, 16 << 10, 32 << 10, 64 << 10] {
        let data = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size}_bytes"), |b| {
            b.iter(|| writer.write_all(&data).expect("loopback write"))
        });
    }
    group.finish();
    let _ = writer.shutdown(Shutdown::Both);
    let _ = drain.join();
}

/// The tick the shard sleeps to in these benches: the default flush window's eighth.
const TICK: Duration = Duration::from_micros(187);

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `sleeps` sleeps of one tick on a fresh glommio executor with a shard's
/// `io_memory` (the rest at glommio's defaults), the glommio way (`timer::sleep`, which
/// parks the reactor) or by blocking the thread, and returns the CPU time the executor's
/// thread used for them.
fn cpu_for_tick_sleeps(sleeps: u64, glommio_timer: bool) -> Duration {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(corecast::machine::IO_MEMORY_BYTES)
        .spawn(move || async move {
            let before = thread_cpu_time();
            for _ in 0..sleeps {
                if glommio_timer {
                    glommio::timer::sleep(TICK).await;
                } else {
                    thread::sleep(TICK);
                }
            }
            thread_cpu_time() - before
        })
        .expect("start a glommio executor")
        .join()
        .expect("executor thread")
}

/// What a shard's CPU pays per wake-up, apart from the work it wakes for. The reported
/// time is the sleeping thread's **CPU time** per sleep of one tick, not wall time: a busy
/// shard wakes at up to every tick, so this times the tick rate is its floor. Sleeping in
/// the thread (`std::thread::sleep`) is the comparison: the difference is glommio's
/// reactor (several `io_uring_enter` calls and timer re-arms per park).
fn shard_wakeup(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_wakeup_cpu");
    // Criterion plans iterations from the CPU time returned, but each one also sleeps a
    // tick of wall time; keep the plan short.
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(200));
    group.measurement_time(Duration::from_millis(300));
    group.throughput(Throughput::Elements(1));
    for (name, glommio_timer) in [("glommio_timer_sleep_187us", true), ("thread_sleep_187us", false)] {
        group.bench_function(name, |b| {
            b.iter_custom(|sleeps| cpu_for_tick_sleeps(sleeps, glommio_timer))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    envelope_encoding,
    line_framing,
    batch_building,
    relay_delay,
    token_bucket,
    quarantine_lookup,
    netlist_lookup,
    fanout_enqueue,
    loopback_fanout,
    loopback_send,
    shard_wakeup
);
criterion_main!(benches);
