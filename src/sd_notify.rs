//! systemd's readiness protocol (`Type=notify`): one datagram such as `READY=1` sent to the
//! Unix socket named by `$NOTIFY_SOCKET`. [`crate::run`] calls [`notify`] from the main
//! thread once every shard is accepting (`READY=1`) and when the first shutdown signal
//! arrives (`STOPPING=1`). Without `$NOTIFY_SOCKET` (not started by systemd) it does
//! nothing. A name starting with `@` is an abstract socket, as in systemd's `sd_notify`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=value` assignments) to `$NOTIFY_SOCKET`.
/// Returns `Ok(false)` when the variable is unset or empty.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(path) if !path.is_empty() => {
            let path = path
                .into_string()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is not valid UTF-8"))?;
            send(&path, state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `state` to the socket named `path` (a file path, or `@name` for an abstract one).
pub fn send(path: &str, state: &str) -> io::Result<()> {
    let addr = socket_addr(path)?;
    let socket = UnixDatagram::unbound()?;
    let sent = socket.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write to NOTIFY_SOCKET"));
    }
    Ok(())
}

fn socket_addr(path: &str) -> io::Result<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if path.starts_with('/') {
        SocketAddr::from_pathname(path)
    } else {
        // systemd also knows `vsock:CID:PORT`, which only matters inside VMs.
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("unsupported NOTIFY_SOCKET {path:?}: expected an absolute path or @abstract name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("corecast-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send(path.to_str().unwrap(), "READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("corecast-sdnotify-test-{}", std::process::id());
        let receiver = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn relative_and_missing_sockets_are_errors() {
        assert_eq!(
            send("relative.sock", "READY=1").unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        assert!(send("/nonexistent/corecast/notify.sock", "READY=1").is_err());
    }
}
