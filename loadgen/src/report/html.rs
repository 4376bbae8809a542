//! The HTML report (`--report`): one self-contained file (inline CSS, charts inline as SVG,
//! nothing fetched), written as XHTML so any XML parser reads it. A run's report has the
//! summary, the metadata and four charts (latency by percentile per receiver class,
//! delivered rate and p99 per second, server CPU per delivery per second); a comparison's
//! has the table, the physical anchor (each round's send cost, fan-out floor and the least
//! CPU per delivery it gives), the metadata, and per workload the latency by percentile
//! per server (all rounds), CPU per delivery and p99 with every round as a point, and the
//! per-round ratios to corecast. [`run_charts`] and [`compare_charts`] are also what `--charts` writes.

use std::fmt::Write;

use hdrhistogram::Histogram;

use super::chart::{escape, Axis, Chart, Series, Style};
use super::meta::Meta;
use super::{percentile_name, RunResult};
use crate::anchor::AnchorRound;

/// One run of a comparison.
pub struct CompareRun<'a> {
    pub workload: &'a str,
    /// From 0.
    pub round: usize,
    pub server: &'a str,
    pub result: &'a RunResult,
}

const CSS: &str = "body{font-family:sans-serif;max-width:60em;margin:1em auto;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}\
td.n{text-align:right}figure{margin:1em 0}figcaption{font-weight:bold}code{font-size:90%}";

/// The x axis of per-second charts: seconds since the start of the warm-up.
const SECONDS: &str = "time since the start of the warm-up (s)";
const LATENCY_MS_LOG: &str = "latency (ms, log scale)";
const PERCENTILE: &str = "percentile (log scale of 1/(1-p))";

/// The latency spectrum of `h` (µs): points (1/(1-p), ms), HdrHistogram's plot.
pub fn spectrum(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<(f64, f64)> = h
        .iter_quantiles(5)
        .filter(|v| v.quantile_iterated_to() < 1.0)
        .map(|v| {
            (
                1.0 / (1.0 - v.quantile_iterated_to()),
                v.value_iterated_to() as f64 / 1000.0,
            )
        })
        .collect();
    // The maximum sits at 1/(1-p) = count: the last of count values.
    let last_x = points.last().map_or(1.0, |p| p.0);
    points.push(((h.len() as f64).max(last_x), h.max() as f64 / 1000.0));
    points
}

/// The charts of one run.
pub fn run_charts(r: &RunResult) -> Vec<Chart> {
    let mut charts = vec![Chart {
        id: "latency-spectrum".into(),
        title: "Latency by percentile, per receiver class".into(),
        x_label: PERCENTILE.into(),
        y_label: LATENCY_MS_LOG.into(),
        x_axis: Axis::Percentile,
        y_axis: Axis::Log,
        style: Style::Lines,
        series: r
            .histograms
            .iter()
            .map(|h| Series {
                name: h.class.name().to_string(),
                points: spectrum(&h.histogram),
            })
            .collect(),
    }];
    let per_second = |f: &dyn Fn(&super::Tick) -> Option<f64>| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .filter_map(|t| Some((t.t as f64 + 0.5, f(t)?)))
            .collect()
    };
    charts.push(Chart {
        id: "rate".into(),
        title: "Delivered rate per second (lines of the measured window)".into(),
        x_label: SECONDS.into(),
        y_label: "deliveries per second (msgs/s)".into(),
        x_axis: Axis::Linear,
        y_axis: Axis::Linear,
        style: Style::Lines,
        series: vec![Series {
            name: "delivered".into(),
            points: per_second(&|t| Some(t.delivered as f64)),
        }],
    });
    charts.push(Chart {
        id: "p99".into(),
        title: "p99 latency per second".into(),
        x_label: SECONDS.into(),
        y_label: "p99 latency (ms)".into(),
        x_axis: Axis::Linear,
        y_axis: Axis::Linear,
        style: Style::Lines,
        series: vec![Series {
            name: "p99".into(),
            points: per_second(&|t| (t.delivered > 0).then_some(t.p99_us as f64 / 1000.0)),
        }],
    });
    if r.timeline.iter().any(|t| t.server_cpu_ms.is_some()) {
        charts.push(Chart {
            id: "server-cpu".into(),
            title: "Server CPU per delivery, per second".into(),
            x_label: SECONDS.into(),
            y_label: "server CPU per delivery (ns)".into(),
            x_axis: Axis::Linear,
            y_axis: Axis::Linear,
            style: Style::Lines,
            series: vec![Series {
                name: "server CPU / delivery".into(),
                points: per_second(&|t| {
                    let ms = t.server_cpu_ms?;
                    (t.delivered > 0).then(|| ms * 1e6 / t.delivered as f64)
                }),
            }],
        });
    }
    charts
}

/// The charts of a comparison: four per workload (three without peers).
pub fn compare_charts<'r>(runs: &'r [CompareRun<'r>], workloads: &'r [String], servers: &[&'r str]) -> Vec<Chart> {
    let mut charts = Vec::new();
    for w in workloads {
        let of = |server: &'r str| of(runs, w, server);
        let id = super::hgrm::file_safe(w);
        charts.push(Chart {
            id: format!("{id}-latency-spectrum"),
            title: format!("{w}: latency by percentile, per server (all rounds)"),
            x_label: PERCENTILE.into(),
            y_label: LATENCY_MS_LOG.into(),
            x_axis: Axis::Percentile,
            y_axis: Axis::Log,
            style: Style::Lines,
            series: servers
                .iter()
                .map(|s| {
                    let mut all = crate::engine::histogram();
                    for r in of(s) {
                        let _ = all.add(super::csv::overall(r.result));
                    }
                    Series {
                        name: s.to_string(),
                        points: spectrum(&all),
                    }
                })
                .collect(),
        });
        let per_round = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<Series> {
            servers
                .iter()
                .map(|s| Series {
                    name: s.to_string(),
                    points: of(s)
                        .filter_map(|r| Some(((r.round + 1) as f64, f(r.result)?)))
                        .collect(),
                })
                .collect()
        };
        charts.push(Chart {
            id: format!("{id}-cpu-per-delivery"),
            title: format!("{w}: server CPU per delivery, each round"),
            x_label: "round".into(),
            y_label: "server CPU per delivery (ns)".into(),
            x_axis: Axis::Rounds,
            y_axis: Axis::Linear,
            style: Style::Points,
            series: per_round(&|r| r.server_cpu_ns_per_delivery),
        });
        charts.push(Chart {
            id: format!("{id}-p99"),
            title: format!("{w}: p99 latency, each round"),
            x_label: "round".into(),
            y_label: "p99 latency (ms)".into(),
            x_axis: Axis::Rounds,
            y_axis: Axis::Linear,
            style: Style::Points,
            series: per_round(&|r| Some(r.latency_us.p99 as f64 / 1000.0)),
        });
        let Some((base, peers)) = servers.split_first() else {
            continue;
        };
        if peers.is_empty() {
            continue;
        }
        let mut ratios = Vec::new();
        for peer in peers {
            let metrics: [(&str, Metric); 2] = [
                ("CPU per delivery", |r| r.server_cpu_ns_per_delivery),
                ("p99", |r| Some(r.latency_us.p99 as f64)),
            ];
            for (metric, f) in metrics {
                let points = of(base)
                    .filter_map(|b| {
                        let p = of(peer).find(|p| p.round == b.round)?;
                        let (a, c) = (f(b.result)?, f(p.result)?);
                        (c > 0.0).then(|| ((b.round + 1) as f64, a / c))
                    })
                    .collect();
                ratios.push(Series {
                    name: format!("{metric}, {base} ÷ {peer}"),
                    points,
                });
            }
        }
        charts.push(Chart {
            id: format!("{id}-ratios"),
            title: format!("{w}: {base} ÷ each peer, per round (below 1: {base} lower)"),
            x_label: "round".into(),
            y_label: format!("ratio {base} ÷ peer (log scale, 1 = equal)"),
            x_axis: Axis::Rounds,
            // Log: p99 ratios span decades where CPU ratios stay near 1.
            y_axis: Axis::Log,
            style: Style::Points,
            series: ratios,
        });
    }
    charts
}

/// One number of a run, when it has it.
type Metric = fn(&RunResult) -> Option<f64>;

/// The runs of workload `w` on `server`.
fn of<'r>(runs: &'r [CompareRun<'r>], w: &'r str, server: &'r str) -> impl Iterator<Item = &'r CompareRun<'r>> + 'r {
    runs.iter().filter(move |r| r.workload == w && r.server == server)
}

/// The report of one run.
pub fn run_report(r: &RunResult) -> String {
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<p>{} {:?}: {} clients, {} publishers at {} lines/s each, {} B lines, {} s measured after {} s of warm-up.</p>",
        escape(&r.protocol.to_string()),
        r.scenario,
        r.clients,
        r.publishers,
        r.rate,
        r.size,
        r.duration_s,
        r.warmup_s
    );
    body.push_str("<h2>Summary</h2>\n<table id=\"summary\">\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(
            body,
            "<tr><th>{}</th><td class=\"n\">{}</td></tr>",
            escape(k),
            escape(&v)
        );
    };
    row("delivered (msgs/s)", format!("{:.0}", r.msgs_per_sec));
    row("delivered (MB/s)", format!("{:.2}", r.mb_per_sec));
    row("expected / delivered", format!("{} / {}", r.expected, r.delivered));
    row(
        "lost / duplicated / reordered",
        format!("{} / {} / {}", r.lost, r.duplicated, r.reordered),
    );
    for p in &r.percentiles_us {
        row(
            &format!("latency {} (µs)", percentile_name(p.percentile)),
            p.us.to_string(),
        );
    }
    row("latency max (µs)", r.latency_us.max.to_string());
    if let (Some(cpu), Some(ns)) = (r.server_cpu_s, r.server_cpu_ns_per_delivery) {
        row("server CPU (s) / per delivery (ns)", format!("{cpu:.2} / {ns:.0}"));
    }
    row("generator CPU (s)", format!("{:.2}", r.loadgen_cpu_s));
    row("receivers closed or warned", r.readers_disconnected.to_string());
    body.push_str("</table>\n");
    if !r.errors.is_empty() {
        body.push_str("<ul>\n");
        for e in &r.errors {
            let _ = writeln!(body, "<li>warning: {}</li>", escape(e));
        }
        body.push_str("</ul>\n");
    }
    if let Some(meta) = &r.meta {
        body.push_str(&meta_table(meta));
    }
    body.push_str("<h2>Charts</h2>\n");
    let charts = run_charts(r);
    if !charts.iter().any(|c| c.id == "server-cpu") {
        body.push_str("<p>No server CPU chart: the run had no <code>--server-pid</code>.</p>\n");
    }
    for c in &charts {
        body.push_str(&figure(c));
    }
    page("corecast-loadgen run", &body)
}

/// The report of a comparison; `table` is its markdown table.
pub fn compare_report<'r>(
    meta: &Meta,
    runs: &'r [CompareRun<'r>],
    anchors: &[AnchorRound],
    workloads: &'r [String],
    servers: &[&'r str],
    table: &str,
) -> String {
    let mut body = String::new();
    let rounds = runs.iter().map(|r| r.round + 1).max().unwrap_or(0);
    let _ = writeln!(
        body,
        "<p>{} on {} in alternating rounds ({rounds} rounds; each server pinned to one CPU, a fresh server per run).</p>",
        escape(&servers.join(", ")),
        escape(&workloads.join(", "))
    );
    body.push_str("<h2>Medians</h2>\n");
    body.push_str(&markdown_table(table));
    body.push_str(&anchor_table(anchors));
    body.push_str(&meta_table(meta));
    for w in workloads {
        let _ = writeln!(body, "<h2>{}</h2>", escape(w));
        for c in compare_charts(runs, std::slice::from_ref(w), servers) {
            body.push_str(&figure(&c));
        }
    }
    page("corecast-loadgen compare", &body)
}

fn figure(c: &Chart) -> String {
    format!(
        "<figure class=\"chart\" id=\"{}\">\n<figcaption>{}</figcaption>\n{}</figure>\n",
        escape(&c.id),
        escape(&c.title),
        c.svg()
    )
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>{t}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{t}</h1>\n{body}</body>\n</html>\n",
        t = escape(title)
    )
}

/// Each round's probe: the send cost, the fan-out floor and the least CPU per delivery it
/// gives the workload.
fn anchor_table(anchors: &[AnchorRound]) -> String {
    let mut s = String::from("<h2>Physical anchor</h2>\n");
    if anchors.is_empty() {
        s.push_str("<p>No send cost was measured.</p>\n");
        return s;
    }
    let bound = anchors
        .iter()
        .find_map(|a| a.least.map(|l| format!("{} ms", l.latency_bound_ms)))
        .unwrap_or_else(|| "the latency bound".into());
    let _ = writeln!(
        s,
        "<p>Before each round, the sender's CPU per loopback send (one send to each socket per burst, the sender on the servers' CPU, one epoll reader on the generator's), fitted as a + b·bytes; then the fan-out floor: lines of the small size sent alone to every socket in turn, each once the reader had read the last and slept, timed from the start of the line's first send to its arrival at the reader (no relay can have a lower p99 with that many recipients). The least CPU per delivery is w·a + b·(envelope bytes), with w = 1/(1 + λW) writes per delivery for λ lines/s per recipient and W = {bound}.</p>"
    );
    s.push_str("<table id=\"anchor\">\n<tr>");
    for h in [
        "workload",
        "round",
        "sockets",
        "small send (B / ns)",
        "large send (B / ns)",
        "a (ns per send)",
        "b (ns per byte)",
        "fan-out floor p50 / p99 (µs)",
        "lines/s per recipient",
        "writes per delivery",
        "envelope (B)",
        "least CPU per delivery (ns)",
    ] {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr>\n");
    for a in anchors {
        let c = &a.send_cost;
        let mut cells = vec![
            a.workload.clone(),
            (a.round + 1).to_string(),
            c.sockets.to_string(),
            format!("{} / {:.0}", c.small_bytes, c.small_ns),
            format!("{} / {:.0}", c.large_bytes, c.large_ns),
            format!("{:.0}", c.a_ns),
            format!("{:.3}", c.b_ns_per_byte),
            format!("{:.0} / {:.0}", a.floor.p50_us, a.floor.p99_us),
        ];
        match &a.least {
            Some(l) => cells.extend([
                format!("{:.0}", l.lines_per_s_per_recipient),
                format!("{:.4}", l.writes_per_delivery),
                l.envelope_bytes.to_string(),
                format!("{:.0}", l.ns_per_delivery),
            ]),
            None => cells.extend(std::iter::repeat_n("-".to_string(), 4)),
        }
        s.push_str("<tr>");
        for (i, cell) in cells.iter().enumerate() {
            let class = if i == 0 { "" } else { " class=\"n\"" };
            let _ = write!(s, "<td{class}>{}</td>", escape(cell));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    s
}

fn meta_table(m: &Meta) -> String {
    let mut s = String::from("<h2>Environment</h2>\n<table id=\"meta\">\n");
    let mut row = |k: &str, v: &str| {
        let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    };
    let none = "unknown";
    row("date (UTC)", &m.date);
    row("generator version", m.loadgen_version);
    row("source commit", m.source_commit.as_deref().unwrap_or(none));
    row("kernel", m.kernel.as_deref().unwrap_or(none));
    row("CPU model", m.cpu_model.as_deref().unwrap_or(none));
    row("CPUs", &m.cpus.to_string());
    row("command line", &shell_words(&m.command_line));
    for server in &m.servers {
        let name = &server.name;
        row(&format!("{name} version"), server.version.as_deref().unwrap_or(none));
        if let Some(c) = &server.commit {
            row(&format!("{name} commit"), c);
        }
        row(&format!("{name} program"), server.program.as_deref().unwrap_or(none));
        row(&format!("{name} settings"), &shell_words(&server.settings));
    }
    s.push_str("</table>\n");
    s
}

/// Arguments as a shell would need them: one that is empty or holds anything but letters,
/// digits and `-_./:=,<>@+%` goes in single quotes (`--save ''`, `'pubsub 0 0 0'`).
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,<>@+%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A markdown table (`| a | b |` rows, the second the alignment row) as an HTML table.
fn markdown_table(md: &str) -> String {
    let mut s = String::from("<table id=\"medians\">\n");
    for (i, line) in md.lines().filter(|l| l.starts_with('|')).enumerate() {
        if i == 1 {
            continue;
        }
        let tag = if i == 0 { "th" } else { "td" };
        s.push_str("<tr>");
        for cell in line.trim().trim_matches('|').split('|') {
            let _ = write!(s, "<{tag}>{}</{tag}>", escape(cell.trim()));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_as_a_shell_command_line() {
        let args = ["--save", "", "--client-output-buffer-limit", "pubsub 0 0 0", "it's"].map(String::from);
        assert_eq!(
            shell_words(&args),
            "--save '' --client-output-buffer-limit 'pubsub 0 0 0' 'it'\\''s'"
        );
    }
}
