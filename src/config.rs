//! Configuration (docs/protocol.md#configuration, docs/protocol.md#command-line): the clap command line and the Summoner
//! `server_config.json` format, merged into one validated [`Config`].
//!
//! Precedence is built-in defaults < file < flags. Every key is declared once, in the
//! table of `config/keys.rs` (path, type, range, default, unit, reload, doc): parsing, the
//! error messages, the defaults, `check`'s JSON, what a SIGHUP reload applies and the docs
//! table all come from it. The defaults that depend on the machine come from a [`Machine`]
//! passed in, so this module reads nothing itself. Nothing outside this module sees raw
//! CLI or JSON types.
//!
//! A new key is a field of [`Config`] and one line in `keys::KEYS`; a flag for it is a
//! field of [`ServeArgs`] applied in `apply_args` through the same key.

pub mod keys;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::machine::Machine;
use crate::netlist::NetList;

/// `--version`: the crate version and the commit it was built from (`build.rs`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CORECAST_COMMIT"), ")");

/// The command line (docs/protocol.md#command-line).
#[derive(Debug, Parser)]
#[command(
    name = "corecast",
    version = VERSION,
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
    /// Serve (the default when no subcommand is given). SIGHUP reloads the config file.
    Serve(ServeArgs),
    /// Validate a config file and print the effective configuration as JSON.
    Check(CheckArgs),
    /// Print the table of config keys (markdown, as docs/protocol.md carries it).
    Keys,
}

/// `corecast check`: the serve flags, and strictness.
#[derive(Debug, Args, Default, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Unknown keys are errors (exit 78) instead of warnings.
    #[arg(long, env = "CORECAST_STRICT")]
    pub strict: bool,
}

/// Flags shared by `serve` and `check`; each one overrides the file, and each can be given
/// as a `CORECAST_*` environment variable instead (a flag beats its variable).
#[derive(Debug, Args, Default, Clone)]
pub struct ServeArgs {
    /// Summoner-format JSON config file.
    #[arg(long, value_name = "FILE", env = "CORECAST_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "CORECAST_HOST", help = keys::flag_help("Listen host: IPv4, IPv6 or a hostname", "host"))]
    pub host: Option<String>,
    #[arg(long, env = "CORECAST_PORT", help = keys::flag_help("Listen port (0 picks a free one and logs it)", "port"))]
    pub port: Option<u16>,
    #[arg(long, env = "CORECAST_SHARDS", help = keys::flag_help("Number of shards (one pinned executor each)", WORKER_THREADS))]
    pub shards: Option<usize>,
    #[arg(long, env = "CORECAST_NAME", help = keys::flag_help("Name used in log lines and the log file name", "name"))]
    pub name: Option<String>,
    #[arg(long, value_name = "LEVEL", env = "CORECAST_LOG_LEVEL", help = keys::flag_help(
        "TRACE, DEBUG, INFO, WARN/WARNING, ERROR, CRITICAL or OFF (any case)", LOG_LEVEL))]
    pub log_level: Option<String>,
    #[arg(long, value_name = "ADDR", env = "CORECAST_ADMIN", help = keys::flag_help(
        "Serve /metrics, /healthz, /stats and /connections over HTTP on this ip:port (port 0 picks one and logs it)", ADMIN_ADDR))]
    pub admin: Option<String>,
    /// Join a cluster over this NATS server (repeatable: list every server of the NATS
    /// cluster); replaces hyper_parameters.cluster.nats, subject "corecast" by default.
    #[arg(
        long = "cluster-nats",
        value_name = "URL",
        env = "CORECAST_CLUSTER_NATS",
        value_delimiter = ','
    )]
    pub cluster_nats: Vec<String>,
}

const WORKER_THREADS: &str = "hyper_parameters.worker_threads";
const LOG_LEVEL: &str = "logger.log_level";
const ADMIN_ADDR: &str = "hyper_parameters.admin_addr";
const CLUSTER_NATS: &str = "hyper_parameters.cluster.nats";

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
    Off,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<Self> {
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
#[derive(Debug, Clone, PartialEq, Default)]
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
    /// `maxBytes`); 0 never rotates.
    pub max_file_size: u64,
    /// Rotated files kept: `<name>.log.1` (newest) to `<name>.log.<backup_count>`; 0 never
    /// rotates, as in Python.
    pub backup_count: u32,
}

/// RFC 3339 in local time with its offset, milliseconds: `2026-12-07T02:33:28.123+00:00`.
pub const DEFAULT_DATE_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.3f%:z";

/// What a quarantine entry is keyed by (docs/protocol.md#quarantine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuarantineBy {
    /// The peer IP: every port of a misbehaving host is refused.
    #[default]
    Ip,
    /// The full ip:port, the reference server's behaviour.
    Addr,
}

/// `hyper_parameters.backpressure_policy` (docs/protocol.md#backpressure). Thresholds count messages queued
/// for a stalled recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackpressureConfig {
    pub enable_throttle: bool,
    pub throttle_threshold: u64,
    pub enable_flow_control: bool,
    pub flow_control_threshold: u64,
    pub enable_disconnect: bool,
    pub disconnect_threshold: u64,
}

/// The validated, effective configuration. Each field's default, range, unit and doc is
/// its key's line in `keys::KEYS` (docs/protocol.md#configuration); `Default` is only the
/// blank those defaults are applied over: use [`Config::defaults_for`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub name: String,
    pub log: LogConfig,
    /// `hyper_parameters.worker_threads`.
    pub shards: usize,
    /// `None` disables the idle timeout.
    pub client_timeout_secs: Option<u64>,
    pub timeout_check_interval_secs: u64,
    /// `None` disables the rate limit.
    pub rate_limit_msgs_per_minute: Option<u64>,
    pub accept_error_backoff_ms: u64,
    pub quarantine_cooldown_secs: u64,
    pub quarantine_strikes: u32,
    pub quarantine_cleanup_interval_secs: u64,
    pub throttle_delay_ms: u64,
    pub flow_control_delay_ms: u64,
    pub backpressure: BackpressureConfig,
    pub max_line_bytes: usize,
    pub max_pending_bytes: usize,
    pub max_total_pending_bytes: usize,
    /// Memory held by partial lines (bytes of lines still arriving) in the whole process;
    /// past it, a connection holding more than 4 KiB of a partial line is not read until
    /// the total drops below, and the others read at most up to 4 KiB of a partial line.
    pub max_total_partial_bytes: usize,
    pub write_deadline_ms: u64,
    pub max_connections: usize,
    pub quarantine_by: QuarantineBy,
    pub quarantine_max_entries: usize,
    pub shutdown_grace_ms: u64,
    pub flush_window_us: u64,
    /// `None` (the default) serves no admin endpoint.
    pub admin_addr: Option<SocketAddr>,
    /// `None` (the default) is a single node, with no uplink thread and no cost.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Every connection to the data listener starts with a PROXY protocol header (v1 or
    /// v2) naming the client, whose address then stands for the connection everywhere
    /// (docs/protocol.md#proxy-protocol).
    pub proxy_protocol: bool,
    /// Sources allowed to send a PROXY header; with `proxy_protocol` on, a connection from
    /// anywhere else is closed with no bytes. Must not be empty when `proxy_protocol` is on.
    pub proxy_trusted: NetList,
    /// Time from accept to the end of the PROXY header; past it the connection is closed
    /// with no bytes.
    pub proxy_header_timeout_ms: u64,
    /// When set, only clients in these networks are admitted
    /// (docs/protocol.md#admission-by-network); `None` admits every client not denied.
    pub allow: Option<NetList>,
    /// Clients in these networks are closed at accept with no bytes, even when allowed.
    pub deny: NetList,
    /// Open connections per client IP before new ones from it get N7; `None` sets no cap
    /// below `max_connections`.
    pub max_connections_per_ip: Option<u32>,
    /// `hyper_parameters.tls`: a second listener whose clients speak TLS, in the same
    /// broadcast domain (see `tls`); `None` (the default) listens for plain TCP only.
    pub tls: Option<crate::tls::TlsConfig>,
}

/// File descriptors kept back from `max_connections` for listeners, rings and logs.
pub const FD_RESERVE: u64 = 64;

/// The open-file hard limit (to which `run` raises the soft limit) minus [`FD_RESERVE`].
fn default_max_connections(hard: u64) -> usize {
    hard.saturating_sub(FD_RESERVE).clamp(1, 10_000_000) as usize
}

/// A reload's outcome (see [`Config::reloaded`]).
#[derive(Debug)]
pub struct Reloaded {
    /// What the relay runs with from now on.
    pub config: Config,
    /// Changed keys applied to the running relay.
    pub applied: Vec<&'static str>,
    /// Changed keys that need a restart: their running values are kept.
    pub kept: Vec<&'static str>,
}

impl Config {
    /// The built-in defaults, which depend on the machine only through `machine`: one shard
    /// per usable CPU, and `max_connections` from the open-file hard limit.
    pub fn defaults_for(machine: &Machine) -> Config {
        let mut config = Config::default();
        keys::apply_defaults(&mut config, machine);
        config
    }

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
        keys::apply(self, root, warnings)
    }

    /// Applies command-line flags, the last layer, each through its key's checks.
    pub fn apply_args(&mut self, args: &ServeArgs) -> Result<(), ConfigError> {
        let mut flag = |path: &str, value: Value, name: &str| declared(path).apply(self, &value, name);
        if let Some(host) = &args.host {
            flag("host", json!(host), "--host")?;
        }
        if let Some(port) = args.port {
            flag("port", json!(port), "--port")?;
        }
        if let Some(shards) = args.shards {
            flag(WORKER_THREADS, json!(shards), "--shards")?;
        }
        if let Some(name) = &args.name {
            flag("name", json!(name), "--name")?;
        }
        if let Some(level) = &args.log_level {
            flag(LOG_LEVEL, json!(level), "--log-level")?;
        }
        if let Some(addr) = &args.admin {
            flag(ADMIN_ADDR, json!(addr), "--admin")?;
        }
        if !args.cluster_nats.is_empty() {
            let urls = declared(CLUSTER_NATS);
            for url in &args.cluster_nats {
                urls.kind.check(&json!(url), "--cluster-nats")?;
            }
            let checked = urls.kind.check(&json!(args.cluster_nats), "--cluster-nats")?;
            // The flags replace the file's URL list and keep its subject.
            keys::enable_section(self, keys::parent_of(CLUSTER_NATS));
            (urls.set)(self, &checked);
        }
        Ok(())
    }

    /// The effective configuration in the Summoner file shape, as `corecast check` prints it.
    pub fn to_json(&self) -> Value {
        keys::to_json(self)
    }

    /// The config to run with after a reload read `new` (file and flags as at start-up),
    /// `self` being the running config and `previous` what the file and flags said before:
    /// `new`'s values for the keys that apply live (`applied` lists those that change the
    /// running value), `self`'s for those that need a restart (`kept` lists those the file
    /// changed).
    pub fn reloaded(&self, new: Config, previous: &Config) -> Reloaded {
        let mut config = new;
        let (mut applied, mut kept) = (Vec::new(), Vec::new());
        for key in keys::KEYS
            .iter()
            .filter(|k| k.is_field() && !keys::in_optional_section(k.path))
        {
            let running = (key.get)(self);
            if key.reload == keys::Reload::Live {
                if running != (key.get)(&config) {
                    applied.push(key.path);
                }
            } else {
                if (key.get)(previous) != (key.get)(&config) {
                    kept.push(key.path);
                }
                (key.set)(&mut config, &running);
            }
        }
        if config.cluster != previous.cluster {
            kept.push("hyper_parameters.cluster");
        }
        config.cluster = self.cluster.clone();
        // The TLS listener and its files need a restart; its handshake timeout applies live.
        let timeout = config.tls.as_ref().map(|t| t.handshake_timeout_ms);
        if config.tls.as_ref().map(|t| {
            (
                &t.listen,
                &t.cert_file,
                &t.key_file,
                &t.client_ca_file,
                t.max_handshakes,
            )
        }) != previous.tls.as_ref().map(|t| {
            (
                &t.listen,
                &t.cert_file,
                &t.key_file,
                &t.client_ca_file,
                t.max_handshakes,
            )
        }) {
            kept.push("hyper_parameters.tls");
        }
        config.tls = self.tls.clone();
        if let (Some(tls), Some(timeout)) = (config.tls.as_mut(), timeout) {
            if tls.handshake_timeout_ms != timeout {
                tls.handshake_timeout_ms = timeout;
                applied.push("hyper_parameters.tls.handshake_timeout_ms");
            }
        }
        Reloaded { config, applied, kept }
    }
}

impl Config {
    /// Whether the `allow` and `deny` lists admit a client at `ip`: at accept, and again
    /// for every connected client when a reload changes them.
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        !self.deny.contains(ip) && self.allow.as_ref().is_none_or(|allow| allow.contains(ip))
    }
}

/// The key at `path`, which the flags above name.
fn declared(path: &str) -> &'static keys::Key {
    // Invariant: every path passed here is a literal of this file naming a key of the
    // table; `every_flag_names_a_declared_key` checks them.
    keys::key(path).expect("flag paths name declared keys")
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
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
            r#"{"version":"rss_3","logger":{"console_log_format":"x","log_format":"y","max_file_size":1,"backup_count":3},
               "hyper_parameters":{"connection_buffer_size":256,"command_buffer_size":64,"control_channel_capacity":8,"queue_monitor_capacity":100}}"#,
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
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
        assert_eq!(defaults().flush_window_us, 500);
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
    #[test]
    fn every_flag_names_a_declared_key() {
        for path in [
            "host",
            "port",
            "name",
            WORKER_THREADS,
            LOG_LEVEL,
            ADMIN_ADDR,
            CLUSTER_NATS,
        ] {
            assert!(keys::key(path).is_some(), "{path}");
        }
    }

    #[test]
    fn every_default_passes_its_own_key_check() {
        let c = defaults();
        for key in keys::KEYS
            .iter()
            .filter(|k| k.is_field() && !keys::in_optional_section(k.path))
        {
            let v = (key.get)(&c);
            if v.is_null() && key.null == keys::Null::Disables {
                continue;
            }
            key.kind.check(&v, key.path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(v, (key.default)(&MACHINE), "{}", key.path);
        }
    }

    #[test]
    fn the_cluster_section_is_null_or_an_object_with_nats_urls() {
        assert_eq!(
            load(r#"{"hyper_parameters":{"cluster":null}}"#).unwrap().0.cluster,
            None
        );
        let (c, _) =
            load(r#"{"hyper_parameters":{"cluster":{"nats":["nats://127.0.0.1:4222","nats://h2:4223"],"subject":"room.a"}}}"#)
                .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.nats, ["nats://127.0.0.1:4222", "nats://h2:4223"]);
        assert_eq!(cluster.subject, "room.a");
        let (c, _) = load(r#"{"hyper_parameters":{"cluster":{"nats":"nats://[::1]:4222"}}}"#).unwrap();
        assert_eq!(
            c.to_json()["hyper_parameters"]["cluster"],
            json!({"nats": ["nats://[::1]:4222"], "subject": "corecast"})
        );
        assert_eq!(defaults().to_json()["hyper_parameters"]["cluster"], Value::Null);
    }

    #[test]
    fn wrong_cluster_values_name_their_json_path() {
        let err = |text: &str| {
            load(&format!(r#"{{"hyper_parameters":{{"cluster":{text}}}}}"#))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(r#"{"nats":5}"#),
            "hyper_parameters.cluster.nats: expected a list of nats:// URLs, found 5"
        );
        assert!(err(r#"{"nats":["nats://a:1", 7]}"#)
            .starts_with("hyper_parameters.cluster.nats[1]: expected a nats:// URL"));
        assert!(err(r#"{"nats":["http://a:1"]}"#)
            .starts_with("hyper_parameters.cluster.nats[0]: expected a nats://host:port URL"));
        assert!(err(r#"{"nats":[]}"#).contains("(1 to 64)"));
        assert_eq!(
            err(r#"{"subject":"x"}"#),
            "hyper_parameters.cluster.nats: expected a list of nats:// URLs, found null"
        );
        assert!(err(r#"{"nats":["nats://a:1"],"subject":"a.*"}"#)
            .starts_with("hyper_parameters.cluster.subject: expected a NATS subject"));
        assert!(err(r#""nats://a:1""#).starts_with("hyper_parameters.cluster: expected null or an object"));
        let (_, w) = load(r#"{"hyper_parameters":{"cluster":{"nats":"nats://a:1","subjet":"x"}}}"#).unwrap();
        assert_eq!(
            w,
            ["unknown config key hyper_parameters.cluster.subjet ignored (did you mean hyper_parameters.cluster.subject?)"]
        );
    }

    #[test]
    fn cluster_flags_replace_the_urls_and_keep_the_subject() {
        let mut c = load(r#"{"hyper_parameters":{"cluster":{"nats":"nats://a:1","subject":"s"}}}"#)
            .unwrap()
            .0;
        let flags = |urls: &[&str]| ServeArgs {
            cluster_nats: urls.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        };
        c.apply_args(&flags(&["nats://b:2", "nats://c:3"])).unwrap();
        let cluster = c.cluster.clone().unwrap();
        assert_eq!((cluster.nats.len(), cluster.subject.as_str()), (2, "s"));
        let mut single = defaults();
        single.apply_args(&flags(&["nats://b:2"])).unwrap();
        assert_eq!(single.cluster.unwrap().subject, "corecast");
        let e = defaults().apply_args(&flags(&["b:2"])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--cluster-nats: expected a nats://host:port URL"),
            "{e}"
        );
    }

    #[test]
    fn a_reload_applies_live_keys_and_keeps_restart_keys() {
        let running = defaults();
        let (new, _) = load(
            r#"{"port":9999,"logger":{"log_level":"debug"},"hyper_parameters":{"rate_limit_msgs_per_minute":5,
               "worker_threads":7,"backpressure_policy":{"throttle_threshold":9},"cluster":{"nats":"nats://a:1"}}}"#,
        )
        .unwrap();
        let r = running.reloaded(new, &running);
        assert_eq!(
            r.applied,
            [
                "logger.log_level",
                "hyper_parameters.rate_limit_msgs_per_minute",
                "hyper_parameters.backpressure_policy.throttle_threshold"
            ]
        );
        assert_eq!(
            r.kept,
            ["port", "hyper_parameters.worker_threads", "hyper_parameters.cluster"]
        );
        assert_eq!(
            (r.config.port, r.config.shards, r.config.cluster.as_ref()),
            (8888, 2, None)
        );
        assert_eq!(
            (r.config.log.level, r.config.rate_limit_msgs_per_minute),
            (LogLevel::Debug, Some(5))
        );
        assert_eq!(r.config.backpressure.throttle_threshold, 9);
        let same = running.reloaded(running.clone(), &running);
        assert!(same.applied.is_empty() && same.kept.is_empty());
        assert_eq!(same.config, running);
        // The relay may run with fewer shards than the file asks for: that is no change.
        let mut fewer = running.clone();
        fewer.shards = 1;
        let r = fewer.reloaded(running.clone(), &running);
        assert!(r.kept.is_empty(), "{:?}", r.kept);
        assert_eq!(r.config.shards, 1);
    }
}
