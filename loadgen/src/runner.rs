//! One run: connect every client, wait until all are subscribed, run the phases (warm-up,
//! measured window, drain), then merge the workers' reports into a [`RunResult`] (see
//! `merge.rs`). Scenario side traffic (churn, bad input) runs on the main thread meanwhile.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{self, Conn, Control, Plan, Report, PHASE_RUN, PHASE_STOP};
use crate::measure::{clock_ticks_per_sec, own_cpu, parse_cpus, pin_current_thread, server_cpu_ticks, server_rss_kib};
use crate::proto::{Protocol, HEADER_LEN};
use crate::reader::{ReaderClass, ReaderMix};
use crate::report::live::LiveMonitor;
use crate::report::RunResult;
use crate::{RunArgs, Scenario};

/// How long every receiver has to confirm its subscription.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle scenario: wait before reading the server's memory.
const IDLE_SETTLE: Duration = Duration::from_secs(1);

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
    let mix = reader_mix(args)?;
    let size = args.size.max(HEADER_LEN);
    if size != args.size {
        errors.push(format!("--size raised to {HEADER_LEN}, the payload header"));
    }
    let targets: Vec<SocketAddr> = args.target.iter().map(|t| resolve(t)).collect::<Result<_, _>>()?;
    // Side traffic (churn, bad input) goes to the first target.
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
        publishers,
        rate: args.rate,
        burst_ns: args.burst_us.saturating_mul(1000),
        size,
        mix,
        epoch: Instant::now(),
        targets: targets.len(),
        live: crate::report::live::wanted(args.no_progress),
    });
    let control = Arc::new(Control::new(publishers));
    let rss_before = args.server_pid.and_then(server_rss_kib);

    // Connect everyone before anything is sent.
    let mut shares: Vec<Vec<Conn>> = (0..args.threads).map(|_| Vec::new()).collect();
    let pace = (args.connect_rate > 0.0 && args.scenario != Scenario::Churn)
        .then(|| Duration::from_secs_f64(1.0 / args.connect_rate));
    let summoner = args.protocol == Protocol::Summoner;
    let tls = crate::tls::Connector::from_args(&args.tls)?;
    let tls = tls.as_ref();
    for client in 0..args.clients {
        // A publisher's separate connection goes to its client's target too.
        let target = targets[engine::target_of(client, targets.len())];
        let stream = connect(target, source(&sources, client), tls)?;
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
            let stream = connect(target, source(&sources, client), tls)?;
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
        let closed = control.closed_in_sync.load(Ordering::Relaxed);
        if closed > 0 {
            control.phase.store(PHASE_STOP, Ordering::Release);
            return Err(format!(
                "the server closed {closed} connection(s) before every receiver was subscribed (is it full, or refusing this address?)"
            ));
        }
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

    let mut monitor = LiveMonitor::new(plan.live, args.warmup + args.duration, args.server_pid, start);
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
        monitor.step(now, &control);
        side.step(now, &plan, &mut errors);
        std::thread::sleep(Duration::from_millis(10).min(Duration::from_nanos(send_end - now)));
    };
    let server_cpu_per_s = monitor.finish();

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
    let mut result = crate::merge::merge(
        args,
        &plan,
        start,
        &sent,
        reports,
        loadgen_cpu_s,
        server_cpu_s,
        (rss_before, rss_after),
        side.counts(),
        errors,
    );
    for tick in &mut result.timeline {
        tick.server_cpu_ms = server_cpu_per_s.get(tick.t as usize).copied().flatten();
    }
    Ok(result)
}

/// Which receivers read how, from the flags; errors name the flag and the limit.
fn reader_mix(args: &RunArgs) -> Result<ReaderMix, String> {
    let stuck = match (args.stuck_readers, args.scenario) {
        (Some(n), _) => n,
        (None, Scenario::SlowConsumer) => args.slow.unwrap_or((args.clients / 10).max(1)),
        (None, _) => 0,
    };
    let pausing = args.pause_readers.unwrap_or(0);
    let reader_rate = args.reader_rate.unwrap_or(0.0);
    if args.reader_rate.is_some() && !(reader_rate.is_finite() && reader_rate > 0.0) {
        return Err(format!(
            "--reader-rate must be a positive number of bytes per second, not {reader_rate}"
        ));
    }
    if stuck + pausing > args.clients {
        return Err(format!(
            "{stuck} stuck + {pausing} pausing readers exceed {} clients",
            args.clients
        ));
    }
    let rate_limited = match (args.slow_readers, args.reader_rate) {
        (Some(n), _) => n,
        // A rate without a count applies to every receiver left.
        (None, Some(_)) => args.clients - stuck - pausing,
        (None, None) => 0,
    };
    if stuck + pausing + rate_limited > args.clients {
        return Err(format!(
            "{stuck} stuck + {pausing} pausing + {rate_limited} rate-limited readers exceed {} clients",
            args.clients
        ));
    }
    if stuck >= args.clients {
        return Err("every receiver is stuck: nothing would be measured".into());
    }
    Ok(ReaderMix {
        clients: args.clients,
        rate_limited,
        pausing,
        stuck,
        reader_rate,
        pause_at_ns: args.pause_at_ms.saturating_mul(1_000_000),
        pause_ns: args.pause_ms.unwrap_or(0).saturating_mul(1_000_000),
    })
}

/// Σ over counted receivers r and publishers p ≠ r of what p sent.
fn expected_total(plan: &Plan, control: &Control) -> u64 {
    let receivers = plan.counted_receivers() as u64;
    control
        .sent
        .iter()
        .enumerate()
        .map(|(p, s)| {
            let own = u64::from(plan.mix.class_of(p) != ReaderClass::Stuck);
            s.load(Ordering::Relaxed) * (receivers - own)
        })
        .sum()
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

fn connect(
    target: SocketAddr,
    from: Option<IpAddr>,
    tls: Option<&crate::tls::Connector>,
) -> Result<crate::tls::Stream, String> {
    let stream = connect_std(target, from).map_err(|e| format!("cannot connect to {target}: {e}"))?;
    crate::tls::Stream::new(stream, tls).map_err(|e| format!("cannot set up the connection to {target}: {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges_and_cpu_lists_parse() {
        assert_eq!(parse_ips("127.0.0.2-127.0.0.4").unwrap().len(), 3);
        assert_eq!(parse_ips("127.0.0.2,::1").unwrap().len(), 2);
        assert!(parse_ips("127.0.0.9-127.0.0.2").is_err());
    }
}
