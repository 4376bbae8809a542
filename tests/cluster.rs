//! The cluster (issue 16): three corecast nodes on a three-server NATS cluster on loopback
//! relay as one broadcast domain, byte-exact and in order, and survive the death of a NATS
//! server, of a node, and of the whole NATS cluster.
//!
//! These need `nats-server` (the Debian package). Without it they pass with a message,
//! unless `CORECAST_REQUIRE_NATS` is set (as in CI), where they fail instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{corecast, envelope, temp_config, Client, Relay, PATIENCE};

/// Where `nats-server` is, or `None` (after saying why) if the tests should skip.
fn nats_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CORECAST_REQUIRE_NATS").is_none(),
            "nats-server is not installed but CORECAST_REQUIRE_NATS is set (apt-get install nats-server)"
        );
        eprintln!("skipping the cluster tests: nats-server is not installed (apt-get install nats-server)");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One nats-server process, killed (by PID) when dropped.
struct NatsServer {
    child: Option<Child>,
    client_port: u16,
}

impl NatsServer {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A NATS cluster of `n` servers on loopback, fully routed, each with a monitoring port
/// that tells when its routes are up. Ports are picked free and then bound by nats-server,
/// so another test's socket can take one in between: a cluster whose server exits or whose
/// routes do not form is started again on other ports (a few times at most).
fn nats_cluster(bin: &PathBuf, n: usize) -> Vec<NatsServer> {
    for _ in 0..3 {
        if let Some(servers) = try_nats_cluster(bin, n) {
            return servers;
        }
    }
    panic!("could not start a NATS cluster of {n} servers on loopback");
}

fn try_nats_cluster(bin: &PathBuf, n: usize) -> Option<Vec<NatsServer>> {
    let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (free_port(), free_port(), free_port())).collect();
    let mut servers = Vec::new();
    for (i, &(client, route, monitor)) in ports.iter().enumerate() {
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{}", p.1))
            .collect();
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &client.to_string(), "-m", &monitor.to_string()])
            .args(["--cluster_name", "corecast-test", "--server_name", &format!("s{i}")])
            .args(["--cluster", &format!("nats://127.0.0.1:{route}")])
            .args(["--routes", &routes.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        servers.push(NatsServer {
            child: Some(child),
            client_port: client,
        });
    }
    let deadline = Instant::now() + PATIENCE / 2;
    for (i, &(_, _, monitor)) in ports.iter().enumerate() {
        loop {
            let routes = http_get(SocketAddr::from(([127, 0, 0, 1], monitor)), "/routez")
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|v| v["num_routes"].as_u64());
            if routes == Some(n as u64 - 1) {
                break;
            }
            let exited = servers[i]
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                eprintln!("nats-server {i} exited or its routes did not form; starting the cluster again");
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Some(servers)
}

/// A plain HTTP/1.1 GET; `(status, body)`.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

/// A corecast node of the cluster with its admin endpoint.
struct Node {
    relay: Relay,
    admin: SocketAddr,
}

impl Node {
    /// Starts a node on `subject` that lists `urls` (its own server first).
    fn start(urls: &[String], subject: &str) -> Node {
        Node::start_with_env(urls, subject, &[])
    }

    /// [`Node::start`] with extra environment (the debug builds' test hooks).
    fn start_with_env(urls: &[String], subject: &str, env: &[(&str, &str)]) -> Node {
        let config = serde_json::json!({
            "hyper_parameters": {
                "rate_limit_msgs_per_minute": null,
                "cluster": { "nats": urls, "subject": subject },
            }
        });
        let relay = Relay::with_env(&config.to_string(), env, &["--shards", "2", "--admin", "127.0.0.1:0"]);
        let line = relay.log.wait_for("admin listening on ");
        let admin = line
            .split("admin listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in {line:?}"));
        Node { relay, admin }
    }

    /// `corecast_cluster_<name>` from `/metrics`; `name` may end in labels
    /// (`dropped_envelopes{reason="disconnected"}`).
    fn metric(&self, name: &str) -> u64 {
        let (status, body) = http_get(self.admin, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200);
        let (base, labels) = name.split_at(name.find('{').unwrap_or(name.len()));
        let full = format!("corecast_cluster_{name}");
        let counter = format!("corecast_cluster_{base}_total{labels}");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (key, value) = l.split_once(' ')?;
                (key == full || key == counter).then(|| value.trim().parse::<f64>().ok())?
            })
            .unwrap_or_else(|| panic!("no {full} in /metrics:\n{body}")) as u64
    }

    fn healthz(&self) -> (u16, String) {
        http_get(self.admin, "/healthz").expect("GET /healthz")
    }

    fn connect(&self) -> Client {
        self.relay.connect()
    }
}

/// Starts three NATS servers and three nodes, node `i` on server `i` with the others as
/// fail-overs, and waits until every node hears every other.
fn three_nodes(bin: &PathBuf, subject: &str) -> (Vec<NatsServer>, Vec<Node>) {
    let servers = nats_cluster(bin, 3);
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let mut mine = urls.clone();
            mine.rotate_left(i);
            Node::start(&mine, subject)
        })
        .collect();
    warm_up(&nodes);
    (servers, nodes)
}

/// Sends probe lines from each node until every other node relays one: then every uplink
/// is connected and every subscription has reached every server. Probes are lines whose
/// content starts with `probe`; the tests' readers skip any that arrive late.
fn warm_up(nodes: &[Node]) {
    let mut probes: Vec<Client> = nodes.iter().map(Node::connect).collect();
    let mut readers: Vec<(BufReader<TcpStream>, Vec<u8>)> = probes
        .iter()
        .map(|c| {
            c.stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            (BufReader::new(c.stream.try_clone().unwrap()), Vec::new())
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    let n = nodes.len();
    let mut heard = vec![vec![false; n]; n];
    let all_heard = |h: &Vec<Vec<bool>>| (0..n).all(|to| (0..n).all(|from| from == to || h[to][from]));
    let mut round = 0;
    while !all_heard(&heard) {
        assert!(
            Instant::now() < deadline,
            "the nodes did not hear each other: {heard:?}"
        );
        round += 1;
        for (i, c) in probes.iter_mut().enumerate() {
            c.send(format!("probe {i} {round}\n").as_bytes());
        }
        let wait_until = Instant::now() + Duration::from_millis(200);
        for (to, (reader, buf)) in readers.iter_mut().enumerate() {
            while Instant::now() < wait_until {
                match reader.read_until(b'\n', buf) {
                    Ok(0) => panic!("node {to} closed a probe client"),
                    Ok(_) if buf.ends_with(b"\n") => {
                        let text = String::from_utf8_lossy(buf).to_string();
                        buf.clear();
                        let from = text.split("probe ").nth(1).and_then(|r| r.split(' ').next());
                        if let Some(from) = from.and_then(|f| f.parse::<usize>().ok()) {
                            heard[to][from] = true;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}

/// The content of each line a client sends: `<sender> <seq>`, padded.
fn content(sender: usize, seq: u64) -> String {
    format!("s{sender} {seq} {}", "x".repeat((seq % 13) as usize * 7))
}

/// Parses `s<sender> <seq> …` out of an envelope's content.
fn parse_content(line: &[u8]) -> Option<(usize, u64, String)> {
    let env: serde_json::Value = serde_json::from_slice(line).ok()?;
    let content = env["content"].as_str()?;
    let mut parts = content.split(' ');
    let sender = parts.next()?.strip_prefix('s')?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((sender, seq, env["remote_addr"].as_str()?.to_string()))
}

#[test]
fn three_nodes_relay_every_line_to_every_other_client_byte_exact_and_in_order() {
    let Some(bin) = nats_server() else { return };
    let (_servers, nodes) = three_nodes(&bin, "corecast.t.exact");
    // Two clients on each node, all of them senders and receivers.
    let mut clients: Vec<(usize, Client)> = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for _ in 0..2 {
            clients.push((n, node.connect()));
        }
    }
    let addrs: Vec<SocketAddr> = clients.iter().map(|(_, c)| c.local_addr).collect();
    const LINES: u64 = 300;
    // Readers first, one thread each, so that nobody's socket buffer fills.
    let readers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(me, (_, c))| {
            let mut reader = Client::from_stream(c.stream.try_clone().unwrap());
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let want = (addrs.len() as u64 - 1) * LINES;
                let mut got: Vec<Vec<u8>> = Vec::new();
                while (got.len() as u64) < want {
                    let line = reader.line();
                    if !String::from_utf8_lossy(&line).contains("\"probe ") {
                        got.push(line);
                    }
                }
                (me, got)
            })
        })
        .collect();
    // Each sender writes its lines in chunks, interleaved with the others.
    for chunk in 0..(LINES / 50) {
        for (i, (_, c)) in clients.iter_mut().enumerate() {
            let text: String = (chunk * 50..(chunk + 1) * 50)
                .map(|s| format!("{}\n", content(i, s)))
                .collect();
            c.send(text.as_bytes());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for handle in readers {
        let (me, got) = handle.join().expect("a reader failed");
        let mut next = vec![0u64; addrs.len()];
        for line in &got {
            let (sender, seq, from) = parse_content(line).unwrap_or_else(|| panic!("not an envelope: {line:?}"));
            assert_ne!(sender, me, "client {me} got its own line back");
            assert_eq!(
                seq, next[sender],
                "client {me}: sender {sender}'s lines out of order or duplicated"
            );
            next[sender] += 1;
            assert_eq!(from, addrs[sender].to_string(), "remote_addr is the original sender's");
            assert_eq!(
                String::from_utf8_lossy(line),
                envelope(&content(sender, seq), addrs[sender]),
                "envelopes are byte-identical across nodes"
            );
        }
        for (sender, &n) in next.iter().enumerate() {
            assert_eq!(n, if sender == me { 0 } else { LINES }, "client {me} from {sender}");
        }
    }
    for node in &nodes {
        assert_eq!(node.metric("connected"), 1);
        assert_eq!(node.metric("gaps"), 0);
        assert_eq!(node.metric("stale_messages"), 0);
        assert_eq!(node.metric("nodes_heard"), 2);
        assert!(node.metric("received_envelopes") >= 4 * LINES);
        let (status, body) = node.healthz();
        assert_eq!(status, 200);
        assert!(body.contains("cluster: connected"), "{body}");
    }
    // SIGTERM drains a clustered node as any other: the uplink lets go of the shards.
    for mut node in nodes {
        node.relay.signal(libc::SIGTERM);
        assert_eq!(node.relay.wait_exit(), Some(0));
    }
}

/// A sender thread: `content(id, seq)` lines every `every`, until `stop`; returns when each
/// was sent, and the client: closing it with unread data would reset the connection and
/// discard lines the relay has not read yet.
fn paced_sender(
    mut client: Client,
    id: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<(Vec<Instant>, Client)> {
    std::thread::spawn(move || {
        let mut times = Vec::new();
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            client.send(format!("{}\n", content(id, seq)).as_bytes());
            times.push(Instant::now());
            seq += 1;
            sent.store(seq, Ordering::Relaxed);
            std::thread::sleep(every);
        }
        (times, client)
    })
}

/// A reader thread: every relayed line's (sender, seq) and arrival time, until `stop`.
fn collecting_reader(client: &Client, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(usize, u64, Instant)>> {
    let stream = client.stream.try_clone().unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stream);
        let mut got = Vec::new();
        let mut buf = Vec::new();
        loop {
            match std::io::BufRead::read_until(&mut reader, b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) if buf.ends_with(b"\n") => {
                    if let Some((s, q, _)) = parse_content(&buf) {
                        got.push((s, q, Instant::now()));
                    }
                    buf.clear();
                }
                Ok(_) => {}
                Err(_) if stop.load(Ordering::Relaxed) => break,
                Err(_) => {}
            }
        }
        got
    })
}

/// Checks one receiver's lines from `sender`: strictly increasing (gaps allowed, never a
/// repeat or a step back); returns how many arrived.
fn assert_in_order(got: &[(usize, u64, Instant)], sender: usize, who: &str) -> u64 {
    let mut last = None;
    let mut n = 0;
    for &(s, q, _) in got.iter().filter(|g| g.0 == sender) {
        assert!(last.is_none_or(|l| q > l), "{who}: sender {s} line {q} after {last:?}");
        last = Some(q);
        n += 1;
    }
    n
}

#[test]
fn a_node_whose_nats_server_dies_fails_over_and_resumes_within_two_seconds_in_order() {
    let Some(bin) = nats_server() else { return };
    let (mut servers, nodes) = three_nodes(&bin, "corecast.t.failover");
    // Node 0 loses its server. Its client receives from a sender on node 1, and sends to a
    // receiver on node 2.
    let rx0 = nodes[0].connect();
    let rx2 = nodes[2].connect();
    let (tx0, tx1) = (nodes[0].connect(), nodes[1].connect());
    let stop = Arc::new(AtomicBool::new(false));
    let (sent0, sent1) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let settled = Arc::new(AtomicBool::new(false));
    let r0 = collecting_reader(&rx0, settled.clone());
    let r2 = collecting_reader(&rx2, settled.clone());
    let every = Duration::from_millis(2);
    let s0 = paced_sender(tx0, 0, every, stop.clone(), sent0.clone());
    let s1 = paced_sender(tx1, 1, every, stop.clone(), sent1.clone());
    std::thread::sleep(Duration::from_millis(700));
    servers[0].kill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    let (times0, _tx0) = s0.join().unwrap();
    let (times1, _tx1) = s1.join().unwrap();
    // Let what is in flight arrive; the readers then stop at their next quiet 100 ms.
    std::thread::sleep(Duration::from_millis(1000));
    settled.store(true, Ordering::Relaxed);
    let got0 = r0.join().unwrap();
    let got2 = r2.join().unwrap();

    let n0 = assert_in_order(&got0, 1, "node 0's client");
    let n2 = assert_in_order(&got2, 0, "node 2's client");
    assert!(n0 > 0 && n2 > 0);
    // Relaying resumed: node 0 got lines that node 1 sent after the kill, and node 2 got
    // lines that node 0 sent after the kill, each within 2 s of it (a generous bound for
    // this machine: the reconnect itself takes a few milliseconds on loopback).
    for (got, times, sender, who) in [
        (&got0, &times1, 1, "node 0 from node 1"),
        (&got2, &times0, 0, "node 2 from node 0"),
    ] {
        let resumed = got
            .iter()
            .filter(|g| g.0 == sender)
            .find(|g| times[g.1 as usize] > killed)
            .unwrap_or_else(|| panic!("{who}: nothing sent after the kill arrived"));
        let after = resumed.2.duration_since(killed);
        eprintln!("failover: {who}: relaying resumed {after:?} after the kill");
        assert!(
            after < Duration::from_secs(2),
            "{who}: relaying resumed {after:?} after the kill"
        );
    }
    assert!(nodes[0].metric("reconnects") >= 1);
    assert_eq!(nodes[0].metric("connected"), 1);
    // Every line is accounted for: delivered, or counted as lost (a gap the receiving node
    // saw), or not published while node 0 was disconnected. Nothing is delivered twice.
    // Which lines never arrived, and when they were sent (ms from the kill), for the log.
    let missing = |got: &[(usize, u64, Instant)], sender: usize, times: &[Instant]| {
        let seen: std::collections::HashSet<u64> = got.iter().filter(|g| g.0 == sender).map(|g| g.1).collect();
        let gone: Vec<(u64, i128)> = (0..times.len() as u64)
            .filter(|q| !seen.contains(q))
            .map(|q| {
                let t = times[q as usize];
                let ms = |d: Duration| d.as_millis() as i128;
                (
                    q,
                    ms(t.saturating_duration_since(killed)) - ms(killed.saturating_duration_since(t)),
                )
            })
            .collect();
        format!(
            "{} lines missing (seq, ms from the kill): {:?}",
            gone.len(),
            &gone[..gone.len().min(20)]
        )
    };
    eprintln!("failover: node 0 from node 1: {}", missing(&got0, 1, &times1));
    eprintln!("failover: node 2 from node 0: {}", missing(&got2, 0, &times0));
    let total0 = sent0.load(Ordering::Relaxed);
    let total1 = sent1.load(Ordering::Relaxed);
    let unpublished0 = nodes[0].metric(r#"dropped_envelopes{reason="disconnected"}"#);
    assert_eq!(
        n2 + nodes[2].metric("lost_envelopes") + unpublished0,
        total0,
        "node 0's lines at node 2: delivered + lost + unpublished"
    );
    assert_eq!(
        n0 + nodes[0].metric("lost_envelopes"),
        total1,
        "node 1's lines at node 0: delivered + lost"
    );
    eprintln!(
        "failover: node 0 lost {} of node 1's lines, node 2 lost {} and node 0 did not publish {unpublished0} of node 0's {total0}",
        nodes[0].metric("lost_envelopes"),
        nodes[2].metric("lost_envelopes"),
    );
}

#[test]
fn when_one_node_dies_the_others_keep_relaying() {
    let Some(bin) = nats_server() else { return };
    let (_servers, mut nodes) = three_nodes(&bin, "corecast.t.nodedies");
    let mut tx = nodes[0].connect();
    let mut rx = nodes[1].connect();
    let on_dead = nodes[2].connect();
    // SIGKILL node 2: no drain, its uplink vanishes mid-connection.
    let dead = nodes.pop().unwrap();
    dead.relay.signal(libc::SIGKILL);
    drop(on_dead);
    drop(dead);
    for i in 0..100 {
        tx.send(format!("{}\n", content(0, i)).as_bytes());
    }
    for i in 0..100 {
        let line = rx.line();
        assert_eq!(String::from_utf8_lossy(&line), tx.envelope(&content(0, i)));
    }
    assert_eq!(nodes[1].metric("connected"), 1);
    assert_eq!(nodes[1].metric("gaps"), 0);
}

#[test]
fn with_every_nats_server_gone_a_node_relays_locally_and_reports_it() {
    let Some(bin) = nats_server() else { return };
    let (servers, nodes) = three_nodes(&bin, "corecast.t.alldown");
    drop(servers);
    let node = &nodes[0];
    let deadline = Instant::now() + PATIENCE;
    while node.metric("connected") == 1 {
        assert!(Instant::now() < deadline, "the node did not notice that NATS is gone");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut a = node.connect();
    let mut b = node.connect();
    for i in 0..50 {
        a.send(format!("{}\n", content(0, i)).as_bytes());
    }
    for i in 0..50 {
        assert_eq!(String::from_utf8_lossy(&b.line()), a.envelope(&content(0, i)));
    }
    let (status, body) = node.healthz();
    assert_eq!(status, 200, "a node without its uplink still serves its own clients");
    assert!(body.contains("cluster: disconnected"), "{body}");
    assert!(node.metric(r#"dropped_envelopes{reason="disconnected"}"#) >= 50);
    assert_eq!(node.metric("connected"), 0);
    let (_, stats) = http_get(node.admin, "/stats").unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["cluster"]["connected"], false);
}

#[test]
fn check_prints_the_cluster_section_and_a_bad_one_names_its_path_and_exits_78() {
    let file = temp_config(r#"{"hyper_parameters":{"cluster":{"nats":["nats://127.0.0.1:4222"],"subject":"room"}}}"#);
    let out = corecast()
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed["hyper_parameters"]["cluster"],
        serde_json::json!({"nats": ["nats://127.0.0.1:4222"], "subject": "room"})
    );
    // The flag replaces the file's servers and keeps its subject.
    let out = corecast()
        .args(["check", "--config", file.to_str().unwrap()])
        .args([
            "--cluster-nats",
            "nats://10.1.1.1:4222",
            "--cluster-nats",
            "nats://10.1.1.2:4222",
        ])
        .output()
        .unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed["hyper_parameters"]["cluster"],
        serde_json::json!({"nats": ["nats://10.1.1.1:4222", "nats://10.1.1.2:4222"], "subject": "room"})
    );
    // Off by default.
    let out = corecast().arg("check").output().unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["hyper_parameters"]["cluster"], serde_json::Value::Null);
    let bad = temp_config(r#"{"hyper_parameters":{"cluster":{"nats":5}}}"#);
    let out = corecast()
        .args(["check", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("hyper_parameters.cluster.nats: expected a list of nats:// URLs, found 5"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = corecast()
        .args(["check", "--cluster-nats", "localhost:4222"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster-nats: expected a nats://host:port URL"));
}

#[test]
fn a_hung_nats_server_neither_stalls_local_relaying_nor_keeps_the_node_off_the_cluster() {
    let Some(bin) = nats_server() else { return };
    let (servers, nodes) = three_nodes(&bin, "corecast.t.hung");
    let (tx, local) = (nodes[0].connect(), nodes[0].connect());
    let remote = nodes[1].connect();
    let stop = Arc::new(AtomicBool::new(false));
    let settled = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let r_local = collecting_reader(&local, settled.clone());
    let r_remote = collecting_reader(&remote, settled.clone());
    let sender = paced_sender(tx, 0, Duration::from_millis(5), stop.clone(), sent.clone());
    std::thread::sleep(Duration::from_millis(500));
    // SIGSTOP: the connection stays open and nothing answers (as a hung host would).
    let hung_pid = servers[0].child.as_ref().map(|c| c.id() as i32).unwrap();
    // SAFETY: kill(2) on a child process of this test.
    assert_eq!(unsafe { libc::kill(hung_pid, libc::SIGSTOP) }, 0);
    let hung = Instant::now();
    let deadline = hung + PATIENCE;
    while nodes[0].metric("reconnects") == 0 {
        assert!(
            Instant::now() < deadline,
            "node 0 never left its hung NATS server; log:\n{}",
            nodes[0].relay.log.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("hung server: node 0 reconnected {:?} after the stop", hung.elapsed());
    let reconnected = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (times, _tx) = sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    settled.store(true, Ordering::Relaxed);
    let got_local = r_local.join().unwrap();
    let got_remote = r_remote.join().unwrap();
    // Local relaying went on all along: every line, in order, and never a long pause.
    assert_eq!(assert_in_order(&got_local, 0, "the local client"), times.len() as u64);
    let longest = got_local
        .windows(2)
        .map(|w| w[1].2.duration_since(w[0].2))
        .max()
        .unwrap_or_default();
    assert!(longest < Duration::from_secs(3), "local relaying paused {longest:?}");
    // And node 0 is back in the cluster: lines sent after its reconnect reach node 1.
    assert_in_order(&got_remote, 0, "node 1's client");
    assert!(
        got_remote.iter().any(|g| times[g.1 as usize] > reconnected),
        "nothing node 0 sent after its reconnect reached node 1"
    );
    // SAFETY: as above; the server is killed when `servers` is dropped.
    unsafe { libc::kill(hung_pid, libc::SIGCONT) };
}

// The panic hook exists only in debug builds (as `cargo test` builds the relay).
#[cfg(debug_assertions)]
#[test]
fn an_uplink_that_panics_is_logged_counted_shown_down_and_restarted_and_drops_meanwhile_are_counted() {
    let Some(bin) = nats_server() else { return };
    let servers = nats_cluster(&bin, 1);
    let urls = vec![servers[0].url()];
    let subject = "corecast.t.uplinkpanic";
    // The uplink panics as soon as it starts publishing, and stays down for 4 s: long
    // enough to look at it while it is.
    let hooked = Node::start_with_env(
        &urls,
        subject,
        &[
            ("CORECAST_TEST_PANIC", "cluster"),
            ("CORECAST_TEST_RESTART_BACKOFF_MS", "4000"),
        ],
    );
    let other = Node::start(&urls, subject);
    let died = hooked.relay.log.wait_for("the cluster uplink thread died: ");
    assert!(
        died.contains("ERROR - the cluster uplink thread died: panicked: test hook: CORECAST_TEST_PANIC=cluster; restarting it in 4000 ms"),
        "{died}"
    );
    let (status, body) = hooked.healthz();
    assert_eq!(status, 200, "the shards still serve their own clients: {body}");
    assert!(
        body.contains("cluster: down (the uplink thread died: test hook: CORECAST_TEST_PANIC=cluster; restarting it)"),
        "{body}"
    );
    // Lines sent meanwhile reach the node's own clients; what the shards hand the dead
    // uplink is drained and counted, and the shards never wait for it.
    let mut a = hooked.connect();
    let mut b = hooked.connect();
    for i in 0..20 {
        a.send(format!("{}\n", content(0, i)).as_bytes());
    }
    for i in 0..20 {
        assert_eq!(String::from_utf8_lossy(&b.line()), a.envelope(&content(0, i)));
    }
    let deadline = Instant::now() + PATIENCE;
    while hooked.metric("dropped_envelopes{reason=\"uplink_down\"}") < 20 {
        assert!(
            Instant::now() < deadline,
            "the lines handed to the dead uplink were not counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(hooked.metric("connected"), 0);
    // Back after the backoff: counted, connected again, and relaying across nodes.
    hooked
        .relay
        .log
        .wait_for("the cluster uplink thread restarted (restarts so far: 1)");
    let nodes = [hooked, other];
    warm_up(&nodes);
    let (_, body) = nodes[0].healthz();
    assert!(body.contains("cluster: connected"), "{body}");
    let (_, metrics) = http_get(nodes[0].admin, "/metrics").expect("scrape /metrics");
    assert!(
        metrics.contains("corecast_thread_restarts_total{thread=\"cluster\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("corecast_thread_up{thread=\"cluster\"} 1\n"),
        "{metrics}"
    );
}
