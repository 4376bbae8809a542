//! The result of one run: the JSON object `--json` writes and the human summary, overall
//! and per receiver class (healthy, rate-limited, pausing, stuck). The submodules turn
//! results into the other outputs: `.hgrm` distributions, CSV, the HTML report with its
//! charts, the run's metadata, and the live progress line.

pub mod chart;
pub mod csv;
pub mod hgrm;
pub mod html;
pub mod live;
pub mod meta;

use std::fmt::Write;

use serde::Serialize;

use crate::proto::Protocol;
use crate::reader::ReaderClass;
use crate::Scenario;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Latency {
        let q = |p: f64| if h.is_empty() { 0 } else { h.value_at_quantile(p) };
        Latency {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max(),
        }
    }
}

/// The outcome for one class of receivers.
#[derive(Debug, Clone, Serialize)]
pub struct ClassResult {
    pub class: ReaderClass,
    pub receivers: usize,
    /// Rate-limited class: the bytes per second each reads at most.
    pub reader_rate: Option<f64>,
    /// Pausing class: how long each stopped reading.
    pub pause_ms: Option<f64>,
    /// Deliveries owed to this class, and what it got (zero for stuck receivers, which are
    /// not accounted).
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Deliveries of lines scheduled in the measured window, per second, for the class.
    pub msgs_per_sec: f64,
    pub latency_us: Option<Latency>,
    /// The longest time any receiver of the class went without a delivery during the
    /// measured window (from its start to its end), in ms.
    pub max_gap_ms: Option<f64>,
    pub bytes_read: u64,
    /// Receivers the server closed (EOF, reset or failed write), during the run or, for
    /// stuck ones, found when they read after the stop.
    pub closed_by_server: usize,
    /// Receivers that got a notice (`Warning: ...` or a server error).
    pub warned: usize,
    /// Receivers closed or warned.
    pub disconnected: usize,
    /// When each close seen during the run reached its receiver, in ms since the first
    /// line was sent (the start of the warm-up), sorted; at most 20.
    pub closed_after_ms: Vec<f64>,
    /// Stuck receivers whose close was found only after the stop, behind unread data.
    pub closed_seen_at_end: usize,
    /// Distinct notice texts the class received; at most 20.
    pub notices: Vec<String>,
}

/// One second of the run, counted from the start of the warm-up.
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    pub t: u64,
    /// Deliveries received in this second of lines scheduled in the measured window.
    pub delivered: u64,
    pub p99_us: u64,
    /// The server's CPU time in this second, in ms (`--server-pid`; seconds of the drain
    /// are not sampled).
    pub server_cpu_ms: Option<f64>,
}

/// One reported latency percentile (`--percentiles`).
#[derive(Debug, Clone, Serialize)]
pub struct Percentile {
    /// In percent: 99.9 is the 99.9th percentile.
    pub percentile: f64,
    pub us: u64,
}

/// `percentiles` (in percent) of `h`, zero when it is empty.
pub fn percentiles_of(h: &hdrhistogram::Histogram<u64>, percentiles: &[f64]) -> Vec<Percentile> {
    percentiles
        .iter()
        .map(|&percentile| Percentile {
            percentile,
            us: if h.is_empty() {
                0
            } else {
                h.value_at_percentile(percentile)
            },
        })
        .collect()
}

/// `--percentiles` must be in (0, 100].
pub fn check_percentiles(percentiles: &[f64]) -> Result<(), String> {
    match percentiles.iter().find(|p| !(**p > 0.0 && **p <= 100.0)) {
        Some(p) => Err(format!("--percentiles: {p} is not in (0, 100]")),
        None => Ok(()),
    }
}

/// `99.9` → `p99.9`, `50` → `p50`: the name of a percentile in CSV headers and summaries.
pub fn percentile_name(p: f64) -> String {
    format!("p{p}")
}

/// A latency histogram of one receiver class, kept for the `.hgrm` files and the report.
#[derive(Debug, Clone)]
pub struct ClassHistogram {
    pub class: ReaderClass,
    pub histogram: hdrhistogram::Histogram<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub protocol: Protocol,
    pub scenario: Scenario,
    pub target: String,
    pub clients: usize,
    pub publishers: usize,
    /// Lines per second per publisher (0 = unpaced).
    pub rate: f64,
    /// Lines of one publisher go out in bursts this far apart (0 = one line at a time).
    pub burst_us: u64,
    /// Payload bytes per line.
    pub size: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub threads: usize,
    /// Lines published (all phases).
    pub sent: u64,
    /// write(2) calls that carried them (`--burst-us 0`: one per line while the sockets
    /// take them).
    pub publisher_writes: u64,
    /// With `--burst-us 0`: lines that could not go out with a write of their own because
    /// the socket still held bytes it had refused (they went out together with them).
    pub queued_lines: u64,
    /// Deliveries owed: every line to every other counted receiver.
    pub expected: u64,
    /// Unique deliveries.
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Deliveries of lines scheduled in the measured window, per second.
    pub msgs_per_sec: f64,
    /// The same in payload megabytes (10^6) per second.
    pub mb_per_sec: f64,
    /// Scheduled send time to receipt, for lines scheduled in the measured window.
    pub latency_us: Latency,
    /// The same at the `--percentiles` asked for.
    pub percentiles_us: Vec<Percentile>,
    /// With several targets (a cluster): the deliveries that crossed nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_node: Option<CrossNode>,
    pub timeline: Vec<Tick>,
    /// The generator's CPU time during the measured window.
    pub loadgen_cpu_s: f64,
    pub loadgen_saturated: bool,
    /// The server's CPU time during the measured window (`--server-pid`).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_ns_per_delivery: Option<f64>,
    /// `compare`: the least CPU per delivery any relay could spend on this workload at
    /// `--latency-bound-ms`, from the send-cost probe of this run's round (`anchor.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub least_ns_per_delivery: Option<f64>,
    /// `compare`: `server_cpu_ns_per_delivery` divided by `least_ns_per_delivery`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_over_least: Option<f64>,
    /// `compare`: the fan-out floor of this run's round (`anchor.rs`): the p99 of one line
    /// sent alone to as many loopback sockets by a sender that does nothing else, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_p99_us: Option<f64>,
    /// `compare`: the run's p99 divided by `floor_p99_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_over_floor: Option<f64>,
    /// The server's resident memory once every client was connected (`--server-pid`).
    pub server_rss_kib: Option<u64>,
    /// Idle scenario: growth of the server's RSS per connection.
    pub server_rss_bytes_per_connection: Option<f64>,
    pub slow_consumers: usize,
    /// Notices (`Warning: ...`) or server errors received by the clients.
    pub notices: u64,
    /// Connections the server closed before the end.
    pub closed_by_server: u64,
    /// Per receiver class, only the classes the run had.
    pub classes: Vec<ClassResult>,
    /// Receivers that read (healthy, rate-limited, pausing) and were closed or warned.
    pub readers_disconnected: usize,
    /// No receiver that reads was closed or warned: what a run that must "close nobody"
    /// asserts. Stuck receivers are reported in their class.
    pub closed_no_reader: bool,
    /// Churn / bad-input connections made, and notices they got back.
    pub side_connections: u64,
    pub side_notices: u64,
    pub errors: Vec<String>,
    /// Versions, machine, date and command line (`run`; `compare` records it once at the top).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<meta::Meta>,
    /// Latency histograms of the classes that read, for `.hgrm` files and the report.
    #[serde(skip)]
    pub histograms: Vec<ClassHistogram>,
}

impl RunResult {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} {:?}: {} clients, {} publishers at {} lines/s, {} B, {:.1} s (+{:.1} s warm-up)",
            self.protocol,
            self.scenario,
            self.clients,
            self.publishers,
            self.rate,
            self.size,
            self.duration_s,
            self.warmup_s
        );
        let _ = writeln!(
            s,
            "  delivered {:>12.0} msgs/s  {:>8.2} MB/s   ({} of {} expected; lost {}, duplicated {}, reordered {})",
            self.msgs_per_sec,
            self.mb_per_sec,
            self.delivered,
            self.expected,
            self.lost,
            self.duplicated,
            self.reordered
        );
        let _ = write!(s, "  latency µs  ");
        for p in &self.percentiles_us {
            let _ = write!(s, " {} {} ", percentile_name(p.percentile), p.us);
        }
        let _ = writeln!(s, " max {}", self.latency_us.max);
        if let Some(c) = &self.cross_node {
            let _ = writeln!(s, "  {}", c.human());
        }
        let _ = write!(s, "  cpu          loadgen {:.2} s", self.loadgen_cpu_s);
        if self.publisher_writes > 0 {
            let _ = write!(
                s,
                " ({:.2} lines per write)",
                self.sent as f64 / self.publisher_writes as f64
            );
        }
        if let (Some(cpu), Some(ns)) = (self.server_cpu_s, self.server_cpu_ns_per_delivery) {
            let _ = write!(s, ", server {cpu:.2} s = {ns:.0} ns per delivery");
        }
        s.push('\n');
        if let Some(rss) = self.server_rss_kib {
            let _ = write!(s, "  server rss   {rss} KiB");
            if let Some(per) = self.server_rss_bytes_per_connection {
                let _ = write!(s, " ({per:.0} B per connection)");
            }
            s.push('\n');
        }
        if self.notices + self.closed_by_server + self.side_connections > 0 || self.slow_consumers > 0 {
            let _ = writeln!(
                s,
                "  events       notices {}, closed by server {}, slow consumers {}, side connections {} ({} notices)",
                self.notices, self.closed_by_server, self.slow_consumers, self.side_connections, self.side_notices
            );
        }
        let special = self.classes.iter().any(|c| c.class != ReaderClass::Healthy);
        if special || self.classes.iter().any(|c| c.disconnected > 0) {
            for c in &self.classes {
                let _ = writeln!(s, "  {}", c.human());
            }
        }
        for e in &self.errors {
            let _ = writeln!(s, "  warning: {e}");
        }
        s
    }
}

impl ClassResult {
    fn human(&self) -> String {
        let mut s = format!("{:<12} x{}", self.class.name(), self.receivers);
        if let Some(rate) = self.reader_rate {
            let _ = write!(s, " at {rate:.0} B/s");
        }
        if let Some(ms) = self.pause_ms {
            let _ = write!(s, " for {ms:.0} ms");
        }
        if self.class != ReaderClass::Stuck {
            let _ = write!(
                s,
                ": {} of {} (lost {}, reordered {}, duplicated {})",
                self.delivered, self.expected, self.lost, self.reordered, self.duplicated
            );
            if let Some(l) = &self.latency_us {
                let _ = write!(s, ", p99 {} µs, max {} µs", l.p99, l.max);
            }
            if let Some(gap) = self.max_gap_ms {
                let _ = write!(s, ", longest gap {gap:.1} ms");
            }
        }
        let _ = write!(s, "; disconnected {}", self.disconnected);
        if self.closed_by_server > 0 {
            let _ = write!(s, " (closed {}", self.closed_by_server);
            if let Some(first) = self.closed_after_ms.first() {
                let _ = write!(s, ", first {:.0} ms after the start", first);
            }
            if self.closed_seen_at_end > 0 {
                let _ = write!(s, ", {} found only after the stop", self.closed_seen_at_end);
            }
            s.push(')');
        }
        for n in &self.notices {
            let _ = write!(s, "; notice {n:?}");
        }
        s
    }
}

/// Deliveries in the measured window whose publisher and receiver were on different
/// targets (nodes of a cluster), and their latency.
#[derive(Debug, Clone, Serialize)]
pub struct CrossNode {
    pub delivered_in_window: u64,
    /// Their share of all deliveries in the window.
    pub share: f64,
    pub latency_us: Latency,
}

impl CrossNode {
    fn human(&self) -> String {
        let l = &self.latency_us;
        format!(
            "cross-node   {} deliveries ({:.0}%): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            self.delivered_in_window,
            self.share * 100.0,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        )
    }
}

/// Writes what `--report`, `--hgrm` and `--csv` ask for, for one run.
pub fn write_run_outputs(result: &RunResult, out: &crate::OutputArgs) -> Result<(), String> {
    if let Some(prefix) = &out.hgrm {
        for h in &result.histograms {
            write_file(
                &hgrm::path(prefix, &[h.class.name()]),
                &hgrm::distribution(&h.histogram),
            )?;
        }
    }
    if let Some(prefix) = &out.csv {
        let rows = [csv::Row { labels: &[], result }];
        write_file(
            &csv::path(prefix, "summary"),
            &csv::summary(&[], &rows, &out.percentiles),
        )?;
        write_file(&csv::path(prefix, "timeline"), &csv::timeline(&[], &rows))?;
    }
    if let Some(path) = &out.report {
        write_file(path, &html::run_report(result))?;
    }
    if let Some(dir) = &out.charts {
        write_charts(dir, &html::run_charts(result))?;
    }
    Ok(())
}

/// Each chart as `dir/<id>.svg`.
pub fn write_charts(dir: &std::path::Path, charts: &[chart::Chart]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for c in charts {
        write_file(&dir.join(format!("{}.svg", c.id)), &c.svg())?;
    }
    Ok(())
}

pub fn write_file(path: &std::path::Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
