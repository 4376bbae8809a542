//! Logging: tracing to stderr in the Summoner form `<date> - <name> - <LEVEL> - <message>`,
//! with Python's level names (WARNING) and a chrono date format from the config. glommio
//! logs through the `log` crate; `tracing-log` forwards those records here too.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogLevel};

/// Formats one event as a Summoner log line.
struct SummonerFormat {
    name: String,
    date_format: String,
}

impl<S, N> FormatEvent<S, N> for SummonerFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let now = chrono::Local::now();
        write!(
            writer,
            "{} - {} - {} - ",
            now.format(&self.date_format),
            self.name,
            level_name(*event.metadata().level())
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => "INFO",
        Level::WARN => "WARNING",
        Level::ERROR => "ERROR",
    }
}

fn filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Off => LevelFilter::OFF,
    }
}

/// The subscriber for `config`, writing to `writer`.
fn subscriber<W>(config: &LogConfig, name: &str, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let level = if config.console {
        filter(config.level)
    } else {
        LevelFilter::OFF
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(writer)
        .event_format(SummonerFormat {
            name: name.to_string(),
            date_format: config.date_format.clone(),
        })
        .finish()
}

/// Installs the global subscriber and forwards `log` records (glommio's) to it. Call once,
/// before any shard starts.
pub fn init(config: &LogConfig, name: &str) {
    let _ = subscriber(config, name, std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_crate_records_show_through_in_the_summoner_form() {
        let _ = tracing_log::LogTracer::init();
        let out = Captured::default();
        let writer = out.clone();
        let config = crate::config::Config::default().log;
        let sub = subscriber(&config, "relay", move || writer.clone());
        tracing::subscriber::with_default(sub, || {
            log::warn!(target: "glommio::sys::uring", "Error: registering buffers in the main ring. Skipping");
            log::debug!(target: "glommio", "below the INFO level");
            tracing::info!("plain tracing event");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with(" - relay - WARNING - Error: registering buffers in the main ring. Skipping"));
        assert!(lines[1].ends_with(" - relay - INFO - plain tracing event"));
    }
}
