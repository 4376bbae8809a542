//! HdrHistogram's percentile distribution text (`.hgrm`), the format HdrHistogram's
//! `outputPercentileDistribution` prints and wrk2 `--latency` and memtier
//! `--hdr-file-prefix` write, which HdrHistogram's plotter and other tools read: a header,
//! one row per percentile step (value, percentile as a fraction, cumulative count,
//! 1/(1-percentile)), five steps per halving of the distance to 100%, and a footer with
//! mean, standard deviation, max, count and the histogram's bucket layout. Values are in
//! milliseconds (the histograms hold µs).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

/// Rows per halving of the distance to 100%, as HdrHistogram's own output uses.
const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// µs per output unit (ms).
const SCALE: f64 = 1000.0;

/// `PREFIX-a-b.hgrm`; the parts are made safe for a file name.
pub fn path(prefix: &Path, parts: &[&str]) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    for p in parts {
        name.push("-");
        name.push(file_safe(p));
    }
    name.push(".hgrm");
    PathBuf::from(name)
}

/// Letters, digits, `.`, `_` and `-` stay; anything else becomes `_`.
pub fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The percentile distribution of `h` (µs), in ms.
pub fn distribution(h: &Histogram<u64>) -> String {
    let digits = usize::from(h.sigfig());
    let mut s = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / SCALE;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(s, "{value:12.digits$} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
            } else {
                let _ = writeln!(s, "{value:12.digits$} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / SCALE, h.stdev() / SCALE, h.max() as f64 / SCALE)
    };
    let _ = writeln!(s, "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]");
    let _ = writeln!(s, "#[Max     = {max:12.digits$}, Total count    = {:12}]", h.len());
    // HdrHistogram's sub-bucket count: the power of two that holds 2 * 10^digits values.
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_has_hdrhistograms_layout() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap();
        }
        let text = distribution(&h);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       Value     Percentile TotalCount 1/(1-Percentile)");
        assert_eq!(lines[1], "");
        assert_eq!(lines[2], "       0.010 0.000000000000          1           1.00");
        let last = lines.iter().rev().find(|l| !l.starts_with('#')).unwrap();
        assert_eq!(*last, "      10.007 1.000000000000       1000");
        assert!(lines.contains(&"#[Max     =       10.007, Total count    =         1000]"));
        assert!(lines.contains(&"#[Buckets =           16, SubBuckets     =         2048]"));
        assert_eq!(
            path(Path::new("out/run"), &["T10x30000", "nats server"]),
            PathBuf::from("out/run-T10x30000-nats_server.hgrm")
        );
    }
}
