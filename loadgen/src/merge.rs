//! Merging the workers' reports into one [`RunResult`]: delivery totals overall and per
//! receiver class, latency (and, over several targets, that of the deliveries that crossed
//! nodes), the per-second timeline, disconnects and the CPU figures. Called once by the
//! runner after every worker has stopped.

use crate::accounting::SeqTracker;
use crate::engine::{Plan, ReceiverReport, Report};
use crate::reader::{ReaderClass, ReaderMix};
use crate::report::{percentiles_of, ClassHistogram, ClassResult, CrossNode, Latency, RunResult, Tick};
use crate::{RunArgs, Scenario};

/// Share of the generator's CPUs above which it warns that it measured itself.
const SATURATION: f64 = 0.9;

#[allow(clippy::too_many_arguments)]
pub fn merge(
    args: &RunArgs,
    plan: &Plan,
    start_ns: u64,
    sent: &[u64],
    reports: Vec<Report>,
    loadgen_cpu_s: f64,
    server_cpu_s: Option<f64>,
    rss: (Option<u64>, Option<u64>),
    side: (u64, u64),
    mut errors: Vec<String>,
) -> RunResult {
    let mut latency = reports[0].class_latency[0].clone();
    latency.reset();
    let mut cross = latency.clone();
    let mut classes: Vec<ClassAcc> = ReaderClass::ALL
        .iter()
        .map(|&class| ClassAcc::new(class, &latency))
        .collect();
    let mut timeline: Vec<(u64, hdrhistogram::Histogram<u64>)> = Vec::new();
    let (mut in_window, mut notices, mut closed, mut writes, mut queued) = (0, 0, 0, 0, 0);
    for r in &reports {
        for (t, (n, h)) in r.timeline.iter().enumerate() {
            if timeline.len() <= t {
                timeline.push((0, h.clone()));
                timeline[t].1.reset();
            }
            timeline[t].0 += n;
            let _ = timeline[t].1.add(h);
        }
        for (acc, h) in classes.iter_mut().zip(&r.class_latency) {
            let _ = acc.latency.add(h);
            let _ = latency.add(h);
        }
        let _ = cross.add(&r.cross_latency);
        for rr in &r.receivers {
            classes[rr.class.index()].on_receiver(rr, sent, start_ns);
        }
        in_window += r.delivered_in_window;
        notices += r.notices;
        closed += r.closed_by_server;
        writes += r.publisher_writes;
        queued += r.queued_lines;
    }
    let threads = args.threads as f64;
    let saturated = loadgen_cpu_s >= SATURATION * threads * args.duration;
    if saturated {
        errors.push(format!(
            "the generator used {loadgen_cpu_s:.2} s of CPU in {:.2} s on {} thread(s): it is saturated and measured itself, not the server; add --threads",
            args.duration, args.threads
        ));
    }
    let mut totals = Totals::default();
    for c in &classes {
        totals.add(&c.totals);
    }
    let histograms: Vec<ClassHistogram> = classes
        .iter()
        .filter(|c| c.receivers > 0 && c.class != ReaderClass::Stuck)
        .map(|c| ClassHistogram {
            class: c.class,
            histogram: c.latency.clone(),
        })
        .collect();
    let classes: Vec<ClassResult> = classes
        .into_iter()
        .filter_map(|c| c.finish(args.duration, &plan.mix))
        .collect();
    let readers_disconnected = classes
        .iter()
        .filter(|c| c.class != ReaderClass::Stuck)
        .map(|c| c.disconnected)
        .sum();
    RunResult {
        protocol: args.protocol,
        scenario: args.scenario,
        target: args.target.join(","),
        clients: args.clients,
        publishers: plan.publishers,
        rate: args.rate,
        burst_us: args.burst_us,
        size: plan.size,
        duration_s: args.duration,
        warmup_s: args.warmup,
        threads: args.threads,
        sent: sent.iter().sum(),
        publisher_writes: writes,
        queued_lines: queued,
        expected: totals.expected,
        delivered: totals.delivered,
        lost: totals.lost,
        duplicated: totals.duplicated,
        reordered: totals.reordered,
        msgs_per_sec: in_window as f64 / args.duration,
        mb_per_sec: in_window as f64 * plan.size as f64 / args.duration / 1e6,
        latency_us: Latency::of(&latency),
        percentiles_us: percentiles_of(&latency, &args.output.percentiles),
        cross_node: (plan.targets > 1).then(|| CrossNode {
            delivered_in_window: cross.len(),
            share: if in_window > 0 {
                cross.len() as f64 / in_window as f64
            } else {
                0.0
            },
            latency_us: Latency::of(&cross),
        }),
        timeline: timeline
            .iter()
            .enumerate()
            .map(|(t, (n, h))| Tick {
                t: t as u64,
                delivered: *n,
                p99_us: if h.is_empty() { 0 } else { h.value_at_quantile(0.99) },
                server_cpu_ms: None,
            })
            .collect(),
        loadgen_cpu_s,
        loadgen_saturated: saturated,
        server_cpu_s,
        server_cpu_ns_per_delivery: server_cpu_s
            .filter(|_| in_window > 0)
            .map(|s| s * 1e9 / in_window as f64),
        least_ns_per_delivery: None,
        cpu_over_least: None,
        floor_p99_us: None,
        p99_over_floor: None,
        server_rss_kib: rss.1,
        server_rss_bytes_per_connection: match rss {
            (Some(before), Some(after)) if args.scenario == Scenario::Idle => {
                Some((after.saturating_sub(before) * 1024) as f64 / args.clients as f64)
            }
            _ => None,
        },
        slow_consumers: plan.mix.stuck,
        notices,
        closed_by_server: closed,
        classes,
        readers_disconnected,
        closed_no_reader: readers_disconnected == 0,
        side_connections: side.0,
        side_notices: side.1,
        errors,
        meta: None,
        histograms,
    }
}

/// Delivery totals, for one class or the whole run.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    expected: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
}

impl Totals {
    /// One (receiver, publisher) pair that should have seen `should` lines.
    fn on_pair(&mut self, t: &SeqTracker, should: u64) {
        self.expected += should;
        self.delivered += t.delivered;
        self.lost += t.lost(should);
        self.duplicated += t.duplicated;
        self.reordered += t.reordered;
    }

    fn add(&mut self, o: &Totals) {
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
    }
}

/// One receiver class's outcome while the workers' reports are merged.
struct ClassAcc {
    class: ReaderClass,
    receivers: usize,
    totals: Totals,
    latency: hdrhistogram::Histogram<u64>,
    max_gap_ns: u64,
    in_window: u64,
    bytes_read: u64,
    closed: usize,
    warned: usize,
    disconnected: usize,
    closed_after_ms: Vec<f64>,
    closed_seen_at_end: usize,
    notices: Vec<String>,
}

/// Notice texts and close times kept per class in the result.
const CLASS_LIST_MAX: usize = 20;

impl ClassAcc {
    fn new(class: ReaderClass, empty: &hdrhistogram::Histogram<u64>) -> Self {
        ClassAcc {
            class,
            receivers: 0,
            totals: Totals::default(),
            latency: empty.clone(),
            max_gap_ns: 0,
            in_window: 0,
            bytes_read: 0,
            closed: 0,
            warned: 0,
            disconnected: 0,
            closed_after_ms: Vec::new(),
            closed_seen_at_end: 0,
            notices: Vec::new(),
        }
    }

    fn on_receiver(&mut self, r: &ReceiverReport, sent: &[u64], start_ns: u64) {
        self.receivers += 1;
        for (p, tracker) in r.trackers.iter().enumerate() {
            // A publisher's own lines are not owed to it (Redis echoes them; they are dropped).
            let should = if p == r.client { 0 } else { sent[p] };
            self.totals.on_pair(tracker, should);
        }
        self.max_gap_ns = self.max_gap_ns.max(r.max_gap_ns);
        self.in_window += r.in_window;
        self.bytes_read += r.bytes_read;
        let closed = r.closed_at_ns.is_some() || r.closed_seen_at_end;
        self.closed += usize::from(closed);
        self.warned += usize::from(!r.notices.is_empty());
        self.disconnected += usize::from(closed || !r.notices.is_empty());
        self.closed_seen_at_end += usize::from(r.closed_seen_at_end);
        if let Some(at) = r.closed_at_ns {
            if self.closed_after_ms.len() < CLASS_LIST_MAX {
                self.closed_after_ms.push(at.saturating_sub(start_ns) as f64 / 1e6);
            }
        }
        for n in &r.notices {
            if self.notices.len() < CLASS_LIST_MAX && !self.notices.contains(n) {
                self.notices.push(n.clone());
            }
        }
    }

    fn finish(mut self, duration_s: f64, mix: &ReaderMix) -> Option<ClassResult> {
        if self.receivers == 0 {
            return None;
        }
        self.closed_after_ms.sort_by(|a, b| a.total_cmp(b));
        let reads = self.class != ReaderClass::Stuck;
        Some(ClassResult {
            class: self.class,
            receivers: self.receivers,
            reader_rate: (self.class == ReaderClass::RateLimited).then_some(mix.reader_rate),
            pause_ms: (self.class == ReaderClass::Pausing).then_some(mix.pause_ns as f64 / 1e6),
            expected: self.totals.expected,
            delivered: self.totals.delivered,
            lost: self.totals.lost,
            duplicated: self.totals.duplicated,
            reordered: self.totals.reordered,
            msgs_per_sec: self.in_window as f64 / duration_s,
            latency_us: (reads && !self.latency.is_empty()).then(|| Latency::of(&self.latency)),
            max_gap_ms: reads.then_some(self.max_gap_ns as f64 / 1e6),
            bytes_read: self.bytes_read,
            closed_by_server: self.closed,
            warned: self.warned,
            disconnected: self.disconnected,
            closed_after_ms: self.closed_after_ms,
            closed_seen_at_end: self.closed_seen_at_end,
            notices: self.notices,
        })
    }
}
