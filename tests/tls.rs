//! TLS on the second listener (docs/protocol.md#tls): real Python `ssl` clients against the
//! relay binary, beside plain TCP clients in the same broadcast domain. Certificates are
//! made at test time (rcgen) in a temporary directory; nothing secret is committed.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use corecast::protocol;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use crate::util::{corecast, envelope, output_within_patience, Relay, PATIENCE};

/// Test PKI in its own directory: a CA, a server certificate for `localhost` signed by it,
/// a client certificate signed by it, and a key that matches neither.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("corecast-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "corecast test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |name: &str, purpose: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![purpose];
            (params.signed_by(&key, &ca, &ca_key).unwrap(), key)
        };
        let (server, server_key) = leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let (client, client_key) = leaf("agent", ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("ca.pem", ca.pem());
        write("server.pem", server.pem());
        write("server.key", server_key.serialize_pem());
        write("client.pem", client.pem());
        write("client.key", client_key.serialize_pem());
        write("other.key", KeyPair::generate().unwrap().serialize_pem());
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    /// The `tls` section for this PKI, `extra` appended inside it.
    fn section(&self, extra: &str) -> String {
        format!(
            r#""tls":{{"listen":"127.0.0.1:0","cert_file":"{}","key_file":"{}"{extra}}}"#,
            self.path("server.pem"),
            self.path("server.key")
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the relay with `hyper` as its `hyper_parameters` (no rate limit unless given),
/// one shard; returns it with its TLS address.
fn start_relay(hyper: &str) -> (Relay, SocketAddr) {
    start_relay_with(hyper, &[])
}

fn start_relay_with(hyper: &str, args: &[&str]) -> (Relay, SocketAddr) {
    let mut all = vec!["--shards", "1"];
    all.extend_from_slice(args);
    let relay = Relay::with_config(
        &format!(r#"{{"hyper_parameters":{{"rate_limit_msgs_per_minute":null,{hyper}}}}}"#),
        &all,
    );
    let addr = tls_addr(&relay);
    (relay, addr)
}

/// The TLS listener's address, from the relay's log.
fn tls_addr(relay: &Relay) -> SocketAddr {
    let line = relay.log.wait_for("listening for TLS on ");
    line.split("listening for TLS on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the TLS address from {line:?}"))
}

/// A Python `ssl` client driven over its stdin: `send HEX`, `line` (prints the next line
/// as hex, empty at EOF), `eof PATH` (writes everything until EOF to PATH).
const PY_CLIENT: &str = r#"
import socket, ssl, sys
port, ca, cert, key, rcvbuf, version = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
if cert != "-":
    ctx.load_cert_chain(cert, key)
if version == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
raw = socket.socket()
if rcvbuf != "0":
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(rcvbuf))
raw.connect(("127.0.0.1", int(port)))
local = "%s:%d" % raw.getsockname()
try:
    s = ctx.wrap_socket(raw, server_hostname="localhost")
except Exception as e:
    print("handshake-error", type(e).__name__, flush=True)
    sys.exit(0)
print("ok", local, s.version(), flush=True)
f = s.makefile("rb")
for cmd in sys.stdin:
    op, _, arg = cmd.rstrip("\n").partition(" ")
    try:
        if op == "send":
            s.sendall(bytes.fromhex(arg))
            print("sent", flush=True)
        elif op == "line":
            print("line", f.readline().hex(), flush=True)
        elif op == "eof":
            data = f.read()
            open(arg, "wb").write(data)
            print("eof", len(data), flush=True)
    except Exception as e:
        print("error", type(e).__name__, flush=True)
"#;

/// One Python TLS client (killed by PID when dropped).
struct PyClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// "ok ADDR VERSION" or "handshake-error KIND".
    status: String,
}

#[derive(Default)]
struct PyOptions<'a> {
    cert: Option<(&'a str, &'a str)>,
    rcvbuf: usize,
    tls12: bool,
}

impl PyClient {
    fn connect(addr: SocketAddr, pki: &Pki, options: PyOptions) -> PyClient {
        let (cert, key) = options
            .cert
            .map_or(("-".to_string(), "-".to_string()), |(c, k)| (pki.path(c), pki.path(k)));
        let mut child = Command::new("python3")
            .args([
                "-c",
                PY_CLIENT,
                &addr.port().to_string(),
                &pki.path("ca.pem"),
                &cert,
                &key,
            ])
            .arg(options.rcvbuf.to_string())
            .arg(if options.tls12 { "1.2" } else { "any" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut client = PyClient {
            child,
            stdin,
            stdout,
            status: String::new(),
        };
        client.status = client.reply();
        client
    }

    /// The client's address, once its handshake succeeded.
    fn local_addr(&self) -> SocketAddr {
        assert!(self.status.starts_with("ok "), "handshake failed: {}", self.status);
        self.status.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the Python client exited");
        line.trim_end().to_string()
    }

    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.reply()
    }

    fn send(&mut self, bytes: &[u8]) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(self.command(&format!("send {hex}")), "sent");
    }

    /// The next line; `Err` with the reply when the connection failed or ended instead.
    fn line(&mut self) -> Result<Vec<u8>, String> {
        let reply = self.command("line");
        match reply.strip_prefix("line ") {
            Some(hex) if !hex.is_empty() => Ok((0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect()),
            _ => Err(reply),
        }
    }

    /// Everything until the relay closes.
    fn until_eof(&mut self, scratch: &Path) -> Vec<u8> {
        let reply = self.command(&format!("eof {}", scratch.display()));
        assert!(reply.starts_with("eof "), "{reply}");
        std::fs::read(scratch).unwrap()
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects a TLS client and waits until the relay has registered it.
fn tls_client(relay: &Relay, addr: SocketAddr, pki: &Pki, options: PyOptions) -> PyClient {
    let client = PyClient::connect(addr, pki, options);
    relay
        .log
        .wait_for(&format!("client connected: {}", client.local_addr()));
    client
}

#[test]
fn a_python_tls_client_relays_byte_exact_to_a_plain_client_and_back() {
    let pki = Pki::new();
    let (relay, tls_addr) = start_relay(&pki.section(""));
    for tls12 in [false, true] {
        let mut py = tls_client(
            &relay,
            tls_addr,
            &pki,
            PyOptions {
                tls12,
                ..Default::default()
            },
        );
        assert!(
            py.status.ends_with(if tls12 { "TLSv1.2" } else { "TLSv1.3" }),
            "{}",
            py.status
        );
        let mut plain = relay.connect();
        // Short, non-ASCII, and longer than several TLS records.
        let long = "x".repeat(100_000);
        for content in ["hello over tls", "héllo ✓ \"quoted\"", long.as_str()] {
            plain.send(format!("{content}\n").as_bytes());
            assert_eq!(
                py.line().unwrap(),
                envelope(content, plain.local_addr).into_bytes(),
                "tls12={tls12}"
            );
        }
        for content in ["back from tls", long.as_str()] {
            py.send(format!("{content}\n").as_bytes());
            assert_eq!(plain.line_str(), envelope(content, py.local_addr()));
        }
    }
}

#[test]
fn a_client_without_a_certificate_is_refused_under_mtls() {
    let pki = Pki::new();
    let (relay, tls_addr) = start_relay(&pki.section(&format!(r#","client_ca_file":"{}""#, pki.path("ca.pem"))));
    let mut with_cert = tls_client(
        &relay,
        tls_addr,
        &pki,
        PyOptions {
            cert: Some(("client.pem", "client.key")),
            ..Default::default()
        },
    );
    // TLS 1.3 lets the client finish before the server has checked its certificate: the
    // refusal shows on its first read. Either way it is never registered.
    let mut without = PyClient::connect(tls_addr, &pki, PyOptions::default());
    relay.log.wait_for("TLS handshake with");
    let mut plain = relay.connect();
    plain.send(b"for members only\n");
    assert_eq!(
        with_cert.line().unwrap(),
        envelope("for members only", plain.local_addr).into_bytes()
    );
    if without.status.starts_with("ok ") {
        let refused = without.line();
        assert!(refused.is_err(), "a client without a certificate got {refused:?}");
    }
    assert_eq!(relay.log.count("client connected"), 2, "{}", relay.log.text());
    // A certificate of the right CA that is not issued for clients is refused the same way.
    let mut wrong = PyClient::connect(
        tls_addr,
        &pki,
        PyOptions {
            cert: Some(("server.pem", "server.key")),
            ..Default::default()
        },
    );
    if wrong.status.starts_with("ok ") {
        assert!(wrong.line().is_err());
    }
    assert_eq!(relay.log.count("client connected"), 2, "{}", relay.log.text());
}

#[test]
fn check_refuses_bad_tls_files_with_78_naming_the_key() {
    let pki = Pki::new();
    std::fs::write(pki.dir.join("garbage.pem"), "not a certificate\n").unwrap();
    let cases = [
        (
            format!(
                r#""tls":{{"listen":"127.0.0.1:0","cert_file":"{}","key_file":"{}"}}"#,
                pki.path("missing.pem"),
                pki.path("server.key")
            ),
            "hyper_parameters.tls.cert_file",
        ),
        (
            format!(
                r#""tls":{{"listen":"127.0.0.1:0","cert_file":"{}","key_file":"{}"}}"#,
                pki.path("server.pem"),
                pki.path("other.key")
            ),
            "hyper_parameters.tls.key_file",
        ),
        (
            pki.section(&format!(r#","client_ca_file":"{}""#, pki.path("garbage.pem"))),
            "hyper_parameters.tls.client_ca_file",
        ),
        (
            pki.section(&format!(r#","client_ca_file":"{}""#, pki.path("missing.pem"))),
            "hyper_parameters.tls.client_ca_file",
        ),
        (
            pki.section(r#","max_handshakes":0"#),
            "hyper_parameters.tls.max_handshakes",
        ),
    ];
    for (section, key) in cases {
        let path = crate::util::temp_config(&format!(r#"{{"hyper_parameters":{{{section}}}}}"#));
        let mut cmd = corecast();
        cmd.args(["check", "--config", path.to_str().unwrap()]);
        let out = output_within_patience(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{key}: {stderr}");
        assert!(stderr.contains(&format!("config error: {key}: ")), "{key}: {stderr}");
    }
    // The good files pass, and the section is printed back.
    let path = crate::util::temp_config(&format!(r#"{{"hyper_parameters":{{{}}}}}"#, pki.section("")));
    let mut cmd = corecast();
    cmd.args(["check", "--config", path.to_str().unwrap()]);
    let out = output_within_patience(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["hyper_parameters"]["tls"]["max_handshakes"], 64);
    assert_eq!(printed["hyper_parameters"]["tls"]["handshake_timeout_ms"], 10000);
}

#[test]
fn sigterm_flushes_a_lagging_tls_client_then_sends_the_notice_over_tls() {
    const LINES: usize = 3000;
    let pki = Pki::new();
    let (mut relay, tls_addr) = start_relay(&format!(
        r#""backpressure_policy":{{"enable_disconnect":false}},{}"#,
        pki.section("")
    ));
    // Reads nothing until the end: the relay's writes to it stall and queue.
    let mut lagging = tls_client(
        &relay,
        tls_addr,
        &pki,
        PyOptions {
            rcvbuf: 4096,
            ..Default::default()
        },
    );
    let mut watcher = relay.connect();
    let mut sender = relay.connect();
    let payload = "q".repeat(100);
    let burst: String = (0..LINES).map(|i| format!("{payload}{i}\n")).collect();
    sender.send(burst.as_bytes());
    for i in 0..LINES {
        assert_eq!(watcher.line_str(), sender.envelope(&format!("{payload}{i}")));
    }
    relay.signal(libc::SIGTERM);
    let scratch = pki.dir.join("received");
    let received = lagging.until_eof(&scratch);
    let mut expected: String = (0..LINES).map(|i| sender.envelope(&format!("{payload}{i}"))).collect();
    expected.push_str(protocol::NOTICE_SHUTDOWN);
    assert_eq!(String::from_utf8(received).unwrap(), expected);
    assert_eq!(relay.wait_exit(), Some(0));
    assert_eq!(relay.final_counter("closed.shutdown"), 3);
    assert_eq!(relay.final_counter("envelopes_out"), 2 * LINES as u64);
}

#[test]
fn handshakes_are_bounded_per_shard_and_in_time() {
    let pki = Pki::new();
    let (relay, tls_addr) = start_relay_with(
        &pki.section(r#","max_handshakes":2,"handshake_timeout_ms":600000"#),
        &["--log-level", "debug"],
    );
    // Two connections that never start their handshake take both slots.
    let silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(tls_addr).unwrap()).collect();
    let refused = PyClient::connect(tls_addr, &pki, PyOptions::default());
    assert!(refused.status.starts_with("handshake-error"), "{}", refused.status);
    relay.log.wait_for("too many TLS handshakes in progress");
    // Plain TCP is not held up meanwhile.
    let mut a = relay.connect();
    let mut b = relay.connect();
    a.send(b"still relaying\n");
    assert_eq!(b.line_str(), a.envelope("still relaying"));
    // A handshake slot comes back when its peer goes away.
    drop(silent);
    crate::util::wait_until("a free handshake slot", Duration::from_millis(50), || {
        PyClient::connect(tls_addr, &pki, PyOptions::default())
            .status
            .starts_with("ok ")
    });

    // A handshake that does not finish in time is closed.
    let pki = Pki::new();
    let (_relay, tls_addr) = start_relay(&pki.section(r#","handshake_timeout_ms":200"#));
    let mut stalled = TcpStream::connect(tls_addr).unwrap();
    stalled.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut stalled, &mut rest);
    assert!(read.is_ok() && rest.is_empty(), "{read:?} {rest:?}");
}

#[test]
fn a_tls_client_that_stops_reading_is_closed_as_a_slow_consumer() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let pki = Pki::new();
    let (relay, tls_addr) = start_relay(&format!(
        r#""write_deadline_ms":500,"quarantine_cooldown_secs":0,{}"#,
        pki.section("")
    ));
    let stuck = tls_client(
        &relay,
        tls_addr,
        &pki,
        PyOptions {
            rcvbuf: 4096,
            ..Default::default()
        },
    );
    let mut watcher = relay.connect();
    let mut sender = relay.connect();
    // Steady traffic, more than the kernel's buffers hold, until the relay closes it.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = sender.stream.try_clone().unwrap();
    let sending = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let chunk: String = (0..100).map(|i| format!("{}{i}\n", "s".repeat(190))).collect();
            while !stop.load(Ordering::Relaxed) {
                if writer.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let draining = std::thread::spawn(move || while watcher.try_line().is_some() {});
    relay
        .log
        .wait_for(&format!("client disconnected: {} (slow_consumer)", stuck.local_addr()));
    stop.store(true, Ordering::Relaxed);
    sending.join().unwrap();
    // Relaying goes on: a line sent now arrives (after what the sender had sent before).
    let mut late = relay.connect();
    sender.send(b"after\n");
    let after = sender.envelope("after");
    while late.line_str() != after {}
    sender.shutdown();
    drop(draining);
}

#[test]
fn sighup_reads_the_certificate_files_again_for_new_handshakes_and_keeps_established_sessions() {
    let (first, second) = (Pki::new(), Pki::new());
    // The files the relay serves, overwritten in place as certificate rotation does.
    let live = Pki::new();
    let copy = |from: &Pki| {
        for name in ["server.pem", "server.key"] {
            std::fs::copy(from.path(name), live.path(name)).unwrap();
        }
    };
    copy(&first);
    let json = format!(
        r#"{{"hyper_parameters":{{"rate_limit_msgs_per_minute":null,{}}}}}"#,
        live.section("")
    );
    let path = crate::util::temp_config(&json);
    let relay = Relay::start(&["--shards", "1", "--config", path.to_str().unwrap()]);
    let addr = tls_addr(&relay);
    let mut before = PyClient::connect(addr, &first, PyOptions::default());
    before.local_addr();
    copy(&second);
    relay.signal(libc::SIGHUP);
    relay.log.wait_for("SIGHUP: config reloaded");
    // New handshakes get the new certificate: a client trusting only the old CA fails.
    let old_ca = PyClient::connect(addr, &first, PyOptions::default());
    assert!(old_ca.status.starts_with("handshake-error"), "{}", old_ca.status);
    let mut after = PyClient::connect(addr, &second, PyOptions::default());
    let from = after.local_addr();
    after.send(b"rotated\n");
    // The session made before the reload is still served.
    assert_eq!(before.line().unwrap(), envelope("rotated", from).into_bytes());
}

/// A Python `ssl` client over memory BIOs: handshakes, then in one write sends a line, its
/// close_notify and 8000 more bytes, the way a peer that ignores RFC 8446 §6.1 (or an
/// attacker) may; prints `ok ADDR` after the handshake and `sent` after the write, then
/// holds the socket open until its stdin closes.
const PY_CLOSE_NOTIFY_THEN_MORE: &str = r#"
import socket, ssl, sys
port, ca = sys.argv[1:3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
raw = socket.create_connection(("127.0.0.1", int(port)))
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        raw.sendall(outgoing.read())
        data = raw.recv(65536)
        if not data:
            sys.exit("closed during the handshake")
        incoming.write(data)
raw.sendall(outgoing.read())
print("ok %s:%d" % raw.getsockname(), flush=True)
tls.write(b"before the close\n")
try:
    tls.unwrap()
except ssl.SSLWantReadError:
    pass
raw.sendall(outgoing.read() + b"\0" * 8000)
print("sent", flush=True)
sys.stdin.read()
"#;

#[test]
fn bytes_after_a_close_notify_end_the_tls_client_and_the_shard_goes_on() {
    let pki = Pki::new();
    let (relay, tls_addr) = start_relay(&pki.section(""));
    let mut plain = relay.connect();
    let mut other = relay.connect();
    let mut child = python_script(PY_CLOSE_NOTIFY_THEN_MORE, tls_addr, &pki);
    let _stdin = child.stdin.take();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut reply = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    };
    let status = reply();
    let local: SocketAddr = status
        .strip_prefix("ok ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("handshake failed: {status:?}"));
    assert_eq!(reply(), "sent");
    // The line before the close_notify is relayed, the rest ignored and the client closed
    // as having closed; the shard (the only one) still relays (it used to spin for ever).
    assert_eq!(plain.line_str(), envelope("before the close", local));
    relay
        .log
        .wait_for(&format!("client disconnected: {local} (peer_closed)"));
    other.send(b"still relaying\n");
    assert_eq!(plain.line_str(), other.envelope("still relaying"));
    let _ = child.kill();
    let _ = child.wait();
}

/// A Python `ssl` client that connects, prints `connected ADDR`, and starts its handshake
/// only when told (a line on stdin); then prints `read N` with what one read got (0 at
/// the end of the stream) or `error KIND`, within 10 s.
const PY_LATE_HANDSHAKE: &str = r#"
import socket, ssl, sys
port, ca = sys.argv[1:3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
raw = socket.create_connection(("127.0.0.1", int(port)))
raw.settimeout(10)
print("connected %s:%d" % raw.getsockname(), flush=True)
sys.stdin.readline()
try:
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    print("read", len(s.recv(100)), flush=True)
except Exception as e:
    print("error", type(e).__name__, flush=True)
"#;

#[test]
fn a_client_denied_by_a_reload_during_its_handshake_is_closed_after_it() {
    let pki = Pki::new();
    let config = |deny: &str| {
        format!(
            r#"{{"logger":{{"log_level":"info"}},"hyper_parameters":{{"deny":[{deny}],{}}}}}"#,
            pki.section("")
        )
    };
    let path = crate::util::temp_config(&config(""));
    let mut cmd = corecast();
    cmd.args(["--port", "0", "--shards", "1", "--config", path.to_str().unwrap()]);
    let relay = Relay::spawn(cmd);
    let mut child = python_script(PY_LATE_HANDSHAKE, tls_addr(&relay), &pki);
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut reply = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    };
    assert!(reply().starts_with("connected "));
    // Admitted at accept; the handshake waits. The reload denies the client's network.
    std::fs::write(&path, config(r#""127.0.0.0/8""#)).unwrap();
    relay.signal(libc::SIGHUP);
    relay.log.wait_for("config reloaded; applied hyper_parameters.deny");
    // The shard has taken the lists up once a new plain client is closed at accept.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the reloaded deny list never applied"
        );
        let probe = TcpStream::connect(relay.addr).unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if matches!(std::io::Read::read(&mut &probe, &mut [0u8; 16]), Ok(0)) {
            break;
        }
    }
    writeln!(stdin, "go").unwrap();
    stdin.flush().unwrap();
    let outcome = reply();
    assert!(
        outcome == "read 0" || (outcome.starts_with("error ") && !outcome.contains("imeout")),
        "the denied client was served: {outcome}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A Python `ssl` script run as `python3 -c SCRIPT PORT CA_FILE` against the TLS listener
/// at `tls_addr`, with its standard input and output piped to the test.
fn python_script(script: &str, tls_addr: SocketAddr, pki: &Pki) -> Child {
    Command::new("python3")
        .args(["-c", script, &tls_addr.port().to_string(), &pki.path("ca.pem")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}
