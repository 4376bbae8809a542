//! The standard `process_*` series (CPU seconds, resident memory, open and maximum file
//! descriptors, start time), read from `/proc/self` at scrape time, under the names every
//! Prometheus client library exports, so that stock dashboards and alerts work unchanged.
//! Linux only, as the relay is; a figure that cannot be read is left out of the scrape
//! rather than reported as 0.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// What one scrape read; `None` for what could not be read.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Fields of `/proc/self/stat` after the command name (which may hold spaces and
/// parentheses, so the split is at the last `)`); index 0 is field 3, `state`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// Reads the figures of this process now.
pub fn read() -> ProcessFigures {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut f = ProcessFigures::default();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    if let Some(fields) = stat_fields(&stat) {
        // utime, stime: fields 14 and 15; starttime: 22; vsize: 23; rss: 24 (pages).
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            f.cpu_seconds = Some((user + system) as f64 / ticks);
        }
        f.virtual_memory_bytes = field(23);
        f.resident_memory_bytes = field(24).map(|pages| pages * page);
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if let (Some(boot), Some(start)) = (boot, field(22)) {
            f.start_time_seconds = Some(boot as f64 + start as f64 / ticks);
        }
    }
    f.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        f.max_fds = Some(limit.rlim_cur);
    }
    f
}

/// Encodes [`read`]'s figures; registered on the registry without the `corecast_` prefix.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let f = read();
        if let Some(v) = f.cpu_seconds {
            let family = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(family)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                f.resident_memory_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                f.virtual_memory_bytes,
            ),
            ("process_open_fds", "Number of open file descriptors.", f.open_fds),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit).",
                f.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(v as i64).encode(family)?;
            }
        }
        if let Some(v) = f.start_time_seconds {
            let family = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(v).encode(family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_name_may_hold_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12";
        let fields = stat_fields(stat).unwrap();
        assert_eq!(fields[0], "S");
        assert_eq!(fields[14 - 3], "11");
    }

    #[test]
    fn this_process_has_every_figure_and_they_are_plausible() {
        let f = read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(f.cpu_seconds.is_some_and(|s| s >= 0.0), "{f:?}");
        assert!(f.resident_memory_bytes.is_some_and(|b| b > 1 << 20), "{f:?}");
        assert!(f.open_fds.is_some_and(|n| n >= 3), "{f:?}");
        assert!(f.max_fds.is_some_and(|n| n >= f.open_fds.unwrap()), "{f:?}");
        assert!(
            f.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86400.0 * 30.0),
            "{f:?}"
        );
    }
}
