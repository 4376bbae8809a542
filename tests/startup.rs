//! docs/protocol.md#start-up-checks: start-up checks fail with one clear sentence and a
//! non-zero exit.

use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::util::{corecast, spawn_logged, Client, Relay, PATIENCE};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_relay_on_a_busy_port_fails_with_address_in_use() {
    let first = Relay::start(&[]);
    let port = first.addr.port().to_string();
    let out = corecast().args(["--port", &port]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("address already in use"), "{}", stderr(&out));
    // The first relay still serves.
    let mut a = first.connect();
    let mut b = first.connect();
    a.send(b"still here\n");
    assert_eq!(b.line_str(), a.envelope("still here"));
}

#[test]
fn of_two_relays_started_at_the_same_instant_on_one_port_exactly_one_serves() {
    const PAIRS: usize = 10;
    for pair in 0..PAIRS {
        let port = free_port().to_string();
        let start = || {
            let mut cmd = corecast();
            // One shard each: two processes share a port through SO_REUSEPORT whatever
            // their shard counts, and a single shard keeps the test clear of the mesh
            // start-up (tested on its own).
            cmd.args(["--port", &port, "--shards", "1", "--log-level", "info"]);
            // Every other pair widens the window between the port checks and the bind to
            // 300 ms (a debug-build hook), so both relays surely pass the probe first.
            if pair % 2 == 0 {
                cmd.env("CORECAST_TEST_LISTEN_DELAY_MS", "300");
            }
            cmd
        };
        // Both are spawned before either has got far: start-up takes far longer than a spawn.
        let mut relays = [Started::new(start()), Started::new(start())];
        let deadline = Instant::now() + PATIENCE;
        let (winner, loser) = loop {
            let exited: Vec<usize> = (0..2).filter(|&i| relays[i].0.try_wait().unwrap().is_some()).collect();
            let listening: Vec<usize> = (0..2).filter(|&i| relays[i].1.count("listening on ") > 0).collect();
            match (exited.as_slice(), listening.as_slice()) {
                (&[lost], &[won]) if lost != won => break (won, lost),
                (&[_, _], _) => panic!(
                    "pair {pair}: both relays exited:\n{}\n---\n{}",
                    relays[0].1.text(),
                    relays[1].1.text()
                ),
                (_, &[_, _]) => panic!(
                    "pair {pair}: both relays listen on port {port}:\n{}\n---\n{}",
                    relays[0].1.text(),
                    relays[1].1.text()
                ),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "pair {pair}: no clear outcome:\n{}\n---\n{}",
                relays[0].1.text(),
                relays[1].1.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let status = relays[loser].0.wait().unwrap();
        relays[loser].1.wait_closed();
        let text = relays[loser].1.text();
        // The same sentence and exit code as when the probe finds the port taken.
        assert_eq!(status.code(), Some(1), "pair {pair}: {text}");
        assert!(
            text.contains(&format!("cannot listen on 127.0.0.1:{port}: address already in use")),
            "pair {pair}: {text}"
        );
        // The winner serves, and is not left waiting for its twin.
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut a = Client::connect(addr);
        relays[winner]
            .1
            .wait_for(&format!("client connected: {}", a.local_addr));
        let mut b = Client::connect(addr);
        relays[winner]
            .1
            .wait_for(&format!("client connected: {}", b.local_addr));
        a.send(b"only one of us\n");
        assert_eq!(b.line_str(), a.envelope("only one of us"));
    }
}

/// A relay process and its log, killed (by PID) when dropped, even by a failing test.
struct Started(std::process::Child, std::sync::Arc<crate::util::Log>);

impl Started {
    fn new(cmd: std::process::Command) -> Self {
        let (child, log) = spawn_logged(cmd);
        Started(child, log)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago (bound on port 0 and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_port_held_by_another_program_is_refused_too() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = other.local_addr().unwrap().port().to_string();
    let out = corecast().args(["--port", &port]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("address already in use"), "{}", stderr(&out));
}

#[test]
fn too_little_locked_memory_is_reported_with_the_fix() {
    let mut cmd = corecast();
    cmd.args(["--port", "0"]);
    // SAFETY: setrlimit is async-signal-safe; the struct lives on this stack frame.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 128 << 10,
                rlim_max: 128 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("RLIMIT_MEMLOCK") && err.contains("128 KiB") && err.contains("ulimit -l"),
        "{err}"
    );
    assert!(!err.contains("listening on"));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_blocked_by_seccomp_is_reported_before_anything_starts() {
    let mut cmd = corecast();
    cmd.args(["--port", "0"]);
    // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(deny_io_uring_setup);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("io_uring is not usable") && err.contains("LINUX_ONLY.md"),
        "{err}"
    );
    assert!(!err.contains("listening on"));
}

/// Installs a seccomp filter that makes io_uring_setup fail with EPERM, as Docker's
/// default profile does.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring_setup() -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const RET_ERRNO_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter { code: 0x15, jt, jf, k };
    let filter = [
        stmt(0x20, 4), // ld arch
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(0x06, RET_ALLOW),
        stmt(0x20, 0), // ld nr
        jeq(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(0x06, RET_ERRNO_EPERM),
        stmt(0x06, RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl with a valid, live filter program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const _) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
