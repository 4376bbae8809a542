//! The receiving side of a worker: reading a socket the way its class allows, decoding
//! what arrived and accounting for it (sequence trackers, latency per class, delivery
//! gaps, notices), and the stuck receivers' one read after the stop. Called from the
//! worker's event loop in [`super`]; every function works on one connection.

use std::io::{ErrorKind, Read};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::{Events, Poll};

use super::{crosses_nodes, histogram, Control, Live, Plan, Report, HIST_MAX_US};
use crate::accounting::Arrival;
use crate::proto::{self, Event, Protocol, SYNC_PREFIX};
use crate::reader::{ReaderClass, SLOW_READ_BUF};

/// After the stop, how long stuck receivers may read what is left for them, and how long
/// a silence ends that early: enough to reach a close queued behind megabytes of data.
const STUCK_DRAIN_MAX: Duration = Duration::from_secs(2);
const STUCK_DRAIN_QUIET_NS: u64 = 300_000_000;
/// Notice texts kept per decoded buffer (the receiver keeps its own distinct few).
const NOTICES_PER_BUFFER: usize = 4;

/// A rate-limited or pausing receiver's turn: reads if it has something to read and its
/// class allows it now (a rate-limited one reads one small buffer, then waits as long as
/// those bytes take at its rate; a pausing one reads nothing inside its pause, the window
/// `pause`, and everything outside it). Returns the deliveries and, if it still has
/// something to read, how long until it may.
pub(super) fn read_gated(
    l: &mut Live,
    pause: (u64, u64),
    chunk: &mut [u8],
    plan: &Plan,
    control: &Control,
    report: &mut Report,
) -> (u64, Option<Duration>) {
    if !l.readable || l.closed {
        return (0, None);
    }
    let now = plan.now_ns();
    let open_at = match l.class {
        ReaderClass::RateLimited => l.read_not_before,
        _ if now >= pause.0 && now < pause.1 => pause.1,
        _ => 0,
    };
    if now < open_at {
        return (0, Some(Duration::from_nanos(open_at - now)));
    }
    if l.class != ReaderClass::RateLimited {
        return (read(l, chunk, false, plan, control, report), None);
    }
    let before = l.bytes_read;
    let delivered = read(l, &mut chunk[..SLOW_READ_BUF], true, plan, control, report);
    let now = plan.now_ns();
    l.read_not_before = now + plan.mix.rate_delay_ns((l.bytes_read - before) as usize);
    let wait = l.readable.then(|| Duration::from_nanos(l.read_not_before - now));
    (delivered, wait)
}

/// Bytes read from a socket per `read` call, into the worker's one scratch buffer.
pub(super) const READ_CHUNK: usize = 64 << 10;

/// Reads everything available (or, with `once`, one read's worth) and accounts for it;
/// returns unique deliveries. Each read lands in `chunk` (the worker's, allocated once)
/// and is decoded from there; only an incomplete last message is kept in the
/// connection's own buffer.
pub(super) fn read(
    l: &mut Live,
    chunk: &mut [u8],
    once: bool,
    plan: &Plan,
    control: &Control,
    report: &mut Report,
) -> u64 {
    let mut delivered = 0;
    loop {
        let n = match l.conn.stream.read(chunk) {
            Ok(0) => {
                l.readable = false;
                l.on_server_close(plan.now_ns(), control, report);
                return delivered;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                l.readable = false;
                return delivered;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                l.readable = false;
                l.on_server_close(plan.now_ns(), control, report);
                return delivered;
            }
        };
        l.bytes_read += n as u64;
        if l.rbuf.is_empty() {
            let used = decode(l, &chunk[..n], plan, control, report, &mut delivered);
            l.rbuf.extend_from_slice(&chunk[used..n]);
        } else {
            l.rbuf.extend_from_slice(&chunk[..n]);
            let rbuf = std::mem::take(&mut l.rbuf);
            let used = decode(l, &rbuf, plan, control, report, &mut delivered);
            l.rbuf = rbuf;
            l.rbuf.drain(..used);
        }
        if l.closed || once {
            return delivered;
        }
    }
}

/// Accounts for the complete messages in `buf`; returns the bytes they took.
fn decode(l: &mut Live, buf: &[u8], plan: &Plan, control: &Control, report: &mut Report, delivered: &mut u64) -> usize {
    let now = plan.now_ns();
    let start = control.start_ns.load(Ordering::Relaxed);
    let warmup_end = control.warmup_end_ns.load(Ordering::Relaxed);
    let send_end = control.send_end_ns.load(Ordering::Relaxed);
    let (mut pong, mut subscribed) = (false, false);
    let own = l.conn.client as u32;
    let class = l.class.index();
    let before = *delivered;
    let trackers = &mut l.trackers;
    let in_window = &mut l.in_window;
    let notices = &mut Vec::new();
    let (mut opened, mut filled) = (0u64, 0u64);
    let decoded = plan.protocol.decode(buf, |event| match event {
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
            let next = tracker.next();
            match tracker.on_arrival(h.seq) {
                Arrival::Duplicate => return,
                Arrival::AfterGap => opened += h.seq - next,
                Arrival::Reordered => filled += 1,
                Arrival::InOrder => {}
            }
            *delivered += 1;
            if plan.live {
                let us = (now.saturating_sub(h.sched_ns) / 1000).clamp(1, HIST_MAX_US);
                let _ = report.recent.record(us);
            }
            if h.sched_ns >= warmup_end && h.sched_ns < send_end {
                report.delivered_in_window += 1;
                *in_window += 1;
                let us = (now.saturating_sub(h.sched_ns) / 1000).clamp(1, HIST_MAX_US);
                let _ = report.class_latency[class].record(us);
                if crosses_nodes(h.publisher as usize, own as usize, plan.targets) {
                    let _ = report.cross_latency.record(us);
                }
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
        Event::Notice(text) => {
            report.notices += 1;
            if notices.len() < NOTICES_PER_BUFFER {
                notices.push(text.to_vec());
            }
        }
    });
    for text in notices.iter() {
        l.on_notice(text);
    }
    if opened > 0 || filled > 0 {
        control
            .missing
            .fetch_add(opened as i64 - filled as i64, Ordering::Relaxed);
        control.reordered.fetch_add(filled, Ordering::Relaxed);
    }
    if *delivered > before {
        l.gaps.on_delivery(now, warmup_end, send_end);
    }
    let used = decoded.unwrap_or_else(|e| {
        control.error(format!("client {}: {e}", l.conn.client));
        l.closed = true;
        buf.len()
    });
    if subscribed && !l.subscribed {
        l.subscribed = true;
        control.subscribed.fetch_add(1, Ordering::Relaxed);
    }
    if pong {
        l.wbuf.extend_from_slice(b"PONG\r\n");
    }
    used
}

/// After the stop, stuck receivers read everything left for them, to find a close (EOF,
/// reset or notice) queued behind data they never took. Ends when all are closed, after
/// a silence of [`STUCK_DRAIN_QUIET_NS`], or after [`STUCK_DRAIN_MAX`].
pub(super) fn drain_stuck(
    live: &mut [Live],
    poll: &mut Poll,
    chunk: &mut [u8],
    plan: &Plan,
    control: &Control,
    report: &mut Report,
) {
    let stuck: Vec<usize> = (0..live.len())
        .filter(|&i| live[i].conn.receives && live[i].class == ReaderClass::Stuck)
        .collect();
    if stuck.is_empty() {
        return;
    }
    let deadline = Instant::now() + STUCK_DRAIN_MAX;
    let mut events = Events::with_capacity(256);
    let mut last_progress = plan.now_ns();
    while Instant::now() < deadline {
        let mut open = 0;
        for &i in &stuck {
            let l = &mut live[i];
            if l.closed {
                continue;
            }
            let before = l.bytes_read;
            read(l, chunk, false, plan, control, report);
            if l.bytes_read > before || l.closed {
                last_progress = plan.now_ns();
            }
            open += usize::from(!l.closed);
        }
        if open == 0 || plan.now_ns().saturating_sub(last_progress) > STUCK_DRAIN_QUIET_NS {
            return;
        }
        // Any event wakes this up; the loop above reads whatever is there.
        let _ = poll.poll(&mut events, Some(Duration::from_millis(20)));
    }
}
