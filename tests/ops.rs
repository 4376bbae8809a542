//! Operations (issue 6): file and JSON logs (`logger.*`), `log_keys`,
//! systemd readiness through a fake `NOTIFY_SOCKET`, and the shipped systemd unit. The
//! admin endpoint's tests are in `admin.rs`.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{corecast, temp_config, wait_until, Relay, PATIENCE};

/// A fake systemd: a datagram socket that collects notifications.
fn expect_notification(socket: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no {what} notification: {e}"));
    let text = String::from_utf8(buf[..n].to_vec()).unwrap();
    assert!(text.lines().any(|l| l == what), "{text:?} lacks {what}");
    text
}

#[test]
fn a_notify_socket_receives_ready_then_stopping() {
    use std::os::linux::net::SocketAddrExt;
    let dir = test_dir("notify");
    let path = dir.join("notify.sock");
    let abstract_name = format!("corecast-ops-test-{}", std::process::id());
    let by_path = UnixDatagram::bind(&path).unwrap();
    let by_name =
        UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap()).unwrap();
    for (socket, env) in [
        (&by_path, path.to_str().unwrap().to_string()),
        (&by_name, format!("@{abstract_name}")),
    ] {
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut relay = Relay::with_env("{}", &[("NOTIFY_SOCKET", &env)], &["--shards", "2"]);
        let ready = expect_notification(socket, "READY=1");
        assert!(
            ready.contains(&format!("STATUS=listening on {} with 2 shards", relay.addr)),
            "{ready:?}"
        );
        // Ready means accepting: a client can connect and be relayed to at once.
        let mut a = relay.connect();
        let mut b = relay.connect();
        a.send(b"ready\n");
        assert_eq!(b.line_str(), a.envelope("ready"));
        relay.signal(libc::SIGTERM);
        expect_notification(socket, "STOPPING=1");
        assert_eq!(relay.wait_exit(), Some(0));
    }
}

/// A fresh directory for one test's files.
fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corecast-ops-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).expect("the log file exists")
}

#[test]
fn json_logs_go_to_console_and_file_with_the_expected_fields() {
    let dir = test_dir("json");
    let config = format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}","enable_json_log":true,
            "date_format":"%H:%M"}}}}"#,
        dir.display()
    );
    let mut relay = Relay::with_config(
        &config,
        &["--name", "ops-json", "--log-level", "debug", "--shards", "1"],
    );
    let mut a = relay.connect();
    let mut b = relay.connect();
    a.send(b"hello \"json\"\n");
    assert_eq!(b.line_str(), a.envelope("hello \"json\""));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));

    let file = read_log(&dir, "ops-json");
    for (sink, text) in [("file", file.as_str()), ("console", &relay.log.text())] {
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{sink} line {l:?} is not JSON: {e}")))
            .collect();
        for l in &lines {
            // JSON lines carry RFC 3339 with the offset, whatever date_format says.
            let ts = l["timestamp"].as_str().unwrap();
            let b = ts.as_bytes();
            assert!(
                ts.len() == 29 && b[10] == b'T' && b[19] == b'.' && matches!(b[23], b'+' | b'-') && b[26] == b':',
                "not RFC 3339 with milliseconds and offset: {ts}"
            );
            assert!(["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"].contains(&l["level"].as_str().unwrap()));
            assert_eq!(l["name"], "ops-json");
            assert!(l["message"].is_string());
        }
        let find = |prefix: &str| {
            lines
                .iter()
                .find(|l| l["message"].as_str().unwrap().starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in the {sink} log:\n{text}"))
        };
        assert_eq!(find("listening on ")["level"], "INFO");
        let relayed = find("relayed line");
        assert_eq!(relayed["level"], "DEBUG");
        assert_eq!(relayed["remote_addr"], a.local_addr.to_string());
        assert_eq!(relayed["content"], "hello \"json\"");
        // Structured fields: the data of the message, for filtering.
        let connected = find(&format!("client connected: {}", a.local_addr));
        assert_eq!(connected["peer"], a.local_addr.to_string());
        assert_eq!(connected["shard"], 0);
        let closed = find(&format!("client disconnected: {}", b.local_addr));
        assert_eq!(closed["peer"], b.local_addr.to_string());
        assert_eq!(closed["reason"], "shutdown");
        let stopped = find("shard 0 stopped: accepted=");
        assert_eq!(
            (stopped["shard"].as_u64(), stopped["accepted"].as_u64()),
            (Some(0), Some(2))
        );
        assert_eq!(stopped["lines_in"], 1);
        assert!(stopped["message"].as_str().unwrap().len() < 300, "{stopped}");
        assert_eq!(find("starting 1 shard on ")["shards"], 1);
    }
}

#[test]
fn the_file_log_rotates_by_max_file_size_keeping_backup_count_files() {
    let dir = test_dir("rotate");
    let config = format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}","max_file_size":4000,"backup_count":2}},
            "hyper_parameters":{{"rate_limit_msgs_per_minute":null}}}}"#,
        dir.display()
    );
    let mut relay = Relay::with_config(&config, &["--name", "ops-rot", "--log-level", "debug"]);
    let mut a = relay.connect();
    let mut b = relay.connect();
    // ~100 bytes of log per relayed line: 300 lines are ~30 kB, several rotations.
    const LINES: usize = 300;
    for i in 0..LINES {
        a.send(format!("line {i:05}\n").as_bytes());
    }
    for i in 0..LINES {
        assert_eq!(b.line_str(), a.envelope(&format!("line {i:05}")));
    }
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));

    let file = |suffix: &str| std::fs::read_to_string(dir.join(format!("ops-rot.log{suffix}")));
    assert!(file(".3").is_err(), "only backup_count backups are kept");
    let files = [file(".2").unwrap(), file(".1").unwrap(), file("").unwrap()];
    for f in &files {
        assert!(
            !f.is_empty() && f.len() < 4000,
            "every file stays under max_file_size: {} bytes",
            f.len()
        );
        assert!(
            f.ends_with('\n') && f.lines().all(|l| l.contains(" - ops-rot - ")),
            "whole lines only"
        );
    }
    // Oldest to newest, the kept files hold the latest relayed lines in order, none missing.
    let relayed: Vec<usize> = files
        .concat()
        .lines()
        .filter_map(|l| l.split(" content=line ").nth(1))
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(relayed.len() > 20, "{relayed:?}");
    let first = relayed[0];
    assert!(first > 0, "the oldest lines were rotated away");
    assert_eq!(relayed, (first..LINES).collect::<Vec<_>>());
}

#[test]
fn sigusr1_reopens_the_log_file_after_logrotate_moved_it() {
    let dir = test_dir("reopen");
    let config = format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        dir.display()
    );
    let mut relay = Relay::with_config(&config, &["--name", "ops-reopen"]);
    let path = dir.join("ops-reopen.log");
    let moved = dir.join("ops-reopen.log.moved");
    wait_until("the file log to say listening", Duration::from_millis(20), || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("listening on"))
    });
    std::fs::rename(&path, &moved).unwrap();
    let before = relay.connect();
    // The file is written by a background thread: the line reaches the moved file (same
    // inode) a moment after stderr.
    let before_line = format!("client connected: {}", before.local_addr);
    wait_until("the moved file to get the line", Duration::from_millis(20), || {
        std::fs::read_to_string(&moved).is_ok_and(|t| t.contains(&before_line))
    });
    relay.signal(libc::SIGUSR1);
    relay.log.wait_for("SIGUSR1 received; log file reopened");
    let after = relay.connect();
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0), "SIGUSR1 does not stop the relay");
    let old = std::fs::read_to_string(&moved).unwrap();
    let new = std::fs::read_to_string(&path).expect("a new file at the old path");
    assert!(
        old.contains(&format!("client connected: {}", before.local_addr)),
        "{old}"
    );
    assert!(!old.contains("reopened"), "{old}");
    assert!(new.lines().next().unwrap().contains("log file reopened"), "{new}");
    assert!(
        new.contains(&format!("client connected: {}", after.local_addr)),
        "{new}"
    );
    assert!(new.contains("all shards drained; exiting"), "{new}");
}

#[test]
fn the_text_file_log_appends_across_runs_and_the_console_can_be_off() {
    let dir = test_dir("text");
    let config = format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        dir.join("sub").display()
    );
    for _ in 0..2 {
        let mut relay = Relay::with_config(&config, &["--name", "ops-text"]);
        relay.signal(libc::SIGTERM);
        assert_eq!(relay.wait_exit(), Some(0));
    }
    let file = read_log(&dir.join("sub"), "ops-text");
    let listening: Vec<&str> = file.lines().filter(|l| l.contains("listening on")).collect();
    assert_eq!(listening.len(), 2, "{file}");
    for l in listening {
        let parts: Vec<&str> = l.splitn(4, " - ").collect();
        assert_eq!(&parts[1..3], &["ops-text", "INFO"], "{l}");
    }

    // Console off: nothing on stderr, everything in the file.
    let quiet = format!(
        r#"{{"logger":{{"enable_console_log":false,"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        dir.display()
    );
    let path = temp_config(&quiet);
    let mut child = corecast()
        .args(["--port", "0", "--name", "ops-quiet", "--config", path.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the file log to say listening", Duration::from_millis(20), || {
        std::fs::read_to_string(dir.join("ops-quiet.log")).is_ok_and(|t| t.contains("listening on"))
    });
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = wait_with_deadline(&mut child);
    assert_eq!(out.0, Some(0));
    assert_eq!(out.1, "", "the console is off");
    assert!(read_log(&dir, "ops-quiet").contains("all shards drained; exiting"));
}

/// Waits for `child` to exit (killing it past [`PATIENCE`]); returns its code and stderr.
fn wait_with_deadline(child: &mut std::process::Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), err)
}

#[test]
fn an_unopenable_log_file_is_a_config_error_naming_the_path() {
    let dir = test_dir("badlog");
    let not_a_dir = dir.join("plain-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let path = temp_config(&format!(
        r#"{{"logger":{{"enable_file_log":true,"log_file_path":"{}"}}}}"#,
        not_a_dir.display()
    ));
    let out = corecast()
        .args(["--port", "0", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("cannot open log file") && err.contains(&format!("{}/corecast.log", not_a_dir.display())),
        "{err}"
    );
}

#[test]
fn log_keys_keep_only_the_listed_payload_keys_in_relay_log_lines() {
    let mut relay = Relay::with_config(
        r#"{"logger":{"log_keys":["type","id"]},"hyper_parameters":{"rate_limit_msgs_per_minute":null}}"#,
        &["--log-level", "debug"],
    );
    let mut a = relay.connect();
    let mut b = relay.connect();
    let payloads = [
        r#"{"secret":"hunter2","id":7,"type":"chat"}"#,
        "plain text with hunter2",
        r#"[{"secret":"hunter2"}]"#,
    ];
    for p in payloads {
        a.send(format!("{p}\n").as_bytes());
    }
    // Relaying is untouched: recipients get the whole line.
    for p in payloads {
        assert_eq!(b.line_str(), a.envelope(p));
    }
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(), Some(0));
    let relayed: Vec<String> = relay
        .log
        .text()
        .lines()
        .filter(|l| l.contains(" - DEBUG - relayed line "))
        .map(|l| l.split(" content=").nth(1).unwrap().to_string())
        .collect();
    assert_eq!(
        relayed,
        [
            r#"{"type":"chat","id":7}"#,
            "plain text with hunter2",
            r#"[{"secret":"hunter2"}]"#
        ],
        "a JSON object keeps only log_keys, in their order; anything else is logged as it is"
    );
}

#[test]
fn the_systemd_unit_has_what_a_notify_service_with_io_uring_needs() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/corecast.service")).unwrap();
    let mut settings: HashMap<String, Vec<String>> = HashMap::new();
    for line in unit.lines().map(str::trim) {
        if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            settings.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    let one = |k: &str| -> &str {
        match settings.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{k}: expected one value, found {other:?}"),
        }
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/corecast --config /etc/corecast/server_config.json"
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    let nofile: u64 = one("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 20_000);
    let memlock = one("LimitMEMLOCK");
    let memlock_mib: u64 = memlock.strip_suffix('M').unwrap().parse().unwrap();
    assert!(memlock_mib >= 8, "LimitMEMLOCK={memlock}");
    // The stop timeout must outlast the default shutdown grace (5 s).
    let stop: u64 = one("TimeoutStopSec").strip_suffix('s').unwrap().parse().unwrap();
    assert!(stop > 5);
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("DynamicUser", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    let filters = &settings["SystemCallFilter"];
    let allow = filters.iter().find(|f| !f.starts_with('~')).unwrap();
    for call in [
        "@system-service",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    ] {
        assert!(
            allow.split_whitespace().any(|c| c == call),
            "SystemCallFilter lacks {call}"
        );
    }
    // The deny list must not take back what glommio needs (rlimits, CPU pinning, io_uring).
    for f in filters.iter().filter(|f| f.starts_with('~')) {
        for needed in ["@resources", "@io-event", "io_uring", "setrlimit", "sched_setaffinity"] {
            assert!(!f.contains(needed), "{f} denies {needed}");
        }
    }

    // systemd's own check, when this machine has it: no warnings at all.
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze not installed; skipping `systemd-analyze verify`");
        return;
    }
    let dir = test_dir("unit");
    let copy = dir.join("corecast.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/corecast", env!("CARGO_BIN_EXE_corecast")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}
