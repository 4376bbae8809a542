//! What a result needs to be compared later: the versions of the generator and of every
//! server measured (from the binary's own `--version`), the source commit, the machine
//! (kernel, CPU model, logical CPUs), the date in RFC 3339 UTC, the full command line and
//! every setting applied to a server (its arguments and config file). Collected once per
//! `run` (by `lib.rs`) or per `compare`; everything is best effort: what cannot be read is
//! `null`, never an error.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::proto::Protocol;

/// How long a server binary's `--version` may take before it is killed.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub loadgen_version: &'static str,
    /// `git rev-parse HEAD` in the working directory (with `-dirty` when it has changes):
    /// the source the measured corecast was normally built from.
    pub source_commit: Option<String>,
    pub servers: Vec<ServerInfo>,
    /// `uname -srm`.
    pub kernel: Option<String>,
    pub cpu_model: Option<String>,
    /// Logical CPUs of the machine.
    pub cpus: usize,
    /// When the run or comparison started, RFC 3339 UTC.
    pub date: String,
    /// The generator's command line, program first.
    pub command_line: Vec<String>,
}

/// One server measured.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub name: String,
    pub program: Option<String>,
    /// The first line of `program --version`.
    pub version: Option<String>,
    /// A commit named in that line (corecast builds that embed one).
    pub commit: Option<String>,
    /// Every setting applied: its arguments and config file contents.
    pub settings: Vec<String>,
}

/// The command line `main_with` was last given (the process's own arguments are not it
/// when the generator runs inside a test); empty before.
static COMMAND_LINE: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn set_command_line(args: Vec<String>) {
    *COMMAND_LINE.lock().unwrap_or_else(|p| p.into_inner()) = args;
}

impl Meta {
    pub fn collect(servers: Vec<ServerInfo>) -> Meta {
        Meta {
            loadgen_version: env!("CARGO_PKG_VERSION"),
            source_commit: source_commit(),
            servers,
            kernel: kernel(),
            cpu_model: cpu_model(),
            cpus: std::fs::read_to_string("/proc/cpuinfo")
                .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            command_line: {
                let given = COMMAND_LINE.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if given.is_empty() {
                    std::env::args().collect()
                } else {
                    given
                }
            },
        }
    }
}

impl ServerInfo {
    /// A server the generator started itself, with the settings it applied.
    pub fn of_program(name: &str, program: &Path, settings: Vec<String>) -> ServerInfo {
        let version = version_line(program);
        ServerInfo {
            name: name.to_string(),
            program: Some(program.display().to_string()),
            // Only corecast's own version line is read for a commit: Redis's carries a
            // build id and a zero sha that are not one.
            commit: version
                .as_deref()
                .filter(|_| name.starts_with("corecast"))
                .and_then(commit_in),
            version,
            settings,
        }
    }

    /// A running server (`--server-pid`): its binary, version and command line from /proc.
    pub fn of_pid(pid: u32, protocol: Protocol) -> ServerInfo {
        let name = match protocol {
            Protocol::Summoner => "corecast",
            Protocol::Nats => "nats-server",
            Protocol::Redis => "redis-server",
        };
        let settings = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|&b| b == 0)
                    .skip(1)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        match std::fs::read_link(format!("/proc/{pid}/exe")) {
            Ok(exe) => ServerInfo::of_program(name, &exe, settings),
            Err(_) => ServerInfo {
                name: name.to_string(),
                program: None,
                version: None,
                commit: None,
                settings,
            },
        }
    }
}

/// The first non-empty line `program --version` prints (stdout, else stderr).
fn version_line(program: &Path) -> Option<String> {
    let mut child = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + VERSION_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let out = child.wait_with_output().ok()?;
    [out.stdout, out.stderr]
        .iter()
        .flat_map(|b| {
            String::from_utf8_lossy(b)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|l| l.trim().to_string())
        .find(|l| !l.is_empty())
}

/// A word of 7 to 40 hex digits with at least one digit, as `corecast 0.1.0 (abc1234)`
/// would carry.
fn commit_in(version: &str) -> Option<String> {
    version
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find(|w| {
            (7..=40).contains(&w.len())
                && w.chars().all(|c| c.is_ascii_hexdigit())
                && w.chars().any(|c| c.is_ascii_digit())
        })
        .map(str::to_string)
}

fn run_text(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn source_commit() -> Option<String> {
    let commit = run_text("git", &["rev-parse", "HEAD"])?;
    let dirty = run_text("git", &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{commit}-dirty") } else { commit })
}

fn kernel() -> Option<String> {
    // SAFETY: uname fills the struct we own; its fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Some(format!(
        "{} {} {}",
        field(&u.sysname),
        field(&u.release),
        field(&u.machine)
    ))
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_is_found_in_a_version_line_and_not_invented() {
        assert_eq!(commit_in("corecast 0.1.0 (c0967be)").as_deref(), Some("c0967be"));
        assert_eq!(commit_in("corecast 0.1.0"), None);
        assert_eq!(commit_in("nats-server: v2.10.18"), None);
        assert_eq!(commit_in("deadbeefcafe"), None);
    }

    #[test]
    fn the_machine_is_described() {
        let m = Meta::collect(Vec::new());
        assert!(
            m.kernel.as_deref().is_some_and(|k| k.starts_with("Linux ")),
            "{:?}",
            m.kernel
        );
        assert!(m.cpus >= 1);
        assert!(m.date.ends_with('Z') && m.date.len() == 20, "{}", m.date);
    }
}
