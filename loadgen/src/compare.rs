//! `corecast-loadgen compare`: corecast against nats-server and redis-server on the
//! standard workloads. Each server runs pinned to one CPU (corecast with one shard), the
//! generator pinned to another, in alternating rounds (A B C A B C ...), a fresh server per
//! run, started on a free loopback port and stopped by PID. Prints a markdown table of the
//! medians and the corecast/peer ratios (median of the per-round ratios). A workload
//! `T<clients>x<rate>` uses `--burst-us`; `T<clients>x<rate>b<µs>` sets its own burst, so
//! `T10x30000b0` is the per-line-write variant. Before each round the send-cost probe
//! (`anchor.rs`) measures what a loopback send costs right now, between the servers' CPU
//! and the generator's, and every run gets its CPU per delivery as a multiple of the least
//! a relay could spend on the workload at `--latency-bound-ms`, and its p99 as a multiple
//! of the fan-out floor the same probe measures (a line sent alone to every socket).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::anchor::{self, AnchorRound, FanoutFloor, Least};
use crate::measure::{median, parse_cpus, pin_current_thread};
use crate::proto::Protocol;
use crate::report::html::CompareRun;
use crate::report::meta::{Meta, ServerInfo};
use crate::report::RunResult;
use crate::report::{csv, hgrm, html, write_charts, write_file};
use crate::{OutputArgs, RunArgs, Scenario};

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The corecast binary (default: `corecast` next to this program).
    #[arg(long)]
    pub corecast_bin: Option<PathBuf>,
    /// CPU the servers are pinned to.
    #[arg(long, default_value = "0")]
    pub server_cpu: String,
    /// CPU(s) the generator is pinned to.
    #[arg(long, default_value = "1")]
    pub loadgen_cpus: String,
    /// Generator threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Rounds per workload; each round runs every server once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Payload bytes per line.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// As for `run`.
    #[arg(long, default_value_t = crate::DEFAULT_BURST_US)]
    pub burst_us: u64,
    /// Workloads `T<clients>x<lines/s each>[b<burst µs>]`, every client publishing; `b0`
    /// writes each line with its own write.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "T100x30,T10x30000,T100x100,T1000x2,T100x30b0,T10x30000b0"
    )]
    pub workloads: Vec<String>,
    /// Peers to include when installed.
    #[arg(long, value_delimiter = ',', default_value = "nats,redis")]
    pub peers: Vec<String>,
    /// Also run corecast with each of these `flush_window_us` values, as servers of their
    /// own named `corecast-w<µs>` beside the one with the default (`0`: back-to-back write
    /// passes, its lowest-latency setting).
    #[arg(long, value_delimiter = ',')]
    pub corecast_windows: Vec<u64>,
    /// The latency bound of the physical anchor, in ms: how long a relay may hold a line
    /// (the p99 it should meet). The least CPU per delivery is what writing every line
    /// within this bound costs at the send cost measured before each round; the table's
    /// "CPU/delivery ÷ least" is each server's CPU per delivery divided by it.
    #[arg(long, default_value_t = 1.0)]
    pub latency_bound_ms: f64,
    /// Write every run's result and the medians as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A server under test.
#[derive(Debug, Clone)]
struct Server {
    name: String,
    protocol: Protocol,
    program: PathBuf,
    /// corecast's config file contents (see [`corecast_config`]).
    config: Option<String>,
}

impl Server {
    /// The server's command line; `port` is a number, or a placeholder for the record.
    fn command(&self, port: &str, scratch: &std::path::Path) -> Command {
        let mut cmd = Command::new(&self.program);
        match self.protocol {
            Protocol::Summoner => {
                let config = scratch.join(format!("{}-bench.json", self.name));
                let _ = std::fs::write(&config, self.config.as_deref().unwrap_or_default());
                cmd.args(["--host", "127.0.0.1", "--port", port, "--shards", "1", "--config"])
                    .arg(config);
            }
            Protocol::Nats => {
                cmd.args(["-a", "127.0.0.1", "-p", port]);
            }
            Protocol::Redis => {
                cmd.args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    port,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]);
                cmd.args(["--client-output-buffer-limit", "pubsub 0 0 0", "--daemonize", "no"]);
            }
        }
        cmd
    }

    /// Every setting the comparison applies to this server: its arguments (the port is
    /// chosen per run) and, for corecast, the config file's contents.
    fn settings(&self, scratch: &std::path::Path) -> Vec<String> {
        let cmd = self.command("<port>", scratch);
        let mut settings: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        if let Some(config) = &self.config {
            settings.push(format!("(config file: {config})"));
        }
        settings
    }
}

/// corecast's config in a comparison: quiet logs, no rate limit (the peers have none), and
/// the flush window when one is given.
fn corecast_config(flush_window_us: Option<u64>) -> String {
    let mut config = serde_json::json!({
        "logger": {"log_level": "WARNING"},
        "hyper_parameters": {"rate_limit_msgs_per_minute": null},
    });
    if let Some(us) = flush_window_us {
        config["hyper_parameters"]["flush_window_us"] = us.into();
    }
    config.to_string()
}

/// A started server, stopped by PID when dropped.
struct Running {
    child: Child,
    port: u16,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(server: &Server, cpu: usize, scratch: &std::path::Path) -> Result<Running, String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))?
        .port();
    let mut cmd = server.command(&port.to_string(), scratch);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: only sched_setaffinity (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", server.program.display()))?;
    let running = Running { child, port };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{} did not start listening on {addr}", server.name));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(running)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| p.is_file())
        .or_else(|| {
            ["/usr/sbin", "/usr/bin", "/usr/local/bin"]
                .iter()
                .map(|d| PathBuf::from(d).join(name))
                .find(|p| p.is_file())
        })
}

/// `T100x30` → (100 clients, 30 lines/s each, no burst of its own); `T10x30000b0` → (10,
/// 30000, bursts of 0 µs: per-line writes).
fn parse_workload(w: &str) -> Result<(usize, f64, Option<u64>), String> {
    let bad = || format!("bad workload {w:?}: want T<clients>x<rate> or T<clients>x<rate>b<burst µs>");
    let (c, rest) = w.strip_prefix('T').and_then(|s| s.split_once('x')).ok_or_else(bad)?;
    let (r, burst) = match rest.split_once('b') {
        Some((r, b)) => (r, Some(b.parse().map_err(|_| bad())?)),
        None => (rest, None),
    };
    Ok((c.parse().map_err(|_| bad())?, r.parse().map_err(|_| bad())?, burst))
}

pub fn run(args: &CompareArgs) -> Result<(), String> {
    let corecast = match &args.corecast_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("corecast"),
    };
    if !corecast.is_file() {
        return Err(format!(
            "{} not found; build it with `cargo build --release` or pass --corecast-bin",
            corecast.display()
        ));
    }
    let mut servers = vec![Server {
        name: "corecast".into(),
        protocol: Protocol::Summoner,
        program: corecast.clone(),
        config: Some(corecast_config(None)),
    }];
    let mut windows = args.corecast_windows.clone();
    windows.sort_unstable();
    if windows.windows(2).any(|w| w[0] == w[1]) {
        return Err("--corecast-windows: a window is listed twice".into());
    }
    for &us in &args.corecast_windows {
        servers.push(Server {
            name: format!("corecast-w{us}"),
            protocol: Protocol::Summoner,
            program: corecast.clone(),
            config: Some(corecast_config(Some(us))),
        });
    }
    crate::report::check_percentiles(&args.output.percentiles)?;
    for peer in args.peers.iter().filter(|p| !p.is_empty()) {
        let (name, protocol, program) = match peer.as_str() {
            "nats" => ("nats-server", Protocol::Nats, "nats-server"),
            "redis" => ("redis-server", Protocol::Redis, "redis-server"),
            other => return Err(format!("unknown peer {other:?} (nats, redis)")),
        };
        match find_on_path(program) {
            Some(path) => servers.push(Server {
                name: name.into(),
                protocol,
                program: path,
                config: None,
            }),
            None => eprintln!("note: {program} is not installed; skipping it (Debian package {program})"),
        }
    }
    if !(args.latency_bound_ms > 0.0 && args.latency_bound_ms.is_finite()) {
        return Err(format!(
            "--latency-bound-ms: {} is not a positive number of ms",
            args.latency_bound_ms
        ));
    }
    let server_cpu: usize = args.server_cpu.parse().map_err(|_| "bad --server-cpu".to_string())?;
    let loadgen_cpus = parse_cpus(&args.loadgen_cpus)?;
    if let Some(&cpu) = loadgen_cpus.first() {
        pin_current_thread(cpu);
    }
    let scratch = std::env::temp_dir().join(format!("corecast-compare-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    // Before the runs: the date is the start, and the source commit is read before any
    // output file is written.
    let meta = Meta::collect(
        servers
            .iter()
            .map(|s| ServerInfo::of_program(&s.name, &s.program, s.settings(&scratch)))
            .collect(),
    );

    let mut all: Vec<(String, usize, String, RunResult)> = Vec::new();
    let mut anchors: Vec<AnchorRound> = Vec::new();
    let mut table = String::from(
        "| workload | server | delivered msgs/s | p99 latency | p99 ÷ floor | server CPU ns/delivery | CPU/delivery ÷ least | lost | receivers closed | CPU/delivery vs corecast |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for workload in &args.workloads {
        let (clients, rate, burst) = parse_workload(workload)?;
        // Every client publishes, so each receives the lines of all the others.
        let per_recipient = clients.saturating_sub(1) as f64 * rate;
        for round in 0..args.rounds {
            // The anchor right before the round's servers, so that drift shows per round.
            let probe = anchor::Probe::for_recipients(clients, Some(server_cpu), loadgen_cpus.first().copied());
            let (least, floor) = match anchor::measure(&probe) {
                Ok((cost, floor)) => {
                    let least = (rate > 0.0).then(|| Least::of(&cost, per_recipient, args.size, args.latency_bound_ms));
                    eprintln!(
                        "{workload} round {} {}",
                        round + 1,
                        anchor_line(&cost, &floor, least.as_ref())
                    );
                    anchors.push(AnchorRound {
                        workload: workload.clone(),
                        round,
                        send_cost: cost,
                        floor,
                        least,
                    });
                    (least, Some(floor))
                }
                Err(e) => {
                    eprintln!("{workload} round {} anchor: not measured: {e}", round + 1);
                    (None, None)
                }
            };
            for server in &servers {
                let running = start(server, server_cpu, &scratch)?;
                let run_args = RunArgs {
                    target: vec![format!("127.0.0.1:{}", running.port)],
                    protocol: server.protocol,
                    clients,
                    publishers: clients,
                    rate,
                    size: args.size,
                    burst_us: burst.unwrap_or(args.burst_us),
                    duration: args.duration,
                    warmup: args.warmup,
                    drain: 5.0,
                    connect_rate: 0.0,
                    source_ips: None,
                    threads: args.threads,
                    cpus: Some(args.loadgen_cpus.clone()),
                    server_pid: Some(running.child.id()),
                    json: None,
                    tls: Default::default(),
                    no_progress: true,
                    scenario: Scenario::Fanout,
                    slow: None,
                    stuck_readers: None,
                    reader_rate: None,
                    slow_readers: None,
                    pause_readers: None,
                    pause_ms: None,
                    pause_at_ms: 0,
                    output: OutputArgs {
                        percentiles: args.output.percentiles.clone(),
                        ..OutputArgs::default()
                    },
                };
                let mut result = crate::runner::run(&run_args)?;
                result.least_ns_per_delivery = least.map(|l| l.ns_per_delivery);
                result.cpu_over_least = result
                    .server_cpu_ns_per_delivery
                    .zip(least)
                    .map(|(ns, l)| ns / l.ns_per_delivery);
                result.floor_p99_us = floor.map(|f| f.p99_us);
                result.p99_over_floor = floor.map(|f| result.latency_us.p99 as f64 / f.p99_us);
                eprintln!(
                    "{workload} round {} {:<13} {:>10.0} msgs/s  p99 {:>7} µs  {:>7.0} ns/delivery  lost {}  closed {}  generator {:.2} s CPU",
                    round + 1,
                    server.name,
                    result.msgs_per_sec,
                    result.latency_us.p99,
                    result.server_cpu_ns_per_delivery.unwrap_or(f64::NAN),
                    result.lost,
                    result.readers_disconnected,
                    result.loadgen_cpu_s
                );
                drop(running);
                all.push((workload.clone(), round, server.name.clone(), result));
            }
        }
        for server in &servers {
            let runs: Vec<&RunResult> = all
                .iter()
                .filter(|r| &r.0 == workload && r.2 == server.name)
                .map(|r| &r.3)
                .collect();
            let med = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let ratio = if server.name == "corecast" {
                "1.00".to_string()
            } else {
                // Median over rounds of (peer / corecast) CPU per delivery: > 1 means the peer costs more.
                let per_round: Vec<f64> = (0..args.rounds)
                    .filter_map(|round| {
                        let get = |name: &str| {
                            all.iter()
                                .find(|r| &r.0 == workload && r.1 == round && r.2 == name)
                                .and_then(|r| r.3.server_cpu_ns_per_delivery)
                        };
                        Some(get("corecast")? / get(&server.name)?)
                    })
                    .collect();
                median(per_round).map_or("-".into(), |r| format!("{r:.2}"))
            };
            let p99_ms = med(&|r| r.latency_us.p99 as f64).unwrap_or(0.0) / 1000.0;
            // Above the bound the server wrote less often than the bound needs: its
            // multiple flatters it, so it is marked.
            let over_least = med(&|r| r.cpu_over_least.unwrap_or(f64::NAN)).map_or("-".into(), |m| {
                let mark = if p99_ms > args.latency_bound_ms { "*" } else { "" };
                format!("{m:.2}{mark}")
            });
            let over_floor = med(&|r| r.p99_over_floor.unwrap_or(f64::NAN)).map_or("-".into(), |m| format!("{m:.2}"));
            table.push_str(&format!(
                "| {workload} | {} | {:.0} | {p99_ms:.2} ms | {over_floor} | {:.0} | {over_least} | {:.0} | {:.0} | {ratio} |\n",
                server.name,
                med(&|r| r.msgs_per_sec).unwrap_or(0.0),
                med(&|r| r.server_cpu_ns_per_delivery.unwrap_or(f64::NAN)).unwrap_or(f64::NAN),
                med(&|r| r.lost as f64).unwrap_or(0.0),
                med(&|r| r.readers_disconnected as f64).unwrap_or(0.0),
            ));
        }
    }
    println!("{table}");
    println!("(medians of {} rounds; `b0`: each line written with its own write; p99 ÷ floor: the server's p99 divided by the p99 of one line sent alone to as many loopback sockets by a sender that does nothing else (the fan-out floor, measured before each round), median of per-round multiples; CPU/delivery ÷ least: the server's CPU per delivery divided by the least a relay could spend holding no line longer than {} ms, at the send cost measured before each round, median of per-round multiples, * when the server's p99 was above that bound; receivers closed: those the server closed or warned; last column: corecast's CPU per delivery divided by the server's, median of per-round ratios)", args.rounds, args.latency_bound_ms);
    for line in anchor_summary(&anchors, &args.workloads) {
        println!("{line}");
    }
    if let Some(path) = &args.json {
        let runs: Vec<_> = all
            .iter()
            .map(|(w, round, name, r)| serde_json::json!({"workload": w, "round": round, "server": name, "result": r}))
            .collect();
        let anchor = serde_json::json!({ "latency_bound_ms": args.latency_bound_ms, "rounds": anchors });
        let doc = serde_json::json!({ "meta": meta, "anchor": anchor, "runs": runs, "table_markdown": table });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n",
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
    write_outputs(&args.output, &meta, &all, &anchors, &args.workloads, &names, &table)
}

/// One round's probe for the terminal: the send cost, the fit, the fan-out floor and the
/// least.
fn anchor_line(cost: &anchor::SendCost, floor: &FanoutFloor, least: Option<&Least>) -> String {
    let mut s = format!(
        "anchor        a send costs {:.0} ns + {:.3} ns/B ({} sockets: {} B {:.0} ns, {} B {:.0} ns); a line alone to all: p50 {:.0} µs, p99 {:.0} µs",
        cost.a_ns,
        cost.b_ns_per_byte,
        cost.sockets,
        cost.small_bytes,
        cost.small_ns,
        cost.large_bytes,
        cost.large_ns,
        floor.p50_us,
        floor.p99_us
    );
    if let Some(l) = least {
        s.push_str(&format!(
            "; least {:.0} ns/delivery ({:.3} writes/delivery at {} ms)",
            l.ns_per_delivery, l.writes_per_delivery, l.latency_bound_ms
        ));
    }
    s
}

/// Per workload, the medians over its rounds of the send cost, the fan-out floor and the
/// least.
fn anchor_summary(anchors: &[AnchorRound], workloads: &[String]) -> Vec<String> {
    let mut lines = Vec::new();
    for w in workloads {
        let rounds: Vec<&AnchorRound> = anchors.iter().filter(|a| &a.workload == w).collect();
        let med = |f: &dyn Fn(&AnchorRound) -> Option<f64>| median(rounds.iter().filter_map(|a| f(a)).collect());
        let (Some(a), Some(b)) = (
            med(&|r| Some(r.send_cost.a_ns)),
            med(&|r| Some(r.send_cost.b_ns_per_byte)),
        ) else {
            continue;
        };
        let floor = med(&|r| Some(r.floor.p99_us)).unwrap_or(f64::NAN);
        let mut line = format!(
            "anchor {w}: a send costs {a:.0} ns + {b:.3} ns/B ({} sockets, median of {} rounds); fan-out floor (p99 of a line sent alone to every socket) {floor:.0} µs",
            rounds[0].send_cost.sockets,
            rounds.len()
        );
        if let (Some(l), Some(least)) = (rounds[0].least, med(&|r| r.least.map(|l| l.ns_per_delivery))) {
            line.push_str(&format!(
                "; {:.0} lines/s per recipient need {:.3} writes per delivery at {} ms, envelopes of {} B: least {least:.0} ns per delivery",
                l.lines_per_s_per_recipient, l.writes_per_delivery, l.latency_bound_ms, l.envelope_bytes
            ));
        }
        lines.push(line);
    }
    lines
}

/// What `--report`, `--hgrm`, `--csv` and `--charts` ask for, for a whole comparison.
fn write_outputs(
    out: &OutputArgs,
    meta: &Meta,
    all: &[(String, usize, String, RunResult)],
    anchors: &[AnchorRound],
    workloads: &[String],
    servers: &[&str],
    table: &str,
) -> Result<(), String> {
    let runs: Vec<CompareRun> = all
        .iter()
        .map(|(w, round, server, result)| CompareRun {
            workload: w,
            round: *round,
            server,
            result,
        })
        .collect();
    if let Some(prefix) = &out.hgrm {
        for w in workloads {
            for s in servers {
                let mut merged = crate::engine::histogram();
                for r in runs.iter().filter(|r| r.workload == w && r.server == *s) {
                    let _ = merged.add(csv::overall(r.result));
                }
                write_file(&hgrm::path(prefix, &[w, s]), &hgrm::distribution(&merged))?;
            }
        }
    }
    if let Some(prefix) = &out.csv {
        let labels: Vec<[String; 3]> = runs
            .iter()
            .map(|r| [r.workload.to_string(), (r.round + 1).to_string(), r.server.to_string()])
            .collect();
        let rows: Vec<csv::Row> = runs
            .iter()
            .zip(&labels)
            .map(|(r, l)| csv::Row {
                labels: l,
                result: r.result,
            })
            .collect();
        let names = ["workload", "round", "server"];
        write_file(
            &csv::path(prefix, "summary"),
            &csv::summary(&names, &rows, &out.percentiles),
        )?;
        write_file(&csv::path(prefix, "timeline"), &csv::timeline(&names, &rows))?;
    }
    if let Some(path) = &out.report {
        write_file(
            path,
            &html::compare_report(meta, &runs, anchors, workloads, servers, table),
        )?;
    }
    if let Some(dir) = &out.charts {
        write_charts(dir, &html::compare_charts(&runs, workloads, servers))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corecast_configs_are_json_with_the_window_only_when_given() {
        let plain: serde_json::Value = serde_json::from_str(&corecast_config(None)).unwrap();
        assert_eq!(
            plain["hyper_parameters"]["rate_limit_msgs_per_minute"],
            serde_json::Value::Null
        );
        assert!(plain["hyper_parameters"].get("flush_window_us").is_none(), "{plain}");
        assert_eq!(plain["logger"]["log_level"], "WARNING");
        let zero: serde_json::Value = serde_json::from_str(&corecast_config(Some(0))).unwrap();
        assert_eq!(zero["hyper_parameters"]["flush_window_us"], 0);
        assert!(zero["hyper_parameters"]["rate_limit_msgs_per_minute"].is_null());
    }

    #[test]
    fn workloads_parse() {
        assert_eq!(parse_workload("T100x30").unwrap(), (100, 30.0, None));
        assert_eq!(parse_workload("T10x30000b0").unwrap(), (10, 30000.0, Some(0)));
        assert_eq!(parse_workload("T10x30000b250").unwrap(), (10, 30000.0, Some(250)));
        assert!(parse_workload("100x30").is_err());
        assert!(parse_workload("T10x30000b").is_err());
    }
}
