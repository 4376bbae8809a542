//! The run's once-a-second sampler, driven by the runner's main loop (every 10 ms): it
//! reads the server's CPU time at each second boundary (kept for the timeline whether or
//! not anyone watches) and, on a terminal, shows a progress bar with the last second's
//! delivered rate and p99, the sequence numbers still missing, reorders and the server's
//! CPU. Off a terminal, or with `--no-progress`, it prints nothing.

use std::sync::atomic::Ordering;

use crate::engine::Control;
use crate::measure::{clock_ticks_per_sec, server_cpu_ticks};

pub struct LiveMonitor {
    bar: Option<indicatif::ProgressBar>,
    server_pid: Option<u32>,
    /// Start of the run (the warm-up), ns since the generator's epoch.
    start_ns: u64,
    /// The next second boundary to sample, in seconds since the start.
    next_second: u64,
    last_delivered: u64,
    last_server_ticks: Option<u64>,
    /// The server's CPU time per second of the run in ms; index = second since the start.
    server_cpu_ms: Vec<Option<f64>>,
}

/// Whether the live line should show: stderr is a terminal and `--no-progress` is off.
pub fn wanted(no_progress: bool) -> bool {
    use std::io::IsTerminal;
    !no_progress && std::io::stderr().is_terminal()
}

impl LiveMonitor {
    /// `show`: draw the bar (see [`wanted`]); `seconds`: warm-up plus measured time.
    pub fn new(show: bool, seconds: f64, server_pid: Option<u32>, start_ns: u64) -> Self {
        let bar = show.then(|| {
            let bar = indicatif::ProgressBar::new((seconds * 1000.0) as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {elapsed}/{duration} {msg}") {
                bar.set_style(style);
            }
            bar
        });
        LiveMonitor {
            bar,
            server_pid,
            start_ns,
            next_second: 0,
            last_delivered: 0,
            last_server_ticks: None,
            server_cpu_ms: Vec::new(),
        }
    }

    /// Called often (every few ms); does its work when `now` crosses a second boundary.
    pub fn step(&mut self, now: u64, control: &Control) {
        if let Some(bar) = &self.bar {
            bar.set_position(now.saturating_sub(self.start_ns) / 1_000_000);
        }
        if now < self.start_ns + self.next_second * 1_000_000_000 {
            return;
        }
        let ticks = self.server_pid.and_then(server_cpu_ticks);
        let cpu_ms = match (self.last_server_ticks, ticks) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 * 1000.0 / clock_ticks_per_sec()),
            _ => None,
        };
        if self.next_second > 0 {
            self.server_cpu_ms.push(cpu_ms);
        }
        self.last_server_ticks = ticks;
        self.next_second += 1;
        let delivered = control.delivered.load(Ordering::Relaxed);
        let rate = delivered - self.last_delivered;
        self.last_delivered = delivered;
        let Some(bar) = &self.bar else { return };
        let p99 = {
            let mut recent = control.recent.lock().unwrap_or_else(|p| p.into_inner());
            let p99 = (!recent.is_empty()).then(|| recent.value_at_quantile(0.99));
            recent.reset();
            p99
        };
        bar.set_message(line(
            rate,
            p99,
            control.missing.load(Ordering::Relaxed),
            control.reordered.load(Ordering::Relaxed),
            cpu_ms,
        ));
    }

    /// Clears the bar; returns the server's CPU per second, in ms (see [`super::Tick`]).
    pub fn finish(self) -> Vec<Option<f64>> {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        self.server_cpu_ms
    }
}

/// The live line's text: `rate 30000/s  p99 1.20 ms  missing 0  reordered 0  server CPU 41%`.
pub fn line(rate: u64, p99_us: Option<u64>, missing: i64, reordered: u64, server_cpu_ms: Option<f64>) -> String {
    let p99 = p99_us.map_or("-".to_string(), |us| format!("{:.2} ms", us as f64 / 1000.0));
    let mut s = format!("rate {rate}/s  p99 {p99}  missing {missing}  reordered {reordered}");
    if let Some(ms) = server_cpu_ms {
        s.push_str(&format!("  server CPU {:.0}%", ms / 10.0));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_line_shows_rate_p99_loss_reorders_and_server_cpu() {
        assert_eq!(
            line(30000, Some(1200), 3, 2, Some(410.0)),
            "rate 30000/s  p99 1.20 ms  missing 3  reordered 2  server CPU 41%"
        );
        assert_eq!(line(0, None, 0, 0, None), "rate 0/s  p99 -  missing 0  reordered 0");
    }
}
