//! Logging (docs/protocol.md#configuration `logger.*`, #logs): tracing events written in
//! the Summoner form `<date> - <name> - <LEVEL> - <message>` with Python's level names
//! (WARNING), or with `enable_json_log` as one JSON object per line (`timestamp` in RFC
//! 3339 with its offset, `level`, `name`, `message`, then the event's structured fields:
//! `peer`, `shard`, `reason`, `rule`, counts), to stderr (`enable_console_log`) and/or
//! appended to `<log_file_path>/<name>.log` (`enable_file_log`), which [`rotate`] rotates
//! by size (`max_file_size`, `backup_count`) and reopens on SIGUSR1.
//!
//! corecast's own events say everything in their message and carry the same data as
//! fields, so a text line is the message alone and a JSON line has both. Events of other
//! crates (async-nats through `tracing`, glommio through the `log` crate, which
//! `tracing-log` forwards here) are written in the same form, their message prefixed with
//! the crate's name and followed by their fields as `key=value`.
//!
//! `main` calls [`init`] once, before any shard starts. The file is written by a
//! `tracing-appender` worker thread, so shard threads never wait on the disk; its queue
//! is bounded (lines past it are dropped, not buffered without limit) and the returned
//! [`LogGuard`] flushes it when `main` returns. Relayed messages are logged by
//! [`relayed`], at DEBUG only, with `log_keys` applied by [`prune_payload`]. A config
//! reload changes the level with [`set_level`].

use std::borrow::Cow;
use std::fmt;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Registry;

use crate::config::{LogConfig, LogLevel};

pub mod rotate;
use rotate::LogFile;

/// The installed subscriber's level, which [`set_level`] changes.
static LEVEL: OnceLock<reload::Handle<LevelFilter, Registry>> = OnceLock::new();
/// The log file [`init`] opened, which SIGUSR1 (or [`reopen_file`]) reopens.
static FILE: OnceLock<LogFile> = OnceLock::new();

/// The target of the one-line-per-relayed-message DEBUG events.
pub const RELAY_TARGET: &str = "corecast::relay";

/// Formats one event as a Summoner text line or a JSON object.
struct SummonerFormat {
    name: String,
    date_format: String,
    json: bool,
}

impl<S, N> FormatEvent<S, N> for SummonerFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = level_name(*event.metadata().level());
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let target = fields.log_target.clone();
        let target = target.as_deref().unwrap_or(event.metadata().target());
        // Another crate's event: its name opens the message.
        let krate = (!target.starts_with("corecast")).then(|| target.split("::").next().unwrap_or(target));
        if let Some(krate) = krate {
            fields.message = format!("{krate}: {}", fields.message);
        }
        if self.json {
            let now = chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
            return writer.write_str(&json_line(&now, level, &self.name, fields));
        }
        let now = chrono::Local::now().format(&self.date_format).to_string();
        write!(writer, "{now} - {} - {level} - ", self.name)?;
        if krate.is_some() || target == RELAY_TARGET {
            // Their fields are not in their message: written after it, as tracing does.
            if let Some(krate) = krate {
                write!(writer, "{krate}: ")?;
            }
            ctx.field_format().format_fields(writer.by_ref(), event)?;
        } else {
            writer.write_str(&fields.message)?;
        }
        writeln!(writer)
    }
}

/// The event's message and other fields, as JSON values.
#[derive(Default)]
struct JsonFields {
    message: String,
    fields: Vec<(&'static str, Value)>,
    /// The `log` crate's target of a record forwarded by `tracing-log`.
    log_target: Option<String>,
}

impl JsonFields {
    fn record(&mut self, field: &Field, value: Value) {
        match field.name() {
            "message" => {
                self.message = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                }
            }
            "log.target" => {
                if let Value::String(target) = value {
                    self.log_target = Some(target);
                }
            }
            // tracing-log's copies of a `log` record's metadata, as the text format skips them.
            name if name.starts_with("log.") => {}
            name => self.fields.push((name, value)),
        }
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.record(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields arrive here too, already in their Display form.
        self.record(field, format!("{value:?}").into());
    }
}

/// One JSON object on one line: `timestamp`, `level`, `name`, `message`, then the fields
/// in the order the event gave them (a field named like one of the four gets `field_`).
fn json_line(timestamp: &str, level: &str, name: &str, fields: JsonFields) -> String {
    let mut out = String::with_capacity(128 + fields.message.len());
    let mut push = |key: &str, value: &Value| {
        out.push(if out.is_empty() { '{' } else { ',' });
        out.push_str(&Value::from(key).to_string());
        out.push(':');
        out.push_str(&value.to_string());
    };
    push("timestamp", &timestamp.into());
    push("level", &level.into());
    push("name", &name.into());
    push("message", &Value::from(fields.message));
    for (key, value) in &fields.fields {
        if matches!(*key, "timestamp" | "level" | "name" | "message") {
            push(&format!("field_{key}"), value);
        } else {
            push(key, value);
        }
    }
    out.push_str("}\n");
    out
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

/// The subscriber for `config`: a console sink and a file sink, each optional, and the
/// handle that changes its level.
fn subscriber<C, F>(
    config: &LogConfig,
    name: &str,
    console: Option<C>,
    file: Option<F>,
) -> (impl Subscriber + Send + Sync, reload::Handle<LevelFilter, Registry>)
where
    C: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    F: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let format = || SummonerFormat {
        name: name.to_string(),
        date_format: config.date_format.clone(),
        json: config.json,
    };
    let level = if console.is_some() || file.is_some() {
        filter(config.level)
    } else {
        LevelFilter::OFF
    };
    let (level, handle) = reload::Layer::new(level);
    let subscriber = tracing_subscriber::registry()
        .with(level)
        .with(console.map(|w| tracing_subscriber::fmt::layer().with_writer(w).event_format(format())))
        .with(file.map(|w| tracing_subscriber::fmt::layer().with_writer(w).event_format(format())));
    (subscriber, handle)
}

/// Changes the level of the subscriber [`init`] installed (a config reload calls this);
/// events already below the old level are now written or not at once. Does nothing before
/// [`init`], and keeps `Off` when no sink is enabled.
pub fn set_level(level: LogLevel) {
    if let Some(handle) = LEVEL.get() {
        let _ = handle.modify(|current| {
            if *current != LevelFilter::OFF || level == LogLevel::Off {
                *current = filter(level);
            }
        });
    }
}

/// Reopens the log file (what SIGUSR1 does): `None` without a file log.
pub fn reopen_file() -> Option<std::io::Result<()>> {
    FILE.get().map(LogFile::reopen)
}

/// The log file could not be opened.
#[derive(Debug)]
pub struct LogFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for LogFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "logger.log_file_path: cannot open log file {}: {}",
            self.path.display(),
            self.reason
        )
    }
}

impl std::error::Error for LogFileError {}

/// Keeps the file writer's worker alive; dropping it flushes what is queued.
pub struct LogGuard {
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// `<log_file_path>/<name>.log`; an empty path means the working directory.
pub fn log_file_path(config: &LogConfig, name: &str) -> PathBuf {
    let dir = if config.file_path.is_empty() {
        PathBuf::from(".")
    } else {
        PathBuf::from(&config.file_path)
    };
    dir.join(format!("{name}.log"))
}

/// Installs the global subscriber and forwards `log` records (glommio's) to it, and has
/// SIGUSR1 reopen the log file. Call once, before any shard starts. With
/// `enable_file_log`, creates the log directory if needed and opens the file for
/// appending, or says why it cannot.
pub fn init(config: &LogConfig, name: &str) -> Result<LogGuard, LogFileError> {
    let (file, guard) = if config.file {
        let log_file = open_file(config, name)?;
        let _ = FILE.set(log_file.clone());
        let (writer, guard) = tracing_appender::non_blocking(log_file);
        (Some(writer), Some(guard))
    } else {
        (None, None)
    };
    let console = config.console.then_some(std::io::stderr);
    let (subscriber, handle) = subscriber(config, name, console, file);
    if subscriber.try_init().is_ok() {
        let _ = LEVEL.set(handle);
    }
    watch_reopen_signal();
    Ok(LogGuard { _worker: guard })
}

/// A thread that reopens the log file at every SIGUSR1 (logrotate's `postrotate`). Also
/// installed without a file log, so that the signal never ends the process.
fn watch_reopen_signal() {
    let signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1]) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!("cannot handle SIGUSR1 (log file reopen): {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("corecast-logreopen".into())
        .spawn(move || {
            let mut signals = signals;
            for _ in signals.forever() {
                match reopen_file() {
                    Some(Ok(())) => tracing::info!("SIGUSR1 received; log file reopened"),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "SIGUSR1 received; cannot reopen the log file ({e}); still writing to the old one")
                    }
                    None => tracing::info!("SIGUSR1 received; no log file to reopen"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the SIGUSR1 thread (log file reopen): {e}");
    }
}

/// What `corecast check` does for the log: with `enable_file_log`, refuses a path [`init`]
/// would refuse, with the same error, without creating or writing anything (a check
/// changes nothing): an existing file must open for appending; otherwise the nearest
/// existing ancestor of its directory must be a directory this process may create
/// entries in, as `init` will create the rest.
pub fn check_file(config: &LogConfig, name: &str) -> Result<(), LogFileError> {
    if !config.file {
        return Ok(());
    }
    let path = log_file_path(config, name);
    let refused = |e: std::io::Error| LogFileError {
        path: path.clone(),
        reason: e.to_string(),
    };
    if path.exists() {
        return OpenOptions::new().append(true).open(&path).map(drop).map_err(refused);
    }
    let mut dir = path.parent().map(std::path::Path::to_path_buf);
    while let Some(d) = dir {
        let probe = if d.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            d.clone()
        };
        match std::fs::metadata(&probe) {
            Ok(m) if !m.is_dir() => return Err(refused(std::io::Error::from_raw_os_error(libc::ENOTDIR))),
            Ok(_) => return may_create_in(&probe).map_err(refused),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !d.as_os_str().is_empty() => {
                dir = d.parent().map(std::path::Path::to_path_buf);
            }
            Err(e) => return Err(refused(e)),
        }
    }
    Ok(())
}

/// Whether this process may create entries in `dir` (write and search permission).
fn may_create_in(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: access reads a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates the log directory if needed and opens the file for appending.
fn open_file(config: &LogConfig, name: &str) -> Result<LogFile, LogFileError> {
    let path = log_file_path(config, name);
    LogFile::open(path.clone(), config.max_file_size, config.backup_count).map_err(|e| LogFileError {
        path,
        reason: e.to_string(),
    })
}

/// Logs one relayed line at DEBUG (the caller checks that DEBUG is enabled first, so the
/// hot path pays nothing when it is not), keeping only `log_keys` of a JSON payload.
pub fn relayed(remote_addr: &str, line: &str, log_keys: Option<&[String]>) {
    let content = prune_payload(line, log_keys);
    tracing::debug!(target: RELAY_TARGET, remote_addr = %remote_addr, content = %content, "relayed line");
}

/// `log_keys` for a relayed line: when set and the line is a JSON object, only the listed
/// keys are kept (in the listed order; absent ones are skipped). Anything else (no
/// `log_keys`, not JSON, JSON that is not an object) is logged unchanged: there are no keys
/// to choose from, and dropping the line would hide traffic from the log.
pub fn prune_payload<'a>(line: &'a str, log_keys: Option<&[String]>) -> Cow<'a, str> {
    let Some(keys) = log_keys else {
        return Cow::Borrowed(line);
    };
    if !line.trim_start().starts_with('{') {
        return Cow::Borrowed(line);
    }
    let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(line) else {
        return Cow::Borrowed(line);
    };
    let mut out = String::with_capacity(line.len());
    out.push('{');
    for key in keys {
        if let Some(value) = object.remove(key) {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&Value::from(key.as_str()).to_string());
            out.push(':');
            out.push_str(&value.to_string());
        }
    }
    out.push('}');
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Offset;
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
        let out = Captured::default();
        let writer = out.clone();
        let config = crate::config::Config::defaults_for(&crate::machine::Machine::detect()).log;
        let (sub, _) = subscriber(&config, "relay", Some(move || writer.clone()), NO_FILE);
        // Each record goes the way the `log` bridge sends it (`format_trace`), straight to
        // this thread's subscriber: through the global `log` logger, the process-wide
        // `log::max_level` that other tests running at once may lower would decide instead.
        let record = |level, target, text| {
            tracing_log::format_trace(
                &log::Record::builder()
                    .level(level)
                    .target(target)
                    .args(format_args!("{text}"))
                    .build(),
            )
            .unwrap();
        };
        tracing::subscriber::with_default(sub, || {
            record(
                log::Level::Warn,
                "glommio::sys::uring",
                "Error: registering buffers in the main ring. Skipping",
            );
            record(log::Level::Debug, "glommio", "below the INFO level");
            tracing::info!("plain tracing event");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].ends_with(" - relay - WARNING - glommio: Error: registering buffers in the main ring. Skipping"),
            "{text}"
        );
        assert!(lines[1].ends_with(" - relay - INFO - plain tracing event"));
    }

    const NO_FILE: Option<fn() -> std::io::Sink> = None;

    fn capture(config: &LogConfig, f: impl FnOnce()) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let (sub, _) = subscriber(config, "relay", Some(move || writer.clone()), NO_FILE);
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn json_lines_carry_timestamp_level_name_message_and_fields() {
        let _ = tracing_log::LogTracer::init();
        let mut config = crate::config::Config::defaults_for(&crate::machine::Machine::detect()).log;
        config.json = true;
        // Text only: JSON lines always carry RFC 3339.
        config.date_format = "%Y".into();
        let text = capture(&config, || {
            tracing::warn!(peer = "1.2.3.4:5", count = 3u64, ok = true, "slow \"consumer\"");
            log::error!(target: "glommio", "from the log crate");
            relayed("1.2.3.4:5", "hello", None);
        });
        let mut lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "DEBUG is below INFO: {text}");
        let stamp = lines[0]["timestamp"].take();
        let stamp = stamp.as_str().unwrap();
        let parsed = chrono::DateTime::parse_from_rfc3339(stamp).unwrap_or_else(|e| panic!("{stamp}: {e}"));
        let offset = chrono::Local::now().offset().fix();
        assert_eq!(*parsed.offset(), offset, "local time with its offset: {stamp}");
        assert!((chrono::Local::now().fixed_offset() - parsed).num_seconds().abs() < 600);
        assert_eq!(
            lines[0],
            serde_json::json!({"timestamp": null, "level": "WARNING", "name": "relay",
                "message": "slow \"consumer\"", "peer": "1.2.3.4:5", "count": 3, "ok": true})
        );
        assert!(text.starts_with("{\"timestamp\":"), "field order: {text}");
        assert_eq!(lines[1]["message"], "glommio: from the log crate");
        assert_eq!(lines[1]["level"], "ERROR");
        assert_eq!(lines[1].as_object().unwrap().len(), 4, "no log.* fields: {}", lines[1]);
    }

    #[test]
    fn text_lines_of_corecast_say_it_in_the_message_and_other_crates_add_their_fields() {
        let config = crate::config::Config::defaults_for(&crate::machine::Machine::detect()).log;
        let text = capture(&config, || {
            tracing::info!(
                peer = "1.2.3.4:5",
                shard = 0u64,
                "client connected: 1.2.3.4:5 (shard 0)"
            );
            tracing::info!(target: "async_nats::connector", server = 4222, max_payload = 1024, "connected successfully");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].ends_with(" - relay - INFO - client connected: 1.2.3.4:5 (shard 0)"),
            "{text}"
        );
        assert!(
            lines[1].ends_with(" - relay - INFO - async_nats: connected successfully server=4222 max_payload=1024"),
            "{text}"
        );
        // The default timestamp is RFC 3339 with the offset.
        let stamp = lines[0].split(" - ").next().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(stamp).is_ok(), "{stamp}");
    }

    #[test]
    fn the_level_handle_changes_what_is_written_at_once() {
        let config = crate::config::Config::defaults_for(&crate::machine::Machine::detect()).log;
        let out = Captured::default();
        let writer = out.clone();
        let (sub, handle) = subscriber(&config, "relay", Some(move || writer.clone()), NO_FILE);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("hidden");
            handle.modify(|l| *l = filter(LogLevel::Debug)).unwrap();
            tracing::debug!("shown");
            handle.modify(|l| *l = filter(LogLevel::Error)).unwrap();
            tracing::warn!("hidden too");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with(" - DEBUG - shown\n"), "{text}");
    }

    #[test]
    fn relayed_lines_are_logged_at_debug_with_their_sender() {
        let mut config = crate::config::Config::defaults_for(&crate::machine::Machine::detect()).log;
        config.level = LogLevel::Debug;
        let text = capture(&config, || relayed("[::1]:7", "a b", None));
        assert!(
            text.ends_with(" - relay - DEBUG - relayed line remote_addr=[::1]:7 content=a b\n"),
            "{text}"
        );
    }

    #[test]
    fn log_keys_keep_only_the_listed_keys_of_a_json_object() {
        let keys = ["type".to_string(), "id".to_string(), "absent".to_string()];
        let keys = Some(&keys[..]);
        assert_eq!(
            prune_payload(r#"{"secret":"x","id":7,"type":{"k":[1,2]}}"#, keys),
            r#"{"type":{"k":[1,2]},"id":7}"#
        );
        assert_eq!(prune_payload(r#"{"secret":"x"}"#, keys), "{}");
        for unchanged in [
            "plain text",
            "[1,2]",
            "{not json",
            "  ",
            "\"str\"",
            "{\"a\":1} trailing",
        ] {
            assert_eq!(prune_payload(unchanged, keys), unchanged);
        }
        assert_eq!(prune_payload(r#"{"secret":"x"}"#, None), r#"{"secret":"x"}"#);
    }
}
