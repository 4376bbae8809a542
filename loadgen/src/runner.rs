//! One run: connect every client, wait until all are subscribed, run the phases (warm-up,
//! measured window, drain), then merge the workers' reports into a [`RunResult`]. Scenario
//! side traffic (churn, bad input) runs on the main thread meanwhile.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accounting::SeqTracker;
use crate::engine::{self, Conn, Control, Plan, Report, PHASE_RUN, PHASE_STOP};
use crate::proto::{Protocol, HEADER_LEN};
use crate::report::{Latency, RunResult, Tick};
use crate::{RunArgs, Scenario};

/// How long every receiver has to confirm its subscription.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle scenario: wait before reading the server's memory.
const IDLE_SETTLE: Duration = Duration::from_secs(1);
/// Share of the generator's CPUs above which it warns that it measured itself.
const SATURATION: f64 = 0.9;

pub fn run(args: &RunArgs) -> Result<RunResult, String> {
    let mut errors = Vec::new();
    let publishers = if args.scenario == Scenario::Idle {
        0
    } else {
        args.publishers
    };
    if args.clients == 0 || publishers > args.clients || args.threads == 0 || args.duration <= 0.0 {
        return Err("need clients >= 1, publishers <= clients, threads >= 1 and duration > 0".into());
    }
    let slow = match args.scenario {
        Scenario::SlowConsumer => args.slow.unwrap_or((args.clients / 10).max(1)),
        _ => 0,
    };
    if publishers + slow > args.clients {
        return Err(format!(
            "{publishers} publishers + {slow} slow consumers exceed {} clients",
            args.clients
        ));
    }
    let size = args.size.max(HEADER_LEN);
    if size != args.size {
        errors.push(format!("--size raised to {HEADER_LEN}, the payload header"));
    }
    let targets: Vec<SocketAddr> = args.target.iter().map(|t| resolve(t)).collect::<Result<_, _>>()?;
    let target = *targets.first().ok_or("need at least one --target")?;
    let sources = match &args.source_ips {
        Some(spec) => parse_ips(spec)?,
        None => Vec::new(),
    };
    let cpus = match &args.cpus {
        Some(spec) => parse_cpus(spec)?,
        None => Vec::new(),
    };
    if let Some(&cpu) = cpus.first() {
        pin_current_thread(cpu);
    }
    let plan = Arc::new(Plan {
        protocol: args.protocol,
        clients: args.clients,
        publishers,
        rate: args.rate,
        burst_ns: args.burst_us.saturating_mul(1000),
        size,
        slow,
        epoch: Instant::now(),
        targets: targets.len(),
    });
    let control = Arc::new(Control::new(publishers));
    let rss_before = args.server_pid.and_then(server_rss_kib);

    // Connect everyone before anything is sent.
    let mut shares: Vec<Vec<Conn>> = (0..args.threads).map(|_| Vec::new()).collect();
    let pace = (args.connect_rate > 0.0 && args.scenario != Scenario::Churn)
        .then(|| Duration::from_secs_f64(1.0 / args.connect_rate));
    let summoner = args.protocol == Protocol::Summoner;
    for client in 0..args.clients {
        let target = targets[client % targets.len()];
        let stream = connect(target, source(&sources, client))?;
        let separate = args.protocol.separate_publisher();
        shares[client % args.threads].push(Conn {
            client,
            stream,
            receives: true,
            publishes: (client < publishers && !separate).then_some(client as u32),
            probes: summoner && client < 2 && args.clients >= 2 && publishers > 0,
            hello: args.protocol.subscribe(),
        });
        if client < publishers && separate {
            let stream = connect(target, source(&sources, client))?;
            shares[client % args.threads].push(Conn {
                client,
                stream,
                receives: false,
                publishes: Some(client as u32),
                probes: false,
                hello: args.protocol.publisher_hello(),
            });
        }
        if let Some(p) = pace {
            std::thread::sleep(p);
        }
    }
    let workers: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(k, conns)| {
            let (plan, control) = (plan.clone(), control.clone());
            let cpu = (!cpus.is_empty()).then(|| cpus[(k + 1) % cpus.len()]);
            std::thread::Builder::new()
                .name(format!("loadgen-{k}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_current_thread(cpu);
                    }
                    engine::run_worker(plan, control, conns)
                })
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;

    let sync_deadline = Instant::now() + SYNC_TIMEOUT;
    while control.subscribed.load(Ordering::Relaxed) < args.clients {
        if Instant::now() > sync_deadline {
            control.phase.store(PHASE_STOP, Ordering::Release);
            return Err(format!(
                "only {} of {} receivers were subscribed after {} s",
                control.subscribed.load(Ordering::Relaxed),
                args.clients,
                SYNC_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if args.scenario == Scenario::Idle {
        // Nothing confirms an idle connection: give the server a moment to accept them all.
        std::thread::sleep(IDLE_SETTLE);
    }
    let rss_after = args.server_pid.and_then(server_rss_kib);

    let start = plan.now_ns() + 20_000_000;
    let warmup_end = start + (args.warmup * 1e9) as u64;
    let send_end = warmup_end + (args.duration * 1e9) as u64;
    control.start_ns.store(start, Ordering::Release);
    control.warmup_end_ns.store(warmup_end, Ordering::Release);
    control.send_end_ns.store(send_end, Ordering::Release);
    control.phase.store(PHASE_RUN, Ordering::Release);

    let progress = crate::report::progress_bar(args.no_progress, args.warmup + args.duration);
    let mut side = SideTraffic::new(args, target, &sources);
    let mut window_start: Option<(Duration, Option<u64>)> = None;
    let window_end = loop {
        let now = plan.now_ns();
        if window_start.is_none() && now >= warmup_end {
            window_start = Some((own_cpu(), args.server_pid.and_then(server_cpu_ticks)));
        }
        if now >= send_end {
            break (own_cpu(), args.server_pid.and_then(server_cpu_ticks));
        }
        if let Some(bar) = &progress {
            bar.set_position(now.saturating_sub(start) / 1_000_000);
            bar.set_message(format!("{} delivered", control.delivered.load(Ordering::Relaxed)));
        }
        side.step(now, &plan, &mut errors);
        std::thread::sleep(Duration::from_millis(10).min(Duration::from_nanos(send_end - now)));
    };
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    // Drain: wait for what is still in flight, then stop the workers.
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain);
    let expected = expected_total(&plan, &control);
    while control.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    control.phase.store(PHASE_STOP, Ordering::Release);
    let reports: Vec<Report> = workers
        .into_iter()
        .map(|w| w.join().map_err(|_| "a worker panicked".to_string()))
        .collect::<Result<_, _>>()?;
    errors.extend(control.errors.lock().unwrap_or_else(|p| p.into_inner()).drain(..));

    let sent: Vec<u64> = control.sent.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    let (cpu_at_start, server_at_start) = window_start.unwrap_or_default();
    let (cpu_at_end, server_at_end) = window_end;
    let loadgen_cpu_s = (cpu_at_end.saturating_sub(cpu_at_start)).as_secs_f64();
    let server_cpu_s = match (server_at_start, server_at_end) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / clock_ticks_per_sec()),
        _ => None,
    };
    Ok(merge(
        args,
        &plan,
        &sent,
        reports,
        loadgen_cpu_s,
        server_cpu_s,
        (rss_before, rss_after),
        side.counts(),
        errors,
    ))
}

/// Σ over counted receivers r and publishers p ≠ r of what p sent.
fn expected_total(plan: &Plan, control: &Control) -> u64 {
    let receivers = plan.counted_receivers() as u64;
    control
        .sent
        .iter()
        .map(|s| s.load(Ordering::Relaxed) * (receivers - 1))
        .sum()
}

#[allow(clippy::too_many_arguments)]
fn merge(
    args: &RunArgs,
    plan: &Plan,
    sent: &[u64],
    reports: Vec<Report>,
    loadgen_cpu_s: f64,
    server_cpu_s: Option<f64>,
    rss: (Option<u64>, Option<u64>),
    side: (u64, u64),
    mut errors: Vec<String>,
) -> RunResult {
    let mut latency = reports[0].latency.clone();
    latency.reset();
    let mut cross = latency.clone();
    let mut timeline: Vec<(u64, hdrhistogram::Histogram<u64>)> = Vec::new();
    let (mut delivered, mut lost, mut duplicated, mut reordered) = (0, 0, 0, 0);
    let (mut in_window, mut notices, mut closed) = (0, 0, 0);
    let mut expected = 0;
    for r in &reports {
        let _ = latency.add(&r.latency);
        let _ = cross.add(&r.cross_latency);
        for (t, (n, h)) in r.timeline.iter().enumerate() {
            if timeline.len() <= t {
                timeline.push((0, h.clone()));
                timeline[t].1.reset();
            }
            timeline[t].0 += n;
            let _ = timeline[t].1.add(h);
        }
        for (client, trackers) in &r.trackers {
            for (p, tracker) in trackers.iter().enumerate() {
                let should = if p == *client { 0 } else { sent[p] };
                account(
                    tracker,
                    should,
                    &mut expected,
                    &mut delivered,
                    &mut lost,
                    &mut duplicated,
                    &mut reordered,
                );
            }
        }
        in_window += r.delivered_in_window;
        notices += r.notices;
        closed += r.closed_by_server;
    }
    let threads = args.threads as f64;
    let saturated = loadgen_cpu_s >= SATURATION * threads * args.duration;
    if saturated {
        errors.push(format!(
            "the generator used {loadgen_cpu_s:.2} s of CPU in {:.2} s on {} thread(s): it is saturated and measured itself, not the server; add --threads",
            args.duration, args.threads
        ));
    }
    let q = |p: f64| {
        if latency.is_empty() {
            0
        } else {
            latency.value_at_quantile(p)
        }
    };
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
        expected,
        delivered,
        lost,
        duplicated,
        reordered,
        msgs_per_sec: in_window as f64 / args.duration,
        mb_per_sec: in_window as f64 * plan.size as f64 / args.duration / 1e6,
        latency_us: Latency {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: latency.max(),
        },
        cross_node: (plan.targets > 1).then(|| {
            let q = |p: f64| {
                if cross.is_empty() {
                    0
                } else {
                    cross.value_at_quantile(p)
                }
            };
            crate::report::CrossNode {
                delivered_in_window: cross.len(),
                share: if in_window > 0 {
                    cross.len() as f64 / in_window as f64
                } else {
                    0.0
                },
                latency_us: Latency {
                    p50: q(0.5),
                    p90: q(0.9),
                    p99: q(0.99),
                    p999: q(0.999),
                    max: cross.max(),
                },
            }
        }),
        timeline: timeline
            .iter()
            .enumerate()
            .map(|(t, (n, h))| Tick {
                t: t as u64,
                delivered: *n,
                p99_us: if h.is_empty() { 0 } else { h.value_at_quantile(0.99) },
            })
            .collect(),
        loadgen_cpu_s,
        loadgen_saturated: saturated,
        server_cpu_s,
        server_cpu_ns_per_delivery: server_cpu_s
            .filter(|_| in_window > 0)
            .map(|s| s * 1e9 / in_window as f64),
        server_rss_kib: rss.1,
        server_rss_bytes_per_connection: match rss {
            (Some(before), Some(after)) if args.scenario == Scenario::Idle => {
                Some((after.saturating_sub(before) * 1024) as f64 / args.clients as f64)
            }
            _ => None,
        },
        slow_consumers: plan.slow,
        notices,
        closed_by_server: closed,
        side_connections: side.0,
        side_notices: side.1,
        errors,
    }
}

fn account(
    t: &SeqTracker,
    should: u64,
    expected: &mut u64,
    delivered: &mut u64,
    lost: &mut u64,
    duplicated: &mut u64,
    reordered: &mut u64,
) {
    *expected += should;
    *delivered += t.delivered;
    *lost += t.lost(should);
    *duplicated += t.duplicated;
    *reordered += t.reordered;
}

/// Extra connections for the churn and bad-input scenarios, paced from the main thread.
struct SideTraffic {
    kind: Scenario,
    target: SocketAddr,
    source: Option<IpAddr>,
    every_ns: u64,
    next_ns: u64,
    connections: u64,
    notices: u64,
}

impl SideTraffic {
    fn new(args: &RunArgs, target: SocketAddr, sources: &[IpAddr]) -> Self {
        let per_sec = match args.scenario {
            Scenario::Churn => args.connect_rate.max(1.0),
            _ => 1.0,
        };
        SideTraffic {
            kind: args.scenario,
            target,
            source: sources.first().copied(),
            every_ns: (1e9 / per_sec) as u64,
            next_ns: 0,
            connections: 0,
            notices: 0,
        }
    }

    fn step(&mut self, now: u64, plan: &Plan, errors: &mut Vec<String>) {
        if !matches!(self.kind, Scenario::Churn | Scenario::BadInput) || now < self.next_ns {
            return;
        }
        self.next_ns = now + self.every_ns;
        let Ok(stream) = connect_std(self.target, self.source) else {
            errors.push("a side connection failed".into());
            return;
        };
        self.connections += 1;
        if self.kind == Scenario::BadInput && plan.protocol == Protocol::Summoner {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.write_all(b"bad input \xff\xfe\n");
            let mut reply = Vec::new();
            let _ = stream.read_to_end(&mut reply);
            if reply.starts_with(b"Warning: ") {
                self.notices += 1;
            }
        }
    }

    fn counts(&self) -> (u64, u64) {
        (self.connections, self.notices)
    }
}

fn resolve(target: &str) -> Result<SocketAddr, String> {
    target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to nothing"))
}

fn source(sources: &[IpAddr], client: usize) -> Option<IpAddr> {
    (!sources.is_empty()).then(|| sources[client % sources.len()])
}

fn connect_std(target: SocketAddr, from: Option<IpAddr>) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)?;
    if let Some(ip) = from {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect(&target.into())?;
    socket.set_nodelay(true)?;
    Ok(socket.into())
}

fn connect(target: SocketAddr, from: Option<IpAddr>) -> Result<mio::net::TcpStream, String> {
    let stream = connect_std(target, from).map_err(|e| format!("cannot connect to {target}: {e}"))?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(mio::net::TcpStream::from_std(stream))
}

/// `127.0.0.2-127.0.0.9`, `10.0.0.1,10.0.0.2` or a single address.
fn parse_ips(spec: &str) -> Result<Vec<IpAddr>, String> {
    let bad = || format!("bad --source-ips {spec:?}: want A.B.C.D-A.B.C.E or a comma list");
    if let Some((a, b)) = spec.split_once('-') {
        let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        let (a, b) = (u32::from(a), u32::from(b));
        if a > b || b - a > 65_535 {
            return Err(bad());
        }
        return Ok((a..=b).map(|n| IpAddr::from(std::net::Ipv4Addr::from(n))).collect());
    }
    spec.split(',').map(|s| s.trim().parse().map_err(|_| bad())).collect()
}

/// `1`, `2-3`, `0,2`.
pub fn parse_cpus(spec: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("bad CPU list {spec:?}");
    let mut cpus = Vec::new();
    for part in spec.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    Ok(cpus)
}

pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// This process's CPU time (user + system).
fn own_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of `pid`, in clock ticks.
pub fn server_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory of `pid`, in KiB.
pub fn server_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges_and_cpu_lists_parse() {
        assert_eq!(parse_ips("127.0.0.2-127.0.0.4").unwrap().len(), 3);
        assert_eq!(parse_ips("127.0.0.2,::1").unwrap().len(), 2);
        assert!(parse_ips("127.0.0.9-127.0.0.2").is_err());
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert_eq!(parse_cpus("0,2-3").unwrap(), vec![0, 2, 3]);
        assert!(parse_cpus("x").is_err());
    }
}
