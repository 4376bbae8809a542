//! Logging: tracing to stderr in the Summoner form `<date> - <name> - <LEVEL> - <message>`,
//! with Python's level names (WARNING) and a chrono date format from the config. glommio
//! logs through the `log` crate; `tracing-log` forwards those records here too.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
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

/// Installs the global subscriber. Call once, before any shard starts.
pub fn init(config: &LogConfig, name: &str) {
    let level = if config.console {
        filter(config.level)
    } else {
        LevelFilter::OFF
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(SummonerFormat {
            name: name.to_string(),
            date_format: config.date_format.clone(),
        })
        .try_init();
}
