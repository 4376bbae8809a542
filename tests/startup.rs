//! SPEC §5: start-up checks fail with one clear sentence and a non-zero exit.

use std::os::unix::process::CommandExt;
use std::process::Output;

use crate::util::{corecast, Relay};

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
