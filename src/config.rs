//! Configuration (docs/protocol.md#configuration, docs/protocol.md#command-line): the clap command line and the Summoner
//! `server_config.json` format, merged into one validated [`Config`].
//!
//! Precedence is built-in defaults < file < flags. The defaults that depend on the machine
//! come from a [`Machine`] passed in, so this module reads nothing itself. The file is
//! walked as a `serde_json::Value` by `Section`, which names the JSON path, the expected
//! type and range, and what was found in every error, and reports each unknown key with the
//! closest known one. (serde derive with `serde_path_to_error` and `serde_ignored` gave the
//! same messages, but only with a checked leaf type per value kind, a pre-check that
//! sections are objects and a probe for the declared keys: more lines, not fewer.) Nothing
//! outside this module sees raw CLI or JSON types.
//!
//! A new nested section (say `hyper_parameters.cluster`, an object or `null`) is a field of
//! [`Config`], a `section` or `nullable_section` call in its parent's `apply_*` that reads
//! its keys and ends with `finish` (which warns of the unknown ones), a line in `to_json`,
//! and a flag in [`ServeArgs`] applied in `apply_args` if it has one.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};

use crate::machine::Machine;
use crate::netlist::{Cidr, NetList};

/// The command line (docs/protocol.md#command-line).
#[derive(Debug, Parser)]
#[command(
    name = "corecast",
    version,
    about = "Thread-per-core TCP broadcast relay, Summoner-compatible"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Validate a config file and print the effective configuration as JSON.
    Check(ServeArgs),
}

/// Flags shared by `serve` and `check`; each one overrides the file.
#[derive(Debug, Args, Default, Clone)]
pub struct ServeArgs {
    /// Summoner-format JSON config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen host: IPv4, IPv6 or a hostname.
    #[arg(long)]
    pub host: Option<String>,
    /// Listen port (0 picks a free one and logs it).
    #[arg(long)]
    pub port: Option<u16>,
    /// Number of shards (one pinned executor each); default one per usable CPU.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Name used in log lines and the log file name.
    #[arg(long)]
    pub name: Option<String>,
    /// TRACE, DEBUG, INFO, WARN/WARNING, ERROR, CRITICAL or OFF (any case).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Serve /metrics, /healthz and /stats over HTTP on this ip:port (port 0 picks one and
    /// logs it). Off unless given here or as hyper_parameters.admin_addr.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Join a cluster over this NATS server (repeatable: list every server of the NATS
    /// cluster); replaces hyper_parameters.cluster.nats, subject "corecast" by default.
    #[arg(long = "cluster-nats", value_name = "URL")]
    pub cluster_nats: Vec<String>,
}

/// A configuration problem; the process exits 78 (EX_CONFIG) before binding anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The file named on the command line could not be read.
    Unreadable { path: PathBuf, reason: String },
    /// The file is not JSON at all.
    Syntax { path: PathBuf, reason: String },
    /// A value has the wrong type or is out of range.
    Invalid {
        key: String,
        expected: String,
        found: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Unreadable { path, reason } => {
                write!(f, "cannot read config file {}: {reason}", path.display())
            }
            ConfigError::Syntax { path, reason } => {
                write!(f, "config file {} is not valid JSON: {reason}", path.display())
            }
            ConfigError::Invalid { key, expected, found } => write!(f, "{key}: expected {expected}, found {found}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Log verbosity, with the Python names Summoner configs use mapped onto tracing's levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Off,
}

impl LogLevel {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "TRACE" => LogLevel::Trace,
            "DEBUG" => LogLevel::Debug,
            "INFO" => LogLevel::Info,
            "WARN" | "WARNING" => LogLevel::Warn,
            "ERROR" | "CRITICAL" => LogLevel::Error,
            "OFF" => LogLevel::Off,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARNING",
            LogLevel::Error => "ERROR",
            LogLevel::Off => "OFF",
        }
    }
}

/// The `logger` section.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: LogLevel,
    /// Write log lines to stderr.
    pub console: bool,
    /// Append log lines to `<file_path>/<name>.log`.
    pub file: bool,
    pub file_path: String,
    /// One JSON object per log line instead of the text form.
    pub json: bool,
    /// chrono strftime syntax for the timestamp.
    pub date_format: String,
    /// When set, relayed-message log lines keep only these payload keys.
    pub log_keys: Option<Vec<String>>,
    /// Size in bytes at which the log file is rotated (Python's `RotatingFileHandler`
    /// `maxBytes`); 0 never rotates. Default 1,000,000 (Summoner's).
    pub max_file_size: u64,
    /// Rotated files kept: `<name>.log.1` (newest) to `<name>.log.<backup_count>`; 0 never
    /// rotates, as in Python. Default 3 (Summoner's).
    pub backup_count: u32,
}

/// What a quarantine entry is keyed by (docs/protocol.md#quarantine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineBy {
    /// The peer IP: every port of a misbehaving host is refused.
    Ip,
    /// The full ip:port, the reference server's behaviour.
    Addr,
}

/// `hyper_parameters.backpressure_policy` (docs/protocol.md#backpressure). Thresholds count messages queued
/// for a stalled recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackpressureConfig {
    pub enable_throttle: bool,
    pub throttle_threshold: u64,
    pub enable_flow_control: bool,
    pub flow_control_threshold: u64,
    pub enable_disconnect: bool,
    pub disconnect_threshold: u64,
}

/// The validated, effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listen host: IPv4, IPv6 or a hostname. Default `127.0.0.1`.
    pub host: String,
    /// Listen port. Default 8888; 0 asks the kernel for a free one.
    pub port: u16,
    /// Name in log lines and the log file name. Default `corecast`.
    pub name: String,
    pub log: LogConfig,
    /// Number of shards, each one executor pinned to its own CPU. Default: usable CPUs.
    pub shards: usize,
    /// Idle timeout in seconds (docs/protocol.md#idle-timeout); `None` disables. Default 300.
    pub client_timeout_secs: Option<u64>,
    /// Period of the per-shard idle sweep, seconds. Default 30.
    pub timeout_check_interval_secs: u64,
    /// Token-bucket capacity and per-minute refill (docs/protocol.md#rate-limit); `None` disables. Default 300.
    pub rate_limit_msgs_per_minute: Option<u64>,
    /// First back-off after an accept error, doubling to 1 s. Default 100 ms.
    pub accept_error_backoff_ms: u64,
    /// How long a quarantined key is refused; 0 turns quarantine off. Default 300 s.
    pub quarantine_cooldown_secs: u64,
    /// Slow-consumer closes of one key (peer IP, or ip:port per `quarantine_by`) within
    /// ten minutes that quarantine it for `quarantine_cooldown_secs`; 1 quarantines on the
    /// first close, as the reference does. Each strike is held for its ten minutes and
    /// counts against `quarantine_max_entries`. Default 3.
    pub quarantine_strikes: u32,
    /// How often expired quarantine entries are purged. Default 60 s.
    pub quarantine_cleanup_interval_secs: u64,
    /// Read pause for a sender while a recipient is over the throttle threshold. Default 200 ms.
    pub throttle_delay_ms: u64,
    /// The most time one recipient's backlog may hold the senders back (throttle and flow
    /// control together) within any `write_deadline_ms` window. Default 1000 ms.
    pub flow_control_delay_ms: u64,
    pub backpressure: BackpressureConfig,
    /// Longest accepted line content; longer lines get N4 and a close. Default 1 MiB.
    pub max_line_bytes: usize,
    /// Bytes queued for one recipient before it is closed, whatever the policy. Default
    /// 64 MiB (NATS's per-client pending limit): room for a reader that pauses for seconds
    /// in a burst; the process-wide bound below caps the total.
    pub max_pending_bytes: usize,
    /// Memory queued for all recipients together, per process; past it every shard stops
    /// reading until it drops below. Counted as held: a batch queued for many recipients
    /// counts once, plus a small fixed cost per outbox entry. Default 1 GiB.
    pub max_total_pending_bytes: usize,
    /// Memory held by partial lines (bytes of lines still arriving) in the whole process;
    /// past it, a connection holding more than 4 KiB of a partial line is not read until
    /// the total drops below, and the others read at most up to 4 KiB of a partial line.
    /// Counted as allocated. Default 256 MiB.
    pub max_total_partial_bytes: usize,
    /// A recipient with data queued that accepts no byte for this long is closed
    /// (`slow_consumer`); also how long one may stay over `disconnect_threshold`, and the
    /// window of the pause allowance (`flow_control_delay_ms`). Default 10000 ms.
    pub write_deadline_ms: u64,
    /// Open connections per process before new ones get N6. Default: fd hard limit - 64.
    pub max_connections: usize,
    pub quarantine_by: QuarantineBy,
    /// Quarantine table bound; the oldest entry is evicted first. Default 100000.
    pub quarantine_max_entries: usize,
    /// Bound on the whole shutdown drain. Default 5000 ms.
    pub shutdown_grace_ms: u64,
    /// Flush window: under load each recipient gets at most one socket write per window,
    /// at a point staggered by client (see `pacing`), so queued envelopes ride together.
    /// Adds at most one window of latency, and only to a recipient already written within
    /// its current window; 0 writes at once. Default 1500 µs (chosen from measurements).
    pub flush_window_us: u64,
    /// Where the admin HTTP endpoint (`/metrics`, `/healthz`, `/stats`) listens; `None`
    /// (the default) serves none. It has no authentication: bind it to loopback.
    pub admin_addr: Option<SocketAddr>,
    /// `hyper_parameters.cluster`: the NATS cluster this node joins (see `cluster`); `None`
    /// (the default) is a single node, with no uplink thread and no cost.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// `hyper_parameters.tls`: a second listener whose clients speak TLS, in the same
    /// broadcast domain (see `tls`); `None` (the default) listens for plain TCP only.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Every connection to the data listener starts with a PROXY protocol header (v1 or
    /// v2) naming the client, whose address then stands for the connection everywhere
    /// (docs/protocol.md#proxy-protocol). Default false.
    pub proxy_protocol: bool,
    /// Sources allowed to send a PROXY header; with `proxy_protocol` on, a connection from
    /// anywhere else is closed with no bytes. Must not be empty when `proxy_protocol` is on.
    /// Default empty.
    pub proxy_trusted: NetList,
    /// Time from accept to the end of the PROXY header; past it the connection is closed
    /// with no bytes. Default 3000 ms.
    pub proxy_header_timeout_ms: u64,
    /// When set, only clients in these networks are admitted (docs/protocol.md#admission-by-network);
    /// `None` (the default) admits every client not denied.
    pub allow: Option<NetList>,
    /// Clients in these networks are closed at accept with no bytes, even when allowed.
    /// Default empty.
    pub deny: NetList,
    /// Open connections per client IP before new ones from it get N7; `None` (the
    /// default) sets no cap below `max_connections`.
    pub max_connections_per_ip: Option<u32>,
}

/// File descriptors kept back from `max_connections` for listeners, rings and logs.
pub const FD_RESERVE: u64 = 64;

impl Config {
    /// The built-in defaults, which depend on the machine only through `machine`: one shard
    /// per usable CPU, and `max_connections` from the open-file hard limit.
    pub fn defaults_for(machine: &Machine) -> Config {
        Config {
            host: "127.0.0.1".into(),
            port: 8888,
            name: "corecast".into(),
            log: LogConfig {
                level: LogLevel::Info,
                console: true,
                file: false,
                file_path: String::new(),
                json: false,
                date_format: DEFAULT_DATE_FORMAT.into(),
                log_keys: None,
                max_file_size: 1_000_000,
                backup_count: 3,
            },
            shards: machine.usable_cpus.max(1),
            client_timeout_secs: Some(300),
            timeout_check_interval_secs: 30,
            rate_limit_msgs_per_minute: Some(300),
            accept_error_backoff_ms: 100,
            quarantine_cooldown_secs: 300,
            quarantine_strikes: 3,
            quarantine_cleanup_interval_secs: 60,
            throttle_delay_ms: 200,
            flow_control_delay_ms: 1000,
            backpressure: BackpressureConfig {
                enable_throttle: true,
                throttle_threshold: 100,
                enable_flow_control: true,
                flow_control_threshold: 300,
                enable_disconnect: true,
                disconnect_threshold: 500,
            },
            max_line_bytes: 1 << 20,
            max_pending_bytes: 64 << 20,
            max_total_pending_bytes: 1 << 30,
            max_total_partial_bytes: 256 << 20,
            write_deadline_ms: 10_000,
            max_connections: default_max_connections(machine.nofile_hard_limit),
            quarantine_by: QuarantineBy::Ip,
            quarantine_max_entries: 100_000,
            shutdown_grace_ms: 5000,
            flush_window_us: 1500,
            admin_addr: None,
            cluster: None,
            tls: None,
            proxy_protocol: false,
            proxy_trusted: NetList::default(),
            proxy_header_timeout_ms: 3000,
            allow: None,
            deny: NetList::default(),
            max_connections_per_ip: None,
        }
    }
}

/// The open-file hard limit (to which `run` raises the soft limit) minus [`FD_RESERVE`].
fn default_max_connections(hard: u64) -> usize {
    hard.saturating_sub(FD_RESERVE).clamp(1, 10_000_000) as usize
}

/// Keys a Summoner `logger` section may carry that only the Python server uses.
const PYTHON_ONLY_LOGGER_KEYS: &[&str] = &["console_log_format", "log_format"];
/// RFC 3339 in local time with its offset, milliseconds: `2026-12-07T02:33:28.123+00:00`.
pub const DEFAULT_DATE_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.3f%:z";
/// Keys of the reference's channel design: accepted, no effect.
const INERT_HYPER_KEYS: &[&str] = &[
    "connection_buffer_size",
    "command_buffer_size",
    "control_channel_capacity",
    "queue_monitor_capacity",
];

impl Config {
    /// Builds the effective config: defaults for `machine`, then the file named by
    /// `--config`, then flags. Unknown keys come back as warnings for the caller to log once
    /// logging is set up.
    pub fn load(args: &ServeArgs, machine: &Machine) -> Result<(Config, Vec<String>), ConfigError> {
        let mut config = Config::defaults_for(machine);
        let mut warnings = Vec::new();
        if let Some(path) = &args.config {
            let text = read_file(path)?;
            let value: Value = serde_json::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            config.apply_json(&value, &mut warnings)?;
        }
        config.apply_args(args)?;
        Ok((config, warnings))
    }

    /// Applies a parsed `server_config.json` over `self`.
    pub fn apply_json(&mut self, root: &Value, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
        let mut top = Section::new(root, "")?;
        top.ignore("version");
        // Summoner's templates write `null` for "whatever run() was given": here, the default
        // (or the flag).
        if let Some(Some(host)) = top.nullable("host", string_value)? {
            self.host = host;
        }
        if let Some(Some(port)) = top.nullable("port", |v, path| int_value(v, path, 0, 65535))? {
            self.port = port as u16;
        }
        if let Some(name) = top.string("name")? {
            self.name = name;
        }
        if let Some(logger) = top.section("logger")? {
            self.apply_logger(logger, warnings)?;
        }
        if let Some(hyper) = top.section("hyper_parameters")? {
            self.apply_hyper(hyper, warnings)?;
        }
        top.finish(warnings);
        validate_host(&self.host, "host")?;
        Ok(())
    }

    fn apply_logger(&mut self, mut s: Section, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
        for key in PYTHON_ONLY_LOGGER_KEYS {
            s.ignore(key);
        }
        if let Some(level) = s.string("log_level")? {
            self.log.level = parse_level(&level, &s.path("log_level"))?;
        }
        set(&mut self.log.console, s.bool("enable_console_log")?);
        set(&mut self.log.file, s.bool("enable_file_log")?);
        set(&mut self.log.file_path, s.string("log_file_path")?);
        set(&mut self.log.json, s.bool("enable_json_log")?);
        if let Some(fmt) = s.string("date_format")? {
            validate_date_format(&fmt, &s.path("date_format"))?;
            self.log.date_format = fmt;
        }
        if let Some(keys) = s.nullable("log_keys", |v, path| {
            string_list(v, path, "an array of strings or null")
        })? {
            self.log.log_keys = keys;
        }
        set(&mut self.log.max_file_size, s.int("max_file_size", 0, u64::MAX)?);
        if let Some(n) = s.int("backup_count", 0, 1000)? {
            self.log.backup_count = n as u32;
        }
        s.finish(warnings);
        Ok(())
    }

    fn apply_hyper(&mut self, mut s: Section, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
        for key in INERT_HYPER_KEYS {
            s.ignore(key);
        }
        // Older Summoner configs put host and port here; the top level wins when both are set.
        if let Some(host) = s.string("host")? {
            if s.root_lacks("host") {
                validate_host(&host, &s.path("host"))?;
                self.host = host;
            }
        }
        if let Some(port) = s.int("port", 0, 65535)? {
            if s.root_lacks("port") {
                self.port = port as u16;
            }
        }
        if let Some(v) = s.nullable("client_timeout_secs", |v, p| int_value(v, p, 1, u32::MAX as u64))? {
            self.client_timeout_secs = v;
        }
        set(
            &mut self.timeout_check_interval_secs,
            s.int("timeout_check_interval_secs", 1, 86_400)?,
        );
        if let Some(v) = s.nullable("rate_limit_msgs_per_minute", |v, p| int_value(v, p, 0, u32::MAX as u64))? {
            self.rate_limit_msgs_per_minute = v;
        }
        set(
            &mut self.accept_error_backoff_ms,
            s.int("accept_error_backoff_ms", 1, 60_000)?,
        );
        set(
            &mut self.quarantine_cooldown_secs,
            s.int("quarantine_cooldown_secs", 0, u32::MAX as u64)?,
        );
        if let Some(strikes) = s.int("quarantine_strikes", 1, u32::MAX as u64)? {
            self.quarantine_strikes = strikes as u32;
        }
        set(
            &mut self.quarantine_cleanup_interval_secs,
            s.int("quarantine_cleanup_interval_secs", 1, 86_400)?,
        );
        set(&mut self.throttle_delay_ms, s.int("throttle_delay_ms", 0, 3_600_000)?);
        set(
            &mut self.flow_control_delay_ms,
            s.int("flow_control_delay_ms", 0, 3_600_000)?,
        );
        if let Some(v) = s.int("worker_threads", 1, 1024)? {
            self.shards = v as usize;
        }
        if let Some(mut bp) = s.section("backpressure_policy")? {
            let b = &mut self.backpressure;
            set(&mut b.enable_throttle, bp.bool("enable_throttle")?);
            set(
                &mut b.throttle_threshold,
                bp.int("throttle_threshold", 1, u32::MAX as u64)?,
            );
            set(&mut b.enable_flow_control, bp.bool("enable_flow_control")?);
            set(
                &mut b.flow_control_threshold,
                bp.int("flow_control_threshold", 1, u32::MAX as u64)?,
            );
            set(&mut b.enable_disconnect, bp.bool("enable_disconnect")?);
            set(
                &mut b.disconnect_threshold,
                bp.int("disconnect_threshold", 1, u32::MAX as u64)?,
            );
            bp.finish(warnings);
        }
        set_usize(&mut self.max_line_bytes, s.int("max_line_bytes", 1, 64 << 20)?);
        set_usize(&mut self.max_pending_bytes, s.int("max_pending_bytes", 4096, 1 << 40)?);
        set_usize(
            &mut self.max_total_pending_bytes,
            s.int("max_total_pending_bytes", 4096, 1 << 48)?,
        );
        set_usize(
            &mut self.max_total_partial_bytes,
            s.int("max_total_partial_bytes", 65536, 1 << 48)?,
        );
        set(&mut self.write_deadline_ms, s.int("write_deadline_ms", 1, 3_600_000)?);
        set_usize(&mut self.max_connections, s.int("max_connections", 1, 10_000_000)?);
        if let Some(by) = s.string("quarantine_by")? {
            self.quarantine_by = match by.as_str() {
                "ip" => QuarantineBy::Ip,
                "addr" => QuarantineBy::Addr,
                _ => {
                    return Err(invalid(
                        &s.path("quarantine_by"),
                        "\"ip\" or \"addr\"",
                        &Value::String(by),
                    ))
                }
            };
        }
        set_usize(
            &mut self.quarantine_max_entries,
            s.int("quarantine_max_entries", 1, 100_000_000)?,
        );
        set(&mut self.shutdown_grace_ms, s.int("shutdown_grace_ms", 0, 3_600_000)?);
        set(&mut self.flush_window_us, s.int("flush_window_us", 0, 1_000_000)?);
        if let Some(addr) = s.nullable("admin_addr", |v, path| match v {
            Value::String(text) => parse_admin_addr(text, path),
            _ => Err(invalid(path, ADMIN_ADDR_EXPECTED, v)),
        })? {
            self.admin_addr = addr;
        }
        if let Some(v) = s.get("cluster") {
            self.cluster = crate::cluster::config::parse(v, &s.path("cluster"), warnings).map_err(cluster_error)?;
        }
        if let Some(v) = s.get("tls") {
            self.tls = crate::tls::parse(v, &s.path("tls"), warnings).map_err(tls_error)?;
        }
        self.apply_admission(&mut s)?;
        s.finish(warnings);
        Ok(())
    }

    /// The PROXY protocol and admission-by-network keys of `hyper_parameters`.
    fn apply_admission(&mut self, s: &mut Section) -> Result<(), ConfigError> {
        set(&mut self.proxy_protocol, s.bool("proxy_protocol")?);
        if let Some(list) = s.nullable("proxy_trusted", cidr_list)? {
            self.proxy_trusted = list.unwrap_or_default();
        }
        set(
            &mut self.proxy_header_timeout_ms,
            s.int("proxy_header_timeout_ms", 1, 60_000)?,
        );
        if let Some(list) = s.nullable("allow", cidr_list)? {
            if list.as_ref().is_some_and(NetList::is_empty) {
                // An empty allow list would admit nobody: far more likely a mistake.
                return Err(invalid(&s.path("allow"), CIDR_LIST_NONEMPTY, &json!([])));
            }
            self.allow = list;
        }
        if let Some(list) = s.nullable("deny", cidr_list)? {
            self.deny = list.unwrap_or_default();
        }
        if let Some(cap) = s.nullable("max_connections_per_ip", |v, p| int_value(v, p, 1, 10_000_000))? {
            self.max_connections_per_ip = cap.map(|n| n as u32);
        }
        if self.proxy_protocol && self.proxy_trusted.is_empty() {
            // Fail closed and loud: with nobody trusted every connection would be refused.
            return Err(invalid(
                &s.path("proxy_trusted"),
                "at least one network when proxy_protocol is true",
                &json!([]),
            ));
        }
        Ok(())
    }

    /// Applies command-line flags, the last layer.
    pub fn apply_args(&mut self, args: &ServeArgs) -> Result<(), ConfigError> {
        if let Some(host) = &args.host {
            validate_host(host, "--host")?;
            self.host = host.clone();
        }
        set(&mut self.port, args.port);
        if let Some(shards) = args.shards {
            if !(1..=1024).contains(&shards) {
                return Err(invalid("--shards", "an integer from 1 to 1024", &json!(shards)));
            }
            self.shards = shards;
        }
        set(&mut self.name, args.name.clone());
        if let Some(level) = &args.log_level {
            self.log.level = parse_level(level, "--log-level")?;
        }
        if let Some(addr) = &args.admin {
            self.admin_addr = Some(parse_admin_addr(addr, "--admin")?);
        }
        self.cluster =
            crate::cluster::config::apply_flags(self.cluster.take(), &args.cluster_nats).map_err(cluster_error)?;
        Ok(())
    }

    /// The effective configuration in the Summoner file shape, as `corecast check` prints it.
    pub fn to_json(&self) -> Value {
        let b = &self.backpressure;
        json!({
            "host": self.host,
            "port": self.port,
            "name": self.name,
            "logger": {
                "log_level": self.log.level.as_str(),
                "enable_console_log": self.log.console,
                "enable_file_log": self.log.file,
                "log_file_path": self.log.file_path,
                "enable_json_log": self.log.json,
                "date_format": self.log.date_format,
                "log_keys": self.log.log_keys,
                "max_file_size": self.log.max_file_size,
                "backup_count": self.log.backup_count,
            },
            "hyper_parameters": {
                "client_timeout_secs": self.client_timeout_secs,
                "timeout_check_interval_secs": self.timeout_check_interval_secs,
                "rate_limit_msgs_per_minute": self.rate_limit_msgs_per_minute,
                "accept_error_backoff_ms": self.accept_error_backoff_ms,
                "quarantine_cooldown_secs": self.quarantine_cooldown_secs,
                "quarantine_strikes": self.quarantine_strikes,
                "quarantine_cleanup_interval_secs": self.quarantine_cleanup_interval_secs,
                "throttle_delay_ms": self.throttle_delay_ms,
                "flow_control_delay_ms": self.flow_control_delay_ms,
                "worker_threads": self.shards,
                "backpressure_policy": {
                    "enable_throttle": b.enable_throttle,
                    "throttle_threshold": b.throttle_threshold,
                    "enable_flow_control": b.enable_flow_control,
                    "flow_control_threshold": b.flow_control_threshold,
                    "enable_disconnect": b.enable_disconnect,
                    "disconnect_threshold": b.disconnect_threshold,
                },
                "max_line_bytes": self.max_line_bytes,
                "max_pending_bytes": self.max_pending_bytes,
                "max_total_pending_bytes": self.max_total_pending_bytes,
                "max_total_partial_bytes": self.max_total_partial_bytes,
                "write_deadline_ms": self.write_deadline_ms,
                "max_connections": self.max_connections,
                "quarantine_by": match self.quarantine_by { QuarantineBy::Ip => "ip", QuarantineBy::Addr => "addr" },
                "quarantine_max_entries": self.quarantine_max_entries,
                "shutdown_grace_ms": self.shutdown_grace_ms,
                "flush_window_us": self.flush_window_us,
                "admin_addr": self.admin_addr.map(|a| a.to_string()),
                "cluster": self.cluster.as_ref().map(|c| c.to_json()),
                "tls": self.tls.as_ref().map(|t| t.to_json()),
                "proxy_protocol": self.proxy_protocol,
                "proxy_trusted": self.proxy_trusted.to_strings(),
                "proxy_header_timeout_ms": self.proxy_header_timeout_ms,
                "allow": self.allow.as_ref().map(NetList::to_strings),
                "deny": self.deny.to_strings(),
                "max_connections_per_ip": self.max_connections_per_ip,
            }
        })
    }
}

fn cluster_error(e: crate::cluster::config::InvalidValue) -> ConfigError {
    ConfigError::Invalid {
        key: e.key,
        expected: e.expected,
        found: e.found,
    }
}

fn tls_error(e: crate::tls::InvalidValue) -> ConfigError {
    ConfigError::Invalid {
        key: e.key,
        expected: e.expected,
        found: e.found,
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn set_usize(slot: &mut usize, value: Option<u64>) {
    if let Some(v) = value {
        *slot = v as usize;
    }
}

fn parse_level(s: &str, path: &str) -> Result<LogLevel, ConfigError> {
    LogLevel::parse(s).ok_or_else(|| {
        invalid(
            path,
            "one of TRACE, DEBUG, INFO, WARN, WARNING, ERROR, CRITICAL, OFF",
            &Value::String(s.into()),
        )
    })
}

fn validate_host(host: &str, path: &str) -> Result<(), ConfigError> {
    let ok = !host.is_empty() && host.len() <= 253 && !host.chars().any(|c| c.is_whitespace() || c == '/');
    if ok {
        Ok(())
    } else {
        Err(invalid(path, "an IP address or hostname", &Value::String(host.into())))
    }
}

const ADMIN_ADDR_EXPECTED: &str = "an ip:port address such as \"127.0.0.1:9100\", or null";

fn parse_admin_addr(text: &str, path: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(path, ADMIN_ADDR_EXPECTED, &Value::String(text.into())))
}

fn validate_date_format(fmt: &str, path: &str) -> Result<(), ConfigError> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(fmt).any(|item| matches!(item, Item::Error)) {
        return Err(invalid(path, "a chrono strftime format", &Value::String(fmt.into())));
    }
    Ok(())
}

fn invalid(path: &str, expected: &str, found: &Value) -> ConfigError {
    let mut shown = found.to_string();
    if shown.len() > 60 {
        let cut = (0..=57).rev().find(|&i| shown.is_char_boundary(i)).unwrap_or(0);
        shown.truncate(cut);
        shown.push_str("...");
    }
    ConfigError::Invalid {
        key: path.to_string(),
        expected: expected.to_string(),
        found: shown,
    }
}

fn string_value(v: &Value, path: &str) -> Result<String, ConfigError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid(path, "a string", v))
}

/// An array of strings; `expected` names the whole array, which an error shows.
fn string_list(v: &Value, path: &str, expected: &str) -> Result<Vec<String>, ConfigError> {
    let items = v
        .as_array()
        .map(|items| items.iter().map(Value::as_str).collect::<Option<Vec<_>>>());
    let items = items.flatten().ok_or_else(|| invalid(path, expected, v))?;
    Ok(items.into_iter().map(str::to_owned).collect())
}

const CIDR_LIST: &str = "an array of networks such as \"10.0.0.0/8\" or \"2001:db8::/32\", or null";
const CIDR_LIST_NONEMPTY: &str = "a non-empty array of networks such as \"10.0.0.0/8\", or null to admit every address";

/// An array of IPv4/IPv6 networks in CIDR notation; an error names the entry's index.
fn cidr_list(v: &Value, path: &str) -> Result<NetList, ConfigError> {
    let items = string_list(v, path, CIDR_LIST)?;
    let cidrs = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.trim().parse::<Cidr>().map_err(|reason| ConfigError::Invalid {
                key: format!("{path}[{i}]"),
                expected: "a network in CIDR notation (a.b.c.d/n or x:y::z/n)".into(),
                found: reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NetList::from_cidrs(cidrs))
}

fn int_value(v: &Value, path: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let expected = || {
        if max >= u32::MAX as u64 {
            format!("an integer >= {min}")
        } else {
            format!("an integer from {min} to {max}")
        }
    };
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(_) => Err(invalid(path, &expected(), v)),
        None if v.is_i64() => Err(invalid(path, &expected(), v)),
        None => Err(invalid(path, "an integer", v)),
    }
}

/// One JSON object being read: remembers which keys were consumed so the rest can be
/// reported as unknown.
struct Section<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    root: Option<&'a Map<String, Value>>,
    seen: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn new(value: &'a Value, prefix: &str) -> Result<Self, ConfigError> {
        let map = value.as_object().ok_or_else(|| {
            invalid(
                if prefix.is_empty() { "(top level)" } else { prefix },
                "an object",
                value,
            )
        })?;
        Ok(Section {
            map,
            prefix: prefix.to_string(),
            root: None,
            seen: Vec::new(),
        })
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn ignore(&mut self, key: &'static str) {
        self.seen.push(key);
    }

    fn root_lacks(&self, key: &str) -> bool {
        self.root.is_none_or(|r| !r.contains_key(key))
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.map.get(key)
    }

    /// A nested object; `null` counts as absent.
    fn section(&mut self, key: &'static str) -> Result<Option<Section<'a>>, ConfigError> {
        Ok(self.nullable_section(key)?.flatten())
    }

    /// A nested object where `null` means "disabled": `None` if absent, `Some(None)` if null.
    fn nullable_section(&mut self, key: &'static str) -> Result<Option<Option<Section<'a>>>, ConfigError> {
        let root = self.root.unwrap_or(self.map);
        self.nullable(key, |v, path| {
            let mut s = Section::new(v, path)?;
            s.root = Some(root);
            Ok(s)
        })
    }

    /// The key read by `parse`, which gets the value and its JSON path: `None` if absent.
    fn parse<T>(
        &mut self,
        key: &'static str,
        parse: impl FnOnce(&'a Value, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        let path = self.path(key);
        self.get(key).map(|v| parse(v, &path)).transpose()
    }

    fn string(&mut self, key: &'static str) -> Result<Option<String>, ConfigError> {
        self.parse(key, string_value)
    }

    fn bool(&mut self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        self.parse(key, |v, path| {
            v.as_bool().ok_or_else(|| invalid(path, "true or false", v))
        })
    }

    fn int(&mut self, key: &'static str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        self.parse(key, |v, path| int_value(v, path, min, max))
    }

    /// A key where `null` means "disabled": `None` if absent, `Some(None)` if null.
    fn nullable<T>(
        &mut self,
        key: &'static str,
        parse: impl FnOnce(&'a Value, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<Option<T>>, ConfigError> {
        self.parse(key, |v, path| match v {
            Value::Null => Ok(None),
            v => parse(v, path).map(Some),
        })
    }

    /// Reports every key that was not consumed, with the closest known one.
    fn finish(self, warnings: &mut Vec<String>) {
        for key in self.map.keys() {
            if self.seen.contains(&key.as_str()) {
                continue;
            }
            let closest = self
                .seen
                .iter()
                .map(|k| (strsim::levenshtein(key, k), *k))
                .min()
                .filter(|(d, _)| *d <= 3 || *d * 3 <= key.len());
            warnings.push(match closest {
                Some((_, k)) => format!(
                    "unknown config key {} ignored (did you mean {}?)",
                    self.path(key),
                    self.path(k)
                ),
                None => format!("unknown config key {} ignored", self.path(key)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINE: Machine = Machine {
        usable_cpus: 2,
        nofile_hard_limit: 4096,
    };

    fn defaults() -> Config {
        Config::defaults_for(&MACHINE)
    }

    fn load(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        let mut c = defaults();
        let mut w = Vec::new();
        c.apply_json(&serde_json::from_str(text).unwrap(), &mut w)?;
        Ok((c, w))
    }

    #[test]
    fn empty_object_gives_the_defaults() {
        let (c, w) = load("{}").unwrap();
        assert_eq!(c, defaults());
        assert!(w.is_empty());
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8888));
        assert_eq!(c.rate_limit_msgs_per_minute, Some(300));
        assert_eq!(c.backpressure.disconnect_threshold, 500);
        assert_eq!((c.max_pending_bytes, c.max_total_pending_bytes), (64 << 20, 1 << 30));
        assert_eq!(c.write_deadline_ms, 10_000);
    }

    #[test]
    fn the_machine_sets_the_shard_count_and_the_connection_limit() {
        let c = Config::defaults_for(&Machine {
            usable_cpus: 6,
            nofile_hard_limit: 10_064,
        });
        assert_eq!((c.shards, c.max_connections), (6, 10_000));
        let tiny = Config::defaults_for(&Machine {
            usable_cpus: 0,
            nofile_hard_limit: 10,
        });
        assert_eq!((tiny.shards, tiny.max_connections), (1, 1));
    }

    #[test]
    fn a_null_host_or_port_keeps_the_default_as_summoner_templates_mean_it() {
        let (c, w) = load(r#"{"host":null,"port":null}"#).unwrap();
        assert_eq!((c.host.as_str(), c.port, w.len()), ("127.0.0.1", 8888, 0));
        let e = load(r#"{"host":7}"#).unwrap_err();
        assert_eq!(e.to_string(), "host: expected a string, found 7");
    }

    #[test]
    fn the_slow_consumer_keys_load_and_are_range_checked() {
        let (c, _) =
            load(r#"{"hyper_parameters":{"write_deadline_ms":2500,"max_total_pending_bytes":1048576}}"#).unwrap();
        assert_eq!((c.write_deadline_ms, c.max_total_pending_bytes), (2500, 1 << 20));
        let e = load(r#"{"hyper_parameters":{"write_deadline_ms":0}}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hyper_parameters.write_deadline_ms: expected an integer from 1"),
            "{e}"
        );
        let e = load(r#"{"hyper_parameters":{"max_total_pending_bytes":"lots"}}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hyper_parameters.max_total_pending_bytes: expected an integer"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_json_path() {
        let e = load(r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":"fast"}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hyper_parameters.rate_limit_msgs_per_minute: expected an integer, found \"fast\""
        );
        let e = load(r#"{"hyper_parameters":{"backpressure_policy":{"enable_throttle":1}}}"#).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("hyper_parameters.backpressure_policy.enable_throttle: expected true or false"));
        let e = load(r#"{"port":70000}"#).unwrap_err();
        assert_eq!(e.to_string(), "port: expected an integer from 0 to 65535, found 70000");
        let e = load(r#"{"logger":{"log_level":"LOUD"}}"#).unwrap_err();
        assert!(e.to_string().starts_with("logger.log_level: expected one of"));
        let e = load(r#"{"hyper_parameters":{"quarantine_by":"mac"}}"#).unwrap_err();
        assert!(e.to_string().starts_with("hyper_parameters.quarantine_by:"));
    }

    #[test]
    fn null_disables_nullable_limits() {
        let (c, _) =
            load(r#"{"hyper_parameters":{"client_timeout_secs":null,"rate_limit_msgs_per_minute":null}}"#).unwrap();
        assert_eq!(c.client_timeout_secs, None);
        assert_eq!(c.rate_limit_msgs_per_minute, None);
        assert!(load(r#"{"hyper_parameters":{"timeout_check_interval_secs":null}}"#).is_err());
    }

    #[test]
    fn unknown_keys_warn_with_the_closest_known_key() {
        let (_, w) = load(r#"{"hyper_parameters":{"rate_limit_msg_per_minute":5, "zzzzzzzzzzzz":1}}"#).unwrap();
        assert_eq!(w.len(), 2);
        assert!(w
            .iter()
            .any(|m| m.contains("hyper_parameters.rate_limit_msg_per_minute")
                && m.contains("did you mean hyper_parameters.rate_limit_msgs_per_minute")));
        assert!(w.iter().any(|m| m.ends_with("hyper_parameters.zzzzzzzzzzzz ignored")));
    }

    #[test]
    fn a_section_that_is_not_an_object_is_refused_with_its_path_and_null_keeps_the_defaults() {
        let e = load(r#"{"logger":[]}"#).unwrap_err();
        assert_eq!(e.to_string(), "logger: expected an object, found []");
        let e = load(r#"{"hyper_parameters":{"backpressure_policy":5}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hyper_parameters.backpressure_policy: expected an object, found 5"
        );
        let e = load("[1]").unwrap_err();
        assert_eq!(e.to_string(), "(top level): expected an object, found [1]");
        let (c, w) = load(r#"{"logger":null,"hyper_parameters":{"backpressure_policy":null}}"#).unwrap();
        assert_eq!((c, w.len()), (defaults(), 0));
    }

    #[test]
    fn unknown_keys_are_matched_against_their_own_section() {
        let (_, w) = load(r#"{"hots":"x","logger":{"log_kes":[]},"hyper_parameters":{"backpressure_policy":{"disconect_threshold":3}}}"#).unwrap();
        let mut w = w;
        w.sort();
        assert_eq!(
            w,
            [
                "unknown config key hots ignored (did you mean host?)",
                "unknown config key hyper_parameters.backpressure_policy.disconect_threshold ignored (did you mean hyper_parameters.backpressure_policy.disconnect_threshold?)",
                "unknown config key logger.log_kes ignored (did you mean logger.log_keys?)",
            ]
        );
    }

    #[test]
    fn an_array_of_strings_shows_the_whole_array_when_one_item_is_wrong() {
        let e = load(r#"{"logger":{"log_keys":["a",1]}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"logger.log_keys: expected an array of strings or null, found ["a",1]"#
        );
        let (c, _) = load(r#"{"logger":{"log_keys":["a","b"]}}"#).unwrap();
        assert_eq!(c.log.log_keys, Some(vec!["a".to_string(), "b".to_string()]));
    }

    #[test]
    fn python_only_and_inert_keys_are_accepted_silently() {
        let (_, w) = load(
            r#"{"version":"rss_3","logger":{"console_log_format":"x","log_format":"y"},
               "hyper_parameters":{"connection_buffer_size":256,"command_buffer_size":64,"control_channel_capacity":8,"queue_monitor_capacity":100}}"#,
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn log_rotation_keys_default_to_summoners_and_are_range_checked() {
        let (c, _) = load("{}").unwrap();
        assert_eq!((c.log.max_file_size, c.log.backup_count), (1_000_000, 3));
        let (c, _) = load(r#"{"logger":{"max_file_size":0,"backup_count":7}}"#).unwrap();
        assert_eq!((c.log.max_file_size, c.log.backup_count), (0, 7));
        assert_eq!(c.to_json()["logger"]["backup_count"], 7);
        assert_eq!(c.to_json()["logger"]["max_file_size"], 0);
        assert!(load(r#"{"logger":{"max_file_size":-1}}"#).is_err());
        assert!(load(r#"{"logger":{"backup_count":1001}}"#).is_err());
    }

    #[test]
    fn legacy_host_and_port_under_hyper_parameters_apply_unless_top_level_sets_them() {
        let (c, _) = load(r#"{"hyper_parameters":{"host":"0.0.0.0","port":9000}}"#).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 9000));
        let (c, _) = load(r#"{"port":7000,"hyper_parameters":{"port":9000}}"#).unwrap();
        assert_eq!(c.port, 7000);
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = load(r#"{"port":7000,"logger":{"log_level":"debug"}}"#).unwrap().0;
        let args = ServeArgs {
            port: Some(7001),
            log_level: Some("critical".into()),
            shards: Some(3),
            ..Default::default()
        };
        c.apply_args(&args).unwrap();
        assert_eq!((c.port, c.log.level, c.shards), (7001, LogLevel::Error, 3));
        assert!(c
            .clone()
            .apply_args(&ServeArgs {
                shards: Some(0),
                ..Default::default()
            })
            .is_err());
    }

    #[test]
    fn log_levels_accept_python_names_in_any_case() {
        for (s, l) in [
            ("warning", LogLevel::Warn),
            ("CRITICAL", LogLevel::Error),
            ("Trace", LogLevel::Trace),
            ("off", LogLevel::Off),
        ] {
            assert_eq!(LogLevel::parse(s), Some(l));
        }
    }

    #[test]
    fn effective_config_round_trips_through_to_json() {
        let (c, _) =
            load(r#"{"hyper_parameters":{"worker_threads":2,"quarantine_by":"addr","client_timeout_secs":null}}"#)
                .unwrap();
        let (again, w) = load(&c.to_json().to_string()).unwrap();
        assert_eq!(again, c);
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn flush_window_is_bounded() {
        assert_eq!(defaults().flush_window_us, 1500);
        assert_eq!(
            load(r#"{"hyper_parameters":{"flush_window_us":0}}"#)
                .unwrap()
                .0
                .flush_window_us,
            0
        );
        assert!(load(r#"{"hyper_parameters":{"flush_window_us":2000000}}"#).is_err());
    }

    #[test]
    fn admin_addr_is_off_by_default_and_the_flag_beats_the_file() {
        assert_eq!(defaults().admin_addr, None);
        let mut c = load(r#"{"hyper_parameters":{"admin_addr":"127.0.0.1:9100"}}"#)
            .unwrap()
            .0;
        assert_eq!(c.admin_addr, Some("127.0.0.1:9100".parse().unwrap()));
        c.apply_args(&ServeArgs {
            admin: Some("[::1]:0".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.admin_addr, Some("[::1]:0".parse().unwrap()));
        assert_eq!(
            load(r#"{"hyper_parameters":{"admin_addr":null}}"#)
                .unwrap()
                .0
                .admin_addr,
            None
        );
        let e = load(r#"{"hyper_parameters":{"admin_addr":"localhost"}}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hyper_parameters.admin_addr: expected an ip:port"),
            "{e}"
        );
        assert!(load(r#"{"hyper_parameters":{"admin_addr":9100}}"#).is_err());
        let e = c
            .apply_args(&ServeArgs {
                admin: Some("127.0.0.1".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("--admin: expected an ip:port"), "{e}");
    }

    #[test]
    fn quarantine_strikes_default_to_three_and_must_be_a_positive_integer() {
        assert_eq!(defaults().quarantine_strikes, 3);
        let (c, _) = load(r#"{"hyper_parameters":{"quarantine_strikes":1}}"#).unwrap();
        assert_eq!(c.quarantine_strikes, 1);
        let e = load(r#"{"hyper_parameters":{"quarantine_strikes":0}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hyper_parameters.quarantine_strikes: expected an integer >= 1, found 0"
        );
        let e = load(r#"{"hyper_parameters":{"quarantine_strikes":"three"}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hyper_parameters.quarantine_strikes: expected an integer, found \"three\""
        );
        assert!(load(r#"{"hyper_parameters":{"quarantine_strikes":2.5}}"#).is_err());
        assert!(load(r#"{"hyper_parameters":{"quarantine_strikes":-1}}"#).is_err());
    }

    #[test]
    fn admission_keys_load_round_trip_and_name_a_bad_network() {
        let d = defaults();
        assert!(!d.proxy_protocol && d.allow.is_none() && d.deny.is_empty());
        assert_eq!((d.proxy_header_timeout_ms, d.max_connections_per_ip), (3000, None));
        let (c, w) = load(
            r#"{"hyper_parameters":{"proxy_protocol":true,"proxy_trusted":["10.0.0.0/8","::1"],
                "allow":["192.0.2.0/24","2001:db8::/32"],"deny":["192.0.2.9"],"max_connections_per_ip":4,
                "proxy_header_timeout_ms":500}}"#,
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert!(c.proxy_protocol && c.proxy_trusted.contains("::1".parse().unwrap()));
        assert!(c.allow.as_ref().unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!(c.deny.contains("192.0.2.9".parse().unwrap()));
        assert_eq!((c.max_connections_per_ip, c.proxy_header_timeout_ms), (Some(4), 500));
        let (again, _) = load(&c.to_json().to_string()).unwrap();
        assert_eq!(again, c);
        let e = load(r#"{"hyper_parameters":{"deny":["10.0.0.0/8","10.0.0.1/8"]}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hyper_parameters.deny[1]: expected a network in CIDR notation (a.b.c.d/n or x:y::z/n), \
             found \"10.0.0.1/8\" has host bits set (the network is 10.0.0.0/8)"
        );
        let e = load(r#"{"hyper_parameters":{"allow":"10.0.0.0/8"}}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hyper_parameters.allow: expected an array of networks"),
            "{e}"
        );
        let e = load(r#"{"hyper_parameters":{"allow":[]}}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hyper_parameters.allow: expected a non-empty array"),
            "{e}"
        );
        let e = load(r#"{"hyper_parameters":{"proxy_protocol":true}}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hyper_parameters.proxy_trusted: expected at least one network"),
            "{e}"
        );
        assert!(load(r#"{"hyper_parameters":{"max_connections_per_ip":0}}"#).is_err());
        assert!(load(r#"{"hyper_parameters":{"proxy_header_timeout_ms":0}}"#).is_err());
    }

    #[test]
    fn bad_date_format_is_refused() {
        assert!(load(r#"{"logger":{"date_format":"%Q"}}"#).is_err());
        assert!(load(r#"{"logger":{"date_format":"%Y-%m-%dT%H:%M:%S.%6fZ"}}"#).is_ok());
    }
}
