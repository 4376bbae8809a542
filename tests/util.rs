//! Test harness: starts the real `corecast` binary on a free port and talks to it over
//! real sockets. Every wait has a generous deadline so a broken relay fails the test
//! instead of hanging it; no test asserts on timing.

pub mod http;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Deadline for anything the relay should do promptly.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn corecast() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corecast"))
}

/// Polls `done` every `every` until it holds; panics naming `what` past [`PATIENCE`].
pub fn wait_until(what: &str, every: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(every);
    }
}

/// Writes `json` to a fresh temporary file and returns its path.
pub fn temp_config(json: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("corecast-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("config-{n}.json"));
    std::fs::write(&path, json).unwrap();
    path
}

/// Lines the relay printed on stderr, collected by a thread.
#[derive(Default)]
pub struct Log {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    closed: Mutex<bool>,
}

impl Log {
    /// Collects the lines of `stderr` on a thread until it closes.
    pub fn collect(self: Arc<Self>, stderr: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                self.lines.lock().unwrap().push(line);
                self.changed.notify_all();
            }
            *self.closed.lock().unwrap() = true;
        });
    }

    /// Waits until a line contains `needle`; returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_within(needle, PATIENCE)
    }

    /// Waits up to `bound` until a line contains `needle`; returns it.
    pub fn wait_for_within(&self, needle: &str, bound: Duration) -> String {
        let deadline = Instant::now() + bound;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "relay did not log {needle:?} within {bound:?}; log:\n{}",
                lines.join("\n")
            );
            lines = self
                .changed
                .wait_timeout(lines, left.min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
    }

    /// Waits until the relay's stderr is closed (the process has exited).
    pub fn wait_closed(&self) {
        let deadline = Instant::now() + PATIENCE;
        while !*self.closed.lock().unwrap() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// Starts `cmd` with its stderr collected into a [`Log`], without waiting for anything.
pub fn spawn_logged(mut cmd: Command) -> (Child, Arc<Log>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start corecast");
    let log = Arc::new(Log::default());
    log.clone().collect(child.stderr.take().unwrap());
    (child, log)
}

/// Runs `cmd` to its end, bounded by [`PATIENCE`] (killed by PID past it, failing the
/// test): for commands that should exit by themselves, such as a refused start.
pub fn output_within_patience(mut cmd: Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start corecast");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "corecast did not exit by itself; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// A running relay, killed (by PID) when dropped.
pub struct Relay {
    child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Log>,
}

impl Relay {
    /// Starts the relay with `args` on a free loopback port at INFO level.
    pub fn start(args: &[&str]) -> Relay {
        let mut cmd = corecast();
        cmd.args(["--port", "0"]);
        if !args.contains(&"--log-level") {
            cmd.args(["--log-level", "info"]);
        }
        cmd.args(args);
        Relay::spawn(cmd)
    }

    /// Starts the relay with a config file holding `json`, plus `args`.
    pub fn with_config(json: &str, args: &[&str]) -> Relay {
        let path = temp_config(json);
        let mut full = vec!["--config", path.to_str().unwrap()];
        full.extend_from_slice(args);
        Relay::start(&full)
    }

    /// Starts the relay with `json` as its config, extra environment, and `args`.
    pub fn with_env(json: &str, env: &[(&str, &str)], args: &[&str]) -> Relay {
        let mut cmd = Relay::command(json, args);
        cmd.envs(env.iter().copied());
        Relay::spawn(cmd)
    }

    /// The command `with_env` runs, for tests that adjust it further before `spawn`.
    pub fn command(json: &str, args: &[&str]) -> Command {
        let path = temp_config(json);
        let mut cmd = corecast();
        cmd.args(["--port", "0", "--log-level", "info", "--config", path.to_str().unwrap()])
            .args(args);
        cmd
    }

    pub fn spawn(cmd: Command) -> Relay {
        Relay::spawn_within(cmd, PATIENCE)
    }

    /// [`Relay::spawn`] for a start that may take longer than [`PATIENCE`] (hundreds of
    /// shards on a busy machine): waits up to `bound` for it to listen.
    pub fn spawn_within(cmd: Command, bound: Duration) -> Relay {
        let (child, log) = spawn_logged(cmd);
        let line = log.wait_for_within("listening on ", bound);
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse the address from {line:?}"));
        Relay { child, addr, log }
    }

    /// Connects a client and waits until the relay has registered it, so that it will
    /// receive every line sent after this returns.
    pub fn connect(&self) -> Client {
        let client = Client::connect(self.addr);
        self.log.wait_for(&format!("client connected: {}", client.local_addr));
        client
    }

    pub fn connect_many(&self, n: usize) -> Vec<Client> {
        (0..n).map(|_| self.connect()).collect()
    }

    /// Connects from a chosen local address (`127.0.0.x:port`, port 0 for any) with an
    /// optional small receive buffer, and waits until the relay has registered it.
    pub fn connect_from(&self, local: SocketAddr, rcvbuf: Option<usize>) -> Client {
        let client = Client::from_stream(connect_socket(self.addr, local, rcvbuf).expect("connect"));
        self.log.wait_for(&format!("client connected: {}", client.local_addr));
        client
    }

    /// The admin endpoint's address, as the relay logged it (started with `--admin`).
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self.log.wait_for("admin listening on ");
        line.split("admin listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse the admin address from {line:?}"))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the relay (by PID).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits for the relay to exit by itself and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        wait_exit(&mut self.child, &self.log)
    }

    /// The relay's CPU time (user + system) so far, from /proc.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        // After the command name: state is field 3, utime 14, stime 15 (1-based).
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Counter `key` summed over the "shard N stopped: k=v ..." lines logged at shutdown.
    /// The sum over shards of `key` in their stop lines, which omit counters that are zero.
    pub fn final_counter(&self, key: &str) -> u64 {
        let text = self.log.text();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" stopped: accepted=")).collect();
        assert!(!lines.is_empty(), "no final stats in the log:\n{text}");
        lines
            .iter()
            .map(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client connection with a line reader.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
    pub local_addr: SocketAddr,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(TcpStream::connect(addr).expect("connect to relay"))
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let local_addr = stream.local_addr().unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client {
            stream,
            reader,
            local_addr,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to relay");
    }

    /// Sends each write at once instead of holding small ones back until the relay
    /// acknowledges the last (Nagle), for a test that paces its writes.
    pub fn nodelay(self) -> Client {
        self.stream.set_nodelay(true).expect("TCP_NODELAY");
        self
    }

    /// Shuts the connection down both ways: the relay sees the end of the stream.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The next line including its `\n`; panics on EOF or timeout.
    pub fn line(&mut self) -> Vec<u8> {
        self.try_line()
            .unwrap_or_else(|| panic!("{} got EOF instead of a line", self.local_addr))
    }

    /// The next line, or `None` at EOF. Panics on timeout.
    pub fn try_line(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => Some(buf),
            Err(e) => panic!(
                "{} timed out waiting for a line ({e}); partial {buf:?}",
                self.local_addr
            ),
        }
    }

    pub fn line_str(&mut self) -> String {
        String::from_utf8(self.line()).expect("relay sent invalid UTF-8")
    }

    /// Reads until EOF; returns everything that arrived first.
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).expect("read until EOF");
        rest
    }

    /// The exact envelope bytes the relay sends for `content` from this client.
    pub fn envelope(&self, content: &str) -> String {
        envelope(content, self.local_addr)
    }
}

/// A client socket bound to `local`, with `rcvbuf` set before connecting (so the window
/// the relay sees is small from the start).
pub fn connect_socket(to: SocketAddr, local: SocketAddr, rcvbuf: Option<usize>) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(&local.into())?;
    socket.connect(&to.into())?;
    Ok(socket.into())
}

/// The envelope for `content` from `from`, built with serde_json (independent of the
/// relay's own encoder).
pub fn envelope(content: &str, from: SocketAddr) -> String {
    format!(
        "{{\"content\":{},\"remote_addr\":\"{from}\"}}\n",
        serde_json::to_string(content).unwrap()
    )
}

/// Waits for a relay process to exit by itself (its log read to the end) and returns its
/// exit code; fails the test, with the log, after [`PATIENCE`].
pub fn wait_exit(child: &mut Child, log: &Log) -> Option<i32> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait for corecast") {
            log.wait_closed();
            return status.code();
        }
        assert!(Instant::now() < deadline, "relay did not exit; log:\n{}", log.text());
        std::thread::sleep(Duration::from_millis(20));
    }
}
