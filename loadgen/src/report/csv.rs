//! CSV (RFC 4180, header row first) for spreadsheets and scripts: the summary, one row per
//! run, and the per-second timeline, one row per second of each run. `compare` puts its
//! labels (workload, round, server) in the first columns; a missing value is an empty
//! field. The percentile columns follow `--percentiles`.

use std::path::{Path, PathBuf};

use super::{percentile_name, percentiles_of, RunResult};

/// One run and the labels that place it (none for `run`).
pub struct Row<'a> {
    pub labels: &'a [String],
    pub result: &'a RunResult,
}

/// `PREFIX-kind.csv`.
pub fn path(prefix: &Path, kind: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(format!("-{kind}.csv"));
    PathBuf::from(name)
}

/// The summary, one row per run; `label_names` head the label columns.
pub fn summary(label_names: &[&str], rows: &[Row], percentiles: &[f64]) -> String {
    let mut header: Vec<String> = label_names.iter().map(|s| s.to_string()).collect();
    header.extend(
        [
            "protocol",
            "scenario",
            "clients",
            "publishers",
            "rate",
            "burst_us",
            "size",
            "duration_s",
            "sent",
            "expected",
            "delivered",
            "lost",
            "duplicated",
            "reordered",
            "msgs_per_sec",
            "mb_per_sec",
        ]
        .map(String::from),
    );
    header.extend(percentiles.iter().map(|&p| format!("{}_us", percentile_name(p))));
    header.extend(
        [
            "max_us",
            "server_cpu_s",
            "server_cpu_ns_per_delivery",
            "least_ns_per_delivery",
            "cpu_over_least",
            "floor_p99_us",
            "p99_over_floor",
            "loadgen_cpu_s",
            "readers_disconnected",
        ]
        .map(String::from),
    );
    let mut out = line(&header);
    for row in rows {
        let r = row.result;
        let mut f: Vec<String> = row.labels.to_vec();
        f.extend([
            r.protocol.to_string(),
            serde_json::to_value(r.scenario)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            r.clients.to_string(),
            r.publishers.to_string(),
            r.rate.to_string(),
            r.burst_us.to_string(),
            r.size.to_string(),
            r.duration_s.to_string(),
            r.sent.to_string(),
            r.expected.to_string(),
            r.delivered.to_string(),
            r.lost.to_string(),
            r.duplicated.to_string(),
            r.reordered.to_string(),
            r.msgs_per_sec.to_string(),
            r.mb_per_sec.to_string(),
        ]);
        // The run's own percentiles when they are the ones asked for, else from its histograms.
        let values: Vec<u64> = if r.percentiles_us.len() == percentiles.len()
            && r.percentiles_us
                .iter()
                .zip(percentiles)
                .all(|(a, b)| a.percentile == *b)
        {
            r.percentiles_us.iter().map(|p| p.us).collect()
        } else {
            percentiles_of(&overall(r), percentiles).iter().map(|p| p.us).collect()
        };
        f.extend(values.iter().map(u64::to_string));
        f.extend([
            r.latency_us.max.to_string(),
            opt(r.server_cpu_s),
            opt(r.server_cpu_ns_per_delivery),
            opt(r.least_ns_per_delivery),
            opt(r.cpu_over_least),
            opt(r.floor_p99_us),
            opt(r.p99_over_floor),
            r.loadgen_cpu_s.to_string(),
            r.readers_disconnected.to_string(),
        ]);
        out.push_str(&line(&f));
    }
    out
}

/// The per-second timeline of every run.
pub fn timeline(label_names: &[&str], rows: &[Row]) -> String {
    let mut header: Vec<String> = label_names.iter().map(|s| s.to_string()).collect();
    header.extend(["second", "delivered", "p99_us", "server_cpu_ms"].map(String::from));
    let mut out = line(&header);
    for row in rows {
        for t in &row.result.timeline {
            let mut f: Vec<String> = row.labels.to_vec();
            f.extend([
                t.t.to_string(),
                t.delivered.to_string(),
                t.p99_us.to_string(),
                opt(t.server_cpu_ms),
            ]);
            out.push_str(&line(&f));
        }
    }
    out
}

/// The run's latency over every class that reads.
pub fn overall(r: &RunResult) -> hdrhistogram::Histogram<u64> {
    let mut all = crate::engine::histogram();
    for h in &r.histograms {
        let _ = all.add(&h.histogram);
    }
    all
}

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

fn line(fields: &[String]) -> String {
    let mut s = fields.iter().map(|f| quote(f)).collect::<Vec<_>>().join(",");
    s.push_str("\r\n");
    s
}

/// RFC 4180: a field with a comma, quote or line break is quoted, quotes doubled.
fn quote(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_with_separators_are_quoted() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a,b"), "\"a,b\"");
        assert_eq!(quote("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(line(&["a".into(), "b c".into()]), "a,b c\r\n");
    }
}
