//! The physical anchor of a comparison (issue 26): what a loopback send costs on this
//! machine right now, and from it the least CPU per delivery any relay could spend on a
//! workload at a latency bound. `compare` measures it before every round and reports each
//! server's CPU per delivery as a multiple of that least.
//!
//! The probe ([`measure`]) connects `sockets` loopback TCP pairs (`TCP_NODELAY`), has one
//! reader thread drain them all through epoll (as the generator's receiving thread does),
//! and a sending thread write bursts of one send to each socket, like a relay's write pass,
//! sleeping between bursts so that the reader is asleep when each burst starts. It counts
//! the sending thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`) per send at two sizes and
//! fits `cost(bytes) = a + b·bytes`. It is bounded (a few thousand sends per size, a few
//! hundred ms at most on an idle machine), closes its sockets and joins its threads before
//! it returns.
//!
//! Then, on the same sockets, it measures the *fan-out floor* ([`FanoutFloor`]): lines of
//! the small size, each sent to every socket in turn once the reader has read the last one
//! and gone back to sleep, each send carrying the time its line started. The reader notes
//! when each arrives. Their p99 is the latency of one line relayed alone to that many
//! recipients by a relay that costs nothing but its sends: no relay on this machine, with
//! this many recipients, can have a lower p99 at any load.
//!
//! The least ([`least_ns_per_delivery`]) is `w·a + b·E` ns per delivery: `w` writes per
//! delivery ([`writes_per_delivery`]), each paying the fixed cost `a`, and every delivered
//! envelope of `E` bytes paying `b` per byte once, however writes group it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::measure::{median, pin_current_thread};
use crate::proto::{self, Header, HEADER_LEN};

/// The small send: about one envelope of a 100-byte line (147 B).
pub const SMALL_BYTES: usize = 150;
/// The large send: several envelopes coalesced into one write.
pub const LARGE_BYTES: usize = 16384;
/// At most this many socket pairs (2 descriptors each), whatever the workload's clients.
pub const MAX_SOCKETS: usize = 1000;
/// Sends per size and repeat that [`Probe::for_recipients`] aims at.
const SENDS_PER_REPEAT: usize = 2000;
/// The sender's pause between bursts: long enough for the reader to go back to sleep.
const BURST_GAP: Duration = Duration::from_millis(1);
/// A write that cannot go out within this long fails the probe instead of hanging it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The reader gives up this long after it started, whatever happened to the sender.
const READER_DEADLINE: Duration = Duration::from_secs(30);
/// The `remote_addr` of the envelope the least is computed for: as long as a loopback
/// address with an ephemeral port gets.
const ENVELOPE_ADDR: &str = "127.0.0.1:65535";

/// What one probe measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SendCost {
    /// Socket pairs, one send to each per burst.
    pub sockets: usize,
    /// Bursts per size and repeat.
    pub bursts: usize,
    /// Repeats of (small, large); each size's cost is the median of its repeats.
    pub repeats: usize,
    pub small_bytes: usize,
    /// The sender's CPU per small send, ns.
    pub small_ns: f64,
    pub large_bytes: usize,
    pub large_ns: f64,
    /// The fit `cost(bytes) = a + b·bytes`: the fixed cost of a send, ns.
    pub a_ns: f64,
    /// ... and its cost per byte, ns.
    pub b_ns_per_byte: f64,
}

/// The fan-out floor: when one line, sent to every socket in turn with nothing else
/// running, reached the reader, from the start of its first send.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FanoutFloor {
    /// Lines sent, each to every socket.
    pub lines: usize,
    /// Deliveries timed (lines × sockets).
    pub deliveries: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// A workload's least CPU per delivery at a latency bound, from one probe.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Least {
    pub latency_bound_ms: f64,
    /// Lines each recipient receives per second.
    pub lines_per_s_per_recipient: f64,
    /// The fewest writes per delivery that meet the bound ([`writes_per_delivery`]).
    pub writes_per_delivery: f64,
    /// Bytes of one envelope as corecast writes it for the workload's lines.
    pub envelope_bytes: usize,
    /// `writes_per_delivery · a + b · envelope_bytes`.
    pub ns_per_delivery: f64,
}

/// One round's probe in a comparison, and the least it gives the round's workload.
#[derive(Debug, Clone, Serialize)]
pub struct AnchorRound {
    pub workload: String,
    /// From 0, as the runs' `round`.
    pub round: usize,
    pub send_cost: SendCost,
    pub floor: FanoutFloor,
    /// None for an unpaced workload (rate 0): its lines per second are not known ahead.
    pub least: Option<Least>,
}

/// How a probe runs.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub sockets: usize,
    pub bursts: usize,
    pub repeats: usize,
    /// CPU of the sending thread (the server's in `compare`).
    pub sender_cpu: Option<usize>,
    /// CPU of the reading thread (the generator's in `compare`).
    pub reader_cpu: Option<usize>,
}

impl Probe {
    /// The probe for a workload with `recipients` receiving clients: one socket per
    /// recipient (at most [`MAX_SOCKETS`]), about [`SENDS_PER_REPEAT`] sends per size and
    /// repeat in 4 to 50 bursts, three repeats.
    pub fn for_recipients(recipients: usize, sender_cpu: Option<usize>, reader_cpu: Option<usize>) -> Probe {
        let sockets = recipients.clamp(1, MAX_SOCKETS);
        Probe {
            sockets,
            bursts: SENDS_PER_REPEAT.div_ceil(sockets).clamp(4, 50),
            repeats: 3,
            sender_cpu,
            reader_cpu,
        }
    }
}

/// The fewest writes per delivery for a recipient that receives `lines_per_s` lines a
/// second (Poisson arrivals) when every line must be written within `bound_s`: the best a
/// relay can do is to write when its oldest waiting line reaches the bound, so each write
/// carries that line and the `x = lines_per_s · bound_s` that arrive on average while it
/// waits, `1 / (1 + x)` writes per line. 1 when nothing arrives.
pub fn writes_per_delivery(lines_per_s: f64, bound_s: f64) -> f64 {
    let x = lines_per_s * bound_s;
    if x > 0.0 && x.is_finite() {
        1.0 / (1.0 + x)
    } else {
        1.0
    }
}

/// The line through (small bytes, ns) and (large bytes, ns): `(a, b)` with
/// `cost = a + b·bytes`. A negative slope (noise: the large send measured cheaper) is
/// taken as 0 and a negative intercept as 0, so the least is never below zero.
pub fn fit(small: (f64, f64), large: (f64, f64)) -> (f64, f64) {
    let slope = (large.1 - small.1) / (large.0 - small.0);
    let b = if slope.is_finite() { slope.max(0.0) } else { 0.0 };
    ((small.1 - b * small.0).max(0.0), b)
}

/// The least CPU per delivery at the bound: `w` writes per delivery of the fixed cost
/// `a`, plus every envelope byte once at `b`.
pub fn least_ns_per_delivery(cost: &SendCost, writes_per_delivery: f64, envelope_bytes: usize) -> f64 {
    writes_per_delivery * cost.a_ns + cost.b_ns_per_byte * envelope_bytes as f64
}

impl Least {
    /// The least for a workload whose recipients each receive `lines_per_s_per_recipient`
    /// lines of `size` payload bytes a second, at `latency_bound_ms`, with `cost`.
    pub fn of(cost: &SendCost, lines_per_s_per_recipient: f64, size: usize, latency_bound_ms: f64) -> Least {
        let writes = writes_per_delivery(lines_per_s_per_recipient, latency_bound_ms / 1000.0);
        let envelope_bytes = envelope_bytes(size);
        Least {
            latency_bound_ms,
            lines_per_s_per_recipient,
            writes_per_delivery: writes,
            envelope_bytes,
            ns_per_delivery: least_ns_per_delivery(cost, writes, envelope_bytes),
        }
    }
}

/// Bytes of the envelope corecast writes for a generator line of `size` payload bytes
/// (raised to the header's length, as the generator does).
pub fn envelope_bytes(size: usize) -> usize {
    let mut payload = Vec::new();
    let widest = Header {
        publisher: u32::MAX,
        seq: u64::MAX,
        sched_ns: u64::MAX,
    };
    proto::write_payload(&mut payload, widest, size.max(HEADER_LEN));
    let line = String::from_utf8_lossy(&payload);
    let mut envelope = Vec::new();
    corecast::protocol::encode_envelope(&mut envelope, &line, ENVELOPE_ADDR);
    envelope.len()
}

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The `p`-th percentile (0–100) of `sorted` (ascending, not empty), nearest rank.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs the probe: sets up the pairs, measures the send cost and then the fan-out floor,
/// and closes everything before returning.
pub fn measure(probe: &Probe) -> Result<(SendCost, FanoutFloor), String> {
    if probe.sockets == 0 || probe.bursts == 0 || probe.repeats == 0 {
        return Err("the send-cost probe needs at least one socket, burst and repeat".into());
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("send-cost probe: cannot listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut senders = Vec::with_capacity(probe.sockets);
    let mut receivers = Vec::with_capacity(probe.sockets);
    for _ in 0..probe.sockets {
        let s = TcpStream::connect(addr).map_err(|e| format!("send-cost probe: cannot connect: {e}"))?;
        let (r, _) = listener
            .accept()
            .map_err(|e| format!("send-cost probe: cannot accept: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(|e| e.to_string())?;
        // Room for a few large sends, so a send never waits for the reader.
        socket2::SockRef::from(&s)
            .set_send_buffer_size(4 * LARGE_BYTES)
            .map_err(|e| e.to_string())?;
        r.set_nonblocking(true).map_err(|e| e.to_string())?;
        senders.push(s);
        receivers.push(r);
    }
    drop(listener);

    let epoch = Instant::now();
    let timed = Arc::new(AtomicUsize::new(0));
    let reader_cpu = probe.reader_cpu;
    let cost_bytes = cost_phase_bytes(probe);
    let reader_timed = timed.clone();
    let reader = thread::Builder::new()
        .name("send-cost-reader".into())
        .spawn(move || read_until_closed(receivers, reader_cpu, cost_bytes, epoch, &reader_timed))
        .map_err(|e| format!("send-cost probe: cannot start the reader: {e}"))?;
    let p = *probe;
    let sender = thread::Builder::new()
        .name("send-cost-sender".into())
        .spawn(move || {
            let result = send_bursts(&mut senders, &p).and_then(|costs| {
                send_lines(&mut senders, p.bursts, epoch, &timed)?;
                Ok(costs)
            });
            // The reader ends when every socket has reached EOF, also after an error.
            for s in &senders {
                let _ = s.shutdown(Shutdown::Write);
            }
            result
        })
        .map_err(|e| format!("send-cost probe: cannot start the sender: {e}"))?;
    let costs = sender
        .join()
        .map_err(|_| "send-cost probe: the sender panicked".to_string())?;
    let read = reader
        .join()
        .map_err(|_| "send-cost probe: the reader panicked".to_string())?;
    let (small_ns, large_ns) = costs?;
    let mut latencies = read?;
    if latencies.len() != probe.bursts * probe.sockets {
        return Err(format!(
            "send-cost probe: {} of {} fan-out deliveries arrived",
            latencies.len(),
            probe.bursts * probe.sockets
        ));
    }
    latencies.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let floor = FanoutFloor {
        lines: probe.bursts,
        deliveries: latencies.len(),
        p50_us: us(percentile(&latencies, 50.0)),
        p99_us: us(percentile(&latencies, 99.0)),
        max_us: us(latencies[latencies.len() - 1]),
    };
    let (a_ns, b_ns_per_byte) = fit((SMALL_BYTES as f64, small_ns), (LARGE_BYTES as f64, large_ns));
    let cost = SendCost {
        sockets: probe.sockets,
        bursts: probe.bursts,
        repeats: probe.repeats,
        small_bytes: SMALL_BYTES,
        small_ns,
        large_bytes: LARGE_BYTES,
        large_ns,
        a_ns,
        b_ns_per_byte,
    };
    Ok((cost, floor))
}

/// Bytes each socket receives in the send-cost phase ([`send_bursts`]): what the reader
/// skips before the fan-out floor's lines begin.
fn cost_phase_bytes(p: &Probe) -> u64 {
    let pair = (SMALL_BYTES + LARGE_BYTES) as u64;
    pair + (p.repeats * p.bursts) as u64 * pair
}

/// The sending thread: one warm-up burst per size, then `repeats` times `bursts` bursts
/// of the small size and `bursts` of the large one; returns each size's median CPU per send.
fn send_bursts(senders: &mut [TcpStream], p: &Probe) -> Result<(f64, f64), String> {
    if let Some(cpu) = p.sender_cpu {
        pin_current_thread(cpu);
    }
    let buf = vec![b'x'; LARGE_BYTES];
    let burst = |senders: &mut [TcpStream], bytes: usize| -> Result<u64, String> {
        thread::sleep(BURST_GAP);
        let start = thread_cpu_ns();
        for s in senders.iter_mut() {
            s.write_all(&buf[..bytes])
                .map_err(|e| format!("send-cost probe: a send failed: {e}"))?;
        }
        Ok(thread_cpu_ns() - start)
    };
    for bytes in [SMALL_BYTES, LARGE_BYTES] {
        burst(senders, bytes)?;
    }
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for _ in 0..p.repeats {
        for (bytes, out) in [(SMALL_BYTES, &mut small), (LARGE_BYTES, &mut large)] {
            let mut ns = 0;
            for _ in 0..p.bursts {
                ns += burst(senders, bytes)?;
            }
            out.push(ns as f64 / (p.bursts * senders.len()) as f64);
        }
    }
    // Each has one value per repeat, and there is at least one repeat.
    Ok((median(small).unwrap_or(f64::NAN), median(large).unwrap_or(f64::NAN)))
}

/// The fan-out floor's sending side: `lines` lines of [`SMALL_BYTES`], each sent to every
/// socket in turn and stamped with the time (ns since `epoch`) its first send began. A line
/// goes out once the reader has timed every earlier delivery (`timed`) and then slept for
/// [`BURST_GAP`], so that each is relayed alone to a reader that is asleep.
fn send_lines(senders: &mut [TcpStream], lines: usize, epoch: Instant, timed: &AtomicUsize) -> Result<(), String> {
    let mut line = [b'x'; SMALL_BYTES];
    for i in 0..lines {
        let earlier = i * senders.len();
        let deadline = Instant::now() + WRITE_TIMEOUT;
        while timed.load(Ordering::Acquire) < earlier {
            if Instant::now() > deadline {
                return Err(format!(
                    "send-cost probe: line {i} of the fan-out floor was not read in time"
                ));
            }
            thread::sleep(Duration::from_micros(100));
        }
        thread::sleep(BURST_GAP);
        let sent = epoch.elapsed().as_nanos() as u64;
        line[..8].copy_from_slice(&sent.to_le_bytes());
        for s in senders.iter_mut() {
            s.write_all(&line)
                .map_err(|e| format!("send-cost probe: a send failed: {e}"))?;
        }
    }
    Ok(())
}

/// One socket's stream as the reader sees it: [`cost_phase_bytes`] to skip, then lines of
/// [`SMALL_BYTES`] whose first 8 bytes are the time their line was sent.
#[derive(Debug)]
struct FloorStream {
    skip: u64,
    /// Bytes seen so far.
    seen: u64,
    /// The current line's stamp as far as it arrived.
    stamp: [u8; 8],
}

impl FloorStream {
    fn new(skip: u64) -> FloorStream {
        FloorStream {
            skip,
            seen: 0,
            stamp: [0; 8],
        }
    }

    /// Takes `bytes` that arrived at `now` (ns since the epoch); pushes the latency of each
    /// line whose stamp they complete onto `out`.
    fn feed(&mut self, mut bytes: &[u8], now: u64, out: &mut Vec<u64>) {
        while !bytes.is_empty() {
            if self.seen < self.skip {
                let n = bytes.len().min((self.skip - self.seen) as usize);
                bytes = &bytes[n..];
                self.seen += n as u64;
                continue;
            }
            let at = ((self.seen - self.skip) % SMALL_BYTES as u64) as usize;
            let n = bytes.len().min(SMALL_BYTES - at);
            if at < 8 {
                let stamp = n.min(8 - at);
                self.stamp[at..at + stamp].copy_from_slice(&bytes[..stamp]);
                if at + stamp == 8 {
                    out.push(now.saturating_sub(u64::from_le_bytes(self.stamp)));
                }
            }
            bytes = &bytes[n..];
            self.seen += n as u64;
        }
    }
}

/// The reading thread: drains every socket through one epoll set (mio, edge-triggered)
/// until each has reached EOF, or fails at [`READER_DEADLINE`]. Returns the latency (ns)
/// of every fan-out floor delivery, counting them in `timed` as they arrive.
fn read_until_closed(
    receivers: Vec<TcpStream>,
    cpu: Option<usize>,
    cost_bytes: u64,
    epoch: Instant,
    timed: &AtomicUsize,
) -> Result<Vec<u64>, String> {
    if let Some(cpu) = cpu {
        pin_current_thread(cpu);
    }
    let err = |e: std::io::Error| format!("send-cost probe: reader: {e}");
    let mut poll = mio::Poll::new().map_err(err)?;
    let mut open: Vec<Option<(mio::net::TcpStream, FloorStream)>> = Vec::with_capacity(receivers.len());
    for (i, r) in receivers.into_iter().enumerate() {
        let mut r = mio::net::TcpStream::from_std(r);
        poll.registry()
            .register(&mut r, mio::Token(i), mio::Interest::READABLE)
            .map_err(err)?;
        open.push(Some((r, FloorStream::new(cost_bytes))));
    }
    let mut latencies = Vec::new();
    let mut left = open.len();
    let mut events = mio::Events::with_capacity(1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + READER_DEADLINE;
    while left > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "send-cost probe: {left} sockets still open after {READER_DEADLINE:?}"
            ));
        }
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        }
        for ev in events.iter() {
            let slot = &mut open[ev.token().0];
            let Some((stream, floor)) = slot.as_mut() else { continue };
            // Edge-triggered: read until the socket is empty.
            let closed = loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break true,
                    Ok(n) => {
                        let before = latencies.len();
                        floor.feed(&chunk[..n], epoch.elapsed().as_nanos() as u64, &mut latencies);
                        timed.fetch_add(latencies.len() - before, Ordering::Release);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break true,
                }
            };
            if closed {
                *slot = None;
                left -= 1;
            }
        }
    }
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn writes_per_delivery_is_one_when_lines_are_rare_and_one_per_bound_when_they_are_many() {
        // T100x30 at 1 ms: 99 × 30 lines/s, x = 2.97.
        let w = writes_per_delivery(2970.0, 0.001);
        assert!(close(w, 1.0 / 3.97), "{w}");
        assert!((w - 0.2519).abs() < 1e-4, "{w}");
        // Rare lines: almost every line needs its own write.
        assert!(writes_per_delivery(1.0, 0.001) > 0.998);
        assert!(writes_per_delivery(1e-12, 0.001) <= 1.0);
        assert_eq!(writes_per_delivery(0.0, 0.001), 1.0);
        // Many lines: one write per bound carries them all.
        assert!(close(writes_per_delivery(1e6, 0.001), 1.0 / 1001.0));
        // A tighter bound needs more writes.
        assert!(writes_per_delivery(2970.0, 0.0005) > w);
    }

    #[test]
    fn the_fit_goes_through_both_sizes_and_never_goes_negative() {
        let (a, b) = fit((150.0, 4150.0), (16384.0, 7396.8));
        assert!(close(b, 0.2), "{b}");
        assert!(close(a, 4120.0), "{a}");
        assert!(close(a + b * 16384.0, 7396.8));
        // The large send measured cheaper (noise): no cost per byte.
        assert_eq!(fit((150.0, 5000.0), (16384.0, 4000.0)), (5000.0, 0.0));
        // A slope steep enough to put the intercept below zero: a fixed cost of 0.
        assert_eq!(fit((150.0, 100.0), (250.0, 300.0)), (0.0, 2.0));
    }

    #[test]
    fn the_least_is_writes_times_the_fixed_cost_plus_the_envelope_bytes() {
        // The envelope of a 100-byte line: {"content":"<100>","remote_addr":"127.0.0.1:65535"}\n
        assert_eq!(envelope_bytes(100), 12 + 100 + 17 + 15 + 3);
        assert_eq!(envelope_bytes(10), envelope_bytes(HEADER_LEN));
        let cost = SendCost {
            sockets: 100,
            bursts: 20,
            repeats: 3,
            small_bytes: SMALL_BYTES,
            small_ns: 4150.0,
            large_bytes: LARGE_BYTES,
            large_ns: 7396.8,
            a_ns: 4120.0,
            b_ns_per_byte: 0.2,
        };
        let least = Least::of(&cost, 2970.0, 100, 1.0);
        let w = writes_per_delivery(2970.0, 0.001);
        assert!(close(least.ns_per_delivery, w * 4120.0 + 0.2 * 147.0));
        assert_eq!(least.envelope_bytes, 147);
        assert!(close(least.writes_per_delivery, w));
        // About 1.07 µs: 0.252 writes per delivery at 4.12 µs, plus 29 ns for the bytes.
        assert!((1050.0..1090.0).contains(&least.ns_per_delivery), "{least:?}");
    }

    #[test]
    fn a_real_probe_over_loopback_returns_a_positive_finite_cost() {
        let probe = Probe {
            sockets: 3,
            bursts: 4,
            repeats: 1,
            sender_cpu: None,
            reader_cpu: None,
        };
        let (cost, floor) = measure(&probe).unwrap();
        for v in [cost.small_ns, cost.large_ns, cost.a_ns] {
            assert!(v.is_finite() && v > 0.0, "{cost:?}");
        }
        assert!(cost.b_ns_per_byte.is_finite() && cost.b_ns_per_byte >= 0.0, "{cost:?}");
        assert_eq!((cost.sockets, cost.small_bytes, cost.large_bytes), (3, 150, 16384));
        // Every delivery of the fan-out floor's 4 lines to 3 sockets was timed.
        assert_eq!((floor.lines, floor.deliveries), (4, 12), "{floor:?}");
        assert!(floor.p50_us > 0.0 && floor.p50_us <= floor.p99_us, "{floor:?}");
        assert!(floor.p99_us <= floor.max_us && floor.max_us.is_finite(), "{floor:?}");
        assert!(measure(&Probe { sockets: 0, ..probe }).is_err());
    }

    #[test]
    fn the_floor_reader_skips_the_cost_phase_and_times_each_line_by_its_stamp() {
        let line = |sent: u64| {
            let mut l = vec![b'x'; SMALL_BYTES];
            l[..8].copy_from_slice(&sent.to_le_bytes());
            l
        };
        let mut stream = vec![b'y'; 1000];
        stream.extend(line(5_000));
        stream.extend(line(9_000));
        stream.extend(line(20_000));
        // Whole, and in pieces that split the skipped part, the stamps and the lines.
        for piece in [stream.len(), 1, 3, 7, 149, 151, 997] {
            let mut f = FloorStream::new(1000);
            let mut out = Vec::new();
            for (i, chunk) in stream.chunks(piece).enumerate() {
                f.feed(chunk, 30_000 + i as u64, &mut out);
            }
            assert_eq!(out.len(), 3, "pieces of {piece}");
            // Each line is timed by the read that completed its stamp.
            let done = |offset: usize| 30_000 + ((offset + 7) / piece) as u64;
            let want = [done(1000) - 5_000, done(1150) - 9_000, done(1300) - 20_000];
            assert_eq!(out, want, "pieces of {piece}");
        }
        assert_eq!(
            cost_phase_bytes(&Probe::for_recipients(100, None, None)),
            (1 + 3 * 20) * (150 + 16384)
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=200).collect();
        assert_eq!(percentile(&v, 50.0), 100);
        assert_eq!(percentile(&v, 99.0), 198);
        assert_eq!(percentile(&v, 100.0), 200);
        assert_eq!(percentile(&[7], 99.0), 7);
    }
}
