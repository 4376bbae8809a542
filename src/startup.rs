//! Start-up checks (docs/protocol.md#start-up-checks), run by [`crate::run`] before any
//! shard starts: each failure is one sentence that says what is wrong and how to fix it,
//! and nothing is left half-started. Also holds the [`PortGuard`] and binds the shards'
//! listening sockets ([`bind_listeners`]) before any shard runs. The limits themselves are
//! read (and the open-file limit raised) in [`crate::machine`].

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::machine::{self, MIN_MEMLOCK_BYTES};

/// Why the relay cannot start.
#[derive(Debug)]
pub enum StartupError {
    /// io_uring cannot be set up: seccomp, `kernel.io_uring_disabled` or an old kernel.
    IoUringUnavailable(String),
    /// `RLIMIT_MEMLOCK` is below what the executors need.
    MemlockTooLow { have: u64, need: u64 },
    /// Another process already listens on the address.
    AddressInUse(SocketAddr),
    /// The host could not be resolved or bound.
    Listen { addr: String, reason: String },
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupError::IoUringUnavailable(why) => write!(
                f,
                "io_uring is not usable on this machine ({why}); see LINUX_ONLY.md for kernel, seccomp and sysctl requirements"
            ),
            StartupError::MemlockTooLow { have, need } => write!(
                f,
                "locked-memory limit (RLIMIT_MEMLOCK) is {} KiB but corecast needs at least {} KiB; raise it with `ulimit -l {}` or LimitMEMLOCK= in the systemd unit",
                have >> 10,
                need >> 10,
                need >> 10
            ),
            StartupError::AddressInUse(addr) => {
                write!(f, "cannot listen on {addr}: address already in use (is another relay running?)")
            }
            StartupError::Listen { addr, reason } => write!(f, "cannot listen on {addr}: {reason}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// Checks `RLIMIT_MEMLOCK` against glommio's floor: it refuses to create any executor
/// below 512 KiB, whatever the shard count. Above it every shard count starts: the rings
/// are sized by the limit ([`machine::plan_rings`]). The soft limit is raised to the hard
/// one first (by `run`), so only the hard limit matters; a check raises nothing and reads
/// the hard limit instead.
pub fn check_memlock() -> Result<(), StartupError> {
    match machine::memlock_limit() {
        Some((_, hard)) if hard != libc::RLIM_INFINITY && hard < MIN_MEMLOCK_BYTES => {
            Err(StartupError::MemlockTooLow {
                have: hard,
                need: MIN_MEMLOCK_BYTES,
            })
        }
        _ => Ok(()),
    }
}

/// Sets up (and closes) a one-entry io_uring, the way glommio will. glommio itself panics
/// or exits without a useful message when this fails. The syscall decides; the sysctl only
/// explains a refusal.
pub fn check_io_uring() -> Result<(), StartupError> {
    // struct io_uring_params is 120 bytes; all zero asks for defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup writes at most sizeof(io_uring_params) into `params`.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd is a descriptor we just opened and own.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    let why = match (err.raw_os_error(), sysctl.trim()) {
        (Some(libc::ENOSYS), _) => "the kernel has no io_uring; Linux 5.8 or newer is needed".to_string(),
        (Some(libc::EPERM), "2") => "sysctl kernel.io_uring_disabled is 2".to_string(),
        (Some(libc::EPERM), "1") => {
            "sysctl kernel.io_uring_disabled is 1 and this process is not in kernel.io_uring_group".to_string()
        }
        (Some(libc::EPERM), _) => "io_uring_setup was refused, likely by a seccomp profile".to_string(),
        _ => format!("io_uring_setup failed: {err}"),
    };
    Err(StartupError::IoUringUnavailable(why))
}

/// glommio's listeners always set SO_REUSEPORT, so a second relay would silently share
/// the port. Binding once without it fails if anything already listens there. This
/// catches other programs; two relays starting at the same instant can both pass it
/// before either listens, which [`PortGuard`] covers.
pub fn check_port_free(addr: SocketAddr) -> Result<(), StartupError> {
    if addr.port() == 0 {
        return Ok(());
    }
    match probe_bind(addr) {
        Ok(()) => Ok(()),
        Err(e) => Err(listen_error(addr, e)),
    }
}

/// Binds `addr` once (with SO_REUSEADDR, never SO_REUSEPORT) and closes the socket at once;
/// nothing listens. The error is the one a listener on `addr` would get: the address is
/// not local, the port is privileged, or (EADDRINUSE) something already holds it.
pub fn probe_bind(addr: SocketAddr) -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    // SO_REUSEADDR tolerates our own sockets lingering in TIME_WAIT, never a listener.
    let _ = socket.set_reuse_address(true);
    socket.bind(&addr.into())
}

/// Held for the life of the process by a relay that listens on a fixed port, so that no
/// second relay can share that port through SO_REUSEPORT, however close their starts.
///
/// Each guard is a Unix datagram socket bound to a name in the abstract namespace, derived
/// from the port and IP family (`corecast-port-guard/tcp4/8888`). Binding such a name is
/// atomic, so of two relays racing for the same port exactly one gets it; the name lives
/// in the network namespace, as the port does; and the kernel frees it when the process
/// ends, however it ends, leaving no file behind (a lock file would have to be cleaned up
/// after a crash, and would be per mount namespace rather than per network namespace).
///
/// The guard covers the port number per IP family whatever the host: `0.0.0.0:P` and
/// `127.0.0.1:P` overlap (the kernel would share them through SO_REUSEPORT), and telling
/// overlapping hosts apart is not worth a relay that splits clients with another one. An
/// IPv6 wildcard (`[::]:P`) also accepts IPv4 connections (dual stack), so it takes both
/// families' guards. The cost: two relays on different addresses of one family cannot use
/// the same port number.
pub struct PortGuard {
    _names: Vec<std::os::unix::net::UnixDatagram>,
}

impl PortGuard {
    /// Takes the guard for `addr`'s port; port 0 needs none (the kernel picks a free port).
    pub fn acquire(addr: SocketAddr) -> Result<PortGuard, StartupError> {
        let mut names = Vec::new();
        if addr.port() != 0 {
            for family in guard_families(addr) {
                names.push(bind_guard_name(&guard_name(family, addr.port())).map_err(|e| {
                    if e.raw_os_error() == Some(libc::EADDRINUSE) {
                        StartupError::AddressInUse(addr)
                    } else {
                        StartupError::Listen {
                            addr: addr.to_string(),
                            reason: format!("cannot take the port guard: {e}"),
                        }
                    }
                })?);
            }
        }
        Ok(PortGuard { _names: names })
    }
}

/// The IP families a listener on `addr` accepts connections from.
fn guard_families(addr: SocketAddr) -> &'static [&'static str] {
    match addr.ip() {
        std::net::IpAddr::V4(_) => &["tcp4"],
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => &["tcp4", "tcp6"],
        std::net::IpAddr::V6(_) => &["tcp6"],
    }
}

fn guard_name(family: &str, port: u16) -> String {
    format!("corecast-port-guard/{family}/{port}")
}

fn bind_guard_name(name: &str) -> io::Result<std::os::unix::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    // std opens it with SOCK_CLOEXEC, so a child process never inherits the guard.
    std::os::unix::net::UnixDatagram::bind_addr(&addr)
}

pub fn listen_error(addr: SocketAddr, e: io::Error) -> StartupError {
    if e.raw_os_error() == Some(libc::EADDRINUSE) {
        return StartupError::AddressInUse(addr);
    }
    StartupError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    }
}

/// The kernel's listen backlog ceiling, used as our backlog.
fn backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Binds `count` listeners sharing `addr` through SO_REUSEPORT, one per shard, with
/// socket2 (glommio's own `bind` panics on a bad address and hard-codes its backlog). With port 0 the first
/// one picks the port and the rest join it. Returns the bound address.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> Result<(SocketAddr, Vec<std::os::fd::OwnedFd>), StartupError> {
    let mut bound = addr;
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = socket2::Socket::new(socket2::Domain::for_address(bound), socket2::Type::STREAM, None)
            .map_err(|e| listen_error(addr, e))?;
        socket.set_reuse_address(true).map_err(|e| listen_error(addr, e))?;
        socket.set_reuse_port(true).map_err(|e| listen_error(addr, e))?;
        socket.bind(&bound.into()).map_err(|e| listen_error(addr, e))?;
        socket.listen(backlog()).map_err(|e| listen_error(addr, e))?;
        if bound.port() == 0 {
            bound = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| listen_error(addr, std::io::Error::other("no local address")))?;
        }
        fds.push(std::os::fd::OwnedFd::from(socket));
    }
    Ok((bound, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    // These take real guards in this network namespace, on ports (47001, 47002) that no
    // other test uses.
    #[test]
    fn a_second_guard_on_the_same_port_is_refused_until_the_first_is_dropped() {
        let first = PortGuard::acquire(addr("127.0.0.1:47001")).unwrap();
        let e = PortGuard::acquire(addr("127.0.0.1:47001")).err().unwrap();
        assert!(matches!(e, StartupError::AddressInUse(_)), "{e}");
        assert!(e.to_string().contains("address already in use"), "{e}");
        // Another host of the same family overlaps too (think 0.0.0.0 and 127.0.0.1).
        assert!(PortGuard::acquire(addr("0.0.0.0:47001")).is_err());
        drop(first);
        assert!(PortGuard::acquire(addr("0.0.0.0:47001")).is_ok());
    }

    #[test]
    fn families_are_guarded_apart_except_for_the_dual_stack_wildcard() {
        let v4 = PortGuard::acquire(addr("127.0.0.1:47002")).unwrap();
        let v6 = PortGuard::acquire(addr("[::1]:47002")).unwrap();
        assert!(PortGuard::acquire(addr("[::]:47002")).is_err());
        drop(v4);
        // The wildcard needs both families: the IPv6 one is still held.
        assert!(PortGuard::acquire(addr("[::]:47002")).is_err());
        drop(v6);
        let wild = PortGuard::acquire(addr("[::]:47002")).unwrap();
        assert!(PortGuard::acquire(addr("127.0.0.1:47002")).is_err());
        drop(wild);
    }

    #[test]
    fn port_zero_takes_no_guard() {
        let _a = PortGuard::acquire(addr("127.0.0.1:0")).unwrap();
        let _b = PortGuard::acquire(addr("127.0.0.1:0")).unwrap();
    }
}
