//! The table of configuration keys: every key of `server_config.json` declared once, in
//! [`KEYS`], with its JSON path, type and range ([`Kind`]), what `null` means, its default,
//! unit, whether a SIGHUP reload applies it to the running relay ([`Reload`]), a one-line
//! doc, and how it reads and writes its [`Config`] field. The nested objects are declared
//! in [`SECTIONS`].
//!
//! Everything about a key comes from here: [`apply`] walks a parsed file against the table
//! (validation messages name the JSON path, the expected type or range and what was found;
//! unknown keys come back as warnings with the closest known key of their own section),
//! `Config::defaults_for` applies the defaults, `Config::to_json` (what `corecast check`
//! prints) reads the fields back, `Config::reloaded` uses the reload column, the flags'
//! `--help` shows the defaults, and [`markdown`] renders the table that docs/protocol.md
//! carries (a test fails when the two differ). A new key is one [`key!`] line here plus
//! its field in [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::{int_value, invalid, Config, ConfigError, LogLevel, QuarantineBy};
use crate::cluster::config::{is_valid_subject, is_valid_url, ClusterConfig, DEFAULT_SUBJECT, MAX_URLS};
use crate::machine::Machine;
use crate::netlist::{Cidr, NetList};
use crate::tls::TlsConfig;

/// Whether a SIGHUP reload applies a changed key to the running relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied to live connections within a shard heartbeat (250 ms).
    Live,
    /// Needs a restart: a reload logs the change and keeps the running value.
    Restart,
    /// Accepted, no effect.
    Inert,
}

/// What `null` means for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Null {
    /// A type error, like any other wrong type.
    Refused,
    /// Turns the feature off (the field is an `Option`).
    Disables,
    /// Keeps the default (or the flag): Summoner's templates write `null` for "whatever
    /// `run()` was given".
    KeepsDefault,
}

/// A key's type and range: what [`Kind::check`] accepts.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A JSON integer in `min..=max`; `5.0` or `"5"` is a type error.
    Int {
        min: u64,
        max: u64,
    },
    Bool,
    /// A string that `is_valid` accepts; `expected` names what it must be.
    Text {
        expected: &'static str,
        is_valid: fn(&str) -> bool,
    },
    /// A log level, with the Python names, in any case.
    Level,
    /// One of these strings, exactly.
    OneOf(&'static [&'static str]),
    /// An array of strings.
    TextList,
    /// An `ip:port` socket address.
    Addr,
    /// One `nats://` URL or an array of 1 to [`MAX_URLS`] of them.
    NatsUrls,
    /// An array of IPv4/IPv6 networks in CIDR notation (a bare address is a /32 or /128);
    /// an error names the entry's index.
    Networks {
        non_empty: bool,
    },
    /// Accepted and ignored (Summoner keys without effect here).
    Ignored,
}

const LEVEL_EXPECTED: &str = "one of TRACE, DEBUG, INFO, WARN, WARNING, ERROR, CRITICAL, OFF";
pub(super) const ADDR_EXPECTED: &str = "an ip:port address such as \"127.0.0.1:9100\", or null";
const URLS_EXPECTED: &str = "a list of nats:// URLs";
const NETWORKS_EXPECTED: &str = "an array of networks such as \"10.0.0.0/8\" or \"2001:db8::/32\", or null";
const NETWORKS_NONEMPTY: &str = "a non-empty array of networks such as \"10.0.0.0/8\", or null to admit every address";
const URL_EXPECTED: &str = "a nats://host:port URL";

impl Kind {
    /// Validates `v` (not `null` unless the kind takes it) found at `path` and returns it
    /// in the form the field's setter reads: a level's canonical name, a URL list as an array.
    pub fn check(&self, v: &Value, path: &str) -> Result<Value, ConfigError> {
        let text = |v: &Value| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(path, "a string", v))
        };
        match *self {
            Kind::Int { min, max } => int_value(v, path, min, max).map(|n| json!(n)),
            Kind::Bool => match v {
                Value::Bool(_) => Ok(v.clone()),
                _ => Err(invalid(path, "true or false", v)),
            },
            Kind::Text { expected, is_valid } => {
                let s = text(v)?;
                if is_valid(&s) {
                    Ok(Value::String(s))
                } else {
                    Err(invalid(path, expected, v))
                }
            }
            Kind::Level => {
                let s = text(v)?;
                LogLevel::parse(&s)
                    .map(|l| json!(l.as_str()))
                    .ok_or_else(|| invalid(path, LEVEL_EXPECTED, v))
            }
            Kind::OneOf(options) => {
                let s = text(v)?;
                if options.contains(&s.as_str()) {
                    Ok(Value::String(s))
                } else {
                    let expected: Vec<String> = options.iter().map(|o| format!("\"{o}\"")).collect();
                    Err(invalid(path, &expected.join(" or "), v))
                }
            }
            Kind::TextList => match v.as_array() {
                Some(items) if items.iter().all(Value::is_string) => Ok(v.clone()),
                _ => Err(invalid(path, "an array of strings or null", v)),
            },
            Kind::Addr => match v.as_str().map(str::parse::<SocketAddr>) {
                Some(Ok(addr)) => Ok(json!(addr.to_string())),
                _ => Err(invalid(path, ADDR_EXPECTED, v)),
            },
            Kind::NatsUrls => {
                let urls = match v {
                    // One URL as a plain string is what a hand-written config most likely means.
                    Value::String(_) => vec![check_url(v, path)?],
                    Value::Array(items) => items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| check_url(item, &format!("{path}[{i}]")))
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => return Err(invalid(path, URLS_EXPECTED, v)),
                };
                if urls.is_empty() || urls.len() > MAX_URLS {
                    return Err(invalid(path, &format!("{URLS_EXPECTED} (1 to {MAX_URLS})"), v));
                }
                Ok(json!(urls))
            }
            Kind::Networks { non_empty } => {
                let items = match v.as_array() {
                    Some(items) if items.iter().all(Value::is_string) => items,
                    _ => return Err(invalid(path, NETWORKS_EXPECTED, v)),
                };
                if non_empty && items.is_empty() {
                    return Err(invalid(path, NETWORKS_NONEMPTY, v));
                }
                let mut cidrs = Vec::with_capacity(items.len());
                for (i, item) in items.iter().filter_map(Value::as_str).enumerate() {
                    let cidr = item.trim().parse::<Cidr>().map_err(|reason| ConfigError::Invalid {
                        key: format!("{path}[{i}]"),
                        expected: "a network in CIDR notation (a.b.c.d/n or x:y::z/n)".into(),
                        found: reason,
                    })?;
                    cidrs.push(cidr);
                }
                Ok(json!(NetList::from_cidrs(cidrs).to_strings()))
            }
            Kind::Ignored => Ok(Value::Null),
        }
    }

    /// The range column of the docs table.
    fn range_doc(&self) -> String {
        match *self {
            Kind::Int { min, max } if max >= u64::from(u32::MAX) => format!("≥ {min}"),
            Kind::Int { min, max } => format!("{min}–{max}"),
            Kind::Bool => "`true`, `false`".into(),
            Kind::Text { expected, .. } => expected.into(),
            Kind::Level => "`TRACE`, `DEBUG`, `INFO`, `WARN`/`WARNING`, `ERROR`/`CRITICAL`, `OFF` (any case)".into(),
            Kind::OneOf(options) => options
                .iter()
                .map(|o| format!("`\"{o}\"`"))
                .collect::<Vec<_>>()
                .join(", "),
            Kind::TextList => "array of strings".into(),
            Kind::Addr => "`\"ip:port\"`".into(),
            Kind::NatsUrls => format!("1–{MAX_URLS} `nats://host:port` URLs (one may be a plain string)"),
            Kind::Networks { non_empty: false } => "array of CIDR networks".into(),
            Kind::Networks { non_empty: true } => "non-empty array of CIDR networks".into(),
            Kind::Ignored => "any".into(),
        }
    }
}

fn check_url(v: &Value, path: &str) -> Result<String, ConfigError> {
    match v.as_str() {
        Some(url) if is_valid_url(url) => Ok(url.to_string()),
        Some(_) => Err(invalid(path, URL_EXPECTED, v)),
        None => Err(invalid(path, "a nats:// URL", v)),
    }
}

fn is_host(host: &str) -> bool {
    !host.is_empty() && host.len() <= 253 && !host.chars().any(|c| c.is_whitespace() || c == '/')
}

fn is_any(_: &str) -> bool {
    true
}

fn is_socket_addr(s: &str) -> bool {
    s.parse::<SocketAddr>().is_ok()
}

fn is_non_empty(s: &str) -> bool {
    !s.is_empty()
}

const LISTEN: Kind = Kind::Text {
    expected: "an ip:port address",
    is_valid: is_socket_addr,
};
const FILE: Kind = Kind::Text {
    expected: "a file path",
    is_valid: is_non_empty,
};
const FILE_OR_NULL: Kind = Kind::Text {
    expected: "a file path or null",
    is_valid: is_non_empty,
};

fn is_strftime(fmt: &str) -> bool {
    use chrono::format::{Item, StrftimeItems};
    !StrftimeItems::new(fmt).any(|item| matches!(item, Item::Error))
}

pub(super) const HOST: Kind = Kind::Text {
    expected: "an IP address or hostname",
    is_valid: is_host,
};
const TEXT: Kind = Kind::Text {
    expected: "a string",
    is_valid: is_any,
};
const DATE_FORMAT: Kind = Kind::Text {
    expected: "a chrono strftime format",
    is_valid: is_strftime,
};
const SUBJECT: Kind = Kind::Text {
    expected: "a NATS subject (dot-separated tokens, no spaces or wildcards)",
    is_valid: is_valid_subject,
};
const U32: u64 = u32::MAX as u64;

/// One configuration key.
pub struct Key {
    /// Its JSON path, dot-separated (`hyper_parameters.rate_limit_msgs_per_minute`).
    pub path: &'static str,
    pub kind: Kind,
    pub null: Null,
    /// The unit of an integer key (also in its name), for the docs.
    pub unit: &'static str,
    pub reload: Reload,
    /// One line for the docs table and `--help`.
    pub doc: &'static str,
    /// The default, given the machine (only `worker_threads` and `max_connections` look).
    pub default: fn(&Machine) -> Value,
    /// How the docs show a default that depends on the machine; empty: the value itself.
    pub default_doc: &'static str,
    /// The key this one stands in for (older Summoner configs put `host` and `port` under
    /// `hyper_parameters`): applied only when the file's top level lacks that key.
    pub alias_of: Option<&'static str>,
    /// Reads the field, as `check` prints it.
    pub get: fn(&Config) -> Value,
    /// Writes the field from a value [`Kind::check`] accepted (or `null` for [`Null::Disables`]).
    pub set: fn(&mut Config, &Value),
}

impl Key {
    /// The section the key lives in (`""` for the top level).
    pub fn parent(&self) -> &'static str {
        parent(self.path)
    }

    /// Its own name within its section.
    pub fn name(&self) -> &'static str {
        leaf(self.path)
    }

    /// Whether it sets a field (not an ignored key, nor an alias of another).
    pub fn is_field(&self) -> bool {
        !matches!(self.kind, Kind::Ignored) && self.alias_of.is_none()
    }

    /// Validates `v` found at `path` and stores it in `config`.
    pub fn apply(&self, config: &mut Config, v: &Value, path: &str) -> Result<(), ConfigError> {
        match (v, self.null) {
            (Value::Null, Null::Disables) => (self.set)(config, v),
            (Value::Null, Null::KeepsDefault) => {}
            _ => {
                let v = self.kind.check(v, path)?;
                (self.set)(config, &v);
            }
        }
        Ok(())
    }

    /// The default as the docs and `--help` show it.
    pub fn default_text(&self) -> String {
        if !self.default_doc.is_empty() {
            return self.default_doc.into();
        }
        if matches!(self.kind, Kind::Ignored) {
            return "—".into();
        }
        let v = (self.default)(&Machine {
            usable_cpus: 1,
            nofile_hard_limit: 1024,
        });
        let size = match v.as_u64() {
            Some(n) if self.unit == "bytes" && n >= 1 << 20 && n.is_power_of_two() => match n.trailing_zeros() {
                z if z >= 30 => format!(" ({} GiB)", n >> 30),
                _ => format!(" ({} MiB)", n >> 20),
            },
            _ => String::new(),
        };
        format!("`{v}`{size}")
    }
}

/// A JSON object of the file.
pub struct Section {
    /// Its JSON path (`""` for the top level).
    pub path: &'static str,
    /// What the error says when it is not an object.
    pub expected: &'static str,
    /// Set for a section whose presence turns a feature on (`cluster`); others given as
    /// `null` count as absent.
    pub optional: Option<Optional>,
}

/// A section that is a feature: an object turns it on, `null` (the default) off.
pub struct Optional {
    pub reload: Reload,
    pub doc: &'static str,
    /// The keys the object must have; a missing one is reported as that key's `null`.
    pub required: &'static [&'static str],
    /// Turns the feature on with blank fields, if it is off; true if it was. The section's
    /// keys then get their defaults ([`enable_section`]).
    pub enable: fn(&mut Config) -> bool,
    pub disable: fn(&mut Config),
    pub is_on: fn(&Config) -> bool,
}

pub static SECTIONS: &[Section] = &[
    Section {
        path: "",
        expected: "an object",
        optional: None,
    },
    Section {
        path: "logger",
        expected: "an object",
        optional: None,
    },
    Section {
        path: "hyper_parameters",
        expected: "an object",
        optional: None,
    },
    Section {
        path: "hyper_parameters.backpressure_policy",
        expected: "an object",
        optional: None,
    },
    Section {
        path: "hyper_parameters.tls",
        expected: "null or an object with \"listen\", \"cert_file\" and \"key_file\"",
        optional: Some(Optional {
            reload: Reload::Restart,
            doc: "a second listener whose clients speak [TLS](#tls), in the same room; `null` listens for plain TCP only (corecast)",
            required: &["listen", "cert_file", "key_file"],
            enable: |c| {
                let off = c.tls.is_none();
                c.tls.get_or_insert_with(|| TlsConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    cert_file: PathBuf::new(),
                    key_file: PathBuf::new(),
                    client_ca_file: None,
                    handshake_timeout_ms: 0,
                    max_handshakes: 0,
                });
                off
            },
            disable: |c| c.tls = None,
            is_on: |c| c.tls.is_some(),
        }),
    },
    Section {
        path: "hyper_parameters.cluster",
        expected: "null or an object with \"nats\" and \"subject\"",
        optional: Some(Optional {
            reload: Reload::Restart,
            doc: "several nodes as one room over a NATS cluster ([cluster.md](cluster.md)); `null` is a single node (corecast)",
            required: &["nats"],
            enable: |c| {
                let off = c.cluster.is_none();
                c.cluster.get_or_insert_with(|| ClusterConfig {
                    nats: Vec::new(),
                    subject: String::new(),
                });
                off
            },
            disable: |c| c.cluster = None,
            is_on: |c| c.cluster.is_some(),
        }),
    },
];

/// A field's value as JSON and back. The setters only see values [`Kind::check`] accepted,
/// so the fallbacks below are never taken.
pub trait Field {
    fn to_json(&self) -> Value;
    fn from_json(v: &Value) -> Self;
}

macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn to_json(&self) -> Value {
                json!(*self)
            }
            fn from_json(v: &Value) -> Self {
                v.as_u64().and_then(|n| <$t>::try_from(n).ok()).unwrap_or(<$t>::MAX)
            }
        }
    )*};
}
int_field!(u16, u32, u64, usize);

impl Field for bool {
    fn to_json(&self) -> Value {
        json!(*self)
    }
    fn from_json(v: &Value) -> Self {
        v.as_bool().unwrap_or_default()
    }
}

impl Field for String {
    fn to_json(&self) -> Value {
        json!(self)
    }
    fn from_json(v: &Value) -> Self {
        v.as_str().unwrap_or_default().to_owned()
    }
}

impl Field for Vec<String> {
    fn to_json(&self) -> Value {
        json!(self)
    }
    fn from_json(v: &Value) -> Self {
        let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
        items.iter().filter_map(Value::as_str).map(str::to_owned).collect()
    }
}

impl<T: Field> Field for Option<T> {
    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, T::to_json)
    }
    fn from_json(v: &Value) -> Self {
        (!v.is_null()).then(|| T::from_json(v))
    }
}

impl Field for SocketAddr {
    fn to_json(&self) -> Value {
        json!(self.to_string())
    }
    fn from_json(v: &Value) -> Self {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

impl Field for PathBuf {
    fn to_json(&self) -> Value {
        json!(self.display().to_string())
    }
    fn from_json(v: &Value) -> Self {
        PathBuf::from(v.as_str().unwrap_or_default())
    }
}

impl Field for NetList {
    fn to_json(&self) -> Value {
        json!(self.to_strings())
    }
    fn from_json(v: &Value) -> Self {
        let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
        NetList::parse(items.iter().filter_map(Value::as_str)).unwrap_or_default()
    }
}

impl Field for LogLevel {
    fn to_json(&self) -> Value {
        json!(self.as_str())
    }
    fn from_json(v: &Value) -> Self {
        v.as_str().and_then(LogLevel::parse).unwrap_or(LogLevel::Info)
    }
}

impl Field for QuarantineBy {
    fn to_json(&self) -> Value {
        json!(match self {
            QuarantineBy::Ip => "ip",
            QuarantineBy::Addr => "addr",
        })
    }
    fn from_json(v: &Value) -> Self {
        match v.as_str() {
            Some("addr") => QuarantineBy::Addr,
            _ => QuarantineBy::Ip,
        }
    }
}

/// One [`Key`]: `key!(path, kind, null, unit, reload, default, doc, |c| c.field)`, where the
/// field expression serves both as the getter and the setter; or with `get: fn, set: fn`
/// in place of the field for a field that is not always there.
macro_rules! key {
    ($path:literal, $kind:expr, $null:ident, $unit:literal, $reload:ident, $default:expr, $doc:literal, |$c:ident| $field:expr) => {
        key!($path, $kind, $null, $unit, $reload, $default, $doc,
            get: |$c| Field::to_json(&$field),
            set: |$c, v| $field = Field::from_json(v))
    };
    ($path:literal, $kind:expr, $null:ident, $unit:literal, $reload:ident, $default:expr, $doc:literal, get: $get:expr, set: $set:expr) => {
        Key {
            path: $path,
            kind: $kind,
            null: Null::$null,
            unit: $unit,
            reload: Reload::$reload,
            doc: $doc,
            default: |_| json!($default),
            default_doc: "",
            alias_of: None,
            get: $get,
            set: $set,
        }
    };
}

/// A Summoner key accepted without effect.
macro_rules! ignored {
    ($path:literal, $doc:expr) => {
        Key {
            path: $path,
            kind: Kind::Ignored,
            null: Null::KeepsDefault,
            unit: "",
            reload: Reload::Inert,
            doc: $doc,
            default: |_| Value::Null,
            default_doc: "",
            alias_of: None,
            get: |_| Value::Null,
            set: |_, _| {},
        }
    };
}

const PYTHON_ONLY: &str = "accepted, no effect (an option of the Python server)";
const INERT: &str = "accepted, no effect (a channel size of the reference's design)";

/// Every key, in the order of the docs table.
pub static KEYS: &[Key] = &[
    ignored!("version", "accepted, ignored (Summoner uses it to pick a backend)"),
    key!("host", HOST, KeepsDefault, "", Restart, "127.0.0.1",
        "listen address: an IPv4 or IPv6 address (brackets allowed) or a hostname (its first address is used)",
        |c| c.host),
    key!("port", Kind::Int { min: 0, max: 65535 }, KeepsDefault, "", Restart, 8888,
        "listen port; 0 picks a free port, which the start-up log line reports",
        |c| c.port),
    key!("name", TEXT, Refused, "", Restart, "corecast",
        "the name in log lines and the log file's name",
        |c| c.name),
    key!("logger.log_level", Kind::Level, Refused, "", Live, "INFO",
        "verbosity; a reload applies it at once",
        |c| c.log.level),
    key!("logger.enable_console_log", Kind::Bool, Refused, "", Restart, true,
        "log to stderr",
        |c| c.log.console),
    key!("logger.enable_file_log", Kind::Bool, Refused, "", Restart, false,
        "also append to `<log_file_path>/<name>.log`; the directory is created if missing",
        |c| c.log.file),
    key!("logger.log_file_path", TEXT, Refused, "", Restart, "",
        "directory of the log file; `\"\"` is the working directory",
        |c| c.log.file_path),
    key!("logger.enable_json_log", Kind::Bool, Refused, "", Restart, false,
        "every sink writes one JSON object per line (see [Logs](#logs))",
        |c| c.log.json),
    key!("logger.date_format", DATE_FORMAT, Refused, "", Restart, super::DEFAULT_DATE_FORMAT,
        "timestamp format of text lines in chrono's strftime syntax (the default is RFC 3339 in local time with its offset); an invalid format is a config error. JSON lines always use RFC 3339 with the offset",
        |c| c.log.date_format),
    key!("logger.log_keys", Kind::TextList, Disables, "", Restart, Value::Null,
        "relayed-message DEBUG lines whose content is a JSON object keep only these keys",
        |c| c.log.log_keys),
    ignored!("logger.console_log_format", PYTHON_ONLY),
    ignored!("logger.log_format", PYTHON_ONLY),
    key!("logger.max_file_size", Kind::Int { min: 0, max: u64::MAX }, Refused, "bytes", Restart, 1_000_000,
        "a file log line that would take `<name>.log` to this size or past it first rotates the file (as Python's `RotatingFileHandler`); `0` never rotates",
        |c| c.log.max_file_size),
    key!("logger.backup_count", Kind::Int { min: 0, max: 1000 }, Refused, "files", Restart, 3,
        "rotated files kept: `<name>.log.1` (newest) … `<name>.log.<backup_count>`, the oldest is deleted; `0` never rotates (as in Python)",
        |c| c.log.backup_count),
    Key {
        default: |m| json!(m.usable_cpus.max(1)),
        default_doc: "one per usable CPU",
        ..key!("hyper_parameters.worker_threads", Kind::Int { min: 1, max: 1024 }, Refused, "", Restart, 1,
            "number of shards (see [design.md](design.md#shards)); flag `--shards`",
            |c| c.shards)
    },
    key!("hyper_parameters.client_timeout_secs", Kind::Int { min: 1, max: U32 }, Disables, "seconds", Restart, 300,
        "[idle timeout](#idle-timeout); `null` disables",
        |c| c.client_timeout_secs),
    key!("hyper_parameters.timeout_check_interval_secs", Kind::Int { min: 1, max: 86_400 }, Refused, "seconds", Restart, 30,
        "period of each shard's idle sweep",
        |c| c.timeout_check_interval_secs),
    key!("hyper_parameters.rate_limit_msgs_per_minute", Kind::Int { min: 0, max: U32 }, Disables, "lines per minute", Live, 300,
        "[token bucket](#rate-limit) capacity and per-minute refill; `0` drops every line, `null` disables; a reload applies it to connected senders",
        |c| c.rate_limit_msgs_per_minute),
    key!("hyper_parameters.accept_error_backoff_ms", Kind::Int { min: 1, max: 60_000 }, Refused, "milliseconds", Restart, 100,
        "first wait after an accept error, doubling to 1 s",
        |c| c.accept_error_backoff_ms),
    key!("hyper_parameters.throttle_delay_ms", Kind::Int { min: 0, max: 3_600_000 }, Refused, "milliseconds", Live, 200,
        "a sender's sleep after a read that relayed lines, while [throttled](#pauses-throttle-and-flow-control)",
        |c| c.throttle_delay_ms),
    key!("hyper_parameters.flow_control_delay_ms", Kind::Int { min: 0, max: 3_600_000 }, Refused, "milliseconds", Live, 1000,
        "the most time one recipient may pause the senders in any `write_deadline_ms` window (its allowance)",
        |c| c.flow_control_delay_ms),
    key!("hyper_parameters.backpressure_policy.enable_throttle", Kind::Bool, Refused, "", Live, true,
        "the throttle stage",
        |c| c.backpressure.enable_throttle),
    key!("hyper_parameters.backpressure_policy.throttle_threshold", Kind::Int { min: 1, max: U32 }, Refused, "messages", Live, 100,
        "`d` at which a recipient is behind and the throttle applies",
        |c| c.backpressure.throttle_threshold),
    key!("hyper_parameters.backpressure_policy.enable_flow_control", Kind::Bool, Refused, "", Live, true,
        "the flow-control stage",
        |c| c.backpressure.enable_flow_control),
    key!("hyper_parameters.backpressure_policy.flow_control_threshold", Kind::Int { min: 1, max: U32 }, Refused, "messages", Live, 300,
        "`d` at which senders stop reading",
        |c| c.backpressure.flow_control_threshold),
    key!("hyper_parameters.backpressure_policy.enable_disconnect", Kind::Bool, Refused, "", Live, true,
        "the [messages rule](#closes-slow-consumers) (only that rule)",
        |c| c.backpressure.enable_disconnect),
    key!("hyper_parameters.backpressure_policy.disconnect_threshold", Kind::Int { min: 1, max: U32 }, Refused, "messages", Live, 500,
        "`d` that a recipient may not stay at or above for `write_deadline_ms`",
        |c| c.backpressure.disconnect_threshold),
    key!("hyper_parameters.write_deadline_ms", Kind::Int { min: 1, max: 3_600_000 }, Refused, "milliseconds", Live, 10_000,
        "a recipient with data queued that accepts no bytes for this long is closed; also the duration of the messages rule (corecast)",
        |c| c.write_deadline_ms),
    key!("hyper_parameters.max_pending_bytes", Kind::Int { min: 4096, max: 1 << 40 }, Refused, "bytes", Live, 64u64 << 20,
        "bytes queued for one recipient before it is closed, whatever the flags; a quarter of it throttles the senders, half of it stops them (corecast)",
        |c| c.max_pending_bytes),
    key!("hyper_parameters.max_total_pending_bytes", Kind::Int { min: 4096, max: 1 << 48 }, Refused, "bytes", Live, 1u64 << 30,
        "memory held by queued envelopes in the process (each batch once) before every shard stops reading (corecast)",
        |c| c.max_total_pending_bytes),
    key!("hyper_parameters.max_total_partial_bytes", Kind::Int { min: 65536, max: 1 << 48 }, Refused, "bytes", Restart, 256u64 << 20,
        "memory held by partial lines (lines still arriving) in the process; past it, connections holding more than 4 KiB of one are not read until it drops below (see [Memory bounds](#memory-bounds)) (corecast)",
        |c| c.max_total_partial_bytes),
    key!("hyper_parameters.max_line_bytes", Kind::Int { min: 1, max: 64 << 20 }, Refused, "bytes", Restart, 1u64 << 20,
        "longest line content (corecast)",
        |c| c.max_line_bytes),
    Key {
        default: |m| json!(super::default_max_connections(m.nofile_hard_limit)),
        default_doc: "open-file hard limit − 64",
        ..key!("hyper_parameters.max_connections", Kind::Int { min: 1, max: 10_000_000 }, Refused, "connections", Live, 1,
            "open connections before new ones get N6; lowering it closes nobody (corecast)",
            |c| c.max_connections)
    },
    key!("hyper_parameters.quarantine_by", Kind::OneOf(&["ip", "addr"]), Refused, "", Restart, "ip",
        "[quarantine](#quarantine) key; `\"addr\"` is the reference's ip:port (corecast)",
        |c| c.quarantine_by),
    key!("hyper_parameters.quarantine_strikes", Kind::Int { min: 1, max: U32 }, Refused, "closes", Live, 3,
        "strikes within 10 minutes that quarantine a key; `1` quarantines on the first; a close of a client that has read, or within `write_deadline_ms` of the key's last strike, is no strike (see [Quarantine](#quarantine)) (corecast)",
        |c| c.quarantine_strikes),
    key!("hyper_parameters.quarantine_cooldown_secs", Kind::Int { min: 0, max: U32 }, Refused, "seconds", Live, 300,
        "how long a quarantined key is refused; `0` quarantines nothing",
        |c| c.quarantine_cooldown_secs),
    key!("hyper_parameters.quarantine_cleanup_interval_secs", Kind::Int { min: 1, max: 86_400 }, Refused, "seconds", Restart, 60,
        "period of the purge of expired entries",
        |c| c.quarantine_cleanup_interval_secs),
    key!("hyper_parameters.quarantine_max_entries", Kind::Int { min: 1, max: 100_000_000 }, Refused, "entries", Restart, 100_000,
        "bound on the table's entries and strikes, oldest evicted first (corecast)",
        |c| c.quarantine_max_entries),
    key!("hyper_parameters.shutdown_grace_ms", Kind::Int { min: 0, max: 3_600_000 }, Refused, "milliseconds", Live, 5000,
        "bound on the [shutdown](#shutdown) drain (corecast)",
        |c| c.shutdown_grace_ms),
    key!("hyper_parameters.flush_window_us", Kind::Int { min: 0, max: 1_000_000 }, Refused, "microseconds", Restart, 500,
        "shortest time between two write passes of a shard; a pass writes every recipient with something queued, and a shard that has not written for a window writes at once; passes also stay twice as far apart as their writes take, so writing takes at most about half of a shard's time; `0`: passes back to back, lowest latency, most writes (corecast; see [design.md](design.md#the-write-schedule))",
        |c| c.flush_window_us),
    key!("hyper_parameters.admin_addr", Kind::Addr, Disables, "", Restart, Value::Null,
        "where the [admin endpoint](#observability) listens; `null` serves none; port 0 picks one and logs it; flag `--admin` (corecast)",
        |c| c.admin_addr),
    key!("hyper_parameters.allow", Kind::Networks { non_empty: true }, Disables, "", Live, Value::Null,
        "when set, only clients in these networks are served ([admission by network](#admission-by-network)); a reload closes the connected clients it no longer admits (corecast)",
        |c| c.allow),
    key!("hyper_parameters.deny", Kind::Networks { non_empty: false }, KeepsDefault, "", Live, json!([]),
        "clients in these networks are closed at accept with no bytes, even when allowed; a reload closes the connected clients it denies (corecast)",
        |c| c.deny),
    key!("hyper_parameters.max_connections_per_ip", Kind::Int { min: 1, max: 10_000_000 }, Disables, "connections", Restart, Value::Null,
        "open connections per client IP address before new ones get N7; `null`: no cap (corecast)",
        |c| c.max_connections_per_ip),
    key!("hyper_parameters.proxy_protocol", Kind::Bool, Refused, "", Restart, false,
        "every connection starts with a [PROXY protocol](#proxy-protocol) v1 or v2 header naming the client (corecast)",
        |c| c.proxy_protocol),
    key!("hyper_parameters.proxy_trusted", Kind::Networks { non_empty: false }, KeepsDefault, "", Live, json!([]),
        "sources allowed to send a PROXY header, at least one when `proxy_protocol` is `true`; others are closed with no bytes (corecast)",
        |c| c.proxy_trusted),
    key!("hyper_parameters.proxy_header_timeout_ms", Kind::Int { min: 1, max: 60_000 }, Refused, "milliseconds", Live, 3000,
        "time from accept to the end of the PROXY header (corecast)",
        |c| c.proxy_header_timeout_ms),
    key!("hyper_parameters.tls.listen", LISTEN, Refused, "", Restart, Value::Null,
        "where TLS clients connect; not the plain or admin address; port 0 picks one and logs it (`listening for TLS on ...`)",
        get: |c| c.tls.as_ref().map_or(Value::Null, |t| Field::to_json(&t.listen)),
        set: |c, v| if let Some(t) = &mut c.tls { t.listen = Field::from_json(v) }),
    key!("hyper_parameters.tls.cert_file", FILE, Refused, "", Restart, Value::Null,
        "PEM certificate chain, the server's certificate first; a reload reads the file again (rotation) for new handshakes",
        get: |c| c.tls.as_ref().map_or(Value::Null, |t| Field::to_json(&t.cert_file)),
        set: |c, v| if let Some(t) = &mut c.tls { t.cert_file = Field::from_json(v) }),
    key!("hyper_parameters.tls.key_file", FILE, Refused, "", Restart, Value::Null,
        "PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate; read again by a reload",
        get: |c| c.tls.as_ref().map_or(Value::Null, |t| Field::to_json(&t.key_file)),
        set: |c, v| if let Some(t) = &mut c.tls { t.key_file = Field::from_json(v) }),
    key!("hyper_parameters.tls.client_ca_file", FILE_OR_NULL, Disables, "", Restart, Value::Null,
        "PEM CA certificates; when set, every client must present a certificate signed by one of them (mTLS); read again by a reload",
        get: |c| c.tls.as_ref().map_or(Value::Null, |t| Field::to_json(&t.client_ca_file)),
        set: |c, v| if let Some(t) = &mut c.tls { t.client_ca_file = Field::from_json(v) }),
    key!("hyper_parameters.tls.handshake_timeout_ms", Kind::Int { min: 100, max: 600_000 }, KeepsDefault, "milliseconds", Live, 10_000,
        "a handshake not finished this long after accept is closed (`tls_handshake_failed`)",
        get: |c| c.tls.as_ref().map_or(Value::Null, |t| Field::to_json(&t.handshake_timeout_ms)),
        set: |c, v| if let Some(t) = &mut c.tls { t.handshake_timeout_ms = Field::from_json(v) }),
    key!("hyper_parameters.tls.max_handshakes", Kind::Int { min: 1, max: 100_000 }, KeepsDefault, "handshakes", Restart, 64,
        "handshakes in progress per shard; a connection past it is closed at once with no bytes (`tls_busy`)",
        get: |c| c.tls.as_ref().map_or(Value::Null, |t| Field::to_json(&t.max_handshakes)),
        set: |c, v| if let Some(t) = &mut c.tls { t.max_handshakes = Field::from_json(v) }),
    Key {
        default_doc: "—",
        ..key!("hyper_parameters.cluster.nats", Kind::NatsUrls, Refused, "", Restart, Value::Null,
            "the NATS servers of one NATS cluster; the uplink fails over between them; flag `--cluster-nats URL`, repeatable (corecast)",
            get: |c| c.cluster.as_ref().map_or(Value::Null, |k| json!(k.nats)),
            set: |c, v| {
                if let Some(k) = &mut c.cluster {
                    k.nats = Field::from_json(v);
                }
            })
    },
    key!("hyper_parameters.cluster.subject", SUBJECT, KeepsDefault, "", Restart, DEFAULT_SUBJECT,
        "the subject the nodes share; nodes on different subjects are different rooms (corecast)",
        get: |c| c.cluster.as_ref().map_or(Value::Null, |k| json!(k.subject)),
        set: |c, v| {
            if let Some(k) = &mut c.cluster {
                k.subject = Field::from_json(v);
            }
        }),
    Key {
        alias_of: Some("host"),
        ..key!("hyper_parameters.host", HOST, Refused, "", Restart, Value::Null,
            "older Summoner configs put `host` here; used unless the top level sets it",
            |c| c.host)
    },
    Key {
        alias_of: Some("port"),
        ..key!("hyper_parameters.port", Kind::Int { min: 0, max: 65535 }, Refused, "", Restart, Value::Null,
            "older Summoner configs put `port` here; used unless the top level sets it",
            |c| c.port)
    },
    ignored!("hyper_parameters.connection_buffer_size", INERT),
    ignored!("hyper_parameters.command_buffer_size", INERT),
    ignored!("hyper_parameters.control_channel_capacity", INERT),
    ignored!("hyper_parameters.queue_monitor_capacity", INERT),
];

fn parent(path: &str) -> &str {
    path.rsplit_once('.').map_or("", |(p, _)| p)
}

fn leaf(path: &str) -> &str {
    path.rsplit_once('.').map_or(path, |(_, l)| l)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The key declared at `path`.
pub fn key(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// Whether `path` lies inside a section that is a feature (its keys have no default of
/// their own until the section is there).
pub fn in_optional_section(path: &str) -> bool {
    SECTIONS
        .iter()
        .any(|s| s.optional.is_some() && path.starts_with(s.path) && path[s.path.len()..].starts_with('.'))
}

/// Turns on the optional section at `path`, its keys at their defaults, unless it is on.
pub fn enable_section(config: &mut Config, path: &str) {
    let Some(optional) = SECTIONS
        .iter()
        .filter(|s| s.path == path)
        .find_map(|s| s.optional.as_ref())
    else {
        return;
    };
    if (optional.enable)(config) {
        // No key of an optional section depends on the machine.
        let machine = Machine {
            usable_cpus: 1,
            nofile_hard_limit: 1024,
        };
        for key in KEYS.iter().filter(|k| k.parent() == path && k.is_field()) {
            (key.set)(config, &(key.default)(&machine));
        }
    }
}

/// The section `path` lies in.
pub fn parent_of(path: &str) -> &str {
    parent(path)
}

/// Sets every field to its default for `machine`.
pub fn apply_defaults(config: &mut Config, machine: &Machine) {
    for key in KEYS.iter().filter(|k| k.is_field() && !in_optional_section(k.path)) {
        (key.set)(config, &(key.default)(machine));
    }
}

/// A rule across keys: the config it leaves is refused with the error it returns.
type Check = fn(&Config) -> Result<(), ConfigError>;

/// Rules across keys, checked once the whole file is read.
static CHECKS: &[Check] = &[proxy_needs_a_trusted_source, tls_files_load];

/// Fail closed and loud: with nobody trusted every connection would be refused.
fn proxy_needs_a_trusted_source(c: &Config) -> Result<(), ConfigError> {
    if c.proxy_protocol && c.proxy_trusted.is_empty() {
        return Err(invalid(
            "hyper_parameters.proxy_trusted",
            "at least one network when proxy_protocol is true",
            &json!([]),
        ));
    }
    Ok(())
}

/// The TLS files load and match (so `check` and `serve` refuse them with exit 78, naming
/// the key).
fn tls_files_load(c: &Config) -> Result<(), ConfigError> {
    let Some(tls) = &c.tls else { return Ok(()) };
    crate::tls::server_config(tls, "hyper_parameters.tls").map_err(|e| ConfigError::Invalid {
        key: e.key,
        expected: e.expected,
        found: e.found,
    })?;
    Ok(())
}

/// Applies a parsed file over `config`; unknown keys are pushed onto `warnings`.
pub fn apply(config: &mut Config, root: &Value, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    let map = root
        .as_object()
        .ok_or_else(|| invalid("(top level)", "an object", root))?;
    walk(config, map, map, "", warnings)?;
    CHECKS.iter().try_for_each(|check| check(config))
}

fn walk(
    config: &mut Config,
    map: &Map<String, Value>,
    root: &Map<String, Value>,
    prefix: &str,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let keys = KEYS.iter().filter(|k| k.parent() == prefix);
    let sections = SECTIONS
        .iter()
        .filter(|s| !s.path.is_empty() && parent(s.path) == prefix);
    for key in keys.clone() {
        let Some(v) = map.get(key.name()) else { continue };
        if key.alias_of.is_some_and(|target| root.contains_key(target)) {
            continue;
        }
        key.apply(config, v, key.path)?;
    }
    for section in sections.clone() {
        match (map.get(leaf(section.path)), &section.optional) {
            (None, _) | (Some(Value::Null), None) => {}
            (Some(Value::Null), Some(optional)) => (optional.disable)(config),
            (Some(Value::Object(inner)), optional) => {
                if let Some(optional) = optional {
                    enable_section(config, section.path);
                    for name in optional.required.iter().filter(|n| !inner.contains_key(**n)) {
                        let path = join(section.path, name);
                        if let Some(key) = key(&path) {
                            key.apply(config, &Value::Null, &path)?;
                        }
                    }
                }
                walk(config, inner, root, section.path, warnings)?;
            }
            (Some(other), _) => return Err(invalid(section.path, section.expected, other)),
        }
    }
    let known: Vec<&str> = keys.map(Key::name).chain(sections.map(|s| leaf(s.path))).collect();
    for name in map.keys().filter(|n| !known.contains(&n.as_str())) {
        let closest = known
            .iter()
            .map(|k| (strsim::levenshtein(name, k), *k))
            .min()
            .filter(|(d, _)| *d <= 3 || *d * 3 <= name.len());
        warnings.push(match closest {
            Some((_, k)) => format!(
                "unknown config key {} ignored (did you mean {}?)",
                join(prefix, name),
                join(prefix, k)
            ),
            None => format!("unknown config key {} ignored", join(prefix, name)),
        });
    }
    Ok(())
}

/// The effective configuration in the file's shape, every key with its value.
pub fn to_json(config: &Config) -> Value {
    let mut root = Map::new();
    for section in SECTIONS.iter().filter(|s| !s.path.is_empty()) {
        let on = section.optional.as_ref().is_none_or(|o| (o.is_on)(config));
        insert(&mut root, section.path, if on { json!({}) } else { Value::Null });
    }
    for key in KEYS.iter().filter(|k| k.is_field()) {
        if in_optional_section(key.path) && (key.get)(config).is_null() {
            continue;
        }
        insert(&mut root, key.path, (key.get)(config));
    }
    Value::Object(root)
}

fn insert(root: &mut Map<String, Value>, path: &str, v: Value) {
    let mut map = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            map.insert(part.to_string(), v);
            return;
        }
        let next = map.entry(part).or_insert_with(|| json!({}));
        match next.as_object_mut() {
            Some(m) => map = m,
            // A section that is off (`null`) holds no keys.
            None => return,
        }
    }
}

/// `--help` text for a flag that sets `path`: the flag's own line, the key and its default.
pub fn flag_help(what: &str, path: &str) -> String {
    match key(path) {
        Some(k) => {
            let default = k.default_text().replace('`', "");
            let default = match default.trim_matches('"') {
                "null" => "none",
                d => d,
            };
            format!("{what} [key: {path}] [default: {default}]")
        }
        None => what.to_string(),
    }
}

/// The key table as docs/protocol.md carries it.
pub fn markdown() -> String {
    let mut out = String::from("| key | default | range | unit | reload | meaning |\n|---|---|---|---|---|---|\n");
    let reload = |r: Reload| match r {
        Reload::Live => "live",
        Reload::Restart => "restart",
        Reload::Inert => "—",
    };
    for key in KEYS {
        if let Some(s) = SECTIONS.iter().find(|s| s.optional.is_some() && s.path == key.parent()) {
            // The section's own row, before its first key.
            if KEYS
                .iter()
                .find(|k| k.parent() == s.path)
                .is_some_and(|first| first.path == key.path)
            {
                if let Some(o) = &s.optional {
                    out.push_str(&format!(
                        "| `{}` | `null` | object or `null` | | {} | {} |\n",
                        s.path,
                        reload(o.reload),
                        o.doc
                    ));
                }
            }
        }
        let mut range = key.kind.range_doc();
        match key.null {
            Null::Disables => range.push_str(" or `null`"),
            Null::KeepsDefault if key.is_field() => range.push_str(" or `null` (keeps the default)"),
            _ => {}
        }
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            key.path,
            key.default_text(),
            range,
            key.unit,
            reload(key.reload),
            key.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEGIN: &str = "<!-- keys:begin";
    const END: &str = "<!-- keys:end -->";

    #[test]
    fn docs_protocol_md_carries_the_declared_key_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md");
        let docs = std::fs::read_to_string(path).unwrap();
        let start = docs.find(BEGIN).expect("docs/protocol.md has the keys:begin marker");
        let body = &docs[start..];
        let body = &body[body.find('\n').unwrap() + 1..];
        let end = body.find(END).expect("docs/protocol.md has the keys:end marker");
        assert!(
            body[..end] == markdown(),
            "docs/protocol.md's key table differs from the declared table: replace it with \
             the output of `corecast keys`"
        );
    }

    #[test]
    fn paths_are_unique_and_every_key_lives_in_a_declared_section() {
        for (i, key) in KEYS.iter().enumerate() {
            assert!(KEYS[..i].iter().all(|k| k.path != key.path), "{} twice", key.path);
            assert!(SECTIONS.iter().any(|s| s.path == key.parent()), "{}", key.path);
            assert!(
                !key.doc.is_empty() && !key.doc.contains('|') && !key.doc.contains('\n'),
                "{}",
                key.path
            );
        }
    }
}
