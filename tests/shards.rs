//! Many shards: the relay starts promptly whatever the shard count (more shards than CPUs
//! included), a bounded start-up names a shard that does not start, a signal during
//! start-up stops it cleanly, and a fan-out over many shards keeps every sender's order.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{corecast, envelope, Client, Log, Relay};

/// Generous: a start takes a fraction of a second even with 32 shards on 2 busy CPUs; a
/// hung mesh never starts at all.
const PROMPTLY: Duration = Duration::from_secs(10);

/// Rate limiting and backpressure off: these tests are about delivery and order.
const UNLIMITED: &str = r#"{"hyper_parameters":{"rate_limit_msgs_per_minute":null,
    "backpressure_policy":{"enable_throttle":false,"enable_flow_control":false,"enable_disconnect":false}}}"#;

/// A relay process watched from its first line, before it listens.
struct Starting {
    child: Child,
    log: Arc<Log>,
}

impl Starting {
    fn spawn(mut cmd: Command) -> Starting {
        let mut child = cmd
            .args(["--port", "0", "--log-level", "info"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start corecast");
        let log = Arc::new(Log::default());
        log.clone().collect(child.stderr.take().expect("piped stderr"));
        Starting { child, log }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    fn wait_exit(&mut self) -> Option<i32> {
        crate::util::wait_exit(&mut self.child, &self.log)
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn eight_sixteen_and_thirty_two_shards_listen_promptly_on_every_start_and_drain() {
    // 22 starts in all; each also drains, which ends every ring of the mesh.
    for (shards, starts) in [(8, 10), (16, 7), (32, 5)] {
        for start in 0..starts {
            let mut cmd = corecast();
            cmd.args(["--shards", &shards.to_string()]);
            let mut relay = Starting::spawn(cmd);
            let began = Instant::now();
            relay.log.wait_for_within("listening on ", PROMPTLY);
            let took = began.elapsed();
            relay.signal(libc::SIGTERM);
            assert_eq!(
                relay.wait_exit(),
                Some(0),
                "{shards} shards, start {start} (listening after {took:?}); log:\n{}",
                relay.log.text()
            );
            assert_eq!(relay.log.count(" stopped: accepted="), shards, "{}", relay.log.text());
        }
    }
}

// The start-up hooks exist only in debug builds (as `cargo test` builds the relay).
#[cfg(debug_assertions)]
#[test]
fn a_shard_that_does_not_start_in_time_is_named_with_its_step_and_the_relay_exits_1() {
    let out = corecast()
        .args(["--port", "0", "--shards", "4"])
        .env("CORECAST_TEST_STARTUP_STALL", "3:20000")
        .env("CORECAST_TEST_STARTUP_TIMEOUT_MS", "1000")
        .output()
        .expect("run corecast");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("shard 3 did not start within 1 s (stuck at: attaching the mesh)"),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");
}

#[cfg(debug_assertions)]
#[test]
fn sigterm_during_start_up_drains_what_started_and_exits_0() {
    let mut cmd = corecast();
    // Shard 5 takes 3 s to start, so the signal lands while the relay waits for it.
    cmd.args(["--shards", "8"]).env("CORECAST_TEST_STARTUP_STALL", "5:3000");
    let mut relay = Starting::spawn(cmd);
    // Logged after the signal handlers are installed and before any shard starts.
    relay.log.wait_for("starting 8 shards");
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0), "{}", relay.log.text());
    let log = relay.log.text();
    assert!(log.contains("SIGTERM received during start-up; draining"), "{log}");
    assert!(!log.contains("listening on"), "{log}");
    assert_eq!(relay.log.count(" stopped: accepted="), 8, "{log}");
}

#[test]
fn four_senders_over_eight_shards_reach_every_recipient_complete_in_order_and_byte_exact() {
    let relay = Relay::with_config(UNLIMITED, &["--shards", "8"]);
    fan_out_keeps_every_senders_order(&relay, 2);
}

#[test]
fn four_senders_over_the_default_one_shard_per_cpu_reach_every_recipient_in_order() {
    let relay = Relay::with_config(UNLIMITED, &[]);
    // "starting N shards on M CPUs": the relay's own count of the CPUs it may use.
    let line = relay.log.wait_for("starting ");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "starting").expect("the start line");
    let (shards, cpus) = (words[at + 1], words[at + 4]);
    assert_eq!(shards, cpus, "one shard per CPU by default: {line}");
    let shards: usize = shards.parse().expect("a shard count");
    fan_out_keeps_every_senders_order(&relay, shards.min(2));
}

/// The default locked-memory limit of current distributions, 8 MiB, in bytes.
const DEFAULT_MEMLOCK: libc::rlim_t = 8 << 20;

/// Under a locked-memory limit charged as for a user without CAP_IPC_LOCK, the relay sizes
/// its rings to fit: 128 shards start under the default 8 MiB and relay in order, and a
/// limit too small for the rings of every shard asked for starts as many as fit, says so
/// in one line, and relays; `corecast check` says so too, as a warning, and exits 0.
///
/// One test, the small limit first: the kernel counts locked memory per user, so two
/// relays charged at once would share one budget, and a relay's rings are uncharged a
/// moment after it exits, not at once.
#[test]
fn a_locked_memory_limit_sizes_the_rings_and_128_shards_start_under_the_default_8_mib() {
    let mut check = corecast();
    check.args(["check", "--port", "0", "--shards", "64"]);
    let Some(check) = charge_memlock(check, 1 << 20) else {
        return;
    };
    let out = crate::util::output_within_patience(check);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("corecast: warning: locked-memory limit (RLIMIT_MEMLOCK) of 1024 KiB holds the io_uring rings of 34 shards, not 64"),
        "{err}"
    );

    let Some(cmd) = charged_memlock(1 << 20, &["--shards", "64"]) else {
        return;
    };
    let relay = Relay::spawn_within(cmd, MANY_SHARDS_START);
    // (1024 - 192) KiB of room for 24 KiB a shard at 64-entry rings.
    let line = relay.log.wait_for("locked-memory limit (RLIMIT_MEMLOCK) of 1024 KiB");
    assert!(
        line.contains("holds the io_uring rings of 34 shards, not 64: starting 34"),
        "{line}"
    );
    assert!(relay.log.text().contains("with 34 shards"), "{}", relay.log.text());
    assert_eq!(relay.log.count("WARNING"), 1, "{}", relay.log.text());
    fan_out_keeps_every_senders_order(&relay, 2);
    drop(relay);

    let Some(cmd) = charged_memlock(DEFAULT_MEMLOCK, &["--shards", "128"]) else {
        return;
    };
    let relay = Relay::spawn_within(cmd, MANY_SHARDS_START);
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.pid())).expect("the relay's status");
    let charged = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 14) == 0);
    assert!(charged, "the relay kept CAP_IPC_LOCK: {status}");
    // 48 KiB a shard: 128-entry rings.
    relay
        .log
        .wait_for("io_uring rings of 128 entries: 48 KiB of locked memory per shard, 6144 KiB for 128 shards");
    // glommio's DMA arena is unregistered at once: nothing stays pinned.
    assert!(status.contains("VmPin:\t       0 kB"), "{status}");
    // No warning; one would say a shard had to take smaller rings than planned.
    assert_eq!(relay.log.count("WARNING"), 0, "{}", relay.log.text());
    fan_out_keeps_every_senders_order(&relay, 2);
}

/// How long a start of many shards may take: seconds for 128 executors on 2 busy CPUs in a
/// debug build.
const MANY_SHARDS_START: Duration = Duration::from_secs(60);

/// The relay with `args` under a locked-memory limit of `bytes`, charged as the kernel
/// charges a user without CAP_IPC_LOCK; `None` (after saying why) where this process may
/// not raise its hard limit to `bytes`.
fn charged_memlock(bytes: libc::rlim_t, args: &[&str]) -> Option<Command> {
    let mut cmd = Relay::command(UNLIMITED, args);
    cmd.env("CORECAST_TEST_STARTUP_TIMEOUT_MS", "60000");
    charge_memlock(cmd, bytes)
}

/// `cmd` run under a locked-memory limit of `bytes` without CAP_IPC_LOCK (see
/// [`charged_memlock`]).
fn charge_memlock(mut cmd: Command, bytes: libc::rlim_t) -> Option<Command> {
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut hard) } == 0;
    if read && hard.rlim_max != libc::RLIM_INFINITY && hard.rlim_max < bytes {
        eprintln!(
            "skipping: the locked-memory hard limit is {} bytes, below the {bytes} this test sets",
            hard.rlim_max
        );
        return None;
    }
    // SAFETY: only async-signal-safe calls (prctl, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Root keeps CAP_IPC_LOCK, for which the kernel charges no locked memory at all:
            // dropping it from the bounding set leaves the exec'd relay without it, as a
            // service user is. Without root (no CAP_SETPCAP) there is nothing to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, 14 /* CAP_IPC_LOCK */, 0, 0, 0);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Some(cmd)
}

/// 4 senders burst 300 lines each to 12 clients (the senders receive each other's lines
/// too); every client gets every other sender's lines, each byte for byte the envelope
/// serde_json builds, in the order that sender sent them. The clients must land on at
/// least `min_shards` shards (SO_REUSEPORT spreads them by hash).
fn fan_out_keeps_every_senders_order(relay: &Relay, min_shards: usize) {
    const SENDERS: usize = 4;
    const LINES: usize = 300;
    let clients = relay.connect_many(12);
    let shards: std::collections::HashSet<String> = clients
        .iter()
        .map(|c| {
            let line = relay.log.wait_for(&format!("client connected: {}", c.local_addr));
            line.rsplit("(shard ").next().unwrap_or_default().to_string()
        })
        .collect();
    assert!(
        shards.len() >= min_shards,
        "clients on {} shards:\n{}",
        shards.len(),
        relay.log.text()
    );
    let addrs: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr).collect();
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let expected = if i < SENDERS {
                (SENDERS - 1) * LINES
            } else {
                SENDERS * LINES
            };
            let writer = c.stream.try_clone().expect("clone the socket");
            (writer, std::thread::spawn(move || read_lines(c, expected)))
        })
        .collect();
    let senders: Vec<_> = readers
        .iter()
        .take(SENDERS)
        .enumerate()
        .map(|(i, (writer, _))| {
            let mut writer = writer.try_clone().expect("clone the socket");
            std::thread::spawn(move || {
                let burst: String = (0..LINES).map(|seq| format!("sender {i} line {seq}\n")).collect();
                writer.write_all(burst.as_bytes()).expect("send the burst");
            })
        })
        .collect();
    for s in senders {
        s.join().expect("sender thread");
    }
    for (i, (_, reader)) in readers.into_iter().enumerate() {
        let by_sender = reader.join().expect("reader thread");
        for (s, addr) in addrs.iter().enumerate().take(SENDERS) {
            let got = by_sender.get(addr).cloned().unwrap_or_default();
            if s == i {
                assert!(got.is_empty(), "client {i} got its own lines back");
                continue;
            }
            let want: Vec<String> = (0..LINES)
                .map(|seq| envelope(&format!("sender {s} line {seq}"), *addr))
                .collect();
            assert_eq!(got.len(), LINES, "client {i} from sender {s}");
            assert!(got == want, "client {i}: sender {s}'s lines are out of order or differ");
        }
    }
}

/// Reads `n` lines and returns them as text, grouped by sender in arrival order.
fn read_lines(mut c: Client, n: usize) -> HashMap<SocketAddr, Vec<String>> {
    let mut out: HashMap<SocketAddr, Vec<String>> = HashMap::new();
    for _ in 0..n {
        let line = c.line_str();
        let env = corecast::protocol::decode_envelope(line.as_bytes()).expect("an envelope");
        let from = env.remote_addr.parse().expect("a socket address");
        out.entry(from).or_default().push(line);
    }
    out
}
