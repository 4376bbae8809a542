//! The generator's worker threads. Each owns a share of the connections and runs one mio
//! event loop: publishers append lines at their scheduled times (open loop: a late send
//! keeps its scheduled time, so latency includes any queueing the server caused),
//! receivers decode what arrives, account for every (receiver, publisher) sequence and
//! record latency in an HDR histogram. The main thread moves the shared [`Control`]
//! through the phases: sync (wait until every receiver is subscribed), run, stop.

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::accounting::{Arrival, SeqTracker};
use crate::proto::{self, Event, Header, Protocol, SYNC_PREFIX};

pub const PHASE_SYNC: u8 = 0;
pub const PHASE_RUN: u8 = 1;
pub const PHASE_STOP: u8 = 2;

/// Bytes a publisher may have queued unsent before it skips sends (bounds our memory when
/// the server stops reading; skipped lines are not counted as sent).
const MAX_PENDING_BYTES: usize = 64 << 20;
/// With `--rate 0`, lines appended per round while the socket keeps up.
const UNPACED_BURST: usize = 64;
const UNPACED_PENDING_BYTES: usize = 256 << 10;
/// Latency histogram range: 1 µs to 60 s, 3 significant digits.
const HIST_MAX_US: u64 = 60_000_000;

/// Read-only description of the workload, shared by all threads.
pub struct Plan {
    pub protocol: Protocol,
    pub clients: usize,
    pub publishers: usize,
    /// Lines per second per publisher; 0 = as fast as the socket takes them.
    pub rate: f64,
    pub size: usize,
    /// Clients `[clients - slow, clients)` never read (slow-consumer scenario).
    pub slow: usize,
    /// Time zero for every timestamp in a payload.
    pub epoch: Instant,
}

impl Plan {
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn counted_receivers(&self) -> usize {
        self.clients - self.slow
    }
}

/// Shared progress, written by workers and read by the main thread.
pub struct Control {
    pub phase: AtomicU8,
    pub start_ns: AtomicU64,
    pub warmup_end_ns: AtomicU64,
    pub send_end_ns: AtomicU64,
    /// Receivers known to be subscribed.
    pub subscribed: AtomicUsize,
    /// Unique deliveries so far (all phases).
    pub delivered: AtomicU64,
    /// Lines sent so far, per publisher.
    pub sent: Box<[AtomicU64]>,
    pub errors: Mutex<Vec<String>>,
}

impl Control {
    pub fn new(publishers: usize) -> Self {
        Control {
            phase: AtomicU8::new(PHASE_SYNC),
            start_ns: AtomicU64::new(u64::MAX),
            warmup_end_ns: AtomicU64::new(u64::MAX),
            send_end_ns: AtomicU64::new(u64::MAX),
            subscribed: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            sent: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            errors: Mutex::new(Vec::new()),
        }
    }

    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < 20 {
            errors.push(e);
        }
    }
}

/// One connection as handed to a worker.
pub struct Conn {
    pub client: usize,
    pub stream: TcpStream,
    /// This connection receives (all but Redis publisher connections).
    pub receives: bool,
    /// This connection publishes as this publisher id.
    pub publishes: Option<u32>,
    /// Sends SYNC probes during the sync phase (Summoner only).
    pub probes: bool,
    /// Bytes to send first (subscription, CONNECT).
    pub hello: Vec<u8>,
}

struct Live {
    conn: Conn,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    subscribed: bool,
    closed: bool,
    trackers: Vec<SeqTracker>,
}

/// One publisher's schedule, on the connection `conn` (an index into the worker's list).
struct Publisher {
    conn: usize,
    id: u32,
    /// Next sequence number.
    seq: u64,
    /// When the next line is due, in ns since the epoch.
    next_due: u64,
}

impl Publisher {
    /// Appends the next line, stamped with its scheduled time.
    fn append(&mut self, plan: &Plan, out: &mut Vec<u8>, payload: &mut Vec<u8>, sched_ns: u64) {
        payload.clear();
        let header = Header {
            publisher: self.id,
            seq: self.seq,
            sched_ns,
        };
        proto::write_payload(payload, header, plan.size);
        plan.protocol.publish(out, payload);
        self.seq += 1;
    }
}

/// What a worker hands back.
pub struct Report {
    pub latency: Histogram<u64>,
    /// Per second since the start: deliveries and their latency.
    pub timeline: Vec<(u64, Histogram<u64>)>,
    /// Per counted receiver: its client index and its trackers, indexed by publisher.
    pub trackers: Vec<(usize, Vec<SeqTracker>)>,
    /// Deliveries of lines scheduled inside the measured window.
    pub delivered_in_window: u64,
    pub notices: u64,
    /// Connections the server closed during the run.
    pub closed_by_server: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

/// Runs one worker until the main thread sets `PHASE_STOP`.
pub fn run_worker(plan: Arc<Plan>, control: Arc<Control>, conns: Vec<Conn>) -> Report {
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            control.error(format!("cannot create a poller: {e}"));
            return empty_report();
        }
    };
    let mut live: Vec<Live> = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns.into_iter().enumerate() {
        let slow = conn.receives && conn.client >= plan.counted_receivers();
        let interest = if slow {
            Interest::WRITABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        if let Err(e) = poll.registry().register(&mut conn.stream, Token(i), interest) {
            control.error(format!("cannot register a connection: {e}"));
        }
        if slow || (conn.receives && plan.protocol == Protocol::Summoner && plan.publishers == 0) {
            // Nothing will confirm these: slow ones never read, and with no publishers
            // there are no SYNC probes. Count them as subscribed.
            control.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        let trackers = if conn.receives && !slow {
            vec![SeqTracker::default(); plan.publishers]
        } else {
            Vec::new()
        };
        let wbuf = std::mem::take(&mut conn.hello);
        live.push(Live {
            conn,
            rbuf: Vec::new(),
            wbuf,
            wpos: 0,
            subscribed: slow,
            closed: false,
            trackers,
        });
    }
    let mut report = empty_report();
    let interval_ns = if plan.rate > 0.0 { (1e9 / plan.rate) as u64 } else { 0 };
    let mut pubs: Vec<Publisher> = live
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            l.conn.publishes.map(|id| Publisher {
                conn: i,
                id,
                seq: 0,
                next_due: 0,
            })
        })
        .collect();
    let mut scheduled = false;
    let mut last_probe = 0u64;
    let mut events = Events::with_capacity(1024);
    let mut payload = Vec::with_capacity(plan.size + 64);
    let mut delivered_reported = 0u64;
    let mut delivered = 0u64;

    loop {
        let phase = control.phase.load(Ordering::Acquire);
        if phase == PHASE_STOP {
            break;
        }
        let now = plan.now_ns();
        let mut timeout = Duration::from_millis(5);
        if phase == PHASE_SYNC && now.saturating_sub(last_probe) > 100_000_000 {
            last_probe = now;
            for l in live.iter_mut().filter(|l| l.conn.probes) {
                plan.protocol.publish(&mut l.wbuf, SYNC_PREFIX);
            }
        }
        if phase == PHASE_RUN {
            let start = control.start_ns.load(Ordering::Acquire);
            let send_end = control.send_end_ns.load(Ordering::Acquire);
            if !scheduled {
                scheduled = true;
                // Spread publishers across one interval so they do not all fire together.
                let n = plan.publishers.max(1) as u64;
                for p in pubs.iter_mut() {
                    p.next_due = start + interval_ns * p.id as u64 / n;
                }
            }
            for p in pubs.iter_mut() {
                let l = &mut live[p.conn];
                let before = p.seq;
                if interval_ns > 0 {
                    while p.next_due <= now && p.next_due < send_end {
                        if l.wbuf.len() - l.wpos < MAX_PENDING_BYTES {
                            p.append(&plan, &mut l.wbuf, &mut payload, p.next_due);
                        }
                        p.next_due += interval_ns;
                    }
                    if p.next_due < send_end {
                        timeout = timeout.min(Duration::from_nanos(p.next_due.saturating_sub(now)));
                    }
                } else if now >= start && now < send_end {
                    if l.wbuf.len() - l.wpos < UNPACED_PENDING_BYTES {
                        for _ in 0..UNPACED_BURST {
                            p.append(&plan, &mut l.wbuf, &mut payload, now);
                        }
                    }
                    timeout = Duration::from_micros(200);
                }
                if p.seq > before {
                    control.sent[p.id as usize].fetch_add(p.seq - before, Ordering::Relaxed);
                }
            }
        }
        for (i, l) in live.iter_mut().enumerate() {
            if l.wpos < l.wbuf.len() && !l.closed {
                flush(l, &control, i);
            }
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                control.error(format!("poll failed: {e}"));
                break;
            }
        }
        for event in events.iter() {
            let i = event.token().0;
            let l = &mut live[i];
            if event.is_readable() && !l.closed {
                delivered += read(l, &plan, &control, &mut report);
            }
            if event.is_writable() && l.wpos < l.wbuf.len() && !l.closed {
                flush(l, &control, i);
            }
        }
        if delivered != delivered_reported {
            control
                .delivered
                .fetch_add(delivered - delivered_reported, Ordering::Relaxed);
            delivered_reported = delivered;
        }
    }
    report.trackers = live
        .into_iter()
        .filter(|l| !l.trackers.is_empty())
        .map(|l| (l.conn.client, l.trackers))
        .collect();
    report
}

fn empty_report() -> Report {
    Report {
        latency: histogram(),
        timeline: Vec::new(),
        trackers: Vec::new(),
        delivered_in_window: 0,
        notices: 0,
        closed_by_server: 0,
    }
}

/// Writes as much pending output as the socket takes.
fn flush(l: &mut Live, control: &Control, i: usize) {
    while l.wpos < l.wbuf.len() {
        match l.conn.stream.write(&l.wbuf[l.wpos..]) {
            Ok(0) => break,
            Ok(n) => l.wpos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                control.error(format!("connection {i} write failed: {e}"));
                l.closed = true;
                break;
            }
        }
    }
    if l.wpos == l.wbuf.len() {
        l.wbuf.clear();
        l.wpos = 0;
    } else if l.wpos > (1 << 20) {
        l.wbuf.drain(..l.wpos);
        l.wpos = 0;
    }
}

/// Reads everything available and accounts for it; returns unique deliveries.
fn read(l: &mut Live, plan: &Plan, control: &Control, report: &mut Report) -> u64 {
    let mut chunk = [0u8; 64 << 10];
    let mut delivered = 0;
    loop {
        match l.conn.stream.read(&mut chunk) {
            Ok(0) => {
                l.closed = true;
                if control.phase.load(Ordering::Relaxed) != PHASE_STOP {
                    report.closed_by_server += 1;
                }
                return delivered;
            }
            Ok(n) => l.rbuf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                l.closed = true;
                report.closed_by_server += 1;
                return delivered;
            }
        }
    }
    let now = plan.now_ns();
    let start = control.start_ns.load(Ordering::Relaxed);
    let warmup_end = control.warmup_end_ns.load(Ordering::Relaxed);
    let send_end = control.send_end_ns.load(Ordering::Relaxed);
    let (mut pong, mut subscribed) = (false, false);
    let own = l.conn.client as u32;
    let trackers = &mut l.trackers;
    let decoded = plan.protocol.decode(&l.rbuf, |event| match event {
        Event::Message(p) if p.starts_with(SYNC_PREFIX) => subscribed = true,
        Event::Message(p) => {
            let Some(h) = proto::parse_header(p) else { return };
            // Redis delivers a publisher's own messages back: drop them here.
            if h.publisher == own && plan.protocol == Protocol::Redis {
                return;
            }
            let Some(tracker) = trackers.get_mut(h.publisher as usize) else {
                return;
            };
            if tracker.on_arrival(h.seq) == Arrival::Duplicate {
                return;
            }
            delivered += 1;
            if h.sched_ns >= warmup_end && h.sched_ns < send_end {
                report.delivered_in_window += 1;
                let us = (now.saturating_sub(h.sched_ns) / 1000).clamp(1, HIST_MAX_US);
                let _ = report.latency.record(us);
                let second = (now.saturating_sub(start) / 1_000_000_000) as usize;
                while report.timeline.len() <= second {
                    report.timeline.push((0, histogram()));
                }
                report.timeline[second].0 += 1;
                let _ = report.timeline[second].1.record(us);
            }
        }
        Event::Subscribed => subscribed = true,
        Event::Ping => pong = true,
        Event::Notice(_) => report.notices += 1,
    });
    match decoded {
        Ok(used) => {
            l.rbuf.drain(..used);
        }
        Err(e) => {
            control.error(format!("client {}: {e}", l.conn.client));
            l.closed = true;
        }
    }
    if subscribed && !l.subscribed {
        l.subscribed = true;
        control.subscribed.fetch_add(1, Ordering::Relaxed);
    }
    if pong {
        l.wbuf.extend_from_slice(b"PONG\r\n");
    }
    delivered
}
