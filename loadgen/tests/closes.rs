//! How the generator reports the server closing its receivers, against a scripted server
//! (no relay): the server warns and closes a healthy receiver, resets one stuck receiver
//! and closes another behind data it never read. The generator must count each, record
//! the notice text and say when each close reached it, or that it found it only after
//! the stop.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

/// When the server acts, after the last client connected: well inside the 3 s run.
const ACT_AFTER: Duration = Duration::from_millis(600);

/// Accepts `clients` connections in order (the generator connects them one by one), then
/// acts on each as `script` says; keeps every socket until the thread ends.
fn scripted_server(clients: usize) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..clients).map(|_| listener.accept().unwrap().0).collect();
        std::thread::sleep(ACT_AFTER);
        // Client 0 (healthy): a notice, then a close.
        conns[0].write_all(b"Warning: test notice, closing.\n").unwrap();
        conns[0].shutdown(std::net::Shutdown::Write).unwrap();
        // Client 1 (stuck): as much as the socket takes, then a plain close, whose FIN
        // waits behind the data the client never reads.
        let stuck = &mut conns[1];
        stuck.set_nonblocking(true).unwrap();
        // Envelopes without a payload header: read, but not deliveries and not notices.
        let envelope = format!(
            "{{\"content\":\"{}\",\"remote_addr\":\"127.0.0.1:1\"}}\n",
            "x".repeat(1000)
        );
        let filler = envelope.repeat(64);
        while stuck.write(filler.as_bytes()).is_ok() {}
        drop(conns.remove(1));
        // Former client 2 (stuck): a reset, which reaches it at once.
        let reset = conns.remove(1);
        socket2::SockRef::from(&reset).set_linger(Some(Duration::ZERO)).unwrap();
        drop(reset);
        // Hold client 0's socket until the run is over.
        std::thread::sleep(Duration::from_secs(5));
    });
    (port, handle)
}

#[test]
fn closes_are_counted_per_class_with_the_notice_and_when_they_arrived() {
    let (port, server) = scripted_server(3);
    let json = std::env::temp_dir().join(format!("corecast-loadgen-closes-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_corecast-loadgen"))
        .args(["--target", &format!("127.0.0.1:{port}"), "--no-progress", "--json"])
        .arg(&json)
        // No publishers: nothing to synchronise, the server's script is all the traffic.
        .args(["--clients", "3", "--publishers", "0", "--stuck-readers", "2"])
        .args(["--duration", "3", "--warmup", "0", "--drain", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let class = |name: &str| {
        r["classes"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["class"] == name))
            .unwrap_or_else(|| panic!("no {name} class in {r:#}"))
            .clone()
    };

    let healthy = class("healthy");
    assert_eq!(healthy["disconnected"], 1, "{r:#}");
    assert_eq!(healthy["closed_by_server"], 1, "{r:#}");
    assert_eq!(healthy["warned"], 1, "{r:#}");
    assert_eq!(healthy["notices"][0], "Warning: test notice, closing.", "{r:#}");
    assert_eq!(r["readers_disconnected"], 1, "{r:#}");
    assert_eq!(r["closed_no_reader"], false, "{r:#}");

    let stuck = class("stuck");
    assert_eq!(stuck["receivers"], 2, "{r:#}");
    assert_eq!(stuck["closed_by_server"], 2, "{r:#}");
    // The reset arrived during the run; the FIN only once the data before it was read.
    assert_eq!(stuck["closed_seen_at_end"], 1, "{r:#}");
    let at = stuck["closed_after_ms"].as_array().unwrap();
    assert_eq!(at.len(), 1, "{r:#}");
    let ms = at[0].as_f64().unwrap();
    assert!(ms > 0.0 && ms < 3000.0, "reset seen {ms} ms after the start: {r:#}");
    server.join().unwrap();
}
